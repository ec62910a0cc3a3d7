//! The device behind an attached volume, whether it has one replica or several.
//!
//! - [`VolumeDevice::Local`]: a single-replica volume in this node's storage;
//! - [`VolumeDevice::Replicated`]: a [`Nexus`] over the volume's replicas, where each child is
//!   a [`Child`]: this node's replica (checked against the fence table before every request,
//!   exactly as the replica server checks remote requests) or a remote one.
//!
//! [`DeviceSource`] is how the attacher gets a device for a name and gives it back; the local
//! source opens replicas from [`Storage`], the cluster source (see [`super::Cluster`]) takes
//! the attachment in the cluster store first.

use std::fmt;
use std::sync::Arc;

use replication::fence::FenceTable;
use replication::nexus::Nexus;
use replication::remote::RemoteReplica;
use volume::api::{ControlError, VolumeName};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
};
use volume::io::IoBuf;
use volume::pool::{Replica, Storage};

/// One child of a replicated volume's nexus.
#[derive(Debug, Clone)]
pub enum Child {
    /// This node's replica, fenced by `epoch`.
    Local {
        /// The replica.
        replica: Replica,
        /// The node's fence table (shared with the replica server).
        fence: Arc<FenceTable>,
        /// The attachment's epoch.
        epoch: u64,
    },
    /// A replica on another node.
    Remote(RemoteReplica),
}

impl Child {
    fn fence_check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        if let Child::Local {
            replica,
            fence,
            epoch,
        } = self
        {
            if fence.check(replica.name(), *epoch).is_err() {
                return Err(DeviceError::new(
                    DeviceErrorKind::Fenced,
                    op,
                    offset,
                    len,
                    format!(
                        "epoch {epoch} of volume {} is no longer current on this node",
                        replica.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl BlockDevice for Child {
    fn size(&self) -> u64 {
        match self {
            Child::Local { replica, .. } => replica.size(),
            Child::Remote(r) => r.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        if let Err(error) = self.fence_check("read", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        match self {
            Child::Local { replica, .. } => replica.read(offset, buf).await,
            Child::Remote(r) => r.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        if let Err(error) = self.fence_check("write", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        match self {
            Child::Local { replica, .. } => replica.write(offset, buf, flags).await,
            Child::Remote(r) => r.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.fence_check("flush", 0, 0)?;
        match self {
            Child::Local { replica, .. } => replica.flush().await,
            Child::Remote(r) => r.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.fence_check("discard", offset, len)?;
        match self {
            Child::Local { replica, .. } => replica.discard(offset, len).await,
            Child::Remote(r) => r.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.fence_check("write_zeroes", offset, len)?;
        match self {
            Child::Local { replica, .. } => replica.write_zeroes(offset, len).await,
            Child::Remote(r) => r.write_zeroes(offset, len).await,
        }
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        self.fence_check("generations", 0, 0)?;
        match self {
            Child::Local { replica, .. } => replica.generations().await,
            Child::Remote(r) => r.generations().await,
        }
    }
}

/// The device of an attached volume.
#[derive(Debug, Clone)]
pub enum VolumeDevice {
    /// A single replica on this node.
    Local(Replica),
    /// Several replicas behind a nexus.
    Replicated(Arc<Nexus<Child>>),
}

impl VolumeDevice {
    /// The volume's name.
    pub fn name(&self) -> &str {
        match self {
            VolumeDevice::Local(r) => r.name(),
            VolumeDevice::Replicated(n) => n.name(),
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        match self {
            VolumeDevice::Local(r) => r.size(),
            VolumeDevice::Replicated(n) => n.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        match self {
            VolumeDevice::Local(r) => r.read(offset, buf).await,
            VolumeDevice::Replicated(n) => n.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        match self {
            VolumeDevice::Local(r) => r.write(offset, buf, flags).await,
            VolumeDevice::Replicated(n) => n.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.flush().await,
            VolumeDevice::Replicated(n) => n.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.discard(offset, len).await,
            VolumeDevice::Replicated(n) => n.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.write_zeroes(offset, len).await,
            VolumeDevice::Replicated(n) => n.write_zeroes(offset, len).await,
        }
    }
}

/// Where the attacher gets devices from. Calls are blocking (they run on blocking threads).
pub trait DeviceSource: Send + Sync + fmt::Debug {
    /// Take the volume for this node and return its device. `force` takes it over from
    /// another node whose lease has not expired.
    ///
    /// # Errors
    /// Unknown volume, attached elsewhere, or its replicas cannot be reached.
    fn open(&self, name: &VolumeName, force: bool) -> Result<VolumeDevice, ControlError>;

    /// Give the volume up (after its device is gone). Best effort.
    fn release(&self, name: &VolumeName);

    /// `Ok` if the volume exists.
    ///
    /// # Errors
    /// `not_found` for an unknown volume.
    fn exists(&self, name: &VolumeName) -> Result<(), ControlError>;
}

/// Devices from this node's storage: single-replica volumes.
#[derive(Debug)]
pub struct LocalSource {
    storage: Arc<Storage>,
}

impl LocalSource {
    /// A source over `storage`.
    pub fn new(storage: Arc<Storage>) -> Self {
        Self { storage }
    }
}

impl DeviceSource for LocalSource {
    fn open(&self, name: &VolumeName, _force: bool) -> Result<VolumeDevice, ControlError> {
        Ok(VolumeDevice::Local(self.storage.replica(name)?))
    }

    fn release(&self, _name: &VolumeName) {}

    fn exists(&self, name: &VolumeName) -> Result<(), ControlError> {
        self.storage.replica(name).map(drop)
    }
}
