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

use crate::config::Protocol;
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::message::path;
use crate::policy::route::{self, Filtered, Matched};
use crate::proxy::call::{CallInfo, CallOpts};
use crate::proxy::mesh::Mesh;
use crate::proxy::table::{Service, Table};
use crate::proxy::{ext_authz, upgrade};
use crate::telemetry::metrics as m;
use crate::telemetry::Record;

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
    /// The edge passes the claims of the JWT it verified (`headers::JWT_CLAIMS`).
    pub jwt_claims: Option<http::HeaderValue>,
}

/// Where a request goes: a route matched for it, or a service its Host named.
pub enum Target<'t> {
    Route(Matched<'t>),
    Service(&'t Arc<Service>),
}

/// One request on the shared path: what its phases read, loaded once when it arrived.
pub struct Ctx<'r> {
    pub mesh: &'r Arc<Mesh>,
    /// The snapshot the request was matched against; every phase and try reads this one.
    pub table: &'r Arc<Table>,
    pub side: &'r Side<'r>,
    pub client: SocketAddr,
    pub rec: &'r mut Record,
}

/// What the route phase decided: where the request goes and what changes on the way.
struct Plan<'t> {
    svc: &'t Arc<Service>,
    opts: CallOpts<'t>,
    body_limit: Option<u64>,
    response_mods: Vec<&'t route::HeaderModifier>,
    mirrors: Vec<&'t route::BackendRef>,
    /// Response headers set last (a CORS filter's).
    set_headers: Vec<(HeaderName, HeaderValue)>,
}

/// Phase 0, before a side identifies the target: the head checks and the canonical path every
/// later phase (matching, authorization, forwarding) uses.
pub fn prepare(parts: &mut Parts, table: &Table) -> Result<(), ProxyError> {
    if parts.version == http::Version::HTTP_11 {
        headers::check_http1_head(&parts.headers)?;
    }
    if let Some(uri) = path::normalize_uri(&parts.uri, table.config().mesh.merge_slashes)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?
    {
        parts.uri = uri;
    }
    Ok(())
}

/// Runs the shared phases for a request whose target is known; `authority` is the one the
/// client asked for (a filter may change it).
pub async fn forward<'r>(
    mut cx: Ctx<'r>,
    target: Target<'r>,
    mut parts: Parts,
    body: Body,
    mut authority: String,
) -> Result<Response<Body>, ProxyError> {
    // An HTTP/1.1 upgrade (WebSocket) is routed as any request, then carried as a tunnel.
    let upgrade = upgrade::requested(&parts);
    // An extended CONNECT for another protocol (connect-udp, webtransport) is not carried.
    if let Some(other) = upgrade.as_ref().filter(|p| !upgrade::carried(p)) {
        return Err(ProxyError::NotImplemented(format!("extended CONNECT for {other:?}")));
    }
    // Phase: external authorization, before anything else acts on the request.
    if let Target::Route(matched) = &target {
        let auth = matched.rule.filters.iter().find_map(|f| match f {
            route::Filter::ExternalAuth { auth } => Some(auth),
            _ => None,
        });
        if let Some(auth) = auth {
            // Boxed, as the upgrade below: a rare phase's state would otherwise sit in every
            // request's future, which is moved whole at each level of the call chain.
            let check = Box::pin(ext_authz::check(cx.mesh, cx.table, auth, &matched.route.name, &mut parts));
            if let Some(refusal) = check.await? {
                return Ok(refusal);
            }
        }
    }
    // Phases: rate limit, filters (or a redirect answer), weighted backend.
    let plan = match plan(&mut cx, target, &mut parts, &mut authority)? {
        Ok(plan) => plan,
        Err(redirect) => return Ok(redirect),
    };
    let svc = &plan.svc.config;
    cx.rec.service(&svc.name);
    if svc.protocol == Protocol::Tcp {
        return Err(ProxyError::BadRequest("service is TCP; use its node.tcp port".into()));
    }
    // Phase: body limit, declared (now) or streamed (as it arrives).
    if let Some(limit) = plan.body_limit {
        let declared =
            parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }
    // Phase: forwarding headers.
    forwarding_headers(&cx, &mut parts, authority, &svc.name)?;
    cx.rec.ids(&parts.headers);
    if let Some(protocol) = upgrade {
        let (labels, client) = (plan.opts.labels, plan.opts.client);
        let limits = upgrade::Limits::of(plan.opts.timeouts);
        let tunnel = Box::pin(upgrade::forward(cx.mesh, cx.table, plan.svc, labels, client, parts, protocol, limits));
        let mut resp = tunnel.await?;
        for m in plan.response_mods {
            route::modify_headers(resp.headers_mut(), m);
        }
        return Ok(resp);
    }
    let body = match plan.body_limit {
        Some(limit) => body::limited(body, limit),
        None => body,
    };
    let body = cx.rec.count_request(body);
    // Phase: mirror (fire and forget).
    let body = cx.mesh.mirror_request(cx.table, &parts, body, &plan.mirrors).await?;
    // Phase: pick an endpoint and call it, with the rule's timeouts, retries and faults.
    let mut info = CallInfo::default();
    let result = cx.mesh.at(cx.table).call(plan.svc, Request::from_parts(parts, body), &plan.opts, &mut info).await;
    info.record(cx.rec);
    let mut resp = result?;
    // Phase: response changes.
    for m in plan.response_mods {
        route::modify_headers(resp.headers_mut(), m);
    }
    for (name, value) in plan.set_headers {
        resp.headers_mut().insert(name, value);
    }
    Ok(resp)
}

/// The route phase: a matched route's rate limit, filters and backend choice; a service named
/// by Host goes as it is. `Err` carries a redirect, answered without calling anything.
fn plan<'t>(
    cx: &mut Ctx<'t>,
    target: Target<'t>,
    parts: &mut Parts,
    authority: &mut String,
) -> Result<Result<Plan<'t>, Response<Body>>, ProxyError> {
    let client = Some(cx.client.ip());
    let matched = match target {
        Target::Service(svc) => {
            let opts = CallOpts { client, ..Default::default() };
            let body_limit = cx.side.default_body_limit;
            let plan = Plan { svc, opts, body_limit, response_mods: vec![], mirrors: vec![], set_headers: vec![] };
            return Ok(Ok(plan));
        }
        Target::Route(matched) => matched,
    };
    let name = matched.route.name.as_str();
    cx.rec.route(name);
    if let Some(rule) = &matched.rule.name {
        cx.rec.rule(rule);
        metrics::counter!(m::RULE_MATCHES, "route" => name.to_string(), "rule" => rule.clone()).increment(1);
    }
    // Phase: rate limit.
    if let Some(Err(wait)) = matched.limiter.map(|l| l.check(client, Instant::now())) {
        metrics::counter!(m::RATE_LIMITED, "route" => name.to_string()).increment(1);
        return Err(ProxyError::RateLimited { route: name.to_string(), wait });
    }
    // Phase: filters that answer or change the request.
    let (mut response_mods, mut mirrors, mut set_headers) =
        match route::apply_request_filters(&matched, parts, authority, cx.side.scheme, cx.side.port)
            .map_err(ProxyError::BadRequest)?
        {
            Filtered::Redirect { status, location } => return Ok(Err(redirect(status, &location))),
            Filtered::Preflight(headers) => return Ok(Err(preflight(headers))),
            Filtered::Forward { response_mods, mirrors, set_headers } => (response_mods, mirrors, set_headers),
        };
    // Phase: weighted backend. A rule that sends nowhere valid answers 500, as the Gateway API
    // says (no backendRefs, every weight 0, or the share of a backend naming no service).
    let backend = route::choose_backend(&matched.rule.backend_refs)
        .ok_or_else(|| ProxyError::InvalidBackend(format!("route {name} has no backend with weight")))?;
    let table: &'t Arc<Table> = cx.table;
    let svc = table.service(&backend.name).ok_or_else(|| {
        ProxyError::InvalidBackend(format!("route {name} sends to unknown service {:?}", backend.name))
    })?;
    // Phase: the chosen backend's own filters.
    if !backend.filters.is_empty() {
        let prefix = matched.matched_prefix;
        match route::apply_filters(&backend.filters, prefix, parts, authority, cx.side.scheme, cx.side.port)
            .map_err(ProxyError::BadRequest)?
        {
            Filtered::Redirect { status, location } => return Ok(Err(redirect(status, &location))),
            Filtered::Preflight(headers) => return Ok(Err(preflight(headers))),
            Filtered::Forward { response_mods: r, mirrors: m, set_headers: h } => {
                response_mods.extend(r);
                mirrors.extend(m);
                set_headers.extend(h);
            }
        }
    }
    let opts = CallOpts {
        route: name,
        labels: Some(&backend.labels),
        retry: matched.rule.retry.as_ref(),
        timeouts: matched.rule.timeouts.as_ref(),
        fault: matched.rule.fault.as_ref(),
        client,
    };
    let body_limit = matched.route.max_request_body.or(cx.side.default_body_limit);
    Ok(Ok(Plan { svc, opts, body_limit, response_mods, mirrors, set_headers }))
}

/// The forwarding-headers phase: hop-by-hop and internal headers out; forwarded-for (and the
/// edge's forwarding headers), request id, trace context, source service and Host in.
fn forwarding_headers(cx: &Ctx<'_>, parts: &mut Parts, authority: String, service: &str) -> Result<(), ProxyError> {
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_internal(&mut parts.headers);
    // Room for what this proxy may add (forwarding, at the edge its forwarding headers and
    // claims, id, trace, source, Host) at once, rather than growing the map, and rehashing it,
    // a header or two at a time. This can fail only for a map near http's size limit, far
    // beyond the parser's.
    let _ = parts.headers.try_reserve(9);
    // The values this proxy adds share one allocation (at the edge with room for `Forwarded`).
    let mut scratch = if cx.side.edge { headers::Scratch::with_capacity(320) } else { headers::Scratch::default() };
    headers::append_forwarded_for(&mut parts.headers, cx.client.ip(), &mut scratch);
    if cx.side.edge {
        edge_forwarding(parts, cx.client, &authority, &mut scratch);
        if let Some(claims) = &cx.side.jwt_claims {
            parts.headers.insert(headers::JWT_CLAIMS, claims.clone());
        }
    }
    headers::ensure_request_id(&mut parts.headers, &mut scratch);
    headers::continue_trace(&mut parts.headers, &mut scratch, |id| cx.mesh.tracing().is_none_or(|t| t.sample_root(id)));
    if let Some(source) = cx.side.source.and_then(|s| scratch.text(s)) {
        parts.headers.insert(headers::SOURCE, source);
    }
    // Host and (at a node) the URI's authority share one copy of the authority.
    let authority = scratch.bytes(if authority.is_empty() { service } else { &authority }.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(authority.clone()) {
        parts.headers.insert(HOST, v);
    }
    if !cx.side.edge {
        // A local app may have sent origin-form (`GET /path`): forward in absolute form.
        let target = http::uri::Authority::from_maybe_shared(authority)
            .map_err(|e| format!("authority: {e}"))
            .and_then(|a| headers::absolute_uri_at(http::uri::Scheme::HTTP, a, &parts.uri));
        parts.uri = target.map_err(|e| ProxyError::BadRequest(format!("target: {e}")))?;
    }
    Ok(())
}

/// `X-Forwarded-Proto: https` and this hop's RFC 7239 `Forwarded` element, after any the
/// client sent, written into `scratch` (formatting it cost a few thousand instructions).
fn edge_forwarding(parts: &mut Parts, client: SocketAddr, authority: &str, scratch: &mut headers::Scratch) {
    use bytes::BufMut as _;
    parts.headers.insert(headers::FORWARDED_PROTO, HeaderValue::from_static("https"));
    let prev = parts.headers.get(&FORWARDED).and_then(|v| v.to_str().ok());
    let value = scratch.value(|b| {
        if let Some(prev) = prev {
            b.extend_from_slice(prev.as_bytes());
            b.extend_from_slice(b", ");
        }
        b.extend_from_slice(b"for=\"");
        match client.ip() {
            ip @ std::net::IpAddr::V6(_) => {
                b.put_u8(b'[');
                headers::put_ip(b, ip);
                b.put_u8(b']');
            }
            ip => headers::put_ip(b, ip),
        }
        b.extend_from_slice(b"\";proto=https;host=\"");
        for piece in authority.split('"') {
            b.extend_from_slice(piece.as_bytes());
        }
        b.put_u8(b'"');
    });
    if let Some(v) = value {
        parts.headers.insert(FORWARDED, v);
    }
}

/// The answer to a CORS preflight an allowed origin sent.
fn preflight(headers: Vec<(HeaderName, HeaderValue)>) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    resp.headers_mut().extend(headers);
    resp
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
