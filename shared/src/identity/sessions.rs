//! The TLS sessions a node's mesh listener issued, kept in its state directory so that they
//! outlive the process: a peer that held a session before this node restarted resumes it and
//! sends its first requests in 0-RTT instead of waiting for a full handshake.
//!
//! rustls keeps TLS 1.3 sessions server-side ("stateful" resumption: the ticket is only a key
//! into this store), which is also what 0-RTT needs: a session used for early data is taken out
//! of the store, so a replayed first flight finds nothing to resume. The file holds resumption
//! secrets, so it is written like the node's key (owner only), and a session is forgotten after
//! [`MAX_AGE`], when the trust roots change, or past [`MAX_SESSIONS`] (the oldest first).
//!
//! Writes happen on a thread of their own, which folds a burst of changes into one write: a
//! handshake never waits for the whole file. The one exception is a session taken for 0-RTT:
//! its key is appended to `<name>.taken` before the handshake goes on, so that a crash of the
//! process before the next write cannot bring it back for a replayed first flight. Past
//! [`TAKEN_LOG_MAX`] the writer moves that log aside (`<name>.taken.old`) and starts a new one
//! before it takes its snapshot, and removes the old one once the snapshot, which lacks every
//! key the old log holds, is written; a restart reads both.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::server::StoresServerSessions;

/// Sessions kept at most; past this the oldest goes.
pub const MAX_SESSIONS: usize = 4096;
/// A session older than this is not resumed (seconds): the lifetime rustls gives the tickets
/// of sessions kept server-side, so a peer never spends one this store already forgot. A
/// revoked member is refused by name whatever its session, and an expired certificate in a
/// session is refused too (`node::inbound`).
pub const MAX_AGE: u64 = 24 * 3600;
/// The largest session value accepted (rustls' are a few hundred bytes, plus the client's
/// certificate chain).
const MAX_VALUE: usize = 16 << 10;
const MAGIC: &[u8; 8] = b"QMSESS1\n";
/// The taken-keys log's size past which the writer folds it into the store's file (about
/// 2 000 resumptions).
const TAKEN_LOG_MAX: usize = 64 << 10;

/// A server session store for the mesh listener, persisted to one file.
pub struct SessionStore {
    shared: Arc<Mutex<Inner>>,
    /// Keys of sessions taken (used for 0-RTT), appended as they go; the log is kept open (a
    /// handshake pays one write, not an open and a close).
    taken: Option<PathBuf>,
    taken_log: Arc<Mutex<Option<std::fs::File>>>,
    /// Wakes the writer; a full channel means a write is pending already.
    wake: Option<SyncSender<()>>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<Vec<u8>, (u64, Vec<u8>)>,
    order: VecDeque<Vec<u8>>,
    /// SHA-256 of the trust roots the sessions were made under.
    roots: [u8; 32],
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore").field("sessions", &self.lock().sessions.len()).finish()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The digest that ties stored sessions to one set of trust roots.
pub fn roots_digest(roots: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for r in roots {
        ctx.update(&(r.len() as u32).to_be_bytes());
        ctx.update(r);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl SessionStore {
    /// The store kept at `path` (loaded when it holds sessions made under these `roots`, and
    /// written from now on), or only in memory without a path.
    pub fn open(path: Option<PathBuf>, roots: &[CertificateDer<'_>]) -> Arc<Self> {
        let digest = roots_digest(roots);
        let mut inner = Inner { roots: digest, ..Inner::default() };
        let taken_path = path.as_ref().map(|p| p.with_extension("taken"));
        let old_path = path.as_ref().map(|p| p.with_extension("taken.old"));
        let mut used = taken_path.as_deref().map(read_taken).unwrap_or_default();
        used.extend(old_path.as_deref().map(read_taken).unwrap_or_default());
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => match decode(&bytes, &digest, now()) {
                    Some(kept) => {
                        for (key, at, value) in kept.into_iter().filter(|(k, _, _)| !used.contains(k)) {
                            inner.insert(key, at, value);
                        }
                        tracing::debug!(path = %p.display(), sessions = inner.sessions.len(), "TLS sessions restored");
                    }
                    None => {
                        tracing::debug!(path = %p.display(), "TLS sessions of other trust roots, or unreadable: not used")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot read the stored TLS sessions"),
            }
        }
        // The taken keys are folded into the file now, and their log starts afresh.
        if let (Some(p), Some(t), Some(o)) = (&path, &taken_path, &old_path) {
            if !used.is_empty() && write_private(p, &encode(&inner)).is_ok() {
                let _ = std::fs::remove_file(t);
                let _ = std::fs::remove_file(o);
            }
        }
        let shared = Arc::new(Mutex::new(inner));
        // Opened now, so that the first 0-RTT handshake does not wait for it.
        let log = taken_path.as_deref().and_then(|t| private(t, true).ok());
        let taken_log = Arc::new(Mutex::new(log));
        let wake = path.map(|p| writer(p, shared.clone(), taken_log.clone()));
        Arc::new(Self { shared, taken: taken_path, taken_log, wake })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Trust roots changed (a CA rotation): sessions made under the old ones are forgotten.
    pub fn set_roots(&self, roots: &[CertificateDer<'_>]) {
        let digest = roots_digest(roots);
        let mut inner = self.lock();
        if inner.roots != digest {
            *inner = Inner { roots: digest, ..Inner::default() };
            drop(inner);
            self.changed();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn changed(&self) {
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

impl Inner {
    fn insert(&mut self, key: Vec<u8>, at: u64, value: Vec<u8>) {
        if self.sessions.insert(key.clone(), (at, value)).is_none() {
            self.order.push_back(key);
        }
        while self.sessions.len() > MAX_SESSIONS {
            match self.order.pop_front() {
                Some(old) => {
                    self.sessions.remove(&old);
                }
                None => break,
            }
        }
        // Keys taken out leave stale entries in `order`; drop them once they dominate.
        if self.order.len() > 2 * MAX_SESSIONS {
            let live = &self.sessions;
            self.order.retain(|k| live.contains_key(k));
        }
    }

    fn fresh(&self, key: &[u8], now: u64) -> Option<&Vec<u8>> {
        self.sessions.get(key).filter(|(at, _)| now.abs_diff(*at) < MAX_AGE).map(|(_, v)| v)
    }
}

impl StoresServerSessions for SessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        if value.len() > MAX_VALUE || key.len() > 255 {
            return false;
        }
        self.lock().insert(key, now(), value);
        self.changed();
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().fresh(key, now()).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let fresh = inner.fresh(key, now()).is_some();
        let removed = inner.sessions.remove(key);
        drop(inner);
        // Keys that were never here (any client may name one) cost no write.
        let (_, value) = removed?;
        if let Some(taken) = &self.taken {
            let mut log = self.taken_log.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = append_taken(&mut log, taken, key) {
                tracing::warn!(path = %taken.display(), error = %e, "cannot record a used TLS session; not resumed");
                return None;
            }
        }
        self.changed();
        fresh.then_some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The writer thread: each wake writes the whole store once (wakes during a write fold into
/// the next one). It ends with the store, after its last write.
fn writer(path: PathBuf, shared: Arc<Mutex<Inner>>, taken_log: Arc<Mutex<Option<std::fs::File>>>) -> SyncSender<()> {
    let (tx, rx) = sync_channel::<()>(1);
    let (taken, old) = (path.with_extension("taken"), path.with_extension("taken.old"));
    // A wake still queued when the store goes is written before the thread ends.
    let spawned = std::thread::Builder::new().name("tls-sessions".into()).spawn(move || {
        while rx.recv().is_ok() {
            // Before the snapshot: every key in the log moved aside was taken out of the store
            // before it was appended, so the snapshot lacks it, and a key taken from now on goes
            // to the new log.
            let rotated = rotate_taken(&taken_log, &taken, &old);
            let bytes = {
                let inner = shared.lock().unwrap_or_else(|p| p.into_inner());
                encode(&inner)
            };
            match write_private(&path, &bytes) {
                Ok(()) if rotated || old.exists() => {
                    let _ = std::fs::remove_file(&old);
                }
                Ok(()) => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot store TLS sessions"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to store TLS sessions: they are kept in memory only");
    }
    tx
}

fn encode(inner: &Inner) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + inner.sessions.len() * 512);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&inner.roots);
    for key in &inner.order {
        if let Some((at, value)) = inner.sessions.get(key) {
            out.extend_from_slice(&at.to_be_bytes());
            out.push(key.len() as u8);
            out.extend_from_slice(key);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    out
}

/// One stored session: key, when it was stored (Unix seconds), value.
type Stored = (Vec<u8>, u64, Vec<u8>);

/// The unexpired sessions of a file made under `roots`, oldest first; `None` for a file of
/// other roots or one that is not ours. A torn tail loses only what it tore.
fn decode(bytes: &[u8], roots: &[u8; 32], now: u64) -> Option<Vec<Stored>> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (digest, mut rest) = (rest.get(..32)?, rest.get(32..)?);
    if digest != roots {
        return None;
    }
    let mut out = Vec::new();
    while let Some((at, r)) = rest.split_first_chunk::<8>() {
        let Some((&klen, r)) = r.split_first() else { break };
        let Some((key, r)) = r.split_at_checked(usize::from(klen)) else { break };
        let Some((vlen, r)) = r.split_first_chunk::<4>() else { break };
        let vlen = u32::from_be_bytes(*vlen) as usize;
        if vlen > MAX_VALUE {
            break;
        }
        let Some((value, r)) = r.split_at_checked(vlen) else { break };
        let at = u64::from_be_bytes(*at);
        if now.abs_diff(at) < MAX_AGE {
            out.push((key.to_vec(), at, value.to_vec()));
        }
        rest = r;
    }
    Some(out)
}

/// Writes `bytes` to `path` readable by the owner only, replacing it whole (a crash of the
/// process leaves the old file or the new one; no fsync: losing sessions to a host crash only
/// costs a full handshake).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = private(&tmp, false)?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Opens `path` for writing, created owner-only (and kept so when it exists).
fn private(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let f =
        std::fs::OpenOptions::new().write(true).create(true).append(append).truncate(!append).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Moves the taken-keys log at `taken` aside to `old` once it is past [`TAKEN_LOG_MAX`], and
/// opens a new one in its place for the handshakes that follow; not while an `old` one is still
/// there (its keys are in no written snapshot yet). True when it moved it.
fn rotate_taken(log: &Mutex<Option<std::fs::File>>, taken: &Path, old: &Path) -> bool {
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    let big = log.as_ref().and_then(|f| f.metadata().ok()).is_some_and(|m| m.len() > TAKEN_LOG_MAX as u64);
    if !big || old.exists() || std::fs::rename(taken, old).is_err() {
        return false;
    }
    // One that cannot be opened now is tried again by the next append.
    *log = private(taken, true).ok();
    true
}

/// Records `key` as used before the session it names is resumed: one append to `log` (opened
/// at `path` if it is not yet), in the kernel's hands once written, so it outlives a crash of
/// the process (not of the host: an fsync here cost milliseconds on every 0-RTT handshake, more
/// than the round trip it saves). A failed write closes the log, to be opened again next time.
fn append_taken(log: &mut Option<std::fs::File>, path: &Path, key: &[u8]) -> std::io::Result<()> {
    let mut rec = Vec::with_capacity(key.len() + 1);
    rec.push(key.len() as u8);
    rec.extend_from_slice(key);
    // A log removed or replaced under us (another process folded it) is opened again: a key
    // written to a file no longer on disk would not outlive a crash.
    use std::os::unix::fs::MetadataExt as _;
    if log.as_ref().is_some_and(|f| f.metadata().map_or(true, |m| m.nlink() == 0)) {
        *log = None;
    }
    let f = match log {
        Some(f) => f,
        None => log.insert(private(path, true)?),
    };
    let written = f.write_all(&rec);
    if written.is_err() {
        *log = None;
    }
    written
}

/// The keys recorded in a taken-sessions log (a torn last record is dropped).
fn read_taken(path: &Path) -> std::collections::HashSet<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut out = std::collections::HashSet::new();
    let mut rest = bytes.as_slice();
    while let Some((&len, r)) = rest.split_first() {
        let Some((key, r)) = r.split_at_checked(usize::from(len)) else { break };
        out.insert(key.to_vec());
        rest = r;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(n: u8) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(vec![n; 10])]
    }

    /// The log is kept open; one removed underneath (another process folded it) is opened
    /// again, so a key taken after that is on disk, not in an unlinked file.
    #[test]
    fn a_taken_log_removed_underneath_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let taken = path.with_extension("taken");
        let store = SessionStore::open(Some(path.clone()), &roots(1));
        assert!(store.put(b"k1".to_vec(), b"v1".to_vec()));
        assert!(store.put(b"k2".to_vec(), b"v2".to_vec()));
        assert!(store.take(b"k1").is_some());
        std::fs::remove_file(&taken).unwrap();
        assert!(store.take(b"k2").is_some());
        assert!(read_taken(&taken).contains(b"k2".as_slice()), "k2 went to a removed file");
    }

    /// The log of taken keys is folded into the store's file as it grows, not only at a
    /// restart: every 0-RTT resumption appended a record to it for the life of the process.
    /// What was taken stays taken across a restart, whichever file its record was in.
    #[test]
    fn the_taken_log_stays_small_and_what_it_held_stays_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let taken = path.with_extension("taken");
        let store = SessionStore::open(Some(path.clone()), &roots(1));
        let key = |i: usize| format!("{i:032}").into_bytes();
        let records = 3 * TAKEN_LOG_MAX / 33;
        for i in 0..records {
            assert!(store.put(key(i), vec![1; 8]));
            assert!(store.take(&key(i)).is_some());
        }
        assert!(store.put(b"kept".to_vec(), b"v".to_vec()));
        let digest = roots_digest(&roots(1));
        let written = || {
            let on_disk = std::fs::read(&path).ok().and_then(|b| decode(&b, &digest, now())).unwrap_or_default();
            on_disk.iter().any(|(k, _, _)| k == b"kept")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&taken).map_or(0, |m| m.len()) > TAKEN_LOG_MAX as u64 || !written() {
            assert!(std::time::Instant::now() < deadline, "the taken log kept every record");
            std::thread::yield_now();
        }
        // A crash now: the store is not dropped (its writer would write once more).
        std::mem::forget(store);
        let again = SessionStore::open(Some(path.clone()), &roots(1));
        assert_eq!(again.get(b"kept"), Some(b"v".to_vec()));
        for i in 0..records {
            assert_eq!(again.get(&key(i)), None, "session {i} was taken and came back");
        }
    }

    /// A crash between the log's rotation and the store's next write leaves the rotated log:
    /// its keys are not resumed after the restart.
    #[test]
    fn a_rotated_log_left_by_a_crash_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let mut inner = Inner { roots: roots_digest(&roots(1)), ..Inner::default() };
        inner.insert(b"k1".to_vec(), now(), b"v1".to_vec());
        inner.insert(b"k2".to_vec(), now(), b"v2".to_vec());
        write_private(&path, &encode(&inner)).unwrap();
        let mut log = None;
        append_taken(&mut log, &path.with_extension("taken.old"), b"k1").unwrap();
        let store = SessionStore::open(Some(path.clone()), &roots(1));
        assert_eq!(store.get(b"k1"), None);
        assert_eq!(store.get(b"k2"), Some(b"v2".to_vec()));
        assert!(!path.with_extension("taken.old").exists(), "folded into the store at the start");
    }

    #[test]
    fn sessions_survive_a_restart_and_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let store = SessionStore::open(Some(path.clone()), &roots(1));
        assert!(store.put(b"k1".to_vec(), b"v1".to_vec()));
        assert!(store.put(b"k2".to_vec(), b"v2".to_vec()));
        assert_eq!(store.take(b"k2"), Some(b"v2".to_vec()));
        assert_eq!(store.take(b"k2"), None, "a session is taken once");
        // Recorded before the take returned: a crash now cannot bring it back.
        assert!(read_taken(&path.with_extension("taken")).contains(b"k2".as_slice()));
        assert_eq!(store.take(b"never-issued"), None);
        drop(store);
        // The writer's last write (what a restarted process reads) leaves k1 alone in the file.
        let digest = roots_digest(&roots(1));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let on_disk = std::fs::read(&path).ok().and_then(|b| decode(&b, &digest, now()));
            if on_disk.is_some_and(|v| v.len() == 1) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the store was never written");
            std::thread::yield_now();
        }
        let again = SessionStore::open(Some(path.clone()), &roots(1));
        assert_eq!(again.get(b"k1"), Some(b"v1".to_vec()));
        assert_eq!(again.get(b"k2"), None);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        // Other trust roots: nothing is resumed.
        assert!(SessionStore::open(Some(path.clone()), &roots(2)).is_empty());
        again.set_roots(&roots(3));
        assert!(again.is_empty());
    }

    #[test]
    fn old_sessions_and_broken_files_are_not_resumed() {
        let digest = roots_digest(&roots(1));
        let mut inner = Inner { roots: digest, ..Inner::default() };
        inner.insert(b"old".to_vec(), 1_000, b"x".to_vec());
        inner.insert(b"new".to_vec(), 1_000 + MAX_AGE, b"y".to_vec());
        let bytes = encode(&inner);
        let kept = decode(&bytes, &digest, 1_000 + MAX_AGE + 1).unwrap();
        assert_eq!(kept.iter().map(|(k, _, _)| k.as_slice()).collect::<Vec<_>>(), [b"new".as_slice()]);
        // Every torn length decodes without panicking and loses only the torn entry.
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut], &digest, 1_000);
        }
        assert!(decode(b"not ours", &digest, 0).is_none());
        assert_eq!(inner.fresh(b"old", 1_000 + MAX_AGE), None);
    }

    #[test]
    fn the_store_is_bounded() {
        let store = SessionStore::open(None, &roots(1));
        for i in 0..(MAX_SESSIONS + 10) {
            store.put(i.to_be_bytes().to_vec(), vec![1]);
        }
        assert_eq!(store.len(), MAX_SESSIONS);
        assert_eq!(store.get(&0usize.to_be_bytes()), None, "the oldest went first");
        assert!(!store.put(b"big".to_vec(), vec![0; MAX_VALUE + 1]));
    }
}
