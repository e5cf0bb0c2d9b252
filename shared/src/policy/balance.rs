//! Load balancing among a service's endpoints: round robin, least-request with power-of-two
//! choices, peak-EWMA latency-aware balancing (the default, as in Linkerd), and consistent
//! hashing with a Maglev table (affinity by header, cookie or client address, with minimal
//! remapping when endpoints change). Locality first: endpoints on this node when any is usable.
//! Socket-free: the mesh feeds it candidates and per-endpoint statistics.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a service's endpoints are chosen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    #[default]
    PeakEwma,
    /// Maglev consistent hashing on a request key.
    ConsistentHash,
}

/// The load-balancing settings of a service (`[services.lb]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LbConfig {
    pub policy: Policy,
    /// For `consistent_hash`: `header:<name>`, `cookie:<name>` or `client_ip`.
    pub hash_on: String,
    /// Prefer endpoints on the same node when there are any.
    pub prefer_local: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self { policy: Policy::PeakEwma, hash_on: "client_ip".into(), prefer_local: true }
    }
}

/// What to hash for consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp,
}

impl HashOn {
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once(':') {
            Some(("header", h)) if !h.is_empty() => Some(Self::Header(h.to_ascii_lowercase())),
            Some(("cookie", c)) if !c.is_empty() => Some(Self::Cookie(c.to_string())),
            None if s == "client_ip" => Some(Self::ClientIp),
            _ => None,
        }
    }
}

/// Latency assumed for an endpoint nothing was measured on yet (Linkerd uses 30 ms too).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade (Linkerd uses 10 s; shorter re-probes an endpoint
/// that looked slow once sooner, at the price of some noise).
const DECAY: Duration = Duration::from_secs(2);

/// Per-endpoint statistics shared by every request to it; outlive routing-table swaps.
#[derive(Debug)]
pub struct EndpointStats {
    /// Passive outlier detection of this endpoint.
    pub outlier: crate::policy::health::OutlierState,
    in_flight: AtomicU64,
    /// EWMA of time to response headers, nanoseconds (0: nothing measured yet).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, nanoseconds since `epoch`.
    stamp_ns: AtomicU64,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            outlier: Default::default(),
            in_flight: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(0),
            stamp_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// Counts a request in flight until dropped; `observe_at` records its latency.
pub struct InFlight(Arc<EndpointStats>);

impl InFlight {
    /// [`EndpointStats::observe`] of a request that ended at `now` (a clock read the caller has).
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        self.0.observe_since(rtt, now.saturating_duration_since(self.0.epoch));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointStats {
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Peak EWMA: a slower observation takes effect at once, a faster one fades in.
    pub fn observe(&self, rtt: Duration) {
        self.observe_since(rtt, self.epoch.elapsed());
    }

    /// [`EndpointStats::observe`], `since_epoch` after this endpoint's epoch.
    fn observe_since(&self, rtt: Duration, since_epoch: Duration) {
        let now = since_epoch.as_nanos() as u64;
        let rtt = rtt.as_nanos().min(u128::from(u64::MAX)) as u64;
        let prev = self.ewma_ns.load(Ordering::Relaxed);
        let next = if prev == 0 || rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            (prev as f64 * w + rtt as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next, Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    /// Expected cost of one more request: latency estimate times the queue it would join. The
    /// estimate fades with time since the last observation, so an endpoint that once looked slow
    /// (a cold connection, a hiccup) is tried again instead of starving forever. An endpoint
    /// nothing was measured on yet costs nothing while idle, so it is tried (one request at a
    /// time would otherwise never leave a fast measured endpoint for it), and the default
    /// latency for each request it already carries, so a new endpoint is not flooded.
    pub fn cost(&self) -> f64 {
        let ewma = match self.ewma_ns.load(Ordering::Relaxed) {
            0 => return DEFAULT_RTT.as_nanos() as f64 * self.in_flight() as f64,
            v => {
                let now = self.epoch.elapsed().as_nanos() as u64;
                let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
                v as f64 * (-elapsed / DECAY.as_nanos() as f64).exp()
            }
        };
        ewma * (self.in_flight() as f64 + 1.0)
    }
}

/// Power of two choices: the cheaper of two distinct random candidates.
pub fn p2c<F: Fn(usize) -> f64>(n: usize, cost: F, rng: &mut fastrand::Rng) -> usize {
    if n <= 1 {
        return 0;
    }
    let a = rng.usize(0..n);
    let mut b = rng.usize(0..n - 1);
    if b >= a {
        b += 1;
    }
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}

/// Hash of a key, the same in every process and every build: SipHash-2-4 with zero keys over
/// the key's bytes alone. (std's `DefaultHasher` may change algorithm between Rust releases, and
/// `Hash for [u8]` adds a length prefix of its own choosing: proxies built apart would then
/// disagree on where a key goes.)
pub fn hash_key(key: &[u8]) -> u64 {
    // Deprecated for hash maps (use RandomState); kept in std, and its algorithm is fixed.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0, 0);
    h.write(key);
    h.finish()
}

/// Maglev lookup table (Eisenbud et al., 2016): each endpoint fills slots in its own
/// permutation order, so removing one of N endpoints moves about 1/N of the keys.
pub struct Maglev {
    table: Vec<u32>,
}

/// Table size: a prime much larger than any endpoint count.
const MAGLEV_SIZE: usize = 65_537;

impl Maglev {
    /// `names` identify endpoints stably (for example `node/address`); their order does not
    /// matter: slots are filled taking endpoints in name order, so two proxies that list the
    /// same endpoints differently build the same table (by name).
    pub fn new(names: &[String]) -> Self {
        let n = names.len();
        if n == 0 {
            return Self { table: Vec::new() };
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        let m = MAGLEV_SIZE as u64;
        let perms: Vec<(u64, u64)> = names
            .iter()
            .map(|name| {
                let offset = hash_key(format!("offset/{name}").as_bytes()) % m;
                let skip = hash_key(format!("skip/{name}").as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for &i in &order {
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
        Self { table }
    }

    /// The endpoint index for a key hash.
    pub fn pick(&self, key: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(key % MAGLEV_SIZE as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let stats: Vec<Arc<EndpointStats>> = (0..3).map(|_| Arc::new(EndpointStats::default())).collect();
        let _busy: Vec<InFlight> = (0..20).map(|_| stats[0].start()).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[p2c(3, |i| stats[i].in_flight() as f64, &mut rng)] += 1;
        }
        // With two choices out of three the busy one can only win a pair with itself: never.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
    }

    /// One endpoint 20 ms slower than the others receives a clearly smaller share: below 5% of
    /// picks among four endpoints (two choices never both land on the one slow endpoint, so it
    /// wins only when queueing has made a fast one costlier).
    #[test]
    fn peak_ewma_sends_less_to_a_slower_endpoint() {
        let stats: Vec<Arc<EndpointStats>> = (0..4).map(|_| Arc::new(EndpointStats::default())).collect();
        for (i, s) in stats.iter().enumerate() {
            let rtt = if i == 3 { Duration::from_millis(21) } else { Duration::from_millis(1) };
            for _ in 0..10 {
                s.observe(rtt);
            }
        }
        let mut rng = fastrand::Rng::with_seed(11);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            let i = p2c(4, |i| stats[i].cost(), &mut rng);
            counts[i] += 1;
            // Requests pile up a little on whoever is picked, as under real load.
            let _g = stats[i].start();
        }
        let share = counts[3] as f64 / 4000.0;
        assert!(share < 0.05, "slow endpoint share {share} ({counts:?})");
        // A slower observation takes effect at once (the "peak").
        stats[0].observe(Duration::from_millis(50));
        assert!(stats[0].cost() > stats[3].cost());
    }

    #[test]
    fn maglev_is_stable_and_remaps_about_one_in_n() {
        let names: Vec<String> = (0..10).map(|i| format!("node-{i}/10.0.0.{i}:80")).collect();
        let full = Maglev::new(&names);
        let keys: Vec<u64> = (0..10_000u64).map(|k| hash_key(&k.to_le_bytes())).collect();
        let before: Vec<usize> = keys.iter().map(|&k| full.pick(k).unwrap()).collect();
        // Same key, same endpoint, every time and after a rebuild.
        let again = Maglev::new(&names);
        assert!(keys.iter().zip(&before).all(|(&k, &b)| again.pick(k) == Some(b)));
        // Remove endpoint 4: only its keys should move (Maglev allows a little more).
        let fewer: Vec<String> = names.iter().filter(|n| !n.starts_with("node-4/")).cloned().collect();
        let after_table = Maglev::new(&fewer);
        let mut moved = 0;
        for (&k, &b) in keys.iter().zip(&before) {
            let now = &fewer[after_table.pick(k).unwrap()];
            if *now != names[b] {
                moved += 1;
            }
        }
        let share = moved as f64 / keys.len() as f64;
        assert!((0.08..=0.14).contains(&share), "{share} of keys moved; about 1/10 expected");
    }

    #[test]
    fn an_unmeasured_endpoint_is_tried_when_idle_and_not_flooded() {
        let (fast, new) = (Arc::new(EndpointStats::default()), Arc::new(EndpointStats::default()));
        fast.observe(Duration::from_millis(1));
        let stats = [fast.clone(), new.clone()];
        let mut rng = fastrand::Rng::with_seed(7);
        // One request at a time: the new endpoint gets its first request at once.
        assert_eq!(p2c(2, |i| stats[i].cost(), &mut rng), 1, "the unmeasured endpoint starves");
        // Carrying a request already, it costs the default latency: the fast one is cheaper.
        let _busy = new.start();
        assert_eq!(p2c(2, |i| stats[i].cost(), &mut rng), 0, "a new endpoint takes every request");
    }

    #[test]
    fn hash_on_parses() {
        assert_eq!(HashOn::parse("header:X-User"), Some(HashOn::Header("x-user".into())));
        assert_eq!(HashOn::parse("cookie:sid"), Some(HashOn::Cookie("sid".into())));
        assert_eq!(HashOn::parse("client_ip"), Some(HashOn::ClientIp));
        assert_eq!(HashOn::parse("header:"), None);
        assert_eq!(HashOn::parse("bogus"), None);
    }
}

#[cfg(test)]
mod proptests;
