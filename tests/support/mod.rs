//! Test harness: a throwaway CA, node processes started from the real binary, in-process sample
//! backends, and small clients. Everything binds port 0; waits poll with deadlines.
#![allow(dead_code)]

pub mod backend;
pub mod etcd;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quicmesh_shared::identity::{Ca, Credentials};
use tokio::net::TcpListener;

/// The `quicmesh` binary the tests and benches start: cargo's build of it, or the one
/// `BIN_UNDER_TEST` names (to run the suites against another build of the same source, such as
/// `link/pgo.sh`'s); a relative path is taken from the repository's root, an empty one is unset.
pub fn bin() -> &'static str {
    static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        binary_from_env("BIN_UNDER_TEST")
            .map_or(env!("CARGO_BIN_EXE_quicmesh").to_string(), |p| p.display().to_string())
    });
    BIN.as_str()
}

/// The binary environment variable `var` names, a relative path taken from the repository's
/// root; `None` when unset or empty.
pub fn binary_from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|p| !p.is_empty()).map(|p| Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
}
pub const TD: &str = "test.quicmesh.local";
/// The transport timing the suites were written for (a dead peer noticed within 3 s); the
/// defaults (300 ms / 1 s) are under test in `tests/fleet.rs`.
pub const TRANSPORT: &str = "[transport]\nkeep_alive = \"500ms\"\nidle_timeout = \"3s\"\n";

/// Under CI a missing tool fails the test; elsewhere the test is skipped, saying so.
pub fn require_tool(tool: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is required under CI=true but is not installed");
        }
        eprintln!("SKIPPED: {tool} is not installed (CI=true makes this a failure)");
    }
    found
}

/// Polls `f` until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), TD).unwrap();
        Self { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Issues `name` and returns the state dir holding ca.pem, name.pem, name.key.
    pub fn issue(&self, name: &str) -> PathBuf {
        self.ca.issue(name, Duration::from_secs(3600)).unwrap();
        self.dir.path().to_path_buf()
    }
}

/// The credentials of member `name` issued into `dir` (ca.pem, name.pem, name.key).
pub fn credentials(dir: &Path, name: &str) -> Credentials {
    Credentials::load(&dir.join("ca.pem"), &dir.join(format!("{name}.pem")), &dir.join(format!("{name}.key"))).unwrap()
}

/// An in-process echo backend on a fresh port.
pub async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(quicmesh::samples::echo(l));
    a
}

/// An address where nothing listens.
pub async fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Addresses a node or gateway process printed when ready (`listen` only for a gateway,
/// `outbound`/`inbound` only for a node).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub control: SocketAddr,
    pub tcp: Vec<(String, SocketAddr)>,
    /// A gateway's `gateway.listeners`, by name.
    pub listeners: std::collections::HashMap<String, SocketAddr>,
}

/// What a child process is started inside of.
#[derive(Clone)]
pub enum Wrap {
    /// A network namespace (`ip netns exec`).
    Netns(String),
    /// A mount namespace of its own where this file is `/etc/hosts` (root and `unshare`):
    /// names the test makes up resolve for that process only.
    Hosts(PathBuf),
    /// These environment variables set.
    Env(Vec<(String, String)>),
    /// Another build of the binary, at this path (`benches/load.rs` compares two builds).
    Bin(PathBuf),
}

/// A node running as a child process of the real binary; killed on drop.
pub struct NodeProc {
    pub child: Child,
    kind: &'static str,
    args: Vec<String>,
    /// How the process is started, if not directly.
    wrap: Option<Wrap>,
    configs: Vec<PathBuf>,
    pub addrs: Addrs,
    pub config: PathBuf,
    pub stderr: PathBuf,
}

impl NodeProc {
    /// Starts `quicmesh node --config <toml>` and waits for its ready line.
    pub fn start(dir: &Path, name: &str, toml: &str) -> NodeProc {
        Self::start_kind("node", dir, name, toml)
    }

    /// Starts `quicmesh gateway --config <toml>` and waits for its ready line.
    pub fn start_gateway(dir: &Path, toml: &str) -> NodeProc {
        Self::start_kind("gateway", dir, "gateway", toml)
    }

    fn start_kind(kind: &'static str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        Self::start_args(kind, dir, name, toml, &[])
    }

    /// Starts `quicmesh KIND --config <toml> ARGS...` and waits for its ready line.
    pub fn start_args(kind: &'static str, dir: &Path, name: &str, toml: &str, args: &[&str]) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stderr = dir.join(format!("{name}.log"));
        let mut p = Self::spawn_args(kind, vec![config], stderr, args);
        p.args = args.iter().map(|a| a.to_string()).collect();
        p
    }

    /// Starts `quicmesh KIND --config <toml>` inside network namespace `netns` (as root, with
    /// `ip netns exec`, which execs the binary: the child's pid is the process's own).
    pub fn start_in(netns: &str, kind: &'static str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stderr = dir.join(format!("{name}.log"));
        Self::spawn_in(Some(Wrap::Netns(netns.to_string())), kind, vec![config], stderr, &[])
    }

    /// Starts `quicmesh KIND --config F1 --config F2 ...` from files already written.
    pub fn start_layered(kind: &'static str, files: &[PathBuf]) -> NodeProc {
        let stderr = files[0].with_file_name(format!("{kind}.log"));
        Self::spawn(kind, files.to_vec(), stderr)
    }

    /// [`NodeProc::start_layered`] inside network namespace `netns` (see [`NodeProc::start_in`]).
    pub fn start_layered_in(netns: &str, kind: &'static str, files: &[PathBuf]) -> NodeProc {
        let stderr = files[0].with_file_name(format!("{kind}.log"));
        Self::spawn_in(Some(Wrap::Netns(netns.to_string())), kind, files.to_vec(), stderr, &[])
    }

    /// `quicmesh KIND --config <toml>` seeing `hosts` as its `/etc/hosts` (see [`Wrap::Hosts`]).
    pub fn start_with_hosts(hosts: &Path, kind: &'static str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stderr = dir.join(format!("{name}.log"));
        Self::spawn_in(Some(Wrap::Hosts(hosts.to_path_buf())), kind, vec![config], stderr, &[])
    }

    /// `quicmesh KIND --config <toml>` with environment variables `env` set.
    pub fn start_with_env(env: &[(&str, &str)], kind: &'static str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stderr = dir.join(format!("{name}.log"));
        let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::spawn_in(Some(Wrap::Env(vars)), kind, vec![config], stderr, &[])
    }

    /// `quicmesh KIND --config <toml>` run from the binary at `binary`, not [`bin`].
    pub fn start_with_bin(binary: &Path, kind: &'static str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stderr = dir.join(format!("{name}.log"));
        Self::spawn_in(Some(Wrap::Bin(binary.to_path_buf())), kind, vec![config], stderr, &[])
    }

    fn spawn(kind: &'static str, configs: Vec<PathBuf>, stderr: PathBuf) -> NodeProc {
        Self::spawn_args(kind, configs, stderr, &[])
    }

    fn spawn_args(kind: &'static str, configs: Vec<PathBuf>, stderr: PathBuf, args: &[&str]) -> NodeProc {
        Self::spawn_in(None, kind, configs, stderr, args)
    }

    fn spawn_in(
        wrap: Option<Wrap>,
        kind: &'static str,
        configs: Vec<PathBuf>,
        stderr: PathBuf,
        args: &[&str],
    ) -> NodeProc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&stderr).unwrap();
        let mut cmd = match &wrap {
            Some(Wrap::Netns(ns)) => netns::command(ns, bin()),
            // unshare and sh exec in turn: the child's pid is the binary's own.
            Some(Wrap::Hosts(hosts)) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$1\" /etc/hosts && shift && exec \"$@\"")
                    .arg("sh")
                    .arg(hosts)
                    .arg(bin());
                c
            }
            Some(Wrap::Bin(binary)) => Command::new(binary),
            None | Some(Wrap::Env(_)) => Command::new(bin()),
        };
        if let Some(Wrap::Env(vars)) = &wrap {
            cmd.envs(vars.iter().map(|(k, v)| (k, v)));
        }
        cmd.arg(kind);
        for c in &configs {
            cmd.arg("--config").arg(c);
        }
        cmd.args(args);
        let mut child = cmd
            // Tests log our crates at debug, for their failure output; a harness that sets
            // QUICMESH_LOG (the benches: the default, info) passes its own.
            .env(
                "QUICMESH_LOG",
                std::env::var("QUICMESH_LOG").unwrap_or("info,quicmesh_shared=debug,quicmesh_node=debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(" ready: ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("node did not become ready; log:\n{}", std::fs::read_to_string(&stderr).unwrap_or_default());
            }
        };
        let field = |k: &str| -> SocketAddr {
            let pat = format!("{k}=");
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&pat))
                .map_or(([0, 0, 0, 0], 0).into(), |a| a.parse().unwrap())
        };
        let tcp = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("tcp."))
            .filter_map(|w| w.split_once('='))
            .map(|(s, a)| (s.to_string(), a.parse().unwrap()))
            .collect();
        let listeners = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("listener."))
            .filter_map(|w| w.split_once('='))
            .map(|(s, a)| (s.to_string(), a.parse().unwrap()))
            .collect();
        let addrs = Addrs {
            outbound: field("outbound"),
            inbound: field("inbound"),
            listen: field("listen"),
            admin: field("admin"),
            control: field("control"),
            tcp,
            listeners,
        };
        NodeProc { child, addrs, config: configs[0].clone(), configs, stderr, kind, args: Vec::new(), wrap }
    }

    /// Sends signal `sig` (STOP, CONT, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{sig} failed");
    }

    /// SIGKILL: no goodbye to peers.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to exit (a clean shutdown).
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("process did not exit after SIGTERM");
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Starts the same config again (same ports where the config pins them).
    pub fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut fresh = Self::spawn_in(self.wrap.clone(), self.kind, self.configs.clone(), self.stderr.clone(), &args);
        fresh.args = self.args.clone();
        let old = std::mem::replace(self, fresh);
        drop(old);
    }

    /// Peak resident memory of the process, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM")
    }

    /// Resident memory of the process now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS")
    }

    pub fn log(&self) -> String {
        // A test may hand a process a pipe as stderr: reading that would wait for ever.
        if !std::fs::metadata(&self.stderr).is_ok_and(|m| m.is_file()) {
            return format!("({} is not a file)", self.stderr.display());
        }
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The log once it holds every one of `needles`: lines reach the file through the
    /// process's log-writer thread, a moment after the event. Fails, showing the log, after 10 s.
    pub async fn log_with(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if needles.iter().all(|n| log.contains(n)) {
                return log;
            }
            assert!(Instant::now() < deadline, "the log never showed {needles:?}:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.addrs.admin)).await.1
    }

    /// A JSON admin page such as `/endpoints` or `/nodes`.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(&format!("http://{}{path}", self.addrs.admin)).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The framing (`lean` or `h3`) of this member's first pooled connection to `peer`, as
    /// `/endpoints` shows it.
    pub async fn framing_to(&self, peer: &str) -> String {
        let dump = self.admin_json("/endpoints").await;
        let node = dump["nodes"].as_array().and_then(|n| n.iter().find(|n| n["name"] == peer)).cloned();
        let node = node.unwrap_or_else(|| panic!("no {peer} in {dump}"));
        node["connections"][0]["framing"].as_str().unwrap_or_else(|| panic!("no framing in {node}")).to_string()
    }
}

/// A member's config `toml` (with a `[transport]` table, as [`node_toml`] writes) set to frame
/// requests to its peers as `framing` says (`transport.framing`).
pub fn with_framing(toml: &str, framing: &str) -> String {
    toml.replacen("[transport]\n", &format!("[transport]\nframing = \"{framing}\"\n"), 1)
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.config.display(), self.log());
        }
    }
}

/// CPU time a process has used so far (user + system, all threads), from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    cpu_time_of(&pid.to_string())
}

/// CPU time of `/proc/<which>`: a process id, or `<pid>/task/<tid>` for one thread.
pub fn cpu_time_of(which: &str) -> Duration {
    cpu_split_of(which).total()
}

/// CPU time split into user space and kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuSplit {
    pub user: Duration,
    pub kernel: Duration,
}

impl CpuSplit {
    pub fn total(&self) -> Duration {
        self.user + self.kernel
    }
}

impl std::ops::Add for CpuSplit {
    type Output = CpuSplit;
    fn add(self, other: CpuSplit) -> CpuSplit {
        CpuSplit { user: self.user + other.user, kernel: self.kernel + other.kernel }
    }
}

impl std::ops::Sub for CpuSplit {
    type Output = CpuSplit;
    fn sub(self, earlier: CpuSplit) -> CpuSplit {
        CpuSplit { user: self.user.saturating_sub(earlier.user), kernel: self.kernel.saturating_sub(earlier.kernel) }
    }
}

/// User and kernel CPU time of `/proc/<which>` (as [`cpu_time_of`]).
pub fn cpu_split_of(which: &str) -> CpuSplit {
    let stat = std::fs::read_to_string(format!("/proc/{which}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Fields by position: some are not unsigned (tpgid is -1 without a controlling terminal),
    // so skipping unparsable ones would shift the rest.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat: 11 and 12 counting the state letter as 0,
    // in USER_HZ ticks (100 per second in the /proc ABI).
    CpuSplit { user: Duration::from_millis(field(11) * 10), kernel: Duration::from_millis(field(12) * 10) }
}

/// CPU time of several processes together.
pub fn cpu_of(pids: &[u32]) -> Duration {
    cpu_split(pids).total()
}

/// User and kernel CPU time of several processes together.
pub fn cpu_split(pids: &[u32]) -> CpuSplit {
    pids.iter().map(|p| cpu_split_of(&p.to_string())).fold(CpuSplit::default(), |a, b| a + b)
}

/// A `kB` field of `/proc/PID/status` (0 when unreadable).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A current-thread runtime on an OS thread of its own (benches): endpoints measured against a
/// node run like one. `task` is `<pid>/task/<tid>`, for its CPU time.
pub struct Lane {
    pub handle: tokio::runtime::Handle,
    pub task: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Lane {
    pub fn new(name: &str) -> Lane {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let me = std::fs::read_link("/proc/thread-self").map(|p| p.to_string_lossy().into_owned());
                let _ = tx.send(me.unwrap_or_default());
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })
            .unwrap();
        Lane { handle, task: rx.recv().unwrap(), _stop: stop }
    }

    /// CPU time of the lane's thread.
    pub fn cpu(&self) -> Duration {
        cpu_time_of(&self.task)
    }

    /// User and kernel CPU time of the lane's thread.
    pub fn cpu_split(&self) -> CpuSplit {
        cpu_split_of(&self.task)
    }
}

/// For benches: nodes and gateways log as a user's would (info, unless QUICMESH_LOG says
/// otherwise), not at the tests' debug level.
pub fn bench_logging() {
    if std::env::var_os("QUICMESH_LOG").is_none() {
        std::env::set_var("QUICMESH_LOG", "info");
    }
}

/// A setting from the environment (benchmarks), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Sum of all samples of `name` whose labels include every `k="v"` in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    quicmesh::live::sample(text, name, labels)
}

/// Config TOML of a two-node mesh: `peers` are (name, QUIC address); `services` are TOML
/// `[[services]]` blocks.
pub fn node_toml(name: &str, state: &Path, peers: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut t = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[node]\nname = \"{name}\"\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[node.tls]\nstate_dir = \"{}\"\n\n[timeouts]\nconnect = \"2s\"\nrequest = \"10s\"\n\n{TRANSPORT}\n",
        state.display()
    );
    for (peer, addr) in peers {
        t.push_str(&format!("[[nodes]]\nname = \"{peer}\"\naddress = \"{addr}\"\n\n"));
    }
    t.push_str(extra);
    t
}

/// A gateway (layers in `dir`) whose one edge route, `web`, sends everything to service `web`.
pub fn gateway_to_web(dir: &Path) -> NodeProc {
    let routes = "[[gateway.routes]]\nname = \"web\"\n[[gateway.routes.rules]]\n\
                  [[gateway.routes.rules.backendRefs]]\nname = \"web\"\n";
    NodeProc::start_layered("gateway", &gateway_layers(dir, "[[services]]\nname = \"web\"", routes))
}

/// Writes a gateway's two layers in `dir`: the mesh-wide `mesh.toml` (trust domain, timeouts,
/// transport, then `mesh_extra`) and `gateway.toml` (listeners on port 0, `dir` as state, then
/// `gateway_extra`); returns both paths, in layering order.
pub fn gateway_layers(dir: &Path, mesh_extra: &str, gateway_extra: &str) -> Vec<PathBuf> {
    let mesh = dir.join("mesh.toml");
    let mesh_text = format!(
        "[mesh]\ntrust_domain = \"{TD}\"\n\n[timeouts]\nconnect = \"2s\"\nrequest = \"10s\"\n\n{TRANSPORT}\n{mesh_extra}\n"
    );
    std::fs::write(&mesh, mesh_text).unwrap();
    let gw = dir.join("gateway.toml");
    let gw_text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\nwatch_interval = \"100ms\"\n\n\
         [gateway.tls]\nstate_dir = \"{}\"\n\n{gateway_extra}",
        dir.display()
    );
    std::fs::write(&gw, gw_text).unwrap();
    vec![mesh, gw]
}

/// A node config joined to the control plane at `control`; `extra` adds instances and more.
pub fn joined_toml(name: &str, dir: &Path, control: SocketAddr, extra: &str) -> String {
    let mut t = node_toml(name, dir, &[], "");
    t.push_str(&format!("\n[node.gateway]\naddress = \"{control}\"\n\n{extra}"));
    t
}

/// A plain HTTP/1.1 GET with hyper (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    match client.get(url.parse().unwrap()).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// POSTs a JSON body; the answer's body ("" when there is none).
pub async fn http_post_json(url: &str, body: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            String::from_utf8_lossy(&body).into_owned()
        }
        Err(_) => String::new(),
    }
}

/// Runs curl with arguments; returns (exit ok, stdout).
pub fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "30"]).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A node of the demo: its name, outbound listener and QUIC (inbound) address.
#[derive(Debug, Clone)]
pub struct DemoNode {
    pub name: String,
    pub outbound: SocketAddr,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
}

/// `quicmesh demo` as a child process on free ports; killed on drop.
pub struct DemoProc {
    pub child: Child,
    /// Gateway port (TCP and UDP).
    pub port: u16,
    pub admin: SocketAddr,
    /// The demo's nodes, as it prints them.
    pub nodes: Vec<DemoNode>,
    pub stderr: tempfile::NamedTempFile,
}

impl DemoProc {
    pub fn start(env: &[(&str, &str)]) -> DemoProc {
        let mut cmd = Command::new(bin());
        cmd.args(Self::ARGS).envs(env.iter().copied()).env("NO_COLOR", "1").env("RUST_BACKTRACE", "1");
        Self::start_command(cmd)
    }

    /// `quicmesh demo` on free ports.
    pub const ARGS: [&'static str; 7] = ["demo", "--port", "0", "--admin-port", "0", "--outbound-port", "0"];

    /// The demo as `cmd` starts it (inside a container, say), reading what it prints.
    pub fn start_command(mut cmd: Command) -> DemoProc {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr.reopen().unwrap()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut port, mut admin, mut nodes) = (None, None, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        // The node lines come after the gateway's; "Try" follows them all.
        let mut listed = false;
        while port.is_none() || admin.is_none() || !listed {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("demo did not start; log:\n{}", std::fs::read_to_string(stderr.path()).unwrap_or_default());
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["gateway", url, ..] => port = url.rsplit(':').next().and_then(|p| p.parse().ok()),
                ["admin", url, ..] => admin = url.strip_prefix("http://").and_then(|a| a.parse().ok()),
                [name, "outbound", outbound, "QUIC", quic, "admin", admin, ..] => {
                    let outbound = outbound.strip_prefix("http://").and_then(|a| a.parse().ok());
                    let admin = admin.strip_prefix("http://").and_then(|a| a.parse().ok());
                    if let (Some(outbound), Ok(quic), Some(admin)) = (outbound, quic.parse(), admin) {
                        nodes.push(DemoNode { name: name.to_string(), outbound, quic, admin });
                    }
                }
                ["Try", ..] => listed = true,
                _ => {}
            }
        }
        DemoProc { child, port: port.unwrap(), admin: admin.unwrap(), nodes, stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/ready", self.admin);
        eventually(Duration::from_secs(20), "demo /ready", || {
            let url = url.clone();
            async move { (http_get(&url).await.0 == 200).then_some(()) }
        })
        .await;
    }

    /// The metrics of every component (the gateway's, then each node's): [`metric`] sums
    /// over them.
    pub async fn metrics(&self) -> String {
        let mut all = http_get(&format!("http://{}/metrics", self.admin)).await.1;
        for n in &self.nodes {
            all.push_str(&http_get(&format!("http://{}/metrics", n.admin)).await.1);
        }
        all
    }

    /// The gateway's metrics alone.
    pub async fn gateway_metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.admin)).await.1
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }
}

impl Drop for DemoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- demo log ----\n{}", self.log());
        }
    }
}

/// Accepts any server certificate: for the demo's self-signed development certificate only.
#[derive(Debug)]
pub struct InsecureVerifier(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl InsecureVerifier {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::Arc::new(rustls::crypto::ring::default_provider())))
    }
}

impl rustls::client::danger::ServerCertVerifier for InsecureVerifier {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client config trusting anything, with the given ALPN protocols.
pub fn insecure_tls(alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(InsecureVerifier::new())
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

pub type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

/// An HTTP/3 client connection (quinn + h3) to 127.0.0.1:port.
pub async fn h3_connect(port: u16) -> (quinn::Endpoint, H3Sender) {
    let tls = insecure_tls(&[b"h3"]);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let conn = ep.connect(([127, 0, 0, 1], port).into(), "localhost").unwrap().await.unwrap();
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    (ep, send)
}

/// One HTTP/3 request: (status, headers, body).
pub async fn h3_request(send: &mut H3Sender, req: http::Request<()>, body: &[u8]) -> (u16, http::HeaderMap, Vec<u8>) {
    use bytes::Buf;
    let mut stream = send.send_request(req).await.unwrap();
    if !body.is_empty() {
        stream.send_data(bytes::Bytes::copy_from_slice(body)).await.unwrap();
    }
    // A server may answer before it reads the request's end and stop the rest (RFC 9114
    // 4.1.2); a client must still take the response, so a refused end is not a failure.
    if let Err(e) = stream.finish().await {
        eprintln!("the request's end was refused (the server had answered): {e}");
    }
    let resp = stream.recv_response().await.unwrap();
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (resp.status().as_u16(), resp.headers().clone(), out)
}

/// An in-process `hello` backend answering with its version.
pub async fn hello_backend(version: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(quicmesh::samples::hello(l, version.to_string(), "node-b".into()));
    a
}

/// A backend that counts the requests it receives (and their body bytes) and answers 200.
pub async fn counting_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use http_body_util::BodyExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(quicmesh::samples::serve(l, move |req: http::Request<hyper::body::Incoming>| {
        let c = c.clone();
        async move {
            let _ = req.into_body().collect().await;
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            http::Response::new(quicmesh_shared::message::body::full("shadow"))
        }
    }));
    (a, count)
}

/// A backend that accepts connections and never answers.
pub async fn silent_backend() -> SocketAddr {
    silent_backend_counted().await.0
}

/// A silent backend, and how many connections it has accepted.
pub async fn silent_backend_counted() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (a, accepted)
}

/// A backend answering `version` after `delay` (a slow instance, for balancing tests).
pub async fn delayed_backend(version: &'static str, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(quicmesh::samples::serve(l, move |_req: http::Request<hyper::body::Incoming>| async move {
        tokio::time::sleep(delay).await;
        http::Response::new(quicmesh_shared::message::body::full(version))
    }));
    a
}

/// Machine-wide TCP counters from `/proc/net/snmp` and `/proc/net/netstat` (benches): accept
/// queue overflows, SYN retransmits, retransmitted segments, retransmission timeouts. The
/// machine's, not a process's: read them around a round that runs alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TcpTrouble {
    pub listen_overflows: u64,
    pub syn_retrans: u64,
    pub retrans_segs: u64,
    pub timeouts: u64,
}

impl TcpTrouble {
    pub fn now() -> Self {
        let mut t = Self::default();
        for file in ["/proc/net/snmp", "/proc/net/netstat"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // "Prefix: names..." followed by "Prefix: values..."; a line whose neighbour has
            // another prefix is skipped, so one odd line cannot shift every pair after it.
            fn prefix(line: &str) -> Option<&str> {
                line.split(':').next()
            }
            for pair in lines.windows(2) {
                let [names, values] = pair else { continue };
                if prefix(names) != prefix(values)
                    || names.split_whitespace().nth(1).is_some_and(|w| w.parse::<i64>().is_ok())
                {
                    continue;
                }
                for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                    let v = v.parse().unwrap_or(0);
                    match (prefix(names), n) {
                        (Some("TcpExt"), "ListenOverflows") => t.listen_overflows = v,
                        (Some("TcpExt"), "TCPSynRetrans") => t.syn_retrans = v,
                        (Some("TcpExt"), "TCPTimeouts") => t.timeouts = v,
                        (Some("Tcp"), "RetransSegs") => t.retrans_segs = v,
                        _ => {}
                    }
                }
            }
        }
        t
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            listen_overflows: self.listen_overflows.saturating_sub(earlier.listen_overflows),
            syn_retrans: self.syn_retrans.saturating_sub(earlier.syn_retrans),
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
        }
    }

    pub fn add(&mut self, other: &Self) {
        self.listen_overflows += other.listen_overflows;
        self.syn_retrans += other.syn_retrans;
        self.retrans_segs += other.retrans_segs;
        self.timeouts += other.timeouts;
    }
}

/// A TLS server config with a self-signed certificate for `names`, written to
/// `<dir>/<stem>-cert.pem` (returned, for clients to trust) and `<stem>-key.pem`.
pub fn self_signed_server(dir: &Path, stem: &str, names: &[&str]) -> (rustls::ServerConfig, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let (cert_pem, key_pem) = quicmesh_shared::identity::self_signed_pem(&names).unwrap();
    let cert_file = dir.join(format!("{stem}-cert.pem"));
    std::fs::write(&cert_file, &cert_pem).unwrap();
    let key_file = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&key_file, &key_pem).unwrap();
    let certs = quicmesh_shared::identity::read_certs(&cert_file).unwrap();
    let key = quicmesh_shared::identity::read_key(&key_file).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    (config, cert_file)
}

/// A TLS client config trusting only the certificates in `ca` (PEM).
pub fn tls_client_trusting(ca: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in quicmesh_shared::identity::read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Serves TLS with `config` on a loopback port: each connection, once its handshake is done,
/// goes to `serve`.
pub async fn tls_server<F, Fut>(config: rustls::ServerConfig, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// A backend for gRPC without a gRPC library: gRPC calls (`content-type: application/grpc`) get each DATA chunk echoed
/// as it comes, then `grpc-status: 0`; any other request gets its body back. HTTP/1.1 and h2c.
pub async fn duplex_echo_backend() -> SocketAddr {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let grpc =
                    req.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                if !grpc {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let resp = http::Response::new(
                        http_body_util::Full::new(body).map_err(|never| match never {}).boxed_unsync(),
                    );
                    return Ok::<_, std::convert::Infallible>(resp);
                }
                let (tx, rx) = tokio::sync::mpsc::channel::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                >(16);
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            if tx.send(Ok(hyper::body::Frame::data(data))).await.is_err() {
                                return;
                            }
                        }
                    }
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = tx.send(Ok(hyper::body::Frame::trailers(trailers))).await;
                });
                let body = http_body_util::StreamBody::new(stream_of(rx)).boxed_unsync();
                let resp = http::Response::builder().header("content-type", "application/grpc").body(body).unwrap();
                Ok(resp)
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// `len` bytes that differ from place to place: a pattern of 251 (a prime, so no power-of-two
/// chunk or buffer lines up with it), for checking that a transfer kept every byte in its place.
pub fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// An mpsc receiver as a stream.
pub fn stream_of<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
