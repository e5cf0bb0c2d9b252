//! Serving a peer's CONNECT for a local TCP instance; the calling side of a tunnel is
//! `quicmesh_shared::proxy::tcp`.

use http::{Method, Request, Response, StatusCode};
use quicmesh_shared::config::Protocol;
use quicmesh_shared::message::body::H3Send as _;
use quicmesh_shared::message::error::ProxyError;
use quicmesh_shared::message::headers::Internal;
use quicmesh_shared::policy::authz::{Caller, Target};
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::tcp::{connect, splice, TunnelDone};
use quicmesh_shared::proxy::upgrade;
use quicmesh_shared::telemetry;
use quicmesh_shared::telemetry::metrics as m;
use tracing::debug;

use crate::peer::{local_target, source_of, ServerStream};

/// Serves a peer's CONNECT: checks the target is a local TCP instance, connects, splices.
pub async fn inbound(mut req: Request<()>, fields: Option<Internal>, stream: ServerStream, peer: &str, mesh: &Mesh) {
    if req.headers().contains_key(upgrade::UPGRADE_HEADER) {
        return upgrade_inbound(req, fields, stream, peer, mesh).await;
    }
    let (mut send, recv) = stream.split();
    let table = mesh.table();
    let fields = fields.unwrap_or_else(|| Internal::take(req.headers_mut()));
    let target = match local_target(&fields, mesh, &table) {
        Ok((svc, addr)) if svc.protocol == Protocol::Tcp => Ok((svc.name.clone(), addr)),
        Ok(_) => Err(ProxyError::BadRequest("CONNECT to a non-TCP service".into())),
        Err(e) => Err(e),
    };
    let source = source_of(&fields, peer, &table);
    let caller = Caller {
        node: peer,
        service: (source != telemetry::UNKNOWN).then_some(source),
        via_gateway: peer == table.gateway_name(),
        jwt: None,
    };
    let connected = match target {
        Ok((name, addr)) => {
            let target = Target { method: None, path: None, headers: None, port: addr.port() };
            match mesh.authorize(&table, &name, &caller, &target) {
                Ok(()) => connect(addr, &table).await.map(|tcp| (name, tcp)),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let (name, tcp) = match connected {
        Ok(x) => x,
        Err(e) => {
            debug!(peer, error = %e, "inbound tunnel refused");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "inbound", "reason" => e.reason()).increment(1);
            let (parts, _) = e.response().into_parts();
            let _ = send.send_response(Response::from_parts(parts, ())).await;
            let _ = send.finish().await;
            return;
        }
    };
    metrics::counter!(m::TCP_CONNECTIONS, "direction" => "inbound", "service" => name.clone()).increment(1);
    let mut done = TunnelDone::new("inbound", &name, mesh);
    done.entry.src_node = peer.to_string();
    done.entry.dst_node = mesh.local_node().map(str::to_owned).unwrap_or_default();
    let mut ok = Response::new(());
    *ok.status_mut() = StatusCode::OK;
    if send.send_response(ok).await.is_err() {
        return;
    }
    let carried = splice(tcp, send, recv, table.config().timeouts.tcp_idle).await;
    // Seen from the caller: what it sent arrived here from the stream (`down`).
    done.carried(carried, 0, true);
}

/// An upgrade's `quicmesh-path` (a path and query, nothing else) in canonical form.
fn canonical_path(path: &str, merge_slashes: bool) -> Result<String, ProxyError> {
    let bad = || ProxyError::BadRequest("quicmesh-path is not a path".into());
    let uri: http::Uri = path.parse().map_err(|_| bad())?;
    if uri.scheme().is_some() || uri.authority().is_some() || !uri.path().starts_with('/') {
        return Err(bad());
    }
    let uri = quicmesh_shared::message::path::normalize_uri(&uri, merge_slashes)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?
        .unwrap_or(uri);
    Ok(uri.path_and_query().map_or("/", |p| p.as_str()).to_string())
}

/// Serves a peer's upgrade (WebSocket) CONNECT: authorizes it as the HTTP request it carries,
/// makes the upgrade request to the local instance, and once the instance switched, answers 200
/// with its headers and splices; a refusal (the instance's or this node's) is answered as such.
async fn upgrade_inbound(
    mut req: Request<()>,
    fields: Option<Internal>,
    stream: ServerStream,
    peer: &str,
    mesh: &Mesh,
) {
    let (mut send, recv) = stream.split();
    let table = mesh.table();
    let fields = fields.unwrap_or_else(|| Internal::take(req.headers_mut()));
    let source = source_of(&fields, peer, &table);
    let via_gateway = peer == table.gateway_name();
    let claims = crate::inbound::gateway_claims(fields.jwt_claims.as_ref(), via_gateway);
    let caller = Caller {
        node: peer,
        service: (source != telemetry::UNKNOWN).then_some(source),
        via_gateway,
        jwt: claims.as_ref(),
    };
    let path = req.headers().get(upgrade::PATH_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("/").to_string();
    let protocol = req.headers().get(upgrade::UPGRADE_HEADER).cloned().unwrap_or(http::HeaderValue::from_static(""));
    let switched = async {
        // Authorized and sent on in canonical form, as a plain request's path is.
        let path = canonical_path(&path, table.config().mesh.merge_slashes)?;
        let (svc, addr) = local_target(&fields, mesh, &table)?;
        if svc.protocol == Protocol::Tcp {
            return Err(ProxyError::BadRequest("an upgrade to a TCP service".into()));
        }
        let name = svc.name.clone();
        let plain = path.split('?').next().unwrap_or("/");
        let target =
            Target { method: Some(&Method::GET), path: Some(plain), headers: Some(req.headers()), port: addr.port() };
        mesh.authorize(&table, &name, &caller, &target)?;
        let (head, upgraded) = upgrade::to_instance(addr, &table, &path, req.headers().clone(), &protocol).await?;
        Ok((name, head, upgraded))
    };
    let (name, head, upgraded) = match switched.await {
        Ok(x) => x,
        Err(e) => {
            debug!(peer, error = %e, "inbound upgrade refused");
            metrics::counter!(m::PROXY_ERRORS, "direction" => "inbound", "reason" => e.reason()).increment(1);
            let (parts, _) = e.response().into_parts();
            let _ = send.send_response(Response::from_parts(parts, ())).await;
            let _ = send.finish().await;
            return;
        }
    };
    let Some(instance) = upgraded else {
        // The instance said no: its answer goes back as it is.
        let (mut parts, ()) = head.into_parts();
        quicmesh_shared::message::headers::strip_hop_by_hop(&mut parts.headers);
        let _ = send.send_response(Response::from_parts(parts, ())).await;
        let _ = send.finish().await;
        return;
    };
    let (mut parts, ()) = head.into_parts();
    quicmesh_shared::message::headers::strip_hop_by_hop(&mut parts.headers);
    parts.status = StatusCode::OK;
    if send.send_response(Response::from_parts(parts, ())).await.is_err() {
        return;
    }
    let mut done = TunnelDone::new("inbound", &name, mesh);
    done.entry.src_node = peer.to_string();
    done.entry.dst_node = mesh.local_node().map(str::to_owned).unwrap_or_default();
    // In flight for the drain, as the calling side's is.
    let _in_flight = mesh.drain().guard();
    // Limited where the upgrade came in: at the gateway by its route, or not at all.
    let carried = splice(instance, send, recv, std::time::Duration::ZERO).await;
    done.carried(carried, 0, true);
}
