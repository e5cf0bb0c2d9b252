//! The one place a [`ProxyError`] becomes an HTTP response.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};

use super::body::{self, Body};
use super::error::{retry_after_secs, ProxyError, ERROR_HEADER};

impl ProxyError {
    /// The response a proxy sends for this error, with the details (for callers inside the mesh).
    pub fn response(&self) -> Response<Body> {
        self.respond(format!("quicmesh: {self}\n"))
    }

    /// The response for external clients: status and reason only; no internal addresses, peer
    /// names or TLS details leave the mesh (they are logged instead).
    pub fn brief_response(&self) -> Response<Body> {
        self.respond(format!("quicmesh: {}\n", self.reason()))
    }

    /// A response a proxy inside the mesh made (it carries `quicmesh-error`), cut down to what
    /// [`ProxyError::brief_response`] tells external clients; any other response is untouched.
    pub fn brief(resp: Response<Body>) -> Response<Body> {
        let Some(reason) = super::headers::find(resp.headers(), &ERROR_HEADER).cloned() else { return resp };
        let (mut parts, _details) = resp.into_parts();
        let text = format!("quicmesh: {}\n", String::from_utf8_lossy(reason.as_bytes()));
        parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(text.len()));
        parts.headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        Response::from_parts(parts, body::full(Bytes::from(text)))
    }

    fn respond(&self, text: String) -> Response<Body> {
        let mut resp = Response::new(body::full(Bytes::from(text)));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if let ProxyError::RateLimited { wait, .. } = self {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*wait)));
        }
        if let ProxyError::Unauthenticated(why) = self {
            // RFC 6750: no error code when no token came; `invalid_token` for one that failed.
            let challenge = if *why == "missing" {
                HeaderValue::from_static("Bearer realm=\"quicmesh\"")
            } else {
                HeaderValue::from_static("Bearer realm=\"quicmesh\", error=\"invalid_token\"")
            };
            headers.insert(http::header::WWW_AUTHENTICATE, challenge);
        }
        resp
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto` and the like).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The gRPC status code for a proxy's error reason (and its HTTP status, for the reasons
/// that do not say): what a gRPC client should make of it.
fn grpc_code(reason: &str, status: u16) -> u8 {
    match reason {
        "no-route" | "not-implemented" => 12,                      // UNIMPLEMENTED
        "timeout" | "connect-timeout" | "body-timeout" => 4,       // DEADLINE_EXCEEDED
        "denied" => 7,                                             // PERMISSION_DENIED
        "unauthenticated" => 16,                                   // UNAUTHENTICATED
        "rate-limited" | "body-too-large" | "head-too-large" => 8, // RESOURCE_EXHAUSTED
        "bad-request" => 3,                                        // INVALID_ARGUMENT
        "invalid-backend" => 13,                                   // INTERNAL
        "no-endpoint"
        | "peer-unreachable"
        | "peer-tls"
        | "upstream-unreachable"
        | "upstream-reset"
        | "overloaded"
        | "reader-stalled"
        | "too-early"
        | "misdirected"
        | "authz-unavailable" => 14, // UNAVAILABLE
        // As gRPC maps HTTP statuses it did not expect.
        _ => match status {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        },
    }
}

impl ProxyError {
    /// A response a proxy made (it carries `quicmesh-error`), for a gRPC caller: a gRPC
    /// trailers-only answer (HTTP 200, `application/grpc`, `grpc-status` and `grpc-message`
    /// in headers that end the stream), which gRPC clients read as the status it means rather
    /// than as a broken HTTP exchange. `quicmesh-error` stays. Any other response keeps its
    /// head, and a body that breaks off ends in trailers instead (see [`GrpcEnding`]).
    pub fn for_grpc(resp: Response<Body>) -> Response<Body> {
        let Some(reason) = super::headers::find(resp.headers(), &ERROR_HEADER).cloned() else {
            return resp.map(GrpcEnding::wrap);
        };
        if resp.status() == http::StatusCode::OK {
            return resp.map(GrpcEnding::wrap);
        }
        let (mut parts, _text) = resp.into_parts();
        let reason = String::from_utf8_lossy(reason.as_bytes()).into_owned();
        let code = grpc_code(&reason, parts.status.as_u16());
        parts.status = http::StatusCode::OK;
        parts.headers.remove(http::header::CONTENT_LENGTH);
        parts.headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        parts.headers.insert(super::headers::GRPC_STATUS, HeaderValue::from(u16::from(code)));
        // The reason is a short token of letters and '-': nothing to percent-encode.
        if let Ok(message) = HeaderValue::from_str(&format!("quicmesh: {reason}")) {
            parts.headers.insert(super::headers::GRPC_MESSAGE, message);
        }
        Response::from_parts(parts, body::empty())
    }
}

/// A gRPC response body that ends in trailers when it breaks off after its headers (the
/// instance died or reset the stream, the peer node went away, a stream idle timeout):
/// `grpc-status` 14 UNAVAILABLE (or what the proxy's own reason means, 4 for a timeout) with
/// the reason in `grpc-message`. A gRPC client calling the instance directly sees UNAVAILABLE
/// when the connection is lost; a reset made by a proxy would read as INTERNAL. The failure is
/// still recorded as such by the body the record wraps inside this one.
pub struct GrpcEnding {
    inner: Body,
    ended: bool,
}

impl GrpcEnding {
    pub fn wrap(inner: Body) -> Body {
        use http_body_util::BodyExt;
        GrpcEnding { inner, ended: false }.boxed_unsync()
    }
}

impl http_body::Body for GrpcEnding {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                let reason = e.downcast_ref::<ProxyError>().map_or("upstream-reset", |e| e.reason());
                let mut trailers = HeaderMap::new();
                trailers.insert(super::headers::GRPC_STATUS, HeaderValue::from(u16::from(grpc_code(reason, 502))));
                if let Ok(message) = HeaderValue::from_str(&format!("quicmesh: {reason}")) {
                    trailers.insert(super::headers::GRPC_MESSAGE, message);
                }
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Trailers may come where an error would have: the length is no longer promised.
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}
