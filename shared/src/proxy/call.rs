//! One call to a service: fault injection, then tries until one answers or the retry policy,
//! the retry budget or the deadline says stop. Each retry goes to an endpoint not tried yet when
//! there is one, after an exponential backoff with jitter, and carries `quicmesh-attempt`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use tracing::debug;

use super::attempt::{TryError, TryLimit};
use super::mesh::Call;
use super::pick::PickCtx;
use super::table::Service;
use crate::config::EndpointConfig;
use crate::message::body::{self, Body, Replay};
use crate::message::error::{ProxyError, UNSENT_HEADER};
use crate::message::headers;
use crate::policy::limit::Fault;
use crate::policy::retry::{RouteRetry, TryOutcome};
use crate::policy::route::RuleTimeouts;
use crate::telemetry::metrics as m;
use crate::telemetry::Record;

/// What the matched route (if any) adds to a call.
#[derive(Default)]
pub struct CallOpts<'a> {
    /// Route name, for metrics.
    pub route: &'a str,
    /// Endpoint subset of the backend.
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub retry: Option<&'a RouteRetry>,
    pub timeouts: Option<&'a RuleTimeouts>,
    pub fault: Option<&'a Fault>,
    pub client: Option<IpAddr>,
}

/// What a call did, for metrics and the access log.
#[derive(Debug, Default)]
pub struct CallInfo<'s> {
    /// The endpoint of the last try.
    pub endpoint: Option<&'s EndpointConfig>,
    pub retries: u32,
}

impl CallInfo<'_> {
    /// Tells the request's record which endpoint answered last, after how many retries.
    pub fn record(&self, rec: &mut Record) {
        if let Some(ep) = self.endpoint {
            rec.endpoint(&ep.node, ep.address, self.retries);
        }
    }
}

/// Budgets are counted against one clock per process.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Call<'_> {
    /// Calls `svc` with `req` (headers already cleaned of hop-by-hop fields), retrying as its
    /// policy and the route allow, within the route's request timeout.
    pub async fn call<'s>(
        &self,
        svc: &'s Service,
        req: Request<Body>,
        opts: &CallOpts<'_>,
        info: &mut CallInfo<'s>,
    ) -> Result<Response<Body>, ProxyError> {
        // "0s" turns a limit off (Gateway API). A gRPC caller's deadline (`grpc-timeout`)
        // bounds the call too, in place of the mesh's default request timeout.
        let deadline = headers::find(req.headers(), &headers::GRPC_TIMEOUT).and_then(headers::parse_grpc_timeout);
        let route_total = opts.timeouts.and_then(|t| t.request).filter(|d| !d.is_zero());
        let total = match (route_total, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let resp = match total {
            Some(total) => tokio::time::timeout(total, self.call_inner(svc, req, opts, info, deadline))
                .await
                .unwrap_or(Err(ProxyError::Timeout(total))),
            None => self.call_inner(svc, req, opts, info, deadline).await,
        }?;
        Ok(match opts.timeouts.and_then(|t| t.stream_idle) {
            Some(idle) => resp.map(|b| body::idle_limited(b, idle)),
            None => resp,
        })
    }

    async fn call_inner<'s>(
        &self,
        svc: &'s Service,
        req: Request<Body>,
        opts: &CallOpts<'_>,
        info: &mut CallInfo<'s>,
        deadline: Option<Duration>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(fault) = opts.fault {
            let plan = fault.plan(&mut fastrand::Rng::new());
            if let Some(delay) = plan.delay {
                metrics::counter!(m::FAULTS, "route" => opts.route.to_string(), "kind" => "delay").increment(1);
                // Boxed, as the backoff below: a timer kept inline would add its size to every call.
                Box::pin(tokio::time::sleep(delay)).await;
            }
            if let Some(status) = plan.abort {
                metrics::counter!(m::FAULTS, "route" => opts.route.to_string(), "kind" => "abort").increment(1);
                return Err(ProxyError::Fault(status));
            }
        }
        let policy = svc.config.retry.with_route(opts.retry);
        // A route's own retry policy follows the Gateway API (GEP-1731): connection errors are
        // retried whatever its codes, and once they outlast its attempts the answer is 503.
        let route_retry = opts.retry.is_some();
        // A try is bounded by the rule's `backendRequest`, else by the caller's gRPC deadline,
        // else by the rule's `request` (the whole call's limit), else by the mesh's request
        // timeout, unless the rule turned its limits off with "0s".
        let per_try_set = opts.timeouts.and_then(|t| match (t.backend_request, t.request) {
            (Some(d), _) => Some(d),
            (None, Some(total)) if total.is_zero() => Some(total),
            _ => None,
        });
        let started = Instant::now();
        let mesh_limit = || {
            opts.timeouts
                .and_then(|t| t.request)
                .filter(|d| !d.is_zero())
                .unwrap_or(self.table.config().timeouts.request)
        };
        let limit = match (per_try_set, deadline) {
            (Some(d), _) if d.is_zero() => TryLimit { per_try: crate::proxy::attempt::UNLIMITED, callers: false },
            (Some(d), _) => TryLimit { per_try: d, callers: false },
            // The caller's deadline, when it is shorter than the mesh's own limit, is the
            // caller's choice: a try that runs out of it is not held against the endpoint.
            (None, Some(deadline)) => TryLimit { per_try: deadline, callers: deadline < mesh_limit() },
            (None, None) => TryLimit { per_try: mesh_limit(), callers: false },
        };
        let per_try_set = per_try_set.is_some();
        let no_labels = BTreeMap::new();
        let labels = opts.labels.unwrap_or(&no_labels);
        svc.state.budget.deposit(epoch(), started);
        // No `quicmesh-unsent` to remove: a client's is stripped with the other internal
        // headers before the call (`forwarding_headers`), and an authorization check copies
        // none of them.
        let (mut parts, body) = req.into_parts();
        // The body streams to the first try; a copy up to `max_body` is kept for another.
        let mut source = if body.is_end_stream() {
            Source::Empty
        } else if policy.attempts == 0 || body.size_hint().lower() > policy.max_body {
            Source::Once(Some(body))
        } else {
            Source::Replay(Replay::new(body, policy.max_body))
        };
        let mut tried: Vec<&EndpointConfig> = Vec::new();
        let mut rng = fastrand::Rng::new();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let ep = {
                let ctx = PickCtx { headers: Some(&parts.headers), client: opts.client };
                self.mesh.pick_avoiding(svc, labels, &ctx, &tried)?
            };
            info.retries = attempt - 1;
            info.endpoint = Some(ep);
            let body = match &mut source {
                Source::Empty => Some(body::empty()),
                Source::Replay(r) => r.body(),
                Source::Once(b) => b.take(),
            };
            // Only reached for a second try when `can_replay` said so.
            let Some(body) = body else {
                return Err(ProxyError::BadRequest("request body cannot be sent again".into()));
            };
            // The try copies the head as it sends it; what differs between tries is set here,
            // after the pick, and replaced by the next try's.
            if attempt > 1 {
                parts.headers.insert(headers::ATTEMPT, HeaderValue::from(attempt));
            }
            // The next hop gets what is left of the caller's deadline.
            if let Some(d) = deadline {
                let left = d.saturating_sub(started.elapsed());
                parts.headers.insert(headers::GRPC_TIMEOUT, headers::grpc_timeout_value(left));
            }
            // Boxed: the try's future is the bulk of a request's state (h3 and hyper futures
            // nested), and every future that holds it inline is copied whole when its task is
            // spawned and when it completes.
            let result = Box::pin(self.forward_try(&parts, body, svc, ep, limit)).await;
            let outcome = match &result {
                Ok(resp) if headers::has(resp.headers(), &UNSENT_HEADER) => TryOutcome::Unsent,
                Ok(resp) if policy.codes.contains(&resp.status().as_u16()) => TryOutcome::Failed,
                Ok(resp) if policy.retries_grpc(resp.headers()) => TryOutcome::Failed,
                // A peer node's own answer that its instance's connection failed counts as a
                // connection error here: retried whatever the codes say (GEP-1731).
                Ok(resp) if route_retry && peer_connection_failure(resp) => TryOutcome::Failed,
                Ok(_) => TryOutcome::Done,
                Err(TryError { error: ProxyError::Overloaded(_) | ProxyError::Denied(_), .. }) => TryOutcome::Done,
                // The client's own body broke or did not come in time, or its head is too large
                // for the next node: no other endpoint would fare better.
                Err(TryError {
                    error:
                        ProxyError::BadRequest(_)
                        | ProxyError::BodyTooLarge(_)
                        | ProxyError::BodyTimeout(_)
                        | ProxyError::HeadTooLarge(_)
                        | ProxyError::ReaderStalled,
                    ..
                }) => TryOutcome::Done,
                // A slow service would only get more load: a timed-out try is retried only when
                // the route asked for per-try timeouts (`backendRequest`).
                Err(TryError { error: ProxyError::Timeout(_), .. }) if per_try_set => TryOutcome::Failed,
                Err(TryError { error: ProxyError::Timeout(_), .. }) => TryOutcome::Done,
                Err(TryError { unsent: true, .. }) => TryOutcome::Unsent,
                Err(TryError { unsent: false, .. }) => TryOutcome::Failed,
            };
            let can_replay = match &source {
                Source::Empty => true,
                Source::Replay(r) => r.replayable(),
                Source::Once(_) => false,
            };
            let again = attempt <= policy.attempts && can_replay && policy.should_retry(&parts.method, outcome);
            let unsent = outcome == TryOutcome::Unsent;
            if !again {
                return match finish(result, unsent) {
                    Ok(resp) if route_retry => Ok(exhausted_answer(attempt, resp)),
                    Err(e) if route_retry => Err(exhausted(attempt, e)),
                    other => other,
                };
            }
            if !svc.state.budget.withdraw(epoch(), Instant::now()) {
                metrics::counter!(m::RETRY_BUDGET_EXHAUSTED, "service" => svc.config.name.clone()).increment(1);
                debug!(service = svc.config.name, "retry budget spent; not retrying");
                return finish(result, unsent);
            }
            metrics::counter!(m::RETRIES, "service" => svc.config.name.clone(), "reason" => crate::policy::retry::reason_label(outcome))
                .increment(1);
            match &result {
                Ok(resp) => {
                    debug!(service = svc.config.name, endpoint = %ep.address, status = resp.status().as_u16(), attempt, "retrying")
                }
                Err(e) => {
                    debug!(service = svc.config.name, endpoint = %ep.address, error = %e.error, attempt, "retrying")
                }
            }
            // Dropping an unwanted response resets its stream.
            drop(result);
            tried.push(ep);
            // Nothing reached the upstream: no load to back off from, so the next endpoint is
            // tried at once.
            if outcome != TryOutcome::Unsent {
                Box::pin(tokio::time::sleep(policy.backoff_for(attempt, &mut rng))).await;
            }
        }
    }
}

/// The error of the last of `tries`: after retries, a connection that failed again says the
/// service is unavailable.
fn exhausted(tries: u32, error: ProxyError) -> ProxyError {
    if tries > 1 && matches!(error, ProxyError::UpstreamReset(_) | ProxyError::UpstreamUnreachable { .. }) {
        ProxyError::Exhausted { tries, cause: Box::new(error) }
    } else {
        error
    }
}

/// As [`exhausted`], for the answer a peer node made itself (its `quicmesh-error` says why):
/// after retries, a connection failure there is a 503 here, its reason kept.
fn exhausted_answer(tries: u32, mut resp: Response<Body>) -> Response<Body> {
    if tries > 1 && peer_connection_failure(&resp) && resp.status() != http::StatusCode::SERVICE_UNAVAILABLE {
        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    }
    resp
}

/// A response a peer node made because its instance's connection failed (its
/// `quicmesh-error` says so), not one the instance sent.
fn peer_connection_failure(resp: &Response<Body>) -> bool {
    const CONNECTION: [&str; 2] = ["upstream-reset", "upstream-unreachable"];
    headers::find(resp.headers(), &crate::message::error::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|r| CONNECTION.contains(&r))
}

/// The call's answer; `unsent` when the try's answer said it was not sent (`quicmesh-unsent`),
/// a mark for this hop only.
fn finish(result: Result<Response<Body>, TryError>, unsent: bool) -> Result<Response<Body>, ProxyError> {
    match result {
        Ok(mut resp) => {
            if unsent {
                resp.headers_mut().remove(UNSENT_HEADER);
            }
            Ok(resp)
        }
        Err(e) => Err(e.error),
    }
}

/// Where each try's request body comes from.
enum Source {
    Empty,
    Replay(Replay),
    /// Too large to keep: sent once.
    Once(Option<Body>),
}
