//! The `quicmesh` binary: a thin CLI over the gateway, node and shared crates.
// Denied, not forbidden: the allocator (`alloc`) and one call into it (`release_memory`) allow it.
#![deny(unsafe_code)]

mod alloc;

use quicmesh::{demo, live, tap, top};

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
enum NodeAction {
    /// Revoke a node: the gateway tells every member to refuse it, at once and before its
    /// certificate expires, and it may not rejoin under that name.
    Revoke {
        /// The node's name (as in its certificate).
        name: String,
        /// The gateway's admin address (HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr)]
        admin: std::net::SocketAddr,
    },
}

/// An admin API address: `host:port`, a name resolved now.
fn admin_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[derive(Subcommand)]
enum Command {
    /// Manage the mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run a node proxy (or, with `revoke`, manage nodes).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        /// Config files, layered in order (later ones override earlier ones).
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
        /// Enroll with the gateway's control listener (UDP address) first, if this node has no
        /// certificate yet; also the control plane to join when the config names none.
        #[arg(long, requires_all = ["token", "ca_fingerprint"])]
        join: Option<std::net::SocketAddr>,
        /// Join token from `quicmesh token create`.
        #[arg(long, env = "QUICMESH_JOIN_TOKEN", hide_env_values = true, requires = "join")]
        token: Option<String>,
        /// SHA-256 of the mesh CA certificate (`quicmesh ca fingerprint`), to trust the gateway.
        #[arg(long, requires = "join")]
        ca_fingerprint: Option<String>,
        /// Exit when standard input closes (the demo's children: they end with the demo).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the edge gateway.
    Gateway {
        /// Config files, layered in order (later ones override earlier ones).
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
        /// Exit when standard input closes (the demo's children: they end with the demo).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
    /// Validate config files offline, with the daemons' own start-up checks (same messages), or
    /// with --live check a running mesh through the gateway's admin API.
    Check {
        /// Config files, layered in order, as given to the daemon.
        #[arg(long = "config", short = 'c', required_unless_present = "live")]
        config: Vec<PathBuf>,
        /// Check the running mesh: nodes connected and on the current snapshot, certificates not
        /// near expiry, peers reachable, config changes not refused.
        #[arg(long, conflicts_with = "config")]
        live: bool,
        /// The gateway's admin address (HOST:PORT), for --live.
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr, requires = "live")]
        admin: std::net::SocketAddr,
        /// With --live, keep checking until all passes or this much time is over (e.g. 30s).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, requires = "live")]
        wait: std::time::Duration,
        /// With --live, fail until at least this many nodes are connected (a mesh still coming up
        /// otherwise looks healthy with the nodes that joined first).
        #[arg(long, default_value_t = 0, requires = "live")]
        nodes: usize,
    },
    /// Explain the configuration files offline.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run a sample app (plain HTTP on loopback, for trying the mesh by hand).
    Sample {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: std::net::SocketAddr,
        /// `hello` answers "hello from VERSION on NODE"; `echo` answers the request as JSON.
        #[arg(long, default_value = "hello", value_parser = ["hello", "echo"])]
        kind: String,
        /// The version `hello` names.
        #[arg(long, default_value = "v1")]
        version: String,
        /// The node `hello` names.
        #[arg(long, default_value = "local")]
        node: String,
    },
    /// Run a whole mesh on loopback: gateway, two nodes and sample services.
    Demo(demo::Args),
    /// Show the nodes as the gateway sees them: connected, instances, health, snapshot.
    Status {
        /// The gateway's admin address (HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr)]
        admin: std::net::SocketAddr,
        /// Output format.
        #[arg(long, short = 'o', default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Requests as they complete, from the gateway and every node it lists (as `linkerd viz
    /// tap`): method, authority, path, status, duration, source, destination, route, retries.
    Tap {
        /// The gateway's admin address, HOST:PORT (or a node's, for that node alone).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr)]
        admin: std::net::SocketAddr,
        /// Only requests to this service.
        #[arg(long)]
        service: Option<String>,
        /// Only requests from this service.
        #[arg(long)]
        from: Option<String>,
        /// Only requests that took this route.
        #[arg(long)]
        route: Option<String>,
        /// Only this method.
        #[arg(long)]
        method: Option<String>,
        /// Only paths that start with this.
        #[arg(long)]
        path: Option<String>,
        /// Only this status: a code (503), a class (5xx), or `error` (5xx or a proxy's own answer).
        #[arg(long)]
        status: Option<String>,
        /// Events a second at most (1 to 1000); what is left out is counted.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Stop after this many requests (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Output format: one line of text, or one JSON object, per request.
        #[arg(long, short = 'o', default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// A live table per caller and service: request rate, success rate, p50 and p99 latency.
    Top {
        /// The gateway's admin address, HOST:PORT (the nodes it lists are read too).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr)]
        admin: std::net::SocketAddr,
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print this many tables, then exit (default: until interrupted).
        #[arg(long)]
        count: Option<u32>,
        /// One row per: caller and service, service and route, or node (where requests enter the
        /// mesh) and service.
        #[arg(long, value_enum, default_value = "service")]
        by: top::By,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The value of KEY (dotted, e.g. timeouts.connect) and the layer that set it: a file, an
    /// environment variable or the built-in default. A running node's /config_dump says the
    /// same, with what the control plane pushed.
    Explain {
        /// A dotted key, e.g. timeouts.connect or node.tls.state_dir.
        key: String,
        /// Config files, layered in order, as given to the daemon.
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Apply mesh-wide config (services, routes, timeouts, authorization, nodes, revoked) to
    /// gateway replicas that share etcd: the replica checks FILEs, layered in order over its own
    /// files, and writes them to etcd as the next version; every replica takes them from there.
    /// A bad change is refused before it reaches etcd.
    Apply {
        /// TOML files, layered in order (later ones override earlier ones).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A gateway replica's admin address (HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = admin_addr)]
        admin: std::net::SocketAddr,
    },
    /// Print the reference of every config key (type, default, when it applies, what it does),
    /// generated from the config types: docs/config.md is its output.
    Reference,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token (stored hashed; printed once): in the gateway's state directory
    /// (`--dir`), or through a running gateway's admin API (`--admin`), which keeps it in etcd
    /// when the gateway has replicas, so any replica redeems it.
    #[command(group = clap::ArgGroup::new("where").required(true).args(["dir", "admin"]))]
    Create {
        /// The gateway's state directory (holds the CA).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A gateway's admin address (HOST:PORT).
        #[arg(long, value_parser = admin_addr)]
        admin: Option<std::net::SocketAddr>,
        /// How long the token stays valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many nodes may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Only this node name may use it.
        #[arg(long)]
        node: Option<String>,
        /// With `--admin`: wait up to this long for a gateway that is not up yet (or whose
        /// etcd is not), e.g. 30s.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA in a state directory.
    Init {
        /// The state directory to create the CA in (ca.pem, ca.key, trust-domain).
        #[arg(long)]
        dir: PathBuf,
        /// The mesh's trust domain: every identity is spiffe://<trust-domain>/node/<name>;
        /// configs say the same in mesh.trust_domain.
        #[arg(long, default_value = "quicmesh.local")]
        trust_domain: String,
        /// Succeed, changing nothing, when the directory already holds a CA of this trust
        /// domain (for provisioning steps that run at every start: containers, init scripts).
        #[arg(long)]
        if_missing: bool,
        /// Then issue a member certificate (as `ca issue`), for each one named: one step that
        /// leaves a directory ready for a whole demo mesh.
        #[arg(long, value_name = "NAME")]
        issue: Vec<String>,
        /// Validity of the certificates `--issue` makes, in days.
        #[arg(long, default_value_t = DEFAULT_NODE_VALIDITY.as_secs() / 86400, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Issue a member certificate with identity spiffe://<trust-domain>/node/<NAME>.
    Issue {
        /// The CA's state directory; the certificate and key are written there too.
        #[arg(long)]
        dir: PathBuf,
        /// The member's name (a-z, 0-9, '-'): a node's, or the gateway's (`gateway`). Repeat
        /// it to issue several.
        #[arg(long, required = true)]
        node: Vec<String>,
        /// Validity in days (1 to 3650). Nodes joined to the control plane renew theirs.
        #[arg(long, default_value_t = DEFAULT_NODE_VALIDITY.as_secs() / 86400, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Print the SHA-256 fingerprint of the CA certificate (for `node --ca-fingerprint`).
    Fingerprint {
        /// The CA's state directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Most log lines waiting for stderr; past that, new lines are dropped and counted. The
/// writer's queue is allocated whole (32 bytes a line), so this stays small: 32 KiB.
const LOG_BUFFER_LINES: usize = 1024;

/// Logs go to stderr through a writer thread, so that a slow or stuck stderr (a full pipe, a
/// paused terminal) never stalls the proxy: a node runs its data path on one thread. When the
/// buffer is full, lines are dropped and counted (`quicmesh_log_dropped_total`). The guard
/// flushes what is buffered when it is dropped.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{reload, EnvFilter};
    let filter = EnvFilter::try_from_env("QUICMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = std::env::var("QUICMESH_LOG_FORMAT").is_ok_and(|v| v == "json");
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    quicmesh_shared::telemetry::metrics::count_log_drops(move || dropped.dropped_lines() as u64);
    // Colour only for a person at a terminal, and never under NO_COLOR (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(colour);
    if json {
        tracing_subscriber::registry().with(filter).with(fmt.json()).init();
    } else {
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
    // The admin API's `/logging` reads and replaces the filter while the process runs.
    quicmesh_shared::admin::set_log_control(Box::new(move |new: Option<&str>| {
        if let Some(spec) = new {
            let next = EnvFilter::try_new(spec).map_err(|e| format!("bad filter {spec:?}: {e}"))?;
            handle.reload(next).map_err(|e| e.to_string())?;
            tracing::info!(filter = spec, "log filter changed through the admin API");
        }
        handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())
    }));
    guard
}

/// mimalloc instead of glibc's malloc: under load, a quarter of the proxies' CPU went to
/// glibc's allocator (see BENCHMARKS.md); through its plain calls where they align enough
/// ([`alloc`]).
#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

/// Hands the pages the calling thread freed back to the system now (mimalloc keeps them for
/// that thread's next allocations, and purges only as it allocates).
#[allow(unsafe_code)]
fn release_memory() {
    // SAFETY: `mi_collect` only walks and frees the allocator's own free pages; it takes no
    // pointer and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quicmesh_shared::runtime::set_memory_release(release_memory);
    let logging = init_logging();
    let result = run(cli);
    // Everything logged reaches stderr before the exit status (and any error) does.
    drop(logging);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quicmesh: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: most of our errors already quote their
/// source, which the chain would otherwise print a second time.
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca { command: CaCommand::Init { dir, trust_domain, if_missing, issue, days } } => {
            let ca = if if_missing && dir.join("ca.key").exists() {
                let ca = Ca::open(&dir)?;
                anyhow::ensure!(
                    ca.trust_domain == trust_domain,
                    "{}: holds a CA for trust domain {}, not {trust_domain}",
                    dir.display(),
                    ca.trust_domain
                );
                println!("CA for trust domain {} already in {}", ca.trust_domain, dir.display());
                ca
            } else {
                let ca = Ca::init(&dir, &trust_domain)?;
                println!("created CA for trust domain {} in {}", ca.trust_domain, dir.display());
                ca
            };
            println!("CA fingerprint (sha256): {}", ca.fingerprint());
            for node in issue {
                issue_offline(&ca, &dir, &node, days)?;
            }
            Ok(())
        }
        Command::Ca { command: CaCommand::Fingerprint { dir } } => {
            println!("{}", Ca::open(&dir)?.fingerprint());
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { dir, admin, ttl, uses, node, wait } } => {
            match (dir, admin) {
                (Some(dir), _) => {
                    println!("{}", quicmesh_shared::control::enroll::create_token(&dir, ttl, uses, node)?)
                }
                (None, Some(admin)) => {
                    let mut query = format!("ttl={}s&uses={uses}", ttl.as_secs());
                    if let Some(n) = node {
                        query.push_str(&format!("&node={}", top::escape(&n)));
                    }
                    print!(
                        "{}",
                        runtime()?.block_on(top::post_waiting(admin, "/tokens", &query, Default::default(), wait))?
                    );
                }
                (None, None) => anyhow::bail!("say where the token is kept: --dir or --admin"),
            }
            Ok(())
        }
        Command::Ca { command: CaCommand::Issue { dir, node, days } } => {
            let ca = Ca::open(&dir)?;
            for node in node {
                issue_offline(&ca, &dir, &node, days)?;
            }
            Ok(())
        }
        Command::Check { live: true, admin, wait, nodes, .. } => {
            let (report, passed) = runtime()?.block_on(live::check(admin, wait, nodes));
            print!("{report}");
            anyhow::ensure!(passed, "the live check failed");
            Ok(())
        }
        Command::Config { command: ConfigCommand::Apply { files, admin } } => {
            let mut layers = Vec::new();
            for file in &files {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                layers.push(config::Layer { name: file.display().to_string(), text });
            }
            let body = serde_json::json!({ "layers": layers }).to_string();
            let rt = runtime()?;
            print!("{}", rt.block_on(top::post_waiting(admin, "/config", "", body.into(), std::time::Duration::ZERO))?);
            Ok(())
        }
        Command::Config { command: ConfigCommand::Reference } => {
            print!("{}", config::reference::markdown());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Explain { key, config } } => {
            match config::explain(&config, &key)? {
                Some((value, layer)) => println!("{key} = {value}\n  set by: {layer}"),
                None => anyhow::bail!("no layer sets {key}, and it has no default (is it spelled as in the README?)"),
            }
            Ok(())
        }
        Command::Sample { listen, kind, version, node } => runtime()?.block_on(async {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (--listen sets it)"))?;
            println!("sample {kind} app listening on http://{}", listener.local_addr()?);
            match kind.as_str() {
                "echo" => quicmesh::samples::echo(listener).await,
                _ => quicmesh::samples::hello(listener, version, node).await,
            }
            Ok(())
        }),
        Command::Check { config, .. } => {
            // The daemons' own checks, in the order they run them, short of binding sockets.
            let mut cfg = config::load(&config)?;
            anyhow::ensure!(
                cfg.node.is_some() || cfg.gateway.is_some(),
                "the config has neither a [node] nor a [gateway] section: nothing would run it"
            );
            let mut lines = Vec::new();
            if cfg.gateway.is_some() {
                let pre = quicmesh_gateway::preflight(&mut cfg)?;
                let gc = cfg.gateway.as_ref().context("the config has no [gateway] section")?;
                lines.push(format!(
                    "gateway {}: {} routes, {} listeners on {} ports, {} node overlays, {} edge certificates, admin on {}{}",
                    gc.name,
                    gc.routes.len(),
                    pre.ports.iter().map(|p| p.names.len()).sum::<usize>(),
                    pre.ports.len(),
                    pre.node_settings.len(),
                    gc.certificates.len(),
                    gc.admin,
                    if pre.admin_token.is_some() { " (token required)" } else { "" }
                ));
            }
            if cfg.node.is_some() {
                if quicmesh_node::trust_domain_unset(&config) {
                    quicmesh_node::adopt_trust_domain(&mut cfg);
                }
                let pre = quicmesh_node::preflight(&cfg)?;
                let nc = cfg.node.as_ref().context("the config has no [node] section")?;
                lines.push(format!("node {}: {}", nc.name, pre.mode));
            }
            println!("config OK: {} services, {} nodes", cfg.services.len(), cfg.nodes.len());
            for line in lines {
                println!("  {line}");
            }
            for warning in cfg.warnings() {
                println!("  warning: {warning}");
            }
            Ok(())
        }
        Command::Node { action: Some(NodeAction::Revoke { name, admin }), .. } => {
            print!("{}", runtime()?.block_on(top::revoke(admin, &name))?);
            Ok(())
        }
        Command::Node { action: None, config, join, token, ca_fingerprint, exit_with_parent } => {
            if exit_with_parent {
                exit_when_stdin_closes();
            }
            let mut cfg = config::load(&config)?;
            let learn_trust_domain = quicmesh_node::trust_domain_unset(&config);
            let workers = cfg.node.as_ref().map_or(1, |n| n.workers);
            run_proxy(workers, async {
                // Listened for from here on: a SIGTERM while the node enrolls or starts (a
                // Kubernetes pod deleted early) stops it, rather than being lost.
                let mut stop = demo::Shutdown::listen();
                quicmesh_shared::telemetry::metrics::recorder();
                quicmesh_shared::runtime::publish_workers();
                if let (Some(addr), Some(token), Some(fp)) = (join, token, ca_fingerprint) {
                    let node = cfg.node.as_mut().context("the config has no [node] section")?;
                    let target = node.gateway.get_or_insert(quicmesh_shared::config::ControlTarget {
                        address: addr.into(),
                        name: "gateway".into(),
                        replicas: Vec::new(),
                    });
                    let name = target.name.clone();
                    tracing::info!(gateway = %addr, "enrolling with the gateway (unless this node holds a certificate)");
                    // A gateway that is not up yet is waited for; any other refusal is final.
                    let mut wait = std::time::Duration::from_secs(1);
                    loop {
                        let attempt = tokio::select! {
                            r = quicmesh_node::enroll::join(&cfg, addr, &name, &token, &fp, learn_trust_domain) => r,
                            _ = stop.wait() => anyhow::bail!("stopped while enrolling with the gateway at {addr}"),
                        };
                        match attempt {
                            Err(quicmesh_node::enroll::JoinError::NoAnswer(_)) => {
                                tracing::warn!(gateway = %addr, retry_in = ?wait, "the gateway does not answer; waiting for it and retrying (Ctrl-C stops)");
                                tokio::select! {
                                    _ = tokio::time::sleep(wait) => {}
                                    _ = stop.wait() => anyhow::bail!("stopped while waiting for the gateway at {addr}"),
                                }
                                wait = (wait * 2).min(std::time::Duration::from_secs(10));
                            }
                            other => {
                                other?;
                                break;
                            }
                        }
                    }
                }
                if learn_trust_domain {
                    quicmesh_node::adopt_trust_domain(&mut cfg);
                }
                let node = quicmesh_node::start_with_files(cfg, config).await?;
                // What the config's parse and the table's compile freed goes back to the
                // system, not kept as the idle node's size.
                quicmesh_shared::runtime::release_memory_soon();
                let a = &node.addrs;
                let tcp: String = a.tcp.iter().map(|(s, addr)| format!(" tcp.{s}={addr}")).collect();
                println!(
                    "quicmesh node {} ready: outbound={} inbound={} admin={}{tcp}",
                    a.name, a.outbound, a.inbound, a.admin
                );
                stop.wait().await;
                node.drain().await;
                Ok(())
            })
        }
        Command::Gateway { config, exit_with_parent } => {
            if exit_with_parent {
                exit_when_stdin_closes();
            }
            let cfg = config::load(&config)?;
            run_proxy(cfg.gateway.as_ref().map_or(0, |g| g.workers), async {
                quicmesh_shared::telemetry::metrics::recorder();
                let mut stop = demo::Shutdown::listen();
                quicmesh_shared::runtime::publish_workers();
                let gw = quicmesh_gateway::start_with_files(cfg, config).await?;
                quicmesh_shared::runtime::release_memory_soon();
                let a = &gw.addrs;
                let tcp: String = a.tcp.iter().map(|(s, addr)| format!(" tcp.{s}={addr}")).collect();
                let listeners: String = a.listeners.iter().map(|(n, addr)| format!(" listener.{n}={addr}")).collect();
                println!(
                    "quicmesh gateway ready: listen={} admin={} control={}{tcp}{listeners}",
                    a.listen, a.admin, a.control
                );
                stop.wait().await;
                gw.drain().await;
                Ok(())
            })
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Status { admin, output } => {
            print!("{}", runtime()?.block_on(top::status(admin, output == "json"))?);
            Ok(())
        }
        Command::Tap { admin, service, from, route, method, path, status, rate, count, output } => {
            let filter = [
                ("service", service),
                ("from", from),
                ("route", route),
                ("method", method),
                ("path", path),
                ("status", status),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .chain([("rate".to_string(), rate.to_string())])
            .collect::<Vec<_>>();
            runtime()?.block_on(tap::tap(admin, &filter, count, output == "json"))
        }
        Command::Top { admin, interval, count, by } => runtime()?.block_on(top::top(admin, interval, count, by)),
    }
}

/// Issues `node` a certificate for `days` into the CA's directory, and notes it there, so that
/// the gateway does not let an unbound join token claim the name while the certificate holds.
fn issue_offline(ca: &Ca, dir: &std::path::Path, node: &str, days: u64) -> anyhow::Result<()> {
    let validity = std::time::Duration::from_secs(days.saturating_mul(86400));
    let (cert, key) = ca.issue(node, validity)?;
    let until =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().saturating_add(validity);
    quicmesh_shared::control::enroll::record_issued(dir, node, until.as_secs())?;
    println!("issued spiffe://{}/node/{node}: {} {}", ca.trust_domain, cert.display(), key.display());
    Ok(())
}

/// Ends the process when standard input reaches its end: the parent that holds the other end
/// (the demo) is gone, however it ended.
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

/// The runtime of the commands and of the demo's supervisor (its gateway and nodes are
/// processes of their own, each on [`run_proxy`]): a work-stealing one, a thread per core.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Runs a node or gateway process until `work` ends, on `workers` threads (0: one per core):
/// as many single-threaded event loops, client connections dealt out among them
/// (`quicmesh_shared::runtime`); then stops them all, the main one first.
fn run_proxy(workers: usize, work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let result = quicmesh_shared::runtime::build(workers).context("starting the async runtime")?.block_on(work);
    quicmesh_shared::runtime::shutdown();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, flag and argument says what it is for in `--help`.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(format!("{path} (the command)"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), "", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    /// Every size and alignment a program asks for gets a block it can use whole, aligned as
    /// asked, through each of the four calls, across the plain calls' bounds (16 bytes of
    /// alignment, the alignment no larger than the size, mimalloc's 1 KiB small blocks), and a
    /// resized block keeps its data.
    #[test]
    #[allow(unsafe_code)]
    fn every_block_is_aligned_and_whole_through_each_call() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = crate::alloc::MiMalloc;
        let sizes = [1usize, 2, 7, 8, 9, 15, 16, 17, 24, 40, 48, 100, 1000, 1024, 1025, 4000, 5104, 70_000];
        for &size in &sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is written within its size and freed once,
                // with the layout it was made (or resized) with.
                unsafe {
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "alloc_zeroed({size}, {align})");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    a.dealloc(z, layout);
                    for &new in &sizes {
                        let p = a.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "alloc({size}, {align})");
                        std::ptr::write_bytes(p, 0xa5, size);
                        let q = a.realloc(p, layout, new);
                        assert!(!q.is_null());
                        assert_eq!(q as usize % align, 0, "realloc({size} -> {new}, {align})");
                        let kept = std::slice::from_raw_parts(q, size.min(new));
                        assert!(kept.iter().all(|b| *b == 0xa5), "realloc({size} -> {new}, {align}) lost data");
                        std::ptr::write_bytes(q, 0x5a, new);
                        a.dealloc(q, Layout::from_size_align(new, align).unwrap());
                    }
                }
            }
        }
    }
}
