//! End-to-end tests of the edge gateway and the demo: the real binary's `demo` on free ports,
//! driven by curl, ngtcp2's HTTP/3 client, and Rust clients (h3 over quinn, raw TLS).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_http2_with_tls_into_the_mesh_and_back() {
    if !require_tool("curl") {
        return;
    }
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (ok, out) = curl(&["-k", flag, "-w", "\n%{http_code} %{http_version}", &demo.url("/hello")]);
        assert!(ok, "{out}");
        assert!(out.starts_with("hello from v"), "{out}");
        assert!(out.ends_with(&format!("200 {version}")), "{out}");
        let (ok, out) = curl(&["-k", flag, "-i", "-H", "x-request-id: rid-1", "-d", "ping", &demo.url("/echo?x=1")]);
        assert!(ok, "{out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.to_ascii_lowercase().contains(&format!("alt-svc: h3=\":{}\"", demo.port)), "{head}");
        let doc = json(body);
        assert_eq!(doc["method"], "POST");
        assert_eq!(doc["path"], "/echo?x=1");
        assert_eq!(doc["body"], "ping");
        assert_eq!(doc["headers"]["x-request-id"], "rid-1");
        assert_eq!(doc["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(doc["headers"]["x-forwarded-proto"], "https");
        assert_eq!(
            doc["headers"]["forwarded"],
            format!("for=\"127.0.0.1\";proto=https;host=\"127.0.0.1:{}\"", demo.port)
        );
    }
    let (ok, out) = curl(&["-k", "-i", &demo.url("/nowhere")]);
    assert!(ok);
    assert!(out.starts_with("HTTP/1.1 404") || out.starts_with("HTTP/2 404"), "{out}");
    assert!(out.contains("quicmesh-error: no-route"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_from_a_rust_h3_client() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let (_ep, mut send) = h3_connect(demo.port).await;
    let req = http::Request::post(demo.url("/echo/h3")).header("x-request-id", "h3-id").body(()).unwrap();
    let (status, _, body) = h3_request(&mut send, req, b"over quic").await;
    assert_eq!(status, 200);
    let doc = json(&String::from_utf8_lossy(&body));
    assert_eq!(doc["path"], "/echo/h3");
    assert_eq!(doc["body"], "over quic");
    assert_eq!(doc["headers"]["x-request-id"], "h3-id");
    assert_eq!(doc["headers"]["x-forwarded-proto"], "https");
    let (status, headers, _) =
        h3_request(&mut send, http::Request::get(demo.url("/missing")).body(()).unwrap(), b"").await;
    assert_eq!(status, 404);
    assert_eq!(headers["quicmesh-error"], "no-route");
    let m = demo.metrics().await;
    assert!(metric(&m, "quicmesh_requests_total", &[("direction", "ingress"), ("protocol", "h3")]) >= 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_from_ngtcp2_an_independent_implementation() {
    if !require_tool("gtlsclient") {
        return;
    }
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let dl = tempfile::tempdir().unwrap();
    let port = demo.port.to_string();
    let out = std::process::Command::new("gtlsclient")
        .args(["-q", "--exit-on-all-streams-close", "--timeout=10s"])
        .arg(format!("--download={}", dl.path().display()))
        .args(["127.0.0.1", &port, &demo.url("/hello"), &demo.url("/echo")])
        .output()
        .unwrap();
    assert!(out.status.success(), "gtlsclient failed: {}", String::from_utf8_lossy(&out.stderr));
    let hello = std::fs::read_to_string(dl.path().join("hello")).unwrap();
    assert!(hello.starts_with("hello from v"), "{hello}");
    let echo = json(&std::fs::read_to_string(dl.path().join("echo")).unwrap());
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["headers"]["user-agent"], "nghttp3/ngtcp2 client");
}

/// 1000 requests to /hello over HTTP/3: v2 should answer 10%. Binomial(1000, 0.1) has mean 100
/// and sd 9.5; the test accepts 100 +/- 48 (5 sd), a false failure once in ~1.7 million runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_splits_hello_90_10_between_v1_and_v2() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let (_ep, send) = h3_connect(demo.port).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut send = send.clone();
        let url = demo.url("/hello");
        set.spawn(async move { h3_request(&mut send, http::Request::get(url).body(()).unwrap(), b"").await });
    }
    let (mut v1, mut v2) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (status, _, body) = r.unwrap();
        assert_eq!(status, 200);
        match String::from_utf8_lossy(&body).as_ref() {
            "hello from v1 on node-a\n" => v1 += 1,
            "hello from v2 on node-b\n" => v2 += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    assert_eq!(v1 + v2, 1000);
    assert!((52..=148).contains(&v2), "v2 answered {v2} of 1000 (expected 100 +/- 48)");
}

/// #20: the demo's nodes are real members of its control plane (so `quicmesh status` shows
/// them) and each component serves its own metrics (so a request is counted once, where it
/// entered, not once per component).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_nodes_join_its_control_plane_and_count_each_request_once() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let out = std::process::Command::new(bin()).args(["status", "--admin", &demo.admin.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for node in ["node-a", "node-b"] {
        let line = text.lines().find(|l| l.starts_with(node)).unwrap_or_else(|| panic!("{node} missing:\n{text}"));
        assert!(line.contains(" yes ") && line.contains("current"), "{line}");
    }
    let ingress = |m: &str| metric(m, "quicmesh_requests_total", &[("direction", "ingress")]);
    let before = ingress(&demo.metrics().await);
    let (_ep, mut send) = h3_connect(demo.port).await;
    for _ in 0..20 {
        let (status, _, _) = h3_request(&mut send, http::Request::get(demo.url("/hello")).body(()).unwrap(), b"").await;
        assert_eq!(status, 200);
    }
    // Summed over the gateway and both nodes, as `quicmesh top` does.
    assert_eq!(ingress(&demo.metrics().await) - before, 20.0);
    let inbound = metric(&demo.metrics().await, "quicmesh_requests_total", &[("direction", "inbound")]);
    assert!(inbound >= 20.0, "the nodes count what they delivered, in their own registries");
    assert_eq!(metric(&demo.gateway_metrics().await, "quicmesh_requests_total", &[("direction", "inbound")]), 0.0);
}

async fn tls_connect(port: u16, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(alpn)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
}

async fn read_head(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("response").unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let mut s = tls_connect(demo.port, &[b"http/1.1"]).await;
    let big = "a".repeat(70 * 1024);
    s.write_all(format!("GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431"));
    let mut s = tls_connect(demo.port, &[b"http/1.1"]).await;
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    s.write_all(format!("GET /hello HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431"));
    // HTTP/3 with an oversized header section is refused too, and the connection stays usable.
    let (_ep, mut send) = h3_connect(demo.port).await;
    let req = http::Request::get(demo.url("/hello")).header("x-big", big.as_str()).body(()).unwrap();
    let refused = match send.send_request(req).await {
        Err(_) => true,
        Ok(mut stream) => {
            let _ = stream.finish().await;
            match stream.recv_response().await {
                Ok(resp) => resp.status() == 431,
                Err(_) => true,
            }
        }
    };
    assert!(refused, "an oversized HTTP/3 header section was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_cut_off() {
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__HEADER_READ_TIMEOUT", "1s")]);
    demo.wait_ready().await;
    let mut s = tls_connect(demo.port, &[b"http/1.1"]).await;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    // The server must close the connection (EOF or error) without us finishing the headers.
    let res =
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("connection was not cut off");
    assert!(matches!(res, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"), "{res:?}");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(800), "cut off too early: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tls_hellos_do_not_disturb_a_good_client() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let port = demo.port;
    let garbage = tokio::spawn(async move {
        for i in 0..200u32 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let junk: Vec<u8> = (0..512u32).map(|j| (i.wrapping_mul(31).wrapping_add(j * 7)) as u8).collect();
                let _ = s.write_all(b"\x16\x03\x01\xff\xff").await;
                let _ = s.write_all(&junk).await;
                let _ = s.read(&mut [0u8; 64]).await;
            }
        }
    });
    // One keep-alive connection of a well-behaved client, through the whole storm.
    let tls = tls_connect(port, &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut ok = 0;
    while !garbage.is_finished() || ok < 20 {
        let req = http::Request::get("/hello")
            .header("host", "x")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        send.ready().await.expect("the good client's connection broke");
        let resp = send.send_request(req).await.expect("the good client's request failed");
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert!(body.starts_with(b"hello from v"), "{body:?}");
        ok += 1;
    }
    garbage.await.unwrap();
    let m = demo.metrics().await;
    assert!(metric(&m, "quicmesh_edge_rejected_total", &[("reason", "tls-handshake")]) >= 100.0, "{m}");
}

/// `quicmesh gateway` from config files: edge certificates chosen by SNI, a per-route body
/// limit, forwarding to a node process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_from_files_picks_certificates_by_sni_and_enforces_body_limits() {
    use http_body_util::{BodyExt, Full};
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    for name in ["a.test", "b.test"] {
        let (cert, key) = quicmesh_shared::identity::self_signed_pem(&[name.to_string()]).unwrap();
        std::fs::write(state.join(format!("edge-{name}.pem")), cert).unwrap();
        quicmesh_shared::identity::write_secret(&state.join(format!("edge-{name}.key")), key.as_bytes()).unwrap();
    }
    let echo = echo_backend().await;
    let svc =
        format!("[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let s = state.display();
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n[gateway.tls]\nstate_dir = \"{s}\"\n\n\
         [[gateway.certificates]]\ncert = \"{s}/edge-a.test.pem\"\nkey = \"{s}/edge-a.test.key\"\nhostnames = [\"a.test\"]\n\n\
         [[gateway.certificates]]\ncert = \"{s}/edge-b.test.pem\"\nkey = \"{s}/edge-b.test.key\"\nhostnames = [\"b.test\"]\n\n\
         [[gateway.routes]]\nname = \"small\"\nmaxRequestBody = 1000\n[[gateway.routes.rules]]\nmatches = [{{ path = {{ value = \"/small\" }} }}]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[gateway.routes]]\nname = \"all\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let port = gw.addrs.listen.port();
    for name in ["a.test", "b.test"] {
        // A fresh connection per request: after an early 413 the server may close it, as HTTP
        // servers do when they answer before reading the body.
        for (path, size, status) in [("/small", 2000, 413), ("/small", 500, 200), ("/big", 2000, 200)] {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let tls = connector.connect(name.to_string().try_into().unwrap(), tcp).await.unwrap();
            let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let expected = quicmesh_shared::identity::read_certs(&state.join(format!("edge-{name}.pem"))).unwrap();
            assert_eq!(presented, expected[0], "SNI {name} got another certificate");
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            let req = http::Request::post(path)
                .header("host", name)
                .body(Full::new(bytes::Bytes::from(vec![b'x'; size])))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{name} POST {path} with {size} bytes");
            if status == 413 {
                assert_eq!(resp.headers()["quicmesh-error"], "body-too-large");
            }
            let _ = resp.into_body().collect().await;
        }
    }
}

/// A request target with a query and no path (`:path: ?x`, which an HTTP/2 or HTTP/3 client
/// can send, and which a catch-all route matches as `/`) cannot be forwarded: it is that
/// client's 400, and it is never counted against the endpoint it was routed to (here two in a
/// row would eject it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_a_path_is_that_clients_400_and_ejects_no_one() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let echo = echo_backend().await;
    let svc = format!(
        "[[services]]\nname = \"echo\"\noutlier = {{ consecutive_failures = 2, base_ejection = \"60s\" }}\n\
         [[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n[[gateway.routes]]\nname = \"all\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let port = gw.addrs.listen.port();
    let tls = tls_connect(port, &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let empty = || http_body_util::Empty::<bytes::Bytes>::new().map_err(|e| -> std::io::Error { match e {} }).boxed();
    let get = |path_and_query: &str| {
        let target = http::Uri::builder()
            .scheme("https")
            .authority(format!("localhost:{port}"))
            .path_and_query(path_and_query)
            .build()
            .unwrap();
        http::Request::get(target).body(empty()).unwrap()
    };
    for round in 0..4 {
        let resp = h2.send_request(get("?x")).await.expect("the h2 connection");
        assert_eq!(resp.status(), 400, "round {round}: {:?}", resp.headers());
    }
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "quicmesh_outlier_ejections_total", &[]), 0.0, "{metrics}");
    let resp = h2.send_request(get("/fine")).await.expect("the h2 connection");
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
}

/// The demo's HTTPRoute rules: header-based canary routing, a redirect, header modifiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_routes_testers_to_the_canary_redirects_and_modifies_headers() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let (_ep, mut send) = h3_connect(demo.port).await;
    for _ in 0..50 {
        let req = http::Request::get(demo.url("/hello")).header("x-canary", "1").body(()).unwrap();
        let (status, _, body) = h3_request(&mut send, req, b"").await;
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8_lossy(&body), "hello from v2 on node-b\n");
    }
    let (status, headers, _) =
        h3_request(&mut send, http::Request::get(demo.url("/hi?x=1")).body(()).unwrap(), b"").await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], format!("https://127.0.0.1:{}/hello?x=1", demo.port));
    let (status, headers, body) =
        h3_request(&mut send, http::Request::get(demo.url("/echo")).body(()).unwrap(), b"").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "quicmesh");
    assert_eq!(json(&String::from_utf8_lossy(&body))["headers"]["x-mesh-route"], "echo");
}

/// An idle keep-alive connection is closed after `gateway.limits.idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__IDLE_TIMEOUT", "1s")]);
    demo.wait_ready().await;
    let mut s = tls_connect(demo.port, &[b"http/1.1"]).await;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    // Drain whatever is left of the response, then expect the server to close.
    let closed = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed).await.expect("the idle connection stayed open");
    assert!(start.elapsed() >= Duration::from_millis(800), "closed too early: {:?}", start.elapsed());
}

/// An HTTP/3 client presenting `cert` (or none), trusting any server certificate.
async fn h3_with_client_cert(port: u16, cert: Option<(&std::path::Path, &std::path::Path)>) -> Option<H3Sender> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(InsecureVerifier::new());
    let mut tls = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                quicmesh_shared::identity::read_certs(c).unwrap(),
                quicmesh_shared::identity::read_key(k).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(([127, 0, 0, 1], port).into(), "localhost").unwrap().await.ok()?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await.ok()?;
    tokio::spawn(async move {
        let _ep = ep;
        std::future::poll_fn(|cx| driver.poll_close(cx)).await
    });
    // A refused certificate ends the connection right after the handshake: see it on a request.
    let req = http::Request::get(format!("https://localhost:{port}/echo")).body(()).unwrap();
    let mut stream = send.send_request(req).await.ok()?;
    stream.finish().await.ok()?;
    stream.recv_response().await.ok()?;
    Some(send)
}

/// Frontend client certificate validation (Gateway API v1.5): with `AllowValidOnly` a client
/// without a certificate from the configured CA gets no connection (curl over HTTP/1.1 and
/// HTTP/2, a Rust HTTP/3 client); with one, its subject reaches the backend in
/// `x-client-cert-subject`, which a client can never set itself. With `AllowInsecureFallback`
/// a client without a certificate, or with one from another CA, is let in, with no subject.
/// Per port (`per_port`), another CA replaces the default one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_validates_client_certificates_and_passes_the_subject_upstream() {
    if !require_tool("curl") {
        return;
    }
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let clients = quicmesh_shared::identity::Ca::init(&pki.path().join("clients"), "clients.test").unwrap();
    let (alice, alice_key) = clients.issue("alice", Duration::from_secs(3600)).unwrap();
    let strangers = quicmesh_shared::identity::Ca::init(&pki.path().join("strangers"), "strangers.test").unwrap();
    let (mallory, mallory_key) = strangers.issue("mallory", Duration::from_secs(3600)).unwrap();
    let echo = echo_backend().await;
    let svc =
        format!("[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    for mode in ["AllowValidOnly", "AllowInsecureFallback"] {
        let gw_toml = format!(
            "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
             [gateway.tls]\nstate_dir = \"{}\"\n\n[gateway.frontend_validation]\nca_certificates = [\"clients/ca.pem\"]\nmode = \"{mode}\"\n\n\
             [[gateway.routes]]\nname = \"all\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
             [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
            state.display(),
            b.addrs.inbound
        );
        let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
        let url = format!("https://127.0.0.1:{}/echo", gw.addrs.listen.port());
        let spoof = "x-client-cert-subject: CN=mallory";
        let (a, ak, m, mk) = (
            alice.to_str().unwrap(),
            alice_key.to_str().unwrap(),
            mallory.to_str().unwrap(),
            mallory_key.to_str().unwrap(),
        );
        for flag in ["--http1.1", "--http2"] {
            let (ok, out) = curl(&["-k", flag, "--cert", a, "--key", ak, "-H", spoof, &url]);
            assert!(ok, "{mode} {flag} alice: {out}");
            assert_eq!(json(&out)["headers"]["x-client-cert-subject"], "CN=alice", "{mode} {flag}: {out}");
            let (ok, out) = curl(&["-k", flag, "--cert", m, "--key", mk, "-H", spoof, &url]);
            match mode {
                "AllowValidOnly" => assert!(!ok, "{flag}: a certificate from another CA was let in: {out}"),
                _ => {
                    assert!(ok, "{flag}: the fallback let in a certificate from another CA: {out}");
                    let headers = &json(&out)["headers"];
                    assert!(headers.get("x-client-cert-subject").is_none(), "{flag}: unchecked subject passed: {out}");
                }
            }
            let (ok, out) = curl(&["-k", flag, "-H", spoof, &url]);
            match mode {
                "AllowValidOnly" => assert!(!ok, "{flag}: a client without a certificate was let in: {out}"),
                _ => {
                    assert!(ok, "{flag}: {out}");
                    assert!(json(&out)["headers"].get("x-client-cert-subject").is_none(), "{flag}: {out}");
                }
            }
        }
        let port = gw.addrs.listen.port();
        assert!(h3_with_client_cert(port, Some((&alice, &alice_key))).await.is_some(), "{mode}: h3 with alice");
        let without = h3_with_client_cert(port, None).await.is_some();
        assert_eq!(without, mode == "AllowInsecureFallback", "{mode}: h3 without a certificate");
        let stranger = h3_with_client_cert(port, Some((&mallory, &mallory_key))).await.is_some();
        assert_eq!(stranger, mode == "AllowInsecureFallback", "{mode}: h3 with a stranger's certificate");
    }

    // Per port: the default CA on one HTTPS listener's port, the strangers' on another's.
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n[gateway.frontend_validation]\nca_certificates = [\"clients/ca.pem\"]\n\
         per_port = [{{ port = 8443, ca_certificates = [\"strangers/ca.pem\"] }}]\n\n\
         [[gateway.listeners]]\nname = \"main\"\nport = 443\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTPS\"\n\n\
         [[gateway.listeners]]\nname = \"partners\"\nport = 8443\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTPS\"\n\n\
         [[gateway.routes]]\nname = \"all\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let url = |listener: &str| format!("https://{}/echo", gw.addrs.listeners[listener]);
    let (a, ak, m, mk) = (
        alice.to_str().unwrap(),
        alice_key.to_str().unwrap(),
        mallory.to_str().unwrap(),
        mallory_key.to_str().unwrap(),
    );
    let (ok, out) = curl(&["-k", "--cert", a, "--key", ak, &url("main")]);
    assert!(ok && json(&out)["headers"]["x-client-cert-subject"] == "CN=alice", "{out}");
    let (ok, out) = curl(&["-k", "--cert", m, "--key", mk, &url("main")]);
    assert!(!ok, "the default port took the strangers' CA: {out}");
    let (ok, out) = curl(&["-k", "--cert", m, "--key", mk, &url("partners")]);
    assert!(ok && json(&out)["headers"]["x-client-cert-subject"] == "CN=mallory", "{out}");
    let (ok, out) = curl(&["-k", "--cert", a, "--key", ak, &url("partners")]);
    assert!(!ok, "the per-port CA was not the only one there: {out}");
}
