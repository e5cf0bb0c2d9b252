//! The dashboard, the live tap and `quicmesh tap`, against the demo's processes. The dashboard is
//! loaded in a real browser (Debian's Chromium, driven through ChromeDriver's WebDriver API):
//! its rendered page must show the demo's services, an edge whose rate rises while this test
//! sends traffic, a service's endpoints and routes, the nodes with their QUIC peers, and a
//! request this test sent in the tap. Screenshots go to `target/tmp/dashboard-*.png`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// ChromeDriver on a free port, and one headless Chromium session through it; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let stdout = driver.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("chromedriver's port");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().parse::<u16>().expect("a port number");
            }
        };
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        // As the machine's notes say: no sandbox as root, and no background calls to the
        // network (refused here, and slow to fail).
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
        let answer = eventually(Duration::from_secs(30), "a WebDriver session", || {
            let (url, caps) = (format!("{base}/session"), caps.to_string());
            async move {
                let v: Value = serde_json::from_str(&http_post_json(&url, &caps).await).ok()?;
                v["value"]["sessionId"].is_string().then_some(v)
            }
        })
        .await;
        let session = answer["value"]["sessionId"].as_str().unwrap().to_string();
        Browser { driver, base, session, _profile: profile }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let text = http_post_json(&url, &body.to_string()).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver answered {text}"));
        assert!(v["value"]["error"].is_null(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page; what it returns.
    async fn run(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// Polls `script` until it returns something truthy (not null, false, 0 or "").
    async fn until(&self, what: &str, script: &str) -> Value {
        eventually(Duration::from_secs(30), what, || async {
            let v = self.run(script).await;
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            truthy.then_some(v)
        })
        .await
    }

    /// A PNG of the window, saved under `target/tmp`; its path.
    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let (_, text) = http_get(&url).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD.decode(v["value"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session ends Chromium; then the driver.
        let _ = Command::new("curl")
            .args(["-s", "--max-time", "5", "-X", "DELETE", &format!("{}/session/{}", self.base, self.session)])
            .output();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Requests through the demo's gateway until dropped.
struct Traffic(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Traffic {
    fn start(url: String) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && curl(&["-k", "-o", "/dev/null", &url]).0 {}
        });
        Traffic(stop)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_draws_the_demo_and_taps_live_requests_in_chromium() {
    if !require_tool("chromium") || !require_tool("chromedriver") {
        return;
    }
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let browser = Browser::start().await;
    browser.open(&format!("http://{}/dashboard", demo.admin)).await;

    // The graph has the demo's services.
    let services = browser
        .until(
            "the demo's services in the graph",
            "const s = [...document.querySelectorAll('#graph-svg .service')].map(e => e.dataset.service); \
             return s.includes('hello') && s.includes('echo') ? s : null;",
        )
        .await;
    eprintln!("services drawn: {services}");
    let edge_rate =
        "const e = document.querySelector('#graph-svg .edge[data-source=\"gateway\"][data-target=\"hello\"]'); \
                     const r = e ? Number(e.dataset.rps) : 0;";
    let before = browser.run(&format!("{edge_rate} return r;")).await.as_f64().unwrap_or(0.0);

    // Traffic raises the gateway → hello edge's rate.
    let traffic = Traffic::start(demo.url("/hello"));
    let during = browser
        .until("the gateway → hello edge's rate to rise", &format!("{edge_rate} return r > {before} + 1 ? r : null;"))
        .await;
    eprintln!("gateway -> hello: {before} rps before the traffic, {during} during");
    let colour = browser
        .run("return document.querySelector('#graph-svg .edge[data-source=\"gateway\"][data-target=\"hello\"]').getAttribute('class');")
        .await;
    assert_eq!(colour, "edge ok", "every request succeeds: the edge is drawn as healthy");

    // A click on a service shows its endpoints, on both nodes, and its route.
    browser
        .run("document.querySelector('#graph-svg [data-service=\"hello\"]').dispatchEvent(new MouseEvent('click'));")
        .await;
    let detail = browser
        .until(
            "hello's details",
            "const d = document.getElementById('detail').innerText; \
             return d.includes('node-a') && d.includes('node-b') && d.includes('Routes') ? d : null;",
        )
        .await;
    let detail = detail.as_str().unwrap();
    assert!(detail.contains("hello (edge"), "the edge route to hello is listed: {detail}");
    assert!(detail.contains("healthy"), "{detail}");
    browser.screenshot("graph").await;
    drop(traffic);

    // The nodes: connected, current snapshot, a certificate expiry and QUIC peers with an RTT.
    browser.run("location.hash = 'nodes';").await;
    let row = browser
        .until(
            "node-a's row with its QUIC peers",
            "const r = document.querySelector('#node-table tr[data-node=\"node-a\"]'); \
             return r && r.innerText.includes(' ms') ? r.innerText : null;",
        )
        .await;
    let row = row.as_str().unwrap();
    assert!(row.contains("yes") && row.contains("current"), "{row}");
    assert!(row.contains("gateway (outbound)") || row.contains("node-b (outbound)"), "{row}");
    browser.screenshot("nodes").await;

    // The tap: a request this test sends appears, seen by the gateway and by the node that
    // delivered it.
    browser.run("location.hash = 'tap';").await;
    browser
        .until("the tap to open", "return document.getElementById('tap-state').textContent.startsWith('watching');")
        .await;
    let path = format!("/hello/dashboard-probe-{}", fastrand::u32(..));
    let seen = eventually(Duration::from_secs(30), "the probe in the tap", || {
        let (url, path) = (demo.url(&path), path.clone());
        let browser = &browser;
        async move {
            curl(&["-k", "-o", "/dev/null", &url]);
            let proxies = browser
                .run(&format!(
                    "return [...document.querySelectorAll('#tap-table tr[data-path=\"{path}\"]')].map(r => r.children[1].textContent);"
                ))
                .await;
            let proxies: Vec<String> = serde_json::from_value(proxies).unwrap_or_default();
            (proxies.iter().any(|p| p == "gateway") && proxies.iter().any(|p| p.starts_with("node-"))).then_some(proxies)
        }
    })
    .await;
    eprintln!("the probe was tapped at {seen:?}");
    browser.screenshot("tap").await;
}

/// `quicmesh tap` against the gateway follows the nodes too: a call from node-a to echo (on
/// node-b) shows as node-a's outbound request and node-b's inbound one; a bad filter is refused
/// with a clear error, by the CLI and by the admin API.
#[tokio::test(flavor = "multi_thread")]
async fn quicmesh_tap_follows_the_gateway_and_every_node() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let node_a = demo.nodes.iter().find(|n| n.name == "node-a").unwrap().clone();
    let mut tap = Command::new(bin())
        .args(["tap", "--admin", &demo.admin.to_string(), "--service", "echo", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = tap.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).expect("one JSON event per line"));
        }
    });
    // The gateway follows each node once it has read the node list: send calls, each on its
    // own path, until one of them is seen by both nodes.
    let started = Instant::now();
    let mut events: Vec<Value> = Vec::new();
    let both = loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no call seen by both nodes: {events:?}");
        let path = format!("/tap-probe-{}", fastrand::u32(..));
        let (status, _) = http_get_host(&format!("http://{}{path}", node_a.outbound), "echo").await;
        assert_eq!(status, 200);
        while let Ok(e) = rx.recv_timeout(Duration::from_millis(200)) {
            events.push(e);
        }
        let mut seen: Vec<(String, String)> = events
            .iter()
            .filter(|e| e["path"] == path.as_str())
            .map(|e| (e["proxy"].as_str().unwrap().to_string(), e["direction"].as_str().unwrap().to_string()))
            .collect();
        seen.sort();
        if seen.len() == 2 {
            break seen;
        }
    };
    let _ = tap.kill();
    let _ = tap.wait();
    assert_eq!(both, [("node-a".into(), "outbound".into()), ("node-b".into(), "inbound".into())]);
    for e in &events {
        assert_eq!(e["dst_service"], "echo", "the filter holds: {e}");
        assert_eq!(e["status"], 200);
        assert!(e["duration_ms"].as_f64().unwrap() > 0.0, "{e}");
    }

    // Bad filters: a clear error, nothing streamed.
    let out =
        Command::new(bin()).args(["tap", "--admin", &demo.admin.to_string(), "--status", "6xx"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status: give a code (503), a class (5xx) or error"), "{err}");
    let (status, body) = http_get(&format!("http://{}/tap?colour=red", demo.admin)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown tap filter \"colour\""), "{body}");
}

/// With an admin token, the page and its script load without it (they hold no data), and the
/// data behind them does not; the gateway's tap reaches the nodes with the shared token.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_data_and_tap_need_the_admin_token() {
    const TOKEN: &str = "dashboard-test-token-0123456789";
    let demo = DemoProc::start(&[("QUICMESH_ADMIN_TOKEN", TOKEN)]);
    eventually(Duration::from_secs(20), "demo /ready", || async {
        (http_get(&format!("http://{}/ready", demo.admin)).await.0 == 200).then_some(())
    })
    .await;
    for page in ["/dashboard", "/dashboard/app.js", "/dashboard/style.css"] {
        let (status, body) = http_get(&format!("http://{}{page}", demo.admin)).await;
        assert_eq!(status, 200, "{page}: {body}");
    }
    for data in ["/dashboard/graph", "/tap", "/nodes"] {
        let (status, _) = http_get(&format!("http://{}{data}", demo.admin)).await;
        assert_eq!(status, 401, "{data} without the token");
    }
    let (ok, graph) =
        curl(&["-H", &format!("Authorization: Bearer {TOKEN}"), &format!("http://{}/dashboard/graph", demo.admin)]);
    assert!(ok);
    let graph: Value = serde_json::from_str(&graph).unwrap();
    let scraped: Vec<&Value> = graph["nodes"].as_array().unwrap().iter().filter(|n| n["scraped"] == true).collect();
    assert_eq!(scraped.len(), 3, "the gateway read both nodes' metrics with the token: {graph}");

    let node_a = demo.nodes.iter().find(|n| n.name == "node-a").unwrap().clone();
    let mut tap = Command::new(bin())
        .args(["tap", "--admin", &demo.admin.to_string(), "--service", "echo", "--count", "1"])
        .env("QUICMESH_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while tap.try_wait().unwrap().is_none() {
        http_get_host(&format!("http://{}/token-probe", node_a.outbound), "echo").await;
        assert!(started.elapsed() < Duration::from_secs(30), "the tap saw nothing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = tap.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("/token-probe") && line.contains(":status=200"), "{line}");
}

/// Each admin listener serves a bounded number of streams: past it, a clear 503; a watcher
/// that leaves frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn tap_watchers_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let open = || async {
        let mut s = tokio::net::TcpStream::connect(demo.admin).await.unwrap();
        s.write_all(b"GET /tap?local=1 HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        (String::from_utf8_lossy(&head[9..12]).into_owned(), s)
    };
    let mut watchers = Vec::new();
    for i in 0..32 {
        let (status, s) = open().await;
        assert_eq!(status, "200", "watcher {i}");
        watchers.push(s);
    }
    let (status, _) = open().await;
    assert_eq!(status, "503", "the 33rd watcher");
    drop(watchers.pop());
    eventually(
        Duration::from_secs(40),
        "a place freed by a watcher that left (noticed at the next write: a keep-alive comment every 15 s at most)",
        || async {
            let (status, s) = open().await;
            (status == "200").then_some(s)
        },
    )
    .await;
}

/// GET with a Host header; (status, body).
async fn http_get_host(url: &str, host: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(url).header(http::header::HOST, host).body(Default::default()).unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}
