//! The pool: Ballast's on-disk format and local storage engine. (Being written; the public
//! surface below is stable.)

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{ControlError, ErrorKind, PoolStatus, VolumeControl, VolumeName, VolumeSpec, VolumeStatus};
use crate::device::{BlockDevice, BufResult, DeviceError, WriteFlags};
use crate::io::{IoBuf, IoEngine};

pub mod stats;

/// One backing device to open: a regular file (created sparse at `create_size` if missing) or
/// a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The file or block device.
    pub path: PathBuf,
    /// Create a missing regular file sparse at this many bytes.
    pub create_size: Option<u64>,
}

/// How to open a node's storage.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The backing devices.
    pub devices: Vec<DeviceSpec>,
    /// This node's ID, written into superblocks it formats.
    pub node_id: String,
    /// Format devices even if they hold a filesystem, partition table or another pool.
    pub force_format: bool,
    /// The I/O engine.
    pub engine: Arc<dyn IoEngine>,
}

/// Errors opening or closing storage.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PoolError(pub String);

/// A node's storage: every pool device, and the replicas on them.
#[derive(Debug)]
pub struct Storage {
    _cfg: StorageConfig,
}

impl Storage {
    /// Open (formatting empty devices) every configured device.
    ///
    /// # Errors
    /// A device is unreadable, holds a foreign signature (without `force_format`), or its
    /// metadata is corrupt.
    #[allow(clippy::unused_async)]
    pub async fn open(cfg: StorageConfig) -> Result<Self, PoolError> {
        Ok(Self { _cfg: cfg })
    }

    /// The data-path handle of a volume's local replica.
    ///
    /// # Errors
    /// `NotFound` if no such volume.
    pub fn replica(&self, name: &VolumeName) -> Result<Arc<Replica>, ControlError> {
        Err(ControlError::new(ErrorKind::NotFound, format!("volume {name} not found")))
    }

    /// I/O statistics for every volume, for metrics.
    pub fn io_stats(&self) -> Vec<stats::VolumeIoStats> {
        Vec::new()
    }

    /// Flush and commit every pool; after this, the process may exit.
    ///
    /// # Errors
    /// A commit failed.
    #[allow(clippy::unused_async)]
    pub async fn close(&self) -> Result<(), PoolError> {
        Ok(())
    }
}

impl VolumeControl for Storage {
    async fn create_volume(&self, _spec: VolumeSpec) -> Result<VolumeStatus, ControlError> {
        Err(ControlError::new(ErrorKind::Unimplemented, "not yet"))
    }
    async fn delete_volume(&self, _name: &VolumeName) -> Result<(), ControlError> {
        Err(ControlError::new(ErrorKind::Unimplemented, "not yet"))
    }
    async fn get_volume(&self, _name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        Err(ControlError::new(ErrorKind::Unimplemented, "not yet"))
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
        Ok(Vec::new())
    }
    async fn resize_volume(&self, _name: &VolumeName, _n: u64) -> Result<VolumeStatus, ControlError> {
        Err(ControlError::new(ErrorKind::Unimplemented, "not yet"))
    }
    async fn list_pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
        Ok(Vec::new())
    }
}

/// One volume's local replica: a thin-provisioned, checksummed block device.
#[derive(Debug)]
pub struct Replica {
    size: u64,
}

impl BlockDevice for Replica {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read(&self, _offset: u64, buf: IoBuf) -> BufResult {
        Ok(buf)
    }
    async fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> BufResult {
        Ok(buf)
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn discard(&self, _offset: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}
