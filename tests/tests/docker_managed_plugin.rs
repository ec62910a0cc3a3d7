//! The managed (v2) Docker plugin of `deploy/docker/`, end to end on this machine's Docker
//! engine: `build-plugin.sh` packages the binary under test (`$BALLAST_BIN`) with its tools and
//! `docker plugin create`s it, `docker plugin inspect` shows the config, `docker plugin set` +
//! `enable` start it, and real containers write and read a file on a Ballast volume. Running
//! the script again replaces the stopped plugin (an upgrade) and the file is still there:
//! settings and data directory carried over. Then the volume and the plugin are removed and
//! nothing is left mounted or attached.
//!
//! Needs a running Docker engine reachable by this user (root: the plugin and the build
//! script's chroot check need it) and a static busybox at `/bin/busybox` (Debian's
//! `busybox-static`, which `scripts/test` installs): it becomes the containers' image through
//! `docker import`, so nothing is pulled. Without either the test fails; it does not skip.
//!
//! Names carry the test process ID (plugin `ballast-test/ballast:ci-PID`, volume `mp-PID-…`,
//! image `ballast-mp-busybox:PID`), so the test never meets the v1 socket plugin `ballast` of
//! `docker_plugin.rs`, nor another run of itself. A [`Guard`] removes the containers, the
//! volume, the plugin, the image, the mounts and loop devices the plugin left, and the build
//! directory, also when the test fails.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::csi::MountsUnder;
use integration_tests::{ballast_bin, run_cli};
use serde_json::Value;

/// How long any one docker (or build) command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The plugin's data directory inside its rootfs, which is also its `propagatedMount`.
const DATA_DIR: &str = "/var/lib/ballast";

/// What a command did.
#[derive(Debug)]
struct Out {
    command: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "`{}` failed:\n{self}", self.command);
        self
    }

    fn succeeded(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}):\n{self}", self.command))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Run `cmd` to the end, killing it after [`COMMAND_TIMEOUT`].
fn run(mut cmd: Command) -> Out {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let mut raw = Vec::new();
                let _ = r.read_to_end(&mut raw);
                s = String::from_utf8_lossy(&raw).into_owned();
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) | Err(_) => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        let _ = write!(stderr, "\n(killed after {COMMAND_TIMEOUT:?})");
    }
    Out {
        command,
        code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        stdout: out.join().unwrap_or_default(),
        stderr,
    }
}

fn docker(args: &[&str]) -> Out {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(cmd)
}

/// `docker plugin inspect NAME`, the one object.
fn inspect_plugin(name: &str) -> Value {
    let v = docker(&["plugin", "inspect", name]).ok().json();
    v[0].clone()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Mount points at or under `root`, as this process sees them.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    host::mount::parse_mountinfo(&info)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Loop devices whose backing file is volume `name`'s file in some Ballast FUSE mount.
fn loops_of(name: &str) -> Vec<String> {
    let suffix = format!("/fuse/{name}");
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let dev = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (dev.starts_with("loop") && backing.trim().ends_with(&suffix)).then_some(dev)
        })
        .collect()
}

/// The plugin's lines of the engine's log, when the engine logs to a file this test knows.
fn plugin_log(id: &str) -> String {
    let Ok(log) = std::fs::read_to_string("/var/log/dockerd.log") else {
        return "(no /var/log/dockerd.log: see the engine's log, e.g. journalctl -u docker)"
            .to_owned();
    };
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
    lines[lines.len().saturating_sub(200)..].join("\n")
}

/// Everything the test creates, removed when dropped (best effort, errors ignored).
#[derive(Debug)]
struct Guard {
    plugin: String,
    image: String,
    containers: Vec<String>,
    /// Volumes that may still exist in Docker.
    volumes: Vec<String>,
    /// Every volume name used, for the loop device and link clean-up.
    names: Vec<String>,
    /// `<docker root>/plugins/<id>` once the plugin exists.
    plugin_dir: Option<PathBuf>,
    /// The engine's root directory.
    docker_root: PathBuf,
    /// Every ID the plugin had.
    ids: Vec<String>,
    work: tempfile::TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(id) = self
                .plugin_dir
                .as_ref()
                .and_then(|d| d.file_name())
                .map(|s| s.to_string_lossy().into_owned())
            {
                eprintln!(
                    "---- the plugin's log ----\n{}\n---- end of log ----",
                    plugin_log(&id)
                );
            }
        }
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let _ = docker(&["plugin", "disable", "-f", &self.plugin]);
        if let Some(dir) = &self.plugin_dir {
            drop(MountsUnder(dir.clone()));
        }
        for name in &self.names {
            for dev in loops_of(name) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{dev}"))
                    .status();
            }
            let _ = std::fs::remove_file(Path::new("/dev/ballast").join(name));
        }
        let _ = docker(&["plugin", "rm", "-f", &self.plugin]);
        // A data directory the build script set aside while replacing the plugin.
        for id in &self.ids {
            let _ =
                std::fs::remove_dir_all(self.docker_root.join(format!("ballast-plugin-keep-{id}")));
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// A `FROM scratch` image holding only the static busybox and the applets the test runs.
fn import_busybox(work: &Path, image: &str) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/test does)"
    );
    // ldd fails on a static binary; a dynamic busybox would not run in an empty image.
    let ldd = run({
        let mut c = Command::new("ldd");
        c.arg(busybox);
        c
    });
    assert!(
        !ldd.succeeded(),
        "/bin/busybox is dynamically linked (Debian's busybox package); the image needs the \
         static one from busybox-static:\n{ldd}"
    );
    let root = work.join("image");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "grep", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = work.join("image.tar");
    let mut c = Command::new("tar");
    c.arg("-cf").arg(&tar).arg("-C").arg(&root).arg(".");
    run(c).ok();
    docker(&["import", &tar.to_string_lossy(), image]).ok();
}

/// `docker run --rm` of `script` in the busybox image with `volume` at /data.
fn in_container(g: &mut Guard, tag: &str, volume: &str, script: &str) -> Out {
    let name = format!("mp-{}-{tag}", std::process::id());
    g.containers.push(name.clone());
    docker(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--network",
        "none",
        "-v",
        &format!("{volume}:/data"),
        &g.image,
        "sh",
        "-c",
        script,
    ])
}

fn build_plugin(name: &str, dir: &Path) -> Out {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker/build-plugin.sh");
    let mut c = Command::new("bash");
    c.arg(script)
        .arg(name)
        .env("BALLAST_BIN", ballast_bin())
        .env("BALLAST_PLUGIN_DIR", dir)
        .env_remove("BALLAST_PLUGIN_NO_CREATE");
    run(c)
}

#[test]
fn managed_plugin_runs_containers_on_a_ballast_volume() {
    let engine = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        engine.succeeded(),
        "this test needs a running Docker engine that this user may use:\n{engine}"
    );
    let root = docker(&["info", "--format", "{{.DockerRootDir}}"]);
    let docker_root = PathBuf::from(root.ok().stdout.trim());
    eprintln!(
        "Docker engine {}, root {}",
        engine.stdout.trim(),
        docker_root.display()
    );

    let pid = std::process::id();
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let mut guard = Guard {
        plugin: format!("ballast-test/ballast:ci-{pid}"),
        image: format!("ballast-mp-busybox:{pid}"),
        containers: Vec::new(),
        volumes: Vec::new(),
        names: Vec::new(),
        plugin_dir: None,
        docker_root: docker_root.clone(),
        ids: Vec::new(),
        work: tempfile::Builder::new()
            .prefix("ballast-mp-")
            .tempdir_in(&base)
            .expect("a work directory"),
    };
    let plugin = guard.plugin.clone();
    let build_dir = guard.work.path().join("plugin");

    // The build script assembles the rootfs and creates the plugin, disabled.
    let built = build_plugin(&plugin, &build_dir);
    built.ok();
    eprintln!("{}", built.stdout.trim());
    let rootfs = build_dir.join("rootfs");
    assert!(
        rootfs.join("bin/ballast").is_file(),
        "no binary in the rootfs"
    );
    for tool in [
        "mount",
        "umount",
        "blkid",
        "mkfs.ext4",
        "mkfs.xfs",
        "resize2fs",
        "xfs_growfs",
    ] {
        assert!(
            ["usr/sbin", "usr/bin", "sbin", "bin"]
                .iter()
                .any(|d| rootfs.join(d).join(tool).is_file()),
            "{tool} is not in the rootfs"
        );
    }
    let plugin_json = inspect_plugin(&plugin);
    let id = plugin_json["Id"].as_str().expect("a plugin ID").to_owned();
    guard.ids.push(id.clone());
    guard.plugin_dir = Some(docker_root.join("plugins").join(&id));
    assert_eq!(plugin_json["Enabled"], false);
    let config = &plugin_json["Config"];
    assert_eq!(config["Interface"]["Socket"], "ballast.sock");
    assert_eq!(
        strings(&config["Interface"]["Types"]),
        ["docker.volumedriver/1.0"]
    );
    assert_eq!(config["PropagatedMount"], DATA_DIR);
    assert_eq!(config["Network"]["Type"], "host");
    assert_eq!(strings(&config["Linux"]["Capabilities"]), ["CAP_SYS_ADMIN"]);
    assert_eq!(config["Linux"]["AllowAllDevices"], true);
    let entry = strings(&config["Entrypoint"]);
    assert_eq!(entry[..2], ["/bin/ballast", "daemon"]);
    for pair in [
        ["--docker-socket", "/run/docker/plugins/ballast.sock"],
        ["--data-dir", DATA_DIR],
    ] {
        assert!(
            entry.windows(2).any(|w| w == pair),
            "the entrypoint lacks {pair:?}: {entry:?}"
        );
    }
    assert!(
        config["Mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["Source"] == "/dev" && m["Destination"] == "/dev"),
        "the host's /dev is not mounted: {}",
        config["Mounts"]
    );
    assert_eq!(config["Args"]["Name"], "args");
    assert_eq!(strings(&config["Args"]["Settable"]), ["value"]);

    // TLS files in the plugin's data directory (as deploy/docker/README.md says), named in
    // its args: the node's identity, which TCP NBD exports need.
    let propagated = docker_root
        .join("plugins")
        .join(&id)
        .join("propagated-mount");
    let tls = propagated.join("tls");
    let ca = guard.work.path().join("ca");
    let bin = integration_tests::ballast_bin();
    for args in [
        vec!["ca", "init", "--dir", ca.to_str().unwrap()],
        vec![
            "cert",
            "issue",
            "--node",
            "mp-node",
            "--address",
            "127.0.0.1",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--out-dir",
            tls.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert!(out.status.success(), "ballast {args:?}: {out:?}");
    }
    std::fs::copy(ca.join("ca.pem"), tls.join("ca.pem")).unwrap();
    let in_plugin = |f: &str| format!("{DATA_DIR}/tls/{f}");
    let settings = [
        "--pool".to_owned(),
        format!("{DATA_DIR}/pool.img:512MiB"),
        "--http".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--node-id".to_owned(),
        "mp-node".to_owned(),
        "--tls-ca".to_owned(),
        in_plugin("ca.pem"),
        "--tls-cert".to_owned(),
        in_plugin("mp-node.pem"),
        "--tls-key".to_owned(),
        in_plugin("mp-node-key.pem"),
    ];

    // Settings, then start it.
    docker(&[
        "plugin",
        "set",
        &plugin,
        &format!("args={}", settings.join(" ")),
    ])
    .ok();
    docker(&["plugin", "enable", &plugin]).ok();
    let enabled = inspect_plugin(&plugin);
    assert_eq!(enabled["Enabled"], true);
    let args = enabled["Settings"]["Args"].clone();
    assert_eq!(strings(&args), settings);
    let pool = std::fs::metadata(propagated.join("pool.img"))
        .expect("the pool file in the plugin's data directory");
    assert_eq!(pool.len(), 512 << 20);
    let api = Path::new("/run/docker/plugins").join(&id).join("api.sock");
    assert!(api.exists(), "no API socket at {}", api.display());

    import_busybox(guard.work.path(), &guard.image);

    // A volume.
    let vol = format!("mp-{pid}-data");
    guard.names.push(vol.clone());
    guard.volumes.push(vol.clone());
    docker(&["volume", "create", "-d", &plugin, "-o", "size=64MiB", &vol]).ok();
    let vol_json = docker(&["volume", "inspect", &vol]).ok().json()[0].clone();
    assert_eq!(vol_json["Driver"], plugin.as_str());
    assert_eq!(vol_json["Scope"], "global");
    assert_eq!(vol_json["Status"]["sizeBytes"], 64 << 20);
    assert_eq!(vol_json["Status"]["replicas"], 1);
    let listed = run_cli(&api, ["volume", "ls", "-o", "json"]);
    listed.success().stdout_has(&vol);
    // The plugin's daemon runs on the certificate from its settings: a TCP export is TLS.
    let export = run_cli(
        &api,
        [
            "volume",
            "export",
            &vol,
            "--tcp",
            "127.0.0.1:0",
            "-o",
            "json",
        ],
    );
    export.success();
    assert_eq!(export.json()["tls"], true, "{}", export.stdout);

    // One container writes, another reads.
    let writer = in_container(
        &mut guard,
        "w",
        &vol,
        "echo x > /data/f && grep ' /data ' /proc/mounts",
    );
    writer.ok();
    assert!(
        writer.stdout.contains("/data ext4"),
        "/data is not the volume's ext4:\n{writer}"
    );
    let reader = in_container(&mut guard, "r", &vol, "cat /data/f");
    assert_eq!(reader.ok().stdout, "x\n");

    // With no container left the volume is unmounted and detached on this node.
    let mount_point = propagated.join("docker").join(&vol);
    assert!(
        !mounts_under(&mount_point).contains(&mount_point),
        "{} is still mounted",
        mount_point.display()
    );
    assert_eq!(loops_of(&vol), Vec::<String>::new(), "still attached");

    // A volume holds a reference on its driver, so a plain disable is refused.
    let refused = docker(&["plugin", "disable", &plugin]);
    assert!(
        !refused.succeeded() && refused.stderr.contains("in use"),
        "disabling a plugin that has volumes should be refused:\n{refused}"
    );
    docker(&["plugin", "disable", "-f", &plugin]).ok();

    // Building again replaces the disabled plugin (an upgrade): a new plugin, with the old
    // one's settings and data directory (pool, volume, data), which `docker plugin rm` alone
    // would have deleted.
    build_plugin(&plugin, &build_dir).ok();
    let upgraded = inspect_plugin(&plugin);
    let new_id = upgraded["Id"].as_str().expect("a plugin ID").to_owned();
    assert_ne!(new_id, id, "the second build should replace the plugin");
    guard.ids.push(new_id.clone());
    guard.plugin_dir = Some(docker_root.join("plugins").join(&new_id));
    assert_eq!(upgraded["Enabled"], false);
    assert_eq!(
        upgraded["Settings"]["Args"], args,
        "the settings carried over"
    );
    assert!(!docker_root.join("plugins").join(&id).exists());
    assert!(!docker_root
        .join(format!("ballast-plugin-keep-{id}"))
        .exists());
    let propagated = docker_root
        .join("plugins")
        .join(&new_id)
        .join("propagated-mount");
    assert_eq!(
        std::fs::metadata(propagated.join("pool.img"))
            .expect("the pool file carried over")
            .len(),
        512 << 20
    );
    docker(&["plugin", "enable", &plugin]).ok();
    let again = in_container(&mut guard, "r2", &vol, "cat /data/f");
    assert_eq!(again.ok().stdout, "x\n");
    let id = new_id;
    let api = Path::new("/run/docker/plugins").join(&id).join("api.sock");

    // Remove the volume, stop and remove the plugin: nothing is left.
    docker(&["volume", "rm", &vol]).ok();
    guard.volumes.clear();
    let listed = run_cli(&api, ["volume", "ls", "-o", "json"]);
    assert!(
        !listed.success().stdout.contains(&vol),
        "the volume is still in the pool:\n{listed}"
    );
    docker(&["plugin", "disable", &plugin]).ok();
    let plugin_dir = docker_root.join("plugins").join(&id);
    assert_eq!(
        mounts_under(&plugin_dir),
        Vec::<PathBuf>::new(),
        "mounts left after disable"
    );
    assert_eq!(loops_of(&vol), Vec::<String>::new(), "loop device left");
    docker(&["plugin", "rm", &plugin]).ok();
    assert!(!plugin_dir.exists(), "{} is left", plugin_dir.display());
    docker(&["rmi", &guard.image]).ok();
}
