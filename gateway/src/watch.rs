//! Watches the gateway's config files and applies changes that parse and validate.
//!
//! Polls modification times (no platform watcher needed; `gateway.watch_interval`). A change
//! that fails is refused with a log line naming the file, the key and the reason, counted, and
//! the running config stays exactly as it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quicmesh_shared::config;
use quicmesh_shared::metrics as m;
use tracing::{info, warn};

use crate::control::ControlPlane;
use crate::handler::Edge;

fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files.iter().map(|f| std::fs::metadata(f).ok().and_then(|md| Some((md.modified().ok()?, md.len())))).collect()
}

pub async fn watch(files: Vec<PathBuf>, every: Duration, cp: Arc<ControlPlane>, edge: Arc<Edge>) {
    let mut seen = stamps(&files);
    loop {
        tokio::time::sleep(every).await;
        let now = stamps(&files);
        if now == seen {
            continue;
        }
        seen = now;
        match config::load(&files) {
            Ok(cfg) => {
                if let Some(gc) = &cfg.gateway {
                    edge.set_routes(gc.routes.clone());
                }
                cp.reload(cfg);
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
