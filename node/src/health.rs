//! Active health checks of the instances this node hosts: an HTTP GET of a path (2xx or 3xx
//! passes) or a TCP connect, every `interval`, within `timeout`, with healthy and unhealthy
//! thresholds. The set of failing instances goes to the control plane, which marks them in every
//! node's snapshot so no proxy sends them traffic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use quicmesh_shared::config::{BackendTls, ServiceConfig};
use quicmesh_shared::control::Instance;
use quicmesh_shared::message::body;
use quicmesh_shared::policy::health::{HealthCheck, Thresholds};
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::telemetry::metrics as m;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// (service, address) of an instance.
pub type Key = (String, SocketAddr);

/// Checks the instances in `instances` (restarting when they change) and publishes the set of
/// unhealthy ones on `out`. Runs until `instances` closes.
pub async fn run(mut instances: watch::Receiver<Vec<Instance>>, out: watch::Sender<Vec<Key>>, mesh: Arc<Mesh>) {
    loop {
        let list = instances.borrow_and_update().clone();
        let (tx, mut rx) = mpsc::channel::<(Key, bool)>(64);
        let mut checks = JoinSet::new();
        for inst in list {
            if let Some(check) = inst.health.clone() {
                checks.spawn(check_loop(inst, check, tx.clone(), mesh.clone()));
            }
        }
        drop(tx);
        let mut unhealthy: BTreeSet<Key> =
            out.borrow().iter().filter(|k| checks_cover(&instances.borrow(), k)).cloned().collect();
        out.send_if_modified(|cur| {
            let next: Vec<Key> = unhealthy.iter().cloned().collect();
            let changed = *cur != next;
            *cur = next;
            changed
        });
        loop {
            tokio::select! {
                changed = instances.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Dropping `checks` stops the old probes; start over with the new list.
                    break;
                }
                Some((key, healthy)) = rx.recv() => {
                    let changed = if healthy { unhealthy.remove(&key) } else { unhealthy.insert(key) };
                    if changed {
                        out.send_replace(unhealthy.iter().cloned().collect());
                    }
                }
            }
        }
    }
}

/// Is `key` still an instance with a health check?
fn checks_cover(instances: &[Instance], key: &Key) -> bool {
    instances.iter().any(|i| i.health.is_some() && i.service == key.0 && i.address == key.1)
}

async fn check_loop(inst: Instance, check: HealthCheck, tx: mpsc::Sender<(Key, bool)>, mesh: Arc<Mesh>) {
    let key: Key = (inst.service.clone(), inst.address);
    let mut state = Thresholds::default();
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Until the node's view holds the service it cannot say how to speak to the instance.
        let Some(backend_tls) = mesh.table().service(&inst.service).map(|s| s.config.backend_tls.clone()) else {
            continue;
        };
        let passed = probe(&inst, &check, &mesh, backend_tls).await;
        let result = if passed { "pass" } else { "fail" };
        metrics::counter!(m::HEALTH_CHECKS, "service" => inst.service.clone(), "result" => result).increment(1);
        if let Some(healthy) = state.record(&check, passed) {
            metrics::gauge!(m::HEALTHY, "service" => inst.service.clone()).set(if healthy { 1.0 } else { 0.0 });
            if healthy {
                info!(service = inst.service, address = %inst.address, "instance is healthy");
            } else {
                warn!(service = inst.service, address = %inst.address, "instance failed its health check");
            }
            if tx.send((key.clone(), healthy)).await.is_err() {
                return;
            }
        }
    }
}

async fn probe(inst: &Instance, check: &HealthCheck, mesh: &Mesh, backend_tls: Option<BackendTls>) -> bool {
    let attempt = async {
        match &check.http {
            None => tokio::net::TcpStream::connect(inst.address).await.is_ok(),
            Some(path) => {
                let Ok(req) = Request::get(path.as_str())
                    .header(http::header::HOST, inst.address.to_string())
                    .header(http::header::USER_AGENT, "quicmesh-health-check")
                    .body(body::empty())
                else {
                    return false;
                };
                // Spoken as requests are: over TLS when the service's instances want it.
                let svc = ServiceConfig {
                    protocol: inst.protocol,
                    backend_tls,
                    ..ServiceConfig::named(inst.service.clone())
                };
                match mesh.local().send(req, inst.address, &svc).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success() || resp.status().is_redirection();
                        // Read the answer so the pooled connection can be reused.
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        ok
                    }
                    Err(_) => false,
                }
            }
        }
    };
    tokio::time::timeout(check.timeout, attempt).await.unwrap_or(false)
}
