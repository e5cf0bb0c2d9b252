//! HTTP routing in the model of the Kubernetes Gateway API's HTTPRoute: hostnames, rules of
//! matches (path, headers, query parameters, method), filters and weighted backend references,
//! with the specification's precedence. Socket-free: the gateway and the nodes feed it request
//! parts and get back the rule to apply, so it is tested and benchmarked without I/O.
//!
//! Precedence between matches, highest first: the longest matching non-wildcard hostname, the
//! longest matching hostname, an `Exact` path over a `PathPrefix` (longer first) over a
//! `RegularExpression` (implementation-specific in the spec; here, after prefixes, longer
//! pattern first), a method match, the most header matches, the most query-parameter matches;
//! ties go to the route listed first (config order stands for the spec's creation time), then
//! rule and match order.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::policy::listener::ParentKind;

/// One HTTPRoute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// The route's name: the access log's `route` and the `route` label of its metrics.
    pub name: String,
    /// Exact names or `*.suffix` wildcards; empty matches any host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The route's rules; a request goes by the one whose match wins (the Gateway API's
    /// precedence, across all routes).
    #[serde(default)]
    pub rules: Vec<RouteRule>,
    /// Gateway routes: the listeners it attaches to (none: every listener taking HTTPRoutes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<crate::policy::listener::ParentRef>,
    /// quicmesh extension: largest request body accepted, bytes (413 past it); default
    /// `gateway.limits.max_request_body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
    /// quicmesh extension: token-bucket rate limit of the route (429 with `retry-after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::policy::limit::RateLimit>,
    /// quicmesh extension, gateway routes: the `gateway.jwt_providers` entry whose valid JWT
    /// every request must carry (401 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
}

/// One rule of a route: which requests it takes (`matches`), what is done to them (`filters`)
/// and where they go (`backendRefs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// The rule's name (Gateway API v1.4), unique within its route; named in access logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match; none means every request (`PathPrefix /`).
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Applied in order to the requests the rule takes (an `ExternalAuth` is asked before the
    /// others); a redirect, or the answer to a CORS preflight, ends the request there.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Services the requests go to, one chosen per request by `weight`; none (and no
    /// redirect), or every weight 0: 500 `invalid-backend`.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Time limits of the requests the rule takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RuleTimeouts>,
    /// Overrides of the backend service's retry policy (Gateway API HTTPRouteRetry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::policy::retry::RouteRetry>,
    /// quicmesh extension: fault injection for chaos testing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<crate::policy::limit::Fault>,
}

/// One way a request matches a rule: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// The path match; unset: `PathPrefix` `/`, any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Headers that must all match.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameters that must all match (percent-decoded; the first of a name counts).
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// The method the request must have, exactly (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PathMatchType {
    /// The path is `value`.
    Exact,
    /// The path is `value` or continues it after a `/` (whole segments).
    #[default]
    PathPrefix,
    /// `value` is a regular expression matching the whole path.
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// `PathPrefix` (default): `value` or below it, by whole segments (`/api` takes `/api/x`,
    /// not `/apix`); `Exact`: the path is `value`; `RegularExpression`: `value` matches the
    /// whole path. The path is compared normalized and without its query.
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    /// A path starting with `/` (default `/`; a trailing `/` of a prefix is ignored), or the
    /// pattern of a `RegularExpression`.
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ValueMatchType {
    /// The value exactly (case-sensitive).
    #[default]
    Exact,
    /// A regular expression matching the whole value.
    RegularExpression,
}

/// A header or query-parameter match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default): the value is `value`; `RegularExpression`: `value` is a pattern
    /// matching the whole value.
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Header name (case-insensitive) or query parameter name (case-sensitive).
    pub name: String,
    /// What the first header or parameter of that name must be, or the pattern it must match.
    pub value: String,
}

/// A filter: `type` names it, and the key of that name holds its settings
/// (`requestHeaderModifier`, `urlRewrite`, `cors`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Filter {
    RequestHeaderModifier {
        /// Changes the request's headers before it is forwarded (`remove`, then `set`, then
        /// `add`).
        #[serde(rename = "requestHeaderModifier")]
        modifier: HeaderModifier,
    },
    ResponseHeaderModifier {
        /// Changes the response's headers before it goes back (`remove`, then `set`, then
        /// `add`).
        #[serde(rename = "responseHeaderModifier")]
        modifier: HeaderModifier,
    },
    RequestRedirect {
        /// Answers with a redirect instead of forwarding; the `Location` takes what it leaves
        /// unset from the request.
        #[serde(rename = "requestRedirect")]
        redirect: Redirect,
    },
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        /// Changes the Host and the path the request is forwarded with.
        #[serde(rename = "urlRewrite")]
        rewrite: Rewrite,
    },
    RequestMirror {
        /// Also sends a copy of the request to another backend; the copy's answer is dropped.
        #[serde(rename = "requestMirror")]
        mirror: Mirror,
    },
    /// Cross-origin resource sharing (Gateway API v1.5): answers preflights, and marks the
    /// responses to allowed origins.
    #[serde(rename = "CORS")]
    Cors { cors: Cors },
    /// An authorization service decides (GEP-1494, HTTP mode): `proxy::ext_authz`.
    ExternalAuth {
        #[serde(rename = "externalAuth")]
        auth: ExternalAuth,
    },
}

/// The ExternalAuth filter (GEP-1494), HTTP mode: before the request goes on, the proxy asks the
/// `backendRef` service with the request's method and path (under `http.path`), its
/// `Authorization` and the `http.allowedHeaders`; a 2xx lets it on with the
/// `http.allowedResponseHeaders` of the answer added, anything else is the client's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalAuth {
    /// `HTTP` (gRPC's ext_authz protocol is not spoken).
    pub protocol: String,
    /// The authorization service asked.
    pub backend_ref: AuthBackend,
    /// The check request's path prefix, and the headers passed to it and back from it.
    #[serde(default)]
    pub http: AuthHttp,
    /// quicmesh extension: the longest wait for the decision (default 1s).
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub timeout: Duration,
    /// quicmesh extension: when the service cannot be asked (no endpoint, unreachable, no
    /// answer within `timeout`), let the request on instead of answering 503.
    #[serde(default)]
    pub fail_open: bool,
}

fn default_auth_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthBackend {
    /// The authorization service (a mesh service).
    pub name: String,
    /// The Gateway API's port of the service; not used: the check goes to an instance's own
    /// address, as every call to a mesh service does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthHttp {
    /// Prefix of the check request's path (the request's own path follows it).
    #[serde(default)]
    pub path: String,
    /// Request headers sent to the service besides `Authorization` (a `quicmesh-*` name, the
    /// mesh's own, is never sent).
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Headers of the service's 2xx answer added to the request going on.
    #[serde(default)]
    pub allowed_response_headers: Vec<String>,
}

/// The CORS filter's policy (`HTTPCORSFilter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cors {
    /// `scheme://host[:port]`, `scheme://*.domain` (any number of labels in front), or `*`.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Answers carry `Access-Control-Allow-Credentials: true`: the browser may send cookies
    /// and other credentials.
    #[serde(default)]
    pub allow_credentials: bool,
    /// Methods, or `*` (a preflight is answered with the method it asked for).
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers, or `*` (a preflight is answered with the headers it asked for).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the page's scripts may read (`Access-Control-Expose-Headers`).
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight's answer.
    #[serde(default = "five")]
    pub max_age: u32,
}

fn five() -> u32 {
    5
}

impl Cors {
    /// Whether `origin` (as a browser sends it) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, rest)) = origin.split_once("://") else { return false };
        self.allow_origins.iter().any(|allowed| {
            if allowed == "*" {
                return true;
            }
            let allowed = allowed.to_ascii_lowercase();
            let Some((a_scheme, a_rest)) = allowed.split_once("://") else { return false };
            if a_scheme != scheme {
                return false;
            }
            match a_rest.strip_prefix('*') {
                // `*.bar.com` covers `www.bar.com` and `a.www.bar.com`, not `bar.com`.
                Some(suffix) => rest.len() > suffix.len() && rest.ends_with(suffix),
                None => a_rest == rest,
            }
        })
    }

    fn check(&self) -> Result<(), String> {
        for o in &self.allow_origins {
            let ok = o == "*"
                || o.split_once("://").is_some_and(|(scheme, host)| {
                    matches!(scheme, "http" | "https")
                        && !host.is_empty()
                        && !host[1..].contains('*')
                        && (!host.starts_with('*') || host.starts_with("*."))
                        && !host.contains('/')
                });
            if !ok {
                return Err(format!("cors.allowOrigins: {o:?} is not *, scheme://host[:port] or scheme://*.domain"));
            }
        }
        for m in &self.allow_methods {
            if m != "*" && Method::from_bytes(m.as_bytes()).is_err() {
                return Err(format!("cors.allowMethods: {m:?} is not a method"));
            }
        }
        for h in self.allow_headers.iter().chain(&self.expose_headers) {
            if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(format!("cors: {h:?} is not a header name"));
            }
        }
        Ok(())
    }

    /// What a request's origin earns: `None` when it has no `Origin` or one not allowed (the
    /// request goes on untouched); else the answer to a preflight, or the headers to add to
    /// the response of an actual request.
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> Option<CorsAnswer> {
        let origin = headers.get(http::header::ORIGIN)?.to_str().ok()?;
        if !self.allows(origin) {
            return None;
        }
        let mut out = Vec::new();
        let mut add = |name: HeaderName, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                out.push((name, v));
            }
        };
        use http::header::*;
        // The origin is echoed, never `*`: right with and without credentials.
        add(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        add(VARY, "Origin");
        if self.allow_credentials {
            add(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if !self.expose_headers.is_empty() {
            add(ACCESS_CONTROL_EXPOSE_HEADERS, &self.expose_headers.join(", "));
        }
        let asked = headers.get(ACCESS_CONTROL_REQUEST_METHOD).and_then(|v| v.to_str().ok());
        let Some(asked) = asked.filter(|_| method == Method::OPTIONS) else {
            return Some(CorsAnswer::Actual(out));
        };
        let methods =
            if self.allow_methods.iter().any(|m| m == "*") { asked.to_string() } else { self.allow_methods.join(", ") };
        if !methods.is_empty() {
            add(ACCESS_CONTROL_ALLOW_METHODS, &methods);
        }
        let wanted = headers.get(ACCESS_CONTROL_REQUEST_HEADERS).and_then(|v| v.to_str().ok()).unwrap_or("");
        let allowed = if self.allow_headers.iter().any(|h| h == "*") {
            wanted.to_string()
        } else {
            self.allow_headers.join(", ")
        };
        if !allowed.is_empty() {
            add(ACCESS_CONTROL_ALLOW_HEADERS, &allowed);
        }
        add(ACCESS_CONTROL_MAX_AGE, &self.max_age.to_string());
        Some(CorsAnswer::Preflight(out))
    }
}

/// What the CORS filter decided for an allowed origin.
pub enum CorsAnswer {
    /// Answer the preflight now (200, no body) with these headers.
    Preflight(Vec<(HeaderName, HeaderValue)>),
    /// Forward; add these headers to the response.
    Actual(Vec<(HeaderName, HeaderValue)>),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Headers set to these values, replacing any of the same name.
    #[serde(default)]
    pub set: Vec<HeaderValuePair>,
    /// Headers added, after any of the same name already there.
    #[serde(default)]
    pub add: Vec<HeaderValuePair>,
    /// Names of headers removed (case-insensitive).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header's name and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderValuePair {
    /// Header name (case-insensitive).
    pub name: String,
    /// Header value.
    pub value: String,
}

/// Path modification of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PathModifier {
    ReplaceFullPath {
        /// The new path, replacing the whole of it.
        #[serde(rename = "replaceFullPath")]
        value: String,
    },
    ReplacePrefixMatch {
        /// Replaces the prefix the rule's `PathPrefix` match matched; the rest of the path
        /// stays (`/api` to `/v2`: `/api/x` becomes `/v2/x`).
        #[serde(rename = "replacePrefixMatch")]
        value: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// Scheme of the `Location` (`http`, `https`); unset: the request's.
    pub scheme: Option<String>,
    /// Host of the `Location`; unset: the request's.
    pub hostname: Option<String>,
    /// Port of the `Location`; unset: the request's, or none when `scheme` is set. Port 80 with
    /// `http` and 443 with `https` are left out.
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301, 302, 303, 307 or 308 (default 302).
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// The Host the request is forwarded with, instead of the client's.
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub backend_ref: BackendRef,
    /// Share of requests copied, 0 to 100 (default all).
    #[serde(default = "hundred")]
    pub percent: u32,
    /// The share as a fraction instead (`numerator` / `denominator`, default denominator 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    /// Requests copied per `denominator` requests; at most `denominator`.
    pub numerator: u32,
    /// What `numerator` counts out of; above 0.
    #[serde(default = "hundred")]
    pub denominator: u32,
}

impl Mirror {
    /// Whether a request whose uniform draw in `[0, 1)` is `roll` is copied.
    pub fn sampled(&self, roll: f64) -> bool {
        match self.fraction {
            Some(f) => roll * f64::from(f.denominator) < f64::from(f.numerator),
            None => roll * 100.0 < f64::from(self.percent),
        }
    }
}

fn hundred() -> u32 {
    100
}

/// A service (optionally a subset selected by labels) and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Service name.
    pub name: String,
    /// Only the service's endpoints carrying all these labels (`key = value`); empty: all.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its share of the rule's requests, relative to the other backends' weights; 0: none.
    #[serde(default = "one")]
    pub weight: u32,
    /// Filters applied only when this backend is the one chosen (after the rule's own): any
    /// the rule takes but `ExternalAuth` (asked before a backend is chosen; refused here); a
    /// redirect here answers for this backend's share of requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

fn one() -> u32 {
    1
}

impl RuleTimeouts {
    /// The limit on one forwarded request: `request` covers the whole exchange and
    /// `backendRequest` one try of it; without retries both bound the same attempt.
    pub fn effective(&self) -> Option<Duration> {
        match (self.request, self.backend_request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTimeouts {
    /// Longest time from the request to its response headers, retries included (504 `timeout`
    /// past it); `"0s"` turns it off. Unset: each try is limited, the whole call is not (a gRPC
    /// caller's deadline limits it in either case).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub request: Option<Duration>,
    /// Longest time one try may wait for response headers; default a gRPC caller's deadline,
    /// else `request`, else `timeouts.request`. `"0s"` (or `request = "0s"` with this unset):
    /// no limit.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub backend_request: Option<Duration>,
    /// Longest wait for the next piece of a response body once its headers came (Envoy's
    /// stream idle timeout; a quicmesh extension): past it the body fails, so a peer that froze
    /// or went away mid-body costs its client this long, not the QUIC idle timeout.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub stream_idle: Option<Duration>,
    /// An upgraded connection (WebSocket) that carries no byte either way for this long is
    /// closed, both sides reset (a quicmesh extension, as Envoy's idle timeout on upgrades).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub upgrade_idle: Option<Duration>,
    /// An upgraded connection is closed this long after it opened, busy or not (a quicmesh
    /// extension, as Envoy's max stream duration).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::config::reference::Duration>")]
    pub upgrade_lifetime: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?}: {reason}")]
    Invalid { route: String, reason: String },
}

enum PathRule {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

enum ValueRule {
    Exact(String),
    Regex(Regex),
}

struct CompiledMatch {
    path: PathRule,
    headers: Vec<(HeaderName, ValueRule)>,
    query: Vec<(String, ValueRule)>,
    method: Option<Method>,
}

/// Ordering key within a host: path kind, path length, method, headers, query; larger wins.
type Rank = (u8, usize, bool, usize, usize);

struct Entry {
    route: usize,
    rule: usize,
    matcher: CompiledMatch,
    rank: Rank,
}

/// The rule a request matched, and what the path matched (for `ReplacePrefixMatch`).
pub struct Matched<'a> {
    pub route: &'a HttpRoute,
    pub rule: &'a RouteRule,
    /// The prefix that matched when the match was a `PathPrefix`.
    pub matched_prefix: Option<&'a str>,
    /// The route's rate limiter, when it has a `rateLimit`.
    pub limiter: Option<&'a crate::policy::limit::RateLimiter>,
}

/// Hostname patterns of one route, compiled.
#[derive(Clone)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// Candidate entries for one hostname class, in precedence order, indexed by the first path
/// segment so a lookup only visits entries that could match the path.
#[derive(Default)]
struct Group {
    by_segment: HashMap<String, Vec<usize>>,
    /// Entries whose path does not pin a first segment (`PathPrefix /`, regexes).
    generic: Vec<usize>,
}

impl Group {
    fn push(&mut self, entry: usize, path: &PathRule) {
        match first_segment_of_rule(path) {
            Some(seg) => self.by_segment.entry(seg.to_string()).or_default().push(entry),
            None => self.generic.push(entry),
        }
    }
}

fn first_segment(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path).split('/').next().unwrap_or("")
}

/// The first path segment every matching request must have, if the rule pins one.
fn first_segment_of_rule(path: &PathRule) -> Option<&str> {
    match path {
        PathRule::Exact(p) => Some(first_segment(p)),
        // A prefix ending inside its first segment ("/api" with no more) still pins it, since
        // prefixes match whole segments.
        PathRule::Prefix(p) if !p.is_empty() => Some(first_segment(p)),
        _ => None,
    }
}

/// Routes compiled for lookup. Candidates are grouped by hostname class (exact host, each
/// wildcard suffix, any host) in precedence order, so the first entry that matches wins and a
/// request only meets the entries for its host and first path segment.
pub struct RouteTable {
    routes: Vec<HttpRoute>,
    /// One per route (same order), for routes with a `rateLimit`.
    limiters: Vec<Option<crate::policy::limit::RateLimiter>>,
    /// One per route: the destination ports its Service parentRefs name (GAMMA); `None`, any.
    ports: Vec<Option<Vec<u16>>>,
    /// In global precedence order (within a hostname class).
    entries: Vec<Entry>,
    exact: HashMap<String, Group>,
    /// Longest suffix first.
    wildcard: Vec<(String, Group)>,
    any: Group,
}

fn invalid(route: &str, reason: impl Into<String>) -> RouteError {
    RouteError::Invalid { route: route.into(), reason: reason.into() }
}

fn compile_value(route: &str, kind: ValueMatchType, value: &str) -> Result<ValueRule, RouteError> {
    Ok(match kind {
        ValueMatchType::Exact => ValueRule::Exact(value.to_string()),
        ValueMatchType::RegularExpression => {
            ValueRule::Regex(anchored(value).map_err(|e| invalid(route, format!("bad regex {value:?}: {e}")))?)
        }
    })
}

/// `pattern`, matching whole values only. It must be a regex on its own first: wrapped
/// unchecked, `/api)|(.*` would close the anchoring group and match everything.
fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(pattern)?;
    Regex::new(&format!("^(?:{pattern})$"))
}

fn compile_match(route: &str, m: &RouteMatch) -> Result<CompiledMatch, RouteError> {
    let pm = m.path.clone().unwrap_or(PathMatch { kind: PathMatchType::PathPrefix, value: "/".into() });
    if !pm.value.starts_with('/') && pm.kind != PathMatchType::RegularExpression {
        return Err(invalid(route, format!("path {:?} does not start with '/'", pm.value)));
    }
    let path = match pm.kind {
        PathMatchType::Exact => PathRule::Exact(pm.value),
        PathMatchType::PathPrefix => PathRule::Prefix(pm.value.trim_end_matches('/').to_string()),
        PathMatchType::RegularExpression => PathRule::Regex(
            anchored(&pm.value).map_err(|e| invalid(route, format!("bad path regex {:?}: {e}", pm.value)))?,
        ),
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| invalid(route, format!("bad header name {:?}", h.name)))?;
        headers.push((name, compile_value(route, h.kind, &h.value)?));
    }
    let mut query = Vec::new();
    for q in &m.query_params {
        query.push((q.name.clone(), compile_value(route, q.kind, &q.value)?));
    }
    let method = match &m.method {
        Some(s) => Some(Method::from_bytes(s.as_bytes()).map_err(|_| invalid(route, format!("bad method {s:?}")))?),
        None => None,
    };
    Ok(CompiledMatch { path, headers, query, method })
}

fn rank(m: &CompiledMatch) -> Rank {
    let (kind, len) = match &m.path {
        PathRule::Exact(p) => (3, p.len()),
        PathRule::Prefix(p) => (2, p.len()),
        PathRule::Regex(r) => (1, r.as_str().len()),
    };
    (kind, len, m.method.is_some(), m.headers.len(), m.query.len())
}

/// The status codes a RequestRedirect may answer with.
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

fn validate_filters(route: &str, rule: &RouteRule) -> Result<(), RouteError> {
    for f in &rule.filters {
        match f {
            Filter::RequestRedirect { redirect } => {
                if let Some(code) = redirect.status_code {
                    if !REDIRECT_CODES.contains(&code) {
                        return Err(invalid(
                            route,
                            format!("redirect statusCode {code} is not one of 301, 302, 303, 307, 308"),
                        ));
                    }
                }
            }
            Filter::RequestMirror { mirror } if mirror.percent > 100 => {
                return Err(invalid(route, "mirror percent above 100"));
            }
            Filter::RequestMirror { mirror: Mirror { fraction: Some(f), percent, .. } } => {
                if *percent != 100 {
                    return Err(invalid(route, "a mirror takes percent or fraction, not both"));
                }
                if f.denominator == 0 || f.numerator > f.denominator {
                    return Err(invalid(
                        route,
                        "mirror fraction: numerator must be at most denominator, which must be above 0",
                    ));
                }
            }
            Filter::Cors { cors } => cors.check().map_err(|e| invalid(route, e))?,
            Filter::ExternalAuth { auth } => {
                if auth.protocol != "HTTP" {
                    return Err(invalid(
                        route,
                        format!("externalAuth protocol {:?}: only HTTP is spoken", auth.protocol),
                    ));
                }
                let names = auth.http.allowed_headers.iter().chain(&auth.http.allowed_response_headers);
                if let Some(bad) = names.into_iter().find(|h| HeaderName::from_bytes(h.as_bytes()).is_err()) {
                    return Err(invalid(route, format!("externalAuth: {bad:?} is not a header name")));
                }
                if !auth.http.path.is_empty() && !auth.http.path.starts_with('/') {
                    return Err(invalid(route, "externalAuth http.path must start with '/'"));
                }
                if auth.timeout.is_zero() || auth.timeout > crate::config::MAX_DURATION {
                    return Err(invalid(route, "externalAuth timeout must be longer than 0s and at most 10 years"));
                }
            }
            _ => {}
        }
    }
    if rule.filters.iter().any(|f| matches!(f, Filter::RequestRedirect { .. }))
        && rule.filters.iter().any(|f| matches!(f, Filter::UrlRewrite { .. }))
    {
        return Err(invalid(route, "a rule cannot both redirect and rewrite"));
    }
    for b in &rule.backend_refs {
        // The check runs before any backend is chosen: on a backend it would never run.
        if b.filters.iter().any(|f| matches!(f, Filter::ExternalAuth { .. })) {
            return Err(invalid(
                route,
                "externalAuth on a backendRef would never run (the check comes before a backend is \
                 chosen): put it in the rule's filters",
            ));
        }
        let rule_of_backend =
            RouteRule { filters: b.filters.clone(), backend_refs: Vec::new(), ..RouteRule::default() };
        validate_filters(route, &rule_of_backend)?;
    }
    for f in &rule.filters {
        if let Filter::RequestMirror { mirror } = f {
            if !mirror.backend_ref.filters.is_empty() {
                return Err(invalid(route, "a mirror's backendRef takes no filters"));
            }
        }
    }
    Ok(())
}

/// A rule name: lowercase letters, digits, '-' and '.', starting and ending with a letter or
/// digit, at most 253 bytes (the Gateway API's SectionName).
fn valid_rule_name(name: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge(name.as_bytes().first())
        && edge(name.as_bytes().last())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl RouteTable {
    /// Compiles routes (regexes once, here); config order is age order, first is oldest.
    pub fn new(routes: Vec<HttpRoute>) -> Result<Self, RouteError> {
        let mut entries = Vec::new();
        for (ri, route) in routes.iter().enumerate() {
            if let Some(Err(e)) = route.rate_limit.as_ref().map(|l| l.validate()) {
                return Err(invalid(&route.name, format!("rateLimit: {e}")));
            }
            let mut names = std::collections::HashSet::new();
            for (ui, rule) in route.rules.iter().enumerate() {
                if let Some(n) = &rule.name {
                    if !valid_rule_name(n) {
                        return Err(invalid(
                            &route.name,
                            format!("rule name {n:?} is not lowercase letters, digits, '-' and '.'"),
                        ));
                    }
                    if !names.insert(n.as_str()) {
                        return Err(invalid(&route.name, format!("two rules are named {n:?}")));
                    }
                }
                validate_filters(&route.name, rule)?;
                if let Some(Err(e)) = rule.fault.as_ref().map(|f| f.validate()) {
                    return Err(invalid(&route.name, format!("fault: {e}")));
                }
                if let Some(t) = &rule.timeouts {
                    let named = [
                        ("streamIdle", t.stream_idle),
                        ("upgradeIdle", t.upgrade_idle),
                        ("upgradeLifetime", t.upgrade_lifetime),
                    ];
                    if let Some((name, _)) = named.iter().find(|(_, d)| d.is_some_and(|d| d.is_zero())) {
                        return Err(invalid(&route.name, format!("timeouts.{name} must be longer than 0s")));
                    }
                    let limits = [("request", t.request), ("backendRequest", t.backend_request)];
                    let long = |(_, d): &&(&str, Option<Duration>)| d.is_some_and(|d| d > crate::config::MAX_DURATION);
                    if let Some((name, _)) = named.iter().chain(&limits).find(long) {
                        return Err(invalid(&route.name, format!("timeouts.{name} must be at most 10 years")));
                    }
                }
                if let Some(c) = rule
                    .retry
                    .as_ref()
                    .and_then(|r| r.codes.as_ref())
                    .and_then(|c| c.iter().find(|c| !(100..=599).contains(*c)))
                {
                    return Err(invalid(&route.name, format!("retry.codes: {c} is not an HTTP status")));
                }
                if rule.retry.as_ref().and_then(|r| r.backoff).is_some_and(|b| b > crate::config::MAX_DURATION) {
                    return Err(invalid(&route.name, "retry.backoff must be at most 10 years"));
                }
                let default = [RouteMatch::default()];
                let matches: &[RouteMatch] = if rule.matches.is_empty() { &default } else { &rule.matches };
                for m in matches {
                    let matcher = compile_match(&route.name, m)?;
                    let rank = rank(&matcher);
                    entries.push(Entry { route: ri, rule: ui, matcher, rank });
                }
            }
        }
        // Precedence within a hostname class: rank, then age (stable sort keeps config order).
        entries.sort_by_key(|e| std::cmp::Reverse(e.rank));
        let mut exact: HashMap<String, Group> = HashMap::new();
        let mut wildcard: Vec<(String, Group)> = Vec::new();
        let mut any = Group::default();
        let patterns: Vec<Vec<HostPattern>> = routes.iter().map(route_host_patterns).collect();
        for (ei, e) in entries.iter().enumerate() {
            for p in &patterns[e.route] {
                match p {
                    HostPattern::Any => any.push(ei, &e.matcher.path),
                    HostPattern::Exact(h) => exact.entry(h.clone()).or_default().push(ei, &e.matcher.path),
                    HostPattern::Suffix(sfx) => {
                        let pos = match wildcard.iter().position(|(w, _)| w == sfx) {
                            Some(pos) => pos,
                            None => {
                                wildcard.push((sfx.clone(), Group::default()));
                                wildcard.len() - 1
                            }
                        };
                        wildcard[pos].1.push(ei, &e.matcher.path);
                    }
                }
            }
        }
        wildcard.sort_by_key(|(w, _)| std::cmp::Reverse(w.len()));
        let limiters =
            routes.iter().map(|r| r.rate_limit.clone().map(crate::policy::limit::RateLimiter::new)).collect();
        let ports = routes.iter().map(service_ports).collect();
        Ok(Self { routes, limiters, ports, entries, exact, wildcard, any })
    }

    /// A table without routes: every lookup misses.
    pub fn empty() -> Self {
        Self {
            routes: Vec::new(),
            limiters: Vec::new(),
            ports: Vec::new(),
            entries: Vec::new(),
            exact: HashMap::new(),
            wildcard: Vec::new(),
            any: Group::default(),
        }
    }

    pub fn routes(&self) -> &[HttpRoute] {
        &self.routes
    }

    /// The winning rule for a request, or `None` (answer 404 `no-route`).
    pub fn find(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Matched<'_>> {
        self.find_at(host, None, method, path, query, headers)
    }

    /// [`RouteTable::find`] for a request to destination `port` (a mesh call's Host port, 80
    /// without one): routes whose Service parentRefs name ports take only those.
    pub fn find_at(
        &self,
        host: &str,
        port: Option<u16>,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Matched<'_>> {
        let params: Vec<(String, String)> = query.map(parse_query).unwrap_or_default();
        let segment = first_segment(path);
        let groups = self
            .exact
            .get(host)
            .into_iter()
            .chain(
                self.wildcard
                    .iter()
                    .filter(|(sfx, _)| host.len() > sfx.len() && host.ends_with(sfx.as_str()))
                    .map(|(_, g)| g),
            )
            .chain(std::iter::once(&self.any));
        for group in groups {
            let pinned = group.by_segment.get(segment).map_or(&[][..], Vec::as_slice);
            // Walk both candidate lists in precedence order (entry index order).
            let (mut a, mut b) = (pinned.iter().peekable(), group.generic.iter().peekable());
            loop {
                let next = match (a.peek(), b.peek()) {
                    (Some(&&x), Some(&&y)) if x < y => a.next(),
                    (Some(_), Some(_)) => b.next(),
                    (Some(_), None) => a.next(),
                    (None, Some(_)) => b.next(),
                    (None, None) => break,
                };
                let Some(&ei) = next else { break };
                let e = &self.entries[ei];
                let port_ok = match (port, self.ports.get(e.route)) {
                    (Some(p), Some(Some(ports))) => ports.contains(&p),
                    _ => true,
                };
                if port_ok && matches(&e.matcher, method, path, &params, headers) {
                    let route = &self.routes[e.route];
                    let matched_prefix = match &e.matcher.path {
                        PathRule::Prefix(p) => Some(p.as_str()),
                        _ => None,
                    };
                    let limiter = self.limiters.get(e.route).and_then(Option::as_ref);
                    return Some(Matched { route, rule: &route.rules[e.rule], matched_prefix, limiter });
                }
            }
        }
        None
    }
}

/// The hosts a route answers for: its hostnames and, for a mesh route (GAMMA), the names of
/// the services its parentRefs name.
fn route_host_patterns(route: &HttpRoute) -> Vec<HostPattern> {
    let services = route.parent_refs.iter().filter(|p| p.kind == ParentKind::Service).filter_map(|p| p.name.clone());
    let names: Vec<String> = route.hostnames.iter().cloned().chain(services).collect();
    host_patterns(&names)
}

/// The destination ports a route's Service parentRefs allow; `None` when any is (no Service
/// parentRef, or one without a port).
fn service_ports(route: &HttpRoute) -> Option<Vec<u16>> {
    let services: Vec<_> = route.parent_refs.iter().filter(|p| p.kind == ParentKind::Service).collect();
    if services.is_empty() || services.iter().any(|p| p.port.is_none()) {
        return None;
    }
    Some(services.iter().filter_map(|p| p.port).collect())
}

fn host_patterns(hostnames: &[String]) -> Vec<HostPattern> {
    if hostnames.is_empty() {
        return vec![HostPattern::Any];
    }
    hostnames
        .iter()
        .map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(rest) if rest.starts_with('.') => HostPattern::Suffix(rest.to_string()),
                _ => HostPattern::Exact(h),
            }
        })
        .collect()
}

fn value_matches(rule: &ValueRule, value: &str) -> bool {
    match rule {
        ValueRule::Exact(v) => v == value,
        ValueRule::Regex(r) => r.is_match(value),
    }
}

fn matches(m: &CompiledMatch, method: &Method, path: &str, query: &[(String, String)], headers: &HeaderMap) -> bool {
    let path_ok = match &m.path {
        PathRule::Exact(p) => path == p,
        PathRule::Prefix(p) => {
            path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        }
        PathRule::Regex(r) => r.is_match(path),
    };
    path_ok
        && m.method.as_ref().is_none_or(|want| want == method)
        && m.headers.iter().all(|(name, rule)| {
            // Names are case-insensitive (HeaderName is lowercase); the first value counts.
            headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| value_matches(rule, v))
        })
        && m.query
            .iter()
            .all(|(name, rule)| query.iter().find(|(k, _)| k == name).is_some_and(|(_, v)| value_matches(rule, v)))
}

/// Query parameters, percent-decoded; names are case-sensitive, the first occurrence counts.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Applies a header modifier: set replaces, add appends, remove deletes (case-insensitive).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
    for pair in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(pair.name.as_bytes()), HeaderValue::from_str(&pair.value)) {
            headers.insert(n, v);
        }
    }
    for pair in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(pair.name.as_bytes()), HeaderValue::from_str(&pair.value)) {
            headers.append(n, v);
        }
    }
}

/// The path after a path modifier; `matched_prefix` is the prefix that matched the request.
pub fn rewrite_path(path: &str, modifier: &PathModifier, matched_prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath { value } => value.clone(),
        PathModifier::ReplacePrefixMatch { value } => {
            let prefix = matched_prefix.unwrap_or("");
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let base = value.trim_end_matches('/');
            match (base.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{base}{rest}"),
            }
        }
    }
}

/// The `Location` of a redirect: scheme, host, port and path as the filter says, the rest from
/// the request. Default ports are left out.
pub fn redirect_location(
    r: &Redirect,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path: &str,
    query: Option<&str>,
    matched_prefix: Option<&str>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.hostname.as_deref().unwrap_or(host);
    // A scheme change without an explicit port drops the port (the spec's well-known ports).
    let port = match (r.port, r.scheme.is_some()) {
        (Some(p), _) => Some(p),
        (None, true) => None,
        (None, false) => port,
    };
    let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = r.path.as_ref().map_or_else(|| path.to_string(), |m| rewrite_path(path, m, matched_prefix));
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        loc.push_str(&format!(":{p}"));
    }
    loc.push_str(&path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

/// What a rule's request filters decided.
pub enum Filtered<'a> {
    /// Answer with a redirect.
    Redirect { status: u16, location: String },
    /// Answer a CORS preflight: 200, these headers, no body.
    Preflight(Vec<(HeaderName, HeaderValue)>),
    /// Forward the (modified) request; apply these to the response, then set `set_headers`;
    /// send copies to mirrors (already sampled by their percentage).
    Forward {
        response_mods: Vec<&'a HeaderModifier>,
        mirrors: Vec<&'a BackendRef>,
        set_headers: Vec<(HeaderName, HeaderValue)>,
    },
}

/// Applies a matched rule's request filters to the request: header modifiers and URL rewrites
/// change `parts` and `authority` (the Host to send); a redirect stops here. `scheme` and
/// `default_port` fill in the redirect's Location.
pub fn apply_request_filters<'a>(
    matched: &Matched<'a>,
    parts: &mut http::request::Parts,
    authority: &mut String,
    scheme: &str,
    default_port: Option<u16>,
) -> Result<Filtered<'a>, String> {
    apply_filters(&matched.rule.filters, matched.matched_prefix, parts, authority, scheme, default_port)
}

/// Applies `filters` (a rule's, or the chosen backend's) to the request; see
/// [`apply_request_filters`].
pub fn apply_filters<'a>(
    filters: &'a [Filter],
    matched_prefix: Option<&str>,
    parts: &mut http::request::Parts,
    authority: &mut String,
    scheme: &str,
    default_port: Option<u16>,
) -> Result<Filtered<'a>, String> {
    if filters.is_empty() {
        // Most rules have none: nothing to copy out of the request for them.
        return Ok(Filtered::Forward { response_mods: Vec::new(), mirrors: Vec::new(), set_headers: Vec::new() });
    }
    let host = crate::message::headers::host_of(authority).into_owned();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_owned);
    let mut response_mods = Vec::new();
    let mut mirrors = Vec::new();
    let mut set_headers = Vec::new();
    let mut new_path = None;
    for f in filters {
        match f {
            Filter::Cors { cors } => match cors.decide(&parts.method, &parts.headers) {
                Some(CorsAnswer::Preflight(headers)) => return Ok(Filtered::Preflight(headers)),
                Some(CorsAnswer::Actual(headers)) => set_headers.extend(headers),
                None => {}
            },
            Filter::RequestRedirect { redirect } => {
                let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).or(default_port);
                let location =
                    redirect_location(redirect, scheme, &host, port, &path, query.as_deref(), matched_prefix);
                return Ok(Filtered::Redirect { status: redirect.status_code.unwrap_or(302), location });
            }
            Filter::RequestHeaderModifier { modifier } => modify_headers(&mut parts.headers, modifier),
            Filter::ResponseHeaderModifier { modifier } => response_mods.push(modifier),
            Filter::UrlRewrite { rewrite } => {
                if let Some(h) = &rewrite.hostname {
                    *authority = h.clone();
                }
                if let Some(m) = &rewrite.path {
                    new_path = Some(rewrite_path(&path, m, matched_prefix));
                }
            }
            Filter::RequestMirror { mirror } => {
                if mirror.sampled(fastrand::f64()) {
                    mirrors.push(&mirror.backend_ref);
                }
            }
            // Asked before the filters run (`proxy::ext_authz`).
            Filter::ExternalAuth { .. } => {}
        }
    }
    if let Some(p) = new_path {
        let pq = match &query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        parts.uri = http::Uri::try_from(pq).map_err(|e| format!("rewritten path: {e}"))?;
    }
    Ok(Filtered::Forward { response_mods, mirrors, set_headers })
}

/// Chooses a backend with probability weight / total; `roll` is uniform in `0..total`.
/// A weight of 0 is never chosen.
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

/// A weighted random backend of a rule.
pub fn choose_backend(backends: &[BackendRef]) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    pick_backend(backends, fastrand::u64(0..total))
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
