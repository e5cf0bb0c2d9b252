//! Per-request telemetry, recorded the same way on every side of a hop (the node's outbound and
//! inbound sides, the gateway's ingress): request count and time to response headers when the
//! answer starts; bytes each way, requests in flight and the access-log line when the response
//! body ends (a drop guard, so early ends and errors are recorded too).

pub mod access_log;
pub mod metrics;
pub mod scrape;
pub mod tap;
pub mod trace;

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;

use crate::message::body::{Body, BoxError};
use crate::message::error::ERROR_HEADER;
use crate::message::grpc;
use crate::message::headers;
use crate::telemetry::access_log::{AccessLog, Entry};
use crate::telemetry::metrics as m;

/// Label value when a side is not known (no route matched, the caller is not a known service).
pub const UNKNOWN: &str = "unknown";

/// The metric handles of one (direction, source, service, route), registered once: the
/// recorder's lookup (label allocation, hashing, locking) is paid on first use only.
struct Handles {
    duration: ::metrics::Histogram,
    request_bytes: ::metrics::Counter,
    response_bytes: ::metrics::Counter,
    in_flight: ::metrics::Gauge,
    /// Request counters by status code, protocol (at the edge) and the proxy's error reason
    /// (when a proxy made the answer).
    by_code: std::sync::Mutex<Vec<ByCode>>,
    labels: Vec<::metrics::Label>,
}

/// A request counter and what tells it apart: code, protocol, error reason.
type ByCode = (u16, Option<&'static str>, Option<&'static str>, ::metrics::Counter);

/// Handles by a hash of their four labels; a hash collision is told apart by the labels the
/// handles carry, without building a key string for every request.
type HandleMap = crate::FastMap<u64, Vec<Arc<Handles>>>;

/// FNV-1a over the four labels (a 0xff byte, which UTF-8 never contains, between them): a few
/// instructions per byte. The labels are service and route names from the config, and a
/// collision only costs a comparison.
fn key_hash(direction: &str, source: &str, service: &str, route: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [direction, source, service, route] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn handles(direction: &'static str, source: &str, service: &str, route: &str) -> Arc<Handles> {
    // The last handles each thread used: a proxy's requests mostly repeat one set of labels,
    // and comparing four short strings costs a fraction of hashing them and taking the map's
    // lock (about 400 instructions per request).
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<Handles>>> = const { std::cell::RefCell::new(None) };
    }
    let same = |h: &&Arc<Handles>| h.labelled([direction, source, service, route]);
    // `try_with`: a record dropped while the thread exits, after its locals are gone, takes
    // the shared map.
    let hit = LAST.try_with(|last| last.borrow().as_ref().filter(same).cloned()).ok().flatten();
    if let Some(h) = hit {
        return h;
    }
    let h = shared_handles(direction, source, service, route);
    let _ = LAST.try_with(|last| *last.borrow_mut() = Some(h.clone()));
    h
}

fn shared_handles(direction: &'static str, source: &str, service: &str, route: &str) -> Arc<Handles> {
    static MAP: std::sync::OnceLock<std::sync::RwLock<HandleMap>> = std::sync::OnceLock::new();
    let map = MAP.get_or_init(Default::default);
    let hash = key_hash(direction, source, service, route);
    let same = |h: &&Arc<Handles>| h.labelled([direction, source, service, route]);
    if let Some(bucket) = map.read().unwrap_or_else(|e| e.into_inner()).get(&hash) {
        if let Some(h) = bucket.iter().find(same) {
            return h.clone();
        }
    }
    let labels = vec![
        ::metrics::Label::new("direction", direction),
        ::metrics::Label::new("source_service", source.to_string()),
        ::metrics::Label::new("service", service.to_string()),
        ::metrics::Label::new("route", route.to_string()),
    ];
    let bytes_labels = labels[..3].to_vec();
    let h = Arc::new(Handles {
        duration: ::metrics::histogram!(m::REQUEST_DURATION, labels.clone()),
        request_bytes: ::metrics::counter!(m::REQUEST_BYTES, bytes_labels.clone()),
        response_bytes: ::metrics::counter!(m::RESPONSE_BYTES, bytes_labels),
        in_flight: ::metrics::gauge!(m::REQUESTS_IN_FLIGHT, "direction" => direction, "service" => service.to_string()),
        by_code: Default::default(),
        labels,
    });
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    let bucket = map.entry(hash).or_default();
    if let Some(existing) = bucket.iter().find(same) {
        return existing.clone();
    }
    bucket.push(h.clone());
    h
}

impl Handles {
    /// Are these the handles of the labels direction, source, service and route?
    fn labelled(&self, labels: [&str; 4]) -> bool {
        self.labels.iter().map(|l| l.value()).eq(labels)
    }

    fn requests(&self, code: u16, protocol: Option<&'static str>, error: Option<&'static str>) -> ::metrics::Counter {
        let mut codes = self.by_code.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, _, c)) = codes.iter().find(|(k, p, e, _)| *k == code && *p == protocol && *e == error) {
            return c.clone();
        }
        let mut labels = self.labels.clone();
        labels.push(::metrics::Label::new("code", code.to_string()));
        labels.push(::metrics::Label::new("status_class", m::status_class(code)));
        if let Some(p) = protocol {
            labels.push(::metrics::Label::new("protocol", p));
        }
        if let Some(e) = error {
            labels.push(::metrics::Label::new("error", e));
        }
        let c = ::metrics::counter!(m::REQUESTS, labels);
        codes.push((code, protocol, error, c.clone()));
        c
    }
}

/// A label value: the fixed `unknown` and `none` borrowed, other names copied.
fn label(name: &str) -> Cow<'static, str> {
    match name {
        UNKNOWN => Cow::Borrowed(UNKNOWN),
        "none" => Cow::Borrowed("none"),
        other => Cow::Owned(other.to_string()),
    }
}

/// What is known about one request as it goes through a proxy.
pub struct Record {
    /// Boxed: most of a record, moved with it into each future and into the response body that
    /// carries it, where a pointer is all that needs to move.
    entry: Box<Entry>,
    start: Instant,
    /// Set once the destination service is known and the in-flight gauge counts this request.
    in_flight: bool,
    /// The metric handles, looked up once the labels are known.
    handles: Option<Arc<Handles>>,
    protocol: Option<&'static str>,
    /// Body bytes of the request, counted as they are read: shared with the request body's
    /// counter, made only for a request that has a body (most have none).
    received: Option<Arc<AtomicU64>>,
    /// Body bytes of the response, counted by the response body, which carries this record.
    sent: u64,
    log: Option<Arc<AccessLog>>,
    /// The live tap, when someone watched as the request arrived.
    tap: Option<Arc<tap::Tap>>,
    /// Where this request's span goes, when tracing is on.
    tracing: Option<Arc<trace::Tracing>>,
    /// The span's ids, once the proxy has set the `traceparent` it forwards.
    trace: trace::Ids,
    /// Is what a log line, a tap event or a span shows recorded? (Not when none is on.)
    detailed: bool,
    /// The answer's status and error label, once there is one ([`Record::finish`]); without
    /// one the client went away first. Counted when the response body ends, so a body that
    /// breaks off counts as the failure it is.
    answer: Option<(u16, Option<&'static str>)>,
}

/// The status counted for a request whose client went away before the proxy could answer
/// (reset its stream, closed its connection), as nginx does.
pub const CLIENT_CLOSED: u16 = 499;

impl Record {
    /// A request arriving; `tap` is the proxy's live tap, recorded for only while watched.
    pub fn new(
        direction: &'static str,
        log: Option<Arc<AccessLog>>,
        tap: &Arc<tap::Tap>,
        tracing: Option<&Arc<trace::Tracing>>,
    ) -> Self {
        let tap = tap.active().then(|| tap.clone());
        let detailed = log.is_some() || tap.is_some() || tracing.is_some();
        let entry = Entry {
            // Only the access log and the tap need the wall-clock time.
            time: if detailed { crate::telemetry::access_log::timestamp() } else { String::new() },
            direction,
            src_service: Cow::Borrowed(UNKNOWN),
            dst_service: Cow::Borrowed(UNKNOWN),
            route: Cow::Borrowed("none"),
            ..Default::default()
        };
        Self {
            entry: Box::new(entry),
            start: Instant::now(),
            in_flight: false,
            handles: None,
            protocol: None,
            received: None,
            sent: 0,
            log,
            tap,
            tracing: tracing.cloned(),
            trace: Default::default(),
            detailed,
            answer: None,
        }
    }

    /// The client protocol at the edge (`http/1.1`, `h2`, `h3`): an extra label there.
    pub fn protocol(&mut self, protocol: &'static str) {
        self.protocol = Some(protocol);
    }

    /// Method, authority, path, request id and trace id, read from the request as it arrived.
    pub fn request<B>(&mut self, req: &Request<B>) {
        if !self.detailed {
            return;
        }
        let e = &mut self.entry;
        e.method = req.method().to_string();
        e.authority = headers::authority(req.uri(), req.headers()).unwrap_or_default();
        e.path = req.uri().path().to_string();
        self.read_ids(req.headers());
        if self.tracing.is_some() {
            // The span this request arrived under is its span's parent; its trace and decision
            // hold until the proxy forwards the request (a request refused before that keeps them).
            if let Some((trace, parent, sampled)) = headers::trace_ids(req.headers()) {
                self.trace = trace::Ids { trace, span: 0, parent, sampled };
            }
        }
    }

    /// Request id and trace id, and this proxy's span, from the headers it forwards (call
    /// after the proxy set them).
    pub fn ids(&mut self, h: &http::HeaderMap) {
        if !self.detailed {
            return;
        }
        self.read_ids(h);
        if self.tracing.is_some() {
            if let Some((trace, span, sampled)) = headers::trace_ids(h) {
                self.trace = trace::Ids { trace, span, parent: self.trace.parent, sampled };
            }
        }
    }

    fn read_ids(&mut self, h: &http::HeaderMap) {
        let e = &mut self.entry;
        if let Some(id) = h.get(&headers::REQUEST_ID).and_then(|v| v.to_str().ok()) {
            e.request_id = id.to_string();
        }
        if let Some(t) = headers::trace_id(h) {
            e.trace_id = t;
        }
    }

    pub fn source(&mut self, service: &str, node: &str) {
        self.entry.src_service = label(service);
        if self.detailed {
            self.entry.src_node = node.to_string();
        }
    }

    pub fn route(&mut self, name: &str) {
        self.entry.route = label(name);
    }

    /// The result of the route's JWT check (access log only; the metric is the edge's own).
    pub fn auth(&mut self, result: &'static str) {
        self.entry.auth = result;
    }

    /// The matched rule's name, for the access log (the request metrics stay per route; a named
    /// rule's matches have their own counter).
    pub fn rule(&mut self, name: &str) {
        if self.detailed {
            self.entry.rule = name.to_string();
        }
    }

    /// The destination service; from here the request counts as in flight to it.
    pub fn service(&mut self, name: &str) {
        self.entry.dst_service = label(name);
        if !self.in_flight {
            self.in_flight = true;
            self.handles().in_flight.increment(1.0);
        }
    }

    /// Source and route are set before the service, so the labels are final here.
    fn handles(&mut self) -> Arc<Handles> {
        let e = &self.entry;
        self.handles.get_or_insert_with(|| handles(e.direction, &e.src_service, &e.dst_service, &e.route)).clone()
    }

    /// Is this request logged or tapped? (Otherwise its endpoint and ids need not be recorded.)
    pub fn logging(&self) -> bool {
        self.detailed
    }

    /// The endpoint the request went to (the last one, after retries). Formatted only when
    /// the request is logged, tapped or traced (a socket address's text cost a node 1.6k
    /// instructions per request).
    pub fn endpoint(&mut self, node: &str, address: impl std::fmt::Display, retries: u32) {
        if !self.detailed {
            return;
        }
        self.entry.dst_node = node.to_string();
        self.entry.endpoint = address.to_string();
        self.entry.retries = retries;
    }

    /// Counts the bytes of a request body as it is read (an empty one, most requests', is
    /// passed on as it is: there is nothing to count).
    pub fn count_request(&mut self, body: Body) -> Body {
        if body.is_end_stream() {
            return body;
        }
        let bytes = self.received.get_or_insert_with(Default::default).clone();
        Counted { inner: body, count: Count::Request(bytes), _guard: () }.boxed_unsync()
    }

    pub fn service_name(&self) -> &str {
        &self.entry.dst_service
    }

    /// Records the answer now (time to headers) and counts it, with everything else, when the
    /// response body ends or is dropped.
    pub fn finish(self, resp: Response<Body>) -> Response<Body> {
        self.finish_holding(resp, ())
    }

    /// [`Record::finish`], and the response body keeps `guard` alive until it is dropped (the
    /// request's hold on the drain), without a boxed layer of its own.
    pub fn finish_holding<G: Send + Unpin + 'static>(mut self, resp: Response<Body>, guard: G) -> Response<Body> {
        let status = resp.status().as_u16();
        self.entry.status = status;
        let mut error = None;
        if let Some(reason) = crate::message::headers::find(resp.headers(), &ERROR_HEADER).and_then(|v| v.to_str().ok())
        {
            self.entry.error = reason.to_string();
            error = Some(crate::message::error::known_reason(reason));
        }
        self.answer = Some((status, error));
        // A gRPC trailers-only answer carries its status here.
        if let Some(failed) = grpc::status_in(resp.headers()).and_then(grpc::failure_label) {
            self.failed(failed);
        }
        self.handles().duration.record(self.start.elapsed().as_secs_f64());
        let count = Count::Response(Some(Done(self)));
        resp.map(|b| Counted { inner: b, count, _guard: guard }.boxed_unsync())
    }

    /// The response body broke off after its headers (the upstream reset the stream, its
    /// connection died): the request failed, whatever its status said.
    /// `reason` is the proxy's own (a stream idle timeout, a reader that stalled), else
    /// `upstream-reset`.
    fn body_broke(&mut self, reason: Option<&'static str>) {
        self.failed(reason.unwrap_or(BODY_BROKE));
    }

    /// The request failed for `reason`, unless it has a reason already.
    fn failed(&mut self, reason: &'static str) {
        if let Some((_, error @ None)) = &mut self.answer {
            *error = Some(reason);
            self.entry.error = reason.to_string();
        }
    }
}

/// The error label of a response whose body broke off after its headers.
const BODY_BROKE: &str = "upstream-reset";

/// Fires when the response body is finished with (the record's drop does the work).
struct Done(Record);

/// Bytes, the in-flight gauge and the access log, once the request is over; a request dropped
/// before it was answered (its client reset the stream or left) counts as 499 `client-closed`.
impl Drop for Record {
    fn drop(&mut self) {
        let handles = self.handles();
        let (status, error) = match self.answer {
            Some(answer) => answer,
            None => {
                self.entry.status = CLIENT_CLOSED;
                self.entry.error = "client-closed".to_string();
                handles.duration.record(self.start.elapsed().as_secs_f64());
                (CLIENT_CLOSED, Some("client-closed"))
            }
        };
        handles.requests(status, self.protocol, error).increment(1);
        let (received, sent) = (self.received.as_ref().map_or(0, |n| n.load(Ordering::Relaxed)), self.sent);
        handles.request_bytes.increment(received);
        handles.response_bytes.increment(sent);
        if self.in_flight {
            handles.in_flight.decrement(1.0);
        }
        if let Some(tracing) = self.tracing.as_ref().filter(|_| self.detailed && self.trace.span == 0) {
            // Answered before it was forwarded (refused, redirected, rate limited): its span is
            // made now, under the caller's if it came with one, or as a trace of its own.
            if self.trace.trace == 0 {
                self.trace.trace = fastrand::u128(1..);
                self.trace.sampled = tracing.sample_root(self.trace.trace);
                self.entry.trace_id = format!("{:032x}", self.trace.trace);
            }
            self.trace.span = fastrand::u64(1..);
        }
        if self.detailed {
            let e = &mut self.entry;
            e.duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            e.bytes_received = received;
            e.bytes_sent = sent;
            if let Some(log) = &self.log {
                log.log(e);
            }
            if let Some(tap) = &self.tap {
                tap.publish(e);
            }
            if let Some(tracing) = &self.tracing {
                let end = std::time::SystemTime::now();
                let start = end.checked_sub(self.start.elapsed()).unwrap_or(end);
                tracing.record(e, self.trace, start, end);
            }
        }
    }
}

/// A body that counts its data bytes and, for responses, carries the completion guard.
struct Counted<G = ()> {
    inner: Body,
    count: Count,
    /// Kept alive until the body is dropped.
    _guard: G,
}

/// Where a [`Counted`] body's bytes go.
enum Count {
    /// Into the counter the request's record shares.
    Request(Arc<AtomicU64>),
    /// Into the record itself, which the response body carries until it ends (then `None`).
    Response(Option<Done>),
}

impl<G: Unpin> HttpBody for Counted<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let done = match &mut this.count {
            Count::Request(received) => {
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(d) = frame.data_ref() {
                        received.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                return polled;
            }
            Count::Response(done) => done,
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(done)) = (frame.data_ref(), done.as_mut()) {
                    done.0.sent += d.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    let failed = grpc::status_in(trailers).and_then(grpc::failure_label);
                    if let (Some(failed), Some(done)) = (failed, done.as_mut()) {
                        done.0.failed(failed);
                    }
                }
            }
            // The end: record now rather than whenever the body value is dropped.
            Poll::Ready(None) => *done = None,
            Poll::Ready(Some(Err(e))) => {
                let reason = e
                    .downcast_ref::<crate::message::error::ProxyError>()
                    .map(|e| e.reason())
                    .or_else(|| e.downcast_ref::<crate::message::wire::WireError>().and_then(|e| e.reason()));
                if let Some(mut done) = done.take() {
                    done.0.body_broke(reason);
                }
            }
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
