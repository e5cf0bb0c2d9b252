//! HTTP/1.1 upgrades (WebSocket) through the mesh. The calling proxy routes and picks an
//! endpoint as for any request, then opens one CONNECT stream to the endpoint's node carrying
//! the request's head (`quicmesh-upgrade` names the protocol, `quicmesh-path` the target); that
//! node authorizes it as the HTTP request it is, makes the upgrade request to its instance
//! itself, and answers 200 with the instance's `101` headers, or the instance's refusal. Once
//! both sides have switched, the stream carries the upgraded bytes both ways, as a TCP tunnel
//! does (`tcp::splice`). The raw stream never reaches an instance before its own HTTP handshake,
//! so authorization sees a real request and the instance speaks first only after it agreed.
//! An upgraded connection counts as in flight for a drain: it goes on until it ends or the
//! drain's deadline passes, when the process closes and its stream is reset.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use http::header::{CONNECTION, CONTENT_LENGTH, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::policy::authz::Target;
use crate::policy::route::RuleTimeouts;
use crate::proxy::mesh::Mesh;
use crate::proxy::pick::PickCtx;
use crate::proxy::table::{Service, Table};
use crate::proxy::tcp::{self, Client, TunnelDone};
use crate::transport::idle::IdleTimeout;

/// On a CONNECT between nodes: the protocol the caller upgrades to.
pub const UPGRADE_HEADER: HeaderName = HeaderName::from_static("quicmesh-upgrade");
/// On a CONNECT between nodes: the upgrade request's path and query.
pub const PATH_HEADER: HeaderName = HeaderName::from_static("quicmesh-path");
/// On a CONNECT between nodes: the upgrade request's Host (the CONNECT's own authority names
/// the endpoint, and HTTP/3 refuses a Host that contradicts it).
pub const HOST_HEADER: HeaderName = HeaderName::from_static("quicmesh-host");

/// The protocol a request asks to switch to: an HTTP/1.1 upgrade (`Connection: upgrade` and
/// `Upgrade`) to WebSocket, or an extended CONNECT (RFC 8441 over HTTP/2, RFC 9220 over
/// HTTP/3) and its `:protocol`, whichever it is (see [`carried`]). An HTTP/1.1 request asking
/// for another protocol (h2c, TLS) is served as the plain request it also is: its `Upgrade`
/// goes with the other hop-by-hop fields (RFC 9110 7.8 lets a server ignore it), so an
/// instance cannot switch the client to a channel the route does not see into.
pub fn requested(parts: &Parts) -> Option<HeaderValue> {
    if parts.method == Method::CONNECT {
        let h2 = parts.extensions.get::<hyper::ext::Protocol>().map(|p| p.as_str());
        let h3 = parts.extensions.get::<h3::ext::Protocol>().map(|p| p.as_str());
        return h2.or(h3).and_then(|p| HeaderValue::from_str(p).ok());
    }
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let asks = parts
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        parts.headers.get(UPGRADE).filter(|p| carried(p)).cloned()
    } else {
        None
    }
}

/// Whether the proxies carry an upgrade to `protocol`: WebSocket's only.
pub fn carried(protocol: &HeaderValue) -> bool {
    protocol.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
}

/// The client's side of an upgraded connection: from hyper (HTTP/1.1, HTTP/2) or a pipe.
enum Side {
    Hyper(UpgradedIo),
    Pipe(tokio::io::DuplexStream),
}

macro_rules! both {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            Side::Hyper($io) => $e,
            Side::Pipe($io) => $e,
        }
    };
}

impl AsyncRead for Side {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        both!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Side {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        both!(self, io => Pin::new(io).poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        both!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        both!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}

/// The client's side of an upgraded connection, under its route's idle and lifetime limits.
type ClientIo = IdleTimeout<Side>;

/// For a server that is not hyper's (HTTP/3): in the request's extensions, its end of a pipe
/// whose other end the server joins to the client's stream once the answer is a switch.
#[derive(Clone)]
pub struct Pipe(Arc<std::sync::Mutex<Option<tokio::io::DuplexStream>>>);

impl Pipe {
    /// A pipe: the end for the request's extensions, and the server's.
    pub fn new() -> (Pipe, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(PIPE_BUFFER);
        (Pipe(Arc::new(std::sync::Mutex::new(Some(a)))), b)
    }
}

/// Bytes a [`Pipe`] holds each way.
const PIPE_BUFFER: usize = 64 * 1024;

/// In a switched response's extensions: the client's side is to be joined to the tunnel (a
/// server that is not hyper's does it itself, through a [`Pipe`]).
#[derive(Clone, Copy, Debug)]
pub struct Open;

/// Where the client's side of the connection comes from once the answer is sent.
enum Pending {
    Hyper(OnUpgrade),
    Pipe(tokio::io::DuplexStream),
}

impl Pending {
    fn take(parts: &mut Parts) -> Option<Pending> {
        if let Some(on) = parts.extensions.remove::<OnUpgrade>() {
            return Some(Pending::Hyper(on));
        }
        let pipe = parts.extensions.remove::<Pipe>()?;
        let end = pipe.0.lock().ok()?.take()?;
        Some(Pending::Pipe(end))
    }

    async fn io(self, limits: Limits) -> Option<ClientIo> {
        let io = match self {
            Pending::Hyper(on) => Side::Hyper(TokioIo::new(on.await.ok()?)),
            Pending::Pipe(pipe) => Side::Pipe(pipe),
        };
        let io = IdleTimeout::new(io, limits.idle.unwrap_or(NO_LIMIT));
        Some(match limits.lifetime {
            Some(l) => io.with_lifetime(l),
            None => io,
        })
    }
}

/// An idle limit that never comes (about 30 years).
const NO_LIMIT: std::time::Duration = std::time::Duration::from_secs(1 << 30);

/// The connections a tunnel joins here have no address of their own and end as their owner
/// drops them (no TCP reset to ask for).
macro_rules! addressless_client {
    ($($t:ty),*) => {$(
        impl Client for $t {
            type Read = tokio::io::ReadHalf<Self>;
            type Write = tokio::io::WriteHalf<Self>;

            fn peer(&self) -> Option<std::net::SocketAddr> {
                None
            }

            fn reset_on_close(&self) {}

            fn halves(self) -> (Self::Read, Self::Write) {
                tokio::io::split(self)
            }

            fn reset(rd: Self::Read, wr: Self::Write) {
                drop(rd.unsplit(wr));
            }
        }
    )*};
}
addressless_client!(ClientIo, UpgradedIo, tokio::io::DuplexStream);

/// A route's limits on the upgraded connections it carries (`timeouts.upgradeIdle`,
/// `timeouts.upgradeLifetime`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub idle: Option<std::time::Duration>,
    pub lifetime: Option<std::time::Duration>,
}

impl Limits {
    pub fn of(timeouts: Option<&RuleTimeouts>) -> Limits {
        timeouts.map_or_else(Limits::default, |t| Limits { idle: t.upgrade_idle, lifetime: t.upgrade_lifetime })
    }
}

/// An upgraded connection to an instance, as tunnels read and write it.
type UpgradedIo = TokioIo<Upgraded>;

/// Forwards an upgrade request (head already through the routing and forwarding phases) to an
/// endpoint of `svc`: the answer to send the client, and, on a switch, the tunnel carries on
/// behind it. No retries: an upgrade is not replayed. The instance always sees an HTTP/1.1
/// upgrade; a client's extended CONNECT (HTTP/2, HTTP/3) is answered 200 when the instance
/// answered 101.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    mesh: &Arc<Mesh>,
    table: &Arc<Table>,
    svc: &Arc<Service>,
    labels: Option<&BTreeMap<String, String>>,
    client: Option<std::net::IpAddr>,
    mut parts: Parts,
    protocol: HeaderValue,
    limits: Limits,
) -> Result<Response<Body>, ProxyError> {
    let pending =
        Pending::take(&mut parts).ok_or_else(|| ProxyError::BadRequest("this connection cannot be upgraded".into()))?;
    let version = parts.version;
    if version != http::Version::HTTP_11 && protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
        // RFC 8441 has no key; the instance's HTTP/1.1 handshake needs one.
        let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
        let key = HeaderValue::from_str(&key).map_err(|_| ProxyError::BadRequest("bad key".into()))?;
        parts.headers.insert(SEC_WEBSOCKET_KEY, key);
    }
    let no_labels = BTreeMap::new();
    let ctx = PickCtx { headers: Some(&parts.headers), client };
    let ep = mesh.pick(svc, labels.unwrap_or(&no_labels), &ctx)?.clone();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let name = svc.config.name.clone();
    if mesh.is_local(&ep) {
        // Local delivery skips the inbound side, so the authorization policy is applied here.
        let caller = mesh.local_caller(table);
        let target = Target {
            method: Some(&Method::GET),
            path: Some(parts.uri.path()),
            headers: Some(&parts.headers),
            port: ep.address.port(),
        };
        mesh.authorize(table, &name, &caller, &target)?;
        let (head, upgraded) = to_instance(ep.address, table, &path, parts.headers, &protocol).await?;
        let Some(instance) = upgraded else { return Ok(refusal(head, version)) };
        let mesh = mesh.clone();
        // In flight for the drain: it waits for the connection up to its deadline.
        let in_flight = mesh.drain().guard();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let Some(mut a) = pending.io(limits).await else { return };
            let mut done = TunnelDone::new("outbound", &name, &mesh);
            let mut b = instance;
            if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                done.bytes(up, down);
            }
        });
        return Ok(switching(head, &protocol, version));
    }
    // The head goes as the CONNECT's headers; the hop's own headers name the target.
    let mut extra = parts.headers;
    if let Some(host) = extra.remove(http::header::HOST) {
        extra.insert(HOST_HEADER, host);
    }
    extra.insert(UPGRADE_HEADER, protocol.clone());
    extra.insert(PATH_HEADER, HeaderValue::from_str(&path).map_err(|_| ProxyError::BadRequest("bad path".into()))?);
    let (stream, hold, answer) = mesh.at(table).connect_upgrade(svc, &ep, extra).await?;
    if answer.status() != StatusCode::OK {
        return Ok(refusal(answer, version));
    }
    let mesh = mesh.clone();
    let in_flight = mesh.drain().guard();
    tokio::spawn(async move {
        let (_hold, _in_flight) = (hold, in_flight);
        let Some(io) = pending.io(limits).await else { return };
        let mut done = TunnelDone::new("outbound", &name, &mesh);
        done.entry.dst_node = ep.node.clone();
        done.entry.endpoint = ep.address.to_string();
        let (send, recv) = stream.split();
        // The route's own limits (`upgradeIdle`, `upgradeLifetime`) hold on `io`.
        let carried = tcp::splice(io, send, recv, std::time::Duration::ZERO).await;
        done.carried(carried, 0, false);
    });
    Ok(switching(answer, &protocol, version))
}

/// The client's answer to a switch, with the instance's headers: `101 Switching Protocols` to an
/// HTTP/1.1 upgrade, `200` to an extended CONNECT (without the HTTP/1.1 handshake's headers).
fn switching(head: Response<()>, protocol: &HeaderValue, version: http::Version) -> Response<Body> {
    let (mut parts, ()) = head.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_internal(&mut parts.headers);
    parts.headers.remove(CONTENT_LENGTH);
    parts.version = version;
    if version == http::Version::HTTP_11 {
        parts.status = StatusCode::SWITCHING_PROTOCOLS;
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol.clone());
    } else {
        parts.status = StatusCode::OK;
        parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
    }
    parts.extensions.insert(Open);
    Response::from_parts(parts, body::empty())
}

/// An instance's (or a peer proxy's) refusal to upgrade: its status and headers, no body.
fn refusal(head: Response<()>, version: http::Version) -> Response<Body> {
    let (mut parts, ()) = head.into_parts();
    parts.version = version;
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(TRANSFER_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
    Response::from_parts(parts, body::empty())
}

/// Makes the upgrade request to an instance: its answer's head and, on `101`, the upgraded
/// connection.
pub async fn to_instance(
    addr: std::net::SocketAddr,
    table: &Table,
    path: &str,
    mut head: HeaderMap,
    protocol: &HeaderValue,
) -> Result<(Response<()>, Option<UpgradedIo>), ProxyError> {
    let tcp = tcp::connect(addr, table).await?;
    let unreachable =
        |e: hyper::Error| ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: e.to_string() };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(unreachable)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upgrade connection to an instance ended");
        }
    });
    if let Some(host) = head.remove(HOST_HEADER) {
        head.insert(http::header::HOST, host);
    }
    headers::strip_internal(&mut head);
    head.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    head.insert(UPGRADE, protocol.clone());
    let mut req = Request::new(http_body_util::Empty::<bytes::Bytes>::new());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = path.parse::<Uri>().map_err(|_| ProxyError::BadRequest(format!("bad path {path:?}")))?;
    *req.headers_mut() = head;
    let limit = table.config().timeouts.request;
    let resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| ProxyError::Timeout(limit))?
        .map_err(|e| ProxyError::UpstreamReset(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, _) = resp.into_parts();
        return Ok((Response::from_parts(parts, ()), None));
    }
    let mut resp = resp;
    let mut head = Response::new(());
    *head.status_mut() = resp.status();
    *head.headers_mut() = resp.headers().clone();
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(|e| ProxyError::UpstreamReset(e.to_string()))?;
    Ok((head, Some(TokioIo::new(upgraded))))
}
