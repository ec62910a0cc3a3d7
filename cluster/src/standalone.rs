//! Standalone mode with several replicas: one replica per pool device of this node.
//!
//! [`Storage`] places a `replicas = N` volume on N distinct devices. Which of those replicas
//! are in sync is recorded here, in [`ReplicaSets`]: a small JSON file in the data directory
//! (`replicas.json`), written atomically (temporary file, fsync, rename, fsync the directory)
//! before any change takes effect.
//!
//! - **create** records the volume's replica set (every replica healthy) before it returns;
//! - **attach** ([`LocalSource`]) builds a
//!   [`Nexus`](replication::nexus::Nexus) over the replicas recorded
//!   healthy. A recorded replica whose device is gone is ejected durably first; an ejected
//!   replica stays out even when its device is back (its data is stale: a rebuild must bring
//!   it back, not a restart);
//! - the nexus's [`Ejector`] ([`SetEjector`]) records an ejection in the file before the nexus
//!   acknowledges any write the replica missed;
//! - **status** reports each replica's recorded state, and every recorded replica whose device
//!   is missing.
//!
//! A volume without a recorded set (created by an older build, or the daemon died between
//! creating the replicas and recording them) gets one on its first attach, with the replicas
//! present then as healthy: they were created together and nothing wrote to them without a
//! set. Losing `replicas.json` itself forgets ejections, so a stale replica could serve reads
//! again; a corrupt file is therefore an error at start-up, never an empty set.
//!
//! Devices that cannot be opened at start-up stop the daemon (see [`Storage::open`]): the
//! storage cannot tell which volumes lived on an unreadable device. The operator removes the
//! device from the configuration; its replicas are then missing, ejected on the next attach,
//! and the volumes run degraded on the remaining replicas.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ::api::{
    ControlError, ErrorKind, PoolStatus, ReplicaStatus, VolumeControl, VolumeName, VolumeSpec,
    VolumeState, VolumeStatus,
};
use replication::device::{Child, DeviceSource, VolumeDevice};
use replication::nexus::{ChildSpec, ChildState, EjectFuture, Ejector, Nexus};
use serde::{Deserialize, Serialize};
use volume::pool::Storage;

/// The replica-set file's name in the data directory.
pub const FILE_NAME: &str = "replicas.json";

/// A replica's recorded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetState {
    /// In sync: takes writes and serves reads.
    Healthy,
    /// Missed writes: takes nothing until rebuilt.
    Ejected,
}

impl SetState {
    /// The name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            SetState::Healthy => "healthy",
            SetState::Ejected => "ejected",
        }
    }
}

/// One volume's recorded replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSet {
    /// The volume's name (for people reading the file; the key is its id).
    pub name: String,
    /// Pool device id (disk UUID) to state.
    pub replicas: BTreeMap<String, SetState>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    /// Volume id to its set.
    volumes: BTreeMap<String, VolumeSet>,
}

const FILE_VERSION: u32 = 1;

/// The replica sets of this node's multi-replica volumes, persisted to a JSON file.
#[derive(Debug)]
pub struct ReplicaSets {
    path: PathBuf,
    /// The sets; held across the file write, so the file never goes backwards. Changes are
    /// rare (create, delete, ejection).
    sets: Mutex<BTreeMap<String, VolumeSet>>,
    /// Volumes attached on this node now (not persisted: attachments are restored at start).
    attached: Mutex<std::collections::BTreeSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is one map operation: a panic elsewhere cannot leave it half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplicaSets {
    /// Open the sets persisted at `path`, or start empty if the file does not exist.
    ///
    /// # Errors
    /// The file cannot be read or is not valid: forgetting ejections would let stale replicas
    /// serve reads, so a corrupt file is never taken as empty.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let sets = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("replica-set file {} is corrupt: {e}", path.display()),
                    )
                })?;
                if f.version != FILE_VERSION {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "replica-set file {} has version {}, this build reads {FILE_VERSION}",
                            path.display(),
                            f.version
                        ),
                    ));
                }
                f.volumes
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            sets: Mutex::new(sets),
            attached: Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    /// Record whether `name` is attached on this node (deleting it is refused while it is).
    pub fn set_attached(&self, name: &str, attached: bool) {
        let mut a = lock(&self.attached);
        if attached {
            a.insert(name.to_owned());
        } else {
            a.remove(name);
        }
    }

    /// Whether `name` is attached on this node.
    pub fn is_attached(&self, name: &str) -> bool {
        lock(&self.attached).contains(name)
    }

    /// The file the sets are persisted to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded set of volume `id`.
    pub fn get(&self, id: &str) -> Option<VolumeSet> {
        lock(&self.sets).get(id).cloned()
    }

    /// Record volume `id`'s set as `pools`, all healthy, unless one is recorded already.
    /// Returns the recorded set.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn record(&self, id: &str, name: &str, pools: &[String]) -> io::Result<VolumeSet> {
        self.update(|sets| {
            sets.entry(id.to_owned())
                .or_insert_with(|| VolumeSet {
                    name: name.to_owned(),
                    replicas: pools
                        .iter()
                        .map(|p| (p.clone(), SetState::Healthy))
                        .collect(),
                })
                .clone()
        })
    }

    /// Record that the replica of volume `id` on pool device `pool` is ejected.
    ///
    /// # Errors
    /// The file cannot be written (the ejection is then not in force).
    pub fn eject(&self, id: &str, name: &str, pool: &str) -> io::Result<()> {
        self.update(|sets| {
            sets.entry(id.to_owned())
                .or_insert_with(|| VolumeSet {
                    name: name.to_owned(),
                    replicas: BTreeMap::new(),
                })
                .replicas
                .insert(pool.to_owned(), SetState::Ejected)
        })
        .map(drop)
    }

    /// Forget volume `id` (it was deleted).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn forget(&self, id: &str) -> io::Result<()> {
        self.update(|sets| sets.remove(id)).map(drop)
    }

    /// Apply `change` and persist the result; on failure the change is undone, so memory
    /// never claims what the file does not hold.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, VolumeSet>) -> T,
    ) -> io::Result<T> {
        let mut sets = lock(&self.sets);
        let before = sets.clone();
        let out = change(&mut sets);
        if *sets == before {
            return Ok(out);
        }
        if let Err(e) = self.persist(&sets) {
            *sets = before;
            return Err(e);
        }
        Ok(out)
    }

    fn persist(&self, sets: &BTreeMap<String, VolumeSet>) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&FileFormat {
            version: FILE_VERSION,
            volumes: sets.clone(),
        })
        .map_err(io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The [`Ejector`] of a standalone volume's nexus: child ids are pool device ids, and an
/// ejection is recorded in [`ReplicaSets`] before it takes effect.
#[derive(Debug, Clone)]
pub struct SetEjector {
    sets: Arc<ReplicaSets>,
    volume_id: String,
    name: String,
}

impl SetEjector {
    /// The ejector of volume `name` with id `volume_id`.
    pub fn new(sets: Arc<ReplicaSets>, volume_id: String, name: String) -> Self {
        Self {
            sets,
            volume_id,
            name,
        }
    }
}

impl Ejector for SetEjector {
    // Standalone replicas are not rebuilt yet, so the generation they fell behind at is not
    // kept: an ejected replica stays out until it is recreated.
    fn eject<'a>(&'a self, child: &'a str, reason: &'a str, _since: u64) -> EjectFuture<'a> {
        let this = self.clone();
        let pool = child.to_owned();
        Box::pin(async move {
            let recorded = tokio::task::spawn_blocking(move || {
                this.sets.eject(&this.volume_id, &this.name, &pool)
            })
            .await
            .map_err(|e| format!("the ejection task failed: {e}"))?;
            match recorded {
                Ok(()) => {
                    tracing::warn!(volume = %self.name, pool = child, reason, "ejected a replica; it stays out until rebuilt");
                    Ok(())
                }
                Err(e) => Err(format!(
                    "cannot record the ejection in {}: {e}",
                    self.sets.path().display()
                )),
            }
        })
    }
}

/// The local API of a standalone node: [`Storage`] plus the recorded replica states.
#[derive(Debug)]
pub struct Standalone {
    storage: Arc<Storage>,
    sets: Arc<ReplicaSets>,
}

fn state_error(what: &str, e: &io::Error) -> ControlError {
    ControlError::new(ErrorKind::Internal, format!("{what}: {e}"))
}

impl Standalone {
    /// The API over `storage` and `sets`.
    pub fn new(storage: Arc<Storage>, sets: Arc<ReplicaSets>) -> Self {
        Self { storage, sets }
    }

    /// `status` with each replica's recorded state, and the recorded replicas that are
    /// missing from storage.
    fn merge(&self, mut status: VolumeStatus) -> VolumeStatus {
        let Some(set) = self.sets.get(&status.id) else {
            return status;
        };
        for r in &mut status.replica_status {
            r.state = set
                .replicas
                .get(&r.pool_id)
                .map_or("unknown", |s| s.as_str())
                .into();
        }
        for pool in set.replicas.keys() {
            if !status.replica_status.iter().any(|r| &r.pool_id == pool) {
                status.replica_status.push(ReplicaStatus {
                    node_id: self.storage.node_id().to_owned(),
                    pool_id: pool.clone(),
                    allocated_bytes: 0,
                    state: match set.replicas[pool] {
                        SetState::Healthy => "missing".into(),
                        SetState::Ejected => "ejected".into(),
                    },
                    rebuild: None,
                    last_rebuild: None,
                });
            }
        }
        let healthy = status
            .replica_status
            .iter()
            .filter(|r| r.state == "healthy")
            .count();
        status.state = if healthy == 0 {
            VolumeState::Faulted
        } else if healthy < usize::from(status.replicas) {
            VolumeState::Degraded
        } else {
            VolumeState::Online
        };
        status
    }

    async fn record(&self, status: &VolumeStatus) -> Result<(), ControlError> {
        let sets = Arc::clone(&self.sets);
        let id = status.id.clone();
        let name = status.name.to_string();
        let pools: Vec<String> = status
            .replica_status
            .iter()
            .map(|r| r.pool_id.clone())
            .collect();
        tokio::task::spawn_blocking(move || sets.record(&id, &name, &pools))
            .await
            .map_err(|e| ControlError::new(ErrorKind::Internal, e.to_string()))?
            .map(drop)
            .map_err(|e| state_error("cannot record the volume's replicas", &e))
    }
}

impl VolumeControl for Standalone {
    async fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeStatus, ControlError> {
        let name = spec.name.clone();
        let existed = self.storage.volume_status(&name).is_ok();
        let status = self.storage.create_volume(spec).await?;
        if status.replicas > 1 {
            if let Err(e) = self.record(&status).await {
                if !existed {
                    if let Err(d) = self.storage.delete_volume(&name).await {
                        tracing::error!(volume = %name, error = %d.full_message(), "cannot delete a volume whose replicas could not be recorded");
                    }
                }
                return Err(e);
            }
        }
        Ok(self.merge(status))
    }

    async fn delete_volume(&self, name: &VolumeName) -> Result<(), ControlError> {
        let id = self.storage.volume_status(name)?.id;
        if self.sets.is_attached(name.as_str()) {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!("volume {name} is attached on this node; detach it first"),
            ));
        }
        self.storage.delete_volume(name).await?;
        let sets = Arc::clone(&self.sets);
        let forgot = tokio::task::spawn_blocking(move || sets.forget(&id)).await;
        if let Ok(Err(e)) = forgot {
            // Harmless: ids are never reused.
            tracing::warn!(volume = %name, error = %e, "cannot forget a deleted volume's replica set");
        }
        Ok(())
    }

    async fn get_volume(&self, name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        Ok(self.merge(self.storage.get_volume(name).await?))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
        Ok(self
            .storage
            .list_volumes()
            .await?
            .into_iter()
            .map(|s| self.merge(s))
            .collect())
    }

    async fn resize_volume(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        Ok(self.merge(self.storage.resize_volume(name, new_size_bytes).await?))
    }

    async fn list_pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
        self.storage.list_pools().await
    }
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
    use super::*;

    #[test]
    fn sets_persist_ejections_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let sets = ReplicaSets::open(&path).unwrap();
        let pools = ["a".to_owned(), "b".to_owned()];
        let set = sets.record("v1", "db", &pools).unwrap();
        assert_eq!(set.replicas["a"], SetState::Healthy);
        sets.eject("v1", "db", "b").unwrap();
        // Recording again keeps the ejection.
        let set = sets.record("v1", "db", &pools).unwrap();
        assert_eq!(set.replicas["b"], SetState::Ejected);

        let again = ReplicaSets::open(&path).unwrap();
        let set = again.get("v1").unwrap();
        assert_eq!(set.replicas["a"], SetState::Healthy);
        assert_eq!(set.replicas["b"], SetState::Ejected);
        again.forget("v1").unwrap();
        assert!(ReplicaSets::open(&path).unwrap().get("v1").is_none());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"{\"version\": 1, \"volumes\": ").unwrap();
        let e = ReplicaSets::open(&path).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sets = ReplicaSets::open(dir.path().join("missing-dir").join(FILE_NAME)).unwrap();
        assert!(sets.record("v1", "db", &["a".to_owned()]).is_err());
        assert!(sets.get("v1").is_none());
    }
}

#[cfg(test)]
mod source_tests {
    use std::path::Path;

    use ::api::{VolumeControl, VolumeSpec};
    use volume::device::{BlockDevice, WriteFlags};
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
        let sets_path = dir.path().join(super::FILE_NAME);
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
