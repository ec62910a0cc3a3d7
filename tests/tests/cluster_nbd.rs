//! NBD export of a three-replica volume in cluster mode, against a real etcd and three real
//! daemons, with real clients.
//!
//! - `qemu-img` writes a random image into node A's export and `nbdcopy` (several
//!   connections) reads it back: the data goes through A's nexus to all three replicas;
//! - an export holds the volume's attachment like an attach does: another node cannot attach
//!   it without `--force` while a connection is open;
//! - when node B takes the volume over with `--force`, A's export is fenced: a request on a
//!   connection that was open across the takeover fails with `EPERM`, and so does a new
//!   `nbdcopy` write; B reads exactly what A's clients wrote before.
//!
//! Needs root, etcd, `qemu-img` and `nbdcopy`.

use integration_tests::cluster::{
    create_volume, node_dirs, pattern, read_direct, replica_states, three_nodes, Cleanup, MIB,
};
use integration_tests::etcd::Etcd;
use integration_tests::nbd::{Raw, EPERM};
use integration_tests::run_tool;
use rand::RngCore;

#[test]
fn a_three_replica_export_is_written_by_real_clients_and_fenced_by_a_takeover() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["nvol"]);
    let [a, b, _c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "nvol");

    let export = a.cli(["volume", "export", "nvol", "-o", "json"]);
    export.success();
    let uri = export.json()["uri"].as_str().unwrap().to_owned();
    let socket = dirs[0].data_dir().join("nbd.sock");

    // qemu-img writes 16 MiB of random data; nbdcopy reads the whole export back.
    let mut data = vec![0u8; 16 * MIB];
    rand::thread_rng().fill_bytes(&mut data);
    let src = dirs[0].scratch("src.img");
    std::fs::write(&src, &data).unwrap();
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let back = dirs[0].scratch("back.img");
    run_tool("nbdcopy", &[&uri, back.to_str().unwrap()]);
    let read = std::fs::read(&back).unwrap();
    assert_eq!(read.len(), 64 * MIB);
    assert!(read[..16 * MIB] == data[..], "nbdcopy read back other data");
    assert!(read[16 * MIB..].iter().all(|&x| x == 0));
    let states = replica_states(&a, "nvol");
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(states.iter().all(|(_, s)| s == "healthy"), "{states:?}");

    // A connection held open holds the attachment: B may not take it without --force.
    let mut held = Raw::connect(&socket);
    assert_eq!(held.go("nvol"), Ok(64 * MIB as u64));
    let before = pattern(7, 20 * MIB, MIB);
    assert_eq!(held.write(0, 20 * MIB as u64, &before), 0);
    b.cli(["volume", "attach", "nvol"])
        .expect_code(1)
        .stderr_has("attached on node node-a");

    // B takes it over: A's export is fenced, on the open connection and on new ones.
    let att = b.cli(["volume", "attach", "nvol", "--force", "-o", "json"]);
    att.success();
    let dev_b = att.json()["device"].as_str().unwrap().to_owned();
    let after = pattern(8, 20 * MIB, MIB);
    assert_eq!(
        held.write(0, 20 * MIB as u64, &after),
        EPERM,
        "a fenced export's write must fail with EPERM"
    );
    let refused = std::process::Command::new("nbdcopy")
        .args([src.to_str().unwrap(), &uri])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a write through the fenced export succeeded: {refused:?}"
    );
    drop(held);

    // B serves what A's clients wrote before the takeover, and nothing after it.
    assert!(
        read_direct(&dev_b, 0, 16 * MIB) == data,
        "B reads other data than qemu-img wrote through A"
    );
    assert!(
        read_direct(&dev_b, 20 * MIB, MIB) == before,
        "B reads other data than the last write A acknowledged"
    );
    b.cli(["volume", "detach", "nvol", "--force"]).success();
}
