//! `quicmesh status` and `quicmesh top`: views of a running mesh read from the gateway's admin
//! API. `top` scrapes the Prometheus metrics of the gateway and of every node it lists, and
//! turns the change between two scrapes into a table per caller and service: request rate,
//! success rate and latency percentiles, as `linkerd viz stat` does.
//!
//! Each request is counted once, where it entered the mesh: at the calling node's outbound side
//! or at the gateway's ingress.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use quicmesh_shared::telemetry::scrape::{self, Pair};
pub use quicmesh_shared::telemetry::scrape::{rows, Row, Sample};

/// What a row of `top` stands for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// Caller and service (as `linkerd viz stat`).
    #[default]
    Service,
    /// Service and route.
    Route,
    /// The node (or gateway) where requests entered the mesh, and service.
    Node,
}

impl From<By> for scrape::By {
    fn from(by: By) -> Self {
        match by {
            By::Service => scrape::By::Service,
            By::Route => scrape::By::Route,
            By::Node => scrape::By::Node,
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.2}ms", s * 1000.0))
}

/// The table as text, with the column names of `by`.
pub fn render(rows: &[Row], by: By) -> String {
    let (first, second) = scrape::By::from(by).columns();
    let mut out = format!("{:<20} {:<20} {:>10} {:>9} {:>10} {:>10}\n", first, second, "RPS", "SUCCESS", "P50", "P99");
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:<20} {:>10.1} {:>8.1}% {:>10} {:>10}\n",
            printable(&r.source),
            printable(&r.service),
            r.rps,
            r.success * 100.0,
            ms(r.p50),
            ms(r.p99)
        ));
    }
    if rows.is_empty() {
        out.push_str("(no requests yet)\n");
    }
    out
}

/// `text` with its control characters (a terminal's escape sequences among them) and
/// bidirectional overrides shown as `?`: for text a node or a peer chose, printed to the
/// operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(hidden) {
        text.chars().map(|c| if hidden(c) { '?' } else { c }).collect::<String>().into()
    } else {
        text.into()
    }
}

/// Characters that act on the terminal or the text around them rather than showing: controls,
/// the bidirectional marks, embeddings, overrides and isolates that make a line read other than
/// it is (U+202E turns what follows right to left), zero-width characters and line separators.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Adds `QUICMESH_ADMIN_TOKEN` as a bearer token, for admin APIs that require one.
fn with_token(req: http::request::Builder) -> http::request::Builder {
    match std::env::var("QUICMESH_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => req.header(http::header::AUTHORIZATION, format!("Bearer {}", t.trim())),
        _ => req,
    }
}

/// The most of one answer read from an admin API (a gateway's `/config_dump` with thousands of
/// services is a few MB).
const MAX_ANSWER: usize = 64 << 20;

/// GET `http://addr{path}` from the admin API the user named; the body as text.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    fetch(addr, path, true).await
}

/// [`get`] from an admin address a node reported (to the gateway, which lists it): the token
/// goes only to one on this host, as the gateway's dashboard sends its own (the node picks the
/// port, and a token elsewhere would reach whoever listens there).
pub async fn get_reported(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    fetch(addr, path, addr.ip().is_loopback()).await
}

/// GET `http://addr{path}`, with the token when `token`; the whole answer within 5 s and
/// [`MAX_ANSWER`] bytes.
async fn fetch(addr: SocketAddr, path: &str, token: bool) -> anyhow::Result<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(format!("http://{addr}{path}"));
    let req = if token { with_token(req) } else { req }.body(Default::default())?;
    let read = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
        let body = body.collect().await.map_err(|e| anyhow::anyhow!("{addr}{path}: {e}"))?.to_bytes();
        anyhow::ensure!(status.is_success(), "{addr}{path} answered {status}");
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}{path}: no answer in 5s"))?
}

/// `quicmesh node revoke NAME`: asks the gateway to revoke a node.
pub async fn revoke(admin: SocketAddr, name: &str) -> anyhow::Result<String> {
    post(admin, "/revoke", &format!("node={}", escape(name))).await
}

/// `text` escaped for a query string.
pub fn escape(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Runs one of the gateway's admin actions (`POST path?query`); its answer.
pub async fn post(admin: SocketAddr, path: &str, query: &str) -> anyhow::Result<String> {
    post_waiting(admin, path, query, bytes::Bytes::new(), Duration::ZERO).await
}

/// As [`post`], trying again for up to `wait` while the gateway is not up yet or answers 503
/// (its store is unavailable for now).
pub async fn post_waiting(
    admin: SocketAddr,
    path: &str,
    query: &str,
    body: bytes::Bytes,
    wait: Duration,
) -> anyhow::Result<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    // A wait too long for the clock is as good as for ever.
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(wait).unwrap_or(now + Duration::from_secs(1 << 40));
    loop {
        let req = with_token(
            http::Request::post(format!("http://{admin}{path}?{query}"))
                .header(http::header::CONTENT_TYPE, "application/json"),
        )
        .body(http_body_util::Full::new(body.clone()))?;
        let answer = async {
            let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await??;
            let status = resp.status();
            let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
            anyhow::Ok((status, body))
        };
        let retry = match answer.await {
            Ok((status, body)) if status.is_success() => return Ok(body),
            Ok((status, body)) if status == http::StatusCode::SERVICE_UNAVAILABLE => {
                anyhow::anyhow!("the gateway refused: {}", body.trim())
            }
            Ok((_, body)) => anyhow::bail!("the gateway refused: {}", body.trim()),
            Err(e) => anyhow::anyhow!("cannot reach the gateway's admin API at {admin}: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(retry);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The gateway's `/nodes` page. A node's admin API has no such page: say so.
pub async fn nodes(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    match get(admin, "/nodes").await {
        Ok(text) => Ok(serde_json::from_str(&text)?),
        Err(e) if get(admin, "/endpoints").await.is_ok() => Err(anyhow::anyhow!(
            "{admin} is a node's admin API, not the gateway's ({e}): point --admin at the gateway (gateway.admin, 127.0.0.1:9901 by default)"
        )),
        Err(e) => Err(anyhow::anyhow!("cannot read the gateway's admin API at {admin}: {e}")),
    }
}

/// `quicmesh status`: the nodes as the gateway sees them (`json`: the gateway's document).
pub async fn status(admin: SocketAddr, json: bool) -> anyhow::Result<String> {
    let doc = nodes(admin).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&doc)? + "\n");
    }
    let version = doc["version"].as_u64().unwrap_or(0);
    let mut out = format!("snapshot version {version}\n");
    out.push_str(&format!(
        "{:<20} {:<10} {:<22} {:>9} {:>9}  {:<8} {}\n",
        "NODE", "CONNECTED", "ADDRESS", "INSTANCES", "UNHEALTHY", "SNAPSHOT", "LAST NACK"
    ));
    for n in doc["nodes"].as_array().into_iter().flatten() {
        let acked = n["acked_version"].as_u64().unwrap_or(0);
        let snap = if acked == version {
            "current"
        } else if acked == 0 {
            "none"
        } else {
            "behind"
        };
        out.push_str(&format!(
            "{:<20} {:<10} {:<22} {:>9} {:>9}  {:<8} {}\n",
            n["name"].as_str().unwrap_or("?"),
            if n["connected"].as_bool().unwrap_or(false) { "yes" } else { "no" },
            n["address"].as_str().unwrap_or("?"),
            n["instances"].as_u64().unwrap_or(0),
            n["unhealthy"].as_u64().unwrap_or(0),
            snap,
            printable(n["last_nack"].as_str().unwrap_or("-")),
        ));
    }
    Ok(out)
}

/// One scrape of the gateway and every node that reported an admin address.
async fn scrape(admin: SocketAddr, by: By) -> anyhow::Result<(Sample, usize)> {
    let mut sample = Sample::new(by.into());
    let doc = nodes(admin).await?;
    sample.add(&get(admin, "/metrics").await?, "gateway");
    let mut sources = 1;
    for n in doc["nodes"].as_array().into_iter().flatten() {
        let Some(addr) = n["admin"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()) else { continue };
        // A node that cannot be reached (admin on its own loopback) is left out of the sums.
        if let Ok(text) = get_reported(addr, "/metrics").await {
            sample.add(&text, n["name"].as_str().unwrap_or("?"));
            sources += 1;
        }
    }
    Ok((sample, sources))
}

/// Rows with no request for this long leave the table.
pub const IDLE_ROW: Duration = Duration::from_secs(30);

/// Keeps the rows that saw a request within [`IDLE_ROW`] of `now`; `active` remembers when each
/// last did.
fn drop_idle(rows: &mut Vec<Row>, active: &mut HashMap<Pair, std::time::Instant>, now: std::time::Instant) {
    for r in rows.iter().filter(|r| r.rps > 0.0) {
        active.insert((r.source.clone(), r.service.clone()), now);
    }
    rows.retain(|r| {
        active.get(&(r.source.clone(), r.service.clone())).is_some_and(|t| now.duration_since(*t) < IDLE_ROW)
    });
}

/// `quicmesh top`: refreshes the table every `interval`; stops after `count` tables if given.
pub async fn top(admin: SocketAddr, interval: Duration, count: Option<u32>, by: By) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let (mut prev, _) = scrape(admin, by).await?;
    let mut shown = 0;
    let mut active: HashMap<Pair, std::time::Instant> = HashMap::new();
    loop {
        let start = std::time::Instant::now();
        tokio::time::sleep(interval).await;
        let (cur, sources) = scrape(admin, by).await?;
        let mut rows = rows(&prev, &cur, start.elapsed().as_secs_f64());
        drop_idle(&mut rows, &mut active, std::time::Instant::now());
        let table = render(&rows, by);
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Clear the screen and go home: refresh in place.
            write!(stdout, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            stdout,
            "quicmesh top: {sources} components via {admin}, every {}",
            humantime::format_duration(interval)
        )?;
        write!(stdout, "{table}")?;
        stdout.flush()?;
        prev = cur;
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE quicmesh_requests_total counter
quicmesh_requests_total{direction="outbound",source_service="web",service="api",route="none",code="200",status_class="2xx"} 10
quicmesh_requests_total{direction="inbound",source_service="web",service="api",route="none",code="200",status_class="2xx"} 10
quicmesh_request_duration_seconds_bucket{direction="outbound",source_service="web",service="api",route="none",le="0.001"} 5
quicmesh_request_duration_seconds_bucket{direction="outbound",source_service="web",service="api",route="none",le="0.01"} 10
quicmesh_request_duration_seconds_bucket{direction="outbound",source_service="web",service="api",route="none",le="+Inf"} 10
"#;

    #[test]
    fn text_a_node_chose_reaches_the_terminal_without_control_characters() {
        assert_eq!(printable("services[0].name: bad"), "services[0].name: bad");
        assert_eq!(printable("bad\u{1b}]0;owned\u{7}\r\n"), "bad?]0;owned???");
        // A right-to-left override would show "node-exe.txt" as "node-txt.exe".
        assert_eq!(printable("node-\u{202e}txt.exe\u{2066}x\u{2069}"), "node-?txt.exe?x?");
        assert_eq!(printable("caf\u{e9} \u{4e2d}"), "caf\u{e9} \u{4e2d}");
        assert_eq!(printable("a\u{200b}b\u{2028}c\u{feff}"), "a?b?c?");
    }

    #[test]
    fn rates_success_and_percentiles_come_from_the_change() {
        let mut prev = Sample::default();
        prev.add(BEFORE, "node-a");
        let after = BEFORE
            .replace("status_class=\"2xx\"} 10\nquicmesh_requests_total{direction=\"inbound\"", "status_class=\"2xx\"} 100\nquicmesh_requests_total{direction=\"inbound\"")
            .replace("le=\"0.01\"} 10", "le=\"0.01\"} 110")
            .replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 110")
            + "quicmesh_requests_total{direction=\"outbound\",source_service=\"web\",service=\"api\",route=\"none\",code=\"503\",status_class=\"5xx\"} 10\n";
        let mut cur = Sample::default();
        cur.add(&after, "node-a");
        let rows = rows(&prev, &cur, 2.0);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let r = &rows[0];
        assert_eq!((r.source.as_str(), r.service.as_str()), ("web", "api"));
        assert!((r.rps - 50.0).abs() < 1e-9, "100 new requests in 2 s (inbound not counted twice): {}", r.rps);
        assert!((r.success - 0.9).abs() < 1e-9, "{}", r.success);
        // All 100 new observations fell in (1 ms, 10 ms]: the median is halfway through it.
        assert!((r.p50.unwrap() - 0.0055).abs() < 1e-9, "{:?}", r.p50);
        assert!(render(&rows, By::Service).contains("web"));
    }

    /// Answers a proxy made count as failures whatever their code; a client that left does not.
    #[test]
    fn proxy_errors_fail_and_rows_group_by_route_and_node() {
        let text = |no_route: u32, closed: u32, ok: u32| {
            format!(
                "quicmesh_requests_total{{direction=\"outbound\",source_service=\"web\",service=\"api\",route=\"r1\",code=\"404\",status_class=\"4xx\",error=\"no-route\"}} {no_route}\n\
                 quicmesh_requests_total{{direction=\"outbound\",source_service=\"web\",service=\"api\",route=\"r1\",code=\"499\",status_class=\"4xx\",error=\"client-closed\"}} {closed}\n\
                 quicmesh_requests_total{{direction=\"outbound\",source_service=\"web\",service=\"api\",route=\"r2\",code=\"200\",status_class=\"2xx\"}} {ok}\n"
            )
        };
        let sample = |by: By, t: &str| {
            let mut s = Sample::new(by.into());
            s.add(t, "node-a");
            s
        };
        let (before, after) = (text(0, 0, 0), text(2, 2, 6));
        let r = rows(&sample(By::Service, &before), &sample(By::Service, &after), 1.0);
        assert_eq!(r.len(), 1);
        assert!((r[0].success - 0.8).abs() < 1e-9, "2 no-route of 10 failed: {}", r[0].success);
        let r = rows(&sample(By::Route, &before), &sample(By::Route, &after), 1.0);
        let routes: Vec<(&str, &str, f64)> =
            r.iter().map(|r| (r.source.as_str(), r.service.as_str(), r.success)).collect();
        assert_eq!(routes, [("api", "r1", 0.5), ("api", "r2", 1.0)]);
        let r = rows(&sample(By::Node, &before), &sample(By::Node, &after), 1.0);
        assert_eq!((r[0].source.as_str(), r[0].service.as_str()), ("node-a", "api"));
        assert!(render(&r, By::Node).starts_with("NODE"));
    }

    #[test]
    fn rows_idle_for_a_while_leave_the_table() {
        let row = |service: &str, rps: f64| Row {
            source: "web".into(),
            service: service.into(),
            rps,
            success: 1.0,
            p50: None,
            p99: None,
        };
        let mut active = HashMap::new();
        let t0 = std::time::Instant::now();
        let mut rows = vec![row("busy", 5.0), row("quiet", 1.0)];
        drop_idle(&mut rows, &mut active, t0);
        assert_eq!(rows.len(), 2);
        let mut later = vec![row("busy", 5.0), row("quiet", 0.0)];
        drop_idle(&mut later, &mut active, t0 + IDLE_ROW / 2);
        assert_eq!(later.len(), 2, "idle, but not for long");
        let mut much_later = vec![row("busy", 5.0), row("quiet", 0.0), row("never", 0.0)];
        drop_idle(&mut much_later, &mut active, t0 + IDLE_ROW + Duration::from_secs(1));
        let left: Vec<&str> = much_later.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(left, ["busy"]);
    }

    #[test]
    fn label_values_with_escapes_parse() {
        let (name, labels, v) = scrape::parse_line(r#"m{a="x\"y",b="2"} 3.5"#).unwrap();
        assert_eq!((name, v), ("m", 3.5));
        assert_eq!(labels, vec![("a".into(), "x\"y".into()), ("b".into(), "2".into())]);
        assert!(scrape::parse_line("# HELP m x").is_none());
        assert_eq!(scrape::parse_line("plain 1").unwrap().0, "plain");
    }
}
