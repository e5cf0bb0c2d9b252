//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners: check the
//! head, match an edge route, then the path every proxy shares (`quicmesh_shared::proxy::pipeline`),
//! and record; errors reach external clients as their reason only.

use std::net::SocketAddr;

use http::header::{HeaderValue, ALT_SVC};
use http::{Request, Response};
use quicmesh_shared::config::GatewayConfig;
use quicmesh_shared::message::body::{self, Body};
use quicmesh_shared::message::error::ProxyError;
use quicmesh_shared::message::headers;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::pipeline::{self, Ctx, Side, Target};
use quicmesh_shared::telemetry::metrics as m;
use quicmesh_shared::telemetry::Record;
use std::sync::Arc;
use tracing::debug;

pub struct Edge {
    pub mesh: Arc<Mesh>,
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
        let conns = crate::conns::Conns::new(gc.limits.max_connections, gc.limits.max_connections_per_client);
        Self { mesh, limits: gc.limits.clone(), alt_svc, port, name: gc.name.clone(), conns }
    }

    /// Handles one client request end to end; never fails (errors become proxy responses).
    /// `held` is kept until the response body is done with (the connection's count of requests
    /// in flight), together with the drain's guard: one wrapper for both.
    /// `subject`: the subject of the client's verified certificate, passed upstream.
    pub async fn handle<G: Send + Unpin + 'static>(
        &self,
        mut req: Request<Body>,
        client: SocketAddr,
        proto: &'static str,
        subject: Option<HeaderValue>,
        held: G,
    ) -> Response<Body> {
        req.headers_mut().remove(crate::tls::CLIENT_SUBJECT);
        if let Some(s) = subject {
            req.headers_mut().insert(crate::tls::CLIENT_SUBJECT, s);
        }
        let in_flight = (self.mesh.drain().guard(), held);
        let mut rec = Record::new("ingress", self.mesh.access_log().cloned());
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
        let table = self.mesh.table();
        pipeline::prepare(&mut parts, &table)?;
        let authority =
            headers::authority(&parts.uri, &parts.headers).ok_or_else(|| ProxyError::BadRequest("no Host".into()))?;
        let host = headers::host_of(&authority).into_owned();
        // Phase: route (Gateway API HTTPRoute matching and precedence), from the same table as
        // the services the route leads to.
        let matched = table
            .edge_routes()
            .and_then(|routes| routes.find(&host, &parts.method, parts.uri.path(), parts.uri.query(), &parts.headers))
            .ok_or_else(|| ProxyError::NoRoute(format!("{host}{}", parts.uri.path())))?;
        let side = Side {
            scheme: "https",
            port: Some(self.port),
            default_body_limit: Some(self.limits.max_request_body),
            source: Some(&self.name),
            edge: true,
        };
        let cx = Ctx { mesh: &self.mesh, table: &table, side: &side, client, rec };
        pipeline::forward(cx, Target::Route(matched), parts, body, authority).await
    }
}
