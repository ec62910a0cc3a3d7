//! The FUSE kernel interface (protocol 7.31), the parts this filesystem speaks.
//!
//! Requests and replies are native-endian C structs; they are decoded and encoded field by
//! field here, without `unsafe`. Layouts follow `<linux/fuse.h>`.
//!
//! Decoding ([`parse_head`], [`Request::decode`]) takes any bytes: a request too short for
//! what its opcode carries is a [`BadRequest`], never a panic (the fuzz target
//! `fuzz/fuzz_targets/fuse_request.rs` runs them on arbitrary input). Bytes past the fields
//! used are ignored, as newer kernels send longer structs.

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
/// What the session reads into its header buffer: a header and a `fuse_write_in`, so that a
/// `WRITE`'s payload starts right after it (see [`parse_head`]).
pub const HEAD: usize = IN_HEADER + WRITE_IN;
/// `sizeof(struct fuse_init_in)` up to its `flags` (protocol 7.6 to 7.35; later kernels
/// send a longer one).
const INIT_IN: usize = 16;
/// The bytes of `struct fuse_open_in` (8 bytes) used: `flags`.
const OPEN_IN: usize = 8;
/// The bytes of `struct fuse_read_in` (40 bytes) used: `fh`, `offset`, `size`.
const READ_IN: usize = 20;
/// The bytes of `struct fuse_setattr_in` (88 bytes) used: `valid`, `size`.
const SETATTR_IN: usize = 24;
/// The bytes of `struct fuse_fsync_in` (16 bytes) used: `fh`.
const FSYNC_IN: usize = 8;
/// The bytes of `struct fuse_fallocate_in` (32 bytes) used: `fh`, `offset`, `length`, `mode`.
const FALLOCATE_IN: usize = 28;

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
    /// `flags2` is valid (7.36).
    pub const INIT_EXT: u32 = 1 << 30;
    /// `flags2`: FUSE over io_uring (bit 41 of the 64 flags, 7.42).
    pub const OVER_IO_URING: u32 = 1 << 9;
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

/// `struct fuse_write_in`, the fields used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn {
    /// The file handle ([`open_out`]'s `fh`).
    pub fh: u64,
    pub offset: u64,
    /// The payload's length as the kernel states it (the payload itself is what follows).
    pub size: u32,
    /// The open file's flags (`O_SYNC`, …).
    pub flags: u32,
}

impl WriteIn {
    /// Decode from the first [`WRITE_IN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= WRITE_IN).then(|| Self {
            fh: u64_at(b, 0),
            offset: u64_at(b, 8),
            size: u32_at(b, 16),
            flags: u32_at(b, 32),
        })
    }
}

/// Take apart the start of a request as the session reads it from `/dev/fuse`: `head` is its
/// first bytes, at most [`HEAD`] of them. `None` when they are fewer than a header. A `WRITE`
/// long enough to carry its `fuse_write_in` comes with it, and its payload is what follows
/// the first [`HEAD`] bytes; any other request's body is everything after the header, for
/// [`Request::decode`].
pub fn parse_head(head: &[u8]) -> Option<(InHeader, Option<WriteIn>)> {
    let h = InHeader::parse(head)?;
    let write_in = if h.opcode == op::WRITE {
        WriteIn::parse(&head[IN_HEADER..])
    } else {
        None
    };
    Some((h, write_in))
}

/// A request's body that cannot be decoded: too short for what its opcode carries, an `INIT`
/// of another major version, or a `READDIR` of a node that is no directory. Answered with
/// `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequest {
    pub errno: i32,
}

/// A request, decoded from its header and the body that follows it: the fields this
/// filesystem uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `INIT`, protocol major [`MAJOR`]: the kernel's minor version, readahead and
    /// capability flags (`flags2` is 0 unless `flags` has [`init::INIT_EXT`] and the body
    /// carries it, 7.36 and later).
    Init {
        minor: u32,
        max_readahead: u32,
        flags: u32,
        flags2: u32,
    },
    /// `FORGET`, `BATCH_FORGET`: not answered.
    Forget,
    /// `LOOKUP` of `name` (the body up to its first NUL) in the directory `nodeid`.
    Lookup { name: &'a [u8] },
    /// `GETATTR`.
    Getattr,
    /// `SETATTR`; `size` when it sets the size (`FATTR_SIZE`).
    Setattr { size: Option<u64> },
    /// `OPEN` with the open flags.
    Open { flags: u32 },
    /// `OPENDIR`.
    Opendir,
    /// `READ` of `size` bytes at `offset` through the handle `fh`.
    Read { fh: u64, offset: u64, size: u32 },
    /// `WRITE` of `data`.
    Write { write_in: WriteIn, data: &'a [u8] },
    /// `READDIR` of the root, from entry `offset`, at most `size` bytes of entries.
    Readdir { offset: u64, size: u32 },
    /// `FSYNC` through the handle `fh`.
    Fsync { fh: u64 },
    /// `FALLOCATE` through the handle `fh`; `mode` is `fallocate(2)`'s.
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// `STATFS`.
    Statfs,
    /// `FLUSH`, `RELEASE`, `RELEASEDIR`, `FSYNCDIR`, `ACCESS`, `DESTROY`: answered with an
    /// empty success.
    Ack,
    /// Any other opcode (`INTERRUPT` included): answered with `ENOSYS`.
    Unsupported,
}

impl<'a> Request<'a> {
    /// Decode the request `h` whose body (the bytes after the header) is `body`.
    ///
    /// # Errors
    /// [`BadRequest`] with the errno to answer: `EINVAL` for a body too short,
    /// `EPROTO` for an `INIT` that is short or of another major version, `ENOTDIR` for a
    /// `READDIR` of a node other than the root (checked first), and `ENOSYS` for a `WRITE`
    /// without a whole `fuse_write_in` (as for any request this filesystem cannot take).
    pub fn decode(h: &InHeader, body: &'a [u8]) -> Result<Self, BadRequest> {
        let need = |len: usize, errno: i32| {
            if body.len() >= len {
                Ok(())
            } else {
                Err(BadRequest { errno })
            }
        };
        Ok(match h.opcode {
            op::INIT => {
                need(INIT_IN, libc::EPROTO)?;
                if u32_at(body, 0) != MAJOR {
                    return Err(BadRequest {
                        errno: libc::EPROTO,
                    });
                }
                let flags = u32_at(body, 12);
                Self::Init {
                    minor: u32_at(body, 4),
                    max_readahead: u32_at(body, 8),
                    flags,
                    flags2: if flags & init::INIT_EXT != 0 && body.len() >= INIT_IN + 4 {
                        u32_at(body, INIT_IN)
                    } else {
                        0
                    },
                }
            }
            op::FORGET | op::BATCH_FORGET => Self::Forget,
            op::LOOKUP => Self::Lookup {
                name: body.split(|&b| b == 0).next().unwrap_or_default(),
            },
            op::GETATTR => Self::Getattr,
            op::SETATTR => Self::Setattr {
                size: (body.len() >= SETATTR_IN && u32_at(body, 0) & FATTR_SIZE != 0)
                    .then(|| u64_at(body, 16)),
            },
            op::OPEN => {
                need(OPEN_IN, libc::EINVAL)?;
                Self::Open {
                    flags: u32_at(body, 0),
                }
            }
            op::OPENDIR => Self::Opendir,
            op::READ => {
                need(READ_IN, libc::EINVAL)?;
                Self::Read {
                    fh: u64_at(body, 0),
                    offset: u64_at(body, 8),
                    size: u32_at(body, 16),
                }
            }
            op::WRITE => {
                let write_in = WriteIn::parse(body).ok_or(BadRequest {
                    errno: libc::ENOSYS,
                })?;
                Self::Write {
                    write_in,
                    data: &body[WRITE_IN..],
                }
            }
            op::READDIR => {
                if h.nodeid != ROOT_ID {
                    return Err(BadRequest {
                        errno: libc::ENOTDIR,
                    });
                }
                need(READ_IN, libc::EINVAL)?;
                Self::Readdir {
                    offset: u64_at(body, 8),
                    size: u32_at(body, 16),
                }
            }
            op::FSYNC => {
                need(FSYNC_IN, libc::EINVAL)?;
                Self::Fsync {
                    fh: u64_at(body, 0),
                }
            }
            op::FALLOCATE => {
                need(FALLOCATE_IN, libc::EINVAL)?;
                Self::Fallocate {
                    fh: u64_at(body, 0),
                    offset: u64_at(body, 8),
                    length: u64_at(body, 16),
                    mode: i32::from_ne_bytes(body[24..28].try_into().expect("4 bytes")),
                }
            }
            op::STATFS => Self::Statfs,
            op::FLUSH | op::RELEASE | op::RELEASEDIR | op::FSYNCDIR | op::ACCESS | op::DESTROY => {
                Self::Ack
            }
            _ => Self::Unsupported,
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
    (flags, flags2): (u32, u32),
    max_background: u16,
    max_write: u32,
    max_pages: u16,
) -> Out {
    let mut o = Out::with_capacity(64);
    o.u32(MAJOR).u32(minor).u32(max_readahead).u32(flags);
    o.u16(max_background).u16(max_background / 4 * 3); // congestion threshold
    o.u32(max_write).u32(1); // max_write, time_gran
    o.u16(max_pages).u16(0); // max_pages, map_alignment
    o.u32(flags2).zeros(28);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the kernel lays it out: `fuse_in_header`, then `body`.
    fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut o = Out::default();
        o.u32((IN_HEADER + body.len()) as u32)
            .u32(opcode)
            .u64(7)
            .u64(nodeid);
        o.u32(0).u32(0).u32(1234).u32(0); // uid, gid, pid, padding
        o.0.extend_from_slice(body);
        o.0
    }

    /// Header and body decoded as the session does for anything but a long `WRITE`.
    fn decode(bytes: &[u8]) -> Result<Request<'_>, BadRequest> {
        let (h, _) = parse_head(&bytes[..bytes.len().min(HEAD)]).expect("a header");
        Request::decode(&h, &bytes[IN_HEADER..])
    }

    fn header(opcode: u32, nodeid: u64) -> InHeader {
        InHeader {
            len: 0,
            opcode,
            unique: 1,
            nodeid,
        }
    }

    #[test]
    fn headers_decode_and_short_ones_are_refused() {
        let bytes = request(op::GETATTR, 42, &[0; 16]);
        let h = InHeader::parse(&bytes).unwrap();
        assert_eq!(
            (h.len, h.opcode, h.unique, h.nodeid),
            (56, op::GETATTR, 7, 42)
        );
        for len in 0..IN_HEADER {
            assert!(parse_head(&bytes[..len]).is_none(), "{len} bytes");
        }
        assert_eq!(decode(&bytes), Ok(Request::Getattr));
    }

    #[test]
    fn init_decodes_old_and_new_layouts_and_refuses_other_majors() {
        let mut body = Out::default();
        body.u32(MAJOR)
            .u32(39)
            .u32(128 << 10)
            .u32(init::ASYNC_READ | init::MAX_PAGES);
        let want = Request::Init {
            minor: 39,
            max_readahead: 128 << 10,
            flags: init::ASYNC_READ | init::MAX_PAGES,
            flags2: 0,
        };
        assert_eq!(decode(&request(op::INIT, 0, &body.0)), Ok(want));
        // 7.36 and later: flags2 and reserved words follow (64 bytes in all); flags2 counts
        // only with INIT_EXT.
        let mut long = body.0.clone();
        long.resize(64, 0xee);
        assert_eq!(decode(&request(op::INIT, 0, &long)), Ok(want));
        let flags = init::ASYNC_READ | init::INIT_EXT;
        long[12..16].copy_from_slice(&flags.to_ne_bytes());
        long[16..20].copy_from_slice(&init::OVER_IO_URING.to_ne_bytes());
        assert_eq!(
            decode(&request(op::INIT, 0, &long)),
            Ok(Request::Init {
                minor: 39,
                max_readahead: 128 << 10,
                flags,
                flags2: init::OVER_IO_URING,
            })
        );
        // A body that ends before flags2 has none, INIT_EXT or not.
        assert_eq!(
            decode(&request(op::INIT, 0, &long[..INIT_IN])),
            Ok(Request::Init {
                minor: 39,
                max_readahead: 128 << 10,
                flags,
                flags2: 0,
            })
        );
        let eproto = Err(BadRequest {
            errno: libc::EPROTO,
        });
        for len in 0..INIT_IN {
            assert_eq!(decode(&request(op::INIT, 0, &body.0[..len])), eproto);
        }
        let mut other = Out::default();
        other.u32(8).u32(0).u32(0).u32(0);
        assert_eq!(decode(&request(op::INIT, 0, &other.0)), eproto);
    }

    #[test]
    fn lookup_names_end_at_the_first_nul() {
        let r = request(op::LOOKUP, ROOT_ID, b"pvc-1\0junk");
        assert_eq!(decode(&r), Ok(Request::Lookup { name: b"pvc-1" }));
        let r = request(op::LOOKUP, ROOT_ID, b"no-nul");
        assert_eq!(decode(&r), Ok(Request::Lookup { name: b"no-nul" }));
        let r = request(op::LOOKUP, ROOT_ID, b"");
        assert_eq!(decode(&r), Ok(Request::Lookup { name: b"" }));
    }

    #[test]
    fn fixed_bodies_decode_to_their_fields() {
        let mut open = Out::default();
        open.u32(libc::O_RDWR.unsigned_abs() | libc::O_DSYNC.unsigned_abs())
            .u32(0);
        assert_eq!(
            decode(&request(op::OPEN, 2, &open.0)),
            Ok(Request::Open {
                flags: libc::O_RDWR.unsigned_abs() | libc::O_DSYNC.unsigned_abs()
            })
        );
        // fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding.
        let mut read = Out::default();
        read.u64(9)
            .u64(1 << 20)
            .u32(4096)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0);
        assert_eq!(
            decode(&request(op::READ, 2, &read.0)),
            Ok(Request::Read {
                fh: 9,
                offset: 1 << 20,
                size: 4096
            })
        );
        assert_eq!(
            decode(&request(op::READDIR, ROOT_ID, &read.0)),
            Ok(Request::Readdir {
                offset: 1 << 20,
                size: 4096
            })
        );
        // fuse_fsync_in: fh, fsync_flags, padding.
        let mut fsync = Out::default();
        fsync.u64(9).u32(1).u32(0);
        assert_eq!(
            decode(&request(op::FSYNC, 2, &fsync.0)),
            Ok(Request::Fsync { fh: 9 })
        );
        // fuse_fallocate_in: fh, offset, length, mode, padding.
        let mut falloc = Out::default();
        falloc.u64(9).u64(8192).u64(4096);
        falloc
            .u32(libc::FALLOC_FL_PUNCH_HOLE.unsigned_abs() | 1)
            .u32(0);
        assert_eq!(
            decode(&request(op::FALLOCATE, 2, &falloc.0)),
            Ok(Request::Fallocate {
                fh: 9,
                offset: 8192,
                length: 4096,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            })
        );
        // fuse_setattr_in (88 bytes): valid, padding, fh, size, …
        let mut setattr = Out::default();
        setattr.u32(FATTR_SIZE).u32(0).u64(0).u64(1 << 30).zeros(64);
        assert_eq!(
            decode(&request(op::SETATTR, 2, &setattr.0)),
            Ok(Request::Setattr {
                size: Some(1 << 30)
            })
        );
        setattr.0[0] = 0; // a mode change, say: not the size
        assert_eq!(
            decode(&request(op::SETATTR, 2, &setattr.0)),
            Ok(Request::Setattr { size: None })
        );
        for opcode in [
            op::FLUSH,
            op::RELEASE,
            op::RELEASEDIR,
            op::FSYNCDIR,
            op::ACCESS,
        ] {
            assert_eq!(decode(&request(opcode, 2, &[0; 24])), Ok(Request::Ack));
        }
        assert_eq!(decode(&request(op::DESTROY, 0, &[])), Ok(Request::Ack));
        assert_eq!(decode(&request(op::STATFS, 1, &[])), Ok(Request::Statfs));
        assert_eq!(
            decode(&request(op::FORGET, 2, &[1, 0, 0, 0, 0, 0, 0, 0])),
            Ok(Request::Forget)
        );
        assert_eq!(
            decode(&request(op::INTERRUPT, 0, &[0; 8])),
            Ok(Request::Unsupported)
        );
    }

    #[test]
    fn writes_decode_the_same_from_the_head_and_from_the_whole_body() {
        // fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding.
        let mut write_in = Out::default();
        write_in.u64(9).u64(4096).u32(4096).u32(0).u64(0);
        write_in.u32(libc::O_SYNC.unsigned_abs()).u32(0);
        let payload = [0x5a; 4096];
        let mut body = write_in.0.clone();
        body.extend_from_slice(&payload);
        let bytes = request(op::WRITE, 2, &body);
        let want = WriteIn {
            fh: 9,
            offset: 4096,
            size: 4096,
            flags: libc::O_SYNC.unsigned_abs(),
        };
        assert_eq!(parse_head(&bytes[..HEAD]).unwrap().1, Some(want));
        assert_eq!(
            decode(&bytes),
            Ok(Request::Write {
                write_in: want,
                data: &payload
            })
        );
        // Without a whole fuse_write_in it is no write (the session dispatches it).
        for len in 0..WRITE_IN {
            let short = &bytes[..IN_HEADER + len];
            assert_eq!(parse_head(short).unwrap().1, None);
            assert_eq!(
                decode(short),
                Err(BadRequest {
                    errno: libc::ENOSYS
                })
            );
        }
    }

    #[test]
    fn truncated_bodies_are_refused() {
        let einval = Err(BadRequest {
            errno: libc::EINVAL,
        });
        for (opcode, need) in [
            (op::OPEN, OPEN_IN),
            (op::READ, READ_IN),
            (op::READDIR, READ_IN),
            (op::FSYNC, FSYNC_IN),
            (op::FALLOCATE, FALLOCATE_IN),
        ] {
            for len in 0..need {
                let body = vec![0xff; len];
                assert_eq!(
                    Request::decode(&header(opcode, ROOT_ID), &body),
                    einval,
                    "opcode {opcode}, {len} bytes"
                );
            }
            assert!(Request::decode(&header(opcode, ROOT_ID), &vec![0xff; need]).is_ok());
        }
        // A short setattr sets nothing (it is answered as a getattr).
        assert_eq!(
            Request::decode(&header(op::SETATTR, 2), &[0xff; SETATTR_IN - 1]),
            Ok(Request::Setattr { size: None })
        );
        // A readdir of another node is refused before its body is looked at.
        assert_eq!(
            Request::decode(&header(op::READDIR, 2), &[]),
            Err(BadRequest {
                errno: libc::ENOTDIR
            })
        );
    }

    #[test]
    fn no_opcode_and_no_body_length_panics() {
        let body: Vec<u8> = (0..=255).collect();
        for opcode in 0..64 {
            for nodeid in [0, ROOT_ID, 2] {
                for len in 0..=body.len() {
                    let decoded = Request::decode(&header(opcode, nodeid), &body[..len]);
                    // Whatever decodes still decodes, the same, with more bytes after it.
                    if let (Ok(short), Some(longer)) = (decoded, body.get(..=len)) {
                        let again = Request::decode(&header(opcode, nodeid), longer).unwrap();
                        if !matches!(short, Request::Lookup { .. } | Request::Write { .. }) {
                            assert_eq!(short, again, "opcode {opcode}, {len} bytes");
                        }
                    }
                }
            }
        }
    }
}
