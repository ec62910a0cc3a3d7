//! I/O statistics kept with atomics on the data path and read by the metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds (the last bucket is +Inf).
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.5, 1.0,
];

/// Counters for one kind of operation, updated lock-free.
#[derive(Debug, Default)]
pub struct OpCounters {
    count: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency_sum_ns: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
}

impl OpCounters {
    /// Record one operation of `bytes` that took `elapsed` and succeeded or not.
    pub fn record(&self, bytes: u64, elapsed: Duration, ok: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let idx = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> OpStats {
        let mut buckets = [0; LATENCY_BUCKETS_SECONDS.len() + 1];
        for (d, s) in buckets.iter_mut().zip(&self.buckets) {
            *d = s.load(Ordering::Relaxed);
        }
        OpStats {
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            latency_sum_seconds: self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// A snapshot of [`OpCounters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpStats {
    /// Operations completed (successful or not).
    pub count: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Bytes transferred by successful operations.
    pub bytes: u64,
    /// Sum of latencies, in seconds.
    pub latency_sum_seconds: f64,
    /// Per-bucket (not cumulative) counts; index `i` counts latencies `<= LATENCY_BUCKETS_SECONDS[i]`
    /// and above the previous bound; the last entry counts the rest (+Inf).
    pub buckets: [u64; LATENCY_BUCKETS_SECONDS.len() + 1],
}

/// Per-volume data-path counters.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Reads.
    pub read: OpCounters,
    /// Writes.
    pub write: OpCounters,
    /// Flushes.
    pub flush: OpCounters,
    /// Discards and write-zeroes.
    pub discard: OpCounters,
    /// Blocks that failed checksum verification.
    pub checksum_errors: AtomicU64,
}

/// A snapshot of one volume's I/O statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeIoStats {
    /// The volume's name.
    pub volume: String,
    /// Reads.
    pub read: OpStats,
    /// Writes.
    pub write: OpStats,
    /// Flushes.
    pub flush: OpStats,
    /// Discards and write-zeroes.
    pub discard: OpStats,
    /// Blocks that failed checksum verification.
    pub checksum_errors: u64,
}

impl IoCounters {
    /// A snapshot labelled with `volume`.
    pub fn snapshot(&self, volume: &str) -> VolumeIoStats {
        VolumeIoStats {
            volume: volume.to_owned(),
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            discard: self.discard.snapshot(),
            checksum_errors: self.checksum_errors.load(Ordering::Relaxed),
        }
    }
}
