//! Errors the proxies produce themselves: status and reason of each (`respond` makes the response).
//!
//! Every response made by a proxy carries `quicmesh-error: <reason>` so that nobody has to guess
//! whether a 502 came from the application or from the mesh.

use std::time::Duration;

use http::header::HeaderName;
use http::StatusCode;

/// Header naming why the proxy answered instead of the application. A `HeaderName`, not text:
/// a map looked up by text parses the name again at every lookup, and this one is looked up on
/// every response.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("quicmesh-error");

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {0:?}")]
    NoRoute(String),
    #[error("service {0:?} has no endpoint")]
    NoEndpoint(String),
    #[error("peer node {peer:?} is unreachable: {reason}")]
    PeerUnreachable { peer: String, reason: String },
    #[error("peer node {peer:?} failed the TLS handshake: {reason}")]
    PeerTls { peer: String, reason: String },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("upstream {addr} is unreachable: {reason}")]
    UpstreamUnreachable { addr: String, reason: String },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("the upstream stream failed: {0}")]
    UpstreamReset(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// A try ran out of time while the client's request body was still on its way (the proxy
    /// waiting for its next piece): the client's delay, held against no endpoint (408).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// A request head larger than the next hop takes (431).
    #[error("request head too large: {0}")]
    HeadTooLarge(String),
    #[error("not allowed: {0}")]
    Denied(String),
    #[error("service {0:?} has too many requests in flight")]
    Overloaded(String),
    #[error("rate limit of route {route:?} reached; retry in {wait:?}")]
    RateLimited { route: String, wait: Duration },
    #[error("fault injected by the route: status {0}")]
    Fault(u16),
    #[error("a request of an unsafe method arrived in 0-RTT and the handshake never completed")]
    TooEarly,
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// The matched rule sends nowhere valid: no backendRefs, all weights 0, or a backend that
    /// names no service (the Gateway API answers 500).
    #[error("invalid backend: {0}")]
    InvalidBackend(String),
    /// A route's retries (GEP-1731) ran out on instances that refused or cut off the
    /// connection: the service is unavailable (503, as the Gateway API's retry conformance
    /// expects); the reason stays the last try's.
    #[error("{tries} tries failed; the last: {cause}")]
    Exhausted { tries: u32, cause: Box<ProxyError> },
    /// The request's Host belongs to another listener than the one its connection's TLS
    /// server name chose (HTTP/2 and HTTP/3 connection coalescing): 421, so the client opens
    /// a connection for that host (RFC 9110 section 15.5.20).
    #[error("host {0:?} is not served on this connection")]
    Misdirected(String),
    /// The route requires a JWT and the request's is missing or fails a check (the label
    /// says which); 401 with `WWW-Authenticate`.
    #[error("not authenticated: {0}")]
    Unauthenticated(&'static str),
    /// A route's ExternalAuth service could not be asked (and the filter does not fail open).
    #[error("the authorization service could not decide: {0}")]
    AuthzUnavailable(String),
    /// The request's upload was stopped: the instance had stopped reading it while the
    /// connection it came on needed the window it held (`transport.stalled_budget`); 503.
    #[error("the upload was stopped: its reader stopped taking it while the connection needed the window")]
    ReaderStalled,
}

/// Internal header on a response from a peer node's own error: the request never reached the
/// instance, so it may be retried whatever its method. Stripped at every hop's exit.
pub const UNSENT_HEADER: HeaderName = HeaderName::from_static("quicmesh-unsent");

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoint(_) | ProxyError::Overloaded(_) | ProxyError::ReaderStalled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::PeerUnreachable { .. }
            | ProxyError::PeerTls { .. }
            | ProxyError::UpstreamUnreachable { .. }
            | ProxyError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout(_) | ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Fault(code) => StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            ProxyError::TooEarly => StatusCode::TOO_EARLY,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::InvalidBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::AuthzUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `quicmesh-error` value: a short, stable, bounded reason (also a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no-route",
            ProxyError::NoEndpoint(_) => "no-endpoint",
            ProxyError::PeerUnreachable { .. } => "peer-unreachable",
            ProxyError::PeerTls { .. } => "peer-tls",
            ProxyError::ConnectTimeout(_) => "connect-timeout",
            ProxyError::UpstreamUnreachable { .. } => "upstream-unreachable",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::UpstreamReset(_) => "upstream-reset",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::BodyTooLarge(_) => "body-too-large",
            ProxyError::BodyTimeout(_) => "body-timeout",
            ProxyError::HeadTooLarge(_) => "head-too-large",
            ProxyError::Denied(_) => "denied",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::Fault(_) => "fault-injected",
            ProxyError::TooEarly => "too-early",
            ProxyError::NotImplemented(_) => "not-implemented",
            ProxyError::InvalidBackend(_) => "invalid-backend",
            ProxyError::Exhausted { cause, .. } => cause.reason(),
            ProxyError::Misdirected(_) => "misdirected",
            ProxyError::Unauthenticated(_) => "unauthenticated",
            ProxyError::AuthzUnavailable(_) => "authz-unavailable",
            ProxyError::ReaderStalled => crate::message::wire::STALLED,
        }
    }

    /// Whether `reason` (a `quicmesh-error` value) says the mesh could not reach the service,
    /// rather than that something decided against the request.
    pub fn is_outage(reason: &str) -> bool {
        matches!(
            reason,
            "no-endpoint"
                | "peer-unreachable"
                | "peer-tls"
                | "connect-timeout"
                | "upstream-unreachable"
                | "timeout"
                | "upstream-reset"
                | "overloaded"
        )
    }

    /// Every `quicmesh-error` value a proxy writes (those of [`ProxyError::reason`], and
    /// `client-closed` for a client that left), so a label taken from a peer's header stays
    /// bounded: see [`known_reason`].
    pub const REASONS: &'static [&'static str] = &[
        "no-route",
        "no-endpoint",
        "peer-unreachable",
        "peer-tls",
        "connect-timeout",
        "upstream-unreachable",
        "timeout",
        "upstream-reset",
        "bad-request",
        "body-too-large",
        "body-timeout",
        "head-too-large",
        "denied",
        "overloaded",
        "rate-limited",
        "fault-injected",
        "too-early",
        "not-implemented",
        "invalid-backend",
        "misdirected",
        "unauthenticated",
        "authz-unavailable",
        "client-closed",
        crate::message::wire::STALLED,
    ];

    /// The request provably never reached an upstream instance (safe to retry elsewhere).
    pub fn unsent(&self) -> bool {
        match self {
            ProxyError::Exhausted { cause, .. } => cause.unsent(),
            other => matches!(
                other,
                ProxyError::NoEndpoint(_) | ProxyError::UpstreamUnreachable { .. } | ProxyError::ConnectTimeout(_)
            ),
        }
    }
}

/// Whole seconds for `retry-after`, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// A `quicmesh-error` value as a bounded metric label: one of [`ProxyError::REASONS`], else
/// `other`.
pub fn known_reason(value: &str) -> &'static str {
    ProxyError::REASONS.iter().find(|r| **r == value).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_a_known_label() {
        for r in ProxyError::REASONS {
            assert_eq!(known_reason(r), *r);
        }
        assert_eq!(known_reason("made-up"), "other");
    }

    #[test]
    fn proxy_errors_reach_grpc_callers_as_grpc_statuses() {
        for (err, code) in [
            (ProxyError::NoRoute("x".into()), "12"),
            (ProxyError::Timeout(Duration::from_secs(1)), "4"),
            (ProxyError::Denied("x".into()), "7"),
            (ProxyError::UpstreamUnreachable { addr: "a".into(), reason: "r".into() }, "14"),
            (ProxyError::Fault(401), "16"),
        ] {
            let resp = ProxyError::for_grpc(err.response());
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["grpc-status"], code, "{err}");
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            assert_eq!(resp.headers()["grpc-message"], format!("quicmesh: {}", err.reason()));
            assert!(http_body::Body::is_end_stream(resp.body()), "trailers-only: the headers end the stream");
        }
        let app = http::Response::new(crate::message::body::empty());
        assert!(!ProxyError::for_grpc(app).headers().contains_key("grpc-status"), "an application's answer stays");
    }

    #[test]
    fn every_error_names_itself() {
        let cases = [
            (ProxyError::NoRoute("x".into()), 404, "no-route"),
            (ProxyError::NoEndpoint("x".into()), 503, "no-endpoint"),
            (ProxyError::UpstreamUnreachable { addr: "a".into(), reason: "r".into() }, 502, "upstream-unreachable"),
            (ProxyError::Timeout(Duration::from_secs(1)), 504, "timeout"),
            (ProxyError::ConnectTimeout("a".into()), 504, "connect-timeout"),
        ];
        for (err, status, reason) in cases {
            let resp = err.response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[ERROR_HEADER], reason);
        }
    }
}
