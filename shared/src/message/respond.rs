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
        let Some(reason) = resp.headers().get(ERROR_HEADER).cloned() else { return resp };
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
        "no-route" | "not-implemented" => 12,   // UNIMPLEMENTED
        "timeout" | "connect-timeout" => 4,     // DEADLINE_EXCEEDED
        "denied" => 7,                          // PERMISSION_DENIED
        "rate-limited" | "body-too-large" => 8, // RESOURCE_EXHAUSTED
        "bad-request" => 3,                     // INVALID_ARGUMENT
        "invalid-backend" => 13,                // INTERNAL
        "no-endpoint"
        | "peer-unreachable"
        | "peer-tls"
        | "upstream-unreachable"
        | "upstream-reset"
        | "overloaded"
        | "too-early"
        | "misdirected" => 14, // UNAVAILABLE
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
    /// than as a broken HTTP exchange. `quicmesh-error` stays. Other responses are untouched.
    pub fn for_grpc(resp: Response<Body>) -> Response<Body> {
        let Some(reason) = resp.headers().get(ERROR_HEADER).cloned() else { return resp };
        if resp.status() == http::StatusCode::OK {
            return resp;
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
