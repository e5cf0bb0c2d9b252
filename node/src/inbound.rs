//! Node inbound side: QUIC from peer members.
//!
//! QUIC accept (mutual TLS against the mesh CA) -> peer SPIFFE identity -> a request stream
//! (the lean framing, or HTTP/3 from a peer that offers only it) ->
//! check the chosen service and endpoint are hosted here -> deliver locally -> stream back.
//! CONNECT requests carry opaque TCP (see `tcp`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response};

use quicmesh_shared::config::{Protocol, ServiceConfig};
use quicmesh_shared::identity::tls;
use quicmesh_shared::message::body;
use quicmesh_shared::message::error::{ProxyError, UNSENT_HEADER};
use quicmesh_shared::message::headers;
use quicmesh_shared::policy::authz::{Caller, Target};
use quicmesh_shared::proxy::drain::Phase;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::telemetry::{self, Record};
use quicmesh_shared::transport::admission::{self, Admission, Handshaking, Limits};
use quicmesh_shared::transport::lean;
use quicmesh_shared::transport::stalls::Stalls;
use quicmesh_shared::transport::stream::{h3_head_within, Framing, ServerRecv};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::peer::{local_target, source_of, ServerStream};

/// Largest header section a peer may send (the edge default; peers are members, but bounded),
/// in either framing.
const MAX_HEADER_BYTES: u64 = lean::MAX_HEAD as u64;

/// Accepts peers until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, mesh: Arc<Mesh>) {
    let admission = Admission::new("inbound", Limits::MESH);
    while let Some(incoming) = endpoint.accept().await {
        if mesh.drain().phase() >= Phase::GoingAway {
            // Peers learn at once that this node takes nothing new and send elsewhere.
            incoming.refuse();
            continue;
        }
        // No state for an attempt until it is let in (a spoofed flood gets Retries).
        let Some((incoming, slot)) = admission.admit(incoming) else { continue };
        // A peer's connection counts as in flight for the drain from here until it ends. After
        // the GOAWAY it ends when the peer closes it, once it has read its last answers:
        // handed to QUIC is not received, and closing abandons what is unsent. Taken here, on
        // the accept loop's thread, so that no drain can settle before a connection on another
        // worker has been told to go away; the drain's deadline bounds the wait.
        let open = mesh.drain().guard();
        let mesh = mesh.clone();
        quicmesh_shared::runtime::spawn_connection(async move {
            let _open = open;
            connection(incoming, slot, mesh).await
        });
    }
}

async fn connection(incoming: quinn::Incoming, slot: Handshaking, mesh: Arc<Mesh>) {
    let remote = incoming.remote_address();
    let limit = mesh.table().config().timeouts.connect;
    let td = mesh.trust_domain().to_string();
    let failed = move |e: &quinn::ConnectionError| {
        let reason = tls::handshake_failure_reason(e);
        metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => reason).increment(1);
        warn!(%remote, reason, error = %e, "refused QUIC peer");
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            slot.release_after(admission::FAILED_HOLD);
            failed(&e);
            return;
        }
    };
    // A peer resuming a session may send requests with its first packet (0-RTT): its identity
    // is the session's, known at once, and `handshake` turns true when the handshake ends. A
    // new peer's certificate comes with the end of its handshake, so that is awaited.
    let (handshake_tx, handshake) = watch::channel(false);
    let (conn, done) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, done),
        // quinn always converts a server's connection; should it not, the attempt is dropped.
        Err(_) => {
            warn!(%remote, "QUIC attempt could not be served early; dropped");
            return;
        }
    };
    let resumed = tls::peer_identity(&conn, &td).is_some();
    if resumed {
        if !tls::peer_certificate_current(&conn) {
            slot.release_after(admission::FAILED_HOLD);
            metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "expired").increment(1);
            warn!(%remote, "refused QUIC peer: the session it resumed holds an expired certificate");
            conn.close(1u32.into(), b"expired certificate");
            return;
        }
        if mesh.table().config().transport.zero_rtt {
            metrics::counter!(m::QUIC_ZERO_RTT, "direction" => "inbound", "result" => "resumed").increment(1);
        }
        let watched = conn.clone();
        tokio::spawn(async move {
            // A replayed first flight never ends its handshake: its early requests were
            // replay-safe ones, and the rest wait on `handshake` and are refused.
            let ended = tokio::time::timeout(limit, done).await.is_ok() && watched.close_reason().is_none();
            if ended {
                drop(slot);
                let _ = handshake_tx.send(true);
                return;
            }
            slot.release_after(admission::FAILED_HOLD);
            match watched.close_reason() {
                Some(e) => failed(&e),
                None => {
                    metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "timeout")
                        .increment(1);
                    watched.close(0u32.into(), b"handshake did not complete");
                }
            }
        });
    } else {
        match tokio::time::timeout(limit, done).await {
            Ok(_) if conn.close_reason().is_none() => {
                drop(slot);
                let _ = handshake_tx.send(true);
            }
            Ok(_) => {
                slot.release_after(admission::FAILED_HOLD);
                if let Some(e) = conn.close_reason() {
                    failed(&e);
                }
                return;
            }
            // Dropping the attempt closes it.
            Err(_) => {
                metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "timeout")
                    .increment(1);
                debug!(%remote, ?limit, "QUIC handshake from a would-be peer did not complete in time");
                conn.close(0u32.into(), b"handshake timed out");
                return;
            }
        }
    }
    let td = td.as_str();
    let Some(peer) = tls::peer_identity(&conn, td).and_then(|id| id.node_name().map(str::to_owned)) else {
        metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "wrong-identity")
            .increment(1);
        warn!(%remote, "refused QUIC peer: certificate has no node identity in trust domain {td}");
        conn.close(1u32.into(), b"no mesh identity");
        return;
    };
    if mesh.table().is_revoked(&peer) {
        metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "revoked").increment(1);
        warn!(%remote, peer, "refused QUIC peer: its membership is revoked");
        conn.close(2u32.into(), b"revoked");
        return;
    }
    quicmesh_shared::transport::open_streams(&conn, &mesh.table().config().transport);
    metrics::counter!(m::QUIC_CONNECTIONS_OPENED, "direction" => "inbound", "peer" => peer.clone()).increment(1);
    metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "inbound").increment(1.0);
    info!(%remote, peer, "accepted QUIC peer");
    quicmesh_shared::transport::pool::watch_stats(conn.clone(), "inbound", peer.clone());
    match Framing::of(&conn) {
        Some(Framing::Lean) => serve_lean(conn, &peer, mesh, handshake).await,
        _ => serve_h3(conn, &peer, mesh, handshake).await,
    }
    metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "inbound").decrement(1.0);
}

async fn serve_h3(conn: quinn::Connection, peer: &str, mesh: Arc<Mesh>, handshake: watch::Receiver<bool>) {
    let mut builder = h3::server::builder();
    builder.send_grease(false).max_field_section_size(MAX_HEADER_BYTES);
    let quic = conn.clone();
    let mut changes = mesh.changes();
    let mut h3 = match builder.build::<_, Bytes>(h3_quinn::Connection::new(conn)).await {
        Ok(h3) => h3,
        Err(e) => {
            warn!(peer, error = %e, "HTTP/3 setup with peer failed");
            return;
        }
    };
    let mut told = false;
    // One wait for the drain for the connection's life, not one per request accepted.
    let going_away = mesh.drain().reached(Phase::GoingAway);
    tokio::pin!(going_away);
    let streams = metrics::counter!(m::QUIC_STREAMS, "direction" => "inbound", "peer" => peer.to_string());
    let heads = Arc::new(lean::HeadSlots::default());
    loop {
        let (head_permit, accepted) = tokio::select! {
            a = async { (heads.slot().await, h3.accept().await) } => a,
            Ok(()) = changes.changed() => {
                // A revocation ends the peer's connection, not only its next handshake.
                if mesh.table().is_revoked(peer) {
                    warn!(peer, "closing the connection of a revoked peer");
                    quic.close(2u32.into(), b"revoked");
                    break;
                }
                continue;
            }
            _ = &mut going_away, if !told => {
                // GOAWAY: requests already accepted finish; later ones are refused unprocessed
                // (H3_REQUEST_REJECTED), so the peer may send them elsewhere.
                told = true;
                if let Err(e) = h3.shutdown(0).await {
                    debug!(peer, error = %e, "could not send GOAWAY");
                }
                info!(peer, "GOAWAY sent; waiting for the peer to close the connection");
                continue;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                let mesh = mesh.clone();
                let peer = peer.to_string();
                let handshake = handshake.clone();
                streams.increment(1);
                // Counted from the accept, not from when its headers have been read: a drain
                // that settled in between would close the connection under the request.
                let in_flight = mesh.drain().guard();
                // Boxed: a task's future is moved whole as it is spawned and when it ends, and a
                // request's is kilobytes.
                tokio::spawn(Box::pin(async move {
                    let _in_flight = in_flight;
                    let resolved = h3_head_within(resolver, lean::HEAD_WITHIN).await;
                    drop(head_permit);
                    match resolved {
                        Ok(Ok((req, stream))) => {
                            request(req, None, ServerStream::H3(Box::new(stream)), &peer, &mesh, handshake).await
                        }
                        Ok(Err(e)) => debug!(peer, error = %e, "bad request stream from peer"),
                        Err(_) => debug!(peer, "a request head from the peer did not arrive in time; stream reset"),
                    }
                }));
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    debug!(peer, error = %e, "peer connection ended");
                }
                break;
            }
        }
    }
    if told {
        // h3 closes the connection when `h3` is dropped, which must not come first.
        refuse_until_closed(&quic, peer).await;
    }
}

/// After a GOAWAY, until the peer closes the connection: a request it sent before it read the
/// GOAWAY is refused unprocessed (`REQUEST_REJECTED`, as h3 refuses one), so the peer may send
/// it elsewhere.
async fn refuse_until_closed(quic: &quinn::Connection, peer: &str) {
    while let Ok((send, recv)) = quic.accept_bi().await {
        lean::refuse(send, recv, lean::REQUEST_REJECTED);
    }
    debug!(peer, reason = ?quic.close_reason(), "the peer closed its connection after the GOAWAY");
}

/// A peer's connection in quicmesh's own framing ([`lean`]): each stream a request, served
/// until the peer closes the connection, or after a drain's GOAWAY until it has closed it.
async fn serve_lean(conn: quinn::Connection, peer: &str, mesh: Arc<Mesh>, handshake: watch::Receiver<bool>) {
    let mut changes = mesh.changes();
    let going_away = mesh.drain().reached(Phase::GoingAway);
    tokio::pin!(going_away);
    let streams = metrics::counter!(m::QUIC_STREAMS, "direction" => "inbound", "peer" => peer.to_string());
    let heads = Arc::new(lean::HeadSlots::default());
    // The request bodies' readers, watched so that one that stops reading (an instance that
    // takes no more of its upload) holds up no other request from this peer.
    let stalls = Stalls::new(conn.clone());
    loop {
        let (head_permit, (send, recv)) = tokio::select! {
            a = async { (heads.slot().await, conn.accept_bi().await) } => match a {
                (permit, Ok(pair)) => (permit, pair),
                (_, Err(e)) => {
                    if !matches!(e, quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) {
                        debug!(peer, error = %e, "peer connection ended");
                    }
                    return;
                }
            },
            Ok(()) = changes.changed() => {
                if mesh.table().is_revoked(peer) {
                    warn!(peer, "closing the connection of a revoked peer");
                    conn.close(2u32.into(), b"revoked");
                    return;
                }
                continue;
            }
            _ = &mut going_away => {
                // Requests already accepted finish; later ones are refused unprocessed. Sent
                // on a task of its own: a peer that gives no stream credit for it does not
                // hold up the refusals.
                let (quic, name) = (conn.clone(), peer.to_string());
                tokio::spawn(async move {
                    if let Err(e) = lean::go_away(&quic).await {
                        debug!(peer = name, error = %e, "could not send GOAWAY");
                    }
                });
                info!(peer, "GOAWAY sent; waiting for the peer to close the connection");
                return refuse_until_closed(&conn, peer).await;
            }
        };
        streams.increment(1);
        let mesh = mesh.clone();
        let peer = peer.to_string();
        let handshake = handshake.clone();
        let in_flight = mesh.drain().guard();
        let stalls = stalls.clone();
        // Boxed: a task's future is moved whole as it is spawned and when it ends.
        tokio::spawn(Box::pin(async move {
            let _in_flight = in_flight;
            let head = lean::accept(send, recv, lean::MAX_HEAD, lean::HEAD_WITHIN).await;
            drop(head_permit);
            match head {
                Ok((req, fields, send, mut recv)) => {
                    recv.watched_after_first_read_by(&stalls);
                    request(req, Some(fields), ServerStream::Lean(send, recv), &peer, &mesh, handshake).await
                }
                Err(e) => debug!(peer, error = %e, "bad request stream from peer"),
            }
        }));
    }
}

/// A request that may have come in 0-RTT: replay-safe methods go on at once, marked
/// `early-data: 1` for the instance (RFC 8470, which may answer 425); the others wait for the
/// handshake to end.
async fn replay_safe(
    req: &mut Request<()>,
    mut handshake: watch::Receiver<bool>,
    limit: std::time::Duration,
) -> Result<(), ProxyError> {
    if *handshake.borrow() {
        return Ok(());
    }
    if quicmesh_shared::transport::pool::replay_safe(req.method()) {
        req.headers_mut().insert("early-data", HeaderValue::from_static("1"));
        return Ok(());
    }
    match tokio::time::timeout(limit, handshake.wait_for(|done| *done)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(ProxyError::TooEarly),
    }
}

/// One request or tunnel from a peer; the drain counts it in flight (from its accept). `fields`:
/// the mesh's own fields, when the framing read them apart from the headers.
async fn request(
    mut req: Request<()>,
    fields: Option<headers::Internal>,
    stream: ServerStream,
    peer: &str,
    mesh: &Mesh,
    handshake: watch::Receiver<bool>,
) {
    // In 0-RTT only what may be replayed goes on at once; the rest waits for the handshake,
    // which a replayed flight never completes (the peer's side holds them back too).
    // Boxed: only a request in 0-RTT can wait here.
    let early = if *handshake.borrow() {
        Ok(())
    } else {
        Box::pin(replay_safe(&mut req, handshake, mesh.table().config().timeouts.connect)).await
    };
    let early = match early {
        Ok(()) => Ok(()),
        Err(e) if req.method() == Method::CONNECT => {
            debug!(peer, error = %e, "tunnel refused: the handshake did not complete");
            return;
        }
        Err(e) => Err(e),
    };
    // Authorized and delivered in canonical form, whatever the peer sent.
    let table = mesh.table();
    let path = match quicmesh_shared::message::path::normalize_uri(req.uri(), table.config().mesh.merge_slashes) {
        Ok(Some(uri)) => {
            *req.uri_mut() = uri;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(ProxyError::BadRequest(e.to_string())),
    };
    if req.method() == Method::CONNECT {
        return Box::pin(crate::tcp::inbound(req, fields, stream, peer, mesh)).await;
    }
    let fields = fields.unwrap_or_else(|| headers::Internal::take(req.headers_mut()));
    let mut rec = Record::new("inbound", mesh.access_log().cloned(), mesh.tap(), mesh.tracing());
    rec.request(&req);
    let mut req = req;
    // With spans exported here, the instance's work hangs under this proxy's span, as the
    // caller's under its own; without, the caller's span stays the parent (no span id is made
    // that nobody exports, and the request pays nothing for it).
    if let Some(tracing) = mesh.tracing() {
        headers::continue_trace(req.headers_mut(), &mut headers::Scratch::default(), |id| tracing.sample_root(id));
    }
    rec.ids(req.headers());
    let (mut send, recv) = stream.split();
    let source = source_of(&fields, peer, &table);
    rec.source(source, peer);
    // The request's head lives in this block only: kept past it, it would be room in the
    // task's future while the response is sent. (The receive half stays: dropped, it would
    // stop the peer's upload before an answer made here is sent.)
    let result = {
        let req = req;
        match early.and(path).and_then(|()| local_target(&fields, mesh, &table)) {
            Ok((svc, addr)) if svc.protocol != Protocol::Tcp => {
                rec.service(&svc.name);
                rec.endpoint(mesh.local_node().unwrap_or_default(), addr, 0);
                let via_gateway = peer == table.gateway_name();
                let claims = gateway_claims(fields.jwt_claims.as_ref(), via_gateway);
                let caller = Caller {
                    node: peer,
                    service: (source != telemetry::UNKNOWN).then_some(source),
                    via_gateway,
                    jwt: claims.as_ref(),
                };
                let target = Target {
                    method: Some(req.method()),
                    path: Some(req.uri().path()),
                    headers: Some(req.headers()),
                    port: addr.port(),
                };
                match mesh.authorize(&table, &svc.name, &caller, &target) {
                    // Boxed to keep this task's future small (it is copied whole at spawn).
                    Ok(()) => {
                        let limit = try_limit(fields.try_timeout.as_ref(), &req, &table);
                        Box::pin(deliver(req, recv, addr, svc, limit, mesh, &mut rec)).await
                    }
                    Err(e) => Err(e),
                }
            }
            Ok((svc, _)) => {
                rec.service(&svc.name);
                Err(ProxyError::BadRequest("service is TCP".into()))
            }
            Err(e) => Err(e),
        }
    };
    let resp = match result {
        // Only this proxy may say a request never reached the instance: the local client
        // already took an instance's own `quicmesh-unsent` (and `quicmesh-error`) out.
        Ok(resp) => resp,
        Err(e) => {
            debug!(peer, error = %e, "inbound request failed");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "inbound", "reason" => e.reason()).increment(1);
            let mut resp = e.response();
            if e.unsent() {
                resp.headers_mut().insert(UNSENT_HEADER, HeaderValue::from_static("1"));
            }
            resp
        }
    };
    let (parts, body) = rec.finish(resp).into_parts();
    let mut head = Response::from_parts(parts, ());
    *head.version_mut() = http::Version::HTTP_3;
    if let Err(e) = send.send_response(head).await {
        debug!(peer, error = %e, "peer went away before the response");
        return;
    }
    if let Err(e) = body::pump_to_h3(body, &mut send).await {
        debug!(peer, error = %e, detail = ?e, "response body ended early");
    }
}

async fn deliver(
    req: Request<()>,
    recv: ServerRecv,
    addr: SocketAddr,
    svc: &ServiceConfig,
    limit: std::time::Duration,
    mesh: &Mesh,
    rec: &mut Record,
) -> Result<Response<body::Body>, ProxyError> {
    let (mut parts, ()) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(a) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(HOST, v);
        }
    }
    // A request body the peer cut off (its client's fault) is not the instance's failure.
    let (body, fault) = body::watch_source(rec.count_request(body::request_body(recv).await));
    let req = Request::from_parts(parts, body);
    let timeout = limit;
    let result = tokio::time::timeout(timeout, mesh.local().send(req, addr, svc))
        .await
        .map_err(|_| ProxyError::Timeout(timeout))
        .and_then(|r| r);
    match fault.error() {
        Some(e) => Err(e),
        None => result,
    }
}

/// The calling member's limit for this try (its route may allow more than this node's
/// `timeouts.request`, or none), else a gRPC caller's deadline as the calling node passed on
/// what is left of it, else this node's own limit. A caller that gives up earlier resets the
/// stream, which ends the delivery too.
fn try_limit(try_timeout: Option<&HeaderValue>, req: &Request<()>, table: &Table) -> std::time::Duration {
    try_timeout
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
        .or_else(|| headers::find(req.headers(), &headers::GRPC_TIMEOUT).and_then(headers::parse_grpc_timeout))
        .unwrap_or(table.config().timeouts.request)
}

/// The claims of the JWT the gateway verified for this request, believed only from the
/// gateway (from any other peer the header is ignored, and it never reaches an instance).
pub(crate) fn gateway_claims(
    value: Option<&HeaderValue>,
    via_gateway: bool,
) -> Option<quicmesh_shared::policy::jwt::Claims> {
    let value = value.filter(|_| via_gateway)?;
    quicmesh_shared::policy::jwt::decode_claims(value)
}
