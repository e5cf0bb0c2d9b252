//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners: check the
//! head, match an edge route, then the path every proxy shares (`quicmesh_shared::pipeline`),
//! and record; errors reach external clients as their reason only.

use std::net::SocketAddr;

use http::header::{HeaderValue, ALT_SVC};
use http::{Request, Response};
use quicmesh_shared::body::{self, Body};
use quicmesh_shared::config::GatewayConfig;
use quicmesh_shared::error::ProxyError;
use quicmesh_shared::headers;
use quicmesh_shared::mesh::Mesh;
use quicmesh_shared::metrics as m;
use quicmesh_shared::path;
use quicmesh_shared::pipeline::{self, Side, Target};
use quicmesh_shared::route::{self, RouteTable};
use quicmesh_shared::telemetry::Record;
use std::sync::Arc;
use tracing::debug;

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
        let host = headers::host_of(&authority).into_owned();
        // Phase: route (Gateway API HTTPRoute matching and precedence).
        let routes = self.routes.load_full();
        let matched = routes
            .find(&host, &parts.method, parts.uri.path(), parts.uri.query(), &parts.headers)
            .ok_or_else(|| ProxyError::NoRoute(format!("{host}{}", parts.uri.path())))?;
        let side = Side {
            scheme: "https",
            port: Some(self.port),
            default_body_limit: Some(self.limits.max_request_body),
            source: Some(&self.name),
            edge: true,
        };
        pipeline::forward(&self.mesh, &table, &side, Target::Route(matched), parts, body, authority, client, rec).await
    }
}
