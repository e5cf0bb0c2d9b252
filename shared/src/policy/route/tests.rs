//! Table-driven tests of matching, precedence (each rule and its ties), filters, redirects and
//! rewrites.

use super::*;

fn routes(toml_text: &str) -> RouteTable {
    #[derive(Deserialize)]
    struct Doc {
        routes: Vec<HttpRoute>,
    }
    let doc: Doc = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
    RouteTable::new(doc.routes).unwrap()
}

struct Req<'a> {
    host: &'a str,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a [(&'a str, &'a str)],
}

fn req<'a>(host: &'a str, path: &'a str) -> Req<'a> {
    Req { host, method: "GET", path, query: None, headers: &[] }
}

fn winner(t: &RouteTable, r: &Req) -> Option<String> {
    let mut h = HeaderMap::new();
    for (k, v) in r.headers {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let m = Method::from_bytes(r.method.as_bytes()).unwrap();
    t.find(r.host, &m, r.path, r.query, &h).map(|m| {
        let rule = m.route.rules.iter().position(|x| std::ptr::eq(x, m.rule)).unwrap();
        format!("{}#{rule}", m.route.name)
    })
}

#[test]
fn each_match_kind() {
    let t = routes(
        r#"
[[routes]]
name = "exact"
[[routes.rules]]
matches = [{ path = { type = "Exact", value = "/exact" } }]
[[routes]]
name = "prefix"
[[routes.rules]]
matches = [{ path = { type = "PathPrefix", value = "/api/" } }]
[[routes]]
name = "regex"
[[routes.rules]]
matches = [{ path = { type = "RegularExpression", value = "/items/[0-9]+" } }]
[[routes]]
name = "header"
[[routes.rules]]
matches = [{ path = { value = "/h" }, headers = [{ name = "X-Team", value = "blue" }] }]
[[routes.rules]]
matches = [{ path = { value = "/h" }, headers = [{ type = "RegularExpression", name = "x-team", value = "gr.*" }] }]
[[routes]]
name = "query"
[[routes.rules]]
matches = [{ path = { value = "/q" }, queryParams = [{ name = "v", value = "2 x" }] }]
[[routes]]
name = "method"
[[routes.rules]]
matches = [{ path = { value = "/m" }, method = "POST" }]
"#,
    );
    let cases: &[(Req, Option<&str>)] = &[
        (req("any", "/exact"), Some("exact#0")),
        (req("any", "/exact/more"), None),
        (req("any", "/api"), Some("prefix#0")),
        (req("any", "/api/x"), Some("prefix#0")),
        (req("any", "/apix"), None),
        (req("any", "/items/42"), Some("regex#0")),
        (req("any", "/items/4x"), None),
        (Req { headers: &[("x-team", "blue")], ..req("any", "/h") }, Some("header#0")),
        (Req { headers: &[("X-TEAM", "green")], ..req("any", "/h") }, Some("header#1")),
        (Req { headers: &[("x-team", "red")], ..req("any", "/h") }, None),
        (Req { query: Some("a=1&v=2+x"), ..req("any", "/q") }, Some("query#0")),
        (Req { query: Some("v=2%20x"), ..req("any", "/q") }, Some("query#0")),
        (Req { query: Some("V=2 x"), ..req("any", "/q") }, None),
        (Req { method: "POST", ..req("any", "/m") }, Some("method#0")),
        (req("any", "/m"), None),
    ];
    for (r, want) in cases {
        assert_eq!(winner(&t, r).as_deref(), *want, "{} {} {:?} {:?}", r.method, r.path, r.query, r.headers);
    }
}

#[test]
fn hostnames_exact_wildcard_and_any() {
    let t = routes(
        r#"
[[routes]]
name = "any"
[[routes.rules]]
[[routes]]
name = "wild"
hostnames = ["*.example.com"]
[[routes.rules]]
[[routes]]
name = "deeper-wild"
hostnames = ["*.api.example.com"]
[[routes.rules]]
[[routes]]
name = "exact"
hostnames = ["www.example.com"]
[[routes.rules]]
"#,
    );
    assert_eq!(winner(&t, &req("www.example.com", "/")).as_deref(), Some("exact#0"));
    assert_eq!(winner(&t, &req("a.example.com", "/")).as_deref(), Some("wild#0"));
    assert_eq!(winner(&t, &req("v1.api.example.com", "/")).as_deref(), Some("deeper-wild#0"));
    assert_eq!(winner(&t, &req("example.com", "/")).as_deref(), Some("any#0"), "a wildcard needs a label");
    assert_eq!(winner(&t, &req("other.org", "/")).as_deref(), Some("any#0"));
    let only = routes("[[routes]]\nname = \"x\"\nhostnames = [\"a.test\"]\n[[routes.rules]]\n");
    assert_eq!(winner(&only, &req("b.test", "/")), None);
}

/// Every precedence rule, each decided by exactly one criterion, then the ties.
#[test]
fn precedence_rules_and_ties() {
    let t = routes(
        r#"
[[routes]]
name = "a-prefix-short"
[[routes.rules]]
matches = [{ path = { value = "/p" } }]
[[routes]]
name = "b-prefix-long"
[[routes.rules]]
matches = [{ path = { value = "/p/longer" } }]
[[routes]]
name = "c-exact"
[[routes.rules]]
matches = [{ path = { type = "Exact", value = "/p/longer/x" } }]
[[routes]]
name = "d-method"
[[routes.rules]]
matches = [{ path = { value = "/m" }, method = "GET" }]
[[routes]]
name = "e-headers-one"
[[routes.rules]]
matches = [{ path = { value = "/m" }, headers = [{ name = "a", value = "1" }] }]
[[routes]]
name = "f-headers-two"
[[routes.rules]]
matches = [{ path = { value = "/h" }, headers = [{ name = "a", value = "1" }, { name = "b", value = "2" }] }]
[[routes]]
name = "g-headers-one"
[[routes.rules]]
matches = [{ path = { value = "/h" }, headers = [{ name = "a", value = "1" }] }]
[[routes]]
name = "h-query-one"
[[routes.rules]]
matches = [{ path = { value = "/q" }, headers = [{ name = "a", value = "1" }], queryParams = [{ name = "x", value = "1" }] }]
[[routes]]
name = "i-headers-only"
[[routes.rules]]
matches = [{ path = { value = "/q" }, headers = [{ name = "a", value = "1" }] }]
[[routes]]
name = "j-older"
[[routes.rules]]
matches = [{ path = { value = "/tie" } }]
[[routes]]
name = "a-newer"
[[routes.rules]]
matches = [{ path = { value = "/tie" } }]
[[routes]]
name = "k-rules"
[[routes.rules]]
matches = [{ path = { value = "/rules" } }]
[[routes.rules]]
matches = [{ path = { value = "/rules" } }]
[[routes]]
name = "l-regex"
[[routes.rules]]
matches = [{ path = { type = "RegularExpression", value = "/p/.*" } }]
"#,
    );
    let hdr: &[(&str, &str)] = &[("a", "1"), ("b", "2")];
    let cases: &[(Req, &str)] = &[
        (req("h", "/p/x"), "a-prefix-short#0"), // only the short prefix (regex ranks below prefixes)
        (req("h", "/p/longer/y"), "b-prefix-long#0"), // longest prefix
        (req("h", "/p/longer/x"), "c-exact#0"), // exact over any prefix
        (Req { headers: hdr, ..req("h", "/m") }, "d-method#0"), // method over header count
        (Req { headers: hdr, ..req("h", "/h") }, "f-headers-two#0"), // most headers
        (Req { query: Some("x=1"), headers: hdr, ..req("h", "/q") }, "h-query-one#0"), // most query params
        (req("h", "/tie"), "j-older#0"),        // tie: listed first, despite its name
        (req("h", "/rules"), "k-rules#0"),      // tie: first rule
    ];
    for (r, want) in cases {
        assert_eq!(winner(&t, r).as_deref(), Some(*want), "{} {:?}", r.path, r.headers);
    }
}

#[test]
fn header_modifiers_set_add_remove() {
    let mut h = HeaderMap::new();
    h.insert("x-old", HeaderValue::from_static("1"));
    h.insert("x-keep", HeaderValue::from_static("1"));
    h.insert("x-set", HeaderValue::from_static("before"));
    let m = HeaderModifier {
        set: vec![HeaderValuePair { name: "X-Set".into(), value: "after".into() }],
        add: vec![HeaderValuePair { name: "x-keep".into(), value: "2".into() }],
        remove: vec!["X-OLD".into()],
    };
    modify_headers(&mut h, &m);
    assert!(!h.contains_key("x-old"));
    assert_eq!(h["x-set"], "after");
    assert_eq!(h.get_all("x-keep").iter().collect::<Vec<_>>(), ["1", "2"]);
}

#[test]
fn rewrites_give_the_expected_upstream_path() {
    let full = PathModifier::ReplaceFullPath { value: "/new".into() };
    let prefix = |v: &str| PathModifier::ReplacePrefixMatch { value: v.into() };
    let cases: &[(&str, &PathModifier, Option<&str>, &str)] = &[
        ("/old/a/b", &full, Some("/old"), "/new"),
        ("/old/a/b", &prefix("/v2"), Some("/old"), "/v2/a/b"),
        ("/old", &prefix("/v2"), Some("/old"), "/v2"),
        ("/old/", &prefix("/v2/"), Some("/old"), "/v2/"),
        ("/old/a", &prefix("/"), Some("/old"), "/a"),
        ("/old", &prefix("/"), Some("/old"), "/"),
    ];
    for (path, m, matched, want) in cases {
        assert_eq!(rewrite_path(path, m, *matched), *want, "{path} {m:?}");
    }
}

#[test]
fn redirects_give_the_expected_location() {
    let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>, path: Option<PathModifier>| Redirect {
        scheme: scheme.map(Into::into),
        hostname: host.map(Into::into),
        port,
        path,
        status_code: Some(301),
    };
    let cases: Vec<(Redirect, &str)> = vec![
        (r(Some("https"), None, None, None), "https://example.com/a/b?q=1"),
        (r(None, Some("other.test"), None, None), "http://other.test:8080/a/b?q=1"),
        (r(None, None, Some(9000), None), "http://example.com:9000/a/b?q=1"),
        (r(Some("https"), None, Some(443), None), "https://example.com/a/b?q=1"),
        (
            r(None, None, None, Some(PathModifier::ReplacePrefixMatch { value: "/z".into() })),
            "http://example.com:8080/z/b?q=1",
        ),
        (
            r(None, None, None, Some(PathModifier::ReplaceFullPath { value: "/".into() })),
            "http://example.com:8080/?q=1",
        ),
    ];
    for (redir, want) in cases {
        let got = redirect_location(&redir, "http", "example.com", Some(8080), "/a/b", Some("q=1"), Some("/a"));
        assert_eq!(got, want, "{redir:?}");
    }
}

#[test]
fn invalid_routes_are_refused_with_the_route_name() {
    let bad = [
        r#"[[routes]]
name = "bad-regex"
[[routes.rules]]
matches = [{ path = { type = "RegularExpression", value = "(" } }]"#,
        // It would close the anchoring group and match every path (hostile finding 11).
        r#"[[routes]]
name = "escapes-anchor"
[[routes.rules]]
matches = [{ path = { type = "RegularExpression", value = "/api)|(.*" } }]"#,
        r#"[[routes]]
name = "escapes-header-anchor"
[[routes.rules]]
matches = [{ headers = [{ type = "RegularExpression", name = "x", value = "a)|(.*" }] }]"#,
        r#"[[routes]]
name = "bad-status"
[[routes.rules]]
filters = [{ type = "RequestRedirect", requestRedirect = { statusCode = 304 } }]"#,
        r#"[[routes]]
name = "bad-rule-name"
[[routes.rules]]
name = "Not_A_Name""#,
        r#"[[routes]]
name = "twice-named"
[[routes.rules]]
name = "a"
[[routes.rules]]
name = "a""#,
        r#"[[routes]]
name = "bad-path"
[[routes.rules]]
matches = [{ path = { value = "nope" } }]"#,
        r#"[[routes]]
name = "both"
[[routes.rules]]
filters = [{ type = "RequestRedirect", requestRedirect = {} }, { type = "URLRewrite", urlRewrite = {} }]"#,
    ];
    #[derive(Deserialize)]
    struct Doc {
        routes: Vec<HttpRoute>,
    }
    for text in bad {
        let doc: Doc = toml::from_str(text).unwrap();
        let name = doc.routes[0].name.clone();
        let err = RouteTable::new(doc.routes).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(&name), "{name}: {err}");
    }
    // Unknown fields are refused at parse time.
    assert!(toml::from_str::<Doc>("[[routes]]\nname = \"x\"\n[[routes.rules]]\nmatchs = []\n").is_err());
}

#[test]
fn filters_and_backends_parse_in_gateway_api_shape() {
    let t = routes(
        r#"
[[routes]]
name = "full"
hostnames = ["shop.example"]
[[routes.rules]]
matches = [{ path = { value = "/cart" } }]
filters = [
  { type = "RequestHeaderModifier", requestHeaderModifier = { set = [{ name = "x-a", value = "1" }], remove = ["x-b"] } },
  { type = "ResponseHeaderModifier", responseHeaderModifier = { add = [{ name = "x-c", value = "2" }] } },
  { type = "URLRewrite", urlRewrite = { hostname = "cart.internal", path = { type = "ReplacePrefixMatch", replacePrefixMatch = "/" } } },
  { type = "RequestMirror", requestMirror = { backendRef = { name = "shadow" }, percent = 10 } },
]
backendRefs = [{ name = "cart", labels = { version = "v1" }, weight = 70 }, { name = "cart", labels = { version = "v2" }, weight = 30 }]
timeouts = { request = "5s", backendRequest = "1s" }
"#,
    );
    let m = winner(&t, &req("shop.example", "/cart/items"));
    assert_eq!(m.as_deref(), Some("full#0"));
    let rule = &t.routes()[0].rules[0];
    assert_eq!(rule.filters.len(), 4);
    assert_eq!(rule.backend_refs.iter().map(|b| b.weight).sum::<u32>(), 100);
    assert_eq!(rule.timeouts.as_ref().unwrap().backend_request, Some(Duration::from_secs(1)));
}

/// The indexed lookup agrees with a brute-force scan of every entry, over a mixed table and many
/// requests (hosts exact/wildcard/any, paths of every kind, headers, methods).
#[test]
fn indexed_lookup_agrees_with_brute_force() {
    let mut text = String::new();
    let hosts = ["", "a.test", "*.test", "*.b.test", "b.test"];
    let paths = [
        r#"{ type = "Exact", value = "/x/y" }"#,
        r#"{ value = "/x" }"#,
        r#"{ value = "/" }"#,
        r#"{ type = "RegularExpression", value = "/x/.*" }"#,
        r#"{ value = "/z/w" }"#,
    ];
    for i in 0..40 {
        let host = hosts[i % hosts.len()];
        text.push_str(&format!("[[routes]]\nname = \"r{i}\"\n"));
        if !host.is_empty() {
            text.push_str(&format!("hostnames = [\"{host}\"]\n"));
        }
        let path = paths[(i / 2) % paths.len()];
        let extra = match i % 3 {
            0 => String::new(),
            1 => ", method = \"GET\"".into(),
            _ => ", headers = [{ name = \"h\", value = \"1\" }]".into(),
        };
        text.push_str(&format!("[[routes.rules]]\nmatches = [{{ path = {path}{extra} }}]\n"));
    }
    let t = routes(&text);
    let brute = |host: &str, method: &Method, path: &str, headers: &HeaderMap| -> Option<usize> {
        type Key = ((usize, usize), Rank, std::cmp::Reverse<usize>, usize);
        let mut best: Option<Key> = None;
        for (ei, e) in t.entries.iter().enumerate() {
            let hs = host_patterns(&t.routes[e.route].hostnames)
                .iter()
                .filter_map(|p| match p {
                    HostPattern::Any => Some((0, 0)),
                    HostPattern::Exact(h) if h == host => Some((h.len(), h.len())),
                    HostPattern::Suffix(s) if host.len() > s.len() && host.ends_with(s.as_str()) => Some((0, s.len())),
                    _ => None,
                })
                .max();
            let Some(hs) = hs else { continue };
            if !matches(&e.matcher, method, path, &[], headers) {
                continue;
            }
            let key = (hs, e.rank, std::cmp::Reverse(ei), ei);
            if best.as_ref().is_none_or(|b| (key.0, key.1, key.2) > (b.0, b.1, b.2)) {
                best = Some(key);
            }
        }
        best.map(|b| b.3)
    };
    let mut with_h = HeaderMap::new();
    with_h.insert("h", HeaderValue::from_static("1"));
    let none = HeaderMap::new();
    let mut checked = 0;
    for host in ["a.test", "c.test", "x.b.test", "b.test", "other", "test"] {
        for path in ["/", "/x", "/x/y", "/x/q", "/z/w", "/z/w/v", "/zz", "/x/y/z"] {
            for method in [Method::GET, Method::POST] {
                for h in [&none, &with_h] {
                    let got = t.find(host, &method, path, None, h).map(|m| (m.route.name.clone(), m.rule as *const _));
                    let want = brute(host, &method, path, h).map(|ei| {
                        let e = &t.entries[ei];
                        (t.routes[e.route].name.clone(), &t.routes[e.route].rules[e.rule] as *const _)
                    });
                    assert_eq!(got, want, "{host} {method} {path} {:?}", h.len());
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 192);
}

#[test]
fn weights_split_exactly_and_zero_never_wins() {
    let b = |w| BackendRef { name: "s".into(), labels: Default::default(), weight: w, filters: Vec::new() };
    let backends = vec![b(70), b(30), b(0)];
    let mut counts = [0; 3];
    for roll in 0..100 {
        let chosen = pick_backend(&backends, roll).unwrap();
        counts[backends.iter().position(|x| std::ptr::eq(x, chosen)).unwrap()] += 1;
    }
    assert_eq!(counts, [70, 30, 0]);
    // Random choice over 1000 requests: 70/30 within 5 sd (sd = 14.5), never the zero weight.
    let mut counts = [0; 3];
    for _ in 0..1000 {
        let chosen = choose_backend(&backends).unwrap();
        counts[backends.iter().position(|x| std::ptr::eq(x, chosen)).unwrap()] += 1;
    }
    assert!((628..=772).contains(&counts[0]) && counts[2] == 0, "{counts:?}");
    assert!(choose_backend(&[b(0)]).is_none());
}

#[test]
fn cors_origins_match_exactly_or_by_wildcard_and_bad_ones_are_refused() {
    let cors = |origins: &[&str]| Cors {
        allow_origins: origins.iter().map(|o| o.to_string()).collect(),
        allow_credentials: false,
        allow_methods: vec![],
        allow_headers: vec![],
        expose_headers: vec![],
        max_age: 5,
    };
    let c = cors(&["https://www.foo.com", "https://*.bar.com", "http://local.test:8080"]);
    for (origin, allowed) in [
        ("https://www.foo.com", true),
        ("HTTPS://WWW.FOO.COM", true),
        ("http://www.foo.com", false),
        ("https://www.foo.com:8443", false),
        ("https://a.bar.com", true),
        ("https://a.b.bar.com", true),
        ("https://bar.com", false),
        ("https://evilbar.com", false),
        ("http://local.test:8080", true),
        ("http://local.test", false),
        ("null", false),
    ] {
        assert_eq!(c.allows(origin), allowed, "{origin}");
    }
    assert!(cors(&["*"]).allows("https://anything.example:1"));
    for bad in ["www.foo.com", "https://*", "https://a.*.com", "ftp://x.test", "https://x.test/path", "https://*x.com"]
    {
        assert!(cors(&[bad]).check().is_err(), "{bad}");
    }
}

#[test]
fn mirrors_sample_by_percent_or_fraction() {
    #[derive(Deserialize)]
    struct Doc {
        routes: Vec<HttpRoute>,
    }
    let mirror = |spec: &str| {
        let text = format!(
            "[[routes]]\nname = \"m\"\n[[routes.rules]]\nfilters = [{{ type = \"RequestMirror\", requestMirror = {{ backendRef = {{ name = \"s\" }}{spec} }} }}]\n"
        );
        let doc: Doc = toml::from_str(&text).unwrap();
        let table = RouteTable::new(doc.routes.clone()).map(drop);
        match &doc.routes[0].rules[0].filters[0] {
            Filter::RequestMirror { mirror } => (mirror.clone(), table),
            _ => unreachable!(),
        }
    };
    let (all, ok) = mirror("");
    assert!(ok.is_ok() && all.sampled(0.999));
    let (third, ok) = mirror(", fraction = { numerator = 1, denominator = 3 }");
    assert!(ok.is_ok());
    assert!(third.sampled(0.33) && !third.sampled(0.34));
    let (half, _) = mirror(", fraction = { numerator = 50 }");
    assert!(half.sampled(0.49) && !half.sampled(0.5));
    let (ten, _) = mirror(", percent = 10");
    assert!(ten.sampled(0.09) && !ten.sampled(0.1));
    assert!(mirror(", percent = 10, fraction = { numerator = 1 }").1.is_err());
    assert!(mirror(", fraction = { numerator = 4, denominator = 3 }").1.is_err());
    assert!(mirror(", fraction = { numerator = 0, denominator = 0 }").1.is_err());
}

#[test]
fn external_auth_on_a_backend_is_refused_not_skipped() {
    #[derive(Deserialize)]
    struct Doc {
        routes: Vec<HttpRoute>,
    }
    let auth = "{ type = \"ExternalAuth\", externalAuth = { protocol = \"HTTP\", backendRef = { name = \"authz\" } } }";
    let on_rule = format!(
        "[[routes]]\nname = \"r\"\n[[routes.rules]]\nfilters = [{auth}]\nbackendRefs = [{{ name = \"web\" }}]\n"
    );
    let on_backend = format!(
        "[[routes]]\nname = \"r\"\n[[routes.rules]]\nbackendRefs = [{{ name = \"web\", filters = [{auth}] }}]\n"
    );
    let table = |text: &str| RouteTable::new(toml::from_str::<Doc>(text).unwrap_or_else(|e| panic!("{e}")).routes);
    assert!(table(&on_rule).is_ok());
    let err = table(&on_backend).err().expect("accepted an externalAuth that would never run").to_string();
    assert!(err.contains("rule's filters"), "{err}");
}
