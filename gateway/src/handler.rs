//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners:
//! route -> limits -> forwarding headers -> pick backend and endpoint -> forward into the mesh
//! -> record.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{HeaderValue, ALT_SVC, CONTENT_LENGTH, HOST, LOCATION};
use http::{HeaderName, Request, Response, StatusCode};
use quicmesh_shared::body::{self, Body};
use quicmesh_shared::config::GatewayConfig;
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::headers;
use quicmesh_shared::mesh::{CallInfo, CallOpts, Mesh};
use quicmesh_shared::metrics as m;
use quicmesh_shared::path;
use quicmesh_shared::route::{self, Filtered, RouteTable};
use quicmesh_shared::telemetry::Record;
use std::sync::Arc;
use tracing::debug;

const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

pub struct Edge {
    pub mesh: Arc<Mesh>,
    routes: arc_swap::ArcSwap<RouteTable>,
    pub limits: quicmesh_shared::config::EdgeLimits,
    /// `Alt-Svc` advertised on TCP responses.
    pub alt_svc: HeaderValue,
    /// The edge port, for redirects that keep it.
    pub port: u16,
    /// The gateway's mesh name: the source of the requests it sends into the mesh.
    pub name: String,
    /// Client connections open, in all and per client address.
    pub conns: Arc<crate::conns::Conns>,
}

impl Edge {
    pub fn new(mesh: Arc<Mesh>, gc: &GatewayConfig, port: u16) -> Self {
        let alt_svc =
            HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).unwrap_or(HeaderValue::from_static("clear"));
        // Validated with the config, so this cannot fail; an empty table is the safe fallback.
        let table = RouteTable::new(gc.routes.clone()).unwrap_or_else(|_| RouteTable::empty());
        let routes = arc_swap::ArcSwap::from_pointee(table);
        let conns = crate::conns::Conns::new(gc.limits.max_connections, gc.limits.max_connections_per_client);
        Self { mesh, routes, limits: gc.limits.clone(), alt_svc, port, name: gc.name.clone(), conns }
    }

    /// Replaces the route table atomically.
    /// Replaces the route table atomically (routes were validated with the config).
    pub fn set_routes(&self, routes: Vec<route::HttpRoute>) {
        match RouteTable::new(routes) {
            Ok(t) => self.routes.store(Arc::new(t)),
            Err(e) => tracing::warn!(error = %e, "routes refused; keeping the previous ones"),
        }
    }

    /// Handles one client request end to end; never fails (errors become proxy responses).
    /// `held` is kept until the response body is done with (the connection's count of requests
    /// in flight), together with the drain's guard: one wrapper for both.
    pub async fn handle<G: Send + Unpin + 'static>(
        &self,
        req: Request<Body>,
        client: SocketAddr,
        proto: &'static str,
        held: G,
    ) -> Response<Body> {
        let in_flight = (self.mesh.drain.guard(), held);
        let mut rec = Record::new("ingress", self.mesh.access_log.clone());
        rec.protocol(proto);
        rec.request(&req);
        rec.source(&self.name, &self.name);
        let mut resp = match self.route(req, client, &mut rec).await {
            // An error made by a node inside the mesh says where and why: not to outsiders.
            Ok(resp) => ProxyError::brief(resp),
            Err(e) => {
                debug!(%client, error = %e, "gateway request failed");
                metrics::counter!(m::PROXY_ERRORS, "direction" => "ingress", "reason" => e.reason()).increment(1);
                e.brief_response()
            }
        };
        if proto != "h3" {
            resp.headers_mut().insert(ALT_SVC, self.alt_svc.clone());
        }
        // Recorded when the response body ends; in flight for the drain until then too.
        rec.finish(resp).map(|b| body::with_guard(b, in_flight))
    }

    async fn route(
        &self,
        req: Request<Body>,
        client: SocketAddr,
        rec: &mut Record,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        if parts.version == http::Version::HTTP_11 {
            headers::check_http1_head(&parts.headers)?;
        }
        // Matched, authorized and forwarded in one canonical form.
        let table = self.mesh.table();
        let merge = table.config.mesh.merge_slashes;
        if let Some(uri) = path::normalize_uri(&parts.uri, merge).map_err(|e| ProxyError::BadRequest(e.to_string()))? {
            parts.uri = uri;
        }
        let authority =
            headers::authority(&parts.uri, &parts.headers).ok_or_else(|| ProxyError::BadRequest("no Host".into()))?;
        let host = headers::host_of(&authority);
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().map(str::to_owned);
        // Phase: route (Gateway API HTTPRoute matching and precedence).
        let routes = self.routes.load_full();
        let matched = routes
            .find(&host, &parts.method, &path, query.as_deref(), &parts.headers)
            .ok_or_else(|| ProxyError::NoRoute(format!("{host}{path}")))?;
        let (route, rule) = (matched.route, matched.rule);
        let name = route.name.clone();
        rec.route(&name);
        // Phase: rate limit.
        if let Some(Err(wait)) = matched.limiter.map(|l| l.check(Some(client.ip()), Instant::now())) {
            metrics::counter!(m::RATE_LIMITED, "route" => name.clone()).increment(1);
            return Err(ProxyError::RateLimited { route: name.clone(), wait });
        }
        // Phase: filters that answer or change the request.
        let mut authority = authority;
        let filtered = route::apply_request_filters(&matched, &mut parts, &mut authority, "https", Some(self.port))
            .map_err(ProxyError::BadRequest)?;
        let (response_mods, mirrors) = match filtered {
            Filtered::Redirect { status, location } => return Ok(redirect(status, &location)),
            Filtered::Forward { response_mods, mirrors } => (response_mods, mirrors),
        };
        let limit = route.max_request_body.unwrap_or(self.limits.max_request_body);
        let declared =
            parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
        // Phase: forwarding headers.
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_internal(&mut parts.headers);
        // The values this proxy adds share one allocation.
        let mut scratch = headers::Scratch::default();
        headers::append_forwarded_for(&mut parts.headers, client.ip(), &mut scratch);
        parts.headers.insert(FORWARDED_PROTO, HeaderValue::from_static("https"));
        let fwd = format!("for=\"{}\";proto=https;host=\"{}\"", forwarded_node(client), authority.replace('"', ""));
        let fwd = match parts.headers.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {fwd}"),
            None => fwd,
        };
        if let Ok(v) = HeaderValue::from_str(&fwd) {
            parts.headers.insert(FORWARDED, v);
        }
        headers::ensure_request_id(&mut parts.headers, &mut scratch);
        headers::continue_trace(&mut parts.headers, &mut scratch);
        rec.ids(&parts.headers);
        if let Some(v) = scratch.text(&self.name) {
            parts.headers.insert(headers::SOURCE, v);
        }
        if let Some(v) = scratch.text(&authority) {
            parts.headers.insert(HOST, v);
        }
        // Phase: weighted backend, then endpoint.
        let backend = route::choose_backend(&rule.backend_refs)
            .ok_or_else(|| ProxyError::NoEndpoint(format!("route {name} has no backend with weight")))?;
        let svc = table.service(&backend.name).ok_or_else(|| ProxyError::NoEndpoint(backend.name.clone()))?;
        rec.service(&svc.config.name);
        let body = body::limited(body, limit);
        let body = rec.count_request(body);
        let body = self.mesh.mirror_request(&table, &parts, body, &mirrors).await?;
        // Phase: pick an endpoint and forward, with the rule's timeouts, retries and faults.
        let opts = CallOpts {
            route: &name,
            labels: Some(&backend.labels),
            retry: rule.retry.as_ref(),
            timeouts: rule.timeouts.as_ref(),
            fault: rule.fault.as_ref(),
            client: Some(client.ip()),
        };
        let mut info = CallInfo::default();
        let result = self.mesh.call(&table, svc, Request::from_parts(parts, body), &opts, &mut info).await;
        rec.called(&info);
        let mut resp = result?;
        for m in response_mods {
            route::modify_headers(resp.headers_mut(), m);
        }
        Ok(resp)
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

/// RFC 7239 node syntax: IPv6 addresses in brackets.
fn forwarded_node(client: SocketAddr) -> String {
    match client.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}
