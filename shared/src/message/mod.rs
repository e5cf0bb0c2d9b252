//! HTTP messages as the proxies handle them: bodies, headers, paths, and the errors a proxy
//! answers with itself.

pub mod body;
pub mod error;
pub mod grpc;
pub mod headers;
pub mod path;
pub mod respond;
pub mod wire;
