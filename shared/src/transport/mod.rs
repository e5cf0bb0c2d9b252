//! QUIC endpoints between mesh members: tuning, sockets and the stateless-reset key.
//!
//! One endpoint (one UDP socket) per process serves both directions: it accepts peers when it
//! has a server config and dials peers with the mesh client config. In a process with several
//! workers, each worker past the first dials from a socket of its own ([`dial_endpoint`]). The
//! stateless-reset key is derived from the member's private key, so a node that restarts on the
//! same address answers packets of its previous life with a reset its peers can verify: they
//! drop the dead connection at once instead of waiting for the idle timeout.

pub mod admission;
pub mod certwatch;
pub mod idle;
pub mod lean;
pub mod pool;
pub mod stalls;
pub mod stream;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, VarInt};
use ring::hmac;

use crate::config::{Congestion, Framing, TransportConfig};
use crate::identity::sessions::SessionStore;
use crate::identity::tls::{self, TlsError};
use crate::identity::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("invalid transport setting: {0}")]
    Setting(String),
}

/// The stream limit to give quinn so that a peer can always have `wanted` streams open at once.
///
/// quinn returns the credit of finished streams (MAX_STREAMS) only once more than an eighth of
/// its limit has finished, so up to `limit / 8` finished streams can still count against the
/// peer. With the limit set to exactly `wanted`, a burst of `wanted` requests that wait on each
/// other (a fan-in, a long poll) finds some of its streams unopenable until others end. The
/// smallest limit whose worst case still leaves `wanted` usable fixes that; a peer can then
/// briefly have up to this many open, about 1/7 more than asked.
pub fn advertised_streams(wanted: u32) -> u32 {
    let usable = |limit: u32| limit - limit / 8;
    // Near 8/7 of `wanted`; the loops settle the rounding.
    let mut limit = wanted.saturating_add(wanted / 7);
    while limit > wanted && usable(limit - 1) >= wanted {
        limit -= 1;
    }
    while usable(limit) < wanted && limit < u32::MAX {
        limit += 1;
    }
    limit
}

/// quinn transport parameters for a data-centre mesh.
pub fn transport_config(cfg: &TransportConfig) -> Result<quinn::TransportConfig, TransportError> {
    stalls::configure(cfg);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(advertised_streams(cfg.max_concurrent_streams)))
        .max_concurrent_uni_streams(VarInt::from_u32(16))
        .stream_receive_window(VarInt::from_u32(cfg.stream_window))
        .receive_window(VarInt::from_u32(cfg.connection_window))
        .send_window(u64::from(cfg.connection_window))
        .keep_alive_interval(Some(cfg.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(cfg.idle_timeout)
                .map_err(|e| TransportError::Setting(format!("idle_timeout: {e}")))?,
        ));
    let factory: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match cfg.congestion {
        Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
        Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
    };
    t.congestion_controller_factory(factory);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    let mut ack = quinn::AckFrequencyConfig::default();
    // An out-of-order packet is acknowledged at once, as without the extension: that ACK is
    // what tells the sender of a loss soonest.
    ack.max_ack_delay(Some(cfg.max_ack_delay)).reordering_threshold(VarInt::from_u32(1));
    t.ack_frequency_config(Some(ack));
    Ok(t)
}

/// Derives a secret for `purpose` from the member's key: HMAC(purpose, private key), so the
/// derived bytes reveal nothing of the key and differ per purpose.
fn derive(creds: &Credentials, purpose: &[u8]) -> hmac::Tag {
    let ctx = hmac::Key::new(hmac::HMAC_SHA256, purpose);
    hmac::sign(&ctx, creds.key.secret_der())
}

/// Endpoint config whose stateless-reset tokens and connection-ID validation survive a restart:
/// both are keyed from the member's private key, so the restarted process recognises its old
/// connection IDs as its own and answers them with a reset the peer can verify.
fn endpoint_config(creds: &Credentials, cfg: &TransportConfig) -> Result<EndpointConfig, TransportError> {
    let reset = derive(creds, b"quicmesh stateless reset v1");
    let mut endpoint = EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    let cid = derive(creds, b"quicmesh connection id v1");
    let mut k = [0u8; 8];
    k.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(k);
    endpoint.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // Accept datagrams as large as this side probes for (quinn's default, 1472, at least).
    endpoint
        .max_udp_payload_size(cfg.max_udp_payload.max(1472))
        .map_err(|e| TransportError::Setting(format!("max_udp_payload: {e}")))?;
    Ok(endpoint)
}

/// The most one UDP send may carry over IPv4 (65 535 less the IP and UDP headers). Linux
/// refuses a segmentation-offload (GSO) batch longer than this with `EMSGSIZE`, and quinn-udp
/// takes that error for a path-MTU probe's and drops the batch without a word (quinn issue
/// 2201). quinn 0.11 batches up to 10 datagrams of the path's MTU, so a `max_udp_payload` above
/// 6 550 (a jumbo-frame network's 8 952) lost whole batches: measured, more packets and less
/// throughput than at 1 452 (`BENCH_UDP_PAYLOAD=8952 cargo bench --bench bulk`).
const MAX_SEND: usize = 65_507;

/// `socket` registered with the current runtime (for reads only: [`udp`]), its sends' batches
/// bounded for datagrams up to `transport.max_udp_payload`.
fn quic_socket(socket: std::net::UdpSocket, cfg: &TransportConfig) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    let segments = (MAX_SEND / usize::from(cfg.max_udp_payload.max(1200))).max(1);
    Ok(Arc::new(udp::ReadRegistered::new(socket, segments)?))
}

/// The current runtime, as quinn wants it.
fn runtime() -> Result<Arc<dyn quinn::Runtime>, TransportError> {
    quinn::default_runtime().ok_or_else(|| TransportError::Setting("no async runtime".into()))
}

/// Where the endpoint's UDP socket comes from.
pub enum Bind {
    Addr(SocketAddr),
    /// A socket the caller bound already (so it knows the port before starting anything).
    Socket(std::net::UdpSocket),
}

fn udp_socket(bind: Bind, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, SockRef, Socket, Type};
    let socket = match bind {
        Bind::Socket(s) => s,
        Bind::Addr(addr) => {
            let err = |source| TransportError::Bind { addr, source };
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
            socket.bind(&addr.into()).map_err(err)?;
            socket.into()
        }
    };
    // Best effort: the kernel caps these at net.core.{r,w}mem_max, so say when it did.
    let sock = SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    for (which, got, sysctl) in [
        ("receive", sock.recv_buffer_size(), "net.core.rmem_max"),
        ("send", sock.send_buffer_size(), "net.core.wmem_max"),
    ] {
        if let Some(got) = got.ok().filter(|&got| capped(buffer, got)) {
            tracing::warn!(
                wanted = buffer,
                got = usable(got),
                "the kernel capped this UDP socket's {which} buffer ({sysctl}): QUIC drops packets under \
                 bursts; raise {sysctl} to at least {buffer} (deploy/systemd/99-quicmesh.conf) or lower \
                 transport.socket_buffer"
            );
        }
    }
    Ok(socket)
}

/// The buffer a socket really has, from what `getsockopt` reports: Linux reports twice what
/// it grants (the other half is for its own bookkeeping).
fn usable(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// Whether the kernel granted less than asked for.
fn capped(wanted: usize, reported: usize) -> bool {
    usable(reported) < wanted
}

/// How a mesh endpoint accepts peers: who may connect, and where the TLS sessions it issues
/// are kept (with a store, peers resume them and send idempotent requests in 0-RTT, also after
/// this process restarts; without, sessions live in memory and 0-RTT is off).
#[derive(Debug, Clone)]
pub struct Serve {
    pub auth: tls::ClientAuth,
    pub sessions: Option<Arc<SessionStore>>,
    /// Peers' requests are served in quicmesh's own framing as well as in HTTP/3 (a node's
    /// endpoint); without, in HTTP/3 only (the gateway's control plane).
    pub lean: bool,
}

impl From<tls::ClientAuth> for Serve {
    fn from(auth: tls::ClientAuth) -> Self {
        Serve { auth, sessions: None, lean: false }
    }
}

/// The ALPN protocols a member offers or accepts, in its order of preference.
fn protocols(cfg: &TransportConfig) -> Vec<Vec<u8>> {
    let (lean, h3) = (lean::ALPN.to_vec(), tls::MESH_ALPN.to_vec());
    match cfg.framing {
        Framing::Lean => vec![lean, h3],
        Framing::H3 => vec![h3, lean],
    }
}

/// The client side of mesh connections with these credentials.
pub fn client_config(
    creds: &Credentials,
    trust_domain: &str,
    cfg: &TransportConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = tls::mesh_client(creds, trust_domain)?;
    // A member set to HTTP/3 offers nothing else, as one of an earlier version does.
    tls.alpn_protocols = match cfg.framing {
        Framing::Lean => protocols(cfg),
        Framing::H3 => vec![tls::MESH_ALPN.to_vec()],
    };
    // Early data goes out only where a dial asks for it (the peer pool, for idempotent
    // requests) and a peer's session allows it.
    tls.enable_early_data = cfg.zero_rtt;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(cfg)?));
    Ok(client)
}

/// The server side of a mesh endpoint, with its queue of undecided attempts bounded.
fn server_config(
    creds: &Credentials,
    serve: &Serve,
    cfg: &TransportConfig,
) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = tls::mesh_server(creds, serve.auth)?;
    if serve.lean {
        tls.alpn_protocols = protocols(cfg);
    }
    if let Some(store) = serve.sessions.as_ref().filter(|_| cfg.zero_rtt) {
        // rustls takes early data only with sessions kept server-side (QUIC: all or nothing).
        tls.session_storage = store.clone();
        tls.max_early_data_size = u32::MAX;
    }
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // quinn makes room for every stream a peer may open when the connection is created:
    // thousands of entries, hundreds of KB, for a sender of Initials nobody has checked yet.
    // A peer gets the full limit once it is authenticated (`open_streams`).
    let mut transport = transport_config(cfg)?;
    let limit = advertised_streams(cfg.max_concurrent_streams);
    transport.max_concurrent_bidi_streams(VarInt::from_u32(HANDSHAKE_STREAMS.min(limit)));
    server.transport_config(Arc::new(transport));
    crate::transport::admission::bound_queue(&mut server);
    Ok(server)
}

/// Request streams a peer may open on a connection accepted before it is authenticated.
pub const HANDSHAKE_STREAMS: u32 = 16;

/// Gives an authenticated peer its full stream limit (`transport.max_concurrent_streams`).
pub fn open_streams(conn: &quinn::Connection, cfg: &TransportConfig) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(advertised_streams(cfg.max_concurrent_streams)));
}

/// Installs new credentials (a renewed certificate) as the endpoint's server side: peers that
/// connect from now on see them; established connections carry on untouched. Returns the
/// matching client config, for the peer pool.
pub fn reconfigure(
    endpoint: &quinn::Endpoint,
    creds: &Credentials,
    trust_domain: &str,
    cfg: &TransportConfig,
    serve: Option<Serve>,
) -> Result<quinn::ClientConfig, TransportError> {
    if let Some(serve) = serve {
        if let Some(store) = &serve.sessions {
            store.set_roots(&creds.roots);
        }
        endpoint.set_server_config(Some(server_config(creds, &serve, cfg)?));
    }
    client_config(creds, trust_domain, cfg)
}

/// Moves `endpoint` to a new UDP socket bound to `addr` (an address change of the host): the
/// connections this side opened migrate to it (each peer validates the new path, and their
/// streams carry on); connections peers opened to the old address are lost, and those peers
/// reconnect to the new address once they learn it. Returns the new socket's address; on error
/// the old socket stays.
pub fn rebind(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    cfg: &TransportConfig,
) -> Result<SocketAddr, TransportError> {
    let socket = udp_socket(Bind::Addr(addr), cfg.socket_buffer)?;
    let local = socket.local_addr().map_err(|source| TransportError::Bind { addr, source })?;
    let socket = quic_socket(socket, cfg).map_err(|source| TransportError::Bind { addr, source })?;
    endpoint.rebind_abstract(socket).map_err(|source| TransportError::Bind { addr, source })?;
    Ok(local)
}

/// A dial-only QUIC endpoint of a worker thread ([`crate::runtime`]), on a socket of its own
/// bound to `ip` (the mesh endpoint's address) and a port the kernel picks. Call it on the
/// worker's runtime: the socket's receives wake that worker, where its connections' drivers
/// run, instead of crossing from the main runtime's thread for every datagram. It accepts
/// nothing (no server config), and a peer's reply to it is authenticated by the connection's
/// keys alone, as any client's is.
pub fn dial_endpoint(ip: std::net::IpAddr, cfg: &TransportConfig) -> Result<quinn::Endpoint, TransportError> {
    let addr = SocketAddr::new(ip, 0);
    let mut endpoint_cfg = EndpointConfig::default();
    endpoint_cfg
        .max_udp_payload_size(cfg.max_udp_payload.max(1472))
        .map_err(|e| TransportError::Setting(format!("max_udp_payload: {e}")))?;
    let socket = udp_socket(Bind::Addr(addr), cfg.socket_buffer)?;
    let runtime = runtime()?;
    let socket = quic_socket(socket, cfg).map_err(|source| TransportError::Bind { addr, source })?;
    quinn::Endpoint::new_with_abstract_socket(endpoint_cfg, None, socket, runtime)
        .map_err(|source| TransportError::Bind { addr, source })
}

/// The QUIC endpoint of a gateway edge listener (HTTP/3 from clients) on `addr`: as
/// `quinn::Endpoint::server` makes it, on a socket registered for reads only ([`udp`]).
pub fn edge_endpoint(server: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = runtime().map_err(std::io::Error::other)?;
    // quinn's own limit on a send's batch holds for the edge's default datagram size.
    let socket = Arc::new(udp::ReadRegistered::new(socket, usize::MAX)?);
    quinn::Endpoint::new_with_abstract_socket(EndpointConfig::default(), Some(server), socket, runtime)
}

/// Builds the mesh QUIC endpoint. With `serve` it accepts peers, authenticated as it says.
pub fn mesh_endpoint(
    bind: Bind,
    creds: &Credentials,
    trust_domain: &str,
    cfg: &TransportConfig,
    serve: Option<Serve>,
) -> Result<quinn::Endpoint, TransportError> {
    let server = serve.map(|serve| server_config(creds, &serve, cfg)).transpose()?;
    let endpoint_cfg = endpoint_config(creds, cfg)?;
    let socket = udp_socket(bind, cfg.socket_buffer)?;
    let addr = socket.local_addr().map_err(|source| TransportError::Bind { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let runtime = runtime()?;
    let socket = quic_socket(socket, cfg).map_err(|source| TransportError::Bind { addr, source })?;
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_cfg, server, socket, runtime)
        .map_err(|source| TransportError::Bind { addr, source })?;
    endpoint.set_default_client_config(client_config(creds, trust_domain, cfg)?);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::advertised_streams;

    #[test]
    fn advertised_stream_limit_leaves_the_configured_number_usable() {
        for wanted in [1u32, 2, 7, 8, 16, 100, 256, 2000, 4096, 10_000, u32::MAX / 2] {
            let limit = advertised_streams(wanted);
            // quinn holds back up to limit / 8 finished streams' credit.
            assert!(limit - limit / 8 >= wanted, "{wanted} -> {limit}");
            // And no more than needed.
            assert!(limit - 1 - (limit - 1) / 8 < wanted, "{wanted} -> {limit} is not the smallest");
        }
    }
}
