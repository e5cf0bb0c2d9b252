//! Edge TLS: certificates from PEM files chosen by SNI, or a self-signed development
//! certificate when none are configured. TLS 1.2+ on TCP (ALPN h2, http/1.1), TLS 1.3 on QUIC.

use std::collections::HashMap;
use std::sync::Arc;

use quicmesh_shared::config::watch::FileWatch;
use quicmesh_shared::config::{EdgeCertificate, EdgeLimits, FrontendMode, GatewayConfig};
use quicmesh_shared::identity::tls::provider;
use quicmesh_shared::identity::{self, read_certs, read_key};
use quicmesh_shared::policy::listener::rank;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::warn;

use crate::acme::{Acme, ACME_TLS_ALPN};
use crate::GatewayError;

/// Picks a certificate by SNI among a set of certificates, falling back to the first.
#[derive(Debug, Clone)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        self.named(sni).unwrap_or_else(|| self.default.clone())
    }

    /// The certificate naming `sni` exactly or by wildcard.
    fn named(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let n = sni?;
        self.by_name
            .get(n)
            .or_else(|| n.split_once('.').and_then(|(_, parent)| self.by_name.get(&format!("*.{parent}"))))
            .cloned()
    }

    fn load(certificates: &[EdgeCertificate]) -> Result<Option<Self>, GatewayError> {
        let provider = provider();
        let mut by_name = HashMap::new();
        let mut default = None;
        for c in certificates {
            let ck = CertifiedKey::from_der(read_certs(&c.cert)?, read_key(&c.key)?, &provider)
                .map_err(|e| GatewayError::Tls(e.to_string()))?;
            let ck = Arc::new(ck);
            for name in &c.hostnames {
                by_name.insert(name.to_ascii_lowercase(), ck.clone());
            }
            default.get_or_insert(ck);
        }
        Ok(default.map(|default| Self { by_name, default }))
    }
}

/// The certificates of one port: a server name first picks its listener (as requests do), and
/// that listener's certificates answer, or the gateway's (`gateway.certificates`) when it has
/// none, then the one ACME issued for the name; with no certificate anywhere, a self-signed
/// development certificate. A TLS-ALPN-01 validation (ALPN `acme-tls/1`) gets the challenge
/// certificate of its name, or nothing.
#[derive(Debug)]
struct PortResolver {
    /// Terminating listeners of the port: hostname, own certificates.
    listeners: Vec<(Option<String>, Option<SniResolver>)>,
    fallback: SniResolver,
    acme: Option<Arc<Acme>>,
}

impl ResolvesServerCert for PortResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        if let Some(acme) = &self.acme {
            if hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN)) {
                return acme.challenge_certificate(sni.as_deref()?);
            }
        }
        let own = self
            .listeners
            .iter()
            .filter_map(|(h, certs)| Some((rank(h.as_deref(), sni.as_deref().unwrap_or_default())?, certs)))
            .max_by_key(|(r, _)| *r)
            .and_then(|(_, certs)| certs.as_ref());
        if let Some(own) = own {
            return Some(own.pick(sni.as_deref()));
        }
        let issued = || self.acme.as_ref()?.certificate(sni.as_deref()?);
        Some(self.fallback.named(sni.as_deref()).or_else(issued).unwrap_or_else(|| self.fallback.default.clone()))
    }
}

fn resolver(gc: &GatewayConfig, port: u16, acme: Option<&Arc<Acme>>) -> Result<PortResolver, GatewayError> {
    let mut listeners = Vec::new();
    for (_, l) in gc.all_listeners() {
        if l.port == port && l.terminates() {
            let certs = SniResolver::load(&l.certificates)?;
            listeners.push((l.hostname.as_ref().map(|h| h.to_ascii_lowercase()), certs));
        }
    }
    let fallback = match SniResolver::load(&gc.certificates)? {
        Some(r) => r,
        None => match listeners.iter().find_map(|(_, c)| c.clone()) {
            Some(r) => r,
            None => {
                let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
                let (cert, key) = identity::self_signed(&names)?;
                if acme.is_none() {
                    warn!(
                        port,
                        "no certificates configured: serving a self-signed development certificate for localhost"
                    );
                }
                let ck = CertifiedKey::from_der(vec![cert], key, &provider())
                    .map_err(|e| GatewayError::Tls(e.to_string()))?;
                SniResolver { by_name: HashMap::new(), default: Arc::new(ck) }
            }
        },
    };
    Ok(PortResolver { listeners, fallback, acme: acme.cloned() })
}

/// The edge certificates of one port, swappable while clients connect: a new handshake sees
/// the new ones.
#[derive(Debug)]
pub struct Certificates {
    port: u16,
    current: arc_swap::ArcSwap<PortResolver>,
    acme: Option<Arc<Acme>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().resolve(hello)
    }
}

/// The certificate and key files a port serves.
fn files_of(gc: &GatewayConfig, port: u16) -> Vec<std::path::PathBuf> {
    let listeners = gc.all_listeners();
    let own = listeners.iter().filter(|(_, l)| l.port == port).flat_map(|(_, l)| l.certificates.clone());
    gc.certificates.iter().cloned().chain(own).flat_map(|c| [c.cert, c.key]).collect()
}

/// Reloads a port's certificates when their files change (renewed by an ACME client, say),
/// once they have held still for one interval; a broken pair is refused and the old one stays.
pub fn watch_certificates(gc: GatewayConfig, certs: Arc<Certificates>) -> impl std::future::Future<Output = ()> + Send {
    let files = files_of(&gc, certs.port);
    // Watched from this call on (see `FileWatch`), when there is anything to watch.
    let watch =
        (!files.is_empty()).then(|| FileWatch::new(move || files.clone(), gc.watch_interval, gc.watch_interval));
    async move {
        if let Some(watch) = watch {
            reload_certificates(gc, certs, watch).await;
        }
    }
}

async fn reload_certificates<F: Fn() -> Vec<std::path::PathBuf>>(
    gc: GatewayConfig,
    certs: Arc<Certificates>,
    mut watch: FileWatch<F>,
) {
    loop {
        watch.changed().await;
        match resolver(&gc, certs.port, certs.acme.as_ref()) {
            Ok(r) => {
                certs.current.store(Arc::new(r));
                tracing::info!(port = certs.port, "edge certificates reloaded");
            }
            Err(e) => warn!(error = %e, "edge certificate change refused; serving the previous certificates"),
        }
    }
}

/// The TLS of one edge port.
pub struct EdgeTls {
    /// TCP (TLS 1.2+, ALPN h2 and http/1.1).
    pub tcp: rustls::ServerConfig,
    /// QUIC (TLS 1.3, ALPN h3).
    pub quic: rustls::ServerConfig,
    pub certs: Arc<Certificates>,
    /// The client certificates the port asks for.
    pub clients: Option<Arc<ClientCerts>>,
}

/// The TCP and QUIC configs of one port, sharing one certificate resolver.
pub fn edge_configs(gc: &GatewayConfig, port: u16, acme: Option<&Arc<Acme>>) -> Result<EdgeTls, GatewayError> {
    let current = arc_swap::ArcSwap::from_pointee(resolver(gc, port, acme)?);
    let certs = Arc::new(Certificates { port, current, acme: acme.cloned() });
    let resolver = certs.clone();
    let tls_err = |e: rustls::Error| GatewayError::Tls(e.to_string());
    let clients = client_certs(gc, port)?.map(Arc::new);
    let verifier = clients.as_ref().map_or_else(
        || rustls::server::WebPkiClientVerifier::no_client_auth(),
        |c| match c.mode {
            FrontendMode::AllowValidOnly => c.strict.clone(),
            FrontendMode::AllowInsecureFallback => Arc::new(Fallback(c.strict.clone())),
        },
    );
    let mut tcp = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(resolver.clone());
    tcp.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Offered only to the ACME CA's validation connections: browsers never ask for it.
    if acme.is_some_and(|a| a.tls_alpn()) {
        tcp.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    let mut quic = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    quic.alpn_protocols = vec![b"h3".to_vec()];
    // 0-RTT on QUIC: the edge takes early requests of safe methods at once and holds the others
    // until the handshake completes (a replayed flight never completes it); see `h3_edge`.
    // Not with client certificates: early data arrives before the client's is checked.
    if clients.is_none() {
        quic.max_early_data_size = u32::MAX;
    }
    Ok(EdgeTls { tcp, quic, certs, clients })
}

/// What one port asks of clients' certificates (`gateway.frontend_validation`).
#[derive(Debug)]
pub struct ClientCerts {
    /// Checks a certificate against the port's CAs, absent certificates refused.
    strict: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    mode: FrontendMode,
}

impl ClientCerts {
    /// The header value naming the subject of a client's certificate when it is valid. Under
    /// `AllowInsecureFallback` the handshake let any certificate in, so it is checked here.
    pub fn subject(&self, chain: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<http::HeaderValue> {
        let (end, intermediates) = chain?.split_first()?;
        if self.mode == FrontendMode::AllowInsecureFallback
            && self.strict.verify_client_cert(end, intermediates, rustls::pki_types::UnixTime::now()).is_err()
        {
            return None;
        }
        let subject = identity::subject_of(end)?;
        http::HeaderValue::from_str(&subject).ok()
    }
}

fn client_certs(gc: &GatewayConfig, port: u16) -> Result<Option<ClientCerts>, GatewayError> {
    let Some((files, mode)) = gc.frontend_validation.as_ref().and_then(|fv| fv.for_port(port)) else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for file in files {
        for cert in read_certs(file)? {
            roots.add(cert).map_err(|e| GatewayError::Tls(format!("{}: {e}", file.display())))?;
        }
    }
    let strict = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| GatewayError::Tls(format!("gateway.frontend_validation: {e}")))?;
    Ok(Some(ClientCerts { strict, mode }))
}

/// `AllowInsecureFallback`: asks for a certificate and lets every client in, with one or not;
/// [`ClientCerts::subject`] checks it. The handshake's signature still proves the client
/// holds the key of what it sent.
#[derive(Debug)]
struct Fallback(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for Fallback {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The request header that carries a verified client certificate's subject upstream; what a
/// client sends under that name is always dropped.
pub const CLIENT_SUBJECT: http::HeaderName = http::HeaderName::from_static("x-client-cert-subject");

/// The QUIC server config of the edge listener.
pub fn quic_server(tls: rustls::ServerConfig, limits: &EdgeLimits) -> Result<quinn::ServerConfig, GatewayError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| GatewayError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // As between nodes: the configured number stays usable in full despite QUIC's batched credit.
    let streams = quicmesh_shared::transport::advertised_streams(limits.max_concurrent_streams);
    transport.max_concurrent_bidi_streams(streams.into()).max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout)
            .map_err(|e| GatewayError::Tls(format!("idle_timeout: {e}")))?,
    ));
    server.transport_config(Arc::new(transport));
    quicmesh_shared::transport::admission::bound_queue(&mut server);
    Ok(server)
}
