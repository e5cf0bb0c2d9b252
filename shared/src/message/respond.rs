//! The one place a [`ProxyError`] becomes an HTTP response.

use bytes::Bytes;
use http::{HeaderValue, Response};

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
