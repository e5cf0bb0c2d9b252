//! The mesh on separate hosts with a broken network. Five network-namespace hosts on one
//! switch: the gateway; `a`, the client's node; `b` and `c`, each a node hosting an instance of
//! `web` beside it; and `ext`, an external client. Real load runs all along (idempotent GETs
//! through node-a and through the gateway's edge, every body read and checked), while the real
//! kernel breaks things: SIGKILL, SIGSTOP, SIGTERM and restarts of processes, nftables drops of
//! a share of the datagrams or of everything (a partition).
//!
//! Every scenario asserts that no request failed and every body arrived whole, and prints its
//! figures (run with `--nocapture` to read them). The product's defaults are under test here:
//! no transport or timeout tuning in the configs. Needs root, `ip` and `nft` (see
//! `support/netns.rs`); the scenarios take turns, since each loads the machine's two cores.
//! Ports inside a host are fixed: each host is a namespace of its own, so nothing can collide,
//! and a restarted process must come back where its peers and clients look for it.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::backend::Backend;
use support::netns::Net;
use support::*;

const HOSTS: [&str; 5] = ["gw", "a", "b", "c", "ext"];
const CONTROL: u16 = 7443;
const EDGE: u16 = 8443;
const INBOUND: u16 = 4433;
const OUTBOUND: u16 = 15001;
const ADMIN: u16 = 15000;
/// node-a's TCP forward to the `echo` service.
const TUNNEL: u16 = 15002;

/// One scenario at a time: each runs five processes and real load on two cores.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The gateway, three nodes, a backend beside each serving node. node-a, where the load comes
/// in, runs two workers, so that every drill also covers the connections its second worker
/// dials from a socket of its own. Fields drop in order: the processes before the namespaces
/// they run in.
struct Fleet {
    gw: NodeProc,
    a: NodeProc,
    b: NodeProc,
    c: NodeProc,
    on_b: Backend,
    on_c: Backend,
    gw_files: Vec<PathBuf>,
    _pki: Pki,
    net: Arc<Net>,
}

impl Fleet {
    /// Starts everything and returns once node-a and the gateway know both instances of `web`.
    /// `mesh_extra` is added to the mesh-wide config layer.
    async fn start(mesh_extra: &str) -> Option<Fleet> {
        let net = Arc::new(Net::new(&HOSTS)?);
        let pki = Pki::new();
        let dir = pki.issue("gateway");
        for n in ["node-a", "node-b", "node-c"] {
            pki.issue(n);
        }
        let mesh = dir.join("mesh.toml");
        std::fs::write(
            &mesh,
            format!(
                "[mesh]\ntrust_domain = \"{TD}\"\n\n[[services]]\nname = \"web\"\n\n\
                 [[services]]\nname = \"echo\"\nprotocol = \"tcp\"\n\n{mesh_extra}\n"
            ),
        )
        .unwrap();
        let gateway = dir.join("gateway.toml");
        std::fs::write(
            &gateway,
            format!(
                "[gateway]\nlisten = \"{}\"\ncontrol = \"{}\"\nadmin = \"127.0.0.1:{ADMIN}\"\nwatch_interval = \"100ms\"\n\n\
                 [gateway.tls]\nstate_dir = \"{}\"\n\n\
                 [[gateway.routes]]\nname = \"web\"\n[[gateway.routes.rules]]\n[[gateway.routes.rules.backendRefs]]\nname = \"web\"\n",
                net.addr("gw", EDGE),
                net.addr("gw", CONTROL),
                dir.display()
            ),
        )
        .unwrap();
        let gw_files = vec![mesh, gateway];
        let gw = NodeProc::start_layered_in(&net.ns("gw"), "gateway", &gw_files);
        let on_b = Backend::start_on(net.listen("b", ([127, 0, 0, 1], 0).into()), "web-b", Duration::ZERO);
        let on_c = Backend::start_on(net.listen("c", ([127, 0, 0, 1], 0).into()), "web-c", Duration::ZERO);
        let echo_b = tcp_echo(net.listen("b", ([127, 0, 0, 1], 0).into()));
        let echo_c = tcp_echo(net.listen("c", ([127, 0, 0, 1], 0).into()));
        let node = |host: &str, instance: Option<(&Backend, &str, SocketAddr)>| {
            let name = format!("node-{host}");
            let mut toml = format!(
                "[mesh]\ntrust_domain = \"{TD}\"\n\n[node]\nname = \"{name}\"\noutbound = \"127.0.0.1:{OUTBOUND}\"\n\
                 inbound = \"{}\"\nadmin = \"127.0.0.1:{ADMIN}\"\n\n[node.tls]\nstate_dir = \"{}\"\n\n\
                 [node.gateway]\naddress = \"{}\"\n\n",
                net.addr(host, INBOUND),
                dir.display(),
                net.addr("gw", CONTROL),
            );
            match instance {
                Some((be, labels, echo)) => toml.push_str(&format!(
                    "[[node.instances]]\nservice = \"web\"\naddress = \"{}\"\nlabels = {{ {labels} }}\n\n\
                     [[node.instances]]\nservice = \"echo\"\naddress = \"{echo}\"\nprotocol = \"tcp\"\n",
                    be.addr
                )),
                None => {
                    toml = toml.replace("[node]\n", "[node]\nworkers = 2\n");
                    toml.push_str(&format!("[[node.tcp]]\nlisten = \"127.0.0.1:{TUNNEL}\"\nservice = \"echo\"\n"))
                }
            }
            NodeProc::start_in(&net.ns(host), "node", &dir, &name, &toml)
        };
        let b = node("b", Some((&on_b, "host = \"b\"", echo_b)));
        let c = node("c", Some((&on_c, "host = \"c\"", echo_c)));
        let a = node("a", None);
        let fleet = Fleet { gw, a, b, c, on_b, on_c, gw_files, _pki: pki, net };
        fleet.both_known("a").await;
        fleet.both_known("gw").await;
        Some(fleet)
    }

    /// The admin address of the process on `host` (as seen inside the host).
    fn admin(&self) -> SocketAddr {
        ([127, 0, 0, 1], ADMIN).into()
    }

    async fn admin_json(&self, host: &str, path: &str) -> Option<serde_json::Value> {
        let (status, body) = self.net.http_get(host, self.admin(), path).await;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// Healthy endpoints of `web` that the proxy on `host` knows.
    async fn web_endpoints(&self, host: &str) -> usize {
        let Some(doc) = self.admin_json(host, "/endpoints").await else { return 0 };
        doc["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "web")
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["healthy"].as_bool().unwrap_or(true))
            .count()
    }

    async fn both_known(&self, host: &str) {
        eventually(Duration::from_secs(30), &format!("{host} to know both instances of web"), || async {
            (self.web_endpoints(host).await == 2).then_some(())
        })
        .await;
    }

    /// Waits until `be` answers requests again (the load is running).
    async fn serves_again(&self, be: &Backend) {
        let before = be.hits();
        eventually(Duration::from_secs(30), &format!("{} to serve again", be.name), || async {
            (be.hits() > before + 10).then_some(())
        })
        .await;
    }

    /// SIGTERM to `host`'s node, and its restart once it has drained and exited; returns
    /// once the gateway and node-a know both instances again.
    async fn roll(&mut self, host: &str) {
        let p = match host {
            "a" => &mut self.a,
            "b" => &mut self.b,
            _ => &mut self.c,
        };
        p.terminate();
        p.restart();
        self.both_known("a").await;
        self.both_known("gw").await;
    }

    /// Idempotent GETs for `web` through node-a's outbound listener, from inside host `a`.
    fn mesh_load(&self, workers: usize) -> Load {
        Load::start(self.net.clone(), "a", ([127, 0, 0, 1], OUTBOUND).into(), false, workers)
    }

    /// The same through the gateway's edge (HTTP/1.1 over TLS), from host `ext`.
    fn edge_load(&self, workers: usize) -> Load {
        Load::start(self.net.clone(), "ext", self.net.addr("gw", EDGE), true, workers)
    }
}

/// A TCP echo server on `l`; returns its address.
fn tcp_echo(l: tokio::net::TcpListener) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Tunnels through node-a's TCP forward, one after another per worker: each writes 64 KiB,
/// reads it back and closes. Returns (tunnels done, failures) once stopped.
fn tunnel_load(
    net: Arc<Net>,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    (0..workers)
        .map(|w| {
            let (net, stop) = (net.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut done, mut failures) = (0, Vec::new());
                let sent: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + w) as u8).collect();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = net.connect("a", ([127, 0, 0, 1], TUNNEL).into()).await else {
                        failures.push("the TCP forward refused a connection".to_string());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let (mut r, mut wr) = s.split();
                    let write = async {
                        wr.write_all(&sent).await?;
                        wr.shutdown().await
                    };
                    let mut back = Vec::new();
                    let (wrote, read) = tokio::join!(write, r.read_to_end(&mut back));
                    match (wrote, read) {
                        (Ok(()), Ok(_)) if back == sent => done += 1,
                        (w, r) => failures
                            .push(format!("tunnel: wrote {w:?}, read {r:?}, {} of 65536 bytes back", back.len())),
                    }
                }
                (done, failures)
            })
        })
        .collect()
}

/// Open file descriptors of a process.
fn fds(p: &NodeProc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.child.id())).map(|d| d.count()).unwrap_or(0)
}

/// What one request came to.
#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    took: Duration,
    /// None: 200 with the whole body; otherwise what went wrong.
    failure: Option<String>,
    /// For a response whose body then broke off: when its headers arrived, and the backend
    /// that was sending it.
    cut_after: Option<(Instant, String)>,
}

/// The requests a scenario's clients made, in order of completion.
#[derive(Default)]
struct Log {
    samples: Vec<Sample>,
    /// Connections refused or reset before a request was written (nothing sent: the client
    /// waited and tried again, as any client does when no proxy is listening).
    not_sent: u64,
    /// Requests written on a reused keep-alive connection that the server closed before
    /// answering; sent again on a new connection, as RFC 9112 9.3.1 lets clients do for
    /// idempotent requests (curl and browsers do).
    resent: u64,
}

/// Back-to-back GETs from `workers` clients, each on its own keep-alive connection, alternating
/// a short answer (`/`, the backend's name) and a 4 KiB body sent over 120 ms (`/slow/4`).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    log: Arc<Mutex<Log>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

impl Load {
    fn start(net: Arc<Net>, host: &'static str, to: SocketAddr, tls: bool, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Log::default()));
        let tasks = (0..workers)
            .map(|w| {
                let (net, stop, done, log) = (net.clone(), stop.clone(), done.clone(), log.clone());
                tokio::spawn(async move {
                    let mut conn: Option<Sender> = None;
                    let mut n = w;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let path = if n % 2 == 0 { "/" } else { "/slow/4" };
                        let started = Instant::now();
                        let failure = loop {
                            let reused = conn.as_ref().is_some_and(|c| !c.is_closed());
                            if !reused {
                                match connect(&net, host, to, tls).await {
                                    Ok(c) => conn = Some(c),
                                    Err(_) => {
                                        log.lock().unwrap().not_sent += 1;
                                        if stop.load(Ordering::Relaxed) {
                                            return;
                                        }
                                        // A client's back-off before dialling again.
                                        tokio::time::sleep(Duration::from_millis(20)).await;
                                        continue;
                                    }
                                }
                            }
                            match get(conn.as_mut().unwrap(), path).await {
                                Err(Unanswered) if reused => {
                                    log.lock().unwrap().resent += 1;
                                    conn = None;
                                }
                                Err(Unanswered) => {
                                    conn = None;
                                    break (Some("connection closed before any response".to_string()), None);
                                }
                                Ok(outcome) => break outcome,
                            }
                        };
                        let (failure, cut_after) = failure;
                        if failure.is_some() {
                            conn = None;
                        }
                        let took = started.elapsed();
                        log.lock().unwrap().samples.push(Sample { started, took, failure, cut_after });
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, done, log, tasks }
    }

    /// Waits until `more` further requests have completed.
    async fn run_for(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        eventually(Duration::from_secs(60), "the load to make progress", || async {
            (self.done.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops the clients (each finishes its request) and returns what they saw.
    async fn stop(self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// The server closed the connection without answering the request.
struct Unanswered;

async fn connect(net: &Net, host: &str, to: SocketAddr, tls: bool) -> std::io::Result<Sender> {
    use hyper_util::rt::TokioIo;
    let tcp = net.connect(host, to).await?;
    let handshake = if tls {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map(|(s, c)| {
            tokio::spawn(c);
            s
        })
    } else {
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map(|(s, c)| {
            tokio::spawn(c);
            s
        })
    };
    handshake.map_err(std::io::Error::other)
}

/// One GET: Ok((None, _)) for a 200 with the whole expected body, Ok((Some(why), cut)) for any
/// other outcome, `cut` being when the headers came of a body that broke off; Err when the
/// connection closed before a response began.
async fn get(send: &mut Sender, path: &str) -> Result<(Option<String>, Option<(Instant, String)>), Unanswered> {
    use http_body_util::BodyExt;
    if send.ready().await.is_err() {
        return Err(Unanswered);
    }
    let req = http::Request::get(path).header("host", "web").body(Default::default()).unwrap();
    let resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) if e.is_canceled() || e.is_incomplete_message() || closed_before_answer(&e) => return Err(Unanswered),
        Err(e) => return Ok((Some(format!("{path}: request failed: {e}")), None)),
    };
    let answered = Instant::now();
    let status = resp.status().as_u16();
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap_or("").to_string());
    let (reason, backend) = (header("quicmesh-error"), header("x-backend").unwrap_or_default());
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok((Some(format!("{path}: {status} then the body broke off: {e}")), Some((answered, backend))))
        }
    };
    let whole = match path {
        "/" => body.as_ref() == b"web-b" || body.as_ref() == b"web-c",
        _ => body.len() == 4096,
    };
    Ok(match (status, whole) {
        (200, true) => (None, None),
        (200, false) => (Some(format!("{path}: 200 with {} bytes", body.len())), None),
        _ => (Some(format!("{path}: {status} {}", reason.unwrap_or_default())), None),
    })
}

/// The server closed or reset the connection before any answer began (an idle keep-alive
/// connection closed by a drain while the request was on its way, its bytes unread): a client
/// re-sends an idempotent request on a new connection, as RFC 9112 section 9.3.1 allows. Only
/// for a reused connection (the caller's check).
fn closed_before_answer(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
            return matches!(io.kind(), BrokenPipe | ConnectionReset | UnexpectedEof);
        }
        source = s.source();
    }
    false
}

/// Figures of a stretch of samples.
struct Figures {
    requests: usize,
    failed: Vec<String>,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Log {
    /// The samples that started within [from, to).
    fn between(&self, from: Instant, to: Instant) -> Figures {
        let picked: Vec<&Sample> = self.samples.iter().filter(|s| s.started >= from && s.started < to).collect();
        let mut took: Vec<Duration> = picked.iter().map(|s| s.took).collect();
        took.sort();
        let q = |p: f64| took.get(((took.len() as f64 * p) as usize).min(took.len().saturating_sub(1))).copied();
        Figures {
            requests: picked.len(),
            failed: picked.iter().filter_map(|s| s.failure.clone()).collect(),
            per_second: picked.len() as f64 / to.duration_since(from).as_secs_f64(),
            p50: q(0.5).unwrap_or_default(),
            p99: q(0.99).unwrap_or_default(),
            max: took.last().copied().unwrap_or_default(),
        }
    }

    fn all(&self) -> Figures {
        let first = self.samples.iter().map(|s| s.started).min().unwrap_or_else(Instant::now);
        self.between(first, Instant::now())
    }

    /// How long after `fault` clients were still held up: the end of the last request that
    /// took longer than `slow` and was in flight at or after the fault.
    fn held_up_after(&self, fault: Instant, slow: Duration) -> Duration {
        self.samples
            .iter()
            .filter(|s| s.took > slow && s.started + s.took >= fault)
            .map(|s| (s.started + s.took).duration_since(fault))
            .max()
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({:.0}/s), {} failed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.requests,
            self.per_second,
            self.failed.len(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

/// Fails the test with every failure a load saw, except a body that was already streaming
/// from `fault`'s backend when the fault killed, froze or cut off its node: no proxy that streams
/// responses can finish that one (it is reported to the client as a broken body, at once).
/// "Already streaming" allows for the headers' own trip to the client after the fault struck.
/// Returns how many such bodies there were.
fn assert_no_loss(what: &str, log: &Log, fault: Option<(Instant, &str)>) -> usize {
    let cut_by_fault = |s: &Sample| match (&s.cut_after, fault) {
        (Some((answered, backend)), Some((at, victim))) => backend == victim && *answered <= at + SLOW,
        _ => false,
    };
    let failures: Vec<&String> =
        log.samples.iter().filter(|s| !cut_by_fault(s)).filter_map(|s| s.failure.as_ref()).collect();
    assert!(failures.is_empty(), "{what}: {} of {} requests failed: {failures:#?}", failures.len(), log.samples.len());
    log.samples.iter().filter(|s| s.failure.is_some() && cut_by_fault(s)).count()
}

/// Fails the test when clients were held up by `fault` for [`FAILOVER_LIMIT`] or longer: a
/// dead, frozen or cut-off peer is noticed at the 1 s QUIC idle timeout and the requests it held
/// are retried elsewhere, 1.0-1.5 s after the fault here.
fn assert_failed_over(logs: &[&Log], fault: Instant) {
    for log in logs {
        let held = log.held_up_after(fault, SLOW);
        assert!(held < FAILOVER_LIMIT, "clients were held up {held:?} after the fault");
    }
}

const FAILOVER_LIMIT: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints a load's figures for a scenario, with how long clients were held up after `fault`.
fn report(scenario: &str, via: &str, log: &Log, fault: Option<Instant>) {
    let held = fault
        .map(|f| format!("; held up {:.0} ms after the fault", ms(log.held_up_after(f, SLOW))))
        .unwrap_or_default();
    eprintln!(
        "FIGURES {scenario} [{via}]: {}{held}; client re-sent {} on closed keep-alive connections, {} dials refused",
        log.all(),
        log.resent,
        log.not_sent
    );
}

/// A request slower than this was held up by the fault.
const SLOW: Duration = Duration::from_millis(500);

/// How a drill breaks node-b, which serves `web` beside node-c.
#[derive(PartialEq)]
enum Break {
    /// SIGKILL: no goodbye.
    Kill,
    /// SIGSTOP, and SIGCONT after the load has gone on without it.
    Freeze,
    /// Every packet of its host dropped, then the partition healed.
    Partition,
}

/// Load through node-a and through the edge while node-b is broken `how`: no request may
/// fail but the bodies node-b was sending at that moment, and clients may not be held up for
/// long; once node-b is back (a freeze or a partition), it must serve again.
async fn break_a_serving_node(how: Break, scenario: &str) {
    let _turn = TURN.lock().await;
    let Some(mut f) = Fleet::start("").await else { return };
    let (mesh, edge) = (f.mesh_load(8), f.edge_load(4));
    mesh.run_for(200).await;
    edge.run_for(100).await;
    let partition = match how {
        Break::Kill => {
            f.b.kill();
            None
        }
        Break::Freeze => {
            f.b.signal("STOP");
            None
        }
        Break::Partition => Some(f.net.partition("b")),
    };
    let fault = Instant::now();
    mesh.run_for(300).await;
    edge.run_for(150).await;
    if how == Break::Freeze {
        f.b.signal("CONT");
    }
    if how != Break::Kill {
        drop(partition);
        f.serves_again(&f.on_b).await;
    }
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    report(scenario, "mesh", &mesh, Some(fault));
    report(scenario, "edge", &edge, Some(fault));
    let cut = assert_no_loss("through node-a", &mesh, Some((fault, "web-b")))
        + assert_no_loss("through the gateway", &edge, Some((fault, "web-b")));
    assert_failed_over(&[&mesh, &edge], fault);
    eprintln!("FIGURES {scenario}: {cut} bodies were streaming from node-b at the fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_serving_node_loses_no_request() {
    break_a_serving_node(Break::Kill, "SIGKILL node-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_serving_node_loses_no_request() {
    break_a_serving_node(Break::Freeze, "SIGSTOP node-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_serving_host_loses_no_request() {
    break_a_serving_node(Break::Partition, "partition host b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_between_two_nodes_fails_over() {
    let _turn = TURN.lock().await;
    let Some(f) = Fleet::start("").await else { return };
    let (mesh, edge) = (f.mesh_load(8), f.edge_load(4));
    mesh.run_for(200).await;
    let cut = f.net.cut("a", "b");
    let fault = Instant::now();
    mesh.run_for(300).await;
    // The gateway still reaches node-b: the edge keeps using both instances.
    let before = f.on_b.hits();
    edge.run_for(150).await;
    assert!(f.on_b.hits() > before, "the edge stopped using node-b, which it can still reach");
    cut.heal();
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    report("cut node-a from node-b", "mesh", &mesh, Some(fault));
    report("cut node-a from node-b", "edge", &edge, None);
    assert_no_loss("through node-a", &mesh, Some((fault, "web-b")));
    assert_no_loss("through the gateway", &edge, None);
    assert_failed_over(&[&mesh], fault);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_sigterm_of_every_node_loses_no_request() {
    let _turn = TURN.lock().await;
    let Some(mut f) = Fleet::start("").await else { return };
    let (mesh, edge) = (f.mesh_load(8), f.edge_load(4));
    mesh.run_for(200).await;
    edge.run_for(100).await;
    let started = Instant::now();
    // The serving nodes, then the client's own.
    for host in ["b", "c", "a"] {
        f.roll(host).await;
        mesh.run_for(200).await;
        edge.run_for(100).await;
    }
    let took = started.elapsed();
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    report("rolling SIGTERM b, c, a", "mesh", &mesh, None);
    report("rolling SIGTERM b, c, a", "edge", &edge, None);
    eprintln!("FIGURES rolling SIGTERM b, c, a: {:.1} s for the three", took.as_secs_f64());
    assert_no_loss("through node-a", &mesh, None);
    assert_no_loss("through the gateway", &edge, None);
    // node-a's own drain answered every request on a kept-alive connection (with
    // `Connection: close`) rather than closing a connection under a request being written.
    assert_eq!(mesh.resent, 0, "node-a's drain closed keep-alive connections under requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_and_twenty_percent_loss_lose_no_request() {
    let _turn = TURN.lock().await;
    let Some(f) = Fleet::start("").await else { return };
    let (mesh, edge) = (f.mesh_load(8), f.edge_load(4));
    mesh.run_for(100).await;
    let mut phases = Vec::new();
    for percent in [0, 5, 20, 0] {
        let faults: Vec<_> = if percent == 0 { vec![] } else { ["b", "c"].map(|h| f.net.udp_loss(h, percent)).into() };
        let from = Instant::now();
        mesh.run_for(400).await;
        edge.run_for(200).await;
        phases.push((percent, from, Instant::now()));
        drop(faults);
    }
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    for (percent, from, to) in &phases {
        eprintln!("FIGURES {percent}% UDP loss at b and c [mesh]: {}", mesh.between(*from, *to));
        eprintln!("FIGURES {percent}% UDP loss at b and c [edge]: {}", edge.between(*from, *to));
    }
    // Keep-alives keep a living peer heard from under heavy loss: no connection may time out.
    for p in [&f.a, &f.gw] {
        assert!(!p.log().contains("went silent"), "a connection timed out under loss:\n{}", p.log());
    }
    assert_no_loss("through node-a", &mesh, None);
    assert_no_loss("through the gateway", &edge, None);
}

/// Writes 16 KiB numbered `round` into a tunnel and reads them back whole.
async fn echo_round(s: &mut tokio::net::TcpStream, round: u8) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sent: Vec<u8> = (0..16 * 1024).map(|i| (i as u8).wrapping_mul(round.wrapping_add(3))).collect();
    let mut back = vec![0; sent.len()];
    let trip = async {
        s.write_all(&sent).await?;
        s.read_exact(&mut back).await
    };
    match tokio::time::timeout(Duration::from_secs(10), trip).await {
        Ok(Ok(_)) if back == sent => Ok(()),
        Ok(Ok(_)) => Err(format!("round {round}: the tunnel echoed other bytes")),
        Ok(Err(e)) => Err(format!("round {round}: {e}")),
        Err(_) => Err(format!("round {round}: no echo in 10 s")),
    }
}

/// node-a's host changes address under load (issue #30): the host gets a new address, node-a's
/// config moves `node.inbound` to it, and the old address is taken away. The QUIC connections
/// node-a opened (to node-b, node-c and the gateway) migrate to the new address: no request
/// fails, node-a opens no new connection, a TCP tunnel (one QUIC stream) held open across the
/// change carries on, and the gateway registers the new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_address_changes_keeps_its_connections() {
    let _turn = TURN.lock().await;
    let Some(f) = Fleet::start("").await else { return };
    let mesh = f.mesh_load(4);
    mesh.run_for(100).await;
    let mut tunnel = f.net.connect("a", ([127, 0, 0, 1], TUNNEL).into()).await.unwrap();
    echo_round(&mut tunnel, 0).await.unwrap();
    let opened = |text: &str| metric(text, "quicmesh_quic_connections_opened_total", &[("direction", "outbound")]);
    let before = opened(&f.net.http_get("a", f.admin(), "/metrics").await.1);
    assert!(before >= 3.0, "node-a should hold connections to node-b, node-c and the gateway");

    let (old, new) = (f.net.ip("a"), std::net::IpAddr::from([10, 77, 0, 100]));
    let new_inbound = SocketAddr::new(new, INBOUND);
    let toml = std::fs::read_to_string(&f.a.config).unwrap();
    let moved_toml = toml.replace(&f.net.addr("a", INBOUND).to_string(), &new_inbound.to_string());
    // Edited before the host has the address: the node stays where it is, registration and all.
    std::fs::write(&f.a.config, &moved_toml).unwrap();
    f.a.log_with(&["cannot move to the new node.inbound"]).await;
    let nodes = f.admin_json("gw", "/nodes").await.unwrap();
    let a = nodes["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node-a").unwrap().clone();
    assert_eq!(a["address"], f.net.addr("a", INBOUND).to_string(), "a failed move changed the registration");
    // The host gets the address; the next edit moves the node.
    f.net.add_addr("a", new);
    std::fs::write(&f.a.config, format!("{moved_toml}\n# the address exists now\n")).unwrap();
    let moved = Instant::now();
    f.a.log_with(&["moved the QUIC socket"]).await;
    eventually(Duration::from_secs(30), "the gateway to register node-a's new address", || async {
        let nodes = f.admin_json("gw", "/nodes").await?;
        let a = nodes["nodes"].as_array()?.iter().find(|n| n["name"] == "node-a")?.clone();
        (a["address"] == new_inbound.to_string() && a["connected"] == true).then_some(())
    })
    .await;
    f.net.del_addr("a", old);
    let gone = Instant::now();
    mesh.run_for(400).await;
    echo_round(&mut tunnel, 1).await.expect("the tunnel opened before the address change");
    let mesh = mesh.stop().await;
    report("address change of node-a's host", "mesh", &mesh, Some(gone));
    eprintln!("FIGURES address change: registered at the gateway {:.0} ms after the config edit", ms(gone - moved));
    assert_no_loss("through node-a across its address change", &mesh, None);
    assert_failed_over(&[&mesh], gone);
    let after = opened(&f.net.http_get("a", f.admin(), "/metrics").await.1);
    assert_eq!(after, before, "node-a opened new connections instead of migrating its own:\n{}", f.a.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_gateway_keeps_serving_and_catches_up() {
    let _turn = TURN.lock().await;
    let Some(f) = Fleet::start("").await else { return };
    let mesh = f.mesh_load(8);
    mesh.run_for(200).await;
    let cut = f.net.cut("a", "gw");
    // A change made while node-a cannot hear of it: `web` also answers as `www`.
    let alias = |body: &str| std::fs::read_to_string(&f.gw_files[0]).unwrap().replace("name = \"web\"\n", body);
    std::fs::write(&f.gw_files[0], alias("name = \"web\"\nhosts = [\"www\"]\n")).unwrap();
    let www = || f.net.http_get_as("a", ([127, 0, 0, 1], OUTBOUND).into(), "/", "www");
    eventually(Duration::from_secs(10), "node-b to learn the alias", || async {
        let (status, _) = f.net.http_get_as("b", ([127, 0, 0, 1], OUTBOUND).into(), "/", "www").await;
        (status == 200).then_some(())
    })
    .await;
    mesh.run_for(300).await;
    assert_ne!(www().await.0, 200, "node-a learned the change through a cut link");
    let healed = Instant::now();
    cut.heal();
    eventually(Duration::from_secs(30), "node-a to catch up after the heal", || async {
        (www().await.0 == 200).then_some(())
    })
    .await;
    let caught_up = healed.elapsed();
    let mesh = mesh.stop().await;
    report("cut node-a from the gateway", "mesh", &mesh, None);
    eprintln!("FIGURES cut node-a from the gateway: caught up {:.0} ms after the heal", ms(caught_up));
    assert_no_loss("through node-a", &mesh, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_killed_and_restarted_loses_no_mesh_request() {
    let _turn = TURN.lock().await;
    let Some(mut f) = Fleet::start("").await else { return };
    let mesh = f.mesh_load(8);
    mesh.run_for(200).await;
    f.gw.kill();
    // Node to node traffic does not need the control plane.
    let (b, c) = (f.on_b.hits(), f.on_c.hits());
    mesh.run_for(500).await;
    assert!(f.on_b.hits() > b && f.on_c.hits() > c, "with the gateway gone, node-a stopped using an instance");
    let restarted = Instant::now();
    f.gw.restart();
    f.both_known("gw").await;
    let edge = f.edge_load(4);
    edge.run_for(150).await;
    let back = restarted.elapsed();
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    report("gateway killed, restarted", "mesh", &mesh, None);
    report("gateway killed, restarted", "edge", &edge, None);
    eprintln!("FIGURES gateway restart: serving at the edge again {:.0} ms after the restart", ms(back));
    assert_no_loss("through node-a", &mesh, None);
    assert_no_loss("through the gateway", &edge, None);
}

/// The mesh route for `web`: `b` and `c` are the weights of the instances on node-b and node-c.
fn split(b: u32, c: u32) -> String {
    format!(
        "[[routes]]\nname = \"web\"\nhostnames = [\"web\"]\n[[routes.rules]]\n\
         [[routes.rules.backendRefs]]\nname = \"web\"\nlabels = {{ host = \"b\" }}\nweight = {b}\n\
         [[routes.rules.backendRefs]]\nname = \"web\"\nlabels = {{ host = \"c\" }}\nweight = {c}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_under_load_lose_no_request() {
    let _turn = TURN.lock().await;
    let Some(f) = Fleet::start(&split(100, 0)).await else { return };
    let mesh = f.mesh_load(8);
    mesh.run_for(200).await;
    assert_eq!(f.on_c.hits(), 0, "weight 0 still sent requests to node-c");
    let base = std::fs::read_to_string(&f.gw_files[0]).unwrap();
    let shift = |b: u32, c: u32| std::fs::write(&f.gw_files[0], base.replace(&split(100, 0), &split(b, c))).unwrap();
    // All to node-c, then a broken edit that must change nothing, then back half and half.
    shift(0, 100);
    let hits_b = eventually(Duration::from_secs(10), "the shift to node-c", || async {
        let b = f.on_b.hits();
        mesh.run_for(50).await;
        (f.on_b.hits() == b).then_some(b)
    })
    .await;
    std::fs::write(&f.gw_files[0], base.replace(&split(100, 0), "[[routes]]\nname = 7\n")).unwrap();
    mesh.run_for(300).await;
    assert_eq!(f.on_b.hits(), hits_b, "a refused edit changed the routes");
    shift(50, 50);
    f.serves_again(&f.on_b).await;
    let mesh = mesh.stop().await;
    report("route shifts 100/0, 0/100, bad edit, 50/50", "mesh", &mesh, None);
    assert_no_loss("through node-a", &mesh, None);
}

/// How long the soak runs: `SOAK_SECS`, 20 s by default (CI's bounded form; run it for
/// minutes locally). Not `QUICMESH_*`: the processes would read that as config, and refuse it.
fn soak_length() -> Duration {
    Duration::from_secs(std::env::var("SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_with_churn_leaves_memory_and_descriptors_at_their_baseline() {
    let _turn = TURN.lock().await;
    let Some(mut f) = Fleet::start("").await else { return };
    let (mesh, edge) = (f.mesh_load(6), f.edge_load(2));
    let stop_tunnels = Arc::new(AtomicBool::new(false));
    let tunnels = tunnel_load(f.net.clone(), 2, stop_tunnels.clone());
    mesh.run_for(300).await;
    edge.run_for(100).await;
    // The baseline: warmed up, every connection a steady load needs is open.
    let base = [(fds(&f.a), f.a.rss_kib()), (fds(&f.gw), f.gw.rss_kib())];
    let until = Instant::now() + soak_length();
    let (mut rolls, mut edits) = (0, 0);
    let original = std::fs::read_to_string(&f.gw_files[0]).unwrap();
    while Instant::now() < until {
        // Endpoint churn: each serving node drained and restarted in turn.
        f.roll(if rolls % 2 == 0 { "b" } else { "c" }).await;
        rolls += 1;
        // Config changes: an alias for `web` comes and goes.
        let text = if edits % 2 == 0 {
            original.replace("name = \"web\"\n", "name = \"web\"\nhosts = [\"www\"]\n")
        } else {
            original.clone()
        };
        std::fs::write(&f.gw_files[0], text).unwrap();
        edits += 1;
        mesh.run_for(200).await;
    }
    stop_tunnels.store(true, Ordering::Relaxed);
    let (mesh, edge) = (mesh.stop().await, edge.stop().await);
    let (mut tunnels_done, mut tunnel_failures) = (0, Vec::new());
    for t in tunnels {
        let (done, failures) = t.await.unwrap();
        tunnels_done += done;
        tunnel_failures.extend(failures);
    }
    report("soak", "mesh", &mesh, None);
    report("soak", "edge", &edge, None);
    eprintln!("FIGURES soak: {tunnels_done} tunnels of 64 KiB each way, {} failed; {rolls} node restarts, {edits} config edits", tunnel_failures.len());
    assert_no_loss("through node-a", &mesh, None);
    assert_no_loss("through the gateway", &edge, None);
    assert!(tunnel_failures.is_empty(), "tunnels failed: {tunnel_failures:#?}");
    // Idle again: the descriptors come back to the baseline (pooled peer connections are a
    // few UDP sockets' worth at most) and the memory stays near it.
    for ((p, name), (fd0, rss0)) in [(&f.a, "node-a"), (&f.gw, "gateway")].into_iter().zip(base) {
        let fd1 = eventually(Duration::from_secs(15), &format!("{name}'s descriptors back at {fd0}"), || async {
            let n = fds(p);
            (n <= fd0).then_some(n)
        })
        .await;
        let rss1 = p.rss_kib();
        eprintln!("FIGURES soak {name}: descriptors {fd0} -> {fd1}, resident memory {rss0} KiB -> {rss1} KiB");
        assert!(rss1 < rss0 + rss0 / 2 + 16 * 1024, "{name} grew from {rss0} KiB to {rss1} KiB");
    }
}
