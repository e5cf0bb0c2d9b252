//! WebSocket through the mesh with a client and server nobody here wrote (tokio-tungstenite):
//! an HTTP/1.1 upgrade from a local app to its node, carried node to node as one QUIC stream,
//! delivered to the instance as an HTTP/1.1 upgrade; and the same from an external client
//! through the gateway (HTTP/1.1 over TLS).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server: text and binary echoed, pings answered, closes returned; the
/// handshake to `/forbidden` is refused with 403.
async fn ws_echo() -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The library's callback type: its error is a whole response.
                #[allow(clippy::result_large_err)]
                let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                    if req.uri().path() == "/forbidden" {
                        let mut refusal = ErrorResponse::new(Some("not here".into()));
                        *refusal.status_mut() = http::StatusCode::FORBIDDEN;
                        return Err(refusal);
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else { return };
                // Pings are answered by the library; a close is echoed by it too.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Ws<S> = tokio_tungstenite::WebSocketStream<S>;

/// Raises this process's soft limit on open files to `want` (or the hard limit, if lower).
fn raise_open_files(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Echo of text, binary, a 1 MiB message, ping/pong and a close with its code.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(ws: &mut Ws<S>, what: &str) {
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello".into()), "{what}: text");
    ws.send(Message::Binary(vec![0, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(vec![0, 1, 2, 255]), "{what}: binary");
    let big = patterned(1 << 20);
    ws.send(Message::Binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(big), "{what}: 1 MiB");
    ws.send(Message::Ping(b"are you there".to_vec())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong(b"are you there".to_vec()), "{what}: ping");
    let close = CloseFrame { code: CloseCode::Away, reason: "bye".into() };
    ws.send(Message::Close(Some(close))).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away, "{what}: close code"),
        other => panic!("{what}: the close came back as {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_go_through_two_nodes_and_the_gateway() {
    // 1000 sockets: two descriptors each in this process (client and echo server), one in each
    // node, which inherit the limit.
    raise_open_files(8192);
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    pki.issue("gateway");
    let echo = ws_echo().await;
    let svc = format!(
        "[[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[authorization.policies]]\nservice = \"ws\"\n[[authorization.policies.rules]]\naction = \"deny\"\npaths = [\"/admin*\"]\n\n"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));

    // Through two nodes.
    let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws/chat", tcp).await.expect("upgraded through the mesh");
    assert_eq!(resp.status(), 101);
    exchange(&mut ws, "mesh").await;

    // The instance's refusal reaches the client as it is.
    let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
    match tokio_tungstenite::client_async("ws://ws/forbidden", tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a refused handshake: {:?}", other.map(|(_, r)| r.status())),
    }

    // Authorization sees the upgrade as the request it is (denied by path at the instance's node).
    let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
    match tokio_tungstenite::client_async("ws://ws/admin/console", tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["quicmesh-error"], "denied");
        }
        other => panic!("a denied upgrade: {:?}", other.map(|(_, r)| r.status())),
    }

    // Many at once, each its own QUIC stream between the nodes: 1000 sockets, open together.
    let sockets = 1000;
    let gate = Arc::new(tokio::sync::Barrier::new(sockets));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sockets {
        let (outbound, gate) = (a.addrs.outbound, gate.clone());
        tasks.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
            let (mut ws, _) = tokio_tungstenite::client_async("ws://ws/many", tcp).await.unwrap();
            // Every socket is open before any says a word.
            gate.wait().await;
            for n in 0..5 {
                let text = format!("socket {i} message {n}");
                ws.send(Message::Text(text.clone())).await.unwrap();
                assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(text));
            }
            ws.close(None).await.unwrap();
        });
    }
    while let Some(done) = tokio::time::timeout(Duration::from_secs(60), tasks.join_next()).await.expect("in time") {
        done.unwrap();
    }
    let m = a.metrics().await;
    let opened =
        metric(&m, "quicmesh_requests_total", &[("direction", "outbound"), ("service", "ws"), ("code", "101")]);
    assert!(opened >= (sockets + 1) as f64, "upgrades counted as 101: {opened}");

    // Through the gateway: HTTP/1.1 over TLS, upgraded, into the mesh.
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n[[gateway.routes]]\nname = \"ws\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"ws\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(gw.addrs.listen).await.unwrap();
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async("wss://localhost/edge", tls).await.expect("upgraded through the gateway");
    assert_eq!(resp.status(), 101);
    exchange(&mut ws, "edge").await;
}

/// A drain lets an open WebSocket go on until `drain_timeout`, then the node exits and the
/// socket ends: no new upgrades meanwhile, none cut at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_keeps_websockets_until_its_deadline() {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let echo = ws_echo().await;
    let svc =
        format!("[[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a_toml = node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc)
        .replace("[node.tls]", "drain_timeout = \"3s\"\n\n[node.tls]");
    let a = NodeProc::start(pki.path(), "node-a", &a_toml);
    let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws/long", tcp).await.unwrap();
    ws.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("before".into()));
    let started = std::time::Instant::now();
    a.signal("TERM");
    a.log_with(&["draining"]).await;
    ws.send(Message::Text("during the drain".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("during the drain".into()));
    // Then the deadline: the socket ends with the process.
    let ended =
        tokio::time::timeout(Duration::from_secs(20), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(ended.is_ok(), "the socket outlived the drain");
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(2500), "cut {lasted:?} into a 3 s drain");
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A WebSocket over HTTP/2 (RFC 8441) with hyper's client: an extended CONNECT answered 200,
/// then the stream is the socket. The connection's sender comes back too, for more streams.
async fn ws_over_h2(addr: SocketAddr, path: &str) -> (H2Sender, Ws<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"h2"])));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    // The server's SETTINGS (which allow extended CONNECT) come with the first exchange.
    let ping = http::Request::get("https://localhost/").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    send.send_request(ping).await.unwrap();
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost{path}"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = send.send_request(req).await.expect("extended CONNECT over HTTP/2");
    assert_eq!(resp.status(), 200, "HTTP/2 WebSocket answer");
    assert!(!resp.headers().contains_key("sec-websocket-accept"), "an HTTP/1.1 handshake header over HTTP/2");
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
    (send, tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), role, None).await)
}

/// A WebSocket over HTTP/3 (RFC 9220) with the h3 crate's client: an extended CONNECT answered
/// 200, then the request stream is the socket (joined to the WebSocket library by a pipe).
/// The endpoint and request sender come back with the socket: h3 closes a connection whose last
/// sender is dropped.
async fn ws_over_h3(port: u16, path: &str) -> ((quinn::Endpoint, H3Sender), Ws<tokio::io::DuplexStream>) {
    use bytes::Buf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ep, mut send) = h3_connect(port).await;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost:{port}{path}"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut().insert(h3::ext::Protocol::WEBSOCKET);
    let mut stream = send.send_request(req).await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    assert_eq!(resp.status(), 200, "HTTP/3 WebSocket answer");
    let (mut tx, mut rx) = stream.split();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send_data(bytes::Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.finish().await;
    });
    tokio::spawn(async move {
        while let Ok(Some(mut chunk)) = rx.recv_data().await {
            if wr.write_all(&chunk.copy_to_bytes(chunk.remaining())).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
    ((ep, send), tokio_tungstenite::WebSocketStream::from_raw_socket(ours, role, None).await)
}

/// The gateway takes WebSockets over HTTP/2 and HTTP/3 as well as HTTP/1.1, and the instance
/// behind two hops sees the HTTP/1.1 upgrade it knows. An HTTP/2 socket in use keeps its
/// connection from the edge's idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_at_the_edge_over_h2_and_h3() {
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let echo = ws_echo().await;
    let svc =
        format!("[[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.limits]\nidle_timeout = \"2s\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n[[gateway.routes]]\nname = \"ws\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"ws\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);

    let (mut h2, mut ws) = ws_over_h2(gw.addrs.listen, "/over-h2").await;
    // In use past the edge's 2 s idle timeout: the connection is not idle (no GOAWAY, so it
    // still takes new streams).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        ws.send(Message::Text("still here".into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("still here".into()), "h2: kept open");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let more = http::Request::get("https://localhost/more").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    h2.send_request(more).await.expect("a new stream on the connection carrying a socket");
    exchange(&mut ws, "h2").await;

    let (_ep, mut ws) = ws_over_h3(gw.addrs.listen.port(), "/over-h3").await;
    exchange(&mut ws, "h3").await;

    // The instance's refusal, over both.
    let (_ep, mut send) = h3_connect(gw.addrs.listen.port()).await;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost:{}/forbidden", gw.addrs.listen.port()))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut().insert(h3::ext::Protocol::WEBSOCKET);
    let mut stream = send.send_request(req).await.unwrap();
    assert_eq!(stream.recv_response().await.unwrap().status(), 403, "h3: refused by the instance");

    let m = gw.metrics().await;
    let opened = metric(&m, "quicmesh_requests_total", &[("direction", "ingress"), ("service", "ws"), ("code", "200")]);
    assert!(opened >= 2.0, "switches over h2 and h3 counted as 200: {opened}");
}

/// A route's `timeouts.upgradeIdle` closes a socket that carries nothing, and
/// `timeouts.upgradeLifetime` one that is busy; both ends see the connection end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_keep_their_routes_limits() {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let echo = ws_echo().await;
    let svc = format!(
        "[[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[routes]]\nname = \"ws\"\nhostnames = [\"ws\"]\n[[routes.rules]]\nbackendRefs = [{{ name = \"ws\" }}]\n\
         timeouts = {{ upgradeIdle = \"1s\", upgradeLifetime = \"4s\" }}\n"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
    let open = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
        tokio_tungstenite::client_async(format!("ws://ws{path}"), tcp).await.unwrap().0
    };

    // Idle: one message, then nothing; closed about a second later, well before the lifetime.
    let mut quiet = open("/quiet").await;
    quiet.send(Message::Text("once".into())).await.unwrap();
    assert_eq!(quiet.next().await.unwrap().unwrap(), Message::Text("once".into()));
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), async { while let Some(Ok(_)) = quiet.next().await {} })
        .await
        .expect("an idle socket closed");
    assert!(started.elapsed() >= Duration::from_millis(800), "closed after {:?} of 1 s idle", started.elapsed());

    // Busy: a message every 200 ms outlives the idle limit, then the lifetime ends it.
    let mut busy = open("/busy").await;
    let started = std::time::Instant::now();
    let mut echoed = 0;
    let lasted = loop {
        if busy.send(Message::Text("tick".into())).await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(2), busy.next()).await.expect("an answer or the end") {
            Some(Ok(Message::Text(t))) if t == "tick" => echoed += 1,
            _ => break started.elapsed(),
        }
        assert!(started.elapsed() < Duration::from_secs(8), "the lifetime did not end a busy socket");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(lasted >= Duration::from_millis(3500), "a busy socket ended after {lasted:?} of its 4 s life");
    assert!(echoed >= 10, "a busy socket carried {echoed} messages");
}

/// WebSockets that take every stream the connection to a node allows make another request to
/// that node wait for a stream no longer than its try's time, and then it is answered 503
/// `overloaded`; before, it waited for ever (no timer of the try had started), and so did every
/// request to that node after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_stream_no_longer_than_its_try() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let (echo, web) = (ws_echo().await, echo_backend().await);
    let svc = format!(
        "[[services]]\nname = \"ws\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{web}\"\n\n"
    );
    let b_toml =
        node_toml("node-b", &state, &[], &svc).replace("[transport]\n", "[transport]\nmax_concurrent_streams = 4\n");
    let b = NodeProc::start(pki.path(), "node-b", &b_toml);
    let a_toml = node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc)
        .replace("request = \"10s\"", "request = \"2s\"");
    let a = NodeProc::start(pki.path(), "node-a", &a_toml);
    let get_web = async || {
        let mut tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get_web().await.starts_with("HTTP/1.1 200"));
    let mut held = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
        let (ws, resp) = tokio_tungstenite::client_async("ws://ws/chat", tcp).await.expect("upgraded");
        assert_eq!(resp.status(), 101);
        held.push(ws);
    }
    let answer = tokio::time::timeout(Duration::from_secs(20), get_web()).await.expect("the request waited for ever");
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("overloaded"), "{answer}");
    let m = a.metrics().await;
    assert!(
        metric(&m, "quicmesh_circuit_breaker_rejections_total", &[("service", "web"), ("limit", "peer_streams")])
            >= 1.0,
        "{m}"
    );
    // A stream free again: served.
    drop(held);
    eventually(Duration::from_secs(10), "web served again", || async {
        get_web().await.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}
