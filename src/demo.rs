//! `quicmesh demo`: a whole mesh in one process on loopback, from the embedded
//! `config/demo.toml`: a throwaway CA, a gateway, nodes `node-a` and `node-b`, and the sample
//! services `hello` (v1 on node-a, v2 on node-b, split 90/10 at the gateway) and `echo`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::Context;
use quicmesh_shared::config::{self, Config, NodeConfig, TlsFiles};
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

/// What the running demo bound.
pub struct Demo {
    pub gateway: quicmesh_gateway::Gateway,
    pub nodes: Vec<quicmesh_node::Node>,
    _state: tempfile::TempDir,
}

async fn local_listener() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Starts everything; returns once the gateway serves.
pub async fn start(args: &Args) -> anyhow::Result<Demo> {
    quicmesh_shared::metrics::recorder();
    let mut cfg: Config = config::from_toml_with_env(DEMO_CONFIG).context("embedded demo config")?;
    let state = tempfile::Builder::new().prefix("quicmesh-demo-").tempdir()?;
    let ca = Ca::init(state.path(), &cfg.mesh.trust_domain)?;
    for name in ["gateway", "node-a", "node-b"] {
        ca.issue(name, Duration::from_secs(86400))?;
    }
    // Sample services on ephemeral ports, patched into the endpoint addresses.
    let (hello_a, hello_a_addr) = local_listener().await?;
    let (hello_b, hello_b_addr) = local_listener().await?;
    let (echo_b, echo_b_addr) = local_listener().await?;
    tokio::spawn(samples::hello(hello_a, "v1".into(), "node-a".into()));
    tokio::spawn(samples::hello(hello_b, "v2".into(), "node-b".into()));
    tokio::spawn(samples::echo(echo_b));
    for svc in &mut cfg.services {
        for ep in &mut svc.endpoints {
            ep.address = match (svc.name.as_str(), ep.node.as_str()) {
                ("hello", "node-a") => hello_a_addr,
                ("hello", _) => hello_b_addr,
                _ => echo_b_addr,
            };
        }
    }
    // Bind the nodes' QUIC sockets first so every member knows every address.
    let mut sockets = Vec::new();
    for peer in &mut cfg.nodes {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        peer.address = sock.local_addr()?;
        sockets.push((peer.name.clone(), sock));
    }
    let tls = TlsFiles { state_dir: Some(state.path().to_path_buf()), ..Default::default() };
    let mut nodes = Vec::new();
    for (name, sock) in sockets {
        let mut node_cfg = cfg.clone();
        node_cfg.gateway = None;
        let outbound_port = if name == "node-a" { args.outbound_port } else { 0 };
        node_cfg.node = Some(NodeConfig {
            name: name.clone(),
            outbound: (std::net::Ipv4Addr::LOCALHOST, outbound_port).into(),
            inbound: sock.local_addr()?,
            admin: "127.0.0.1:0".parse()?,
            tls: tls.clone(),
            ..Default::default()
        });
        node_cfg.validate()?;
        let node = quicmesh_node::start_with(node_cfg, Some(sock)).await.map_err(|e| match &e {
            quicmesh_node::NodeError::Listen { key: "node.outbound", addr, source } => anyhow::anyhow!(
                "the demo's {name} cannot listen on {addr}: {source} (another process holds it? `--outbound-port N` picks another port, 0 a free one)"
            ),
            _ => anyhow::Error::new(e).context(format!("starting {name}")),
        })?;
        nodes.push(node);
    }
    let mut gw_cfg = cfg;
    if let Some(gw) = gw_cfg.gateway.as_mut() {
        gw.listen.set_port(args.port);
        gw.admin.set_port(args.admin_port);
        gw.control = "127.0.0.1:0".parse()?;
        gw.tls = tls;
    }
    let gateway = quicmesh_gateway::start(gw_cfg).await.map_err(|e| match &e {
        // The demo's ports come from flags, not config keys.
        quicmesh_gateway::GatewayError::Listen { key, addr, source } => {
            let flag = if *key == "gateway.admin" { "--admin-port" } else { "--port" };
            anyhow::anyhow!("the demo gateway cannot listen on {addr}: {source} (another process holds it? `{flag} N` picks another port, 0 a free one)")
        }
        _ => anyhow::Error::new(e).context("starting the gateway"),
    })?;
    Ok(Demo { gateway, nodes, _state: state })
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let demo = start(&args).await?;
    let gw = demo.gateway.addrs.clone();
    let port = gw.listen.port();
    println!("quicmesh demo is up: gateway, nodes node-a and node-b, services hello (v1, v2) and echo.");
    println!();
    println!("  gateway  https://127.0.0.1:{port}   TCP: HTTP/1.1 + HTTP/2 (TLS), UDP: HTTP/3");
    println!("  admin    http://{}          /ready  /metrics  /config_dump  /nodes  /endpoints  /logging", gw.admin);
    for n in &demo.nodes {
        let a = &n.addrs;
        println!("  {}   outbound http://{}  QUIC {}  admin http://{}", a.name, a.outbound, a.inbound, a.admin);
    }
    println!();
    println!("Try (the edge certificate is self-signed, hence -k):");
    println!("  curl -k https://127.0.0.1:{port}/hello                # 90% v1, 10% v2 (canary)");
    println!("  curl -k --http2 https://127.0.0.1:{port}/echo -d hi    # what the mesh adds to a request");
    println!("  curl -s http://{}/metrics | grep quicmesh_", gw.admin);
    if let Some(a) = demo.nodes.first().map(|n| n.addrs.outbound) {
        println!("  curl -H 'Host: echo' http://{a}/from-node-a     # a local app on node-a calling echo");
    }
    let exe = std::env::current_exe().map_or("quicmesh".into(), |p| p.display().to_string());
    println!("  {exe} top --admin {}   # live rate, success, p50/p99 per service", gw.admin);
    println!();
    println!("Ctrl-C stops everything.");
    shutdown_signal().await;
    println!("stopping");
    demo.gateway.shutdown().await;
    for n in demo.nodes {
        n.shutdown().await;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
