//! End-to-end tests: a real pool file, a replica server on loopback, and remote replicas.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::fence::FenceTable;
use replication::nexus::Resizable;
use replication::remote::{RemoteOptions, RemoteReplica, ReplicaClient};
use replication::server::{ReplicaServer, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volume::device::{BlockDevice, DeviceErrorKind, WriteFlags};
use volume::io::{probe, EngineKind, IoBuf};
use volume::pool::{DeviceSpec, Storage, StorageConfig};

const MIB: u64 = 1 << 20;
const VOL_SIZE: u64 = 16 * MIB;

/// A temporary directory on a filesystem with O_DIRECT (not tmpfs).
fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix("ballast-repl-test-")
        .tempdir_in(base)
        .expect("tempdir")
}

struct Node {
    dir: tempfile::TempDir,
    storage: Arc<Storage>,
    server: ServerHandle,
}

impl Node {
    async fn start() -> Self {
        let dir = tempdir();
        let engine = probe(EngineKind::Sync, 2).expect("engine");
        let storage = Storage::open(StorageConfig {
            devices: vec![DeviceSpec {
                path: dir.path().join("pool"),
                create_size: Some(128 * MIB),
            }],
            node_id: "test-node".into(),
            force_format: false,
            engine,
        })
        .await
        .expect("open storage");
        let storage = Arc::new(storage);
        let server = serve(&dir, storage.clone()).await;
        Self {
            dir,
            storage,
            server,
        }
    }

    fn fence_path(&self) -> PathBuf {
        self.dir.path().join("fence.json")
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    async fn client(&self) -> ReplicaClient {
        ReplicaClient::connect(self.addr(), &opts())
            .await
            .expect("client")
    }

    async fn volume(&self, name: &str) {
        self.client()
            .await
            .create(name, VOL_SIZE)
            .await
            .expect("create");
    }

    async fn replica(&self, name: &str, epoch: u64) -> RemoteReplica {
        RemoteReplica::connect(self.addr(), name, epoch, opts())
            .await
            .expect("connect")
    }
}

async fn serve(dir: &tempfile::TempDir, storage: Arc<Storage>) -> ServerHandle {
    let fence = Arc::new(FenceTable::open(dir.path().join("fence.json")).expect("fence"));
    ReplicaServer::bind("127.0.0.1:0".parse().unwrap(), storage, fence)
        .await
        .expect("bind")
        .spawn()
        .expect("spawn")
}

fn opts() -> RemoteOptions {
    RemoteOptions {
        timeout: Duration::from_secs(2),
        node: "client-node".into(),
        tls: None,
    }
}

/// A block of verifiable content: `tag` and the block's index repeated.
fn pattern(block: u64, tag: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(tag ^ i as u64).to_le_bytes());
    }
    v
}

fn blocks(first: u64, n: u64, tag: u64) -> IoBuf {
    let mut v = Vec::new();
    for b in first..first + n {
        v.extend_from_slice(&pattern(b, tag));
    }
    IoBuf::from_slice(&v)
}

async fn read(r: &RemoteReplica, offset: u64, len: usize) -> IoBuf {
    r.read(offset, IoBuf::zeroed(len)).await.expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_round_trip() {
    let node = Node::start().await;
    node.volume("vol").await;
    // Create is idempotent for the same size and refused for another.
    let client = node.client().await;
    client.create("vol", VOL_SIZE).await.unwrap();
    assert!(client.create("vol", 2 * VOL_SIZE).await.is_err());

    let r = node.replica("vol", 1).await;
    assert_eq!(r.size(), VOL_SIZE);
    for (first, n, tag) in [
        (0, 1, 1),
        (5, 3, 2),
        (255, 2, 3),
        (VOL_SIZE / 4096 - 1, 1, 4),
    ] {
        let data = blocks(first, n, tag);
        let back = r
            .write(
                first * 4096,
                data.clone(),
                WriteFlags {
                    fua: tag % 2 == 0,
                    ..WriteFlags::default()
                },
            )
            .await
            .expect("write");
        assert_eq!(&back[..], &data[..], "the caller gets its buffer back");
        let got = read(&r, first * 4096, data.len()).await;
        assert_eq!(&got[..], &data[..]);
    }
    r.flush().await.unwrap();
    // A large write, and a read that spans written and unwritten blocks.
    let big = blocks(1024, 512, 9);
    r.write(1024 * 4096, big.clone(), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(&read(&r, 1024 * 4096, big.len()).await[..], &big[..]);

    r.discard(5 * 4096, 2 * 4096).await.unwrap();
    let got = read(&r, 5 * 4096, 3 * 4096).await;
    assert!(got[..8192].iter().all(|&b| b == 0));
    assert_eq!(&got[8192..], &pattern(7, 2)[..]);
    r.write_zeroes(0, 4096).await.unwrap();
    assert!(read(&r, 0, 4096).await.iter().all(|&b| b == 0));

    let (size, allocated) = r.stat().await.unwrap();
    assert_eq!(size, VOL_SIZE);
    assert!(allocated > 0);
    // The data really is in the local replica.
    let local = node
        .storage
        .replica(&"vol".parse().unwrap())
        .unwrap()
        .read(1024 * 4096, IoBuf::zeroed(4096))
        .await
        .unwrap();
    assert_eq!(&local[..], &pattern(1024, 9)[..]);

    // Delete is idempotent, and the replica is gone.
    client.delete("vol").await.unwrap();
    client.delete("vol").await.unwrap();
    let e = r.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Closed, "{}", e.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = node.replica("vol", 1).await;
    let writes = (0..200u64).map(|i| {
        let r = r.clone();
        async move {
            r.write(i * 4096 * 3, blocks(i * 3, 1, 77), WriteFlags::default())
                .await
                .map(|_| ())
        }
    });
    for res in futures_join_all(writes).await {
        res.expect("concurrent write");
    }
    let reads = (0..200u64).map(|i| {
        let r = r.clone();
        async move { (i, r.read(i * 4096 * 3, IoBuf::zeroed(4096)).await) }
    });
    for (i, res) in futures_join_all(reads).await {
        assert_eq!(&res.expect("concurrent read")[..], &pattern(i * 3, 77)[..]);
    }
}

/// Run futures concurrently on the runtime and collect their outputs in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_is_fenced() {
    let node = Node::start().await;
    node.volume("vol").await;
    let old = node.replica("vol", 1).await;
    old.write(0, blocks(0, 1, 1), WriteFlags::default())
        .await
        .unwrap();

    let new = node.replica("vol", 2).await;
    let e = old
        .write(0, blocks(0, 1, 666), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Fenced, "{}", e.error);
    assert!(
        e.error.message.contains("newer attachment epoch than 1"),
        "{}",
        e.error.message
    );
    // Issue 14: the answer says "stale" and nothing more (it disclosed the epoch registered
    // now, which a peer could resend with).
    let raw = node
        .client()
        .await
        .call(replication::wire::Request::Register {
            volume: "vol".into(),
            epoch: 1,
        })
        .await
        .unwrap();
    assert!(
        matches!(raw, replication::wire::Response::Stale { epoch: 0 }),
        "{raw:?}"
    );
    assert_eq!(
        &e.buf[..],
        &blocks(0, 1, 666)[..],
        "buffer comes back on error"
    );
    for e in [
        old.flush().await.unwrap_err(),
        old.discard(0, 4096).await.unwrap_err(),
        old.read(0, IoBuf::zeroed(4096)).await.unwrap_err().error,
    ] {
        assert_eq!(e.kind, DeviceErrorKind::Fenced, "{e}");
    }
    // The stale write did nothing.
    assert_eq!(&read(&new, 0, 4096).await[..], &pattern(0, 1)[..]);

    // An old attachment cannot register again.
    let e = RemoteReplica::connect(node.addr(), "vol", 1, opts())
        .await
        .unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Fenced, "{e}");
    // Re-registering the current epoch is fine.
    let again = node.replica("vol", 2).await;
    again.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_device_errors() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = node.replica("vol", 1).await;
    let e = r.read(VOL_SIZE, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
    let e = r
        .write(VOL_SIZE - 4096, IoBuf::zeroed(8192), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
    let e = r.read(100, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Unaligned, "{}", e.error);
    let e = r
        .read(0, IoBuf::zeroed(replication::wire::MAX_IO + 4096))
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Io, "{}", e.error);
    // The connection is still fine after errors.
    r.flush().await.unwrap();

    // No such volume: connecting fails as Closed.
    let e = RemoteReplica::connect(node.addr(), "nope", 1, opts())
        .await
        .unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Closed, "{e}");
    // An invalid name is refused by the server, not a crash.
    let e = node
        .client()
        .await
        .create("Bad_Name", VOL_SIZE)
        .await
        .unwrap_err();
    assert!(e.message.contains("volume name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gone_fails_fast() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = node.replica("vol", 1).await;
    r.write(0, blocks(0, 1, 1), WriteFlags::default())
        .await
        .unwrap();
    let Node {
        dir: _dir,
        storage: _storage,
        server,
    } = node;
    server.stop().await;

    let start = Instant::now();
    let e = r
        .write(0, blocks(0, 1, 2), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::Io, "{}", e.error);
    assert_eq!(&e.buf[..], &blocks(0, 1, 2)[..]);
    for _ in 0..10 {
        let e = r.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::Io, "{}", e.error);
    }
    assert!(r.broken().is_some());
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "failing took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.push(s);
        }
    });
    let start = Instant::now();
    let e = RemoteReplica::connect(
        addr,
        "vol",
        1,
        RemoteOptions {
            timeout: Duration::from_millis(300),
            node: "n".into(),
            tls: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Io, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = node.replica("vol", 1).await;

    let mut raw = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("server closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "no reply to garbage, just a close");

    // A frame with a valid header but a corrupt body also closes its connection.
    let mut frame = Vec::new();
    replication::wire::encode_request(
        1,
        &replication::wire::Request::Stat {
            volume: "vol".into(),
        },
        &mut frame,
    );
    let last = frame.len() - 1;
    frame[last] ^= 1;
    let mut raw = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    raw.write_all(&frame).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("server closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);

    r.write(0, blocks(0, 1, 5), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(&read(&r, 0, 4096).await[..], &pattern(0, 5)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_survives_restart() {
    let node = Node::start().await;
    node.volume("vol").await;
    let _new = node.replica("vol", 5).await;
    let Node {
        dir,
        storage,
        server,
    } = node;
    server.stop().await;

    // The table on disk has the epoch.
    let table = FenceTable::open(dir.path().join("fence.json")).unwrap();
    assert_eq!(table.current("vol"), Some(5));
    drop(table);

    // A restarted server (same pool, table reloaded from its file) still fences epoch 4.
    let server = serve(&dir, storage.clone()).await;
    let node = Node {
        dir,
        storage,
        server,
    };
    assert!(node.fence_path().exists());
    let e = RemoteReplica::connect(node.addr(), "vol", 4, opts())
        .await
        .unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Fenced, "{e}");
    let r = node.replica("vol", 5).await;
    r.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_grows_over_the_protocol_and_its_remote_handle_learns_the_size() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = node.replica("vol", 1).await;
    let ctl = node.client().await;
    let bigger = 3 * VOL_SIZE;
    let beyond = blocks(bigger / 4096 - 4, 4, 7);
    let e = r
        .write(VOL_SIZE, beyond.clone(), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);

    // A dry run checks the pool device and changes nothing.
    ctl.resize("vol", bigger, true).await.unwrap();
    assert_eq!(ctl.stat("vol").await.unwrap().0, VOL_SIZE);
    let e = ctl.resize("vol", 1 << 40, true).await.unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::NoSpace, "{e}");
    assert!(e.message.contains("holds at most"), "{e}");
    let e = ctl.resize("nope", bigger, true).await.unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::Closed, "{e}");

    // The grow itself, twice (idempotent), and a smaller size is left alone.
    ctl.resize("vol", bigger, false).await.unwrap();
    ctl.resize("vol", bigger, false).await.unwrap();
    ctl.resize("vol", VOL_SIZE, false).await.unwrap();
    assert_eq!(ctl.stat("vol").await.unwrap().0, bigger);
    let e = ctl.resize("vol", 1 << 40, false).await.unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::NoSpace, "{e}");

    // The open handle still reports what it learned at connect, until it asks again.
    assert_eq!(r.size(), VOL_SIZE);
    assert_eq!(r.refresh_size().await.unwrap(), bigger);
    assert_eq!(r.size(), bigger);
    // The server serves the new size on the existing connection.
    r.write(
        bigger - beyond.len() as u64,
        beyond.clone(),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    let got = read(&r, bigger - beyond.len() as u64, beyond.len()).await;
    assert_eq!(got.to_vec(), beyond.to_vec());
    let e = r.read(bigger, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange, "{}", e.error);
    assert_eq!(
        node.storage
            .replica(&api::VolumeName::new("vol").unwrap())
            .unwrap()
            .size(),
        bigger
    );
}

/// Stopping the server waits for the requests it is running: once `stop` returns, no peer
/// write lands on the replica any more (the daemon closes storage right after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_requests_in_flight() {
    let node = Node::start().await;
    node.volume("vol").await;
    let r = Arc::new(node.replica("vol", 1).await);
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let r = Arc::clone(&r);
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                // 1 MiB at the same place, every write different.
                if r.write(0, blocks(0, 256, w * 1_000_000 + i), WriteFlags::default())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Node {
        dir: _dir,
        storage,
        server,
    } = node;
    server.stop().await;
    let local = storage
        .replica(&api::VolumeName::new("vol").unwrap())
        .unwrap();
    let at_stop = local.read(0, IoBuf::zeroed(MIB as usize)).await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = local.read(0, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(
        at_stop[..] == later[..],
        "a peer write landed after the server stopped"
    );
}
