//! Opaque TCP through the mesh: one CONNECT stream per TCP connection. A node's
//! `node.tcp` forwards and the gateway's `gateway.tcp` listeners (the Gateway API's TCPRoute)
//! carry connections to a `protocol = "tcp"` service this way; the node that hosts the
//! endpoint serves the CONNECT (`quicmesh_node::tcp::inbound`).
//!
//! Why CONNECT on the members' one connection rather than a connection of its own: it keeps
//! exactly one QUIC connection (one handshake, one congestion controller, one identity check)
//! per pair of members, and lets the tunnel carry a status and `quicmesh-error` when the far
//! side cannot reach the target. In the lean framing the stream is a byte pipe once the two
//! heads have passed (`transport::lean`); in HTTP/3 its bytes go in DATA frames. Half-close is mapped both ways: TCP EOF finishes the QUIC
//! stream's send side, and the stream's FIN shuts down the TCP write side. Resets are mapped
//! both ways too: a TCP RST or error resets the stream, and a stream reset resets the TCP
//! connection.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::message::body::{H3Recv, H3Send};
use crate::message::error::ProxyError;
use crate::policy::authz::Target;
use crate::proxy::mesh::Mesh;
use crate::proxy::pick::PickCtx;
use crate::proxy::table::Table;
use crate::telemetry;
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics as m;

const CHUNK: usize = 64 << 10;
/// Most bytes gathered from the QUIC stream into one write to the TCP socket.
const COALESCE: usize = 256 << 10;
/// Most chunks in one vectored write (Linux takes up to 1024).
const MAX_IOVECS: usize = 256;

/// A client connection a tunnel carries: TCP, or TLS the gateway terminated over it.
pub trait Client: AsyncRead + AsyncWrite + Send + Unpin + Sized + 'static {
    type Read: AsyncRead + Send + Unpin;
    type Write: AsyncWrite + Send + Unpin;
    fn peer(&self) -> Option<std::net::SocketAddr>;
    /// Makes the connection's close a reset (TCP RST) instead of an end.
    fn reset_on_close(&self);
    /// The two directions, to be driven apart.
    fn halves(self) -> (Self::Read, Self::Write);
    /// Closes a connection taken apart by [`Client::halves`] with a reset: the peer must not
    /// read a clean end from a tunnel that broke.
    fn reset(rd: Self::Read, wr: Self::Write);
}

impl Client for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer_addr().ok()
    }

    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }

    fn halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }

    fn reset(rd: OwnedReadHalf, wr: OwnedWriteHalf) {
        // The write half is forgotten, not dropped: dropping it would send a FIN first, and the
        // TCP peer would read a clean end; the socket closes (RST, by the zero linger) with `rd`.
        let _ = rd.as_ref().set_zero_linger();
        wr.forget();
    }
}

impl<IO: Client> Client for tokio_rustls::server::TlsStream<IO> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.get_ref().0.peer()
    }

    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close();
    }

    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }

    fn reset(rd: Self::Read, wr: Self::Write) {
        rd.unsplit(wr).reset_on_close();
    }
}

/// Accepts connections for `service` and carries each to one of its endpoints. `admit` is
/// asked first with the client's address: what it gives is held as long as the connection,
/// and a connection it refuses (`None`) is closed at once.
pub async fn serve<A, F>(listener: TcpListener, service: String, mesh: Arc<Mesh>, admit: F)
where
    A: Send + 'static,
    F: Fn(SocketAddr) -> Option<A>,
{
    let mut accepting = mesh.drain().accepting();
    while let Some((tcp, client)) = accepting.next(&listener, "TCP forward").await {
        let Some(admitted) = admit(client) else {
            continue;
        };
        let mesh = mesh.clone();
        let service = service.clone();
        // In flight from the accept on, across the hand-off to a worker.
        let in_flight = mesh.drain().guard();
        crate::runtime::spawn_tcp(tcp, move |tcp| async move {
            let _held = (in_flight, admitted);
            forward(tcp, &service, &mesh, Bytes::new()).await;
        });
    }
}

/// Carries one accepted connection to an endpoint of `service`; `first` is what was already
/// read from it (a TLS ClientHello read for its server name), sent ahead of the rest. Failures
/// are counted and logged here.
pub async fn forward<C: Client>(tcp: C, service: &str, mesh: &Mesh, first: Bytes) {
    let client = tcp.peer();
    if let Err(e) = outbound(tcp, service, mesh, first).await {
        metrics::counter!(m::PROXY_ERRORS, "direction" => "outbound", "reason" => e.reason()).increment(1);
        warn!(client = ?client, service, error = %e, "TCP tunnel failed");
    }
}

async fn outbound<C: Client>(tcp: C, service: &str, mesh: &Mesh, first: Bytes) -> Result<(), ProxyError> {
    let table = mesh.table();
    let svc = table.service(service).ok_or_else(|| ProxyError::NoEndpoint(service.to_string()))?;
    let client = tcp.peer().map(|a| a.ip());
    let ctx = PickCtx { headers: None, client };
    let no_labels = BTreeMap::new();
    let ep = mesh.pick(svc, &no_labels, &ctx)?;
    metrics::counter!(m::TCP_CONNECTIONS, "direction" => "outbound", "service" => service.to_string()).increment(1);
    let mut done = TunnelDone::new("outbound", service, mesh);
    done.entry.src_service = table.source_service().map(str::to_owned).map_or(telemetry::UNKNOWN.into(), Into::into);
    done.entry.src_node = mesh.local_node().map(str::to_owned).unwrap_or_default();
    done.entry.dst_node = ep.node.clone();
    done.entry.endpoint = ep.address.to_string();
    if mesh.is_local(&ep) {
        let caller = mesh.local_caller(&table);
        let target = Target { method: None, path: None, headers: None, port: ep.address.port() };
        mesh.authorize(&table, service, &caller, &target)?;
        let mut upstream = connect(ep.address, &table).await?;
        let mut tcp = tcp;
        if upstream.write_all(&first).await.is_err() {
            tcp.reset_on_close();
            return Ok(());
        }
        // Every byte either way passes the instance's socket: what moves there is the tunnel's.
        let moved = AtomicBool::new(false);
        let copied = {
            let mut watched = Watched { io: &mut upstream, moved: &moved };
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut tcp, &mut watched) => Some(copied),
                () = quiet_for(&moved, table.config().timeouts.tcp_idle) => None,
            }
        };
        match copied {
            Some(Ok((up, down))) => done.bytes(up + first.len() as u64, down),
            // One side reset or failed, or the tunnel idled: reset both, as through a peer.
            broken => {
                if broken.is_none() {
                    done.idle_closed();
                }
                tcp.reset_on_close();
                let _ = upstream.set_zero_linger();
            }
        }
        return Ok(());
    }
    // Nothing from the client is forwarded until a tunnel is open, so a failed opening (the
    // peer draining, closing or unreachable, the far side unable to connect) is tried again
    // on another endpoint, up to the service's retry count.
    let mut tried = vec![ep];
    let (stream, _held) = loop {
        let ep = tried.last().expect("one endpoint at least");
        match mesh.at(&table).connect_tcp(svc, ep).await {
            Ok(opened) => break opened,
            Err(e) if tried.len() <= svc.config.retry.attempts as usize => {
                debug!(service, endpoint = %ep.address, error = %e, "TCP tunnel did not open; trying another endpoint");
                let avoid: Vec<&_> = tried.iter().collect();
                let next = mesh.pick_avoiding(svc, &no_labels, &ctx, &avoid)?.clone();
                if mesh.is_local(&next) {
                    return Err(e);
                }
                done.entry.dst_node = next.node.clone();
                done.entry.endpoint = next.address.to_string();
                tried.push(next);
            }
            Err(e) => return Err(e),
        }
    };
    let (mut send, recv) = stream.split();
    let sent = first.len() as u64;
    if !first.is_empty() && send.send(first).await.is_err() {
        tcp.reset_on_close();
        send.reset();
        return Ok(());
    }
    let carried = splice(tcp, send, recv, table.config().timeouts.tcp_idle).await;
    done.carried(carried, sent, false);
    Ok(())
}

/// A connection whose reads and writes mark `moved` when they move bytes.
struct Watched<'a, T> {
    io: &'a mut T,
    moved: &'a AtomicBool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Records a tunnel when it closes: bytes each way, the closed count, the access-log line.
pub struct TunnelDone {
    pub entry: Entry,
    start: std::time::Instant,
    log: Option<std::sync::Arc<crate::telemetry::access_log::AccessLog>>,
}

impl TunnelDone {
    pub fn new(direction: &'static str, service: &str, mesh: &Mesh) -> Self {
        let entry = Entry {
            time: crate::telemetry::access_log::timestamp(),
            direction: if direction == "outbound" { "tcp-outbound" } else { "tcp-inbound" },
            dst_service: service.to_string().into(),
            method: "CONNECT".into(),
            ..Default::default()
        };
        Self { entry, start: std::time::Instant::now(), log: mesh.access_log().cloned() }
    }

    /// Bytes from the client side toward the service (`sent`) and back (`received`).
    pub fn bytes(&mut self, sent: u64, received: u64) {
        self.entry.bytes_received = sent;
        self.entry.bytes_sent = received;
    }

    /// What [`splice`] carried, `first` bytes sent before it; `flipped` when its TCP side is
    /// the service's (the delivering node), not the client's.
    pub fn carried(&mut self, c: Carried, first: u64, flipped: bool) {
        let (sent, received) = if flipped { (c.down, c.up) } else { (c.up, c.down) };
        self.bytes(sent + first, received);
        if c.idle {
            self.idle_closed();
        }
    }

    /// The tunnel was closed for carrying nothing for `timeouts.tcp_idle`.
    pub fn idle_closed(&mut self) {
        let direction = if self.entry.direction == "tcp-outbound" { "outbound" } else { "inbound" };
        metrics::counter!(m::TCP_IDLE_CLOSED, "direction" => direction, "service" => self.entry.dst_service.to_string())
            .increment(1);
        self.entry.error = "idle-timeout".into();
    }
}

impl Drop for TunnelDone {
    fn drop(&mut self) {
        let e = &mut self.entry;
        let direction = if e.direction == "tcp-outbound" { "outbound" } else { "inbound" };
        let service = e.dst_service.clone();
        metrics::counter!(m::TCP_CLOSED, "direction" => direction, "service" => service.clone()).increment(1);
        metrics::counter!(m::TCP_BYTES, "direction" => direction, "service" => service.clone(), "flow" => "sent")
            .increment(e.bytes_received);
        metrics::counter!(m::TCP_BYTES, "direction" => direction, "service" => service, "flow" => "received")
            .increment(e.bytes_sent);
        if let Some(log) = &self.log {
            e.duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            log.log(e);
        }
    }
}

pub async fn connect(addr: std::net::SocketAddr, table: &Table) -> Result<TcpStream, ProxyError> {
    connect_within(addr, table.config().timeouts.connect).await
}

/// A TCP connection to an instance at `addr` within `timeout`, Nagle off. The kernel's own
/// connect timeout counts as a timeout too.
pub async fn connect_within(addr: std::net::SocketAddr, timeout: std::time::Duration) -> Result<TcpStream, ProxyError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProxyError::ConnectTimeout(format!("{addr} after {timeout:?}")))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => ProxyError::ConnectTimeout(format!("{addr}: {e}")),
            _ => ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: e.to_string() },
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// How one direction of a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its source finished (TCP EOF, stream FIN) and the end was passed on.
    Finished,
    /// A reset or an error on either side: the whole tunnel is torn down.
    Broken,
}

/// What [`splice`] carried: bytes TCP -> stream (`up`) and stream -> TCP (`down`), and whether
/// it was closed for carrying nothing for its idle time.
#[derive(Debug, Clone, Copy)]
pub struct Carried {
    pub up: u64,
    pub down: u64,
    pub idle: bool,
}

/// Ends once nothing has `moved` for `idle` (looking every eighth of it, so it ends at most an
/// eighth late); never, for a zero `idle`. Whoever moves bytes sets `moved`: a store per read
/// and write, where a timer moved on each would cost a clock reading and a timer update.
async fn quiet_for(moved: &AtomicBool, idle: Duration) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let tick = (idle / 8).max(Duration::from_millis(1));
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        if moved.swap(false, Ordering::Relaxed) {
            quiet = Duration::ZERO;
        } else {
            quiet += tick;
            if quiet >= idle {
                return;
            }
        }
    }
}

/// Copies TCP <-> QUIC stream in both directions, mapping half-close each way, and resets
/// each way: a reset or error on one side (a client's RST, the peer's stream reset, a
/// server that went away) resets the QUIC stream and the TCP connection (RST, by a zero
/// linger), so neither side waits forever on a half that is gone. A tunnel that moves no byte
/// either way for `idle` (zero: no limit) is reset both ways too.
pub async fn splice<C: Client, S: H3Send, R: H3Recv>(tcp: C, mut send: S, mut recv: R, idle: Duration) -> Carried {
    let (mut rd, mut wr) = tcp.halves();
    let moved = AtomicBool::new(false);
    let mut idled = false;
    let (up_total, down_total, broken) = {
        let up = async {
            let mut total = 0u64;
            let mut buf = BytesMut::with_capacity(CHUNK);
            loop {
                buf.reserve(CHUNK);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        // The peer may have stopped reading already: then nothing can be finished.
                        let end = if send.finish().await.is_ok() { End::Finished } else { End::Broken };
                        return (total, end);
                    }
                    Ok(n) => {
                        total += n as u64;
                        moved.store(true, Ordering::Relaxed);
                        if send.send(buf.split().freeze()).await.is_err() {
                            return (total, End::Broken);
                        }
                        // A send that waited for the peer's credit moved bytes too.
                        moved.store(true, Ordering::Relaxed);
                    }
                    Err(_) => return (total, End::Broken),
                }
            }
        };
        let down = async {
            let mut total = 0u64;
            let mut chunks: Vec<Bytes> = Vec::new();
            loop {
                // One QUIC chunk is often a packet's worth: gather what has already arrived (the
                // chunks themselves, no copy) so each vectored write to the socket carries about
                // COALESCE bytes (the rest of a read's batch, taken at once, may go past it).
                let mut ended = false;
                let mut gathered = 0;
                match poll_fn(|cx| recv.poll_data(cx)).await {
                    Ok(Some(data)) => {
                        gathered += data.len();
                        chunks.push(data);
                        // The rest of the read that brought it, at once.
                        gathered += recv.take_held(&mut chunks, MAX_IOVECS);
                    }
                    Ok(None) => ended = true,
                    Err(_) => return (total, End::Broken),
                }
                moved.store(true, Ordering::Relaxed);
                let mut failed = false;
                while !ended && gathered < COALESCE && chunks.len() < MAX_IOVECS {
                    match poll_fn(|cx| Poll::Ready(recv.poll_data(cx))).await {
                        Poll::Ready(Ok(Some(data))) => {
                            gathered += data.len();
                            chunks.push(data);
                            gathered += recv.take_held(&mut chunks, MAX_IOVECS);
                        }
                        Poll::Ready(Ok(None)) => ended = true,
                        // Deliver what came before the reset, then tear down.
                        Poll::Ready(Err(_)) => {
                            failed = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                // Flushed too: a TLS client connection (or an upgraded one over TLS) keeps
                // what the socket did not take at once in its own buffer until flushed, and
                // nothing else would flush it. On TCP a flush costs nothing.
                // Each write that moves bytes counts: a slow client's download is traffic.
                let mut watched = Watched { io: &mut wr, moved: &moved };
                if write_chunks(&mut watched, &mut chunks).await.is_err() || watched.flush().await.is_err() {
                    return (total, End::Broken);
                }
                total += gathered as u64;
                if failed {
                    return (total, End::Broken);
                }
                if ended {
                    let end = if wr.shutdown().await.is_ok() { End::Finished } else { End::Broken };
                    return (total, end);
                }
            }
        };
        let quiet = quiet_for(&moved, idle);
        tokio::pin!(up, down, quiet);
        let (mut up_done, mut down_done) = (None, None);
        // Both halves run until each finishes, or until either breaks or the tunnel idles.
        loop {
            tokio::select! {
                r = &mut up, if up_done.is_none() => up_done = Some(r),
                r = &mut down, if down_done.is_none() => down_done = Some(r),
                () = &mut quiet => {
                    idled = true;
                    break;
                }
            }
            let broken = [up_done, down_done].iter().flatten().any(|(_, end)| *end == End::Broken);
            if broken || (up_done.is_some() && down_done.is_some()) {
                break;
            }
        }
        let total = |done: Option<(u64, End)>| done.map_or(0, |(n, _)| n);
        let broken = idled || [up_done, down_done].iter().flatten().any(|(_, e)| *e == End::Broken);
        (total(up_done), total(down_done), broken)
    };
    if broken {
        // RST to the client, and a reset of the stream's send side (the receive side stops
        // when `recv` is dropped).
        C::reset(rd, wr);
        send.reset();
    }
    Carried { up: up_total, down: down_total, idle: idled }
}

/// Writes every byte of `chunks` with vectored writes (at most MAX_IOVECS chunks each), then
/// empties it. Public for the bulk bench's bare tunnel, which writes as node-b does.
pub async fn write_chunks<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    chunks.retain(|c| !c.is_empty());
    let mut first = 0;
    while first < chunks.len() {
        // `chunks` holds at most MAX_IOVECS: the slices fit on the stack.
        let mut n = {
            let mut slices = [std::io::IoSlice::new(&[]); MAX_IOVECS];
            let count = (chunks.len() - first).min(MAX_IOVECS);
            for (slot, c) in slices.iter_mut().zip(&chunks[first..first + count]) {
                *slot = std::io::IoSlice::new(c);
            }
            wr.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[first];
            let k = n.min(c.len());
            c.advance(k);
            n -= k;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    chunks.clear();
    Ok(())
}
