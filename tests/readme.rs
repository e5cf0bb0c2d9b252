//! The README is a test subject: its quick start and its by-hand section are run verbatim,
//! taken from README.md (blocks marked `<!-- readme-test: NAME -->`), against the binary this
//! test run built. A README that drifts from the code fails here.
//!
//! The blocks use the README's own ports (8443, 8451-8453, 9901, 9911-9913, 12379-12380,
//! 15000-15108, 18080-18081), below the range the kernel hands out for port 0, so they cannot
//! meet the other tests' listeners; the blocks run one after the other in one test. `cargo` lines are what built the binary: a `cargo` on
//! the test's PATH maps `cargo run --release -- ARGS` to the binary and `cargo install --path .`
//! to nothing.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// The shell block after the `<!-- readme-test: NAME -->` marker.
fn block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- readme-test: {name} -->");
    let after = readme.split_once(&marker).unwrap_or_else(|| panic!("README.md has no {marker}")).1;
    let body = after.trim_start().strip_prefix("```sh\n").expect("a ```sh block follows the marker");
    body.split_once("\n```").expect("the block ends").0.to_string() + "\n"
}

/// The first line of the README that starts with `prefix` (inside any block).
fn line(readme: &str, prefix: &str) -> String {
    readme.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("README.md has no line {prefix:?}")).into()
}

/// A directory for PATH: `quicmesh` (this run's binary) and the `cargo` stand-in.
fn tools(dir: &Path) -> String {
    let path = dir.join("bin");
    std::fs::create_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(bin(), path.join("quicmesh")).unwrap();
    let cargo = "#!/bin/sh\n\
                 # The README's cargo lines, for the binary this test run built.\n\
                 if [ \"$1 $2 $3\" = 'run --release --' ]; then shift 3; exec quicmesh \"$@\"; fi\n\
                 if [ \"$*\" = 'install --path .' ]; then exit 0; fi\n\
                 echo \"readme test: no stand-in for cargo $*\" >&2; exit 1\n";
    std::fs::write(path.join("cargo"), cargo).unwrap();
    std::fs::set_permissions(path.join("cargo"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!("{}:{}", path.display(), std::env::var("PATH").unwrap_or_default())
}

/// A shell in its own process group, killed whole on drop.
struct Shell(Child);

impl Shell {
    fn start(cwd: &Path, path: &str, script: &str) -> Shell {
        let child = Command::new("bash")
            .args(["-e", "-c", script])
            .current_dir(cwd)
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .env_remove("QUICMESH_ADMIN_TOKEN")
            .env_remove("QUICMESH_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        Shell(child)
    }

    /// Reads the shell's stdout until a line starts with `prefix` (at most 30 s); returns the
    /// lines before it. Its stdout is then no longer read.
    fn wait_for_line(&mut self, prefix: &str, what: &str) -> Vec<String> {
        let stdout = self.0.stdout.take().expect("stdout not taken yet");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.starts_with(prefix) => return seen,
                Ok(l) => seen.push(l),
                Err(_) => panic!("timed out waiting for {what}; it printed:\n{}", seen.join("\n")),
            }
        }
    }

    /// Waits for the shell to exit (at most `limit`); (success, stdout, stderr).
    fn finish(mut self, limit: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let read = |r: Option<&mut dyn std::io::Read>| {
            let mut s = String::new();
            if let Some(r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        };
        self.kill_group();
        let out = read(self.0.stdout.as_mut().map(|s| s as &mut dyn std::io::Read));
        let err = read(self.0.stderr.as_mut().map(|s| s as &mut dyn std::io::Read));
        (status.is_some_and(|s| s.success()), out, err)
    }

    fn kill_group(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.kill_group();
    }
}

#[test]
fn the_readme_quick_start_and_by_hand_path_work_verbatim() {
    if !require_tool("curl") || !require_tool("gtlsclient") {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // A fresh clone's files: the configs, nothing the last run left.
    let work = tempfile::tempdir().unwrap();
    let copy = Command::new("cp")
        .args(["-r", concat!(env!("CARGO_MANIFEST_DIR"), "/config")])
        .arg(work.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let _ = std::fs::remove_dir_all(work.path().join("config/local/state"));
    let _ = std::fs::remove_dir_all(work.path().join("config/replicas/state"));
    let path = tools(work.path());

    // The quick start: the demo (from "The two commands"), then the block of curls beside it.
    let demo_line = line(&readme, "cargo run --release -- demo");
    let demo_cmd = demo_line.split('#').next().unwrap().trim();
    let mut demo = Shell::start(work.path(), &path, &format!("exec {demo_cmd}"));
    demo.wait_for_line("Try", &format!("`{demo_cmd}` to come up"));
    let (ok, out, err) = Shell::start(work.path(), &path, &block(&readme, "demo")).finish(Duration::from_secs(60));
    drop(demo);
    assert!(ok, "the quick start's block failed:\n{out}\n{err}");
    assert!(out.contains("hello from v"), "{out}");
    assert!(out.contains("x-mesh-route"), "the echo shows what the route added: {out}");
    assert!(out.contains("quicmesh_requests_total{"), "{out}");
    assert!(out.contains("/from-node-a"), "node-a's local app reached echo: {out}");
    assert!(!err.contains("I000"), "gtlsclient is quiet: {err}");

    let (ok, out, err) = Shell::start(work.path(), &path, &block(&readme, "explain")).finish(Duration::from_secs(30));
    assert!(
        ok && out.contains("timeouts.connect = \"2s\"") && out.contains("set by: file config/mesh.toml"),
        "{out}{err}"
    );

    // The by-hand path, from the repository root.
    let started = Instant::now();
    let (ok, out, err) = Shell::start(work.path(), &path, &block(&readme, "by-hand")).finish(Duration::from_secs(120));
    let logs: String = ["gateway", "node-a", "node-b", "sample"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(work.path().join(format!("config/local/{n}.log"))).unwrap_or_default();
            format!("---- {n}.log ----\n{text}")
        })
        .collect();
    assert!(ok, "the by-hand block failed:\n{out}\n{err}\n{logs}");
    assert!(out.contains("the mesh is healthy"), "{out}");
    assert_eq!(out.matches("hello from v1 on node-b").count(), 2, "both curls answered:\n{out}\n{logs}");
    let status: Vec<&str> = out.lines().filter(|l| l.starts_with("node-")).collect();
    assert_eq!(status.len(), 2, "{out}");
    assert!(status.iter().all(|l| l.contains(" yes ") && l.contains("current")), "{out}");
    eprintln!("the by-hand path took {:?}", started.elapsed());

    // Gateway replicas on etcd (CI installs etcd; elsewhere this part says it skipped).
    if require_tool("etcd") {
        let (ok, out, err) =
            Shell::start(work.path(), &path, &block(&readme, "replicas")).finish(Duration::from_secs(120));
        let logs: String = ["etcd", "gateway-1", "gateway-2", "gateway-3", "node-a", "node-b", "sample"]
            .iter()
            .map(|n| {
                let text =
                    std::fs::read_to_string(work.path().join(format!("config/replicas/{n}.log"))).unwrap_or_default();
                format!("---- {n}.log ----\n{text}")
            })
            .collect();
        assert!(ok, "the replicas block failed:\n{out}\n{err}\n{logs}");
        assert_eq!(out.matches("hello from v1 on node-b").count(), 3, "every curl answered:\n{out}\n{logs}");
        assert!(out.contains("applied shared config version 1"), "{out}");
        let status: Vec<&str> = out.lines().filter(|l| l.starts_with("node-a ")).collect();
        assert!(status.iter().any(|l| l.contains(" yes ")), "node-a attached to replica 2:\n{out}\n{logs}");
    }

    // The static member's block ends with the node in the foreground: run until it is ready.
    let mut node = Shell::start(work.path(), &path, &block(&readme, "static"));
    let seen = node.wait_for_line("quicmesh node node-a ready:", "the static block's node-a to be ready");
    assert!(seen.iter().any(|l| l.starts_with("config OK")), "check ran first: {seen:?}");
    drop(node);
}
