//! The admin HTTP server of every component: `/ready`, `/live`, `/metrics`, `/config_dump`.
//!
//! It runs as its own tasks on a listener bound by the caller (loopback by default), so tests can
//! bind port 0 and the data plane cannot starve it of accept calls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tracing::debug;

use crate::message::body::{self, Body};

/// Shortest admin token accepted, from the environment or a file alike.
const MIN_TOKEN: usize = 16;

/// The bearer token the admin API on `addr` requires: from `QUICMESH_ADMIN_TOKEN`, else from
/// `file`. None on a loopback address without one; an error on any other address without one,
/// so an admin API is never open to the network by accident.
pub fn admin_token(addr: SocketAddr, file: Option<&Path>, key: &str) -> Result<Option<String>, String> {
    let token = match std::env::var("QUICMESH_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => {
            let t = t.trim().to_string();
            if t.len() < MIN_TOKEN {
                return Err(format!("QUICMESH_ADMIN_TOKEN is shorter than {MIN_TOKEN} characters"));
            }
            Some(t)
        }
        _ => match file {
            Some(f) => {
                let t = std::fs::read_to_string(f).map_err(|e| format!("{key}: cannot read {}: {e}", f.display()))?;
                let t = t.trim().to_string();
                if t.len() < MIN_TOKEN {
                    return Err(format!("{key}: the token in {} is shorter than {MIN_TOKEN} characters", f.display()));
                }
                Some(t)
            }
            None => None,
        },
    };
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(format!(
            "the admin API on {addr} is reachable from the network: set {key} or QUICMESH_ADMIN_TOKEN (a bearer token), or bind it to loopback"
        ));
    }
    Ok(token)
}

/// Compares without stopping at the first difference, so the time taken says nothing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the admin server shows.
pub struct AdminState {
    /// Bearer token every endpoint but `/ready` and `/live` requires, when set.
    pub token: std::sync::OnceLock<String>,
    /// Set once the component serves traffic.
    pub ready: AtomicBool,
    /// Renders the effective config, with secrets left out (paths only, never key bytes).
    pub config_dump: JsonFn,
    /// More JSON endpoints: path and a function rendering the body.
    pub extra: Vec<(&'static str, JsonFn)>,
    /// Operations (POST): path and a function of the query parameters.
    pub actions: Vec<(&'static str, ActionFn)>,
    /// Endpoints that compute their JSON (GET): path and a function of the query parameters.
    pub queries: Vec<(&'static str, QueryFn)>,
    /// Streams (GET, server-sent events): path and a function of the query parameters.
    pub streams: Vec<(&'static str, StreamFn)>,
    /// Fixed pages that hold no data (the dashboard's page and script), served without the
    /// token so a browser can load them: path, content type, content.
    pub pages: Vec<(&'static str, &'static str, &'static str)>,
    /// Streams open now (each `/tap` watcher holds one; see [`MAX_STREAMS`]).
    open_streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// Streams (`/tap` watchers) one admin listener serves at once; more are answered 503.
pub const MAX_STREAMS: usize = 32;

/// Holds a place among the open streams until the stream's body is dropped.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Computes a JSON page from the query parameters, or says what is wrong with them.
pub type QueryFn = Box<dyn Fn(&[(String, String)]) -> QueryFuture + Send + Sync>;
pub type QueryFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

/// Opens a stream from the query parameters, or says what is wrong with them.
pub type StreamFn = Box<dyn Fn(&[(String, String)]) -> Result<Body, String> + Send + Sync>;

/// Everything an admin server shows beyond the built-in endpoints.
#[derive(Default)]
pub struct Pages {
    pub extra: Vec<(&'static str, JsonFn)>,
    pub actions: Vec<(&'static str, ActionFn)>,
    pub queries: Vec<(&'static str, QueryFn)>,
    pub streams: Vec<(&'static str, StreamFn)>,
    pub pages: Vec<(&'static str, &'static str, &'static str)>,
}

/// Performs an admin operation from its query parameters and request body; the answer or what
/// went wrong.
pub type ActionFn = Box<dyn Fn(&[(String, String)], bytes::Bytes) -> ActionFuture + Send + Sync>;

/// Largest request body an admin operation is given (a config apply carries files).
pub const MAX_ACTION_BODY: usize = 16 << 20;
/// What an action answers: text, or why it was refused (and whether the refusal is the
/// caller's fault or a service the action needs being away).
pub type ActionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, ActionError>> + Send>>;

/// Why an admin action did not happen.
#[derive(Debug)]
pub enum ActionError {
    /// The request is wrong (400).
    Bad(String),
    /// Something the action needs is away; try again later (503).
    Unavailable(String),
}

impl From<String> for ActionError {
    fn from(s: String) -> Self {
        ActionError::Bad(s)
    }
}

impl From<&str> for ActionError {
    fn from(s: &str) -> Self {
        ActionError::Bad(s.to_string())
    }
}

/// Renders a JSON admin page.
pub type JsonFn = Box<dyn Fn() -> String + Send + Sync>;

impl AdminState {
    pub fn new(config_dump: JsonFn, extra: Vec<(&'static str, JsonFn)>) -> Arc<Self> {
        Self::with(config_dump, Pages { extra, ..Default::default() })
    }

    /// Like [`AdminState::new`], with any of the other kinds of page.
    pub fn with(config_dump: JsonFn, pages: Pages) -> Arc<Self> {
        let Pages { extra, actions, queries, streams, pages } = pages;
        Arc::new(Self {
            token: std::sync::OnceLock::new(),
            ready: AtomicBool::new(false),
            config_dump,
            extra,
            actions,
            queries,
            streams,
            pages,
            open_streams: Arc::default(),
        })
    }
}

/// Reads (`None`) or replaces the process's log filter; answers the filter in force.
pub type LogControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

static LOG_CONTROL: std::sync::OnceLock<LogControl> = std::sync::OnceLock::new();

/// Installs the log filter control behind `/logging` (once per process, by `main`).
pub fn set_log_control(control: LogControl) {
    let _ = LOG_CONTROL.set(control);
}

/// `GET /logging` shows the filter; `POST /logging?filter=<env-filter>` replaces it.
fn logging(req: &Request<Incoming>) -> (StatusCode, String) {
    let Some(control) = LOG_CONTROL.get() else {
        return (StatusCode::NOT_IMPLEMENTED, "logging is not controllable in this process\n".into());
    };
    let params = req.uri().query().map(crate::policy::route::parse_query).unwrap_or_default();
    let wanted = params.into_iter().find(|(k, _)| k == "filter" || k == "level").map(|(_, v)| v);
    match (req.method(), wanted) {
        (&http::Method::GET, _) => match control(None) {
            Ok(f) => (StatusCode::OK, format!("{f}\n")),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (&http::Method::POST | &http::Method::PUT, Some(spec)) => match control(Some(&spec)) {
            Ok(f) => (StatusCode::OK, format!("{f}\n")),
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&http::Method::POST | &http::Method::PUT, None) => {
            (StatusCode::BAD_REQUEST, "give the new filter as ?filter=<env-filter>\n".into())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n".into()),
    }
}

/// Admin connections open at once; past it the next waits in the listen queue (no descriptor).
const MAX_ADMIN_CONNECTIONS: usize = 256;
/// Time a client has to send a request's headers (also the first, after connecting).
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection on which no byte moved either way for this long is closed: one whose client
/// stopped reading its answers (pipelining requests meanwhile) held its slot for ever, since
/// the header timeout runs only while a request is awaited. A `/tap` stream writes a comment
/// every 15 s.
const ADMIN_IDLE: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the admin API until the task is dropped. A client that connects and sends no
/// request, or sends it slowly, is cut off after [`ADMIN_HEADER_TIMEOUT`], one that moves no
/// byte either way after [`ADMIN_IDLE`], and at most [`MAX_ADMIN_CONNECTIONS`] are open at
/// once: before a token is checked anyone who can reach the port could otherwise hold
/// descriptors the proxy needs.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            // HTTP/1.1 only: telling HTTP/2 from HTTP/1.1 reads the first bytes without a time
            // limit, so a client that sends none would never meet the header timeout.
            let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
            builder.http1().timer(TokioTimer::new()).header_read_timeout(ADMIN_HEADER_TIMEOUT);
            let io = TokioIo::new(crate::transport::idle::IdleTimeout::new(stream, ADMIN_IDLE));
            if let Err(e) = builder.serve_connection(io, svc).await {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Why a request from a browser's reach is refused, if it is: the admin API is open to anyone
/// on loopback (without a token), and so to any web page its operator visits.
/// - A `Host` that is not an IP address or `localhost` means a DNS-rebinding page (without a
///   token; with one, the browser cannot add it).
/// - An `Origin` other than the admin's own means a cross-site page.
/// - A state-changing call (POST, PUT) without the token must carry a `Content-Type` that a
///   page cannot send without a CORS preflight (which is never answered).
fn cross_site(req: &Request<Incoming>, has_token: bool) -> Option<&'static str> {
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if !has_token && host.is_some_and(|h| !local_host(h)) {
        return Some("the admin API answers only to an IP address or localhost as Host\n");
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let own = host.is_some_and(|h| origin.to_str().is_ok_and(|o| o.strip_prefix("http://") == Some(h)));
        if !own {
            return Some("cross-origin requests are refused\n");
        }
    }
    let changes = matches!(*req.method(), http::Method::POST | http::Method::PUT);
    if changes && !has_token {
        let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if matches!(essence.as_str(), "" | "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data") {
            return Some("a state-changing call needs a Content-Type such as application/json (or the bearer token)\n");
        }
    }
    None
}

/// `localhost` or an IP address, with or without a port.
fn local_host(host: &str) -> bool {
    if host.parse::<SocketAddr>().is_ok() || host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
}

async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<Body> {
    if let Some(reason) = cross_site(&req, state.token.get().is_some()) {
        debug!(path = req.uri().path(), reason = reason.trim_end(), "admin request refused");
        let mut resp = Response::new(body::full(reason));
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    let page = state.pages.iter().find(|(p, _, _)| *p == req.uri().path());
    if let (Some((_, ctype, text)), &http::Method::GET) = (page, req.method()) {
        let mut resp = Response::new(body::full(*text));
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
        // The page runs only its own script and talks only to this listener.
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(
                "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        );
        return resp;
    }
    let open = matches!(req.uri().path(), "/ready" | "/live");
    if let (Some(token), false) = (state.token.get(), open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.trim().as_bytes(), token.as_bytes())) {
            let mut resp = Response::new(body::full("a bearer token is required\n"));
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let (status, ctype, text) = match req.uri().path() {
        "/ready" if state.ready.load(Ordering::Acquire) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/metrics" => match crate::telemetry::metrics::recorder() {
            // Rendering every series takes a while in a large mesh: on the blocking pool, not
            // on the proxy's thread (a node runs on one by default).
            Some(h) => match tokio::task::spawn_blocking(move || h.render()).await {
                Ok(text) => (StatusCode::OK, "text/plain; version=0.0.4", text),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "rendering failed\n".into()),
            },
            None => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "metrics recorder unavailable\n".into()),
        },
        "/config_dump" => (StatusCode::OK, "application/json", (state.config_dump)()),
        "/logging" => {
            let (status, text) = logging(&req);
            (status, "text/plain", text)
        }
        path if req.method() == http::Method::POST && state.actions.iter().any(|(p, _)| *p == path) => {
            let path = path.to_string();
            let params = req.uri().query().map(crate::policy::route::parse_query).unwrap_or_default();
            use http_body_util::BodyExt as _;
            let body = match http_body_util::Limited::new(req.into_body(), MAX_ACTION_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let mut resp = Response::new(body::full(format!("cannot read the request body: {e}\n")));
                    *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                    return resp;
                }
            };
            let action = state.actions.iter().find(|(p, _)| *p == path).map(|(_, f)| f(&params, body));
            match action {
                Some(run) => match run.await {
                    Ok(text) => (StatusCode::OK, "text/plain", text),
                    Err(ActionError::Bad(e)) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                    Err(ActionError::Unavailable(e)) => {
                        (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{e}\n"))
                    }
                },
                None => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
            }
        }
        path if state.streams.iter().any(|(p, _)| *p == path) => {
            let params = req.uri().query().map(crate::policy::route::parse_query).unwrap_or_default();
            // Counted before anything is opened: the slot frees it on every way out.
            state.open_streams.fetch_add(1, Ordering::Relaxed);
            let slot = StreamSlot(state.open_streams.clone());
            let open = if state.open_streams.load(Ordering::Relaxed) > MAX_STREAMS {
                Some(Err(None))
            } else {
                state.streams.iter().find(|(p, _)| *p == path).map(|(_, f)| f(&params).map_err(Some))
            };
            match open {
                Some(Ok(stream)) => {
                    // The slot goes with the body: freed when the watcher leaves.
                    let stream = http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_frame(
                        stream,
                        move |frame| {
                            let _held = &slot;
                            frame
                        },
                    ));
                    let mut resp = Response::new(stream);
                    let h = resp.headers_mut();
                    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
                    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
                    return resp;
                }
                Some(Err(Some(e))) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                Some(Err(None)) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{MAX_STREAMS} streams are open already; try again later\n"),
                ),
                None => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
            }
        }
        path if state.queries.iter().any(|(p, _)| *p == path) => {
            let params = req.uri().query().map(crate::policy::route::parse_query).unwrap_or_default();
            let run = state.queries.iter().find(|(p, _)| *p == path).map(|(_, f)| f(&params));
            match run {
                Some(run) => match run.await {
                    Ok(json) => (StatusCode::OK, "application/json", json),
                    Err(e) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
                None => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
            }
        }
        path => match state.extra.iter().find(|(p, _)| *p == path) {
            Some((_, render)) => (StatusCode::OK, "application/json", render()),
            None => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
        },
    };
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    resp
}

/// `/config_dump`: the configuration in force (`config`), the snapshot version it came with, and
/// which layer set each key (`sources`: `file PATH`, `env NAME`, `default`, or, for the keys a
/// control-plane snapshot replaces, `control plane (snapshot N)`), as `istioctl proxy-config`
/// shows an Envoy's.
pub fn config_dump(
    config: &crate::config::Config,
    version: u64,
    sources: Option<&std::collections::BTreeMap<String, String>>,
    joined: bool,
) -> String {
    let mut layers = sources.cloned().unwrap_or_default();
    if joined {
        let from_cp = format!("control plane (snapshot {version})");
        layers.retain(|k, _| !crate::control::Snapshot::KEYS.contains(&k.split('.').next().unwrap_or_default()));
        for key in crate::control::Snapshot::KEYS {
            layers.insert((*key).to_string(), from_cp.clone());
        }
    }
    let mut shown = serde_json::to_value(config).unwrap_or_default();
    // Left out of what is serialized at its default (nodes of the release before it refuse the
    // field), but in force all the same.
    if let Some(t) = shown.get_mut("timeouts").and_then(|t| t.as_object_mut()) {
        #[derive(serde::Serialize)]
        struct Shown(#[serde(with = "humantime_serde")] std::time::Duration);
        let idle = serde_json::to_value(Shown(config.timeouts.tcp_idle)).unwrap_or_default();
        t.entry("tcp_idle").or_insert(idle);
    }
    let doc = serde_json::json!({ "version": version, "config": shown, "sources": layers });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// GETs `path` from the admin API at `addr` (with `token` as the bearer token when given); the
/// response once its headers arrive within `timeout`, its body still to read.
pub async fn client_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Response<Incoming>, String> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(http_body_util::Empty::new()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => Ok(resp),
        Ok(Ok(resp)) => Err(format!("{addr}{path} answered {}", resp.status())),
        Ok(Err(e)) => Err(format!("{addr}{path}: {e}")),
        Err(_) => Err(format!("{addr}{path}: no answer within {timeout:?}")),
    }
}
