//! Node outbound side: the plain HTTP listener local apps send requests to.
//!
//! accept -> identify service (Host header or absolute-form URI, so `http_proxy` works) -> clean
//! headers -> pick endpoint -> forward through the mesh -> record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quicmesh_shared::body::{self, Body};
use quicmesh_shared::config::Protocol;
use quicmesh_shared::drain::Phase;
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::headers;
use quicmesh_shared::mesh::{CallInfo, CallOpts, Mesh};
use quicmesh_shared::metrics as m;
use quicmesh_shared::path;
use quicmesh_shared::route::{self, Filtered};
use quicmesh_shared::telemetry::{self, Record};
use tokio::net::TcpListener;
use tracing::{debug, debug_span, Instrument};

/// Accepts local apps' connections until the task is dropped.
pub async fn serve(listener: TcpListener, mesh: Arc<Mesh>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Draining: local apps' new connections are refused from here on.
            _ = mesh.drain.reached(Phase::GoingAway) => return,
        };
        let (stream, client) = match accepted {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mesh = mesh.clone();
        let drain = mesh.drain.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let mesh = mesh.clone();
                async move { Ok::<_, Infallible>(handle(req, client, &mesh).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(1024);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = drain.reached(Phase::GoingAway) => {
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

async fn handle(req: Request<Incoming>, client: SocketAddr, mesh: &Arc<Mesh>) -> Response<Body> {
    let in_flight = mesh.drain.guard();
    let mut rec = Record::new("outbound", mesh.access_log.clone());
    rec.request(&req);
    // Debug level: at info a span per request (its fields formatted up front) was about a tenth
    // of the node's instructions per request.
    let span = debug_span!("outbound", %client, method = %req.method(), uri = %req.uri());
    let resp = match route(req, client, mesh, &mut rec).instrument(span).await {
        Ok(resp) => resp,
        Err(e) => {
            debug!(%client, error = %e, "outbound request failed");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "outbound", "reason" => e.reason()).increment(1);
            e.response()
        }
    };
    // Recorded when the response body ends; in flight for the drain until then too.
    rec.finish(resp).map(|b| body::with_guard(b, in_flight))
}

async fn route(
    req: Request<Incoming>,
    client: SocketAddr,
    mesh: &Arc<Mesh>,
    rec: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    if parts.version == http::Version::HTTP_11 {
        headers::check_http1_head(&parts.headers)?;
    }
    // Matched, authorized and forwarded in one canonical form.
    let table = mesh.table();
    if let Some(uri) = path::normalize_uri(&parts.uri, table.config.mesh.merge_slashes)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?
    {
        parts.uri = uri;
    }
    // The absolute-form URI (or HTTP/2 :authority) names the target; some HTTP/2 clients put
    // the proxy's own address there and the target in Host, so Host is tried second.
    let uri_authority = parts.uri.authority().map(|a| a.as_str());
    let host_header = parts.headers.get(HOST).and_then(|h| h.to_str().ok()).map(str::trim);
    let candidates = [uri_authority, host_header];
    let candidates = || candidates.iter().flatten().copied().filter(|s| !s.is_empty());
    let Some(first) = candidates().next() else {
        return Err(ProxyError::BadRequest("no Host header or absolute URI".into()));
    };
    let node = mesh.local_node.as_deref().unwrap_or_default();
    rec.source(table.source_service.as_deref().unwrap_or(telemetry::UNKNOWN), node);
    // Mesh routes (HTTPRoute) first; without one, the Host names the service directly.
    let routed = candidates().find_map(|a| {
        let (path, query) = (parts.uri.path(), parts.uri.query());
        table.routes.find(&headers::host_of(a), &parts.method, path, query, &parts.headers).map(|m| (a.to_string(), m))
    });
    let mut response_mods = Vec::new();
    let mut mirrors = Vec::new();
    let mut opts = CallOpts { client: Some(client.ip()), ..Default::default() };
    let (mut authority, svc) = match routed {
        Some((authority, matched)) => {
            let route_name = matched.route.name.clone();
            rec.route(&route_name);
            if let Some(Err(wait)) = matched.limiter.map(|l| l.check(Some(client.ip()), Instant::now())) {
                metrics::counter!(m::RATE_LIMITED, "route" => route_name.clone()).increment(1);
                return Err(ProxyError::RateLimited { route: route_name, wait });
            }
            let mut authority = authority;
            match route::apply_request_filters(&matched, &mut parts, &mut authority, "http", None) {
                Ok(Filtered::Redirect { status, location }) => return Ok(redirect(status, &location)),
                Ok(Filtered::Forward { response_mods: mods, mirrors: m }) => {
                    response_mods = mods;
                    mirrors = m;
                }
                Err(e) => return Err(ProxyError::BadRequest(e)),
            }
            let Some(backend) = route::choose_backend(&matched.rule.backend_refs) else {
                return Err(ProxyError::NoEndpoint(format!("route {} has no backend with weight", matched.route.name)));
            };
            let Some(svc) = table.service(&backend.name) else {
                return Err(ProxyError::NoEndpoint(backend.name.clone()));
            };
            opts = CallOpts {
                route: &matched.route.name,
                labels: Some(&backend.labels),
                retry: matched.rule.retry.as_ref(),
                timeouts: matched.rule.timeouts.as_ref(),
                fault: matched.rule.fault.as_ref(),
                client: Some(client.ip()),
            };
            (authority, svc)
        }
        None => {
            let Some((authority, svc)) =
                candidates().find_map(|a| table.service_for_host(&headers::host_of(a)).map(|s| (a.to_string(), s)))
            else {
                return Err(ProxyError::NoRoute(headers::host_of(first).into_owned()));
            };
            (authority, svc)
        }
    };
    let name = &svc.config.name;
    rec.service(name);
    if svc.config.protocol == Protocol::Tcp {
        return Err(ProxyError::BadRequest("service is TCP; use its node.tcp port".into()));
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_internal(&mut parts.headers);
    // Room for what this node and the mesh may add (forwarding, id, trace, source, Host,
    // service, endpoint) at once, rather than growing the map, and rehashing it, a header or two
    // at a time. This can fail only for a map near http's size limit, far beyond the parser's.
    let _ = parts.headers.try_reserve(7);
    // The values this proxy adds share one allocation.
    let mut scratch = headers::Scratch::default();
    headers::append_forwarded_for(&mut parts.headers, client.ip(), &mut scratch);
    headers::ensure_request_id(&mut parts.headers, &mut scratch);
    headers::continue_trace(&mut parts.headers, &mut scratch);
    rec.ids(&parts.headers);
    if let Some(source) = table.source_service.as_deref().and_then(|s| scratch.text(s)) {
        parts.headers.insert(headers::SOURCE, source);
    }
    if authority.is_empty() {
        authority = name.clone();
    }
    if let Some(v) = scratch.text(&authority) {
        parts.headers.insert(HOST, v);
    }
    parts.uri = headers::absolute_uri(http::uri::Scheme::HTTP, authority, &parts.uri)
        .map_err(|e| ProxyError::BadRequest(format!("target: {e}")))?;
    let body = rec.count_request(body::boxed(body));
    let body = mesh.mirror_request(&table, &parts, body, &mirrors).await?;
    let req = Request::from_parts(parts, body);
    let mut info = CallInfo::default();
    let result = mesh.call(&table, svc, req, &opts, &mut info).await;
    rec.called(&info);
    let mut resp = result?;
    for m in response_mods {
        route::modify_headers(resp.headers_mut(), m);
    }
    Ok(resp)
}

/// A redirect response made by a route's RequestRedirect filter.
fn redirect(status: u16, location: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}
