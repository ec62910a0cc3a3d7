//! Set-up shared by the replication test binaries.

use std::path::{Path, PathBuf};

use api::{VolumeControl, VolumeName, VolumeSpec};
use volume::io::{probe, EngineKind};
use volume::pool::{DeviceSpec, Replica, Storage, StorageConfig};

pub const MIB: u64 = 1 << 20;

/// A pool of its own (in `BALLAST_TEST_DIR`, default `/var/tmp`: a real filesystem with
/// O_DIRECT) on the sync engine with `threads` threads, holding one 8 MiB volume `v`.
pub async fn one_volume(node_id: &str, threads: usize) -> (tempfile::TempDir, Storage, Replica) {
    let dir = test_dir("ballast-replication-test-");
    let (storage, replica) = volume_in(dir.path(), node_id, threads).await;
    (dir, storage, replica)
}

/// A fresh directory in `BALLAST_TEST_DIR` (default `/var/tmp`), removed when dropped.
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

/// A pool file in `dir` on the sync engine with `threads` threads, holding one 8 MiB volume
/// `v`.
pub async fn volume_in(dir: &Path, node_id: &str, threads: usize) -> (Storage, Replica) {
    let storage = Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: dir.join("pool"),
            create_size: Some(64 * MIB),
        }],
        node_id: node_id.to_owned(),
        force_format: false,
        engine: probe(EngineKind::Sync, threads).unwrap(),
    })
    .await
    .unwrap();
    let name = VolumeName::new("v").unwrap();
    storage
        .create_volume(VolumeSpec {
            name: name.clone(),
            size_bytes: 8 * MIB,
            replicas: 1,
        })
        .await
        .unwrap();
    let replica = storage.replica(&name).unwrap();
    (storage, replica)
}
