//! gRPC as the proxies see it: status codes by name, and the status a response carries.

use http::HeaderMap;

use super::headers::GRPC_STATUS;

/// gRPC status codes by number, lowercase and dashed (`deadline-exceeded`).
pub const NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// The metric and access-log label of a failed call's status (`grpc-not-found`).
pub const LABELS: [&str; 17] = [
    "grpc-ok",
    "grpc-cancelled",
    "grpc-unknown",
    "grpc-invalid-argument",
    "grpc-deadline-exceeded",
    "grpc-not-found",
    "grpc-already-exists",
    "grpc-permission-denied",
    "grpc-resource-exhausted",
    "grpc-failed-precondition",
    "grpc-aborted",
    "grpc-out-of-range",
    "grpc-unimplemented",
    "grpc-internal",
    "grpc-unavailable",
    "grpc-data-loss",
    "grpc-unauthenticated",
];

/// The code of a status name (`unavailable` is 14).
pub fn code_of(name: &str) -> Option<u16> {
    NAMES.iter().position(|n| *n == name).map(|c| c as u16)
}

/// The `grpc-status` in these headers (a trailers-only answer's, or trailers'); a value that
/// is not a number counts as 2 (UNKNOWN).
pub fn status_in(headers: &HeaderMap) -> Option<u16> {
    let v = crate::message::headers::find(headers, &GRPC_STATUS)?;
    Some(v.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(2))
}

/// The label of a status other than OK; `None` for OK.
pub fn failure_label(code: u16) -> Option<&'static str> {
    match code {
        0 => None,
        c => Some(LABELS.get(usize::from(c)).copied().unwrap_or("grpc-unknown")),
    }
}
