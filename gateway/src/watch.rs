//! Watches the gateway's config files and applies changes that parse and validate.
//!
//! Polled every `gateway.watch_interval` (`quicmesh_shared::config::watch`). A change
//! that fails is refused with a log line naming the file, the key and the reason, counted, and
//! the running config stays exactly as it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_shared::config::overlay;
use quicmesh_shared::config::watch::FileWatch;
use quicmesh_shared::telemetry::metrics as m;
use tracing::{info, warn};

use crate::control::ControlPlane;

/// The config files and every overlay file (which may come and go).
fn files(files: &[PathBuf], overlays: Option<&PathBuf>) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = files.to_vec();
    if let Some(dir) = overlays {
        all.extend(overlay::files(dir, "services"));
        all.extend(overlay::files(dir, "nodes"));
    }
    all
}

/// Watches from this call on (see [`FileWatch`]); the future reloads on every change.
pub fn watch(
    files: Vec<PathBuf>,
    overlays: Option<PathBuf>,
    every: Duration,
    cp: Arc<ControlPlane>,
) -> impl std::future::Future<Output = ()> + Send {
    let list = files.clone();
    // A change found by polling counts once the files have held still for one interval.
    let folders: Vec<PathBuf> =
        overlays.iter().flat_map(|dir| ["services", "nodes"].map(|sub| dir.join(sub))).collect();
    let watch = FileWatch::new(move || self::files(&list, overlays.as_ref()), every, every).with_folders(&folders);
    reload_on_change(watch, cp)
}

async fn reload_on_change<F: Fn() -> Vec<PathBuf>>(mut watch: FileWatch<F>, cp: Arc<ControlPlane>) {
    loop {
        watch.changed().await;
        // Reading, checking and compiling a large config takes a while: off the event loop,
        // which also reads every worker's QUIC packets.
        let reload = cp.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            let reloaded = reload.reload_sources();
            quicmesh_shared::runtime::release_memory();
            reloaded
        })
        .await
        .unwrap_or_else(|e| Err(format!("the reload stopped: {e}")));
        match reloaded {
            Ok(()) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "applied").increment(1);
                info!(version = cp.version(), "config reloaded");
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "rejected").increment(1);
                warn!(error = %e, "config change refused; the running config is unchanged");
            }
        }
    }
}
