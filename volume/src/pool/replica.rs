//! A volume's local replica as a [`BlockDevice`]: thin provisioning and checksums on the data
//! path.
//!
//! - Requests are checked for alignment and range before any I/O.
//! - A read maps each block: unallocated or zeroed blocks are filled with zeros without I/O;
//!   the rest are read in as few segments as the physical layout allows and every block is
//!   verified against its CRC32C. A mismatch is retried only if a write to the same extent
//!   raced with the read; otherwise it is a [`DeviceErrorKind::Checksum`] error and counted.
//! - A write allocates extents on first touch, pins them, makes sure they are in the open set
//!   (see `disk.rs`), writes the data, and only then publishes the new checksums. A write
//!   that gave a block its first checksum (or found one uncommitted) completes only after a
//!   commit, so every completed write survives a crash of the daemon; `write_zeroes`
//!   likewise.
//! - Every extent touched by an operation is pinned until the operation completes, so a
//!   concurrent discard can never hand the extent to another volume under it.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Instant;

use api::VolumeName;

use super::disk::{encode_crc, push_segment, AllocError, Disk, VolRt, UNMAPPED};
use super::format::{BLOCK, BLOCKS_PER_EXTENT, EXTENT};
use super::PoolError;
use crate::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, ExtentGeneration, Generations,
    WriteFlags, GENERATION_UNKNOWN,
};
use crate::io::{IoBuf, IoOp, IoRequest};

/// How many times a read whose checksum raced with a write is retried.
const RACE_RETRIES: usize = 16;

/// One volume's local replica: a thin-provisioned, checksummed block device.
#[derive(Debug, Clone)]
pub struct Replica {
    disk: Arc<Disk>,
    vol: Arc<VolRt>,
}

/// Extents pinned for the duration of one operation; unpinned on drop.
struct Pins<'a> {
    disk: &'a Disk,
    extents: Vec<u32>,
    writing: bool,
}

impl Pins<'_> {
    /// The extent to pin at `logical`: a writer's own (`map_or_alloc` made it), else
    /// whichever extent the volume reads there (its own or an ancestor's).
    fn find(&self, vol: &VolRt, logical: u64) -> u32 {
        if self.writing {
            vol.lookup(logical)
        } else {
            self.disk.resolve(vol, logical)
        }
    }

    /// Pin the extent mapped at `logical` (see [`Pins::find`]), or return `UNMAPPED`.
    fn pin(&mut self, vol: &VolRt, logical: u64) -> u32 {
        loop {
            let p = self.find(vol, logical);
            if p == UNMAPPED {
                return p;
            }
            let e = &self.disk.ext[p as usize];
            e.pins.fetch_add(1, SeqCst);
            if self.writing {
                e.writes.fetch_add(1, SeqCst);
                e.version.fetch_add(1, SeqCst);
                e.last_write.store(self.disk.current_interval(), SeqCst);
            }
            if self.find(vol, logical) == p {
                self.extents.push(p);
                return p;
            }
            self.release(p);
        }
    }

    fn release(&self, p: u32) {
        let e = &self.disk.ext[p as usize];
        if self.writing {
            e.version.fetch_add(1, SeqCst);
            e.writes.fetch_sub(1, SeqCst);
        }
        e.pins.fetch_sub(1, SeqCst);
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        for &p in &self.extents {
            self.release(p);
        }
    }
}

/// A metadata commit that a data-path operation depended on failed. The OS error, if there was
/// one, stays attached as the source.
fn commit_failed(op: &'static str, offset: u64, len: u64, e: PoolError) -> DeviceError {
    let message = e.to_string();
    let source = match e {
        PoolError::Io { source, .. } => Some(source),
        _ => None,
    };
    DeviceError {
        kind: DeviceErrorKind::Io,
        op,
        offset,
        len,
        message,
        source,
    }
}

/// Allocating an extent for an operation failed.
fn alloc_failed(
    op: &'static str,
    offset: u64,
    len: u64,
    disk: &Disk,
    e: AllocError,
) -> DeviceError {
    match e {
        AllocError::NoSpace => DeviceError::new(
            DeviceErrorKind::NoSpace,
            op,
            offset,
            len,
            format!("pool {} has no free extent", disk.path.display()),
        ),
        AllocError::Closed => DeviceError::new(
            DeviceErrorKind::Closed,
            op,
            offset,
            len,
            "the volume was deleted",
        ),
        AllocError::Commit(e) => commit_failed(op, offset, len, e),
    }
}

/// Writes registered as in flight; unregistered on drop, also if the write is cancelled.
struct Registered<'a> {
    disk: &'a Disk,
    groups: Vec<(u32, Vec<(usize, u32)>)>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for (p, entries) in &self.groups {
            self.disk.ext[*p as usize].end_write(entries);
        }
    }
}

/// The records a volume reads through, oldest first: what a new replica of it needs to hold
/// the same snapshots (see [`Replica::chain`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chain {
    /// The pool device's chain epoch when it was read: [`Replica::read_link`] answers only
    /// while it holds.
    pub epoch: u64,
    /// The records, oldest first.
    pub links: Vec<ChainLink>,
}

/// One record of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLink {
    /// The snapshot's name; `None` for a deleted snapshot kept for the records based on it.
    pub name: Option<VolumeName>,
    /// Whether it is a snapshot of this volume (not of the volume this one was cloned from).
    pub of_volume: bool,
    /// Its size in bytes.
    pub size: u64,
    /// The logical extents it maps itself, and their generations, in order.
    pub own: Vec<(u64, u64)>,
}

impl Replica {
    pub(crate) fn new(disk: Arc<Disk>, vol: Arc<VolRt>) -> Self {
        Self { disk, vol }
    }

    /// The snapshots (and deleted snapshots kept for others) this volume reads through.
    pub fn chain(&self) -> Chain {
        let (epoch, links) = self.disk.ancestors(&self.vol);
        let links = links
            .iter()
            .map(|r| ChainLink {
                name: (!r.hidden.load(SeqCst)).then(|| r.name.clone()),
                of_volume: r.uuid == self.vol.uuid,
                size: r.size.load(SeqCst),
                own: (0..r.size.load(SeqCst) / EXTENT)
                    .filter_map(|l| {
                        let p = r.lookup(l);
                        (p != UNMAPPED)
                            .then(|| (l, self.disk.ext[p as usize].generation.load(SeqCst)))
                    })
                    .collect(),
            })
            .collect();
        Chain { epoch, links }
    }

    /// The data link `link` of [`Replica::chain`] (read at `epoch`) maps itself at logical
    /// extent `logical`, verified.
    ///
    /// # Errors
    /// `Io`: the chain changed since (read it again), or the read failed.
    pub async fn read_link(
        &self,
        epoch: u64,
        link: usize,
        logical: u64,
    ) -> Result<IoBuf, DeviceError> {
        let fail = |why: String| {
            DeviceError::new(
                DeviceErrorKind::Io,
                "read_link",
                logical * EXTENT,
                EXTENT,
                why,
            )
        };
        let changed = || {
            fail(format!(
                "the snapshots of volume {} changed; read them again",
                self.vol.name
            ))
        };
        let (now, links) = self.disk.ancestors(&self.vol);
        let Some(rec) = links.get(link).filter(|_| now == epoch) else {
            return Err(changed());
        };
        match self.disk.read_own(rec, logical, epoch).await {
            Ok(Some(data)) => Ok(data),
            Ok(None) => Err(changed()),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        self.vol.name.as_str()
    }

    /// Bytes of pool space the replica occupies.
    pub fn allocated_bytes(&self) -> u64 {
        self.vol.allocated_extents.load(SeqCst) * EXTENT
    }

    /// Bytes the replica reads from the snapshots it is based on.
    pub fn shared_bytes(&self) -> u64 {
        self.disk.shared_bytes(&self.vol)
    }

    /// The allocated extents and the generation of each one's last write.
    pub fn extent_generations(&self) -> Generations {
        let extents = self.vol.size.load(SeqCst).div_ceil(EXTENT);
        Generations {
            extent_size: EXTENT,
            extents: (0..extents)
                .filter_map(|logical| {
                    let p = self.disk.resolve(&self.vol, logical);
                    (p != UNMAPPED).then(|| ExtentGeneration {
                        extent: logical,
                        generation: self.disk.ext[p as usize].generation.load(SeqCst),
                    })
                })
                .collect(),
        }
    }

    /// Checksum mismatches seen on this volume's reads.
    pub fn checksum_errors(&self) -> u64 {
        self.vol.counters.checksum_errors.load(SeqCst)
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.vol.deleted.load(SeqCst) {
            return Err(DeviceError::new(
                DeviceErrorKind::Closed,
                op,
                offset,
                len,
                format!("volume {} was deleted", self.vol.name),
            ));
        }
        if offset % BLOCK != 0 || len % BLOCK != 0 || len == 0 {
            return Err(DeviceError::new(
                DeviceErrorKind::Unaligned,
                op,
                offset,
                len,
                format!("offset and length must be non-zero multiples of {BLOCK} bytes"),
            ));
        }
        DeviceError::check_range(op, offset, len, self.vol.size.load(SeqCst))
    }

    async fn read_inner(&self, offset: u64, mut buf: IoBuf) -> BufResult {
        let len = buf.len() as u64;
        if let Err(error) = self.check("read", offset, len) {
            return Err(BufError { error, buf });
        }
        let first = offset / BLOCK;
        let nblocks = (len / BLOCK) as usize;
        for attempt in 0..=RACE_RETRIES {
            let mut pins = Pins {
                disk: &self.disk,
                extents: Vec::new(),
                writing: false,
            };
            // (buffer block index, physical extent, physical block, extent version and block
            // checksum at mapping time)
            let mut to_verify = Vec::with_capacity(nblocks);
            let mut segments = Vec::new();
            let mut logical = u64::MAX;
            let mut p = UNMAPPED;
            for i in 0..nblocks {
                let lb = first + i as u64;
                if lb / BLOCKS_PER_EXTENT != logical {
                    logical = lb / BLOCKS_PER_EXTENT;
                    p = pins.pin(&self.vol, logical);
                }
                let range = i * BLOCK as usize..(i + 1) * BLOCK as usize;
                if p == UNMAPPED {
                    buf[range].fill(0);
                    continue;
                }
                let pb = u64::from(p) * BLOCKS_PER_EXTENT + lb % BLOCKS_PER_EXTENT;
                let before = self.disk.csum(pb as usize);
                if before == 0 {
                    buf[range].fill(0);
                    continue;
                }
                let version = self.disk.ext[p as usize].version.load(SeqCst);
                to_verify.push((i, p, pb as usize, version, before));
                push_segment(
                    &mut segments,
                    self.disk.layout.data_block_offset(pb),
                    range.start,
                    BLOCK as usize,
                );
            }
            if !segments.is_empty() {
                let req = IoRequest {
                    op: IoOp::Read,
                    file: self.disk.file().clone(),
                    buf: Some(buf),
                    segments,
                };
                let c = self.disk.engine().submit(req).await;
                buf = c.buf.unwrap_or_else(|| IoBuf::zeroed(len as usize));
                if let Err(e) = c.result {
                    return Err(BufError {
                        error: DeviceError::io("read", offset, len, e),
                        buf,
                    });
                }
            }
            let mut raced = false;
            let mut bad = None;
            for &(i, p, pb, version, before) in &to_verify {
                let data = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                let crc = encode_crc(data);
                let e = &self.disk.ext[p as usize];
                // The data as it was when the read started, as it is now, or as a write in
                // flight is putting it: all are valid results of a racing read.
                if crc == self.disk.csum(pb)
                    || crc == before
                    || e.pending.lock().expect("pending lock").contains(pb, crc)
                {
                    continue;
                }
                if e.version.load(SeqCst) != version || e.writes.load(SeqCst) > 0 {
                    raced = true;
                } else {
                    bad = Some(i);
                    break;
                }
            }
            drop(pins);
            if let Some(i) = bad {
                self.vol.counters.checksum_errors.fetch_add(1, SeqCst);
                self.disk.checksum_errors.fetch_add(1, SeqCst);
                let at = offset + i as u64 * BLOCK;
                tracing::error!(volume = %self.vol.name, offset = at, pool = %self.disk.path.display(), "checksum mismatch on read");
                let error = DeviceError::new(
                    DeviceErrorKind::Checksum,
                    "read",
                    offset,
                    len,
                    format!("block at volume offset {at} does not match its CRC32C checksum"),
                );
                return Err(BufError { error, buf });
            }
            if !raced {
                return Ok(buf);
            }
            if attempt > 2 {
                // A write to these very blocks keeps landing; let it finish publishing.
                std::thread::yield_now();
            }
        }
        let error = DeviceError::new(
            DeviceErrorKind::Io,
            "read",
            offset,
            len,
            "the blocks kept changing under concurrent writes",
        );
        Err(BufError { error, buf })
    }

    async fn write_inner(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let len = buf.len() as u64;
        if let Err(error) = self.check("write", offset, len) {
            return Err(BufError { error, buf });
        }
        // Held to the end: a snapshot waits for this write (see `disk/snapshot.rs`).
        let _gate = self.vol.gate.read().await;
        let first = offset / BLOCK;
        let nblocks = (len / BLOCK) as usize;
        let crcs: Vec<u32> = buf.chunks(BLOCK as usize).map(encode_crc).collect();
        let mut pins = Pins {
            disk: &self.disk,
            extents: Vec::new(),
            writing: true,
        };
        let mut segments = Vec::new();
        let mut physical = Vec::with_capacity(nblocks);
        let mut logical = u64::MAX;
        let mut p = UNMAPPED;
        for i in 0..nblocks {
            let lb = first + i as u64;
            if lb / BLOCKS_PER_EXTENT != logical {
                logical = lb / BLOCKS_PER_EXTENT;
                loop {
                    if let Err(e) = self.disk.map_or_alloc(&self.vol, logical).await {
                        let error = alloc_failed("write", offset, len, &self.disk, e);
                        return Err(BufError { error, buf });
                    }
                    p = pins.pin(&self.vol, logical);
                    if p != UNMAPPED {
                        break;
                    }
                }
                if let Err(e) = self.disk.ensure_open(p).await {
                    return Err(BufError {
                        error: commit_failed("write", offset, len, e),
                        buf,
                    });
                }
            }
            let pb = u64::from(p) * BLOCKS_PER_EXTENT + lb % BLOCKS_PER_EXTENT;
            physical.push((p, pb as usize));
            push_segment(
                &mut segments,
                self.disk.layout.data_block_offset(pb),
                i * BLOCK as usize,
                BLOCK as usize,
            );
        }
        // Per extent, the (physical block, checksum) entries of this write, in logical order.
        let mut groups: Vec<(u32, Vec<(usize, u32)>)> = Vec::new();
        for (&(p, pb), &crc) in physical.iter().zip(&crcs) {
            match groups.last_mut() {
                Some((q, entries)) if *q == p => entries.push((pb, crc)),
                _ => groups.push((p, vec![(pb, crc)])),
            }
        }
        // Ordered after any write in flight on the same blocks. Extents are taken in logical
        // order, the same for every write of this volume, so waits cannot form a cycle.
        let mut registered = Registered {
            disk: &self.disk,
            groups: Vec::with_capacity(groups.len()),
        };
        for (p, entries) in groups {
            self.disk.ext[p as usize].begin_write(&entries).await;
            registered.groups.push((p, entries));
        }
        let generation = if flags.generation == 0 {
            self.vol.seq.fetch_add(1, SeqCst) + 1
        } else {
            if flags.generation != GENERATION_UNKNOWN {
                self.vol.seq.fetch_max(flags.generation, SeqCst);
            }
            flags.generation
        };
        let req = IoRequest {
            op: IoOp::Write { dsync: false },
            file: self.disk.file().clone(),
            buf: Some(buf),
            segments,
        };
        let c = self.disk.engine().submit(req).await;
        let buf = c.buf.unwrap_or_else(|| IoBuf::zeroed(len as usize));
        if c.result.is_ok() {
            for (&(_, pb), &crc) in physical.iter().zip(&crcs) {
                self.disk.set_csum(pb, crc);
            }
        }
        drop(registered);
        if let Err(e) = c.result {
            return Err(BufError {
                error: DeviceError::io("write", offset, len, e),
                buf,
            });
        }
        for &p in &pins.extents {
            self.disk.ext[p as usize]
                .generation
                .fetch_max(generation, SeqCst);
            self.disk.mark_extent(p);
        }
        drop(pins);
        // A block's first write (and a new extent's allocation) is recorded only by a
        // commit; until then a crash would make the block read as zeros again. So a write
        // completes only once no first checksum is left uncommitted, this one's or another
        // write's (which may have set one on the same block): a completed write survives a
        // daemon crash, whose devices the next daemon takes over with nothing lost. An
        // overwrite of committed blocks costs nothing more (recovery recomputes the open
        // extents' checksums).
        if flags.fua || self.disk.has_fresh() {
            if let Err(e) = self.disk.commit(false).await {
                return Err(BufError {
                    error: commit_failed("write", offset, len, e),
                    buf,
                });
            }
        }
        Ok(buf)
    }

    async fn zero_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(op, offset, len)?;
        let _gate = self.vol.gate.read().await;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let logical = pos / EXTENT;
            let ext_end = ((logical + 1) * EXTENT).min(end);
            let whole = pos % EXTENT == 0 && ext_end - pos == EXTENT;
            if self.vol.lookup(logical) == UNMAPPED && self.disk.shared_below(&self.vol, logical) {
                // A snapshot's data shows through here: the volume needs an extent of its own
                // that reads as zeros where zeroed (a copy, for a part of the extent).
                self.disk
                    .copy_on_write(&self.vol, logical, !whole)
                    .await
                    .map_err(|e| alloc_failed(op, offset, len, &self.disk, e))?;
            }
            if whole && !self.disk.shared_below(&self.vol, logical) {
                self.disk.free_extent(&self.vol, logical);
            } else {
                let p = self.vol.lookup(logical);
                if p != UNMAPPED {
                    let base = u64::from(p) * BLOCKS_PER_EXTENT;
                    for lb in pos / BLOCK..ext_end / BLOCK {
                        self.disk
                            .set_csum((base + lb % BLOCKS_PER_EXTENT) as usize, 0);
                    }
                    let e = &self.disk.ext[p as usize];
                    e.version.fetch_add(1, SeqCst);
                    // Zeroed blocks are a change a delta rebuild must carry.
                    e.generation
                        .fetch_max(self.vol.seq.fetch_add(1, SeqCst) + 1, SeqCst);
                    self.disk.mark_extent(p);
                }
            }
            pos = ext_end;
        }
        Ok(())
    }
}

impl BlockDevice for Replica {
    fn size(&self) -> u64 {
        self.vol.size.load(SeqCst)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        let start = Instant::now();
        let len = buf.len() as u64;
        let r = self.read_inner(offset, buf).await;
        self.vol
            .counters
            .read
            .record(len, start.elapsed(), r.is_ok());
        r
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let start = Instant::now();
        let len = buf.len() as u64;
        let r = self.write_inner(offset, buf, flags).await;
        self.vol
            .counters
            .write
            .record(len, start.elapsed(), r.is_ok());
        r
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = self
            .disk
            .commit(false)
            .await
            .map_err(|e| commit_failed("flush", 0, 0, e));
        self.vol
            .counters
            .flush
            .record(0, start.elapsed(), r.is_ok());
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = self.zero_range("discard", offset, len).await;
        self.vol
            .counters
            .discard
            .record(len, start.elapsed(), r.is_ok());
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let start = Instant::now();
        let mut r = self.zero_range("write_zeroes", offset, len).await;
        if r.is_ok() {
            // Zeroes the caller relies on: committed before they are acknowledged (see the
            // module docs), so a crash never brings the old data back.
            r = self
                .disk
                .commit(false)
                .await
                .map_err(|e| commit_failed("write_zeroes", offset, len, e));
        }
        self.vol
            .counters
            .discard
            .record(len, start.elapsed(), r.is_ok());
        r
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        self.check("generations", 0, BLOCK)?;
        Ok(self.extent_generations())
    }
}
