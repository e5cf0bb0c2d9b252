//! What a span costs (`cargo bench --bench spans`): the request path's share (building the span
//! and queueing it, timed per call) and the whole cost once exported (queueing, the batch
//! processor's protobuf encoding and the HTTP export to a local sink, as process CPU per span).

use std::time::{Duration, Instant, SystemTime};

use quicmesh_shared::config::TracingConfig;
use quicmesh_shared::telemetry::access_log::Entry;
use quicmesh_shared::telemetry::trace::{Ids, Tracing};

/// A sink that answers every export 200 with an empty body (it reads each request whole).
async fn sink() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let addr = rt.block_on(sink());
    let config = TracingConfig {
        otlp_endpoint: Some(format!("http://{addr}/v1/traces")),
        max_queue: 1 << 16,
        export_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let _guard = rt.enter();
    let tracing = Tracing::start(&config, "node", "bench").unwrap().unwrap();
    let entry = Entry {
        direction: "outbound",
        method: "GET".into(),
        authority: "api:8080".into(),
        path: "/v1/items/42".into(),
        status: 200,
        src_service: "web".into(),
        dst_service: "api".into(),
        dst_node: "node-b".into(),
        route: "api-route".into(),
        endpoint: "10.0.0.7:8080".into(),
        request_id: "5b0a4a34-0c9f-4f7e-9f1e-3cc5d2c1e0a1".into(),
        ..Default::default()
    };
    let n: u64 = std::env::var("BENCH_SPANS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let (cpu0, wall0) = (cpu(), Instant::now());
    let mut queued = Duration::ZERO;
    for i in 0..n {
        let ids = Ids { trace: u128::from(i) << 64 | 1, span: i + 1, parent: 7, sampled: true };
        let now = SystemTime::now();
        let t = Instant::now();
        tracing.record(&entry, ids, now, now);
        queued += t.elapsed();
        // At most a queue's worth ahead of the exporter, so nothing is dropped.
        if i % 8192 == 8191 {
            tracing.flush();
        }
    }
    tracing.flush();
    let (cpu_total, wall) = (cpu() - cpu0, wall0.elapsed());
    println!(
        "{n} spans in {:.2} s: {:.2} us per span on the request path (build and queue); {:.2} us of process CPU per span exported (build, queue, encode, send, and the sink's read)",
        wall.as_secs_f64(),
        queued.as_secs_f64() * 1e6 / n as f64,
        cpu_total.as_secs_f64() * 1e6 / n as f64,
    );
}
