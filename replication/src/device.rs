//! The device behind an attached volume, whether it has one replica or several.
//!
//! - [`VolumeDevice::Local`]: a single-replica volume in this node's storage;
//! - [`VolumeDevice::Replicated`]: a [`Nexus`] over the volume's replicas, where each child is
//!   a [`Child`]: this node's replica (admitted by the fence table for every request, through
//!   the same [`FenceTable::admit`] as the replica server's requests, so a `Register` is
//!   ordered against local writes exactly as against remote ones), a remote one, or, in
//!   standalone mode, one of this node's replicas on distinct pool devices (unfenced: one
//!   daemon owns a data directory and its devices, so there is no other writer to fence out).
//!
//! [`DeviceSource`] is how a frontend gets a device for a name and gives it back; the
//! standalone source opens replicas from this node's storage, the cluster source takes the
//! attachment in the cluster store first.

use std::fmt;
use std::sync::Arc;

use api::{ControlError, VolumeName};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
};
use volume::io::IoBuf;
use volume::pool::Replica;

use crate::fence::{Admission, FenceTable};
use crate::nexus::{Nexus, Resizable};
use crate::remote::RemoteReplica;

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
    /// One of this node's replicas in standalone mode (no fencing).
    Standalone(Replica),
}

impl Child {
    /// For this node's fenced replica, the admission to hold until the request's I/O has
    /// completed; `None` for the other kinds.
    async fn admit(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<Option<Admission>, DeviceError> {
        let Child::Local {
            replica,
            fence,
            epoch,
        } = self
        else {
            return Ok(None);
        };
        match fence.admit(replica.name(), *epoch).await {
            Ok(a) => Ok(Some(a)),
            Err(e) => Err(DeviceError::new(
                DeviceErrorKind::Fenced,
                op,
                offset,
                len,
                format!(
                    "epoch {epoch} of volume {} is no longer current on this node: {e}",
                    replica.name()
                ),
            )),
        }
    }
}

impl BlockDevice for Child {
    fn size(&self) -> u64 {
        match self {
            Child::Local { replica, .. } => replica.size(),
            Child::Remote(r) => r.size(),
            Child::Standalone(r) => r.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        let _admitted = match self.admit("read", offset, buf.len() as u64).await {
            Ok(a) => a,
            Err(error) => return Err(BufError { error, buf }),
        };
        match self {
            Child::Local { replica, .. } => replica.read(offset, buf).await,
            Child::Remote(r) => r.read(offset, buf).await,
            Child::Standalone(r) => r.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let _admitted = match self.admit("write", offset, buf.len() as u64).await {
            Ok(a) => a,
            Err(error) => return Err(BufError { error, buf }),
        };
        match self {
            Child::Local { replica, .. } => replica.write(offset, buf, flags).await,
            Child::Remote(r) => r.write(offset, buf, flags).await,
            Child::Standalone(r) => r.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let _admitted = self.admit("flush", 0, 0).await?;
        match self {
            Child::Local { replica, .. } => replica.flush().await,
            Child::Remote(r) => r.flush().await,
            Child::Standalone(r) => r.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _admitted = self.admit("discard", offset, len).await?;
        match self {
            Child::Local { replica, .. } => replica.discard(offset, len).await,
            Child::Remote(r) => r.discard(offset, len).await,
            Child::Standalone(r) => r.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _admitted = self.admit("write_zeroes", offset, len).await?;
        match self {
            Child::Local { replica, .. } => replica.write_zeroes(offset, len).await,
            Child::Remote(r) => r.write_zeroes(offset, len).await,
            Child::Standalone(r) => r.write_zeroes(offset, len).await,
        }
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        let _admitted = self.admit("generations", 0, 0).await?;
        match self {
            Child::Local { replica, .. } => replica.generations().await,
            Child::Remote(r) => r.generations().await,
            Child::Standalone(r) => r.generations().await,
        }
    }
}

impl Resizable for Child {
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        let _admitted = self.admit("refresh_size", 0, 0).await?;
        match self {
            Child::Local { replica, .. } | Child::Standalone(replica) => Ok(replica.size()),
            Child::Remote(r) => r.refresh_size().await,
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

/// Where frontends get devices from. Calls are blocking (run them on blocking threads).
pub trait DeviceSource: Send + Sync + fmt::Debug {
    /// Take the volume for this node and return its device. `force` takes it over from
    /// another node whose lease has not expired.
    ///
    /// # Errors
    /// Unknown volume, attached elsewhere, or its replicas cannot be reached.
    fn open(&self, name: &VolumeName, force: bool) -> Result<VolumeDevice, ControlError>;

    /// Give the volume up (after its device is gone). Best effort.
    fn release(&self, name: &VolumeName);

    /// The volume's size in bytes, without opening it.
    ///
    /// # Errors
    /// `not_found` for an unknown volume.
    fn size(&self, name: &VolumeName) -> Result<u64, ControlError>;

    /// Every volume's name, sorted.
    ///
    /// # Errors
    /// The volumes cannot be listed.
    fn names(&self) -> Result<Vec<VolumeName>, ControlError>;

    /// `Ok` if the volume exists.
    ///
    /// # Errors
    /// `not_found` for an unknown volume.
    fn exists(&self, name: &VolumeName) -> Result<(), ControlError> {
        self.size(name).map(drop)
    }
}
