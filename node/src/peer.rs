//! What a request from a peer member asks of this node: the local instance it names (checked
//! against what this node hosts) and the calling service it claims. Shared by HTTP delivery
//! (`inbound`) and TCP tunnels (`tcp`).

use std::net::SocketAddr;

use quicmesh_shared::config::ServiceConfig;
use quicmesh_shared::message::error::ProxyError;
use quicmesh_shared::message::headers::Internal;
use quicmesh_shared::proxy::mesh::Mesh;
use quicmesh_shared::proxy::table::Table;
use quicmesh_shared::telemetry;

pub use quicmesh_shared::transport::stream::ServerStream;

/// The calling service a peer names, believed only when that peer hosts it (or is the gateway,
/// whose traffic names the gateway): a node speaks for its own services and no others, and a
/// node named as a service is not that service.
pub fn source_of<'f>(fields: &'f Internal, peer: &str, table: &Table) -> &'f str {
    match Internal::text(&fields.source) {
        Some(s) if s == peer && peer == table.gateway_name() => s,
        Some(s) if table.service(s).is_some_and(|svc| svc.config.endpoints.iter().any(|ep| ep.node == peer)) => s,
        _ => telemetry::UNKNOWN,
    }
}

/// The local service and endpoint a peer asked for, if this node hosts them.
pub fn local_target<'a>(
    fields: &Internal,
    mesh: &Mesh,
    table: &'a Table,
) -> Result<(&'a ServiceConfig, SocketAddr), ProxyError> {
    let service =
        Internal::text(&fields.service).ok_or_else(|| ProxyError::BadRequest("missing quicmesh-service".into()))?;
    let addr: SocketAddr = Internal::text(&fields.endpoint)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ProxyError::BadRequest("missing or bad quicmesh-endpoint".into()))?;
    let svc = table.service(service).ok_or_else(|| ProxyError::NoEndpoint(service.to_string()))?;
    let hosted = svc.config.endpoints.iter().any(|ep| mesh.is_local(ep) && ep.address == addr);
    if !hosted {
        return Err(ProxyError::NoEndpoint(format!("{service} at {addr} (not hosted on this node)")));
    }
    Ok((&svc.config, addr))
}
