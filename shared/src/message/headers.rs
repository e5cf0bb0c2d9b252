//! Header handling at proxy hops: hop-by-hop removal (RFC 9110 section 7.6.1), forwarding
//! headers, request ids, and the mesh's internal headers between nodes.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::Scheme;
use http::{HeaderMap, Uri};

/// Service the outbound node chose (set between proxies only).
pub const SERVICE: HeaderName = HeaderName::from_static("quicmesh-service");
/// Endpoint address the outbound node chose (set between proxies only).
pub const ENDPOINT: HeaderName = HeaderName::from_static("quicmesh-endpoint");
/// The calling service, as the outbound node names it (set between proxies only; the inbound
/// node believes it only when the calling node hosts that service).
pub const SOURCE: HeaderName = HeaderName::from_static("quicmesh-source");
/// From the gateway to the destination node: the claims of the JWT the edge verified
/// (base64url of their JSON), for authorization rules on them (`from.jwt`). Believed only from
/// the gateway; never delivered to an instance.
pub const JWT_CLAIMS: HeaderName = HeaderName::from_static("quicmesh-jwt-claims");
/// How long the calling mesh member lets this try take, in milliseconds: the node that
/// delivers the request bounds its wait for the instance by it, in place of its own
/// `timeouts.request` (a route may allow more, or turn the limit off). Internal: removed
/// before the instance sees the request.
pub const TRY_TIMEOUT: HeaderName = HeaderName::from_static("quicmesh-timeout");
/// Which try of a request this is, set toward the upstream on retries (2 for the first retry).
pub const ATTEMPT: HeaderName = HeaderName::from_static("quicmesh-attempt");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// A gRPC call's status, in trailers (or in the headers of a trailers-only answer).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// A gRPC call's deadline, as the caller sends it (`<digits><unit>`).
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// How many names a map may hold for [`find`] to compare them one by one rather than hash.
const SCAN_UP_TO: usize = 8;

/// The first value of `name` in `headers`, as `HeaderMap::get` gives it. A name outside
/// `http`'s standard set (the mesh's own, gRPC's) is hashed byte by byte for a lookup, which
/// costs more than comparing it with the few names most answers carry: a standard name
/// differs from it by its kind alone, without a look at the bytes.
pub fn find<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    // Most answers lack the name looked for: the scan alone answers them.
    if headers.keys_len() > SCAN_UP_TO || headers.keys().any(|n| n == name) {
        headers.get(name)
    } else {
        None
    }
}

/// Whether `headers` has `name`, as [`find`] looks.
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    find(headers, name).is_some()
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes connection-specific headers, including every header named in `Connection`.
/// `TE: trailers` survives, as HTTP/2 and HTTP/3 allow it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present marks which of these a message carries (most requests
    // none, an HTTP/1.1 answer `Connection`): a removal costs a lookup whether or not the name
    // is there, and collecting the names to remove cost an allocation.
    const FIXED: [HeaderName; 6] = [CONNECTION, TRANSFER_ENCODING, UPGRADE, KEEP_ALIVE, PROXY_CONNECTION, TE];
    let present = present(headers, &FIXED);
    if !present.contains(&true) {
        return;
    }
    // What `Connection` names goes too.
    let named: Vec<HeaderName> = if present[0] {
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual option, which names `Keep-Alive`, removed below anyway.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .filter(|name| has(headers, name))
            .collect()
    } else {
        Vec::new()
    };
    for name in named {
        headers.remove(name);
    }
    for (name, _) in FIXED[..5].iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
    // `TE: trailers` alone may go on (a gRPC client's); unless `Connection` named it.
    if present[5] && has(headers, &TE) {
        let te_trailers = headers.get_all(TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        headers.remove(TE);
        if te_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// What RFC 9112 refuses in an HTTP/1.1 request head that hyper lets through: more than one
/// `Host` (400), a `Host` that is not a plain authority, such as one with user info (400), and
/// a transfer coding other than a final `chunked`, which a proxy cannot pass on faithfully
/// (501, section 6.1).
pub fn check_http1_head(headers: &HeaderMap) -> Result<(), crate::message::error::ProxyError> {
    use crate::message::error::ProxyError;
    let mut hosts = headers.get_all(http::header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host header".into()));
        }
        if !plain_authority(host.as_bytes()) {
            return Err(ProxyError::BadRequest("the Host header is not a host and port".into()));
        }
    }
    for value in headers.get_all(TRANSFER_ENCODING) {
        let codings = value.to_str().unwrap_or("?");
        if codings.split(',').any(|c| !c.trim().eq_ignore_ascii_case("chunked")) {
            return Err(ProxyError::NotImplemented(format!("transfer coding {codings:?}")));
        }
    }
    Ok(())
}

/// Is `host` a host and port, as a `Host` header must be (no user info)? The usual form (a
/// name or IPv4 address, then `:` and digits or nothing) is recognised in place; anything else
/// is parsed (parsing copies the value, an allocation on every request).
fn plain_authority(host: &[u8]) -> bool {
    let (name, port) = match host.iter().rposition(|&b| b == b':') {
        Some(at) => (&host[..at], Some(&host[at + 1..])),
        None => (host, None),
    };
    let usual = !name.is_empty()
        && name.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit));
    usual
        || std::str::from_utf8(host)
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| !a.as_str().contains('@'))
}

/// Which of `names` `headers` carries, from one pass over the names present: a lookup or a
/// removal hashes its name whether it is there or not.
fn present<const N: usize>(headers: &HeaderMap, names: &[HeaderName; N]) -> [bool; N] {
    let mut found = [false; N];
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == name) {
            found[i] = true;
        }
    }
    found
}

/// Every `quicmesh-*` header is the mesh's own (`quicmesh-attempt`, `quicmesh-error`,
/// `quicmesh-unsent`, ...), whatever a client claims.
pub fn strip_internal(headers: &mut HeaderMap) {
    remove_where(headers, |n| n.as_str().starts_with("quicmesh-"));
}

/// Removes every header whose name `doomed` picks, all its values. For maps that rarely hold
/// one: a look at the names present answers those without a lookup per name.
pub fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    if headers.keys().any(&doomed) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// The mesh's own fields of a request from a peer member, taken out of its headers at once:
/// they never reach an instance, and reading them first and removing them later looked each
/// custom name up twice (about 900 instructions per request on the delivering node).
#[derive(Debug, Default)]
pub struct Internal {
    pub service: Option<HeaderValue>,
    pub endpoint: Option<HeaderValue>,
    pub source: Option<HeaderValue>,
    pub jwt_claims: Option<HeaderValue>,
    pub try_timeout: Option<HeaderValue>,
}

impl Internal {
    /// Removes the fields (every value of each; the first one is kept) from `headers`. A look
    /// at the names present comes first: a removal hashes its name whether it is there or not,
    /// and a request usually carries three of the five.
    pub fn take(headers: &mut HeaderMap) -> Self {
        const NAMES: [HeaderName; 5] = [SERVICE, ENDPOINT, SOURCE, JWT_CLAIMS, TRY_TIMEOUT];
        let present = present(headers, &NAMES);
        let [service, endpoint, source, jwt_claims, try_timeout] =
            std::array::from_fn(|i| if present[i] { headers.remove(&NAMES[i]) } else { None });
        Self { service, endpoint, source, jwt_claims, try_timeout }
    }

    /// Where a field of this name goes, for a reader that takes the fields out of a head as it
    /// decodes it (they then never enter the map); `None` for any other name.
    pub fn slot(&mut self, name: &[u8]) -> Option<&mut Option<HeaderValue>> {
        match name {
            b"quicmesh-service" => Some(&mut self.service),
            b"quicmesh-endpoint" => Some(&mut self.endpoint),
            b"quicmesh-source" => Some(&mut self.source),
            b"quicmesh-jwt-claims" => Some(&mut self.jwt_claims),
            b"quicmesh-timeout" => Some(&mut self.try_timeout),
            _ => None,
        }
    }

    /// A field as text, when it is.
    pub fn text(value: &Option<HeaderValue>) -> Option<&str> {
        value.as_ref().and_then(|v| v.to_str().ok())
    }
}

/// The name a header field read off the wire has, for the names the mesh itself puts on every
/// hop: made from a constant (`HeaderName::from_bytes` copies a name that is not a standard one
/// into an allocation of its own, after checking each byte). Other names are parsed. `None`
/// for a name that is not one, or not in lowercase (as HTTP/3 requires: a name that only
/// lowercasing makes one of the mesh's own must not pass as another).
pub fn name_from_wire(name: &[u8]) -> Option<HeaderName> {
    Some(match name {
        b"x-forwarded-for" => FORWARDED_FOR,
        b"x-request-id" => REQUEST_ID,
        b"traceparent" => TRACEPARENT,
        b"x-forwarded-proto" => FORWARDED_PROTO,
        b"quicmesh-attempt" => ATTEMPT,
        _ if name.iter().any(u8::is_ascii_uppercase) => return None,
        _ => HeaderName::from_bytes(name).ok()?,
    })
}

/// Header values a proxy writes into one request, cut from one buffer: two allocations (the
/// buffer, and the reference count its pieces share, so cloning the headers for a retry copies
/// nothing) for all of them, where a value of its own costs one or two each. A piece never
/// changes once cut: when the buffer must grow, it moves to a new one.
pub struct Scratch(BytesMut);

impl Default for Scratch {
    fn default() -> Self {
        // Room for x-forwarded-for, x-request-id and traceparent of a typical request.
        Self::with_capacity(160)
    }
}

impl Scratch {
    /// Room for `bytes` of values.
    pub fn with_capacity(bytes: usize) -> Self {
        Self(BytesMut::with_capacity(bytes))
    }

    /// A header value of what `write` appends; `None` when that is not a valid value.
    pub fn value(&mut self, write: impl FnOnce(&mut BytesMut)) -> Option<HeaderValue> {
        write(&mut self.0);
        HeaderValue::from_maybe_shared(self.0.split().freeze()).ok()
    }

    /// `text` as a header value.
    pub fn text(&mut self, text: &str) -> Option<HeaderValue> {
        self.value(|b| b.extend_from_slice(text.as_bytes()))
    }

    /// A copy of `bytes` cut from the buffer, to share (a header value and a URI's authority
    /// made of the same bytes).
    pub fn bytes(&mut self, bytes: &[u8]) -> Bytes {
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }
}

/// Appends the client address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr, scratch: &mut Scratch) {
    // A previous value that is not text is replaced, not extended.
    let prev = find(headers, &FORWARDED_FOR).and_then(|v| v.to_str().ok()).filter(|p| !p.trim().is_empty());
    let value = scratch.value(|b| {
        if let Some(prev) = prev {
            b.extend_from_slice(prev.as_bytes());
            b.extend_from_slice(b", ");
        }
        put_ip(b, client);
    });
    if let Some(v) = value {
        headers.insert(FORWARDED_FOR, v);
    }
}

/// Appends `ip` as text. IPv4 is written digit by digit into a buffer on the stack and
/// appended at once: `Display` goes through the formatting machinery, and a write per digit
/// into a growing buffer costs a call each, a few thousand instructions on every request's path.
pub fn push_ip<W: Write>(out: &mut W, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let _ = out.write_str(V4Text::new(v4, None).as_str());
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// [`push_ip`] into bytes: an IPv4 address goes in as it was written, without the check that
/// it is text (a few hundred instructions per request at the edge, for two addresses).
pub fn put_ip(out: &mut BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => out.extend_from_slice(V4Text::new(v4, None).as_bytes()),
        ip => push_ip(out, ip),
    }
}

/// Appends `addr` as a URI authority: `192.0.2.1:80`, `[2001:db8::1]:80`.
pub fn push_socket_addr<W: Write>(out: &mut W, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            let _ = out.write_str(V4Text::new(*v4.ip(), Some(v4.port())).as_str());
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `n`'s decimal digits, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[start..]
}

/// Each octet value's decimal digits (left-aligned) and their count: an address is four
/// copies, not four divisions by ten and a loop each.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        let (hundreds, tens, ones) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        table[n] = match n {
            0..=9 => ([b'0' + ones, 0, 0], 1),
            10..=99 => ([b'0' + tens, b'0' + ones, 0], 2),
            _ => ([b'0' + hundreds, b'0' + tens, b'0' + ones], 3),
        };
        n += 1;
    }
    table
};

/// Short text written on the stack (a socket address, a number), for a value that is copied
/// into a frame and needs no allocation of its own. Holds 64 bytes; a write past them fails.
pub struct StackText {
    buf: [u8; 64],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self { buf: [0; 64], len: 0 }
    }
}

impl StackText {
    /// `addr` as a URI authority, as [`push_socket_addr`] writes it.
    pub fn socket_addr(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(v4) => Self::of(V4Text::new(*v4.ip(), Some(v4.port())).as_bytes()),
            addr => {
                let mut text = Self::default();
                push_socket_addr(&mut text, addr);
                text
            }
        }
    }

    /// `n` in decimal.
    pub fn number(n: u64) -> Self {
        Self::of(decimal(n, &mut [0u8; 20]))
    }

    /// Text already made, at most 22 bytes (an IPv4 address with a port, a number's digits).
    fn of(bytes: &[u8]) -> Self {
        let mut text = Self::default();
        text.buf[..bytes.len()].copy_from_slice(bytes);
        text.len = bytes.len();
        text
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Would `bytes` make a header value? (What `HeaderValue::from_bytes` checks, without the copy
/// it makes.)
pub fn valid_value(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Room for the longest IPv4 address with a port, `255.255.255.255:65535`.
#[derive(Default)]
struct V4Text {
    buf: [u8; 21],
    len: usize,
}

impl V4Text {
    /// `ip`, and `:port` when given, as text.
    fn new(ip: std::net::Ipv4Addr, port: Option<u16>) -> Self {
        let mut text = Self::default();
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                text.push(b'.');
            }
            // Three bytes go in whatever the octet's width (the buffer has room past the last
            // octet); only its digits count.
            let (digits, width) = OCTETS[usize::from(octet)];
            text.buf[text.len..text.len + 3].copy_from_slice(&digits);
            text.len += usize::from(width);
        }
        if let Some(port) = port {
            text.push(b':');
            text.decimal(port);
        }
        text
    }

    /// Only ASCII digits, dots and a colon were written.
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// `n`'s digits, written in place: a copy of a few bytes of unknown length is a call to
    /// `memcpy` each, thirteen of them per request at the edge.
    fn decimal(&mut self, n: u16) {
        let width = match n {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            1000..=9999 => 4,
            _ => 5,
        };
        let mut rest = n;
        for i in (0..width).rev() {
            self.buf[self.len + i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.len += width;
    }
}

/// Keeps the request's id, or generates and inserts one when absent or unusable.
pub fn ensure_request_id(headers: &mut HeaderMap, scratch: &mut Scratch) {
    if find(headers, &REQUEST_ID).is_some_and(|v| !v.is_empty() && v.len() <= 128) {
        return;
    }
    // A v4 UUID from the thread's fast generator: request ids need to be unique, not
    // unguessable, and `Uuid::new_v4` costs a getrandom system call each.
    let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = scratch.text(uuid.hyphenated().encode_lower(&mut text)).unwrap_or(HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, id);
}

/// W3C Trace Context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Continues a request's W3C trace as a new span of this proxy (same trace id and flags, a new
/// parent id), or starts a trace when the request has no valid `traceparent` (dropping any
/// orphaned `tracestate`, as the specification asks), sampled when `sample_root` says so for
/// the new trace id.
pub fn continue_trace(headers: &mut HeaderMap, scratch: &mut Scratch, sample_root: impl FnOnce(u128) -> bool) {
    let parsed = find(headers, &TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let started = parsed.is_none();
    let value = scratch.value(|b| {
        b.extend_from_slice(b"00-");
        let mut flags = "01";
        match parsed {
            Some((trace, f)) => {
                b.extend_from_slice(trace.as_bytes());
                flags = f;
            }
            None => {
                let id = fastrand::u128(1..);
                push_hex(b, id, 32);
                if !sample_root(id) {
                    flags = "00";
                }
            }
        }
        b.extend_from_slice(b"-");
        push_random_hex(b, 8);
        b.extend_from_slice(b"-");
        b.extend_from_slice(flags.as_bytes());
    });
    if started && has(headers, &TRACESTATE) {
        headers.remove(&TRACESTATE);
    }
    if let Some(v) = value {
        headers.insert(TRACEPARENT, v);
    }
}

/// `digits` lowercase hex digits of `v`, most significant first.
fn push_hex(out: &mut BytesMut, v: u128, digits: u32) {
    // Written into a buffer on the stack and appended once: a byte at a time, each append
    // checked the output's capacity.
    let mut text = [0u8; 32];
    let digits = digits.min(32) as usize;
    for (i, c) in text[..digits].iter_mut().rev().enumerate() {
        *c = HEX_DIGITS[((v >> (i * 4)) & 0xf) as usize];
    }
    out.extend_from_slice(&text[..digits]);
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Trace id, parent id and sampled flag of a valid `traceparent`.
pub fn trace_ids(headers: &HeaderMap) -> Option<(u128, u64, bool)> {
    let v = headers.get(&TRACEPARENT)?.to_str().ok()?;
    let (trace, flags) = parse_traceparent(v)?;
    let parent = v.trim().split('-').nth(2)?;
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((u128::from_str_radix(trace, 16).ok()?, u64::from_str_radix(parent, 16).ok()?, sampled))
}

/// The trace id of a valid `traceparent`, if the request has one.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse_traceparent).map(|(t, _)| t.to_string())
}

/// (trace id, flags) of a `traceparent` value; `None` when it is not valid.
fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    // Version 00 has exactly four fields; later versions may add more.
    let fields_ok = version != "00" || parts.next().is_none();
    (hex(version, 2)
        && version != "ff"
        && fields_ok
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2))
    .then_some((trace, flags))
}

/// Appends `bytes` random bytes as lowercase hex, never all zero.
fn push_random_hex(out: &mut BytesMut, bytes: usize) {
    let mut left = bytes * 2;
    while left > 0 {
        // Never all zero: a zero word is never drawn.
        let word = fastrand::u64(1..);
        let mut text = [0u8; 16];
        let n = 16.min(left);
        for (i, c) in text[..n].iter_mut().enumerate() {
            *c = HEX_DIGITS[((word >> (i * 4)) & 0xf) as usize];
        }
        out.extend_from_slice(&text[..n]);
        left -= n;
    }
}

/// `{scheme}://{authority}` with the path and query of `uri`, built from parts: formatting a
/// string and parsing it again costs a few thousand instructions on every request's path.
///
/// The path must be origin-form (`/...`) or `*`. The `http` crate already refuses a `:path`
/// such as `admin`, but takes `?q`; glued to the authority it read as a query on `/`, and sent
/// as it is, no route or policy prefix (always `/...`) would match it.
pub fn absolute_uri(scheme: Scheme, authority: String, uri: &Uri) -> Result<Uri, String> {
    let authority =
        http::uri::Authority::from_maybe_shared(Bytes::from(authority)).map_err(|e| format!("authority: {e}"))?;
    absolute_uri_at(scheme, authority, uri)
}

/// [`absolute_uri`] with an authority already parsed (one taken from a URI shares its bytes).
pub fn absolute_uri_at(scheme: Scheme, authority: http::uri::Authority, uri: &Uri) -> Result<Uri, String> {
    let path = uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if !path.as_str().starts_with('/') && path.as_str() != "*" {
        return Err(format!("path {:?} is not absolute", path.as_str()));
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// The authority a request is for: the absolute-form URI's, else the Host header.
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str().to_string());
    }
    headers.get(HOST).and_then(|h| h.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The host part of an authority, lowercased, without port or brackets (borrowed when it
/// already is lowercase: it is looked up on every request).
pub fn host_of(authority: &str) -> Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<std::time::Duration> {
    let v = value.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value (milliseconds, rounded up, at most 8 digits).
pub fn grpc_timeout_value(d: std::time::Duration) -> HeaderValue {
    let ms = d.as_micros().div_ceil(1000).min(99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_timeouts_parse_as_the_grpc_spec_writes_them() {
        use std::time::Duration;
        let parse = |v: &'static str| parse_grpc_timeout(&HeaderValue::from_static(v));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout_value(Duration::from_micros(1500)), "2m");
        assert_eq!(grpc_timeout_value(Duration::from_secs(1 << 40)), "99999999m");
    }

    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[TE], "trailers");
        assert_eq!(h["x-keep"], "1");
        h.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(TE));
        // `TE` named in `Connection` goes, trailers or not; each hop-by-hop field goes whatever
        // the case of the options naming them.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Keep-Alive, TE, Upgrade, X-Gone"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(PROXY_CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"], "{h:?}");
        // An HTTP/1.1 answer's usual `Connection: keep-alive` goes, and only it.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"], "{h:?}");
    }

    #[test]
    fn internal_headers_go_every_value_and_only_they() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_internal(&mut h);
        assert_eq!(h.len(), 1);
        h.append(SOURCE, HeaderValue::from_static("spoofed"));
        h.append(SOURCE, HeaderValue::from_static("again"));
        h.insert(SERVICE, HeaderValue::from_static("web"));
        h.insert(ENDPOINT, HeaderValue::from_static("10.0.0.1:80"));
        strip_internal(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "1");
        h.insert(ENDPOINT, HeaderValue::from_static("10.0.0.1:80"));
        strip_internal(&mut h);
        assert!(!h.contains_key(ENDPOINT), "{h:?}");
        h.insert(ATTEMPT, HeaderValue::from_static("3"));
        h.insert(crate::message::error::ERROR_HEADER, HeaderValue::from_static("upstream-timeout"));
        h.insert(crate::message::error::UNSENT_HEADER, HeaderValue::from_static("1"));
        strip_internal(&mut h);
        assert_eq!(h.len(), 1, "every quicmesh- header goes: {h:?}");
        h.insert(SERVICE, HeaderValue::from_static("web"));
        h.append(SOURCE, HeaderValue::from_static("a"));
        h.append(SOURCE, HeaderValue::from_static("b"));
        let taken = Internal::take(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(Internal::text(&taken.service), Some("web"));
        assert_eq!(Internal::text(&taken.source), Some("a"), "the first value, as a lookup gives");
        assert!(taken.endpoint.is_none() && taken.jwt_claims.is_none() && taken.try_timeout.is_none());
        for (name, value) in [(ENDPOINT, "10.0.0.1:80"), (JWT_CLAIMS, "e30"), (TRY_TIMEOUT, "250"), (ATTEMPT, "2")] {
            h.insert(name, HeaderValue::from_static(value));
        }
        let taken = Internal::take(&mut h);
        assert_eq!(Internal::text(&taken.endpoint), Some("10.0.0.1:80"));
        assert_eq!(Internal::text(&taken.jwt_claims), Some("e30"));
        assert_eq!(Internal::text(&taken.try_timeout), Some("250"));
        assert!(taken.service.is_none() && taken.source.is_none());
        assert_eq!(h.len(), 2, "what is not one of the five stays: {h:?}");
        assert!(h.contains_key(ATTEMPT));
    }

    #[test]
    fn forwarded_for_appends() {
        let (mut h, mut scratch) = (HeaderMap::new(), Scratch::default());
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap(), &mut scratch);
        append_forwarded_for(&mut h, "::1".parse().unwrap(), &mut scratch);
        assert_eq!(h[FORWARDED_FOR], "10.0.0.1, ::1");
    }

    #[test]
    fn request_id_kept_or_made() {
        let (mut h, mut scratch) = (HeaderMap::new(), Scratch::default());
        ensure_request_id(&mut h, &mut scratch);
        let made = h[REQUEST_ID].clone();
        let id = uuid::Uuid::parse_str(made.to_str().unwrap()).unwrap();
        assert_eq!(made, id.hyphenated().to_string().as_str(), "lowercase, hyphenated");
        assert_eq!(id.get_version_num(), 4);
        ensure_request_id(&mut h, &mut scratch);
        assert_eq!(h[REQUEST_ID], made, "kept");
        // Values cut from one scratch buffer stay apart, also when it grows past its first
        // capacity while earlier pieces are alive.
        let long = "10.9.9.9, ".repeat(40);
        h.insert(FORWARDED_FOR, HeaderValue::from_str(long.trim_end_matches(", ")).unwrap());
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap(), &mut scratch);
        continue_trace(&mut h, &mut scratch, |_| true);
        let trace = h[TRACEPARENT].clone();
        ensure_request_id(&mut HeaderMap::new(), &mut scratch);
        assert_eq!(h[REQUEST_ID], made);
        assert_eq!(h[FORWARDED_FOR], format!("{long}10.0.0.1").as_str());
        assert_eq!(h[TRACEPARENT], trace);
        assert!(trace_id(&h).is_some());
        // A previous x-forwarded-for that is not text is replaced.
        let mut h = HeaderMap::new();
        h.insert(FORWARDED_FOR, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        append_forwarded_for(&mut h, "10.0.0.2".parse().unwrap(), &mut scratch);
        assert_eq!(h[FORWARDED_FOR], "10.0.0.2");
    }

    #[test]
    fn trace_context_continues_or_starts() {
        let mut h = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(parent));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        continue_trace(&mut h, &mut Scratch::default(), |_| true);
        assert_eq!(trace_id(&h).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let next = h[TRACEPARENT].to_str().unwrap().to_string();
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && next.ends_with("-01"), "{next}");
        assert_ne!(next, parent, "a new span id");
        assert_eq!(h[TRACESTATE], "vendor=1");
        // The caller's flags are kept (here: not sampled).
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        continue_trace(&mut h, &mut Scratch::default(), |_| true);
        assert!(h[TRACEPARENT].to_str().unwrap().ends_with("-00"), "{:?}", h[TRACEPARENT]);
        for bad in [
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            h.insert(TRACESTATE, HeaderValue::from_static("orphan=1"));
            continue_trace(&mut h, &mut Scratch::default(), |_| true);
            let trace = trace_id(&h).expect("a new valid traceparent");
            assert_eq!(trace.len(), 32);
            assert!(!bad.contains(&trace), "{bad}");
            assert!(!h.contains_key(TRACESTATE));
            assert!(h[TRACEPARENT].to_str().unwrap().ends_with("-01"), "sampled");
        }
        // A trace that starts here is sampled as the sampler says for its id; a caller's
        // decision is never asked again.
        let mut h = HeaderMap::new();
        let mut asked = None;
        continue_trace(&mut h, &mut Scratch::default(), |id| {
            asked = Some(id);
            false
        });
        let (trace, span, sampled) = trace_ids(&h).unwrap();
        assert_eq!(Some(trace), asked, "the sampler saw the new trace's id");
        assert!(!sampled && span != 0);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(parent));
        continue_trace(&mut h, &mut Scratch::default(), |_| unreachable!("a caller decided"));
        let (trace, span, sampled) = trace_ids(&h).unwrap();
        assert_eq!(trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert!(sampled && span != 0x00f067aa0ba902b7);
    }

    #[test]
    fn headers_without_hop_by_hop_fields_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("2"));
        h.insert(HOST, HeaderValue::from_static("hello"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        // One hop-by-hop field among others is enough to take the slow path.
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let ips = [
            "0.0.0.0",
            "9.99.100.1",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8:1",
        ];
        // Every octet value, in every position.
        let every: Vec<String> =
            (0..=255u8).map(|n| std::net::Ipv4Addr::new(n, 255 - n, n / 3, n % 7).to_string()).collect();
        for ip in ips.iter().copied().chain(every.iter().map(String::as_str)) {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
            let mut b = BytesMut::new();
            put_ip(&mut b, ip);
            assert_eq!(b, s.as_bytes());
            for port in [0u16, 7, 9, 10, 80, 99, 100, 443, 999, 1000, 9999, 10000, 65535] {
                let addr = SocketAddr::new(ip, port);
                let mut s = String::new();
                push_socket_addr(&mut s, addr);
                assert_eq!(s, addr.to_string());
                assert_eq!(StackText::socket_addr(addr).as_bytes(), s.as_bytes());
            }
        }
        for n in [0, 9, 10, 1234, u64::MAX] {
            assert_eq!(StackText::number(n).as_bytes(), n.to_string().as_bytes());
        }
    }

    #[test]
    fn stack_text_holds_the_longest_address() {
        // 58 bytes: the longest a socket address's text can be.
        let longest: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535".parse().unwrap();
        assert_eq!(StackText::socket_addr(longest).as_bytes(), longest.to_string().as_bytes());
        let mut text = StackText::default();
        assert!(text.write_str(&"x".repeat(65)).is_err(), "a write past the room fails rather than panics");
    }

    #[test]
    fn valid_value_is_what_http_takes() {
        for b in 0..=255u8 {
            assert_eq!(valid_value(&[b'a', b]), HeaderValue::from_bytes(&[b'a', b]).is_ok(), "byte {b}");
        }
    }

    #[test]
    fn plain_authority_agrees_with_the_parser() {
        // What the check was before: the value as text, parsed, without user info.
        let parsed = |h: &[u8]| {
            HeaderValue::from_bytes(h)
                .ok()
                .and_then(|v| v.to_str().ok()?.parse::<http::uri::Authority>().ok())
                .is_some_and(|a| !a.as_str().contains('@'))
        };
        let hosts: [&[u8]; 28] = [
            b"web",
            b"web:80",
            b"10.0.0.1:8080",
            b"a-b.c.",
            b"WEB.Local:1",
            b"web:99999",
            b"-",
            b"web_1",
            b"web:",
            b":80",
            b"web:123456",
            b"web::80",
            b"[::1]:80",
            b"[::1]",
            b"user@web",
            b"user@web:80",
            b"@web",
            b"web:8o",
            b"we b",
            b"w\teb",
            b"web\xff",
            b"w\xc3\xa9b",
            b"web%41",
            b"",
            b"a:b:c",
            b"web/x",
            b"web?x",
            b"web#x",
        ];
        for host in hosts {
            assert_eq!(plain_authority(host), parsed(host), "{:?}", String::from_utf8_lossy(host));
        }
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("user@web"));
        let refused = check_http1_head(&headers).unwrap_err().to_string();
        assert!(refused.contains("the Host header is not a host and port"), "{refused}");
    }

    #[test]
    fn absolute_uris_keep_path_and_query() {
        let uri: Uri = "/a/b?c=d&e".parse().unwrap();
        let abs = absolute_uri(Scheme::HTTP, "127.0.0.1:8080".into(), &uri).unwrap();
        assert_eq!(abs, "http://127.0.0.1:8080/a/b?c=d&e");
        let abs = absolute_uri(Scheme::HTTPS, "hello".into(), &"http://x:1".parse().unwrap()).unwrap();
        assert_eq!(abs, "https://hello/");
        assert!(absolute_uri(Scheme::HTTP, "bad host".into(), &uri).is_err());
        // A Host that carries a path is refused, not split into authority and path.
        assert!(absolute_uri(Scheme::HTTP, "web/x".into(), &uri).is_err());
        // `http` refuses a path like `admin` itself, but takes `?q` (a query, no path).
        assert!("admin".parse::<http::uri::PathAndQuery>().is_err());
        let relative = Uri::from_parts({
            let mut p = http::uri::Parts::default();
            p.path_and_query = Some("?q".parse().unwrap());
            p
        })
        .unwrap();
        assert!(absolute_uri(Scheme::HTTP, "web".into(), &relative).is_err());
        let star = Uri::from_parts({
            let mut p = http::uri::Parts::default();
            p.path_and_query = Some("*".parse().unwrap());
            p
        })
        .unwrap();
        assert!(absolute_uri(Scheme::HTTP, "web".into(), &star).is_ok());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("Hello:8080"), "hello");
        assert_eq!(host_of("hello"), "hello");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("hello.mesh."), "hello.mesh");
        assert!(matches!(host_of("hello:80"), Cow::Borrowed("hello")), "no copy when already lowercase");
    }

    #[test]
    fn find_answers_as_get_does_on_small_and_large_maps() {
        let names = [HOST, GRPC_STATUS, ATTEMPT, REQUEST_ID, FORWARDED_FOR, TE, CONNECTION, SERVICE, ENDPOINT, SOURCE];
        for size in 0..=names.len() {
            let mut h = HeaderMap::new();
            for (i, name) in names[..size].iter().enumerate() {
                h.append(name.clone(), HeaderValue::from(i));
                // A second value: `find`, as `get`, gives the first.
                h.append(name.clone(), HeaderValue::from(i + 100));
            }
            for name in names.iter().chain([&GRPC_TIMEOUT, &UPGRADE]) {
                assert_eq!(find(&h, name), h.get(name), "{name} in a map of {size}");
                assert_eq!(has(&h, name), h.contains_key(name));
            }
        }
    }
}
