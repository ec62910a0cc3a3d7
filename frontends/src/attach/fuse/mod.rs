//! The FUSE filesystem that shows each attached volume as one regular file.
//!
//! The root directory lists one file per attached volume, named after it and as large as the
//! volume. Files are opened with `FOPEN_DIRECT_IO`, so the kernel sends every read and write
//! straight here (no page cache in between), and the loop device on top runs with direct I/O.
//!
//! Data path: several worker threads ([`session`]) each read requests from their own clone of
//! the `/dev/fuse` descriptor. A worker takes a clone of the volume's [`VolumeDevice`] under a short
//! read lock of the [`Registry`] and hands the I/O to a task on the daemon's tokio runtime,
//! which replies when the engine completes. The session asks the kernel for asynchronous
//! direct I/O and a deep background queue, and opens files with parallel direct writes, so
//! the loop device's queue depth reaches the engine. No lock is held across I/O; see
//! [`session`] for how copies are avoided.
//!
//! Mapping: read → `read`, write → `write` (FUA when the file was opened `O_SYNC`/`O_DSYNC`),
//! fsync → `flush`, fallocate `PUNCH_HOLE` → `discard`, `ZERO_RANGE` → `write_zeroes`.
//! Requests that are not 4 KiB aligned are widened (reads) or refused with `EINVAL` (writes);
//! the loop device above always sends aligned requests.

pub mod abi;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use volume::device::{BlockDevice, WriteFlags};
use volume::io::{pool, IoBuf};

use self::abi::{op, u32_at, u64_at, Attr, InHeader, ROOT_ID};
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
}

/// The volumes the filesystem serves; shared between the frontend and the FUSE session.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<Table>>,
}

impl Registry {
    /// Serve `device` as the file `name` (replacing any earlier one of that name).
    /// Handles opened on an earlier device of that name fail from now on.
    pub fn insert(&self, name: &str, device: VolumeDevice) {
        let mut t = self.inner.write().expect("registry lock");
        t.generations += 1;
        let entry = Entry {
            name: name.to_owned(),
            device,
            generation: t.generations,
        };
        if let Some(ino) = t.by_name.get(name).copied() {
            t.by_ino.insert(ino, entry);
            return;
        }
        t.next_ino = t.next_ino.max(ROOT_ID) + 1;
        let ino = t.next_ino;
        t.by_name.insert(name.to_owned(), ino);
        t.by_ino.insert(ino, entry);
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
        let mut t = self.inner.write().expect("registry lock");
        if let Some(ino) = t.by_name.get(name).copied() {
            t.by_ino.remove(&ino);
        }
    }

    fn get(&self, ino: u64) -> Option<Entry> {
        self.inner
            .read()
            .expect("registry lock")
            .by_ino
            .get(&ino)
            .cloned()
    }

    fn lookup(&self, name: &[u8]) -> Option<(u64, Entry)> {
        let t = self.inner.read().expect("registry lock");
        let ino = *t.by_name.get(std::str::from_utf8(name).ok()?)?;
        // A reserved inode of a detached volume is not found.
        Some((ino, t.by_ino.get(&ino)?.clone()))
    }

    fn list(&self) -> Vec<(u64, String)> {
        let t = self.inner.read().expect("registry lock");
        let mut v: Vec<_> = t.by_ino.iter().map(|(i, e)| (*i, e.name.clone())).collect();
        v.sort_unstable();
        v
    }
}

/// The filesystem over a [`Registry`]: decodes requests and answers them.
#[derive(Debug)]
pub struct VolumeFs {
    registry: Registry,
    runtime: tokio::runtime::Handle,
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
        Self { registry, runtime }
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

    /// Answer one request other than `WRITE`. `body` follows the `fuse_in_header`.
    pub fn dispatch(&self, ch: &Arc<Channel>, h: InHeader, body: &[u8]) {
        let u = h.unique;
        match h.opcode {
            op::INIT => Self::init(ch, u, body),
            op::FORGET | op::BATCH_FORGET => {} // no reply; inode numbers are never reused
            op::LOOKUP => {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                match (h.nodeid, self.registry.lookup(name)) {
                    (ROOT_ID, Some((ino, e))) => {
                        let attr = Attr {
                            ino,
                            size: e.device.size(),
                            dir: false,
                        };
                        ch.reply(u, &[&attr.entry(TTL).0]);
                    }
                    _ => ch.error(u, libc::ENOENT),
                }
            }
            op::GETATTR | op::SETATTR => self.getattr(ch, h, body),
            op::OPEN => {
                if body.len() < 8 {
                    return ch.error(u, libc::EINVAL);
                }
                if let Some(e) = self.entry(ch, &h) {
                    let handle = Handle {
                        generation: e.generation,
                        sync: u32_at(body, 0) & SYNC_FLAGS != 0,
                    };
                    let open = abi::fopen::DIRECT_IO | abi::fopen::PARALLEL_DIRECT_WRITES;
                    ch.reply(u, &[&abi::open_out(handle.encode(), open).0]);
                }
            }
            op::OPENDIR => ch.reply(u, &[&abi::open_out(0, 0).0]),
            op::READ => self.read(ch, h, body),
            op::READDIR => self.readdir(ch, h, body),
            op::FSYNC => {
                if body.len() < 8 {
                    return ch.error(u, libc::EINVAL);
                }
                if let Some(dev) = self.handle_volume(ch, &h, u64_at(body, 0)) {
                    let ch = ch.clone();
                    self.runtime
                        .spawn(async move { done(&ch, u, dev.flush().await) });
                }
            }
            op::FALLOCATE => self.fallocate(ch, h, body),
            op::STATFS => ch.reply(u, &[&abi::statfs_out(self.registry.list().len() as u64).0]),
            op::FLUSH | op::RELEASE | op::RELEASEDIR | op::FSYNCDIR | op::ACCESS | op::DESTROY => {
                ch.reply(u, &[]);
            }
            // Interrupts are not supported: requests finish on their own, promptly.
            _ => ch.error(u, libc::ENOSYS),
        }
    }

    fn init(ch: &Channel, u: u64, body: &[u8]) {
        if body.len() < 16 || u32_at(body, 0) != abi::MAJOR {
            tracing::error!("the kernel speaks an unsupported FUSE protocol");
            return ch.error(u, libc::EPROTO);
        }
        let (minor, readahead, kernel) = (u32_at(body, 4), u32_at(body, 8), u32_at(body, 12));
        let wanted = abi::init::ASYNC_READ
            | abi::init::BIG_WRITES
            | abi::init::ASYNC_DIO
            | abi::init::PARALLEL_DIROPS
            | abi::init::MAX_PAGES;
        let out = abi::init_out(
            minor.min(abi::MINOR),
            readahead,
            kernel & wanted,
            MAX_BACKGROUND,
            MAX_IO as u32,
            (MAX_IO / 4096) as u16,
        );
        tracing::debug!(minor, flags = kernel & wanted, "FUSE session initialised");
        ch.reply(u, &[&out.0]);
    }

    fn getattr(&self, ch: &Channel, h: InHeader, body: &[u8]) {
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
        if h.opcode == op::SETATTR
            && body.len() >= 24
            && u32_at(body, 0) & abi::FATTR_SIZE != 0
            && u64_at(body, 16) != dev.size()
        {
            return ch.error(h.unique, libc::EPERM);
        }
        let attr = Attr {
            ino: h.nodeid,
            size: dev.size(),
            dir: false,
        };
        ch.reply(h.unique, &[&attr.attr_out(TTL).0]);
    }

    fn read(&self, ch: &Arc<Channel>, h: InHeader, body: &[u8]) {
        if body.len() < 20 {
            return ch.error(h.unique, libc::EINVAL);
        }
        let Some(dev) = self.handle_volume(ch, &h, u64_at(body, 0)) else {
            return;
        };
        let (offset, size) = (u64_at(body, 8), u64::from(u32_at(body, 16)));
        let end = (offset.saturating_add(size)).min(dev.size());
        if offset >= end {
            return ch.reply(h.unique, &[]);
        }
        // Widen to whole blocks; the loop device above always sends aligned requests.
        let start = offset / BLOCK * BLOCK;
        let aligned_end = end.div_ceil(BLOCK) * BLOCK;
        let buf = pool::take((aligned_end - start) as usize);
        let ch = ch.clone();
        self.runtime.spawn(async move {
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
    pub fn write(&self, ch: &Arc<Channel>, h: InHeader, write_in: &[u8], data: IoBuf) {
        let (fh, offset, flags) = (
            u64_at(write_in, 0),
            u64_at(write_in, 8),
            u32_at(write_in, 32),
        );
        let Some(dev) = self.handle_volume(ch, &h, fh) else {
            return pool::give(data);
        };
        if offset % BLOCK != 0 || data.len() as u64 % BLOCK != 0 {
            ch.error(h.unique, libc::EINVAL);
            return pool::give(data);
        }
        let fua = Handle::decode(fh).sync || flags & SYNC_FLAGS != 0;
        let ch = ch.clone();
        self.runtime.spawn(async move {
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

    fn fallocate(&self, ch: &Arc<Channel>, h: InHeader, body: &[u8]) {
        if body.len() < 28 {
            return ch.error(h.unique, libc::EINVAL);
        }
        let Some(dev) = self.handle_volume(ch, &h, u64_at(body, 0)) else {
            return;
        };
        let (offset, len) = (u64_at(body, 8), u64_at(body, 16));
        let mode = i32::from_ne_bytes(body[24..28].try_into().expect("4 bytes"));
        let end = offset.saturating_add(len).min(dev.size());
        let u = h.unique;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            // Only whole blocks can be released; a partial block at either end keeps its data.
            let start = offset.div_ceil(BLOCK) * BLOCK;
            let stop = end / BLOCK * BLOCK;
            if stop <= start {
                return ch.reply(u, &[]);
            }
            let ch = ch.clone();
            self.runtime
                .spawn(async move { done(&ch, u, dev.discard(start, stop - start).await) });
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if offset % BLOCK != 0 || end % BLOCK != 0 {
                return ch.error(u, libc::EINVAL);
            }
            if end <= offset {
                return ch.reply(u, &[]);
            }
            let ch = ch.clone();
            self.runtime
                .spawn(async move { done(&ch, u, dev.write_zeroes(offset, end - offset).await) });
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain preallocation: the volume's space is allocated on write, nothing to do.
            ch.reply(u, &[]);
        } else {
            ch.error(u, libc::EOPNOTSUPP);
        }
    }

    fn readdir(&self, ch: &Channel, h: InHeader, body: &[u8]) {
        if h.nodeid != ROOT_ID {
            return ch.error(h.unique, libc::ENOTDIR);
        }
        if body.len() < 20 {
            return ch.error(h.unique, libc::EINVAL);
        }
        let (offset, size) = (u64_at(body, 8), u32_at(body, 16) as usize);
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
