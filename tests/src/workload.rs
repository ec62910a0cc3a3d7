//! A verifying workload for a block device: every write carries a sequence number and a
//! checksum, and a checker finds every acknowledged write after a scenario.
//!
//! - [`Workload::start`] runs a writer thread that writes 4 KiB `O_DIRECT` blocks into
//!   [`Config::slots`] slots (slot `i` at `base + i * 4 KiB`), in a seeded pseudo-random order.
//!   Each block is `{magic, slot, seq, crc32c}` followed by filler derived from `(slot, seq)`;
//!   `seq` is global and increasing. After every [`Config::sync_every`] writes the writer calls
//!   `fdatasync`; a write counts as **acknowledged** only once a sync after it returned OK.
//! - I/O errors do not panic the writer: it counts them, keeps the first message and every
//!   errno seen, and goes on trying (so a scenario can see I/O come back).
//! - [`Workload::stop`] returns a [`Report`], whose [`Ledger`] knows for each slot the last
//!   acknowledged `seq` and the writes that were issued but never acknowledged.
//!   [`Ledger::verify`] reads every slot back (from any device holding the volume, e.g. after
//!   a re-attach on another node) and fails unless each block is intact, in its slot, and holds
//!   the last acknowledged `seq` or a later unacknowledged one; never-written slots must read
//!   as zeros.
//! - With [`Config::check_reads`], a reader thread reads random slots while the writer runs and
//!   counts **stale reads**: a block older than the write acknowledged to that slot before the
//!   read began (or zeros, misplaced or corrupt data), the real-time form of the check above.
//! - [`Workload::resume`] goes on from an earlier run's [`Ledger`] (after the volume moved to
//!   another node, say), numbering its writes above every `seq` the earlier run issued.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use volume::io::IoBuf;

/// The size of one block (and slot).
pub const BLOCK: usize = 4096;
/// The first bytes of every block the workload writes.
pub const MAGIC: &[u8; 8] = b"BLSTWKLD";
const HEADER: usize = 28;

/// What the writer does.
#[derive(Debug, Clone)]
pub struct Config {
    /// The byte offset of slot 0 (4 KiB aligned).
    pub base: u64,
    /// How many 4 KiB slots, contiguous from `base`.
    pub slots: u64,
    /// The seed of the slot order.
    pub seed: u64,
    /// `fdatasync` after this many writes (1: after each).
    pub sync_every: u32,
    /// Pause after a failed write or sync, so a failing device is not hammered.
    pub error_backoff: Duration,
    /// Run the stale-read checker beside the writer.
    pub check_reads: bool,
}

impl Default for Config {
    /// 8192 slots over the first 32 MiB, a sync after every write.
    fn default() -> Self {
        Self {
            base: 0,
            slots: 8192,
            seed: 0x00ba_11a5_7000_0001,
            sync_every: 1,
            error_backoff: Duration::from_millis(20),
            check_reads: false,
        }
    }
}

/// xorshift64*: a tiny deterministic PRNG (no external crate, the same on every run).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fill `b` (one block) with the block of `(slot, seq)`.
pub fn fill_block(b: &mut [u8], slot: u64, seq: u64) {
    assert_eq!(b.len(), BLOCK);
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&slot.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut rng = Rng::new(slot.rotate_left(32) ^ seq);
    for chunk in b[HEADER..].chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = block_crc(b);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn block_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..24]), &b[HEADER..])
}

/// What a block read back holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// All zeros.
    Zero,
    /// A valid workload block.
    Valid {
        /// The slot written in it.
        slot: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// Anything else: the reason.
    Bad(String),
}

/// Decode one block.
pub fn parse_block(b: &[u8]) -> Block {
    if b.iter().all(|&x| x == 0) {
        return Block::Zero;
    }
    if &b[0..8] != MAGIC {
        return Block::Bad(format!("bad magic {:02x?}", &b[0..8]));
    }
    let slot = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    let crc = block_crc(b);
    if stored != crc {
        return Block::Bad(format!(
            "checksum mismatch (slot {slot}, seq {seq}): stored {stored:08x}, computed {crc:08x}"
        ));
    }
    Block::Valid { slot, seq }
}

/// Per slot: the last acknowledged write and the ones issued but never acknowledged.
#[derive(Debug, Clone)]
pub struct Ledger {
    cfg: Config,
    /// The last acknowledged `seq` per slot (0: none).
    acked: Vec<u64>,
    /// Writes newer than `acked` that were issued but not acknowledged.
    maybe: Vec<Vec<u64>>,
}

/// What [`Ledger::audit`] found: the slots that verified and the ones that did not.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// The slots that verified.
    pub verified: Verified,
    /// Slots whose acknowledged write is gone (zeros or an older block where a write was
    /// acknowledged).
    pub lost: u64,
    /// Slots holding something never written there (corrupt, misplaced, an unknown `seq`).
    pub wrong: u64,
    /// Up to 20 of the bad slots, described.
    pub examples: Vec<String>,
}

/// What [`Ledger::verify`] found in a volume that verified.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verified {
    /// Slots read.
    pub slots: u64,
    /// Slots holding their last acknowledged write.
    pub acked: u64,
    /// Slots holding a write that was never acknowledged (allowed).
    pub unacked: u64,
    /// Slots never written (and zero).
    pub zero: u64,
}

impl Ledger {
    fn new(cfg: Config) -> Self {
        let n = usize::try_from(cfg.slots).expect("slot count fits usize");
        Self {
            cfg,
            acked: vec![0; n],
            maybe: vec![Vec::new(); n],
        }
    }

    /// Slots with an acknowledged write.
    pub fn acked_slots(&self) -> usize {
        self.acked.iter().filter(|&&s| s != 0).count()
    }

    /// Read every slot from `dev` (`O_DIRECT`) and check it against the ledger.
    ///
    /// # Errors
    /// The device cannot be read, or any slot is wrong (up to 20 are named).
    pub fn verify(&self, dev: impl AsRef<Path>) -> Result<Verified> {
        let dev = dev.as_ref();
        let audit = self.audit(dev)?;
        let nbad = audit.lost + audit.wrong;
        if nbad > 0 {
            bail!(
                "{nbad} of {} slots of {} are wrong:\n  {}",
                self.cfg.slots,
                dev.display(),
                audit.examples.join("\n  ")
            );
        }
        Ok(audit.verified)
    }

    /// Read every slot from `dev` (`O_DIRECT`) and count what matches the ledger and what
    /// does not.
    ///
    /// # Errors
    /// The device cannot be read.
    pub fn audit(&self, dev: impl AsRef<Path>) -> Result<Audit> {
        let dev = dev.as_ref();
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .with_context(|| format!("cannot open {}", dev.display()))?;
        const CHUNK: u64 = 256; // slots per read: 1 MiB
        let mut out = Audit::default();
        let mut slot = 0;
        while slot < self.cfg.slots {
            let n = CHUNK.min(self.cfg.slots - slot);
            let mut buf = IoBuf::zeroed(n as usize * BLOCK);
            let at = self.cfg.base + slot * BLOCK as u64;
            f.read_exact_at(&mut buf, at).with_context(|| {
                format!(
                    "cannot read {} bytes at {at} of {}",
                    buf.len(),
                    dev.display()
                )
            })?;
            for (i, b) in buf.chunks(BLOCK).enumerate() {
                let s = slot + i as u64;
                match self.check(s, b) {
                    Ok(kind) => {
                        out.verified.slots += 1;
                        match kind {
                            0 => out.verified.zero += 1,
                            1 => out.verified.acked += 1,
                            _ => out.verified.unacked += 1,
                        }
                    }
                    Err(e) => {
                        if e.contains("OLDER") || e.contains("reads as zeros") {
                            out.lost += 1;
                        } else {
                            out.wrong += 1;
                        }
                        if out.examples.len() < 20 {
                            out.examples.push(e);
                        }
                    }
                }
            }
            slot += n;
        }
        Ok(out)
    }

    /// Whether a read of slot `s`, begun when the ledger was like this, may return `b`; `Err`
    /// says why not (a stale read).
    ///
    /// # Errors
    /// See above.
    pub fn check_read(&self, s: u64, b: &[u8]) -> Result<(), String> {
        read_ok(s, self.acked[s as usize], b)
    }

    /// The number of slots.
    pub fn slots(&self) -> u64 {
        self.cfg.slots
    }

    /// How many slots hold an acknowledged write numbered above `seq`.
    pub fn acked_above(&self, seq: u64) -> usize {
        self.acked.iter().filter(|&&s| s > seq).count()
    }

    /// The highest `seq` issued (acknowledged or not).
    pub fn last_seq(&self) -> u64 {
        self.acked
            .iter()
            .copied()
            .chain(self.maybe.iter().flatten().copied())
            .max()
            .unwrap_or(0)
    }

    /// Check slot `s` holding `b`: `Ok(0)` zero, `Ok(1)` last acked, `Ok(2)` an unacked write.
    fn check(&self, s: u64, b: &[u8]) -> Result<u8, String> {
        let i = s as usize;
        let acked = self.acked[i];
        let maybe = &self.maybe[i];
        let want = || {
            format!(
                "last acked seq {acked}{}",
                if maybe.is_empty() {
                    String::new()
                } else {
                    format!(", or one of the unacked {maybe:?}")
                }
            )
        };
        let at = self.cfg.base + s * BLOCK as u64;
        match parse_block(b) {
            Block::Zero if acked == 0 => Ok(0),
            Block::Zero => Err(format!(
                "slot {s} (offset {at}) reads as zeros; expected {}",
                want()
            )),
            Block::Bad(why) => Err(format!(
                "slot {s} (offset {at}) is corrupt: {why}; expected {}",
                want()
            )),
            Block::Valid { slot, seq } if slot != s => Err(format!(
                "slot {s} (offset {at}) holds the block of slot {slot} (seq {seq}): misplaced"
            )),
            Block::Valid { seq, .. } if seq == acked => Ok(1),
            Block::Valid { seq, .. } if maybe.contains(&seq) => Ok(2),
            Block::Valid { seq, .. } if seq < acked => Err(format!(
                "slot {s} (offset {at}) holds seq {seq}, OLDER than the acknowledged {acked}: \
                 an acknowledged write was lost"
            )),
            Block::Valid { seq, .. } => Err(format!(
                "slot {s} (offset {at}) holds seq {seq}, which was never written there; expected {}",
                want()
            )),
        }
    }
}

/// What the writer did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Writes issued.
    pub attempted: u64,
    /// Writes acknowledged (a sync after them returned OK).
    pub acked: u64,
    /// Failed writes and syncs.
    pub errors: u64,
    /// The first error, with the operation and offset.
    pub first_error: Option<String>,
    /// Every errno seen.
    pub errnos: BTreeSet<i32>,
    /// The longest write + sync.
    pub max_latency: Duration,
    /// Reads by the stale-read checker ([`Config::check_reads`]).
    pub reads: u64,
    /// Reads that failed with an error.
    pub read_errors: u64,
    /// Reads that returned data older than acknowledged (or zeros, misplaced, corrupt).
    pub stale_reads: u64,
    /// The first stale read.
    pub first_stale: Option<String>,
    /// How long the writer ran.
    pub ran: Duration,
    /// Per-slot state, for [`Ledger::verify`].
    pub ledger: Ledger,
}

impl Report {
    /// [`Ledger::verify`] on `dev`.
    ///
    /// # Errors
    /// See there.
    pub fn verify(&self, dev: impl AsRef<Path>) -> Result<Verified> {
        self.ledger.verify(dev)
    }
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    attempted: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    reads: AtomicU64,
    read_errors: AtomicU64,
    stale_reads: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ledger: Ledger,
    first_error: Option<String>,
    errnos: BTreeSet<i32>,
    max_latency: Duration,
    first_stale: Option<String>,
}

/// A running writer; stopped (and joined) by [`Workload::stop`] or on drop.
#[derive(Debug)]
pub struct Workload {
    dev: PathBuf,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Workload {
    /// Open `dev` (`O_DIRECT`) and start writing with `cfg`.
    ///
    /// # Errors
    /// The device cannot be opened or is too small for the slots.
    pub fn start(dev: impl AsRef<Path>, cfg: Config) -> Result<Self> {
        Self::run(dev.as_ref(), Ledger::new(cfg), 1)
    }

    /// Go on from `ledger` (an earlier run's, on the same volume): its acknowledged and
    /// unacknowledged writes stay as they were, new writes are numbered from `first_seq`
    /// (above [`Ledger::last_seq`]) in a new slot order.
    ///
    /// # Errors
    /// As [`Workload::start`].
    pub fn resume(dev: impl AsRef<Path>, mut ledger: Ledger, first_seq: u64) -> Result<Self> {
        assert!(
            first_seq > ledger.last_seq(),
            "resume above every issued seq"
        );
        ledger.cfg.seed ^= first_seq.rotate_left(17);
        Self::run(dev.as_ref(), ledger, first_seq)
    }

    fn run(dev: &Path, ledger: Ledger, first_seq: u64) -> Result<Self> {
        let cfg = ledger.cfg.clone();
        assert!(cfg.base % BLOCK as u64 == 0, "base must be 4 KiB aligned");
        assert!(cfg.sync_every >= 1, "sync_every must be at least 1");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(dev)
                .with_context(|| format!("cannot open {}", dev.display()))
        };
        let f = open()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            attempted: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            stale_reads: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                ledger,
                first_error: None,
                errnos: BTreeSet::new(),
                max_latency: Duration::ZERO,
                first_stale: None,
            }),
        });
        let mut threads = Vec::new();
        let s = Arc::clone(&shared);
        let c = cfg.clone();
        threads.push(
            std::thread::Builder::new()
                .name("workload".into())
                .spawn(move || writer(&f, &c, &s, first_seq))
                .context("cannot start the writer thread")?,
        );
        if cfg.check_reads {
            let f = open()?;
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("workload-reads".into())
                    .spawn(move || reader(&f, &cfg, &s))
                    .context("cannot start the reader thread")?,
            );
        }
        Ok(Self {
            dev: dev.to_owned(),
            shared,
            threads,
            started: Instant::now(),
        })
    }

    /// Writes issued so far.
    pub fn attempted(&self) -> u64 {
        self.shared.attempted.load(Ordering::SeqCst)
    }

    /// A copy of the ledger as it is now.
    pub fn ledger(&self) -> Ledger {
        self.shared.inner.lock().expect("lock").ledger.clone()
    }

    /// Stale reads so far (see [`Config::check_reads`]).
    pub fn stale_reads(&self) -> u64 {
        self.shared.stale_reads.load(Ordering::SeqCst)
    }

    /// The device written.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::SeqCst)
    }

    /// The first error so far.
    pub fn first_error(&self) -> Option<String> {
        self.shared.inner.lock().expect("lock").first_error.clone()
    }

    /// Wait until `n` more writes than now are acknowledged, failing fast if the writer sees
    /// an error meanwhile (use it where no error is expected).
    ///
    /// # Errors
    /// A write or sync fails during the wait, or the writes are not acknowledged within
    /// `within` (the message has the error count and the first error).
    pub fn wait_more_acked(&self, n: u64, within: Duration) -> Result<()> {
        let target = self.acked() + n;
        let errors = self.errors();
        let start = Instant::now();
        while self.acked() < target {
            let failed = self.errors() > errors;
            if failed || start.elapsed() > within {
                bail!(
                    "the workload acknowledged {} of {n} more writes {} \
                     ({} errors, first: {:?})",
                    n - (target - self.acked()).min(n),
                    if failed {
                        format!("before an I/O error, after {:?}", start.elapsed())
                    } else {
                        format!("within {within:?}")
                    },
                    self.errors(),
                    self.first_error()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stop the writer after its current write and return what it did.
    ///
    /// # Panics
    /// If the writer thread panicked.
    pub fn stop(mut self) -> Report {
        self.halt();
        let inner = self.shared.inner.lock().expect("lock");
        Report {
            attempted: self.shared.attempted.load(Ordering::SeqCst),
            acked: self.shared.acked.load(Ordering::SeqCst),
            errors: self.shared.errors.load(Ordering::SeqCst),
            first_error: inner.first_error.clone(),
            errnos: inner.errnos.clone(),
            max_latency: inner.max_latency,
            reads: self.shared.reads.load(Ordering::SeqCst),
            read_errors: self.shared.read_errors.load(Ordering::SeqCst),
            stale_reads: self.shared.stale_reads.load(Ordering::SeqCst),
            first_stale: inner.first_stale.clone(),
            ran: self.started.elapsed(),
            ledger: inner.ledger.clone(),
        }
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let joined = t.join();
            assert!(
                joined.is_ok() || std::thread::panicking(),
                "a workload thread panicked"
            );
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.halt();
    }
}

fn record_error(shared: &Shared, what: &str, e: &std::io::Error) {
    shared.errors.fetch_add(1, Ordering::SeqCst);
    let mut inner = shared.inner.lock().expect("lock");
    if let Some(n) = e.raw_os_error() {
        inner.errnos.insert(n);
    }
    if inner.first_error.is_none() {
        inner.first_error = Some(format!("{what}: {e}"));
    }
}

/// Whether a read of `slot`, begun after `acked` was acknowledged there, may return `b`; `Err`
/// says why not (older than acknowledged, zeros, misplaced, corrupt).
fn read_ok(slot: u64, acked: u64, b: &[u8]) -> Result<(), String> {
    match parse_block(b) {
        Block::Zero if acked == 0 => Ok(()),
        Block::Valid { slot: s, seq } if s == slot && seq >= acked => Ok(()),
        other => Err(format!(
            "slot {slot}: read {other:?} after seq {acked} was acknowledged there"
        )),
    }
}

/// Read random slots until stopped, checking each against the ledger as it was when the read
/// began.
fn reader(f: &File, cfg: &Config, shared: &Shared) {
    let mut rng = Rng::new(cfg.seed ^ 0x5EAD);
    let mut buf = IoBuf::zeroed(BLOCK);
    while !shared.stop.load(Ordering::SeqCst) {
        let slot = rng.next() % cfg.slots;
        let before = shared.inner.lock().expect("lock").ledger.acked[slot as usize];
        let at = cfg.base + slot * BLOCK as u64;
        shared.reads.fetch_add(1, Ordering::SeqCst);
        if f.read_exact_at(&mut buf, at).is_err() {
            shared.read_errors.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(cfg.error_backoff);
            continue;
        }
        // Judge against the acknowledged seq from before the read: a write acknowledged
        // while the read ran may or may not be seen.
        if let Err(why) = read_ok(slot, before, &buf) {
            shared.stale_reads.fetch_add(1, Ordering::SeqCst);
            let mut inner = shared.inner.lock().expect("lock");
            inner.first_stale.get_or_insert(why);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn writer(f: &File, cfg: &Config, shared: &Shared, first_seq: u64) {
    let mut rng = Rng::new(cfg.seed);
    let mut buf = IoBuf::zeroed(BLOCK);
    let mut seq = first_seq - 1;
    // Written (write returned OK) since the last sync.
    let mut staged: Vec<(usize, u64)> = Vec::new();
    let mut batch_start = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        seq += 1;
        let slot = rng.next() % cfg.slots;
        let i = slot as usize;
        fill_block(&mut buf, slot, seq);
        // Issued: from now on the slot may hold it.
        shared.inner.lock().expect("lock").ledger.maybe[i].push(seq);
        shared.attempted.fetch_add(1, Ordering::SeqCst);
        if staged.is_empty() {
            batch_start = Instant::now();
        }
        let at = cfg.base + slot * BLOCK as u64;
        if let Err(e) = f.write_all_at(&buf, at) {
            record_error(shared, &format!("write seq {seq} slot {slot} at {at}"), &e);
            std::thread::sleep(cfg.error_backoff);
            continue;
        }
        staged.push((i, seq));
        if staged.len() < cfg.sync_every as usize {
            continue;
        }
        let synced = f.sync_data();
        let latency = batch_start.elapsed();
        let mut inner = shared.inner.lock().expect("lock");
        inner.max_latency = inner.max_latency.max(latency);
        match synced {
            Ok(()) => {
                for (i, s) in staged.drain(..) {
                    inner.ledger.acked[i] = s;
                    inner.ledger.maybe[i].retain(|&m| m > s);
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                // The staged writes stay "maybe there".
                staged.clear();
                drop(inner);
                record_error(shared, &format!("fdatasync after seq {seq}"), &e);
                std::thread::sleep(cfg.error_backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_damage_is_caught() {
        let mut b = vec![0u8; BLOCK];
        fill_block(&mut b, 7, 42);
        assert_eq!(parse_block(&b), Block::Valid { slot: 7, seq: 42 });
        b[1000] ^= 1;
        assert!(matches!(parse_block(&b), Block::Bad(_)));
        assert_eq!(parse_block(&[0u8; BLOCK]), Block::Zero);
    }

    #[test]
    fn the_ledger_accepts_acked_or_newer_unacked_and_nothing_else() {
        let mut l = Ledger::new(Config {
            slots: 2,
            ..Config::default()
        });
        l.acked[0] = 5;
        l.maybe[0] = vec![9];
        let block = |slot, seq| {
            let mut b = vec![0u8; BLOCK];
            fill_block(&mut b, slot, seq);
            b
        };
        assert_eq!(l.check(0, &block(0, 5)), Ok(1));
        assert_eq!(l.check(0, &block(0, 9)), Ok(2));
        assert!(l.check(0, &block(0, 3)).unwrap_err().contains("OLDER"));
        assert!(l.check(0, &block(1, 5)).unwrap_err().contains("misplaced"));
        assert!(l.check(0, &[0u8; BLOCK]).is_err());
        assert_eq!(l.check(1, &[0u8; BLOCK]), Ok(0));
        assert!(l.check(1, &block(1, 4)).is_err());
    }

    #[test]
    fn a_read_older_than_the_acknowledged_write_is_stale() {
        let block = |slot, seq| {
            let mut b = vec![0u8; BLOCK];
            fill_block(&mut b, slot, seq);
            b
        };
        assert!(read_ok(3, 5, &block(3, 5)).is_ok());
        assert!(read_ok(3, 5, &block(3, 8)).is_ok());
        assert!(read_ok(3, 0, &[0u8; BLOCK]).is_ok());
        assert!(read_ok(3, 5, &block(3, 4)).is_err());
        assert!(read_ok(3, 5, &[0u8; BLOCK]).is_err());
        assert!(read_ok(3, 5, &block(2, 9)).is_err());
    }
}
