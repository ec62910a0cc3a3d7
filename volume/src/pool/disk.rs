//! One pool device at run time: allocation, checksums, commits and crash recovery.
//!
//! # State and where it lives
//!
//! - The extent table, volume table and free list live in memory under one short mutex
//!   ([`DiskState`]), which is never held across I/O.
//! - Each volume's logical→physical map is an array of atomics, so the data path looks up
//!   extents without a lock; entries change only under the state mutex.
//! - Block checksums live in memory as atomics (one `u32` per 4 KiB block; 1 MiB of RAM per
//!   GiB of pool) and on disk in the checksum area, written back at each commit.
//!
//! # Checksums
//!
//! A stored checksum of `0` means "never written or zeroed": the block reads as zeros with no
//! I/O. Any other value is the block's CRC32C (a CRC of exactly `0` is stored as `1`; see
//! [`encode_crc`]). Every read verifies every block; a mismatch is an error and is counted.
//!
//! # Commits and crash safety
//!
//! A commit (every flush, FUA write and control operation) is one of two kinds, both under the
//! commit lock:
//!
//! - **A journal record** (format 2, the usual kind): snapshot only what changed since the
//!   previous record (the extents written, allocated or freed with their changed checksums,
//!   the volume records that changed, the extents writers asked to open), append it to the
//!   journal (`journal.rs`) and `fdatasync` once; that sync also makes every data write that
//!   completed before the flush durable. Its work is proportional to the change, not to the
//!   device.
//! - **A checkpoint**: snapshot the whole metadata body, the open set and the dirty checksum
//!   pages; `fdatasync` (the data those checksums cover is durable before them), write the
//!   checksum pages in place and `fdatasync` (the checksums are durable before the metadata
//!   that depends on them); write the changed pages of the
//!   metadata slot `seq % 2` with its header, which names the last journal record it covers,
//!   and `fdatasync`. Checkpoints are taken when the journal has no room for the next record,
//!   when the open set must shrink (only a checkpoint closes extents), after a record failed,
//!   at open and at a clean close: that is, in the background of a flush-heavy workload.
//!
//! Recovery loads the newest valid slot, then replays the records after the one it names, in
//! sequence, until one is missing, torn or stale (each record carries its sequence number and
//! a CRC), then recomputes the checksums of open extents (below).
//!
//! A record's sync does not order the data it covers before the record itself: after a crash,
//! the record may be durable while a write it accounts for is not. Two rules make that safe.
//! Every extent written since the previous record is open in the record (and was durably open
//! before the write began, unless the record allocates it), so recovery recomputes whatever
//! checksums the data disagrees with. And a record that gives a block its first checksum (the
//! block read as zeros until then) is *ordered*: it syncs the data first, then writes and syncs
//! the record. Otherwise recovery could vouch for what the block held before: the previous
//! life of a reused extent on a pool block device, which may be another volume's data. The
//! steady state of a database, which overwrites blocks it has written before, syncs once.
//!
//! An unordered record cannot vouch for the generations of the writes it makes durable, so it
//! records [`GENERATION_UNKNOWN`] for every extent written since the previous one; the next
//! record, once this one's sync succeeded, records their real generations. A delta rebuild
//! thus never trusts a generation whose data may be lost.
//!
//! Data blocks are overwritten in place, and their checksums on disk only catch up at the
//! next commit. So a crash can leave blocks whose data is newer than their durable checksum.
//! (Records never close an extent, so they open extents only.)
//! The **open set** bounds where that can happen: an extent whose allocation is durable may be
//! written only while it is in the open set of the durable commit *and* of any commit being
//! written. A write to any other extent first asks for a commit that opens it. Recovery
//! recomputes the checksums of the blocks of open extents that had a durable checksum; blocks
//! with a durable `0` stay zero (their first write was never flushed). Extents stay open until
//! the set grows past [`OPEN_LIMIT`]: then those idle for [`KEEP_OPEN_COMMITS`] commits and
//! written longest ago leave it, down to 3/4 of the limit; all of them leave at a clean close.
//!
//! Freed extents are reused only after the commit recording the free is durable and no I/O
//! still pins them, so a crash never shows one volume's data to another.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{
    detect_foreign, Layout, Superblock, BLOCK, BLOCKS_PER_EXTENT, EXTENT, FORMAT_VERSION,
};
use super::journal::{ExtentChange, Record};
use super::metadata::{
    check_slot, encode_header, ExtentEntry, JournalMark, MetaState, MetadataError, VolumeRecord,
};
use super::stats::IoCounters;
use super::PoolError;
use crate::device::GENERATION_UNKNOWN;
use crate::io::{IoBuf, IoEngine, IoFile, IoOp, IoRequest, Segment};
use api::VolumeName;

mod snapshot;
pub use snapshot::SnapshotUsage;

/// Commits without writes before an extent may leave the open set.
pub const KEEP_OPEN_COMMITS: u64 = 8;

/// Extents a device keeps open at most (past it, the idle ones written longest ago close, down
/// to 3/4 of it, at the next checkpoint). Each open extent is 1 MiB that crash recovery reads
/// again (at most 2 GiB per device, a second or two on an SSD); a write to a closed extent waits
/// for a synced journal record that opens it, so a working set that fits (2 GiB per device)
/// pays no sync per write. (At 512, a 2 GiB random-write working set paid one on three writes
/// in four: 0.18 of raw's rate at QD1.)
pub const OPEN_LIMIT: usize = 2048;

/// Locks a volume's copies on write are sharded over (by logical extent).
const COW_SHARDS: u64 = 64;

/// "No physical extent" in a volume map.
pub(crate) const UNMAPPED: u32 = u32::MAX;

const CSUM_PER_PAGE: usize = (BLOCK / 4) as usize;

/// The stored form of a block's CRC32C: never `0`, which means "reads as zeros".
pub fn encode_crc(data: &[u8]) -> u32 {
    match crc32c::crc32c(data) {
        0 => 1,
        c => c,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per physical extent, lock-free run-time state.
#[derive(Debug, Default)]
pub(crate) struct ExtentRt {
    /// Writes in flight.
    pub writes: AtomicU32,
    /// Reads and writes in flight: a pinned extent is never reused.
    pub pins: AtomicU32,
    /// Bumped at the start and end of every write and by discards; reads retry a checksum
    /// mismatch if it moved.
    pub version: AtomicU64,
    /// The commit interval of the last write's start.
    pub last_write: AtomicU64,
    /// The owner's write sequence at the last write.
    pub generation: AtomicU64,
    /// The extent's allocation is part of a commit snapshot.
    pub committed: AtomicBool,
    /// Writes in flight on this extent's blocks.
    pub pending: Mutex<PendingWrites>,
    /// Signalled whenever a write leaves `pending` while another waits.
    pub released: tokio::sync::Notify,
    /// Writes waiting in [`ExtentRt::begin_write`]; `end_write` signals only if non-zero.
    waiters: AtomicU32,
}

/// The blocks of one extent that have a write in flight, and the checksums those writes
/// will publish.
///
/// Overlapping writes to one block are ordered: the second waits until the first has
/// published its checksum, so the data on disk and the published checksum always come from
/// the same write. A read that sees data whose checksum is not published yet finds it here.
#[derive(Debug, Default)]
pub(crate) struct PendingWrites {
    busy: [u64; 4],
    crcs: Vec<(usize, u32)>,
}

impl PendingWrites {
    fn bit(pblock: usize) -> (usize, u64) {
        let k = pblock % BLOCKS_PER_EXTENT as usize;
        (k / 64, 1 << (k % 64))
    }

    /// Whether a write in flight will publish `crc` for `pblock`.
    pub(crate) fn contains(&self, pblock: usize, crc: u32) -> bool {
        self.crcs.contains(&(pblock, crc))
    }
}

impl ExtentRt {
    /// Register a write of `(pblock, crc)` entries, after any in-flight write to the same
    /// blocks has finished.
    pub(crate) async fn begin_write(&self, entries: &[(usize, u32)]) {
        // Fast path: no overlapping write in flight, no waiter registration.
        if self.try_begin_write(entries) {
            return;
        }
        // Slow path. The waiter count is raised before the re-check, and `end_write` reads it
        // after clearing its blocks, so either we see the blocks free or it wakes us.
        self.waiters.fetch_add(1, SeqCst);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.try_begin_write(entries) {
                break;
            }
            released.await;
        }
        self.waiters.fetch_sub(1, SeqCst);
    }

    fn try_begin_write(&self, entries: &[(usize, u32)]) -> bool {
        let mut p = self.pending.lock().expect("pending lock");
        let conflict = entries.iter().any(|&(pb, _)| {
            let (w, m) = PendingWrites::bit(pb);
            p.busy[w] & m != 0
        });
        if !conflict {
            for &(pb, _) in entries {
                let (w, m) = PendingWrites::bit(pb);
                p.busy[w] |= m;
            }
            p.crcs.extend_from_slice(entries);
        }
        !conflict
    }

    /// Unregister a write begun with [`ExtentRt::begin_write`] and wake waiters.
    pub(crate) fn end_write(&self, entries: &[(usize, u32)]) {
        let mut mine = [0u64; 4];
        for &(pb, _) in entries {
            let (w, m) = PendingWrites::bit(pb);
            mine[w] |= m;
        }
        {
            let mut p = self.pending.lock().expect("pending lock");
            for (busy, mine) in p.busy.iter_mut().zip(mine) {
                *busy &= !mine;
            }
            // Only one write per block is in flight, so every entry on these blocks is ours.
            p.crcs.retain(|&(pb, _)| {
                let (w, m) = PendingWrites::bit(pb);
                mine[w] & m == 0
            });
        }
        if self.waiters.load(SeqCst) > 0 {
            self.released.notify_waiters();
        }
    }
}

/// A volume's run-time state on its disk.
#[derive(Debug)]
pub(crate) struct VolRt {
    pub index: u32,
    pub name: VolumeName,
    pub uuid: [u8; 16],
    pub created_at: u64,
    pub replicas: u8,
    pub size: AtomicU64,
    /// The write sequence; stamped on extents as their generation.
    pub seq: AtomicU64,
    /// Logical extent → physical extent or [`UNMAPPED`].
    pub map: RwLock<Vec<AtomicU32>>,
    pub allocated_extents: AtomicU64,
    pub deleted: AtomicBool,
    pub counters: IoCounters,
    /// A snapshot: read-only, never attached. (Its `uuid` is its source volume's.)
    pub snapshot: bool,
    /// A deleted snapshot kept for the records based on it (see `metadata.rs`).
    pub hidden: AtomicBool,
    /// The snapshot this record is based on: it reads through to it where it maps nothing.
    /// Changed only under the state lock, inside [`Disk::chain`]'s odd epochs.
    pub parent: RwLock<Option<Arc<VolRt>>>,
    /// Serialises the copies on write of each logical extent (sharded by index).
    cow: Box<[tokio::sync::Mutex<()>]>,
    /// Held shared by every write, discard and zeroing of the volume, exclusively while a
    /// snapshot of it is taken (the write barrier).
    pub gate: tokio::sync::RwLock<()>,
}

impl VolRt {
    /// The run-time state of record `rec` in slot `index`, with nothing mapped yet.
    fn new(index: usize, rec: &VolumeRecord) -> Self {
        Self {
            index: index as u32,
            name: rec.name.clone(),
            uuid: rec.uuid,
            created_at: rec.created_at,
            replicas: rec.replicas,
            size: AtomicU64::new(rec.size),
            seq: AtomicU64::new(rec.generation),
            map: RwLock::new(
                (0..rec.size / EXTENT)
                    .map(|_| AtomicU32::new(UNMAPPED))
                    .collect(),
            ),
            allocated_extents: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            counters: IoCounters::default(),
            snapshot: rec.snapshot,
            hidden: AtomicBool::new(rec.hidden),
            parent: RwLock::new(None),
            cow: (0..COW_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    fn record(&self) -> VolumeRecord {
        VolumeRecord {
            name: self.name.clone(),
            uuid: self.uuid,
            size: self.size.load(SeqCst),
            created_at: self.created_at,
            generation: self.seq.load(SeqCst),
            replicas: self.replicas,
            snapshot: self.snapshot,
            hidden: self.hidden.load(SeqCst),
            parent: self.parent_slot(),
        }
    }

    /// The lock that serialises copies on write of logical extent `logical`.
    pub(crate) fn cow_lock(&self, logical: u64) -> &tokio::sync::Mutex<()> {
        &self.cow[(logical % COW_SHARDS) as usize]
    }

    /// The snapshot this record is based on, if any.
    pub(crate) fn parent(&self) -> Option<Arc<VolRt>> {
        self.parent.read().expect("parent lock").clone()
    }

    /// 0, or the slot + 1 of the parent (as recorded).
    fn parent_slot(&self) -> u32 {
        self.parent().map_or(0, |p| p.index + 1)
    }

    /// What a journal record compares to see whether the record changed.
    fn mark(&self) -> ([u8; 16], u64, u64, u32, bool) {
        (
            self.uuid,
            self.size.load(SeqCst),
            self.seq.load(SeqCst),
            self.parent_slot(),
            self.hidden.load(SeqCst),
        )
    }

    /// Point `logical` at physical extent `p` (or [`UNMAPPED`]). Caller holds the state lock.
    pub(crate) fn set_mapping(&self, logical: u32, p: u32) {
        if let Some(a) = self
            .map
            .read()
            .expect("volume map lock")
            .get(logical as usize)
        {
            a.store(p, SeqCst);
        }
    }

    pub(crate) fn lookup(&self, logical: u64) -> u32 {
        self.map
            .read()
            .expect("volume map lock")
            .get(logical as usize)
            .map_or(UNMAPPED, |a| a.load(SeqCst))
    }
}

#[derive(Debug)]
struct DiskState {
    volumes: Vec<Option<Arc<VolRt>>>,
    /// One past the highest volume slot used since the device was opened: no slot at or past
    /// it holds a volume or has one recorded, so a journal record looks only below it (the
    /// table has up to 4096 slots; scanning them all cost most of a record's CPU time).
    volumes_high: usize,
    owners: Vec<ExtentEntry>,
    free: BTreeSet<u32>,
    /// Freed extents and the interval they were freed in.
    pending_free: Vec<(u32, u64)>,
}

#[derive(Debug)]
struct OpenState {
    /// The open set of the newest durable commit.
    durable: Vec<bool>,
    /// Extents writable without a commit: `durable` ∩ the commit being written.
    safe: Vec<bool>,
    /// Extents writers asked to open.
    wanted: Vec<u32>,
}

#[derive(Debug)]
struct CommitState {
    seq: u64,
    /// The index (see `Disk::commits_started`) of the newest successful commit.
    last_ok: u64,
    /// The body each slot is known to hold, if known.
    slot_body: [Option<Vec<u8>>; 2],
    /// A body buffer to encode the next commit into (a slot's previous body).
    spare_body: Option<Vec<u8>>,
    /// The extents' generations as the durable commits know them: each successful commit's
    /// sync made the writes before its snapshot durable, so any commit after it may record
    /// them. `None` until the first checkpoint after open.
    durable_generations: Option<Vec<u64>>,
    /// The last journal record written (whether its sync succeeded or not: a sequence number
    /// and its space are never reused) and where the next one goes.
    journal: JournalMark,
    /// Bytes of the journal between the newest checkpoint's mark and `journal.pos`: what a
    /// record must not overwrite.
    journal_used: u64,
    /// A record failed: checkpoint before writing another.
    journal_broken: bool,
    /// (uuid, size, generation) of each volume slot as the journal last recorded it.
    recorded_volumes: Vec<VolumeMark>,
    /// Extents the last record called [`GENERATION_UNKNOWN`]: the next one records their real
    /// generations.
    unsure: Vec<u32>,
}

/// A volume slot as the journal records it: (uuid, size, generation, parent, hidden), or free.
type VolumeMark = Option<([u8; 16], u64, u64, u32, bool)>;

/// What a record snapshot took, to account for once the record is durable.
struct RecordSnap {
    record: Record,
    /// The real generation of each extent in `record`, in order.
    generations: Vec<u64>,
    /// Volume slots as recorded, for `CommitState::recorded_volumes`.
    volumes: Vec<(u32, VolumeMark)>,
    /// Extents whose frees this record makes durable.
    releasable: Vec<u32>,
    /// The record gives blocks their first checksum: sync the data first.
    ordered: bool,
}

/// What a device holds, as found at open.
enum Found {
    /// A pool device of this node's pool.
    Pool(Superblock),
    /// All zeros: safe to format.
    Empty,
    /// Something that must not be overwritten without force.
    Foreign(String),
}

/// What opening a disk found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// The device was formatted now.
    pub formatted: bool,
    /// Open extents whose checksums were recomputed after an unclean shutdown.
    pub recovered_extents: u64,
}

/// One opened pool device.
#[derive(Debug)]
pub(crate) struct Disk {
    pub path: PathBuf,
    file: IoFile,
    engine: Arc<dyn IoEngine>,
    pub sb: Superblock,
    pub layout: Layout,
    state: Mutex<DiskState>,
    csums: Box<[AtomicU32]>,
    csum_dirty: Box<[AtomicU64]>,
    /// One bit per block whose checksum changed since the last journal record.
    blk_changed: Box<[AtomicU64]>,
    /// One bit per extent changed (written, allocated, freed) since the last journal record.
    ext_changed: Box<[AtomicU64]>,
    /// A block got its first checksum since the last journal record (see the module docs).
    fresh: AtomicBool,
    pub ext: Box<[ExtentRt]>,
    open: Mutex<OpenState>,
    interval: AtomicU64,
    commit_lock: tokio::sync::Mutex<CommitState>,
    pub checksum_errors: AtomicU64,
    /// Bumped by every change a commit would persist; compared by [`Disk::commit_if_changed`].
    changes: AtomicU64,
    /// The value of `changes` at the start of the last successful commit.
    committed_changes: AtomicU64,
    /// Commits whose snapshot has started; a commit's index is this count after its start.
    commits_started: AtomicU64,
    /// Give freed extents' space back to the filesystem holding a pool file.
    punch_holes: bool,
    /// Odd while the chain of records changes (see `snapshot.rs`).
    chain: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("pool state lock poisoned")
}

fn device_size(path: &Path, file: &IoFile) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the fd is open; the ioctl writes one u64 into `size`, which outlives the call.
        let rc = unsafe { libc::ioctl(file.raw_fd(), BLKGETSIZE64, &raw mut size) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ))
    }
}

impl Disk {
    /// Open `path`, formatting it if it is empty (or if `force`), and recover after a crash.
    pub(crate) async fn open(
        path: &Path,
        create_size: Option<u64>,
        node_id: &str,
        pool_uuid: Option<[u8; 16]>,
        force: bool,
        engine: Arc<dyn IoEngine>,
    ) -> Result<(Self, OpenReport), PoolError> {
        let p = path.to_path_buf();
        let io_err = |op: &'static str| {
            let p = p.clone();
            move |source| PoolError::Io {
                path: p,
                op,
                source,
            }
        };
        if !path.exists() {
            let Some(size) = create_size else {
                return Err(PoolError::Missing { path: p });
            };
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err("create"))?;
            f.set_len(size).map_err(io_err("size"))?;
        }
        let (file, direct) = crate::io::open_direct(path, false).map_err(io_err("open"))?;
        if !direct {
            tracing::warn!(path = %path.display(), "pool device opened without O_DIRECT");
        }
        let size = device_size(path, &file).map_err(io_err("size"))?;
        let layout = Layout::for_device(size).map_err(|source| PoolError::Format {
            path: p.clone(),
            source,
        })?;
        let head_len = (1u64 << 20).min(layout.device_bytes) as usize;
        let head = read_at(&*engine, &file, 0, head_len)
            .await
            .map_err(io_err("read"))?;
        // A newer format is refused as such, never taken for something to format over.
        let newer = |d: &Result<Superblock, super::format::FormatError>| match d {
            Err(super::format::FormatError::UnsupportedVersion(version)) if !force => {
                Err(PoolError::Newer {
                    path: p.clone(),
                    version: *version,
                })
            }
            _ => Ok(()),
        };
        let decoded = Superblock::decode(&head[..BLOCK as usize]);
        newer(&decoded)?;
        let mut sb = decoded.ok();
        let mut rewrite_a = false;
        if sb.is_none() && &head[..8] == super::format::SB_MAGIC {
            let b = read_at(&*engine, &file, layout.sb_b_offset(), BLOCK as usize)
                .await
                .map_err(io_err("read"))?;
            let decoded = Superblock::decode(&b);
            newer(&decoded)?;
            sb = decoded.ok();
            rewrite_a = sb.is_some();
            if rewrite_a {
                tracing::warn!(path = %path.display(), "superblock A is damaged; using copy B");
            }
        }
        let found = match sb {
            Some(sb) if pool_uuid.is_some_and(|u| u != sb.pool_uuid) => Found::Foreign(format!(
                "a Ballast pool of another node pool ({})",
                uuid::Uuid::from_bytes(sb.pool_uuid)
            )),
            Some(sb) => Found::Pool(sb),
            None => detect_foreign(&head).map_or(Found::Empty, Found::Foreign),
        };
        match found {
            Found::Pool(sb) => {
                let mut disk = Self::new(p.clone(), file.clone(), engine.clone(), sb);
                if rewrite_a {
                    disk.write_raw(0, &disk.sb.encode())
                        .await
                        .map_err(io_err("write"))?;
                }
                let report = disk.load().await?;
                if disk.sb.node_id != node_id {
                    tracing::warn!(path = %path.display(), recorded = %disk.sb.node_id, node_id, "pool device was formatted by another node ID");
                }
                if disk.layout.journal_extents == 0 {
                    let sb = disk.upgrade().await?;
                    drop(disk);
                    disk = Self::new(p.clone(), file, engine, sb);
                    disk.load().await?;
                    tracing::info!(path = %path.display(), version = disk.sb.version, "upgraded the pool device's on-disk format in place");
                } else if disk.sb.version < FORMAT_VERSION {
                    // Same layout; only the version moves (from then on, a build that does not
                    // know snapshots refuses the device).
                    disk.sb.version = FORMAT_VERSION;
                    let encoded = disk.sb.encode();
                    for at in [disk.layout.sb_b_offset(), 0] {
                        disk.write_raw(at, &encoded)
                            .await
                            .map_err(io_err("write"))?;
                        disk.fsync().await.map_err(io_err("fdatasync"))?;
                    }
                    tracing::info!(path = %path.display(), version = FORMAT_VERSION, "upgraded the pool device's on-disk format in place");
                }
                Ok((disk, report))
            }
            Found::Foreign(what) if !force => Err(PoolError::Foreign { path: p, what }),
            found => {
                if let Found::Foreign(what) = &found {
                    tracing::warn!(path = %path.display(), found = %what, "formatting over existing content because force was given");
                }
                let sb = Superblock {
                    pool_uuid: pool_uuid.unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes()),
                    disk_uuid: *uuid::Uuid::new_v4().as_bytes(),
                    node_id: node_id.to_owned(),
                    created_at: now_secs(),
                    layout,
                    version: FORMAT_VERSION,
                };
                let disk = Self::new(p.clone(), file, engine, sb);
                disk.format().await?;
                tracing::info!(path = %path.display(), capacity = layout.capacity_bytes(), "formatted pool device");
                Ok((
                    disk,
                    OpenReport {
                        formatted: true,
                        recovered_extents: 0,
                    },
                ))
            }
        }
    }

    fn new(path: PathBuf, file: IoFile, engine: Arc<dyn IoEngine>, sb: Superblock) -> Self {
        let layout = sb.layout;
        let n = layout.n_extents as usize;
        let blocks = n * BLOCKS_PER_EXTENT as usize;
        let csum_pages = blocks.div_ceil(CSUM_PER_PAGE);
        let punch_holes = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
        Self {
            path,
            file,
            engine,
            sb,
            layout,
            state: Mutex::new(DiskState {
                volumes: vec![None; layout.max_volumes as usize],
                volumes_high: 0,
                owners: vec![ExtentEntry::default(); n],
                free: (0..layout.usable_extents()).collect(),
                pending_free: Vec::new(),
            }),
            csums: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            csum_dirty: (0..csum_pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blk_changed: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            ext_changed: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            fresh: AtomicBool::new(false),
            ext: (0..n).map(|_| ExtentRt::default()).collect(),
            open: Mutex::new(OpenState {
                durable: vec![false; n],
                safe: vec![false; n],
                wanted: Vec::new(),
            }),
            interval: AtomicU64::new(1),
            commit_lock: tokio::sync::Mutex::new(CommitState {
                seq: 0,
                last_ok: 0,
                slot_body: [None, None],
                spare_body: None,
                durable_generations: None,
                journal: JournalMark::default(),
                journal_used: 0,
                journal_broken: false,
                recorded_volumes: vec![None; layout.max_volumes as usize],
                unsure: Vec::new(),
            }),
            checksum_errors: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            committed_changes: AtomicU64::new(0),
            commits_started: AtomicU64::new(0),
            punch_holes,
            chain: AtomicU64::new(0),
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
        move |source| PoolError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    async fn format(&self) -> Result<(), PoolError> {
        // An empty metadata commit first, then the superblocks: a crash before the
        // superblocks leaves a device that is still "not a pool".
        self.commit(true).await?;
        let sb = self.sb.encode();
        self.write_raw(self.layout.sb_b_offset(), &sb)
            .await
            .map_err(self.io_err("write"))?;
        self.write_raw(0, &sb).await.map_err(self.io_err("write"))?;
        self.fsync().await.map_err(self.io_err("fdatasync"))
    }

    /// Upgrade a format 1 device to the current format in place (see `format.rs`): move what
    /// the journal's extents hold to free extents, checkpoint, then write the new superblocks,
    /// B first (a crash between the two leaves A, which open prefers, at format 1, and the
    /// upgrade runs again). Returns the new superblock; the device is then opened afresh.
    async fn upgrade(&self) -> Result<Superblock, PoolError> {
        let v2 = Layout {
            journal_extents: super::format::JOURNAL_EXTENTS,
            ..self.layout
        };
        let usable = v2.usable_extents();
        for p in usable..self.layout.n_extents {
            let (entry, q, vol) = {
                let mut st = lock(&self.state);
                let entry = st.owners[p as usize];
                if entry.owner == 0 {
                    continue;
                }
                let Some(q) = st.free.iter().copied().find(|&q| q < usable) else {
                    let mut held: Vec<String> = st
                        .owners
                        .iter()
                        .skip(usable as usize)
                        .filter(|e| e.owner != 0)
                        .filter_map(|e| st.volumes[e.owner as usize - 1].as_ref())
                        .map(|v| v.name.to_string())
                        .collect();
                    held.dedup();
                    return Err(PoolError::Upgrade {
                        path: self.path.clone(),
                        reason: format!(
                            "its journal needs the last {} MiB of the data area, which hold data of {}, and the device has no free extent to move it to; free that much space on it (delete or shrink a volume, or discard data) with the Ballast release that wrote it, then start this one again",
                            v2.journal_extents,
                            held.join(", ")
                        ),
                    });
                };
                st.free.remove(&q);
                let vol = st.volumes[entry.owner as usize - 1]
                    .clone()
                    .expect("owners are live volumes");
                (entry, q, vol)
            };
            let data = read_at(
                &*self.engine,
                &self.file,
                self.layout
                    .data_block_offset(u64::from(p) * BLOCKS_PER_EXTENT),
                EXTENT as usize,
            )
            .await
            .map_err(self.io_err("read"))?;
            self.engine
                .submit(IoRequest::write(
                    &self.file,
                    self.layout
                        .data_block_offset(u64::from(q) * BLOCKS_PER_EXTENT),
                    data,
                    false,
                ))
                .await
                .result
                .map_err(self.io_err("write"))?;
            let mut st = lock(&self.state);
            for (from, to) in Self::block_range(p).zip(Self::block_range(q)) {
                self.set_csum(to, self.csum(from));
                self.set_csum(from, 0);
            }
            st.owners[q as usize] = entry;
            st.owners[p as usize] = ExtentEntry::default();
            let g = self.ext[p as usize].generation.load(SeqCst);
            self.ext[q as usize].generation.store(g, SeqCst);
            self.ext[q as usize].committed.store(false, SeqCst);
            vol.set_mapping(entry.logical, q);
            tracing::info!(path = %self.path.display(), from = p, to = q, volume = %vol.name, "moved an extent out of the journal's space");
        }
        // The moved data is synced before the slot that points at it.
        self.checkpoint(true).await?;
        let sb = Superblock {
            layout: v2,
            version: FORMAT_VERSION,
            ..self.sb.clone()
        };
        let encoded = sb.encode();
        for at in [v2.sb_b_offset(), 0] {
            self.write_raw(at, &encoded)
                .await
                .map_err(self.io_err("write"))?;
            self.fsync().await.map_err(self.io_err("fdatasync"))?;
        }
        Ok(sb)
    }

    /// Load the newest valid metadata slot and the checksum area; recover open extents.
    async fn load(&self) -> Result<OpenReport, PoolError> {
        let l = self.layout;
        let meta_err = |source| PoolError::Metadata {
            path: self.path.clone(),
            source,
        };
        let mut best: Option<(super::metadata::SlotHeader, usize, Vec<u8>)> = None;
        let mut last_err = MetadataError::BadHeader;
        for (i, off) in l.meta_slot_offset.iter().enumerate() {
            let slot = read_at(&*self.engine, &self.file, *off, l.meta_slot_bytes as usize)
                .await
                .map_err(self.io_err("read"))?;
            match check_slot(&l, &self.sb.disk_uuid, &slot) {
                Ok(h) if best.as_ref().is_none_or(|b| h.seq > b.0.seq) => {
                    best = Some((
                        h,
                        i,
                        slot[l.header_pages as usize * BLOCK as usize..].to_vec(),
                    ));
                }
                Ok(_) => {}
                Err(e) => last_err = e,
            }
        }
        let Some((header, slot, body)) = best else {
            return Err(meta_err(last_err));
        };
        let mut meta = MetaState::decode_body(&l, &body).map_err(meta_err)?;
        let csum_area = read_at(
            &*self.engine,
            &self.file,
            l.csum_offset,
            l.csum_bytes as usize,
        )
        .await
        .map_err(self.io_err("read"))?;
        let mut csums: Vec<u32> = (0..self.csums.len())
            .map(|i| super::format::get_u32(&csum_area, i * 4))
            .collect();
        // The journal records written after that checkpoint.
        let mut journal = header.journal;
        if l.journal_extents > 0 {
            let region = read_at(
                &*self.engine,
                &self.file,
                l.journal_offset(),
                l.journal_bytes() as usize,
            )
            .await
            .map_err(self.io_err("read"))?;
            let replayed;
            (journal, replayed) = super::journal::replay(
                &l,
                &self.sb.disk_uuid,
                &region,
                header.journal,
                &mut meta,
                &mut csums,
            )
            .map_err(meta_err)?;
            meta.check(&l).map_err(meta_err)?;
            if replayed > 0 {
                tracing::info!(path = %self.path.display(), records = replayed, "replayed the journal");
            }
        }
        {
            let mut cs = self.commit_lock.lock().await;
            cs.seq = header.seq;
            cs.journal = journal;
            cs.slot_body[slot] = Some(body);
        }
        for (i, (c, v)) in self.csums.iter().zip(csums).enumerate() {
            c.store(v, SeqCst);
            // What the journal changed goes into the checksum area at the next checkpoint.
            if super::format::get_u32(&csum_area, i * 4) != v {
                self.mark_dirty(i);
            }
        }
        drop(csum_area);
        {
            let mut st = lock(&self.state);
            for (i, rec) in meta.volumes.iter().enumerate() {
                let Some(rec) = rec else { continue };
                st.volumes_high = st.volumes_high.max(i + 1);
                st.volumes[i] = Some(Arc::new(VolRt::new(i, rec)));
            }
            // Decode checked that every parent is a live snapshot.
            for (i, rec) in meta.volumes.iter().enumerate() {
                let Some(rec) = rec.as_ref().filter(|r| r.parent != 0) else {
                    continue;
                };
                let parent = st.volumes[rec.parent as usize - 1].clone();
                let v = st.volumes[i].as_ref().expect("loaded above");
                *v.parent.write().expect("parent lock") = parent;
            }
            st.free.clear();
            for (p, e) in meta.extents.iter().enumerate() {
                st.owners[p] = *e;
                if e.owner == 0 {
                    if p < l.usable_extents() as usize {
                        st.free.insert(p as u32);
                    }
                    for b in Self::block_range(p as u32) {
                        if self.csums[b].swap(0, SeqCst) != 0 {
                            self.mark_dirty(b);
                        }
                    }
                    continue;
                }
                let vol = st.volumes[e.owner as usize - 1]
                    .clone()
                    .expect("decode checked owners");
                vol.set_mapping(e.logical, p as u32);
                vol.allocated_extents.fetch_add(1, SeqCst);
                if e.generation != GENERATION_UNKNOWN {
                    vol.seq.fetch_max(e.generation, SeqCst);
                }
                self.ext[p].generation.store(e.generation, SeqCst);
                self.ext[p].committed.store(true, SeqCst);
            }
        }
        // Recovery: recompute the checksums of open extents from their data.
        let mut recovered = 0;
        for (p, _) in meta.open.iter().enumerate().filter(|(_, o)| **o) {
            let data = read_at(
                &*self.engine,
                &self.file,
                l.data_block_offset(p as u64 * BLOCKS_PER_EXTENT),
                EXTENT as usize,
            )
            .await
            .map_err(self.io_err("read"))?;
            // Whether writes reached the extent after its last commit: then its recorded
            // generation does not cover them (and writes to blocks the metadata still calls
            // zero are dropped), so a rebuild must copy it whatever the generations say.
            let mut changed = false;
            for (k, b) in Self::block_range(p as u32).enumerate() {
                let block = &data[k * BLOCK as usize..(k + 1) * BLOCK as usize];
                if self.csums[b].load(SeqCst) == 0 {
                    changed |= block.iter().any(|&x| x != 0);
                    continue;
                }
                let c = encode_crc(block);
                if self.csums[b].swap(c, SeqCst) != c {
                    self.mark_dirty(b);
                    changed = true;
                }
            }
            if changed {
                self.ext[p].generation.store(GENERATION_UNKNOWN, SeqCst);
            }
            recovered += 1;
        }
        {
            let mut os = lock(&self.open);
            os.durable.clone_from(&meta.open);
            os.safe.clone_from(&meta.open);
        }
        if recovered > 0 {
            tracing::warn!(path = %self.path.display(), extents = recovered, "recovered after an unclean shutdown: recomputed checksums of open extents");
        }
        // A checkpoint now: the other slot becomes known, the recovered checksums durable, and
        // the journal starts after what was replayed.
        self.checkpoint(recovered > 0).await?;
        Ok(OpenReport {
            formatted: false,
            recovered_extents: recovered,
        })
    }

    pub(crate) fn block_range(p: u32) -> std::ops::Range<usize> {
        let start = p as usize * BLOCKS_PER_EXTENT as usize;
        start..start + BLOCKS_PER_EXTENT as usize
    }

    /// Whether a block got its first checksum since the last journal record: a write that
    /// completes then commits first (see [`crate::pool::replica`]).
    pub(crate) fn has_fresh(&self) -> bool {
        self.fresh.load(SeqCst)
    }

    pub(crate) fn csum(&self, pblock: usize) -> u32 {
        self.csums[pblock].load(SeqCst)
    }

    pub(crate) fn set_csum(&self, pblock: usize, value: u32) {
        let old = self.csums[pblock].swap(value, SeqCst);
        if old != value {
            if old == 0 {
                self.fresh.store(true, SeqCst);
            }
            self.mark_dirty(pblock);
        }
    }

    /// Note a changed checksum for the next record (the block, then its extent: a record
    /// takes the extent bits first, so it never misses a block whose extent bit it took) and
    /// the next checkpoint.
    fn mark_dirty(&self, pblock: usize) {
        self.blk_changed[pblock / 64].fetch_or(1 << (pblock % 64), SeqCst);
        self.mark_extent((pblock / BLOCKS_PER_EXTENT as usize) as u32);
        let page = pblock / CSUM_PER_PAGE;
        self.csum_dirty[page / 64].fetch_or(1 << (page % 64), SeqCst);
    }

    /// Note that extent `p`'s table entry (owner, generation) changed, for the next record.
    pub(crate) fn mark_extent(&self, p: u32) {
        self.changes.fetch_add(1, SeqCst);
        let p = p as usize;
        self.ext_changed[p / 64].fetch_or(1 << (p % 64), SeqCst);
    }

    pub(crate) fn current_interval(&self) -> u64 {
        self.interval.load(SeqCst)
    }

    pub(crate) fn engine(&self) -> &dyn IoEngine {
        &*self.engine
    }

    pub(crate) fn file(&self) -> &IoFile {
        &self.file
    }

    /// Every live volume (snapshots are not volumes).
    pub(crate) fn volumes(&self) -> Vec<Arc<VolRt>> {
        lock(&self.state)
            .volumes
            .iter()
            .flatten()
            .filter(|v| !v.snapshot)
            .cloned()
            .collect()
    }

    /// The volume named `name`, if this device holds one (without copying the volume table:
    /// the data path looks a replica up per peer request).
    pub(crate) fn volume_named(&self, name: &VolumeName) -> Option<Arc<VolRt>> {
        lock(&self.state)
            .volumes
            .iter()
            .flatten()
            .find(|v| !v.snapshot && &v.name == name)
            .cloned()
    }

    /// Allocated and total extents.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let st = lock(&self.state);
        let used = st.owners.iter().filter(|e| e.owner != 0).count() as u64;
        (used, u64::from(self.layout.usable_extents()))
    }

    pub(crate) fn free_volume_slots(&self) -> usize {
        lock(&self.state)
            .volumes
            .iter()
            .filter(|v| v.is_none())
            .count()
    }

    /// Add a volume record with id `uuid` (shared by every replica of the volume) and commit
    /// it.
    pub(crate) async fn create_volume(
        &self,
        name: &VolumeName,
        size: u64,
        replicas: u8,
        uuid: [u8; 16],
    ) -> Result<Arc<VolRt>, PoolError> {
        let vol = {
            let mut st = lock(&self.state);
            let Some(index) = st.volumes.iter().position(Option::is_none) else {
                return Err(PoolError::Full {
                    path: self.path.clone(),
                    what: "volume table",
                });
            };
            let vol = Arc::new(VolRt::new(
                index,
                &VolumeRecord {
                    name: name.clone(),
                    uuid,
                    size,
                    created_at: now_secs(),
                    generation: 0,
                    replicas,
                    snapshot: false,
                    hidden: false,
                    parent: 0,
                },
            ));
            st.volumes[index] = Some(vol.clone());
            st.volumes_high = st.volumes_high.max(index + 1);
            vol
        };
        self.commit(false).await?;
        Ok(vol)
    }

    /// Remove a volume, free its extents, and commit. (Its snapshots stay; a deleted one it
    /// was based on goes now if nothing else is based on it.)
    pub(crate) async fn delete_volume(&self, vol: &VolRt) -> Result<(), PoolError> {
        {
            let mut st = lock(&self.state);
            self.drop_record(&mut st, vol);
        }
        self.collect(vol.parent()).await;
        self.commit(false).await
    }

    /// Grow a volume and commit.
    pub(crate) async fn grow_volume(&self, vol: &VolRt, new_size: u64) -> Result<(), PoolError> {
        {
            let _st = lock(&self.state);
            let mut map = vol.map.write().expect("volume map lock");
            let extents = (new_size / EXTENT) as usize;
            while map.len() < extents {
                map.push(AtomicU32::new(UNMAPPED));
            }
            vol.size.store(new_size, SeqCst);
        }
        self.commit(false).await
    }

    /// The extent `vol` maps at `logical`, allocating one if needed: a copy of its ancestor's
    /// if one maps it (`snapshot.rs`).
    pub(crate) async fn map_or_alloc(&self, vol: &VolRt, logical: u64) -> Result<u32, AllocError> {
        let p = vol.lookup(logical);
        if p != UNMAPPED {
            return Ok(p);
        }
        if self.shared_below(vol, logical) {
            return self.copy_on_write(vol, logical, true).await;
        }
        self.allocate(vol, logical).await
    }

    /// The extent `vol` maps at `logical`, allocating a fresh one if needed.
    async fn allocate(&self, vol: &VolRt, logical: u64) -> Result<u32, AllocError> {
        let mut committed_for_space = false;
        loop {
            let p = vol.lookup(logical);
            if p != UNMAPPED {
                return Ok(p);
            }
            {
                let mut st = lock(&self.state);
                if vol.deleted.load(SeqCst) {
                    return Err(AllocError::Closed);
                }
                let p = vol.lookup(logical);
                if p != UNMAPPED {
                    return Ok(p);
                }
                // Prefer the extent after the previous logical extent's, for sequential locality.
                let prev = logical.checked_sub(1).map_or(UNMAPPED, |l| vol.lookup(l));
                let pick = if prev != UNMAPPED && st.free.contains(&(prev + 1)) {
                    Some(prev + 1)
                } else {
                    st.free.first().copied()
                };
                if let Some(p) = pick {
                    st.free.remove(&p);
                    st.owners[p as usize] = ExtentEntry {
                        owner: vol.index + 1,
                        logical: logical as u32,
                        generation: 0,
                    };
                    for b in Self::block_range(p) {
                        self.set_csum(b, 0);
                    }
                    let e = &self.ext[p as usize];
                    e.committed.store(false, SeqCst);
                    e.generation.store(0, SeqCst);
                    vol.set_mapping(logical as u32, p);
                    vol.allocated_extents.fetch_add(1, SeqCst);
                    self.mark_extent(p);
                    return Ok(p);
                }
                if st.pending_free.is_empty() || committed_for_space {
                    return Err(AllocError::NoSpace);
                }
            }
            // Freed extents become reusable once a commit records the free.
            self.commit(false).await.map_err(AllocError::Commit)?;
            committed_for_space = true;
        }
    }

    /// Drop `logical` from `vol`'s map and queue its extent for reuse. Caller holds the state lock.
    fn free_extent_locked(&self, st: &mut DiskState, vol: &VolRt, map: &[AtomicU32], logical: u64) {
        let p = map[logical as usize].swap(UNMAPPED, SeqCst);
        if p == UNMAPPED {
            return;
        }
        st.owners[p as usize] = ExtentEntry::default();
        self.ext[p as usize].version.fetch_add(1, SeqCst);
        for b in Self::block_range(p) {
            self.set_csum(b, 0);
        }
        st.pending_free.push((p, self.interval.load(SeqCst)));
        self.mark_extent(p);
        vol.allocated_extents.fetch_sub(1, SeqCst);
    }

    /// Free `logical` of `vol` (a whole-extent discard).
    pub(crate) fn free_extent(&self, vol: &VolRt, logical: u64) {
        let mut st = lock(&self.state);
        let map = vol.map.read().expect("volume map lock");
        if (logical as usize) < map.len() {
            self.free_extent_locked(&mut st, vol, &map, logical);
        }
    }

    /// Make sure writes to `p` are covered by the open set; commits if they are not.
    pub(crate) async fn ensure_open(&self, p: u32) -> Result<(), PoolError> {
        loop {
            if !self.ext[p as usize].committed.load(SeqCst) {
                return Ok(());
            }
            {
                let mut os = lock(&self.open);
                if os.safe[p as usize] {
                    return Ok(());
                }
                os.wanted.push(p);
            }
            self.commit(false).await?;
        }
    }

    /// Whether extent `p` may leave the open set at interval `cur`: no write in flight, none
    /// for [`KEEP_OPEN_COMMITS`] commits.
    fn closable(&self, p: usize, cur: u64) -> bool {
        let e = &self.ext[p];
        e.writes.load(SeqCst) == 0 && e.last_write.load(SeqCst) + KEEP_OPEN_COMMITS <= cur
    }

    /// Commit if anything changed since the last commit, or if the open set is over its limit
    /// and can shrink.
    pub(crate) async fn commit_if_changed(&self) -> Result<(), PoolError> {
        let changed = self.changes.load(SeqCst) != self.committed_changes.load(SeqCst);
        let shrinkable = {
            let os = lock(&self.open);
            let cur = self.interval.load(SeqCst);
            os.durable.iter().filter(|&&o| o).count() > OPEN_LIMIT
                && os
                    .durable
                    .iter()
                    .enumerate()
                    .any(|(p, &open)| open && self.closable(p, cur))
        };
        let journal_half_full = {
            let cs = self.commit_lock.lock().await;
            cs.journal_used * 2 > self.layout.journal_bytes()
        };
        if shrinkable || journal_half_full {
            self.checkpoint(false).await?;
        } else if changed {
            self.commit(false).await?;
        }
        Ok(())
    }

    /// Commit: make every completed write and metadata change durable. With `closing`, the
    /// open set is emptied of every extent without a write in flight (clean shutdown).
    ///
    /// Commits are grouped: a caller that finds that a commit which started after its call
    /// has already succeeded returns at once, since that commit covered it.
    pub(crate) async fn commit(&self, closing: bool) -> Result<(), PoolError> {
        let arrived = self.commits_started.load(SeqCst);
        let mut cs = self.commit_lock.lock().await;
        if !closing && cs.last_ok > arrived {
            return Ok(());
        }
        if closing || cs.journal_broken || cs.durable_generations.is_none() {
            return self.checkpoint_locked(&mut cs, closing).await;
        }
        self.record_locked(&mut cs).await
    }

    /// Take a checkpoint (see the module docs), whatever the journal holds.
    pub(crate) async fn checkpoint(&self, closing: bool) -> Result<(), PoolError> {
        let mut cs = self.commit_lock.lock().await;
        self.checkpoint_locked(&mut cs, closing).await
    }

    /// Append a journal record of what changed since the previous one, and sync; a checkpoint
    /// instead when the journal has no room for it.
    async fn record_locked(&self, cs: &mut CommitState) -> Result<(), PoolError> {
        let index = self.commits_started.fetch_add(1, SeqCst) + 1;
        let changes = self.changes.load(SeqCst);
        self.interval.fetch_add(1, SeqCst);
        let snap = self.snapshot_record(cs);
        let len = snap.record.encoded_len() as u64;
        let cap = self.layout.journal_bytes();
        let (pos, used) = if cs.journal.pos + len <= cap {
            (cs.journal.pos, cs.journal_used + len)
        } else {
            (0, cs.journal_used + (cap - cs.journal.pos) + len)
        };
        if used > cap {
            // No room: the checkpoint covers this record's changes (it snapshots everything,
            // records exact generations, and opens what writers asked for).
            cs.unsure.clear();
            lock(&self.open).wanted.extend(
                snap.record
                    .extents
                    .iter()
                    .filter(|c| c.entry.owner != 0)
                    .map(|c| c.extent),
            );
            return self.checkpoint_locked(cs, false).await;
        }
        let seq = cs.journal.seq + 1;
        let mut bytes = Vec::new();
        snap.record.encode(seq, &self.sb.disk_uuid, &mut bytes);
        // The sequence number and the space are spent whatever happens next.
        cs.journal = JournalMark {
            seq,
            pos: pos + len,
        };
        cs.journal_used = used;
        let result = async {
            if snap.ordered {
                self.fsync().await.map_err(self.io_err("fdatasync"))?;
            }
            // The record and its sync in one trip through the engine.
            self.engine
                .submit(IoRequest::write_then_sync(
                    &self.file,
                    self.layout.journal_offset() + pos,
                    IoBuf::from_slice(&bytes),
                ))
                .await
                .result
                .map_err(self.io_err("write journal"))
        }
        .await;
        if let Err(e) = result {
            cs.journal_broken = true;
            tracing::error!(path = %self.path.display(), error = %e, "journal commit failed");
            return Err(e);
        }
        // Durable: account for it.
        let gens = cs
            .durable_generations
            .as_mut()
            .expect("records follow a checkpoint");
        let mut os = lock(&self.open);
        for (c, &g) in snap.record.extents.iter().zip(&snap.generations) {
            let p = c.extent as usize;
            gens[p] = g;
            let open = c.entry.owner != 0;
            os.durable[p] = open;
            os.safe[p] = open;
        }
        drop(os);
        for (i, v) in snap.volumes {
            cs.recorded_volumes[i as usize] = v;
        }
        cs.last_ok = index;
        self.committed_changes.store(changes, SeqCst);
        self.release_freed(&snap.releasable);
        Ok(())
    }

    /// Take what changed since the previous record (see [`RecordSnap`]), under the open and
    /// state locks (in that order).
    fn snapshot_record(&self, cs: &mut CommitState) -> RecordSnap {
        let cur = self.interval.load(SeqCst);
        let ordered = self.fresh.swap(false, SeqCst);
        let mut os = lock(&self.open);
        let st = lock(&self.state);
        let mut list = std::mem::take(&mut cs.unsure);
        list.append(&mut os.wanted);
        drop(os);
        for (w, word) in self.ext_changed.iter().enumerate() {
            let mut bits = word.swap(0, SeqCst);
            while bits != 0 {
                list.push((w * 64 + bits.trailing_zeros() as usize) as u32);
                bits &= bits - 1;
            }
        }
        list.sort_unstable();
        list.dedup();
        let durable = cs
            .durable_generations
            .as_deref()
            .expect("records follow a checkpoint");
        let mut record = Record::default();
        let mut generations = Vec::with_capacity(list.len());
        for p in list {
            let e = &self.ext[p as usize];
            let mut entry = st.owners[p as usize];
            entry.generation = 0;
            if entry.owner != 0 {
                e.committed.store(true, SeqCst);
                entry.generation = e.generation.load(SeqCst);
            }
            generations.push(entry.generation);
            if entry.owner != 0 && !ordered && entry.generation != durable[p as usize] {
                entry.generation = GENERATION_UNKNOWN;
                cs.unsure.push(p);
            }
            let mut csums = Vec::new();
            let first = p as usize * BLOCKS_PER_EXTENT as usize;
            for w in first / 64..(first + BLOCKS_PER_EXTENT as usize) / 64 {
                let mut bits = self.blk_changed[w].swap(0, SeqCst);
                while bits != 0 {
                    let b = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    csums.push(((b - first) as u8, self.csums[b].load(SeqCst)));
                }
            }
            record.extents.push(ExtentChange {
                extent: p,
                entry,
                csums,
            });
        }
        let mut volumes = Vec::new();
        for (i, v) in st.volumes.iter().enumerate().take(st.volumes_high) {
            let now = v.as_ref().map(|v| v.mark());
            if now != cs.recorded_volumes[i] {
                volumes.push((i as u32, now));
                record
                    .volumes
                    .push((i as u32, v.as_ref().map(|v| v.record())));
            }
        }
        let releasable = st
            .pending_free
            .iter()
            .filter(|(_, at)| *at <= cur)
            .map(|(p, _)| *p)
            .collect();
        RecordSnap {
            record,
            generations,
            volumes,
            releasable,
            ordered,
        }
    }

    /// Put extents whose free a commit made durable, and that no I/O pins, on the free list.
    /// New pins on them are transient (the pinner finds the mapping gone and lets go), so no
    /// I/O can start on them before they reach the free list.
    fn release_freed(&self, releasable: &[u32]) {
        let released: Vec<u32> = lock(&self.state)
            .pending_free
            .iter()
            .map(|&(p, _)| p)
            .filter(|p| releasable.contains(p) && self.ext[*p as usize].pins.load(SeqCst) == 0)
            .collect();
        if self.punch_holes {
            for &p in &released {
                self.punch_extent(p);
            }
        }
        let mut st = lock(&self.state);
        let DiskState {
            free, pending_free, ..
        } = &mut *st;
        pending_free.retain(|(p, _)| !released.contains(p));
        free.extend(released);
    }

    /// Write a checkpoint: the dirty checksum pages, a sync, the metadata slot, a sync. With
    /// `closing`, the open set is emptied of every extent without a write in flight.
    async fn checkpoint_locked(
        &self,
        cs: &mut CommitState,
        closing: bool,
    ) -> Result<(), PoolError> {
        let index = self.commits_started.fetch_add(1, SeqCst) + 1;
        let changes = self.changes.load(SeqCst);
        let cur = self.interval.fetch_add(1, SeqCst);
        let n = self.layout.n_extents as usize;
        // 1. Snapshot under the open and state locks (in that order).
        let (meta, new_open, releasable, volumes) = {
            let mut os = lock(&self.open);
            let st = lock(&self.state);
            for (p, e) in st.owners.iter().enumerate() {
                if e.owner != 0 && !self.ext[p].committed.load(SeqCst) {
                    self.ext[p].committed.store(true, SeqCst);
                }
            }
            let mut new_open = vec![false; n];
            for &p in &os.wanted {
                new_open[p as usize] = true;
            }
            os.wanted.clear();
            let requested = new_open.clone();
            for (p, open) in new_open.iter_mut().enumerate() {
                let e = &self.ext[p];
                let recent = !closing && e.last_write.load(SeqCst) + KEEP_OPEN_COMMITS > cur;
                // An open extent stays open (a write to a closed one waits for a commit)
                // unless the set is over its limit, trimmed below.
                let kept = !closing && os.durable[p];
                *open = st.owners[p].owner != 0
                    && (*open || e.writes.load(SeqCst) > 0 || recent || kept);
            }
            let count = new_open.iter().filter(|&&o| o).count();
            if count > OPEN_LIMIT {
                // Close the idle extents written longest ago, down to 3/4 of the limit, in one
                // commit (an ordered one), so most commits close nothing.
                let mut idle: Vec<(u64, usize)> = new_open
                    .iter()
                    .enumerate()
                    .filter(|&(p, &o)| o && !requested[p] && self.closable(p, cur))
                    .map(|(p, _)| (self.ext[p].last_write.load(SeqCst), p))
                    .collect();
                idle.sort_unstable();
                for &(_, p) in idle.iter().take(count - OPEN_LIMIT * 3 / 4) {
                    new_open[p] = false;
                }
            }
            let OpenState { durable, safe, .. } = &mut *os;
            for ((safe, durable), open) in safe.iter_mut().zip(durable.iter()).zip(&new_open) {
                *safe = *durable && *open;
            }
            let mut meta = MetaState::empty(&self.layout);
            for (i, v) in st.volumes.iter().enumerate() {
                meta.volumes[i] = v.as_ref().map(|v| v.record());
            }
            for (p, e) in st.owners.iter().enumerate() {
                meta.extents[p] = ExtentEntry {
                    generation: if e.owner == 0 {
                        0
                    } else {
                        self.ext[p].generation.load(SeqCst)
                    },
                    ..*e
                };
            }
            meta.open.clone_from(&new_open);
            let releasable: Vec<u32> = st
                .pending_free
                .iter()
                .filter(|(_, at)| *at <= cur)
                .map(|(p, _)| *p)
                .collect();
            let volumes: Vec<_> = st
                .volumes
                .iter()
                .map(|v| v.as_ref().map(|v| v.mark()))
                .collect();
            (meta, new_open, releasable, volumes)
        };
        let generations: Vec<u64> = meta.extents.iter().map(|e| e.generation).collect();
        let result = self.write_commit(cs, &meta).await;
        let mut os = lock(&self.open);
        match result {
            Ok(()) => {
                cs.durable_generations = Some(generations);
                cs.recorded_volumes = volumes;
                cs.unsure.clear();
                cs.journal_used = 0;
                cs.journal_broken = false;
                cs.last_ok = index;
                self.committed_changes.store(changes, SeqCst);
                os.durable.clone_from(&new_open);
                os.safe = new_open;
                drop(os);
                self.release_freed(&releasable);
                Ok(())
            }
            Err(e) => {
                // `safe` stays the intersection: writers keep waiting for a good commit.
                tracing::error!(path = %self.path.display(), error = %e, "metadata commit failed");
                Err(e)
            }
        }
    }

    /// Write the dirty checksum pages, sync (the checksums and the data before them are
    /// durable before the slot that depends on them), and write and sync `meta`'s slot.
    async fn write_commit(&self, cs: &mut CommitState, meta: &MetaState) -> Result<(), PoolError> {
        let l = self.layout;
        // 2. Dirty checksum pages, in place.
        let mut pages = Vec::new();
        for (w, word) in self.csum_dirty.iter().enumerate() {
            let mut bits = word.swap(0, SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                pages.push(w * 64 + bit);
            }
        }
        if !pages.is_empty() {
            let mut buf = IoBuf::zeroed(pages.len() * BLOCK as usize);
            let mut segments = Vec::with_capacity(pages.len());
            for (i, &page) in pages.iter().enumerate() {
                let base = page * CSUM_PER_PAGE;
                for k in 0..CSUM_PER_PAGE {
                    let v = self.csums.get(base + k).map_or(0, |a| a.load(SeqCst));
                    super::format::put_u32(&mut buf, i * BLOCK as usize + k * 4, v);
                }
                push_segment(
                    &mut segments,
                    l.csum_offset + page as u64 * BLOCK,
                    i * BLOCK as usize,
                    BLOCK as usize,
                );
            }
            // The pages hold checksums only of writes that completed before they were read;
            // those writes are durable before any page that vouches for them is written (a
            // page landing before its data would let recovery recompute a checksum over what
            // the block held before: a reused extent's previous life).
            let written = match self.fsync().await {
                Ok(()) => self.write_segments(buf, segments).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                for page in pages {
                    self.csum_dirty[page / 64].fetch_or(1 << (page % 64), SeqCst);
                }
                return Err(self.io_err("write checksums")(e));
            }
        }
        // 3. Data and checksums durable before the metadata that refers to them.
        self.fsync().await.map_err(self.io_err("fdatasync"))?;
        // 4. The metadata slot: changed body pages and the header, then sync. Only those
        //    pages are copied into the I/O buffer (the body is the size of the whole table).
        let seq = cs.seq + 1;
        let slot = (seq % 2) as usize;
        let mut body = cs.spare_body.take().unwrap_or_default();
        meta.encode_body_into(&l, &mut body);
        let header = encode_header(&l, seq, cs.journal, &self.sb.disk_uuid, &body);
        let page = BLOCK as usize;
        let known = cs.slot_body[slot].take();
        let changed: Vec<usize> = (0..body.len() / page)
            .filter(|&i| {
                let new = &body[i * page..(i + 1) * page];
                known
                    .as_ref()
                    .is_none_or(|k| &k[i * page..(i + 1) * page] != new)
            })
            .collect();
        let mut buf = IoBuf::zeroed(header.len() + changed.len() * page);
        buf[..header.len()].copy_from_slice(&header);
        let base = l.meta_slot_offset[slot];
        let mut segments = Vec::with_capacity(1 + changed.len());
        push_segment(&mut segments, base, 0, header.len());
        for (k, &i) in changed.iter().enumerate() {
            let at = header.len() + k * page;
            buf[at..at + page].copy_from_slice(&body[i * page..(i + 1) * page]);
            let disk = base + (header.len() + i * page) as u64;
            push_segment(&mut segments, disk, at, page);
        }
        // The slot's old body is the next commit's buffer.
        cs.spare_body = known;
        self.write_segments(buf, segments)
            .await
            .map_err(self.io_err("write metadata"))?;
        self.fsync().await.map_err(self.io_err("fdatasync"))?;
        cs.slot_body[slot] = Some(body);
        cs.seq = seq;
        Ok(())
    }

    /// Return a free extent's space to the filesystem that holds the pool file. Failure only
    /// costs space, so it is logged, not returned.
    fn punch_extent(&self, p: u32) {
        let offset = self
            .layout
            .data_block_offset(u64::from(p) * BLOCKS_PER_EXTENT);
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(EXTENT))
        else {
            return;
        };
        // SAFETY: `fallocate` on an open descriptor has no memory-safety preconditions.
        let rc = unsafe {
            libc::fallocate(
                self.file.raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc < 0 {
            tracing::debug!(path = %self.path.display(), extent = p, error = %std::io::Error::last_os_error(), "cannot punch a hole for a freed extent");
        }
    }

    /// Write `segments` of `buf` (metadata or checksum pages) to the device.
    async fn write_segments(&self, buf: IoBuf, segments: Vec<Segment>) -> std::io::Result<()> {
        let req = IoRequest {
            op: IoOp::Write { dsync: false },
            file: self.file.clone(),
            buf: Some(buf),
            segments,
        };
        self.engine.submit(req).await.result
    }

    async fn fsync(&self) -> std::io::Result<()> {
        self.engine
            .submit(IoRequest::fsync(&self.file))
            .await
            .result
    }

    async fn write_raw(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.engine
            .submit(IoRequest::write(
                &self.file,
                offset,
                IoBuf::from_slice(data),
                false,
            ))
            .await
            .result
    }
}

/// Append a segment, merging it with the previous one when both are contiguous.
pub(crate) fn push_segment(
    segments: &mut Vec<Segment>,
    file_offset: u64,
    buf_offset: usize,
    len: usize,
) {
    if let Some(last) = segments.last_mut() {
        if last.file_offset + last.len as u64 == file_offset
            && last.buf_offset + last.len == buf_offset
        {
            last.len += len;
            return;
        }
    }
    segments.push(Segment {
        file_offset,
        buf_offset,
        len,
    });
}

async fn read_at(
    engine: &dyn IoEngine,
    file: &IoFile,
    offset: u64,
    len: usize,
) -> std::io::Result<IoBuf> {
    let c = engine
        .submit(IoRequest::read(file, offset, IoBuf::zeroed(len)))
        .await;
    c.result?;
    c.buf
        .ok_or_else(|| std::io::Error::other("the I/O engine lost a buffer"))
}

/// Why an extent could not be allocated.
#[derive(Debug)]
pub(crate) enum AllocError {
    NoSpace,
    Closed,
    Commit(PoolError),
}
