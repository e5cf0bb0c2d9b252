//! One pooled QUIC + HTTP/3 connection per peer member.
//!
//! The first request to a peer opens the connection while later ones wait on the same per-peer
//! lock, so a burst of concurrent requests still makes exactly one connection. A connection that
//! has closed (idle timeout, stateless reset from a restarted peer, GOAWAY) is replaced on the
//! next request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::ClientConfig;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, info, warn};

use crate::error::ProxyError;
use crate::metrics as m;
use crate::tls;

pub type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// A live connection to a peer and its HTTP/3 request handle.
#[derive(Clone)]
pub struct PeerConn {
    pub conn: quinn::Connection,
    pub h3: SendRequest,
    /// Request streams opened to the peer (`quicmesh_quic_streams_total`), registered once.
    pub streams: metrics::Counter,
}

type Slot = Arc<AsyncMutex<Option<PeerConn>>>;

pub struct PeerPool {
    endpoint: quinn::Endpoint,
    /// Set after a certificate renewal; until then the endpoint's default client config.
    client: arc_swap::ArcSwapOption<quinn::ClientConfig>,
    trust_domain: String,
    connect_timeout: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

impl PeerPool {
    pub fn new(endpoint: quinn::Endpoint, trust_domain: &str, connect_timeout: Duration) -> Self {
        Self {
            endpoint,
            client: arc_swap::ArcSwapOption::empty(),
            trust_domain: trust_domain.into(),
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// New connections use `client` (renewed credentials); pooled ones are kept.
    pub fn set_client_config(&self, client: quinn::ClientConfig) {
        self.client.store(Some(Arc::new(client)));
    }

    fn slot(&self, peer: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(peer.to_string()).or_default().clone()
    }

    /// Is a live connection to `peer` pooled (so `get` will not have to wait for one)?
    pub fn is_ready(&self, peer: &str) -> bool {
        let slot = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(peer).cloned();
        slot.is_some_and(|s| s.try_lock().is_ok_and(|g| g.as_ref().is_some_and(|pc| pc.conn.close_reason().is_none())))
    }

    /// The live connection to `peer`, opened if needed.
    pub async fn get(&self, peer: &str, addr: SocketAddr) -> Result<PeerConn, ProxyError> {
        let slot = self.slot(peer);
        let mut guard = slot.lock().await;
        if let Some(pc) = guard.as_ref() {
            if pc.conn.close_reason().is_none() {
                return Ok(pc.clone());
            }
        }
        *guard = None;
        // Boxed: the handshake's future is most of the size of every request future that awaits
        // `get`, and those are moved whole (into a task, a box) on every request.
        let pc =
            tokio::time::timeout(self.connect_timeout, Box::pin(self.connect(peer, addr))).await.map_err(|_| {
                metrics::counter!(m::QUIC_HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => "timeout")
                    .increment(1);
                ProxyError::ConnectTimeout(format!("peer node {peer} at {addr}"))
            })??;
        *guard = Some(pc.clone());
        Ok(pc)
    }

    /// Closes and forgets the connection to `peer` (a revoked member), whatever its state.
    pub fn close_peer(&self, peer: &str, reason: &'static [u8]) {
        let slot = self.slots.lock().unwrap_or_else(|e| e.into_inner()).remove(peer);
        if let Some(slot) = slot {
            if let Ok(guard) = slot.try_lock() {
                if let Some(pc) = guard.as_ref() {
                    pc.conn.close(2u32.into(), reason);
                }
            }
        }
    }

    /// Forgets `conn` if it is still the pooled one (after it failed a request).
    pub async fn evict(&self, peer: &str, conn: &quinn::Connection) {
        let slot = self.slot(peer);
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|pc| pc.conn.stable_id() == conn.stable_id()) {
            *guard = None;
        }
    }

    async fn connect(&self, peer: &str, addr: SocketAddr) -> Result<PeerConn, ProxyError> {
        let unreachable = |reason: String| ProxyError::PeerUnreachable { peer: peer.into(), reason };
        let connecting = match self.client.load_full() {
            Some(client) => self.endpoint.connect_with(ClientConfig::clone(&client), addr, peer),
            None => self.endpoint.connect(addr, peer),
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let conn = match connecting.await {
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
        if tls::peer_identity(&conn, &self.trust_domain).and_then(|id| id.node_name().map(str::to_owned)).as_deref()
            != Some(peer)
        {
            // The verifier already pinned the identity; this guards against a misconfigured verifier.
            conn.close(1u32.into(), b"identity mismatch");
            return Err(ProxyError::PeerTls { peer: peer.into(), reason: "identity mismatch".into() });
        }
        let (mut driver, h3) = h3::client::builder()
            .send_grease(false)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let peer_label = peer.to_string();
        metrics::counter!(m::QUIC_CONNECTIONS_OPENED, "direction" => "outbound", "peer" => peer_label.clone())
            .increment(1);
        metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "outbound").increment(1.0);
        info!(peer, %addr, rtt_us = conn.rtt().as_micros() as u64, "QUIC connection to peer established");
        watch_stats(conn.clone(), "outbound", peer_label.clone());
        tokio::spawn(async move {
            let err = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            metrics::gauge!(m::QUIC_CONNECTIONS_ACTIVE, "direction" => "outbound").decrement(1.0);
            debug!(peer = peer_label, error = %err, "QUIC connection to peer closed");
        });
        let streams = metrics::counter!(m::QUIC_STREAMS, "direction" => "outbound", "peer" => peer.to_string());
        Ok(PeerConn { conn, h3, streams })
    }
}

/// How often a connection's path statistics are exported.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// Exports a peer connection's round-trip time, congestion window, and sent and lost packets
/// every couple of seconds until it closes.
pub fn watch_stats(conn: quinn::Connection, direction: &'static str, peer: String) {
    tokio::spawn(async move {
        let (mut sent, mut lost) = (0u64, 0u64);
        loop {
            let path = conn.stats().path;
            metrics::gauge!(m::QUIC_RTT, "direction" => direction, "peer" => peer.clone()).set(path.rtt.as_secs_f64());
            metrics::gauge!(m::QUIC_CWND, "direction" => direction, "peer" => peer.clone()).set(path.cwnd as f64);
            metrics::counter!(m::QUIC_SENT_PACKETS, "direction" => direction, "peer" => peer.clone())
                .increment(path.sent_packets.saturating_sub(sent));
            metrics::counter!(m::QUIC_LOST_PACKETS, "direction" => direction, "peer" => peer.clone())
                .increment(path.lost_packets.saturating_sub(lost));
            (sent, lost) = (path.sent_packets, path.lost_packets);
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep(STATS_EVERY) => {}
            }
        }
    });
}
