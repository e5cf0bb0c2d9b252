//! Header handling at proxy hops: hop-by-hop removal (RFC 9110 section 7.6.1), forwarding
//! headers, request ids, and the mesh's internal headers between nodes.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Uri};

/// Service the outbound node chose (set between proxies only).
pub const SERVICE: HeaderName = HeaderName::from_static("quicmesh-service");
/// Endpoint address the outbound node chose (set between proxies only).
pub const ENDPOINT: HeaderName = HeaderName::from_static("quicmesh-endpoint");
/// Which try of a request this is (1 for the first), set toward the upstream on every try.
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
            let id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static("0"));
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    }
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
    fn hosts() {
        assert_eq!(host_of("Hello:8080"), "hello");
        assert_eq!(host_of("hello"), "hello");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("hello.mesh."), "hello.mesh");
    }
}
