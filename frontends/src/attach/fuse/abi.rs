//! The FUSE kernel interface (protocol 7.31), the parts this filesystem speaks.
//!
//! Requests and replies are native-endian C structs; they are decoded and encoded field by
//! field here, without `unsafe`. Layouts follow `<linux/fuse.h>`.

/// Protocol major version.
pub const MAJOR: u32 = 7;
/// The newest minor version this implementation speaks. The kernel adopts
/// `min(kernel, ours)`.
pub const MINOR: u32 = 31;

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER: usize = 16;
/// `sizeof(struct fuse_write_in)` (minor ≥ 9).
pub const WRITE_IN: usize = 40;

/// Opcodes.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// `FUSE_INIT` capability flags.
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    /// Bypass the page cache for this open file.
    pub const DIRECT_IO: u32 = 1 << 0;
    /// Let direct writes to one file run in parallel (no exclusive inode lock).
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `fuse_setattr_in.valid`: the size is being set.
pub const FATTR_SIZE: u32 = 1 << 3;
/// The root directory's node id.
pub const ROOT_ID: u64 = 1;
/// `FUSE_DEV_IOC_CLONE` = `_IOR(229, 0, uint32_t)`: attach a new `/dev/fuse` fd to the
/// session of an existing one, so that several threads read requests in parallel.
pub const DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    /// Decode from the first [`IN_HEADER`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= IN_HEADER).then(|| Self {
            len: u32_at(b, 0),
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
        })
    }
}

/// A native-endian `u32` at `off`. Callers check the length first.
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// A native-endian `u64` at `off`. Callers check the length first.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A reply body under construction.
#[derive(Debug, Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// What a `fuse_attr` says about a node.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub dir: bool,
}

impl Attr {
    /// `struct fuse_attr` (88 bytes).
    pub fn encode(&self, o: &mut Out) {
        let (mode, nlink) = if self.dir {
            (libc::S_IFDIR | 0o755, 2)
        } else {
            (libc::S_IFREG | 0o600, 1)
        };
        o.u64(self.ino).u64(self.size).u64(self.size.div_ceil(512));
        o.u64(0).u64(0).u64(0); // atime, mtime, ctime
        o.u32(0).u32(0).u32(0); // their nanoseconds
        o.u32(mode).u32(nlink).u32(0).u32(0).u32(0); // mode, nlink, uid, gid, rdev
        o.u32(4096).u32(0); // blksize, flags
    }

    /// `struct fuse_entry_out` (128 bytes).
    pub fn entry(&self, ttl_secs: u64) -> Out {
        let mut o = Out::with_capacity(128);
        o.u64(self.ino)
            .u64(0)
            .u64(ttl_secs)
            .u64(ttl_secs)
            .u32(0)
            .u32(0);
        self.encode(&mut o);
        o
    }

    /// `struct fuse_attr_out` (104 bytes).
    pub fn attr_out(&self, ttl_secs: u64) -> Out {
        let mut o = Out::with_capacity(104);
        o.u64(ttl_secs).u32(0).u32(0);
        self.encode(&mut o);
        o
    }
}

/// `struct fuse_init_out` (64 bytes) for protocol 7.`minor`.
pub fn init_out(
    minor: u32,
    max_readahead: u32,
    flags: u32,
    max_background: u16,
    max_write: u32,
    max_pages: u16,
) -> Out {
    let mut o = Out::with_capacity(64);
    o.u32(MAJOR).u32(minor).u32(max_readahead).u32(flags);
    o.u16(max_background).u16(max_background / 4 * 3); // congestion threshold
    o.u32(max_write).u32(1); // max_write, time_gran
    o.u16(max_pages).u16(0); // max_pages, map_alignment
    o.zeros(32);
    o
}

/// `struct fuse_open_out`.
pub fn open_out(fh: u64, open_flags: u32) -> Out {
    let mut o = Out::with_capacity(16);
    o.u64(fh).u32(open_flags).u32(0);
    o
}

/// `struct fuse_kstatfs` (80 bytes).
pub fn statfs_out(files: u64) -> Out {
    let mut o = Out::with_capacity(80);
    o.u64(0).u64(0).u64(0).u64(files).u64(0); // blocks, bfree, bavail, files, ffree
    o.u32(4096).u32(255).u32(4096).u32(0); // bsize, namelen, frsize, padding
    o.zeros(24);
    o
}

/// Append one `struct fuse_dirent` unless it would exceed `limit` bytes; `false` if full.
pub fn push_dirent(
    o: &mut Out,
    limit: usize,
    ino: u64,
    next_off: u64,
    dir: bool,
    name: &str,
) -> bool {
    let entry = (24 + name.len()).div_ceil(8) * 8;
    if o.0.len() + entry > limit {
        return false;
    }
    let kind = if dir { libc::DT_DIR } else { libc::DT_REG };
    o.u64(ino)
        .u64(next_off)
        .u32(name.len() as u32)
        .u32(u32::from(kind));
    o.0.extend_from_slice(name.as_bytes());
    o.zeros(entry - 24 - name.len());
    true
}
