//! The data-path network threads: the replica connections of this process (both the server's
//! and the clients') run on a few single-threaded tokio runtimes of their own, not on the
//! control plane's multi-threaded one.
//!
//! Why: a replicated write is a handful of small steps on each connection (read a frame, run
//! the request, write the answer), each woken by the step before. On a work-stealing runtime
//! every wake of a task can also wake a sleeping sibling worker to steal it, which finds
//! nothing and sleeps again; on a VM each of those wake-ups costs tens of microseconds, more
//! than the step itself. A single-threaded runtime runs a connection's tasks on one thread, so
//! a wake-up is one only when that thread was asleep. Connections are spread over the threads
//! round-robin.
//!
//! Each thread also owns an io_uring (`volume::io::uring::thread_ring`): the storage
//! requests of the peers it serves are submitted and completed on it, with no hand-off to the
//! engine's threads.
//!
//! The threads start on first use and live as long as the process. The control plane's timers
//! and tasks are unaffected; a connection's tasks use this runtime's timers.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The runtimes, one per network thread.
fn runtimes() -> &'static [Handle] {
    static RUNTIMES: OnceLock<Vec<Handle>> = OnceLock::new();
    RUNTIMES.get_or_init(|| {
        let threads = threads();
        tracing::info!(threads, "data-path network threads");
        (0..threads)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name(format!("ballast-net-{i}"))
                    .spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a network runtime (an epoll instance and a timer) is needed");
                        let _ = tx.send(runtime.handle().clone());
                        // The thread's own io_uring: a peer's request to this node's
                        // storage is submitted and completed here.
                        if let Err(e) = runtime.block_on(volume::io::uring::thread_ring::drive()) {
                            tracing::warn!(error = %e, "a network thread has no io_uring of its own; its storage requests go through the engine's threads");
                        }
                        runtime.block_on(std::future::pending::<()>());
                    })
                    .expect("a network thread is needed");
                rx.recv().expect("the network thread reports its runtime")
            })
            .collect()
    })
}

/// One network thread per two cores, at least one and at most eight: a connection's work is
/// mostly system calls and crypto, and the rest of the data path (the FUSE workers, the I/O
/// rings) needs cores too.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .div_ceil(2)
        .clamp(1, 8)
}

/// The runtime of the next connection.
pub fn next() -> Handle {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let all = runtimes();
    all[NEXT.fetch_add(1, Ordering::Relaxed) % all.len()].clone()
}

/// Run `work` (a connection's set-up, so that the tasks it spawns and the sockets it opens
/// belong to that thread) on the next network thread, and wait for it.
///
/// # Panics
/// If `work` panics.
pub async fn run<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match next().spawn(work).await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
