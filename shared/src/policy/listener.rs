//! Gateway API listeners without sockets: which listener of a port a request belongs to (by
//! its Host) or a TLS connection (by its server name), which routes attach to which listener
//! (`parentRefs`, the kinds a listener allows, hostname intersection), and each listener's own
//! route table, so a request only ever meets the routes of its listener (listener isolation).
//!
//! Selection among the listeners of one port follows the spec: a listener whose hostname is
//! the host exactly, else the one with the longest wildcard covering it, else one without a
//! hostname. A route's hostnames are intersected with its listener's: the listener's wildcard
//! keeps the route's names under it, a route wildcard covering the listener's name narrows to
//! that name, and a route with no hostnames takes the listener's.

use serde::{Deserialize, Serialize};

use crate::policy::route::{HttpRoute, RouteTable};

/// A listener's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Protocol {
    /// Plain HTTP/1.1 (and HTTP/2 with prior knowledge).
    #[serde(rename = "HTTP")]
    Http,
    /// TLS terminated here: HTTP/1.1 and HTTP/2 over TCP, HTTP/3 over QUIC on the same port.
    #[serde(rename = "HTTPS")]
    Https,
    /// TLS by server name: passed through untouched, or terminated with the bytes inside
    /// carried as TCP (`tls_mode`).
    #[serde(rename = "TLS")]
    Tls,
    /// Opaque TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
        }
    }
}

/// The kinds of route a listener takes (the spec's `allowedRoutes.kinds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "TLSRoute")]
    Tls,
    #[serde(rename = "TCPRoute")]
    Tcp,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Tls => "TLSRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }

    /// The kinds a listener of `protocol` can carry at all (its default `allowed_routes`).
    pub fn supported_by(protocol: Protocol, terminate: bool) -> &'static [RouteKind] {
        match protocol {
            Protocol::Http | Protocol::Https => &[RouteKind::Http],
            Protocol::Tls if terminate => &[RouteKind::Tls, RouteKind::Tcp],
            Protocol::Tls => &[RouteKind::Tls],
            Protocol::Tcp => &[RouteKind::Tcp],
        }
    }
}

/// What a `parentRef` names: the gateway itself or one of its listener sets (gateway routes),
/// or a service (mesh routes, as GAMMA attaches routes to a Service).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ParentKind {
    #[default]
    Gateway,
    ListenerSet,
    Service,
}

/// A route's `parentRefs` entry: which listeners it attaches to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default)]
    pub kind: ParentKind,
    /// The gateway's `gateway.name`, or a listener set's name; unset, this gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// One listener, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// The listeners on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A TLSRoute or TCPRoute: connections go to one of `backendRefs`, weighted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamRoute {
    /// The route's name, in messages (a route that attaches to no listener is named in a
    /// warning).
    pub name: String,
    /// TLSRoute: server names (exact or `*.suffix`); empty takes the listener's.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The listeners it attaches to; none: every listener taking its kind.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// The `protocol = "tcp"` services connections go to, one picked per connection by
    /// `weight` (at least one; every weight 0: the connection is closed).
    pub backend_refs: Vec<StreamBackend>,
}

/// A `protocol = "tcp"` service a stream route sends connections to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamBackend {
    /// Service name.
    pub name: String,
    /// Its share of the connections, relative to the other backends' weights; 0: none.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// What attachment and selection need of one listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSpec {
    pub name: String,
    /// The listener set it belongs to; `None` for the gateway's own listeners.
    pub set: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// Lowercase; exact or `*.suffix`.
    pub hostname: Option<String>,
    /// Kinds of route it takes.
    pub kinds: Vec<RouteKind>,
    /// A TLS listener that terminates (the rest of the bytes are TCP).
    pub terminate: bool,
}

/// One listener with what attached to it.
pub struct Compiled {
    pub spec: ListenerSpec,
    /// Its HTTP routes, hostnames intersected with the listener's.
    pub routes: RouteTable,
    /// Its TLS or TCP routes, hostnames intersected, in config order.
    pub streams: Vec<StreamRoute>,
}

/// Every listener of the gateway, compiled.
pub struct Listeners {
    list: Vec<Compiled>,
}

/// Whether `host` (a request's host or a TLS server name, lowercase) falls under `pattern`:
/// equal, or under a `*.suffix` wildcard by one label or more. A wildcard host falls under a
/// wildcard whose suffix it extends.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            let host = host.strip_prefix('*').filter(|h| h.starts_with('.')).unwrap_or(host);
            host.len() > suffix.len() && host.ends_with(suffix)
        }
        _ => pattern == host,
    }
}

/// How well a listener of `hostname` takes `host`: `None` if not at all; higher is more
/// specific (see [`Listeners::select`]).
pub fn rank(hostname: Option<&str>, host: &str) -> Option<(u8, usize)> {
    match hostname {
        Some(h) if !host_matches(h, host) => None,
        h => Some(specificity(h)),
    }
}

/// Ranks a listener hostname for a host it matches: exact first, then the longest wildcard,
/// then none.
fn specificity(hostname: Option<&str>) -> (u8, usize) {
    match hostname {
        None => (0, 0),
        Some(h) if h.starts_with("*.") => (1, h.len()),
        Some(h) => (2, h.len()),
    }
}

/// The hostnames a route keeps on a listener of hostname `listener`; `None` when they do not
/// meet (the route does not attach there).
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(l) = listener else { return Some(route.to_vec()) };
    if route.is_empty() {
        return Some(vec![l.to_string()]);
    }
    let mut kept: Vec<String> = Vec::new();
    for r in route {
        let r = r.to_ascii_lowercase();
        let narrowed = if host_matches(l, &r) {
            r
        } else if host_matches(&r, l) {
            l.to_string()
        } else {
            continue;
        };
        if !kept.contains(&narrowed) {
            kept.push(narrowed);
        }
    }
    (!kept.is_empty()).then_some(kept)
}

/// A listener hostname: letters, digits, '-' and '.' in labels, optionally `*.` in front; not an
/// IP address.
fn valid_hostname(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A listener or section name, as the spec's SectionName.
pub fn valid_section_name(name: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge(name.as_bytes().first())
        && edge(name.as_bytes().last())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Whether `parent` (on a route of `kind`) takes listener `l` of gateway `gateway`.
fn refers_to(parent: &ParentRef, gateway: &str, l: &ListenerSpec) -> bool {
    let owner_ok = match parent.kind {
        ParentKind::Gateway => l.set.is_none() && parent.name.as_deref().is_none_or(|n| n == gateway),
        ParentKind::ListenerSet => l.set.is_some() && parent.name.as_deref() == l.set.as_deref(),
        ParentKind::Service => false,
    };
    owner_ok && parent.section_name.as_deref().is_none_or(|s| s == l.name) && parent.port.is_none_or(|p| p == l.port)
}

/// Whether a route with `parents` attaches to `l` (before hostnames): a route without
/// parentRefs attaches to every listener of the gateway and of its sets.
fn attaches(parents: &[ParentRef], gateway: &str, l: &ListenerSpec) -> bool {
    parents.is_empty() || parents.iter().any(|p| refers_to(p, gateway, l))
}

impl Listeners {
    /// Checks the listeners and attaches the routes. Errors are listeners that cannot work
    /// together; the warnings are routes that attach nowhere (as a route's `Accepted: False`).
    pub fn compile(
        gateway: &str,
        specs: Vec<ListenerSpec>,
        http: &[HttpRoute],
        tls: &[StreamRoute],
        tcp: &[StreamRoute],
    ) -> Result<(Self, Vec<String>), String> {
        check(&specs)?;
        let mut warnings = Vec::new();
        let mut list = Vec::with_capacity(specs.len());
        let mut http_attached = vec![false; http.len()];
        let mut tls_attached = vec![false; tls.len()];
        let mut tcp_attached = vec![false; tcp.len()];
        for spec in specs {
            let host = spec.hostname.as_deref();
            let mut routes = Vec::new();
            if spec.kinds.contains(&RouteKind::Http) {
                for (i, r) in http.iter().enumerate() {
                    if !attaches(&r.parent_refs, gateway, &spec) {
                        continue;
                    }
                    if let Some(hostnames) = intersect(host, &r.hostnames) {
                        http_attached[i] = true;
                        routes.push(HttpRoute { hostnames, ..r.clone() });
                    }
                }
            }
            let mut streams = Vec::new();
            for (kind, list, attached) in
                [(RouteKind::Tls, tls, &mut tls_attached), (RouteKind::Tcp, tcp, &mut tcp_attached)]
            {
                if !spec.kinds.contains(&kind) {
                    continue;
                }
                for (i, r) in list.iter().enumerate() {
                    if !attaches(&r.parent_refs, gateway, &spec) {
                        continue;
                    }
                    // A TCPRoute has no hostnames: it takes the whole listener.
                    let hostnames =
                        if kind == RouteKind::Tcp { Some(Vec::new()) } else { intersect(host, &r.hostnames) };
                    if let Some(hostnames) = hostnames {
                        attached[i] = true;
                        streams.push(StreamRoute { hostnames, ..r.clone() });
                    }
                }
            }
            let routes = RouteTable::new(routes).map_err(|e| e.to_string())?;
            list.push(Compiled { spec, routes, streams });
        }
        for (kind, names) in [
            ("gateway.routes", http.iter().map(|r| &r.name).zip(http_attached).collect::<Vec<_>>()),
            ("gateway.tls_routes", tls.iter().map(|r| &r.name).zip(tls_attached).collect()),
            ("gateway.tcp_routes", tcp.iter().map(|r| &r.name).zip(tcp_attached).collect()),
        ] {
            for (name, attached) in names {
                if !attached {
                    warnings.push(format!(
                        "{kind}: route {name:?} attaches to no listener (no listener its parentRefs name takes \
                         its kind, or no hostname in common); it serves nothing"
                    ));
                }
            }
        }
        Ok((Self { list }, warnings))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Compiled> {
        self.list.iter()
    }

    /// The listener of `port` a request for `host` belongs to (lowercase, without port).
    pub fn select(&self, port: u16, host: &str) -> Option<&Compiled> {
        self.list
            .iter()
            .filter(|l| l.spec.port == port && l.spec.hostname.as_deref().is_none_or(|h| host_matches(h, host)))
            .max_by_key(|l| specificity(l.spec.hostname.as_deref()))
    }

    /// Whether two compiles attach the same routes to the same listeners (a reload that
    /// changed other parts keeps the routes' rate limiters).
    pub fn same_as(&self, other: &Listeners) -> bool {
        self.list.len() == other.list.len()
            && self
                .list
                .iter()
                .zip(&other.list)
                .all(|(a, b)| a.spec == b.spec && a.streams == b.streams && a.routes.routes() == b.routes.routes())
    }
}

impl Compiled {
    /// The stream route for a connection with TLS server name `sni` (TLSRoute: the most
    /// specific hostname; TCPRoute: the first attached).
    pub fn stream_route(&self, sni: Option<&str>) -> Option<&StreamRoute> {
        let rank = |r: &StreamRoute| -> Option<(u8, usize)> {
            if r.hostnames.is_empty() {
                return Some((0, 0));
            }
            let sni = sni?;
            r.hostnames.iter().filter(|h| host_matches(h, sni)).map(|h| specificity(Some(h))).max()
        };
        let mut best: Option<(&StreamRoute, (u8, usize))> = None;
        for r in &self.streams {
            if let Some(k) = rank(r) {
                if best.is_none_or(|(_, b)| k > b) {
                    best = Some((r, k));
                }
            }
        }
        best.map(|(r, _)| r)
    }
}

impl StreamRoute {
    /// A backend for one connection, by weight; `None` when every weight is 0.
    pub fn pick(&self) -> Option<&str> {
        let total: u64 = self.backend_refs.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = fastrand::u64(0..total);
        for b in &self.backend_refs {
            if at < u64::from(b.weight) {
                return Some(&b.name);
            }
            at -= u64::from(b.weight);
        }
        None
    }
}

/// Listeners that cannot be served together: bad names or hostnames, two of one name, one
/// port asked to speak plain HTTP or TCP and something else, two listeners of a port that
/// would take the same host.
fn check(specs: &[ListenerSpec]) -> Result<(), String> {
    for (i, l) in specs.iter().enumerate() {
        let who = match &l.set {
            Some(set) => format!("listener {:?} of listener set {set:?}", l.name),
            None => format!("listener {:?}", l.name),
        };
        if !valid_section_name(&l.name) {
            return Err(format!("{who}: the name must be lowercase letters, digits, '-' and '.'"));
        }
        if let Some(h) = &l.hostname {
            if !valid_hostname(h) {
                return Err(format!("{who}: hostname {h:?} is not a DNS name or *.suffix"));
            }
            if l.protocol == Protocol::Tcp {
                return Err(format!("{who}: a TCP listener takes no hostname"));
            }
        }
        let supported = RouteKind::supported_by(l.protocol, l.terminate);
        if let Some(k) = l.kinds.iter().find(|k| !supported.contains(k)) {
            return Err(format!("{who}: a {} listener cannot take {}", l.protocol.as_str(), k.as_str()));
        }
        for other in &specs[..i] {
            if other.name == l.name && other.set == l.set {
                return Err(format!("{who}: two listeners have this name"));
            }
            if other.port != l.port {
                continue;
            }
            let tls_family = |p: Protocol| matches!(p, Protocol::Https | Protocol::Tls);
            if other.protocol != l.protocol && !(tls_family(other.protocol) && tls_family(l.protocol)) {
                return Err(format!(
                    "{who}: port {} already speaks {} (listener {:?})",
                    l.port,
                    other.protocol.as_str(),
                    other.name
                ));
            }
            if l.protocol == Protocol::Tcp {
                return Err(format!("{who}: port {} already has a TCP listener ({:?})", l.port, other.name));
            }
            if other.hostname == l.hostname {
                return Err(format!(
                    "{who}: listener {:?} already takes {} on port {}",
                    other.name,
                    l.hostname.as_deref().unwrap_or("every host"),
                    l.port
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, hostname: Option<&str>) -> ListenerSpec {
        ListenerSpec {
            name: name.into(),
            set: None,
            port: 80,
            protocol: Protocol::Http,
            hostname: hostname.map(Into::into),
            kinds: vec![RouteKind::Http],
            terminate: false,
        }
    }

    #[test]
    fn hostnames_intersect_as_the_spec_says() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect(None, &v(&["a.com"])), Some(v(&["a.com"])));
        assert_eq!(intersect(Some("*.example.com"), &[]), Some(v(&["*.example.com"])));
        assert_eq!(intersect(Some("*.example.com"), &v(&["foo.example.com", "x.org"])), Some(v(&["foo.example.com"])));
        assert_eq!(intersect(Some("foo.example.com"), &v(&["*.example.com"])), Some(v(&["foo.example.com"])));
        assert_eq!(intersect(Some("*.example.com"), &v(&["*.foo.example.com"])), Some(v(&["*.foo.example.com"])));
        assert_eq!(intersect(Some("*.foo.example.com"), &v(&["*.example.com"])), Some(v(&["*.foo.example.com"])));
        assert_eq!(intersect(Some("*.example.com"), &v(&["*.example.com"])), Some(v(&["*.example.com"])));
        assert_eq!(intersect(Some("a.com"), &v(&["b.com"])), None);
        assert_eq!(intersect(Some("*.example.com"), &v(&["example.com"])), None, "a wildcard needs a label");
    }

    #[test]
    fn the_most_specific_listener_of_a_port_takes_the_host() {
        let specs = vec![
            spec("empty", None),
            spec("wild", Some("*.example.com")),
            spec("foo", Some("*.foo.example.com")),
            spec("abc", Some("abc.foo.example.com")),
        ];
        let (ls, warnings) = Listeners::compile("gw", specs, &[], &[], &[]).unwrap();
        assert!(warnings.is_empty());
        let name = |host: &str| ls.select(80, host).map(|l| l.spec.name.clone());
        assert_eq!(name("bar.com").as_deref(), Some("empty"));
        assert_eq!(name("bar.example.com").as_deref(), Some("wild"));
        assert_eq!(name("bar.foo.example.com").as_deref(), Some("foo"));
        assert_eq!(name("abc.foo.example.com").as_deref(), Some("abc"));
        assert!(ls.select(81, "bar.com").is_none(), "another port has no listener");
    }

    #[test]
    fn listeners_that_cannot_share_a_port_are_refused() {
        let mut https = spec("b", None);
        https.protocol = Protocol::Https;
        let err = Listeners::compile("gw", vec![spec("a", None), https], &[], &[], &[]).err().unwrap();
        assert!(err.contains("already speaks HTTP"), "{err}");
        let err = Listeners::compile("gw", vec![spec("a", Some("x.com")), spec("b", Some("x.com"))], &[], &[], &[])
            .err()
            .unwrap();
        assert!(err.contains("already takes x.com"), "{err}");
        let err =
            Listeners::compile("gw", vec![spec("a", None), spec("a", Some("y.com"))], &[], &[], &[]).err().unwrap();
        assert!(err.contains("two listeners have this name"), "{err}");
        let err = Listeners::compile("gw", vec![spec("a", Some("10.0.0.1"))], &[], &[], &[]).err().unwrap();
        assert!(err.contains("not a DNS name"), "{err}");
        let mut tls = spec("t", None);
        tls.protocol = Protocol::Tls;
        tls.kinds = vec![RouteKind::Http];
        let err = Listeners::compile("gw", vec![tls], &[], &[], &[]).err().unwrap();
        assert!(err.contains("cannot take HTTPRoute"), "{err}");
    }

    #[test]
    fn tls_routes_pick_by_server_name_and_weight() {
        let route = |name: &str, hosts: &[&str], backend: &str| StreamRoute {
            name: name.into(),
            hostnames: hosts.iter().map(|h| h.to_string()).collect(),
            parent_refs: Vec::new(),
            backend_refs: vec![StreamBackend { name: backend.into(), weight: 1 }],
        };
        let mut l = spec("tls", Some("*.example.com"));
        l.protocol = Protocol::Tls;
        l.kinds = vec![RouteKind::Tls];
        let routes =
            [route("wide", &[], "a"), route("narrow", &["db.example.com"], "b"), route("off", &["x.org"], "c")];
        let (ls, warnings) = Listeners::compile("gw", vec![l], &[], &routes, &[]).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("\"off\""));
        let l = ls.select(80, "db.example.com").unwrap();
        assert_eq!(l.stream_route(Some("db.example.com")).unwrap().name, "narrow");
        assert_eq!(l.stream_route(Some("web.example.com")).unwrap().name, "wide");
        let zero =
            StreamRoute { backend_refs: vec![StreamBackend { name: "a".into(), weight: 0 }], ..route("z", &[], "a") };
        assert_eq!(zero.pick(), None);
    }
}
