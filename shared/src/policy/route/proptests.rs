//! Property tests of route precedence (the table picks what a plain reference picks, and
//! declaration order only breaks ties) and of weighted backend choice.

use std::collections::HashMap;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::select;

use super::*;

fn config(cases: u32) -> ProptestConfig {
    // No regression files: a failure prints its minimal case.
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// Small alphabets, so that generated routes overlap and tie often.
const HOSTNAMES: &[&str] = &["a.test", "b.a.test", "B.A.Test", "*.test", "*.a.test", "*.A.TEST", "other.org"];
const HOSTS: &[&str] = &["a.test", "b.a.test", "c.a.test", "x.test", "test", "other.org", "a.other.org"];
const SEGMENTS: &[&str] = &["a", "b", "ab", "c"];
const PATH_REGEXES: &[&str] = &["/a/.*", "/[ab]+", "/a(/b)?", ".*", "/(a|b)/c", "/c.*"];
const VALUE_REGEXES: &[&str] = &["[12]", "2|3", ".*"];
const HEADER_NAMES: &[&str] = &["x", "X", "y"];
const QUERY_NAMES: &[&str] = &["q", "Q", "r"];
const VALUES: &[&str] = &["1", "2", "3"];

/// `/`, or up to three segments with an optional trailing slash (never an empty segment; `ab`
/// tells a whole-segment prefix `/a` from a string prefix).
fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(select(SEGMENTS), 0..=3), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = format!("/{}", segs.join("/"));
        if slash && !segs.is_empty() {
            p.push('/');
        }
        p
    })
}

fn path_match() -> impl Strategy<Value = Option<PathMatch>> {
    let kind = |kind| move |value| Some(PathMatch { kind, value });
    prop_oneof![
        Just(None),
        path().prop_map(kind(PathMatchType::Exact)),
        path().prop_map(kind(PathMatchType::PathPrefix)),
        select(PATH_REGEXES).prop_map(|v| v.to_string()).prop_map(kind(PathMatchType::RegularExpression)),
    ]
}

fn value_match(names: &'static [&'static str]) -> impl Strategy<Value = ValueMatch> {
    let rule = prop_oneof![
        select(VALUES).prop_map(|v| (ValueMatchType::Exact, v)),
        select(VALUE_REGEXES).prop_map(|v| (ValueMatchType::RegularExpression, v)),
    ];
    (select(names), rule).prop_map(|(name, (kind, value))| ValueMatch { kind, name: name.into(), value: value.into() })
}

fn route_match() -> impl Strategy<Value = RouteMatch> {
    (
        path_match(),
        prop::collection::vec(value_match(HEADER_NAMES), 0..=2),
        prop::collection::vec(value_match(QUERY_NAMES), 0..=2),
        select(&[None, Some("GET"), Some("POST")][..]),
    )
        .prop_map(|(path, headers, query_params, method)| RouteMatch {
            path,
            headers,
            query_params,
            method: method.map(Into::into),
        })
}

/// One to five routes named `r<i>`; each rule carries its id `r<i>.<j>` as its one backend's
/// name, so a rule is recognised after its route or itself moved.
fn route_set() -> impl Strategy<Value = Vec<HttpRoute>> {
    let rule = prop::collection::vec(route_match(), 0..=2);
    let route = (prop::collection::vec(select(HOSTNAMES), 0..=2), prop::collection::vec(rule, 0..=3));
    prop::collection::vec(route, 1..=5).prop_map(|routes| {
        routes
            .into_iter()
            .enumerate()
            .map(|(i, (hostnames, rules))| HttpRoute {
                name: format!("r{i}"),
                hostnames: hostnames.into_iter().map(Into::into).collect(),
                parent_refs: Vec::new(),
                rules: rules
                    .into_iter()
                    .enumerate()
                    .map(|(j, matches)| RouteRule {
                        matches,
                        filters: Vec::new(),
                        backend_refs: vec![BackendRef {
                            name: format!("r{i}.{j}"),
                            labels: BTreeMap::new(),
                            weight: 1,
                            filters: Vec::new(),
                        }],
                        timeouts: None,
                        retry: None,
                        fault: None,
                        name: None,
                    })
                    .collect(),
                max_request_body: None,
                rate_limit: None,
                jwt: None,
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct Request {
    host: &'static str,
    method: Method,
    path: String,
    /// In order; repeated names allowed (the first one counts).
    headers: Vec<(&'static str, &'static str)>,
    query: Vec<(&'static str, &'static str)>,
}

/// A path near one the routes name: as written, or cut at its trailing slash and then given a
/// slash, a longer last segment (`/a` to `/ab`) or one more segment. Random paths alone seldom
/// land on a route's edges.
fn near(value: String, tweak: usize) -> String {
    let base = value.trim_end_matches('/');
    match tweak {
        0 => value.clone(),
        1 => format!("{base}/"),
        2 if base.is_empty() => "/b".into(),
        2 => format!("{base}b"),
        _ => format!("{base}/b"),
    }
}

/// Sixteen requests for `routes`, half of them on paths near the routes' own.
fn requests(routes: &[HttpRoute]) -> impl Strategy<Value = Vec<Request>> {
    let mut seeds: Vec<String> = routes
        .iter()
        .flat_map(|r| &r.rules)
        .flat_map(|rule| &rule.matches)
        .filter_map(|m| m.path.as_ref())
        .filter(|p| p.kind != PathMatchType::RegularExpression)
        .map(|p| p.value.clone())
        .collect();
    seeds.push("/".into());
    let path = prop_oneof![path(), (select(seeds), 0..4usize).prop_map(|(value, tweak)| near(value, tweak))];
    let pair = |names| (select(names), select(VALUES));
    let request = (
        select(HOSTS),
        select(vec![Method::GET, Method::POST]),
        path,
        prop::collection::vec(pair(&["x", "y"][..]), 0..=3),
        prop::collection::vec(pair(QUERY_NAMES), 0..=3),
    )
        .prop_map(|(host, method, path, headers, query)| Request { host, method, path, headers, query });
    prop::collection::vec(request, 16)
}

/// Routes and requests for them.
fn routes_and_requests() -> impl Strategy<Value = (Vec<HttpRoute>, Vec<Request>)> {
    route_set().prop_flat_map(|routes| {
        let requests = requests(&routes);
        (Just(routes), requests)
    })
}

/// What the table chose: the rule's id and the prefix that matched.
fn found(table: &RouteTable, r: &Request) -> Option<(String, Option<String>)> {
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    let query: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = (!query.is_empty()).then(|| query.join("&"));
    table
        .find(r.host, &r.method, &r.path, query.as_deref(), &headers)
        .map(|m| (m.rule.backend_refs[0].name.clone(), m.matched_prefix.map(Into::into)))
}

// The reference: the module's precedence list written out plainly, with no index or sorting
// shared with the code under test.

/// Precedence of one matching candidate, larger first, in the order of the module docs:
/// (non-wildcard hostname length, hostname length), path kind (Exact 3, PathPrefix 2,
/// RegularExpression 1), path length (a prefix without its trailing slash, which matching
/// ignores), method given, header matches, query-parameter matches.
type Precedence = ((usize, usize), u8, usize, bool, usize, usize);

/// A matching (route, rule, match) in declaration order, with its precedence, rule id and
/// matched prefix.
struct Candidate {
    precedence: Precedence,
    rule: String,
    prefix: Option<String>,
}

fn full_match(pattern: &str, text: &str) -> bool {
    static COMPILED: OnceLock<HashMap<&'static str, Regex>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        PATH_REGEXES.iter().chain(VALUE_REGEXES).map(|p| (*p, Regex::new(&format!("^(?:{p})$")).unwrap())).collect()
    });
    compiled[pattern].is_match(text)
}

/// Exact names match the host in any case; `*.suffix` matches a host of one or more labels
/// before `.suffix`; no hostnames matches every host.
fn host_precedence(hostnames: &[String], host: &str) -> Option<(usize, usize)> {
    if hostnames.is_empty() {
        return Some((0, 0));
    }
    let host_rank = |h: &String| {
        let h = h.to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => {
                (host.len() > suffix.len() && host.ends_with(suffix)).then_some((0, h.len()))
            }
            _ => (h == host).then_some((h.len(), h.len())),
        }
    };
    hostnames.iter().filter_map(host_rank).max()
}

/// A prefix matches whole path elements: `/a` matches `/a`, `/a/` and `/a/b`, never `/ab`.
fn path_precedence(m: &Option<PathMatch>, path: &str) -> Option<(u8, usize, Option<String>)> {
    let elements = |p: &str| p.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect::<Vec<_>>();
    let everything = PathMatch { kind: PathMatchType::PathPrefix, value: "/".into() };
    let m = m.as_ref().unwrap_or(&everything);
    match m.kind {
        PathMatchType::Exact => (path == m.value).then_some((3, m.value.len(), None)),
        PathMatchType::PathPrefix => {
            let prefix = m.value.trim_end_matches('/');
            elements(path).starts_with(&elements(prefix)).then(|| (2, prefix.len(), Some(prefix.to_string())))
        }
        PathMatchType::RegularExpression => full_match(&m.value, path).then_some((1, m.value.len(), None)),
    }
}

fn value_ok(m: &ValueMatch, first: Option<&str>) -> bool {
    first.is_some_and(|v| match m.kind {
        ValueMatchType::Exact => v == m.value,
        ValueMatchType::RegularExpression => full_match(&m.value, v),
    })
}

fn candidates(routes: &[HttpRoute], r: &Request) -> Vec<Candidate> {
    let first = |pairs: &[(&str, &'static str)], name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let mut out = Vec::new();
    for route in routes {
        let Some(host) = host_precedence(&route.hostnames, r.host) else { continue };
        for rule in &route.rules {
            let any = [RouteMatch::default()];
            for m in if rule.matches.is_empty() { &any[..] } else { &rule.matches } {
                let Some((kind, len, prefix)) = path_precedence(&m.path, &r.path) else { continue };
                let ok = m.method.as_deref().is_none_or(|want| want == r.method.as_str())
                    && m.headers.iter().all(|h| value_ok(h, first(&r.headers, &h.name.to_ascii_lowercase())))
                    && m.query_params.iter().all(|q| value_ok(q, first(&r.query, &q.name)));
                if ok {
                    let precedence = (host, kind, len, m.method.is_some(), m.headers.len(), m.query_params.len());
                    out.push(Candidate { precedence, rule: rule.backend_refs[0].name.clone(), prefix });
                }
            }
        }
    }
    out
}

/// The highest precedence; among equals, the first declared (route, then rule, then match).
fn reference(routes: &[HttpRoute], r: &Request) -> Option<(String, Option<String>)> {
    let mut all = candidates(routes, r);
    // Stable: equal precedence keeps declaration order.
    all.sort_by_key(|c| std::cmp::Reverse(c.precedence));
    all.into_iter().next().map(|c| (c.rule, c.prefix))
}

/// The same routes with routes, rules and matches each shuffled.
fn shuffled(routes: &[HttpRoute], seed: u64) -> Vec<HttpRoute> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut routes = routes.to_vec();
    rng.shuffle(&mut routes);
    for route in &mut routes {
        rng.shuffle(&mut route.rules);
        for rule in &mut route.rules {
            rng.shuffle(&mut rule.matches);
        }
    }
    routes
}

proptest! {
    #![proptest_config(config(192))]

    /// For random route sets and requests the table chooses the rule, and reports the matched
    /// prefix, that the reference chooses: every matching candidate ranked by the documented
    /// precedence, ties to the first declared.
    #[test]
    fn lookup_agrees_with_the_reference((routes, requests) in routes_and_requests()) {
        let table = RouteTable::new(routes.clone()).unwrap();
        for r in &requests {
            prop_assert_eq!(found(&table, r), reference(&routes, r), "request {:?}", r);
        }
    }

    /// Declaration order only breaks ties: with routes, rules and matches shuffled, a rule that
    /// alone had the highest precedence still wins, and among tied rules the one now declared
    /// first wins.
    #[test]
    fn declaration_order_only_breaks_ties(
(routes, requests) in routes_and_requests(), seed in any::<u64>()) {
        let moved = shuffled(&routes, seed);
        let table = RouteTable::new(moved.clone()).unwrap();
        for r in &requests {
            let all = candidates(&routes, r);
            let Some(top) = all.iter().map(|c| c.precedence).max() else {
                prop_assert_eq!(found(&table, r), None);
                continue;
            };
            let tied: Vec<&str> = all.iter().filter(|c| c.precedence == top).map(|c| c.rule.as_str()).collect();
            let want = moved
                .iter()
                .flat_map(|route| &route.rules)
                .map(|rule| rule.backend_refs[0].name.as_str())
                .find(|id| tied.contains(id));
            let got = found(&table, r).map(|(rule, _)| rule);
            prop_assert_eq!(got.as_deref(), want, "request {:?}, tied {:?}", r, tied);
        }
    }
}

fn backends(weights: &[u32]) -> Vec<BackendRef> {
    weights
        .iter()
        .map(|&weight| BackendRef { name: "svc".into(), labels: BTreeMap::new(), weight, filters: Vec::new() })
        .collect()
}

/// Which backend of the list was chosen.
fn position(list: &[BackendRef], chosen: Option<&BackendRef>) -> Option<usize> {
    chosen.map(|c| list.iter().position(|b| std::ptr::eq(b, c)).expect("chosen from the list"))
}

proptest! {
    #![proptest_config(config(128))]

    /// Every roll in `0..total` picks a backend, each backend exactly as many rolls as its
    /// weight (so weight 0 none), and a roll past the total picks nothing.
    #[test]
    fn each_backend_gets_exactly_its_weight_of_rolls(weights in prop::collection::vec(0u32..=20, 1..=6)) {
        let list = backends(&weights);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut counts = vec![0u32; list.len()];
        for roll in 0..total {
            counts[position(&list, pick_backend(&list, roll)).expect("a roll below the total picks")] += 1;
        }
        prop_assert_eq!(&counts, &weights);
        prop_assert!(pick_backend(&list, total).is_none());
    }

    /// With weights up to `u32::MAX` (sums past `u32`), the first and last roll of each
    /// backend's range pick that backend.
    #[test]
    fn large_weights_keep_their_ranges(
        weights in prop::collection::vec(prop_oneof![Just(0u32), 1..=u32::MAX, Just(u32::MAX)], 1..=6),
    ) {
        let list = backends(&weights);
        let mut start = 0u64;
        for (i, &w) in weights.iter().enumerate() {
            let end = start + u64::from(w);
            if w > 0 {
                prop_assert_eq!(position(&list, pick_backend(&list, start)), Some(i));
                prop_assert_eq!(position(&list, pick_backend(&list, end - 1)), Some(i));
            }
            start = end;
        }
        prop_assert!(pick_backend(&list, start).is_none());
    }
}

proptest! {
    // A fixed seed for the generated weights and the seeded choice below make every run the
    // same, so the statistical bound cannot flake.
    #![proptest_config(ProptestConfig { rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..config(48) })]

    /// Over 20000 random choices each backend's share is weight / total within six standard
    /// deviations (plus one pick) of the binomial count; weight 0 is never chosen, and all
    /// weights 0 choose nothing.
    #[test]
    fn random_choice_follows_the_weights(weights in prop::collection::vec(0u32..=10, 1..=5), seed in any::<u64>()) {
        const PICKS: u32 = 20_000;
        let list = backends(&weights);
        let total = f64::from(weights.iter().sum::<u32>());
        if total == 0.0 {
            prop_assert!(choose_backend(&list).is_none());
            return Ok(());
        }
        // `choose_backend` draws from this thread's generator.
        fastrand::seed(seed);
        let mut counts = vec![0u32; list.len()];
        for _ in 0..PICKS {
            counts[position(&list, choose_backend(&list)).expect("positive total picks")] += 1;
        }
        for (&w, &c) in weights.iter().zip(&counts) {
            let p = f64::from(w) / total;
            let expected = f64::from(PICKS) * p;
            let bound = 6.0 * (f64::from(PICKS) * p * (1.0 - p)).sqrt() + 1.0;
            prop_assert!((f64::from(c) - expected).abs() <= bound, "weights {:?}: counts {:?}", weights, counts);
        }
    }
}
