//! The TCP side of the edge, one task per bound port: plain HTTP, or TLS (1.2+, ALPN h2 and
//! http/1.1) then hyper for HTTP/1.1 and HTTP/2, with header size/count limits (431), a header
//! read timeout and stream limits. A port with TLS listeners first reads the ClientHello: its
//! server name picks the listener, which passes the connection through untouched or
//! terminates it. A client sending garbage only ever costs its own connection.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quicmesh_shared::message::body;
use quicmesh_shared::policy::listener::Protocol;
use quicmesh_shared::telemetry::metrics as m;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::conns::Activity;
use crate::handler::{Arrival, Edge, Port};
use quicmesh_shared::transport::idle::IdleTimeout;

/// What one TCP port of the edge speaks.
pub struct TcpPort {
    pub port: Arc<Port>,
    /// TLS terminated here (HTTPS, TLS listeners in `Terminate` mode); `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The same for TLS listeners in `Terminate` mode: no ALPN.
    pub stream_tls: Option<Arc<rustls::ServerConfig>>,
    /// The port has TLS listeners: the ClientHello's server name decides before any TLS work.
    pub by_sni: bool,
    /// The port has HTTP or HTTPS listeners.
    pub http: bool,
}

impl TcpPort {
    pub fn new(port: Arc<Port>, tls: Option<rustls::ServerConfig>, by_sni: bool, http: bool) -> Self {
        // TLS terminated for TCP inside names no application protocol.
        let stream_tls = tls.clone().map(|mut t| {
            t.alpn_protocols.clear();
            Arc::new(t)
        });
        Self { port, tls: tls.map(Arc::new), stream_tls, by_sni, http }
    }
}

pub async fn serve(listener: TcpListener, edge: Arc<Edge>, at: Arc<TcpPort>) {
    // Draining: no new client connections.
    let mut accepting = edge.mesh.drain().accepting();
    while let Some((tcp, client)) = accepting.next(&listener, "edge").await {
        // Past the connection limits: closed at once, before any TLS work.
        let Some(admitted) = edge.admit(client) else {
            drop(tcp);
            continue;
        };
        let (edge, at) = (edge.clone(), at.clone());
        // The drain waits for each connection from its accept: one taken as the drain began
        // still gets its handshake and its request answered.
        let open = edge.mesh.drain().guard();
        quicmesh_shared::runtime::spawn_tcp(tcp, move |tcp| async move {
            let _admitted = (admitted, open);
            connection(tcp, client, edge, at).await;
        });
    }
}

/// Reads a ClientHello whole, keeping the bytes: its server name (lowercase), and what was read.
async fn read_client_hello(tcp: &mut TcpStream) -> Result<(Option<String>, Bytes), String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its ClientHello".into());
        }
        seen.extend_from_slice(&buf[..n]);
        acceptor.read_tls(&mut &buf[..n]).map_err(|e| e.to_string())?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                return Ok((sni, seen.into()));
            }
            Ok(None) => {}
            Err((e, _)) => return Err(e.to_string()),
        }
    }
}

async fn connection(mut tcp: TcpStream, client: std::net::SocketAddr, edge: Arc<Edge>, at: Arc<TcpPort>) {
    let limits = &edge.limits;
    let mut first = Bytes::new();
    // A TLS listener in Terminate mode: the service its TLSRoute picked.
    let mut terminate_to = None;
    if at.by_sni {
        let Some((sni, seen)) = handshake_step(client, limits.header_read_timeout, read_client_hello(&mut tcp)).await
        else {
            return;
        };
        let table = edge.mesh.table();
        let listener = table.edge().and_then(|ls| ls.select(at.port.key, sni.as_deref().unwrap_or_default()));
        match listener.filter(|l| l.spec.protocol == Protocol::Tls) {
            Some(l) => {
                let Some(service) = l.stream_route(sni.as_deref()).and_then(|r| r.pick()).map(str::to_owned) else {
                    metrics::counter!(m::EDGE_REJECTED, "reason" => "no-route").increment(1);
                    debug!(%client, ?sni, listener = %l.spec.name, "no TLSRoute for this server name");
                    return;
                };
                if !l.spec.terminate {
                    // TLS passthrough: the bytes go to the service as they came; nothing is
                    // decrypted.
                    drop(table);
                    metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "tls-passthrough").increment(1);
                    quicmesh_shared::proxy::tcp::forward(tcp, &service, &edge.mesh, seen).await;
                    return;
                }
                terminate_to = Some(service);
            }
            None if !at.http => {
                // Only TLS listeners here, and none takes this name.
                metrics::counter!(m::EDGE_REJECTED, "reason" => "no-route").increment(1);
                debug!(%client, ?sni, "no TLS listener takes this server name");
                return;
            }
            None => {}
        }
        first = seen;
    }
    let io = Replay { first, inner: tcp };
    let tls = if terminate_to.is_some() { at.stream_tls.clone() } else { at.tls.clone() };
    let Some(tls) = tls else {
        metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "http").increment(1);
        let arrival = Arrival { client, proto: "http/1.1", subject: None, port: at.port.clone(), sni: None };
        serve_http(io, edge, arrival).await;
        return;
    };
    let Some(tls) = handshake_step(client, limits.header_read_timeout, TlsAcceptor::from(tls).accept(io)).await else {
        return;
    };
    if let Some(service) = terminate_to {
        // TLS terminated here, the bytes inside carried as TCP.
        metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "tls-terminate").increment(1);
        quicmesh_shared::proxy::tcp::forward(tls, &service, &edge.mesh, Bytes::new()).await;
        return;
    }
    let session = tls.get_ref().1;
    if session.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the answer (RFC 8737 3).
        debug!(%client, sni = ?session.server_name(), "ACME TLS-ALPN-01 validation connection");
        return;
    }
    let proto = if session.alpn_protocol() == Some(b"h2") { "h2" } else { "http/1.1" };
    let arrival = Arrival {
        client,
        proto,
        subject: at.port.client_subject(session.peer_certificates()),
        port: at.port.clone(),
        sni: session.server_name().map(str::to_ascii_lowercase),
    };
    metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => proto).increment(1);
    serve_http(tls, edge, arrival).await;
}

/// A step of a client's TLS handshake, within the header read timeout; a failure or a timeout
/// is counted (`tls-handshake`, `tls-timeout`) and ends the connection.
async fn handshake_step<T, E: std::fmt::Display>(
    client: std::net::SocketAddr,
    limit: std::time::Duration,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(limit, step).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            metrics::counter!(m::EDGE_REJECTED, "reason" => "tls-handshake").increment(1);
            debug!(%client, error = %e, "edge TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!(m::EDGE_REJECTED, "reason" => "tls-timeout").increment(1);
            None
        }
    }
}

/// HTTP/1.1 or HTTP/2 on one client connection, until it closes, idles out or the drain ends it.
async fn serve_http<IO>(io: IO, edge: Arc<Edge>, arrival: Arrival)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = edge.limits.clone();
    let (client, proto) = (arrival.client, arrival.proto);
    // A plain connection may speak HTTP/2 with prior knowledge: its requests say which.
    let h2c = Arc::new(Arrival { proto: "h2", ..arrival.clone() });
    let arrival = Arc::new(arrival);
    let edge2 = edge.clone();
    let activity = Activity::default();
    let requests = activity.clone();
    // HTTP/2 on this connection (by ALPN, or with prior knowledge on a plain one).
    let http2 = Arc::new(AtomicBool::new(proto == "h2"));
    let spoke_h2 = http2.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let at = if req.version() == http::Version::HTTP_2 {
            spoke_h2.store(true, Ordering::Relaxed);
            h2c.clone()
        } else {
            arrival.clone()
        };
        let edge = edge2.clone();
        // In flight until its response body is done with.
        let in_flight = requests.start();
        // Boxed: the request's state is kilobytes (the whole forwarding path's futures), and
        // HTTP/2 spawns each stream as a task, which moves its future whole several times.
        Box::pin(async move {
            let http1 = req.version() <= http::Version::HTTP_11;
            let req = req.map(body::boxed);
            let mut resp = edge.handle(req, &at, in_flight).await;
            edge.mesh.drain().last_on_connection(http1, &mut resp);
            Ok::<_, Infallible>(resp)
        })
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // WebSocket over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    let io = TokioIo::new(IdleTimeout::new(io, limits.idle_timeout));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // An HTTP/1.1 client learns of the drain from `Connection: close` on its next answer;
        // one that sends none within the grace finds its connection closed idle, rather than
        // closed under a request it was writing.
        _ = edge.mesh.drain().closing(|| http2.load(Ordering::Relaxed)) => {
            // HTTP/2 GOAWAY, or the HTTP/1.1 connection closed after the request in progress.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        // No request yet within the header timeout, or none for the idle timeout,
        // whatever bytes (HTTP/2 PINGs) the client sends meanwhile.
        _ = activity.idle_for(limits.header_read_timeout, limits.idle_timeout) => {
            metrics::counter!(m::EDGE_IDLE_CLOSED, "protocol" => proto).increment(1);
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%client, error = %e, "edge connection ended with an error");
    }
}

/// A connection whose first bytes were already read (a ClientHello looked at for its server
/// name): reads give those back first, then the socket's.
struct Replay<S> {
    first: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl quicmesh_shared::proxy::tcp::Client for Replay<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.inner.peer_addr().ok()
    }

    fn reset_on_close(&self) {
        let _ = self.inner.set_zero_linger();
    }

    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }

    fn reset(rd: Self::Read, wr: Self::Write) {
        rd.unsplit(wr).reset_on_close();
    }
}

/// A TCP listener's connections, each to the service its TCPRoute picks.
pub async fn serve_tcp(listener: TcpListener, edge: Arc<Edge>, key: u16) {
    let mut accepting = edge.mesh.drain().accepting();
    while let Some((tcp, client)) = accepting.next(&listener, "edge TCP").await {
        // Within the same connection limits as the edge's HTTP ports: a tunnel holds a
        // descriptor and a mesh stream for as long as its client keeps it.
        let Some(admitted) = edge.admit(client) else {
            drop(tcp);
            continue;
        };
        let table = edge.mesh.table();
        let route = table.edge().and_then(|ls| ls.select(key, "")).and_then(|l| l.stream_route(None));
        let Some(service) = route.and_then(|r| r.pick()).map(str::to_owned) else {
            metrics::counter!(m::EDGE_REJECTED, "reason" => "no-route").increment(1);
            debug!(%client, port = key, "no TCPRoute on this listener");
            continue;
        };
        drop(table);
        let edge = edge.clone();
        // In flight from the accept on, across the hand-off to a worker.
        let in_flight = edge.mesh.drain().guard();
        quicmesh_shared::runtime::spawn_tcp(tcp, move |tcp| async move {
            metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "tcp").increment(1);
            let _held = (in_flight, admitted);
            quicmesh_shared::proxy::tcp::forward(tcp, &service, &edge.mesh, Bytes::new()).await;
        });
    }
}
