//! Gateway routes: host and path-prefix matching, then a weighted choice of backend.
//! Socket-free so it is unit-tested without I/O. (The full HTTPRoute model replaces this with
//! the traffic-management work; the shape of `RouteTable::find` stays.)

use quicmesh_shared::config::{BackendRef, GatewayRoute};

pub struct RouteTable {
    routes: Vec<GatewayRoute>,
}

fn host_matches(patterns: &[String], host: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => {
                // `host` comes lowercased; patterns are compared case-insensitively too.
                let suffix = suffix.to_ascii_lowercase();
                host.len() > suffix.len() + 1
                    && host.ends_with(&suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => p.eq_ignore_ascii_case(host),
        })
}

/// Prefix match on whole path segments: `/a` matches `/a`, `/a/` and `/a/b`, never `/ab`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl RouteTable {
    pub fn new(routes: Vec<GatewayRoute>) -> Self {
        Self { routes }
    }

    /// The route for host and path: exact host before wildcard before any, then longest prefix.
    pub fn find(&self, host: &str, path: &str) -> Option<&GatewayRoute> {
        let host_rank = |r: &GatewayRoute| {
            if r.hostnames.is_empty() {
                0
            } else if r.hostnames.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                2
            } else {
                1
            }
        };
        self.routes
            .iter()
            .filter(|r| host_matches(&r.hostnames, host) && prefix_matches(&r.path_prefix, path))
            .max_by_key(|r| (host_rank(r), r.path_prefix.trim_end_matches('/').len()))
    }
}

/// Chooses a backend with probability weight / total; `roll` is uniform in `0..total`.
pub fn pick_backend(backends: &[BackendRef], roll: u64) -> Option<&BackendRef> {
    let mut acc = 0u64;
    for b in backends {
        acc += u64::from(b.weight);
        if roll < acc {
            return Some(b);
        }
    }
    None
}

pub fn total_weight(backends: &[BackendRef]) -> u64 {
    backends.iter().map(|b| u64::from(b.weight)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], prefix: &str) -> GatewayRoute {
        GatewayRoute {
            name: name.into(),
            hostnames: hosts.iter().map(|s| s.to_string()).collect(),
            path_prefix: prefix.into(),
            backends: vec![BackendRef { service: "s".into(), labels: Default::default(), weight: 1 }],
            max_request_body: 1,
        }
    }

    #[test]
    fn longest_segment_prefix_and_most_specific_host_win() {
        let t = RouteTable::new(vec![
            route("root", &[], "/"),
            route("hello", &[], "/hello"),
            route("hello-v", &[], "/hello/v2"),
            route("wild", &["*.example.com"], "/"),
            route("exact", &["api.example.com"], "/"),
        ]);
        let name = |h, p| t.find(h, p).map(|r| r.name.as_str());
        assert_eq!(name("x", "/hello"), Some("hello"));
        assert_eq!(name("x", "/hello/"), Some("hello"));
        assert_eq!(name("x", "/helloo"), Some("root"));
        assert_eq!(name("x", "/hello/v2/x"), Some("hello-v"));
        assert_eq!(name("a.example.com", "/hello"), Some("wild"));
        assert_eq!(name("api.example.com", "/"), Some("exact"));
        assert_eq!(name("example.com", "/"), Some("root"));
    }

    #[test]
    fn weights_split_exactly_and_zero_never_wins() {
        let b = |w| BackendRef { service: "s".into(), labels: Default::default(), weight: w };
        let backends = vec![b(90), b(0), b(10)];
        let total = total_weight(&backends);
        let mut counts = [0; 3];
        for roll in 0..total {
            let chosen = pick_backend(&backends, roll).unwrap();
            counts[backends.iter().position(|x| std::ptr::eq(x, chosen)).unwrap()] += 1;
        }
        assert_eq!(counts, [90, 0, 10]);
    }
}
