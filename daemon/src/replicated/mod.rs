//! Cluster mode: replicated volumes over the cluster store.
//!
//! A node in cluster mode (`ballast daemon --etcd URL --listen ADDR`) registers itself in the
//! store under a lease ([`model::NodeRecord`]), serves its replicas to peers over the replica
//! protocol, and implements [`VolumeControl`] over volume records in the store:
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
//! - **detach** releases the attachment.
//!
//! Invariant: at most one writer. The store hands out each epoch once, replicas reject older
//! epochs, and a node whose lease renewal fails stops its nexuses (see [`Cluster::fence_all`]).

pub mod device;
pub mod model;
pub mod peer;
pub mod placement;
mod repair;

pub use repair::RepairPolicy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use replication::fence::FenceTable;
use replication::nexus::{ChildSpec, ChildState, EjectFuture, Ejector, Nexus};
use replication::remote::{RemoteOptions, RemoteReplica};
use volume::api::{
    round_volume_size, ControlError, ErrorKind, PlacementHints, PoolStatus, ReplicaStatus,
    VolumeControl, VolumeName, VolumeSpec, VolumeState, VolumeStatus, MAX_REPLICAS,
};
use volume::pool::Storage;

use self::device::{Child, DeviceSource, VolumeDevice};
use self::model::{
    node_key, volume_key, AttachmentRecord, NodeRecord, RebuildRecord, ReplicaRecord, ReplicaState,
    VolumeRecord, NODES, VOLUMES,
};
use crate::cluster::{Kv, Store, StoreError};

/// Compare-and-swap retries before giving up on a contended record.
const CAS_RETRIES: usize = 20;

fn store_error(e: &StoreError) -> ControlError {
    ControlError::new(
        ErrorKind::Unavailable,
        format!("the cluster store cannot be used: {e}"),
    )
}

fn decode_volume(kv: &Kv) -> Result<VolumeRecord, ControlError> {
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

/// This node's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    store: Store,
    me: NodeRecord,
    storage: Arc<Storage>,
    fence: Arc<FenceTable>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    repair: RepairPolicy,
    nexuses: Mutex<HashMap<String, Arc<Nexus<Child>>>>,
}

impl Cluster {
    /// This node in `store`: `me` describes it (capacity is refreshed by
    /// [`Cluster::refresh`]).
    pub fn new(
        store: Store,
        me: NodeRecord,
        storage: Arc<Storage>,
        fence: Arc<FenceTable>,
        timeout: Duration,
        repair: RepairPolicy,
    ) -> Self {
        Self {
            store,
            me,
            storage,
            fence,
            runtime: tokio::runtime::Handle::current(),
            timeout,
            repair,
            nexuses: Mutex::new(HashMap::new()),
        }
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
            me.capacity_bytes = pools.iter().map(|p| p.capacity_bytes).sum();
            me.free_bytes = pools.iter().map(|p| p.free_bytes).sum();
        }
        me
    }

    /// The live nodes, sorted by id.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        let kvs = self.store.list(NODES).await.map_err(|e| store_error(&e))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    async fn volume(&self, name: &str) -> Result<(VolumeRecord, u64), ControlError> {
        match self
            .store
            .get(&volume_key(name))
            .await
            .map_err(|e| store_error(&e))?
        {
            Some(kv) => Ok((decode_volume(&kv)?, kv.mod_revision)),
            None => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("volume {name} does not exist"),
            )),
        }
    }

    /// Apply `change` to the volume record by compare-and-swap, retrying on contention.
    /// `change` returns `Err` to abort.
    async fn update<T>(
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
                .map_err(|e| store_error(&e))?
            {
                return Ok((rec, out));
            }
        }
        Err(ControlError::new(
            ErrorKind::Unavailable,
            format!("volume {name} is being changed by others; try again"),
        ))
    }

    fn node_addr(nodes: &[NodeRecord], id: &str) -> Option<String> {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.replica_addr.clone())
    }

    async fn create_replica(
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
        peer::create(&addr, name.as_str(), size, self.timeout).await
    }

    async fn delete_replica(&self, nodes: &[NodeRecord], node: &str, name: &VolumeName) {
        let r = if node == self.me.id {
            match self.storage.delete_volume(name).await {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                r => r,
            }
        } else if let Some(addr) = Self::node_addr(nodes, node) {
            peer::delete(&addr, name.as_str(), self.timeout).await
        } else {
            Ok(()) // a dead node's replica is garbage; its node removes orphans later
        };
        if let Err(e) = r {
            tracing::warn!(volume = %name, node, error = %e.full_message(), "cannot delete a replica");
        }
    }

    fn status(&self, rec: &VolumeRecord) -> VolumeStatus {
        let healthy = rec.healthy();
        let state = if healthy == 0 {
            VolumeState::Faulted
        } else if healthy < usize::from(rec.replicas) {
            VolumeState::Degraded
        } else {
            VolumeState::Online
        };
        let local_allocated = VolumeName::new(&rec.name)
            .ok()
            .and_then(|n| self.storage.replica(&n).ok())
            .map_or(0, |r| r.allocated_bytes());
        VolumeStatus {
            id: rec.id.clone(),
            name: VolumeName::new(&rec.name).expect("recorded names are valid"),
            size_bytes: rec.size_bytes,
            replicas: rec.replicas,
            allocated_bytes: local_allocated,
            state,
            created_at: rec.created_at,
            replica_status: rec
                .placement
                .iter()
                .map(|r| ReplicaStatus {
                    node_id: r.node.clone(),
                    pool_id: String::new(),
                    allocated_bytes: if r.node == self.me.id {
                        local_allocated
                    } else {
                        0
                    },
                    state: r.state.as_str().to_owned(),
                    rebuild: r.rebuild.as_ref().map(RebuildRecord::status),
                    last_rebuild: r.last_rebuild.as_ref().map(RebuildRecord::status),
                })
                .collect(),
        }
    }

    /// Take the attachment of `name` for this node and return the new epoch and the record.
    async fn take_attachment(
        &self,
        name: &VolumeName,
        force: bool,
    ) -> Result<VolumeRecord, ControlError> {
        let live: Vec<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let me = self.me.id.clone();
        let (rec, ()) = self
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
                rec.attachment = Some(AttachmentRecord {
                    node: me.clone(),
                    epoch: rec.epoch,
                });
                Ok(())
            })
            .await?;
        Ok(rec)
    }

    async fn open_async(
        self: &Arc<Self>,
        name: &VolumeName,
        force: bool,
    ) -> Result<VolumeDevice, ControlError> {
        let rec = self.take_attachment(name, force).await?;
        let opened = self.open_taken(name, &rec).await;
        if opened.is_err() {
            // Do not keep an attachment this node cannot serve.
            self.release_async(name).await;
        }
        opened
    }

    async fn open_taken(
        self: &Arc<Self>,
        name: &VolumeName,
        rec: &VolumeRecord,
    ) -> Result<VolumeDevice, ControlError> {
        let epoch = rec.epoch;
        let nodes = self.nodes().await?;
        let mut children = Vec::new();
        let mut unreachable = Vec::new();
        for r in rec
            .placement
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
        {
            match self.open_child(&nodes, &r.node, name, epoch).await {
                Ok(child) => children.push(ChildSpec {
                    id: r.node.clone(),
                    local: r.node == self.me.id,
                    dev: child,
                    state: ChildState::Healthy,
                }),
                Err(e) => {
                    tracing::warn!(volume = %name, node = %r.node, error = %e.full_message(), "replica unreachable at attach");
                    unreachable.push(r.node.clone());
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
                    if unreachable.contains(&r.node) {
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
        let nexus = Arc::new(Nexus::new(name.as_str(), children, ejector));
        // Before the first I/O: the healthy replicas must agree where the last writer died
        // mid-write, and new generations must be above every one they hold.
        nexus.reconcile().await.map_err(|e| {
            ControlError::new(
                ErrorKind::Unavailable,
                format!("cannot reconcile the replicas of volume {name}: {e}"),
            )
        })?;
        self.nexuses
            .lock()
            .expect("nexus table lock")
            .insert(name.to_string(), Arc::clone(&nexus));
        tracing::info!(volume = %name, epoch, replicas = nexus.children().len(), "attached a replicated volume");
        tokio::spawn(repair::run(
            Arc::clone(self),
            name.clone(),
            epoch,
            Arc::downgrade(&nexus),
        ));
        Ok(VolumeDevice::Replicated(nexus))
    }

    async fn open_child(
        &self,
        nodes: &[NodeRecord],
        node: &str,
        name: &VolumeName,
        epoch: u64,
    ) -> Result<Child, ControlError> {
        if node == self.me.id {
            let replica = self.storage.replica(name)?;
            self.fence.register(name.as_str(), epoch).map_err(|e| {
                ControlError::new(
                    ErrorKind::FailedPrecondition,
                    format!("cannot register epoch {epoch} of volume {name} on this node: {e}"),
                )
            })?;
            return Ok(Child::Local {
                replica,
                fence: Arc::clone(&self.fence),
                epoch,
            });
        }
        let addr = Self::node_addr(nodes, node).ok_or_else(|| {
            ControlError::new(ErrorKind::Unavailable, format!("node {node} is not live"))
        })?;
        let addr = addr.parse().map_err(|e| {
            ControlError::new(
                ErrorKind::Internal,
                format!("node {node} has a bad address {addr}: {e}"),
            )
        })?;
        let opts = RemoteOptions {
            timeout: self.timeout,
            node: self.me.id.clone(),
        };
        RemoteReplica::connect(addr, name.as_str(), epoch, opts)
            .await
            .map(Child::Remote)
            .map_err(|e| {
                ControlError::new(ErrorKind::Unavailable, format!("replica on {node}: {e}"))
            })
    }

    async fn release_async(&self, name: &VolumeName) {
        self.nexuses
            .lock()
            .expect("nexus table lock")
            .remove(name.as_str());
        let me = self.me.id.clone();
        let r = self
            .update(name.as_str(), |rec| {
                if rec.attachment.as_ref().is_some_and(|a| a.node == me) {
                    rec.attachment = None;
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
        for n in self.nexuses.lock().expect("nexus table lock").values() {
            n.fence();
        }
    }

    /// Every volume record in the store.
    ///
    /// # Errors
    /// The store cannot be read, or a record is corrupt.
    pub async fn volume_records(&self) -> Result<Vec<VolumeRecord>, ControlError> {
        let kvs = self
            .store
            .list(VOLUMES)
            .await
            .map_err(|e| store_error(&e))?;
        kvs.iter().map(decode_volume).collect()
    }

    /// The counters of every nexus on this node, by volume name.
    pub fn nexus_stats(&self) -> Vec<(String, Arc<Nexus<Child>>)> {
        let mut v: Vec<_> = self
            .nexuses
            .lock()
            .expect("nexus table lock")
            .iter()
            .map(|(k, n)| (k.clone(), Arc::clone(n)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The nexus of an attached volume, for status.
    pub fn nexus(&self, name: &str) -> Option<Arc<Nexus<Child>>> {
        self.nexuses
            .lock()
            .expect("nexus table lock")
            .get(name)
            .cloned()
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
                    for r in rec.placement.iter_mut().filter(|r| r.node == child) {
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
                .map(drop)
                .map_err(|e| e.full_message())?;
            tracing::warn!(volume = %self.volume, replica = child, reason, since, "ejection recorded");
            Ok(())
        })
    }
}

/// The attacher's device source in cluster mode.
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

    fn exists(&self, name: &VolumeName) -> Result<(), ControlError> {
        let c = Arc::clone(&self.0);
        c.runtime
            .clone()
            .block_on(c.volume(name.as_str()))
            .map(drop)
    }
}

fn now_secs() -> u64 {
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
                    volume::api::format_size(rec.size_bytes),
                    rec.replicas
                ),
            ));
        }
        let nodes = c.nodes().await?;
        let placement = placement::place_with(&nodes, usize::from(spec.replicas), size, hints)
            .map_err(|e| ControlError::new(ErrorKind::ResourceExhausted, e.to_string()))?;
        for w in &placement.warnings {
            tracing::warn!(volume = %spec.name, "{w}");
        }
        let mut created: Vec<String> = Vec::new();
        for node in &placement.nodes {
            if let Err(e) = c.create_replica(&nodes, node, &spec.name, size).await {
                for done in &created {
                    c.delete_replica(&nodes, done, &spec.name).await;
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
        let rec = VolumeRecord {
            name: spec.name.to_string(),
            id: uuid_like(),
            size_bytes: size,
            replicas: spec.replicas,
            created_at: now_secs(),
            placement: placement
                .nodes
                .iter()
                .map(|n| ReplicaRecord::healthy(n))
                .collect(),
            attachment: None,
            epoch: 0,
        };
        let value = serde_json::to_vec(&rec).expect("volume record serializes");
        let fresh = c
            .store
            .create(&volume_key(spec.name.as_str()), &value, None)
            .await
            .map_err(|e| store_error(&e))?;
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
        tracing::info!(volume = %spec.name, nodes = ?placement.nodes, "replicated volume created");
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
            .map_err(|e| store_error(&e))?
        {
            return Err(ControlError::new(
                ErrorKind::Unavailable,
                format!("volume {name} changed during delete; try again"),
            ));
        }
        c.store
            .delete(&volume_key(name.as_str()))
            .await
            .map_err(|e| store_error(&e))?;
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
        let kvs = self
            .0
            .store
            .list(VOLUMES)
            .await
            .map_err(|e| store_error(&e))?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            out.push(self.0.status(&decode_volume(kv)?));
        }
        Ok(out)
    }

    async fn resize_volume(
        &self,
        name: &VolumeName,
        _new_size_bytes: u64,
    ) -> Result<VolumeStatus, ControlError> {
        self.0.volume(name.as_str()).await?;
        Err(ControlError::new(
            ErrorKind::Unimplemented,
            format!("resizing replicated volume {name} is not available yet"),
        ))
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
    lease: crate::cluster::LeaseId,
) -> Result<(), StoreError> {
    let rec = cluster.record().await;
    let value = serde_json::to_vec(&rec).expect("node record serializes");
    cluster
        .store
        .put(&node_key(&rec.id), &value, Some(lease))
        .await
        .map(drop)
}
