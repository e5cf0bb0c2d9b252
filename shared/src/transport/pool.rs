//! One pooled QUIC connection per peer member, in quicmesh's own framing or HTTP/3.
//!
//! The first request to a peer opens the connection while later ones wait on the same per-peer
//! lock, so a burst of concurrent requests still makes exactly one connection. A connection that
//! has closed (idle timeout, stateless reset from a restarted peer) or whose peer said GOAWAY is
//! replaced on the next request; the GOAWAY'd one is let go at once and closes when its last
//! request is done (the draining peer waits for that close).
//!
//! A peer whose handshake fails (no answer within `timeouts.connect`, refused, bad identity) is
//! marked unreachable: requests fail over at once instead of each paying for a handshake, and a
//! background probe dials it with backoff until it answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use quinn::ClientConfig;
use tokio::sync::{oneshot, watch, Mutex as AsyncMutex};
use tracing::{debug, info, warn};

use super::lean;
use super::stalls::Stalls;
use super::stream::{Framing, RequestStream, WireError};
use crate::config::TransportConfig;
use crate::identity::tls;
use crate::message::error::ProxyError;
use crate::telemetry::metrics as m;

pub type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// A live connection to a peer and how requests go on it: shared, so a request's copy costs
/// one count and a pointer's room in its future.
#[derive(Clone)]
pub struct PeerConn(Arc<PeerConnState>);

impl std::ops::Deref for PeerConn {
    type Target = PeerConnState;
    fn deref(&self) -> &PeerConnState {
        &self.0
    }
}

/// See [`PeerConn`].
pub struct PeerConnState {
    pub conn: quinn::Connection,
    link: Link,
    /// Request streams opened to the peer (`quicmesh_quic_streams_total`), registered once.
    pub streams: metrics::Counter,
    /// For a connection that went out in 0-RTT: `None` until its handshake ends, then whether
    /// the peer took the early data. `None` here: an ordinary handshake, complete.
    pub early: Option<watch::Receiver<Option<bool>>>,
    /// The worker that dialled it ([`crate::runtime::index`]), whose socket it goes out from.
    worker: usize,
}

/// The framing a pooled connection speaks, and what keeps it open.
#[derive(Clone)]
enum Link {
    /// HTTP/3: h3 closes the connection when the last request handle goes.
    H3(SendRequest),
    Lean(Arc<LeanLink>),
}

/// A connection in quicmesh's framing: closed when the last holder goes, as h3 closes one.
struct LeanLink {
    conn: quinn::Connection,
    /// The peer said GOAWAY.
    goaway: AtomicBool,
    /// The answers' readers, watched so that one that stops reading holds up no one else's.
    stalls: Arc<Stalls>,
}

impl Drop for LeanLink {
    fn drop(&mut self) {
        // A connection that has ended keeps its reason: closing it now would turn a peer that
        // went silent (`TimedOut`, which marks it unreachable) into one closed here.
        if self.conn.close_reason().is_none() {
            self.conn.close(quinn::VarInt::from_u32(lean::NO_ERROR), b"");
        }
    }
}

/// A pooled connection to a peer, as the admin API shows it (`/endpoints`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pooled {
    /// The worker thread whose requests use it.
    pub worker: usize,
    /// The UDP socket it goes out from.
    pub local: Option<SocketAddr>,
    pub remote: SocketAddr,
    pub rtt_us: u64,
    /// How requests are framed on it: `lean` (quicmesh's own) or `h3`.
    pub framing: &'static str,
}

impl PeerConn {
    /// Waits until a request of `method` may go on this connection: at once, unless it went out
    /// in 0-RTT and its handshake has not ended. There only GET, HEAD and OPTIONS go early (a
    /// replayed first flight must not repeat anything else); the rest wait for the handshake.
    /// A peer that refused the early data closed that connection: nothing was sent, and the
    /// next try dials again.
    pub async fn ready_for(&self, method: &Method) -> Result<(), ProxyError> {
        let Some(early) = &self.early else { return Ok(()) };
        let mut early = early.clone();
        let refused = || ProxyError::PeerUnreachable {
            peer: self.conn.remote_address().to_string(),
            reason: "the peer refused this connection's 0-RTT data; dialling again".into(),
        };
        match *early.borrow() {
            Some(true) => return Ok(()),
            Some(false) => return Err(refused()),
            None if replay_safe(method) => return Ok(()),
            None => {}
        }
        match early.wait_for(Option::is_some).await.map(|v| *v) {
            Ok(Some(true)) => Ok(()),
            _ => Err(refused()),
        }
    }

    /// Whether this connection went out in 0-RTT and was then given up (the peer refused its
    /// early data, or the handshake never ended): what was sent on it was only replay-safe
    /// requests, which may go again.
    /// Waits for the handshake's outcome if it is not known yet: a stream that failed on such a
    /// connection learns it within moments (the failure came from it).
    pub async fn early_refused(&self) -> bool {
        let Some(early) = &self.early else { return false };
        let mut early = early.clone();
        let outcome = early.wait_for(Option::is_some).await.map(|v| *v);
        !matches!(outcome, Ok(Some(true)))
    }
    /// Whether a new request may go on this connection to `addr`: it is open, to that address
    /// (not a peer that has since moved), and its peer has not said GOAWAY.
    fn takes_requests_to(&self, addr: SocketAddr) -> bool {
        let goaway = match &self.link {
            Link::H3(h3) => h3::ConnectionState::is_closing(h3),
            Link::Lean(link) => link.goaway.load(Ordering::Acquire),
        };
        self.conn.close_reason().is_none() && self.conn.remote_address() == addr && !goaway
    }

    /// Opens a request stream to the peer and sends `head` on it.
    pub async fn open(&self, head: Request<()>) -> Result<RequestStream, WireError> {
        match &self.link {
            Link::H3(h3) => Ok(RequestStream::H3(Box::new(h3.clone().send_request(head).await?))),
            Link::Lean(link) => {
                let (send, mut recv) = lean::open(&self.conn, &head, false).await?;
                recv.watched_by(&link.stalls);
                Ok(RequestStream::Lean(send, recv))
            }
        }
    }

    /// [`PeerConn::open`] with a hop's head: in the lean framing encoded from the caller's
    /// head and the hop's fields, without building a `Request` (a copy of the header map).
    pub async fn open_head(&self, head: &lean::Head<'_>) -> Result<RequestStream, WireError> {
        match &self.link {
            // Boxed: h3's future is four times the lean one's, and every future above this one
            // would carry its size (each is copied whole when made) for the framing not in use.
            Link::H3(h3) => Ok(RequestStream::H3(Box::new(Box::pin(h3.clone().send_request(head.request())).await?))),
            Link::Lean(link) => {
                let tunnel = *head.method == Method::CONNECT;
                let (send, mut recv) = lean::open_with(&self.conn, head.frame()?, tunnel, false).await?;
                recv.watched_by(&link.stalls);
                Ok(RequestStream::Lean(send, recv))
            }
        }
    }

    /// The framing this connection speaks.
    pub fn framing(&self) -> Framing {
        match self.link {
            Link::H3(_) => Framing::H3,
            Link::Lean(_) => Framing::Lean,
        }
    }

    /// Keeps this connection open while held. A connection closes when the last of its holders
    /// goes, and the pool lets go of its own when a peer says GOAWAY: a stream whose response
    /// (or tunnel) is still streaming holds one, so a drain never cuts it.
    pub fn hold(&self) -> Hold {
        Hold { _link: self.link.clone() }
    }
}

/// Resolves when the peer of a connection says GOAWAY.
type GoAway = oneshot::Receiver<()>;

/// See [`PeerConn::hold`].
pub struct Hold {
    _link: Link,
}

/// What the pool knows of one peer: its pooled connection, and whether it is unreachable.
struct Peer {
    /// Held while a dial is under way, by the dial's own task (see [`PeerPool::get`]).
    conn: Arc<AsyncMutex<Option<PeerConn>>>,
    /// Shared by every worker's pool ([`PeerPool::sibling`]): a peer one worker found
    /// unreachable is skipped by all, and probed once.
    down: Arc<Mutex<Option<Down>>>,
}

/// See [`PeerPool::readiness`].
pub enum Readiness {
    /// The live pooled connection.
    Ready(PeerConn),
    /// Marked unreachable at this address: `get` fails at once.
    Down,
    /// No live connection, or a dial under way: `get` has to wait.
    Wait,
}

/// A peer whose last handshake failed: requests skip it until the background probe reaches it.
#[derive(Debug, Clone)]
struct Down {
    addr: SocketAddr,
    since: Instant,
    reason: String,
    failures: u32,
    next_probe: Instant,
    /// When a request last asked for the peer (its probe stops after [`PROBE_UNWANTED`]).
    wanted: Instant,
}

/// What `/endpoints` shows of an unreachable peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Unreachable {
    pub address: SocketAddr,
    pub reason: String,
    /// Failed handshakes in a row (the first, then each probe).
    pub failures: u32,
    pub for_ms: u64,
    pub next_probe_in_ms: u64,
}

/// The wait before probe number `failures` (1 after the first failure): doubling from 500 ms
/// to at most 10 s, a quarter of it random so that nodes do not probe in step.
fn probe_backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << failures.saturating_sub(1).min(5));
    let cap = base.min(Duration::from_secs(10));
    cap - cap.mul_f64(fastrand::f64() / 4.0)
}

/// A probe gives up (and forgets the failure) when no request asked for its peer this long:
/// the next one dials afresh.
const PROBE_UNWANTED: Duration = Duration::from_secs(600);

/// Dials peers: the pool's parts its background probes share.
struct Dialer {
    endpoint: quinn::Endpoint,
    /// The sockets of the workers past the first (entry `i - 1` is worker `i`'s), each made at
    /// its worker's first dial ([`Dialer::endpoint_here`]); `None` in an entry: none yet (or
    /// that worker could not bind one, and dials from `endpoint`). Empty: every worker dials
    /// from `endpoint`.
    own: Vec<Mutex<Option<quinn::Endpoint>>>,
    /// What the workers' own sockets are made with (set with `own`).
    transport: Option<TransportConfig>,
    /// Set when the process closes its endpoints: no worker makes a socket after it.
    closed: AtomicBool,
    /// Until set (at the start, for workers' own sockets, or after a certificate renewal), the
    /// endpoint's default client config.
    client: arc_swap::ArcSwapOption<quinn::ClientConfig>,
    trust_domain: String,
    connect_timeout: Duration,
    /// Peers now marked unreachable (so the balancer's check costs nothing when there are none).
    down: AtomicUsize,
    /// Peers that refused our last 0-RTT data (they lost the sessions): dialled with a full
    /// handshake until one succeeds, rather than spending each held ticket on a refusal.
    no_early: Mutex<std::collections::HashSet<String>>,
    /// The framing each peer's last completed handshake chose: a connection in 0-RTT sends its
    /// early requests in it before the peer has said (its session was made on that connection,
    /// and a peer takes early data only in the session's protocol).
    framings: Mutex<HashMap<String, Framing>>,
    /// Each peer's unreachable mark, by name, for every pool that shares this dialer.
    marks: Mutex<HashMap<String, Arc<Mutex<Option<Down>>>>>,
    /// Told each time a peer is marked unreachable (a connection's 0-RTT handshake under way
    /// to it is given up then).
    marked: watch::Sender<()>,
}

pub struct PeerPool {
    dialer: Arc<Dialer>,
    peers: Mutex<crate::FastMap<String, Arc<Peer>>>,
}

impl PeerPool {
    pub fn new(endpoint: quinn::Endpoint, trust_domain: &str, connect_timeout: Duration) -> Self {
        let dialer = Dialer {
            endpoint,
            own: Vec::new(),
            transport: None,
            closed: AtomicBool::new(false),
            client: arc_swap::ArcSwapOption::empty(),
            trust_domain: trust_domain.into(),
            connect_timeout,
            down: AtomicUsize::new(0),
            no_early: Mutex::default(),
            framings: Mutex::default(),
            marks: Mutex::default(),
            marked: watch::channel(()).0,
        };
        Self { dialer: Arc::new(dialer), peers: Mutex::default() }
    }

    /// Has each worker past the first dial from a UDP socket of its own, so that its
    /// connections' receives wake the worker that runs them rather than the main runtime's
    /// thread (measured small: a gateway's HTTP/1.1 on two workers gained 2-3% requests per
    /// CPU-second, `cargo bench --bench load`, against the one-thread gateway in the same
    /// runs). `client` is the mesh client config, as the endpoint's default. Call before
    /// making siblings.
    pub fn with_worker_sockets(mut self, client: quinn::ClientConfig, transport: &TransportConfig) -> Self {
        let workers = crate::runtime::count();
        if let Some(dialer) = Arc::get_mut(&mut self.dialer).filter(|_| workers > 1) {
            dialer.own = (1..workers).map(|_| Mutex::new(None)).collect();
            dialer.transport = Some(transport.clone());
            dialer.client.store(Some(Arc::new(client)));
        }
        self
    }

    /// Closes the workers' own sockets (the process is closing its endpoint) and returns them,
    /// to wait until their closes are sent. No worker makes one after this.
    pub fn close_worker_endpoints(&self, reason: &[u8]) -> Vec<quinn::Endpoint> {
        self.dialer.closed.store(true, Ordering::Release);
        let endpoints: Vec<quinn::Endpoint> =
            self.dialer.own.iter().filter_map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect();
        for endpoint in &endpoints {
            endpoint.close(0u32.into(), reason);
        }
        endpoints
    }

    /// Moves the workers' own sockets to `ip`, each on a port the kernel picks (the process's
    /// endpoint moved there, [`crate::transport::rebind`]): the connections they opened migrate
    /// as its own do. Each socket is made on its worker's reactor. Says what could not move; a
    /// worker whose socket did not move makes a new one at its next dial
    /// ([`Dialer::endpoint_here`]).
    pub fn rebind_workers(&self, ip: IpAddr) -> Vec<crate::transport::TransportError> {
        let Some(cfg) = &self.dialer.transport else { return Vec::new() };
        let mut failed = Vec::new();
        for (i, slot) in self.dialer.own.iter().enumerate() {
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            let (Some(endpoint), Some(worker)) = (slot.as_ref(), crate::runtime::handle(i + 1)) else { continue };
            let _on_worker = worker.enter();
            match crate::transport::rebind(endpoint, SocketAddr::new(ip, 0), cfg) {
                Ok(now) => debug!(worker = i + 1, %now, "moved a worker's QUIC socket"),
                Err(e) => failed.push(e),
            }
        }
        failed
    }

    /// A pool of its own connections that shares this one's endpoint, credentials and what it
    /// knows of peers (unreachable marks and their probes, refused 0-RTT): another worker's.
    pub fn sibling(&self) -> Self {
        Self { dialer: self.dialer.clone(), peers: Mutex::default() }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.dialer.endpoint
    }

    /// New connections use `client` (renewed credentials), in this pool and its siblings;
    /// pooled ones are kept.
    pub fn set_client_config(&self, client: quinn::ClientConfig) {
        self.dialer.client.store(Some(Arc::new(client)));
    }

    fn peer(&self, name: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get(name) {
            return p.clone();
        }
        let down = self.dialer.mark(name);
        let peer = Arc::new(Peer { conn: Arc::default(), down });
        peers.insert(name.to_string(), peer.clone());
        peer
    }

    fn known(&self, name: &str) -> Option<Arc<Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// What `get` would do for `peer` at `addr` without waiting: hand over the live pooled
    /// connection, or fail at once for a peer marked unreachable at that address.
    pub fn readiness(&self, peer: &str, addr: SocketAddr) -> Readiness {
        let Some(p) = self.known(peer) else { return Readiness::Wait };
        if self.dialer.down.load(Ordering::Relaxed) > 0
            && p.down.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|d| d.addr == addr)
        {
            return Readiness::Down;
        }
        let Ok(guard) = p.conn.try_lock() else { return Readiness::Wait };
        match guard.as_ref().filter(|pc| pc.takes_requests_to(addr)) {
            Some(pc) => Readiness::Ready(pc.clone()),
            None => Readiness::Wait,
        }
    }

    /// This pool's live connection to `peer`, if it holds one and no dial is under way.
    pub fn pooled(&self, peer: &str) -> Option<Pooled> {
        let p = self.known(peer)?;
        let guard = p.conn.try_lock().ok()?;
        let pc = guard.as_ref().filter(|pc| pc.conn.close_reason().is_none())?;
        Some(Pooled {
            worker: pc.worker,
            local: self.dialer.endpoint_of(pc.worker).local_addr().ok(),
            remote: pc.conn.remote_address(),
            rtt_us: pc.conn.rtt().as_micros() as u64,
            framing: pc.framing().name(),
        })
    }

    /// Is `peer` marked unreachable (its last handshake failed and no probe has reached it since)?
    pub fn is_down(&self, peer: &str) -> bool {
        self.dialer.down.load(Ordering::Relaxed) > 0 && self.unreachable(peer).is_some()
    }

    /// Why `peer` is marked unreachable, if it is.
    pub fn unreachable(&self, peer: &str) -> Option<Unreachable> {
        let mark = self.dialer.marks.lock().unwrap_or_else(|e| e.into_inner()).get(peer).cloned()?;
        let down = mark.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let now = Instant::now();
        Some(Unreachable {
            address: down.addr,
            reason: down.reason,
            failures: down.failures,
            for_ms: now.saturating_duration_since(down.since).as_millis() as u64,
            next_probe_in_ms: down.next_probe.saturating_duration_since(now).as_millis() as u64,
        })
    }

    /// The live connection to `peer`, opened if needed. A peer marked unreachable fails at once
    /// (its probe runs in the background); otherwise waiting for the pooled connection and
    /// opening one take at most `timeouts.connect` together.
    pub async fn get(&self, peer: &str, addr: SocketAddr) -> Result<PeerConn, ProxyError> {
        self.get_inner(peer, addr, false).await
    }

    /// Like [`PeerPool::get`], but dials even a peer marked unreachable (the control stream,
    /// which has its own backoff).
    pub async fn dial(&self, peer: &str, addr: SocketAddr) -> Result<PeerConn, ProxyError> {
        self.get_inner(peer, addr, true).await
    }

    async fn get_inner(&self, name: &str, addr: SocketAddr, dial_anyway: bool) -> Result<PeerConn, ProxyError> {
        let peer = self.peer(name);
        let fail_fast = |peer: &Peer| -> Result<(), ProxyError> {
            match peer.down.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(|d| {
                d.wanted = Instant::now();
                &*d
            }) {
                // A new address (a config change) is dialled, not judged by the old one.
                Some(down) if !dial_anyway && down.addr == addr => Err(ProxyError::PeerUnreachable {
                    peer: name.into(),
                    reason: format!("unreachable ({}); probing in the background", down.reason),
                }),
                _ => Ok(()),
            }
        };
        fail_fast(&peer)?;
        // A connection to another address (the peer moved, or the control plane's next replica
        // is wanted) is not this one.
        let usable = |pc: &&PeerConn| pc.takes_requests_to(addr);
        // The common case, a live pooled connection and no dial under way, without a timer or
        // a wait.
        if let Ok(guard) = peer.conn.try_lock() {
            if let Some(pc) = guard.as_ref().filter(usable) {
                return Ok(pc.clone());
            }
        }
        let deadline = tokio::time::Instant::now() + self.dialer.connect_timeout;
        let timed_out = || ProxyError::ConnectTimeout(format!("peer node {name} at {addr}"));
        let mut guard =
            tokio::time::timeout_at(deadline, peer.conn.clone().lock_owned()).await.map_err(|_| timed_out())?;
        if let Some(pc) = guard.as_ref().filter(usable) {
            return Ok(pc.clone());
        }
        if let Some(old) = guard.take().filter(|old| old.conn.remote_address() == addr) {
            if matches!(old.conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
                // The peer went silent on the pooled connection, and the connection's watch
                // has not said so yet: marked here, so that this request goes elsewhere at once
                // rather than dialling a peer that stopped answering (in 0-RTT such a dial
                // looks established at once, and holds its requests until its handshake times
                // out). The probe dials it from now on.
                self.dialer.mark_down(name, &peer, addr, &went_silent(name));
            }
        }
        // Marked while this request waited for the lock: another request's handshake failed,
        // or the connection it found had gone silent.
        fail_fast(&peer)?;
        // The dial runs as a task of its own, holding the peer's lock: a request that stops
        // waiting (its try's deadline passed) leaves it running, so its outcome still reaches
        // the requests queued behind it (a connection, or the peer marked unreachable) and a
        // handshake is never started twice.
        let early_ok = peer.down.lock().unwrap_or_else(|e| e.into_inner()).is_none();
        let (dialer, peer_name, (tx, rx)) = (self.dialer.clone(), name.to_string(), oneshot::channel());
        tokio::spawn(async move {
            let attempt = tokio::time::timeout_at(deadline, dialer.connect(&peer_name, addr, early_ok)).await;
            let result = attempt.unwrap_or_else(|_| Err(dialer.handshake_timed_out(&peer_name, addr)));
            let result = match result {
                Ok((pc, goaway)) => {
                    *guard = Some(pc.clone());
                    drop(guard);
                    match pc.early.clone() {
                        None => dialer.mark_up(&peer_name, &peer),
                        // In 0-RTT the peer is reached once the handshake ends: a dial that
                        // raced with another worker finding the peer silent must not clear
                        // that mark before.
                        Some(mut early) => {
                            let (dialer, name, peer) = (dialer.clone(), peer_name.clone(), peer.clone());
                            tokio::spawn(async move {
                                if early.wait_for(Option::is_some).await.is_ok_and(|v| *v == Some(true)) {
                                    dialer.mark_up(&name, &peer);
                                }
                            });
                        }
                    }
                    dialer.watch(&peer_name, &peer, pc.conn.clone(), goaway);
                    Ok(pc)
                }
                Err(e) => {
                    drop(guard);
                    dialer.mark_down(&peer_name, &peer, addr, &e);
                    Err(e)
                }
            };
            let _ = tx.send(result);
        });
        rx.await
            .unwrap_or_else(|_| Err(ProxyError::PeerUnreachable { peer: name.into(), reason: "dial failed".into() }))
    }

    /// Closes and forgets the connection to `peer` (a revoked member), whatever its state.
    pub fn close_peer(&self, name: &str, reason: &'static [u8]) {
        let peer = self.peers.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some(peer) = peer {
            if let Ok(guard) = peer.conn.try_lock() {
                if let Some(pc) = guard.as_ref() {
                    pc.conn.close(2u32.into(), reason);
                }
            }
            self.dialer.mark_up(name, &peer);
        }
    }

    /// Forgets `conn` if it is still the pooled one (after it failed a request). A connection
    /// that ended because the peer went silent also marks the peer unreachable, as
    /// [`Dialer::watch`] does, so the request's replay goes elsewhere at once rather than
    /// dialling a peer that has just stopped answering.
    pub async fn evict(&self, name: &str, conn: &quinn::Connection) {
        let peer = self.peer(name);
        self.dialer.forget(name, &peer, conn).await;
    }
}

impl Dialer {
    /// The endpoint `worker`'s connections go out from (its own socket, once made).
    fn endpoint_of(&self, worker: usize) -> quinn::Endpoint {
        let own = worker.checked_sub(1).and_then(|i| self.own.get(i));
        own.and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_else(|| self.endpoint.clone())
    }

    /// The endpoint this thread dials from: its worker's own socket, made on its runtime at its
    /// first dial and made again if it is not on the process endpoint's address (a move that
    /// failed for it, or that raced with its making); or the process's endpoint.
    fn endpoint_here(&self) -> quinn::Endpoint {
        let worker = crate::runtime::index();
        let (Some(cfg), Some(slot)) = (&self.transport, worker.checked_sub(1).and_then(|i| self.own.get(i))) else {
            return self.endpoint.clone();
        };
        if self.closed.load(Ordering::Acquire) {
            return self.endpoint.clone();
        }
        let ip = match self.endpoint.local_addr() {
            Ok(addr) => addr.ip(),
            Err(_) => IpAddr::from([0, 0, 0, 0]),
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(own) = slot.as_ref().filter(|own| own.local_addr().is_ok_and(|a| a.ip() == ip)) {
            return own.clone();
        }
        // The one left on an old address keeps the connections it carries until they end.
        match crate::transport::dial_endpoint(ip, cfg) {
            Ok(endpoint) => {
                debug!(worker, addr = ?endpoint.local_addr().ok(), "this worker dials peers from its own UDP socket");
                *slot = Some(endpoint.clone());
                endpoint
            }
            Err(e) => {
                warn!(worker, error = %e, "this worker cannot have a UDP socket of its own; it dials peers from the process's QUIC socket");
                self.endpoint.clone()
            }
        }
    }

    /// Lets go of `conn` when the peer says GOAWAY (it is draining): no new request goes on
    /// it, and it closes once the requests still on it let go of it too (the peer waits for
    /// that close to know they have their answers). Marks the peer unreachable as soon as
    /// `conn` ends because nothing came from the peer for the QUIC idle timeout (it died, froze
    /// or was cut off; keep-alives make an idle but living peer answer well within it):
    /// requests then skip it until a probe reaches it, instead of each dialling it and waiting
    /// out `timeouts.connect`. After a GOAWAY the connection is no longer watched: its peer is
    /// leaving, and requests still on it fail on their own if it goes silent.
    fn watch(self: &Arc<Self>, name: &str, peer: &Arc<Peer>, conn: quinn::Connection, goaway: GoAway) {
        let (dialer, name, peer) = (self.clone(), name.to_string(), Arc::downgrade(peer));
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.closed() => {}
                Ok(()) = goaway => debug!(peer = name, "the peer said GOAWAY; its connection takes no new request"),
            }
            if let Some(peer) = peer.upgrade() {
                dialer.forget(&name, &peer, &conn).await;
            }
        });
    }

    /// Drops `conn` from the pool if it is the pooled one; marks the peer unreachable if the
    /// connection timed out.
    async fn forget(self: &Arc<Self>, name: &str, peer: &Arc<Peer>, conn: &quinn::Connection) {
        let mut guard = peer.conn.lock().await;
        // Read before the pool lets go of it (the last holder of a connection closes it).
        let silent = matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut));
        if guard.as_ref().is_some_and(|pc| pc.conn.stable_id() == conn.stable_id()) {
            *guard = None;
        }
        drop(guard);
        if silent {
            self.mark_down(name, peer, conn.remote_address(), &went_silent(name));
        }
    }

    fn handshake_timed_out(&self, peer: &str, addr: SocketAddr) -> ProxyError {
        metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => "timeout").increment(1);
        warn!(peer, %addr, reason = "timeout", after = ?self.connect_timeout, "QUIC handshake with peer failed");
        ProxyError::ConnectTimeout(format!("peer node {peer} at {addr}"))
    }

    /// Records a failed handshake: the first one marks the peer unreachable and starts its probe.
    fn mark_down(self: &Arc<Self>, name: &str, peer: &Arc<Peer>, addr: SocketAddr, error: &ProxyError) {
        let reason = match error {
            ProxyError::PeerUnreachable { reason, .. } | ProxyError::PeerTls { reason, .. } => reason.clone(),
            ProxyError::ConnectTimeout(_) => format!("no answer within {:?}", self.connect_timeout),
            other => other.to_string(),
        };
        let now = Instant::now();
        let mut down = peer.down.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = down.as_mut().filter(|d| d.addr == addr) {
            d.reason = reason;
            return;
        }
        let wait = probe_backoff(1);
        // A mark for an old address is replaced (its probe stops), not counted twice.
        let fresh = down.is_none();
        *down =
            Some(Down { addr, since: now, reason: reason.clone(), failures: 1, next_probe: now + wait, wanted: now });
        drop(down);
        if fresh {
            self.down.fetch_add(1, Ordering::Relaxed);
        }
        self.marked.send_replace(());
        metrics::gauge!(m::PEER_UNREACHABLE, "peer" => name.to_string()).set(1.0);
        warn!(peer = name, %addr, reason, probe_in = ?wait, "peer marked unreachable; requests go to other endpoints until a probe reaches it");
        tokio::spawn(self.clone().probe(name.to_string(), Arc::downgrade(peer), addr, wait));
    }

    /// The unreachable mark of `peer`, shared by every pool of this dialer.
    fn mark(&self, peer: &str) -> Arc<Mutex<Option<Down>>> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).entry(peer.to_string()).or_default().clone()
    }

    /// Clears an unreachable mark (a handshake succeeded).
    fn mark_up(&self, name: &str, peer: &Peer) {
        self.clear_mark(name, peer, true);
    }

    /// Removes the unreachable mark; `reached` says whether a handshake succeeded (or the mark
    /// is only forgotten).
    fn clear_mark(&self, name: &str, peer: &Peer, reached: bool) {
        let was = peer.down.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(down) = was {
            self.down.fetch_sub(1, Ordering::Relaxed);
            if reached {
                info!(peer = name, addr = %down.addr, down_for = ?down.since.elapsed(), "peer reachable again");
            } else {
                debug!(peer = name, addr = %down.addr, "no request asked for the unreachable peer for a while; the next one dials it afresh");
            }
        }
        metrics::gauge!(m::PEER_UNREACHABLE, "peer" => name.to_string()).set(0.0);
    }

    /// Dials an unreachable peer with backoff until a handshake succeeds (the connection is
    /// pooled and the mark cleared), the peer is forgotten or re-addressed, or nobody has asked
    /// for it for [`PROBE_UNWANTED`].
    async fn probe(self: Arc<Self>, name: String, peer: std::sync::Weak<Peer>, addr: SocketAddr, first: Duration) {
        let mut wait = first;
        loop {
            tokio::time::sleep(wait).await;
            let Some(peer) = peer.upgrade() else { return };
            let (failures, wanted) = match peer.down.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(d) if d.addr == addr => (d.failures, d.wanted),
                _ => return,
            };
            if wanted.elapsed() > PROBE_UNWANTED {
                // Nobody asks for it (the balancer routes around it): stop dialling; a request
                // that picks it later dials afresh, once, and marks it again if it must.
                self.clear_mark(&name, &peer, false);
                return;
            }
            let mut guard = peer.conn.lock().await;
            let live = guard.as_ref().is_some_and(|pc| pc.takes_requests_to(addr));
            let result = if live {
                Ok(())
            } else {
                match tokio::time::timeout(self.connect_timeout, Box::pin(self.connect(&name, addr, false))).await {
                    Ok(Ok((pc, goaway))) => {
                        self.watch(&name, &peer, pc.conn.clone(), goaway);
                        *guard = Some(pc);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {:?}", self.connect_timeout)),
                }
            };
            drop(guard);
            let outcome = if result.is_ok() { "reached" } else { "failed" };
            metrics::counter!(m::PEER_PROBES, "peer" => name.clone(), "result" => outcome).increment(1);
            match result {
                Ok(()) => {
                    self.mark_up(&name, &peer);
                    return;
                }
                Err(reason) => {
                    wait = probe_backoff(failures + 1);
                    let mut down = peer.down.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(d) = down.as_mut().filter(|d| d.addr == addr) else { return };
                    d.failures = failures + 1;
                    d.next_probe = Instant::now() + wait;
                    debug!(peer = name, %addr, reason, failures = d.failures, next = ?wait, "probe of unreachable peer failed");
                    d.reason = reason;
                }
            }
        }
    }

    /// Dials `peer`; `early_ok`: in 0-RTT when a session allows it (never for a peer marked
    /// unreachable: a dial that sends nothing before the handshake ends would prove nothing).
    async fn connect(
        self: &Arc<Self>,
        peer: &str,
        addr: SocketAddr,
        early_ok: bool,
    ) -> Result<(PeerConn, GoAway), ProxyError> {
        let unreachable = |reason: String| ProxyError::PeerUnreachable { peer: peer.into(), reason };
        let endpoint = self.endpoint_here();
        let connecting = match self.client.load_full() {
            Some(client) => endpoint.connect_with(ClientConfig::clone(&client), addr, peer),
            None => endpoint.connect(addr, peer),
        }
        .map_err(|e| unreachable(e.to_string()))?;
        // With a session of this peer's that allows it, the connection is usable at once (0-RTT):
        // requests ride the first packet, and [`PeerConn::ready_for`] holds back those that
        // must not be replayed until the handshake ends.
        let no_early = || self.no_early.lock().unwrap_or_else(|e| e.into_inner()).contains(peer);
        let last = self.framings.lock().unwrap_or_else(|e| e.into_inner()).get(peer).copied();
        let (conn, accepted) = match connecting.into_0rtt() {
            Ok((conn, accepted)) if early_ok && last.is_some() && !no_early() => (Ok(conn), Some(accepted)),
            Ok((conn, accepted)) => {
                // Nothing goes early: the handshake is awaited as for a full one.
                let ok = accepted.await;
                match conn.close_reason() {
                    Some(e) => (Err(e), None),
                    None => {
                        debug!(peer, early_data_taken = ok, "connection to peer completed without 0-RTT");
                        (Ok(conn), None)
                    }
                }
            }
            Err(connecting) => (connecting.await, None),
        };
        if accepted.is_none() && conn.is_ok() {
            self.no_early.lock().unwrap_or_else(|e| e.into_inner()).remove(peer);
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                let reason = tls::handshake_failure_reason(&e);
                metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => reason)
                    .increment(1);
                warn!(peer, %addr, reason, error = %e, "QUIC handshake with peer failed");
                return Err(match reason {
                    "transport" | "timeout" => unreachable(e.to_string()),
                    _ => ProxyError::PeerTls { peer: peer.into(), reason: e.to_string() },
                });
            }
        };
        // In 0-RTT, the framing of the session's connection; else the one just negotiated.
        let framing = match (&accepted, last) {
            (Some(_), Some(last)) => last,
            _ => Framing::of(&conn).unwrap_or(Framing::H3),
        };
        let early = match accepted {
            None => {
                self.framings.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.to_string(), framing);
                if !identity_is(&conn, &self.trust_domain, peer) {
                    // The verifier already pinned the identity; this guards against a misconfigured verifier.
                    conn.close(1u32.into(), b"identity mismatch");
                    return Err(ProxyError::PeerTls { peer: peer.into(), reason: "identity mismatch".into() });
                }
                None
            }
            Some(accepted) => {
                // The session was this peer's (its name keys the session cache); the identity
                // is checked again once the handshake has proved it.
                let (tx, rx) = watch::channel(None);
                let (conn, td, peer) = (conn.clone(), self.trust_domain.clone(), peer.to_string());
                let dialer = self.clone();
                let (mut marked, mark) = (self.marked.subscribe(), self.mark(&peer));
                // A mark made since this dial began counts too.
                marked.mark_changed();
                tokio::spawn(async move {
                    tokio::pin!(accepted);
                    let took = loop {
                        tokio::select! {
                            took = &mut accepted => break Some(took),
                            Ok(()) = marked.changed() => {
                                let down = mark.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|d| d.addr == addr);
                                if down {
                                    break None;
                                }
                            }
                        }
                    };
                    let Some(took) = took else {
                        // Another connection found the peer silent while this handshake was
                        // under way: it will not end either, and its early requests (replay-safe
                        // ones) go elsewhere now rather than when it times out.
                        debug!(peer, "peer marked unreachable during a 0-RTT handshake; given up");
                        conn.close(0u32.into(), b"peer unreachable");
                        let _ = tx.send(Some(false));
                        return;
                    };
                    let lost = conn.close_reason();
                    // Early requests went in `framing`: a peer that chose another refused them.
                    let ok =
                        took && lost.is_none() && identity_is(&conn, &td, &peer) && Framing::of(&conn) == Some(framing);
                    let result = if ok { "accepted" } else { "rejected" };
                    metrics::counter!(m::QUIC_ZERO_RTT, "direction" => "outbound", "result" => result).increment(1);
                    if !ok {
                        dialer.no_early.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.clone());
                    }
                    match &lost {
                        // The handshake failed (the peer is gone, or refused us): said as any
                        // failed handshake is, and the close's own reason is kept, so that the
                        // pool marks a silent peer unreachable.
                        Some(e) => {
                            let reason = tls::handshake_failure_reason(e);
                            metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => reason)
                                .increment(1);
                            warn!(peer, reason, error = %e, "QUIC handshake with peer failed (0-RTT)");
                        }
                        // Closed before the waiters are told, so that none of them takes this
                        // connection for its retry.
                        None if !ok => {
                            debug!(peer, "the peer refused our 0-RTT data; dialling it again without");
                            conn.close(0u32.into(), b"0-RTT refused");
                        }
                        None => {}
                    }
                    let _ = tx.send(Some(ok));
                });
                Some(rx)
            }
        };
        let peer_label = peer.to_string();
        let (goaway_tx, goaway) = oneshot::channel();
        let link = match framing {
            Framing::H3 => {
                let (mut driver, h3) = h3::client::builder()
                    .send_grease(false)
                    // A peer's answer heads are bounded as its requests' are here.
                    .max_field_section_size(lean::MAX_HEAD as u64)
                    .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let label = peer_label.clone();
                tokio::spawn(async move {
                    let mut goaway_tx = Some(goaway_tx);
                    let err = std::future::poll_fn(|cx| {
                        let closed = driver.poll_close(cx);
                        // The driver reads the control stream: a GOAWAY on it marks the
                        // connection closing.
                        if goaway_tx.is_some() && h3::ConnectionState::is_closing(&driver) {
                            let _ = goaway_tx.take().map(|tx| tx.send(()));
                        }
                        closed
                    })
                    .await;
                    metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "outbound").decrement(1.0);
                    debug!(peer = label, error = %err, "QUIC connection to peer closed");
                });
                Link::H3(h3)
            }
            Framing::Lean => {
                let stalls = Stalls::new(conn.clone());
                let link = Arc::new(LeanLink { conn: conn.clone(), goaway: AtomicBool::new(false), stalls });
                // Not a holder: a link nobody holds closes.
                let (watched, label) = (Arc::downgrade(&link), peer_label.clone());
                let quic = conn.clone();
                tokio::spawn(async move {
                    if lean::goaway_from(&quic).await {
                        if let Some(link) = watched.upgrade() {
                            link.goaway.store(true, Ordering::Release);
                        }
                        let _ = goaway_tx.send(());
                    }
                    let err = quic.closed().await;
                    metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "outbound").decrement(1.0);
                    debug!(peer = label, error = %err, "QUIC connection to peer closed");
                });
                Link::Lean(link)
            }
        };
        metrics::counter!(m::QUIC_CONNECTIONS_OPENED, "direction" => "outbound", "peer" => peer_label.clone())
            .increment(1);
        metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "outbound").increment(1.0);
        info!(peer, %addr, ?framing, rtt_us = conn.rtt().as_micros() as u64, "QUIC connection to peer established");
        watch_stats(conn.clone(), "outbound", peer_label);
        let streams = metrics::counter!(m::QUIC_STREAMS, "direction" => "outbound", "peer" => peer.to_string());
        let state = PeerConnState { conn, link, streams, early, worker: crate::runtime::index() };
        Ok((PeerConn(Arc::new(state)), goaway))
    }
}

/// Why a peer whose connection timed out is marked unreachable.
fn went_silent(peer: &str) -> ProxyError {
    ProxyError::PeerUnreachable {
        peer: peer.into(),
        reason: "went silent (no packet within the QUIC idle timeout)".into(),
    }
}

/// Whether `conn`'s peer presented the certificate of node `peer`.
fn identity_is(conn: &quinn::Connection, trust_domain: &str, peer: &str) -> bool {
    tls::peer_identity(conn, trust_domain).and_then(|id| id.node_name().map(str::to_owned)).as_deref() == Some(peer)
}

/// Methods whose requests may be replayed without harm (RFC 9110 safe methods).
pub fn replay_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// How often a connection's path statistics are exported.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// Exports a peer connection's round-trip time, congestion window, datagram size, and sent and lost packets
/// every couple of seconds until it closes.
pub fn watch_stats(conn: quinn::Connection, direction: &'static str, peer: String) {
    tokio::spawn(async move {
        // The handles are looked up once per connection: each lookup copies its labels and
        // hashes its key, five of them every tick for every peer.
        let rtt = metrics::gauge!(m::QUIC_RTT, "direction" => direction, "peer" => peer.clone());
        let cwnd = metrics::gauge!(m::QUIC_CWND, "direction" => direction, "peer" => peer.clone());
        let mtu = metrics::gauge!(m::QUIC_MTU, "direction" => direction, "peer" => peer.clone());
        let sent_packets = metrics::counter!(m::QUIC_SENT_PACKETS, "direction" => direction, "peer" => peer.clone());
        let lost_packets = metrics::counter!(m::QUIC_LOST_PACKETS, "direction" => direction, "peer" => peer);
        let (mut sent, mut lost) = (0u64, 0u64);
        loop {
            let path = conn.stats().path;
            rtt.set(path.rtt.as_secs_f64());
            cwnd.set(path.cwnd as f64);
            mtu.set(f64::from(path.current_mtu));
            sent_packets.increment(path.sent_packets.saturating_sub(sent));
            lost_packets.increment(path.lost_packets.saturating_sub(lost));
            (sent, lost) = (path.sent_packets, path.lost_packets);
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep(STATS_EVERY) => {}
            }
        }
    });
}
