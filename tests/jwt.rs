//! JWT authentication at the edge, with tokens made by a JWT library nobody here wrote
//! (jsonwebtoken) and keys made by rcgen: a route that requires a provider's token lets valid
//! ones through (claims passed upstream as headers, the token removed), and answers 401 with
//! `WWW-Authenticate` to everything else: missing, expired, not yet valid, wrong issuer or
//! audience, forged, `alg: none`, HMAC signed with the public key (HS/RS confusion), unknown
//! key, oversized, garbage. Each failure is counted by its reason and logged without the token;
//! nothing panics and the gateway goes on serving. Key sets from a file and from an HTTPS URL
//! (rotation picked up, the refresh rate bounded). Authorization rules on the verified claims
//! (`from.jwt`), and the ExternalAuth filter (GEP-1494) with an authorization service.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http_body_util::{BodyExt, Empty};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use support::*;

const ISSUER: &str = "https://issuer.test";

/// A signing key and its public JWK.
struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl Key {
    fn new(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            "kid": kid, "alg": "ES256", "use": "sig"
        });
        let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        Key { kid: kid.into(), encoding, jwk }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks(keys: &[&Key]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Good claims, with `change` applied.
fn claims(change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": ISSUER, "aud": "quicmesh", "sub": "alice", "exp": now() + 600, "iat": now(), "groups": ["admin"]
    });
    change(c.as_object_mut().unwrap());
    c
}

/// The gateway in front of node-b's echo service: `secure.test` requires provider `main`'s
/// token (its key set at `jwks`, a file or an https URL), `open.test` does not.
fn mesh(pki: &Pki, echo: SocketAddr, provider: &str) -> (NodeProc, NodeProc) {
    mesh_with(pki, echo, provider, "")
}

/// [`mesh`], with `policies` (authorization) for the echo service.
fn mesh_with(pki: &Pki, echo: SocketAddr, provider: &str, policies: &str) -> (NodeProc, NodeProc) {
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let svc = format!(
        "[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n{policies}"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[access_log]\noutput = \"file\"\npath = \"{}\"\nformat = \"json\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n\
         [[gateway.jwt_providers]]\nname = \"main\"\nissuer = \"{ISSUER}\"\naudiences = [\"quicmesh\", \"other\"]\n{provider}\n\
         claim_to_headers = [{{ claim = \"sub\", header = \"x-user\" }}, {{ claim = \"groups\", header = \"x-groups\" }}]\n\n\
         [[gateway.routes]]\nname = \"secure\"\nhostnames = [\"secure.test\"]\njwt = \"main\"\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[gateway.routes]]\nname = \"open\"\nhostnames = [\"open.test\"]\n[[gateway.routes.rules]]\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        pki.path().join("access.log").display(),
        state.display(),
        b.addrs.inbound
    );
    (NodeProc::start_gateway(pki.path(), &gw_toml), b)
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

/// A GET of `/` to the edge over HTTP/1.1 and TLS, with these headers.
async fn get(gw: SocketAddr, host: &str, headers: &[(&str, &str)]) -> Answer {
    get_path(gw, host, "/", headers).await
}

async fn get_path(gw: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    Answer { status, headers, body }
}

async fn bearer(gw: SocketAddr, token: &str) -> Answer {
    get(gw, "secure.test", &[("authorization", &format!("Bearer {token}"))]).await
}

/// `alg: none`, hand made (no library makes one).
fn unsigned(claims: &serde_json::Value, kid: &str) -> String {
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&serde_json::json!({ "alg": "none", "typ": "JWT", "kid": kid })), b64(claims))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_requiring_a_jwt_admits_valid_tokens_only() {
    let key = Key::new("k1");
    let stranger = Key::new("k1"); // same kid, another key: a forgery
    let pki = Pki::new();
    let jwks_file = pki.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).unwrap();
    let echo = echo_backend().await;
    let (gw, _b) = mesh(&pki, echo, &format!("jwks_file = \"{}\"", jwks_file.display()));
    let at = gw.addrs.listen;

    // A valid token: through, with the claims as headers and without the token; a client's
    // own x-user never passes.
    let good = key.sign(&claims(|_| {}));
    let a = get(at, "secure.test", &[("authorization", &format!("Bearer {good}")), ("x-user", "mallory")]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let seen: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(seen["headers"]["x-user"], "alice");
    assert_eq!(seen["headers"]["x-groups"], "[\"admin\"]");
    assert!(seen["headers"].get("authorization").is_none(), "the token went upstream: {seen}");
    // The other audience is as good; a route without `jwt` needs none.
    assert_eq!(bearer(at, &key.sign(&claims(|c| drop(c.insert("aud".into(), "other".into()))))).await.status, 200);
    let open = get(at, "open.test", &[("x-user", "mallory")]).await;
    assert_eq!(open.status, 200);

    // Everything else: 401 and the reason, with a challenge.
    let hs_confusion = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let secret = key.jwk.to_string();
        jsonwebtoken::encode(&header, &claims(|_| {}), &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let huge = key.sign(&claims(|c| drop(c.insert("pad".into(), "x".repeat(10_000).into()))));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing"),
        ("expired", Some(key.sign(&claims(|c| drop(c.insert("exp".into(), (now() - 3600).into()))))), "expired"),
        (
            "not yet valid",
            Some(key.sign(&claims(|c| drop(c.insert("nbf".into(), (now() + 3600).into()))))),
            "not-yet-valid",
        ),
        (
            "wrong issuer",
            Some(key.sign(&claims(|c| drop(c.insert("iss".into(), "https://evil.test".into()))))),
            "wrong-issuer",
        ),
        (
            "wrong audience",
            Some(key.sign(&claims(|c| drop(c.insert("aud".into(), "elsewhere".into()))))),
            "wrong-audience",
        ),
        ("no exp", Some(key.sign(&claims(|c| drop(c.remove("exp"))))), "malformed"),
        ("forged", Some(stranger.sign(&claims(|_| {}))), "bad-signature"),
        ("alg none", Some(unsigned(&claims(|_| {}), "k1")), "bad-algorithm"),
        ("HS256 with the public key", Some(hs_confusion), "bad-algorithm"),
        ("unknown key", Some(Key::new("k9").sign(&claims(|_| {}))), "unknown-key"),
        ("oversized", Some(huge), "too-large"),
        ("garbage", Some("not.a.jwt".into()), "malformed"),
        ("empty segments", Some("..".into()), "malformed"),
    ];
    for (what, token, reason) in &cases {
        let a = match token {
            Some(t) => bearer(at, t).await,
            None => get(at, "secure.test", &[]).await,
        };
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert_eq!(a.headers["quicmesh-error"], "unauthenticated", "{what}");
        let challenge = a.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer realm="), "{what}: {challenge}");
        assert_eq!(challenge.contains("invalid_token"), token.is_some(), "{what}: {challenge}");
        eventually(Duration::from_secs(5), what, || async {
            let m = gw.metrics().await;
            let n = metric(&m, "quicmesh_edge_jwt_total", &[("provider", "main"), ("result", reason)]);
            (n >= 1.0).then_some(())
        })
        .await;
    }
    // Still serving; the log names results, never a token.
    assert_eq!(bearer(at, &good).await.status, 200);
    let log = eventually(Duration::from_secs(5), "the access log's auth results", || async {
        let log = std::fs::read_to_string(pki.path().join("access.log")).unwrap_or_default();
        (log.contains("\"auth\":\"ok\"") && log.contains("\"auth\":\"bad-signature\"")).then_some(log)
    })
    .await;
    let signature = good.rsplit('.').next().unwrap();
    assert!(!log.contains(signature) && !gw.log().contains(signature), "a token reached a log");
}

/// A key set served over HTTPS, as identity providers publish theirs.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicU64>,
}

async fn jwks_server(pki: &Pki, body: String) -> (JwksServer, std::path::PathBuf) {
    let (config, ca) = self_signed_server(pki.path(), "jwks", &["localhost"]);
    let body = Arc::new(Mutex::new(body));
    let fetches = Arc::new(AtomicU64::new(0));
    let (b, f) = (body.clone(), fetches.clone());
    let addr = tls_server(config, move |tls| {
        let (body, fetches) = (b.clone(), f.clone());
        async move {
            let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                fetches.fetch_add(1, Ordering::SeqCst);
                let text = body.lock().unwrap().clone();
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(text),
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        }
    })
    .await;
    (JwksServer { addr, body, fetches }, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_an_https_jwks_rotate_and_unknown_keys_do_not_flood_it() {
    let (k1, k2) = (Key::new("k1"), Key::new("k2"));
    let pki = Pki::new();
    let (server, ca) = jwks_server(&pki, jwks(&[&k1])).await;
    let echo = echo_backend().await;
    let provider = format!(
        "jwks_uri = \"https://localhost:{}/keys\"\njwks_ca_certificates = [\"{}\"]\njwks_min_refresh = \"1s\"",
        server.addr.port(),
        ca.display()
    );
    let (gw, _b) = mesh(&pki, echo, &provider);
    let at = gw.addrs.listen;
    assert_eq!(bearer(at, &k1.sign(&claims(|_| {}))).await.status, 200, "k1 from the fetched set");
    let fetched = server.fetches.load(Ordering::SeqCst);
    assert_eq!(fetched, 1, "one fetch for the first token");

    // A flood of tokens naming a key the set lacks: refused, and the server asked at most once
    // per jwks_min_refresh.
    let started = std::time::Instant::now();
    let unknown = Key::new("k-unknown").sign(&claims(|_| {}));
    for _ in 0..50 {
        assert_eq!(bearer(at, &unknown).await.status, 401);
    }
    let bound = 2 + started.elapsed().as_secs();
    let flood = server.fetches.load(Ordering::SeqCst) - fetched;
    assert!(flood <= bound, "{flood} fetches for 50 unknown-key tokens in {:?}", started.elapsed());

    // Rotation: the provider publishes k2; a k2 token is accepted once the set is fetched again.
    *server.body.lock().unwrap() = jwks(&[&k1, &k2]);
    let k2_token = k2.sign(&claims(|_| {}));
    eventually(Duration::from_secs(10), "k2 accepted after rotation", || async {
        (bearer(at, &k2_token).await.status == 200).then_some(())
    })
    .await;
    // A key set that stops loading: the failure is counted and the set held goes on serving.
    *server.body.lock().unwrap() = "not a key set".into();
    eventually(Duration::from_secs(10), "a failed key set load counted", || async {
        assert_eq!(bearer(at, &unknown).await.status, 401);
        let m = gw.metrics().await;
        (metric(&m, "quicmesh_edge_jwks_failures_total", &[("provider", "main")]) >= 1.0).then_some(())
    })
    .await;
    // A token never seen before (verified tokens are cached): checked against the held set.
    let fresh = k1.sign(&claims(|c| drop(c.insert("jti".into(), "fresh".into()))));
    assert_eq!(bearer(at, &fresh).await.status, 200, "the held set after a failed load");
}

/// A provider that reads its token from a named header and from a cookie (and from nowhere
/// else: a Bearer token is not its), and that allows its `clock_skew` on `exp` and `nbf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_from_a_named_header_or_cookie_and_times_allow_the_clock_skew() {
    let key = Key::new("k1");
    let pki = Pki::new();
    let jwks_file = pki.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).unwrap();
    let echo = echo_backend().await;
    let provider = format!(
        "jwks_file = \"{}\"\nfrom_header = \"x-token\"\nfrom_cookie = \"session\"\nclock_skew = \"30s\"",
        jwks_file.display()
    );
    let (gw, _b) = mesh(&pki, echo, &provider);
    let at = gw.addrs.listen;
    let seen = |a: &Answer| -> serde_json::Value { serde_json::from_str(&a.body).unwrap() };

    // The named header: let in, and the header goes no further.
    let good = key.sign(&claims(|_| {}));
    let a = get(at, "secure.test", &[("x-token", &good)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(seen(&a)["headers"]["x-user"], "alice");
    assert!(seen(&a)["headers"].get("x-token").is_none(), "the token went upstream: {}", a.body);
    // A Bearer token is not where this provider looks.
    let a = bearer(at, &good).await;
    assert_eq!((a.status, a.headers["quicmesh-error"].to_str().unwrap()), (401, "unauthenticated"));
    // The cookie, among others: let in; the cookies stay as they were.
    let cookie = format!("theme=dark; session={good}; lang=en");
    let a = get(at, "secure.test", &[("cookie", &cookie)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(seen(&a)["headers"]["x-user"], "alice");
    assert_eq!(seen(&a)["headers"]["cookie"], cookie.as_str());
    let a = get(at, "secure.test", &[("cookie", "theme=dark; session=")]).await;
    assert_eq!(a.status, 401, "an empty cookie is no token");

    // Within 30 s of exp or nbf: let in; beyond: refused with the reason.
    let with = |claim: &str, at: i64| key.sign(&claims(|c| drop(c.insert(claim.into(), at.into()))));
    let cases = [
        ("expired 10 s ago", with("exp", now() - 10), 200),
        ("valid in 10 s", with("nbf", now() + 10), 200),
        ("expired 2 minutes ago", with("exp", now() - 120), 401),
        ("valid in 2 minutes", with("nbf", now() + 120), 401),
    ];
    for (what, token, status) in &cases {
        assert_eq!(get(at, "secure.test", &[("x-token", token)]).await.status, *status, "{what}");
    }
    let m = gw.metrics().await;
    for (result, n) in [("expired", 1.0), ("not-yet-valid", 1.0), ("missing", 2.0)] {
        let counted = metric(&m, "quicmesh_edge_jwt_total", &[("provider", "main"), ("result", result)]);
        assert_eq!(counted, n, "{result}");
    }
}

/// A key set that never loads (its URL answers nothing): every token is refused as
/// `keys-unavailable`, each failed load counted, and the gateway goes on serving other routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_that_never_loads_refuses_tokens_and_nothing_else() {
    let key = Key::new("k1");
    let pki = Pki::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let echo = echo_backend().await;
    let provider = format!("jwks_uri = \"https://localhost:{}/keys\"\njwks_min_refresh = \"1s\"", dead.port());
    let (gw, _b) = mesh(&pki, echo, &provider);
    let at = gw.addrs.listen;
    let token = key.sign(&claims(|_| {}));
    for _ in 0..3 {
        let a = bearer(at, &token).await;
        assert_eq!((a.status, a.headers["quicmesh-error"].to_str().unwrap()), (401, "unauthenticated"));
    }
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "quicmesh_edge_jwt_total", &[("provider", "main"), ("result", "keys-unavailable")]), 3.0);
    assert!(metric(&m, "quicmesh_edge_jwks_failures_total", &[("provider", "main")]) >= 1.0);
    assert_eq!(get(at, "open.test", &[]).await.status, 200, "a route without jwt still serves");
}

/// Authorization rules at the destination node match the claims the edge verified
/// (`from.jwt`): subject, issuer, a value in a list claim; deny wins; a request without a
/// verified token (another route, or claims a client made up) matches none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_rules_match_the_claims_the_edge_verified() {
    let key = Key::new("k1");
    let pki = Pki::new();
    let jwks_file = pki.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).unwrap();
    let echo = echo_backend().await;
    let policies = format!(
        "[[authorization.policies]]\nservice = \"echo\"\n\
         [[authorization.policies.rules]]\naction = \"deny\"\nfrom = {{ jwt = {{ claims = [{{ name = \"groups\", value = \"banned\" }}] }} }}\n\
         [[authorization.policies.rules]]\naction = \"allow\"\npaths = [\"/admin*\"]\nfrom = {{ jwt = {{ issuer = \"{ISSUER}\", subject = \"alice\" }} }}\n\
         [[authorization.policies.rules]]\naction = \"allow\"\npaths = [\"/public*\"]\n"
    );
    let (gw, _b) = mesh_with(&pki, echo, &format!("jwks_file = \"{}\"", jwks_file.display()), &policies);
    let at = gw.addrs.listen;
    let as_who = |sub: &'static str, groups: &'static [&'static str]| {
        key.sign(&claims(|c| {
            c.insert("sub".into(), sub.into());
            c.insert("groups".into(), groups.to_vec().into());
        }))
    };
    let call = |host: &'static str,
                path: &'static str,
                token: Option<String>,
                extra: Option<(&'static str, String)>| async move {
        let mut headers: Vec<(String, String)> =
            token.map(|t| ("authorization".to_string(), format!("Bearer {t}"))).into_iter().collect();
        headers.extend(extra.map(|(k, v)| (k.to_string(), v)));
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        get_path(at, host, path, &refs).await.status
    };
    assert_eq!(call("secure.test", "/admin/panel", Some(as_who("alice", &["staff"])), None).await, 200, "alice");
    assert_eq!(call("secure.test", "/admin/panel", Some(as_who("bob", &["staff"])), None).await, 403, "bob");
    assert_eq!(call("secure.test", "/admin/panel", Some(as_who("alice", &["banned"])), None).await, 403, "deny wins");
    assert_eq!(call("secure.test", "/public/x", Some(as_who("bob", &[])), None).await, 200, "anyone on /public");
    assert_eq!(call("open.test", "/admin/panel", None, None).await, 403, "no verified token");
    // Claims a client makes up in the gateway's own header never count.
    let forged = quicmesh_shared::policy::jwt::encode_claims(
        serde_json::json!({ "iss": ISSUER, "sub": "alice" }).as_object().unwrap(),
    )
    .unwrap()
    .to_str()
    .unwrap()
    .to_string();
    assert_eq!(
        call("open.test", "/admin/panel", None, Some(("quicmesh-jwt-claims", forged))).await,
        403,
        "forged claims"
    );
}

/// An authorization service: `Bearer let-me-in` is allowed (with the user and a header the
/// filter does not pass on); a path under `/blocked` is refused 403 with a body and header of
/// its own; `/slow` takes longer than the filter waits. It keeps the check requests it saw.
async fn authz_service() -> (SocketAddr, Arc<Mutex<Vec<http::request::Parts>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body_len = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                    assert_eq!(body_len, 0, "the check request carries no body");
                    let path = parts.uri.path().to_string();
                    let allowed = parts.headers.get("authorization").is_some_and(|v| v == "Bearer let-me-in");
                    log.lock().unwrap().push(parts);
                    if path.starts_with("/check/slow") {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    let resp = if path.starts_with("/check/blocked") {
                        http::Response::builder().status(403).header("x-reason", "blocked").body("nope\n".to_string())
                    } else if allowed {
                        http::Response::builder()
                            .header("x-auth-user", "alice")
                            .header("x-internal", "1")
                            .body(String::new())
                    } else {
                        http::Response::builder().status(401).header("www-authenticate", "Bearer").body(String::new())
                    };
                    Ok::<_, std::convert::Infallible>(
                        resp.unwrap().map(|b| http_body_util::Full::new(bytes::Bytes::from(b))),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// The ExternalAuth filter (GEP-1494, HTTP): the service's 2xx lets the request on with the
/// allowed answer headers; its refusal is the client's answer, status, headers and body; it
/// sees the method, the path under the filter's prefix, Authorization and the allowed headers,
/// nothing else; a service too slow answers 503 `authz-unavailable`, unless the filter fails
/// open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_authorization_service_decides_before_the_route() {
    let (authz, seen) = authz_service().await;
    let echo = echo_backend().await;
    let pki = Pki::new();
    let state = pki.issue("node-b");
    pki.issue("gateway");
    let svc = format!(
        "[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"authz\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{authz}\"\n\n"
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let filter = |extra: &str| {
        format!(
            "filters = [{{ type = \"ExternalAuth\", externalAuth = {{ protocol = \"HTTP\", backendRef = {{ name = \"authz\" }}, \
             http = {{ path = \"/check\", allowedHeaders = [\"x-tenant\", \"quicmesh-attempt\"], allowedResponseHeaders = [\"x-auth-user\"] }}, timeout = \"500ms\"{extra} }} }}]"
        )
    };
    let gw_toml = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n\
         [[gateway.routes]]\nname = \"guarded\"\nhostnames = [\"guarded.test\"]\n[[gateway.routes.rules]]\n{}\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[gateway.routes]]\nname = \"lenient\"\nhostnames = [\"lenient.test\"]\n[[gateway.routes.rules]]\n{}\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[nodes]]\nname = \"node-b\"\naddress = \"{}\"\n\n{svc}",
        state.display(),
        filter(""),
        filter(", failOpen = true"),
        b.addrs.inbound
    );
    let gw = NodeProc::start_gateway(pki.path(), &gw_toml);
    let at = gw.addrs.listen;
    let me = [
        ("authorization", "Bearer let-me-in"),
        ("x-tenant", "t1"),
        ("x-secret", "s"),
        ("x-auth-user", "mallory"),
        ("quicmesh-attempt", "7"),
    ];

    // Allowed: on to the backend with the answer's allowed header (replacing the client's).
    let a = get_path(at, "guarded.test", "/orders?id=7", &me).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let upstream: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(upstream["headers"]["x-auth-user"], "alice");
    assert!(upstream["headers"].get("x-internal").is_none(), "a header the filter does not allow went on");
    let check = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!((check.method.as_str(), check.uri.to_string().as_str()), ("GET", "/check/orders?id=7"));
    assert_eq!(check.headers["x-tenant"], "t1");
    assert!(!check.headers.contains_key("x-secret"), "a header the filter does not allow reached the service");
    // The mesh's own headers are never the client's to send on, even when the filter lists one.
    assert!(!check.headers.contains_key("quicmesh-attempt"), "a client's quicmesh-attempt reached the service");

    // Refused: the service's answer, as it gave it.
    let a = get_path(at, "guarded.test", "/orders", &[]).await;
    assert_eq!((a.status, a.headers.get("www-authenticate").map(|v| v.to_str().unwrap())), (401, Some("Bearer")));
    let a = get_path(at, "guarded.test", "/blocked/x", &me).await;
    assert_eq!(
        (a.status, a.body.as_str(), &a.headers["x-reason"]),
        (403, "nope\n", &"blocked".parse::<http::HeaderValue>().unwrap())
    );

    // Too slow: 503, or on when the filter fails open.
    let a = get_path(at, "guarded.test", "/slow", &me).await;
    assert_eq!(
        (a.status, &a.headers["quicmesh-error"]),
        (503, &"authz-unavailable".parse::<http::HeaderValue>().unwrap())
    );
    assert_eq!(get_path(at, "lenient.test", "/slow", &me).await.status, 200, "failOpen");
    let m = gw.metrics().await;
    for (result, n) in [("allowed", 1.0), ("denied", 2.0), ("unavailable", 1.0)] {
        assert_eq!(metric(&m, "quicmesh_ext_authz_total", &[("route", "guarded"), ("result", result)]), n, "{result}");
    }
    assert_eq!(metric(&m, "quicmesh_ext_authz_total", &[("route", "lenient"), ("result", "failed-open")]), 1.0);
}

/// The ExternalAuth filter on a mesh route, applied by the calling node: node-a asks the
/// authorization service (on node-b, through the mesh) before sending on; and a filter whose
/// service has no instance listening answers 503 `authz-unavailable` without reaching the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_routes_external_authorization_is_asked_by_the_calling_node() {
    let (authz, seen) = authz_service().await;
    let echo = echo_backend().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let svc = format!(
        "[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"guarded\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"authz\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{authz}\"\n\n\
         [[services]]\nname = \"authz-down\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{dead}\"\n\n"
    );
    let filter = |service: &str| {
        format!(
            "filters = [{{ type = \"ExternalAuth\", externalAuth = {{ protocol = \"HTTP\", backendRef = {{ name = \"{service}\" }}, \
             http = {{ path = \"/check\", allowedResponseHeaders = [\"x-auth-user\"] }}, timeout = \"2s\" }} }}]"
        )
    };
    let routes = format!(
        "[[routes]]\nname = \"echo-guarded\"\nparentRefs = [{{ kind = \"Service\", name = \"echo\" }}]\n[[routes.rules]]\n{}\nbackendRefs = [{{ name = \"echo\" }}]\n\n\
         [[routes]]\nname = \"guarded-down\"\nparentRefs = [{{ kind = \"Service\", name = \"guarded\" }}]\n[[routes.rules]]\n{}\nbackendRefs = [{{ name = \"guarded\" }}]\n\n",
        filter("authz"),
        filter("authz-down")
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a = NodeProc::start(
        pki.path(),
        "node-a",
        &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &format!("{svc}{routes}")),
    );
    let call = |host: &'static str, token: Option<&'static str>| async move {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>();
        let mut req = http::Request::get(format!("http://{}/orders?id=7", a.addrs.outbound)).header("host", host);
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let resp = client.request(req.body(Empty::new()).unwrap()).await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        Answer { status, headers, body }
    };

    let ok = call("echo", Some("Bearer let-me-in")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let upstream: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
    assert_eq!(upstream["headers"]["x-auth-user"], "alice");
    let check = seen.lock().unwrap().last().cloned().expect("node-a asked the authorization service");
    assert_eq!(check.uri.to_string(), "/check/orders?id=7");

    let refused = call("echo", None).await;
    assert_eq!(
        (refused.status, refused.headers.get("www-authenticate").map(|v| v.to_str().unwrap())),
        (401, Some("Bearer"))
    );

    let down = call("guarded", Some("Bearer let-me-in")).await;
    assert_eq!((down.status, down.headers["quicmesh-error"].to_str().unwrap()), (503, "authz-unavailable"));
    let m = a.metrics().await;
    for (route, result, n) in
        [("echo-guarded", "allowed", 1.0), ("echo-guarded", "denied", 1.0), ("guarded-down", "unavailable", 1.0)]
    {
        assert_eq!(
            metric(&m, "quicmesh_ext_authz_total", &[("route", route), ("result", result)]),
            n,
            "{route} {result}"
        );
    }
}
