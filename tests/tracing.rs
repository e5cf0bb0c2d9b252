//! Spans over OTLP, received by a collector nobody here wrote: `tests/otlp_receiver.py`, which
//! decodes with the OpenTelemetry project's own `opentelemetry-proto` package (PyPI).
//!
//! A request from outside goes gateway → node-a → the `front` app, which calls `back` through
//! node-a (passing the `traceparent` it got, as an instrumented app does) → node-b → `back`:
//! four proxy hops, four spans, one trace, each span the child of the one before, the first
//! the child of the caller's.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const SECRET: &str = "otlp-api-key-never-logged";

/// The receiver, and the spans it printed.
struct Receiver {
    child: Child,
    port: u16,
    spans: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Receiver {
    /// None (skipped, said so) where the package is missing outside CI; a failure under CI.
    fn start() -> Option<Receiver> {
        let have = Command::new("python3")
            .args(["-c", "import opentelemetry.proto.collector.trace.v1.trace_service_pb2"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("python3 with opentelemetry-proto is required under CI=true (pip3 install opentelemetry-proto)");
            }
            eprintln!("SKIPPED: python3 cannot import opentelemetry-proto (pip3 install opentelemetry-proto)");
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
        let mut child = Command::new("python3").arg(script).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (port_tx, port_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = line.strip_prefix("port ") {
                    let _ = port_tx.send(p.parse::<u16>().unwrap());
                } else if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let port = port_rx.recv_timeout(Duration::from_secs(20)).expect("the receiver's port");
        Some(Receiver { child, port, spans: rx, seen: Vec::new() })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Waits until `n` spans of `trace` arrived; they, by start time.
    fn trace(&mut self, trace: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut mine: Vec<Value> = self.seen.iter().filter(|s| s["trace_id"] == trace).cloned().collect();
            if mine.len() >= n {
                mine.sort_by_key(|s| s["start"].as_u64());
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.spans.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(s) => self.seen.push(s),
                Err(_) => {
                    assert!(Instant::now() < deadline, "{} of {n} spans of {trace}: {:#?}", mine.len(), self.seen)
                }
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `front` app: answers each request by calling `back` through its node's outbound
/// listener, passing on the `traceparent` it was given; tells what it was given.
async fn front_app(outbound: std::sync::Arc<std::sync::OnceLock<SocketAddr>>) -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let outbound = outbound.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let outbound = outbound.clone();
                    async move {
                        let given =
                            req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                            .build_http::<http_body_util::Empty<bytes::Bytes>>();
                        let mut call = http::Request::get(format!("http://{}/from-front", outbound.get().unwrap()))
                            .header("host", "back");
                        if !given.is_empty() {
                            call = call.header("traceparent", given.as_str());
                        }
                        let status = match client.request(call.body(Default::default()).unwrap()).await {
                            Ok(r) => {
                                let s = r.status().as_u16();
                                let _ = r.into_body().collect().await;
                                s
                            }
                            Err(_) => 0,
                        };
                        let body = serde_json::json!({ "traceparent": given, "back": status }).to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Mesh {
    gw: NodeProc,
    a: NodeProc,
    _b: NodeProc,
    dir: std::path::PathBuf,
    _pki: Pki,
}

/// Gateway (edge route to `front`), node-a hosting `front`, node-b hosting `back`, each
/// exporting to `endpoint` with `gateway_tracing` / the nodes' `[tracing]` extras.
async fn mesh(endpoint: &str, gateway_sampling: &str) -> Mesh {
    let pki = Pki::new();
    let dir = pki.issue("gateway");
    pki.issue("node-a");
    pki.issue("node-b");
    let tracing = |extra: &str| {
        let interval = if extra.contains("export_interval") { "" } else { "export_interval = \"100ms\"\n" };
        format!(
            "[tracing]\notlp_endpoint = \"{endpoint}\"\n{interval}{extra}\n[tracing.headers]\nx-api-key = \"{SECRET}\"\n"
        )
    };
    let routes = format!(
        "[[gateway.routes]]\nname = \"edge-front\"\n[[gateway.routes.rules]]\n[[gateway.routes.rules.backendRefs]]\nname = \"front\"\n\n\
         [access_log]\noutput = \"file\"\npath = \"{}\"\nformat = \"json\"\n\n{}",
        dir.join("gateway-access.log").display(),
        tracing(gateway_sampling)
    );
    let gw = NodeProc::start_layered(
        "gateway",
        &gateway_layers(&dir, "[[services]]\nname = \"front\"\n[[services]]\nname = \"back\"", &routes),
    );
    let back = echo_backend().await;
    let outbound = std::sync::Arc::new(std::sync::OnceLock::new());
    let front = front_app(outbound.clone()).await;
    let node = |name: &str, service: &str, addr: SocketAddr| {
        let instance = format!("[[node.instances]]\nservice = \"{service}\"\naddress = \"{addr}\"\n\n{}", tracing(""));
        NodeProc::start(&dir, name, &joined_toml(name, &dir, gw.addrs.control, &instance))
    };
    let b = node("node-b", "back", back);
    let a = node("node-a", "front", front);
    outbound.set(a.addrs.outbound).unwrap();
    Mesh { gw, a, _b: b, dir, _pki: pki }
}

/// Sends through the edge with `traceparent` (if any); what `front` answered (it says what
/// `traceparent` it was given and how `back` answered).
fn through_edge(m: &Mesh, traceparent: Option<&str>) -> Option<Value> {
    let url = format!("https://127.0.0.1:{}/shop", m.gw.addrs.listen.port());
    let mut args = vec!["-k", "-f", url.as_str()];
    let header = traceparent.map(|t| format!("traceparent: {t}"));
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    let (ok, body) = curl(&args);
    ok.then(|| serde_json::from_str(&body).ok()).flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_through_gateway_and_two_nodes_is_one_trace_of_linked_spans() {
    let Some(mut receiver) = Receiver::start() else { return };
    let m = mesh(&receiver.endpoint(), "").await;
    let trace = format!("{:032x}", fastrand::u128(1..));
    let caller = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller}-01");
    // Until the mesh is up (nodes registered, routes pushed): the first answer that went all
    // the way to `back`.
    let answer = eventually(Duration::from_secs(20), "front to reach back through the mesh", || {
        let answer = through_edge(&m, Some(&traceparent)).filter(|a| a["back"] == 200);
        async move { answer }
    })
    .await;
    // Each attempt made spans of the same trace: take the last attempt's four, by the span
    // `front` was given (node-a's inbound span).
    let given = answer["traceparent"].as_str().unwrap().to_string();
    let node_a_in = given.split('-').nth(2).unwrap().to_string();
    assert!(given.starts_with(&format!("00-{trace}-")) && given.ends_with("-01"), "{given}");
    receiver.trace(&trace, 4);
    let inbound_a = eventually(Duration::from_secs(10), "node-a's inbound span", || {
        let found = receiver_find(&mut receiver, &trace, |s| s["span_id"] == node_a_in.as_str());
        async move { found }
    })
    .await;
    let gateway = eventually(Duration::from_secs(10), "the gateway's span", || {
        let parent = inbound_a["parent_span_id"].clone();
        let found = receiver_find(&mut receiver, &trace, |s| s["span_id"] == parent);
        async move { found }
    })
    .await;
    let outbound_a = eventually(Duration::from_secs(10), "node-a's outbound span", || {
        let found = receiver_find(&mut receiver, &trace, |s| s["parent_span_id"] == node_a_in.as_str());
        async move { found }
    })
    .await;
    let inbound_b = eventually(Duration::from_secs(10), "node-b's inbound span", || {
        let parent = outbound_a["span_id"].clone();
        let found = receiver_find(&mut receiver, &trace, |s| s["parent_span_id"] == parent);
        async move { found }
    })
    .await;

    // Who made each, of which kind (SERVER = 2, CLIENT = 3), under which parent.
    let who = |s: &Value| {
        (
            s["resource"]["service.name"].as_str().unwrap().to_string(),
            s["resource"]["service.instance.id"].as_str().unwrap().to_string(),
            s["kind"].as_i64().unwrap(),
        )
    };
    assert_eq!(who(&gateway), ("quicmesh-gateway".into(), "gateway".into(), 2));
    assert_eq!(gateway["parent_span_id"], caller, "the gateway's span is the caller's child");
    assert_eq!(who(&inbound_a), ("quicmesh-node".into(), "node-a".into(), 2));
    assert_eq!(who(&outbound_a), ("quicmesh-node".into(), "node-a".into(), 3));
    assert_eq!(who(&inbound_b), ("quicmesh-node".into(), "node-b".into(), 2));
    for s in [&gateway, &inbound_a, &outbound_a, &inbound_b] {
        assert_eq!(s["trace_id"], trace.as_str());
        assert_eq!(s["scope"], "quicmesh");
        assert_eq!(s["api_key"], SECRET, "the configured export headers are sent");
        let a = &s["attributes"];
        assert_eq!(a["http.request.method"], "GET", "{s}");
        assert_eq!(a["http.response.status_code"], 200, "{s}");
        assert!(s["end"].as_u64() >= s["start"].as_u64());
    }
    // Semantic conventions and the mesh's own attributes.
    assert_eq!(gateway["name"], "GET edge-front");
    assert_eq!(gateway["attributes"]["http.route"], "edge-front");
    assert_eq!(gateway["attributes"]["url.path"], "/shop");
    assert_eq!(gateway["attributes"]["url.scheme"], "https");
    assert_eq!(gateway["attributes"]["quicmesh.destination.service"], "front");
    assert_eq!(outbound_a["attributes"]["url.path"], "/from-front");
    assert_eq!(outbound_a["attributes"]["quicmesh.source.service"], "front");
    assert_eq!(outbound_a["attributes"]["quicmesh.destination.service"], "back");
    assert_eq!(outbound_a["attributes"]["quicmesh.destination.node"], "node-b");
    assert_eq!(inbound_b["attributes"]["server.address"], "back");
    // Children start after their parents and end before them.
    for (parent, child) in [(&gateway, &inbound_a), (&inbound_a, &outbound_a), (&outbound_a, &inbound_b)] {
        assert!(child["start"].as_u64() >= parent["start"].as_u64(), "{parent} / {child}");
        assert!(child["end"].as_u64() <= parent["end"].as_u64(), "{parent} / {child}");
    }

    // The trace id is the access log's, and the export key is in no log and no dump.
    let log = std::fs::read_to_string(m.dir.join("gateway-access.log")).unwrap();
    assert!(log.contains(&format!("\"trace_id\":\"{trace}\"")), "{log}");
    let dump = http_get(&format!("http://{}/config_dump", m.gw.addrs.admin)).await.1;
    assert!(dump.contains("x-api-key") && !dump.contains(SECRET), "{dump}");
    for p in [&m.gw, &m.a] {
        assert!(!p.log().contains(SECRET));
    }
    let metrics = http_get(&format!("http://{}/metrics", m.gw.addrs.admin)).await.1;
    assert!(metric(&metrics, "quicmesh_trace_spans_total", &[("result", "exported")]) >= 1.0, "{metrics}");

    // A request the proxy answers itself, never forwarded (no such service: 404), has its span
    // too, under the caller's: the failures are what a trace is most wanted for.
    let refused = format!("{:032x}", fastrand::u128(1..));
    let url = format!("http://{}/anything", m.a.addrs.outbound);
    let header = format!("traceparent: 00-{refused}-{caller}-01");
    let (_, code) =
        curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: no-such-service", "-H", &header, &url]);
    assert_eq!(code, "404");
    let spans = receiver.trace(&refused, 1);
    assert_eq!(who(&spans[0]), ("quicmesh-node".into(), "node-a".into(), 3));
    assert_eq!(spans[0]["parent_span_id"], caller);
    assert_eq!(spans[0]["attributes"]["http.response.status_code"], 404, "{}", spans[0]);
}

/// The spans of `trace` received so far, waiting a little for more: the first that `pick`s.
fn receiver_find(r: &mut Receiver, trace: &str, pick: impl Fn(&Value) -> bool) -> Option<Value> {
    while let Ok(s) = r.spans.recv_timeout(Duration::from_millis(50)) {
        r.seen.push(s);
    }
    r.seen.iter().find(|s| s["trace_id"] == trace && pick(s)).cloned()
}

/// Spans still queued when a proxy stops are exported by its drain, not lost with the process:
/// this gateway exports only once an hour, and its span arrives when it is stopped (SIGTERM).
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_gateway_exports_the_spans_it_still_holds() {
    let Some(mut receiver) = Receiver::start() else { return };
    let mut m = mesh(&receiver.endpoint(), "export_interval = \"1h\"").await;
    let trace = format!("{:032x}", fastrand::u128(1..));
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    eventually(Duration::from_secs(20), "front to reach back through the mesh", || {
        let answer = through_edge(&m, Some(&traceparent)).filter(|a| a["back"] == 200);
        async move { answer }
    })
    .await;
    // The answered try's (tries made before the mesh was up answered 503 and made spans too).
    let gateway_span = |s: &Value| {
        s["resource"]["service.name"] == "quicmesh-gateway" && s["attributes"]["http.response.status_code"] == 200
    };
    // The nodes' spans come within their 100 ms; the gateway's waits for its hour.
    receiver.trace(&trace, 3);
    let early = |s: &Value| s["resource"]["service.name"] == "quicmesh-gateway";
    assert!(receiver_find(&mut receiver, &trace, early).is_none(), "the gateway exported before it stopped");
    m.gw.terminate();
    let span = eventually(Duration::from_secs(10), "the stopped gateway's span", || {
        let found = receiver_find(&mut receiver, &trace, gateway_span);
        async move { found }
    })
    .await;
    assert_eq!(span["kind"], 2, "{span}");
}

/// Parent-based sampling: at `sampling = 0` a trace that starts at the gateway is not sampled,
/// the flag says so all the way to the apps and no proxy exports it; a caller's sampled trace is
/// exported whatever the ratio. A collector that is away fails exports, never requests.
#[tokio::test(flavor = "multi_thread")]
async fn sampling_follows_the_caller_and_a_missing_collector_costs_no_request() {
    let Some(mut receiver) = Receiver::start() else { return };
    let m = mesh(&receiver.endpoint(), "sampling = 0.0").await;
    let unsampled = eventually(Duration::from_secs(20), "a request through the mesh", || {
        let answer = through_edge(&m, None).filter(|a| a["back"] == 200);
        async move { answer }
    })
    .await;
    let given = unsampled["traceparent"].as_str().unwrap();
    assert!(given.ends_with("-00"), "the gateway started the trace unsampled: {given}");
    let dropped_trace = given.split('-').nth(1).unwrap().to_string();
    // A sampled trace sent after it: once all four of its spans are in, the unsampled one's
    // would have been too (each proxy exports in order).
    let trace = format!("{:032x}", fastrand::u128(1..));
    let answer = through_edge(&m, Some(&format!("00-{trace}-00f067aa0ba902b7-01"))).unwrap();
    assert_eq!(answer["back"], 200);
    receiver.trace(&trace, 4);
    assert!(receiver.seen.iter().all(|s| s["trace_id"] != dropped_trace.as_str()), "an unsampled trace was exported");

    // The collector goes away: requests go on, exports fail and are counted.
    drop(receiver);
    let before = metric(
        &http_get(&format!("http://{}/metrics", m.gw.addrs.admin)).await.1,
        "quicmesh_trace_spans_total",
        &[("result", "failed")],
    );
    eventually(Duration::from_secs(30), "failed exports to be counted", || async {
        let answer = through_edge(&m, Some(&format!("00-{trace}-00f067aa0ba902b7-01")));
        assert_eq!(answer.map(|a| a["back"].clone()), Some(200.into()), "requests go on");
        let text = http_get(&format!("http://{}/metrics", m.gw.addrs.admin)).await.1;
        (metric(&text, "quicmesh_trace_spans_total", &[("result", "failed")]) > before).then_some(())
    })
    .await;
}

/// Bad `[tracing]` settings are refused at start with the key named.
#[test]
fn bad_tracing_settings_are_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[tracing]\notlp_endpoint = \"https://collector:4318/v1/traces\"\n", "tracing.otlp_endpoint"),
        ("[tracing]\notlp_endpoint = \"not a url\"\n", "tracing.otlp_endpoint"),
        ("[tracing]\nsampling = 1.5\n", "tracing.sampling"),
        ("[tracing]\nbatch_size = 5000\nmax_queue = 10\n", "tracing.batch_size"),
        ("[tracing.headers]\n\"bad header\" = \"x\"\n", "tracing.headers"),
        ("[tracing]\notlp_endpoint = \"http://user:hunter2@collector:4318/v1/traces\"\n", "tracing.otlp_endpoint"),
    ] {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, format!("[mesh]\ntrust_domain = \"{TD}\"\n{text}")).unwrap();
        let out = Command::new(bin()).args(["check", "--config"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text} was accepted");
        assert!(err.contains(key), "{text}: {err}");
        assert!(!err.contains("hunter2"), "a secret was repeated: {err}");
    }
}
