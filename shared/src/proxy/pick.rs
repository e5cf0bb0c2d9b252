//! Choosing an endpoint: the service's balancing policy over the endpoints a request may use
//! (label subset, health, outlier ejection, peer reachability, tries so far, locality).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::mesh::Mesh;
use super::table::{endpoint_key, Service};
use crate::config::EndpointConfig;
use crate::message::error::ProxyError;
use crate::policy::balance::{self, HashOn, Policy};
use crate::policy::health::now_ms;

/// What a balancer may look at in the request.
pub struct PickCtx<'a> {
    pub headers: Option<&'a http::HeaderMap>,
    pub client: Option<std::net::IpAddr>,
}

impl PickCtx<'_> {
    pub const NONE: PickCtx<'static> = PickCtx { headers: None, client: None };
}

/// One yes/no per endpoint index: bits for up to 128 endpoints, a list beyond.
enum Flags {
    Bits(u128),
    List(Vec<bool>),
}

impl Flags {
    fn new(n: usize, f: impl Fn(usize) -> bool) -> Self {
        if n <= 128 {
            Flags::Bits((0..n).filter(|&i| f(i)).fold(0, |bits, i| bits | 1 << i))
        } else {
            Flags::List((0..n).map(f).collect())
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Flags::Bits(bits) => i < 128 && bits & (1 << i) != 0,
            Flags::List(list) => list.get(i).copied().unwrap_or(false),
        }
    }
}

/// The consistent-hashing key of a request, if it has what the service hashes on.
fn hash_key(on: &HashOn, ctx: &PickCtx<'_>) -> Option<u64> {
    match on {
        HashOn::ClientIp => ctx.client.map(|ip| balance::hash_key(ip.to_string().as_bytes())),
        HashOn::Header(name) => ctx.headers?.get(name.as_str()).map(|v| balance::hash_key(v.as_bytes())),
        HashOn::Cookie(name) => ctx.headers?.get_all(http::header::COOKIE).iter().find_map(|v| {
            v.to_str().ok()?.split(';').find_map(|c| {
                let (k, val) = c.trim().split_once('=')?;
                (k == name).then(|| balance::hash_key(val.as_bytes()))
            })
        }),
    }
}

impl Mesh {
    /// Chooses one of the endpoints carrying all of `labels`, by the service's policy, among
    /// this node's endpoints first when the service prefers locality and there are any.
    pub fn pick(
        &self,
        svc: &Service,
        labels: &BTreeMap<String, String>,
        ctx: &PickCtx<'_>,
    ) -> Result<EndpointConfig, ProxyError> {
        self.pick_avoiding(svc, labels, ctx, &[]).cloned()
    }

    /// Like [`Mesh::pick`], avoiding the endpoints in `avoid` (tried already) when others are
    /// usable. Endpoints failing their health check, ejected as outliers or on a peer marked
    /// unreachable are left out unless nothing else is left (then all are tried rather than
    /// none: Envoy's panic mode).
    pub fn pick_avoiding<'s>(
        &self,
        svc: &'s Service,
        labels: &BTreeMap<String, String>,
        ctx: &PickCtx<'_>,
        avoid: &[&EndpointConfig],
    ) -> Result<&'s EndpointConfig, ProxyError> {
        // Filters by endpoint index, each narrowing the candidates only when it leaves some:
        // no list is built, as this runs on every request. Health and ejection are read once
        // per endpoint, so every filter below sees one state while other threads change it.
        let now = now_ms();
        let eps = &svc.config.endpoints;
        let n = eps.len();
        let in_subset = Flags::new(n, |i| labels.iter().all(|(k, v)| eps[i].labels.get(k) == Some(v)));
        let Some(first) = (0..n).find(|&i| in_subset.get(i)) else {
            return Err(ProxyError::NoEndpoint(svc.config.name.clone()));
        };
        let usable = Flags::new(n, |i| {
            in_subset.get(i)
                && eps[i].healthy
                && !svc.stats.get(i).is_some_and(|s| s.outlier.is_ejected(now))
                // One atomic load while no peer is down; local endpoints are never in the pool.
                && !self.pool().is_down(&eps[i].node)
        });
        let any_usable = (0..n).any(|i| usable.get(i));
        let candidate = |i: usize| if any_usable { usable.get(i) } else { in_subset.get(i) };
        let tried = |i: usize| avoid.iter().any(|a| a.node == eps[i].node && a.address == eps[i].address);
        let any_untried = (0..n).any(|i| candidate(i) && !tried(i));
        let candidate = |i: usize| candidate(i) && (!any_untried || !tried(i));
        let lb = &svc.config.lb;
        if lb.policy == Policy::ConsistentHash {
            if let Some(key) = svc.hash_on.as_ref().and_then(|on| hash_key(on, ctx)) {
                // Maglev over the whole service when no subset applies and its choice is
                // usable; otherwise rendezvous hashing over what is (also minimal remapping).
                if labels.is_empty() {
                    if let Some(i) = svc.maglev.as_ref().and_then(|m| m.pick(key)).filter(|&i| i < n && candidate(i)) {
                        return Ok(&eps[i]);
                    }
                }
                let best = (0..n)
                    .filter(|&i| candidate(i))
                    .max_by_key(|&i| balance::hash_key(format!("{key}/{}", endpoint_key(&eps[i])).as_bytes()));
                if let Some(i) = best {
                    return Ok(&eps[i]);
                }
            }
        }
        let any_local = lb.prefer_local && (0..n).any(|i| candidate(i) && self.is_local(&eps[i]));
        let candidate = |i: usize| candidate(i) && (!any_local || self.is_local(&eps[i]));
        // Never empty (each filter keeps what it had when it would leave nothing): `first` is
        // only a guard.
        let nth = |k: usize| (0..n).filter(|&i| candidate(i)).nth(k).unwrap_or(first);
        let count = (0..n).filter(|&i| candidate(i)).count().max(1);
        let k = match lb.policy {
            Policy::RoundRobin | Policy::ConsistentHash => svc.cursor.fetch_add(1, Ordering::Relaxed) % count,
            Policy::LeastRequest => balance::p2c(
                count,
                |k| svc.stats.get(nth(k)).map_or(0.0, |s| s.in_flight() as f64),
                &mut fastrand::Rng::new(),
            ),
            Policy::PeakEwma => {
                balance::p2c(count, |k| svc.stats.get(nth(k)).map_or(0.0, |s| s.cost()), &mut fastrand::Rng::new())
            }
        };
        Ok(&eps[nth(k)])
    }

    /// Is this endpoint hosted here?
    pub fn is_local(&self, ep: &EndpointConfig) -> bool {
        self.local_node() == Some(ep.node.as_str())
    }
}
