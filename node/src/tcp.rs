//! Opaque TCP through the mesh: one HTTP/3 CONNECT stream per TCP connection.
//!
//! Why CONNECT on the HTTP/3 connection rather than a second ALPN with raw streams: it keeps
//! exactly one QUIC connection (one handshake, one congestion controller, one identity check)
//! per pair of members, and lets the tunnel carry a status and `quicmesh-error` when the far
//! side cannot reach the target. Half-close is mapped both ways: TCP EOF finishes the QUIC
//! stream's send side, and the stream's FIN shuts down the TCP write side.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use quicmesh_shared::body::{H3Recv, H3Send};
use quicmesh_shared::config::Protocol;
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::mesh::{Mesh, PickCtx, Table};
use quicmesh_shared::metrics as m;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::inbound::{local_target, ServerStream};

const CHUNK: usize = 64 << 10;

/// Accepts local connections for `service` and carries each to one of its endpoints.
pub async fn serve(listener: TcpListener, service: String, mesh: Arc<Mesh>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = mesh.drain.reached(quicmesh_shared::drain::Phase::GoingAway) => return,
        };
        let Ok((tcp, client)) = accepted else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let mesh = mesh.clone();
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = outbound(tcp, &service, &mesh).await {
                metrics::counter!(m::PROXY_ERRORS, "direction" => "outbound", "reason" => e.reason()).increment(1);
                warn!(%client, service, error = %e, "TCP tunnel failed");
            }
        });
    }
}

async fn outbound(tcp: TcpStream, service: &str, mesh: &Mesh) -> Result<(), ProxyError> {
    let table = mesh.table();
    let svc = table.service(service).ok_or_else(|| ProxyError::NoEndpoint(service.to_string()))?;
    let client = tcp.peer_addr().ok().map(|a| a.ip());
    let ep = mesh.pick(svc, &BTreeMap::new(), &PickCtx { headers: None, client })?;
    metrics::counter!(m::TCP_CONNECTIONS, "direction" => "outbound", "service" => service.to_string()).increment(1);
    if mesh.is_local(&ep) {
        let mut upstream = connect(ep.address, &table).await?;
        let mut tcp = tcp;
        let (up, down) = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await.unwrap_or((0, 0));
        record_bytes("outbound", up, down);
        return Ok(());
    }
    let stream = mesh.connect_tcp(&table, svc, &ep).await?;
    let (send, recv) = stream.split();
    let (up, down) = splice(tcp, send, recv).await;
    record_bytes("outbound", up, down);
    Ok(())
}

async fn connect(addr: std::net::SocketAddr, table: &Table) -> Result<TcpStream, ProxyError> {
    let timeout = table.config.timeouts.connect;
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProxyError::ConnectTimeout(addr.to_string()))?
        .map_err(|e| ProxyError::UpstreamUnreachable { addr: addr.to_string(), reason: e.to_string() })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

fn record_bytes(direction: &'static str, up: u64, down: u64) {
    metrics::counter!(m::TCP_BYTES, "direction" => direction, "flow" => "sent").increment(up);
    metrics::counter!(m::TCP_BYTES, "direction" => direction, "flow" => "received").increment(down);
}

/// Serves a peer's CONNECT: checks the target is a local TCP instance, connects, splices.
pub async fn inbound(req: Request<()>, stream: ServerStream, peer: &str, mesh: &Mesh) {
    let (mut send, recv) = stream.split();
    let table = mesh.table();
    let target = match local_target(&req, mesh, &table) {
        Ok((svc, addr)) if svc.protocol == Protocol::Tcp => Ok((svc.name.clone(), addr)),
        Ok(_) => Err(ProxyError::BadRequest("CONNECT to a non-TCP service".into())),
        Err(e) => Err(e),
    };
    let connected = match target {
        Ok((name, addr)) => connect(addr, &table).await.map(|tcp| (name, tcp)),
        Err(e) => Err(e),
    };
    let (name, tcp) = match connected {
        Ok(x) => x,
        Err(e) => {
            debug!(peer, error = %e, "inbound tunnel refused");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "inbound", "reason" => e.reason()).increment(1);
            let (parts, _) = e.response().into_parts();
            let _ = send.send_response(Response::from_parts(parts, ())).await;
            let _ = send.finish().await;
            return;
        }
    };
    metrics::counter!(m::TCP_CONNECTIONS, "direction" => "inbound", "service" => name).increment(1);
    let mut ok = Response::new(());
    *ok.status_mut() = StatusCode::OK;
    if send.send_response(ok).await.is_err() {
        return;
    }
    let (up, down) = splice(tcp, send, recv).await;
    record_bytes("inbound", down, up);
}

/// Copies TCP <-> QUIC stream in both directions, mapping half-close each way.
/// Returns (bytes TCP->stream, bytes stream->TCP).
pub async fn splice<S: H3Send, R: H3Recv>(tcp: TcpStream, mut send: S, mut recv: R) -> (u64, u64) {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let mut total = 0u64;
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish().await;
                    break;
                }
                Ok(n) => {
                    total += n as u64;
                    if send.send(buf.split().freeze()).await.is_err() {
                        break;
                    }
                }
                Err(_) => {
                    send.reset();
                    break;
                }
            }
        }
        total
    };
    let down = async {
        let mut total = 0u64;
        loop {
            match poll_fn(|cx| recv.poll_data(cx)).await {
                Ok(Some(data)) => {
                    total += data.len() as u64;
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    break;
                }
                Err(_) => break,
            }
        }
        total
    };
    tokio::join!(up, down)
}
