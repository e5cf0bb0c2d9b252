//! Enrollment of fresh hosts with join tokens: a good token, an expired one, a reused one, and
//! a gateway that does not match the pinned CA fingerprint.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

struct Setup {
    gw: NodeProc,
    fingerprint: String,
    pki: Pki,
}

fn setup() -> Setup {
    let pki = Pki::new();
    let state = pki.issue("gateway");
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n{TRANSPORT}\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n[gateway.tls]\nstate_dir = \"{}\"\n",
        state.display()
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let fingerprint = cli(&["ca", "fingerprint", "--dir", &state.display().to_string()]).trim().to_string();
    Setup { gw, fingerprint, pki }
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(out.status.success(), "quicmesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn token(s: &Setup, ttl: &str) -> String {
    cli(&["token", "create", "--dir", &s.pki.path().display().to_string(), "--ttl", ttl]).trim().to_string()
}

/// A fresh node's config: its own empty state directory, joined to nothing yet.
fn fresh_node(dir: &Path, name: &str) -> std::path::PathBuf {
    let state = dir.join(format!("{name}-state"));
    let toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n{TRANSPORT}\n[node]\nname = \"{name}\"\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[node.tls]\nstate_dir = \"{}\"\n",
        state.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs a join that must fail; returns its error text.
fn failing_join(s: &Setup, name: &str, token: &str, fingerprint: &str) -> String {
    let config = fresh_node(s.pki.path(), name);
    let control = s.gw.addrs.control.to_string();
    let mut child = Command::new(bin())
        .args(["node", "--config"])
        .arg(&config)
        .args(["--join", &control, "--token", token, "--ca-fingerprint", fingerprint])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A join that succeeded runs the node on: ended here, and failed as such.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the join of {name} succeeded: the node is running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the join of {name} succeeded");
    let state = s.pki.path().join(format!("{name}-state"));
    assert!(!state.join(format!("{name}.pem")).exists(), "a certificate was written for {name}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_token_enrolls_a_fresh_node_which_then_joins_the_mesh() {
    let mut s = setup();
    let tok = token(&s, "1h");
    let config = fresh_node(s.pki.path(), "fresh");
    let toml = std::fs::read_to_string(&config).unwrap();
    let control = s.gw.addrs.control.to_string();
    let node = NodeProc::start_args(
        "node",
        s.pki.path(),
        "fresh",
        &toml,
        &["--join", &control, "--token", &tok, "--ca-fingerprint", &s.fingerprint],
    );
    let state = s.pki.path().join("fresh-state");
    let ids = quicmesh_shared::identity::read_certs(&state.join("fresh.pem")).unwrap();
    assert_eq!(
        quicmesh_shared::identity::spiffe_ids(&ids[0]),
        vec![quicmesh_shared::identity::SpiffeId::node(TD, "fresh")]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("fresh.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // It joined the control plane with its new identity.
    eventually(Duration::from_secs(10), "the gateway to list the enrolled node", || async {
        let st = s.gw.admin_json("/nodes").await;
        st["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "fresh" && n["connected"] == true).then_some(())
    })
    .await;
    // The token is spent: a second host cannot use it, and gets nothing.
    let err = failing_join(&s, "second", &tok, &s.fingerprint);
    assert!(err.contains("already used"), "{err}");
    // The token never appears in the gateway's state.
    assert!(!std::fs::read_to_string(s.pki.path().join("tokens.json")).unwrap().contains(&tok));
    // No log, no /config_dump, holds the token or any private key: the PEM marker, or any
    // line of the base64 of the CA's, the gateway's or the node's key.
    let mut seen = Vec::new();
    for (what, n) in [("gateway /config_dump", &s.gw), ("node /config_dump", &node)] {
        seen.push((what, http_get(&format!("http://{}/config_dump", n.addrs.admin)).await.1));
    }
    // The logs once both have stopped: every line written, none still queued.
    let mut node = node;
    node.terminate();
    s.gw.terminate();
    seen.push(("gateway log", s.gw.log()));
    seen.push(("node log", node.log()));
    let mut secrets = vec![tok.clone(), "PRIVATE KEY".to_string()];
    for key in [s.pki.path().join("ca.key"), s.pki.path().join("gateway.key"), state.join("fresh.key")] {
        let pem = std::fs::read_to_string(&key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        secrets.extend(pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16).map(str::to_string));
    }
    assert!(secrets.len() > 5, "no key material read");
    for (what, text) in &seen {
        assert!(text.len() > 100, "{what} is empty");
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} shows a secret ({}...)", &secret[..8.min(secret.len())]);
        }
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let s = setup();
    let tok = token(&s, "0s");
    let err = failing_join(&s, "late", &tok, &s.fingerprint);
    assert!(err.contains("expired"), "{err}");
    let m = s.gw.metrics().await;
    assert_eq!(metric(&m, "quicmesh_enrollments_total", &[("result", "refused")]), 1.0);
    assert_eq!(metric(&m, "quicmesh_enrollments_total", &[("result", "issued")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_does_not_match_the_pinned_ca_gets_no_token() {
    let s = setup();
    // Made through the running gateway's admin API this time (kept in its state directory).
    let admin = s.gw.addrs.admin.to_string();
    let tok = cli(&["token", "create", "--admin", &admin, "--ttl", "1h"]).trim().to_string();
    assert!(tok.starts_with("qm1."), "{tok}");
    let out = Command::new(bin()).args(["token", "create", "--admin", &admin, "--uses", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("uses=\"0\" is not a count above 0"), "{err}");
    let wrong = "00".repeat(32);
    let err = failing_join(&s, "careful", &tok, &wrong);
    assert!(err.contains("pinned fingerprint"), "{err}");
    // The token was never sent, so it is still good.
    let config = fresh_node(s.pki.path(), "careful2");
    let control = s.gw.addrs.control.to_string();
    let toml = std::fs::read_to_string(&config).unwrap();
    let node = NodeProc::start_args(
        "node",
        s.pki.path(),
        "careful2",
        &toml,
        &["--join", &control, "--token", &tok, "--ca-fingerprint", &s.fingerprint],
    );
    assert!(s.pki.path().join("careful2-state/careful2.pem").exists());
    drop(node);
}

/// An unbound token cannot mint the gateway's identity, a name already in the mesh, or the name
/// of a node that is away but holds a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_claim_the_gateway_or_a_member_name() {
    let s = setup();
    let err = failing_join(&s, "gateway", &token(&s, "1h"), &s.fingerprint);
    assert!(err.contains("belongs to the gateway"), "{err}");
    // Enroll "taken" properly, then try to enroll the same name again with a fresh token.
    let tok = token(&s, "1h");
    let config = fresh_node(s.pki.path(), "taken");
    let toml = std::fs::read_to_string(&config).unwrap();
    let control = s.gw.addrs.control.to_string();
    let node = NodeProc::start_args(
        "node",
        s.pki.path(),
        "taken",
        &toml,
        &["--join", &control, "--token", &tok, "--ca-fingerprint", &s.fingerprint],
    );
    eventually(Duration::from_secs(10), "taken to register", || async {
        let st = s.gw.admin_json("/nodes").await;
        st["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "taken").then_some(())
    })
    .await;
    let again = token(&s, "1h");
    let state = s.pki.path().join("taken-state");
    std::fs::remove_dir_all(&state).unwrap();
    let out = Command::new(bin())
        .args(["node", "--config"])
        .arg(&config)
        .args(["--join", &control, "--token", &again, "--ca-fingerprint", &s.fingerprint])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already in the mesh"), "{err}");
    assert!(!state.join("taken.pem").exists());
    // Gone from the registry (it said goodbye), it still holds a certificate for the name: an
    // unbound token does not get a second one (which would let its holder pose as the node).
    drop(node);
    // Killed: gone once its connection times out (3 s here) and `node_grace` (10 s) passes.
    eventually(Duration::from_secs(40), "taken to leave the registry", || async {
        let st = s.gw.admin_json("/nodes").await;
        (!st["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "taken")).then_some(())
    })
    .await;
    let err = failing_join(&s, "taken", &token(&s, "1h"), &s.fingerprint);
    assert!(err.contains("holds a certificate") && err.contains("--node taken"), "{err}");
    // A token bound to the name re-enrolls it (a host that lost its state).
    let bound = cli(&["token", "create", "--dir", &s.pki.path().display().to_string(), "--node", "taken"]);
    let node = NodeProc::start_args(
        "node",
        s.pki.path(),
        "taken",
        &toml,
        &["--join", &control, "--token", bound.trim(), "--ca-fingerprint", &s.fingerprint],
    );
    eventually(Duration::from_secs(10), "taken to register again", || async {
        let st = s.gw.admin_json("/nodes").await;
        st["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "taken").then_some(())
    })
    .await;
    drop(node);
}

/// #20: a join names both identities when the trust domains differ (not rustls'
/// `NotValidForName`), and waits, saying so, for a gateway that does not answer yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_explains_a_trust_domain_mismatch_and_waits_for_a_silent_gateway() {
    let s = setup();
    let tok = token(&s, "1h");
    let config = fresh_node(s.pki.path(), "elsewhere");
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace(TD, "other.example")).unwrap();
    let out = Command::new(bin())
        .args(["node", "--config"])
        .arg(&config)
        .args(["--join", &s.gw.addrs.control.to_string(), "--token", &tok, "--ca-fingerprint", &s.fingerprint])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let expected =
        format!("expected spiffe://other.example/node/gateway, the certificate is for spiffe://{TD}/node/gateway");
    assert!(err.contains(&expected), "{err}");

    // Nothing answers at this address: the node waits and says so, rather than failing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let log = s.pki.path().join("waiting.log");
    let mut child = Command::new(bin())
        .args(["node", "--config"])
        .arg(fresh_node(s.pki.path(), "patient"))
        .args([
            "--join",
            &silent.local_addr().unwrap().to_string(),
            "--token",
            &tok,
            "--ca-fingerprint",
            &s.fingerprint,
        ])
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "the node to say it waits", || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the gateway does not answer; waiting for it and retrying")
            .then_some(())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "it keeps waiting");
    let _ = child.kill();
    let _ = child.wait();
}

/// #20: enrollment "with nothing but a config naming the node": no trust domain, no
/// `[node.gateway]`. The node learns the trust domain from the certificate it is issued, and,
/// restarted without `--join`, rejoins the control plane it used, in that trust domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_naming_only_the_node_is_enough_to_enroll_and_to_restart() {
    let s = setup();
    let tok = token(&s, "1h");
    let state = s.pki.path().join("bare-state");
    let toml = format!(
        "[node]\nname = \"bare\"\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[node.tls]\nstate_dir = \"{}\"\n",
        state.display()
    );
    let control = s.gw.addrs.control.to_string();
    let joined = |s: &Setup| {
        let gw = s.gw.addrs.admin;
        async move {
            let st: serde_json::Value =
                serde_json::from_str(&http_get(&format!("http://{gw}/nodes")).await.1).unwrap_or_default();
            let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
            nodes.iter().any(|n| n["name"] == "bare" && n["connected"] == true).then_some(())
        }
    };
    let node = NodeProc::start_args(
        "node",
        s.pki.path(),
        "bare",
        &toml,
        &["--join", &control, "--token", &tok, "--ca-fingerprint", &s.fingerprint],
    );
    eventually(Duration::from_secs(10), "the bare node to join", || joined(&s)).await;
    node.log_with(&["the config names no mesh.trust_domain: using the one of this node's certificate", TD]).await;
    // The gateway counts the node connected before the node has its answer and writes down
    // where the control plane is: wait for that file, or a quick restart finds none.
    let kept = state.join("bare.control.json");
    eventually(Duration::from_secs(10), "the node to keep its control plane", || async { kept.exists().then_some(()) })
        .await;
    drop(node);
    eventually(Duration::from_secs(10), "the bare node to leave", || async {
        joined(&s).await.is_none().then_some(())
    })
    .await;
    // Same config, no flags: the certificate, the trust domain and the control plane are known.
    let again = NodeProc::start(s.pki.path(), "bare-again", &toml);
    eventually(Duration::from_secs(10), "the bare node to rejoin", || joined(&s)).await;
    again.log_with(&["joining the one this node last used"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_named_as_kubernetes_names_hosts_enrolls_and_joins() {
    // EKS names its nodes after their DNS names; the DaemonSet passes `spec.nodeName` as
    // node.name. Such a name used to be refused ("not a valid node name").
    let s = setup();
    let name = "ip-10-0-0-5.ec2.internal";
    let tok = cli(&["token", "create", "--dir", &s.pki.path().display().to_string(), "--ttl", "1h", "--node", name]);
    let config = fresh_node(s.pki.path(), name);
    let toml = std::fs::read_to_string(&config).unwrap();
    let control = s.gw.addrs.control.to_string();
    let _node = NodeProc::start_args(
        "node",
        s.pki.path(),
        name,
        &toml,
        &["--join", &control, "--token", tok.trim(), "--ca-fingerprint", &s.fingerprint],
    );
    let cert = s.pki.path().join(format!("{name}-state")).join(format!("{name}.pem"));
    let ids = quicmesh_shared::identity::read_certs(&cert).unwrap();
    assert_eq!(
        quicmesh_shared::identity::spiffe_ids(&ids[0]),
        vec![quicmesh_shared::identity::SpiffeId::node(TD, name)]
    );
    eventually(Duration::from_secs(10), "the gateway to list the node under its dotted name", || async {
        let st = s.gw.admin_json("/nodes").await;
        st["nodes"].as_array().unwrap().iter().any(|n| n["name"] == name && n["connected"] == true).then_some(())
    })
    .await;
}

/// A connection without a certificate gets one enrollment request served, whatever it opens:
/// QUIC lets it open 16 streams before the gateway knows it has no certificate, and each was
/// served (each asking the token store: with etcd, a request to etcd per stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_certificate_gets_one_enrollment_request() {
    let s = setup();
    // No client certificate (the edge's test client, pointed at the control listener).
    let (_ep, send) = h3_connect(s.gw.addrs.control.port()).await;
    let body = br#"{"name":"guess","token":"qm1.00","csr":"-"}"#;
    let tries = (0..16).map(|_| {
        let mut send = send.clone();
        async move {
            let req = http::Request::post("https://gateway/quicmesh.enroll/v1").body(()).unwrap();
            let mut stream = send.send_request(req).await.ok()?;
            stream.send_data(bytes::Bytes::from_static(body)).await.ok()?;
            stream.finish().await.ok()?;
            Some(stream.recv_response().await.ok()?.status())
        }
    });
    let answered = tokio::time::timeout(Duration::from_secs(20), futures_util::future::join_all(tries))
        .await
        .expect("the requests neither answered nor ended");
    let answered: Vec<_> = answered.into_iter().flatten().collect();
    assert_eq!(answered.len(), 1, "{answered:?}");
    let m = s.gw.metrics().await;
    assert_eq!(metric(&m, "quicmesh_enrollments_total", &[("result", "refused")]), 1.0, "{m}");
}
