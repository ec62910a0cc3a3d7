//! Issue 14, bounded servers: a replica server closes connections that never say hello, that
//! dribble a frame byte by byte, and connections beyond its cap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::fence::FenceTable;
use replication::remote::{RemoteOptions, ReplicaClient};
use replication::server::{Limits, ReplicaServer, ServerHandle};
use replication::wire::{encode_request, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use volume::io::{probe, EngineKind};
use volume::pool::{DeviceSpec, Storage, StorageConfig};

const LIMITS: Limits = Limits {
    max_connections: 2,
    hello_timeout: Duration::from_millis(500),
    frame_timeout: Duration::from_millis(500),
};

async fn server(dir: &tempfile::TempDir) -> ServerHandle {
    let storage = Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: dir.path().join("pool"),
            create_size: Some(64 << 20),
        }],
        node_id: "node-b".into(),
        force_format: false,
        engine: probe(EngineKind::Sync, 1).unwrap(),
    })
    .await
    .unwrap();
    let fence = Arc::new(FenceTable::open(dir.path().join("fence.json")).unwrap());
    ReplicaServer::bind("127.0.0.1:0".parse().unwrap(), Arc::new(storage), fence)
        .await
        .unwrap()
        .with_limits(LIMITS)
        .spawn()
        .unwrap()
}

fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix("ballast-bounds-test-")
        .tempdir_in(base)
        .unwrap()
}

/// How long until the server closes `s` (reading whatever it sends), at most `within`.
async fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

fn hello() -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(
        1,
        &Request::Hello {
            node: "slow".into(),
        },
        &mut out,
    );
    out
}

#[tokio::test]
async fn a_silent_or_dribbling_peer_is_cut_off() {
    let dir = tempdir();
    let srv = server(&dir).await;
    let addr = srv.local_addr();

    // Says nothing: closed after the hello timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = closed_after(&mut silent, Duration::from_secs(10))
        .await
        .expect("a silent connection is closed");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    drop(silent);

    // Says hello, then idles: kept (an idle connection between frames is fine).
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(&hello()).await.unwrap();
    assert!(
        closed_after(&mut idle, Duration::from_millis(1500))
            .await
            .is_none(),
        "an idle connection was closed"
    );

    // Then dribbles a frame, a byte every 100 ms: cut off once the frame is late.
    let mut frame = Vec::new();
    encode_request(2, &Request::Stat { volume: "v".into() }, &mut frame);
    let start = Instant::now();
    for b in &frame {
        if idle.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let took = closed_after(&mut idle, Duration::from_secs(5))
        .await
        .map(|_| start.elapsed())
        .expect("a dribbling peer is cut off");
    assert!(took < Duration::from_secs(5), "{took:?}");
    srv.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    let dir = tempdir();
    let srv = server(&dir).await;
    let addr = srv.local_addr();
    let opts = RemoteOptions {
        timeout: Duration::from_secs(2),
        node: "n".into(),
        tls: None,
    };
    let a = ReplicaClient::connect(addr, &opts).await.unwrap();
    let b = ReplicaClient::connect(addr, &opts).await.unwrap();
    assert!(
        ReplicaClient::connect(addr, &opts).await.is_err(),
        "a third connection"
    );
    drop(a);
    // The server notices the close and frees the slot.
    let mut again = Err(String::new());
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = ReplicaClient::connect(addr, &opts)
            .await
            .map_err(|e| e.to_string());
        if again.is_ok() {
            break;
        }
    }
    again.expect("a slot freed by a closed connection is used again");
    drop(b);
    srv.stop().await;
}
