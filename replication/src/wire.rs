//! The replica wire protocol: framed, CRC32C-checked request and response messages.
//!
//! # Frame layout
//!
//! Every message is one frame: a fixed [`HEADER_LEN`]-byte header followed by a body. All
//! integers are little-endian.
//!
//! | bytes  | field      | notes                                                         |
//! |--------|------------|---------------------------------------------------------------|
//! | 0..4   | magic      | [`MAGIC`] (`b"BLRP"`)                                         |
//! | 4      | version    | [`VERSION`]                                                   |
//! | 5      | kind       | the message type (a request kind or a response kind)          |
//! | 6..8   | flags      | must be 0 in version 1                                        |
//! | 8..16  | request id | chosen by the client, echoed by the server's response         |
//! | 16..20 | body len   | at most [`MAX_BODY`]                                          |
//! | 20..24 | crc32c     | over bytes 0..20 of the header followed by the whole body     |
//!
//! Bodies are the message's fields in order. Strings are a `u16` byte length followed by
//! UTF-8. Messages that carry a data payload put it *first* in the body, so a receiver can read
//! the body straight into an aligned [`IoBuf`] and hand the payload on without copying it:
//! - `Data` (response): the body is the payload, nothing else;
//! - `Write` (request): payload, then the fields, then the payload length as a `u32`, so the
//!   fields can be found from the end of the body.
//!
//! # Invariants
//!
//! - A decoder never allocates from an untrusted length before checking it against
//!   [`MAX_BODY`] (or, for strings, against the bytes actually present).
//! - A decoder never panics: any malformed input is a [`WireError`] or "need more bytes".
//! - A frame is only decoded after its CRC has matched, and every body must be consumed
//!   exactly (trailing bytes are an error), so encoding is injective and decoding is its
//!   inverse.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use volume::device::DeviceErrorKind;
use volume::io::IoBuf;

/// The frame magic, `b"BLRP"` (Ballast Replica Protocol).
pub const MAGIC: [u8; 4] = *b"BLRP";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// The fixed size of a frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// The largest data payload of a single read or write.
pub const MAX_IO: usize = 8 << 20;
/// The largest frame body accepted: [`MAX_IO`] plus room for the other fields.
pub const MAX_BODY: usize = MAX_IO + 4096;
/// The longest string a frame can carry.
pub const MAX_STRING: usize = u16::MAX as usize;

/// Where the CRC sits in the header; it covers everything before it.
const CRC_AT: usize = 20;

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const READ: u8 = 0x03;
    pub const WRITE: u8 = 0x04;
    pub const FLUSH: u8 = 0x05;
    pub const DISCARD: u8 = 0x06;
    pub const WRITE_ZEROES: u8 = 0x07;
    pub const CREATE: u8 = 0x08;
    pub const DELETE: u8 = 0x09;
    pub const STAT: u8 = 0x0a;
    pub const GENERATIONS: u8 = 0x0b;
    pub const RESIZE: u8 = 0x0c;
    pub const SNAPSHOT: u8 = 0x0d;
    pub const REVERT: u8 = 0x0e;
    pub const CLONE: u8 = 0x0f;
    pub const DELETE_SNAPSHOT: u8 = 0x10;
    pub const TAKE_SNAPSHOT: u8 = 0x11;
    pub const CHAIN: u8 = 0x12;
    pub const READ_LINK: u8 = 0x13;

    pub const OK: u8 = 0x81;
    pub const DATA: u8 = 0x82;
    pub const STAT_REPLY: u8 = 0x83;
    pub const STALE: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const GENERATIONS_REPLY: u8 = 0x86;
}

/// Why a frame could not be decoded or transferred.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad frame magic {0:02x?}; the peer does not speak the Ballast replica protocol")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// The header's flags are not zero.
    #[error("unsupported frame flags {0:#06x}")]
    BadFlags(u16),
    /// The kind byte is not a message this side can receive.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// The body length is above [`MAX_BODY`].
    #[error("frame body of {0} bytes is above the maximum of {MAX_BODY}")]
    TooLong(u64),
    /// The CRC does not match the header and body.
    #[error("frame checksum mismatch: header says {expected:#010x}, content has {actual:#010x}")]
    Checksum {
        /// The CRC in the header.
        expected: u32,
        /// The CRC computed over the frame.
        actual: u32,
    },
    /// The body ended in the middle of a field.
    #[error("message body ends inside field {0}")]
    Truncated(&'static str),
    /// The body has bytes after the last field.
    #[error("message body has {0} unexpected trailing bytes")]
    Trailing(usize),
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    BadUtf8(&'static str),
    /// A field holds a value outside its domain.
    #[error("field {0} holds an invalid value")]
    BadValue(&'static str),
    /// The connection ended in the middle of a frame.
    #[error("the connection closed in the middle of a frame")]
    UnexpectedEof,
    /// Reading or writing the connection failed.
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
}

/// Error codes carried by [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrCode {
    /// See [`DeviceErrorKind::Unaligned`].
    Unaligned,
    /// See [`DeviceErrorKind::OutOfRange`].
    OutOfRange,
    /// See [`DeviceErrorKind::Checksum`].
    Checksum,
    /// See [`DeviceErrorKind::NoSpace`].
    NoSpace,
    /// See [`DeviceErrorKind::Io`].
    Io,
    /// See [`DeviceErrorKind::Closed`].
    Closed,
    /// See [`DeviceErrorKind::Fenced`].
    Fenced,
    /// The volume has no replica on this node.
    NotFound,
    /// The request is malformed (a bad volume name, an oversized read, …).
    Invalid,
    /// The request's epoch is newer than the one registered: register first.
    NotRegistered,
    /// The volume exists with a different size.
    Conflict,
}

impl ErrCode {
    /// Every code, for exhaustive tests.
    pub const ALL: [ErrCode; 11] = [
        ErrCode::Unaligned,
        ErrCode::OutOfRange,
        ErrCode::Checksum,
        ErrCode::NoSpace,
        ErrCode::Io,
        ErrCode::Closed,
        ErrCode::Fenced,
        ErrCode::NotFound,
        ErrCode::Invalid,
        ErrCode::NotRegistered,
        ErrCode::Conflict,
    ];

    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrCode::Unaligned => 1,
            ErrCode::OutOfRange => 2,
            ErrCode::Checksum => 3,
            ErrCode::NoSpace => 4,
            ErrCode::Io => 5,
            ErrCode::Closed => 6,
            ErrCode::Fenced => 7,
            ErrCode::NotFound => 8,
            ErrCode::Invalid => 9,
            ErrCode::NotRegistered => 10,
            ErrCode::Conflict => 11,
        }
    }

    /// The code for a wire number, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.to_u16() == v)
    }

    /// The data-path error kind a client reports for this code.
    ///
    /// Codes without a device counterpart map to the nearest meaning: `NotFound` (the replica
    /// is gone) to `Closed`; `Invalid`, `NotRegistered` and `Conflict` to `Io`.
    pub fn device_kind(self) -> DeviceErrorKind {
        match self {
            ErrCode::Unaligned => DeviceErrorKind::Unaligned,
            ErrCode::OutOfRange => DeviceErrorKind::OutOfRange,
            ErrCode::Checksum => DeviceErrorKind::Checksum,
            ErrCode::NoSpace => DeviceErrorKind::NoSpace,
            ErrCode::Closed | ErrCode::NotFound => DeviceErrorKind::Closed,
            ErrCode::Fenced => DeviceErrorKind::Fenced,
            ErrCode::Io | ErrCode::Invalid | ErrCode::NotRegistered | ErrCode::Conflict => {
                DeviceErrorKind::Io
            }
        }
    }
}

impl From<DeviceErrorKind> for ErrCode {
    fn from(kind: DeviceErrorKind) -> Self {
        match kind {
            DeviceErrorKind::Unaligned => ErrCode::Unaligned,
            DeviceErrorKind::OutOfRange => ErrCode::OutOfRange,
            DeviceErrorKind::Checksum => ErrCode::Checksum,
            DeviceErrorKind::NoSpace => ErrCode::NoSpace,
            DeviceErrorKind::Closed => ErrCode::Closed,
            DeviceErrorKind::Fenced => ErrCode::Fenced,
            // `Io`, and any kind added later, is reported as a plain I/O failure.
            _ => ErrCode::Io,
        }
    }
}

/// A request from a client (the attached node) to a replica server.
///
/// Data requests carry the attachment `epoch`; the server rejects any epoch older than the
/// one registered for the volume with [`Response::Stale`].
#[derive(Debug, Clone)]
pub enum Request {
    /// Introduce the client; answered with `Ok`.
    Hello {
        /// The client's node ID, for logs.
        node: String,
    },
    /// Register an attachment epoch for a volume (fence out older writers).
    Register {
        /// The volume.
        volume: String,
        /// The new attachment's epoch.
        epoch: u64,
    },
    /// Read `len` bytes at `offset`; answered with `Data`.
    Read {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length, at most [`MAX_IO`].
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Force unit access.
        fua: bool,
        /// The nexus's write generation (0: the replica numbers it).
        generation: u64,
        /// The bytes to write, at most [`MAX_IO`].
        data: IoBuf,
    },
    /// Make completed writes durable.
    Flush {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
    },
    /// Release a range; it reads back as zeros.
    Discard {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Make a range read back as zeros.
    WriteZeroes {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Create the local replica if absent; idempotent for the same size.
    Create {
        /// The volume.
        volume: String,
        /// Size in bytes.
        size: u64,
    },
    /// Delete the local replica; idempotent.
    Delete {
        /// The volume.
        volume: String,
    },
    /// Grow the local replica to at least `size` bytes; idempotent (a replica that holds
    /// `size` bytes already is left as it is). With `dry_run`, only check that it could: the
    /// replica exists and its pool device can hold `size` bytes. Refused with `NotFound` for
    /// no replica, `NoSpace` when the pool device is too small.
    Resize {
        /// The volume.
        volume: String,
        /// The new size in bytes.
        size: u64,
        /// Check only; change nothing.
        dry_run: bool,
    },
    /// Report the replica's size and allocation; answered with `Stat`.
    Stat {
        /// The volume.
        volume: String,
    },
    /// List allocated extents and their write generations, from extent `from` on; answered
    /// with `Generations`, at most [`MAX_GENERATIONS`] extents at a time.
    Generations {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// The first extent index to report.
        from: u64,
    },
    /// Snapshot the local replica as `name` (idempotent). Sent by the attached node under its
    /// write barrier, fenced like a write.
    Snapshot {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// The snapshot's name.
        name: String,
    },
    /// Make the local replica read what its snapshot `snapshot` holds, fenced like a write.
    Revert {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// The snapshot.
        snapshot: String,
    },
    /// Create volume `volume` from the local copy of snapshot `snapshot` (`size` bytes, 0:
    /// the snapshot's); idempotent for the same clone.
    Clone {
        /// The snapshot.
        snapshot: String,
        /// The new volume.
        volume: String,
        /// Its size in bytes (0: the snapshot's).
        size: u64,
    },
    /// Delete the local copy of snapshot `name`; idempotent.
    DeleteSnapshot {
        /// The snapshot.
        name: String,
    },
    /// Take snapshot `name` of `volume`, which this node holds attached, under its write
    /// barrier, and record it in the cluster store: a node asks the node that holds the
    /// attachment.
    TakeSnapshot {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// The snapshots the local replica reads through (`volume::pool::Chain`, as JSON in a
    /// `Data` answer), fenced like a read.
    Chain {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
    },
    /// The extent `extent` that link `link` of the chain read at `chain_epoch` maps itself,
    /// answered with `Data` (one extent), fenced like a read.
    ReadLink {
        /// The volume.
        volume: String,
        /// The attachment epoch.
        epoch: u64,
        /// The chain's epoch.
        chain_epoch: u64,
        /// The link, oldest first.
        link: u32,
        /// The logical extent.
        extent: u64,
    },
}

/// The most extents one `Generations` answer carries (16 bytes each).
pub const MAX_GENERATIONS: usize = 1 << 18;

/// A server's answer to one [`Request`], carrying the request's id.
#[derive(Debug, Clone)]
pub enum Response {
    /// Success without data.
    Ok,
    /// The bytes of a read.
    Data(IoBuf),
    /// The answer to `Stat`.
    Stat {
        /// Size in bytes.
        size: u64,
        /// Bytes of pool space allocated.
        allocated: u64,
    },
    /// The answer to `Generations`: allocated extents as `(index, generation)`, in order.
    Generations {
        /// The extent size in bytes.
        extent_size: u64,
        /// Allocated extents from the requested index on, at most [`MAX_GENERATIONS`].
        extents: Vec<(u64, u64)>,
        /// Where the next page starts, if there is more.
        next: Option<u64>,
    },
    /// The request's epoch is older than the replica's: a newer attachment owns the volume.
    Stale {
        /// The replica's current epoch.
        epoch: u64,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrCode,
        /// A sentence-case description.
        message: String,
    },
}

/// A message type that travels in frames: [`Request`] or [`Response`].
pub trait Message: Sized + Send {
    /// The kind byte of this message.
    fn kind(&self) -> u8;

    /// The data payload placed first in the body, if the message has one.
    fn payload(&self) -> Option<&[u8]>;

    /// Append the fields that follow the payload.
    fn encode_fields(&self, out: &mut Vec<u8>);

    /// Whether frames of `kind` carry a payload first (so are best received into an `IoBuf`).
    fn has_payload(kind: u8) -> bool;

    /// Decode a CRC-checked body of `kind`.
    fn decode_body(kind: u8, body: Body<'_>) -> Result<Self, WireError>;
}

/// A frame body handed to [`Message::decode_body`]: borrowed from a receive buffer, or an
/// owned aligned buffer whose leading payload can be kept without copying.
#[derive(Debug)]
pub enum Body<'a> {
    /// Bytes borrowed from the caller; a payload is copied out into a new `IoBuf`.
    Slice(&'a [u8]),
    /// An owned buffer; a leading payload is kept in place by shortening it.
    Owned(IoBuf),
}

impl Body<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Slice(s) => s,
            Body::Owned(b) => b,
        }
    }

    /// The first `n` bytes as an `IoBuf` (`n` must be within the body).
    fn into_payload(self, n: usize) -> IoBuf {
        match self {
            Body::Slice(s) => IoBuf::from_slice(&s[..n]),
            Body::Owned(mut b) => {
                b.set_len(n);
                b
            }
        }
    }
}

/// A cursor over body fields that reports truncation instead of panicking.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated(field));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadValue(field)),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u16(field)? as usize;
        let bytes = self.take(n, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::BadUtf8(field))
    }

    fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.rest.len()))
        }
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Append a length-prefixed string. Strings longer than [`MAX_STRING`] bytes are cut at the
/// last character boundary that fits (no valid volume or node name comes close).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(MAX_STRING);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

impl Message for Request {
    fn kind(&self) -> u8 {
        match self {
            Request::Hello { .. } => kind::HELLO,
            Request::Register { .. } => kind::REGISTER,
            Request::Read { .. } => kind::READ,
            Request::Write { .. } => kind::WRITE,
            Request::Flush { .. } => kind::FLUSH,
            Request::Discard { .. } => kind::DISCARD,
            Request::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Request::Create { .. } => kind::CREATE,
            Request::Delete { .. } => kind::DELETE,
            Request::Stat { .. } => kind::STAT,
            Request::Generations { .. } => kind::GENERATIONS,
            Request::Resize { .. } => kind::RESIZE,
            Request::Snapshot { .. } => kind::SNAPSHOT,
            Request::Revert { .. } => kind::REVERT,
            Request::Clone { .. } => kind::CLONE,
            Request::DeleteSnapshot { .. } => kind::DELETE_SNAPSHOT,
            Request::TakeSnapshot { .. } => kind::TAKE_SNAPSHOT,
            Request::Chain { .. } => kind::CHAIN,
            Request::ReadLink { .. } => kind::READ_LINK,
        }
    }

    fn payload(&self) -> Option<&[u8]> {
        match self {
            Request::Write { data, .. } => Some(data),
            _ => None,
        }
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            Request::Hello { node } => put_str(out, node),
            Request::Register { volume, epoch }
            | Request::Flush { volume, epoch }
            | Request::Chain { volume, epoch } => {
                put_str(out, volume);
                put_u64(out, *epoch);
            }
            Request::Read {
                volume,
                epoch,
                offset,
                len,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_u64(out, *offset);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Request::Write {
                volume,
                epoch,
                offset,
                fua,
                generation,
                data,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_u64(out, *offset);
                out.push(u8::from(*fua));
                put_u64(out, *generation);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            }
            Request::Discard {
                volume,
                epoch,
                offset,
                len,
            }
            | Request::WriteZeroes {
                volume,
                epoch,
                offset,
                len,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_u64(out, *offset);
                put_u64(out, *len);
            }
            Request::Create { volume, size } => {
                put_str(out, volume);
                put_u64(out, *size);
            }
            Request::Resize {
                volume,
                size,
                dry_run,
            } => {
                put_str(out, volume);
                put_u64(out, *size);
                out.push(u8::from(*dry_run));
            }
            Request::Delete { volume }
            | Request::Stat { volume }
            | Request::DeleteSnapshot { name: volume } => put_str(out, volume),
            Request::Snapshot {
                volume,
                epoch,
                name,
            }
            | Request::Revert {
                volume,
                epoch,
                snapshot: name,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_str(out, name);
            }
            Request::Clone {
                snapshot,
                volume,
                size,
            } => {
                put_str(out, snapshot);
                put_str(out, volume);
                put_u64(out, *size);
            }
            Request::TakeSnapshot { volume, name } => {
                put_str(out, volume);
                put_str(out, name);
            }
            Request::ReadLink {
                volume,
                epoch,
                chain_epoch,
                link,
                extent,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_u64(out, *chain_epoch);
                out.extend_from_slice(&link.to_le_bytes());
                put_u64(out, *extent);
            }
            Request::Generations {
                volume,
                epoch,
                from,
            } => {
                put_str(out, volume);
                put_u64(out, *epoch);
                put_u64(out, *from);
            }
        }
    }

    fn has_payload(kind: u8) -> bool {
        kind == kind::WRITE
    }

    fn decode_body(k: u8, body: Body<'_>) -> Result<Self, WireError> {
        if k == kind::WRITE {
            // Payload first; its length is the last four bytes of the body.
            let bytes = body.bytes();
            let Some(split) = bytes.len().checked_sub(4) else {
                return Err(WireError::Truncated("data length"));
            };
            let mut len = [0u8; 4];
            len.copy_from_slice(&bytes[split..]);
            let n = u32::from_le_bytes(len) as usize;
            if n > split {
                return Err(WireError::BadValue("data length"));
            }
            let mut f = Fields {
                rest: &bytes[n..split],
            };
            let volume = f.string("volume")?;
            let epoch = f.u64("epoch")?;
            let offset = f.u64("offset")?;
            let fua = f.bool("fua")?;
            let generation = f.u64("generation")?;
            f.finish()?;
            return Ok(Request::Write {
                volume,
                epoch,
                offset,
                fua,
                generation,
                data: body.into_payload(n),
            });
        }
        let mut f = Fields { rest: body.bytes() };
        let req = match k {
            kind::HELLO => Request::Hello {
                node: f.string("node")?,
            },
            kind::REGISTER => Request::Register {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
            },
            kind::READ => Request::Read {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                offset: f.u64("offset")?,
                len: f.u32("len")?,
            },
            kind::FLUSH => Request::Flush {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
            },
            kind::DISCARD => Request::Discard {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                offset: f.u64("offset")?,
                len: f.u64("len")?,
            },
            kind::WRITE_ZEROES => Request::WriteZeroes {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                offset: f.u64("offset")?,
                len: f.u64("len")?,
            },
            kind::CREATE => Request::Create {
                volume: f.string("volume")?,
                size: f.u64("size")?,
            },
            kind::DELETE => Request::Delete {
                volume: f.string("volume")?,
            },
            kind::RESIZE => Request::Resize {
                volume: f.string("volume")?,
                size: f.u64("size")?,
                dry_run: f.bool("dry_run")?,
            },
            kind::STAT => Request::Stat {
                volume: f.string("volume")?,
            },
            kind::GENERATIONS => Request::Generations {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                from: f.u64("from")?,
            },
            kind::SNAPSHOT => Request::Snapshot {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                name: f.string("name")?,
            },
            kind::REVERT => Request::Revert {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                snapshot: f.string("snapshot")?,
            },
            kind::CLONE => Request::Clone {
                snapshot: f.string("snapshot")?,
                volume: f.string("volume")?,
                size: f.u64("size")?,
            },
            kind::DELETE_SNAPSHOT => Request::DeleteSnapshot {
                name: f.string("name")?,
            },
            kind::TAKE_SNAPSHOT => Request::TakeSnapshot {
                volume: f.string("volume")?,
                name: f.string("name")?,
            },
            kind::CHAIN => Request::Chain {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
            },
            kind::READ_LINK => Request::ReadLink {
                volume: f.string("volume")?,
                epoch: f.u64("epoch")?,
                chain_epoch: f.u64("chain_epoch")?,
                link: f.u32("link")?,
                extent: f.u64("extent")?,
            },
            other => return Err(WireError::UnknownKind(other)),
        };
        f.finish()?;
        Ok(req)
    }
}

impl Message for Response {
    fn kind(&self) -> u8 {
        match self {
            Response::Ok => kind::OK,
            Response::Data(_) => kind::DATA,
            Response::Stat { .. } => kind::STAT_REPLY,
            Response::Stale { .. } => kind::STALE,
            Response::Error { .. } => kind::ERROR,
            Response::Generations { .. } => kind::GENERATIONS_REPLY,
        }
    }

    fn payload(&self) -> Option<&[u8]> {
        match self {
            Response::Data(d) => Some(d),
            _ => None,
        }
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
            Response::Ok | Response::Data(_) => {}
            Response::Stat { size, allocated } => {
                put_u64(out, *size);
                put_u64(out, *allocated);
            }
            Response::Stale { epoch } => put_u64(out, *epoch),
            Response::Generations {
                extent_size,
                extents,
                next,
            } => {
                put_u64(out, *extent_size);
                put_u64(out, next.unwrap_or(u64::MAX));
                out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
                for &(i, g) in extents {
                    put_u64(out, i);
                    put_u64(out, g);
                }
            }
            Response::Error { code, message } => {
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                put_str(out, message);
            }
        }
    }

    fn has_payload(kind: u8) -> bool {
        kind == kind::DATA
    }

    fn decode_body(k: u8, body: Body<'_>) -> Result<Self, WireError> {
        if k == kind::DATA {
            let n = body.bytes().len();
            return Ok(Response::Data(body.into_payload(n)));
        }
        let mut f = Fields { rest: body.bytes() };
        let resp = match k {
            kind::OK => Response::Ok,
            kind::STAT_REPLY => Response::Stat {
                size: f.u64("size")?,
                allocated: f.u64("allocated")?,
            },
            kind::STALE => Response::Stale {
                epoch: f.u64("epoch")?,
            },
            kind::GENERATIONS_REPLY => {
                let extent_size = f.u64("extent_size")?;
                let next = Some(f.u64("next")?).filter(|&n| n != u64::MAX);
                let n = f.u32("count")? as usize;
                if n > MAX_GENERATIONS || n * 16 > f.rest.len() {
                    return Err(WireError::BadValue("count"));
                }
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push((f.u64("extent")?, f.u64("generation")?));
                }
                Response::Generations {
                    extent_size,
                    extents,
                    next,
                }
            }
            kind::ERROR => {
                let code = ErrCode::from_u16(f.u16("code")?).ok_or(WireError::BadValue("code"))?;
                Response::Error {
                    code,
                    message: f.string("message")?,
                }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        f.finish()?;
        Ok(resp)
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u8,
    id: u64,
    body_len: usize,
    crc: u32,
}

/// Check as much of a header as `buf` holds: magic and version are rejected as soon as their
/// bytes are present, so garbage is refused without waiting for a whole header.
fn check_prefix(buf: &[u8]) -> Result<(), WireError> {
    let n = buf.len().min(4);
    if buf[..n] != MAGIC[..n] {
        let mut m = [0u8; 4];
        m[..n].copy_from_slice(&buf[..n]);
        return Err(WireError::BadMagic(m));
    }
    match buf.get(4) {
        Some(&v) if v != VERSION => Err(WireError::BadVersion(v)),
        _ => Ok(()),
    }
}

/// Parse and validate a complete header (everything but the CRC match).
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    check_prefix(h)?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[8..16]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&h[16..20]);
    let body_len = u32::from_le_bytes(len) as usize;
    if body_len > MAX_BODY {
        return Err(WireError::TooLong(body_len as u64));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&h[20..24]);
    Ok(Header {
        kind: h[5],
        id: u64::from_le_bytes(id),
        body_len,
        crc: u32::from_le_bytes(crc),
    })
}

fn check_crc(header: &[u8], hdr: &Header, body: &[u8]) -> Result<(), WireError> {
    // A fuzzing build skips the check, so random bodies reach the decoders.
    if cfg!(fuzzing) {
        return Ok(());
    }
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_AT]), body);
    if actual == hdr.crc {
        Ok(())
    } else {
        Err(WireError::Checksum {
            expected: hdr.crc,
            actual,
        })
    }
}

/// Build the header and the trailing fields of `msg`; the frame is
/// `header ‖ payload ‖ fields`.
fn frame_parts<M: Message>(id: u64, msg: &M) -> ([u8; HEADER_LEN], Option<&[u8]>, Vec<u8>) {
    let payload = msg.payload();
    let mut fields = Vec::with_capacity(32);
    msg.encode_fields(&mut fields);
    let body_len = payload.map_or(0, <[u8]>::len) + fields.len();
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = msg.kind();
    h[8..16].copy_from_slice(&id.to_le_bytes());
    // Bodies above `u32::MAX` cannot be framed; the length wraps and the receiver rejects the
    // frame. Senders keep payloads within `MAX_IO`.
    h[16..20].copy_from_slice(&(body_len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&h[..CRC_AT]);
    if let Some(p) = payload {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc = crc32c::crc32c_append(crc, &fields);
    h[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    (h, payload, fields)
}

/// Append the frame of any message to `out`.
pub fn encode<M: Message>(id: u64, msg: &M, out: &mut Vec<u8>) {
    let (h, payload, fields) = frame_parts(id, msg);
    out.extend_from_slice(&h);
    if let Some(p) = payload {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&fields);
}

/// Append the frame of request `id` to `out`.
pub fn encode_request(id: u64, req: &Request, out: &mut Vec<u8>) {
    encode(id, req, out);
}

/// Append the frame of the response to request `id` to `out`.
pub fn encode_response(id: u64, resp: &Response, out: &mut Vec<u8>) {
    encode(id, resp, out);
}

/// Decode one frame from the start of `buf`.
///
/// Returns `Ok(None)` if `buf` holds only a prefix of a frame (that is valid so far),
/// `Ok(Some((id, message, consumed)))` for a complete frame of `consumed` bytes, or an error
/// for anything malformed. The payload of a data message is copied into a new `IoBuf`.
pub fn decode<M: Message>(buf: &[u8]) -> Result<Option<(u64, M, usize)>, WireError> {
    check_prefix(buf)?;
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let hdr = parse_header(head)?;
    let Some(body) = buf[HEADER_LEN..].get(..hdr.body_len) else {
        return Ok(None);
    };
    check_crc(head, &hdr, body)?;
    let msg = M::decode_body(hdr.kind, Body::Slice(body))?;
    Ok(Some((hdr.id, msg, HEADER_LEN + hdr.body_len)))
}

/// [`decode`] for requests.
pub fn decode_request(buf: &[u8]) -> Result<Option<(u64, Request, usize)>, WireError> {
    decode(buf)
}

/// [`decode`] for responses.
pub fn decode_response(buf: &[u8]) -> Result<Option<(u64, Response, usize)>, WireError> {
    decode(buf)
}

/// Read exactly `buf.len()` bytes; a clean EOF before the first byte is `Ok(false)` when
/// `eof_ok`, and an EOF anywhere else is [`WireError::UnexpectedEof`].
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    eof_ok: bool,
) -> Result<bool, WireError> {
    let mut done = 0;
    while done < buf.len() {
        let n = r.read(&mut buf[done..]).await?;
        if n == 0 {
            return if done == 0 && eof_ok {
                Ok(false)
            } else {
                Err(WireError::UnexpectedEof)
            };
        }
        done += n;
    }
    Ok(true)
}

/// Read one frame from `r`.
///
/// Returns `Ok(None)` on a clean end of stream between frames. The body length is checked
/// against [`MAX_BODY`] before anything is allocated; a data payload is read straight into an
/// aligned `IoBuf` and handed on without copying. Not cancel-safe: dropping the future in the
/// middle of a frame leaves the stream unusable.
pub async fn read_frame<M: Message, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(u64, M)>, WireError> {
    let mut head = [0u8; HEADER_LEN];
    if !read_full(r, &mut head, true).await? {
        return Ok(None);
    }
    let hdr = parse_header(&head)?;
    let body = if M::has_payload(hdr.kind) {
        let mut b = IoBuf::zeroed(hdr.body_len);
        read_full(r, &mut b, false).await?;
        check_crc(&head, &hdr, &b)?;
        Body::Owned(b)
    } else {
        let mut v = vec![0u8; hdr.body_len];
        read_full(r, &mut v, false).await?;
        check_crc(&head, &hdr, &v)?;
        return Ok(Some((hdr.id, M::decode_body(hdr.kind, Body::Slice(&v))?)));
    };
    Ok(Some((hdr.id, M::decode_body(hdr.kind, body)?)))
}

/// Write one frame to `w` (without flushing). A data payload is written from the message's
/// own buffer, not copied. Not cancel-safe: dropping the future in the middle of a frame
/// leaves the stream unusable.
pub async fn write_frame<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    id: u64,
    msg: &M,
) -> Result<(), WireError> {
    let (h, payload, fields) = frame_parts(id, msg);
    match payload {
        Some(p) if !p.is_empty() => {
            w.write_all(&h).await?;
            w.write_all(p).await?;
            if !fields.is_empty() {
                w.write_all(&fields).await?;
            }
        }
        _ => {
            let mut v = Vec::with_capacity(HEADER_LEN + fields.len());
            v.extend_from_slice(&h);
            v.extend_from_slice(&fields);
            w.write_all(&v).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let mut out = Vec::new();
        encode_request(7, &Request::Delete { volume: "v".into() }, &mut out);
        assert_eq!(&out[..4], b"BLRP");
        assert_eq!(out[4], VERSION);
        assert_eq!(out[5], kind::DELETE);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(out[16..20].try_into().unwrap()), 3);
        assert_eq!(out.len(), HEADER_LEN + 3);
    }

    #[test]
    fn too_long_is_refused_from_the_header() {
        let mut out = Vec::new();
        encode_response(1, &Response::Ok, &mut out);
        out[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_response(&out), Err(WireError::TooLong(_))));
    }

    #[test]
    fn wrong_direction_is_unknown_kind() {
        let mut out = Vec::new();
        encode_response(1, &Response::Ok, &mut out);
        assert!(matches!(
            decode_request(&out),
            Err(WireError::UnknownKind(0x81))
        ));
    }

    #[test]
    fn garbage_is_refused_early() {
        assert!(matches!(
            decode_request(b"GET "),
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(decode_request(b"BL"), Ok(None)));
        assert!(matches!(decode_request(b""), Ok(None)));
    }

    #[test]
    fn err_codes_round_trip() {
        for c in ErrCode::ALL {
            assert_eq!(ErrCode::from_u16(c.to_u16()), Some(c));
        }
        assert_eq!(ErrCode::from_u16(0), None);
        assert_eq!(
            ErrCode::from(DeviceErrorKind::OutOfRange).device_kind(),
            DeviceErrorKind::OutOfRange
        );
    }

    #[tokio::test]
    async fn async_frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let data = IoBuf::from_slice(&[5u8; 8192]);
        let req = Request::Write {
            volume: "vol".into(),
            epoch: 3,
            offset: 4096,
            fua: true,
            generation: 77,
            data,
        };
        let writer = tokio::spawn(async move {
            write_frame(&mut a, 9, &req).await.unwrap();
            write_frame(
                &mut a,
                10,
                &Request::Flush {
                    volume: "vol".into(),
                    epoch: 3,
                },
            )
            .await
            .unwrap();
        });
        let (id, got) = read_frame::<Request, _>(&mut b).await.unwrap().unwrap();
        assert_eq!(id, 9);
        let Request::Write {
            data,
            fua,
            generation,
            ..
        } = got
        else {
            panic!("not a write");
        };
        assert!(fua);
        assert_eq!(generation, 77);
        assert_eq!(data.len(), 8192);
        assert_eq!(data.as_ptr() as usize % volume::io::buf::IO_ALIGN, 0);
        assert!(data.iter().all(|&x| x == 5));
        let (id, _) = read_frame::<Request, _>(&mut b).await.unwrap().unwrap();
        assert_eq!(id, 10);
        writer.await.unwrap();
        assert!(read_frame::<Request, _>(&mut b).await.unwrap().is_none());
    }
}
