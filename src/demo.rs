//! `quicmesh demo`: a whole mesh on loopback, from the embedded `config/demo.toml`: a throwaway
//! CA, a gateway, nodes `node-a` and `node-b` that join its control plane as real nodes do, and
//! the sample services `hello` (v1 on node-a, v2 on node-b, split 90/10 at the gateway) and
//! `echo` (on node-b). The gateway and the nodes are processes of this binary, so each serves
//! its own metrics and `quicmesh status` and `top` see what they would on a fleet.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use quicmesh_shared::config;
use quicmesh_shared::identity::Ca;
use tokio::net::TcpListener;

use crate::samples;

/// The embedded demo config.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Gateway port (TCP for HTTP/1.1 and HTTP/2 over TLS, UDP for HTTP/3); 0 picks a free one.
    #[arg(long, default_value_t = 8443)]
    pub port: u16,
    /// Gateway admin port (`/ready`, `/metrics`), on loopback; 0 picks a free one.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// node-a's outbound listener (where a local app on node-a sends), on loopback; 0 picks a
    /// free one. node-b's listeners take free ports.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
}

/// One component: a child process of this binary, and the addresses its ready line gave.
pub struct Component {
    pub name: String,
    child: Child,
    /// Held open: the child exits when it closes (this process gone, however it ended).
    _lifeline: Option<ChildStdin>,
    /// `key=address` pairs of the ready line.
    pub addrs: Vec<(String, SocketAddr)>,
}

impl Component {
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.addrs.iter().find(|(k, _)| k == key).map_or(([127, 0, 0, 1], 0).into(), |(_, a)| *a)
    }

    /// Starts `quicmesh KIND --config FILES...` and waits for its ready line.
    fn start(name: &str, kind: &str, files: &[PathBuf]) -> anyhow::Result<Component> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg(kind);
        for f in files {
            cmd.arg("--config").arg(f);
        }
        let mut child = cmd
            .arg("--exit-with-parent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the demo's {name}"))?;
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take().context("the child's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(" ready: ") {
                    let _ = tx.send(line);
                }
            }
        });
        let mut component = Component { name: name.into(), child, _lifeline: lifeline, addrs: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                break line;
            }
            if component.child.try_wait()?.is_some() || Instant::now() > deadline {
                anyhow::bail!("the demo's {name} did not start (its error is above)");
            }
        };
        component.addrs = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, a)| Some((k.to_string(), a.parse().ok()?)))
            .collect();
        Ok(component)
    }

    /// SIGTERM (the component drains), then waits for it to exit; SIGKILL after 15 s.
    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the running demo started.
pub struct Demo {
    pub gateway: Component,
    pub nodes: Vec<Component>,
    _state: tempfile::TempDir,
}

async fn local_listener() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Fails, naming the flag, when a fixed port is taken (the child would only name its config key).
fn port_free(port: u16, udp_too: bool, flag: &str) -> anyhow::Result<()> {
    if port == 0 {
        return Ok(());
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let taken = |e: std::io::Error| {
        anyhow::anyhow!("the demo cannot listen on {addr}: {e} (another process holds it? `{flag} N` picks another port, 0 a free one)")
    };
    std::net::TcpListener::bind(addr).map_err(taken)?;
    if udp_too {
        std::net::UdpSocket::bind(addr).map_err(taken)?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<PathBuf> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Starts everything; returns once both nodes have joined and run the gateway's snapshot.
pub async fn start(args: &Args) -> anyhow::Result<Demo> {
    // Validated here first: a bad environment fails before any process starts.
    let cfg = config::from_toml_with_env(DEMO_CONFIG).context("embedded demo config")?;
    let td = cfg.mesh.trust_domain.clone();
    port_free(args.port, true, "--port")?;
    port_free(args.admin_port, false, "--admin-port")?;
    port_free(args.outbound_port, false, "--outbound-port")?;
    let state = tempfile::Builder::new().prefix("quicmesh-demo-").tempdir()?;
    let dir = state.path();
    let ca = Ca::init(&dir.join("gateway"), &td)?;
    ca.issue("gateway", Duration::from_secs(86400))?;
    for name in ["node-a", "node-b"] {
        let (cert, key) = ca.issue(name, Duration::from_secs(86400))?;
        let own = dir.join(name);
        std::fs::create_dir_all(&own)?;
        std::fs::rename(&cert, own.join(format!("{name}.pem")))?;
        std::fs::rename(&key, own.join(format!("{name}.key")))?;
        std::fs::copy(dir.join("gateway/ca.pem"), own.join("ca.pem"))?;
    }
    // Sample services on ephemeral ports, registered by the nodes that host them.
    let (hello_a, hello_a_addr) = local_listener().await?;
    let (hello_b, hello_b_addr) = local_listener().await?;
    let (echo_b, echo_b_addr) = local_listener().await?;
    tokio::spawn(samples::hello(hello_a, "v1".into(), "node-a".into()));
    tokio::spawn(samples::hello(hello_b, "v2".into(), "node-b".into()));
    tokio::spawn(samples::echo(echo_b));

    let mesh = write(&dir.join("mesh.toml"), DEMO_CONFIG)?;
    let gw_layer = format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\ncontrol = \"127.0.0.1:0\"\n\n[gateway.tls]\nstate_dir = \"gateway\"\n",
        args.port, args.admin_port
    );
    let gw_file = write(&dir.join("gateway.toml"), &gw_layer)?;
    let gateway = Component::start("gateway", "gateway", &[mesh, gw_file])?;
    let control = gateway.addr("control");
    let instance = |service: &str, addr: SocketAddr, version: &str| {
        format!("[[node.instances]]\nservice = \"{service}\"\naddress = \"{addr}\"\nlabels = {{ version = \"{version}\" }}\n")
    };
    let mut nodes = Vec::new();
    for (name, outbound, instances) in [
        ("node-a", args.outbound_port, instance("hello", hello_a_addr, "v1")),
        ("node-b", 0, instance("hello", hello_b_addr, "v2") + &instance("echo", echo_b_addr, "v1")),
    ] {
        let text = format!(
            "[mesh]\ntrust_domain = \"{td}\"\n\n[node]\nname = \"{name}\"\noutbound = \"127.0.0.1:{outbound}\"\n\
             inbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[node.tls]\nstate_dir = \"{name}\"\n\n\
             [node.gateway]\naddress = \"{control}\"\n\n{instances}"
        );
        let file = write(&dir.join(format!("{name}.toml")), &text)?;
        nodes.push(Component::start(name, "node", &[file])?);
    }
    // Ready when both nodes run the snapshot that holds both registrations.
    let admin = gateway.addr("admin");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(doc) = crate::top::nodes(admin).await {
            let version = doc["version"].as_u64();
            let list = doc["nodes"].as_array().cloned().unwrap_or_default();
            let instances: u64 = list.iter().filter_map(|n| n["instances"].as_u64()).sum();
            let current = list.iter().all(|n| n["connected"] == true && n["acked_version"].as_u64() == version);
            if list.len() == 2 && instances == 3 && current {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the demo's nodes did not join the gateway within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Demo { gateway, nodes, _state: state })
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let demo = start(&args).await?;
    let (listen, admin) = (demo.gateway.addr("listen"), demo.gateway.addr("admin"));
    let port = listen.port();
    println!("quicmesh demo is up: gateway, nodes node-a and node-b (joined to its control plane), services hello (v1, v2) and echo.");
    println!();
    println!("  gateway  https://127.0.0.1:{port}   TCP: HTTP/1.1 + HTTP/2 (TLS), UDP: HTTP/3");
    println!("  admin    http://{admin}          /ready  /metrics  /config_dump  /nodes  /endpoints  /logging  /tap");
    println!("  dashboard  http://{admin}/dashboard   (service graph, nodes, live tap; open it in a browser)");
    for n in &demo.nodes {
        println!(
            "  {}   outbound http://{}  QUIC {}  admin http://{}",
            n.name,
            n.addr("outbound"),
            n.addr("inbound"),
            n.addr("admin")
        );
    }
    println!();
    println!("Try (the edge certificate is self-signed, hence -k):");
    println!("  curl -k https://127.0.0.1:{port}/hello                # 90% v1, 10% v2 (canary)");
    println!("  curl -k --http2 https://127.0.0.1:{port}/echo -d hi    # what the mesh adds to a request");
    println!("  curl -s http://{admin}/metrics | grep quicmesh_");
    if let Some(n) = demo.nodes.first() {
        println!(
            "  curl -H 'Host: echo' http://{}/from-node-a     # a local app on node-a calling echo",
            n.addr("outbound")
        );
    }
    let exe = std::env::current_exe().map_or("quicmesh".into(), |p| p.display().to_string());
    println!("  {exe} status --admin {admin}   # the nodes, as the control plane sees them");
    println!("  {exe} top --admin {admin}      # live rate, success, p50/p99 per service");
    println!("  {exe} tap --admin {admin}      # requests as they complete, on every proxy");
    println!();
    println!("Ctrl-C stops everything.");
    shutdown_signal().await;
    println!("stopping");
    // Nodes first: each says goodbye to the control plane and drains.
    for n in demo.nodes {
        n.stop();
    }
    demo.gateway.stop();
    Ok(())
}

/// Ctrl-C or SIGTERM, listened for from its creation: SIGTERM's handler is installed at once,
/// so a signal that arrives before the first wait (or between waits) is not lost.
pub struct Shutdown {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    pub fn listen() -> Self {
        Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    pub async fn wait(&mut self) {
        #[cfg(unix)]
        if let Some(term) = self.term.as_mut() {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    Shutdown::listen().wait().await
}
