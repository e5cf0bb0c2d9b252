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

/// Echo of text, binary, a 1 MiB message, ping/pong and a close with its code.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(ws: &mut Ws<S>, what: &str) {
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello".into()), "{what}: text");
    ws.send(Message::Binary(vec![0, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(vec![0, 1, 2, 255]), "{what}: binary");
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
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

    // Many at once, each its own QUIC stream between the nodes.
    let sockets = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sockets {
        let outbound = a.addrs.outbound;
        tasks.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
            let (mut ws, _) = tokio_tungstenite::client_async("ws://ws/many", tcp).await.unwrap();
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
