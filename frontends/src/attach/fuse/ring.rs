//! FUSE over io_uring (Linux 6.14+): the other request transport, chosen at start-up with
//! `--fuse-transport io-uring`.
//!
//! The kernel hands requests to ring entries the server registered instead of to `read(2)`
//! on `/dev/fuse`, and takes the reply and the next request in one `URING_CMD`
//! (`COMMIT_AND_FETCH`). It keeps one queue per possible CPU and puts a request on the queue
//! of the CPU its sender runs on; every queue needs entries before the ring is used.
//!
//! Here each queue has a thread of its own (`fuse-ring-N`) with a single-threaded tokio
//! runtime. That thread owns the queue's io_uring and also an engine ring
//! ([`volume::io::uring::thread_ring`]), so a one-replica volume's request is read, its I/O
//! submitted and completed, and its reply committed on one thread, with any number in flight.
//! A replicated volume's request runs on the same runtime; its replicas answer through the
//! network threads.
//!
//! Still on `/dev/fuse` (the classic workers, kept at two in this mode): `INIT`, `FORGET`,
//! requests sent before every queue has entries, and notifications.
//!
//! Copies: a write's payload is copied once from the entry's buffer into an engine buffer
//! (the entry's buffer is registered with the kernel and cannot be handed away), and read
//! data once into the entry's buffer.
//!
//! Layouts follow `<linux/fuse.h>` (protocol 7.42): `struct fuse_uring_req_header` and
//! `struct fuse_uring_cmd_req`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use volume::io::{pool, IoBuf};

use super::abi::{self, InHeader, WriteIn};
use super::session::{Channel, MAX_IO};
use super::VolumeFs;

/// `FUSE_IO_URING_CMD_REGISTER`.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `sizeof(struct fuse_uring_req_header)`: `in_out[128]`, `op_in[128]`, `ring_ent_in_out`.
const HEADER: usize = 288;
/// Where `op_in` starts in the header: the opcode's own struct (`fuse_write_in`, …).
const OP_IN: usize = 128;
/// Where `ring_ent_in_out.payload_sz` is in the header.
const PAYLOAD_SZ: usize = 256 + 16;
/// Entries per queue: the loop device sends up to 128 requests at once, and all of one
/// sender's go to the queue of the CPU it runs on.
const ENTRIES: usize = 64;
/// The module parameter that lets the kernel offer the transport.
const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Let the kernel offer FUSE over io_uring to new mounts (root only).
///
/// # Errors
/// The kernel has no such transport, or the parameter cannot be set.
pub fn enable() -> io::Result<()> {
    let now = std::fs::read_to_string(PARAM).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{PARAM}: {e} (the kernel has no FUSE over io_uring; it needs 6.14+ with CONFIG_FUSE_IO_URING)"),
        )
    })?;
    if now.trim() == "Y" {
        return Ok(());
    }
    std::fs::write(PARAM, "Y").map_err(|e| io::Error::new(e.kind(), format!("{PARAM}: {e}")))
}

/// The possible CPUs, one queue each (`/sys/devices/system/cpu/possible`, e.g. `0-3,6`).
fn possible_cpus() -> io::Result<Vec<u16>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(text.trim())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("CPU list {text:?}")))
}

fn parse_cpu_list(s: &str) -> Option<Vec<u16>> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
        if b < a {
            return None;
        }
        cpus.extend(a..=b);
    }
    Some(cpus)
}

/// One ring entry's buffers, registered with the kernel for the queue's lifetime.
struct Slot {
    head: *mut u8,
    payload: *mut u8,
    /// The `iovec[2]` the REGISTER command points at.
    iov: Box<[libc::iovec; 2]>,
}

/// One queue: its entries and the replies waiting to be committed.
pub struct Queue {
    qid: u16,
    /// The `/dev/fuse` clone the commands go to.
    dev: OwnedFd,
    slots: Box<[Slot]>,
    /// Owns the memory the slots point into; never touched otherwise.
    _bufs: Vec<IoBuf>,
    /// Requests being served: unique → slot.
    serving: Mutex<HashMap<u64, usize>>,
    /// Answered requests to commit: (slot, unique).
    answered: Mutex<Vec<(usize, u64)>>,
    /// Signalled by the kernel for each completion and by a reply made on another thread.
    wake: OwnedFd,
}

// SAFETY: the raw pointers point into `_bufs`, which the queue owns and never frees while it
// lives. A slot's bytes are written by one party at a time: the kernel while the entry is
// armed; the thread that reads its completion until it is in `serving`; then the one replier
// that removes it from `serving` (under that mutex) until it is committed.
unsafe impl Send for Queue {}
// SAFETY: as above; all other state is behind mutexes or immutable.
unsafe impl Sync for Queue {}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("qid", &self.qid)
            .finish_non_exhaustive()
    }
}

/// A queue's ring: SQE128 for `URING_CMD`.
type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

thread_local! {
    /// The ring of the queue this thread serves, and whether a commit is already scheduled.
    static RING: RefCell<Option<(Ring, Arc<Queue>)>> = const { RefCell::new(None) };
    static COMMIT_DUE: Cell<bool> = const { Cell::new(false) };
    /// Requests of the current batch of completions not yet taken.
    static BATCH_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// Whether this thread serves a ring queue (requests then run as tasks on its runtime).
pub fn on_ring_thread() -> bool {
    RING.with(|r| r.try_borrow().map_or(true, |r| r.is_some()))
}

/// Whether the request being taken on this ring thread is the only one its queue has: none
/// other in flight and none waiting in this batch of completions. Such a request may run
/// inline, start to finish, at the latency of a plain system call; nothing waits behind it.
pub fn alone() -> bool {
    BATCH_LEFT.with(Cell::get) == 0
        && RING.with(|r| {
            r.try_borrow().ok().is_some_and(|r| {
                r.as_ref()
                    .is_some_and(|(_, q)| q.serving.lock().expect("serving lock").len() <= 1)
            })
        })
}

impl Queue {
    fn new(qid: u16, dev: OwnedFd) -> io::Result<Self> {
        let mut bufs = Vec::with_capacity(2 * ENTRIES);
        let mut slots = Vec::with_capacity(ENTRIES);
        for _ in 0..ENTRIES {
            let mut head = IoBuf::zeroed(HEADER);
            let mut payload = IoBuf::zeroed(MAX_IO);
            let (h, p) = (head.as_mut_ptr(), payload.as_mut_ptr());
            slots.push(Slot {
                head: h,
                payload: p,
                iov: Box::new([
                    libc::iovec {
                        iov_base: h.cast(),
                        iov_len: HEADER,
                    },
                    libc::iovec {
                        iov_base: p.cast(),
                        iov_len: MAX_IO,
                    },
                ]),
            });
            bufs.push(head);
            bufs.push(payload);
        }
        // SAFETY: eventfd takes no pointers; the result is checked.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            qid,
            dev,
            slots: slots.into_boxed_slice(),
            _bufs: bufs,
            serving: Mutex::new(HashMap::new()),
            answered: Mutex::new(Vec::new()),
            // SAFETY: just created, owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
        })
    }

    /// The `URING_CMD` SQE for slot `i`: register it, or commit `unique`'s reply and fetch.
    fn sqe(&self, i: usize, cmd_op: u32, unique: u64) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&unique.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd_op)
            .cmd(cmd)
            .addr(Some(self.slots[i].iov.as_ptr() as u64))
            .build()
            .user_data(i as u64);
        with_len(sqe, 2)
    }

    /// Answer `unique`: put the reply in its slot and queue the commit. `false` if `unique`
    /// is not a request of this queue being served (already answered).
    pub fn answer(&self, unique: u64, error: i32, parts: &[&[u8]]) -> bool {
        let Some(i) = self.serving.lock().expect("serving lock").remove(&unique) else {
            return false;
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let (error, len) = if len > MAX_IO {
            tracing::error!(unique, len, "a FUSE reply is larger than a ring entry");
            (-libc::EIO, 0)
        } else {
            (error, len)
        };
        let s = &self.slots[i];
        let mut out = [0u8; abi::OUT_HEADER];
        out[0..4].copy_from_slice(&((abi::OUT_HEADER + len) as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&error.to_ne_bytes());
        out[8..16].copy_from_slice(&unique.to_ne_bytes());
        // SAFETY: this thread took slot `i` out of `serving`, so it alone writes it until the
        // commit (see the `Send` impl); every copy stays within the slot's buffers (the
        // header's first 16 bytes and `payload_sz`; `len <= MAX_IO` payload bytes).
        unsafe {
            std::ptr::copy_nonoverlapping(out.as_ptr(), s.head, out.len());
            let sz = if error == 0 { len as u32 } else { 0 };
            std::ptr::copy_nonoverlapping(sz.to_ne_bytes().as_ptr(), s.head.add(PAYLOAD_SZ), 4);
            if error == 0 {
                let mut at = s.payload;
                for p in parts {
                    std::ptr::copy_nonoverlapping(p.as_ptr(), at, p.len());
                    at = at.add(p.len());
                }
            }
        }
        self.answered
            .lock()
            .expect("answered lock")
            .push((i, unique));
        self.kick();
        true
    }

    /// Get the answered requests committed: by a task on this queue's own thread (one
    /// `io_uring_enter` for all the replies made before it runs), or by waking that thread.
    fn kick(&self) {
        let own = RING.with(|r| {
            r.try_borrow()
                .ok()
                .and_then(|r| r.as_ref().map(|(_, q)| std::ptr::eq(Arc::as_ptr(q), self)))
                .unwrap_or(false)
        });
        if own {
            if !COMMIT_DUE.with(|d| d.replace(true)) {
                drop(tokio::spawn(async { commit_answered() }));
            }
            return;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// Set the SQE's `len` field (the io-uring crate's `UringCmd80` has no setter for it).
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: `Entry128` is `repr(C)` over the kernel's 128-byte `struct io_uring_sqe`, plain
    // bytes with no invalid values; `len` is the `u32` at offset 24.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute(bytes) }
}

/// Commit every answered request of this thread's queue.
fn commit_answered() {
    COMMIT_DUE.with(|d| d.set(false));
    RING.with(|r| {
        let Ok(mut r) = r.try_borrow_mut() else {
            return;
        };
        let Some((ring, queue)) = r.as_mut() else {
            return;
        };
        let answered = std::mem::take(&mut *queue.answered.lock().expect("answered lock"));
        for (i, unique) in answered {
            let sqe = queue.sqe(i, CMD_COMMIT_AND_FETCH, unique);
            push(ring, &sqe);
        }
        if let Err(e) = ring.submit() {
            tracing::warn!(error = %e, "cannot submit FUSE ring commits");
        }
    });
}

fn push(ring: &mut Ring, sqe: &squeue::Entry128) {
    loop {
        // SAFETY: the SQE points at a slot's iovecs, which the queue keeps alive and in place
        // for as long as the ring exists.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        // Full: hand what is queued to the kernel and retry.
        if let Err(e) = ring.submit() {
            tracing::warn!(error = %e, "cannot submit to a FUSE ring");
        }
    }
}

/// The eventfd as the runtime polls it.
struct Wake(RawFd);

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Start serving through io_uring: one thread per possible CPU, each registering its queue's
/// entries. Call right after the `INIT` reply that asked for the transport went out.
///
/// # Errors
/// A thread or its queue cannot be set up (then requests keep going through `/dev/fuse`
/// only if no queue registered; see the log).
pub fn start(session: RawFd, fs: &Arc<VolumeFs>) -> io::Result<usize> {
    let cpus = possible_cpus()?;
    for &qid in &cpus {
        let dev = super::session::clone_dev(session)?;
        let queue = Arc::new(Queue::new(qid, dev)?);
        let fs = fs.clone();
        std::thread::Builder::new()
            .name(format!("fuse-ring-{qid}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        return tracing::error!(error = %e, qid, "no runtime for a FUSE ring queue")
                    }
                };
                runtime.block_on(async move {
                    tokio::spawn(async {
                        if let Err(e) = volume::io::uring::thread_ring::drive().await {
                            tracing::warn!(error = %e, "a FUSE ring thread has no engine ring; its I/O goes through the engine's threads");
                        }
                    });
                    if let Err(e) = serve(queue, &fs).await {
                        tracing::error!(error = %e, qid, "a FUSE ring queue stopped");
                    }
                });
            })?;
    }
    Ok(cpus.len())
}

/// Register the queue's entries and serve its requests until the connection ends.
async fn serve(queue: Arc<Queue>, fs: &Arc<VolumeFs>) -> io::Result<()> {
    let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build((2 * ENTRIES) as u32)?;
    ring.submitter().register_eventfd(queue.wake.as_raw_fd())?;
    let ch = Arc::new(Channel::ring(queue.clone()));
    RING.with(|r| *r.borrow_mut() = Some((ring, queue.clone())));
    RING.with(|r| -> io::Result<()> {
        let mut r = r.borrow_mut();
        let (ring, queue) = r.as_mut().expect("installed above");
        for i in 0..queue.slots.len() {
            let sqe = queue.sqe(i, CMD_REGISTER, 0);
            push(ring, &sqe);
        }
        ring.submit()?;
        Ok(())
    })?;
    // SAFETY: the eventfd is owned by `queue`, which this function holds until `ready` (and
    // with it the registration) is dropped; nothing closes it meanwhile.
    let ready = unsafe { AsyncFd::register(Wake(queue.wake.as_raw_fd())) }?;
    let mut live = queue.slots.len();
    let mut done = Vec::new();
    while live > 0 {
        let mut guard = ready.readable().await?;
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd.
        let n = unsafe { libc::read(queue.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
        if n < 0 {
            guard.clear_ready();
        }
        RING.with(|r| {
            if let Some((ring, _)) = r.borrow_mut().as_mut() {
                done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            }
        });
        let mut left = done.len();
        for (ud, res) in done.drain(..) {
            left -= 1;
            if res < 0 {
                // The entry is gone: the connection ended (ENOTCONN), or it was refused.
                if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                    tracing::warn!(error = %io::Error::from_raw_os_error(-res), qid = queue.qid, "a FUSE ring entry failed");
                }
                live -= 1;
                continue;
            }
            BATCH_LEFT.with(|b| b.set(left));
            take(&queue, ud as usize, &ch, fs);
        }
        BATCH_LEFT.with(|b| b.set(0));
        commit_answered();
    }
    RING.with(|r| r.borrow_mut().take());
    tracing::debug!(qid = queue.qid, "FUSE ring queue ended");
    Ok(())
}

/// Serve the request the kernel put in slot `i`.
fn take(queue: &Queue, i: usize, ch: &Arc<Channel>, fs: &VolumeFs) {
    let s = &queue.slots[i];
    let mut head = [0u8; PAYLOAD_SZ + 4];
    // SAFETY: the kernel filled the slot and completed its command; nobody else touches it
    // until it is committed. The copy stays within the header buffer.
    unsafe { std::ptr::copy_nonoverlapping(s.head, head.as_mut_ptr(), head.len()) };
    let Some(h) = InHeader::parse(&head) else {
        return;
    };
    let size = (abi::u32_at(&head, PAYLOAD_SZ) as usize).min(MAX_IO);
    let op_len = (h.len as usize)
        .saturating_sub(abi::IN_HEADER + size)
        .min(PAYLOAD_SZ - OP_IN - 16);
    let op = &head[OP_IN..OP_IN + op_len];
    // SAFETY: as above; `size <= MAX_IO`, the payload buffer's length. The slice is dropped
    // before the slot is put in `serving`, from where a reply may write it.
    let payload = unsafe { std::slice::from_raw_parts(s.payload, size) };
    let write = if h.opcode == abi::op::WRITE {
        WriteIn::parse(op).map(|w| {
            let mut data = pool::take(size);
            data.copy_from_slice(payload);
            (w, data)
        })
    } else {
        None
    };
    let body = if write.is_none() && size > 0 {
        let mut b = op.to_vec();
        b.extend_from_slice(payload);
        Some(b)
    } else {
        None
    };
    queue
        .serving
        .lock()
        .expect("serving lock")
        .insert(h.unique, i);
    match (write, body) {
        (Some((w, data)), _) => fs.write(ch, h, w, data),
        (None, Some(body)) => fs.dispatch(ch, h, &body),
        (None, None) => fs.dispatch(ch, h, op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_parsed() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0-1,4,6-7"), Some(vec![0, 1, 4, 6, 7]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_sqe_length_lands_in_the_kernels_field() {
        let sqe = opcode::UringCmd80::new(types::Fd(5), CMD_REGISTER)
            .addr(Some(0x1234))
            .build();
        let bytes: [u8; 128] = unsafe { std::mem::transmute(with_len(sqe, 2)) };
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2);
        assert_eq!(
            u64::from_ne_bytes(bytes[16..24].try_into().unwrap()),
            0x1234
        );
        assert_eq!(i32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 5);
    }
}
