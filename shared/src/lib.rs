//! quicmesh-shared: what both the gateway and the node use: the config model, identities and
//! the CA, mesh TLS, QUIC transport settings, the peer connection pool, the mesh client,
//! bodies, headers, proxy errors, metrics and the admin server.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod authz;
pub mod balance;
pub mod body;
pub mod certwatch;
pub mod config;
pub mod control;
pub mod drain;
pub mod enroll;
pub mod error;
pub mod headers;
pub mod health;
pub mod identity;
pub mod limit;
pub mod mesh;
pub mod metrics;
pub mod overlay;
pub mod path;
pub mod pipeline;
pub mod pool;
pub mod retry;
pub mod route;
pub mod telemetry;
pub mod tls;
pub mod transport;
