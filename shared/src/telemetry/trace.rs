//! Spans over OTLP: one span per request per proxy, exported in batches by the OpenTelemetry
//! SDK's batch processor and OTLP/HTTP (protobuf) exporter.
//!
//! The ids are the ones the proxy propagates: a hop's span id is the parent id of the
//! `traceparent` it forwards (so an application's spans, and the next proxy's, hang under it),
//! its parent is the id the request arrived with. Sampling is parent-based: a `traceparent`'s
//! sampled flag is kept; a trace that starts here is sampled by its id at `tracing.sampling`
//! (the SDK's ratio sampler). The span is built when the request is over, from what the access
//! log records, and handed to the batch processor, whose queue is bounded (`tracing.max_queue`):
//! a collector that is away costs bounded memory, and the dropped spans are counted.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, ShouldSample, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::TracingConfig;
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics as m;

/// Largest answer read from a collector.
const MAX_ANSWER: usize = 1 << 20;

/// The ids of one request's span at one proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ids {
    pub trace: u128,
    pub span: u64,
    /// The span the request arrived under (0: none, the trace started here).
    pub parent: u64,
    pub sampled: bool,
}

/// A running exporter.
pub struct Tracing {
    processor: BatchSpanProcessor,
    root: Sampler,
    scope: InstrumentationScope,
    /// `https` at the edge, `http` inside the mesh.
    scheme: &'static str,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts exporting for the proxy named `name` (`kind`: `gateway` or `node`); `None` when
    /// no endpoint is configured. Needs a Tokio runtime (export requests run on it).
    pub fn start(config: &TracingConfig, kind: &'static str, name: &str) -> Result<Option<Arc<Tracing>>, String> {
        let Some(endpoint) = &config.otlp_endpoint else { return Ok(None) };
        config.validate().map_err(|(k, e)| format!("{k}: {e}"))?;
        let client = Client {
            runtime: tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?,
            timeout: config.export_timeout,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint.clone())
            .with_timeout(config.export_timeout)
            .with_headers(config.headers.clone().into_iter().collect())
            .build()
            .map_err(|e| format!("tracing: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue)
            .with_max_export_batch_size(config.batch_size)
            .with_scheduled_delay(config.export_interval)
            .build();
        let mut processor = BatchSpanProcessor::builder(Counting(exporter)).with_batch_config(batch).build();
        let resource = Resource::builder_empty()
            .with_service_name(format!("quicmesh-{kind}"))
            .with_attributes([
                KeyValue::new("service.instance.id", name.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        processor.set_resource(&resource);
        let scope = InstrumentationScope::builder("quicmesh").with_version(env!("CARGO_PKG_VERSION")).build();
        let root = Sampler::TraceIdRatioBased(config.sampling);
        let scheme = if kind == "gateway" { "https" } else { "http" };
        tracing::info!(endpoint = %endpoint, sampling = config.sampling, "exporting spans over OTLP");
        Ok(Some(Arc::new(Tracing { processor, root, scope, scheme })))
    }

    /// Is a trace that starts here with this id sampled?
    pub fn sample_root(&self, trace: u128) -> bool {
        let decision = self.root.should_sample(None, TraceId::from(trace), "", &SpanKind::Server, &[], &[]).decision;
        decision == SamplingDecision::RecordAndSample
    }

    /// Hands a finished request's span to the batch processor.
    pub fn record(&self, e: &Entry, ids: Ids, start: SystemTime, end: SystemTime) {
        if !ids.sampled || ids.trace == 0 || ids.span == 0 {
            return;
        }
        let kind = if e.direction == "outbound" { SpanKind::Client } else { SpanKind::Server };
        let route = (e.route != "none").then_some(&*e.route);
        let name = match route {
            Some(r) => format!("{} {r}", e.method),
            None => e.method.clone(),
        };
        let (host, port) = split_authority(&e.authority);
        let mut attributes = vec![
            KeyValue::new("http.request.method", e.method.clone()),
            KeyValue::new("url.path", e.path.clone()),
            KeyValue::new("url.scheme", if e.direction == "ingress" { self.scheme } else { "http" }),
            KeyValue::new("server.address", host.to_string()),
            KeyValue::new("http.response.status_code", i64::from(e.status)),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("http.request.body.size", e.bytes_received as i64),
            KeyValue::new("http.response.body.size", e.bytes_sent as i64),
            KeyValue::new("quicmesh.direction", e.direction),
            KeyValue::new("quicmesh.source.service", e.src_service.to_string()),
            KeyValue::new("quicmesh.destination.service", e.dst_service.to_string()),
            KeyValue::new("quicmesh.retries", i64::from(e.retries)),
        ];
        if let Some(p) = port {
            attributes.push(KeyValue::new("server.port", i64::from(p)));
        }
        if let Some(r) = route {
            attributes.push(KeyValue::new("http.route", r.to_string()));
        }
        for (key, value) in [
            ("quicmesh.source.node", &e.src_node),
            ("quicmesh.destination.node", &e.dst_node),
            ("quicmesh.endpoint", &e.endpoint),
            ("quicmesh.request_id", &e.request_id),
        ] {
            if !value.is_empty() {
                attributes.push(KeyValue::new(key, value.clone()));
            }
        }
        // As the HTTP conventions say: a server's span fails on 5xx, a client's on 4xx too; a
        // proxy's own reason (a timeout, a reset) names the error either way.
        let failed = e.status >= 500 || (kind == SpanKind::Client && e.status >= 400) || !e.error.is_empty();
        let status = if failed && e.error != "client-closed" {
            let reason = if e.error.is_empty() { e.status.to_string() } else { e.error.clone() };
            attributes.push(KeyValue::new("error.type", reason.clone()));
            Status::Error { description: Cow::Owned(reason) }
        } else {
            Status::Unset
        };
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from(ids.trace),
                SpanId::from(ids.span),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(ids.parent),
            parent_span_is_remote: ids.parent != 0,
            span_kind: kind,
            name: Cow::Owned(name),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        };
        metrics::counter!(m::TRACE_SPANS, "result" => "queued").increment(1);
        self.processor.on_end(span);
    }

    /// Exports what is queued (at shutdown), waiting at most for the export timeout.
    pub fn flush(&self) {
        let _ = self.processor.force_flush();
    }
}

/// Exports the spans still queued, at the end of a drain: from a blocking thread, so that the
/// exporter's requests (spawned on this runtime) run meanwhile, even on a single-threaded one.
pub async fn flush_off_runtime(tracing: Option<&Arc<Tracing>>) {
    if let Some(t) = tracing.cloned() {
        let _ = tokio::task::spawn_blocking(move || t.flush()).await;
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.processor.shutdown_with_timeout(Duration::from_secs(2));
    }
}

/// `host` and `port` of an authority (a bracketed IPv6 address keeps its brackets off).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok())
        }
        _ => (authority, None),
    }
}

/// Counts the spans each export delivered or lost.
#[derive(Debug)]
struct Counting<E>(E);

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.0.export(batch).await;
        let outcome = if result.is_ok() { "exported" } else { "failed" };
        metrics::counter!(m::TRACE_SPANS, "result" => outcome).increment(n);
        if let Err(e) = &result {
            tracing::debug!(error = %e, spans = n, "span export failed");
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// The exporter's HTTP client: hyper on the proxy's own runtime (the batch processor exports
/// from a thread of its own, which has no runtime).
#[derive(Debug)]
struct Client {
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl opentelemetry_http::HttpClient for Client {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: http::Request<Bytes>,
    ) -> BoxFuture<'b, Result<http::Response<Bytes>, opentelemetry_http::HttpError>>
    where
        'a: 'b,
        Self: 'b,
    {
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            use http_body_util::BodyExt as _;
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
            let exchange = async {
                let resp = client.request(request.map(http_body_util::Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer from the collector within {timeout:?}").into()),
            }
        });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as opentelemetry_http::HttpError)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("api.example:8443"), ("api.example", Some(8443)));
        assert_eq!(split_authority("echo"), ("echo", None));
        assert_eq!(split_authority("[::1]:80"), ("::1", Some(80)));
    }

    #[tokio::test]
    async fn roots_are_sampled_by_trace_id_at_the_configured_ratio() {
        let mut config =
            TracingConfig { otlp_endpoint: Some("http://127.0.0.1:9/v1/traces".into()), ..Default::default() };
        for (ratio, lo, hi) in [(0.0, 0, 0), (1.0, 1000, 1000), (0.25, 200, 300)] {
            config.sampling = ratio;
            let t = Tracing::start(&config, "node", "n").unwrap().unwrap();
            let sampled = (1..=1000u128)
                .filter(|i| t.sample_root(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)))
                .count();
            assert!((lo..=hi).contains(&sampled), "ratio {ratio}: {sampled} of 1000");
            // The same id, the same answer.
            let id = 0x1234_5678_9abc_def0_1234_5678_9abc_def0u128;
            assert_eq!(t.sample_root(id), t.sample_root(id));
        }
    }
}
