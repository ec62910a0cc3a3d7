//! The scenario-test harness: real `ballast` daemons in temporary directories, driven through
//! the real CLI, the real API socket and the real HTTP endpoint. Nothing is mocked.
//!
//! - [`ballast_bin`] finds the binary: `$BALLAST_BIN` if set (as `scripts/test` does), else
//!   `<target dir>/debug/ballast` after running `cargo build -p daemon` (a no-op when it is
//!   fresh), so a plain `cargo test -p integration-tests` never tests a stale or missing binary.
//! - [`NodeDir`] is one node's directories: a data dir and a 256 MiB pool file under
//!   `$BALLAST_TEST_DIR` (default `/var/tmp`, a real filesystem where `O_DIRECT` works), and
//!   the API socket in a short temporary directory (unix socket paths are limited to 107 bytes).
//!   Both are removed when it drops.
//! - [`Daemon`] is one running daemon on a [`NodeDir`], listening on `127.0.0.1:0`; it knows
//!   its bound address from `<data-dir>/http.addr`. Dropping it SIGKILLs the process if it still
//!   runs, also while a failing test unwinds, and then prints the daemon's log.
//!   Daemons log at `info`, or at `$BALLAST_TEST_LOG` (a `RUST_LOG` filter) when set.
//! - [`run_cli`] runs one CLI command and captures its exit code, stdout and stderr.
//! - [`etcd`] runs a real etcd (stoppable and restartable); [`cluster`] starts three-node
//!   clusters and cuts the network (`iptables`, network namespaces); [`workload`] is a
//!   verifying writer that finds every acknowledged write after a scenario.
//!
//! Declare a `NodeDir` before the `Daemon`s that use it: locals drop in reverse order, so the
//! daemons are killed before their directories are removed.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod chaos;
pub mod cluster;
pub mod csi;
pub mod docker;
pub mod etcd;
pub mod nbd;
pub mod power;
pub mod workload;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The size of each test node's pool file.
pub const POOL_SIZE: &str = "256MiB";

/// How long a daemon may take to become ready, or to exit.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `ballast` binary under test.
///
/// # Panics
/// If `$BALLAST_BIN` names a missing file, or the binary is missing and cannot be built.
/// If it exists but cargo fails (say, offline), the existing binary is used with a warning.
pub fn ballast_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BALLAST_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "BALLAST_BIN={} does not exist",
                bin.display()
            );
            return bin;
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let bin = target.join("debug").join("ballast");
        // Always ask cargo: it does nothing when the binary is fresh, and it keeps a test run
        // from silently exercising a stale daemon. (A nested cargo does not deadlock with the
        // `cargo test` that runs us: cargo releases the build lock before running tests.)
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--quiet", "-p", "daemon", "--bin", "ballast"])
            .current_dir(workspace)
            .status();
        match built {
            Ok(status) if status.success() => {}
            _ if bin.is_file() => eprintln!(
                "warning: `cargo build -p daemon` failed ({built:?}); testing the existing {}",
                bin.display()
            ),
            _ => panic!(
                "{} is missing and `cargo build -p daemon` failed: {built:?}",
                bin.display()
            ),
        }
        bin
    })
}

/// One node's directories: data dir, pool file and API socket path.
#[derive(Debug)]
pub struct NodeDir {
    state: TempDir,
    run: TempDir,
}

impl NodeDir {
    /// Fresh, empty directories.
    ///
    /// # Errors
    /// The temporary directories cannot be created.
    pub fn new() -> Result<Self> {
        let base = std::env::var_os("BALLAST_TEST_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        std::fs::create_dir_all(&base)
            .with_context(|| format!("cannot create {}", base.display()))?;
        let state = tempfile::Builder::new()
            .prefix("ballast-test-")
            .tempdir_in(&base)
            .with_context(|| {
                format!("cannot create a temporary directory in {}", base.display())
            })?;
        let run = tempfile::Builder::new()
            .prefix("ballast-run-")
            .tempdir()
            .context("cannot create a socket directory")?;
        Ok(Self { state, run })
    }

    /// The daemon's `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.state.path().join("data")
    }

    /// The control file of this node's disk faults (test builds): write `error`, `error-all`
    /// or `hang` to it, remove it to heal.
    pub fn disk_faults(&self) -> PathBuf {
        self.state.path().join("disk-faults")
    }

    /// The power-cut journal of this node's disk (test builds): when this file exists as the
    /// daemon starts, every write is recorded there until durable, so
    /// [`crate::power::cut`] can undo what no flush had made durable.
    pub fn power_journal(&self) -> PathBuf {
        self.state.path().join("disk-faults.undo")
    }

    /// The pool file.
    pub fn pool(&self) -> PathBuf {
        self.state.path().join("pool.img")
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.run.path().join("api.sock")
    }

    /// The file the daemon writes its bound HTTP address into.
    pub fn http_addr_file(&self) -> PathBuf {
        self.data_dir().join("http.addr")
    }

    /// A scratch path inside the node's state directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.state.path().join(name)
    }

    /// The daemon flags for this node: data dir, pool, socket, HTTP on port 0, node ID.
    pub fn daemon_args(&self) -> Vec<String> {
        self.daemon_args_with_pool(POOL_SIZE)
    }

    /// [`NodeDir::daemon_args`] with a pool file of `size` (sparse), e.g. `2GiB`.
    pub fn daemon_args_with_pool(&self, size: &str) -> Vec<String> {
        vec![
            "daemon".into(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--pool".into(),
            format!("{}:{size}", self.pool().display()),
            "--api-socket".into(),
            self.socket().display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            "test-node".into(),
        ]
    }

    /// Run a CLI command against this node's socket.
    pub fn cli<I, S>(&self, args: I) -> CliOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_cli(&self.socket(), args)
    }
}

/// A running (or exited) `ballast daemon` process.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    socket: PathBuf,
    addr_file: PathBuf,
    log: PathBuf,
    http: Option<SocketAddr>,
}

impl Daemon {
    /// Start a daemon on `node` with the standard flags and wait until `/readyz` says ready.
    ///
    /// # Errors
    /// The daemon exits or is not ready within [`START_TIMEOUT`]; the error includes its log.
    pub fn start(node: &NodeDir) -> Result<Self> {
        let mut daemon = Self::spawn(node, node.daemon_args())?;
        daemon.wait_ready(START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Start `ballast <args>` for `node` without waiting for anything. Its output goes to a
    /// log file in the node's state directory.
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn<I, S>(node: &NodeDir, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_wrapped(node, &[], args)
    }

    /// [`Daemon::spawn`] under the file-creation mask `umask` (through `sh`, which execs the
    /// daemon).
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn_under_umask<I, S>(node: &NodeDir, umask: u32, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let script = format!("umask {umask:03o}; exec \"$0\" \"$@\"");
        Self::spawn_wrapped(node, &["sh", "-c", &script], args)
    }

    /// [`Daemon::spawn`] inside the network namespace `netns`, through `ip netns exec` (which
    /// execs the daemon, so [`Daemon::pid`] and killing work as usual). The daemon's
    /// `--http` and `--listen` addresses must be reachable in `netns`.
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn_in_netns<I, S>(node: &NodeDir, netns: &str, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_wrapped(node, &["ip", "netns", "exec", netns], args)
    }

    /// [`Daemon::spawn`] of another binary than the one under test (a copy of it, for an
    /// upgrade from a different file).
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn_binary<I, S>(node: &NodeDir, binary: &Path, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        // `sh -c SCRIPT BALLAST ARGS...`: the script ignores `$0` (the binary under test).
        let script = format!("exec '{}' \"$@\"", binary.display());
        Self::spawn_wrapped(node, &["sh", "-c", &script], args)
    }

    fn spawn_wrapped<I, S>(node: &NodeDir, wrapper: &[&str], args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let log = node.scratch(&format!(
            "daemon-{}.log",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(ballast_bin());
                c
            }
            None => Command::new(ballast_bin()),
        };
        let child = command
            .args(args)
            .env_remove("BALLAST_API_SOCKET")
            // A debug build fails or hangs this node's disk when the file says so
            // (`volume::io::faults`); see `NodeDir::disk_faults`.
            .env("BALLAST_FAILPOINTS", node.disk_faults())
            .env(
                "RUST_LOG",
                std::env::var("BALLAST_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", ballast_bin().display()))?;
        Ok(Self {
            child,
            status: None,
            socket: node.socket(),
            addr_file: node.http_addr_file(),
            log,
            http: None,
        })
    }

    /// Wait until `GET /readyz` answers 200 on the address the daemon wrote to `http.addr`.
    ///
    /// The file is re-read on every try, so an address left by an earlier, killed daemon is
    /// simply not answered and replaced once this daemon writes its own.
    ///
    /// # Errors
    /// The daemon exits or is not ready within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                bail!(
                    "the daemon exited with {status} before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if let Some(addr) = read_addr(&self.addr_file) {
                if let Ok(r) = http_request_tcp(addr, "GET", "/readyz", None) {
                    if r.status == 200 {
                        self.http = Some(addr);
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon was not ready within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API socket this daemon was started with.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound HTTP address (known once ready).
    ///
    /// # Panics
    /// If the daemon was never ready.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("the daemon has not been ready yet")
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    /// Run a CLI command against this daemon.
    pub fn cli<I, S>(&self, args: I) -> CliOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_cli(&self.socket, args)
    }

    /// `method path` on the HTTP endpoint.
    ///
    /// # Errors
    /// The connection fails.
    pub fn http(&self, method: &str, path: &str) -> Result<HttpResponse> {
        http_request_tcp(self.http_addr(), method, path, None)
    }

    /// `method path` with an optional JSON body on the local API socket.
    ///
    /// # Errors
    /// The connection fails.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<HttpResponse> {
        let stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        http_exchange(stream, method, path, body)
    }

    /// Send `signal` to the daemon.
    ///
    /// # Errors
    /// `kill(2)` fails.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).context("kill")
    }

    /// SIGTERM the daemon and wait for it to exit.
    ///
    /// # Errors
    /// It does not exit within [`START_TIMEOUT`].
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(START_TIMEOUT)
    }

    /// SIGKILL the daemon and reap it.
    ///
    /// # Errors
    /// `kill(2)` or `wait(2)` fails.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.child.kill().context("kill")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().context("wait")?.is_none() {
            if Instant::now() > deadline {
                // A daemon stuck in its exit waits on the kernel: show where, for the record
                // (the holder gives the session up after its limit, which frees it).
                eprintln!("{}", stuck_report(self.pid()));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = self.child.wait().context("wait")?;
        self.status = Some(status);
        Ok(status)
    }

    /// Stop the daemon as a crash does (SIGKILL) or as a planned restart does (SIGTERM, after
    /// which it must exit 0), for the restart tests.
    ///
    /// # Panics
    /// A SIGTERM that does not end in a clean exit (the panic shows the daemon's log).
    pub fn stop(&mut self, sigkill: bool) {
        if sigkill {
            self.kill().expect("SIGKILL the daemon");
            return;
        }
        let status = self.terminate().expect("SIGTERM the daemon");
        assert!(status.success(), "SIGTERM: {status}: {}", self.log());
    }

    /// Wait for the daemon to exit on its own.
    ///
    /// # Errors
    /// It is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if it has exited, `None` while it runs.
    ///
    /// # Errors
    /// `wait(2)` fails.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("wait")?;
        }
        Ok(self.status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- log of ballast daemon pid {} ----\n{}---- end of log ----",
                self.pid(),
                self.log()
            );
        }
    }
}

fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What a CLI command did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Assert the exit code is `code`; returns `self` for chaining.
    ///
    /// # Panics
    /// If it is not, showing the whole output.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "`{}` exit code; output:\n{self}",
            self.command
        );
        self
    }

    /// Assert success (exit code 0).
    ///
    /// # Panics
    /// If the command failed.
    #[track_caller]
    pub fn success(&self) -> &Self {
        self.expect_code(0)
    }

    /// Assert standard error contains `text`.
    ///
    /// # Panics
    /// If it does not.
    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "`{}` stderr lacks {text:?}; output:\n{self}",
            self.command
        );
        self
    }

    /// Assert standard output contains `text`.
    ///
    /// # Panics
    /// If it does not.
    #[track_caller]
    pub fn stdout_has(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "`{}` stdout lacks {text:?}; output:\n{self}",
            self.command
        );
        self
    }

    /// Standard output parsed as JSON.
    ///
    /// # Panics
    /// If it is not JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}` printed invalid JSON ({e}); output:\n{self}",
                self.command
            )
        })
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `ballast <args>` with `BALLAST_API_SOCKET` set to `socket`.
///
/// # Panics
/// If the binary cannot be run at all.
pub fn run_cli<I, S>(socket: &Path, args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = std::iter::once("ballast".to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(ballast_bin())
        .args(&args)
        .env("BALLAST_API_SOCKET", socket)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ballast_bin().display()));
    CliOutput {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    ///
    /// # Errors
    /// It is not JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", self.body))
    }
}

/// One HTTP/1.1 request over TCP.
///
/// # Errors
/// The connection or the exchange fails.
pub fn http_request_tcp(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    http_exchange(stream, method, path, body)
}

/// One HTTP/1.1 request with `Connection: close`, read to the end. Enough HTTP for tests: the
/// daemon always sends `Content-Length` bodies.
fn http_exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        bail!("chunked answers are not supported by this test client");
    }
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Best-effort clean-up of a test's attachments, for `Drop` guards, even after its daemon was
/// killed: remove each `/dev/ballast/NAME` link of `names`, detach its loop device if (and only
/// if) the device is backed by a file under this test's FUSE mount `fuse`, then lazily unmount
/// `fuse`. Nothing outside the test's own paths is touched.
pub fn release_attachments(fuse: &Path, names: &[String]) {
    for name in names {
        let link = Path::new("/dev/ballast").join(name);
        if let Ok(dev) = std::fs::read_link(&link) {
            let _ = std::fs::remove_file(&link);
            let backing = std::fs::read_to_string(format!(
                "/sys/block/{}/loop/backing_file",
                dev.file_name().unwrap_or_default().to_string_lossy()
            ))
            .unwrap_or_default();
            if backing.trim().starts_with(&*fuse.to_string_lossy()) {
                let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            }
        }
    }
    let _ = Command::new("umount")
        .arg("-l")
        .arg(fuse)
        .stderr(std::process::Stdio::null())
        .status();
}

/// The kernel stacks of `pid`'s threads and of every process in uninterruptible sleep.
fn stuck_report(pid: u32) -> String {
    let mut out = format!("ballast daemon {pid} is not gone 10 s after SIGKILL; kernel stacks:\n");
    let stack = |task: &Path| {
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let stack = std::fs::read_to_string(task.join("stack")).unwrap_or_default();
        format!("-- {} {}{stack}", task.display(), comm)
    };
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            out.push_str(&stack(&t.path()));
        }
    }
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('D'))
        {
            out.push_str(&stack(&p.path()));
        }
    }
    out
}

/// The processes of the FUSE descriptor holder (`ballast holder`) of `node`'s daemons.
pub fn holder_pids(node: &NodeDir) -> Vec<u32> {
    let needle = node.data_dir().join("fuse-holder.sock");
    let needle = needle.to_string_lossy();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&*needle)
                .then_some(pid)
        })
        .collect()
}

/// SIGKILL the holder of `node`'s attach session: what a power cut of the machine does to it
/// (with no daemon holding the session either, its devices fail their I/O).
pub fn kill_holder(node: &NodeDir) {
    for pid in holder_pids(node) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Best-effort lazy unmount of everything mounted under `root`, deepest first, so a failed
/// test leaves no filesystem of a volume mounted.
pub fn unmount_all_under(root: &Path) {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = host::mount::parse_mountinfo(&info)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&p)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Best-effort clean-up of every loop device backed by a file under the FUSE mount `fuse`
/// (whichever daemon set it up, alive or killed), then a lazy unmount of `fuse`.
pub fn release_fuse(fuse: &Path) {
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing =
                std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if name.starts_with("loop") && backing.trim().starts_with(&*fuse.to_string_lossy()) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{name}"))
                    .status();
            }
        }
    }
    let _ = Command::new("umount")
        .arg("-l")
        .arg(fuse)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Run a tool (`qemu-img`, `nbdcopy`, …), failing the test with its output unless it
/// succeeds; its standard output.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
