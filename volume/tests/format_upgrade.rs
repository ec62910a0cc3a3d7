//! Format 1 devices (no journal) are upgraded in place at open: data in the extents the
//! journal needs is moved, nothing is lost, and a device that has no room for the move is
//! refused with a message that says what to do, and left as it was. Format 2 devices (no
//! snapshots) are upgraded to format 3 at open by their superblocks alone; a device of a
//! format newer than this build is refused with a message to upgrade.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use api::{VolumeControl, VolumeName};
use common::{open, pattern, tempdir, try_open, volume};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{EngineKind, IoBuf};
use volume::pool::format::{Layout, Superblock, FORMAT_VERSION, JOURNAL_EXTENTS};
use volume::pool::metadata::{check_slot, encode_header, ExtentEntry, JournalMark, MetaState};
use volume::pool::PoolError;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn read(f: &std::fs::File, at: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

/// The pool at `path`, open for writing, and its superblock.
fn superblock(path: &Path) -> (std::fs::File, Superblock) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let sb = Superblock::decode(&read(&f, 0, 4096)).unwrap();
    (f, sb)
}

/// Rewrite a cleanly closed current-format pool as format 1 would have left it, with logical
/// extent 0 of its only volume in the device's last extent (where the journal goes now).
/// With `fill`, every other free extent is given to the volume too, so nothing is free.
fn make_format_1(path: &Path, fill: bool) {
    let (f, mut sb) = superblock(path);
    let l = Layout::version_1(SIZE).unwrap();
    sb.layout = l;
    sb.version = 1;
    let encoded = sb.encode();
    f.write_all_at(&encoded, 0).unwrap();
    f.write_all_at(&encoded, l.sb_b_offset()).unwrap();
    // The newest slot.
    let slots: Vec<_> = l
        .meta_slot_offset
        .iter()
        .map(|&o| read(&f, o, l.meta_slot_bytes))
        .collect();
    let (newest, header) = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| check_slot(&l, &sb.disk_uuid, s).ok().map(|h| (i, h)))
        .max_by_key(|(_, h)| h.seq)
        .unwrap();
    let hlen = l.header_pages as usize * 4096;
    let mut meta = MetaState::decode_body(&l, &slots[newest][hlen..]).unwrap();
    let from = meta
        .extents
        .iter()
        .position(|e| e.owner != 0 && e.logical == 0)
        .unwrap();
    let to = l.n_extents as usize - 1;
    let data_at = |p: usize| l.data_offset + p as u64 * MIB;
    let csum_at = |p: usize| l.csum_offset + p as u64 * 1024;
    f.write_all_at(&read(&f, data_at(from), MIB), data_at(to))
        .unwrap();
    f.write_all_at(&read(&f, csum_at(from), 1024), csum_at(to))
        .unwrap();
    f.write_all_at(&[0; 1024], csum_at(from)).unwrap();
    meta.extents[to] = meta.extents[from];
    meta.extents[from] = ExtentEntry::default();
    if fill {
        let owner = meta.extents[to].owner;
        let mut logical = 8;
        for e in meta.extents.iter_mut().filter(|e| e.owner == 0) {
            *e = ExtentEntry {
                owner,
                logical,
                generation: 1,
            };
            logical += 1;
        }
        meta.volumes[owner as usize - 1].as_mut().unwrap().size = u64::from(logical) * MIB;
    }
    meta.check(&l).unwrap();
    let body = meta.encode_body(&l);
    let seq = header.seq + 1;
    let mut slot = encode_header(&l, seq, JournalMark::default(), &sb.disk_uuid, &body);
    slot.extend_from_slice(&body);
    f.write_all_at(&slot, l.meta_slot_offset[(seq % 2) as usize])
        .unwrap();
    f.sync_all().unwrap();
}

async fn fill_volume(path: &Path) {
    let s = open(path, SIZE, EngineKind::Auto).await;
    let r = volume(&s, "old", 8 * MIB).await;
    for e in 0..4 {
        r.write(
            e * MIB + 4096,
            IoBuf::from_slice(&pattern(e, 9)),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    }
    s.close().await.unwrap();
}

#[test]
fn a_format_1_device_is_upgraded_in_place_and_keeps_its_data() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        fill_volume(&path).await;
        make_format_1(&path, false);
        for _ in 0..2 {
            let s = open(&path, SIZE, EngineKind::Auto).await;
            let r = s.replica(&VolumeName::new("old").unwrap()).unwrap();
            for e in 0..4 {
                let got = r.read(e * MIB + 4096, IoBuf::zeroed(4096)).await.unwrap();
                assert_eq!(got.to_vec(), pattern(e, 9), "extent {e}");
            }
            let pool = &s.list_pools().await.unwrap()[0];
            let l = Layout::for_device(SIZE).unwrap();
            assert_eq!(pool.capacity_bytes, l.capacity_bytes());
            assert_eq!(pool.allocated_bytes, 4 * MIB);
            // Writes and flushes go through the journal now.
            r.write(0, IoBuf::from_slice(&pattern(0, 10)), WriteFlags::default())
                .await
                .unwrap();
            r.flush().await.unwrap();
            s.close().await.unwrap();
        }
        let f = std::fs::File::open(&path).unwrap();
        for at in [0, Layout::for_device(SIZE).unwrap().sb_b_offset()] {
            let sb = Superblock::decode(&read(&f, at, 4096)).unwrap();
            assert_eq!(sb.layout.journal_extents, JOURNAL_EXTENTS);
            assert_eq!(sb.version, FORMAT_VERSION);
        }
    });
}

#[test]
fn a_format_1_device_without_room_for_the_journal_is_refused_and_left_as_it_was() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        fill_volume(&path).await;
        make_format_1(&path, true);
        let before = std::fs::read(&path).unwrap();
        for _ in 0..2 {
            let e = try_open(&path, SIZE, EngineKind::Auto, false)
                .await
                .unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, PoolError::Upgrade { .. }), "{e:?}");
            assert!(
                msg.contains("format 1") && msg.contains("old") && msg.contains("free"),
                "{msg}"
            );
        }
        // Opening wrote a checkpoint (format 1 metadata) but moved and lost nothing: the
        // superblocks, the data and the checksums are as they were.
        let after = std::fs::read(&path).unwrap();
        let l = Layout::version_1(SIZE).unwrap();
        assert_eq!(after[..4096], before[..4096]);
        assert_eq!(
            after[l.csum_offset as usize..],
            before[l.csum_offset as usize..]
        );
    });
}

/// Write both superblocks of the pool at `path` with format version `version`.
fn set_version(path: &Path, version: u32) {
    let (f, mut sb) = superblock(path);
    sb.version = version;
    let encoded = sb.encode();
    f.write_all_at(&encoded, 0).unwrap();
    f.write_all_at(&encoded, sb.layout.sb_b_offset()).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_format_2_device_is_upgraded_to_format_3_and_keeps_its_data() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        fill_volume(&path).await;
        set_version(&path, 2);
        let s = open(&path, SIZE, EngineKind::Auto).await;
        let r = s.replica(&VolumeName::new("old").unwrap()).unwrap();
        for e in 0..4 {
            let got = r.read(e * MIB + 4096, IoBuf::zeroed(4096)).await.unwrap();
            assert_eq!(got.to_vec(), pattern(e, 9), "extent {e}");
        }
        s.close().await.unwrap();
        let f = std::fs::File::open(&path).unwrap();
        for at in [0, Layout::for_device(SIZE).unwrap().sb_b_offset()] {
            assert_eq!(Superblock::decode(&read(&f, at, 4096)).unwrap().version, 3);
        }
    });
}

#[test]
fn a_device_of_a_newer_format_is_refused_with_a_message_to_upgrade() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        fill_volume(&path).await;
        set_version(&path, FORMAT_VERSION + 1);
        let before = std::fs::read(&path).unwrap();
        let e = try_open(&path, SIZE, EngineKind::Auto, false)
            .await
            .unwrap_err();
        let msg = format!("{e} {e:?}");
        assert!(
            msg.contains("newer than this build reads") && msg.contains("upgrade ballast"),
            "{msg}"
        );
        assert!(std::fs::read(&path).unwrap() == before, "left as it was");
    });
}
