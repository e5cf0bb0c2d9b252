//! GRPCRoute (Gateway API): matches by gRPC service and method, header matches, filters,
//! weighted backends, as HTTPRoutes: a gRPC method is the path `/<service>/<method>`, so each
//! GRPCRoute compiles to an HTTPRoute that also asks for `content-type: application/grpc`, and
//! routes, precedence, filters and backends are those of HTTP routing.

use serde::{Deserialize, Serialize};

use crate::policy::listener::ParentRef;
use crate::policy::route::{
    BackendRef, Filter, HttpRoute, PathMatch, PathMatchType, RouteMatch, RouteRule, ValueMatch, ValueMatchType,
};

/// One GRPCRoute, compiled to the HTTPRoute it means: a method is the path
/// `/<service>/<method>`, and only requests with `content-type: application/grpc...` match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRoute {
    /// The route's name: the access log's `route` and the `route` label of its metrics.
    pub name: String,
    /// Exact names or `*.suffix` wildcards; empty matches any host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// As an HTTPRoute's: at the edge the listeners it attaches to (none: every listener taking
    /// HTTPRoutes); in the mesh the services it takes calls to (`kind = "Service"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    /// The route's rules; a call goes by the one whose match wins, as in HTTP routing.
    #[serde(default)]
    pub rules: Vec<GrpcRule>,
}

/// One rule of a GRPCRoute: which calls it takes, what is done to them and where they go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRule {
    /// The rule's name, unique within its route; named in access logs (`rule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match; none means every gRPC call.
    #[serde(default)]
    pub matches: Vec<GrpcMatch>,
    /// RequestHeaderModifier, ResponseHeaderModifier and RequestMirror.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Services the calls go to, one chosen per call by `weight`; none, or every weight 0:
    /// 500 `invalid-backend`.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// One way a call matches a rule: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodMatch>,
    /// Headers (gRPC metadata) that must all match.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// `service` (`pkg.Service`) and `method`, at least one; exact, or regular expressions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodMatch {
    /// `Exact` (default): `service` and `method` are names (no `/`); `RegularExpression`: each
    /// is a pattern matching the whole name.
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// The gRPC service, fully qualified (`pkg.Service`); unset: any service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The method (`Get`); unset: any method of `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// What gRPC requests carry (`application/grpc`, `application/grpc+proto`, ...).
const GRPC_CONTENT_TYPE: &str = r"application/grpc([+;].*)?";

impl GrpcRoute {
    /// The HTTPRoute this route means.
    pub fn to_http(&self) -> Result<HttpRoute, String> {
        let mut rules = Vec::new();
        for rule in &self.rules {
            if let Some(f) = rule.filters.iter().chain(rule.backend_refs.iter().flat_map(|b| &b.filters)).find(|f| {
                !matches!(
                    f,
                    Filter::RequestHeaderModifier { .. }
                        | Filter::ResponseHeaderModifier { .. }
                        | Filter::RequestMirror { .. }
                )
            }) {
                return Err(format!(
                    "grpc route {:?}: a GRPCRoute takes RequestHeaderModifier, ResponseHeaderModifier and \
                     RequestMirror filters, not {f:?}",
                    self.name
                ));
            }
            let grpc_only = ValueMatch {
                kind: ValueMatchType::RegularExpression,
                name: "content-type".into(),
                value: GRPC_CONTENT_TYPE.into(),
            };
            let any = [GrpcMatch::default()];
            let matches = if rule.matches.is_empty() { &any[..] } else { &rule.matches[..] };
            let mut http_matches = Vec::new();
            for m in matches {
                let mut headers = m.headers.clone();
                headers.push(grpc_only.clone());
                let path = m.method.as_ref().map(|mm| self.path_of(mm)).transpose()?;
                http_matches.push(RouteMatch { path, headers, ..RouteMatch::default() });
            }
            rules.push(RouteRule {
                name: rule.name.clone(),
                matches: http_matches,
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                ..RouteRule::default()
            });
        }
        Ok(HttpRoute {
            name: self.name.clone(),
            hostnames: self.hostnames.clone(),
            rules,
            parent_refs: self.parent_refs.clone(),
            max_request_body: None,
            rate_limit: None,
            jwt: None,
        })
    }

    fn path_of(&self, m: &MethodMatch) -> Result<PathMatch, String> {
        let bad = |what: &str| format!("grpc route {:?}: {what}", self.name);
        let word = |s: &str| !s.is_empty() && !s.contains('/');
        Ok(match (m.kind, m.service.as_deref(), m.method.as_deref()) {
            (_, None, None) => return Err(bad("a method match names a service, a method or both")),
            (ValueMatchType::Exact, s, m) if s.is_some_and(|s| !word(s)) || m.is_some_and(|m| !word(m)) => {
                return Err(bad("service and method names have no '/'"))
            }
            (ValueMatchType::Exact, Some(s), Some(m)) => {
                PathMatch { kind: PathMatchType::Exact, value: format!("/{s}/{m}") }
            }
            (ValueMatchType::Exact, Some(s), None) => {
                PathMatch { kind: PathMatchType::PathPrefix, value: format!("/{s}") }
            }
            (ValueMatchType::Exact, None, Some(m)) => {
                PathMatch { kind: PathMatchType::RegularExpression, value: format!("/[^/]+/{}", regex::escape(m)) }
            }
            (ValueMatchType::RegularExpression, s, m) => PathMatch {
                kind: PathMatchType::RegularExpression,
                value: format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
            },
        })
    }
}

/// `http` followed by what `grpc` means, as one list of HTTPRoutes.
pub fn with_grpc(http: &[HttpRoute], grpc: &[GrpcRoute]) -> Result<Vec<HttpRoute>, String> {
    let mut all = http.to_vec();
    for g in grpc {
        all.push(g.to_http()?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::route::RouteTable;

    #[test]
    fn grpc_methods_match_as_paths_of_grpc_calls_only() {
        let route: GrpcRoute = serde_json::from_value(serde_json::json!({
            "name": "g",
            "rules": [
                {"matches": [{"method": {"service": "pkg.Echo", "method": "Get"}}], "backendRefs": [{"name": "exact"}]},
                {"matches": [{"method": {"service": "pkg.Echo"}}], "backendRefs": [{"name": "service"}]},
                {"matches": [{"method": {"method": "Put"}}], "backendRefs": [{"name": "method"}]},
                {"matches": [{"method": {"type": "RegularExpression", "service": "pkg\\.Adm.*"}}],
                 "backendRefs": [{"name": "regex"}]},
            ]
        }))
        .unwrap();
        let table = RouteTable::new(vec![route.to_http().unwrap()]).unwrap();
        let mut grpc = http::HeaderMap::new();
        grpc.insert("content-type", http::HeaderValue::from_static("application/grpc+proto"));
        let to = |path: &str, headers: &http::HeaderMap| {
            table.find("h", &http::Method::POST, path, None, headers).map(|m| m.rule.backend_refs[0].name.clone())
        };
        assert_eq!(to("/pkg.Echo/Get", &grpc).as_deref(), Some("exact"));
        assert_eq!(to("/pkg.Echo/List", &grpc).as_deref(), Some("service"));
        assert_eq!(to("/other.Svc/Put", &grpc).as_deref(), Some("method"));
        assert_eq!(to("/pkg.Admin/Drop", &grpc).as_deref(), Some("regex"));
        assert_eq!(to("/pkg.EchoX/Get", &grpc), None, "a service is a whole path segment");
        assert_eq!(to("/pkg.Echo/Get", &http::HeaderMap::new()), None, "not a gRPC call");
        let redirect: GrpcRoute = serde_json::from_value(serde_json::json!({
            "name": "r", "rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {}}]}]
        }))
        .unwrap();
        assert!(redirect.to_http().unwrap_err().contains("takes RequestHeaderModifier"));
    }
}
