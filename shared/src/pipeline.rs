//! The request path after a proxy has told what a request is for, written once for the node's
//! outbound side and the gateway's edge: route policy (rate limit, filters, redirect), backend
//! choice, body limit, forwarding headers, mirror, the call with retries, response changes.
//! Each side says what differs in a [`Side`]; identifying the target (Host, absolute URI, the
//! edge's routes or the mesh's) stays with the side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, LOCATION};
use http::{request::Parts, Request, Response, StatusCode};

use crate::body::{self, Body};
use crate::config::Protocol;
use crate::error::ProxyError;
use crate::headers;
use crate::mesh::{CallInfo, CallOpts, Mesh, Service, Table};
use crate::metrics as m;
use crate::route::{self, Filtered, Matched};
use crate::telemetry::Record;

const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// What one side of the mesh does differently on the shared path.
pub struct Side<'a> {
    /// The scheme clients used (`http` at a node, `https` at the edge), for redirects.
    pub scheme: &'static str,
    /// The port clients used, for redirects that keep it (the edge's).
    pub port: Option<u16>,
    /// Body limit for requests whose route sets none (`gateway.limits.max_request_body`).
    pub default_body_limit: Option<u64>,
    /// The service this proxy speaks for (`quicmesh-source`): the node's own, or the gateway's name.
    pub source: Option<&'a str>,
    /// The edge adds `X-Forwarded-Proto: https` and an RFC 7239 `Forwarded` element.
    pub edge: bool,
}

/// Where a request goes: a route matched for it, or a service its Host named.
pub enum Target<'t> {
    Route(Matched<'t>),
    Service(&'t Arc<Service>),
}

/// Runs the shared phases for a request whose target is known; `authority` is the one the
/// client asked for (a filter may change it).
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    mesh: &Arc<Mesh>,
    table: &Arc<Table>,
    side: &Side<'_>,
    target: Target<'_>,
    mut parts: Parts,
    body: Body,
    mut authority: String,
    client: SocketAddr,
    rec: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let mut response_mods = Vec::new();
    let mut mirrors = Vec::new();
    let mut opts = CallOpts { client: Some(client.ip()), ..Default::default() };
    let mut limit = side.default_body_limit;
    let svc = match &target {
        Target::Route(matched) => {
            let name = matched.route.name.as_str();
            rec.route(name);
            // Phase: rate limit.
            if let Some(Err(wait)) = matched.limiter.map(|l| l.check(Some(client.ip()), Instant::now())) {
                metrics::counter!(m::RATE_LIMITED, "route" => name.to_string()).increment(1);
                return Err(ProxyError::RateLimited { route: name.to_string(), wait });
            }
            // Phase: filters that answer or change the request.
            match route::apply_request_filters(matched, &mut parts, &mut authority, side.scheme, side.port)
                .map_err(ProxyError::BadRequest)?
            {
                Filtered::Redirect { status, location } => return Ok(redirect(status, &location)),
                Filtered::Forward { response_mods: mods, mirrors: m } => (response_mods, mirrors) = (mods, m),
            }
            // Phase: weighted backend.
            let backend = route::choose_backend(&matched.rule.backend_refs)
                .ok_or_else(|| ProxyError::NoEndpoint(format!("route {name} has no backend with weight")))?;
            let svc = table.service(&backend.name).ok_or_else(|| ProxyError::NoEndpoint(backend.name.clone()))?;
            opts = CallOpts {
                route: name,
                labels: Some(&backend.labels),
                retry: matched.rule.retry.as_ref(),
                timeouts: matched.rule.timeouts.as_ref(),
                fault: matched.rule.fault.as_ref(),
                client: Some(client.ip()),
            };
            limit = matched.route.max_request_body.or(limit);
            svc
        }
        Target::Service(svc) => *svc,
    };
    let name = svc.config.name.as_str();
    rec.service(name);
    if svc.config.protocol == Protocol::Tcp {
        return Err(ProxyError::BadRequest("service is TCP; use its node.tcp port".into()));
    }
    // Phase: body limit, declared (now) or streamed (as it arrives).
    if let Some(limit) = limit {
        let declared =
            parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }
    // Phase: forwarding headers.
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_internal(&mut parts.headers);
    // Room for what this proxy and the mesh may add (forwarding, id, trace, source, Host,
    // service, endpoint) at once, rather than growing the map, and rehashing it, a header or two
    // at a time. This can fail only for a map near http's size limit, far beyond the parser's.
    let _ = parts.headers.try_reserve(9);
    // The values this proxy adds share one allocation.
    let mut scratch = headers::Scratch::default();
    headers::append_forwarded_for(&mut parts.headers, client.ip(), &mut scratch);
    if side.edge {
        edge_forwarding(&mut parts, client, &authority);
    }
    headers::ensure_request_id(&mut parts.headers, &mut scratch);
    headers::continue_trace(&mut parts.headers, &mut scratch);
    rec.ids(&parts.headers);
    if let Some(source) = side.source.and_then(|s| scratch.text(s)) {
        parts.headers.insert(headers::SOURCE, source);
    }
    if authority.is_empty() {
        authority = name.to_string();
    }
    if let Some(v) = scratch.text(&authority) {
        parts.headers.insert(HOST, v);
    }
    if !side.edge {
        // A local app may have sent origin-form (`GET /path`): forward in absolute form.
        parts.uri = headers::absolute_uri(http::uri::Scheme::HTTP, authority, &parts.uri)
            .map_err(|e| ProxyError::BadRequest(format!("target: {e}")))?;
    }
    let body = match limit {
        Some(limit) => body::limited(body, limit),
        None => body,
    };
    let body = rec.count_request(body);
    // Phase: mirror (fire and forget).
    let body = mesh.mirror_request(table, &parts, body, &mirrors).await?;
    // Phase: pick an endpoint and call it, with the rule's timeouts, retries and faults.
    let mut info = CallInfo::default();
    let result = mesh.call(table, svc, Request::from_parts(parts, body), &opts, &mut info).await;
    rec.called(&info);
    let mut resp = result?;
    // Phase: response changes.
    for m in response_mods {
        route::modify_headers(resp.headers_mut(), m);
    }
    Ok(resp)
}

/// `X-Forwarded-Proto: https` and this hop's RFC 7239 `Forwarded` element, after any the
/// client sent.
fn edge_forwarding(parts: &mut Parts, client: SocketAddr, authority: &str) {
    parts.headers.insert(FORWARDED_PROTO, HeaderValue::from_static("https"));
    let node = match client.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let element = format!("for=\"{node}\";proto=https;host=\"{}\"", authority.replace('"', ""));
    let value = match parts.headers.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {element}"),
        None => element,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        parts.headers.insert(FORWARDED, v);
    }
}

/// A redirect response made by a route's RequestRedirect filter.
pub fn redirect(status: u16, location: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}
