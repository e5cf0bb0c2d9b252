//! The threads a proxy runs on: independent event loops, one per worker, as nginx runs a
//! worker process per core.
//!
//! One work-stealing runtime on several threads costs about half again the CPU per request of
//! a single-threaded one here (`cargo bench --bench load`: a gateway on two threads against one):
//! each wakeup may go to the other thread, and idle threads are woken to look for work. So a
//! proxy with `workers` above one runs that many single-threaded runtimes instead: the first
//! is the process's main one (control plane, admin, the process's QUIC endpoints' sockets), the others each
//! own a thread. Accepted client connections are dealt out to them in turn ([`spawn_tcp`],
//! [`spawn_connection`]), and everything a connection does then stays on its worker: its
//! socket's readiness (a TCP stream is registered again with the worker's reactor), its tasks,
//! its timers, and the pooled QUIC connections its requests use (each worker has its own pool:
//! [`index`] says which; the pools share what they know of peers), whose drivers are spawned
//! where they are dialled, on a UDP socket of the worker's own (`transport::dial_endpoint`).
//! What still crosses threads: the receives of connections peers opened (the process's QUIC
//! endpoint is read on the main runtime, which hands each datagram to its connection) and, at
//! a node, kept-alive connections to local instances (one client, shared by the workers).
//!
//! Without [`build`] (in-process tests, the CLI's commands), there is one worker and every
//! call here falls back to the ambient runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle, Runtime};

thread_local! {
    /// This thread's worker (0: the main runtime's thread, and any thread not a worker).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Each worker thread's stop signal and join handle, taken by [`shutdown`].
    threads: std::sync::Mutex<Vec<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

/// The runtime for `threads` workers (0: one per CPU core): a single-threaded runtime to
/// `block_on`, and for more than one, the other workers' event loops started on threads of
/// their own (they run until the process exits). Call once per process, before any mesh state
/// is made ([`count`] sizes the pools).
pub fn build(threads: usize) -> std::io::Result<Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let main = Builder::new_current_thread().enable_all().build()?;
    if threads == 1 {
        return Ok(main);
    }
    if WORKERS.get().is_some() {
        return Err(std::io::Error::other("the workers were started twice"));
    }
    let mut handles = vec![main.handle().clone()];
    let mut stops = Vec::new();
    for i in 1..threads {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(format!("quicmesh-worker-{i}")).spawn(move || {
            let rt = match Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            INDEX.with(|x| x.set(i));
            let _ = tx.send(Ok(rt.handle().clone()));
            // Until the process stops; the runtime's tasks (and what they hold: the mesh, the
            // access log's writer) are dropped then.
            let _ = rt.block_on(stopped);
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })?;
        let handle = rx.recv().map_err(|_| std::io::Error::other("a worker thread ended at its start"))??;
        handles.push(handle);
        stops.push((stop, thread));
    }
    let workers = Workers { handles, next: AtomicUsize::new(0), threads: std::sync::Mutex::new(stops) };
    if WORKERS.set(workers).is_err() {
        return Err(std::io::Error::other("the workers were started twice"));
    }
    Ok(main)
}

/// Stops the other workers once the main runtime's work is done: each drops its tasks, and
/// the call returns when their threads have ended. Call outside any runtime.
pub fn shutdown() {
    let Some(w) = WORKERS.get() else { return };
    let threads = std::mem::take(&mut *w.threads.lock().unwrap_or_else(|e| e.into_inner()));
    // All told first, so that they stop together.
    let joins: Vec<_> = threads
        .into_iter()
        .map(|(stop, thread)| {
            let _ = stop.send(());
            thread
        })
        .collect();
    for thread in joins {
        let _ = thread.join();
    }
}

/// What gives the memory the calling thread's allocator heap holds free back to the system,
/// set by the binary for its allocator ([`set_memory_release`]). Memory of other threads' is
/// theirs to give back.
static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Sets what [`release_memory`] calls: the binary's allocator keeps memory freed by a thread
/// for that thread's next allocations, and an idle proxy makes none.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// After large, passing work on this thread (a config loaded, a mesh's table compiled, a
/// snapshot decoded), gives what it freed back to the system: without it, a node that parsed
/// 10 000 endpoints kept the parse's peak as its resident size for good.
pub fn release_memory() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}

/// As [`release_memory`], on this runtime's thread once the tasks already due on it have had
/// a turn: a start hands its config to the tasks it spawns, and some of that is dropped only
/// at their first poll (measured: a release right after a node's start left 46 MB of a 10 000-
/// endpoint node's 66 resident; one a turn later, 24).
pub fn release_memory_soon() {
    // Outside a runtime (nothing calls it there), at once.
    let Ok(rt) = Handle::try_current() else { return release_memory() };
    rt.spawn(async {
        tokio::task::yield_now().await;
        release_memory();
    });
}

/// Publishes how many threads run the process's requests (`quicmesh_runtime_workers`): its
/// single-threaded workers, or the threads of a work-stealing runtime.
pub fn publish_workers() {
    if let Ok(rt) = Handle::try_current() {
        let (flavor, n) = match rt.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => ("current_thread", count()),
            _ => ("multi_thread", rt.metrics().num_workers()),
        };
        metrics::gauge!(crate::telemetry::metrics::RUNTIME_WORKERS, "flavor" => flavor).set(n as f64);
    }
}

/// How many workers this process runs (1 unless [`build`] started more).
pub fn count() -> usize {
    WORKERS.get().map_or(1, |w| w.handles.len())
}

/// The worker this thread is (0 outside the workers' threads).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Worker `i`'s runtime, when [`build`] started workers (for work that must happen on a
/// given worker's reactor, such as moving its socket).
pub fn handle(i: usize) -> Option<Handle> {
    WORKERS.get()?.handles.get(i).cloned()
}

/// The next worker in turn, when there is more than one (counted in
/// `quicmesh_worker_connections_total`).
fn next() -> Option<&'static Handle> {
    let w = WORKERS.get()?;
    let i = w.next.fetch_add(1, Ordering::Relaxed) % w.handles.len();
    metrics::counter!(crate::telemetry::metrics::WORKER_CONNECTIONS, "worker" => i.to_string()).increment(1);
    Some(&w.handles[i])
}

/// Runs a newly accepted connection's task (a QUIC one: its driver is spawned where it is
/// accepted) on the next worker in turn, or on the ambient runtime when there is one worker.
pub fn spawn_connection<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match next() {
        Some(handle) => drop(handle.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

/// Serves an accepted TCP stream with `serve` on the next worker in turn, the stream moved to
/// that worker's reactor (so its readiness wakes that thread, not the acceptor's). A stream
/// that cannot be moved (the descriptor went bad meanwhile) is dropped, as a failed accept.
pub fn spawn_tcp<F, Fut>(tcp: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(handle) = next() else {
        tokio::spawn(serve(tcp));
        return;
    };
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::debug!(error = %e, "an accepted connection could not be handed to a worker");
            return;
        }
    };
    handle.spawn(async move {
        match TcpStream::from_std(std) {
            Ok(tcp) => serve(tcp).await,
            Err(e) => tracing::debug!(error = %e, "an accepted connection could not join its worker"),
        }
    });
}
