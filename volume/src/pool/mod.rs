//! The pool: Ballast's on-disk format and local storage engine.
//!
//! A node's [`Storage`] is one or more pool devices (files or block devices). Every device is
//! self-describing and independent (its own superblock, metadata and checksums), and shares the
//! node's pool UUID. A volume's local [`Replica`] lives wholly on one device, so each device is
//! a failure domain of its own and, in standalone mode, replicas can be placed on distinct
//! devices. Create places a volume on the device with the most free space.
//!
//! - [`format`]: superblock, geometry, foreign-signature detection (the on-disk layout).
//! - [`metadata`]: the copy-on-write metadata slots (volume table, extent table, open set).
//! - `disk`: one device at run time: allocation, checksums, commits, crash recovery.
//! - [`replica`]: the [`BlockDevice`] data path of one volume.
//! - [`stats`]: lock-free I/O counters for metrics.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{
    format_size, round_volume_size, ControlError, ErrorKind, PoolStatus, ReplicaStatus,
    VolumeControl, VolumeName, VolumeSpec, VolumeState, VolumeStatus, MAX_REPLICAS,
};
use crate::io::IoEngine;

mod disk;
pub mod format;
pub mod metadata;
pub mod replica;
pub mod stats;

pub use disk::{encode_crc, OpenReport, KEEP_OPEN_COMMITS};
pub use replica::Replica;

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

/// Errors opening, formatting or committing pool devices.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No devices were configured.
    #[error("no pool devices are configured")]
    NoDevices,
    /// The same device is configured twice.
    #[error("pool device {path} is configured more than once")]
    Duplicate {
        /// The device.
        path: PathBuf,
    },
    /// The device does not exist and no size was given to create it.
    #[error(
        "pool device {path} does not exist; give a size (PATH:SIZE) to create it as a sparse file"
    )]
    Missing {
        /// The device.
        path: PathBuf,
    },
    /// The device holds something that must not be overwritten.
    #[error("pool device {path} holds {what}; refusing to format it (pass --force-format to overwrite it and lose its contents)")]
    Foreign {
        /// The device.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The device's geometry or superblock is unusable.
    #[error("pool device {path} cannot hold a Ballast pool")]
    Format {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: format::FormatError,
    },
    /// Neither metadata slot is usable, or the metadata breaks an invariant.
    #[error("pool device {path} has unusable metadata; refusing to open it rather than lose data")]
    Metadata {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: metadata::MetadataError,
    },
    /// Two devices hold a volume of the same name.
    #[error("volume {name} exists on two pool devices ({a} and {b}); remove one of the devices")]
    DuplicateVolume {
        /// The volume.
        name: String,
        /// One device.
        a: PathBuf,
        /// The other.
        b: PathBuf,
    },
    /// A fixed-size table is full.
    #[error("pool device {path}: the {what} is full")]
    Full {
        /// The device.
        path: PathBuf,
        /// Which table.
        what: &'static str,
    },
    /// An I/O error on the device.
    #[error("pool device {path}: {op} failed")]
    Io {
        /// The device.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A node's storage: every pool device, and the replicas on them.
#[derive(Debug)]
pub struct Storage {
    node_id: String,
    pool_uuid: [u8; 16],
    disks: Vec<Arc<disk::Disk>>,
    engine: Arc<dyn IoEngine>,
    /// Serialises control operations so check-then-act (idempotent create) is atomic.
    control: tokio::sync::Mutex<()>,
}

/// Read the pool UUID of an existing Ballast device, if it is one.
fn peek_pool_uuid(path: &std::path::Path) -> Option<[u8; 16]> {
    use std::io::Read;
    let mut b = vec![0u8; format::BLOCK as usize];
    std::fs::File::open(path).ok()?.read_exact(&mut b).ok()?;
    format::Superblock::decode(&b).ok().map(|sb| sb.pool_uuid)
}

impl Storage {
    /// Open every configured device, formatting empty ones, and recover after a crash.
    ///
    /// # Errors
    /// A device is missing, unreadable, holds a foreign signature or another node's pool
    /// (without `force_format`), or its metadata is corrupt.
    pub async fn open(cfg: StorageConfig) -> Result<Self, PoolError> {
        if cfg.devices.is_empty() {
            return Err(PoolError::NoDevices);
        }
        let mut seen = std::collections::HashSet::new();
        for d in &cfg.devices {
            let key = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            if !seen.insert(key) {
                return Err(PoolError::Duplicate {
                    path: d.path.clone(),
                });
            }
        }
        let mut pool_uuid = cfg.devices.iter().find_map(|d| peek_pool_uuid(&d.path));
        let mut disks = Vec::new();
        for d in &cfg.devices {
            let (disk, report) = disk::Disk::open(
                &d.path,
                d.create_size,
                &cfg.node_id,
                pool_uuid,
                cfg.force_format,
                cfg.engine.clone(),
            )
            .await?;
            pool_uuid = Some(disk.sb.pool_uuid);
            let (used, total) = disk.usage();
            tracing::info!(
                path = %d.path.display(),
                formatted = report.formatted,
                recovered_extents = report.recovered_extents,
                volumes = disk.volumes().len(),
                used_extents = used,
                total_extents = total,
                "opened pool device"
            );
            disks.push(Arc::new(disk));
        }
        let mut names: std::collections::HashMap<VolumeName, PathBuf> =
            std::collections::HashMap::new();
        for d in &disks {
            for v in d.volumes() {
                if let Some(a) = names.insert(v.name.clone(), d.path.clone()) {
                    return Err(PoolError::DuplicateVolume {
                        name: v.name.to_string(),
                        a,
                        b: d.path.clone(),
                    });
                }
            }
        }
        Ok(Self {
            node_id: cfg.node_id,
            pool_uuid: pool_uuid.expect("at least one device"),
            disks,
            engine: cfg.engine,
            control: tokio::sync::Mutex::new(()),
        })
    }

    /// The I/O engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// This node's ID.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn find(&self, name: &VolumeName) -> Option<(Arc<disk::Disk>, Arc<disk::VolRt>)> {
        self.disks.iter().find_map(|d| {
            d.volumes()
                .into_iter()
                .find(|v| &v.name == name)
                .map(|v| (d.clone(), v))
        })
    }

    fn not_found(name: &VolumeName) -> ControlError {
        ControlError::new(ErrorKind::NotFound, format!("volume {name} not found"))
    }

    fn status(&self, disk: &disk::Disk, v: &disk::VolRt) -> VolumeStatus {
        let allocated = v
            .allocated_extents
            .load(std::sync::atomic::Ordering::SeqCst)
            * format::EXTENT;
        VolumeStatus {
            id: uuid::Uuid::from_bytes(v.uuid).to_string(),
            name: v.name.clone(),
            size_bytes: v.size.load(std::sync::atomic::Ordering::SeqCst),
            replicas: v.replicas,
            allocated_bytes: allocated,
            state: VolumeState::Online,
            created_at: v.created_at,
            replica_status: vec![ReplicaStatus {
                node_id: self.node_id.clone(),
                pool_id: uuid::Uuid::from_bytes(disk.sb.disk_uuid).to_string(),
                allocated_bytes: allocated,
                state: "healthy".into(),
                rebuild: None,
                last_rebuild: None,
            }],
        }
    }

    /// The data-path handle of a volume's local replica.
    ///
    /// # Errors
    /// `NotFound` if no such volume.
    pub fn replica(&self, name: &VolumeName) -> Result<Replica, ControlError> {
        let (d, v) = self.find(name).ok_or_else(|| Self::not_found(name))?;
        Ok(Replica::new(d, v))
    }

    /// I/O statistics for every volume, for metrics.
    pub fn io_stats(&self) -> Vec<stats::VolumeIoStats> {
        let mut out: Vec<_> = self
            .disks
            .iter()
            .flat_map(|d| d.volumes())
            .map(|v| v.counters.snapshot(v.name.as_str()))
            .collect();
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }

    /// Commit every device with no volume left open; after this the process may exit and the
    /// next open needs no recovery.
    ///
    /// # Errors
    /// A commit failed.
    pub async fn close(&self) -> Result<(), PoolError> {
        for d in &self.disks {
            d.commit(true).await?;
        }
        Ok(())
    }

    /// Commit every device that changed since its last commit. Run periodically, this bounds
    /// the work of crash recovery (idle extents leave the open set) and returns freed extents
    /// to the free list even when no client flushes. Idle devices are not touched.
    ///
    /// # Errors
    /// A commit failed.
    pub async fn checkpoint(&self) -> Result<(), PoolError> {
        for d in &self.disks {
            d.commit_if_changed().await?;
        }
        Ok(())
    }
}

fn internal(e: PoolError) -> ControlError {
    ControlError::new(ErrorKind::Internal, "the storage engine failed").with_source(e)
}

impl VolumeControl for Storage {
    async fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeStatus, ControlError> {
        if spec.replicas == 0 || spec.replicas > MAX_REPLICAS {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "replicas must be between 1 and {MAX_REPLICAS}, got {}",
                    spec.replicas
                ),
            ));
        }
        let size = round_volume_size(spec.size_bytes)?;
        let _guard = self.control.lock().await;
        if let Some((d, v)) = self.find(&spec.name) {
            let have = v.size.load(std::sync::atomic::Ordering::SeqCst);
            if have == size && v.replicas == spec.replicas {
                return Ok(self.status(&d, &v));
            }
            return Err(ControlError::new(
                ErrorKind::Conflict,
                format!(
                    "volume {} already exists with size {} and {} replica(s); the request asked for {} and {} replica(s)",
                    spec.name,
                    format_size(have),
                    v.replicas,
                    format_size(size),
                    spec.replicas
                ),
            ));
        }
        if spec.replicas > 1 {
            return Err(ControlError::new(
                ErrorKind::Unimplemented,
                format!(
                    "replicas={} needs cluster mode: run the daemons with --etcd and --listen so \
                     replicas go on distinct nodes (replicas on distinct disks of one standalone \
                     node are not available yet), or create the volume with 1 replica",
                    spec.replicas
                ),
            ));
        }
        let best = self
            .disks
            .iter()
            .filter(|d| d.layout.capacity_bytes() >= size && d.free_volume_slots() > 0)
            .max_by_key(|d| {
                let (used, total) = d.usage();
                total - used
            })
            .cloned();
        let Some(disk) = best else {
            let largest = self
                .disks
                .iter()
                .map(|d| d.layout.capacity_bytes())
                .max()
                .unwrap_or(0);
            return Err(ControlError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "no pool device can hold a volume of {}: the largest has a capacity of {}",
                    format_size(size),
                    format_size(largest)
                ),
            ));
        };
        let v = disk
            .create_volume(&spec.name, size, spec.replicas)
            .await
            .map_err(|e| match e {
                PoolError::Full { .. } => {
                    ControlError::new(ErrorKind::ResourceExhausted, e.to_string())
                }
                e => internal(e),
            })?;
        tracing::info!(volume = %spec.name, size, pool = %disk.path.display(), "created volume");
        Ok(self.status(&disk, &v))
    }

    async fn delete_volume(&self, name: &VolumeName) -> Result<(), ControlError> {
        let _guard = self.control.lock().await;
        let (d, v) = self.find(name).ok_or_else(|| Self::not_found(name))?;
        d.delete_volume(&v).await.map_err(internal)?;
        tracing::info!(volume = %name, "deleted volume");
        Ok(())
    }

    async fn get_volume(&self, name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        let (d, v) = self.find(name).ok_or_else(|| Self::not_found(name))?;
        Ok(self.status(&d, &v))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
        let mut out: Vec<VolumeStatus> = self
            .disks
            .iter()
            .flat_map(|d| d.volumes().into_iter().map(move |v| (d, v)))
            .map(|(d, v)| self.status(d, &v))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn resize_volume(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        let size = round_volume_size(new_size_bytes)?;
        let _guard = self.control.lock().await;
        let (d, v) = self.find(name).ok_or_else(|| Self::not_found(name))?;
        let have = v.size.load(std::sync::atomic::Ordering::SeqCst);
        if size < have {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "volume {name} is {} and cannot shrink to {}; only growing is supported",
                    format_size(have),
                    format_size(size)
                ),
            ));
        }
        if size > d.layout.capacity_bytes() {
            return Err(ControlError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "volume {name} cannot grow to {}: its pool device holds at most {}",
                    format_size(size),
                    format_size(d.layout.capacity_bytes())
                ),
            ));
        }
        if size > have {
            d.grow_volume(&v, size).await.map_err(internal)?;
            tracing::info!(volume = %name, from = have, to = size, "grew volume");
        }
        Ok(self.status(&d, &v))
    }

    async fn list_pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
        Ok(self
            .disks
            .iter()
            .map(|d| {
                let (used, total) = d.usage();
                PoolStatus {
                    id: uuid::Uuid::from_bytes(d.sb.disk_uuid).to_string(),
                    pool_uuid: uuid::Uuid::from_bytes(self.pool_uuid).to_string(),
                    node_id: self.node_id.clone(),
                    path: d.path.display().to_string(),
                    capacity_bytes: total * format::EXTENT,
                    allocated_bytes: used * format::EXTENT,
                    free_bytes: (total - used) * format::EXTENT,
                    volumes: d.volumes().len() as u32,
                    checksum_errors: d.checksum_errors.load(std::sync::atomic::Ordering::SeqCst),
                    state: "online".into(),
                }
            })
            .collect())
    }
}
