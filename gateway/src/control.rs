//! The control plane: the registry of nodes and what they host, the versioned snapshot computed
//! from it and the config files, and the control streams that push it to every node.
//!
//! A node that loses its stream keeps its endpoints for `gateway.node_grace` (so a blip or a
//! gateway restart costs nothing); one that says goodbye loses them at once. The registry is
//! persisted, so a restarted gateway starts from what it knew, with every node inside its grace.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use quicmesh_shared::admin::ActionError;
use quicmesh_shared::config::overlay::NodeSettings;
use quicmesh_shared::config::{valid_name, valid_node_name, Config};
use quicmesh_shared::control::enroll::{self, EnrollRequest, EnrollResponse};
use quicmesh_shared::control::{self, GatewayMsg, LineReader, NodeMsg, Registration, Snapshot};
use quicmesh_shared::identity::tls;
use quicmesh_shared::identity::Ca;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::transport::admission::{self, Admission, Limits};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::store::{Change, Entry, Gone, Issued, SharedConfig, Store, StoreError};

struct NodeState {
    reg: Registration,
    streams: u32,
    disconnected_at: Option<Instant>,
    acked: u64,
    nack: Option<(u64, String)>,
    /// When a renewal was last signed for this node (on any of its control streams).
    last_renewal: Option<Instant>,
}

/// Why a renewal is not signed before the CA is asked.
enum Throttle {
    /// One was signed for the node less than [`RENEWAL_INTERVAL`] ago.
    TooSoon,
    /// The node is revoked, or no longer registered.
    Gone,
}

struct Registry {
    config: Config,
    /// Per-node overlays: settings that differ from the mesh-wide ones.
    node_settings: BTreeMap<String, NodeSettings>,
    nodes: BTreeMap<String, NodeState>,
    current: Arc<Snapshot>,
    /// The deltas between the last published versions, oldest first.
    history: std::collections::VecDeque<Arc<DeltaLine>>,
    /// Members revoked by an operator (persisted beside the registry).
    revoked: std::collections::BTreeSet<String>,
    /// With a store: every replica's registrations, as etcd holds them (`None` until loaded).
    /// Snapshots are built from these instead of this replica's own streams.
    shared: Option<BTreeMap<String, Registration>>,
}

/// A published snapshot. Its whole line is encoded once, the first time a node needs it
/// (most pushes are deltas); the deltas before it are encoded once for every node.
pub struct Published {
    pub version: u64,
    snapshot: Arc<Snapshot>,
    /// The `GatewayMsg::Snapshot` JSON line, newline included.
    line: std::sync::OnceLock<Bytes>,
    /// The line for nodes whose overlay changes their snapshot.
    pub per_node: std::collections::HashMap<String, Bytes>,
    /// The deltas up to this version, oldest first.
    history: Vec<Arc<DeltaLine>>,
    /// [`Snapshot::digest`], computed when a node first brings one to compare.
    digest: std::sync::OnceLock<String>,
}

/// One delta as pushed: a `GatewayMsg::Delta` line from version `from` to `version`.
pub struct DeltaLine {
    from: u64,
    version: u64,
    line: Bytes,
    /// It may change what a node's overlay sets for itself (a config reload, or new
    /// mesh-wide timeouts): nodes with an overlay get their whole line instead.
    overlays: bool,
}

/// How many deltas a published version keeps: a node that fell further behind gets the whole
/// snapshot.
const HISTORY: usize = 64;

impl Published {
    /// The whole snapshot for `node`.
    pub fn line_for(&self, node: &str) -> Bytes {
        if self.version == 0 {
            // Nothing published yet (the first snapshot was refused): nothing to send.
            return Bytes::new();
        }
        if let Some(line) = self.per_node.get(node) {
            return line.clone();
        }
        self.line
            .get_or_init(|| {
                control::encode_line(&GatewayMsg::Snapshot((*self.snapshot).clone())).unwrap_or_else(|e| {
                    warn!("cannot encode snapshot {}: {e}", self.version);
                    Bytes::new()
                })
            })
            .clone()
    }

    /// What to send a node that holds version `held` (`None`: unknown, or it takes no deltas):
    /// the deltas from there when they are all here (and none may change what the node's overlay
    /// sets), the whole snapshot otherwise.
    ///
    /// A node holding a version not numbered here (it was attached to another replica, or
    /// holds this very version) whose contents have `digest`, the digest of this snapshot, gets
    /// an empty delta that only renumbers what it holds.
    pub fn push_for(&self, node: &str, held: Option<u64>, digest: Option<&str>) -> (Bytes, Push) {
        let whole = || (self.line_for(node), Push::Snapshot);
        let Some(held) = held else { return whole() };
        let Some(start) = self.history.iter().position(|d| d.from == held) else {
            let same = digest.is_some_and(|d| self.version != 0 && d == self.digest());
            if same && !self.per_node.contains_key(node) {
                let renumber = control::delta::Delta { from: held, version: self.version, ..Default::default() };
                if let Ok(line) = control::encode_line(&GatewayMsg::Delta(renumber)) {
                    return (line, Push::Delta);
                }
            }
            return whole();
        };
        let chain = &self.history[start..];
        let linked = chain.windows(2).all(|w| w[0].version == w[1].from)
            && chain.last().is_some_and(|d| d.version == self.version);
        let overlaid = self.per_node.contains_key(node) && chain.iter().any(|d| d.overlays);
        if !linked || overlaid {
            return whole();
        }
        if let [one] = chain {
            return (one.line.clone(), Push::Delta);
        }
        let mut joined = bytes::BytesMut::with_capacity(chain.iter().map(|d| d.line.len()).sum());
        for d in chain {
            joined.extend_from_slice(&d.line);
        }
        (joined.freeze(), Push::Delta)
    }

    fn digest(&self) -> &str {
        self.digest.get_or_init(|| self.snapshot.digest())
    }
}

/// What a push to a node carried.
#[derive(Clone, Copy)]
pub enum Push {
    Snapshot,
    Delta,
}

impl Push {
    /// Counts a push of `bytes` bytes.
    fn count(self, bytes: usize) {
        let kind = match self {
            Push::Snapshot => "snapshot",
            Push::Delta => "delta",
        };
        metrics::counter!(m::CONTROL_PUSH_BYTES, "kind" => kind).increment(bytes as u64);
    }
}

/// The revocation list, beside the registry file.
const REVOKED_FILE: &str = "revoked.json";

pub struct ControlPlane {
    inner: Mutex<Registry>,
    tx: watch::Sender<Arc<Published>>,
    dirty: Notify,
    /// The registry as it should be on disk, when that is newer than the file.
    unsaved: Mutex<Option<Persisted>>,
    save: Notify,
    grace: Duration,
    registry_file: Option<PathBuf>,
    /// The gateway's own view, updated with every snapshot.
    mesh: Arc<Mesh>,
    /// The state replicas share (`[gateway.store]`).
    store: Option<Arc<Store>>,
    /// With a store, this replica's versions end in this tag, so a version a node brings from
    /// another replica never matches one of this replica's (see [`ControlPlane::next_version`]).
    tag: u64,
    /// Where the config comes from: the files, and with a store the shared layers over them.
    sources: Mutex<Sources>,
    /// The edge's sockets as bound at start (`GatewayConfig::sockets`).
    sockets: Vec<quicmesh_shared::config::listener::PortSetup>,
}

#[derive(Default)]
struct Sources {
    files: Vec<PathBuf>,
    shared: Option<SharedConfig>,
}

/// A version above any handed out by an earlier run (milliseconds since the epoch).
fn fresh_version() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}

#[derive(Serialize, serde::Deserialize)]
struct Persisted {
    version: u64,
    nodes: BTreeMap<String, Registration>,
}

/// One node as `/nodes` shows it.
#[derive(Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub connected: bool,
    pub address: String,
    pub instances: usize,
    /// Instances failing their health check.
    pub unhealthy: usize,
    /// The node's admin listener, if it reported one.
    pub admin: Option<String>,
    pub acked_version: u64,
    pub last_nack: Option<String>,
}

/// What `/nodes` shows.
#[derive(Serialize)]
pub struct Status {
    pub version: u64,
    pub nodes: Vec<NodeStatus>,
}

impl ControlPlane {
    pub fn new(
        config: Config,
        node_settings: BTreeMap<String, NodeSettings>,
        grace: Duration,
        registry_file: Option<PathBuf>,
        mesh: Arc<Mesh>,
        store: Option<Arc<Store>>,
    ) -> Arc<Self> {
        // Replicas keep their registry in the store, not in a file.
        let registry_file = registry_file.filter(|_| store.is_none());
        let tag = if store.is_some() { 1 + fastrand::u64(..0xffff) } else { 0 };
        let mut nodes = BTreeMap::new();
        let mut version = if store.is_some() { fresh_version() << 16 | tag } else { fresh_version() };
        if let Some(path) = &registry_file {
            match std::fs::read(path).map(|b| serde_json::from_slice::<Persisted>(&b)) {
                Ok(Ok(p)) => {
                    // A corrupt file must not push versions to the end of the range.
                    if p.version < u64::MAX / 2 {
                        version = version.max(p.version.saturating_add(1));
                    }
                    let now = Instant::now();
                    for (name, reg) in p.nodes {
                        let st = NodeState {
                            reg,
                            streams: 0,
                            disconnected_at: Some(now),
                            acked: 0,
                            nack: None,
                            last_renewal: None,
                        };
                        nodes.insert(name, st);
                    }
                    info!(nodes = nodes.len(), "registry restored from {}", path.display());
                }
                Ok(Err(e)) => warn!("ignoring unreadable registry {}: {e}", path.display()),
                Err(_) => {}
            }
        }
        let revoked = registry_file
            .as_ref()
            .and_then(|p| std::fs::read(p.with_file_name(REVOKED_FILE)).ok())
            .and_then(|b| serde_json::from_slice::<std::collections::BTreeSet<String>>(&b).ok())
            .unwrap_or_default();
        if !revoked.is_empty() {
            info!(revoked = ?revoked, "revoked members restored");
        }
        let (tx, _) = watch::channel(Arc::new(Published {
            version: 0,
            snapshot: Arc::default(),
            line: std::sync::OnceLock::new(),
            per_node: Default::default(),
            history: Vec::new(),
            digest: Default::default(),
        }));
        let sockets = config.gateway.as_ref().map(|g| g.sockets()).unwrap_or_default();
        let cp = Arc::new(Self {
            sockets,
            inner: Mutex::new(Registry {
                config,
                node_settings,
                nodes,
                current: Arc::new(Snapshot { version, ..Default::default() }),
                history: Default::default(),
                revoked,
                shared: None,
            }),
            tx,
            dirty: Notify::new(),
            unsaved: Mutex::new(None),
            save: Notify::new(),
            grace,
            registry_file,
            mesh,
            store,
            tag,
            sources: Mutex::default(),
        });
        // A replica publishes nothing before it has read the store: a node must never be sent a
        // mesh without the other replicas' registrations.
        if cp.store.is_none() {
            cp.recompute(true);
        }
        cp
    }

    /// The version after `v`: the next number, or with a store the next number with this
    /// replica's tag in its low 16 bits.
    fn next_version(&self, v: u64) -> u64 {
        if self.store.is_some() {
            ((v >> 16) + 1) << 16 | self.tag
        } else {
            v.saturating_add(1)
        }
    }

    /// Keeps `shared` equal to the registrations in the store: reads them all, then follows
    /// the changes; reads them all again after any break. Runs until dropped.
    pub async fn follow_store(self: Arc<Self>) {
        let Some(store) = self.store.clone() else { return };
        let mut backoff = Duration::from_millis(100);
        loop {
            let loaded = match store.load().await {
                Ok(loaded) => loaded,
                Err(e) => {
                    warn!("cannot read the registry from etcd; serving what this replica holds: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let revision = loaded.revision;
            info!(nodes = loaded.nodes.len(), revoked = loaded.revoked.len(), revision, "registry read from etcd");
            {
                let mut r = self.lock();
                r.shared = Some(loaded.nodes);
                r.revoked = loaded.revoked;
            }
            if self.sources().shared != loaded.config {
                self.adopt(loaded.config);
            } else {
                self.recompute(true);
            }
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let watch = store.etcd.watch(store.root(), revision.saturating_add(1), &tx);
            tokio::pin!(watch);
            let ended = loop {
                tokio::select! {
                    ended = &mut watch => break ended,
                    Some(batch) = rx.recv() => self.apply_changes(&store, batch),
                }
            };
            while let Ok(batch) = rx.try_recv() {
                self.apply_changes(&store, batch);
            }
            if let Err(e) = ended {
                warn!("the etcd watch broke; reading the registry again: {e}");
                tokio::time::sleep(backoff).await;
            }
        }
    }

    fn apply_changes(&self, store: &Store, batch: Vec<Change>) {
        // The last word on the shared config in this batch (`Some(None)`: deleted).
        let mut config = None;
        {
            let mut r = self.lock();
            for change in batch {
                match change {
                    Change::Put(key, value) => match store.decode(&key, &value) {
                        Some(Entry::Node(name, reg)) => {
                            r.shared.get_or_insert_with(BTreeMap::new).insert(name, reg);
                        }
                        Some(Entry::Revoked(name)) => {
                            if r.revoked.insert(name.clone()) {
                                warn!(node = name, "node revoked (recorded in etcd)");
                            }
                            r.nodes.remove(&name);
                        }
                        Some(Entry::Config(c)) => config = Some(Some(c)),
                        None => {}
                    },
                    Change::Delete(key) => match store.decode_deleted(&key) {
                        Some(Gone::Node(name)) if r.shared.as_mut().is_some_and(|s| s.remove(&name).is_some()) => {
                            info!(node = name, "registration gone from etcd (goodbye or lease expired)");
                        }
                        Some(Gone::Node(_)) => {}
                        Some(Gone::Revoked(name)) => {
                            info!(node = name, "revocation lifted in etcd");
                            r.revoked.remove(&name);
                        }
                        Some(Gone::Config) => config = Some(None),
                        None => {}
                    },
                }
            }
        }
        match config {
            Some(c) => self.adopt(c),
            None => self.mark_dirty(),
        }
    }

    /// Takes `shared` as the layers over this replica's files, if they load and build; else
    /// keeps what it had and says why.
    fn adopt(&self, shared: Option<SharedConfig>) {
        let held = self.sources().shared.clone();
        if held == shared {
            return self.mark_dirty();
        }
        let version = shared.as_ref().map_or(0, |c| c.version);
        match self.load_sources(shared.as_ref()) {
            Ok((config, node_settings)) => {
                self.sources().shared = shared;
                self.reload(config, node_settings);
                metrics::counter!(m::CONFIG_RELOADS, "result" => "applied").increment(1);
                info!(shared = version, version = self.version(), "shared config from etcd applied");
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "rejected").increment(1);
                warn!(shared = version, "shared config from etcd refused over this replica's files: {e}");
                self.mark_dirty();
            }
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared layers in force over this replica's files.
    pub fn shared_layers(&self) -> Vec<quicmesh_shared::config::Layer> {
        self.sources().shared.as_ref().map(|c| c.layers.clone()).unwrap_or_default()
    }

    /// The files this gateway's config is loaded from (watched for changes).
    pub fn set_files(&self, files: Vec<PathBuf>) {
        self.sources().files = files;
    }

    /// The config from the files with `shared` over them, validated, and the snapshot it would
    /// make checked as a whole.
    fn load_sources(&self, shared: Option<&SharedConfig>) -> Result<(Config, BTreeMap<String, NodeSettings>), String> {
        let files = self.sources().files.clone();
        if files.is_empty() {
            return Err("this gateway was started without config files to layer a shared config over".into());
        }
        let layers = shared.map_or(&[][..], |c| &c.layers[..]);
        let (config, node_settings) =
            quicmesh_shared::config::overlay::load_layered(&files, layers).map_err(|e| e.to_string())?;
        // An emptied or truncated gateway file still parses: it must not strip the gateway.
        if config.gateway.is_none() {
            let shown = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(format!("no [gateway] section in {shown}"));
        }
        let sockets = config.gateway.as_ref().map(|g| g.sockets()).unwrap_or_default();
        if let Some(what) = quicmesh_shared::config::listener::PortSetup::changed(&self.sockets, &sockets) {
            return Err(format!(
                "gateway listeners: {what} changed; ports, addresses, protocols, TLS termination and \
                 certificates are set up at start, so this change needs a restart (routes, and the \
                 hostnames of listeners that do not terminate TLS, reload)"
            ));
        }
        self.would_build(&config)?;
        Ok((config, node_settings))
    }

    /// Loads the config again from its sources (a file changed) and pushes the result.
    pub fn reload_sources(&self) -> Result<(), String> {
        let shared = self.sources().shared.clone();
        let (config, node_settings) = self.load_sources(shared.as_ref())?;
        for warning in config.warnings() {
            warn!("config: {warning}");
        }
        let pending = quicmesh_shared::config::reference::changes_needing_restart(&self.lock().config, &config);
        if !pending.is_empty() {
            warn!(
                keys = pending.join(", "),
                "these changed keys are read at start: they keep their running values until the gateway restarts"
            );
        }
        self.reload(config, node_settings);
        Ok(())
    }

    /// Whether `config` with the registrations held makes a snapshot every member can build.
    fn would_build(&self, config: &Config) -> Result<(), String> {
        let mut next = {
            let reg = self.lock();
            match &reg.shared {
                Some(shared) => control::merge(config, shared),
                None => control::merge(config, reg.nodes.iter().map(|(k, v)| (k, &v.reg))),
            }
        };
        next.revoked = config.revoked.clone();
        let built = next.into_config(config);
        built.validate().and_then(|()| Table::compile(built, 0)).map(drop).map_err(|e| e.to_string())
    }

    /// `quicmesh config apply` (`POST /config`, a JSON `{"layers": [{"name", "text"}]}`): checks
    /// the layers over this replica's files as a whole config and with the registrations held,
    /// then writes them to etcd as the next shared version; every replica takes them from
    /// there. A bad change is refused before it reaches etcd.
    pub async fn apply_config(&self, body: &[u8]) -> Result<String, ActionError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Apply {
            layers: Vec<quicmesh_shared::config::Layer>,
        }
        let Some(store) = &self.store else {
            return Err("this gateway has no [gateway.store]: its config is its files, which it watches".into());
        };
        let apply: Apply = serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
        if apply.layers.is_empty() {
            return Err("no layers to apply".into());
        }
        let candidate = SharedConfig { version: 0, layers: apply.layers, by: String::new(), applied_unix: 0 };
        self.load_sources(Some(&candidate)).map_err(|e| format!("refused, nothing applied: {e}"))?;
        let by = self.lock().config.gateway.as_ref().map(|g| g.name.clone()).unwrap_or_default();
        let names: Vec<String> = candidate.layers.iter().map(|l| l.name.clone()).collect();
        let applied = store.apply_config(candidate.layers, &by).await.map_err(|e| match e {
            StoreError::Unreachable(_) => {
                ActionError::Unavailable(format!("etcd is unavailable, the config was not applied: {e}"))
            }
            StoreError::Refused(_) => ActionError::Unavailable(format!("the config was not applied: {e}")),
        })?;
        let version = applied.version;
        info!(shared = version, layers = ?names, "shared config applied to etcd");
        // This replica needs no round trip through the watch to serve what it wrote.
        self.adopt(Some(applied));
        Ok(format!(
            "applied shared config version {version} ({}); every replica takes it from etcd\n",
            names.join(", ")
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the snapshot; publishes a new version only when the content changed.
    /// `reload`: the gateway's own config changed too, so its own table is compiled whole;
    /// otherwise it is patched with the delta every node gets.
    fn recompute(&self, reload: bool) {
        let mut reg = self.lock();
        let mut next = match &reg.shared {
            Some(shared) => control::merge(&reg.config, shared),
            None if self.store.is_some() => return,
            None => control::merge(&reg.config, reg.nodes.iter().map(|(k, v)| (k, &v.reg))),
        };
        let mut revoked: std::collections::BTreeSet<String> = reg.config.revoked.iter().cloned().collect();
        revoked.extend(reg.revoked.iter().cloned());
        next.revoked = revoked.into_iter().collect();
        next.version = reg.current.version;
        if next == *reg.current && !reload {
            return;
        }
        let from = reg.current.version;
        next.version = self.next_version(from);
        let version = next.version;
        let delta = reg.current.diff(&next);
        // What this gateway itself routes by, built before anything is published, so a
        // snapshot that would not build reaches no node either.
        let held = self.mesh.table();
        let own = if reload || held.version() != from {
            let config = next.clone().into_config(&reg.config);
            config.validate().and_then(|()| Table::compile(config, version))
        } else {
            held.patch(delta.clone())
        };
        let own = match own {
            Ok(table) => table,
            Err(e) => {
                warn!("snapshot {version} refused, not published: {e}");
                return;
            }
        };
        let delta_line = match control::encode_line(&GatewayMsg::Delta(delta)) {
            Ok(line) => line,
            Err(e) => {
                warn!("cannot encode the delta to snapshot {version}: {e}");
                return;
            }
        };
        let overlays = reload || next.timeouts != reg.current.timeouts;
        // Nodes with an overlay get their own whole line; everyone else shares one encoding.
        let mut per_node = std::collections::HashMap::new();
        for (name, settings) in &reg.node_settings {
            if settings.timeouts != next.timeouts {
                let mut own_snap = next.clone();
                own_snap.timeouts = settings.timeouts.clone();
                if let Ok(l) = control::encode_line(&GatewayMsg::Snapshot(own_snap)) {
                    per_node.insert(name.clone(), l);
                }
            }
        }
        debug!(version, delta_bytes = delta_line.len(), "publishing snapshot");
        reg.history.push_back(Arc::new(DeltaLine { from, version, line: delta_line, overlays }));
        while reg.history.len() > HISTORY {
            reg.history.pop_front();
        }
        let snapshot = Arc::new(next);
        reg.current = snapshot.clone();
        // Still under the registry lock: versions are published in order.
        self.mesh.apply(own);
        metrics::gauge!(m::CONTROL_VERSION).set(version as f64);
        let history = reg.history.iter().cloned().collect();
        self.tx.send_replace(Arc::new(Published {
            version,
            snapshot,
            line: std::sync::OnceLock::new(),
            per_node,
            history,
            digest: Default::default(),
        }));
        if self.registry_file.is_some() {
            let nodes = reg.nodes.iter().map(|(k, v)| (k.clone(), v.reg.clone())).collect();
            *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Persisted { version, nodes });
            self.save.notify_one();
        }
    }

    /// Writes the registry file whenever it changed, the latest state only, off the registry
    /// lock (a fleet's registrations are megabytes); runs until dropped.
    pub async fn persister(self: Arc<Self>) {
        let Some(path) = self.registry_file.clone() else { return };
        loop {
            self.save.notified().await;
            let Some(persisted) = self.unsaved.lock().unwrap_or_else(|e| e.into_inner()).take() else { continue };
            let path = path.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let tmp = path.with_extension("tmp");
                let write = serde_json::to_vec(&persisted)
                    .map_err(std::io::Error::other)
                    .and_then(|b| std::fs::write(&tmp, b))
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = write {
                    warn!("cannot persist registry to {}: {e}", path.display());
                }
            })
            .await;
        }
    }

    /// Replaces the config from files and overlays (already validated) and pushes the result.
    pub fn reload(&self, config: Config, node_settings: BTreeMap<String, NodeSettings>) {
        {
            let mut reg = self.lock();
            reg.config = config;
            reg.node_settings = node_settings;
        }
        self.recompute(true);
    }

    /// Asks for a new snapshot soon; bursts of changes make one.
    fn mark_dirty(&self) {
        self.dirty.notify_one();
    }

    /// Publishes snapshots for changes marked dirty; runs until dropped. No fixed delay: the
    /// changes that arrive while one snapshot is built make the next one together.
    pub async fn publisher(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            let cp = self.clone();
            let _ = tokio::task::spawn_blocking(move || cp.recompute(false)).await;
        }
    }

    pub fn version(&self) -> u64 {
        self.lock().current.version
    }

    pub fn status(&self) -> Status {
        let reg = self.lock();
        let nodes = reg
            .nodes
            .iter()
            .map(|(name, st)| NodeStatus {
                name: name.clone(),
                connected: st.streams > 0,
                address: st.reg.address.to_string(),
                instances: st.reg.instances.len(),
                unhealthy: st.reg.unhealthy.len(),
                admin: st.reg.admin.map(|a| a.to_string()),
                acked_version: st.acked,
                last_nack: st.nack.as_ref().map(|(v, r)| format!("version {v}: {r}")),
            })
            .collect();
        Status { version: reg.current.version, nodes }
    }

    /// Is this member revoked?
    pub fn is_revoked(&self, name: &str) -> bool {
        let r = self.lock();
        r.revoked.contains(name) || r.config.revoked.iter().any(|n| n == name)
    }

    /// Revokes a member: every node is told to refuse it, its registration and control stream
    /// end, and it may not register, renew or enroll again under that name. Persisted.
    /// With replicas the revocation is written to etcd first; without etcd it is refused.
    pub async fn revoke(&self, name: &str) -> Result<String, ActionError> {
        if !valid_node_name(name) {
            return Err(format!("{name:?} is not a node name").into());
        }
        if self.lock().config.gateway.as_ref().is_some_and(|g| g.name == name) {
            return Err("the gateway cannot revoke itself".into());
        }
        if let Some(store) = &self.store {
            store
                .revoke(name)
                .await
                .map_err(|e| ActionError::Unavailable(format!("etcd is unavailable, {name} was not revoked: {e}")))?;
        }
        {
            let mut r = self.lock();
            r.revoked.insert(name.to_string());
            r.nodes.remove(name);
            if let Some(path) = &self.registry_file {
                let path = path.with_file_name(REVOKED_FILE);
                let data = serde_json::to_vec(&r.revoked).unwrap_or_default();
                if let Err(e) = std::fs::write(&path, data) {
                    warn!("cannot persist the revocation list to {}: {e}", path.display());
                }
            }
        }
        warn!(node = name, "node revoked: every member refuses it from the next snapshot");
        self.recompute(false);
        Ok(format!("revoked {name}; snapshot {}\n", self.version()))
    }

    /// Creates a join token (`POST /tokens?ttl=1h&uses=1&node=NAME`) and returns it; only its
    /// hash is kept: in etcd with replicas, so any replica redeems it (and refused when etcd
    /// is unavailable), else in the state directory's token file.
    pub async fn create_token(&self, params: &[(String, String)]) -> Result<String, ActionError> {
        let param = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let ttl = match param("ttl") {
            Some(t) => humantime::parse_duration(t).map_err(|e| format!("ttl={t:?}: {e}"))?,
            None => Duration::from_secs(3600),
        };
        let uses = match param("uses") {
            Some(u) => u.parse::<u32>().ok().filter(|&n| n > 0).ok_or(format!("uses={u:?} is not a count above 0"))?,
            None => 1,
        };
        let node = param("node").map(str::to_string);
        if let Some(n) = &node {
            if !valid_node_name(n) {
                return Err(format!("node={n:?} is not a node name").into());
            }
        }
        if let Some(store) = &self.store {
            let (token, record) = enroll::new_token(ttl, uses, node).map_err(|e| e.to_string())?;
            store
                .add_token(&record)
                .await
                .map_err(|e| ActionError::Unavailable(format!("etcd is unavailable, no token was created: {e}")))?;
            return Ok(format!("{token}\n"));
        }
        let dir = self.lock().config.gateway.as_ref().and_then(|g| g.tls.state_dir.clone());
        let dir = dir.ok_or("this gateway has no gateway.tls.state_dir to keep tokens in")?;
        let token = enroll::create_token(&dir, ttl, uses, node).map_err(|e| e.to_string())?;
        Ok(format!("{token}\n"))
    }

    /// Adds or replaces a node's registration, if the mesh stays valid with it (a registration
    /// cannot, say, claim another service's host alias or break every node's snapshot).
    /// `new_stream`: the registration opens a control stream (its first hello), rather than
    /// changing it on a stream already counted; a refused one changes nothing.
    fn register(&self, name: &str, mut reg: Registration, new_stream: bool) -> Result<(), String> {
        {
            let mut r = self.lock();
            if r.revoked.contains(name) {
                return Err("this node is revoked".into());
            }
            // A service may name the nodes allowed to host it.
            for inst in &reg.instances {
                if let Some(svc) = r.config.service(&inst.service) {
                    if !svc.allowed_nodes.is_empty() && !svc.allowed_nodes.iter().any(|n| n == name) {
                        return Err(format!("node {name:?} may not register instances of service {:?}", inst.service));
                    }
                }
            }
            // Health reported earlier still holds for the instances that stay.
            if let Some(prev) = r.nodes.get(name) {
                let known = instance_keys(&reg.instances);
                reg.unhealthy = prev
                    .reg
                    .unhealthy
                    .iter()
                    .filter(|(svc, addr)| known.contains(&(svc.as_str(), *addr)))
                    .cloned()
                    .collect();
            }
            let name_owned = name.to_string();
            let mine = std::iter::once((&name_owned, &reg));
            let merged = match &r.shared {
                Some(shared) => control::merge(&r.config, shared.iter().filter(|(k, _)| *k != name).chain(mine)),
                None => control::merge(
                    &r.config,
                    r.nodes.iter().filter(|(k, _)| *k != name).map(|(k, v)| (k, &v.reg)).chain(mine),
                ),
            };
            merged.into_config(&r.config).validate().map_err(|e| e.to_string())?;
            let st = r.nodes.entry(name.to_string()).or_insert(NodeState {
                reg: reg.clone(),
                streams: 0,
                disconnected_at: None,
                acked: 0,
                nack: None,
                last_renewal: None,
            });
            st.reg = reg;
            if new_stream {
                st.streams += 1;
            } else {
                // The stream it changes is open (its entry may have been swept meanwhile).
                st.streams = st.streams.max(1);
            }
            st.disconnected_at = None;
            metrics::gauge!(m::CONTROL_NODES).set(r.nodes.values().filter(|n| n.streams > 0).count() as f64);
        }
        self.mark_dirty();
        Ok(())
    }

    /// Whether `name` is a node the mesh knows (registered, in its grace period, or in config).
    pub fn name_in_use(&self, name: &str) -> bool {
        let r = self.lock();
        r.nodes.contains_key(name)
            || r.shared.as_ref().is_some_and(|s| s.contains_key(name))
            || r.config.peer(name).is_some()
    }

    /// The store replicas share, if any.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// May a renewal be signed for `name` now? At most one per [`RENEWAL_INTERVAL`] per node,
    /// whatever stream asks (`Err(Throttle::TooSoon)`): a node renews once a certificate
    /// lifetime, and each renewal reads the CA and signs on the asking stream's thread. A node
    /// revoked or swept while its stream is still open gets nothing signed.
    fn renewal_due(&self, name: &str) -> Result<(), Throttle> {
        let mut r = self.lock();
        if r.revoked.contains(name) {
            return Err(Throttle::Gone);
        }
        let Some(st) = r.nodes.get_mut(name) else { return Err(Throttle::Gone) };
        if st.last_renewal.is_some_and(|at| at.elapsed() < RENEWAL_INTERVAL) {
            return Err(Throttle::TooSoon);
        }
        st.last_renewal = Some(Instant::now());
        Ok(())
    }

    fn disconnect(&self, name: &str, goodbye: bool) {
        {
            let mut r = self.lock();
            if let Some(st) = r.nodes.get_mut(name) {
                st.streams = st.streams.saturating_sub(1);
                if st.streams == 0 {
                    if goodbye {
                        r.nodes.remove(name);
                        info!(node = name, "node deregistered");
                    } else {
                        st.disconnected_at = Some(Instant::now());
                        info!(node = name, grace = ?self.grace, "node lost its control stream");
                    }
                }
            }
            metrics::gauge!(m::CONTROL_NODES).set(r.nodes.values().filter(|n| n.streams > 0).count() as f64);
        }
        self.mark_dirty();
    }

    /// Records which of a node's instances fail their health check; only instances the node
    /// registered count.
    fn health(&self, name: &str, unhealthy: Vec<(String, std::net::SocketAddr)>) -> bool {
        {
            let mut r = self.lock();
            let Some(st) = r.nodes.get_mut(name) else { return false };
            let known = instance_keys(&st.reg.instances);
            let set: std::collections::BTreeSet<(String, std::net::SocketAddr)> =
                unhealthy.into_iter().filter(|(svc, addr)| known.contains(&(svc.as_str(), *addr))).collect();
            if set == st.reg.unhealthy {
                return false;
            }
            info!(node = name, unhealthy = ?set, "instance health changed");
            st.reg.unhealthy = set;
        }
        self.mark_dirty();
        true
    }

    /// A node's registration with this replica.
    fn registration(&self, name: &str) -> Option<Registration> {
        self.lock().nodes.get(name).map(|st| st.reg.clone())
    }

    fn ack(&self, name: &str, version: u64) {
        if let Some(st) = self.lock().nodes.get_mut(name) {
            st.acked = version;
            metrics::gauge!(m::CONTROL_NODE_VERSION, "node" => name.to_string()).set(version as f64);
        }
    }

    fn nack(&self, name: &str, version: u64, mut reason: String) {
        metrics::counter!(m::CONTROL_NACKS).increment(1);
        // A node's own words, logged and kept: a few lines' worth (a line may be megabytes).
        if reason.len() > MAX_NACK_REASON {
            let cut = (0..=MAX_NACK_REASON).rev().find(|&i| reason.is_char_boundary(i)).unwrap_or(0);
            reason.truncate(cut);
            reason.push_str("...");
        }
        warn!(node = name, version, reason, "node rejected snapshot");
        if let Some(st) = self.lock().nodes.get_mut(name) {
            st.nack = Some((version, reason));
        }
    }

    /// Removes nodes whose grace period ran out; runs until dropped.
    pub async fn sweep(self: Arc<Self>) {
        let tick = (self.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            let expired: Vec<String> = {
                let r = self.lock();
                r.nodes
                    .iter()
                    .filter(|(_, st)| st.disconnected_at.is_some_and(|t| t.elapsed() >= self.grace))
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            if expired.is_empty() {
                continue;
            }
            {
                let mut r = self.lock();
                for name in &expired {
                    // It may have come back since the scan.
                    let still = r
                        .nodes
                        .get(name)
                        .is_some_and(|st| st.disconnected_at.is_some_and(|t| t.elapsed() >= self.grace));
                    if still {
                        r.nodes.remove(name);
                        info!(node = name, "node removed after its grace period");
                    }
                }
            }
            self.mark_dirty();
        }
    }
}

/// Signs enrollment requests with the CA in the gateway's state directory.
pub struct Enroller {
    dir: PathBuf,
    /// The gateway's own mesh name, never issued to anyone else.
    gateway_name: String,
    cp: Arc<ControlPlane>,
    /// Token redemption is read-modify-write on a file: one at a time.
    lock: tokio::sync::Mutex<()>,
}

/// Lifetime of certificates issued at enrollment.
const ENROLLED_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Largest enrollment request body.
const MAX_ENROLL_BODY: usize = 64 << 10;
/// How long a peer without a certificate may stay connected.
const ENROLL_DEADLINE: Duration = Duration::from_secs(10);
/// How long a node has for its QUIC handshake with the control listener.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Least time between two renewals signed for one node.
const RENEWAL_INTERVAL: Duration = Duration::from_secs(10);
/// Largest header section accepted on the control listener.
const MAX_HEADERS: u64 = 16 << 10;

impl Enroller {
    pub fn new(dir: PathBuf, gateway_name: String, cp: Arc<ControlPlane>) -> Self {
        Self { dir, gateway_name, cp, lock: tokio::sync::Mutex::new(()) }
    }

    /// Signs a renewal for a member already authenticated by its current certificate.
    fn renew(&self, name: &str, csr: &str) -> Result<String, String> {
        let ca = Ca::open(&self.dir).map_err(|e| format!("the gateway holds no CA: {e}"))?;
        let cert = ca.sign_csr(name, csr, ENROLLED_VALIDITY).map_err(|e| format!("bad signing request: {e}"))?;
        issued(name);
        let Some(store) = self.cp.store().cloned() else {
            self.note_issued(name);
            return Ok(cert);
        };
        // The member holds its new certificate whether or not etcd hears of it now.
        let (record, name) = (Issued::new(&cert, ENROLLED_VALIDITY, &self.gateway_name, "renewed"), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = store.record_issue(&name, &record).await {
                warn!(node = name, "the renewal is not recorded in etcd: {e}");
            }
        });
        Ok(cert)
    }

    async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, String> {
        if !valid_node_name(&req.name) {
            return Err(format!("invalid node name {:?}", req.name));
        }
        if req.name == self.gateway_name {
            return Err("that name belongs to the gateway".into());
        }
        if self.cp.is_revoked(&req.name) {
            return Err(format!("node {:?} is revoked", req.name));
        }
        if let Some(store) = self.cp.store().cloned() {
            return self.enroll_shared(&store, req).await;
        }
        let _one = self.lock.lock().await;
        // The token first (cheap, no key material touched), then the name, then the signature;
        // the token is spent last, so a refused request costs the holder nothing.
        let bound = enroll::check(&self.dir, &req.token, &req.name).map_err(|e| e.to_string())?;
        // Looked up only for an unbound token: a bound one may take the name whatever it holds.
        let held = match bound {
            true => None,
            false => enroll::holds_certificate(&self.dir, &req.name).map_err(|e| e.to_string())?,
        };
        self.name_free(&req.name, bound, held)?;
        let (certificate, ca) = self.sign(&req)?;
        enroll::redeem(&self.dir, &req.token, &req.name).map_err(|e| e.to_string())?;
        issued(&req.name);
        self.note_issued(&req.name);
        Ok(EnrollResponse { certificate, ca })
    }

    /// Notes a certificate just issued to `name` in the CA's directory (without etcd, which
    /// keeps its own record), for [`Enroller::name_free`].
    fn note_issued(&self, name: &str) {
        let until = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + ENROLLED_VALIDITY;
        if let Err(e) = enroll::record_issued(&self.dir, name, until.as_secs()) {
            warn!(node = name, "the certificate issued is not recorded: {e}");
        }
    }

    /// Enrollment with replicas: the token is read from etcd and spent there in a transaction
    /// with the record of the certificate, so two replicas cannot both redeem one use. Without
    /// etcd nothing is issued.
    async fn enroll_shared(&self, store: &Store, req: EnrollRequest) -> Result<EnrollResponse, String> {
        let unavailable = |e: StoreError| format!("etcd is unavailable, so no node can enroll now: {e}");
        let mut signed = None;
        // Another replica spending a use of the same token changes it under us: read it again.
        for _ in 0..16 {
            let (record, revision) = store.token(&req.token).await.map_err(unavailable)?.ok_or("unknown token")?;
            record.allows(&req.name).map_err(|e| e.to_string())?;
            let bound = record.node.is_some();
            let (held, issued_at) = match bound {
                true => (None, None),
                // What replicas issued (etcd), and what `quicmesh ca issue` noted in the CA's
                // directory; the redemption below holds only if no replica issues the name
                // meanwhile.
                false => {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                    let (shared, at) = store.issued(&req.name).await.map_err(unavailable)?;
                    let shared = shared.map(|i| i.not_after_unix).filter(|until| *until > now);
                    let local = enroll::holds_certificate(&self.dir, &req.name).map_err(|e| e.to_string())?;
                    (shared.max(local), Some(at))
                }
            };
            self.name_free(&req.name, bound, held)?;
            let (certificate, ca) = match signed.take() {
                Some(done) => done,
                None => self.sign(&req)?,
            };
            let record_of = Issued::new(&certificate, ENROLLED_VALIDITY, &self.gateway_name, "enrolled");
            if store.spend_token(&record, revision, &req.name, &record_of, issued_at).await.map_err(unavailable)? {
                issued(&req.name);
                return Ok(EnrollResponse { certificate, ca });
            }
            signed = Some((certificate, ca));
        }
        Err("the token is being redeemed elsewhere; try again".into())
    }

    /// A name may be taken by a new enrollment only with a token bound to it while it is in
    /// the mesh, or while a certificate issued for it holds (`held`: until when), though the
    /// node be away: another certificate would let the token's holder pose as it.
    fn name_free(&self, name: &str, bound: bool, held: Option<u64>) -> Result<(), String> {
        if bound {
            return Ok(());
        }
        if self.cp.name_in_use(name) {
            return Err(format!("node {name:?} is already in the mesh; re-enrolling it needs a token bound to it"));
        }
        if let Some(until) = held {
            let left = until.saturating_sub(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
            return Err(format!(
                "node {name:?} holds a certificate for {} more; enrolling it again needs a token bound to it \
                 (quicmesh token create --node {name})",
                humantime::format_duration(Duration::from_secs(left))
            ));
        }
        Ok(())
    }

    /// A certificate for the request's key and name, and the CA bundle.
    fn sign(&self, req: &EnrollRequest) -> Result<(String, String), String> {
        let ca = Ca::open(&self.dir).map_err(|e| format!("the gateway holds no CA: {e}"))?;
        let certificate =
            ca.sign_csr(&req.name, &req.csr, ENROLLED_VALIDITY).map_err(|e| format!("bad signing request: {e}"))?;
        Ok((certificate, ca.cert_pem().to_string()))
    }
}

/// Exports when the certificate just issued to `node` expires.
fn issued(node: &str) {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + ENROLLED_VALIDITY;
    metrics::gauge!(m::CONTROL_CERT_EXPIRY, "node" => node.to_string()).set(expiry.as_secs_f64());
}

/// Accepts control connections on the gateway's mesh endpoint: members (mTLS) get control
/// streams; peers without a certificate may only enroll.
pub async fn serve(
    endpoint: quinn::Endpoint,
    cp: Arc<ControlPlane>,
    trust_domain: String,
    enroll: Option<Arc<Enroller>>,
) {
    let admission = Admission::new("control", Limits::MESH);
    while let Some(incoming) = endpoint.accept().await {
        // No state for an attempt until it is let in (a spoofed flood gets Retries).
        let Some((incoming, slot)) = admission.admit(incoming) else { continue };
        let cp = cp.clone();
        let td = trust_domain.clone();
        let enroll = enroll.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, incoming.into_future()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    slot.release_after(admission::FAILED_HOLD);
                    let reason = tls::handshake_failure_reason(&e);
                    metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => reason)
                        .increment(1);
                    warn!(%remote, reason, error = %e, "refused control peer");
                    return;
                }
                Err(_) => {
                    metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "timeout")
                        .increment(1);
                    return;
                }
            };
            drop(slot);
            let name = tls::peer_identity(&conn, &td).and_then(|id| id.node_name().map(str::to_owned));
            if name.is_none() && conn.peer_identity().is_some() {
                conn.close(1u32.into(), b"no mesh identity");
                return;
            }
            if name.is_none() {
                // Without a certificate: one enrollment request, and not for long.
                conn.set_max_concurrent_bi_streams(1u32.into());
                let limited = conn.clone();
                if tokio::time::timeout(ENROLL_DEADLINE, connection(conn, None, cp, enroll)).await.is_err() {
                    limited.close(1u32.into(), b"enrollment took too long");
                }
                return;
            }
            if name.as_deref().is_some_and(|n| cp.is_revoked(n)) {
                metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => "revoked")
                    .increment(1);
                warn!(%remote, node = name.as_deref().unwrap_or_default(), "refused control peer: revoked");
                conn.close(2u32.into(), b"revoked");
                return;
            }
            connection(conn, name, cp, enroll).await;
        });
    }
}

type ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

async fn respond(stream: &mut ServerStream, status: StatusCode, body: Option<Bytes>) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if stream.send_response(resp).await.is_ok() {
        if let Some(b) = body {
            let _ = stream.send_data(b).await;
        }
        let _ = stream.finish().await;
    }
}

async fn connection(
    conn: quinn::Connection,
    peer: Option<String>,
    cp: Arc<ControlPlane>,
    enroll: Option<Arc<Enroller>>,
) {
    let mut builder = h3::server::builder();
    builder.max_field_section_size(MAX_HEADERS);
    let quic = conn.clone();
    let Ok(mut h3) = builder.build::<_, Bytes>(h3_quinn::Connection::new(conn)).await else { return };
    let mut served = false;
    while let Ok(Some(resolver)) = h3.accept().await {
        // Without a certificate: one request, served before another stream is read; the rest
        // are refused unprocessed. (QUIC let it open 16 before it was known to have none, and
        // each asked the token store.)
        let unauthenticated = peer.is_none();
        if unauthenticated && served {
            resolver.give_up(h3::error::Code::H3_REQUEST_REJECTED);
            continue;
        }
        let cp = cp.clone();
        let peer = peer.clone();
        let enroll = enroll.clone();
        let quic = quic.clone();
        let work = async move {
            // A member's request head comes at once; one that does not is not waited for.
            let resolved = quicmesh_shared::transport::stream::h3_head_within(
                resolver,
                quicmesh_shared::transport::lean::HEAD_WITHIN,
            );
            let Ok(Ok((req, mut stream))) = resolved.await else { return };
            let path = req.uri().path();
            match (req.method(), path, peer, enroll) {
                (&Method::POST, control::STREAM_PATH, Some(peer), enroll) => {
                    let digest = req
                        .headers()
                        .get(control::HELD_DIGEST_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .filter(|d| d.len() == 64)
                        .map(str::to_string);
                    control_stream(stream, &peer, digest, &cp, enroll.as_deref(), &quic).await
                }
                (&Method::POST, enroll::ENROLL_PATH, _, Some(enroller)) => enrollment(stream, &enroller).await,
                (_, control::STREAM_PATH, None, _) => respond(&mut stream, StatusCode::FORBIDDEN, None).await,
                _ => respond(&mut stream, StatusCode::NOT_FOUND, None).await,
            }
        };
        if unauthenticated {
            served = true;
            work.await;
            continue;
        }
        tokio::spawn(work);
    }
}

async fn enrollment(mut stream: ServerStream, enroller: &Enroller) {
    let mut body = Vec::new();
    loop {
        match stream.recv_data().await {
            Ok(Some(mut chunk)) => {
                use bytes::Buf;
                if body.len() + chunk.remaining() > MAX_ENROLL_BODY {
                    return respond(&mut stream, StatusCode::PAYLOAD_TOO_LARGE, None).await;
                }
                body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let result = match serde_json::from_slice::<EnrollRequest>(&body) {
        Ok(req) => {
            let name = req.name.clone();
            enroller.enroll(req).await.map(|r| (name, r))
        }
        Err(e) => Err(format!("bad enrollment request: {e}")),
    };
    match result {
        Ok((name, resp)) => {
            metrics::counter!(m::ENROLLMENTS, "result" => "issued").increment(1);
            info!(node = name, "enrolled a node; certificate issued");
            let body = serde_json::to_vec(&resp).unwrap_or_default();
            respond(&mut stream, StatusCode::OK, Some(Bytes::from(body))).await;
        }
        Err(reason) => {
            metrics::counter!(m::ENROLLMENTS, "result" => "refused").increment(1);
            warn!(reason, "enrollment refused");
            let body = serde_json::json!({ "error": reason }).to_string();
            respond(&mut stream, StatusCode::FORBIDDEN, Some(Bytes::from(body))).await;
        }
    }
}

/// What a node's stream asks of its store writer.
enum StoreOp {
    /// Write the registration as this replica now holds it.
    Put,
    /// Renew the lease (or write the registration again if it ran out).
    Renew,
    /// The node said goodbye: end its lease, which deletes its registration everywhere.
    Goodbye,
}

/// Keeps a node's registration in the store while its stream to this replica lasts, under a
/// lease of the node's own renewed every third of its time to live. When the stream breaks the
/// writer stops and the lease runs out after `gateway.node_grace`, unless the node re-attaches
/// (to any replica) first. Writes are retried at every renewal while etcd is away.
async fn keep_in_store(
    cp: Arc<ControlPlane>,
    store: Arc<Store>,
    peer: String,
    mut ops: tokio::sync::mpsc::UnboundedReceiver<StoreOp>,
) {
    let mut lease: Option<i64> = None;
    // Said once per outage, not at every renewal.
    let failing = std::sync::atomic::AtomicBool::new(false);
    let report = |what: &str, e: crate::store::StoreError| {
        if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!(node = peer, "{what}; retrying at every renewal: {e}");
        }
    };
    let mut tick = tokio::time::interval((store.ttl / 3).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let op = tokio::select! {
            op = ops.recv() => match op {
                Some(op) => op,
                None => return,
            },
            _ = tick.tick() => StoreOp::Renew,
        };
        let put = |lease: Option<i64>| {
            let (cp, store, peer, report, failing) = (&cp, &store, &peer, &report, &failing);
            async move {
                let reg = cp.registration(peer)?;
                match store.attach(peer, &reg, lease).await {
                    Ok(l) => {
                        if failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                            info!(node = peer, "the registration is in etcd again");
                        }
                        Some(l)
                    }
                    Err(e) => {
                        report("cannot keep the registration in etcd", e);
                        lease
                    }
                }
            }
        };
        match op {
            StoreOp::Put => lease = put(lease).await,
            StoreOp::Renew => match lease {
                Some(l) => match store.etcd.keep_alive(l).await {
                    Ok(true) => {}
                    Ok(false) => lease = put(None).await,
                    Err(e) => report("cannot renew the registration's lease in etcd", e),
                },
                None => lease = put(None).await,
            },
            StoreOp::Goodbye => {
                if let Some(l) = lease {
                    if let Err(e) = store.etcd.revoke(l).await {
                        warn!(node = peer, "cannot remove the registration from etcd (its lease runs out): {e}");
                    }
                }
                return;
            }
        }
    }
}

/// The most of a node's nack reason the gateway logs and keeps, bytes.
const MAX_NACK_REASON: usize = 1024;

/// Instances one node may register: far more than a host runs, few enough that checking a
/// registration or a health report under the registry's lock stays short.
const MAX_INSTANCES: usize = 4096;

/// The (service, address) pairs of `instances`, to look reports up in.
fn instance_keys(
    instances: &[quicmesh_shared::config::Instance],
) -> std::collections::HashSet<(&str, std::net::SocketAddr)> {
    instances.iter().map(|i| (i.service.as_str(), i.address)).collect()
}

/// What a hello says: the registration, and the version the node holds when it takes deltas
/// (protocol 2 and later; version 1 gets whole snapshots).
fn check_hello(msg: Option<NodeMsg>) -> Result<(Registration, Option<u64>), String> {
    match msg {
        Some(NodeMsg::Hello { address, instances, admin, version, protocol }) => {
            if instances.len() > MAX_INSTANCES {
                return Err(format!(
                    "{} instances, more than the {MAX_INSTANCES} a node may register",
                    instances.len()
                ));
            }
            if let Some(bad) = instances.iter().find(|i| !valid_name(&i.service)) {
                return Err(format!("invalid service name {:?}", bad.service));
            }
            let held = (protocol >= control::PROTOCOL_DELTAS).then_some(version);
            Ok((Registration { address, instances, unhealthy: Default::default(), admin }, held))
        }
        Some(other) => Err(format!("expected hello, got {other:?}")),
        None => Err("stream ended before hello".into()),
    }
}

/// A node's admin address as the gateway will use it (the dashboard and `top` send requests
/// there): on the address the node's own connection comes from, a wildcard read as that
/// address; anything else is dropped, so a node cannot point the gateway at another host.
fn vouch_admin(mut reg: Registration, from: std::net::SocketAddr, peer: &str) -> Registration {
    let from = from.ip().to_canonical();
    reg.admin = reg.admin.and_then(|a| match a.ip().to_canonical() {
        ip if ip.is_unspecified() => Some(std::net::SocketAddr::new(from, a.port())),
        ip if ip == from => Some(a),
        _ => {
            warn!(node = peer, admin = %a, connection = %from, "ignored the node's admin address: not the address it connects from");
            None
        }
    });
    reg
}

async fn control_stream(
    stream: ServerStream,
    peer: &str,
    digest: Option<String>,
    cp: &Arc<ControlPlane>,
    ca: Option<&Enroller>,
    quic: &quinn::Connection,
) {
    let (mut send, recv) = stream.split();
    if send.send_response(Response::new(())).await.is_err() {
        return;
    }
    let mut reader = LineReader::with_limit(recv, control::MAX_NODE_LINE);
    let (reg, mut held) = match reader.next::<NodeMsg>().await.map_err(|e| e.to_string()).and_then(check_hello) {
        Ok(r) => r,
        Err(reason) => {
            warn!(node = peer, reason, "refused control stream");
            return;
        }
    };
    let reg = vouch_admin(reg, quic.remote_address(), peer);
    let (address, instances) = (reg.address, reg.instances.len());
    let mut rx = cp.tx.subscribe();
    if let Err(reason) = cp.register(peer, reg, true) {
        warn!(node = peer, reason, "refused registration");
        return;
    }
    info!(node = peer, %address, instances, "node registered");
    // With replicas, the registration lives in etcd for as long as this stream does.
    let to_store = cp.store.clone().map(|store| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(keep_in_store(cp.clone(), store, peer.to_string(), rx));
        tx
    });
    let store_op = |op: StoreOp| {
        if let Some(tx) = &to_store {
            let _ = tx.send(op);
        }
    };
    let mut goodbye = false;
    let takes_deltas = held.is_some();
    // A node that comes back holding a version still in the history resumes from it.
    let first = rx.borrow_and_update().clone();
    let (line, push) = first.push_for(peer, held, digest.as_deref());
    push.count(line.len());
    // Nothing published yet (a replica still reading etcd): the first snapshot comes as a change.
    let sent = line.is_empty() || send.send_data(line).await.is_ok();
    held = (takes_deltas && first.version != 0).then_some(first.version);
    if sent {
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if cp.is_revoked(peer) {
                        break;
                    }
                    let snap = rx.borrow_and_update().clone();
                    let start = Instant::now();
                    let (line, push) = snap.push_for(peer, held, None);
                    push.count(line.len());
                    held = takes_deltas.then_some(snap.version);
                    if send.send_data(line).await.is_err() {
                        break;
                    }
                    metrics::histogram!(m::CONTROL_PUSH_DURATION).record(start.elapsed().as_secs_f64());
                }
                msg = reader.next::<NodeMsg>() => match msg {
                    Ok(Some(NodeMsg::Ack { version })) => cp.ack(peer, version),
                    Ok(Some(NodeMsg::Nack { version, reason })) => {
                        // The node kept what it had: the next push is whole.
                        held = None;
                        cp.nack(peer, version, reason)
                    }
                    Ok(Some(NodeMsg::Resync { held: had })) => {
                        let snap = rx.borrow_and_update().clone();
                        debug!(node = peer, held = had, version = snap.version, "node asked for the whole snapshot");
                        let line = snap.line_for(peer);
                        Push::Snapshot.count(line.len());
                        held = takes_deltas.then_some(snap.version);
                        if send.send_data(line).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(NodeMsg::Health { unhealthy })) => {
                        if cp.health(peer, unhealthy) {
                            store_op(StoreOp::Put);
                        }
                    }
                    Ok(Some(NodeMsg::Goodbye)) => {
                        goodbye = true;
                        store_op(StoreOp::Goodbye);
                        break;
                    }
                    Ok(Some(NodeMsg::Renew { csr })) => {
                        if let Err(why) = cp.renewal_due(peer) {
                            let reason = match why {
                                Throttle::TooSoon => {
                                    metrics::counter!(m::ENROLLMENTS, "result" => "throttled").increment(1);
                                    debug!(node = peer, "renewal asked again too soon; refused");
                                    format!("renewed less than {RENEWAL_INTERVAL:?} ago; ask later")
                                }
                                Throttle::Gone => {
                                    metrics::counter!(m::ENROLLMENTS, "result" => "refused").increment(1);
                                    warn!(node = peer, "renewal refused: the node is revoked or no longer registered");
                                    "this node is revoked or no longer registered".to_string()
                                }
                            };
                            if control::send_line(&mut send, &GatewayMsg::RenewRefused { reason }).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let signed = ca.ok_or_else(|| "this gateway holds no CA".to_string()).and_then(|ca| ca.renew(peer, &csr));
                        match signed {
                            Ok(certificate) => {
                                metrics::counter!(m::ENROLLMENTS, "result" => "renewed").increment(1);
                                info!(node = peer, "renewed a node certificate");
                                if control::send_line(&mut send, &GatewayMsg::Certificate { certificate }).await.is_err() {
                                    break;
                                }
                            }
                            Err(reason) => {
                                metrics::counter!(m::ENROLLMENTS, "result" => "refused").increment(1);
                                warn!(node = peer, reason, "renewal refused");
                                if control::send_line(&mut send, &GatewayMsg::RenewRefused { reason }).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Ok(Some(hello @ NodeMsg::Hello { .. })) => match check_hello(Some(hello)) {
                        // Re-registration: the instances or the node's address changed.
                        Ok((reg, _)) => {
                            let reg = vouch_admin(reg, quic.remote_address(), peer);
                            // Refused, the registration stays as it was, and this stream is
                            // counted as closed once, below.
                            if let Err(reason) = cp.register(peer, reg, false) {
                                warn!(node = peer, reason, "refused re-registration");
                                break;
                            }
                            store_op(StoreOp::Put);
                        }
                        Err(reason) => warn!(node = peer, reason, "ignored bad re-registration"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        warn!(node = peer, error = %e, "bad control message; closing the stream");
                        break;
                    }
                },
            }
        }
    }
    cp.disconnect(peer, goodbye);
    let _ = send.finish().await;
}

#[cfg(test)]
mod admin_address_tests {
    use super::*;

    #[test]
    fn a_node_admin_address_is_kept_only_on_its_own_connection_address() {
        let reg = |admin: &str| Registration {
            address: "10.0.0.5:4433".parse().unwrap(),
            instances: vec![],
            unhealthy: Default::default(),
            admin: Some(admin.parse().unwrap()),
        };
        let from: std::net::SocketAddr = "10.0.0.5:50000".parse().unwrap();
        let kept = |admin: &str| vouch_admin(reg(admin), from, "node-a").admin.map(|a| a.to_string());
        assert_eq!(kept("10.0.0.5:15000").as_deref(), Some("10.0.0.5:15000"));
        assert_eq!(
            kept("0.0.0.0:15000").as_deref(),
            Some("10.0.0.5:15000"),
            "a wildcard is read as the node's address"
        );
        assert_eq!(kept("127.0.0.1:15000"), None, "a remote node may not name the gateway's loopback");
        assert_eq!(kept("10.0.0.9:15000"), None, "nor another host");
        let v6: std::net::SocketAddr = "[::ffff:10.0.0.5]:50000".parse().unwrap();
        assert!(vouch_admin(reg("10.0.0.5:15000"), v6, "node-a").admin.is_some(), "IPv4-mapped is the same host");
    }
}
