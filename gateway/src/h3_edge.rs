//! The QUIC side of the edge: HTTP/3 from external clients (no client certificate), with a
//! header section size limit and the same request path as TCP.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use quicmesh_shared::message::body::{self, Body};
use quicmesh_shared::message::error::ProxyError;
use quicmesh_shared::proxy::drain::Phase;
use quicmesh_shared::proxy::{tcp, upgrade};
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::transport::admission::{self, Admission, Limits};
use quicmesh_shared::transport::stream::h3_head_within;
use tokio::sync::watch;
use tracing::debug;

use crate::conns::Activity;
use crate::handler::{Arrival, Edge, Port, EARLY_DATA};

pub async fn serve(endpoint: quinn::Endpoint, edge: Arc<Edge>, port: Arc<Port>) {
    let limits = Limits { retry_above: edge.limits.quic_retry_above, max: edge.limits.max_handshakes };
    let admission = Admission::new("edge", limits);
    while let Some(incoming) = endpoint.accept().await {
        if edge.mesh.drain().phase() >= Phase::GoingAway {
            incoming.refuse();
            continue;
        }
        // No state for an attempt until it is let in (a spoofed flood gets Retries).
        let Some((incoming, slot)) = admission.admit(incoming) else { continue };
        // Past the connection limits: refused (a clean CONNECTION_REFUSED), no state kept.
        let admitted = match edge.conns.admit(incoming.remote_address().ip()) {
            Ok(a) => a,
            Err(full) => {
                metrics::counter!(m::EDGE_REJECTED, "reason" => full.reason()).increment(1);
                incoming.refuse();
                continue;
            }
        };
        let (edge, port) = (edge.clone(), port.clone());
        quicmesh_shared::runtime::spawn_connection(async move {
            let client = incoming.remote_address();
            let limit = edge.limits.header_read_timeout;
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    metrics::counter!(m::EDGE_REJECTED, "reason" => "quic-handshake").increment(1);
                    debug!(%client, error = %e, "edge QUIC handshake failed");
                    return;
                }
            };
            // Serve from the first flight (0-RTT); `handshake` turns true once it completes.
            let (handshake_tx, handshake) = watch::channel(false);
            let conn = match connecting.into_0rtt() {
                Ok((conn, established)) => {
                    let watched = conn.clone();
                    tokio::spawn(async move {
                        // It resolves at the end of the handshake (true or false: whether the
                        // client's 0-RTT was accepted), or when the connection is lost first.
                        // A handshake that does not end in time is abandoned.
                        let ended = tokio::time::timeout(limit, established).await.is_ok();
                        if ended && watched.close_reason().is_none() {
                            drop(slot);
                            let _ = handshake_tx.send(true);
                        } else {
                            slot.release_after(admission::FAILED_HOLD);
                            watched.close(0u32.into(), b"handshake timed out");
                            let reason = if ended { "quic-handshake" } else { "quic-handshake-timeout" };
                            metrics::counter!(m::EDGE_REJECTED, "reason" => reason).increment(1);
                            debug!(%client, "edge QUIC handshake did not complete");
                        }
                    });
                    conn
                }
                Err(connecting) => match tokio::time::timeout(limit, connecting).await {
                    Ok(Ok(conn)) => {
                        drop(slot);
                        let _ = handshake_tx.send(true);
                        conn
                    }
                    Ok(Err(e)) => {
                        slot.release_after(admission::FAILED_HOLD);
                        metrics::counter!(m::EDGE_REJECTED, "reason" => "quic-handshake").increment(1);
                        debug!(%client, error = %e, "edge QUIC handshake failed");
                        return;
                    }
                    // Dropping the attempt closes it.
                    Err(_) => {
                        metrics::counter!(m::EDGE_REJECTED, "reason" => "quic-handshake-timeout").increment(1);
                        return;
                    }
                },
            };
            let sni = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.server_name)
                .map(|n| n.to_ascii_lowercase());
            // Client certificates turn 0-RTT off, so with them the handshake, and the
            // certificate, is complete here.
            let chain = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
            let subject = port.client_subject(chain.as_deref().map(Vec::as_slice));
            let arrival = Arrival { client, proto: "h3", subject, port, sni };
            connection(conn, arrival, edge, handshake).await;
            drop(admitted);
        });
    }
}

/// A request that may have come in 0-RTT data: safe methods go on at once, marked
/// `early-data: 1` for the upstream (RFC 8470); the others wait for the handshake, which a
/// replayed flight never completes, so they are never acted on twice.
async fn replay_safe(
    req: &mut Request<Body>,
    mut handshake: watch::Receiver<bool>,
    limit: Duration,
) -> Result<(), ProxyError> {
    if *handshake.borrow() {
        return Ok(());
    }
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        req.headers_mut().insert(EARLY_DATA, HeaderValue::from_static("1"));
        return Ok(());
    }
    match tokio::time::timeout(limit, handshake.wait_for(|done| *done)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(ProxyError::TooEarly),
    }
}

async fn connection(conn: quinn::Connection, arrival: Arrival, edge: Arc<Edge>, handshake: watch::Receiver<bool>) {
    let client = arrival.client;
    let arrival = Arc::new(arrival);
    metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "h3").increment(1);
    let quic = conn.clone();
    let built = h3::server::builder()
        .max_field_section_size(edge.limits.max_header_bytes as u64)
        // WebSocket over HTTP/3 (RFC 9220).
        .enable_extended_connect(true)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await;
    let mut h3 = match built {
        Ok(h3) => h3,
        Err(e) => {
            debug!(%client, error = %e, "edge HTTP/3 setup failed");
            return;
        }
    };
    let mut told = false;
    // One wait for the drain for the connection's life, not one per request accepted.
    let going_away = edge.mesh.drain().reached(Phase::GoingAway);
    tokio::pin!(going_away);
    let activity = Activity::default();
    // One wait for the connection's life: it looks at the requests in flight each time it wakes.
    let idle = activity.idle_for(edge.limits.header_read_timeout, edge.limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        let accepted = tokio::select! {
            a = h3.accept() => a,
            _ = &mut going_away, if !told => {
                told = true;
                if let Err(e) = h3.shutdown(0).await {
                    debug!(%client, error = %e, "could not send GOAWAY");
                }
                continue;
            }
            // No request in flight for the idle timeout (QUIC keep-alives do not count).
            _ = &mut idle => {
                metrics::counter!(m::EDGE_IDLE_CLOSED, "protocol" => "h3").increment(1);
                // The GOAWAY needs credit the client grants: do not wait on it for long.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), h3.shutdown(0)).await;
                // H3_NO_ERROR (0x100).
                quic.close(0x100u32.into(), b"idle");
                break;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                let (edge, arrival) = (edge.clone(), arrival.clone());
                let handshake = handshake.clone();
                let in_flight = activity.start();
                // Boxed: a task's future is moved whole as it is spawned and when it ends, and a
                // request's is kilobytes.
                tokio::spawn(Box::pin(async move {
                    let _in_flight = in_flight;
                    // A stream that never sends its headers must not count as a request in
                    // flight for ever (it would keep an idle connection open).
                    let resolved = h3_head_within(resolver, edge.limits.header_read_timeout);
                    let (req, stream) = match resolved.await {
                        Ok(Ok(x)) => x,
                        Ok(Err(e)) => {
                            metrics::counter!(m::EDGE_REJECTED, "reason" => "bad-request").increment(1);
                            debug!(%client, error = %e, "bad HTTP/3 request");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!(m::EDGE_REJECTED, "reason" => "header-timeout").increment(1);
                            return;
                        }
                    };
                    let (mut send, recv) = stream.split();
                    // An extended CONNECT (WebSocket, RFC 9220): the stream itself is the
                    // connection once answered 200, joined to the tunnel through a pipe.
                    let extended =
                        *req.method() == Method::CONNECT && req.extensions().get::<h3::ext::Protocol>().is_some();
                    let (mut req, tunnel) = if extended {
                        let (pipe, ours) = upgrade::Pipe::new();
                        let mut req = req.map(|()| body::empty());
                        req.extensions_mut().insert(pipe);
                        (req, Some((ours, recv)))
                    } else {
                        let body = body::request_body(recv).await;
                        (req.map(|()| body), None)
                    };
                    req.headers_mut().remove(EARLY_DATA);
                    let resp = match replay_safe(&mut req, handshake, edge.limits.header_read_timeout).await {
                        Ok(()) => edge.handle(req, &arrival, ()).await,
                        Err(e) => {
                            metrics::counter!(m::EDGE_REJECTED, "reason" => e.reason()).increment(1);
                            e.brief_response()
                        }
                    };
                    let (mut parts, body) = resp.into_parts();
                    parts.version = http::Version::HTTP_3;
                    let switched = parts.extensions.get::<upgrade::Open>().is_some();
                    if send.send_response(Response::from_parts(parts, ())).await.is_ok() {
                        match tunnel {
                            Some((pipe, recv)) if switched => {
                                // The exchange is recorded as the switch it was; the tunnel
                                // records its own line.
                                drop(body);
                                // The tunnel behind the pipe keeps the route's limits.
                                tcp::splice(pipe, send, recv, std::time::Duration::ZERO).await;
                            }
                            _ => {
                                if let Err(e) = body::pump_to_h3(body, &mut send).await {
                                    debug!(%client, error = %e, "HTTP/3 response body ended early");
                                }
                            }
                        }
                    }
                }));
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    debug!(%client, error = %e, "edge HTTP/3 connection ended");
                }
                break;
            }
        }
    }
}
