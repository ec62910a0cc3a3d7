//! Issue 14, the local surfaces: who on the same host can reach a daemon, and what it tells
//! them.
//!
//! (The FUSE attach mount's permissions are tested with the other attach tests, in
//! `attach_block.rs`.)

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::cluster::{attach, node_dirs, start, Cleanup};
use integration_tests::etcd::Etcd;
use integration_tests::{Daemon, NodeDir};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every unix socket the daemon serves (the local API, NBD, CSI, Docker) is 0600, and the
/// data directory 0700, even when the daemon starts under a umask of 000. Before: the CSI and
/// Docker sockets were left as the umask made them (0777 here), and the API and NBD sockets
/// were `chmod`ed only after `bind`, open to anyone in between.
#[test]
fn every_socket_is_private_even_under_a_permissive_umask() {
    let node = NodeDir::new().unwrap();
    let csi = node.scratch("csi/csi.sock");
    let docker = node.scratch("docker/plugins/ballast.sock");
    let mut args = node.daemon_args();
    args.extend([
        "--csi-socket".to_owned(),
        csi.display().to_string(),
        "--docker-socket".to_owned(),
        docker.display().to_string(),
    ]);
    let mut daemon = Daemon::spawn_under_umask(&node, 0, args).unwrap();
    daemon.wait_ready(Duration::from_secs(30)).unwrap();
    let nbd = node.data_dir().join("nbd.sock");
    for socket in [node.socket(), nbd.clone(), csi.clone(), docker.clone()] {
        assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    }
    assert_eq!(mode(&node.data_dir()), 0o700);
    // The directories the daemon made for its sockets are private too, and nothing is left
    // of the private directories the sockets were bound in.
    for socket in [&csi, &docker] {
        let dir = socket.parent().unwrap();
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
    // The daemon still serves through them.
    daemon.cli(["volume", "list"]).success();

    // Even a socket made reachable by mistake serves only root and the daemon's user: each
    // one hard-linked, mode 0666, into a directory anyone may enter. Root gets answers
    // through the links; user nobody is disconnected before any answer.
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
    let open = tempfile::Builder::new()
        .prefix("ballast-open-")
        .tempdir_in(base)
        .unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let http = b"GET /v1/volumes HTTP/1.0\r\n\r\n".as_slice();
    // The HTTP/2 preface and an empty SETTINGS frame: a gRPC server answers with its own.
    let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".as_slice();
    for (name, socket, hello) in [
        ("api", node.socket(), http),
        ("nbd", nbd.clone(), b"".as_slice()),
        ("csi", csi.clone(), h2),
        ("docker", docker.clone(), http),
    ] {
        let link = open.path().join(name);
        std::fs::hard_link(&socket, &link).unwrap();
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            answer_bytes(&link, hello, false) > 0,
            "{name}: root is served"
        );
        assert_eq!(
            answer_bytes(&link, hello, true),
            0,
            "{name}: nobody was served"
        );
    }
    assert!(
        daemon.log().contains("refused a local connection"),
        "{}",
        daemon.log()
    );
    drop(open);
    assert!(daemon.terminate().unwrap().success());
    for socket in [node.socket(), nbd, csi, docker] {
        assert!(
            !socket.exists(),
            "{} is removed at shutdown",
            socket.display()
        );
    }
}

/// Connect to the unix socket `path` (as user nobody if `as_nobody`), send `hello`, and count
/// the bytes answered before the server closes or 2 s pass.
fn answer_bytes(path: &Path, hello: &[u8], as_nobody: bool) -> usize {
    const CLIENT: &str = "import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
n = 0
try:
    # A server that refuses the peer may close before the hello is sent.
    s.sendall(sys.stdin.buffer.read())
    while True:
        b = s.recv(4096)
        if not b:
            break
        n += len(b)
except (socket.timeout, ConnectionResetError, BrokenPipeError):
    pass
print(n)
";
    let mut cmd = if as_nobody {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
        ]);
        c
    } else {
        std::process::Command::new("/usr/bin/python3")
    };
    let mut child = cmd
        .args(["-c", CLIENT])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().unwrap().write_all(hello).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `etcd_mvcc_range_total` of `etcd`: how many range requests (reads) it has served.
fn etcd_reads(etcd: &Etcd) -> u64 {
    let addr = etcd.url().trim_start_matches("http://").to_owned();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // HTTP/1.0: the whole body, never chunked.
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_mvcc_range_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("etcd reports no etcd_mvcc_range_total:\n{text}")) as u64
}

/// Issue 14: every scrape of `/metrics` listed every volume record in etcd (load on etcd that
/// grows with the scrapers, and every volume's name to whoever reaches the port). Now a scrape
/// reads local state only: 40 scrapes cost etcd (almost) nothing beyond the node's own
/// background reads, and replica states are reported for the volumes attached here only.
#[test]
fn a_metrics_scrape_reads_nothing_from_the_store_and_names_only_local_volumes() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(1);
    let _cleanup = Cleanup::new(&dirs, &["secmetrics", "secother"]);
    let d = start(&dirs[0], "node-a", "zone-a", &etcd);
    for name in ["secmetrics", "secother"] {
        d.cli([
            "volume",
            "create",
            name,
            "--size",
            "16MiB",
            "--replicas",
            "1",
        ])
        .success();
    }
    attach(&d, "secmetrics");
    let wanted = r#"ballast_replica_state{volume="secmetrics",node="node-a",state="healthy"} 1"#;
    let start_wait = Instant::now();
    while !d.http("GET", "/metrics").unwrap().body.contains(wanted) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "the attached volume's replica never showed in /metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = etcd_reads(&etcd);
    let t = Instant::now();
    let mut body = String::new();
    for _ in 0..40 {
        body = d.http("GET", "/metrics").unwrap().body;
    }
    let reads = etcd_reads(&etcd) - before;
    // The node's own loops (lease, attachment confirmation, repair) read a few times a
    // second; a read per scrape would be 40 more.
    let background = 4 * (t.elapsed().as_secs() + 1);
    assert!(
        reads <= background,
        "40 scrapes in {:?} cost etcd {reads} reads (background allows {background})",
        t.elapsed()
    );
    assert!(body.contains(wanted), "{body}");
    // The replica states are of the volumes attached here only (the replica this node holds
    // of the other has its I/O counters, as before).
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("ballast_replica_state") && l.contains("secother")),
        "the replica states of a volume not attached here are not reported:\n{body}"
    );
    d.cli(["volume", "detach", "secmetrics"]).success();
}

/// Issue 14: cluster mode is mutual TLS by default. A node refuses to start with a certificate
/// that names another node, or with none (unless plaintext is asked for, loudly); with its
/// own it serves peers only over TLS.
#[test]
fn a_cluster_node_runs_on_its_own_certificate_only() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(2);
    let _cleanup = Cleanup::new(&dirs, &[]);
    // node-a's flags, with node-b's certificate: refused at start.
    let mut args = integration_tests::cluster::cluster_args(&dirs[0], "node-a", "z", &etcd);
    let theirs = integration_tests::cluster::tls_args(&dirs[1], "node-b", &etcd);
    let at = args.iter().position(|a| a == "--tls-cert").unwrap();
    args[at + 1].clone_from(&theirs[3]);
    args[at + 3].clone_from(&theirs[5]);
    let mut d = Daemon::spawn(&dirs[0], args).unwrap();
    let status = d.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success());
    assert!(
        d.log().contains("does not name this node (node-a)"),
        "{}",
        d.log()
    );

    // No TLS flags at all: refused, naming the fix.
    let mut args = integration_tests::cluster::cluster_args(&dirs[0], "node-a", "z", &etcd);
    let at = args.iter().position(|a| a == "--tls-ca").unwrap();
    args.drain(at..at + 6);
    let mut d = Daemon::spawn(&dirs[0], args.clone()).unwrap();
    assert!(!d.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(d.log().contains("ballast ca init"), "{}", d.log());

    // Plaintext when asked for: it runs, and says so loudly.
    args.push("--insecure-plaintext-replicas".into());
    let mut d = Daemon::spawn(&dirs[0], args).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    assert!(
        d.log().contains("PLAINTEXT AND UNAUTHENTICATED"),
        "{}",
        d.log()
    );
    assert!(d.terminate().unwrap().success());

    // With its own certificate: a raw plaintext frame on the replica port gets nothing
    // but a closed connection.
    let d = start(&dirs[0], "node-a", "z", &etcd);
    let addr: std::net::SocketAddr = d.cli(["node", "list", "-o", "json"]).json()[0]
        ["replica_addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty() || buf[0] == 0x15,
        "a plaintext client got an answer that is not a TLS alert: {buf:?}"
    );
    let asked = Instant::now();
    while !d.log().contains("TLS handshake failed") {
        assert!(asked.elapsed() < Duration::from_secs(10), "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 14, a hostile peer with a valid certificate of a live node of the cluster (node-c's)
/// against node-b's replica port, while node-a holds a replicated volume: it can register no
/// epoch, read, write, flush, delete, create or grow nothing there. Meanwhile the real
/// cluster creates and grows replicas through the intents it records first.
#[test]
fn a_valid_node_certificate_gets_only_what_the_store_records() {
    use replication::remote::{RemoteOptions, ReplicaClient};
    use replication::wire::{Request, Response};

    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["held"]);
    let nodes = integration_tests::cluster::three_nodes(&dirs, &etcd);
    nodes[0]
        .cli([
            "volume",
            "create",
            "held",
            "--size",
            "16MiB",
            "--replicas",
            "3",
        ])
        .success();
    attach(&nodes[0], "held");
    let list = nodes[0].cli(["node", "list", "-o", "json"]).json();
    let addr_of = |id: &str| -> std::net::SocketAddr {
        let n = list
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap();
        n["replica_addr"].as_str().unwrap().parse().unwrap()
    };
    let tls = integration_tests::cluster::tls_args(&dirs[2], "node-c", &etcd);
    let files = replication::tls::TlsFiles {
        ca: tls[1].clone().into(),
        cert: tls[3].clone().into(),
        key: tls[5].clone().into(),
    };
    let opts = RemoteOptions {
        timeout: Duration::from_secs(5),
        node: "node-c".into(),
        tls: Some((replication::tls::Tls::load(files).unwrap(), "node-b".into())),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = ReplicaClient::connect(addr_of("node-b"), &opts)
            .await
            .expect("node-c is a node of the cluster: connected");
        let refused = |what: &str, r: Result<(), volume::device::DeviceError>| {
            let e = r.expect_err(what).to_string();
            assert!(e.contains("not allowed"), "{what}: {e}");
        };
        for epoch in [1, 2, 3, 4, 5, u64::MAX] {
            refused("register", c.register("held", epoch).await);
        }
        refused("delete", c.delete("held").await);
        refused("create", c.create("evil", 4 << 20).await);
        refused("grow", c.resize("held", 32 << 20, false).await);
        for epoch in 0..6 {
            let mut data = volume::io::pool::take(4096);
            data.fill(0xee);
            for req in [
                Request::Read {
                    volume: "held".into(),
                    epoch,
                    offset: 0,
                    len: 4096,
                },
                Request::Write {
                    volume: "held".into(),
                    epoch,
                    offset: 0,
                    fua: false,
                    generation: 0,
                    data,
                },
                Request::Flush {
                    volume: "held".into(),
                    epoch,
                },
            ] {
                let resp = c.call(req).await.unwrap();
                assert!(
                    matches!(resp, Response::Error { .. } | Response::Stale { epoch: 0 }),
                    "epoch {epoch}: served: {resp:?}"
                );
            }
        }
    });
    // The cluster itself still creates and grows its replicas (through intents).
    nodes[0]
        .cli(["volume", "resize", "held", "--size", "32MiB"])
        .success();
    nodes[1]
        .cli([
            "volume",
            "create",
            "fresh",
            "--size",
            "8MiB",
            "--replicas",
            "3",
        ])
        .success();
    nodes[1].cli(["volume", "delete", "fresh"]).success();
    let v = nodes[0]
        .cli(["volume", "inspect", "held", "-o", "json"])
        .json();
    assert_eq!(v["size_bytes"], 32 << 20, "{v}");
}

/// Issue 14: etcd over TLS with client certificates (`--client-cert-auth`). Nodes with the
/// etcd CA and a client certificate run a replicated volume through it; a node without a
/// client certificate, or speaking plain HTTP, is refused with a message naming the store.
#[test]
fn nodes_use_an_etcd_that_requires_client_certificates() {
    let etcd = Etcd::start_tls().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["secetcd"]);
    let a = start(&dirs[0], "node-a", "za", &etcd);
    let _b = start(&dirs[1], "node-b", "zb", &etcd);
    let listed = a.cli(["node", "list", "-o", "json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    a.cli([
        "volume",
        "create",
        "secetcd",
        "--size",
        "16MiB",
        "--replicas",
        "2",
    ])
    .success();
    let dev = attach(&a, "secetcd");
    let data = vec![0x5Au8; 4096];
    integration_tests::cluster::pwrite_direct(std::path::Path::new(&dev), 0, &data);
    assert_eq!(
        integration_tests::cluster::pread_direct(std::path::Path::new(&dev), 0, 4096),
        data
    );
    a.cli(["volume", "detach", "secetcd"]).success();

    // No client certificate: etcd refuses the handshake.
    let mut args = integration_tests::cluster::cluster_args(&dirs[2], "node-c", "zc", &etcd);
    let at = args.iter().position(|x| x == "--etcd-cert").unwrap();
    args.drain(at..at + 4);
    let mut d = Daemon::spawn(&dirs[2], args.clone()).unwrap();
    assert!(!d.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(
        d.log().contains("cannot reach the cluster store"),
        "{}",
        d.log()
    );

    // No etcd CA either: an https:// endpoint is refused before anything is sent.
    let at = args.iter().position(|x| x == "--etcd-ca").unwrap();
    args.drain(at..at + 2);
    let mut d = Daemon::spawn(&dirs[2], args).unwrap();
    assert!(!d.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(d.log().contains("--etcd-ca"), "{}", d.log());
}
