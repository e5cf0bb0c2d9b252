//! The `quicmesh` binary: a thin CLI over the gateway, node and shared crates.
#![forbid(unsafe_code)]

use quicmesh::demo;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quicmesh_shared::config;
use quicmesh_shared::identity::{Ca, DEFAULT_NODE_VALIDITY};

#[derive(Parser)]
#[command(name = "quicmesh", version, about = "A service mesh whose data plane runs on QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run a node proxy.
    Node {
        /// Config files, layered in order (later ones override earlier ones).
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Run the edge gateway.
    Gateway {
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Validate config files offline; exits non-zero with the same messages the daemons print.
    Check {
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Run a whole mesh on loopback: gateway, two nodes and sample services.
    Demo(demo::Args),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA in a state directory.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "quicmesh.local")]
        trust_domain: String,
    },
    /// Issue a member certificate with identity spiffe://<trust-domain>/node/<NAME>.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_NODE_VALIDITY.as_secs() / 86400)]
        days: u64,
    },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("QUICMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("QUICMESH_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quicmesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca { command: CaCommand::Init { dir, trust_domain } } => {
            let ca = Ca::init(&dir, &trust_domain)?;
            println!("created CA for trust domain {} in {}", ca.trust_domain, dir.display());
            Ok(())
        }
        Command::Ca { command: CaCommand::Issue { dir, node, days } } => {
            let ca = Ca::open(&dir)?;
            let (cert, key) = ca.issue(&node, std::time::Duration::from_secs(days * 86400))?;
            println!("issued spiffe://{}/node/{node}: {} {}", ca.trust_domain, cert.display(), key.display());
            Ok(())
        }
        Command::Check { config } => {
            let cfg = config::load(&config)?;
            println!(
                "config OK: {} services, {} nodes{}{}",
                cfg.services.len(),
                cfg.nodes.len(),
                cfg.node.as_ref().map(|n| format!(", node {}", n.name)).unwrap_or_default(),
                cfg.gateway.as_ref().map(|g| format!(", gateway with {} routes", g.routes.len())).unwrap_or_default()
            );
            Ok(())
        }
        Command::Node { config } => {
            let cfg = config::load(&config)?;
            runtime()?.block_on(async {
                quicmesh_shared::metrics::recorder();
                let node = quicmesh_node::start(cfg).await?;
                let a = &node.addrs;
                let tcp: String = a.tcp.iter().map(|(s, addr)| format!(" tcp.{s}={addr}")).collect();
                println!(
                    "quicmesh node {} ready: outbound={} inbound={} admin={}{tcp}",
                    a.name, a.outbound, a.inbound, a.admin
                );
                demo::shutdown_signal().await;
                node.shutdown().await;
                Ok(())
            })
        }
        Command::Gateway { config } => {
            let cfg = config::load(&config)?;
            runtime()?.block_on(async {
                quicmesh_shared::metrics::recorder();
                let gw = quicmesh_gateway::start_with_files(cfg, config).await?;
                let a = &gw.addrs;
                println!("quicmesh gateway ready: listen={} admin={} control={}", a.listen, a.admin, a.control);
                demo::shutdown_signal().await;
                gw.shutdown().await;
                Ok(())
            })
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}
