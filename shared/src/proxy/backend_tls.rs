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
        for file in &policy.ca_certificates {
            let certs = crate::identity::read_certs(file).map_err(|e| e.to_string())?;
            for cert in certs {
                roots.add(cert).map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
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
