//! Issue 16: the daemon restarts under load and the application sees a pause, not an error.
//!
//! fio writes 4 KiB blocks at queue depth 8 to an attached volume with `--verify=crc32c` and
//! `--verify_backlog` (it reads back and checks what it wrote as it goes) while the daemon is
//! killed with SIGKILL, or stopped with SIGTERM, and started again, several times. The
//! attach session's `/dev/fuse` descriptors outlive each daemon in the holder process; the
//! next daemon takes them over and has the kernel send again what the dead one left
//! unanswered. Expected: fio ends with no I/O error and no verify failure, and its longest
//! I/O (the pause) is reported.
//!
//! No flush is needed for that: a write completes only once nothing it relies on is left
//! uncommitted (a block's first write commits before it completes), so a SIGKILL loses no
//! completed write, and a SIGTERM answers nothing once it starts handing over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{Daemon, NodeDir};

/// Kills fio and removes what the daemons leave behind (loop devices, links, the FUSE mount,
/// and with it the holder), even when the test fails.
struct Cleanup {
    fuse: PathBuf,
    names: Vec<String>,
    fio: Option<Child>,
    mount: Option<PathBuf>,
    /// Standing holders the test started.
    holders: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut fio) = self.fio.take() {
            let _ = fio.kill();
            let _ = fio.wait();
        }
        for mut h in self.holders.drain(..) {
            let _ = h.kill();
            let _ = h.wait();
        }
        if let Some(m) = self.mount.take() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        integration_tests::release_attachments(&self.fuse, &self.names);
    }
}

/// A node with a daemon and a 128 MiB volume named after `tag`, and its clean-up.
fn set_up(tag: &str) -> (NodeDir, String, Cleanup, Daemon) {
    let node = NodeDir::new().unwrap();
    let name = format!("rs{}-{tag}", std::process::id());
    let clean = Cleanup {
        fuse: node.data_dir().join("fuse"),
        names: vec![name.clone()],
        fio: None,
        mount: None,
        holders: Vec::new(),
    };
    let daemon = Daemon::start(&node).unwrap();
    daemon
        .cli(["volume", "create", &name, "--size", "128MiB"])
        .success();
    (node, name, clean, daemon)
}

/// Stop `daemon` with SIGKILL (or SIGTERM, which must exit cleanly) and start another.
fn restart(mut daemon: Daemon, node: &NodeDir, sigkill: bool) -> Daemon {
    daemon.stop(sigkill);
    drop(daemon);
    Daemon::start(node).unwrap()
}

fn start_fio(dev: &str, out: &Path, seconds: u64) -> Child {
    Command::new("fio")
        .args([
            "--name=restart",
            &format!("--filename={dev}"),
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=64m",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--output-format=json",
            &format!("--output={}", out.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Wait for `fio` (started by [`start_fio`] for `seconds`) and check it saw no error; print
/// what it did under `what`: the bytes it wrote and verified, and its longest I/O (the pause).
fn fio_outcome(mut fio: Child, report: &Path, seconds: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(seconds + 120);
    let status = loop {
        if let Some(s) = fio.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "fio hangs: a request was lost");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = fio.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let json = std::fs::read_to_string(report).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}): {stderr}\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("fio's JSON report");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{json}");
    let writes = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let reads = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(
        writes > 0 && reads > 0,
        "fio wrote {writes} and verified {reads} bytes"
    );
    // The pause may hit a write or a verifying read.
    let max_ms = ["write", "read"]
        .iter()
        .map(|d| job[*d]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6)
        .fold(0.0, f64::max);
    eprintln!(
        "{what} under fio: 0 errors, {} MiB written, {} MiB verified, longest I/O {max_ms:.0} ms",
        writes >> 20,
        reads >> 20
    );
}

/// Restart the daemon `kills` times with SIGKILL and `terms` times with SIGTERM (alternating)
/// under fio, and check fio's outcome.
fn restarts_under_fio(kills: usize, terms: usize) {
    let (node, name, mut clean, mut daemon) = set_up(&format!("{kills}-{terms}"));
    let out = daemon.cli(["volume", "attach", &name]);
    out.success();
    let dev = out.stdout.trim().to_owned();
    let report = node.scratch("fio.json");
    let cycles = kills + terms;
    let seconds = 3 + 3 * cycles as u64;
    clean.fio = Some(start_fio(&dev, &report, seconds));
    let began = Instant::now();
    for i in 0..cycles {
        std::thread::sleep(Duration::from_millis(1500));
        // The kills first, then the stops.
        daemon = restart(daemon, &node, i < kills);
        let log = daemon.log();
        assert!(
            log.contains("took over the attach FUSE session"),
            "restart {i} did not take the session over: {log}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(seconds),
            "the restarts outlasted fio; nothing was tested under load"
        );
    }
    fio_outcome(
        clean.fio.take().unwrap(),
        &report,
        seconds,
        &format!("{kills} SIGKILL and {terms} SIGTERM restarts"),
    );

    // Detached and stopped for good: the session ends, and the holder with it.
    daemon.cli(["volume", "detach", &name]).success();
    assert!(daemon.terminate().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !integration_tests::holder_pids(&node).is_empty() {
        assert!(Instant::now() < deadline, "the holder outlived its session");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fio_sees_no_error_across_daemon_kills() {
    restarts_under_fio(4, 0);
}

#[test]
fn fio_sees_no_error_across_daemon_stops_and_starts() {
    restarts_under_fio(0, 3);
}

/// The content of the writer's file `i`: 64 KiB that differ per file.
fn file_content(i: u64) -> Vec<u8> {
    let mut state = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// ext4 on the volume, a writer that fsyncs each file it writes (and its directory) and
/// records what it synced, while the daemon is killed and stopped under it: the writer sees
/// no error, every file it synced reads back intact, and `e2fsck -fn` finds the filesystem
/// clean after it is unmounted.
#[test]
fn ext4_keeps_every_synced_file_across_daemon_kills_and_stops() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (node, name, mut clean, mut daemon) = set_up("ext4");
    let mnt = node.scratch("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.to_string_lossy().into_owned();
    daemon
        .cli(["volume", "mount", &name, &mnt_s, "--fs", "ext4"])
        .success();
    clean.mount = Some(mnt.clone());

    // The writer rewrites 600 files of 64 KiB in turn (the filesystem never fills), syncing
    // each one and the directory, and records which write each file last synced.
    const FILES: u64 = 600;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), mnt.join("files"));
        std::thread::spawn(move || -> Result<Vec<Option<u64>>, String> {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let d = std::fs::File::open(&dir).map_err(|e| e.to_string())?;
            let mut synced = vec![None; FILES as usize];
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let path = dir.join(format!("f{}", i % FILES));
                let mut f = std::fs::File::create(&path).map_err(|e| format!("{path:?}: {e}"))?;
                f.write_all(&file_content(i))
                    .and_then(|()| f.sync_all())
                    .and_then(|()| d.sync_all())
                    .map_err(|e| format!("{path:?}: {e}"))?;
                synced[(i % FILES) as usize] = Some(i);
                i += 1;
            }
            Ok(synced)
        })
    };
    for sigkill in [true, false, true, false, true] {
        std::thread::sleep(Duration::from_millis(1200));
        daemon = restart(daemon, &node, sigkill);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let synced = writer.join().unwrap().expect("the writer saw an error");
    let written = synced.iter().flatten().count();
    assert!(written > 0, "the writer synced nothing");
    for (slot, last) in synced.iter().enumerate() {
        let Some(i) = last else { continue };
        let path = mnt.join("files").join(format!("f{slot}"));
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert!(
            got == file_content(*i),
            "{path:?} differs from what was synced"
        );
    }
    daemon.cli(["volume", "unmount", &name, &mnt_s]).success();
    clean.mount = None;
    let dev = format!("/dev/ballast/{name}");
    let fsck = Command::new("e2fsck").args(["-fn", &dev]).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    eprintln!(
        "ext4 across 3 SIGKILLs and 2 SIGTERMs: {written} files synced, all intact, e2fsck clean"
    );
    daemon.cli(["volume", "detach", &name]).success();
}

/// Wait until `daemon`'s log says `text`.
#[track_caller]
fn wait_log(daemon: &Daemon, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the daemon never logged {text:?}: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start fio on a new attachment of `name` for `seconds`; its JSON report's path.
fn attach_and_start_fio(
    daemon: &Daemon,
    node: &NodeDir,
    name: &str,
    clean: &mut Cleanup,
    seconds: u64,
) -> PathBuf {
    let out = daemon.cli(["volume", "attach", name]);
    out.success();
    let dev = out.stdout.trim().to_owned();
    let report = node.scratch(&format!("fio-{name}.json"));
    clean.fio = Some(start_fio(&dev, &report, seconds));
    report
}

/// `ballast daemon --upgrade`, from another copy of the binary, twice under fio: each new
/// daemon asks the running one to hand over, and starts once it has let go. fio sees no
/// error, and each old daemon exits cleanly on its own.
#[test]
fn fio_sees_no_error_across_upgrades_from_another_binary() {
    let (node, name, mut clean, mut daemon) = set_up("upgrade");
    let seconds = 10;
    let report = attach_and_start_fio(&daemon, &node, &name, &mut clean, seconds);
    let next = node.scratch("ballast-next");
    std::fs::copy(integration_tests::ballast_bin(), &next).unwrap();
    let binaries = [next.as_path(), integration_tests::ballast_bin()];
    for bin in binaries {
        std::thread::sleep(Duration::from_millis(1500));
        let mut args = node.daemon_args();
        args.push("--upgrade".into());
        let newer = Daemon::spawn_binary(&node, bin, args).unwrap();
        let status = daemon.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(
            status.success(),
            "the old daemon: {status}: {}",
            daemon.log()
        );
        assert!(
            daemon.log().contains("handing over to the next daemon"),
            "{}",
            daemon.log()
        );
        // Not `wait_ready`: until the old daemon stops, its `/readyz` answers at the address
        // the node's address file names.
        wait_log(&newer, "ballast daemon ready");
        let log = newer.log();
        assert!(
            log.contains("the daemon before handed over")
                && log.contains("took over the attach FUSE session"),
            "{log}"
        );
        daemon = newer;
    }
    fio_outcome(clean.fio.take().unwrap(), &report, seconds, "2 upgrades");

    // With no daemon running, --upgrade starts as usual.
    daemon.cli(["volume", "detach", &name]).success();
    assert!(daemon.terminate().unwrap().success());
    let mut args = node.daemon_args();
    args.push("--upgrade".into());
    let mut alone = Daemon::spawn(&node, args).unwrap();
    alone.wait_ready(Duration::from_secs(30)).unwrap();
    assert!(alone
        .log()
        .contains("no daemon runs on this data directory"));
}

/// Start a standing holder (`ballast holder --standing`) on `socket` for `node`'s session,
/// as the holder container of a pod would be.
fn standing_holder(node: &NodeDir, socket: &Path) -> Child {
    Command::new(integration_tests::ballast_bin())
        .arg("holder")
        .arg("--standing")
        .arg("--socket")
        .arg(socket)
        .arg("--mountpoint")
        .arg(node.data_dir().join("fuse"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start a standing holder")
}

/// What a Kubernetes DaemonSet update does (`maxSurge: 1`), with processes for pods: each pod
/// has a standing holder and a daemon given its socket (`--holder-socket`). The new pod's
/// daemon (`--upgrade`) has the old one hand over, finds the session in the old pod's holder,
/// moves it to its own holder and serves it, while the old daemon waits to be deleted
/// (`--after-hand-over wait`). Then the old pod goes (daemon and holder SIGKILLed), and the new
/// pod's daemon container restarts (SIGKILL, started again): fio sees no error throughout.
#[test]
fn a_pod_replacement_and_a_container_restart_under_fio_see_no_error() {
    let node = NodeDir::new().unwrap();
    let name = format!("rs{}-pods", std::process::id());
    let mut clean = Cleanup {
        fuse: node.data_dir().join("fuse"),
        names: vec![name.clone()],
        fio: None,
        mount: None,
        holders: Vec::new(),
    };
    let holders = node.scratch("holders");
    std::fs::create_dir_all(&holders).unwrap();
    let pod_args = |pod: &str| {
        let mut args = node.daemon_args();
        args.extend(
            [
                "--holder-socket",
                &holders.join(format!("{pod}.sock")).display().to_string(),
                "--after-hand-over",
                "wait",
                "--upgrade",
            ]
            .map(String::from),
        );
        args
    };
    clean
        .holders
        .push(standing_holder(&node, &holders.join("pod-a.sock")));
    let mut old = Daemon::spawn(&node, pod_args("pod-a")).unwrap();
    old.wait_ready(Duration::from_secs(30)).unwrap();
    old.cli(["volume", "create", &name, "--size", "128MiB"])
        .success();
    let seconds = 10;
    let report = attach_and_start_fio(&old, &node, &name, &mut clean, seconds);

    std::thread::sleep(Duration::from_millis(1500));
    clean
        .holders
        .push(standing_holder(&node, &holders.join("pod-b.sock")));
    let mut new = Daemon::spawn(&node, pod_args("pod-b")).unwrap();
    wait_log(&new, "ballast daemon ready");
    assert!(
        new.log()
            .contains("moved the attach session to this daemon's holder"),
        "{}",
        new.log()
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        old.try_status().unwrap().is_none(),
        "the old daemon must wait to be deleted: {}",
        old.log()
    );
    assert!(old.log().contains("handed over; waiting for SIGTERM"));
    // The old daemon, alive, reads no request any more: reads through the device complete
    // (one taken by a frozen worker would never be answered, having missed the RESEND).
    let link = format!("/dev/ballast/{name}");
    let mut dd = Command::new("dd")
        .args([&format!("if={link}"), "of=/dev/null", "bs=4k", "count=256"])
        .args(["iflag=direct", "status=none"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = loop {
        if let Some(status) = dd.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            // Killing the old daemon lets the next restart send its requests again.
            let _ = dd.kill();
            panic!("reads during the hand-over never complete: the old daemon took them");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(read.success(), "reads during the hand-over: {read}");
    // The old pod is deleted: its daemon and its holder go.
    old.kill().unwrap();
    let mut old_holder = clean.holders.remove(0);
    old_holder.kill().unwrap();
    old_holder.wait().unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    // The new pod's daemon container restarts; its holder container stays.
    new.kill().unwrap();
    let mut args = pod_args("pod-b");
    args.retain(|a| a != "--upgrade");
    let mut restarted = Daemon::spawn(&node, args).unwrap();
    restarted.wait_ready(Duration::from_secs(30)).unwrap();
    assert!(restarted
        .log()
        .contains("took over the attach FUSE session"));

    fio_outcome(
        clean.fio.take().unwrap(),
        &report,
        seconds,
        "a pod replacement and a container restart",
    );
    restarted.cli(["volume", "detach", &name]).success();
    assert!(restarted.terminate().unwrap().success());
}

/// Cluster mode: a 3-replica volume attached on node-a, fio verifying on it, while node-a's
/// daemon is SIGKILLed and started again, then stopped with SIGTERM and started again, and
/// then a replica node (node-b) is SIGKILLed and started again. fio sees no error; node-a
/// attaches the volume again as itself (no fencing of itself, no `--force`), and
/// every replica is healthy again at the end (node-b's by a delta rebuild or by staying in
/// step).
#[test]
fn a_three_replica_volume_sees_no_error_while_its_nodes_restart() {
    use integration_tests::cluster::{self, node_dirs, replica_states, three_nodes, wait_for};
    use integration_tests::etcd::Etcd;

    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let name = format!("rs{}-cluster", std::process::id());
    let _nodes_clean = cluster::Cleanup::new(&dirs, &[&name]);
    let mut clean = Cleanup {
        fuse: dirs[0].data_dir().join("fuse"),
        names: vec![name.clone()],
        fio: None,
        mount: None,
        holders: Vec::new(),
    };
    let [mut a, mut b, _c] = three_nodes(&dirs, &etcd);
    cluster::create_volume(&a, &name);
    let dev = cluster::attach(&a, &name);
    let report = dirs[0].scratch("fio-cluster.json");
    let seconds = 16;
    clean.fio = Some(start_fio(&dev, &report, seconds));

    for sigkill in [true, false] {
        std::thread::sleep(Duration::from_millis(2500));
        a.stop(sigkill);
        drop(a);
        a = cluster::start(&dirs[0], "node-a", "zone-a", &etcd);
        let log = a.log();
        assert!(log.contains("took over the attach FUSE session"), "{log}");
        assert!(!log.contains("cannot attach again"), "{log}");
    }
    std::thread::sleep(Duration::from_millis(2000));
    b.kill().unwrap();
    drop(b);
    b = cluster::start(&dirs[1], "node-b", "zone-b", &etcd);

    fio_outcome(
        clean.fio.take().unwrap(),
        &report,
        seconds,
        "3 replicas, attached node SIGKILLed and SIGTERMed, a replica node SIGKILLed",
    );
    wait_for("every replica healthy", Duration::from_secs(90), || {
        replica_states(&a, &name)
            .iter()
            .all(|(_, state)| state == "healthy")
    });
    // The attachment is still node-a's: another node may not take it without --force.
    let other = b.cli(["volume", "attach", &name]);
    assert_ne!(other.code, Some(0), "node-b attached a volume node-a holds");
    other.stderr_has("attached on node node-a");
    drop(b);
    a.cli(["volume", "detach", &name]).success();
}

/// `--upgrade` when the data directory is locked by something that does not answer the
/// hand-over request (here `flock(1)`, standing in for an older daemon): a clear error naming
/// the problem, exit 1, and nothing else started.
#[test]
fn an_upgrade_that_nobody_answers_fails_with_a_clear_error() {
    let node = NodeDir::new().unwrap();
    std::fs::create_dir_all(node.data_dir()).unwrap();
    let lock = node.data_dir().join("lock");
    let mut locker = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .expect("flock(1)");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Wait until the lock is taken: a non-blocking try fails from then on.
    while Command::new("flock")
        .args(["-n"])
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "flock(1) never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = node.daemon_args();
    args.push("--upgrade".into());
    let mut daemon = Daemon::spawn(&node, args).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(30)).unwrap();
    let _ = locker.kill();
    let _ = locker.wait();
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("--upgrade: the daemon running on this data directory")
            && log.contains("did not take the hand-over request"),
        "{log}"
    );
}
