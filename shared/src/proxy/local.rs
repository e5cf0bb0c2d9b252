//! The client for instances on this host: HTTP/1.1 with keep-alive pooling, and h2c.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::HOST;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{BackendTls, Protocol, ServiceConfig};
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::proxy::backend_tls::TlsConnect;

/// Clients for instances on this host.
#[derive(Clone)]
pub struct LocalClient {
    h1: Client<HttpConnector, Body>,
    h2c: Client<HttpConnector, Body>,
    connect_timeout: Duration,
    connector: HttpConnector,
    idle: Duration,
    /// Pooled TLS clients, one per service TLS policy and protocol, made when first needed.
    tls: Arc<Mutex<TlsClients>>,
}

/// TLS clients by (policy, HTTP/2).
type TlsClients = HashMap<(BackendTls, bool), Client<TlsConnect, Body>>;

impl LocalClient {
    /// `idle`: how long a kept-alive connection may sit unused before it is closed. The pool's
    /// timer closes it then; without one, hyper-util only drops an expired connection when it
    /// next looks for one to reuse, so a burst's extra connections stayed open for good.
    pub fn new(connect_timeout: Duration, idle: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(idle).pool_timer(TokioTimer::new());
            b
        };
        let h1 = builder().build(connector.clone());
        let h2c = builder().http2_only(true).build(connector.clone());
        Self { h1, h2c, connect_timeout, connector, idle, tls: Arc::default() }
    }

    /// The pooled client for instances that speak TLS under `policy`.
    fn tls_client(&self, policy: &BackendTls, h2: bool) -> Result<Client<TlsConnect, Body>, ProxyError> {
        let mut clients = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&(policy.clone(), h2)) {
            return Ok(c.clone());
        }
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let connect = TlsConnect::new(self.connector.clone(), policy, alpn).map_err(|reason| {
            ProxyError::UpstreamUnreachable { addr: policy.hostname.clone(), reason: format!("backend TLS: {reason}") }
        })?;
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(self.idle).pool_timer(TokioTimer::new()).http2_only(h2);
        let client = b.build(connect);
        clients.insert((policy.clone(), h2), client.clone());
        Ok(client)
    }

    /// Sends `req` (origin-form path in its URI) to the instance of `svc` at `addr`, over TLS
    /// when the service says its instances want it.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        svc: &ServiceConfig,
    ) -> Result<Response<Body>, ProxyError> {
        *req.uri_mut() = origin_uri(addr, req.uri()).map_err(ProxyError::BadRequest)?;
        let h2 = svc.protocol == Protocol::H2c;
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let sent = match &svc.backend_tls {
            Some(policy) => self.tls_client(policy, h2)?.request(req).await,
            None if h2 => self.h2c.request(req).await,
            None => self.h1.request(req).await,
        };
        let resp = sent.map_err(|e| {
            if e.is_connect() && caused_by_timeout(&e) {
                ProxyError::ConnectTimeout(format!("{addr} after {:?}", self.connect_timeout))
            } else if e.is_connect() {
                ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: source_text(&e) }
            } else {
                ProxyError::UpstreamReset(source_text(&e))
            }
        })?;
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        // Only a proxy says why it answered instead of the instance: an instance's own word for
        // it would be believed by every hop after this one (a route's retries, the edge).
        parts.headers.remove(crate::message::error::ERROR_HEADER);
        parts.headers.remove(crate::message::error::UNSENT_HEADER);
        parts.version = http::Version::HTTP_11;
        Ok(Response::from_parts(parts, body::boxed(incoming)))
    }
}

/// `http://{addr}` with the path and query of `uri`.
fn origin_uri(addr: SocketAddr, uri: &Uri) -> Result<Uri, String> {
    let mut authority = String::with_capacity(24);
    headers::push_socket_addr(&mut authority, addr);
    headers::absolute_uri(http::uri::Scheme::HTTP, authority, uri)
}

/// The innermost cause of an error chain, which is what an operator needs to read.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Did an I/O timeout cause `e` (the connector's `connect_timeout`)? Read from the error's
/// sources by type, not from its text.
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cause = err.source();
    }
    false
}
