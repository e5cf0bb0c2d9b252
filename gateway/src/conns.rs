//! Client connections at the edge: how many are open, in all and per client address, and
//! whether each is doing anything.
//!
//! A connection is admitted only while both counts are under their limits
//! (`gateway.limits.max_connections`, `.max_connections_per_client`); one past them is closed at
//! once and counted, so idle or hoarded connections cannot use up the process's descriptors.
//! A connection with no request in flight for `idle_timeout` is closed whatever it sends
//! meanwhile (HTTP/2 PINGs, HTTP/3 keep-alives), through [`Activity`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Counts of open client connections.
pub struct Conns {
    max: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_connections` are open.
    Total,
    /// This client address has `max_connections_per_client` open.
    Client,
}

impl Full {
    pub fn reason(self) -> &'static str {
        match self {
            Full::Total => "connection-limit",
            Full::Client => "client-connection-limit",
        }
    }
}

/// One admitted connection; its counts go down when it is dropped.
pub struct Admitted {
    conns: Arc<Conns>,
    client: IpAddr,
}

impl Conns {
    pub fn new(max: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Self { max, per_client, open: Mutex::new((0, HashMap::new())) })
    }

    /// Admits a connection from `client`, or says which limit is reached.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, Full> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max {
            return Err(Full::Total);
        }
        let mine = open.1.get(&client).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(Full::Client);
        }
        open.0 += 1;
        open.1.insert(client, mine + 1);
        Ok(Admitted { conns: self.clone(), client })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// Requests in flight on one connection, since when it has had none, and whether it has had
/// any yet.
#[derive(Clone)]
pub struct Activity(Arc<Mutex<(usize, Instant, bool)>>);

/// Counts one request as in flight until dropped (held by its response body).
pub struct InFlight(Activity);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(Mutex::new((0, Instant::now(), false))))
    }
}

impl Activity {
    pub fn start(&self) -> InFlight {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += 1;
        state.2 = true;
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle`, or, before its
    /// first request, for `first`.
    pub async fn idle_for(&self, first: Duration, idle: Duration) {
        loop {
            let (busy, since, any) = *self.0.lock().unwrap_or_else(|e| e.into_inner());
            let due = since + if any { idle } else { first };
            if busy == 0 && Instant::now() >= due {
                return;
            }
            // Busy: look again after a whole period (a request in flight keeps it open).
            tokio::time::sleep_until(if busy == 0 { due } else { Instant::now() + idle }).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_in_all_and_per_client_and_slots_come_back() {
        let conns = Conns::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = conns.admit(a).unwrap();
        let _a2 = conns.admit(a).unwrap();
        assert_eq!(conns.admit(a).err(), Some(Full::Client));
        let _b1 = conns.admit(b).unwrap();
        assert_eq!(conns.admit(b).err(), Some(Full::Total));
        drop(a1);
        assert!(conns.admit(b).is_ok(), "a closed connection frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_request_not_from_traffic() {
        let activity = Activity::default();
        let req = activity.start();
        let idle = Duration::from_secs(5);
        let waited = tokio::time::timeout(Duration::from_secs(20), activity.idle_for(idle, idle)).await;
        assert!(waited.is_err(), "idle while a request was in flight");
        let ended = Instant::now();
        drop(req);
        activity.idle_for(Duration::from_secs(1), idle).await;
        assert!(Instant::now() >= ended + idle, "after a request, the idle period counts");
        let fresh = Activity::default();
        let start = Instant::now();
        fresh.idle_for(Duration::from_secs(1), idle).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(1), "before any request, the first period counts");
    }
}
