//! A request stream between mesh members, in either framing a connection may speak: quicmesh's
//! own ([`lean`], preferred) or HTTP/3 (a peer that offers nothing else, and the control
//! plane). The proxy code sees one type each way and one error type.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};

use super::lean;
use crate::message::body::{H3Recv, H3Send};
pub use crate::message::wire::WireError;

/// An HTTP/3 request stream accepted by a server (a node's mesh listener, the control plane,
/// the edge), its head not yet read.
pub type H3Resolver = h3::server::RequestResolver<h3_quinn::Connection, Bytes>;
/// An HTTP/3 request stream whose head has been read.
pub type H3ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// A request's head did not arrive in time: its stream was reset (`H3_REQUEST_INCOMPLETE`).
#[derive(Debug)]
pub struct HeadLate;

/// Reads the head of a request stream, given `within` to arrive; past it the stream is reset
/// with `H3_REQUEST_INCOMPLETE` (RFC 9114 4.1) and stops counting as a request on its
/// connection. Dropped instead, it would be finished as if answered, and h3 would count it as
/// running for the connection's life (`vendor/h3`'s PATCHED.md).
pub async fn h3_head_within(
    mut resolver: H3Resolver,
    within: std::time::Duration,
) -> Result<Result<(http::Request<()>, H3ServerStream), h3::error::StreamError>, HeadLate> {
    let deadline = tokio::time::Instant::now() + within;
    let frame = match tokio::time::timeout_at(deadline, resolver.first_frame()).await {
        Ok(frame) => frame,
        Err(_) => {
            resolver.give_up(h3::error::Code::H3_REQUEST_INCOMPLETE);
            return Err(HeadLate);
        }
    };
    let resolved = match resolver.accept_with_frame(frame) {
        Ok(resolved) => resolved,
        Err(e) => return Ok(Err(e)),
    };
    // The rest needs no more of the peer's bytes, only credit for a 431 when the head was too
    // large; a peer that grants none has the stream dropped.
    tokio::time::timeout_at(deadline, resolved.resolve()).await.map_err(|_| HeadLate)
}

/// A request stream this member opened to a peer.
// The lean variant is the larger and the usual one: boxing it would cost every request an
// allocation to spare the rare HTTP/3 stream a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub enum RequestStream {
    /// Boxed: h3's is about twice the lean framing's, and a stream is moved through several
    /// futures before it is split.
    H3(Box<h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>>),
    Lean(lean::SendHalf, lean::RecvHalf),
}

impl RequestStream {
    /// Ends the request (no body, or no more of it).
    pub async fn finish(&mut self) -> Result<(), WireError> {
        match self {
            // Boxed, as in `ServerSend::send_response`.
            RequestStream::H3(s) => Ok(Box::pin(s.finish()).await?),
            RequestStream::Lean(send, _) => send.finish().await,
        }
    }

    /// Reads the answer's head.
    pub async fn recv_response(&mut self) -> Result<Response<()>, WireError> {
        match self {
            RequestStream::H3(s) => Ok(s.recv_response().await?),
            RequestStream::Lean(_, recv) => recv.response().await,
        }
    }

    pub fn split(self) -> (ClientSend, ClientRecv) {
        match self {
            RequestStream::H3(s) => {
                let (send, recv) = s.split();
                (ClientSend::H3(Box::new(send)), ClientRecv::H3(recv))
            }
            RequestStream::Lean(send, recv) => (ClientSend::Lean(send), ClientRecv::Lean(recv)),
        }
    }
}

/// The sending half of a [`RequestStream`].
pub enum ClientSend {
    /// Boxed: h3's is ten times the lean framing's, which is the usual one.
    H3(Box<h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>>),
    Lean(lean::SendHalf),
}

/// The receiving half of a [`RequestStream`].
pub enum ClientRecv {
    H3(h3::client::RequestStream<h3_quinn::RecvStream, Bytes>),
    Lean(lean::RecvHalf),
}

impl ClientRecv {
    /// Reads the answer's head.
    pub async fn recv_response(&mut self) -> Result<Response<()>, WireError> {
        match self {
            ClientRecv::H3(s) => Ok(s.recv_response().await?),
            ClientRecv::Lean(recv) => recv.response().await,
        }
    }
}

/// A request stream a peer opened to this member.
// As for `RequestStream`.
#[allow(clippy::large_enum_variant)]
pub enum ServerStream {
    /// Boxed as [`RequestStream::H3`] is.
    H3(Box<h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>>),
    Lean(lean::SendHalf, lean::RecvHalf),
}

impl ServerStream {
    pub fn split(self) -> (ServerSend, ServerRecv) {
        match self {
            ServerStream::H3(s) => {
                let (send, recv) = s.split();
                (ServerSend::H3(Box::new(send)), ServerRecv::H3(recv))
            }
            ServerStream::Lean(send, recv) => (ServerSend::Lean(send), ServerRecv::Lean(recv)),
        }
    }
}

/// The sending half of a [`ServerStream`].
pub enum ServerSend {
    /// Boxed as [`ClientSend::H3`] is.
    H3(Box<h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>>),
    Lean(lean::SendHalf),
}

impl ServerSend {
    /// Sends the answer's head.
    pub async fn send_response(&mut self, resp: Response<()>) -> Result<(), WireError> {
        match self {
            // Boxed: h3's future is several times the lean framing's, the usual one.
            ServerSend::H3(s) => Ok(Box::pin(s.send_response(resp)).await?),
            ServerSend::Lean(s) => s.respond(&resp).await,
        }
    }
}

/// The receiving half of a [`ServerStream`].
pub enum ServerRecv {
    H3(h3::server::RequestStream<h3_quinn::RecvStream, Bytes>),
    Lean(lean::RecvHalf),
}

macro_rules! dispatch_send {
    ($t:ident) => {
        impl H3Send for $t {
            async fn send(&mut self, data: Bytes) -> Result<(), WireError> {
                match self {
                    $t::H3(s) => s.as_mut().send(data).await,
                    $t::Lean(s) => s.send(data).await,
                }
            }
            async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), WireError> {
                match self {
                    // Boxed: h3's future is several times the lean framing's (gRPC answers
                    // all end in trailers, so the lean one stays inline).
                    $t::H3(s) => Box::pin(s.as_mut().trailers(trailers)).await,
                    $t::Lean(s) => s.trailers(trailers).await,
                }
            }
            async fn finish(&mut self) -> Result<(), WireError> {
                match self {
                    $t::H3(s) => H3Send::finish(s.as_mut()).await,
                    $t::Lean(s) => s.finish().await,
                }
            }
            fn reset(&mut self) {
                match self {
                    $t::H3(s) => H3Send::reset(s.as_mut()),
                    $t::Lean(s) => s.reset(),
                }
            }
        }
    };
}
dispatch_send!(ClientSend);
dispatch_send!(ServerSend);

macro_rules! dispatch_recv {
    ($t:ident) => {
        impl H3Recv for $t {
            fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
                match self {
                    $t::H3(s) => s.poll_data(cx),
                    $t::Lean(s) => s.poll_data(cx),
                }
            }
            fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, WireError>> {
                match self {
                    $t::H3(s) => s.poll_trailers(cx),
                    $t::Lean(s) => s.poll_trailers(cx),
                }
            }
            fn take_held(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
                match self {
                    $t::H3(s) => s.take_held(out, limit),
                    $t::Lean(s) => s.take_held(out, limit),
                }
            }
        }
    };
}
dispatch_recv!(ClientRecv);
dispatch_recv!(ServerRecv);

/// Which framing a connection speaks, from its negotiated ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Lean,
    H3,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::Lean => "lean",
            Framing::H3 => "h3",
        }
    }

    /// The framing `conn` negotiated; HTTP/3 when it named none (it cannot be anything else).
    pub fn of(conn: &quinn::Connection) -> Option<Self> {
        let data = conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
        Some(match data.protocol.as_deref() {
            Some(p) if p == lean::ALPN => Framing::Lean,
            _ => Framing::H3,
        })
    }
}
