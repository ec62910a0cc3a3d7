//! A multi-threaded FUSE session: mounting, the worker threads, replies.
//!
//! The daemon mounts with `mount(2)` directly (it runs as root), then clones the `/dev/fuse`
//! descriptor with `FUSE_DEV_IOC_CLONE` once per worker thread. Each worker blocks reading
//! requests from its own descriptor and replies on it; the kernel spreads requests over the
//! workers. A local volume's data request runs to completion on the worker that read it; a
//! replicated volume's is handed to the daemon's runtime and answered from there, so one
//! worker keeps many of those in flight (see `VolumeFs::serve`).
//!
//! Copies: a request is read with `readv` into an 80-byte header buffer and a 4 KiB-aligned
//! [`IoBuf`]. A `WRITE`'s header and `fuse_write_in` are exactly those 80 bytes, so its
//! payload lands aligned in the `IoBuf`, which goes to the engine as it is (large writes; the
//! worker takes a fresh buffer from [`volume::io::pool`]) or is copied once into a right-sized
//! buffer (small writes, where a 4 KiB copy is cheaper than tying up a 1 MiB buffer). Read
//! data goes from the engine's buffer to the kernel in one `writev`, without a copy.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use volume::io::{pool, IoBuf};

use super::abi;
use super::VolumeFs;

/// The largest request payload (and `max_read`): 1 MiB, i.e. 256 pages.
pub const MAX_IO: usize = pool::POOL_BUF;

/// `FUSE_NOTIFY_RESEND`: the kernel queues again every request read and not answered.
const NOTIFY_RESEND: i32 = 7;

/// Set when the daemon hands its session over to the next one ([`freeze`]).
static FROZEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Hand the session over: from now on no request is started and none is answered. What is
/// in flight stays unanswered, and the next daemon serves it again after
/// `FUSE_NOTIFY_RESEND`. (Not even successes: a write that completes while storage closes
/// may miss the last commit, and a failure there is the closing, not the request.)
pub fn freeze() {
    FROZEN.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn frozen() -> bool {
    FROZEN.load(std::sync::atomic::Ordering::SeqCst)
}

/// Workers that stopped reading since the session was frozen.
static PARKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The signal that interrupts a frozen worker's read (its handler does nothing).
fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn ignore_wake(_: libc::c_int) {}

/// A frozen worker reads no more: the next daemon shares its `/dev/fuse` file descriptions,
/// and a request read here after that daemon's `FUSE_NOTIFY_RESEND` would never be answered.
fn park_forever() -> ! {
    PARKED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    loop {
        std::thread::park();
    }
}

/// Where a request came from, and so where its reply goes: a `/dev/fuse` descriptor of the
/// session, or a queue of its io_uring transport ([`super::ring`]).
#[derive(Debug)]
pub struct Channel {
    to: Kind,
}

#[derive(Debug)]
enum Kind {
    Dev(OwnedFd),
    Ring(Arc<super::ring::Queue>),
}

impl Channel {
    /// The channel of a ring queue.
    pub(super) fn ring(queue: Arc<super::ring::Queue>) -> Self {
        Self {
            to: Kind::Ring(queue),
        }
    }

    /// The `/dev/fuse` descriptor, unless this is a ring queue.
    pub(super) fn dev_fd(&self) -> Option<RawFd> {
        match &self.to {
            Kind::Dev(fd) => Some(fd.as_raw_fd()),
            Kind::Ring(_) => None,
        }
    }

    /// Reply to `unique` with success and a body made of `parts`.
    pub fn reply(&self, unique: u64, parts: &[&[u8]]) {
        self.send(unique, 0, parts);
    }

    /// Reply to `unique` with `errno`.
    pub fn error(&self, unique: u64, errno: i32) {
        self.send(unique, -errno, &[]);
    }

    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        if frozen() {
            return;
        }
        let fd = match &self.to {
            Kind::Dev(fd) => fd,
            Kind::Ring(queue) => {
                if !queue.answer(unique, error, parts) {
                    tracing::debug!(unique, "a FUSE reply to a request not being served");
                }
                return;
            }
        };
        let len = abi::OUT_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut header = [0u8; abi::OUT_HEADER];
        header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&error.to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        let mut iov = Vec::with_capacity(parts.len() + 1);
        iov.push(libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        });
        iov.extend(parts.iter().filter(|p| !p.is_empty()).map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        }));
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points into a live slice of the stated length (and `count` never
        // exceeds `iov.len()`); the kernel only reads from them.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), count) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the request was interrupted or the connection aborted meanwhile.
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!(error = %e, unique, "cannot send a FUSE reply");
            }
        }
    }
}

/// How requests reach the filesystem; chosen once, at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Worker threads read `/dev/fuse`.
    #[default]
    Classic,
    /// FUSE over io_uring ([`super::ring`]), with two `/dev/fuse` workers for what stays
    /// there; falls back to `Classic` (logged) where the kernel lacks it.
    IoUring,
}

/// A mounted session. Dropping it does not unmount.
#[derive(Debug)]
pub struct Session {
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The `/dev/fuse` descriptors the workers read (each clone included).
    channels: Vec<Arc<Channel>>,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// Where `/dev/fuse` descriptors are numbered from: half the soft descriptor limit, at most
/// 4096 (the daemon raises its soft limit to the hard one at start, see
/// [`crate::attach::raise_fd_limit`]).
///
/// Why: when the daemon dies, the kernel closes its descriptors and defers each release to the
/// exiting task's work list, which runs last-in first-out, so higher numbers are released
/// first. A loop device's release can wait on its disk's open mutex, held by another opener
/// (`blkid`, udev) whose read is waiting on this FUSE connection; the connection only aborts
/// once its last `/dev/fuse` descriptor is released. Keeping those descriptors numbered above
/// every loop device's makes them go first, so the reads fail with an error instead of
/// hanging with the dead daemon's loop release behind them.
fn dev_fd_floor() -> libc::c_int {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 0;
    }
    libc::c_int::try_from((lim.rlim_cur / 2).min(4096)).unwrap_or(0)
}

fn open_dev() -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_DUPFD_CLOEXEC takes an int floor and returns a new descriptor or -1.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, dev_fd_floor()) };
    if high < 0 {
        // Every number above the floor is taken: keep the low one (only the release order on
        // a crash is lost, see `dev_fd_floor`).
        tracing::debug!(error = %io::Error::last_os_error(), "cannot move a /dev/fuse descriptor up");
        return Ok(fd);
    }
    // SAFETY: `high` was just returned by F_DUPFD and is owned by nobody else; the low
    // descriptor is closed when `fd` drops.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

pub(super) fn clone_dev(session: RawFd) -> io::Result<OwnedFd> {
    let fd = open_dev()?;
    let src = session as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source descriptor) from the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), abi::DEV_IOC_CLONE, &src) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

impl Session {
    /// Mount `fs` at `mountpoint` and start `workers` threads serving it (two with the
    /// io_uring transport, which starts its queues once the kernel sends `INIT`).
    ///
    /// # Errors
    /// `/dev/fuse` cannot be opened or cloned, or the mount fails.
    pub fn mount(
        mountpoint: &Path,
        fs: &Arc<VolumeFs>,
        workers: usize,
        transport: Transport,
    ) -> io::Result<Self> {
        let mut workers = workers;
        if transport == Transport::IoUring {
            match super::ring::enable() {
                Ok(()) => {
                    fs.want_ring();
                    workers = 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no FUSE over io_uring; requests go through /dev/fuse");
                }
            }
        }
        let fd = open_dev()?;
        let target = cstr(mountpoint.as_os_str().as_encoded_bytes())?;
        // `allow_other` lets root in any context (the loop driver, containers) in;
        // `default_permissions` makes the kernel check the files' modes (0600, root's), so no
        // other user opens a volume even if the data directory's mode is loosened.
        let data = cstr(
            format!(
                "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_IO}",
                fd.as_raw_fd()
            )
            .as_bytes(),
        )?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"ballast".as_ptr(),
                target.as_ptr(),
                c"fuse.ballast".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME,
                data.as_ptr().cast(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::with_capacity(workers.max(1));
        for _ in 1..workers.max(1) {
            match clone_dev(fd.as_raw_fd()) {
                Ok(c) => fds.push(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot clone /dev/fuse; fewer FUSE workers");
                    break;
                }
            }
        }
        fds.insert(0, fd);
        Self::serve(fds, fs)
    }

    /// Start one worker thread per descriptor.
    fn serve(fds: Vec<OwnedFd>, fs: &Arc<VolumeFs>) -> io::Result<Self> {
        let n = fds.len();
        let mut handles = Vec::with_capacity(n);
        let mut channels = Vec::with_capacity(n);
        for (i, fd) in fds.into_iter().enumerate() {
            let ch = Arc::new(Channel { to: Kind::Dev(fd) });
            channels.push(ch.clone());
            let fs = fs.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || worker(&ch, &fs))?,
            );
        }
        tracing::debug!(workers = n, "FUSE session started");
        Ok(Self {
            workers: handles,
            channels,
        })
    }

    /// Take over a session that an earlier daemon mounted, from its `/dev/fuse` descriptors
    /// (kept by the holder, see [`crate::attach::holder`]): serve them, then have the kernel
    /// send again every request that daemon read and did not answer. `INIT` is never sent
    /// again; the kernel keeps what the first daemon negotiated.
    ///
    /// # Errors
    /// No descriptor was given, a worker cannot be started, or the kernel refuses the
    /// notification (then the session is not usable).
    pub fn adopt(fds: Vec<OwnedFd>, fs: &Arc<VolumeFs>) -> io::Result<Self> {
        if fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no /dev/fuse descriptor to take over",
            ));
        }
        let session = Self::serve(fds, fs)?;
        let mut notify = [0u8; abi::OUT_HEADER];
        notify[0..4].copy_from_slice(&(abi::OUT_HEADER as u32).to_ne_bytes());
        notify[4..8].copy_from_slice(&NOTIFY_RESEND.to_ne_bytes());
        let fd = session.channels[0]
            .dev_fd()
            .expect("adopted channels are /dev/fuse descriptors");
        // SAFETY: writes the 16 bytes of a live local buffer.
        let r = unsafe { libc::write(fd, notify.as_ptr().cast(), notify.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(session)
    }

    /// Hand the session over ([`freeze`]) and wait until none of its `/dev/fuse` workers reads
    /// any more (each is interrupted by a signal and parks), so that this process, even if
    /// it lives on (`--after-hand-over wait`), takes no request that the next daemon's
    /// `FUSE_NOTIFY_RESEND` has already passed. `false` if some worker did not park within
    /// `within`.
    pub fn freeze_and_stop_reading(&self, within: std::time::Duration) -> bool {
        use std::os::unix::thread::JoinHandleExt;
        freeze();
        let handler = libc::sigaction {
            sa_sigaction: ignore_wake as extern "C" fn(libc::c_int) as libc::sighandler_t,
            // No SA_RESTART: a read waiting in /dev/fuse returns EINTR.
            sa_flags: 0,
            // SAFETY: an all-zero sigset is a valid empty set.
            sa_mask: unsafe { std::mem::zeroed() },
            sa_restorer: None,
        };
        // SAFETY: installs a handler that touches nothing, for a signal nothing else uses.
        if unsafe { libc::sigaction(wake_signal(), &raw const handler, std::ptr::null_mut()) } != 0
        {
            return false;
        }
        let deadline = std::time::Instant::now() + within;
        // Every worker parked, or ended (the session was unmounted under it).
        let stopped = || {
            PARKED.load(std::sync::atomic::Ordering::SeqCst)
                + self.workers.iter().filter(|w| w.is_finished()).count()
        };
        while stopped() < self.workers.len() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            for w in self.workers.iter().filter(|w| !w.is_finished()) {
                // SAFETY: the thread is alive (not finished, and never joined elsewhere).
                unsafe { libc::pthread_kill(w.as_pthread_t(), wake_signal()) };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// The `/dev/fuse` descriptors of the session (for the holder).
    pub fn dev_fds(&self) -> Vec<RawFd> {
        self.channels.iter().filter_map(|c| c.dev_fd()).collect()
    }

    /// How many worker threads serve the session.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

/// Read and dispatch requests until the session ends (`ENODEV` after unmount).
fn worker(ch: &Arc<Channel>, fs: &Arc<VolumeFs>) {
    let fd = ch.dev_fd().expect("a worker reads a /dev/fuse descriptor");
    let mut head = [0u8; abi::HEAD];
    let mut data = IoBuf::zeroed(MAX_IO);
    loop {
        if frozen() {
            park_forever();
        }
        data.set_len(data.capacity());
        let iov = [
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            },
        ];
        // SAFETY: both iovecs point at owned, writable buffers of the stated lengths, which
        // nothing else references during the call.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                Some(libc::ENODEV) => return, // unmounted
                _ => {
                    tracing::error!(error = %e, "FUSE worker stops: cannot read /dev/fuse");
                    return;
                }
            }
        }
        if frozen() {
            // Handed over: the next daemon serves it after RESEND.
            park_forever();
        }
        let n = n as usize;
        let Some((h, write_in)) = abi::parse_head(&head[..n.min(head.len())]) else {
            tracing::warn!(bytes = n, "short FUSE request ignored");
            continue;
        };
        if let Some(write_in) = write_in {
            // A whole `fuse_write_in`: `n >= head.len()`, the payload is in `data`.
            let len = n - head.len();
            let payload = if len >= pool::POOL_MIN {
                data.set_len(len);
                std::mem::replace(&mut data, pool::take(MAX_IO))
            } else {
                IoBuf::from_slice(&data[..len])
            };
            fs.write(ch, h, write_in, payload);
        } else if n <= head.len() {
            fs.dispatch(ch, h, &head[abi::IN_HEADER..n]);
        } else {
            let mut body = Vec::with_capacity(n - abi::IN_HEADER);
            body.extend_from_slice(&head[abi::IN_HEADER..]);
            body.extend_from_slice(&data[..n - head.len()]);
            fs.dispatch(ch, h, &body);
        }
        if h.opcode == abi::op::DESTROY {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/dev/fuse` descriptor is numbered above the descriptors opened after it, so a dying
    /// daemon releases it before its loop devices (see `dev_fd_floor`).
    #[test]
    fn dev_descriptors_are_numbered_above_later_files() {
        crate::attach::raise_fd_limit().unwrap();
        let dev = open_dev().unwrap();
        let later = std::fs::File::open("/dev/null").unwrap();
        assert!(
            dev.as_raw_fd() > later.as_raw_fd(),
            "/dev/fuse got {}, a later file {}",
            dev.as_raw_fd(),
            later.as_raw_fd()
        );
        assert!(dev.as_raw_fd() >= dev_fd_floor());
    }
}
