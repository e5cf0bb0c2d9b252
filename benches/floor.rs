//! Where a proxied request's latency and CPU go, one request at a time (no batching to hide
//! per-request costs), everything on loopback with mutual TLS where the mesh has it:
//!
//! - the transport alone: a request and its answer over HTTP/3 on quinn against HTTP/1.1 over
//!   TLS on TCP (hyper + tokio-rustls, the same mesh certificates) and over plain TCP;
//! - one proxy in front of the same backend: a minimal hyper proxy (server, then hyper's client
//!   on the least pool there is, `peers/pool.rs`) against one quicmesh node delivering locally
//!   (the node's whole request path without the QUIC leg), with each one's CPU per request;
//! - the bare hop (`peers/bare.rs`): the hop's libraries without the nodes' work, hyper ->
//!   HTTP/3 on quinn with mTLS -> hyper -> the backend, in two processes; then the same with
//!   headers the size of those a node adds, which shows what carrying them costs (mostly their
//!   QPACK coding);
//! - the mesh hop, node-a -> QUIC -> node-b -> the same backend, with both nodes' CPU, and the
//!   nginx and haproxy pairs (TLS between the two) of the load bench, when installed.
//!
//! Every endpoint and the minimal proxy run on a single-threaded runtime of their own thread (the
//! bare hop on one in each of its two processes), as a node does by default. Reported:
//! p50/p90/p99 per request and CPU microseconds per request (the minimal proxy's one thread; the
//! node's whole process, its few helper threads included), split into user space and kernel
//! time (from /proc, counted in 10 ms ticks: at the default 3000 requests, each figure is good
//! to about 3 us per request).
//!
//! Run: `cargo bench --bench floor` (env: BENCH_REQUESTS, default 3000; JSON goes to
//! `BENCH_JSON`, default `target/bench-floor.json`).

#[path = "../tests/support/mod.rs"]
mod support;

// Caddy (the HTTP/3 ingress baseline) is for the load bench only.
#[allow(dead_code)]
#[path = "peers/mod.rs"]
mod peers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use quicmesh_shared::identity::tls::ClientAuth;
use support::*;

struct Figures {
    name: &'static str,
    times: Vec<Duration>,
    /// Proxy CPU microseconds per request: user space, kernel.
    cpu_us: Option<(f64, f64)>,
}

/// `after - before` per request, in microseconds (user, kernel).
fn per_request(d: CpuSplit, requests: usize) -> (f64, f64) {
    let us = |t: Duration| t.as_secs_f64() * 1e6 / requests as f64;
    (us(d.user), us(d.kernel))
}

impl Figures {
    fn pct(&self, q: f64) -> Duration {
        self.times[((self.times.len() as f64 * q) as usize).min(self.times.len() - 1)]
    }
}

/// Paces one request at a time: 200 us between an answer and the next request.
const GAP: Duration = Duration::from_micros(200);
const WARMUP: usize = 200;

async fn ok(
    _req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// An HTTP/1.1 server answering "ok" on `lane`, over TLS when `tls` is given.
fn h1_server(lane: &Lane, tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    lane.handle.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(ok);
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(cfg) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    addr
}

/// `n` sequential HTTP/1.1 requests (after a warm-up) on one connection `io`, from `lane`.
async fn h1_sequence<I>(io: I, host: &'static str, n: usize) -> Vec<Duration>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let t = Instant::now();
        let req = http::Request::get("/").header("host", host).body(Empty::new()).unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.unwrap();
        if i >= WARMUP {
            times.push(t.elapsed());
        }
        tokio::time::sleep(GAP).await;
    }
    times
}

async fn plain_sequence(lane: &Lane, target: SocketAddr, host: &'static str, n: usize) -> Vec<Duration> {
    lane.handle
        .spawn(async move {
            let s = tokio::net::TcpStream::connect(target).await.unwrap();
            s.set_nodelay(true).unwrap();
            h1_sequence(s, host, n).await
        })
        .await
        .unwrap()
}

/// The nodes' allocator, for the bare hop's processes (and this one's lanes).
#[global_allocator]
static ALLOC: alloc::MiMalloc = alloc::MiMalloc;

#[path = "../src/alloc.rs"]
#[allow(unsafe_code)]
mod alloc;

fn main() {
    peers::bare::run_if_asked();
    bench_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let n = env_or("BENCH_REQUESTS", 3000usize);
        let pki = Pki::new();
        let state = pki.issue("node-a");
        let creds = |name: &str| credentials(pki.path(), name);
        let (server, client) = (Lane::new("server"), Lane::new("client"));
        let mut rows = Vec::new();

        // HTTP/3 on quinn, mesh mTLS and transport settings.
        let (quic_client, quic_server) = peers::bare::endpoints(&pki, (&client, "raw-a"), (&server, "raw-b"));
        let quic_addr = quic_server.local_addr().unwrap();
        server.handle.spawn(async move {
            while let Some(incoming) = quic_server.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok(mut h3) = h3::server::builder().build::<_, Bytes>(h3_quinn::Connection::new(conn)).await
                    else {
                        return;
                    };
                    while let Ok(Some(resolver)) = h3.accept().await {
                        tokio::spawn(async move {
                            let Ok((_req, mut stream)) = resolver.resolve_request().await else { return };
                            let resp = http::Response::builder().status(200).body(()).unwrap();
                            let _ = stream.send_response(resp).await;
                            let _ = stream.send_data(Bytes::from_static(b"ok")).await;
                            let _ = stream.finish().await;
                        });
                    }
                });
            }
        });
        let times = client
            .handle
            .spawn(async move {
                let conn = quic_client.connect(quic_addr, "raw-b").unwrap().await.unwrap();
                let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
                tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
                let mut times = Vec::with_capacity(n);
                for i in 0..n + WARMUP {
                    let t = Instant::now();
                    let mut s =
                        send.send_request(http::Request::get("https://raw-b/").body(()).unwrap()).await.unwrap();
                    s.finish().await.unwrap();
                    assert_eq!(s.recv_response().await.unwrap().status(), 200);
                    while let Some(mut d) = s.recv_data().await.unwrap() {
                        d.advance(d.remaining());
                    }
                    if i >= WARMUP {
                        times.push(t.elapsed());
                    }
                    tokio::time::sleep(GAP).await;
                }
                times
            })
            .await
            .unwrap();
        rows.push(Figures { name: "HTTP/3 on quinn, mTLS", times, cpu_us: None });

        // HTTP/1.1 over TLS on TCP with the same certificates.
        let tls_server =
            Arc::new(quicmesh_shared::identity::tls::mesh_server(&creds("raw-b"), ClientAuth::Required).unwrap());
        let tls_addr = h1_server(&server, Some(tls_server));
        let tls_client = Arc::new(quicmesh_shared::identity::tls::mesh_client(&creds("raw-a"), TD).unwrap());
        let times = client
            .handle
            .spawn(async move {
                let s = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("raw-b").unwrap();
                let s = tokio_rustls::TlsConnector::from(tls_client).connect(name, s).await.unwrap();
                h1_sequence(s, "raw-b", n).await
            })
            .await
            .unwrap();
        rows.push(Figures { name: "HTTP/1.1 over TLS on TCP, mTLS", times, cpu_us: None });

        // Plain TCP, straight to the backend the proxies below use.
        let backend = h1_server(&server, None);
        rows.push(Figures {
            name: "HTTP/1.1 on TCP (the backend, direct)",
            times: plain_sequence(&client, backend, "x", n).await,
            cpu_us: None,
        });

        // A minimal hyper proxy on its own lane.
        let proxy_lane = Lane::new("proxy");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let proxy = l.local_addr().unwrap();
        proxy_lane.handle.spawn(async move {
            let pool = peers::pool::Pool::<hyper::body::Incoming>::new(backend);
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let pool = pool.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let pool = pool.clone();
                        async move {
                            let Some((parts, body)) = pool.call(req).await else {
                                let mut failed = http::Response::new(Full::new(Bytes::new()));
                                *failed.status_mut() = http::StatusCode::BAD_GATEWAY;
                                return Ok::<_, std::convert::Infallible>(failed);
                            };
                            Ok(http::Response::from_parts(parts, Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        let c0 = proxy_lane.cpu_split();
        let times = plain_sequence(&client, proxy, "x", n).await;
        let cpu = per_request(proxy_lane.cpu_split() - c0, n + WARMUP);
        rows.push(Figures { name: "minimal hyper proxy -> backend", times, cpu_us: Some(cpu) });

        // The hop's libraries alone, as the mesh hop's floor (two processes); then the same
        // with headers the size of those a node adds, to show what carrying them costs.
        for (name, mesh_headers) in [
            ("bare hop: hyper -> h3/quinn -> hyper -> backend (libraries only)", false),
            ("bare hop, plus headers the size of the mesh's", true),
        ] {
            let bare = peers::bare::start(&pki, backend, mesh_headers);
            let c0 = cpu_split(&bare.pids());
            let times = plain_sequence(&client, bare.front, "hello", n).await;
            let cpu = per_request(cpu_split(&bare.pids()) - c0, n + WARMUP);
            rows.push(Figures { name, times, cpu_us: Some(cpu) });
        }
        // The same headers on the leanest framing a raw QUIC stream allows, instead of h3.
        let bare = peers::bare::start_raw(&pki, backend, true);
        let c0 = cpu_split(&bare.pids());
        let times = plain_sequence(&client, bare.front, "hello", n).await;
        let cpu = per_request(cpu_split(&bare.pids()) - c0, n + WARMUP);
        rows.push(Figures {
            name: "bare hop, mesh-sized headers, raw QUIC streams instead of h3",
            times,
            cpu_us: Some(cpu),
        });
        drop(bare);

        // One quicmesh node delivering to the same backend.
        let svc = format!(
            "[[services]]\nname = \"hello\"\n[[services.endpoints]]\nnode = \"node-a\"\naddress = \"{backend}\"\n"
        );
        let node = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[], &svc));
        let c0 = cpu_split(&[node.child.id()]);
        let times = plain_sequence(&client, node.addrs.outbound, "hello", n).await;
        let cpu = per_request(cpu_split(&[node.child.id()]) - c0, n + WARMUP);
        rows.push(Figures { name: "quicmesh node, local delivery -> backend", times, cpu_us: Some(cpu) });
        drop(node);

        // The mesh hop: node-a -> QUIC -> node-b -> the same backend. Against the row above, the
        // difference is the QUIC leg and the inbound node's work.
        pki.issue("node-b");
        let remote = svc.replace("node = \"node-a\"", "node = \"node-b\"");
        let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &remote));
        let a = NodeProc::start(
            pki.path(),
            "node-a",
            &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &remote),
        );
        let nodes = [a.child.id(), b.child.id()];
        let c0 = cpu_split(&nodes);
        let times = plain_sequence(&client, a.addrs.outbound, "hello", n).await;
        let cpu = per_request(cpu_split(&nodes) - c0, n + WARMUP);
        rows.push(Figures { name: "quicmesh mesh hop: node-a -> QUIC -> node-b -> backend", times, cpu_us: Some(cpu) });

        // The same shape from the peers, when installed: two proxies with TLS between them.
        let pairs = [
            ("nginx -> TLS -> nginx -> backend", peers::nginx(pki.path(), backend)),
            ("haproxy -> TLS -> haproxy -> backend", peers::haproxy(pki.path(), backend)),
        ];
        for (name, pair) in pairs {
            let Some(pair) = pair else { continue };
            let pids = pair.pids();
            let c0 = cpu_split(&pids);
            let times = plain_sequence(&client, pair.front, "hello", n).await;
            let cpu = per_request(cpu_split(&pids) - c0, n + WARMUP);
            rows.push(Figures { name, times, cpu_us: Some(cpu) });
        }

        println!("\none request at a time ({n}, {} us apart), loopback", GAP.as_micros());
        println!("| path | p50 | p90 | p99 | proxy CPU per request | of which user space / kernel |");
        println!("|---|---|---|---|---|---|");
        let mut json = Vec::new();
        for r in &mut rows {
            r.times.sort();
            let (cpu, split) = r.cpu_us.map_or(("-".to_string(), "-".to_string()), |(u, k)| {
                (format!("{:.1} us", u + k), format!("{u:.1} / {k:.1} us"))
            });
            println!(
                "| {} | {:.1?} | {:.1?} | {:.1?} | {cpu} | {split} |",
                r.name,
                r.pct(0.5),
                r.pct(0.9),
                r.pct(0.99)
            );
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            json.push(serde_json::json!({
                "path": r.name, "p50_us": us(r.pct(0.5)), "p90_us": us(r.pct(0.9)), "p99_us": us(r.pct(0.99)),
                "proxy_cpu_us_per_request": r.cpu_us.map(|(u, k)| u + k),
                "proxy_cpu_user_us_per_request": r.cpu_us.map(|(u, _)| u),
                "proxy_cpu_kernel_us_per_request": r.cpu_us.map(|(_, k)| k),
            }));
        }
        let report = serde_json::json!({ "bench": "floor", "requests": n, "paths": json });
        let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-floor.json".into());
        if std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()).is_ok() {
            println!("JSON: {path}");
        }
    });
}
