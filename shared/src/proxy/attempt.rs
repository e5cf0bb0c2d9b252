//! One try of a call: the service's circuit breakers, then the chosen endpoint, here (a local
//! instance) or through its node (a request stream on the pooled QUIC connection); the result
//! feeds the balancer and outlier detection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{Request, Response};
use tracing::{debug, warn};

use super::mesh::Call;
use super::table::Service;
use crate::config::EndpointConfig;
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::policy::balance::EndpointStats;
use crate::policy::{authz, health};
use crate::telemetry::metrics as m;
use crate::transport::pool::{PeerConn, Readiness};

/// A try without a time limit (a rule's timeouts set to "0s"): as long as any configured time.
pub const UNLIMITED: Duration = crate::config::MAX_DURATION;
/// The most a failed try counts as in the balancer's latency figures.
const FAILURE_PENALTY_CAP: Duration = Duration::from_secs(30);

/// Holds one of a service's circuit-breaker slots until dropped.
struct Slot<'a>(&'a AtomicU64);

impl<'a> Slot<'a> {
    /// Takes a slot unless `max` are taken already.
    fn take(counter: &'a AtomicU64, max: Option<u32>) -> Option<Self> {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(counter);
        max.is_none_or(|max| before < u64::from(max)).then_some(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A failed try, and whether the request provably never reached the upstream instance.
#[derive(Debug)]
pub struct TryError {
    pub error: ProxyError,
    pub unsent: bool,
}

impl TryError {
    pub(crate) fn unsent(error: ProxyError) -> Self {
        Self { error, unsent: true }
    }
    pub(crate) fn sent(error: ProxyError) -> Self {
        Self { error, unsent: false }
    }
}

impl From<ProxyError> for TryError {
    fn from(error: ProxyError) -> Self {
        let unsent = error.unsent();
        Self { error, unsent }
    }
}

impl Call<'_> {
    /// Sends a request to one endpoint of `svc`, locally or through the endpoint's node, once.
    /// The request's headers must already be cleaned of hop-by-hop fields.
    pub async fn forward(
        &self,
        req: Request<Body>,
        svc: &Service,
        ep: &EndpointConfig,
    ) -> Result<Response<Body>, ProxyError> {
        let (head, body) = req.into_parts();
        let limit = TryLimit { per_try: self.table.config().timeouts.request, callers: false };
        self.forward_try(&head, body, svc, ep, limit).await.map_err(|e| e.error)
    }

    /// One try of the request `head` with `body`: circuit breakers, then the endpoint within
    /// `limit`; feeds the balancer and outlier detection with the result. The head is
    /// borrowed, so a call's tries share it: each copies it once, as it goes on the wire.
    pub async fn forward_try(
        &self,
        head: &Parts,
        body: Body,
        svc: &Service,
        ep: &EndpointConfig,
        limit: TryLimit,
    ) -> Result<Response<Body>, TryError> {
        let per_try = limit.per_try;
        // Circuit breaker: refuse at once rather than queue without bound.
        let Some(_slot) = Slot::take(&svc.state.in_flight, svc.config.max_requests) else {
            return Err(overloaded(svc, "max_requests"));
        };
        // Feed the balancer: requests in flight, and time to response headers.
        let stats = svc.stats_of(ep).cloned().unwrap_or_default();
        let in_flight = stats.start();
        let local = self.mesh.is_local(ep);
        let pooled = if local {
            self.authorize_local(head, svc, ep)?;
            None
        } else {
            Some(self.connected(svc, ep, per_try).await?)
        };
        let start = Instant::now();
        // The client's own body failing says nothing about the endpoint: no statistics.
        let result = self.send(head, body, svc, ep, per_try, pooled).await?;
        // A peer that could not be reached is marked unreachable by the pool and skipped until
        // its probe succeeds: charging its endpoints as slow or ejecting them too would keep
        // them out long after it is back.
        // Nor is a connection to its node that had no free stream in time (long-lived streams
        // took them all) the endpoint's doing.
        if let Err(TryError {
            error: ProxyError::PeerUnreachable { .. } | ProxyError::ConnectTimeout(_) | ProxyError::Overloaded(_),
            unsent: true,
        }) = &result
        {
            return result;
        }
        // Nor is a head the client made too large for the next node, or a target no request
        // can carry, the endpoint's doing, nor an upload this side stopped for the window it
        // held: no statistics.
        if let Err(TryError {
            error: ProxyError::HeadTooLarge(_) | ProxyError::BadRequest(_) | ProxyError::ReaderStalled,
            ..
        }) = &result
        {
            return result;
        }
        // Nor is a try cut short by the caller's own deadline (whichever node's timer ended
        // it), when that deadline is shorter than the mesh's limit: a client asking for less
        // time than endpoints take must not get them ejected, nor, by the few moments it
        // waited, make them look fast to the balancer. (Usually the call's own timer, of the
        // same length and started first, drops the try before this point anyway.)
        let cut_short = match &result {
            Err(TryError { error: ProxyError::Timeout(_), .. }) => limit.callers,
            Ok(resp) => limit.callers && mesh_timeout(resp),
            Err(_) => false,
        };
        if cut_short {
            return result;
        }
        // A failure costs like a timeout, so the balancer steers away from it.
        // A failure costs the balancer what a try may take (bounded when tries are not).
        let penalty = per_try.min(FAILURE_PENALTY_CAP);
        let end = Instant::now();
        let took = end.saturating_duration_since(start);
        in_flight.observe_at(if result.is_ok() { took } else { penalty.max(took) }, end);
        let failed = match &result {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => !matches!(e.error, ProxyError::Overloaded(_)),
        };
        outlier(svc, ep, &stats, failed);
        result
    }

    /// The pooled connection to the endpoint's node, once ready: connection setup is not the
    /// endpoint's latency, so it happens before the try is timed, as one of a bounded number of
    /// requests waiting for one, within the try's own timeout (the dial itself goes on and
    /// tells the requests after this one). A peer that cannot be reached fails the try at once,
    /// as never sent: the caller retries it elsewhere without a second handshake here.
    async fn connected(&self, svc: &Service, ep: &EndpointConfig, per_try: Duration) -> Result<PeerConn, TryError> {
        let address = self.peer_address(ep).map_err(TryError::unsent)?;
        match self.mesh.pool().readiness(&ep.node, address) {
            Readiness::Ready(pc) => return Ok(pc),
            // Refused at once, as never sent, without a place among the waiting requests.
            // Boxed, as the wait below: only the ready connection is the usual case.
            Readiness::Down => {
                return Box::pin(self.mesh.pool().get(&ep.node, address)).await.map_err(TryError::unsent)
            }
            Readiness::Wait => {}
        }
        let Some(_pending) = Slot::take(&svc.state.pending, svc.config.max_pending) else {
            return Err(overloaded(svc, "max_pending"));
        };
        match tokio::time::timeout(per_try, Box::pin(self.mesh.pool().get(&ep.node, address))).await {
            Ok(connected) => connected.map_err(TryError::unsent),
            Err(_) => {
                let waited = format!("peer node {} within the try's {per_try:?}", ep.node);
                Err(TryError::unsent(ProxyError::ConnectTimeout(waited)))
            }
        }
    }

    /// Local delivery skips the inbound side, so the authorization policy is applied here.
    fn authorize_local(&self, head: &Parts, svc: &Service, ep: &EndpointConfig) -> Result<(), TryError> {
        let caller = self.mesh.local_caller(self.table);
        let target = authz::Target {
            method: Some(&head.method),
            path: Some(head.uri.path()),
            headers: Some(&head.headers),
            port: ep.address.port(),
        };
        self.mesh.authorize(self.table, &svc.config.name, &caller, &target).map_err(TryError::sent)
    }

    /// Sends the request here or through the endpoint's node. A request body that breaks is the
    /// client's doing: the try ends with the client's error at once, whatever the upstream made
    /// of the cut request, as the outer `Err`; the inner result is the endpoint's.
    async fn send(
        &self,
        head: &Parts,
        body: Body,
        svc: &Service,
        ep: &EndpointConfig,
        per_try: Duration,
        pooled: Option<PeerConn>,
    ) -> Result<Result<Response<Body>, TryError>, TryError> {
        let (body, fault) = body::watch_source(body);
        let attempt = async {
            // A local instance (no connection to a node) gets its own copy of the head.
            let Some(pooled) = pooled else {
                let mut req = Request::new(body);
                *req.method_mut() = head.method.clone();
                *req.uri_mut() = head.uri.clone();
                *req.version_mut() = head.version;
                *req.headers_mut() = head.headers.clone();
                // Boxed, as the remote try is below: otherwise each of them would carry the
                // other's size.
                let local = Box::pin(self.mesh.local().send(req, ep.address, &svc.config));
                return match tokio::time::timeout(per_try, local).await {
                    Err(_) => Err(TryError::sent(ProxyError::Timeout(per_try))),
                    Ok(r) => r.map_err(TryError::from),
                };
            };
            // Boxed: the remote try's future is most of this one's size, and each future that
            // holds it inline (this block, `send`, `forward_try`) is copied whole when made.
            Box::pin(self.forward_remote(head, body, svc, ep, per_try, pooled)).await
        };
        // Pinned in place: the select below then holds a reference, not a second copy of it.
        tokio::pin!(attempt);
        let result = if fault.watching() {
            tokio::select! {
                biased;
                r = attempt.as_mut() => r,
                e = fault.failed() => Err(TryError::sent(e)),
            }
        } else {
            attempt.await
        };
        match fault.error() {
            Some(e) => {
                debug!(service = svc.config.name, error = %e, "the client's request body failed");
                Err(TryError::sent(e))
            }
            // Out of time while the client's body was still on its way: the client's delay, and
            // no endpoint's failure (before, a client that stalled its uploads got the
            // instances that waited for them ejected).
            // (Waiting for it for half the try at least: a client of a streaming call that waits
            // for the service's answer is not stalling it.)
            None if fault.awaiting_client_for(per_try / 2)
                && matches!(&result, Err(TryError { error: ProxyError::Timeout(_), .. })) =>
            {
                debug!(service = svc.config.name, "the client's request body did not come in time");
                Err(TryError::sent(ProxyError::BodyTimeout(per_try)))
            }
            None => Ok(result),
        }
    }
}

/// A circuit breaker's refusal, counted by the limit that refused.
fn overloaded(svc: &Service, limit: &'static str) -> TryError {
    metrics::counter!(m::CIRCUIT_OPEN, "service" => svc.config.name.clone(), "limit" => limit).increment(1);
    TryError::unsent(ProxyError::Overloaded(svc.config.name.clone()))
}

/// How long one try may take, and whether that is the caller's own deadline (shorter than any
/// limit the mesh sets), so that running out of it is no failure of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct TryLimit {
    pub per_try: Duration,
    pub callers: bool,
}

/// Is this the answer a delivering node gives when a try's time limit ran out there (a 504 the
/// mesh made), rather than one an instance gave?
fn mesh_timeout(resp: &Response<Body>) -> bool {
    resp.status() == http::StatusCode::GATEWAY_TIMEOUT
        && headers::find(resp.headers(), &crate::message::error::ERROR_HEADER).is_some_and(|v| v == "timeout")
}

/// Outlier detection: a failure counts towards ejecting the endpoint (within the service's
/// limit on ejected endpoints), a success resets the count.
fn outlier(svc: &Service, ep: &EndpointConfig, stats: &EndpointStats, failed: bool) {
    if !failed {
        stats.outlier.success();
        return;
    }
    let now = health::now_ms();
    let cfg = &svc.config.outlier;
    let may = || {
        let ejected = svc.stats.iter().filter(|s| s.outlier.is_ejected(now)).count();
        health::may_eject(cfg, ejected, svc.stats.len())
    };
    if let Some(span) = stats.outlier.failure(cfg, now, may) {
        metrics::counter!(m::OUTLIER_EJECTIONS, "service" => svc.config.name.clone()).increment(1);
        warn!(service = svc.config.name, node = ep.node, address = %ep.address, ?span, "endpoint ejected after consecutive failures");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_breaker_slots_stop_at_the_limit_and_come_back() {
        let counter = AtomicU64::new(0);
        let a = Slot::take(&counter, Some(2)).unwrap();
        let _b = Slot::take(&counter, Some(2)).unwrap();
        assert!(Slot::take(&counter, Some(2)).is_none(), "a third slot past max 2");
        assert_eq!(counter.load(Ordering::Relaxed), 2, "a refused take gives its slot back");
        drop(a);
        assert!(Slot::take(&counter, Some(2)).is_some());
        assert!(Slot::take(&counter, None).is_some(), "no limit");
    }
}
