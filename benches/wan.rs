//! Loss without head-of-line blocking (issue #30): `cargo bench --bench wan` (root; `ip`, `nft`,
//! `wrk`, `nginx`, `haproxy`).
//!
//! Two hosts, network namespaces `a` and `b`, joined by a veth link through a bridge. nftables on
//! host a's link drops a share of its packets at random (`numgen random`), both ways and every
//! protocol, so TCP and QUIC lose alike. (`tc netem` is not available on this machine's kernel,
//! so there is no added delay: the link's RTT is tens of microseconds, and loss is the lever.)
//! A client on host a (Debian's `wrk`, closed loop, 200 connections) sends small GETs through a
//! proxy pair to a backend on host b (nginx serving static files):
//!
//! - **mesh hop**: node-a → one QUIC connection (mutual TLS; the nodes' own framing, `quicmesh/1`) → node-b;
//! - **HBONE-shaped pair**: two haproxy with HTTP/2 over TLS 1.3 between them, one multiplexed
//!   TCP connection (`proto h2`, `http-reuse always`), as ztunnel's tunnel;
//! - **TLS nginx pair**: two nginx with TLS 1.3 between them, a pool of HTTP/1.1 keep-alive
//!   connections (as many kept alive as the client has connections);
//! - **bare hop**: the mesh hop's libraries and nothing else (`peers/bare.rs`, raw-stream
//!   framing, the headers a node adds), its halves where the
//!   nodes run: the floor under the mesh hop on these hosts. Small requests only: it holds each
//!   answer whole before passing it on, so it takes no part in the bulk runs. It keeps the
//!   default transport settings whatever `BENCH_MESH` and `BENCH_MTU` say, so it is the floor
//!   of the default `cubic` pair on 1500-byte links.
//!
//! Each at 0, 1, 2 and 5 % loss (`BENCH_LOSS`, per cent), alone (`small`) and alongside one bulk
//! download through the same pair (`mixed`: for the mesh and the HBONE pair it shares the one
//! connection with the small requests). One worker per proxy. Results: a table on stdout and
//! every run in `target/bench-wan.json` (`BENCH_JSON`); `benches/plot_wan.py` draws the PNG.
//! Environment: `BENCH_SECS` per run (8), `BENCH_ROUNDS` (2), `BENCH_CONNS` (200),
//! `BENCH_PATHS` (names containing these), `BENCH_SCENARIOS` (`small,mixed`), `BENCH_MESH` (the
//! mesh's congestion controllers, one node pair each: `cubic`; e.g. `cubic,bbr`, and
//! `cubic+ack=5ms` for `transport.max_ack_delay` too), `BENCH_MTU`
//! (the links' MTU, 1500; the nodes' `transport.max_udp_payload` follows it).

#[path = "../tests/support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "peers/mod.rs"]
mod peers;

/// The nodes' allocator, for the bare hop's processes.
#[global_allocator]
static ALLOC: alloc::MiMalloc = alloc::MiMalloc;

#[path = "../src/alloc.rs"]
#[allow(unsafe_code)]
mod alloc;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::netns::Net;
use support::*;

/// Ports inside the hosts (each namespace has its own ports).
const BACKEND: u16 = 8000;
const FRONT_HAPROXY: u16 = 8101;
const BACK_HAPROXY: u16 = 8102;
const FRONT_NGINX: u16 = 8201;
const BACK_NGINX: u16 = 8202;
const MESH_INBOUND: u16 = 7443;
const MESH_OUTBOUND: u16 = 15001;
/// The bare hop's path name.
const BARE: &str = "bare hop (libraries only)";
/// The bulk file (sparse: its pages are zeros from the page cache).
const BULK_BYTES: u64 = 64 << 30;

/// A process started in a host; killed on drop (nginx's workers with it).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("pgrep").args(["-P", &self.0.id().to_string()]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_host(net: &Net, host: &str, program: &str, args: &[&str]) -> Command {
    let mut c = support::netns::command(&net.ns(host), program);
    c.args(args);
    c
}

fn spawn(mut c: Command) -> Proc {
    Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// Waits until `addr` accepts inside `host`.
async fn listening(net: &Net, host: &str, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while net.connect(host, addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {addr} in host {host}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nginx_conf(dir: &Path, name: &str, server: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/{name}-cb;\n  proxy_temp_path {d}/{name}-pt;\n\
           fastcgi_temp_path {d}/{name}-ft;\n  uwsgi_temp_path {d}/{name}-ut;\n  scgi_temp_path {d}/{name}-st;\n\
           {server}\n}}\n"
    )
}

fn nginx(net: &Net, host: &str, dir: &Path, name: &str, server: &str) -> Proc {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, nginx_conf(dir, name, server)).unwrap();
    let (p, c) = (dir.display().to_string(), path.display().to_string());
    spawn(in_host(net, host, "nginx", &["-p", &p, "-e", &format!("{p}/{name}.early.err"), "-c", &c]))
}

fn haproxy(net: &Net, host: &str, dir: &Path, name: &str, body: &str) -> Proc {
    let text = format!(
        "global\n  maxconn 5000\n  nbthread 1\n  tune.h2.max-concurrent-streams 1000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n{body}"
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, text).unwrap();
    spawn(in_host(net, host, "haproxy", &["-db", "-f", &path.display().to_string()]))
}

/// One wrk run's figures (microseconds), from its Lua `done()` hook.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Run {
    loss: u32,
    scenario: &'static str,
    path: &'static str,
    round: u32,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    requests: u64,
    errors: u64,
    /// The bulk download's rate alongside (mixed runs), MB/s.
    bulk_mbps: Option<f64>,
}

const LUA: &str = r#"
wrk.headers["Host"] = "web"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WAN %d %d %d %d %d %d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    summary.duration))
end
"#;

fn wrk(net: &Net, lua: &Path, front: u16, conns: usize, secs: u64) -> Option<(f64, f64, f64, f64, u64, u64)> {
    let out = in_host(
        net,
        "a",
        "wrk",
        &[
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "-s",
            &lua.display().to_string(),
            &format!("http://127.0.0.1:{front}/small"),
        ],
    )
    .output()
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("WAN "))?;
    let v: Vec<f64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    let [p50, p99, p999, requests, errors, duration] = v[..] else { return None };
    Some((requests / (duration / 1e6), p50, p99, p999, requests as u64, errors as u64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

fn main() {
    peers::bare::run_if_asked();
    bench_logging();
    for tool in ["wrk", "nginx", "haproxy", "curl"] {
        if !require_tool(tool) {
            return;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let Some(net) = Net::new(&["a", "b"]) else { return };
        let secs = env_or("BENCH_SECS", 8);
        let rounds = env_or("BENCH_ROUNDS", 2);
        let conns = env_or("BENCH_CONNS", 200) as usize;
        let losses: Vec<u32> = std::env::var("BENCH_LOSS")
            .unwrap_or_else(|_| "0,1,2,5".into())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        let only: Vec<String> = std::env::var("BENCH_PATHS")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let scenarios: Vec<&'static str> = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) => ["small", "mixed"].into_iter().filter(|s| v.contains(s)).collect(),
            Err(_) => vec!["small", "mixed"],
        };
        let mesh_variants: Vec<String> = std::env::var("BENCH_MESH")
            .unwrap_or_else(|_| "cubic".into())
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        // Jumbo frames: the links' MTU, and the mesh's datagrams up to it (`BENCH_MTU`, 1500).
        let mtu = env_or("BENCH_MTU", 1500);
        if mtu != 1500 {
            net.set_mtu(mtu as u32);
        }
        let payload = (mtu - 48).clamp(1200, 65527);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ip_b = net.ip("b");

        // The backend on host b: nginx serving a small file and a large sparse one.
        let www = d.join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("small"), "x".repeat(100)).unwrap();
        std::fs::File::create(www.join("bulk")).unwrap().set_len(BULK_BYTES).unwrap();
        let _backend = nginx(
            &net,
            "b",
            d,
            "backend",
            &format!(
                "server {{ listen 127.0.0.1:{BACKEND}; keepalive_requests 1000000; sendfile on;\n\
                 location / {{ root {}; }} }}",
                www.display()
            ),
        );
        listening(&net, "b", ([127, 0, 0, 1], BACKEND).into(), "the backend").await;

        // The mesh: node-b hosts `web` (the backend), node-a reaches it over QUIC.
        let pki = Pki::new();
        let state = pki.issue("node-a");
        let svc = format!(
            "[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{BACKEND}\"\n"
        );
        let node = |name: &str, host: &str, inbound: u16, outbound: u16, rest: &str| {
            let toml = format!(
                "[mesh]\ntrust_domain = \"{TD}\"\n\n[node]\nname = \"{name}\"\noutbound = \"127.0.0.1:{outbound}\"\n\
                 inbound = \"{}\"\nadmin = \"127.0.0.1:0\"\n\n[node.tls]\nstate_dir = \"{}\"\n\n\
                 [timeouts]\nconnect = \"2s\"\nrequest = \"30s\"\n\n{rest}",
                net.addr(host, inbound),
                state.display()
            );
            NodeProc::start_in(&net.ns(host), "node", pki.path(), name, &toml)
        };
        // One node pair per congestion controller asked for (`BENCH_MESH`), each on its own ports.
        let mut mesh_paths: Vec<(&'static str, u16)> = Vec::new();
        let mut _nodes = Vec::new();
        for (i, cc) in mesh_variants.iter().enumerate() {
            let i = i as u16;
            // `cubic`, or `cubic+ack=5ms` to ask for a shorter ACK delay as well.
            let (cc_name, ack_label) = cc.split_once("+ack=").map_or((cc.as_str(), None), |(c, a)| (c, Some(a)));
            let ack = ack_label.map(|a| format!("max_ack_delay = \"{a}\"\n")).unwrap_or_default();
            let transport = format!("[transport]\ncongestion = \"{cc_name}\"\nmax_udp_payload = {payload}\n{ack}");
            let inbound = MESH_INBOUND + i;
            let (a, b) = (format!("node-a{i}"), format!("node-b{i}"));
            for name in [&a, &b] {
                pki.issue(name);
            }
            let svc = svc.replace("node-b", &b);
            _nodes.push(node(&b, "b", inbound, MESH_OUTBOUND + 100 + i, &format!("{transport}\n{svc}")));
            let peers = format!("[[nodes]]\nname = \"{b}\"\naddress = \"{}\"\n", net.addr("b", inbound));
            _nodes.push(node(&a, "a", inbound, MESH_OUTBOUND + i, &format!("{transport}\n{peers}\n{svc}")));
            let name: &'static str = match ack_label {
                _ if i == 0 && cc == "cubic" => "mesh hop (QUIC)",
                Some(a) => Box::leak(format!("mesh hop (QUIC, {cc_name}, ACK delay {a})").into_boxed_str()),
                None => Box::leak(format!("mesh hop (QUIC, {cc_name})").into_boxed_str()),
            };
            mesh_paths.push((name, MESH_OUTBOUND + i));
        }

        // The HBONE-shaped pair: HTTP/2 over TLS 1.3 between two haproxy, one connection.
        let (cert, key) = quicmesh_shared::identity::self_signed_pem(&["localhost".to_string()]).unwrap();
        let pem = d.join("peer.pem");
        std::fs::write(&pem, format!("{cert}{key}")).unwrap();
        std::fs::write(d.join("peer.crt"), &cert).unwrap();
        std::fs::write(d.join("peer.key"), &key).unwrap();
        let _hb = haproxy(
            &net,
            "b",
            d,
            "haproxy-back",
            &format!(
                "frontend f\n  bind {ip_b}:{BACK_HAPROXY} ssl crt {} alpn h2 ssl-min-ver TLSv1.3\n  default_backend b\n\
                 backend b\n  http-reuse always\n  server s1 127.0.0.1:{BACKEND}\n",
                pem.display()
            ),
        );
        let _ha = haproxy(
            &net,
            "a",
            d,
            "haproxy-front",
            &format!(
                "frontend f\n  bind 127.0.0.1:{FRONT_HAPROXY}\n  default_backend b\n\
                 backend b\n  http-reuse always\n  server s1 {ip_b}:{BACK_HAPROXY} ssl verify none alpn h2 proto h2 ssl-min-ver TLSv1.3\n"
            ),
        );
        // The TLS nginx pair: HTTP/1.1 keep-alive pool, TLS 1.3 between.
        let _nb = nginx(
            &net,
            "b",
            d,
            "nginx-back",
            &format!(
                "upstream next {{ server 127.0.0.1:{BACKEND}; keepalive 512; keepalive_requests 1000000; }}\n\
                 server {{ listen {ip_b}:{BACK_NGINX} ssl; ssl_certificate {d}/peer.crt; ssl_certificate_key {d}/peer.key;\n\
                 ssl_protocols TLSv1.3; keepalive_requests 1000000;\n\
                 location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}",
                d = d.display()
            ),
        );
        let _na = nginx(
            &net,
            "a",
            d,
            "nginx-front",
            &format!(
                "upstream next {{ server {ip_b}:{BACK_NGINX}; keepalive 512; keepalive_requests 1000000; }}\n\
                 server {{ listen 127.0.0.1:{FRONT_NGINX}; keepalive_requests 1000000;\n\
                 location / {{ proxy_pass https://next; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                 proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3; proxy_buffering off; }} }}"
            ),
        );
        let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
        // The floor under the mesh hop: its libraries alone, a half on each host (small
        // requests only, so only when they run and the path is asked for).
        let bare = (scenarios.contains(&"small") && wanted(BARE)).then(|| {
            peers::bare::start_raw_on(
                &pki,
                ([127, 0, 0, 1], BACKEND).into(),
                true,
                &peers::bare::Hosts { front_ns: &net.ns("a"), back_ns: &net.ns("b"), back_ip: ip_b },
            )
        });
        let paths: Vec<(&'static str, u16)> = mesh_paths
            .into_iter()
            .chain([("haproxy pair, HTTP/2 over TLS", FRONT_HAPROXY), ("nginx pair, HTTP/1.1 over TLS", FRONT_NGINX)])
            .filter(|(name, _)| wanted(name))
            .chain(bare.as_ref().map(|b| (BARE, b.front.port())))
            .collect();
        for (name, port) in &paths {
            listening(&net, "a", ([127, 0, 0, 1], *port).into(), name).await;
            let (status, _) = net.http_get_as("a", ([127, 0, 0, 1], *port).into(), "/small", "web").await;
            assert_eq!(status, 200, "{name} does not reach the backend");
        }
        let lua = d.join("wan.lua");
        std::fs::write(&lua, LUA).unwrap();

        let mut runs: Vec<Run> = Vec::new();
        for round in 1..=rounds {
            for &loss in &losses {
                let _fault = (loss > 0).then(|| {
                    let permille = loss * 10;
                    net.nft(
                        "a",
                        &format!(
                            "iifname \"eth0\" numgen random mod 1000 < {permille} drop\n\
                             oifname \"eth0\" numgen random mod 1000 < {permille} drop"
                        ),
                    )
                });
                for &scenario in &scenarios {
                    for &(path, port) in &paths {
                        // The bare hop reads each answer whole before passing it on: no bulk.
                        if scenario == "mixed" && path == BARE {
                            continue;
                        }
                        // The bulk download, through the same pair, for as long as wrk runs.
                        let bulk = (scenario == "mixed").then(|| {
                            in_host(
                                &net,
                                "a",
                                "curl",
                                &[
                                    "-s",
                                    "-o",
                                    "/dev/null",
                                    "-H",
                                    "Host: web",
                                    "--max-time",
                                    &(secs + 1).to_string(),
                                    "-w",
                                    "%{size_download} %{time_total}",
                                    &format!("http://127.0.0.1:{port}/bulk"),
                                ],
                            )
                            .stdout(Stdio::piped())
                            .stderr(Stdio::null())
                            .spawn()
                            .unwrap()
                        });
                        let figures = {
                            let (net_lua, p) = (lua.clone(), port);
                            let net = &net;
                            tokio::task::block_in_place(|| wrk(net, &net_lua, p, conns, secs))
                        };
                        if round == 1 && loss == losses[0] && port == FRONT_HAPROXY {
                            // The HBONE shape holds: one TCP connection carries the pair's traffic.
                            let ss = in_host(&net, "a", "ss", &["-Htn", "state", "established", "dst", &format!("{ip_b}:{BACK_HAPROXY}")])
                                .output()
                                .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
                                .unwrap_or(0);
                            eprintln!("haproxy pair: {ss} TCP connection(s) between the two after a {scenario} run");
                        }
                        let bulk_mbps = bulk.map(|c| {
                            let out = c.wait_with_output().unwrap();
                            let text = String::from_utf8_lossy(&out.stdout).into_owned();
                            let mut f = text.split_whitespace().filter_map(|v| v.parse::<f64>().ok());
                            let (bytes, t) = (f.next().unwrap_or(0.0), f.next().unwrap_or(1.0));
                            bytes / t.max(1e-3) / 1e6
                        });
                        let Some((rps, p50, p99, p999, requests, errors)) = figures else {
                            eprintln!("round {round} {loss}% {scenario} {path}: wrk gave no figures");
                            continue;
                        };
                        let run = Run {
                            loss,
                            scenario,
                            path,
                            round,
                            rps,
                            p50_us: p50,
                            p99_us: p99,
                            p999_us: p999,
                            requests,
                            errors,
                            bulk_mbps,
                        };
                        eprintln!(
                            "round {round} loss {loss}% {scenario:5} {path:32} {rps:>8.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  errors {errors}{}",
                            p50 / 1e3,
                            p99 / 1e3,
                            p999 / 1e3,
                            bulk_mbps.map_or(String::new(), |b| format!("  bulk {b:.0} MB/s"))
                        );
                        runs.push(run);
                    }
                }
            }
        }

        // What path-MTU discovery settled on, per mesh pair (node-a's connection to node-b).
        for (i, a) in _nodes.iter().skip(1).step_by(2).enumerate() {
            let (_, text) = net.http_get("a", a.addrs.admin, "/metrics").await;
            let size = metric(&text, "quicmesh_quic_datagram_size_bytes", &[("direction", "outbound")]);
            eprintln!("{}: datagrams of {size} bytes (link MTU {mtu})", mesh_variants[i]);
        }

        // Medians over rounds, one row per (scenario, loss, path).
        let mut groups: BTreeMap<(&str, u32, &str), Vec<&Run>> = BTreeMap::new();
        for r in &runs {
            groups.entry((r.scenario, r.loss, r.path)).or_default().push(r);
        }
        println!("\n`cargo bench --bench wan`: wrk -c{conns}, {rounds} rounds of {secs} s, medians over rounds\n");
        println!("| scenario | loss | path | req/s | p50 ms | p99 ms | p99.9 ms | errors | bulk MB/s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for ((scenario, loss, path), rs) in &groups {
            let m = |f: fn(&Run) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let bulk = rs.iter().filter_map(|r| r.bulk_mbps).collect::<Vec<_>>();
            println!(
                "| {scenario} | {loss}% | {path} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
                m(|r| r.rps),
                m(|r| r.p50_us) / 1e3,
                m(|r| r.p99_us) / 1e3,
                m(|r| r.p999_us) / 1e3,
                rs.iter().map(|r| r.errors).sum::<u64>(),
                if bulk.is_empty() { "-".into() } else { format!("{:.0}", median(bulk)) }
            );
        }
        let json = std::env::var("BENCH_JSON").unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-wan.json").display().to_string()
        });
        let doc = serde_json::json!({ "conns": conns, "secs": secs, "rounds": rounds, "runs": runs });
        std::fs::write(&json, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        eprintln!("every run: {json} (plot: python3 benches/plot_wan.py {json} wan.png)");
    });
}
