//! The node's side of the control plane: register with the gateway, apply the snapshots it
//! pushes (atomically, acknowledging or rejecting each), cache the last good one on disk, and
//! reconnect with exponential backoff and jitter when the gateway is away. The data plane never
//! waits for any of this: it keeps routing with the last good snapshot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use quicmesh_shared::config::{Config, ControlTarget};
use quicmesh_shared::control::{self, GatewayMsg, Instance, LineReader, NodeMsg, Snapshot};
use quicmesh_shared::mesh::{Mesh, Table};
use quicmesh_shared::metrics as m;
use tokio::sync::watch;
use tracing::{debug, info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct ControlClient {
    pub mesh: Arc<Mesh>,
    /// The node's own config; snapshots replace its mesh-wide parts.
    pub local: Config,
    pub target: ControlTarget,
    pub advertise: SocketAddr,
    pub instances: Vec<Instance>,
    pub cache: Option<PathBuf>,
}

/// Validates a snapshot against this node's config and installs it.
pub fn apply(mesh: &Mesh, local: &Config, snap: Snapshot) -> Result<(), String> {
    let version = snap.version;
    let cfg = snap.into_config(local);
    cfg.validate().map_err(|e| e.to_string())?;
    mesh.apply(Table::new(cfg, version));
    metrics::counter!(m::CONTROL_APPLIED).increment(1);
    metrics::gauge!(m::CONTROL_VERSION).set(version as f64);
    Ok(())
}

/// Loads a cached snapshot (a `GatewayMsg` line as received), if there is a usable one.
pub fn load_cache(path: &Path) -> Option<Snapshot> {
    let data = std::fs::read(path).ok()?;
    match serde_json::from_slice::<GatewayMsg>(&data) {
        Ok(GatewayMsg::Snapshot(s)) => Some(s),
        Err(e) => {
            warn!("ignoring unreadable snapshot cache {}: {e}", path.display());
            None
        }
    }
}

/// Writes the line as received: no re-encoding of a large snapshot.
fn store_cache(path: &Path, line: &[u8]) {
    let tmp = path.with_extension("tmp");
    let res = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        warn!("cannot cache snapshot in {}: {e}", path.display());
    }
}

enum End {
    /// Shutdown requested; goodbye sent.
    Shutdown,
    /// The session broke; reconnect. `true` when a snapshot was applied in it.
    Broken(String, bool),
}

impl ControlClient {
    /// Runs until `shutdown` turns true; then says goodbye to the gateway.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session(&mut shutdown).await {
                End::Shutdown => return,
                End::Broken(reason, progressed) => {
                    metrics::gauge!(m::CONTROL_CONNECTED).set(0.0);
                    if progressed {
                        backoff = BACKOFF_MIN;
                    }
                    // Full jitter between half and the whole backoff.
                    let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                    debug!(reason, ?wait, "control stream down; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> End {
        let broken = |e: String| End::Broken(e, false);
        let pc = match self.mesh.pool.get(&self.target.name, self.target.address).await {
            Ok(pc) => pc,
            Err(e) => return broken(e.to_string()),
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{}", self.target.name, control::STREAM_PATH))
            .body(())
            .expect("static request");
        let mut sender = pc.h3.clone();
        let stream = match sender.send_request(req).await {
            Ok(s) => s,
            Err(e) => {
                self.mesh.pool.evict(&self.target.name, &pc.conn).await;
                return broken(e.to_string());
            }
        };
        let (mut send, mut recv) = stream.split();
        let hello = NodeMsg::Hello {
            address: self.advertise,
            instances: self.instances.clone(),
            version: self.mesh.table().version,
        };
        if let Err(e) = control::send_line(&mut send, &hello).await {
            return broken(e.to_string());
        }
        match recv.recv_response().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => return broken(format!("gateway answered {}", r.status())),
            Err(e) => return broken(e.to_string()),
        }
        metrics::gauge!(m::CONTROL_CONNECTED).set(1.0);
        let mut reader = LineReader::new(recv);
        let mut progressed = false;
        loop {
            tokio::select! {
                line = reader.next_raw() => {
                    let line = match line {
                        Ok(Some(l)) => l,
                        Ok(None) => return End::Broken("gateway closed the stream".into(), progressed),
                        Err(e) => return End::Broken(e.to_string(), progressed),
                    };
                    let snap = match serde_json::from_slice::<GatewayMsg>(&line) {
                        Ok(GatewayMsg::Snapshot(s)) => s,
                        Err(e) => return End::Broken(format!("bad message from the gateway: {e}"), progressed),
                    };
                    let version = snap.version;
                    let reply = match apply(&self.mesh, &self.local, snap) {
                        Ok(()) => {
                            progressed = true;
                            if let Some(path) = &self.cache {
                                store_cache(path, &line);
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
