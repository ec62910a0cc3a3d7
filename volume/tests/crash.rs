//! Crash test: a child process writes, discards, FUA-writes and flushes under a verifying
//! pattern and is SIGKILLed at a random instant. After each kill the pool must reopen, every
//! completed write must read back exactly (flushed or not: the daemon's devices outlive it,
//! so a crash of the process must lose no completed write), every discard acknowledged by a
//! completed flush must read zeros, every other block must hold a value it legitimately could
//! (its durable value or one written since), and the metadata must be consistent. (Power
//! cuts, which lose what was not flushed, are the seeded fault runs' and the model test's.) Iterations: `BALLAST_CRASH_ITERATIONS`
//! (default 30).
//!
//! The child is this same test binary, started with `BALLAST_CRASH_CHILD` set. It prints one
//! line per completed operation, so the parent knows exactly which operations completed.
//!
//! Every fifth flush is a snapshot instead (a snapshot makes every write before it durable,
//! as a flush does), and the child deletes the snapshot before the previous one. After each
//! kill, the newest snapshot whose operation completed must hold exactly the blocks as they
//! were when it was taken (read through a clone), even though the volume has since written
//! over them; then the parent deletes every snapshot.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::{VolumeControl, VolumeName};
use common::{open, pattern, tempdir, volume};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{EngineKind, IoBuf};

const MIB: u64 = 1 << 20;
const POOL: u64 = 256 * MIB;
const BLOCKS: u64 = 16 * 1024; // a 64 MiB volume
const FLUSH_EVERY: u64 = 8;
/// Every this many flushes, a snapshot instead.
const SNAPSHOT_EVERY: u64 = 5;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { block: u64, count: u64, fua: bool },
    Discard { block: u64, count: u64 },
    Flush,
    Snapshot,
}

fn snapshot_name(iter: u64, op: u64) -> VolumeName {
    VolumeName::new(&format!("c{iter}-{op}")).unwrap()
}

/// The deterministic operation sequence of iteration `iter`.
fn ops(iter: u64) -> impl Iterator<Item = Op> {
    let mut rng = StdRng::seed_from_u64(0x0BA1_1A57 ^ iter);
    (0u64..).map(move |i| {
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            if (i / FLUSH_EVERY) % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1 {
                return Op::Snapshot;
            }
            return Op::Flush;
        }
        let block = rng.gen_range(0..BLOCKS);
        match rng.gen_range(0..100) {
            0..=79 => Op::Write {
                block,
                count: rng.gen_range(1..=32).min(BLOCKS - block),
                fua: false,
            },
            80..=84 => Op::Write {
                block,
                count: rng.gen_range(1..=8).min(BLOCKS - block),
                fua: true,
            },
            85..=92 => Op::Discard {
                block,
                count: rng.gen_range(1..=64).min(BLOCKS - block),
            },
            _ => {
                let e = block / 256;
                Op::Discard {
                    block: e * 256,
                    count: 256,
                }
            }
        }
    })
}

fn tag(iter: u64, op: u64) -> u64 {
    (iter << 32) | (op + 1)
}

fn child(path: &Path, iter: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = open(path, POOL, EngineKind::Auto).await;
        let name = VolumeName::new("crash").unwrap();
        let r = match s.replica(&name) {
            Ok(r) => r,
            Err(_) => volume(&s, "crash", BLOCKS * 4096).await,
        };
        println!("READY");
        for (i, op) in ops(iter).enumerate() {
            match op {
                Op::Write { block, count, fua } => {
                    let data: Vec<u8> = (block..block + count)
                        .flat_map(|b| pattern(b, tag(iter, i as u64)))
                        .collect();
                    r.write(
                        block * 4096,
                        IoBuf::from_slice(&data),
                        WriteFlags {
                            fua,
                            ..WriteFlags::default()
                        },
                    )
                    .await
                    .unwrap();
                }
                Op::Discard { block, count } => {
                    r.discard(block * 4096, count * 4096).await.unwrap();
                }
                Op::Flush => r.flush().await.unwrap(),
                Op::Snapshot => {
                    s.create_snapshot(&name, &snapshot_name(iter, i as u64))
                        .await
                        .unwrap();
                    // Keep two.
                    let span = FLUSH_EVERY * SNAPSHOT_EVERY;
                    if let Some(old) = (i as u64).checked_sub(2 * span) {
                        s.delete_snapshot(&snapshot_name(iter, old)).await.unwrap();
                    }
                }
            }
            println!("DONE {i}");
        }
    });
}

/// Per block, the tag it holds (0 = zeros).
type Model = HashMap<u64, u64>;

/// What the snapshot taken by op `at` of iteration `iter` holds, over `before` (the blocks as
/// the iteration found them): every op before it completed and is durable.
fn snapshot_model(before: &Model, iter: u64, at: u64) -> Model {
    let mut m = before.clone();
    for (i, op) in ops(iter).enumerate().take(at as usize) {
        let (block, count, value) = match op {
            Op::Write { block, count, .. } => (block, count, tag(iter, i as u64)),
            Op::Discard { block, count } => (block, count, 0),
            Op::Flush | Op::Snapshot => continue,
        };
        for b in block..block + count {
            m.insert(b, value);
        }
    }
    m
}

fn verify(model: &mut Model, iter: u64, completed: Option<u64>, got: &[u8]) -> usize {
    // Blocks' durable values and the values they may hold beyond them.
    let mut durable: Model = model.clone();
    let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
    let last_flush = completed.map_or(0, |c| (c + 1) / FLUSH_EVERY * FLUSH_EVERY);
    // Every completed op, plus the one that may have been in flight.
    let limit = completed.map_or(1, |c| c + 2);
    for (i, op) in ops(iter).enumerate().take(limit as usize) {
        let i = i as u64;
        let is_done = completed.is_some_and(|c| i <= c);
        let (block, count, value) = match op {
            Op::Write { block, count, .. } => (block, count, tag(iter, i)),
            Op::Discard { block, count } => (block, count, 0),
            Op::Flush | Op::Snapshot => continue,
        };
        for b in block..block + count {
            // A SIGKILL is a crash of the process, not of the machine: every write that
            // completed is there (a first write completes only once committed, an overwrite's
            // checksum is recomputed). A discard is durable only once flushed.
            let write_done = matches!(op, Op::Write { .. }) && is_done;
            if i < last_flush || write_done {
                durable.insert(b, value);
                maybe.remove(&b);
            } else {
                maybe.entry(b).or_default().push(value);
            }
        }
    }
    let mut checked = 0;
    for b in 0..BLOCKS {
        let data = &got[(b * 4096) as usize..((b + 1) * 4096) as usize];
        let holds = |t: u64| {
            if t == 0 {
                data.iter().all(|&x| x == 0)
            } else {
                data == pattern(b, t).as_slice()
            }
        };
        let base = durable.get(&b).copied().unwrap_or(0);
        let seen = if holds(base) {
            base
        } else {
            let alts = maybe.get(&b).cloned().unwrap_or_default();
            *alts.iter().find(|&&t| holds(t)).unwrap_or_else(|| {
                panic!("iteration {iter}: block {b} holds neither its durable value {base:#x} nor any of {alts:x?} (completed ops: {completed:?})")
            })
        };
        if seen != 0 {
            checked += 1;
        }
        model.insert(b, seen);
    }
    checked
}

fn main() {
    if let Some(path) = std::env::var_os("BALLAST_CRASH_CHILD") {
        let iter = std::env::var("BALLAST_CRASH_ITER")
            .unwrap()
            .parse()
            .unwrap();
        child(Path::new(&path), iter);
        return;
    }
    let iterations: u64 = std::env::var("BALLAST_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempdir();
    let path = dir.path().join("pool");
    let mut model = Model::new();
    let mut rng = StdRng::seed_from_u64(7);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut total_ops = 0;
    for iter in 0..iterations {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("BALLAST_CRASH_CHILD", &path)
            .env("BALLAST_CRASH_ITER", iter.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut completed = None;
            let mut ready = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    ready = true;
                } else if let Some(n) = line.strip_prefix("DONE ") {
                    completed = Some(n.parse::<u64>().unwrap());
                }
            }
            (ready, completed)
        });
        let delay = Duration::from_millis(rng.gen_range(150..700));
        std::thread::sleep(delay);
        nix_kill(child.id());
        let status = child.wait().unwrap();
        let (ready, completed) = reader.join().unwrap();
        assert!(
            ready,
            "iteration {iter}: the child never opened the pool (status {status})"
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "iteration {iter}: the child exited before the kill: {status}"
        );
        total_ops += completed.map_or(0, |c| c + 1);
        let before = model.clone();
        rt.block_on(async {
            let s = open(&path, POOL, EngineKind::Auto).await;
            let r = s.replica(&VolumeName::new("crash").unwrap()).expect("volume survives");
            let got = r.read(0, IoBuf::zeroed((BLOCKS * 4096) as usize)).await.expect("every block reads, no checksum errors");
            let live = verify(&mut model, iter, completed, &got);
            // The newest completed snapshot holds the blocks as they were when it was taken.
            let newest = ops(iter)
                .enumerate()
                .take(completed.map_or(0, |c| c as usize + 1))
                .filter(|(_, op)| matches!(op, Op::Snapshot))
                .map(|(i, _)| i as u64)
                .last();
            if let Some(at) = newest {
                let want = snapshot_model(&before, iter, at);
                let clone = VolumeName::new("check").unwrap();
                s.clone_snapshot(&snapshot_name(iter, at), &clone, 0).await.expect("the snapshot survives");
                let c = s.replica(&clone).unwrap();
                let held = c.read(0, IoBuf::zeroed((BLOCKS * 4096) as usize)).await.expect("the snapshot reads");
                for b in 0..BLOCKS {
                    let t = want.get(&b).copied().unwrap_or(0);
                    let data = &held[(b * 4096) as usize..((b + 1) * 4096) as usize];
                    let ok = if t == 0 { data.iter().all(|&x| x == 0) } else { data == pattern(b, t).as_slice() };
                    assert!(ok, "iteration {iter}: block {b} of the snapshot taken by op {at} is not {t:#x}");
                }
                drop(c);
                s.delete_volume(&clone).await.unwrap();
            }
            for snap in s.list_snapshots() {
                s.delete_snapshot(&snap.name).await.unwrap();
            }
            let pools = s.list_pools().await.unwrap();
            assert_eq!(pools[0].allocated_bytes, r.allocated_bytes(), "accounting");
            assert_eq!(pools[0].allocated_bytes + pools[0].free_bytes, pools[0].capacity_bytes);
            let extents_with_data = (0..BLOCKS / 256).filter(|e| (e * 256..(e + 1) * 256).any(|b| model[&b] != 0)).count() as u64;
            assert!(r.allocated_bytes() >= extents_with_data * MIB, "allocated space covers the data");
            eprintln!("iteration {iter}: killed after {delay:?}, {} ops completed, {live} live blocks verified, snapshot checked: {newest:?}", completed.map_or(0, |c| c + 1));
            if iter % 2 == 0 {
                s.close().await.unwrap();
            }
        });
    }
    assert!(
        total_ops > iterations * 10,
        "the children did too little work to mean anything ({total_ops} ops)"
    );
    println!(
        "crash: {iterations} kills, {total_ops} operations, {:?}",
        started.elapsed()
    );
    println!("1 passed, 0 failed");
}

fn nix_kill(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    let rc = unsafe {
        libc::kill(
            libc::pid_t::try_from(pid).expect("pid fits pid_t"),
            libc::SIGKILL,
        )
    };
    assert_eq!(rc, 0, "kill failed");
}
