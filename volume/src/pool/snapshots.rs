//! Snapshots, clones and reverts of a node's volumes, over every pool device that holds a
//! replica (the engine is `disk/snapshot.rs`).
//!
//! A snapshot of a volume is one snapshot record on each device that holds a replica of it,
//! all with the snapshot's name. A clone goes on the same devices (it shares their extents).
//! The replicas are snapshotted one after another: a caller that mirrors writes to several of
//! them holds its writes meanwhile, so that every replica's snapshot holds the same writes.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use api::{format_size, round_volume_size, ControlError, ErrorKind, VolumeName, VolumeStatus};

use super::disk::{Disk, SnapshotUsage, VolRt};
use super::{internal, PoolError, Storage};

/// A snapshot as this node's pool holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: VolumeName,
    /// The volume it was taken of, if that volume still exists (the same volume, not only
    /// the same name).
    pub source: Option<VolumeName>,
    /// Its size: the volume's when it was taken.
    pub size_bytes: u64,
    /// Seconds since the epoch when it was taken.
    pub created_at: u64,
    /// How many pool devices hold it.
    pub replicas: usize,
    /// Bytes only it reads (what deleting it frees), summed over its replicas.
    pub exclusive_bytes: u64,
    /// Bytes it shares with the volumes and snapshots based on it, summed over its replicas.
    pub shared_bytes: u64,
}

fn not_found(name: &VolumeName) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("snapshot {name} does not exist (see `ballast snapshot list`)"),
    )
}

fn exhausted_or_internal(e: PoolError) -> ControlError {
    match e {
        PoolError::Full { .. } => ControlError::new(ErrorKind::ResourceExhausted, e.to_string()),
        e => internal(e),
    }
}

/// The size of a copy of `what`, which holds `have` bytes: `size_bytes` rounded up, or
/// `have` for 0; never less than `have`.
pub fn copy_size(what: &str, have: u64, size_bytes: u64) -> Result<u64, ControlError> {
    let size = if size_bytes == 0 {
        have
    } else {
        round_volume_size(size_bytes)?
    };
    if size < have {
        return Err(ControlError::new(
            ErrorKind::InvalidArgument,
            format!(
                "a volume from {what} needs at least its size, {}; {} was asked",
                format_size(have),
                format_size(size)
            ),
        ));
    }
    Ok(size)
}

/// Make copy `name` of each of `sources` with `make`, all or nothing: after a failure, the
/// copies made are deleted.
async fn make_copies<F, Fut>(
    name: &VolumeName,
    sources: &[(Arc<Disk>, Arc<VolRt>)],
    make: F,
) -> Result<Vec<(Arc<Disk>, Arc<VolRt>)>, ControlError>
where
    F: Fn(Arc<Disk>, Arc<VolRt>) -> Fut,
    Fut: std::future::Future<Output = Result<Arc<VolRt>, PoolError>>,
{
    let mut made = Vec::new();
    for (d, source) in sources {
        match make(d.clone(), source.clone()).await {
            Ok(c) => made.push((d.clone(), c)),
            Err(e) => {
                for (d, c) in &made {
                    if let Err(e) = d.delete_volume(c).await {
                        tracing::error!(volume = %name, pool = %d.path.display(), error = %e, "cannot delete a replica of a failed copy");
                    }
                }
                return Err(exhausted_or_internal(e));
            }
        }
    }
    Ok(made)
}

impl Storage {
    /// Every replica of snapshot `name`, in device order.
    fn find_snapshot(&self, name: &VolumeName) -> Vec<(Arc<Disk>, Arc<VolRt>)> {
        self.disks
            .iter()
            .filter_map(|d| d.snapshot_named(name).map(|s| (d.clone(), s)))
            .collect()
    }

    fn snapshot_info(&self, copies: &[(Arc<Disk>, Arc<VolRt>)]) -> SnapshotInfo {
        let (_, s) = &copies[0];
        let source = self.find_by_uuid(&s.uuid).map(|v| v.name.clone());
        let usage = copies.iter().map(|(d, s)| d.snapshot_usage(s)).fold(
            SnapshotUsage::default(),
            |a, b| SnapshotUsage {
                exclusive: a.exclusive + b.exclusive,
                shared: a.shared + b.shared,
            },
        );
        SnapshotInfo {
            name: s.name.clone(),
            source,
            size_bytes: s.size.load(SeqCst),
            created_at: s.created_at,
            replicas: copies.len(),
            exclusive_bytes: usage.exclusive,
            shared_bytes: usage.shared,
        }
    }

    /// The live volume with id `uuid`, if any.
    fn find_by_uuid(&self, uuid: &[u8; 16]) -> Option<Arc<VolRt>> {
        self.disks
            .iter()
            .flat_map(|d| d.volumes())
            .find(|v| &v.uuid == uuid)
    }

    /// Snapshot `volume` as `name` on every device that holds a replica of it. Taking the
    /// same snapshot again answers with it (idempotent); the name taken by a snapshot of
    /// another volume is a conflict.
    ///
    /// # Errors
    /// `NotFound` (no such volume), `Conflict`, `ResourceExhausted` (a volume table is full),
    /// `Internal` (the commit failed).
    pub async fn create_snapshot(
        &self,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<SnapshotInfo, ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find(volume);
        let Some((_, v)) = copies.first() else {
            return Err(Self::not_found(volume));
        };
        let existing = self.find_snapshot(name);
        if let Some((_, s)) = existing.first() {
            if s.uuid == v.uuid {
                return Ok(self.snapshot_info(&existing));
            }
            return Err(ControlError::new(
                ErrorKind::Conflict,
                format!("snapshot {name} already exists, of another volume; choose another name"),
            ));
        }
        let mut made = Vec::new();
        for (d, v) in &copies {
            match d.create_snapshot(v, name, false).await {
                Ok(s) => made.push((d.clone(), s)),
                Err(e) => {
                    // All or nothing.
                    for (d, s) in &made {
                        if let Err(e) = d.delete_snapshot(s).await {
                            tracing::error!(snapshot = %name, pool = %d.path.display(), error = %e, "cannot delete a replica of a failed snapshot");
                        }
                    }
                    return Err(exhausted_or_internal(e));
                }
            }
        }
        tracing::info!(volume = %volume, snapshot = %name, replicas = made.len(), "took a snapshot");
        Ok(self.snapshot_info(&made))
    }

    /// Every snapshot, sorted by name.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let mut by_name: std::collections::BTreeMap<VolumeName, Vec<_>> =
            std::collections::BTreeMap::new();
        for d in &self.disks {
            for s in d.snapshots() {
                by_name
                    .entry(s.name.clone())
                    .or_default()
                    .push((d.clone(), s));
            }
        }
        by_name.values().map(|c| self.snapshot_info(c)).collect()
    }

    /// Snapshot `name`.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn get_snapshot(&self, name: &VolumeName) -> Result<SnapshotInfo, ControlError> {
        let copies = self.find_snapshot(name);
        if copies.is_empty() {
            return Err(not_found(name));
        }
        Ok(self.snapshot_info(&copies))
    }

    /// Delete snapshot `name`: what only it reads is freed; volumes cloned from it keep
    /// reading what they share with it.
    ///
    /// # Errors
    /// `NotFound`, `Internal`.
    pub async fn delete_snapshot(&self, name: &VolumeName) -> Result<(), ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find_snapshot(name);
        if copies.is_empty() {
            return Err(not_found(name));
        }
        for (d, s) in &copies {
            d.delete_snapshot(s).await.map_err(internal)?;
        }
        tracing::info!(snapshot = %name, replicas = copies.len(), "deleted a snapshot");
        Ok(())
    }

    /// A new volume `name` from snapshot `snapshot`: thin, sharing the snapshot's extents,
    /// readable at once, on the devices that hold the snapshot; `size_bytes` (0: the
    /// snapshot's size) may be larger than the snapshot. Idempotent for the same clone.
    ///
    /// # Errors
    /// `NotFound` (no such snapshot), `InvalidArgument` (smaller than the snapshot),
    /// `Conflict` (a volume of that name exists and is not this clone), `ResourceExhausted`,
    /// `Internal`.
    pub async fn clone_snapshot(
        &self,
        snapshot: &VolumeName,
        name: &VolumeName,
        size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find_snapshot(snapshot);
        let Some((_, s)) = copies.first() else {
            return Err(not_found(snapshot));
        };
        let what = format!("snapshot {snapshot}");
        let size = copy_size(&what, s.size.load(SeqCst), size_bytes)?;
        // The same clone: based on it (not the volume it was taken of, which may be too).
        let same = |d: &Arc<Disk>, v: &VolRt| {
            v.uuid != s.uuid
                && v.parent().is_some_and(|p| {
                    copies
                        .iter()
                        .any(|(cd, cs)| Arc::ptr_eq(cd, d) && cs.index == p.index)
                })
        };
        if let Some(status) = self.existing_copy(name, size, same)? {
            return Ok(status);
        }
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let made = make_copies(name, &copies, |d, s| async move {
            d.create_clone(&s, name, size, uuid).await
        })
        .await?;
        tracing::info!(volume = %name, snapshot = %snapshot, replicas = made.len(), "created a volume from a snapshot");
        Ok(self.status(&made))
    }

    /// A new volume `name` from volume `source` as it is now: through a snapshot that is not
    /// listed (it goes once one of the two does). The caller holds the source's writes
    /// meanwhile if it mirrors them to several replicas. `size_bytes` as for
    /// [`Storage::clone_snapshot`].
    ///
    /// # Errors
    /// `NotFound`, `InvalidArgument`, `Conflict`, `ResourceExhausted`, `Internal`.
    pub async fn clone_volume(
        &self,
        source: &VolumeName,
        name: &VolumeName,
        size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find(source);
        let Some((_, v)) = copies.first() else {
            return Err(Self::not_found(source));
        };
        let what = format!("volume {source}");
        let size = copy_size(&what, v.size.load(SeqCst), size_bytes)?;
        // The same clone: based on a hidden snapshot of the source.
        let same = |_: &Arc<Disk>, e: &VolRt| {
            e.uuid != v.uuid
                && e.parent()
                    .is_some_and(|p| p.uuid == v.uuid && p.hidden.load(SeqCst))
        };
        if let Some(status) = self.existing_copy(name, size, same)? {
            return Ok(status);
        }
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let made = make_copies(name, &copies, |d, v| async move {
            let s = d.create_snapshot(&v, name, true).await?;
            let c = d.create_clone(&s, name, size, uuid).await;
            // A failed clone leaves the snapshot with one record on it: it goes.
            d.collect(Some(s)).await;
            c
        })
        .await?;
        tracing::info!(volume = %name, source = %source, replicas = made.len(), "created a volume from a volume");
        Ok(self.status(&made))
    }

    /// If volume `name` exists: its status when it is the copy asked for again (`size` bytes,
    /// and `same`), else `Conflict`.
    fn existing_copy(
        &self,
        name: &VolumeName,
        size: u64,
        same: impl Fn(&Arc<Disk>, &VolRt) -> bool,
    ) -> Result<Option<VolumeStatus>, ControlError> {
        let existing = self.find(name);
        let Some((d, v)) = existing.first() else {
            return Ok(None);
        };
        if v.size.load(SeqCst) == size && same(d, v) {
            return Ok(Some(self.status(&existing)));
        }
        Err(ControlError::new(
            ErrorKind::Conflict,
            format!("volume {name} already exists; choose another name"),
        ))
    }

    /// Make volume `volume` read what snapshot `snapshot` of it holds. What the volume wrote
    /// since is freed. The caller makes sure nothing uses the volume (it is detached).
    ///
    /// # Errors
    /// `NotFound`, `FailedPrecondition` (the snapshot is not one of this volume, or not on
    /// the same devices), `Internal`.
    pub async fn revert_volume(
        &self,
        volume: &VolumeName,
        snapshot: &VolumeName,
    ) -> Result<VolumeStatus, ControlError> {
        let _guard = self.control.lock().await;
        let copies = self.find(volume);
        let Some((_, v)) = copies.first() else {
            return Err(Self::not_found(volume));
        };
        let snaps = self.find_snapshot(snapshot);
        let Some((_, s)) = snaps.first() else {
            return Err(not_found(snapshot));
        };
        let pairs: Vec<_> = copies
            .iter()
            .filter_map(|(d, v)| {
                let (_, s) = snaps.iter().find(|(sd, _)| Arc::ptr_eq(sd, d))?;
                Some((d.clone(), v.clone(), s.clone()))
            })
            .collect();
        if s.uuid != v.uuid || pairs.len() != copies.len() {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!("snapshot {snapshot} was not taken of volume {volume}; a volume can only be reverted to one of its own snapshots"),
            ));
        }
        for (d, v, s) in &pairs {
            d.revert(v, s).await.map_err(internal)?;
        }
        tracing::info!(volume = %volume, snapshot = %snapshot, "reverted a volume to a snapshot");
        Ok(self.status(&copies))
    }
}
