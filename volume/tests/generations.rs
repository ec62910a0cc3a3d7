//! Extent generations, which delta rebuild compares: a write stamps the generation it carries
//! (or the replica's own next one), partial zeroing counts as a change, and after an unclean
//! shutdown an extent that took writes after its last commit is marked unknown while a
//! committed one keeps its generation.

mod common;

use common::{open, tempdir, volume};
use volume::device::{BlockDevice, ExtentGeneration, WriteFlags, GENERATION_UNKNOWN};
use volume::io::{EngineKind, IoBuf};

const MIB: u64 = 1 << 20;

fn stamped(generation: u64) -> WriteFlags {
    WriteFlags {
        fua: false,
        generation,
    }
}

fn gens(r: &volume::pool::Replica) -> Vec<(u64, u64)> {
    r.extent_generations()
        .extents
        .iter()
        .map(|&ExtentGeneration { extent, generation }| (extent, generation))
        .collect()
}

#[tokio::test]
async fn writes_record_generations_and_recovery_marks_uncommitted_extents_unknown() {
    let dir = tempdir();
    let path = dir.path().join("pool");
    {
        let s = open(&path, 64 * MIB, EngineKind::Sync).await;
        let r = volume(&s, "g", 8 * MIB).await;
        r.write(0, IoBuf::from_slice(&[1; 4096]), stamped(40))
            .await
            .unwrap();
        r.write(MIB, IoBuf::from_slice(&[2; 4096]), stamped(41))
            .await
            .unwrap();
        // A stale generation never lowers an extent's.
        r.write(MIB + 4096, IoBuf::from_slice(&[3; 4096]), stamped(7))
            .await
            .unwrap();
        // Unstamped writes number themselves above everything seen.
        r.write(
            2 * MIB,
            IoBuf::from_slice(&[4; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(gens(&r), [(0, 40), (1, 41), (2, 42)]);
        // Zeroing part of an extent is a change too.
        r.write_zeroes(4096, 4096).await.unwrap();
        assert_eq!(gens(&r)[0], (0, 43));
        r.flush().await.unwrap();
        // After the last commit: an overwrite in extent 2 only (a first write would commit
        // before completing). Then the process "dies": the pool is dropped without closing.
        r.write(2 * MIB, IoBuf::from_slice(&[5; 4096]), stamped(50))
            .await
            .unwrap();
        let generations = r.generations().await.unwrap();
        assert_eq!(generations.extent_size, MIB);
        assert_eq!(generations.extents.len(), 3);
    }
    let s = open(&path, 64 * MIB, EngineKind::Sync).await;
    let r = s.replica(&api::VolumeName::new("g").unwrap()).unwrap();
    assert_eq!(
        gens(&r),
        [(0, 43), (1, 41), (2, GENERATION_UNKNOWN)],
        "only the extent written after the last commit is unknown"
    );
    s.close().await.unwrap();
}

/// A flush that only overwrites blocks written before appends an unordered journal record
/// with one sync: the record may reach the disk before the data it covers. So it records the
/// generations only of writes an earlier sync made durable, and marks extents written since
/// then unknown; the next record, after its sync, records their real generations. (A record
/// that gives a block its first checksum syncs the data first, and vouches for it.)
#[tokio::test]
async fn a_single_sync_commit_vouches_only_for_writes_an_earlier_sync_made_durable() {
    let dir = tempdir();
    let path = dir.path().join("pool");
    {
        let s = open(&path, 64 * MIB, EngineKind::Sync).await;
        let r = volume(&s, "g", 8 * MIB).await;
        for (extent, generation) in [(0, 10), (1, 11)] {
            r.write(
                extent * MIB,
                IoBuf::from_slice(&[1; 4096]),
                stamped(generation),
            )
            .await
            .unwrap();
        }
        r.flush().await.unwrap();
        // Steady state: an overwrite in an open extent, then a flush.
        r.write(0, IoBuf::from_slice(&[2; 4096]), stamped(20))
            .await
            .unwrap();
        r.flush().await.unwrap();
        assert_eq!(gens(&r), [(0, 20), (1, 11)], "in memory");
    }
    // The process died after that flush: extent 0's generation 20 was never vouched for.
    {
        let s = open(&path, 64 * MIB, EngineKind::Sync).await;
        let r = s.replica(&api::VolumeName::new("g").unwrap()).unwrap();
        assert_eq!(gens(&r), [(0, GENERATION_UNKNOWN), (1, 11)]);
        // The data is there all the same.
        let got = r.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(got.iter().all(|&b| b == 2));
        // (Extent 0 stays unknown until a rebuild: a write never lowers a generation.)
        r.write(MIB, IoBuf::from_slice(&[3; 4096]), stamped(31))
            .await
            .unwrap();
        r.flush().await.unwrap();
        r.write(MIB, IoBuf::from_slice(&[4; 4096]), stamped(32))
            .await
            .unwrap();
        r.flush().await.unwrap();
        // The next commit comes after that flush's sync: generation 32 is durable now.
        r.flush().await.unwrap();
    }
    let s = open(&path, 64 * MIB, EngineKind::Sync).await;
    let r = s.replica(&api::VolumeName::new("g").unwrap()).unwrap();
    assert_eq!(gens(&r), [(0, GENERATION_UNKNOWN), (1, 32)]);
    s.close().await.unwrap();
}

/// Extents stay open across flushes (a write to a closed one waits for a commit that opens
/// it), until a device holds more than `OPEN_LIMIT`: then the next checkpoint closes the idle
/// ones written longest ago. After an unclean shutdown, recovery re-reads only the open ones.
#[tokio::test]
async fn extents_stay_open_until_the_limit_and_recovery_reads_only_those() {
    use volume::pool::{KEEP_OPEN_COMMITS, OPEN_LIMIT};
    let dir = tempdir();
    let path = dir.path().join("pool");
    let pool = OPEN_LIMIT as u64 * MIB + 512 * MIB;
    {
        let s = open(&path, pool, EngineKind::Sync).await;
        let r = volume(&s, "g", OPEN_LIMIT as u64 * MIB + 256 * MIB).await;
        for extent in 0..10 {
            r.write(extent * MIB, IoBuf::from_slice(&[1; 4096]), stamped(1))
                .await
                .unwrap();
        }
        for _ in 0..3 * KEEP_OPEN_COMMITS {
            r.flush().await.unwrap();
        }
    }
    {
        let s = open(&path, pool, EngineKind::Sync).await;
        assert_eq!(s.recovered_extents(), 10, "idle extents stayed open");
        let r = s.replica(&api::VolumeName::new("g").unwrap()).unwrap();
        let extents = OPEN_LIMIT as u64 + 100;
        for extent in 0..extents {
            r.write(extent * MIB, IoBuf::from_slice(&[2; 4096]), stamped(2))
                .await
                .unwrap();
        }
        for _ in 0..2 * KEEP_OPEN_COMMITS {
            r.write(0, IoBuf::from_slice(&[3; 4096]), stamped(3))
                .await
                .unwrap();
            r.flush().await.unwrap();
        }
        // Flushes only append journal records, which never close extents; the periodic
        // checkpoint does.
        s.checkpoint().await.unwrap();
    }
    let s = open(&path, pool, EngineKind::Sync).await;
    let recovered = s.recovered_extents();
    assert!(
        recovered <= OPEN_LIMIT as u64 && recovered >= OPEN_LIMIT as u64 * 3 / 4 - 1,
        "{recovered} extents were open"
    );
    let r = s.replica(&api::VolumeName::new("g").unwrap()).unwrap();
    let last = r
        .read((OPEN_LIMIT as u64 + 99) * MIB, IoBuf::zeroed(4096))
        .await
        .unwrap();
    assert!(last.iter().all(|&b| b == 2));
    s.close().await.unwrap();
}

/// A journal record covers volumes in every used slot of the volume table, not only the
/// first: with the first two slots freed again, the third volume's resize and its writes'
/// generations survive a crash through the journal alone (no checkpoint in between).
#[tokio::test]
async fn a_volume_in_a_later_slot_is_journaled() {
    use api::VolumeControl;
    let dir = tempdir();
    let path = dir.path().join("pool");
    let name = api::VolumeName::new("c").unwrap();
    {
        let s = open(&path, 64 * MIB, EngineKind::Sync).await;
        volume(&s, "a", 4 * MIB).await;
        volume(&s, "b", 4 * MIB).await;
        let r = volume(&s, "c", 4 * MIB).await;
        for n in ["a", "b"] {
            s.delete_volume(&api::VolumeName::new(n).unwrap())
                .await
                .unwrap();
        }
        s.resize_volume(&name, 8 * MIB).await.unwrap();
        r.write(0, IoBuf::from_slice(&[6; 4096]), stamped(70))
            .await
            .unwrap();
        r.flush().await.unwrap();
        // The process "dies": dropped without closing.
    }
    let s = open(&path, 64 * MIB, EngineKind::Sync).await;
    let r = s.replica(&name).unwrap();
    assert_eq!(r.size(), 8 * MIB, "the resize was lost");
    assert_eq!(gens(&r), [(0, 70)]);
    s.close().await.unwrap();
}
