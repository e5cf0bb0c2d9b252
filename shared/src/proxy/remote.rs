//! A try through the endpoint's node: one request stream on the pooled QUIC connection,
//! carrying the chosen service and endpoint in internal headers. A dead pooled connection is
//! evicted and, when nothing can have reached the peer, the request is sent again on a fresh one.

use std::future::Future as _;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::{HeaderName, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;
use tracing::debug;

use super::attempt::TryError;
use super::mesh::Call;
use super::table::Service;
use crate::config::EndpointConfig;
use crate::message::body::{self, Body, H3Body, H3Send};
use crate::message::error::ProxyError;
use crate::message::headers::{self, GRPC_STATUS};
use crate::telemetry::metrics as m;
use crate::transport::lean::Head;
use crate::transport::pool::PeerConn;
use crate::transport::stream::{ClientRecv, RequestStream, WireError};

impl Call<'_> {
    pub(crate) async fn peer(&self, ep: &EndpointConfig) -> Result<PeerConn, ProxyError> {
        let address = self.peer_address(ep)?;
        self.mesh.pool().get(&ep.node, address).await
    }

    /// The address of the endpoint's node; never one of a revoked member, whatever still names
    /// it (a mirror, a request that picked its endpoint under the previous table).
    pub(crate) fn peer_address(&self, ep: &EndpointConfig) -> Result<SocketAddr, ProxyError> {
        if self.table.is_revoked(&ep.node) {
            return Err(ProxyError::PeerUnreachable {
                peer: ep.node.clone(),
                reason: "its membership is revoked".into(),
            });
        }
        let peer = self.table.config().peer(&ep.node).ok_or_else(|| ProxyError::PeerUnreachable {
            peer: ep.node.clone(),
            reason: "node has no address in config".into(),
        })?;
        Ok(peer.address)
    }

    pub(crate) async fn forward_remote(
        &self,
        parts: &Parts,
        body: Body,
        svc: &Service,
        ep: &EndpointConfig,
        per_try: Duration,
        pooled: PeerConn,
    ) -> Result<Response<Body>, TryError> {
        // The target in absolute form, made for each request stream (a replay makes it again:
        // a copy made up front for it cost every request a clone, whose first copy of a
        // fresh authority's bytes allocates). A node's outbound request carries it already,
        // and its authority is shared, not copied; the edge's names it in Host.
        let target = || {
            let uri = match parts.uri.authority() {
                Some(a) => headers::absolute_uri_at(http::uri::Scheme::HTTPS, a.clone(), &parts.uri),
                None => {
                    let authority =
                        headers::authority(&parts.uri, &parts.headers).unwrap_or_else(|| svc.config.name.clone());
                    headers::absolute_uri(http::uri::Scheme::HTTPS, authority, &parts.uri)
                }
            };
            uri.map_err(|e| TryError::unsent(ProxyError::BadRequest(format!("target: {e}"))))
        };
        // The hop's three values, written on the stack: the lean framing copies them into the
        // head's frame (HTTP/3 makes header values of them).
        if !headers::valid_value(svc.config.name.as_bytes()) {
            let bad = format!("unusable service name {:?}", svc.config.name);
            return Err(TryError::unsent(ProxyError::BadRequest(bad)));
        }
        let endpoint = headers::StackText::socket_addr(ep.address);
        let limit = headers::StackText::number(u64::try_from(per_try.as_millis()).unwrap_or(u64::MAX));
        // The caller's head is shared by its tries: each request stream's is made from it and
        // the hop's fields as it is sent (no copy of the caller's header map in the lean
        // framing; HTTP/3 takes a `Request`, so one there).
        let uri = target()?;
        let add: [(&HeaderName, &[u8]); 3] = [
            (&headers::SERVICE, svc.config.name.as_bytes()),
            (&headers::ENDPOINT, endpoint.as_bytes()),
            (&headers::TRY_TIMEOUT, limit.as_bytes()),
        ];
        let head = Head { method: &parts.method, uri: &uri, headers: &parts.headers, drop: Some(&HOST), add: &add };
        // A request that found its pooled connection dead is replayed once on a fresh one when
        // that is safe: idempotent and bodiless, so nothing can have been consumed upstream.
        if body.is_end_stream() && crate::policy::retry::idempotent(&parts.method) {
            // The replays are boxed, and what they replace is not kept across them: either
            // would add its size to every request's future.
            let reason = match self.send_bodiless(&head, &svc.config.name, ep, per_try, Some(pooled)).await {
                Err(TryError { error: ProxyError::PeerUnreachable { reason, .. }, .. }) => reason,
                other => return other,
            };
            debug!(peer = ep.node, reason, "pooled connection was dead; replaying on a fresh one");
            return Box::pin(self.send_bodiless(&head, &svc.config.name, ep, per_try, None)).await;
        }
        // With a body, only the stream opening may be repeated: the body is not consumed yet.
        let first = self.open_stream(&head, &svc.config.name, ep, Some(pooled), per_try).await;
        let (pc, stream) = if matches!(&first, Err(TryError { error: ProxyError::PeerUnreachable { .. }, .. })) {
            drop(first);
            Box::pin(self.open_stream(&head, &svc.config.name, ep, None, per_try)).await?
        } else {
            first?
        };
        let (mut send, recv) = stream.split();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                res = body::pump_to_h3(body, &mut send) => {
                    if let Err(e) = res {
                        debug!(error = %e, "request body upload ended early");
                    }
                }
                _ = cancel_rx => send.reset(),
            }
        });
        // The upload runs on past the response headers (full duplex) until the response body is
        // dropped; dropping `cancel_tx` then resets an unfinished upload.
        let resp = self.await_recv(recv, ep, &pc, per_try).await?;
        Ok(resp.map(|b| body::with_guard(b, cancel_tx)))
    }

    /// Opens a request stream on `pooled`, else on the pool's connection; a dead or closing
    /// connection is evicted. Nothing reached the peer when this fails. A connection whose
    /// streams are all taken (long-lived ones: upgrades, tunnels, slow downloads) is waited on
    /// for `per_try` at most, and then the try is refused as overloaded: before, it waited for
    /// ever, and no timer of the try had started.
    async fn open_stream(
        &self,
        head: &Head<'_>,
        service: &str,
        ep: &EndpointConfig,
        pooled: Option<PeerConn>,
        per_try: Duration,
    ) -> Result<(PeerConn, RequestStream), TryError> {
        let pc = match pooled {
            Some(pc) => pc,
            // Boxed, as each rare path here is: a replay's dial would otherwise add its size to
            // every request's future (each future is copied whole when made, and boxed once).
            None => Box::pin(self.peer(ep)).await.map_err(TryError::unsent)?,
        };
        // Only a connection that went out in 0-RTT may have to wait.
        if pc.early.is_some() {
            Box::pin(pc.ready_for(head.method)).await.map_err(TryError::unsent)?;
        }
        // Polled once first: nearly always the stream opens and the head goes at once, and then
        // no timer is made (nor the clock read).
        let opened = {
            let mut open = std::pin::pin!(pc.open_head(head));
            match std::future::poll_fn(|cx| Poll::Ready(open.as_mut().poll(cx))).await {
                Poll::Ready(opened) => Some(opened),
                Poll::Pending => tokio::time::timeout(per_try, open).await.ok(),
            }
        };
        let Some(opened) = opened else {
            metrics::counter!(m::CIRCUIT_OPEN, "service" => service.to_string(), "limit" => "peer_streams")
                .increment(1);
            debug!(peer = ep.node, service, ?per_try, "no free stream to the peer in time");
            return Err(TryError::unsent(ProxyError::Overloaded(service.to_string())));
        };
        let reason = match opened {
            Ok(s) => {
                pc.streams.increment(1);
                return Ok((pc, s));
            }
            // The caller's head cannot be framed, or is larger than the peer takes (431): its
            // fault, not the connection's, which stays (and neither the peer nor the endpoint is
            // blamed).
            Err(WireError::Malformed(why)) => return Err(TryError::unsent(ProxyError::BadRequest(why.into()))),
            Err(e) if e.head_too_large() => return Err(TryError::unsent(ProxyError::HeadTooLarge(e.to_string()))),
            // Only the reason is kept across the eviction, not the stream's result.
            Err(e) => e.to_string(),
        };
        Box::pin(self.mesh.pool().evict(&ep.node, &pc.conn)).await;
        Err(TryError::unsent(ProxyError::PeerUnreachable { peer: ep.node.clone(), reason }))
    }

    async fn send_bodiless(
        &self,
        head: &Head<'_>,
        service: &str,
        ep: &EndpointConfig,
        per_try: Duration,
        pooled: Option<PeerConn>,
    ) -> Result<Response<Body>, TryError> {
        let (pc, mut stream) = self.open_stream(head, service, ep, pooled, per_try).await?;
        if let Err(e) = stream.finish().await {
            let (unsent, reason) = (e.rejected(), e.to_string());
            // Not kept across the eviction.
            drop(stream);
            Box::pin(self.mesh.pool().evict(&ep.node, &pc.conn)).await;
            let error = ProxyError::PeerUnreachable { peer: ep.node.clone(), reason };
            return Err(TryError { error, unsent });
        }
        let (_send, recv) = stream.split();
        self.await_recv(recv, ep, &pc, per_try).await
    }

    async fn await_recv(
        &self,
        mut recv: ClientRecv,
        ep: &EndpointConfig,
        pc: &PeerConn,
        per_try: Duration,
    ) -> Result<Response<Body>, TryError> {
        let head = match tokio::time::timeout(per_try, recv.recv_response()).await {
            // Dropping `recv` stops the stream (quinn sends STOP_SENDING as it drops it).
            Err(_) => return Err(TryError::sent(ProxyError::Timeout(per_try))),
            // Refused before processing (the peer is draining): safe to send elsewhere.
            Ok(Err(e)) if e.rejected() => {
                return Err(TryError::unsent(ProxyError::PeerUnreachable {
                    peer: ep.node.clone(),
                    reason: "request refused by a draining peer".into(),
                }))
            }
            Ok(Err(e)) if e.is_connection_error() => {
                let error = ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() };
                Box::pin(self.mesh.pool().evict(&ep.node, &pc.conn)).await;
                // Early data the peer refused was never acted on (and was replay-safe anyway).
                let unsent = Box::pin(pc.early_refused()).await;
                return Err(TryError { error, unsent });
            }
            Ok(Err(e)) => {
                // The peer refused the early data this went in: it was never acted on.
                if pc.early.is_some() && Box::pin(pc.early_refused()).await {
                    return Err(TryError::unsent(ProxyError::PeerUnreachable {
                        peer: ep.node.clone(),
                        reason: e.to_string(),
                    }));
                }
                return Err(TryError::sent(ProxyError::UpstreamReset(e.to_string())));
            }
            // The instance would not act on a request that came before the handshake ended
            // (RFC 8470): it goes again now that the handshake is over.
            Ok(Ok(head)) if head.status() == http::StatusCode::TOO_EARLY && pc.early.is_some() => {
                let refused = Box::pin(pc.early_refused()).await;
                return Err(TryError::unsent(ProxyError::PeerUnreachable {
                    peer: ep.node.clone(),
                    reason: if refused { "0-RTT refused".into() } else { "425 to a request sent in 0-RTT".into() },
                }));
            }
            Ok(Ok(head)) => head,
        };
        let (mut parts, ()) = head.into_parts();
        parts.version = http::Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers);
        let body = H3Body::new(recv);
        if headers::has(&parts.headers, &GRPC_STATUS) {
            // Boxed: rare, and it holds the body across a wait.
            return Box::pin(trailers_only(parts, body, pc, per_try)).await;
        }
        // The body holds the connection open until it ends (see `PeerConn::hold`).
        Ok(Response::from_parts(parts, body::boxed(body.holding(pc.hold()))))
    }
}

/// A gRPC trailers-only answer: the status is in the headers, which ended the stream where the
/// answer was made. Reads that end now, so the headers end the stream for the caller too (gRPC
/// clients take headers followed by an empty end for a broken stream).
async fn trailers_only(
    parts: http::response::Parts,
    mut body: H3Body<ClientRecv>,
    pc: &PeerConn,
    per_try: Duration,
) -> Result<Response<Body>, TryError> {
    match tokio::time::timeout(per_try, body.frame()).await {
        Ok(None) => Ok(Response::from_parts(parts, body::empty())),
        Ok(Some(Ok(frame))) => {
            let rest = body::boxed(body.holding(pc.hold()));
            Ok(Response::from_parts(parts, body::prefixed(frame, rest)))
        }
        Ok(Some(Err(e))) => Err(TryError::sent(ProxyError::UpstreamReset(e.to_string()))),
        Err(_) => Err(TryError::sent(ProxyError::Timeout(per_try))),
    }
}
