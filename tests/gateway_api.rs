//! Gateway API HTTPRoute behaviour, conformance style: one table of routes and requests, run
//! against real processes twice, at the edge (the gateway's `gateway.routes`, HTTP/1.1 over
//! TLS) and in the mesh (a node's `[[routes]]`, plain HTTP to its outbound listener). Each case
//! is what the upstream conformance suite checks for the feature it names.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use support::*;

/// The gateway's and node-a's own request timeout (`timeouts.request`).
const MESH_TIMEOUT: Duration = Duration::from_millis(1500);

/// The routes under test, written once for both places: `{R}` is `routes` or `gateway.routes`.
const ROUTES: &str = r#"
[[{R}]]
name = "conf"
hostnames = ["conf.test"]

[[{R}.rules]]
name = "see-other"
matches = [{ path = { type = "Exact", value = "/r303" } }]
filters = [{ type = "RequestRedirect", requestRedirect = { statusCode = 303, path = { type = "ReplaceFullPath", replaceFullPath = "/target" } } }]

[[{R}.rules]]
matches = [{ path = { type = "Exact", value = "/r307" } }]
filters = [{ type = "RequestRedirect", requestRedirect = { statusCode = 307, hostname = "elsewhere.test" } }]

[[{R}.rules]]
matches = [{ path = { value = "/r308" } }]
filters = [{ type = "RequestRedirect", requestRedirect = { statusCode = 308, path = { type = "ReplacePrefixMatch", replacePrefixMatch = "/new" } } }]

[[{R}.rules]]
name = "sends-nowhere"
matches = [{ path = { value = "/empty" } }]

[[{R}.rules]]
matches = [{ path = { value = "/unknown" } }]
backendRefs = [{ name = "ghost" }]

[[{R}.rules]]
matches = [{ path = { value = "/all-zero" } }]
backendRefs = [{ name = "echo", weight = 0 }]

[[{R}.rules]]
matches = [{ path = { value = "/split" } }]
backendRefs = [{ name = "echo" }, { name = "ghost" }]

[[{R}.rules]]
name = "backend-filters"
matches = [{ path = { value = "/backend-filters" } }]
filters = [{ type = "RequestHeaderModifier", requestHeaderModifier = { set = [{ name = "x-rule", value = "r" }] } }]

[[{R}.rules.backendRefs]]
name = "echo"
filters = [
  { type = "RequestHeaderModifier", requestHeaderModifier = { set = [{ name = "x-backend", value = "b1" }], remove = ["x-drop"] } },
  { type = "ResponseHeaderModifier", responseHeaderModifier = { add = [{ name = "x-resp", value = "r1" }] } },
  { type = "URLRewrite", urlRewrite = { path = { type = "ReplaceFullPath", replaceFullPath = "/rewritten" } } },
]

[[{R}.rules]]
matches = [{ path = { value = "/backend-redirect" } }]
backendRefs = [{ name = "echo", filters = [{ type = "RequestRedirect", requestRedirect = { hostname = "backend.test", scheme = "http" } }] }]

[[{R}.rules]]
matches = [{ path = { value = "/no-timeout" } }]
timeouts = { request = "0s" }
backendRefs = [{ name = "slower" }]

[[{R}.rules]]
matches = [{ path = { value = "/no-try-timeout" } }]
timeouts = { backendRequest = "0s" }
backendRefs = [{ name = "slower" }]

[[{R}.rules]]
matches = [{ path = { value = "/short-timeout" } }]
timeouts = { request = "100ms" }
backendRefs = [{ name = "slow" }]

[[{R}.rules]]
matches = [{ path = { value = "/retry" } }]
retry = { attempts = 3, codes = [], backoff = "10ms" }
backendRefs = [{ name = "flaky" }]

[[{R}.rules]]
matches = [{ path = { value = "/liar" } }]
retry = { attempts = 3, codes = [], backoff = "10ms" }
backendRefs = [{ name = "liar" }]

[[{R}.rules]]
matches = [{ path = { value = "/cors-1" } }]
backendRefs = [{ name = "echo" }]
[[{R}.rules.filters]]
type = "CORS"
cors = { allowOrigins = ["https://www.foo.com", "https://*.bar.com"], allowMethods = ["GET", "OPTIONS"], allowHeaders = ["x-header-1", "x-header-2"], exposeHeaders = ["x-header-3", "x-header-4"], maxAge = 3600, allowCredentials = true }

[[{R}.rules]]
matches = [{ path = { value = "/cors-2" } }]
backendRefs = [{ name = "echo" }]
filters = [{ type = "CORS", cors = { allowOrigins = ["https://www.foo.com"], allowMethods = ["*"], allowHeaders = ["*"] } }]

[[{R}.rules]]
matches = [{ path = { value = "/cors-wildcard-origin" } }]
backendRefs = [{ name = "echo" }]
filters = [{ type = "CORS", cors = { allowOrigins = ["*"], allowMethods = ["*"] } }]
"#;

/// One request and what must come back.
struct Case {
    /// The upstream conformance test (or feature) the case stands for.
    feature: &'static str,
    method: &'static str,
    path: &'static str,
    /// Request headers sent besides Host (and `x-drop`).
    headers: &'static [(&'static str, &'static str)],
    /// Response headers that must not be there.
    absent: &'static [&'static str],
    status: u16,
    /// Expected `Location` (a `{port}` in it is the listener's port).
    location: Option<&'static str>,
    /// The path the backend saw.
    upstream_path: Option<&'static str>,
    /// Request headers the backend saw / must not see, response headers the client saw.
    upstream_headers: &'static [(&'static str, &'static str)],
    upstream_absent: &'static [&'static str],
    response_headers: &'static [(&'static str, &'static str)],
    /// The `quicmesh-error` of a proxy's own answer.
    error: Option<&'static str>,
}

const NONE: Case = Case {
    feature: "",
    method: "GET",
    path: "",
    headers: &[],
    absent: &[],
    status: 200,
    location: None,
    upstream_path: None,
    upstream_headers: &[],
    upstream_absent: &[],
    response_headers: &[],
    error: None,
};

fn cases() -> Vec<Case> {
    vec![
        Case {
            feature: "HTTPRouteRedirectStatusCode 303",
            path: "/r303?q=1",
            status: 303,
            location: Some("{scheme}://conf.test{port}/target?q=1"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteRedirectStatusCode 307",
            path: "/r307",
            status: 307,
            location: Some("{scheme}://elsewhere.test{port}/r307"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteRedirectStatusCode 308",
            path: "/r308/item",
            status: 308,
            location: Some("{scheme}://conf.test{port}/new/item"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteInvalidBackendRefs: no backendRefs, no filters",
            path: "/empty",
            status: 500,
            error: Some("invalid-backend"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteInvalidBackendRefUnknownKind / nonexistent backend",
            path: "/unknown",
            status: 500,
            error: Some("invalid-backend"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteWeight: every weight 0",
            path: "/all-zero",
            status: 500,
            error: Some("invalid-backend"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteBackendRequestHeaderModifier / backend URLRewrite / backend ResponseHeaderModifier",
            path: "/backend-filters/x",
            status: 200,
            upstream_path: Some("/rewritten"),
            upstream_headers: &[("x-backend", "b1"), ("x-rule", "r")],
            upstream_absent: &["x-drop"],
            response_headers: &[("x-resp", "r1")],
            ..NONE
        },
        Case {
            feature: "HTTPRouteBackendPathRedirect",
            path: "/backend-redirect",
            status: 302,
            location: Some("http://backend.test/backend-redirect"),
            ..NONE
        },
        Case { feature: "HTTPRouteRequestTimeout 0s: no limit", path: "/no-timeout", status: 200, ..NONE },
        Case { feature: "HTTPRouteBackendRequestTimeout 0s: no limit", path: "/no-try-timeout", status: 200, ..NONE },
        Case {
            feature: "HTTPRouteRequestTimeout",
            path: "/short-timeout",
            status: 504,
            error: Some("timeout"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: preflight from an exact origin",
            method: "OPTIONS",
            path: "/cors-1",
            headers: &[
                ("origin", "https://www.foo.com"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-header-1, x-header-2"),
            ],
            response_headers: &[
                ("access-control-allow-origin", "https://www.foo.com"),
                ("access-control-allow-methods", "GET, OPTIONS"),
                ("access-control-allow-headers", "x-header-1, x-header-2"),
                ("access-control-expose-headers", "x-header-3, x-header-4"),
                ("access-control-max-age", "3600"),
                ("access-control-allow-credentials", "true"),
            ],
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: preflight from a wildcard origin, several labels deep",
            method: "OPTIONS",
            path: "/cors-1",
            headers: &[("origin", "https://xpto.www.bar.com"), ("access-control-request-method", "GET")],
            response_headers: &[("access-control-allow-origin", "https://xpto.www.bar.com")],
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: preflight from an origin not allowed",
            method: "OPTIONS",
            path: "/cors-1",
            headers: &[("origin", "https://foobar.com"), ("access-control-request-method", "GET")],
            absent: &["access-control-allow-origin"],
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: simple request from a wildcard origin",
            path: "/cors-1",
            headers: &[("origin", "https://www.bar.com")],
            response_headers: &[
                ("access-control-allow-origin", "https://www.bar.com"),
                ("access-control-allow-credentials", "true"),
            ],
            upstream_path: Some("/cors-1"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: simple request from an origin not allowed",
            path: "/cors-1",
            headers: &[("origin", "https://foobar.com")],
            absent: &["access-control-allow-origin"],
            upstream_path: Some("/cors-1"),
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: wildcard methods and headers echo the preflight's, no credentials",
            method: "OPTIONS",
            path: "/cors-2",
            headers: &[
                ("origin", "https://www.foo.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-a, x-b"),
            ],
            response_headers: &[
                ("access-control-allow-origin", "https://www.foo.com"),
                ("access-control-allow-methods", "POST"),
                ("access-control-allow-headers", "x-a, x-b"),
                ("access-control-max-age", "5"),
            ],
            absent: &["access-control-allow-credentials"],
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: any origin, with a port",
            method: "OPTIONS",
            path: "/cors-wildcard-origin",
            headers: &[("origin", "https://foobar.com:12345"), ("access-control-request-method", "PUT")],
            response_headers: &[
                ("access-control-allow-origin", "https://foobar.com:12345"),
                ("access-control-allow-methods", "PUT"),
            ],
            absent: &["access-control-allow-credentials"],
            ..NONE
        },
        Case {
            feature: "HTTPRouteCORS: actual request from any origin",
            method: "PUT",
            path: "/cors-wildcard-origin",
            headers: &[("origin", "https://foobar.com:12345")],
            response_headers: &[("access-control-allow-origin", "https://foobar.com:12345")],
            upstream_path: Some("/cors-wildcard-origin"),
            ..NONE
        },
    ]
}

/// What came back: status, headers, body.
type Answer = (u16, http::HeaderMap, String);

struct Setup {
    gw: NodeProc,
    a: NodeProc,
    _b: NodeProc,
    pki: Pki,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    pki.issue("gateway");
    let (echo, slow) = (echo_backend().await, delayed_backend("slow", Duration::from_millis(300)).await);
    // Slower than the callers' own request timeout (MESH_TIMEOUT): only a rule's "0s" lets it
    // answer.
    let slower = delayed_backend("slower", MESH_TIMEOUT + Duration::from_millis(500)).await;
    let flaky = flaky_backend().await;
    let liar = liar_backend().await;
    let svc = format!(
        "[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"slow\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{slow}\"\n\n\
         [[services]]\nname = \"slower\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{slower}\"\n\n\
         [[services]]\nname = \"flaky\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{flaky}\"\n\n\
         [[services]]\nname = \"liar\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{liar}\"\n\n"
    );
    let log = |who: &str| {
        format!(
            "[access_log]\noutput = \"file\"\npath = \"{}\"\n\n",
            pki.path().join(format!("{who}-access.log")).display()
        )
    };
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let mesh_routes = ROUTES.replace("{R}", "routes");
    let a_toml =
        node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &format!("{}{svc}{mesh_routes}", log("node-a")))
            .replace("request = \"10s\"", &format!("request = \"{}ms\"", MESH_TIMEOUT.as_millis()));
    assert!(a_toml.contains(&format!("request = \"{}ms\"", MESH_TIMEOUT.as_millis())));
    let a = NodeProc::start(pki.path(), "node-a", &a_toml);
    let edge_routes = ROUTES.replace("{R}", "gateway.routes");
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[timeouts]\nconnect = \"2s\"\nrequest = \"{}ms\"\n\n{}\
         [gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n[gateway.tls]\nstate_dir = \"{}\"\n\n\
         {edge_routes}\n[[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        MESH_TIMEOUT.as_millis(),
        log("gateway"),
        state.display(),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    Setup { gw, a, _b: b, pki }
}

/// A backend that drops the connection, without answering, to the first N requests for each
/// `/retry/<id>/fail-<N>` (the conformance suite's "succeedAfter"), then answers 200.
async fn flaky_backend() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, u32>::new()));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
                let path = line.split(' ').nth(1).unwrap_or("");
                let (id, fail) = path.rsplit_once("/fail-").unwrap_or((path, "0"));
                let fail: u32 = fail.parse().unwrap_or(0);
                let failed_so_far = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.entry(id.to_string()).or_insert(0);
                    *n += 1;
                    *n - 1
                };
                if failed_so_far < fail {
                    return; // dropped unanswered
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n").await;
            });
        }
    });
    addr
}

/// A backend that answers 502 claiming, in the mesh's own header, that a proxy made it.
async fn liar_backend() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let answer = "HTTP/1.1 502 Bad Gateway\r\nquicmesh-error: upstream-reset\r\nquicmesh-unsent: 1\r\n\
                              content-length: 4\r\nconnection: close\r\n\r\nlie\n";
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A GET through the edge: HTTP/1.1 over TLS, SNI and Host `conf.test`.
async fn edge_get(port: u16, path: &str) -> Answer {
    edge_request(port, "GET", path, &[]).await
}

async fn edge_request(port: u16, method: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect("conf.test".try_into().unwrap(), tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req =
        http::Request::builder().method(method).uri(path).header("host", "conf.test").header("x-drop", "secret");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    answer(send.send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap()).await
}

/// A GET through the mesh: plain HTTP to node-a's outbound listener, Host `conf.test`.
async fn mesh_get(outbound: SocketAddr, path: &str) -> Answer {
    mesh_request(outbound, "GET", path, &[]).await
}

async fn mesh_request(outbound: SocketAddr, method: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{path}"))
        .header("host", "conf.test")
        .header("x-drop", "secret");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    answer(client.request(req.body(Empty::new()).unwrap()).await.unwrap()).await
}

async fn answer(resp: http::Response<hyper::body::Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Checks one case's answer; `scheme` and `port` fill in expected Locations.
fn check(case: &Case, got: &Answer, place: &str, scheme: &str, port: &str) {
    let (status, headers, body) = got;
    let what = format!("{place}: {} ({} {})", case.feature, case.method, case.path);
    assert_eq!(*status, case.status, "{what}: status; body {body}");
    if let Some(loc) = case.location {
        let want = loc.replace("{scheme}", scheme).replace("{port}", port);
        assert_eq!(headers.get("location").and_then(|v| v.to_str().ok()), Some(want.as_str()), "{what}: Location");
    }
    if let Some(err) = case.error {
        assert_eq!(headers.get("quicmesh-error").and_then(|v| v.to_str().ok()), Some(err), "{what}: reason");
    }
    for (name, value) in case.response_headers {
        assert_eq!(headers.get(*name).and_then(|v| v.to_str().ok()), Some(*value), "{what}: response {name}");
    }
    for name in case.absent {
        assert!(headers.get(*name).is_none(), "{what}: response has {name}");
    }
    if case.upstream_path.is_some() || !case.upstream_headers.is_empty() || !case.upstream_absent.is_empty() {
        let echoed: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        if let Some(p) = case.upstream_path {
            assert_eq!(echoed["path"], p, "{what}: upstream path");
        }
        for (name, value) in case.upstream_headers {
            assert_eq!(echoed["headers"][*name], *value, "{what}: upstream {name}");
        }
        for name in case.upstream_absent {
            assert!(echoed["headers"].get(*name).is_none(), "{what}: upstream still has {name}");
        }
    }
}

/// The access log names the rule a request matched, when the rule has a name.
fn logged_rules(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["rule"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_features_hold_at_the_edge_and_in_the_mesh() {
    let s = setup().await;
    let port = s.gw.addrs.listen.port();
    for case in cases() {
        let edge = edge_request(port, case.method, case.path, case.headers).await;
        check(&case, &edge, "edge", "https", &format!(":{port}"));
        // A node's clients speak plain HTTP on the default port: no port in its Locations.
        let mesh = mesh_request(s.a.addrs.outbound, case.method, case.path, case.headers).await;
        check(&case, &mesh, "mesh", "http", "");
    }
    // A weighted split where one backend is invalid: that share answers 500, the rest 200.
    for (place, outbound) in [("edge", None), ("mesh", Some(s.a.addrs.outbound))] {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..60 {
            let got = match outbound {
                Some(o) => mesh_get(o, "/split").await,
                None => edge_get(port, "/split").await,
            };
            *seen.entry(got.0).or_insert(0) += 1;
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [200, 500], "{place}: {seen:?}");
        assert!(seen[&200] >= 15 && seen[&500] >= 15, "{place}: about half each: {seen:?}");
    }
    // HTTPRouteRetryConnectionError: with retries configured and no codes, connection errors
    // are retried; 3 retries outlast 2 failures, not 4, and then the answer is 503.
    for (place, outbound) in [("edge", None), ("mesh", Some(s.a.addrs.outbound))] {
        for (fail, want) in [(2, 200), (4, 503)] {
            let path = format!("/retry/{place}-{fail}/fail-{fail}");
            let got = match outbound {
                Some(o) => mesh_get(o, &path).await,
                None => edge_get(port, &path).await,
            };
            assert_eq!(got.0, want, "{place}: {path}: {got:?}");
        }
    }
    // An instance cannot pass its answer off as the mesh's: a 502 it made, claiming to be a
    // proxy's `upstream-reset`, is the application's answer, and no retry follows.
    for (place, outbound) in [("edge", None), ("mesh", Some(s.a.addrs.outbound))] {
        let got = match outbound {
            Some(o) => mesh_get(o, "/liar").await,
            None => edge_get(port, "/liar").await,
        };
        assert_eq!((got.0, got.2.as_str()), (502, "lie\n"), "{place}: {got:?}");
        assert!(got.1.get("quicmesh-error").is_none(), "{place}: {got:?}");
    }
    // Named rules appear in the access logs.
    for who in ["gateway", "node-a"] {
        let file = s.pki.path().join(format!("{who}-access.log"));
        let rules = eventually(Duration::from_secs(5), "the access log lines", || async {
            let r = logged_rules(&file);
            (r.iter().any(|n| n == "backend-filters") && r.iter().any(|n| n == "see-other")).then_some(r)
        })
        .await;
        assert!(rules.iter().any(|n| n == "sends-nowhere"), "{who}: {rules:?}");
    }
    // And in the metrics, counted by route and rule.
    for (who, admin) in [("gateway", s.gw.addrs.admin), ("node-a", s.a.addrs.admin)] {
        let m = http_get(&format!("http://{admin}/metrics")).await.1;
        for rule in ["see-other", "sends-nowhere", "backend-filters"] {
            let n = metric(&m, "quicmesh_route_rule_matches_total", &[("route", "conf"), ("rule", rule)]);
            assert!(n >= 1.0, "{who}: rule {rule} counted {n} times");
        }
    }
}

/// GAMMA: a mesh route attached to a service by parentRef (`kind = "Service"`) applies to
/// calls addressed to that service, by its name or an alias, and with a `port` only to calls
/// to that port (the Host's, 80 without one); other calls go to the service untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_routes_attach_to_a_service_and_its_port() {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let echo = echo_backend().await;
    let svc = format!(
        "[[services]]\nname = \"echo\"\nhosts = [\"echo.mesh\"]\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n"
    );
    let routes = r#"
[[routes]]
name = "echo-8080"
parentRefs = [{ kind = "Service", name = "echo", port = 8080 }]
[[routes.rules]]
filters = [{ type = "RequestHeaderModifier", requestHeaderModifier = { set = [{ name = "x-route", value = "echo-8080" }] } }]
backendRefs = [{ name = "echo" }]
"#;
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a = NodeProc::start(
        pki.path(),
        "node-a",
        &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &format!("{svc}{routes}")),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    for (host, routed) in
        [("echo:8080", true), ("echo", false), ("echo:9090", false), ("echo.mesh:8080", true), ("echo.mesh", false)]
    {
        let req = http::Request::get(format!("http://{}/x", a.addrs.outbound))
            .header("host", host)
            .body(Empty::new())
            .unwrap();
        let (status, _, body) = answer(client.request(req).await.unwrap()).await;
        assert_eq!(status, 200, "{host}: {body}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        let route = seen["headers"].get("x-route").and_then(|v| v.as_str());
        assert_eq!(route, routed.then_some("echo-8080"), "{host}: {body}");
    }
}
