//! Authorization between services, socket-free: who may call a service, decided on verified
//! identities (the mTLS peer node, and the calling service only when that node hosts it),
//! never on addresses. Per destination service, `deny` rules win over `allow` rules; a service
//! with `allow` rules admits only what matches one; a service without any falls back to the
//! mesh-wide default. A policy in audit mode logs and counts what it would deny and lets it pass.

use http::{HeaderMap, Method};
use serde::{Deserialize, Serialize};

/// `[authorization]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzConfig {
    /// What a service without allow rules admits: `allow` (everyone) or `deny` (no one).
    pub default: DefaultAction,
    /// Rules per destination service; every policy naming a service applies to it.
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// What the rules deny is refused (403 `denied`).
    #[default]
    Enforce,
    /// Dry run: would-be denials are logged and counted, and pass.
    Audit,
}

/// The rules of one destination service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The destination service the rules guard.
    pub service: String,
    /// `enforce` (default): what the rules deny is refused (403 `denied`); `audit`: it is
    /// logged and counted, and passes.
    #[serde(default)]
    pub mode: Mode,
    /// `deny` rules win over `allow` rules; with any `allow` rule for the service, only what
    /// matches one is admitted, and without, `authorization.default` decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Admit what the rule matches.
    Allow,
    /// Refuse what the rule matches, whatever the `allow` rules say.
    Deny,
}

/// One rule: every condition given must hold (an absent one matches anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Shown in logs; default `<service>[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `allow` or `deny` what the rule matches (a service with `allow` rules admits only what
    /// matches one of them).
    pub action: Action,
    #[serde(default)]
    pub from: From,
    /// Exact paths, or prefixes written with a trailing `*` (`/api/*`). HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// HTTP methods (`GET`, `POST`, ...; case-insensitive); empty: any. HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Headers that must be present with this exact value. HTTP only. The request's headers as
    /// the instance gets them: the mesh's own `quicmesh-*` headers are not among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderValueMatch>,
    /// Instance ports (for TCP services, the port the tunnel goes to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A header the request must carry with this value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value the header's first occurrence must have, exactly (case-sensitive).
    pub value: String,
}

/// Who a rule is about; any listed source matches. All empty and `gateway` unset: anyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct From {
    /// Calling services (as verified: the calling node hosts them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Calling nodes (the mTLS peer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Traffic from outside the mesh, entering through the gateway (unauthenticated clients).
    pub gateway: bool,
    /// Traffic through the gateway whose route verified a JWT with these claims.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtMatch>,
}

/// `from.jwt`: every condition given must hold of the verified token's claims.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct JwtMatch {
    /// The token's `iss` must be this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The token's `sub` must be this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A claim equal to the value, or a list claim holding it (`groups`, `scope` split on
    /// spaces).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatch>,
}

/// A claim the verified token must carry with a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimMatch {
    /// The claim's name, top level (`groups`, `scope`, `email`, ...).
    pub name: String,
    /// A string claim equal to it or holding it as a space-separated word, or a list claim with
    /// it as an item; other claims compare as their JSON text (`42`, `true`).
    pub value: String,
}

impl JwtMatch {
    fn matches(&self, claims: &crate::policy::jwt::Claims) -> bool {
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str());
        let has = |c: &ClaimMatch| match claims.get(&c.name) {
            Some(serde_json::Value::String(s)) => s == &c.value || s.split(' ').any(|w| w == c.value),
            Some(serde_json::Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(c.value.as_str())),
            Some(other) => serde_json::to_string(other).is_ok_and(|t| t == c.value),
            None => false,
        };
        self.issuer.as_deref().is_none_or(|i| text("iss") == Some(i))
            && self.subject.as_deref().is_none_or(|s| text("sub") == Some(s))
            && self.claims.iter().all(has)
    }
}

impl From {
    fn is_anyone(&self) -> bool {
        self.services.is_empty() && self.nodes.is_empty() && !self.gateway && self.jwt.is_none()
    }
}

/// The verified caller.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The peer node (the mTLS identity); this node's own name for local calls.
    pub node: &'a str,
    /// The calling service, when verified.
    pub service: Option<&'a str>,
    /// The peer is the gateway: the request came from outside the mesh.
    pub via_gateway: bool,
    /// The claims of the JWT the gateway verified for the request.
    pub jwt: Option<&'a crate::policy::jwt::Claims>,
}

/// What is being asked for. HTTP fields are `None` for TCP tunnels.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub method: Option<&'a Method>,
    pub path: Option<&'a str>,
    pub headers: Option<&'a HeaderMap>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by this rule (or `default` / `no allow rule matched`).
    Deny(String),
    /// Would be denied, but the policy audits only.
    AuditDeny(String),
}

impl Rule {
    fn matches(&self, caller: &Caller<'_>, t: &Target<'_>) -> bool {
        let f = &self.from;
        let who = f.is_anyone()
            || caller.service.is_some_and(|s| f.services.iter().any(|x| x == s))
            || f.nodes.iter().any(|n| n == caller.node)
            || (f.gateway && caller.via_gateway)
            || f.jwt.as_ref().is_some_and(|j| caller.via_gateway && caller.jwt.is_some_and(|c| j.matches(c)));
        let path_ok = self.paths.is_empty()
            || t.path.is_some_and(|p| {
                self.paths.iter().any(|want| match want.strip_suffix('*') {
                    Some(prefix) => p.starts_with(prefix),
                    None => p == want,
                })
            });
        let method_ok = self.methods.is_empty()
            || t.method.is_some_and(|m| self.methods.iter().any(|x| x.eq_ignore_ascii_case(m.as_str())));
        let headers_ok = self.headers.is_empty()
            || t.headers.is_some_and(|h| {
                self.headers
                    .iter()
                    .all(|want| h.get(want.name.as_str()).is_some_and(|v| v.as_bytes() == want.value.as_bytes()))
            });
        let port_ok = self.ports.is_empty() || self.ports.contains(&t.port);
        who && path_ok && method_ok && headers_ok && port_ok
    }
}

impl AuthzConfig {
    /// Checks names and conditions; `key` prefixes messages.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, p) in self.policies.iter().enumerate() {
            for (j, r) in p.rules.iter().enumerate() {
                if let Some(bad) = r.paths.iter().find(|p| !p.starts_with('/')) {
                    return Err((
                        format!("authorization.policies[{i}].rules[{j}].paths"),
                        format!("{bad:?} does not start with '/'"),
                    ));
                }
                if let Some(bad) = r.methods.iter().find(|m| Method::from_bytes(m.as_bytes()).is_err()) {
                    return Err((
                        format!("authorization.policies[{i}].rules[{j}].methods"),
                        format!("{bad:?} is not a method"),
                    ));
                }
                if let Some(bad) = r.headers.iter().find(|h| http::HeaderName::from_bytes(h.name.as_bytes()).is_err()) {
                    return Err((
                        format!("authorization.policies[{i}].rules[{j}].headers"),
                        format!("{:?} is not a header name", bad.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The decision for `caller` asking `service` for `target`.
    pub fn decide(&self, service: &str, caller: &Caller<'_>, target: &Target<'_>) -> Decision {
        let mut audit = false;
        let mut allow_rules = false;
        let mut allowed = false;
        for policy in self.policies.iter().filter(|p| p.service == service) {
            for (i, rule) in policy.rules.iter().enumerate() {
                let name = || rule.name.clone().unwrap_or_else(|| format!("{service}[{i}]"));
                match rule.action {
                    Action::Deny if rule.matches(caller, target) => {
                        return match policy.mode {
                            Mode::Enforce => Decision::Deny(name()),
                            Mode::Audit => Decision::AuditDeny(name()),
                        };
                    }
                    Action::Deny => {}
                    Action::Allow => {
                        allow_rules = true;
                        audit |= policy.mode == Mode::Audit;
                        allowed |= rule.matches(caller, target);
                    }
                }
            }
        }
        let why = if allow_rules {
            (!allowed).then(|| "no allow rule matched".to_string())
        } else {
            (self.default == DefaultAction::Deny).then(|| "default deny".to_string())
        };
        match why {
            None => Decision::Allow,
            Some(reason) if audit => Decision::AuditDeny(reason),
            Some(reason) => Decision::Deny(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> AuthzConfig {
        toml::from_str(text).unwrap()
    }

    const FRONT: Caller<'static> = Caller { node: "node-a", service: Some("front"), via_gateway: false, jwt: None };
    const OTHER: Caller<'static> = Caller { node: "node-c", service: Some("batch"), via_gateway: false, jwt: None };
    const EDGE: Caller<'static> = Caller { node: "gateway", service: Some("gateway"), via_gateway: true, jwt: None };

    fn get(path: &'static str) -> Target<'static> {
        Target { method: Some(&Method::GET), path: Some(path), headers: None, port: 80 }
    }

    #[test]
    fn allow_rules_admit_only_what_they_match_and_deny_wins() {
        let c = cfg(r#"
            [[policies]]
            service = "web"
            [[policies.rules]]
            action = "allow"
            from = { services = ["front"], gateway = true }
            [[policies.rules]]
            name = "no-admin"
            action = "deny"
            paths = ["/admin/*"]
        "#);
        assert_eq!(c.decide("web", &FRONT, &get("/x")), Decision::Allow);
        assert_eq!(c.decide("web", &EDGE, &get("/x")), Decision::Allow);
        assert_eq!(c.decide("web", &OTHER, &get("/x")), Decision::Deny("no allow rule matched".into()));
        assert_eq!(c.decide("web", &FRONT, &get("/admin/users")), Decision::Deny("no-admin".into()));
        // Other services fall back to the default, allow.
        assert_eq!(c.decide("db", &OTHER, &get("/")), Decision::Allow);
        let deny_all = cfg("default = \"deny\"");
        assert_eq!(deny_all.decide("db", &FRONT, &get("/")), Decision::Deny("default deny".into()));
    }

    #[test]
    fn audit_mode_reports_but_lets_through() {
        let c = cfg(r#"
            [[policies]]
            service = "web"
            mode = "audit"
            [[policies.rules]]
            action = "allow"
            from = { nodes = ["node-a"] }
        "#);
        assert_eq!(c.decide("web", &FRONT, &get("/")), Decision::Allow);
        assert_eq!(c.decide("web", &OTHER, &get("/")), Decision::AuditDeny("no allow rule matched".into()));
    }

    #[test]
    fn methods_headers_and_ports() {
        let c = cfg(r#"
            [[policies]]
            service = "db"
            [[policies.rules]]
            action = "allow"
            from = { services = ["front"] }
            ports = [5432]
            [[policies]]
            service = "web"
            [[policies.rules]]
            action = "allow"
            methods = ["GET"]
            headers = [{ name = "x-role", value = "reader" }]
        "#);
        let tcp = |port| Target { method: None, path: None, headers: None, port };
        assert_eq!(c.decide("db", &FRONT, &tcp(5432)), Decision::Allow);
        assert!(matches!(c.decide("db", &FRONT, &tcp(5433)), Decision::Deny(_)));
        let mut h = HeaderMap::new();
        h.insert("x-role", "reader".parse().unwrap());
        let t = Target { method: Some(&Method::GET), path: Some("/"), headers: Some(&h), port: 80 };
        assert_eq!(c.decide("web", &OTHER, &t), Decision::Allow);
        let post = Target { method: Some(&Method::POST), ..t };
        assert!(matches!(c.decide("web", &OTHER, &post), Decision::Deny(_)));
        assert!(matches!(c.decide("web", &OTHER, &get("/")), Decision::Deny(_)), "header missing");
    }
}
