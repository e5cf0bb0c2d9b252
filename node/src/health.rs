//! Active health checks of the instances this node hosts: an HTTP GET of a path (2xx or 3xx
//! passes) or a TCP connect, every `interval`, within `timeout`, with healthy and unhealthy
//! thresholds. The set of failing instances goes to the control plane, which marks them in every
//! node's snapshot so no proxy sends them traffic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HOST, USER_AGENT};
use http::{HeaderValue, Request};
use quicmesh_shared::config::ServiceConfig;
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
    // What every probe shares, made once: the counters' handles (a lookup by labels otherwise;
    // each made at its first use, so a series appears with its first count as before), the
    // request's target and `Host`, and how to speak to the instance, redone only when the
    // service's backend TLS changes.
    let mut counters: [Option<metrics::Counter>; 2] = [None, None];
    let target = match &check.http {
        None => Target::Tcp,
        Some(path) => match (http::Uri::try_from(path.as_str()), HeaderValue::try_from(inst.address.to_string())) {
            (Ok(uri), Ok(host)) => Target::Http(uri, host),
            // A path the config accepted but a request cannot carry: every probe fails.
            _ => {
                warn!(service = inst.service, path = %path, "health check path is not a valid request target");
                Target::Invalid
            }
        },
    };
    let mut svc: Option<ServiceConfig> = None;
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Until the node's view holds the service it cannot say how to speak to the instance.
        let Some(service) = mesh.table().service(&inst.service).cloned() else {
            continue;
        };
        let backend_tls = &service.config.backend_tls;
        if svc.as_ref().is_none_or(|s| s.backend_tls != *backend_tls) {
            // Spoken as requests are: over TLS when the service's instances want it.
            svc = Some(ServiceConfig {
                protocol: inst.protocol,
                backend_tls: backend_tls.clone(),
                ..ServiceConfig::named(inst.service.clone())
            });
        }
        let passed = match (&target, &svc) {
            (Target::Tcp, _) => probe_tcp(&inst, &check).await,
            (Target::Http(uri, host), Some(svc)) => probe_http(&inst, &check, &mesh, svc, uri, host).await,
            _ => false,
        };
        let result = if passed { "pass" } else { "fail" };
        counters[usize::from(passed)]
            .get_or_insert_with(
                || metrics::counter!(m::HEALTH_CHECKS, "service" => inst.service.clone(), "result" => result),
            )
            .increment(1);
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

/// What a check asks of its instance.
enum Target {
    /// A TCP connect.
    Tcp,
    /// A GET of this target, with this `Host`.
    Http(http::Uri, HeaderValue),
    /// An HTTP check whose path no request can carry: it fails.
    Invalid,
}

/// A TCP check: the instance accepts a connection within the check's timeout.
async fn probe_tcp(inst: &Instance, check: &HealthCheck) -> bool {
    let connect = tokio::net::TcpStream::connect(inst.address);
    matches!(tokio::time::timeout(check.timeout, connect).await, Ok(Ok(_)))
}

/// An HTTP check: a GET of `uri` answered 2xx or 3xx within the check's timeout.
async fn probe_http(
    inst: &Instance,
    check: &HealthCheck,
    mesh: &Mesh,
    svc: &ServiceConfig,
    uri: &http::Uri,
    host: &HeaderValue,
) -> bool {
    let attempt = async {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = uri.clone();
        req.headers_mut().insert(HOST, host.clone());
        req.headers_mut().insert(USER_AGENT, HeaderValue::from_static("quicmesh-health-check"));
        match mesh.local().send(req, inst.address, svc).await {
            Ok(resp) => {
                let ok = resp.status().is_success() || resp.status().is_redirection();
                // Read the answer so the pooled connection can be reused.
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                ok
            }
            Err(_) => false,
        }
    };
    tokio::time::timeout(check.timeout, attempt).await.unwrap_or(false)
}
