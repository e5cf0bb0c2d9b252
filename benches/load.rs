//! Load benchmark: direct client->backend against client->node-a->QUIC->node-b->backend and
//! gateway ingress (HTTP/1.1+TLS, HTTP/2, HTTP/3) -> QUIC -> node-b -> backend, with the same
//! client, the same backend, in the same run, alternating rounds. Nodes and gateway run as
//! processes of the release binary.
//!
//! - Closed loop (saturation): req/s, p50/p99 and ratios to direct, and the CPU time the proxy
//!   processes spent per request (from /proc: utime + stime of the processes on the path).
//! - Open loop at fixed rates (1000 and 5000 req/s by default): requests leave on a schedule and
//!   latency is measured from the scheduled time, so a stall counts against every request it
//!   delayed (no coordinated omission). Requests share `BENCH_OPEN_CONNS` keep-alive connections
//!   opened beforehand and wait for a free one, as wrk2's do. p50/p90/p99/p99.9 of direct, one node, the mesh hop, the
//!   bare hop (the hop's libraries without the nodes' work: `peers/bare.rs`; over h3, and over
//!   raw streams with the mesh's headers, the framing closest to the nodes' lean one) and the peer pairs,
//!   and the latency each adds at each percentile.
//! - A cross-check with a load generator nobody here wrote: Debian's `wrk` (closed loop, one
//!   thread, the same connection count, `--latency` for its percentiles) against the plain-HTTP
//!   paths (direct, the node pair, the peer pairs) and the HTTP/1.1+TLS edges (the gateways
//!   and nginx's, requests per CPU-second of the edge process) in the same rounds, when installed
//!   (`BENCH_WRK=0` turns it off). CPU per request of the node pair against each peer pair is
//!   the median of the rounds' own ratios, for both clients.
//! - Peer pairs run `peers::workers()` workers per proxy: one, as a node, unless
//!   `BENCH_PEER_WORKERS` says otherwise.
//! - `BIN_BASELINE=PATH` (relative to the repository's root, as `BIN_UNDER_TEST`): a second node
//!   pair (node-e, node-f) from another build of the binary, run in the closed loop's rounds
//!   right after the node pair from the build under test (`BIN_UNDER_TEST`, else cargo's).
//!   Reported as the medians of the rounds' own ratios of CPU per request (suite client and
//!   wrk) and of req/s under wrk. Two builds compared this way, a few seconds apart, see the
//!   same machine; two runs minutes apart do not. `BIN_BASELINE` naming the build under test
//!   itself shows the comparison's own spread. The open loop leaves it out.
//! - Everything also goes to a JSON file (`BENCH_JSON`, default `target/bench-load.json`).
//!
//! Run: `cargo bench --bench load`. Environment:
//! - closed loop: BENCH_SECS per round (4), BENCH_ROUNDS (3), BENCH_CONNS (32);
//!   BENCH_PATHS="HTTP/3,Caddy" runs only direct and the paths whose names contain these;
//! - open loop: BENCH_RATES (`1000,5000`), BENCH_OPEN_ROUNDS (12) of BENCH_OPEN_SECS (1),
//!   BENCH_OPEN_CONNS (64); BENCH_OPEN_PATHS="mesh,bare" likewise; BENCH_ONLY=open runs it alone.
//!   Besides the pooled percentiles, each path's p99 over direct's as the median over rounds of
//!   that round's difference, which a single hold-up of the machine moves less;
//! - BENCH_GATEWAY_WORKERS sets `gateway.workers` (0: a thread per core). Ingress also runs
//!   through a second gateway with `gateway.workers = 1`.
//! - Edge peers, each with as many threads as the gateway row it is compared with: Caddy for
//!   HTTP/3 (`GOMAXPROCS` as the default gateway's threads, and 1 against the one-thread
//!   gateway; it proxies to the backend in plain HTTP, as in earlier rounds), nginx terminating TLS 1.3 for HTTP/1.1 and HTTP/2 (a worker process per gateway
//!   thread, and one) and proxying over TLS 1.3 to a second nginx in front of the backend, as
//!   the gateway goes on over mutual-TLS QUIC to node-b. Compared per CPU-second of the edge
//!   process alone (nginx: its master and workers).
//! - The bare edge (`peers/bare.rs`, front half over TLS): the one-thread gateway's HTTP/1.1+TLS
//!   row made of its libraries alone (rustls, hyper, h3 over quinn), the floor under that row,
//!   against the one-worker nginx edge.

#[path = "../tests/support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "peers/mod.rs"]
mod peers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One HTTP/1.1 keep-alive connection to `target`, its driver spawned.
async fn connect_h1(target: SocketAddr) -> Option<Sender> {
    let tcp = tokio::net::TcpStream::connect(target).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// One GET / on `send`; true when it answered 200 and its body was read.
async fn get(send: &mut Sender, host: &'static str) -> bool {
    let req = http::Request::get("/").header("host", host).body(Empty::<Bytes>::new()).unwrap();
    if send.ready().await.is_err() {
        return false;
    }
    match send.send_request(req).await {
        Ok(r) if r.status() == 200 => r.into_body().collect().await.is_ok(),
        _ => false,
    }
}

/// Open loop: `rate` requests per second for `secs` over exactly `conns` keep-alive
/// connections, opened (and each used once) before the schedule starts. A request waits until
/// it holds a free connection, and its latency runs from its scheduled time, so that wait
/// counts (wrk2's model). A pool that opened a connection whenever none was free would answer
/// every stall with a burst of connects, and the tail would measure each proxy's accept queue
/// rather than its forwarding. A connection that fails is replaced, and counted in
/// `Stats::reconnects`.
async fn open_loop(target: SocketAddr, host: &'static str, rate: u64, secs: u64, conns: usize) -> Stats {
    let mut idle = Vec::with_capacity(conns);
    for _ in 0..conns {
        if let Some(mut send) = connect_h1(target).await {
            get(&mut send, host).await;
            idle.push(send);
        }
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(conns));
    let idle = std::sync::Arc::new(std::sync::Mutex::new(idle));
    let reconnects = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(10);
    let total = rate * secs;
    let mut tasks = Vec::with_capacity(total as usize);
    // A thread paces the schedule: tokio's timer wheel has 1 ms granularity, which at these
    // rates would measure the generator rather than the path.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    std::thread::spawn(move || {
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                return;
            }
        }
    });
    while let Some(scheduled) = rx.recv().await {
        let (slots, idle, reconnects) = (slots.clone(), idle.clone(), reconnects.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(_slot) = slots.acquire().await else { return None };
            // There are as many slots as connections: holding a slot means one is free, unless
            // a failed one was dropped, which this replaces.
            let free = idle.lock().unwrap().pop();
            let mut send = match free {
                Some(s) if !s.is_closed() => s,
                _ => {
                    reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    connect_h1(target).await?
                }
            };
            let ok = get(&mut send, host).await;
            let took = scheduled.elapsed();
            if ok {
                idle.lock().unwrap().push(send);
            }
            ok.then_some(took)
        }));
    }
    let mut stats = Stats::default();
    for t in tasks {
        match t.await.ok().flatten() {
            Some(l) => stats.latencies.push(l),
            None => stats.errors += 1,
        }
    }
    stats.elapsed = start.elapsed();
    stats.reconnects = reconnects.load(std::sync::atomic::Ordering::Relaxed);
    stats
}

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    /// Open loop: connections opened during the schedule to replace failed ones.
    reconnects: u64,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
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

/// How a closed-loop path is driven.
#[derive(Clone, Copy)]
enum How {
    /// Plain HTTP/1.1 keep-alive connections to this address.
    Plain(SocketAddr),
    /// TLS or QUIC to this port on loopback.
    Edge(Client, u16),
}

struct Path {
    name: &'static str,
    how: How,
    /// Proxy processes the requests go through (their CPU is the path's cost).
    procs: Vec<u32>,
    /// The edge processes (for nginx, master and workers), for requests per CPU-second at
    /// the ingress; empty on the other paths.
    ingress: Vec<u32>,
    /// The paths it is compared with: for a gateway path, the peer edges (same protocol, same
    /// thread count); for another, a path of the same shape (the bare hop's two framings, a
    /// baseline build's node pair).
    peers: Vec<&'static str>,
}

impl Path {
    fn new(name: &'static str, how: How, procs: Vec<u32>, ingress: Vec<u32>) -> Self {
        Path { name, how, procs, ingress, peers: Vec::new() }
    }

    fn against(mut self, peer: &'static str) -> Self {
        self.peers.push(peer);
        self
    }
}

/// The node pair from `BIN_BASELINE`'s build.
const BASELINE_PAIR: &str = "baseline build: client->node->QUIC->node->backend";
const CADDY: &str = "Caddy HTTP/3 -> backend";
const CADDY_1: &str = "Caddy (1 thread) HTTP/3 -> backend";
const NGINX_EDGE_H1: &str = "nginx edge HTTP/1.1+TLS -> TLS -> nginx -> backend";
const NGINX_EDGE_H2: &str = "nginx edge HTTP/2 -> TLS -> nginx -> backend";
const NGINX_EDGE_1_H1: &str = "nginx edge (1 worker) HTTP/1.1+TLS -> TLS -> nginx -> backend";
const NGINX_EDGE_1_H2: &str = "nginx edge (1 worker) HTTP/2 -> TLS -> nginx -> backend";
/// The one-worker nginx edge adding the forwarding headers the gateway adds (`peers::nginx_edge`).
const NGINX_EDGE_1_FWD_H1: &str = "nginx edge (1 worker, forwarding headers) HTTP/1.1+TLS -> TLS -> nginx -> backend";
/// The libraries under the gateway's HTTP/1.1+TLS row, on one thread (`peers::bare`): the floor
/// that row's per-request cost stands on.
const BARE_EDGE: &str = "bare edge (1 thread) HTTP/1.1+TLS -> HTTP/3 -> backend";
/// The bare hop with the mesh's headers, over h3 and over raw QUIC streams (`peers::bare`).
const BARE_H3: &str = "bare hop, mesh headers, h3 framing (libraries only)";
const BARE_RAW: &str = "bare hop, mesh headers, raw-stream framing (libraries only)";
/// The node pair with HTTP/3 between the nodes (`transport.framing = "h3"`).
const NODE_PAIR_H3: &str = "client->node->QUIC->node->backend, HTTP/3 between the nodes";

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
            let mut send = connect_h1(target).await.expect("connect");
            while Instant::now() < deadline {
                let t0 = Instant::now();
                if get(&mut send, host).await {
                    lat.push(t0.elapsed());
                } else {
                    errors += 1;
                    if send.is_closed() {
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    gather(tasks, start).await
}

/// The nodes' allocator, for the bare hop's processes (and this one's client and backend).
#[global_allocator]
static ALLOC: alloc::MiMalloc = alloc::MiMalloc;

#[path = "../src/alloc.rs"]
#[allow(unsafe_code)]
mod alloc;

/// One wrk run.
#[derive(Debug, Clone, Default)]
struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// Non-2xx answers and socket errors.
    errors: u64,
    /// CPU of the path's proxies per request, filled in by the caller.
    cpu_us: f64,
    /// On an edge path, CPU of the edge process alone per request.
    edge_cpu_us: f64,
}

fn wrk_installed() -> bool {
    let ok = std::process::Command::new("wrk").arg("-v").output().is_ok();
    if !ok {
        eprintln!("wrk is not installed: the wrk cross-check is SKIPPED");
    }
    ok
}

/// wrk, one thread and `conns` connections for `secs` against a closed-loop path, with its
/// latency distribution; `None` for a path wrk cannot drive (HTTP/2, HTTP/3) or when its output
/// does not read. Plain paths get `Host: hello`; an edge takes `https://localhost:PORT/`
/// (the server name its certificate is for; the routes take any host).
fn wrk(how: How, conns: usize, secs: u64) -> Option<Wrk> {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency"]);
    match how {
        How::Plain(addr) => cmd.args(["-H", "Host: hello"]).arg(format!("http://{addr}/")),
        How::Edge(Client::H1Tls, port) => cmd.arg(format!("https://localhost:{port}/")),
        How::Edge(..) => return None,
    };
    let out = cmd.output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let micros = |v: &str| -> Option<f64> {
        let at = v.find(|c: char| c.is_ascii_alphabetic())?;
        let n: f64 = v[..at].parse().ok()?;
        Some(match &v[at..] {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            _ => return None,
        })
    };
    let pct = |p: &str| lines.iter().find_map(|l| l.strip_prefix(p)).and_then(|v| micros(v.trim()));
    let number_after = |prefix: &str| -> u64 {
        lines.iter().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    let socket_errors: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("Socket errors:"))
        .map(|v| v.split(',').filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Some(Wrk {
        rps: lines.iter().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())?,
        p50_us: pct("50%")?,
        p99_us: pct("99%")?,
        requests: lines.iter().find_map(|l| l.split_once(" requests in ")).and_then(|(n, _)| n.trim().parse().ok())?,
        errors: number_after("Non-2xx or 3xx responses:") + socket_errors,
        cpu_us: 0.0,
        edge_cpu_us: 0.0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The node pair's CPU per request against each peer pair (medians of the rounds' own ratios,
/// for the suite's client and for wrk), and wrk's own table; a path against a path of the same
/// shape (the bare hop's framings, a baseline build's node pair) likewise, with req/s under wrk.
fn report_against_peers(paths: &[Path], own: &[Vec<f64>], wrk: &[Vec<Wrk>], conns: usize, secs: u64) {
    let node = paths.iter().position(|p| p.name.starts_with("client->node"));
    let peers: Vec<usize> = paths
        .iter()
        .enumerate()
        // The sidecar-pair peers (plain HTTP in); edge peers are compared with the gateway.
        .filter(|(_, p)| matches!(p.how, How::Plain(_)))
        .filter(|(_, p)| p.name.starts_with("nginx") || p.name.starts_with("haproxy"))
        .map(|(i, _)| i)
        .collect();
    if wrk.iter().any(|w| !w.is_empty()) {
        println!(
            "
wrk cross-check: `wrk -t1 -c{conns} -d{secs}s --latency`, in the same rounds; medians over rounds"
        );
        println!("| path | req/s | p50 | p99 | errors | proxy CPU per request |");
        println!("|---|---|---|---|---|---|");
        for (p, runs) in paths.iter().zip(wrk).filter(|(_, r)| !r.is_empty()) {
            let m = |f: fn(&Wrk) -> f64| median(runs.iter().map(f).collect());
            let cpu = m(|w| w.cpu_us);
            println!(
                "| {} | {:.0} | {:.0} us | {:.0} us | {} | {} |",
                p.name,
                m(|w| w.rps),
                m(|w| w.p50_us),
                m(|w| w.p99_us),
                runs.iter().map(|w| w.errors).sum::<u64>(),
                if cpu > 0.0 { format!("{cpu:.1} us") } else { "-".into() }
            );
        }
    }
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let wrk_cpu = |i: usize| -> Vec<f64> { wrk[i].iter().map(|w| w.cpu_us).collect() };
    // Other paths compared with a path of the same shape (the bare hop's two framings, a
    // baseline build's node pair).
    for (i, p) in paths.iter().enumerate().filter(|(_, p)| p.ingress.is_empty()) {
        for j in p.peers.iter().filter_map(|peer| paths.iter().position(|q| q.name == *peer)) {
            let with_wrk = if wrk[i].is_empty() || wrk[j].is_empty() {
                String::new()
            } else {
                let rps = median(wrk[i].iter().zip(&wrk[j]).map(|(a, b)| a.rps / b.rps).collect());
                format!(", {:.2}x (wrk); req/s under wrk {rps:.2}x", ratio(&wrk_cpu(i), &wrk_cpu(j)))
            };
            println!(
                "{} CPU per request against {}: {:.2}x (suite client){with_wrk}",
                p.name,
                paths[j].name,
                ratio(&own[i], &own[j])
            );
        }
    }
    let Some(node) = node else { return };
    for peer in peers {
        let own_ratio = ratio(&own[node], &own[peer]);
        let wrk_ratio = ratio(&wrk_cpu(node), &wrk_cpu(peer));
        let rps = median(wrk[node].iter().zip(&wrk[peer]).map(|(a, b)| a.rps / b.rps).collect());
        println!(
            "node pair CPU per request against {}: {own_ratio:.2}x (suite client), {wrk_ratio:.2}x (wrk); node pair req/s under wrk: {rps:.2}x",
            paths[peer].name
        );
    }
}

fn main() {
    peers::bare::run_if_asked();
    bench_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let secs = env_or("BENCH_SECS", 4);
        let rounds = env_or("BENCH_ROUNDS", 3);
        let conns = env_or("BENCH_CONNS", 32) as usize;
        let open_conns = env_or("BENCH_OPEN_CONNS", 64).max(1) as usize;
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
        // The same pair speaking HTTP/3 to each other (`transport.framing = "h3"`), as node-c
        // and node-d: what the lean framing saves, in the same rounds.
        pki.issue("node-c");
        pki.issue("node-d");
        let svc_d = svc.replace("node = \"node-b\"", "node = \"node-d\"");
        let d = NodeProc::start(pki.path(), "node-d", &with_framing(&node_toml("node-d", &state, &[], &svc_d), "h3"));
        let c = NodeProc::start(
            pki.path(),
            "node-c",
            &with_framing(&node_toml("node-c", &state, &[("node-d", d.addrs.inbound)], &svc_d), "h3"),
        );
        // Another build's node pair (BIN_BASELINE), for comparing two builds in the same rounds.
        let baseline_bin = binary_from_env("BIN_BASELINE");
        let baseline = baseline_bin.as_ref().map(|bin| {
            assert!(bin.is_file(), "BIN_BASELINE: no binary at {}", bin.display());
            pki.issue("node-e");
            pki.issue("node-f");
            let svc_f = svc.replace("node = \"node-b\"", "node = \"node-f\"");
            let toml_f = node_toml("node-f", &state, &[], &svc_f);
            let f = NodeProc::start_with_bin(bin, "node", pki.path(), "node-f", &toml_f);
            let toml_e = node_toml("node-e", &state, &[("node-f", f.addrs.inbound)], &svc_f);
            let e = NodeProc::start_with_bin(bin, "node", pki.path(), "node-e", &toml_e);
            (e, f)
        });
        pki.issue("gateway");
        let gw_toml = |workers: usize, registry: &str| {
            format!(
                "[mesh]\ntrust_domain = \"{TD}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\
                 workers = {workers}\nregistry_file = \"{}\"\n[gateway.limits]\nmax_concurrent_streams = 1024\n[gateway.tls]\nstate_dir = \"{}\"\n\
                 [[gateway.routes]]\nname = \"hello\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"hello\" }}]\n\
                 [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n{svc}",
                pki.path().join(registry).display(),
                state.display(),
                b.addrs.inbound
            )
        };
        let gw_workers = env_or("BENCH_GATEWAY_WORKERS", 0);
        let gw = NodeProc::start_gateway(pki.path(), &gw_toml(gw_workers, "registry.json"));
        // The gateway's threads, for its peers: `gateway.workers`, or one per core at 0.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let gw_threads = if gw_workers == 0 { cores } else { gw_workers };

        // The same gateway on one thread (`gateway.workers = 1`), for HTTP/3 only.
        let gw1 = NodeProc::start_args("gateway", pki.path(), "gateway-1", &gw_toml(1, "registry-1.json"), &[]);
        let gw1_port = gw1.addrs.listen.port();
        let gw_port = gw.addrs.listen.port();
        // Idle memory, before any request.
        let idle_rss = (a.rss_kib(), b.rss_kib(), gw.rss_kib());
        // Warm up every path (connections, pools, caches).
        load(backend, "hello", conns, 1).await;
        load(a.addrs.outbound, "hello", conns, 1).await;
        load(c.addrs.outbound, "hello", conns, 1).await;
        if let Some((e, _)) = &baseline {
            load(e.addrs.outbound, "hello", conns, 1).await;
        }
        for kind in [Client::H1Tls, Client::H2Tls, Client::H3] {
            load_edge(kind, gw_port, conns, 1).await;
        }
        for kind in [Client::H1Tls, Client::H2Tls, Client::H3] {
            load_edge(kind, gw1_port, conns, 1).await;
        }
        let nginx = peers::nginx(pki.path(), backend);
        if let Some(n) = &nginx {
            load(n.front, "hello", conns, 1).await;
        }
        // The hop's libraries without the nodes (open loop only): the floor under the mesh hop.
        let bare = peers::bare::start(&pki, backend, false);
        load(bare.front, "hello", conns, 1).await;
        // The gateway's HTTP/1.1+TLS row without the gateway: its libraries on one thread.
        let bare_edge = peers::bare::start_edge(&pki, backend);
        load_edge(Client::H1Tls, bare_edge.front.port(), conns, 1).await;
        // The bare hop with the mesh's headers, over h3 and over the leanest framing on raw
        // QUIC streams: what the h3 layer costs the hop, measured side by side.
        let bare_h3 = peers::bare::start(&pki, backend, true);
        let bare_raw = peers::bare::start_raw(&pki, backend, true);
        load(bare_h3.front, "hello", conns, 1).await;
        load(bare_raw.front, "hello", conns, 1).await;
        let (pa, pb, pg, pg1) = (a.child.id(), b.child.id(), gw.child.id(), gw1.child.id());
        // Every path of the closed loop: how to load it, the proxy processes on it (none for
        // direct) and, for ingress paths, the process at the edge.
        let mut paths = vec![
            Path::new("direct client->backend", How::Plain(backend), vec![], vec![]),
            Path::new("client->node->QUIC->node->backend", How::Plain(a.addrs.outbound), vec![pa, pb], vec![])
                .against(NODE_PAIR_H3),
            Path::new(NODE_PAIR_H3, How::Plain(c.addrs.outbound), vec![c.child.id(), d.child.id()], vec![]),
            Path::new("gateway HTTP/1.1+TLS -> node", How::Edge(Client::H1Tls, gw_port), vec![pg, pb], vec![pg])
                .against(NGINX_EDGE_H1),
            Path::new("gateway HTTP/2 -> node", How::Edge(Client::H2Tls, gw_port), vec![pg, pb], vec![pg])
                .against(NGINX_EDGE_H2),
            Path::new("gateway HTTP/3 -> node", How::Edge(Client::H3, gw_port), vec![pg, pb], vec![pg]).against(CADDY),
            Path::new("gateway (1 thread) HTTP/3 -> node", How::Edge(Client::H3, gw1_port), vec![pg1, pb], vec![pg1])
                .against(CADDY_1),
            Path::new("gateway (1 thread) HTTP/1.1+TLS -> node", How::Edge(Client::H1Tls, gw1_port), vec![pg1, pb], vec![pg1])
                .against(NGINX_EDGE_1_H1)
                .against(NGINX_EDGE_1_FWD_H1),
            Path::new("gateway (1 thread) HTTP/2 -> node", How::Edge(Client::H2Tls, gw1_port), vec![pg1, pb], vec![pg1])
                .against(NGINX_EDGE_1_H2),
            Path::new(BARE_EDGE, How::Edge(Client::H1Tls, bare_edge.front.port()), bare_edge.pids(), vec![bare_edge.pids()[0]])
                .against(NGINX_EDGE_1_H1),
            Path::new(BARE_H3, How::Plain(bare_h3.front), bare_h3.pids(), vec![]),
            Path::new(BARE_RAW, How::Plain(bare_raw.front), bare_raw.pids(), vec![]).against(BARE_H3),
        ];
        // Right after the node pair it is compared with, so the two run seconds apart.
        if let Some((e, f)) = &baseline {
            let node = paths.iter().position(|p| p.name.starts_with("client->node")).expect("the node pair's path");
            paths[node].peers.push(BASELINE_PAIR);
            let pids = vec![e.child.id(), f.child.id()];
            paths.insert(node + 1, Path::new(BASELINE_PAIR, How::Plain(e.addrs.outbound), pids, vec![]));
        }
        if let Some(n) = &nginx {
            let name = format!("nginx ({} worker each) -> TLS -> nginx -> backend", peers::workers());
            paths.push(Path::new(Box::leak(name.into_boxed_str()), How::Plain(n.front), n.pids(), vec![]));
        }
        let haproxy = peers::haproxy(pki.path(), backend);
        if let Some(h) = &haproxy {
            load(h.front, "hello", conns, 1).await;
            let name = format!("haproxy ({} thread each) -> TLS -> haproxy -> backend", peers::workers());
            paths.push(Path::new(Box::leak(name.into_boxed_str()), How::Plain(h.front), h.pids(), vec![]));
        }
        // The edge peers, each on as many threads as the gateway row it is compared with: Caddy
        // (`GOMAXPROCS`, always set: Go's own default may not count a container's CPU quota as
        // Rust's `available_parallelism` does) for HTTP/3, nginx terminating TLS with a worker
        // per gateway thread for HTTP/1.1 and HTTP/2; and each on one thread.
        let caddy = peers::caddy(pki.path(), "caddy", backend, Some(gw_threads));
        let caddy1 = peers::caddy(pki.path(), "caddy-1", backend, Some(1));
        for (c, name) in [(&caddy, CADDY), (&caddy1, CADDY_1)] {
            if let Some(c) = c {
                load_edge(Client::H3, c.front.port(), conns, 1).await;
                let pids = c.pids();
                paths.push(Path::new(name, How::Edge(Client::H3, c.front.port()), pids.clone(), pids));
            }
        }
        let nginx_edge = peers::nginx_edge(pki.path(), "nginx-edge", backend, gw_threads, false);
        let nginx_edge1 = peers::nginx_edge(pki.path(), "nginx-edge-1", backend, 1, false);
        // The same doing the gateway's header work too, for HTTP/1.1 only.
        let nginx_edge1f = peers::nginx_edge(pki.path(), "nginx-edge-1f", backend, 1, true);
        let edges = [
            (&nginx_edge, NGINX_EDGE_H1, Some(NGINX_EDGE_H2)),
            (&nginx_edge1, NGINX_EDGE_1_H1, Some(NGINX_EDGE_1_H2)),
            (&nginx_edge1f, NGINX_EDGE_1_FWD_H1, None),
        ];
        for (n, h1, h2) in edges {
            let Some(n) = n else { continue };
            for (kind, name) in [(Client::H1Tls, Some(h1)), (Client::H2Tls, h2)] {
                let Some(name) = name else { continue };
                load_edge(kind, n.front.port(), conns, 1).await;
                paths.push(Path::new(name, How::Edge(kind, n.front.port()), n.pids(), n.front_pids()));
            }
        }
        // BENCH_PATHS=a,b keeps direct and the paths whose names contain a or b (for profiling).
        if let Ok(only) = std::env::var("BENCH_PATHS") {
            let keep: Vec<&str> = only.split(',').map(str::trim).collect();
            let mut first = true;
            paths.retain(|p| std::mem::take(&mut first) || keep.iter().any(|k| p.name.contains(k)));
        }
        let mut acc: Vec<Stats> = paths.iter().map(|_| Stats::default()).collect();
        let mut cpu = vec![Duration::ZERO; paths.len()];
        let mut ingress_cpu = vec![Duration::ZERO; paths.len()];
        let closed_rounds = if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "open") { 0 } else { rounds };
        let use_wrk = std::env::var("BENCH_WRK").map_or(true, |v| v != "0") && closed_rounds > 0 && wrk_installed();
        // Per path, per round: CPU microseconds per request (own client), and wrk's rounds.
        let mut own_rounds: Vec<Vec<f64>> = paths.iter().map(|_| Vec::new()).collect();
        let mut wrk_rounds: Vec<Vec<Wrk>> = paths.iter().map(|_| Vec::new()).collect();
        for round in 0..closed_rounds {
            for (i, p) in paths.iter().enumerate() {
                let cpu0 = cpu_of(&p.procs);
                let edge0 = cpu_of(&p.ingress);
                let s = match p.how {
                    How::Plain(addr) => load(addr, "hello", conns, secs).await,
                    How::Edge(kind, port) => load_edge(kind, port, conns, secs).await,
                };
                let used = cpu_of(&p.procs).saturating_sub(cpu0);
                own_rounds[i].push(used.as_secs_f64() * 1e6 / s.latencies.len().max(1) as f64);
                cpu[i] += used;
                if !p.ingress.is_empty() {
                    ingress_cpu[i] += cpu_of(&p.ingress).saturating_sub(edge0);
                }
                eprintln!("round {round} {:36}: {:>9.0} req/s, {} errors", p.name, s.rps(), s.errors);
                acc[i].latencies.extend(s.latencies);
                acc[i].errors += s.errors;
                acc[i].elapsed += s.elapsed;
            }
            for (i, p) in paths.iter().enumerate().filter(|_| use_wrk) {
                if !matches!(p.how, How::Plain(_) | How::Edge(Client::H1Tls, _)) {
                    continue;
                }
                let how = p.how;
                let (cpu0, edge0) = (cpu_of(&p.procs), cpu_of(&p.ingress));
                let run = tokio::task::spawn_blocking(move || wrk(how, conns, secs)).await.unwrap();
                let used = cpu_of(&p.procs).saturating_sub(cpu0);
                let edge_used = cpu_of(&p.ingress).saturating_sub(edge0);
                match run {
                    Some(mut w) => {
                        w.cpu_us = used.as_secs_f64() * 1e6 / w.requests.max(1) as f64;
                        w.edge_cpu_us = edge_used.as_secs_f64() * 1e6 / w.requests.max(1) as f64;
                        eprintln!("round {round} wrk {:32}: {:>9.0} req/s, {} errors", p.name, w.rps, w.errors);
                        wrk_rounds[i].push(w);
                    }
                    None => eprintln!("round {round} wrk {}: no readable output", p.name),
                }
            }
        }
        let (base_rps, base50, base99) = {
            let d = &mut acc[0];
            (d.rps(), d.pct(0.5), d.pct(0.99))
        };
        if closed_rounds > 0 {
            println!("\n{conns} requests in flight (HTTP/1.1: {conns} keep-alive connections; HTTP/2 and HTTP/3: one connection), {rounds} alternating rounds of {secs}s");
            println!("| path | req/s | p50 | p99 | errors | req/s vs direct | p50 vs direct | p99 vs direct | proxy CPU per request |");
            println!("|---|---|---|---|---|---|---|---|---|");
        }
        let mut closed = Vec::new();
        let mut per_edge_cpu_s = Vec::new();
        // With BENCH_ONLY=open nothing ran closed-loop: no table of empty rows.
        for (i, (p, st)) in paths.iter().zip(acc.iter_mut()).enumerate().filter(|_| closed_rounds > 0) {
            let (rps, p50, p99) = (st.rps(), st.pct(0.5), st.pct(0.99));
            let n = st.latencies.len().max(1) as f64;
            let per_req_us = cpu[i].as_secs_f64() * 1e6 / n;
            println!(
                "| {} | {rps:.0} | {p50:.2?} | {p99:.2?} | {} | {:.3} | {:.2} | {:.2} | {} |",
                p.name,
                st.errors,
                rps / base_rps,
                p50.as_secs_f64() / base50.as_secs_f64(),
                p99.as_secs_f64() / base99.as_secs_f64(),
                if cpu[i].is_zero() { "-".to_string() } else { format!("{per_req_us:.1} us") }
            );
            // Requests per CPU-second of the edge process alone.
            let edge = (!ingress_cpu[i].is_zero()).then(|| n / ingress_cpu[i].as_secs_f64());
            if let Some(e) = edge {
                per_edge_cpu_s.push((p.name, &p.peers, e));
            }
            closed.push(serde_json::json!({
                "path": p.name, "rps": rps, "p50_us": p50.as_secs_f64() * 1e6, "p99_us": p99.as_secs_f64() * 1e6,
                "errors": st.errors, "rps_vs_direct": rps / base_rps, "proxy_cpu_us_per_request": per_req_us,
                "requests_per_ingress_cpu_second": edge,
            }));
        }
        if closed_rounds > 0 {
            report_against_peers(&paths, &own_rounds, &wrk_rounds, conns, secs);
        }
        if !per_edge_cpu_s.is_empty() {
            // Each gateway row against its peer: same protocol, as many threads; for HTTP/1.1
            // also under wrk, as the median of the rounds' own ratios.
            let rate_of = |name: &str| per_edge_cpu_s.iter().find(|(n, _, _)| *n == name).map(|(_, _, r)| *r);
            let wrk_of = |name: &str| paths.iter().position(|p| p.name == name).map(|i| &wrk_rounds[i]);
            println!(
                "\n| ingress | requests per CPU-second of the edge process | against (same protocol, same threads) | ratio | wrk: requests per CPU-second | wrk: ratio |"
            );
            println!("|---|---|---|---|---|---|");
            for (name, peers, r) in &per_edge_cpu_s {
                // A row per peer compared with (one, with dashes, for a peer itself).
                let against: Vec<Option<&'static str>> =
                    if peers.is_empty() { vec![None] } else { peers.iter().copied().map(Some).collect() };
                for peer in against {
                    let (against, vs) = match peer.and_then(|p| rate_of(p).map(|pr| (p, pr))) {
                        Some((p, pr)) => (p, format!("{:.2}x", r / pr)),
                        None => ("-", "-".to_string()),
                    };
                    let own = wrk_of(name).filter(|w| !w.is_empty());
                    let wrk_rate = own.map_or("-".to_string(), |w| {
                        format!("{:.0}", median(w.iter().map(|w| 1e6 / w.edge_cpu_us).collect()))
                    });
                    let wrk_vs = match (own, peer.and_then(wrk_of).filter(|w| !w.is_empty())) {
                        (Some(g), Some(p)) => format!(
                            "{:.2}x",
                            median(g.iter().zip(p).map(|(g, p)| p.edge_cpu_us / g.edge_cpu_us).collect())
                        ),
                        _ => "-".to_string(),
                    };
                    println!("| {name} | {r:.0} | {against} | {vs} | {wrk_rate} | {wrk_vs} |");
                }
            }
        }
        let rss = (a.peak_rss_kib(), b.peak_rss_kib(), gw.peak_rss_kib());
        println!("peak RSS: node-a {} KiB, node-b {} KiB, gateway {} KiB", rss.0, rss.1, rss.2);
        println!(
            "idle RSS (before any request): node-a {} KiB, node-b {} KiB, gateway {} KiB",
            idle_rss.0, idle_rss.1, idle_rss.2
        );
        // Open loop at fixed rates: direct and mesh hop alternate, same schedule.
        let rates: Vec<u64> = std::env::var("BENCH_RATES")
            .unwrap_or_else(|_| "1000,5000".into())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        let mut open = Vec::new();
        // Many short rounds: this machine's noise comes in bursts of 50-250 ms, and short rounds
        // spread them over every path instead of handing each burst to whichever path was running.
        let (open_rounds, open_secs) = (env_or("BENCH_OPEN_ROUNDS", 12), env_or("BENCH_OPEN_SECS", 1));
        println!(
            "\nopen loop, latency from the scheduled send time, {open_rounds} alternating rounds of {open_secs}s per rate, {open_conns} connections"
        );
        println!("| rate | path | p50 | p90 | p99 | p99.9 | errors |");
        println!("|---|---|---|---|---|---|---|");
        for rate in rates {
            // (name, target): direct first, as the baseline every other path is compared with.
            // Two floors under the mesh hop: the bare hop over h3, and over the raw-stream framing
            // with the mesh's headers, which is what the nodes carry between them (the lean framing).
            let mut targets = vec![
                ("direct", backend),
                ("one node, local delivery", b.addrs.outbound),
                ("mesh hop", a.addrs.outbound),
                ("bare hop (libraries only)", bare.front),
                (BARE_RAW, bare_raw.front),
            ];
            if let Some(n) = &nginx {
                targets.push(("nginx pair", n.front));
            }
            if let Some(h) = &haproxy {
                targets.push(("haproxy pair", h.front));
            }
            // BENCH_OPEN_PATHS=a,b keeps direct and the open-loop paths whose names contain a or b.
            if let Ok(only) = std::env::var("BENCH_OPEN_PATHS") {
                let keep: Vec<&str> = only.split(',').map(str::trim).collect();
                targets.retain(|(name, _)| *name == "direct" || keep.iter().any(|k| name.contains(k)));
            }
            let mut acc: Vec<Stats> = targets.iter().map(|_| Stats::default()).collect();
            let mut trouble: Vec<TcpTrouble> = targets.iter().map(|_| TcpTrouble::default()).collect();
            let mut rss_at_rate = (0u64, 0u64);
            // Each round's own p99, per path: one hold-up of the machine sets a round's p99, and
            // pooled over the rounds p99 mostly says which path drew the longest ones ((18)); the
            // median of the rounds' p99s, and of each round's p99 over direct's in that round,
            // is steadier.
            let mut round_p99: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
            for _ in 0..open_rounds {
                for (i, (name, target)) in targets.iter().enumerate() {
                    let before = TcpTrouble::now();
                    let mut s = open_loop(*target, "hello", rate, open_secs, open_conns).await;
                    round_p99[i].push(s.pct(0.99).as_secs_f64() * 1e6);
                    trouble[i].add(&TcpTrouble::now().since(&before));
                    if *name == "mesh hop" {
                        // Memory of the nodes right after carrying this rate.
                        rss_at_rate = (rss_at_rate.0.max(proc_status_kib(pa, "VmRSS")), rss_at_rate.1.max(proc_status_kib(pb, "VmRSS")));
                    }
                    acc[i].latencies.extend(s.latencies);
                    acc[i].errors += s.errors;
                    acc[i].reconnects += s.reconnects;
                }
            }
            let ps = [0.5, 0.9, 0.99, 0.999];
            let vals: Vec<Vec<f64>> =
                acc.iter_mut().map(|st| ps.iter().map(|p| st.pct(*p).as_secs_f64() * 1e6).collect()).collect();
            let us = |v: f64| if v >= 1000.0 { format!("{:.2} ms", v / 1000.0) } else { format!("{v:.0} µs") };
            let mut paths = Vec::new();
            for (i, (name, _)) in targets.iter().enumerate() {
                let v = &vals[i];
                println!("| {rate}/s | {name} | {} | {} | {} | {} | {} |", us(v[0]), us(v[1]), us(v[2]), us(v[3]), acc[i].errors);
                let added: Vec<f64> = (0..4).map(|j| v[j] - vals[0][j]).collect();
                let t = &trouble[i];
                paths.push(serde_json::json!({
                    "path": name, "us": v, "added_us": added, "errors": acc[i].errors, "reconnects": acc[i].reconnects,
                    "tcp_during_rounds": {
                        "listen_overflows": t.listen_overflows, "syn_retransmits": t.syn_retrans,
                        "retransmitted_segments": t.retrans_segs, "retransmission_timeouts": t.timeouts,
                    },
                }));
            }
            for (i, (name, _)) in targets.iter().enumerate().skip(1) {
                let a: Vec<String> = (0..4).map(|j| us(vals[i][j] - vals[0][j])).collect();
                println!("| {rate}/s | **added by {name}** | {} | {} | {} | {} | |", a[0], a[1], a[2], a[3]);
            }
            let round_added: Vec<f64> = round_p99
                .iter()
                .map(|r| median(r.iter().zip(&round_p99[0]).map(|(p, d)| p - d).collect()))
                .collect();
            for (i, (name, _)) in targets.iter().enumerate().skip(1) {
                println!(
                    "| {rate}/s | added by {name}: median of the rounds' p99s over direct's | | | {} | | |",
                    us(round_added[i])
                );
            }
            for (i, p) in paths.iter_mut().enumerate() {
                p["round_p99_us"] = serde_json::json!(round_p99[i]);
                p["median_round_p99_added_us"] = serde_json::json!(round_added[i]);
            }
            // The machine's TCP counters during each path's rounds: a full accept queue or a
            // retransmission timeout shows in the tail as a stall of 200 ms to seconds.
            for (i, (name, _)) in targets.iter().enumerate() {
                if acc[i].reconnects > 0 {
                    println!("| {rate}/s | {name}: connections replaced during the schedule | {} | | | | |", acc[i].reconnects);
                }
                let t = &trouble[i];
                if *t != TcpTrouble::default() {
                    println!(
                        "| {rate}/s | TCP trouble during {name}'s rounds | {} accept-queue overflows | {} SYN retransmits | {} segments retransmitted | {} timeouts | |",
                        t.listen_overflows, t.syn_retrans, t.retrans_segs, t.timeouts
                    );
                }
            }
            println!("| {rate}/s | node RSS after the mesh rounds | node-a {} KiB | node-b {} KiB | | | |", rss_at_rate.0, rss_at_rate.1);
            open.push(serde_json::json!({
                "rate": rate,
                "percentiles": ps,
                "paths": paths,
                "node_rss_kib": [rss_at_rate.0, rss_at_rate.1],
            }));
        }
        let report = serde_json::json!({
            "bench": "load",
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()) },
            "settings": { "secs": secs, "rounds": rounds, "conns": conns, "open_secs": open_secs, "open_rounds": open_rounds, "open_conns": open_conns,
                          "binary": support::bin(), "baseline_binary": baseline_bin.as_ref().map(|b| b.display().to_string()) },
            "closed_loop": closed,
            "open_loop": open,
            "peak_rss_kib": { "node-a": rss.0, "node-b": rss.1, "gateway": rss.2 },
            "idle_rss_kib": { "node-a": idle_rss.0, "node-b": idle_rss.1, "gateway": idle_rss.2 },
        });
        let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-load.json".into());
        match std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()) {
            Ok(()) => println!("\nJSON: {path}"),
            Err(e) => eprintln!("cannot write {path}: {e}"),
        }
    });
}
