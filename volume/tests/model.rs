//! Model-based test: random sequences of writes, FUA writes, reads, discards, write-zeroes,
//! flushes, snapshots, snapshot deletes, reverts, clean reopens and crash-style reopens,
//! checked against an in-memory model. Every live snapshot is checked (through a clone) after
//! every reopen and at the end, and once all are deleted the pool holds exactly the volume's
//! extents again.
//!
//! A "crash" reopen drops the storage without closing it: writes since the last flush may be
//! lost, exactly as on a disk with a volatile cache, so after it each block must hold one of
//! the values it could legitimately have (its value at the last flush or FUA, or any value
//! written since), and never anything else. The separate `crash` test does the same with real
//! SIGKILLs.

mod common;

use std::collections::BTreeMap;

use api::{VolumeControl, VolumeName};
use common::{open, tempdir, volume};
use proptest::prelude::*;
use volume::device::{BlockDevice, WriteFlags};
use volume::io::{EngineKind, IoBuf};

const BLOCKS: u64 = 1024; // 4 MiB volume: 4 extents
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        count: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        block: u64,
        count: u64,
    },
    Discard {
        block: u64,
        count: u64,
    },
    WriteZeroes {
        block: u64,
        count: u64,
    },
    Flush,
    Reopen {
        clean: bool,
    },
    Snapshot,
    DeleteSnapshot(usize),
    Revert(usize),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(64))),
        // Whole extents, to exercise freeing.
        (0..4u64).prop_map(|e| (e * 256, 256)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>(), any::<bool>()).prop_map(|((block, count), seed, fua)| Op::Write { block, count, seed, fua: fua && seed % 4 == 0 }),
        4 => range().prop_map(|(block, count)| Op::Read { block, count }),
        2 => range().prop_map(|(block, count)| Op::Discard { block, count }),
        1 => range().prop_map(|(block, count)| Op::WriteZeroes { block, count }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::DeleteSnapshot),
        1 => any::<usize>().prop_map(Op::Revert),
    ]
}

fn block_data(block: u64, seed: u8) -> Vec<u8> {
    let mut v = vec![seed; 4096];
    v[..8].copy_from_slice(&block.to_le_bytes());
    v
}

/// Every block of `model` as the volume should read it.
fn expected(model: &BTreeMap<u64, u8>) -> Vec<u8> {
    (0..BLOCKS)
        .flat_map(|b| {
            model
                .get(&b)
                .map_or_else(|| vec![0; 4096], |&seed| block_data(b, seed))
        })
        .collect()
}

/// Check every snapshot in `snaps` against its model, through a clone of it.
async fn check_snapshots(s: &volume::pool::Storage, snaps: &[(VolumeName, BTreeMap<u64, u8>)]) {
    let clone = VolumeName::new("check").unwrap();
    for (name, model) in snaps {
        s.clone_snapshot(name, &clone, 0).await.unwrap();
        let c = s.replica(&clone).unwrap();
        let got = c
            .read(0, IoBuf::zeroed((BLOCKS * 4096) as usize))
            .await
            .unwrap();
        let want = expected(model);
        for b in 0..BLOCKS as usize {
            assert!(
                got[b * 4096..(b + 1) * 4096] == want[b * 4096..(b + 1) * 4096],
                "snapshot {name}: block {b} differs from the model"
            );
        }
        drop(c);
        s.delete_volume(&clone).await.unwrap();
    }
}

async fn run(ops: Vec<Op>) {
    let dir = tempdir();
    let path = dir.path().join("pool");
    let name = VolumeName::new("m").unwrap();
    let mut s = open(&path, 64 * MIB, EngineKind::Auto).await;
    let mut r = volume(&s, "m", BLOCKS * 4096).await;
    let mut model: BTreeMap<u64, u8> = BTreeMap::new();
    // Live snapshots and what each holds.
    let mut snaps: Vec<(VolumeName, BTreeMap<u64, u8>)> = Vec::new();
    let mut taken = 0;
    // Per block, the values a crash may leave (None = zeros). Absent = only the model value.
    let mut candidates: BTreeMap<u64, Vec<Option<u8>>> = BTreeMap::new();
    let remember =
        |candidates: &mut BTreeMap<u64, Vec<Option<u8>>>, model: &BTreeMap<u64, u8>, b: u64| {
            candidates
                .entry(b)
                .or_insert_with(|| vec![model.get(&b).copied()]);
        };
    for op in ops {
        match op {
            Op::Write {
                block,
                count,
                seed,
                fua,
            } => {
                let data: Vec<u8> = (block..block + count)
                    .flat_map(|b| block_data(b, seed))
                    .collect();
                r.write(
                    block * 4096,
                    IoBuf::from_slice(&data),
                    WriteFlags {
                        fua,
                        ..WriteFlags::default()
                    },
                )
                .await
                .unwrap();
                for b in block..block + count {
                    if fua {
                        candidates.insert(b, vec![Some(seed)]);
                    } else {
                        remember(&mut candidates, &model, b);
                        candidates.get_mut(&b).unwrap().push(Some(seed));
                    }
                    model.insert(b, seed);
                }
            }
            Op::Read { block, count } => {
                let got = r
                    .read(block * 4096, IoBuf::zeroed(count as usize * 4096))
                    .await
                    .unwrap();
                for b in block..block + count {
                    let want = model
                        .get(&b)
                        .map_or_else(|| vec![0; 4096], |&seed| block_data(b, seed));
                    let at = ((b - block) * 4096) as usize;
                    assert!(
                        got[at..at + 4096] == want[..],
                        "block {b} differs from the model"
                    );
                }
            }
            Op::Discard { block, count } | Op::WriteZeroes { block, count } => {
                if matches!(op, Op::Discard { .. }) {
                    r.discard(block * 4096, count * 4096).await.unwrap();
                } else {
                    r.write_zeroes(block * 4096, count * 4096).await.unwrap();
                }
                for b in block..block + count {
                    remember(&mut candidates, &model, b);
                    candidates.get_mut(&b).unwrap().push(None);
                    model.remove(&b);
                }
            }
            Op::Flush => {
                r.flush().await.unwrap();
                candidates.clear();
            }
            Op::Snapshot => {
                taken += 1;
                let snap = VolumeName::new(&format!("s{taken}")).unwrap();
                s.create_snapshot(&name, &snap).await.unwrap();
                // Taken at a barrier and made durable with every write before it.
                candidates.clear();
                snaps.push((snap, model.clone()));
            }
            Op::DeleteSnapshot(k) => {
                if !snaps.is_empty() {
                    let (snap, _) = snaps.remove(k % snaps.len());
                    s.delete_snapshot(&snap).await.unwrap();
                }
            }
            Op::Revert(k) => {
                if !snaps.is_empty() {
                    let (snap, held) = &snaps[k % snaps.len()];
                    s.revert_volume(&name, snap).await.unwrap();
                    model.clone_from(held);
                    candidates.clear();
                }
            }
            Op::Reopen { clean } => {
                if clean {
                    s.close().await.unwrap();
                }
                drop(r);
                drop(s);
                s = open(&path, 64 * MIB, EngineKind::Auto).await;
                r = s.replica(&name).unwrap();
                check_snapshots(&s, &snaps).await;
                if clean {
                    candidates.clear();
                } else {
                    let got = r
                        .read(0, IoBuf::zeroed((BLOCKS * 4096) as usize))
                        .await
                        .unwrap();
                    for (b, allowed) in std::mem::take(&mut candidates) {
                        let data = &got[(b * 4096) as usize..((b + 1) * 4096) as usize];
                        let seen = allowed.iter().find(|v| match v {
                            None => data.iter().all(|&x| x == 0),
                            Some(seed) => data == block_data(b, *seed).as_slice(),
                        });
                        let seen = seen.unwrap_or_else(|| {
                            panic!("block {b} after a crash holds none of {allowed:?}")
                        });
                        match seen {
                            None => model.remove(&b),
                            Some(seed) => model.insert(b, *seed),
                        };
                    }
                }
            }
        }
        // Accounting is exact: allocated extents are exactly those holding live blocks, or
        // partially zeroed ones that were allocated before, and what snapshots hold.
        let pools = s.list_pools().await.unwrap();
        let listed: u64 = s
            .list_snapshots()
            .iter()
            .map(|i| i.exclusive_bytes + i.shared_bytes)
            .sum();
        assert_eq!(s.list_snapshots().len(), snaps.len());
        // (A deleted snapshot that two records are based on is kept, unlisted.)
        assert!(pools[0].allocated_bytes >= r.allocated_bytes() + listed);
        assert_eq!(
            pools[0].allocated_bytes + pools[0].free_bytes,
            pools[0].capacity_bytes
        );
        // Each logical extent with data is backed by a physical extent of its own, the
        // volume's or a snapshot's (possibly a deleted one kept for two records).
        let with_data = (0..4u64)
            .filter(|e| (e * 256..(e + 1) * 256).any(|b| model.contains_key(&b)))
            .count() as u64;
        assert!(
            pools[0].allocated_bytes >= with_data * MIB,
            "{with_data} extents have data but {} bytes are allocated",
            pools[0].allocated_bytes
        );
    }
    // Final full comparison.
    let got = r
        .read(0, IoBuf::zeroed((BLOCKS * 4096) as usize))
        .await
        .unwrap();
    for b in 0..BLOCKS {
        let want = model
            .get(&b)
            .map_or_else(|| vec![0; 4096], |&seed| block_data(b, seed));
        assert!(
            got[(b * 4096) as usize..((b + 1) * 4096) as usize] == want[..],
            "final: block {b}"
        );
    }
    assert_eq!(r.checksum_errors(), 0);
    check_snapshots(&s, &snaps).await;
    // Deleting every snapshot frees everything only they held.
    for (snap, _) in std::mem::take(&mut snaps) {
        s.delete_snapshot(&snap).await.unwrap();
    }
    let pools = s.list_pools().await.unwrap();
    assert_eq!(pools[0].allocated_bytes, r.allocated_bytes());
    let got = r
        .read(0, IoBuf::zeroed((BLOCKS * 4096) as usize))
        .await
        .unwrap();
    assert!(
        got[..] == expected(&model)[..],
        "the volume after the deletes"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}
