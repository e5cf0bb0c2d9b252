//! quicmesh's own framing of a request between mesh members (ALPN `quicmesh/1`): what HTTP/3
//! does on a request stream, without what only the open internet needs.
//!
//! Each request is one bidirectional QUIC stream, as in HTTP/3. On it, each way:
//! - a HEADERS frame: the request's method, authority and path (or the answer's status), then
//!   its header fields, each a `u16`-length-prefixed string, uncompressed;
//! - DATA frames with the body, each carried as it came (no copy on either side);
//! - maybe a TRAILERS frame;
//! - the stream's end.
//!
//! A frame is a type byte, a `u32` length, and that many bytes. A CONNECT (a TCP or upgrade
//! tunnel) is a byte pipe after the heads: no frames at all. There is no header compression (the
//! peers share a fast link and a few hundred bytes of head), no SETTINGS, no control or QPACK
//! streams. The one connection-level message, GOAWAY, is a unidirectional stream whose single
//! byte says it. Error codes are HTTP/3's numbers, so that logs read the same either way.
//!
//! Measured against HTTP/3 between the same two nodes (BENCHMARKS.md, issue #27, "(15)"): 17%
//! fewer instructions and about 5% less CPU per request for the pair. Nodes still accept HTTP/3
//! from a peer that offers nothing else (an older version), and the gateway's edge and control
//! plane stay HTTP/3.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};

use crate::message::body::{H3Recv, H3Send};
use crate::message::headers::{self, Internal};
use crate::message::wire::WireError;
use crate::transport::stalls::{Stalls, Watch};

/// The ALPN protocol id of this framing.
pub const ALPN: &[u8] = b"quicmesh/1";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const TRAILERS: u8 = 2;
/// A frame's type and length.
const FRAME_HEAD: usize = 5;

/// The byte a GOAWAY stream carries.
const GOAWAY: u8 = 7;

/// The peer's answer or its request was complete (H3_NO_ERROR).
pub const NO_ERROR: u32 = 0x100;
/// Refused before any processing: the request may go elsewhere (H3_REQUEST_REJECTED).
pub const REQUEST_REJECTED: u32 = crate::message::wire::REQUEST_REJECTED;
/// Given up by the side that sent it (H3_REQUEST_CANCELLED).
pub const REQUEST_CANCELLED: u32 = 0x10c;
/// A frame or a head this side cannot read (H3_MESSAGE_ERROR).
pub const MESSAGE_ERROR: u32 = 0x10e;

/// Room left in a decoded header map for the fields a proxy adds (as in the vendored h3).
const HEADROOM: usize = 12;

/// The largest head or trailers a member takes, bytes (as the HTTP/3 side takes, and the edge).
pub const MAX_HEAD: usize = 64 << 10;

/// How long a peer's request head may take to arrive whole once its stream is open (a member
/// sends it at once; the edge's `header_read_timeout` defaults to the same).
pub const HEAD_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Request heads a node reads at once on one connection, in either framing: the next stream is
/// taken once one of them is whole, so a connection holds at most this many heads' bytes (64 KiB
/// each, 16 MiB in all, as much as QUIC's connection window lets through) in a node, whatever it
/// sends. Well over a burst of requests (the accept loop takes every stream that has arrived
/// before their tasks run, 200 at once under `wrk -c200`).
pub const HEADS_AT_ONCE: usize = 256;

/// The heads being read on one connection ([`HEADS_AT_ONCE`] at most). One task takes slots
/// (the connection's accept loop); each request's task gives its slot back once its head is
/// read. A counter rather than a semaphore: a semaphore's release takes a lock and wakes a
/// list, about 180 instructions per request (callgrind), where this costs two atomic steps and
/// waits only at the limit.
#[derive(Default)]
pub struct HeadSlots {
    reading: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

/// A head being read; gives its slot back when dropped.
pub struct HeadSlot(std::sync::Arc<HeadSlots>);

impl HeadSlots {
    /// A slot, once fewer than [`HEADS_AT_ONCE`] heads are being read. Only one task may wait
    /// here at a time.
    pub async fn slot(self: &std::sync::Arc<Self>) -> HeadSlot {
        use std::sync::atomic::Ordering;
        loop {
            if self.reading.load(Ordering::Acquire) < HEADS_AT_ONCE {
                self.reading.fetch_add(1, Ordering::AcqRel);
                return HeadSlot(self.clone());
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // A slot given back between the look and the registration is not missed.
            if self.reading.load(Ordering::Acquire) < HEADS_AT_ONCE {
                continue;
            }
            freed.await;
        }
    }
}

impl Drop for HeadSlot {
    fn drop(&mut self) {
        if self.0.reading.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == HEADS_AT_ONCE {
            // The taker may be waiting (or will find the wake-up stored when it comes to wait).
            self.0.freed.notify_one();
        }
    }
}

/// A head that did not arrive within its time (H3_REQUEST_INCOMPLETE).
pub const REQUEST_INCOMPLETE: u32 = 0x10d;

/// The most fields a head may hold: HTTP/3 counts 32 bytes for each field against the section
/// limit, which allows this many in [`MAX_HEAD`]. (Far below what `http`'s maps can hold.)
const MAX_FIELDS: usize = MAX_HEAD / 32;

/// A head that would be larger than a peer reads: at least `size` bytes.
fn too_long(size: usize) -> WireError {
    WireError::HeadTooLarge { size: size as u64, limit: MAX_HEAD as u64 }
}

fn put_field(buf: &mut BytesMut, v: &[u8]) -> Result<(), WireError> {
    buf.put_u16(u16::try_from(v.len()).map_err(|_| too_long(v.len()))?);
    buf.put_slice(v);
    Ok(())
}

/// A HEADERS or TRAILERS frame: `first` fields, the number of header fields, then each.
fn head_frame(kind: u8, first: &[&[u8]], headers: &HeaderMap) -> Result<Bytes, WireError> {
    fields_frame(kind, first, headers, |_| true, &[])
}

/// [`head_frame`] of the `headers` that are `kept`, then `add`. One pass: the frame's length
/// and the field count are written when the fields are. (A first pass to measure the frame, so
/// that a buffer of its exact size becomes it without the allocation a buffer with room to
/// spare needs, was tried: it cost more than that allocation, BENCHMARKS.md (25).)
fn fields_frame(
    kind: u8,
    first: &[&[u8]],
    headers: &HeaderMap,
    kept: impl Fn(&HeaderName) -> bool,
    add: &[(&HeaderName, &[u8])],
) -> Result<Bytes, WireError> {
    // Room for typical fields; a head with longer ones grows the buffer.
    let hint = headers.len() + add.len();
    let guess = FRAME_HEAD + 2 + first.iter().map(|f| 2 + f.len()).sum::<usize>() + hint * 48;
    let mut buf = BytesMut::with_capacity(guess);
    buf.put_u8(kind);
    buf.put_u32(0);
    for f in first {
        put_field(&mut buf, f)?;
    }
    let at_count = buf.len();
    buf.put_u16(0);
    let mut count = add.len();
    for (n, v) in headers.iter().filter(|(n, _)| kept(n)) {
        put_field(&mut buf, n.as_str().as_bytes())?;
        put_field(&mut buf, v.as_bytes())?;
        count += 1;
    }
    for (n, v) in add {
        put_field(&mut buf, n.as_str().as_bytes())?;
        put_field(&mut buf, v)?;
    }
    // What the peer would refuse (it reads no head past this, nor more fields): refused here,
    // before anything goes out.
    let len = buf.len() - FRAME_HEAD;
    if len > MAX_HEAD || count > MAX_FIELDS {
        return Err(too_long(len));
    }
    buf[1..FRAME_HEAD].copy_from_slice(&(len as u32).to_be_bytes());
    buf[at_count..at_count + 2].copy_from_slice(&(count as u16).to_be_bytes());
    Ok(buf.freeze())
}

/// A request's HEADERS frame.
pub fn request_head(req: &Request<()>) -> Result<Bytes, WireError> {
    Head { method: req.method(), uri: req.uri(), headers: req.headers(), drop: None, add: &[] }.frame()
}

/// A request's head made of a caller's head and what a hop adds: `headers` without `drop`
/// and without the names in `add`, then `add`. What [`Head::request`] builds as a
/// `Request`, encoded without building one (no copy of the caller's header map).
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub drop: Option<&'a HeaderName>,
    /// Values checked already (see [`crate::message::headers::valid_value`]).
    pub add: &'a [(&'a HeaderName, &'a [u8])],
}

impl Head<'_> {
    /// Its HEADERS frame.
    pub fn frame(&self) -> Result<Bytes, WireError> {
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let path = match self.method {
            &Method::CONNECT => "",
            _ => self.uri.path_and_query().map_or("/", |p| p.as_str()),
        };
        let first = [self.method.as_str().as_bytes(), authority.as_bytes(), path.as_bytes()];
        let kept = |name: &HeaderName| self.drop != Some(name) && !self.add.iter().any(|(n, _)| *n == name);
        fields_frame(HEADERS, &first, self.headers, kept, self.add)
    }

    /// The same head as a `Request` (for HTTP/3).
    pub fn request(&self) -> Request<()> {
        let mut headers = self.headers.clone();
        if let Some(name) = self.drop {
            headers.remove(name);
        }
        // The hop's values share one buffer, as they did when the hop made header values of
        // them. The caller checked them (`headers::valid_value`).
        let mut scratch = headers::Scratch::with_capacity(self.add.iter().map(|(_, v)| v.len()).sum());
        for (name, value) in self.add {
            let value = scratch.value(|b| b.extend_from_slice(value));
            debug_assert!(value.is_some(), "a hop's value the caller did not check");
            if let Some(value) = value {
                headers.insert(*name, value);
            }
        }
        let mut req = Request::new(());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = headers;
        req
    }
}

/// An answer's HEADERS frame.
pub fn response_head(resp: &Response<()>) -> Result<Bytes, WireError> {
    head_frame(HEADERS, &[&resp.status().as_u16().to_be_bytes()], resp.headers())
}

fn field(block: &mut Bytes) -> Result<Bytes, WireError> {
    if block.remaining() < 2 {
        return Err(WireError::Malformed("a head cut short"));
    }
    let n = block.get_u16() as usize;
    if block.remaining() < n {
        return Err(WireError::Malformed("a head cut short"));
    }
    Ok(block.split_to(n))
}

/// The fields of a head. With `internal`, the mesh's own fields of a request go there, not into
/// the map (the node that delivers it would take them out again).
fn header_map(mut block: Bytes, mut internal: Option<&mut Internal>) -> Result<HeaderMap, WireError> {
    if block.remaining() < 2 {
        return Err(WireError::Malformed("a head cut short"));
    }
    let count = block.get_u16() as usize;
    // Each field takes four bytes at least: a count the block cannot hold is not believed (a
    // map past `http`'s largest panics).
    if count > block.len() / 4 || count > MAX_FIELDS {
        return Err(WireError::Malformed("more header fields than the head holds or this member takes"));
    }
    let mut map = HeaderMap::with_capacity(count + HEADROOM);
    for _ in 0..count {
        let name = field(&mut block)?;
        let value = HeaderValue::from_maybe_shared(field(&mut block)?)
            .map_err(|_| WireError::Malformed("a bad header value"))?;
        if let Some(slot) = internal.as_deref_mut().and_then(|fields| fields.slot(&name)) {
            // The first of several, as `Internal::take` keeps.
            slot.get_or_insert(value);
            continue;
        }
        let name = headers::name_from_wire(&name).ok_or(WireError::Malformed("a bad header name"))?;
        map.append(name, value);
    }
    if block.has_remaining() {
        return Err(WireError::Malformed("bytes after a head's last field"));
    }
    Ok(map)
}

fn decode_request(mut block: Bytes, internal: Option<&mut Internal>) -> Result<Request<()>, WireError> {
    let method = Method::from_bytes(&field(&mut block)?).map_err(|_| WireError::Malformed("a bad method"))?;
    let authority = field(&mut block)?;
    let path = field(&mut block)?;
    let mut parts = http::uri::Parts::default();
    if !authority.is_empty() {
        parts.authority = Some(
            http::uri::Authority::from_maybe_shared(authority).map_err(|_| WireError::Malformed("a bad authority"))?,
        );
    }
    if method != Method::CONNECT {
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        let path = if path.is_empty() { Bytes::from_static(b"/") } else { path };
        parts.path_and_query =
            Some(http::uri::PathAndQuery::from_maybe_shared(path).map_err(|_| WireError::Malformed("a bad path"))?);
    }
    let uri = Uri::from_parts(parts).map_err(|_| WireError::Malformed("a bad request target"))?;
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_3;
    *req.headers_mut() = header_map(block, internal)?;
    Ok(req)
}

fn decode_response(mut block: Bytes) -> Result<Response<()>, WireError> {
    let status = field(&mut block)?;
    let status = <[u8; 2]>::try_from(&status[..])
        .ok()
        .and_then(|s| StatusCode::from_u16(u16::from_be_bytes(s)).ok())
        .ok_or(WireError::Malformed("a bad status"))?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = http::Version::HTTP_3;
    *resp.headers_mut() = header_map(block, None)?;
    Ok(resp)
}

/// Opens a request stream on `conn` and sends `req`'s head; with `end`, the request ends with
/// it (no body).
pub async fn open(conn: &quinn::Connection, req: &Request<()>, end: bool) -> Result<(SendHalf, RecvHalf), WireError> {
    open_with(conn, request_head(req)?, req.method() == Method::CONNECT, end).await
}

/// [`open`] with the head's frame made already (`tunnel`: it is a CONNECT's).
pub async fn open_with(
    conn: &quinn::Connection,
    head: Bytes,
    tunnel: bool,
    end: bool,
) -> Result<(SendHalf, RecvHalf), WireError> {
    let (send, recv) = conn.open_bi().await?;
    let mut send = SendHalf { stream: send, raw: tunnel, done: false };
    send.stream.write_chunk(head).await?;
    if end {
        send.done = true;
        send.stream.finish().map_err(|_| WireError::Closed)?;
    }
    Ok((send, RecvHalf::new(recv, tunnel, MAX_HEAD)))
}

/// A request stream a peer opened: reads its head (at most `limit` bytes of it, within
/// `within`), with the mesh's own fields apart from its headers. A stream without a readable
/// head is reset (`MESSAGE_ERROR`), and one whose head did not come in time too
/// (`REQUEST_INCOMPLETE`); neither is answered.
pub async fn accept(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    limit: usize,
    within: std::time::Duration,
) -> Result<(Request<()>, Internal, SendHalf, RecvHalf), WireError> {
    let mut recv = RecvHalf::new(recv, false, limit);
    let mut internal = Internal::default();
    let head = match tokio::time::timeout(within, std::future::poll_fn(|cx| recv.poll_head(cx))).await {
        Ok(Ok(block)) => decode_request(block, Some(&mut internal)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(WireError::HeadTimeout(within)),
    };
    let req = match head {
        Ok(req) => req,
        Err(e) => {
            let code = if matches!(e, WireError::HeadTimeout(_)) { REQUEST_INCOMPLETE } else { MESSAGE_ERROR };
            let code = quinn::VarInt::from_u32(code);
            let _ = send.reset(code);
            let _ = recv.stream.stop(code);
            return Err(e);
        }
    };
    let tunnel = req.method() == Method::CONNECT;
    recv.raw = tunnel;
    Ok((req, internal, SendHalf { stream: send, raw: tunnel, done: false }, recv))
}

/// Refuses a stream unread (the peer may send its request elsewhere, `REQUEST_REJECTED`) or as
/// unreadable (`MESSAGE_ERROR`).
pub fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream, code: u32) {
    let code = quinn::VarInt::from_u32(code);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Tells the peer this side takes no more requests on `conn` (a drain): those it sent before it
/// read this are answered or refused with `REQUEST_REJECTED`.
pub async fn go_away(conn: &quinn::Connection) -> Result<(), WireError> {
    let mut s = conn.open_uni().await?;
    s.write_all(&[GOAWAY]).await?;
    s.finish().map_err(|_| WireError::Closed)?;
    Ok(())
}

/// Resolves `true` once the peer of `conn` said GOAWAY; `false` when the connection ended
/// first. Streams of any other kind are refused.
pub async fn goaway_from(conn: &quinn::Connection) -> bool {
    loop {
        let Ok(mut uni) = conn.accept_uni().await else { return false };
        let mut kind = [0u8];
        if uni.read_exact(&mut kind).await.is_ok() && kind[0] == GOAWAY {
            return true;
        }
        let _ = uni.stop(quinn::VarInt::from_u32(MESSAGE_ERROR));
    }
}

/// The sending half of a request stream, either side.
pub struct SendHalf {
    stream: quinn::SendStream,
    /// A tunnel: data goes unframed.
    raw: bool,
    /// Finished or reset: what is sent is all there is.
    done: bool,
}

impl Drop for SendHalf {
    /// A half dropped unfinished (its task cancelled or aborted) resets its stream: quinn would
    /// finish it, and the peer would take a cut body for a whole one.
    fn drop(&mut self) {
        if !self.done {
            let _ = self.stream.reset(quinn::VarInt::from_u32(REQUEST_CANCELLED));
        }
    }
}

impl SendHalf {
    /// Sends the answer's head.
    pub async fn respond(&mut self, resp: &Response<()>) -> Result<(), WireError> {
        let head = response_head(resp)?;
        Ok(self.stream.write_chunk(head).await?)
    }
}

impl H3Send for SendHalf {
    async fn send(&mut self, data: Bytes) -> Result<(), WireError> {
        if self.raw {
            return Ok(self.stream.write_chunk(data).await?);
        }
        let len = u32::try_from(data.len()).map_err(|_| WireError::Malformed("a DATA frame over 4 GiB"))?;
        let mut head = [DATA, 0, 0, 0, 0];
        head[1..].copy_from_slice(&len.to_be_bytes());
        // One write for both: the head is copied (5 bytes), the data is not.
        Ok(self.stream.write_all_chunks(&mut [Bytes::copy_from_slice(&head), data]).await?)
    }

    async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), WireError> {
        if self.raw {
            return Err(WireError::Malformed("trailers on a tunnel"));
        }
        let frame = head_frame(TRAILERS, &[], &trailers)?;
        self.stream.write_chunk(frame).await?;
        self.finish().await
    }

    async fn finish(&mut self) -> Result<(), WireError> {
        self.done = true;
        self.stream.finish().map_err(|_| WireError::Closed)
    }

    fn reset(&mut self) {
        self.done = true;
        let _ = self.stream.reset(quinn::VarInt::from_u32(REQUEST_CANCELLED));
    }
}

/// The receiving half of a request stream, either side.
pub struct RecvHalf {
    stream: quinn::RecvStream,
    /// Received and not yet taken.
    buf: Bytes,
    /// Bytes of a frame's head or block that came in more than one chunk, gathered into one
    /// buffer sized for them (so a head arriving in many chunks is copied once); while it holds
    /// any, `buf` is empty.
    gather: BytesMut,
    /// Left of the DATA frame being read.
    left: usize,
    /// A HEADERS or TRAILERS frame whose bytes are being gathered: its type and length.
    block: Option<(u8, usize)>,
    /// A tunnel: everything after the heads is data.
    raw: bool,
    /// Boxed: a half is moved whole through several futures, and most HTTP answers have no
    /// trailers (gRPC's all do, and pay one small allocation for them).
    trailers: Option<Box<HeaderMap>>,
    /// The trailers were read: only the stream's end may follow.
    finished: bool,
    /// The stream's end was read.
    end: bool,
    /// The largest head or trailers taken.
    limit: usize,
    /// A tunnel's chunks, read from the stream many at a time (one look at the connection's
    /// state for all that has arrived, where a chunk at a time took one each), and handed out
    /// from `next` up to `got`. What waits here has left quinn's receive window, so a tunnel may
    /// hold up to [`BATCH`] chunks (about 90 KiB) beyond it.
    batch: Vec<Bytes>,
    next: usize,
    got: usize,
    /// Marks this stream's reader away or reading for its connection's [`Stalls`], once
    /// [`RecvHalf::watched_by`] gave it one; let go at the stream's end.
    watch: Watching,
}

/// Whether a stream's reader is watched ([`crate::transport::stalls`]).
enum Watching {
    Off,
    /// From the first read that does not find the stream's end.
    Later(Arc<Stalls>),
    On(Watch),
}

/// The most chunks a tunnel's stream is read at once (each at most a datagram's payload).
const BATCH: usize = 64;

impl RecvHalf {
    fn new(stream: quinn::RecvStream, raw: bool, limit: usize) -> Self {
        Self {
            stream,
            buf: Bytes::new(),
            gather: BytesMut::new(),
            left: 0,
            block: None,
            raw,
            trailers: None,
            finished: false,
            end: false,
            limit,
            batch: Vec::new(),
            next: 0,
            got: 0,
            watch: Watching::Off,
        }
    }

    /// Has `stalls` watch this stream's reader: while it takes nothing, the stream is lent a
    /// window of its own rather than hold up its connection's.
    pub fn watched_by(&mut self, stalls: &Arc<Stalls>) {
        if !self.end {
            self.watch = Watching::On(stalls.watch(self.stream.id()));
        }
    }

    /// [`RecvHalf::watched_by`] from the first read that does not find the stream's end: a
    /// request that ended with its head (most) costs no watch.
    pub fn watched_after_first_read_by(&mut self, stalls: &Arc<Stalls>) {
        if !self.end {
            self.watch = Watching::Later(stalls.clone());
        }
    }

    /// Reads the answer's head (a tunnel's too: its data follows raw).
    pub async fn response(&mut self) -> Result<Response<()>, WireError> {
        let block = std::future::poll_fn(|cx| self.poll_head(cx)).await?;
        decode_response(block)
    }

    /// Stops the peer's sending (the answer is not wanted).
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(quinn::VarInt::from_u32(code));
        self.watch = Watching::Off;
        // Nor what already came: a tunnel's batch is let go.
        self.batch = Vec::new();
        (self.next, self.got) = (0, 0);
    }

    /// The stream's next chunk; `None` at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
        if self.next < self.got {
            self.next += 1;
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.batch[self.next - 1]))));
        }
        if self.end {
            return Poll::Ready(Ok(None));
        }
        match std::mem::replace(&mut self.watch, Watching::Off) {
            Watching::Off => self.poll_stream(cx),
            Watching::On(watch) => self.poll_watched(watch, cx),
            Watching::Later(stalls) => {
                let polled = self.poll_stream(cx);
                match polled {
                    // Taken: away from now (a new watch's start).
                    Poll::Ready(Ok(Some(_))) => self.watch = Watching::On(stalls.watch(self.stream.id())),
                    // quinn holds the reader's own waker: asked again through the watch's, so
                    // that data's coming marks it.
                    Poll::Pending => return self.poll_watched(stalls.watch(self.stream.id()), cx),
                    Poll::Ready(_) => {}
                }
                polled
            }
        }
    }

    /// [`RecvHalf::poll_stream`] for a watched reader; the watch goes at the stream's end.
    fn poll_watched(&mut self, watch: Watch, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
        let polled = match watch.poll(cx, |cx| self.poll_stream(cx), |read| matches!(read, Ok(Some(_)))) {
            Poll::Ready(Err(WireError::Closed)) if watch.stopped() => Poll::Ready(Err(WireError::Stalled)),
            polled => polled,
        };
        // At the end, or a failure, nothing more will come or be held.
        if matches!(polled, Poll::Pending | Poll::Ready(Ok(Some(_)))) {
            self.watch = Watching::On(watch);
        }
        polled
    }

    /// [`RecvHalf::poll_read`] from quinn.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
        let read = if self.raw {
            if self.batch.is_empty() {
                self.batch = vec![Bytes::new(); BATCH];
            }
            let got = ready!(pin!(self.stream.read_chunks(&mut self.batch)).poll(cx));
            got.map(|got| {
                got.map(|n| {
                    (self.next, self.got) = (1, n);
                    std::mem::take(&mut self.batch[0])
                })
            })
        } else {
            ready!(pin!(self.stream.read_chunk(usize::MAX, true)).poll(cx)).map(|chunk| chunk.map(|c| c.bytes))
        };
        if let Ok(None) = read {
            self.end = true;
        }
        Poll::Ready(read.map_err(Into::into))
    }

    /// Until `n` bytes are buffered in `buf`, in one piece; `false` when the stream ended before.
    fn poll_fill(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<Result<bool, WireError>> {
        loop {
            if self.gather.is_empty() {
                if self.buf.len() >= n {
                    return Poll::Ready(Ok(true));
                }
            } else if self.gather.len() >= n {
                self.buf = self.gather.split().freeze();
                return Poll::Ready(Ok(true));
            }
            let Some(chunk) = ready!(self.poll_read(cx))? else {
                if !self.gather.is_empty() {
                    self.buf = self.gather.split().freeze();
                }
                return Poll::Ready(Ok(false));
            };
            if self.buf.is_empty() && self.gather.is_empty() {
                self.buf = chunk;
                continue;
            }
            if self.gather.is_empty() {
                // The only copy made: a frame's head or block across chunks.
                self.gather.reserve(n.max(self.buf.len() + chunk.len()));
                self.gather.extend_from_slice(&std::mem::take(&mut self.buf));
            }
            self.gather.extend_from_slice(&chunk);
        }
    }

    /// The next frame's type and length; `None` at the stream's end.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<(u8, usize)>, WireError>> {
        if let Some(block) = self.block {
            return Poll::Ready(Ok(Some(block)));
        }
        if !ready!(self.poll_fill(cx, FRAME_HEAD))? {
            return Poll::Ready(if self.buf.is_empty() {
                Ok(None)
            } else {
                Err(WireError::Malformed("the stream ended inside a frame's head"))
            });
        }
        let kind = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        self.buf.advance(FRAME_HEAD);
        match kind {
            DATA => {}
            HEADERS | TRAILERS if len > self.limit => {
                return Poll::Ready(Err(WireError::Malformed("a head larger than this member takes")));
            }
            HEADERS | TRAILERS => self.block = Some((kind, len)),
            _ => return Poll::Ready(Err(WireError::Malformed("an unknown frame type"))),
        }
        Poll::Ready(Ok(Some((kind, len))))
    }

    /// The bytes of the block (HEADERS or TRAILERS) `poll_frame` found.
    fn poll_block(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<Result<Bytes, WireError>> {
        if !ready!(self.poll_fill(cx, len))? {
            return Poll::Ready(Err(WireError::Malformed("the stream ended inside a head")));
        }
        self.block = None;
        Poll::Ready(Ok(self.buf.split_to(len)))
    }

    /// The first frame, which must be a head: its block.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, WireError>> {
        match ready!(self.poll_frame(cx))? {
            Some((HEADERS, len)) => self.poll_block(cx, len),
            Some(_) => Poll::Ready(Err(WireError::Malformed("a stream that does not start with a head"))),
            None => Poll::Ready(Err(WireError::Malformed("a stream that ended before its head"))),
        }
    }
}

impl H3Recv for RecvHalf {
    fn take_held(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        // Only a tunnel's batch: what the head's read left in `buf` goes first, by `poll_data`.
        if !self.raw || !self.buf.is_empty() || self.next >= self.got {
            return 0;
        }
        let end = self.got.min(self.next.saturating_add(limit.saturating_sub(out.len())));
        let mut bytes = 0;
        for chunk in &mut self.batch[self.next..end] {
            bytes += chunk.len();
            out.push(std::mem::take(chunk));
        }
        self.next = end;
        bytes
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, WireError>> {
        loop {
            if self.finished {
                // Nothing but the end may follow the trailers.
                if !self.buf.is_empty() {
                    return Poll::Ready(Err(WireError::Malformed("bytes after the trailers")));
                }
                return Poll::Ready(match ready!(self.poll_read(cx))? {
                    None => Ok(None),
                    Some(_) => Err(WireError::Malformed("bytes after the trailers")),
                });
            }
            if self.raw {
                if !self.buf.is_empty() {
                    return Poll::Ready(Ok(Some(std::mem::take(&mut self.buf))));
                }
                return self.poll_read(cx);
            }
            if self.left > 0 {
                if self.buf.is_empty() {
                    match ready!(self.poll_read(cx))? {
                        Some(chunk) => self.buf = chunk,
                        None => return Poll::Ready(Err(WireError::Malformed("the stream ended inside a DATA frame"))),
                    }
                }
                let n = self.left.min(self.buf.len());
                self.left -= n;
                return Poll::Ready(Ok(Some(self.buf.split_to(n))));
            }
            match ready!(self.poll_frame(cx))? {
                None => return Poll::Ready(Ok(None)),
                Some((DATA, len)) => self.left = len,
                Some((TRAILERS, len)) => {
                    let block = ready!(self.poll_block(cx, len))?;
                    self.trailers = Some(Box::new(header_map(block, None)?));
                    self.finished = true;
                    // The end follows; read now if it is here, so that the stream is not
                    // stopped as one dropped unread.
                    if self.buf.is_empty() {
                        if let Poll::Ready(Ok(Some(_))) = self.poll_read(cx) {
                            return Poll::Ready(Err(WireError::Malformed("bytes after the trailers")));
                        }
                    }
                    return Poll::Ready(Ok(None));
                }
                Some(_) => return Poll::Ready(Err(WireError::Malformed("a second head"))),
            }
        }
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, WireError>> {
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Ok(Some(*trailers)));
        }
        if self.finished {
            return Poll::Ready(Ok(None));
        }
        if ready!(self.poll_data(cx))?.is_some() {
            return Poll::Ready(Err(WireError::Malformed("data after the body's end")));
        }
        Poll::Ready(Ok(self.trailers.take().map(|t| *t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The taker waits at the limit and goes on as soon as a head is done, however the slots
    /// come back (one at the limit, or many while it was not waiting).
    #[tokio::test]
    async fn head_slots_wait_at_the_limit_and_only_there() {
        use futures_util::FutureExt as _;
        let slots = std::sync::Arc::new(HeadSlots::default());
        let mut held: Vec<HeadSlot> = Vec::new();
        for _ in 0..HEADS_AT_ONCE {
            held.push(slots.slot().now_or_never().expect("a slot under the limit"));
        }
        let mut waiting = Box::pin(slots.slot());
        assert!(waiting.as_mut().now_or_never().is_none(), "a slot past the limit");
        drop(held.pop());
        held.push(tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("woken"));
        // Given back while nobody waits, then taken again: no wake-up is lost or left over.
        held.truncate(HEADS_AT_ONCE - 3);
        for _ in 0..3 {
            held.push(slots.slot().now_or_never().expect("a freed slot"));
        }
        assert!(Box::pin(slots.slot()).now_or_never().is_none());
        drop(held);
        assert_eq!(slots.reading.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    #[test]
    fn heads_come_back_as_they_went() {
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "https://svc.mesh:8080/a/b?c=d".parse().unwrap();
        req.headers_mut().insert("x-one", HeaderValue::from_static("1"));
        req.headers_mut().append("x-one", HeaderValue::from_static("2"));
        req.headers_mut().insert("quicmesh-service", HeaderValue::from_static("svc"));
        let mut frame = request_head(&req).unwrap();
        assert_eq!(frame.get_u8(), HEADERS);
        assert_eq!(frame.get_u32() as usize, frame.len());
        let back = decode_request(frame, None).unwrap();
        assert_eq!(back.method(), Method::POST);
        assert_eq!(back.uri(), req.uri());
        assert_eq!(back.headers(), req.headers());

        // Read by the delivering node: the mesh's own fields apart (the first of each), the
        // mesh's usual names as the same names.
        req.headers_mut().append("quicmesh-service", HeaderValue::from_static("other"));
        req.headers_mut().insert("quicmesh-timeout", HeaderValue::from_static("250"));
        req.headers_mut().insert("x-request-id", HeaderValue::from_static("abc"));
        req.headers_mut().insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        let mut frame = request_head(&req).unwrap();
        frame.advance(FRAME_HEAD);
        let mut internal = Internal::default();
        let back = decode_request(frame, Some(&mut internal)).unwrap();
        assert_eq!(internal.service.as_ref().unwrap(), "svc");
        assert_eq!(internal.try_timeout.as_ref().unwrap(), "250");
        assert!(internal.endpoint.is_none() && internal.source.is_none());
        let mut expected = req.headers().clone();
        Internal::take(&mut expected);
        assert_eq!(back.headers(), &expected);
        assert_eq!(back.headers()["x-request-id"], "abc");
        assert_eq!(back.headers()["traceparent"], "00-1-2-01");

        let mut tunnel = Request::new(());
        *tunnel.method_mut() = Method::CONNECT;
        *tunnel.uri_mut() = "127.0.0.1:9000".parse().unwrap();
        let mut frame = request_head(&tunnel).unwrap();
        frame.advance(FRAME_HEAD);
        let back = decode_request(frame, None).unwrap();
        assert_eq!(back.uri().authority().unwrap().as_str(), "127.0.0.1:9000");
        assert_eq!(back.uri().path_and_query(), None);

        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::IM_A_TEAPOT;
        resp.headers_mut().insert("content-length", HeaderValue::from_static("0"));
        let mut frame = response_head(&resp).unwrap();
        frame.advance(FRAME_HEAD);
        let back = decode_response(frame).unwrap();
        assert_eq!(back.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(back.headers(), resp.headers());
    }

    #[test]
    fn a_hops_head_drops_and_replaces_what_it_says() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("web"));
        headers.insert("quicmesh-service", HeaderValue::from_static("forged"));
        headers.insert("x-keep", HeaderValue::from_static("k"));
        let (service, value) = (HeaderName::from_static("quicmesh-service"), HeaderValue::from_static("web"));
        let uri: Uri = "https://web/p?q".parse().unwrap();
        let host = http::header::HOST;
        let head = Head {
            method: &Method::GET,
            uri: &uri,
            headers: &headers,
            drop: Some(&host),
            add: &[(&service, value.as_bytes())],
        };
        let mut frame = head.frame().unwrap();
        frame.advance(FRAME_HEAD);
        let sent = decode_request(frame, None).unwrap();
        // As HTTP/3 gets it, the same: no Host, the hop's service only, the rest kept.
        assert_eq!(sent.headers(), head.request().headers());
        assert_eq!(sent.headers().get_all("quicmesh-service").iter().collect::<Vec<_>>(), [&value]);
        assert!(sent.headers().get("host").is_none());
        assert_eq!(sent.headers()["x-keep"], "k");
        assert_eq!(sent.uri(), &uri);
    }

    #[test]
    fn a_field_count_past_the_limit_is_refused_before_a_map_is_made() {
        // 30 000 fields fit in a 200 KB block, and a map for them would panic (`http` caps a
        // map's capacity): refused as too many instead.
        let mut block = BytesMut::new();
        block.put_u16(30_000);
        block.extend_from_slice(&vec![0u8; 200_000]);
        assert!(header_map(block.freeze(), None).is_err());
    }

    #[test]
    fn a_bad_head_is_an_error_not_a_panic() {
        let mut req = Request::new(());
        *req.uri_mut() = "https://svc/x".parse().unwrap();
        req.headers_mut().insert("x-a", HeaderValue::from_static("b"));
        let mut whole = request_head(&req).unwrap();
        whole.advance(FRAME_HEAD);
        // Every truncation, and every byte changed to each of a few values, fails cleanly or
        // decodes: never panics.
        for cut in 0..whole.len() {
            assert!(decode_request(whole.slice(..cut), None).is_err(), "cut at {cut}");
        }
        for at in 0..whole.len() {
            for v in [0u8, 1, 0x7f, 0xff, b'\n', b' '] {
                let mut bytes = whole.to_vec();
                bytes[at] = v;
                let _ = decode_request(Bytes::from(bytes), None);
            }
        }
        assert!(decode_response(Bytes::from_static(&[0, 2, 0, 99, 0, 0])).is_err(), "status 99");
    }

    #[test]
    fn a_name_in_capitals_is_refused_not_lowercased_into_another() {
        let mut block = Vec::new();
        for f in [&b"GET"[..], b"svc", b"/"] {
            block.extend_from_slice(&(f.len() as u16).to_be_bytes());
            block.extend_from_slice(f);
        }
        block.extend_from_slice(&1u16.to_be_bytes());
        for f in [&b"Quicmesh-Jwt-Claims"[..], b"e30"] {
            block.extend_from_slice(&(f.len() as u16).to_be_bytes());
            block.extend_from_slice(f);
        }
        let mut internal = Internal::default();
        assert!(decode_request(Bytes::from(block.clone()), Some(&mut internal)).is_err());
        assert!(decode_request(Bytes::from(block), None).is_err());
    }

    #[test]
    fn a_head_the_peer_would_refuse_is_not_sent() {
        // A head of exactly the limit goes; a byte more, or more fields than a peer reads, not.
        let mut headers = HeaderMap::new();
        let empty = head_frame(HEADERS, &[b"GET"], &headers).unwrap().len() - FRAME_HEAD;
        // One field: 2 + 1 ("x") + 2 bytes of prefixes around its value.
        let value = "v".repeat(MAX_HEAD - empty - 5);
        headers.insert("x", HeaderValue::from_str(&value).unwrap());
        assert_eq!(head_frame(HEADERS, &[b"GET"], &headers).unwrap().len() - FRAME_HEAD, MAX_HEAD);
        headers.insert("x", HeaderValue::from_str(&format!("{value}v")).unwrap());
        assert!(matches!(head_frame(HEADERS, &[b"GET"], &headers), Err(e) if e.head_too_large()));
        let mut many = HeaderMap::new();
        for i in 0..=MAX_FIELDS {
            many.append(HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(), HeaderValue::from_static("1"));
        }
        assert!(matches!(head_frame(HEADERS, &[b"GET"], &many), Err(e) if e.head_too_large()));
    }
}
