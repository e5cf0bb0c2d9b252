//! Automatic edge certificates over ACME (RFC 8555), with `instant-acme` for the protocol.
//!
//! One certificate per hostname of `gateway.acme`. At start the certificates held in the
//! state directory serve at once; a hostname without one (or with one past two thirds of its
//! lifetime) is ordered. The gateway answers the CA's challenge itself: TLS-ALPN-01 (RFC 8737)
//! on its HTTPS port, where a ClientHello offering `acme-tls/1` gets the challenge certificate
//! and the connection ends after the handshake, or HTTP-01 on a plain-HTTP listener. A new
//! certificate replaces the old in the resolver every port reads at each handshake, so open
//! connections are untouched. A failed order leaves the held certificate serving and is
//! retried with backoff; both show as metrics and log lines.
//!
//! With gateway replicas (`gateway.store`), etcd holds what they share (see
//! [`Store::acme_prefix`]): one replica takes a hostname's lock and orders, publishing its
//! challenge answers so that whichever replica the CA reaches answers them, then the
//! certificate, which every replica installs from its watch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use quicmesh_shared::config::{AcmeChallenge, AcmeConfig, GatewayConfig};
use quicmesh_shared::identity::{self, tls::provider};
use quicmesh_shared::telemetry::metrics as m;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::store::{Change, Store};
use crate::GatewayError;

/// The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where HTTP-01 answers live (RFC 8555 8.3).
const HTTP_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// How long one order may take to be validated, and then issued.
const ORDER_LIMIT: Duration = Duration::from_secs(90);

/// How long a replica may hold the ordering of a hostname: more than an order can take.
const LOCK_TTL: Duration = Duration::from_secs(300);

/// How long a replica waits while another orders before it looks again.
const FOLLOW_WAIT: Duration = Duration::from_secs(2);

/// Time for the other replicas' watches to see challenge answers before the CA is told to
/// check them (a watch event takes milliseconds).
const PUBLISH_SETTLE: Duration = Duration::from_millis(500);

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// A certificate as replicas share it (`certs/<hostname>`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Shared {
    chain: String,
    key: String,
}

/// The store and the lease of the order this replica holds the lock of.
struct Lock<'a> {
    store: &'a Store,
    lease: i64,
}

impl Lock<'_> {
    async fn publish(&self, suffix: &str, value: &[u8]) -> Result<(), Failure> {
        let key = format!("{}{suffix}", self.store.acme_prefix());
        Ok(self.store.etcd.put(&key, value, Some(self.lease)).await?)
    }
}

/// The ACME state of a gateway: certificates issued, challenges being answered, the account.
pub struct Acme {
    config: AcmeConfig,
    /// This gateway's name: whose lock it is, with replicas.
    replica: String,
    hostnames: Vec<String>,
    dir: PathBuf,
    /// Issued certificates by hostname, with their validity (Unix seconds).
    issued: Mutex<HashMap<String, Held>>,
    /// TLS-ALPN-01 challenge certificates by hostname, while an order waits for validation.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// HTTP-01 answers: token -> key authorization.
    http: Mutex<HashMap<String, String>>,
    account: tokio::sync::Mutex<Option<Account>>,
}

#[derive(Clone)]
struct Held {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
}

impl Held {
    /// Two thirds into the certificate's lifetime (as Caddy and certbot renew).
    fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("directory", &self.config.directory).field("hostnames", &self.hostnames).finish()
    }
}

/// The wait after another failed order: twice the last, up to `max`.
fn next_backoff(last: Duration, max: Duration) -> Duration {
    last.saturating_mul(2).min(max)
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Acme {
    /// The ACME state of `gc`, when `gateway.acme` is set: the certificates held in its state
    /// directory (unexpired) loaded to serve at once. Nothing is written until an order.
    pub fn prepare(gc: &GatewayConfig) -> Result<Option<Arc<Self>>, GatewayError> {
        let Some(config) = gc.acme.clone() else { return Ok(None) };
        let dir = match (&config.state_dir, &gc.tls.state_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d.join("acme"),
            (None, None) => return Err(GatewayError::Tls("gateway.acme: no state_dir".into())),
        };
        let acme = Self {
            hostnames: gc.acme_hostnames(),
            replica: gc.name.clone(),
            config,
            dir,
            issued: Mutex::default(),
            alpn: Mutex::default(),
            http: Mutex::default(),
            account: tokio::sync::Mutex::new(None),
        };
        for name in &acme.hostnames {
            match acme.load(name) {
                Ok(Some(held)) if held.not_after > now_unix() => {
                    metrics::gauge!(m::ACME_EXPIRY, "hostname" => name.clone()).set(held.not_after as f64);
                    acme.issued.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), held);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(hostname = %name, error = %e, "ACME certificate in the state directory unreadable; ordering a new one")
                }
            }
        }
        Ok(Some(Arc::new(acme)))
    }

    /// Whether the TLS-ALPN-01 challenge is answered (the HTTPS ports offer `acme-tls/1`).
    pub fn tls_alpn(&self) -> bool {
        self.config.challenge == AcmeChallenge::TlsAlpn01
    }

    /// The issued certificate for `hostname`, if any.
    pub fn certificate(&self, hostname: &str) -> Option<Arc<CertifiedKey>> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).get(hostname).map(|h| h.key.clone())
    }

    /// The TLS-ALPN-01 challenge certificate for `hostname`, while its order waits.
    pub fn challenge_certificate(&self, hostname: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.lock().unwrap_or_else(|p| p.into_inner()).get(hostname).cloned()
    }

    /// The HTTP-01 answer for a request path, while its order waits.
    pub fn http_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP_CHALLENGE_PREFIX)?;
        self.http.lock().unwrap_or_else(|p| p.into_inner()).get(token).cloned()
    }

    /// Keeps every hostname certified, for as long as the gateway runs; with `store`, shared
    /// with the other replicas.
    pub async fn run(self: Arc<Self>, store: Option<Arc<Store>>) {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(store) = &store {
            tasks.spawn(self.clone().follow(store.clone()));
        }
        for name in self.hostnames.clone() {
            tasks.spawn(self.clone().keep(name, store.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// How long until `name` is due an order (zero: now, or none is held).
    fn until_due(&self, name: &str) -> Duration {
        let due = self.issued.lock().unwrap_or_else(|p| p.into_inner()).get(name).map(Held::renew_at);
        due.map_or(Duration::ZERO, |due| Duration::from_secs(due.saturating_sub(now_unix()).max(0) as u64))
    }

    /// Orders `name` when it is due, again and again; a failure waits out the backoff.
    async fn keep(self: Arc<Self>, name: String, store: Option<Arc<Store>>) {
        let mut backoff = self.config.retry_initial;
        loop {
            if let Some(store) = &store {
                self.adopt_stored(store, &name).await;
            }
            let wait = self.until_due(&name);
            if !wait.is_zero() {
                info!(hostname = %name, renew_in = ?wait, "ACME certificate held");
                tokio::time::sleep(wait).await;
                continue;
            }
            let lease = match &store {
                None => None,
                Some(store) => match store.acme_lock(&name, &self.replica, LOCK_TTL).await {
                    Ok(Some(lease)) => Some(lease),
                    Ok(None) => {
                        tracing::debug!(hostname = %name, "another replica orders this certificate");
                        tokio::time::sleep(FOLLOW_WAIT).await;
                        continue;
                    }
                    Err(e) => {
                        self.failed(&name, &format!("the store: {e}"), backoff).await;
                        backoff = next_backoff(backoff, self.config.retry_max);
                        continue;
                    }
                },
            };
            let lock = store.as_deref().zip(lease).map(|(store, lease)| Lock { store, lease });
            let started = Instant::now();
            let result = self.order(&name, lock.as_ref()).await;
            match result {
                Ok(held) => {
                    backoff = self.config.retry_initial;
                    metrics::counter!(m::ACME_ISSUED, "hostname" => name.clone()).increment(1);
                    metrics::gauge!(m::ACME_EXPIRY, "hostname" => name.clone()).set(held.not_after as f64);
                    info!(
                        hostname = %name,
                        took_ms = started.elapsed().as_millis() as u64,
                        valid_for_s = held.not_after - now_unix(),
                        "ACME certificate issued and serving"
                    );
                    self.issued.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), held);
                }
                Err(e) => {
                    self.failed(&name, &e.to_string(), backoff).await;
                    backoff = next_backoff(backoff, self.config.retry_max);
                }
            }
            if let Some(lock) = lock {
                // Ends the lock and withdraws the answers published under it.
                let _ = lock.store.etcd.revoke(lock.lease).await;
            }
        }
    }

    async fn failed(&self, name: &str, error: &str, backoff: Duration) {
        metrics::counter!(m::ACME_FAILURES, "hostname" => name.to_owned()).increment(1);
        let serving = self.certificate(name).is_some();
        warn!(hostname = %name, error, retry_in = ?backoff, serving_previous = serving, "ACME order failed");
        tokio::time::sleep(backoff).await;
    }

    /// Takes the certificate the replicas share for `name`, when it is newer than the one held.
    async fn adopt_stored(&self, store: &Store, name: &str) {
        let key = format!("{}certs/{name}", store.acme_prefix());
        match store.etcd.get(&key).await {
            Ok(Some((value, _))) => self.adopt(name, &value),
            Ok(None) => {}
            Err(e) => tracing::debug!(hostname = %name, error = %e, "ACME: the store is out of reach"),
        }
    }

    /// Installs a shared certificate for `name` (and keeps it in the state directory) when it
    /// outlives the one held.
    fn adopt(&self, name: &str, value: &[u8]) {
        let shared = serde_json::from_slice::<Shared>(value).map_err(Failure::from).and_then(|s| {
            let key = match rustls_pemfile::private_key(&mut s.key.as_bytes())? {
                Some(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
                _ => return Err("no PKCS#8 key".into()),
            };
            Ok((held(&s.chain, key)?, s))
        });
        let (held, shared) = match shared {
            Ok(h) => h,
            Err(e) => {
                warn!(hostname = %name, error = %e, "ACME: an unreadable certificate in the store; ignored");
                return;
            }
        };
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.get(name).is_some_and(|h| h.not_after >= held.not_after) {
            return;
        }
        if let Err(e) = self.store(name, &shared.chain, &shared.key) {
            warn!(hostname = %name, error = %e, "ACME: keeping the shared certificate on disk failed");
        }
        metrics::gauge!(m::ACME_EXPIRY, "hostname" => name.to_owned()).set(held.not_after as f64);
        info!(hostname = %name, valid_for_s = held.not_after - now_unix(), "ACME certificate from another replica serving");
        issued.insert(name.to_owned(), held);
    }

    /// Follows what the replicas share: certificates, and the challenge answers of the order
    /// another replica runs (the CA may ask this one).
    async fn follow(self: Arc<Self>, store: Arc<Store>) {
        let prefix = store.acme_prefix();
        loop {
            match store.etcd.range(&prefix).await {
                Ok((revision, items)) => {
                    for (key, value) in items {
                        self.shared_change(&prefix, &key, Some(&value));
                    }
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                    let watch = store.etcd.watch(&prefix, revision.saturating_add(1), &tx);
                    tokio::pin!(watch);
                    loop {
                        tokio::select! {
                            ended = &mut watch => {
                                if let Err(e) = ended {
                                    tracing::debug!(error = %e, "ACME: the store's watch ended");
                                }
                                break;
                            }
                            Some(batch) = rx.recv() => {
                                for change in batch {
                                    match change {
                                        Change::Put(key, value) => self.shared_change(&prefix, &key, Some(&value)),
                                        Change::Delete(key) => self.shared_change(&prefix, &key, None),
                                    }
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "ACME: the store is out of reach"),
            }
            tokio::time::sleep(FOLLOW_WAIT).await;
        }
    }

    fn shared_change(&self, prefix: &str, key: &str, value: Option<&[u8]>) {
        let Some(rest) = key.strip_prefix(prefix) else { return };
        if let Some(name) = rest.strip_prefix("certs/") {
            if let (Some(value), true) = (value, self.hostnames.iter().any(|h| h == name)) {
                self.adopt(name, value);
            }
        } else if let Some(name) = rest.strip_prefix("alpn/") {
            let mut alpn = self.alpn.lock().unwrap_or_else(|p| p.into_inner());
            match value.and_then(unhex) {
                Some(digest) => match challenge_certificate(name, &digest) {
                    Ok(cert) => {
                        alpn.insert(name.to_owned(), cert);
                    }
                    Err(e) => warn!(hostname = %name, error = %e, "ACME: challenge certificate not made"),
                },
                None => {
                    alpn.remove(name);
                }
            }
        } else if let Some(token) = rest.strip_prefix("http/") {
            let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
            match value.map(|v| String::from_utf8_lossy(v).into_owned()) {
                Some(answer) => {
                    http.insert(token.to_owned(), answer);
                }
                None => {
                    http.remove(token);
                }
            }
        }
    }

    /// One order for `name`, answered, finalized, stored and returned.
    async fn order(&self, name: &str, lock: Option<&Lock<'_>>) -> Result<Held, Failure> {
        let account = self.account().await?;
        let result = tokio::time::timeout(ORDER_LIMIT * 2, self.order_with(&account, name, lock)).await;
        let result = result.unwrap_or_else(|_| Err("the CA took too long".into()));
        if let Err(e) = &result {
            // The CA forgot the account (a test CA restarted, an account deactivated): the
            // next try makes a new one.
            let gone = e.downcast_ref::<StepError>().is_some_and(|e| {
                matches!(&e.error, instant_acme::Error::Api(p)
                    if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
            });
            if gone {
                *self.account.lock().await = None;
                let _ = std::fs::remove_file(self.account_file());
            }
        }
        result
    }

    async fn order_with(&self, account: &Account, name: &str, lock: Option<&Lock<'_>>) -> Result<Held, Failure> {
        let ids = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(|e| step("new order", e))?;
        let mut answers = Answers { acme: self, name: name.to_owned(), tokens: Vec::new() };
        let kind = match self.config.challenge {
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| step("authorization", e))?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => return Err(format!("authorization is {other:?}").into()),
            }
            let mut challenge =
                authz.challenge(kind.clone()).ok_or_else(|| format!("the CA offers no {kind:?} challenge"))?;
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeType::TlsAlpn01 => {
                    let digest = key_auth.digest();
                    answers.alpn(challenge_certificate(name, digest.as_ref())?);
                    if let Some(lock) = lock {
                        lock.publish(&format!("alpn/{name}"), hex(digest.as_ref()).as_bytes()).await?;
                    }
                }
                _ => {
                    answers.http(challenge.token.clone(), key_auth.as_str().to_owned());
                    if let Some(lock) = lock {
                        lock.publish(&format!("http/{}", challenge.token), key_auth.as_str().as_bytes()).await?;
                    }
                }
            }
            if lock.is_some() {
                tokio::time::sleep(PUBLISH_SETTLE).await;
            }
            challenge.set_ready().await.map_err(|e| step("challenge ready", e))?;
        }
        let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(ORDER_LIMIT);
        let status = order.poll_ready(&retry).await.map_err(|e| step("validation", e))?;
        drop(answers);
        if status != OrderStatus::Ready {
            return Err(format!("the CA could not validate {name} by {kind:?} (order {status:?})").into());
        }
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await.map_err(|e| step("finalize", e))?;
        let chain_pem = order.poll_certificate(&retry).await.map_err(|e| step("certificate", e))?;
        let held = held(&chain_pem, key.serialize_der())?;
        let key_pem = key.serialize_pem();
        self.store(name, &chain_pem, &key_pem)?;
        if let Some(lock) = lock {
            // Kept, not leased: every replica serves it, now and after restarts.
            let shared = serde_json::to_vec(&Shared { chain: chain_pem, key: key_pem })?;
            let key = format!("{}certs/{name}", lock.store.acme_prefix());
            if let Err(e) = lock.store.etcd.put(&key, &shared, None).await {
                warn!(hostname = %name, error = %e, "ACME: the certificate could not be shared; the other replicas will order their own");
            }
        }
        Ok(held)
    }

    /// The account: held, or restored from the state directory, or made and saved there.
    async fn account(&self) -> Result<Account, Failure> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let builder = || match &self.config.ca {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let file = self.account_file();
        let account = match std::fs::read(&file) {
            Ok(bytes) => {
                let creds: AccountCredentials = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: not an ACME account ({e})", file.display()))?;
                builder()?.from_credentials(creds).await?
            }
            Err(_) => {
                let contact: Vec<String> = self
                    .config
                    .contact
                    .iter()
                    .map(|c| if c.contains(':') { c.clone() } else { format!("mailto:{c}") })
                    .collect();
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (account, creds) = builder()?.create(&new, self.config.directory.clone(), None).await?;
                write_private(&file, serde_json::to_string(&creds)?.as_bytes())?;
                info!(directory = %self.config.directory, account = account.id(), "ACME account created");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// One account file per directory URL: a changed directory makes a new account.
    fn account_file(&self) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.config.directory.as_bytes());
        let short = hex(&digest.as_ref()[..6]);
        self.dir.join(format!("account-{short}.json"))
    }

    fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")))
    }

    fn load(&self, name: &str) -> Result<Option<Held>, Failure> {
        let (crt, key) = self.files(name);
        let (Ok(chain), Ok(key_pem)) = (std::fs::read_to_string(&crt), std::fs::read(&key)) else {
            return Ok(None);
        };
        let key = match rustls_pemfile::private_key(&mut key_pem.as_slice())? {
            Some(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(format!("{}: no PKCS#8 key", key.display()).into()),
        };
        held(&chain, key).map(Some)
    }

    fn store(&self, name: &str, chain_pem: &str, key_pem: &str) -> Result<(), Failure> {
        let (crt, key) = self.files(name);
        write_private(&key, key_pem.as_bytes())?;
        write_private(&crt, chain_pem.as_bytes())?;
        Ok(())
    }
}

/// An ACME error with the step of the order it broke, kept whole (its problem type decides
/// whether the account is forgotten).
#[derive(Debug)]
struct StepError {
    step: &'static str,
    error: instant_acme::Error,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.error)
    }
}

impl std::error::Error for StepError {}

fn step(step: &'static str, error: instant_acme::Error) -> Failure {
    Box::new(StepError { step, error })
}

/// A certificate chain (PEM) and its PKCS#8 key as a serving key and its validity.
fn held(chain_pem: &str, key_pkcs8: Vec<u8>) -> Result<Held, Failure> {
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let leaf = chain.first().ok_or("the CA sent no certificate")?;
    let (not_before, not_after) = identity::validity(leaf).ok_or("the CA's certificate does not parse")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
    let key = Arc::new(CertifiedKey::from_der(chain, key, &provider())?);
    Ok(Held { key, not_before, not_after })
}

/// The TLS-ALPN-01 answer for `name`: a self-signed certificate for it carrying the SHA-256
/// of the key authorization in the critical acmeIdentifier extension (RFC 8737 3).
fn challenge_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, Failure> {
    // rcgen asserts the length; a digest read from the store (another replica's, or whatever
    // is there) may have any.
    if digest.len() != 32 {
        return Err(format!("a key authorization digest of {} bytes, not 32", digest.len()).into());
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `from_der`: its check that key and certificate match parses the certificate with
    // webpki, which refuses the critical acmeIdentifier extension (the CA expects it).
    let signer = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
}

/// The challenge answers of one order, withdrawn when it is done with them.
struct Answers<'a> {
    acme: &'a Acme,
    name: String,
    tokens: Vec<String>,
}

impl Answers<'_> {
    fn alpn(&mut self, cert: Arc<CertifiedKey>) {
        self.acme.alpn.lock().unwrap_or_else(|p| p.into_inner()).insert(self.name.clone(), cert);
    }

    fn http(&mut self, token: String, key_authorization: String) {
        self.acme.http.lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone(), key_authorization);
        self.tokens.push(token);
    }
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        self.acme.alpn.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
        let mut http = self.acme.http.lock().unwrap_or_else(|p| p.into_inner());
        for t in &self.tokens {
            http.remove(t);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Writes `bytes` to `path` readable by the owner only, replacing it whole (a reader never
/// sees half a file).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(not_before: i64, not_after: i64) -> Held {
        let (cert, key) = identity::self_signed(&["a.test".to_string()]).unwrap();
        let key = CertifiedKey::from_der(vec![cert], key, &provider()).unwrap();
        Held { key: Arc::new(key), not_before, not_after }
    }

    #[test]
    fn a_challenge_digest_of_the_wrong_length_is_an_error_not_a_panic() {
        // What another replica (or anything with access to the store) may have written.
        for digest in [&[][..], &[7u8; 31], &[7u8; 33]] {
            assert!(challenge_certificate("a.test", digest).is_err(), "{} bytes", digest.len());
        }
        assert!(challenge_certificate("a.test", &[7u8; 32]).is_ok());
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        // A 90-day certificate is renewed on day 60; a 30 s one after 20 s.
        let day = 86_400;
        assert_eq!(held(1_000, 1_000 + 90 * day).renew_at(), 1_000 + 60 * day);
        assert_eq!(held(0, 30).renew_at(), 20);
        let now = now_unix();
        let fresh = held(now, now + 3 * 3600);
        let wait = fresh.renew_at() - now;
        assert!((2 * 3600 - 1..=2 * 3600).contains(&wait), "{wait}");
    }

    #[test]
    fn failed_orders_back_off_by_doubling_up_to_the_limit() {
        let (mut b, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(b.as_secs());
            b = next_backoff(b, max);
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(next_backoff(Duration::MAX, max), max, "no overflow");
    }
}
