//! quicmesh-gateway: the edge. Terminates TLS (HTTP/1.1, HTTP/2) and QUIC (HTTP/3) from
//! external clients on one port number and forwards into the mesh exactly as a node does,
//! through the same pooled QUIC connections (`quicmesh_shared::proxy::mesh`).
#![forbid(unsafe_code)]

pub mod acme;
pub mod conns;
pub mod control;
pub mod dashboard;
pub mod edge;
pub mod h3_edge;
pub mod handler;
pub mod store;
pub mod tls;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_shared::admin::{self, AdminState};
use quicmesh_shared::config::overlay;
use quicmesh_shared::config::{Config, ConfigError};
use quicmesh_shared::identity::tls::ClientAuth;
use quicmesh_shared::identity::{Ca, Credentials, IdentityError};
use quicmesh_shared::proxy::mesh::{Inputs, Mesh};
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry::access_log::AccessLog;
use quicmesh_shared::transport::{self, Bind, TransportError};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the config has no [gateway] section")]
    NoGatewaySection,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("edge TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr} for {key}: {source} (another process holds it? `{key}` sets it)")]
    Listen { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("tracing: {0}")]
    Tracing(String),
}

#[derive(Debug, Clone)]
pub struct GatewayAddrs {
    /// TCP (TLS) and UDP (QUIC) share this port number.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// UDP address of the control listener nodes connect to.
    pub control: SocketAddr,
    /// `gateway.tcp` listeners: (service, address).
    pub tcp: Vec<(String, SocketAddr)>,
    /// `gateway.listeners` (and listener sets' as `set/name`): (name, bound address).
    pub listeners: Vec<(String, SocketAddr)>,
}

pub struct Gateway {
    pub addrs: GatewayAddrs,
    mesh_endpoint: quinn::Endpoint,
    edge_endpoints: Vec<quinn::Endpoint>,
    mesh: Arc<Mesh>,
    admin: Arc<AdminState>,
    drain_timeout: std::time::Duration,
    _tasks: JoinSet<()>,
}

/// Binds TCP and UDP on the same port; with port 0, retries until both get the same number.
fn bind_edge(
    key: &'static str,
    addr: SocketAddr,
    quic: quinn::ServerConfig,
) -> Result<(TcpListener, quinn::Endpoint), GatewayError> {
    let err = |source| GatewayError::Listen { key, addr, source };
    for _ in 0..20 {
        let std_tcp = std::net::TcpListener::bind(addr).map_err(err)?;
        let tcp_addr = std_tcp.local_addr().map_err(err)?;
        match transport::edge_endpoint(quic.clone(), tcp_addr) {
            Ok(ep) => {
                std_tcp.set_nonblocking(true).map_err(err)?;
                return Ok((TcpListener::from_std(std_tcp).map_err(err)?, ep));
            }
            Err(e) if addr.port() != 0 => return Err(err(e)),
            Err(_) => continue,
        }
    }
    Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no port free for both TCP and UDP")))
}

/// Starts the gateway: edge listeners, admin, the mesh client and the control plane.
pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
    start_with_files(config, Vec::new()).await
}

/// What a gateway checks before it binds anything; `quicmesh check` runs the same.
pub struct Preflight {
    pub paths: quicmesh_shared::config::TlsPaths,
    pub creds: Credentials,
    pub node_settings: std::collections::BTreeMap<String, overlay::NodeSettings>,
    /// The edge's ports, from its listeners.
    pub ports: Vec<PortPlan>,
    pub admin_token: Option<String>,
    /// `gateway.acme`: the certificates it holds, and what orders more.
    pub acme: Option<Arc<acme::Acme>>,
}

/// One port of the edge: where it binds, its listeners, what it speaks.
pub struct PortPlan {
    /// The listeners' `port`.
    pub key: u16,
    pub bind: SocketAddr,
    /// Its listeners' names (`set/name` for a listener set's).
    pub names: Vec<String>,
    /// Whether the port carries HTTP (HTTP or HTTPS listeners), TLS listeners, HTTP/3 (HTTPS
    /// listeners), or is a TCP listener's.
    pub http: bool,
    pub by_sni: bool,
    pub h3: bool,
    pub tcp: bool,
    /// When the port terminates TLS.
    pub tls: Option<tls::EdgeTls>,
    /// The default listener on `gateway.listen` (redirects keep the bound port).
    pub implicit: bool,
}

fn plan_ports(
    gc: &quicmesh_shared::config::GatewayConfig,
    acme: Option<&Arc<acme::Acme>>,
) -> Result<Vec<PortPlan>, GatewayError> {
    use quicmesh_shared::policy::listener::Protocol;
    let binds = gc.listener_binds().map_err(|reason| {
        GatewayError::Config(ConfigError::Invalid { key: "gateway.listeners".into(), origin: String::new(), reason })
    })?;
    let all = gc.all_listeners();
    let implicit = gc.listeners.is_empty() && gc.listener_sets.is_empty();
    let mut plans = Vec::new();
    for (key, bind) in binds {
        let on: Vec<_> = all.iter().filter(|(_, l)| l.port == key).collect();
        let has = |p: Protocol| on.iter().any(|(_, l)| l.protocol == p);
        let terminates = on.iter().any(|(_, l)| l.terminates());
        plans.push(PortPlan {
            key,
            bind,
            names: on
                .iter()
                .map(|(set, l)| match set {
                    Some(set) => format!("{set}/{}", l.name),
                    None => l.name.clone(),
                })
                .collect(),
            http: has(Protocol::Http) || has(Protocol::Https),
            by_sni: has(Protocol::Tls),
            h3: has(Protocol::Https),
            tcp: has(Protocol::Tcp),
            tls: if terminates { Some(tls::edge_configs(gc, key, acme)?) } else { None },
            implicit,
        });
    }
    Ok(plans)
}

/// Every start-up check of a gateway that needs no socket: its section, the overlays (applied
/// to `config`), its mesh certificate (readable, naming it in this trust domain, not expired),
/// the edge certificates, and the admin token.
pub fn preflight(config: &mut Config) -> Result<Preflight, GatewayError> {
    let gc = config.gateway.clone().ok_or(GatewayError::NoGatewaySection)?;
    let node_settings = match &gc.overlays {
        Some(dir) => {
            overlay::apply_services(config, dir)?;
            overlay::node_settings(config, dir)?
        }
        None => Default::default(),
    };
    let paths = gc.tls.resolve(&gc.name, "gateway")?;
    let creds = Credentials::load_member(&paths, &config.mesh.trust_domain, &gc.name)?;
    let acme = acme::Acme::prepare(&gc)?;
    let ports = plan_ports(&gc, acme.as_ref())?;
    let admin_token = admin::admin_token(gc.admin, gc.admin_token_file.as_deref(), "gateway.admin_token_file")
        .map_err(|reason| {
            GatewayError::Config(ConfigError::Invalid { key: "gateway.admin".into(), origin: String::new(), reason })
        })?;
    Ok(Preflight { paths, creds, node_settings, ports, admin_token, acme })
}

/// Like [`start`], watching `files` (the layers `config` was loaded from) for changes.
pub async fn start_with_files(mut config: Config, files: Vec<PathBuf>) -> Result<Gateway, GatewayError> {
    for warning in config.warnings() {
        warn!("config: {warning}");
    }
    let Preflight { paths, mut creds, node_settings, ports, admin_token, acme } = preflight(&mut config)?;
    let transport_config = config.transport.clone();
    let gc = config.gateway.clone().ok_or(GatewayError::NoGatewaySection)?;
    // Send the CA along: a joining node pins it by fingerprint before it holds it.
    creds.chain.extend(creds.roots.iter().cloned());
    let mesh_endpoint = transport::mesh_endpoint(
        Bind::Addr(gc.control),
        &creds,
        &config.mesh.trust_domain,
        &config.transport,
        Some(ClientAuth::OptionalForEnrollment.into()),
    )
    .map_err(|e| match e {
        TransportError::Bind { addr, source } => GatewayError::Listen { key: "gateway.control", addr, source },
        other => other.into(),
    })?;
    let control_addr = mesh_endpoint.local_addr().map_err(|source| GatewayError::Listen {
        key: "gateway.control",
        addr: gc.control,
        source,
    })?;
    let mut bound = Vec::new();
    for plan in ports {
        let key = if plan.implicit { "gateway.listen" } else { "gateway.listeners[].port" };
        let failed = |source| GatewayError::Listen { key, addr: plan.bind, source };
        let (tcp, endpoint) = match &plan.tls {
            Some(edge_tls) if plan.h3 => {
                let quic = tls::quic_server(edge_tls.quic.clone(), &gc.limits)?;
                let (tcp, ep) = bind_edge(key, plan.bind, quic)?;
                (tcp, Some(ep))
            }
            _ => (TcpListener::bind(plan.bind).await.map_err(failed)?, None),
        };
        let addr = tcp.local_addr().map_err(failed)?;
        bound.push((plan, tcp, endpoint, addr));
    }
    let listen = bound.first().map(|(_, _, _, addr)| *addr).unwrap_or(gc.listen);
    let listeners: Vec<(String, SocketAddr)> = if bound.iter().any(|(p, ..)| p.implicit) {
        Vec::new()
    } else {
        bound.iter().flat_map(|(p, _, _, addr)| p.names.iter().map(move |n| (n.clone(), *addr))).collect()
    };
    let admin_listener = TcpListener::bind(gc.admin).await.map_err(|source| GatewayError::Listen {
        key: "gateway.admin",
        addr: gc.admin,
        source,
    })?;
    let admin_addr = admin_listener.local_addr().map_err(|source| GatewayError::Listen {
        key: "gateway.admin",
        addr: gc.admin,
        source,
    })?;
    let mut tcp_listeners = Vec::new();
    for fwd in &gc.tcp {
        let failed = |source| GatewayError::Listen { key: "gateway.tcp[].listen", addr: fwd.listen, source };
        let listener = TcpListener::bind(fwd.listen).await.map_err(failed)?;
        let addr = listener.local_addr().map_err(failed)?;
        tcp_listeners.push((fwd.service.clone(), addr, listener));
    }
    let trust_domain = config.mesh.trust_domain.clone();
    let access_log = AccessLog::start(&config.access_log).map_err(GatewayError::AccessLog)?.map(Arc::new);
    let tracing = quicmesh_shared::telemetry::trace::Tracing::start(&config.tracing, "gateway", &gc.name)
        .map_err(GatewayError::Tracing)?;
    let client = transport::client_config(&creds, &config.mesh.trust_domain, &config.transport)?;
    let inputs =
        Inputs { local_node: None, endpoint: mesh_endpoint.clone(), client: Some(client), access_log, tracing };
    let mesh = Arc::new(Mesh::new(inputs, Table::compile(config.clone(), 0)?));
    let registry_file = gc.registry_file.clone().or_else(|| gc.tls.state_dir.as_ref().map(|d| d.join("registry.json")));
    let store = gc.store.as_ref().map(|st| Arc::new(store::Store::new(st.etcd.clone(), &st.prefix, gc.node_grace)));
    let cp =
        control::ControlPlane::new(config, node_settings, gc.node_grace, registry_file, mesh.clone(), store.clone());
    cp.set_files(files.clone());
    let mut edge = handler::Edge::new(mesh.clone(), &gc);
    edge.acme = acme.clone();
    let edge = Arc::new(edge);
    let (cp_status, mesh_dump) = (cp.clone(), mesh.clone());
    let extra: Vec<(&'static str, admin::JsonFn)> = vec![
        ("/nodes", Box::new(move || serde_json::to_string(&cp_status.status()).unwrap_or_default())),
        ("/endpoints", Box::new(move || mesh_dump.dump())),
    ];
    let (cp_revoke, cp_tokens, cp_config) = (cp.clone(), cp.clone(), cp.clone());
    let actions: Vec<(&'static str, admin::ActionFn)> = vec![
        (
            "/revoke",
            Box::new(move |params: &[(String, String)], _| {
                let node = params.iter().find(|(k, _)| k == "node").map(|(_, v)| v.clone());
                let cp = cp_revoke.clone();
                Box::pin(async move { cp.revoke(&node.ok_or("give the node as ?node=NAME")?).await })
            }),
        ),
        (
            "/tokens",
            Box::new(move |params: &[(String, String)], _| {
                let (cp, params) = (cp_tokens.clone(), params.to_vec());
                Box::pin(async move { cp.create_token(&params).await })
            }),
        ),
        (
            "/config",
            Box::new(move |_: &[(String, String)], body: bytes::Bytes| {
                let cp = cp_config.clone();
                Box::pin(async move { cp.apply_config(&body).await })
            }),
        ),
    ];
    // Read when asked: the files may have changed (and been reloaded) since the start.
    let (dump_mesh, dump_files, dump_cp) = (mesh.clone(), files.clone(), cp.clone());
    let dump: admin::JsonFn = Box::new(move || {
        let table = dump_mesh.table();
        let sources = quicmesh_shared::config::sources_with(&dump_files, &dump_cp.shared_layers()).ok();
        admin::config_dump(&table.effective_config(), table.version(), sources.as_ref(), false)
    });
    let board = dashboard::Dashboard::new(cp.clone(), mesh.clone(), &gc.name, admin_token.clone());
    let (board_graph, board_tap) = (board.clone(), board);
    let queries: Vec<(&'static str, admin::QueryFn)> = vec![(
        "/dashboard/graph",
        Box::new(move |_: &[(String, String)]| {
            let board = board_graph.clone();
            Box::pin(async move { Ok(board.graph().await) })
        }),
    )];
    let streams: Vec<(&'static str, admin::StreamFn)> =
        vec![("/tap", Box::new(move |params: &[(String, String)]| board_tap.tap(params)))];
    let pages = dashboard::PAGES.to_vec();
    let state = AdminState::with(dump, admin::Pages { extra, actions, queries, streams, pages });
    if let Some(t) = admin_token {
        let _ = state.token.set(t);
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(admin::serve(admin_listener, state.clone()));
    if let Some(acme) = acme {
        tasks.spawn(acme.run(store.clone()));
    }
    let mut edge_endpoints = Vec::new();
    for (plan, tcp, endpoint, addr) in bound {
        if plan.tcp {
            tasks.spawn(edge::serve_tcp(tcp, edge.clone(), plan.key));
            continue;
        }
        let redirect_port = if plan.implicit { addr.port() } else { plan.key };
        let (tcp_tls, certs, clients) = match plan.tls {
            Some(t) => (Some(t.tcp), Some(t.certs), t.clients),
            None => (None, None, None),
        };
        let port = Arc::new(handler::Port::new(
            plan.key,
            redirect_port,
            tcp_tls.is_some() || plan.by_sni,
            endpoint.as_ref().map(|_| addr.port()),
            clients,
        ));
        let at = Arc::new(edge::TcpPort::new(port.clone(), tcp_tls, plan.by_sni, plan.http));
        tasks.spawn(edge::serve(tcp, edge.clone(), at));
        if let Some(ep) = endpoint {
            tasks.spawn(h3_edge::serve(ep.clone(), edge.clone(), port));
            edge_endpoints.push(ep);
        }
        if let Some(certs) = certs {
            tasks.spawn(tls::watch_certificates(gc.clone(), certs));
        }
    }
    let mut tcp = Vec::new();
    for (service, addr, listener) in tcp_listeners {
        // External clients: within the edge's connection limits, as on its other ports.
        let edge = edge.clone();
        let admit = move |client: SocketAddr| edge.admit(client);
        tasks.spawn(quicmesh_shared::proxy::tcp::serve(listener, service.clone(), mesh.clone(), admit));
        tcp.push((service, addr));
    }
    // The gateway's own mesh certificate: reloaded when its files change, renewed from the CA
    // when the CA is in the same state directory.
    let own_ca = gc.tls.state_dir.as_deref().and_then(|dir| Ca::open(dir).ok()).filter(|ca| {
        ca.dir.join(format!("{}.pem", gc.name)) == paths.cert && ca.dir.join(format!("{}.key", gc.name)) == paths.key
    });
    let watch = quicmesh_shared::transport::certwatch::Watch {
        trust_domain: mesh.trust_domain().to_string(),
        install: {
            let mesh = mesh.clone();
            Arc::new(move |client| mesh.pool().set_client_config(client))
        },
        endpoint: mesh_endpoint.clone(),
        paths,
        name: gc.name.clone(),
        transport: transport_config,
        serve: ClientAuth::OptionalForEnrollment.into(),
        send_ca: true,
        ca: own_ca,
    };
    tasks.spawn(watch.run());
    let enroll = gc.tls.state_dir.clone().map(|dir| Arc::new(control::Enroller::new(dir, gc.name.clone(), cp.clone())));
    tasks.spawn(control::serve(mesh_endpoint.clone(), cp.clone(), trust_domain, enroll));
    tasks.spawn(cp.clone().sweep());
    tasks.spawn(cp.clone().publisher());
    tasks.spawn(cp.clone().persister());
    tasks.spawn(cp.clone().follow_store());
    if !files.is_empty() {
        tasks.spawn(watch::watch(files, gc.overlays.clone(), gc.watch_interval, cp));
    }
    state.ready.store(true, Ordering::Release);
    Ok(Gateway {
        addrs: GatewayAddrs { listen, admin: admin_addr, control: control_addr, tcp, listeners },
        mesh_endpoint,
        edge_endpoints,
        mesh,
        admin: state,
        drain_timeout: gc.drain_timeout,
        _tasks: tasks,
    })
}

impl Gateway {
    /// Graceful stop (SIGTERM): not ready any more; refuse new client connections; GOAWAY on
    /// HTTP/2 and HTTP/3 (HTTP/1.1 answers say `Connection: close`, and an idle connection gets
    /// [`LAST_REQUEST_GRACE`](quicmesh_shared::proxy::drain::LAST_REQUEST_GRACE) for one more
    /// request); let requests in flight finish within `gateway.drain_timeout`; then close.
    pub async fn drain(self) {
        let drain = self.mesh.drain().clone();
        metrics::gauge!(quicmesh_shared::telemetry::metrics::DRAINING).set(1.0);
        self.admin.ready.store(false, Ordering::Release);
        info!(in_flight = drain.in_flight(), deadline = ?self.drain_timeout, "draining");
        drain.advance(quicmesh_shared::proxy::drain::Phase::GoingAway);
        drain.settle(self.drain_timeout).await;
        quicmesh_shared::telemetry::trace::flush_off_runtime(self.mesh.tracing()).await;
        self.shutdown().await;
    }

    pub async fn shutdown(self) {
        for ep in &self.edge_endpoints {
            ep.close(0u32.into(), b"gateway shutting down");
        }
        self.mesh_endpoint.close(0u32.into(), b"gateway shutting down");
        let dials = self.mesh.pool().close_worker_endpoints(b"gateway shutting down");
        let idle = async {
            for ep in self.edge_endpoints.iter().chain([&self.mesh_endpoint]).chain(&dials) {
                ep.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
    }
}
