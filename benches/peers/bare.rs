//! The mesh hop's libraries and nothing else, as the floor under the hop: a hyper HTTP/1.1
//! server whose requests go out as HTTP/3 over quinn with mutual TLS (the mesh's endpoint and
//! transport settings) to an h3 server, which hands them to hyper-util's pooled client for the
//! backend. No routing, header rules, telemetry, retries or policy: what is left between this
//! and the mesh hop is the nodes' own work (and their being processes of their own). Both sides
//! run on single-threaded runtimes of their own threads, as a node does by default.

use std::net::SocketAddr;

use bytes::{Buf, Bytes};
use http::header::HeaderValue;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use quicmesh_shared::config::TransportConfig;
use quicmesh_shared::identity::Credentials;
use quicmesh_shared::tls::ClientAuth;
use quicmesh_shared::transport::{mesh_endpoint, Bind};

use crate::support::{Lane, Pki, TD};

/// The two halves, running; the client talks plain HTTP/1.1 to `front`.
pub struct BareHop {
    pub front: SocketAddr,
    /// Front and back, for their CPU time; dropping them stops the hop.
    #[allow(dead_code)] // the load bench only keeps them running
    pub lanes: [Lane; 2],
}

/// Header values of the size a node adds to each request it sends over the hop (client
/// address, request id, trace context, the mesh's service, endpoint and source), for measuring
/// what their QPACK encoding costs apart from the rest of the nodes' work.
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
    let (front, back) = (Lane::new("bare-a"), Lane::new("bare-b"));
    let (quic_front, quic_back) = endpoints(pki, (&front, "bare-a"), (&back, "bare-b"));
    let quic_addr = quic_back.local_addr().unwrap();
    back.handle.spawn(async move {
        let pool = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        while let Some(incoming) = quic_back.accept().await {
            let pool = pool.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok(mut h3) = h3::server::builder().build::<_, Bytes>(h3_quinn::Connection::new(conn)).await else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    tokio::spawn(serve_one(resolver, pool.clone(), backend));
                }
            });
        }
    });
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    front.handle.spawn(async move {
        let conn = quic_front.connect(quic_addr, "bare-b").unwrap().await.unwrap();
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let send = send.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| forward(req, send.clone(), mesh_headers));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    BareHop { front: addr, lanes: [front, back] }
}

/// A QUIC client endpoint on `client`'s lane and a server endpoint requiring client
/// certificates on `server`'s, each with a fresh mesh identity of the given name and the mesh's
/// transport settings.
pub fn endpoints(pki: &Pki, client: (&Lane, &str), server: (&Lane, &str)) -> (quinn::Endpoint, quinn::Endpoint) {
    let transport = TransportConfig::default();
    let on = |(lane, name): (&Lane, &str), auth| {
        let d = pki.issue(name);
        let creds =
            Credentials::load(&d.join("ca.pem"), &d.join(format!("{name}.pem")), &d.join(format!("{name}.key")))
                .unwrap();
        let _on = lane.handle.enter();
        mesh_endpoint(Bind::Addr("127.0.0.1:0".parse().unwrap()), &creds, TD, &transport, auth).unwrap()
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
    parts.uri = format!("https://{host}{}", parts.uri.path()).parse()?;
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
        body.extend_from_slice(d.chunk());
        d.advance(d.remaining());
    }
    Ok(http::Response::from_parts(parts, Full::new(Bytes::from(body))))
}

type Pool = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// The back half: one HTTP/3 request to the backend over the pool, its answer streamed back.
async fn serve_one(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    pool: Pool,
    backend: SocketAddr,
) {
    let Ok((req, mut stream)) = resolver.resolve_request().await else { return };
    let (mut parts, ()) = req.into_parts();
    let Ok(uri) = format!("http://{backend}{}", parts.uri.path()).parse() else { return };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let Ok(resp) = pool.request(http::Request::from_parts(parts, Empty::new())).await else { return };
    let (parts, mut body) = resp.into_parts();
    if stream.send_response(http::Response::from_parts(parts, ())).await.is_err() {
        return;
    }
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if stream.send_data(data).await.is_err() {
                return;
            }
        }
    }
    let _ = stream.finish().await;
}
