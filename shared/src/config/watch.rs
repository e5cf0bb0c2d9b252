//! Files watched for changes. File-system events (inotify on Linux) wake the watcher as soon as
//! a writer closes one of the files or renames one into place; a writer still writing sends no
//! event that counts, so a half-written file is never read. Polling their modification time and
//! length every interval stays underneath: it works on every filesystem the process can read,
//! events or not (bind mounts, network filesystems), and a change the poll finds counts once
//! the files have held still for a moment. Config files, overlays, certificates and instance
//! lists are all watched by this.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

/// What is compared between looks: (modified, length) of each file, `None` for a missing one.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// After an event, how long the files must hold still: a second writer right behind the first
/// (an editor writing a backup, then the file) is read once, after both.
const EVENT_SETTLE: Duration = Duration::from_millis(10);

/// A set of files (which may come and go) looked at on every event, and every `every`.
pub struct FileWatch<F> {
    list: F,
    every: Duration,
    settle: Duration,
    seen: Stamp,
    events: Option<Events>,
}

/// File-system events in the folders of the watched files.
struct Events {
    watcher: notify::RecommendedWatcher,
    folders: HashSet<PathBuf>,
    interest: Arc<Mutex<Interest>>,
    rx: mpsc::UnboundedReceiver<()>,
}

/// Which events wake the watch: those about the watched files, not about other files of their
/// folders (a node's state directory also holds its TLS session store, written after
/// handshakes), except in folders where every file counts (overlays, which come and go).
#[derive(Default)]
struct Interest {
    names: HashSet<OsString>,
    folders: HashSet<PathBuf>,
}

impl Interest {
    /// Names starting with `..` count too: Kubernetes updates a mounted Secret or ConfigMap by
    /// renaming its `..data` link, and the files seen through it change with that rename.
    fn concerns(&self, path: &Path) -> bool {
        let named = path.file_name().is_some_and(|n| self.names.contains(n) || n.as_encoded_bytes().starts_with(b".."));
        named || path.parent().is_some_and(|f| self.folders.contains(f))
    }
}

impl Events {
    fn new() -> Option<Self> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        let (tx, rx) = mpsc::unbounded_channel();
        let interest = Arc::new(Mutex::new(Interest::default()));
        let watching = interest.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // A write finished, a file was renamed into place or removed. Not a write in
            // progress, not a creation (its content is still to come).
            let finished = matches!(
                event.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(_))
                    | EventKind::Remove(_)
            );
            if finished {
                let interest = watching.lock().unwrap_or_else(|e| e.into_inner());
                if event.paths.iter().any(|p| interest.concerns(p)) {
                    let _ = tx.send(());
                }
            }
        })
        .map_err(|e| tracing::debug!("no file-system events, polling only: {e}"))
        .ok()?;
        Some(Self { watcher, folders: HashSet::new(), interest, rx })
    }

    /// Watches the folders of `files` not watched yet (files come and go; folders may appear).
    fn follow(&mut self, files: &[PathBuf]) {
        use notify::Watcher;
        let mut interest = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        interest.names.clear();
        interest.names.extend(files.iter().filter_map(|f| f.file_name().map(OsString::from)));
        let folders: Vec<PathBuf> =
            files.iter().map(|f| folder_of(f)).chain(interest.folders.iter().cloned()).collect();
        drop(interest);
        for folder in folders {
            if self.folders.contains(&folder) {
                continue;
            }
            if self.watcher.watch(&folder, notify::RecursiveMode::NonRecursive).is_ok() {
                self.folders.insert(folder);
            }
        }
    }
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    }
}

fn stamp(files: &[PathBuf]) -> Stamp {
    files.iter().map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

impl<F: Fn() -> Vec<PathBuf>> FileWatch<F> {
    /// Watches the files `list` names (asked again at every look), taking their current state
    /// as seen. A change must hold still for `settle` to count.
    pub fn new(list: F, every: Duration, settle: Duration) -> Self {
        let files = list();
        let seen = stamp(&files);
        let mut events = Events::new();
        if let Some(e) = events.as_mut() {
            e.follow(&files);
        }
        Self { list, every, settle, seen, events }
    }

    /// Every file in `folders` counts, not only those `list` names: a file that appears there
    /// is seen at once (by its event), before the list has named it.
    pub fn with_folders(mut self, folders: &[PathBuf]) -> Self {
        if let Some(e) = self.events.as_mut() {
            // Events name files by absolute paths (a relative folder is watched from the
            // working directory), so the folders are kept that way too.
            let absolute = folders.iter().map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()));
            e.interest.lock().unwrap_or_else(|e| e.into_inner()).folders.extend(absolute);
            let files = (self.list)();
            e.follow(&files);
        }
        self
    }

    /// Waits for an event or one interval and says whether the files changed since the last
    /// change seen (and have held still since).
    pub async fn tick(&mut self) -> bool {
        let evented = match self.events.as_mut() {
            Some(e) => tokio::select! {
                got = e.rx.recv() => got.is_some(),
                _ = tokio::time::sleep(self.every) => false,
            },
            None => {
                tokio::time::sleep(self.every).await;
                false
            }
        };
        let files = (self.list)();
        if let Some(e) = self.events.as_mut() {
            e.follow(&files);
        }
        let now = stamp(&files);
        if now == self.seen {
            return false;
        }
        let settle = if evented { EVENT_SETTLE } else { self.settle };
        tokio::time::sleep(settle).await;
        if let Some(e) = self.events.as_mut() {
            // What the settle covered is seen by the stamp below.
            while e.rx.try_recv().is_ok() {}
        }
        if stamp(&(self.list)()) != now {
            // Still being written: looked at again next tick.
            return false;
        }
        self.seen = now;
        true
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) {
        while !self.tick().await {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_counts_once_and_a_new_file_is_a_change() {
        let dir = std::env::temp_dir().join(format!("quicmesh-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.toml");
        let b = dir.join("b.toml");
        std::fs::write(&a, "x").unwrap();
        let files = vec![a.clone(), b.clone()];
        let mut w = FileWatch::new(move || files.clone(), Duration::from_millis(5), Duration::from_millis(5));
        assert!(!w.tick().await, "nothing changed yet");
        std::fs::write(&a, "longer").unwrap();
        assert!(w.tick().await, "a changed");
        assert!(!w.tick().await, "a change counts once");
        std::fs::write(&b, "y").unwrap();
        assert!(w.tick().await, "b appeared");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With a poll that would take an hour, a finished write is still seen at once (by its
    /// event); a write in progress is not, until its writer closes the file.
    #[tokio::test]
    async fn a_finished_write_is_seen_at_once_and_a_write_in_progress_is_not() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.toml");
        std::fs::write(&file, "a = 1\n").unwrap();
        let files = vec![file.clone()];
        let hour = Duration::from_secs(3600);
        let mut w = FileWatch::new(move || files.clone(), hour, hour);
        std::fs::write(&file, "a = 2\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("the write's event was not seen");
        // Half a file, its writer still at work: no change yet.
        let mut writer = std::fs::OpenOptions::new().write(true).truncate(true).open(&file).unwrap();
        writer.write_all(b"[[services]]\n").unwrap();
        writer.flush().unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.changed()).await.is_err(),
            "a half-written file counted as a change"
        );
        writer.write_all(b"name = \"web\"\n").unwrap();
        drop(writer);
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("the closed write was not seen");
        // Renamed into place, as careful writers do.
        let tmp = dir.path().join("mesh.toml.tmp");
        std::fs::write(&tmp, "b = 1\n").unwrap();
        tokio::time::timeout(Duration::from_millis(300), w.changed()).await.expect_err("another file's write counted");
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("the rename was not seen");
    }

    /// `path` (absolute) as a path relative to the working directory.
    fn relative_to_cwd(path: &Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap();
        let common = cwd.components().zip(path.components()).take_while(|(a, b)| a == b).count();
        let ups = cwd.components().count() - common;
        let mut rel: PathBuf = std::iter::repeat_n("..", ups).collect();
        rel.extend(path.components().skip(common));
        rel
    }

    /// Writes to other files of the folder (a node's TLS session store beside its certificate)
    /// do not wake the watch, so it neither looks at the files nor re-reads them for each; in a
    /// folder where every file counts, a new one is seen at once.
    #[tokio::test]
    async fn only_the_watched_files_wake_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("node.pem");
        std::fs::write(&cert, "a").unwrap();
        let files = vec![cert.clone()];
        let hour = Duration::from_secs(3600);
        let mut w = FileWatch::new(move || files.clone(), hour, hour);
        std::fs::write(dir.path().join("node.sessions"), "x").unwrap();
        std::fs::write(dir.path().join("node.tmp"), "y").unwrap();
        std::fs::rename(dir.path().join("node.tmp"), dir.path().join("node.taken")).unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(300), w.tick()).await;
        assert!(woke.is_err(), "another file's write woke the watch: {woke:?}");
        std::fs::write(&cert, "b").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), w.tick()).await;
        assert_eq!(woke.ok(), Some(true), "the watched file's write was not seen at once");

        // Named relative to the working directory, as a config's `overlays = "overlays"`.
        let overlays = dir.path().join("services");
        std::fs::create_dir(&overlays).unwrap();
        let overlays = relative_to_cwd(&overlays);
        let listed = overlays.clone();
        let list = move || {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&listed).unwrap().map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        };
        let mut w = FileWatch::new(list, hour, hour).with_folders(std::slice::from_ref(&overlays));
        std::fs::write(overlays.join("web.toml"), "new").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        assert!(woke.is_ok(), "a new file in a folder where every file counts was not seen at once");
    }
}
