//! Conformance of the two cluster store backends: one test body, run against the embedded
//! store and against a real etcd started by the test (and killed when the test ends, even on
//! a panic).
//!
//! etcd must be installed (`apt-get install etcd-server`); without it these tests fail, they
//! are never skipped. `BALLAST_TEST_ETCD` may name the etcd binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::store::{spawn_keepalive, Kv, Store, StoreError, Versioned};
use serde::{Deserialize, Serialize};

/// A free TCP port on 127.0.0.1 (free when this returns; good enough for a test).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BALLAST_TEST_ETCD") {
        return PathBuf::from(path);
    }
    for candidate in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "etcd is not installed, and these tests need a real etcd: run \
         `apt-get install etcd-server` (or set BALLAST_TEST_ETCD to the etcd binary)"
    );
}

/// One etcd member on free ports in a temporary directory; killed on drop.
struct Etcd {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let child = Command::new(etcd_binary())
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start etcd ({e}); is it installed? run `apt-get install etcd-server`"
                )
            });
        // From here on, Drop kills the process whatever happens.
        let mut etcd = Etcd { child, url, dir };
        let start = Instant::now();
        loop {
            if Store::etcd(std::slice::from_ref(&etcd.url)).await.is_ok() {
                return etcd;
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log =
                    std::fs::read_to_string(etcd.dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status} at start-up:\n{log}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd did not answer at {} within 20s",
                etcd.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keys(kvs: &[Kv]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Attachment {
    node: String,
    epoch: u64,
}

/// Wait until `key` is gone (lease expiry is not instantaneous in etcd).
async fn wait_gone(store: &Store, key: &str, within: Duration) {
    let start = Instant::now();
    while store.get(key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < within,
            "{key} still exists {within:?} after its lease should have expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The behaviour both backends must have.
async fn conformance(store: &Store) {
    // Put, get, list.
    assert_eq!(store.get("t/missing").await.unwrap(), None);
    let r1 = store.put("t/b", b"two", None).await.unwrap();
    let r2 = store.put("t/a", &[0, 1, 255], None).await.unwrap();
    assert!(r2 > r1);
    store.put("t0", b"outside", None).await.unwrap();
    store.put("s/x", b"outside", None).await.unwrap();
    let a = store.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        a,
        Kv {
            key: "t/a".into(),
            value: vec![0, 1, 255],
            mod_revision: r2,
            lease: None
        }
    );
    let listed = store.list("t/").await.unwrap();
    assert_eq!(keys(&listed), ["t/a", "t/b"]);
    assert_eq!(listed[1].value, b"two");
    assert_eq!(store.put("t/empty", b"", None).await.unwrap(), r2 + 3);
    assert_eq!(store.get("t/empty").await.unwrap().unwrap().value, b"");

    // Create.
    assert!(store.create("t/c", b"first", None).await.unwrap());
    assert!(!store.create("t/c", b"second", None).await.unwrap());
    assert_eq!(store.get("t/c").await.unwrap().unwrap().value, b"first");

    // Compare-and-swap: 0 means absent; a stale revision loses.
    assert!(store.cas("t/d", 0, b"v1").await.unwrap());
    assert!(!store.cas("t/d", 0, b"v1 again").await.unwrap());
    let rev = store.get("t/d").await.unwrap().unwrap().mod_revision;
    assert!(store.cas("t/d", rev, b"v2").await.unwrap());
    assert!(!store.cas("t/d", rev, b"v3").await.unwrap(), "stale");
    assert!(!store.cas("t/none", 12345, b"x").await.unwrap(), "absent");
    assert_eq!(store.get("t/none").await.unwrap(), None);
    assert_eq!(store.get("t/d").await.unwrap().unwrap().value, b"v2");

    // Typed JSON.
    let att = Attachment {
        node: "n1".into(),
        epoch: 1,
    };
    assert!(store.cas_json("t/att", 0, &att).await.unwrap());
    let Versioned {
        value,
        mod_revision,
    } = store
        .get_json::<Attachment>("t/att")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(value, att);
    let next = Attachment {
        node: "n2".into(),
        epoch: 2,
    };
    assert!(store.cas_json("t/att", mod_revision, &next).await.unwrap());
    assert!(!store.cas_json("t/att", mod_revision, &att).await.unwrap());
    store.put_json("t/att2", &next, None).await.unwrap();
    assert_eq!(
        store
            .get_json::<Attachment>("t/att2")
            .await
            .unwrap()
            .unwrap()
            .value,
        next
    );
    let err = store.get_json::<Attachment>("t/b").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("t/b"), "{err}");

    // Delete.
    store.delete("t/c").await.unwrap();
    store.delete("t/c").await.unwrap();
    assert_eq!(store.get("t/c").await.unwrap(), None);
    store.delete_prefix("t/").await.unwrap();
    assert_eq!(store.list("t/").await.unwrap(), []);
    assert!(store.get("t0").await.unwrap().is_some(), "not under t/");
    assert_eq!(keys(&store.list("").await.unwrap()), ["s/x", "t0"]);

    // Leases: keys follow their lease; a renewed lease keeps them.
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    let renewed = store.keep_alive(lease).await.unwrap();
    assert!(
        renewed >= ttl && renewed <= Duration::from_secs(5),
        "TTL in force: {renewed:?}"
    );
    store.put("l/a", b"1", Some(lease)).await.unwrap();
    assert!(store.create("l/b", b"2", Some(lease)).await.unwrap());
    assert_eq!(
        store.get("l/a").await.unwrap().unwrap().lease,
        Some(lease.0)
    );
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        store.keep_alive(lease).await.unwrap();
    }
    assert_eq!(keys(&store.list("l/").await.unwrap()), ["l/a", "l/b"]);
    wait_gone(store, "l/a", renewed + Duration::from_secs(5)).await;
    assert_eq!(store.get("l/b").await.unwrap(), None);
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseExpired)
    ));
    assert!(matches!(
        store.put("l/c", b"", Some(lease)).await,
        Err(StoreError::LeaseExpired)
    ));
    assert!(matches!(
        store.create("l/c", b"", Some(lease)).await,
        Err(StoreError::LeaseExpired)
    ));

    // Revoking deletes at once, and is idempotent.
    let lease = store.grant_lease(ttl).await.unwrap();
    store.put("l/r", b"", Some(lease)).await.unwrap();
    store.revoke(lease).await.unwrap();
    assert_eq!(store.get("l/r").await.unwrap(), None);
    store.revoke(lease).await.unwrap();

    // The keeper renews in the background, and stops when dropped.
    let lease = store.grant_lease(ttl).await.unwrap();
    store.put("l/k", b"", Some(lease)).await.unwrap();
    let keeper = spawn_keepalive(store.clone(), lease, renewed);
    tokio::time::sleep(renewed * 2).await;
    assert!(keeper.is_valid());
    assert!(store.get("l/k").await.unwrap().is_some());
    drop(keeper);
    wait_gone(store, "l/k", renewed + Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::embedded(&dir.path().join("cluster.json")).unwrap();
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_conforms() {
    let etcd = Etcd::start().await;
    let store = Store::etcd(std::slice::from_ref(&etcd.url)).await.unwrap();
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_reported_quickly_and_clearly() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let err = Store::etcd(std::slice::from_ref(&dead)).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&dead), "{message}");
    assert!(message.contains("is etcd running?"), "{message}");

    let err = Store::etcd(&["https://127.0.0.1:1".to_owned()])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEndpoint { .. }), "{err}");
    let err = Store::etcd(&[]).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidEndpoint { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_endpoint_fails_over_to_the_next() {
    let etcd = Etcd::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Both list forms: separate items, and one comma-separated item.
    for endpoints in [
        vec![dead.clone(), etcd.url.clone()],
        vec![format!("{dead},{}", etcd.url)],
    ] {
        let store = Store::etcd(&endpoints).await.unwrap();
        store.put("f/k", b"v", None).await.unwrap();
        assert_eq!(store.get("f/k").await.unwrap().unwrap().value, b"v");
        assert!(store.cas("f/new", 0, b"x").await.unwrap());
        store.delete_prefix("f/").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_reports_a_lease_it_cannot_renew() {
    let mut etcd = Etcd::start().await;
    let store = Store::etcd(std::slice::from_ref(&etcd.url)).await.unwrap();
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    let ttl = store.keep_alive(lease).await.unwrap();
    let keeper = spawn_keepalive(store.clone(), lease, ttl);
    let mut valid = keeper.subscribe();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(keeper.is_valid());

    let _ = etcd.child.kill();
    let _ = etcd.child.wait();
    let killed = Instant::now();
    tokio::time::timeout(ttl + Duration::from_secs(1), valid.wait_for(|v| !v))
        .await
        .expect("the keeper still claims the lease after its TTL")
        .unwrap();
    assert!(killed.elapsed() <= ttl + Duration::from_millis(200));
    assert!(!keeper.is_valid());
}
