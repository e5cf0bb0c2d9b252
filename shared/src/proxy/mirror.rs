//! Mirrors: copies of a request sent to another backend and forgotten, as Gateway API's
//! RequestMirror filter asks. A slow or dead mirror costs the original request nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Body as _;
use tracing::debug;

use super::mesh::Mesh;
use super::pick::PickCtx;
use super::table::Table;
use crate::message::body::{self, Body};
use crate::message::error::ProxyError;

/// How long a mirrored copy may take, its answer's body read to the end included, before it is
/// abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body copied to mirrors (bodies are buffered for the copy).
pub const MIRROR_MAX_BODY: u64 = 64 << 10;

impl Mesh {
    /// Sends copies of a request to `mirrors` and returns the body to forward. A body is copied
    /// when it is empty or declares at most [`MIRROR_MAX_BODY`] bytes (it is buffered for the
    /// copy); larger ones are not mirrored.
    pub async fn mirror_request(
        self: &Arc<Self>,
        table: &Arc<Table>,
        parts: &http::request::Parts,
        body: Body,
        mirrors: &[&crate::policy::route::BackendRef],
    ) -> Result<Body, ProxyError> {
        if mirrors.is_empty() {
            return Ok(body);
        }
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !body.is_end_stream() && declared.is_none_or(|n| n > MIRROR_MAX_BODY) {
            debug!("request body too large to mirror; not mirrored");
            return Ok(body);
        }
        // Collected by hand: small by the check above, and bounded again here.
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let frame = frame.map_err(|e| ProxyError::BadRequest(format!("request body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if (buf.len() + data.len()) as u64 > MIRROR_MAX_BODY {
                    return Err(ProxyError::BodyTooLarge(MIRROR_MAX_BODY));
                }
                buf.extend_from_slice(data);
            }
        }
        let bytes = buf.freeze();
        for m in mirrors {
            self.spawn_mirror(table.clone(), parts, bytes.clone(), m);
        }
        Ok(body::full(bytes))
    }

    /// Sends a copy of a request to a mirror backend and forgets it: the caller never waits for
    /// it, and a slow or dead mirror costs the original request nothing.
    pub fn spawn_mirror(
        self: &Arc<Self>,
        table: Arc<Table>,
        head: &http::request::Parts,
        body: Bytes,
        backend: &crate::policy::route::BackendRef,
    ) {
        let Some(svc) = table.service(&backend.name).cloned() else {
            debug!(service = backend.name, "mirror backend unknown; copy dropped");
            return;
        };
        let mut req = Request::new(body::full(body));
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.headers_mut() = head.headers.clone();
        let labels = backend.labels.clone();
        let mesh = self.clone();
        tokio::spawn(async move {
            let Ok(ep) = mesh.pick(&svc, &labels, &PickCtx::NONE) else { return };
            // One limit for the whole copy, the answer's body included: a mirror that streams
            // for ever (or very large answers) must not hold this task, or its memory, long.
            let copy = async {
                let resp = mesh.at(&table).forward(req, &svc, &ep).await?;
                // Read and dropped frame by frame, so that a pooled connection stays reusable
                // without the answer ever being held whole.
                let mut body = resp.into_body();
                while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                    if frame.is_err() {
                        break;
                    }
                }
                Ok::<_, ProxyError>(())
            };
            match tokio::time::timeout(MIRROR_TIMEOUT, copy).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(service = svc.config.name, error = %e, "mirror copy failed"),
                Err(_) => debug!(service = svc.config.name, "mirror copy timed out"),
            }
        });
    }
}
