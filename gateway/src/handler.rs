//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners:
//! route -> limits -> forwarding headers -> pick backend and endpoint -> forward into the mesh
//! -> record.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{HeaderValue, ALT_SVC, CONTENT_LENGTH, HOST};
use http::{HeaderName, Request, Response};
use http_body_util::{BodyExt, Limited};
use quicmesh_shared::body::{self, Body};
use quicmesh_shared::config::{GatewayConfig, GatewayRoute};
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::headers;
use quicmesh_shared::mesh::Mesh;
use quicmesh_shared::metrics as m;
use std::sync::Arc;
use tracing::debug;

use crate::routes::{self, RouteTable};

const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

pub struct Edge {
    pub mesh: Arc<Mesh>,
    routes: arc_swap::ArcSwap<RouteTable>,
    pub limits: quicmesh_shared::config::EdgeLimits,
    /// `Alt-Svc` advertised on TCP responses.
    pub alt_svc: HeaderValue,
}

impl Edge {
    pub fn new(mesh: Arc<Mesh>, gc: &GatewayConfig, port: u16) -> Self {
        let alt_svc =
            HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).unwrap_or(HeaderValue::from_static("clear"));
        let routes = arc_swap::ArcSwap::from_pointee(RouteTable::new(gc.routes.clone()));
        Self { mesh, routes, limits: gc.limits.clone(), alt_svc }
    }

    /// Replaces the route table atomically.
    pub fn set_routes(&self, routes: Vec<quicmesh_shared::config::GatewayRoute>) {
        self.routes.store(Arc::new(RouteTable::new(routes)));
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
        let routes = self.routes.load_full();
        let route: &GatewayRoute = routes
            .find(&host, parts.uri.path())
            .ok_or_else(|| (none(), ProxyError::NoRoute(format!("{host}{}", parts.uri.path()))))?;
        let name = route.name.clone();
        let fail = |e| (name.clone(), e);
        let declared =
            parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_request_body) {
            return Err(fail(ProxyError::BodyTooLarge(route.max_request_body)));
        }
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
        let table = self.mesh.table();
        let total = routes::total_weight(&route.backends);
        let backend = routes::pick_backend(&route.backends, fastrand_u64(total))
            .ok_or_else(|| fail(ProxyError::NoEndpoint(format!("route {name} has no backend with weight"))))?;
        let svc =
            table.service(&backend.service).ok_or_else(|| fail(ProxyError::NoEndpoint(backend.service.clone())))?;
        let ep = self.mesh.pick(svc, &backend.labels).map_err(fail)?;
        let body =
            body::boxed(Limited::new(body, route.max_request_body as usize).map_err(|e| -> body::BoxError { e }));
        let resp = self.mesh.forward(Request::from_parts(parts, body), &table, svc, &ep).await.map_err(fail)?;
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
