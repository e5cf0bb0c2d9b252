//! Endpoint health, socket-free: passive outlier detection (consecutive failures eject an
//! endpoint for a growing time, never more than a share of the service) and the settings and
//! thresholds of the active checks a node runs against its own instances.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Milliseconds since the first call in this process: a cheap clock for ejection deadlines.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at 1 so that 0 can mean "never".
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// `[services.outlier]`: passive outlier detection (Envoy's consecutive 5xx, Linkerd's failure
/// accrual).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (5xx answers, connection failures, timeouts) that eject an endpoint;
    /// 0 turns detection off.
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection of the same endpoint lasts one more of these.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub base_ejection: Duration,
    /// Longest ejection (the n-th lasts n x `base_ejection`, capped here); at least
    /// `base_ejection`. An endpoint back in rotation for longer than this starts over.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub max_ejection: Duration,
    /// Most endpoints of a service ejected at once, percent; one may always be ejected.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ejected_percent > 100 {
            return Err(format!("max_ejected_percent = {} is more than 100", self.max_ejected_percent));
        }
        if self.base_ejection.is_zero() || self.max_ejection < self.base_ejection {
            return Err("base_ejection must be > 0 and max_ejection at least base_ejection".into());
        }
        if self.max_ejection > crate::config::MAX_DURATION {
            return Err("max_ejection must be at most 10 years".into());
        }
        Ok(())
    }
}

/// Outlier state of one endpoint, shared by every request to it.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive: AtomicU32,
    /// Ejected until this `now_ms()`; 0 when never ejected.
    until_ms: AtomicU64,
    /// Ejections so far (the multiplier of the next one); forgotten after a quiet spell.
    ejections: AtomicU32,
}

impl OutlierState {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn success(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; when it completes a run of `consecutive_failures` and `may_eject`
    /// allows it (the share limit), ejects the endpoint and returns for how long.
    pub fn failure(&self, cfg: &OutlierConfig, now_ms: u64, may_eject: impl FnOnce() -> bool) -> Option<Duration> {
        if cfg.consecutive_failures == 0 || self.is_ejected(now_ms) {
            return None;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.consecutive_failures || !may_eject() {
            return None;
        }
        self.consecutive.store(0, Ordering::Relaxed);
        // An endpoint that stayed in rotation for a long while starts over at the base time.
        let last = self.until_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) > cfg.max_ejection.as_millis() as u64 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let span = cfg.base_ejection.saturating_mul(times).min(cfg.max_ejection);
        self.until_ms.store(now_ms + span.as_millis() as u64, Ordering::Relaxed);
        Some(span)
    }
}

/// May one more of `total` endpoints be ejected when `ejected` already are?
pub fn may_eject(cfg: &OutlierConfig, ejected: usize, total: usize) -> bool {
    ejected == 0 || (ejected + 1) * 100 <= total * cfg.max_ejected_percent as usize
}

/// An active health check of one instance, run by the node hosting it (`[node.instances.health]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// HTTP GET of this path must answer 2xx; unset means a TCP connect is enough.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Time between two checks; at least `10ms`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub interval: Duration,
    /// Longest a check may take; one that takes longer fails. More than `0s`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub timeout: Duration,
    /// Passes in a row that bring an unhealthy instance back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a healthy instance out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            http: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_millis(10) || self.timeout.is_zero() {
            return Err("interval must be at least 10ms and timeout greater than zero".into());
        }
        if self.interval > crate::config::MAX_DURATION || self.timeout > crate::config::MAX_DURATION {
            return Err("interval and timeout must be at most 10 years".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err("thresholds must be at least 1".into());
        }
        if self.http.as_deref().is_some_and(|p| !p.starts_with('/')) {
            return Err(format!("http = {:?} is not a path starting with '/'", self.http.as_deref().unwrap_or("")));
        }
        Ok(())
    }
}

/// Turns check results into a health state with hysteresis. The first result decides at once
/// (an instance is neither kept out nor let in for a whole threshold at start-up).
#[derive(Debug, Default)]
pub struct Thresholds {
    healthy: Option<bool>,
    run: u32,
}

impl Thresholds {
    /// Records a result; returns the new state when it changed.
    pub fn record(&mut self, check: &HealthCheck, passed: bool) -> Option<bool> {
        let Some(healthy) = self.healthy else {
            self.healthy = Some(passed);
            return Some(passed);
        };
        if passed == healthy {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if passed { check.healthy_threshold } else { check.unhealthy_threshold };
        if self.run >= needed {
            self.run = 0;
            self.healthy = Some(passed);
            return Some(passed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_after_a_run_of_failures_grows_and_expires() {
        let cfg = OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        };
        let s = OutlierState::default();
        let t = 1_000;
        assert_eq!(s.failure(&cfg, t, || true), None);
        s.success();
        assert_eq!(s.failure(&cfg, t, || true), None);
        assert_eq!(s.failure(&cfg, t, || true), None);
        assert_eq!(s.failure(&cfg, t, || true), Some(Duration::from_secs(10)));
        assert!(s.is_ejected(t + 9_999) && !s.is_ejected(t + 10_000));
        let t2 = t + 10_000;
        for _ in 0..2 {
            s.failure(&cfg, t2, || true);
        }
        assert_eq!(s.failure(&cfg, t2, || true), Some(Duration::from_secs(20)));
        let t3 = t2 + 20_000;
        for _ in 0..2 {
            s.failure(&cfg, t3, || true);
        }
        assert_eq!(s.failure(&cfg, t3, || true), Some(Duration::from_secs(25)), "capped at max_ejection");
    }

    #[test]
    fn the_share_limit_holds_but_one_may_always_go() {
        let cfg = OutlierConfig { max_ejected_percent: 30, ..Default::default() };
        assert!(may_eject(&cfg, 0, 2));
        assert!(!may_eject(&cfg, 1, 2));
        assert!(may_eject(&cfg, 2, 10));
        assert!(!may_eject(&cfg, 3, 10));
        let s = OutlierState::default();
        let one = OutlierConfig { consecutive_failures: 1, ..cfg };
        assert_eq!(s.failure(&one, 5, || false), None, "refused by the share limit");
        assert!(!s.is_ejected(5));
    }

    #[test]
    fn thresholds_need_runs_to_flip() {
        let check = HealthCheck { healthy_threshold: 2, unhealthy_threshold: 3, ..Default::default() };
        let mut t = Thresholds::default();
        assert_eq!(t.record(&check, true), Some(true), "the first result decides");
        assert_eq!(t.record(&check, false), None);
        assert_eq!(t.record(&check, false), None);
        assert_eq!(t.record(&check, true), None, "a pass breaks the run");
        assert_eq!(t.record(&check, false), None);
        assert_eq!(t.record(&check, false), None);
        assert_eq!(t.record(&check, false), Some(false));
        assert_eq!(t.record(&check, true), None);
        assert_eq!(t.record(&check, true), Some(true));
    }
}
