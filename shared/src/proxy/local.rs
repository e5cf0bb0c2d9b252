//! The client for instances on this host: HTTP/1.1 with keep-alive pooling, and h2c.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::HOST;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Protocol;
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;

/// Clients for instances on this host.
#[derive(Clone)]
pub struct LocalClient {
    h1: Client<HttpConnector, Body>,
    h2c: Client<HttpConnector, Body>,
    connect_timeout: Duration,
}

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
        let h2c = builder().http2_only(true).build(connector);
        Self { h1, h2c, connect_timeout }
    }

    /// Sends `req` (origin-form path in its URI) to the instance at `addr`.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<Response<Body>, ProxyError> {
        *req.uri_mut() = origin_uri(addr, req.uri()).map_err(ProxyError::BadRequest)?;
        let client = if protocol == Protocol::H2c { &self.h2c } else { &self.h1 };
        if protocol == Protocol::H2c {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let resp = client.request(req).await.map_err(|e| {
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
