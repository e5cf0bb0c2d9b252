//! Why a request stream between members failed, in either framing they speak (quicmesh's own,
//! `transport::lean`, or HTTP/3): one error type for the body adapters and the proxy code.

/// Refused before any processing: the request may go elsewhere (HTTP/3's H3_REQUEST_REJECTED,
/// which the lean framing uses too).
pub const REQUEST_REJECTED: u32 = 0x10b;

/// Why a request stream failed, in either framing.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    H3(#[from] h3::error::StreamError),
    #[error("the peer reset the stream (code {0:#x})")]
    Reset(u64),
    #[error("the peer stopped reading the stream (code {0:#x})")]
    Stopped(u64),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer refused this connection's early data")]
    ZeroRttRejected,
    #[error("malformed stream: {0}")]
    Malformed(&'static str),
    #[error("the stream is closed already")]
    Closed,
    /// A head larger than the peer takes, refused before anything was sent.
    #[error("a head over the peer's limit of {limit} bytes ({size} or more)")]
    HeadTooLarge { size: u64, limit: u64 },
    /// A request head that did not arrive whole in time.
    #[error("the request head did not arrive within {0:?}")]
    HeadTimeout(std::time::Duration),
    /// This side stopped the stream: its reader had stopped taking data, and the connection
    /// needed the window it held ([`crate::transport::stalls`]).
    #[error("stopped: its reader stopped taking data, and the connection needed the window it held")]
    Stalled,
}

impl WireError {
    /// The `quicmesh-error` a request broken off by this error counts under, when it is not
    /// the upstream's doing.
    pub fn reason(&self) -> Option<&'static str> {
        matches!(self, WireError::Stalled).then_some(STALLED)
    }
}

/// The `quicmesh-error` of an answer or upload cut because its reader stopped taking data.
pub const STALLED: &str = "reader-stalled";

impl From<quinn::ReadError> for WireError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => WireError::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(e) => WireError::Connection(e),
            quinn::ReadError::ZeroRttRejected => WireError::ZeroRttRejected,
            quinn::ReadError::ClosedStream => WireError::Closed,
            quinn::ReadError::IllegalOrderedRead => WireError::Malformed("an unordered read"),
        }
    }
}

impl From<quinn::WriteError> for WireError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => WireError::Stopped(code.into_inner()),
            quinn::WriteError::ConnectionLost(e) => WireError::Connection(e),
            quinn::WriteError::ZeroRttRejected => WireError::ZeroRttRejected,
            quinn::WriteError::ClosedStream => WireError::Closed,
        }
    }
}

impl WireError {
    /// The peer refused the request before processing it (`REQUEST_REJECTED`), or a GOAWAY had
    /// closed the connection to new requests already: it may go elsewhere.
    pub fn rejected(&self) -> bool {
        let rejected = u64::from(REQUEST_REJECTED);
        match self {
            WireError::H3(h3::error::StreamError::RemoteTerminate { code, .. }) => {
                *code == h3::error::Code::H3_REQUEST_REJECTED
            }
            WireError::H3(h3::error::StreamError::RemoteClosing) => true,
            WireError::Reset(code) | WireError::Stopped(code) => *code == rejected,
            _ => false,
        }
    }

    /// A head this side could not send because the peer takes none so large (either framing):
    /// the request's fault, not the connection's.
    pub fn head_too_large(&self) -> bool {
        matches!(self, WireError::HeadTooLarge { .. } | WireError::H3(h3::error::StreamError::HeaderTooBig { .. }))
    }

    /// The connection as a whole failed (so a pooled one is dead).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            WireError::H3(h3::error::StreamError::ConnectionError { .. })
                | WireError::Connection(_)
                | WireError::ZeroRttRejected
        )
    }
}
