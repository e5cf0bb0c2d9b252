//! Graceful drain: a process told to stop (SIGTERM) stops taking new work, tells its peers
//! (GOAWAY in the lean framing, HTTP/3 or HTTP/2, `Connection: close`) and waits for the requests in flight, up
//! to a deadline. [`Drain`] is the shared state: the phase, and a count of requests in flight.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// Once a process tells its peers to go away, an HTTP/1.1 client's connection gets this long to
/// send one more request (answered with `Connection: close`) before it is closed: HTTP/1.1 has
/// no GOAWAY, and closing an idle keep-alive connection at once would race a request the client
/// may be writing on it, which it could not safely send again.
pub const LAST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// How long an accept loop waits after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Not ready any more; deregistering, still serving everything.
    Draining,
    /// Peers were told to stop sending; new connections are refused.
    GoingAway,
}

#[derive(Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Counts one request in flight until dropped (or one client connection, for the listeners that
/// hold the drain for each connection until it is closed).
pub struct Guard(Arc<Drain>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { phase: watch::channel(Phase::Serving).0, in_flight: AtomicUsize::new(0), idle: Notify::new() })
    }

    pub fn guard(self: &Arc<Self>) -> Guard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to a later phase (never back).
    pub fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|p| {
            let later = to > *p;
            if later {
                *p = to;
            }
            later
        });
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// When a client's HTTP connection is to be closed for the drain: at GoingAway for HTTP/2,
    /// whose GOAWAY tells the client at once; [`LAST_REQUEST_GRACE`] later for HTTP/1.1, which
    /// has no GOAWAY. `http2` is asked when GoingAway comes.
    pub async fn closing(&self, http2: impl FnOnce() -> bool) {
        self.reached(Phase::GoingAway).await;
        if !http2() {
            tokio::time::sleep(LAST_REQUEST_GRACE).await;
        }
    }

    /// While draining, an HTTP/1.1 answer says the connection ends with it.
    pub fn last_on_connection<B>(&self, http1: bool, resp: &mut http::Response<B>) {
        if http1 && self.phase() >= Phase::Draining {
            resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
    }

    /// The end of a drain: waits for the requests in flight (within `deadline`), logs the
    /// outcome, then lingers so the last responses are acknowledged before connections close.
    pub async fn settle(&self, deadline: Duration) {
        let started = tokio::time::Instant::now();
        let left = self.wait_idle(deadline).await;
        if left > 0 {
            tracing::warn!(
                left,
                "drain deadline passed; cutting what is still in flight (requests, or peers still taking their last responses)"
            );
            return;
        }
        tracing::info!("drained; every request in flight finished");
        tokio::time::sleep(LINGER.min(deadline.saturating_sub(started.elapsed()))).await;
    }

    /// Waits until nothing is in flight or `deadline` passes; returns what is still in flight.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a release in between is not missed.
            notified.as_mut().enable();
            let left = self.in_flight();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.in_flight();
            }
        }
    }

    /// Every TCP listener's accept loop: `while let Some(..) = drain.accepting().next(..)`.
    pub fn accepting(self: &Arc<Self>) -> Accepting {
        Accepting { drain: self.clone(), hold: Some(self.guard()) }
    }

    /// The next TCP connection on `listener` (with `TCP_NODELAY`), or `None` once peers are
    /// being told to go away. An accept error (out of file descriptors, say) backs off briefly
    /// rather than spinning.
    ///
    /// Going away, the connections the kernel already completed are still taken, until its
    /// accept queue is empty: their clients saw `connect` succeed and may have sent a request,
    /// which closing the listener would reset.
    async fn accept(&self, listener: &TcpListener, what: &str) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = if self.phase() >= Phase::GoingAway {
                queued(listener)?
            } else {
                tokio::select! {
                    a = listener.accept() => a,
                    _ = self.reached(Phase::GoingAway) => continue,
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "{what} accept failed");
                    if self.phase() >= Phase::GoingAway {
                        // A client that gave up in the queue: the ones behind it are still there.
                        if e.kind() == std::io::ErrorKind::ConnectionAborted {
                            continue;
                        }
                        return None;
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// An accept loop's hold on the drain. It counts as work in flight until its listener's queue
/// has been emptied at GoingAway, so the drain's end ([`Drain::settle`]) cannot pass before the
/// connections already queued are taken; the loop counts each one it takes from then on (a
/// [`Guard`] taken before handing it to a worker).
pub struct Accepting {
    drain: Arc<Drain>,
    hold: Option<Guard>,
}

impl Accepting {
    /// The next connection, or `None` (and the hold released) once the drain goes away and the
    /// queue is empty.
    pub async fn next(&mut self, listener: &TcpListener, what: &str) -> Option<(TcpStream, SocketAddr)> {
        let next = self.drain.accept(listener, what).await;
        if next.is_none() {
            self.hold = None;
        }
        next
    }
}

/// One connection already waiting in `listener`'s accept queue, or `None` when it is empty.
/// A direct non-blocking `accept`: tokio's cached readiness may not have seen the last arrivals.
fn queued(listener: &TcpListener) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    let taken = socket2::SockRef::from(listener).accept().and_then(|(socket, peer)| {
        socket.set_nonblocking(true)?;
        let peer = peer.as_socket().ok_or_else(|| std::io::Error::other("not an IP peer"))?;
        Ok((TcpStream::from_std(socket.into())?, peer))
    });
    match taken {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        taken => Some(taken),
    }
}

/// After the last response was handed to QUIC, how long to wait before closing connections:
/// closing abandons data the peer has not acknowledged yet, so give it a few round trips plus
/// the peer's ACK delay (25 ms by default), within the drain deadline. A node's peers need no
/// linger (their connections count as in flight until they close them: see the node's
/// inbound); the gateway's HTTP/3 clients do, since closing is the server's part there.
pub const LINGER: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_guards_or_the_deadline() {
        let d = Drain::new();
        let g = d.guard();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.wait_idle(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(g);
        assert_eq!(waiter.await.unwrap(), 0);
        let _stuck = d.guard();
        assert_eq!(d.wait_idle(Duration::from_secs(2)).await, 1, "the deadline ends the wait");
        d.advance(Phase::GoingAway);
        d.advance(Phase::Draining);
        assert_eq!(d.phase(), Phase::GoingAway, "phases never go back");
    }

    /// A client whose `connect` succeeded just before the drain reached GoingAway is queued in
    /// the kernel, not yet accepted: it is still taken, not reset with the listener. Only then
    /// does the accept loop end.
    #[tokio::test]
    async fn going_away_still_takes_the_connections_already_queued() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
        }
        let d = Drain::new();
        d.advance(Phase::GoingAway);
        let mut taken = Vec::new();
        let mut accepting = d.accepting();
        while let Some((stream, peer)) = accepting.next(&listener, "test").await {
            assert!(stream.nodelay().unwrap());
            taken.push(peer);
        }
        let mut expected: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        expected.sort();
        taken.sort();
        assert_eq!(taken, expected, "every connection queued before GoingAway is accepted");
        assert_eq!(d.in_flight(), 0, "the loop's hold is released with its last connection");
    }

    /// The drain's end waits for a running accept loop to take what is queued (and the loop
    /// counts each connection it takes): without the loop's hold, `wait_idle` would find
    /// nothing in flight and the process would close under the queued connections.
    #[tokio::test]
    async fn the_drain_waits_for_an_accept_loop_to_take_its_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let d = Drain::new();
        let (taken_tx, mut taken_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut accepting = d.accepting();
        let d2 = d.clone();
        let accept_loop = tokio::spawn(async move {
            while let Some((stream, _)) = accepting.next(&listener, "test").await {
                // Counted from the accept on, as the listeners do before handing it off.
                let _ = taken_tx.send((stream, d2.guard()));
            }
        });
        let _clients: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        d.advance(Phase::GoingAway);
        assert!(d.wait_idle(Duration::from_millis(100)).await > 0, "queued connections are still in flight");
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(taken_rx.recv().await.expect("every queued connection is taken"));
        }
        accept_loop.await.unwrap();
        assert_eq!(d.in_flight(), 4, "the loop's hold is gone; its connections are counted");
        drop(held);
        assert_eq!(d.wait_idle(Duration::from_secs(5)).await, 0);
    }
}
