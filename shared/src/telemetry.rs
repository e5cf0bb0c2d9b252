//! Per-request telemetry, recorded the same way on every side of a hop (the node's outbound and
//! inbound sides, the gateway's ingress): request count and time to response headers when the
//! answer starts; bytes each way, requests in flight and the access-log line when the response
//! body ends (a drop guard, so early ends and errors are recorded too).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;

use crate::access_log::{AccessLog, Entry};
use crate::body::{Body, BoxError};
use crate::error::ERROR_HEADER;
use crate::headers;
use crate::metrics as m;

/// Label value when a side is not known (no route matched, the caller is not a known service).
pub const UNKNOWN: &str = "unknown";

/// What is known about one request as it goes through a proxy.
pub struct Record {
    entry: Entry,
    start: Instant,
    /// Set once the destination service is known and the in-flight gauge counts this request.
    in_flight: bool,
    protocol: Option<&'static str>,
    request_bytes: Arc<AtomicU64>,
    log: Option<Arc<AccessLog>>,
}

impl Record {
    pub fn new(direction: &'static str, log: Option<Arc<AccessLog>>) -> Self {
        let entry = Entry {
            time: crate::access_log::timestamp(),
            direction,
            src_service: UNKNOWN.into(),
            dst_service: UNKNOWN.into(),
            route: "none".into(),
            ..Default::default()
        };
        Self { entry, start: Instant::now(), in_flight: false, protocol: None, request_bytes: Default::default(), log }
    }

    /// The client protocol at the edge (`http/1.1`, `h2`, `h3`): an extra label there.
    pub fn protocol(&mut self, protocol: &'static str) {
        self.protocol = Some(protocol);
    }

    /// Method, authority, path, request id and trace id, read from the request as it arrived.
    pub fn request<B>(&mut self, req: &Request<B>) {
        let e = &mut self.entry;
        e.method = req.method().to_string();
        e.authority = headers::authority(req.uri(), req.headers()).unwrap_or_default();
        e.path = req.uri().path().to_string();
        self.ids(req.headers());
    }

    /// Request id and trace id (call again after the proxy set them).
    pub fn ids(&mut self, h: &http::HeaderMap) {
        let e = &mut self.entry;
        if let Some(id) = h.get(&headers::REQUEST_ID).and_then(|v| v.to_str().ok()) {
            e.request_id = id.to_string();
        }
        if let Some(t) = headers::trace_id(h) {
            e.trace_id = t;
        }
    }

    pub fn source(&mut self, service: &str, node: &str) {
        self.entry.src_service = service.to_string();
        self.entry.src_node = node.to_string();
    }

    pub fn route(&mut self, name: &str) {
        self.entry.route = name.to_string();
    }

    /// The destination service; from here the request counts as in flight to it.
    pub fn service(&mut self, name: &str) {
        self.entry.dst_service = name.to_string();
        if !self.in_flight {
            self.in_flight = true;
            metrics::gauge!(m::REQUESTS_IN_FLIGHT, "direction" => self.entry.direction, "service" => name.to_string())
                .increment(1.0);
        }
    }

    /// The endpoint the request went to (the last one, after retries).
    pub fn endpoint(&mut self, node: &str, address: &str, retries: u32) {
        self.entry.dst_node = node.to_string();
        self.entry.endpoint = address.to_string();
        self.entry.retries = retries;
    }

    /// Counts the bytes of a request body as it is read.
    pub fn count_request(&self, body: Body) -> Body {
        Counted { inner: body, bytes: self.request_bytes.clone(), done: None }.boxed_unsync()
    }

    pub fn service_name(&self) -> &str {
        &self.entry.dst_service
    }

    /// Counts the answer now (request counter, time to headers) and the rest when the response
    /// body ends or is dropped.
    pub fn finish(mut self, resp: Response<Body>) -> Response<Body> {
        let status = resp.status().as_u16();
        self.entry.status = status;
        if let Some(reason) = resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()) {
            self.entry.error = reason.to_string();
        }
        let e = &self.entry;
        let labels = vec![
            metrics::Label::new("direction", e.direction),
            metrics::Label::new("source_service", e.src_service.clone()),
            metrics::Label::new("service", e.dst_service.clone()),
            metrics::Label::new("route", e.route.clone()),
        ];
        let mut counted = labels.clone();
        counted.push(metrics::Label::new("code", status.to_string()));
        counted.push(metrics::Label::new("status_class", m::status_class(status)));
        if let Some(p) = self.protocol {
            counted.push(metrics::Label::new("protocol", p));
        }
        metrics::counter!(m::REQUESTS, counted).increment(1);
        metrics::histogram!(m::REQUEST_DURATION, labels).record(self.start.elapsed().as_secs_f64());
        let response_bytes = Arc::new(AtomicU64::new(0));
        let done = Done { record: self, response_bytes: response_bytes.clone() };
        resp.map(|b| Counted { inner: b, bytes: response_bytes, done: Some(done) }.boxed_unsync())
    }
}

/// Fires when the response body is finished with: bytes, in-flight gauge, access log.
struct Done {
    record: Record,
    response_bytes: Arc<AtomicU64>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let r = &mut self.record;
        let (received, sent) = (r.request_bytes.load(Ordering::Relaxed), self.response_bytes.load(Ordering::Relaxed));
        let e = &mut r.entry;
        let labels = [
            ("direction", e.direction.to_string()),
            ("source_service", e.src_service.clone()),
            ("service", e.dst_service.clone()),
        ];
        metrics::counter!(m::REQUEST_BYTES, &labels).increment(received);
        metrics::counter!(m::RESPONSE_BYTES, &labels).increment(sent);
        if r.in_flight {
            metrics::gauge!(m::REQUESTS_IN_FLIGHT, "direction" => e.direction, "service" => e.dst_service.clone())
                .decrement(1.0);
        }
        if let Some(log) = &r.log {
            e.duration_ms = r.start.elapsed().as_secs_f64() * 1000.0;
            e.bytes_received = received;
            e.bytes_sent = sent;
            log.log(e);
        }
    }
}

/// A body that counts its data bytes and, for responses, carries the completion guard.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    done: Option<Done>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            // The end: record now rather than whenever the body value is dropped.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.done = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
