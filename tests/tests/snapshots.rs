//! Snapshots and clones through the CLI and the local API of a real daemon (standalone), with
//! ext4 on the volumes: a snapshot taken while a writer fsyncs files holds every file synced
//! before it; a clone reads the snapshot and its writes leave the source alone; a volume is
//! reverted only once detached; deletes free space; snapshots outlive a daemon restart; and
//! bad requests get clear errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{release_fuse, unmount_all_under, Daemon, NodeDir};
use serde_json::Value;

const NOT_FOUND: i32 = 4;
const CONFLICT: i32 = 5;
const INVALID_ARGUMENT: i32 = 6;
const USAGE: i32 = 2;

/// Unmounts what the test mounted, kills its writer and releases the FUSE session, also when
/// the test fails.
struct Cleanup {
    scratch: PathBuf,
    fuse: PathBuf,
    writer: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(w) = &mut self.writer {
            let _ = w.kill();
            let _ = w.wait();
        }
        unmount_all_under(&self.scratch);
        release_fuse(&self.fuse);
    }
}

fn start(node: &NodeDir) -> Daemon {
    let mut d = Daemon::spawn(node, node.daemon_args_with_pool("1GiB")).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

fn dir(node: &NodeDir, name: &str) -> PathBuf {
    let d = node.scratch(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The files the writer logged as synced, in order.
fn synced(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn content(i: &str) -> String {
    format!("file {i}\n").repeat(300)
}

#[test]
fn snapshots_and_clones_through_the_cli() {
    let node = NodeDir::new().unwrap();
    let mut clean = Cleanup {
        scratch: node.scratch(""),
        fuse: node.data_dir().join("fuse"),
        writer: None,
    };
    let mut d = start(&node);
    let src = dir(&node, "src");
    let copy = dir(&node, "copy");
    d.cli(["volume", "create", "db", "--size", "128MiB"])
        .success();
    d.cli(["volume", "mount", "db", s(&src), "--fs", "ext4"])
        .success();
    std::fs::write(src.join("before"), "before the snapshot\n").unwrap();
    integration_tests::run_tool("sync", &[]);

    // A writer that fsyncs each file, then logs its name (outside the volume).
    let log = node.scratch("synced.log");
    clean.writer = Some(
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); \
                     printf 'file %s\\n' $i | awk '{{for(j=0;j<300;j++)print}}' > {d}/f$i && \
                     sync {d}/f$i && echo $i >> {log} || exit 1; done",
                    d = s(&src),
                    log = s(&log)
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while synced(&log).len() < 20 {
        assert!(Instant::now() < deadline, "the writer does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Taken while it writes: what was synced before the call is in the snapshot.
    let before = synced(&log);
    let snap = d.cli(["snapshot", "create", "db", "s1", "-o", "json"]);
    snap.success();
    let snap = snap.json();
    assert_eq!(snap["source_volume"], "db");
    assert_eq!(snap["ready_to_use"], true);
    assert_eq!(snap["size_bytes"], 128 << 20);
    // Idempotent; another volume cannot take the name.
    d.cli(["snapshot", "create", "db", "s1"])
        .success()
        .stdout_has("already exists");
    d.cli(["volume", "create", "other", "--size", "16MiB"])
        .success();
    d.cli(["snapshot", "create", "other", "s1"])
        .expect_code(CONFLICT)
        .stderr_has("already exists");

    // The writer goes on past the snapshot, then the source changes a file it had.
    let deadline = Instant::now() + Duration::from_secs(60);
    while synced(&log).len() < before.len() + 20 {
        assert!(
            Instant::now() < deadline,
            "the writer stopped after the snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "files synced before the snapshot: {}, in all: {}",
        before.len(),
        synced(&log).len()
    );
    let mut w = clean.writer.take().unwrap();
    let _ = w.kill();
    let _ = w.wait();
    std::fs::write(src.join("before"), "changed after the snapshot\n").unwrap();
    integration_tests::run_tool("sync", &[]);

    // A clone of the snapshot: the files synced before it, the old "before".
    let c = d.cli([
        "volume",
        "create",
        "copy",
        "--from-snapshot",
        "s1",
        "-o",
        "json",
    ]);
    c.success();
    assert_eq!(c.json()["size_bytes"], 128 << 20);
    let m = d.cli(["volume", "mount", "copy", s(&copy), "-o", "json"]);
    m.success();
    assert_eq!(m.json()["formatted"], false, "a clone keeps its filesystem");
    assert_eq!(
        std::fs::read_to_string(copy.join("before")).unwrap(),
        "before the snapshot\n"
    );
    for i in &before {
        let got = std::fs::read_to_string(copy.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("file f{i}, synced before the snapshot, is not in it: {e}"));
        assert_eq!(got, content(i), "file f{i} in the clone");
    }
    // Files synced well after the snapshot are not in it.
    let last = synced(&log).last().cloned().unwrap();
    assert!(!copy.join(format!("f{last}")).exists());
    // Writes to the clone leave the source alone.
    std::fs::write(copy.join("before"), "the clone's\n").unwrap();
    integration_tests::run_tool("sync", &[]);
    assert_eq!(
        std::fs::read_to_string(src.join("before")).unwrap(),
        "changed after the snapshot\n"
    );

    // Listing and inspecting, as tables and JSON.
    let list = d.cli(["snapshot", "list", "-o", "json"]);
    list.success();
    let list: Vec<Value> = serde_json::from_value(list.json()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "s1");
    assert!(list[0]["shared_bytes"].as_u64().unwrap() > 0);
    d.cli(["snapshot", "list"])
        .success()
        .stdout_has("s1")
        .stdout_has("db");
    d.cli(["snapshot", "inspect", "s1"])
        .success()
        .stdout_has("exclusive");

    // Revert: refused while attached, then the source reads the snapshot again.
    d.cli(["volume", "revert", "db", "--snapshot", "s1"])
        .expect_code(1)
        .stderr_has("detach it");
    d.cli(["volume", "unmount", "db", s(&src)]).success();
    d.cli(["volume", "detach", "db"]).success();
    d.cli(["volume", "revert", "other", "--snapshot", "s1"])
        .expect_code(1)
        .stderr_has("not taken of volume other");
    d.cli(["volume", "revert", "db", "--snapshot", "s1"])
        .success()
        .stdout_has("reverted");
    d.cli(["volume", "mount", "db", s(&src)]).success();
    assert_eq!(
        std::fs::read_to_string(src.join("before")).unwrap(),
        "before the snapshot\n"
    );

    // A copy of a volume as it is now.
    d.cli(["volume", "create", "copy2", "--from-volume", "db"])
        .success();
    let j = d.cli(["volume", "inspect", "copy2", "-o", "json"]);
    j.success();
    assert_eq!(j.json()["size_bytes"], 128 << 20);
    // Thin: it owns nothing yet and reads what it shares with db.
    assert_eq!(j.json()["allocated_bytes"], 0, "{}", j.json());
    assert!(
        j.json()["shared_bytes"].as_u64().unwrap() > 0,
        "{}",
        j.json()
    );
    d.cli(["volume", "inspect", "copy2"])
        .success()
        .stdout_has("read from its snapshots");

    // Snapshots outlive a restart.
    d.cli(["volume", "unmount", "db", s(&src)]).success();
    d.cli(["volume", "unmount", "copy", s(&copy)]).success();
    d.stop(false);
    drop(d);
    let d = start(&node);
    d.cli(["snapshot", "inspect", "s1"]).success();

    // Deleting the snapshot its clone is based on keeps what the clone reads.
    d.cli(["snapshot", "delete", "s1"]).success();
    d.cli(["snapshot", "inspect", "s1"]).expect_code(NOT_FOUND);
    d.cli(["volume", "mount", "copy", s(&copy)]).success();
    assert_eq!(
        std::fs::read_to_string(copy.join("before")).unwrap(),
        "the clone's\n"
    );
    assert_eq!(
        std::fs::read_to_string(copy.join(format!("f{}", before[0]))).unwrap(),
        content(&before[0])
    );
    d.cli(["volume", "unmount", "copy", s(&copy)]).success();
    for v in ["copy", "copy2", "db", "other"] {
        d.cli(["volume", "detach", v]).success();
        d.cli(["volume", "delete", v]).success();
    }
    // Nothing is left allocated once every volume and snapshot is gone.
    let pools = d.cli(["pool", "list", "-o", "json"]);
    pools.success();
    assert_eq!(pools.json()[0]["allocated_bytes"], 0, "{}", pools.json());
}

#[test]
fn bad_snapshot_requests_get_clear_errors() {
    let node = NodeDir::new().unwrap();
    let d = Daemon::start(&node).unwrap();
    d.cli(["snapshot", "create", "nope", "s1"])
        .expect_code(NOT_FOUND)
        .stderr_has("volume nope");
    d.cli(["snapshot", "create", "db", "Bad_Name"])
        .expect_code(INVALID_ARGUMENT)
        .stderr_has("lowercase DNS labels");
    d.cli(["snapshot", "delete", "nope"])
        .expect_code(NOT_FOUND)
        .stderr_has("snapshot list");
    d.cli(["volume", "create", "x", "--from-snapshot", "nope"])
        .expect_code(NOT_FOUND);
    d.cli(["volume", "create", "x"])
        .expect_code(USAGE)
        .stderr_has("--size");
    d.cli([
        "volume",
        "create",
        "x",
        "--from-snapshot",
        "a",
        "--from-volume",
        "b",
    ])
    .expect_code(USAGE);
    d.cli(["volume", "create", "db", "--size", "16MiB"])
        .success();
    d.cli(["snapshot", "create", "db", "s1"]).success();
    d.cli([
        "volume",
        "create",
        "small",
        "--from-snapshot",
        "s1",
        "--size",
        "8MiB",
    ])
    .expect_code(INVALID_ARGUMENT)
    .stderr_has("at least its size");
    d.cli(["volume", "create", "db", "--from-snapshot", "s1"])
        .expect_code(CONFLICT);
    // The API refuses a create with neither a size nor a source.
    let r = d
        .api("POST", "/v1/volumes", Some(r#"{"name": "y"}"#))
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("size is required"));
    // A source's name is checked with the body.
    let r = d
        .api(
            "POST",
            "/v1/volumes",
            Some(r#"{"name": "y", "source": {"snapshot": "Bad_Name"}}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("lowercase DNS labels"));
    // A snapshot of a deleted volume stays, and says its volume is gone.
    d.cli(["volume", "delete", "db"]).success();
    let j = d.cli(["snapshot", "inspect", "s1", "-o", "json"]);
    j.success();
    assert_eq!(j.json()["source_volume"], "db");
    assert_eq!(j.json()["source_exists"], false);
    d.cli(["snapshot", "list"])
        .success()
        .stdout_has("(deleted)");
}
