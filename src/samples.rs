//! Sample services: `hello` (says which version answered) and `echo` (reflects the request as
//! JSON, or streams bytes for transfer tests). Real HTTP/1.1 + h2c servers on real sockets.

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use quicmesh_shared::message::body::{self, Body};
use tokio::net::TcpListener;

/// Largest request body the JSON echo reflects (bigger ones are counted, not echoed).
const ECHO_LIMIT: usize = 1 << 20;

/// Serves HTTP/1.1 and h2c on `listener` with `handler` until the task is dropped (also the
/// base of the tests' special-purpose backends).
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `hello`: answers every request with its version and node.
pub async fn hello(listener: TcpListener, version: String, node: String) {
    serve(listener, move |req: Request<Incoming>| {
        let text = format!("hello from {version} on {node}\n");
        async move {
            // Drain the request body so keep-alive connections stay usable, a frame at a time
            // (none is kept: an upload of any size costs no memory).
            let mut body = req.into_body();
            while let Some(Ok(_)) = body.frame().await {}
            let mut resp = Response::new(body::full(text));
            resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
            resp
        }
    })
    .await
}

/// `echo`: `GET /bytes/N` streams N bytes; `POST /count` streams the upload in and answers its
/// length; anything else answers a JSON document of method, path, headers and body.
pub async fn echo(listener: TcpListener) {
    serve(listener, echo_handler).await
}

async fn echo_handler(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
        return Response::new(stream_bytes(n));
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => return status(StatusCode::BAD_REQUEST),
            }
        }
        return Response::new(body::full(format!("{total}\n")));
    }
    let (parts, incoming) = req.into_parts();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = match http_body_util::Limited::new(incoming, ECHO_LIMIT).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => return status(StatusCode::PAYLOAD_TOO_LARGE),
    };
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": body,
    });
    let mut resp = Response::new(body::full(doc.to_string()));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = code;
    r
}

/// A body of `n` bytes produced 64 KiB at a time, never held whole.
pub fn stream_bytes(n: u64) -> Body {
    const CHUNK: u64 = 64 << 10;
    let block = Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let block = block.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK);
            Some((Ok::<_, Infallible>(Frame::data(block.slice(..take as usize))), left - take))
        }
    });
    body::boxed(StreamBody::new(stream))
}
