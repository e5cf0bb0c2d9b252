//! Load benchmark of the mesh hop: direct client->backend against
//! client->node-a->QUIC->node-b->backend, same client, same backend, same run, alternating
//! rounds. HTTP/1.1 keep-alive, 32 connections, closed loop. Nodes run as processes of the
//! release binary. Prints req/s and p50/p99 per path and the mesh/direct ratios.
//!
//! Run: `cargo bench --bench load` (env: BENCH_SECS per round, default 4;
//! BENCH_ROUNDS, default 3; BENCH_CONNS, default 32).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

/// Closed loop: `conns` keep-alive HTTP/1.1 connections, each sending GETs back to back.
async fn load(target: SocketAddr, host: &'static str, conns: usize, secs: u64) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let req = http::Request::get("/").header("host", host).body(Empty::<Bytes>::new()).unwrap();
                let t0 = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        lat.push(t0.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut stats = Stats::default();
    for t in tasks {
        let (lat, errors) = t.await.unwrap();
        stats.latencies.extend(lat);
        stats.errors += errors;
    }
    stats.elapsed = start.elapsed();
    stats
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let secs = env_or("BENCH_SECS", 4);
        let rounds = env_or("BENCH_ROUNDS", 3);
        let conns = env_or("BENCH_CONNS", 32) as usize;
        let pki = Pki::new();
        let state = pki.issue("node-a");
        pki.issue("node-b");
        let backend = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            tokio::spawn(quicmesh::samples::hello(l, "v1".into(), "node-b".into()));
            a
        };
        let svc = format!(
            "[[services]]\nname = \"hello\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{backend}\"\n"
        );
        let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
        let a =
            NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
        // Warm up both paths (connections, pools, caches).
        load(backend, "hello", conns, 1).await;
        load(a.addrs.outbound, "hello", conns, 1).await;
        let mut direct = Stats::default();
        let mut mesh = Stats::default();
        for round in 0..rounds {
            for (name, target, acc) in [("direct", backend, &mut direct), ("mesh", a.addrs.outbound, &mut mesh)] {
                let s = load(target, "hello", conns, secs).await;
                eprintln!("round {round} {name:6}: {:>9.0} req/s, {} errors", s.rps(), s.errors);
                acc.latencies.extend(s.latencies);
                acc.errors += s.errors;
                acc.elapsed += s.elapsed;
            }
        }
        let (d_rps, m_rps) = (direct.rps(), mesh.rps());
        let (d50, d99, m50, m99) = (direct.pct(0.5), direct.pct(0.99), mesh.pct(0.5), mesh.pct(0.99));
        println!("\nHTTP/1.1 keep-alive, {conns} connections, {rounds} alternating rounds of {secs}s");
        println!("| path | req/s | p50 | p99 | errors |");
        println!("|---|---|---|---|---|");
        println!("| direct client->backend | {d_rps:.0} | {d50:.2?} | {d99:.2?} | {} |", direct.errors);
        println!("| client->node->QUIC->node->backend | {m_rps:.0} | {m50:.2?} | {m99:.2?} | {} |", mesh.errors);
        println!(
            "| ratio mesh/direct | {:.3} | {:.2} | {:.2} | |",
            m_rps / d_rps,
            m50.as_secs_f64() / d50.as_secs_f64(),
            m99.as_secs_f64() / d99.as_secs_f64()
        );
        println!("node peak RSS: node-a {} KiB, node-b {} KiB", a.peak_rss_kib(), b.peak_rss_kib());
    });
}
