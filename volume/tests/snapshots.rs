//! Snapshots, clones and reverts on the engine: what each reads, what each holds, what a
//! delete frees, and the errors callers get. (Random sequences with crashes are the model
//! test's; SIGKILLs are the crash test's.)

mod common;

use api::{ErrorKind, VolumeControl, VolumeName};
use common::{open, pattern, tempdir, volume};
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{EngineKind, IoBuf};
use volume::pool::{Replica, Storage};

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn n(s: &str) -> VolumeName {
    VolumeName::new(s).unwrap()
}

async fn write(r: &Replica, block: u64, tag: u64) {
    r.write(
        block * 4096,
        IoBuf::from_slice(&pattern(block, tag)),
        WriteFlags::default(),
    )
    .await
    .unwrap();
}

/// The tag block `block` holds (0: zeros); panics on anything else.
async fn tag_of(r: &Replica, block: u64, tags: &[u64]) -> u64 {
    let got = r.read(block * 4096, IoBuf::zeroed(4096)).await.unwrap();
    if got.iter().all(|&x| x == 0) {
        return 0;
    }
    *tags
        .iter()
        .find(|&&t| got[..] == pattern(block, t)[..])
        .unwrap_or_else(|| panic!("block {block} holds none of {tags:?}"))
}

async fn allocated(s: &Storage) -> u64 {
    s.list_pools().await.unwrap()[0].allocated_bytes
}

#[test]
fn a_snapshot_keeps_what_was_written_before_it_and_clones_are_independent() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let v = volume(&s, "db", 4 * MIB).await;
        // Extents 0, 1 and 2 written; 3 never.
        for e in 0..3 {
            write(&v, e * 256, 1).await;
            write(&v, e * 256 + 7, 1).await;
        }
        let info = s.create_snapshot(&n("db"), &n("s1")).await.unwrap();
        assert_eq!(info.source, Some(n("db")));
        assert_eq!(info.size_bytes, 4 * MIB);
        assert_eq!((info.exclusive_bytes, info.shared_bytes), (0, 3 * MIB));
        assert_eq!(
            v.allocated_bytes(),
            0,
            "the volume's extents moved to the snapshot"
        );
        assert_eq!(allocated(&s).await, 3 * MIB);
        let st = s.get_volume(&n("db")).await.unwrap();
        assert_eq!((st.allocated_bytes, st.shared_bytes), (0, 3 * MIB));

        // The volume writes over extent 0: it copies it once, the snapshot keeps the old.
        write(&v, 0, 2).await;
        assert_eq!(tag_of(&v, 0, &[1, 2]).await, 2);
        assert_eq!(
            tag_of(&v, 7, &[1, 2]).await,
            1,
            "the rest of the copied extent"
        );
        assert_eq!(
            tag_of(&v, 256, &[1, 2]).await,
            1,
            "read through to the snapshot"
        );
        assert_eq!(v.allocated_bytes(), MIB);
        // A second write to the same extent copies nothing.
        write(&v, 8, 2).await;
        assert_eq!(v.allocated_bytes(), MIB);
        let info = s.get_snapshot(&n("s1")).unwrap();
        assert_eq!((info.exclusive_bytes, info.shared_bytes), (MIB, 2 * MIB));
        let st = s.get_volume(&n("db")).await.unwrap();
        assert_eq!((st.allocated_bytes, st.shared_bytes), (MIB, 2 * MIB));

        // A clone reads the snapshot, not the volume, and its writes stay its own.
        s.clone_snapshot(&n("s1"), &n("copy"), 0).await.unwrap();
        let c = s.replica(&n("copy")).unwrap();
        assert_eq!(c.allocated_bytes(), 0, "thin");
        assert_eq!(tag_of(&c, 0, &[1, 2]).await, 1);
        write(&c, 256, 3).await;
        assert_eq!(tag_of(&c, 256, &[1, 3]).await, 3);
        assert_eq!(tag_of(&v, 256, &[1, 3]).await, 1, "the source is untouched");
        // A discard of a whole shared extent reads zeros in the clone only.
        c.discard(512 * 4096, MIB).await.unwrap();
        assert_eq!(tag_of(&c, 512, &[1]).await, 0);
        assert_eq!(tag_of(&v, 512, &[1]).await, 1);

        // Deleting the snapshot that both are based on frees nothing they read: it is kept
        // (unlisted) for them, its name free again.
        let before = allocated(&s).await;
        s.delete_snapshot(&n("s1")).await.unwrap();
        assert!(s.list_snapshots().is_empty());
        assert_eq!(allocated(&s).await, before);
        assert_eq!(tag_of(&v, 7, &[1, 2]).await, 1);
        assert_eq!(tag_of(&c, 7, &[1, 2]).await, 1);
        // Once the clone goes, the kept snapshot merges into the volume: what the volume
        // overwrote is freed, the rest becomes the volume's.
        drop(c);
        s.delete_volume(&n("copy")).await.unwrap();
        assert_eq!(allocated(&s).await, 3 * MIB);
        assert_eq!(v.allocated_bytes(), 3 * MIB);
        assert_eq!(tag_of(&v, 256, &[1]).await, 1);
        // And all of that survives a reopen.
        s.close().await.unwrap();
        drop(v);
        drop(s);
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let v = s.replica(&n("db")).unwrap();
        assert_eq!(tag_of(&v, 0, &[1, 2]).await, 2);
        assert_eq!(tag_of(&v, 7, &[1, 2]).await, 1);
        assert_eq!(tag_of(&v, 512, &[1]).await, 1);
        assert_eq!(allocated(&s).await, v.allocated_bytes());
    });
}

#[test]
fn seventy_snapshots_each_keep_their_blocks_and_deletes_free_exactly_what_only_they_held() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 256 * MIB, EngineKind::Auto).await;
        let v = volume(&s, "db", 4 * MIB).await;
        // Before snapshot k, block k of extent k % 4 is written with tag k + 1.
        for k in 0..70u64 {
            write(&v, (k % 4) * 256 + k, k + 1).await;
            s.create_snapshot(&n("db"), &n(&format!("s{k}")))
                .await
                .unwrap();
        }
        assert_eq!(s.list_snapshots().len(), 70);
        let tags: Vec<u64> = (0..=70).collect();
        // Snapshot k holds every block written before it, and none after.
        for k in [0u64, 1, 33, 69] {
            s.clone_snapshot(&n(&format!("s{k}")), &n("check"), 0)
                .await
                .unwrap();
            let c = s.replica(&n("check")).unwrap();
            for j in 0..70u64 {
                let want = if j <= k { j + 1 } else { 0 };
                assert_eq!(
                    tag_of(&c, (j % 4) * 256 + j, &tags).await,
                    want,
                    "snapshot {k}, block of step {j}"
                );
            }
            drop(c);
            s.delete_volume(&n("check")).await.unwrap();
        }
        // Each snapshot after the first four holds one extent of its own: the copy its
        // volume made of the extent written before it.
        let total: u64 = s
            .list_snapshots()
            .iter()
            .map(|i| i.exclusive_bytes + i.shared_bytes)
            .sum();
        assert_eq!(total, allocated(&s).await);
        // Delete them in a scattered order; the volume reads the same throughout, and at the
        // end the pool holds exactly its four extents.
        let mut order: Vec<u64> = (0..70).collect();
        order.sort_by_key(|k| (k * 37) % 70);
        for (i, k) in order.iter().enumerate() {
            s.delete_snapshot(&n(&format!("s{k}"))).await.unwrap();
            if i % 10 == 0 {
                for j in 0..70u64 {
                    assert_eq!(tag_of(&v, (j % 4) * 256 + j, &tags).await, j + 1);
                }
            }
        }
        assert!(s.list_snapshots().is_empty());
        assert_eq!(v.allocated_bytes(), 4 * MIB);
        assert_eq!(allocated(&s).await, 4 * MIB);
        for j in 0..70u64 {
            assert_eq!(tag_of(&v, (j % 4) * 256 + j, &tags).await, j + 1);
        }
    });
}

#[test]
fn a_volume_reverts_to_its_snapshot_and_callers_get_clear_errors() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let v = volume(&s, "db", 4 * MIB).await;
        let _other = volume(&s, "other", 4 * MIB).await;
        write(&v, 0, 1).await;
        s.create_snapshot(&n("db"), &n("s1")).await.unwrap();
        write(&v, 0, 2).await;
        write(&v, 300, 2).await;
        s.revert_volume(&n("db"), &n("s1")).await.unwrap();
        assert_eq!(tag_of(&v, 0, &[1, 2]).await, 1);
        assert_eq!(tag_of(&v, 300, &[2]).await, 0);
        assert_eq!(v.allocated_bytes(), 0, "what it wrote since is freed");
        assert_eq!(allocated(&s).await, MIB);

        // Idempotent by name and source; the name of another volume's snapshot conflicts.
        assert_eq!(
            s.create_snapshot(&n("db"), &n("s1")).await.unwrap().name,
            n("s1")
        );
        let e = s.create_snapshot(&n("other"), &n("s1")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        let e = s.create_snapshot(&n("nope"), &n("s2")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let e = s.delete_snapshot(&n("nope")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.message().contains("snapshot list"), "{e}");
        let e = s.revert_volume(&n("other"), &n("s1")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        let e = s
            .clone_snapshot(&n("s1"), &n("small"), MIB)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        // A clone larger than its snapshot reads zeros past the snapshot's end.
        s.clone_snapshot(&n("s1"), &n("big"), 8 * MIB)
            .await
            .unwrap();
        let b = s.replica(&n("big")).unwrap();
        assert_eq!(b.size(), 8 * MIB);
        assert_eq!(tag_of(&b, 0, &[1]).await, 1);
        assert_eq!(tag_of(&b, 1500, &[1]).await, 0);
        write(&b, 1500, 4).await;
        assert_eq!(tag_of(&b, 1500, &[4]).await, 4);
        // The same clone again is answered with it; another one under its name conflicts.
        s.clone_snapshot(&n("s1"), &n("big"), 8 * MIB)
            .await
            .unwrap();
        let e = s.clone_snapshot(&n("s1"), &n("db"), 0).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    });
}

#[test]
fn a_volume_cloned_from_a_volume_is_independent_and_its_hidden_base_goes_with_it() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let v = volume(&s, "db", 4 * MIB).await;
        write(&v, 0, 1).await;
        write(&v, 300, 1).await;
        s.clone_volume(&n("db"), &n("copy"), 0).await.unwrap();
        assert!(s.list_snapshots().is_empty(), "its base is not listed");
        let c = s.replica(&n("copy")).unwrap();
        write(&v, 0, 2).await;
        write(&c, 300, 3).await;
        assert_eq!(tag_of(&c, 0, &[1, 2]).await, 1);
        assert_eq!(tag_of(&v, 300, &[1, 3]).await, 1);
        // Idempotent; another volume's name conflicts; smaller is refused.
        s.clone_volume(&n("db"), &n("copy"), 0).await.unwrap();
        let e = s.clone_volume(&n("db"), &n("db"), 0).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        let e = s.clone_volume(&n("db"), &n("x"), MIB).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        // Once the clone goes, its base merges into the volume: only the volume's extents
        // stay allocated.
        drop(c);
        s.delete_volume(&n("copy")).await.unwrap();
        assert_eq!(allocated(&s).await, v.allocated_bytes());
        assert_eq!(v.allocated_bytes(), 2 * MIB);
        assert_eq!(tag_of(&v, 0, &[2]).await, 2);
        assert_eq!(tag_of(&v, 300, &[1]).await, 1);
    });
}

/// A volume's chain, as a new replica is seeded from it: its snapshots oldest first, what
/// each maps itself with its generations, the data of each as it was taken (unwritten blocks
/// zeros), and a refusal once the chain changed.
#[test]
fn a_volume_chain_lists_each_snapshot_with_its_own_extents_and_data() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let v = volume(&s, "db", 4 * MIB).await;
        assert!(v.chain().links.is_empty());
        write(&v, 0, 1).await; // extent 0
        write(&v, 256 + 3, 1).await; // extent 1
        s.create_snapshot(&n("db"), &n("s1")).await.unwrap();
        write(&v, 256 + 3, 2).await; // extent 1 again
        write(&v, 2 * 256, 2).await; // extent 2
        s.create_snapshot(&n("db"), &n("s2")).await.unwrap();
        write(&v, 0, 3).await;

        let chain = v.chain();
        let names: Vec<_> = chain.links.iter().map(|l| l.name.clone()).collect();
        assert_eq!(names, [Some(n("s1")), Some(n("s2"))]);
        assert!(chain.links.iter().all(|l| l.of_volume && l.size == 4 * MIB));
        let own = |i: usize| -> Vec<u64> { chain.links[i].own.iter().map(|e| e.0).collect() };
        assert_eq!(own(0), [0, 1]);
        assert_eq!(own(1), [1, 2]);
        // Generations grow along the chain: s2's extent 1 is newer than s1's.
        assert!(chain.links[1].own[0].1 > chain.links[0].own[1].1);

        // s1's extent 1 holds tag 1 at block 3 and zeros elsewhere; s2's holds tag 2.
        for (link, tag) in [(0, 1), (1, 2)] {
            let data = v.read_link(chain.epoch, link, 1).await.unwrap();
            assert_eq!(data.len() as u64, MIB);
            assert_eq!(&data[3 * 4096..4 * 4096], &pattern(256 + 3, tag)[..]);
            assert!(data[..3 * 4096].iter().all(|&b| b == 0));
        }
        // Not an extent the link maps itself.
        assert!(v.read_link(chain.epoch, 1, 0).await.is_err());

        // Deleting s1 merges it into s2: the chain changed, the old epoch reads nothing.
        s.delete_snapshot(&n("s1")).await.unwrap();
        let err = v.read_link(chain.epoch, 1, 1).await.unwrap_err();
        assert!(err.message.contains("changed"), "{err}");
        let chain = v.chain();
        assert_eq!(chain.links.len(), 1);
        let data = v.read_link(chain.epoch, 0, 0).await.unwrap();
        assert_eq!(&data[..4096], &pattern(0, 1)[..]);

        // A clone's chain holds the source's snapshot, not as one of its own.
        let c = s.clone_snapshot(&n("s2"), &n("copy"), 0).await.unwrap();
        assert_eq!(c.name, n("copy"));
        let copy = s.replica(&n("copy")).unwrap();
        let links = copy.chain().links;
        assert_eq!(links.len(), 1);
        assert!(!links[0].of_volume);
    });
}
