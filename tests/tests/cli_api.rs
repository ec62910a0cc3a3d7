//! Scenarios of the `ballast` CLI and local API against a real daemon: validation messages and
//! exit codes, idempotent and conflicting creates, not-found, a daemon that is not running,
//! JSON output, pools, health/readiness/metrics, clean shutdown, restarts, and refusing a
//! second daemon.
//!
//! Exit codes (see `ballast --help`): 1 generic, 2 usage, 3 daemon not reachable, 4 not found,
//! 5 conflict, 6 invalid argument.

use std::time::Duration;

use integration_tests::{run_cli, Daemon, NodeDir, POOL_SIZE};
use nix::sys::signal::Signal;
use serde_json::Value;

const NOT_REACHABLE: i32 = 3;
const NOT_FOUND: i32 = 4;
const CONFLICT: i32 = 5;
const INVALID_ARGUMENT: i32 = 6;

fn start() -> (NodeDir, Daemon) {
    let node = NodeDir::new().expect("temporary directories");
    let daemon = Daemon::start(&node).expect("daemon starts");
    (node, daemon)
}

#[test]
fn bad_names_are_refused_with_the_rule() {
    let (_node, d) = start();
    let long = "a".repeat(64);
    for name in ["Bad_Name", "UPPER", "under_score", "dot.ted", long.as_str()] {
        d.cli(["volume", "create", name, "--size", "16MiB"])
            .expect_code(INVALID_ARGUMENT)
            .stderr_has("error: volume name")
            .stderr_has("lowercase DNS labels");
    }
    // A leading '-' would be a flag to clap; after `--` it reaches the name check.
    d.cli(["volume", "create", "--size", "16MiB", "--", "-db"])
        .expect_code(INVALID_ARGUMENT)
        .stderr_has("starts or ends with '-'");
    d.cli(["volume", "inspect", "Nope"])
        .expect_code(INVALID_ARGUMENT);

    // The daemon checks too, for clients other than the CLI.
    let r = d
        .api(
            "POST",
            "/v1/volumes",
            Some(r#"{"name": "Bad_Name", "size": "16MiB"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    let body = r.json().unwrap();
    assert_eq!(body["code"], "invalid_argument");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("lowercase DNS labels"),
        "{body}"
    );
    let r = d.api("GET", "/v1/volumes/Bad_Name", None).unwrap();
    assert_eq!(r.status, 400, "{r:?}");

    d.cli(["volume", "list", "-o", "json"]).success();
    assert_eq!(
        d.cli(["volume", "list", "-o", "json"]).json(),
        Value::Array(vec![])
    );
}

#[test]
fn bad_sizes_are_refused_with_examples() {
    let (_node, d) = start();
    for size in ["12XB", "banana", "0", "-5", "1.2.3", "GiB", ""] {
        d.cli(["volume", "create", "db", &format!("--size={size}")])
            .expect_code(INVALID_ARGUMENT)
            .stderr_has("invalid size")
            .stderr_has("e.g. 10GiB");
    }
    // The daemon checks the wire format itself.
    for body in [
        r#"{"name": "db", "size": "lots"}"#,
        r#"{"name": "db", "size": 0}"#,
        r#"{"name": "db", "size": -1}"#,
        r#"{"name": "db", "size": true}"#,
    ] {
        let r = d.api("POST", "/v1/volumes", Some(body)).unwrap();
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert_eq!(r.json().unwrap()["code"], "invalid_argument", "{body}");
    }
    // Larger than the pool: the storage engine says so.
    d.cli(["volume", "create", "huge", "--size", "1TiB"])
        .stderr_has("error: ")
        .stderr_has("1 TiB");
    d.cli(["volume", "create", "fine", "--size", "16MiB"])
        .success();
}

#[test]
fn malformed_requests_get_json_errors_naming_the_problem() {
    let (_node, d) = start();
    let cases = [
        (
            r#"{"name": "db", "size": "16MiB", "colour": "red"}"#,
            "unknown field `colour`",
        ),
        // Only a copy of a snapshot or a volume may leave the size out.
        (r#"{"name": "db"}"#, "size is required"),
        (r#"{"size": "16MiB"}"#, "missing field `name`"),
        (r#"{"name": "db", "size": "#, "not valid JSON"),
        ("", "empty"),
    ];
    for (body, expected) in cases {
        let r = d.api("POST", "/v1/volumes", Some(body)).unwrap();
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("application/json"),
            "{r:?}"
        );
        let json = r.json().unwrap();
        assert_eq!(json["code"], "invalid_argument", "{body}");
        assert!(
            json["message"].as_str().unwrap().contains(expected),
            "{body}: {json}"
        );
    }
    let r = d.api("GET", "/v1/nothing-here", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["code"], "not_found");
    let r = d.api("PUT", "/v1/volumes", None).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.json().unwrap()["code"], "invalid_argument");
}

#[test]
fn more_replicas_than_pool_devices_names_the_shortfall() {
    let (_node, d) = start();
    let out = d.cli([
        "volume",
        "create",
        "db",
        "--size",
        "16MiB",
        "--replicas",
        "2",
    ]);
    out.expect_code(1)
        .stderr_has("2 replicas need 2 pool devices")
        .stderr_has("this node has 1")
        .stderr_has("add pool devices")
        .stderr_has("--etcd");
    let r = d
        .api(
            "POST",
            "/v1/volumes",
            Some(r#"{"name": "db", "size": "16MiB", "replicas": 3}"#),
        )
        .unwrap();
    assert_eq!(r.status, 412, "{r:?}");
    assert_eq!(r.json().unwrap()["code"], "failed_precondition");
    d.cli(["volume", "inspect", "db"]).expect_code(NOT_FOUND);
}

#[test]
fn create_with_the_same_spec_is_idempotent() {
    let (_node, d) = start();
    let first = d.cli(["volume", "create", "db", "--size", "64MiB", "-o", "json"]);
    let first = first.success().json();
    let again = d.cli(["volume", "create", "db", "--size", "64MiB"]);
    again.success().stdout_has("already exists with this spec");
    let again = d
        .cli(["volume", "create", "db", "--size", "64MiB", "-o", "json"])
        .json();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["size_bytes"], 64 << 20);

    // Over the API: 201 for a new volume, 200 for an identical repeat.
    let body = r#"{"name": "api", "size": 16777216}"#;
    assert_eq!(
        d.api("POST", "/v1/volumes", Some(body)).unwrap().status,
        201
    );
    assert_eq!(
        d.api("POST", "/v1/volumes", Some(body)).unwrap().status,
        200
    );
    assert_eq!(
        d.cli(["volume", "list", "-o", "json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn create_with_a_different_size_conflicts() {
    let (_node, d) = start();
    d.cli(["volume", "create", "db", "--size", "64MiB"])
        .success();
    d.cli(["volume", "create", "db", "--size", "128MiB"])
        .expect_code(CONFLICT)
        .stderr_has("error: volume db already exists")
        .stderr_has("64 MiB");
    let r = d
        .api(
            "POST",
            "/v1/volumes",
            Some(r#"{"name": "db", "size": "32MiB"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.json().unwrap()["code"], "conflict");
    // The original is untouched.
    let v = d.cli(["volume", "inspect", "db", "-o", "json"]).json();
    assert_eq!(v["size_bytes"], 64 << 20);
}

#[test]
fn unknown_volumes_are_not_found() {
    let (_node, d) = start();
    for args in [
        vec!["volume", "inspect", "ghost"],
        vec!["volume", "delete", "ghost"],
        vec!["volume", "resize", "ghost", "--size", "32MiB"],
    ] {
        d.cli(&args)
            .expect_code(NOT_FOUND)
            .stderr_has("error: volume ghost not found")
            .stderr_has("hint: ");
    }
    let r = d.api("DELETE", "/v1/volumes/ghost", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["code"], "not_found");
}

#[test]
fn volume_lifecycle_create_resize_inspect_delete() {
    let (_node, d) = start();
    d.cli(["volume", "create", "db", "--size", "32MiB"])
        .success()
        .stdout_has("volume db created: 32 MiB");
    d.cli(["volume", "resize", "db", "--size", "48MiB"])
        .success()
        .stdout_has("resized to 48 MiB");
    d.cli(["volume", "resize", "db", "--size", "16MiB"])
        .expect_code(INVALID_ARGUMENT)
        .stderr_has("shrink");
    let table = d.cli(["volume", "list"]);
    table
        .success()
        .stdout_has("NAME")
        .stdout_has("SIZE")
        .stdout_has("48 MiB");
    d.cli(["volume", "inspect", "db"])
        .success()
        .stdout_has("size:")
        .stdout_has("48 MiB (50331648 bytes)");
    d.cli(["volume", "delete", "db"])
        .success()
        .stdout_has("volume db deleted");
    d.cli(["volume", "inspect", "db"]).expect_code(NOT_FOUND);
    d.cli(["volume", "list"]).success().stdout_has("no volumes");
}

#[test]
fn json_output_parses() {
    let (_node, d) = start();
    let created = d
        .cli([
            "volume",
            "create",
            "db",
            "--size",
            "16MiB",
            "--replicas",
            "1",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(created["name"], "db");
    assert_eq!(created["replicas"], 1);
    assert!(
        created["id"].as_str().is_some_and(|id| id.len() == 36),
        "{created}"
    );

    let list = d.cli(["volume", "list", "-o", "json"]).json();
    assert_eq!(list[0]["id"], created["id"]);
    let inspect = d.cli(["volume", "inspect", "db", "-o", "json"]).json();
    assert_eq!(inspect, created);
    let resized = d
        .cli(["volume", "resize", "db", "--size", "32MiB", "-o", "json"])
        .json();
    assert_eq!(resized["size_bytes"], 32 << 20);

    let pools = d.cli(["pool", "list", "-o", "json"]).json();
    assert_eq!(pools.as_array().unwrap().len(), 1);
    assert_eq!(pools[0]["node_id"], "test-node");

    let status = d.cli(["status", "-o", "json"]).json();
    assert_eq!(status["node_id"], "test-node");
    assert_eq!(status["volumes"], 1);
    assert_eq!(status["pools"]["devices"], 1);
    assert!(
        ["io_uring", "sync"].contains(&status["engine"].as_str().unwrap()),
        "{status}"
    );
    d.cli(["status"])
        .success()
        .stdout_has("node:")
        .stdout_has("test-node");
}

#[test]
fn pool_list_shows_capacity() {
    let (node, d) = start();
    let pools = d.cli(["pool", "list", "-o", "json"]).json();
    let pool = &pools[0];
    let capacity = pool["capacity_bytes"].as_u64().unwrap();
    let pool_bytes = api::parse_size(POOL_SIZE).unwrap();
    assert!(
        capacity > pool_bytes / 2 && capacity <= pool_bytes,
        "{pool}"
    );
    assert_eq!(pool["path"], node.pool().display().to_string());
    assert_eq!(
        pool["allocated_bytes"].as_u64().unwrap() + pool["free_bytes"].as_u64().unwrap(),
        capacity
    );

    let table = d.cli(["pool", "list"]);
    table
        .success()
        .stdout_has("CAPACITY")
        .stdout_has("FREE")
        .stdout_has(&api::format_size(capacity));
    table.stdout_has(&node.pool().display().to_string());
}

#[test]
fn daemon_not_running_says_so_and_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    for args in [
        vec!["volume", "list"],
        vec!["status"],
        vec!["pool", "list", "-o", "json"],
    ] {
        run_cli(&socket, &args)
            .expect_code(NOT_REACHABLE)
            .stderr_has(&format!(
                "error: the ballast daemon is not running at {}",
                socket.display()
            ))
            .stderr_has("ballast daemon")
            .stderr_has("systemctl start ballast")
            .stderr_has("BALLAST_API_SOCKET");
    }

    // A stale socket file (its daemon was killed) is "not running" too.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    run_cli(&socket, ["volume", "list"])
        .expect_code(NOT_REACHABLE)
        .stderr_has("not running");

    // --api-socket overrides the environment.
    let (_node, d) = start();
    run_cli(
        &socket,
        [
            "--api-socket",
            d.socket().to_str().unwrap(),
            "volume",
            "list",
        ],
    )
    .success();
}

#[test]
fn usage_errors_exit_2_and_help_documents_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    run_cli(&socket, ["volume", "create", "db"])
        .expect_code(2)
        .stderr_has("--size");
    run_cli(&socket, ["volume", "frobnicate"]).expect_code(2);
    let help = run_cli(&socket, ["--help"]);
    help.success()
        .stdout_has("Exit codes")
        .stdout_has("3  the daemon is not reachable");
}

#[test]
fn health_readiness_and_metrics_answer() {
    let (_node, d) = start();
    let healthz = d.http("GET", "/healthz").unwrap();
    assert_eq!(healthz.status, 200);
    let readyz = d.http("GET", "/readyz").unwrap();
    assert_eq!((readyz.status, readyz.body.trim()), (200, "ready"));

    d.cli(["volume", "create", "db", "--size", "16MiB"])
        .success();
    let metrics = d.http("GET", "/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.header("content-type").unwrap().contains("text"),
        "{metrics:?}"
    );
    for expected in [
        "ballast_build_info{",
        "ballast_ready 1",
        "ballast_volumes 1",
        "ballast_pool_capacity_bytes{",
        "ballast_pool_allocated_bytes{",
        "ballast_pool_free_bytes{",
        "ballast_pool_checksum_errors_total{",
        "ballast_volume_io_operations_total{volume=\"db\",op=\"read\"}",
        "ballast_volume_io_bytes_total{volume=\"db\",op=\"write\"}",
        "ballast_volume_io_latency_seconds_bucket{le=\"+Inf\",volume=\"db\",op=\"write\"}",
        "ballast_volume_checksum_errors_total{volume=\"db\"} 0",
    ] {
        assert!(
            metrics.body.contains(expected),
            "/metrics lacks {expected:?}:\n{}",
            metrics.body
        );
    }
    assert_eq!(d.http("GET", "/nothing").unwrap().status, 404);
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let (node, mut d) = start();
    d.cli(["volume", "create", "db", "--size", "16MiB"])
        .success();
    assert!(node.socket().exists());
    let status = d.terminate().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        d.log()
    );
    assert!(
        !node.socket().exists(),
        "the API socket is removed on shutdown"
    );
    assert!(
        !node.http_addr_file().exists(),
        "http.addr is removed on shutdown"
    );
    assert!(
        d.log().contains("storage flushed and closed"),
        "{}",
        d.log()
    );
    node.cli(["volume", "list"]).expect_code(NOT_REACHABLE);
}

#[test]
fn sigint_shuts_down_cleanly_too() {
    let (node, mut d) = start();
    d.signal(Signal::SIGINT).unwrap();
    let status = d.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        d.log()
    );
    assert!(!node.socket().exists());
}

/// `(name, id, size_bytes)` of every volume, sorted by name.
fn volumes(d: &Daemon) -> Vec<(String, String, u64)> {
    let list = d.cli(["volume", "list", "-o", "json"]).json();
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["id"].as_str().unwrap().to_owned(),
                v["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn restart_finds_every_volume_again() {
    let node = NodeDir::new().unwrap();
    let before = {
        let mut d = Daemon::start(&node).unwrap();
        for (name, size) in [
            ("alpha", "16MiB"),
            ("beta", "32MiB"),
            ("gamma", "8MiB"),
            ("doomed", "8MiB"),
        ] {
            d.cli(["volume", "create", name, "--size", size]).success();
        }
        d.cli(["volume", "resize", "gamma", "--size", "24MiB"])
            .success();
        d.cli(["volume", "delete", "doomed"]).success();
        let before = volumes(&d);
        assert_eq!(before.len(), 3);
        assert_eq!(d.terminate().unwrap().code(), Some(0));
        before
    };

    let d = Daemon::start(&node).unwrap();
    assert_eq!(
        volumes(&d),
        before,
        "every volume is found again with the same id and size"
    );
    assert_eq!(before.iter().find(|v| v.0 == "gamma").unwrap().2, 24 << 20);
    d.cli(["volume", "inspect", "doomed"])
        .expect_code(NOT_FOUND);
}

#[test]
fn restart_after_sigkill_replaces_the_stale_socket() {
    let node = NodeDir::new().unwrap();
    let before = {
        let mut d = Daemon::start(&node).unwrap();
        d.cli(["volume", "create", "db", "--size", "16MiB"])
            .success();
        let before = volumes(&d);
        d.kill().unwrap();
        assert!(node.socket().exists(), "SIGKILL leaves the socket behind");
        before
    };
    let d = Daemon::start(&node).unwrap();
    assert!(d.log().contains("removing a stale socket"), "{}", d.log());
    assert_eq!(volumes(&d), before);
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let (node, first) = start();
    // Same data dir, its own socket: the data-directory lock refuses it.
    let other_socket = node.scratch("other.sock");
    let mut args = node.daemon_args();
    let at = args.iter().position(|a| a == "--api-socket").unwrap();
    args[at + 1] = other_socket.display().to_string();
    let mut second = Daemon::spawn(&node, &args).unwrap();
    let status = second.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(1), "log:\n{}", second.log());
    let log = second.log();
    assert!(log.contains("already using the data directory"), "{log}");
    assert!(log.contains(&format!("pid {}", first.pid())), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "one clear line:\n{log}"
    );
    assert!(!other_socket.exists());
    // The first daemon is unaffected.
    first.cli(["volume", "list"]).success();
    assert_eq!(first.http("GET", "/readyz").unwrap().status, 200);
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let (first_node, first) = start();
    let node = NodeDir::new().unwrap();
    let mut args = node.daemon_args();
    let at = args.iter().position(|a| a == "--api-socket").unwrap();
    args[at + 1] = first_node.socket().display().to_string();
    let mut second = Daemon::spawn(&node, &args).unwrap();
    let status = second.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(1), "log:\n{}", second.log());
    assert!(second.log().contains("already running"), "{}", second.log());
    assert!(
        first_node.socket().exists(),
        "the live socket is left alone"
    );
    first.cli(["volume", "list"]).success();
}

#[test]
fn startup_errors_are_one_clear_line() {
    let node = NodeDir::new().unwrap();
    // A pool file that does not exist, with no size to create it.
    let missing = node.scratch("missing.img");
    let mut args = node.daemon_args();
    let at = args.iter().position(|a| a == "--pool").unwrap();
    args[at + 1] = missing.display().to_string();
    let mut d = Daemon::spawn(&node, &args).unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)).unwrap().code(),
        Some(1)
    );
    let log = d.log();
    let errors: Vec<_> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains(&missing.display().to_string()), "{log}");
    assert!(
        !node.socket().exists(),
        "a failed start leaves no socket behind"
    );

    // A config file with a typo.
    let config = node.scratch("ballast.toml");
    std::fs::write(&config, "data_dri = \"/tmp/x\"\n").unwrap();
    let mut d = Daemon::spawn(&node, ["daemon", "--config", config.to_str().unwrap()]).unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)).unwrap().code(),
        Some(1)
    );
    let log = d.log();
    assert!(log.starts_with("error: invalid config file"), "{log}");
    assert!(log.contains("unknown field `data_dri`"), "{log}");
}

#[test]
fn config_file_works_and_flags_override_it() {
    let node = NodeDir::new().unwrap();
    let config = node.scratch("ballast.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nnode_id = \"from-file\"\napi_socket = {:?}\nhttp = \"127.0.0.1:0\"\nengine = \"sync\"\nio_threads = 1\n\n[[pool]]\npath = {:?}\nsize = \"{POOL_SIZE}\"\n",
            node.data_dir().display().to_string(),
            node.socket().display().to_string(),
            node.pool().display().to_string(),
        ),
    )
    .unwrap();
    let mut d = Daemon::spawn(
        &node,
        [
            "daemon",
            "--config",
            config.to_str().unwrap(),
            "--node-id",
            "from-flag",
        ],
    )
    .unwrap();
    d.wait_ready(Duration::from_secs(60)).unwrap();
    let status = d.cli(["status", "-o", "json"]).json();
    assert_eq!(status["node_id"], "from-flag");
    assert_eq!(status["engine"], "sync");
}

#[test]
fn logs_are_one_json_object_per_line_with_the_flag() {
    let node = NodeDir::new().unwrap();
    let mut args = node.daemon_args();
    args.extend(["--log-format".to_owned(), "json".to_owned()]);
    let mut d = Daemon::spawn(&node, &args).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d.cli(["volume", "create", "logged", "--size", "1MiB"])
        .success();
    assert_eq!(d.terminate().unwrap().code(), Some(0));
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("created volume") && l.contains("\"volume\":\"logged\"")),
        "{log}"
    );
}
