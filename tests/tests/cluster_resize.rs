//! Online resize of a replicated volume on a real three-node cluster over a real etcd, through
//! the real attach path (FUSE file + loop device):
//!
//! - resized on a node that does not hold the attachment, every node sees the new size, every
//!   node grows its own replica, and the attached node's device shows it after a refresh and
//!   takes writes beyond the old end, which every replica then holds; resized on the attached
//!   node, the device shows it at the first refresh; the same size is a no-op; a shrink, a
//!   missing volume and a size no pool can hold are refused, the last before anything changes;
//! - a replica node that is down during the resize is skipped, and its replica grows before it
//!   is rebuilt, so it never serves the old size.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::time::Duration;

use integration_tests::cluster::{
    attach, node_dirs, pattern, read_direct, replica_states, start, three_nodes, wait_for,
    write_direct, Cleanup, MIB,
};
use integration_tests::etcd::Etcd;
use integration_tests::Daemon;

const OLD: usize = 16 * MIB;
const NEW: usize = 48 * MIB;

fn create(d: &Daemon, name: &str) {
    d.cli([
        "volume",
        "create",
        name,
        "--size",
        "16MiB",
        "--replicas",
        "3",
    ])
    .success();
}

/// The volume's size as `d` inspects it.
fn recorded_size(d: &Daemon, name: &str) -> u64 {
    let out = d.cli(["volume", "inspect", name, "-o", "json"]);
    out.success();
    out.json()["size_bytes"].as_u64().unwrap()
}

/// `POST /v1/volumes/NAME/refresh` on `d`: the size the attached device shows now.
fn refresh(d: &Daemon, name: &str) -> u64 {
    let r = d
        .api("POST", &format!("/v1/volumes/{name}/refresh"), None)
        .unwrap();
    assert_eq!(r.status, 200, "refresh: {}", r.body);
    r.json().unwrap()["size_bytes"].as_u64().unwrap()
}

/// The size of the block device at `path`, as the kernel reports it.
fn device_size(path: &str) -> u64 {
    let mut f = OpenOptions::new().read(true).open(path).unwrap();
    f.seek(SeekFrom::End(0)).unwrap()
}

/// Refresh on `d` until its device shows `size` (the attached nexus follows a resize made on
/// another node within a repair interval).
fn refreshed_to(d: &Daemon, name: &str, dev: &str, size: usize) {
    wait_for(
        &format!("the device of {name} to show {size} bytes"),
        Duration::from_secs(15),
        || refresh(d, name) == size as u64,
    );
    assert_eq!(device_size(dev), size as u64);
}

#[test]
fn a_replicated_volume_grows_online_on_any_node() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["rvol"]);
    let [a, b, c] = three_nodes(&dirs, &etcd);
    create(&a, "rvol");
    let dev = attach(&a, "rvol");
    assert_eq!(device_size(&dev), OLD as u64);
    let first = pattern(1, 0, 4 * MIB);
    write_direct(&dev, 0, &first).unwrap();
    assert!(
        write_direct(&dev, 40 * MIB, &pattern(2, 40 * MIB, MIB)).is_err(),
        "a write beyond the end must fail"
    );

    // Refusals change nothing.
    b.cli(["volume", "resize", "nope", "--size", "48MiB"])
        .expect_code(4)
        .stderr_has("volume nope not found");
    b.cli(["volume", "resize", "rvol", "--size", "8MiB"])
        .expect_code(6)
        .stderr_has("is 16 MiB and cannot shrink to 8 MiB; only growing is supported");
    b.cli(["volume", "resize", "rvol", "--size", "1GiB"])
        .expect_code(1)
        .stderr_has("cannot grow to 1 GiB on node node-")
        .stderr_has("holds at most");
    let r = b
        .api(
            "POST",
            "/v1/volumes/rvol/resize",
            Some(r#"{"size": "1GiB"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 507, "{}", r.body);
    assert_eq!(
        r.json().unwrap()["code"],
        "resource_exhausted",
        "{}",
        r.body
    );
    assert_eq!(recorded_size(&a, "rvol"), OLD as u64);
    assert_eq!(refresh(&a, "rvol"), OLD as u64);

    // Grow on B while A has it attached.
    let out = b.cli(["volume", "resize", "rvol", "--size", "48MiB", "-o", "json"]);
    out.success();
    assert_eq!(out.json()["size_bytes"], NEW);
    for d in [&a, &b, &c] {
        assert_eq!(recorded_size(d, "rvol"), NEW as u64);
        // Each node grew its own replica, in its own storage.
        let log = d.log();
        assert!(
            log.contains("grew volume"),
            "a replica did not grow:\n{log}"
        );
    }
    // The same size, and one that rounds up to it, are no-ops.
    c.cli(["volume", "resize", "rvol", "--size", "48MiB"])
        .success()
        .stdout_has("resized to 48 MiB");
    c.cli([
        "volume",
        "resize",
        "rvol",
        "--size",
        &(NEW - 1000).to_string(),
    ])
    .success();
    assert_eq!(recorded_size(&c, "rvol"), NEW as u64);

    // A's device follows, and takes writes between the old and the new end.
    refreshed_to(&a, "rvol", &dev, NEW);
    let high = pattern(3, 40 * MIB, 4 * MIB);
    write_direct(&dev, 40 * MIB, &high).unwrap();
    assert_eq!(read_direct(&dev, 40 * MIB, 4 * MIB), high);
    assert_eq!(read_direct(&dev, 0, 4 * MIB), first);
    assert!(write_direct(&dev, NEW, &pattern(4, NEW, MIB)).is_err());

    // Grown on the attached node itself, the nexus grows at once.
    a.cli(["volume", "resize", "rvol", "--size", "64MiB"])
        .success();
    assert_eq!(refresh(&a, "rvol"), 64 * MIB as u64);
    assert_eq!(device_size(&dev), 64 * MIB as u64);
    let top = pattern(5, 60 * MIB, MIB);
    write_direct(&dev, 60 * MIB, &top).unwrap();
    assert_eq!(read_direct(&dev, 60 * MIB, MIB), top);

    // Every replica holds what was written beyond the old end: attached on B, then on C,
    // reads come from the local replica.
    a.cli(["volume", "detach", "rvol"]).success();
    for d in [&b, &c] {
        let dev = attach(d, "rvol");
        assert_eq!(device_size(&dev), 64 * MIB as u64);
        assert_eq!(read_direct(&dev, 40 * MIB, 4 * MIB), high);
        assert_eq!(read_direct(&dev, 60 * MIB, MIB), top);
        assert_eq!(read_direct(&dev, 0, 4 * MIB), first);
        d.cli(["volume", "detach", "rvol"]).success();
    }
    let states = replica_states(&a, "rvol");
    assert!(states.iter().all(|(_, s)| s == "healthy"), "{states:?}");
}

#[test]
fn a_replica_away_during_a_resize_grows_before_it_serves_again() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["rvol"]);
    let [a, b, mut c] = three_nodes(&dirs, &etcd);
    create(&a, "rvol");
    let dev = attach(&a, "rvol");
    let first = pattern(1, 0, 4 * MIB);
    write_direct(&dev, 0, &first).unwrap();

    // C is down (its lease still lives): the resize skips its replica.
    c.kill().unwrap();
    b.cli(["volume", "resize", "rvol", "--size", "48MiB"])
        .success();
    assert_eq!(recorded_size(&b, "rvol"), NEW as u64);
    // A's nexus grows without C's replica, which it ejects (it cannot show the new size).
    refreshed_to(&a, "rvol", &dev, NEW);
    wait_for("node-c to be ejected", Duration::from_secs(30), || {
        replica_states(&a, "rvol").contains(&("node-c".into(), "ejected".into()))
    });
    let high = pattern(2, 40 * MIB, 4 * MIB);
    write_direct(&dev, 40 * MIB, &high).expect("a write beyond the old end with C away");

    // C comes back with its 16 MiB replica: it grows, then is rebuilt.
    let c = start(&dirs[2], "node-c", "zone-c", &etcd);
    wait_for(
        "node-c to be healthy again",
        Duration::from_secs(60),
        || replica_states(&a, "rvol").contains(&("node-c".into(), "healthy".into())),
    );
    let log = a.log();
    assert!(
        log.contains("grew a replica that had missed a resize"),
        "node-a should have grown node-c's replica before its rebuild:\n{log}"
    );

    // Attached on C, the volume has its new size and C's replica has the data.
    a.cli(["volume", "detach", "rvol"]).success();
    let dev = attach(&c, "rvol");
    assert_eq!(device_size(&dev), NEW as u64);
    assert_eq!(read_direct(&dev, 40 * MIB, 4 * MIB), high);
    assert_eq!(read_direct(&dev, 0, 4 * MIB), first);
    c.cli(["volume", "detach", "rvol"]).success();
}
