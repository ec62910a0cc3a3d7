//! A seeded, randomized fault run of the nexus over three real replicas (each in its own pool
//! file), checked against a model of what was acknowledged.
//!
//! Each child sits behind a fault wrapper that can:
//! - fail every request (a dead disk or node: the nexus ejects it, recording the point its
//!   rebuild starts from);
//! - lose power: a volatile write cache holds what the child completed since its last
//!   completed flush (data and generations, as a replica reports them); a flush applies it to
//!   the real replica, a "power cut" drops it, or (half the cuts) keeps a random part of it,
//!   torn at 4 KiB: each block of each cached write reached the medium or not;
//! - hold corrupt blocks: reads covering one fail their checksum until a write covers it.
//!
//! A run draws from its seed a sequence of writes, flushes, reads, failures, power cuts of
//! failed children, corruptions and rebuilds, with at least two children taking writes at all
//! times (so every write is acknowledged). The checker:
//! - every read returns, for each block, the last acknowledged write (no stale read);
//! - at the end, after every child is rebuilt, every child holds every acknowledged write
//!   (none lost), block by block.
//!
//! `cargo test -p replication --test chaos` runs the fixed seeds. `BALLAST_CHAOS_SEED=N`
//! replays one seed; `BALLAST_CHAOS_TRIALS=N` runs seeds 1..=N and prints a table (the
//! benchmark script `bench/scripts/chaos.sh` does this). A failing seed prints its one-line
//! replay command.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replication::nexus::{
    ChildSpec, ChildState, EjectFuture, Ejector, Nexus, RebuildProgress, Resizable,
};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, ExtentGeneration, Generations,
    WriteFlags, GENERATION_UNKNOWN,
};
use volume::io::IoBuf;
use volume::pool::Replica;

const BLOCK: u64 = 4096;
const EXTENT: u64 = 1 << 20;
/// Blocks the runs touch: four extents' worth.
const BLOCKS: u64 = 1024;
/// Steps of one run.
const STEPS: usize = 400;
/// The seeds CI runs.
const FIXED_SEEDS: std::ops::RangeInclusive<u64> = 1..=12;

/// A change a child took but has not made durable yet (its volatile cache).
#[derive(Debug, Clone)]
enum Cached {
    Write {
        offset: u64,
        data: Vec<u8>,
        flags: WriteFlags,
    },
    Zero {
        offset: u64,
        len: u64,
        discard: bool,
    },
}

#[derive(Debug, Default)]
struct DevState {
    failing: AtomicBool,
    corrupt: Mutex<BTreeSet<u64>>,
    /// What the child completed since its last completed flush, oldest first: applied to the
    /// replica by a flush, gone on a power cut.
    cache: Mutex<Vec<Cached>>,
}

/// A real replica behind a volatile write cache and fault switches.
#[derive(Debug, Clone)]
struct Dev {
    replica: Replica,
    st: Arc<DevState>,
}

impl Dev {
    fn failed(&self, op: &'static str, offset: u64, len: u64) -> Option<DeviceError> {
        self.st
            .failing
            .load(SeqCst)
            .then(|| DeviceError::new(DeviceErrorKind::Io, op, offset, len, "injected"))
    }

    /// Power lost: everything since the last completed flush is gone, data and generations.
    fn power_cut(&self) {
        self.st.cache.lock().unwrap().clear();
    }

    /// Power lost mid-way: of what the child completed since its last flush, each 4 KiB block
    /// of each write reached the medium or not, as `keep` says (a torn multi-block write
    /// included); discards and zeroing are lost. The rest is gone.
    async fn torn_power_cut(&self, mut keep: impl FnMut() -> bool) {
        let ops = std::mem::take(&mut *self.st.cache.lock().unwrap());
        for op in ops {
            if let Cached::Write {
                offset,
                data,
                flags,
            } = op
            {
                for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                    if keep() {
                        let at = offset + i as u64 * BLOCK;
                        let _ = self
                            .replica
                            .write(at, IoBuf::from_slice(block), flags)
                            .await;
                    }
                }
            }
        }
        let _ = self.replica.flush().await;
    }

    fn heal_blocks(&self, offset: u64, len: u64) {
        let mut corrupt = self.st.corrupt.lock().unwrap();
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            corrupt.remove(&b);
        }
    }

    fn cache(&self, op: Cached) {
        self.st.cache.lock().unwrap().push(op);
    }

    /// A discard or write-zeroes, taken into the cache.
    fn zero(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<(), DeviceError> {
        if let Some(e) = self.failed(op, offset, len) {
            return Err(e);
        }
        self.cache(Cached::Zero {
            offset,
            len,
            discard,
        });
        self.heal_blocks(offset, len);
        Ok(())
    }
}

/// The overlap of `a..a + alen` and `b..b + blen`, if any.
fn overlap(a: u64, alen: u64, b: u64, blen: u64) -> Option<(u64, u64)> {
    let start = a.max(b);
    let end = (a + alen).min(b + blen);
    (start < end).then_some((start, end))
}

impl BlockDevice for Dev {
    fn size(&self) -> u64 {
        self.replica.size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        let len = buf.len() as u64;
        if let Some(error) = self.failed("read", offset, len) {
            return Err(BufError { error, buf });
        }
        let blocks = offset / BLOCK..(offset + len).div_ceil(BLOCK);
        if self
            .st
            .corrupt
            .lock()
            .unwrap()
            .range(blocks)
            .next()
            .is_some()
        {
            let error = DeviceError::new(DeviceErrorKind::Checksum, "read", offset, len, "bad");
            return Err(BufError { error, buf });
        }
        let mut out = self.replica.read(offset, buf).await?;
        for op in self.st.cache.lock().unwrap().iter() {
            match op {
                Cached::Write {
                    offset: o, data, ..
                } => {
                    if let Some((s, e)) = overlap(offset, len, *o, data.len() as u64) {
                        out[(s - offset) as usize..(e - offset) as usize]
                            .copy_from_slice(&data[(s - o) as usize..(e - o) as usize]);
                    }
                }
                Cached::Zero {
                    offset: o, len: l, ..
                } => {
                    if let Some((s, e)) = overlap(offset, len, *o, *l) {
                        out[(s - offset) as usize..(e - offset) as usize].fill(0);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let len = buf.len() as u64;
        if let Some(error) = self.failed("write", offset, len) {
            return Err(BufError { error, buf });
        }
        self.cache(Cached::Write {
            offset,
            data: buf.to_vec(),
            flags,
        });
        self.heal_blocks(offset, len);
        Ok(buf)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if let Some(e) = self.failed("flush", 0, 0) {
            return Err(e);
        }
        let ops = self.st.cache.lock().unwrap().clone();
        for op in &ops {
            match op {
                Cached::Write {
                    offset,
                    data,
                    flags,
                } => {
                    self.replica
                        .write(*offset, IoBuf::from_slice(data), *flags)
                        .await
                        .map_err(|e| e.error)?;
                }
                Cached::Zero {
                    offset,
                    len,
                    discard: true,
                } => self.replica.discard(*offset, *len).await?,
                Cached::Zero { offset, len, .. } => {
                    self.replica.write_zeroes(*offset, *len).await?;
                }
            }
        }
        self.replica.flush().await?;
        self.st.cache.lock().unwrap().drain(..ops.len());
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.zero("discard", offset, len, true)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.zero("write_zeroes", offset, len, false)
    }

    /// The replica's generations with the cached changes applied, as a replica reports the
    /// writes it completed (durable or not).
    async fn generations(&self) -> Result<Generations, DeviceError> {
        if let Some(e) = self.failed("generations", 0, 0) {
            return Err(e);
        }
        let mut g = self.replica.generations().await?;
        let mut map: BTreeMap<u64, u64> =
            g.extents.iter().map(|e| (e.extent, e.generation)).collect();
        for op in self.st.cache.lock().unwrap().iter() {
            match op {
                Cached::Write {
                    offset,
                    data,
                    flags,
                } => {
                    let first = offset / EXTENT;
                    let last = (offset + data.len() as u64 - 1) / EXTENT;
                    for e in first..=last {
                        let gen = map.entry(e).or_insert(0);
                        *gen = (*gen).max(flags.generation);
                    }
                }
                Cached::Zero {
                    offset,
                    len,
                    discard,
                } => {
                    let first = offset / EXTENT;
                    let last = (offset + len - 1) / EXTENT;
                    for e in first..=last {
                        let whole = *offset <= e * EXTENT && offset + len >= (e + 1) * EXTENT;
                        if *discard && whole {
                            map.remove(&e);
                        } else {
                            map.insert(e, GENERATION_UNKNOWN);
                        }
                    }
                }
            }
        }
        g.extents = map
            .into_iter()
            .map(|(extent, generation)| ExtentGeneration { extent, generation })
            .collect();
        Ok(g)
    }
}

impl Resizable for Dev {
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        Ok(self.replica.size())
    }
}

/// Records each child's latest ejection point.
#[derive(Debug, Default)]
struct Recorder {
    since: Mutex<BTreeMap<String, u64>>,
}

impl Ejector for Recorder {
    fn eject<'a>(&'a self, child: &'a str, _reason: &'a str, since: u64) -> EjectFuture<'a> {
        Box::pin(async move {
            self.since.lock().unwrap().insert(child.to_owned(), since);
            Ok::<(), api::ControlError>(())
        })
    }
}

/// The content of block `b` after the write tagged `tag` (0: never written, zeros).
fn block_data(b: u64, tag: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BLOCK as usize];
    }
    let mut v = Vec::with_capacity(BLOCK as usize);
    while v.len() < BLOCK as usize {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&b.to_le_bytes());
    }
    v
}

/// What one run found.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    writes: u64,
    flushes: u64,
    reads: u64,
    failures: u64,
    power_cuts: u64,
    /// Power cuts that kept a random part of the unflushed writes (torn at 4 KiB).
    torn_cuts: u64,
    corruptions: u64,
    rebuilds: u64,
    /// Blocks read back other than as last acknowledged.
    stale_reads: u64,
    /// Blocks a child lost at the end (after every rebuild).
    lost: u64,
    /// Requests that failed although at most one child was down.
    io_errors: u64,
}

async fn run(seed: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    // Apart, so that tearing did not change any seed's sequence of operations.
    let mut tear = StdRng::seed_from_u64(seed ^ 0x7EA2);
    let mut dirs = Vec::new();
    let mut storages = Vec::new();
    let mut devs = Vec::new();
    for i in 0..3 {
        let (dir, storage, replica) = common::one_volume(&format!("n{i}"), 1).await;
        devs.push(Dev {
            replica,
            st: Arc::default(),
        });
        storages.push(storage);
        dirs.push(dir);
    }
    let rec = Arc::new(Recorder::default());
    let children = devs
        .iter()
        .enumerate()
        .map(|(i, d)| ChildSpec {
            id: format!("n{i}"),
            dev: d.clone(),
            local: i == 0,
            state: ChildState::Healthy,
        })
        .collect();
    let nexus = Nexus::new("v", children, rec.clone());
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut t = Tally::default();
    let state = |nexus: &Nexus<Dev>, i: usize| nexus.children()[i].1;

    for step in 1..=STEPS as u64 {
        let down: Vec<usize> = (0..3)
            .filter(|&i| state(&nexus, i) != ChildState::Healthy || devs[i].st.failing.load(SeqCst))
            .collect();
        match rng.gen_range(0..100) {
            0..=44 => {
                let b = rng.gen_range(0..BLOCKS);
                let n = rng.gen_range(1..=8).min(BLOCKS - b);
                let mut data = Vec::new();
                for k in b..b + n {
                    data.extend_from_slice(&block_data(k, step));
                }
                match nexus
                    .write(b * BLOCK, IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                {
                    Ok(_) => {
                        for k in b..b + n {
                            model.insert(k, step);
                        }
                    }
                    Err(_) => t.io_errors += 1,
                }
                t.writes += 1;
            }
            45..=59 => {
                if nexus.flush().await.is_err() {
                    t.io_errors += 1;
                }
                t.flushes += 1;
            }
            60..=79 => {
                let b = rng.gen_range(0..BLOCKS);
                let n = rng.gen_range(1..=8).min(BLOCKS - b);
                match nexus
                    .read(b * BLOCK, IoBuf::zeroed((n * BLOCK) as usize))
                    .await
                {
                    Ok(got) => {
                        for k in b..b + n {
                            let at = ((k - b) * BLOCK) as usize;
                            let want = block_data(k, model.get(&k).copied().unwrap_or(0));
                            if got[at..at + BLOCK as usize] != want[..] {
                                t.stale_reads += 1;
                            }
                        }
                    }
                    Err(_) => t.io_errors += 1,
                }
                t.reads += 1;
            }
            80..=84 if down.is_empty() => {
                // A child fails: the next write ejects it.
                let i = rng.gen_range(0..3);
                devs[i].st.failing.store(true, SeqCst);
                t.failures += 1;
            }
            85..=89 => {
                // A failed or ejected child loses power: its unflushed writes are gone.
                if let Some(&i) = down
                    .iter()
                    .find(|&&i| state(&nexus, i) == ChildState::Ejected)
                {
                    if tear.gen_bool(0.5) {
                        devs[i].torn_power_cut(|| tear.gen_bool(0.5)).await;
                        t.torn_cuts += 1;
                    } else {
                        devs[i].power_cut();
                    }
                    t.power_cuts += 1;
                }
            }
            90..=94 if down.is_empty() => {
                // One bad copy of a block at a time: two would take every good copy away
                // once a third child is down, which no replication can survive.
                let i = rng.gen_range(0..3);
                let b = rng.gen_range(0..BLOCKS);
                if devs
                    .iter()
                    .all(|d| !d.st.corrupt.lock().unwrap().contains(&b))
                {
                    devs[i].st.corrupt.lock().unwrap().insert(b);
                    t.corruptions += 1;
                }
            }
            _ => {
                if let Some(&i) = down
                    .iter()
                    .find(|&&i| state(&nexus, i) == ChildState::Ejected)
                {
                    if rebuild(&nexus, &rec, &devs, i).await.is_err() {
                        t.io_errors += 1;
                    }
                    t.rebuilds += 1;
                }
            }
        }
    }
    // The end: bring every child back, then each must hold every acknowledged write.
    for i in 0..3 {
        if devs[i].st.failing.load(SeqCst) && state(&nexus, i) == ChildState::Healthy {
            // Failed but never hit by a write: a flush ejects it.
            let _ = nexus.flush().await;
        }
        if state(&nexus, i) == ChildState::Ejected {
            devs[i].power_cut();
            if rebuild(&nexus, &rec, &devs, i).await.is_err() {
                t.io_errors += 1;
            }
        }
    }
    // Make everything durable, then look at the replicas themselves.
    if nexus.flush().await.is_err() {
        t.io_errors += 1;
    }
    for d in &devs {
        assert!(d.st.cache.lock().unwrap().is_empty());
        d.st.corrupt.lock().unwrap().clear();
        for k in 0..BLOCKS {
            let got = d
                .replica
                .read(k * BLOCK, IoBuf::zeroed(BLOCK as usize))
                .await
                .unwrap();
            if got[..] != block_data(k, model.get(&k).copied().unwrap_or(0))[..] {
                t.lost += 1;
            }
        }
    }
    for s in storages {
        s.close().await.unwrap();
    }
    drop(dirs);
    t
}

async fn rebuild(
    nexus: &Nexus<Dev>,
    rec: &Recorder,
    devs: &[Dev],
    i: usize,
) -> Result<(), replication::nexus::RebuildError> {
    let id = format!("n{i}");
    devs[i].st.failing.store(false, SeqCst);
    let since = rec.since.lock().unwrap().get(&id).copied().unwrap_or(0);
    let progress = RebuildProgress::default();
    if let Err(e) = nexus.rebuild(&id, since, None, &progress).await {
        eprintln!("rebuild of {id} from {since}: {e}");
        return Err(e);
    }
    assert!(nexus.transition(&id, ChildState::Rebuilding, ChildState::Healthy));
    Ok(())
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var_os("BALLAST_CHAOS_SEED") {
        return vec![s
            .to_string_lossy()
            .parse()
            .expect("BALLAST_CHAOS_SEED is a number")];
    }
    if let Some(n) = std::env::var_os("BALLAST_CHAOS_TRIALS") {
        let n: u64 = n
            .to_string_lossy()
            .parse()
            .expect("BALLAST_CHAOS_TRIALS is a number");
        return (1..=n).collect();
    }
    FIXED_SEEDS.collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_runs_lose_no_acknowledged_write_and_read_nothing_stale() {
    let mut sum = Tally::default();
    let mut failed = Vec::new();
    let seeds = seeds();
    for &seed in &seeds {
        let t = run(seed).await;
        if t.stale_reads + t.lost + t.io_errors > 0 {
            eprintln!(
                "seed {seed} failed: {t:?}\n  replay: BALLAST_CHAOS_SEED={seed} cargo test -p replication --test chaos"
            );
            failed.push(seed);
        }
        sum.writes += t.writes;
        sum.flushes += t.flushes;
        sum.reads += t.reads;
        sum.failures += t.failures;
        sum.power_cuts += t.power_cuts;
        sum.torn_cuts += t.torn_cuts;
        sum.corruptions += t.corruptions;
        sum.rebuilds += t.rebuilds;
        sum.stale_reads += t.stale_reads;
        sum.lost += t.lost;
        sum.io_errors += t.io_errors;
    }
    println!("| trials | writes | flushes | reads | child failures | power cuts | of them torn | corruptions | rebuilds | writes lost (blocks) | stale reads (blocks) | I/O errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        seeds.len(),
        sum.writes,
        sum.flushes,
        sum.reads,
        sum.failures,
        sum.power_cuts,
        sum.torn_cuts,
        sum.corruptions,
        sum.rebuilds,
        sum.lost,
        sum.stale_reads,
        sum.io_errors
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}
