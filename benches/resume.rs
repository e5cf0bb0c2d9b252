//! The first request after a node restarts (#30): with `transport.zero_rtt` (the default) the
//! caller's node resumes its TLS session with the restarted node and sends the request in the
//! handshake's first packet; without it, a full handshake (certificates sent and verified both
//! ways) comes first. Two node pairs on loopback, one of each, in alternating rounds: node-b is
//! stopped (SIGTERM), node-a's connection to it is seen gone, node-b starts again, and a GET
//! through node-a is timed from the client, then a second one on the connection it opened.
//!
//! Loopback has no round trip to speak of (tc netem is not available here), so the difference
//! is the handshake's own work: on a real network each request also saves one round trip.
//!
//! Run: `cargo bench --bench resume` (env: BENCH_ROUNDS, default 15). JSON goes to `BENCH_JSON`
//! (default `target/bench-resume.json`). `BENCH_ZERO_RTT` sets the two pairs' `zero_rtt`
//! (default `true,false`; `false,true` swaps their order, `false,false` checks the bench itself
//! for a bias between the pairs); `BENCH_KEEP_LOGS=1` keeps the nodes' logs and prints where.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::*;

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

struct Pair {
    zero_rtt: bool,
    a: NodeProc,
    b: NodeProc,
    client: Client,
    _pki: Pki,
}

impl Pair {
    fn start(zero_rtt: bool, echo: SocketAddr) -> Pair {
        let pki = Pki::new();
        let state = pki.issue("node-a");
        pki.issue("node-b");
        let svc =
            format!("[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n");
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let setting = |t: String| t.replace("[transport]\n", &format!("[transport]\nzero_rtt = {zero_rtt}\n"));
        let b_toml = setting(node_toml("node-b", &state, &[], &svc))
            .replace("inbound = \"127.0.0.1:0\"", &format!("inbound = \"127.0.0.1:{port}\""));
        let b = NodeProc::start(pki.path(), "node-b", &b_toml);
        let a_toml = setting(node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
        let a = NodeProc::start(pki.path(), "node-a", &a_toml);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Pair { zero_rtt, a, b, client, _pki: pki }
    }

    async fn get(&self) -> Duration {
        let req = http::Request::get(format!("http://{}/first", self.a.addrs.outbound))
            .header("host", "echo")
            .body(Empty::new())
            .unwrap();
        let started = Instant::now();
        let resp = self.client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        started.elapsed()
    }

    /// Restarts node-b and times the first request to it and the one after.
    async fn round(&mut self) -> (Duration, Duration) {
        self.get().await;
        self.b.terminate();
        let a_admin = self.a.addrs.admin;
        eventually(Duration::from_secs(10), "node-a's connection to node-b to go", || async move {
            let m = http_get(&format!("http://{a_admin}/metrics")).await.1;
            (metric(&m, "quicmesh_quic_connections_active", &[("direction", "outbound")]) == 0.0).then_some(())
        })
        .await;
        self.b.restart();
        (self.get().await, self.get().await)
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let echo = echo_backend().await;
        let modes: Vec<bool> = std::env::var("BENCH_ZERO_RTT")
            .unwrap_or("true,false".into())
            .split(',')
            .map(|m| m.trim() == "true")
            .collect();
        let mut pairs = [Pair::start(modes[0], echo), Pair::start(modes[1], echo)];
        let mut first = [Vec::new(), Vec::new()];
        let mut warm = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, pair) in pairs.iter_mut().enumerate() {
                let (f, w) = pair.round().await;
                first[i].push(f);
                warm[i].push(w);
            }
        }
        let early = metric(
            &pairs[0].a.metrics().await,
            "quicmesh_quic_zero_rtt_total",
            &[("direction", "outbound"), ("result", "accepted")],
        );
        if pairs[0].zero_rtt {
            assert_eq!(early as usize, rounds, "every round of the 0-RTT pair resumed in 0-RTT");
        }
        let mut rows = Vec::new();
        println!("first request after node-b restarted, {rounds} rounds, medians (us):");
        println!("{:<26} {:>12} {:>12} {:>10}", "", "first", "next", "added");
        for (i, pair) in pairs.iter().enumerate() {
            let (f, w) = (median(&mut first[i]), median(&mut warm[i]));
            let name = if pair.zero_rtt { "0-RTT (zero_rtt = true)" } else { "full handshake" };
            println!("{name:<26} {:>12.0} {:>12.0} {:>10.0}", us(f), us(w), us(f) - us(w));
            rows.push(serde_json::json!({ "zero_rtt": pair.zero_rtt, "first_us": us(f), "next_us": us(w) }));
        }
        let ratio = us(median(&mut first[0].clone())) / us(median(&mut first[1].clone()));
        println!("first request, 0-RTT / full handshake: {ratio:.2}x");
        let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-resume.json".into());
        let doc = serde_json::json!({ "rounds": rounds, "rows": rows, "first_ratio": ratio });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("JSON: {path}");
        if std::env::var_os("BENCH_KEEP_LOGS").is_some() {
            for pair in &mut pairs {
                let dir = std::mem::replace(&mut pair._pki.dir, tempfile::tempdir().unwrap());
                println!("logs kept in {}", dir.keep().display());
            }
        }
    });
}
