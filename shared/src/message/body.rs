//! Streaming bodies between hyper and request streams on QUIC (HTTP/3, or the members' lean
//! framing), with backpressure and no whole-body buffering.
//!
//! [`H3Body`] turns the receive half of a request stream (client or server side) into an
//! `http_body::Body`, coalescing the many small QUIC chunks into larger frames. [`pump_to_h3`]
//! sends any body into a request stream, awaiting flow control credit frame by frame. Memory per
//! request is therefore bounded by the QUIC windows plus one coalesced frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h3::error::Code;

use super::wire::WireError;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxy hop uses.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Largest frame built from coalesced QUIC chunks.
const COALESCE: usize = 64 << 10;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors convert into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The receive half of a request stream, client or server side, in either framing.
pub trait H3Recv: Send + Unpin + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, WireError>>;
    /// Appends to `out`, until `out` holds `limit` chunks, data this half already holds (what
    /// `poll_data` would give next) without reading the stream; returns their bytes. It may take
    /// none (the default does): a tunnel's copy loop takes a read's batch this way at once.
    fn take_held(&mut self, _out: &mut Vec<Bytes>, _limit: usize) -> usize {
        0
    }
}

macro_rules! impl_recv {
    ($t:ty) => {
        impl H3Recv for $t {
            fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
                self.poll_recv_data(cx).map(|r| match r {
                    Ok(o) => Ok(o.map(|mut b| b.copy_to_bytes(b.remaining()))),
                    Err(e) => Err(e.into()),
                })
            }
            fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, WireError>> {
                self.poll_recv_trailers(cx).map_err(Into::into)
            }
        }
    };
}
impl_recv!(h3::server::RequestStream<h3_quinn::RecvStream, Bytes>);
impl_recv!(h3::client::RequestStream<h3_quinn::RecvStream, Bytes>);

/// The send half of a request stream, client or server side, in either framing.
pub trait H3Send: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), WireError>> + Send;
    fn trailers(&mut self, trailers: HeaderMap) -> impl Future<Output = Result<(), WireError>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), WireError>> + Send;
    /// Abandons the stream with a reset, so the peer never mistakes a cut body for a whole one.
    fn reset(&mut self);
}

macro_rules! impl_send {
    ($t:ty) => {
        impl H3Send for $t {
            async fn send(&mut self, data: Bytes) -> Result<(), WireError> {
                Ok(self.send_data(data).await?)
            }
            async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), WireError> {
                Ok(self.send_trailers(trailers).await?)
            }
            async fn finish(&mut self) -> Result<(), WireError> {
                Ok(<$t>::finish(self).await?)
            }
            fn reset(&mut self) {
                self.stop_stream(Code::H3_REQUEST_CANCELLED);
            }
        }
    };
}
impl_send!(h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>);
impl_send!(h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>);

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("reading the body failed: {0}")]
    Source(BoxError),
    #[error("sending on the QUIC stream failed: {0}")]
    Sink(WireError),
}

/// Streams `body` into `send` and finishes it; returns the bytes sent. On a source error the
/// stream is reset rather than finished.
///
/// Data frames that are already waiting are joined into one send (up to [`COALESCE`] bytes),
/// so a body of many tiny frames (a gRPC stream of small messages, one HTTP/2 DATA frame each)
/// is drained as fast as it arrives. Read one frame per send, such a body piles up unread in
/// hyper's HTTP/2 connection, and h2 (>= 0.4.16) closes a connection whose small frames pile
/// up with GOAWAY ENHANCE_YOUR_CALM, failing every call on it. Nothing waits to fill a batch.
pub async fn pump_to_h3<B, S>(mut body: B, send: &mut S) -> Result<u64, PumpError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    S: H3Send,
{
    let mut sent = 0u64;
    // A frame read while joining data that is not data itself (trailers, the end, an error).
    let mut held: Option<Option<Result<Frame<Bytes>, B::Error>>> = None;
    loop {
        let next = match held.take() {
            Some(next) => next,
            None => body.frame().await,
        };
        let frame = match next {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                send.reset();
                return Err(PumpError::Source(e.into()));
            }
        };
        match frame.into_data() {
            Ok(first) => {
                let data = join_ready(first, &mut body, &mut held);
                if !data.is_empty() {
                    sent += data.len() as u64;
                    send.send(data).await.map_err(PumpError::Sink)?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.trailers(trailers).await.map_err(PumpError::Sink)?;
                    return Ok(sent);
                }
            }
        }
    }
    send.finish().await.map_err(PumpError::Sink)?;
    Ok(sent)
}

/// `first` and the data frames `body` has ready now, joined up to [`COALESCE`] bytes; a ready
/// frame that is not data is left in `held` for the caller.
fn join_ready<B>(first: Bytes, body: &mut B, held: &mut Option<Option<Result<Frame<Bytes>, B::Error>>>) -> Bytes
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut joined: Option<BytesMut> = None;
    let mut len = first.len();
    while len < COALESCE {
        // Polled with a no-op waker: a pending body is polled again, with the task's waker,
        // by the caller's next `frame().await`, so no wake-up is lost.
        let Poll::Ready(next) = Pin::new(&mut *body).poll_frame(&mut cx) else { break };
        match next {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(more) => {
                    len += more.len();
                    joined.get_or_insert_with(|| BytesMut::from(&first[..])).extend_from_slice(&more);
                }
                Err(other) => {
                    *held = Some(Some(Ok(other)));
                    break;
                }
            },
            other => {
                *held = Some(other);
                break;
            }
        }
    }
    joined.map_or(first, BytesMut::freeze)
}

/// The request body of a request stream.
///
/// When the peer ended the stream along with its headers (a GET, most requests), the end is
/// read here and an empty body is returned, so the stream closes by having its end read. A
/// stream dropped unread makes quinn send a STOP_SENDING frame. That frame went out in a packet
/// of its own for every request, and the peer acknowledged it at once: two extra packets per
/// request.
///
/// A body that has data, or has not ended yet, streams as before.
pub async fn request_body<R: H3Recv>(recv: R) -> Body {
    let mut body = H3Body::new(recv);
    match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
        Poll::Ready(None) => empty(),
        Poll::Ready(Some(first)) => Prefixed { first: Some(first), inner: boxed(body) }.boxed_unsync(),
        Poll::Pending => boxed(body),
    }
}

/// `rest` after a frame already read from it.
pub fn prefixed(first: Frame<Bytes>, rest: Body) -> Body {
    Prefixed { first: Some(Ok(first)), inner: rest }.boxed_unsync()
}

/// A body whose first frame was read already.
struct Prefixed {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    inner: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.first.take() {
            Some(frame) => Poll::Ready(Some(frame)),
            None => Pin::new(&mut self.inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }
}

enum State {
    Data,
    Trailers,
    /// The data ended and the trailers were read already: they come next.
    Trailing(HeaderMap),
    Done,
}

/// An `http_body::Body` reading a request stream's data, then its trailers.
///
/// It never yields an empty DATA frame, and when the stream's end is already known as its last
/// data is delivered, it says so (`is_end_stream`), so an HTTP/2 hop after it sends that data
/// with END_STREAM instead of an empty DATA frame of its own after it (which a naive echo
/// server turns into the empty, non-final DATA frames h2 counts as a flood: after 100 on a
/// connection, the client of it sends GOAWAY and every stream on it fails).
pub struct H3Body<R, G = ()> {
    recv: R,
    state: State,
    /// An error met while coalescing, reported on the next poll.
    pending: Option<BoxError>,
    /// Kept alive until the body is dropped (a hold on the pooled connection), without a
    /// boxed layer of its own.
    _guard: G,
}

impl<R: H3Recv> H3Body<R> {
    pub fn new(recv: R) -> Self {
        Self { recv, state: State::Data, pending: None, _guard: () }
    }

    /// The same body, keeping `guard` alive until it is dropped.
    pub fn holding<G>(self, guard: G) -> H3Body<R, G> {
        H3Body { recv: self.recv, state: self.state, pending: self.pending, _guard: guard }
    }
}

impl<R: H3Recv, G> H3Body<R, G> {
    /// The data just ended: reads the trailers too if they are already here, so the end is
    /// known with the last data.
    fn data_ended(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        self.state = match trailers_guarded(&mut self.recv, cx) {
            Poll::Ready(Ok(Some(t))) => State::Trailing(t),
            Poll::Ready(Ok(None)) => State::Done,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => State::Trailers,
        };
        Ok(())
    }
}

/// Reads trailers, turning h3's panic on a stream that ended inside a DATA frame (h3 0.0.8
/// asserts instead of reporting the truncation) into an error for this body only.
fn trailers_guarded<R: H3Recv>(recv: &mut R, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, BoxError>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| recv.poll_trailers(cx))) {
        Ok(p) => p.map_err(Into::into),
        Err(_) => Poll::Ready(Err("the peer ended the stream inside a DATA frame".into())),
    }
}

impl<R: H3Recv, G: Unpin> HttpBody for H3Body<R, G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.state, State::Done) {
                State::Data => {
                    this.state = State::Data;
                    if let Some(e) = this.pending.take() {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                    let first = match ready!(this.recv.poll_data(cx)) {
                        Ok(Some(b)) => b,
                        Ok(None) => {
                            this.state = State::Trailers;
                            continue;
                        }
                        Err(e) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    };
                    if first.len() >= COALESCE {
                        return Poll::Ready(Some(Ok(Frame::data(first))));
                    }
                    // Gather what is already buffered into one frame, and learn whether the
                    // data ends with it. A lone chunk, most small bodies, goes on as it is:
                    // the copy is made only once a second one comes.
                    let mut buf: Option<BytesMut> = None;
                    while buf.as_ref().map_or(first.len(), BytesMut::len) < COALESCE {
                        match this.recv.poll_data(cx) {
                            Poll::Ready(Ok(Some(b))) => buf
                                .get_or_insert_with(|| {
                                    let mut m = BytesMut::with_capacity(first.len() + b.len());
                                    m.extend_from_slice(&first);
                                    m
                                })
                                .extend_from_slice(&b),
                            Poll::Ready(Ok(None)) => {
                                if let Err(e) = this.data_ended(cx) {
                                    // Deliver what we have; the error comes on the next poll.
                                    this.state = State::Data;
                                    this.pending = Some(e);
                                }
                                break;
                            }
                            Poll::Ready(Err(e)) => {
                                this.pending = Some(e.into());
                                break;
                            }
                            Poll::Pending => break,
                        }
                    }
                    let data = buf.map_or(first, BytesMut::freeze);
                    if data.is_empty() {
                        // Nothing to deliver (empty DATA frames): go on from the new state; a
                        // `Pending` above registered the wake-up.
                        if matches!(this.state, State::Data) && this.pending.is_none() {
                            return Poll::Pending;
                        }
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Trailers => {
                    let res = match trailers_guarded(&mut this.recv, cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            this.state = State::Trailers;
                            return Poll::Pending;
                        }
                    };
                    return Poll::Ready(match res {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                State::Trailing(t) => {
                    return Poll::Ready(if t.is_empty() { None } else { Some(Ok(Frame::trailers(t))) });
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

/// A body that keeps `guard` alive until the body itself is dropped.
struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Ties `guard`'s lifetime to `body`'s (e.g. a cancel handle for the paired upload).
pub fn with_guard<G: Send + Unpin + 'static>(body: Body, guard: G) -> Body {
    Guarded { inner: body, _guard: guard }.boxed_unsync()
}

/// What broke a client's request body, shared between the body and the try that sends it.
///
/// A body that fails while a proxy forwards it is the client's fault (a malformed chunk, a
/// reset stream, a body past the limit), never the upstream's: the try that carried it ends
/// with this error instead of whatever the upstream made of the cut request, so it is answered
/// 400 or 413, retried nowhere and held against no endpoint or connection.
#[derive(Clone, Default)]
pub struct SourceFault(Option<Arc<SourceFaultState>>);

#[derive(Default)]
struct SourceFaultState {
    error: Mutex<Option<crate::message::error::ProxyError>>,
    notify: tokio::sync::Notify,
    /// Since when the body's reader has been waiting for the client's next piece (its last
    /// poll found none yet), as nanoseconds past [`stall_base`] plus one; 0 while the reader is
    /// not waiting on the client (it took a piece, and is busy sending it upstream).
    stalled_since: std::sync::atomic::AtomicU64,
}

/// The instant [`SourceFaultState::stalled_since`] counts from.
fn stall_base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

impl SourceFault {
    /// The client error, once the body failed.
    pub fn error(&self) -> Option<crate::message::error::ProxyError> {
        self.0.as_ref()?.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Can the body still fail? (No for a body that had ended before it was watched.)
    pub fn watching(&self) -> bool {
        self.0.is_some()
    }

    /// Has the body's reader been waiting for the client's next piece for `at_least`? A try
    /// that ran out of time then ran out of it waiting for the client, not for the upstream.
    pub fn awaiting_client_for(&self, at_least: std::time::Duration) -> bool {
        let Some(state) = &self.0 else { return false };
        match state.stalled_since.load(std::sync::atomic::Ordering::Relaxed) {
            0 => false,
            since => stall_base().elapsed().saturating_sub(std::time::Duration::from_nanos(since - 1)) >= at_least,
        }
    }

    /// Resolves when the body fails; never, while it does not.
    pub async fn failed(&self) -> crate::message::error::ProxyError {
        let Some(state) = &self.0 else { return std::future::pending().await };
        loop {
            let notified = state.notify.notified();
            if let Some(e) = self.error() {
                return e;
            }
            notified.await;
        }
    }

    fn set(&self, e: &BoxError) {
        let Some(state) = &self.0 else { return };
        let error = match e.downcast_ref::<crate::message::error::ProxyError>() {
            Some(known) => known.clone(),
            // This side stopped the upload (its reader, the instance, had stopped taking it).
            None if matches!(e.downcast_ref(), Some(crate::message::wire::WireError::Stalled)) => {
                crate::message::error::ProxyError::ReaderStalled
            }
            None => crate::message::error::ProxyError::BadRequest(format!("request body: {e}")),
        };
        let mut slot = state.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(error);
        drop(slot);
        state.notify.notify_waiters();
    }
}

/// `body`, reporting its first error to the returned [`SourceFault`]. A body that has ended
/// already (most requests: no body) is returned as it is, at no cost.
pub fn watch_source(body: Body) -> (Body, SourceFault) {
    if body.is_end_stream() {
        return (body, SourceFault::default());
    }
    let fault = SourceFault(Some(Arc::default()));
    let watched = Watched { inner: body, fault: fault.clone() };
    (watched.boxed_unsync(), fault)
}

struct Watched {
    inner: Body,
    fault: SourceFault,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(state) = &self.fault.0 {
            use std::sync::atomic::Ordering::Relaxed;
            match &polled {
                // A look ahead with no waker (`join_ready`) is no wait: the reader goes on to
                // send what it has.
                Poll::Pending if cx.waker().will_wake(std::task::Waker::noop()) => {}
                Poll::Pending => {
                    if state.stalled_since.load(Relaxed) == 0 {
                        let since = u64::try_from(stall_base().elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
                        state.stalled_since.store(since + 1, Relaxed);
                    }
                }
                Poll::Ready(_) => state.stalled_since.store(0, Relaxed),
            }
        }
        let polled = ready!(polled);
        if let Some(Err(e)) = &polled {
            self.fault.set(e);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Caps a client's request body at `limit` bytes; past it the body fails with
/// [`ProxyError::BodyTooLarge`](crate::message::error::ProxyError::BodyTooLarge), which a try reports as
/// 413 whether or not the body declared its length.
pub fn limited(body: Body, limit: u64) -> Body {
    if body.is_end_stream() {
        return body;
    }
    let capped = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    capped
        .map_err(move |e| -> BoxError {
            if e.is::<http_body_util::LengthLimitError>() {
                Box::new(crate::message::error::ProxyError::BodyTooLarge(limit))
            } else {
                e
            }
        })
        .boxed_unsync()
}

/// Fails `body` with [`ProxyError::Timeout`](crate::message::error::ProxyError::Timeout) when
/// its next frame takes longer than `idle` to come (a response body from a peer that froze or
/// went away).
pub fn idle_limited(body: Body, idle: std::time::Duration) -> Body {
    IdleLimited { inner: body, idle, timer: Box::pin(tokio::time::sleep(idle)) }.boxed_unsync()
}

struct IdleLimited {
    inner: Body,
    idle: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl HttpBody for IdleLimited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(Box::new(crate::message::error::ProxyError::Timeout(self.idle)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that can be sent again for a retry: it streams to the first try as it
/// arrives (nothing waits for the whole body) while a copy is kept up to a limit. Each
/// [`Replay::body`] yields what was read so far, then goes on reading the original; a body
/// handed out earlier stops working once a newer one exists, so two tries never share a read.
pub struct Replay {
    shared: Arc<Mutex<ReplayState>>,
    limit: u64,
}

struct ReplayState {
    inner: Body,
    /// Everything read so far; `None` once the body outgrew the limit or failed.
    copy: Option<BytesMut>,
    trailers: Option<HeaderMap>,
    /// The original has ended (its trailers, if any, are in `trailers`).
    done: bool,
    /// Generation of the newest body handed out.
    generation: u64,
}

impl Replay {
    pub fn new(inner: Body, limit: u64) -> Self {
        let state = ReplayState { inner, copy: Some(BytesMut::new()), trailers: None, done: false, generation: 0 };
        Self { shared: Arc::new(Mutex::new(state)), limit }
    }

    /// The body for the next try, or `None` when it can no longer be replayed whole.
    pub fn body(&self) -> Option<Body> {
        let mut st = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = st.copy.as_ref()?.clone().freeze();
        st.generation += 1;
        let tee = Tee {
            shared: self.shared.clone(),
            generation: st.generation,
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers_sent: false,
            limit: self.limit,
        };
        Some(tee.boxed_unsync())
    }

    /// Can another try get the whole body?
    pub fn replayable(&self) -> bool {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).copy.is_some()
    }
}

struct Tee {
    shared: Arc<Mutex<ReplayState>>,
    generation: u64,
    prefix: Option<Bytes>,
    trailers_sent: bool,
    limit: u64,
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let shared = self.shared.clone();
        let mut st = shared.lock().unwrap_or_else(|e| e.into_inner());
        if st.generation != self.generation {
            return Poll::Ready(Some(Err("request body taken over by a retry".into())));
        }
        if st.done {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let polled = ready!(Pin::new(&mut st.inner).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let fits = st.copy.as_ref().is_some_and(|c| (c.len() + data.len()) as u64 <= self.limit);
                    match st.copy.as_mut() {
                        Some(c) if fits => c.extend_from_slice(data),
                        _ => st.copy = None,
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                    st.done = true;
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // A broken body cannot be sent again.
                st.copy = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                st.done = true;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            (0..4u8).map(|i| Ok(Frame::data(Bytes::from(vec![i; 10])))).collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_retry_gets_the_whole_body_even_after_a_partial_read() {
        let replay = Replay::new(chunks(), 100);
        let mut first = replay.body().unwrap();
        // The first try reads two frames, then fails.
        first.frame().await.unwrap().unwrap();
        first.frame().await.unwrap().unwrap();
        let second = replay.body().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "the superseded body must stop");
        let all = second.collect().await.unwrap().to_bytes();
        let want: Vec<u8> = (0..4u8).flat_map(|i| vec![i; 10]).collect();
        assert_eq!(all.as_ref(), want.as_slice());
        // A third try after a complete read replays from the copy.
        let third = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(third.as_ref(), want.as_slice());
    }

    #[tokio::test]
    async fn a_body_past_the_limit_streams_once() {
        let replay = Replay::new(chunks(), 25);
        let all = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40, "the first try gets everything");
        assert!(!replay.replayable());
        assert!(replay.body().is_none());
    }
}
