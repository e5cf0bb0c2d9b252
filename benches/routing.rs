//! Route lookup cost against the number of routes (criterion): 10, 1000 and 10000 routes,
//! and one endpoint pick per balancer;
//! (a) each route with its own hostname, the common case for many services, and (b) every
//! route on any host with its own path prefix, the worst case for a per-host scan.
//!
//! Also the check of one JWT at the edge (`policy::jwt::check`: header, key, signature and
//! claims), per key type.
//!
//! Run: `cargo bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use quicmesh_shared::policy::route::{HttpRoute, RouteTable};

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

/// One endpoint pick per balancer, over 10 and 100 endpoints.
fn picks(c: &mut Criterion) {
    use quicmesh_shared::policy::balance::{hash_key, p2c, EndpointStats, Maglev};
    use std::sync::Arc;
    let mut group = c.benchmark_group("endpoint_pick");
    for n in [10usize, 100] {
        let stats: Vec<Arc<EndpointStats>> = (0..n).map(|_| Arc::new(EndpointStats::default())).collect();
        for (i, s) in stats.iter().enumerate() {
            s.observe(std::time::Duration::from_micros(500 + i as u64));
        }
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}/10.0.0.{i}:80")).collect();
        let maglev = Maglev::new(&names);
        let cursor = std::sync::atomic::AtomicUsize::new(0);
        let mut rng = fastrand::Rng::with_seed(1);
        group.bench_function(BenchmarkId::new("round_robin", n), |b| {
            b.iter(|| black_box(cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n))
        });
        group.bench_function(BenchmarkId::new("least_request_p2c", n), |b| {
            b.iter(|| black_box(p2c(n, |i| stats[i].in_flight() as f64, &mut rng)))
        });
        group.bench_function(BenchmarkId::new("peak_ewma_p2c", n), |b| {
            b.iter(|| black_box(p2c(n, |i| stats[i].cost(), &mut rng)))
        });
        let mut key = 0u64;
        group.bench_function(BenchmarkId::new("maglev", n), |b| {
            b.iter(|| {
                key = key.wrapping_add(1);
                black_box(maglev.pick(hash_key(&key.to_le_bytes())))
            })
        });
    }
    group.finish();
}

/// One JWT checked against a one-key set, as the edge does per request of a route with `jwt`.
fn jwt_checks(c: &mut Criterion) {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let provider: quicmesh_shared::policy::jwt::JwtProvider = toml::from_str(
        "name = \"main\"\nissuer = \"https://issuer.test\"\naudiences = [\"quicmesh\"]\njwks_uri = \"https://issuer.test/keys\"\n",
    )
    .unwrap();
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({ "iss": "https://issuer.test", "aud": "quicmesh", "sub": "alice", "exp": exp });
    let mut group = c.benchmark_group("jwt_check");
    for (name, alg, key_alg, jwk) in [
        ("ES256", jsonwebtoken::Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256, "EC"),
        ("EdDSA", jsonwebtoken::Algorithm::EdDSA, &rcgen::PKCS_ED25519, "OKP"),
    ] {
        let pair = rcgen::KeyPair::generate_for(key_alg).unwrap();
        let raw = pair.public_key_raw();
        let ec = jwk == "EC";
        let jwk = if ec {
            serde_json::json!({ "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": "k" })
        } else {
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(raw), "kid": "k" })
        };
        let keys =
            quicmesh_shared::policy::jwt::parse_key_set(serde_json::json!({ "keys": [jwk] }).to_string().as_bytes())
                .unwrap();
        let encoding = if ec {
            jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
        } else {
            jsonwebtoken::EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap()
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some("k".into());
        let token = jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
        assert!(quicmesh_shared::policy::jwt::check(&token, &keys, &provider).is_ok(), "{name}");
        group.bench_function(name, |b| {
            b.iter(|| quicmesh_shared::policy::jwt::check(black_box(&token), &keys, &provider).is_ok())
        });
        if ec {
            // The edge's path for a token it verified before: the cache of verified tokens.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("jwks.json");
            std::fs::write(&file, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
            let mut cached = provider.clone();
            (cached.jwks_uri, cached.jwks_file) = (None, Some(file));
            let verifier = quicmesh_shared::proxy::jwt::Verifier::new(&cached).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut headers = http::HeaderMap::new();
            let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
            group.bench_function("ES256 repeated (cached)", |b| {
                b.iter(|| {
                    headers.insert(http::header::AUTHORIZATION, bearer.clone());
                    rt.block_on(verifier.authenticate(&mut headers)).is_ok()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, lookups, picks, jwt_checks);
criterion_main!(benches);
