//! Damaged metadata on a real pool file: a damaged superblock A falls back to copy B, a torn
//! newest metadata slot falls back to the previous commit, and when nothing valid is left the
//! pool refuses to open (and is left untouched) rather than being reformatted.

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

#[test]
fn torn_newest_slot_falls_back_to_the_previous_commit() {
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
            // One more commit that only creates a volume.
            volume(&s, "second", 4 * MIB).await;
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
            .expect("older commit has it");
        assert_eq!(
            first.read(0, IoBuf::zeroed(4096)).await.unwrap().to_vec(),
            pattern(0, 2)
        );
        assert!(
            s.get_volume(&VolumeName::new("second").unwrap())
                .await
                .is_err(),
            "the torn commit is not applied"
        );
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
