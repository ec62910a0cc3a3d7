//! Snapshots and clones through the control plane.
//!
//! The engine (`volume::pool`, the pool devices of this node) holds each snapshot as a
//! snapshot record on every device that holds a replica of its volume. The store keeps a
//! [`SnapshotRecord`] per snapshot with what the engine does not: the name of the volume it was
//! taken of, which outlives the volume. Listing reads the engine and adds what the store knows.
//!
//! A snapshot of an attached volume is taken under its nexus's write barrier
//! ([`replication::nexus::Nexus::hold_writes`]): new writes wait, the ones in flight finish,
//! every replica is flushed and then snapshotted, and the writes go on. The pause is logged.
//!
//! In cluster mode, where a volume's replicas live on several nodes, see
//! [`crate::replicated_snapshots`].

use std::sync::Arc;
use std::time::Instant;

use api::{
    ControlError, ErrorKind, SnapshotStatus, VolumeName, VolumeSource, VolumeSpec, VolumeStatus,
};
use serde::{Deserialize, Serialize};

use crate::control::{now_secs, store_error, Cluster, Mode};
use crate::model::{volume_key, VolumeRecord};

/// The key prefix of snapshot records.
pub const SNAPSHOTS: &str = "/ballast/v1/snapshots/";

/// The key of snapshot `name`.
pub fn snapshot_key(name: &str) -> String {
    format!("{SNAPSHOTS}{name}")
}

/// What the store keeps of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot's name.
    pub name: String,
    /// The volume it was taken of.
    pub volume: String,
    /// That volume's id.
    pub volume_id: String,
    /// Seconds since the epoch when it was taken.
    pub created_at: u64,
    /// Its size in bytes (cluster mode).
    #[serde(default)]
    pub size_bytes: u64,
    /// Cluster mode: the nodes that hold a copy (none yet: the name is only reserved).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Cluster mode: being deleted; `nodes` still hold a copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl Cluster {
    pub(crate) async fn snapshot_record(
        &self,
        name: &str,
    ) -> Result<Option<SnapshotRecord>, ControlError> {
        Ok(self
            .store
            .get_json(&snapshot_key(name))
            .await
            .map_err(store_error)?
            .map(|v| v.value))
    }

    /// Every snapshot record in the store.
    pub(crate) async fn snapshot_records(&self) -> Result<Vec<SnapshotRecord>, ControlError> {
        Ok(self
            .store
            .list(SNAPSHOTS)
            .await
            .map_err(store_error)?
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    fn snapshot_status(
        info: &volume::pool::SnapshotInfo,
        rec: Option<&SnapshotRecord>,
    ) -> SnapshotStatus {
        let source = rec
            .and_then(|r| VolumeName::new(&r.volume).ok())
            .or_else(|| info.source.clone());
        SnapshotStatus {
            name: info.name.clone(),
            source_exists: info.source.is_some(),
            source_volume: source,
            size_bytes: info.size_bytes,
            created_at: info.created_at,
            ready_to_use: true,
            exclusive_bytes: info.exclusive_bytes,
            shared_bytes: info.shared_bytes,
            replicas: u8::try_from(info.replicas).unwrap_or(u8::MAX),
        }
    }

    /// See [`api::VolumeControl::create_snapshot`].
    pub(crate) async fn create_snapshot(
        self: &Arc<Self>,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<SnapshotStatus, ControlError> {
        if self.mode == Mode::Cluster {
            return self.take_replicated_snapshot(volume, name).await;
        }
        let (rec, _) = self.volume(volume.as_str()).await?;
        if let Some(existing) = self.snapshot_record(name.as_str()).await? {
            if existing.volume_id != rec.id {
                return Err(ControlError::new(
                    ErrorKind::Conflict,
                    format!(
                        "snapshot {name} already exists, of volume {}; choose another name",
                        existing.volume
                    ),
                ));
            }
        }
        let info = {
            // The barrier: held until every replica is snapshotted.
            let nexus = self.nexus(volume.as_str());
            let started = Instant::now();
            let _hold = match &nexus {
                Some(n) => Some(n.hold_writes().await.map_err(|e| {
                    ControlError::new(
                        ErrorKind::Unavailable,
                        format!("cannot flush volume {volume} for a snapshot"),
                    )
                    .with_source(e)
                })?),
                None => None,
            };
            let info = self.storage.create_snapshot(volume, name).await?;
            if nexus.is_some() {
                tracing::info!(volume = %volume, snapshot = %name, pause_us = started.elapsed().as_micros() as u64, "writes paused for the snapshot");
            }
            info
        };
        let record = SnapshotRecord {
            name: name.to_string(),
            volume: volume.to_string(),
            volume_id: rec.id.clone(),
            created_at: info.created_at,
            size_bytes: info.size_bytes,
            nodes: Vec::new(),
            deleting: false,
        };
        self.store
            .put_json(&snapshot_key(name.as_str()), &record, None)
            .await
            .map_err(store_error)?;
        Ok(Self::snapshot_status(&info, Some(&record)))
    }

    /// See [`api::VolumeControl::delete_snapshot`].
    pub(crate) async fn delete_snapshot(&self, name: &VolumeName) -> Result<(), ControlError> {
        if self.mode == Mode::Cluster {
            return self.delete_replicated_snapshot(name).await;
        }
        let known = self.snapshot_record(name.as_str()).await?.is_some();
        match self.storage.delete_snapshot(name).await {
            Ok(()) => {}
            // Deleted from the engine, not yet from the store (a crash in between).
            Err(e) if e.kind() == ErrorKind::NotFound && known => {}
            Err(e) => return Err(e),
        }
        self.store
            .delete(&snapshot_key(name.as_str()))
            .await
            .map_err(store_error)
    }

    /// See [`api::VolumeControl::get_snapshot`].
    pub(crate) async fn get_snapshot(
        &self,
        name: &VolumeName,
    ) -> Result<SnapshotStatus, ControlError> {
        if self.mode == Mode::Cluster {
            return self.get_replicated_snapshot(name).await;
        }
        let info = self.storage.get_snapshot(name)?;
        let rec = self.snapshot_record(name.as_str()).await?;
        Ok(Self::snapshot_status(&info, rec.as_ref()))
    }

    /// See [`api::VolumeControl::list_snapshots`].
    pub(crate) async fn list_snapshots(&self) -> Result<Vec<SnapshotStatus>, ControlError> {
        if self.mode == Mode::Cluster {
            return self.list_replicated_snapshots().await;
        }
        let records = self.snapshot_records().await?;
        Ok(self
            .storage
            .list_snapshots()
            .iter()
            .map(|info| {
                let rec = records.iter().find(|r| r.name == info.name.as_str());
                Self::snapshot_status(info, rec)
            })
            .collect())
    }

    /// See [`api::VolumeControl::create_volume_from`].
    pub(crate) async fn create_volume_from(
        self: &Arc<Self>,
        spec: VolumeSpec,
        source: VolumeSource,
    ) -> Result<VolumeStatus, ControlError> {
        if self.mode == Mode::Cluster {
            return self.create_replicated_copy(spec, source).await;
        }
        let replicas = match &source {
            VolumeSource::Snapshot(s) => self.storage.get_snapshot(s)?.replicas,
            VolumeSource::Volume(v) => self.volume(v.as_str()).await?.0.replicas.into(),
        };
        if spec.replicas != 0 && usize::from(spec.replicas) != replicas {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a copy keeps its source's {replicas} replica(s) (it shares their extents); {} were asked",
                    spec.replicas
                ),
            ));
        }
        let status = match &source {
            VolumeSource::Snapshot(s) => {
                self.storage
                    .clone_snapshot(s, &spec.name, spec.size_bytes)
                    .await?
            }
            VolumeSource::Volume(v) => {
                let nexus = self.nexus(v.as_str());
                let _hold = match &nexus {
                    Some(n) => Some(n.hold_writes().await.map_err(|e| {
                        ControlError::new(
                            ErrorKind::Unavailable,
                            format!("cannot flush volume {v} for a copy"),
                        )
                        .with_source(e)
                    })?),
                    None => None,
                };
                self.storage
                    .clone_volume(v, &spec.name, spec.size_bytes)
                    .await?
            }
        };
        let rec = VolumeRecord {
            name: spec.name.to_string(),
            id: status.id.clone(),
            size_bytes: status.size_bytes,
            replicas: status.replicas,
            created_at: now_secs(),
            placement: self.on_devices(&status),
            attachment: None,
            epoch: 0,
        };
        let value = serde_json::to_vec(&rec).expect("volume record serializes");
        // Already recorded: the same copy asked again (the storage answered with it).
        self.store
            .create(&volume_key(spec.name.as_str()), &value, None)
            .await
            .map_err(store_error)?;
        let (rec, _) = self.volume(spec.name.as_str()).await?;
        tracing::info!(volume = %spec.name, source = ?source, "created a volume from a copy");
        Ok(self.status(&rec))
    }

    /// See [`api::VolumeControl::revert_volume`].
    pub(crate) async fn revert_volume(
        self: &Arc<Self>,
        name: &VolumeName,
        snapshot: &VolumeName,
    ) -> Result<VolumeStatus, ControlError> {
        let (rec, _) = self.volume(name.as_str()).await?;
        if let Some(a) = &rec.attachment {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "volume {name} is attached on node {}; detach it before reverting it (its users would see their data change under them)",
                    a.node
                ),
            ));
        }
        if self.mode == Mode::Cluster {
            return self.revert_replicated(name, snapshot).await;
        }
        self.storage.revert_volume(name, snapshot).await?;
        Ok(self.status(&rec))
    }
}
