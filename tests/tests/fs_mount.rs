//! Filesystem mode: `ballast volume mount` / `unmount` with real mkfs, mount, fsck and a real
//! daemon crash.
//!
//! Needs e2fsprogs and xfsprogs (mkfs.ext4, e2fsck, mkfs.xfs, xfs_repair); the xfs test fails
//! (it does not skip) when they are missing.
//!
//! Every test keeps a [`Cleanup`] guard between its node directory and its daemon, so that even
//! when a test fails its mounts (under its own node directory), its loop devices, its
//! `/dev/ballast` links and its FUSE mount are removed, and its writer processes killed. Volume
//! names carry the test process ID, because `/dev/ballast` is shared by every daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{Daemon, NodeDir};
use rand::RngCore;

/// Removes what a test leaves behind; only the test's own paths are touched.
struct Cleanup {
    fuse: PathBuf,
    names: Vec<String>,
    mounts: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Cleanup {
    fn new(node: &NodeDir) -> Self {
        Self {
            fuse: node.data_dir().join("fuse"),
            names: Vec::new(),
            mounts: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A volume name unique on this machine, remembered for clean-up.
    fn name(&mut self, tag: &str) -> String {
        let name = format!("fm{}-{tag}", std::process::id());
        self.names.push(name.clone());
        name
    }

    /// A new empty directory in the node's scratch space, unmounted on clean-up.
    fn mount_point(&mut self, node: &NodeDir, tag: &str) -> PathBuf {
        let dir = node.scratch(tag);
        std::fs::create_dir_all(&dir).expect("create the mount point");
        self.mounts.push(dir.clone());
        dir
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.mounts {
            if is_mount_point(dir) {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
        integration_tests::release_attachments(&self.fuse, &self.names);
    }
}

/// Start a daemon on `node` whose pool is 1 GiB (mkfs.xfs needs at least 300 MiB).
fn start(node: &NodeDir) -> Daemon {
    let args: Vec<String> = node
        .daemon_args()
        .into_iter()
        .map(|a| a.replace(&format!(":{}", integration_tests::POOL_SIZE), ":1GiB"))
        .collect();
    let mut daemon = Daemon::spawn(node, args).unwrap();
    daemon.wait_ready(Duration::from_secs(30)).unwrap();
    daemon
}

fn is_mount_point(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == path)
}

/// Run a command; returns its exit code and combined output.
fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is it installed?): {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).exists());
        assert!(
            found,
            "{tool} is not installed; this test needs it (apt-get install e2fsprogs xfsprogs)"
        );
    }
}

/// Write a few files of random data under `dir`; returns (relative path, contents).
fn write_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    let mut files = Vec::new();
    for (i, rel) in ["a.bin", "sub/b.bin", "sub/deeper/c.bin"]
        .iter()
        .enumerate()
    {
        let mut data = vec![0u8; (i + 1) * (1 << 20) + 123];
        rand::thread_rng().fill_bytes(&mut data);
        std::fs::write(dir.join(rel), &data).unwrap();
        files.push((PathBuf::from(rel), data));
    }
    files
}

fn check_files(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (rel, data) in files {
        let back = std::fs::read(dir.join(rel))
            .unwrap_or_else(|e| panic!("{} is gone: {e}", rel.display()));
        assert!(back == *data, "{} differs", rel.display());
    }
}

fn sync() {
    assert_eq!(run("sync", &[]).0, 0);
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn round_trip(fs: &str, size: &str, fsck: &[&str]) {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let mut daemon = start(&node);
    let name = clean.name(fs);
    let mnt = clean.mount_point(&node, "mnt");
    let m = path_str(&mnt);
    daemon
        .cli(["volume", "create", &name, "--size", size])
        .success();

    let first = daemon.cli(["volume", "mount", &name, m, "--fs", fs, "-o", "json"]);
    first.success();
    let info = first.json();
    assert_eq!(info["formatted"], true, "{first}");
    assert_eq!(info["fs"], fs);
    assert!(is_mount_point(&mnt));
    // Idempotent.
    daemon
        .cli(["volume", "mount", &name, m, "--fs", fs])
        .success()
        .stdout_has("already mounted");

    let files = write_files(&mnt);
    sync();
    daemon.cli(["volume", "unmount", &name, m]).success();
    assert!(!is_mount_point(&mnt));
    daemon
        .cli(["volume", "unmount", &name, m])
        .success()
        .stdout_has("not mounted");
    daemon.cli(["volume", "detach", &name]).success();

    assert!(daemon.terminate().unwrap().success());
    drop(daemon);
    let daemon = start(&node);

    let again = daemon.cli(["volume", "mount", &name, m, "-o", "json"]);
    again.success();
    assert_eq!(again.json()["formatted"], false, "reformatted! {again}");
    assert_eq!(again.json()["fs"], fs);
    check_files(&mnt, &files);
    daemon.cli(["volume", "unmount", &name, m]).success();

    let dev = format!("/dev/ballast/{name}");
    let mut args = fsck.to_vec();
    args.push(&dev);
    let (code, out) = run(args[0], &args[1..]);
    assert_eq!(code, 0, "{args:?} is not clean:\n{out}");

    // Checksums once more after fsck, through a read-only mount.
    daemon
        .cli(["volume", "mount", &name, m, "--read-only"])
        .success();
    check_files(&mnt, &files);
    daemon.cli(["volume", "unmount", &name, m]).success();
    daemon.cli(["volume", "detach", &name]).success();
}

#[test]
fn ext4_round_trip_survives_restart_without_reformat() {
    require_tools(&["mkfs.ext4", "e2fsck", "blkid"]);
    round_trip("ext4", "128MiB", &["e2fsck", "-fn"]);
}

#[test]
fn xfs_round_trip_survives_restart_without_reformat() {
    require_tools(&["mkfs.xfs", "xfs_repair", "blkid"]);
    // mkfs.xfs refuses filesystems under 300 MiB.
    round_trip("xfs", "512MiB", &["xfs_repair", "-n"]);
}

#[test]
fn bad_mount_points_wrong_fs_and_busy_detach() {
    require_tools(&["mkfs.ext4", "blkid"]);
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let daemon = start(&node);
    let name = clean.name("bad");
    daemon
        .cli(["volume", "create", &name, "--size", "64MiB"])
        .success();

    let missing = node.scratch("no-such-dir");
    daemon
        .cli(["volume", "mount", &name, path_str(&missing)])
        .expect_code(6)
        .stderr_has("does not exist");
    let file = node.scratch("a-file");
    std::fs::write(&file, b"x").unwrap();
    daemon
        .cli(["volume", "mount", &name, path_str(&file)])
        .expect_code(6)
        .stderr_has("not a directory");
    assert!(
        !Path::new(&format!("/dev/ballast/{name}")).exists(),
        "a refused mount does not attach"
    );
    let unknown = clean.name("unknown");
    let mnt = clean.mount_point(&node, "mnt");
    let m = path_str(&mnt);
    daemon
        .cli(["volume", "mount", &unknown, m])
        .expect_code(4)
        .stderr_has("not found");

    // A mount that fails after attaching (mkfs refuses its options) leaves nothing attached.
    daemon
        .cli([
            "volume",
            "mount",
            &name,
            m,
            "--mkfs-options",
            "--no-such-mkfs-option",
        ])
        .expect_code(1);
    assert!(
        !Path::new(&format!("/dev/ballast/{name}")).exists(),
        "a failed mount leaves the volume attached"
    );

    // Formats as ext4 (the default), then never as anything else.
    daemon
        .cli(["volume", "mount", &name, m])
        .success()
        .stdout_has("formatted as ext4");
    std::fs::write(mnt.join("keep"), b"data").unwrap();
    sync();

    // Already mounted read-write: a read-only mount there is refused, not silently accepted.
    daemon
        .cli(["volume", "mount", &name, m, "--read-only"])
        .expect_code(1)
        .stderr_has("already mounted read-write");

    // Detach while mounted is refused.
    daemon
        .cli(["volume", "detach", &name])
        .expect_code(1)
        .stderr_has("in use");
    assert!(is_mount_point(&mnt));

    // Something else mounted at the path: another mount point is refused for a second volume.
    let other = clean.name("other");
    daemon
        .cli(["volume", "create", &other, "--size", "64MiB"])
        .success();
    daemon
        .cli(["volume", "mount", &other, m])
        .expect_code(1)
        .stderr_has("another device");
    daemon
        .cli(["volume", "unmount", &other, m])
        .expect_code(1)
        .stderr_has("another device");

    daemon.cli(["volume", "unmount", &name, m]).success();
    daemon
        .cli(["volume", "mount", &name, m, "--fs", "xfs"])
        .expect_code(1)
        .stderr_has("never reformatted");
    daemon
        .cli(["volume", "mount", &name, m, "--fs", "ext4"])
        .success();
    assert_eq!(std::fs::read(mnt.join("keep")).unwrap(), b"data");
    daemon.cli(["volume", "unmount", &name, m]).success();
    daemon.cli(["volume", "detach", &name]).success();
    daemon.cli(["volume", "detach", &other]).success();
}

/// ext4 mounted on a volume, two writers busy, the daemon SIGKILLed: the writers pause until
/// the restarted daemon takes the attach session over, then finish with no error, and the
/// filesystem is clean (issue 16; before it, their I/O failed and e2fsck had to repair).
#[test]
fn daemon_crash_while_writing_pauses_the_writers_and_fsck_is_clean() {
    require_tools(&["mkfs.ext4", "e2fsck", "blkid"]);
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup::new(&node);
    let mut daemon = start(&node);
    let name = clean.name("crash");
    let mnt = clean.mount_point(&node, "mnt");
    let m = path_str(&mnt);
    daemon
        .cli(["volume", "create", &name, "--size", "256MiB"])
        .success();
    daemon
        .cli(["volume", "mount", &name, m, "--fs", "ext4"])
        .success();
    let files = write_files(&mnt);
    sync();
    let dev = format!("/dev/ballast/{name}");
    let loop_dev = std::fs::read_link(&dev).unwrap();

    // Writers: one big dd, one shell loop creating small files.
    clean.children.push(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                &format!("of={m}/big"),
                "bs=64k",
                "count=2000",
                "conv=fsync",
                "status=none",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(node.data_dir().join("../dd.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    clean.children.push(
        Command::new("sh")
            .args([
                "-c",
                // A bounded set of files, rewritten over and over: on a slow machine an
                // unbounded one filled the filesystem before dd ended (dd then failed with
                // ENOSPC, which looked like an I/O error across the crash).
                &format!(
                    "i=0; while :; do echo $i > {m}/small.$((i % 2000)) || exit 0; i=$((i+1)); done"
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Kill the daemon only once both writers are visibly writing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(mnt.join("small.50").exists()
        && std::fs::metadata(mnt.join("big")).is_ok_and(|m| m.len() > 0))
    {
        assert!(Instant::now() < deadline, "the writers did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill().unwrap();
    // Kept for a failure's message: what the killed daemon did last.
    let killed_log = daemon.log();
    drop(daemon);

    // Issue 16: the holder keeps the attach session, so the writers only pause; the next
    // daemon takes the session over and they go on. The big write ends with an fsync.
    let daemon = start(&node);
    assert_eq!(
        std::fs::read_link(&dev).unwrap(),
        loop_dev,
        "the mounted loop device is taken over"
    );
    let dd = &mut clean.children[0];
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = dd.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dd did not finish after the restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "dd failed across the crash: {status}; it said {:?}; df: {}; the holder's log: {:?}; \
         the kernel's last messages:\n{}\nthe killed daemon's last log lines:\n{}",
        std::fs::read_to_string(node.data_dir().join("../dd.err")).unwrap_or_default(),
        run("df", &["-h", "-i", m]).1,
        std::fs::read_to_string(node.data_dir().join("fuse-holder.log")).unwrap_or_default(),
        tail(&run("dmesg", &["-T"]).1, 30),
        tail(&killed_log, 40)
    );
    assert_eq!(
        std::fs::metadata(mnt.join("big")).unwrap().len(),
        2000 * 64 * 1024,
        "the big file is whole"
    );
    let small = clean.children.get_mut(1).unwrap();
    assert!(
        small.try_wait().unwrap().is_none(),
        "the small-file writer stopped (a write failed)"
    );
    for child in &mut clean.children {
        let _ = child.kill();
        let _ = child.wait();
    }
    clean.children.clear();
    check_files(&mnt, &files);
    daemon.cli(["volume", "unmount", &name, m]).success();
    // ext4 never saw a crash: clean without a repair.
    let (code, out) = run("e2fsck", &["-fn", &dev]);
    assert_eq!(
        code, 0,
        "e2fsck -fn is not clean after the daemon crash:\n{out}"
    );

    let again = daemon.cli(["volume", "mount", &name, m, "-o", "json"]);
    again.success();
    assert_eq!(again.json()["formatted"], false);
    check_files(&mnt, &files);
    daemon.cli(["volume", "unmount", &name, m]).success();
    daemon.cli(["volume", "detach", &name]).success();
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
