//! Cluster mode with a real etcd and three real daemons on this machine: placement, node
//! list, synchronous 3-way replication through the real attach path, ejection of a killed
//! replica node with no I/O error, and failover of the attached node (refused while its lease
//! lives, allowed once it expired) with every acknowledged write present.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::etcd::Etcd;
use integration_tests::{release_fuse, Daemon, NodeDir};

const MIB: usize = 1 << 20;

/// Cleans up every node's attachments, even when the test fails.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for fuse in &self.0 {
            release_fuse(fuse);
        }
        let _ = std::fs::remove_file("/dev/ballast/cvol");
    }
}

fn cluster_args(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd) -> Vec<String> {
    let mut args = node.daemon_args();
    let at = args.iter().position(|a| a == "--node-id").unwrap();
    id.clone_into(&mut args[at + 1]);
    args.extend(
        [
            "--etcd",
            etcd.url(),
            "--listen",
            "127.0.0.1:0",
            "--zone",
            zone,
            "--lease-ttl",
            "3",
        ]
        .map(String::from),
    );
    args
}

fn start(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd) -> Daemon {
    let mut d = Daemon::spawn(node, cluster_args(node, id, zone, etcd)).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

/// A deterministic, position-dependent pattern (so misplaced blocks are caught too).
fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let p = offset + i;
            (p as u8) ^ ((p >> 12) as u8).wrapping_mul(31) ^ seed
        })
        .collect()
}

fn write_direct(dev: &str, offset: usize, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    f.seek(SeekFrom::Start(offset as u64))?;
    let mut buf = volume::io::IoBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    f.write_all(&buf)?;
    f.sync_all()
}

fn read_direct(dev: &str, offset: usize, len: usize) -> Vec<u8> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    let mut buf = volume::io::IoBuf::zeroed(len);
    f.read_exact(&mut buf).unwrap();
    buf.to_vec()
}

fn nodes(d: &Daemon) -> Vec<String> {
    let out = d.cli(["node", "list", "-o", "json"]);
    out.success();
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn replica_states(d: &Daemon) -> Vec<(String, String)> {
    let out = d.cli(["volume", "inspect", "cvol", "-o", "json"]);
    out.success();
    out.json()["replica_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Create the 3-replica volume `cvol` on `d`.
fn create_cvol(d: &Daemon) {
    d.cli([
        "volume",
        "create",
        "cvol",
        "--size",
        "64MiB",
        "--replicas",
        "3",
    ])
    .success();
}

/// Three nodes in three zones, started and registered. Declare `dirs` and the [`Cleanup`]
/// before calling, so the daemons are killed first when the test ends.
fn three_nodes(dirs: &[NodeDir], etcd: &Etcd) -> [Daemon; 3] {
    let nodes_up = [
        start(&dirs[0], "node-a", "zone-a", etcd),
        start(&dirs[1], "node-b", "zone-b", etcd),
        start(&dirs[2], "node-c", "zone-c", etcd),
    ];
    wait_for("three nodes registered", Duration::from_secs(10), || {
        nodes(&nodes_up[0]).len() == 3
    });
    nodes_up
}

#[test]
fn three_replicas_survive_a_replica_node_and_fail_over_from_the_attached_node() {
    let etcd = Etcd::start().unwrap();
    let dirs: Vec<NodeDir> = (0..3).map(|_| NodeDir::new().unwrap()).collect();
    let _cleanup = Cleanup(dirs.iter().map(|d| d.data_dir().join("fuse")).collect());
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
    let mut placed: Vec<String> = replica_states(&b).into_iter().map(|(n, _)| n).collect();
    placed.sort();
    assert_eq!(placed, ["node-a", "node-b", "node-c"]);

    // NBD would bypass replication and fencing, so cluster mode refuses it.
    a.cli(["volume", "export", "cvol"])
        .expect_code(1)
        .stderr_has("not available in cluster mode");

    // Attach on A and write through the real device.
    let att = a.cli(["volume", "attach", "cvol", "-o", "json"]);
    att.success();
    let dev_a = att.json()["device"].as_str().unwrap().to_owned();
    let first = pattern(1, 0, 4 * MIB);
    write_direct(&dev_a, 0, &first).unwrap();

    // Kill a replica node: writes go on without an error, and the ejection is recorded.
    b.kill().unwrap();
    let second = pattern(2, 4 * MIB, 4 * MIB);
    write_direct(&dev_a, 4 * MIB, &second).expect("a write after losing one replica must succeed");
    assert_eq!(read_direct(&dev_a, 0, 4 * MIB), first);
    let states = replica_states(&a);
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
    let att = c.cli(["volume", "attach", "cvol", "-o", "json"]);
    att.success();
    let dev_c = att.json()["device"].as_str().unwrap().to_owned();

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
    let dirs: Vec<NodeDir> = (0..3).map(|_| NodeDir::new().unwrap()).collect();
    let _cleanup = Cleanup(dirs.iter().map(|d| d.data_dir().join("fuse")).collect());
    let [a, _b, c] = three_nodes(&dirs, &etcd);
    create_cvol(&a);
    let att = a.cli(["volume", "attach", "cvol", "-o", "json"]);
    att.success();
    let dev_a = att.json()["device"].as_str().unwrap().to_owned();
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
    // It failed because A learned it was fenced, not by accident.
    let log = a.log();
    assert!(
        log.contains("newer attachment") && log.contains("stops all I/O"),
        "node-a should report that it was fenced:\n{log}"
    );
    c.cli(["volume", "detach", "cvol", "--force"]).success();
    a.cli(["volume", "detach", "cvol", "--force"]).success();
}
