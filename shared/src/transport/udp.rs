//! The UDP socket of every QUIC endpoint a member opens (mesh, workers' dials, the gateway's
//! HTTP/3 edge) as quinn drives it: registered with the runtime for reads only, so that a
//! datagram leaving the socket does not wake the thread a second time.
//!
//! quinn's own tokio socket registers for reads and writes, edge-triggered. Linux tells a UDP
//! socket's waiters it can write whenever a sent datagram's memory comes back and the socket is
//! under half its send buffer, which is after almost every send (TCP tells only a writer that
//! found its buffer full). So each datagram sent woke the worker once more for nothing: at a
//! request a millisecond, about one wake in three of a node's (`strace`: an `EPOLLOUT` alone
//! after each `sendmsg`).
//!
//! Here sends go straight to the socket (quinn asks whether there is room before each, and is
//! told yes), and only after the kernel refused one (`EAGAIN`) does a send wait for room:
//! through a second descriptor of the same socket, registered for writes while that wait lasts
//! and closed when it ends.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A UDP socket for a quinn endpoint, registered with the current tokio runtime for reads.
#[derive(Debug)]
pub(super) struct ReadRegistered {
    io: AsyncFd<UdpSocket>,
    state: UdpSocketState,
    /// The most datagrams one send may batch (see `MAX_SEND`).
    segments: usize,
    /// The kernel refused a send for want of room, and no wait has seen room since.
    refused: AtomicBool,
}

impl ReadRegistered {
    /// Takes `socket` over (made non-blocking); at most `segments` datagrams per send.
    pub(super) fn new(socket: UdpSocket, segments: usize) -> io::Result<Self> {
        // Registering outside a runtime would panic.
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Self { io, state, segments, refused: AtomicBool::new(false) })
    }
}

impl AsyncUdpSocket for ReadRegistered {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(RoomToSend { socket: self, waiting: None })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
            self.refused.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // A `WouldBlock` clears the readiness, and the next look waits for the socket.
            if let Ok(result) = ready.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                return Poll::Ready(result);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments().min(self.segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// `socket` registered with the current runtime for `interest`.
///
/// tokio deprecated this safe constructor in favour of an `unsafe` one whose contract is that the
/// descriptor stays open, and the same, for as long as the registration: true of a
/// `std::net::UdpSocket`, which owns its one descriptor until it is dropped, and is never
/// replaced here (`get_mut` is not called). This crate forbids `unsafe`.
#[allow(deprecated)]
fn register(socket: UdpSocket, interest: Interest) -> io::Result<AsyncFd<UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

/// Waits for room in the socket's send buffer after a refused send: a duplicate of its
/// descriptor, registered for writes only while the wait lasts.
///
/// The refusal is the socket's, so after one every connection on it waits once, each on a
/// duplicate of its own, until the runtime's next look at the socket. Sends are refused only
/// while the send buffer is full, which on loopback never happened (BENCHMARKS.md (21)).
#[derive(Debug)]
struct RoomToSend {
    socket: Arc<ReadRegistered>,
    waiting: Option<Wait>,
}

#[derive(Debug)]
enum Wait {
    /// The duplicate, registered for writes.
    Room(AsyncFd<UdpSocket>),
    /// The system refused the duplicate or its registration (out of descriptors or memory): a
    /// pause before the send is tried again. An error here would stop the connection's driver
    /// for good.
    Pause(Pin<Box<tokio::time::Sleep>>),
}

/// How long a send waits for room when no registration could be made for it.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl UdpPoller for RoomToSend {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // quinn asks before every send; only a refused one waits.
        if this.waiting.is_none() && !this.socket.refused.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        // Registering a socket that has room already reports it writable at once, so room made
        // between the refused send and this registration is not missed.
        let wait = match &mut this.waiting {
            Some(wait) => wait,
            None => match this.socket.io.get_ref().try_clone().and_then(|dup| register(dup, Interest::WRITABLE)) {
                Ok(dup) => this.waiting.insert(Wait::Room(dup)),
                // Any other error (the runtime shutting down) ends the connection, as it would
                // have with quinn's own socket.
                Err(e) if e.raw_os_error().is_none() => return Poll::Ready(Err(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch the QUIC socket for room to send; pausing instead");
                    this.waiting.insert(Wait::Pause(Box::pin(tokio::time::sleep(PAUSE))))
                }
            },
        };
        match wait {
            // Readiness needs no clearing: the registration ends below. An error from the
            // runtime is a wait that ended; the send that follows says what is wrong.
            Wait::Room(dup) => drop(ready!(dup.poll_write_ready(cx))),
            Wait::Pause(pause) => ready!(pause.as_mut().poll(cx)),
        }
        // Closing the duplicate ends the registration: no wakes for sends that find room.
        this.waiting = None;
        this.socket.refused.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// The event masks of every epoll registration of `socket`'s file in this process, whatever
    /// descriptor made it: Linux lists an epoll instance's registrations in its `fdinfo`, each
    /// as `tfd: <fd> events: <mask> data: <..> pos:<..> ino:<inode> sdev:<..>` (hexadecimal).
    /// An instance reached through two descriptors (the runtime keeps a duplicate) lists the
    /// same lines twice; they count once.
    fn registrations(socket: &UdpSocket) -> Vec<u32> {
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd())).expect("the socket's inode").ino();
        let mut seen = std::collections::BTreeSet::new();
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").expect("/proc/self/fdinfo").flatten() {
            // A descriptor closed meanwhile, or one that is not an epoll instance, lists nothing.
            let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1));
                let same_file = words
                    .iter()
                    .find_map(|w| w.strip_prefix("ino:"))
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .is_some_and(|i| i == ino);
                if same_file && seen.insert(line.to_string()) {
                    masks.push(after("events:").and_then(|m| u32::from_str_radix(m, 16).ok()).expect("an event mask"));
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn the_socket_is_watched_for_writes_only_while_a_send_waits_for_room() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A datagram that never comes fails the test rather than hanging it.
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let socket = Arc::new(ReadRegistered::new(UdpSocket::bind("127.0.0.1:0").unwrap(), 10).unwrap());
        let watched = registrations(socket.io.get_ref());
        assert_eq!(watched.len(), 1, "one registration: {watched:x?}");
        assert_eq!(watched[0] & (EPOLLIN | EPOLLOUT), EPOLLIN, "watched for reads, not writes: {:x}", watched[0]);

        // Sends go out without the runtime, and the registration stays as it was.
        let to = peer.local_addr().unwrap();
        let transmit = Transmit { destination: to, ecn: None, contents: b"ping", segment_size: None, src_ip: None };
        socket.try_send(&transmit).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], socket.local_addr().unwrap()));
        assert_eq!(registrations(socket.io.get_ref()), watched);

        // quinn asks for room before every send: yes at once, with nothing registered.
        let mut room = socket.clone().create_io_poller();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(room.as_mut().poll_writable(&mut cx).is_ready());
        assert_eq!(registrations(socket.io.get_ref()), watched);

        // After a refused send, a wait for room watches a duplicate for writes; it ends with
        // the wait, however often it is repeated.
        let mut waited = 0;
        for _ in 0..3 {
            socket.refused.store(true, Ordering::Relaxed);
            let mut first = true;
            std::future::poll_fn(|cx| {
                let polled = room.as_mut().poll_writable(cx);
                if first && polled.is_pending() {
                    let during = registrations(socket.io.get_ref());
                    assert_eq!(during.len(), 2, "the socket and its duplicate: {during:x?}");
                    assert!(during.contains(&watched[0]), "the socket's own stays as it was: {during:x?}");
                    assert!(during.iter().any(|m| m & EPOLLOUT != 0), "{during:x?}");
                    waited += 1;
                }
                first = false;
                polled
            })
            .await
            .unwrap();
            assert_eq!(registrations(socket.io.get_ref()), watched, "the duplicate is closed once there is room");
            assert!(!socket.refused.load(Ordering::Relaxed));
        }
        // Registered anew each time: the runtime learns of the room on its next look.
        assert_eq!(waited, 3);

        // And datagrams still arrive through the read registration.
        peer.send_to(b"pong", socket.local_addr().unwrap()).unwrap();
        let mut data = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let got = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut [IoSliceMut::new(&mut data)], &mut meta))
            .await
            .unwrap();
        assert_eq!((got, &data[..meta[0].len]), (1, &b"pong"[..]));
    }
}
