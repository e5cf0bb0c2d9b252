//! Load benchmark: direct client->backend against client->node-a->QUIC->node-b->backend and
//! gateway ingress (HTTP/1.1+TLS, HTTP/2, HTTP/3) -> QUIC -> node-b -> backend, with the same
//! client, the same backend, in the same run, alternating rounds, closed loop. Nodes and gateway
//! run as processes of the release binary. Prints req/s and p50/p99 per path and ratios to direct.
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

type Worker = tokio::task::JoinHandle<(Vec<Duration>, u64)>;

/// Merges the workers' latencies and error counts.
async fn gather(tasks: Vec<Worker>, start: Instant) -> Stats {
    let mut stats = Stats::default();
    for t in tasks {
        let (lat, errors) = t.await.unwrap();
        stats.latencies.extend(lat);
        stats.errors += errors;
    }
    stats.elapsed = start.elapsed();
    stats
}

#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// HTTP/1.1 over TLS, one connection per worker.
    H1Tls,
    /// HTTP/2 over TLS, all workers multiplexed on one connection.
    H2Tls,
    /// HTTP/3, all workers multiplexed on one QUIC connection.
    H3,
}

/// Closed loop over TLS or QUIC to the gateway: `workers` requests in flight.
async fn load_edge(kind: Client, port: u16, workers: usize, secs: u64) -> Stats {
    use std::sync::Arc;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tls = |alpn: &[u8]| {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[alpn])));
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
        }
    };
    let mut h2 = None;
    let mut h3 = None;
    match kind {
        Client::H2Tls => {
            let io = hyper_util::rt::TokioIo::new(tls(b"h2").await);
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            h2 = Some(send);
        }
        Client::H3 => h3 = Some(h3_connect(port).await),
        _ => {}
    }
    let url = format!("https://localhost:{port}/hello");
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let url = url.clone();
        let mut h1 = if kind == Client::H1Tls {
            let io = hyper_util::rt::TokioIo::new(tls(b"http/1.1").await);
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Some(send)
        } else {
            None
        };
        let mut h2 = h2.clone();
        let mut h3 = h3.as_ref().map(|(_, s)| s.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = if let Some(s) = h1.as_mut() {
                    let _ = s.ready().await;
                    let req =
                        http::Request::get("/hello").header("host", "localhost").body(Empty::<Bytes>::new()).unwrap();
                    match s.send_request(req).await {
                        Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    }
                } else if let Some(s) = h2.as_mut() {
                    let req = http::Request::get(url.as_str()).body(Empty::<Bytes>::new()).unwrap();
                    match s.send_request(req).await {
                        Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    }
                } else if let Some(s) = h3.as_mut() {
                    h3_request(s, http::Request::get(url.as_str()).body(()).unwrap(), b"").await.0 == 200
                } else {
                    false
                };
                if ok {
                    lat.push(t0.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    gather(tasks, start).await
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
                if send.ready().await.is_err() {
                    errors += 1;
                    break;
                }
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
    gather(tasks, start).await
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
        pki.issue("gateway");
        let gw_toml = format!(
            "[mesh]\ntrust_domain = \"{TD}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\
             [gateway.limits]\nmax_concurrent_streams = 1024\n[gateway.tls]\nstate_dir = \"{}\"\n\
             [[gateway.routes]]\nname = \"hello\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"hello\" }}]\n\
             [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n{svc}",
            state.display(),
            b.addrs.inbound
        );
        let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
        let gw_port = gw.addrs.listen.port();
        // Warm up every path (connections, pools, caches).
        load(backend, "hello", conns, 1).await;
        load(a.addrs.outbound, "hello", conns, 1).await;
        for kind in [Client::H1Tls, Client::H2Tls, Client::H3] {
            load_edge(kind, gw_port, conns, 1).await;
        }
        let names = ["direct client->backend", "client->node->QUIC->node->backend", "gateway HTTP/1.1+TLS -> node", "gateway HTTP/2 -> node", "gateway HTTP/3 -> node"];
        let mut acc: Vec<Stats> = (0..names.len()).map(|_| Stats::default()).collect();
        for round in 0..rounds {
            for (i, name) in names.iter().enumerate() {
                let s = match i {
                    0 => load(backend, "hello", conns, secs).await,
                    1 => load(a.addrs.outbound, "hello", conns, secs).await,
                    2 => load_edge(Client::H1Tls, gw_port, conns, secs).await,
                    3 => load_edge(Client::H2Tls, gw_port, conns, secs).await,
                    _ => load_edge(Client::H3, gw_port, conns, secs).await,
                };
                eprintln!("round {round} {name:36}: {:>9.0} req/s, {} errors", s.rps(), s.errors);
                acc[i].latencies.extend(s.latencies);
                acc[i].errors += s.errors;
                acc[i].elapsed += s.elapsed;
            }
        }
        let (base_rps, base50, base99) = {
            let d = &mut acc[0];
            (d.rps(), d.pct(0.5), d.pct(0.99))
        };
        println!("\n{conns} requests in flight (HTTP/1.1: {conns} keep-alive connections; HTTP/2 and HTTP/3: one connection), {rounds} alternating rounds of {secs}s");
        println!("| path | req/s | p50 | p99 | errors | req/s vs direct | p50 vs direct | p99 vs direct |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, st) in names.iter().zip(acc.iter_mut()) {
            let (rps, p50, p99) = (st.rps(), st.pct(0.5), st.pct(0.99));
            println!(
                "| {name} | {rps:.0} | {p50:.2?} | {p99:.2?} | {} | {:.3} | {:.2} | {:.2} |",
                st.errors,
                rps / base_rps,
                p50.as_secs_f64() / base50.as_secs_f64(),
                p99.as_secs_f64() / base99.as_secs_f64()
            );
        }
        println!("peak RSS: node-a {} KiB, node-b {} KiB, gateway {} KiB", a.peak_rss_kib(), b.peak_rss_kib(), gw.peak_rss_kib());
    });
}
