//! Gateway API listeners at the edge, conformance style, against real processes: listener
//! isolation and hostname intersection (the upstream suite's `GatewayHTTPListenerIsolation`
//! manifests), 421 for requests coalesced onto another listener's connection over HTTP/1.1,
//! HTTP/2 and HTTP/3 (`GatewayHTTPSListenerDetectMisdirectedRequests`), a plain-HTTP listener
//! that redirects to HTTPS, parentRefs by port, ListenerSets, TLS passthrough by server name
//! (TLSRoute, with `openssl s_client` and curl as clients nobody here wrote) and a TCP listener
//! (TCPRoute).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The listeners of the upstream isolation manifests on `port`, names suffixed with `sfx`.
fn isolation_listeners(port: u16, sfx: &str) -> String {
    format!(
        "[[gateway.listeners]]\nname = \"empty-hostname{sfx}\"\nport = {port}\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTP\"\n\n\
         [[gateway.listeners]]\nname = \"wildcard-example-com{sfx}\"\nport = {port}\nprotocol = \"HTTP\"\nhostname = \"*.example.com\"\n\n\
         [[gateway.listeners]]\nname = \"wildcard-foo-example-com{sfx}\"\nport = {port}\nprotocol = \"HTTP\"\nhostname = \"*.foo.example.com\"\n\n\
         [[gateway.listeners]]\nname = \"abc-foo-example-com{sfx}\"\nport = {port}\nprotocol = \"HTTP\"\nhostname = \"abc.foo.example.com\"\n\n"
    )
}

/// One route per isolation listener; with `hostnames`, the intersection manifest's.
fn isolation_routes(sfx: &str, hostnames: bool) -> String {
    let mut out = String::new();
    for section in ["empty-hostname", "wildcard-example-com", "wildcard-foo-example-com", "abc-foo-example-com"] {
        let hosts = if hostnames {
            "hostnames = [\"bar.com\", \"*.example.com\", \"*.foo.example.com\", \"abc.foo.example.com\"]\n"
        } else {
            ""
        };
        out.push_str(&format!(
            "[[gateway.routes]]\nname = \"attaches-to-{section}{sfx}\"\n{hosts}parentRefs = [{{ name = \"gateway\", sectionName = \"{section}{sfx}\" }}]\n\
             [[gateway.routes.rules]]\nmatches = [{{ path = {{ type = \"PathPrefix\", value = \"/{section}\" }} }}]\n\
             backendRefs = [{{ name = \"v1\" }}]\n\n"
        ));
    }
    out
}

const HTTPS: &str = r#"
[[gateway.listeners]]
name = "https"
port = 443
listen = "127.0.0.1:0"
protocol = "HTTPS"

[[gateway.listeners]]
name = "https-with-hostname"
port = 443
protocol = "HTTPS"
hostname = "second-example.org"
certificates = [{ cert = "second-cert.pem", key = "second-key.pem" }]

[[gateway.listeners]]
name = "https-with-wildcard-hostname"
port = 443
protocol = "HTTPS"
hostname = "*.wildcard.org"

[[gateway.listeners]]
name = "https-with-hostname-matching-wildcard"
port = 443
protocol = "HTTPS"
hostname = "fourth-example.wildcard.org"

[[gateway.listeners]]
name = "passthrough"
port = 443
protocol = "TLS"
hostname = "db.tls.test"

[[gateway.listeners]]
name = "web-passthrough"
port = 443
protocol = "TLS"
hostname = "web.tls.test"

[[gateway.listeners]]
name = "terminate"
port = 443
protocol = "TLS"
tls_mode = "Terminate"
hostname = "plain.tls.test"
certificates = [{ cert = "terminate-cert.pem", key = "terminate-key.pem" }]

[[gateway.listeners]]
name = "plain"
port = 8080
listen = "127.0.0.1:0"
protocol = "HTTP"

[[gateway.listeners]]
name = "tcp"
port = 9000
listen = "127.0.0.1:0"
protocol = "TCP"

[[gateway.listener_sets]]
name = "team"
[[gateway.listener_sets.listeners]]
name = "team-http"
port = 9090
listen = "127.0.0.1:0"
protocol = "HTTP"

[[gateway.routes]]
name = "misdirected-1"
parentRefs = [{ name = "gateway" }]
hostnames = ["example.org"]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/detect-misdirected-requests" } }]
backendRefs = [{ name = "v1" }]

[[gateway.routes]]
name = "misdirected-2"
parentRefs = [{ sectionName = "https-with-hostname" }]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/detect-misdirected-requests" } }]
backendRefs = [{ name = "v2" }]

[[gateway.routes]]
name = "misdirected-3"
parentRefs = [{ sectionName = "https-with-wildcard-hostname" }]
hostnames = ["third-example.wildcard.org", "fifth-example.wildcard.org", "fourth-example.wildcard.org"]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/detect-misdirected-requests" } }]
backendRefs = [{ name = "v3" }]

[[gateway.routes]]
name = "misdirected-4"
parentRefs = [{ sectionName = "https-with-hostname-matching-wildcard" }]
hostnames = ["third-example.wildcard.org", "fourth-example.wildcard.org"]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/detect-misdirected-requests" } }]
backendRefs = [{ name = "v1" }]

[[gateway.routes]]
name = "to-https"
parentRefs = [{ sectionName = "plain" }]
[[gateway.routes.rules]]
filters = [{ type = "RequestRedirect", requestRedirect = { scheme = "https", statusCode = 301 } }]

[[gateway.routes]]
name = "by-port"
parentRefs = [{ port = 8080 }]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/by-port" } }]
backendRefs = [{ name = "v2" }]

[[gateway.routes]]
name = "team-route"
parentRefs = [{ kind = "ListenerSet", name = "team" }]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/team" } }]
backendRefs = [{ name = "v3" }]

[[gateway.routes]]
name = "gateway-only"
parentRefs = [{ name = "gateway" }]
[[gateway.routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/gateway-only" } }]
backendRefs = [{ name = "v1" }]

[[gateway.routes]]
name = "nowhere"
parentRefs = [{ sectionName = "missing" }]
[[gateway.routes.rules]]
backendRefs = [{ name = "v1" }]

[[gateway.tls_routes]]
name = "db-tls"
parentRefs = [{ sectionName = "passthrough" }]
backendRefs = [{ name = "tlsdb" }]

[[gateway.tls_routes]]
name = "web-tls"
parentRefs = [{ sectionName = "web-passthrough" }]
backendRefs = [{ name = "tlsweb" }]

[[gateway.tls_routes]]
name = "db-terminate"
parentRefs = [{ sectionName = "terminate" }]
backendRefs = [{ name = "plaindb" }]

[[gateway.tcp_routes]]
name = "db-tcp"
parentRefs = [{ sectionName = "tcp" }]
backendRefs = [{ name = "plaindb" }]
"#;

struct Setup {
    gw: NodeProc,
    _b: NodeProc,
    /// The passthrough backend's certificate (PEM file).
    backend_ca: std::path::PathBuf,
    _pki: Pki,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let (v1, v2, v3) = (hello_backend("v1").await, hello_backend("v2").await, hello_backend("v3").await);
    let (tlsdb, backend_ca) = tls_echo_backend(pki.path(), "db.tls.test").await;
    let plaindb = line_echo_backend().await;
    // An HTTPS instance behind a passthrough listener (curl checks its certificate).
    let (web_tls, _) = self_signed_server(pki.path(), "web", &["web.tls.test"]);
    let tlsweb = tls_server(web_tls, |tls| async move {
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                "hello through a passthrough\n",
            ))))
        });
        let _ =
            hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
    })
    .await;
    // The certificate of one HTTPS listener, named relative to the gateway's config file.
    self_signed_server(pki.path(), "second", &["second-example.org"]);
    self_signed_server(pki.path(), "terminate", &["plain.tls.test"]);
    let mut svc = String::new();
    for (name, addr) in [("v1", v1), ("v2", v2), ("v3", v3)] {
        svc.push_str(&format!(
            "[[services]]\nname = \"{name}\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{addr}\"\n\n"
        ));
    }
    for (name, addr) in [("tlsdb", tlsdb), ("plaindb", plaindb), ("tlsweb", tlsweb)] {
        svc.push_str(&format!(
            "[[services]]\nname = \"{name}\"\nprotocol = \"tcp\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{addr}\"\n\n"
        ));
    }
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n{TRANSPORT}\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n{}{}{}{}{HTTPS}\n[[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        isolation_listeners(80, ""),
        isolation_listeners(81, "-i"),
        isolation_routes("", false),
        isolation_routes("-i", true),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    Setup { gw, _b: b, backend_ca, _pki: pki }
}

/// A TLS server for `name` (self-signed) that answers each line with `echo: <line>`.
async fn tls_echo_backend(dir: &std::path::Path, name: &str) -> (SocketAddr, std::path::PathBuf) {
    let (config, cert_file) = self_signed_server(dir, "tls-backend", &[name]);
    let addr = tls_server(config, echo_lines).await;
    (addr, cert_file)
}

/// A plain TCP server answering each line with `echo: <line>`.
async fn line_echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(echo_lines(tcp));
        }
    });
    addr
}

async fn echo_lines<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut lines = tokio::io::BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if wr.write_all(format!("echo: {line}\n").as_bytes()).await.is_err() {
            return;
        }
        let _ = wr.flush().await;
    }
}

/// A plain HTTP/1.1 GET to `addr` with this Host: (status, body, Location).
async fn http_get_host(addr: SocketAddr, host: &str, path: &str) -> (u16, String, Option<String>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", host).body(Empty::<bytes::Bytes>::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), location)
}

/// A request over TLS with server name `sni` and Host (or `:authority`) `host`, on HTTP/1.1,
/// HTTP/2 or HTTP/3: (status, body).
async fn tls_get(addr: SocketAddr, proto: &str, sni: &str, host: &str, path: &str) -> (u16, String) {
    if proto == "h3" {
        let tls = insecure_tls(&[b"h3"]);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let conn = ep.connect(addr, sni).unwrap().await.unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let req = http::Request::get(format!("https://{host}{path}")).body(()).unwrap();
        let (status, _, body) = h3_request(&mut send, req, b"").await;
        return (status, String::from_utf8_lossy(&body).into_owned());
    }
    let alpn: &[u8] = if proto == "h2" { b"h2" } else { b"http/1.1" };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[alpn])));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(sni.to_string().try_into().unwrap(), tcp).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tls);
    let resp = if proto == "h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("https://{host}{path}")).body(Empty::<bytes::Bytes>::new()).unwrap();
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(path).header("host", host).body(Empty::<bytes::Bytes>::new()).unwrap();
        send.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The upstream cases: a request's listener is the most specific one of its port whose
/// hostname takes the Host, and it only meets the routes attached to that listener, with their
/// hostnames intersected with the listener's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_isolate_their_routes_and_coalesced_requests_get_421() {
    let s = setup().await;
    let addr = |name: &str| *s.gw.addrs.listeners.get(name).unwrap_or_else(|| panic!("listener {name} bound"));
    let isolation = [
        ("bar.com", "empty-hostname"),
        ("bar.example.com", "wildcard-example-com"),
        ("bar.foo.example.com", "wildcard-foo-example-com"),
        ("abc.foo.example.com", "abc-foo-example-com"),
    ];
    for (sfx, first) in [("", "empty-hostname"), ("-i", "empty-hostname-i")] {
        for (host, owner) in isolation {
            for (_, section) in isolation {
                let path = format!("/{section}");
                let (status, body, _) = http_get_host(addr(first), host, &path).await;
                let want = if section == owner { 200 } else { 404 };
                assert_eq!(status, want, "manifest{sfx}: Host {host}, path {path}: {body}");
                if want == 200 {
                    assert!(body.contains("hello from v1"), "{body}");
                }
            }
        }
    }

    // 421: the server name picked one listener, the Host belongs to another.
    let cases = [
        ("example.org", "example.org", 200, "v1"),
        ("example.org", "second-example.org", 421, ""),
        ("example.org", "unknown-example.org", 404, ""),
        ("second-example.org", "second-example.org", 200, "v2"),
        ("second-example.org", "example.org", 421, ""),
        ("second-example.org", "unknown-example.org", 421, ""),
        ("third-example.wildcard.org", "third-example.wildcard.org", 200, "v3"),
        ("third-example.wildcard.org", "fifth-example.wildcard.org", 200, "v3"),
        ("third-example.wildcard.org", "fourth-example.wildcard.org", 421, ""),
        ("third-example.wildcard.org", "second-example.org", 421, ""),
        ("third-example.wildcard.org", "unknown-example.org", 421, ""),
        ("fourth-example.wildcard.org", "fourth-example.wildcard.org", 200, "v1"),
        ("fourth-example.wildcard.org", "fifth-example.wildcard.org", 421, ""),
        ("unknown-example.org", "example.org", 200, "v1"),
        ("unknown-example.org", "unknown-example.org", 404, ""),
    ];
    let https = addr("https");
    for proto in ["http/1.1", "h2", "h3"] {
        for (sni, host, status, backend) in cases {
            let (got, body) = tls_get(https, proto, sni, host, "/detect-misdirected-requests").await;
            assert_eq!(got, status, "{proto}: SNI {sni}, Host {host}: {body}");
            assert!(body.contains(&format!("hello from {backend}")) || status != 200, "{proto} {sni} {host}: {body}");
        }
    }
    let m = s.gw.metrics().await;
    assert!(m.contains("reason=\"misdirected\""), "421s are counted by reason");
}

/// A plain-HTTP listener that only redirects to HTTPS, a route attached by port, a
/// ListenerSet's own routes, and a route whose parentRef names no listener (a warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_listeners_listener_sets_and_attachment_by_port() {
    let s = setup().await;
    let addr = |name: &str| *s.gw.addrs.listeners.get(name).unwrap();
    let plain = addr("plain");
    let (status, _, location) = http_get_host(plain, "shop.example", "/cart?id=1").await;
    assert_eq!((status, location.as_deref()), (301, Some("https://shop.example/cart?id=1")));
    let (status, body, _) = http_get_host(plain, "shop.example", "/by-port/x").await;
    assert_eq!(status, 200, "a route attached by parentRef port: {body}");
    assert!(body.contains("hello from v2"), "{body}");
    let (status, body, _) = http_get_host(plain, "shop.example", "/gateway-only").await;
    assert_eq!(status, 200, "the gateway's listeners take a route naming the gateway: {body}");

    let team = addr("team/team-http");
    let (status, body, _) = http_get_host(team, "team.example", "/team").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from v3"), "{body}");
    let (status, _, _) = http_get_host(team, "team.example", "/gateway-only").await;
    assert_eq!(status, 404, "a route naming the gateway does not attach to a listener set's listeners");
    let (status, _, _) = http_get_host(addr("empty-hostname"), "bar.com", "/team").await;
    assert_eq!(status, 404, "a listener set's route stays on its listeners");

    s.gw.log_with(&["\"nowhere\" attaches to no listener"]).await;

    // Routes and their attachment reload; a listener needing a new socket waits for a restart.
    let text = std::fs::read_to_string(&s.gw.config).unwrap();
    let added = "\n[[gateway.routes]]\nname = \"added\"\nparentRefs = [{ sectionName = \"plain\" }]\n\
                 [[gateway.routes.rules]]\nmatches = [{ path = { value = \"/added\" } }]\nbackendRefs = [{ name = \"v1\" }]\n";
    std::fs::write(&s.gw.config, format!("{text}{added}")).unwrap();
    eventually(Duration::from_secs(10), "the added route", || async {
        (http_get_host(plain, "shop.example", "/added").await.0 == 200).then_some(())
    })
    .await;
    let listener =
        "\n[[gateway.listeners]]\nname = \"later\"\nport = 7070\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTP\"\n";
    std::fs::write(&s.gw.config, format!("{text}{added}{listener}")).unwrap();
    s.gw.log_with(&["the ports or addresses listened on changed", "this change needs a restart"]).await;
    let (status, _, _) = http_get_host(plain, "shop.example", "/added").await;
    assert_eq!(status, 200, "the refused change left the running config alone");

    // What a port's TLS was set up with waits for a restart too: a TLS listener that would
    // start terminating, or a terminating listener's hostname (its certificate is chosen by
    // it). Each is refused with its reason, and the running listeners go on as they were.
    let refused = [
        (
            "hostname = \"db.tls.test\"",
            "hostname = \"db.tls.test\"\ntls_mode = \"Terminate\"",
            "which of its listeners terminate TLS",
        ),
        (
            "hostname = \"second-example.org\"",
            "hostname = \"third-example.org\"",
            "the hostname of a listener that terminates TLS",
        ),
    ];
    for (from, to, reason) in refused {
        assert!(text.contains(from), "the setup has {from}");
        std::fs::write(&s.gw.config, format!("{}{added}", text.replace(from, to))).unwrap();
        s.gw.log_with(&[reason]).await;
        let https = addr("https");
        let (got, body) =
            tls_get(https, "http/1.1", "second-example.org", "second-example.org", "/detect-misdirected-requests")
                .await;
        assert_eq!(got, 200, "{reason}: the running listeners changed: {body}");
        assert!(body.contains("hello from v2"), "{body}");
    }
    // A plain-HTTP listener's hostname reloads.
    let moved = text.replace(
        "name = \"team-http\"\nport = 9090\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTP\"\n",
        "name = \"team-http\"\nport = 9090\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTP\"\nhostname = \"other.example\"\n",
    );
    assert_ne!(moved, text);
    std::fs::write(&s.gw.config, format!("{moved}{added}")).unwrap();
    eventually(Duration::from_secs(10), "team-http taking only other.example", || async {
        (http_get_host(team, "team.example", "/team").await.0 == 404).then_some(())
    })
    .await;
}

/// TLSRoute: a TLS listener passes connections through by server name, untouched, to a TCP
/// service's instance through the mesh (the client checks the instance's own certificate,
/// which the gateway does not have); HTTPS listeners on the same port keep working. And a TCP
/// listener's TCPRoute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_by_server_name_and_tcp_listeners_forward() {
    let s = setup().await;
    let https = *s.gw.addrs.listeners.get("passthrough").unwrap();
    assert_eq!(https, *s.gw.addrs.listeners.get("https").unwrap(), "one port, one socket");

    let config = tls_client_trusting(&s.backend_ca);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let mut tls = connector
        .connect("db.tls.test".try_into().unwrap(), tcp)
        .await
        .expect("the instance's certificate, verified end to end");
    tls.write_all(b"over the mesh\n").await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(&mut tls).read_line(&mut line).await.unwrap();
    assert_eq!(line, "echo: over the mesh\n");
    drop(tls);

    // An independent client: OpenSSL's, verifying against the instance's certificate.
    if let Some(out) = openssl_line(https, "db.tls.test", &s.backend_ca, "from openssl").await {
        assert_eq!(out, "echo: from openssl\n");
    }

    // curl to an HTTPS instance behind the gateway, trusting only the instance's certificate.
    if require_tool("curl") {
        let resolve = format!("web.tls.test:{}:127.0.0.1", https.port());
        let ca = s.backend_ca.with_file_name("web-cert.pem");
        let url = format!("https://web.tls.test:{}/", https.port());
        let (ok, out) = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, &url]);
        assert!(ok, "{out}");
        assert_eq!(out, "hello through a passthrough\n");
    }

    // TLS terminated at a TLS listener, the bytes inside carried to a plain TCP instance.
    let terminate_ca = s.backend_ca.with_file_name("terminate-cert.pem");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_trusting(&terminate_ca)));
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let mut tls =
        connector.connect("plain.tls.test".try_into().unwrap(), tcp).await.expect("the listener's certificate");
    tls.write_all(b"decrypted at the edge\n").await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(&mut tls).read_line(&mut line).await.unwrap();
    assert_eq!(line, "echo: decrypted at the edge\n");
    drop(tls);
    if let Some(out) = openssl_line(https, "plain.tls.test", &terminate_ca, "openssl, terminated").await {
        assert_eq!(out, "echo: openssl, terminated\n");
    }

    // The HTTPS listeners of the same port still terminate (the ClientHello was read first).
    let (status, body) = tls_get(https, "http/1.1", "example.org", "example.org", "/detect-misdirected-requests").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) =
        tls_get(https, "h2", "second-example.org", "second-example.org", "/detect-misdirected-requests").await;
    assert_eq!(status, 200);
    // second-example.org's listener serves its own certificate, verified against it alone.
    let second = s.backend_ca.with_file_name("second-cert.pem");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_trusting(&second)));
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    connector.connect("second-example.org".try_into().unwrap(), tcp).await.expect("the listener's own certificate");
    if require_tool("curl") {
        let resolve = format!("second-example.org:{}:127.0.0.1", https.port());
        let url = format!("https://second-example.org:{}/detect-misdirected-requests", https.port());
        let (ok, out) = curl(&["--cacert", second.to_str().unwrap(), "--resolve", &resolve, &url]);
        assert!(ok && out.contains("hello from v2"), "{out}");
    }

    // TCPRoute.
    let mut tcp = tokio::net::TcpStream::connect(*s.gw.addrs.listeners.get("tcp").unwrap()).await.unwrap();
    tcp.write_all(b"plain bytes\n").await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(&mut tcp).read_line(&mut line).await.unwrap();
    assert_eq!(line, "echo: plain bytes\n");
}

/// One line through `openssl s_client` to `addr` with server name `sni`, verifying against
/// `ca`: the first line it prints back; `None` (said) when openssl is not installed outside CI.
async fn openssl_line(addr: SocketAddr, sni: &str, ca: &std::path::Path, line: &str) -> Option<String> {
    if !require_tool("openssl") {
        return None;
    }
    let (sni, ca, line) = (sni.to_string(), ca.to_path_buf(), format!("{line}\n"));
    let out = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-servername", &sni, "-quiet", "-verify_return_error"])
            .arg("-CAfile")
            .arg(&ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        // Reads end when the answer's line is complete, or when s_client gives up.
        while !got.ends_with(b"\n") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        String::from_utf8_lossy(&got).into_owned()
    });
    Some(tokio::time::timeout(Duration::from_secs(20), out).await.expect("openssl answered").unwrap())
}
