//! A real etcd for cluster tests: one member on free loopback ports in a temporary
//! directory, started by the test and killed when the handle drops (also on a panic).
//!
//! etcd comes from Debian's `etcd-server` package, which `scripts/test` installs; without it
//! the tests fail with a message that says so (they are never skipped). `BALLAST_TEST_ETCD`
//! may name another etcd binary.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BALLAST_TEST_ETCD") {
        return Ok(PathBuf::from(path));
    }
    for candidate in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(candidate).exists() {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("etcd is not installed; run `apt-get install etcd-server` (scripts/test does)")
}

/// A running etcd member.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    url: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Start etcd and wait until it answers `/health`.
    ///
    /// # Errors
    /// etcd is missing, exits, or does not answer within 20 s.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let child = Command::new(binary()?)
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log"))?)
            .spawn()
            .context("cannot start etcd; run `apt-get install etcd-server`")?;
        let mut etcd = Self {
            child,
            url,
            port,
            dir,
        };
        let start = Instant::now();
        while !etcd.healthy() {
            if let Some(status) = etcd.child.try_wait()? {
                bail!("etcd exited with {status}:\n{}", etcd.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not become healthy within 20s:\n{}", etcd.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    /// The client URL, for `--etcd`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!(
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
