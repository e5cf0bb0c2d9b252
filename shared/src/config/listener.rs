//! `[[gateway.listeners]]` and `[[gateway.listener_sets]]`: the Gateway API's Listener and
//! ListenerSet as config. What they mean for requests is `policy::listener`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{EdgeCertificate, GatewayConfig};
use crate::policy::listener::{ListenerSpec, Protocol, RouteKind};

/// What a gateway port was set up with at start (see [`GatewayConfig::sockets`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PortSetup {
    pub port: u16,
    pub at: SocketAddr,
    pub protocols: Vec<Protocol>,
    /// The listeners' own certificates.
    pub certificates: Vec<EdgeCertificate>,
    /// The hostnames of the listeners that terminate TLS on the port (sorted).
    pub terminating: Vec<Option<String>>,
    /// `gateway.certificates`, served where a listener has none of its own.
    pub defaults: Vec<EdgeCertificate>,
}

impl PortSetup {
    /// What differs between two setups of the gateway's ports, in words; `None` when nothing does.
    pub fn changed(before: &[PortSetup], after: &[PortSetup]) -> Option<String> {
        if before == after {
            return None;
        }
        let ports = |s: &[PortSetup]| s.iter().map(|p| (p.port, p.at)).collect::<Vec<_>>();
        if ports(before) != ports(after) {
            return Some("the ports or addresses listened on".into());
        }
        for (b, a) in before.iter().zip(after) {
            let what = if b.protocols != a.protocols {
                "its protocols"
            } else if b.certificates != a.certificates {
                "its listeners' certificate files"
            } else if b.terminating.len() != a.terminating.len() {
                "which of its listeners terminate TLS (a TLS listener's tls_mode)"
            } else if b.terminating != a.terminating {
                "the hostname of a listener that terminates TLS (its certificates are chosen by it)"
            } else {
                "gateway.certificates"
            };
            if b != a {
                return Some(format!("port {}: {what}", a.port));
            }
        }
        Some("the listeners".into())
    }
}

/// One listener of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique among the gateway's listeners (or its set's); routes name it as `sectionName`.
    pub name: String,
    /// The port clients reach: what a route's `parentRefs` port and redirects name.
    /// Read at start: a reload that changes it is refused.
    pub port: u16,
    /// Where to bind; default `gateway.listen`'s address with `port`. Listeners of one port
    /// share one socket (HTTPS: TCP and UDP), so at most one address per port.
    /// Read at start: a reload that changes it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Read at start: a reload that changes it is refused.
    pub protocol: Protocol,
    /// Exact or `*.suffix`; unset, every host not taken by a more specific listener of the port.
    /// A reload may change it, except on a listener that terminates TLS (HTTPS, TLS in
    /// `Terminate` mode), whose certificates are chosen by it: there a change is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// HTTPS and terminating TLS listeners: certificates served for this listener's names
    /// (by SNI); default `gateway.certificates`.
    /// Read at start: a reload that changes it is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<EdgeCertificate>,
    /// TLS listeners: `Passthrough` (default; the gateway never decrypts) or `Terminate`.
    /// Read at start: a reload that changes it is refused.
    #[serde(default)]
    pub tls_mode: TlsMode,
    /// Route kinds it takes; default every kind its protocol carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<Vec<RouteKind>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum TlsMode {
    #[default]
    Passthrough,
    Terminate,
}

/// Listeners a team adds to the gateway without editing its own list; routes attach to them
/// with `parentRefs = [{ kind = "ListenerSet", name = ... }]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerSet {
    /// Unique among the sets (lowercase letters, digits, `-` and `.`); routes attach with
    /// `parentRefs = [{ kind = "ListenerSet", name = ... }]`, and the ready line prints its
    /// listeners as `listener.SET/NAME`.
    pub name: String,
    /// Its listeners, each as a `gateway.listeners` entry.
    pub listeners: Vec<Listener>,
}

/// The name of the listener a gateway without `listeners` has: `gateway.listen`, HTTPS.
pub const DEFAULT_LISTENER: &str = "default";

impl Listener {
    pub fn spec(&self, set: Option<&str>) -> ListenerSpec {
        let terminate = self.protocol == Protocol::Tls && self.tls_mode == TlsMode::Terminate;
        ListenerSpec {
            name: self.name.clone(),
            set: set.map(Into::into),
            port: self.port,
            protocol: self.protocol,
            hostname: self.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
            kinds: self
                .allowed_routes
                .clone()
                .unwrap_or_else(|| RouteKind::supported_by(self.protocol, terminate).to_vec()),
            terminate,
        }
    }

    /// Whether it terminates TLS (HTTPS, or TLS in `Terminate` mode).
    pub fn terminates(&self) -> bool {
        self.protocol == Protocol::Https || (self.protocol == Protocol::Tls && self.tls_mode == TlsMode::Terminate)
    }
}

impl GatewayConfig {
    /// Every listener with the set it belongs to; without `listeners` and `listener_sets`, the
    /// one HTTPS listener on `gateway.listen` named [`DEFAULT_LISTENER`].
    pub fn all_listeners(&self) -> Vec<(Option<&str>, std::borrow::Cow<'_, Listener>)> {
        if self.listeners.is_empty() && self.listener_sets.is_empty() {
            let implicit = Listener {
                name: DEFAULT_LISTENER.into(),
                port: self.listen.port(),
                listen: Some(self.listen),
                protocol: Protocol::Https,
                hostname: None,
                certificates: Vec::new(),
                tls_mode: TlsMode::Passthrough,
                allowed_routes: None,
            };
            return vec![(None, std::borrow::Cow::Owned(implicit))];
        }
        let own = self.listeners.iter().map(|l| (None, std::borrow::Cow::Borrowed(l)));
        let sets = self
            .listener_sets
            .iter()
            .flat_map(|s| s.listeners.iter().map(move |l| (Some(s.name.as_str()), std::borrow::Cow::Borrowed(l))));
        own.chain(sets).collect()
    }

    /// The edge's routes: `routes`, then what `grpc_routes` compile to.
    pub fn edge_routes(&self) -> Result<Vec<crate::policy::route::HttpRoute>, String> {
        crate::policy::grpc_route::with_grpc(&self.routes, &self.grpc_routes)
    }

    /// The listeners as attachment sees them.
    pub fn listener_specs(&self) -> Vec<ListenerSpec> {
        self.all_listeners().iter().map(|(set, l)| l.spec(*set)).collect()
    }

    /// What the gateway sets up at start: per port, its address, its listeners' protocols and
    /// certificates, and the server names of the listeners that terminate TLS there (their
    /// certificates are chosen by those names, and an HTTPS listener without certificates has
    /// them ordered over ACME). A reload that changes this needs a restart.
    pub fn sockets(&self) -> Vec<PortSetup> {
        let mut binds = self.listener_binds().unwrap_or_default();
        // The order listeners are written in changes nothing that is bound.
        binds.sort();
        let all = self.all_listeners();
        binds
            .into_iter()
            .map(|(port, at)| {
                let on = all.iter().filter(|(_, l)| l.port == port);
                let mut protocols: Vec<Protocol> = on.clone().map(|(_, l)| l.protocol).collect();
                protocols.sort_by_key(|p| p.as_str());
                protocols.dedup();
                let certificates = on.clone().flat_map(|(_, l)| l.certificates.clone()).collect();
                // By hostname only: certificates are chosen by it, not by a listener's name.
                let mut terminating: Vec<Option<String>> = on
                    .filter(|(_, l)| l.terminates())
                    .map(|(_, l)| l.hostname.as_ref().map(|h| h.to_ascii_lowercase()))
                    .collect();
                terminating.sort();
                let defaults = if terminating.is_empty() { Vec::new() } else { self.certificates.clone() };
                PortSetup { port, at, protocols, certificates, terminating, defaults }
            })
            .collect()
    }

    /// Where each port's socket binds: (port, address), in first-listed order; one address
    /// per port, or the listener that disagrees.
    pub fn listener_binds(&self) -> Result<Vec<(u16, SocketAddr)>, String> {
        let mut out: Vec<(u16, Option<SocketAddr>)> = Vec::new();
        for (_, l) in self.all_listeners() {
            match out.iter_mut().find(|(p, _)| *p == l.port) {
                Some((_, at)) => match (*at, l.listen) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(format!("listener {:?}: port {} already binds {a}, not {b}", l.name, l.port))
                    }
                    (None, Some(b)) => *at = Some(b),
                    _ => {}
                },
                None => out.push((l.port, l.listen)),
            }
        }
        let ip = self.listen.ip();
        Ok(out.into_iter().map(|(p, at)| (p, at.unwrap_or(SocketAddr::new(ip, p)))).collect())
    }
}
