//! Hostile clients, probed with real sockets against the real binary: one client's bad or slow
//! behaviour must cost that client alone, never another client's request, a shared connection
//! or an endpoint's standing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(port: u16, alpn: &[&[u8]]) -> Tls {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(alpn)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
}

/// Reads until `done` says the bytes so far are enough (or EOF), with a deadline.
async fn read_until(stream: &mut Tls, done: impl Fn(&[u8]) -> bool) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !done(&out) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read).await.expect("no answer within 15 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` on a fresh TLS connection to the edge; the whole answer.
async fn exchange(port: u16, request: String) -> String {
    let mut s = tls_connect(port, &[b"http/1.1"]).await;
    s.write_all(request.as_bytes()).await.unwrap();
    read_all(&mut s).await
}

/// A response's header section.
async fn read_response(stream: &mut Tls) -> String {
    read_until(stream, |b| b.windows(4).any(|w| w == b"\r\n\r\n")).await
}

/// A whole response whose body is chunked (the echo service's) or JSON.
async fn read_all(stream: &mut Tls) -> String {
    let chunked = |b: &[u8]| b.windows(9).any(|w| w == b"chunked\r\n");
    read_until(stream, |b| b.ends_with(b"\r\n0\r\n\r\n") || (b.ends_with(b"}") && !chunked(b))).await
}

fn streams_to_node_b(metrics: &str) -> f64 {
    metric(metrics, "quicmesh_quic_streams_total", &[("direction", "outbound"), ("peer", "node-b")])
}

/// Waits until the gateway opened another request stream to node-b than the `before` it had.
async fn wait_stream_to_node_b(demo: &DemoProc, before: f64) {
    eventually(Duration::from_secs(10), "a request stream to node-b", || async {
        (streams_to_node_b(&demo.metrics().await) > before).then_some(())
    })
    .await;
}

/// A stream of a channel's items.
fn tokio_stream<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn opened_to_node_b(metrics: &str) -> f64 {
    metric(metrics, "quicmesh_quic_connections_opened_total", &[("direction", "outbound"), ("peer", "node-b")])
}

/// QUIC connections the gateway opened to peers that have closed since. Each of the gateway's
/// workers pools its own connection to a peer, so another client's request may open one (on
/// another worker); none may close.
fn closed_outbound(metrics: &str) -> f64 {
    let out = [("direction", "outbound")];
    metric(metrics, "quicmesh_quic_connections_opened_total", &out)
        - metric(metrics, "quicmesh_quic_connections_active", &out)
}

/// A well-behaved upload, started and left half sent on the gateway's shared connection to
/// node-b while other clients misbehave.
struct Victim {
    stream: Tls,
    /// The gateway's metrics once the upload was under way.
    before: String,
}

impl Victim {
    async fn start(demo: &DemoProc) -> Victim {
        let mut stream = tls_connect(demo.port, &[b"http/1.1"]).await;
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        let before = eventually(Duration::from_secs(10), "the victim's stream to node-b", || async {
            let m = demo.metrics().await;
            (opened_to_node_b(&m) >= 1.0).then_some(m)
        })
        .await;
        Victim { stream, before }
    }

    /// Sends the rest; the upload must arrive whole, on the same pooled connection, with no
    /// endpoint ejected and no upstream failure counted anywhere. Returns the metrics.
    async fn finish(mut self, demo: &DemoProc) -> String {
        self.stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
        let answer = read_all(&mut self.stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "the other client's upload failed: {answer}");
        assert!(answer.contains("firstsecond"), "the other client's body was not delivered whole: {answer}");
        let after = demo.metrics().await;
        let replaced = closed_outbound(&after) != closed_outbound(&self.before);
        assert!(!replaced, "a pooled connection to node-b was closed (replaced):\n{after}");
        assert_eq!(metric(&after, "quicmesh_outlier_ejections_total", &[]), 0.0, "{after}");
        // Neither the gateway nor node-b counted an upstream failure for a client's mistake.
        for reason in ["peer-unreachable", "upstream-reset"] {
            assert_eq!(metric(&after, "quicmesh_proxy_errors_total", &[("reason", reason)]), 0.0, "{after}");
        }
        after
    }
}

/// Finding 1: a malformed chunked body answered 502 and dropped the gateway's pooled connection
/// to node-b, failing another client's upload in flight on it and ejecting the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_that_clients_400_and_harms_no_one_else() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let victim = Victim::start(&demo).await;
    for round in 0..7 {
        let mut bad = tls_connect(demo.port, &[b"http/1.1"]).await;
        bad.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut bad).await;
        assert!(head.starts_with("HTTP/1.1 400"), "round {round}: {head}");
        assert!(head.to_ascii_lowercase().contains("quicmesh-error: bad-request"), "round {round}: {head}");
    }
    let after = victim.finish(&demo).await;
    let bad = metric(&after, "quicmesh_proxy_errors_total", &[("direction", "ingress"), ("reason", "bad-request")]);
    assert!(bad >= 7.0, "{after}");
}

/// Finding 1 on HTTP/2 and HTTP/3 (a body that breaks after it started), and finding 8: a
/// chunked body past the limit is the client's 413, like a declared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_break_on_h2_and_h3_or_outgrow_the_limit_cost_only_their_client() {
    use http_body_util::BodyExt;
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__MAX_REQUEST_BODY", "100000")]);
    demo.wait_ready().await;
    let victim = Victim::start(&demo).await;

    // HTTP/1.1, chunked, 200 kB against a 100 kB limit: 413 whatever the length said.
    let big = tls_connect(demo.port, &[b"http/1.1"]).await;
    let (mut rd, mut wr) = tokio::io::split(big);
    let writer = tokio::spawn(async move {
        wr.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
        for _ in 0..50 {
            wr.write_all(format!("1000\r\n{}\r\n", "x".repeat(4096)).as_bytes()).await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    });
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(15), rd.read(&mut buf)).await.expect("no answer to the big body")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("quicmesh-error: body-too-large"), "{head}");
    drop(rd);
    let _ = writer.await;

    // HTTP/2: a body that fails once the gateway is forwarding it (the client resets its
    // stream); the client's connection goes on serving its next request.
    let tls = tls_connect(demo.port, &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(4);
    let broken = http_body_util::StreamBody::new(tokio_stream(rx));
    let req = http::Request::post(demo.url("/echo")).body(broken.boxed()).unwrap();
    let streams = streams_to_node_b(&demo.metrics().await);
    let pending = tokio::spawn(h2.send_request(req));
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"partial")))).await.unwrap();
    wait_stream_to_node_b(&demo, streams).await;
    tx.send(Err(std::io::Error::other("the client gave up mid-body"))).await.unwrap();
    let _ = pending.await;
    let ok = http::Request::get(demo.url("/hello")).body(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
    let resp = h2.send_request(ok.unwrap()).await.expect("the h2 connection broke");
    assert_eq!(resp.status(), 200);

    // HTTP/3: data, then a reset of the request stream; the connection goes on too.
    let (_ep, mut h3) = h3_connect(demo.port).await;
    let streams = streams_to_node_b(&demo.metrics().await);
    let mut stream = h3.send_request(http::Request::post(demo.url("/echo")).body(()).unwrap()).await.unwrap();
    stream.send_data(bytes::Bytes::from_static(b"partial")).await.unwrap();
    wait_stream_to_node_b(&demo, streams).await;
    stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    let (status, _, body) = h3_request(&mut h3, http::Request::get(demo.url("/hello")).body(()).unwrap(), b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Both broken bodies were the clients' own errors: 400, or 499 when the proxy saw the
    // client leave before it saw the body break; held against no one.
    eventually(Duration::from_secs(10), "both broken bodies counted as the clients' errors", || async {
        let m = demo.metrics().await;
        let bad = metric(&m, "quicmesh_proxy_errors_total", &[("direction", "ingress"), ("reason", "bad-request")]);
        let gone = metric(&m, "quicmesh_requests_total", &[("direction", "ingress"), ("code", "499")]);
        (bad + gone >= 2.0).then_some(())
    })
    .await;
    victim.finish(&demo).await;
}

/// The admin API cuts off a client that connects and sends no request, or only part of its
/// headers, after its header timeout (10 s), as the edge does: before any token is checked,
/// anyone who reaches the port could otherwise hold descriptors the proxy needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_cuts_off_clients_that_send_no_request() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let mut silent = tokio::net::TcpStream::connect(demo.admin).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(demo.admin).await.unwrap();
    partial.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
    for (what, s) in [("silent", &mut silent), ("partial", &mut partial)] {
        let mut buf = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        assert!(ended.is_ok(), "the {what} admin connection was kept past 30 s");
    }
    // The API still answers.
    assert!(demo.metrics().await.contains("quicmesh_"));
}

/// QUIC Initials for `server`, each opening a different connection, that will never go on.
/// Made with quinn's state machine (no I/O): real Initials, as a flooding client would send.
fn initials(server: std::net::SocketAddr, n: usize) -> Vec<Vec<u8>> {
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(insecure_tls(&[b"h3"])).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(tls));
    let mut out = Vec::with_capacity(n);
    let mut endpoint = None;
    for i in 0..n {
        // A fresh endpoint now and then: each one remembers every connection it made.
        if i % 5000 == 0 {
            endpoint = Some(quinn_proto::Endpoint::new(Arc::new(quinn::EndpointConfig::default()), None, false, None));
        }
        let Some(ep) = endpoint.as_mut() else { unreachable!() };
        let now = std::time::Instant::now();
        let (_, mut conn) = ep.connect(now, config.clone(), server, "localhost").unwrap();
        let mut buf = Vec::with_capacity(1500);
        if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            buf.truncate(t.size);
            out.push(buf);
        }
    }
    out
}

/// Finding 2: Initials that never complete the handshake held ~62 KB each for 60 s (83 ->
/// 918 MB after 17 000). Now, past a few handshakes in progress, new addresses get a stateless
/// Retry, handshakes are capped and time out, and real clients still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_quic_initials_keeps_no_state_and_real_clients_still_connect() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    // The long form locally (HOSTILE_INITIALS=100000); CI sends a shorter flood.
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let n = env_or("HOSTILE_INITIALS", if ci { 20_000 } else { 100_000 });
    let server: std::net::SocketAddr = ([127, 0, 0, 1], demo.port).into();
    let packets = tokio::task::spawn_blocking(move || initials(server, n)).await.unwrap();
    assert_eq!(packets.len(), n);
    let hello = || http::Request::get(demo.url("/hello")).body(()).unwrap();
    let (_ep, mut h3) = h3_connect(demo.port).await;
    assert_eq!(h3_request(&mut h3, hello(), b"").await.0, 200);
    let pid = demo.child.id();
    let before = proc_status_kib(pid, "VmRSS");
    let flood = tokio::task::spawn_blocking(move || {
        // From many source ports, as from many clients.
        let socks: Vec<std::net::UdpSocket> =
            (0..64).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, p) in packets.iter().enumerate() {
            let _ = socks[i % socks.len()].send_to(p, server);
            if i % 16 == 15 {
                // Paced a little, so the flood reaches the gateway rather than a full socket buffer.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    // A real client connects in the middle of it.
    let (_ep2, mut h3b) = h3_connect(demo.port).await;
    assert_eq!(h3_request(&mut h3b, hello(), b"").await.0, 200);
    flood.await.unwrap();
    let m = demo.metrics().await;
    let retried = metric(&m, "quicmesh_quic_admission_total", &[("listener", "edge"), ("decision", "retry")]);
    assert!(retried > 0.0, "no Retry was sent: {m}");
    let peak = proc_status_kib(pid, "VmHWM");
    let grown = peak.saturating_sub(before) / 1024;
    eprintln!("{n} Initials: RSS {} MiB before, peak {} MiB; {retried} Retries", before / 1024, peak / 1024);
    assert!(grown <= 30, "the flood grew the gateway by {grown} MiB (peak {} MiB)", peak / 1024);
    // A node's inbound listener keeps no state for a flood either, and goes on serving.
    let node_a = demo.nodes.iter().find(|n| n.name == "node-a").map(|n| n.quic).expect("node-a's QUIC address");
    let packets = tokio::task::spawn_blocking(move || initials(node_a, n / 10)).await.unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, p) in packets.iter().enumerate() {
        let _ = sock.send_to(p, node_a);
        if i % 16 == 15 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eventually(Duration::from_secs(10), "Retries from node-a's inbound listener", || async {
        let m = demo.metrics().await;
        (metric(&m, "quicmesh_quic_admission_total", &[("listener", "inbound"), ("decision", "retry")]) > 0.0)
            .then_some(())
    })
    .await;
    let peak = proc_status_kib(pid, "VmHWM");
    assert!(
        peak.saturating_sub(before) / 1024 <= 30,
        "the flood on node-a grew the process to a peak of {} MiB (before: {} MiB)",
        peak / 1024,
        before / 1024
    );

    // And after it, a new client connects and the first one goes on.
    let (_ep3, mut h3c) = h3_connect(demo.port).await;
    assert_eq!(h3_request(&mut h3c, hello(), b"").await.0, 200);
    assert_eq!(h3_request(&mut h3, hello(), b"").await.0, 200);
}

/// node-b hosting `echo` (HTTP) and `source` (TCP: streams bytes on connect); node-a has a
/// tunnel port for `source`. Both nodes' processes are returned, node-a first.
async fn two_nodes_for_download(source: std::net::SocketAddr) -> (NodeProc, NodeProc, Pki) {
    two_nodes_for_download_with(source, "", &[]).await
}

/// [`two_nodes_for_download`] with `services` (TOML) besides, both nodes started with `env` set.
async fn two_nodes_for_download_with(
    source: std::net::SocketAddr,
    services: &str,
    env: &[(&str, &str)],
) -> (NodeProc, NodeProc, Pki) {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let echo = echo_backend().await;
    let svc = format!(
        "[[services]]\nname = \"echo\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{echo}\"\n\n\
         [[services]]\nname = \"source\"\nprotocol = \"tcp\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{source}\"\n\n{services}"
    );
    let b = NodeProc::start_with_env(env, "node", pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a_extra = format!("{svc}\n[[node.tcp]]\nlisten = \"127.0.0.1:0\"\nservice = \"source\"\n");
    let a_toml = node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &a_extra);
    let a = NodeProc::start_with_env(env, "node", pki.path(), "node-a", &a_toml);
    (a, b, pki)
}

/// A TCP server that writes `size` bytes to each connection, then closes it.
async fn byte_source(size: u64) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b's'; 64 << 10];
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// `GET /bytes/{size}` of `echo` through a node's outbound listener, on a connection that
/// closes after the response.
async fn download(outbound: std::net::SocketAddr, size: u64) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let req = format!("GET /bytes/{size} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Reads `stream` to its end at about `rate` bytes per second; returns the bytes read.
async fn read_slowly(mut stream: tokio::net::TcpStream, rate: u64) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    let start = tokio::time::Instant::now();
    loop {
        // The reader's pace: never ahead of `rate`.
        let due = start + Duration::from_secs_f64(got as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await.expect("the download stalled")
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got += n as u64,
        }
    }
}

/// Finding 3: a client reading a download slowly made node-a buffer about 0.85 MiB per MiB
/// read (h3 0.0.8 read another QUIC chunk on every poll, buffered or not, hyperium/h3#308), on
/// HTTP and on the TCP tunnel alike. Memory per stream must stay bounded by the QUIC windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_costs_the_node_no_more_than_the_quic_windows() {
    let size: u64 = env_or("HOSTILE_SLOW_MIB", 96u64) << 20;
    const RATE: u64 = 24 << 20;
    // Stream window 4 MiB, connection window 16 MiB, plus the runtime's own growth.
    const BOUND_MIB: u64 = 28;
    let source = byte_source(size).await;
    let (a, b, _pki) = two_nodes_for_download(source).await;
    // Warm up the path (the pooled connection, the instance's connection), then measure.
    let warm = read_slowly(download(a.addrs.outbound, 1 << 20).await, u64::MAX).await;
    assert!(warm > 1 << 20, "the warm-up download failed");
    // node-a holds what arrived and the client has not read; node-b, the sender, what it sent
    // and the peer has not acknowledged (quinn keeps the chunks it was given, and their
    // buffers, until then) and what it read from the instance meanwhile.
    let before = (a.rss_kib(), b.rss_kib());
    let got = read_slowly(download(a.addrs.outbound, size).await, RATE).await;
    assert!(got > size, "the download ended early at {got} of {size} bytes");
    let http_peak = (a.peak_rss_kib(), b.peak_rss_kib());

    let tunnel = a.addrs.tcp.iter().find(|(s, _)| s == "source").unwrap().1;
    let got = read_slowly(tokio::net::TcpStream::connect(tunnel).await.unwrap(), RATE).await;
    assert_eq!(got, size, "the tunnel's download ended early");
    let tunnel_peak = (a.peak_rss_kib(), b.peak_rss_kib());
    eprintln!(
        "slow reader, {} MiB: node-a / node-b RSS {} / {} MiB before, peak {} / {} MiB after HTTP, {} / {} MiB after the tunnel",
        size >> 20,
        before.0 >> 10,
        before.1 >> 10,
        http_peak.0 >> 10,
        http_peak.1 >> 10,
        tunnel_peak.0 >> 10,
        tunnel_peak.1 >> 10
    );
    for (node, before, http, tunnel) in
        [("node-a", before.0, http_peak.0, tunnel_peak.0), ("node-b", before.1, http_peak.1, tunnel_peak.1)]
    {
        assert!(http.saturating_sub(before) >> 10 <= BOUND_MIB, "HTTP: {node} grew to {} MiB", http >> 10);
        assert!(tunnel.saturating_sub(before) >> 10 <= BOUND_MIB, "tunnel: {node} grew to {} MiB", tunnel >> 10);
    }
}

/// node-a and node-b with eight 64 MiB downloads from node-b that their client reads nothing
/// of, once node-a holds what came for them (16 MiB, the connection's window, or more).
async fn unread_downloads(env: &[(&str, &str)]) -> (NodeProc, NodeProc, Pki, Vec<tokio::net::TcpStream>) {
    let (a, b, pki) = two_nodes_for_download_with(byte_source(1).await, "", env).await;
    let warm = read_slowly(download(a.addrs.outbound, 1 << 10).await, u64::MAX).await;
    assert!(warm > 1 << 10, "the warm-up download failed");
    let before = a.rss_kib();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(download(a.addrs.outbound, 64 << 20).await);
    }
    eventually(Duration::from_secs(20), "node-a holding the unread answers", || async {
        (a.rss_kib() > before + (15 << 10)).then_some(())
    })
    .await;
    (a, b, pki, held)
}

/// Another client's download through node-a, read as it comes: it must end within 15 s (it
/// never did before; the deadline is for a machine busy with the suite's other tests). Larger
/// than whatever of the shared window the streams nobody reads may have left.
async fn other_client_is_answered(a: &NodeProc) {
    let size = 4 << 20;
    let Ok(got) =
        tokio::time::timeout(Duration::from_secs(15), read_slowly(download(a.addrs.outbound, size).await, u64::MAX))
            .await
    else {
        panic!("another client's download waited behind the streams nobody reads:\n{}", a.metrics().await);
    };
    assert!(got > size, "another client's download ended early: {got} bytes");
}

/// Each of eight stalled streams on `node` is lent a stream window, well within the default
/// budget (64 MiB), and none is stopped.
async fn each_lent_a_window(node: &NodeProc) {
    let m = eventually(Duration::from_secs(10), "a window lent to each unread stream", || async {
        let m = node.metrics().await;
        (metric(&m, "quicmesh_quic_window_lent_bytes", &[]) == f64::from(8 * (4 << 20))).then_some(m)
    })
    .await;
    assert_eq!(metric(&m, "quicmesh_quic_stalled_streams_stopped_total", &[]), 0.0, "{m}");
}

/// Audit (29), the finding marked HIGH: what a client stops reading stays in quinn's buffers,
/// counted against the receive window of the one connection every client's requests to that
/// peer share (quinn gives connection credit back only as data is read). Eight answers nobody
/// read used all of node-a's 16 MiB window to node-b, and node-b could then send no one on
/// node-a anything. A stream whose reader has stopped is now lent a window of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_do_not_hold_up_everyone_elses() {
    let (a, _b, _pki, held) = unread_downloads(&[]).await;
    other_client_is_answered(&a).await;
    each_lent_a_window(&a).await;
    drop(held);
}

/// Past the budget of window lent (`transport.stalled_budget`), a connection whose peer is
/// blocked by its window stops the streams that have stalled longest: their client loses what
/// it stopped reading, and everyone else is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_past_the_budget_are_stopped() {
    // 0: nothing lent, the stalled streams are stopped once the peer is blocked (it says so
    // once per window, and that report must not be lost while the streams are too young to
    // count). One stream window: one stalled stream is covered, and the peer is blocked again
    // by the others. A stream that stalls after the stops goes only if the window blocks the
    // peer once more, so how many go depends on timing; at least one, and never one the loan
    // covers.
    for budget in [0u64, 4 << 20] {
        let covered = (budget / (4 << 20)) as u32;
        let env = budget.to_string();
        let (a, _b, _pki, held) = unread_downloads(&[("QUICMESH_TRANSPORT__STALLED_BUDGET", &env)]).await;
        let stopped = |m: &str| metric(m, "quicmesh_quic_stalled_streams_stopped_total", &[]);
        let m = eventually(Duration::from_secs(10), "stalled streams stopped", || async {
            let m = a.metrics().await;
            (stopped(&m) >= 1.0).then_some(m)
        })
        .await;
        assert_eq!(metric(&m, "quicmesh_quic_window_lent_bytes", &[]), budget as f64, "{m}");
        other_client_is_answered(&a).await;
        // The stopped answers end short for their client (the proxy cuts the response); the
        // others are whole once read.
        let mut cut = 0;
        for s in held {
            if read_slowly(s, u64::MAX).await <= 64 << 20 {
                cut += 1;
            }
        }
        let m = a.metrics().await;
        assert_eq!(f64::from(cut), stopped(&m), "budget {budget}: only the stopped answers are cut");
        assert!(cut <= 8 - covered, "budget {budget}: {cut} cut, with {covered} covered by the loan");
        // Counted as the readers' doing, not the upstream's: no endpoint is held to account.
        let cut_label = [("service", "echo"), ("error", "reader-stalled")];
        assert_eq!(metric(&m, "quicmesh_requests_total", &cut_label), f64::from(cut), "{m}");
        assert_eq!(metric(&m, "quicmesh_requests_total", &[("error", "upstream-reset")]), 0.0, "{m}");
        assert_eq!(metric(&m, "quicmesh_outlier_ejections_total", &[]), 0.0, "{m}");
    }
}

/// An HTTP instance that takes connections and reads nothing from them.
async fn deaf_instance() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// The same on the serving side: uploads an instance does not read stay in node-b's buffers,
/// counted against node-b's window of the connection node-a's requests share, and eight of
/// them kept node-a's every request, heads included, from reaching node-b. The request
/// streams node-b serves are watched from their first read that finds a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_uploads_do_not_hold_up_everyone_elses() {
    let (deaf, _deaf) = deaf_instance().await;
    let svc =
        format!("[[services]]\nname = \"deaf\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{deaf}\"\n");
    // The default budget lends each a window; with none, node-b stops them all once node-a
    // says the window blocks it.
    for budget in [None, Some("0")] {
        let env: Vec<(&str, &str)> = budget.map(|b| ("QUICMESH_TRANSPORT__STALLED_BUDGET", b)).into_iter().collect();
        let (a, b, _pki) = two_nodes_for_download_with(byte_source(1).await, &svc, &env).await;
        let warm = read_slowly(download(a.addrs.outbound, 1 << 10).await, u64::MAX).await;
        assert!(warm > 1 << 10, "the warm-up download failed");
        let before = b.rss_kib();
        let size = 64usize << 20;
        let mut uploads = Vec::new();
        for _ in 0..8 {
            let mut s = tokio::net::TcpStream::connect(a.addrs.outbound).await.unwrap();
            uploads.push(tokio::spawn(async move {
                let head = format!("POST /upload HTTP/1.1\r\nHost: deaf\r\nContent-Length: {size}\r\n\r\n");
                s.write_all(head.as_bytes()).await.unwrap();
                let chunk = vec![b'u'; 64 << 10];
                for _ in 0..size / chunk.len() {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            }));
        }
        if budget.is_none() {
            // Past the connection's window: quinn's buffers and hyper's, on their way to the
            // instance.
            eventually(Duration::from_secs(20), "node-b holding the unread uploads", || async {
                (b.rss_kib() > before + (24 << 10)).then_some(())
            })
            .await;
            other_client_is_answered(&a).await;
            each_lent_a_window(&b).await;
        } else {
            // Those stalled when the peer said it was blocked; a stream that stalls later goes
            // only if the window blocks the peer again.
            eventually(Duration::from_secs(20), "node-b stopping the unread uploads", || async {
                (metric(&b.metrics().await, "quicmesh_quic_stalled_streams_stopped_total", &[]) >= 1.0).then_some(())
            })
            .await;
            other_client_is_answered(&a).await;
            assert_eq!(metric(&b.metrics().await, "quicmesh_quic_window_lent_bytes", &[]), 0.0);
        }
        for u in uploads {
            u.abort();
        }
    }
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A Redis-like TCP server: answers `PING` with `+PONG`, then waits for more, silently; on
/// `RESET` it resets the connection (RST). Counts open connections.
async fn pong_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let open = count.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let mut seen = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if seen.windows(6).any(|w| w == b"PING\r\n") {
                        seen.clear();
                        if s.write_all(b"+PONG\r\n").await.is_err() {
                            break;
                        }
                    }
                    if seen.windows(7).any(|w| w == b"RESET\r\n") {
                        let _ = s.set_zero_linger();
                        break;
                    }
                }
                drop(s);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// node-b hosts the `redis` TCP service at `backend`; node-a tunnels a local port to it.
async fn tunnel_to(backend: std::net::SocketAddr) -> (NodeProc, NodeProc, Pki, std::net::SocketAddr) {
    let pki = Pki::new();
    let state = pki.issue("node-a");
    pki.issue("node-b");
    let svc =
        format!("[[services]]\nname = \"redis\"\nprotocol = \"tcp\"\n[[services.endpoints]]\nnode = \"node-b\"\naddress = \"{backend}\"\n");
    let b = NodeProc::start(pki.path(), "node-b", &node_toml("node-b", &state, &[], &svc));
    let a_extra = format!("{svc}\n[[node.tcp]]\nlisten = \"127.0.0.1:0\"\nservice = \"redis\"\n");
    let a =
        NodeProc::start(pki.path(), "node-a", &node_toml("node-a", &state, &[("node-b", b.addrs.inbound)], &a_extra));
    let port = a.addrs.tcp.iter().find(|(s, _)| s == "redis").unwrap().1;
    (a, b, pki, port)
}

/// PING through the tunnel, then +PONG back.
async fn ping(port: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
    s.write_all(b"PING\r\n").await.unwrap();
    let mut pong = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut pong)).await.expect("no PONG").unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    s
}

/// Waits until both nodes hold no more file descriptors than `base` (their counts at rest).
async fn fds_back_to(a: &NodeProc, b: &NodeProc, base: (usize, usize), what: &str) {
    let (pa, pb) = (a.child.id(), b.child.id());
    eventually(Duration::from_secs(15), what, || async move {
        let now = (fds(pa), fds(pb));
        (now.0 <= base.0 && now.1 <= base.1).then_some(())
    })
    .await;
}

/// Finding 4: a client that resets its tunnelled connection (PING, PONG, RST) left the far
/// side's connection to the server open for good (167 of 500, fds growing on both nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_closes_the_tunnel_and_the_far_connection() {
    use std::sync::atomic::Ordering;
    let (server, open) = pong_server().await;
    let (a, b, _pki, port) = tunnel_to(server).await;
    drop(ping(port).await);
    eventually(Duration::from_secs(10), "the first connection closed", || async {
        (open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    let base = (fds(a.child.id()), fds(b.child.id()));
    for _ in 0..50 {
        let s = ping(port).await;
        s.set_zero_linger().unwrap();
        drop(s);
    }
    eventually(Duration::from_secs(15), "every server connection closed after its client's RST", || async {
        (open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    fds_back_to(&a, &b, base, "both nodes' file descriptors back to their count at rest").await;
}

/// Finding 4, the other way: a server that resets its connection must reset the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reset_reaches_the_client_through_the_tunnel() {
    let (server, _open) = pong_server().await;
    let (a, b, _pki, port) = tunnel_to(server).await;
    let base = (fds(a.child.id()), fds(b.child.id()));
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(ping(port).await);
    }
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"RESET\r\n").await.unwrap();
        // The client waits for more; the reset must end its wait, as a reset (not a clean end,
        // which would make a cut-off transfer look complete).
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let reset = matches!(&read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset);
        assert!(reset, "client {i} did not see the server's reset: {read:?}");
    }
    drop(held);
    fds_back_to(&a, &b, base, "both nodes' file descriptors back to their count at rest").await;
}

/// Finding 6: a loopback admin API without a token took a cross-site `POST /revoke` (text/plain,
/// no preflight) and answered `Host: evil.example` (DNS rebinding); finding 12: a one-letter
/// `QUICMESH_ADMIN_TOKEN` was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_what_a_web_page_could_send() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let admin = demo.admin;
    let raw = |req: String| async move {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
        out
    };
    let post = |ctype: &str, extra: &str| {
        format!("POST /revoke?node=node-b HTTP/1.1\r\nHost: {admin}\r\n{ctype}{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
    };
    // A form's POST from another site, and one with no body type at all: refused.
    for (ctype, origin) in [("Content-Type: text/plain\r\n", "Origin: http://evil.example\r\n"), ("", "")] {
        let out = raw(post(ctype, origin)).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    }
    let out = raw(post("Content-Type: text/plain\r\n", "")).await;
    assert!(out.starts_with("HTTP/1.1 403"), "a form-like POST was accepted: {out}");
    // DNS rebinding: a page at evil.example reads the admin API.
    let out =
        raw(format!("GET /config_dump HTTP/1.1\r\nHost: evil.example:{}\r\nConnection: close\r\n\r\n", admin.port()))
            .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A page of another origin reading metrics.
    let out = raw(format!(
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(!demo.log().contains("node revoked"), "a refused request revoked node-b");
    // The operator's own tools still work: localhost, and a POST that says what it sends.
    let out =
        raw(format!("GET /ready HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n", admin.port())).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = raw(post("Content-Type: application/json\r\n", "")).await;
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("revoked node-b"), "{out}");

    // Finding 12: the environment's token obeys the file's rule.
    let out = std::process::Command::new(bin())
        .args(["demo", "--port", "0", "--admin-port", "0", "--outbound-port", "0"])
        .env("QUICMESH_ADMIN_TOKEN", "a")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("shorter than 16"), "{err}");
}

/// Finding 10: the mesh's own headers (and `early-data` over TCP) from a client reached the
/// upstream; finding 14: HTTP/1.1 heads that RFC 9112 refuses were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_speak_for_the_mesh_or_send_ambiguous_heads() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let ask = |head: &'static str| exchange(demo.port, head.to_string());
    let out = ask("GET /echo HTTP/1.1\r\nHost: x\r\nquicmesh-attempt: 9\r\nquicmesh-error: upstream-timeout\r\n\
         quicmesh-unsent: 1\r\nquicmesh-service: hello\r\nearly-data: 1\r\nConnection: close\r\n\r\n")
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let echoed = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_ascii_lowercase();
    for name in ["quicmesh-attempt", "quicmesh-error", "quicmesh-unsent", "\"quicmesh-service\"", "early-data"] {
        assert!(!echoed.contains(name), "{name} reached the upstream: {echoed}");
    }
    for (head, status) in [
        ("GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n", "400"),
        ("GET /echo HTTP/1.1\r\nHost: user@evil\r\nConnection: close\r\n\r\n", "400"),
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
            "501",
        ),
    ] {
        let out = ask(head).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{head:?} -> {out}");
    }
}

/// Finding 5: after `POST /revoke?node=node-a`, the gateway dialled node-a again and went on
/// serving `/hello` from it (its endpoints were static config). Every member must stop dialling
/// a revoked node and drop its endpoints from routing; `/endpoints` shows them revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_dialled_by_no_one_and_routed_to_by_no_one() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let (_ep, mut h3) = h3_connect(demo.port).await;
    let hello = || http::Request::get(demo.url("/hello")).body(()).unwrap();
    // v1 lives on node-a: reach it once so the gateway holds a connection to node-a.
    eventually(Duration::from_secs(10), "an answer from v1 on node-a", || async {
        let (_, _, body) = h3_request(&mut h3.clone(), hello(), b"").await;
        String::from_utf8_lossy(&body).contains("v1").then_some(())
    })
    .await;
    let opened =
        |m: &str| metric(m, "quicmesh_quic_connections_opened_total", &[("direction", "outbound"), ("peer", "node-a")]);
    let mut s = tokio::net::TcpStream::connect(demo.admin).await.unwrap();
    let revoke = format!(
        "POST /revoke?node=node-a HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        demo.admin
    );
    s.write_all(revoke.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Once the revocation is applied, no request is served by node-a. (The route sends 90% to
    // the v1 subset, whose one endpoint was node-a's: those answer 503 no-endpoint.)
    // (Shown as revoked when the endpoint is in the config files; gone when, as in the demo,
    // the revoked node had registered it.)
    eventually(Duration::from_secs(10), "node-a's endpoint revoked or gone", || async {
        let (status, body) = http_get(&format!("http://{}/endpoints", demo.admin)).await;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let live_on_a = doc["services"]
            .as_array()?
            .iter()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .any(|ep| ep["node"] == "node-a" && ep["revoked"] != true);
        (status == 200 && !live_on_a).then_some(())
    })
    .await;
    let before = opened(&demo.metrics().await);
    let mut v2 = 0;
    // At least 60 requests, and on until one reached v2: with v2's 10% weight, 60 requests miss
    // it 0.2% of the time (CI met that once).
    for i in 0..400 {
        if i >= 60 && v2 > 0 {
            break;
        }
        let (status, headers, body) = h3_request(&mut h3, hello(), b"").await;
        let body = String::from_utf8_lossy(&body);
        match status {
            200 => {
                assert!(body.contains("v2"), "request {i} was served by revoked node-a: {body}");
                v2 += 1;
            }
            _ => assert_eq!((status, headers["quicmesh-error"].to_str().unwrap()), (503, "no-endpoint"), "{i}: {body}"),
        }
    }
    assert!(v2 > 0, "node-b's v2 served nothing");
    assert_eq!(opened(&demo.metrics().await), before, "the gateway dialled revoked node-a again");
}

/// Finding 7: a TLS connection that sent nothing was kept for the idle timeout (60 s) rather
/// than the header timeout, and HTTP/2 connections sending only PINGs were never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_requests_are_closed_whatever_they_send() {
    use http_body_util::BodyExt;
    let demo = DemoProc::start(&[
        ("QUICMESH_GATEWAY__LIMITS__HEADER_READ_TIMEOUT", "1s"),
        ("QUICMESH_GATEWAY__LIMITS__IDLE_TIMEOUT", "8s"),
    ]);
    demo.wait_ready().await;
    // Silent after the handshake: closed after the header timeout (1 s), well before the
    // idle timeout (8 s here, 60 s by default), which was what closed it before.
    let mut silent = tls_connect(demo.port, &[b"http/1.1"]).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent connection was kept: {read:?}");
    // HTTP/2 with a PING every 200 ms and no request after its first: closed after the idle
    // timeout, PINGs or not (before, never).
    let tls = tls_connect(demo.port, &[b"h2"]).await;
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(demo.url("/hello")).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("the pinging HTTP/2 connection was kept")
        .unwrap()
        .ok();
    // HTTP/3 the same (quinn's keep-alives count as traffic, not as requests).
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(insecure_tls(&[b"h3"])).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    client.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    let conn = ep.connect(([127, 0, 0, 1], demo.port).into(), "localhost").unwrap().await.unwrap();
    let raw = conn.clone();
    let (mut driver, mut h3) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    assert_eq!(h3_request(&mut h3, http::Request::get(demo.url("/hello")).body(()).unwrap(), b"").await.0, 200);
    // A request stream that never finishes its HEADERS frame does not count as a request.
    let (mut half_open, _recv) = raw.open_bi().await.unwrap();
    half_open.write_all(&[0x01]).await.unwrap();
    // The client endpoint goes idle once the gateway has closed its one connection.
    tokio::time::timeout(Duration::from_secs(20), ep.wait_idle()).await.expect("the idle HTTP/3 connection was kept");
    drop(h3);
    let m = demo.metrics().await;
    for proto in ["http/1.1", "h2", "h3"] {
        assert!(metric(&m, "quicmesh_edge_idle_closed_total", &[("protocol", proto)]) >= 1.0, "{proto}: {m}");
    }
}

/// Finding 7: 10 000 idle TLS connections were accepted, with no total or per-client cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_hold_more_than_its_share_of_connections() {
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__MAX_CONNECTIONS_PER_CLIENT", "8")]);
    demo.wait_ready().await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tls_connect(demo.port, &[b"http/1.1"]).await);
    }
    // The ninth over TCP is closed before TLS; over QUIC it is refused.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", demo.port)).await.unwrap();
    let ninth = tokio::time::timeout(Duration::from_secs(10), connector.connect("localhost".try_into().unwrap(), tcp))
        .await
        .expect("the ninth connection was neither served nor closed");
    assert!(ninth.is_err(), "a ninth connection from one client was accepted");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(insecure_tls(&[b"h3"])).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let refused = ep.connect(([127, 0, 0, 1], demo.port).into(), "localhost").unwrap().await;
    assert!(refused.is_err(), "a QUIC connection past the client's share was accepted");
    let m = demo.metrics().await;
    assert!(metric(&m, "quicmesh_edge_rejected_total", &[("reason", "client-connection-limit")]) >= 2.0, "{m}");
    // One closed: a new one is served.
    drop(held.pop());
    let status = eventually(Duration::from_secs(10), "a connection once one closed", || async {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", demo.port)).await.ok()?;
        let mut s = connector.connect("localhost".try_into().unwrap(), tcp).await.ok()?;
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        Some(read_response(&mut s).await)
    })
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

/// Finding 9: `/echo/../admin` and `/echo/%2e%2e/admin` matched the `/echo` prefix and were
/// forwarded raw, so a backend that resolves dot segments could be reached past a route or a
/// deny rule. Paths are normalized before matching, authorizing and forwarding, at the edge and
/// at nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_they_are_matched_or_forwarded() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let ask = |path: &str| exchange(demo.port, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    for escape in ["/echo/../admin", "/echo/%2e%2e/admin", "/echo/%2E%2E/%2e%2e/admin"] {
        let out = ask(escape).await;
        assert!(out.starts_with("HTTP/1.1 404") && out.contains("no-route"), "{escape} -> {out}");
    }
    let out = ask("/ech%6f/./x/../y").await;
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("\"path\":\"/echo/y\""), "{out}");
    let out = ask("/echo/%zz").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // A local app through node-a: the instance sees the canonical path.
    let node_a = demo.nodes.iter().find(|n| n.name == "node-a").expect("node-a").outbound;
    let mut s = tokio::net::TcpStream::connect(node_a).await.unwrap();
    s.write_all(b"GET /a/%2e%2e/b/./c HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("\"path\":\"/b/c\""), "{out}");
    // Doubled slashes are kept, unless the mesh merges them (`mesh.merge_slashes`).
    let out = ask("/echo//x").await;
    assert!(out.contains("\"path\":\"/echo//x\""), "{out}");
    drop(demo);
    let demo = DemoProc::start(&[("QUICMESH_MESH__MERGE_SLASHES", "true")]);
    demo.wait_ready().await;
    let out = exchange(demo.port, "GET //echo///x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("\"path\":\"/echo/x\""), "{out}");
}

/// Finding 15 (unconfirmed in the report): after 300+ HTTP/3 streams reset right after their
/// HEADERS, could the connection still open streams? The gateway allows 256 at once (advertised
/// as 293), so without credit back for reset streams the 294th would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_http3_streams_give_their_credit_back() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let (_ep, mut h3) = h3_connect(demo.port).await;
    for i in 0..600 {
        let req = http::Request::post(demo.url("/echo")).body(()).unwrap();
        let mut stream = tokio::time::timeout(Duration::from_secs(10), h3.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("stream {i} could not be opened: credit was not returned"))
            .unwrap();
        stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
        stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
    }
    let req = http::Request::get(demo.url("/hello")).body(()).unwrap();
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(10), h3_request(&mut h3, req, b"")).await.unwrap();
    assert_eq!(status, 200);
}

/// An HTTP/3 connection to the edge at `port` spoken by hand: QUIC, and the client's control
/// stream (type 0) with its SETTINGS, as RFC 9114 asks; frames are the caller's to write.
async fn raw_h3(port: u16) -> (quinn::Connection, quinn::SendStream) {
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(insecure_tls(&[b"h3"])).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(tls)));
    let conn = ep.connect(([127, 0, 0, 1], port).into(), "localhost").unwrap().await.unwrap();
    let mut control = conn.open_uni().await.unwrap();
    control.write_all(&[0x00, 0x04, 0x00]).await.unwrap();
    (conn, control)
}

/// An HTTP/3 client that announces a request head of a gigabyte and starts sending it gets 431
/// when the frame's length arrives, and the rest is not read; its connection stays. A frame of a
/// gigabyte announced on its control stream closes its connection (`H3_EXCESSIVE_LOAD`). h3
/// gathered any frame but DATA whole before looking at its size, so each stream held as much as
/// a client sent before the header timeout, and a control stream had no timeout at all
/// (`vendor/h3`'s PATCHED.md). Frames of unknown types mean nothing (RFC 9114 7.2.8, 9), so
/// they are dropped as they arrive, whatever their size, never gathered nor refused: a request
/// after one of a mebibyte is served, and one of a gigabyte on the control stream harms nothing.
/// Other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_frames_announced_past_the_limit_are_refused_before_they_are_read() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let connect = async || raw_h3(demo.port).await;
    // A frame's type and a length of 2^30 - 1 (a four-byte varint), then 256 KiB of it.
    let send_huge = async |send: &mut quinn::SendStream, ty: u8| {
        send.write_all(&[ty, 0xbf, 0xff, 0xff, 0xff]).await.unwrap();
        let junk = vec![b'x'; 16 << 10];
        for _ in 0..16 {
            if send.write_all(&junk).await.is_err() {
                break;
            }
        }
    };
    let (conn, _control) = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send_huge(&mut send, 0x01).await;
    // The answer's head (QPACK, no Huffman in this server's encoder) carries the status.
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&answer).contains("431") {
        match tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await.expect("an answer") {
            Ok(Some(n)) => answer.extend_from_slice(&buf[..n]),
            other => panic!("no 431 before {other:?}: {answer:?}"),
        }
    }
    // The rest was not read: the edge stopped the stream (H3_NO_ERROR, having answered).
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await.expect("the stream stopped");
    assert_eq!(stopped.ok().flatten().map(|c| c.into_inner()), Some(0x100));
    assert!(conn.close_reason().is_none(), "the connection was closed: {:?}", conn.close_reason());
    // Unknown frames (a reserved type, 0x21): a gigabyte's begun on the control stream, and a
    // mebibyte's before a request's head.
    let (conn, mut control) = connect().await;
    send_huge(&mut control, 0x21).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0x21, 0x80, 0x10, 0x00, 0x00]).await.unwrap();
    send.write_all(&vec![0u8; 1 << 20]).await.unwrap();
    // QPACK, static table only: GET, https, :path /hello, :authority localhost:PORT.
    let authority = format!("localhost:{}", demo.port);
    let mut head = vec![0x00, 0x00, 0xd1, 0xd7, 0x51, 6];
    head.extend_from_slice(b"/hello");
    head.extend_from_slice(&[0x50, authority.len() as u8]);
    head.extend_from_slice(authority.as_bytes());
    send.write_all(&[0x01, head.len() as u8]).await.unwrap();
    send.write_all(&head).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await.expect("an answer");
    let answer = String::from_utf8_lossy(&answer.unwrap()).into_owned();
    assert!(answer.contains("hello from"), "{answer:?}");
    assert!(conn.close_reason().is_none(), "the connection was closed: {:?}", conn.close_reason());
    // On the control stream, a known frame type (GOAWAY) of a gigabyte.
    let (conn, mut control) = connect().await;
    send_huge(&mut control, 0x07).await;
    let closed =
        tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("the edge kept the connection");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x107),
        "{closed:?}"
    );
    let (_ep2, mut h3) = h3_connect(demo.port).await;
    let req = http::Request::get(demo.url("/hello")).body(()).unwrap();
    assert_eq!(h3_request(&mut h3, req, b"").await.0, 200);
}

/// An HTTP/3 request stream that ends before its head, or whose head does not arrive within the
/// header timeout, is reset with `H3_REQUEST_INCOMPLETE` (RFC 9114 4.1), and stops counting as a
/// request on its connection: after the client's GOAWAY the edge closes the connection at once.
/// Before, a stream given up before its head was dropped, which finished it as if answered, and
/// h3 kept its id among the connection's running requests for the connection's life: a client
/// could grow that set by a stream id per empty stream, for as long as it kept the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_streams_without_a_head_are_reset_and_forgotten() {
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__HEADER_READ_TIMEOUT", "1s")]);
    demo.wait_ready().await;
    let (conn, mut control) = raw_h3(demo.port).await;
    let reset_code = async |recv: &mut quinn::RecvStream| {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await.expect("an answer") {
            Err(quinn::ReadError::Reset(code)) => Some(code.into_inner()),
            other => panic!("not reset: {other:?}"),
        }
    };
    // Many streams finished at once, without a head.
    for _ in 0..100 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.finish().unwrap();
        assert_eq!(reset_code(&mut recv).await, Some(0x10d));
    }
    // A head begun (HEADERS, 16 bytes announced, one sent) and never finished.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0x01, 0x10, 0x00]).await.unwrap();
    assert_eq!(reset_code(&mut recv).await, Some(0x10d), "a head that never came");
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await.expect("the stream stopped");
    assert_eq!(stopped.ok().flatten().map(|c| c.into_inner()), Some(0x10d));
    // The client goes away (GOAWAY, push id 0): no request is running, so the connection closes.
    control.write_all(&[0x07, 0x01, 0x00]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the edge kept the connection: it counts streams given up as running requests");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x100),
        "{closed:?}"
    );
}

/// Only WebSocket upgrades are carried as tunnels (as Envoy's default upgrade config): an
/// HTTP/1.1 request asking to switch to anything else (h2c here, with its settings) is served
/// as the ordinary request it also is, its `Upgrade` dropped as a hop-by-hop field (RFC 9110
/// 7.8 lets a server ignore it), so a lenient instance cannot hand the client a raw channel
/// past what the route checks per request. Before, any protocol went to the instance as an
/// upgrade, and an instance that did not switch answered with its body dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_are_tunnelled() {
    let demo = DemoProc::start(&[]);
    demo.wait_ready().await;
    let answer = exchange(
        demo.port,
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade, http2-settings, close\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            .to_string(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.contains("\"method\":\"GET\""), "the echo's body was dropped: {answer}");
    assert!(!body.to_ascii_lowercase().contains("h2c"), "the upgrade reached the instance: {body}");
}

/// A client whose request bodies stall until the try's time runs out gets 408 `body-timeout`,
/// and the instance that waited for them is not held to account: before, each such try
/// counted as the endpoint's failure (504 `timeout`), so five stalled uploads from one client
/// ejected `echo`'s instance for every other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_are_the_clients_delay_not_the_endpoints() {
    let demo = DemoProc::start(&[("QUICMESH_TIMEOUTS__REQUEST", "1s")]);
    demo.wait_ready().await;
    for i in 0..6 {
        let mut s = tls_connect(demo.port, &[b"http/1.1"]).await;
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
        let head = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 408") && head.contains("body-timeout"), "stall {i}: {head}");
    }
    let m = demo.metrics().await;
    assert_eq!(metric(&m, "quicmesh_outlier_ejections_total", &[("service", "echo")]), 0.0, "{m}");
    let answer = exchange(
        demo.port,
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi".to_string(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Is the TCP connection from local port `local` to port `remote` still in the kernel's table?
fn tcp_open(local: u16, remote: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port =
        |field: Option<&str>| field.and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
    table.lines().skip(1).any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        (port(fields.next()), port(fields.next())) == (Some(local), Some(remote))
    })
}

/// Connects to `port` with a small receive buffer, then pipelines `request` and never reads;
/// returns the local port. The server stops reading once its answers back up, so the writes
/// may never end.
async fn pipeline_without_reading(port: u16, tls: bool, request: String) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let local = tcp.local_addr().unwrap().port();
    let mut stream: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if tls {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls(&[b"http/1.1"])));
        Box::new(connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap())
    } else {
        Box::new(tcp)
    };
    tokio::spawn(async move {
        for _ in 0..20_000 {
            if stream.write_all(request.as_bytes()).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    });
    assert!(tcp_open(local, port), "the connection is not in /proc/net/tcp");
    local
}

/// A client that pipelines requests and stops reading the answers loses its connection once
/// nothing has moved on it for the idle time: at the admin API 20 s, at the edge its
/// `idle_timeout`. Before, it kept the connection for ever (HTTP/1.1 reads nothing more while an
/// answer waits, and the idle timer looked only when a read waited; the admin's header timeout
/// runs only while a request is awaited), so 256 such clients, with no token, silenced the
/// admin's `/live`, `/ready` and `/metrics` for as long as they liked, and at the edge each
/// held one of `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go() {
    let demo = DemoProc::start(&[("QUICMESH_GATEWAY__LIMITS__IDLE_TIMEOUT", "3s")]);
    demo.wait_ready().await;
    let edge =
        pipeline_without_reading(demo.port, true, "GET /bytes/65536 HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string())
            .await;
    let admin = pipeline_without_reading(
        demo.admin.port(),
        false,
        format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", demo.admin),
    )
    .await;
    // The answers are left unread. Once a server closes (with requests it never read: a
    // reset), the connection leaves the kernel's table.
    eventually(Duration::from_secs(60), "the edge to let go of a client that does not read", || async {
        (!tcp_open(edge, demo.port)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(60), "the admin to let go of a client that does not read", || async {
        (!tcp_open(admin, demo.admin.port())).then_some(())
    })
    .await;
    assert_eq!(http_get(&format!("http://{}/live", demo.admin)).await.0, 200);
}
