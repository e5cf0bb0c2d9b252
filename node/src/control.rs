//! The node's side of the control plane: register with the gateway, apply the snapshots it
//! pushes (atomically, acknowledging or rejecting each), cache the last good one on disk, and
//! reconnect with exponential backoff and jitter when the gateway is away. The data plane never
//! waits for any of this: it keeps routing with the last good snapshot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use quicmesh_shared::config::{Config, ControlTarget, TlsPaths};
use quicmesh_shared::control::{self, GatewayMsg, Instance, LineReader, NodeMsg, Snapshot};
use quicmesh_shared::identity;
use quicmesh_shared::message::body::H3Send as _;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::transport;
use tokio::sync::watch;
use tracing::{debug, info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a renewal request may wait for its answer.
const RENEW_ANSWER: Duration = Duration::from_secs(30);
/// When to ask again after a refused or unanswered renewal.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// Which of the control client's watch channels still have a sender.
struct Open {
    instances: bool,
    advertise: bool,
    health: bool,
}

pub struct ControlClient {
    pub mesh: Arc<Mesh>,
    /// This node's certificate files, rewritten on renewal.
    pub paths: TlsPaths,
    /// Renew this long before expiry; `None` means when a third of the lifetime is left.
    pub renew_before: Option<Duration>,
    /// The node's own config; snapshots replace its mesh-wide parts.
    pub local: Config,
    pub target: ControlTarget,
    /// Where peers reach this node; a new value re-registers on the open stream.
    pub advertise: watch::Receiver<SocketAddr>,
    /// This node's admin listener, reported so `quicmesh top` can read its metrics.
    pub admin: SocketAddr,
    /// The instances to register; a new value re-registers on the open stream.
    pub instances: watch::Receiver<Vec<Instance>>,
    /// Instances failing their health check, reported whenever the set changes.
    pub health: watch::Receiver<Vec<crate::health::Key>>,
    pub cache: Option<PathBuf>,
    /// Where the control plane's address is kept once a session is up (see [`remembered`]).
    pub remember: Option<PathBuf>,
    /// How the node's endpoint accepts peers, installed again with each renewed certificate.
    pub serve: transport::Serve,
}

/// The file that keeps the control plane a node last held a session with.
pub fn remember_path(nc: &quicmesh_shared::config::NodeConfig) -> Option<PathBuf> {
    nc.tls.state_dir.as_ref().map(|d| d.join(format!("{}.control.json", nc.name)))
}

/// The control plane this node last held a session with, if it kept one.
pub fn remembered(nc: &quicmesh_shared::config::NodeConfig) -> Option<(ControlTarget, PathBuf)> {
    let path = remember_path(nc)?;
    let text = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(target) => Some((target, path)),
        Err(e) => {
            warn!("ignoring unreadable {}: {e}", path.display());
            None
        }
    }
}

/// Validates a snapshot against this node's config and installs it.
pub fn apply(mesh: &Mesh, local: &Config, snap: Snapshot) -> Result<(), String> {
    install(mesh, prepare(local, snap)?);
    Ok(())
}

/// Validates a snapshot against the local config and builds its routing table: the heavy
/// part (a large mesh, Maglev tables), safe to run off the proxy's thread.
fn prepare(local: &Config, snap: Snapshot) -> Result<Table, String> {
    let version = snap.version;
    let cfg = snap.into_config(local);
    cfg.validate().map_err(|e| e.to_string())?;
    Table::compile(cfg, version).map_err(|e| e.to_string())
}

fn install(mesh: &Mesh, table: Table) {
    let version = table.version();
    mesh.apply(table);
    metrics::counter!(m::CONTROL_APPLIED).increment(1);
    metrics::gauge!(m::CONTROL_VERSION).set(version as f64);
}

/// The journal beside a cached snapshot: the delta lines applied since it was written.
fn journal_path(path: &Path) -> PathBuf {
    path.with_extension("deltas")
}

/// Loads the cached snapshot (a `GatewayMsg` line as received) with the deltas journaled after
/// it, if there is a usable one. A torn last line (the process died writing it) ends the
/// journal; deltas older than the snapshot (it was rewritten after them) are skipped.
pub fn load_cache(path: &Path) -> Option<Snapshot> {
    let data = std::fs::read(path).ok()?;
    let mut snap = match serde_json::from_slice::<GatewayMsg>(&data) {
        Ok(GatewayMsg::Snapshot(s)) => s,
        Ok(_) => return None,
        Err(e) => {
            warn!("ignoring unreadable snapshot cache {}: {e}", path.display());
            return None;
        }
    };
    let journal = std::fs::read(journal_path(path)).unwrap_or_default();
    for line in journal.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(GatewayMsg::Delta(delta)) = serde_json::from_slice::<GatewayMsg>(line) else { break };
        if delta.version <= snap.version {
            continue;
        }
        if snap.apply(delta).is_err() {
            break;
        }
    }
    Some(snap)
}

/// Writes a whole snapshot line as received (no re-encoding) and starts an empty journal.
fn store_cache(path: &Path, line: &[u8]) {
    let tmp = path.with_extension("tmp");
    let res = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        warn!("cannot cache snapshot in {}: {e}", path.display());
        return;
    }
    let _ = std::fs::remove_file(journal_path(path));
}

/// Appends a delta line to the journal: a change costs the disk its own bytes. Once the
/// journal outgrows the snapshot, the snapshot is rewritten from `table` (what the node now
/// runs) and the journal starts again, so loading never replays more than twice the mesh.
fn journal_cache(path: &Path, line: &[u8], table: &Table) {
    use std::io::Write;
    let journal = journal_path(path);
    let appended = std::fs::OpenOptions::new().create(true).append(true).open(&journal).and_then(|mut f| {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        f.write_all(&buf)?;
        f.metadata()
    });
    let outgrown = match appended {
        Ok(meta) => std::fs::metadata(path).map_or(true, |base| meta.len() > base.len()),
        Err(e) => {
            warn!("cannot journal snapshot changes in {}: {e}", journal.display());
            true
        }
    };
    if outgrown {
        match control::encode_line(&GatewayMsg::Snapshot(table.snapshot())) {
            Ok(line) => store_cache(path, &line),
            Err(e) => warn!("cannot encode the snapshot for {}: {e}", path.display()),
        }
    }
}

/// A gateway message after the blocking-pool part of handling it.
enum Received {
    /// A snapshot's or delta's version and its table, built (or why it was refused); `true`
    /// for a delta.
    Snapshot(u64, Result<Box<Table>, String>, bool),
    /// A delta from another version than the one held (this one).
    Resync(u64),
    Certificate(String),
    RenewRefused(String),
}

enum End {
    /// Shutdown requested; goodbye sent.
    Shutdown,
    /// The session broke; reconnect. `true` when a snapshot was applied in it.
    Broken(String, bool),
}

impl ControlClient {
    /// When to ask for a new certificate.
    fn renew_due(&self) -> tokio::time::Instant {
        let validity =
            identity::read_certs(&self.paths.cert).ok().and_then(|c| c.first().and_then(|c| identity::validity(c)));
        Self::due_for(validity, self.renew_before)
    }

    /// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds);
    /// publishes its expiry as a metric.
    fn due_for(validity: Option<(i64, i64)>, renew_before: Option<Duration>) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let Some((not_before, not_after)) = validity else {
            return now + Duration::from_secs(3600);
        };
        metrics::gauge!(m::CERT_EXPIRY).set(not_after as f64);
        let lifetime = not_after.saturating_sub(not_before).max(0) as u64;
        // Never closer to the start than half the lifetime: a renew_before longer than the
        // lifetime would otherwise make every new certificate due at once.
        let before = renew_before.map_or(lifetime / 3, |d| d.as_secs()).min(lifetime / 2);
        let due = not_after.saturating_sub(before as i64);
        let now_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        now + Duration::from_secs((due - now_unix).max(0) as u64)
    }

    /// Writes the renewed key and certificate and uses them for new connections, both ways.
    /// The files are written, read back and renamed off the proxy's thread: a node runs its
    /// data path on one thread by default, and a slow disk must not stall it.
    /// Returns when to renew the new certificate.
    async fn install(&self, key_pem: String, cert_pem: String) -> Result<tokio::time::Instant, String> {
        let tmp_key = self.paths.key.with_extension("key.new");
        let tmp_cert = self.paths.cert.with_extension("pem.new");
        let (ca, k, c) = (self.paths.ca.clone(), tmp_key.clone(), tmp_cert.clone());
        let creds = tokio::task::spawn_blocking(move || {
            identity::write_secret(&k, key_pem.as_bytes()).map_err(|e| e.to_string())?;
            std::fs::write(&c, cert_pem).map_err(|e| e.to_string())?;
            identity::Credentials::load(&ca, &c, &k).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let client = transport::reconfigure(
            self.mesh.pool().endpoint(),
            &creds,
            self.mesh.trust_domain(),
            &self.local.transport,
            Some(self.serve.clone()),
        )
        .map_err(|e| e.to_string())?;
        self.mesh.pool().set_client_config(client);
        // Should the process stop before the renames, the old files stay: still valid, and
        // renewed again after the next start.
        let (key, cert) = (self.paths.key.clone(), self.paths.cert.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&tmp_key, &key).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp_cert, &cert).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let validity = identity::validity(&creds.chain[0]);
        let until = validity.map_or(0, |v| v.1);
        info!(valid_until_unix = until, "certificate renewed; established connections keep running");
        Ok(Self::due_for(validity, self.renew_before))
    }

    /// Runs until `shutdown` turns true; then says goodbye to the gateway.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        // The configured address first, then each replica in turn after a break; names are
        // looked up again each time the list comes round.
        let mut addresses = self.addresses(&[]).await;
        let mut at = 0;
        loop {
            if at >= addresses.len() {
                addresses = self.addresses(&addresses).await;
                at = 0;
            }
            let Some(&address) = addresses.get(at) else {
                warn!(gateway = %self.target.address, "the control plane's address resolves to nothing; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            };
            match self.session(&mut shutdown, address).await {
                End::Shutdown => return,
                End::Broken(reason, progressed) => {
                    metrics::gauge!(m::CONTROL_CONNECTED).set(0.0);
                    if progressed {
                        backoff = BACKOFF_MIN;
                    }
                    // Full jitter between half and the whole backoff.
                    let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                    at += 1;
                    warn!(
                        gateway = %address,
                        next = %addresses.get(at).map_or_else(|| self.target.address.to_string(), |a| a.to_string()),
                        reason,
                        retry_in = ?wait,
                        "no session with the control plane; serving what this node has and retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The addresses to try, in order: each of the configured address's, then each replica's.
    /// A name that does not resolve now keeps the addresses it had in `before`.
    async fn addresses(&self, before: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut all = Vec::new();
        for target in std::iter::once(&self.target.address).chain(&self.target.replicas) {
            match target.resolve().await {
                Ok(found) => all.extend(found.into_iter().filter(|a| !all.contains(a)).collect::<Vec<_>>()),
                Err(e) => {
                    warn!(gateway = %target, "cannot look up the control plane's address: {e}");
                    return before.to_vec();
                }
            }
        }
        all
    }

    /// The registration: where peers reach this node, what it hosts, what it runs.
    fn hello(&self, instances: Vec<Instance>) -> NodeMsg {
        NodeMsg::Hello {
            address: *self.advertise.borrow(),
            instances,
            version: self.mesh.table().version(),
            admin: Some(self.admin),
            protocol: control::PROTOCOL,
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>, address: SocketAddr) -> End {
        let broken = |e: String| End::Broken(e, false);
        let pc = match self.mesh.pool().dial(&self.target.name, address).await {
            Ok(pc) => pc,
            Err(e) => return broken(e.to_string()),
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{}", self.target.name, control::STREAM_PATH))
            .body(())
            .expect("static request");
        // What this node holds, so another replica can renumber it instead of resending it.
        let held = self.mesh.table();
        if held.version() != 0 {
            if let Ok(v) = http::HeaderValue::from_str(&held.snapshot().digest()) {
                req.headers_mut().insert(control::HELD_DIGEST_HEADER, v);
            }
        }
        drop(held);
        if let Err(e) = pc.ready_for(&Method::POST).await {
            return broken(e.to_string());
        }
        let stream = match pc.open(req).await {
            Ok(s) => s,
            Err(e) => {
                self.mesh.pool().evict(&self.target.name, &pc.conn).await;
                return broken(e.to_string());
            }
        };
        let (mut send, mut recv) = stream.split();
        let mut instances = self.instances.clone();
        let mut advertise = self.advertise.clone();
        advertise.borrow_and_update();
        let hello = self.hello(instances.borrow_and_update().clone());
        if let Err(e) = control::send_line(&mut send, &hello).await {
            return broken(e.to_string());
        }
        match recv.recv_response().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => return broken(format!("gateway answered {}", r.status())),
            Err(e) => return broken(e.to_string()),
        }
        metrics::gauge!(m::CONTROL_CONNECTED).set(1.0);
        if let Some(path) = &self.remember {
            let known = std::fs::read(path).ok().and_then(|t| serde_json::from_slice::<ControlTarget>(&t).ok());
            if known.is_none_or(|k| k.address != self.target.address || k.name != self.target.name) {
                let text = serde_json::to_vec_pretty(&self.target).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    warn!("cannot keep the control plane's address in {}: {e}", path.display());
                }
            }
        }
        let mut health = self.health.clone();
        let report = NodeMsg::Health { unhealthy: health.borrow_and_update().clone() };
        if let Err(e) = control::send_line(&mut send, &report).await {
            return broken(e.to_string());
        }
        let mut reader = LineReader::new(recv);
        let mut progressed = false;
        let mut open = Open { instances: true, advertise: true, health: true };
        let mut renew_at = self.renew_due();
        let mut pending_key: Option<String> = None;
        loop {
            tokio::select! {
                // A closed channel is ready at once, every time: stop polling it.
                changed = instances.changed(), if open.instances => {
                    if changed.is_err() {
                        open.instances = false;
                        continue;
                    }
                    let hello = self.hello(instances.borrow_and_update().clone());
                    if let Err(e) = control::send_line(&mut send, &hello).await {
                        return End::Broken(e.to_string(), progressed);
                    }
                    info!("registered the changed instances with the gateway");
                }
                changed = advertise.changed(), if open.advertise => {
                    if changed.is_err() {
                        open.advertise = false;
                        continue;
                    }
                    let address = *advertise.borrow_and_update();
                    let hello = self.hello(instances.borrow().clone());
                    if let Err(e) = control::send_line(&mut send, &hello).await {
                        return End::Broken(e.to_string(), progressed);
                    }
                    info!(%address, "registered the new address with the gateway");
                }
                changed = health.changed(), if open.health => {
                    if changed.is_err() {
                        open.health = false;
                        continue;
                    }
                    let report = NodeMsg::Health { unhealthy: health.borrow_and_update().clone() };
                    if let Err(e) = control::send_line(&mut send, &report).await {
                        return End::Broken(e.to_string(), progressed);
                    }
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    if pending_key.take().is_some() {
                        // No answer in time: forget this key and try again later.
                        warn!("no answer to the renewal request; retrying later");
                        renew_at = tokio::time::Instant::now() + RENEW_RETRY;
                        continue;
                    }
                    let name = self.local.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                    match identity::signing_request(&name) {
                        Ok((key, csr)) => {
                            if let Err(e) = control::send_line(&mut send, &NodeMsg::Renew { csr }).await {
                                return End::Broken(e.to_string(), progressed);
                            }
                            info!("asked the gateway to renew this node's certificate");
                            pending_key = Some(key);
                            renew_at = tokio::time::Instant::now() + RENEW_ANSWER;
                        }
                        Err(e) => {
                            warn!("cannot make a renewal key: {e}");
                            renew_at = tokio::time::Instant::now() + BACKOFF_MAX;
                        }
                    }
                }
                line = reader.next_raw() => {
                    let line = match line {
                        Ok(Some(l)) => l,
                        Ok(None) => return End::Broken("gateway closed the stream".into(), progressed),
                        Err(e) => return End::Broken(e.to_string(), progressed),
                    };
                    // Parsing, validating and building the table of a large mesh takes a
                    // while: off the proxy's thread (a node runs on one by default).
                    let local = self.local.clone();
                    let held = self.mesh.table();
                    let work = tokio::task::spawn_blocking(move || {
                        let msg = serde_json::from_slice::<GatewayMsg>(&line).map(|m| match m {
                            GatewayMsg::Snapshot(s) => Received::Snapshot(s.version, prepare(&local, s).map(Box::new), false),
                            GatewayMsg::Delta(d) if d.from != held.version() => Received::Resync(held.version()),
                            GatewayMsg::Delta(d) => {
                                let version = d.version;
                                Received::Snapshot(version, held.patch(d).map(Box::new).map_err(|e| e.to_string()), true)
                            }
                            GatewayMsg::Certificate { certificate } => Received::Certificate(certificate),
                            GatewayMsg::RenewRefused { reason } => Received::RenewRefused(reason),
                        });
                        // A whole snapshot's parse and compile freed a lot on this thread.
                        if matches!(msg, Ok(Received::Snapshot(_, _, false))) {
                            quicmesh_shared::runtime::release_memory();
                        }
                        (msg, line)
                    });
                    let Ok((msg, line)) = work.await else {
                        return End::Broken("snapshot processing failed".into(), progressed);
                    };
                    let (version, prepared, delta) = match msg {
                        Ok(Received::Snapshot(version, prepared, delta)) => (version, prepared, delta),
                        Ok(Received::Resync(held)) => {
                            debug!(held, "a delta for another version; asking for the whole snapshot");
                            if let Err(e) = control::send_line(&mut send, &NodeMsg::Resync { held }).await {
                                return End::Broken(e.to_string(), progressed);
                            }
                            continue;
                        }
                        Ok(Received::Certificate(certificate)) => {
                            match pending_key.take() {
                                Some(key) => match self.install(key, certificate).await {
                                    Ok(due) => renew_at = due,
                                    Err(e) => warn!("renewed certificate unusable, keeping the current one: {e}"),
                                },
                                None => warn!("ignored a certificate that was not asked for"),
                            }
                            continue;
                        }
                        Ok(Received::RenewRefused(reason)) => {
                            warn!(reason, "the gateway refused to renew this node's certificate; retrying later");
                            pending_key = None;
                            renew_at = tokio::time::Instant::now() + RENEW_RETRY;
                            continue;
                        }
                        Err(e) => return End::Broken(format!("bad message from the gateway: {e}"), progressed),
                    };
                    let reply = match prepared {
                        Ok(table) => {
                            install(&self.mesh, *table);
                            progressed = true;
                            if let Some(path) = self.cache.clone() {
                                let table = self.mesh.table();
                                let _ = tokio::task::spawn_blocking(move || {
                                    if delta {
                                        journal_cache(&path, &line, &table)
                                    } else {
                                        store_cache(&path, &line)
                                    }
                                })
                                .await;
                            }
                            if !delta {
                                // The table replaced and the line (unless the cache's writer
                                // took it) are gone by now.
                                quicmesh_shared::runtime::release_memory();
                            }
                            debug!(version, "applied snapshot");
                            NodeMsg::Ack { version }
                        }
                        Err(reason) => {
                            metrics::counter!(m::CONTROL_NACKS).increment(1);
                            warn!(version, reason, "rejected snapshot; keeping the previous one");
                            NodeMsg::Nack { version, reason }
                        }
                    };
                    if let Err(e) = control::send_line(&mut send, &reply).await {
                        return End::Broken(e.to_string(), progressed);
                    }
                }
                _ = shutdown.changed() => {
                    let _ = control::send_line(&mut send, &NodeMsg::Goodbye).await;
                    let _ = send.finish().await;
                    // Wait for the gateway to end its side, so the goodbye is read before the
                    // connection closes.
                    let drain = async { while let Ok(Some(_)) = reader.next::<GatewayMsg>().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    info!("deregistered from the gateway");
                    return End::Shutdown;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use quicmesh_shared::config::{EndpointConfig, PeerConfig, ServiceConfig};

    use super::*;

    fn snapshot(version: u64, services: usize) -> Snapshot {
        Snapshot {
            version,
            nodes: vec![PeerConfig { name: "b".into(), address: ([10, 0, 0, 2], 4433).into() }],
            services: (0..services)
                .map(|s| ServiceConfig {
                    endpoints: vec![EndpointConfig {
                        node: "b".into(),
                        address: ([10, 0, 1, s as u8], 80).into(),
                        labels: Default::default(),
                        healthy: true,
                    }],
                    ..ServiceConfig::named(format!("svc-{s:02}"))
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The cache is the snapshot as received plus a journal of the deltas applied since: loading
    /// replays them (a torn last line ends the journal), and a journal grown past the snapshot
    /// is folded into a new snapshot.
    #[test]
    fn the_cache_replays_its_journal_and_folds_it_when_it_outgrows_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.snapshot.json");
        let mut held = snapshot(1, 20);
        store_cache(&path, &control::encode_line(&GatewayMsg::Snapshot(held.clone())).unwrap());
        let table_of = |s: &Snapshot| Table::compile(s.clone().into_config(&Config::default()), s.version).unwrap();
        let mut folded = false;
        for v in 2..60u64 {
            let mut next = held.clone();
            next.version = v;
            let ep = &mut next.services[(v % 20) as usize].endpoints[0];
            ep.healthy = !ep.healthy;
            let line = control::encode_line(&GatewayMsg::Delta(held.diff(&next))).unwrap();
            journal_cache(&path, &line[..line.len() - 1], &table_of(&next));
            folded |= !journal_path(&path).exists();
            held = next;
            assert_eq!(load_cache(&path).as_ref(), Some(&held), "after version {v}");
        }
        assert!(folded, "the journal never outgrew the snapshot");
        // A torn append: the journal ends at the last whole line.
        let mut next = held.clone();
        next.version = 60;
        next.services.pop();
        let line = control::encode_line(&GatewayMsg::Delta(held.diff(&next))).unwrap();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(journal_path(&path)).unwrap();
        f.write_all(&line[..line.len() / 2]).unwrap();
        assert_eq!(load_cache(&path).as_ref(), Some(&held));
    }

    /// A node reads and applies what a gateway of protocol version 1 (the release before
    /// deltas) sent, recorded from that release.
    #[test]
    fn the_previous_protocol_s_gateway_lines_are_read_and_applied() {
        let text = include_str!("../../tests/fixtures/control/v1/gateway.jsonl");
        let local = quicmesh_shared::config::from_toml(
            "[node]\nname = \"node-c\"\n[node.gateway]\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let mut kinds = Vec::new();
        for line in text.lines() {
            match serde_json::from_str::<GatewayMsg>(line).unwrap() {
                GatewayMsg::Snapshot(s) => {
                    let table = prepare(&local, s).unwrap();
                    assert!(table.service("hello").is_some_and(|s| s.config.endpoints.len() == 1));
                    assert_eq!(table.routes().routes().len(), 1);
                    assert!(table.is_revoked("node-x"));
                    kinds.push("snapshot");
                }
                GatewayMsg::Certificate { .. } => kinds.push("certificate"),
                GatewayMsg::RenewRefused { .. } => kinds.push("refused"),
                GatewayMsg::Delta(_) => panic!("version 1 sent no deltas"),
            }
        }
        assert_eq!(kinds, ["snapshot", "certificate", "refused"]);
    }
}
