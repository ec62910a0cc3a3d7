//! The real Docker engine for the plugin scenarios: a test image made with `docker import`
//! from Debian's busybox-static (no image can be pulled), `docker` commands, and a guard that
//! removes the containers, volumes and image a test made, even when it fails.

use std::process::{Command, Output};
use std::sync::Mutex;

/// The image the tests run: busybox, imported.
pub const IMAGE: &str = "ballast-test-busybox:latest";

/// The plugin scenarios share Docker's plugin socket path, so they run one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// `docker ARGS`, with its output.
///
/// # Panics
/// The docker client cannot be run.
pub fn docker<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker client")
}

/// `docker ARGS`, with its output and the command line as text for messages.
fn docker_shown<I, S>(args: I) -> (Output, String)
where
    I: IntoIterator<Item = S> + Clone,
    S: AsRef<std::ffi::OsStr>,
{
    let out = docker(args.clone());
    let shown: Vec<String> = args
        .into_iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    (out, shown.join(" "))
}

/// `docker ARGS`, which must succeed; returns its trimmed stdout.
///
/// # Panics
/// The command fails (its stderr is in the message).
pub fn docker_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S> + Clone,
    S: AsRef<std::ffi::OsStr>,
{
    let (out, shown) = docker_shown(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        shown,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker ARGS`, which must fail; returns its stderr.
///
/// # Panics
/// The command succeeds.
pub fn docker_err<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S> + Clone,
    S: AsRef<std::ffi::OsStr>,
{
    let (out, shown) = docker_shown(args);
    assert!(
        !out.status.success(),
        "docker {} should fail but printed {}",
        shown,
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Take this test's turn on the plugin socket ([`SERIAL`]) and make sure [`IMAGE`] exists.
pub fn turn() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ensure_image();
    guard
}

/// Import [`IMAGE`] from `/bin/busybox` unless it exists.
///
/// # Panics
/// busybox is missing or the import fails.
pub fn ensure_image() {
    if docker(["image", "inspect", IMAGE]).status.success() {
        return;
    }
    let root = tempfile::tempdir().expect("a temporary directory");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("/bin/busybox (Debian's busybox-static; scripts/test installs it)");
    for applet in [
        "sh", "cat", "echo", "ls", "sleep", "dd", "md5sum", "sync", "mount", "df",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-cf", "-", "."])
        .output()
        .expect("run tar");
    assert!(tar.status.success());
    let mut import = Command::new("docker")
        .args(["import", "-", IMAGE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run docker import");
    std::io::Write::write_all(import.stdin.as_mut().unwrap(), &tar.stdout).unwrap();
    assert!(import.wait().unwrap().success(), "docker import failed");
}

/// Removes, when dropped, the named containers and volumes (forcibly), then unmounts
/// whatever is left mounted under the given Docker mount roots.
#[derive(Debug, Default)]
pub struct DockerCleanup {
    /// Containers to remove.
    pub containers: Vec<String>,
    /// Volumes to remove.
    pub volumes: Vec<String>,
    /// Mount roots to clear.
    pub mount_roots: Vec<std::path::PathBuf>,
    /// Plugin sockets to remove (a killed daemon leaves its socket behind).
    pub sockets: Vec<std::path::PathBuf>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(["rm", "-f", c.as_str()]);
        }
        for v in &self.volumes {
            let _ = docker(["volume", "rm", "-f", v.as_str()]);
        }
        for root in &self.mount_roots {
            crate::unmount_all_under(root);
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}
