//! End-to-end tests of resilience: retries (and when they are not safe), retry budgets, outlier
//! ejection, active health checks through the control plane, graceful drain on SIGTERM, rate
//! limits and fault injection. Node and gateway processes of the real binary, in-process
//! backends that can fail on demand, real clients.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::backend::{Backend, Mode};
use support::*;

/// node-a (the client's) plus node-b and node-c hosting `web` (one instance each), from static
/// config. `web_extra` is appended to the `web` service block.
struct Three {
    a: NodeProc,
    b: NodeProc,
    c: NodeProc,
    pki: Pki,
}

fn web(b: SocketAddr, c: SocketAddr, extra: &str) -> String {
    format!(
        "[[services]]\nname = \"web\"\n{extra}\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{b}\"\n\n[[services.endpoints]]\nnode = \"node-c\"\naddress = \"{c}\"\n"
    )
}

async fn three_nodes(services: &str) -> Three {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    pki.issue("node-c");
    // node-b and node-c only deliver locally; each lists the other so the config validates.
    let unused: SocketAddr = ([127, 0, 0, 1], 9).into();
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[("node-c", unused)], services));
    let c =
        NodeProc::start(pki.path(), "node-c", &node_toml("node-c", &state, &[("node-b", b.addrs.inbound)], services));
    let peers = [("node-b", b.addrs.inbound), ("node-c", c.addrs.inbound)];
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &peers, services));
    Three { a, b, c, pki }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Whether each endpoint of the first service is ejected, as `node`'s `/endpoints` shows.
async fn ejected(node: &NodeProc) -> Vec<bool> {
    let seen = node.admin_json("/endpoints").await;
    let eps = seen["services"][0]["endpoints"].as_array().unwrap().clone();
    eps.iter().map(|e| e["ejected"].as_bool().unwrap_or_else(|| panic!("/endpoints: {eps:?}"))).collect()
}

/// (status, quicmesh-error, body); a body that breaks off is status 0 with the error.
async fn call(client: &Client, outbound: SocketAddr, method: &str, host: &str, body: &str) -> (u16, String, String) {
    call_headers(client, outbound, method, host, "/", body, &[]).await
}

/// A request with a path and more headers than [`call`] sends.
async fn call_headers(
    client: &Client,
    outbound: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(format!("http://{outbound}{path}")).header("host", host);
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    match client.request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let reason = r.headers().get("quicmesh-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            match r.into_body().collect().await {
                Ok(body) => (status, reason, String::from_utf8_lossy(&body.to_bytes()).into_owned()),
                Err(e) => (0, format!("{status} then the body broke off: {e}"), String::new()),
            }
        }
        Err(e) => (0, format!("client error: {e}"), String::new()),
    }
}

/// Concurrent back-to-back GETs for a host through a node's outbound listener until stopped;
/// keeps every failure for the report.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Load {
    fn start(outbound: SocketAddr, host: &'static str, workers: usize) -> Load {
        Self::start_path(outbound, host, workers, "/", None)
    }

    /// Like [`Load::start`], for `path`; a 200 whose body is not `len` bytes long is a failure.
    fn start_path(
        outbound: SocketAddr,
        host: &'static str,
        workers: usize,
        path: &'static str,
        len: Option<usize>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut ok = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let (status, reason, body) = call_headers(&c, outbound, "GET", host, path, "", &[]).await;
                        if status == 200 && len.is_some_and(|n| body.len() != n) {
                            failures.lock().unwrap().push(format!("200 with {} bytes of {len:?}", body.len()));
                        } else if status == 200 {
                            ok += 1;
                        } else {
                            failures.lock().unwrap().push(format!("{status} {reason}"));
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                })
            })
            .collect();
        Load { stop, done, failures, tasks }
    }

    /// Waits until `more` further requests have completed.
    async fn run_for(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        eventually(Duration::from_secs(30), "the load to make progress", || async {
            (self.done.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops; returns (succeeded, failures).
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ok = 0;
        for t in self.tasks {
            ok += t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (ok, failures)
    }
}

async fn wait_hits(b: &Backend, at_least: u64, what: &str) {
    eventually(Duration::from_secs(30), what, || async { (b.hits() >= at_least).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_under_load_costs_no_request() {
    let mut one = Backend::start("one", Duration::ZERO).await;
    let two = Backend::start("two", Duration::ZERO).await;
    let m = three_nodes(&web(one.addr, two.addr, "lb = { policy = \"round_robin\" }")).await;
    let load = Load::start(m.a.addrs.outbound, "web", 4);
    wait_hits(&one, 100, "instance one to take traffic").await;
    one.kill();
    let before = two.hits();
    wait_hits(&two, before + 300, "instance two to take the rest").await;
    load.run_for(100).await;
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(10)]
    );
    let metrics = m.a.metrics().await;
    assert!(metric(&metrics, "quicmesh_retries_total", &[("service", "web")]) >= 1.0, "no retry counted:\n{metrics}");
    assert!(two.max_attempt.load(Ordering::SeqCst) >= 2, "no retry reached instance two with quicmesh-attempt");
    let _ = (&m.b, &m.c, &m.pki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_only_when_it_never_reached_the_instance() {
    // `web`: one instance cuts every connection after reading the request; the other answers.
    let cutter = Backend::start("cutter", Duration::ZERO).await;
    cutter.set_mode(Mode::Reset);
    let good = Backend::start("good", Duration::ZERO).await;
    // `gone`: one instance refuses connections; the other answers.
    let gone = dead_address().await;
    let good2 = Backend::start("good2", Duration::ZERO).await;
    let services = format!(
        "{}\n[[services]]\nname = \"gone\"\nlb = {{ policy = \"round_robin\" }}\noutlier = {{ consecutive_failures = 0 }}\n\
         [[services.endpoints]]\nnode = \"node-b\"\naddress = \"{gone}\"\n\n[[services.endpoints]]\nnode = \"node-c\"\naddress = \"{}\"\n",
        web(cutter.addr, good.addr, "lb = { policy = \"round_robin\" }\noutlier = { consecutive_failures = 0 }"),
        good2.addr
    );
    let m = three_nodes(&services).await;
    let c = client();
    // Sent, then cut: a POST is not repeated (the instance may have acted on it), a GET is.
    let mut cut_posts = 0;
    for i in 0..6 {
        let (status, reason, _) = call(&c, m.a.addrs.outbound, "POST", "web", &format!("order-{i}")).await;
        match status {
            200 => {}
            502 => {
                assert_eq!(reason, "upstream-reset");
                cut_posts += 1;
            }
            other => panic!("unexpected {other} {reason}"),
        }
    }
    assert!(cut_posts >= 2, "round robin should have sent several POSTs to the cutter");
    assert_eq!(cutter.hits(), cut_posts, "a cut POST was sent again");
    assert_eq!(good.hits(), 6 - cut_posts);
    for _ in 0..6 {
        let (status, reason, _) = call(&c, m.a.addrs.outbound, "GET", "web", "").await;
        assert_eq!(status, 200, "{reason}");
    }
    // Refused: the POST never reached anything, so it goes to the other instance.
    for i in 0..6 {
        let (status, reason, body) = call(&c, m.a.addrs.outbound, "POST", "gone", &format!("pay-{i}")).await;
        assert_eq!((status, body.as_str()), (200, "good2"), "{reason}");
    }
    assert_eq!(good2.hits(), 6);
    assert_eq!(good2.last_body.lock().unwrap().as_slice(), b"pay-5", "the retried POST lost its body");
    let metrics = m.a.metrics().await;
    assert!(
        metric(&metrics, "quicmesh_retries_total", &[("service", "gone"), ("reason", "unsent")]) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "quicmesh_retries_total", &[("service", "web"), ("reason", "failed")]) >= 1.0,
        "{metrics}"
    );
    let _ = (&m.b, &m.c, &m.pki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let down = Backend::start("down", Duration::ZERO).await;
    down.fail_with(503);
    let also_down = Backend::start("also-down", Duration::ZERO).await;
    also_down.fail_with(503);
    let policy = "retry = { attempts = 3, backoff = \"1ms\", max_backoff = \"2ms\", budget = { ratio = 0.2, min_per_second = 0 } }\noutlier = { consecutive_failures = 0 }";
    let m = three_nodes(&web(down.addr, also_down.addr, policy)).await;
    let c = client();
    let requests = 100;
    for _ in 0..requests {
        let (status, _, _) = call(&c, m.a.addrs.outbound, "GET", "web", "").await;
        assert_eq!(status, 503);
    }
    let sent = down.hits() + also_down.hits();
    // Without a budget: 4 tries each (400). With it: at most 20% more than the requests.
    assert!(sent >= requests, "{sent}");
    assert!(sent <= requests + requests / 5 + 1, "{sent} tries for {requests} requests: the budget did not hold");
    let metrics = m.a.metrics().await;
    assert!(metric(&metrics, "quicmesh_retry_budget_exhausted_total", &[("service", "web")]) >= 1.0, "{metrics}");
    let _ = (&m.b, &m.c, &m.pki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_then_tried_again() {
    let bad = Backend::start("bad", Duration::ZERO).await;
    bad.fail_with(500);
    let fine = Backend::start("fine", Duration::ZERO).await;
    let policy = "lb = { policy = \"round_robin\" }\noutlier = { consecutive_failures = 3, base_ejection = \"1s\" }";
    let m = three_nodes(&web(bad.addr, fine.addr, policy)).await;
    let c = client();
    // 500 is not a retried status, so failures reach the client until the ejection.
    let mut served = Vec::new();
    for _ in 0..20 {
        served.push(call(&c, m.a.addrs.outbound, "GET", "web", "").await.0);
    }
    assert_eq!(bad.hits(), 3, "ejected after three failures in a row: {served:?}");
    assert!(served[served.len() - 10..].iter().all(|s| *s == 200), "{served:?}");
    let metrics = m.a.metrics().await;
    assert_eq!(metric(&metrics, "quicmesh_outlier_ejections_total", &[("service", "web")]), 1.0, "{metrics}");
    assert_eq!(ejected(&m.a).await, [true, false]);
    // The ejection ends after base_ejection and the endpoint gets traffic again.
    let start = Instant::now();
    eventually(Duration::from_secs(10), "the ejected endpoint to be tried again", || async {
        call(&c, m.a.addrs.outbound, "GET", "web", "").await;
        (bad.hits() > 3).then_some(())
    })
    .await;
    assert!(start.elapsed() >= Duration::from_millis(500), "ejection ended too early: {:?}", start.elapsed());
    let _ = (&m.b, &m.c, &m.pki);
}

/// A caller's own deadline (`grpc-timeout`) shorter than the endpoints answer is that caller's
/// problem: its calls time out, but they are not counted against the endpoints, which stay in
/// rotation for everyone else (outlier detection ejects after two failures in a row here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_never_ejects_an_endpoint() {
    let b = Backend::start("b", Duration::from_millis(150)).await;
    let c = Backend::start("c", Duration::from_millis(150)).await;
    let policy = "lb = { policy = \"round_robin\" }\noutlier = { consecutive_failures = 2, base_ejection = \"60s\" }";
    let m = three_nodes(&web(b.addr, c.addr, policy)).await;
    let client = client();
    // Connections to both peers made first: the short calls below then all reach their tries.
    for _ in 0..2 {
        assert_eq!(call(&client, m.a.addrs.outbound, "GET", "web", "").await.0, 200);
    }
    for _ in 0..8 {
        let (status, reason, _) =
            call_headers(&client, m.a.addrs.outbound, "GET", "web", "/", "", &[("grpc-timeout", "20m")]).await;
        assert_eq!((status, reason.as_str()), (504, "timeout"));
    }
    let metrics = m.a.metrics().await;
    assert_eq!(metric(&metrics, "quicmesh_outlier_ejections_total", &[("service", "web")]), 0.0, "{metrics}");
    assert_eq!(ejected(&m.a).await, [false, false]);
    // Another caller, without the short deadline, is served by both.
    let (b0, c0) = (b.hits(), c.hits());
    for _ in 0..4 {
        assert_eq!(call(&client, m.a.addrs.outbound, "GET", "web", "").await.0, 200);
    }
    assert!(b.hits() - b0 >= 1 && c.hits() - c0 >= 1, "{} / {}", b.hits() - b0, c.hits() - c0);
    let _ = (&m.b, &m.c, &m.pki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_timeouts_answer_504_and_cancel_the_try() {
    let (slow, accepted) = silent_backend_counted().await;
    let quick = Backend::start("quick", Duration::ZERO).await;
    let routes =
        "[[routes]]\nname = \"slow\"\nhostnames = [\"slow\"]\n[[routes.rules]]\ntimeouts = { request = \"300ms\" }\n\
                  [[routes.rules.backendRefs]]\nname = \"web\"\nlabels = { speed = \"slow\" }\n\n\
                  [[routes]]\nname = \"per-try\"\nhostnames = [\"per-try\"]\n[[routes.rules]]\n\
                  timeouts = { request = \"3s\", backendRequest = \"200ms\" }\n\
                  [[routes.rules.backendRefs]]\nname = \"web\"\n";
    let services = format!(
        "[[services]]\nname = \"web\"\nlb = {{ policy = \"round_robin\" }}\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{slow}\"\nlabels = {{ speed = \"slow\" }}\n\n\
         [[services.endpoints]]\nnode = \"node-c\"\naddress = \"{}\"\n\n{routes}",
        quick.addr
    );
    let m = three_nodes(&services).await;
    let c = client();
    let start = Instant::now();
    let (status, reason, _) = call(&c, m.a.addrs.outbound, "GET", "slow", "").await;
    let took = start.elapsed();
    assert_eq!((status, reason.as_str()), (504, "timeout"));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "a timed-out try is not repeated without backendRequest");
    // The far node saw its stream cancelled and gave up its request to the instance.
    eventually(Duration::from_secs(10), "node-b to count the cancelled request", || async {
        let mb = m.b.metrics().await;
        (metric(&mb, "quicmesh_requests_total", &[("direction", "inbound"), ("service", "web")]) >= 1.0).then_some(())
    })
    .await;
    // With a per-try timeout, a try that times out is retried on the other endpoint.
    for _ in 0..4 {
        let start = Instant::now();
        let (status, reason, body) = call(&c, m.a.addrs.outbound, "GET", "per-try", "").await;
        assert_eq!((status, body.as_str()), (200, "quick"), "{reason}");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
    assert!(accepted.load(Ordering::SeqCst) >= 2, "round robin never sent a try to the silent endpoint");
    let ma = m.a.metrics().await;
    assert!(metric(&ma, "quicmesh_retries_total", &[("service", "web"), ("reason", "failed")]) >= 1.0, "{ma}");
    let _ = (&m.c, &m.pki);
}

/// A gateway routing to `web`, served on node-b by a backend named `name` answering after
/// `delay`.
async fn gateway_and_web(name: &'static str, delay: Duration) -> (Pki, NodeProc, Backend, NodeProc) {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-b");
    let gw = gateway_to_web(&dir);
    let be = Backend::start(name, delay).await;
    let b =
        NodeProc::start(&dir, "node-b", &joined_toml("node-b", &dir, gw.addrs.control, &instance("web", be.addr, "")));
    (pki, gw, be, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_gateway_lets_requests_in_flight_finish() {
    let (pki, mut gw, be, _b) = gateway_and_web("slow-web", Duration::from_millis(800)).await;
    let port = gw.addrs.listen.port();
    let (_ep, h3) = h3_connect(port).await;
    let url = format!("https://localhost:{port}/slow");
    eventually(Duration::from_secs(20), "the backend to be reachable", || {
        let (mut h3, url) = (h3.clone(), url.clone());
        async move { (h3_request(&mut h3, http::Request::get(url).body(()).unwrap(), b"").await.0 == 200).then_some(()) }
    })
    .await;
    let before = be.hits();
    let mut h3b = h3.clone();
    let in_flight =
        tokio::spawn(async move { h3_request(&mut h3b, http::Request::get(url).body(()).unwrap(), b"").await });
    wait_hits(&be, before + 1, "the request to reach the backend").await;
    let stopped = tokio::task::spawn_blocking(move || {
        gw.terminate();
        gw
    });
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"slow-web"[..]), "the request in flight was cut");
    let gw = stopped.await.unwrap();
    assert!(gw.log().contains("drained; every request in flight finished"), "{}", gw.log());
    drop(pki);
}

/// A client's HTTP/1.1 keep-alive connection to the edge, over TLS.
async fn edge_h1(port: u16) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    send
}

/// One GET on `send`: status, `connection` header, body; `Err` when the connection failed.
async fn edge_h1_get(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> Result<(u16, String, String), String> {
    use http_body_util::BodyExt;
    send.ready().await.map_err(|e| format!("connection not usable: {e}"))?;
    let req = http::Request::get(path).header("host", "localhost").body(Default::default()).unwrap();
    let resp = send.send_request(req).await.map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    let connection = resp.headers().get("connection").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, connection, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_gateway_still_answers_a_kept_alive_connection_next_request() {
    let (pki, mut gw, _be, _b) = gateway_and_web("web", Duration::ZERO).await;
    let port = gw.addrs.listen.port();
    eventually(Duration::from_secs(20), "the backend to be reachable", || async {
        let mut send = edge_h1(port).await;
        (edge_h1_get(&mut send, "/").await.is_ok_and(|(s, _, _)| s == 200)).then_some(())
    })
    .await;
    // A client's connection, kept alive after one request, idle when the drain begins.
    let mut kept = edge_h1(port).await;
    let (status, connection, _) = edge_h1_get(&mut kept, "/").await.unwrap();
    assert_eq!((status, connection.as_str()), (200, ""), "kept alive before the drain");
    // Nothing is in flight, but a second client is connected and silent: its connection holds
    // the drain open until its grace ends.
    let _silent = edge_h1(port).await;
    let admin = gw.addrs.admin;
    let sigterm = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || {
        gw.terminate();
        gw
    });
    eventually(Duration::from_secs(10), "the gateway to start draining", || async {
        (http_get(&format!("http://{admin}/ready")).await.0 == 503).then_some(())
    })
    .await;
    // The client writes its next request a moment into the drain, as a client that had not
    // seen it yet would: well within the edge's grace for a last request, and long after an
    // edge that closes idle connections at once would have closed this one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = edge_h1_get(&mut kept, "/").await;
    assert_eq!(answer, Ok((200, "close".to_string(), "web".to_string())), "the kept-alive connection's next request");
    let gw = stopped.await.unwrap();
    let grace = quicmesh_shared::proxy::drain::LAST_REQUEST_GRACE;
    assert!(sigterm.elapsed() >= grace, "exited {:?} after SIGTERM, inside a connection's grace", sigterm.elapsed());
    assert!(gw.log().contains("drained; every request in flight finished"), "{}", gw.log());
    drop(pki);
}

fn instance(service: &str, addr: SocketAddr, health: &str) -> String {
    format!("[[node.instances]]\nservice = \"{service}\"\naddress = \"{addr}\"\n{health}\n")
}

/// Healthy flags of `web`'s endpoints as a node sees them, by address.
async fn health_seen(node: &NodeProc) -> Vec<(String, bool)> {
    let doc = node.admin_json("/endpoints").await;
    let mut out = Vec::new();
    for svc in doc["services"].as_array().unwrap() {
        if svc["name"] == "web" {
            for ep in svc["endpoints"].as_array().unwrap() {
                out.push((ep["address"].as_str().unwrap().to_string(), ep["healthy"].as_bool().unwrap_or(true)));
            }
        }
    }
    out.sort();
    out
}

/// A gateway and three joined nodes: node-b hosts `web` on the backend `on_b`, node-c on
/// `on_c`, node-a is the client's node; returned once node-a knows both instances.
struct Drill {
    pki: Pki,
    gw: NodeProc,
    on_b: Backend,
    on_c: Backend,
    b: NodeProc,
    c: NodeProc,
    a: NodeProc,
}

impl Drill {
    /// Backends named `leaving` and `staying`, answering after `delay`, without health checks.
    async fn start(delay: Duration) -> Drill {
        Self::start_with(["leaving", "staying"], delay, "").await
    }

    /// `names` of the backends on node-b and node-c; `check` is added to both instances.
    async fn start_with(names: [&'static str; 2], delay: Duration, check: &str) -> Drill {
        Self::start_full(names, delay, check, 1, "lean").await
    }

    /// Like [`Drill::start_with`], node-b running `b_workers` event loops and framing its
    /// requests as `b_framing` says (`transport.framing`).
    async fn start_full(
        names: [&'static str; 2],
        delay: Duration,
        check: &str,
        b_workers: usize,
        b_framing: &str,
    ) -> Drill {
        let pki = Pki::new();
        let dir = pki.issue("gateway");
        for n in ["node-a", "node-b", "node-c"] {
            pki.issue(n);
        }
        let gw = NodeProc::start_layered(
            "gateway",
            &gateway_layers(&dir, "[[services]]\nname = \"web\"\nlb = { policy = \"round_robin\" }", ""),
        );
        let on_b = Backend::start(names[0], delay).await;
        let on_c = Backend::start(names[1], delay).await;
        let node = |name: &str, be: Option<&Backend>| {
            let inst = be.map(|be| instance("web", be.addr, check)).unwrap_or_default();
            let mut toml = joined_toml(name, &dir, gw.addrs.control, &inst);
            if name == "node-b" {
                let at = format!("[node]\nname = \"{name}\"\n");
                toml = toml.replacen(&at, &format!("{at}workers = {b_workers}\n"), 1);
                toml = with_framing(&toml, b_framing);
            }
            NodeProc::start(&dir, name, &toml)
        };
        let b = node("node-b", Some(&on_b));
        let c = node("node-c", Some(&on_c));
        let a = node("node-a", None);
        eventually(Duration::from_secs(20), "both instances known to node-a", || async {
            (health_seen(&a).await.len() == 2).then_some(())
        })
        .await;
        Drill { pki, gw, on_b, on_c, b, c, a }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_takes_an_instance_out_of_every_rotation() {
    let check = "health = { http = \"/health\", interval = \"100ms\", timeout = \"500ms\", healthy_threshold = 2, unhealthy_threshold = 2 }";
    let Drill { pki, gw, on_b: sick, on_c: well, b, c, a } =
        Drill::start_with(["sick", "well"], Duration::ZERO, check).await;
    let cl = client();
    // Both in rotation first.
    eventually(Duration::from_secs(20), "both instances to serve", || async {
        call(&cl, a.addrs.outbound, "GET", "web", "").await;
        (sick.hits() > 0 && well.hits() > 0).then_some(())
    })
    .await;
    sick.set_healthy(false);
    let mut want_out = vec![(sick.addr.to_string(), false), (well.addr.to_string(), true)];
    want_out.sort();
    for node in [&a, &b, &c, &gw] {
        let w = want_out.clone();
        eventually(Duration::from_secs(20), "every member to see the instance unhealthy", || async {
            (health_seen(node).await == w).then_some(())
        })
        .await;
    }
    let before = sick.hits();
    for _ in 0..20 {
        let (status, reason, body) = call(&cl, a.addrs.outbound, "GET", "web", "").await;
        assert_eq!((status, body.as_str()), (200, "well"), "{reason}");
    }
    assert_eq!(sick.hits(), before, "an unhealthy instance got traffic");
    // It passes again and comes back.
    sick.set_healthy(true);
    eventually(Duration::from_secs(20), "the instance to come back", || async {
        call(&cl, a.addrs.outbound, "GET", "web", "").await;
        (sick.hits() > before).then_some(())
    })
    .await;
    let mb = b.metrics().await;
    // One failed check is enough when it is the instance's first (its state is not known yet):
    // a fast start reaches `set_healthy(false)` before node-b's first check.
    assert!(metric(&mb, "quicmesh_health_checks_total", &[("service", "web"), ("result", "fail")]) >= 1.0, "{mb}");
    drop((a, b, c, gw, pki));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_node_under_load_fails_no_request() {
    // A little latency so that requests are in flight when SIGTERM arrives.
    let mut d = Drill::start(Duration::from_millis(20)).await;
    let load = Load::start(d.a.addrs.outbound, "web", 8);
    wait_hits(&d.on_b, 50, "node-b's instance to take traffic").await;
    d.b.terminate();
    load.run_for(300).await;
    let (ok, failures) = load.stop().await;
    assert!(failures.is_empty(), "{} of {} failed: {:?}", failures.len(), ok, &failures[..failures.len().min(10)]);
    assert!(d.b.log().contains("drained"), "{}", d.b.log());
    drop((d.a, d.b, d.gw, d.pki));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_serving_node_cuts_no_response_body() {
    // Issue #22: bodies still streaming from a draining node arrive whole, while new requests
    // meet its GOAWAY and go elsewhere.
    let mut d = Drill::start(Duration::ZERO).await;
    // Bodies of 8 KiB over about 240 ms, and short requests that meet the GOAWAY.
    let slow = Load::start_path(d.a.addrs.outbound, "web", 6, "/slow/8", Some(8 * 1024));
    let short = Load::start(d.a.addrs.outbound, "web", 2);
    wait_hits(&d.on_b, 20, "node-b's instance to take traffic").await;
    d.b.terminate();
    short.run_for(200).await;
    slow.run_for(40).await;
    let (ok, failures) = slow.stop().await;
    let (short_ok, short_failures) = short.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} bodies failed: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(10)]
    );
    assert!(
        short_failures.is_empty(),
        "{} of {short_ok} short requests failed: {short_failures:?}",
        short_failures.len()
    );
    assert!(d.b.log().contains("drained"), "{}", d.b.log());
    drop((d.a, d.b, d.gw, d.pki));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_keeps_a_connection_until_its_peer_has_the_last_response() {
    keeps_a_connection_until_its_peer_has_the_last_response(1, "lean").await;
}

/// The same with node-b speaking HTTP/3 to its peers (its GOAWAY is h3's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_speaking_http3_keeps_a_connection_until_its_peer_has_the_last_response() {
    keeps_a_connection_until_its_peer_has_the_last_response(1, "h3").await;
}

/// The same with node-b on two event loops: the peer's connection may live on a worker thread
/// while the drain settles on the main one (it is counted from its accept, on the main one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_on_two_workers_keeps_a_connection_until_its_peer_has_the_last_response() {
    keeps_a_connection_until_its_peer_has_the_last_response(2, "lean").await;
}

async fn keeps_a_connection_until_its_peer_has_the_last_response(b_workers: usize, b_framing: &str) {
    // The soak's one broken body: the serving node had handed a response's last bytes to QUIC,
    // so nothing was in flight, and the drain closed the connection before the peer had them
    // (it was starved of CPU there; frozen here): a closed connection's unsent data is lost.
    let mut d = Drill::start_full(["leaving", "staying"], Duration::ZERO, "", b_workers, b_framing).await;
    const KIB: usize = 1024;
    let (resp, _conn) = loop {
        let tcp = tokio::net::TcpStream::connect(d.a.addrs.outbound).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(format!("/late/{KIB}")).header("host", "web").body(Default::default()).unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Round robin: keep the answer that came from node-b's instance.
        if resp.headers().get("x-backend").is_some_and(|v| v == "leaving") {
            break (resp, (send, conn));
        }
    };
    // The framing the pair speaks is the one node-b is set to prefer (a few milliseconds of
    // the `LATE` the body waits).
    assert_eq!(d.a.framing_to("node-b").await, b_framing);
    // The body comes `LATE` after the head: node-a is frozen by then, so node-b's QUIC holds
    // what node-a's flow control allows (all of it) and can send only a congestion window.
    d.a.signal("STOP");
    let frozen = Instant::now();
    eventually(Duration::from_secs(10), "node-b to hand the whole body to QUIC", || async {
        let mb = d.b.metrics().await;
        (metric(&mb, "quicmesh_requests_in_flight", &[("direction", "inbound"), ("service", "web")]) == 0.0)
            .then_some(())
    })
    .await;
    d.b.signal("TERM");
    // Without the fix node-b closes over the unsent bytes and exits; with it, it waits.
    eventually(Duration::from_secs(10), "node-b to exit or to wait for node-a", || {
        let seen = d.b.exited() || d.b.log().contains("waiting for the peer to close");
        async move { seen.then_some(()) }
    })
    .await;
    d.a.signal("CONT");
    // Frozen for longer than the tests' QUIC idle timeout (3 s), node-b would give up on node-a.
    let frozen = frozen.elapsed();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.map(|b| b.to_bytes().len());
    assert_eq!(
        body.ok(),
        Some(KIB * 1024),
        "the body arrives whole (node-a was frozen for {frozen:?}); node-b's log:\n{}",
        d.b.log()
    );
    eventually(Duration::from_secs(10), "node-b to end its drain", || {
        let exited = d.b.exited();
        async move { exited.then_some(()) }
    })
    .await;
    assert!(d.b.log().contains("drained; every request in flight finished"), "{}", d.b.log());
    drop((d.a, d.c, d.gw, d.pki));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stalls_fails_after_the_routes_stream_idle_timeout() {
    // Issue #22, cause 3: after its headers nothing bounded a response; a route's
    // `timeouts.streamIdle` does now, and the failure is counted as the proxy's timeout.
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-a");
    pki.issue("node-b");
    let routes = "[[routes]]\nname = \"web\"\nhostnames = [\"web\"]\n[[routes.rules]]\n\
                  backendRefs = [{ name = \"web\" }]\ntimeouts = { streamIdle = \"300ms\" }\n";
    let gw = NodeProc::start_layered(
        "gateway",
        &gateway_layers(&dir, &format!("[[services]]\nname = \"web\"\n\n{routes}"), ""),
    );
    let be = Backend::start("web", Duration::ZERO).await;
    let b =
        NodeProc::start(&dir, "node-b", &joined_toml("node-b", &dir, gw.addrs.control, &instance("web", be.addr, "")));
    let a = NodeProc::start(&dir, "node-a", &joined_toml("node-a", &dir, gw.addrs.control, ""));
    let c = client();
    eventually(Duration::from_secs(20), "web to answer through node-a", || async {
        (call(&c, a.addrs.outbound, "GET", "web", "").await.0 == 200).then_some(())
    })
    .await;
    let start = Instant::now();
    let stalled = tokio::time::timeout(
        Duration::from_secs(8),
        call_headers(&c, a.addrs.outbound, "GET", "web", "/stall/2", "", &[]),
    )
    .await
    .expect("a stalled body was still open after 8 s");
    let took = start.elapsed();
    assert_eq!(stalled.0, 0, "the body breaks off: {stalled:?}");
    assert!(took < Duration::from_secs(3), "stalled for {took:?}, with streamIdle 300ms");
    let labels = [("direction", "outbound"), ("service", "web"), ("error", "timeout")];
    eventually(Duration::from_secs(10), "the stalled body counted as a timeout", || async {
        (metric(&a.metrics().await, "quicmesh_requests_total", &labels) >= 1.0).then_some(())
    })
    .await;
    drop((a, b, gw, pki));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rate_limits_and_injects_faults_per_route() {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-b");
    let routes = "[[gateway.routes]]\nname = \"limited\"\nrateLimit = { requestsPerSecond = 0.2, burst = 3 }\n\
                  [[gateway.routes.rules]]\nmatches = [{ path = { type = \"PathPrefix\", value = \"/limited\" } }]\n\
                  [[gateway.routes.rules.backendRefs]]\nname = \"web\"\n\n\
                  [[gateway.routes]]\nname = \"chaos\"\n\
                  [[gateway.routes.rules]]\nmatches = [{ path = { type = \"PathPrefix\", value = \"/abort\" } }]\n\
                  fault = { abort = { percent = 100, httpStatus = 418 } }\n\
                  [[gateway.routes.rules.backendRefs]]\nname = \"web\"\n\
                  [[gateway.routes.rules]]\nmatches = [{ path = { type = \"PathPrefix\", value = \"/delay\" } }]\n\
                  fault = { delay = { percent = 100, fixedDelay = \"400ms\" } }\n\
                  [[gateway.routes.rules.backendRefs]]\nname = \"web\"\n";
    let gw = NodeProc::start_layered("gateway", &gateway_layers(&dir, "[[services]]\nname = \"web\"", routes));
    let be = Backend::start("web", Duration::ZERO).await;
    let _b =
        NodeProc::start(&dir, "node-b", &joined_toml("node-b", &dir, gw.addrs.control, &instance("web", be.addr, "")));
    let (_ep, mut h3) = h3_connect(gw.addrs.listen.port()).await;
    let url = |p: &str| format!("https://localhost:{}{p}", gw.addrs.listen.port());
    eventually(Duration::from_secs(20), "the backend to be reachable", || {
        let req = http::Request::get(url("/delay/warmup")).body(()).unwrap();
        let mut h3 = h3.clone();
        async move { (h3_request(&mut h3, req, b"").await.0 == 200).then_some(()) }
    })
    .await;
    // Delay: the answer comes, no sooner than the injected delay.
    let start = Instant::now();
    let (status, _, _) = h3_request(&mut h3, http::Request::get(url("/delay/x")).body(()).unwrap(), b"").await;
    assert_eq!(status, 200);
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    // Abort: the status asked for, made by the proxy, and the backend never sees it.
    let hits = be.hits();
    let (status, headers, _) = h3_request(&mut h3, http::Request::get(url("/abort")).body(()).unwrap(), b"").await;
    assert_eq!((status, headers["quicmesh-error"].to_str().unwrap()), (418, "fault-injected"));
    assert_eq!(be.hits(), hits);
    // Rate limit: the burst passes, then 429 with retry-after.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let (status, headers, _) =
            h3_request(&mut h3, http::Request::get(url("/limited")).body(()).unwrap(), b"").await;
        if status == 429 {
            assert_eq!(headers["quicmesh-error"], "rate-limited");
            retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert!(retry_after.is_some_and(|s| (1..=5).contains(&s)), "{retry_after:?}");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "quicmesh_rate_limited_total", &[("route", "limited")]), 3.0, "{m}");
    assert!(metric(&m, "quicmesh_faults_injected_total", &[("route", "chaos"), ("kind", "abort")]) >= 1.0, "{m}");
    drop((gw, pki));
}

/// A rule's `timeouts.request` longer than the mesh's own `timeouts.request` (here 1 s) is the
/// limit on both nodes: the calling node lets the try run that long, and the delivering node
/// waits as long as the caller says, rather than cutting the answer off at its own 1 s with a
/// 504. The mesh's limit still holds where no rule sets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_timeout_longer_than_the_mesh_default_holds_on_both_nodes() {
    let slow = delayed_backend("slow", Duration::from_millis(1500)).await;
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let services = format!(
        "[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{slow}\"\n\n\
         [[routes]]\nname = \"patient\"\nhostnames = [\"patient\"]\n[[routes.rules]]\ntimeouts = {{ request = \"5s\" }}\n\
         backendRefs = [{{ name = \"web\" }}]\n"
    );
    let short = |t: String| t.replace("request = \"10s\"", "request = \"1s\"");
    let b = NodeProc::start(pki.path(), "node-b", &short(node_toml("node-b", &state, &[], &services)));
    let a = NodeProc::start(
        pki.path(),
        "node-a",
        &short(node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &services)),
    );
    let c = client();
    let (status, reason, body) = call(&c, a.addrs.outbound, "GET", "patient", "").await;
    assert_eq!((status, reason.as_str(), body.as_str()), (200, "", "slow"), "the rule allows 5 s");
    let (status, reason, _) = call(&c, a.addrs.outbound, "GET", "web", "").await;
    assert_eq!((status, reason.as_str()), (504, "timeout"), "no rule: the mesh's 1 s");
}

/// An upload the instance stops reading (its node's stream, then ours, out of credit) that
/// runs past the try's time is the endpoint's timeout, 504 `timeout`, and counts against it,
/// though the client's body had not all gone: it was the upstream that waited, not the
/// client. (A body whose client stalls is its own delay, 408: `tests/hostile.rs`.) The client
/// sends in paced pieces, so the proxy often finds none ready when it looks ahead for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_instance_does_not_read_is_the_instances_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stuck = silent_backend().await;
    let services = format!(
        "[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{stuck}\"\n\n\
         [[routes]]\nname = \"upload\"\nhostnames = [\"upload\"]\n[[routes.rules]]\ntimeouts = {{ request = \"3s\" }}\n\
         [[routes.rules.backendRefs]]\nname = \"web\"\n"
    );
    let m = three_nodes(&services).await;
    let tcp = tokio::net::TcpStream::connect(m.a.addrs.outbound).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let total = 64usize << 20;
    tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: upload\r\nContent-Length: {total}\r\n\r\n");
        writer.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![7u8; 64 << 10];
        for _ in 0..total / piece.len() {
            if writer.write_all(&piece).await.is_err() {
                break;
            }
            // Paced: the client's rate, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("no answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504") && answer.contains("quicmesh-error: timeout"), "{answer}");
}
