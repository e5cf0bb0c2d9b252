//! The QUIC side of the edge: HTTP/3 from external clients (no client certificate), with a
//! header section size limit and the same request path as TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use quicmesh_shared::body::{self, H3Body};
use quicmesh_shared::drain::Phase;
use quicmesh_shared::metrics as m;
use tracing::debug;

use crate::handler::Edge;

pub async fn serve(endpoint: quinn::Endpoint, edge: Arc<Edge>) {
    while let Some(incoming) = endpoint.accept().await {
        if edge.mesh.drain.phase() >= Phase::GoingAway {
            incoming.refuse();
            continue;
        }
        let edge = edge.clone();
        tokio::spawn(async move {
            let client = incoming.remote_address();
            match incoming.await {
                Ok(conn) => connection(conn, client, edge).await,
                Err(e) => {
                    metrics::counter!(m::EDGE_REJECTED, "reason" => "quic-handshake").increment(1);
                    debug!(%client, error = %e, "edge QUIC handshake failed");
                }
            }
        });
    }
}

async fn connection(conn: quinn::Connection, client: SocketAddr, edge: Arc<Edge>) {
    metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => "h3").increment(1);
    let built = h3::server::builder()
        .max_field_section_size(edge.limits.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await;
    let mut h3 = match built {
        Ok(h3) => h3,
        Err(e) => {
            debug!(%client, error = %e, "edge HTTP/3 setup failed");
            return;
        }
    };
    let mut told = false;
    loop {
        let accepted = tokio::select! {
            a = h3.accept() => a,
            _ = edge.mesh.drain.reached(Phase::GoingAway), if !told => {
                told = true;
                if let Err(e) = h3.shutdown(0).await {
                    debug!(%client, error = %e, "could not send GOAWAY");
                }
                continue;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                let edge = edge.clone();
                tokio::spawn(async move {
                    let (req, stream) = match resolver.resolve_request().await {
                        Ok(x) => x,
                        Err(e) => {
                            metrics::counter!(m::EDGE_REJECTED, "reason" => "bad-request").increment(1);
                            debug!(%client, error = %e, "bad HTTP/3 request");
                            return;
                        }
                    };
                    let (mut send, recv) = stream.split();
                    let req = req.map(|()| body::boxed(H3Body::new(recv)));
                    let resp = edge.handle(req, client, "h3").await;
                    let (mut parts, body) = resp.into_parts();
                    parts.version = http::Version::HTTP_3;
                    if send.send_response(Response::from_parts(parts, ())).await.is_ok() {
                        if let Err(e) = body::pump_to_h3(body, &mut send).await {
                            debug!(%client, error = %e, "HTTP/3 response body ended early");
                        }
                    }
                });
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    debug!(%client, error = %e, "edge HTTP/3 connection ended");
                }
                break;
            }
        }
    }
}
