//! Control-plane propagation: time from a config change at the gateway (a file write) to the
//! new version being active at every one of 50 nodes, for a mesh of 1000 services and 10000
//! endpoints. The gateway runs as a process of the release binary (its RSS is read from /proc);
//! the 50 nodes run in this process (their memory is the growth of this process's RSS).
//!
//! Two kinds of change are timed: a config file edit (service 0 gets a new host alias) and an
//! endpoint change (one node registers, then removes, an extra instance of service 0).
//!
//! With `BENCH_REPLICAS=3` the control plane is three gateway replicas sharing their registry
//! through etcd (Debian's `etcd-server`, started by the bench); node i attaches to replica
//! i mod 3, so an endpoint change travels node -> its replica -> etcd -> every replica -> nodes.
//!
//! Run: `cargo bench --bench propagation` (env: BENCH_NODES=50, BENCH_SERVICES=1000,
//! BENCH_ENDPOINTS=10000, BENCH_CHANGES=20, BENCH_REPLICAS=1).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use quicmesh_shared::config;
use quicmesh_shared::control::Instance;
use support::*;

fn mesh_file(services: usize, change: usize) -> String {
    let mut t = format!("[mesh]\ntrust_domain = \"{TD}\"\n\n");
    for s in 0..services {
        // The change under test: service 0's alias names the change number.
        let alias = if s == 0 { format!("alias-{change}") } else { format!("svc-{s}.mesh") };
        t.push_str(&format!("[[services]]\nname = \"svc-{s}\"\nhosts = [\"{alias}\"]\n\n"));
    }
    t
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    bench_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let n_nodes = env_or("BENCH_NODES", 50);
        let n_services = env_or("BENCH_SERVICES", 1000);
        let n_endpoints = env_or("BENCH_ENDPOINTS", 10000);
        let changes = env_or("BENCH_CHANGES", 20);
        let n_replicas: usize = env_or("BENCH_REPLICAS", 1);
        let etcd = if n_replicas > 1 {
            Some(support::etcd::Etcd::start().await.expect("BENCH_REPLICAS > 1 needs etcd (Debian etcd-server)"))
        } else {
            None
        };
        let pki = Pki::new();
        let state = pki.issue("gateway");
        let mesh = pki.path().join("mesh.toml");
        std::fs::write(&mesh, mesh_file(n_services, 0)).unwrap();
        let gw_file = pki.path().join("gateway.toml");
        std::fs::write(
            &gw_file,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\nwatch_interval = \"10ms\"\n[gateway.tls]\nstate_dir = \"{}\"\n{}",
                state.display(),
                etcd.as_ref().map_or(String::new(), |e| format!("[gateway.store]\netcd = [{}]\n", e.endpoints_toml())),
            ),
        )
        .unwrap();
        let replicas: Vec<NodeProc> =
            (0..n_replicas).map(|_| NodeProc::start_layered("gateway", &[mesh.clone(), gw_file.clone()])).collect();
        let gw = &replicas[0];
        let gw_idle = gw.rss_kib();
        let before = proc_status_kib(std::process::id(), "VmRSS");
        let mut nodes = Vec::new();
        let mut registered = Vec::new();
        let per_node = n_endpoints / n_nodes;
        for i in 0..n_nodes {
            let name = format!("node-{i:02}");
            pki.issue(&name);
            let mut t = node_toml(&name, &state, &[], "");
            let others: Vec<String> = (1..n_replicas)
                .map(|k| format!("\"{}\"", replicas[(i + k) % n_replicas].addrs.control))
                .collect();
            t.push_str(&format!(
                "\n[node.gateway]\naddress = \"{}\"\nreplicas = [{}]\n",
                replicas[i % n_replicas].addrs.control,
                others.join(", ")
            ));
            for k in 0..per_node {
                let svc = (i * per_node + k) % n_services;
                let port = 10000 + (i * per_node + k) % 50000;
                t.push_str(&format!("[[node.instances]]\nservice = \"svc-{svc}\"\naddress = \"127.0.0.{}:{port}\"\n", 1 + i % 200));
            }
            let cfg = config::from_toml(&t).unwrap();
            registered.push(cfg.node.as_ref().unwrap().instances.clone());
            nodes.push(quicmesh_node::start(cfg).await.unwrap());
        }
        // Wait for the full mesh: every node sees every endpoint.
        let full = Instant::now();
        loop {
            let done = nodes.iter().all(|n| {
                let t = n.mesh.table();
                (0..n_services).map(|s| t.service(&format!("svc-{s}")).map_or(0, |s| s.config.endpoints.len())).sum::<usize>()
                    == per_node * n_nodes
            });
            if done {
                break;
            }
            assert!(full.elapsed() < Duration::from_secs(300), "mesh never converged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let converge = full.elapsed();
        let after = proc_status_kib(std::process::id(), "VmRSS");
        let mut times = Vec::new();
        for change in 1..=changes {
            let alias = format!("alias-{change}");
            let t0 = Instant::now();
            std::fs::write(&mesh, mesh_file(n_services, change)).unwrap();
            loop {
                if nodes.iter().all(|n| n.mesh.table().service_for_host(&alias).is_some()) {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "change {change} never arrived everywhere");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            times.push(t0.elapsed());
        }
        times.sort();
        // Endpoint changes: node k registers an extra instance of svc-0, or removes it again.
        // Bytes pushed by every replica, by kind.
        let pushed_all = || async {
            let mut sums = (0.0, 0.0);
            for r in &replicas {
                let text = r.metrics().await;
                let kind = |k| metric(&text, "quicmesh_control_push_bytes_total", &[("kind", k)]);
                sums.0 += kind("delta");
                sums.1 += kind("snapshot");
            }
            sums
        };
        let before_ep = pushed_all().await;
        let mut ep_times = Vec::new();
        for change in 0..changes * 2 {
            let k = (change / 2) % n_nodes;
            let extra: std::net::SocketAddr = ([127, 1, 0, 1], 20000 + (change / 2) as u16).into();
            let add = change % 2 == 0;
            let mut instances = registered[k].clone();
            if add {
                instances.push(Instance {
                    service: "svc-0".into(),
                    address: extra,
                    protocol: config::Protocol::Http1,
                    labels: Default::default(),
                    health: None,
                });
            }
            let t0 = Instant::now();
            assert!(nodes[k].set_instances(instances));
            loop {
                let seen = |n: &quicmesh_node::Node| {
                    n.mesh.table().service("svc-0").is_some_and(|s| s.config.endpoints.iter().any(|e| e.address == extra))
                };
                if nodes.iter().all(|n| seen(n) == add) {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "endpoint change {change} never arrived everywhere");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ep_times.push(t0.elapsed());
        }
        ep_times.sort();
        let after_ep = pushed_all().await;
        let ep_changes = (changes * 2 * n_nodes) as f64;
        let delta_bytes = (after_ep.0 - before_ep.0) / ep_changes;
        let whole_bytes = after_ep.1 - before_ep.1;
        let gw_rss = gw.rss_kib();
        let gw_peak = gw.peak_rss_kib();
        let control = if n_replicas > 1 { format!("{n_replicas} gateway replicas on etcd") } else { "one gateway".into() };
        println!("\nControl-plane propagation: {n_nodes} nodes, {n_services} services, {} endpoints, {changes} changes, {control}", per_node * n_nodes);
        println!("| figure | value |");
        println!("|---|---|");
        println!("| initial convergence (all nodes registered, every node sees every endpoint) | {converge:.2?} |");
        println!("| config file change -> active at all nodes, p50 | {:.2?} |", pct(&times, 0.5));
        println!("| config file change -> active at all nodes, p99 | {:.2?} |", pct(&times, 0.99));
        println!("| config file change -> active at all nodes, min / max | {:.2?} / {:.2?} |", times[0], times[times.len() - 1]);
        println!("| endpoint change -> active at all nodes, p50 | {:.2?} |", pct(&ep_times, 0.5));
        println!("| endpoint change -> active at all nodes, p99 | {:.2?} |", pct(&ep_times, 0.99));
        println!("| endpoint change -> active at all nodes, min / max | {:.2?} / {:.2?} |", ep_times[0], ep_times[ep_times.len() - 1]);
        println!("| bytes pushed per endpoint change, per node (deltas) / whole snapshots sent meanwhile | {delta_bytes:.0} B / {whole_bytes:.0} B |");
        println!("| gateway (replica 1) RSS idle / with the mesh / peak | {:.1} / {:.1} / {:.1} MB |", gw_idle as f64 / 1024.0, gw_rss as f64 / 1024.0, gw_peak as f64 / 1024.0);
        println!("| gateway RSS per node (with the mesh - idle) / nodes | {:.2} MB |", (gw_rss.saturating_sub(gw_idle)) as f64 / 1024.0 / n_nodes as f64);
        println!("| per-node memory (bench RSS growth / nodes) | {:.2} MB |", (after.saturating_sub(before)) as f64 / 1024.0 / n_nodes as f64);
        println!("(config files: file-system events, with a 10 ms poll underneath; included in the figures)");
        for n in nodes {
            n.shutdown().await;
        }
    });
}
