//! Metric names, descriptions and the process-wide Prometheus recorder.
//!
//! Names follow `quicmesh_<subsystem>_<what>_<unit>`; counters end in `_total`. Label values are
//! bounded: directions, service and node names from config, status classes and reason enums.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "quicmesh_requests_total";
pub const REQUEST_DURATION: &str = "quicmesh_request_duration_seconds";
pub const PROXY_ERRORS: &str = "quicmesh_proxy_errors_total";
pub const QUIC_CONNECTIONS_OPENED: &str = "quicmesh_quic_connections_opened_total";
pub const QUIC_CONNECTIONS_ACTIVE: &str = "quicmesh_quic_connections_active";
pub const QUIC_HANDSHAKE_FAILURES: &str = "quicmesh_quic_handshake_failures_total";
pub const TCP_CONNECTIONS: &str = "quicmesh_tcp_connections_total";
pub const TCP_BYTES: &str = "quicmesh_tcp_bytes_total";
pub const EDGE_CONNECTIONS: &str = "quicmesh_edge_connections_total";
pub const EDGE_REJECTED: &str = "quicmesh_edge_rejected_total";
pub const QUIC_ADMISSION: &str = "quicmesh_quic_admission_total";
pub const EDGE_IDLE_CLOSED: &str = "quicmesh_edge_idle_closed_total";
pub const EDGE_JWT: &str = "quicmesh_edge_jwt_total";
pub const EXT_AUTHZ: &str = "quicmesh_ext_authz_total";
pub const EDGE_JWKS_FAILURES: &str = "quicmesh_edge_jwks_failures_total";
pub const ACME_ISSUED: &str = "quicmesh_acme_certificates_issued_total";
pub const ACME_FAILURES: &str = "quicmesh_acme_failures_total";
pub const ACME_EXPIRY: &str = "quicmesh_acme_certificate_expiry_timestamp_seconds";
pub const BUILD_INFO: &str = "quicmesh_build_info";
pub const RUNTIME_WORKERS: &str = "quicmesh_runtime_workers";
pub const WORKER_CONNECTIONS: &str = "quicmesh_worker_connections_total";
pub const CONTROL_VERSION: &str = "quicmesh_control_snapshot_version";
pub const CONTROL_NODES: &str = "quicmesh_control_connected_nodes";
pub const CONTROL_NACKS: &str = "quicmesh_control_snapshots_rejected_total";
pub const CONTROL_PUSH_DURATION: &str = "quicmesh_control_push_duration_seconds";
pub const CONTROL_PUSH_BYTES: &str = "quicmesh_control_push_bytes_total";
pub const CONTROL_APPLIED: &str = "quicmesh_control_snapshots_applied_total";
pub const CONTROL_CONNECTED: &str = "quicmesh_control_connected";
pub const CONFIG_RELOADS: &str = "quicmesh_config_reloads_total";
pub const ENROLLMENTS: &str = "quicmesh_enrollments_total";
pub const CERT_EXPIRY: &str = "quicmesh_certificate_expiry_timestamp_seconds";
pub const RETRIES: &str = "quicmesh_retries_total";
pub const RETRY_BUDGET_EXHAUSTED: &str = "quicmesh_retry_budget_exhausted_total";
pub const CIRCUIT_OPEN: &str = "quicmesh_circuit_breaker_rejections_total";
pub const OUTLIER_EJECTIONS: &str = "quicmesh_outlier_ejections_total";
pub const HEALTH_CHECKS: &str = "quicmesh_health_checks_total";
pub const HEALTHY: &str = "quicmesh_instance_healthy";
pub const RATE_LIMITED: &str = "quicmesh_rate_limited_total";
pub const RULE_MATCHES: &str = "quicmesh_route_rule_matches_total";
pub const FAULTS: &str = "quicmesh_faults_injected_total";
pub const DRAINING: &str = "quicmesh_draining";
pub const AUTHZ_DENIED: &str = "quicmesh_authz_denied_total";
pub const REQUESTS_IN_FLIGHT: &str = "quicmesh_requests_in_flight";
pub const REQUEST_BYTES: &str = "quicmesh_request_bytes_total";
pub const RESPONSE_BYTES: &str = "quicmesh_response_bytes_total";
pub const ACCESS_LOG_DROPPED: &str = "quicmesh_access_log_dropped_total";
pub const TRACE_SPANS: &str = "quicmesh_trace_spans_total";
pub const LOG_DROPPED: &str = "quicmesh_log_dropped_total";
pub const QUIC_RTT: &str = "quicmesh_quic_rtt_seconds";
pub const QUIC_CWND: &str = "quicmesh_quic_congestion_window_bytes";
pub const QUIC_MTU: &str = "quicmesh_quic_datagram_size_bytes";
pub const QUIC_LOST_PACKETS: &str = "quicmesh_quic_lost_packets_total";
pub const QUIC_SENT_PACKETS: &str = "quicmesh_quic_sent_packets_total";
pub const QUIC_STREAMS: &str = "quicmesh_quic_streams_total";
pub const QUIC_ZERO_RTT: &str = "quicmesh_quic_zero_rtt_total";
pub const QUIC_WINDOW_LENT: &str = "quicmesh_quic_window_lent_bytes";
pub const QUIC_STALLED_STOPPED: &str = "quicmesh_quic_stalled_streams_stopped_total";
pub const PEER_UNREACHABLE: &str = "quicmesh_peer_unreachable";
pub const PEER_PROBES: &str = "quicmesh_peer_probes_total";
pub const TCP_CLOSED: &str = "quicmesh_tcp_connections_closed_total";
pub const TCP_IDLE_CLOSED: &str = "quicmesh_tcp_idle_closed_total";
pub const CONTROL_NODE_VERSION: &str = "quicmesh_control_node_acked_version";
pub const CONTROL_CERT_EXPIRY: &str = "quicmesh_control_certificate_expiry_timestamp_seconds";

/// Latency buckets from 100 us to 30 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Reads how many diagnostic log lines the process has dropped so far.
type DropCount = Box<dyn Fn() -> u64 + Send + Sync>;
static LOG_DROPS: OnceLock<DropCount> = OnceLock::new();

/// Where `quicmesh_log_dropped_total` comes from: the diagnostic log's writer, which drops lines
/// rather than stall the process when stderr does not keep up. Read at every upkeep (5 s).
pub fn count_log_drops(read: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPS.set(Box::new(read));
}

fn publish_log_drops() {
    if let Some(read) = LOG_DROPS.get() {
        metrics::counter!(LOG_DROPPED).absolute(read());
    }
}

/// Installs the Prometheus recorder once per process and returns its handle (None if another
/// recorder was installed first, e.g. by an embedding program).
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            publish_log_drops();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    publish_log_drops();
                    upkeep.run_upkeep();
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(REQUESTS, "HTTP requests handled by a proxy, by direction, service and status class.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time from request received to response headers sent.");
    describe_counter!(PROXY_ERRORS, "Responses the proxy produced itself, by quicmesh-error reason.");
    describe_counter!(QUIC_CONNECTIONS_OPENED, "QUIC connections established with peer members.");
    describe_gauge!(QUIC_CONNECTIONS_ACTIVE, "QUIC connections currently open with peer members.");
    describe_counter!(QUIC_HANDSHAKE_FAILURES, "QUIC/TLS handshakes that failed, by direction and reason.");
    describe_gauge!(
        PEER_UNREACHABLE,
        "1 while a peer member is marked unreachable (its handshake failed; requests skip it until a probe reaches it), else 0."
    );
    describe_counter!(PEER_PROBES, "Background handshakes to unreachable peers, by peer and result (reached, failed).");
    describe_counter!(TCP_CONNECTIONS, "Opaque TCP connections tunnelled, by direction and service.");
    describe_counter!(TCP_BYTES, Unit::Bytes, "Bytes carried through TCP tunnels, by direction.");
    describe_counter!(EDGE_CONNECTIONS, "Client connections accepted by the gateway, by protocol.");
    describe_counter!(EDGE_REJECTED, "Client requests or connections the gateway refused, by reason.");
    describe_counter!(
        EDGE_IDLE_CLOSED,
        "Client connections the gateway closed for having no request in flight (before a first request: header_read_timeout; after: idle_timeout)."
    );
    describe_counter!(
        EDGE_JWT,
        "JWT checks at the edge, by provider and result (ok, missing, expired, bad-signature, ...)."
    );
    describe_counter!(
        EXT_AUTHZ,
        "ExternalAuth filter decisions, by route and result (allowed, denied, unavailable, failed-open)."
    );
    describe_counter!(ACME_ISSUED, "Edge certificates issued by the ACME CA, by hostname.");
    describe_counter!(
        ACME_FAILURES,
        "ACME orders that failed, by hostname (the certificate held goes on serving; retried with backoff)."
    );
    describe_gauge!(
        ACME_EXPIRY,
        Unit::Seconds,
        "When the edge certificate ACME issued for a hostname expires (Unix time)."
    );
    describe_counter!(EDGE_JWKS_FAILURES, "JWT key set loads that failed, by provider (the set held goes on serving).");
    describe_counter!(
        QUIC_ADMISSION,
        "QUIC connection attempts turned away before any state was kept, by listener and decision (retry, handshake-limit)."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_gauge!(
        RUNTIME_WORKERS,
        "Threads that run the proxy, each its own event loop (node.workers, gateway.workers)."
    );
    describe_counter!(
        WORKER_CONNECTIONS,
        "Accepted connections (clients', local apps', peers') handed to each worker thread, by worker."
    );
    describe_gauge!(CONTROL_VERSION, "Version of the snapshot this component runs (gateway: publishes).");
    describe_gauge!(CONTROL_NODES, "Nodes with a live control stream to the gateway.");
    describe_counter!(CONTROL_NACKS, "Snapshots rejected (gateway: reported by nodes; node: refused here).");
    describe_histogram!(CONTROL_PUSH_DURATION, Unit::Seconds, "Time to write one snapshot to one node's stream.");
    describe_counter!(
        CONTROL_PUSH_BYTES,
        Unit::Bytes,
        "Bytes pushed to nodes' control streams, by kind: whole snapshots or deltas."
    );
    describe_counter!(CONTROL_APPLIED, "Snapshots a node applied.");
    describe_gauge!(CONTROL_CONNECTED, "1 while the node holds a control stream to the gateway.");
    describe_counter!(ENROLLMENTS, "Certificate requests by result (issued, renewed, refused, throttled).");
    describe_gauge!(CERT_EXPIRY, "When this node's certificate expires, Unix seconds.");
    describe_counter!(RETRIES, "Requests tried again, by service and reason (unsent, failed).");
    describe_counter!(RETRY_BUDGET_EXHAUSTED, "Retries not made because the service's retry budget was spent.");
    describe_counter!(CIRCUIT_OPEN, "Requests refused by a service's circuit breaker, by limit.");
    describe_counter!(OUTLIER_EJECTIONS, "Endpoints ejected by passive outlier detection, by service.");
    describe_counter!(HEALTH_CHECKS, "Active health checks of local instances, by service and result.");
    describe_gauge!(HEALTHY, "1 while a local instance passes its health check, by service.");
    describe_counter!(RATE_LIMITED, "Requests answered 429 by a route's rate limit, by route.");
    describe_counter!(
        RULE_MATCHES,
        "Requests matched by each named rule of a route (unnamed rules are not counted here)."
    );
    describe_counter!(FAULTS, "Faults injected by routes, by route and kind (delay, abort).");
    describe_counter!(
        AUTHZ_DENIED,
        "Requests and tunnels denied by authorization, by service and mode (enforce, audit)."
    );
    describe_gauge!(DRAINING, "1 once the process is draining (SIGTERM) before it exits.");
    describe_gauge!(REQUESTS_IN_FLIGHT, "Requests started and not finished, by direction and service.");
    describe_counter!(REQUEST_BYTES, Unit::Bytes, "Request body bytes received, by direction, source and service.");
    describe_counter!(RESPONSE_BYTES, Unit::Bytes, "Response body bytes sent, by direction, source and service.");
    describe_counter!(ACCESS_LOG_DROPPED, "Access-log lines dropped because the writer fell behind.");
    describe_counter!(
        TRACE_SPANS,
        "Spans by result: queued for export, exported (the collector took them), failed (the export failed); queued minus the others is what waits or was dropped by a full queue."
    );
    describe_counter!(LOG_DROPPED, "Diagnostic log lines dropped because stderr did not keep up (updated every 5 s).");
    describe_gauge!(QUIC_RTT, Unit::Seconds, "Smoothed round-trip time of the QUIC connection to a peer.");
    describe_gauge!(QUIC_CWND, Unit::Bytes, "Congestion window of the QUIC connection to a peer.");
    describe_gauge!(
        QUIC_MTU,
        Unit::Bytes,
        "Largest UDP payload the QUIC connection to a peer sends now (path-MTU discovery's result)."
    );
    describe_counter!(QUIC_LOST_PACKETS, "QUIC packets declared lost, by direction and peer.");
    describe_counter!(QUIC_SENT_PACKETS, "QUIC packets sent, by direction and peer.");
    describe_counter!(QUIC_STREAMS, "Request streams opened between members, by direction and peer.");
    describe_counter!(
        QUIC_ZERO_RTT,
        "Peer connections that carried 0-RTT data, by direction and result: accepted (the early requests stood) or rejected (the node dialled again)."
    );
    describe_gauge!(
        QUIC_WINDOW_LENT,
        Unit::Bytes,
        "Receive window lent to streams whose reader stopped taking data, over all peer connections (transport.stalled_budget)."
    );
    describe_counter!(
        QUIC_STALLED_STOPPED,
        "Streams stopped because their reader stalled while the window budget was spent and their peer was blocked."
    );
    describe_counter!(TCP_CLOSED, "Opaque TCP tunnels closed, by direction and service.");
    describe_counter!(
        TCP_IDLE_CLOSED,
        "Opaque TCP tunnels this proxy closed for carrying nothing for timeouts.tcp_idle, by direction and service."
    );
    describe_gauge!(CONTROL_NODE_VERSION, "(gateway) Snapshot version each node last acknowledged.");
    describe_gauge!(CONTROL_CERT_EXPIRY, "(gateway) Expiry of the certificate last issued to each node, Unix seconds.");
    describe_counter!(CONFIG_RELOADS, "Config file reloads by the gateway, by result (applied, rejected).");
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
