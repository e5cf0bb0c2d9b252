//! Joining the mesh from a fresh host: make a key here, send a signing request with a join
//! token to the gateway, verified against the pinned CA fingerprint, and store what comes back.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http::{Method, Request};
use quicmesh_shared::config::{Config, ConfigError};
use quicmesh_shared::control::enroll::{EnrollRequest, EnrollResponse, ENROLL_PATH};
use quicmesh_shared::identity::tls::{provider, MeshServerVerifier, MESH_ALPN};
use quicmesh_shared::identity::{self, write_secret};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the config has no [node] section")]
    NoNode,
    #[error("key generation: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("cannot reach the gateway at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// Nothing answered: the gateway may not be up yet (worth another try).
    #[error("the gateway at {0} does not answer")]
    NoAnswer(SocketAddr),
    #[error("the gateway refused enrollment: {0}")]
    Refused(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
}

/// Enrolls this node unless its certificate and key already exist. Returns whether it enrolled.
/// With `learn_trust_domain` (the config names none) the gateway may be of any trust domain its
/// pinned CA serves: the certificate issued says which (see [`trust_domain_of`]).
pub async fn join(
    config: &Config,
    gateway: SocketAddr,
    gateway_name: &str,
    token: &str,
    fingerprint: &str,
    learn_trust_domain: bool,
) -> Result<bool, JoinError> {
    let nc = config.node.as_ref().ok_or(JoinError::NoNode)?;
    let paths = nc.tls.resolve(&nc.name, "node")?;
    if paths.cert.exists() && paths.key.exists() {
        info!(cert = %paths.cert.display(), "already enrolled; not using the join token");
        return Ok(false);
    }
    let (key_pem, csr) = identity::signing_request(&nc.name)?;
    let connect_err = |reason: String| JoinError::Connect { addr: gateway, reason };
    // Trust the gateway only if it chains to the pinned CA: the token must not go anywhere else.
    let verifier = if learn_trust_domain {
        MeshServerVerifier::pinned_any_trust_domain(fingerprint)
    } else {
        MeshServerVerifier::pinned(fingerprint, &config.mesh.trust_domain)
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| connect_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| connect_err(e.to_string()))?;
    let bind: SocketAddr = if gateway.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal address");
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    // A gateway that does not answer is reported (and waited for) after 5 s, not quinn's 30.
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    let conn = match endpoint.connect(gateway, gateway_name).map_err(|e| connect_err(e.to_string()))?.await {
        Ok(c) => c,
        Err(quinn::ConnectionError::TimedOut) => return Err(JoinError::NoAnswer(gateway)),
        Err(e) => return Err(connect_err(e.to_string())),
    };
    let (mut driver, mut send) =
        h3::client::new(h3_quinn::Connection::new(conn)).await.map_err(|e| connect_err(e.to_string()))?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let body = serde_json::to_vec(&EnrollRequest { name: nc.name.clone(), token: token.to_string(), csr })
        .map_err(|e| connect_err(e.to_string()))?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{gateway_name}{ENROLL_PATH}"))
        .body(())
        .expect("static request");
    let mut stream = send.send_request(req).await.map_err(|e| connect_err(e.to_string()))?;
    stream.send_data(Bytes::from(body)).await.map_err(|e| connect_err(e.to_string()))?;
    stream.finish().await.map_err(|e| connect_err(e.to_string()))?;
    let resp = stream.recv_response().await.map_err(|e| connect_err(e.to_string()))?;
    let mut answer = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| connect_err(e.to_string()))? {
        answer.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        if answer.len() > 1 << 20 {
            return Err(JoinError::Refused("oversized answer".into()));
        }
    }
    if !resp.status().is_success() {
        let reason = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| resp.status().to_string());
        return Err(JoinError::Refused(reason));
    }
    let issued: EnrollResponse =
        serde_json::from_slice(&answer).map_err(|e| JoinError::Refused(format!("unreadable answer: {e}")))?;
    let write = |path: &Path, data: &str, secret: bool| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let res = if secret {
            write_secret(path, data.as_bytes()).map_err(|e| e.to_string())
        } else {
            std::fs::write(path, data).map_err(|e| e.to_string())
        };
        res.map_err(|reason| JoinError::Write { path: path.display().to_string(), reason })
    };
    write(&paths.key, &key_pem, true)?;
    write(&paths.ca, &issued.ca, false)?;
    write(&paths.cert, &issued.certificate, false)?;
    info!(node = nc.name, cert = %paths.cert.display(), "enrolled with the gateway");
    endpoint.close(0u32.into(), b"enrolled");
    Ok(true)
}

/// The trust domain named by the certificate at `cert` (a member's own), if it names one.
pub fn trust_domain_of(cert: &Path) -> Option<String> {
    let certs = identity::read_certs(cert).ok()?;
    identity::spiffe_ids(certs.first()?).into_iter().next().map(|id| id.trust_domain)
}
