//! `engine-bench`: Ballast's local data path against a raw `O_DIRECT` file, in one run.
//!
//! Three figures, each measured on three targets on the same filesystem:
//!
//! | target | what it is |
//! |---|---|
//! | raw | a plain `O_DIRECT` file driven directly with io_uring (the `io-uring` crate, one thread, one ring, `--qd` in flight, no async runtime): what the kernel and disk can do |
//! | raw via engine | the same file driven through Ballast's `IoEngine` with `IoRequest`s from `--qd` tokio tasks: the cost of the engine and the async harness alone |
//! | ballast | a volume of a pool on the same filesystem, through `Storage` and the volume's `Replica` (`BlockDevice`), from `--qd` tokio tasks: thin provisioning, checksums and metadata included |
//!
//! The tests: 4 KiB random read, 4 KiB random write (both over the whole working set), and
//! 1 MiB sequential write (wrapping at the end), each at queue depth `--qd` (32). The raw file
//! and the volume are both filled completely before measuring, so reads hit written data and
//! writes overwrite allocated space on both sides. Each figure is measured for `--seconds` in
//! total, split into `--rounds` runs, and the targets take turns (their order reversed every
//! round) so noise hits them all. The ratio is ballast / raw.
//!
//! If `fio` is installed, its numbers for the raw file are printed for reference.
//!
//! Everything is created in a temporary directory under `--dir`, removed at the end, on error,
//! on Ctrl-C and on SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use api::{parse_size, VolumeControl, VolumeName, VolumeSpec};
use clap::{Parser, ValueEnum};
use io_uring::{opcode, squeue, types, IoUring};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{open_direct, probe, EngineKind, IoBuf, IoEngine, IoFile, IoRequest};
use volume::pool::{DeviceSpec, Replica, Storage, StorageConfig};

/// Ballast engine benchmark: 4 KiB random read/write and 1 MiB sequential write, against a raw
/// O_DIRECT file on the same filesystem.
#[derive(Debug, Parser)]
#[command(name = "engine-bench", version)]
struct Args {
    /// Directory on the filesystem to test (must support O_DIRECT; not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The I/O engine for the Ballast side.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
    /// Seconds of measurement per figure and target (split across the rounds).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Working set: the size of the raw file and of the volume (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    size: u64,
    /// Operations in flight per test.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Runs per figure and target; targets alternate between runs.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Data-path threads of the I/O engine.
    #[arg(long, default_value_t = 1)]
    engine_threads: usize,
    /// Worker threads of the tokio runtime that drives the engine side (0: a current-thread
    /// runtime on the main thread).
    #[arg(long, default_value_t = 1)]
    tokio_threads: usize,
    /// Do not run fio for reference numbers even if it is installed.
    #[arg(long)]
    no_fio: bool,
    /// The tests to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Test::ALL)]
    tests: Vec<Test>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Auto,
    Uring,
    Sync,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// One benchmark figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Test {
    /// 4 KiB random read.
    #[value(name = "randread")]
    RandRead4k,
    /// 4 KiB random write.
    #[value(name = "randwrite")]
    RandWrite4k,
    /// 1 MiB sequential write.
    #[value(name = "seqwrite")]
    SeqWrite1m,
    /// 4 KiB random write, each followed by a flush (`fdatasync`): a database's commit.
    #[value(name = "syncwrite")]
    SyncWrite4k,
}

impl Test {
    const ALL: [Test; 4] = [
        Test::RandRead4k,
        Test::RandWrite4k,
        Test::SeqWrite1m,
        Test::SyncWrite4k,
    ];

    fn label(self) -> &'static str {
        match self {
            Test::RandRead4k => "4 KiB random read",
            Test::RandWrite4k => "4 KiB random write",
            Test::SeqWrite1m => "1 MiB sequential write",
            Test::SyncWrite4k => "4 KiB random write + flush",
        }
    }

    fn block(self) -> u64 {
        match self {
            Test::RandRead4k | Test::RandWrite4k | Test::SyncWrite4k => 4096,
            Test::SeqWrite1m => 1 << 20,
        }
    }

    fn is_read(self) -> bool {
        self == Test::RandRead4k
    }

    fn is_sequential(self) -> bool {
        self == Test::SeqWrite1m
    }

    /// The figure reported: IOPS for 4 KiB, MB/s (10^6 bytes) for 1 MiB.
    fn figure(self, s: Sample) -> f64 {
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        match self {
            Test::RandRead4k | Test::RandWrite4k | Test::SyncWrite4k => s.ops as f64 / secs,
            Test::SeqWrite1m => (s.ops * self.block()) as f64 / secs / 1e6,
        }
    }

    fn unit(self) -> &'static str {
        if self.is_sequential() {
            "MB/s"
        } else {
            "IOPS"
        }
    }
}

/// `user_data` of the write of a raw write + sync pair.
const SYNC_WRITE: u64 = u64::MAX;

/// Where the I/O goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    RawDirect,
    RawEngine,
    Ballast,
}

/// Operations completed and the time they took.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    ops: u64,
    elapsed: Duration,
}

impl std::ops::AddAssign for Sample {
    fn add_assign(&mut self, o: Self) {
        self.ops += o.ops;
        self.elapsed += o.elapsed;
    }
}

/// When a run stops: at a deadline, or after one sequential pass over the working set.
#[derive(Debug, Clone, Copy)]
enum Stop {
    After(Duration),
    OnePass,
}

/// Splitmix64: a small, fast, good-enough generator for offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A buffer of `len` pseudo-random bytes (so nothing along the way can shortcut zeros).
fn data_buf(len: u64, seed: u64) -> IoBuf {
    let mut buf = IoBuf::zeroed(len as usize);
    let mut rng = Rng(seed);
    for chunk in buf.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    buf
}

/// Hands out offsets: random blocks, or consecutive blocks shared by all tasks.
#[derive(Debug)]
struct Offsets {
    test: Test,
    size: u64,
    seq: Arc<AtomicU64>,
    rng: Rng,
}

impl Offsets {
    /// The next offset, or `None` when a one-pass run has covered the working set.
    fn next(&mut self, stop: Stop) -> Option<u64> {
        let bs = self.test.block();
        if self.test.is_sequential() {
            let off = self.seq.fetch_add(bs, Ordering::Relaxed);
            match stop {
                Stop::OnePass if off >= self.size => None,
                _ => Some(off % self.size),
            }
        } else {
            Some(self.rng.below(self.size / bs) * bs)
        }
    }
}

/// Drive `test` on a raw `O_DIRECT` file straight through one io_uring, `qd` in flight.
fn raw_direct(
    file: &IoFile,
    test: Test,
    size: u64,
    qd: usize,
    stop: Stop,
    seed: u64,
) -> Result<Sample> {
    let ring_size = (qd as u32).next_power_of_two().max(8);
    let mut ring = IoUring::new(ring_size).context("set up an io_uring for the raw baseline")?;
    let bs = test.block();
    let mut bufs: Vec<IoBuf> = (0..qd).map(|i| data_buf(bs, seed + i as u64)).collect();
    let mut offsets = Offsets {
        test,
        size,
        seq: Arc::new(AtomicU64::new(0)),
        rng: Rng(seed),
    };
    let fd = types::Fd(file.raw_fd());
    let deadline = match stop {
        Stop::After(d) => Some(Instant::now() + d),
        Stop::OnePass => None,
    };
    let mut in_flight = 0usize;
    let mut ops = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    let mut stopping = false;
    let start = Instant::now();

    // Queue one operation on buffer `i`; false when the run is over.
    let mut queue = |ring: &mut IoUring, bufs: &mut [IoBuf], i: usize| -> bool {
        let Some(off) = offsets.next(stop) else {
            return false;
        };
        let ptr = bufs[i].as_mut_ptr();
        let len = bs as u32;
        let sqe = if test.is_read() {
            opcode::Read::new(fd, ptr, len).offset(off).build()
        } else {
            opcode::Write::new(fd, ptr, len).offset(off).build()
        };
        if test == Test::SyncWrite4k {
            // The write, linked to the fdatasync after it; the sync's completion counts.
            let sync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(i as u64);
            let write = sqe.flags(squeue::Flags::IO_LINK).user_data(SYNC_WRITE);
            // SAFETY: as below; the pair goes in together or not at all.
            return unsafe { ring.submission().push_multiple(&[write, sync]) }.is_ok();
        }
        // SAFETY: `ptr` points to `bs` bytes of `bufs[i]`, which lives in `bufs` until this
        // function returns, and this function only returns after every queued operation has
        // completed (`in_flight == 0`). Buffer `i` is queued again only after its previous
        // operation completed, so the kernel is its only user meanwhile. `fd` stays open
        // because `file` is borrowed for the whole call.
        let pushed = unsafe { ring.submission().push(&sqe.user_data(i as u64)) };
        pushed.is_ok()
    };

    for i in 0..qd {
        if !queue(&mut ring, &mut bufs, i) {
            break;
        }
        in_flight += 1;
    }
    let mut done = Vec::with_capacity(qd);
    while in_flight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // Nothing can be reaped reliably any more; leak the buffers the kernel may
                // still be using rather than free them.
                std::mem::forget(bufs);
                return Err(e).context("io_uring_enter in the raw baseline");
            }
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in &done {
            if i as u64 == SYNC_WRITE {
                // The write of a write + sync pair: its sync's completion is the operation's.
                if res < 0 || res as u64 != bs {
                    failure.get_or_insert_with(|| {
                        anyhow!("raw {}: write returned {res}", test.label())
                    });
                    stopping = true;
                }
                continue;
            }
            in_flight -= 1;
            if res < 0 {
                failure.get_or_insert_with(|| {
                    anyhow!(std::io::Error::from_raw_os_error(-res))
                        .context(format!("raw {}", test.label()))
                });
                stopping = true;
            } else if res as u64 != bs && test != Test::SyncWrite4k {
                failure.get_or_insert_with(|| {
                    anyhow!("raw {}: short transfer of {res} bytes", test.label())
                });
                stopping = true;
            } else {
                ops += 1;
            }
            if !stopping && deadline.is_some_and(|d| Instant::now() >= d) {
                stopping = true;
            }
            if !stopping {
                if queue(&mut ring, &mut bufs, i) {
                    in_flight += 1;
                } else {
                    stopping = true;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    match failure {
        Some(e) => Err(e),
        None => Ok(Sample { ops, elapsed }),
    }
}

/// Drive `test` from `qd` tokio tasks, each awaiting one `op(offset, buffer)` at a time.
async fn run_tasks<F, Fut>(
    test: Test,
    size: u64,
    qd: usize,
    stop: Stop,
    seed: u64,
    op: F,
) -> Result<Sample>
where
    F: Fn(u64, IoBuf) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<IoBuf>> + Send + 'static,
{
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = match stop {
        Stop::After(d) => Some(start + d),
        Stop::OnePass => None,
    };
    let tasks: Vec<_> = (0..qd as u64)
        .map(|t| {
            let op = op.clone();
            let mut offsets = Offsets {
                test,
                size,
                seq: Arc::clone(&seq),
                rng: Rng(seed ^ (t << 32)),
            };
            tokio::spawn(async move {
                let mut buf = data_buf(test.block(), seed + t);
                let mut ops = 0u64;
                while deadline.is_none_or(|d| Instant::now() < d) {
                    let Some(off) = offsets.next(stop) else { break };
                    buf = op(off, buf).await?;
                    ops += 1;
                }
                anyhow::Ok(ops)
            })
        })
        .collect();
    let mut ops = 0;
    let mut failure = None;
    for t in tasks {
        match t.await.context("a benchmark task panicked")? {
            Ok(n) => ops += n,
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let elapsed = start.elapsed();
    match failure {
        Some(e) => Err(e),
        None => Ok(Sample { ops, elapsed }),
    }
}

/// The I/O of a test through the engine on the raw file.
fn engine_op(
    engine: &Arc<dyn IoEngine>,
    file: &IoFile,
    test: Test,
) -> impl Fn(u64, IoBuf) -> std::pin::Pin<Box<dyn Future<Output = Result<IoBuf>> + Send>>
       + Clone
       + Send
       + 'static {
    let (engine, file) = (Arc::clone(engine), file.clone());
    move |off, buf| {
        let req = if test.is_read() {
            IoRequest::read(&file, off, buf)
        } else {
            IoRequest::write(&file, off, buf, false)
        };
        let completion = engine.submit(req);
        let (engine, file) = (Arc::clone(&engine), file.clone());
        Box::pin(async move {
            let c = completion.await;
            c.result
                .with_context(|| format!("engine {} at {off}", test.label()))?;
            if test == Test::SyncWrite4k {
                engine
                    .submit(IoRequest::fsync(&file))
                    .await
                    .result
                    .with_context(|| format!("engine fdatasync after {off}"))?;
            }
            c.buf.ok_or_else(|| anyhow!("the engine lost a buffer"))
        })
    }
}

/// The I/O of a test through the volume's replica.
fn replica_op(
    replica: &Arc<Replica>,
    test: Test,
) -> impl Fn(u64, IoBuf) -> std::pin::Pin<Box<dyn Future<Output = Result<IoBuf>> + Send>>
       + Clone
       + Send
       + 'static {
    let replica = Arc::clone(replica);
    move |off, buf| {
        let replica = Arc::clone(&replica);
        Box::pin(async move {
            let r = if test.is_read() {
                replica.read(off, buf).await
            } else {
                replica.write(off, buf, WriteFlags::default()).await
            };
            let buf = r.map_err(|e| {
                anyhow!(e.error).context(format!("ballast {} at {off}", test.label()))
            })?;
            if test == Test::SyncWrite4k {
                replica
                    .flush()
                    .await
                    .map_err(|e| anyhow!(e).context(format!("ballast flush after {off}")))?;
            }
            Ok(buf)
        })
    }
}

/// Everything a run needs.
struct Bench {
    args: Args,
    engine: Arc<dyn IoEngine>,
    raw: IoFile,
    raw_path: PathBuf,
    storage: Storage,
    replica: Arc<Replica>,
    /// The largest share of CPU used by anything but this benchmark during a run.
    max_other_load: std::cell::Cell<f64>,
}

impl Bench {
    async fn run_one(&self, target: Target, test: Test, stop: Stop, seed: u64) -> Result<Sample> {
        let (size, qd) = (self.args.size, self.args.qd);
        match target {
            Target::RawDirect => {
                let raw = self.raw.clone();
                tokio::task::spawn_blocking(move || raw_direct(&raw, test, size, qd, stop, seed))
                    .await
                    .context("the raw benchmark thread panicked")?
            }
            Target::RawEngine => {
                run_tasks(
                    test,
                    size,
                    qd,
                    stop,
                    seed,
                    engine_op(&self.engine, &self.raw, test),
                )
                .await
            }
            Target::Ballast => {
                run_tasks(test, size, qd, stop, seed, replica_op(&self.replica, test)).await
            }
        }
    }

    /// Write the whole working set of the raw file and the volume once, and make it durable.
    async fn prefill(&self) -> Result<()> {
        let t = Instant::now();
        self.run_one(Target::RawDirect, Test::SeqWrite1m, Stop::OnePass, 1)
            .await
            .context("prefill the raw file")?;
        self.engine
            .submit(IoRequest::fsync(&self.raw))
            .await
            .result
            .context("fdatasync the raw file")?;
        let raw_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.run_one(Target::Ballast, Test::SeqWrite1m, Stop::OnePass, 2)
            .await
            .context("prefill the volume")?;
        self.replica
            .flush()
            .await
            .context("flush the volume after prefill")?;
        eprintln!(
            "prefilled {} MiB: raw file in {raw_secs:.1} s, volume in {:.1} s",
            self.args.size >> 20,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn run(&self) -> Result<Vec<(Test, [Sample; 3])>> {
        let targets = [Target::RawDirect, Target::RawEngine, Target::Ballast];
        let rounds = self.args.rounds.max(1);
        let per_run = Duration::from_secs_f64(self.args.seconds as f64 / f64::from(rounds));
        let mut results: Vec<(Test, [Sample; 3])> = self
            .args
            .tests
            .iter()
            .map(|&t| (t, [Sample::default(); 3]))
            .collect();
        for round in 0..rounds {
            for (test, samples) in &mut results {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let seed = u64::from(round) * 1000 + i as u64;
                    let before = CpuSnapshot::take();
                    let s = self
                        .run_one(targets[i], *test, Stop::After(per_run), seed)
                        .await?;
                    let cpu = CpuSnapshot::take().since(&before);
                    eprintln!(
                        "round {}/{rounds} {:<24} {:<15} {:>12.0} {}  (CPU: this process {:.0}%, everything else {:.0}%)",
                        round + 1,
                        test.label(),
                        target_name(targets[i]),
                        test.figure(s),
                        test.unit(),
                        cpu.own * 100.0,
                        cpu.other * 100.0,
                    );
                    self.max_other_load
                        .set(self.max_other_load.get().max(cpu.other));
                    samples[i] += s;
                }
            }
        }
        Ok(results)
    }
}

/// CPU time, system-wide and of this process, at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    /// Busy and total jiffies of all CPUs, from `/proc/stat`.
    system: Option<(u64, u64)>,
    /// This process's user + system CPU time.
    own: Duration,
    at: Instant,
}

/// The share of all CPUs used between two snapshots, by this process and by everything else
/// (other processes, interrupts).
#[derive(Debug, Clone, Copy)]
struct CpuShare {
    own: f64,
    other: f64,
}

impl CpuSnapshot {
    fn take() -> Self {
        let system = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            let line = stat.lines().next()?.strip_prefix("cpu ")?.to_owned();
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3)? + v.get(4)?;
            Some((total - idle, total))
        });
        // SAFETY: `getrusage` writes one `rusage` into the zeroed local it is given.
        let own = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &raw mut ru);
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            tv(ru.ru_utime) + tv(ru.ru_stime)
        };
        Self {
            system,
            own,
            at: Instant::now(),
        }
    }

    fn since(&self, before: &Self) -> CpuShare {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-9) * cpus;
        let own = (self.own.saturating_sub(before.own)).as_secs_f64() / wall;
        let busy = match (before.system, self.system) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => own,
        };
        CpuShare {
            own,
            other: (busy - own).max(0.0),
        }
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::RawDirect => "raw",
        Target::RawEngine => "raw via engine",
        Target::Ballast => "ballast",
    }
}

fn print_table(args: &Args, engine: &str, results: &[(Test, [Sample; 3])]) {
    println!();
    println!(
        "Ballast engine benchmark: engine `{engine}` ({} data-path thread(s)), QD {}, working set {} MiB, {} s per figure in {} round(s), in {}",
        args.engine_threads,
        args.qd,
        args.size >> 20,
        args.seconds,
        args.rounds.max(1),
        args.dir.display()
    );
    println!();
    println!("| test | raw | raw via engine | ballast | ratio (ballast / raw) |");
    println!("|---|---:|---:|---:|---:|");
    for (test, [raw, via_engine, ballast]) in results {
        let (r, e, b) = (
            test.figure(*raw),
            test.figure(*via_engine),
            test.figure(*ballast),
        );
        let unit = test.unit();
        let ratio = if r > 0.0 { b / r } else { f64::NAN };
        println!(
            "| {} | {r:.0} {unit} | {e:.0} {unit} | {b:.0} {unit} | {ratio:.2} |",
            test.label()
        );
    }
    println!();
    println!(
        "raw: a plain O_DIRECT file driven directly with io_uring (io-uring crate, one thread, one ring, {} in flight). \
         raw via engine: the same file through Ballast's `{engine}` IoEngine with IoRequests from {} tokio tasks. \
         ballast: a 1-replica volume through Storage and its Replica (BlockDevice), from {} tokio tasks.",
        args.qd, args.qd, args.qd
    );
}

/// fio's IOPS and bandwidth for the raw file, for reference; `None` if fio is missing.
fn fio_reference(args: &Args, raw_path: &Path) -> Option<Vec<(Test, f64)>> {
    Command::new("fio")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mut out = Vec::new();
    for &test in &args.tests {
        let rw = match test {
            Test::RandRead4k => "randread",
            Test::RandWrite4k | Test::SyncWrite4k => "randwrite",
            Test::SeqWrite1m => "write",
        };
        let result = Command::new("fio")
            .args([
                "--name=raw",
                "--ioengine=io_uring",
                "--direct=1",
                "--numjobs=1",
                "--time_based",
            ])
            .args([
                "--output-format=terse",
                "--terse-version=3",
                "--randrepeat=0",
                "--norandommap",
            ])
            .arg(format!("--filename={}", raw_path.display()))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={}", test.block()))
            .arg(format!("--iodepth={}", args.qd))
            .args((test == Test::SyncWrite4k).then_some("--fdatasync=1"))
            .arg(format!("--size={}", args.size))
            .arg(format!("--runtime={}", args.seconds.div_ceil(2).max(1)))
            .output();
        let Ok(output) = result else { return None };
        if !output.status.success() {
            eprintln!(
                "fio failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return None;
        }
        // Terse v3: fields 7 and 8 are read KiB/s and IOPS, 48 and 49 write KiB/s and IOPS.
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().find(|l| l.starts_with("3;"))?;
        let f: Vec<&str> = line.split(';').collect();
        let field = |n: usize| f.get(n - 1).and_then(|v| v.parse::<f64>().ok());
        let value = match test {
            Test::RandRead4k => field(8)?,
            Test::RandWrite4k | Test::SyncWrite4k => field(49)?,
            Test::SeqWrite1m => field(48)? * 1024.0 / 1e6,
        };
        out.push((test, value));
    }
    Some(out)
}

async fn open_bench(args: Args, dir: &Path) -> Result<Bench> {
    let kind = match args.engine {
        EngineArg::Auto => EngineKind::Auto,
        EngineArg::Uring => EngineKind::Uring,
        EngineArg::Sync => EngineKind::Sync,
    };
    let engine = probe(kind, args.engine_threads).context("start the I/O engine")?;

    let raw_path = dir.join("raw.img");
    let (raw, direct) = open_direct(&raw_path, true).context("create the raw file")?;
    ensure!(
        direct,
        "{} does not support O_DIRECT; pick another --dir",
        dir.display()
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw_path)?
        .set_len(args.size)
        .context("size the raw file")?;

    let pool_path = dir.join("pool.img");
    let pool_size = args.size + args.size / 8 + (256 << 20);
    let storage = Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: pool_path,
            create_size: Some(pool_size),
        }],
        node_id: "engine-bench".into(),
        force_format: false,
        engine: Arc::clone(&engine),
    })
    .await
    .context("open the pool")?;
    let name = VolumeName::new("bench")?;
    storage
        .create_volume(VolumeSpec {
            name: name.clone(),
            size_bytes: args.size,
            replicas: 1,
        })
        .await
        .context("create the volume")?;
    let replica: Arc<Replica> = storage.replica(&name)?.into();
    ensure!(
        replica.size() >= args.size,
        "the volume is smaller than the working set"
    );
    Ok(Bench {
        args,
        engine,
        raw,
        raw_path,
        storage,
        replica,
        max_other_load: std::cell::Cell::new(0.0),
    })
}

async fn bench_main(args: Args, dir: &Path) -> Result<()> {
    ensure!(args.qd > 0, "--qd must be at least 1");
    ensure!(
        args.size >= 1 << 20 && args.size % (1 << 20) == 0,
        "--size must be a positive multiple of 1 MiB"
    );
    let bench = open_bench(args, dir).await?;
    let engine_name = bench.engine.name();
    eprintln!(
        "engine: {engine_name}; storage engine: {}",
        bench.storage.engine_name()
    );
    bench.prefill().await?;
    let results = bench.run().await?;
    let fio = if bench.args.no_fio {
        None
    } else {
        fio_reference(&bench.args, &bench.raw_path)
    };
    bench.storage.close().await.context("close the pool")?;
    print_table(&bench.args, engine_name, &results);
    if engine_name == "sync" {
        println!(
            "Note: the sync engine has one I/O in flight per data-path thread; \
             pass --engine-threads {} to give it the same queue depth.",
            bench.args.qd
        );
    }
    let other = bench.max_other_load.get();
    if other > 0.15 {
        println!(
            "Warning: up to {:.0}% of the CPUs were busy outside this benchmark during a run \
             (other processes or interrupts). The engine side needs two threads scheduled per \
             round trip and the raw side one, so CPU contention lowers the ratios; run on an \
             idle machine or under `nice -n -10`.",
            other * 100.0
        );
    }
    if let Some(fio) = fio {
        let figures: Vec<String> = fio
            .iter()
            .map(|(t, v)| format!("{} {v:.0} {}", t.label(), t.unit()))
            .collect();
        println!(
            "fio on the raw file (io_uring, QD {}) for reference: {}",
            bench.args.qd,
            figures.join(", ")
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.dir.is_dir() {
        bail!("--dir {} is not a directory", args.dir.display());
    }
    let mut builder = if args.tokio_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.tokio_threads);
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    // Removed when dropped: on success, on error and after Ctrl-C.
    let dir = tempfile::Builder::new()
        .prefix("ballast-engine-bench")
        .tempdir_in(&args.dir)
        .with_context(|| format!("create a temporary directory in {}", args.dir.display()))?;
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listen for SIGTERM")?;
        tokio::select! {
            r = bench_main(args, dir.path()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    // Stop the runtime (and any raw-baseline thread, which ends at its deadline) before the
    // files are removed.
    runtime.shutdown_timeout(Duration::from_secs(60));
    let cleanup = dir.close().context("remove the benchmark files");
    result?;
    cleanup
}
