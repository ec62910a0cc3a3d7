//! The Docker volume plugin against the real Docker engine on this machine: `docker volume
//! create -d ballast`, containers that write and read, two containers on one volume, a daemon
//! restart between containers, bad options, a refused remove, and failover of a 3-replica
//! volume to a new node after the plugin's node is killed.
//!
//! Docker finds the plugin `ballast` at /run/docker/plugins/ballast.sock, so these scenarios
//! take turns (`integration_tests::docker::turn`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::cluster::{cluster_args, node_dirs, nodes, wait_for, Cleanup};
use integration_tests::docker::{docker, docker_err, docker_ok, turn, DockerCleanup, IMAGE};
use integration_tests::etcd::Etcd;
use integration_tests::{Daemon, NodeDir};

const SOCKET: &str = "/run/docker/plugins/ballast.sock";

fn plugin_args(mut args: Vec<String>) -> Vec<String> {
    args.extend(["--docker-socket".to_owned(), SOCKET.to_owned()]);
    args
}

fn start_standalone(node: &NodeDir) -> Daemon {
    let mut d = Daemon::spawn(node, plugin_args(node.daemon_args_with_pool("4GiB"))).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

fn mount_root(node: &NodeDir) -> PathBuf {
    node.data_dir().join("docker")
}

fn run(volume: &str, script: &str) -> String {
    docker_ok([
        "run",
        "--rm",
        "-v",
        &format!("{volume}:/data"),
        IMAGE,
        "sh",
        "-c",
        script,
    ])
}

#[test]
fn volumes_through_the_real_engine() {
    let _turn = turn();
    let node = NodeDir::new().unwrap();
    let _cleanup = Cleanup::new(std::slice::from_ref(&node), &["dkr-v1"]);
    let _docker = DockerCleanup {
        containers: vec!["dkr-c1".into(), "dkr-c2".into(), "dkr-c3".into()],
        volumes: vec!["dkr-v1".into(), "dkr-bad".into()],
        mount_roots: vec![mount_root(&node)],
        sockets: vec![SOCKET.into()],
    };
    let mut d = start_standalone(&node);

    let create = || {
        docker_ok([
            "volume",
            "create",
            "-d",
            "ballast",
            "-o",
            "size=1GiB",
            "-o",
            "replicas=1",
            "dkr-v1",
        ])
    };
    create();
    // The same options again: nothing changes.
    create();
    run("dkr-v1", "echo hello > /data/f");
    assert_eq!(run("dkr-v1", "cat /data/f"), "hello");
    // Unmounted and detached once the containers are gone.
    assert!(host::mount::mount_at(&mount_root(&node).join("dkr-v1")).is_none());

    let ls = docker_ok(["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.lines().any(|l| l == "ballast dkr-v1"), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_str(&docker_ok(["volume", "inspect", "dkr-v1"])).unwrap();
    let v = &inspect[0];
    assert_eq!(v["Driver"], "ballast");
    assert_eq!(v["Scope"], "global");
    assert_eq!(v["Status"]["replicas"], 1);
    assert_eq!(v["Status"]["sizeBytes"], 1u64 << 30);
    assert_eq!(v["Status"]["state"], "online");
    assert_eq!(v["Status"]["replicaHealth"][0]["state"], "healthy");

    // Bad options: Docker shows our message.
    for (opt, want) in [
        ("size=banana", "invalid option size"),
        ("nosuch=1", "unknown option \"nosuch\""),
        ("replicas=9", "invalid option replicas"),
        ("fs=ntfs", "ntfs"),
        ("encrypted=true", "encrypted volumes are not available"),
    ] {
        let err = docker_err(["volume", "create", "-d", "ballast", "-o", opt, "dkr-bad"]);
        assert!(err.contains(want), "-o {opt}: {err}");
    }
    // Docker answers a create of a name it knows without asking the plugin; the volume keeps
    // its size.
    docker_ok([
        "volume",
        "create",
        "-d",
        "ballast",
        "-o",
        "size=2GiB",
        "dkr-v1",
    ]);
    let again: serde_json::Value =
        serde_json::from_str(&docker_ok(["volume", "inspect", "dkr-v1"])).unwrap();
    assert_eq!(again[0]["Status"]["sizeBytes"], 1u64 << 30);

    // Two containers at once: mounted until both are gone.
    for c in ["dkr-c1", "dkr-c2"] {
        docker_ok([
            "run",
            "-d",
            "--name",
            c,
            "-v",
            "dkr-v1:/data",
            IMAGE,
            "sleep",
            "600",
        ]);
    }
    let mounted = || host::mount::mount_at(&mount_root(&node).join("dkr-v1")).is_some();
    assert!(mounted());
    docker_ok(["exec", "dkr-c1", "sh", "-c", "echo from-c1 > /data/g"]);
    assert_eq!(docker_ok(["exec", "dkr-c2", "cat", "/data/g"]), "from-c1");
    // In use: removing the volume is refused.
    let err = docker_err(["volume", "rm", "dkr-v1"]);
    assert!(err.contains("in use"), "{err}");
    docker_ok(["rm", "-f", "dkr-c1"]);
    assert!(mounted(), "one container still uses it");
    assert_eq!(docker_ok(["exec", "dkr-c2", "cat", "/data/f"]), "hello");
    docker_ok(["rm", "-f", "dkr-c2"]);
    assert!(!mounted(), "the last container is gone");

    // The daemon restarts between two containers: the data is there.
    d.terminate().unwrap();
    let mut d = start_standalone(&node);
    assert_eq!(run("dkr-v1", "cat /data/f /data/g"), "hello\nfrom-c1");

    // The count survives a restart: a container started before it unmounts after it.
    docker_ok([
        "run",
        "-d",
        "--name",
        "dkr-c3",
        "-v",
        "dkr-v1:/data",
        IMAGE,
        "sleep",
        "600",
    ]);
    d.terminate().unwrap();
    let _d = start_standalone(&node);
    assert!(
        mounted(),
        "mounted again for its remaining user after the restart"
    );
    let err = docker_err(["volume", "rm", "dkr-v1"]);
    assert!(err.contains("in use"), "{err}");
    docker_ok(["rm", "-f", "dkr-c3"]);
    assert!(!mounted());
    assert_eq!(run("dkr-v1", "cat /data/f"), "hello");

    docker_ok(["volume", "rm", "dkr-v1"]);
    let ls = docker_ok(["volume", "ls", "--format", "{{.Name}}"]);
    assert!(!ls.lines().any(|l| l == "dkr-v1"), "{ls}");
    assert!(
        !docker(["volume", "inspect", "dkr-v1"]).status.success(),
        "removed"
    );
}

#[test]
fn a_new_node_on_the_plugin_socket_mounts_what_the_dead_one_wrote() {
    let _turn = turn();
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(4);
    let _cleanup = Cleanup::new(&dirs, &["dkr-ha"]);
    let _docker = DockerCleanup {
        containers: vec!["dkr-writer".into()],
        volumes: vec!["dkr-ha".into()],
        mount_roots: dirs.iter().map(mount_root).collect(),
        sockets: vec![SOCKET.into()],
    };
    let start = |node: &NodeDir, id: &str, zone: &str, socket: bool| {
        let mut args = cluster_args(node, id, zone, &etcd);
        if socket {
            args = plugin_args(args);
        }
        let mut d = Daemon::spawn(node, args).unwrap();
        d.wait_ready(Duration::from_secs(30)).unwrap();
        d
    };
    let mut a = start(&dirs[0], "node-a", "zone-a", true);
    let _b = start(&dirs[1], "node-b", "zone-b", false);
    let _c = start(&dirs[2], "node-c", "zone-c", false);
    wait_for("three nodes", Duration::from_secs(10), || {
        nodes(&a).len() == 3
    });

    docker_ok([
        "volume",
        "create",
        "-d",
        "ballast",
        "-o",
        "size=64MiB",
        "-o",
        "replicas=3",
        "dkr-ha",
    ]);
    // A container writes 8 MiB and their checksum, syncs, and keeps the volume mounted.
    docker_ok([
        "run",
        "-d",
        "--name",
        "dkr-writer",
        "-v",
        "dkr-ha:/data",
        IMAGE,
        "sh",
        "-c",
        "dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && \
         md5sum /data/blob > /data/blob.md5 && sync && echo written && sleep 600",
    ]);
    wait_for("the writer to finish", Duration::from_secs(60), || {
        docker_ok(["logs", "dkr-writer"]).contains("written")
    });

    a.kill().unwrap();
    let killed = Instant::now();
    // Node D joins and serves the plugin on the same socket.
    let _d = start(&dirs[3], "node-d", "zone-a", true);
    let sum = run("dkr-ha", "cd /data && md5sum -c blob.md5");
    eprintln!(
        "a new container on node-d read the volume {:.1} s after node-a was killed",
        killed.elapsed().as_secs_f64()
    );
    assert!(sum.ends_with("OK"), "{sum}");
    docker_ok(["rm", "-f", "dkr-writer"]);
    docker_ok(["volume", "rm", "dkr-ha"]);
}

/// Issue 16: a container keeps writing through the plugin's mount while the daemon is
/// SIGKILLed and started again, then stopped with SIGTERM and started again. Every write and
/// sync in the container succeeds (its script stops at the first error), every file it wrote
/// reads back with the checksum it recorded, and the mount is the same one throughout.
#[test]
fn a_container_keeps_writing_across_daemon_restarts() {
    let _turn = turn();
    let node = NodeDir::new().unwrap();
    let _cleanup = Cleanup::new(std::slice::from_ref(&node), &["dkr-rs"]);
    let _docker = DockerCleanup {
        containers: vec!["dkr-rs-writer".into()],
        volumes: vec!["dkr-rs".into()],
        mount_roots: vec![mount_root(&node)],
        sockets: vec![SOCKET.into()],
    };
    let mut d = start_standalone(&node);
    docker_ok([
        "volume",
        "create",
        "-d",
        "ballast",
        "-o",
        "size=256MiB",
        "dkr-rs",
    ]);
    docker_ok([
        "run",
        "-d",
        "--name",
        "dkr-rs-writer",
        "-v",
        "dkr-rs:/data",
        IMAGE,
        "sh",
        "-c",
        // At most 4,000 files of 16 KiB (64 MiB): a fast machine wrote 3,160 files of 64 KiB
        // in 14 s, near the 256 MiB pool's end, where a write fails with ENOSPC.
        "set -e; i=0; end=$(( $(date +%s) + 14 )); \
         while [ $(date +%s) -lt $end ] && [ $i -lt 4000 ]; do i=$((i+1)); \
         out=$(dd if=/dev/urandom of=/data/f$i bs=16k count=1 conv=fsync 2>&1) \
           || { echo \"f$i: $out\"; df /data; exit 1; }; \
         md5sum /data/f$i >> /data/sums; sync; done; \
         md5sum -c /data/sums > /dev/null; echo wrote $i files",
    ]);
    let mounted =
        host::mount::mount_at(&mount_root(&node).join("dkr-rs")).expect("the plugin's mount");
    for sigkill in [true, false] {
        std::thread::sleep(Duration::from_millis(3000));
        d.stop(sigkill);
        drop(d);
        d = start_standalone(&node);
        assert!(
            d.log().contains("took over the attach FUSE session"),
            "{}",
            d.log()
        );
    }
    // The writer still runs (14 s) on the same mount.
    assert_eq!(
        host::mount::mount_at(&mount_root(&node).join("dkr-rs")).map(|m| m.source),
        Some(mounted.source),
        "the same mount throughout"
    );
    let code = docker_ok(["wait", "dkr-rs-writer"]);
    let logs = docker_ok(["logs", "dkr-rs-writer"]);
    assert_eq!(code, "0", "the writer failed: {logs}");
    assert!(logs.contains("wrote "), "{logs}");
    eprintln!("a container across a daemon SIGKILL and a SIGTERM: {logs}");
    docker_ok(["rm", "-f", "dkr-rs-writer"]);
    assert_eq!(
        run("dkr-rs", "md5sum -c /data/sums | grep -vc ': OK$' || true"),
        "0"
    );
    docker_ok(["volume", "rm", "dkr-rs"]);
    drop(d);
}
