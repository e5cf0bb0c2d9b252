//! The state gateway replicas share, kept in etcd (`[gateway.store]`): each node's registration
//! under `<prefix>/nodes/<name>`, attached to a lease of its own whose time to live is
//! `gateway.node_grace`. The replica holding a node's control stream keeps that lease alive;
//! when the stream breaks the lease runs out and etcd deletes the registration for every replica
//! at once, unless the node re-attaches (to any replica) first. Every replica watches the prefix
//! and builds its snapshots from what etcd holds, so all of them serve the same mesh.
//!
//! etcd is spoken to through its v3 JSON API (the gRPC gateway every etcd 3.4+ serves on its
//! client port), over HTTP/1.1 with hyper: the `etcd-client` crate needs `protoc` at build
//! time, which a fresh machine does not have.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use quicmesh_shared::config::Layer;
use quicmesh_shared::control::enroll::{self, TokenRecord};
use quicmesh_shared::control::Registration;
use serde_json::{json, Value};
use tracing::{debug, warn};

/// The key of the shared config, under the prefix.
const CONFIG_KEY: &str = "config";

/// One request to etcd may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer (or watch line) read from etcd: far over what the mesh stores (etcd refuses
/// requests over 1.5 MiB by default), and a bound on what a broken or hostile endpoint can make
/// a replica hold.
const MAX_ANSWER: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(text: &Value) -> Vec<u8> {
    text.as_str().and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok()).unwrap_or_default()
}

/// etcd's JSON numbers are 64-bit integers written as strings.
fn int(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()).unwrap_or(0)
}

/// A client of an etcd cluster: requests go to the first endpoint that answers, over pooled
/// keep-alive connections (every attached node renews its lease every few seconds).
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// One write of a transaction.
pub enum Op {
    /// Rewrites an existing key, keeping its lease.
    Put(String, Vec<u8>),
    /// Writes a key without a lease.
    PutNew(String, Vec<u8>),
    /// Writes a key attached to a lease (deleted with it).
    PutLeased(String, Vec<u8>, i64),
}

/// One change under a watched prefix.
#[derive(Debug)]
pub enum Change {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Etcd {
    pub fn new(endpoints: Vec<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CALL_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { endpoints, client }
    }

    async fn send(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let req = http::Request::post(format!("http://{endpoint}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        self.client.request(req).await.map_err(|e| e.to_string())
    }

    /// One unary call: the first endpoint that answers decides.
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let mut last = String::from("no endpoints");
        for endpoint in &self.endpoints {
            let attempt = async {
                let resp = self.send(endpoint, path, &body).await?;
                let status = resp.status();
                let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
                let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((status, bytes))
            };
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok((status, bytes))) => {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if status.is_success() {
                        return Ok(v);
                    }
                    let msg = v.get("error").or_else(|| v.get("message")).and_then(Value::as_str).unwrap_or("");
                    // A member without quorum answers too: try the next one.
                    last = format!("{endpoint}: {status} {msg}");
                    if status.is_client_error() {
                        return Err(StoreError::Refused(last));
                    }
                }
                Ok(Err(e)) => last = format!("{endpoint}: {e}"),
                Err(_) => last = format!("{endpoint}: no answer in {CALL_TIMEOUT:?}"),
            }
        }
        Err(StoreError::Unreachable(last))
    }

    /// A lease of `ttl` (whole seconds, at least one).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl.as_secs().max(1) })).await?;
        Ok(int(&v["ID"]))
    }

    /// Renews a lease; false when it had already run out.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    /// Ends a lease and deletes its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() })).await.map(drop)
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), StoreError> {
        let mut body = json!({ "key": b64(key), "value": b64(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.call("/v3/kv/put", body).await.map(drop)
    }

    /// One key's value and the revision it was last written at.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let v = self.call("/v3/kv/range", json!({ "key": b64(key) })).await?;
        Ok(v["kvs"].as_array().and_then(|kvs| kvs.first()).map(|kv| (unb64(&kv["value"]), int(&kv["mod_revision"]))))
    }

    /// Runs `ops` only if `key` was last written at `revision` (0: only if it does not exist),
    /// atomically; whether they ran.
    pub async fn put_if(&self, key: &str, revision: i64, ops: &[Op]) -> Result<bool, StoreError> {
        self.put_if_all(&[(key, revision)], ops).await
    }

    /// [`Etcd::put_if`] with several keys, each as last read.
    pub async fn put_if_all(&self, expected: &[(&str, i64)], ops: &[Op]) -> Result<bool, StoreError> {
        let compare: Vec<Value> = expected
            .iter()
            .map(|(key, revision)| match revision {
                0 => json!({ "key": b64(key), "target": "CREATE", "create_revision": "0", "result": "EQUAL" }),
                r => json!({ "key": b64(key), "target": "MOD", "mod_revision": r.to_string(), "result": "EQUAL" }),
            })
            .collect();
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                // A rewrite keeps the lease the key has.
                Op::Put(k, v) => json!({ "request_put": { "key": b64(k), "value": b64(v), "ignore_lease": true } }),
                Op::PutNew(k, v) => json!({ "request_put": { "key": b64(k), "value": b64(v) } }),
                Op::PutLeased(k, v, lease) => {
                    json!({ "request_put": { "key": b64(k), "value": b64(v), "lease": lease.to_string() } })
                }
            })
            .collect();
        let v = self.call("/v3/kv/txn", json!({ "compare": compare, "success": success })).await?;
        Ok(v["succeeded"].as_bool() == Some(true))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key) })).await.map(drop)
    }

    /// The end of a prefix's key range: the prefix with its last byte incremented.
    fn range_end(prefix: &str) -> Vec<u8> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }

    /// Every key under `prefix` and the revision the answer is at.
    pub async fn range(&self, prefix: &str) -> Result<(i64, Vec<(String, Vec<u8>)>), StoreError> {
        let body = json!({ "key": b64(prefix), "range_end": b64(Self::range_end(prefix)) });
        let v = self.call("/v3/kv/range", body).await?;
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        let items = kvs
            .iter()
            .map(|kv| (String::from_utf8_lossy(&unb64(&kv["key"])).into_owned(), unb64(&kv["value"])))
            .collect();
        Ok((int(&v["header"]["revision"]), items))
    }

    /// Streams the changes under `prefix` from revision `from` to `changes`, until the stream
    /// breaks (an error) or the receiver is gone (Ok).
    pub async fn watch(
        &self,
        prefix: &str,
        from: i64,
        changes: &tokio::sync::mpsc::UnboundedSender<Vec<Change>>,
    ) -> Result<(), StoreError> {
        let body = json!({ "create_request": {
            "key": b64(prefix), "range_end": b64(Self::range_end(prefix)), "start_revision": from.to_string(),
        }});
        let mut last = String::from("no endpoints");
        for endpoint in &self.endpoints {
            let resp = match tokio::time::timeout(CALL_TIMEOUT, self.send(endpoint, "/v3/watch", &body)).await {
                Ok(Ok(r)) if r.status().is_success() => r,
                Ok(Ok(r)) => {
                    last = format!("{endpoint}: {}", r.status());
                    continue;
                }
                Ok(Err(e)) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{endpoint}: no answer");
                    continue;
                }
            };
            debug!(endpoint, prefix, from, "watching etcd");
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| StoreError::Unreachable(format!("{endpoint}: {e}")))?;
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
                    if v["result"]["canceled"].as_bool() == Some(true) || v.get("error").is_some() {
                        return Err(StoreError::Refused(format!("{endpoint}: watch ended: {v}")));
                    }
                    let events = v["result"]["events"].as_array().cloned().unwrap_or_default();
                    if events.is_empty() {
                        continue;
                    }
                    let batch = events
                        .iter()
                        .map(|e| {
                            let key = String::from_utf8_lossy(&unb64(&e["kv"]["key"])).into_owned();
                            match e["type"].as_str() {
                                Some("DELETE") => Change::Delete(key),
                                _ => Change::Put(key, unb64(&e["kv"]["value"])),
                            }
                        })
                        .collect();
                    if changes.send(batch).is_err() {
                        return Ok(());
                    }
                }
                // What is left is part of one line: it may not grow without end.
                if buf.len() > MAX_ANSWER {
                    return Err(StoreError::Refused(format!("{endpoint}: a watch answer over {MAX_ANSWER} bytes")));
                }
            }
            return Err(StoreError::Unreachable(format!("{endpoint}: the watch stream ended")));
        }
        Err(StoreError::Unreachable(last))
    }
}

/// What replicas share, in etcd under `<prefix>/`: `nodes/<name>` (registrations, leased),
/// `revoked/<name>` (revocations, kept), `tokens/<sha256>` (join tokens, leased until they
/// expire, spent in transactions), `issued/<name>` (the last certificate issued) and `config`
/// (the shared config layers, versioned).
pub struct Store {
    pub etcd: Etcd,
    root: String,
    /// A registration's time to live once its node's stream is gone.
    pub ttl: Duration,
}

/// The record of a certificate issued to a member (`issued/<name>`): the last one wins.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// SHA-256 of the certificate (DER), hex.
    pub fingerprint: String,
    pub issued_unix: u64,
    pub not_after_unix: u64,
    /// The replica that signed it.
    pub by: String,
    /// "enrolled" or "renewed".
    pub how: String,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Issued {
    pub fn new(certificate_pem: &str, validity: Duration, by: &str, how: &str) -> Self {
        let fingerprint = quicmesh_shared::identity::read_pem_der(certificate_pem)
            .map(|der| quicmesh_shared::identity::fingerprint(&der))
            .unwrap_or_default();
        let now = unix_now();
        Self {
            fingerprint,
            issued_unix: now,
            not_after_unix: now + validity.as_secs(),
            by: by.to_string(),
            how: how.to_string(),
        }
    }
}

/// The config every replica layers over its own files (`config`), applied with
/// `quicmesh config apply`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedConfig {
    /// Counts up from 1 with every change.
    pub version: u64,
    pub layers: Vec<Layer>,
    /// The replica that checked and wrote it.
    pub by: String,
    pub applied_unix: u64,
}

/// One key of the store, decoded.
pub enum Entry {
    Node(String, Registration),
    Revoked(String),
    Config(SharedConfig),
}

/// One key of the store, deleted.
pub enum Gone {
    Node(String),
    Revoked(String),
    Config,
}

/// Everything the store holds, and the revision to watch from.
pub struct Loaded {
    pub revision: i64,
    pub nodes: BTreeMap<String, Registration>,
    pub revoked: std::collections::BTreeSet<String>,
    pub config: Option<SharedConfig>,
}

impl Store {
    pub fn new(endpoints: Vec<String>, prefix: &str, ttl: Duration) -> Self {
        Self { etcd: Etcd::new(endpoints), root: format!("{}/", prefix.trim_end_matches('/')), ttl }
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }

    fn revoked_key(&self, node: &str) -> String {
        format!("{}revoked/{node}", self.root)
    }

    /// Writes a node's registration under `lease` (granting one when there is none yet);
    /// returns the lease.
    pub async fn attach(&self, node: &str, reg: &Registration, lease: Option<i64>) -> Result<i64, StoreError> {
        let lease = match lease {
            Some(l) => l,
            None => self.etcd.grant(self.ttl).await?,
        };
        let value = serde_json::to_vec(reg).map_err(|e| StoreError::Refused(e.to_string()))?;
        self.etcd.put(&self.node_key(node), &value, Some(lease)).await?;
        Ok(lease)
    }

    /// Records a revocation for every replica, and removes the member's registration.
    pub async fn revoke(&self, node: &str) -> Result<(), StoreError> {
        self.etcd.put(&self.revoked_key(node), b"", None).await?;
        self.etcd.delete(&self.node_key(node)).await
    }

    fn token_key(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.root)
    }

    fn issued_key(&self, node: &str) -> String {
        format!("{}issued/{node}", self.root)
    }

    /// Keeps a join token's record (never the token) until it expires: etcd deletes it then.
    pub async fn add_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let left = record.expires_unix.saturating_sub(unix_now()).max(1);
        let lease = self.etcd.grant(Duration::from_secs(left)).await?;
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Refused(e.to_string()))?;
        self.etcd.put(&self.token_key(&record.sha256), &value, Some(lease)).await
    }

    /// A token's record and the revision it was last written at.
    pub async fn token(&self, token: &str) -> Result<Option<(TokenRecord, i64)>, StoreError> {
        let Some((value, revision)) = self.etcd.get(&self.token_key(&enroll::token_hash(token))).await? else {
            return Ok(None);
        };
        let record = serde_json::from_slice(&value)
            .map_err(|e| StoreError::Refused(format!("an unreadable token record in etcd: {e}")))?;
        Ok(Some((record, revision)))
    }

    /// Spends one use of a token read at `revision` and records the certificate issued with
    /// it, in one transaction: false (nothing written) when the token changed since it was
    /// read, so of two replicas redeeming one token at once exactly one succeeds.
    /// With `issued_at` (the revision of the node's issued record as read, 0 for none), only
    /// if no replica has issued the node a certificate since: two replicas redeeming two
    /// unbound tokens for one name at once would otherwise both issue it.
    pub async fn spend_token(
        &self,
        record: &TokenRecord,
        revision: i64,
        node: &str,
        issue: &Issued,
        issued_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let key = self.token_key(&record.sha256);
        // A spent token stays (with no uses left) until its lease ends, so a late holder hears
        // "already used" rather than "unknown".
        let left = TokenRecord { uses_left: record.uses_left.saturating_sub(1), ..record.clone() };
        let spent = Op::Put(key.clone(), serde_json::to_vec(&left).unwrap_or_default());
        let issued = Op::PutNew(self.issued_key(node), serde_json::to_vec(issue).unwrap_or_default());
        let issued_key = self.issued_key(node);
        let mut expected = vec![(key.as_str(), revision)];
        if let Some(at) = issued_at {
            expected.push((issued_key.as_str(), at));
        }
        self.etcd.put_if_all(&expected, &[spent, issued]).await
    }

    /// Records a certificate issued outside enrollment (a renewal).
    pub async fn record_issue(&self, node: &str, issue: &Issued) -> Result<(), StoreError> {
        self.etcd.put(&self.issued_key(node), &serde_json::to_vec(issue).unwrap_or_default(), None).await
    }

    /// The last certificate issued to `node`, by any replica, and the revision of its record
    /// (0: none).
    pub async fn issued(&self, node: &str) -> Result<(Option<Issued>, i64), StoreError> {
        Ok(match self.etcd.get(&self.issued_key(node)).await? {
            Some((v, revision)) => (serde_json::from_slice(&v).ok(), revision),
            None => (None, 0),
        })
    }

    /// Everything under the prefix.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let (revision, items) = self.etcd.range(&self.root).await?;
        let mut loaded = Loaded { revision, nodes: BTreeMap::new(), revoked: Default::default(), config: None };
        for (key, value) in items {
            match self.decode(&key, &value) {
                Some(Entry::Node(name, reg)) => {
                    loaded.nodes.insert(name, reg);
                }
                Some(Entry::Revoked(name)) => {
                    loaded.revoked.insert(name);
                }
                Some(Entry::Config(c)) => loaded.config = Some(c),
                None => {}
            }
        }
        Ok(loaded)
    }

    /// A key and its value, as what they record (`None`: not ours, or unreadable).
    pub fn decode(&self, key: &str, value: &[u8]) -> Option<Entry> {
        let rest = key.strip_prefix(&self.root)?;
        if let Some(name) = rest.strip_prefix("nodes/") {
            return match serde_json::from_slice(value) {
                Ok(reg) => Some(Entry::Node(name.to_string(), reg)),
                Err(e) => {
                    warn!(key, "ignoring an unreadable registration in etcd: {e}");
                    None
                }
            };
        }
        if rest == CONFIG_KEY {
            return match serde_json::from_slice(value) {
                Ok(c) => Some(Entry::Config(c)),
                Err(e) => {
                    warn!(key, "ignoring an unreadable shared config in etcd: {e}");
                    None
                }
            };
        }
        rest.strip_prefix("revoked/").map(|name| Entry::Revoked(name.to_string()))
    }

    /// What a deleted key no longer records.
    pub fn decode_deleted(&self, key: &str) -> Option<Gone> {
        let rest = key.strip_prefix(&self.root)?;
        if let Some(name) = rest.strip_prefix("nodes/") {
            return Some(Gone::Node(name.to_string()));
        }
        if rest == CONFIG_KEY {
            return Some(Gone::Config);
        }
        rest.strip_prefix("revoked/").map(|name| Gone::Revoked(name.to_string()))
    }

    /// Replaces the shared config with `layers` as version `after + 1`, unless another
    /// replica changed it since it was read at `after`: then `None`, nothing written.
    pub async fn apply_config(&self, layers: Vec<Layer>, by: &str) -> Result<SharedConfig, StoreError> {
        let key = format!("{}{CONFIG_KEY}", self.root);
        // Another replica applying at the same moment: read again and count from its version.
        for _ in 0..16 {
            let (version, revision) = match self.etcd.get(&key).await? {
                Some((value, revision)) => {
                    let held: Option<SharedConfig> = serde_json::from_slice(&value).ok();
                    (held.map_or(0, |c| c.version), revision)
                }
                None => (0, 0),
            };
            let next = SharedConfig {
                // Whatever the store held: a version at the end of the range stays there.
                version: version.saturating_add(1),
                layers: layers.clone(),
                by: by.to_string(),
                applied_unix: unix_now(),
            };
            let value = serde_json::to_vec(&next).map_err(|e| StoreError::Refused(e.to_string()))?;
            if self.etcd.put_if(&key, revision, &[Op::PutNew(key.clone(), value)]).await? {
                return Ok(next);
            }
        }
        Err(StoreError::Refused("the shared config kept changing under this apply; try again".into()))
    }

    /// The prefix every replica watches.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Where `gateway.acme`'s shared state lives: `certs/<hostname>` (the certificate and its
    /// key, kept), `lock/<hostname>` (the replica ordering it), `alpn/<hostname>` and
    /// `http/<token>` (challenge answers while an order waits; these two and the lock are
    /// leased, so a replica that dies mid-order leaves nothing behind).
    pub fn acme_prefix(&self) -> String {
        format!("{}acme/", self.root)
    }

    /// Takes the ordering of `hostname` for `by`, for at most `ttl`: the lease to publish the
    /// order's challenge answers under and to end when done, or `None` when another replica
    /// holds it.
    pub async fn acme_lock(&self, hostname: &str, by: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let lease = self.etcd.grant(ttl).await?;
        let key = format!("{}lock/{hostname}", self.acme_prefix());
        if self.etcd.put_if(&key, 0, &[Op::PutLeased(key.clone(), by.as_bytes().to_vec(), lease)]).await? {
            Ok(Some(lease))
        } else {
            let _ = self.etcd.revoke(lease).await;
            Ok(None)
        }
    }
}
