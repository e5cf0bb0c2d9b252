//! A control-plane delta applied to a compiled table. Only the services a delta names are
//! rebuilt (their statistics carried over); every other service is shared with the table the
//! delta applies to, so one endpoint changing in a mesh of thousands costs a node the work of
//! one service, not a whole compile. What the delta touches is checked as
//! [`Config::validate`](crate::config::Config::validate) checks a whole config, so a patched
//! table is exactly the table the whole snapshot would compile to, or an error naming the key.

use std::collections::HashSet;
use std::sync::Arc;

use super::table::{build_service, source_of, Service, Table};
use crate::config::{check_service, invalid, valid_node_name, ConfigError, Protocol, ServiceConfig};
use crate::control::delta::{self, Delta};
use crate::policy::route::RouteTable;

/// Inserts `key` for `svc` unless it already leads to another service (or repeats an alias).
fn claim(
    hosts: &mut crate::FastMap<String, Arc<Service>>,
    key: String,
    svc: &Arc<Service>,
    what: &str,
) -> Result<(), ConfigError> {
    if let Some(other) = hosts.get(&key) {
        // A service may list its own name among its aliases; nothing else may repeat.
        if !(Arc::ptr_eq(other, svc) && key == svc.config.name) {
            return Err(invalid(
                format!("services[{:?}].{what}", svc.config.name),
                format!("host {key:?} already leads to another service"),
            ));
        }
        return Ok(());
    }
    hosts.insert(key, svc.clone());
    Ok(())
}

impl Table {
    /// The table of version `delta.version`, built from this one (which must be `delta.from`).
    pub fn patch(&self, delta: Delta) -> Result<Table, ConfigError> {
        if delta.from != self.version {
            return Err(invalid(
                "version",
                format!("a delta from version {} cannot apply to version {}", delta.from, self.version),
            ));
        }
        let Delta {
            version,
            services: changed,
            removed_services,
            nodes,
            removed_nodes,
            timeouts,
            routes,
            authorization,
            revoked,
            ..
        } = delta;
        // Everything but the services and routes is small: copied when any of it changes.
        let mut config = self.config.clone();
        let revocations_changed = revoked.as_ref().is_some_and(|r| *r != self.config.revoked);
        if !nodes.is_empty()
            || !removed_nodes.is_empty()
            || timeouts.is_some()
            || authorization.is_some()
            || revoked.is_some()
        {
            let c = Arc::make_mut(&mut config);
            for peer in &nodes {
                if !valid_node_name(&peer.name) {
                    return Err(invalid(
                        format!("nodes[{:?}].name", peer.name),
                        format!(
                            "{:?} is not a valid node name (DNS labels of a-z, 0-9, '-', joined by '.')",
                            peer.name
                        ),
                    ));
                }
            }
            delta::patch(&mut c.nodes, nodes, &removed_nodes, |n| &n.name);
            if let Some(t) = timeouts {
                // As a whole snapshot's are checked: a time over 10 years overflowed a sum.
                t.validate()?;
                c.timeouts = t;
            }
            if let Some(a) = authorization {
                a.validate().map_err(|(key, reason)| invalid(key, reason))?;
                c.authorization = a;
            }
            if let Some(r) = revoked {
                c.revoked = r;
            }
        }
        let local = config.node.as_ref().map(|n| n.name.clone());
        let peers: HashSet<&str> = config.nodes.iter().map(|p| p.name.as_str()).collect();
        let known = |node: &str| peers.contains(node) || Some(node) == local.as_deref();

        // The services to build: those the delta names, or every one when revocations change
        // (which endpoints route depends on them).
        let mut rebuild: Vec<ServiceConfig> = changed;
        if revocations_changed {
            let named: HashSet<String> =
                rebuild.iter().map(|s| s.name.clone()).chain(removed_services.iter().cloned()).collect();
            let mut rest: Vec<&Arc<Service>> =
                self.services.values().filter(|s| !named.contains(&s.config.name)).collect();
            rest.sort_by(|a, b| a.config.name.cmp(&b.config.name));
            rebuild.extend(rest.into_iter().map(|s| self.full_service(s)));
        }
        let mut services = self.services.clone();
        let mut hosts = self.hosts.clone();
        let touched: HashSet<String> =
            rebuild.iter().map(|s| &s.name).chain(removed_services.iter()).cloned().collect();
        for name in &touched {
            if let Some(old) = services.remove(name) {
                hosts.remove(&old.config.name);
                for h in &old.config.hosts {
                    let h = h.to_ascii_lowercase();
                    if hosts.get(&h).is_some_and(|s| Arc::ptr_eq(s, &old)) {
                        hosts.remove(&h);
                    }
                }
            }
        }
        let mut revoked_endpoints: Vec<_> =
            self.revoked_endpoints.iter().filter(|(svc, _)| !touched.contains(svc.as_str())).cloned().collect();
        let tcp_forwards: Vec<&str> =
            config.node.as_ref().map(|n| n.tcp.iter().map(|f| f.service.as_str()).collect()).unwrap_or_default();
        let mut built = Vec::with_capacity(rebuild.len());
        for svc in rebuild {
            let key = format!("services[{:?}]", svc.name);
            check_service(&key, &svc)?;
            if let Some((j, ep)) = svc.endpoints.iter().enumerate().find(|(_, ep)| !known(&ep.node)) {
                return Err(invalid(
                    format!("{key}.endpoints[{j}].node"),
                    format!("node {:?} is not in [[nodes]]", ep.node),
                ));
            }
            if svc.protocol != Protocol::Tcp && tcp_forwards.contains(&svc.name.as_str()) {
                return Err(invalid("node.tcp", format!("service {:?} is not protocol \"tcp\"", svc.name)));
            }
            let prev = self.services.get(&svc.name).map(|s| &**s);
            let (service, gone) = build_service(svc, &key, &config.revoked, prev)?;
            revoked_endpoints.extend(gone.into_iter().map(|ep| (service.config.name.clone(), ep)));
            let service = Arc::new(service);
            if services.insert(service.config.name.clone(), service.clone()).is_some() {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("service {:?} is listed twice", service.config.name),
                ));
            }
            built.push(service);
        }
        // Names first, then aliases: an alias naming another service is refused either way.
        for svc in &built {
            claim(&mut hosts, svc.config.name.clone(), svc, "name")?;
        }
        for svc in &built {
            for (j, h) in svc.config.hosts.iter().enumerate() {
                claim(&mut hosts, h.to_ascii_lowercase(), svc, &format!("hosts[{j}]"))?;
            }
        }
        // Members that left may not be named by any endpoint that stays.
        if !removed_nodes.is_empty() {
            let stale = services
                .values()
                .flat_map(|s| s.config.endpoints.iter().map(move |ep| (&s.config.name, ep)))
                .chain(revoked_endpoints.iter().map(|(n, ep)| (n, ep)))
                .find(|(_, ep)| !known(&ep.node));
            if let Some((svc, ep)) = stale {
                return Err(invalid(
                    format!("services[{svc:?}].endpoints"),
                    format!("node {:?} is not in [[nodes]]", ep.node),
                ));
            }
        }
        let mut table_routes = self.routes.clone();
        if let Some(r) = routes {
            if r.len() > crate::config::MAX_ROUTES {
                return Err(invalid("routes", format!("{} routes, more than {}", r.len(), crate::config::MAX_ROUTES)));
            }
            table_routes = Arc::new(RouteTable::new(r).map_err(|e| invalid("routes", e.to_string()))?);
        }
        let source_service = if built.is_empty() && removed_services.is_empty() {
            self.source_service.clone()
        } else {
            source_of(&services, local.as_deref())
        };
        Ok(Table {
            version,
            routes: table_routes,
            edge: self.edge.clone(),
            config,
            services,
            hosts,
            source_service,
            revoked_endpoints,
            carried: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::config::{Config, EndpointConfig, PeerConfig};
    use crate::control::Snapshot;
    use crate::policy::route::HttpRoute;

    /// The node these tables belong to: `n0`, attached to a control plane.
    fn local() -> Config {
        crate::config::from_toml("[node]\nname = \"n0\"\n[node.gateway]\naddress = \"127.0.0.1:1\"\n").unwrap()
    }

    /// What a table routes by, in comparable form: its snapshot, Host -> service, the source.
    /// Endpoints are compared as sets: a lifted revocation puts a member's endpoints back at
    /// the end of their service.
    fn view(t: &Table) -> (Snapshot, BTreeMap<String, String>, Option<String>) {
        let hosts = t.hosts.iter().map(|(h, s)| (h.clone(), s.config.name.clone())).collect();
        let mut snap = t.snapshot();
        for svc in &mut snap.services {
            svc.endpoints.sort_by(|a, b| (&a.node, a.address).cmp(&(&b.node, b.address)));
        }
        (snap, hosts, t.source_service.clone())
    }

    fn route_to(backend: &str) -> HttpRoute {
        serde_json::from_value(serde_json::json!({"name": "r", "rules": [{"backendRefs": [{"name": backend}]}]}))
            .unwrap()
    }

    /// One side of a pair: services with aliases drawn from a small pool (so they collide),
    /// endpoints on members that may or may not be listed, revocations, a route.
    /// Services by number: (endpoints, alias numbers, healthy).
    type Drawn = BTreeMap<u8, (u8, Vec<u8>, bool)>;

    fn side() -> impl Strategy<Value = Snapshot> {
        (
            prop::collection::btree_map(0u8..10, (0u8..4, prop::collection::vec(0u8..12, 0..2), any::<bool>()), 0..8),
            prop::collection::btree_set(1u8..5, 0..4),
            prop::collection::btree_set(0u8..4, 0..2),
            prop::option::of(0u8..12),
        )
            .prop_map(|(svcs, nodes, revoked, route): (Drawn, BTreeSet<u8>, BTreeSet<u8>, _)| {
                let services = svcs
                    .into_iter()
                    .map(|(s, (eps, aliases, healthy))| ServiceConfig {
                        hosts: aliases.iter().map(|a| format!("s{a}")).collect(),
                        endpoints: (0..eps)
                            .map(|e| EndpointConfig {
                                node: format!("n{e}"),
                                address: ([10, 0, s, e], 80).into(),
                                labels: Default::default(),
                                healthy,
                            })
                            .collect(),
                        ..ServiceConfig::named(format!("s{s}"))
                    })
                    .collect();
                Snapshot {
                    version: 0,
                    nodes: nodes
                        .into_iter()
                        .map(|n| PeerConfig { name: format!("n{n}"), address: ([10, 1, 0, n], 4433).into() })
                        .collect(),
                    services,
                    revoked: revoked.into_iter().map(|n| format!("n{n}")).collect(),
                    routes: route.map(|r| vec![route_to(&format!("s{r}"))]).unwrap_or_default(),
                    ..Default::default()
                }
            })
    }

    /// A side that is valid: every member listed, no alias claimed twice or naming a service,
    /// routes only to services that exist.
    fn valid_side() -> impl Strategy<Value = Snapshot> {
        side().prop_map(|mut snap| {
            snap.nodes =
                (1..5).map(|n| PeerConfig { name: format!("n{n}"), address: ([10, 1, 0, n], 4433).into() }).collect();
            let names: BTreeSet<String> = snap.services.iter().map(|s| s.name.clone()).collect();
            let mut claimed = BTreeSet::new();
            for svc in &mut snap.services {
                svc.hosts.retain(|h| !names.contains(h) && claimed.insert(h.clone()));
            }
            snap.routes.retain(|r| names.contains(&r.rules[0].backend_refs[0].name));
            snap
        })
    }

    /// The whole path a node took before deltas: validate the config, compile the table.
    fn whole(snap: Snapshot) -> Result<Table, ConfigError> {
        let version = snap.version;
        let cfg = snap.into_config(&local());
        cfg.validate()?;
        Table::compile(cfg, version)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Patching a table with the delta between two snapshots accepts exactly what the
        /// whole second snapshot would pass, and then routes exactly as its table would; the
        /// endpoints both list keep their statistics.
        #[test]
        fn a_patched_table_is_the_table_of_the_next_snapshot(
            mut before in valid_side(),
            mut after in prop_oneof![valid_side(), side()],
        ) {
            before.version = 1;
            after.version = 2;
            let held = whole(before.clone()).expect("a valid side compiles");
            let expected = whole(after.clone());
            let patched = held.patch(before.diff(&after));
            prop_assert_eq!(patched.is_ok(), expected.is_ok(), "patched: {:?}, whole: {:?}", patched.as_ref().err(), expected.as_ref().err());
            let (Ok(patched), Ok(expected)) = (patched, expected) else { return Ok(()) };
            prop_assert_eq!(view(&patched), view(&expected));
            for (name, svc) in &patched.services {
                let Some(old) = held.services.get(name) else { continue };
                for ep in &svc.config.endpoints {
                    if let (Some(a), Some(b)) = (svc.stats_of(ep), old.stats_of(ep)) {
                        prop_assert!(Arc::ptr_eq(a, b), "{name}: {ep:?} lost its statistics");
                    }
                }
            }
        }
    }

    /// A delta is only for the version it was made from.
    #[test]
    fn a_delta_for_another_version_is_refused() {
        let snap = Snapshot { version: 4, ..Default::default() };
        let table = whole(snap.clone()).unwrap();
        let mut next = snap.clone();
        next.version = 6;
        let mut delta = snap.diff(&next);
        delta.from = 5;
        let err = table.patch(delta).err().expect("refused");
        assert!(err.to_string().contains("version 5"), "{err}");
    }

    /// Timeouts in a delta are checked as a whole snapshot's are: times too long for the clock
    /// (which overflowed a sum on every upgrade through the node) are refused by key.
    #[test]
    fn a_deltas_timeouts_are_checked_as_a_snapshots() {
        let snap = Snapshot { version: 4, ..Default::default() };
        let table = whole(snap.clone()).unwrap();
        let mut next = snap.clone();
        next.version = 5;
        let mut delta = snap.diff(&next);
        let huge = std::time::Duration::from_secs(u64::MAX / 2);
        delta.timeouts = Some(crate::config::Timeouts { connect: huge, request: huge, ..Default::default() });
        let err = table.patch(delta.clone()).err().expect("refused");
        assert!(err.to_string().contains("timeouts.connect"), "{err}");
        delta.timeouts = Some(crate::config::Timeouts { tcp_idle: huge, ..Default::default() });
        let err = table.patch(delta.clone()).err().expect("refused");
        assert!(err.to_string().contains("timeouts.tcp_idle"), "{err}");
        delta.timeouts =
            Some(crate::config::Timeouts { tcp_idle: std::time::Duration::from_secs(60), ..Default::default() });
        assert!(table.patch(delta).is_ok());
    }
}
