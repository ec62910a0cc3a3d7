//! Set-up shared by the replication test binaries.

use std::path::PathBuf;

use api::{VolumeControl, VolumeName, VolumeSpec};
use volume::io::{probe, EngineKind};
use volume::pool::{DeviceSpec, Replica, Storage, StorageConfig};

pub const MIB: u64 = 1 << 20;

/// A pool of its own (in `BALLAST_TEST_DIR`, default `/var/tmp`: a real filesystem with
/// O_DIRECT) on the sync engine with `threads` threads, holding one 8 MiB volume `v`.
pub async fn one_volume(node_id: &str, threads: usize) -> (tempfile::TempDir, Storage, Replica) {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("ballast-replication-test-")
        .tempdir_in(&base)
        .unwrap();
    let storage = Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: dir.path().join("pool"),
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
    (dir, storage, replica)
}
