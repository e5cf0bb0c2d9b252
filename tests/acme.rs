//! Automatic edge certificates against a real ACME server: Debian's `pebble` (Let's Encrypt's
//! test CA), with `pebble-challtestsrv` as its DNS (every name is 127.0.0.1). The gateway
//! orders a certificate for its listener's hostname, answers the challenge itself
//! (TLS-ALPN-01 on the HTTPS port, HTTP-01 on the plain one), and serves what pebble issued
//! over HTTP/1.1 and HTTP/2 (curl, verifying against pebble's root) and HTTP/3 (quinn, the
//! same). Pebble's certificates here live 30 s, so renewal comes at 20 s; an outage of the CA
//! keeps the held certificate serving, and a CA back again (new state, new root) issues anew.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use support::*;

const HOST: &str = "edge.quicmesh.test";
/// Pebble's certificate lifetime here: renewal is due after two thirds of it.
const VALIDITY_S: u64 = 30;

fn tools_present() -> bool {
    require_tool("pebble") && require_tool("pebble-challtestsrv") && require_tool("curl")
}

/// A loopback port free on TCP and UDP just now (for the programs that cannot bind port 0 and
/// report it: pebble and its DNS).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pebble and its DNS, with the gateway's challenge ports.
struct Ca {
    dir: PathBuf,
    api: u16,
    management: u16,
    dns: u16,
    /// The TLS root of pebble's own HTTPS (`gateway.acme.ca`).
    https_root: PathBuf,
    pebble: Option<Proc>,
    /// pebble's ports while it is stopped (see [`Ca::stop`]).
    held: Vec<socket2::Socket>,
    _dns: Proc,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let (_, https_root) = self_signed_server(dir, "pebble", &["127.0.0.1", "localhost"]);
        let dns = free_port();
        let dns_proc = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port()), "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv");
        Ca {
            dir: dir.to_path_buf(),
            api: free_port(),
            management: free_port(),
            dns,
            https_root,
            pebble: None,
            held: Vec::new(),
            _dns: Proc(dns_proc),
        }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api)
    }

    /// Starts pebble, validating on the gateway's `http` and `tls` ports; waits until it serves.
    async fn start(&mut self, http: u16, tls: u16) {
        let config = self.dir.join("pebble.json");
        let json = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.api),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.https_root,
            "privateKey": self.dir.join("pebble-key.pem"),
            "httpPort": http,
            "tlsPort": tls,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": VALIDITY_S,
        }});
        std::fs::write(&config, json.to_string()).unwrap();
        self.held.clear();
        let log = std::fs::File::create(self.dir.join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .args(["-config", config.to_str().unwrap(), "-dnsserver", &format!("127.0.0.1:{}", self.dns)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble");
        self.pebble = Some(Proc(child));
        let root = self.https_root.clone();
        let url = self.directory();
        eventually(Duration::from_secs(20), "pebble to serve its directory", || {
            let (root, url) = (root.clone(), url.clone());
            async move { curl(&["--cacert", root.to_str().unwrap(), &url]).0.then_some(()) }
        })
        .await;
    }

    /// Stops pebble, and keeps its ports bound (not listening: a connection is refused, as
    /// to a stopped server) until it starts again, so that nothing else binds them meanwhile:
    /// the tests next to this one bind listeners to port 0, and the kernel may hand out a port
    /// just freed.
    fn stop(&mut self) {
        self.pebble = None;
        for port in [self.api, self.management] {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // Past the stopped server's connections in TIME_WAIT.
            let _ = socket.set_reuse_address(true);
            if socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).is_ok() {
                self.held.push(socket);
            }
        }
    }

    /// The root pebble issues under (new at every start), saved to a file.
    fn issuing_root(&self, name: &str) -> PathBuf {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let (ok, pem) = curl(&["--cacert", self.https_root.to_str().unwrap(), &url]);
        assert!(ok && pem.contains("BEGIN CERTIFICATE"), "pebble's root: {pem}");
        let file = self.dir.join(name);
        std::fs::write(&file, pem).unwrap();
        file
    }
}

/// A gateway with an HTTPS listener for [`HOST`] and a plain-HTTP one, certified by `ca`
/// through `challenge`.
fn gateway(pki: &Pki, ca: &Ca, challenge: &str) -> NodeProc {
    replica(pki, "gateway", &ca.directory(), challenge, "")
}

/// A gateway started from `<name>.toml`, ordering from `directory`, its ACME state in
/// `acme-<name>`; `extra` adds to its config.
fn replica(pki: &Pki, name: &str, directory: &str, challenge: &str, extra: &str) -> NodeProc {
    pki.issue("gateway");
    let dir = pki.path().display();
    let toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{dir}\"\n\n\
         [[gateway.listeners]]\nname = \"https\"\nport = 443\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTPS\"\nhostname = \"{HOST}\"\n\n\
         [[gateway.listeners]]\nname = \"http\"\nport = 80\nlisten = \"127.0.0.1:0\"\nprotocol = \"HTTP\"\n\n\
         [gateway.acme]\ndirectory = \"{directory}\"\ncontact = [\"ops@quicmesh.test\"]\nca = \"{}\"\nchallenge = \"{challenge}\"\n\
         state_dir = \"{dir}/acme-{name}\"\nretry_initial = \"300ms\"\nretry_max = \"1s\"\n\n{extra}",
        pki.path().join("pebble-cert.pem").display(),
    );
    NodeProc::start_args("gateway", pki.path(), name, &toml, &[])
}

fn https_port(gw: &NodeProc) -> u16 {
    gw.addrs.listeners["https"].port()
}

/// The leaf certificate the edge serves for [`HOST`] over TLS on TCP, if it verifies
/// against `root`.
async fn served_leaf(port: u16, root: &Path) -> Result<Vec<u8>, String> {
    let tls = tls_client_trusting(root);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let conn = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let leaf = conn.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
    Ok(leaf.to_vec())
}

/// curl over HTTP/1.1 and HTTP/2, verifying the certificate against `root`: the HTTP version
/// each answer came in.
fn curl_both(port: u16, root: &Path) -> Vec<String> {
    let resolve = format!("{HOST}:{port}:127.0.0.1");
    let url = format!("https://{HOST}:{port}/");
    ["--http1.1", "--http2"]
        .iter()
        .map(|v| {
            let (ok, out) = curl(&[
                v,
                "--cacert",
                root.to_str().unwrap(),
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                &url,
            ]);
            assert!(ok, "curl {v} against pebble's root: {out}");
            out
        })
        .collect()
}

/// An HTTP/3 request to [`HOST`] with quinn, verifying against `root`: the status, and the
/// certificate served.
async fn h3_get(port: u16, root: &Path) -> (u16, Vec<u8>) {
    let mut tls = tls_client_trusting(root);
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(SocketAddr::from(([127, 0, 0, 1], port)), HOST).unwrap().await.expect("h3 handshake");
    let leaf = conn.peer_identity().unwrap().downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().unwrap()[0]
        .to_vec();
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let req = http::Request::get(format!("https://{HOST}/")).body(()).unwrap();
    let (status, _, _) = h3_request(&mut send, req, b"").await;
    (status, leaf)
}

/// An HTTP/3 GET from ngtcp2's client, an implementation nobody here wrote. It cannot check a
/// certificate against a root (it has no option for one), so the chain is checked by
/// [`h3_get`]; this checks that another HTTP/3 stack is served on the ACME edge.
fn gtlsclient_get(port: u16) {
    if !require_tool("gtlsclient") {
        return;
    }
    let dl = tempfile::tempdir().unwrap();
    let out = Command::new("gtlsclient")
        .args(["-q", "--exit-on-all-streams-close", "--timeout=10s"])
        .arg(format!("--download={}", dl.path().display()))
        .args(["127.0.0.1", &port.to_string(), &format!("https://{HOST}:{port}/acme-edge")])
        .output()
        .unwrap();
    assert!(out.status.success(), "gtlsclient failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(dl.path().join("acme-edge").exists(), "gtlsclient got no answer");
}

async fn issued(gw: &NodeProc) -> f64 {
    metric(&gw.metrics().await, "quicmesh_acme_certificates_issued_total", &[("hostname", HOST)])
}

/// TLS-ALPN-01: issued while the gateway runs, served on every HTTP version, kept through a CA
/// outage past its renewal time, renewed once the CA is back, without closing an open
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_certificate_is_issued_served_kept_through_an_outage_and_renewed() {
    if !tools_present() {
        return;
    }
    let pki = Pki::new();
    let mut ca = Ca::new(pki.path());
    // The gateway starts before its CA: its first orders fail and are retried.
    let gw = gateway(&pki, &ca, "tls-alpn-01");
    let port = https_port(&gw);
    let started = std::time::Instant::now();
    ca.start(gw.addrs.listeners["http"].port(), port).await;
    eventually(Duration::from_secs(60), "the first certificate", || async { (issued(&gw).await >= 1.0).then_some(()) })
        .await;
    let log = gw.log();
    let took = log.lines().find(|l| l.contains("issued and serving")).unwrap_or_default();
    eprintln!(
        "first certificate {} ms after pebble started (retry waits included); the order: {took}",
        started.elapsed().as_millis()
    );
    let root = ca.issuing_root("root-1.pem");
    let first = served_leaf(port, &root).await.expect("the issued certificate verifies against pebble's root");
    assert_eq!(curl_both(port, &root), ["1.1", "2"]);
    let (status, h3_leaf) = h3_get(port, &root).await;
    assert!(status >= 200, "HTTP/3 answered {status}");
    assert_eq!(h3_leaf, first, "HTTP/3 serves the same certificate");
    gtlsclient_get(port);
    assert!(log.contains("ACME certificate issued and serving"), "{log}");
    let expiry =
        metric(&gw.metrics().await, "quicmesh_acme_certificate_expiry_timestamp_seconds", &[("hostname", HOST)]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now && expiry <= now + VALIDITY_S as f64 + 2.0, "expiry {expiry}, now {now}");

    // An HTTP/2 connection opened now, used again after the certificate changed.
    let mut open = h2_connection(port, &root).await;
    assert!(open.get().await < 600);

    // The CA goes away; the renewal due at two thirds of the lifetime fails, and the held
    // certificate keeps serving.
    let failures = || async { metric(&gw.metrics().await, "quicmesh_acme_failures_total", &[("hostname", HOST)]) };
    let before = failures().await;
    ca.stop();
    let issued_at_stop = issued(&gw).await;
    let renewed_before_the_outage = issued_at_stop > 1.0;
    // Due two thirds into the held certificate's life: within VALIDITY_S of its issue.
    eventually(Duration::from_secs(VALIDITY_S + 15), "a failed renewal", || async {
        (failures().await > before).then_some(())
    })
    .await;
    let held = served_leaf(port, &root).await.expect("the held certificate serves on");
    if !renewed_before_the_outage {
        assert_eq!(held, first, "the held certificate serves on");
    }
    assert!(gw.log().contains("ACME order failed"));

    // Back again (a new pebble: no account, a new root): the gateway makes a new account and
    // renews.
    ca.start(gw.addrs.listeners["http"].port(), port).await;
    eventually(Duration::from_secs(60), "the renewed certificate", || async {
        (issued(&gw).await > issued_at_stop).then_some(())
    })
    .await;
    let root2 = ca.issuing_root("root-2.pem");
    let second = served_leaf(port, &root2).await.expect("the renewed certificate verifies against the new root");
    assert_ne!(second, held, "a new certificate");
    assert_eq!(curl_both(port, &root2), ["1.1", "2"]);
    assert_eq!(h3_get(port, &root2).await.1, second);
    assert!(open.get().await < 600, "the connection opened before the renewal still works");
}

/// HTTP-01: the CA fetches the answer from the plain-HTTP listener; the certificate serves.
/// A restarted gateway serves the certificate it stored without ordering again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_certificate_is_issued_and_kept_across_a_restart() {
    if !tools_present() {
        return;
    }
    let pki = Pki::new();
    let mut ca = Ca::new(pki.path());
    let mut gw = gateway(&pki, &ca, "http-01");
    let port = https_port(&gw);
    ca.start(gw.addrs.listeners["http"].port(), port).await;
    eventually(Duration::from_secs(60), "a certificate", || async { (issued(&gw).await >= 1.0).then_some(()) }).await;
    let root = ca.issuing_root("root.pem");
    let leaf = served_leaf(port, &root).await.expect("the issued certificate verifies against pebble's root");
    assert_eq!(curl_both(port, &root), ["1.1", "2"]);
    // The key is the gateway's secret: readable by its owner only.
    let key = pki.path().join("acme-gateway").join(format!("{HOST}.key"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", key.display());
    // So is the ACME account's key, kept in the state directory for the next orders.
    let accounts: Vec<_> = std::fs::read_dir(pki.path().join("acme-gateway"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("account-")))
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&accounts[0]).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", accounts[0].display());

    ca.stop();
    gw.restart();
    let port = https_port(&gw);
    let again =
        eventually(Duration::from_secs(10), "the stored certificate", || async { served_leaf(port, &root).await.ok() })
            .await;
    assert_eq!(again, leaf, "the restarted gateway serves what it stored");
    assert_eq!(issued(&gw).await, 0.0, "and ordered nothing");
}

/// An HTTP/2 connection to the edge over TLS verified against a root.
struct H2 {
    send: hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl H2 {
    async fn get(&mut self) -> u16 {
        let req = http::Request::get(format!("https://{HOST}/")).body(http_body_util::Empty::new()).unwrap();
        self.send.send_request(req).await.expect("a request on the open connection").status().as_u16()
    }
}

async fn h2_connection(port: u16, root: &Path) -> H2 {
    let mut tls = tls_client_trusting(root);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    H2 { send }
}

/// Two gateway replicas on one etcd: only the first can reach the CA (the second's directory
/// URL leads nowhere), and the CA validates at the second only. The certificate issues, so
/// the second answered the challenge the first published, and both serve it.
async fn replicas_share(challenge: &str) {
    if !tools_present() {
        return;
    }
    let Some(etcd) = support::etcd::Etcd::start().await else { return };
    let pki = Pki::new();
    let mut ca = Ca::new(pki.path());
    let store = format!("[gateway.store]\netcd = [{}]\nprefix = \"/acme-test\"\n", etcd.endpoints_toml());
    let nowhere = format!("https://{}/dir", dead_address().await);
    let one = replica(&pki, "gw-1", &ca.directory(), challenge, &store);
    let two = replica(&pki, "gw-2", &nowhere, challenge, &store);
    ca.start(two.addrs.listeners["http"].port(), https_port(&two)).await;
    eventually(Duration::from_secs(60), "the first replica's order", || async {
        (issued(&one).await >= 1.0).then_some(())
    })
    .await;
    let root = ca.issuing_root("root.pem");
    let leaf = served_leaf(https_port(&one), &root).await.expect("the first replica serves the certificate");
    let port = https_port(&two);
    let shared = eventually(Duration::from_secs(10), "the second replica to serve it", || {
        let root = root.clone();
        async move { served_leaf(port, &root).await.ok() }
    })
    .await;
    assert_eq!(shared, leaf, "one certificate for both replicas");
    assert_eq!(issued(&two).await, 0.0, "the second replica ordered nothing");
    assert_eq!(curl_both(port, &root), ["1.1", "2"]);
    assert!(two.log().contains("ACME certificate from another replica serving"), "{}", two.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_certificate_and_answer_tls_alpn_for_each_other() {
    replicas_share("tls-alpn-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_certificate_and_answer_http_01_for_each_other() {
    replicas_share("http-01").await;
}
