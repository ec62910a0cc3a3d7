//! The devices open on this node, shared by every frontend.
//!
//! A volume is opened once per node however many frontends serve it: the block device
//! (FUSE + loop) and any number of NBD connections share one [`VolumeDevice`], so they share
//! one attachment, one epoch and one nexus (a second open would take a new epoch and fence
//! the first). [`SharedDevices`] counts the users of each open volume and gives the volume
//! back to the underlying source when the last one releases it.
//!
//! When another node takes the volume over, the shared device is fenced for all its users at
//! once: their I/O fails until they let it go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use api::{ControlError, VolumeName};
use replication::device::{DeviceSource, VolumeDevice};

#[derive(Debug)]
struct Open {
    device: VolumeDevice,
    users: usize,
}

/// A [`DeviceSource`] that opens each volume once and counts its users.
#[derive(Debug)]
pub struct SharedDevices {
    inner: Arc<dyn DeviceSource>,
    /// Held across the inner source's open and release, so a volume is never opened twice
    /// nor released while it is being opened again.
    open: Mutex<HashMap<String, Open>>,
}

impl SharedDevices {
    /// Share the devices of `inner`.
    pub fn new(inner: Arc<dyn DeviceSource>) -> Self {
        Self {
            inner,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Open>> {
        // Every change is one map operation: a panic elsewhere cannot leave it half-done.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many users `name` has on this node (0: not open).
    pub fn users(&self, name: &VolumeName) -> usize {
        self.lock().get(name.as_str()).map_or(0, |o| o.users)
    }
}

impl DeviceSource for SharedDevices {
    fn open(&self, name: &VolumeName, force: bool) -> Result<VolumeDevice, ControlError> {
        let mut open = self.lock();
        if let Some(o) = open.get_mut(name.as_str()) {
            o.users += 1;
            return Ok(o.device.clone());
        }
        let device = self.inner.open(name, force)?;
        open.insert(
            name.to_string(),
            Open {
                device: device.clone(),
                users: 1,
            },
        );
        Ok(device)
    }

    fn release(&self, name: &VolumeName) {
        let mut open = self.lock();
        match open.get_mut(name.as_str()) {
            Some(o) if o.users > 1 => o.users -= 1,
            Some(_) => {
                open.remove(name.as_str());
                self.inner.release(name);
            }
            None => tracing::debug!(volume = %name, "released a volume that is not open"),
        }
    }

    fn size(&self, name: &VolumeName) -> Result<u64, ControlError> {
        if let Some(o) = self.lock().get(name.as_str()) {
            return Ok(volume::device::BlockDevice::size(&o.device));
        }
        self.inner.size(name)
    }

    fn names(&self) -> Result<Vec<VolumeName>, ControlError> {
        self.inner.names()
    }
}
