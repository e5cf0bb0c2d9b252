//! Node outbound side: the plain HTTP listener local apps send requests to.
//!
//! accept -> identify the target (a mesh route, or the service the Host header or absolute-form
//! URI names, so `http_proxy` works) -> the shared path (`quicmesh_shared::proxy::pipeline`) -> record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HOST;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quicmesh_shared::message::body::{self, Body};
use quicmesh_shared::message::error::ProxyError;
use quicmesh_shared::message::headers;
use quicmesh_shared::policy::listener::ParentKind;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::pipeline::{self, Ctx, Side, Target};
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::telemetry::{self, Record};
use tokio::net::TcpListener;
use tracing::{debug, debug_span, Instrument};

/// Accepts local apps' connections until the task is dropped.
///
/// A drain closes them politely: while draining, HTTP/1.1 responses carry `Connection: close`,
/// so each connection ends after its next response; one that stays idle is closed
/// [`LAST_REQUEST_GRACE`](quicmesh_shared::proxy::drain::LAST_REQUEST_GRACE) after new
/// connections are refused. The drain waits for each connection to end (it counts as work in
/// flight), so the process does not exit under one.
pub async fn serve(listener: TcpListener, mesh: Arc<Mesh>) {
    // Draining: local apps' new connections are refused from then on.
    let mut accepting = mesh.drain().accepting();
    while let Some((stream, client)) = accepting.next(&listener, "outbound").await {
        let mesh = mesh.clone();
        let drain = mesh.drain().clone();
        let open = drain.guard();
        quicmesh_shared::runtime::spawn_tcp(stream, move |stream| async move {
            let _open = open;
            // Boxed: HTTP/2 spawns each stream as a task, which moves its future whole several
            // times. The request's own future, not a block around it: each future that holds
            // another inline is copied whole when it is made.
            let svc = service_fn(move |req| Box::pin(handle(req, client, mesh.clone())));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Extended CONNECT: WebSocket over HTTP/2 (RFC 8441) from local apps too.
            builder.http2().max_concurrent_streams(1024).enable_connect_protocol();
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                // Local apps' HTTP/2 connections get the grace too.
                _ = drain.closing(|| false) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%client, error = %e, "outbound connection ended with an error");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, client: SocketAddr, mesh: Arc<Mesh>) -> Result<Response<Body>, Infallible> {
    let mesh = &mesh;
    let in_flight = mesh.drain().guard();
    let http1 = req.version() <= http::Version::HTTP_11;
    let grpc = quicmesh_shared::message::respond::is_grpc(req.headers());
    let mut rec = Record::new("outbound", mesh.access_log().cloned(), mesh.tap(), mesh.tracing());
    rec.request(&req);
    // Debug level: at info a span per request (its fields formatted up front) was about a tenth
    // of the node's instructions per request.
    let span = debug_span!("outbound", %client, method = %req.method(), uri = %req.uri());
    // Wrapped only when the span is on: the wrapper is one more copy of the whole routing
    // future (kilobytes) per request.
    let routed = route(req, client, mesh, &mut rec);
    let routed = if span.is_disabled() { routed.await } else { routed.instrument(span).await };
    let resp = match routed {
        Ok(resp) => resp,
        Err(e) => {
            debug!(%client, error = %e, "outbound request failed");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "outbound", "reason" => e.reason()).increment(1);
            e.response()
        }
    };
    // Recorded when the response body ends; in flight for the drain until then too.
    let mut resp = rec.finish_holding(resp, in_flight);
    if grpc {
        resp = ProxyError::for_grpc(resp);
    }
    mesh.drain().last_on_connection(http1, &mut resp);
    Ok(resp)
}

async fn route(
    req: Request<Incoming>,
    client: SocketAddr,
    mesh: &Arc<Mesh>,
    rec: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let table = mesh.table();
    pipeline::prepare(&mut parts, &table)?;
    // The absolute-form URI (or HTTP/2 :authority) names the target; some HTTP/2 clients put
    // the proxy's own address there and the target in Host, so Host is tried second.
    let uri_authority = parts.uri.authority().map(|a| a.as_str());
    let host_header = parts.headers.get(HOST).and_then(|h| h.to_str().ok()).map(str::trim);
    let candidates = [uri_authority, host_header];
    let candidates = || candidates.iter().flatten().copied().filter(|s| !s.is_empty());
    let Some(first) = candidates().next() else {
        return Err(ProxyError::BadRequest("no Host header or absolute URI".into()));
    };
    let node = mesh.local_node().unwrap_or_default();
    rec.source(table.source_service().unwrap_or(telemetry::UNKNOWN), node);
    // Mesh routes (HTTPRoute) first; without one, the Host names the service directly.
    let routed = candidates().find_map(|a| {
        let (path, query) = (parts.uri.path(), parts.uri.query());
        let host = headers::host_of(a);
        // The destination port a GAMMA route may be attached to: the Host's, else 80.
        let port = a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(80);
        let find = |host: &str| table.routes().find_at(host, Some(port), &parts.method, path, query, &parts.headers);
        find(&host)
            // Called by an alias, the service's routes attached by parentRef still apply.
            .or_else(|| {
                let svc = table.service_for_host(&host).filter(|s| s.config.name != *host)?;
                find(&svc.config.name).filter(|m| m.route.parent_refs.iter().any(|p| p.kind == ParentKind::Service))
            })
            .map(|m| (a.to_string(), m))
    });
    let (authority, target) = match routed {
        Some((authority, matched)) => (authority, Target::Route(matched)),
        None => candidates()
            .find_map(|a| table.service_for_host(&headers::host_of(a)).map(|s| (a.to_string(), Target::Service(s))))
            .ok_or_else(|| ProxyError::NoRoute(headers::host_of(first).into_owned()))?,
    };
    let side = Side {
        scheme: "http",
        port: None,
        default_body_limit: None,
        source: table.source_service(),
        edge: false,
        jwt_claims: None,
    };
    let cx = Ctx { mesh, table: &table, side: &side, client, rec };
    // Boxed: the pipeline's future is most of a request's state, and `handle` and the
    // connection's boxed future would each carry (and copy, when made) its size inline.
    Box::pin(pipeline::forward(cx, target, parts, body::boxed(body), authority)).await
}
