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
    timer: Pin<Box<Sleep>>,
    /// The end of the connection's life, whatever it carries.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self { inner, timeout, timer: Box::pin(tokio::time::sleep(timeout)), deadline: None }
    }

    /// Also fails `lifetime` from now, busy or not.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep(lifetime)));
        self
    }

    fn touch(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.timeout);
    }

    /// Errors when a timer ran out; otherwise registers for their wake-ups.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection lifetime reached"));
            }
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle")),
            Poll::Pending => Ok(()),
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
            Poll::Pending => {
                self.check(cx)?;
                Poll::Pending
            }
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
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
