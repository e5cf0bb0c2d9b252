//! The mesh as one proxy process sees it: the long-lived inputs (the peer pool, the client for
//! local instances, the drain, the access log) and the current compiled [`Table`], swapped
//! whole. Per-request work starts from a [`Call`]: a request loads the table once
//! and carries it with the inputs through its tries.
//!
//! The inbound node learns which service and endpoint were chosen from two internal headers and
//! checks them against its own instances, so a peer can never make a node dial an arbitrary
//! address.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::warn;

use super::drain::Drain;
use super::local::LocalClient;
use crate::config::NodeConfig;
use crate::message::error::ProxyError;
use crate::policy::authz::{Caller, Decision, Target};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics as m;
use crate::transport::pool::PeerPool;

use super::table::Table;

/// A client request stream on a mesh connection.
pub use crate::transport::stream::RequestStream;

/// What a proxy process is given once and keeps: who it is and how it reaches others.
pub struct Inputs {
    /// This node's name; `None` for the gateway, which hosts no instances.
    pub local_node: Option<String>,
    /// The QUIC endpoint peer connections are made from.
    pub endpoint: quinn::Endpoint,
    /// The mesh client config; with it, each worker past the first dials from a UDP socket of
    /// its own ([`PeerPool::with_worker_sockets`]); without, from `endpoint`.
    pub client: Option<quinn::ClientConfig>,
    /// Where completed requests are logged, when the access log is on.
    pub access_log: Option<Arc<AccessLog>>,
    /// Where spans go, when tracing is on.
    pub tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
}

/// Where services live and how to reach them: the long-lived inputs and the current table.
pub struct Mesh {
    local_node: Option<String>,
    trust_domain: String,
    /// One pool per worker thread ([`crate::runtime`]): a worker's requests use connections
    /// whose drivers run on that worker.
    pools: Vec<PeerPool>,
    local: LocalClient,
    drain: Arc<Drain>,
    access_log: Option<Arc<AccessLog>>,
    /// Completed requests, to whoever watches (`/tap`).
    tap: Arc<crate::telemetry::tap::Tap>,
    tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
    /// Ticks with every new table (connections re-check revocations on it).
    changes: tokio::sync::watch::Sender<u64>,
    table: ArcSwap<Table>,
}

impl Mesh {
    /// A mesh starting from a compiled table; its trust domain and timeouts come from that
    /// table's config and stay for the life of the process.
    pub fn new(inputs: Inputs, table: Table) -> Self {
        let config = table.config();
        let mut first = PeerPool::new(inputs.endpoint, &config.mesh.trust_domain, config.timeouts.connect);
        if let Some(client) = inputs.client {
            first = first.with_worker_sockets(client, &config.transport);
        }
        let mut pools: Vec<PeerPool> = (1..crate::runtime::count()).map(|_| first.sibling()).collect();
        pools.insert(0, first);
        let idle = config.node.as_ref().map_or(NodeConfig::default().instance_idle, |n| n.instance_idle);
        let local = LocalClient::new(config.timeouts.connect, idle);
        let trust_domain = config.mesh.trust_domain.clone();
        Self {
            trust_domain,
            pools,
            local,
            drain: Drain::new(),
            access_log: inputs.access_log,
            tap: crate::telemetry::tap::Tap::new(inputs.local_node.as_deref().unwrap_or("gateway")),
            local_node: inputs.local_node,
            tracing: inputs.tracing,
            changes: tokio::sync::watch::channel(table.version()).0,
            table: ArcSwap::from_pointee(table),
        }
    }

    /// This node's name; `None` at the gateway.
    pub fn local_node(&self) -> Option<&str> {
        self.local_node.as_deref()
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Pooled QUIC connections to peer members, this worker's.
    pub fn pool(&self) -> &PeerPool {
        &self.pools[crate::runtime::index().min(self.pools.len() - 1)]
    }

    /// Every worker's pool (for what applies to all: new credentials, revocations).
    pub fn pools(&self) -> &[PeerPool] {
        &self.pools
    }

    /// The client for instances on this host.
    pub fn local(&self) -> &LocalClient {
        &self.local
    }

    /// Drain state and requests in flight through this process.
    pub fn drain(&self) -> &Arc<Drain> {
        &self.drain
    }

    /// The access log, when it is on.
    pub fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref()
    }

    /// The span exporter, when tracing is on.
    pub fn tracing(&self) -> Option<&Arc<crate::telemetry::trace::Tracing>> {
        self.tracing.as_ref()
    }

    /// The live tap of this proxy's requests.
    pub fn tap(&self) -> &Arc<crate::telemetry::tap::Tap> {
        &self.tap
    }

    /// A receiver that wakes on every new table.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current view; load once per request.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// One request's view: these inputs with `table` (loaded once by the caller).
    pub fn at<'r>(&'r self, table: &'r Table) -> Call<'r> {
        Call::new(self, table)
    }

    /// Applies the authorization policy to a verified caller: `Err(Denied)` when an enforced
    /// rule denies; a denial in audit mode is logged and counted and passes.
    /// This node as the caller of a service it delivers to itself (local delivery skips the
    /// inbound side, where callers are otherwise checked).
    pub fn local_caller<'a>(&'a self, table: &'a Table) -> Caller<'a> {
        Caller {
            node: self.local_node().unwrap_or_default(),
            service: table.source_service(),
            via_gateway: false,
            jwt: None,
        }
    }

    pub fn authorize(
        &self,
        table: &Table,
        service: &str,
        caller: &Caller<'_>,
        target: &Target<'_>,
    ) -> Result<(), ProxyError> {
        match table.config().authorization.decide(service, caller, target) {
            Decision::Allow => Ok(()),
            Decision::Deny(rule) => {
                metrics::counter!(m::AUTHZ_DENIED, "service" => service.to_string(), "mode" => "enforce").increment(1);
                warn!(service, caller.node, caller.service, rule, "request denied by authorization policy");
                Err(ProxyError::Denied(format!("{service} by {rule}")))
            }
            Decision::AuditDeny(rule) => {
                metrics::counter!(m::AUTHZ_DENIED, "service" => service.to_string(), "mode" => "audit").increment(1);
                warn!(service, caller.node, caller.service, rule, "audit: the policy would deny this request");
                Ok(())
            }
        }
    }

    /// `/endpoints`: the table's [`Table::dump`], each peer node also showing whether this
    /// proxy can reach it (`reachable`, and why not under `unreachable`).
    pub fn dump(&self) -> String {
        let table = self.table();
        let mut doc = table.dump_value();
        if let Some(nodes) = doc.get_mut("nodes").and_then(|n| n.as_array_mut()) {
            for node in nodes {
                let Some(name) = node.get("name").and_then(|n| n.as_str()).map(str::to_owned) else { continue };
                let down = self.pool().unreachable(&name);
                node["reachable"] = down.is_none().into();
                let pooled: Vec<_> = self.pools.iter().filter_map(|pool| pool.pooled(&name)).collect();
                node["connections"] = serde_json::to_value(pooled).unwrap_or_default();
                if let Some(down) = down {
                    node["unreachable"] = serde_json::to_value(down).unwrap_or_default();
                }
            }
        }
        doc.to_string()
    }

    /// Installs a new view atomically: services, endpoints, mesh and edge routes at once.
    /// Endpoints that stay keep their statistics, services their counters and budget, an
    /// unchanged route list its rate limiters; what left is forgotten.
    pub fn apply(&self, table: Table) {
        let old = self.table.load();
        let mut table = if table.carried { table } else { carry(&old, table) };
        if !Arc::ptr_eq(&table.routes, &old.routes) && table.routes.routes() == old.routes.routes() {
            table.routes = old.routes.clone();
        }
        if let (Some(new), Some(prev)) = (&table.edge, &old.edge) {
            if !Arc::ptr_eq(new, prev) && new.same_as(prev) {
                table.edge = Some(prev.clone());
            }
        }
        drop(old);
        // Revoked members lose their pooled connections at once.
        for name in &table.config().revoked {
            for pool in &self.pools {
                pool.close_peer(name, b"revoked");
            }
        }
        let version = table.version();
        self.table.store(Arc::new(table));
        self.changes.send_replace(version);
    }
}

/// One request's view of the mesh: the process's inputs and the table the request loaded
/// once. Every try of the request uses this table, so a snapshot swap mid-request never mixes
/// two views.
#[derive(Clone, Copy)]
pub struct Call<'r> {
    pub(crate) mesh: &'r Mesh,
    pub(crate) table: &'r Table,
}

impl<'r> Call<'r> {
    pub(crate) fn new(mesh: &'r Mesh, table: &'r Table) -> Self {
        Self { mesh, table }
    }

    /// The table this request reads.
    pub fn table(&self) -> &'r Table {
        self.table
    }
}

/// Gives a fresh table's services the statistics and state the previous tables had for them
/// (by endpoint key and service name), and remembers this table's for the next.
/// Gives the services of a freshly compiled table the statistics and counters of the same
/// services (and endpoints) in `old`, so requests read them without locks across swaps.
fn carry(old: &Table, mut table: Table) -> Table {
    // `hosts` shares the services; let go of those references so they can be updated.
    let host_names: Vec<(String, String)> =
        table.hosts.iter().map(|(h, svc)| (h.clone(), svc.config.name.clone())).collect();
    table.hosts.clear();
    for svc in table.services.values_mut() {
        // Fresh services were just built: nothing else holds them now.
        let Some(svc) = Arc::get_mut(svc) else { continue };
        if let Some(prev) = old.services.get(&svc.config.name) {
            svc.carry_from(prev);
        }
    }
    for (host, name) in host_names {
        if let Some(svc) = table.services.get(&name) {
            table.hosts.insert(host, svc.clone());
        }
    }
    table.carried = true;
    table
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, EndpointConfig};
    use crate::message::error::ProxyError;
    use crate::proxy::pick::PickCtx;

    fn mesh(lb: &str) -> Mesh {
        mesh_of(config(lb))
    }

    fn mesh_of(cfg: Config) -> Mesh {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let inputs = Inputs { local_node: Some("a".into()), endpoint, client: None, access_log: None, tracing: None };
        Mesh::new(inputs, Table::compile(cfg, 0).unwrap())
    }

    fn config(lb: &str) -> Config {
        let text = format!(
            "[node]\nname = \"a\"\n[[nodes]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n\
             [[services]]\nname = \"s\"\nlb = {{ {lb} }}\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:10\"\n\
             [[services.endpoints]]\nnode = \"a\"\naddress = \"127.0.0.1:11\"\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:12\"\n"
        );
        crate::config::from_toml(&text).unwrap()
    }

    fn picks(m: &Mesh, n: usize) -> Vec<String> {
        let table = m.table();
        let svc = table.service("s").unwrap();
        (0..n).map(|_| m.pick(svc, &BTreeMap::new(), &PickCtx::NONE).unwrap().node).collect()
    }

    #[tokio::test]
    async fn endpoint_statistics_survive_a_table_swap() {
        let m = mesh("policy = \"peak_ewma\"");
        let table = m.table();
        let svc = table.service("s").unwrap();
        let ep = svc.config.endpoints[0].clone();
        svc.stats_of(&ep).unwrap().observe(Duration::from_millis(7));
        let before = Arc::as_ptr(svc.stats_of(&ep).unwrap());
        m.apply(Table::compile(config("policy = \"peak_ewma\""), 2).unwrap());
        let after = m.table();
        let svc2 = after.service("s").unwrap();
        assert_eq!(Arc::as_ptr(svc2.stats_of(&ep).unwrap()), before, "statistics were not carried over");
        assert!(std::ptr::eq(after.service_for_host("s").unwrap().as_ref(), svc2.as_ref()), "hosts lost the service");
    }

    #[tokio::test]
    async fn each_filter_narrows_the_choice_only_when_it_leaves_an_endpoint() {
        // b:10 {zone=x}, a:11 {zone=x, unhealthy}, b:12 {zone=y}; round robin, no locality.
        let text = "[node]\nname = \"a\"\n[[nodes]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n\
             [[services]]\nname = \"s\"\nlb = { policy = \"round_robin\", prefer_local = false }\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:10\"\nlabels = { zone = \"x\" }\n\
             [[services.endpoints]]\nnode = \"a\"\naddress = \"127.0.0.1:11\"\nlabels = { zone = \"x\" }\nhealthy = false\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:12\"\nlabels = { zone = \"y\" }\n";
        let m = mesh_of(crate::config::from_toml(text).unwrap());
        let table = m.table();
        let svc = table.service("s").unwrap();
        let eps = &svc.config.endpoints;
        let port = |labels: &BTreeMap<String, String>, avoid: &[&EndpointConfig]| {
            (0..12)
                .map(|_| m.pick_avoiding(svc, labels, &PickCtx::NONE, avoid).map(|ep| ep.address.port()))
                .collect::<Result<std::collections::BTreeSet<u16>, _>>()
        };
        let none = BTreeMap::new();
        let x: BTreeMap<String, String> = [("zone".to_string(), "x".to_string())].into();
        let z: BTreeMap<String, String> = [("zone".to_string(), "z".to_string())].into();
        assert_eq!(port(&none, &[]).unwrap(), [10, 12].into(), "the unhealthy endpoint is left out");
        assert_eq!(port(&x, &[]).unwrap(), [10].into(), "labels select a subset");
        assert_eq!(port(&x, &[&eps[0]]).unwrap(), [10].into(), "tried, but the only healthy one left");
        assert_eq!(port(&none, &[&eps[0]]).unwrap(), [12].into(), "an untried healthy one first");
        assert_eq!(port(&none, &[&eps[0], &eps[2]]).unwrap(), [10, 12].into(), "all tried: any healthy one");
        assert!(matches!(port(&z, &[]), Err(ProxyError::NoEndpoint(_))), "no endpoint carries the labels");
        let y: BTreeMap<String, String> = [("zone".to_string(), "y".to_string())].into();
        assert_eq!(port(&y, &[]).unwrap(), [12].into(), "a subset without the first endpoint");
        // Locality comes after health and tries: this node's (a) endpoint, once healthy, first.
        let local = |text: &str| {
            let t = text.replace("prefer_local = false", "prefer_local = true").replace("healthy = false\n", "");
            m.apply(Table::compile(crate::config::from_toml(&t).unwrap(), 3).unwrap());
            m.table()
        };
        let table = local(text);
        let svc = table.service("s").unwrap();
        let pick =
            |avoid: &[&EndpointConfig]| m.pick_avoiding(svc, &none, &PickCtx::NONE, avoid).unwrap().address.port();
        assert_eq!(pick(&[]), 11, "the local endpoint");
        assert_ne!(pick(&[&svc.config.endpoints[1]]), 11, "tried already: a remote one");
        // Consistent hashing: one key, one endpoint, among those the filters leave.
        let hashed =
            text.replace("policy = \"round_robin\"", "policy = \"consistent_hash\", hash_on = \"header:x-user\"");
        m.apply(Table::compile(crate::config::from_toml(&hashed).unwrap(), 4).unwrap());
        let table = m.table();
        let svc = table.service("s").unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("x-user", http::HeaderValue::from_static("alice"));
        let ctx = PickCtx { headers: Some(&h), client: None };
        let chosen: std::collections::BTreeSet<u16> =
            (0..12).map(|_| m.pick_avoiding(svc, &none, &ctx, &[]).unwrap().address.port()).collect();
        assert_eq!(chosen.len(), 1, "{chosen:?}");
        assert_ne!(chosen.first(), Some(&11), "never the unhealthy endpoint");
        let first = svc.config.endpoints.iter().find(|ep| Some(&ep.address.port()) == chosen.first()).unwrap();
        let other = m.pick_avoiding(svc, &none, &ctx, &[first]).unwrap().address.port();
        assert!(other != 11 && Some(&other) != chosen.first(), "tried: the other healthy one, got {other}");
        // With none healthy, all are candidates again (panic mode).
        let sick = text.replace(
            "[[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:10\"\n",
            "[[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:10\"\nhealthy = false\n",
        );
        m.apply(Table::compile(crate::config::from_toml(&sick).unwrap(), 5).unwrap());
        let table = m.table();
        let svc = table.service("s").unwrap();
        let ports: std::collections::BTreeSet<u16> =
            (0..12).map(|_| m.pick_avoiding(svc, &x, &PickCtx::NONE, &[]).unwrap().address.port()).collect();
        assert_eq!(ports, [10, 11].into(), "no healthy endpoint with zone x: both are tried");
    }

    #[tokio::test]
    async fn locality_prefers_this_nodes_endpoints_unless_turned_off() {
        let local = mesh("policy = \"round_robin\"");
        assert!(picks(&local, 30).iter().all(|n| n == "a"));
        let anywhere = mesh("policy = \"round_robin\", prefer_local = false");
        let p = picks(&anywhere, 30);
        assert_eq!(p.iter().filter(|n| *n == "a").count(), 10, "{p:?}");
    }

    #[tokio::test]
    async fn rate_limits_hold_across_snapshots_that_leave_the_routes_alone() {
        let text = |port: u16| {
            format!(
                "[node]\nname = \"a\"\n[[services]]\nname = \"s\"\n\
                 [[services.endpoints]]\nnode = \"a\"\naddress = \"127.0.0.1:{port}\"\n\
                 [[routes]]\nname = \"r\"\nrateLimit = {{ requestsPerSecond = 0.001, burst = 1 }}\n\
                 [[routes.rules]]\nbackendRefs = [{{ name = \"s\" }}]\n"
            )
        };
        let m = mesh_of(crate::config::from_toml(&text(10)).unwrap());
        let check = |m: &Mesh| {
            let table = m.table();
            let matched = table.routes().find("s", &http::Method::GET, "/", None, &http::HeaderMap::new()).unwrap();
            matched.limiter.unwrap().check(None, std::time::Instant::now()).is_ok()
        };
        assert!(check(&m), "the burst allows one");
        assert!(!check(&m), "then the bucket is empty");
        // A new endpoint, same routes: the bucket stays empty.
        m.apply(Table::compile(crate::config::from_toml(&text(11)).unwrap(), 2).unwrap());
        assert!(!check(&m), "a snapshot that changed no route refilled the bucket");
    }
}
