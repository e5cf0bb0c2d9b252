//! rustls configurations for mutual TLS 1.3 between mesh members.
//!
//! Servers require a client certificate chained to the mesh CA (`WebPkiClientVerifier`). Clients
//! verify the server chain against the same CA and then that the certificate carries exactly the
//! SPIFFE identity of the node they meant to reach: the TLS server name used when dialing is the
//! peer's node name, and `spiffe://<td>/node/<name>` must be among its URI SANs. The stock server
//! verifier cannot do this (it refuses URI-only certificates), hence [`MeshServerVerifier`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::{spiffe_ids, Credentials, SpiffeId};

/// ALPN of HTTP/3 between members: the control plane's, and the framing of requests with a
/// peer that offers no other (`transport::lean::ALPN` is the one nodes prefer).
pub const MESH_ALPN: &[u8] = b"h3";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mesh CA bundle is unusable: {0}")]
    Roots(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// The one crypto provider used everywhere (ring; see STACK-NOTES).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &Credentials) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in &creds.roots {
        store.add(cert.clone()).map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// Whether a mesh listener accepts peers without a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every peer must present a certificate of the mesh CA (node listeners).
    Required,
    /// Peers without a certificate may connect, for enrollment only; the listener must check
    /// `peer_identity` before serving anything else (the gateway's control listener).
    OptionalForEnrollment,
}

/// Server side of mesh mTLS: TLS 1.3 only, client certificate verified against the mesh CA.
pub fn mesh_server(creds: &Credentials, auth: ClientAuth) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots(creds)?, provider.clone());
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::OptionalForEnrollment => builder.allow_unauthenticated(),
    };
    let verifier = builder.build().map_err(|e| TlsError::Roots(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// Client side of mesh mTLS: presents our certificate, pins the peer's SPIFFE identity.
pub fn mesh_client(creds: &Credentials, trust_domain: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        trust: Trust::Roots(roots(creds)?),
        provider: provider.clone(),
        trust_domain: trust_domain.into(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Ok(cfg)
}

/// How a [`MeshServerVerifier`] knows the mesh CA.
#[derive(Debug)]
enum Trust {
    /// The CA bundle this member holds.
    Roots(Arc<RootCertStore>),
    /// Enrollment, before the member holds the CA: the server must present, among its chain, a
    /// CA certificate whose SHA-256 is this (hex) fingerprint.
    Pinned(String),
}

/// Verifies a mesh server: chain to the mesh CA, then the SPIFFE id named by the server name.
#[derive(Debug)]
pub struct MeshServerVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl MeshServerVerifier {
    /// For enrollment: trusts the CA with the pinned SHA-256 fingerprint that the server presents.
    pub fn pinned(fingerprint: &str, trust_domain: &str) -> Self {
        Self {
            trust: Trust::Pinned(fingerprint.to_ascii_lowercase().replace(':', "")),
            provider: provider(),
            trust_domain: trust_domain.into(),
        }
    }

    /// For enrollment by a node whose config names no trust domain: the pinned CA decides, and
    /// the server may be the named member of whatever trust domain that CA serves (the node
    /// learns it from the certificate it is issued).
    pub fn pinned_any_trust_domain(fingerprint: &str) -> Self {
        Self::pinned(fingerprint, ANY_TRUST_DOMAIN)
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned_roots;
        let roots = match &self.trust {
            Trust::Roots(r) => r.as_ref(),
            Trust::Pinned(fp) => {
                let ca = intermediates.iter().find(|c| crate::identity::fingerprint(c) == *fp).ok_or_else(|| {
                    rustls::Error::General("the gateway's CA does not match the pinned fingerprint".into())
                })?;
                let mut store = RootCertStore::empty();
                store.add(ca.clone().into_owned()).map_err(|_| CertificateError::BadEncoding)?;
                pinned_roots = store;
                &pinned_roots
            }
        };
        verify_node_server(end_entity, intermediates, server_name, now, roots, &self.provider, &self.trust_domain)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Stands for "whatever the pinned CA's trust domain is" (never a valid trust domain itself).
const ANY_TRUST_DOMAIN: &str = "*";

/// A server certificate chaining to `roots` and carrying the SPIFFE identity of the node named
/// by the TLS server name.
fn verify_node_server(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    now: UnixTime,
    roots: &RootCertStore,
    provider: &CryptoProvider,
    trust_domain: &str,
) -> Result<ServerCertVerified, rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )?;
    let ServerName::DnsName(name) = server_name else {
        return Err(CertificateError::NotValidForName.into());
    };
    let expected = SpiffeId::node(trust_domain, name.as_ref());
    let presented = spiffe_ids(end_entity);
    let any = trust_domain == ANY_TRUST_DOMAIN
        && presented.iter().any(|id| id.node_name() == Some(name.as_ref()) && !id.trust_domain.is_empty());
    if any || presented.contains(&expected) {
        Ok(ServerCertVerified::assertion())
    } else {
        let mismatch = IdentityMismatch { expected, presented };
        Err(CertificateError::Other(rustls::OtherError(Arc::new(mismatch))).into())
    }
}

/// A peer whose certificate names another member (or another trust domain) than the one
/// dialled: says both, so the operator can tell a wrong name from a wrong `mesh.trust_domain`.
struct IdentityMismatch {
    expected: SpiffeId,
    presented: Vec<SpiffeId>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let presented: Vec<String> = self.presented.iter().map(ToString::to_string).collect();
        let presented = if presented.is_empty() { "no SPIFFE identity".into() } else { presented.join(", ") };
        write!(f, "wrong identity: expected {}, the certificate is for {presented}", self.expected)
    }
}

// rustls prints the error inside with Debug: the same words.
impl std::fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for IdentityMismatch {}

/// The verified SPIFFE identity of a QUIC peer, if it presented one of our trust domain.
pub fn peer_identity(conn: &quinn::Connection, trust_domain: &str) -> Option<SpiffeId> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let first = certs.first()?;
    spiffe_ids(first).into_iter().find(|id| id.trust_domain == trust_domain)
}

/// Whether the peer's certificate is within its validity now. A resumed session carries the
/// certificate its first handshake verified, which may have expired since.
pub fn peer_certificate_current(conn: &quinn::Connection) -> bool {
    let Some(certs) = conn.peer_identity().and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok()) else {
        return false;
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    certs.first().and_then(|c| crate::identity::validity(c)).is_some_and(|(from, to)| from <= now && now < to)
}

/// A bounded label for why a handshake failed (for metrics and logs), read from the TLS alert
/// the connection closed with (ours or the peer's), never from error text. rustls sends
/// `unknown_ca` for an unknown issuer, `decrypt_error` for a bad signature, `certificate_expired`,
/// `certificate_required` when no certificate came, `bad_certificate` for a name mismatch and
/// `certificate_unknown` for the identity check's own refusal.
pub fn handshake_failure_reason(err: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
    let code = match err {
        E::TransportError(e) => u64::from(e.code),
        E::ConnectionClosed(close) => u64::from(close.error_code),
        E::TimedOut => return "timeout",
        _ => return "transport",
    };
    // QUIC carries a TLS alert as the transport error 0x100 + alert (RFC 9001 section 4.8).
    let Some(alert) = code.checked_sub(0x100).filter(|a| *a <= 0xff) else { return "transport" };
    match alert {
        48 | 51 => "unknown-ca",
        45 => "expired",
        116 => "no-certificate",
        42 | 46 => "wrong-identity",
        _ => "tls",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(error_code: quinn::TransportErrorCode, reason: &str) -> quinn::ConnectionError {
        let reason = bytes::Bytes::copy_from_slice(reason.as_bytes());
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose { error_code, frame_type: None, reason })
    }

    fn closed_with(alert: u8, reason: &str) -> quinn::ConnectionError {
        closed(quinn::TransportErrorCode::crypto(alert), reason)
    }

    #[test]
    fn handshake_failures_are_named_by_their_alert_not_their_words() {
        // The reason text is misleading on purpose: only the alert counts.
        assert_eq!(handshake_failure_reason(&closed_with(48, "expired")), "unknown-ca");
        assert_eq!(handshake_failure_reason(&closed_with(45, "UnknownIssuer")), "expired");
        assert_eq!(handshake_failure_reason(&closed_with(116, "")), "no-certificate");
        assert_eq!(handshake_failure_reason(&closed_with(46, "")), "wrong-identity");
        assert_eq!(handshake_failure_reason(&closed_with(40, "")), "tls");
        assert_eq!(handshake_failure_reason(&quinn::ConnectionError::TimedOut), "timeout");
        let plain = closed(quinn::TransportErrorCode::PROTOCOL_VIOLATION, "TLS UnknownIssuer");
        assert_eq!(handshake_failure_reason(&plain), "transport");
    }
}
