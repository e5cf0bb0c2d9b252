//! TLS to instances that want it (`services[].backend_tls`, the Gateway API's
//! BackendTLSPolicy): a connector for hyper-util's pooled client that dials TCP and then
//! speaks TLS, checking the instance's certificate against the service's CAs and host name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::BackendTls;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Dials TCP, then TLS with one service's trust and name.
#[derive(Clone)]
pub struct TlsConnect {
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl TlsConnect {
    /// A connector for instances of a service with `policy`, offering `alpn` (`h2` for h2c
    /// services, which then speak HTTP/2 over TLS; `http/1.1` otherwise).
    pub fn new(tcp: HttpConnector, policy: &BackendTls, alpn: &[u8]) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let system = policy.well_known_ca_certificates.map(|_| system_bundle()).transpose()?;
        for file in policy.ca_certificates.iter().chain(system.as_ref()) {
            let certs = crate::identity::read_certs(file).map_err(|e| e.to_string())?;
            for cert in certs {
                // A system bundle may hold certificates webpki cannot use: those are skipped.
                if roots.add(cert).is_err() && system.is_none() {
                    return Err(format!("{}: not a usable CA certificate", file.display()));
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if policy.subject_alt_names.is_empty() {
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            let verifier = SanVerifier::new(roots, policy.subject_alt_names.clone())?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = ServerName::try_from(policy.hostname.clone()).map_err(|e| e.to_string())?;
        Ok(Self { tcp, tls: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }
}

impl tower_service::Service<Uri> for TlsConnect {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mut tcp, tls, name) = (self.tcp.clone(), self.tls.clone(), self.name.clone());
        Box::pin(async move {
            let stream = tcp.call(uri).await?.into_inner();
            let stream = tls.connect(name, stream).await?;
            Ok(TlsIo(TokioIo::new(stream)))
        })
    }
}

/// A TLS connection to an instance, as hyper reads and writes it.
pub struct TlsIo(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The host's CA bundle: `SSL_CERT_FILE`, else the first of the usual distribution files.
fn system_bundle() -> Result<std::path::PathBuf, String> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return Ok(file.into());
    }
    const BUNDLES: [&str; 4] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    BUNDLES
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| format!("no system CA bundle (looked for SSL_CERT_FILE and {})", BUNDLES.join(", ")))
}

/// Checks an instance's certificate chains to the roots and carries one of the given subject
/// alternative names (DNS names, or URIs compared exactly), whatever name was sent as SNI.
#[derive(Debug)]
struct SanVerifier {
    roots: rustls::RootCertStore,
    names: Vec<String>,
    /// Handshake signatures are checked as the default verifier does.
    signatures: Arc<rustls::client::WebPkiServerVerifier>,
}

impl SanVerifier {
    fn new(roots: rustls::RootCertStore, names: Vec<String>) -> Result<Self, String> {
        let signatures = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots.clone()),
            crate::identity::tls::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(Self { roots, names, signatures })
    }

    fn carries_a_name(&self, cert: &rustls::server::ParsedCertificate<'_>, der: &[u8]) -> bool {
        let uris = crate::identity::uri_sans(der);
        self.names.iter().any(|n| {
            if n.contains("://") {
                uris.iter().any(|u| u == n)
            } else {
                ServerName::try_from(n.as_str())
                    .is_ok_and(|name| rustls::client::verify_server_name(cert, &name).is_ok())
            }
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let algs = crate::identity::tls::provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algs.all)?;
        if !self.carries_a_name(&cert, end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}
