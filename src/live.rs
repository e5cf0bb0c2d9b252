//! `quicmesh check --live`: is the running mesh healthy, as `linkerd check` asks. Reads the
//! gateway's admin API and the admin API of every node it lists; each finding is a line, and any
//! failure makes the command fail. With a wait, it asks again until all pass or time is up.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::top::{get, get_reported, nodes, printable};

/// How a finding reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// A certificate expiring within this is worth a warning.
const NEAR_EXPIRY: f64 = 8.0 * 3600.0;

/// Every finding about the mesh behind the gateway at `admin`, expecting at least `expected`
/// nodes connected (0: any number).
pub async fn findings(admin: SocketAddr, expected: usize) -> Vec<(Level, String)> {
    let mut out = Vec::new();
    let doc = match nodes(admin).await {
        Ok(d) => d,
        Err(e) => return vec![(Level::Fail, e.to_string())],
    };
    out.push((Level::Ok, format!("the gateway's admin API at {admin} answers")));
    let version = doc["version"].as_u64().unwrap_or(0);
    let list = doc["nodes"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        out.push((Level::Fail, "no node has joined the control plane".into()));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let expiry = |what: String, at: f64, out: &mut Vec<(Level, String)>| {
        if at <= 0.0 {
            return;
        }
        let left = at - now;
        if left <= 0.0 {
            out.push((Level::Fail, format!("{what}: certificate expired")));
        } else if left < NEAR_EXPIRY {
            out.push((
                Level::Warn,
                format!(
                    "{what}: certificate expires in {}",
                    humantime::format_duration(Duration::from_secs(left as u64))
                ),
            ));
        }
    };
    match get(admin, "/metrics").await {
        Ok(m) => {
            expiry("gateway".into(), sample(&m, "quicmesh_certificate_expiry_timestamp_seconds", &[]), &mut out);
            let rejected = sample(&m, "quicmesh_config_reloads_total", &[("result", "rejected")]);
            if rejected > 0.0 {
                out.push((
                    Level::Warn,
                    format!("{rejected} config change(s) were refused since the gateway started (its log says why)"),
                ));
            }
        }
        Err(e) => out.push((Level::Fail, format!("gateway metrics: {e}"))),
    }
    let (mut connected, mut current) = (0, 0);
    for n in &list {
        let name = n["name"].as_str().unwrap_or("?");
        if n["connected"].as_bool() != Some(true) {
            out.push((Level::Fail, format!("node {name} is not connected to the control plane")));
            continue;
        }
        connected += 1;
        match n["acked_version"].as_u64() {
            Some(v) if v == version => current += 1,
            v => {
                let nack =
                    n["last_nack"].as_str().map(|r| format!(" (last nack: {})", printable(r))).unwrap_or_default();
                out.push((Level::Fail, format!("node {name} runs snapshot {} of {version}{nack}", v.unwrap_or(0))));
            }
        }
        let Some(addr) = n["admin"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()) else { continue };
        match get_reported(addr, "/metrics").await {
            Ok(m) => {
                expiry(
                    format!("node {name}"),
                    sample(&m, "quicmesh_certificate_expiry_timestamp_seconds", &[]),
                    &mut out,
                );
                for peer in labelled(&m, "quicmesh_peer_unreachable", "peer", 1.0) {
                    out.push((Level::Fail, format!("node {name} cannot reach peer {}", printable(&peer))));
                }
            }
            Err(e) => {
                // The token goes only to node admin APIs on loopback (the node picks the port).
                let hint = if addr.ip().is_loopback() { "" } else { " (no admin token is sent off this host)" };
                out.push((Level::Warn, format!("node {name}'s admin API at {addr} cannot be read: {e}{hint}")));
            }
        }
    }
    if connected < expected {
        out.push((
            Level::Fail,
            format!("{connected} of the {expected} expected node(s) connected to the control plane"),
        ));
    } else if connected > 0 {
        out.push((Level::Ok, format!("{connected} node(s) connected to the control plane")));
    }
    if current > 0 && current == connected {
        out.push((Level::Ok, format!("every connected node runs snapshot version {version}")));
    }
    out
}

/// Checks until every finding passes (with at least `expected` nodes connected) or `wait` is over; returns the report and whether it passed.
pub async fn check(admin: SocketAddr, wait: Duration, expected: usize) -> (String, bool) {
    // A wait too long for the clock is as good as for ever.
    let now = Instant::now();
    let deadline = now.checked_add(wait).unwrap_or(now + Duration::from_secs(1 << 40));
    loop {
        let found = findings(admin, expected).await;
        let passed = found.iter().all(|(l, _)| *l != Level::Fail);
        if passed || Instant::now() >= deadline {
            let mut text = String::new();
            for (level, what) in &found {
                let mark = match level {
                    Level::Ok => "ok  ",
                    Level::Warn => "warn",
                    Level::Fail => "FAIL",
                };
                text.push_str(&format!("{mark} {what}\n"));
            }
            text.push_str(if passed { "the mesh is healthy\n" } else { "the mesh has problems (FAIL above)\n" });
            return (text, passed);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sum of the samples of `name` with all of `labels`, in the Prometheus text format.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The values of label `key` on the samples of `name` equal to `value`.
fn labelled(text: &str, name: &str, key: &str, value: f64) -> Vec<String> {
    let pat = format!("{key}=\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(value))
        .filter_map(|l| l.split(&pat).nth(1).and_then(|r| r.split('"').next()).map(str::to_owned))
        .collect()
}
