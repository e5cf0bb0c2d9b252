//! The configuration model: serde types, figment layering and validation.
//!
//! One `Config` type serves every component so that mesh-wide files (services, nodes, timeouts)
//! are shared by the gateway and all nodes, while `[node]` and `[gateway]` hold what is specific
//! to one process. Layers, lowest first: built-in defaults, each `--config` file in order, then
//! `QUICMESH_` environment variables with `__` for nesting (`QUICMESH_NODE__NAME=node-a`).

pub mod listener;
pub mod overlay;
pub mod reference;
pub mod watch;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Environment variables with this prefix override config keys.
pub const ENV_PREFIX: &str = "QUICMESH_";
/// `QUICMESH_*` variables that are not config keys (logging is set up before config is read).
const ENV_NOT_CONFIG: &[&str] = &["log", "log_format", "join_token", "admin_token"];

/// The environment as a config layer: `QUICMESH_SECTION__KEY`, less the variables that are not
/// config keys.
fn env_layer() -> Env {
    Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_NOT_CONFIG).filter(|key| !service_link(key.as_str()))
}

/// Whether a `QUICMESH_`-prefixed variable (prefix removed) is one of the variables Kubernetes
/// gives every pod for each Service of its namespace (`<SERVICE>_SERVICE_HOST`,
/// `<SERVICE>_PORT_8443_UDP_ADDR`, ...): a Service named `quicmesh-edge` makes
/// `QUICMESH_EDGE_SERVICE_HOST`. A config key always has a section (`SECTION__KEY`); these have
/// none, so they are never taken for one.
fn service_link(key: &str) -> bool {
    if key.contains('.') || key.contains("__") {
        return false;
    }
    let key = key.to_ascii_lowercase();
    if key.ends_with("_service_host") || key.ends_with("_service_port") || key.contains("_service_port_") {
        return true;
    }
    if key.ends_with("_port") {
        return true;
    }
    // <SERVICE>_PORT_<number>_<protocol>[_PROTO|_PORT|_ADDR]
    key.split("_port_").skip(1).any(|rest| {
        let mut parts = rest.split('_');
        let number = parts.next().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let protocol = parts.next().is_some_and(|p| matches!(p, "tcp" | "udp" | "sctp"));
        let field = parts.next().is_none_or(|f| matches!(f, "proto" | "port" | "addr")) && parts.next().is_none();
        number && protocol && field
    })
}

/// A config that could not be loaded: names the file (when one is to blame), the key and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0}")]
    Parse(String),
    #[error("config file {path} is {size} bytes, more than the limit of {limit}")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("invalid value for key \"{key}\"{origin}: {reason}")]
    Invalid {
        key: String,
        /// `" in FILE"` when the layer that set the key is known, else empty.
        origin: String,
        reason: String,
    },
}

/// The whole configuration of one quicmesh process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Read at start.
    pub mesh: MeshConfig,
    /// Present when this process runs a node proxy.
    pub node: Option<NodeConfig>,
    /// Present when this process runs the gateway.
    pub gateway: Option<GatewayConfig>,
    /// Mesh members and where their QUIC listeners are (static until the control plane lands).
    pub nodes: Vec<PeerConfig>,
    /// Services and their instances.
    pub services: Vec<ServiceConfig>,
    /// Mesh routes (HTTPRoute model) applied by every node's outbound side; hostnames are the
    /// service names or aliases local apps use. Without a matching route, Host names the service.
    pub routes: Vec<crate::policy::route::HttpRoute>,
    /// Mesh GRPCRoutes, applied as the HTTP routes they compile to (after `routes`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc_routes: Vec<crate::policy::grpc_route::GrpcRoute>,
    pub timeouts: Timeouts,
    /// Read at start.
    pub transport: TransportConfig,
    /// Per-request access log of this process. Read at start.
    pub access_log: AccessLogConfig,
    /// Spans of this process's requests, exported over OTLP. Read at start.
    pub tracing: TracingConfig,
    /// Who may call whom (pushed to every node with the snapshots).
    pub authorization: crate::policy::authz::AuthzConfig,
    /// Members every other member refuses (`quicmesh node revoke`; pushed by the control plane).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

/// Mesh-wide identity settings.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// SPIFFE trust domain: identities are `spiffe://<trust_domain>/node/<name>`. Read at start.
    pub trust_domain: String,
    /// Request paths have runs of `/` merged into one before they are matched, authorized and
    /// forwarded (dot segments and unreserved escapes are always resolved). Read at start.
    pub merge_slashes: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self { trust_domain: "quicmesh.local".into(), merge_slashes: false }
    }
}

/// Where a process finds its CA bundle, certificate and key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// Directory written by `quicmesh ca init/issue`; the defaults below are taken from it.
    pub state_dir: Option<PathBuf>,
    /// CA certificate (PEM). Default `<state_dir>/ca.pem`.
    pub ca: Option<PathBuf>,
    /// This member's certificate (PEM). Default `<state_dir>/<name>.pem`.
    pub cert: Option<PathBuf>,
    /// This member's private key (PEM). Default `<state_dir>/<name>.key`.
    pub key: Option<PathBuf>,
}

/// Resolved certificate paths.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Fills the unset paths from `state_dir`; fails naming the first key that cannot be resolved.
    pub fn resolve(&self, name: &str, section: &str) -> Result<TlsPaths, ConfigError> {
        let pick = |explicit: &Option<PathBuf>, file: String, key: &str| {
            explicit.clone().or_else(|| self.state_dir.as_ref().map(|d| d.join(&file))).ok_or_else(|| {
                ConfigError::Invalid {
                    key: format!("{section}.tls.{key}"),
                    origin: String::new(),
                    reason: "not set, and no tls.state_dir to derive it from".into(),
                }
            })
        };
        Ok(TlsPaths {
            ca: pick(&self.ca, "ca.pem".into(), "ca")?,
            cert: pick(&self.cert, format!("{name}.pem"), "cert")?,
            key: pick(&self.key, format!("{name}.key"), "key")?,
        })
    }
}

/// Most concurrent streams a QUIC connection may be configured for (quinn keeps state for each
/// stream it allows up front).
pub const MAX_STREAMS: u32 = 1 << 20;

/// Most runtime threads `node.workers` and `gateway.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// The node proxy of this host.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node name: DNS labels joined by dots, also the last part of its SPIFFE identity. Read at
    /// start.
    pub name: String,
    /// Plain HTTP listener for local apps (HTTP/1.1 and h2c prior knowledge). Read at start.
    pub outbound: SocketAddr,
    /// UDP address of the QUIC listener that peers connect to. Applies on change: the node
    /// moves to a socket on the new address (an address change of its host; the address must
    /// exist, and a wildcard and a specific address cannot take turns on one port); the
    /// connections it opened migrate with it, and the control plane learns the new address.
    pub inbound: SocketAddr,
    /// Admin HTTP listener (`/ready`, `/live`, `/metrics`). Read at start.
    pub admin: SocketAddr,
    /// File holding the bearer token the admin API requires (required when `admin` is not a
    /// loopback address; `QUICMESH_ADMIN_TOKEN` overrides it). Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Read at start.
    pub tls: TlsFiles,
    /// Opaque TCP forwards: a local port carried to a service of protocol `tcp`. Read at start.
    pub tcp: Vec<TcpForward>,
    /// The control plane; unset means services come from static config only. Read at start.
    pub gateway: Option<ControlTarget>,
    /// Address peers use to reach `inbound` (needed when `inbound` is a wildcard address).
    /// Applies on change (registered again with the control plane).
    pub advertise: Option<SocketAddr>,
    /// Instances this node hosts, registered with the control plane.
    /// Applies on change (registered again with the control plane; a static node does not use them).
    pub instances: Vec<Instance>,
    /// Where the last good snapshot is cached. Default `<tls.state_dir>/<name>.snapshot.json`.
    /// Read at start.
    pub snapshot_cache: Option<PathBuf>,
    /// Ask the control plane for a new certificate this long before expiry (default: when a
    /// third of its lifetime is left). Read at start.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub renew_before: Option<Duration>,
    /// On SIGTERM, how long requests in flight (and peers still taking their last answers) may
    /// take to finish before the node exits. Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub drain_timeout: Duration,
    /// Threads that run the proxy, each a single-threaded event loop (as nginx's worker
    /// processes) with accepted connections dealt out among them in turn, and each with its
    /// own pooled connections to peers (dialled, past the first worker, from a UDP socket of
    /// the worker's own on the same address); 0 is one per CPU core. 1, the default, leaves a
    /// core to the host's applications. Read at start.
    pub workers: usize,
    /// A kept-alive connection to a local instance closes once unused for this long: plain
    /// HTTP/1.1 ones are never reused past it and close within a quarter more; h2c and TLS ones
    /// are checked at this interval, so close within about twice it. Keep it below the
    /// instances' own keep-alive timeout. At most a day. Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub instance_idle: Duration,
}

/// An address to reach: `IP:PORT`, or `NAME:PORT` looked up at every attempt, each of the
/// name's address records one more place to try (one DNS name for all gateway replicas).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(addr.into());
        }
        let bad = || format!("{s:?} is not HOST:PORT (an IP address or a DNS name, and a port)");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !name_ok {
            return Err(bad());
        }
        Ok(Self { host: host.to_ascii_lowercase(), port })
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.to_string()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(addr: SocketAddr) -> Self {
        Self { host: addr.ip().to_string(), port: addr.port() }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// Every address it stands for now: itself, or each address record of the name.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let found = tokio::time::timeout(Duration::from_secs(5), lookup)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the name lookup took over 5 s"))??;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for a in found {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        Ok(addrs)
    }
}

/// Where the control plane is.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlTarget {
    /// The gateway's control listener (UDP): `IP:PORT`, or `NAME:PORT` with an address record
    /// per replica.
    pub address: HostPort,
    /// The gateway's mesh name (its certificate identity).
    #[serde(default = "gateway_name")]
    pub name: String,
    /// Other replicas of the same control plane (`[gateway.store]`), tried in turn when the
    /// stream to the current one breaks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<HostPort>,
}

fn gateway_name() -> String {
    "gateway".into()
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            outbound: ([127, 0, 0, 1], 15001).into(),
            inbound: ([0, 0, 0, 0], 15008).into(),
            admin: ([127, 0, 0, 1], 15000).into(),
            admin_token_file: None,
            tls: TlsFiles::default(),
            tcp: Vec::new(),
            gateway: None,
            advertise: None,
            instances: Vec::new(),
            snapshot_cache: None,
            renew_before: None,
            drain_timeout: Duration::from_secs(10),
            workers: 1,
            instance_idle: Duration::from_secs(60),
        }
    }
}

/// A local TCP port whose connections are tunnelled to a service.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpForward {
    /// TCP address this process accepts the connections on (`IP:PORT`).
    pub listen: SocketAddr,
    /// The `protocol = "tcp"` service each connection is carried to, through the mesh, to one
    /// of its instances.
    pub service: String,
}

/// The edge gateway.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Mesh identity of the gateway (`spiffe://<td>/node/<name>`). Read at start.
    pub name: String,
    /// Edge listener: TLS over TCP (h2, http/1.1) and QUIC (h3) on the same port number.
    /// Read at start.
    pub listen: SocketAddr,
    /// Admin HTTP listener. Read at start.
    pub admin: SocketAddr,
    /// As `node.admin_token_file`. Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Mesh certificate of the gateway. Read at start.
    pub tls: TlsFiles,
    /// Edge certificates (PEM), chosen by SNI; empty means a self-signed development certificate.
    /// Read at start: a reload that changes it is refused (a change of the files' contents is
    /// picked up without one).
    pub certificates: Vec<EdgeCertificate>,
    /// Routes in the Gateway API HTTPRoute model (see `route`).
    pub routes: Vec<crate::policy::route::HttpRoute>,
    /// Read at start.
    pub limits: EdgeLimits,
    /// UDP address where nodes hold their control streams (mutual TLS). Read at start.
    pub control: SocketAddr,
    /// How long a node that lost its control stream keeps its endpoints. Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub node_grace: Duration,
    /// How often config files are checked for changes; at least 10ms. Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub watch_interval: Duration,
    /// Where the registry is persisted across restarts. Default `<tls.state_dir>/registry.json`.
    /// Read at start.
    pub registry_file: Option<PathBuf>,
    /// Directory of per-service (`services/<name>.toml`) and per-node (`nodes/<name>.toml`)
    /// overlays, layered over the mesh-wide files; watched like them. Read at start.
    pub overlays: Option<PathBuf>,
    /// On SIGTERM, how long requests in flight (and clients' open HTTP/1.1 and HTTP/2 connections)
    /// may take to finish before the gateway exits.
    /// Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub drain_timeout: Duration,
    /// As `node.workers`; the default, 0, is one thread per CPU core (the edge takes all of a
    /// host's ingress). Read at start.
    pub workers: usize,
    /// Shared state for gateway replicas; unset, this gateway keeps its registry in a file.
    /// Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreConfig>,
    /// TCP listeners forwarded to `protocol = "tcp"` services (the Gateway API's TCPRoute).
    /// Read at start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpForward>,
    /// Client certificates the edge asks for (the Gateway API's frontend validation).
    /// Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend_validation: Option<FrontendValidation>,
    /// The Gateway API's listeners; none means one HTTPS listener on `listen`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<listener::Listener>,
    /// The Gateway API's ListenerSets: more listeners, attached to by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listener_sets: Vec<listener::ListenerSet>,
    /// GRPCRoutes at the edge, applied as the HTTP routes they compile to (after `routes`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc_routes: Vec<crate::policy::grpc_route::GrpcRoute>,
    /// TLSRoutes: TLS connections by server name to `protocol = "tcp"` services.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_routes: Vec<crate::policy::listener::StreamRoute>,
    /// TCPRoutes: a TCP listener's connections to `protocol = "tcp"` services.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<crate::policy::listener::StreamRoute>,
    /// Who may issue the JWTs routes require (a route's `jwt` names one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jwt_providers: Vec<crate::policy::jwt::JwtProvider>,
    /// Edge certificates ordered from an ACME CA (Let's Encrypt, say) and renewed by the gateway.
    /// Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

/// `[gateway.acme]`: automatic edge certificates (RFC 8555). One certificate per hostname,
/// ordered at start when none is held, renewed at two thirds of its lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contacts for the account, e.g. `mailto:ops@example.com` (a bare address gets `mailto:`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Hostnames to certify; empty: every hostname of an HTTPS listener that has no
    /// certificates of its own.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Account key and certificates. Default `<gateway.tls.state_dir>/acme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// PEM file of the root that signs the CA's own HTTPS certificate, when it is not a public
    /// one (a private or test CA such as pebble).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// How the CA checks that this gateway answers for a hostname.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Wait after a failed order, doubled after each failure up to `retry_max`.
    #[serde(default = "acme_retry_initial", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub retry_initial: Duration,
    /// Longest wait after a failed order: the doubling stops here. At least `retry_initial`.
    #[serde(default = "acme_retry_max", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub retry_max: Duration,
}

/// The ACME challenge the gateway answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum AcmeChallenge {
    /// RFC 8737: on the HTTPS port (TCP), the CA connects with ALPN `acme-tls/1`.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// RFC 8555 8.3: the CA fetches `/.well-known/acme-challenge/<token>` over plain HTTP
    /// (port 80 for public CAs: a `protocol = "HTTP"` listener).
    #[serde(rename = "http-01")]
    Http01,
}

fn acme_retry_initial() -> Duration {
    Duration::from_secs(60)
}

fn acme_retry_max() -> Duration {
    Duration::from_secs(6 * 3600)
}

impl GatewayConfig {
    /// The hostnames `gateway.acme` certifies: its own list, or every hostname of an HTTPS
    /// listener without certificates of its own (wildcards left out: they need DNS-01).
    pub fn acme_hostnames(&self) -> Vec<String> {
        let Some(acme) = &self.acme else { return Vec::new() };
        let mut names: Vec<String> = if acme.hostnames.is_empty() {
            self.all_listeners()
                .iter()
                .filter(|(_, l)| l.protocol == crate::policy::listener::Protocol::Https && l.certificates.is_empty())
                .filter_map(|(_, l)| l.hostname.clone())
                .filter(|h| !h.starts_with('*'))
                .collect()
        } else {
            acme.hostnames.clone()
        };
        for n in &mut names {
            n.make_ascii_lowercase();
        }
        names.sort();
        names.dedup();
        names
    }
}

/// `[gateway.store]`: the etcd cluster gateway replicas share their registry through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// etcd client endpoints, `host:port` (plain HTTP: etcd on a trusted network or loopback).
    pub etcd: Vec<String>,
    /// Key prefix of this mesh's state.
    #[serde(default = "store_prefix")]
    pub prefix: String,
}

fn store_prefix() -> String {
    "/quicmesh".into()
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            name: "gateway".into(),
            listen: ([0, 0, 0, 0], 8443).into(),
            admin: ([127, 0, 0, 1], 9901).into(),
            admin_token_file: None,
            tls: TlsFiles::default(),
            certificates: Vec::new(),
            routes: Vec::new(),
            limits: EdgeLimits::default(),
            control: ([0, 0, 0, 0], 15012).into(),
            node_grace: Duration::from_secs(10),
            watch_interval: Duration::from_millis(500),
            registry_file: None,
            overlays: None,
            drain_timeout: Duration::from_secs(10),
            workers: 0,
            store: None,
            tcp: Vec::new(),
            frontend_validation: None,
            listeners: Vec::new(),
            listener_sets: Vec::new(),
            grpc_routes: Vec::new(),
            tls_routes: Vec::new(),
            jwt_providers: Vec::new(),
            tcp_routes: Vec::new(),
            acme: None,
        }
    }
}

/// `[gateway.frontend_validation]`: edge clients present certificates from these CAs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FrontendValidation {
    /// PEM files of the CAs a client certificate must chain to, on every HTTPS port not in
    /// `per_port`; empty: those ports ask for no certificate.
    #[serde(default)]
    pub ca_certificates: Vec<PathBuf>,
    #[serde(default)]
    pub mode: FrontendMode,
    /// Other CAs and mode on some ports (the Gateway API's `tls.frontend.perPort`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_port: Vec<PortValidation>,
}

/// `[[gateway.frontend_validation.per_port]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortValidation {
    /// A listener port.
    pub port: u16,
    /// PEM files of the CAs a client certificate must chain to on this port (at least one).
    pub ca_certificates: Vec<PathBuf>,
    #[serde(default)]
    pub mode: FrontendMode,
}

impl FrontendValidation {
    /// The CAs and mode of listener port `port`; `None`: no client certificates asked there.
    pub fn for_port(&self, port: u16) -> Option<(&[PathBuf], FrontendMode)> {
        match self.per_port.iter().find(|p| p.port == port) {
            Some(p) => Some((&p.ca_certificates, p.mode)),
            None if self.ca_certificates.is_empty() => None,
            None => Some((&self.ca_certificates, self.mode)),
        }
    }
}

/// Whether a client without a valid certificate is let in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum FrontendMode {
    /// The handshake needs a valid client certificate.
    #[default]
    AllowValidOnly,
    /// Any client gets in; only a valid certificate names a subject upstream.
    AllowInsecureFallback,
}

/// One edge certificate and the server names it answers for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeCertificate {
    /// PEM file of the chain served: the certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM file of the certificate's private key (the first key in the file).
    pub key: PathBuf,
    /// SNI names; empty means the names in the certificate.
    #[serde(default)]
    pub hostnames: Vec<String>,
}

/// Protections of the edge listener.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeLimits {
    /// Largest request header block, bytes (431 past it).
    pub max_header_bytes: usize,
    /// Most request headers (431 past it), 1 to 1024.
    pub max_headers: usize,
    /// Time a client has to send its request headers.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub header_read_timeout: Duration,
    /// Idle connection timeout.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection, all usable at once (on QUIC the
    /// advertised limit is about 1/7 higher; see `transport::advertised_streams`).
    pub max_concurrent_streams: u32,
    /// Largest request body, bytes (413 past it); routes may set their own `maxRequestBody`.
    pub max_request_body: u64,
    /// QUIC handshakes in progress past which clients must prove their address with a Retry
    /// first (0: always), so a flood of spoofed Initials keeps no state.
    pub quic_retry_above: usize,
    /// QUIC handshakes in progress at most; past it new attempts are refused.
    pub max_handshakes: usize,
    /// Client connections (TCP and QUIC) open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Client connections open at once from one client address.
    pub max_connections_per_client: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 << 10,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 256,
            max_request_body: 64 << 20,
            quic_retry_above: 64,
            max_handshakes: 4096,
            max_connections: 8192,
            max_connections_per_client: 512,
        }
    }
}

/// A mesh member that accepts QUIC from the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Member name (DNS labels of `a-z0-9-` joined by `.`), unique; its identity is
    /// `spiffe://<trust_domain>/node/<name>`.
    pub name: String,
    /// UDP address of its QUIC listener.
    pub address: SocketAddr,
}

/// How a service's instances speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
    /// Opaque TCP, reached through `node.tcp` forwards.
    Tcp,
}

/// A service and its instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name: one DNS label (`a-z`, `0-9`, `-`), unique; a Host of this name reaches it.
    pub name: String,
    /// Extra Host names that reach this service (the name itself always does).
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Instances listed here; the control plane adds the ones nodes register.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Load balancing (default peak EWMA, local endpoints first).
    #[serde(default)]
    pub lb: crate::policy::balance::LbConfig,
    /// Circuit breaker: requests this proxy may have in flight to the service at once; past it,
    /// 503 `overloaded` at once instead of queueing. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Nodes allowed to register instances of this service with the control plane; empty
    /// means any member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_nodes: Vec<String>,
    /// Circuit breaker: requests that may wait for a connection to the service's endpoints;
    /// past it, 503 `overloaded`. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Retries and their budget.
    #[serde(default, skip_serializing_if = "is_default")]
    pub retry: crate::policy::retry::RetryPolicy,
    /// Passive outlier detection.
    #[serde(default, skip_serializing_if = "is_default")]
    pub outlier: crate::policy::health::OutlierConfig,
    /// The instances speak TLS: the delivering node connects with it and checks their
    /// certificate (the Gateway API's BackendTLSPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<BackendTls>,
}

/// `services[].backend_tls`: how a node checks an instance's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM files of the CAs the instances' certificates chain to, read on the host of the node
    /// that delivers (give absolute paths when the config is pushed to other hosts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<PathBuf>,
    /// `"System"`: the delivering host's CA bundle (`SSL_CERT_FILE`, else the distribution's
    /// file), instead of `ca_certificates`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub well_known_ca_certificates: Option<WellKnownCas>,
    /// The name sent as SNI and, without `subject_alt_names`, that the certificate must be
    /// valid for.
    pub hostname: String,
    /// Names (DNS) or URIs (`spiffe://...`), one of which the certificate must carry, instead
    /// of `hostname` (the Gateway API's `subjectAltNames`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// `backend_tls.well_known_ca_certificates`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum WellKnownCas {
    System,
}

impl ServiceConfig {
    /// A service with this name and every setting at its default.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            hosts: Vec::new(),
            protocol: Protocol::default(),
            endpoints: Vec::new(),
            lb: Default::default(),
            max_requests: None,
            allowed_nodes: Vec::new(),
            max_pending: None,
            retry: Default::default(),
            outlier: Default::default(),
            backend_tls: None,
        }
    }
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One instance of a service: the node that hosts it and its address on that host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The node hosting the instance: a `nodes` entry, or this node itself.
    pub node: String,
    /// Address of the instance on that node's host (`IP:PORT`), where the node delivers to it.
    pub address: SocketAddr,
    /// Labels (`key = value`) by which a route's `backendRefs[].labels` selects endpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// False while the hosting node's health check fails it (set by the control plane);
    /// proxies then send it nothing unless no endpoint is healthy.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub healthy: bool,
}

/// Proxy timeouts (retries and richer policy come later).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to a local instance, or QUIC handshake with a peer node. Read at start.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub connect: Duration,
    /// From sending a request to receiving its response headers.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub request: Duration,
    /// A TCP tunnel (`node.tcp`, `gateway.tcp`, TCP and TLS routes) that carries no byte either
    /// way for this long is closed with a reset at both ends; `0s`: never.
    // Left out of what is sent at its default, so that a node of a release before it still
    // takes the gateway's snapshots (they refuse fields they do not know).
    #[serde(with = "humantime_serde", skip_serializing_if = "is_default_tcp_idle")]
    #[schemars(with = "crate::config::reference::Duration", extend("default" = "1h"))]
    pub tcp_idle: Duration,
}

const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);

impl Timeouts {
    /// `connect` and `request` longer than zero (`tcp_idle` may be: never), none over 10 years:
    /// wherever timeouts come from (the files, a node's overlay, a delta pushed to a node).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect.is_zero() || self.request.is_zero() {
            return Err(invalid("timeouts", "timeouts must be greater than zero"));
        }
        for (key, d) in [
            ("timeouts.connect", self.connect),
            ("timeouts.request", self.request),
            ("timeouts.tcp_idle", self.tcp_idle),
        ] {
            within_max(key, d)?;
        }
        Ok(())
    }
}

fn is_default_tcp_idle(d: &Duration) -> bool {
    *d == DEFAULT_TCP_IDLE
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), request: Duration::from_secs(30), tcp_idle: DEFAULT_TCP_IDLE }
    }
}

/// QUIC tuning between mesh members.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Concurrent request streams a peer may open on one connection.
    pub max_concurrent_streams: u32,
    /// Flow-control window per stream, bytes.
    pub stream_window: u32,
    /// Flow-control window per connection, bytes.
    pub connection_window: u32,
    /// Receive window a member may lend, over all its connections, to streams whose reader has
    /// stopped taking data (a client that does not read its download, an instance that does
    /// not read its upload), bytes. quinn gives a connection's credit back only as data is
    /// read, so what such a stream holds counts against the window every other request on that
    /// connection shares; each stream stalled for about half a second is lent a
    /// `stream_window` of its own instead. Past this budget, a connection whose peer says the
    /// window blocks it stops the streams stalled longest that the loan does not cover (their
    /// clients lose the answers they stopped reading; an upload ends as one its instance
    /// stopped reading always has, 504), counted in `quicmesh_quic_stalled_streams_stopped_total`. 0 lends
    /// nothing: stalled streams are stopped whenever the peer is blocked. Read at start.
    pub stalled_budget: u64,
    /// UDP socket send and receive buffer, bytes.
    pub socket_buffer: usize,
    /// Keep-alive ping interval; a dead peer is noticed after `idle_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub keep_alive: Duration,
    /// A connection on which nothing comes from the peer for this long is closed, and the peer
    /// marked unreachable (requests skip it until a probe reaches it). Longer than `keep_alive`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub idle_timeout: Duration,
    /// Congestion controller of mesh connections: `cubic` (loss-based, as TCP's default),
    /// `bbr` (model-based: paces to the measured bandwidth and does not halve on each loss) or
    /// `newreno`.
    pub congestion: Congestion,
    /// Largest UDP payload a connection's path-MTU discovery probes for, and accepted from
    /// peers, bytes (1200 to 65527). 1452 fits a 1500-byte Ethernet MTU over IPv4 and IPv6;
    /// raise it on jumbo-frame networks (8952 for a 9000-byte MTU) and between members on one
    /// host: fewer, larger datagrams (measured on loopback at 8952: the TCP tunnel's nodes spent
    /// 0.55x the CPU per GiB they spend at 1452).
    /// Probes that get no answer cost nothing but a little time, so a too-high value is safe
    /// for the path; the endpoint's receive buffers grow with it (about 45 times at 65527).
    pub max_udp_payload: u16,
    /// Asks each peer to acknowledge packets within this long (QUIC's ACK-frequency extension,
    /// which quinn peers honour; at least 1ms). A sender notices that the last packets of a
    /// burst were lost only after about one RTT plus this delay, so a short one cuts the tail
    /// latency under loss, for a few more ACK packets (QUIC's own default is 25ms; at 5% loss
    /// 5ms halved the mesh hop's p99 in `cargo bench --bench wan`). 1ms to 25ms (quinn holds a
    /// peer to at most the larger of the RTT and 25ms).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub max_ack_delay: Duration,
    /// 0-RTT between nodes: a node keeps the TLS sessions it issues in its state directory
    /// (`<name>.sessions`, beside its key), and a peer that holds one sends its first requests
    /// with the handshake's first packet instead of one round trip later, also after the node
    /// restarted. Only requests whose methods are safe to replay (GET, HEAD, OPTIONS) go early;
    /// others wait for the handshake, on both sides. A session is used for 0-RTT once, and is
    /// forgotten after a day or when the mesh CA changes. Read at start.
    pub zero_rtt: bool,
    /// How requests between mesh members are framed on their QUIC streams: `lean`
    /// (quicmesh's own framing, ALPN `quicmesh/1`: HTTP/3's request streams without header
    /// compression or control streams; measured 17% fewer instructions and about 5% less CPU
    /// per request for a node pair) or `h3` (HTTP/3). Either way a node accepts both, and two
    /// members speak the one the serving side prefers among those the dialling side offers: a
    /// member set to `h3` offers and prefers HTTP/3, and one of a version before `lean` offers
    /// only HTTP/3. The gateway dials nodes this way too; its edge and its control plane speak
    /// HTTP/3 whatever this says. Read at start.
    pub framing: Framing,
}

/// The framing of requests between members (`transport.framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    #[default]
    Lean,
    H3,
}

/// A QUIC congestion controller (`transport.congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Cubic,
    Bbr,
    NewReno,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 4096,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            stalled_budget: 64 << 20,
            socket_buffer: 4 << 20,
            keep_alive: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(1000),
            congestion: Congestion::Cubic,
            max_udp_payload: 1452,
            max_ack_delay: Duration::from_millis(5),
            zero_rtt: true,
            framing: Framing::Lean,
        }
    }
}

/// Builds the layered figment: defaults, each file in order, then the environment.
pub fn figment(files: &[PathBuf]) -> Result<Figment, ConfigError> {
    figment_with(files, &[])
}

/// A config layer that is not a file: TOML text and a name for messages (the gateway
/// replicas' shared config in etcd, applied by `quicmesh config apply`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Layer {
    pub name: String,
    pub text: String,
}

/// The top-level sections a shared [`Layer`] may set: what every member of the mesh agrees
/// on. The rest (`mesh`, `gateway`, `node`, `transport`, `access_log`, `tracing`) is each
/// process's own.
pub const SHARED_SECTIONS: &[&str] =
    &["services", "routes", "grpc_routes", "timeouts", "authorization", "nodes", "revoked"];

impl Layer {
    /// Refuses a layer that does not parse or sets a section that is not mesh-wide.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Parse(format!("{}: {reason}", self.name));
        if self.text.len() as u64 > MAX_FILE_BYTES {
            return Err(bad(format!("{} bytes, more than the limit of {MAX_FILE_BYTES}", self.text.len())));
        }
        let value = Figment::from(Toml::string(&self.text)).find_value("").map_err(|e| bad(describe(e)))?;
        if let Some(dict) = value.as_dict() {
            if let Some(key) = dict.keys().find(|k| !SHARED_SECTIONS.contains(&k.as_str())) {
                return Err(bad(format!(
                    "`{key}` is each process's own setting; a shared layer sets only {}",
                    SHARED_SECTIONS.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// A [`Layer`] as a figment provider, named in messages and `sources`.
struct Named<'a>(&'a Layer);

impl figment::Provider for Named<'_> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("shared layer {}", self.0.name))
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(&self.0.text).data()
    }
}

/// The layers in order: defaults, `files`, then `layers`, then the environment.
pub fn figment_with(files: &[PathBuf], layers: &[Layer]) -> Result<Figment, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    for file in files {
        if !file.is_file() {
            return Err(ConfigError::Missing(file.clone()));
        }
        // Parsing holds the whole document several times over: refuse a huge one up front.
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge { path: file.clone(), size, limit: MAX_FILE_BYTES });
        }
        fig = fig.merge(Toml::file_exact(file));
    }
    for layer in layers {
        layer.check()?;
        fig = fig.merge(Named(layer));
    }
    let env = env_layer();
    Ok(fig.merge(env))
}

/// Loads and validates the config from files plus environment.
/// Relative paths are taken from the directory of the file that set them (from the working
/// directory when an environment variable did).
pub fn load(files: &[PathBuf]) -> Result<Config, ConfigError> {
    load_with(files, &[])
}

/// As [`load`], with shared layers over the files (under the environment).
pub fn load_with(files: &[PathBuf], layers: &[Layer]) -> Result<Config, ConfigError> {
    let fig = figment_with(files, layers)?;
    let mut config: Config = fig.extract().map_err(|e| ConfigError::Parse(describe(e)))?;
    resolve_paths(&mut config, &fig);
    config.validate().map_err(|e| attach_source(e, &fig))?;
    Ok(config)
}

/// Which layer set each key of the merged config: `file PATH`, `env NAME` or `default`. Tables
/// are followed down to their keys; an array counts as one value (a later layer replaces it
/// whole).
pub fn sources(files: &[PathBuf]) -> Result<BTreeMap<String, String>, ConfigError> {
    sources_with(files, &[])
}

/// As [`sources`], with shared layers over the files.
pub fn sources_with(files: &[PathBuf], layers: &[Layer]) -> Result<BTreeMap<String, String>, ConfigError> {
    let fig = figment_with(files, layers)?;
    let root = fig.find_value("").map_err(|e| ConfigError::Parse(describe(e)))?;
    let mut out = BTreeMap::new();
    walk_sources(&fig, &mut Vec::new(), &root, &mut out);
    Ok(out)
}

fn walk_sources(
    fig: &Figment,
    path: &mut Vec<String>,
    value: &figment::value::Value,
    out: &mut BTreeMap<String, String>,
) {
    if let figment::value::Value::Dict(_, dict) = value {
        if !dict.is_empty() {
            for (k, v) in dict {
                path.push(k.clone());
                walk_sources(fig, path, v, out);
                path.pop();
            }
            return;
        }
    }
    out.insert(path.join("."), layer_of(fig, value, path));
}

/// The layer a value came from, in words.
fn layer_of(fig: &Figment, value: &figment::value::Value, path: &[String]) -> String {
    let Some(meta) = fig.get_metadata(value.tag()) else { return "default".into() };
    match &meta.source {
        Some(figment::Source::File(f)) => format!("file {}", f.display()),
        Some(figment::Source::Code(_)) => "default".into(),
        Some(other) => other.to_string(),
        None if meta.name.contains("environment") => format!("env {ENV_PREFIX}{}", path.join("__").to_uppercase()),
        None => meta.name.to_string(),
    }
}

/// `quicmesh config explain KEY`: the value `files` give `key` (dotted), and the layer that set
/// it; `None` when no layer, not even the defaults, has the key.
pub fn explain(files: &[PathBuf], key: &str) -> Result<Option<(serde_json::Value, String)>, ConfigError> {
    let fig = figment(files)?;
    // Validated as the daemons do, so an explanation is never of a config they would refuse.
    let config = load(files)?;
    let Ok(value) = fig.find_value(key) else {
        // Not in any layer: a default of a section a file opened (`[node]` fills the rest).
        let pointer = format!("/{}", key.replace('.', "/"));
        let json = serde_json::to_value(&config).unwrap_or_default();
        return Ok(json.pointer(&pointer).map(|v| (v.clone(), "default".to_string())));
    };
    let parts: Vec<String> = key.split('.').map(str::to_owned).collect();
    let layer = layer_of(&fig, &value, &parts);
    // As the daemon will use it (a relative path resolved), where the config has it.
    let pointer = format!("/{}", key.replace('.', "/"));
    let used = serde_json::to_value(&config).ok().and_then(|j| j.pointer(&pointer).cloned());
    let json = used.unwrap_or_else(|| serde_json::to_value(&value).unwrap_or_default());
    Ok(Some((json, layer)))
}

/// Makes every relative path in `config` relative to the directory of the file that set it.
fn resolve_paths(config: &mut Config, fig: &Figment) {
    use figment::value::Value;
    let dir_of = |value: Option<&Value>| -> Option<PathBuf> {
        let meta = fig.get_metadata(value?.tag())?;
        match meta.source.as_ref()? {
            figment::Source::File(f) => Some(f.parent().map(std::path::Path::to_path_buf).unwrap_or_default()),
            _ => None,
        }
    };
    // The layers merged once: each `find_value` merges (copies) the whole tree again, which for
    // a config of 10 000 endpoints cost megabytes per key looked up.
    let root = fig.find_value("").ok();
    let found = |key: &str| root.as_ref().and_then(|r| r.find_ref(key));
    fn array(value: Option<&Value>) -> &[Value] {
        value.and_then(Value::as_array).unwrap_or_default()
    }
    fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
        value.as_dict().and_then(|d| d.get(name))
    }
    let fix = |path: &mut PathBuf, value: Option<&Value>| {
        if path.is_relative() {
            if let Some(dir) = dir_of(value) {
                *path = dir.join(&*path);
            }
        }
    };
    let fix_opt = |path: &mut Option<PathBuf>, key: &str| {
        if let Some(p) = path.as_mut() {
            fix(p, found(key));
        }
    };
    let fix_tls = |tls: &mut TlsFiles, section: &str| {
        fix_opt(&mut tls.state_dir, &format!("{section}.tls.state_dir"));
        fix_opt(&mut tls.ca, &format!("{section}.tls.ca"));
        fix_opt(&mut tls.cert, &format!("{section}.tls.cert"));
        fix_opt(&mut tls.key, &format!("{section}.tls.key"));
    };
    if let Some(node) = config.node.as_mut() {
        fix_tls(&mut node.tls, "node");
        fix_opt(&mut node.admin_token_file, "node.admin_token_file");
        fix_opt(&mut node.snapshot_cache, "node.snapshot_cache");
    }
    if let Some(gw) = config.gateway.as_mut() {
        fix_tls(&mut gw.tls, "gateway");
        fix_opt(&mut gw.admin_token_file, "gateway.admin_token_file");
        fix_opt(&mut gw.registry_file, "gateway.registry_file");
        fix_opt(&mut gw.overlays, "gateway.overlays");
        // A list of certificates and the figment values they came from.
        let fix_certs = |certs: &mut [EdgeCertificate], values: Option<&Value>| {
            for (cert, value) in certs.iter_mut().zip(array(values)) {
                fix(&mut cert.cert, field(value, "cert"));
                fix(&mut cert.key, field(value, "key"));
            }
        };
        fix_certs(&mut gw.certificates, found("gateway.certificates"));
        for (l, value) in gw.listeners.iter_mut().zip(array(found("gateway.listeners"))) {
            fix_certs(&mut l.certificates, field(value, "certificates"));
        }
        for (set, value) in gw.listener_sets.iter_mut().zip(array(found("gateway.listener_sets"))) {
            for (l, value) in set.listeners.iter_mut().zip(array(field(value, "listeners"))) {
                fix_certs(&mut l.certificates, field(value, "certificates"));
            }
        }
        if let Some(fv) = gw.frontend_validation.as_mut() {
            for (ca, value) in
                fv.ca_certificates.iter_mut().zip(array(found("gateway.frontend_validation.ca_certificates")))
            {
                fix(ca, Some(value));
            }
            for (p, value) in fv.per_port.iter_mut().zip(array(found("gateway.frontend_validation.per_port"))) {
                for (ca, value) in p.ca_certificates.iter_mut().zip(array(field(value, "ca_certificates"))) {
                    fix(ca, Some(value));
                }
            }
        }
    }
    fix_opt(&mut config.access_log.path, "access_log.path");
    for (svc, value) in config.services.iter_mut().zip(array(found("services"))) {
        let Some(tls) = svc.backend_tls.as_mut() else { continue };
        let cas = field(value, "backend_tls").and_then(|v| field(v, "ca_certificates"));
        for (ca, value) in tls.ca_certificates.iter_mut().zip(array(cas)) {
            fix(ca, Some(value));
        }
    }
}

/// Parses one TOML document (used by tests).
pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
    let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
    let config: Config = fig.extract().map_err(|e| ConfigError::Parse(describe(e)))?;
    config.validate()?;
    Ok(config)
}

/// Parses an embedded TOML document with the environment layered on top (the demo).
pub fn from_toml_with_env(text: &str) -> Result<Config, ConfigError> {
    let env = env_layer();
    let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)).merge(env);
    let config: Config = fig.extract().map_err(|e| ConfigError::Parse(describe(e)))?;
    config.validate()?;
    Ok(config)
}

/// figment reports one error per line; keep them all, without the profile prefix.
fn describe(err: figment::Error) -> String {
    let lines: Vec<String> =
        err.into_iter().map(|e| shorten(&e.to_string().replace("key \"default.", "key \""), 512)).collect();
    lines.join("; ")
}

/// `text` cut to about `max` bytes (a parse error can quote a whole 200 KB line).
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// Largest config file read.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Most routes in `routes` and in `gateway.routes` each.
pub const MAX_ROUTES: usize = 10_000;
/// Longest trust domain (as SPIFFE allows).
pub const MAX_TRUST_DOMAIN: usize = 255;

/// Names the file that set a key which failed validation.
fn attach_source(err: ConfigError, fig: &Figment) -> ConfigError {
    match err {
        ConfigError::Invalid { key, origin, reason } if origin.is_empty() => {
            let top = key.split(['.', '[']).next().unwrap_or_default();
            let origin =
                fig.find_metadata(top).and_then(|m| m.source.as_ref().map(|s| format!(" in {s}"))).unwrap_or_default();
            ConfigError::Invalid { key, origin, reason }
        }
        other => other,
    }
}

/// The longest any configured time may be: ten years (`"10y"` as humantime counts them, far
/// past any real use), short enough that adding it, or two of them, to a clock reading cannot
/// overflow, which would panic where it happens.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

/// `d` is at most [`MAX_DURATION`].
pub fn within_max(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d > MAX_DURATION {
        return Err(invalid(
            key,
            format!("{} is longer than the 10 years any time may be", humantime::format_duration(d)),
        ));
    }
    Ok(())
}

/// Most request headers `gateway.limits.max_headers` may allow: the HTTP/1.1 parser sets room
/// aside for that many on every request it reads.
pub const MAX_HEADERS: usize = 1024;

/// A value that fails validation, under its key.
pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    // A reason quoting the bad value is cut short: the value may be megabytes long.
    ConfigError::Invalid { key: shorten(&key.into(), 256), origin: String::new(), reason: shorten(&reason.into(), 512) }
}

/// A name usable as a DNS label and in a SPIFFE path: `[a-z0-9-]`, 1 to 63 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A member's name (a node's or the gateway's): DNS labels joined by dots, at most 253
/// characters, as Kubernetes names its nodes (`ip-10-0-0-5.ec2.internal`); a service name is
/// one label ([`valid_name`]).
pub fn valid_node_name(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(valid_name)
}

impl Config {
    /// Checks what serde cannot: names, references between sections, sane numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mesh.trust_domain.len() > MAX_TRUST_DOMAIN {
            let len = self.mesh.trust_domain.len();
            return Err(invalid("mesh.trust_domain", format!("{len} bytes, longer than {MAX_TRUST_DOMAIN}")));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(invalid("routes", format!("{} routes, more than {MAX_ROUTES}", self.routes.len())));
        }
        if let Some(gw) = self.gateway.as_ref().filter(|gw| gw.routes.len() > MAX_ROUTES) {
            return Err(invalid("gateway.routes", format!("{} routes, more than {MAX_ROUTES}", gw.routes.len())));
        }
        if self.mesh.trust_domain.is_empty()
            || !self.mesh.trust_domain.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(invalid("mesh.trust_domain", format!("{:?} is not a trust domain", self.mesh.trust_domain)));
        }
        let mut peers = HashSet::new();
        for (i, peer) in self.nodes.iter().enumerate() {
            if !valid_node_name(&peer.name) {
                return Err(invalid(
                    format!("nodes[{i}].name"),
                    format!("{:?} is not a valid node name (DNS labels of a-z, 0-9, '-', joined by '.')", peer.name),
                ));
            }
            if !peers.insert(peer.name.as_str()) {
                return Err(invalid(format!("nodes[{i}].name"), format!("node {:?} is listed twice", peer.name)));
            }
        }
        // A Host name must lead to one service: aliases may not repeat, nor name another service.
        let names: HashSet<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        let mut aliases: HashSet<String> = HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            for (j, h) in svc.hosts.iter().enumerate() {
                let h = h.to_ascii_lowercase();
                let other = h != svc.name && names.contains(h.as_str());
                if other || !aliases.insert(h.clone()) {
                    return Err(invalid(
                        format!("services[{i}].hosts[{j}]"),
                        format!("host {h:?} already leads to another service"),
                    ));
                }
            }
        }
        let local = self.node.as_ref().map(|n| n.name.as_str());
        let mut services = HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let key = format!("services[{i}]");
            check_service(&key, svc)?;
            if !services.insert(svc.name.as_str()) {
                return Err(invalid(format!("{key}.name"), format!("service {:?} is listed twice", svc.name)));
            }
            for (j, ep) in svc.endpoints.iter().enumerate() {
                if !peers.contains(ep.node.as_str()) && Some(ep.node.as_str()) != local {
                    return Err(invalid(
                        format!("{key}.endpoints[{j}].node"),
                        format!("node {:?} is not in [[nodes]]", ep.node),
                    ));
                }
            }
        }
        if let Some(node) = &self.node {
            if !valid_node_name(&node.name) {
                return Err(invalid(
                    "node.name",
                    format!("{:?} is not a valid node name (DNS labels of a-z, 0-9, '-', joined by '.')", node.name),
                ));
            }
            if node.workers > MAX_WORKERS {
                return Err(invalid("node.workers", format!("{} is more than {MAX_WORKERS} threads", node.workers)));
            }
            if node.instance_idle.is_zero() || node.instance_idle > Duration::from_secs(86_400) {
                return Err(invalid("node.instance_idle", "must be more than zero and at most 1 day".to_string()));
            }
            for (i, inst) in node.instances.iter().enumerate() {
                if let Some(Err(reason)) = inst.health.as_ref().map(|h| h.validate()) {
                    return Err(invalid(format!("node.instances[{i}].health"), reason));
                }
            }
            for (i, fwd) in node.tcp.iter().enumerate() {
                match self.service(&fwd.service) {
                    // With a control plane the service may arrive later, in a snapshot.
                    None if node.gateway.is_some() => {}
                    None => {
                        return Err(invalid(
                            format!("node.tcp[{i}].service"),
                            format!("unknown service {:?}", fwd.service),
                        ))
                    }
                    Some(s) if s.protocol != Protocol::Tcp => {
                        return Err(invalid(
                            format!("node.tcp[{i}].service"),
                            format!("service {:?} is not protocol \"tcp\"", fwd.service),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(gw) = &self.gateway {
            if !valid_node_name(&gw.name) {
                return Err(invalid(
                    "gateway.name",
                    format!("{:?} is not a valid name (DNS labels of a-z, 0-9, '-', joined by '.')", gw.name),
                ));
            }
            if gw.workers > MAX_WORKERS {
                return Err(invalid("gateway.workers", format!("{} is more than {MAX_WORKERS} threads", gw.workers)));
            }
            for (i, fwd) in gw.tcp.iter().enumerate() {
                // Registered services arrive later, from the nodes: only a declared one is checked.
                if self.service(&fwd.service).is_some_and(|s| s.protocol != Protocol::Tcp) {
                    return Err(invalid(
                        format!("gateway.tcp[{i}].service"),
                        format!("service {:?} is not protocol \"tcp\"", fwd.service),
                    ));
                }
            }
            if let Some(fv) = &gw.frontend_validation {
                if fv.ca_certificates.is_empty() && fv.per_port.is_empty() {
                    return Err(invalid("gateway.frontend_validation.ca_certificates", "name at least one CA file"));
                }
                for (i, p) in fv.per_port.iter().enumerate() {
                    if p.ca_certificates.is_empty() {
                        return Err(invalid(
                            format!("gateway.frontend_validation.per_port[{i}].ca_certificates"),
                            "name at least one CA file",
                        ));
                    }
                    if fv.per_port[..i].iter().any(|q| q.port == p.port) {
                        return Err(invalid(
                            format!("gateway.frontend_validation.per_port[{i}].port"),
                            format!("port {} is listed twice", p.port),
                        ));
                    }
                }
            }
            if gw.limits.max_connections == 0 {
                return Err(invalid("gateway.limits.max_connections", "must be at least 1"));
            }
            if !(1..=MAX_HEADERS).contains(&gw.limits.max_headers) {
                return Err(invalid("gateway.limits.max_headers", format!("must be 1..={MAX_HEADERS}")));
            }
            for (key, d) in [
                ("gateway.limits.header_read_timeout", gw.limits.header_read_timeout),
                ("gateway.limits.idle_timeout", gw.limits.idle_timeout),
            ] {
                if d.is_zero() {
                    return Err(invalid(key, "must be longer than 0s"));
                }
                within_max(key, d)?;
            }
            within_max("gateway.drain_timeout", gw.drain_timeout)?;
            within_max("gateway.node_grace", gw.node_grace)?;
            within_max("gateway.watch_interval", gw.watch_interval)?;
            // Polled that often: none at all would spin.
            if gw.watch_interval < Duration::from_millis(10) {
                return Err(invalid("gateway.watch_interval", "must be at least 10ms"));
            }
            if gw.limits.max_connections_per_client == 0 {
                return Err(invalid("gateway.limits.max_connections_per_client", "must be at least 1"));
            }
            if gw.limits.max_handshakes == 0 {
                return Err(invalid("gateway.limits.max_handshakes", "must be at least 1"));
            }
            if let Some(store) = &gw.store {
                if store.etcd.is_empty() || store.etcd.iter().any(|e| e.is_empty() || e.contains('/')) {
                    return Err(invalid("gateway.store.etcd", "list at least one etcd endpoint as host:port"));
                }
                if !store.prefix.starts_with('/') {
                    return Err(invalid("gateway.store.prefix", "must start with '/'"));
                }
            }
            if !(1..=MAX_STREAMS).contains(&gw.limits.max_concurrent_streams) {
                return Err(invalid("gateway.limits.max_concurrent_streams", format!("must be 1..={MAX_STREAMS}")));
            }
            self.validate_routes(&gw.edge_routes().map_err(|e| invalid("gateway.grpc_routes", e))?, "gateway.routes")?;
            self.validate_listeners(gw)?;
            validate_jwt(gw)?;
            validate_acme(gw)?;
        }
        self.validate_routes(&self.mesh_routes().map_err(|e| invalid("grpc_routes", e))?, "routes")?;
        let t = &self.transport;
        if t.max_concurrent_streams == 0
            || t.max_concurrent_streams > MAX_STREAMS
            || t.stream_window < 16 << 10
            || t.connection_window < t.stream_window
        {
            return Err(invalid(
                "transport",
                format!(
                    "max_concurrent_streams must be 1..={MAX_STREAMS}, stream_window >= 16384 and connection_window >= stream_window"
                ),
            ));
        }
        if t.idle_timeout <= t.keep_alive {
            return Err(invalid("transport.idle_timeout", "must be longer than transport.keep_alive"));
        }
        if t.max_ack_delay < Duration::from_millis(1) || t.max_ack_delay > Duration::from_millis(25) {
            return Err(invalid("transport.max_ack_delay", "must be 1ms to 25ms"));
        }
        if !(1200..=65527).contains(&t.max_udp_payload) {
            return Err(invalid(
                "transport.max_udp_payload",
                format!("{} bytes; QUIC needs 1200 to 65527", t.max_udp_payload),
            ));
        }
        if let Err((key, reason)) = self.authorization.validate() {
            return Err(invalid(key, reason));
        }
        if let Err(reason) = self.access_log.validate() {
            return Err(invalid("access_log", reason));
        }
        if let Err((key, reason)) = self.tracing.validate() {
            return Err(invalid(key, reason));
        }
        self.timeouts.validate()?;
        for (key, d) in [("transport.keep_alive", t.keep_alive), ("transport.idle_timeout", t.idle_timeout)] {
            within_max(key, d)?;
        }
        if let Some(node) = &self.node {
            within_max("node.drain_timeout", node.drain_timeout)?;
            if let Some(r) = node.renew_before {
                within_max("node.renew_before", r)?;
            }
        }
        Ok(())
    }

    /// Routes compile (regexes, filters). A backend naming no service is not an error (see
    /// [`Config::warnings`]): its share of requests answers 500, as the Gateway API says.
    fn validate_routes(&self, routes: &[crate::policy::route::HttpRoute], key: &str) -> Result<(), ConfigError> {
        use crate::policy::listener::ParentKind;
        if key == "routes" {
            for r in routes {
                if r.parent_refs
                    .iter()
                    .any(|p| p.kind != ParentKind::Service || p.name.is_none() || p.section_name.is_some())
                {
                    return Err(invalid(
                        key,
                        format!(
                            "route {:?}: a mesh route's parentRefs name services ({{ kind = \"Service\", name, port }})",
                            r.name
                        ),
                    ));
                }
                if r.jwt.is_some() {
                    return Err(invalid(
                        key,
                        format!(
                            "route {:?}: jwt is for gateway routes (mesh callers are authenticated by mTLS)",
                            r.name
                        ),
                    ));
                }
            }
        }
        if let Err(e) = crate::policy::route::RouteTable::new(routes.to_vec()) {
            return Err(invalid(key, e.to_string()));
        }
        Ok(())
    }

    /// Listeners that work together, routes attach to them, stream routes lead to TCP services.
    fn validate_listeners(&self, gw: &GatewayConfig) -> Result<(), ConfigError> {
        use crate::policy::listener::{valid_section_name, Listeners};
        for (i, set) in gw.listener_sets.iter().enumerate() {
            if !valid_section_name(&set.name) || gw.listener_sets[..i].iter().any(|s| s.name == set.name) {
                return Err(invalid(
                    format!("gateway.listener_sets[{i}].name"),
                    format!("{:?} is not a unique lowercase name", set.name),
                ));
            }
        }
        gw.listener_binds().map_err(|e| invalid("gateway.listeners", e))?;
        for (_, l) in gw.all_listeners() {
            if !l.terminates() && !l.certificates.is_empty() {
                return Err(invalid(
                    "gateway.listeners",
                    format!("listener {:?} does not terminate TLS: it takes no certificates", l.name),
                ));
            }
            if l.protocol != crate::policy::listener::Protocol::Tls && l.tls_mode != listener::TlsMode::Passthrough {
                return Err(invalid(
                    "gateway.listeners",
                    format!("listener {:?}: tls_mode is for TLS listeners", l.name),
                ));
            }
        }
        for (key, routes) in [("gateway.tls_routes", &gw.tls_routes), ("gateway.tcp_routes", &gw.tcp_routes)] {
            for (i, r) in routes.iter().enumerate() {
                if r.backend_refs.is_empty() {
                    return Err(invalid(format!("{key}[{i}].backendRefs"), "name at least one service"));
                }
                if key == "gateway.tcp_routes" && !r.hostnames.is_empty() {
                    return Err(invalid(format!("{key}[{i}].hostnames"), "a TCPRoute has no hostnames"));
                }
                for b in &r.backend_refs {
                    if self.service(&b.name).is_some_and(|s| s.protocol != Protocol::Tcp) {
                        return Err(invalid(
                            format!("{key}[{i}].backendRefs"),
                            format!("service {:?} is not protocol \"tcp\"", b.name),
                        ));
                    }
                }
            }
        }
        use crate::policy::listener::ParentKind;
        if let Some(r) = gw.routes.iter().find(|r| r.parent_refs.iter().any(|p| p.kind == ParentKind::Service)) {
            return Err(invalid(
                "gateway.routes",
                format!("route {:?}: a Service parentRef is for mesh routes ([[routes]])", r.name),
            ));
        }
        let routes = gw.edge_routes().map_err(|e| invalid("gateway.grpc_routes", e))?;
        Listeners::compile(&gw.name, gw.listener_specs(), &routes, &gw.tls_routes, &gw.tcp_routes)
            .map_err(|e| invalid("gateway.listeners", e))?;
        Ok(())
    }

    /// What is accepted but will not work as written: routes whose backends name no service,
    /// gateway routes that attach to no listener (`quicmesh check` and the daemons' logs show
    /// these).
    pub fn warnings(&self) -> Vec<String> {
        let exists = |name: &str| self.service(name).is_some();
        let mut out = unknown_backends(&self.mesh_routes().unwrap_or_default(), "routes", exists);
        if let Some(gw) = &self.gateway {
            let routes = gw.edge_routes().unwrap_or_default();
            out.extend(unknown_backends(&routes, "gateway.routes", exists));
            if let Ok((_, unattached)) = crate::policy::listener::Listeners::compile(
                &gw.name,
                gw.listener_specs(),
                &routes,
                &gw.tls_routes,
                &gw.tcp_routes,
            ) {
                out.extend(unattached);
            }
            for (key, routes) in [("gateway.tls_routes", &gw.tls_routes), ("gateway.tcp_routes", &gw.tcp_routes)] {
                for r in routes {
                    for b in r.backend_refs.iter().filter(|b| !exists(&b.name)) {
                        out.push(format!(
                            "{key}: route {:?} sends to service {:?}, which is not declared (it must register as protocol \"tcp\")",
                            r.name, b.name
                        ));
                    }
                }
            }
        }
        out
    }

    /// The mesh's routes: `routes`, then what `grpc_routes` compile to.
    pub fn mesh_routes(&self) -> Result<Vec<crate::policy::route::HttpRoute>, String> {
        crate::policy::grpc_route::with_grpc(&self.routes, &self.grpc_routes)
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The QUIC address of a peer member.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.nodes.iter().find(|p| p.name == name)
    }
}

/// The backends of `routes` that name no service (`exists`), each as a line naming its key.
pub(crate) fn unknown_backends(
    routes: &[crate::policy::route::HttpRoute],
    key: &str,
    exists: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        for (j, rule) in route.rules.iter().enumerate() {
            for (k, b) in rule.backend_refs.iter().enumerate() {
                if !exists(&b.name) {
                    out.push(format!(
                        "{key}[{i}].rules[{j}].backendRefs[{k}].name: unknown service {:?}; its share of route {:?} answers 500",
                        b.name, route.name
                    ));
                }
            }
        }
    }
    out
}

/// What [`Config::validate`] checks of one service on its own (`key` names it in errors):
/// its name and its policies. Shared with the checks of a control-plane delta.
pub(crate) fn check_service(key: &str, svc: &ServiceConfig) -> Result<(), ConfigError> {
    if !valid_name(&svc.name) {
        return Err(invalid(
            format!("{key}.name"),
            format!("{:?} is not a valid service name (a-z, 0-9, '-')", svc.name),
        ));
    }
    if svc.lb.policy == crate::policy::balance::Policy::ConsistentHash
        && crate::policy::balance::HashOn::parse(&svc.lb.hash_on).is_none()
    {
        return Err(invalid(
            format!("{key}.lb.hash_on"),
            format!("{:?} is not header:<name>, cookie:<name> or client_ip", svc.lb.hash_on),
        ));
    }
    if let Err(reason) = svc.retry.validate() {
        return Err(invalid(format!("{key}.retry"), reason));
    }
    if let Err(reason) = svc.outlier.validate() {
        return Err(invalid(format!("{key}.outlier"), reason));
    }
    if let Some(tls) = &svc.backend_tls {
        if tls.ca_certificates.is_empty() == tls.well_known_ca_certificates.is_none() {
            return Err(invalid(
                format!("{key}.backend_tls.ca_certificates"),
                "name CA files, or well_known_ca_certificates = \"System\", not both",
            ));
        }
        if let Some(bad) = tls
            .subject_alt_names
            .iter()
            .find(|n| !n.contains("://") && rustls::pki_types::ServerName::try_from(n.as_str()).is_err())
        {
            return Err(invalid(
                format!("{key}.backend_tls.subject_alt_names"),
                format!("{bad:?} is neither a host name nor a URI"),
            ));
        }
        if rustls::pki_types::ServerName::try_from(tls.hostname.as_str()).is_err() {
            return Err(invalid(
                format!("{key}.backend_tls.hostname"),
                format!("{:?} is not a host name", tls.hostname),
            ));
        }
        if svc.protocol == Protocol::Tcp {
            return Err(invalid(format!("{key}.backend_tls"), "a tcp service's bytes go as they are"));
        }
    }
    Ok(())
}

/// One service instance a node hosts, as it registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// The service it is an instance of; a service the config does not list is created, with
    /// this `protocol`.
    pub service: String,
    /// Address of the instance on the node's host.
    pub address: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// Labels (`key = value`) by which a route's `backendRefs[].labels` selects endpoints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Active health check the node runs against this instance; unset means always healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::policy::health::HealthCheck>,
}

/// `[tracing]`: one span per request per proxy (the gateway's ingress, a node's outbound and
/// inbound sides), exported in batches over OTLP (HTTP/protobuf) to a collector.
#[derive(Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL, such as `http://127.0.0.1:4318/v1/traces`; unset,
    /// nothing is exported. Plain `http://` only (run the collector beside the proxy, or on a
    /// trusted network).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of the traces that start at this proxy (a request without a valid `traceparent`)
    /// that are sampled, 0 to 1, decided from the trace id (the same everywhere). A caller's
    /// decision (the `traceparent`'s sampled flag) is always kept: parent-based sampling.
    pub sampling: f64,
    /// Spans waiting for export at most; past it, new spans are dropped (and counted), so a
    /// collector that is away costs bounded memory.
    pub max_queue: usize,
    /// Spans per export request at most.
    pub batch_size: usize,
    /// How often waiting spans are exported (sooner when a batch fills).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub export_interval: std::time::Duration,
    /// How long one export request may take.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub export_timeout: std::time::Duration,
    /// Extra HTTP headers on export requests (a collector's API key, say). Their values are
    /// never logged nor shown by `/config_dump`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty", serialize_with = "redacted")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Header values as `<redacted>`: the names say what is set, the values stay secret.
fn redacted<S: serde::Serializer>(
    headers: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(headers.len()))?;
    for k in headers.keys() {
        map.serialize_entry(k, "<redacted>")?;
    }
    map.end()
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling: 1.0,
            max_queue: 2048,
            batch_size: 512,
            export_interval: std::time::Duration::from_secs(5),
            export_timeout: std::time::Duration::from_secs(10),
            headers: Default::default(),
        }
    }
}

/// As the config dump shows it: header values hidden.
impl std::fmt::Debug for TracingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracingConfig")
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("sampling", &self.sampling)
            .field("max_queue", &self.max_queue)
            .field("batch_size", &self.batch_size)
            .field("export_interval", &self.export_interval)
            .field("export_timeout", &self.export_timeout)
            .field("headers", &self.headers.keys().map(|k| (k, "<redacted>")).collect::<Vec<_>>())
            .finish()
    }
}

impl TracingConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = &self.otlp_endpoint {
            let uri: http::Uri = url.parse().map_err(|e| ("tracing.otlp_endpoint", format!("{url:?}: {e}")))?;
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                // Said without the URL: it holds a secret.
                return Err((
                    "tracing.otlp_endpoint",
                    "credentials in the URL are not accepted (they would be logged): put them in tracing.headers"
                        .into(),
                ));
            }
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err((
                    "tracing.otlp_endpoint",
                    format!("{url:?}: give an http:// URL with a host (https is not supported yet)"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(("tracing.sampling", format!("{} is not between 0 and 1", self.sampling)));
        }
        if self.max_queue == 0 || self.batch_size == 0 || self.batch_size > self.max_queue {
            return Err((
                "tracing.batch_size",
                "batch_size and max_queue must be at least 1, batch_size at most max_queue".into(),
            ));
        }
        if self.export_interval.is_zero() || self.export_timeout.is_zero() {
            return Err((
                "tracing.export_interval",
                "export_interval and export_timeout must be greater than zero".into(),
            ));
        }
        for (k, v) in &self.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
                // The value is a secret: only the name is told.
                return Err(("tracing.headers", format!("{k:?} is not a valid header (name or value)")));
            }
        }
        Ok(())
    }
}

/// `[access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Where lines go, one per request and per TCP tunnel when it completes: `off` (no log),
    /// `stdout`, or `file` (appended to `path`).
    pub output: Output,
    /// The file for `output = "file"` (appended to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `json` (one JSON object per line) or `text` (`key=value` pairs separated by spaces).
    pub format: Format,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// No access log.
    #[default]
    Off,
    /// Standard output.
    Stdout,
    /// The file `path`, appended to.
    File,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs separated by spaces; an empty value is written `-`.
    Text,
}

impl AccessLogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.output == Output::File && self.path.is_none() {
            return Err("output = \"file\" needs a path".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// `gateway.acme`: a directory URL over HTTPS, hostnames to certify (no wildcards: TLS-ALPN-01
/// and HTTP-01 cannot prove them), and an HTTP listener when the challenge is HTTP-01.
fn validate_acme(gw: &GatewayConfig) -> Result<(), ConfigError> {
    let Some(acme) = &gw.acme else { return Ok(()) };
    if !acme.directory.starts_with("https://") || acme.directory.parse::<http::Uri>().is_err() {
        return Err(invalid("gateway.acme.directory", format!("{:?} is not an https:// URL", acme.directory)));
    }
    let names = gw.acme_hostnames();
    if names.is_empty() {
        return Err(invalid(
            "gateway.acme.hostnames",
            "nothing to certify: list the hostnames, or give HTTPS listeners a hostname",
        ));
    }
    for name in &names {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !ok {
            return Err(invalid("gateway.acme.hostnames", format!("{name:?} is not a DNS name ACME can certify")));
        }
    }
    if acme.state_dir.is_none() && gw.tls.state_dir.is_none() {
        return Err(invalid("gateway.acme.state_dir", "set it, or gateway.tls.state_dir (the default is its acme/)"));
    }
    if acme.challenge == AcmeChallenge::Http01
        && !gw.all_listeners().iter().any(|(_, l)| l.protocol == crate::policy::listener::Protocol::Http)
    {
        return Err(invalid(
            "gateway.acme.challenge",
            "http-01 is answered on a plain-HTTP listener and the gateway has none",
        ));
    }
    if acme.retry_initial.is_zero() || acme.retry_max < acme.retry_initial {
        return Err(invalid("gateway.acme.retry_initial", "must be above zero and at most retry_max"));
    }
    Ok(())
}

/// JWT providers that load, routes that name one of them; mesh routes take none (their callers
/// are mesh members, authenticated by mTLS).
fn validate_jwt(gw: &GatewayConfig) -> Result<(), ConfigError> {
    for (i, p) in gw.jwt_providers.iter().enumerate() {
        let key = format!("gateway.jwt_providers[{i}]");
        if gw.jwt_providers[..i].iter().any(|q| q.name == p.name) {
            return Err(invalid(format!("{key}.name"), format!("{:?} is named twice", p.name)));
        }
        crate::proxy::jwt::Verifier::new(p).map_err(|e| invalid(&key, e))?;
    }
    for (i, r) in gw.routes.iter().enumerate() {
        if let Some(name) = &r.jwt {
            if !gw.jwt_providers.iter().any(|p| &p.name == name) {
                return Err(invalid(
                    format!("gateway.routes[{i}].jwt"),
                    format!("no gateway.jwt_providers entry is named {name:?}"),
                ));
            }
        }
    }
    Ok(())
}
