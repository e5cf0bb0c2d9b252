//! Watches the gateway's config files and applies changes that parse and validate.
//!
//! Polls modification times (no platform watcher needed; `gateway.watch_interval`). A change
//! that fails is refused with a log line naming the file, the key and the reason, counted, and
//! the running config stays exactly as it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quicmesh_shared::metrics as m;
use quicmesh_shared::overlay;
use tracing::{info, warn};

use crate::control::ControlPlane;
use crate::handler::Edge;

type Stamp = (PathBuf, Option<(SystemTime, u64)>);

/// Modification stamps of the config files and of every overlay file (which may come and go).
fn stamps(files: &[PathBuf], overlays: Option<&PathBuf>) -> Vec<Stamp> {
    let mut all: Vec<PathBuf> = files.to_vec();
    if let Some(dir) = overlays {
        all.extend(overlay::files(dir, "services"));
        all.extend(overlay::files(dir, "nodes"));
    }
    all.into_iter()
        .map(|f| {
            let st = std::fs::metadata(&f).ok().and_then(|md| Some((md.modified().ok()?, md.len())));
            (f, st)
        })
        .collect()
}

pub async fn watch(
    files: Vec<PathBuf>,
    overlays: Option<PathBuf>,
    every: Duration,
    cp: Arc<ControlPlane>,
    edge: Arc<Edge>,
) {
    let mut seen = stamps(&files, overlays.as_ref());
    loop {
        tokio::time::sleep(every).await;
        let now = stamps(&files, overlays.as_ref());
        if now == seen {
            continue;
        }
        // Let a writer finish: act only once the files have held still for one interval, so a
        // half-written file is never read as the new config.
        tokio::time::sleep(every).await;
        if stamps(&files, overlays.as_ref()) != now {
            continue;
        }
        seen = now;
        match overlay::load_with_overlays(&files) {
            Ok((cfg, node_settings)) => {
                if let Some(gc) = &cfg.gateway {
                    edge.set_routes(gc.routes.clone());
                }
                cp.reload(cfg, node_settings);
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
