//! A real etcd for cluster tests: one member on free loopback ports in a temporary
//! directory, started by the test and killed when the handle drops (also on a panic). A test
//! may [`Etcd::stop`] it (an outage) and [`Etcd::restart`] it on the same data and ports.
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

fn spawn(
    dir: &tempfile::TempDir,
    listen: &str,
    url: &str,
    peer: &str,
    extra: &[String],
) -> Result<Child> {
    // Appends, so the log of a restarted etcd keeps the earlier run's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("etcd.log"))?;
    Command::new(binary()?)
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            listen,
            "--advertise-client-urls",
            url,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("t={peer}")])
        // One local member: a short election timeout makes a (re)start elect itself within
        // ~0.2 s instead of ~1 s, so an outage can be kept shorter than a node's lease.
        .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start etcd; run `apt-get install etcd-server`")
}

/// A running etcd member.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    running: bool,
    url: String,
    /// Every client URL etcd listens on (`url` first).
    client_urls: String,
    peer: String,
    port: u16,
    /// Where `/health` is served over plain HTTP (the client port, or with TLS a metrics
    /// port).
    health_port: u16,
    /// The TLS flags, when etcd serves clients over TLS.
    extra: Vec<String>,
    dir: tempfile::TempDir,
    /// The cluster CA of the nodes using this etcd (made on first use).
    ca: std::sync::OnceLock<Result<std::path::PathBuf, String>>,
}

impl Etcd {
    /// Start etcd and wait until it answers `/health`.
    ///
    /// # Errors
    /// etcd is missing, exits, or does not answer within 20 s.
    pub fn start() -> Result<Self> {
        Self::start_also_on(None)
    }

    /// [`Etcd::start`], listening for clients on `also` too (same port), e.g. the host end of
    /// a veth pair so that a daemon in a network namespace can reach it; see [`Etcd::url_on`].
    ///
    /// # Errors
    /// See [`Etcd::start`].
    pub fn start_also_on(also: Option<std::net::IpAddr>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let client_urls = match also {
            Some(ip) => format!("{url},http://{ip}:{port}"),
            None => url.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let child = spawn(&dir, &client_urls, &url, &peer, &[])?;
        let mut etcd = Self {
            child,
            running: true,
            url,
            client_urls,
            peer,
            port,
            health_port: port,
            extra: Vec::new(),
            dir,
            ca: std::sync::OnceLock::new(),
        };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// The directory of the cluster CA (`ballast ca init`) of the nodes using this etcd,
    /// made on first use.
    ///
    /// # Errors
    /// `ballast ca init` fails.
    pub fn ca_dir(&self) -> Result<std::path::PathBuf> {
        self.ca
            .get_or_init(|| {
                let dir = self.dir.path().join("ca");
                let out = std::process::Command::new(crate::ballast_bin())
                    .args(["ca", "init", "--dir"])
                    .arg(&dir)
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(dir)
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            })
            .clone()
            .map_err(|e| anyhow::anyhow!("ballast ca init failed: {e}"))
    }

    /// An etcd that serves clients only over TLS with client certificates
    /// (`--client-cert-auth`), its certificate (SAN `localhost`) and the clients' from the CA
    /// of [`Etcd::ca_dir`]; its URL is `https://localhost:PORT`. `/health` is served on a
    /// separate plain-HTTP metrics port.
    ///
    /// # Errors
    /// See [`Etcd::start`]; or the certificates cannot be made.
    pub fn start_tls() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let health_port = free_port()?;
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let mut etcd = Self {
            child: Command::new("true").spawn()?,
            running: false,
            url: format!("https://localhost:{port}"),
            client_urls: format!("https://127.0.0.1:{port}"),
            peer,
            port,
            health_port,
            extra: Vec::new(),
            dir,
            ca: std::sync::OnceLock::new(),
        };
        let _ = etcd.child.wait();
        let ca = etcd.ca_dir()?;
        let out = etcd.dir.path().join("server-tls");
        let issued = Command::new(crate::ballast_bin())
            .args(["cert", "issue", "--node", "localhost", "--ca-dir"])
            .arg(&ca)
            .arg("--out-dir")
            .arg(&out)
            .output()?;
        if !issued.status.success() {
            bail!(
                "ballast cert issue failed: {}",
                String::from_utf8_lossy(&issued.stderr)
            );
        }
        let path = |p: PathBuf| p.display().to_string();
        etcd.extra = vec![
            "--cert-file".into(),
            path(out.join("localhost.pem")),
            "--key-file".into(),
            path(out.join("localhost-key.pem")),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            path(ca.join("ca.pem")),
            "--listen-metrics-urls".into(),
            format!("http://127.0.0.1:{health_port}"),
        ];
        etcd.restart()?;
        Ok(etcd)
    }

    /// Whether clients reach this etcd over TLS ([`Etcd::start_tls`]).
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// The client URL on `ip` (one given to [`Etcd::start_also_on`]).
    pub fn url_on(&self, ip: std::net::IpAddr) -> String {
        format!("http://{ip}:{}", self.port)
    }

    /// SIGKILL etcd (an outage: clients see refused connections) and reap it. Its data dir
    /// and ports stay reserved for [`Etcd::restart`].
    ///
    /// # Errors
    /// `kill(2)` or `wait(2)` fails.
    pub fn stop(&mut self) -> Result<()> {
        if self.running {
            self.child.kill().context("kill etcd")?;
            self.child.wait().context("wait for etcd")?;
            self.running = false;
        }
        Ok(())
    }

    /// Start etcd again on the same data dir and ports (after [`Etcd::stop`]) and wait
    /// until it is healthy.
    ///
    /// # Errors
    /// It is still running, or it does not start; see [`Etcd::start`].
    pub fn restart(&mut self) -> Result<()> {
        if self.running {
            bail!("etcd is still running");
        }
        self.child = spawn(
            &self.dir,
            &self.client_urls,
            &self.url,
            &self.peer,
            &self.extra,
        )?;
        self.running = true;
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let start = Instant::now();
        while !self.healthy() {
            if let Some(status) = self.child.try_wait()? {
                self.running = false;
                bail!("etcd exited with {status}:\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not become healthy within 20s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
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
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.health_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!(
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.health_port
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
        let _ = self.stop();
    }
}
