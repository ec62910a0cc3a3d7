//! Scenarios of the NBD export against a real daemon, with real clients and raw bytes.
//!
//! - `qemu-img convert` a random file into an export and back (unix socket and TCP);
//! - `nbdinfo` reports the size and the 4 KiB minimum block size;
//! - raw protocol over the unix socket: a bad magic closes only that connection; unknown
//!   options and structured replies get `NBD_REP_ERR_UNSUP`; `NBD_OPT_LIST` lists volumes;
//!   `NBD_OPT_GO` of an unknown volume gets `NBD_REP_ERR_UNKNOWN`; out-of-range and unaligned
//!   requests get `EINVAL`/`ENOSPC` and the connection keeps working; many requests pipelined
//!   on one connection all complete.
//!
//! Needs `qemu-img` (qemu-utils) and `nbdinfo` (libnbd-bin) on the PATH.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::nbd::*;
use integration_tests::{run_tool as run, Daemon, NodeDir};
use rand::RngCore;

const MIB: usize = 1024 * 1024;

fn start() -> (NodeDir, Daemon) {
    let node = NodeDir::new().expect("temporary directories");
    let daemon = Daemon::start(&node).expect("daemon starts");
    (node, daemon)
}

fn nbd_socket(node: &NodeDir) -> PathBuf {
    node.data_dir().join("nbd.sock")
}

fn create(d: &Daemon, name: &str, size: &str) -> u64 {
    let out = d.cli(["volume", "create", name, "--size", size, "-o", "json"]);
    out.success();
    out.json()["size_bytes"].as_u64().expect("size_bytes")
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write the random file");
    data
}

/// `qemu-img convert` `data` (in `src`) into `uri`, and the export back into `back`; the
/// export's first `data.len()` bytes must equal `data` and the rest must be zero.
fn qemu_round_trip(uri: &str, src: &Path, back: &Path, data: &[u8]) {
    let src = src.to_str().unwrap();
    let back_s = back.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, uri],
    );
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, back_s],
    );
    let read = std::fs::read(back).expect("read the copy");
    assert!(read.len() >= data.len(), "copy is {} bytes", read.len());
    assert!(
        read[..data.len()] == *data,
        "data differs after the round trip"
    );
    assert!(read[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn qemu_img_and_nbdinfo_over_the_unix_socket() {
    let (node, mut d) = start();
    let size = create(&d, "vm", "8MiB");
    let out = d.cli(["volume", "export", "vm"]);
    out.success();
    let uri = out.stdout.trim().to_owned();
    assert_eq!(
        uri,
        format!("nbd+unix:///vm?socket={}", nbd_socket(&node).display())
    );

    let info = run("nbdinfo", &["--json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(size), "{info}");
    assert_eq!(export["block_size_minimum"].as_u64(), Some(4096), "{info}");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), size.to_string());
    let mode = std::fs::metadata(nbd_socket(&node))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o600,
        "the NBD socket is private to the daemon's user"
    );

    let data = random_file(&node.scratch("in.img"), 8 * MIB);
    qemu_round_trip(
        &uri,
        &node.scratch("in.img"),
        &node.scratch("out.img"),
        &data,
    );

    // The data survives a restart of the daemon.
    d.terminate().expect("clean shutdown");
    assert!(!nbd_socket(&node).exists(), "the NBD socket is removed");
    let _d = Daemon::start(&node).expect("daemon restarts");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            node.scratch("again.img").to_str().unwrap(),
        ],
    );
    let again = std::fs::read(node.scratch("again.img")).unwrap();
    assert!(again[..data.len()] == *data, "data differs after a restart");
}

#[test]
fn tcp_export_serves_only_the_exported_volume() {
    let (node, d) = start();
    create(&d, "net", "8MiB");
    create(&d, "private", "8MiB");
    // Plaintext is a choice about a TCP export only.
    let r = d
        .api(
            "POST",
            "/v1/volumes/net/export",
            Some(r#"{"insecure_plaintext":true}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("give tcp too"), "{}", r.body);
    // A daemon with no TLS identity serves TCP only when plaintext is asked for explicitly.
    d.cli(["volume", "export", "net", "--tcp", "127.0.0.1:0"])
        .expect_code(1)
        .stderr_has("--insecure-plaintext");
    let out = d.cli([
        "volume",
        "export",
        "net",
        "--tcp",
        "127.0.0.1:0",
        "--insecure-plaintext",
    ]);
    out.success();
    let uri = out.stdout.trim().to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    assert!(uri.ends_with("/net"), "{uri}");

    let data = random_file(&node.scratch("in.img"), 4 * MIB);
    qemu_round_trip(
        &uri,
        &node.scratch("in.img"),
        &node.scratch("out.img"),
        &data,
    );

    // The same listener does not serve a volume that was not exported on it.
    let private = uri.replace("/net", "/private");
    let refused = Command::new("nbdinfo").arg(&private).output().unwrap();
    assert!(!refused.status.success(), "{refused:?}");

    // Unknown volumes and bad addresses are refused by the CLI with the usual codes.
    d.cli(["volume", "export", "nope"]).expect_code(4);
    d.cli(["volume", "export", "net", "--tcp", "not-an-address"])
        .expect_code(2);
}

/// `ballast <args>`, which must succeed.
fn ballast(args: &[&str]) {
    let out = Command::new(integration_tests::ballast_bin())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ballast {args:?}: {out:?}");
}

/// qemu-img's arguments for the TLS export `name` at `port` with the client files in `dir`:
/// the object and the image options.
fn qemu_tls(dir: &Path, port: &str, name: &str) -> [String; 2] {
    [
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={name},\
             tls-creds=tls0"
        ),
    ]
}

#[test]
fn tcp_exports_need_tls_and_a_client_certificate_from_the_cluster_ca() {
    let node = NodeDir::new().unwrap();
    let (ca, tls, client) = (
        node.scratch("ca"),
        node.scratch("tls"),
        node.scratch("client"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    ballast(&["ca", "init", "--dir", &s(&ca)]);
    ballast(&[
        "cert",
        "issue",
        "--node",
        "test-node",
        "--address",
        "127.0.0.1",
        "--ca-dir",
        &s(&ca),
        "--out-dir",
        &s(&tls),
    ]);
    ballast(&[
        "cert",
        "issue",
        "--client",
        "qemu",
        "--ca-dir",
        &s(&ca),
        "--out-dir",
        &s(&client),
    ]);
    // A client certificate from another CA, and a client with no certificate at all.
    let (rogue_ca, rogue) = (node.scratch("rogue-ca"), node.scratch("rogue"));
    ballast(&["ca", "init", "--dir", &s(&rogue_ca)]);
    ballast(&[
        "cert",
        "issue",
        "--client",
        "qemu",
        "--ca-dir",
        &s(&rogue_ca),
        "--out-dir",
        &s(&rogue),
    ]);
    std::fs::copy(client.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
    let anonymous = node.scratch("anonymous");
    std::fs::create_dir(&anonymous).unwrap();
    std::fs::copy(client.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();

    let mut args = node.daemon_args();
    args.extend(
        [
            "--tls-ca",
            &s(&ca.join("ca.pem")),
            "--tls-cert",
            &s(&tls.join("test-node.pem")),
            "--tls-key",
            &s(&tls.join("test-node-key.pem")),
        ]
        .map(String::from),
    );
    let mut d = Daemon::spawn(&node, &args).unwrap();
    d.wait_ready(integration_tests::START_TIMEOUT).unwrap();
    create(&d, "net", "8MiB");
    create(&d, "other", "8MiB");
    let out = d.cli([
        "volume",
        "export",
        "net",
        "--tcp",
        "127.0.0.1:0",
        "-o",
        "json",
    ]);
    out.success();
    let info = out.json();
    assert_eq!(info["tls"], true, "{info}");
    let uri = info["uri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let addr = info["tcp"].as_str().unwrap().to_owned();
    let port = addr.rsplit(':').next().unwrap().to_owned();
    // The listener serves TLS: exporting another volume there in plaintext is refused.
    d.cli([
        "volume",
        "export",
        "other",
        "--tcp",
        &addr,
        "--insecure-plaintext",
    ])
    .expect_code(1)
    .stderr_has("already serves NBD over TLS");

    // qemu with the client certificate writes and reads the volume.
    let data = random_file(&node.scratch("in.img"), 4 * MIB);
    let [object, image] = qemu_tls(&client, &port, "net");
    let src = s(&node.scratch("in.img"));
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            &src,
            "--target-image-opts",
            &image,
        ],
    );
    let back = s(&node.scratch("out.img"));
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &image,
            "-O",
            "raw",
            &back,
        ],
    );
    let read = std::fs::read(&back).unwrap();
    assert!(read[..data.len()] == *data, "data differs over TLS");
    // So does libnbd, which checks the node certificate's address.
    let info = Command::new("nbdinfo")
        .arg(format!("{uri}?tls-certificates={}", client.display()))
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("with TLS"),
        "{info:?}"
    );

    // Refused: a certificate from another CA, no certificate, and no TLS.
    for (dir, who) in [
        (&rogue, "another CA's client"),
        (&anonymous, "a client with no certificate"),
    ] {
        let [object, image] = qemu_tls(dir, &port, "net");
        let out = Command::new("qemu-img")
            .args(["info", "--object", &object, "--image-opts", &image])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{who} was served: {out:?}");
    }
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://{addr}/net"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "served without TLS: {plain:?}");
    // On the wire: before TLS, every option but STARTTLS and ABORT is refused with
    // NBD_REP_ERR_TLS_REQD, and the old EXPORT_NAME (which has no error reply) closes.
    let mut raw = Raw::connect_tcp(&addr);
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"net");
    go.extend_from_slice(&0u16.to_be_bytes());
    for option in [OPT_GO, OPT_INFO, OPT_LIST] {
        let body: &[u8] = if option == OPT_LIST { &[] } else { &go };
        raw.send_option(option, body);
        let (o, kind, msg) = raw.option_reply();
        assert_eq!((o, kind), (option, REP_ERR_TLS_REQD));
        assert!(String::from_utf8_lossy(&msg).contains("client certificate"));
    }
    raw.send_option(OPT_STARTTLS, b"junk");
    let (o, kind, _) = raw.option_reply();
    assert_eq!(
        (o, kind),
        (OPT_STARTTLS, REP_ERR_INVALID),
        "STARTTLS with data"
    );
    // Before TLS too, oversized option data is read past and refused.
    raw.send_option(OPT_INFO, &vec![0u8; 64 * 1024 + 1]);
    assert_eq!(raw.option_reply().1, REP_ERR_TOO_BIG);
    raw.send_option(OPT_EXPORT_NAME, b"net");
    assert!(raw.closed(), "EXPORT_NAME before TLS must close");

    // The unix socket (0600, root only) needs no TLS.
    let mut local = Raw::connect(&nbd_socket(&node));
    assert!(local.go("net").is_ok());
    drop(local);
    d.terminate().unwrap();
}

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let (node, d) = start();
    create(&d, "raw", "8MiB");
    let sock = nbd_socket(&node);

    // A healthy client connected before the bad ones.
    let mut good = Raw::connect(&sock);

    // Bad option magic.
    let mut bad = Raw::connect(&sock);
    bad.s.write_all(&[0xde; 16]).unwrap();
    assert!(bad.closed(), "bad magic must close the connection");

    // Unknown client flags.
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).unwrap();
    bad.write_all(&0xffu32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(bad.read(&mut b), Ok(0) | Err(_)));

    // Garbage right away, and a client that hangs up mid-option.
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(bad);
    let mut bad = Raw::connect(&sock);
    bad.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(bad);

    // The healthy client still works, and new clients are still accepted.
    assert_eq!(good.go("raw"), Ok(8 * MIB as u64));
    assert_eq!(good.write(0, 0, &[7u8; 4096]), 0);
    assert_eq!(good.read(0, 4096), Ok(vec![7u8; 4096]));
    let mut again = Raw::connect(&sock);
    assert_eq!(again.go("raw"), Ok(8 * MIB as u64));
    again.send_request(CMD_DISC, 0, 1, 0, 0);
    assert!(again.closed(), "NBD_CMD_DISC closes the connection");
}

#[test]
fn options_get_the_protocols_replies() {
    let (node, d) = start();
    create(&d, "alpha", "8MiB");
    create(&d, "beta", "8MiB");
    let mut c = Raw::connect(&nbd_socket(&node));

    c.send_option(42, b"whatever");
    let (option, kind, _) = c.option_reply();
    assert_eq!((option, kind), (42, REP_ERR_UNSUP));

    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);

    // Option data over 64 KiB is read past and refused; the connection stays in sync.
    c.send_option(OPT_GO, &vec![0u8; 64 * 1024 + 1]);
    assert_eq!(
        c.option_reply(),
        (OPT_GO, REP_ERR_TOO_BIG, b"option data too large".to_vec())
    );

    c.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (option, kind, data) = c.option_reply();
        assert_eq!(option, OPT_LIST);
        match kind {
            REP_SERVER => {
                let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
            }
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    names.sort();
    assert_eq!(names, ["alpha", "beta"]);

    assert_eq!(c.go("nope"), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.go("Not A Name"), Err(REP_ERR_UNKNOWN));
    // The connection is still negotiating and can pick a real export.
    assert_eq!(c.go("beta"), Ok(8 * MIB as u64));

    // NBD_OPT_ABORT gets an ACK and the server closes.
    let mut a = Raw::connect(&nbd_socket(&node));
    a.send_option(OPT_ABORT, &[]);
    assert_eq!(a.option_reply().1, REP_ACK);
    assert!(a.closed());
}

#[test]
fn bad_requests_get_errors_and_the_connection_keeps_working() {
    let (node, d) = start();
    let size = create(&d, "io", "8MiB");
    let mut c = Raw::connect(&nbd_socket(&node));
    assert_eq!(c.go("io"), Ok(size));

    // Out of range.
    assert_eq!(c.read(size, 4096), Err(EINVAL));
    assert_eq!(c.read(size - 4096, 8192), Err(EINVAL));
    assert_eq!(c.write(0, size, &[1u8; 4096]), ENOSPC);
    assert_eq!(c.call(CMD_TRIM, 0, size, 4096), ENOSPC);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, u64::MAX - 4095, 4096), ENOSPC);
    // Unaligned, unknown command, unknown flag.
    assert_eq!(c.read(512, 4096), Err(EINVAL));
    assert_eq!(c.write(0, 0, &[1u8; 1000]), EINVAL);
    assert_eq!(c.call(77, 0, 0, 4096), EINVAL);
    assert_eq!(c.call(CMD_READ, 1 << 9, 0, 4096), EINVAL);

    // Everything still works on the same connection.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(FLAG_FUA, 4096, &pattern), 0);
    assert_eq!(c.read(4096, 8192), Ok(pattern.clone()));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0), 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 4096, 4096), 0);
    assert_eq!(c.read(4096, 4096), Ok(vec![0u8; 4096]));
    assert_eq!(c.read(8192, 4096), Ok(pattern[4096..].to_vec()));
    assert_eq!(c.call(CMD_TRIM, FLAG_FUA, 8192, 4096), 0);
    assert_eq!(c.read(8192, 4096), Ok(vec![0u8; 4096]));
    c.send_request(CMD_DISC, 0, 1, 0, 0);
    assert!(c.closed(), "NBD_CMD_DISC closes the connection");
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let (node, d) = start();
    create(&d, "deep", "8MiB");
    let mut c = Raw::connect(&nbd_socket(&node));
    c.go("deep").unwrap();
    let n = 64u64;
    let block = |i: u64| vec![(i % 250) as u8 + 1; 16384];

    // Pipeline every write before reading any reply.
    for i in 0..n {
        c.send_request(CMD_WRITE, 0, i, i * 16384, 16384);
        c.s.write_all(&block(i)).unwrap();
    }
    let mut cookies: Vec<u64> = (0..n)
        .map(|_| {
            let (error, cookie) = c.reply();
            assert_eq!(error, 0);
            cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..n).collect::<Vec<_>>());

    // Pipeline every read; replies may come in any order.
    for i in 0..n {
        c.send_request(CMD_READ, 0, 1000 + i, i * 16384, 16384);
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0);
        let i = cookie - 1000;
        let mut data = vec![0u8; 16384];
        c.s.read_exact(&mut data).unwrap();
        assert_eq!(data, block(i), "block {i}");
        seen[i as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn fio_verifies_and_nbdcopy_copies() {
    let (node, d) = start();
    let size = create(&d, "bench", "16MiB");
    let out = d.cli(["volume", "export", "bench"]);
    out.success();
    let uri = out.stdout.trim().to_owned();

    // fio's nbd engine: random 4 KiB writes at queue depth 16, then a verifying read pass.
    let uri_arg = format!("--uri={uri}");
    let fio = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    assert!(fio.contains("err= 0"), "{fio}");

    // nbdcopy (several connections, since the export allows multi-conn) out and back in.
    let copy = node.scratch("copy.img");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), size);
    let data = random_file(&node.scratch("in.img"), 16 * MIB);
    run("nbdcopy", &[node.scratch("in.img").to_str().unwrap(), &uri]);
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "nbdcopy round trip differs"
    );
}

/// Issue 14, bounded NBD server: a client that dribbles a request byte by byte is cut off
/// (it could hold a connection and its buffers for ever), one that idles between requests is
/// not, and connections beyond the cap are closed as they come.
#[test]
fn a_dribbling_client_is_cut_off_and_connections_are_capped() {
    let (node, d) = start();
    d.cli(["volume", "create", "slow", "--size", "16MiB"])
        .success();
    let sock = nbd_socket(&node);

    // Idle between requests: kept.
    let mut idle = Raw::connect(&sock);
    idle.go("slow").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        idle.read(0, 4096).unwrap().len(),
        4096,
        "an idle client is served"
    );

    // A request header (28 bytes) sent a byte every 2 s: the server gives up 30 s after the
    // first byte, before the header is whole.
    let mut slow = Raw::connect(&sock);
    slow.go("slow").unwrap();
    let mut header = REQUEST_MAGIC.to_be_bytes().to_vec();
    header.extend_from_slice(&[0u8; 24]);
    let start = std::time::Instant::now();
    for b in &header {
        if slow.s.write_all(&[*b]).is_err() || start.elapsed() > Duration::from_secs(45) {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        if start.elapsed() > Duration::from_secs(32) {
            break;
        }
    }
    // (Reads time out after 20 s.)
    let mut b = [0u8; 1];
    match slow.s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a dribbling client was not cut off: {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(50),
        "{:?}",
        start.elapsed()
    );

    // 64 connections are served (each greeted); the 65th is closed at once.
    let held: Vec<Raw> = (0..63).map(|_| Raw::connect(&sock)).collect();
    let mut over = UnixStream::connect(&sock).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 18];
    assert!(
        matches!(over.read(&mut buf), Ok(0) | Err(_)),
        "a connection over the cap was greeted"
    );
    drop(held);
    drop(idle);
    // The server lets go of the volume once it has seen every connection close, which may
    // take a moment on a loaded machine: until then the volume is busy.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = d.cli(["volume", "delete", "slow"]);
        if out.code == Some(0) || std::time::Instant::now() > deadline {
            out.success();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
