//! The mesh hop's libraries and nothing else, as the floor under the hop: a hyper HTTP/1.1
//! server whose requests go out as HTTP/3 over quinn with mutual TLS (the mesh's endpoint and
//! transport settings) to an h3 server, which hands them to hyper's HTTP/1.1 client on a
//! minimal pool of connections to the backend (`pool.rs`). No routing, header rules, telemetry, retries or policy: what is left between this
//! and the mesh hop is the nodes' own work and the headers they add (which the second variant,
//! `mesh_headers`, carries, to tell the two apart).
//!
//! The bare tunnel ([`start_tunnel`]) is the same idea for the mesh's TCP tunnel: TCP carried
//! on a raw QUIC stream between two such halves, the floor under the nodes' tunnel.
//!
//! Each half is a process of its own on a single-threaded runtime, as a node is by default (the
//! bench runs itself again with `QUICMESH_BARE` set), so that neither shares an address space,
//! an allocator or an async runtime with the other, the client or the backend, which nodes
//! never do.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bytes::{Buf, Bytes};
use http::header::HeaderValue;
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use quicmesh_shared::config::TransportConfig;
use quicmesh_shared::identity::tls::ClientAuth;
use quicmesh_shared::transport::{mesh_endpoint, Bind};

use crate::support::{credentials, Lane, Pki, TD};

/// The two halves, running; the client talks HTTP/1.1 to `front` (over TLS for the bare edge),
/// or plain TCP for the bare tunnel.
pub struct BareHop {
    pub front: SocketAddr,
    procs: [Child; 2],
}

impl BareHop {
    /// Both processes, front first.
    #[allow(dead_code)] // floor's, load's and bulk's CPU figures; wan does not use it
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::id).collect()
    }
}

impl Drop for BareHop {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Header values of the size a node adds to each request it sends over the hop (client
/// address, request id, trace context, the mesh's service, endpoint and source), for measuring
/// what carrying them costs (mostly their QPACK coding) apart from the rest of the nodes' work.
/// The back half drops the mesh's own three, as a receiving node does.
const MESH_HEADERS: [(&str, &str); 6] = [
    ("x-forwarded-for", "127.0.0.1"),
    ("x-request-id", "6c13e6a5-7f45-4ae8-9332-6549a85392ea"),
    ("traceparent", "00-ddc09c1b8d58f8c60d04d388ba708352-d081bf59d2304a76-01"),
    ("quicmesh-service", "hello"),
    ("quicmesh-endpoint", "127.0.0.1:18099"),
    ("quicmesh-source", "node-a"),
];

/// Starts both halves in front of `backend`; with `mesh_headers`, the front adds
/// [`MESH_HEADERS`] to every request.
pub fn start(pki: &Pki, backend: SocketAddr, mesh_headers: bool) -> BareHop {
    start_with(pki, backend, mesh_headers, false, false, None)
}

/// The same two halves with HTTP/3 replaced by the leanest framing a request can have on a
/// raw QUIC stream ([`raw`]): a length-prefixed head, then the body up to the stream's end.
/// Against [`start`] with the same headers, in the same run, it measures what the h3 layer
/// (QPACK, frames, its per-stream state) costs the hop: the case for or against a mesh-internal
/// framing of our own.
#[allow(dead_code)] // floor and load only
pub fn start_raw(pki: &Pki, backend: SocketAddr, mesh_headers: bool) -> BareHop {
    start_with(pki, backend, mesh_headers, false, true, None)
}

/// Where the two halves run when not both on loopback: each in a network namespace of its own
/// (`ip netns exec`), the back half's QUIC endpoint on `back_ip`. The client reaches the front
/// on its namespace's loopback; `backend` is an address inside the back half's namespace.
#[allow(dead_code)] // wan only
pub struct Hosts<'a> {
    pub front_ns: &'a str,
    pub back_ns: &'a str,
    pub back_ip: std::net::IpAddr,
}

/// [`start_raw`] with the halves on two hosts ([`Hosts`]): the floor under the mesh hop where
/// the nodes run, for the loss bench.
#[allow(dead_code)] // wan only
pub fn start_raw_on(pki: &Pki, backend: SocketAddr, mesh_headers: bool, hosts: &Hosts) -> BareHop {
    start_with(pki, backend, mesh_headers, false, true, Some(hosts))
}

/// The bare edge: the same two halves, the front terminating TLS as the gateway's edge does
/// (TLS 1.3, ring, a self-signed certificate; HTTP/1.1). The floor under the gateway's
/// HTTP/1.1+TLS row: the libraries it is made of, without routing, policy or telemetry.
#[allow(dead_code)] // load only
pub fn start_edge(pki: &Pki, backend: SocketAddr) -> BareHop {
    start_with(pki, backend, false, true, false, None)
}

fn start_with(
    pki: &Pki,
    backend: SocketAddr,
    mesh_headers: bool,
    tls: bool,
    raw: bool,
    hosts: Option<&Hosts>,
) -> BareHop {
    pki.issue("bare-a");
    pki.issue("bare-b");
    let dir = pki.path().display().to_string();
    let framing = if raw { "raw" } else { "h3" };
    // On loopback both QUIC endpoints are on 127.0.0.1; across hosts the back half listens on
    // its host's address and the front sends from any of its own.
    let (back_bind, front_bind) = match hosts {
        Some(h) if h.back_ip.is_ipv6() => (h.back_ip.to_string(), "::".to_string()),
        Some(h) => (h.back_ip.to_string(), "0.0.0.0".to_string()),
        None => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
    };
    let headers = if mesh_headers { "1" } else { "0" };
    start_pair(
        hosts.map(|h| h.back_ns),
        &[
            ("QUICMESH_BARE", "back"),
            ("BARE_DIR", &dir),
            ("BARE_TO", &backend.to_string()),
            ("BARE_FRAMING", framing),
            ("BARE_BIND", &back_bind),
        ],
        hosts.map(|h| h.front_ns),
        &[
            ("QUICMESH_BARE", "front"),
            ("BARE_DIR", &dir),
            ("BARE_HEADERS", headers),
            ("BARE_TLS", if tls { "1" } else { "0" }),
            ("BARE_FRAMING", framing),
            ("BARE_BIND", &front_bind),
        ],
    )
}

/// Starts the back half (in `back_ns`, given one), then the front (in `front_ns`) sent to the
/// back's QUIC address (`BARE_TO`). The back half does not outlive a front that failed to start.
fn start_pair(
    back_ns: Option<&str>,
    back_env: &[(&str, &str)],
    front_ns: Option<&str>,
    front_env: &[(&str, &str)],
) -> BareHop {
    let (mut back, quic) = spawn(back_ns, back_env);
    let quic = quic.to_string();
    let front_env = [front_env, &[("BARE_TO", quic.as_str())]].concat();
    let front = std::panic::catch_unwind(|| spawn(front_ns, &front_env));
    match front {
        Ok((front, addr)) => BareHop { front: addr, procs: [front, back] },
        Err(panic) => {
            let _ = back.kill();
            let _ = back.wait();
            std::panic::resume_unwind(panic)
        }
    }
}

/// The bare tunnel, the floor under the mesh's TCP tunnel: two processes like the bare hop's,
/// carrying each TCP connection made to `front` on a raw QUIC stream of one mutual-TLS
/// connection (datagrams up to `udp_payload` bytes) to `sink`, with nothing of a node (no
/// framing, no telemetry, no policy).
#[allow(dead_code)] // bulk only
pub fn start_tunnel(pki: &Pki, sink: SocketAddr, udp_payload: u16) -> BareHop {
    pki.issue("bare-a");
    pki.issue("bare-b");
    let dir = pki.path().display().to_string();
    let payload = udp_payload.to_string();
    let common = [("BARE_DIR", dir.as_str()), ("BARE_BIND", "127.0.0.1"), ("BARE_UDP_PAYLOAD", payload.as_str())];
    let sink = sink.to_string();
    start_pair(
        None,
        &[&common[..], &[("QUICMESH_BARE", "tunnel-back"), ("BARE_TO", &sink)]].concat(),
        None,
        &[&common[..], &[("QUICMESH_BARE", "tunnel-front")]].concat(),
    )
}

/// Runs this bench again as one half (in network namespace `ns`, given one); returns it and the
/// address it printed when ready. The half exits when its stdin closes, so it cannot outlive
/// this process.
fn spawn(ns: Option<&str>, env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let mut command = match ns {
        Some(ns) => crate::support::netns::command(ns, exe),
        None => Command::new(exe),
    };
    // Only what this bench passes: a largest UDP payload left in the user's environment would
    // change every bare hop's transport settings.
    let mut child = command
        .env_remove("BARE_UDP_PAYLOAD")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    match line.trim().strip_prefix("bare ready: ").and_then(|a| a.parse().ok()) {
        Some(addr) => (child, addr),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a bare hop half did not start: {line:?}");
        }
    }
}

/// In a process the bench started with `QUICMESH_BARE` set: runs that half until its stdin
/// closes (the bench ended or dropped it), then exits. Does nothing otherwise. Call first thing
/// in a bench's `main`.
pub fn run_if_asked() {
    let Ok(role) = std::env::var("QUICMESH_BARE") else { return };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let dir = std::path::PathBuf::from(var("BARE_DIR"));
    let to: SocketAddr = var("BARE_TO").parse().unwrap();
    let bind: std::net::IpAddr = var("BARE_BIND").parse().expect("BARE_BIND: the address to bind the QUIC endpoint on");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let raw = var("BARE_FRAMING") == "raw";
        let ready = match role.as_str() {
            "back" => back(&dir, bind, to, raw),
            "front" => {
                front(&dir, bind, to, var("BARE_HEADERS") == "1", (var("BARE_TLS") == "1").then(edge_tls), raw).await
            }
            "tunnel-back" => tunnel::back(&dir, bind, to),
            "tunnel-front" => tunnel::front(&dir, bind, to).await,
            other => panic!("QUICMESH_BARE={other}: expected back, front, tunnel-back or tunnel-front"),
        };
        println!("bare ready: {ready}");
        std::future::pending::<()>().await
    });
}

/// A mesh endpoint on a free port of `ip`, with `name`'s identity from `dir` and the mesh's
/// transport settings (the largest UDP payload from `BARE_UDP_PAYLOAD` where the bench set it,
/// as it sets `transport.max_udp_payload` for the nodes).
fn endpoint(dir: &Path, name: &str, ip: std::net::IpAddr, auth: Option<ClientAuth>) -> quinn::Endpoint {
    let creds = credentials(dir, name);
    let bind = Bind::Addr(SocketAddr::new(ip, 0));
    let mut transport = TransportConfig::default();
    if let Ok(payload) = std::env::var("BARE_UDP_PAYLOAD") {
        transport.max_udp_payload = payload.parse().expect("BARE_UDP_PAYLOAD: a UDP payload size in bytes");
    }
    mesh_endpoint(bind, &creds, TD, &transport, auth.map(Into::into)).unwrap()
}

/// The back half: an h3 (or [`raw`]) server handing requests to a pooled client for `backend`.
fn back(dir: &Path, ip: std::net::IpAddr, backend: SocketAddr, raw: bool) -> SocketAddr {
    let quic = endpoint(dir, "bare-b", ip, Some(ClientAuth::Required));
    let addr = quic.local_addr().unwrap();
    tokio::spawn(async move {
        let pool = Pool::new(backend);
        while let Some(incoming) = quic.accept().await {
            let pool = pool.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // The full stream limit, as a node gives an authenticated peer (the endpoint's
                // is the handshake's 16, under the bench's 32 requests in flight).
                quicmesh_shared::transport::open_streams(&conn, &TransportConfig::default());
                if raw {
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(raw::serve_one(send, recv, pool.clone()));
                    }
                    return;
                }
                let mut builder = h3::server::builder();
                builder.send_grease(false);
                let Ok(mut h3) = builder.build::<_, Bytes>(h3_quinn::Connection::new(conn)).await else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    tokio::spawn(serve_one(resolver, pool.clone()));
                }
            });
        }
    });
    addr
}

/// The bare edge's TLS: what the gateway's edge terminates with (TLS 1.3 and 1.2, ring), a
/// self-signed certificate for localhost, HTTP/1.1 by ALPN.
fn edge_tls() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = super::self_signed();
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(quicmesh_shared::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(cfg).into()
}

/// The front half: an HTTP/1.1 server (over TLS, given `tls`) sending each request over one
/// QUIC connection to `quic`.
async fn front(
    dir: &Path,
    ip: std::net::IpAddr,
    quic: SocketAddr,
    mesh_headers: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    raw: bool,
) -> SocketAddr {
    let conn = endpoint(dir, "bare-a", ip, None).connect(quic, "bare-b").unwrap().await.unwrap();
    if raw {
        return http1_server(tls, move |req| raw::forward(req, conn.clone(), mesh_headers)).await;
    }
    // h3 settings as the mesh's pool has them.
    let (mut driver, send) =
        h3::client::builder().send_grease(false).build::<_, _, Bytes>(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    http1_server(tls, move |req| forward(req, send.clone(), mesh_headers)).await
}

/// An HTTP/1.1 server (over TLS, given `tls`) on a fresh loopback port, answering each request
/// with `handle`.
async fn http1_server<F, Fut>(tls: Option<tokio_rustls::TlsAcceptor>, handle: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<http::Response<Full<Bytes>>>> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let handle = handle.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handle);
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(tls) => match tls.accept(s).await {
                        Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(s), svc).await,
                };
            });
        }
    });
    addr
}

/// A QUIC client endpoint on `client`'s lane and a server endpoint requiring client
/// certificates on `server`'s, each with a fresh mesh identity of the given name and the mesh's
/// transport settings.
#[allow(dead_code)] // floor's plain HTTP/3 row
pub fn endpoints(pki: &Pki, client: (&Lane, &str), server: (&Lane, &str)) -> (quinn::Endpoint, quinn::Endpoint) {
    let on = |(lane, name): (&Lane, &str), auth| {
        let dir = pki.issue(name);
        let _on = lane.handle.enter();
        endpoint(&dir, name, std::net::Ipv4Addr::LOCALHOST.into(), auth)
    };
    (on(client, None), on(server, Some(ClientAuth::Required)))
}

type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// The front half: one HTTP/1.1 request out as HTTP/3, its answer (read whole) back.
async fn forward(
    req: http::Request<hyper::body::Incoming>,
    mut send: H3Send,
    mesh_headers: bool,
) -> anyhow::Result<http::Response<Full<Bytes>>> {
    let (mut parts, _) = req.into_parts();
    // The client's Host becomes :authority (h3 refuses the two when they differ).
    let host = parts.headers.remove(http::header::HOST);
    let host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("bare-b");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("https://{host}{path}").parse()?;
    parts.version = http::Version::HTTP_3;
    if mesh_headers {
        for (name, value) in MESH_HEADERS {
            parts.headers.insert(name, HeaderValue::from_static(value));
        }
    }
    let mut s = send.send_request(http::Request::from_parts(parts, ())).await?;
    s.finish().await?;
    let (mut parts, ()) = s.recv_response().await?.into_parts();
    parts.version = http::Version::HTTP_11;
    let mut body = Vec::new();
    while let Some(mut d) = s.recv_data().await? {
        body.extend_from_slice(&d.copy_to_bytes(d.remaining()));
    }
    Ok(http::Response::from_parts(parts, Full::new(Bytes::from(body))))
}

type Pool = super::pool::Pool<Empty<Bytes>>;

/// The back half: one HTTP/3 request to the backend over the pool, its answer (read whole)
/// sent back.
async fn serve_one(resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>, pool: Pool) {
    let Ok((req, mut stream)) = resolver.resolve_request().await else { return };
    // The request's end read, as a node reads it (a stream dropped unread costs a STOP_SENDING).
    while let Ok(Some(_)) = stream.recv_data().await {}
    let (mut parts, ()) = req.into_parts();
    // What a receiving node does with the mesh's own headers: they stop here.
    for (name, _) in MESH_HEADERS.iter().filter(|(name, _)| name.starts_with("quicmesh-")) {
        parts.headers.remove(*name);
    }
    // :authority arrived in the URI; the backend gets it as Host, and the path alone.
    if let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(http::header::HOST, host);
    }
    parts.uri = parts.uri.path_and_query().map_or(http::Uri::from_static("/"), |p| p.clone().into());
    parts.version = http::Version::HTTP_11;
    let Some((parts, body)) = pool.call(http::Request::from_parts(parts, Empty::new())).await else { return };
    if stream.send_response(http::Response::from_parts(parts, ())).await.is_err() {
        return;
    }
    if !body.is_empty() && stream.send_data(body).await.is_err() {
        return;
    }
    let _ = stream.finish().await;
}

/// The leanest framing a request can have on a QUIC stream of its own, for the bare hop's
/// comparison: the head as `u32` length, then `u16`-length-prefixed fields (method, authority,
/// path, or the status; then name and value of each header), then the body up to the stream's
/// FIN. No header compression, no frames (so no trailers): a floor for any mesh-internal
/// framing, not a design.
mod raw {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use http::header::{HeaderName, HOST};

    fn field(buf: &mut BytesMut, v: &[u8]) {
        buf.put_u16(v.len() as u16);
        buf.put_slice(v);
    }

    /// A head: `first` fields, then `headers`.
    fn encode(first: &[&[u8]], headers: &http::HeaderMap) -> Bytes {
        let len: usize = first.iter().map(|f| 2 + f.len()).sum::<usize>()
            + headers.iter().map(|(n, v)| 4 + n.as_str().len() + v.len()).sum::<usize>();
        let mut buf = BytesMut::with_capacity(4 + len);
        buf.put_u32(len as u32);
        for f in first {
            field(&mut buf, f);
        }
        for (n, v) in headers {
            field(&mut buf, n.as_str().as_bytes());
            field(&mut buf, v.as_bytes());
        }
        buf.freeze()
    }

    /// Reads a head (`first` fields and the headers) off `recv`; returns them and whatever of
    /// the body came with it.
    async fn decode(
        recv: &mut quinn::RecvStream,
        first: usize,
    ) -> anyhow::Result<(Vec<Bytes>, http::HeaderMap, Bytes)> {
        let mut buf = Bytes::new();
        // Usually the whole head comes in one chunk, taken without a copy.
        while buf.len() < 4 || buf.len() < 4 + u32::from_be_bytes(buf[..4].try_into()?) as usize {
            let Some(c) = recv.read_chunk(usize::MAX, true).await? else { anyhow::bail!("head cut short") };
            buf = if buf.is_empty() {
                c.bytes
            } else {
                let mut joined = BytesMut::from(&buf[..]);
                joined.extend_from_slice(&c.bytes);
                joined.freeze()
            };
        }
        let len = buf.get_u32() as usize;
        let rest = buf.split_off(len);
        fn next(buf: &mut Bytes) -> anyhow::Result<Bytes> {
            anyhow::ensure!(buf.remaining() >= 2, "field cut short");
            let n = buf.get_u16() as usize;
            anyhow::ensure!(buf.remaining() >= n, "field cut short");
            Ok(buf.split_to(n))
        }
        let fields = (0..first).map(|_| next(&mut buf)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut headers = http::HeaderMap::new();
        while buf.has_remaining() {
            let name = HeaderName::from_bytes(&next(&mut buf)?)?;
            let value = HeaderValue::from_maybe_shared(next(&mut buf)?)?;
            headers.append(name, value);
        }
        Ok((fields, headers, rest))
    }

    /// The rest of a body after `start`, read whole.
    async fn body(recv: &mut quinn::RecvStream, start: Bytes) -> anyhow::Result<Bytes> {
        let Some(c) = recv.read_chunk(usize::MAX, true).await? else { return Ok(start) };
        let mut body = BytesMut::from(&start[..]);
        body.extend_from_slice(&c.bytes);
        while let Some(c) = recv.read_chunk(usize::MAX, true).await? {
            body.extend_from_slice(&c.bytes);
        }
        Ok(body.freeze())
    }

    /// The front half: one HTTP/1.1 request out on a stream of its own over `conn`, its
    /// answer (read whole) back.
    pub async fn forward(
        req: http::Request<hyper::body::Incoming>,
        conn: quinn::Connection,
        mesh_headers: bool,
    ) -> anyhow::Result<http::Response<Full<Bytes>>> {
        let (mut parts, _) = req.into_parts();
        let host = parts.headers.remove(HOST);
        let authority = host.as_ref().map_or(&b"bare-b"[..], |h| h.as_bytes());
        if mesh_headers {
            for (name, value) in MESH_HEADERS {
                parts.headers.insert(name, HeaderValue::from_static(value));
            }
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let head = encode(&[parts.method.as_str().as_bytes(), authority, path.as_bytes()], &parts.headers);
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_chunk(head).await?;
        send.finish()?;
        let (status, headers, start) = decode(&mut recv, 1).await?;
        let body = body(&mut recv, start).await?;
        let mut resp = http::Response::new(Full::new(body));
        *resp.status_mut() = http::StatusCode::from_bytes(&status[0])?;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    /// The back half: one request to the backend over the pool, its answer (read whole) sent
    /// back on the same stream.
    pub async fn serve_one(mut send: quinn::SendStream, mut recv: quinn::RecvStream, pool: Pool) {
        let Ok((first, mut headers, _)) = decode(&mut recv, 3).await else { return };
        // The request's end read, as the h3 back half does.
        while let Ok(Some(_)) = recv.read_chunk(usize::MAX, true).await {}
        for (name, _) in MESH_HEADERS.iter().filter(|(name, _)| name.starts_with("quicmesh-")) {
            headers.remove(*name);
        }
        let (Ok(method), Ok(host), Ok(uri)) = (
            http::Method::from_bytes(&first[0]),
            HeaderValue::from_maybe_shared(first[1].clone()),
            http::Uri::from_maybe_shared(first[2].clone()),
        ) else {
            return;
        };
        headers.insert(HOST, host);
        let mut req = http::Request::new(Empty::new());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let Some((parts, body)) = pool.call(req).await else { return };
        let head = encode(&[parts.status.as_str().as_bytes()], &parts.headers);
        if send.write_chunk(head).await.is_err() {
            return;
        }
        if !body.is_empty() && send.write_chunk(body).await.is_err() {
            return;
        }
        let _ = send.finish();
    }
}

/// The bare tunnel's two halves ([`start_tunnel`]), read and written as the nodes' tunnel
/// reads and writes: 64 KiB TCP reads each written as one chunk; what has arrived of the
/// stream (up to 256 chunks) gathered into vectored TCP writes.
mod tunnel {
    use std::net::SocketAddr;
    use std::path::Path;

    use bytes::Bytes;
    use quicmesh_shared::identity::tls::ClientAuth;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The front half: accepts TCP and carries each connection on a new stream of one QUIC
    /// connection to `quic`.
    pub async fn front(dir: &Path, ip: std::net::IpAddr, quic: SocketAddr) -> SocketAddr {
        let conn = super::endpoint(dir, "bare-a", ip, None).connect(quic, "bare-b").unwrap().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let conn = conn.clone();
                tokio::spawn(async move {
                    let Ok((mut send, _recv)) = conn.open_bi().await else { return };
                    let mut buf = bytes::BytesMut::with_capacity(64 << 10);
                    loop {
                        buf.reserve(64 << 10);
                        match tcp.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                if send.write_chunk(buf.split().freeze()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
        addr
    }

    /// The back half: each stream of each connection goes to `sink` over TCP.
    pub fn back(dir: &Path, ip: std::net::IpAddr, sink: SocketAddr) -> SocketAddr {
        let quic = super::endpoint(dir, "bare-b", ip, Some(ClientAuth::Required));
        let addr = quic.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = quic.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((_send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let Ok(mut tcp) = tokio::net::TcpStream::connect(sink).await else { return };
                            let _ = tcp.set_nodelay(true);
                            let mut read = vec![Bytes::new(); 256];
                            let mut chunks = Vec::with_capacity(256);
                            while let Ok(Some(n)) = recv.read_chunks(&mut read).await {
                                chunks.extend(read[..n].iter_mut().map(std::mem::take));
                                if quicmesh_shared::proxy::tcp::write_chunks(&mut tcp, &mut chunks).await.is_err() {
                                    return;
                                }
                            }
                            let _ = tcp.shutdown().await;
                        });
                    }
                });
            }
        });
        addr
    }
}
