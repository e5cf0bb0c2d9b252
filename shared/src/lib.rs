//! quicmesh-shared: what both the gateway and the node use, grouped by role. Lower folders never
//! import higher ones (ARCHITECTURE.md has the map):
//!
//! - [`message`]: HTTP bodies, headers, paths and the errors a proxy answers with;
//! - [`policy`]: what config says a request may do: routes, balancing, retries, limits, health,
//!   authorization (pure rules, no I/O);
//! - [`config`]: the config model, its layers and validation;
//! - [`identity`]: SPIFFE identities, the mesh CA and mutual TLS;
//! - [`telemetry`]: metric names, the access log and the per-request record;
//! - [`transport`]: QUIC endpoint settings, connection admission, the peer pool, certificate
//!   reloads;
//! - [`control`]: the control-plane protocol (snapshots, registrations) and enrollment tokens;
//! - [`proxy`]: the compiled snapshot, the mesh client and the request pipeline;
//! - [`admin`]: the admin HTTP server.
#![forbid(unsafe_code)]

pub mod admin;

/// A map looked up on every request by keys the configuration chose (service and node names,
/// metric labels): hashed with foldhash, seeded per process, rather than SipHash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod config;
pub mod control;
pub mod identity;
pub mod message;
pub mod policy;
pub mod proxy;
pub mod runtime;
pub mod telemetry;
pub mod transport;
