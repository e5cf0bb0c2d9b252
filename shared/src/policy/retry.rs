//! Retries: the policy (which failures, how many times, how long to wait), the retry budget that
//! keeps a failing service from being hammered, and the rule for when a retry is safe.
//! Socket-free: the mesh's call loop asks these questions and does the I/O.
//!
//! Safety first: a request that provably never reached the upstream instance (connection
//! refused, stream refused before it was processed, endpoint gone) may be retried whatever its
//! method. One that may have been processed (reset after sending, timeout, a 5xx answer) is
//! retried only when its method is idempotent, unless the policy says otherwise.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Method;
use serde::{Deserialize, Serialize};

/// `[services.retry]`: how a service's requests are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 turns retrying off.
    pub attempts: u32,
    /// Response statuses retried (idempotent requests only).
    pub codes: Vec<u16>,
    /// Wait before the first retry; it doubles for each further retry, up to `max_backoff`, and
    /// half of it is random (jitter).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub backoff: Duration,
    /// Longest wait before a retry: the doubling of `backoff` stops here. At least `backoff`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub max_backoff: Duration,
    /// Largest request body kept for a retry, bytes; requests with larger bodies are sent once.
    pub max_body: u64,
    /// Also retry non-idempotent requests (POST, PATCH) after they were sent. Off by default:
    /// the upstream may have acted on them. gRPC calls are POSTs: a service whose methods are
    /// safe to repeat says so here.
    pub non_idempotent: bool,
    /// gRPC statuses retried, by name (`unavailable`, `resource-exhausted`, ...), when a call
    /// answers one before any message (a trailers-only answer), as `codes` for HTTP statuses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<String>,
    pub budget: BudgetConfig,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            codes: vec![502, 503, 504],
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            max_body: 64 << 10,
            non_idempotent: false,
            grpc_codes: Vec::new(),
            budget: BudgetConfig::default(),
        }
    }
}

/// A retry budget as in Linkerd: retries may add at most `ratio` of the requests seen in the
/// last `ttl`, plus `min_per_second` so that a quiet service can still retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Retries allowed per request seen in the last `ttl` (0.2: one retry per five requests);
    /// 0 to 10.
    pub ratio: f64,
    /// Retries per second allowed on top of `ratio`, so a quiet service can still retry.
    pub min_per_second: u32,
    /// The window requests and retries are counted over; 1s to 60s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 10, ttl: Duration::from_secs(10) }
    }
}

/// A route rule's `retry` (Gateway API HTTPRouteRetry); what it sets overrides the service's
/// policy for requests matching the rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRetry {
    /// Retries after the first try, instead of the service's `retry.attempts` (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// HTTP statuses retried, instead of the service's `retry.codes`; a connection the instance
    /// refused or cut off is retried whatever they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<Vec<u16>>,
    /// Wait before the first retry, instead of the service's `retry.backoff` (doubling after
    /// each retry; `max_backoff` is raised to it when shorter).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub backoff: Option<Duration>,
}

impl RetryPolicy {
    /// This policy with a route's overrides applied: itself, not a copy, when the route
    /// overrides nothing (no copy of its lists on each request's path).
    pub fn with_route(&self, route: Option<&RouteRetry>) -> Cow<'_, RetryPolicy> {
        let Some(r) = route.filter(|r| **r != RouteRetry::default()) else {
            return Cow::Borrowed(self);
        };
        let mut p = self.clone();
        if let Some(a) = r.attempts {
            p.attempts = a;
        }
        if let Some(c) = &r.codes {
            p.codes.clone_from(c);
        }
        if let Some(b) = r.backoff {
            p.backoff = b;
            p.max_backoff = p.max_backoff.max(b);
        }
        Cow::Owned(p)
    }

    /// Checks the numbers; `key` names the section in messages.
    pub fn validate(&self) -> Result<(), String> {
        if self.attempts > 10 {
            return Err(format!("attempts = {} is more than 10", self.attempts));
        }
        if let Some(c) = self.codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err(format!("codes: {c} is not an HTTP status"));
        }
        if let Some(bad) = self.grpc_codes.iter().find(|c| crate::message::grpc::code_of(c).is_none_or(|c| c == 0)) {
            return Err(format!(
                "grpc_codes: {bad:?} is not a gRPC status other than ok (unavailable, resource-exhausted, ...)"
            ));
        }
        if self.max_backoff < self.backoff {
            return Err("max_backoff is shorter than backoff".into());
        }
        if self.max_backoff > crate::config::MAX_DURATION {
            return Err("max_backoff is longer than the 10 years any time may be".into());
        }
        let b = &self.budget;
        if !(0.0..=10.0).contains(&b.ratio) || b.ratio.is_nan() {
            return Err(format!("budget.ratio = {} is not between 0 and 10", b.ratio));
        }
        if b.ttl < Duration::from_secs(1) || b.ttl > Duration::from_secs(60) {
            return Err(format!("budget.ttl = {:?} is not between 1 s and 60 s", b.ttl));
        }
        Ok(())
    }

    /// The wait before retry number `retry` (1 for the first): exponential, half of it random.
    pub fn backoff_for(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let exp = self.backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let cap = exp.min(self.max_backoff);
        let half = cap / 2;
        half + half.mul_f64(rng.f64())
    }
}

/// What became of one try, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// An answer that is not to be retried (success or a status outside the policy).
    Done,
    /// The request never reached the upstream instance: safe to retry whatever its method.
    Unsent,
    /// The request may have been processed: a retryable status, a reset, or a timeout.
    Failed,
}

impl RetryPolicy {
    /// Should a request with this method be tried again after `outcome`?
    /// Whether a response's gRPC status (in its headers: a trailers-only answer) is one to retry.
    pub fn retries_grpc(&self, headers: &http::HeaderMap) -> bool {
        !self.grpc_codes.is_empty()
            && crate::message::grpc::status_in(headers)
                .is_some_and(|code| self.grpc_codes.iter().any(|n| crate::message::grpc::code_of(n) == Some(code)))
    }

    pub fn should_retry(&self, method: &Method, outcome: TryOutcome) -> bool {
        match outcome {
            TryOutcome::Done => false,
            TryOutcome::Unsent => true,
            TryOutcome::Failed => self.non_idempotent || idempotent(method),
        }
    }
}

/// Why a try was retried, a bounded metric label.
pub fn reason_label(outcome: TryOutcome) -> &'static str {
    match outcome {
        TryOutcome::Done => "none",
        TryOutcome::Unsent => "unsent",
        TryOutcome::Failed => "failed",
    }
}

/// Sliding-window accounting of requests and retries per service.
#[derive(Debug)]
pub struct Budget {
    config: Mutex<BudgetConfig>,
    window: Mutex<Window>,
}

/// Ten slots over the ttl: each holds the requests and retries that started in it.
const SLOTS: u32 = 10;

#[derive(Debug, Default)]
struct Window {
    /// (slot number since `epoch`, requests, retries), oldest first.
    slots: VecDeque<(u64, u64, u64)>,
}

impl Budget {
    pub fn new(config: BudgetConfig) -> Self {
        Self { config: Mutex::new(config), window: Mutex::new(Window::default()) }
    }

    /// Takes new settings, keeping what was counted.
    pub fn reconfigure(&self, config: &BudgetConfig) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
    }

    fn slot(ttl: Duration, epoch: Instant, now: Instant) -> u64 {
        let len = (ttl / SLOTS).as_nanos().max(1);
        (now.saturating_duration_since(epoch).as_nanos() / len) as u64
    }

    fn current(w: &mut Window, slot: u64) -> &mut (u64, u64, u64) {
        while w.slots.front().is_some_and(|s| s.0 + u64::from(SLOTS) <= slot) {
            w.slots.pop_front();
        }
        if w.slots.back().is_none_or(|s| s.0 != slot) {
            w.slots.push_back((slot, 0, 0));
        }
        // Just pushed when missing.
        w.slots.back_mut().expect("a current slot")
    }

    /// Counts a request (its first try).
    pub fn deposit(&self, epoch: Instant, now: Instant) {
        let ttl = self.config.lock().unwrap_or_else(|e| e.into_inner()).ttl;
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::current(&mut w, Self::slot(ttl, epoch, now)).1 += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self, epoch: Instant, now: Instant) -> bool {
        let cfg = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let slot = Self::slot(cfg.ttl, epoch, now);
        Self::current(&mut w, slot);
        let (requests, retries) = w.slots.iter().fold((0, 0), |(a, b), s| (a + s.1, b + s.2));
        let allowed = cfg.ratio * requests as f64 + f64::from(cfg.min_per_second) * cfg.ttl.as_secs_f64();
        if (retries + 1) as f64 > allowed {
            return false;
        }
        Self::current(&mut w, slot).2 += 1;
        true
    }
}

/// Safe to replay per RFC 9110 section 9.2.2.
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_the_ratio_plus_the_floor_and_forgets_after_the_ttl() {
        let cfg = BudgetConfig { ratio: 0.2, min_per_second: 1, ttl: Duration::from_secs(10) };
        let b = Budget::new(cfg);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit(t0, t0);
        }
        // 0.2 * 100 + 1/s * 10 s = 30 retries.
        let granted = (0..100).filter(|_| b.withdraw(t0, t0)).count();
        assert_eq!(granted, 30);
        // Once the window has passed, only the floor is left.
        let later = t0 + Duration::from_secs(11);
        let granted = (0..100).filter(|_| b.withdraw(t0, later)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn no_floor_and_no_traffic_means_no_retries() {
        let b = Budget::new(BudgetConfig { ratio: 0.5, min_per_second: 0, ttl: Duration::from_secs(1) });
        let t0 = Instant::now();
        assert!(!b.withdraw(t0, t0));
        b.deposit(t0, t0);
        b.deposit(t0, t0);
        assert!(b.withdraw(t0, t0));
        assert!(!b.withdraw(t0, t0));
    }

    #[test]
    fn only_idempotent_methods_are_retried_after_sending() {
        let p = RetryPolicy::default();
        assert!(p.should_retry(&Method::POST, TryOutcome::Unsent));
        assert!(!p.should_retry(&Method::POST, TryOutcome::Failed));
        assert!(p.should_retry(&Method::GET, TryOutcome::Failed));
        assert!(!p.should_retry(&Method::GET, TryOutcome::Done));
        let bold = RetryPolicy { non_idempotent: true, ..RetryPolicy::default() };
        assert!(bold.should_retry(&Method::POST, TryOutcome::Failed));
    }

    #[test]
    fn grpc_statuses_are_retried_by_name() {
        let p = RetryPolicy { grpc_codes: vec!["unavailable".into()], ..RetryPolicy::default() };
        assert!(p.validate().is_ok());
        let mut h = http::HeaderMap::new();
        assert!(!p.retries_grpc(&h), "no status: an answer that goes on");
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert!(p.retries_grpc(&h));
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert!(!p.retries_grpc(&h), "NOT_FOUND is not listed");
        for bad in ["ok", "UNAVAILABLE", "14", "flaky"] {
            let p = RetryPolicy { grpc_codes: vec![bad.into()], ..RetryPolicy::default() };
            assert!(p.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let p = RetryPolicy::default();
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 1..20 {
            let d = p.backoff_for(retry, &mut rng);
            let cap = p.backoff.saturating_mul(1 << (retry - 1).min(16)).min(p.max_backoff);
            assert!(d >= cap / 2 && d <= cap, "retry {retry}: {d:?} outside [{:?}, {cap:?}]", cap / 2);
        }
    }

    #[test]
    fn route_overrides_win() {
        let route = RouteRetry { attempts: Some(5), codes: Some(vec![500]), backoff: None };
        let service = RetryPolicy::default();
        let p = service.with_route(Some(&route));
        assert_eq!((p.attempts, p.codes.as_slice()), (5, &[500][..]));
        // Without overrides the service's own policy is used as it is, not copied.
        let none = RouteRetry { attempts: None, codes: None, backoff: None };
        for route in [None, Some(&none)] {
            assert!(matches!(service.with_route(route), Cow::Borrowed(_)));
        }
        assert!(RetryPolicy { attempts: 11, ..Default::default() }.validate().is_err());
        assert!(RetryPolicy { codes: vec![42], ..Default::default() }.validate().is_err());
    }
}
