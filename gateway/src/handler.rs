//! The gateway's request path, shared by the TCP (h1/h2) and QUIC (h3) listeners: check the
//! head, match an edge route, then the path every proxy shares (`quicmesh_shared::proxy::pipeline`),
//! and record; errors reach external clients as their reason only.

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue, ALT_SVC};
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
use tracing::{debug, warn};

pub struct Edge {
    pub mesh: Arc<Mesh>,
    pub limits: quicmesh_shared::config::EdgeLimits,
    /// The gateway's mesh name: the source of the requests it sends into the mesh.
    pub name: String,
    /// Client connections open, in all and per client address.
    pub conns: Arc<crate::conns::Conns>,
    /// The JWT providers' verifiers and key sets.
    pub jwt: quicmesh_shared::proxy::jwt::Providers,
    /// Automatic certificates: HTTP-01 challenges are answered before any route.
    pub acme: Option<Arc<crate::acme::Acme>>,
}

impl Edge {
    /// Admits a client's connection within the edge's limits (in all and per client address),
    /// or counts and logs the refusal: `None` means close it at once.
    pub fn admit(&self, client: SocketAddr) -> Option<crate::conns::Admitted> {
        match self.conns.admit(client.ip()) {
            Ok(a) => Some(a),
            Err(full) => {
                metrics::counter!(m::EDGE_REJECTED, "reason" => full.reason()).increment(1);
                debug!(%client, reason = full.reason(), "edge connection refused");
                None
            }
        }
    }
}

/// One bound port of the edge and what its listeners make of it.
#[derive(Debug)]
pub struct Port {
    /// The listeners' `port`: which of them a request may belong to.
    pub key: u16,
    /// The port redirects keep: the listeners' port, or the bound one for the default listener.
    pub redirect_port: u16,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `Alt-Svc` advertised on TCP responses, when the port also speaks HTTP/3.
    pub alt_svc: Option<HeaderValue>,
    /// The client certificates the port asks for.
    pub clients: Option<Arc<crate::tls::ClientCerts>>,
}

impl Port {
    pub fn new(
        key: u16,
        redirect_port: u16,
        tls: bool,
        h3_port: Option<u16>,
        clients: Option<Arc<crate::tls::ClientCerts>>,
    ) -> Self {
        let alt_svc = h3_port.and_then(|p| HeaderValue::from_str(&format!("h3=\":{p}\"; ma=86400")).ok());
        Self { key, redirect_port, scheme: if tls { "https" } else { "http" }, alt_svc, clients }
    }

    /// The subject of a client's certificate, when the port asks for one and it is valid.
    pub fn client_subject(&self, chain: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<HeaderValue> {
        self.clients.as_ref()?.subject(chain)
    }
}

/// Says a request came in TLS early data (RFC 8470); set by the HTTP/3 listener only.
pub const EARLY_DATA: HeaderName = HeaderName::from_static("early-data");

/// Drops what only this gateway may say about a request, should a client have sent it: its
/// client certificate's subject and, when `early_data`, that it came in early data. One look at
/// the names present: most requests carry neither.
fn strip_spoofed(headers: &mut http::HeaderMap, early_data: bool) {
    headers::remove_where(headers, |n| *n == crate::tls::CLIENT_SUBJECT || (early_data && *n == EARLY_DATA));
}

/// What a request's connection says about it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub client: SocketAddr,
    pub proto: &'static str,
    /// The subject of the client's verified certificate, passed upstream.
    pub subject: Option<HeaderValue>,
    pub port: Arc<Port>,
    /// The TLS server name the connection asked for (lowercase).
    pub sni: Option<String>,
}

impl Edge {
    pub fn new(mesh: Arc<Mesh>, gc: &GatewayConfig) -> Self {
        let conns = crate::conns::Conns::new(gc.limits.max_connections, gc.limits.max_connections_per_client);
        Self { mesh, limits: gc.limits.clone(), name: gc.name.clone(), conns, jwt: Default::default(), acme: None }
    }

    /// Handles one client request end to end; never fails (errors become proxy responses).
    /// `held` is kept until the response body is done with (the connection's count of requests
    /// in flight), together with the drain's guard: one wrapper for both.
    pub async fn handle<G: Send + Unpin + 'static>(
        &self,
        mut req: Request<Body>,
        at: &Arrival,
        held: G,
    ) -> Response<Body> {
        let (client, proto) = (at.client, at.proto);
        if let Some(answer) = self.acme.as_ref().and_then(|a| a.http_answer(req.uri().path())) {
            // An HTTP-01 validation from the ACME CA, on whichever listener it came to.
            debug!(%client, path = req.uri().path(), "ACME HTTP-01 validation answered");
            let mut resp = Response::new(body::full(answer));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            return resp;
        }
        let grpc = quicmesh_shared::message::respond::is_grpc(req.headers());
        // Only the HTTP/3 listener may say a request came in early data (RFC 8470), and it has.
        strip_spoofed(req.headers_mut(), proto != "h3");
        if let Some(s) = &at.subject {
            req.headers_mut().insert(crate::tls::CLIENT_SUBJECT, s.clone());
        }
        let in_flight = (self.mesh.drain().guard(), held);
        let mut rec = Record::new("ingress", self.mesh.access_log().cloned(), self.mesh.tap(), self.mesh.tracing());
        rec.protocol(proto);
        rec.request(&req);
        rec.source(&self.name, &self.name);
        let mut resp = match self.route(req, at, &mut rec).await {
            // An error made by a node inside the mesh says where and why: not to outsiders.
            Ok(resp) => ProxyError::brief(resp),
            Err(e) => {
                debug!(%client, error = %e, "gateway request failed");
                metrics::counter!(m::PROXY_ERRORS, "direction" => "ingress", "reason" => e.reason()).increment(1);
                e.brief_response()
            }
        };
        if let (false, Some(alt_svc)) = (proto == "h3", &at.port.alt_svc) {
            resp.headers_mut().insert(ALT_SVC, alt_svc.clone());
        }
        // Recorded when the response body ends; in flight for the drain until then too.
        let resp = rec.finish_holding(resp, in_flight);
        if grpc {
            return ProxyError::for_grpc(resp);
        }
        resp
    }

    /// Checks the request's JWT with provider `name`: on success the claims it passes on are
    /// on the headers; otherwise 401 with the reason.
    async fn authenticate(
        &self,
        table: &quicmesh_shared::proxy::table::Table,
        name: &str,
        headers: &mut http::HeaderMap,
        rec: &mut Record,
    ) -> Result<quicmesh_shared::policy::jwt::Claims, ProxyError> {
        let provider = table.config().gateway.as_ref().and_then(|g| g.jwt_providers.iter().find(|p| p.name == name));
        let verifier = provider.ok_or("no such provider".to_string()).and_then(|p| self.jwt.get(p));
        let verifier = verifier.map_err(|e| {
            warn!(provider = name, error = e, "JWT provider unusable");
            ProxyError::Unauthenticated("keys-unavailable")
        })?;
        match verifier.authenticate(headers).await {
            Ok(claims) => {
                rec.auth("ok");
                Ok(claims)
            }
            Err(failure) => {
                rec.auth(failure.label());
                Err(ProxyError::Unauthenticated(failure.label()))
            }
        }
    }

    async fn route(&self, req: Request<Body>, at: &Arrival, rec: &mut Record) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let table = self.mesh.table();
        pipeline::prepare(&mut parts, &table)?;
        let authority =
            headers::authority(&parts.uri, &parts.headers).ok_or_else(|| ProxyError::BadRequest("no Host".into()))?;
        let host = headers::host_of(&authority).into_owned();
        let no_route = || ProxyError::NoRoute(format!("{host}{}", parts.uri.path()));
        // Phase: listener. The Host picks the listener of this port (listener isolation); over
        // TLS, one other than the server name picked was coalesced onto this connection.
        let listeners = table.edge().ok_or_else(no_route)?;
        let listener = listeners.select(at.port.key, &host);
        if let Some(by_sni) = at.sni.as_deref().and_then(|sni| listeners.select(at.port.key, sni)) {
            if listener.is_none_or(|l| !std::ptr::eq(by_sni, l)) {
                return Err(ProxyError::Misdirected(host));
            }
        }
        let listener = listener.ok_or_else(no_route)?;
        // Phase: route (Gateway API HTTPRoute matching and precedence), from the same table as
        // the services the route leads to.
        let matched = listener
            .routes
            .find(&host, &parts.method, parts.uri.path(), parts.uri.query(), &parts.headers)
            .ok_or_else(no_route)?;
        // Phase: authentication, when the route requires a JWT.
        let mut jwt_claims = None;
        if let Some(name) = &matched.route.jwt {
            let claims = self.authenticate(&table, name, &mut parts.headers, rec).await?;
            jwt_claims = quicmesh_shared::policy::jwt::encode_claims(&claims);
        }
        let client = at.client;
        let side = Side {
            scheme: at.port.scheme,
            port: Some(at.port.redirect_port),
            default_body_limit: Some(self.limits.max_request_body),
            source: Some(&self.name),
            edge: true,
            jwt_claims,
        };
        let cx = Ctx { mesh: &self.mesh, table: &table, side: &side, client, rec };
        pipeline::forward(cx, Target::Route(matched), parts, body, authority).await
    }
}
