//! Admission of QUIC connection attempts, before any state is made for them.
//!
//! A QUIC Initial costs its sender one datagram, from any source address it likes, and costs a
//! server that accepts it a connection's state until the handshake ends or times out. So every
//! listener decides per [`quinn::Incoming`]:
//! - while fewer than `retry_above` handshakes are in progress, attempts are accepted at once
//!   (no extra round trip in normal operation);
//! - past it, a client whose address is not validated yet gets a stateless Retry: a spoofed
//!   source never answers it, so it costs nothing; a real client comes back validated;
//! - past `max` handshakes in progress, even validated attempts are refused;
//! - an accepted handshake holds a slot until it completes, fails or runs out of time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::telemetry::metrics as m;

/// Attempts quinn holds for the application to decide on; past it, it refuses them itself.
/// Each one holds its first datagram, and with it the whole receive batch that datagram came
/// in (up to 64 KiB), so a flood that outruns the accept loop would otherwise queue 65 536.
pub const MAX_QUEUED: usize = 1024;
/// Bytes of further datagrams quinn buffers for all undecided attempts together.
pub const MAX_QUEUED_BYTES: u64 = 4 << 20;

/// Bounds the attempts a listener queues before [`Admission::admit`] sees them.
pub fn bound_queue(server: &mut quinn::ServerConfig) {
    server.max_incoming(MAX_QUEUED).incoming_buffer_size_total(MAX_QUEUED_BYTES);
}

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Handshakes in progress past which unvalidated addresses must answer a Retry first
    /// (0: always).
    pub retry_above: usize,
    /// Handshakes in progress at most; past it new attempts are refused.
    pub max: usize,
}

impl Limits {
    /// For listeners that only mesh members use (node inbound, control plane).
    pub const MESH: Limits = Limits { retry_above: 64, max: 1024 };
}

/// Counts a listener's handshakes in progress and decides on new attempts.
pub struct Admission {
    listener: &'static str,
    limits: Limits,
    in_progress: Arc<AtomicUsize>,
}

/// One handshake in progress; its slot is given back on drop.
#[derive(Debug)]
pub struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    /// Gives the slot back only after `hold`: a handshake that failed still costs its closing
    /// connection's state for a while, and a flood of attempts that fail at once (a wrong ALPN,
    /// no certificate) must keep the listener busy enough to demand Retries.
    pub fn release_after(self, hold: std::time::Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(self);
        });
    }
}

/// How long the slot of a failed handshake stays taken (about quinn's closing period).
pub const FAILED_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What became of an attempt that was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    /// Sent a stateless Retry (the client must prove its address).
    Retry,
    /// Refused: too many handshakes in progress.
    Refused,
}

impl Turned {
    pub fn label(self) -> &'static str {
        match self {
            Turned::Retry => "retry",
            Turned::Refused => "handshake-limit",
        }
    }
}

impl Admission {
    /// `listener` names it in metrics (`edge`, `inbound`, `control`).
    pub fn new(listener: &'static str, limits: Limits) -> Self {
        Self { listener, limits, in_progress: Arc::new(AtomicUsize::new(0)) }
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// Lets `incoming` through with a slot, or turns it away (counted).
    pub fn admit(&self, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Handshaking)> {
        let busy = self.in_progress();
        let decision = decide(self.limits, busy, incoming.remote_address_validated(), incoming.may_retry());
        match decision {
            None => {
                self.in_progress.fetch_add(1, Ordering::Relaxed);
                return Some((incoming, Handshaking(self.in_progress.clone())));
            }
            // `may_retry` was checked, so this cannot fail; a failure drops the attempt anyway.
            Some(Turned::Retry) => drop(incoming.retry()),
            Some(Turned::Refused) => incoming.refuse(),
        }
        if let Some(turned) = decision {
            metrics::counter!(m::QUIC_ADMISSION, "listener" => self.listener, "decision" => turned.label())
                .increment(1);
        }
        None
    }
}

/// The decision, without I/O: `None` lets the attempt through.
pub fn decide(limits: Limits, in_progress: usize, validated: bool, may_retry: bool) -> Option<Turned> {
    if !validated && may_retry && in_progress >= limits.retry_above {
        return Some(Turned::Retry);
    }
    (in_progress >= limits.max).then_some(Turned::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_past_the_threshold_and_refuse_past_the_cap() {
        let l = Limits { retry_above: 2, max: 4 };
        assert_eq!(decide(l, 0, false, true), None, "quiet: straight in");
        assert_eq!(decide(l, 2, false, true), Some(Turned::Retry), "busy: prove the address");
        assert_eq!(decide(l, 2, true, false), None, "validated by a Retry: in");
        assert_eq!(decide(l, 4, true, false), Some(Turned::Refused), "full even for validated clients");
        assert_eq!(decide(l, 4, false, false), Some(Turned::Refused), "cannot retry and full");
        let always = Limits { retry_above: 0, max: 4 };
        assert_eq!(decide(always, 0, false, true), Some(Turned::Retry), "0 retries every new address");
    }

    #[test]
    fn a_slot_is_given_back_when_the_handshake_ends() {
        let a = Admission::new("test", Limits { retry_above: 1, max: 1 });
        let slot = Handshaking(a.in_progress.clone());
        a.in_progress.fetch_add(1, Ordering::Relaxed);
        assert_eq!(a.in_progress(), 1);
        drop(slot);
        assert_eq!(a.in_progress(), 0);
    }
}
