//! Shared set-up for the cluster scenarios: three daemons in three zones over one real etcd,
//! a replicated volume, direct I/O helpers, polling, and the clean-up guard.
//!
//! Declare, in this order, so that locals drop in reverse (daemons first, then attachments,
//! then directories, then etcd):
//!
//! ```text
//! let etcd = Etcd::start().unwrap();
//! let dirs = node_dirs(3);
//! let _cleanup = Cleanup::new(&dirs, &["cvol"]);
//! let [a, b, c] = three_nodes(&dirs, &etcd);
//! ```

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::etcd::Etcd;
use crate::{release_fuse, Daemon, NodeDir};

/// One MiB.
pub const MIB: usize = 1 << 20;

/// Cleans up every node's attachments (loop devices, FUSE mounts, `/dev/ballast` links of the
/// named volumes), even when the test fails.
#[derive(Debug)]
pub struct Cleanup {
    fuse: Vec<PathBuf>,
    volumes: Vec<String>,
}

impl Cleanup {
    /// For the nodes in `dirs` and the volumes `volumes`.
    pub fn new(dirs: &[NodeDir], volumes: &[&str]) -> Self {
        Self {
            fuse: dirs.iter().map(|d| d.data_dir().join("fuse")).collect(),
            volumes: volumes.iter().map(|v| (*v).to_owned()).collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for fuse in &self.fuse {
            release_fuse(fuse);
        }
        for v in &self.volumes {
            let _ = std::fs::remove_file(Path::new("/dev/ballast").join(v));
        }
    }
}

/// `n` fresh node directories.
pub fn node_dirs(n: usize) -> Vec<NodeDir> {
    (0..n).map(|_| NodeDir::new().unwrap()).collect()
}

/// The daemon flags of node `id` in `zone`, in cluster mode over `etcd` with a 3 s lease.
pub fn cluster_args(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd) -> Vec<String> {
    let mut args = node.daemon_args();
    let at = args.iter().position(|a| a == "--node-id").unwrap();
    id.clone_into(&mut args[at + 1]);
    args.extend(tls_args(node, id, etcd));
    args.extend(
        [
            "--etcd",
            etcd.url(),
            "--listen",
            "127.0.0.1:0",
            "--zone",
            zone,
            "--lease-ttl",
            "3",
        ]
        .map(String::from),
    );
    args
}

/// The mutual-TLS flags of node `id`: the CA of `etcd`'s cluster, and a certificate issued
/// for `id` (with `ballast cert issue`, once) in the node's state directory.
pub fn tls_args(node: &NodeDir, id: &str, etcd: &Etcd) -> Vec<String> {
    let ca = etcd.ca_dir().unwrap();
    let out = node.scratch("tls");
    let cert = out.join(format!("{id}.pem"));
    if !cert.exists() {
        let done = std::process::Command::new(crate::ballast_bin())
            .args(["cert", "issue", "--node", id, "--ca-dir"])
            .arg(&ca)
            .arg("--out-dir")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            done.status.success(),
            "ballast cert issue failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    let key = out.join(format!("{id}-key.pem")).display().to_string();
    let mut args = vec![
        "--tls-ca".into(),
        ca.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.clone(),
    ];
    if etcd.is_tls() {
        // etcd trusts the same CA: the node's certificate is its etcd client certificate.
        args.extend([
            "--etcd-ca".into(),
            ca.join("ca.pem").display().to_string(),
            "--etcd-cert".into(),
            cert.display().to_string(),
            "--etcd-key".into(),
            key,
        ]);
    }
    args
}

/// Start cluster node `id` and wait until it is ready.
pub fn start(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd) -> Daemon {
    let mut d = Daemon::spawn(node, cluster_args(node, id, zone, etcd)).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

/// Three nodes (`node-a`, `node-b`, `node-c` in `zone-a`..`zone-c`), started and registered.
/// Declare `dirs` and the [`Cleanup`] before calling, so the daemons are killed first.
pub fn three_nodes(dirs: &[NodeDir], etcd: &Etcd) -> [Daemon; 3] {
    let nodes_up = [
        start(&dirs[0], "node-a", "zone-a", etcd),
        start(&dirs[1], "node-b", "zone-b", etcd),
        start(&dirs[2], "node-c", "zone-c", etcd),
    ];
    wait_for("three nodes registered", Duration::from_secs(10), || {
        nodes(&nodes_up[0]).len() == 3
    });
    nodes_up
}

/// Start node `i` of a [`nodes_with`] cluster (`node-a`, `node-b`, … in `zone-0`,
/// `zone-1`, …) in `dir`, with `extra` flags too, and wait until it is ready.
pub fn start_with(dir: &NodeDir, i: usize, etcd: &Etcd, extra: &[&str]) -> Daemon {
    let id = format!("node-{}", char::from(b'a' + i as u8));
    let mut args = cluster_args(dir, &id, &format!("zone-{i}"), etcd);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut d = Daemon::spawn(dir, args).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

/// Nodes `node-a`, `node-b`, … (in zones `zone-0`, `zone-1`, …), one per directory of
/// `dirs`, each started with `extra` flags too, and registered.
pub fn nodes_with(dirs: &[NodeDir], etcd: &Etcd, extra: &[&str]) -> Vec<Daemon> {
    let up: Vec<Daemon> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| start_with(dir, i, etcd, extra))
        .collect();
    wait_for("every node registered", Duration::from_secs(10), || {
        nodes(&up[0]).len() == dirs.len()
    });
    up
}

/// `node list -o json` as seen by `d`.
pub fn node_list(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(["node", "list", "-o", "json"]);
    out.success();
    out.json().as_array().unwrap().clone()
}

/// The ids of the live nodes as seen by `d`.
pub fn nodes(d: &Daemon) -> Vec<String> {
    node_list(d)
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The replica address (`host:port`) node `id` registered.
pub fn replica_addr(d: &Daemon, id: &str) -> std::net::SocketAddr {
    let list = node_list(d);
    let n = list
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("node {id} is not in {list:?}"));
    n["replica_addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("bad replica_addr of {id} in {n}: {e}"))
}

/// Poll `ok` every 200 ms until it holds.
///
/// # Panics
/// If it does not within `within`.
#[track_caller]
pub fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `(node_id, state)` of each replica of `volume`, as `d` inspects it.
pub fn replica_states(d: &Daemon, volume: &str) -> Vec<(String, String)> {
    let out = d.cli(["volume", "inspect", volume, "-o", "json"]);
    out.success();
    out.json()["replica_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The replica of `volume` on `node` as `d` inspects it (`null` if there is none).
pub fn replica(d: &Daemon, volume: &str, node: &str) -> serde_json::Value {
    let out = d.cli(["volume", "inspect", volume, "-o", "json"]);
    out.success();
    out.json()["replica_status"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node_id"] == node)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// The state of `volume`'s replica on `node` as `d` inspects it (`<absent>` if none).
pub fn replica_state(d: &Daemon, volume: &str, node: &str) -> String {
    replica(d, volume, node)["state"]
        .as_str()
        .unwrap_or("<absent>")
        .to_owned()
}

/// Create a 64 MiB volume with 3 replicas on `d`.
pub fn create_volume(d: &Daemon, name: &str) {
    d.cli([
        "volume",
        "create",
        name,
        "--size",
        "64MiB",
        "--replicas",
        "3",
    ])
    .success();
}

/// Attach `name` on `d`; the device path.
pub fn attach(d: &Daemon, name: &str) -> String {
    let att = d.cli(["volume", "attach", name, "-o", "json"]);
    att.success();
    att.json()["device"].as_str().unwrap().to_owned()
}

/// A deterministic, position-dependent pattern (so misplaced blocks are caught too).
pub fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let p = offset + i;
            (p as u8) ^ ((p >> 12) as u8).wrapping_mul(31) ^ seed
        })
        .collect()
}

/// Write `data` at `offset` of `dev` with `O_DIRECT`, then `fsync`.
///
/// # Errors
/// Any I/O error.
pub fn write_direct(dev: impl AsRef<Path>, offset: usize, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    f.seek(SeekFrom::Start(offset as u64))?;
    let mut buf = volume::io::IoBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    f.write_all(&buf)?;
    f.sync_all()
}

/// Read `len` bytes at `offset` of `dev` with `O_DIRECT`.
///
/// # Errors
/// Any I/O error.
pub fn try_read_direct(
    dev: impl AsRef<Path>,
    offset: usize,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    f.seek(SeekFrom::Start(offset as u64))?;
    let mut buf = volume::io::IoBuf::zeroed(len);
    f.read_exact(&mut buf)?;
    Ok(buf.to_vec())
}

/// [`try_read_direct`], panicking on an error.
pub fn read_direct(dev: impl AsRef<Path>, offset: usize, len: usize) -> Vec<u8> {
    try_read_direct(dev, offset, len).unwrap()
}

/// Read `len` bytes at `offset` of `path` with `O_DIRECT`.
///
/// # Panics
/// On any I/O error.
pub fn pread_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = volume::io::IoBuf::zeroed(len);
    f.read_exact_at(&mut buf, offset).unwrap();
    buf.to_vec()
}

/// Write `data` at `offset` of `path` with `O_DIRECT` and `fdatasync`.
///
/// # Panics
/// On any I/O error.
pub fn pwrite_direct(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = volume::io::IoBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    f.write_all_at(&buf, offset).unwrap();
    f.sync_data().unwrap();
}

/// The offsets of the 4 KiB blocks of `path` that start with `marker`.
pub fn find_blocks(path: &Path, marker: &[u8]) -> Vec<u64> {
    let size = std::fs::metadata(path).unwrap().len();
    let mut found = Vec::new();
    let mut at = 0;
    while at < size {
        let n = (size - at).min(4 * MIB as u64) as usize;
        let chunk = pread_direct(path, at, n);
        for (i, b) in chunk.chunks(4096).enumerate() {
            if b.starts_with(marker) {
                found.push(at + (i * 4096) as u64);
            }
        }
        at += n as u64;
    }
    found
}

/// The value of the Prometheus sample `name{labels}` (the first line starting with `prefix`)
/// on `d`'s `/metrics`; `None` if there is no such line.
pub fn metric(d: &Daemon, prefix: &str) -> Option<f64> {
    let r = d.http("GET", "/metrics").unwrap();
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// The sum of every sample of the metric family `name` on `d` (0 if absent).
pub fn metric_sum(d: &Daemon, name: &str) -> f64 {
    let r = d.http("GET", "/metrics").unwrap();
    r.body
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A network partition while it lives: `iptables` DROP rules (so peers see timeouts, not
/// resets), each with the comment `ballast-test-<pid>`, deleted on drop (also when a test
/// fails) or by [`Partition::heal`].
#[derive(Debug)]
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    fn install(rules: Vec<Vec<String>>) -> Self {
        let comment = format!("ballast-test-{}", std::process::id());
        let mut p = Self { rules: Vec::new() };
        for mut r in rules {
            r.extend(["-m", "comment", "--comment", &comment, "-j", "DROP"].map(String::from));
            let st = Command::new("iptables")
                .arg("-w")
                .arg("-I")
                .args(&r)
                .status()
                .expect("cannot run iptables; run `apt-get install iptables`");
            assert!(st.success(), "iptables -I {r:?} failed: {st}");
            p.rules.push(r);
        }
        p
    }

    /// Cut TCP traffic to and from `port` on the loopback interface: the server listening
    /// there is cut off from every local client (its own outgoing connections to other
    /// ports, e.g. to etcd, still work).
    ///
    /// # Panics
    /// If `iptables` is missing or refuses a rule.
    pub fn cut_port(port: u16) -> Self {
        let port = port.to_string();
        Self::install(
            ["--dport", "--sport"]
                .map(|dir| {
                    ["INPUT", "-i", "lo", "-p", "tcp", dir, &port]
                        .map(String::from)
                        .to_vec()
                })
                .to_vec(),
        )
    }

    /// Cut one direction of TCP traffic on `port` of the loopback interface: `to_server`
    /// drops what clients send to the server listening there; otherwise what it sends back is
    /// dropped, so requests arrive and are executed but no reply gets through.
    ///
    /// # Panics
    /// If `iptables` is missing or refuses a rule.
    pub fn cut_port_one_way(port: u16, to_server: bool) -> Self {
        let dir = if to_server { "--dport" } else { "--sport" };
        Self::install(vec![[
            "INPUT",
            "-i",
            "lo",
            "-p",
            "tcp",
            dir,
            &port.to_string(),
        ]
        .map(String::from)
        .to_vec()])
    }

    /// Cut everything in and out of the host interface `ifname` (e.g. the host end of a
    /// [`NetNs`]'s veth pair): the namespace is cut off from the host entirely.
    ///
    /// # Panics
    /// If `iptables` is missing or refuses a rule.
    pub fn cut_interface(ifname: &str) -> Self {
        Self::install(vec![
            ["INPUT", "-i", ifname].map(String::from).to_vec(),
            ["OUTPUT", "-o", ifname].map(String::from).to_vec(),
        ])
    }

    /// Remove the rules.
    pub fn heal(&mut self) {
        for r in self.rules.drain(..) {
            let st = Command::new("iptables")
                .arg("-w")
                .arg("-D")
                .args(&r)
                .status();
            if !matches!(st, Ok(s) if s.success()) {
                eprintln!("warning: iptables -D {r:?} failed: {st:?}");
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

/// A network namespace joined to the host by a veth pair on a private /30
/// (`10.254.N.1` host side, `10.254.N.2` inside); deleted (with the pair) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    host_ip: std::net::IpAddr,
    ns_ip: std::net::IpAddr,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("cannot run ip; run `apt-get install iproute2`");
    assert!(st.success(), "ip {args:?} failed: {st}");
}

impl NetNs {
    /// Create one.
    ///
    /// # Panics
    /// If `ip` is missing or fails.
    pub fn create() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = (pid + SEQ.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
        let tag = format!("{}{}", pid % 100_000, char::from(b'a' + (n % 26) as u8));
        let ns = Self {
            name: format!("ballast-test-{tag}"),
            host_if: format!("blt{tag}h"),
            host_ip: format!("10.254.{n}.1").parse().unwrap(),
            ns_ip: format!("10.254.{n}.2").parse().unwrap(),
        };
        let ns_if = format!("blt{tag}n");
        ip(&["netns", "add", &ns.name]);
        // From here on, drop cleans up whatever was created.
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        ns
    }

    /// Its name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The host's address on the pair.
    pub fn host_ip(&self) -> std::net::IpAddr {
        self.host_ip
    }

    /// The namespace's address on the pair.
    pub fn ns_ip(&self) -> std::net::IpAddr {
        self.ns_ip
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Start cluster node `id` inside `ns`: its replica server and HTTP endpoint listen on the
/// namespace's address and it reaches etcd on the host's (see [`Etcd::start_also_on`]).
pub fn start_in_netns(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd, ns: &NetNs) -> Daemon {
    let mut args = cluster_args(node, id, zone, etcd);
    let set = |args: &mut Vec<String>, flag: &str, value: String| {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value;
    };
    set(&mut args, "--http", format!("{}:0", ns.ns_ip()));
    set(&mut args, "--listen", format!("{}:0", ns.ns_ip()));
    set(&mut args, "--etcd", etcd.url_on(ns.host_ip()));
    let mut d = Daemon::spawn_in_netns(node, ns.name(), args).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}
