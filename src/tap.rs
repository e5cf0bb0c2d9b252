//! `quicmesh tap`: requests as they complete, read from an admin API's `/tap` stream (the
//! gateway's follows every node it lists).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use quicmesh_shared::telemetry::tap::{self, Event, SseItem};

/// How long the admin API may take to open the stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// One request as a line of text (what a node sent, without control characters).
pub fn line(e: &Event) -> String {
    let status = if e.error.is_empty() { e.status.to_string() } else { format!("{} {}", e.status, e.error) };
    let line = format!(
        "{} {} {} {} {} {} :status={} {:.2}ms src={} dst={} route={} retries={}{}",
        e.time,
        e.proxy,
        e.direction,
        e.method,
        e.authority,
        e.path,
        status,
        e.duration_ms,
        e.src_service,
        e.dst_service,
        e.route,
        e.retries,
        if e.trace_id.is_empty() { String::new() } else { format!(" trace={}", e.trace_id) },
    );
    crate::top::printable(&line).into_owned()
}

/// Prints requests matching `filter` (query parameters of `/tap`) until `count` were printed,
/// or the stream ends.
pub async fn tap(admin: SocketAddr, filter: &[(String, String)], count: Option<u64>, json: bool) -> anyhow::Result<()> {
    // Checked here too, so a typo is told before anything connects.
    let filter = tap::Filter::from_query(filter).map_err(|e| anyhow::anyhow!(e))?;
    let token = std::env::var("QUICMESH_ADMIN_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    let path = format!("/tap?{}", filter.to_query());
    let resp = quicmesh_shared::admin::client_get(admin, &path, token.as_deref(), OPEN_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the tap at {admin}: {e}"))?;
    let (mut shown, mut missed) = (0u64, 0u64);
    let mut failed = None;
    tap::read_sse(resp.into_body(), |item| {
        let mut out = std::io::stdout().lock();
        let written = match item {
            SseItem::Event(e) => {
                shown += 1;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default())
                } else {
                    writeln!(out, "{}", line(&e))
                }
            }
            SseItem::Missed(n) => {
                let new = n.saturating_sub(missed);
                missed = n;
                eprintln!("({new} requests left out: over --rate {} or a slow reader)", filter.rate);
                Ok(())
            }
        };
        if let Err(e) = written.and_then(|_| out.flush()) {
            // A closed pipe (`| head`) ends the tap quietly.
            failed = (e.kind() != std::io::ErrorKind::BrokenPipe).then_some(e);
            return false;
        }
        count.is_none_or(|c| shown < c)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the tap stream broke: {e}"))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(())
}
