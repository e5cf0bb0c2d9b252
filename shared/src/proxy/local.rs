//! The client for instances on this host: HTTP/1.1 with keep-alive pooling, and h2c.
//!
//! Plain HTTP/1.1, the common case, goes through a pool of our own on hyper's connection API
//! ([`H1Pool`]); h2c and TLS to instances through hyper-util's pooled client. hyper-util's
//! client costs about a tenth of a node's instructions per locally delivered request (callgrind):
//! its pool hashes the key (scheme and authority) a byte at a time with SipHash several times
//! per request, boxes the response future and spawns a task per request to take the connection
//! back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::config::{BackendTls, Protocol, ServiceConfig};
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::proxy::backend_tls::TlsConnect;

/// Clients for instances on this host.
#[derive(Clone)]
pub struct LocalClient {
    h1: H1Pool,
    h2c: Client<HttpConnector, Body>,
    connect_timeout: Duration,
    connector: HttpConnector,
    idle: Duration,
    /// Pooled TLS clients, one per service TLS policy and protocol, made when first needed.
    tls: Arc<Mutex<TlsClients>>,
}

/// TLS clients by policy: for HTTP/1.1 and for HTTP/2. Keyed by the policy alone, so that a
/// request looks its client up by reference rather than with a copy of the policy.
type TlsClients = HashMap<BackendTls, [Option<Client<TlsConnect, Body>>; 2]>;

impl LocalClient {
    /// `idle`: how long a kept-alive connection may sit unused before it is closed. Both pools
    /// close it then by a timer of their own; hyper-util's pool without one only dropped an
    /// expired connection when it next looked for one to reuse, so a burst's extra connections
    /// stayed open for good.
    pub fn new(connect_timeout: Duration, idle: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let h1 = H1Pool::new(connect_timeout, idle);
        let mut h2c = Client::builder(TokioExecutor::new());
        h2c.pool_idle_timeout(idle).pool_timer(TokioTimer::new()).http2_only(true);
        let h2c = h2c.build(connector.clone());
        Self { h1, h2c, connect_timeout, connector, idle, tls: Arc::default() }
    }

    /// The pooled client for instances that speak TLS under `policy`.
    fn tls_client(&self, policy: &BackendTls, h2: bool) -> Result<Client<TlsConnect, Body>, ProxyError> {
        let mut clients = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(policy).and_then(|pair| pair[usize::from(h2)].as_ref()) {
            return Ok(c.clone());
        }
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let connect = TlsConnect::new(self.connector.clone(), policy, alpn).map_err(|reason| {
            ProxyError::UpstreamUnreachable { addr: policy.hostname.clone(), reason: format!("backend TLS: {reason}") }
        })?;
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(self.idle).pool_timer(TokioTimer::new()).http2_only(h2);
        let client = b.build(connect);
        clients.entry(policy.clone()).or_default()[usize::from(h2)] = Some(client.clone());
        Ok(client)
    }

    /// Sends `req` (origin-form path in its URI) to the instance of `svc` at `addr`, over TLS
    /// when the service says its instances want it.
    pub async fn send(
        &self,
        req: Request<Body>,
        addr: SocketAddr,
        svc: &ServiceConfig,
    ) -> Result<Response<Body>, ProxyError> {
        if svc.protocol != Protocol::H2c && svc.backend_tls.is_none() {
            return self.h1.send(req, addr).await.map(finish);
        }
        // Boxed: the plain HTTP/1.1 pool above is the usual case, and this one's client and
        // futures would otherwise add their size to it.
        Box::pin(self.send_other(req, addr, svc)).await
    }

    /// [`LocalClient::send`] over TLS or HTTP/2 cleartext.
    async fn send_other(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        svc: &ServiceConfig,
    ) -> Result<Response<Body>, ProxyError> {
        let h2 = svc.protocol == Protocol::H2c;
        *req.uri_mut() = origin_uri(addr, req.uri()).map_err(ProxyError::BadRequest)?;
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let sent = match &svc.backend_tls {
            Some(policy) => self.tls_client(policy, h2)?.request(req).await,
            // Plain HTTP/1.1 went to the pool in `LocalClient::send`.
            None => self.h2c.request(req).await,
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
        Ok(finish(resp))
    }
}

/// An instance's response as the mesh passes it on: hop-by-hop headers out, and the headers
/// only a proxy may set.
fn finish<B>(resp: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<body::BoxError>,
{
    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // Only a proxy says why it answered instead of the instance: an instance's own word for
    // it would be believed by every hop after this one (a route's retries, the edge). Looked
    // for among the names present first: an instance's answer almost never has them.
    let (error, unsent) = (crate::message::error::ERROR_HEADER, crate::message::error::UNSENT_HEADER);
    if parts.headers.keys().any(|n| *n == error || *n == unsent) {
        parts.headers.remove(error);
        parts.headers.remove(unsent);
    }
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, body::boxed(incoming))
}

/// Kept-alive HTTP/1.1 connections to instances, by worker and address.
///
/// A connection is checked out for one request and checked back in when its response body has
/// been read to the end; a body dropped before its end takes the connection with it (hyper
/// closes it: what is left of that response would be read as the next one's). Each worker keeps
/// its own, so a request and its connection's task share a thread. Connections idle for `idle`
/// are closed by a sweep that runs while any are pooled.
#[derive(Clone)]
struct H1Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    idle: Mutex<Idle>,
    connect_timeout: Duration,
    max_idle: Duration,
}

/// A pool's key: the worker whose runtime runs the connection, and the instance's address.
type Key = (usize, SocketAddr);

#[derive(Default)]
struct Idle {
    /// Each key's open connections and when each was checked in, newest last.
    /// (foldhash: looked up twice per request, and SipHash of an address costs a few hundred
    /// instructions)
    conns: crate::FastMap<Key, Vec<(http1::SendRequest<Body>, Instant)>>,
    /// Whether a sweep task is running.
    sweeping: bool,
}

impl H1Pool {
    fn new(connect_timeout: Duration, max_idle: Duration) -> Self {
        let inner = PoolInner { idle: Mutex::default(), connect_timeout, max_idle };
        Self { inner: Arc::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest pooled connection to `key` still open.
    /// The newest pooled connection to `key` that is open, ready and idle for less than
    /// `instance_idle` (an instance closes its end of an idle connection when its own keep-alive
    /// timeout runs out; `instance_idle` is set below that so the mesh never sends on one it is
    /// closing). The newest is taken first, so one idle too long means all are.
    fn checkout(&self, key: Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.lock();
        let list = idle.conns.get_mut(&key)?;
        while let Some((send, since)) = list.pop() {
            if since.elapsed() >= self.inner.max_idle {
                list.clear();
                return None;
            }
            if send.is_ready() {
                return Some(send);
            }
        }
        None
    }

    /// Sends `req` (origin-form, Host set) to the instance at `addr` on a pooled connection, or
    /// a new one. A request a pooled connection could not take (it closed meanwhile; hyper
    /// hands such a request back unsent) goes on the next one.
    async fn send(&self, mut req: Request<Body>, addr: SocketAddr) -> Result<Response<Returning>, ProxyError> {
        *req.version_mut() = http::Version::HTTP_11;
        *req.uri_mut() = origin_form(req.uri());
        if !req.headers().contains_key(HOST) {
            let mut host = String::with_capacity(24);
            headers::push_socket_addr(&mut host, addr);
            if let Ok(v) = HeaderValue::from_str(&host) {
                req.headers_mut().insert(HOST, v);
            }
        }
        let key = (crate::runtime::index(), addr);
        loop {
            let (mut send, pooled) = match self.checkout(key) {
                Some(send) => (send, true),
                // Boxed: a new connection is the rare case, and its dial and handshake would
                // otherwise add their size to every request's future.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            if send.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(ProxyError::UpstreamReset("connection closed before the request".into()));
            }
            match send.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, incoming) = resp.into_parts();
                    let mut back = Some(Checkin { pool: Arc::downgrade(&self.inner), key, send });
                    if incoming.is_end_stream() {
                        if let Some(back) = back.take() {
                            back.put();
                        }
                    }
                    return Ok(Response::from_parts(parts, Returning { body: incoming, back }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(ProxyError::UpstreamReset(source_text(&e.into_error()))),
                },
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, ProxyError> {
        let tcp = crate::proxy::tcp::connect_within(addr, self.inner.connect_timeout).await?;
        let (send, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: source_text(&e) })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection to a local instance ended");
            }
        });
        Ok(send)
    }
}

impl PoolInner {
    /// Starts the task that closes connections idle past `max_idle`, unless one runs (`idle`
    /// is this pool's, locked). The task ends when nothing is pooled, or when the client is
    /// gone; the next check-in starts another.
    fn sweep(self: &Arc<Self>, idle: &mut Idle) {
        if idle.sweeping {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        idle.sweeping = true;
        let pool = Arc::downgrade(self);
        let period = (self.max_idle / 4).max(Duration::from_millis(50));
        rt.spawn(async move {
            // A sweep dropped with its runtime lets the next check-in start another.
            let mut running = Sweeping(pool.clone());
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = pool.upgrade() else { return };
                let mut idle = inner.idle.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                idle.conns.retain(|_, list| {
                    list.retain(|(send, since)| !send.is_closed() && now.duration_since(*since) < inner.max_idle);
                    !list.is_empty()
                });
                if idle.conns.is_empty() {
                    // Cleared under the same lock a check-in takes, so none is left unswept.
                    idle.sweeping = false;
                    running.0 = Weak::new();
                    return;
                }
            }
        });
    }

    /// Pools `send` (open and ready) under `key`.
    fn pool(self: &Arc<Self>, key: Key, send: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.conns.entry(key).or_default().push((send, Instant::now()));
        self.sweep(&mut idle);
    }
}

/// Clears a pool's `sweeping` when its sweep task ends other than by finding the pool empty.
struct Sweeping(Weak<PoolInner>);

impl Drop for Sweeping {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.idle.lock().unwrap_or_else(|e| e.into_inner()).sweeping = false;
        }
    }
}

/// A connection on its way back to the pool.
struct Checkin {
    pool: Weak<PoolInner>,
    key: Key,
    send: http1::SendRequest<Body>,
}

impl Checkin {
    /// Pools the connection once it can take another request. That is at once in the common
    /// case: hyper marks it ready as it reads the end of the answer. A connection still sending
    /// the request's body (an instance that answered an upload early, say) waits in a task of
    /// its own rather than in the pool, where the next request would wait on it.
    fn put(self) {
        let Some(inner) = self.pool.upgrade() else { return };
        let Checkin { key, mut send, .. } = self;
        if send.is_ready() {
            inner.pool(key, send);
        } else if !send.is_closed() {
            let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
            let pool = Arc::downgrade(&inner);
            rt.spawn(async move {
                if send.ready().await.is_ok() {
                    if let Some(inner) = pool.upgrade() {
                        inner.pool(key, send);
                    }
                }
            });
        }
    }
}

/// A response body from a pooled connection: its end checks the connection back in.
struct Returning {
    body: Incoming,
    back: Option<Checkin>,
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        let done = match &frame {
            None => true,
            Some(Ok(_)) => this.body.is_end_stream(),
            Some(Err(_)) => {
                this.back = None;
                false
            }
        };
        if done {
            if let Some(back) = this.back.take() {
                back.put();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The origin form of `uri` (its path and query) for the request line.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
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
