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
        // After the last commit: a write to extent 2 only. Then the process "dies": the pool
        // is dropped without closing.
        r.write(2 * MIB + 8192, IoBuf::from_slice(&[5; 4096]), stamped(50))
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
