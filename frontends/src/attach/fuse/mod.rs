//! The FUSE filesystem that shows each attached volume as one regular file.
//!
//! The root directory lists one file per attached volume, named after it and as large as the
//! volume. Files are opened with `FOPEN_DIRECT_IO`, so the kernel sends every read and write
//! straight here (no page cache in between), and the loop device on top runs with direct I/O.
//!
//! Data path: several worker threads ([`session`]) each read requests from their own clone of
//! the `/dev/fuse` descriptor. A worker takes a clone of the volume's [`VolumeDevice`] under a
//! short read lock of the [`Registry`]. A local (one-replica) volume's request runs to
//! completion on that worker: the engine executes its I/O inline on the thread, and the worker
//! replies and reads the next request, with no thread hand-off. A replicated volume's request
//! goes to a task on the daemon's tokio runtime, which replies when its replicas answer, so
//! the worker keeps reading meanwhile. The session asks the kernel for asynchronous
//! direct I/O and a deep background queue, and opens files with parallel direct writes, so
//! the loop device's queue depth reaches the engine. No lock is held across I/O; see
//! [`session`] for how copies are avoided.
//!
//! Mapping: read → `read`, write → `write` (FUA when the file was opened `O_SYNC`/`O_DSYNC`),
//! fsync → `flush`, fallocate `PUNCH_HOLE` → `discard`, `ZERO_RANGE` → `write_zeroes`.
//! Requests that are not 4 KiB aligned are widened (reads) or refused with `EINVAL` (writes);
//! the loop device above always sends aligned requests.

pub mod abi;
pub mod ring;
pub mod session;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock, Weak};

use volume::device::{BlockDevice, WriteFlags};
use volume::io::{pool, IoBuf};

use self::abi::{op, Attr, InHeader, Request, WriteIn, ROOT_ID};
use self::session::{Channel, MAX_IO};
use replication::device::VolumeDevice;

const BLOCK: u64 = 4096;
/// Seconds the kernel may cache names and attributes.
const TTL: u64 = 1;
/// Open flags that make every write durable on completion.
const SYNC_FLAGS: u32 = (libc::O_SYNC | libc::O_DSYNC).unsigned_abs();
/// Requests the kernel may have outstanding in the background (async direct I/O).
const MAX_BACKGROUND: u16 = 512;

/// One attached volume as the filesystem sees it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    device: VolumeDevice,
    /// Which attachment of `name` this is: a file handle opened under one attachment is bound
    /// to it (see [`Handle`]), so a loop device left open across a detach never reaches the
    /// next attachment of the same name.
    generation: u64,
}

/// A FUSE file handle: the attachment's generation, and whether writes through it must be
/// durable on completion (`O_SYNC`/`O_DSYNC` opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle {
    generation: u64,
    sync: bool,
}

impl Handle {
    fn encode(self) -> u64 {
        self.generation << 1 | u64::from(self.sync)
    }

    fn decode(fh: u64) -> Self {
        Self {
            generation: fh >> 1,
            sync: fh & 1 != 0,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    by_ino: HashMap<u64, Entry>,
    by_name: HashMap<String, u64>,
    next_ino: u64,
    generations: u64,
    /// Attachments of a session this daemon took over from the one before it, not attached
    /// again yet: inode → generation. Their requests wait until they are ([`Registry::get`]).
    waiting: HashMap<u64, u64>,
    /// Where the table is saved for the next daemon ([`Registry::save_to`]).
    file: Option<std::path::PathBuf>,
}

/// The part of the table a daemon that takes the session over needs: every name's inode
/// number (the kernel caches them) and each attached volume's generation (open file handles
/// carry it).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedTable {
    inodes: std::collections::BTreeMap<String, u64>,
    attached: std::collections::BTreeMap<String, u64>,
    next_ino: u64,
    generations: u64,
}

/// How long a request waits for its volume to be attached again after a takeover.
const RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The volumes the filesystem serves; shared between the frontend and the FUSE session.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<Table>>,
}

impl Registry {
    /// Save the table to `file` on every change from now on (and now).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save_to(&self, file: &std::path::Path) -> Result<(), ::host::persist::PersistError> {
        let saved = {
            let mut t = self.inner.write().expect("registry lock");
            t.file = Some(file.to_owned());
            Self::snapshot(&t)
        };
        ::host::persist::write_json(file, &saved)
    }

    /// Take over the table of the daemon before this one (read from `file`): the same
    /// inode numbers, and every attached volume's requests held until it is attached again
    /// with its generation, or [`Registry::end_restore`].
    ///
    /// # Errors
    /// The file cannot be read or is not a saved table.
    pub fn restore(&self, file: &std::path::Path) -> Result<(), ::host::persist::PersistError> {
        let saved: SavedTable = ::host::persist::read_json(file)?.unwrap_or_default();
        let mut t = self.inner.write().expect("registry lock");
        t.by_name = saved.inodes.into_iter().collect();
        t.next_ino = saved.next_ino;
        t.generations = saved.generations;
        t.waiting = saved
            .attached
            .iter()
            .filter_map(|(name, g)| Some((*t.by_name.get(name)?, *g)))
            .collect();
        t.generations = t
            .generations
            .max(t.waiting.values().copied().max().unwrap_or(0));
        Ok(())
    }

    /// Stop holding requests for volumes of a taken-over session that were not attached
    /// again: they fail from now on.
    pub fn end_restore(&self) {
        self.inner.write().expect("registry lock").waiting.clear();
    }

    fn snapshot(t: &Table) -> SavedTable {
        SavedTable {
            inodes: t.by_name.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            attached: t
                .by_ino
                .values()
                .map(|e| (e.name.clone(), e.generation))
                .chain(t.waiting.iter().filter_map(|(ino, g)| {
                    let name = t.by_name.iter().find(|(_, i)| *i == ino)?.0;
                    Some((name.clone(), *g))
                }))
                .collect(),
            next_ino: t.next_ino,
            generations: t.generations,
        }
    }

    /// Save the table if it is saved (see [`Registry::save_to`]); an error is logged.
    fn persist(&self) {
        let (file, saved) = {
            let t = self.inner.read().expect("registry lock");
            let Some(file) = t.file.clone() else {
                return;
            };
            (file, Self::snapshot(&t))
        };
        if let Err(e) = ::host::persist::write_json(&file, &saved) {
            tracing::warn!(error = %e, "cannot save the FUSE table; a restart may fail requests in flight");
        }
    }

    /// Serve `device` as the file `name` (replacing any earlier one of that name).
    /// Handles opened on an earlier device of that name fail from now on, except after a
    /// takeover: the first device of a name that was attached keeps its generation, so the
    /// handles opened before the restart keep working.
    pub fn insert(&self, name: &str, device: VolumeDevice) {
        {
            let mut t = self.inner.write().expect("registry lock");
            let known = t.by_name.get(name).copied();
            let generation = if let Some(g) = known.and_then(|ino| t.waiting.remove(&ino)) {
                g
            } else {
                t.generations += 1;
                t.generations
            };
            let entry = Entry {
                name: name.to_owned(),
                device,
                generation,
            };
            if let Some(ino) = known {
                t.by_ino.insert(ino, entry);
            } else {
                t.next_ino = t.next_ino.max(ROOT_ID) + 1;
                let ino = t.next_ino;
                t.by_name.insert(name.to_owned(), ino);
                t.by_ino.insert(ino, entry);
            }
        }
        self.persist();
    }

    /// The device served as `name`, if any.
    pub fn device(&self, name: &str) -> Option<VolumeDevice> {
        self.lookup(name.as_bytes()).map(|(_, e)| e.device)
    }

    /// The current size of `name`'s device, if registered.
    pub fn size(&self, name: &str) -> Option<u64> {
        self.lookup(name.as_bytes()).map(|(_, e)| e.device.size())
    }

    /// Stop serving `name`. Its inode number stays reserved for it, so a dentry the kernel
    /// still caches resolves to the same file when the volume is attached again.
    pub fn remove(&self, name: &str) {
        {
            let mut t = self.inner.write().expect("registry lock");
            if let Some(ino) = t.by_name.get(name).copied() {
                t.by_ino.remove(&ino);
                t.waiting.remove(&ino);
            }
        }
        self.persist();
    }

    /// The entry of inode `ino`. One of a taken-over session that is not attached again yet
    /// is waited for (up to [`RESTORE_WAIT`]).
    fn get(&self, ino: u64) -> Option<Entry> {
        let deadline = std::time::Instant::now() + RESTORE_WAIT;
        loop {
            {
                let t = self.inner.read().expect("registry lock");
                if let Some(e) = t.by_ino.get(&ino) {
                    return Some(e.clone());
                }
                if !t.waiting.contains_key(&ino) {
                    return None;
                }
            }
            if std::time::Instant::now() >= deadline {
                // Logged: a request failed this way is an I/O error after a restart.
                tracing::warn!(
                    ino,
                    "a request waited {}s for its volume to be attached again after a takeover; failing it",
                    RESTORE_WAIT.as_secs()
                );
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn lookup(&self, name: &[u8]) -> Option<(u64, Entry)> {
        let ino = *self
            .inner
            .read()
            .expect("registry lock")
            .by_name
            .get(std::str::from_utf8(name).ok()?)?;
        // A reserved inode of a detached volume is not found.
        Some((ino, self.get(ino)?))
    }

    fn list(&self) -> Vec<(u64, String)> {
        let t = self.inner.read().expect("registry lock");
        let mut v: Vec<_> = t.by_ino.iter().map(|(i, e)| (*i, e.name.clone())).collect();
        v.sort_unstable();
        v
    }
}

/// What a `FALLOCATE` asks of a device, worked out from the request alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocatePlan {
    /// Nothing to do: answer with success.
    Nothing,
    /// Release these whole blocks (`PUNCH_HOLE`).
    Discard { offset: u64, len: u64 },
    /// Zero these blocks (`ZERO_RANGE`).
    Zero { offset: u64, len: u64 },
    /// Answer with this errno.
    Refuse(i32),
}

impl FallocatePlan {
    /// The plan for `fallocate(mode, offset, len)` on a device of `size` bytes. A range it
    /// returns is never empty, lies within both the request and the device, and is made of
    /// whole blocks; any `offset` and `len` are taken (the kernel sends neither negative
    /// offsets nor ones past its maximum file size, but nothing here relies on it).
    pub fn new(offset: u64, len: u64, mode: i32, size: u64) -> Self {
        let end = offset.saturating_add(len).min(size);
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            // Only whole blocks can be released; a partial block at either end keeps its data.
            // (Saturating: an offset in the last block below 2^64 rounds up to no block.)
            let start = offset.div_ceil(BLOCK).saturating_mul(BLOCK);
            let stop = end / BLOCK * BLOCK;
            if stop <= start {
                return Self::Nothing;
            }
            Self::Discard {
                offset: start,
                len: stop - start,
            }
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if offset % BLOCK != 0 || end % BLOCK != 0 {
                return Self::Refuse(libc::EINVAL);
            }
            if end <= offset {
                return Self::Nothing;
            }
            Self::Zero {
                offset,
                len: end - offset,
            }
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain preallocation: the volume's space is allocated on write, nothing to do.
            Self::Nothing
        } else {
            Self::Refuse(libc::EOPNOTSUPP)
        }
    }
}

/// The filesystem over a [`Registry`]: decodes requests and answers them.
#[derive(Debug)]
pub struct VolumeFs {
    registry: Registry,
    runtime: tokio::runtime::Handle,
    /// Set until `INIT` when the io_uring transport is wanted ([`VolumeFs::want_ring`]).
    ring: Mutex<Option<Weak<VolumeFs>>>,
}

/// Reply to a request with the outcome of an engine call.
fn done(ch: &Channel, unique: u64, r: Result<(), volume::device::DeviceError>) {
    match r {
        Ok(()) => ch.reply(unique, &[]),
        Err(e) => ch.error(unique, e.errno()),
    }
}

impl VolumeFs {
    /// A filesystem serving `registry`, doing its I/O on `runtime`.
    pub fn new(registry: Registry, runtime: tokio::runtime::Handle) -> Self {
        Self {
            registry,
            runtime,
            ring: Mutex::new(None),
        }
    }

    /// Ask the kernel for FUSE over io_uring in the `INIT` reply, and start the ring queues
    /// ([`ring::start`]) once it is sent. If the kernel does not offer it, requests stay on
    /// `/dev/fuse` (logged).
    pub fn want_ring(self: &Arc<Self>) {
        *self.ring.lock().expect("ring lock") = Some(Arc::downgrade(self));
    }

    /// Serve one request of `dev`: a local volume's on this worker thread, start to finish
    /// (its I/O inline, see [`volume::io::inline`]), since its work is short and bounded; a
    /// replicated volume's on the runtime, so the worker reads the next request while this
    /// one waits for its peers. (Serving those on the worker too was measured: fewer context
    /// switches per write, the same latency within noise, lower QD32 throughput, and a peer
    /// that stalls for its timeout would hold workers that every other attached volume needs.)
    ///
    /// On a ring queue's thread ([`ring`]) a request is a task of that thread's runtime: its
    /// I/O goes into the thread's own engine ring, so many are in flight at once. A local
    /// volume's request that is alone on its queue runs inline instead (lower latency at
    /// queue depth 1; nothing waits behind it).
    fn serve(&self, dev: &VolumeDevice, work: impl Future<Output = ()> + Send + 'static) {
        if ring::on_ring_thread() {
            if matches!(dev, VolumeDevice::Local(_)) && ring::alone() {
                return volume::io::inline(|| volume::io::block_on(work));
            }
            return drop(tokio::spawn(work));
        }
        match dev {
            VolumeDevice::Local(_) => volume::io::inline(|| volume::io::block_on(work)),
            VolumeDevice::Replicated(_) => drop(self.runtime.spawn(work)),
        }
    }

    fn volume(&self, ch: &Channel, h: &InHeader) -> Option<VolumeDevice> {
        self.entry(ch, h).map(|e| e.device)
    }

    fn entry(&self, ch: &Channel, h: &InHeader) -> Option<Entry> {
        let e = self.registry.get(h.nodeid);
        if e.is_none() {
            ch.error(h.unique, libc::ENOENT);
        }
        e
    }

    /// The device of a request made through the open file handle `fh`: `None` (answered with
    /// `EIO`) when the handle was opened under an earlier attachment of the volume, which was
    /// detached (or fenced and replaced) since.
    fn handle_volume(&self, ch: &Channel, h: &InHeader, fh: u64) -> Option<VolumeDevice> {
        let e = self.entry(ch, h)?;
        if Handle::decode(fh).generation != e.generation {
            ch.error(h.unique, libc::EIO);
            return None;
        }
        Some(e.device)
    }

    /// Answer one request. `body` follows the `fuse_in_header`. (The session hands a `WRITE`
    /// with its payload apart to [`VolumeFs::write`].)
    pub fn dispatch(&self, ch: &Arc<Channel>, h: InHeader, body: &[u8]) {
        let u = h.unique;
        let request = match Request::decode(&h, body) {
            Ok(request) => request,
            Err(e) => {
                if h.opcode == op::INIT {
                    tracing::error!("the kernel speaks an unsupported FUSE protocol");
                }
                return ch.error(u, e.errno);
            }
        };
        match request {
            Request::Init {
                minor,
                max_readahead,
                flags,
                flags2,
            } => self.init(ch, u, minor, max_readahead, (flags, flags2)),
            Request::Forget => {} // no reply; inode numbers are never reused
            Request::Lookup { name } => match (h.nodeid, self.registry.lookup(name)) {
                (ROOT_ID, Some((ino, e))) => {
                    let attr = Attr {
                        ino,
                        size: e.device.size(),
                        dir: false,
                    };
                    ch.reply(u, &[&attr.entry(TTL).0]);
                }
                _ => ch.error(u, libc::ENOENT),
            },
            Request::Getattr => self.getattr(ch, h, None),
            Request::Setattr { size } => self.getattr(ch, h, size),
            Request::Open { flags } => {
                if let Some(e) = self.entry(ch, &h) {
                    let handle = Handle {
                        generation: e.generation,
                        sync: flags & SYNC_FLAGS != 0,
                    };
                    let open = abi::fopen::DIRECT_IO | abi::fopen::PARALLEL_DIRECT_WRITES;
                    ch.reply(u, &[&abi::open_out(handle.encode(), open).0]);
                }
            }
            Request::Opendir => ch.reply(u, &[&abi::open_out(0, 0).0]),
            Request::Read { fh, offset, size } => self.read(ch, h, fh, offset, size),
            Request::Write { write_in, data } => {
                self.write(ch, h, write_in, IoBuf::from_slice(data));
            }
            Request::Readdir { offset, size } => self.readdir(ch, h, offset, size),
            Request::Fsync { fh } => {
                if let Some(dev) = self.handle_volume(ch, &h, fh) {
                    let ch = ch.clone();
                    self.serve(&dev.clone(), async move { done(&ch, u, dev.flush().await) });
                }
            }
            Request::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                if let Some(dev) = self.handle_volume(ch, &h, fh) {
                    let plan = FallocatePlan::new(offset, length, mode, dev.size());
                    self.fallocate(ch, u, dev, plan);
                }
            }
            Request::Statfs => {
                ch.reply(u, &[&abi::statfs_out(self.registry.list().len() as u64).0]);
            }
            Request::Ack => ch.reply(u, &[]),
            // Interrupts are not supported: requests finish on their own, promptly.
            Request::Unsupported => ch.error(u, libc::ENOSYS),
        }
    }

    fn init(&self, ch: &Channel, u: u64, minor: u32, readahead: u32, kernel: (u32, u32)) {
        let wanted = abi::init::ASYNC_READ
            | abi::init::BIG_WRITES
            | abi::init::ASYNC_DIO
            | abi::init::PARALLEL_DIROPS
            | abi::init::MAX_PAGES;
        let mut flags = (kernel.0 & wanted, 0);
        let ring = self.ring.lock().expect("ring lock").take();
        let ring = ring.and_then(|fs| {
            let offered = kernel.0 & abi::init::INIT_EXT != 0
                && kernel.1 & abi::init::OVER_IO_URING != 0;
            if !offered {
                tracing::warn!("the kernel does not offer FUSE over io_uring (needs 6.14+ and the fuse module's enable_uring); requests go through /dev/fuse");
            }
            offered.then_some(fs)
        });
        if ring.is_some() {
            flags.0 |= abi::init::INIT_EXT;
            flags.1 |= abi::init::OVER_IO_URING;
        }
        let out = abi::init_out(
            minor.min(abi::MINOR),
            readahead,
            flags,
            MAX_BACKGROUND,
            MAX_IO as u32,
            (MAX_IO / 4096) as u16,
        );
        tracing::debug!(
            minor,
            flags = flags.0,
            flags2 = flags.1,
            "FUSE session initialised"
        );
        ch.reply(u, &[&out.0]);
        // The kernel takes ring commands once it has the reply.
        if let (Some(fs), Some(fd)) = (ring.and_then(|w| w.upgrade()), ch.dev_fd()) {
            match ring::start(fd, &fs) {
                Ok(queues) => tracing::info!(queues, "FUSE requests go through io_uring"),
                Err(e) => tracing::error!(error = %e, "cannot start the FUSE io_uring queues"),
            }
        }
    }

    /// Answer a `GETATTR`, or a `SETATTR` (that sets the size to `size`, if given).
    fn getattr(&self, ch: &Channel, h: InHeader, size: Option<u64>) {
        if h.nodeid == ROOT_ID {
            let attr = Attr {
                ino: ROOT_ID,
                size: 0,
                dir: true,
            };
            return ch.reply(h.unique, &[&attr.attr_out(TTL).0]);
        }
        let Some(dev) = self.volume(ch, &h) else {
            return;
        };
        // The size of a volume is changed with `ballast volume resize`, never by truncate.
        if size.is_some_and(|size| size != dev.size()) {
            return ch.error(h.unique, libc::EPERM);
        }
        let attr = Attr {
            ino: h.nodeid,
            size: dev.size(),
            dir: false,
        };
        ch.reply(h.unique, &[&attr.attr_out(TTL).0]);
    }

    fn read(&self, ch: &Arc<Channel>, h: InHeader, fh: u64, offset: u64, size: u32) {
        let Some(dev) = self.handle_volume(ch, &h, fh) else {
            return;
        };
        let size = u64::from(size);
        let end = (offset.saturating_add(size)).min(dev.size());
        if offset >= end {
            return ch.reply(h.unique, &[]);
        }
        // Widen to whole blocks; the loop device above always sends aligned requests.
        let start = offset / BLOCK * BLOCK;
        let aligned_end = end.div_ceil(BLOCK) * BLOCK;
        let buf = pool::take((aligned_end - start) as usize);
        let ch = ch.clone();
        self.serve(&dev.clone(), async move {
            match dev.read(start, buf).await {
                Ok(buf) => {
                    let skip = (offset - start) as usize;
                    ch.reply(h.unique, &[&buf[skip..skip + (end - offset) as usize]]);
                    pool::give(buf);
                }
                Err(e) => {
                    ch.error(h.unique, e.error.errno());
                    pool::give(e.buf);
                }
            }
        });
    }

    /// Answer a `WRITE`; `write_in` is its `fuse_write_in`, `data` its payload.
    pub fn write(&self, ch: &Arc<Channel>, h: InHeader, write_in: WriteIn, data: IoBuf) {
        let WriteIn {
            fh, offset, flags, ..
        } = write_in;
        let Some(dev) = self.handle_volume(ch, &h, fh) else {
            return pool::give(data);
        };
        if offset % BLOCK != 0 || data.len() as u64 % BLOCK != 0 {
            ch.error(h.unique, libc::EINVAL);
            return pool::give(data);
        }
        let fua = Handle::decode(fh).sync || flags & SYNC_FLAGS != 0;
        let ch = ch.clone();
        self.serve(&dev.clone(), async move {
            let len = data.len() as u32;
            match dev
                .write(
                    offset,
                    data,
                    WriteFlags {
                        fua,
                        ..WriteFlags::default()
                    },
                )
                .await
            {
                Ok(buf) => {
                    let mut out = abi::Out::with_capacity(8);
                    out.u32(len).u32(0);
                    ch.reply(h.unique, &[&out.0]);
                    pool::give(buf);
                }
                Err(e) => {
                    ch.error(h.unique, e.error.errno());
                    pool::give(e.buf);
                }
            }
        });
    }

    /// Carry out a `FALLOCATE` on `dev` as planned.
    fn fallocate(&self, ch: &Arc<Channel>, u: u64, dev: VolumeDevice, plan: FallocatePlan) {
        match plan {
            FallocatePlan::Nothing => ch.reply(u, &[]),
            FallocatePlan::Refuse(errno) => ch.error(u, errno),
            FallocatePlan::Discard { offset, len } => {
                let ch = ch.clone();
                self.serve(&dev.clone(), async move {
                    done(&ch, u, dev.discard(offset, len).await);
                });
            }
            FallocatePlan::Zero { offset, len } => {
                let ch = ch.clone();
                self.serve(&dev.clone(), async move {
                    done(&ch, u, dev.write_zeroes(offset, len).await);
                });
            }
        }
    }

    /// Answer a `READDIR` of the root ([`Request::decode`] refuses any other node's).
    fn readdir(&self, ch: &Channel, h: InHeader, offset: u64, size: u32) {
        let size = size as usize;
        let mut entries = vec![
            (ROOT_ID, true, ".".to_owned()),
            (ROOT_ID, true, "..".to_owned()),
        ];
        entries.extend(self.registry.list().into_iter().map(|(i, n)| (i, false, n)));
        let mut out = abi::Out::with_capacity(size.min(4096));
        for (i, (ino, dir, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if !abi::push_dirent(&mut out, size, ino, i as u64 + 1, dir, &name) {
                break;
            }
        }
        ch.reply(h.unique, &[&out.0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

    #[test]
    fn punch_hole_releases_the_whole_blocks_inside_the_request_and_the_device() {
        let size = 1 << 20;
        assert_eq!(
            FallocatePlan::new(100, 3 * BLOCK, PUNCH, size),
            FallocatePlan::Discard {
                offset: BLOCK,
                len: 2 * BLOCK
            }
        );
        assert_eq!(
            FallocatePlan::new(100, 100, PUNCH, size),
            FallocatePlan::Nothing
        );
        assert_eq!(
            FallocatePlan::new(size - BLOCK, u64::MAX, PUNCH, size),
            FallocatePlan::Discard {
                offset: size - BLOCK,
                len: BLOCK
            }
        );
        // An offset in the last block below 2^64 used to round up past it: in a release
        // build to 0, a discard of the whole device.
        for offset in [u64::MAX, u64::MAX - 100, u64::MAX - BLOCK + 2] {
            assert_eq!(
                FallocatePlan::new(offset, 1, PUNCH, size),
                FallocatePlan::Nothing,
                "{offset}"
            );
            assert_eq!(
                FallocatePlan::new(offset, u64::MAX, PUNCH, u64::MAX),
                FallocatePlan::Nothing,
                "{offset}"
            );
        }
    }

    #[test]
    fn zero_range_takes_whole_blocks_only_and_other_modes_do_nothing_or_are_refused() {
        let size = 1 << 20;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        assert_eq!(
            FallocatePlan::new(BLOCK, 2 * BLOCK, zero, size),
            FallocatePlan::Zero {
                offset: BLOCK,
                len: 2 * BLOCK
            }
        );
        assert_eq!(
            FallocatePlan::new(BLOCK, 100, zero, size),
            FallocatePlan::Refuse(libc::EINVAL)
        );
        assert_eq!(
            FallocatePlan::new(2 * size, BLOCK, zero, size),
            FallocatePlan::Nothing
        );
        assert_eq!(
            FallocatePlan::new(0, BLOCK, libc::FALLOC_FL_KEEP_SIZE, size),
            FallocatePlan::Nothing
        );
        assert_eq!(
            FallocatePlan::new(0, BLOCK, libc::FALLOC_FL_COLLAPSE_RANGE, size),
            FallocatePlan::Refuse(libc::EOPNOTSUPP)
        );
    }
}
