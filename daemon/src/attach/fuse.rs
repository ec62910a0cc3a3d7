//! The FUSE filesystem that shows each attached volume as one regular file.
//!
//! The root directory lists one file per attached volume, named after it and as large as the
//! volume. Files are opened with `FOPEN_DIRECT_IO`, so the kernel sends every read and write
//! straight here (no page cache in between), and the loop device on top runs with direct I/O.
//!
//! Data path: the FUSE session thread decodes a request, takes a clone of the volume's
//! [`Replica`] under a short read lock of the [`Registry`], and hands the I/O to a task on the
//! daemon's tokio runtime, which replies when the engine completes. Many requests are thus in
//! flight at once (the kernel queues up to `max_background` of them) and no lock is held across
//! I/O. Writes copy the payload once, from the FUSE buffer into an aligned [`IoBuf`].
//!
//! Mapping: read → `read`, write → `write` (FUA when the file was opened `O_SYNC`/`O_DSYNC`),
//! fsync → `flush`, fallocate `PUNCH_HOLE` → `discard`, `ZERO_RANGE` → `write_zeroes`.
//! Requests that are not 4 KiB aligned are widened (reads) or refused with `EINVAL` (writes);
//! the loop device above always sends aligned requests.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, FUSE_ROOT_ID,
};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::IoBuf;
use volume::pool::Replica;

const BLOCK: u64 = 4096;
const TTL: Duration = Duration::from_secs(1);

/// One attached volume as the filesystem sees it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    replica: Replica,
}

#[derive(Debug, Default)]
struct Table {
    by_ino: HashMap<u64, Entry>,
    by_name: HashMap<String, u64>,
    next_ino: u64,
}

/// The volumes the filesystem serves; shared between the frontend and the FUSE session.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<Table>>,
}

impl Registry {
    /// Serve `replica` as the file `name` (replacing any earlier one of that name).
    pub fn insert(&self, name: &str, replica: Replica) {
        let mut t = self.inner.write().expect("registry lock");
        if let Some(ino) = t.by_name.get(name).copied() {
            t.by_ino.insert(
                ino,
                Entry {
                    name: name.to_owned(),
                    replica,
                },
            );
            return;
        }
        t.next_ino = t.next_ino.max(FUSE_ROOT_ID) + 1;
        let ino = t.next_ino;
        t.by_name.insert(name.to_owned(), ino);
        t.by_ino.insert(
            ino,
            Entry {
                name: name.to_owned(),
                replica,
            },
        );
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

    fn lookup(&self, name: &OsStr) -> Option<(u64, Entry)> {
        let t = self.inner.read().expect("registry lock");
        let ino = *t.by_name.get(name.to_str()?)?;
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

/// The `fuser` filesystem over a [`Registry`].
#[derive(Debug)]
pub struct VolumeFs {
    registry: Registry,
    runtime: tokio::runtime::Handle,
}

impl VolumeFs {
    /// A filesystem serving `registry`, doing its I/O on `runtime`.
    pub fn new(registry: Registry, runtime: tokio::runtime::Handle) -> Self {
        Self { registry, runtime }
    }
}

fn attr(ino: u64, size: u64, dir: bool) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino,
        size,
        blocks: size / 512,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o600 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

impl Filesystem for VolumeFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != FUSE_ROOT_ID {
            return reply.error(libc::ENOENT);
        }
        match self.registry.lookup(name) {
            Some((ino, e)) => reply.entry(&TTL, &attr(ino, e.replica.size(), false), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino == FUSE_ROOT_ID {
            return reply.attr(&TTL, &attr(ino, 0, true));
        }
        match self.registry.get(ino) {
            Some(e) => reply.attr(&TTL, &attr(ino, e.replica.size(), false)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(e) = self.registry.get(ino) else {
            return reply.error(libc::ENOENT);
        };
        // The size of a volume is changed with `ballast volume resize`, never by truncate.
        if size.is_some_and(|s| s != e.replica.size()) {
            return reply.error(libc::EPERM);
        }
        reply.attr(&TTL, &attr(ino, e.replica.size(), false));
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if self.registry.get(ino).is_none() {
            return reply.error(libc::ENOENT);
        }
        // Remember whether writes must be durable on completion.
        let sync = u64::from(flags & (libc::O_SYNC | libc::O_DSYNC) != 0);
        reply.opened(sync, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(e) = self.registry.get(ino) else {
            return reply.error(libc::ENOENT);
        };
        let dev = e.replica;
        self.runtime.spawn(async move {
            let offset = offset.max(0) as u64;
            let end = (offset + u64::from(size)).min(dev.size());
            if offset >= end {
                return reply.data(&[]);
            }
            let start = offset / BLOCK * BLOCK;
            let aligned_end = end.div_ceil(BLOCK) * BLOCK;
            match dev
                .read(start, IoBuf::zeroed((aligned_end - start) as usize))
                .await
            {
                Ok(buf) => {
                    let skip = (offset - start) as usize;
                    reply.data(&buf[skip..skip + (end - offset) as usize]);
                }
                Err(e) => reply.error(e.error.errno()),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(e) = self.registry.get(ino) else {
            return reply.error(libc::ENOENT);
        };
        let offset = offset.max(0) as u64;
        if offset % BLOCK != 0 || data.len() as u64 % BLOCK != 0 {
            return reply.error(libc::EINVAL);
        }
        let fua = fh != 0 || flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let buf = IoBuf::from_slice(data);
        let dev = e.replica;
        self.runtime.spawn(async move {
            let len = buf.len() as u32;
            match dev.write(offset, buf, WriteFlags { fua }).await {
                Ok(_) => reply.written(len),
                Err(e) => reply.error(e.error.errno()),
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(e) = self.registry.get(ino) else {
            return reply.error(libc::ENOENT);
        };
        let dev = e.replica;
        self.runtime.spawn(async move {
            match dev.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e.errno()),
            }
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(e) = self.registry.get(ino) else {
            return reply.error(libc::ENOENT);
        };
        let dev = e.replica;
        let (offset, len) = (offset.max(0) as u64, length.max(0) as u64);
        let end = (offset + len).min(dev.size());
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            // Only whole blocks can be released; a partial block at either end keeps its data.
            let start = offset.div_ceil(BLOCK) * BLOCK;
            let stop = end / BLOCK * BLOCK;
            if stop <= start {
                return reply.ok();
            }
            self.runtime.spawn(async move {
                match dev.discard(start, stop - start).await {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e.errno()),
                }
            });
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if offset % BLOCK != 0 || end % BLOCK != 0 {
                return reply.error(libc::EINVAL);
            }
            if end <= offset {
                return reply.ok();
            }
            self.runtime.spawn(async move {
                match dev.write_zeroes(offset, end - offset).await {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e.errno()),
                }
            });
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain preallocation: the volume's space is allocated on write, nothing to do.
            reply.ok();
        } else {
            reply.error(libc::EOPNOTSUPP);
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != FUSE_ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![
            (FUSE_ROOT_ID, FileType::Directory, ".".to_owned()),
            (FUSE_ROOT_ID, FileType::Directory, "..".to_owned()),
        ];
        entries.extend(
            self.registry
                .list()
                .into_iter()
                .map(|(i, n)| (i, FileType::RegularFile, n)),
        );
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, i64::try_from(i + 1).unwrap_or(i64::MAX), kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
