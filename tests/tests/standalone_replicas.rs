//! Same-node replicas: a standalone daemon with two pool devices puts a `--replicas 2`
//! volume's replicas on distinct devices, and losing one device loses no data.
//!
//! Pool device B is a file on its own small ext4 filesystem (an image file, loop-mounted). To
//! make B fail, the test shuts that filesystem down with the `EXT4_IOC_SHUTDOWN` ioctl (the
//! "godown" of xfstests, `NOLOGFLUSH`): from then on every read and write of a file on it
//! fails with `EIO`, exactly what the daemon sees from a dead disk, while the daemon keeps
//! its descriptor open. (Deleting the pool file would not do: the open descriptor keeps
//! working; there is no device-mapper or block fault injection on the test machines.) For
//! the restart, the filesystem is unmounted and mounted again: B is back, with the data it
//! had synced before the failure; its replica is stale, so the repair task rebuilds it (a
//! delta: the extents written while it was out) before it serves again. Last, the daemon
//! starts with pool B alone, and the whole volume must read back from B's rebuilt replica.
//!
//! Needs root (mount, loop devices, FUSE attach).

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::cluster::{attach, pattern, read_direct, write_direct};
use integration_tests::{release_attachments, Daemon, NodeDir};

const MIB: usize = 1 << 20;

/// `EXT4_IOC_SHUTDOWN` (`_IOR('X', 125, __u32)`, the same number as `XFS_IOC_GOINGDOWN`).
const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down without flushing the journal: what a dead disk does.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run a command");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pool device B's filesystem: an ext4 image loop-mounted on a directory of the test node.
/// Dropping it unmounts (lazily if busy) and so frees the loop device (autoclear); the
/// attachments of the test's volumes are released first.
struct DiskB {
    image: PathBuf,
    mnt: PathBuf,
    fuse: PathBuf,
    names: Vec<String>,
}

impl DiskB {
    fn new(node: &NodeDir, names: Vec<String>) -> Self {
        let image = node.scratch("disk-b.img");
        let mnt = node.scratch("disk-b");
        std::fs::create_dir_all(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(192 * MIB as u64).unwrap();
        drop(f);
        run("mkfs.ext4", &["-q", "-F", &image.display().to_string()]);
        let d = Self {
            image,
            mnt,
            fuse: node.data_dir().join("fuse"),
            names,
        };
        d.mount();
        d
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop",
                &self.image.display().to_string(),
                &self.mnt.display().to_string(),
            ],
        );
    }

    fn umount(&self) {
        run("umount", &[&self.mnt.display().to_string()]);
    }

    /// The pool file on B.
    fn pool(&self) -> PathBuf {
        self.mnt.join("pool-b.img")
    }

    /// Kill the disk: every further I/O on its filesystem fails with EIO.
    fn fail(&self) {
        let dir = std::fs::File::open(&self.mnt).unwrap();
        let flags: u32 = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the fd is open for the whole call, and the ioctl reads one u32 through a
        // pointer to a live local.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN, &raw const flags) };
        assert_eq!(
            rc,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for DiskB {
    fn drop(&mut self) {
        release_attachments(&self.fuse, &self.names);
        let mnt = self.mnt.display().to_string();
        let clean = Command::new("umount")
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount").args(["-l", &mnt]).status();
        }
    }
}

/// The daemon flags: the node's own pool (A) plus pool B.
fn args(node: &NodeDir, b: &DiskB) -> Vec<String> {
    let mut args = node.daemon_args();
    args.push("--pool".into());
    args.push(format!("{}:128MiB", b.pool().display()));
    args
}

fn start(node: &NodeDir, b: &DiskB) -> Daemon {
    ready(node, args(node, b))
}

/// A daemon started with `args`, ready.
fn ready(node: &NodeDir, args: Vec<String>) -> Daemon {
    let mut d = Daemon::spawn(node, args).unwrap();
    d.wait_ready(integration_tests::START_TIMEOUT).unwrap();
    d
}

/// Create `name` with two replicas (one per pool device) and `size`.
fn create_mirror(d: &Daemon, name: &str, size: &str) {
    d.cli(["volume", "create", name, "--size", size, "--replicas", "2"])
        .success();
}

/// Pool path to pool id.
fn pool_ids(d: &Daemon) -> Vec<(String, String)> {
    let out = d.cli(["pool", "list", "-o", "json"]);
    out.success();
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_owned(),
                p["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// (pool id, state) of each replica, and the volume's state.
fn inspect(d: &Daemon, name: &str) -> (Vec<(String, String)>, String) {
    let out = d.cli(["volume", "inspect", name, "-o", "json"]);
    out.success();
    let v = out.json();
    let replicas = v["replica_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["pool_id"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (replicas, v["state"].as_str().unwrap().to_owned())
}

#[test]
fn two_replicas_on_two_disks_survive_losing_one_disk_and_a_restart() {
    let node = NodeDir::new().unwrap();
    let name = format!("sr{}-mirror", std::process::id());
    let b = DiskB::new(&node, vec![name.clone()]);
    let mut d = start(&node, &b);

    // Placement: one replica on each device.
    let pools = pool_ids(&d);
    assert_eq!(pools.len(), 2, "{pools:?}");
    let id_a = pools[0].1.clone();
    let id_b = pools
        .iter()
        .find(|(p, _)| Path::new(p) == b.pool())
        .expect("pool B is listed")
        .1
        .clone();
    assert_ne!(id_a, id_b);
    create_mirror(&d, &name, "32MiB");
    let (replicas, state) = inspect(&d, &name);
    assert_eq!(state, "online");
    let mut on: Vec<&str> = replicas.iter().map(|(p, _)| p.as_str()).collect();
    on.sort_unstable();
    let mut both = vec![id_a.as_str(), id_b.as_str()];
    both.sort_unstable();
    assert_eq!(on, both, "one replica on each device");
    assert!(replicas.iter().all(|(_, s)| s == "healthy"), "{replicas:?}");

    // Too few devices: a clear error naming the shortfall and the fixes.
    d.cli([
        "volume",
        "create",
        "three",
        "--size",
        "16MiB",
        "--replicas",
        "3",
    ])
    .expect_code(1)
    .stderr_has("3 replicas need 3 pool devices; this node has 2")
    .stderr_has("add pool devices")
    .stderr_has("cluster mode");

    // Write through the real attached device.
    let dev = attach(&d, &name);
    let first = pattern(1, 0, 8 * MIB);
    write_direct(&dev, 0, &first).unwrap();

    // Disk B dies. Writes (to new extents and over old data) go on without an error.
    b.fail();
    let second = pattern(2, 8 * MIB, 8 * MIB);
    write_direct(&dev, 8 * MIB, &second).expect("a write after losing disk B must succeed");
    let over = pattern(3, MIB, MIB);
    write_direct(&dev, MIB, &over).expect("an overwrite after losing disk B must succeed");
    let mut expect = first.clone();
    expect[MIB..2 * MIB].copy_from_slice(&over);
    expect.extend_from_slice(&second);
    assert!(
        read_direct(&dev, 0, 16 * MIB) == expect,
        "data read after losing disk B differs"
    );
    let (replicas, state) = inspect(&d, &name);
    assert!(
        replicas.contains(&(id_b.clone(), "ejected".into())),
        "{replicas:?}"
    );
    assert!(
        replicas.contains(&(id_a.clone(), "healthy".into())),
        "{replicas:?}"
    );
    assert_eq!(state, "degraded");
    assert!(
        d.log().contains("ejection recorded"),
        "the ejection is recorded in the store before the write is acknowledged: {}",
        d.log()
    );

    // Restart with disk B back (its stale replica opens fine): the data is intact, and the
    // repair task brings B back with a delta rebuild (the extents written while it was out),
    // while writes go on.
    let _ = d.terminate().unwrap();
    drop(d);
    b.umount();
    b.mount();
    let mut d = start(&node, &b);
    let dev = attach(&d, &name);
    assert!(
        read_direct(&dev, 0, 16 * MIB) == expect,
        "data read after the restart differs"
    );
    let third = pattern(4, 16 * MIB, 4 * MIB);
    write_direct(&dev, 16 * MIB, &third).unwrap();
    expect.extend_from_slice(&third);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rebuilt = loop {
        let out = d.cli(["volume", "inspect", &name, "-o", "json"]);
        out.success();
        let v = out.json();
        let b_status = v["replica_status"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pool_id"] == id_b.as_str())
            .cloned()
            .expect("B's replica is listed");
        if b_status["state"] == "healthy" && v["state"] == "online" {
            break b_status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B was not rebuilt within 60 s: {v}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        rebuilt["last_rebuild"]["kind"], "delta",
        "a returning replica gets only what it missed: {rebuilt}"
    );
    assert!(
        read_direct(&dev, 0, 20 * MIB) == expect,
        "data read after the rebuild differs"
    );
    d.cli(["volume", "detach", &name]).success();
    let _ = d.terminate().unwrap();
    drop(d);

    // B alone: the daemon starts without pool A. A's replica is missing (shown so, and
    // ejected at attach), and every byte is read from the rebuilt replica on B.
    let mut b_only = node.daemon_args();
    let a_at = b_only.iter().position(|a| a == "--pool").unwrap();
    b_only.drain(a_at..=a_at + 1);
    b_only.push("--pool".into());
    b_only.push(format!("{}:128MiB", b.pool().display()));
    let d = ready(&node, b_only);
    let (replicas, state) = inspect(&d, &name);
    assert!(
        replicas.contains(&(id_a.clone(), "missing".into())),
        "{replicas:?}"
    );
    assert_eq!(state, "degraded");
    let dev = attach(&d, &name);
    assert!(
        read_direct(&dev, 0, 20 * MIB) == expect,
        "the rebuilt replica on B alone differs"
    );
    let (replicas, _) = inspect(&d, &name);
    assert!(
        replicas.contains(&(id_a.clone(), "ejected".into()))
            && replicas.contains(&(id_b.clone(), "healthy".into())),
        "{replicas:?}"
    );
    d.cli(["volume", "detach", &name]).success();
    d.cli(["volume", "delete", &name]).success();
    d.cli(["volume", "inspect", &name]).expect_code(4);
}

/// A standalone node's volumes belong to it whatever its id: after a restart under another
/// `--node-id` (or another hostname, its default), a two-replica volume attaches with both
/// replicas and reads back what was written.
#[test]
fn a_changed_node_id_keeps_the_volumes() {
    let node = NodeDir::new().unwrap();
    let name = format!("sr{}-renamed", std::process::id());
    let fuse = node.data_dir().join("fuse");
    let _release = ReleaseOnDrop(fuse, vec![name.clone()]);
    let args = |id: &str| {
        let mut args = node.daemon_args();
        let at = args.iter().position(|a| a == "--node-id").unwrap();
        id.clone_into(&mut args[at + 1]);
        args.push("--pool".into());
        args.push(format!("{}:128MiB", node.scratch("second.img").display()));
        args
    };
    let mut d = ready(&node, args("first-id"));
    create_mirror(&d, &name, "16MiB");
    let dev = attach(&d, &name);
    let data = pattern(9, 0, 4 * MIB);
    write_direct(&dev, 0, &data).unwrap();
    d.cli(["volume", "detach", &name]).success();
    let _ = d.terminate().unwrap();
    drop(d);

    let d = ready(&node, args("second-id"));
    let (replicas, state) = inspect(&d, &name);
    assert_eq!(state, "online", "{replicas:?}");
    let dev = attach(&d, &name);
    assert!(read_direct(&dev, 0, 4 * MIB) == data);
    let (replicas, state) = inspect(&d, &name);
    assert_eq!(state, "online", "both replicas serve: {replicas:?}");
    assert!(replicas.iter().all(|(_, s)| s == "healthy"), "{replicas:?}");
    d.cli(["volume", "detach", &name]).success();
    d.cli(["volume", "delete", &name]).success();
}

/// Releases the named volumes' attachments when dropped, even if the test fails.
struct ReleaseOnDrop(PathBuf, Vec<String>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_attachments(&self.0, &self.1);
    }
}

/// NBD writes to a degraded two-replica volume go through its replicas' nexus like any
/// attachment: the replica whose device is missing is ejected (recorded) before the first
/// write, and rebuilt when its device is back; then it alone holds what NBD wrote.
#[test]
fn nbd_writes_to_a_degraded_volume_are_replicated_when_the_device_returns() {
    let node = NodeDir::new().unwrap();
    let name = format!("sr{}-nbd", std::process::id());
    let fuse = node.data_dir().join("fuse");
    let _release = ReleaseOnDrop(fuse, vec![name.clone()]);
    let second = node.scratch("second.img");
    // The node's own pool is A, the second file is B; each may be left out.
    let args = |with_a: bool, with_b: bool| {
        let mut args = node.daemon_args();
        if !with_a {
            let at = args.iter().position(|a| a == "--pool").unwrap();
            args.drain(at..=at + 1);
        }
        if with_b {
            args.push("--pool".into());
            args.push(format!("{}:128MiB", second.display()));
        }
        args
    };
    let mut d = ready(&node, args(true, true));
    create_mirror(&d, &name, "16MiB");
    let pools = pool_ids(&d);
    let id_b = pools
        .iter()
        .find(|(p, _)| Path::new(p) == second)
        .unwrap()
        .1
        .clone();
    let _ = d.terminate().unwrap();
    drop(d);

    // Pool B is not configured: NBD writes reach A only, and B's ejection is recorded first.
    let mut d = ready(&node, args(true, false));
    let export = d.cli(["volume", "export", &name, "-o", "json"]);
    export.success();
    let uri = export.json()["uri"].as_str().unwrap().to_owned();
    let data = pattern(5, 0, 4 * MIB);
    let src = node.scratch("nbd-src.img");
    std::fs::write(&src, &data).unwrap();
    integration_tests::run_tool(
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
    let (replicas, state) = inspect(&d, &name);
    assert!(
        replicas.contains(&(id_b.clone(), "ejected".into())),
        "B missed NBD writes and must be recorded ejected: {replicas:?}"
    );
    assert_eq!(state, "degraded");
    let _ = d.terminate().unwrap();
    drop(d);

    // B is back: it is rebuilt, then it alone holds what NBD wrote.
    let mut d = ready(&node, args(true, true));
    let dev = attach(&d, &name);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while inspect(&d, &name).1 != "online" {
        assert!(
            std::time::Instant::now() < deadline,
            "B was not rebuilt: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(read_direct(&dev, 0, 4 * MIB) == data);
    d.cli(["volume", "detach", &name]).success();
    let _ = d.terminate().unwrap();
    drop(d);
    let d = ready(&node, args(false, true));
    let dev = attach(&d, &name);
    assert!(
        read_direct(&dev, 0, 4 * MIB) == data,
        "B alone does not hold what NBD wrote"
    );
    d.cli(["volume", "detach", &name]).success();
    d.cli(["volume", "delete", &name]).success();
}
