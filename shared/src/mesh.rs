//! The mesh client: from a service name to a response, for the node's outbound side and the
//! gateway alike.
//!
//! Phases: identify service -> pick endpoint -> local delivery, or one HTTP/3 request stream on
//! the pooled QUIC connection to the node hosting the endpoint. The inbound node learns which
//! service and endpoint were chosen from two internal headers and checks them against its own
//! instances, so a peer can never make a node dial an arbitrary address.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balance::{self, EndpointStats, HashOn, LbConfig, Maglev, Policy};
use crate::route::RouteTable;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body as _;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::metrics as m;

use crate::body::{self, Body, H3Body, H3Send};

/// How long a mirrored copy may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body copied to mirrors (bodies are buffered for the copy).
pub const MIRROR_MAX_BODY: u64 = 64 << 10;

/// A client request stream on a mesh connection.
pub type RequestStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

mod call;
use crate::config::{Config, EndpointConfig, Protocol, ServiceConfig};
use crate::error::ProxyError;
use crate::headers;
use crate::pool::{PeerConn, PeerPool};
pub use call::{CallInfo, CallOpts};

/// A service with its balancing state.
pub struct Service {
    pub config: ServiceConfig,
    cursor: AtomicUsize,
    /// Built once per table for consistent hashing over all endpoints.
    maglev: Option<Maglev>,
    /// Statistics per endpoint (same order as `config.endpoints`), carried across table swaps
    /// by [`Mesh::apply`] so requests read them without locks.
    stats: Vec<Arc<EndpointStats>>,
    /// Circuit-breaker counters and the retry budget, carried across table swaps like `stats`.
    pub state: Arc<ServiceState>,
}

/// What a proxy counts per service, whatever the table.
#[derive(Debug)]
pub struct ServiceState {
    /// Requests in flight through this proxy.
    in_flight: AtomicU64,
    /// Requests waiting for a connection.
    pending: AtomicU64,
    pub budget: crate::retry::Budget,
}

impl ServiceState {
    fn new(config: &ServiceConfig) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            budget: crate::retry::Budget::new(config.retry.budget.clone()),
        }
    }
}

/// Holds one of a service's circuit-breaker slots until dropped.
struct Slot<'a>(&'a AtomicU64);

impl<'a> Slot<'a> {
    /// Takes a slot unless `max` are taken already.
    fn take(counter: &'a AtomicU64, max: Option<u32>) -> Option<Self> {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(counter);
        max.is_none_or(|max| before < u64::from(max)).then_some(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A failed try, and whether the request provably never reached the upstream instance.
#[derive(Debug)]
pub struct TryError {
    pub error: ProxyError,
    pub unsent: bool,
}

impl TryError {
    fn unsent(error: ProxyError) -> Self {
        Self { error, unsent: true }
    }
    fn sent(error: ProxyError) -> Self {
        Self { error, unsent: false }
    }
}

impl From<ProxyError> for TryError {
    fn from(error: ProxyError) -> Self {
        let unsent = error.unsent();
        Self { error, unsent }
    }
}

impl Service {
    /// The statistics of one of this service's endpoints.
    pub fn stats_of(&self, ep: &EndpointConfig) -> Option<&Arc<EndpointStats>> {
        let i = self.config.endpoints.iter().position(|e| e.node == ep.node && e.address == ep.address)?;
        self.stats.get(i)
    }
}

/// What a balancer may look at in the request.
pub struct PickCtx<'a> {
    pub headers: Option<&'a http::HeaderMap>,
    pub client: Option<std::net::IpAddr>,
}

impl PickCtx<'_> {
    pub const NONE: PickCtx<'static> = PickCtx { headers: None, client: None };
}

fn endpoint_key(ep: &EndpointConfig) -> String {
    format!("{}/{}", ep.node, ep.address)
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

/// Clients for instances on this host: HTTP/1.1 with keep-alive pooling, and h2c.
#[derive(Clone)]
pub struct LocalClient {
    h1: Client<HttpConnector, Body>,
    h2c: Client<HttpConnector, Body>,
    connect_timeout: Duration,
}

impl LocalClient {
    /// `idle`: how long a kept-alive connection may sit unused before it is closed. The pool's
    /// timer closes it then; without one, hyper-util only drops an expired connection when it
    /// next looks for one to reuse, so a burst's extra connections stayed open for good.
    pub fn new(connect_timeout: Duration, idle: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(idle).pool_timer(TokioTimer::new());
            b
        };
        let h1 = builder().build(connector.clone());
        let h2c = builder().http2_only(true).build(connector);
        Self { h1, h2c, connect_timeout }
    }

    /// Sends `req` (origin-form path in its URI) to the instance at `addr`.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<Response<Body>, ProxyError> {
        *req.uri_mut() = origin_uri(addr, req.uri()).map_err(ProxyError::BadRequest)?;
        let client = if protocol == Protocol::H2c { &self.h2c } else { &self.h1 };
        if protocol == Protocol::H2c {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() && caused_by_timeout(&e) {
                ProxyError::ConnectTimeout(format!("{addr} after {:?}", self.connect_timeout))
            } else if e.is_connect() {
                ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: source_text(&e) }
            } else {
                ProxyError::UpstreamReset(source_text(&e))
            }
        })?;
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        Ok(Response::from_parts(parts, body::boxed(incoming)))
    }
}

/// `http://{addr}` with the path and query of `uri`.
fn origin_uri(addr: SocketAddr, uri: &Uri) -> Result<Uri, String> {
    let mut authority = String::with_capacity(24);
    headers::push_socket_addr(&mut authority, addr);
    headers::absolute_uri(http::uri::Scheme::HTTP, authority, uri)
}

/// The innermost cause of an error chain, which is what an operator needs to read.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// One consistent view of the mesh: services, their endpoints, peers and settings. Swapped
/// whole when a new snapshot arrives; a request loads it once and uses it throughout, so it sees
/// the old or the new view, never a mix.
pub struct Table {
    /// Snapshot version (0 for static config).
    pub version: u64,
    /// Mesh routes, compiled.
    pub routes: RouteTable,
    pub config: Arc<Config>,
    services: HashMap<String, Arc<Service>>,
    hosts: HashMap<String, Arc<Service>>,
    /// The service this node hosts, when it hosts exactly one: the source of its outbound calls.
    pub source_service: Option<String>,
    /// Endpoints on revoked members, by service: out of routing, shown in the dump.
    revoked_endpoints: Vec<(String, EndpointConfig)>,
}

impl Table {
    pub fn new(mut config: Config, version: u64) -> Self {
        let mut revoked_endpoints = Vec::new();
        let mut services = HashMap::new();
        let mut hosts = HashMap::new();
        // The services move into the table; `config` keeps the rest (peers, timeouts, ...).
        for mut svc in std::mem::take(&mut config.services) {
            // A revoked member's endpoints leave routing at once, static or registered; they
            // stay visible (as revoked) in the dump.
            let (kept, revoked): (Vec<_>, Vec<_>) =
                std::mem::take(&mut svc.endpoints).into_iter().partition(|ep| !config.revoked.contains(&ep.node));
            svc.endpoints = kept;
            revoked_endpoints.extend(revoked.into_iter().map(|ep| (svc.name.clone(), ep)));
            let maglev = (svc.lb.policy == Policy::ConsistentHash)
                .then(|| Maglev::new(&svc.endpoints.iter().map(endpoint_key).collect::<Vec<_>>()));
            let stats = svc.endpoints.iter().map(|_| Arc::new(EndpointStats::default())).collect();
            let state = Arc::new(ServiceState::new(&svc));
            let s = Arc::new(Service { config: svc, cursor: AtomicUsize::new(0), maglev, stats, state });
            let svc = &s.config;
            services.insert(svc.name.clone(), s.clone());
            hosts.insert(svc.name.clone(), s.clone());
            for h in &svc.hosts {
                hosts.insert(h.to_ascii_lowercase(), s.clone());
            }
        }
        // Validated with the config; an empty table is the safe fallback.
        let routes = RouteTable::new(config.routes.clone()).unwrap_or_else(|_| RouteTable::empty());
        let local = config.node.as_ref().map(|n| n.name.as_str());
        let mut hosted = services
            .values()
            .filter(|s| s.config.endpoints.iter().any(|ep| Some(ep.node.as_str()) == local))
            .map(|s| s.config.name.clone());
        let source_service = match (hosted.next(), hosted.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        };
        Self { version, routes, config: Arc::new(config), services, hosts, source_service, revoked_endpoints }
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

    /// The configuration in force: the table's config with its services put back (the table
    /// keeps them indexed, not in the config), sorted by name.
    pub fn effective_config(&self) -> Config {
        let mut config = (*self.config).clone();
        let mut services: Vec<_> = self.services.values().map(|s| s.config.clone()).collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        config.services = services;
        config
    }

    /// JSON of what this proxy believes: version, peers, services and their endpoints.
    /// Each endpoint also shows this proxy's own view: requests in flight and whether outlier
    /// detection has ejected it.
    pub fn dump(&self) -> String {
        self.dump_value().to_string()
    }

    fn dump_value(&self) -> serde_json::Value {
        let mut names: Vec<&String> = self.services.keys().collect();
        names.sort();
        let now = crate::health::now_ms();
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

/// Where services live and how to reach them.
pub struct Mesh {
    /// This node's name; `None` for the gateway, which hosts no instances.
    pub local_node: Option<String>,
    pub trust_domain: String,
    pub pool: PeerPool,
    pub local: LocalClient,
    /// Drain state and requests in flight through this process.
    pub drain: Arc<crate::drain::Drain>,
    /// Where completed requests are logged, when the access log is on.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// Ticks with every new table (connections re-check revocations on it).
    changes: tokio::sync::watch::Sender<u64>,
    table: ArcSwap<Table>,
    stats: std::sync::Mutex<HashMap<String, Arc<EndpointStats>>>,
    states: std::sync::Mutex<HashMap<String, Arc<ServiceState>>>,
}

/// The consistent-hashing key of a request, if it has what the service hashes on.
fn hash_key_for(lb: &LbConfig, ctx: &PickCtx<'_>) -> Option<u64> {
    match HashOn::parse(&lb.hash_on)? {
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
    pub fn new(config: Arc<Config>, local_node: Option<String>, endpoint: quinn::Endpoint) -> Self {
        let pool = PeerPool::new(endpoint, &config.mesh.trust_domain, config.timeouts.connect);
        let idle = config.node.as_ref().map_or(crate::config::NodeConfig::default().instance_idle, |n| n.instance_idle);
        let local = LocalClient::new(config.timeouts.connect, idle);
        let trust_domain = config.mesh.trust_domain.clone();
        let mesh = Self {
            local_node,
            trust_domain,
            pool,
            local,
            drain: crate::drain::Drain::new(),
            access_log: None,
            changes: tokio::sync::watch::channel(0).0,
            table: ArcSwap::from_pointee(Table::new(Config::default(), 0)),
            stats: Default::default(),
            states: Default::default(),
        };
        mesh.apply(Table::new(Config::clone(&config), 0));
        mesh
    }

    /// A receiver that wakes on every new table.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies the authorization policy to a verified caller: `Err(Denied)` when an enforced
    /// rule denies; a denial in audit mode is logged and counted and passes.
    pub fn authorize(
        &self,
        table: &Table,
        service: &str,
        caller: &crate::authz::Caller<'_>,
        target: &crate::authz::Target<'_>,
    ) -> Result<(), ProxyError> {
        use crate::authz::Decision;
        match table.config.authorization.decide(service, caller, target) {
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

    /// The current view; load once per request.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// `/endpoints`: the table's [`Table::dump`], each peer node also showing whether this
    /// proxy can reach it (`reachable`, and why not under `unreachable`).
    pub fn dump(&self) -> String {
        let table = self.table();
        let mut doc = table.dump_value();
        if let Some(nodes) = doc.get_mut("nodes").and_then(|n| n.as_array_mut()) {
            for node in nodes {
                let Some(name) = node.get("name").and_then(|n| n.as_str()).map(str::to_owned) else { continue };
                let down = self.pool.unreachable(&name);
                node["reachable"] = down.is_none().into();
                if let Some(down) = down {
                    node["unreachable"] = serde_json::to_value(down).unwrap_or_default();
                }
            }
        }
        doc.to_string()
    }

    /// Installs a new view atomically. Endpoints that stay keep their statistics; those that
    /// left are forgotten.
    pub fn apply(&self, mut table: Table) {
        // `hosts` shares the services; let go of those references so they can be updated.
        let host_names: Vec<(String, String)> =
            table.hosts.iter().map(|(h, svc)| (h.clone(), svc.config.name.clone())).collect();
        table.hosts.clear();
        {
            let mut map = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            let mut kept = HashMap::new();
            let mut kept_states = HashMap::new();
            for svc in table.services.values_mut() {
                // Fresh services were just built: nothing else holds them now.
                let Some(svc) = Arc::get_mut(svc) else { continue };
                if let Some(state) = states.get(&svc.config.name) {
                    state.budget.reconfigure(&svc.config.retry.budget);
                    svc.state = state.clone();
                }
                kept_states.insert(svc.config.name.clone(), svc.state.clone());
                for (ep, slot) in svc.config.endpoints.iter().zip(svc.stats.iter_mut()) {
                    let key = endpoint_key(ep);
                    let shared = map.get(&key).cloned().unwrap_or_else(|| slot.clone());
                    *slot = shared.clone();
                    kept.insert(key, shared);
                }
            }
            *map = kept;
            *states = kept_states;
        }
        for (host, name) in host_names {
            if let Some(svc) = table.services.get(&name) {
                table.hosts.insert(host, svc.clone());
            }
        }
        // Revoked members lose their pooled connections at once.
        for name in &table.config.revoked {
            self.pool.close_peer(name, b"revoked");
        }
        let version = table.version;
        self.table.store(Arc::new(table));
        self.changes.send_replace(version);
    }

    /// Statistics of an endpoint of `svc` (fresh ones for an endpoint it does not list).
    fn stats_for(&self, svc: &Service, ep: &EndpointConfig) -> Arc<EndpointStats> {
        svc.stats_of(ep).cloned().unwrap_or_default()
    }

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
        let now = crate::health::now_ms();
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
                && !self.pool.is_down(&eps[i].node)
        });
        let any_usable = (0..n).any(|i| usable.get(i));
        let candidate = |i: usize| if any_usable { usable.get(i) } else { in_subset.get(i) };
        let tried = |i: usize| avoid.iter().any(|a| a.node == eps[i].node && a.address == eps[i].address);
        let any_untried = (0..n).any(|i| candidate(i) && !tried(i));
        let candidate = |i: usize| candidate(i) && (!any_untried || !tried(i));
        let lb = &svc.config.lb;
        if lb.policy == Policy::ConsistentHash {
            if let Some(key) = hash_key_for(lb, ctx) {
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
        self.local_node.as_deref() == Some(ep.node.as_str())
    }

    /// Sends a request to one endpoint of `svc`, locally or through the endpoint's node, once.
    /// The request's headers must already be cleaned of hop-by-hop fields.
    pub async fn forward(
        &self,
        req: Request<Body>,
        table: &Table,
        svc: &Service,
        ep: &EndpointConfig,
    ) -> Result<Response<Body>, ProxyError> {
        self.forward_try(req, table, svc, ep, table.config.timeouts.request).await.map_err(|e| e.error)
    }

    /// One try: circuit breakers, then the endpoint within `per_try`; feeds the balancer and
    /// outlier detection with the result.
    pub async fn forward_try(
        &self,
        req: Request<Body>,
        table: &Table,
        svc: &Service,
        ep: &EndpointConfig,
        per_try: Duration,
    ) -> Result<Response<Body>, TryError> {
        // Circuit breaker: refuse at once rather than queue without bound.
        let Some(_slot) = Slot::take(&svc.state.in_flight, svc.config.max_requests) else {
            metrics::counter!(m::CIRCUIT_OPEN, "service" => svc.config.name.clone(), "limit" => "max_requests")
                .increment(1);
            return Err(TryError::unsent(ProxyError::Overloaded(svc.config.name.clone())));
        };
        // Feed the balancer: requests in flight, and time to response headers.
        let stats = self.stats_for(svc, ep);
        let in_flight = stats.start();
        if !self.is_local(ep) && !self.pool.is_ready(&ep.node) {
            // Connection setup is not the endpoint's latency: have the pooled connection first,
            // as one of a bounded number of requests waiting for one.
            let Some(_pending) = Slot::take(&svc.state.pending, svc.config.max_pending) else {
                metrics::counter!(m::CIRCUIT_OPEN, "service" => svc.config.name.clone(), "limit" => "max_pending")
                    .increment(1);
                return Err(TryError::unsent(ProxyError::Overloaded(svc.config.name.clone())));
            };
            // A peer that cannot be reached fails this try at once, as never sent: the caller
            // retries it elsewhere without a second handshake here.
            if let Err(e) = self.peer(table, ep).await {
                return Err(TryError::unsent(e));
            }
        }
        let local = self.is_local(ep);
        if local {
            // Local delivery skips the inbound side, so the policy is applied here.
            let caller = crate::authz::Caller {
                node: self.local_node.as_deref().unwrap_or_default(),
                service: table.source_service.as_deref(),
                via_gateway: false,
            };
            let target = crate::authz::Target {
                method: Some(req.method()),
                path: Some(req.uri().path()),
                headers: Some(req.headers()),
                port: ep.address.port(),
            };
            if let Err(denied) = self.authorize(table, &svc.config.name, &caller, &target) {
                return Err(TryError::sent(denied));
            }
        }
        // A request body that breaks is the client's doing: the try ends with the client's
        // error at once, whatever the upstream made of the cut request.
        let (parts, body) = req.into_parts();
        let (body, fault) = body::watch_source(body);
        let req = Request::from_parts(parts, body);
        let start = std::time::Instant::now();
        let attempt = async {
            if local {
                match tokio::time::timeout(per_try, self.local.send(req, ep.address, svc.config.protocol)).await {
                    Err(_) => Err(TryError::sent(ProxyError::Timeout(per_try))),
                    Ok(r) => r.map_err(TryError::from),
                }
            } else {
                self.forward_remote(req, table, svc, ep, per_try).await
            }
        };
        let result = if fault.watching() {
            tokio::select! {
                biased;
                r = attempt => r,
                e = fault.failed() => Err(TryError::sent(e)),
            }
        } else {
            attempt.await
        };
        let result = match fault.error() {
            Some(e) => {
                debug!(service = svc.config.name, error = %e, "the client's request body failed");
                return Err(TryError::sent(e));
            }
            None => result,
        };
        // A peer that could not be reached is marked unreachable by the pool and skipped until
        // its probe succeeds: charging its endpoints as slow or ejecting them too would keep
        // them out long after it is back.
        if let Err(TryError {
            error: ProxyError::PeerUnreachable { .. } | ProxyError::ConnectTimeout(_),
            unsent: true,
        }) = &result
        {
            return result;
        }
        // A failure costs like a timeout, so the balancer steers away from it.
        in_flight.observe(if result.is_ok() { start.elapsed() } else { per_try.max(start.elapsed()) });
        let failed = match &result {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => !matches!(e.error, ProxyError::Overloaded(_)),
        };
        if failed {
            let now = crate::health::now_ms();
            let cfg = &svc.config.outlier;
            let may = || {
                let ejected = svc.stats.iter().filter(|s| s.outlier.is_ejected(now)).count();
                crate::health::may_eject(cfg, ejected, svc.stats.len())
            };
            if let Some(span) = stats.outlier.failure(cfg, now, may) {
                metrics::counter!(m::OUTLIER_EJECTIONS, "service" => svc.config.name.clone()).increment(1);
                warn!(service = svc.config.name, node = ep.node, address = %ep.address, ?span, "endpoint ejected after consecutive failures");
            }
        } else {
            stats.outlier.success();
        }
        result
    }

    async fn peer(&self, table: &Table, ep: &EndpointConfig) -> Result<(PeerConn, SocketAddr), ProxyError> {
        // Never dial a revoked member, whatever still names it (a mirror, a request that
        // picked its endpoint under the previous table).
        if table.is_revoked(&ep.node) {
            return Err(ProxyError::PeerUnreachable {
                peer: ep.node.clone(),
                reason: "its membership is revoked".into(),
            });
        }
        let peer = table.config.peer(&ep.node).ok_or_else(|| ProxyError::PeerUnreachable {
            peer: ep.node.clone(),
            reason: "node has no address in config".into(),
        })?;
        Ok((self.pool.get(&peer.name, peer.address).await?, peer.address))
    }

    async fn forward_remote(
        &self,
        req: Request<Body>,
        table: &Table,
        svc: &Service,
        ep: &EndpointConfig,
        per_try: Duration,
    ) -> Result<Response<Body>, TryError> {
        let (parts, body) = req.into_parts();
        let authority = headers::authority(&parts.uri, &parts.headers).unwrap_or_else(|| svc.config.name.clone());
        let uri = headers::absolute_uri(http::uri::Scheme::HTTPS, authority, &parts.uri)
            .map_err(|e| TryError::unsent(ProxyError::BadRequest(format!("target: {e}"))))?;
        let mut hdrs = parts.headers;
        hdrs.remove(HOST);
        // Both values from one allocation, shared by the copies `head` makes.
        // An address takes at most 47 bytes ([v6 with scope]:port).
        let mut scratch = headers::Scratch::with_capacity(svc.config.name.len() + 47);
        let service = scratch.text(&svc.config.name);
        let endpoint = scratch.value(|b| headers::push_socket_addr(b, ep.address));
        let (Some(service), Some(endpoint)) = (service, endpoint) else {
            let bad = format!("unusable service name {:?}", svc.config.name);
            return Err(TryError::unsent(ProxyError::BadRequest(bad)));
        };
        hdrs.insert(headers::SERVICE, service);
        hdrs.insert(headers::ENDPOINT, endpoint);
        let head = |method: &Method| {
            let mut r = Request::new(());
            *r.method_mut() = method.clone();
            *r.uri_mut() = uri.clone();
            *r.headers_mut() = hdrs.clone();
            r
        };
        // A request that found its pooled connection dead is replayed once on a fresh one when
        // that is safe: idempotent and bodiless, so nothing can have been consumed upstream.
        if body.is_end_stream() && idempotent(&parts.method) {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.send_bodiless(table, head(&parts.method), ep, per_try).await {
                    Err(TryError { error: ProxyError::PeerUnreachable { reason, .. }, .. }) if attempt == 1 => {
                        debug!(peer = ep.node, reason, "pooled connection was dead; replaying on a fresh one");
                    }
                    other => return other,
                }
            }
        }
        // With a body, only the stream opening may be repeated: the body is not consumed yet.
        let (pc, stream) = match self.open_stream(table, head(&parts.method), ep).await {
            Err(TryError { error: ProxyError::PeerUnreachable { .. }, .. }) => {
                self.open_stream(table, head(&parts.method), ep).await?
            }
            other => other?,
        };
        let (mut send, recv) = stream.split();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                res = body::pump_to_h3(body, &mut send) => {
                    if let Err(e) = res {
                        debug!(error = %e, "request body upload ended early");
                    }
                }
                _ = cancel_rx => send.reset(),
            }
        });
        // The upload runs on past the response headers (full duplex) until the response body is
        // dropped; dropping `cancel_tx` then resets an unfinished upload.
        let resp = self.await_recv(recv, ep, &pc, per_try).await?;
        Ok(resp.map(|b| body::with_guard(b, cancel_tx)))
    }

    /// Opens a request stream on the pooled connection; a dead or closing connection is
    /// evicted. Nothing reached the peer when this fails.
    async fn open_stream(
        &self,
        table: &Table,
        head: Request<()>,
        ep: &EndpointConfig,
    ) -> Result<(PeerConn, RequestStream), TryError> {
        let (pc, _) = self.peer(table, ep).await.map_err(TryError::unsent)?;
        let mut sender = pc.h3.clone();
        match sender.send_request(head).await {
            Ok(s) => {
                pc.streams.increment(1);
                Ok((pc, s))
            }
            Err(e) => {
                self.pool.evict(&ep.node, &pc.conn).await;
                Err(TryError::unsent(ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() }))
            }
        }
    }

    async fn send_bodiless(
        &self,
        table: &Table,
        head: Request<()>,
        ep: &EndpointConfig,
        per_try: Duration,
    ) -> Result<Response<Body>, TryError> {
        let (pc, mut stream) = self.open_stream(table, head, ep).await?;
        if let Err(e) = stream.finish().await {
            self.pool.evict(&ep.node, &pc.conn).await;
            let unsent = rejected(&e);
            let error = ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() };
            return Err(TryError { error, unsent });
        }
        let (_send, recv) = stream.split();
        self.await_recv(recv, ep, &pc, per_try).await
    }

    async fn await_recv(
        &self,
        mut recv: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
        ep: &EndpointConfig,
        pc: &PeerConn,
        per_try: Duration,
    ) -> Result<Response<Body>, TryError> {
        let head = match tokio::time::timeout(per_try, recv.recv_response()).await {
            // Dropping `recv` stops the stream (h3-quinn panics on an explicit stop_sending
            // after a cancelled read, so never call it here).
            Err(_) => return Err(TryError::sent(ProxyError::Timeout(per_try))),
            // Refused before processing (the peer is draining): safe to send elsewhere.
            Ok(Err(e)) if rejected(&e) => {
                return Err(TryError::unsent(ProxyError::PeerUnreachable {
                    peer: ep.node.clone(),
                    reason: "request refused by a draining peer".into(),
                }))
            }
            Ok(Err(e)) if is_connection_error(&e) => {
                self.pool.evict(&ep.node, &pc.conn).await;
                return Err(TryError::sent(ProxyError::PeerUnreachable {
                    peer: ep.node.clone(),
                    reason: e.to_string(),
                }));
            }
            Ok(Err(e)) => return Err(TryError::sent(ProxyError::UpstreamReset(e.to_string()))),
            Ok(Ok(head)) => head,
        };
        let (mut parts, ()) = head.into_parts();
        parts.version = http::Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body::boxed(H3Body::new(recv))))
    }

    /// Sends copies of a request to `mirrors` and returns the body to forward. A body is copied
    /// when it is empty or declares at most [`MIRROR_MAX_BODY`] bytes (it is buffered for the
    /// copy); larger ones are not mirrored.
    pub async fn mirror_request(
        self: &Arc<Self>,
        table: &Arc<Table>,
        parts: &http::request::Parts,
        body: Body,
        mirrors: &[&crate::route::BackendRef],
    ) -> Result<Body, ProxyError> {
        if mirrors.is_empty() {
            return Ok(body);
        }
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !body.is_end_stream() && declared.is_none_or(|n| n > MIRROR_MAX_BODY) {
            debug!("request body too large to mirror; not mirrored");
            return Ok(body);
        }
        // Collected by hand: small by the check above, and bounded again here.
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let frame = frame.map_err(|e| ProxyError::BadRequest(format!("request body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if (buf.len() + data.len()) as u64 > MIRROR_MAX_BODY {
                    return Err(ProxyError::BodyTooLarge(MIRROR_MAX_BODY));
                }
                buf.extend_from_slice(data);
            }
        }
        let bytes = buf.freeze();
        for m in mirrors {
            self.spawn_mirror(table.clone(), parts, bytes.clone(), m);
        }
        Ok(body::full(bytes))
    }

    /// Sends a copy of a request to a mirror backend and forgets it: the caller never waits for
    /// it, and a slow or dead mirror costs the original request nothing.
    pub fn spawn_mirror(
        self: &Arc<Self>,
        table: Arc<Table>,
        head: &http::request::Parts,
        body: Bytes,
        backend: &crate::route::BackendRef,
    ) {
        let Some(svc) = table.service(&backend.name).cloned() else {
            debug!(service = backend.name, "mirror backend unknown; copy dropped");
            return;
        };
        let mut req = Request::new(body::full(body));
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.headers_mut() = head.headers.clone();
        let labels = backend.labels.clone();
        let mesh = self.clone();
        tokio::spawn(async move {
            let Ok(ep) = mesh.pick(&svc, &labels, &PickCtx::NONE) else { return };
            match tokio::time::timeout(MIRROR_TIMEOUT, mesh.forward(req, &table, &svc, &ep)).await {
                Ok(Ok(resp)) => {
                    // Drain so pooled connections stay reusable; the answer is discarded.
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
                Ok(Err(e)) => debug!(service = svc.config.name, error = %e, "mirror copy failed"),
                Err(_) => debug!(service = svc.config.name, "mirror copy timed out"),
            }
        });
    }

    /// Opens an opaque byte stream to a TCP endpoint through its node (HTTP/3 CONNECT).
    pub async fn connect_tcp(
        &self,
        table: &Table,
        svc: &Service,
        ep: &EndpointConfig,
    ) -> Result<RequestStream, ProxyError> {
        let (pc, _) = self.peer(table, ep).await?;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() =
            Uri::try_from(format!("https://{}/", ep.address)).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        req.headers_mut().insert(headers::SERVICE, header_value(&svc.config.name)?);
        req.headers_mut().insert(headers::ENDPOINT, header_value(&ep.address.to_string())?);
        if let Some(source) = &table.source_service {
            req.headers_mut().insert(headers::SOURCE, header_value(source)?);
        }
        let mut sender = pc.h3.clone();
        let mut stream = match sender.send_request(req).await {
            Ok(s) => s,
            Err(e) => {
                self.pool.evict(&ep.node, &pc.conn).await;
                return Err(ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() });
            }
        };
        let timeout = table.config.timeouts.connect;
        let resp = tokio::time::timeout(timeout, stream.recv_response())
            .await
            .map_err(|_| ProxyError::ConnectTimeout(format!("tunnel to {}", ep.address)))?
            .map_err(|e| ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() })?;
        if !resp.status().is_success() {
            let reason =
                resp.headers().get(crate::error::ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("refused");
            return Err(ProxyError::UpstreamUnreachable { addr: ep.address.to_string(), reason: reason.to_string() });
        }
        Ok(stream)
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ProxyError> {
    HeaderValue::from_str(s).map_err(|_| ProxyError::BadRequest(format!("unusable header value {s:?}")))
}

/// Safe to replay per RFC 9110 section 9.2.2.
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The peer refused the request before processing it (RFC 9114 H3_REQUEST_REJECTED), or a
/// GOAWAY had already closed the connection to new requests.
fn rejected(e: &h3::error::StreamError) -> bool {
    match e {
        h3::error::StreamError::RemoteTerminate { code, .. } => *code == h3::error::Code::H3_REQUEST_REJECTED,
        h3::error::StreamError::RemoteClosing { .. } => true,
        _ => false,
    }
}

/// Did an I/O timeout cause `e` (the connector's `connect_timeout`)? Read from the error's
/// sources by type, not from its text.
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cause = err.source();
    }
    false
}

/// A stream error caused by the connection as a whole (so the pooled connection is dead).
fn is_connection_error(e: &h3::error::StreamError) -> bool {
    matches!(e, h3::error::StreamError::ConnectionError { .. })
}

/// Bytes as a body (used by tests and the demo's sample services).
pub fn text(s: impl Into<Bytes>) -> Body {
    body::full(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(lb: &str) -> Mesh {
        let cfg = config(lb);
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        Mesh::new(Arc::new(cfg), Some("a".into()), endpoint)
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
        m.apply(Table::new(config("policy = \"peak_ewma\""), 2));
        let after = m.table();
        let svc2 = after.service("s").unwrap();
        assert_eq!(Arc::as_ptr(svc2.stats_of(&ep).unwrap()), before, "statistics were not carried over");
        assert!(std::ptr::eq(after.service_for_host("s").unwrap().as_ref(), svc2.as_ref()), "hosts lost the service");
    }

    #[test]
    fn circuit_breaker_slots_stop_at_the_limit_and_come_back() {
        let counter = AtomicU64::new(0);
        let a = Slot::take(&counter, Some(2)).unwrap();
        let _b = Slot::take(&counter, Some(2)).unwrap();
        assert!(Slot::take(&counter, Some(2)).is_none(), "a third slot past max 2");
        assert_eq!(counter.load(Ordering::Relaxed), 2, "a refused take gives its slot back");
        drop(a);
        assert!(Slot::take(&counter, Some(2)).is_some());
        assert!(Slot::take(&counter, None).is_some(), "no limit");
    }

    #[tokio::test]
    async fn each_filter_narrows_the_choice_only_when_it_leaves_an_endpoint() {
        // b:10 {zone=x}, a:11 {zone=x, unhealthy}, b:12 {zone=y}; round robin, no locality.
        let text = "[node]\nname = \"a\"\n[[nodes]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n\
             [[services]]\nname = \"s\"\nlb = { policy = \"round_robin\", prefer_local = false }\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:10\"\nlabels = { zone = \"x\" }\n\
             [[services.endpoints]]\nnode = \"a\"\naddress = \"127.0.0.1:11\"\nlabels = { zone = \"x\" }\nhealthy = false\n\
             [[services.endpoints]]\nnode = \"b\"\naddress = \"127.0.0.1:12\"\nlabels = { zone = \"y\" }\n";
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let m = Mesh::new(Arc::new(crate::config::from_toml(text).unwrap()), Some("a".into()), endpoint);
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
            m.apply(Table::new(crate::config::from_toml(&t).unwrap(), 3));
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
        m.apply(Table::new(crate::config::from_toml(&hashed).unwrap(), 4));
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
        m.apply(Table::new(crate::config::from_toml(&sick).unwrap(), 5));
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
}
