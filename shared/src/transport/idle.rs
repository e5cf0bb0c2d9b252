//! An I/O wrapper that fails once a connection has moved no bytes for a while, and optionally
//! once it has lived too long: idle HTTP/1.1 keep-alive and HTTP/2 connections at the edge
//! (`gateway.limits.idle_timeout`), and upgraded connections (WebSocket) under their route's
//! `timeouts.upgradeIdle` and `timeouts.upgradeLifetime`. Reads fail with `TimedOut`, which a
//! tunnel treats as a break: both sides are reset.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct IdleTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Fires at the earliest moment the connection may be idle; moved on to `last + timeout`
    /// only then (moving it at every read and write cost a timer update each).
    timer: Pin<Box<Sleep>>,
    /// When bytes last moved.
    last: Instant,
    /// The end of the connection's life, whatever it carries.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self { inner, timeout, timer: Box::pin(tokio::time::sleep(timeout)), last: Instant::now(), deadline: None }
    }

    /// Also fails `lifetime` from now, busy or not.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep(lifetime)));
        self
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// What a read or write that found nothing to do returns: the error of a timer that ran out,
    /// else `Pending`, registered for the timers' wake-ups.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match self.check(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Errors when a timer ran out; otherwise registers for their wake-ups.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection lifetime reached"));
            }
        }
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(()) => {
                    let due = self.last + self.timeout;
                    if due <= Instant::now() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
                    }
                    // Bytes moved since it was set: idle only from the last of them.
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                // A connection that never waits still ends at its lifetime.
                if self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection lifetime reached")));
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            // A peer that stopped reading: what waits to be written is no traffic (HTTP/1.1
            // reads nothing more while an answer waits, so the read side never looks).
            Poll::Pending => self.waiting(cx),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.waiting(cx),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS stream takes writes into its own buffer and waits here for the socket.
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes that keep moving, each within the timeout, keep the connection; the first silence
    /// as long as the timeout ends it, counted from the last byte.
    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_byte() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleTimeout::new(near, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        let start = Instant::now();
        // 30 s of traffic, a byte every 6 s: three timeouts' worth, never idle for one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        }
        let last = Instant::now();
        assert_eq!(last - start, Duration::from_secs(30));
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - last, Duration::from_secs(10), "idle is counted from the last byte");
    }

    /// Writes count as activity too.
    #[tokio::test(start_paused = true)]
    async fn writes_keep_it_alive() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleTimeout::new(near, Duration::from_secs(10));
        let mut sink = [0u8; 8];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            io.write_all(b"y").await.unwrap();
            far.read_exact(&mut sink[..1]).await.unwrap();
        }
        let last = Instant::now();
        let err = io.read(&mut sink).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - last, Duration::from_secs(10));
    }

    /// A peer that stops reading: a write that waits for it as long as the timeout fails, though
    /// the read side is never polled (HTTP/1.1 reads nothing more while an answer waits).
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_ends_it() {
        let (near, _far) = tokio::io::duplex(64);
        let mut io = IdleTimeout::new(near, Duration::from_secs(10));
        let start = Instant::now();
        let written = tokio::time::timeout(Duration::from_secs(60), io.write_all(&[0u8; 1024])).await;
        let err = written.expect("the write waited for ever").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
    }

    /// A lifetime ends the connection however busy it is.
    #[tokio::test(start_paused = true)]
    async fn the_lifetime_ends_a_busy_connection() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleTimeout::new(near, Duration::from_secs(10)).with_lifetime(Duration::from_secs(15));
        let mut buf = [0u8; 8];
        let start = Instant::now();
        let err = loop {
            tokio::time::sleep(Duration::from_secs(4)).await;
            far.write_all(b"z").await.unwrap();
            match io.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() - start <= Duration::from_secs(16), "{:?}", Instant::now() - start);
    }
}
