//! Shared set-up for the engine's integration tests: real files on a real filesystem.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use api::{VolumeControl, VolumeName, VolumeSpec};
use volume::io::{probe, EngineKind};
use volume::pool::{DeviceSpec, Replica, Storage, StorageConfig};

/// Both engines, for suites that must pass on each.
pub const ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Sync];

/// A temporary directory on a filesystem with O_DIRECT (not tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix("ballast-test-")
        .tempdir_in(base)
        .expect("tempdir")
}

/// Open (creating) a single-device storage at `path`.
pub async fn open(path: &Path, size: u64, kind: EngineKind) -> Storage {
    try_open(path, size, kind, false)
        .await
        .expect("open storage")
}

/// Open with options, returning the error.
pub async fn try_open(
    path: &Path,
    size: u64,
    kind: EngineKind,
    force: bool,
) -> Result<Storage, volume::pool::PoolError> {
    let engine = probe(kind, 2).expect("engine");
    Storage::open(StorageConfig {
        devices: vec![DeviceSpec {
            path: path.to_path_buf(),
            create_size: Some(size),
        }],
        node_id: "test-node".into(),
        force_format: force,
        engine,
    })
    .await
}

/// Create `name` of `size` bytes and return its replica.
pub async fn volume(s: &Storage, name: &str, size: u64) -> Replica {
    let name = VolumeName::new(name).unwrap();
    s.create_volume(VolumeSpec {
        name: name.clone(),
        size_bytes: size,
        replicas: 1,
    })
    .await
    .expect("create");
    s.replica(&name).unwrap()
}

/// A block of verifiable content: `tag` and the block's index repeated.
pub fn pattern(block: u64, tag: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(tag ^ i as u64).to_le_bytes());
    }
    v
}
