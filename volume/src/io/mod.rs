//! The I/O engines: how bytes reach the backing files and devices.
//!
//! An [`IoEngine`] accepts an [`IoRequest`] (an operation, a file, an owned buffer and the
//! segments of that buffer to transfer) and returns a [`Completion`] future that resolves to an
//! [`IoCompletion`] carrying the buffer back together with the result. Two backends exist:
//!
//! - [`uring::UringEngine`]: data-path threads, each owning an io_uring, batching submissions;
//! - [`sync_engine::SyncEngine`]: worker threads calling `pread`/`pwrite`, for kernels where
//!   io_uring is unavailable (`EPERM`/`ENOSYS`) or disabled.
//!
//! [`probe`] chooses once at start-up and logs the choice. Both pass one conformance suite
//! (`volume/tests/engine_conformance.rs`).
//!
//! **Run to completion.** A thread that serves requests from start to finish (a FUSE worker
//! serving a local volume) wraps its work in [`inline`]: every request it submits then runs on
//! that thread, synchronously (`preadv`/`pwritev`/`fdatasync`), with no hand-off to a data-path
//! thread and back. Each hand-off wakes a sleeping thread, which on a VM costs tens of
//! microseconds, more than a 4 KiB transfer itself.
//!
//! Invariants every engine keeps:
//! - the buffer is owned by the engine from `submit` until the completion is delivered, and it
//!   always comes back, on success and on failure;
//! - a request completes only when every segment has fully transferred (short transfers are
//!   continued) or one has failed, in which case the first error is reported;
//! - a read past the end of a regular file is an `UnexpectedEof` error, never silent zeros.

pub mod buf;
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub mod faults;
pub mod pool;
pub mod sync_engine;
pub mod uring;

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub use buf::IoBuf;
use tokio::sync::oneshot;

/// What an [`IoRequest`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read each segment from the file into the buffer.
    Read,
    /// Write each segment of the buffer to the file; with `dsync`, each write is durable
    /// when it completes (`RWF_DSYNC`, the file-level FUA).
    Write {
        /// Make the write durable before completing it.
        dsync: bool,
    },
    /// `fdatasync` the file: every completed write becomes durable. No buffer, no segments.
    Fsync,
    /// Write each segment, then `fdatasync` the file, as one request that completes once the
    /// sync has: these writes and every write completed before them are durable. (One trip
    /// through the engine where a write and an `Fsync` take two.)
    WriteThenSync,
}

/// One contiguous transfer between `buf[buf_offset..buf_offset + len]` and the file at
/// `file_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the file.
    pub file_offset: u64,
    /// Byte offset in the request's buffer.
    pub buf_offset: usize,
    /// Number of bytes.
    pub len: usize,
}

/// A file the engines can do I/O on; cheap to clone, closed when the last clone drops.
#[derive(Debug, Clone)]
pub struct IoFile(Arc<OwnedFd>);

impl IoFile {
    /// Wrap an open file descriptor.
    pub fn new(fd: OwnedFd) -> Self {
        Self(Arc::new(fd))
    }

    /// The raw descriptor; valid while any clone of `self` lives.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A request submitted to an engine.
#[derive(Debug)]
pub struct IoRequest {
    /// The operation.
    pub op: IoOp,
    /// The file to operate on.
    pub file: IoFile,
    /// The buffer (required for reads and writes, `None` for `Fsync`).
    pub buf: Option<IoBuf>,
    /// The transfers; every segment must lie within `buf`.
    pub segments: Vec<Segment>,
}

impl IoRequest {
    /// Read `buf.len()` bytes at `offset`.
    pub fn read(file: &IoFile, offset: u64, buf: IoBuf) -> Self {
        let len = buf.len();
        Self {
            op: IoOp::Read,
            file: file.clone(),
            buf: Some(buf),
            segments: vec![Segment {
                file_offset: offset,
                buf_offset: 0,
                len,
            }],
        }
    }

    /// Write all of `buf` at `offset`.
    pub fn write(file: &IoFile, offset: u64, buf: IoBuf, dsync: bool) -> Self {
        let len = buf.len();
        Self {
            op: IoOp::Write { dsync },
            file: file.clone(),
            buf: Some(buf),
            segments: vec![Segment {
                file_offset: offset,
                buf_offset: 0,
                len,
            }],
        }
    }

    /// Write all of `buf` at `offset`, then `fdatasync` the file ([`IoOp::WriteThenSync`]).
    pub fn write_then_sync(file: &IoFile, offset: u64, buf: IoBuf) -> Self {
        Self {
            op: IoOp::WriteThenSync,
            ..Self::write(file, offset, buf, false)
        }
    }

    /// `fdatasync` the file.
    pub fn fsync(file: &IoFile) -> Self {
        Self {
            op: IoOp::Fsync,
            file: file.clone(),
            buf: None,
            segments: Vec::new(),
        }
    }

    /// Check the request's shape; engines call this before touching the kernel.
    ///
    /// # Errors
    /// `InvalidInput` if a segment lies outside the buffer or a buffer is missing.
    pub fn validate(&self) -> io::Result<()> {
        match (self.op, &self.buf) {
            (IoOp::Fsync, _) => Ok(()),
            (_, None) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read or write without a buffer",
            )),
            (_, Some(buf)) => {
                for s in &self.segments {
                    if s.buf_offset
                        .checked_add(s.len)
                        .is_none_or(|end| end > buf.len())
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("segment {s:?} lies outside a buffer of {} bytes", buf.len()),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The outcome of a request: its result and its buffer, returned in every case.
#[derive(Debug)]
pub struct IoCompletion {
    /// `Ok` when every segment transferred fully; otherwise the first error.
    pub result: io::Result<()>,
    /// The request's buffer, handed back.
    pub buf: Option<IoBuf>,
}

thread_local! {
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every request this thread submits to an engine executed on this thread, at
/// submission (see the module docs). Nests; the previous setting is restored, even if `f`
/// panics.
pub fn inline<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INLINE.with(|i| i.set(self.0));
        }
    }
    let _restore = Restore(INLINE.with(|i| i.replace(true)));
    f()
}

/// Drive `work` to completion on this thread, sleeping while it waits. Engine completions (and
/// the pool's locks and waits) wake this thread directly; futures that also use tokio's timers
/// or spawn tasks need the runtime entered ([`tokio::runtime::Handle::enter`]).
pub fn block_on<F: std::future::Future>(work: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut work = std::pin::pin!(work);
    loop {
        if let std::task::Poll::Ready(v) = work.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// If this thread runs requests inline ([`inline`]), run `req` now and return its completion.
pub(crate) fn run_inline(req: IoRequest) -> Result<Completion, IoRequest> {
    if !INLINE.with(std::cell::Cell::get) {
        return Err(req);
    }
    let mut req = req;
    let result = sync_engine::run(&mut req);
    Ok(Completion::ready(IoCompletion {
        result,
        buf: req.buf,
    }))
}

/// A future resolving to the [`IoCompletion`] of a submitted request.
#[derive(Debug)]
pub struct Completion(CompletionInner);

#[derive(Debug)]
enum CompletionInner {
    Pending(oneshot::Receiver<IoCompletion>),
    Ready(Option<IoCompletion>),
}

impl Completion {
    /// A completion and the sender an engine uses to deliver it.
    pub fn channel() -> (oneshot::Sender<IoCompletion>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(CompletionInner::Pending(rx)))
    }

    /// An already-finished completion (used when a request is refused before submission).
    pub fn ready(c: IoCompletion) -> Self {
        Self(CompletionInner::Ready(Some(c)))
    }

    /// Block the calling (non-async) thread until the request completes.
    #[cfg(any(debug_assertions, feature = "failpoints"))]
    pub fn wait(self) -> IoCompletion {
        match self.0 {
            CompletionInner::Ready(c) => c.expect("Completion waited after ready"),
            CompletionInner::Pending(rx) => rx.blocking_recv().unwrap_or_else(|_| IoCompletion {
                result: Err(io::Error::other(
                    "the I/O engine shut down before completing the request",
                )),
                buf: None,
            }),
        }
    }
}

impl Future for Completion {
    type Output = IoCompletion;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        match &mut self.get_mut().0 {
            CompletionInner::Ready(c) => {
                Poll::Ready(c.take().expect("Completion polled after ready"))
            }
            CompletionInner::Pending(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(c)) => Poll::Ready(c),
                // The engine is gone: its worker thread died. The buffer died with it.
                Poll::Ready(Err(_)) => Poll::Ready(IoCompletion {
                    result: Err(io::Error::other(
                        "the I/O engine shut down before completing the request",
                    )),
                    buf: None,
                }),
            },
        }
    }
}

/// An I/O backend. Object-safe so the engine can be chosen at run time.
pub trait IoEngine: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`"io_uring"`, `"sync"`).
    fn name(&self) -> &'static str;

    /// Submit a request. The returned future resolves when it has fully completed.
    fn submit(&self, req: IoRequest) -> Completion;
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else sync.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The portable thread-pool engine.
    Sync,
}

/// Choose and start an engine with `threads` data-path threads.
///
/// With [`EngineKind::Auto`], io_uring is probed once; if the kernel refuses it (`EPERM`,
/// `ENOSYS`, or disabled by sysctl) the sync engine is used and a warning says so.
///
/// # Errors
/// Only with [`EngineKind::Uring`] when io_uring cannot be set up, or if threads cannot spawn.
pub fn probe(kind: EngineKind, threads: usize) -> io::Result<Arc<dyn IoEngine>> {
    let engine = probe_engine(kind, threads)?;
    #[cfg(any(debug_assertions, feature = "failpoints"))]
    let engine = faults::wrap(engine);
    Ok(engine)
}

fn probe_engine(kind: EngineKind, threads: usize) -> io::Result<Arc<dyn IoEngine>> {
    let threads = threads.max(1);
    match kind {
        EngineKind::Sync => {
            tracing::info!(threads, "using the sync I/O engine, as configured");
            Ok(Arc::new(sync_engine::SyncEngine::start(threads)?))
        }
        EngineKind::Uring => {
            let e = uring::UringEngine::start(threads)?;
            tracing::info!(threads, "using the io_uring I/O engine");
            Ok(Arc::new(e))
        }
        EngineKind::Auto => match uring::UringEngine::start(threads) {
            Ok(e) => {
                tracing::info!(threads, "using the io_uring I/O engine");
                Ok(Arc::new(e))
            }
            Err(err) => {
                tracing::warn!(%err, threads, "io_uring is unavailable on this kernel; falling back to the sync I/O engine");
                Ok(Arc::new(sync_engine::SyncEngine::start(threads)?))
            }
        },
    }
}

/// Open `path` for the data path: read-write, `O_DIRECT` where the filesystem supports it,
/// `O_CLOEXEC`. Returns the file and whether `O_DIRECT` is in effect.
///
/// # Errors
/// The `open(2)` error.
pub fn open_direct(path: &std::path::Path, create: bool) -> io::Result<(IoFile, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(create);
    let direct = opts
        .clone()
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path);
    match direct {
        Ok(f) => Ok((IoFile::new(f.into()), true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT is not supported here; using buffered I/O");
            let f = opts.custom_flags(libc::O_CLOEXEC).open(path)?;
            Ok((IoFile::new(f.into()), false))
        }
        Err(e) => Err(e),
    }
}
