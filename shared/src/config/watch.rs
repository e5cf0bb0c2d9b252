//! Files watched for changes, by polling their modification time and length: it works on every
//! filesystem the process can read (bind mounts, network filesystems, Kubernetes ConfigMaps
//! swapped by symlink), and a stat per file per interval costs nothing next to a proxy's work.
//! A change counts once the files have held still for a moment, so a half-written file is
//! never read. Config files, overlays, certificates and instance lists are all watched by this.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What is compared between looks: (modified, length) of each file, `None` for a missing one.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// A set of files (which may come and go) looked at every `every`.
pub struct FileWatch<F> {
    list: F,
    every: Duration,
    settle: Duration,
    seen: Stamp,
}

fn stamp(files: &[PathBuf]) -> Stamp {
    files.iter().map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

impl<F: Fn() -> Vec<PathBuf>> FileWatch<F> {
    /// Watches the files `list` names (asked again at every look), taking their current state
    /// as seen. A change must hold still for `settle` to count.
    pub fn new(list: F, every: Duration, settle: Duration) -> Self {
        let seen = stamp(&list());
        Self { list, every, settle, seen }
    }

    /// Waits one interval and says whether the files changed since the last change seen (and
    /// have held still since).
    pub async fn tick(&mut self) -> bool {
        tokio::time::sleep(self.every).await;
        let now = stamp(&(self.list)());
        if now == self.seen {
            return false;
        }
        tokio::time::sleep(self.settle).await;
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
}
