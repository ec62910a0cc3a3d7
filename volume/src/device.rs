//! The `BlockDevice` trait: what a volume looks like to everything above the engine.
//!
//! Semantics are those of a real disk with a volatile write cache:
//! - a completed `write` may sit in a volatile cache until a `flush` completes;
//! - a write with [`WriteFlags::fua`], or any write followed by a completed `flush`, is durable;
//! - `discard` and `write_zeroes` make the range read back as zeros (Ballast's discard is
//!   deterministic), and free whole extents;
//! - offsets and lengths are multiples of [`BLOCK_SIZE`](api::BLOCK_SIZE) and lie within
//!   the device; anything else is refused with [`DeviceErrorKind::Unaligned`] or
//!   [`DeviceErrorKind::OutOfRange`] before any I/O is issued.
//!
//! Buffers are owned: a read or write takes an [`IoBuf`] and gives it back in the result, on
//! failure inside [`BufError`].

use std::fmt;
use std::future::Future;

use crate::io::IoBuf;

/// Flags on a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// The volume-wide write generation that a replicated volume's nexus stamps on the write;
    /// every extent it touches records it. Zero lets the device number the write itself.
    pub generation: u64,
}

/// The generation crash recovery gives an extent whose last writes it cannot date: newer than
/// any real generation, so a rebuild always copies it and never copies from it by preference.
pub const GENERATION_UNKNOWN: u64 = u64::MAX;

/// The write generation of one allocated extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentGeneration {
    /// The extent's index (byte offset ÷ extent size).
    pub extent: u64,
    /// The generation of its last write, or [`GENERATION_UNKNOWN`].
    pub generation: u64,
}

/// A device's allocated extents with their generations: what a delta rebuild compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generations {
    /// The extent size in bytes.
    pub extent_size: u64,
    /// Every allocated extent, in extent order; unallocated extents read as zeros.
    pub extents: Vec<ExtentGeneration>,
}

/// The stable kind of a data-path error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceErrorKind {
    /// Offset or length is not a multiple of the block size.
    Unaligned,
    /// The request extends past the end of the device.
    OutOfRange,
    /// A block's data does not match its CRC32C checksum.
    Checksum,
    /// The pool has no free extent for a write.
    NoSpace,
    /// The backing file or device failed.
    Io,
    /// The device was deleted or the pool closed.
    Closed,
    /// The request carried an attachment epoch older than the replica's: a newer writer has
    /// taken the volume over, and this one must stop.
    Fenced,
    /// The device does not support the operation.
    Unsupported,
}

/// A data-path error with its context: operation, offset and length.
#[derive(Debug, thiserror::Error)]
#[error("{op} at offset {offset} length {len}: {message}")]
pub struct DeviceError {
    /// What went wrong, for matching.
    pub kind: DeviceErrorKind,
    /// The operation (`read`, `write`, …).
    pub op: &'static str,
    /// The request's byte offset.
    pub offset: u64,
    /// The request's length in bytes.
    pub len: u64,
    /// A sentence-case description.
    pub message: String,
    /// The underlying OS error, if any.
    #[source]
    pub source: Option<std::io::Error>,
}

impl DeviceError {
    /// `OutOfRange` unless `[offset, offset + len)` lies within a device of `size` bytes.
    pub fn check_range(op: &'static str, offset: u64, len: u64, size: u64) -> Result<(), Self> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Self::new(
                DeviceErrorKind::OutOfRange,
                op,
                offset,
                len,
                format!("the request ends beyond the volume's {size} bytes"),
            ));
        }
        Ok(())
    }

    /// A new error without an OS source.
    pub fn new(
        kind: DeviceErrorKind,
        op: &'static str,
        offset: u64,
        len: u64,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            op,
            offset,
            len,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error from the backing store.
    pub fn io(op: &'static str, offset: u64, len: u64, source: std::io::Error) -> Self {
        Self {
            kind: DeviceErrorKind::Io,
            op,
            offset,
            len,
            message: "the backing store failed".into(),
            source: Some(source),
        }
    }

    /// The errno a kernel-facing frontend should return for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            DeviceErrorKind::Unaligned | DeviceErrorKind::OutOfRange => libc::EINVAL,
            DeviceErrorKind::NoSpace => libc::ENOSPC,
            DeviceErrorKind::Closed => libc::ENODEV,
            DeviceErrorKind::Fenced => libc::EROFS,
            DeviceErrorKind::Unsupported => libc::EOPNOTSUPP,
            DeviceErrorKind::Checksum | DeviceErrorKind::Io => libc::EIO,
        }
    }
}

/// A failed read or write, carrying the caller's buffer back.
#[derive(Debug)]
pub struct BufError {
    /// What failed.
    pub error: DeviceError,
    /// The buffer the caller passed in.
    pub buf: IoBuf,
}

impl fmt::Display for BufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for BufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<BufError> for DeviceError {
    fn from(e: BufError) -> Self {
        e.error
    }
}

/// The result of a read or write: the buffer back, or the error with the buffer inside.
pub type BufResult = Result<IoBuf, BufError>;

/// A block device with owned-buffer async I/O.
pub trait BlockDevice: Send + Sync {
    /// The device size in bytes (a multiple of the block size).
    fn size(&self) -> u64;

    /// Fill `buf` from `offset`.
    fn read(&self, offset: u64, buf: IoBuf) -> impl Future<Output = BufResult> + Send;

    /// Write all of `buf` at `offset`.
    fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> impl Future<Output = BufResult> + Send;

    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Release `len` bytes at `offset`; the range reads back as zeros.
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Make `len` bytes at `offset` read back as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// The allocated extents and their write generations (for delta rebuild). Devices that
    /// keep no generations answer [`DeviceErrorKind::Unsupported`].
    fn generations(&self) -> impl Future<Output = Result<Generations, DeviceError>> + Send {
        std::future::ready(Err(DeviceError::new(
            DeviceErrorKind::Unsupported,
            "generations",
            0,
            0,
            "this device keeps no extent generations",
        )))
    }
}
