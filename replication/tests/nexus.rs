//! The nexus over real local replicas (each in its own pool file), with a fault-injecting
//! wrapper for the failures: ejection committed before the ack, a failed commit failing the
//! write, checksum repair from a healthy child, fencing, reads preferring the local child,
//! delta and full rebuilds (also under concurrent writes), reconciliation, and online growth
//! (replicas grown in their own storage, then the nexus; a child that cannot grow is ejected).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use api::ErrorKind;
use api::VolumeName;
use replication::nexus::{
    ChildSpec, ChildState, EjectFuture, Ejector, Nexus, RebuildError, RebuildProgress, Resizable,
};
use replication::server::resize_replica;
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
};
use volume::io::IoBuf;
use volume::pool::{Replica, Storage};

mod common;

use common::MIB;

const BLOCK: u64 = 4096;

/// Faults a child can be told to show.
#[derive(Debug, Default)]
struct Faults {
    /// Blocks (4 KiB indexes) whose stored copy is corrupt: a read covering one fails its
    /// checksum until a write covers the block again, as on a real replica.
    corrupt: Mutex<std::collections::BTreeSet<u64>>,
    /// Reads take this long after their data was read (they return what the replica held
    /// then), widening any window in which a newer write lands meanwhile.
    slow_reads: AtomicBool,
    /// What `generations` answers instead of the replica's own (a peer that lies).
    lie: Mutex<Option<Generations>>,
    /// Every request fails with an I/O error.
    io: AtomicBool,
    /// Every request is refused as fenced.
    fenced: AtomicBool,
    /// Writes of a whole extent (a rebuild's copies) are delayed, widening any window in
    /// which a copy could land after a newer write.
    slow_copies: AtomicBool,
    reads: AtomicU32,
    writes: AtomicU32,
    /// The address of each buffer a write was handed.
    buffers: Mutex<Vec<usize>>,
}

/// A real replica behind a fault switch.
#[derive(Debug, Clone)]
struct Dev {
    replica: Replica,
    faults: Arc<Faults>,
}

impl Dev {
    fn fault(&self, op: &'static str, offset: u64, len: u64) -> Option<DeviceError> {
        let kind = if self.faults.fenced.load(SeqCst) {
            DeviceErrorKind::Fenced
        } else if self.faults.io.load(SeqCst) {
            DeviceErrorKind::Io
        } else {
            return None;
        };
        Some(DeviceError::new(kind, op, offset, len, "injected"))
    }
}

impl BlockDevice for Dev {
    fn size(&self) -> u64 {
        self.replica.size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        self.faults.reads.fetch_add(1, SeqCst);
        if let Some(error) = self.fault("read", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        let blocks = offset / BLOCK..(offset + buf.len() as u64).div_ceil(BLOCK);
        if self
            .faults
            .corrupt
            .lock()
            .unwrap()
            .range(blocks)
            .next()
            .is_some()
        {
            let error = DeviceError::new(
                DeviceErrorKind::Checksum,
                "read",
                offset,
                buf.len() as u64,
                "injected",
            );
            return Err(BufError { error, buf });
        }
        let read = self.replica.read(offset, buf).await;
        if self.faults.slow_reads.load(SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        read
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        self.faults.writes.fetch_add(1, SeqCst);
        self.faults
            .buffers
            .lock()
            .unwrap()
            .push(buf.as_ptr() as usize);
        if let Some(error) = self.fault("write", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        if buf.len() as u64 >= MIB && self.faults.slow_copies.load(SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        let blocks = offset / BLOCK..(offset + buf.len() as u64).div_ceil(BLOCK);
        let written = self.replica.write(offset, buf, flags).await;
        if written.is_ok() {
            let mut corrupt = self.faults.corrupt.lock().unwrap();
            for b in blocks {
                corrupt.remove(&b);
            }
        }
        written
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if let Some(e) = self.fault("flush", 0, 0) {
            return Err(e);
        }
        self.replica.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if let Some(e) = self.fault("discard", offset, len) {
            return Err(e);
        }
        self.replica.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if let Some(e) = self.fault("write_zeroes", offset, len) {
            return Err(e);
        }
        self.replica.write_zeroes(offset, len).await
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        if let Some(e) = self.fault("generations", 0, 0) {
            return Err(e);
        }
        if let Some(g) = self.faults.lie.lock().unwrap().clone() {
            return Ok(g);
        }
        self.replica.generations().await
    }
}

impl Resizable for Dev {
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        if let Some(e) = self.fault("refresh_size", 0, 0) {
            return Err(e);
        }
        self.replica.refresh_size().await
    }
}

/// Records ejections; fails them while `refuse` is set.
#[derive(Debug, Default)]
struct Recorder {
    ejected: Mutex<Vec<String>>,
    since: Mutex<Vec<u64>>,
    refuse: AtomicBool,
}

impl Ejector for Recorder {
    fn eject<'a>(&'a self, child: &'a str, _reason: &'a str, since: u64) -> EjectFuture<'a> {
        Box::pin(async move {
            if self.refuse.load(SeqCst) {
                return Err(api::ControlError::new(
                    ErrorKind::Unavailable,
                    "the store is unreachable",
                ));
            }
            self.ejected.lock().unwrap().push(child.to_owned());
            self.since.lock().unwrap().push(since);
            Ok(())
        })
    }
}

/// `n` replicas of one volume, each in its own pool (a node of its own, as far as the nexus
/// can tell).
struct Fixture {
    _dirs: Vec<tempfile::TempDir>,
    storages: Vec<Arc<Storage>>,
    devs: Vec<Dev>,
}

impl Fixture {
    async fn new(n: usize) -> Self {
        let (mut dirs, mut storages, mut devs) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let (dir, storage, replica) = common::one_volume(&format!("n{i}"), 1).await;
            devs.push(Dev {
                replica,
                faults: Arc::default(),
            });
            storages.push(Arc::new(storage));
            dirs.push(dir);
        }
        Self {
            _dirs: dirs,
            storages,
            devs,
        }
    }

    fn nexus(&self, ejector: Arc<dyn Ejector>) -> Nexus<Dev> {
        let children = self
            .devs
            .iter()
            .enumerate()
            .map(|(i, d)| ChildSpec {
                id: format!("n{i}"),
                dev: d.clone(),
                local: i == 0,
                state: ChildState::Healthy,
            })
            .collect();
        Nexus::new("v", children, ejector)
    }

    /// A nexus over child 0 alone; the others can join it ejected, as new replicas do.
    fn first_only(&self) -> Nexus<Dev> {
        let first = ChildSpec {
            id: "n0".into(),
            dev: self.devs[0].clone(),
            local: true,
            state: ChildState::Healthy,
        };
        Nexus::new("v", vec![first], Arc::new(Recorder::default()))
    }

    /// Add child `i` to `nexus` as an ejected replica, ready for a rebuild.
    fn join(&self, nexus: &Nexus<Dev>, i: usize) {
        nexus.upsert_child(ChildSpec {
            id: format!("n{i}"),
            dev: self.devs[i].clone(),
            local: false,
            state: ChildState::Ejected,
        });
    }

    /// Grow replica `i` to `size` bytes in its own storage, as its node does.
    async fn grow_replica(&self, i: usize, size: u64) {
        let name = VolumeName::new("v").unwrap();
        let got = resize_replica(&self.storages[i], &name, size, false)
            .await
            .unwrap();
        assert_eq!(got, size);
    }

    async fn close(self) {
        for s in &self.storages {
            s.close().await.unwrap();
        }
    }
}

fn pattern(seed: u8, len: usize) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(7) ^ seed;
    }
    b
}

async fn read_child(d: &Dev, offset: u64, len: usize) -> Vec<u8> {
    d.replica
        .read(offset, IoBuf::zeroed(len))
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn writes_reach_every_child_and_reads_prefer_the_local_one() {
    let f = Fixture::new(3).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    let data = pattern(1, 256 * 1024);
    nexus
        .write(MIB, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    nexus.flush().await.unwrap();
    for d in &f.devs {
        assert_eq!(read_child(d, MIB, data.len()).await, data.to_vec());
    }
    let before: Vec<u32> = f.devs.iter().map(|d| d.faults.reads.load(SeqCst)).collect();
    let got = nexus.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(got.to_vec(), data.to_vec());
    assert_eq!(
        f.devs[0].faults.reads.load(SeqCst),
        before[0] + 1,
        "local child serves reads"
    );
    assert_eq!(f.devs[1].faults.reads.load(SeqCst), before[1]);
    f.close().await;
}

/// A write costs one copy of the data fewer than it has children: the first child writes
/// from the caller's buffer, which comes back to the caller; every child stores the data.
#[tokio::test]
async fn a_write_copies_its_buffer_for_all_children_but_one_and_gives_it_back() {
    let f = Fixture::new(3).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    for (seed, fail) in [(3u8, false), (4, true)] {
        // The second time, the child writing from the caller's buffer fails (and is
        // ejected): the buffer still comes back.
        f.devs[0].faults.io.store(fail, SeqCst);
        let data = pattern(seed, 128 * 1024);
        let want = data.to_vec();
        let caller = data.as_ptr() as usize;
        for d in &f.devs {
            d.faults.buffers.lock().unwrap().clear();
        }
        let back = nexus.write(MIB, data, WriteFlags::default()).await.unwrap();
        assert_eq!(
            back.as_ptr() as usize,
            caller,
            "the caller's buffer comes back"
        );
        assert_eq!(back.to_vec(), want);
        let lent: Vec<usize> = f
            .devs
            .iter()
            .map(|d| {
                let seen = d.faults.buffers.lock().unwrap();
                seen.iter().filter(|&&a| a == caller).count()
            })
            .collect();
        assert_eq!(
            lent.iter().sum::<usize>(),
            1,
            "one child writes from the caller's buffer: {lent:?}"
        );
        for d in &f.devs[1..] {
            assert_eq!(read_child(d, MIB, want.len()).await, want);
        }
    }
    f.close().await;
}

#[tokio::test]
async fn a_failed_child_is_ejected_before_the_write_is_acknowledged() {
    let f = Fixture::new(3).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    f.devs[1].faults.io.store(true, SeqCst);
    let data = pattern(2, 64 * 1024);
    nexus
        .write(0, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(*rec.ejected.lock().unwrap(), ["n1"]);
    assert_eq!(nexus.children()[1].1, ChildState::Ejected);
    assert_eq!(nexus.stats().ejections.load(SeqCst), 1);
    // Later writes skip the ejected child; the survivors have every write.
    let writes = f.devs[1].faults.writes.load(SeqCst);
    nexus
        .write(MIB, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(f.devs[1].faults.writes.load(SeqCst), writes);
    for d in [&f.devs[0], &f.devs[2]] {
        assert_eq!(read_child(d, MIB, data.len()).await, data.to_vec());
    }
    f.close().await;
}

#[tokio::test]
async fn a_write_fails_when_the_ejection_cannot_be_recorded() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    rec.refuse.store(true, SeqCst);
    let nexus = f.nexus(rec.clone());
    let old = pattern(2, 4096);
    nexus
        .write(0, old.clone(), WriteFlags::default())
        .await
        .unwrap();
    f.devs[1].faults.io.store(true, SeqCst);
    let e = nexus
        .write(0, pattern(3, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Io);
    assert!(
        e.error.message.contains("could not be recorded"),
        "{}",
        e.error
    );
    // It missed the write: it must not come back as healthy (reads could then return either
    // copy), though the record still says healthy.
    assert_eq!(nexus.children()[1].1, ChildState::Unrecorded);
    f.devs[1].faults.io.store(false, SeqCst);
    let reads = f.devs[1].faults.reads.load(SeqCst);
    for _ in 0..4 {
        let got = nexus.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert_eq!(got.to_vec(), pattern(3, 4096).to_vec());
    }
    assert_eq!(
        f.devs[1].faults.reads.load(SeqCst),
        reads,
        "no read from the stale copy"
    );
    // Every later write fails too while the ejection cannot be recorded...
    let e = nexus
        .write(8192, pattern(4, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(
        e.error.message.contains("could not be recorded"),
        "{}",
        e.error
    );
    // ...and the first one after the store is back records it and is acknowledged.
    rec.refuse.store(false, SeqCst);
    nexus
        .write(8192, pattern(4, 4096), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(nexus.children()[1].1, ChildState::Ejected);
    assert_eq!(*rec.ejected.lock().unwrap(), ["n1"]);
    f.close().await;
}

/// Found by the cluster fault runs (seed 13): the only healthy replica's node was stopped for
/// a few seconds; a read timed out and ejected it, and the volume had no healthy replica left,
/// so it could neither serve nor rebuild once that node was back.
#[tokio::test]
async fn a_failed_read_never_ejects_the_last_healthy_child() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    nexus.set_state("n1", ChildState::Ejected);
    f.devs[0].faults.io.store(true, SeqCst);
    assert!(nexus.read(0, IoBuf::zeroed(4096)).await.is_err());
    assert_eq!(nexus.children()[0].1, ChildState::Healthy);
    assert!(rec.ejected.lock().unwrap().is_empty());
    // Back: it serves again.
    f.devs[0].faults.io.store(false, SeqCst);
    assert!(nexus.read(0, IoBuf::zeroed(4096)).await.is_ok());
    f.close().await;
}

#[tokio::test]
async fn when_every_child_fails_nobody_is_ejected_and_the_attachment_stops() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    for d in &f.devs {
        d.faults.io.store(true, SeqCst);
    }
    assert!(nexus
        .write(0, pattern(4, 4096), WriteFlags::default())
        .await
        .is_err());
    assert!(rec.ejected.lock().unwrap().is_empty());
    // The children may now differ (a write can land on some before failing), and all of them
    // stay healthy: reads would depend on which one answers. So the attachment stops, and
    // the replicas are reconciled when the volume is attached again.
    assert!(
        nexus.is_fenced(),
        "a write that failed on every child must fence the nexus"
    );
    for d in &f.devs {
        d.faults.io.store(false, SeqCst);
    }
    assert!(nexus
        .write(0, pattern(5, 4096), WriteFlags::default())
        .await
        .is_err());
    f.close().await;
}

#[tokio::test]
async fn a_checksum_failure_is_answered_and_repaired_from_a_healthy_child() {
    let f = Fixture::new(2).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    let data = pattern(5, 32 * 1024);
    nexus
        .write(0, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    let writes = f.devs[0].faults.writes.load(SeqCst);
    // One corrupt block (the third) of the eight read.
    f.devs[0].faults.corrupt.lock().unwrap().insert(2);
    let got = nexus.read(0, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(got.to_vec(), data.to_vec());
    assert_eq!(nexus.stats().repairs.load(SeqCst), 1);
    assert_eq!(
        f.devs[0].faults.writes.load(SeqCst),
        writes + 1,
        "only the bad block is rewritten"
    );
    assert!(f.devs[0].faults.corrupt.lock().unwrap().is_empty());
    assert_eq!(read_child(&f.devs[0], 0, data.len()).await, data.to_vec());
    assert_eq!(nexus.children()[0].1, ChildState::Healthy);
    f.close().await;
}

/// Read-repair never overwrites a newer write: the good copy a repair writes is read again
/// under the extent's lock, and only blocks still corrupt then are rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_racing_a_write_keeps_the_write() {
    let f = Fixture::new(2).await;
    let nexus = Arc::new(f.nexus(Arc::new(Recorder::default())));
    let old = pattern(1, BLOCK as usize);
    let new = pattern(2, BLOCK as usize);
    nexus
        .write(0, old.clone(), WriteFlags::default())
        .await
        .unwrap();
    // The local child's copy is corrupt; the other answers the read, slowly: it returns the
    // old data after the new write below has completed on both children.
    f.devs[0].faults.corrupt.lock().unwrap().insert(0);
    f.devs[1].faults.slow_reads.store(true, SeqCst);
    let reader = {
        let nexus = Arc::clone(&nexus);
        tokio::spawn(async move { nexus.read(0, IoBuf::zeroed(BLOCK as usize)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    nexus
        .write(0, new.clone(), WriteFlags::default())
        .await
        .unwrap();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got.to_vec(), old.to_vec(), "the read returns what it read");
    f.devs[1].faults.slow_reads.store(false, SeqCst);
    assert_eq!(
        read_child(&f.devs[0], 0, BLOCK as usize).await,
        new.to_vec(),
        "the repair overwrote a newer acknowledged write"
    );
    assert_eq!(
        read_child(&f.devs[1], 0, BLOCK as usize).await,
        new.to_vec()
    );
    f.close().await;
}

#[tokio::test]
async fn a_fenced_answer_stops_the_nexus_without_ejecting() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    f.devs[1].faults.fenced.store(true, SeqCst);
    let e = nexus
        .write(0, pattern(6, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Fenced);
    assert!(nexus.is_fenced());
    assert!(rec.ejected.lock().unwrap().is_empty());
    // Every later request fails without reaching any child.
    let reads = f.devs[0].faults.reads.load(SeqCst);
    let e = nexus.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Fenced);
    assert_eq!(f.devs[0].faults.reads.load(SeqCst), reads);
    assert_eq!(
        nexus.flush().await.unwrap_err().kind,
        DeviceErrorKind::Fenced
    );
    f.close().await;
}

#[tokio::test]
async fn caller_errors_eject_nobody() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    let e = nexus
        .write(8 * MIB, pattern(7, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange);
    assert!(rec.ejected.lock().unwrap().is_empty());
    assert!(nexus
        .children()
        .iter()
        .all(|(_, s)| *s == ChildState::Healthy));
    f.close().await;
}

/// Every byte of the volume on one child.
async fn whole(d: &Dev) -> Vec<u8> {
    read_child(d, 0, (8 * MIB) as usize).await
}

#[tokio::test]
async fn a_returning_replica_gets_only_what_it_missed() {
    let f = Fixture::new(3).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    for e in 0..5 {
        nexus
            .write(
                e * MIB,
                pattern(e as u8, MIB as usize),
                WriteFlags::default(),
            )
            .await
            .unwrap();
    }
    nexus.flush().await.unwrap();
    // n1 fails on a write to extent 5 and is ejected; it had everything before that write,
    // flushed.
    f.devs[1].faults.io.store(true, SeqCst);
    nexus
        .write(5 * MIB, pattern(50, 8192), WriteFlags::default())
        .await
        .unwrap();
    let since = rec.since.lock().unwrap()[0];
    assert_eq!(
        since,
        nexus.next_generation() - 2,
        "all but the failed write"
    );
    // While it is out: new extents, a rewrite, and a released extent.
    for (e, seed) in [(6, 60), (7, 70), (1, 11)] {
        nexus
            .write(e * MIB, pattern(seed, 4096), WriteFlags::default())
            .await
            .unwrap();
    }
    nexus.discard(2 * MIB, MIB).await.unwrap();
    f.devs[1].faults.io.store(false, SeqCst);

    let progress = RebuildProgress::default();
    let report = nexus.rebuild("n1", since, None, &progress).await.unwrap();
    assert_eq!(
        report.copied_extents, 4,
        "extents 1, 5, 6 and 7: {report:?}"
    );
    assert_eq!(report.copied_bytes, 4 * MIB);
    assert_eq!(report.released_extents, 1, "extent 2");
    assert_eq!(progress.done_bytes.load(SeqCst), 4 * MIB);
    assert!(nexus.transition("n1", ChildState::Rebuilding, ChildState::Healthy));
    assert_eq!(whole(&f.devs[1]).await, whole(&f.devs[0]).await);
    assert_eq!(
        f.devs[1].replica.extent_generations(),
        f.devs[0].replica.extent_generations(),
        "the rebuilt replica records the same generations"
    );
    f.close().await;
}

#[tokio::test]
async fn a_new_replica_gets_only_the_allocated_extents() {
    let f = Fixture::new(2).await;
    let nexus = f.first_only();
    for e in [0, 3, 4] {
        nexus
            .write(
                e * MIB + 4096,
                pattern(e as u8, 8192),
                WriteFlags::default(),
            )
            .await
            .unwrap();
    }
    f.join(&nexus, 1);
    let report = nexus
        .rebuild("n1", 0, None, &RebuildProgress::default())
        .await
        .unwrap();
    assert_eq!(report.copied_extents, 3);
    assert_eq!(
        f.devs[1].replica.allocated_bytes(),
        3 * MIB,
        "thin on the target too"
    );
    assert_eq!(whole(&f.devs[1]).await, whole(&f.devs[0]).await);
    // A second rebuild from where it is now copies nothing.
    assert!(nexus.transition("n1", ChildState::Rebuilding, ChildState::Ejected));
    let again = nexus
        .rebuild(
            "n1",
            nexus.next_generation() - 1,
            None,
            &RebuildProgress::default(),
        )
        .await
        .unwrap();
    assert_eq!(again.copied_extents, 0);
    f.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_during_a_rebuild_are_never_overwritten_by_the_copy() {
    let f = Fixture::new(2).await;
    let nexus = Arc::new(f.first_only());
    for e in 0..8 {
        nexus
            .write(
                e * MIB,
                pattern(e as u8, MIB as usize),
                WriteFlags::default(),
            )
            .await
            .unwrap();
    }
    f.join(&nexus, 1);
    // Writers hammer every extent while the rebuild copies them, slowly.
    f.devs[1].faults.slow_copies.store(true, SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (nexus, stop) = (nexus.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    let e = (n * 3 + w) % 8;
                    let off = e * MIB + ((n * 7 + w) % 64) * 16384;
                    let seed = (100 + w * 31 + n) as u8;
                    nexus
                        .write(off, pattern(seed, 16384), WriteFlags::default())
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let report = nexus
        .rebuild("n1", 0, Some(16 * MIB), &RebuildProgress::default())
        .await
        .unwrap();
    stop.store(true, SeqCst);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert_eq!(report.copied_extents, 8);
    assert!(
        total > 20,
        "the writers ran during the rebuild ({total} writes)"
    );
    assert!(nexus.transition("n1", ChildState::Rebuilding, ChildState::Healthy));
    assert_eq!(
        whole(&f.devs[1]).await,
        whole(&f.devs[0]).await,
        "the copy never overwrote a newer write"
    );
    f.close().await;
}

#[tokio::test]
async fn reconcile_makes_diverged_children_agree_and_numbers_above_them() {
    let f = Fixture::new(3).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    nexus
        .write(0, pattern(1, MIB as usize), WriteFlags::default())
        .await
        .unwrap();
    // A writer that died mid-write left its last write on n2 only.
    let flags = WriteFlags {
        fua: false,
        generation: 1000,
    };
    f.devs[2]
        .replica
        .write(2 * MIB, pattern(9, 4096), flags)
        .await
        .unwrap();
    let fresh = f.nexus(Arc::new(Recorder::default()));
    assert_eq!(fresh.reconcile().await.unwrap(), 1);
    assert_eq!(fresh.next_generation(), 1001);
    for d in &f.devs[..2] {
        assert_eq!(whole(d).await, whole(&f.devs[2]).await);
    }
    assert_eq!(fresh.reconcile().await.unwrap(), 0, "nothing left to do");
    drop(nexus);
    f.close().await;
}

const OLD: u64 = 8 * MIB;
const NEW: u64 = 24 * MIB;

#[tokio::test]
async fn the_volume_grows_online_and_writes_beyond_the_old_end_reach_every_child() {
    let f = Fixture::new(3).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    let first = pattern(1, 64 * 1024);
    nexus
        .write(0, first.clone(), WriteFlags::default())
        .await
        .unwrap();
    let beyond = pattern(2, 256 * 1024);
    let e = nexus
        .write(OLD, beyond.clone(), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);

    // Before its replicas grew, the nexus cannot: nothing changes.
    let e = nexus.grow(NEW).await.unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::NoSpace, "{e}");
    assert!(e.message.contains("grow the replicas first"), "{e}");
    assert_eq!(nexus.size(), OLD);
    assert!(nexus.children().iter().all(|c| c.1 == ChildState::Healthy));

    // A dry run checks and changes nothing; a pool device too small is refused.
    let name = VolumeName::new("v").unwrap();
    assert_eq!(
        resize_replica(&f.storages[0], &name, NEW, true)
            .await
            .unwrap(),
        OLD
    );
    assert_eq!(f.devs[0].replica.size(), OLD);
    let e = resize_replica(&f.storages[0], &name, 1 << 30, true)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("holds at most"), "{}", e.message());

    for i in 0..3 {
        f.grow_replica(i, NEW).await;
    }
    // Growing to the same size again, or a smaller one, is a no-op where the replica lives.
    assert_eq!(
        resize_replica(&f.storages[1], &name, OLD, false)
            .await
            .unwrap(),
        NEW
    );
    // The replicas are bigger, but the nexus still serves the old size until it grows.
    assert_eq!(nexus.size(), OLD);
    assert!(nexus
        .write(OLD, beyond.clone(), WriteFlags::default())
        .await
        .is_err());

    // Grow while writes go on below the old end: none of them fails.
    let writer = async {
        for i in 0..32u64 {
            nexus
                .write(
                    (i % 8) * 64 * 1024 + MIB,
                    pattern(i as u8, 64 * 1024),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
        }
    };
    let (grown, ()) = tokio::join!(nexus.grow(NEW), writer);
    assert_eq!(grown.unwrap(), NEW);
    assert_eq!(nexus.size(), NEW);
    assert_eq!(nexus.grow(OLD).await.unwrap(), NEW, "never shrinks");
    assert_eq!(nexus.grow(NEW).await.unwrap(), NEW, "idempotent");

    // Beyond the old end: written to every child, read back through the nexus.
    nexus
        .write(NEW - 2 * MIB, beyond.clone(), WriteFlags::default())
        .await
        .unwrap();
    nexus.flush().await.unwrap();
    let got = nexus
        .read(NEW - 2 * MIB, IoBuf::zeroed(beyond.len()))
        .await
        .unwrap();
    assert_eq!(got.to_vec(), beyond.to_vec());
    for d in &f.devs {
        assert_eq!(
            read_child(d, NEW - 2 * MIB, beyond.len()).await,
            beyond.to_vec()
        );
        assert_eq!(read_child(d, 0, first.len()).await, first.to_vec());
    }
    // Beyond the new end: still refused, also across it.
    for offset in [NEW, NEW - 4096] {
        let e = nexus
            .write(offset, pattern(3, 8192), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
        let e = nexus.read(offset, IoBuf::zeroed(8192)).await.unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
    }
    assert!(nexus.discard(NEW - 4096, 8192).await.is_err());
    nexus.discard(NEW - 4096, 4096).await.unwrap();
    f.close().await;
}

#[tokio::test]
async fn a_nexus_serves_its_own_size_even_over_bigger_children() {
    let f = Fixture::new(2).await;
    f.grow_replica(0, NEW).await;
    f.grow_replica(1, NEW).await;
    let children = (0..2)
        .map(|i| ChildSpec {
            id: format!("n{i}"),
            dev: f.devs[i].clone(),
            local: i == 0,
            state: ChildState::Healthy,
        })
        .collect();
    let nexus = Nexus::with_size("v", children, Arc::new(Recorder::default()), OLD);
    assert_eq!(nexus.size(), OLD);
    let e = nexus
        .write(OLD, pattern(1, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
    // Its children are big enough already: growing needs nothing else.
    assert_eq!(nexus.grow(NEW).await.unwrap(), NEW);
    nexus
        .write(OLD, pattern(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    f.close().await;
}

#[tokio::test]
async fn a_child_that_cannot_grow_is_ejected_first_and_rebuilt_once_it_has() {
    let f = Fixture::new(3).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    let low = pattern(4, 128 * 1024);
    nexus
        .write(0, low.clone(), WriteFlags::default())
        .await
        .unwrap();
    f.grow_replica(0, NEW).await;
    f.grow_replica(1, NEW).await;
    // n2's replica did not grow (its node missed the resize).
    assert_eq!(nexus.grow(NEW).await.unwrap(), NEW);
    assert_eq!(*rec.ejected.lock().unwrap(), ["n2"]);
    assert_eq!(nexus.children()[2].1, ChildState::Ejected);
    let high = pattern(5, 128 * 1024);
    nexus
        .write(NEW - MIB, high.clone(), WriteFlags::default())
        .await
        .unwrap();

    // A rebuild refuses it while it is too small, and brings it back once it grew.
    let e = nexus
        .rebuild("n2", 0, None, &RebuildProgress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RebuildError::TooSmall {
                have: OLD,
                need: NEW,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(nexus.children()[2].1, ChildState::Ejected);
    f.grow_replica(2, NEW).await;
    nexus
        .rebuild("n2", 0, None, &RebuildProgress::default())
        .await
        .unwrap();
    assert!(nexus.transition("n2", ChildState::Rebuilding, ChildState::Healthy));
    assert_eq!(
        read_child(&f.devs[2], NEW - MIB, high.len()).await,
        high.to_vec()
    );
    assert_eq!(read_child(&f.devs[2], 0, low.len()).await, low.to_vec());
    f.close().await;
}

#[tokio::test]
async fn a_grow_whose_ejection_cannot_be_recorded_changes_nothing() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    rec.refuse.store(true, SeqCst);
    let nexus = f.nexus(rec.clone());
    f.grow_replica(0, NEW).await;
    let e = nexus.grow(NEW).await.unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Io, "{e}");
    assert!(e.message.contains("could not be recorded"), "{e}");
    assert_eq!(nexus.size(), OLD);
    assert_eq!(nexus.children()[1].1, ChildState::Healthy);
    // A child that cannot answer counts as one that cannot grow.
    rec.refuse.store(false, SeqCst);
    f.grow_replica(1, NEW).await;
    f.devs[1].faults.io.store(true, SeqCst);
    assert_eq!(nexus.grow(NEW).await.unwrap(), NEW);
    assert_eq!(*rec.ejected.lock().unwrap(), ["n1"]);
    f.close().await;
}

/// Generations are a peer's input: impossible ones (beyond the largest volume, near the top
/// of `u64`, out of order) stop reconciliation with an error naming the replica; nothing
/// overflows and no copy is made from them.
#[tokio::test]
async fn impossible_generations_from_a_child_are_refused() {
    let f = Fixture::new(2).await;
    let nexus = f.nexus(Arc::new(Recorder::default()));
    nexus
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    let lies = [
        vec![(0, u64::MAX - 1)],
        vec![(u64::MAX / 2, 7)],
        vec![(3, 7), (2, 8)],
    ];
    for lie in lies {
        *f.devs[1].faults.lie.lock().unwrap() = Some(Generations {
            extent_size: MIB,
            extents: lie
                .iter()
                .map(|&(extent, generation)| volume::device::ExtentGeneration {
                    extent,
                    generation,
                })
                .collect(),
        });
        let e = nexus.reconcile().await.unwrap_err();
        assert_eq!(e.kind, DeviceErrorKind::Io, "{e}");
        assert!(e.message.contains("replica n1 reported impossible"), "{e}");
    }
    *f.devs[1].faults.lie.lock().unwrap() = None;
    nexus.reconcile().await.unwrap();
    assert!(nexus.next_generation() < 1 << 62);
    f.close().await;
}

/// An ejection's starting point is what the child had *flushed*: a write it completed but
/// never flushed may be gone if it loses power, so the delta must include it.
#[tokio::test]
async fn an_ejection_starts_from_what_the_child_had_flushed() {
    let f = Fixture::new(2).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    nexus
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    nexus.flush().await.unwrap();
    let flushed = nexus.next_generation() - 1;
    // Completed on both, never flushed.
    nexus
        .write(MIB, pattern(2, 4096), WriteFlags::default())
        .await
        .unwrap();
    f.devs[1].faults.io.store(true, SeqCst);
    nexus
        .write(2 * MIB, pattern(3, 4096), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        *rec.since.lock().unwrap(),
        [flushed],
        "the unflushed write counts as missed"
    );
    f.devs[1].faults.io.store(false, SeqCst);
    let progress = RebuildProgress::default();
    let report = nexus.rebuild("n1", flushed, None, &progress).await.unwrap();
    assert_eq!(report.copied_extents, 2, "extents 1 and 2: {report:?}");
    f.close().await;
}

/// Found by the seeded fault runs (`tests/chaos.rs`): a rebuild whose source has a bad block
/// copies that block from another healthy replica instead of stopping.
#[tokio::test]
async fn a_rebuild_copies_around_a_bad_block_on_its_source() {
    let f = Fixture::new(3).await;
    let rec = Arc::new(Recorder::default());
    let nexus = f.nexus(rec.clone());
    f.devs[2].faults.io.store(true, SeqCst);
    let data = pattern(9, MIB as usize);
    nexus
        .write(0, data.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(nexus.children()[2].1, ChildState::Ejected);
    f.devs[2].faults.io.store(false, SeqCst);
    // The preferred source (the local child) and the other healthy one each have a bad
    // block in the extent, at different places.
    f.devs[0].faults.corrupt.lock().unwrap().insert(3);
    f.devs[1].faults.corrupt.lock().unwrap().insert(200);
    let progress = RebuildProgress::default();
    let since = rec.since.lock().unwrap()[0];
    let report = nexus.rebuild("n2", since, None, &progress).await.unwrap();
    assert_eq!(report.copied_extents, 1);
    assert!(nexus.transition("n2", ChildState::Rebuilding, ChildState::Healthy));
    assert_eq!(read_child(&f.devs[2], 0, MIB as usize).await, data.to_vec());
    f.close().await;
}
