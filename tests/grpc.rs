//! gRPC through the mesh with a real gRPC implementation on both ends (grpcio, Debian's
//! python3-grpcio, driven by `tests/grpc_peer.py`): every call kind, status and trailers
//! (binary metadata too) across the HTTP/3 hop, trailers-only answers, deadlines longer than
//! `timeouts.request`, and the mesh's own errors answered as gRPC.

mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use support::*;

/// gRPC calls to `grpc` are retried on UNAVAILABLE (the methods are safe to repeat).
const RETRY: &str = "retry = { grpc_codes = [\"unavailable\"], non_idempotent = true }";

/// Debian's interpreter: python3-grpcio installs there (a `python3` earlier on PATH may be
/// another one).
const PYTHON: &str = "/usr/bin/python3";

fn grpcio_present() -> bool {
    let ok = Command::new(PYTHON).args(["-c", "import grpc"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("CI").is_err(), "python3-grpcio is required under CI=true but is not installed");
        eprintln!("SKIPPED: python3-grpcio is not installed (CI=true makes this a failure)");
    }
    ok
}

fn script() -> String {
    format!("{}/tests/grpc_peer.py", env!("CARGO_MANIFEST_DIR"))
}

/// The grpcio server, killed on drop.
struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_server() -> Server {
    grpc_server_named("a")
}

/// A grpcio server whose method `Who` answers `name`.
fn grpc_server_named(name: &str) -> Server {
    let mut child = Command::new(PYTHON)
        .args([script().as_str(), "server", name])
        .stdout(Stdio::piped())
        .spawn()
        .expect("grpcio server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().strip_prefix("port ").and_then(|p| p.parse().ok()).expect("the server's port");
    Server(child, port)
}

/// node-a and node-b, the service `grpc` (h2c) on node-b at `instance`: the pki and both
/// nodes (node-a first takes calls, on its outbound port).
fn two_nodes(instance: std::net::SocketAddr) -> (Pki, NodeProc, NodeProc) {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let svc = format!(
        "[[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{instance}\"\n\n"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
    (pki, b, a)
}

/// Calls the method whose server dies after three messages: {code, received}.
async fn grpc_crash(addr: std::net::SocketAddr, host: &str) -> serde_json::Value {
    grpc_run(&["crash", &addr.to_string(), host]).await
}

/// Runs the peer script with `args`; its one line of JSON.
async fn grpc_run(args: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.insert(0, script());
    let out = tokio::task::spawn_blocking(move || Command::new(PYTHON).args(&args).output().expect("grpcio client"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("client output {e}: {text}"))
}

/// Runs the client's cases against `addr` with `:authority` `host`: case -> result.
async fn grpc_client(addr: std::net::SocketAddr, host: &str) -> serde_json::Value {
    grpc_client_with(addr, host, None).await
}

/// [`grpc_client`], over TLS trusting `ca` when given.
async fn grpc_client_with(addr: std::net::SocketAddr, host: &str, ca: Option<&std::path::Path>) -> serde_json::Value {
    let mut args = vec![script(), "client".into(), addr.to_string(), host.to_string()];
    args.extend(ca.map(|c| c.display().to_string()));
    let out = tokio::task::spawn_blocking(move || Command::new(PYTHON).args(&args).output().expect("grpcio client"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("client output {e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_kind_keep_their_status_and_trailers_through_two_nodes() {
    if !grpcio_present() {
        return;
    }
    let server = grpc_server();
    let other = grpc_server_named("b");
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let dead = dead_address().await;
    let echo = echo_backend().await;
    let svc = format!(
        "[[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n{RETRY}\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[services]]\nname = \"gone\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{dead}\"\n\n\
         [[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"grpc-b\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{}\"\n\n",
        server.1, other.1
    );
    // GRPCRoute: one method of the service goes to the other server.
    let grpc_route = "[[grpc_routes]]\nname = \"who-to-b\"\nhostnames = [\"grpc\"]\n\
                      [[grpc_routes.rules]]\nmatches = [{ method = { service = \"quicmesh.test.Echo\", method = \"Who\" } }]\n\
                      backendRefs = [{ name = \"grpc-b\" }]\n";
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    // A request limit shorter than a call's own deadline: the deadline wins.
    let a_toml = node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &format!("{svc}{grpc_route}"))
        .replace("request = \"10s\"", "request = \"1s\"");
    let a = NodeProc::start(pki.path(), "node-a", &a_toml);

    let r = grpc_client(a.addrs.outbound, "grpc").await;
    check_cases(&r);
    assert_eq!(r["who"]["reply"], "b", "the GRPCRoute sent Who to the other server: {r}");
    // A gRPC error on HTTP 200 is a failure in the metrics, by its status.
    for (error, at_least) in [("grpc-not-found", 1.0), ("grpc-unimplemented", 1.0), ("grpc-unavailable", 1.0)] {
        eventually(std::time::Duration::from_secs(10), error, || async {
            let m = a.metrics().await;
            let n = metric(
                &m,
                "quicmesh_requests_total",
                &[("direction", "outbound"), ("service", "grpc"), ("error", error)],
            );
            (n >= at_least).then_some(())
        })
        .await;
    }
    let m = a.metrics().await;
    let ok = metric(&m, "quicmesh_requests_total", &[("direction", "outbound"), ("service", "grpc"), ("code", "200")]);
    let failed =
        ["grpc-not-found", "grpc-unimplemented", "grpc-unavailable", "grpc-deadline-exceeded", "grpc-cancelled"]
            .iter()
            .map(|e| {
                metric(&m, "quicmesh_requests_total", &[("direction", "outbound"), ("service", "grpc"), ("error", e)])
            })
            .sum::<f64>();
    // unary, the retried call, the long deadline and the three streams succeeded (Who went to
    // grpc-b).
    assert_eq!(ok - failed, 6.0, "the successful calls count as successes: {ok} answered 200, {failed} failed");

    // The mesh's own failures reach gRPC callers as gRPC statuses.
    let r = grpc_client(a.addrs.outbound, "gone").await;
    assert_eq!(r["unary"]["code"], "UNAVAILABLE", "{r}");
    assert!(r["unary"]["details"].as_str().unwrap_or_default().contains("upstream-unreachable"), "{r}");
    let r = grpc_client(a.addrs.outbound, "nowhere").await;
    assert_eq!(r["unary"]["code"], "UNIMPLEMENTED", "no route: {r}");

    // Each hop passes on what is left of the deadline: what the instance reads is at most what
    // the caller sent, in milliseconds.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{}/echo", a.addrs.outbound))
        .header("host", "echo")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "10S")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let left = seen["headers"]["grpc-timeout"].as_str().unwrap_or_default().to_string();
    let ms: u64 = left.strip_suffix('m').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{left:?}"));
    assert!((5_000..=10_000).contains(&ms), "the instance read grpc-timeout {left}");
    drop((server, other));
}

/// The same calls between members that speak HTTP/3 to each other (node-b prefers it, as a
/// member set to `transport.framing = "h3"` or of an earlier version does): trailers, binary
/// metadata and trailers-only answers cross h3's frames as they cross the lean framing's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_their_status_and_trailers_between_members_speaking_http3() {
    if !grpcio_present() {
        return;
    }
    let server = grpc_server();
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let svc = format!(
        "[[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n{RETRY}\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{}\"\n\n",
        server.1
    );
    let b_toml = with_framing(&node_toml("node-b", &state, &[], &svc), "h3");
    let b = NodeProc::start(pki.path(), "node-b", &b_toml);
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
    let r = grpc_client(a.addrs.outbound, "grpc").await;
    check_cases(&r);
    assert_eq!(a.framing_to("node-b").await, "h3");
    drop(server);
}

/// What the client's cases must have met, wherever the calls went through.
fn check_cases(r: &serde_json::Value) {
    let case = |name: &str| r[name].clone();
    assert_eq!(case("unary")["code"], "OK", "{r}");
    assert_eq!(case("unary")["reply"], "hi");
    assert_eq!(case("unary")["trailers"]["x-trail"], "t", "{r}");
    assert_eq!(case("unary")["trailers"]["x-trail-bin"], "0001", "{r}");
    // Trailers only: the status, its message and binary metadata, as the server sent them.
    assert_eq!(case("trailers_only")["code"], "NOT_FOUND", "{r}");
    assert_eq!(case("trailers_only")["details"], "no such thing", "{r}");
    assert_eq!(case("trailers_only")["trailers"]["x-why-bin"], "ff00", "{r}");
    assert_eq!(case("unimplemented")["code"], "UNIMPLEMENTED", "{r}");
    assert_eq!(case("server_error")["code"], "UNAVAILABLE", "{r}");
    assert_eq!(case("server_error")["details"], "try later", "{r}");
    assert_eq!(case("retried")["code"], "OK", "UNAVAILABLE twice, retried by the mesh: {r}");
    assert_eq!(case("retried")["reply"], "third time", "{r}");
    assert_eq!(case("long_deadline")["code"], "OK", "a 10 s deadline cut by the 1 s request limit: {r}");
    assert_eq!(case("short_deadline")["code"], "DEADLINE_EXCEEDED", "{r}");
    assert_eq!(case("server_stream")["reply"], 100, "{r}");
    assert_eq!(case("client_stream")["reply"], "10000", "{r}");
    assert_eq!(case("bidi")["reply"], true, "{r}");
}

/// gRPC at the edge: grpcio over TLS (HTTP/2) to the gateway, through the mesh to grpcio's
/// server, with the same cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_their_status_and_trailers_through_the_gateway() {
    if !grpcio_present() {
        return;
    }
    let server = grpc_server();
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let (_, cert) = self_signed_server(pki.path(), "edge", &["grpc.test"]);
    let svc = format!(
        "[[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n{RETRY}\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{}\"\n\n",
        server.1
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[timeouts]\nconnect = \"2s\"\nrequest = \"1s\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\n\
         admin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\ncertificates = [{{ cert = \"edge-cert.pem\", key = \"edge-key.pem\" }}]\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n[[gateway.routes]]\nname = \"grpc\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"grpc\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let r = grpc_client_with(gw.addrs.listen, "grpc.test", Some(&cert)).await;
    check_cases(&r);

    // gRPC over HTTP/3 at the edge (the h3 crate's client; no gRPC library speaks HTTP/3 here):
    // messages, trailers with binary metadata, a trailers-only answer, a server stream.
    let (_ep, mut send) = h3_connect(gw.addrs.listen.port()).await;
    let (head, data, trailers) = grpc_over_h3(&mut send, "Echo", &[b"hi"]).await;
    assert_eq!(head.get("content-type").unwrap(), "application/grpc");
    assert_eq!(data, grpc_frames(&[b"hi"]), "h3: the reply message");
    let trailers = trailers.expect("h3: trailers after the message");
    assert_eq!((&trailers["grpc-status"], &trailers["x-trail"]), (&"0".parse().unwrap(), &"t".parse().unwrap()));
    assert_eq!(trailers["x-trail-bin"], "AAE", "h3: binary metadata (base64 of 00 01)");
    let (head, data, trailers) = grpc_over_h3(&mut send, "Fail", &[b""]).await;
    assert_eq!(head["grpc-status"], "5", "h3: a trailers-only answer's status in its headers");
    assert_eq!(head["grpc-message"], "no such thing");
    assert_eq!(head["x-why-bin"], "/wA", "h3: binary metadata of a trailers-only answer");
    assert!(data.is_empty() && trailers.is_none(), "h3: nothing after a trailers-only answer");
    let (_, data, trailers) = grpc_over_h3(&mut send, "ServerStream", &[b"100"]).await;
    let expected: Vec<Vec<u8>> = (0..100).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(data, grpc_frames(&expected.iter().map(Vec::as_slice).collect::<Vec<_>>()), "h3: 100 messages");
    assert_eq!(trailers.expect("h3: the stream's trailers")["grpc-status"], "0");
    drop(server);
}

/// Length-prefixed gRPC messages, uncompressed.
fn grpc_frames(messages: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.push(0);
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// One gRPC call over HTTP/3 to `method` of the test service: (headers, body, trailers).
async fn grpc_over_h3(
    send: &mut H3Sender,
    method: &str,
    messages: &[&[u8]],
) -> (http::HeaderMap, Vec<u8>, Option<http::HeaderMap>) {
    use bytes::Buf;
    let req = http::Request::post(format!("https://grpc.test/quicmesh.test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.send_data(bytes::Bytes::from(grpc_frames(messages))).await.unwrap();
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    assert_eq!(resp.status(), 200, "{method} over h3");
    let mut data = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        data.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let trailers = stream.recv_trailers().await.unwrap();
    (resp.headers().clone(), data, trailers)
}

/// A server that dies in the middle of a stream: a direct call ends UNAVAILABLE (the
/// connection is gone), and so must a call through two nodes, not INTERNAL (a reset the
/// proxies made of it), with the messages sent before the death delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_stream_is_unavailable_through_the_mesh_as_directly() {
    if !grpcio_present() {
        return;
    }
    let direct = grpc_server();
    let r = grpc_crash(([127, 0, 0, 1], direct.1).into(), "grpc").await;
    assert_eq!((r["code"].as_str(), r["received"].as_u64()), (Some("UNAVAILABLE"), Some(3)), "direct: {r}");

    let server = grpc_server();
    let (_pki, _b, a) = two_nodes(([127, 0, 0, 1], server.1).into());
    let r = grpc_crash(a.addrs.outbound, "grpc").await;
    assert_eq!((r["code"].as_str(), r["received"].as_u64()), (Some("UNAVAILABLE"), Some(3)), "through two nodes: {r}");
    // And it is a failure, by the reason the stream broke.
    let m = a.metrics().await;
    let broken = metric(
        &m,
        "quicmesh_requests_total",
        &[("direction", "outbound"), ("service", "grpc"), ("error", "upstream-reset")],
    );
    assert_eq!(broken, 1.0, "the broken stream counted as upstream-reset");
}

/// 10 000 messages of 8 KiB on one server stream to a client reading at 16 MiB/s, slower than
/// the server writes: flow control holds the server back, so neither node buffers more than its
/// windows (QUIC: 4 MiB per stream; HTTP/2 to the instance and to the client), however much the
/// stream carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_grpc_receiver_costs_the_nodes_no_more_than_their_windows() {
    if !grpcio_present() {
        return;
    }
    // The windows, plus the runtime's own growth (as tests/hostile.rs bounds a slow download).
    const BOUND_MIB: u64 = 28;
    let server = grpc_server();
    let (_pki, b, a) = two_nodes(([127, 0, 0, 1], server.1).into());
    let to = a.addrs.outbound.to_string();
    // Warm up the path, then measure.
    let warm = grpc_run(&["slow", &to, "grpc", "100", "8192", "1000000000"]).await;
    assert_eq!(warm["received"], 100, "warm-up: {warm}");
    let (a_before, b_before) = (a.rss_kib(), b.rss_kib());
    let r = grpc_run(&["slow", &to, "grpc", "10000", "8192", &(16u64 << 20).to_string()]).await;
    assert_eq!((r["code"].as_str(), r["received"].as_u64()), (Some("OK"), Some(10_000)), "{r}");
    let (a_peak, b_peak) = (a.peak_rss_kib(), b.peak_rss_kib());
    eprintln!(
        "slow gRPC receiver, 78 MiB in 10 000 messages: node-a {} -> peak {} MiB, node-b {} -> peak {} MiB",
        a_before >> 10,
        a_peak >> 10,
        b_before >> 10,
        b_peak >> 10
    );
    assert!(a_peak.saturating_sub(a_before) >> 10 <= BOUND_MIB, "node-a grew to {} MiB", a_peak >> 10);
    assert!(b_peak.saturating_sub(b_before) >> 10 <= BOUND_MIB, "node-b grew to {} MiB", b_peak >> 10);
}

/// 100 000 tiny messages each way on one bidi stream, and 100 000 on a client stream, from grpcio
/// through node-a to node-b: one HTTP/2 DATA frame per message, every one arrives and the
/// client's connection stays up. (h2 >= 0.4.16 closes a connection whose small DATA frames pile
/// up unread with GOAWAY ENHANCE_YOUR_CALM; a node that reads one frame per turn falls behind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_tiny_messages_keep_their_connection() {
    if !grpcio_present() {
        return;
    }
    let server = grpc_server();
    let (_pki, _b, a) = two_nodes(([127, 0, 0, 1], server.1).into());
    let r = grpc_run(&["tiny", &a.addrs.outbound.to_string(), "grpc", "100000"]).await;
    assert_eq!(r["bidi"]["code"], "OK", "{r}");
    assert_eq!((r["bidi"]["echoed"].as_u64(), r["bidi"]["in_order"].as_bool()), (Some(100_000), Some(true)), "{r}");
    assert_eq!((r["sum"]["code"].as_str(), r["sum"]["reply"].as_str()), (Some("OK"), Some("100000")), "{r}");
}

/// A long bidirectional stream through node-a to node-b goes on, every message echoed in order,
/// while node-a's other peer, node-c, drains and exits under traffic of its own and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_bidi_stream_outlives_a_drain_elsewhere() {
    if !grpcio_present() {
        return;
    }
    let server = grpc_server();
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    pki.issue("node-c");
    let echo = echo_backend().await;
    let on_b = format!(
        "[[services]]\nname = \"grpc\"\nprotocol = \"h2c\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"127.0.0.1:{}\"\n\n",
        server.1
    );
    let on_c =
        format!("[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-c\"\naddress = \"{echo}\"\n\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &on_b));
    let mut c = NodeProc::start(pki.path(), "node-c", &node_toml("node-c", &state, &[], &on_c));
    let peers = [("node-b", b.addrs.inbound), ("node-c", c.addrs.inbound)];
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &peers, &format!("{on_b}{on_c}")));
    let to = a.addrs.outbound.to_string();
    let chat = tokio::spawn(async move { grpc_run(&["chat", &to, "grpc", "4"]).await });
    // node-c carries traffic of its own, then drains and exits while the stream goes on.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let via_c = || {
        let req = http::Request::get(format!("http://{}/", a.addrs.outbound)).header("host", "echo");
        client.request(req.body(http_body_util::Empty::new()).unwrap())
    };
    assert_eq!(via_c().await.unwrap().status(), 200);
    // The stream is open through node-a before node-c goes.
    eventually(std::time::Duration::from_secs(10), "the stream in flight", || async {
        let m = a.metrics().await;
        let open = metric(&m, "quicmesh_requests_in_flight", &[("direction", "outbound"), ("service", "grpc")]);
        (open >= 1.0).then_some(())
    })
    .await;
    tokio::task::spawn_blocking(move || {
        c.terminate();
        c
    })
    .await
    .unwrap();
    let r = chat.await.unwrap();
    assert_eq!(r["code"], "OK", "the stream through node-b: {r}");
    assert!(r["sent"].as_u64().unwrap_or(0) >= 40, "{r}");
    assert_eq!((&r["echoed"], &r["in_order"]), (&r["sent"], &serde_json::Value::Bool(true)), "{r}");
}

/// Many unary gRPC calls in a row on one HTTP/2 connection through two nodes to a server that
/// echoes each message as it arrives (full duplex: its answer starts before the request ends):
/// every call ends with its trailers, none cut or reset. The protocols bench met calls ending
/// without trailers, or with `upstream-reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_unary_calls_all_end_with_their_trailers() {
    use http_body_util::BodyExt;
    let backend = duplex_echo_backend().await;
    let (_pki, _b, a) = two_nodes(backend);
    let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let message = bytes::Bytes::from(grpc_frames(&[&[7u8; 64]]));
    let mut broken = Vec::new();
    let calls = env_or("GRPC_DUPLEX_CALLS", 500usize);
    for i in 0..calls {
        let req = http::Request::post("http://grpc/bench.Echo/Echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(message.clone()))
            .unwrap();
        send.ready().await.unwrap();
        let whole = send.send_request(req).await.unwrap().into_body().collect().await.unwrap();
        let status = whole.trailers().and_then(|t| t.get("grpc-status")).cloned();
        if status.as_ref().map(|s| s.as_bytes()) != Some(b"0") || whole.to_bytes() != message {
            broken.push((i, status));
        }
    }
    assert!(broken.is_empty(), "{} of {calls} calls broke: {:?}", broken.len(), &broken[..broken.len().min(10)]);
}
