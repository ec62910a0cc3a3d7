//! The device behind an attached volume, whether it has one replica or several.
//!
//! - [`VolumeDevice::Local`]: a single-replica volume in this node's storage;
//! - [`VolumeDevice::Replicated`]: a [`Nexus`] over the volume's replicas, where each child is
//!   a [`Child`]: this node's replica (checked against the fence table before every request,
//!   exactly as the replica server checks remote requests), a remote one, or, in standalone
//!   mode, one of this node's replicas on distinct pool devices (unfenced: one daemon owns a
//!   data directory and its devices, so there is no other writer to fence out).
//!
//! [`DeviceSource`] is how the attacher gets a device for a name and gives it back; the local
//! source opens replicas from [`Storage`] (a nexus over them for a multi-replica volume, see
//! [`crate::standalone`]), the cluster source (see [`super::Cluster`]) takes the attachment in
//! the cluster store first.

use std::fmt;
use std::sync::Arc;

use ::api::{ControlError, ErrorKind, VolumeName};
use replication::fence::FenceTable;
use replication::nexus::{ChildSpec, ChildState, Nexus, Resizable};
use replication::remote::RemoteReplica;
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
};
use volume::io::IoBuf;
use volume::pool::{Replica, Storage};

use crate::standalone::{ReplicaSets, SetEjector, SetState};

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
            Child::Standalone(r) => r.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        if let Err(error) = self.fence_check("read", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        match self {
            Child::Local { replica, .. } => replica.read(offset, buf).await,
            Child::Remote(r) => r.read(offset, buf).await,
            Child::Standalone(r) => r.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        if let Err(error) = self.fence_check("write", offset, buf.len() as u64) {
            return Err(BufError { error, buf });
        }
        match self {
            Child::Local { replica, .. } => replica.write(offset, buf, flags).await,
            Child::Remote(r) => r.write(offset, buf, flags).await,
            Child::Standalone(r) => r.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.fence_check("flush", 0, 0)?;
        match self {
            Child::Local { replica, .. } => replica.flush().await,
            Child::Remote(r) => r.flush().await,
            Child::Standalone(r) => r.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.fence_check("discard", offset, len)?;
        match self {
            Child::Local { replica, .. } => replica.discard(offset, len).await,
            Child::Remote(r) => r.discard(offset, len).await,
            Child::Standalone(r) => r.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.fence_check("write_zeroes", offset, len)?;
        match self {
            Child::Local { replica, .. } => replica.write_zeroes(offset, len).await,
            Child::Remote(r) => r.write_zeroes(offset, len).await,
            Child::Standalone(r) => r.write_zeroes(offset, len).await,
        }
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        self.fence_check("generations", 0, 0)?;
        match self {
            Child::Local { replica, .. } => replica.generations().await,
            Child::Remote(r) => r.generations().await,
            Child::Standalone(r) => r.generations().await,
        }
    }
}

impl Resizable for Child {
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        self.fence_check("refresh_size", 0, 0)?;
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

/// Devices from this node's storage (standalone mode): a single-replica volume's replica, or
/// a nexus over a multi-replica volume's replicas on distinct pool devices.
#[derive(Debug)]
pub struct LocalSource {
    storage: Arc<Storage>,
    sets: Arc<ReplicaSets>,
    runtime: tokio::runtime::Handle,
}

impl LocalSource {
    /// A source over `storage`, with multi-replica volumes' replica states in `sets`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn new(storage: Arc<Storage>, sets: Arc<ReplicaSets>) -> Self {
        Self {
            storage,
            sets,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// A nexus over the replicas of `name` recorded healthy. Recorded replicas whose device
    /// is gone are ejected (durably) first; ejected ones stay out.
    fn open_replicated(
        &self,
        name: &VolumeName,
        id: &str,
    ) -> Result<Arc<Nexus<Child>>, ControlError> {
        let copies = self.storage.replicas(name)?;
        let pools: Vec<String> = copies.iter().map(|c| c.pool_id.clone()).collect();
        let io = |what: &str, e: &std::io::Error| {
            ControlError::new(ErrorKind::Internal, format!("{what}: {e}"))
        };
        let set = self
            .sets
            .record(id, name.as_str(), &pools)
            .map_err(|e| io("cannot record the volume's replicas", &e))?;
        for (pool, state) in &set.replicas {
            if *state == SetState::Healthy && !pools.contains(pool) {
                tracing::warn!(volume = %name, pool, "a replica's pool device is missing; ejecting it");
                self.sets
                    .eject(id, name.as_str(), pool)
                    .map_err(|e| io("cannot record the ejection of a missing replica", &e))?;
            }
        }
        let mut children = Vec::new();
        for c in copies {
            match set.replicas.get(&c.pool_id) {
                Some(SetState::Healthy) => children.push(ChildSpec {
                    id: c.pool_id,
                    dev: Child::Standalone(c.replica),
                    local: true,
                    state: ChildState::Healthy,
                }),
                state => {
                    tracing::info!(volume = %name, pool = %c.pool_id, path = %c.path.display(), ?state, "leaving out a replica that is not in sync");
                }
            }
        }
        if children.is_empty() {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!("volume {name} has no healthy replica on this node's pool devices"),
            ));
        }
        tracing::info!(volume = %name, replicas = ?children.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), "opened a replicated volume");
        let ejector = SetEjector::new(Arc::clone(&self.sets), id.to_owned(), name.to_string());
        let nexus = Arc::new(Nexus::new(name.as_str(), children, Arc::new(ejector)));
        // Before the first I/O: if the daemon died mid-write, the replicas may differ where
        // that write had reached only some of them.
        self.runtime.block_on(nexus.reconcile()).map_err(|e| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("cannot reconcile the replicas of volume {name}: {e}"),
            )
        })?;
        Ok(nexus)
    }
}

impl DeviceSource for LocalSource {
    fn open(&self, name: &VolumeName, _force: bool) -> Result<VolumeDevice, ControlError> {
        let status = self.storage.volume_status(name)?;
        let device = if status.replicas <= 1 {
            VolumeDevice::Local(self.storage.replica(name)?)
        } else {
            VolumeDevice::Replicated(self.open_replicated(name, &status.id)?)
        };
        self.sets.set_attached(name.as_str(), true);
        Ok(device)
    }

    fn release(&self, name: &VolumeName) {
        self.sets.set_attached(name.as_str(), false);
    }

    fn exists(&self, name: &VolumeName) -> Result<(), ControlError> {
        self.storage.volume_status(name).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ::api::{VolumeControl, VolumeSpec};
    use volume::device::BlockDevice;
    use volume::io::{probe, EngineKind, IoBuf};
    use volume::pool::{DeviceSpec, StorageConfig};

    use super::*;

    const MIB: u64 = 1 << 20;

    async fn storage(dir: &Path, devices: usize) -> Arc<Storage> {
        let s = Storage::open(StorageConfig {
            devices: (0..devices)
                .map(|i| DeviceSpec {
                    path: dir.join(format!("pool{i}.img")),
                    create_size: Some(64 * MIB),
                })
                .collect(),
            node_id: "unit".into(),
            force_format: false,
            engine: probe(EngineKind::Sync, 2).unwrap(),
        })
        .await
        .unwrap();
        Arc::new(s)
    }

    fn children(dev: &VolumeDevice) -> Vec<(String, ChildState)> {
        match dev {
            VolumeDevice::Replicated(n) => n.children(),
            VolumeDevice::Local(_) => panic!("a multi-replica volume opened as a single replica"),
        }
    }

    /// Opens run on blocking threads, as the attacher runs them.
    async fn open(src: &Arc<LocalSource>, name: &VolumeName) -> Result<VolumeDevice, ControlError> {
        let (src, name) = (Arc::clone(src), name.clone());
        tokio::task::spawn_blocking(move || src.open(&name, false))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_replicas_recorded_healthy_become_children() {
        let base = std::env::var_os("BALLAST_TEST_DIR")
            .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
        let dir = tempfile::tempdir_in(base).unwrap();
        let sets_path = dir.path().join(crate::standalone::FILE_NAME);
        let name = VolumeName::new("db").unwrap();
        let (id, pools) = {
            let s = storage(dir.path(), 2).await;
            let st = s
                .create_volume(VolumeSpec {
                    name: name.clone(),
                    size_bytes: 8 * MIB,
                    replicas: 2,
                })
                .await
                .unwrap();
            let one = VolumeName::new("one").unwrap();
            s.create_volume(VolumeSpec {
                name: one.clone(),
                size_bytes: 8 * MIB,
                replicas: 1,
            })
            .await
            .unwrap();
            let sets = Arc::new(ReplicaSets::open(&sets_path).unwrap());
            let src = Arc::new(LocalSource::new(Arc::clone(&s), Arc::clone(&sets)));
            assert!(matches!(
                open(&src, &one).await.unwrap(),
                VolumeDevice::Local(_)
            ));
            let dev = open(&src, &name).await.unwrap();
            assert_eq!(children(&dev).len(), 2);
            let pools: Vec<String> = children(&dev).into_iter().map(|c| c.0).collect();
            dev.write(0, IoBuf::from_slice(&[5u8; 4096]), WriteFlags::default())
                .await
                .unwrap();
            // The first attach recorded the set; an ejection leaves the replica out.
            sets.eject(&st.id, "db", &pools[1]).unwrap();
            let dev = open(&src, &name).await.unwrap();
            assert_eq!(
                children(&dev),
                vec![(pools[0].clone(), ChildState::Healthy)]
            );
            let b = dev.read(0, IoBuf::zeroed(4096)).await.unwrap();
            assert!(b.iter().all(|&x| x == 5));
            s.close().await.unwrap();
            (st.id, pools)
        };
        // After a restart, the ejection still holds.
        let s = storage(dir.path(), 2).await;
        let sets = Arc::new(ReplicaSets::open(&sets_path).unwrap());
        let src = Arc::new(LocalSource::new(Arc::clone(&s), Arc::clone(&sets)));
        let dev = open(&src, &name).await.unwrap();
        assert_eq!(
            children(&dev),
            vec![(pools[0].clone(), ChildState::Healthy)]
        );
        s.close().await.unwrap();
        drop((dev, src, s));

        // A healthy replica whose device is gone is ejected before the first I/O; with no
        // healthy replica left, the volume does not open.
        std::fs::rename(dir.path().join("pool0.img"), dir.path().join("gone.img")).unwrap();
        let s = storage(dir.path(), 2).await;
        let src = Arc::new(LocalSource::new(Arc::clone(&s), Arc::clone(&sets)));
        let e = open(&src, &name).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{}", e.message());
        let set = ReplicaSets::open(&sets_path).unwrap().get(&id).unwrap();
        assert!(
            set.replicas.values().all(|s| *s == SetState::Ejected),
            "{set:?}"
        );
        s.close().await.unwrap();
    }
}
