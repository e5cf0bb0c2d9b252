//! The dashboard on the gateway's admin listener (`/dashboard`): the service graph, the nodes and
//! a live tap, as `linkerd viz dashboard` shows a Linkerd mesh. The page and its script are
//! embedded in the binary and hold no data; everything they show comes from token-protected
//! JSON and stream endpoints of the same listener:
//!
//! - `/dashboard/graph`: services, caller → service edges with rate, success and p99 over the
//!   last minute, endpoints, routes, policies and recent errors, and the nodes with their QUIC
//!   peers. Built from the metrics of the gateway and of every node that reported an admin
//!   address (scraped when asked, at most every 2 s, and kept for a minute).
//! - `/tap`: the requests of the gateway and of every connected node as they complete
//!   (server-sent events), filtered and bounded in rate.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicmesh_shared::message::body::Body;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::telemetry::scrape::{self, Sample};
use quicmesh_shared::telemetry::tap::{self, Feed, SseItem};
use serde_json::{json, Value};

use crate::control::ControlPlane;

/// The page, its script and its style: (path, content type, content).
pub const PAGES: [(&str, &str, &str); 3] = [
    ("/dashboard", "text/html; charset=utf-8", include_str!("../assets/dashboard.html")),
    ("/dashboard/app.js", "text/javascript; charset=utf-8", include_str!("../assets/dashboard.js")),
    ("/dashboard/style.css", "text/css; charset=utf-8", include_str!("../assets/dashboard.css")),
];

/// Rates and percentiles are over this much of the past.
const WINDOW: Duration = Duration::from_secs(60);
/// A scrape younger than this answers the next request too.
const FRESH: Duration = Duration::from_secs(2);
/// How long a node's `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a tap looks for nodes it does not follow yet.
const TAP_RESCAN: Duration = Duration::from_secs(5);
/// The most of one node's `/metrics` read per scrape (a node with thousands of services
/// renders a few MB).
const MAX_METRICS_BYTES: usize = 16 << 20;

/// What one scrape saw.
struct Snap {
    at: Instant,
    sample: Sample,
    /// Each component's metrics text (the gateway's under its name), for its gauges: kept by
    /// the newest scrape only (up to 16 MiB a node), emptied once a newer one is taken.
    texts: std::sync::Mutex<Arc<BTreeMap<String, String>>>,
}

pub struct Dashboard {
    cp: Arc<ControlPlane>,
    mesh: Arc<Mesh>,
    name: String,
    /// The bearer token for the nodes' admin APIs (the gateway's own, as a fleet shares one).
    token: Option<String>,
    history: tokio::sync::Mutex<VecDeque<Arc<Snap>>>,
}

impl Dashboard {
    pub fn new(cp: Arc<ControlPlane>, mesh: Arc<Mesh>, name: &str, token: Option<String>) -> Arc<Self> {
        Arc::new(Self { cp, mesh, name: name.to_string(), token, history: Default::default() })
    }

    /// The token to send to a node's admin API: the gateway's own, only to one on this host
    /// (a node elsewhere never learns it); none otherwise.
    fn token_for(&self, addr: SocketAddr) -> Option<&str> {
        self.token.as_deref().filter(|_| addr.ip().is_loopback())
    }

    /// The nodes' admin addresses, as they reported them (connected nodes only).
    fn node_admins(&self) -> Vec<(String, SocketAddr)> {
        self.cp
            .status()
            .nodes
            .into_iter()
            .filter(|n| n.connected)
            .filter_map(|n| Some((n.name, n.admin?.parse().ok()?)))
            .collect()
    }

    async fn scrape(&self) -> Snap {
        let mut texts = BTreeMap::new();
        if let Some(h) = m::recorder() {
            if let Ok(text) = tokio::task::spawn_blocking(move || h.render()).await {
                texts.insert(self.name.clone(), text);
            }
        }
        let reads = self.node_admins().into_iter().map(|(name, addr)| async move {
            let token = self.token_for(addr);
            let resp = quicmesh_shared::admin::client_get(addr, "/metrics", token, SCRAPE_TIMEOUT).await.ok()?;
            let body = http_body_util::Limited::new(resp.into_body(), MAX_METRICS_BYTES);
            let body = tokio::time::timeout(SCRAPE_TIMEOUT, http_body_util::BodyExt::collect(body)).await.ok()?.ok()?;
            Some((name, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
        });
        // A node that cannot be read (gone, its admin API on its own loopback) is left out.
        texts.extend(futures_util::future::join_all(reads).await.into_iter().flatten());
        let mut sample = Sample::new(scrape::By::Service);
        for (name, text) in &texts {
            sample.add(text, name);
        }
        Snap { at: Instant::now(), sample, texts: std::sync::Mutex::new(Arc::new(texts)) }
    }

    /// The oldest scrape within the window, a fresh one, and the fresh one's metrics texts.
    async fn window(&self) -> (Arc<Snap>, Arc<Snap>, Arc<BTreeMap<String, String>>) {
        let mut history = self.history.lock().await;
        if history.back().is_none_or(|s| s.at.elapsed() >= FRESH) {
            let snap = Arc::new(self.scrape().await);
            // Only the newest scrape's texts are ever read again.
            if let Some(prev) = history.back() {
                *prev.texts.lock().unwrap_or_else(|p| p.into_inner()) = Arc::default();
            }
            history.push_back(snap);
        }
        // Past the window (the page was closed a while): start again from the newest.
        while history.len() > 1 && history.front().is_some_and(|s| s.at.elapsed() > WINDOW + FRESH) {
            history.pop_front();
        }
        let (Some(first), Some(last)) = (history.front(), history.back()) else { unreachable!("one was pushed") };
        let texts = last.texts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (first.clone(), last.clone(), texts)
    }

    /// `/dashboard/graph`.
    pub async fn graph(&self) -> String {
        let (first, last, texts) = self.window().await;
        let secs = last.at.duration_since(first.at).as_secs_f64();
        let rows = if secs > 0.0 { scrape::rows(&first.sample, &last.sample, secs) } else { Vec::new() };
        let errors = scrape::errors(&first.sample, &last.sample);
        let table = self.mesh.table();
        let config = table.effective_config();
        let dump: Value = serde_json::from_str(&self.mesh.dump()).unwrap_or_default();

        let mut names: BTreeMap<String, Value> = BTreeMap::new();
        for svc in dump["services"].as_array().into_iter().flatten() {
            let Some(name) = svc["name"].as_str() else { continue };
            let endpoints: Vec<Value> = svc["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|ep| {
                    json!({
                        "node": ep["node"], "address": ep["address"], "labels": ep["labels"],
                        "healthy": ep["healthy"], "in_flight": ep["in_flight"], "ejected": ep["ejected"],
                        "revoked": ep["revoked"],
                    })
                })
                .collect();
            let usable = endpoints
                .iter()
                .filter(|e| e["ejected"] != true && e["revoked"] != true && e["healthy"] != false)
                .count();
            let health = match (endpoints.len(), usable) {
                (0, _) | (_, 0) => "down",
                (n, u) if u < n => "degraded",
                _ => "healthy",
            };
            names.insert(name.to_string(), json!({ "name": name, "health": health, "endpoints": endpoints }));
        }
        // Callers that are not services of the mesh (the gateway, unknown clients) are drawn too.
        for r in &rows {
            for n in [&r.source, &r.service] {
                names.entry(n.clone()).or_insert_with(|| json!({ "name": n, "health": "unknown", "endpoints": [] }));
            }
        }
        let mesh_routes: Vec<Value> = config.routes.iter().filter_map(|r| serde_json::to_value(r).ok()).collect();
        let edge_routes: Vec<Value> = config
            .gateway
            .as_ref()
            .map(|g| g.routes.iter().filter_map(|r| serde_json::to_value(r).ok()).collect())
            .unwrap_or_default();
        for (name, svc) in names.iter_mut() {
            let mut routes = Vec::new();
            for (at, list) in [("mesh", &mesh_routes), ("edge", &edge_routes)] {
                for r in list.iter().filter(|r| names_backend(r, name)) {
                    routes.push(json!({
                        "at": at, "name": r["name"], "hostnames": r["hostnames"],
                        "rules": r["rules"].as_array().map_or(0, Vec::len),
                    }));
                }
            }
            svc["routes"] = routes.into();
            let policies: Vec<Value> = config
                .authorization
                .policies
                .iter()
                .filter(|p| p.service == *name)
                .filter_map(|p| serde_json::to_value(p).ok())
                .collect();
            svc["policies"] = policies.into();
            let errs: Vec<Value> = errors
                .iter()
                .filter(|(s, _, _)| s == name)
                .map(|(_, reason, n)| json!({ "reason": reason, "count": n }))
                .collect();
            svc["errors"] = errs.into();
        }
        let edges: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "source": r.source, "target": r.service, "rps": round(r.rps, 2),
                    "success": round(r.success, 4), "p99_ms": r.p99.map(|s| round(s * 1000.0, 2)),
                    "p50_ms": r.p50.map(|s| round(s * 1000.0, 2)),
                })
            })
            .collect();
        let status = self.cp.status();
        let mut nodes: Vec<Value> = status
            .nodes
            .iter()
            .map(|n| {
                let text = texts.get(&n.name).map(String::as_str).unwrap_or("");
                json!({
                    "name": n.name, "connected": n.connected, "address": n.address,
                    "instances": n.instances, "unhealthy": n.unhealthy,
                    "acked_version": n.acked_version, "current": n.acked_version == status.version,
                    "last_nack": n.last_nack, "admin": n.admin,
                    "cert_expires": gauge(text, m::CERT_EXPIRY),
                    "peers": peers(text), "scraped": texts.contains_key(&n.name),
                })
            })
            .collect();
        let own = texts.get(&self.name).map(String::as_str).unwrap_or("");
        nodes.insert(
            0,
            json!({
                "name": self.name, "gateway": true, "connected": true, "current": true,
                "acked_version": status.version, "peers": peers(own), "scraped": true,
            }),
        );
        let doc = json!({
            "version": status.version,
            "window_s": round(secs, 1),
            "services": names.into_values().collect::<Vec<_>>(),
            "edges": edges,
            "nodes": nodes,
        });
        doc.to_string()
    }

    /// `/tap`: this gateway's requests and those of every connected node, as they complete.
    pub fn tap(self: &Arc<Self>, params: &[(String, String)]) -> Result<Body, String> {
        let filter = tap::Filter::from_query(params)?;
        let me = self.clone();
        let local = filter.local;
        Ok(tap::sse(filter, |feed, tasks| {
            tasks.spawn(tap::feed_from(me.mesh.tap().clone(), feed.clone()));
            if !local {
                tasks.spawn(me.follow_nodes(feed.clone()));
            }
        }))
    }

    /// Follows every connected node's `/tap` into `feed`, picking up nodes as they connect,
    /// until the watcher leaves (the task is dropped with the stream, and its own with it).
    async fn follow_nodes(self: Arc<Self>, feed: Feed) {
        let mut following: HashSet<SocketAddr> = HashSet::new();
        let mut tasks: tokio::task::JoinSet<SocketAddr> = tokio::task::JoinSet::new();
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Ok(addr) = done {
                    following.remove(&addr);
                }
            }
            for (_, addr) in self.node_admins() {
                if following.insert(addr) {
                    tasks.spawn(follow(addr, self.token_for(addr).map(str::to_string), feed.clone()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TAP_RESCAN) => {}
                done = tasks.join_next(), if !tasks.is_empty() => {
                    if let Some(Ok(addr)) = done {
                        following.remove(&addr);
                    }
                }
            }
            if feed.closed() {
                return;
            }
        }
    }
}

/// Streams one node's `/tap` into `feed` until either ends; gives back the address.
async fn follow(addr: SocketAddr, token: Option<String>, feed: Feed) -> SocketAddr {
    // `local`: a node that is really a gateway (or this one) does not follow further.
    let path = format!("/tap?{}&local=1", feed.filter().to_query());
    // A node is asked again no sooner than a rescan later, however its stream ended.
    let again = tokio::time::Instant::now() + TAP_RESCAN;
    let Ok(resp) = quicmesh_shared::admin::client_get(addr, &path, token.as_deref(), SCRAPE_TIMEOUT).await else {
        tokio::time::sleep_until(again).await;
        return addr;
    };
    let mut told = 0;
    let _ = tap::read_sse(resp.into_body(), |item| {
        match item {
            SseItem::Event(e) => feed.offer(Arc::new(*e)),
            SseItem::Missed(n) => {
                feed.missed(n.saturating_sub(told));
                told = told.max(n);
            }
        }
        !feed.closed()
    })
    .await;
    if !feed.closed() {
        tokio::time::sleep_until(again).await;
    }
    addr
}

/// Does a route (as JSON) send anything to `service`?
fn names_backend(route: &Value, service: &str) -> bool {
    match route {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (matches!(k.as_str(), "backend_refs" | "backendRefs")
                && v.as_array().is_some_and(|refs| refs.iter().any(|r| r["name"].as_str() == Some(service))))
                || names_backend(v, service)
        }),
        Value::Array(items) => items.iter().any(|v| names_backend(v, service)),
        _ => false,
    }
}

fn round(v: f64, places: i32) -> f64 {
    let k = 10f64.powi(places);
    (v * k).round() / k
}

/// The value of an unlabelled gauge in a metrics text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().filter_map(scrape::parse_line).find(|(n, _, _)| *n == name).map(|(_, _, v)| v)
}

/// A component's QUIC peers from its metrics: RTT, congestion window, sent and lost packets.
fn peers(text: &str) -> Vec<Value> {
    let mut by_peer: BTreeMap<(String, String), [f64; 4]> = BTreeMap::new();
    for (name, labels, v) in text.lines().filter_map(scrape::parse_line) {
        let slot = match name {
            m::QUIC_RTT => 0,
            m::QUIC_CWND => 1,
            m::QUIC_SENT_PACKETS => 2,
            m::QUIC_LOST_PACKETS => 3,
            _ => continue,
        };
        let key = (scrape::label(&labels, "peer").to_string(), scrape::label(&labels, "direction").to_string());
        by_peer.entry(key).or_default()[slot] = v;
    }
    by_peer
        .into_iter()
        .map(|((peer, direction), [rtt, cwnd, sent, lost])| {
            json!({
                "peer": peer, "direction": direction, "rtt_ms": round(rtt * 1000.0, 3), "cwnd": cwnd,
                "sent_packets": sent, "lost_packets": lost,
                "loss": if sent > 0.0 { round(lost / sent, 5) } else { 0.0 },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_found_by_their_backends_at_any_depth() {
        let route = json!({"name": "r", "rules": [{"backend_refs": [{"name": "api"}, {"name": "web"}]}]});
        assert!(names_backend(&route, "api"));
        assert!(names_backend(&route, "web"));
        assert!(!names_backend(&route, "db"));
    }

    #[test]
    fn peers_come_from_the_quic_gauges() {
        let text = "quicmesh_quic_rtt_seconds{direction=\"outbound\",peer=\"node-b\"} 0.0012\n\
                    quicmesh_quic_congestion_window_bytes{direction=\"outbound\",peer=\"node-b\"} 14720\n\
                    quicmesh_quic_sent_packets_total{direction=\"outbound\",peer=\"node-b\"} 1000\n\
                    quicmesh_quic_lost_packets_total{direction=\"outbound\",peer=\"node-b\"} 10\n\
                    quicmesh_certificate_expiry_timestamp_seconds 1900000000\n";
        let p = peers(text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0]["peer"], "node-b");
        assert_eq!(p[0]["rtt_ms"], 1.2);
        assert_eq!(p[0]["loss"], 0.01);
        assert_eq!(gauge(text, m::CERT_EXPIRY), Some(1.9e9));
    }
}
