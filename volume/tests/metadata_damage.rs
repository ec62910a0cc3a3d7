//! Damaged metadata on a real pool file: a damaged superblock A falls back to copy B, a torn
//! newest metadata slot falls back to the previous checkpoint and the journal after it, a torn
//! journal record is not applied, and when nothing valid is left the pool refuses to open (and
//! is left untouched) rather than being reformatted.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use api::{VolumeControl, VolumeName};
use common::{open, pattern, tempdir, try_open, volume};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{EngineKind, IoBuf};
use volume::pool::format::Layout;
use volume::pool::PoolError;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xFF;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// The commit sequence number in a slot's header, if it has the metadata magic.
fn slot_seq(path: &Path, offset: u64) -> Option<u64> {
    let f = std::fs::File::open(path).unwrap();
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, offset).unwrap();
    (&h[..8] == b"BLSTMETA").then(|| u64::from_le_bytes(h[24..32].try_into().unwrap()))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn damaged_superblock_a_falls_back_to_copy_b() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = volume(&s, "keep", 4 * MIB).await;
            r.write(
                0,
                IoBuf::from_slice(&pattern(0, 1)),
                WriteFlags {
                    fua: true,
                    ..WriteFlags::default()
                },
            )
            .await
            .unwrap();
            s.close().await.unwrap();
        }
        flip(&path, 100);
        let s = open(&path, SIZE, EngineKind::Auto).await;
        let r = s.replica(&VolumeName::new("keep").unwrap()).unwrap();
        assert_eq!(
            r.read(0, IoBuf::zeroed(4096)).await.unwrap().to_vec(),
            pattern(0, 1)
        );
        s.close().await.unwrap();
        drop((r, s));
        // Copy A was rewritten from B, so damaging B now is survivable too.
        let layout = Layout::for_device(SIZE).unwrap();
        flip(&path, layout.sb_b_offset() + 100);
        let s = open(&path, SIZE, EngineKind::Auto).await;
        assert!(s
            .get_volume(&VolumeName::new("keep").unwrap())
            .await
            .is_ok());
    });
}

/// The sequence number and offset of the newest journal record on the device.
fn newest_record(path: &Path, layout: &Layout) -> (u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let mut region = vec![0u8; layout.journal_bytes() as usize];
    f.read_exact_at(&mut region, layout.journal_offset())
        .unwrap();
    region
        .chunks(4096)
        .enumerate()
        .filter(|(_, b)| &b[..8] == b"BLSTJRNL")
        .map(|(i, b)| {
            (
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                layout.journal_offset() + i as u64 * 4096,
            )
        })
        .max()
        .expect("the journal holds a record")
}

/// A torn newest checkpoint falls back to the previous one, and loses nothing: the journal
/// records after it are replayed.
#[test]
fn torn_newest_slot_falls_back_to_the_previous_checkpoint_and_the_journal() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = volume(&s, "first", 4 * MIB).await;
            r.write(0, IoBuf::from_slice(&pattern(0, 2)), WriteFlags::default())
                .await
                .unwrap();
            r.flush().await.unwrap();
            s.close().await.unwrap();
            // A journal record that creates a volume, then a checkpoint.
            volume(&s, "second", 4 * MIB).await;
            s.close().await.unwrap();
        }
        let layout = Layout::for_device(SIZE).unwrap();
        let seqs: Vec<_> = layout
            .meta_slot_offset
            .iter()
            .map(|&o| slot_seq(&path, o).unwrap())
            .collect();
        let newest = usize::from(seqs[1] > seqs[0]);
        // Tear the newest slot: damage one body page.
        flip(
            &path,
            layout.meta_slot_offset[newest] + u64::from(layout.header_pages) * 4096 + 7,
        );
        let s = open(&path, SIZE, EngineKind::Auto).await;
        let first = s
            .replica(&VolumeName::new("first").unwrap())
            .expect("older checkpoint has it");
        assert_eq!(
            first.read(0, IoBuf::zeroed(4096)).await.unwrap().to_vec(),
            pattern(0, 2)
        );
        assert!(
            s.get_volume(&VolumeName::new("second").unwrap())
                .await
                .is_ok(),
            "the journal record after the older checkpoint is replayed"
        );
    });
}

/// A torn journal record is not applied, and ends the replay; what came before it stays.
#[test]
fn a_torn_journal_record_is_not_applied() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = volume(&s, "first", 4 * MIB).await;
            r.write(0, IoBuf::from_slice(&pattern(0, 3)), WriteFlags::default())
                .await
                .unwrap();
            r.flush().await.unwrap();
            volume(&s, "second", 4 * MIB).await;
            // The process dies here: no checkpoint after the records.
        }
        let layout = Layout::for_device(SIZE).unwrap();
        let (_, at) = newest_record(&path, &layout);
        flip(&path, at + 60);
        let s = open(&path, SIZE, EngineKind::Auto).await;
        let first = s
            .replica(&VolumeName::new("first").unwrap())
            .expect("an earlier record has it");
        assert_eq!(
            first.read(0, IoBuf::zeroed(4096)).await.unwrap().to_vec(),
            pattern(0, 3)
        );
        assert!(
            s.get_volume(&VolumeName::new("second").unwrap())
                .await
                .is_err(),
            "the torn record is not applied"
        );
    });
}

/// What a replay restored is written into the checksum area by the next checkpoint, so it
/// survives the journal moving on (found by the crash test: a replayed checksum lived only in
/// memory, and the block read as zeros after the next clean close and reopen).
#[test]
fn replayed_checksums_survive_a_later_checkpoint() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = volume(&s, "v", 4 * MIB).await;
            r.write(
                8192,
                IoBuf::from_slice(&pattern(2, 4)),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            r.flush().await.unwrap();
            // The process dies: the checksum is only in the journal.
        }
        for _ in 0..2 {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = s.replica(&VolumeName::new("v").unwrap()).unwrap();
            assert_eq!(
                r.read(8192, IoBuf::zeroed(4096)).await.unwrap().to_vec(),
                pattern(2, 4)
            );
            s.close().await.unwrap();
        }
    });
}

#[test]
fn no_valid_metadata_refuses_to_open_and_touches_nothing() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        drop(open(&path, SIZE, EngineKind::Auto).await);
        let layout = Layout::for_device(SIZE).unwrap();
        for &o in &layout.meta_slot_offset {
            flip(&path, o + 40);
        }
        let before = std::fs::read(&path).unwrap();
        let e = try_open(&path, SIZE, EngineKind::Auto, false)
            .await
            .unwrap_err();
        assert!(matches!(e, PoolError::Metadata { .. }), "{e}");
        assert!(e.to_string().contains("refusing to open"), "{e}");
        assert!(
            std::fs::read(&path).unwrap() == before,
            "a refused pool is left untouched"
        );
    });
}
