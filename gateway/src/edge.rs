//! The TCP side of the edge: TLS (1.2+, ALPN h2 and http/1.1) then hyper for HTTP/1.1 and
//! HTTP/2, with header size/count limits (431), a header read timeout and stream limits.
//! A client sending garbage only ever costs its own connection.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quicmesh_shared::message::body;
use quicmesh_shared::proxy::drain::Phase;
use quicmesh_shared::telemetry::metrics as m;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::conns::Activity;
use crate::handler::Edge;
use crate::idle::IdleTimeout;

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, edge: Arc<Edge>) {
    let acceptor = TlsAcceptor::from(tls);
    // Draining: no new client connections.
    while let Some((tcp, client)) = edge.mesh.drain().accept(&listener, "edge").await {
        // Past the connection limits: closed at once, before any TLS work.
        let admitted = match edge.conns.admit(client.ip()) {
            Ok(a) => a,
            Err(full) => {
                metrics::counter!(m::EDGE_REJECTED, "reason" => full.reason()).increment(1);
                debug!(%client, reason = full.reason(), "edge connection refused");
                drop(tcp);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let edge = edge.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let limits = &edge.limits;
            let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!(m::EDGE_REJECTED, "reason" => "tls-handshake").increment(1);
                    debug!(%client, error = %e, "edge TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!(m::EDGE_REJECTED, "reason" => "tls-timeout").increment(1);
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let subject = crate::tls::client_subject(tls.get_ref().1.peer_certificates());
            let proto = if h2 { "h2" } else { "http/1.1" };
            metrics::counter!(m::EDGE_CONNECTIONS, "protocol" => proto).increment(1);
            let edge2 = edge.clone();
            let activity = Activity::default();
            let requests = activity.clone();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (edge, subject) = (edge2.clone(), subject.clone());
                // In flight until its response body is done with.
                let in_flight = requests.start();
                async move {
                    let mut req = req.map(body::boxed);
                    // Only the HTTP/3 listener may say a request came in early data (RFC 8470).
                    req.headers_mut().remove("early-data");
                    let proto = if h2 { "h2" } else { "http/1.1" };
                    let resp = edge.handle(req, client, proto, subject, in_flight).await;
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_headers(limits.max_headers)
                .max_buf_size(limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_header_list_size(limits.max_header_bytes as u32);
            let io = TokioIo::new(IdleTimeout::new(tls, limits.idle_timeout));
            let conn = builder.serve_connection(io, svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = edge.mesh.drain().reached(Phase::GoingAway) => {
                    // HTTP/2 GOAWAY, or `Connection: close` after the request in progress.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                // No request yet within the header timeout, or none for the idle timeout,
                // whatever bytes (HTTP/2 PINGs) the client sends meanwhile.
                _ = activity.idle_for(limits.header_read_timeout, limits.idle_timeout) => {
                    metrics::counter!(m::EDGE_IDLE_CLOSED, "protocol" => proto).increment(1);
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%client, error = %e, "edge connection ended with an error");
            }
        });
    }
}
