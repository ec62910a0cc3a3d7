//! Rebuild on a real three-node cluster over a real etcd, with the verifying workload running
//! through the attached device the whole time:
//!
//! - **(a) a replica node is killed and comes back:** no I/O error while it is down, the
//!   volume is degraded; after its restart the replica receives a delta (about what was
//!   written while it was down, never the data written before) and is healthy again; moved to
//!   that node, the volume verifies from its replica;
//! - **a replica node is gone for good:** after `--replace-after`, a replica is placed on the
//!   node that had none and receives a full rebuild of the allocated extents only.

use std::time::{Duration, Instant};

use integration_tests::cluster::{
    attach, node_dirs, nodes_with, pattern, read_direct, replica, replica_state, replica_states,
    start, start_with, three_nodes, wait_for, write_direct, Cleanup, MIB,
};
use integration_tests::etcd::Etcd;
use integration_tests::workload::{Config, Workload};

const STEP: u64 = 100;
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_killed_replica_node_returns_through_a_delta_rebuild() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["avol"]);
    let [a, mut b, c] = three_nodes(&dirs, &etcd);
    a.cli([
        "volume",
        "create",
        "avol",
        "--size",
        "96MiB",
        "--replicas",
        "3",
    ])
    .success();
    let dev = attach(&a, "avol");
    // Data written before the outage, outside the workload's 32 MiB: a delta must not copy it.
    let before = pattern(7, 40 * MIB, 24 * MIB);
    write_direct(&dev, 40 * MIB, &before).unwrap();
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    // Kill B: writes go on without an error, B is ejected, the volume is degraded.
    b.kill().unwrap();
    let down_at = w.acked();
    wait_for("node-b to be ejected", Duration::from_secs(30), || {
        replica_state(&a, "avol", "node-b") == "ejected"
    });
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let during = pattern(8, 70 * MIB, MIB);
    write_direct(&dev, 70 * MIB, &during).unwrap();
    let out = a.cli(["volume", "inspect", "avol", "-o", "json"]);
    assert_eq!(out.json()["state"], "degraded");

    // Restart B: it is rebuilt while the workload goes on.
    let b = start(&dirs[1], "node-b", "zone-b", &etcd);
    let back = Instant::now();
    wait_for(
        "node-b to be healthy again",
        Duration::from_secs(60),
        || replica_state(&a, "avol", "node-b") == "healthy",
    );
    let written_while_down = w.acked() - down_at;
    eprintln!(
        "node-b rebuilt {:?} after its restart; {written_while_down} workload writes while it was down",
        back.elapsed()
    );
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    assert_eq!(
        report.errors, 0,
        "no I/O error through the outage and the rebuild; first: {:?}",
        report.first_error
    );

    // What the delta copied: the extents the workload and the 1 MiB write touched (at most
    // 32 + 1 of 1 MiB), never the 24 MiB written before the outage.
    let last = replica(&a, "avol", "node-b")["last_rebuild"].clone();
    assert_eq!(last["kind"], "delta", "{last}");
    let copied = last["done_bytes"].as_u64().unwrap();
    eprintln!("delta copied {} MiB", copied as f64 / MIB as f64);
    assert!(copied >= MIB as u64, "the 1 MiB write at least: {last}");
    let touched = (written_while_down + 2).min(32) + 1;
    assert!(
        copied <= 2 * touched * MIB as u64,
        "a delta copies at most twice the extents written while the replica was down \
         ({touched} MiB): {last}"
    );
    let out = a.cli(["volume", "inspect", "avol", "-o", "json"]);
    assert_eq!(out.json()["state"], "online");
    // `/metrics` reports the record as the repair task last read it (about once a second).
    let healthy = r#"ballast_replica_state{volume="avol",node="node-b",state="healthy"} 1"#;
    let asked = Instant::now();
    loop {
        let metrics = a.http("GET", "/metrics").unwrap().body;
        if metrics.contains(healthy) {
            break;
        }
        assert!(asked.elapsed() < Duration::from_secs(10), "{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // B's replica alone answers reads once the volume is attached there: it has everything.
    report.verify(&dev).unwrap();
    a.cli(["volume", "detach", "avol"]).success();
    let dev_b = attach(&b, "avol");
    let verified = report.verify(&dev_b).unwrap();
    assert!(verified.acked > 0);
    assert_eq!(read_direct(&dev_b, 40 * MIB, 24 * MIB), before);
    assert_eq!(read_direct(&dev_b, 70 * MIB, MIB), during);
    b.cli(["volume", "detach", "avol"]).success();
    drop((a, b, c));
}

#[test]
fn a_replica_of_a_node_gone_for_good_is_replaced_with_a_full_rebuild() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["rvol"]);
    let ids = ["node-a", "node-b", "node-c"];
    let mut up = nodes_with(&dirs, &etcd, &["--replace-after", "2"]);
    up[0]
        .cli([
            "volume",
            "create",
            "rvol",
            "--size",
            "64MiB",
            "--replicas",
            "2",
        ])
        .success();
    let placed: Vec<String> = replica_states(&up[0], "rvol")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let holder = ids
        .iter()
        .position(|id| placed.contains(&(*id).to_owned()))
        .unwrap();
    let victim = ids
        .iter()
        .position(|id| *id != ids[holder] && placed.contains(&(*id).to_owned()))
        .unwrap();
    let spare = ids[3 - holder - victim];
    let dev = attach(&up[holder], "rvol");
    // 5 MiB allocated out of 64.
    let data = pattern(3, 8 * MIB, 5 * MIB);
    write_direct(&dev, 8 * MIB, &data).unwrap();
    let w = Workload::start(
        &dev,
        Config {
            base: 32 * MIB as u64,
            slots: 256, // 1 MiB
            ..Config::default()
        },
    )
    .unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    up[victim].kill().unwrap();
    let d = &up[holder];
    wait_for(
        "a replacement replica to be healthy",
        Duration::from_secs(60),
        || replica_state(d, "rvol", spare) == "healthy",
    );
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    assert_eq!(report.errors, 0, "first: {:?}", report.first_error);
    let states = replica_states(d, "rvol");
    assert!(
        !states.iter().any(|(n, _)| n == ids[victim]),
        "the gone node's replica left the placement: {states:?}"
    );
    let last = replica(d, "rvol", spare)["last_rebuild"].clone();
    assert_eq!(last["kind"], "full", "{last}");
    let copied = last["done_bytes"].as_u64().unwrap();
    assert!(
        (6 * MIB as u64..=8 * MIB as u64).contains(&copied),
        "a full rebuild copies the allocated extents (5 MiB + the workload's 1 MiB, \
         with extent rounding), not the 64 MiB volume: {last}"
    );

    // The new replica alone has it all.
    d.cli(["volume", "detach", "rvol"]).success();
    let spare_i = ids.iter().position(|id| *id == spare).unwrap();
    let dev_s = attach(&up[spare_i], "rvol");
    assert_eq!(read_direct(&dev_s, 8 * MIB, 5 * MIB), data);
    report.verify(&dev_s).unwrap();
    up[spare_i].cli(["volume", "detach", "rvol"]).success();

    // The gone node comes back: its replaced replica is garbage and is deleted.
    let back = start_with(&dirs[victim], victim, &etcd, &["--replace-after", "2"]);
    let pools = back.cli(["pool", "list", "-o", "json"]);
    pools.success();
    let held: u64 = pools
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["volumes"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 0, "the replaced replica is left on {}", ids[victim]);
    assert!(
        back.log().contains("no longer places one here"),
        "{}",
        back.log()
    );
    drop(back);
    up.clear();
}
