//! Snapshots and clones in cluster mode, where a volume's replicas live on several nodes.
//!
//! - **Taking one.** A snapshot is taken by the node that holds the volume's attachment,
//!   under its nexus's write barrier: new writes wait, the ones in flight finish, every
//!   healthy replica is flushed and then snapshotted where it lives (a `Snapshot` request on
//!   the child's own registered connection, fenced by the attachment's epoch like a write),
//!   and the writes go on. A node asked for a snapshot of a volume another node holds asks
//!   that node (`TakeSnapshot`, authorized by its intent in the store); one that nobody holds
//!   is taken by the asking node for the time of the snapshot ([`Cluster::open_internal`]):
//!   that attachment fences any older writer and reconciles the replicas first, so the
//!   copies agree even where the last writer died mid-write.
//! - **The record.** The name is reserved in the store first (a [`SnapshotRecord`] with no
//!   nodes yet, which listings skip); the node that took the snapshot records the nodes that
//!   hold a copy. A copy is on the same pool device as its volume's replica there, since it
//!   shares its extents.
//! - **Clones** are made on every node that holds a copy of the snapshot (the clone shares
//!   its extents, so its replicas live there too), each authorized by an intent, all or
//!   nothing. A copy of a volume goes through a snapshot that is deleted once the clone is
//!   made (the engine keeps what the clone reads).
//! - **Revert** takes the volume for the time of the revert (so it must be detached) and
//!   reverts every healthy replica that holds the snapshot. A healthy replica that does not
//!   (it was out of sync when the snapshot was taken, or it replaced one since) is ejected,
//!   and every replica that is not healthy is marked for a full rebuild: its data since the
//!   snapshot must not survive a delta rebuild from the reverted ones.
//! - **Delete** marks the record, deletes every copy on the live nodes (each by intent) and
//!   then the record. A node that is down keeps the record, marked, until it comes back and
//!   deletes its copy ([`Cluster::collect_orphans`]).

use std::sync::{Arc, Weak};
use std::time::Instant;

use api::{
    ControlError, ErrorKind, SnapshotStatus, VolumeName, VolumeSource, VolumeSpec, VolumeStatus,
};
use replication::device::Child;
use replication::nexus::Nexus;
use replication::tls::Change;
use volume::device::BlockDevice;

use crate::control::{now_secs, store_error, Cluster};
use crate::model::{node_of, volume_key, ReplicaRecord, ReplicaState, VolumeRecord};
use crate::snapshots::{snapshot_key, SnapshotRecord};

/// How long a node waits for another to take a snapshot it asked for.
const TAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a snapshot is tried again when the volume's attachment moved meanwhile.
const ATTEMPTS: usize = 3;

fn not_found(name: &VolumeName) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("snapshot {name} does not exist (see `ballast snapshot list`)"),
    )
}

impl Cluster {
    /// The status of a snapshot from its record, with this node's copy's usage when it holds
    /// one (another node's copy is not asked).
    pub(crate) async fn recorded_status(&self, rec: &SnapshotRecord) -> SnapshotStatus {
        let local = VolumeName::new(&rec.name)
            .ok()
            .and_then(|n| self.storage.get_snapshot(&n).ok());
        let source_exists = matches!(
            self.volume(&rec.volume).await,
            Ok((v, _)) if v.id == rec.volume_id
        );
        SnapshotStatus {
            name: VolumeName::new(&rec.name)
                .unwrap_or_else(|_| VolumeName::new("unnamed").expect("a valid name")),
            source_volume: VolumeName::new(&rec.volume).ok(),
            source_exists,
            size_bytes: rec.size_bytes,
            created_at: rec.created_at,
            ready_to_use: true,
            exclusive_bytes: local.as_ref().map_or(0, |i| i.exclusive_bytes),
            shared_bytes: local.as_ref().map_or(0, |i| i.shared_bytes),
            replicas: u8::try_from(rec.nodes.len()).unwrap_or(u8::MAX),
        }
    }

    /// A snapshot's record, if it is complete (not reserved, not being deleted).
    async fn complete_record(&self, name: &VolumeName) -> Result<SnapshotRecord, ControlError> {
        match self.snapshot_record(name.as_str()).await? {
            Some(r) if !r.nodes.is_empty() && !r.deleting => Ok(r),
            _ => Err(not_found(name)),
        }
    }

    /// Cluster mode: see [`api::VolumeControl::create_snapshot`].
    pub(crate) async fn take_replicated_snapshot(
        self: &Arc<Self>,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<SnapshotStatus, ControlError> {
        let (vrec, _) = self.volume(volume.as_str()).await?;
        // Reserve the name.
        let reserved = SnapshotRecord {
            name: name.to_string(),
            volume: volume.to_string(),
            volume_id: vrec.id.clone(),
            created_at: now_secs(),
            size_bytes: vrec.size_bytes,
            nodes: Vec::new(),
            deleting: false,
        };
        let value = serde_json::to_vec(&reserved).expect("a snapshot record serializes");
        let key = snapshot_key(name.as_str());
        if !self
            .store
            .create(&key, &value, None)
            .await
            .map_err(store_error)?
        {
            let Some(existing) = self.snapshot_record(name.as_str()).await? else {
                return Err(ControlError::new(
                    ErrorKind::Unavailable,
                    format!("snapshot {name} is being deleted meanwhile; try again"),
                ));
            };
            if existing.volume_id != vrec.id {
                return Err(ControlError::new(
                    ErrorKind::Conflict,
                    format!(
                        "snapshot {name} already exists, of volume {}; choose another name",
                        existing.volume
                    ),
                ));
            }
            if existing.deleting {
                return Err(ControlError::new(
                    ErrorKind::Conflict,
                    format!("snapshot {name} is being deleted; choose another name"),
                ));
            }
            if !existing.nodes.is_empty() {
                return Ok(self.recorded_status(&existing).await);
            }
            // Reserved by a request that did not finish: finish it.
        }
        match self.take_where_attached(volume, name).await {
            Ok(()) => {}
            Err(e) => {
                // Free the name, unless the snapshot was recorded after all (an answer lost).
                if let Ok(Some(r)) = self.snapshot_record(name.as_str()).await {
                    if r.nodes.is_empty() {
                        if let Err(d) = self.store.delete(&key).await {
                            tracing::warn!(snapshot = %name, error = %d, "cannot free the name of a failed snapshot");
                        }
                    } else {
                        return Ok(self.recorded_status(&r).await);
                    }
                }
                return Err(e);
            }
        }
        let rec = self.complete_record(name).await.map_err(|_| {
            ControlError::new(
                ErrorKind::Internal,
                format!("snapshot {name} was taken but its record is gone"),
            )
        })?;
        Ok(self.recorded_status(&rec).await)
    }

    /// Have the node that holds `volume`'s attachment take snapshot `name` (this node, the
    /// holder, or this node for the time of the snapshot when nobody holds it).
    async fn take_where_attached(
        self: &Arc<Self>,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<(), ControlError> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let (vrec, _) = self.volume(volume.as_str()).await?;
            let holder = vrec.attachment.as_ref().map(|a| a.node.clone());
            let result = match &holder {
                Some(node) if *node == self.me.id => match self.nexus(volume.as_str()) {
                    Some(nexus) => self
                        .snapshot_under_barrier(&nexus, volume, name, &vrec)
                        .await
                        .map(drop),
                    None => Err(ControlError::new(
                        ErrorKind::Unavailable,
                        format!("volume {volume} is attached on this node but not served yet (the daemon is starting); try again"),
                    )),
                },
                Some(node) if self.is_live(node).await? => self.ask_holder(node, volume, name).await,
                _ => self.snapshot_detached(volume, name).await,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Tried again only if the attachment moved meanwhile.
                    let now = self.volume(volume.as_str()).await?.0;
                    let moved = now.attachment.as_ref().map(|a| (&a.node, a.epoch))
                        != vrec.attachment.as_ref().map(|a| (&a.node, a.epoch));
                    if !moved {
                        return Err(e);
                    }
                    tracing::info!(volume = %volume, snapshot = %name, error = %e.full_message(), "the volume's attachment moved during a snapshot; trying again");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("volume {volume} kept moving"),
            )
        }))
    }

    async fn is_live(&self, node: &str) -> Result<bool, ControlError> {
        Ok(self.nodes().await?.iter().any(|n| n.id == node))
    }

    /// Ask node `node`, which holds `volume`, to take snapshot `name`.
    async fn ask_holder(
        &self,
        node: &str,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<(), ControlError> {
        let nodes = self.nodes().await?;
        let addr = Self::node_addr(&nodes, node).ok_or_else(|| {
            ControlError::new(ErrorKind::Unavailable, format!("node {node} is not live"))
        })?;
        let mut opts = self.peer_options(node);
        opts.timeout = TAKE_TIMEOUT;
        let req = replication::wire::Request::TakeSnapshot {
            volume: volume.to_string(),
            name: name.to_string(),
        };
        self.with_intent(node, name, Change::TakeSnapshot, 0, async {
            crate::peer::ask(&addr, req, &opts).await
        })
        .await
        .map_err(|e| {
            ControlError::new(
                e.kind(),
                format!(
                    "node {node}, which holds volume {volume}, could not take snapshot {name}: {}",
                    e.full_message()
                ),
            )
        })
    }

    /// Take snapshot `name` of `volume`, which nobody holds, by holding it meanwhile.
    async fn snapshot_detached(
        self: &Arc<Self>,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<(), ControlError> {
        let (nexus, epoch, previous) = self.open_internal(volume).await?;
        let vrec = self.volume(volume.as_str()).await.map(|(r, _)| r);
        let result = match vrec {
            Ok(vrec) => self
                .snapshot_under_barrier(&nexus, volume, name, &vrec)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        self.release_internal(volume, &nexus, epoch, previous).await;
        result
    }

    /// This node holds `volume`: take snapshot `name` for a node that asked.
    pub(crate) async fn take_for_peer(
        &self,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<(), ControlError> {
        let (vrec, _) = self.volume(volume.as_str()).await?;
        let held = vrec
            .attachment
            .as_ref()
            .is_some_and(|a| a.node == self.me.id);
        let nexus = self
            .nexus(volume.as_str())
            .filter(|_| held)
            .ok_or_else(|| {
                ControlError::new(
                    ErrorKind::Unavailable,
                    format!("volume {volume} is not attached on node {}", self.me.id),
                )
            })?;
        self.snapshot_under_barrier(&nexus, volume, name, &vrec)
            .await
            .map(drop)
    }

    /// The barrier and the copies: hold `nexus`'s writes, flush, snapshot every healthy
    /// replica where it lives, let the writes go, and record which nodes hold a copy.
    async fn snapshot_under_barrier(
        &self,
        nexus: &Nexus<Child>,
        volume: &VolumeName,
        name: &VolumeName,
        vrec: &VolumeRecord,
    ) -> Result<SnapshotRecord, ControlError> {
        let started = Instant::now();
        let hold = nexus.hold_writes().await.map_err(|e| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("cannot flush volume {volume} for a snapshot"),
            )
            .with_source(e)
        })?;
        let mut nodes = Vec::new();
        let mut failures = Vec::new();
        // Every replica at once: the writes wait for the slowest, not for the sum.
        let children = nexus.healthy_devices();
        let taken = futures_util::future::join_all(children.iter().map(|(_, dev)| async move {
            match dev {
                Child::Local(_) => self.storage.create_snapshot(volume, name).await.map(drop),
                Child::Remote(r) => r
                    .snapshot(name.as_str(), false)
                    .await
                    .map_err(|e| ControlError::new(ErrorKind::Unavailable, e.to_string())),
            }
        }))
        .await;
        for ((id, _), took) in children.iter().zip(taken) {
            match took {
                Ok(()) => nodes.push(node_of(id).to_owned()),
                Err(e) => failures.push(format!("replica {id}: {}", e.full_message())),
            }
        }
        drop(hold);
        let pause_us = started.elapsed().as_micros() as u64;
        if nodes.is_empty() {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "no replica of volume {volume} could take snapshot {name}: {}",
                    failures.join("; ")
                ),
            ));
        }
        for f in &failures {
            tracing::warn!(volume = %volume, snapshot = %name, failure = %f, "a replica did not take the snapshot; the snapshot has one copy fewer");
        }
        tracing::info!(volume = %volume, snapshot = %name, pause_us, copies = nodes.len(), "writes paused for the snapshot");
        let rec = SnapshotRecord {
            name: name.to_string(),
            volume: volume.to_string(),
            volume_id: vrec.id.clone(),
            created_at: now_secs(),
            size_bytes: nexus.size(),
            nodes,
            deleting: false,
        };
        self.store
            .put_json(&snapshot_key(name.as_str()), &rec, None)
            .await
            .map_err(store_error)?;
        Ok(rec)
    }

    /// Cluster mode: see [`api::VolumeControl::list_snapshots`].
    pub(crate) async fn list_replicated_snapshots(
        &self,
    ) -> Result<Vec<SnapshotStatus>, ControlError> {
        let mut records = self.snapshot_records().await?;
        records.retain(|r| !r.nodes.is_empty() && !r.deleting);
        let mut out = Vec::with_capacity(records.len());
        for r in &records {
            out.push(self.recorded_status(r).await);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Cluster mode: see [`api::VolumeControl::get_snapshot`].
    pub(crate) async fn get_replicated_snapshot(
        &self,
        name: &VolumeName,
    ) -> Result<SnapshotStatus, ControlError> {
        let rec = self.complete_record(name).await?;
        Ok(self.recorded_status(&rec).await)
    }

    /// Cluster mode: see [`api::VolumeControl::delete_snapshot`].
    pub(crate) async fn delete_replicated_snapshot(
        &self,
        name: &VolumeName,
    ) -> Result<(), ControlError> {
        let key = snapshot_key(name.as_str());
        let Some(mut rec) = self.snapshot_record(name.as_str()).await? else {
            return Err(not_found(name));
        };
        if rec.nodes.is_empty() {
            // Only reserved: being taken (the taker records it once done), or the
            // reservation of a request that died, which is freed.
            if now_secs().saturating_sub(rec.created_at) < 2 * TAKE_TIMEOUT.as_secs() {
                return Err(ControlError::new(
                    ErrorKind::Unavailable,
                    format!("snapshot {name} is being taken; delete it once it is"),
                ));
            }
            return self.store.delete(&key).await.map_err(store_error);
        }
        if !rec.deleting {
            rec.deleting = true;
            self.store
                .put_json(&key, &rec, None)
                .await
                .map_err(store_error)?;
        }
        let nodes = self.nodes().await?;
        let mut left = Vec::new();
        let mut errors = Vec::new();
        for node in &rec.nodes {
            let done = if *node == self.me.id {
                match self.storage.delete_snapshot(name).await {
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            } else if let Some(addr) = Self::node_addr(&nodes, node) {
                let opts = self.peer_options(node);
                let req = replication::wire::Request::DeleteSnapshot {
                    name: name.to_string(),
                };
                self.with_intent(node, name, Change::DeleteSnapshot, 0, async {
                    crate::peer::ask(&addr, req, &opts).await
                })
                .await
            } else {
                tracing::warn!(snapshot = %name, node, "a node holding a copy of a deleted snapshot is down; it deletes its copy when it comes back");
                left.push(node.clone());
                continue;
            };
            if let Err(e) = done {
                errors.push(format!("node {node}: {}", e.full_message()));
                left.push(node.clone());
            }
        }
        if left.is_empty() {
            self.store.delete(&key).await.map_err(store_error)?;
        } else {
            rec.nodes = left;
            self.store
                .put_json(&key, &rec, None)
                .await
                .map_err(store_error)?;
        }
        if errors.is_empty() {
            tracing::info!(snapshot = %name, "deleted a snapshot");
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "snapshot {name} is deleted except where it could not be: {}; delete it again to finish",
                    errors.join("; ")
                ),
            ))
        }
    }

    /// Delete this node's copies of snapshots being deleted, or no longer recorded here (at
    /// start, after the node was away); a copy without any record is kept. Returns how many.
    pub(crate) async fn collect_snapshot_orphans(&self) -> Result<usize, ControlError> {
        let mut deleted = 0;
        for local in self.storage.list_snapshots() {
            let Some(mut rec) = self.snapshot_record(local.name.as_str()).await? else {
                continue;
            };
            let here = rec.nodes.contains(&self.me.id);
            if !rec.deleting && (here || rec.nodes.is_empty()) {
                continue;
            }
            match self.storage.delete_snapshot(&local.name).await {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(snapshot = %local.name, error = %e.full_message(), "cannot delete an orphan snapshot copy");
                    continue;
                }
            }
            if rec.deleting && here {
                rec.nodes.retain(|n| *n != self.me.id);
                let key = snapshot_key(local.name.as_str());
                let r = if rec.nodes.is_empty() {
                    self.store.delete(&key).await
                } else {
                    self.store.put_json(&key, &rec, None).await.map(drop)
                };
                if let Err(e) = r {
                    tracing::warn!(snapshot = %local.name, error = %e, "cannot record the deletion of a snapshot copy");
                }
            }
        }
        Ok(deleted)
    }

    /// Cluster mode: see [`api::VolumeControl::create_volume_from`].
    pub(crate) async fn create_replicated_copy(
        self: &Arc<Self>,
        spec: VolumeSpec,
        source: VolumeSource,
    ) -> Result<VolumeStatus, ControlError> {
        match source {
            VolumeSource::Snapshot(s) => self.clone_replicated(&spec, &s).await,
            VolumeSource::Volume(v) => {
                if let Ok((rec, _)) = self.volume(spec.name.as_str()).await {
                    return self.same_copy(&spec, &rec, None);
                }
                // Through a snapshot, deleted once the clone is made.
                let id = uuid::Uuid::new_v4().simple().to_string();
                let through = VolumeName::new(&format!("copy-{}", &id[..12]))?;
                self.take_replicated_snapshot(&v, &through).await?;
                let made = self.clone_replicated(&spec, &through).await;
                if let Err(e) = self.delete_replicated_snapshot(&through).await {
                    tracing::warn!(snapshot = %through, error = %e.full_message(), "cannot delete the snapshot a copy was made through");
                }
                made
            }
        }
    }

    /// An existing volume asked for as a copy again: its status if it has the size asked for
    /// (`size`, or `None`: any), else a conflict.
    fn same_copy(
        &self,
        spec: &VolumeSpec,
        rec: &VolumeRecord,
        size: Option<u64>,
    ) -> Result<VolumeStatus, ControlError> {
        let asked =
            size.or(
                (spec.size_bytes > 0).then(|| api::round_volume_size(spec.size_bytes).unwrap_or(0))
            );
        if asked.is_none_or(|s| s == rec.size_bytes) {
            return Ok(self.status(rec));
        }
        Err(ControlError::new(
            ErrorKind::Conflict,
            format!("volume {} already exists; choose another name", spec.name),
        ))
    }

    /// A new volume from snapshot `snapshot`: a clone on every node holding a copy of it,
    /// all or nothing, then its record.
    async fn clone_replicated(
        &self,
        spec: &VolumeSpec,
        snapshot: &VolumeName,
    ) -> Result<VolumeStatus, ControlError> {
        let snap = self.complete_record(snapshot).await?;
        let size = volume::pool::copy_size(
            &format!("snapshot {snapshot}"),
            snap.size_bytes,
            spec.size_bytes,
        )?;
        if usize::from(spec.replicas) > snap.nodes.len() {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a copy has its replicas where the snapshot's copies are (it shares their extents): at most {}; {} were asked",
                    snap.nodes.len(),
                    spec.replicas
                ),
            ));
        }
        if let Ok((rec, _)) = self.volume(spec.name.as_str()).await {
            return self.same_copy(spec, &rec, Some(size));
        }
        // On the nodes holding a copy that are up (one that is down may have been replaced
        // for good): as many as asked, or all of them.
        let nodes = self.nodes().await?;
        let live: Vec<&String> = snap
            .nodes
            .iter()
            .filter(|n| nodes.iter().any(|l| l.id == **n))
            .collect();
        let want = match spec.replicas {
            0 => live.len(),
            n => usize::from(n),
        };
        if want == 0 || live.len() < want {
            let down: Vec<&String> = snap.nodes.iter().filter(|n| !live.contains(n)).collect();
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "{want} replica(s) of a copy of snapshot {snapshot} need as many nodes holding it up; {} are (down: {down:?}); try again once they are back",
                    live.len()
                ),
            ));
        }
        let holders: Vec<String> = live.into_iter().take(want).cloned().collect();
        let mut made: Vec<&String> = Vec::new();
        for node in &holders {
            let done = if *node == self.me.id {
                self.storage
                    .clone_snapshot(snapshot, &spec.name, size)
                    .await
                    .map(drop)
            } else if let Some(addr) = Self::node_addr(&nodes, node) {
                let opts = self.peer_options(node);
                let req = replication::wire::Request::Clone {
                    snapshot: snapshot.to_string(),
                    volume: spec.name.to_string(),
                    size,
                };
                self.with_intent(node, &spec.name, Change::Clone, size, async {
                    crate::peer::ask(&addr, req, &opts).await
                })
                .await
            } else {
                Err(ControlError::new(
                    ErrorKind::Unavailable,
                    format!("node {node} is down"),
                ))
            };
            if let Err(e) = done {
                for n in made {
                    self.delete_replica(&nodes, n, &spec.name).await;
                }
                return Err(ControlError::new(
                    e.kind(),
                    format!(
                        "cannot make volume {} from snapshot {snapshot} on node {node}, which holds a copy of it: {}",
                        spec.name,
                        e.full_message()
                    ),
                ));
            }
            made.push(node);
        }
        let rec = VolumeRecord {
            name: spec.name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            size_bytes: size,
            replicas: u8::try_from(holders.len()).unwrap_or(u8::MAX),
            created_at: now_secs(),
            placement: holders.iter().map(|n| ReplicaRecord::healthy(n)).collect(),
            attachment: None,
            epoch: 0,
        };
        let value = serde_json::to_vec(&rec).expect("volume record serializes");
        if !self
            .store
            .create(&volume_key(spec.name.as_str()), &value, None)
            .await
            .map_err(store_error)?
        {
            // Made concurrently by the same request asked again: the clones are the same.
            let (won, _) = self.volume(spec.name.as_str()).await?;
            return self.same_copy(spec, &won, Some(size));
        }
        tracing::info!(volume = %spec.name, snapshot = %snapshot, replicas = ?holders, "created a replicated volume from a snapshot");
        Ok(self.status(&rec))
    }

    /// Cluster mode: see [`api::VolumeControl::revert_volume`]. The volume is detached (the
    /// caller checked).
    pub(crate) async fn revert_replicated(
        self: &Arc<Self>,
        name: &VolumeName,
        snapshot: &VolumeName,
    ) -> Result<VolumeStatus, ControlError> {
        let (rec, _) = self.volume(name.as_str()).await?;
        let snap = self.complete_record(snapshot).await?;
        if snap.volume_id != rec.id {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!("snapshot {snapshot} was not taken of volume {name}; a volume can only be reverted to one of its own snapshots"),
            ));
        }
        let holds = |node: &str| snap.nodes.iter().any(|n| n == node);
        if !rec
            .placement
            .iter()
            .any(|r| r.state == ReplicaState::Healthy && holds(&r.node))
        {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!("no healthy replica of volume {name} holds a copy of snapshot {snapshot} (they were replaced since it was taken)"),
            ));
        }
        let (nexus, epoch, previous) = self.open_internal(name).await?;
        let result = self
            .revert_under(&nexus, name, snapshot, &snap.nodes, epoch)
            .await;
        self.release_internal(name, &nexus, epoch, previous).await;
        result?;
        let (rec, _) = self.volume(name.as_str()).await?;
        tracing::info!(volume = %name, snapshot = %snapshot, "reverted a replicated volume to a snapshot");
        Ok(self.status(&rec))
    }

    async fn revert_under(
        &self,
        nexus: &Nexus<Child>,
        name: &VolumeName,
        snapshot: &VolumeName,
        holders: &[String],
        epoch: u64,
    ) -> Result<(), ControlError> {
        let mut reverted = 0;
        let mut eject = Vec::new();
        for (id, dev) in nexus.healthy_devices() {
            if !holders.iter().any(|n| n == node_of(&id)) {
                eject.push((
                    id,
                    format!(
                        "it holds no copy of snapshot {snapshot}, to which the volume was reverted"
                    ),
                ));
                continue;
            }
            let done = match &dev {
                Child::Local(_) => self.storage.revert_volume(name, snapshot).await.map(drop),
                Child::Remote(r) => r
                    .snapshot(snapshot.as_str(), true)
                    .await
                    .map_err(|e| ControlError::new(ErrorKind::Unavailable, e.to_string())),
            };
            match done {
                Ok(()) => reverted += 1,
                Err(e) => eject.push((
                    id,
                    format!(
                        "its revert to snapshot {snapshot} failed: {}",
                        e.full_message()
                    ),
                )),
            }
        }
        if reverted == 0 {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "no replica of volume {name} could be reverted: {}",
                    eject
                        .iter()
                        .map(|(id, why)| format!("{id}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
        let mut unrecorded = Vec::new();
        for (id, why) in &eject {
            if !nexus.eject_child(id, why).await {
                unrecorded.push(id.as_str());
            }
        }
        if !unrecorded.is_empty() {
            // Still recorded healthy, with newer data: the next attachment would reconcile
            // the reverted replicas back to it.
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {name} was reverted on some replicas, but {unrecorded:?}, not reverted, could not be recorded as out of sync; revert it again"
                ),
            ));
        }
        // Whatever is not healthy now copies everything when rebuilt: a delta from where it
        // stopped would keep what it holds from after the snapshot.
        let me = self.me.id.clone();
        self.update(name.as_str(), |rec| {
            if rec.attachment.as_ref().is_none_or(|a| a.node != me || a.epoch != epoch) {
                return Err(ControlError::new(
                    ErrorKind::Unavailable,
                    format!("volume {name} was taken over during its revert; its replicas may differ until it is attached"),
                ));
            }
            for r in &mut rec.placement {
                if r.state != ReplicaState::Healthy {
                    r.since = 0;
                }
            }
            Ok(())
        })
        .await
        .map(drop)
    }
}

impl Cluster {
    /// Give `target` (the replica `r` of `name`, about to be rebuilt from generation `since`,
    /// not yet a child of `nexus`: it takes no writes) the snapshots of the volume it lacks:
    /// those the store lists and does not record on its node (all of them, for a replacement;
    /// the ones taken while it was out, for one that comes back). In chain order, the target
    /// is brought to each one's data as a healthy replica holds it (a delta, as a rebuild
    /// plans it) and the snapshot is taken there and recorded. Returns the generation the
    /// target then holds every write up to: where the rebuild starts (`since` if nothing was
    /// missing).
    ///
    /// # Errors
    /// The source or the target failed, or the source's snapshots changed meanwhile (the
    /// rebuild then starts at `since`; the snapshots given so far are correct).
    pub(crate) async fn seed_snapshots(
        &self,
        nexus: &Nexus<Child>,
        name: &VolumeName,
        r: &ReplicaRecord,
        target: &Child,
        since: u64,
    ) -> Result<u64, ControlError> {
        use std::collections::BTreeMap;
        use volume::device::{ExtentGeneration, Generations, GENERATION_UNKNOWN};
        use volume::pool::format::EXTENT;
        let failed = |what: &str, e: volume::device::DeviceError| {
            ControlError::new(ErrorKind::Unavailable, format!("{what}: {e}"))
        };
        let sources = nexus.healthy_devices();
        let Some((source_id, source)) = sources
            .iter()
            .find(|(id, _)| node_of(id) == self.me.id)
            .or_else(|| sources.first())
        else {
            return Ok(since);
        };
        let chain = source
            .chain()
            .await
            .map_err(|e| failed("the source replica", e))?;
        let size = target.size();
        if chain.links.iter().any(|l| l.size != size) {
            // One older than a resize: its copy here would have another size.
            return Ok(since);
        }
        let (vrec, _) = self.volume(name.as_str()).await?;
        let records = self.snapshot_records().await?;
        let missing = |link: &volume::pool::ChainLink| -> Option<VolumeName> {
            let snapshot = link.name.clone().filter(|_| link.of_volume)?;
            records
                .iter()
                .any(|rec| {
                    rec.name == snapshot.as_str()
                        && rec.volume_id == vrec.id
                        && !rec.deleting
                        && !rec.nodes.is_empty()
                        && !rec.nodes.contains(&r.node)
                })
                .then_some(snapshot)
        };
        if !chain.links.iter().any(|l| missing(l).is_some()) {
            return Ok(since);
        }
        // Holders that stay recorded beside the new one: the volume's replicas' nodes and the
        // live ones. A node that is neither was replaced for good; its copy is now garbage,
        // deleted if it ever comes back (`collect_orphans`).
        let live = self.nodes().await?;
        let kept =
            |n: &str| vrec.placement.iter().any(|p| p.node == n) || live.iter().any(|l| l.id == n);
        let mut since = since;
        // The newest link that maps each extent so far, and its generation.
        let mut resolved: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
        let mut seeded = Vec::new();
        for (i, link) in chain.links.iter().enumerate() {
            for &(extent, generation) in &link.own {
                resolved.insert(extent, (i, generation));
            }
            let Some(snapshot) = missing(link) else {
                continue;
            };
            // Bring the target to this snapshot's data, as a rebuild would to the volume's.
            let wanted = Generations {
                extent_size: EXTENT,
                extents: resolved
                    .iter()
                    .map(|(&extent, &(_, generation))| ExtentGeneration { extent, generation })
                    .collect(),
            };
            let have = target
                .generations()
                .await
                .map_err(|e| failed("the new replica", e))?;
            // Every write up to this snapshot's newest generation is in it (it was taken at
            // a barrier after them): where the target is at or past that point, what it holds
            // up to there is the snapshot's, and what it took after must go.
            let newest = resolved
                .values()
                .map(|&(_, g)| g)
                .filter(|&g| g != GENERATION_UNKNOWN)
                .max()
                .unwrap_or(0);
            let have_gen = |extent: u64| {
                have.extents
                    .binary_search_by_key(&extent, |e| e.extent)
                    .ok()
                    .map(|i| have.extents[i].generation)
            };
            for step in replication::nexus::plan_rebuild(&wanted, &have, since.min(newest)) {
                match step {
                    replication::nexus::Step::Copy { extent, generation } => {
                        let (owner, _) = resolved[&extent];
                        let data = source
                            .read_link(chain.epoch, owner, extent)
                            .await
                            .map_err(|e| failed(&format!("replica {source_id}"), e))?;
                        let flags = volume::device::WriteFlags {
                            fua: false,
                            generation,
                        };
                        // A write keeps the higher of the extent's old and new generations:
                        // where the target's is higher, the extent is released first, as a
                        // rebuild does, so the copy records the snapshot's. (Not otherwise: a
                        // release of an extent a snapshot of the target maps stamps a new one.)
                        if have_gen(extent).is_some_and(|g| g > generation) {
                            target
                                .discard(extent * EXTENT, EXTENT)
                                .await
                                .map_err(|e| failed("the new replica", e))?;
                        }
                        target
                            .write(extent * EXTENT, data, flags)
                            .await
                            .map_err(|e| failed("the new replica", e.error))?;
                    }
                    replication::nexus::Step::Release { extent } => target
                        .discard(extent * EXTENT, EXTENT)
                        .await
                        .map_err(|e| failed("the new replica", e))?,
                }
            }
            target
                .flush()
                .await
                .map_err(|e| failed("the new replica", e))?;
            match target {
                Child::Local(_) => self
                    .storage
                    .create_snapshot(name, &snapshot)
                    .await
                    .map(drop)?,
                Child::Remote(remote) => remote
                    .snapshot(snapshot.as_str(), false)
                    .await
                    .map_err(|e| failed("the new replica", e))?,
            }
            self.add_holder(&snapshot, &r.node, &kept).await?;
            seeded.push(snapshot.to_string());
            // The target holds this snapshot's data now: every write up to its newest
            // generation, none after (an unknown one is newer than any: copied again).
            since = newest;
        }
        tracing::info!(volume = %name, replica = %r.id(), snapshots = ?seeded, from = since, "gave a replica the volume's snapshots it lacked");
        Ok(since)
    }

    /// Record that `node` holds a copy of snapshot `name`, and forget the holders `kept`
    /// refuses.
    async fn add_holder(
        &self,
        name: &VolumeName,
        node: &str,
        kept: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(), ControlError> {
        let key = snapshot_key(name.as_str());
        for _ in 0..crate::control::CAS_RETRIES {
            let Some(kv) = self.store.get(&key).await.map_err(store_error)? else {
                return Ok(());
            };
            let Ok(mut rec) = serde_json::from_slice::<SnapshotRecord>(&kv.value) else {
                return Ok(());
            };
            let before = rec.nodes.clone();
            rec.nodes.retain(|n| n == node || kept(n));
            if !rec.nodes.iter().any(|n| n == node) {
                rec.nodes.push(node.to_owned());
            }
            if rec.nodes == before {
                return Ok(());
            }
            let value = serde_json::to_vec(&rec).expect("a snapshot record serializes");
            if self
                .store
                .cas(&key, kv.mod_revision, &value)
                .await
                .map_err(store_error)?
            {
                return Ok(());
            }
        }
        Err(ControlError::new(
            ErrorKind::Unavailable,
            format!("snapshot {name} is being changed by others; try again"),
        ))
    }
}

/// The node's control plane as its replica server sees it (see
/// [`replication::server::Control`]).
#[derive(Debug)]
pub struct ServerControl(pub Weak<Cluster>);

impl replication::server::Control for ServerControl {
    fn take_snapshot<'a>(
        &'a self,
        volume: &'a VolumeName,
        name: &'a VolumeName,
    ) -> replication::server::ControlFuture<'a> {
        Box::pin(async move {
            let Some(cluster) = self.0.upgrade() else {
                return Err(ControlError::new(
                    ErrorKind::Unavailable,
                    "this node is stopping",
                ));
            };
            cluster.take_for_peer(volume, name).await
        })
    }
}
