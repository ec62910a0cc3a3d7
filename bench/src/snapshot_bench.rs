//! What a snapshot costs a volume's writes: 4 KiB writes, one per 1 MiB extent in a random
//! order, on a fully written volume (the same volume, the same run):
//!
//! 1. before any snapshot (the baseline);
//! 2. right after a snapshot: every write is the first to its extent, which copies the
//!    extent (1 MiB read, verified and written) before it writes;
//! 3. after that: the steady state, where the extents are the volume's own again.
//!
//! Each pass runs at queue depth 1 and at queue depth 8 (`--qd`), with and without a flush
//! after every write (`--sync`: what a database's commit pays). It also times taking the
//! snapshot itself: the write barrier's hold (a checkpoint of the pool device) on a volume
//! with every extent written. Figures are ratios to the baseline pass of the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use api::{VolumeControl, VolumeName, VolumeSpec};
use clap::Parser;
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{probe, EngineKind, IoBuf};
use volume::pool::{DeviceSpec, Replica, Storage, StorageConfig};

#[derive(Debug, Parser)]
struct Args {
    /// Where the pool file goes (a filesystem with O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The volume's size in MiB: one write per MiB per pass.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Writes in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Flush after every write.
    #[arg(long)]
    sync: bool,
}

/// Latencies of one pass, sorted.
struct Pass(Vec<Duration>);

impl Pass {
    fn at(&self, q: f64) -> Duration {
        self.0[((self.0.len() - 1) as f64 * q) as usize]
    }
    fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }
}

/// A permutation of `0..n` from a fixed seed (xorshift), so every pass and run is alike.
fn order(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

async fn pass(r: &Arc<Replica>, args: &Args, seed: u64) -> Result<(Pass, Duration)> {
    let extents = order(args.mib, seed);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.qd {
        let (r, next, extents) = (r.clone(), next.clone(), extents.clone());
        let sync = args.sync;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&e) = extents.get(i) else { break };
                let block = (e * 256 + (e * 7919 + seed) % 256) * 4096;
                let t = Instant::now();
                r.write(
                    block,
                    IoBuf::from_slice(&[seed as u8; 4096]),
                    WriteFlags::default(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("write: {}", e.error))?;
                if sync {
                    r.flush().await.map_err(|e| anyhow::anyhow!("flush: {e}"))?;
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed();
    all.sort_unstable();
    Ok((Pass(all), wall))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("ballast-snapbench-")
        .tempdir_in(&args.dir)?;
    let engine = probe(EngineKind::Auto, 2).context("start the I/O engine")?;
    let size = args.mib << 20;
    let storage = Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: dir.path().join("pool.img"),
            create_size: Some(3 * size + (256 << 20)),
        }],
        node_id: "snapshot-bench".into(),
        force_format: false,
        engine,
    })
    .await?;
    let name = VolumeName::new("bench")?;
    storage
        .create_volume(VolumeSpec {
            name: name.clone(),
            size_bytes: size,
            replicas: 1,
        })
        .await?;
    let r: Arc<Replica> = storage.replica(&name)?.into();
    // Every extent written in full, so a copy moves a whole MiB.
    for e in 0..args.mib {
        r.write(
            e << 20,
            IoBuf::from_slice(&vec![7u8; 1 << 20]),
            WriteFlags::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("prefill: {}", e.error))?;
    }
    r.flush().await?;
    let (base, base_wall) = pass(&r, &args, 1).await?;
    let t = Instant::now();
    storage
        .create_snapshot(&name, &VolumeName::new("snap")?)
        .await?;
    let taking = t.elapsed();
    let (first, first_wall) = pass(&r, &args, 2).await?;
    let (steady, steady_wall) = pass(&r, &args, 3).await?;
    let n = args.mib as f64;
    println!(
        "snapshot bench: {} MiB volume, every extent written, 4 KiB writes one per extent, QD{}{}",
        args.mib,
        args.qd,
        if args.sync {
            ", a flush after each"
        } else {
            ""
        }
    );
    println!("| pass | writes/s | ratio | mean | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    let base_rate = n / base_wall.as_secs_f64();
    for (label, p, wall) in [
        ("no snapshot (baseline)", &base, base_wall),
        (
            "first write per extent after a snapshot",
            &first,
            first_wall,
        ),
        ("after that (steady state)", &steady, steady_wall),
    ] {
        let rate = n / wall.as_secs_f64();
        println!(
            "| {label} | {rate:.0} | {:.2} | {} | {} | {} |",
            rate / base_rate,
            us(p.mean()),
            us(p.at(0.5)),
            us(p.at(0.99))
        );
    }
    println!(
        "taking the snapshot ({} MiB allocated): {:.1} ms",
        args.mib,
        taking.as_secs_f64() * 1e3
    );
    let info = storage.get_snapshot(&VolumeName::new("snap")?)?;
    println!(
        "the snapshot holds {} MiB exclusively and shares {} MiB",
        info.exclusive_bytes >> 20,
        info.shared_bytes >> 20
    );
    storage.close().await?;
    Ok(())
}
