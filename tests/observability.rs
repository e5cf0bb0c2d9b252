//! End-to-end tests of observability: exact request metrics on both sides of a hop, the access
//! log, W3C trace propagation, runtime log control, `quicmesh status` and `quicmesh top`, and
//! the metrics as Prometheus' own tools see them (`promtool`, a real Prometheus server).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::backend::Backend;
use support::*;

/// A gateway, node-a hosting `front` (so its calls come from `front`) and node-b hosting `web`
/// (a programmable backend) and `echo` (reflects requests as JSON).
struct Mesh {
    a: NodeProc,
    b: NodeProc,
    gw: NodeProc,
    web: Backend,
    dir: PathBuf,
    _pki: Pki,
}

async fn mesh(a_extra: &str) -> Mesh {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-a");
    pki.issue("node-b");
    let routes = "[[gateway.routes]]\nname = \"edge-web\"\n[[gateway.routes.rules]]\n\
                  [[gateway.routes.rules.backendRefs]]\nname = \"web\"\n";
    let gw = NodeProc::start_layered("gateway", &gateway_layers(&dir, "[[services]]\nname = \"web\"", routes));
    let web = Backend::start("web-answer", Duration::ZERO).await;
    let echo = echo_backend().await;
    let front = Backend::start("front", Duration::ZERO).await;
    let b_instances = format!(
        "[[node.instances]]\nservice = \"web\"\naddress = \"{}\"\n\n[[node.instances]]\nservice = \"echo\"\naddress = \"{echo}\"\n",
        web.addr
    );
    let b = NodeProc::start(&dir, "node-b", &joined_toml("node-b", &dir, gw.addrs.control, &b_instances));
    let a_instances = format!("[[node.instances]]\nservice = \"front\"\naddress = \"{}\"\n\n{a_extra}", front.addr);
    let a = NodeProc::start(&dir, "node-a", &joined_toml("node-a", &dir, gw.addrs.control, &a_instances));
    // Ready when node-a routes to web and knows it hosts front.
    let m = Mesh { a, b, gw, web, dir: dir.clone(), _pki: pki };
    eventually(Duration::from_secs(20), "node-a to reach web and echo", || async {
        let ok = send(&m.a, "GET", "web", &[], "").await.0 == 200 && send(&m.a, "GET", "echo", &[], "").await.0 == 200;
        ok.then_some(())
    })
    .await;
    drop(front);
    m
}

/// One request through a node's outbound listener: (status, headers, body).
async fn send(
    node: &NodeProc,
    method: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req =
        http::Request::builder().method(method).uri(format!("http://{}/obs", node.addrs.outbound)).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    match client.request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let h = r.headers().clone();
            let b = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, h, String::from_utf8_lossy(&b).into_owned())
        }
        Err(e) => (0, http::HeaderMap::new(), e.to_string()),
    }
}

/// GETs for `web` through a node's outbound listener until stopped, `pause` apart.
struct Background {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Background {
    fn start(outbound: SocketAddr, pause: Duration) -> Background {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{outbound}/"))
                    .header("host", "web")
                    .body(Default::default())
                    .unwrap();
                let _ = client.request(req).await;
                tokio::time::sleep(pause).await;
            }
        });
        Background { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_breaks_off_counts_as_a_failure() {
    // Issue #22: a 200 whose body broke off is not a success, on either node's metrics, nor in
    // node-a's access log.
    let log = tempfile::NamedTempFile::new().unwrap();
    let m = mesh(&format!("[access_log]\noutput = \"file\"\npath = \"{}\"\nformat = \"json\"\n", log.path().display()))
        .await;
    let (status, reason, body) = send(&m.a, "GET", "web", &[], "").await;
    assert_eq!((status, body.as_str()), (200, "web-answer"), "{reason:?}");
    let before = [m.a.metrics().await, m.b.metrics().await];
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(format!("http://{}/cut/2", m.a.addrs.outbound))
        .header("host", "web")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "the body should have broken off");
    for ((node, direction), before) in [(&m.a, "outbound"), (&m.b, "inbound")].into_iter().zip(&before) {
        let labels = [("direction", direction), ("service", "web"), ("code", "200")];
        let broken = [&labels[..], &[("error", "upstream-reset")]].concat();
        let delta = |now: &str, l: &[(&str, &str)]| {
            metric(now, "quicmesh_requests_total", l) - metric(before, "quicmesh_requests_total", l)
        };
        let now = eventually(Duration::from_secs(10), "the broken body to be counted", || async {
            let now = node.metrics().await;
            (delta(&now, &broken) == 1.0).then_some(now)
        })
        .await;
        assert_eq!(delta(&now, &labels), 1.0, "counted once, as a failure only, at {direction}:\n{now}");
    }
    let lines = eventually(Duration::from_secs(10), "node-a's access-log line for /cut/2", || async {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["path"] == "/cut/2")
            .collect();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    for line in lines {
        assert_eq!((line["status"].as_u64(), line["error"].as_str()), (Some(200), Some("upstream-reset")), "{line}");
    }
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_move_by_exactly_the_requests_sent() {
    let m = mesh("").await;
    let out = [("direction", "outbound"), ("source_service", "front"), ("service", "web")];
    let inb = [("direction", "inbound"), ("source_service", "front"), ("service", "web")];
    let (ma0, mb0) = (m.a.metrics().await, m.b.metrics().await);
    let count = |t: &str, l: &[(&str, &str)]| metric(t, "quicmesh_requests_total", l);
    let hist = |t: &str, l: &[(&str, &str)]| metric(t, "quicmesh_request_duration_seconds_count", l);
    let bytes_in = |t: &str, l: &[(&str, &str)]| metric(t, "quicmesh_request_bytes_total", l);
    let bytes_out = |t: &str, l: &[(&str, &str)]| metric(t, "quicmesh_response_bytes_total", l);
    let n = 17.0;
    for _ in 0..17 {
        let (status, _, body) = send(&m.a, "POST", "web", &[], "0123456789").await;
        assert_eq!((status, body.as_str()), (200, "web-answer"));
    }
    let answer = "web-answer".len() as f64;
    let (ma, mb) = eventually(Duration::from_secs(10), "both sides to record every request", || async {
        let (ma, mb) = (m.a.metrics().await, m.b.metrics().await);
        let done = count(&ma, &out) - count(&ma0, &out) == n
            && count(&mb, &inb) - count(&mb0, &inb) == n
            && bytes_out(&ma, &out) - bytes_out(&ma0, &out) == n * answer
            && bytes_out(&mb, &inb) - bytes_out(&mb0, &inb) == n * answer;
        done.then_some((ma, mb))
    })
    .await;
    for (now, before, labels) in [(&ma, &ma0, &out[..]), (&mb, &mb0, &inb[..])] {
        let code = [labels, &[("code", "200"), ("route", "none")]].concat();
        assert_eq!(count(now, &code) - count(before, &code), n, "by code:\n{now}");
        assert_eq!(hist(now, labels) - hist(before, labels), n, "histogram count:\n{now}");
        assert_eq!(bytes_in(now, labels) - bytes_in(before, labels), n * 10.0, "request bytes:\n{now}");
        assert_eq!(metric(now, "quicmesh_requests_in_flight", &[("service", "web")]), 0.0);
    }
    // QUIC per peer: the connection from node-a to node-b carried the streams and has an RTT.
    let streams = metric(&ma, "quicmesh_quic_streams_total", &[("direction", "outbound"), ("peer", "node-b")]);
    assert!(streams >= n, "{ma}");
    let rtt = eventually(Duration::from_secs(10), "node-a to export the RTT to node-b", || async {
        let ma = m.a.metrics().await;
        let rtt = metric(&ma, "quicmesh_quic_rtt_seconds", &[("direction", "outbound"), ("peer", "node-b")]);
        (rtt > 0.0).then_some(rtt)
    })
    .await;
    assert!(rtt < 1.0, "{rtt}");
    let _ = (&m.gw, &m.web, &m.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_the_request_and_traces_reach_the_backend() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let m = mesh(&format!("[access_log]\noutput = \"file\"\npath = \"{}\"\nformat = \"json\"\n", log.path().display()))
        .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace}-00f067aa0ba902b7-01");
    let (status, _, body) = send(
        &m.a,
        "GET",
        "echo",
        &[("x-request-id", "obs-req-1"), ("traceparent", &incoming), ("tracestate", "v=1")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tp = seen["headers"]["traceparent"].as_str().unwrap();
    assert!(tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"), "{tp}");
    assert_ne!(tp, incoming, "the proxy is a span of its own");
    assert_eq!(seen["headers"]["tracestate"], "v=1");
    // Without one, a trace starts here.
    let (_, _, body) = send(&m.a, "GET", "echo", &[], "").await;
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let started = seen["headers"]["traceparent"].as_str().unwrap().to_string();
    assert_eq!(started.len(), 55, "{started}");
    let line = eventually(Duration::from_secs(10), "the access-log line", || async {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .find(|v| v["request_id"] == "obs-req-1")
    })
    .await;
    assert_eq!(line["trace_id"], trace);
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["src.service"], "front");
    assert_eq!((line["src.node"].as_str(), line["dst.node"].as_str()), (Some("node-a"), Some("node-b")));
    assert_eq!(line["dst.service"], "echo");
    assert_eq!((line["method"].as_str(), line["path"].as_str()), (Some("GET"), Some("/obs")));
    assert_eq!(line["status"], 200);
    assert_eq!(line["retries"], 0);
    assert!(line["bytes_sent"].as_u64().unwrap() > 0 && line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert!(line["endpoint"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    let _ = (&m.b, &m.gw, &m.web, &m.dir);
}

/// A node whose stderr nobody reads (a stuck log pipe) keeps serving: it runs its data path on
/// one thread, so a blocking write there would stop all its traffic. Lines it cannot write are
/// dropped and counted instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stderr_does_not_stall_a_node() {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let web = Backend::start("web-answer", Duration::ZERO).await;
    let svc = format!(
        "[[services]]\nname = \"web\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{}\"\n",
        web.addr
    );
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    // node-a's stderr is a pipe (64 KiB) that stays open and is never read. Opened read-write,
    // a FIFO does not wait for a peer.
    let fifo = pki.path().join("node-a.log");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let _never_read = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let a = NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &svc));
    // Trace level: about 8 lines (3 KB) per request, so the pipe is full within a few dozen
    // requests, and the writer's buffer (1024 lines) soon after.
    let url = format!("http://{}/logging?filter=trace", a.addrs.admin);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let set = http::Request::post(url).header("content-type", "application/json").body(http_body_util::Empty::new());
    let set = set.unwrap();
    assert_eq!(client.request(set).await.unwrap().status(), 200);
    for i in 0..1500 {
        let req = http::Request::get(format!("http://{}/stuck", a.addrs.outbound))
            .header("host", "web")
            .body(http_body_util::Empty::new())
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .unwrap_or_else(|_| panic!("request {i} stalled: the node is blocked on its log"))
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        assert_eq!(status, 200, "request {i}");
    }
    // Both filled: lines were dropped, and counted (published every 5 s).
    eventually(Duration::from_secs(15), "dropped log lines to be counted", || async {
        (metric(&a.metrics().await, "quicmesh_log_dropped_total", &[]) > 0.0).then_some(())
    })
    .await;
    let _ = &web;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_changes_at_runtime() {
    let m = mesh("").await;
    let url = format!("http://{}/logging", m.a.addrs.admin);
    let (status, body) = http_get(&url).await;
    assert_eq!(status, 200);
    assert!(body.contains("quicmesh_node=debug"), "{body}");
    let post = |q: &'static str| {
        let url = format!("{url}{q}");
        async move {
            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-X",
                    "POST",
                    "-H",
                    "content-type: application/json",
                    &url,
                ])
                .output();
            match out {
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => panic!("curl: {e}"),
            }
        }
    };
    if !require_tool("curl") {
        return;
    }
    assert_eq!(post("?filter=warn").await, "200");
    assert_eq!(http_get(&url).await.1.trim(), "warn");
    assert_eq!(post("?filter=not%5B%5Ba%20filter").await, "400");
    assert_eq!(http_get(&url).await.1.trim(), "warn", "a bad filter changes nothing");
    let _ = (&m.b, &m.gw, &m.web, &m.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_top_show_the_mesh_and_its_traffic() {
    let m = mesh("").await;
    let out =
        std::process::Command::new(bin()).args(["status", "--admin", &m.gw.addrs.admin.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for node in ["node-a", "node-b"] {
        let line = text.lines().find(|l| l.starts_with(node)).unwrap_or_else(|| panic!("{node} missing:\n{text}"));
        assert!(line.contains("yes") && line.contains("current"), "{line}");
    }
    // Steady load from front to web while top samples twice.
    let load = Background::start(m.a.addrs.outbound, Duration::ZERO);
    let admin = m.gw.addrs.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin())
            .args(["top", "--admin", &admin, "--interval", "1s", "--count", "2"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    load.stop().await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("3 components"), "top should read the gateway and both nodes:\n{text}");
    let last = text.rsplit("SOURCE").next().unwrap();
    let row = last.lines().find(|l| l.starts_with("front") && l.contains(" web ")).unwrap_or_else(|| panic!("{text}"));
    let rps: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(rps > 1.0, "{row}");
    assert!(row.contains("100.0%"), "{row}");
    let _ = (&m.b, &m.web, &m.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_every_components_metrics() {
    if !require_tool("promtool") {
        return;
    }
    let m = mesh("").await;
    // Traffic through the gateway too, so its request metrics exist.
    let (_ep, mut h3) = h3_connect(m.gw.addrs.listen.port()).await;
    let url = format!("https://localhost:{}/x", m.gw.addrs.listen.port());
    eventually(Duration::from_secs(20), "the gateway to route to web", || {
        let (mut h3, url) = (h3.clone(), url.clone());
        async move { (h3_request(&mut h3, http::Request::get(url).body(()).unwrap(), b"").await.0 == 200).then_some(()) }
    })
    .await;
    let _ = h3_request(&mut h3, http::Request::get(&url).body(()).unwrap(), b"").await;
    for (name, node) in [("gateway", &m.gw), ("node-a", &m.a), ("node-b", &m.b)] {
        let text = node.metrics().await;
        assert!(text.contains("quicmesh_requests_total"), "{name}:\n{text}");
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool refused {name}'s metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = (&m.web, &m.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_the_mesh_and_answers_a_rate_query() {
    if !require_tool("prometheus") {
        return;
    }
    let m = mesh("").await;
    let targets: Vec<String> = [&m.gw, &m.a, &m.b].iter().map(|n| format!("\"{}\"", n.addrs.admin)).collect();
    let config = m.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: quicmesh\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    // Prometheus takes no port 0: take a free port from the kernel, then hand it over.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = m.dir.join("prometheus-data");
    let log = std::fs::File::create(m.dir.join("prometheus.log")).unwrap();
    let prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(prom);
    let load = Background::start(m.a.addrs.outbound, Duration::from_millis(5));
    let query = "sum(rate(quicmesh_requests_total{direction=%22outbound%22,source_service=%22front%22,service=%22web%22}[10s]))";
    let url = format!("http://127.0.0.1:{port}/api/v1/query?query={query}");
    let rate = eventually(Duration::from_secs(60), "Prometheus to report the front -> web request rate", || {
        let url = url.clone();
        async move {
            let (status, body) = http_get(&url).await;
            if status != 200 {
                return None;
            }
            let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
            let v: f64 = doc["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(v)
        }
    })
    .await;
    load.stop().await;
    assert!(rate > 1.0, "{rate}");
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/api/v1/targets")).await;
    assert_eq!(body.matches("\"health\":\"up\"").count(), 3, "every component scraped: {body}");
    // Every query of the Grafana dashboard is valid PromQL over metrics the mesh exports.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/grafana/quicmesh.json").unwrap()).unwrap();
    let names = std::fs::read_to_string("shared/src/telemetry/metrics.rs").unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "1m");
            let encoded: String = expr
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect();
            let (status, body) = http_get(&format!("http://127.0.0.1:{port}/api/v1/query?query={encoded}")).await;
            assert_eq!(status, 200, "{expr}: {body}");
            for word in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("quicmesh_"))
            {
                let base = word.trim_end_matches("_bucket");
                assert!(names.contains(&format!("\"{base}\"")), "the dashboard uses {word}, which is not exported");
            }
        }
    }
    let _ = (&m.web, &m.gw);
}

/// `GET /` for service `s` on a new local connection to a node's outbound port (so that the
/// node deals it to its next worker), answered 200 within 10 s.
async fn get_on_a_connection_of_its_own(outbound: SocketAddr, what: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: s\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{what} was not answered"))
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
}

/// A node runs its proxy on one thread unless `node.workers` asks for more; the gateway takes a
/// thread per core by default. Each thread is a single-threaded event loop, and accepted
/// connections are dealt out among them: every worker serves its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_threads_follow_the_workers_settings() {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-a");
    pki.issue("node-b");
    // A node refuses to start with nothing to serve: each hosts one service.
    let one = |n: &str| {
        format!("[[services]]\nname = \"s\"\n[[services.endpoints]]\nnode = \"{n}\"\naddress = \"127.0.0.1:9\"\n")
    };
    let a = NodeProc::start(&dir, "node-a", &node_toml("node-a", &dir, &[], &one("node-a")));
    let backend = hello_backend("v1").await;
    let svc =
        format!("[[services]]\nname = \"s\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{backend}\"\n");
    let b = NodeProc::start(
        &dir,
        "node-b",
        &node_toml("node-b", &dir, &[], &svc).replace("[node]\n", "[node]\nworkers = 3\n"),
    );
    let gw = gateway_to_web(&dir);
    let workers = |text: &str, flavor| metric(text, "quicmesh_runtime_workers", &[("flavor", flavor)]);
    assert_eq!(workers(&a.metrics().await, "current_thread"), 1.0);
    assert_eq!(workers(&b.metrics().await, "current_thread"), 3.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(workers(&gw.metrics().await, "current_thread"), cores as f64);
    // Six local connections to node-b: two for each of its workers, in turn, each answered.
    for i in 0..6 {
        get_on_a_connection_of_its_own(b.addrs.outbound, &format!("connection {i} to node-b")).await;
    }
    let text = b.metrics().await;
    for w in ["0", "1", "2"] {
        let handed = metric(&text, "quicmesh_worker_connections_total", &[("worker", w)]);
        assert!(handed >= 2.0, "worker {w} was handed {handed} connections:\n{text}");
    }
    // With one worker nothing is dealt out.
    assert!(!a.metrics().await.contains("quicmesh_worker_connections_total"));
}

/// Each worker of a node dials its peers from a UDP socket of its own, so that the replies to
/// its requests wake the thread that runs them: two local connections to a two-worker node-a
/// (one per worker) reach node-b over two QUIC connections, and `/endpoints` shows them going
/// out from two sockets, worker 0's being the node's own QUIC socket. On node-a's stop, node-b
/// sees both connections closed at once, the worker's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_dials_peers_from_a_socket_of_its_own() {
    let pki = Pki::new();
    let dir = pki.issue("node-a");
    pki.issue("node-b");
    let backend = hello_backend("v1").await;
    let svc =
        format!("[[services]]\nname = \"s\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{backend}\"\n");
    let b = NodeProc::start(&dir, "node-b", &node_toml("node-b", &dir, &[], &svc));
    let a_toml =
        node_toml("node-a", &dir, &[("node-b", b.addrs.inbound)], &svc).replace("[node]\n", "[node]\nworkers = 2\n");
    let mut a = NodeProc::start(&dir, "node-a", &a_toml);
    for i in 0..2 {
        get_on_a_connection_of_its_own(a.addrs.outbound, &format!("connection {i} to node-a")).await;
    }
    let dump = a.admin_json("/endpoints").await;
    let node_b = dump["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node-b").unwrap().clone();
    let conns = node_b["connections"].as_array().unwrap_or_else(|| panic!("no connections in {node_b}"));
    let from = |worker: u64| {
        let c = conns.iter().find(|c| c["worker"] == worker).unwrap_or_else(|| panic!("worker {worker}: {node_b}"));
        assert_eq!(c["remote"], b.addrs.inbound.to_string(), "{node_b}");
        c["local"].as_str().unwrap().parse::<SocketAddr>().unwrap()
    };
    let (own, second) = (from(0), from(1));
    assert_eq!(own, a.addrs.inbound, "worker 0 dials from the node's QUIC socket: {node_b}");
    assert_ne!(second.port(), own.port(), "worker 1 dials from the node's QUIC socket too: {node_b}");
    assert_eq!(second.ip(), own.ip(), "{node_b}");

    let active = |text: &str| metric(text, "quicmesh_quic_connections_active", &[("direction", "inbound")]);
    assert_eq!(active(&b.metrics().await), 2.0);
    a.terminate();
    // Well within the QUIC idle timeout: node-b heard both closes.
    eventually(Duration::from_secs(2), "node-b to see node-a's two connections closed", || async {
        (active(&b.metrics().await) == 0.0).then_some(())
    })
    .await;
}
