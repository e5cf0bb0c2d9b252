//! A programmable in-process backend for resilience tests: it can answer, fail with a status,
//! cut connections after reading a request, fail its health check, or be killed outright
//! (listener and every open connection closed at once, as when a process dies). `GET /slow/N`
//! answers N KiB, one KiB every 30 ms with the length declared, so a body cut short shows;
//! `GET /cut/N` declares N + 1 KiB, sends N and breaks the connection; `GET /stall/N` declares
//! N + 1 KiB, sends N and then nothing, for ever. Slow bodies name the backend in `x-backend`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with the backend's name.
    Ok = 0,
    /// Answers this status (see `status`).
    Status = 1,
    /// Reads the request, then closes the connection without answering.
    Reset = 2,
}

/// Counts a connection as open from accept until its task ends or is dropped.
struct OpenConn(Arc<AtomicU64>);

impl OpenConn {
    fn new(count: Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub name: &'static str,
    mode: Arc<AtomicU8>,
    status: Arc<AtomicU32>,
    /// `/health` answers 200 while true, 503 otherwise.
    healthy: Arc<std::sync::atomic::AtomicBool>,
    /// Requests received (not counting `/health`).
    pub hits: Arc<AtomicU64>,
    /// Highest `quicmesh-attempt` seen.
    pub max_attempt: Arc<AtomicU64>,
    /// Body of the last request.
    pub last_body: Arc<std::sync::Mutex<Vec<u8>>>,
    /// Every request as "METHOD /path", with " early" when it carried `early-data: 1`.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &'static str, delay: Duration) -> Backend {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), name, delay)
    }

    /// A backend serving on a listener the caller made (in another network namespace, say).
    pub fn start_on(l: TcpListener, name: &'static str, delay: Duration) -> Backend {
        let addr = l.local_addr().unwrap();
        let mut b = Backend {
            addr,
            name,
            mode: Arc::new(AtomicU8::new(Mode::Ok as u8)),
            status: Arc::new(AtomicU32::new(500)),
            healthy: Arc::new(true.into()),
            hits: Arc::new(AtomicU64::new(0)),
            max_attempt: Arc::new(AtomicU64::new(0)),
            last_body: Default::default(),
            seen: Default::default(),
            open: Arc::new(AtomicU64::new(0)),
            task: None,
        };
        let (mode, status, healthy, hits, max_attempt, last_body) = (
            b.mode.clone(),
            b.status.clone(),
            b.healthy.clone(),
            b.hits.clone(),
            b.max_attempt.clone(),
            b.last_body.clone(),
        );
        let (seen, open) = (b.seen.clone(), b.open.clone());
        b.task = Some(tokio::spawn(async move {
            // Connections live in this set: dropping the task (kill) closes them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = l.accept().await else { continue };
                let (mode, status, healthy, hits, max_attempt, last_body) = (
                    mode.clone(),
                    status.clone(),
                    healthy.clone(),
                    hits.clone(),
                    max_attempt.clone(),
                    last_body.clone(),
                );
                let seen = seen.clone();
                let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
                let open = OpenConn::new(open.clone());
                conns.spawn(async move {
                    let _open = open;
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (mode, status, healthy, hits, max_attempt, cut_tx, last_body) = (
                            mode.clone(),
                            status.clone(),
                            healthy.clone(),
                            hits.clone(),
                            max_attempt.clone(),
                            cut_tx.clone(),
                            last_body.clone(),
                        );
                        let seen = seen.clone();
                        async move {
                            if req.uri().path() == "/health" {
                                let ok = healthy.load(Ordering::SeqCst);
                                let mut r = http::Response::new(quicmesh_shared::message::body::full(name));
                                *r.status_mut() =
                                    if ok { http::StatusCode::OK } else { http::StatusCode::SERVICE_UNAVAILABLE };
                                return Ok::<_, std::convert::Infallible>(r);
                            }
                            let attempt = req
                                .headers()
                                .get("quicmesh-attempt")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            max_attempt.fetch_max(attempt, Ordering::SeqCst);
                            let early = if req.headers().contains_key("early-data") { " early" } else { "" };
                            seen.lock().unwrap().push(format!("{} {}{early}", req.method(), req.uri().path()));
                            let req_path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            *last_body.lock().unwrap() = body.to_vec();
                            hits.fetch_add(1, Ordering::SeqCst);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            if let Some(n) = req_path.strip_prefix("/slow/").and_then(|n| n.parse::<usize>().ok()) {
                                let mut r = slow_body(n, End::Whole);
                                r.headers_mut().insert("x-backend", http::HeaderValue::from_static(name));
                                return Ok(r);
                            }
                            if let Some(n) = req_path.strip_prefix("/late/").and_then(|n| n.parse::<usize>().ok()) {
                                // The head at once, then n KiB in one piece after LATE.
                                let late = futures_util::stream::once(async move {
                                    tokio::time::sleep(LATE).await;
                                    Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
                                        b'x';
                                        n * 1024
                                    ])))
                                });
                                let mut r = http::Response::new(quicmesh_shared::message::body::boxed(
                                    http_body_util::StreamBody::new(late),
                                ));
                                r.headers_mut().insert("x-backend", http::HeaderValue::from_static(name));
                                return Ok(r);
                            }
                            if let Some(n) = req_path.strip_prefix("/cut/").and_then(|n| n.parse::<usize>().ok()) {
                                return Ok(slow_body(n, End::Cut));
                            }
                            if let Some(n) = req_path.strip_prefix("/stall/").and_then(|n| n.parse::<usize>().ok()) {
                                return Ok(slow_body(n, End::Stall));
                            }
                            let mut r = http::Response::new(quicmesh_shared::message::body::full(name));
                            match mode.load(Ordering::SeqCst) {
                                1 => {
                                    *r.status_mut() =
                                        http::StatusCode::from_u16(status.load(Ordering::SeqCst) as u16).unwrap()
                                }
                                2 => {
                                    let _ = cut_tx.send(true);
                                    std::future::pending::<()>().await;
                                }
                                _ => {}
                            }
                            Ok(r)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let mut cut = cut_rx;
                    tokio::select! {
                        _ = conn => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        }));
        b
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn fail_with(&self, status: u16) {
        self.status.store(u32::from(status), Ordering::SeqCst);
        self.set_mode(Mode::Status);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection at once.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a slow body ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Whole,
    /// Fails after `n` KiB of the `n + 1` declared.
    Cut,
    /// Sends nothing more after `n` KiB of the `n + 1` declared.
    Stall,
}

/// How long a `/late/N` answer's body waits after its head.
pub const LATE: Duration = Duration::from_millis(300);

/// `n` KiB of `x`, a KiB every 30 ms, with `content-length` declared, ending as `end` says.
fn slow_body(n: usize, end: End) -> http::Response<quicmesh_shared::message::body::Body> {
    let chunks = futures_util::stream::unfold(0, move |i| async move {
        if i == n && end == End::Cut {
            return Some((Err(std::io::Error::other("cut on purpose")), i + 1));
        }
        if i == n && end == End::Stall {
            std::future::pending::<()>().await;
        }
        if i >= n {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        let frame = hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 1024]));
        Some((Ok::<_, std::io::Error>(frame), i + 1))
    });
    let body = quicmesh_shared::message::body::boxed(http_body_util::StreamBody::new(chunks));
    let mut r = http::Response::new(body);
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from((n + usize::from(end != End::Whole)) * 1024));
    r
}
