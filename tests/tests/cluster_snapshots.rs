//! Snapshots and clones of a three-replica volume on a real three-node cluster over a real
//! etcd, through the real attach path (FUSE file + loop device):
//!
//! - four writers on node A write numbered blocks, each synced before the writer's next, while
//!   node B (which does not hold the volume) takes a snapshot: node A takes it under its write
//!   barrier. The snapshot is exactly the volume after one write of each writer's sequence,
//!   no earlier than its last write acknowledged before the request and no later than the one
//!   in flight when it returned;
//! - a clone of it made through node C holds exactly that state in each of its three copies
//!   (attached in turn on each node, which reads its own copy), and writes to the clone leave
//!   the source alone;
//! - a copy of the attached source, asked of node C, holds the source as it is;
//! - revert is refused while attached, then (asked of node B, once detached) brings the
//!   source back to the snapshot on every replica;
//! - deleting everything leaves no snapshot and no allocated byte on any node.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::cluster::{
    attach, create_volume, node_dirs, nodes, nodes_with, pattern, pread_direct, pwrite_direct,
    read_direct, replica, replica_state, replica_states, start, start_with, three_nodes, wait_for,
    write_direct, Cleanup, MIB,
};
use integration_tests::etcd::Etcd;
use integration_tests::Daemon;

const BLOCK: usize = 4096;
/// Writers at once, each writing its own slots in turn.
const WRITERS: u64 = 4;
/// Slots of each writer.
const PER_WRITER: u64 = 16;
/// Slots in all, 256 KiB apart (64 over 16 MiB: sixteen 1 MiB extents).
const SLOTS: u64 = WRITERS * PER_WRITER;
const STRIDE: u64 = 256 << 10;

/// The slot of writer `w`'s write `i`.
fn slot(w: u64, i: u64) -> u64 {
    w + WRITERS * (i % PER_WRITER)
}

/// Writer `w`'s write `i`: its writer, its number and a pattern of both.
fn block(w: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(&(i + 1).to_le_bytes());
    b[8..16].copy_from_slice(&w.to_le_bytes());
    for (n, byte) in b.iter_mut().enumerate().skip(16) {
        *byte = (i as u8).wrapping_mul(31) ^ (n as u8) ^ (w as u8) ^ 0x5a;
    }
    b
}

/// The number of the write slot `s` holds (`None`: never written), checking the whole block.
fn written(s: u64, data: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(data[..8].try_into().unwrap());
    if n == 0 {
        assert!(
            data.iter().all(|&b| b == 0),
            "slot {s}: a torn or foreign block"
        );
        return None;
    }
    let w = s % WRITERS;
    assert_eq!(data, block(w, n - 1), "slot {s}: write {} is torn", n - 1);
    assert_eq!(
        slot(w, n - 1),
        s,
        "write {} of writer {w} is misplaced",
        n - 1
    );
    Some(n - 1)
}

/// What the slots hold once writer `w` has made writes `0..=last[w]` (`None`: none).
fn state_after(last: &[Option<u64>]) -> Vec<Option<u64>> {
    (0..SLOTS)
        .map(|s| {
            let (w, nth) = (s % WRITERS, s / WRITERS);
            match last[w as usize] {
                Some(k) if k >= nth => Some(k - (k - nth) % PER_WRITER),
                _ => None,
            }
        })
        .collect()
}

fn read_state(dev: &Path) -> Vec<Option<u64>> {
    (0..SLOTS)
        .map(|s| written(s, &pread_direct(dev, s * STRIDE, BLOCK)))
        .collect()
}

/// The last write of each writer a state holds.
fn last_writes(state: &[Option<u64>]) -> Vec<Option<u64>> {
    (0..WRITERS)
        .map(|w| {
            state
                .iter()
                .skip(w as usize)
                .step_by(WRITERS as usize)
                .flatten()
                .max()
                .copied()
        })
        .collect()
}

/// The device reads exactly the state after each writer's writes up to `last`.
#[track_caller]
fn assert_state(dev: &Path, last: &[Option<u64>], what: &str) {
    assert_eq!(read_state(dev), state_after(last), "{what}");
}

/// No node had to reconcile `volume`'s replicas at an attach: they were equal.
#[track_caller]
fn assert_no_reconcile(nodes: &[&Daemon], volume: &str) {
    for d in nodes {
        let log = d.log();
        let differed: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("reconciled extents where replicas differed")
                    && l.contains(&format!("volume={volume} "))
            })
            .collect();
        assert!(
            differed.is_empty(),
            "the copies of {volume} differed: {differed:?}"
        );
    }
}

fn detach(d: &Daemon, name: &str) {
    d.cli(["volume", "detach", name]).success();
}

#[test]
fn a_snapshot_of_a_replicated_volume_under_writes_is_one_point_of_its_history() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["svol", "sclone", "vcopy", "sone"]);
    let [a, b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "svol");
    let dev = attach(&a, "svol");

    // The writers: writer w's write i goes to slot(w, i) and is synced before its write
    // i + 1 starts.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, stop, dev) = (Arc::clone(&acked), Arc::clone(&stop), dev.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    pwrite_direct(Path::new(&dev), slot(w, i) * STRIDE, &block(w, i));
                    i += 1;
                    acked[w as usize].store(i, Ordering::SeqCst);
                }
                i
            })
        })
        .collect();
    let counts = |acked: &[AtomicU64]| -> Vec<u64> {
        acked.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    };
    wait_for("the writers to get going", Duration::from_secs(30), || {
        counts(&acked).iter().all(|&n| n >= 2 * PER_WRITER)
    });
    // Asked of node B; node A holds the volume and takes it.
    let before = counts(&acked);
    let snap = b.cli(["snapshot", "create", "svol", "s1", "-o", "json"]);
    let after = counts(&acked);
    snap.success();
    assert_eq!(snap.json()["replicas"], 3, "{}", snap.json());
    assert_eq!(snap.json()["source_volume"], "svol", "{}", snap.json());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let totals: Vec<u64> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    for w in 0..WRITERS as usize {
        assert!(
            totals[w] > after[w],
            "writer {w} stopped before the snapshot"
        );
    }
    assert!(
        a.log().contains("writes paused for the snapshot"),
        "node A did not take the snapshot"
    );
    let source_now: Vec<Option<u64>> = totals.iter().map(|&n| Some(n - 1)).collect();
    assert_state(Path::new(&dev), &source_now, "the source after the writers");

    // A clone, made through node C, on the nodes that hold the snapshot.
    c.cli(["volume", "create", "sclone", "--from-snapshot", "s1"])
        .success();
    let mut at: Option<Vec<Option<u64>>> = None;
    for (d, node) in [(&c, "node-c"), (&a, "node-a"), (&b, "node-b")] {
        // Attached on each node in turn, it reads that node's copy.
        let clone = attach(d, "sclone");
        let state = read_state(Path::new(&clone));
        let last = last_writes(&state);
        assert_eq!(
            state,
            state_after(&last),
            "the copy on {node} is not one point of each writer's history"
        );
        for w in 0..WRITERS as usize {
            let k = last[w].expect("the snapshot holds writes of every writer");
            assert!(
                k + 1 >= before[w] && k <= after[w],
                "the snapshot holds writer {w}'s writes 0..={k}; {} were acknowledged before it was asked and {} when it returned",
                before[w],
                after[w]
            );
        }
        if let Some(first) = &at {
            assert_eq!(&last, first, "the copy on {node} differs from the others");
        }
        at = Some(last);
        detach(d, "sclone");
    }
    // The copies were equal as taken: the clone's first attachment had nothing to reconcile
    // (which would have hidden a difference by copying the newest extents over the others).
    assert_no_reconcile(&[&a, &b, &c], "sclone");
    let k = at.unwrap();
    eprintln!("snapshot at writes {k:?}: {before:?} acknowledged before, {after:?} after");

    // A clone with fewer replicas than the snapshot has copies: on as many of its holders.
    c.cli([
        "volume",
        "create",
        "sone",
        "--from-snapshot",
        "s1",
        "--replicas",
        "1",
    ])
    .success();
    let placed = replica_states(&c, "sone");
    assert_eq!(placed.len(), 1, "{placed:?}");
    let one = attach(&b, "sone");
    assert_state(Path::new(&one), &k, "a one-replica clone");
    detach(&b, "sone");
    b.cli(["volume", "delete", "sone"]).success();
    c.cli([
        "volume",
        "create",
        "sfour",
        "--from-snapshot",
        "s1",
        "--replicas",
        "4",
    ])
    .expect_code(6)
    .stderr_has("at most 3");

    // Writes to the clone leave the source alone.
    let clone = attach(&b, "sclone");
    for s in 0..SLOTS {
        pwrite_direct(Path::new(&clone), s * STRIDE, &vec![0xee; BLOCK]);
    }
    assert_state(
        Path::new(&dev),
        &source_now,
        "the source after writes to its clone",
    );
    detach(&b, "sclone");

    // A copy of the attached source, asked of node C: node A holds its writes meanwhile.
    c.cli(["volume", "create", "vcopy", "--from-volume", "svol"])
        .success();
    let copy = attach(&b, "vcopy");
    assert_state(Path::new(&copy), &source_now, "the copy of the volume");
    detach(&b, "vcopy");

    // Revert: refused while attached; once detached, every replica reads the snapshot.
    b.cli(["volume", "revert", "svol", "--snapshot", "s1"])
        .expect_code(1)
        .stderr_has("detach it");
    detach(&a, "svol");
    b.cli(["volume", "revert", "svol", "--snapshot", "s1"])
        .success();
    for (d, node) in [(&b, "node-b"), (&c, "node-c"), (&a, "node-a")] {
        let dev = attach(d, "svol");
        assert_state(
            Path::new(&dev),
            &k,
            &format!("the reverted source on {node}"),
        );
        detach(d, "svol");
    }
    assert_no_reconcile(&[&a, &b, &c], "svol");

    // Errors name the problem.
    c.cli(["snapshot", "create", "nope", "s2"])
        .expect_code(4)
        .stderr_has("volume nope not found");
    c.cli(["snapshot", "create", "sclone", "s1"])
        .expect_code(5)
        .stderr_has("already exists, of volume svol");

    // Everything deleted (the snapshot first, while a clone reads it): nothing is left.
    c.cli(["snapshot", "delete", "s1"]).success();
    let clone = attach(&c, "sclone");
    for s in 0..SLOTS {
        assert_eq!(
            pread_direct(Path::new(&clone), s * STRIDE, BLOCK),
            vec![0xee; BLOCK],
            "the clone after its snapshot was deleted, slot {s}"
        );
    }
    detach(&c, "sclone");
    for v in ["sclone", "vcopy", "svol"] {
        a.cli(["volume", "delete", v]).success();
    }
    for (d, node) in [(&a, "node-a"), (&b, "node-b"), (&c, "node-c")] {
        let snaps = d.cli(["snapshot", "list", "-o", "json"]);
        snaps.success();
        assert_eq!(snaps.json(), serde_json::json!([]), "on {node}");
        let pools = d.cli(["pool", "list", "-o", "json"]);
        pools.success();
        assert_eq!(
            pools.json()[0]["allocated_bytes"],
            0,
            "on {node}: {}",
            pools.json()
        );
    }
}

/// A node that is down while a snapshot it holds is deleted deletes its copy when it comes
/// back; a revert made while it is down marks its replica for a full rebuild, so the writes
/// it took after the snapshot do not survive as if unchanged.
#[test]
fn a_node_down_during_a_delete_and_a_revert_catches_up() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["dvol"]);
    let [a, b, mut c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "dvol");
    let dev = attach(&a, "dvol");
    let first = pattern(1, 0, 4 * MIB);
    write_direct(&dev, 0, &first).unwrap();
    for s in ["s0", "s1"] {
        b.cli(["snapshot", "create", "dvol", s]).success();
    }
    // Overwrites the same extents, on every replica.
    write_direct(&dev, 0, &pattern(2, 0, 4 * MIB)).unwrap();

    // C goes down for good (its lease expires): it holds s0, s1 and the overwrite.
    c.kill().unwrap();
    wait_for("node-c's lease to expire", Duration::from_secs(15), || {
        !nodes(&a).contains(&"node-c".to_owned())
    });
    write_direct(&dev, 4 * MIB, &pattern(3, 4 * MIB, MIB)).unwrap();
    let s2 = b.cli(["snapshot", "create", "dvol", "s2", "-o", "json"]);
    s2.success();
    assert_eq!(s2.json()["replicas"], 2, "C is down: {}", s2.json());

    // Deleted while C is down: gone from every listing, its name held until C deletes its copy.
    b.cli(["snapshot", "delete", "s0"]).success();
    let listed = a.cli(["snapshot", "list", "-o", "json"]);
    let names: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    a.cli(["snapshot", "create", "dvol", "s0"])
        .expect_code(5)
        .stderr_has("being deleted");

    // Revert to s1 with C down: A and B read the first data again.
    detach(&a, "dvol");
    b.cli(["volume", "revert", "dvol", "--snapshot", "s1"])
        .success();

    // C comes back: it deletes its copy of s0 (the name is free again), and its replica is
    // rebuilt in full once the volume is attached.
    c = start(&dirs[2], "node-c", "zone-c", &etcd);
    assert!(
        c.log().contains("deleted a snapshot snapshot=s0"),
        "node-c did not delete its copy of s0"
    );
    a.cli(["snapshot", "create", "dvol", "s0"]).success();
    a.cli(["snapshot", "delete", "s0"]).success();
    let dev = attach(&a, "dvol");
    wait_for("node-c to be rebuilt", Duration::from_secs(60), || {
        replica_state(&a, "dvol", "node-c") == "healthy"
    });
    let last = replica(&a, "dvol", "node-c")["last_rebuild"].clone();
    assert_eq!(last["kind"], "full", "{last}");
    assert!(
        read_direct(&dev, 0, 4 * MIB) == first,
        "the reverted volume does not read the snapshot's data"
    );
    detach(&a, "dvol");
    // C's own replica (attached there, it reads it) holds the reverted data, not the
    // overwrite it took before it went down.
    let dev_c = attach(&c, "dvol");
    assert!(
        read_direct(&dev_c, 0, 4 * MIB) == first,
        "node-c's replica kept the overwrite it took before the snapshot it was reverted to"
    );
    assert!(
        read_direct(&dev_c, 4 * MIB, MIB).iter().all(|&b| b == 0),
        "node-c's replica holds data written after the snapshot"
    );
    detach(&c, "dvol");
}

/// A replica that replaces one of a node gone for good receives the volume's snapshots
/// before its rebuild, which is then a delta from the newest one: every copy it got reads as
/// the snapshot did, and clones can be made on it.
#[test]
fn a_replacement_replica_receives_the_snapshots_and_its_rebuild_is_a_delta() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["pvol", "pc1", "pc2"]);
    let ids = ["node-a", "node-b", "node-c"];
    let mut up = nodes_with(&dirs, &etcd, &["--replace-after", "2"]);
    up[0]
        .cli([
            "volume",
            "create",
            "pvol",
            "--size",
            "64MiB",
            "--replicas",
            "2",
        ])
        .success();
    let placed: Vec<String> = replica_states(&up[0], "pvol")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let at = |id: &str| ids.iter().position(|i| *i == id).unwrap();
    let holder = at(&placed[0]);
    let victim = at(&placed[1]);
    let spare = 3 - holder - victim;
    let dev = attach(&up[holder], "pvol");
    // s1: 8 MiB of the first data; s2: 4 MiB of it overwritten; then 1 MiB more.
    let first = pattern(1, 0, 8 * MIB);
    write_direct(&dev, 0, &first).unwrap();
    up[spare]
        .cli(["snapshot", "create", "pvol", "s1"])
        .success();
    let second = pattern(2, 2 * MIB, 4 * MIB);
    write_direct(&dev, 2 * MIB, &second).unwrap();
    up[spare]
        .cli(["snapshot", "create", "pvol", "s2"])
        .success();
    let third = pattern(3, 20 * MIB, MIB);
    write_direct(&dev, 20 * MIB, &third).unwrap();

    // The victim goes for good; the spare replaces it.
    up[victim].kill().unwrap();
    let d = &up[holder];
    wait_for(
        "the replacement replica to be healthy",
        Duration::from_secs(60),
        || replica_state(d, "pvol", ids[spare]) == "healthy",
    );
    assert!(
        d.log()
            .contains("gave a replica the volume's snapshots it lacked volume=pvol"),
        "{}",
        d.log()
    );
    let last = replica(d, "pvol", ids[spare])["last_rebuild"].clone();
    assert_eq!(last["kind"], "delta", "{last}");
    assert_eq!(
        last["done_bytes"].as_u64().unwrap(),
        MIB as u64,
        "the rebuild after the snapshots copies only what was written since: {last}"
    );

    // The gone node is no longer recorded as a holder: the copies are the holder's and the
    // spare's.
    for snapshot in ["s1", "s2"] {
        let info = up[holder].cli(["snapshot", "inspect", snapshot, "-o", "json"]);
        assert_eq!(info.json()["replicas"], 2, "{}", info.json());
    }

    // Each snapshot's copy on the spare reads as the snapshot: a clone of it on the holder
    // and the spare, attached on the spare (which reads its own copy).
    let mut expect_s2 = first.clone();
    expect_s2[2 * MIB..6 * MIB].copy_from_slice(&second);
    for (snapshot, clone, expect) in [("s1", "pc1", &first), ("s2", "pc2", &expect_s2)] {
        up[holder]
            .cli(["volume", "create", clone, "--from-snapshot", snapshot])
            .success();
        let holders: Vec<String> = replica_states(&up[holder], clone)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(holders.contains(&ids[spare].to_owned()), "{holders:?}");
        let dev_c = attach(&up[spare], clone);
        assert!(
            read_direct(&dev_c, 0, 8 * MIB) == *expect,
            "the spare's copy of {snapshot} differs from the snapshot"
        );
        detach(&up[spare], clone);
        up[holder].cli(["volume", "delete", clone]).success();
    }
    let alive: Vec<&Daemon> = up
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, d)| d)
        .collect();
    assert_no_reconcile(&alive, "pc1");
    assert_no_reconcile(&alive, "pc2");

    // The volume on the spare alone: everything.
    detach(&up[holder], "pvol");
    let dev_s = attach(&up[spare], "pvol");
    assert!(read_direct(&dev_s, 0, 8 * MIB) == expect_s2);
    assert!(read_direct(&dev_s, 20 * MIB, MIB) == third);
    detach(&up[spare], "pvol");

    // The gone node comes back: its copies of the snapshots are garbage now, and go.
    let back = start_with(&dirs[victim], victim, &etcd, &["--replace-after", "2"]);
    for snapshot in ["s1", "s2"] {
        assert!(
            back.log()
                .contains(&format!("deleted a snapshot snapshot={snapshot} ")),
            "{}",
            back.log()
        );
    }
    let pools = back.cli(["pool", "list", "-o", "json"]);
    assert_eq!(pools.json()[0]["allocated_bytes"], 0, "{}", pools.json());
    drop(back);
    up.clear();
}

/// A replica that comes back receives the snapshots taken while it was out, each brought
/// over as a delta from what it held, and its rebuild after them is a delta from the newest.
#[test]
fn a_returning_replica_receives_the_snapshots_taken_while_it_was_out() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["rvol", "rc1", "rc2"]);
    let [a, b, mut c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "rvol");
    let dev = attach(&a, "rvol");
    let first = pattern(1, 0, 8 * MIB);
    write_direct(&dev, 0, &first).unwrap();
    b.cli(["snapshot", "create", "rvol", "s1"]).success();

    // C goes down; s2 is taken without it.
    c.kill().unwrap();
    let second = pattern(2, 2 * MIB, 4 * MIB);
    write_direct(&dev, 2 * MIB, &second).unwrap();
    wait_for("node-c to be ejected", Duration::from_secs(30), || {
        replica_state(&a, "rvol", "node-c") == "ejected"
    });
    let s2 = b.cli(["snapshot", "create", "rvol", "s2", "-o", "json"]);
    s2.success();
    assert_eq!(s2.json()["replicas"], 2, "{}", s2.json());
    let third = pattern(3, 20 * MIB, MIB);
    write_direct(&dev, 20 * MIB, &third).unwrap();

    // C comes back: it gets s2, then the 1 MiB written since.
    c = start(&dirs[2], "node-c", "zone-c", &etcd);
    wait_for("node-c to be rebuilt", Duration::from_secs(60), || {
        replica_state(&a, "rvol", "node-c") == "healthy"
    });
    assert!(
        a.log()
            .contains("gave a replica the volume's snapshots it lacked volume=rvol replica=node-c snapshots=[\"s2\"]"),
        "{}",
        a.log()
    );
    let last = replica(&a, "rvol", "node-c")["last_rebuild"].clone();
    assert_eq!(last["kind"], "delta", "{last}");
    assert_eq!(last["done_bytes"].as_u64().unwrap(), MIB as u64, "{last}");
    let s2 = c.cli(["snapshot", "inspect", "s2", "-o", "json"]);
    assert_eq!(s2.json()["replicas"], 3, "{}", s2.json());

    // C's copies read as the snapshots did.
    let mut expect_s2 = first.clone();
    expect_s2[2 * MIB..6 * MIB].copy_from_slice(&second);
    for (snapshot, clone, expect) in [("s1", "rc1", &first), ("s2", "rc2", &expect_s2)] {
        a.cli(["volume", "create", clone, "--from-snapshot", snapshot])
            .success();
        let dev_c = attach(&c, clone);
        assert!(
            read_direct(&dev_c, 0, 8 * MIB) == *expect,
            "node-c's copy of {snapshot} differs from the snapshot"
        );
        detach(&c, clone);
    }
    assert_no_reconcile(&[&a, &b, &c], "rc1");
    assert_no_reconcile(&[&a, &b, &c], "rc2");
    detach(&a, "rvol");
    let dev_c = attach(&c, "rvol");
    assert!(read_direct(&dev_c, 0, 8 * MIB) == expect_s2);
    assert!(read_direct(&dev_c, 20 * MIB, MIB) == third);
    detach(&c, "rvol");
}

/// A replica can lack a snapshot older than what it holds: one taken while it was being
/// rebuilt. When it next comes back, it is given that snapshot as the snapshot was, not with
/// the writes it took after it.
#[test]
fn a_replica_is_given_a_snapshot_older_than_what_it_holds_as_it_was() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["ovol", "oc"]);
    // Rebuilds at 1 MiB/s: long enough to take a snapshot during one.
    let extra = ["--rebuild-rate", "1"];
    let mut up = nodes_with(&dirs, &etcd, &extra);
    create_volume(&up[0], "ovol");
    let dev = attach(&up[0], "ovol");
    write_direct(&dev, 0, &pattern(1, 0, 8 * MIB)).unwrap();

    // C misses the second data, and s2 is taken while it is rebuilt.
    up[2].kill().unwrap();
    let second = pattern(2, 0, 8 * MIB);
    write_direct(&dev, 0, &second).unwrap();
    wait_for("node-c to be ejected", Duration::from_secs(30), || {
        replica_state(&up[0], "ovol", "node-c") == "ejected"
    });
    up[2] = start_with(&dirs[2], 2, &etcd, &extra);
    wait_for("node-c to be rebuilding", Duration::from_secs(30), || {
        replica_state(&up[0], "ovol", "node-c") == "rebuilding"
    });
    let s2 = up[1].cli(["snapshot", "create", "ovol", "s2", "-o", "json"]);
    s2.success();
    assert_eq!(s2.json()["replicas"], 2, "{}", s2.json());
    wait_for("node-c to be healthy", Duration::from_secs(60), || {
        replica_state(&up[0], "ovol", "node-c") == "healthy"
    });

    // C takes the third data, then goes down again and comes back. (Synced writes elsewhere
    // first, so C's pool closes those extents with their generations known: a kill leaves
    // the extents still open with generations unknown, which any rebuild copies.)
    write_direct(&dev, 0, &pattern(3, 0, 8 * MIB)).unwrap();
    for i in 0..16 {
        write_direct(&dev, 32 * MIB, &pattern(5 + i, 32 * MIB, 4096)).unwrap();
    }
    up[2].kill().unwrap();
    write_direct(&dev, 16 * MIB, &pattern(4, 16 * MIB, MIB)).unwrap();
    wait_for("node-c to be ejected", Duration::from_secs(30), || {
        replica_state(&up[0], "ovol", "node-c") == "ejected"
    });
    up[2] = start_with(&dirs[2], 2, &etcd, &extra);
    wait_for("node-c to be healthy", Duration::from_secs(60), || {
        replica_state(&up[0], "ovol", "node-c") == "healthy"
    });
    let info = up[1].cli(["snapshot", "inspect", "s2", "-o", "json"]);
    assert_eq!(info.json()["replicas"], 3, "{}", info.json());

    // C's copy of s2 (a clone attached there reads it) holds the second data, not the third.
    up[0]
        .cli(["volume", "create", "oc", "--from-snapshot", "s2"])
        .success();
    let dev_c = attach(&up[2], "oc");
    assert!(
        read_direct(&dev_c, 0, 8 * MIB) == second,
        "node-c's copy of s2 holds writes taken after it"
    );
    detach(&up[2], "oc");
    assert_no_reconcile(&up.iter().collect::<Vec<_>>(), "oc");
    detach(&up[0], "ovol");
}
