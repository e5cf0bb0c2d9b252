//! quicmesh-node: the per-host proxy. Local apps talk plain HTTP or TCP to it; it carries their
//! traffic over one mutually authenticated QUIC connection per peer node, and delivers what
//! peers send to the instances on this host.
#![forbid(unsafe_code)]

pub mod control;
pub mod enroll;
pub mod health;
pub mod inbound;
pub mod outbound;
pub mod peer;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_shared::admin::{self, AdminState};
use quicmesh_shared::config::watch::FileWatch;
use quicmesh_shared::config::{Config, ConfigError, ControlTarget, NodeConfig, TlsPaths};
use quicmesh_shared::identity::tls::ClientAuth;
use quicmesh_shared::identity::{Credentials, IdentityError};
use quicmesh_shared::proxy::drain::Phase;
use quicmesh_shared::proxy::mesh::{Inputs, Mesh};
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry::access_log::AccessLog;
use quicmesh_shared::telemetry::tap;
use quicmesh_shared::transport::{self, Bind, TransportError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the config has no [node] section")]
    NoNodeSection,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot listen on {addr} for {key}: {source} (another process holds it? `{key}` sets it)")]
    Listen { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("tracing: {0}")]
    Tracing(String),
    #[error(
        "node {0} has nothing to serve: its config lists no [[services]] and names no control plane; \
         add [node.gateway] (or start it with --join) to take them from a gateway, or list the services"
    )]
    NothingToServe(String),
}

/// Addresses a running node actually bound (port 0 in config becomes a real port here).
#[derive(Debug, Clone)]
pub struct NodeAddrs {
    pub name: String,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// (service, local address) of each TCP forward.
    pub tcp: Vec<(String, SocketAddr)>,
}

/// A running node; dropping it stops every task.
pub struct Node {
    pub addrs: NodeAddrs,
    pub mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    control_task: Option<tokio::task::JoinHandle<()>>,
    instances_tx: Option<watch::Sender<Vec<quicmesh_shared::control::Instance>>>,
    advertise_tx: Option<watch::Sender<SocketAddr>>,
    admin: Arc<AdminState>,
    drain_timeout: Duration,
    /// Which layer set each key, for `/config_dump` (known when started from files).
    sources: Arc<std::sync::OnceLock<std::collections::BTreeMap<String, String>>>,
    _tasks: JoinSet<()>,
}

async fn listen(key: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|source| NodeError::Listen { key, addr, source })
}

/// A UDP bind failure names the setting, as a TCP one does.
fn bind_error(key: &'static str) -> impl FnOnce(TransportError) -> NodeError {
    move |e| match e {
        TransportError::Bind { addr, source } => NodeError::Listen { key, addr, source },
        other => other.into(),
    }
}

/// Binds every listener of the node, starts serving, and returns the bound addresses.
pub async fn start(config: Config) -> Result<Node, NodeError> {
    start_with(config, None).await
}

/// Like [`start`], watching `files` (the layers `config` came from) so that changes to
/// `node.instances` re-register with the control plane, and changes to `node.inbound` and
/// `node.advertise` move the node to its new address, without a restart.
pub async fn start_with_files(config: Config, files: Vec<std::path::PathBuf>) -> Result<Node, NodeError> {
    for warning in config.warnings() {
        warn!("config: {warning}");
    }
    let config_inbound = config.node.as_ref().map(|n| n.inbound);
    let mut node = start_with(config, None).await?;
    match quicmesh_shared::config::sources(&files) {
        Ok(s) => {
            let _ = node.sources.set(s);
        }
        Err(e) => warn!("cannot tell which layer set each key: {e}"),
    }
    let list = files.clone();
    // Watched from this call on (see `FileWatch`).
    let watch = FileWatch::new(move || list.clone(), Duration::from_millis(500), Duration::from_millis(500));
    let live = Live {
        instances: node.instances_tx.clone(),
        advertise: node.advertise_tx.clone(),
        endpoint: node.endpoint.clone(),
        mesh: node.mesh.clone(),
        inbound: config_inbound.unwrap_or(node.addrs.inbound),
        bound: node.addrs.inbound,
    };
    node._tasks.spawn(apply_on_change(files, live, watch));
    Ok(node)
}

/// What a config change can alter in a running node.
struct Live {
    /// The instances registered with the control plane (None: no control plane).
    instances: Option<watch::Sender<Vec<quicmesh_shared::control::Instance>>>,
    /// The address registered with the control plane (None: no control plane).
    advertise: Option<watch::Sender<SocketAddr>>,
    endpoint: quinn::Endpoint,
    /// Whose workers' own QUIC sockets move with the node's.
    mesh: Arc<Mesh>,
    /// The `node.inbound` the QUIC socket was last bound from (what an edit is compared with,
    /// so an edit whose move failed is tried again by the next one).
    inbound: SocketAddr,
    /// The QUIC socket's address now.
    bound: SocketAddr,
}

impl Live {
    /// Moves the QUIC socket when `node.inbound` changed, then registers the address peers
    /// should use when it changed. A move that fails changes nothing, the registration
    /// included: peers keep the address the node is still on.
    fn readdress(&mut self, after: &NodeConfig, cfg: &Config) {
        if after.inbound != self.inbound {
            match transport::rebind(&self.endpoint, after.inbound, &cfg.transport) {
                Ok(now) => {
                    info!(
                        from = %self.bound,
                        to = %now,
                        "moved the QUIC socket to the new node.inbound; the connections this node opened migrate"
                    );
                    self.inbound = after.inbound;
                    self.bound = now;
                    for e in self.mesh.pool().rebind_workers(now.ip()) {
                        warn!(error = %e, "a worker's QUIC socket cannot move to the new address; the connections it opened end when the old one goes");
                    }
                }
                Err(e) => {
                    warn!(
                        error = %e,
                        "cannot move to the new node.inbound (a wildcard and a specific address cannot take turns on \
                         one port; the address must exist on the host); the node stays on {} and keeps its \
                         registration; the next edit tries again",
                        self.bound
                    );
                    return;
                }
            }
        }
        if let Some(tx) = &self.advertise {
            let address = after.advertise.unwrap_or(self.bound);
            if address.ip().is_unspecified() {
                warn!(%address, "node.inbound is a wildcard address and node.advertise is unset; the registered address is unchanged");
                return;
            }
            tx.send_if_modified(|cur| std::mem::replace(cur, address) != address);
        }
    }
}

/// Polls the config files; a change that loads and validates updates the registered instances
/// and the node's address.
async fn apply_on_change<F: Fn() -> Vec<std::path::PathBuf>>(
    files: Vec<std::path::PathBuf>,
    mut live: Live,
    mut watch: FileWatch<F>,
) {
    // What the node started with (read again: the files are what it was started from).
    let mut last = quicmesh_shared::config::load(&files).ok();
    loop {
        watch.changed().await;
        match quicmesh_shared::config::load(&files) {
            Ok(cfg) => {
                if let Some(before) = &last {
                    let pending = quicmesh_shared::config::reference::changes_needing_restart(before, &cfg);
                    if !pending.is_empty() {
                        warn!(
                            keys = pending.join(", "),
                            "these changed keys are read at start: they keep their running values until the node restarts"
                        );
                    }
                }
                if let Some(node) = &cfg.node {
                    live.readdress(node, &cfg);
                }
                let instances = cfg.node.as_ref().map(|n| n.instances.clone()).unwrap_or_default();
                last = Some(cfg);
                if let Some(tx) = &live.instances {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != instances;
                        *cur = instances;
                        changed
                    });
                }
            }
            Err(e) => warn!(error = %e, "node config change refused; the node carries on as it was"),
        }
    }
}

/// Does any layer of `files` set `mesh.trust_domain`? When none does, the node takes it from
/// its certificate (see [`adopt_trust_domain`]) and learns it at enrollment.
pub fn trust_domain_unset(files: &[std::path::PathBuf]) -> bool {
    quicmesh_shared::config::sources(files)
        .is_ok_and(|s| s.get("mesh.trust_domain").is_none_or(|layer| layer == "default"))
}

/// A node whose config names no trust domain uses the one of its own certificate (issued at
/// enrollment by the gateway it joined), and says so. Returns whether it changed anything.
pub fn adopt_trust_domain(config: &mut Config) -> bool {
    let Some(nc) = config.node.as_ref() else { return false };
    let Ok(paths) = nc.tls.resolve(&nc.name, "node") else { return false };
    match enroll::trust_domain_of(&paths.cert) {
        Some(td) if td != config.mesh.trust_domain => {
            info!(trust_domain = td, cert = %paths.cert.display(), "the config names no mesh.trust_domain: using the one of this node's certificate");
            config.mesh.trust_domain = td;
            true
        }
        _ => false,
    }
}

/// What a node checks before it binds anything; `quicmesh check` runs the same.
pub struct Preflight {
    pub paths: TlsPaths,
    pub creds: Credentials,
    pub admin_token: Option<String>,
    /// The control plane to join: the config's, or the one remembered from an earlier session.
    pub control: Option<ControlTarget>,
    /// How the node will run, in a sentence (logged at start, printed by `check`).
    pub mode: String,
}

/// Every start-up check of a node that needs no socket: its section, its certificate files
/// (readable, naming this node in this trust domain, not expired), the admin token, and
/// something to serve (services, or a control plane to get them from).
pub fn preflight(config: &Config) -> Result<Preflight, NodeError> {
    let nc = config.node.as_ref().ok_or(NodeError::NoNodeSection)?;
    let paths = nc.tls.resolve(&nc.name, "node")?;
    let creds = Credentials::load_member(&paths, &config.mesh.trust_domain, &nc.name)?;
    let admin_token =
        admin::admin_token(nc.admin, nc.admin_token_file.as_deref(), "node.admin_token_file").map_err(|reason| {
            NodeError::Config(ConfigError::Invalid { key: "node.admin".into(), origin: String::new(), reason })
        })?;
    let (control, mode) = match (&nc.gateway, control::remembered(nc)) {
        (Some(target), _) => {
            (Some(target.clone()), format!("joined to the control plane at {} ({})", target.address, target.name))
        }
        (None, Some((target, file))) => {
            let mode = format!(
                "the config names no control plane ([node.gateway]); joining the one this node last used, {} ({}), as kept in {}",
                target.address,
                target.name,
                file.display()
            );
            (Some(target), mode)
        }
        (None, None) if config.services.is_empty() => return Err(NodeError::NothingToServe(nc.name.clone())),
        (None, None) => (
            None,
            format!(
                "static: {} services and {} peers from config, no control plane",
                config.services.len(),
                config.nodes.len()
            ),
        ),
    };
    if control.is_some() && nc.advertise.is_none() && nc.inbound.ip().is_unspecified() {
        return Err(NodeError::Config(ConfigError::Invalid {
            key: "node.advertise".into(),
            origin: String::new(),
            reason: format!("node.inbound is {}; set the address peers should use", nc.inbound),
        }));
    }
    Ok(Preflight { paths, creds, admin_token, control, mode })
}

/// Like [`start`], with the QUIC socket already bound by the caller.
pub async fn start_with(config: Config, inbound: Option<std::net::UdpSocket>) -> Result<Node, NodeError> {
    let Preflight { paths, creds, admin_token, control: control_target, mode } = preflight(&config)?;
    let nc = config.node.clone().ok_or(NodeError::NoNodeSection)?;
    info!(node = nc.name, "{mode}");
    // The TLS sessions this node issues outlive it (next to its key), so that peers resume
    // them in 0-RTT after a restart.
    let sessions = config.transport.zero_rtt.then(|| {
        quicmesh_shared::identity::sessions::SessionStore::open(
            Some(paths.key.with_extension("sessions")),
            &creds.roots,
        )
    });
    let serve = transport::Serve { auth: ClientAuth::Required, sessions, lean: true };
    let endpoint = transport::mesh_endpoint(
        inbound.map_or(Bind::Addr(nc.inbound), Bind::Socket),
        &creds,
        &config.mesh.trust_domain,
        &config.transport,
        Some(serve.clone()),
    )
    .map_err(bind_error("node.inbound"))?;
    let inbound_addr =
        endpoint.local_addr().map_err(|source| NodeError::Listen { key: "node.inbound", addr: nc.inbound, source })?;
    let outbound = listen("node.outbound", nc.outbound).await?;
    let admin_listener = listen("node.admin", nc.admin).await?;
    let mut tcp = Vec::new();
    for fwd in &nc.tcp {
        tcp.push((fwd.service.clone(), listen("node.tcp[].listen", fwd.listen).await?));
    }
    let transport_config = config.transport.clone();
    let local_config = config.clone();
    let access_log = AccessLog::start(&config.access_log).map_err(NodeError::AccessLog)?.map(Arc::new);
    let tracing = quicmesh_shared::telemetry::trace::Tracing::start(&config.tracing, "node", &nc.name)
        .map_err(NodeError::Tracing)?;
    let client = transport::client_config(&creds, &config.mesh.trust_domain, &config.transport)?;
    let inputs = Inputs {
        local_node: Some(nc.name.clone()),
        endpoint: endpoint.clone(),
        client: Some(client),
        access_log,
        tracing,
    };
    let mesh = Arc::new(Mesh::new(inputs, Table::compile(config, 0)?));
    let addrs = NodeAddrs {
        name: nc.name.clone(),
        outbound: outbound.local_addr().map_err(|source| NodeError::Listen {
            key: "node.outbound",
            addr: nc.outbound,
            source,
        })?,
        inbound: inbound_addr,
        admin: admin_listener.local_addr().map_err(|source| NodeError::Listen {
            key: "node.admin",
            addr: nc.admin,
            source,
        })?,
        tcp: tcp.iter().filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.clone(), a))).collect(),
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut control_task = None;
    let mut instances_tx = None;
    let mut advertise_tx = None;
    let mut health_task = None;
    if let Some(target) = control_target {
        let cache = nc
            .snapshot_cache
            .clone()
            .or_else(|| nc.tls.state_dir.as_ref().map(|d| d.join(format!("{}.snapshot.json", nc.name))));
        // Static stability: serve the last good snapshot until the gateway says otherwise.
        if let Some(snap) = cache.as_deref().and_then(control::load_cache) {
            match control::apply(&mesh, &local_config, snap) {
                Ok(()) => info!(version = mesh.table().version(), "serving from the cached snapshot"),
                Err(e) => warn!("cached snapshot unusable: {e}"),
            }
        }
        let (advertise, advertise_rx) = watch::channel(nc.advertise.unwrap_or(inbound_addr));
        advertise_tx = Some(advertise);
        let (tx, rx) = watch::channel(nc.instances.clone());
        instances_tx = Some(tx);
        let (health_tx, health_rx) = watch::channel(Vec::new());
        health_task = Some(health::run(rx.clone(), health_tx, mesh.clone()));
        let client = control::ControlClient {
            mesh: mesh.clone(),
            paths: paths.clone(),
            renew_before: nc.renew_before,
            local: local_config,
            target,
            advertise: advertise_rx,
            admin: addrs.admin,
            instances: rx,
            health: health_rx,
            cache,
            remember: control::remember_path(&nc),
            serve: serve.clone(),
        };
        control_task = Some(tokio::spawn(client.run(shutdown_rx)));
    }
    let endpoints_mesh = mesh.clone();
    let extra: Vec<(&'static str, admin::JsonFn)> = vec![("/endpoints", Box::new(move || endpoints_mesh.dump()))];
    let sources: Arc<std::sync::OnceLock<std::collections::BTreeMap<String, String>>> = Arc::default();
    let (dump_mesh, dump_sources) = (mesh.clone(), sources.clone());
    let joined = control_task.is_some();
    let dump: admin::JsonFn = Box::new(move || {
        let table = dump_mesh.table();
        admin::config_dump(&table.effective_config(), table.version(), dump_sources.get(), joined)
    });
    let tap = mesh.tap().clone();
    let streams: Vec<(&'static str, admin::StreamFn)> = vec![(
        "/tap",
        Box::new(move |params: &[(String, String)]| {
            let filter = tap::Filter::from_query(params)?;
            let tap = tap.clone();
            Ok(tap::sse(filter, |feed, tasks| {
                tasks.spawn(tap::feed_from(tap, feed.clone()));
            }))
        }),
    )];
    let state = AdminState::with(dump, admin::Pages { extra, streams, ..Default::default() });
    if let Some(t) = admin_token {
        let _ = state.token.set(t);
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(admin::serve(admin_listener, state.clone()));
    if let Some(checks) = health_task {
        tasks.spawn(checks);
    }
    if control_task.is_none() {
        // Nobody renews a static node's certificate: its files are watched instead.
        let watch = quicmesh_shared::transport::certwatch::Watch {
            trust_domain: mesh.trust_domain().to_string(),
            install: {
                let mesh = mesh.clone();
                Arc::new(move |client| mesh.pool().set_client_config(client))
            },
            endpoint: endpoint.clone(),
            paths,
            name: nc.name.clone(),
            transport: transport_config,
            serve,
            send_ca: false,
            ca: None,
        };
        tasks.spawn(watch.run());
    }
    tasks.spawn(inbound::serve(endpoint.clone(), mesh.clone()));
    tasks.spawn(outbound::serve(outbound, mesh.clone()));
    for (service, listener) in tcp {
        // Local apps: no per-client limits.
        tasks.spawn(quicmesh_shared::proxy::tcp::serve(listener, service, mesh.clone(), |_| Some(())));
    }
    state.ready.store(true, Ordering::Release);
    Ok(Node {
        addrs,
        mesh,
        endpoint,
        shutdown,
        control_task,
        instances_tx,
        advertise_tx,
        admin: state,
        drain_timeout: nc.drain_timeout,
        sources,
        _tasks: tasks,
    })
}

impl Node {
    /// Registers this set of local instances with the control plane in place of the current
    /// one, as an edit of `node.instances` would. False on a node without a control plane.
    pub fn set_instances(&self, instances: Vec<quicmesh_shared::control::Instance>) -> bool {
        match &self.instances_tx {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    let changed = *cur != instances;
                    *cur = instances;
                    changed
                });
                true
            }
            None => false,
        }
    }

    /// Graceful stop (SIGTERM): not ready any more; deregister so peers stop choosing this
    /// node; GOAWAY to every peer and refuse new connections and local clients; let requests
    /// in flight finish within `node.drain_timeout`; then close.
    pub async fn drain(self) {
        let drain = self.mesh.drain().clone();
        drain.advance(Phase::Draining);
        metrics::gauge!(quicmesh_shared::telemetry::metrics::DRAINING).set(1.0);
        self.admin.ready.store(false, Ordering::Release);
        info!(in_flight = drain.in_flight(), deadline = ?self.drain_timeout, "draining");
        let _ = self.shutdown.send(true);
        if let Some(task) = self.control_task {
            // The goodbye is answered by a snapshot without this node's endpoints.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        drain.advance(Phase::GoingAway);
        drain.settle(self.drain_timeout).await;
        close_endpoints(&self.endpoint, &self.mesh, b"node drained").await;
        quicmesh_shared::telemetry::trace::flush_off_runtime(self.mesh.tracing()).await;
    }

    /// Closes all QUIC connections (peers see it at once) and stops serving.
    pub async fn shutdown(self) {
        // Deregister first, so peers stop choosing this node's endpoints.
        let _ = self.shutdown.send(true);
        if let Some(task) = self.control_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        close_endpoints(&self.endpoint, &self.mesh, b"node shutting down").await;
    }
}

/// Closes the node's QUIC endpoint and its workers' own sockets (peers see each connection
/// end at once), waiting up to two seconds for the closes to be sent.
async fn close_endpoints(endpoint: &quinn::Endpoint, mesh: &Mesh, reason: &[u8]) {
    endpoint.close(0u32.into(), reason);
    let endpoints: Vec<quinn::Endpoint> =
        std::iter::once(endpoint.clone()).chain(mesh.pool().close_worker_endpoints(reason)).collect();
    let idle = async {
        for ep in &endpoints {
            ep.wait_idle().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
}
