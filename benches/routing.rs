//! Route lookup cost against the number of routes (criterion): 10, 1000 and 10000 routes,
//! (a) each route with its own hostname, the common case for many services, and (b) every
//! route on any host with its own path prefix, the worst case for a per-host scan.
//!
//! Run: `cargo bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use quicmesh_shared::route::{HttpRoute, RouteTable};

fn table(n: usize, per_host: bool) -> RouteTable {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!("[[routes]]\nname = \"r{i}\"\n"));
        if per_host {
            text.push_str(&format!("hostnames = [\"svc-{i}.example\"]\n"));
        }
        let base = if per_host { String::new() } else { format!("/svc-{i}") };
        text.push_str(&format!(
            "[[routes.rules]]\nmatches = [{{ path = {{ type = \"Exact\", value = \"{base}/health\" }} }}]\n\
             [[routes.rules]]\nmatches = [{{ path = {{ value = \"{base}/api\" }}, headers = [{{ name = \"x-canary\", value = \"1\" }}] }}]\n\
             [[routes.rules]]\nmatches = [{{ path = {{ value = \"{base}/api\" }} }}]\n"
        ));
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        routes: Vec<HttpRoute>,
    }
    let doc: Doc = toml::from_str(&text).unwrap();
    RouteTable::new(doc.routes).unwrap()
}

fn lookups(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-canary", HeaderValue::from_static("1"));
    for per_host in [true, false] {
        let mut group =
            c.benchmark_group(if per_host { "route_lookup_host_per_route" } else { "route_lookup_any_host" });
        for n in [10usize, 1000, 10000] {
            let t = table(n, per_host);
            let i = n / 2;
            let (host, path) = if per_host {
                (format!("svc-{i}.example"), "/api/items/7".to_string())
            } else {
                ("any.example".to_string(), format!("/svc-{i}/api/items/7"))
            };
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    let m = t.find(black_box(&host), &Method::GET, black_box(&path), None, &headers);
                    black_box(m.map(|m| m.route.name.len()))
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, lookups);
criterion_main!(benches);
