//! The io_uring engine: a few data-path threads, each owning one ring, submitting in batches.
//!
//! # How a request travels
//!
//! 1. [`UringEngine::submit`] validates the request (an invalid one completes at once, with its
//!    buffer) and hands it, together with the sender half of its [`Completion`], to one worker
//!    thread over a channel (round-robin). A thread that owns a ring itself
//!    ([`thread_ring`]: the replica network threads) puts it into that ring instead, and the
//!    steps below happen on that thread.
//! 2. If that worker is asleep in the kernel, the submitter rings its doorbell: an `eventfd` on
//!    which the worker always keeps a read armed in its ring. A worker that is awake is not
//!    disturbed, so a busy engine costs no `eventfd` write per request (see `Doorbell`).
//! 3. The worker drains every queued request into its in-flight table, turns each segment into
//!    one SQE (`Read`, `Write` with `RWF_DSYNC` for dsync writes, `Fsync` with `DATASYNC`), and
//!    submits the whole batch with a single `io_uring_enter`, which also waits for completions
//!    when there is nothing else to do.
//! 4. Each CQE advances its segment. A short transfer is continued by submitting the
//!    remainder; `-EAGAIN` and `-EINTR` are retried; a 0-byte transfer is `UnexpectedEof`; any
//!    other error is recorded, and the first error wins. When no SQE of the request remains in
//!    the kernel or in the queue, the request leaves the table and its [`IoCompletion`] goes back
//!    with the buffer.
//!
//! # Invariants
//!
//! - **Buffer ownership.** From `submit` until its completion is sent, a request (and so its
//!   [`IoBuf`](super::IoBuf) and its [`IoFile`](super::IoFile)) is owned by exactly one worker:
//!   first by the channel, then by the worker's in-flight table. Every SQE's `user_data` names
//!   the table slot and segment it belongs to, and a slot is freed only when its count of SQEs
//!   queued or in the kernel (`busy`) has dropped to zero. So the kernel never holds a pointer
//!   into a buffer, or a descriptor, that has been handed back or freed. Moving the `IoBuf`
//!   struct around (the table may reallocate) never moves the heap bytes the kernel sees.
//! - **Never too many in the kernel.** At most `cq_entries` SQEs are queued or in flight per
//!   ring, so the completion queue cannot overflow; requests beyond that wait in the worker's
//!   queue. (Overflow is still detected and logged, should the kernel drop CQEs.)
//! - **Segments of one request run concurrently.** Their order is unspecified, so segments that
//!   overlap in the file must not be combined in one write request.
//! - **Shutdown.** Dropping the engine closes the channels and rings every doorbell. A worker
//!   first admits everything already queued, waits until every SQE has completed (the wake-up
//!   read included), and only then drops its ring; the drop joins every thread. If a worker
//!   died with SQEs still in the kernel, it leaks their buffers instead of freeing memory the
//!   kernel may still write into.
//! - **Set-up failure is an error, never a panic.** Each worker builds its ring on its own
//!   thread and reports the result before [`UringEngine::start`] returns; `EPERM`, `ENOSYS`, a
//!   sysctl-disabled io_uring or a kernel without the needed opcodes make `start` fail, so
//!   [`probe`](super::probe) falls back to the sync engine.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{self, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::{Completion, IoCompletion, IoEngine, IoOp, IoRequest};

/// Submission queue entries per ring; the completion queue is twice as large.
const RING_ENTRIES: u32 = 256;

/// The most bytes one SQE transfers; longer segments continue like short transfers.
const MAX_SQE_LEN: usize = 1 << 30;

/// The most requests a worker takes from its channel before submitting what it has.
const MAX_ADMIT_PER_ROUND: usize = RING_ENTRIES as usize;

/// `user_data` of the wake-up read on the doorbell `eventfd`.
const WAKE_TOKEN: u64 = u64::MAX;

/// The segment index in `user_data` that marks a request's `Fsync` SQE.
const FSYNC_SEGMENT: u32 = u32::MAX;

/// The io_uring engine.
#[derive(Debug)]
pub struct UringEngine {
    workers: Vec<WorkerHandle>,
    next: AtomicUsize,
}

/// The engine's side of one worker thread.
#[derive(Debug)]
struct WorkerHandle {
    tx: Option<Sender<Job>>,
    bell: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
}

/// A request travelling to a worker, with the sender of its completion.
#[derive(Debug)]
struct Job {
    req: IoRequest,
    done: oneshot::Sender<IoCompletion>,
}

impl UringEngine {
    /// Start `threads` ring-owning threads (at least one), each with a ring of
    /// 256 submission entries.
    ///
    /// # Errors
    /// If the kernel refuses io_uring (`EPERM`, `ENOSYS`, disabled by
    /// `/proc/sys/kernel/io_uring_disabled`), lacks the `Read`, `Write` or `Fsync` opcodes, or a
    /// thread or `eventfd` cannot be created. Threads already started are stopped.
    pub fn start(threads: usize) -> io::Result<Self> {
        // Dropping `engine` on any early return stops the workers started so far.
        let mut engine = Self {
            workers: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for i in 0..threads.max(1) {
            let bell = Arc::new(Doorbell::new()?);
            let (tx, rx) = crossbeam_channel::unbounded::<Job>();
            let (ready_tx, ready_rx) = crossbeam_channel::bounded::<io::Result<()>>(1);
            let worker_bell = Arc::clone(&bell);
            let thread = std::thread::Builder::new()
                .name(format!("ballast-uring-{i}"))
                .spawn(move || match Worker::new(rx, worker_bell) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })?;
            let ready = ready_rx.recv().unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the io_uring thread exited while setting up its ring",
                ))
            });
            engine.workers.push(WorkerHandle {
                tx: Some(tx),
                bell,
                thread: Some(thread),
            });
            ready?;
        }
        Ok(engine)
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&self, req: IoRequest) -> Completion {
        let req = match super::run_inline(req) {
            Ok(done) => return done,
            Err(req) => req,
        };
        if let Err(e) = req.validate().and_then(|()| check_kernel_limits(&req)) {
            return Completion::ready(IoCompletion {
                result: Err(e),
                buf: req.buf,
            });
        }
        let (done, completion) = Completion::channel();
        let Some(Job { req, done }) = thread_ring::submit(Job { req, done }) else {
            return completion;
        };
        let worker = &self.workers[self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()];
        let sent = match &worker.tx {
            Some(tx) => tx
                .send(Job { req, done })
                .map_err(crossbeam_channel::SendError::into_inner),
            None => Err(Job { req, done }),
        };
        match sent {
            Ok(()) => worker.bell.notify(),
            Err(Job { req, done }) => {
                let _ = done.send(IoCompletion {
                    result: Err(io::Error::other("the io_uring engine has stopped")),
                    buf: req.buf,
                });
            }
        }
        completion
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        for w in &mut self.workers {
            drop(w.tx.take());
            w.bell.ring();
        }
        for w in &mut self.workers {
            if let Some(thread) = w.thread.take() {
                if thread.join().is_err() {
                    tracing::error!("an io_uring data-path thread panicked");
                }
            }
        }
    }
}

/// Refuse what io_uring would misread: an offset of `-1` means "the current file position" to
/// the kernel, and more than `u32::MAX - 1` segments do not fit in `user_data`.
fn check_kernel_limits(req: &IoRequest) -> io::Result<()> {
    if req.segments.len() >= FSYNC_SEGMENT as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many segments in one request",
        ));
    }
    for s in &req.segments {
        if s.file_offset
            .checked_add(s.len as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("segment {s:?} extends beyond the largest file offset"),
            ));
        }
    }
    Ok(())
}

/// How submitters wake a worker that sleeps in `io_uring_enter`.
///
/// The worker keeps a read of `eventfd` armed in its ring, so a write to the `eventfd`
/// completes that read and ends the wait. To spare an `eventfd` write per request, the worker
/// announces that it is about to sleep, and only then does a submitter ring. The protocol is
/// race-free by the two `SeqCst` fences (a Dekker handshake):
///
/// - worker: `sleeping = true`; fence; look at the channel; sleep only if it is empty;
/// - submitter: put the job in the channel; fence; if `sleeping` swaps from `true`, ring.
///
/// Either the worker's look sees the job, or the submitter's load sees `sleeping == true` and
/// rings. A spurious ring only costs one extra loop of the worker.
#[derive(Debug)]
struct Doorbell {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    fn new() -> io::Result<Self> {
        // SAFETY: `eventfd(2)` takes no pointers; the result is checked below. The eventfd is
        // blocking on purpose: io_uring completes a read of a blocking eventfd when it is
        // written, whereas a non-blocking one would fail the read with `EAGAIN` at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            eventfd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Submitter side, after the job is in the channel: wake the worker if it sleeps.
    fn notify(&self) {
        atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.ring();
        }
    }

    /// Add one to the eventfd counter, completing the worker's armed read.
    fn ring(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes the 8 bytes of the live local `one` to an eventfd we own.
            let n = unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
            if n == 8 {
                return;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                tracing::error!(%err, "cannot wake an io_uring data-path thread");
                return;
            }
        }
    }
}

/// One request in a worker's in-flight table.
#[derive(Debug)]
struct InFlight {
    /// The request; owns the buffer and the file the kernel is using.
    req: IoRequest,
    done: oneshot::Sender<IoCompletion>,
    /// Bytes transferred so far, per segment.
    progress: Vec<usize>,
    /// SQEs of this request that are queued in the worker or in the kernel.
    busy: usize,
    /// The first error; once set, no new SQE of this request is submitted.
    error: Option<io::Error>,
    /// A [`IoOp::WriteThenSync`] whose writes are done has had its `Fsync` queued.
    synced: bool,
}

/// A data-path thread's state: its ring, its channel and its in-flight table.
struct Worker {
    ring: IoUring,
    rx: Receiver<Job>,
    bell: Arc<Doorbell>,
    /// In-flight requests, indexed by the slot half of `user_data`.
    table: Vec<Option<InFlight>>,
    free_slots: Vec<u32>,
    /// Requests in `table`.
    live: usize,
    /// `user_data` of SQEs to push when the ring has room (new segments, continuations,
    /// retries, the wake-up read).
    queue: VecDeque<u64>,
    /// SQEs pushed to the ring and not yet reaped (the wake-up read included).
    in_ring: usize,
    /// The cap on `in_ring`: the completion queue size, so it cannot overflow.
    max_in_ring: usize,
    /// Where the wake-up read stores the eventfd counter. Boxed: its address is in the ring.
    wake_buf: Box<u64>,
    /// A wake-up read is queued or in the ring.
    wake_armed: bool,
    /// This worker's own eventfd write, to complete its wake-up read at shutdown, is done.
    wake_kicked: bool,
    /// The channel is closed and empty: finish in-flight work, then exit.
    closing: bool,
    /// Scratch space for reaped `(user_data, result)` pairs.
    reaped: Vec<(u64, i32)>,
    /// The kernel's count of dropped CQEs, last seen.
    overflow_seen: u32,
    /// An `io_uring_enter` failure has been logged (only the first is).
    enter_error_logged: bool,
    /// A thread's own ring ([`thread_ring`]): no channel, no wake-up read; the kernel signals
    /// `bell`'s eventfd for every completion instead.
    owned: bool,
    /// A thread ring's requests are queued for an `io_uring_enter` that is due (a task
    /// spawned to make it).
    submit_due: bool,
}

impl Worker {
    /// Build the ring on the calling thread (so it may be a single-issuer ring).
    fn new(rx: Receiver<Job>, bell: Arc<Doorbell>) -> io::Result<Self> {
        let ring = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(RING_ENTRIES)
        {
            Ok(ring) => ring,
            // Kernels before 6.0 do not know these flags.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES)?,
            Err(e) => return Err(e),
        };
        Self::with_ring(ring, rx, bell)
    }

    /// A worker over `ring`, if the kernel has the opcodes it needs.
    fn with_ring(ring: IoUring, rx: Receiver<Job>, bell: Arc<Doorbell>) -> io::Result<Self> {
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring cannot list its opcodes ({e})"),
            )
        })?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("this kernel's io_uring has no {name} operation"),
                ));
            }
        }
        let max_in_ring = ring.params().cq_entries() as usize;
        Ok(Self {
            ring,
            rx,
            bell,
            table: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            queue: VecDeque::new(),
            in_ring: 0,
            max_in_ring,
            wake_buf: Box::new(0),
            wake_armed: false,
            wake_kicked: false,
            closing: false,
            reaped: Vec::new(),
            overflow_seen: 0,
            enter_error_logged: false,
            owned: false,
            submit_due: false,
        })
    }

    /// The thread's loop: admit, push, submit (and wait if idle), reap; until closed and done.
    fn run(mut self) {
        self.arm_wake();
        loop {
            self.admit_queued();
            self.push_queued();
            if self.closing && self.live == 0 && self.queue.is_empty() {
                if self.in_ring == 0 {
                    break;
                }
                if self.wake_armed && !self.wake_kicked {
                    // Complete our own wake-up read so the ring holds nothing when it drops.
                    self.bell.ring();
                    self.wake_kicked = true;
                }
            }
            // Work that could not be pushed although the ring has room means the SQ was full:
            // submit without waiting, then push the rest.
            let backlog = !self.queue.is_empty() && self.in_ring < self.max_in_ring;
            let want = if backlog || self.in_ring == 0 {
                0
            } else {
                self.bell.sleeping.store(true, Ordering::SeqCst);
                atomic::fence(Ordering::SeqCst);
                usize::from(self.rx.is_empty())
            };
            self.enter(want);
            self.bell.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    /// Take up to a batch of requests from the channel into the table.
    fn admit_queued(&mut self) {
        if self.closing {
            return;
        }
        for _ in 0..MAX_ADMIT_PER_ROUND {
            match self.rx.try_recv() {
                Ok(job) => self.admit(job),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    // A wake-up read not yet in the ring is simply not submitted.
                    if let Some(pos) = self.queue.iter().position(|&ud| ud == WAKE_TOKEN) {
                        self.queue.remove(pos);
                        self.wake_armed = false;
                    }
                    return;
                }
            }
        }
    }

    /// Put one request in the table and queue one SQE per non-empty segment.
    fn admit(&mut self, Job { req, done }: Job) {
        // `submit` checked already; a request that is somehow invalid never reaches the kernel.
        if let Err(e) = req.validate().and_then(|()| check_kernel_limits(&req)) {
            let _ = done.send(IoCompletion {
                result: Err(e),
                buf: req.buf,
            });
            return;
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None if self.table.len() < FSYNC_SEGMENT as usize => {
                self.table.push(None);
                (self.table.len() - 1) as u32
            }
            None => {
                let e = io::Error::other("too many requests in flight on one io_uring thread");
                let _ = done.send(IoCompletion {
                    result: Err(e),
                    buf: req.buf,
                });
                return;
            }
        };
        let mut busy = 0;
        let mut synced = false;
        if req.op != IoOp::Fsync {
            for (i, seg) in req.segments.iter().enumerate() {
                if seg.len > 0 {
                    self.queue.push_back(user_data(slot, i as u32));
                    busy += 1;
                }
            }
        }
        if busy == 0 && matches!(req.op, IoOp::Fsync | IoOp::WriteThenSync) {
            self.queue.push_back(user_data(slot, FSYNC_SEGMENT));
            busy = 1;
            synced = true;
        }
        if busy == 0 {
            // Nothing to transfer (no segments, or only empty ones).
            self.free_slots.push(slot);
            let _ = done.send(IoCompletion {
                result: Ok(()),
                buf: req.buf,
            });
            return;
        }
        let progress = vec![0; req.segments.len()];
        self.table[slot as usize] = Some(InFlight {
            req,
            done,
            progress,
            busy,
            error: None,
            synced,
        });
        self.live += 1;
    }

    /// Queue the wake-up read of the doorbell eventfd, ahead of other work.
    fn arm_wake(&mut self) {
        if !self.wake_armed && !self.closing && !self.owned {
            self.queue.push_front(WAKE_TOKEN);
            self.wake_armed = true;
        }
    }

    /// Move queued SQEs into the submission queue while it and the completion budget have room.
    fn push_queued(&mut self) {
        while self.in_ring < self.max_in_ring {
            let Some(&ud) = self.queue.front() else {
                return;
            };
            let Some(entry) = self.build_sqe(ud) else {
                // The request already failed: drop this SQE instead of submitting it.
                self.queue.pop_front();
                self.sqe_done(ud);
                continue;
            };
            // SAFETY: the entry's buffer pointer and length lie within the `IoBuf` of the
            // request in table slot `slot_of(ud)` (the request was validated), or within
            // `self.wake_buf` for the wake-up read; its descriptor is kept open by the
            // request's `IoFile` (or by `self.bell`). That request stays in the table, owning
            // the buffer and the file, until this SQE's CQE is reaped: its `busy` count
            // includes this SQE and the slot is freed only at zero. `wake_buf` is freed only
            // after the ring is empty or the worker leaks it. No other code touches the bytes
            // the kernel reads or writes until then.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                return; // The SQ is full; the caller submits and comes back.
            }
            self.queue.pop_front();
            self.in_ring += 1;
        }
    }

    /// The SQE for `ud`, or `None` if its request has already failed.
    fn build_sqe(&mut self, ud: u64) -> Option<squeue::Entry> {
        if ud == WAKE_TOKEN {
            let ptr: *mut u64 = &raw mut *self.wake_buf;
            let fd = types::Fd(self.bell.eventfd.as_raw_fd());
            return Some(
                opcode::Read::new(fd, ptr.cast(), 8)
                    .offset(0)
                    .build()
                    .user_data(ud),
            );
        }
        let (slot, seg) = split_user_data(ud);
        let f = self.table[slot as usize]
            .as_mut()
            .expect("an SQE for an empty table slot");
        if f.error.is_some() {
            return None;
        }
        let fd = types::Fd(f.req.file.raw_fd());
        let entry = match f.req.op {
            _ if seg == FSYNC_SEGMENT => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fsync => unreachable!("an Fsync request has only its FSYNC_SEGMENT SQE"),
            op @ (IoOp::Read | IoOp::Write { .. } | IoOp::WriteThenSync) => {
                let s = f.req.segments[seg as usize];
                let done = f.progress[seg as usize];
                let len = (s.len - done).min(MAX_SQE_LEN) as u32;
                let offset = s.file_offset + done as u64;
                let buf = f
                    .req
                    .buf
                    .as_mut()
                    .expect("validated: reads and writes carry a buffer");
                // In bounds: the request was validated, so `buf_offset + len <= buf.len()`.
                let ptr = buf.as_mut_ptr().wrapping_add(s.buf_offset + done);
                match op {
                    IoOp::Write { dsync } => opcode::Write::new(fd, ptr, len)
                        .offset(offset)
                        .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    IoOp::WriteThenSync => opcode::Write::new(fd, ptr, len).offset(offset).build(),
                    _ => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                }
            }
        };
        Some(entry.user_data(ud))
    }

    /// Submit the SQ and wait for `want` completions; transient failures are retried by the
    /// caller's next round.
    fn enter(&mut self, want: usize) {
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(err) => {
                if !self.enter_error_logged {
                    tracing::error!(%err, "io_uring_enter failed; retrying");
                    self.enter_error_logged = true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Process every CQE the ring holds.
    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        {
            let cq = self.ring.completion();
            let overflow = cq.overflow();
            if overflow != self.overflow_seen {
                tracing::error!(
                    dropped = overflow,
                    "the io_uring completion queue overflowed"
                );
                self.overflow_seen = overflow;
            }
            reaped.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
        }
        for &(ud, res) in &reaped {
            self.in_ring -= 1;
            self.on_cqe(ud, res);
        }
        reaped.clear();
        self.reaped = reaped;
    }

    /// Account for one CQE: continue, retry, record an error, or finish the request.
    fn on_cqe(&mut self, ud: u64, res: i32) {
        if ud == WAKE_TOKEN {
            self.wake_armed = false;
            if res < 0 && -res != libc::EINTR && -res != libc::EAGAIN {
                tracing::warn!(err = %io::Error::from_raw_os_error(-res), "the io_uring wake-up read failed");
            }
            self.arm_wake();
            return;
        }
        let (slot, seg) = split_user_data(ud);
        let Some(f) = self.table[slot as usize].as_mut() else {
            tracing::error!(user_data = ud, "an io_uring completion for no request");
            return;
        };
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && f.error.is_none() {
                self.queue.push_back(ud);
                return;
            }
            f.error
                .get_or_insert_with(|| io::Error::from_raw_os_error(errno));
        } else if seg != FSYNC_SEGMENT {
            let n = res as usize;
            if n == 0 {
                f.error.get_or_insert_with(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "transfer past the end of the file",
                    )
                });
            } else {
                let seg = seg as usize;
                f.progress[seg] += n;
                if f.progress[seg] < f.req.segments[seg].len && f.error.is_none() {
                    // A short transfer: submit the remainder.
                    self.queue.push_back(ud);
                    return;
                }
            }
        }
        self.sqe_done(ud);
    }

    /// One SQE of `ud`'s request is finished for good; complete the request at zero.
    fn sqe_done(&mut self, ud: u64) {
        let (slot, _) = split_user_data(ud);
        let entry = &mut self.table[slot as usize];
        let f = entry.as_mut().expect("an SQE for an empty table slot");
        f.busy -= 1;
        if f.busy > 0 {
            return;
        }
        if f.req.op == IoOp::WriteThenSync && !f.synced && f.error.is_none() {
            // The writes are done: the sync that covers them, on this thread, no round trip.
            f.synced = true;
            f.busy = 1;
            self.queue.push_back(user_data(slot, FSYNC_SEGMENT));
            return;
        }
        let f = entry.take().expect("checked above");
        self.free_slots.push(slot);
        self.live -= 1;
        let result = f.error.map_or(Ok(()), Err);
        // The receiver may be gone (the caller stopped waiting); then the buffer just drops,
        // which is safe because no SQE of this request remains in the kernel.
        let _ = f.done.send(IoCompletion {
            result,
            buf: f.req.buf,
        });
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.in_ring == 0 {
            return;
        }
        // Only reached if the thread panicked with SQEs in the kernel. The kernel may still
        // write into those buffers, so leak them rather than free them; the callers get an
        // error without their buffer when the completion senders drop.
        tracing::error!(
            in_flight = self.in_ring,
            "an io_uring thread stops with I/O in flight; leaking its buffers"
        );
        for f in self.table.iter_mut().flatten() {
            if let Some(buf) = f.req.buf.take() {
                std::mem::forget(buf);
            }
        }
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("live", &self.live)
            .field("queued", &self.queue.len())
            .field("in_ring", &self.in_ring)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

/// A ring of the calling thread's own, for a thread that runs a single-threaded tokio runtime
/// (the replica connections' network threads): a request that thread submits goes into its
/// ring at once, with no hand-off to a data-path thread, and its completion is reaped on the
/// same thread when the kernel signals the ring's eventfd, which the runtime polls. So a peer's
/// write costs no wake-up of another thread on the way in and none on the way back.
///
/// [`drive`] installs the ring and runs it; requests submitted on any other thread (or on this
/// one before `drive` started, or if the ring could not be built) go to the engine's threads
/// as before. The ring is built without cooperative task running, so a completion wakes the
/// thread even while it sleeps in `epoll_wait`.
pub mod thread_ring {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    use io_uring::IoUring;
    use tokio::io::unix::AsyncFd;

    use super::{Doorbell, Job, Worker, RING_ENTRIES};

    thread_local! {
        static RING: RefCell<Option<Worker>> = const { RefCell::new(None) };
        static TAKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Requests this thread's ring has taken so far.
    pub fn taken() -> u64 {
        TAKEN.with(std::cell::Cell::get)
    }

    /// The eventfd the kernel signals for each completion, as the runtime polls it.
    struct Signal(Arc<Doorbell>);

    impl AsRawFd for Signal {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.eventfd.as_raw_fd()
        }
    }

    /// Submit `job` on this thread's ring; gives it back if this thread has none (or the ring
    /// is busy, which only happens while it is being reaped).
    pub(super) fn submit(job: Job) -> Option<Job> {
        RING.with(|r| {
            let Ok(mut r) = r.try_borrow_mut() else {
                return Some(job);
            };
            let Some(w) = r.as_mut() else {
                return Some(job);
            };
            w.admit(job);
            TAKEN.with(|t| t.set(t.get() + 1));
            w.push_queued();
            // One `io_uring_enter` for every request this thread submits before its runtime
            // gets back to the tasks queued now (the requests of one batch of frames): the
            // kernel then issues them under one plug, with one doorbell to the device.
            if !w.submit_due {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    w.submit_due = true;
                    drop(runtime.spawn(async { submit_due() }));
                } else {
                    w.submit_now();
                }
            }
            None
        })
    }

    /// Enter the kernel with what the ring has queued (see [`submit`]).
    fn submit_due() {
        RING.with(|r| {
            if let Some(w) = r
                .try_borrow_mut()
                .ok()
                .as_deref_mut()
                .and_then(Option::as_mut)
            {
                w.submit_now();
            }
        });
    }

    impl Worker {
        /// Push what is queued, enter the kernel without waiting, and hand back the
        /// completions already there (an error, a cached read).
        fn submit_now(&mut self) {
            self.submit_due = false;
            self.push_queued();
            self.enter(0);
            self.reap();
        }
    }

    /// Whether this thread has a ring of its own.
    pub fn installed() -> bool {
        RING.with(|r| r.try_borrow().map_or(true, |r| r.is_some()))
    }

    /// Build this thread's ring and run it forever: reap completions as the kernel signals
    /// them, continue short transfers and retries. Run it as the future a single-threaded
    /// runtime blocks on (it never returns unless the ring cannot be built).
    ///
    /// # Errors
    /// The ring or its eventfd cannot be set up (then this thread has no ring).
    pub async fn drive() -> io::Result<()> {
        let bell = Arc::new(Doorbell::new()?);
        // SAFETY: `fcntl` on a descriptor we own; no pointers.
        let rc = unsafe { libc::fcntl(bell.eventfd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let ring = IoUring::new(RING_ENTRIES)?;
        ring.submitter()
            .register_eventfd(bell.eventfd.as_raw_fd())?;
        let mut worker = Worker::with_ring(ring, crossbeam_channel::never(), Arc::clone(&bell))?;
        worker.owned = true;
        // SAFETY: the eventfd is owned by `bell`, which `Signal` keeps alive for as long as
        // it is registered, and nothing closes or replaces it meanwhile.
        let ready = unsafe { AsyncFd::register(Signal(Arc::clone(&bell))) }?;
        RING.with(|r| *r.borrow_mut() = Some(worker));
        loop {
            let mut guard = ready.readable().await?;
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into the live local `count` from our non-blocking
            // eventfd; `EAGAIN` (nothing to read) is fine.
            let n = unsafe { libc::read(bell.eventfd.as_raw_fd(), (&raw mut count).cast(), 8) };
            if n < 0 {
                guard.clear_ready();
            }
            RING.with(|r| {
                let mut r = r.borrow_mut();
                let w = r.as_mut().expect("installed above");
                w.reap();
                if !w.queue.is_empty() {
                    // Continuations and retries the completions queued.
                    w.push_queued();
                    w.enter(0);
                }
            });
        }
    }
}

/// `user_data` of segment `seg` of the request in table slot `slot`.
fn user_data(slot: u32, seg: u32) -> u64 {
    (u64::from(slot) << 32) | u64::from(seg)
}

/// The `(slot, segment)` a `user_data` names.
fn split_user_data(ud: u64) -> (u32, u32) {
    ((ud >> 32) as u32, ud as u32)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;
    use crate::io::{IoBuf, IoFile, Segment};

    fn engine() -> UringEngine {
        UringEngine::start(1).expect("io_uring is available on the test machine")
    }

    fn pipe() -> (IoFile, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a live array of two descriptors for `pipe2` to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (IoFile::new(r), std::fs::File::from(w))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn user_data_round_trips() {
        for (slot, seg) in [
            (0, 0),
            (1, FSYNC_SEGMENT),
            (u32::MAX - 1, 7),
            (12, u32::MAX - 1),
        ] {
            let ud = user_data(slot, seg);
            assert_ne!(ud, WAKE_TOKEN);
            assert_eq!(split_user_data(ud), (slot, seg));
        }
    }

    /// A pipe delivers data in pieces, so the read is short and must be continued.
    #[test]
    fn short_reads_are_continued() {
        let e = engine();
        let (r, mut w) = pipe();
        let writer = std::thread::spawn(move || {
            w.write_all(&[1; 3000]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            w.write_all(&[2; 5192]).unwrap();
        });
        let c = block_on(e.submit(IoRequest::read(&r, 0, IoBuf::zeroed(8192))));
        writer.join().unwrap();
        c.result.expect("the read completes after the second write");
        let buf = c.buf.expect("buffer returned");
        assert!(buf[..3000].iter().all(|&b| b == 1));
        assert!(buf[3000..].iter().all(|&b| b == 2));
    }

    /// On a thread that drives its own ring, requests go into that ring (no engine thread)
    /// and complete there: a short pipe read is continued by the driver, and a write, an
    /// fdatasync and a read of a file round-trip.
    #[test]
    fn a_threads_own_ring_serves_its_requests() {
        let e = engine();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("ballast-thread-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = IoFile::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("f"))
                .unwrap()
                .into(),
        );
        let (r, mut w) = pipe();
        let writer = std::thread::spawn(move || {
            w.write_all(&[1; 3000]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            w.write_all(&[2; 5192]).unwrap();
        });
        let body = async {
            while !thread_ring::installed() {
                tokio::task::yield_now().await;
            }
            let before = thread_ring::taken();
            let c = e.submit(IoRequest::read(&r, 0, IoBuf::zeroed(8192))).await;
            c.result.expect("the short read is continued");
            let buf = c.buf.unwrap();
            assert!(buf[..3000].iter().all(|&b| b == 1) && buf[3000..].iter().all(|&b| b == 2));
            let req = IoRequest::write_then_sync(&file, 4096, IoBuf::from_slice(&[7; 4096]));
            e.submit(req).await.result.expect("write and sync");
            let c = e
                .submit(IoRequest::read(&file, 4096, IoBuf::zeroed(4096)))
                .await;
            c.result.expect("read back");
            assert!(c.buf.unwrap().iter().all(|&b| b == 7));
            assert_eq!(
                thread_ring::taken() - before,
                3,
                "every request went into this thread's ring"
            );
        };
        rt.block_on(async {
            tokio::select! {
                r = thread_ring::drive() => panic!("the driver stopped: {r:?}"),
                () = body => {}
            }
        });
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Another thread has no ring of its own: its requests go to the engine's threads.
        assert!(!std::thread::spawn(thread_ring::installed).join().unwrap());
    }

    #[test]
    fn zero_byte_read_is_unexpected_eof() {
        let e = engine();
        let (r, mut w) = pipe();
        w.write_all(&[9; 100]).unwrap();
        drop(w);
        let c = block_on(e.submit(IoRequest::read(&r, 0, IoBuf::zeroed(4096))));
        assert_eq!(c.result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let buf = c.buf.expect("buffer returned on error");
        assert_eq!(buf.len(), 4096);
        assert!(buf[..100].iter().all(|&b| b == 9));
    }

    #[test]
    fn offsets_io_uring_would_misread_are_refused() {
        let e = engine();
        let (r, _w) = pipe();
        let mut req = IoRequest::read(&r, 0, IoBuf::zeroed(4096));
        req.segments = vec![Segment {
            file_offset: u64::MAX,
            buf_offset: 0,
            len: 4096,
        }];
        let c = block_on(e.submit(req));
        assert_eq!(c.result.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(c.buf.is_some());
    }

    /// A submitter racing its worker as it goes to sleep, with delays swept from "still
    /// awake" to "long asleep". Each engine has a single submitter, so a lost wake-up leaves its
    /// request waiting forever, which the timeout turns into a failure.
    #[test]
    fn wake_ups_are_never_lost() {
        let threads: Vec<_> = (0..2_u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let e = UringEngine::start(1).unwrap();
                    let zero = IoFile::new(std::fs::File::open("/dev/zero").unwrap().into());
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    for i in 0..3000_u64 {
                        // Busy-wait 0-160 µs: the worker may be awake, dozing off or asleep.
                        let delay = Duration::from_micros((i * 7 + t * 13) % 161);
                        let start = std::time::Instant::now();
                        while start.elapsed() < delay {
                            std::hint::spin_loop();
                        }
                        let c = rt
                            .block_on(async {
                                let c = e.submit(IoRequest::read(
                                    &zero,
                                    0,
                                    IoBuf::from_slice(&[1; 512]),
                                ));
                                tokio::time::timeout(Duration::from_secs(5), c).await
                            })
                            .expect("a request was never completed: lost wake-up");
                        c.result.unwrap();
                        assert!(c.buf.unwrap().iter().all(|&b| b == 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// More requests than the SQ and CQ hold, all queued before the worker can drain them,
    /// then the engine is dropped: every request still completes.
    #[test]
    fn drop_completes_queued_work() {
        let e = UringEngine::start(2).unwrap();
        let (r, mut w) = pipe();
        let data = vec![5u8; 1024 * 64];
        let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
        let completions: Vec<_> = (0..1024)
            .map(|_| e.submit(IoRequest::read(&r, 0, IoBuf::zeroed(64))))
            .collect();
        writer.join().unwrap();
        drop(e);
        block_on(async {
            for c in completions {
                let c = c.await;
                c.result.unwrap();
                assert!(c.buf.unwrap().iter().all(|&b| b == 5));
            }
        });
    }
}
