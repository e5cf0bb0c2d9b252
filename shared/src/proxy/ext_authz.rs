//! The ExternalAuth filter (GEP-1494, HTTP mode): before a request goes on, an authorization
//! service in the mesh is asked with the request's method, path (under the filter's prefix),
//! `Authorization` and the allowed headers, and no body. A 2xx lets the request on, with the
//! allowed headers of that answer added; any other answer goes back to the client as it is
//! (status, headers, body up to 64 KiB). A service that cannot be asked (no instance reached,
//! or an answer the mesh made instead of the service) answers 503 `authz-unavailable`, or lets
//! the request on with `failOpen`.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST};
use http::request::Parts;
use http::{HeaderName, Request, Response};
use http_body_util::BodyExt as _;
use tracing::debug;

use crate::message::body::{self, Body};
use crate::message::error::ProxyError;
use crate::message::headers;
use crate::policy::route::ExternalAuth;
use crate::proxy::call::{CallInfo, CallOpts};
use crate::proxy::mesh::Mesh;
use crate::proxy::table::Table;
use crate::telemetry::metrics as m;

/// The most of a refusal's body passed back to the client.
const MAX_REFUSAL: usize = 64 * 1024;

/// Asks the filter's service about the request: `None` to go on (its headers changed as the
/// answer allows), or the answer to give the client instead.
pub async fn check(
    mesh: &Mesh,
    table: &Table,
    auth: &ExternalAuth,
    route: &str,
    parts: &mut Parts,
) -> Result<Option<Response<Body>>, ProxyError> {
    let count = |result: &'static str| {
        metrics::counter!(m::EXT_AUTHZ, "route" => route.to_string(), "result" => result).increment(1);
    };
    // An answer a proxy made because the service could not be reached (its instance or node
    // unreachable, a timeout on the way) is no decision: the service could not be asked. The
    // mesh's own refusals (an authorization policy, a bad request, a rate limit) stay refusals.
    let asked = ask(mesh, table, auth, parts).await.and_then(|answer| {
        let reason = answer.headers().get(crate::message::error::ERROR_HEADER).and_then(|v| v.to_str().ok());
        match reason.map(crate::message::error::known_reason) {
            Some(r) if ProxyError::is_outage(r) => {
                Err(ProxyError::UpstreamReset(format!("{} from the mesh: {r}", answer.status())))
            }
            _ => Ok(answer),
        }
    });
    let answer = match asked {
        Ok(answer) => answer,
        Err(e) if auth.fail_open => {
            debug!(route, error = %e, "authorization service unavailable; failing open");
            count("failed-open");
            return Ok(None);
        }
        Err(e) => {
            count("unavailable");
            return Err(ProxyError::AuthzUnavailable(e.to_string()));
        }
    };
    if !answer.status().is_success() {
        count("denied");
        let (mut head, body) = answer.into_parts();
        headers::strip_hop_by_hop(&mut head.headers);
        head.headers.remove(crate::message::error::ERROR_HEADER);
        let text = read_some(body, MAX_REFUSAL).await;
        head.headers.remove(http::header::TRANSFER_ENCODING);
        head.headers.insert(CONTENT_LENGTH, text.len().into());
        return Ok(Some(Response::from_parts(head, body::full(text))));
    }
    count("allowed");
    for name in &auth.http.allowed_response_headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        let values: Vec<_> = answer.headers().get_all(&name).iter().cloned().collect();
        if !values.is_empty() {
            parts.headers.remove(&name);
            for v in values {
                parts.headers.append(name.clone(), v);
            }
        }
    }
    Ok(None)
}

/// Up to `limit` bytes of `body` (what came before an error or the limit).
async fn read_some(mut body: Body, limit: usize) -> bytes::Bytes {
    let mut out = bytes::BytesMut::new();
    while out.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    out.extend_from_slice(&data[..data.len().min(limit - out.len())]);
                }
            }
            _ => break,
        }
    }
    out.freeze()
}

/// The check request and its answer's head (the body only for a refusal).
async fn ask(mesh: &Mesh, table: &Table, auth: &ExternalAuth, parts: &Parts) -> Result<Response<Body>, ProxyError> {
    let svc =
        table.service(&auth.backend_ref.name).ok_or_else(|| ProxyError::NoEndpoint(auth.backend_ref.name.clone()))?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!("{}{path}", auth.http.path.trim_end_matches('/'));
    let mut req = Request::builder().method(parts.method.clone()).uri(target);
    // The mesh's own headers are never a client's to pass on, whatever the route allows.
    let allowed = auth
        .http
        .allowed_headers
        .iter()
        .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        .filter(|h| !h.as_str().starts_with("quicmesh-"));
    for name in [HOST, AUTHORIZATION].into_iter().chain(allowed) {
        for v in parts.headers.get_all(&name) {
            req = req.header(&name, v);
        }
    }
    let req = req
        .header(CONTENT_LENGTH, 0)
        .body(body::empty())
        .map_err(|e| ProxyError::BadRequest(format!("authorization request: {e}")))?;
    let (mut info, opts, at) = (CallInfo::default(), CallOpts::default(), mesh.at(table));
    let call = at.call(svc, req, &opts, &mut info);
    tokio::time::timeout(auth.timeout, call).await.map_err(|_| ProxyError::Timeout(auth.timeout))?
}
