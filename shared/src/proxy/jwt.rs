//! JWT authentication at the edge, with I/O: where a provider's token is found on a request,
//! its key set loaded (a file) or fetched (HTTPS) and kept, refreshed every `jwks_refresh` and
//! on a token naming an unknown key at most once per `jwks_min_refresh` (a flood of made-up key
//! ids costs the JWKS server nothing), and what a verified token does to the request (claims to
//! headers, the token removed). The checks themselves are `policy::jwt`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName};
use http_body_util::BodyExt as _;
use jsonwebtoken::jwk::JwkSet;
use tracing::{info, warn};

use crate::config::BackendTls;
use crate::policy::jwt::{self, Claims, Failure, JwtProvider};
use crate::proxy::backend_tls::TlsConnect;
use crate::telemetry::metrics as m;

/// Verified tokens kept (by their SHA-256), so a client's next request with the same token is
/// not checked again; when full, the cache starts over.
const MAX_CACHED: usize = 1024;

/// The most a JWKS answer may hold.
const MAX_JWKS: usize = 1 << 20;
/// The longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

type FetchClient = hyper_util::client::legacy::Client<TlsConnect, http_body_util::Empty<Bytes>>;

/// Verified tokens by their SHA-256: their claims and until when they stand.
type Verified = HashMap<[u8; 32], (Claims, Instant)>;

/// One provider's verifier and key set.
pub struct Verifier {
    provider: JwtProvider,
    keys: Mutex<Keys>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    client: Option<FetchClient>,
    /// Tokens verified, with their claims, until their `exp` (at most `jwks_refresh`).
    verified: Mutex<Verified>,
}

#[derive(Default)]
struct Keys {
    set: Option<Arc<JwkSet>>,
    /// When the set was last loaded, and when a load was last tried.
    loaded: Option<Instant>,
    tried: Option<Instant>,
}

impl Verifier {
    /// A file's key set is read now (a provider whose file does not load is a config error);
    /// a URL's is fetched when first needed.
    pub fn new(provider: &JwtProvider) -> Result<Self, String> {
        provider.validate()?;
        let mut keys = Keys::default();
        let client = match (&provider.jwks_file, &provider.jwks_uri) {
            (Some(file), _) => {
                keys.set = Some(Arc::new(read_file(file)?));
                keys.loaded = Some(Instant::now());
                keys.tried = keys.loaded;
                None
            }
            (None, Some(uri)) => Some(fetch_client(provider, uri)?),
            (None, None) => None,
        };
        Ok(Self {
            provider: provider.clone(),
            keys: Mutex::new(keys),
            refreshing: Default::default(),
            client,
            verified: Default::default(),
        })
    }

    pub fn provider(&self) -> &JwtProvider {
        &self.provider
    }

    /// The token the provider looks for on these headers: its header (or `Authorization:
    /// Bearer`), then its cookie.
    pub fn token<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        self.header_token(headers).or_else(|| {
            let name = self.provider.from_cookie.as_deref()?;
            headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .filter(|t| !t.is_empty())
        })
    }

    /// The token in the provider's header (or `Authorization: Bearer`).
    fn header_token<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        let found = match &self.provider.from_header {
            Some(name) => headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::trim),
            None => headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
            }),
        };
        found.filter(|t| !t.is_empty())
    }

    /// Verifies the request's token; on success the headers get the claims the provider
    /// passes on, and lose the token unless it is forwarded. Counted by result either way.
    pub async fn authenticate(&self, headers: &mut HeaderMap) -> Result<Claims, Failure> {
        // A client's own copies of the claim headers never pass, authenticated or not.
        for c in &self.provider.claim_to_headers {
            headers.remove(c.header.as_str());
        }
        let result = self.verify(headers).await;
        metrics::counter!(m::EDGE_JWT, "provider" => self.provider.name.clone(), "result" => result.as_ref().map_or_else(|f| f.label(), |_| "ok"))
            .increment(1);
        let claims = result?;
        for c in &self.provider.claim_to_headers {
            if let (Ok(name), Some(value)) =
                (HeaderName::from_bytes(c.header.as_bytes()), jwt::claim_value(&claims, &c.claim))
            {
                headers.insert(name, value);
            }
        }
        // A token from a header goes no further (a cookie's stays, with the other cookies).
        if !self.provider.forward && self.header_token(headers).is_some() {
            match &self.provider.from_header {
                Some(name) => headers.remove(name.as_str()),
                None => headers.remove(AUTHORIZATION),
            };
        }
        Ok(claims)
    }

    async fn verify(&self, headers: &HeaderMap) -> Result<Claims, Failure> {
        let token = self.token(headers).ok_or(Failure::Missing)?;
        if token.len() > jwt::MAX_TOKEN {
            return Err(Failure::TooLarge);
        }
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| Failure::Malformed)?;
        let now = Instant::now();
        if let Some((claims, until)) = self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&digest) {
            if now < *until {
                return Ok(claims.clone());
            }
        }
        let kid = jwt::key_id(token)?;
        let set = self.key_set(kid.as_deref()).await.ok_or(Failure::KeysUnavailable)?;
        let claims = jwt::check(token, &set, &self.provider)?;
        // Good until it expires (with the skew the check allows), and no longer than the key
        // set is kept, so a key withdrawn from the set stops its tokens within that time.
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let exp =
            claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0).saturating_add(self.provider.clock_skew.as_secs());
        let life = Duration::from_secs(exp.saturating_sub(unix)).min(self.provider.jwks_refresh);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_CACHED {
            verified.clear();
        }
        verified.insert(digest, (claims.clone(), now + life));
        Ok(claims)
    }

    /// The key set to check a token naming `kid` against: the one held, unless it is due for
    /// a refresh or lacks `kid`, and a load was not tried within `jwks_min_refresh`.
    async fn key_set(&self, kid: Option<&str>) -> Option<Arc<JwkSet>> {
        let due = |keys: &Keys| {
            let now = Instant::now();
            let stale = keys.loaded.is_none_or(|t| now.duration_since(t) >= self.provider.jwks_refresh);
            let lacks = kid.is_some_and(|kid| keys.set.as_ref().is_none_or(|s| s.find(kid).is_none()));
            let may = keys.tried.is_none_or(|t| now.duration_since(t) >= self.provider.jwks_min_refresh);
            (stale || lacks) && may
        };
        {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            if !due(&keys) {
                return keys.set.clone();
            }
        }
        let _one = self.refreshing.lock().await;
        // Another request may have refreshed while this one waited.
        if !due(&self.keys.lock().unwrap_or_else(|e| e.into_inner())) {
            return self.keys.lock().unwrap_or_else(|e| e.into_inner()).set.clone();
        }
        let loaded = self.load().await;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.tried = Some(Instant::now());
        match loaded {
            Ok(set) => {
                keys.set = Some(Arc::new(set));
                keys.loaded = keys.tried;
            }
            // The set held goes on serving; the next try waits `jwks_min_refresh`.
            Err(e) => {
                metrics::counter!(m::EDGE_JWKS_FAILURES, "provider" => self.provider.name.clone()).increment(1);
                warn!(provider = self.provider.name, error = e, "could not load the JWT key set");
            }
        }
        keys.set.clone()
    }

    async fn load(&self) -> Result<JwkSet, String> {
        if let Some(file) = &self.provider.jwks_file {
            return read_file(file);
        }
        let (Some(client), Some(uri)) = (&self.client, &self.provider.jwks_uri) else {
            return Err("no key set source".into());
        };
        let uri: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
            let resp = client.get(uri.clone()).await.map_err(|e| format!("{e:?}"))?;
            if !resp.status().is_success() {
                return Err(format!("answered {}", resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS);
            body.collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
        let set = jwt::parse_key_set(&fetched)?;
        info!(provider = self.provider.name, keys = set.keys.len(), "JWT key set fetched");
        Ok(set)
    }
}

fn read_file(file: &std::path::Path) -> Result<JwkSet, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    jwt::parse_key_set(&bytes).map_err(|e| format!("{}: {e}", file.display()))
}

/// An HTTPS client for the JWKS server, trusting the provider's CAs or the host's bundle.
fn fetch_client(provider: &JwtProvider, uri: &str) -> Result<FetchClient, String> {
    let host = uri.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_string)).ok_or("no host")?;
    let policy = BackendTls {
        ca_certificates: provider.jwks_ca_certificates.clone(),
        well_known_ca_certificates: provider
            .jwks_ca_certificates
            .is_empty()
            .then_some(crate::config::WellKnownCas::System),
        hostname: host,
        subject_alt_names: Vec::new(),
    };
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(FETCH_TIMEOUT));
    let connect = TlsConnect::new(tcp, &policy, b"http/1.1")?;
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connect))
}

/// The gateway's verifiers by provider name, made when first used and kept while the
/// provider's config stays the same (so its key set is not fetched again on every reload).
#[derive(Default)]
pub struct Providers {
    made: Mutex<HashMap<String, Arc<Verifier>>>,
}

impl Providers {
    /// The verifier of `provider` as configured now.
    pub fn get(&self, provider: &JwtProvider) -> Result<Arc<Verifier>, String> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = made.get(&provider.name).filter(|v| v.provider == *provider) {
            return Ok(v.clone());
        }
        let v = Arc::new(Verifier::new(provider)?);
        made.insert(provider.name.clone(), v.clone());
        Ok(v)
    }
}
