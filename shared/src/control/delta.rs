//! Incremental snapshots: what changed from one version to the next, so that a change to one
//! endpoint costs a node the bytes of one service rather than the whole mesh (as incremental
//! xDS does). A delta names the version it applies to; a node holding any other version cannot
//! use it and asks for the whole snapshot instead.
//!
//! Services and nodes are compared by name and sent whole when anything in them changed; the
//! small sections (timeouts, routes, authorization, revocations) are sent whole when changed.
//! Snapshots keep services and nodes sorted by name ([`super::merge`] makes them so), and
//! applying a delta keeps them sorted, so `apply(a, diff(a, b)) == b`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Snapshot;
use crate::config::{PeerConfig, ServiceConfig, Timeouts};
use crate::policy::authz::AuthzConfig;
use crate::policy::route::HttpRoute;

/// The difference between the snapshot of version `from` and that of `version`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub from: u64,
    pub version: u64,
    /// Services added or changed, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<String>,
    /// Members added or moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PeerConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<HttpRoute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthzConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Vec<String>>,
}

/// A delta that does not apply to the snapshot at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a delta from version {from} cannot apply to version {held}")]
pub struct Mismatch {
    pub from: u64,
    pub held: u64,
}

impl Delta {
    /// True when the two versions hold the same mesh.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.removed_services.is_empty()
            && self.nodes.is_empty()
            && self.removed_nodes.is_empty()
            && self.timeouts.is_none()
            && self.routes.is_none()
            && self.authorization.is_none()
            && self.revoked.is_none()
    }
}

/// Named items that changed or appeared in `next`, and the names gone from `prev`.
fn changes<T: Clone + PartialEq>(prev: &[T], next: &[T], name: impl Fn(&T) -> &str) -> (Vec<T>, Vec<String>) {
    let before: BTreeMap<&str, &T> = prev.iter().map(|t| (name(t), t)).collect();
    let after: BTreeMap<&str, &T> = next.iter().map(|t| (name(t), t)).collect();
    let changed = next.iter().filter(|t| before.get(name(t)) != Some(t)).cloned().collect();
    let removed = before.keys().filter(|n| !after.contains_key(*n)).map(|n| n.to_string()).collect();
    (changed, removed)
}

/// Replaces or inserts `items` and drops `removed` in `list`, kept sorted by name.
pub(crate) fn patch<T>(list: &mut Vec<T>, items: Vec<T>, removed: &[String], name: impl Fn(&T) -> &str) {
    list.retain(|t| !removed.iter().any(|r| r == name(t)));
    for item in items {
        match list.binary_search_by(|t| name(t).cmp(name(&item))) {
            Ok(i) => list[i] = item,
            Err(i) => list.insert(i, item),
        }
    }
}

fn changed<T: Clone + PartialEq>(prev: &T, next: &T) -> Option<T> {
    (prev != next).then(|| next.clone())
}

impl Snapshot {
    /// What a node holding `self` needs to hold `next`.
    pub fn diff(&self, next: &Snapshot) -> Delta {
        let (services, removed_services) = changes(&self.services, &next.services, |s| &s.name);
        let (nodes, removed_nodes) = changes(&self.nodes, &next.nodes, |n| &n.name);
        Delta {
            from: self.version,
            version: next.version,
            services,
            removed_services,
            nodes,
            removed_nodes,
            timeouts: changed(&self.timeouts, &next.timeouts),
            routes: changed(&self.routes, &next.routes),
            authorization: changed(&self.authorization, &next.authorization),
            revoked: changed(&self.revoked, &next.revoked),
        }
    }

    /// Applies `delta` when it was made from this version; otherwise changes nothing.
    pub fn apply(&mut self, delta: Delta) -> Result<(), Mismatch> {
        if delta.from != self.version {
            return Err(Mismatch { from: delta.from, held: self.version });
        }
        patch(&mut self.services, delta.services, &delta.removed_services, |s| &s.name);
        patch(&mut self.nodes, delta.nodes, &delta.removed_nodes, |n| &n.name);
        if let Some(t) = delta.timeouts {
            self.timeouts = t;
        }
        if let Some(r) = delta.routes {
            self.routes = r;
        }
        if let Some(a) = delta.authorization {
            self.authorization = a;
        }
        if let Some(r) = delta.revoked {
            self.revoked = r;
        }
        self.version = delta.version;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::config::EndpointConfig;

    /// A snapshot of `services` services with `per` endpoints each, sorted as `merge` makes it.
    fn mesh(version: u64, services: usize, per: usize) -> Snapshot {
        let services = (0..services)
            .map(|s| ServiceConfig {
                endpoints: (0..per)
                    .map(|e| EndpointConfig {
                        node: format!("node-{}", (s + e) % 50),
                        address: SocketAddr::from(([10, (s / 250) as u8, (s % 250) as u8, e as u8], 8080)),
                        labels: Default::default(),
                        healthy: true,
                    })
                    .collect(),
                ..ServiceConfig::named(format!("svc-{s:04}"))
            })
            .collect();
        let nodes = (0..50)
            .map(|n| PeerConfig { name: format!("node-{n}"), address: ([10, 99, 0, n as u8], 4433).into() })
            .collect();
        let mut snap = Snapshot { version, services, nodes, ..Default::default() };
        snap.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        snap
    }

    /// One endpoint turning unhealthy in a mesh of 1000 services and 10 000 endpoints is a delta
    /// of one service: well under a kilobyte on the wire instead of megabytes.
    #[test]
    fn one_endpoint_changing_is_a_delta_of_bytes() {
        let before = mesh(1, 1000, 10);
        let mut after = before.clone();
        after.version = 2;
        after.services[417].endpoints[3].healthy = false;
        let delta = before.diff(&after);
        let wire = serde_json::to_vec(&delta).unwrap().len();
        let whole = serde_json::to_vec(&after).unwrap().len();
        assert_eq!(delta.services.len(), 1);
        assert!(wire < 1024, "the delta is {wire} bytes");
        assert!(whole > 500 * wire, "the whole snapshot is {whole} bytes, the delta {wire}");
        let mut held = before.clone();
        held.apply(delta).unwrap();
        assert_eq!(held, after);
    }

    /// A delta made from another version is refused and changes nothing.
    #[test]
    fn a_delta_from_another_version_is_refused() {
        let before = mesh(1, 10, 2);
        let mut after = before.clone();
        after.version = 3;
        after.services.remove(4);
        let mut held = mesh(2, 10, 2);
        let copy = held.clone();
        assert_eq!(held.apply(before.diff(&after)), Err(Mismatch { from: 1, held: 2 }));
        assert_eq!(held, copy);
        assert!(before.diff(&before).is_empty());
    }

    /// Two snapshots drawn from the same pool of services (some changed, some missing in each):
    /// the first plus the delta between them is the second, whatever changed.
    fn snapshots() -> impl Strategy<Value = (Snapshot, Snapshot)> {
        let side = || {
            (
                prop::collection::btree_map(0u8..24, (0u8..4, any::<bool>()), 0..16),
                prop::collection::btree_set(0u8..12, 0..8),
                prop::option::of(1u64..5),
                prop::collection::btree_set("[a-c]{1,2}", 0..3),
            )
        };
        (side(), side()).prop_map(|(a, b)| {
            let build =
                |version: u64, (svcs, nodes, connect, revoked): (BTreeMap<u8, (u8, bool)>, _, Option<u64>, _)| {
                    let services = svcs
                        .into_iter()
                        .map(|(s, (eps, healthy))| ServiceConfig {
                            endpoints: (0..eps)
                                .map(|e| EndpointConfig {
                                    node: format!("n{e}"),
                                    address: ([10, 0, s, e], 80).into(),
                                    labels: Default::default(),
                                    healthy,
                                })
                                .collect(),
                            ..ServiceConfig::named(format!("s{s:02}"))
                        })
                        .collect();
                    let nodes: std::collections::BTreeSet<u8> = nodes;
                    let nodes = nodes
                        .into_iter()
                        .map(|n| PeerConfig { name: format!("n{n:02}"), address: ([10, 1, 0, n], 4433).into() })
                        .collect();
                    let mut timeouts = Timeouts::default();
                    if let Some(c) = connect {
                        timeouts.connect = std::time::Duration::from_secs(c);
                    }
                    let revoked: std::collections::BTreeSet<String> = revoked;
                    Snapshot {
                        version,
                        services,
                        nodes,
                        timeouts,
                        revoked: revoked.into_iter().collect(),
                        ..Default::default()
                    }
                };
            (build(7, a), build(8, b))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn applying_the_diff_gives_the_next_snapshot((before, after) in snapshots()) {
            let delta = before.diff(&after);
            // The wire form decodes to the same delta.
            let decoded: Delta = serde_json::from_slice(&serde_json::to_vec(&delta).unwrap()).unwrap();
            prop_assert_eq!(&decoded, &delta);
            let mut held = before.clone();
            held.apply(decoded).unwrap();
            prop_assert_eq!(held, after);
        }
    }
}
