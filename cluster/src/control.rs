//! Volumes over the cluster store, in cluster mode and in standalone mode alike.
//!
//! A node in cluster mode (`ballast daemon --etcd URL --listen ADDR`) registers itself in the
//! store under a lease ([`crate::model::NodeRecord`]), serves its replicas to peers over the
//! replica protocol, and implements [`VolumeControl`] over volume records in the store. A
//! standalone node ([`Mode::Standalone`]) is a one-node cluster over the embedded store whose
//! replicas sit on distinct pool devices (see [`crate::standalone`]); everything below holds
//! for it too, with "node" read as "pool device of this node":
//!
//! - **create** places the replicas ([`placement`]), creates each one on its node (this node
//!   through [`Storage`], the others through the replica protocol), then records the volume;
//! - **attach** ([`DeviceSource::open`]) takes the attachment by compare-and-swap: allowed when
//!   the volume is not attached, is attached here, its holder's lease has expired (its node
//!   record is gone), or `force` is set. It bumps the epoch, registers the epoch with every
//!   healthy replica before the first I/O (a replica that cannot be reached is ejected first),
//!   and returns a [`Nexus`] over them;
//! - the nexus's [`Ejector`] records ejections in the volume record by compare-and-swap, and
//!   only while this node still holds the attachment with the same epoch;
//! - **detach** releases the attachment;
//! - **resize** grows the volume online (see [`ClusterSource`]'s `resize_volume`): every
//!   replica that can be reached is checked, then grown where it lives, then the record's size
//!   changes, and the attached nexus (here, or on another node) follows it.
//!
//! A replica never serves fewer bytes than the record's size: one that missed a resize (its
//! node was down) is grown before a nexus uses it again, at attach, at a rebuild, or when the
//! attached nexus grows (one that cannot grow is ejected then).
//!
//! Invariant: at most one writer. The store hands out each epoch once, replicas reject older
//! epochs, and a node whose lease renewal fails stops its nexuses (see [`Cluster::fence_all`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::api::{
    format_size, round_volume_size, ControlError, ErrorKind, PlacementHints, PoolStatus,
    ReplicaStatus, SnapshotStatus, VolumeControl, VolumeName, VolumeSource, VolumeSpec,
    VolumeState, VolumeStatus, MAX_REPLICAS,
};
use replication::fence::FenceTable;
use replication::nexus::{ChildSpec, ChildState, EjectFuture, Ejector, Nexus, Resizable};
use replication::remote::{RemoteOptions, RemoteReplica};
use replication::tls::Change;
use volume::device::BlockDevice;
use volume::pool::Storage;

use crate::model::{
    node_key, node_of, volume_key, AttachmentRecord, NodeRecord, RebuildRecord, ReplicaRecord,
    ReplicaState, VolumeRecord, NODES, VOLUMES,
};
use crate::repair::RepairPolicy;
use crate::store::{Kv, Store, StoreError};
use crate::{peer, placement, repair};
use replication::device::{Child, DeviceSource, LocalChild, VolumeDevice};

/// How old a replica with no volume record must be before it is reported (a create records
/// its volume after making the replicas).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// Compare-and-swap retries before giving up on a contended record.
pub(crate) const CAS_RETRIES: usize = 20;

pub(crate) fn store_error(e: StoreError) -> ControlError {
    ControlError::new(ErrorKind::Unavailable, "the cluster store cannot be used").with_source(e)
}

pub(crate) fn decode_volume(kv: &Kv) -> Result<VolumeRecord, ControlError> {
    let corrupt = |why: String| {
        ControlError::new(
            ErrorKind::Internal,
            format!("volume record {} is corrupt: {why}", kv.key),
        )
    };
    let rec: VolumeRecord =
        serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
    VolumeName::new(&rec.name).map_err(|e| corrupt(e.to_string()))?;
    Ok(rec)
}

/// Where a node's volumes keep their replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On distinct nodes of a cluster (etcd), reached through the replica protocol.
    Cluster,
    /// On distinct pool devices of this one node (the embedded store): standalone mode, a
    /// one-node cluster whose replicas are keyed by (node, device).
    Standalone,
}

/// This node's attached nexuses by volume name, each with its attachment's epoch.
type NexusTable = HashMap<String, (Arc<Nexus<Child>>, u64)>;

/// This node's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) mode: Mode,
    pub(crate) store: Store,
    pub(crate) me: NodeRecord,
    pub(crate) storage: Arc<Storage>,
    pub(crate) fence: Arc<FenceTable>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) timeout: Duration,
    pub(crate) repair: RepairPolicy,
    /// The attached nexuses, each with its attachment's epoch.
    pub(crate) nexuses: Mutex<NexusTable>,
    /// The record of each volume attached here as its repair task last read it (about once a
    /// second): what `/metrics` reports, so a scrape asks the store nothing.
    views: Mutex<HashMap<String, VolumeRecord>>,
    /// Mutual TLS with the other nodes' replica servers; `None`: plaintext.
    tls: Option<Arc<replication::tls::Tls>>,
    /// Cluster mode: how long an attachment counts as confirmed after its record was read
    /// back (the node lease TTL); see [`Cluster::confirm_attachments`]. `None`: standalone,
    /// where no other node can take a volume over.
    attachment_ttl: Option<Duration>,
}

impl Cluster {
    /// This node in `store`: `me` describes it (capacity is refreshed by
    /// [`Cluster::record`]).
    pub fn new(
        mode: Mode,
        store: Store,
        me: NodeRecord,
        storage: Arc<Storage>,
        fence: Arc<FenceTable>,
        timeout: Duration,
        repair: RepairPolicy,
    ) -> Self {
        Self {
            mode,
            store,
            me,
            storage,
            fence,
            runtime: tokio::runtime::Handle::current(),
            timeout,
            repair,
            nexuses: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            tls: None,
            attachment_ttl: None,
        }
    }

    /// Confirm attachments for `ttl` (the node lease TTL) at a time; see
    /// [`Cluster::confirm_attachments`]. Cluster mode.
    #[must_use]
    pub fn with_attachment_ttl(mut self, ttl: Duration) -> Self {
        self.attachment_ttl = Some(ttl);
        self
    }

    /// Reach the other nodes' replica servers over mutual TLS with `tls`.
    #[must_use]
    pub fn with_tls(mut self, tls: Arc<replication::tls::Tls>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How to reach node `node`'s replica server.
    pub(crate) fn peer_options(&self, node: &str) -> RemoteOptions {
        RemoteOptions {
            timeout: self.timeout,
            node: self.me.id.clone(),
            tls: self.tls.clone().map(|t| (t, node.to_owned())),
        }
    }

    /// Keep this node's attachments confirmed, every `ttl / 3` (every `ttl / 30` after a
    /// failed round), until the task is dropped.
    ///
    /// Each round reads every volume record (one store call) and, for each nexus of this
    /// node: if its record still names this node at the nexus's epoch, the nexus may serve
    /// until the round's *send* time plus `ttl`; if another attachment replaced it, it is
    /// fenced at once. A node cut off from the store (or stopped) thus stops serving within
    /// `ttl`, and a node that takes a volume over from another waits `ttl` before its first
    /// I/O (see `open_async`): by then the old attachment can serve nothing, not even a read
    /// of its own stale replica.
    pub async fn confirm_attachments(self: Arc<Self>) {
        let Some(ttl) = self.attachment_ttl else {
            return;
        };
        // After a failed round, try again soon (as the lease renewal does): the next regular
        // round could fall after the deadline, and a short store outage must not cost the
        // attachment.
        let retry = (ttl / 30).max(Duration::from_millis(10));
        let mut pause = ttl / 3;
        loop {
            tokio::time::sleep(pause).await;
            pause = retry;
            let attached: Vec<(String, u64, Arc<Nexus<Child>>)> = self
                .nexus_table()
                .iter()
                .map(|(k, (n, epoch))| (k.clone(), *epoch, Arc::clone(n)))
                .collect();
            if attached.is_empty() {
                pause = ttl / 3;
                continue;
            }
            let sent = std::time::Instant::now();
            let records = match tokio::time::timeout(ttl, self.volume_records()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e.full_message(), "cannot confirm this node's attachments");
                    continue;
                }
                Err(_) => continue,
            };
            pause = ttl / 3;
            for (name, epoch, nexus) in attached {
                let current = records.iter().find(|r| r.name == name).is_some_and(|r| {
                    r.attachment
                        .as_ref()
                        .is_some_and(|a| a.node == self.me.id && a.epoch == epoch)
                });
                if current {
                    nexus.confirm_until(sent + ttl);
                } else if !nexus.is_fenced() {
                    tracing::warn!(volume = %name, epoch, "this node's attachment was replaced; fencing it");
                    nexus.fence();
                }
            }
        }
    }

    /// The attached nexuses. Each change is one map operation, so a panic elsewhere cannot
    /// leave the map half-changed: a poisoned lock is still safe to use (the rule of
    /// `ARCHITECTURE.md`, "Locks").
    fn nexus_table(&self) -> std::sync::MutexGuard<'_, NexusTable> {
        self.nexuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether replicas live on other nodes or on this node's pool devices.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// This node's storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.me.id
    }

    /// This node's record with current capacity figures.
    pub async fn record(&self) -> NodeRecord {
        let mut me = self.me.clone();
        if let Ok(pools) = self.storage.list_pools().await {
            me.count_pools(&pools);
        }
        me
    }

    /// The live nodes, sorted by id.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        let kvs = self.store.list(NODES).await.map_err(store_error)?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    pub(crate) async fn volume(&self, name: &str) -> Result<(VolumeRecord, u64), ControlError> {
        match self
            .store
            .get(&volume_key(name))
            .await
            .map_err(store_error)?
        {
            Some(kv) => Ok((decode_volume(&kv)?, kv.mod_revision)),
            None => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("volume {name} not found"),
            )),
        }
    }

    /// Apply `change` to the volume record by compare-and-swap, retrying on contention.
    /// `change` returns `Err` to abort.
    pub(crate) async fn update<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&mut VolumeRecord) -> Result<T, ControlError>,
    ) -> Result<(VolumeRecord, T), ControlError> {
        for _ in 0..CAS_RETRIES {
            let (mut rec, rev) = self.volume(name).await?;
            let out = change(&mut rec)?;
            let value = serde_json::to_vec(&rec).expect("volume record serializes");
            if self
                .store
                .cas(&volume_key(name), rev, &value)
                .await
                .map_err(store_error)?
            {
                return Ok((rec, out));
            }
        }
        Err(ControlError::new(
            ErrorKind::Unavailable,
            format!("volume {name} is being changed by others; try again"),
        ))
    }

    pub(crate) fn node_addr(nodes: &[NodeRecord], id: &str) -> Option<String> {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.replica_addr.clone())
    }

    pub(crate) async fn create_replica(
        &self,
        nodes: &[NodeRecord],
        node: &str,
        name: &VolumeName,
        size: u64,
    ) -> Result<(), ControlError> {
        if node == self.me.id {
            let spec = VolumeSpec {
                name: name.clone(),
                size_bytes: size,
                replicas: 1,
            };
            return self.storage.create_volume(spec).await.map(drop);
        }
        let addr = Self::node_addr(nodes, node).ok_or_else(|| {
            ControlError::new(ErrorKind::Unavailable, format!("node {node} is not live"))
        })?;
        let opts = self.peer_options(node);
        self.with_intent(node, name, Change::Create, size, async {
            peer::create(&addr, name.as_str(), size, &opts).await
        })
        .await
    }

    /// Record in the store this node's intent to make `change` (to `size` bytes) to the
    /// replica of `name` on `node`, which that node's replica server checks before it obeys;
    /// run `ask`; then delete the intent, whatever the answer.
    pub(crate) async fn with_intent<T>(
        &self,
        node: &str,
        name: &VolumeName,
        change: Change,
        size: u64,
        ask: impl std::future::Future<Output = Result<T, ControlError>>,
    ) -> Result<T, ControlError> {
        let key = crate::model::change_intent_key(change, name.as_str(), node);
        let intent = crate::model::IntentRecord {
            by: self.me.id.clone(),
            change,
            size_bytes: size,
            at: now_secs(),
        };
        self.store
            .put_json(&key, &intent, None)
            .await
            .map_err(store_error)?;
        let answer = ask.await;
        if let Err(e) = self.store.delete(&key).await {
            // It expires anyway (IntentRecord::TTL), and only ever authorized this change.
            tracing::debug!(volume = %name, node, error = %e, "cannot delete an intent");
        }
        answer
    }

    /// Grow the replica of `name` on `node` to at least `size` bytes where it lives (this
    /// node through its [`Storage`], another through the replica protocol), or with `dry_run`
    /// only check that its pool device can hold them. Idempotent.
    async fn resize_replica(
        &self,
        nodes: &[NodeRecord],
        node: &str,
        name: &VolumeName,
        size: u64,
        dry_run: bool,
    ) -> Result<(), ControlError> {
        if node == self.me.id {
            return replication::server::resize_replica(&self.storage, name, size, dry_run)
                .await
                .map(drop);
        }
        let addr = Self::node_addr(nodes, node).ok_or_else(|| {
            ControlError::new(ErrorKind::Unavailable, format!("node {node} is not live"))
        })?;
        let opts = self.peer_options(node);
        let ask = peer::resize(&addr, name.as_str(), size, dry_run, &opts);
        if dry_run {
            // Only a check: it changes nothing, so it needs no intent.
            return ask.await;
        }
        self.with_intent(node, name, Change::Resize, size, ask)
            .await
    }

    /// Make `child` (the replica on `node`) hold at least `size` bytes: grow its replica
    /// where it lives if it is smaller, and have the handle learn the new size.
    pub(crate) async fn fit_child(
        &self,
        nodes: &[NodeRecord],
        node: &str,
        name: &VolumeName,
        child: &Child,
        size: u64,
    ) -> Result<(), ControlError> {
        if child.size() >= size {
            return Ok(());
        }
        self.resize_replica(nodes, node, name, size, false).await?;
        let have = child.refresh_size().await.map_err(|e| {
            ControlError::new(ErrorKind::Unavailable, format!("replica on {node}")).with_source(e)
        })?;
        if have < size {
            return Err(ControlError::new(
                ErrorKind::Internal,
                format!("the replica on {node} shows {have} bytes after growing to {size}"),
            ));
        }
        tracing::info!(volume = %name, node, size, "grew a replica that had missed a resize");
        Ok(())
    }

    /// Grow this node's `nexus` of `name` to `size` bytes (no-op when it is that big): grow
    /// the replicas of its children where they live, then the nexus, which ejects any child
    /// that still does not show the size.
    pub(crate) async fn grow_nexus(
        &self,
        nexus: &Nexus<Child>,
        name: &VolumeName,
        size: u64,
    ) -> Result<u64, ControlError> {
        if nexus.size() >= size {
            return Ok(nexus.size());
        }
        let nodes = self.nodes().await?;
        for (id, state) in nexus.children() {
            if !state.writable() {
                continue;
            }
            if let Err(e) = self
                .resize_replica(&nodes, node_of(&id), name, size, false)
                .await
            {
                tracing::warn!(volume = %name, node = %id, error = %e.full_message(), "cannot grow a replica of an attached volume; it will be ejected");
            }
        }
        let grown = nexus.grow(size).await.map_err(|e| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("cannot grow the attached device of volume {name}"),
            )
            .with_source(e)
        })?;
        tracing::info!(volume = %name, size = grown, "the attached replicated volume serves its new size");
        Ok(grown)
    }

    /// If `name` is attached on this node, make its nexus serve the size the volume record
    /// holds (a resize made on any node changes only the record and the replicas) and return
    /// that size; `None` when it is not attached here. The repair task does the same about
    /// once a second; this is for callers that must see the new size now (the CSI node's
    /// expand, before the attached device is refreshed).
    ///
    /// # Errors
    /// The store cannot be read, or the nexus cannot grow.
    pub async fn sync_size(&self, name: &VolumeName) -> Result<Option<u64>, ControlError> {
        let Some(nexus) = self.nexus(name.as_str()) else {
            return Ok(None);
        };
        let (rec, _) = self.volume(name.as_str()).await?;
        self.grow_nexus(&nexus, name, rec.size_bytes)
            .await
            .map(Some)
    }

    pub(crate) async fn delete_replica(&self, nodes: &[NodeRecord], node: &str, name: &VolumeName) {
        let r = if node == self.me.id {
            match self.storage.delete_volume(name).await {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                r => r,
            }
        } else if let Some(addr) = Self::node_addr(nodes, node) {
            peer::delete(&addr, name.as_str(), &self.peer_options(node)).await
        } else {
            Ok(()) // a dead node's replica is garbage; its node removes orphans later
        };
        if let Err(e) = r {
            tracing::warn!(volume = %name, node, error = %e.full_message(), "cannot delete a replica");
        }
    }

    pub(crate) fn status(&self, rec: &VolumeRecord) -> VolumeStatus {
        // Allocation of the replicas on this node, by pool device.
        let replicas = VolumeName::new(&rec.name)
            .ok()
            .and_then(|n| self.storage.replicas(&n).ok())
            .unwrap_or_default();
        let local: Vec<(String, u64)> = replicas
            .iter()
            .map(|c| (c.pool_id.clone(), c.replica.allocated_bytes()))
            .collect();
        let shared = replicas
            .iter()
            .map(|c| c.replica.shared_bytes())
            .max()
            .unwrap_or(0);
        let allocated = |r: &ReplicaRecord| {
            if r.node != self.me.id {
                return 0;
            }
            match &r.device {
                Some(d) => local.iter().find(|(p, _)| p == d).map_or(0, |(_, a)| *a),
                None => local.first().map_or(0, |(_, a)| *a),
            }
        };
        let local_allocated = local.iter().map(|(_, a)| *a).max().unwrap_or(0);
        // A replica recorded on a pool device of this node that is not there (the daemon
        // started without it) cannot serve, whatever the record says.
        let state = |r: &ReplicaRecord| match &r.device {
            Some(d) if r.node == self.me.id && !local.iter().any(|(p, _)| p == d) => {
                if r.state == ReplicaState::Healthy {
                    "missing"
                } else {
                    r.state.as_str()
                }
            }
            _ => r.state.as_str(),
        };
        let healthy = rec
            .placement
            .iter()
            .filter(|r| state(r) == ReplicaState::Healthy.as_str())
            .count();
        let volume_state = if healthy == 0 {
            VolumeState::Faulted
        } else if healthy < usize::from(rec.replicas) {
            VolumeState::Degraded
        } else {
            VolumeState::Online
        };
        VolumeStatus {
            id: rec.id.clone(),
            name: VolumeName::new(&rec.name).expect("recorded names are valid"),
            size_bytes: rec.size_bytes,
            replicas: rec.replicas,
            allocated_bytes: local_allocated,
            shared_bytes: shared,
            state: volume_state,
            created_at: rec.created_at,
            replica_status: rec
                .placement
                .iter()
                .map(|r| ReplicaStatus {
                    node_id: r.node.clone(),
                    pool_id: r.device.clone().unwrap_or_default(),
                    allocated_bytes: allocated(r),
                    state: state(r).to_owned(),
                    rebuild: r.rebuild.as_ref().map(RebuildRecord::status),
                    last_rebuild: r.last_rebuild.as_ref().map(RebuildRecord::status),
                })
                .collect(),
        }
    }

    /// Take the attachment of `name` for this node; the record (with the new epoch) and the
    /// attachment it replaced.
    async fn take_attachment(
        &self,
        name: &VolumeName,
        force: bool,
    ) -> Result<(VolumeRecord, Option<AttachmentRecord>), ControlError> {
        let live: Vec<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let me = self.me.id.clone();
        let (rec, previous) = self
            .update(name.as_str(), |rec| {
                if let Some(a) = &rec.attachment {
                    let holder_live = live.contains(&a.node);
                    if a.node != me && holder_live && !force {
                        return Err(ControlError::new(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "volume {} is attached on node {}, which is alive; detach it \
                                 there, wait for that node's lease to expire, or attach with \
                                 --force to take it over (the old writer is fenced)",
                                rec.name, a.node
                            ),
                        ));
                    }
                }
                if rec.healthy() == 0 {
                    return Err(ControlError::new(
                        ErrorKind::Unavailable,
                        format!("volume {} has no healthy replica", rec.name),
                    ));
                }
                rec.epoch += 1;
                let previous = rec.attachment.replace(AttachmentRecord {
                    node: me.clone(),
                    epoch: rec.epoch,
                });
                Ok(previous)
            })
            .await?;
        Ok((rec, previous))
    }

    async fn open_async(
        self: &Arc<Self>,
        name: &VolumeName,
        force: bool,
    ) -> Result<VolumeDevice, ControlError> {
        let (rec, previous) = self.take_attachment(name, force).await?;
        if let (Some(ttl), Some(p)) = (self.attachment_ttl, &previous) {
            if p.node != self.me.id {
                // Taken from another node, which may be stopped or cut off rather than dead:
                // it stops serving (reads of its own replica included) within one TTL of its
                // last confirmation, which was before this record changed. Wait that out.
                tracing::info!(volume = %name, from = %p.node, wait = ?ttl, "taking the volume over; waiting for the old attachment to expire");
                tokio::time::sleep(ttl).await;
            }
        }
        let opened = self.open_taken(name, &rec, false).await;
        if opened.is_err() {
            // Do not keep an attachment this node cannot serve, and give the volume back to
            // the node that held it: a takeover that failed (say, its only healthy replica is
            // on the old node, which is only slow) must not leave the old writer, which may
            // well go on, recorded as detached, for any node to attach without `--force`.
            self.release_to(name, rec.epoch, previous).await;
        }
        opened
    }

    /// Take the attachment of `name` for an operation of this node's control plane (a
    /// snapshot or a revert of a volume no node holds): a nexus over its healthy replicas,
    /// reconciled and fencing any older writer, that serves nothing else, has no repair task
    /// and is not in the nexus table. Give it back with [`Cluster::release_internal`].
    pub(crate) async fn open_internal(
        self: &Arc<Self>,
        name: &VolumeName,
    ) -> Result<(Arc<Nexus<Child>>, u64, Option<AttachmentRecord>), ControlError> {
        let (rec, previous) = self.take_attachment(name, false).await?;
        if let (Some(ttl), Some(p)) = (self.attachment_ttl, &previous) {
            if p.node != self.me.id {
                // As in `open_async`: the old holder's lease expired; its nexus stops within
                // one TTL of its last confirmation.
                tokio::time::sleep(ttl).await;
            }
        }
        match self.open_taken(name, &rec, true).await {
            Ok(VolumeDevice::Replicated(nexus)) => Ok((nexus, rec.epoch, previous)),
            Ok(VolumeDevice::Local(_)) => {
                self.release_to(name, rec.epoch, previous).await;
                Err(ControlError::new(
                    ErrorKind::Internal,
                    format!("volume {name} has no replicated device in cluster mode"),
                ))
            }
            Err(e) => {
                self.release_to(name, rec.epoch, previous).await;
                Err(e)
            }
        }
    }

    /// Give back an attachment [`Cluster::open_internal`] took: the nexus stops and the
    /// attachment it replaced (if any) is recorded again.
    pub(crate) async fn release_internal(
        &self,
        name: &VolumeName,
        nexus: &Nexus<Child>,
        epoch: u64,
        previous: Option<AttachmentRecord>,
    ) {
        nexus.fence();
        self.release_to(name, epoch, previous).await;
    }

    async fn open_taken(
        self: &Arc<Self>,
        name: &VolumeName,
        rec: &VolumeRecord,
        internal: bool,
    ) -> Result<VolumeDevice, ControlError> {
        let epoch = rec.epoch;
        if self.mode == Mode::Standalone && rec.replicas == 1 {
            // One replica on this node: served directly, nobody else can write it.
            return self.storage.replica(name).map(VolumeDevice::Local);
        }
        let nodes = self.nodes().await?;
        let mut children = Vec::new();
        let mut unreachable = Vec::new();
        for r in rec
            .placement
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
        {
            let opened = match self.open_child(&nodes, r, name, epoch).await {
                // A replica that missed a resize grows before it serves.
                Ok(child) => self
                    .fit_child(&nodes, &r.node, name, &child, rec.size_bytes)
                    .await
                    .map(|()| child),
                Err(e) => Err(e),
            };
            match opened {
                Ok(child) => children.push(ChildSpec {
                    id: r.id(),
                    local: r.node == self.me.id,
                    dev: child,
                    state: ChildState::Healthy,
                }),
                Err(e) => {
                    tracing::warn!(volume = %name, replica = %r.id(), error = %e.full_message(), "replica unreachable at attach");
                    unreachable.push(r.id());
                }
            }
        }
        if children.is_empty() {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!("no healthy replica of volume {name} can be reached"),
            ));
        }
        // Eject unreachable replicas before the first I/O, so no write skips them silently.
        if !unreachable.is_empty() {
            let me = self.me.id.clone();
            self.update(name.as_str(), |rec| {
                if rec
                    .attachment
                    .as_ref()
                    .is_none_or(|a| a.node != me || a.epoch != epoch)
                {
                    return Err(ControlError::new(
                        ErrorKind::FailedPrecondition,
                        format!("volume {name} was taken over during attach"),
                    ));
                }
                for r in &mut rec.placement {
                    if unreachable.contains(&r.id()) {
                        r.state = ReplicaState::Ejected;
                    }
                }
                Ok(())
            })
            .await?;
        }
        let ejector = Arc::new(StoreEjector {
            cluster: Arc::clone(self),
            volume: name.to_string(),
            epoch,
        });
        // The record's size, not the children's: a resize that stopped before recording its
        // size may have grown them already.
        let nexus = Arc::new(Nexus::with_size(
            name.as_str(),
            children,
            ejector,
            rec.size_bytes,
        ));
        if let Some(ttl) = self.attachment_ttl {
            // Confirm the attachment now that its replicas are open (that took time).
            let sent = std::time::Instant::now();
            let (now, _) = self.volume(name.as_str()).await?;
            if now
                .attachment
                .as_ref()
                .is_none_or(|a| a.node != self.me.id || a.epoch != epoch)
            {
                return Err(ControlError::new(
                    ErrorKind::FailedPrecondition,
                    format!("volume {name} was taken over during attach"),
                ));
            }
            nexus.confirm_until(sent + ttl);
        }
        // Before the first I/O: the healthy replicas must agree where the last writer died
        // mid-write, and new generations must be above every one they hold.
        nexus.reconcile().await.map_err(|e| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("cannot reconcile the replicas of volume {name}"),
            )
            .with_source(e)
        })?;
        // Generations restart above the highest one the replicas hold, which a discard can
        // lower; an ejected replica's rebuild starts from its recorded point, so every new
        // write must be numbered above it too, or a delta would skip it.
        if let Some(floor) = rec.placement.iter().map(|r| r.since).max() {
            nexus.number_above(floor);
        }
        if internal {
            return Ok(VolumeDevice::Replicated(nexus));
        }
        self.nexus_table()
            .insert(name.to_string(), (Arc::clone(&nexus), epoch));
        tracing::info!(volume = %name, epoch, replicas = nexus.children().len(), "attached a replicated volume");
        tokio::spawn(repair::run(
            Arc::clone(self),
            name.clone(),
            epoch,
            Arc::downgrade(&nexus),
        ));
        Ok(VolumeDevice::Replicated(nexus))
    }

    pub(crate) async fn open_child(
        &self,
        nodes: &[NodeRecord],
        r: &ReplicaRecord,
        name: &VolumeName,
        epoch: u64,
    ) -> Result<Child, ControlError> {
        let node = r.node.as_str();
        if node == self.me.id {
            let replica = match &r.device {
                Some(device) => self
                    .storage
                    .replicas(name)?
                    .into_iter()
                    .find(|c| &c.pool_id == device)
                    .map(|c| c.replica)
                    .ok_or_else(|| {
                        ControlError::new(
                            ErrorKind::Unavailable,
                            format!("pool device {device} of volume {name}'s replica is missing"),
                        )
                    })?,
                None => self.storage.replica(name)?,
            };
            self.fence
                .register(name.as_str(), epoch)
                .await
                .map_err(|e| {
                    ControlError::new(
                        ErrorKind::FailedPrecondition,
                        format!("cannot register epoch {epoch} of volume {name} on this node"),
                    )
                    .with_source(e)
                })?;
            return Ok(Child::Local(LocalChild {
                replica,
                fence: Arc::clone(&self.fence),
                epoch,
            }));
        }
        let addr = Self::node_addr(nodes, node).ok_or_else(|| {
            ControlError::new(ErrorKind::Unavailable, format!("node {node} is not live"))
        })?;
        let addr = addr.parse().map_err(|e| {
            ControlError::new(
                ErrorKind::Internal,
                format!("node {node} has a bad address {addr}"),
            )
            .with_source(e)
        })?;
        let opts = self.peer_options(node);
        RemoteReplica::connect(addr, name.as_str(), epoch, opts)
            .await
            .map(Child::Remote)
            .map_err(|e| {
                ControlError::new(ErrorKind::Unavailable, format!("replica on {node}"))
                    .with_source(e)
            })
    }

    /// Undo this node's attachment of `name` at `epoch` (if it is still the recorded one):
    /// the attachment becomes `previous` again.
    async fn release_to(&self, name: &VolumeName, epoch: u64, previous: Option<AttachmentRecord>) {
        self.give_up(name, Some(epoch), previous).await;
    }

    async fn release_async(&self, name: &VolumeName) {
        self.give_up(name, None, None).await;
    }

    /// Stop this node's nexus of `name` and, if the record still names this node (at `epoch`,
    /// when given), record `then` as the attachment.
    async fn give_up(&self, name: &VolumeName, epoch: Option<u64>, then: Option<AttachmentRecord>) {
        // Nobody serves it any more: stop its repair task and any rebuild with it (only this
        // attachment's, when it is named: another may have replaced it on this node).
        let replaced = {
            let mut table = self.nexus_table();
            let other = table
                .get(name.as_str())
                .is_some_and(|(_, e)| epoch.is_some_and(|want| *e != want));
            if other {
                None
            } else {
                Some(table.remove(name.as_str()))
            }
        };
        if let Some(removed) = replaced {
            if let Some((nexus, _)) = removed {
                nexus.fence();
            }
            self.set_view(name.as_str(), None);
        }
        let me = self.me.id.clone();
        let r = self
            .update(name.as_str(), |rec| {
                let ours = rec
                    .attachment
                    .as_ref()
                    .is_some_and(|a| a.node == me && epoch.is_none_or(|e| a.epoch == e));
                if ours {
                    rec.attachment.clone_from(&then);
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(volume = %name, error = %e.full_message(), "cannot release the attachment");
        }
    }

    /// Stop every nexus of this node: its lease could not be renewed, so another node may
    /// take its volumes over.
    pub fn fence_all(&self) {
        for (n, _) in self.nexus_table().values() {
            n.fence();
        }
    }

    /// Every volume record in the store.
    ///
    /// # Errors
    /// The store cannot be read, or a record is corrupt.
    pub async fn volume_records(&self) -> Result<Vec<VolumeRecord>, ControlError> {
        let kvs = self.store.list(VOLUMES).await.map_err(store_error)?;
        kvs.iter().map(decode_volume).collect()
    }

    /// The records of the volumes attached here, as their repair tasks last read them from
    /// the store, sorted by name. Asks the store nothing.
    pub fn attached_views(&self) -> Vec<VolumeRecord> {
        let attached: Vec<String> = self.nexus_table().keys().cloned().collect();
        let views = self
            .views
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<VolumeRecord> = attached
            .iter()
            .filter_map(|name| views.get(name).cloned())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Keep `rec` as the latest view of a volume attached here (`None`: forget `name`).
    pub(crate) fn set_view(&self, name: &str, rec: Option<&VolumeRecord>) {
        let mut views = self
            .views
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match rec {
            Some(r) => {
                views.insert(name.to_owned(), r.clone());
            }
            None => {
                views.remove(name);
            }
        }
    }

    /// The counters of every nexus on this node, by volume name.
    pub fn nexus_stats(&self) -> Vec<(String, Arc<Nexus<Child>>)> {
        let mut v: Vec<_> = self
            .nexus_table()
            .iter()
            .map(|(k, (n, _))| (k.clone(), Arc::clone(n)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The nexus of an attached volume, for status.
    pub fn nexus(&self, name: &str) -> Option<Arc<Nexus<Child>>> {
        self.nexus_table().get(name).map(|(n, _)| Arc::clone(n))
    }

    /// Delete this node's replicas that their volume's record no longer places here: the
    /// replica of a node that was gone long enough to be replaced, found when it comes back.
    /// A replica whose volume has no record at all is kept (and reported once it is older
    /// than [`ORPHAN_GRACE`]): a store pointed at by mistake must not cost data. Cluster mode
    /// only; returns how many were deleted.
    ///
    /// # Errors
    /// The store or the storage cannot be read.
    pub async fn collect_orphans(&self) -> Result<usize, ControlError> {
        if self.mode != Mode::Cluster {
            return Ok(0);
        }
        let now = now_secs();
        let mut deleted = self.collect_snapshot_orphans().await?;
        for local in self.storage.list_volumes().await? {
            let orphan = match self.volume(local.name.as_str()).await {
                Ok((rec, _)) => !rec.placement.iter().any(|r| r.node == self.me.id),
                // No record at all: never deleted on that ground alone (a store pointed at
                // by mistake, or restored from an old backup, must not cost any data).
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if now.saturating_sub(local.created_at) > ORPHAN_GRACE.as_secs() {
                        tracing::warn!(volume = %local.name, "this node holds a replica of a volume the cluster store does not know; kept (delete it with `ballast volume delete` if it is garbage)");
                    }
                    false
                }
                Err(e) => return Err(e),
            };
            if !orphan {
                continue;
            }
            match self.storage.delete_volume(&local.name).await {
                Ok(()) => {
                    deleted += 1;
                    tracing::warn!(volume = %local.name, "deleted this node's replica of a volume that no longer places one here");
                }
                Err(e) => {
                    tracing::warn!(volume = %local.name, error = %e.full_message(), "cannot delete an orphan replica");
                }
            }
            if let Err(e) = self.fence.forget(local.name.as_str()) {
                tracing::warn!(volume = %local.name, error = %e, "cannot drop an orphan from the fence table");
            }
        }
        Ok(deleted)
    }

    /// Place a new volume's replicas on distinct nodes and create each one where it lives
    /// (all or nothing).
    async fn create_on_nodes(
        &self,
        spec: &VolumeSpec,
        size: u64,
        hints: &PlacementHints,
    ) -> Result<Vec<ReplicaRecord>, ControlError> {
        let nodes = self.nodes().await?;
        let placement = placement::place_with(&nodes, usize::from(spec.replicas), size, hints)
            .map_err(|e| {
                ControlError::new(ErrorKind::ResourceExhausted, "the volume cannot be placed")
                    .with_source(e)
            })?;
        for w in &placement.warnings {
            tracing::warn!(volume = %spec.name, "{w}");
        }
        let mut created: Vec<String> = Vec::new();
        for node in &placement.nodes {
            if let Err(e) = self.create_replica(&nodes, node, &spec.name, size).await {
                for done in &created {
                    self.delete_replica(&nodes, done, &spec.name).await;
                }
                return Err(ControlError::new(
                    e.kind(),
                    format!(
                        "cannot create a replica of {} on node {node}: {}",
                        spec.name,
                        e.full_message()
                    ),
                ));
            }
            created.push(node.clone());
        }
        Ok(placement
            .nodes
            .iter()
            .map(|n| ReplicaRecord::healthy(n))
            .collect())
    }

    /// Create a new volume's replicas on distinct pool devices of this node (the storage
    /// places them, all or nothing).
    async fn create_on_devices(
        &self,
        spec: &VolumeSpec,
        size: u64,
    ) -> Result<Vec<ReplicaRecord>, ControlError> {
        let status = self
            .storage
            .create_volume(VolumeSpec {
                size_bytes: size,
                ..spec.clone()
            })
            .await?;
        Ok(self.on_devices(&status))
    }

    /// The placement of a volume whose replicas this node's storage made (standalone).
    pub(crate) fn on_devices(&self, status: &VolumeStatus) -> Vec<ReplicaRecord> {
        status
            .replica_status
            .iter()
            .map(|r| ReplicaRecord::on_device(&self.me.id, &r.pool_id))
            .collect()
    }

    /// Steps 2 and 3 of a resize: check, then grow, every replica of `rec` that can be
    /// reached to `size` bytes.
    async fn grow_replicas(
        &self,
        name: &VolumeName,
        rec: &VolumeRecord,
        size: u64,
    ) -> Result<(), ControlError> {
        let nodes = self.nodes().await?;
        let mut reachable: Vec<&ReplicaRecord> = Vec::new();
        for r in &rec.placement {
            match self.resize_replica(&nodes, &r.node, name, size, true).await {
                Ok(()) => reachable.push(r),
                Err(e) if e.kind() == ErrorKind::ResourceExhausted => {
                    return Err(ControlError::new(
                        ErrorKind::ResourceExhausted,
                        format!(
                            "volume {name} cannot grow to {} on node {}: {}",
                            format_size(size),
                            r.node,
                            e.full_message()
                        ),
                    ));
                }
                Err(e) => {
                    tracing::warn!(volume = %name, node = %r.node, state = r.state.as_str(), error = %e.full_message(), "a replica cannot be reached for the resize; it grows before it serves again");
                }
            }
        }
        let mut grown_healthy = 0;
        for r in reachable {
            match self
                .resize_replica(&nodes, &r.node, name, size, false)
                .await
            {
                Ok(()) => {
                    if r.state == ReplicaState::Healthy {
                        grown_healthy += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, node = %r.node, error = %e.full_message(), "a replica did not grow; it grows before it serves again");
                }
            }
        }
        if grown_healthy == 0 {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {name} cannot grow: none of its healthy replicas can be reached; \
                     its size is unchanged"
                ),
            ));
        }
        tracing::info!(volume = %name, from = rec.size_bytes, to = size, "grew the replicas of a replicated volume");
        Ok(())
    }
}

/// Records ejections in the volume record while this node holds the attachment.
#[derive(Debug)]
struct StoreEjector {
    cluster: Arc<Cluster>,
    volume: String,
    epoch: u64,
}

impl Ejector for StoreEjector {
    fn eject<'a>(&'a self, child: &'a str, reason: &'a str, since: u64) -> EjectFuture<'a> {
        Box::pin(async move {
            let me = self.cluster.me.id.clone();
            self.cluster
                .update(&self.volume, |rec| {
                    if rec
                        .attachment
                        .as_ref()
                        .is_none_or(|a| a.node != me || a.epoch != self.epoch)
                    {
                        return Err(ControlError::new(
                            ErrorKind::FailedPrecondition,
                            "this node no longer holds the attachment",
                        ));
                    }
                    for r in rec.placement.iter_mut().filter(|r| r.id() == child) {
                        // A replica that was not in sync keeps the older starting point.
                        r.since = match r.state {
                            ReplicaState::Healthy => since,
                            _ => r.since.min(since),
                        };
                        r.state = ReplicaState::Ejected;
                        r.rebuild = None;
                    }
                    Ok(())
                })
                .await
                .map(drop)?;
            tracing::warn!(volume = %self.volume, replica = child, reason, since, "ejection recorded");
            Ok(())
        })
    }
}

/// The frontends' device source: volumes taken for this node through the store.
#[derive(Debug, Clone)]
pub struct ClusterSource(pub Arc<Cluster>);

impl DeviceSource for ClusterSource {
    fn open(&self, name: &VolumeName, force: bool) -> Result<VolumeDevice, ControlError> {
        let c = Arc::clone(&self.0);
        c.runtime.clone().block_on(c.open_async(name, force))
    }

    fn release(&self, name: &VolumeName) {
        let c = Arc::clone(&self.0);
        c.runtime.clone().block_on(c.release_async(name));
    }

    fn size(&self, name: &VolumeName) -> Result<u64, ControlError> {
        let c = Arc::clone(&self.0);
        if let Some(n) = c.nexus(name.as_str()) {
            return Ok(n.size());
        }
        c.runtime
            .clone()
            .block_on(c.volume(name.as_str()))
            .map(|(rec, _)| rec.size_bytes)
    }

    fn names(&self) -> Result<Vec<VolumeName>, ControlError> {
        let c = Arc::clone(&self.0);
        let records = c.runtime.clone().block_on(c.volume_records())?;
        Ok(records
            .into_iter()
            .filter_map(|r| VolumeName::new(&r.name).ok())
            .collect())
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VolumeControl for ClusterSource {
    async fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeStatus, ControlError> {
        self.create_volume_placed(spec, &PlacementHints::default())
            .await
    }

    async fn create_volume_placed(
        &self,
        spec: VolumeSpec,
        hints: &PlacementHints,
    ) -> Result<VolumeStatus, ControlError> {
        let c = &self.0;
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
        if let Ok((rec, _)) = c.volume(spec.name.as_str()).await {
            if rec.size_bytes == size && rec.replicas == spec.replicas {
                return Ok(c.status(&rec));
            }
            return Err(ControlError::new(
                ErrorKind::Conflict,
                format!(
                    "volume {} already exists with size {} and {} replica(s)",
                    rec.name,
                    ::api::format_size(rec.size_bytes),
                    rec.replicas
                ),
            ));
        }
        let placement = match c.mode {
            Mode::Cluster => c.create_on_nodes(&spec, size, hints).await?,
            Mode::Standalone => c.create_on_devices(&spec, size).await?,
        };
        let rec = VolumeRecord {
            name: spec.name.to_string(),
            id: uuid_like(),
            size_bytes: size,
            replicas: spec.replicas,
            created_at: now_secs(),
            placement,
            attachment: None,
            epoch: 0,
        };
        let value = serde_json::to_vec(&rec).expect("volume record serializes");
        let fresh = c
            .store
            .create(&volume_key(spec.name.as_str()), &value, None)
            .await
            .map_err(store_error)?;
        if !fresh {
            // Another request created it meanwhile. Replicas are named after the volume, so
            // the ones made here may be the winner's too: keep them, answer with its record.
            let (won, _) = c.volume(spec.name.as_str()).await?;
            if won.size_bytes == size && won.replicas == spec.replicas {
                return Ok(c.status(&won));
            }
            return Err(ControlError::new(
                ErrorKind::Conflict,
                format!(
                    "volume {} was created concurrently with a different spec",
                    spec.name
                ),
            ));
        }
        tracing::info!(volume = %spec.name, replicas = ?rec.placement.iter().map(ReplicaRecord::id).collect::<Vec<_>>(), "volume created");
        Ok(c.status(&rec))
    }

    async fn delete_volume(&self, name: &VolumeName) -> Result<(), ControlError> {
        let c = &self.0;
        let (rec, rev) = c.volume(name.as_str()).await?;
        if let Some(a) = &rec.attachment {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "volume {name} is attached on node {}; detach it first",
                    a.node
                ),
            ));
        }
        // Remove the record first (by revision, so a concurrent attach wins), then replicas.
        let tomb = serde_json::to_vec(&VolumeRecord {
            placement: Vec::new(),
            ..rec.clone()
        })
        .expect("volume record serializes");
        if !c
            .store
            .cas(&volume_key(name.as_str()), rev, &tomb)
            .await
            .map_err(store_error)?
        {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!("volume {name} changed during delete; try again"),
            ));
        }
        c.store
            .delete(&volume_key(name.as_str()))
            .await
            .map_err(store_error)?;
        // Intents left by an asker that died (they would expire anyway).
        let intents = format!("{}{name}/", crate::model::INTENTS);
        if let Err(e) = c.store.delete_prefix(&intents).await {
            tracing::debug!(volume = %name, error = %e, "cannot delete the volume's intents");
        }
        let nodes = c.nodes().await?;
        for r in &rec.placement {
            c.delete_replica(&nodes, &r.node, name).await;
        }
        if let Err(e) = c.fence.forget(name.as_str()) {
            tracing::warn!(volume = %name, error = %e, "cannot drop the volume from the fence table");
        }
        Ok(())
    }

    async fn get_volume(&self, name: &VolumeName) -> Result<VolumeStatus, ControlError> {
        let (rec, _) = self.0.volume(name.as_str()).await?;
        Ok(self.0.status(&rec))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
        let kvs = self.0.store.list(VOLUMES).await.map_err(store_error)?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            out.push(self.0.status(&decode_volume(kv)?));
        }
        Ok(out)
    }

    /// Grow a replicated volume, also while it is attached. In order:
    /// 1. refuse a shrink; the same size (after rounding) answers the status (and makes an
    ///    attached nexus here catch up, should an earlier resize have stopped before that);
    /// 2. check every replica on a live node (a dry run where it lives): a pool device that
    ///    cannot hold the new size refuses the whole resize before anything changes;
    /// 3. grow those replicas, each in its own node's storage (idempotent);
    /// 4. record the new size by compare-and-swap;
    /// 5. grow the nexus if the volume is attached here; a nexus on another node follows the
    ///    record within a repair interval, or at once when that node refreshes the device.
    ///
    /// A crash anywhere before 4 leaves the old size recorded and some replicas bigger, which
    /// is harmless (a nexus serves the record's size); resizing again finishes the job. A
    /// replica that could not be reached is skipped: it is grown before it serves again.
    async fn resize_volume(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        let c = &self.0;
        let (rec, _) = c.volume(name.as_str()).await?;
        let size = round_volume_size(new_size_bytes)?;
        if size < rec.size_bytes {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "volume {name} is {} and cannot shrink to {}; only growing is supported",
                    format_size(rec.size_bytes),
                    format_size(size)
                ),
            ));
        }
        if size == rec.size_bytes {
            if let Err(e) = c.sync_size(name).await {
                tracing::warn!(volume = %name, error = %e.full_message(), "the attached device does not serve the volume's size yet");
            }
            return Ok(c.status(&rec));
        }
        c.grow_replicas(name, &rec, size).await?;
        let (rec, ()) = c
            .update(name.as_str(), |rec| {
                rec.size_bytes = rec.size_bytes.max(size);
                Ok(())
            })
            .await?;
        if let Err(e) = c.sync_size(name).await {
            // The record holds the new size; the repair task and the next refresh retry.
            tracing::warn!(volume = %name, error = %e.full_message(), "the attached device does not serve the new size yet");
        }
        Ok(c.status(&rec))
    }

    async fn create_snapshot(
        &self,
        volume: &VolumeName,
        name: &VolumeName,
    ) -> Result<SnapshotStatus, ControlError> {
        self.0.create_snapshot(volume, name).await
    }

    async fn delete_snapshot(&self, name: &VolumeName) -> Result<(), ControlError> {
        self.0.delete_snapshot(name).await
    }

    async fn get_snapshot(&self, name: &VolumeName) -> Result<SnapshotStatus, ControlError> {
        self.0.get_snapshot(name).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotStatus>, ControlError> {
        self.0.list_snapshots().await
    }

    async fn create_volume_from(
        &self,
        spec: VolumeSpec,
        source: VolumeSource,
    ) -> Result<VolumeStatus, ControlError> {
        self.0.create_volume_from(spec, source).await
    }

    async fn revert_volume(
        &self,
        name: &VolumeName,
        snapshot: &VolumeName,
    ) -> Result<VolumeStatus, ControlError> {
        self.0.revert_volume(name, snapshot).await
    }

    async fn list_pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
        self.0.storage.list_pools().await
    }
}

/// A random version-4 UUID string.
fn uuid_like() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Keep this node's record (with its lease) current.
///
/// # Errors
/// The store cannot be written.
pub async fn publish_node(
    cluster: &Cluster,
    lease: crate::store::LeaseId,
) -> Result<(), StoreError> {
    let rec = cluster.record().await;
    let value = serde_json::to_vec(&rec).expect("node record serializes");
    cluster
        .store
        .put(&node_key(&rec.id), &value, Some(lease))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use volume::io::{probe, EngineKind};
    use volume::pool::{DeviceSpec, StorageConfig};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A standalone node over the embedded store in `dir`, with two pool devices.
    async fn standalone(dir: &Path) -> ClusterSource {
        let storage = Storage::open(StorageConfig {
            devices: (0..2)
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
        let me = NodeRecord {
            id: "unit".into(),
            replica_addr: String::new(),
            zone: None,
            capacity_bytes: 0,
            free_bytes: 0,
            version: String::new(),
        };
        let cluster = Cluster::new(
            Mode::Standalone,
            Store::embedded(&dir.join("store.json")).unwrap(),
            me,
            Arc::new(storage),
            Arc::new(FenceTable::open(dir.join("fence.json")).unwrap()),
            Duration::from_secs(2),
            RepairPolicy::default(),
        );
        ClusterSource(Arc::new(cluster))
    }

    /// A standalone node in a fresh directory with a two-replica volume `db`. Keep the
    /// directory until the end of the test.
    async fn with_volume() -> (tempfile::TempDir, Arc<ClusterSource>, VolumeName) {
        let base = std::env::var_os("BALLAST_TEST_DIR")
            .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
        let dir = tempfile::tempdir_in(base).unwrap();
        let source = Arc::new(standalone(dir.path()).await);
        let name = VolumeName::new("db").unwrap();
        source
            .create_volume(VolumeSpec {
                name: name.clone(),
                size_bytes: 8 * MIB,
                replicas: 2,
            })
            .await
            .unwrap();
        (dir, source, name)
    }

    /// Attach `name` as the attacher does (on a blocking thread); its nexus.
    async fn open(source: &Arc<ClusterSource>, name: &VolumeName) -> Arc<Nexus<Child>> {
        let (s, n) = (Arc::clone(source), name.clone());
        let dev = tokio::task::spawn_blocking(move || s.open(&n, false))
            .await
            .unwrap()
            .unwrap();
        let VolumeDevice::Replicated(nexus) = dev else {
            panic!("a two-replica volume opened without a nexus");
        };
        nexus
    }

    /// Detach `name` as the attacher does.
    async fn release(source: &Arc<ClusterSource>, name: &VolumeName) {
        let (s, n) = (Arc::clone(source), name.clone());
        tokio::task::spawn_blocking(move || s.release(&n))
            .await
            .unwrap();
    }

    /// A snapshot of an attached two-replica volume taken while writers write: both of its
    /// replicas hold the same blocks (the write barrier), and each block holds the write
    /// acknowledged to it before the snapshot was asked for, or a later one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_under_writes_is_the_same_on_every_replica() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use volume::device::WriteFlags;
        use volume::io::IoBuf;
        const BLOCKS: u64 = 2048; // the 8 MiB volume
        let block = |b: u64, tag: u64| {
            let mut v = vec![0u8; 4096];
            v[..8].copy_from_slice(&b.to_le_bytes());
            v[8..16].copy_from_slice(&tag.to_le_bytes());
            v
        };
        let (_dir, source, name) = with_volume().await;
        let nexus = open(&source, &name).await;
        // Per block, the newest tag acknowledged.
        let acked = Arc::new(Mutex::new(vec![0u64; BLOCKS as usize]));
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (nexus, acked, stop) = (nexus.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut tag = 0;
                while !stop.load(SeqCst) {
                    tag += 1;
                    let b = (tag * 7 + w * 509) % BLOCKS;
                    let data = IoBuf::from_slice(&block(b, tag * 4 + w));
                    nexus
                        .write(b * 4096, data, WriteFlags::default())
                        .await
                        .map_err(|e| e.error)
                        .unwrap();
                    let mut a = acked.lock().unwrap();
                    a[b as usize] = a[b as usize].max(tag * 4 + w);
                }
                tag
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = acked.lock().unwrap().clone();
        let snap = VolumeName::new("s1").unwrap();
        let st = source.create_snapshot(&name, &snap).await.unwrap();
        assert_eq!(st.replicas, 2);
        stop.store(true, SeqCst);
        let mut written = 0;
        for w in writers {
            written += w.await.unwrap();
        }
        assert!(written > 100, "the writers wrote {written} blocks only");
        let clone = VolumeName::new("copy").unwrap();
        source
            .create_volume_from(
                VolumeSpec {
                    name: clone.clone(),
                    size_bytes: 0,
                    replicas: 0,
                },
                ::api::VolumeSource::Snapshot(snap.clone()),
            )
            .await
            .unwrap();
        // It has the snapshot's two replicas; another count is refused, saying why.
        let e = source
            .create_volume_from(
                VolumeSpec {
                    name: VolumeName::new("one").unwrap(),
                    size_bytes: 0,
                    replicas: 1,
                },
                ::api::VolumeSource::Snapshot(snap),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("2 replica"), "{e}");
        let reps = source.0.storage.replicas(&clone).unwrap();
        assert_eq!(reps.len(), 2);
        let mut images = Vec::new();
        for r in &reps {
            images.push(
                r.replica
                    .read(0, IoBuf::zeroed((BLOCKS * 4096) as usize))
                    .await
                    .unwrap(),
            );
        }
        assert!(
            images[0][..] == images[1][..],
            "the snapshot's replicas differ"
        );
        for b in 0..BLOCKS as usize {
            let got = &images[0][b * 4096..(b + 1) * 4096];
            let tag = u64::from_le_bytes(got[8..16].try_into().unwrap());
            assert!(
                tag >= before[b],
                "block {b} holds write {tag}, older than {} acknowledged before the snapshot",
                before[b]
            );
            if tag > 0 {
                assert!(got == block(b as u64, tag), "block {b} is torn");
            }
        }
        drop(nexus);
        release(&source, &name).await;
    }

    /// New writes are numbered above every recorded ejection point, even when no extent
    /// holds a generation that high any more (discards free extents and their generations).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generations_start_above_recorded_ejection_points() {
        let (_dir, source, name) = with_volume().await;
        // A replica ejected (by an earlier attachment) at generation 1000; its extents were
        // discarded since, so nothing on the replicas is numbered that high.
        source
            .0
            .update("db", |rec| {
                rec.placement[1].state = ReplicaState::Ejected;
                rec.placement[1].since = 1000;
                Ok(())
            })
            .await
            .unwrap();
        let nexus = open(&source, &name).await;
        assert!(
            nexus.next_generation() > 1000,
            "new writes would be numbered {} and skipped by the delta from 1000",
            nexus.next_generation()
        );
        release(&source, &name).await;
        source.0.storage.close().await.unwrap();
    }

    /// Found by the seeded cluster fault runs (seed 10): a forced takeover that failed (its
    /// only healthy replica was on the stopped old node) left the volume recorded as detached,
    /// though the old node went on writing; any node could then attach it without `--force`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_attach_gives_the_volume_back_to_its_holder() {
        let (_dir, source, name) = with_volume().await;
        let held = AttachmentRecord {
            node: "other".into(),
            epoch: 7,
        };
        source
            .0
            .update("db", |rec| {
                rec.epoch = 7;
                rec.attachment = Some(held.clone());
                // Neither replica can be opened here.
                for r in &mut rec.placement {
                    r.device = Some("absent".into());
                }
                Ok(())
            })
            .await
            .unwrap();
        let (s, n) = (Arc::clone(&source), name.clone());
        let opened = tokio::task::spawn_blocking(move || s.open(&n, true))
            .await
            .unwrap();
        assert!(opened.is_err());
        let (rec, _) = source.0.volume("db").await.unwrap();
        assert_eq!(
            rec.attachment,
            Some(held),
            "the holder must keep the volume"
        );
        source.0.storage.close().await.unwrap();
    }

    /// Releasing a volume fences its nexus, so its repair task and any rebuild stop with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_nexus_is_fenced() {
        let (_dir, source, name) = with_volume().await;
        let nexus = open(&source, &name).await;
        assert!(!nexus.is_fenced());
        release(&source, &name).await;
        assert!(nexus.is_fenced(), "a released nexus must stop serving");
        let (rec, _) = source.0.volume("db").await.unwrap();
        assert!(rec.attachment.is_none());
        source.0.storage.close().await.unwrap();
    }
}
