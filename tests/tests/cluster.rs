//! Cluster mode with a real etcd and three real daemons on this machine: placement, node
//! list, synchronous 3-way replication through the real attach path, ejection of a killed
//! replica node with no I/O error, and failover of the attached node (refused while its lease
//! lives, allowed once it expired) with every acknowledged write present.

use std::time::Duration;

use integration_tests::cluster::{
    attach, create_volume, node_dirs, nodes, pattern, read_direct, replica_states, three_nodes,
    wait_for, write_direct, Cleanup, MIB,
};
use integration_tests::etcd::Etcd;

fn create_cvol(d: &integration_tests::Daemon) {
    create_volume(d, "cvol");
}

#[test]
fn three_replicas_survive_a_replica_node_and_fail_over_from_the_attached_node() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["cvol"]);
    let [mut a, mut b, c] = three_nodes(&dirs, &etcd);

    // Every node sees all three, with their zones.
    assert_eq!(nodes(&c), ["node-a", "node-b", "node-c"]);
    let table = a.cli(["node", "list"]);
    table.success().stdout_has("zone-b").stdout_has("node-c");

    // Placement: too many replicas is an error naming the shortfall.
    a.cli([
        "volume",
        "create",
        "toomany",
        "--size",
        "64MiB",
        "--replicas",
        "4",
    ])
    .expect_code(1)
    .stderr_has("4 replicas need 4 nodes");
    create_cvol(&a);
    let mut placed: Vec<String> = replica_states(&b, "cvol")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    placed.sort();
    assert_eq!(placed, ["node-a", "node-b", "node-c"]);

    // NBD exports work in cluster mode too, through the nexus (see cluster_nbd.rs).
    a.cli(["volume", "export", "cvol"])
        .success()
        .stdout_has("nbd+unix:///cvol");

    // Attach on A and write through the real device.
    let dev_a = attach(&a, "cvol");
    let first = pattern(1, 0, 4 * MIB);
    write_direct(&dev_a, 0, &first).unwrap();

    // Kill a replica node: writes go on without an error, and the ejection is recorded.
    b.kill().unwrap();
    let second = pattern(2, 4 * MIB, 4 * MIB);
    write_direct(&dev_a, 4 * MIB, &second).expect("a write after losing one replica must succeed");
    assert_eq!(read_direct(&dev_a, 0, 4 * MIB), first);
    let states = replica_states(&a, "cvol");
    assert!(
        states.contains(&("node-b".into(), "ejected".into())),
        "node-b should be ejected: {states:?}"
    );
    assert!(
        states.contains(&("node-c".into(), "healthy".into())),
        "{states:?}"
    );
    let inspect = a.cli(["volume", "inspect", "cvol", "-o", "json"]);
    assert_eq!(inspect.json()["state"], "degraded");

    // Kill the attached node. While its lease lives, C may not take the volume without
    // --force; once the lease expired, it may.
    a.kill().unwrap();
    c.cli(["volume", "attach", "cvol"])
        .expect_code(1)
        .stderr_has("which is alive");
    wait_for("node-a's lease to expire", Duration::from_secs(15), || {
        !nodes(&c).contains(&"node-a".to_owned())
    });
    let dev_c = attach(&c, "cvol");

    // Every acknowledged write is there.
    assert_eq!(read_direct(&dev_c, 0, 4 * MIB), first);
    assert_eq!(read_direct(&dev_c, 4 * MIB, 4 * MIB), second);
    // And the survivor keeps taking writes.
    let third = pattern(3, 8 * MIB, MIB);
    write_direct(&dev_c, 8 * MIB, &third).unwrap();
    assert_eq!(read_direct(&dev_c, 8 * MIB, MIB), third);

    c.cli(["volume", "detach", "cvol", "--force"]).success();
    drop(c);
    drop(etcd);
}

#[test]
fn a_stale_writer_is_fenced_after_a_forced_takeover() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["cvol"]);
    let [a, _b, c] = three_nodes(&dirs, &etcd);
    create_cvol(&a);
    let dev_a = attach(&a, "cvol");
    let before = pattern(1, 0, MIB);
    write_direct(&dev_a, 0, &before).unwrap();

    // Freeze A, take the volume over on C by force, then let A run again.
    a.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    let att = c.cli(["volume", "attach", "cvol", "--force", "-o", "json"]);
    a.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    att.success();
    let dev_c = att.json()["device"].as_str().unwrap().to_owned();

    // A's writes are refused: the surviving replicas have a newer epoch.
    let stale = pattern(9, 0, MIB);
    assert!(
        write_direct(&dev_a, 0, &stale).is_err(),
        "the old writer's write must fail once it is fenced"
    );
    // The new writer sees the old data, never the stale write, and keeps writing.
    assert_eq!(read_direct(&dev_c, 0, MIB), before);
    let after = pattern(2, MIB, MIB);
    write_direct(&dev_c, MIB, &after).unwrap();
    assert_eq!(read_direct(&dev_c, MIB, MIB), after);
    // It failed because A learned it was fenced (a replica's newer epoch, its replaced
    // record, or its lapsed confirmation), not by accident.
    let log = a.log();
    assert!(
        (log.contains("newer attachment") && log.contains("stops all I/O"))
            || log.contains("attachment fenced: every further request fails"),
        "node-a should report that it was fenced:\n{log}"
    );
    c.cli(["volume", "detach", "cvol", "--force"]).success();
    a.cli(["volume", "detach", "cvol", "--force"]).success();
}
