//! Enrollment of new hosts: join tokens and signing requests (the gateway check a joining node
//! makes before it sends its token is `tls::MeshServerVerifier::pinned`).
//!
//! `quicmesh token create` stores only the SHA-256 of each token (in `<state>/tokens.json`), with
//! its expiry and remaining uses; the token itself is printed once. A node on a fresh host makes
//! its own key (it never leaves the host), sends a signing request with the token, and gets back
//! a certificate for `spiffe://<td>/node/<name>` and the CA bundle.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Path of the enrollment request on the gateway's control listener.
pub const ENROLL_PATH: &str = "/quicmesh.enroll/v1";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown token")]
    Unknown,
    #[error("the token expired")]
    Expired,
    #[error("the token was already used")]
    Used,
    /// The token is bound to another node (which one is not told to the caller).
    #[error("the token is not for this node")]
    WrongNode,
    #[error("token store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
}

/// What is kept of a token: its hash, never the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub expires_unix: u64,
    pub uses_left: u32,
    #[serde(default)]
    pub node: Option<String>,
}

impl TokenRecord {
    /// Whether this record lets `name` enroll now.
    pub fn allows(&self, name: &str) -> Result<(), EnrollError> {
        if self.expires_unix <= now_unix() {
            return Err(EnrollError::Expired);
        }
        if self.uses_left == 0 {
            return Err(EnrollError::Used);
        }
        if self.node.as_deref().is_some_and(|n| n != name) {
            return Err(EnrollError::WrongNode);
        }
        Ok(())
    }
}

/// Hex SHA-256 of a token: the key its record is found by.
pub fn token_hash(token: &str) -> String {
    hex(digest(&SHA256, token.as_bytes()).as_ref())
}

/// A fresh token valid for `ttl` and `uses` enrollments (optionally only for `node`), and the
/// record to keep of it.
pub fn new_token(ttl: Duration, uses: u32, node: Option<String>) -> Result<(String, TokenRecord), EnrollError> {
    let mut raw = [0u8; 24];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| EnrollError::Store { path: PathBuf::new(), reason: "no randomness".into() })?;
    let token = format!("qm1.{}", hex(&raw));
    let record = TokenRecord {
        sha256: token_hash(&token),
        expires_unix: now_unix().saturating_add(ttl.as_secs().max(u64::from(!ttl.is_zero()))),
        uses_left: uses,
        node,
    };
    Ok((token, record))
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub use crate::identity::fingerprint;

/// The token store.
const TOKENS: &str = "tokens.json";
/// When each node's last certificate issued here expires (Unix seconds), by name.
const ISSUED: &str = "issued.json";

fn load<R: serde::de::DeserializeOwned + Default>(dir: &Path, file: &str) -> Result<R, EnrollError> {
    let path = dir.join(file);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).map_err(|e| EnrollError::Store { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(R::default()),
        Err(e) => Err(EnrollError::Store { path, reason: e.to_string() }),
    }
}

/// Runs `change` on one of the stores in `dir` under an exclusive lock on `tokens.lock` beside
/// them, then saves what it left: `quicmesh token create` run twice at once, or while the
/// gateway redeems a token, would otherwise lose one of the writes.
fn update<R: serde::de::DeserializeOwned + Serialize + Default, T>(
    dir: &Path,
    file: &str,
    change: impl FnOnce(&mut R) -> Result<T, EnrollError>,
) -> Result<T, EnrollError> {
    let lock_path = dir.join("tokens.lock");
    let err = |e: std::io::Error| EnrollError::Store { path: lock_path.clone(), reason: e.to_string() };
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(err)?;
    lock.lock().map_err(err)?;
    let mut records = load(dir, file)?;
    let out = change(&mut records)?;
    save(dir, file, &records)?;
    // Unlocked when `lock` closes.
    Ok(out)
}

fn save(dir: &Path, file: &str, records: &impl Serialize) -> Result<(), EnrollError> {
    let path = dir.join(file);
    let err = |e: String| EnrollError::Store { path: path.clone(), reason: e };
    let data = serde_json::to_vec_pretty(records).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    crate::identity::write_secret(&tmp, &data).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
}

type IssuedRecords = std::collections::BTreeMap<String, u64>;

/// Notes that a certificate for node `name` was issued here, valid until `not_after_unix`
/// (names whose certificates have all expired are forgotten as it writes).
pub fn record_issued(dir: &Path, name: &str, not_after_unix: u64) -> Result<(), EnrollError> {
    update(dir, ISSUED, |issued: &mut IssuedRecords| {
        let now = now_unix();
        issued.retain(|_, until| *until > now);
        let until = issued.entry(name.to_string()).or_default();
        *until = (*until).max(not_after_unix);
        Ok(())
    })
}

/// Until when node `name` holds a certificate issued here (Unix seconds), if it still does.
pub fn holds_certificate(dir: &Path, name: &str) -> Result<Option<u64>, EnrollError> {
    let issued: IssuedRecords = load(dir, ISSUED)?;
    Ok(issued.get(name).copied().filter(|until| *until > now_unix()))
}

/// Creates a token valid for `ttl` and `uses` enrollments (optionally only for `node`).
pub fn create_token(dir: &Path, ttl: Duration, uses: u32, node: Option<String>) -> Result<String, EnrollError> {
    let (token, record) = new_token(ttl, uses, node)?;
    update(dir, TOKENS, |records: &mut Vec<TokenRecord>| {
        // Drop what can never be used again.
        let now = now_unix();
        records.retain(|r| r.expires_unix > now && r.uses_left > 0);
        records.push(record);
        Ok(())
    })?;
    Ok(token)
}

fn usable<'a>(records: &'a mut [TokenRecord], token: &str, name: &str) -> Result<&'a mut TokenRecord, EnrollError> {
    let hash = token_hash(token);
    let rec = records.iter_mut().find(|r| r.sha256 == hash).ok_or(EnrollError::Unknown)?;
    rec.allows(name)?;
    Ok(rec)
}

/// Whether `token` could enroll `name` now, without spending it; `Ok(true)` when the token is
/// bound to exactly that name.
pub fn check(dir: &Path, token: &str, name: &str) -> Result<bool, EnrollError> {
    let mut records: Vec<TokenRecord> = load(dir, TOKENS)?;
    Ok(usable(&mut records, token, name)?.node.is_some())
}

/// Spends one use of `token` for node `name`; on any refusal nothing changes.
pub fn redeem(dir: &Path, token: &str, name: &str) -> Result<(), EnrollError> {
    update(dir, TOKENS, |records: &mut Vec<TokenRecord>| {
        usable(records, token, name)?.uses_left -= 1;
        Ok(())
    })
}

/// What a joining node sends.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub name: String,
    pub token: String,
    /// PEM certificate signing request for the node's own key.
    pub csr: String,
}

impl std::fmt::Debug for EnrollRequest {
    // The token is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest").field("name", &self.name).field("token", &"<redacted>").finish()
    }
}

/// What the gateway answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub certificate: String,
    pub ca: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_created_at_once_are_all_kept() {
        // The README's by-hand path creates two tokens at once (each in a backgrounded command).
        let dir = tempfile::tempdir().unwrap();
        let made: Vec<String> = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..8)
                .map(|_| s.spawn(|| create_token(dir.path(), Duration::from_secs(3600), 1, None).unwrap()))
                .collect();
            tasks.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for t in &made {
            assert!(check(dir.path(), t, "n").is_ok(), "a token created alongside others was lost");
        }
    }

    #[test]
    fn tokens_are_single_use_expire_and_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let t = create_token(dir.path(), Duration::from_secs(3600), 1, None).unwrap();
        let stored = std::fs::read_to_string(dir.path().join(TOKENS)).unwrap();
        assert!(!stored.contains(&t), "the token itself was stored");
        assert!(matches!(redeem(dir.path(), "qm1.nope", "a"), Err(EnrollError::Unknown)));
        redeem(dir.path(), &t, "a").unwrap();
        assert!(matches!(redeem(dir.path(), &t, "a"), Err(EnrollError::Used)));
        let bound = create_token(dir.path(), Duration::from_secs(3600), 2, Some("b".into())).unwrap();
        assert!(matches!(redeem(dir.path(), &bound, "a"), Err(EnrollError::WrongNode)));
        assert!(check(dir.path(), &bound, "b").unwrap(), "a bound token says so");
        redeem(dir.path(), &bound, "b").unwrap();
        let expired = create_token(dir.path(), Duration::ZERO, 1, None).unwrap();
        assert!(matches!(redeem(dir.path(), &expired, "a"), Err(EnrollError::Expired)));
    }
}
