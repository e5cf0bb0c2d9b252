//! Streams whose reader has stopped taking data, kept from holding up the rest of their
//! connection.
//!
//! quinn gives a connection's credit (MAX_DATA) back only as data is read. A proxy reads a
//! stream as fast as whoever it relays to takes the data, so when a client stops reading its
//! download (or an instance its upload), what came for it waits in quinn's buffers and counts
//! against the receive window of the connection that every other request to that peer shares.
//! A few large answers nobody read used the whole window, and the peer could then send no one
//! anything on it.
//!
//! Each stream read through a [`Watch`] is marked while its reader is away: it took data and
//! has not asked for more. A watcher per connection, running while the connection has watched
//! streams, counts those away for two ticks or more as stalled and grows the connection's
//! window by a stream window for each, so what they hold leaves the configured window to the
//! others. What is lent comes from a budget per process (`transport.stalled_budget`); past
//! it, when the peer says the window blocks it (DATA_BLOCKED), the streams stalled longest
//! that the loan does not cover are stopped (STOP_SENDING): their readers lose what they
//! stopped taking, and the credit it held comes back to everyone else. The same remedy an HTTP/2
//! proxy's overload manager applies to the streams holding the most memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use quinn::{StreamId, VarInt};

use crate::config::TransportConfig;
use crate::telemetry::metrics as m;

/// How often a watcher looks at its connection's streams; a stream away for two ticks is
/// stalled: a quarter to three quarters of a second after it took data or data came for it.
const TICK: Duration = Duration::from_millis(250);
/// Ticks a stream must have been away to count as stalled.
const STALLED_AFTER: u64 = 2;
/// Ticks without a watched stream after which a watcher stops (and gives back what it lent).
const IDLE_TICKS: u32 = 8;
/// Ticks a loan must have been larger than the stalled streams ask before the rest goes back.
const RETURN_AFTER: u32 = 8;
/// The code a stalled stream is stopped with: HTTP/3's H3_REQUEST_CANCELLED (the response is
/// no longer wanted), which the lean framing shares.
const STOPPED: u32 = 0x10c;

/// The windows in force, set from the transport settings the endpoints were made with.
static WINDOW: AtomicU64 = AtomicU64::new(16 << 20);
static STREAM_WINDOW: AtomicU64 = AtomicU64::new(4 << 20);
static BUDGET: AtomicU64 = AtomicU64::new(64 << 20);
/// Window lent now, over all this process's connections.
static LENT: AtomicU64 = AtomicU64::new(0);

/// Takes the windows and the budget from `cfg` (done where the endpoints' transport is made).
pub fn configure(cfg: &TransportConfig) {
    WINDOW.store(u64::from(cfg.connection_window), Ordering::Relaxed);
    STREAM_WINDOW.store(u64::from(cfg.stream_window), Ordering::Relaxed);
    BUDGET.store(cfg.stalled_budget, Ordering::Relaxed);
}

/// The watched streams of one connection.
pub struct Stalls {
    conn: quinn::Connection,
    streams: Mutex<slab::Slab<Arc<Slot>>>,
    /// The watcher's clock, in ticks; starts at 1 (a slot's 0 means "reading").
    tick: AtomicU64,
    /// A watcher is running.
    watching: AtomicBool,
}

struct Slot {
    /// The tick at which the reader last took data without asking for more since; 0 while it
    /// waits for data (it then holds nothing in quinn's buffers).
    away: AtomicU64,
    id: StreamId,
    /// The reader's own waker, woken through the slot's (see [`Watch::poll`]).
    waker: AtomicWaker,
    /// The watcher stopped the stream.
    stopped: AtomicBool,
}

/// A slot's `away` once quinn woke its reader (data came) and the watcher has not yet seen it.
const WOKEN: u64 = u64::MAX;

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Data came for a reader that waited: it is away until it asks again.
        let _ = self.away.compare_exchange(0, WOKEN, Ordering::Relaxed, Ordering::Relaxed);
        self.waker.wake();
    }
}

impl Stalls {
    pub fn new(conn: quinn::Connection) -> Arc<Self> {
        Arc::new(Self { conn, streams: Mutex::new(slab::Slab::new()), tick: AtomicU64::new(1), watching: false.into() })
    }

    /// Watches stream `id`'s reader until the returned [`Watch`] goes.
    pub fn watch(self: &Arc<Self>, id: StreamId) -> Watch {
        let slot = Arc::new(Slot {
            away: AtomicU64::new(self.tick.load(Ordering::Relaxed)),
            id,
            waker: AtomicWaker::new(),
            stopped: AtomicBool::new(false),
        });
        let key = lock(&self.streams).insert(slot.clone());
        // A look first: the watcher runs nearly always while streams come and go.
        if !self.watching.load(Ordering::Acquire) && !self.watching.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().watcher());
        }
        Watch { stalls: self.clone(), waker: Waker::from(slot.clone()), slot, key }
    }

    /// Lends window to the stalled streams, within the budget, and stops those it cannot
    /// cover once the peer is blocked; ends (giving the loan back) when the connection closes
    /// or has had no watched stream for a while.
    async fn watcher(self: Arc<Self>) {
        let stream_window = STREAM_WINDOW.load(Ordering::Relaxed).max(1);
        let window = WINDOW.load(Ordering::Relaxed);
        let lent_gauge = metrics::gauge!(m::QUIC_WINDOW_LENT);
        let stopped = metrics::counter!(m::QUIC_STALLED_STOPPED);
        let budget = BUDGET.load(Ordering::Relaxed);
        let mut lent = 0u64;
        // The peer said the window blocks it (DATA_BLOCKED). It says so once per window it is
        // given, so this holds until the window grows or streams are stopped: a report that
        // came before the stalled streams were old enough to count is not lost.
        let mut blocked_seen = self.conn.stats().frame_rx.data_blocked;
        let mut peer_blocked = false;
        // Ticks the loan has been more than the stalled streams ask for.
        let mut over_asked = 0;
        // Ticks without a stalled stream.
        let mut quiet = 0;
        let mut idle = 0;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.conn.closed() => break,
            }
            let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
            let mut stalled: Vec<(u64, Arc<Slot>)> = {
                let streams = lock(&self.streams);
                if streams.is_empty() {
                    idle += 1;
                } else {
                    idle = 0;
                }
                streams
                    .iter()
                    // A stopped stream holds nothing any more, read again or not.
                    .filter(|(_, s)| !s.stopped.load(Ordering::Relaxed))
                    .filter_map(|(_, s)| {
                        let mut away = s.away.load(Ordering::Relaxed);
                        if away == WOKEN {
                            // Woken and not back yet: away from now.
                            away = match s.away.compare_exchange(WOKEN, tick, Ordering::Relaxed, Ordering::Relaxed) {
                                Ok(_) => tick,
                                Err(now) => now,
                            };
                        }
                        (away != 0 && away != WOKEN && tick.saturating_sub(away) >= STALLED_AFTER)
                            .then(|| (away, s.clone()))
                    })
                    .collect()
            };
            if idle >= IDLE_TICKS {
                self.watching.store(false, Ordering::Release);
                // A stream watched since the look above would find `watching` still set and
                // start no watcher: this one goes on for it.
                if lock(&self.streams).is_empty() || self.watching.swap(true, Ordering::AcqRel) {
                    break;
                }
                idle = 0;
            }
            let blocked = self.conn.stats().frame_rx.data_blocked;
            peer_blocked |= blocked > blocked_seen;
            blocked_seen = blocked;
            let mut want = stalled.len() as u64 * stream_window;
            // A loan goes back only once it has been more than needed for a while: quinn turns
            // a smaller window into a debt paid by later reads, and a window grown again before
            // that would give the peer the same credit twice.
            if want < lent {
                over_asked += 1;
                if over_asked < RETURN_AFTER {
                    want = lent;
                }
            } else {
                over_asked = 0;
            }
            let now = settle(lent, want, budget);
            if now != lent {
                if now > lent {
                    peer_blocked = false;
                }
                lent_gauge.increment(now as f64 - lent as f64);
                lent = now;
                over_asked = 0;
                self.conn.set_receive_window(VarInt::from_u64(window + lent).unwrap_or(VarInt::MAX));
            }
            // A report from before every stalled stream came back is old news, but one that
            // came while the streams that hold the window were too young to count is not.
            quiet = if stalled.is_empty() { quiet + 1 } else { 0 };
            if quiet >= RETURN_AFTER {
                peer_blocked = false;
            }
            let covered = (lent / stream_window) as usize;
            if peer_blocked && stalled.len() > covered {
                peer_blocked = false;
                // Those stalled longest first (the smallest tick).
                stalled.sort_unstable_by_key(|(away, _)| *away);
                let over = stalled.len() - covered;
                for (_, slot) in &stalled[..over] {
                    slot.stopped.store(true, Ordering::Relaxed);
                    if self.conn.stop_receiving(slot.id, VarInt::from_u32(STOPPED)).is_ok() {
                        stopped.increment(1);
                    }
                }
                tracing::debug!(
                    peer = %self.conn.remote_address(),
                    stopped = over,
                    "stopped streams whose readers stalled, past the window budget"
                );
            }
        }
        if lent > 0 {
            LENT.fetch_sub(lent, Ordering::Relaxed);
            lent_gauge.decrement(lent as f64);
            if self.conn.close_reason().is_none() {
                self.conn.set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
            }
        }
    }
}

/// A connection's loan after it asked for `want` holding `lent`: what it gives back returns to
/// the budget, what more it asks for comes from what is left of it.
fn settle(lent: u64, want: u64, budget: u64) -> u64 {
    if want <= lent {
        LENT.fetch_sub(lent - want, Ordering::Relaxed);
        return want;
    }
    let mut got = 0;
    let _ = LENT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
        got = (want - lent).min(budget.saturating_sub(total));
        Some(total + got)
    });
    lent + got
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A watched stream's reader: marks it away from when it takes data, or from when data comes
/// while it waits, until it asks again; stops watching when dropped.
///
/// A reader that waits is not always one that will read: a proxy that asked for data while
/// its client's connection had room may, by the time the data comes, have none, and not ask
/// again. So the stream's waker is the slot's, which marks the reader away when quinn wakes it.
pub struct Watch {
    stalls: Arc<Stalls>,
    slot: Arc<Slot>,
    /// The slot as a waker, made once.
    waker: Waker,
    key: usize,
}

impl Watch {
    /// Polls `read` (the stream's read) for the reader whose context is `cx`: the reader asks,
    /// and is away once it took data.
    #[inline]
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Context<'_>) -> Poll<T>,
        took: impl FnOnce(&T) -> bool,
    ) -> Poll<T> {
        self.slot.away.store(0, Ordering::Relaxed);
        self.slot.waker.register(cx.waker());
        let polled = read(&mut Context::from_waker(&self.waker));
        if let Poll::Ready(got) = &polled {
            if took(got) {
                self.slot.away.store(self.stalls.tick.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        polled
    }

    /// Whether the watcher stopped the stream (its reads fail as closed).
    pub fn stopped(&self) -> bool {
        self.slot.stopped.load(Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.stalls.streams).try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loans_stay_within_the_budget_and_come_back_whole() {
        // Nothing else in this binary lends (no stream stalls in its tests).
        let before = LENT.load(Ordering::Relaxed);
        let budget = before + 10;
        let a = settle(0, 6, budget);
        let b = settle(0, 6, budget);
        assert_eq!((a, b), (6, 4), "the second connection gets what is left");
        assert_eq!(settle(b, 2, budget), 2, "a smaller want gives the rest back");
        assert_eq!(settle(a, 10, budget), 10 - 2, "and another may take it");
        settle(8, 0, budget);
        settle(2, 0, budget);
        assert_eq!(LENT.load(Ordering::Relaxed), before);
    }
}
