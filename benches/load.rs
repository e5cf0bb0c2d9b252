//! Load benchmark: direct client->backend against client->node-a->QUIC->node-b->backend and
//! gateway ingress (HTTP/1.1+TLS, HTTP/2, HTTP/3) -> QUIC -> node-b -> backend, with the same
//! client, the same backend, in the same run, alternating rounds. Nodes and gateway run as
//! processes of the release binary.
//!
//! - Closed loop (saturation): req/s, p50/p99 and ratios to direct, and the CPU time the proxy
//!   processes spent per request (from /proc: utime + stime of the processes on the path).
//! - Open loop at fixed rates (1000 and 5000 req/s by default): requests leave on a schedule and
//!   latency is measured from the scheduled time, so a stall counts against every request it
//!   delayed (no coordinated omission); p50/p90/p99/p99.9 of direct and mesh hop, and the latency
//!   the hop adds at each percentile.
//! - Everything also goes to a JSON file (`BENCH_JSON`, default `target/bench-load.json`).
//!
//! Run: `cargo bench --bench load` (env: BENCH_SECS per round, default 4; BENCH_ROUNDS, default 3;
//! BENCH_CONNS, default 32; BENCH_RATES, default `1000,5000`; BENCH_ONLY=open for the open loop
//! alone).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "peers/mod.rs"]
mod peers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

/// CPU time a process has used so far (user + system, all threads), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the state letter, in
    // USER_HZ ticks (100 per second in the /proc ABI).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

/// Open loop: `rate` requests per second for `secs` on a pool of keep-alive connections;
/// each latency runs from the request's scheduled time.
async fn open_loop(target: SocketAddr, host: &'static str, rate: u64, secs: u64) -> Stats {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http::<Empty<Bytes>>();
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
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("http://{target}/")).header("host", host).body(Empty::new()).unwrap();
            match client.request(req).await {
                Ok(r) if r.status() == 200 => {
                    let _ = r.into_body().collect().await;
                    Some(scheduled.elapsed())
                }
                _ => None,
            }
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
    stats
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
        // Idle memory, before any request.
        let idle_rss = (a.rss_kib(), b.rss_kib(), gw.rss_kib());
        // Warm up every path (connections, pools, caches).
        load(backend, "hello", conns, 1).await;
        load(a.addrs.outbound, "hello", conns, 1).await;
        for kind in [Client::H1Tls, Client::H2Tls, Client::H3] {
            load_edge(kind, gw_port, conns, 1).await;
        }
        let nginx = peers::nginx(pki.path(), backend);
        if let Some(n) = &nginx {
            load(n.front, "hello", conns, 1).await;
        }
        let mut names = vec!["direct client->backend", "client->node->QUIC->node->backend", "gateway HTTP/1.1+TLS -> node", "gateway HTTP/2 -> node", "gateway HTTP/3 -> node"];
        // The proxy processes each path goes through (none for direct).
        let (pa, pb, pg) = (a.child.id(), b.child.id(), gw.child.id());
        let mut on_path: Vec<Vec<u32>> = vec![vec![], vec![pa, pb], vec![pg, pb], vec![pg, pb], vec![pg, pb]];
        if let Some(n) = &nginx {
            names.push("nginx -> TLS -> nginx -> backend");
            on_path.push(n.pids());
        }
        let haproxy = peers::haproxy(pki.path(), backend);
        if let Some(h) = &haproxy {
            load(h.front, "hello", conns, 1).await;
            names.push("haproxy -> TLS -> haproxy -> backend");
            on_path.push(h.pids());
        }
        // Which baseline a path index past the mesh paths is.
        let peer_front = |i: usize| match (i, &nginx, &haproxy) {
            (5, Some(n), _) => n.front,
            (_, _, Some(h)) => h.front,
            _ => backend,
        };
        let mut acc: Vec<Stats> = (0..names.len()).map(|_| Stats::default()).collect();
        let mut cpu = vec![Duration::ZERO; names.len()];
        let closed_rounds = if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "open") { 0 } else { rounds };
        for round in 0..closed_rounds {
            for (i, name) in names.iter().enumerate() {
                let cpu0 = cpu_of(&on_path[i]);
                let s = match i {
                    0 => load(backend, "hello", conns, secs).await,
                    1 => load(a.addrs.outbound, "hello", conns, secs).await,
                    2 => load_edge(Client::H1Tls, gw_port, conns, secs).await,
                    3 => load_edge(Client::H2Tls, gw_port, conns, secs).await,
                    4 => load_edge(Client::H3, gw_port, conns, secs).await,
                    _ => load(peer_front(i), "hello", conns, secs).await,
                };
                cpu[i] += cpu_of(&on_path[i]).saturating_sub(cpu0);
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
        println!("| path | req/s | p50 | p99 | errors | req/s vs direct | p50 vs direct | p99 vs direct | proxy CPU per request |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut closed = Vec::new();
        for ((name, st), cpu) in names.iter().zip(acc.iter_mut()).zip(&cpu) {
            let (rps, p50, p99) = (st.rps(), st.pct(0.5), st.pct(0.99));
            let per_req_us = cpu.as_secs_f64() * 1e6 / st.latencies.len().max(1) as f64;
            println!(
                "| {name} | {rps:.0} | {p50:.2?} | {p99:.2?} | {} | {:.3} | {:.2} | {:.2} | {} |",
                st.errors,
                rps / base_rps,
                p50.as_secs_f64() / base50.as_secs_f64(),
                p99.as_secs_f64() / base99.as_secs_f64(),
                if cpu.is_zero() { "-".to_string() } else { format!("{per_req_us:.1} us") }
            );
            closed.push(serde_json::json!({
                "path": name, "rps": rps, "p50_us": p50.as_secs_f64() * 1e6, "p99_us": p99.as_secs_f64() * 1e6,
                "errors": st.errors, "rps_vs_direct": rps / base_rps, "proxy_cpu_us_per_request": per_req_us,
            }));
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
        println!("\nopen loop, latency from the scheduled send time, {rounds} alternating rounds of {secs}s per rate");
        println!("| rate | path | p50 | p90 | p99 | p99.9 | errors |");
        println!("|---|---|---|---|---|---|---|");
        for rate in rates {
            let mut pair = [Stats::default(), Stats::default(), Stats::default()];
            let mut rss_at_rate = (0u64, 0u64);
            let mut targets = vec![backend, a.addrs.outbound];
            if let Some(n) = &nginx {
                targets.push(n.front);
            }
            for _ in 0..rounds {
                for (i, target) in targets.iter().enumerate() {
                    let s = open_loop(*target, "hello", rate, secs).await;
                    if i == 1 {
                        // Memory of the nodes right after carrying this rate.
                        rss_at_rate = (rss_at_rate.0.max(proc_status_kib(pa, "VmRSS")), rss_at_rate.1.max(proc_status_kib(pb, "VmRSS")));
                    }
                    pair[i].latencies.extend(s.latencies);
                    pair[i].errors += s.errors;
                }
            }
            let ps = [0.5, 0.9, 0.99, 0.999];
            let mut vals = [[Duration::ZERO; 4]; 3];
            for (i, st) in pair.iter_mut().enumerate().take(targets.len()) {
                for (j, p) in ps.iter().enumerate() {
                    vals[i][j] = st.pct(*p);
                }
                let name = ["direct", "mesh hop", "nginx pair"][i];
                println!(
                    "| {rate}/s | {name} | {:.2?} | {:.2?} | {:.2?} | {:.2?} | {} |",
                    vals[i][0], vals[i][1], vals[i][2], vals[i][3], st.errors
                );
            }
            println!("| {rate}/s | node RSS after the mesh rounds | node-a {} KiB | node-b {} KiB | | | |", rss_at_rate.0, rss_at_rate.1);
            let added: Vec<f64> = (0..4).map(|j| (vals[1][j].as_secs_f64() - vals[0][j].as_secs_f64()) * 1e6).collect();
            println!(
                "| {rate}/s | added by the hop | {:.0} us | {:.0} us | {:.0} us | {:.0} us | |",
                added[0], added[1], added[2], added[3]
            );
            let nginx_added: Vec<f64> =
                (0..4).map(|j| (vals[2][j].as_secs_f64() - vals[0][j].as_secs_f64()) * 1e6).collect();
            if targets.len() > 2 {
                println!(
                    "| {rate}/s | added by the nginx pair | {:.0} us | {:.0} us | {:.0} us | {:.0} us | |",
                    nginx_added[0], nginx_added[1], nginx_added[2], nginx_added[3]
                );
            }
            open.push(serde_json::json!({
                "rate": rate,
                "direct_us": vals[0].iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>(),
                "mesh_us": vals[1].iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>(),
                "added_us": added,
                "nginx_pair_us": (targets.len() > 2).then(|| vals[2].iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>()),
                "nginx_added_us": (targets.len() > 2).then_some(nginx_added),
                "percentiles": ps,
                "errors": [pair[0].errors, pair[1].errors],
                "node_rss_kib": [rss_at_rate.0, rss_at_rate.1],
            }));
        }
        let report = serde_json::json!({
            "bench": "load",
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()) },
            "settings": { "secs": secs, "rounds": rounds, "conns": conns },
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
