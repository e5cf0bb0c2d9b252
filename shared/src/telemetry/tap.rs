//! Live tap: every completed request of a proxy, as it happens, to whoever watches (the admin
//! API's `/tap`, `quicmesh tap`, the dashboard), as `linkerd viz tap` shows a proxy's traffic.
//!
//! Nothing is recorded while nobody watches: a request pays one atomic load to learn that. A
//! watcher gets what matches its filter, at most `rate` events a second; what it misses (its
//! rate, a slow reader) is counted and told to it, never queued without bound. Request and
//! response bodies never appear, nor any header but the authority.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::message::body::{Body, BoxError};
use crate::telemetry::access_log::Entry;

/// Events a slow watcher may fall behind by before it misses some.
const BACKLOG: usize = 1024;
/// Events a second a watcher gets unless it asks for fewer.
pub const DEFAULT_RATE: u32 = 100;
/// Most events a second a watcher may ask for.
pub const MAX_RATE: u32 = 1000;
/// A comment line this often keeps proxies between watcher and tap from timing the stream out.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// One completed request, as a proxy saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When it started, RFC 3339 with milliseconds.
    pub time: String,
    /// The proxy that saw it: a node's name, or `gateway`.
    pub proxy: String,
    /// `outbound`, `inbound` or `ingress`.
    pub direction: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// The proxy's reason when it answered itself or the answer broke off (empty otherwise).
    pub error: String,
    /// From the request's arrival to the end of the response body.
    pub duration_ms: f64,
    pub src_service: String,
    pub src_node: String,
    pub dst_service: String,
    pub dst_node: String,
    pub route: String,
    pub retries: u32,
    pub request_id: String,
    pub trace_id: String,
}

/// A proxy's tap: the events it publishes and how many watch them.
pub struct Tap {
    proxy: String,
    tx: broadcast::Sender<Arc<Event>>,
    watchers: AtomicUsize,
}

impl Tap {
    /// The tap of the proxy named `proxy`.
    pub fn new(proxy: &str) -> Arc<Self> {
        Arc::new(Self { proxy: proxy.to_string(), tx: broadcast::channel(BACKLOG).0, watchers: AtomicUsize::new(0) })
    }

    /// Does anyone watch? (Otherwise requests need not record what a watcher would see.)
    pub fn active(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Publishes a completed request.
    pub fn publish(&self, e: &Entry) {
        if !self.active() {
            return;
        }
        let event = Event {
            time: e.time.clone(),
            proxy: self.proxy.clone(),
            direction: e.direction.to_string(),
            method: e.method.clone(),
            authority: e.authority.clone(),
            path: e.path.clone(),
            status: e.status,
            error: e.error.clone(),
            duration_ms: e.duration_ms,
            src_service: e.src_service.to_string(),
            src_node: e.src_node.clone(),
            dst_service: e.dst_service.to_string(),
            dst_node: e.dst_node.clone(),
            route: e.route.to_string(),
            retries: e.retries,
            request_id: e.request_id.clone(),
            trace_id: e.trace_id.clone(),
        };
        let _ = self.tx.send(Arc::new(event));
    }

    /// Starts watching; the count drops when the watch is dropped.
    pub fn watch(self: &Arc<Self>) -> Watch {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        Watch { rx: self.tx.subscribe(), tap: self.clone() }
    }
}

/// One watcher's subscription to a [`Tap`].
pub struct Watch {
    rx: broadcast::Receiver<Arc<Event>>,
    tap: Arc<Tap>,
}

impl Watch {
    /// The next event, and how many this watcher fell behind by before it; `None` when the tap
    /// is gone.
    pub async fn next(&mut self) -> Option<(Arc<Event>, u64)> {
        let mut missed = 0;
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some((e, missed)),
                Err(broadcast::error::RecvError::Lagged(n)) => missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.tap.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a watcher wants to see: every given part must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// The destination service.
    pub service: Option<String>,
    /// The calling service.
    pub from: Option<String>,
    pub route: Option<String>,
    pub method: Option<String>,
    /// Requests whose path starts with this.
    pub path: Option<String>,
    pub status: Option<StatusMatch>,
    /// Events a second at most.
    pub rate: u32,
    /// Only this proxy's own requests (a gateway follows its nodes unless this is set).
    pub local: bool,
}

/// A status filter: one code, a class (`5xx`), or any failure (`error`: 5xx or a proxy's
/// own answer).
#[derive(Debug, Clone, PartialEq)]
pub enum StatusMatch {
    Code(u16),
    Class(u16),
    Error,
}

impl Filter {
    /// From query parameters (`service`, `from`, `route`, `method`, `path`, `status`, `rate`);
    /// an unknown parameter or a bad value is an error, not a silently wider stream.
    pub fn from_query(params: &[(String, String)]) -> Result<Filter, String> {
        let mut f = Filter { rate: DEFAULT_RATE, ..Default::default() };
        for (k, v) in params {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "service" => f.service = Some(v.to_string()),
                "from" => f.from = Some(v.to_string()),
                "route" => f.route = Some(v.to_string()),
                "method" => f.method = Some(v.to_ascii_uppercase()),
                "path" => f.path = Some(v.to_string()),
                "status" => f.status = Some(parse_status(v)?),
                // Asked by a gateway following this proxy: nothing to follow further.
                "local" => f.local = v == "1" || v == "true",
                "rate" => {
                    f.rate = match v.parse::<u32>() {
                        Ok(r) if (1..=MAX_RATE).contains(&r) => r,
                        _ => return Err(format!("rate: give events a second, 1 to {MAX_RATE} (got {v:?})")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown tap filter {other:?}: use service, from, route, method, path, status, rate, local"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The query string that asks another proxy for the same filter.
    pub fn to_query(&self) -> String {
        let mut parts = vec![format!("rate={}", self.rate)];
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={}", escape(v)));
            }
        };
        add("service", &self.service);
        add("from", &self.from);
        add("route", &self.route);
        add("method", &self.method);
        add("path", &self.path);
        let status = self.status.as_ref().map(|s| match s {
            StatusMatch::Code(c) => c.to_string(),
            StatusMatch::Class(c) => format!("{c}xx"),
            StatusMatch::Error => "error".into(),
        });
        add("status", &status);
        parts.join("&")
    }

    pub fn matches(&self, e: &Event) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.service, &e.dst_service)
            && eq(&self.from, &e.src_service)
            && eq(&self.route, &e.route)
            && eq(&self.method, &e.method)
            && self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
            && self.status.as_ref().is_none_or(|s| match s {
                StatusMatch::Code(c) => e.status == *c,
                StatusMatch::Class(c) => e.status / 100 == *c,
                StatusMatch::Error => e.status >= 500 || !matches!(e.error.as_str(), "" | "client-closed"),
            })
    }
}

fn parse_status(v: &str) -> Result<StatusMatch, String> {
    let bad = || format!("status: give a code (503), a class (5xx) or error (got {v:?})");
    if v.eq_ignore_ascii_case("error") {
        return Ok(StatusMatch::Error);
    }
    if let Some(class) = v.strip_suffix("xx").or_else(|| v.strip_suffix("XX")) {
        return match class.parse::<u16>() {
            Ok(c) if (1..=5).contains(&c) => Ok(StatusMatch::Class(c)),
            _ => Err(bad()),
        };
    }
    match v.parse::<u16>() {
        Ok(c) if (100..=599).contains(&c) => Ok(StatusMatch::Code(c)),
        _ => Err(bad()),
    }
}

fn escape(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Where the events of one watch come from: any number of sources (this proxy's tap, other
/// proxies' streams) feed it, each dropping what the watch cannot take and counting it.
pub struct Feed {
    tx: mpsc::Sender<Arc<Event>>,
    missed: Arc<AtomicU64>,
    filter: Filter,
}

impl Feed {
    /// Offers an event; counts it as missed when the watcher is too far behind.
    pub fn offer(&self, e: Arc<Event>) {
        if !self.filter.matches(&e) {
            return;
        }
        if self.tx.try_send(e).is_err() {
            self.missed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts events a source lost before they reached this feed.
    pub fn missed(&self, n: u64) {
        self.missed.fetch_add(n, Ordering::Relaxed);
    }

    /// Has the watcher gone?
    pub fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }
}

impl Clone for Feed {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), missed: self.missed.clone(), filter: self.filter.clone() }
    }
}

/// Feeds a watch from this proxy's own tap until the watcher leaves.
pub async fn feed_from(tap: Arc<Tap>, feed: Feed) {
    let mut watch = tap.watch();
    loop {
        tokio::select! {
            next = watch.next() => match next {
                Some((e, missed)) => {
                    feed.missed(missed);
                    feed.offer(e);
                }
                None => return,
            },
            _ = feed.tx.closed() => return,
        }
    }
}

/// A watch as a server-sent-events body (`text/event-stream`): `data:` lines of JSON events;
/// an `event: missed` line with the count when events were left out (rate, slow reader); a
/// comment every 15 s. The tasks in `sources` are stopped when the body is dropped (the
/// watcher left).
pub fn sse(filter: Filter, start: impl FnOnce(&Feed, &mut tokio::task::JoinSet<()>)) -> Body {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let feed = Feed { tx, missed: Arc::new(AtomicU64::new(0)), filter: filter.clone() };
    let mut tasks = tokio::task::JoinSet::new();
    start(&feed, &mut tasks);
    let missed = feed.missed.clone();
    drop(feed);
    let state = SseState {
        rx,
        _tasks: tasks,
        missed,
        told: 0,
        told_at: None,
        per_second: filter.rate.max(1),
        window: tokio::time::Instant::now(),
        sent: 0,
        opened: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), st))
    });
    http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream.boxed()))
}

struct SseState {
    rx: mpsc::Receiver<Arc<Event>>,
    _tasks: tokio::task::JoinSet<()>,
    missed: Arc<AtomicU64>,
    /// Missed events already told to the watcher, and when.
    told: u64,
    told_at: Option<tokio::time::Instant>,
    per_second: u32,
    window: tokio::time::Instant,
    sent: u32,
    opened: bool,
}

impl SseState {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.opened {
            // A first line at once, so the watcher knows the stream is open.
            self.opened = true;
            return Some(Bytes::from_static(b": quicmesh tap\n\n"));
        }
        loop {
            // Missed events are told at most once a second, however many there were: the count
            // is cumulative, so nothing is lost by waiting.
            let missed = self.missed.load(Ordering::Relaxed);
            let due = self.told_at.map_or(tokio::time::Instant::now(), |t| t + Duration::from_secs(1));
            if missed > self.told && tokio::time::Instant::now() >= due {
                (self.told, self.told_at) = (missed, Some(tokio::time::Instant::now()));
                return Some(Bytes::from(format!("event: missed\ndata: {{\"missed\":{missed}}}\n\n")));
            }
            let wake = if missed > self.told { due } else { tokio::time::Instant::now() + KEEPALIVE };
            let e = tokio::select! {
                e = self.rx.recv() => e?,
                _ = tokio::time::sleep_until(wake) => {
                    if missed > self.told {
                        continue;
                    }
                    return Some(Bytes::from_static(b": keep-alive\n\n"));
                }
            };
            let now = tokio::time::Instant::now();
            if now.duration_since(self.window) >= Duration::from_secs(1) {
                (self.window, self.sent) = (now, 0);
            }
            if self.sent >= self.per_second {
                self.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.sent += 1;
            let json = serde_json::to_string(&*e).unwrap_or_default();
            return Some(Bytes::from(format!("data: {json}\n\n")));
        }
    }
}

/// Reads server-sent events from `body` and hands each `data:` JSON event to `each`; stops at
/// the end of the body, or when `each` says so. What is not an event is skipped.
pub async fn read_sse<B>(body: B, mut each: impl FnMut(SseItem) -> bool) -> Result<(), BoxError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut buf = Vec::new();
    let mut kind = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        // A line longer than this is no event of ours: give up rather than grow.
        if buf.len() > 1 << 20 {
            return Err("a tap line longer than 1 MiB".into());
        }
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                let item = if kind == "missed" {
                    let v: serde_json::Value = serde_json::from_str(d.trim()).unwrap_or_default();
                    SseItem::Missed(v["missed"].as_u64().unwrap_or(0))
                } else {
                    match serde_json::from_str::<Event>(d.trim()) {
                        Ok(e) => SseItem::Event(Box::new(e)),
                        Err(_) => continue,
                    }
                };
                if !each(item) {
                    return Ok(());
                }
            } else if line.is_empty() {
                kind.clear();
            }
        }
    }
    Ok(())
}

/// What a tap stream carries.
#[derive(Debug)]
pub enum SseItem {
    Event(Box<Event>),
    /// The stream's running count of events it left out.
    Missed(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(status: u16, error: &str) -> Event {
        Event {
            status,
            error: error.into(),
            dst_service: "api".into(),
            src_service: "web".into(),
            method: "GET".into(),
            path: "/v1/items".into(),
            route: "r1".into(),
            ..Default::default()
        }
    }

    fn q(s: &str) -> Vec<(String, String)> {
        crate::policy::route::parse_query(s)
    }

    #[test]
    fn filters_parse_match_and_round_trip() {
        let f = Filter::from_query(&q("service=api&from=web&status=5xx&method=get&path=/v1&rate=7")).unwrap();
        assert_eq!(f.rate, 7);
        assert!(f.matches(&event(503, "")));
        assert!(!f.matches(&event(200, "")));
        assert!(!f.matches(&Event { path: "/v2".into(), ..event(503, "") }));
        assert_eq!(Filter::from_query(&q(&f.to_query())).unwrap(), f);
        let err = Filter::from_query(&q("status=error")).unwrap();
        assert!(err.matches(&event(404, "no-route")), "a proxy's own answer is a failure");
        assert!(!err.matches(&event(499, "client-closed")), "a client that left is not");
        assert!(!err.matches(&event(404, "")));
        assert_eq!(Filter::from_query(&q("status=404")).unwrap().status, Some(StatusMatch::Code(404)));
        assert!(Filter::from_query(&q("local=1")).unwrap().local, "a gateway's follow asks for local events");
        for bad in ["status=6xx", "status=99", "rate=0", "rate=5000", "colour=red", "status=abc"] {
            assert!(Filter::from_query(&q(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_watch_gets_matching_events_within_its_rate_and_hears_of_the_rest() {
        let tap = Tap::new("node-a");
        assert!(!tap.active());
        let filter = Filter::from_query(&q("service=api&rate=3")).unwrap();
        let body = sse(filter, |feed, tasks| {
            tasks.spawn(feed_from(tap.clone(), feed.clone()));
        });
        // The feed task subscribes when it first runs.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !tap.active() {
            assert!(tokio::time::Instant::now() < deadline, "the watch never started");
            tokio::task::yield_now().await;
        }
        let entry = |service: &'static str| Entry {
            direction: "outbound",
            dst_service: service.into(),
            status: 200,
            path: "/x".into(),
            ..Default::default()
        };
        tap.publish(&entry("other"));
        for _ in 0..5 {
            tap.publish(&entry("api"));
        }
        let mut seen = Vec::new();
        let mut missed = 0;
        read_sse(body, |item| {
            match item {
                SseItem::Event(e) => seen.push(e),
                SseItem::Missed(n) => missed = n,
            }
            // Three events within the rate, then word of the two left out.
            !(seen.len() == 3 && missed == 2)
        })
        .await
        .unwrap();
        assert!(seen.iter().all(|e| e.dst_service == "api" && e.proxy == "node-a"), "{seen:?}");
        assert_eq!((seen.len(), missed), (3, 2));
        // Many left out at once are told as one count, not one frame each.
        let filter = Filter::from_query(&q("rate=1")).unwrap();
        let (tap2, mut frames) = (Tap::new("node-a"), 0);
        let body = sse(filter, |feed, tasks| {
            tasks.spawn(feed_from(tap2.clone(), feed.clone()));
        });
        while !tap2.active() {
            assert!(tokio::time::Instant::now() < deadline + Duration::from_secs(5), "the second watch never started");
            tokio::task::yield_now().await;
        }
        for _ in 0..200 {
            tap2.publish(&entry("api"));
        }
        read_sse(body, |item| {
            let SseItem::Missed(n) = item else { return true };
            frames += 1;
            n < 199
        })
        .await
        .unwrap();
        assert!(frames <= 3, "{frames} missed frames for 199 events left out");
        // The watcher left: requests stop paying for the tap.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tap.active() {
            assert!(tokio::time::Instant::now() < deadline, "the watch outlived its body");
            tokio::task::yield_now().await;
        }
    }
}
