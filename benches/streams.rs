//! 10 000 requests in flight at once through one QUIC connection between two nodes.
//!
//! The backend holds every response until all N requests of a round have arrived (a barrier),
//! so the figure is only reached if all N really are in flight together: the client sends N
//! requests over N/1000 HTTP/2 connections into node-a, node-a carries them to node-b on its one
//! QUIC connection (N concurrent streams), node-b passes them to the backend over h2c. The
//! baseline is the same client on the same 10 connections straight to the same backend.
//!
//! Reported per path, medians over rounds: time until all N responses are in, the most
//! requests the backend saw at once, errors, and for the mesh the memory the two nodes held per
//! stream in flight (peak RSS during any round minus RSS after the warm-up, over N), and how many QUIC
//! connections node-a opened (1 is the point).
//!
//! Run: `cargo bench --bench streams` (env: BENCH_STREAMS, default 10000; BENCH_ROUNDS,
//! default 3; BENCH_LIMIT, the nodes' `transport.max_concurrent_streams`, default N). JSON goes to `BENCH_JSON` (default `target/bench-streams.json`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// Streams per client connection: node-a's outbound allows 1024 per HTTP/2 connection.
const PER_CONN: usize = 1000;

/// What the backend saw in a round.
#[derive(Default)]
struct Barrier {
    /// Requests of this round that have arrived.
    arrived: AtomicUsize,
    /// Requests being held right now, and the most at once.
    held: AtomicUsize,
    max_held: AtomicUsize,
    /// A request waits until `arrived` reaches the round's target.
    target: AtomicUsize,
    release: tokio::sync::Notify,
}

impl Barrier {
    fn reset(&self, target: usize) {
        self.arrived.store(0, Ordering::SeqCst);
        self.max_held.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
    }

    async fn pass(&self) {
        let held = self.held.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_held.fetch_max(held, Ordering::SeqCst);
        let arrived = self.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        if arrived >= self.target.load(Ordering::SeqCst) {
            self.release.notify_waiters();
        } else {
            // Registered before checking again, so a release between the two is not missed.
            let notified = self.release.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.arrived.load(Ordering::SeqCst) < self.target.load(Ordering::SeqCst) {
                // A round that cannot fill (errors on the path) gives up after 30 s.
                let _ = tokio::time::timeout(Duration::from_secs(30), notified).await;
            }
        }
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP/1.1 + h2c backend behind the barrier.
async fn backend(barrier: Arc<Barrier>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let barrier = barrier.clone();
                    async move {
                        barrier.pass().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http2().max_concurrent_streams(100_000);
                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

struct Round {
    took: Duration,
    max_held: usize,
    errors: usize,
    /// Peak RSS growth of each watched process during the round, KiB.
    rss_growth_kib: Vec<u64>,
}

/// N requests at once over N / PER_CONN HTTP/2 connections to `target`; waits for every answer.
/// Memory growth is measured against `baseline` (RSS per watched process before the first round).
async fn round(target: SocketAddr, host: &str, n: usize, barrier: &Barrier, watch: &[u32], baseline: &[u64]) -> Round {
    barrier.reset(n);
    let conns = n.div_ceil(PER_CONN);
    let mut senders = Vec::new();
    for _ in 0..conns {
        let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }
    let before = baseline;
    let peak: Arc<Vec<AtomicU64>> = Arc::new(before.iter().map(|b| AtomicU64::new(*b)).collect());
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, watch) = (peak.clone(), sampling.clone(), watch.to_vec());
        // Sampled every 5 ms while the round runs: the peak, not the end state, is the cost.
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                for (p, pid) in peak.iter().zip(&watch) {
                    p.fetch_max(proc_status_kib(*pid, "VmRSS"), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut send = senders[i % conns].clone();
        let req = http::Request::get(format!("http://{host}/s{i}")).body(Empty::<Bytes>::new()).unwrap();
        tasks.push(tokio::spawn(async move {
            match send.send_request(req).await {
                Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                Err(_) => false,
            }
        }));
    }
    let mut errors = 0;
    for t in tasks {
        if !t.await.unwrap_or(false) {
            errors += 1;
        }
    }
    let took = start.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let _ = sampler.join();
    Round {
        took,
        max_held: barrier.max_held.load(Ordering::SeqCst),
        errors,
        rss_growth_kib: peak.iter().zip(before).map(|(p, b)| p.load(Ordering::SeqCst).saturating_sub(*b)).collect(),
    }
}

fn main() {
    bench_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let n = env_or("BENCH_STREAMS", 10_000usize);
        let rounds = env_or("BENCH_ROUNDS", 3);
        let barrier = Arc::new(Barrier::default());
        let back = backend(barrier.clone()).await;
        let pki = Pki::new();
        let state = pki.issue("node-a");
        pki.issue("node-b");
        let svc = format!(
            "[[services]]\nname = \"wide\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{back}\"\n"
        );
        // Exactly N streams allowed on the one connection (the limit is usable in full even
        // while QUIC holds back some credit; see `transport::advertised_streams`), and a request
        // timeout that outlasts the slowest round.
        let toml = |name: &str, peers: &[(&str, SocketAddr)]| {
            node_toml(name, &state, peers, &svc)
                .replace("[transport]\n", &format!("[transport]\nmax_concurrent_streams = {}\n", env_or("BENCH_LIMIT", n)))
                .replace("request = \"10s\"", "request = \"60s\"")
        };
        let b = NodeProc::start(pki.path(), "node-b", &toml("node-b", &[]));
        let a = NodeProc::start(pki.path(), "node-a", &toml("node-a", &[("node-b", b.addrs.inbound)]));
        let pids = [a.child.id(), b.child.id()];
        // Warm up both paths with a small round; memory growth counts from here, so a round
        // after the first does not hide what the first kept.
        round(back, "wide", 100, &barrier, &[], &[]).await;
        round(a.addrs.outbound, "wide", 100, &barrier, &[], &[]).await;
        let baseline: Vec<u64> = pids.iter().map(|p| proc_status_kib(*p, "VmRSS")).collect();
        let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        for r in 0..rounds {
            for (i, target) in [back, a.addrs.outbound].into_iter().enumerate() {
                let (watch, base): (&[u32], &[u64]) = if i == 1 { (&pids, &baseline) } else { (&[], &[]) };
                let res = round(target, "wide", n, &barrier, watch, base).await;
                eprintln!(
                    "round {r} {}: {:.2?}, {} held at once, {} errors, RSS growth {:?} KiB",
                    ["direct", "mesh"][i],
                    res.took,
                    res.max_held,
                    res.errors,
                    res.rss_growth_kib
                );
                results[i].push(res);
            }
        }
        let m = a.metrics().await;
        let opened = metric(&m, "quicmesh_quic_connections_opened_total", &[]);
        let median = |v: &mut Vec<Round>| {
            v.sort_by_key(|r| r.took);
            let mid = &v[v.len() / 2];
            (mid.took, v.iter().map(|r| r.max_held).min().unwrap_or(0), v.iter().map(|r| r.errors).sum::<usize>())
        };
        // Growth per node over its baseline: the largest of the mesh rounds.
        let growth: Vec<u64> = (0..2)
            .map(|k| {
                results[1].iter().map(|r| r.rss_growth_kib[k]).max().unwrap_or(0)
            })
            .collect();
        let (dt, dheld, derr) = median(&mut results[0]);
        let (mt, mheld, merr) = median(&mut results[1]);
        let conns = n.div_ceil(PER_CONN);
        println!("\n{n} requests at once over {conns} HTTP/2 connections, backend answers when all have arrived; {rounds} alternating rounds, medians");
        println!("| path | all answered in | fewest held at once | errors (all rounds) | vs direct |");
        println!("|---|---|---|---|---|");
        println!("| direct client->backend (h2c) | {dt:.2?} | {dheld} | {derr} | 1.00 |");
        println!(
            "| client->node-a->one QUIC connection->node-b->backend | {mt:.2?} | {mheld} | {merr} | {:.2} |",
            mt.as_secs_f64() / dt.as_secs_f64()
        );
        let per_stream: Vec<f64> = growth.iter().map(|g| *g as f64 * 1024.0 / n as f64).collect();
        println!(
            "peak RSS growth with {n} in flight: node-a {:.1} MB ({:.0} bytes per stream), node-b {:.1} MB ({:.0} bytes per stream); QUIC connections node-a opened: {opened}",
            growth[0] as f64 / 1024.0,
            per_stream[0],
            growth[1] as f64 / 1024.0,
            per_stream[1]
        );
        let report = serde_json::json!({
            "bench": "streams", "streams": n, "client_connections": n.div_ceil(PER_CONN), "rounds": rounds,
            "direct": { "median_ms": dt.as_secs_f64() * 1e3, "min_held": dheld, "errors": derr },
            "mesh": { "median_ms": mt.as_secs_f64() * 1e3, "min_held": mheld, "errors": merr,
                      "rss_growth_kib": { "node-a": growth[0], "node-b": growth[1] },
                      "bytes_per_stream": { "node-a": per_stream[0], "node-b": per_stream[1] }, "quic_connections_opened": opened },
        });
        let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-streams.json".into());
        if std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()).is_ok() {
            println!("JSON: {path}");
        }
    });
}
