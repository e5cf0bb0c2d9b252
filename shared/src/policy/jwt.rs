//! JWT authentication of external callers at the edge (`gateway.jwt_providers`, and a route's
//! `jwt`): which tokens a provider accepts, and the check of one token against its key set.
//! Tokens are signed with asymmetric keys only (RSA, ECDSA, Ed25519 from a JWKS): the
//! algorithm must be the key's (no `none`, no HMAC, no HS/RS confusion), `exp` is required,
//! `iss` must be the provider's, `aud` one of its audiences when it lists any, and `nbf`/`exp`
//! hold within `clock_skew`. Fetching and caching the key set is `proxy::jwt`'s.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The longest token looked at; a longer one is refused unread.
pub const MAX_TOKEN: usize = 8 * 1024;

/// `[[gateway.jwt_providers]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtProvider {
    /// Unique; a route's `jwt` names it, and it is the `provider` label of
    /// `quicmesh_edge_jwt_total`.
    pub name: String,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// Tokens must name one of these in `aud`; empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The key set (JWKS, RFC 7517) as a file, read at load and again every `jwks_refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// The key set at an `https://` URL, fetched when first needed, again every
    /// `jwks_refresh`, and when a token names a key it lacks (at most once per
    /// `jwks_min_refresh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// CAs the JWKS server's certificate must chain to; empty: the host's CA bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwks_ca_certificates: Vec<PathBuf>,
    /// Age past which the key set is loaded again, when a token is next checked; also the
    /// longest a verified token is remembered. More than `0s`.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub jwks_refresh: Duration,
    /// The key set is loaded at most once per this long: a token naming a key the set lacks
    /// loads it again no sooner, and after a failed load the held set serves until then. More
    /// than `0s`.
    #[serde(default = "default_min_refresh", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub jwks_min_refresh: Duration,
    /// A header carrying the bare token, instead of `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_header: Option<String>,
    /// A cookie carrying the token, tried after the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cookie: Option<String>,
    /// Claims passed upstream as request headers (a client's own headers of these names are
    /// removed first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_to_headers: Vec<ClaimToHeader>,
    /// Leeway on `exp` and `nbf`.
    #[serde(default = "default_skew", with = "humantime_serde")]
    #[schemars(with = "crate::config::reference::Duration")]
    pub clock_skew: Duration,
    /// Keep the token on the request upstream (default: removed once verified).
    #[serde(default)]
    pub forward: bool,
}

fn default_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(10)
}

fn default_skew() -> Duration {
    Duration::from_secs(60)
}

/// A claim of the verified token, passed upstream as a request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// A top-level claim (`sub`, `email`, ...): strings as they are, other values as JSON.
    pub claim: String,
    /// The request header that carries it (a client's own header of this name is removed).
    pub header: String,
}

impl JwtProvider {
    /// Checks what can be checked without I/O; `key` names it in messages.
    pub fn validate(&self) -> Result<(), String> {
        if self.issuer.is_empty() {
            return Err("issuer is empty".into());
        }
        match (&self.jwks_file, &self.jwks_uri) {
            (Some(_), Some(_)) | (None, None) => return Err("give one of jwks_file and jwks_uri".into()),
            (None, Some(uri)) if !uri.starts_with("https://") || uri.parse::<http::Uri>().is_err() => {
                return Err(format!("jwks_uri {uri:?} is not an https:// URL"));
            }
            _ => {}
        }
        let names = self.from_header.iter().chain(self.claim_to_headers.iter().map(|c| &c.header));
        if let Some(bad) = names.into_iter().find(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err()) {
            return Err(format!("{bad:?} is not a header name"));
        }
        if self.jwks_min_refresh.is_zero() || self.jwks_refresh.is_zero() {
            return Err("jwks_refresh and jwks_min_refresh must be longer than 0s".into());
        }
        let max = crate::config::MAX_DURATION;
        if self.jwks_refresh > max || self.jwks_min_refresh > max || self.clock_skew > max {
            return Err("jwks_refresh, jwks_min_refresh and clock_skew must be at most 10 years".into());
        }
        Ok(())
    }
}

/// Why a request was not authenticated: the metric's `result` and the access log's `auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No token where the provider looks.
    Missing,
    /// Longer than [`MAX_TOKEN`].
    TooLarge,
    /// Not a JWT, or a claim of the wrong type, or `exp`/`iss` missing.
    Malformed,
    /// `none`, HMAC, or an algorithm that is not the key's.
    BadAlgorithm,
    /// No key of the set has the token's `kid`.
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// The key set could not be had (never loaded).
    KeysUnavailable,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::TooLarge => "too-large",
            Failure::Malformed => "malformed",
            Failure::BadAlgorithm => "bad-algorithm",
            Failure::UnknownKey => "unknown-key",
            Failure::BadSignature => "bad-signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not-yet-valid",
            Failure::WrongIssuer => "wrong-issuer",
            Failure::WrongAudience => "wrong-audience",
            Failure::KeysUnavailable => "keys-unavailable",
        }
    }
}

/// A verified token's claims.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// The key id a token names, if any (for a key set refresh); `Err` for a token that is not a
/// JWT with an algorithm this check could ever accept.
pub fn key_id(token: &str) -> Result<Option<String>, Failure> {
    if token.len() > MAX_TOKEN {
        return Err(Failure::TooLarge);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => Failure::BadAlgorithm,
        // A readable header whose `alg` is none of the library's (`none` among them).
        _ if declared_alg(token).is_some() => Failure::BadAlgorithm,
        _ => Failure::Malformed,
    })?;
    if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(Failure::BadAlgorithm);
    }
    Ok(header.kid)
}

/// The `alg` a token's header declares, if the header reads as JSON at all.
fn declared_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let first = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(first).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}

/// Verifies `token` against `keys` for `provider`.
pub fn check(token: &str, keys: &JwkSet, provider: &JwtProvider) -> Result<Claims, Failure> {
    let kid = key_id(token)?;
    let header = jsonwebtoken::decode_header(token).map_err(|_| Failure::Malformed)?;
    let jwk = match &kid {
        Some(kid) => keys.find(kid),
        // Without a `kid`, only a set of one key says which.
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
    .ok_or(Failure::UnknownKey)?;
    if !key_allows(jwk, header.alg) {
        return Err(Failure::BadAlgorithm);
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| Failure::UnknownKey)?;
    let mut v = Validation::new(header.alg);
    v.leeway = provider.clock_skew.as_secs();
    v.validate_nbf = true;
    v.set_issuer(&[provider.issuer.as_str()]);
    let mut required = vec!["exp", "iss"];
    if provider.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&provider.audiences);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<Claims>(token, &key, &v).map(|data| data.claims).map_err(|e| match e.kind() {
        K::InvalidSignature => Failure::BadSignature,
        K::ExpiredSignature => Failure::Expired,
        K::ImmatureSignature => Failure::NotYetValid,
        K::InvalidIssuer => Failure::WrongIssuer,
        K::InvalidAudience => Failure::WrongAudience,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => Failure::BadAlgorithm,
        _ => Failure::Malformed,
    })
}

/// Whether `alg` is what the key is for: the key's own `alg` when it names one, else the
/// algorithms of its type.
fn key_allows(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(declared) = &jwk.common.key_algorithm {
        // Both enums name the JOSE algorithms alike (RS256, ES256, EdDSA, ...).
        return format!("{declared:?}") == format!("{alg:?}");
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(_) => matches!(alg, Algorithm::ES256 | Algorithm::ES384),
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        // Shared secrets are not taken from a key set.
        AlgorithmParameters::OctetKey(_) => false,
    }
}

/// Parses a key set, keeping only the keys this check can use (a set may hold others, for
/// encryption or unsupported curves); `Err` when it is not a JWKS at all.
pub fn parse_key_set(bytes: &[u8]) -> Result<JwkSet, String> {
    let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let keys = raw.get("keys").and_then(|k| k.as_array()).ok_or("no \"keys\" array")?;
    let keys: Vec<Jwk> = keys
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
        .filter(|k| DecodingKey::from_jwk(k).is_ok())
        .collect();
    Ok(JwkSet { keys })
}

/// Verified claims as the gateway passes them to the destination node (`JWT_CLAIMS`):
/// base64url of their JSON.
pub fn encode_claims(claims: &Claims) -> Option<http::HeaderValue> {
    use base64::Engine as _;
    let json = serde_json::to_vec(claims).ok()?;
    http::HeaderValue::from_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)).ok()
}

/// The claims [`encode_claims`] made, or `None`.
pub fn decode_claims(value: &http::HeaderValue) -> Option<Claims> {
    use base64::Engine as _;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value.as_bytes()).ok()?;
    serde_json::from_slice(&json).ok()
}

/// A claim as a header value: strings as they are, anything else as JSON.
pub fn claim_value(claims: &Claims, claim: &str) -> Option<http::HeaderValue> {
    let text = match claims.get(claim)? {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    http::HeaderValue::from_str(&text).ok()
}
