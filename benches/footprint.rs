//! Memory per endpoint and per route: a node and a gateway started (release binary) with the
//! smallest mesh (one service of ten instances), with N endpoints (N/10 services of 10 instances each), and with N routes, each
//! measured as RSS once ready and settled; the cost of one endpoint or route is the growth over
//! the smallest start divided by N. Several starts per case, medians (RSS of a fresh process
//! varies by a few hundred KiB).
//!
//! It also splits the one-service RSS into anonymous memory (heap, stacks: what the process
//! made) and file-backed pages (of which the binary's own code and read-only data, which the
//! kernel maps in around each page the process touches and shares with the page cache).
//!
//! Run: `cargo bench --bench footprint` (env: BENCH_ITEMS, default 10000; BENCH_ROUNDS,
//! default 3). JSON goes to `BENCH_JSON` (default `target/bench-footprint.json`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// N endpoints: N/10 services with 10 instances each, all on node-b.
fn endpoints(n: usize) -> String {
    let mut t = String::from("[[nodes]]\nname = \"node-b\"\naddress = \"127.0.0.1:9\"\n");
    for s in 0..n / 10 {
        t.push_str(&format!("[[services]]\nname = \"svc-{s}\"\n"));
        for e in 0..10 {
            t.push_str(&format!(
                "[[services.endpoints]]\nnode = \"node-b\"\naddress = \"10.{}.{}.{}:8080\"\n",
                s / 250,
                s % 250,
                e + 1
            ));
        }
    }
    t
}

/// N mesh routes (nodes) or gateway routes (`table` = "gateway.routes"), each with its own
/// hostname and a path match, all to one service.
fn routes(n: usize, table: &str) -> String {
    let mut t = String::from("[[services]]\nname = \"target\"\n");
    for r in 0..n {
        t.push_str(&format!(
            "[[{table}]]\nname = \"r{r}\"\nhostnames = [\"host-{r}.example\"]\n[[{table}.rules]]\n\
             matches = [{{ path = {{ type = \"PathPrefix\", value = \"/api/{r}\" }} }}]\nbackendRefs = [{{ name = \"target\" }}]\n"
        ));
    }
    t
}

/// RSS of a freshly started process once it holds still (two reads 200 ms apart within 64 KiB).
fn settled_rss(p: &NodeProc) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = p.rss_kib();
    loop {
        // Polling a value that has no event to wait on: the interval is the measurement.
        std::thread::sleep(Duration::from_millis(200));
        let now = p.rss_kib();
        if now.abs_diff(last) < 64 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn start(kind: &str, dir: &Path, state: &Path, extra: &str) -> NodeProc {
    if kind == "node" {
        NodeProc::start(dir, "node-a", &node_toml("node-a", state, &[], extra))
    } else {
        let toml = format!(
            "[mesh]\ntrust_domain = \"{TD}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\n\
             [gateway.tls]\nstate_dir = \"{}\"\n{extra}",
            state.display()
        );
        NodeProc::start_gateway(dir, &toml)
    }
}

/// A node joined to a gateway whose config holds `services`: the node's mesh comes from the
/// gateway's snapshot, as in a fleet. Returns the node once it applied one, and the gateway.
fn joined(dir: &Path, state: &Path, services: &str, rt: &tokio::runtime::Runtime) -> (NodeProc, NodeProc) {
    // No snapshot cached by an earlier start: the node starts empty and takes this gateway's.
    for cached in std::fs::read_dir(state).unwrap().filter_map(Result::ok) {
        if cached.file_name().to_string_lossy().starts_with("node-a.snapshot") {
            let _ = std::fs::remove_file(cached.path());
        }
    }
    let gw = start("gateway", dir, state, services);
    let node = NodeProc::start(dir, "node-a", &joined_toml("node-a", state, gw.addrs.control, ""));
    let version = "quicmesh_control_snapshot_version";
    rt.block_on(eventually(Duration::from_secs(30), "the node to apply the gateway's snapshot", || async {
        let published = metric(&gw.metrics().await, version, &[]);
        (published > 0.0 && metric(&node.metrics().await, version, &[]) == published).then_some(())
    }));
    (node, gw)
}

/// A process's RSS apart (KiB): anonymous, file-backed, and of the file-backed the pages of
/// its own executable.
fn rss_split(p: &NodeProc) -> [u64; 3] {
    let pid = p.child.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut binary, mut in_binary) = (0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            // A mapping's header: "start-end perms offset dev inode [path]".
            Some(first) if first.contains('-') && !first.ends_with(':') => {
                in_binary = words.nth(4).is_some_and(|path| Path::new(path) == exe);
            }
            Some("Rss:") if in_binary => binary += words.next().and_then(|kib| kib.parse::<u64>().ok()).unwrap_or(0),
            _ => {}
        }
    }
    [proc_status_kib(pid, "RssAnon"), proc_status_kib(pid, "RssFile"), binary]
}

/// Of the functions `link/symbol-order.txt` lists, how many the binary has: (found, listed).
fn order_coverage() -> Option<(usize, usize)> {
    let listed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/link/symbol-order.txt")).ok()?;
    let out = std::process::Command::new("nm").args(["--defined-only", bin()]).output().ok()?;
    let names = String::from_utf8_lossy(&out.stdout);
    let have: std::collections::HashSet<&str> = names.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let listed: Vec<&str> = listed.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    Some((listed.iter().filter(|l| have.contains(*l)).count(), listed.len()))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    bench_logging();
    let n = env_or("BENCH_ITEMS", 10_000usize);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("gateway");
    let mut report = serde_json::Map::new();
    // Per process kind: the one-service starts' RSS split (anonymous, file, binary), medians.
    let mut splits: Vec<(&str, [u64; 3])> = Vec::new();
    println!("\nRSS once started and settled, medians of {rounds} starts; per item = growth over one service (10 endpoints), per item added");
    println!("| process | one service | {n} endpoints | per endpoint | {n} routes | per route |");
    println!("|---|---|---|---|---|---|");
    for kind in ["node", "gateway"] {
        let route_table = if kind == "node" { "routes" } else { "gateway.routes" };
        // The smallest mesh a node accepts (it refuses to start with nothing to serve): one
        // service of ten instances.
        let cases = [endpoints(10), endpoints(n), routes(n, route_table)];
        let mut rss = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let (mut runs, mut split) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
            for _ in 0..rounds {
                let p = start(kind, pki.path(), &state, case);
                runs.push(settled_rss(&p));
                if i == 0 {
                    for (all, one) in split.iter_mut().zip(rss_split(&p)) {
                        all.push(one);
                    }
                }
            }
            rss.push(median(runs));
            if i == 0 {
                splits.push((kind, split.map(median)));
            }
        }
        // endpoints(n) makes n/10 services of 10 each; the base case has 10 of them already.
        let count = [1, (n / 10 * 10).saturating_sub(10), n];
        let per = |i: usize| (rss[i].saturating_sub(rss[0])) as f64 * 1024.0 / count[i].max(1) as f64;
        println!(
            "| {kind} | {:.1} MB | {:.1} MB | {:.0} bytes | {:.1} MB | {:.0} bytes |",
            rss[0] as f64 / 1024.0,
            rss[1] as f64 / 1024.0,
            per(1),
            rss[2] as f64 / 1024.0,
            per(2)
        );
        report.insert(
            kind.into(),
            serde_json::json!({
                "one_service_kib": rss[0], "endpoints_kib": rss[1], "routes_kib": rss[2],
                "bytes_per_endpoint": per(1), "bytes_per_route": per(2),
            }),
        );
    }
    // The issue's case: the node's endpoints come in the gateway's snapshot, not its own file.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut rss = Vec::new();
    for case in [endpoints(10), endpoints(n)] {
        let mut runs = Vec::new();
        for _ in 0..rounds {
            let (node, _gw) = joined(pki.path(), &state, &case, &rt);
            runs.push(settled_rss(&node));
        }
        rss.push(median(runs));
    }
    let per = (rss[1].saturating_sub(rss[0])) as f64 * 1024.0 / (n / 10 * 10).saturating_sub(10).max(1) as f64;
    println!(
        "| node, from the gateway's snapshot | {:.1} MB | {:.1} MB | {per:.0} bytes | - | - |",
        rss[0] as f64 / 1024.0,
        rss[1] as f64 / 1024.0
    );
    report.insert(
        "node_from_snapshot".into(),
        serde_json::json!({ "one_service_kib": rss[0], "endpoints_kib": rss[1], "bytes_per_endpoint": per }),
    );
    println!("\nOne service, RSS apart (medians of {rounds} starts)");
    println!("| process | anonymous (heap, stacks) | file-backed | of which the quicmesh binary |");
    println!("|---|---|---|---|");
    for (kind, [anon, file, binary]) in &splits {
        let mb = |kib: &u64| *kib as f64 / 1024.0;
        println!("| {kind} | {:.1} MB | {:.1} MB | {:.1} MB |", mb(anon), mb(file), mb(binary));
        if let Some(entry) = report.get_mut(*kind) {
            entry["one_service_split_kib"] = serde_json::json!({ "anon": anon, "file": file, "binary": binary });
        }
    }
    // The binary's layout (build.rs): listed functions renamed since the list was written fall
    // back to the compiler's order, and the idle RSS above drifts up with their share.
    match order_coverage() {
        Some((found, listed)) => {
            println!(
                "\nSymbol order (link/symbol-order.txt): {found} of the {listed} listed functions are in this binary \
                 (the file lists the release and the bench builds' names; each build has its own)"
            );
            report.insert("symbol_order".into(), serde_json::json!({ "found": found, "listed": listed }));
        }
        None => println!("\nSymbol order: not checked (needs `nm` and link/symbol-order.txt)"),
    }
    let report = serde_json::json!({ "bench": "footprint", "items": n, "rounds": rounds, "results": report });
    let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| "target/bench-footprint.json".into());
    if std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()).is_ok() {
        println!("JSON: {path}");
    }
}
