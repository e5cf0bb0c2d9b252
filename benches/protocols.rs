//! What each protocol costs per message through the mesh, against a plain HTTP request on the
//! same path: client -> node-a -> QUIC -> node-b -> backend, one connection, one message at a
//! time (closed loop), 64-byte payloads echoed back.
//!
//! - `HTTP/1.1 request`: a POST on a keep-alive connection, its body echoed;
//! - `WebSocket message`: a binary message on one open socket (tokio-tungstenite at both ends),
//!   echoed; the socket is one QUIC stream between the nodes;
//! - `gRPC unary call`: a whole call (one length-prefixed message, answer and `grpc-status`
//!   trailers) on one h2c connection;
//! - `gRPC stream message`: a message on one open bidirectional stream, echoed.
//!
//! Each runs direct (client to backend) and through the mesh in alternating rounds. Reported as
//! medians over rounds: microseconds per message, the two nodes' CPU per message (from /proc),
//! the latency the mesh adds, and ratios to the plain HTTP request through the mesh in the
//! same run (the machine is noisy: ratios, not absolutes).
//!
//! Run: `cargo bench --bench protocols` (env: BENCH_MESSAGES per round, default 3000;
//! BENCH_ROUNDS, default 5). JSON goes to `BENCH_JSON` (default `target/bench-protocols.json`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const PAYLOAD: usize = 64;

/// The WebSocket echo backend.
async fn ws_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_binary() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn tcp(to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A gRPC message: uncompressed, length-prefixed.
fn grpc_frame() -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(PAYLOAD as u32).to_be_bytes());
    v.extend(std::iter::repeat_n(7u8, PAYLOAD));
    Bytes::from(v)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http,
    WebSocket,
    GrpcUnary,
    GrpcStream,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Http, Kind::WebSocket, Kind::GrpcUnary, Kind::GrpcStream];

    fn name(self) -> &'static str {
        match self {
            Kind::Http => "HTTP/1.1 request",
            Kind::WebSocket => "WebSocket message",
            Kind::GrpcUnary => "gRPC unary call",
            Kind::GrpcStream => "gRPC stream message",
        }
    }
}

/// `n` messages of `kind` to `to` (naming the service by `host`), one at a time: the time they
/// took, once the connection (and socket or stream) is open.
async fn run(kind: Kind, to: SocketAddr, host: &str, n: usize) -> Duration {
    match kind {
        Kind::Http => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp(to).await)).await.unwrap();
            tokio::spawn(conn);
            let body = Bytes::from(vec![7u8; PAYLOAD]);
            let start = Instant::now();
            for _ in 0..n {
                let req = http::Request::post("/echo").header("host", host).body(Full::new(body.clone())).unwrap();
                send.ready().await.unwrap();
                let resp = send.send_request(req).await.unwrap();
                let got = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(got.len(), PAYLOAD);
            }
            start.elapsed()
        }
        Kind::WebSocket => {
            let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{host}/"), tcp(to).await).await.unwrap();
            let start = Instant::now();
            for _ in 0..n {
                ws.send(Message::Binary(vec![7u8; PAYLOAD])).await.unwrap();
                let got = ws.next().await.unwrap().unwrap();
                assert_eq!(got.len(), PAYLOAD);
            }
            let took = start.elapsed();
            let _ = ws.close(None).await;
            took
        }
        Kind::GrpcUnary | Kind::GrpcStream => {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp(to).await)).await.unwrap();
            tokio::spawn(conn);
            let call = |body| {
                http::Request::post(format!("http://{host}/bench.Echo/Echo"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap()
            };
            if let Kind::GrpcUnary = kind {
                let start = Instant::now();
                for _ in 0..n {
                    let body = Full::new(grpc_frame()).map_err(|never| match never {}).boxed_unsync();
                    send.ready().await.unwrap();
                    let resp = send.send_request(call(body)).await.unwrap();
                    let whole = resp.into_body().collect().await.unwrap();
                    let status = whole.trailers().and_then(|t| t.get("grpc-status")).cloned();
                    assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"0"[..]), "gRPC status via {to}");
                    assert_eq!(whole.to_bytes().len(), PAYLOAD + 5);
                }
                return start.elapsed();
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let resp = send.send_request(call(StreamBody::new(stream_of(rx)).boxed_unsync()));
            // The response head comes once the first message went through.
            tx.send(Ok(Frame::data(grpc_frame()))).await.unwrap();
            let mut body = resp.await.unwrap().into_body();
            let mut pending = 0usize;
            let read_one = async |body: &mut hyper::body::Incoming, pending: &mut usize| {
                while *pending < PAYLOAD + 5 {
                    let frame = body.frame().await.unwrap().unwrap();
                    *pending += frame.data_ref().map_or(0, |d| d.len());
                }
                *pending -= PAYLOAD + 5;
            };
            read_one(&mut body, &mut pending).await;
            let start = Instant::now();
            for _ in 0..n {
                tx.send(Ok(Frame::data(grpc_frame()))).await.unwrap();
                read_one(&mut body, &mut pending).await;
            }
            let took = start.elapsed();
            drop(tx);
            while let Some(Ok(_)) = body.frame().await {}
            took
        }
    }
}

fn main() {
    bench_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let n = env_or("BENCH_MESSAGES", 3000usize);
        let rounds = env_or("BENCH_ROUNDS", 5usize);
        let (http, ws) = (duplex_echo_backend().await, ws_backend().await);
        let pki = Pki::new();
        let state = pki.issue("node-a");
        pki.issue("node-b");
        let svc = format!(
            "[[services]]\nname = \"plain\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{http}\"\n\n\
             [[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{http}\"\n\n\
             [[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{ws}\"\n\n"
        );
        let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
        let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
        let pids = [a.child.id(), b.child.id()];
        let target = |kind: Kind, mesh: bool| -> (SocketAddr, &'static str) {
            let host = match kind {
                Kind::Http => "plain",
                Kind::WebSocket => "ws",
                _ => "grpc",
            };
            match (mesh, kind) {
                (true, _) => (a.addrs.outbound, host),
                (false, Kind::WebSocket) => (ws, host),
                (false, _) => (http, host),
            }
        };
        // Warm-up: every path once.
        for kind in Kind::ALL {
            for mesh in [false, true] {
                let (to, host) = target(kind, mesh);
                run(kind, to, host, 200).await;
            }
        }
        // [kind][direct, mesh] -> per-round (us per message, node CPU us per message).
        let mut samples = vec![[Vec::new(), Vec::new()]; Kind::ALL.len()];
        for r in 0..rounds {
            for (k, kind) in Kind::ALL.into_iter().enumerate() {
                for (m, mesh) in [false, true].into_iter().enumerate() {
                    let (to, host) = target(kind, mesh);
                    let cpu_before = cpu_of(&pids);
                    let took = run(kind, to, host, n).await;
                    let cpu = cpu_of(&pids).saturating_sub(cpu_before);
                    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
                    samples[k][m].push((per(took), per(cpu)));
                    eprintln!("round {r} {} {}: {:.1} us, nodes {:.1} us CPU per message", kind.name(), ["direct", "mesh"][m], per(took), per(cpu));
                }
            }
        }
        let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(pick).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let lat = |k: usize, m: usize| median(&samples[k][m], |s| s.0);
        let cpu = |k: usize| median(&samples[k][1], |s| s.1);
        println!("\n{n} messages of {PAYLOAD} bytes per round, one at a time on one connection, {rounds} alternating rounds, medians; ratios against the HTTP/1.1 request through the mesh");
        println!("| message | direct us | mesh us | mesh adds us | nodes' CPU us per message | latency vs HTTP | CPU vs HTTP |");
        println!("|---|---|---|---|---|---|---|");
        let mut report = serde_json::Map::new();
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            let (d, m) = (lat(k, 0), lat(k, 1));
            println!(
                "| {} | {d:.1} | {m:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                kind.name(),
                m - d,
                cpu(k),
                m / lat(0, 1),
                cpu(k) / cpu(0)
            );
            report.insert(
                kind.name().into(),
                serde_json::json!({ "direct_us": d, "mesh_us": m, "added_us": m - d, "node_cpu_us": cpu(k),
                                    "latency_vs_http": m / lat(0, 1), "cpu_vs_http": cpu(k) / cpu(0) }),
            );
        }
        let report = serde_json::json!({ "bench": "protocols", "messages": n, "rounds": rounds, "payload": PAYLOAD, "kinds": report });
        let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-protocols.json".into());
        if std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()).is_ok() {
            println!("JSON: {path}");
        }
    });
}
