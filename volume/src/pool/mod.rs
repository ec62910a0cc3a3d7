//! The pool: Ballast's on-disk format and local storage engine.
//!
//! A node's [`Storage`] is one or more pool devices (files or block devices). Every device is
//! self-describing and independent (its own superblock, metadata and checksums), and shares the
//! node's pool UUID. A volume's local [`Replica`] lives wholly on one device, so each device is
//! a failure domain of its own.
//!
//! A volume with `replicas = N` has one replica on each of N distinct devices (never two on
//! one device); every replica carries the volume's id and spec. Create places them on the
//! devices with the most free space, and is all-or-nothing: replicas made before a failure
//! are deleted again. (In cluster mode a node holds at most one replica of a volume, created
//! here with `replicas = 1`; the cluster record holds the volume's real replica count.)
//! Which replicas are in sync is not the pool's business: the daemon records ejections (see
//! the daemon's `standalone` module); the status here reports every replica present healthy.
//!
//! - [`format`]: superblock, geometry, foreign-signature detection (the on-disk layout).
//! - [`metadata`]: the copy-on-write metadata slots (volume table, extent table, open set).
//! - `disk`: one device at run time: allocation, checksums, commits, crash recovery.
//! - [`replica`]: the [`BlockDevice`] data path of one volume.
//! - [`stats`]: lock-free I/O counters for metrics.

use std::path::PathBuf;
use std::sync::Arc;

use crate::io::IoEngine;
use api::{
    format_size, round_volume_size, ControlError, ErrorKind, PoolStatus, ReplicaCount,
    ReplicaStatus, VolumeControl, VolumeName, VolumeSpec, VolumeState, VolumeStatus,
};

mod disk;
pub mod format;
pub mod journal;
pub mod metadata;
pub mod replica;
mod snapshots;
pub mod stats;

pub use disk::{encode_crc, OpenReport, KEEP_OPEN_COMMITS, OPEN_LIMIT};
pub use replica::{Chain, ChainLink, Replica};
pub use snapshots::{copy_size, SnapshotInfo};

/// One replica of a volume and the pool device holding it.
#[derive(Debug, Clone)]
pub struct DiskReplica {
    /// The device's UUID (the `pool_id` of status output).
    pub pool_id: String,
    /// The device's path.
    pub path: PathBuf,
    /// The replica.
    pub replica: Replica,
}

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
    /// The device holds a pool of an on-disk format newer than this build reads.
    #[error("pool device {path} holds a Ballast pool of on-disk format {version}, newer than this build reads ({}); upgrade ballast (never format the device: that loses its volumes)", format::FORMAT_VERSION)]
    Newer {
        /// The device.
        path: PathBuf,
        /// Its format version.
        version: u32,
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
    /// A format 1 device cannot be upgraded in place.
    #[error(
        "pool device {path} has on-disk format 1 and cannot be upgraded to format {}: {reason}",
        format::FORMAT_VERSION
    )]
    Upgrade {
        /// The device.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// Two devices hold different volumes (different ids) of the same name.
    #[error("two different volumes named {name} exist on pool devices {a} and {b}; remove one of the devices")]
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
    /// Open extents whose checksums were recomputed at open (after an unclean shutdown).
    recovered_extents: u64,
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
    /// There is no degraded open: a configured device that cannot be opened is an error, even
    /// if every volume has a replica elsewhere. Which volumes a device holds is known only from
    /// the device itself, so skipping it could hide the only copy of a volume. The operator
    /// decides by removing the device from the configuration; the volumes with a replica on it
    /// then open with the remaining replicas (their status says degraded).
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
        let mut recovered_extents = 0;
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
            recovered_extents += report.recovered_extents;
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
        // Replicas of one volume share its id; the same name with another id is a different
        // volume (a device from elsewhere), and which one is meant cannot be guessed.
        let mut names: std::collections::HashMap<VolumeName, (PathBuf, [u8; 16])> =
            std::collections::HashMap::new();
        for d in &disks {
            for v in d.volumes() {
                if let Some((a, uuid)) = names.insert(v.name.clone(), (d.path.clone(), v.uuid)) {
                    if uuid != v.uuid {
                        return Err(PoolError::DuplicateVolume {
                            name: v.name.to_string(),
                            a,
                            b: d.path.clone(),
                        });
                    }
                }
            }
        }
        Ok(Self {
            node_id: cfg.node_id,
            pool_uuid: pool_uuid.expect("at least one device"),
            disks,
            engine: cfg.engine,
            control: tokio::sync::Mutex::new(()),
            recovered_extents,
        })
    }

    /// How many open extents the open had to re-read and re-checksum, over every device
    /// (0 after a clean shutdown; at most [`OPEN_LIMIT`] per device otherwise).
    pub fn recovered_extents(&self) -> u64 {
        self.recovered_extents
    }

    /// The I/O engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// This node's ID.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Every replica of `name`, in device order (at most one per device).
    fn find(&self, name: &VolumeName) -> Vec<(Arc<disk::Disk>, Arc<disk::VolRt>)> {
        self.disks
            .iter()
            .filter_map(|d| d.volume_named(name).map(|v| (d.clone(), v)))
            .collect()
    }

    /// Every volume's replicas, grouped by volume, sorted by name.
    fn all(&self) -> Vec<Vec<(Arc<disk::Disk>, Arc<disk::VolRt>)>> {
        let mut by_name: std::collections::BTreeMap<VolumeName, Vec<_>> =
            std::collections::BTreeMap::new();
        for d in &self.disks {
            for v in d.volumes() {
                by_name
                    .entry(v.name.clone())
                    .or_default()
                    .push((d.clone(), v));
            }
        }
        by_name.into_values().collect()
    }

    fn not_found(name: &VolumeName) -> ControlError {
        ControlError::new(ErrorKind::NotFound, format!("volume {name} not found"))
    }

    /// The status of a volume from its replicas (not empty). Every replica present is
    /// reported healthy; a volume with fewer replicas than its spec (a device is gone) is
    /// degraded.
    fn status(&self, copies: &[(Arc<disk::Disk>, Arc<disk::VolRt>)]) -> VolumeStatus {
        let (_, first) = &copies[0];
        let replica_status: Vec<ReplicaStatus> = copies
            .iter()
            .map(|(d, v)| ReplicaStatus {
                node_id: self.node_id.clone(),
                pool_id: uuid::Uuid::from_bytes(d.sb.disk_uuid).to_string(),
                allocated_bytes: v
                    .allocated_extents
                    .load(std::sync::atomic::Ordering::SeqCst)
                    * format::EXTENT,
                state: "healthy".into(),
                rebuild: None,
                last_rebuild: None,
            })
            .collect();
        VolumeStatus {
            id: uuid::Uuid::from_bytes(first.uuid).to_string(),
            name: first.name.clone(),
            size_bytes: copies
                .iter()
                .map(|(_, v)| v.size.load(std::sync::atomic::Ordering::SeqCst))
                .min()
                .unwrap_or(0),
            replicas: first.replicas,
            allocated_bytes: replica_status
                .iter()
                .map(|r| r.allocated_bytes)
                .max()
                .unwrap_or(0),
            shared_bytes: copies
                .iter()
                .map(|(d, v)| d.shared_bytes(v))
                .max()
                .unwrap_or(0),
            state: if copies.len() < usize::from(first.replicas) {
                VolumeState::Degraded
            } else {
                VolumeState::Online
            },
            created_at: first.created_at,
            replica_status,
        }
    }

    /// The data-path handle of a volume's only replica on this node.
    ///
    /// # Errors
    /// `NotFound` if no such volume; `FailedPrecondition` if this node holds several replicas
    /// of it (open those with [`Storage::replicas`], behind a nexus).
    pub fn replica(&self, name: &VolumeName) -> Result<Replica, ControlError> {
        let mut copies = self.find(name);
        match copies.len() {
            0 => Err(Self::not_found(name)),
            1 => {
                let (d, v) = copies.remove(0);
                Ok(Replica::new(d, v))
            }
            n => Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "volume {name} has {n} replicas on this node's pool devices; it is served \
                     only through its replicated device (attach it)"
                ),
            )),
        }
    }

    /// A volume's status (as [`VolumeControl::get_volume`], without waiting).
    ///
    /// # Errors
    /// `NotFound` if no such volume.
    pub fn volume_status(&self, name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        let copies = self.find(name);
        if copies.is_empty() {
            return Err(Self::not_found(name));
        }
        Ok(self.status(&copies))
    }

    /// Every replica of a volume on this node, one per pool device, in device order.
    ///
    /// # Errors
    /// `NotFound` if no such volume.
    pub fn replicas(&self, name: &VolumeName) -> Result<Vec<DiskReplica>, ControlError> {
        let copies = self.find(name);
        if copies.is_empty() {
            return Err(Self::not_found(name));
        }
        Ok(copies
            .into_iter()
            .map(|(d, v)| DiskReplica {
                pool_id: uuid::Uuid::from_bytes(d.sb.disk_uuid).to_string(),
                path: d.path.clone(),
                replica: Replica::new(d, v),
            })
            .collect())
    }

    /// I/O statistics for every volume, for metrics.
    pub fn io_stats(&self) -> Vec<stats::VolumeIoStats> {
        // One entry per volume. The replicas of a multi-replica volume are summed: these are
        // the storage's I/O, so a write to a two-replica volume counts twice.
        self.all()
            .into_iter()
            .map(|copies| {
                let mut it = copies
                    .iter()
                    .map(|(_, v)| v.counters.snapshot(v.name.as_str()));
                let first = it.next().expect("a volume has a replica");
                it.fold(first, |mut acc, s| {
                    add_io_stats(&mut acc, &s);
                    acc
                })
            })
            .collect()
    }

    /// Commit every device with no volume left open; after this the process may exit and the
    /// next open needs no recovery.
    ///
    /// # Errors
    /// A commit failed.
    pub async fn close(&self) -> Result<(), PoolError> {
        // Every device is tried: a failed one must not keep the others from closing cleanly.
        let mut first = None;
        for d in &self.disks {
            if let Err(e) = d.commit(true).await {
                tracing::error!(pool = %d.path.display(), error = %e, "cannot close a pool device");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Commit every device that changed since its last commit. Run periodically, this bounds
    /// the work of crash recovery (idle extents leave the open set) and returns freed extents
    /// to the free list even when no client flushes. Idle devices are not touched.
    ///
    /// # Errors
    /// A commit failed.
    pub async fn checkpoint(&self) -> Result<(), PoolError> {
        // Every device is tried: a failed one must not stall the others' checkpoints.
        let mut first = None;
        for d in &self.disks {
            if let Err(e) = d.commit_if_changed().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Add `b`'s counts to `a` (the replicas of one volume).
fn add_io_stats(a: &mut stats::VolumeIoStats, b: &stats::VolumeIoStats) {
    for (x, y) in [
        (&mut a.read, &b.read),
        (&mut a.write, &b.write),
        (&mut a.flush, &b.flush),
        (&mut a.discard, &b.discard),
    ] {
        x.count += y.count;
        x.errors += y.errors;
        x.bytes += y.bytes;
        x.latency_sum_seconds += y.latency_sum_seconds;
        for (bx, by) in x.buckets.iter_mut().zip(&y.buckets) {
            *bx += by;
        }
    }
    a.checksum_errors += b.checksum_errors;
}

fn internal(e: PoolError) -> ControlError {
    ControlError::new(ErrorKind::Internal, "the storage engine failed").with_source(e)
}

impl Storage {
    /// Choose `n` distinct devices for a new volume of `size` bytes: devices that can hold it
    /// and have a free volume slot, the most free space first (ties in device order).
    fn place(&self, n: usize, size: u64) -> Result<Vec<Arc<disk::Disk>>, ControlError> {
        let have = self.disks.len();
        if n > have {
            let paths: Vec<String> = self
                .disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect();
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{n} replicas need {n} pool devices; this node has \
                     {have} ({}): add pool devices (--pool PATH[:SIZE]), create the volume with \
                     at most {have} replica(s), or run in cluster mode (--etcd and --listen) to \
                     put replicas on distinct nodes",
                    paths.join(", ")
                ),
            ));
        }
        let mut fit: Vec<(usize, u64, Arc<disk::Disk>)> = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.layout.capacity_bytes() >= size && d.free_volume_slots() > 0)
            .map(|(i, d)| {
                let (used, total) = d.usage();
                (i, total - used, d.clone())
            })
            .collect();
        if fit.len() < n {
            let largest = self
                .disks
                .iter()
                .map(|d| d.layout.capacity_bytes())
                .max()
                .unwrap_or(0);
            return Err(ControlError::new(
                ErrorKind::ResourceExhausted,
                if n == 1 {
                    format!(
                        "no pool device can hold a volume of {}: the largest has a capacity of {}",
                        format_size(size),
                        format_size(largest)
                    )
                } else {
                    format!(
                        "{n} replicas of {} need {n} pool devices that can hold one, but only {} \
                         can (a device needs the capacity and a free volume slot)",
                        format_size(size),
                        fit.len()
                    )
                },
            ));
        }
        fit.sort_by_key(|&(i, free, _)| (std::cmp::Reverse(free), i));
        Ok(fit.into_iter().take(n).map(|(_, _, d)| d).collect())
    }
}

impl VolumeControl for Storage {
    async fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeStatus, ControlError> {
        ReplicaCount::new(spec.replicas.into())?;
        let size = round_volume_size(spec.size_bytes)?;
        let _guard = self.control.lock().await;
        let copies = self.find(&spec.name);
        if let Some((_, v)) = copies.first() {
            let have = v.size.load(std::sync::atomic::Ordering::SeqCst);
            if have == size && v.replicas == spec.replicas {
                // Idempotent. A replica missing here (its device is gone) is not re-created
                // empty: a new replica must be rebuilt from the others before it serves reads.
                return Ok(self.status(&copies));
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
        let disks = self.place(usize::from(spec.replicas), size)?;
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let mut made: Vec<(Arc<disk::Disk>, Arc<disk::VolRt>)> = Vec::new();
        for disk in disks {
            match disk
                .create_volume(&spec.name, size, spec.replicas, uuid)
                .await
            {
                Ok(v) => made.push((disk, v)),
                Err(e) => {
                    // All or nothing: a volume with fewer replicas than asked would look
                    // healthy to nobody.
                    for (d, v) in &made {
                        if let Err(e) = d.delete_volume(v).await {
                            tracing::error!(volume = %spec.name, pool = %d.path.display(), error = %e, "cannot delete a replica of a failed create");
                        }
                    }
                    return Err(match e {
                        PoolError::Full { .. } => {
                            ControlError::new(ErrorKind::ResourceExhausted, e.to_string())
                        }
                        e => internal(e),
                    });
                }
            }
        }
        tracing::info!(
            volume = %spec.name,
            size,
            pools = ?made.iter().map(|(d, _)| d.path.display().to_string()).collect::<Vec<_>>(),
            "created volume"
        );
        Ok(self.status(&made))
    }

    async fn delete_volume(&self, name: &VolumeName) -> Result<(), ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find(name);
        if copies.is_empty() {
            return Err(Self::not_found(name));
        }
        for (d, v) in &copies {
            d.delete_volume(v).await.map_err(internal)?;
        }
        tracing::info!(volume = %name, replicas = copies.len(), "deleted volume");
        Ok(())
    }

    async fn get_volume(&self, name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        self.volume_status(name)
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
        Ok(self.all().iter().map(|c| self.status(c)).collect())
    }

    async fn resize_volume(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        let size = round_volume_size(new_size_bytes)?;
        let _guard = self.control.lock().await;
        let copies = self.find(name);
        if copies.is_empty() {
            return Err(Self::not_found(name));
        }
        let have = copies
            .iter()
            .map(|(_, v)| v.size.load(std::sync::atomic::Ordering::SeqCst))
            .min()
            .unwrap_or(0);
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
        let cap = copies
            .iter()
            .map(|(d, _)| d.layout.capacity_bytes())
            .min()
            .unwrap_or(0);
        if size > cap {
            return Err(ControlError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "volume {name} cannot grow to {}: its pool device holds at most {}",
                    format_size(size),
                    format_size(cap)
                ),
            ));
        }
        // Each replica grows on its own; after a partial failure the volume's size is the
        // smallest replica's, and resizing again finishes the job.
        for (d, v) in &copies {
            if size > v.size.load(std::sync::atomic::Ordering::SeqCst) {
                d.grow_volume(v, size).await.map_err(internal)?;
            }
        }
        if size > have {
            tracing::info!(volume = %name, from = have, to = size, "grew volume");
        }
        Ok(self.status(&copies))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, WriteFlags};
    use crate::io::{probe, EngineKind, IoBuf};

    const MIB: u64 = 1 << 20;

    /// A directory on a filesystem with O_DIRECT (not tmpfs).
    fn tempdir() -> tempfile::TempDir {
        let base = std::env::var_os("BALLAST_TEST_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        tempfile::Builder::new()
            .prefix("ballast-unit-")
            .tempdir_in(base)
            .unwrap()
    }

    /// Storage over one device per entry of `sizes` (MiB), in `dir`.
    async fn open(dir: &std::path::Path, sizes: &[u64]) -> Result<Storage, PoolError> {
        Storage::open(StorageConfig {
            devices: sizes
                .iter()
                .enumerate()
                .map(|(i, size)| DeviceSpec {
                    path: dir.join(format!("pool{i}.img")),
                    create_size: Some(size * MIB),
                })
                .collect(),
            node_id: "unit".into(),
            force_format: false,
            engine: probe(EngineKind::Sync, 2).unwrap(),
        })
        .await
    }

    fn spec(name: &str, replicas: u8) -> VolumeSpec {
        VolumeSpec {
            name: VolumeName::new(name).unwrap(),
            size_bytes: 8 * MIB,
            replicas,
        }
    }

    #[tokio::test]
    async fn replicas_go_on_distinct_devices_most_free_first() {
        let dir = tempdir();
        let s = open(dir.path(), &[64, 96, 80]).await.unwrap();
        let st = s.create_volume(spec("db", 2)).await.unwrap();
        assert_eq!(st.replicas, 2);
        assert_eq!(st.replica_status.len(), 2);
        let pools = s.list_pools().await.unwrap();
        let ids: Vec<&str> = st
            .replica_status
            .iter()
            .map(|r| r.pool_id.as_str())
            .collect();
        // The two largest (most free) devices: pool1 (96 MiB), then pool2 (80 MiB).
        assert_eq!(ids, [pools[1].id.as_str(), pools[2].id.as_str()]);
        let name = VolumeName::new("db").unwrap();
        let reps = s.replicas(&name).unwrap();
        assert_eq!(reps.len(), 2);
        assert_ne!(reps[0].pool_id, reps[1].pool_id);
        // Idempotent; same id on every replica.
        let again = s.create_volume(spec("db", 2)).await.unwrap();
        assert_eq!(again.id, st.id);
        // `replica` is for single-replica volumes only.
        let e = s.replica(&name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        // Each replica is an independent copy.
        reps[0]
            .replica
            .write(0, IoBuf::from_slice(&[7u8; 4096]), WriteFlags::default())
            .await
            .unwrap();
        let b = reps[1].replica.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let st = s.get_volume(&name).await.unwrap();
        assert_eq!(st.replica_status[0].allocated_bytes, format::EXTENT);
        assert_eq!(st.replica_status[1].allocated_bytes, 0);
        // Grow and delete act on every replica.
        let grown = s.resize_volume(&name, 16 * MIB).await.unwrap();
        assert_eq!(grown.size_bytes, 16 * MIB);
        assert!(s
            .replicas(&name)
            .unwrap()
            .iter()
            .all(|r| r.replica.size() == 16 * MIB));
        s.delete_volume(&name).await.unwrap();
        assert_eq!(
            s.get_volume(&name).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(s.list_pools().await.unwrap().iter().all(|p| p.volumes == 0));
        s.close().await.unwrap();
    }

    #[tokio::test]
    async fn too_few_devices_names_the_shortfall() {
        let dir = tempdir();
        let s = open(dir.path(), &[64, 64]).await.unwrap();
        let e = s.create_volume(spec("db", 3)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.message()
                .contains("3 replicas need 3 pool devices; this node has 2"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("add pool devices"), "{}", e.message());
        assert!(e.message().contains("cluster mode"), "{}", e.message());
        assert!(s.list_volumes().await.unwrap().is_empty());
        let e = s.create_volume(spec("db", 6)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        // Enough devices, but only one can hold the volume.
        let big = VolumeSpec {
            size_bytes: 80 * MIB,
            ..spec("big", 2)
        };
        let s2dir = tempdir();
        let s2 = open(s2dir.path(), &[64, 128]).await.unwrap();
        let e = s2.create_volume(big).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{}", e.message());
        assert!(s2.list_volumes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn replicas_survive_reopening_and_a_missing_device_degrades_the_volume() {
        let dir = tempdir();
        {
            let s = open(dir.path(), &[64, 64]).await.unwrap();
            s.create_volume(spec("db", 2)).await.unwrap();
            s.create_volume(spec("one", 1)).await.unwrap();
            s.close().await.unwrap();
        }
        let name = VolumeName::new("db").unwrap();
        {
            let s = open(dir.path(), &[64, 64]).await.unwrap();
            let st = s.get_volume(&name).await.unwrap();
            assert_eq!(st.replica_status.len(), 2);
            assert_eq!(st.state, VolumeState::Online);
            assert_eq!(s.list_volumes().await.unwrap().len(), 2);
            assert_eq!(s.io_stats().len(), 2, "one entry per volume");
            s.close().await.unwrap();
        }
        // Device 1 replaced by an empty one: the volume runs on its remaining replica.
        std::fs::remove_file(dir.path().join("pool1.img")).unwrap();
        let s = open(dir.path(), &[64, 64]).await.unwrap();
        let st = s.get_volume(&name).await.unwrap();
        assert_eq!(st.replica_status.len(), 1);
        assert_eq!(st.state, VolumeState::Degraded);
        // An idempotent create does not re-create the lost replica empty.
        let again = s.create_volume(spec("db", 2)).await.unwrap();
        assert_eq!(again.replica_status.len(), 1);
        s.close().await.unwrap();
    }
}
