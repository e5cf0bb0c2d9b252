//! Route-level traffic controls, socket-free: token-bucket rate limits (per route, optionally per
//! client address) and fault injection for chaos testing (delay or abort a share of requests).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `rateLimit` of a route: a token bucket refilled at `requestsPerSecond`, holding `burst`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per second, sustained: the rate the bucket refills at (above 0;
    /// fractions allowed).
    pub requests_per_second: f64,
    /// Bucket size: requests allowed at once after a quiet spell (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per client address instead of one for the route.
    #[serde(default)]
    pub per_client: bool,
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.requests_per_second > 0.0 && self.requests_per_second.is_finite()) {
            return Err(format!("requestsPerSecond = {} must be greater than zero", self.requests_per_second));
        }
        if self.burst == Some(0) {
            return Err("burst must be at least 1".into());
        }
        Ok(())
    }

    fn capacity(&self) -> f64 {
        self.burst.map_or(self.requests_per_second.ceil().max(1.0), f64::from)
    }
}

/// Most client buckets kept per route; past it, full (idle) buckets are dropped first.
const MAX_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, cap: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(cap);
        self.stamp = now;
    }
}

/// The buckets of one route.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    shared: Mutex<Option<Bucket>>,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self { limit, shared: Mutex::new(None), clients: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for a request from `client`; `Err(wait)` says when one will be there.
    pub fn check(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let (rate, cap) = (self.limit.requests_per_second, self.limit.capacity());
        let take = |b: &mut Bucket| {
            b.refill(rate, cap, now);
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                // A rate so small that the wait does not fit a `Duration` waits for ever.
                Err(Duration::try_from_secs_f64((1.0 - b.tokens) / rate).unwrap_or(Duration::MAX))
            }
        };
        let fresh = Bucket { tokens: cap, stamp: now };
        match client.filter(|_| self.limit.per_client) {
            Some(ip) => {
                let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= MAX_CLIENTS && !map.contains_key(&ip) {
                    map.retain(|_, b| {
                        b.refill(rate, cap, now);
                        b.tokens < cap
                    });
                    if map.len() >= MAX_CLIENTS {
                        // Every client is busy: forget an arbitrary one rather than grow.
                        if let Some(k) = map.keys().next().copied() {
                            map.remove(&k);
                        }
                    }
                }
                take(map.entry(ip).or_insert(fresh))
            }
            None => take(self.shared.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(fresh)),
        }
    }
}

/// `fault` of a route rule (as Istio's VirtualService fault injection).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Holds a share of requests for `fixedDelay` before they go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answers a share of requests with `httpStatus` instead of forwarding them (after the
    /// delay, when both hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// Share of requests delayed, 0 to 100.
    pub percent: f64,
    /// How long a delayed request waits.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub fixed_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Share of requests aborted, 0 to 100.
    pub percent: f64,
    /// Status answered instead of forwarding (with `quicmesh-error: fault-injected`).
    pub http_status: u16,
}

/// What a fault decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

impl Fault {
    pub fn validate(&self) -> Result<(), String> {
        let pct = |p: f64| (0.0..=100.0).contains(&p);
        if self.delay.as_ref().is_some_and(|d| !pct(d.percent)) || self.abort.as_ref().is_some_and(|a| !pct(a.percent))
        {
            return Err("percent must be between 0 and 100".into());
        }
        if self.delay.as_ref().is_some_and(|d| d.fixed_delay > crate::config::MAX_DURATION) {
            return Err("delay.fixedDelay is longer than the 10 years any time may be".into());
        }
        if let Some(a) = &self.abort {
            if !(200..=599).contains(&a.http_status) {
                return Err(format!("httpStatus = {} is not between 200 and 599", a.http_status));
            }
        }
        Ok(())
    }

    /// Rolls the dice for one request.
    pub fn plan(&self, rng: &mut fastrand::Rng) -> FaultPlan {
        let hit = |p: f64, rng: &mut fastrand::Rng| rng.f64() * 100.0 < p;
        FaultPlan {
            delay: self.delay.as_ref().filter(|d| hit(d.percent, rng)).map(|d| d.fixed_delay),
            abort: self.abort.as_ref().filter(|a| hit(a.percent, rng)).map(|a| a.http_status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let l = RateLimiter::new(RateLimit { requests_per_second: 10.0, burst: Some(5), per_client: false });
        let t = Instant::now();
        assert_eq!((0..20).filter(|_| l.check(None, t).is_ok()).count(), 5);
        let wait = l.check(None, t).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(crate::message::error::retry_after_secs(wait), 1);
        // One second later, ten more tokens but only five fit.
        let t1 = t + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| l.check(None, t1).is_ok()).count(), 5);
    }

    #[test]
    fn a_rate_too_small_for_a_wait_to_fit_waits_for_ever() {
        let l = RateLimiter::new(RateLimit { requests_per_second: 1e-30, burst: None, per_client: false });
        let now = Instant::now();
        assert!(l.check(None, now).is_ok());
        assert_eq!(l.check(None, now), Err(Duration::MAX));
    }

    #[test]
    fn per_client_buckets_are_separate() {
        let l = RateLimiter::new(RateLimit { requests_per_second: 1.0, burst: None, per_client: true });
        let t = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(l.check(Some(a), t).is_ok());
        assert!(l.check(Some(a), t).is_err());
        assert!(l.check(Some(b), t).is_ok());
    }

    #[test]
    fn faults_hit_about_their_share() {
        let f = Fault {
            delay: Some(FaultDelay { percent: 30.0, fixed_delay: Duration::from_millis(5) }),
            abort: Some(FaultAbort { percent: 100.0, http_status: 503 }),
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let plans: Vec<FaultPlan> = (0..10_000).map(|_| f.plan(&mut rng)).collect();
        let delayed = plans.iter().filter(|p| p.delay.is_some()).count();
        assert!((2_700..3_300).contains(&delayed), "{delayed}");
        assert!(plans.iter().all(|p| p.abort == Some(503)));
        assert!(Fault { abort: Some(FaultAbort { percent: 101.0, http_status: 503 }), delay: None }
            .validate()
            .is_err());
    }
}
