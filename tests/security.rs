//! End-to-end tests of security: authorization between services on the HTTP path and through
//! TCP tunnels (deny beats allow, audit mode), a node that forges its caller identity,
//! revocation of a node with live connections, the admin API's bearer token, and edge
//! certificates reloaded from files without a restart.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::backend::Backend;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICIES: &str = r#"
[[services]]
name = "web"
[[services]]
name = "audited"
[[services]]
name = "db"
protocol = "tcp"

[[authorization.policies]]
service = "web"
[[authorization.policies.rules]]
action = "allow"
from = { services = ["front"] }
[[authorization.policies.rules]]
name = "no-admin"
action = "deny"
paths = ["/admin/*"]

[[authorization.policies]]
service = "db"
[[authorization.policies.rules]]
action = "allow"
from = { services = ["front"] }

[[authorization.policies]]
service = "audited"
mode = "audit"
[[authorization.policies.rules]]
action = "allow"
from = { services = ["front"] }
"#;

/// Gateway; node-a hosts `front`, node-b hosts `web`, `audited` and the TCP service `db`,
/// node-c hosts `batch`. node-a and node-c tunnel a local port to `db`.
struct Secured {
    a: NodeProc,
    b: NodeProc,
    c: NodeProc,
    gw: NodeProc,
    web: Backend,
    dir: PathBuf,
    _pki: Pki,
    _others: Vec<Backend>,
}

async fn tcp_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

async fn secured() -> Secured {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    for n in ["node-a", "node-b", "node-c"] {
        pki.issue(n);
    }
    let gw = NodeProc::start_layered("gateway", &gateway_layers(&dir, POLICIES, ""));
    let web = Backend::start("web", Duration::ZERO).await;
    let audited = Backend::start("audited", Duration::ZERO).await;
    let front = Backend::start("front", Duration::ZERO).await;
    let batch = Backend::start("batch", Duration::ZERO).await;
    let db = tcp_echo().await;
    let inst = |svc: &str, addr: SocketAddr, proto: &str| {
        format!("[[node.instances]]\nservice = \"{svc}\"\naddress = \"{addr}\"\nprotocol = \"{proto}\"\n\n")
    };
    let b = NodeProc::start(
        &dir,
        "node-b",
        &joined_toml(
            "node-b",
            &dir,
            gw.addrs.control,
            &(inst("web", web.addr, "http1") + &inst("audited", audited.addr, "http1") + &inst("db", db, "tcp")),
        ),
    );
    let tunnel = "[[node.tcp]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\n\n";
    let a = NodeProc::start(
        &dir,
        "node-a",
        &joined_toml("node-a", &dir, gw.addrs.control, &(inst("front", front.addr, "http1") + tunnel)),
    );
    let c = NodeProc::start(
        &dir,
        "node-c",
        &joined_toml("node-c", &dir, gw.addrs.control, &(inst("batch", batch.addr, "http1") + tunnel)),
    );
    let s = Secured { a, b, c, gw, web, dir: dir.clone(), _pki: pki, _others: vec![audited, front, batch] };
    eventually(Duration::from_secs(20), "node-a and node-c to know every service", || async {
        let ok = get(&s.a, "web", "/").await.0 == 200 && get(&s.c, "audited", "/").await.0 == 200;
        ok.then_some(())
    })
    .await;
    s
}

/// GET through a node's outbound listener: (status, quicmesh-error).
async fn get(node: &NodeProc, host: &str, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(format!("http://{}{path}", node.addrs.outbound))
        .header("host", host)
        .body(Default::default())
        .unwrap();
    match client.request(req).await {
        Ok(r) => {
            let reason = r.headers().get("quicmesh-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            (r.status().as_u16(), reason)
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Sends `ping` through a node's `db` tunnel; what came back.
async fn through_tunnel(node: &NodeProc) -> Vec<u8> {
    let addr = node.addrs.tcp.iter().find(|(s, _)| s == "db").unwrap().1;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_allow_deny_and_audit_on_http_and_tcp() {
    let s = secured().await;
    let denied = |m: &str| metric(m, "quicmesh_authz_denied_total", &[("service", "web"), ("mode", "enforce")]);
    let before = denied(&s.b.metrics().await);
    // HTTP: front may call web; batch may not; deny beats allow for /admin.
    assert_eq!(get(&s.a, "web", "/").await, (200, String::new()));
    let hits = s.web.hits();
    assert_eq!(get(&s.c, "web", "/").await, (403, "denied".into()));
    assert_eq!(get(&s.a, "web", "/admin/users").await, (403, "denied".into()));
    assert_eq!(s.web.hits(), hits, "a denied request reached the service");
    // Audit: batch is not allowed, the policy only reports it.
    assert_eq!(get(&s.c, "audited", "/").await, (200, String::new()));
    let mb = s.b.metrics().await;
    assert!(metric(&mb, "quicmesh_authz_denied_total", &[("service", "audited"), ("mode", "audit")]) >= 1.0, "{mb}");
    assert_eq!(denied(&mb) - before, 2.0, "{mb}");
    s.b.log_with(&["request denied by authorization policy", "no-admin", "audit: the policy would deny this request"])
        .await;
    // TCP: the same policy on the tunnel to db.
    assert_eq!(through_tunnel(&s.a).await, b"ping");
    assert!(through_tunnel(&s.c).await.is_empty(), "batch got through to db");
    let mb = s.b.metrics().await;
    assert!(metric(&mb, "quicmesh_authz_denied_total", &[("service", "db"), ("mode", "enforce")]) >= 1.0, "{mb}");
    let _ = (&s.gw, &s.dir);
}

/// A QUIC + HTTP/3 client holding `name`'s real certificate, talking to a peer node directly.
async fn impersonate(dir: &Path, name: &str, peer: &str, addr: SocketAddr) -> (quinn::Endpoint, H3Sender) {
    let creds = credentials(dir, name);
    let tls = quicmesh_shared::identity::tls::mesh_client(&creds, TD).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let conn = ep.connect(addr, peer).unwrap().await.unwrap();
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    (ep, send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_a_service_hosted_elsewhere_is_refused() {
    let s = secured().await;
    // node-c, with its own valid certificate, says the call comes from front (on node-a).
    let (_ep, mut h3) = impersonate(&s.dir, "node-c", "node-b", s.b.addrs.inbound).await;
    let forged = |source: &str| {
        http::Request::get("https://web/")
            .header("quicmesh-service", "web")
            .header("quicmesh-endpoint", s.web.addr.to_string())
            .header("quicmesh-source", source)
            .body(())
            .unwrap()
    };
    let (status, headers, _) = h3_request(&mut h3, forged("front"), b"").await;
    assert_eq!((status, headers["quicmesh-error"].to_str().unwrap()), (403, "denied"));
    // The same forged claim from node-a, which does host front, is believed.
    let (_ep2, mut h3a) = impersonate(&s.dir, "node-a", "node-b", s.b.addrs.inbound).await;
    let (status, _, body) = h3_request(&mut h3a, forged("front"), b"").await;
    assert_eq!((status, body.as_slice()), (200, &b"web"[..]));
    // A member whose node name is a service's name does not speak for that service: node
    // names and service names are apart (only the gateway's traffic names itself).
    s._pki.issue("front");
    let (_ep3, mut h3f) = impersonate(&s.dir, "front", "node-b", s.b.addrs.inbound).await;
    let hits = s.web.hits();
    let (status, headers, _) = h3_request(&mut h3f, forged("front"), b"").await;
    assert_eq!((status, headers.get("quicmesh-error").and_then(|v| v.to_str().ok())), (403, Some("denied")));
    assert_eq!(s.web.hits(), hits);
    let _ = (&s.a, &s.c, &s.gw);
}

/// An upgrade (WebSocket) a peer asks for is authorized on its path in canonical form, as a
/// plain request is: `/x/../admin/s` is `/admin/s`, under web's deny rule for `/admin/*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_path_with_dot_segments_meets_the_deny_rule() {
    let s = secured().await;
    // node-a speaks for front, which web allows; its own node would have normalized the path.
    let (_ep, mut h3) = impersonate(&s.dir, "node-a", "node-b", s.b.addrs.inbound).await;
    let upgrade = |path: &str| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("https://{}/", s.web.addr))
            .header("quicmesh-service", "web")
            .header("quicmesh-endpoint", s.web.addr.to_string())
            .header("quicmesh-source", "front")
            .header("quicmesh-upgrade", "websocket")
            .header("quicmesh-path", path)
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap()
    };
    let hits = s.web.hits();
    for path in ["/admin/s", "/x/../admin/s", "/x/%2E%2E/admin/s", "/%61dmin/s"] {
        let (status, headers, _) = h3_request(&mut h3, upgrade(path), b"").await;
        let reason = headers.get("quicmesh-error").and_then(|v| v.to_str().ok());
        assert_eq!((status, reason), (403, Some("denied")), "{path}");
    }
    // Not a path at all: refused as the peer's bad request.
    for path in ["http://web/admin/s", "admin", "/bad%zz"] {
        let (status, _, _) = h3_request(&mut h3, upgrade(path), b"").await;
        assert_eq!(status, 400, "{path}");
    }
    assert_eq!(s.web.hits(), hits, "a refused upgrade reached the instance");
    let _ = (&s.a, &s.c, &s.gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_refused_by_a_peer_it_was_connected_to() {
    let s = secured().await;
    // node-c holds a live connection to node-b (audited lets it through).
    assert_eq!(get(&s.c, "audited", "/").await.0, 200);
    let out = std::process::Command::new(bin())
        .args(["node", "revoke", "node-c", "--admin", &s.gw.addrs.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked node-c"));
    let start = Instant::now();
    eventually(Duration::from_secs(10), "node-b to refuse node-c", || async {
        (get(&s.c, "audited", "/").await.0 != 200).then_some(())
    })
    .await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "revocation took {took:?}");
    eventually(Duration::from_secs(10), "node-b to log the revocation", || async {
        let log = s.b.log();
        (log.contains("closing the connection of a revoked peer") || log.contains("its membership is revoked"))
            .then_some(())
    })
    .await;
    // It stays out: no new connection, and the gateway keeps it out of the registry.
    assert_ne!(get(&s.c, "audited", "/").await.0, 200);
    let nodes = s.gw.admin_json("/nodes").await;
    assert!(nodes["nodes"].as_array().unwrap().iter().all(|n| n["name"] != "node-c"), "{nodes}");
    // Others are unaffected.
    assert_eq!(get(&s.a, "web", "/").await.0, 200);
    let _ = &s.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_api_off_loopback_needs_a_bearer_token() {
    let pki = Pki::new();
    let state = pki.issue("node-x");
    let web = "[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-x\"\naddress = \"127.0.0.1:9\"\n";
    let open = node_toml("node-x", &state, &[], web).replace("admin = \"127.0.0.1:0\"", "admin = \"0.0.0.0:0\"");
    let config = pki.path().join("open.toml");
    std::fs::write(&config, &open).unwrap();
    let out = std::process::Command::new(bin())
        .args(["node", "--config"])
        .arg(&config)
        .env_remove("QUICMESH_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("QUICMESH_ADMIN_TOKEN"), "{err}");
    let token_file = pki.path().join("admin.token");
    std::fs::write(&token_file, "s3cret-admin-token-1234\n").unwrap();
    let with_token =
        open.replace("[node.tls]", &format!("admin_token_file = \"{}\"\n\n[node.tls]", token_file.display()));
    let node = NodeProc::start(pki.path(), "node-x", &with_token);
    let port = node.addrs.admin.port();
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(http_get(&format!("{url}/ready")).await.0, 200, "probes stay open");
    assert_eq!(http_get(&format!("{url}/metrics")).await.0, 401);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let authed = |token: &str| {
        http::Request::get(format!("{url}/config_dump"))
            .header("authorization", format!("Bearer {token}"))
            .body(Default::default())
            .unwrap()
    };
    assert_eq!(client.request(authed("wrong-token-wrong-token")).await.unwrap().status(), 401);
    let ok = client.request(authed("s3cret-admin-token-1234")).await.unwrap();
    assert_eq!(ok.status(), 200);
    use http_body_util::BodyExt;
    let dump = ok.into_body().collect().await.unwrap().to_bytes();
    let dump = String::from_utf8_lossy(&dump);
    assert!(!dump.contains("s3cret-admin-token"), "the token leaked into /config_dump: {dump}");
    // Stopped first: its log writer has flushed every line by the time it exits.
    let mut node = node;
    node.terminate();
    assert!(!node.log().contains("s3cret-admin-token"), "the token leaked into the log");
}

/// The certificate a TLS server presents to a client, DER.
async fn presented(port: u16) -> Vec<u8> {
    let tls = insecure_tls(&[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_certificates_reload_from_files_without_a_restart() {
    let pki = Pki::new();
    let state = pki.issue("gateway");
    let (cert, key) = (pki.path().join("edge.pem"), pki.path().join("edge.key"));
    let write = |n: &str| {
        let (c, k) = quicmesh_shared::identity::self_signed_pem(&["localhost".to_string(), n.to_string()]).unwrap();
        std::fs::write(&cert, c).unwrap();
        std::fs::write(&key, k).unwrap();
    };
    write("first.example");
    let toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n{TRANSPORT}\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\nwatch_interval = \"100ms\"\n\
         [[gateway.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n[gateway.tls]\nstate_dir = \"{}\"\n",
        cert.display(),
        key.display(),
        state.display()
    );
    let gw = NodeProc::start_gateway(pki.path(), &toml);
    let port = gw.addrs.listen.port();
    let first = presented(port).await;
    // A half-written pair must not be picked up: write garbage, then the real thing.
    std::fs::write(&cert, "not a certificate").unwrap();
    write("second.example");
    let second = eventually(Duration::from_secs(10), "the gateway to serve the new certificate", || async {
        let now = presented(port).await;
        (now != first).then_some(now)
    })
    .await;
    let sans = String::from_utf8_lossy(&second).into_owned();
    assert!(sans.contains("second.example"), "not the new certificate");
    gw.log_with(&["edge certificates reloaded"]).await;
}

/// A UDP relay between a QUIC client and server that can hold the server's packets back, so
/// the handshake cannot complete while the client's first flight (with 0-RTT data) is served.
struct Relay {
    addr: SocketAddr,
    release: std::sync::Arc<tokio::sync::Notify>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let released = release.clone();
        let task = tokio::spawn(async move {
            let (mut client, mut held, mut holding) = (None, Vec::new(), true);
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = sock.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { return };
                        let data = buf[..n].to_vec();
                        if from == server {
                            match client {
                                Some(c) if !holding => { let _ = sock.send_to(&data, c).await; }
                                _ => held.push(data),
                            }
                        } else {
                            client = Some(from);
                            let _ = sock.send_to(&data, server).await;
                        }
                    }
                    _ = released.notified(), if holding => {
                        holding = false;
                        if let Some(c) = client {
                            for d in held.drain(..) {
                                let _ = sock.send_to(&d, c).await;
                            }
                        }
                    }
                }
            }
        });
        Relay { addr, release, _task: task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_serves_safe_methods_early_and_holds_the_rest_for_the_handshake() {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-b");
    let gw = gateway_to_web(&dir);
    let web = Backend::start("web", Duration::ZERO).await;
    let inst = format!("[[node.instances]]\nservice = \"web\"\naddress = \"{}\"\n", web.addr);
    let _b = NodeProc::start(&dir, "node-b", &joined_toml("node-b", &dir, gw.addrs.control, &inst));
    let port = gw.addrs.listen.port();
    // One client config throughout: it keeps the session ticket that makes 0-RTT possible.
    let mut tls = insecure_tls(&[b"h3"]);
    tls.enable_early_data = true;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let direct: SocketAddr = ([127, 0, 0, 1], port).into();
    let url = |p: &str| format!("https://localhost:{port}{p}");
    eventually(Duration::from_secs(20), "a full handshake and a request through the gateway", || {
        let (ep, url) = (ep.clone(), url("/warmup"));
        async move {
            let conn = ep.connect(direct, "localhost").unwrap().await.ok()?;
            let (mut driver, mut h3) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await.ok()?;
            tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
            let status = h3_request(&mut h3, http::Request::get(url).body(()).unwrap(), b"").await.0;
            conn.close(0u32.into(), b"done");
            (status == 200).then_some(())
        }
    })
    .await;
    // Through a relay that holds the gateway's answers: the handshake cannot complete.
    let relay = Relay::start(direct).await;
    let (conn, accepted) =
        ep.connect(relay.addr, "localhost").unwrap().into_0rtt().expect("a session ticket for 0-RTT");
    let (mut driver, h3) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let mut get = h3.clone();
    let get_url = url("/early");
    let get_task =
        tokio::spawn(async move { h3_request(&mut get, http::Request::get(get_url).body(()).unwrap(), b"").await });
    let mut post = h3.clone();
    let post_url = url("/early");
    let post_task = tokio::spawn(async move {
        h3_request(&mut post, http::Request::post(post_url).body(()).unwrap(), b"order-1").await
    });
    eventually(Duration::from_secs(10), "the early GET to reach the backend", || async {
        web.seen.lock().unwrap().iter().any(|r| r == "GET /early early").then_some(())
    })
    .await;
    assert!(
        !web.seen.lock().unwrap().iter().any(|r| r.starts_with("POST")),
        "a POST from 0-RTT data was acted on before the handshake: {:?}",
        web.seen.lock().unwrap()
    );
    relay.release.notify_one();
    assert!(accepted.await, "the gateway refused 0-RTT");
    assert_eq!(get_task.await.unwrap().0, 200);
    let (status, _, body) = post_task.await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"web"[..]));
    let posts: Vec<String> = web.seen.lock().unwrap().iter().filter(|r| r.starts_with("POST")).cloned().collect();
    assert_eq!(posts, ["POST /early"], "once, after the handshake, not marked early");
    drop(pki);
}
