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

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::policy::authz::{Caller, Target};
use crate::proxy::mesh::Mesh;
use crate::proxy::pick::PickCtx;
use crate::proxy::table::{Service, Table};
use crate::proxy::tcp::{self, Client, TunnelDone};

/// On a CONNECT between nodes: the protocol the caller upgrades to.
pub const UPGRADE_HEADER: HeaderName = HeaderName::from_static("quicmesh-upgrade");
/// On a CONNECT between nodes: the upgrade request's path and query.
pub const PATH_HEADER: HeaderName = HeaderName::from_static("quicmesh-path");
/// On a CONNECT between nodes: the upgrade request's Host (the CONNECT's own authority names
/// the endpoint, and HTTP/3 refuses a Host that contradicts it).
pub const HOST_HEADER: HeaderName = HeaderName::from_static("quicmesh-host");

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` and `Upgrade`).
pub fn requested(parts: &Parts) -> Option<HeaderValue> {
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
        parts.headers.get(UPGRADE).cloned()
    } else {
        None
    }
}

/// An upgraded connection, as tunnels read and write it.
type UpgradedIo = TokioIo<Upgraded>;

impl Client for UpgradedIo {
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

/// Forwards an upgrade request (head already through the routing and forwarding phases) to an
/// endpoint of `svc`: the answer to send the client, and, on `101`, the tunnel carries on
/// behind it. No retries: an upgrade is not replayed.
pub async fn forward(
    mesh: &Arc<Mesh>,
    table: &Arc<Table>,
    svc: &Arc<Service>,
    labels: Option<&BTreeMap<String, String>>,
    client: Option<std::net::IpAddr>,
    mut parts: Parts,
    protocol: HeaderValue,
) -> Result<Response<Body>, ProxyError> {
    let on_upgrade = parts
        .extensions
        .remove::<OnUpgrade>()
        .ok_or_else(|| ProxyError::BadRequest("this connection cannot be upgraded".into()))?;
    let no_labels = BTreeMap::new();
    let ctx = PickCtx { headers: Some(&parts.headers), client };
    let ep = mesh.pick(svc, labels.unwrap_or(&no_labels), &ctx)?.clone();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let name = svc.config.name.clone();
    if mesh.is_local(&ep) {
        // Local delivery skips the inbound side, so the authorization policy is applied here.
        let caller =
            Caller { node: mesh.local_node().unwrap_or_default(), service: table.source_service(), via_gateway: false };
        let target = Target {
            method: Some(&parts.method),
            path: Some(parts.uri.path()),
            headers: Some(&parts.headers),
            port: ep.address.port(),
        };
        mesh.authorize(table, &name, &caller, &target)?;
        let (head, upgraded) = to_instance(ep.address, table, &path, parts.headers, &protocol).await?;
        let Some(instance) = upgraded else { return Ok(refusal(head)) };
        let mesh = mesh.clone();
        // In flight for the drain: it waits for the connection up to its deadline.
        let in_flight = mesh.drain().guard();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut done = TunnelDone::new("outbound", &name, &mesh);
            let (mut a, mut b) = (TokioIo::new(upgraded), instance);
            if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                done.bytes(up, down);
            }
        });
        return Ok(switching(head, &protocol));
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
        return Ok(refusal(answer));
    }
    let mesh = mesh.clone();
    let in_flight = mesh.drain().guard();
    tokio::spawn(async move {
        let (_hold, _in_flight) = (hold, in_flight);
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut done = TunnelDone::new("outbound", &name, &mesh);
        done.entry.dst_node = ep.node.clone();
        done.entry.endpoint = ep.address.to_string();
        let (send, recv) = stream.split();
        let (up, down) = tcp::splice(TokioIo::new(upgraded), send, recv).await;
        done.bytes(up, down);
    });
    Ok(switching(answer, &protocol))
}

/// The `101 Switching Protocols` for the client, with the instance's headers.
fn switching(head: Response<()>, protocol: &HeaderValue) -> Response<Body> {
    let (mut parts, ()) = head.into_parts();
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    parts.version = http::Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_internal(&mut parts.headers);
    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(UPGRADE, protocol.clone());
    Response::from_parts(parts, body::empty())
}

/// An instance's (or a peer proxy's) refusal to upgrade: its status and headers, no body.
fn refusal(head: Response<()>) -> Response<Body> {
    let (mut parts, ()) = head.into_parts();
    parts.version = http::Version::HTTP_11;
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
