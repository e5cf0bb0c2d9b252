//! The least a proxy can do to keep HTTP/1.1 connections to one backend: a stack of idle
//! connections on hyper's connection API, one taken for each request and put back once its
//! answer has been read whole. No keys, timers or retries. The floor rows (the minimal hyper
//! proxy, the bare hop's back half) use it since the nodes' own pool replaced hyper-util's
//! pooled client for plain HTTP/1.1 to instances: a floor on hyper-util would have been
//! dearer than the nodes, not under them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

pub struct Pool<B> {
    backend: SocketAddr,
    idle: Arc<Mutex<Vec<SendRequest<B>>>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self { backend: self.backend, idle: self.idle.clone() }
    }
}

impl<B> Pool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(backend: SocketAddr) -> Self {
        Self { backend, idle: Arc::default() }
    }

    /// Sends `req` (origin-form) to the backend and reads its answer whole; `None` when the
    /// backend could not be reached or broke off.
    pub async fn call(&self, req: http::Request<B>) -> Option<(http::response::Parts, Bytes)> {
        let pooled = {
            let mut idle = self.idle.lock().unwrap();
            std::iter::from_fn(|| idle.pop()).find(|s| !s.is_closed())
        };
        let mut send = match pooled {
            Some(send) => send,
            None => {
                let tcp = tokio::net::TcpStream::connect(self.backend).await.ok()?;
                tcp.set_nodelay(true).ok()?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
                tokio::spawn(conn);
                send
            }
        };
        send.ready().await.ok()?;
        let (parts, body) = send.send_request(req).await.ok()?.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        self.idle.lock().unwrap().push(send);
        Some((parts, body))
    }
}
