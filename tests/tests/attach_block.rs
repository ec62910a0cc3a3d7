//! Volumes attached as real block devices: FUSE file + loop device, driven through the CLI,
//! written and read with `dd` and O_DIRECT.
//!
//! Every test keeps a [`Cleanup`] guard between its node directory and its daemon, so that
//! even when a test fails (and the harness SIGKILLs the daemon) its loop devices, its
//! `/dev/ballast` links and its FUSE mount are removed. Volume names carry the test process
//! ID, because `/dev/ballast` is shared by every daemon on the machine.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{Daemon, NodeDir};
use rand::RngCore;

/// Removes what a test's daemon may leave behind: loop devices on its FUSE files, its links
/// in /dev/ballast and its FUSE mount. Only the test's own paths are touched.
struct Cleanup {
    fuse: PathBuf,
    names: Vec<String>,
}

impl Cleanup {
    fn new(node: &NodeDir) -> Self {
        Self {
            fuse: node.data_dir().join("fuse"),
            names: Vec::new(),
        }
    }

    /// A volume name unique on this machine, remembered for clean-up.
    fn name(&mut self, tag: &str) -> String {
        let name = format!("at{}-{tag}", std::process::id());
        self.names.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        integration_tests::release_attachments(&self.fuse, &self.names);
    }
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write the pattern file");
    data
}

fn dd(args: &[String]) {
    let out = Command::new("dd").args(args).output().expect("run dd");
    assert!(
        out.status.success(),
        "dd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write `src` to `dev` at `seek_mib` MiB with O_DIRECT.
fn write_direct(src: &Path, dev: &str, seek_mib: u64) {
    dd(&[
        format!("if={}", src.display()),
        format!("of={dev}"),
        "bs=1M".into(),
        format!("seek={seek_mib}"),
        "oflag=direct".into(),
        "conv=fsync,notrunc".into(),
        "status=none".into(),
    ]);
}

/// Read `mib` MiB of `dev` from `skip_mib` with O_DIRECT.
fn read_direct(dev: &str, dst: &Path, skip_mib: u64, mib: u64) -> Vec<u8> {
    dd(&[
        format!("if={dev}"),
        format!("of={}", dst.display()),
        "bs=1M".into(),
        format!("skip={skip_mib}"),
        format!("count={mib}"),
        "iflag=direct".into(),
        "status=none".into(),
    ]);
    std::fs::read(dst).expect("read back")
}

fn attach(daemon: &Daemon, name: &str) -> String {
    let out = daemon.cli(["volume", "attach", name]);
    out.success();
    out.stdout.trim().to_owned()
}

fn loop_of(link: &str) -> PathBuf {
    std::fs::read_link(link).unwrap_or_else(|e| panic!("{link} is not a link: {e}"))
}

#[test]
fn raw_block_round_trip_idempotency_and_busy_detach() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = Daemon::start(&node).unwrap();
    let name = clean.name("raw");
    daemon
        .cli(["volume", "create", &name, "--size", "64MiB"])
        .success();

    let dev = attach(&daemon, &name);
    assert_eq!(dev, format!("/dev/ballast/{name}"));
    let loop_dev = loop_of(&dev);
    assert!(loop_dev.to_string_lossy().starts_with("/dev/loop"));
    // Idempotent: the same device again.
    assert_eq!(attach(&daemon, &name), dev);
    assert_eq!(loop_of(&dev), loop_dev);
    let loop_name = loop_dev.file_name().unwrap().to_string_lossy().into_owned();
    let sector =
        std::fs::read_to_string(format!("/sys/block/{loop_name}/queue/logical_block_size"))
            .unwrap();
    assert_eq!(sector.trim(), "4096");

    let pattern = node.scratch("pattern");
    let data = random_file(&pattern, 4 << 20);
    write_direct(&pattern, &dev, 3);

    daemon.cli(["volume", "detach", &name]).success();
    assert!(!Path::new(&dev).exists(), "the link is removed on detach");
    // Idempotent.
    daemon.cli(["volume", "detach", &name]).success();

    let dev = attach(&daemon, &name);
    let back = read_direct(&dev, &node.scratch("back"), 3, 4);
    assert!(back == data, "data read after re-attach differs");
    let zeros = read_direct(&dev, &node.scratch("zeros"), 0, 1);
    assert!(zeros.iter().all(|b| *b == 0), "unwritten blocks read zero");

    // Busy: refused while open, done with --force.
    let holder = File::open(&dev).unwrap();
    daemon
        .cli(["volume", "detach", &name])
        .expect_code(1)
        .stderr_has("in use");
    assert!(Path::new(&dev).exists());
    daemon.cli(["volume", "detach", &name, "--force"]).success();
    drop(holder);
    assert!(!Path::new(&dev).exists());

    // Unknown volumes.
    let missing = clean.name("missing");
    daemon
        .cli(["volume", "attach", &missing])
        .expect_code(4)
        .stderr_has("not found");
    daemon.cli(["volume", "detach", &missing]).expect_code(4);
}

#[test]
fn many_volumes_at_once() {
    const N: usize = 32;
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = Daemon::start(&node).unwrap();
    let names: Vec<String> = (0..N).map(|i| clean.name(&format!("m{i}"))).collect();
    for name in &names {
        daemon
            .cli(["volume", "create", name, "--size", "16MiB"])
            .success();
    }
    // Attach concurrently, four at a time.
    let devs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(N / 4)
            .map(|chunk| {
                let daemon = &daemon;
                s.spawn(move || chunk.iter().map(|n| attach(daemon, n)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut loops: Vec<PathBuf> = devs.iter().map(|d| loop_of(d)).collect();
    loops.sort();
    loops.dedup();
    assert_eq!(loops.len(), N, "every volume has its own loop device");

    let mut patterns = Vec::new();
    for (i, dev) in devs.iter().enumerate() {
        let p = node.scratch(&format!("p{i}"));
        patterns.push(random_file(&p, 1 << 20));
        write_direct(&p, dev, (i % 8) as u64);
    }
    for (i, dev) in devs.iter().enumerate() {
        let back = read_direct(dev, &node.scratch("back"), (i % 8) as u64, 1);
        assert!(back == patterns[i], "volume {i} read back differs");
    }
    for name in &names {
        daemon.cli(["volume", "detach", name]).success();
    }
    for d in &devs {
        assert!(!Path::new(d).exists());
    }
}

#[test]
fn attached_volumes_survive_a_restart() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let mut daemon = Daemon::start(&node).unwrap();
    let name = clean.name("restart");
    daemon
        .cli(["volume", "create", &name, "--size", "32MiB"])
        .success();
    let dev = attach(&daemon, &name);
    let pattern = node.scratch("pattern");
    let data = random_file(&pattern, 2 << 20);
    write_direct(&pattern, &dev, 5);

    // Issue 16: a stop with volumes attached leaves the devices to the next daemon; one that
    // an application holds open is the same device after the restart, and works throughout.
    let held = File::open(&dev).unwrap();
    let loop_before = loop_of(&dev);
    assert!(daemon.terminate().unwrap().success());
    assert_eq!(loop_of(&dev), loop_before, "the link stays across a stop");
    drop(daemon);

    let daemon = Daemon::start(&node).unwrap();
    assert!(Path::new(&dev).exists(), "attached again after restart");
    assert_eq!(
        loop_of(&dev),
        loop_before,
        "the held loop device is taken over"
    );
    let mut through_held = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut through_held, 5 << 20).unwrap();
    assert!(
        through_held == data,
        "data read through the held device differs"
    );
    drop(held);
    let back = read_direct(&dev, &node.scratch("back"), 5, 2);
    assert!(back == data, "data read after restart differs");
    // Attaching again is a no-op on the restored device.
    assert_eq!(attach(&daemon, &name), dev);

    // A killed daemon leaves its devices to the next one, which takes the same loop device
    // over (none is held open now: the device stays configured all the same).
    let loop_dev = loop_of(&dev);
    let mut daemon = daemon;
    daemon.kill().unwrap();
    let daemon = Daemon::start(&node).unwrap();
    assert_eq!(
        loop_of(&dev),
        loop_dev,
        "the loop device is taken over after a crash"
    );
    let back = read_direct(&dev, &node.scratch("back2"), 5, 2);
    assert!(back == data, "data read after the crash differs");
    // A power cut takes the holder too: there is no session to take over. The next daemon
    // detaches the dead session's loop device and attaches the volume on a new session.
    let lost = loop_of(&dev);
    let mut daemon = daemon;
    daemon.kill().unwrap();
    integration_tests::kill_holder(&node);
    let daemon = Daemon::start(&node).unwrap();
    // The old device was detached, not left on the dead session: its backing file would then
    // show `/NAME`, the path inside the detached mount. (Another test may have the number now.)
    let old_backing = format!(
        "/sys/block/{}/loop/backing_file",
        lost.file_name().unwrap().to_string_lossy()
    );
    if let Ok(b) = std::fs::read_to_string(&old_backing) {
        assert_ne!(
            b.trim(),
            format!("/{name}"),
            "{} is left on the lost session",
            lost.display()
        );
    }
    let back = read_direct(&dev, &node.scratch("back3"), 5, 2);
    assert!(back == data, "data read after a lost session differs");
    let ours: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|b| b.contains(&*node.data_dir().to_string_lossy()))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "one loop device for the volume, none left over: {ours:?}"
    );
    let loop_dev = loop_of(&dev);
    // Detached, the loop device goes.
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        loop_dev.file_name().unwrap().to_string_lossy()
    );
    daemon.cli(["volume", "detach", &name]).success();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&backing)
        .is_ok_and(|b| b.contains(&*node.data_dir().to_string_lossy()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{} still backs {}",
            node.data_dir().display(),
            loop_dev.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `attached.json` records what to attach again at start-up. A corrupt one is never taken as
/// "nothing attached" (that silently forgets attachments and the next save overwrites it):
/// attaching fails with a message naming the file, and the file is left for the operator.
#[test]
fn corrupt_attachment_record_is_an_error_naming_it() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = Daemon::start(&node).unwrap();
    let name = clean.name("corrupt");
    daemon
        .cli(["volume", "create", &name, "--size", "16MiB"])
        .success();
    let record = node.data_dir().join("attached.json");
    std::fs::write(&record, b"[\"half-writ").unwrap();
    let out = daemon.cli(["volume", "attach", &name]);
    assert_ne!(out.code, Some(0), "attach succeeded over a corrupt record");
    assert!(
        out.stderr.contains("attached.json") && out.stderr.contains("corrupt"),
        "the error does not name the corrupt file: {}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(&record).unwrap(),
        b"[\"half-writ",
        "the corrupt record was overwritten"
    );
    assert!(
        !Path::new(&format!("/dev/ballast/{name}")).exists(),
        "a device was attached although its record could not be kept"
    );
}

/// An attach that fails after its device was set up (here its stable name cannot be made:
/// a directory is in the way) leaves nothing behind: no loop device, no attachment, so the
/// volume can be deleted.
#[test]
fn a_failed_attach_leaves_nothing_attached() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = Daemon::start(&node).unwrap();
    let name = clean.name("blocked");
    daemon
        .cli(["volume", "create", &name, "--size", "32MiB"])
        .success();
    let blocker = Path::new("/dev/ballast").join(&name);
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let refused = daemon.cli(["volume", "attach", &name]);
    std::fs::remove_dir_all(&blocker).unwrap();
    refused.expect_code(1).stderr_has("cannot create");
    let fuse_file = node.data_dir().join("fuse").join(&name);
    let backing = Command::new("losetup")
        .args(["-j", &fuse_file.display().to_string()])
        .output()
        .unwrap();
    assert!(
        backing.stdout.is_empty(),
        "a loop device is left on {}: {}",
        fuse_file.display(),
        String::from_utf8_lossy(&backing.stdout)
    );
    daemon.cli(["volume", "delete", &name]).success();
}

/// Run `dd` as user `nobody` (uid and gid 65534, no groups) reading one block of `path`
/// with O_DIRECT, or writing one if `write`; its stderr when it fails.
fn dd_as_nobody(path: &Path, write: bool) -> Result<(), String> {
    let file = path.display().to_string();
    let args = if write {
        vec![
            "if=/dev/zero".to_owned(),
            format!("of={file}"),
            "oflag=direct".into(),
            "conv=notrunc".into(),
        ]
    } else {
        vec![
            format!("if={file}"),
            "of=/dev/null".into(),
            "iflag=direct".into(),
        ]
    };
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "dd"])
        .args(args)
        .args(["bs=4096", "count=1", "status=none"])
        .output()
        .expect("run setpriv");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Issue 14: as user `nobody`, `dd` read and wrote an attached volume through
/// `<data-dir>/fuse/NAME`. Now the data directory is 0700, and even with it opened up the FUSE
/// mount checks permissions (`default_permissions`, files 0600 owned by root).
#[test]
fn a_local_user_who_is_not_root_cannot_open_an_attached_volume() {
    use std::os::unix::fs::PermissionsExt;
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = Daemon::start(&node).unwrap();
    let name = clean.name("perm");
    daemon
        .cli(["volume", "create", &name, "--size", "16MiB"])
        .success();
    attach(&daemon, &name);
    let fuse_file = node.data_dir().join("fuse").join(&name);
    // The test's own directories may be private (a tempdir is 0700); open them so that only
    // the daemon's permissions are tested.
    let mut dir = node.data_dir();
    while let Some(parent) = dir.parent().map(Path::to_path_buf) {
        if parent == Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(&parent).unwrap().permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(mode | 0o711))
                .unwrap();
        }
        dir = parent;
    }
    let data_mode = std::fs::metadata(node.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(data_mode & 0o777, 0o700, "the data directory is private");
    for write in [false, true] {
        let e = dd_as_nobody(&fuse_file, write).expect_err("nobody opened the volume");
        assert!(e.contains("Permission denied"), "{e}");
    }
    // Opened up by a careless admin, the directory still does not expose the volume.
    std::fs::set_permissions(node.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for write in [false, true] {
        let e = dd_as_nobody(&fuse_file, write).expect_err("nobody opened the volume");
        assert!(e.contains("Permission denied"), "{e}");
    }
    // Root still can.
    read_direct(&fuse_file.display().to_string(), &node.scratch("one"), 0, 1);
    daemon.cli(["volume", "detach", &name]).success();
}

fn fio(args: &[&str]) -> String {
    let out = Command::new("fio").args(args).output().expect("run fio");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio {args:?} failed: {text}");
    text
}

/// The names of the daemon's threads.
fn threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

/// Issue 15: FUSE over io_uring (`--fuse-transport io-uring`) serves a volume: the kernel
/// hands requests to the ring queues (one thread per possible CPU), many in flight at once
/// (fio verifies random writes at queue depth 32 and 1 MiB writes), data survives a detach
/// and attach, and the queues end with the session when the daemon stops.
#[test]
fn the_io_uring_transport_serves_a_volume_and_ends_with_the_daemon() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let mut args = node.daemon_args();
    args.extend(["--fuse-transport".into(), "io-uring".into()]);
    let mut daemon = Daemon::spawn(&node, &args).unwrap();
    daemon
        .wait_ready(std::time::Duration::from_secs(30))
        .unwrap();
    let name = clean.name("ring");
    daemon
        .cli(["volume", "create", &name, "--size", "128MiB"])
        .success();
    let dev = attach(&daemon, &name);
    let log = daemon.log();
    assert!(
        log.contains("FUSE requests go through io_uring"),
        "the daemon fell back to /dev/fuse: {log}"
    );
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last: usize = cpus
        .trim()
        .rsplit(['-', ','])
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let rings: Vec<String> = threads(daemon.pid())
        .into_iter()
        .filter(|t| t.starts_with("fuse-ring-"))
        .collect();
    assert!(
        rings.len() > last,
        "one ring thread per possible CPU, got {rings:?}"
    );

    let filename = format!("--filename={dev}");
    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("write", "1M", "8")] {
        let out = fio(&[
            "--name=ring",
            &filename,
            "--direct=1",
            "--ioengine=io_uring",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--size=64m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]);
        assert!(out.contains("err= 0"), "{out}");
    }
    let pattern = node.scratch("pattern");
    let data = random_file(&pattern, 4 << 20);
    write_direct(&pattern, &dev, 100);
    daemon.cli(["volume", "detach", &name]).success();
    let dev = attach(&daemon, &name);
    let back = read_direct(&dev, &node.scratch("back"), 100, 4);
    assert!(back == data, "data read after re-attach differs");
    daemon.cli(["volume", "detach", &name]).success();

    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{status}: {}", daemon.log());
    let log = daemon.log();
    assert!(!log.contains("FUSE ring entry failed"), "{log}");
    assert!(!log.contains("ring queue stopped"), "{log}");
}
