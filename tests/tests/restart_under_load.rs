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
//! Before the kills, the area is written once and flushed: a block's *first* write is durable
//! only after a flush (its checksum is committed then; see `volume::pool::disk`), so a
//! SIGKILL may lose a first write that was never flushed, as a power cut loses what sits in a
//! disk's volatile cache. Overwrites of flushed blocks survive a SIGKILL without a flush, and a
//! SIGTERM loses nothing: the daemon answers nothing once it starts handing over.
//!
//! The short version runs in CI; `bench/scripts/restart.sh` runs the long one.

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
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut fio) = self.fio.take() {
            let _ = fio.kill();
            let _ = fio.wait();
        }
        integration_tests::release_attachments(&self.fuse, &self.names);
    }
}

/// The processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
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

/// Restart the daemon `kills` times with SIGKILL and `terms` times with SIGTERM (alternating)
/// under fio, and check fio's outcome.
fn restarts_under_fio(kills: usize, terms: usize) {
    let node = NodeDir::new().unwrap();
    let name = format!("rs{}-{kills}-{terms}", std::process::id());
    let mut clean = Cleanup {
        fuse: node.data_dir().join("fuse"),
        names: vec![name.clone()],
        fio: None,
    };
    let mut daemon = Daemon::start(&node).unwrap();
    daemon
        .cli(["volume", "create", &name, "--size", "128MiB"])
        .success();
    let out = daemon.cli(["volume", "attach", &name]);
    out.success();
    let dev = out.stdout.trim().to_owned();
    if kills > 0 {
        let out = Command::new("dd")
            .args([
                "if=/dev/urandom",
                &format!("of={dev}"),
                "bs=1M",
                "count=64",
                "oflag=direct",
                "conv=fsync,notrunc",
                "status=none",
            ])
            .output()
            .expect("run dd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = node.scratch("fio.json");
    let cycles = kills + terms;
    let seconds = 3 + 3 * cycles as u64;
    clean.fio = Some(start_fio(&dev, &report, seconds));
    let began = Instant::now();
    for i in 0..cycles {
        std::thread::sleep(Duration::from_millis(1500));
        // The kills first, then the stops.
        let sigkill = i < kills;
        let status = if sigkill {
            daemon.kill().unwrap()
        } else {
            daemon.terminate().unwrap()
        };
        assert!(sigkill || status.success(), "SIGTERM: {status}");
        daemon = Daemon::start(&node).unwrap();
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
    let mut fio = clean.fio.take().unwrap();
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
    let json = std::fs::read_to_string(&report).unwrap_or_default();
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
    let max_ms = job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
    eprintln!(
        "{kills} SIGKILL and {terms} SIGTERM restarts under fio: 0 errors, {} MiB written, {} MiB verified, longest write {max_ms:.0} ms",
        writes >> 20,
        reads >> 20
    );

    // Detached and stopped for good: the session ends, and the holder with it.
    daemon.cli(["volume", "detach", &name]).success();
    assert!(daemon.terminate().unwrap().success());
    let socket = node.data_dir().join("fuse-holder.sock");
    let socket = socket.to_string_lossy();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&socket).is_empty() {
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
