//! Mutual TLS on the replica protocol (issue 14), against a real server on loopback: who is
//! refused, and certificates that rotate without a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use replication::fence::FenceTable;
use replication::remote::{RemoteOptions, ReplicaClient};
use replication::server::{ReplicaServer, ServerHandle};
use replication::tls::{issue_ca, issue_node, Change, Members, Tls, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volume::io::{probe, EngineKind};
use volume::pool::{DeviceSpec, Storage, StorageConfig};

const MIB: u64 = 1 << 20;

/// What the "store" says: the nodes, each volume's attachment, the volumes placed here, and
/// the intents (volume: node, change, size).
#[derive(Debug)]
struct Fixed {
    nodes: BTreeSet<String>,
    attached: std::collections::BTreeMap<String, (String, u64)>,
    placed_here: BTreeSet<String>,
    intents: Vec<(&'static str, &'static str, Change, u64)>,
}

impl Members for Fixed {
    fn is_node<'a>(&'a self, name: &'a str) -> replication::tls::Answer<'a> {
        Box::pin(async move { self.nodes.contains(name) })
    }

    fn may_register<'a>(
        &'a self,
        peer: &'a str,
        volume: &'a str,
        epoch: u64,
    ) -> replication::tls::Answer<'a> {
        Box::pin(async move {
            self.attached
                .get(volume)
                .is_some_and(|(n, e)| n == peer && *e == epoch)
        })
    }

    fn may_delete<'a>(&'a self, volume: &'a str) -> replication::tls::Answer<'a> {
        Box::pin(async move { !self.placed_here.contains(volume) })
    }

    fn may_change<'a>(
        &'a self,
        peer: &'a str,
        volume: &'a str,
        change: Change,
        size: u64,
    ) -> replication::tls::Answer<'a> {
        Box::pin(async move { self.intents.contains(&(volume, peer, change, size)) })
    }
}

/// A CA: its certificate and key.
struct Ca {
    cert: String,
    key: String,
}

impl Ca {
    fn new() -> Self {
        let (cert, key) = issue_ca().unwrap();
        Self { cert, key }
    }

    /// Write `node`'s files (and this CA's certificate) under `dir`; their paths.
    fn files(&self, dir: &Path, node: &str) -> TlsFiles {
        let (cert, key) = issue_node(&self.key, node, &[], 30).unwrap();
        let files = TlsFiles {
            ca: dir.join(format!("{node}-ca.pem")),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}-key.pem")),
        };
        std::fs::write(&files.ca, &self.cert).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }
}

fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix("ballast-tls-test-")
        .tempdir_in(base)
        .unwrap()
}

/// A TLS replica server for node `node-b`, which admits `node-a` and `node-b`.
async fn server(dir: &Path, files: TlsFiles) -> (Arc<Storage>, ServerHandle) {
    let storage = Arc::new(
        Storage::open(StorageConfig {
            devices: vec![DeviceSpec {
                path: dir.join("pool"),
                create_size: Some(64 * MIB),
            }],
            node_id: "node-b".into(),
            force_format: false,
            engine: probe(EngineKind::Sync, 1).unwrap(),
        })
        .await
        .unwrap(),
    );
    let fence = Arc::new(FenceTable::open(dir.join("fence.json")).unwrap());
    let members = Fixed {
        nodes: ["node-a", "node-b"].map(String::from).into(),
        attached: [("v1".to_owned(), ("node-a".to_owned(), 3))].into(),
        placed_here: ["v1".to_owned()].into(),
        // node-a may create these (4 MiB each) and grow v1 to 8 MiB.
        intents: ["v1", "v2", "v3", "v4", "v5", "v6", "r1", "r2", "r3", "r4"]
            .map(|v| (v, "node-a", Change::Create, 4 * MIB))
            .into_iter()
            .chain([("v1", "node-a", Change::Resize, 8 * MIB)])
            .collect(),
    };
    let handle = ReplicaServer::bind("127.0.0.1:0".parse().unwrap(), storage.clone(), fence)
        .await
        .unwrap()
        .with_tls(Tls::load(files).unwrap(), Arc::new(members))
        .spawn()
        .unwrap();
    (storage, handle)
}

fn opts(me: &str, tls: Option<&TlsFiles>, server: &str) -> RemoteOptions {
    RemoteOptions {
        timeout: Duration::from_secs(3),
        node: me.into(),
        tls: tls.map(|f| (Tls::load(f.clone()).unwrap(), server.to_owned())),
    }
}

/// Whether a control client gets a volume created.
async fn creates(
    addr: std::net::SocketAddr,
    o: &RemoteOptions,
    volume: &str,
) -> Result<(), String> {
    let c = ReplicaClient::connect(addr, o)
        .await
        .map_err(|e| e.to_string())?;
    c.create(volume, 4 * MIB).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn only_a_node_of_the_cluster_with_a_certificate_from_its_ca_is_served() {
    let dir = tempdir();
    let ca = Ca::new();
    let (storage, srv) = server(dir.path(), ca.files(dir.path(), "node-b")).await;
    let addr = srv.local_addr();
    let node_a = ca.files(dir.path(), "node-a");

    // The right node, with its certificate: served.
    creates(addr, &opts("node-a", Some(&node_a), "node-b"), "v1")
        .await
        .unwrap();

    // No TLS at all: refused.
    let e = creates(addr, &opts("node-a", None, "node-b"), "v2")
        .await
        .unwrap_err();
    eprintln!("plaintext: {e}");

    // A certificate from another CA: the handshake fails (the client does not trust the
    // server either).
    let other = Ca::new();
    let other_dir = tempdir();
    let stranger = other.files(other_dir.path(), "node-a");
    let e = creates(addr, &opts("node-a", Some(&stranger), "node-b"), "v3")
        .await
        .unwrap_err();
    eprintln!("other CA: {e}");

    // A certificate from the CA for a name that is no node of the cluster: refused at hello.
    let outsider = ca.files(dir.path(), "node-x");
    let e = creates(addr, &opts("node-x", Some(&outsider), "node-b"), "v4")
        .await
        .unwrap_err();
    assert!(e.contains("not a node of this cluster"), "{e}");

    // node-a's certificate, claiming to be node-b: refused.
    let e = creates(addr, &opts("node-b", Some(&node_a), "node-b"), "v5")
        .await
        .unwrap_err();
    assert!(e.contains("not a node of this cluster"), "{e}");

    // The client checks the server too: node-b's server is not node-c.
    let e = creates(addr, &opts("node-a", Some(&node_a), "node-c"), "v6")
        .await
        .unwrap_err();
    assert!(e.contains("TLS"), "{e}");

    // Only the first request made a volume.
    let made: Vec<String> = api::VolumeControl::list_volumes(storage.as_ref())
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(made, ["v1"]);

    // A node of the cluster with a good certificate is still held to what the store says:
    // it registers only the attachment recorded for it, and deletes no replica placed here.
    let c = ReplicaClient::connect(addr, &opts("node-a", Some(&node_a), "node-b"))
        .await
        .unwrap();
    c.register("v1", 3)
        .await
        .expect("the recorded attachment registers");
    for (volume, epoch) in [("v1", 4), ("v1", u64::MAX), ("v2", 1)] {
        let e = c.register(volume, epoch).await.unwrap_err().to_string();
        assert!(e.contains("not allowed"), "{volume} {epoch}: {e}");
    }
    let b = ReplicaClient::connect(
        addr,
        &opts("node-b", Some(&ca.files(dir.path(), "node-b")), "node-b"),
    )
    .await
    .unwrap();
    let e = b.register("v1", 3).await.unwrap_err().to_string();
    assert!(e.contains("not allowed"), "another node's attachment: {e}");
    // Nor does it read or write node-a's attachment, even with its epoch.
    for req in [
        replication::wire::Request::Read {
            volume: "v1".into(),
            epoch: 3,
            offset: 0,
            len: 4096,
        },
        replication::wire::Request::Flush {
            volume: "v1".into(),
            epoch: 3,
        },
    ] {
        let resp = b.call(req).await.unwrap();
        assert!(
            matches!(resp, replication::wire::Response::Error { .. }),
            "another node was served: {resp:?}"
        );
    }
    let e = c.delete("v1").await.unwrap_err().to_string();
    assert!(e.contains("not allowed"), "{e}");
    // It creates and grows replicas only as its intents in the store say: not another
    // volume, not another size, not someone else's intent.
    for (who, volume, size) in [
        (&c, "v9", 4 * MIB),
        (&c, "v2", 16 * MIB),
        (&b, "v2", 4 * MIB),
    ] {
        let e = who.create(volume, size).await.unwrap_err().to_string();
        assert!(e.contains("not allowed"), "{volume} {size}: {e}");
    }
    let e = c
        .resize("v1", 64 * MIB, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not allowed"), "{e}");
    let e = b
        .resize("v1", 8 * MIB, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not allowed"), "{e}");
    c.resize("v1", 64 * MIB, true)
        .await
        .expect_err("a dry run is only a check, but 64 MiB does not fit");
    c.resize("v1", 8 * MIB, true)
        .await
        .expect("a dry run needs no intent");
    c.resize("v1", 8 * MIB, false)
        .await
        .expect("the recorded growth is done");
    // A stale request learns nothing: no epoch in the answer.
    let stale = c.register("v1", 2).await.unwrap_err().to_string();
    assert!(stale.contains("not allowed"), "{stale}");

    // A raw plaintext frame gets nothing back: the connection is closed.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0u8; 64]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("the server closes a plaintext connection")
        .unwrap_or(0);
    assert!(
        n == 0 || buf[0] == 0x15,
        "no TLS alert or close: {:?}",
        &buf[..n]
    );
    srv.stop().await;
}

#[tokio::test]
async fn certificates_rotate_without_a_restart() {
    let dir = tempdir();
    let old = Ca::new();
    let server_files = old.files(dir.path(), "node-b");
    let (_storage, srv) = server(dir.path(), server_files.clone()).await;
    let addr = srv.local_addr();
    let old_a = old.files(dir.path(), "node-a");
    creates(addr, &opts("node-a", Some(&old_a), "node-b"), "r1")
        .await
        .unwrap();

    // A new CA, and new files for the server in the same places.
    let new = Ca::new();
    let rotated = new.files(dir.path(), "node-b");
    assert_eq!(rotated, server_files);
    let new_dir = tempdir();
    let new_a = new.files(new_dir.path(), "node-a");
    // The server notices within a second or so.
    let mut served = Err(String::new());
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        served = creates(addr, &opts("node-a", Some(&new_a), "node-b"), "r2").await;
        if served.is_ok() {
            break;
        }
    }
    served.expect("a client of the new CA is served after the rotation");
    let e = creates(addr, &opts("node-a", Some(&old_a), "node-b"), "r3")
        .await
        .unwrap_err();
    eprintln!("old CA after the rotation: {e}");

    // A broken rotation keeps the previous files in use.
    std::fs::write(&server_files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    creates(addr, &opts("node-a", Some(&new_a), "node-b"), "r4")
        .await
        .expect("still served with the last good files");
    srv.stop().await;
}
