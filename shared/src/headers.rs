//! Header handling at proxy hops: hop-by-hop removal (RFC 9110 section 7.6.1), forwarding
//! headers, request ids, and the mesh's internal headers between nodes.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Uri};

/// Service the outbound node chose (set between proxies only).
pub const SERVICE: HeaderName = HeaderName::from_static("quicmesh-service");
/// Endpoint address the outbound node chose (set between proxies only).
pub const ENDPOINT: HeaderName = HeaderName::from_static("quicmesh-endpoint");
/// The calling service, as the outbound node names it (set between proxies only; the inbound
/// node believes it only when the calling node hosts that service).
pub const SOURCE: HeaderName = HeaderName::from_static("quicmesh-source");
/// Which try of a request this is, set toward the upstream on retries (2 for the first retry).
pub const ATTEMPT: HeaderName = HeaderName::from_static("quicmesh-attempt");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes connection-specific headers, including every header named in `Connection`.
/// `TE: trailers` survives, as HTTP/2 and HTTP/3 allow it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Drops the mesh-internal headers a client might have tried to set itself.
pub fn strip_internal(headers: &mut HeaderMap) {
    headers.remove(SERVICE);
    headers.remove(ENDPOINT);
    headers.remove(SOURCE);
}

/// Appends the client address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(FORWARDED_FOR, v);
    }
}

/// Returns the request id, generating and inserting one when absent or unusable.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    match headers.get(&REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => {
            // A v4 UUID from the thread's fast generator: request ids need to be unique, not
            // unguessable, and `Uuid::new_v4` costs a getrandom system call each.
            let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
            let id = HeaderValue::from_str(&uuid.to_string()).unwrap_or(HeaderValue::from_static("0"));
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    }
}

/// W3C Trace Context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Continues a request's W3C trace as a new span of this proxy (same trace id and flags, a new
/// parent id), or starts a trace when the request has no valid `traceparent` (dropping any
/// orphaned `tracestate`, as the specification asks). Returns the trace id.
pub fn continue_trace(headers: &mut HeaderMap) -> String {
    let parsed = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let (trace, flags) = match parsed {
        Some(p) => p,
        None => {
            headers.remove(&TRACESTATE);
            (random_hex(16), "01".to_string())
        }
    };
    let value = format!("00-{trace}-{}-{flags}", random_hex(8));
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT, v);
    }
    trace
}

/// The trace id of a valid `traceparent`, if the request has one.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse_traceparent).map(|(t, _)| t)
}

/// (trace id, flags) of a `traceparent` value; `None` when it is not valid.
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    // Version 00 has exactly four fields; later versions may add more.
    let fields_ok = version != "00" || parts.next().is_none();
    (hex(version, 2)
        && version != "ff"
        && fields_ok
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2))
    .then(|| (trace.to_string(), flags.to_string()))
}

/// `bytes` random bytes as lowercase hex, never all zero.
fn random_hex(bytes: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes * 2);
    while s.len() < bytes * 2 {
        // Never all zero: a zero word is drawn again.
        let word = fastrand::u64(1..);
        for i in 0..16.min(bytes * 2 - s.len()) {
            s.push(HEX[((word >> (i * 4)) & 0xf) as usize] as char);
        }
    }
    s
}

/// The authority a request is for: the absolute-form URI's, else the Host header.
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str().to_string());
    }
    headers.get(HOST).and_then(|h| h.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The host part of an authority, lowercased, without port or brackets.
pub fn host_of(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[TE], "trailers");
        assert_eq!(h["x-keep"], "1");
        h.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(TE));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h[FORWARDED_FOR], "10.0.0.1, ::1");
    }

    #[test]
    fn request_id_kept_or_made() {
        let mut h = HeaderMap::new();
        let made = ensure_request_id(&mut h);
        assert_eq!(made.len(), 36);
        assert_eq!(ensure_request_id(&mut h), made);
    }

    #[test]
    fn trace_context_continues_or_starts() {
        let mut h = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(parent));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        assert_eq!(continue_trace(&mut h), "4bf92f3577b34da6a3ce929d0e0e4736");
        let next = h[TRACEPARENT].to_str().unwrap().to_string();
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && next.ends_with("-01"), "{next}");
        assert_ne!(next, parent, "a new span id");
        assert_eq!(h[TRACESTATE], "vendor=1");
        for bad in [
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            h.insert(TRACESTATE, HeaderValue::from_static("orphan=1"));
            let trace = continue_trace(&mut h);
            assert_eq!(trace.len(), 32);
            assert!(!bad.contains(&trace), "{bad}");
            assert!(!h.contains_key(TRACESTATE));
            assert_eq!(trace_id(&h).as_deref(), Some(trace.as_str()));
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("Hello:8080"), "hello");
        assert_eq!(host_of("hello"), "hello");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("hello.mesh."), "hello.mesh");
    }
}
