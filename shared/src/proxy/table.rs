//! The compiled snapshot: everything a request reads, built once per config or control-plane
//! snapshot by [`Table::compile`] and swapped whole by [`Mesh::apply`](super::mesh::Mesh::apply).
//! After compiling, no request parses config text: routes are matchers, hash keys are typed,
//! services are indexed by name and Host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use crate::config::{invalid, Config, ConfigError, EndpointConfig, ServiceConfig};
use crate::policy::balance::{EndpointStats, HashOn, Maglev, Policy};
use crate::policy::listener::Listeners;
use crate::policy::retry::Budget;
use crate::policy::route::RouteTable;

/// A service with its balancing state.
pub struct Service {
    pub config: ServiceConfig,
    pub(crate) cursor: AtomicUsize,
    /// What consistent hashing keys on (compiled from `lb.hash_on`); `None` for other policies.
    pub(crate) hash_on: Option<HashOn>,
    /// Built once per table for consistent hashing over all endpoints.
    pub(crate) maglev: Option<Maglev>,
    /// Statistics per endpoint (same order as `config.endpoints`), carried across table swaps
    /// by [`Mesh::apply`](super::mesh::Mesh::apply) so requests read them without locks.
    pub(crate) stats: Vec<Arc<EndpointStats>>,
    /// Circuit-breaker counters and the retry budget, carried across table swaps like `stats`.
    pub(crate) state: Arc<ServiceState>,
}

/// What a proxy counts per service, whatever the table.
#[derive(Debug)]
pub struct ServiceState {
    /// Requests in flight through this proxy.
    pub(crate) in_flight: AtomicU64,
    /// Requests waiting for a connection.
    pub(crate) pending: AtomicU64,
    pub(crate) budget: Budget,
}

impl ServiceState {
    fn new(config: &ServiceConfig) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            budget: Budget::new(config.retry.budget.clone()),
        }
    }
}

impl Service {
    /// Takes over `prev`'s counters and the statistics of the endpoints both list (by node
    /// and address), so a new table keeps outlier ejections, latency estimates and budgets.
    pub(crate) fn carry_from(&mut self, prev: &Service) {
        prev.state.budget.reconfigure(&self.config.retry.budget);
        self.state = prev.state.clone();
        let mut old: HashMap<(&str, std::net::SocketAddr), &Arc<EndpointStats>> = HashMap::new();
        for (ep, stats) in prev.config.endpoints.iter().zip(&prev.stats) {
            old.insert((ep.node.as_str(), ep.address), stats);
        }
        for (ep, slot) in self.config.endpoints.iter().zip(self.stats.iter_mut()) {
            if let Some(stats) = old.get(&(ep.node.as_str(), ep.address)) {
                *slot = Arc::clone(stats);
            }
        }
    }

    /// The statistics of one of this service's endpoints.
    pub fn stats_of(&self, ep: &EndpointConfig) -> Option<&Arc<EndpointStats>> {
        let i = self.config.endpoints.iter().position(|e| e.node == ep.node && e.address == ep.address)?;
        self.stats.get(i)
    }
}

/// The key an endpoint's statistics are kept under across tables.
pub(crate) fn endpoint_key(ep: &EndpointConfig) -> String {
    format!("{}/{}", ep.node, ep.address)
}

/// One consistent view of the mesh: services, their endpoints, peers, routes (the mesh's and
/// the edge's) and settings. Swapped whole when a new snapshot arrives; a request loads it once
/// and uses it throughout, so it sees the old or the new view, never a mix.
pub struct Table {
    /// Snapshot version (0 for static config).
    pub(crate) version: u64,
    /// Mesh routes (`[[routes]]`), compiled.
    pub(crate) routes: Arc<RouteTable>,
    /// The gateway's listeners with the routes attached to each (`gateway.routes`,
    /// `gateway.tls_routes`, `gateway.tcp_routes`), compiled; `None` off the gateway.
    pub(crate) edge: Option<Arc<Listeners>>,
    /// Everything else (peers, timeouts, policies); services live in `services`.
    pub(crate) config: Arc<Config>,
    pub(crate) services: crate::FastMap<String, Arc<Service>>,
    pub(crate) hosts: crate::FastMap<String, Arc<Service>>,
    /// The service this node hosts, when it hosts exactly one: the source of its outbound calls.
    pub(crate) source_service: Option<String>,
    /// Endpoints on revoked members, by service: out of routing, shown in the dump.
    pub(crate) revoked_endpoints: Vec<(String, EndpointConfig)>,
    /// The services' statistics already come from the table this one replaces (a patched
    /// table); a compiled one gets them when applied.
    pub(crate) carried: bool,
}

/// Builds one service's balancing state. `prev`, the service of that name in the table this
/// one replaces, lends its statistics and counters, so a new table keeps what the proxy
/// learned. Endpoints on `revoked` members come back apart: out of routing.
pub(crate) fn build_service(
    mut svc: ServiceConfig,
    key: &str,
    revoked: &[String],
    prev: Option<&Service>,
) -> Result<(Service, Vec<EndpointConfig>), ConfigError> {
    let hash_on = match svc.lb.policy {
        Policy::ConsistentHash => Some(HashOn::parse(&svc.lb.hash_on).ok_or_else(|| {
            invalid(
                format!("{key}.lb.hash_on"),
                format!("{:?} is not header:<name>, cookie:<name> or client_ip", svc.lb.hash_on),
            )
        })?),
        _ => None,
    };
    // A revoked member's endpoints leave routing at once, static or registered; they stay
    // visible (as revoked) in the dump.
    let (kept, gone): (Vec<_>, Vec<_>) = if revoked.is_empty() {
        (std::mem::take(&mut svc.endpoints), Vec::new())
    } else {
        std::mem::take(&mut svc.endpoints).into_iter().partition(|ep| !revoked.contains(&ep.node))
    };
    svc.endpoints = kept;
    let maglev = hash_on.is_some().then(|| Maglev::new(&svc.endpoints.iter().map(endpoint_key).collect::<Vec<_>>()));
    let mut service = Service {
        stats: svc.endpoints.iter().map(|_| Arc::new(EndpointStats::default())).collect(),
        state: Arc::new(ServiceState::new(&svc)),
        config: svc,
        cursor: AtomicUsize::new(0),
        hash_on,
        maglev,
    };
    if let Some(prev) = prev {
        service.carry_from(prev);
    }
    Ok((service, gone))
}

/// The service this node hosts, when it hosts exactly one.
pub(crate) fn source_of(services: &crate::FastMap<String, Arc<Service>>, local: Option<&str>) -> Option<String> {
    let local = local?;
    let mut hosted = services
        .values()
        .filter(|s| s.config.endpoints.iter().any(|ep| ep.node == local))
        .map(|s| s.config.name.clone());
    match (hosted.next(), hosted.next()) {
        (Some(one), None) => Some(one),
        _ => None,
    }
}

impl Table {
    /// The one step from config to what requests read: compiles routes and hash keys, indexes
    /// services, takes revoked members' endpoints out of routing. Fails with the key at fault
    /// on anything [`Config::validate`] would refuse in these parts, so a table is never half
    /// built and never silently empty.
    pub fn compile(mut config: Config, version: u64) -> Result<Self, ConfigError> {
        // gRPC routes join the HTTP routes they compile to; the table keeps only those.
        let mesh_routes = config.mesh_routes().map_err(|e| invalid("grpc_routes", e))?;
        config.routes.clear();
        config.grpc_routes.clear();
        let routes = RouteTable::new(mesh_routes).map_err(|e| invalid("routes", e.to_string()))?;
        let edge = match &config.gateway {
            Some(gw) => {
                let edge_routes = gw.edge_routes().map_err(|e| invalid("gateway.grpc_routes", e))?;
                RouteTable::new(edge_routes.clone()).map_err(|e| invalid("gateway.routes", e.to_string()))?;
                let (listeners, _) =
                    Listeners::compile(&gw.name, gw.listener_specs(), &edge_routes, &gw.tls_routes, &gw.tcp_routes)
                        .map_err(|e| invalid("gateway.listeners", e))?;
                Some(Arc::new(listeners))
            }
            None => None,
        };
        let mut revoked_endpoints = Vec::new();
        let mut services = crate::FastMap::default();
        let mut hosts = crate::FastMap::default();
        // The services move into the table; `config` keeps the rest (peers, timeouts, ...).
        for (i, svc) in std::mem::take(&mut config.services).into_iter().enumerate() {
            let (s, revoked) = build_service(svc, &format!("services[{i}]"), &config.revoked, None)?;
            revoked_endpoints.extend(revoked.into_iter().map(|ep| (s.config.name.clone(), ep)));
            let s = Arc::new(s);
            services.insert(s.config.name.clone(), s.clone());
            hosts.insert(s.config.name.clone(), s.clone());
            for h in &s.config.hosts {
                hosts.insert(h.to_ascii_lowercase(), s.clone());
            }
        }
        let source_service = source_of(&services, config.node.as_ref().map(|n| n.name.as_str()));
        Ok(Self {
            version,
            routes: Arc::new(routes),
            edge,
            config: Arc::new(config),
            services,
            hosts,
            source_service,
            revoked_endpoints,
            carried: false,
        })
    }

    /// The snapshot version (0 for a static config).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The config in force, without its services (see [`Table::effective_config`]).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The mesh's routes (`[[routes]]`).
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The gateway's listeners and their routes; `None` off the gateway.
    pub fn edge(&self) -> Option<&Listeners> {
        self.edge.as_deref()
    }

    /// The service this node speaks for in its outbound calls, when it hosts exactly one.
    pub fn source_service(&self) -> Option<&str> {
        self.source_service.as_deref()
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The service a Host (without port) names.
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.hosts.get(host)
    }

    /// The control plane's name (its peers are edge traffic for authorization).
    pub fn gateway_name(&self) -> &str {
        self.config.node.as_ref().and_then(|n| n.gateway.as_ref()).map_or("gateway", |g| g.name.as_str())
    }

    /// Is this member revoked?
    pub fn is_revoked(&self, name: &str) -> bool {
        self.config.revoked.iter().any(|r| r == name)
    }

    /// The configuration in force: the table's config with its services and routes put back
    /// (the table keeps them compiled, not in the config), services sorted by name.
    pub fn effective_config(&self) -> Config {
        let mut config = (*self.config).clone();
        let mut services: Vec<_> = self.services.values().map(|s| s.config.clone()).collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        config.services = services;
        config.routes = self.routes.routes().to_vec();
        config
    }

    /// One service's config as the control plane sent it: revoked members' endpoints put back.
    pub(crate) fn full_service(&self, svc: &Service) -> ServiceConfig {
        let mut config = svc.config.clone();
        let name = &svc.config.name;
        config.endpoints.extend(self.revoked_endpoints.iter().filter(|(n, _)| n == name).map(|(_, ep)| ep.clone()));
        config
    }

    /// The control-plane snapshot this table was built from (services sorted by name, revoked
    /// members' endpoints back in their services): what a node keeps in its cache.
    pub fn snapshot(&self) -> crate::control::Snapshot {
        let mut names: Vec<&String> = self.services.keys().collect();
        names.sort();
        crate::control::Snapshot {
            version: self.version,
            nodes: self.config.nodes.clone(),
            services: names.into_iter().filter_map(|n| self.services.get(n)).map(|s| self.full_service(s)).collect(),
            timeouts: self.config.timeouts.clone(),
            routes: self.routes.routes().to_vec(),
            authorization: self.config.authorization.clone(),
            revoked: self.config.revoked.clone(),
        }
    }

    /// JSON of what this proxy believes: version, peers, services and their endpoints.
    /// Each endpoint also shows this proxy's own view: requests in flight and whether outlier
    /// detection has ejected it.
    pub fn dump(&self) -> String {
        self.dump_value().to_string()
    }

    pub(crate) fn dump_value(&self) -> serde_json::Value {
        let mut names: Vec<&String> = self.services.keys().collect();
        names.sort();
        let now = crate::policy::health::now_ms();
        let services: Vec<serde_json::Value> = names
            .into_iter()
            .filter_map(|n| self.services.get(n))
            .map(|svc| {
                let mut doc = serde_json::to_value(&svc.config).unwrap_or_default();
                if let Some(eps) = doc.get_mut("endpoints").and_then(|e| e.as_array_mut()) {
                    for (ep, stats) in eps.iter_mut().zip(&svc.stats) {
                        ep["in_flight"] = stats.in_flight().into();
                        ep["ejected"] = stats.outlier.is_ejected(now).into();
                        ep["revoked"] = false.into();
                    }
                    let revoked = self.revoked_endpoints.iter().filter(|(name, _)| *name == svc.config.name);
                    for (_, ep) in revoked {
                        let mut doc = serde_json::to_value(ep).unwrap_or_default();
                        doc["revoked"] = true.into();
                        eps.push(doc);
                    }
                }
                doc
            })
            .collect();
        serde_json::json!({
            "version": self.version,
            "timeouts": self.config.timeouts,
            "nodes": self.config.nodes,
            "services": services,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[node]\nname = \"n\"\n[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"n\"\naddress = \"127.0.0.1:10\"\n{extra}"
        );
        crate::config::from_toml(&text).unwrap()
    }

    #[test]
    fn compiling_names_the_key_at_fault_and_never_falls_back_to_an_empty_table() {
        let mut bad_hash = config("");
        bad_hash.services[0].lb.policy = Policy::ConsistentHash;
        bad_hash.services[0].lb.hash_on = "bogus".into();
        let err = Table::compile(bad_hash, 1).err().expect("a bad hash key is refused");
        assert!(err.to_string().contains("services[0].lb.hash_on"), "{err}");
        let mut bad_route = config("[[routes]]\nname = \"r\"\n[[routes.rules]]\nbackendRefs = [{ name = \"web\" }]\n");
        // Past validation (as a snapshot built in code would be): a path that is no path.
        bad_route.routes[0].rules[0].matches = vec![serde_json::from_str(r#"{"path":{"value":"x"}}"#).unwrap()];
        let err = Table::compile(bad_route, 1).err().expect("a bad route is refused, not dropped");
        assert!(err.to_string().contains("\"routes\""), "{err}");
    }

    #[test]
    fn the_edge_routes_and_the_services_they_lead_to_are_one_table() {
        let gw = "[gateway]\n[[gateway.routes]]\nname = \"in\"\n[[gateway.routes.rules]]\nbackendRefs = [{ name = \"web\" }]\n";
        let table = Table::compile(config(gw), 7).unwrap();
        let edge = table.edge().expect("the gateway's routes are compiled with its table");
        let listener = edge.select(8443, "example.com").expect("the default listener on gateway.listen");
        let matched = listener
            .routes
            .find("example.com", &http::Method::GET, "/", None, &http::HeaderMap::new())
            .expect("the catch-all edge route");
        let backend = &matched.rule.backend_refs[0].name;
        assert!(table.service(backend).is_some(), "the route's service is in the same table");
        assert!(Table::compile(config(""), 1).unwrap().edge().is_none(), "off the gateway: none");
        // Typed once: consistent hashing keeps the parsed key, other policies none.
        let mut hashed = config("");
        hashed.services[0].lb.policy = Policy::ConsistentHash;
        hashed.services[0].lb.hash_on = "header:X-User".into();
        let t = Table::compile(hashed, 1).unwrap();
        assert_eq!(t.service("web").unwrap().hash_on, Some(HashOn::Header("x-user".into())));
        assert_eq!(table.service("web").unwrap().hash_on, None);
    }
}
