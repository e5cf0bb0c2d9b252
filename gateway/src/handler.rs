//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners:
//! route -> limits -> forwarding headers -> pick backend and endpoint -> forward into the mesh
//! -> record.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{HeaderValue, ALT_SVC, CONTENT_LENGTH, HOST, LOCATION};
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use quicmesh_shared::body::{self, Body};
use quicmesh_shared::config::GatewayConfig;
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::headers;
use quicmesh_shared::mesh::{Mesh, PickCtx};
use quicmesh_shared::metrics as m;
use quicmesh_shared::route::{self, Filter, RouteTable};
use std::sync::Arc;
use tracing::debug;

use crate::routes;

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
}

impl Edge {
    pub fn new(mesh: Arc<Mesh>, gc: &GatewayConfig, port: u16) -> Self {
        let alt_svc =
            HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).unwrap_or(HeaderValue::from_static("clear"));
        // Validated with the config, so this cannot fail; an empty table is the safe fallback.
        let table = RouteTable::new(gc.routes.clone())
            .unwrap_or_else(|_| RouteTable::new(Vec::new()).expect("an empty route table is valid"));
        let routes = arc_swap::ArcSwap::from_pointee(table);
        Self { mesh, routes, limits: gc.limits.clone(), alt_svc, port }
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
    pub async fn handle(&self, req: Request<Body>, client: SocketAddr, proto: &'static str) -> Response<Body> {
        let start = Instant::now();
        let (route, mut resp) = match self.route(req, client).await {
            Ok(x) => x,
            Err((route, e)) => {
                debug!(%client, error = %e, "gateway request failed");
                metrics::counter!(m::PROXY_ERRORS, "direction" => "ingress", "reason" => e.reason()).increment(1);
                (route, e.brief_response())
            }
        };
        if proto != "h3" {
            resp.headers_mut().insert(ALT_SVC, self.alt_svc.clone());
        }
        let class = m::status_class(resp.status().as_u16());
        metrics::counter!(m::REQUESTS, "direction" => "ingress", "service" => route.clone(), "status_class" => class, "protocol" => proto)
            .increment(1);
        metrics::histogram!(m::REQUEST_DURATION, "direction" => "ingress", "service" => route)
            .record(start.elapsed().as_secs_f64());
        resp
    }

    async fn route(
        &self,
        req: Request<Body>,
        client: SocketAddr,
    ) -> Result<(String, Response<Body>), (String, ProxyError)> {
        let none = || "none".to_string();
        let (mut parts, body) = req.into_parts();
        let authority = headers::authority(&parts.uri, &parts.headers)
            .ok_or_else(|| (none(), ProxyError::BadRequest("no Host".into())))?;
        let host = headers::host_of(&authority);
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().map(str::to_owned);
        // Phase: route (Gateway API HTTPRoute matching and precedence).
        let routes = self.routes.load_full();
        let matched = routes
            .find(&host, &parts.method, &path, query.as_deref(), &parts.headers)
            .ok_or_else(|| (none(), ProxyError::NoRoute(format!("{host}{path}"))))?;
        let (route, rule) = (matched.route, matched.rule);
        let name = route.name.clone();
        let fail = |e| (name.clone(), e);
        // Phase: filters that answer or change the request.
        let mut response_mods = Vec::new();
        let mut authority = authority;
        let mut new_path: Option<String> = None;
        for f in &rule.filters {
            match f {
                Filter::RequestRedirect { redirect } => {
                    let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).or(Some(self.port));
                    let loc = route::redirect_location(
                        redirect,
                        "https",
                        &host,
                        port,
                        &path,
                        query.as_deref(),
                        matched.matched_prefix,
                    );
                    let mut resp = Response::new(body::empty());
                    *resp.status_mut() =
                        StatusCode::from_u16(redirect.status_code.unwrap_or(302)).unwrap_or(StatusCode::FOUND);
                    let loc = HeaderValue::from_str(&loc)
                        .map_err(|_| fail(ProxyError::BadRequest("redirect target".into())))?;
                    resp.headers_mut().insert(LOCATION, loc);
                    return Ok((name, resp));
                }
                Filter::RequestHeaderModifier { modifier } => route::modify_headers(&mut parts.headers, modifier),
                Filter::ResponseHeaderModifier { modifier } => response_mods.push(modifier),
                Filter::UrlRewrite { rewrite } => {
                    if let Some(h) = &rewrite.hostname {
                        authority = h.clone();
                    }
                    if let Some(m) = &rewrite.path {
                        new_path = Some(route::rewrite_path(&path, m, matched.matched_prefix));
                    }
                }
                // Mirroring needs the body twice; it comes with the traffic-management work.
                Filter::RequestMirror { .. } => {}
            }
        }
        if let Some(p) = new_path {
            let pq = match &query {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            parts.uri =
                http::Uri::try_from(pq).map_err(|e| fail(ProxyError::BadRequest(format!("rewritten path: {e}"))))?;
        }
        let limit = route.max_request_body.unwrap_or(self.limits.max_request_body);
        let declared =
            parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(fail(ProxyError::BodyTooLarge(limit)));
        }
        // Phase: forwarding headers.
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_internal(&mut parts.headers);
        headers::append_forwarded_for(&mut parts.headers, client.ip());
        parts.headers.insert(FORWARDED_PROTO, HeaderValue::from_static("https"));
        let fwd = format!("for=\"{}\";proto=https;host=\"{}\"", forwarded_node(client), authority.replace('"', ""));
        let fwd = match parts.headers.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {fwd}"),
            None => fwd,
        };
        if let Ok(v) = HeaderValue::from_str(&fwd) {
            parts.headers.insert(FORWARDED, v);
        }
        headers::ensure_request_id(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(HOST, v);
        }
        // Phase: weighted backend, then endpoint.
        let table = self.mesh.table();
        let total = routes::total_weight(&rule.backend_refs);
        let backend = routes::pick_backend(&rule.backend_refs, fastrand_u64(total))
            .ok_or_else(|| fail(ProxyError::NoEndpoint(format!("route {name} has no backend with weight"))))?;
        let svc = table.service(&backend.name).ok_or_else(|| fail(ProxyError::NoEndpoint(backend.name.clone())))?;
        let ctx = PickCtx { headers: Some(&parts.headers), client: Some(client.ip()) };
        let ep = self.mesh.pick(svc, &backend.labels, &ctx).map_err(fail)?;
        let body = body::boxed(Limited::new(body, limit as usize).map_err(|e| -> body::BoxError { e }));
        // Phase: forward, within the rule's request timeout when it sets one.
        let forward = self.mesh.forward(Request::from_parts(parts, body), &table, svc, &ep);
        let mut resp = match rule.timeouts.as_ref().and_then(|t| t.request) {
            Some(t) => tokio::time::timeout(t, forward).await.map_err(|_| fail(ProxyError::Timeout(t)))?,
            None => forward.await,
        }
        .map_err(fail)?;
        for m in response_mods {
            route::modify_headers(resp.headers_mut(), m);
        }
        Ok((name, resp))
    }
}

fn fastrand_u64(total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        fastrand::u64(0..total)
    }
}

/// RFC 7239 node syntax: IPv6 addresses in brackets.
fn forwarded_node(client: SocketAddr) -> String {
    match client.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}
