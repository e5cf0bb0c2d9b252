//! Edge TLS: certificates from PEM files chosen by SNI, or a self-signed development
//! certificate when none are configured. TLS 1.2+ on TCP (ALPN h2, http/1.1), TLS 1.3 on QUIC.

use std::collections::HashMap;
use std::sync::Arc;

use quicmesh_shared::config::watch::FileWatch;
use quicmesh_shared::config::{EdgeLimits, FrontendMode, GatewayConfig};
use quicmesh_shared::identity::tls::provider;
use quicmesh_shared::identity::{self, read_certs, read_key};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::warn;

use crate::GatewayError;

/// Picks the certificate by SNI, falling back to the first configured one.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_sni = hello.server_name().and_then(|n| {
            let n = n.to_ascii_lowercase();
            self.by_name
                .get(&n)
                .or_else(|| n.split_once('.').and_then(|(_, parent)| self.by_name.get(&format!("*.{parent}"))))
        });
        Some(by_sni.unwrap_or(&self.default).clone())
    }
}

fn resolver(gc: &GatewayConfig) -> Result<SniResolver, GatewayError> {
    let provider = provider();
    let certified =
        |chain, key| CertifiedKey::from_der(chain, key, &provider).map_err(|e| GatewayError::Tls(e.to_string()));
    if gc.certificates.is_empty() {
        let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        let (cert, key) = identity::self_signed(&names)?;
        warn!("no gateway.certificates configured: serving a self-signed development certificate for localhost");
        let ck = Arc::new(certified(vec![cert], key)?);
        return Ok(SniResolver { by_name: HashMap::new(), default: ck });
    }
    let mut by_name = HashMap::new();
    let mut default = None;
    for c in &gc.certificates {
        let ck = Arc::new(certified(read_certs(&c.cert)?, read_key(&c.key)?)?);
        for name in &c.hostnames {
            by_name.insert(name.to_ascii_lowercase(), ck.clone());
        }
        default.get_or_insert(ck);
    }
    let default = default.ok_or_else(|| GatewayError::Tls("no certificate".into()))?;
    Ok(SniResolver { by_name, default })
}

/// The edge certificates, swappable while clients connect: a new handshake sees the new ones.
#[derive(Debug)]
pub struct Certificates(arc_swap::ArcSwap<SniResolver>);

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().resolve(hello)
    }
}

/// Reloads the edge certificates when their files change (renewed by an ACME client, say),
/// once they have held still for one interval; a broken pair is refused and the old one stays.
pub fn watch_certificates(gc: GatewayConfig, certs: Arc<Certificates>) -> impl std::future::Future<Output = ()> + Send {
    let files: Vec<_> = gc.certificates.iter().flat_map(|c| [c.cert.clone(), c.key.clone()]).collect();
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
        match resolver(&gc) {
            Ok(r) => {
                certs.0.store(Arc::new(r));
                tracing::info!("edge certificates reloaded");
            }
            Err(e) => warn!(error = %e, "edge certificate change refused; serving the previous certificates"),
        }
    }
}

/// (TCP config, QUIC config) sharing one certificate resolver.
pub fn edge_configs(
    gc: &GatewayConfig,
) -> Result<(rustls::ServerConfig, rustls::ServerConfig, Arc<Certificates>), GatewayError> {
    let certs = Arc::new(Certificates(arc_swap::ArcSwap::from_pointee(resolver(gc)?)));
    let resolver = certs.clone();
    let tls_err = |e: rustls::Error| GatewayError::Tls(e.to_string());
    let clients = client_verifier(gc)?;
    let mut tcp = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?
        .with_client_cert_verifier(clients.clone())
        .with_cert_resolver(resolver.clone());
    tcp.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut quic = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(resolver);
    quic.alpn_protocols = vec![b"h3".to_vec()];
    // 0-RTT on QUIC: the edge takes early requests of safe methods at once and holds the others
    // until the handshake completes (a replayed flight never completes it); see `h3_edge`.
    // Not with client certificates: early data arrives before the client's is checked.
    if gc.frontend_validation.is_none() {
        quic.max_early_data_size = u32::MAX;
    }
    Ok((tcp, quic, certs))
}

/// What the edge asks of clients' certificates: nothing, or `gateway.frontend_validation`.
fn client_verifier(gc: &GatewayConfig) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, GatewayError> {
    let Some(fv) = &gc.frontend_validation else {
        return Ok(rustls::server::WebPkiClientVerifier::no_client_auth());
    };
    let mut roots = rustls::RootCertStore::empty();
    for file in &fv.ca_certificates {
        for cert in read_certs(file)? {
            roots.add(cert).map_err(|e| GatewayError::Tls(format!("{}: {e}", file.display())))?;
        }
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match fv.mode {
        FrontendMode::AllowValidOnly => builder,
        FrontendMode::AllowInsecureFallback => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|e| GatewayError::Tls(format!("gateway.frontend_validation: {e}")))
}

/// The request header that carries a verified client certificate's subject upstream; what a
/// client sends under that name is always dropped.
pub const CLIENT_SUBJECT: http::HeaderName = http::HeaderName::from_static("x-client-cert-subject");

/// The header value naming the subject of a client's verified certificate chain, if it sent one.
pub fn client_subject(chain: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<http::HeaderValue> {
    let subject = identity::subject_of(chain?.first()?)?;
    http::HeaderValue::from_str(&subject).ok()
}

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
