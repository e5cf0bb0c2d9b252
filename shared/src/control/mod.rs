//! The control protocol between nodes and the gateway, and the snapshot both sides agree on.
//!
//! A node holds one HTTP/3 request stream open on its mutual-TLS QUIC connection to the gateway
//! (`POST /quicmesh.control/v1/stream`, as xDS holds one gRPC stream): it sends JSON lines
//! ([`NodeMsg`]: hello with its registration, ack/nack per snapshot, goodbye) and receives JSON
//! lines ([`GatewayMsg`]: a whole versioned snapshot first, then deltas from the version sent
//! before, see [`delta`], to nodes that say they take them). A node holding another version
//! than a delta starts from asks for the whole snapshot again (`Resync`), so a node that missed
//! nothing and one that missed everything end up with the same state.

pub mod delta;
pub mod enroll;

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::config::{Config, EndpointConfig, PeerConfig, ServiceConfig, Timeouts};
use crate::message::body::{H3Recv, H3Send};

/// The control protocol this release speaks, sent in every hello:
/// - 1: whole snapshots only (the hello has no `protocol` field);
/// - 2: deltas after the first snapshot, and `resync`.
///
/// A gateway speaks each node's version, so it serves nodes a release behind: upgrade the
/// gateway first, then the nodes. Messages refuse fields they do not know, so a gateway must
/// never send a node more than its version reads (`tests/fixtures/control/` pins version 1).
pub const PROTOCOL: u32 = 2;
/// The first protocol version that carries deltas.
pub const PROTOCOL_DELTAS: u32 = 2;

/// Request header of a control stream: the [`Snapshot::digest`] of what the node holds. A node
/// that fails over to another gateway replica holds a version that replica never numbered; when
/// the contents match, the replica sends a delta that only renumbers, not the whole snapshot.
/// A header, not a hello field, so gateways of the previous release ignore it.
pub const HELD_DIGEST_HEADER: &str = "quicmesh-held-digest";

fn first_protocol() -> u32 {
    1
}

/// Path of the control stream.
pub const STREAM_PATH: &str = "/quicmesh.control/v1/stream";
/// Longest accepted message line; a peer sending more is cut off.
pub const MAX_LINE: usize = 64 << 20;
/// Longest line the gateway accepts from a node (a registration of thousands of instances fits).
pub const MAX_NODE_LINE: usize = 4 << 20;

pub use crate::config::Instance;

/// Node to gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NodeMsg {
    /// Sent first: where peers reach this node, what it hosts, which snapshot it runs.
    Hello {
        address: SocketAddr,
        instances: Vec<Instance>,
        version: u64,
        /// The node's admin listener (for `quicmesh top`); older nodes do not send it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin: Option<SocketAddr>,
        /// The protocol version the node speaks ([`PROTOCOL`]); absent in version 1's hello.
        #[serde(default = "first_protocol")]
        protocol: u32,
    },
    /// A delta did not start from the snapshot this node holds (`held`): send the whole one.
    Resync { held: u64 },
    /// The snapshot of this version is applied.
    Ack { version: u64 },
    /// The snapshot of this version was refused; the node keeps its previous one.
    Nack { version: u64, reason: String },
    /// Clean shutdown (or drain): remove this node's endpoints now.
    Goodbye,
    /// The whole set of this node's instances whose health check fails, as (service, address);
    /// sent whenever it changes.
    Health { unhealthy: Vec<(String, SocketAddr)> },
    /// A certificate signing request for a fresh key, before the current certificate expires.
    Renew { csr: String },
}

/// Gateway to node: `{"snapshot": {...}}`. Externally tagged on purpose: an internally tagged
/// enum makes serde buffer the whole message before decoding it, which tripled the cost of
/// applying a 1 MB snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum GatewayMsg {
    Snapshot(Snapshot),
    /// What changed since the snapshot of `from` (only to nodes that said they take deltas).
    Delta(delta::Delta),
    /// The answer to `Renew`: a certificate (PEM) for the key the node just made.
    Certificate {
        certificate: String,
    },
    /// The answer to `Renew` when the gateway will not sign; the node tries again later.
    RenewRefused {
        reason: String,
    },
}

/// Everything a node needs to route: versioned, complete.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u64,
    pub nodes: Vec<PeerConfig>,
    pub services: Vec<ServiceConfig>,
    pub timeouts: Timeouts,
    /// Mesh routes (HTTPRoute model).
    #[serde(default)]
    pub routes: Vec<crate::policy::route::HttpRoute>,
    /// Authorization policies.
    #[serde(default)]
    pub authorization: crate::policy::authz::AuthzConfig,
    /// Revoked members: refuse them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

impl Snapshot {
    /// The config a node runs with this snapshot: its own local sections, the mesh from here.
    /// The top-level config keys a snapshot replaces on a node (see [`Snapshot::into_config`]).
    pub const KEYS: &'static [&'static str] = &["nodes", "services", "timeouts", "routes", "authorization", "revoked"];

    /// SHA-256 (hex) of the contents, the version left out and services and members in name
    /// order: equal for two snapshots that route alike, whoever numbered them.
    pub fn digest(&self) -> String {
        let mut canonical = Snapshot { version: 0, ..self.clone() };
        canonical.services.sort_by(|a, b| a.name.cmp(&b.name));
        canonical.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        crate::identity::fingerprint(&bytes)
    }

    pub fn into_config(self, local: &Config) -> Config {
        // The snapshot's routes include what the mesh's gRPC routes compile to.
        let mut cfg = Config {
            services: Vec::new(),
            nodes: Vec::new(),
            routes: Vec::new(),
            grpc_routes: Vec::new(),
            ..local.clone()
        };
        cfg.nodes = self.nodes;
        cfg.services = self.services;
        cfg.timeouts = self.timeouts;
        cfg.routes = self.routes;
        cfg.authorization = self.authorization;
        cfg.revoked = self.revoked;
        cfg
    }
}

/// What the gateway knows of one registered node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub address: SocketAddr,
    pub instances: Vec<Instance>,
    /// (service, address) of the instances whose health check fails.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub unhealthy: BTreeSet<(String, SocketAddr)>,
    /// The node's admin listener, as it reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// Merges static config and registrations into the mesh state (without a version).
/// Registered instances join the service of that name, created if config does not list it.
/// Linear in config plus registrations: services, members and endpoints are found by index.
pub fn merge<'a>(config: &Config, registrations: impl IntoIterator<Item = (&'a String, &'a Registration)>) -> Snapshot {
    use std::collections::{HashMap, HashSet};
    let mut nodes: Vec<PeerConfig> = config.nodes.clone();
    let mut services: Vec<ServiceConfig> = config.services.clone();
    let mut node_at: HashMap<String, usize> = nodes.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
    let mut service_at: HashMap<String, usize> =
        services.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
    let mut listed: HashSet<(usize, String, SocketAddr)> = services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.endpoints.iter().map(move |e| (i, e.node.clone(), e.address)))
        .collect();
    for (name, reg) in registrations {
        match node_at.get(name) {
            Some(&i) => nodes[i].address = reg.address,
            None => {
                node_at.insert(name.clone(), nodes.len());
                nodes.push(PeerConfig { name: name.clone(), address: reg.address });
            }
        }
        for inst in &reg.instances {
            let healthy = !reg.unhealthy.contains(&(inst.service.clone(), inst.address));
            let ep = EndpointConfig { node: name.clone(), address: inst.address, labels: inst.labels.clone(), healthy };
            let i = match service_at.get(&inst.service) {
                Some(&i) => i,
                None => {
                    service_at.insert(inst.service.clone(), services.len());
                    services
                        .push(ServiceConfig { protocol: inst.protocol, ..ServiceConfig::named(inst.service.clone()) });
                    services.len() - 1
                }
            };
            if listed.insert((i, ep.node.clone(), ep.address)) {
                services[i].endpoints.push(ep);
            }
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Snapshot {
        version: 0,
        nodes,
        services,
        timeouts: config.timeouts.clone(),
        // Routes the config could not compile never get here: the config was validated.
        routes: config.mesh_routes().unwrap_or_else(|_| config.routes.clone()),
        authorization: config.authorization.clone(),
        revoked: config.revoked.clone(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("the stream failed: {0}")]
    Stream(#[from] crate::transport::stream::WireError),
    #[error("a message line exceeds the size limit")]
    TooLong,
    #[error("bad message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads newline-delimited JSON messages from a request stream's receive half.
pub struct LineReader<R> {
    recv: R,
    buf: BytesMut,
    limit: usize,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    done: bool,
}

impl<R: H3Recv> LineReader<R> {
    pub fn new(recv: R) -> Self {
        Self::with_limit(recv, MAX_LINE)
    }

    /// A reader refusing lines longer than `limit` bytes.
    pub fn with_limit(recv: R, limit: usize) -> Self {
        Self { recv, buf: BytesMut::new(), limit, scanned: 0, done: false }
    }

    /// The next message, or `None` at the end of the stream.
    pub async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, LineError> {
        match self.next_raw().await? {
            Some(line) => Ok(Some(serde_json::from_slice(&line)?)),
            None => Ok(None),
        }
    }

    /// The next non-empty line, without its newline, or `None` at the end of the stream.
    pub async fn next_raw(&mut self) -> Result<Option<Bytes>, LineError> {
        loop {
            if let Some(found) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let pos = self.scanned + found;
                self.scanned = 0;
                let mut line = self.buf.split_to(pos + 1).freeze();
                line.truncate(pos);
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.done {
                return Ok(None);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.limit {
                return Err(LineError::TooLong);
            }
            match poll_fn(|cx| self.recv.poll_data(cx)).await? {
                Some(data) => self.buf.extend_from_slice(&data),
                None => self.done = true,
            }
        }
    }
}

/// One message as a JSON line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Bytes, serde_json::Error> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// Writes one message as a JSON line.
pub async fn send_line<S: H3Send, T: Serialize>(send: &mut S, msg: &T) -> Result<(), LineError> {
    send.send(encode_line(msg)?).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn registrations_join_static_services_and_make_new_ones() {
        let cfg = crate::config::from_toml(
            "[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"a\"\naddress = \"127.0.0.1:80\"\n",
        )
        .unwrap();
        let mut regs = BTreeMap::new();
        let inst = |svc: &str, port| Instance {
            service: svc.into(),
            address: ([127, 0, 0, 1], port).into(),
            protocol: crate::config::Protocol::Http1,
            labels: Default::default(),
            health: None,
        };
        regs.insert(
            "b".to_string(),
            Registration {
                address: ([10, 0, 0, 2], 9).into(),
                instances: vec![inst("web", 81), inst("db", 5432)],
                unhealthy: Default::default(),
                admin: None,
            },
        );
        let snap = merge(&cfg, &regs);
        assert_eq!(snap.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let web = snap.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.endpoints.len(), 2);
        let db = snap.services.iter().find(|s| s.name == "db").unwrap();
        assert_eq!(db.endpoints[0].node, "b");
        // The merge is deterministic: same inputs, same snapshot.
        assert_eq!(merge(&cfg, &regs), snap);
        // The digest ignores the number and the order, not the contents; a node's table gives
        // back the same contents it was built from.
        let renumbered =
            Snapshot { version: 99, services: snap.services.iter().rev().cloned().collect(), ..snap.clone() };
        assert_eq!(renumbered.digest(), snap.digest());
        let table = crate::proxy::table::Table::compile(snap.clone().into_config(&Config::default()), 7).unwrap();
        assert_eq!(table.snapshot().digest(), snap.digest());
        let mut other = snap.clone();
        other.services[0].endpoints.pop();
        assert_ne!(other.digest(), snap.digest());
    }

    /// What a node of protocol version 1 (the release before deltas) sent, recorded from that
    /// release, reads as the same messages; its hello says version 1.
    #[test]
    fn the_previous_protocol_s_node_lines_are_read() {
        let text = include_str!("../../../tests/fixtures/control/v1/node.jsonl");
        let msgs: Vec<NodeMsg> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(matches!(msgs[0], NodeMsg::Hello { protocol: 1, ref instances, .. } if instances.len() == 1));
        assert!(matches!(msgs.last(), Some(NodeMsg::Goodbye)));
        assert_eq!(msgs.len(), 6);
    }

    #[test]
    fn messages_round_trip_and_unknown_fields_are_refused() {
        let line = serde_json::to_string(&NodeMsg::Nack { version: 3, reason: "x".into() }).unwrap();
        assert_eq!(line, r#"{"type":"nack","version":3,"reason":"x"}"#);
        assert!(serde_json::from_str::<NodeMsg>(r#"{"type":"ack","version":1,"extra":1}"#).is_err());
        assert!(serde_json::from_str::<NodeMsg>(r#"{"type":"launch"}"#).is_err());
    }
}
