//! What the cluster store holds, and under which keys.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `/ballast/v1/nodes/{id}` | [`NodeRecord`], attached to the node's lease | the node itself |
//! | `/ballast/v1/volumes/{name}` | [`VolumeRecord`] | any node, by compare-and-swap |
//! | `/ballast/v1/intents/{name}/{node}` | [`IntentRecord`]: a node is about to create, grow or clone into the replica of `name` on `node` | the node that asks, just before it asks |
//! | `/ballast/v1/snapshot-intents/{name}/{node}` | [`IntentRecord`]: a node is about to ask `node` to take or delete snapshot `name` | the node that asks, just before it asks |
//! | `/ballast/v1/snapshots/{name}` | [`crate::snapshots::SnapshotRecord`] | the node that took it |
//!
//! A node's record disappears when its lease expires, so the set of node records is the set
//! of live nodes. Every change to a volume record is a compare-and-swap on its revision, so
//! two nodes can never both think they attached a volume, and an ejection is durable before
//! any write that skipped the ejected replica is acknowledged.

pub use api::NodeRecord;
use serde::{Deserialize, Serialize};

/// The key prefix of node records.
pub const NODES: &str = "/ballast/v1/nodes/";
/// The key prefix of volume records.
pub const VOLUMES: &str = "/ballast/v1/volumes/";

/// The key prefix of intents.
pub const INTENTS: &str = "/ballast/v1/intents/";

/// The key of the intent about volume `name`'s replica on node `node`.
pub fn intent_key(name: &str, node: &str) -> String {
    format!("{INTENTS}{name}/{node}")
}

/// The key prefix of intents about snapshots.
pub const SNAPSHOT_INTENTS: &str = "/ballast/v1/snapshot-intents/";

/// The key of the intent to make `change` about `subject` on node `node`: a volume's
/// replica there, or a snapshot (see [`replication::tls::Change::about_snapshot`]).
pub fn change_intent_key(change: replication::tls::Change, subject: &str, node: &str) -> String {
    if change.about_snapshot() {
        format!("{SNAPSHOT_INTENTS}{subject}/{node}")
    } else {
        intent_key(subject, node)
    }
}

/// A node's intent to make a change on another node: create, grow or clone into a replica,
/// take or delete a snapshot ([`replication::tls::Change`]). The replica server of that
/// node (under TLS) does it only for the node, change and size recorded here, and only while
/// the intent is fresh ([`IntentRecord::TTL`]); the asking node deletes it once answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// The node that asks.
    pub by: String,
    /// What it asks.
    pub change: replication::tls::Change,
    /// The replica's size it asks for, in bytes.
    pub size_bytes: u64,
    /// When it was written, in seconds since the epoch.
    pub at: u64,
}

impl IntentRecord {
    /// How long an intent authorizes its change: a request is sent right after its intent
    /// is written, so only a clock far off (or an asker that died in between) outlives it.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(300);
}

/// The key of node `id`.
pub fn node_key(id: &str) -> String {
    format!("{NODES}{id}")
}

/// The key of volume `name`.
pub fn volume_key(name: &str) -> String {
    format!("{VOLUMES}{name}")
}

/// The state of one replica as the cluster records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// In sync with the volume.
    Healthy,
    /// Ejected: missed writes; must be rebuilt before it serves again.
    Ejected,
    /// Being rebuilt.
    Rebuilding,
}

impl ReplicaState {
    /// The lower-case name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Ejected => "ejected",
            ReplicaState::Rebuilding => "rebuilding",
        }
    }
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The node holding it.
    pub node: String,
    /// The pool device (its id) holding it, when the node holds several replicas of the
    /// volume (standalone mode: one replica per pool device of the one node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Its state.
    pub state: ReplicaState,
    /// When not healthy: it has every write up to this generation, so a rebuild copies only
    /// the extents changed after it (0: copy every allocated extent).
    #[serde(default)]
    pub since: u64,
    /// The rebuild in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildRecord>,
    /// The last rebuild that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<RebuildRecord>,
}

impl ReplicaRecord {
    /// A healthy replica on `node`.
    pub fn healthy(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            device: None,
            state: ReplicaState::Healthy,
            since: 0,
            rebuild: None,
            last_rebuild: None,
        }
    }
}

impl ReplicaRecord {
    /// A healthy replica on pool device `device` of `node`.
    pub fn on_device(node: &str, device: &str) -> Self {
        Self {
            device: Some(device.to_owned()),
            ..Self::healthy(node)
        }
    }

    /// The replica's id: its nexus child's id and how ejections and rebuilds name it. The
    /// node id, or `NODE/DEVICE` for a replica on a given pool device.
    pub fn id(&self) -> String {
        replica_id(&self.node, self.device.as_deref())
    }
}

/// The id of the replica on `node` (and pool `device`, if given); see [`ReplicaRecord::id`].
pub fn replica_id(node: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{node}/{d}"),
        None => node.to_owned(),
    }
}

/// The node of a replica id (see [`ReplicaRecord::id`]).
pub fn node_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(node, _)| node)
}

impl RebuildRecord {
    /// As the control plane reports it.
    pub fn status(&self) -> ::api::RebuildStatus {
        ::api::RebuildStatus {
            kind: self.kind.clone(),
            total_bytes: self.total_bytes,
            done_bytes: self.done_bytes,
            eta_seconds: self.eta_seconds,
            elapsed_ms: self.elapsed_ms,
        }
    }
}

/// A rebuild's progress (while it runs) or outcome (when it finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildRecord {
    /// `delta` (a returning replica) or `full` (a new one).
    pub kind: String,
    /// Bytes the plan copies.
    pub total_bytes: u64,
    /// Bytes copied so far.
    pub done_bytes: u64,
    /// Seconds left at the rate so far, when known.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Milliseconds since the rebuild started (or its whole duration, once finished).
    pub elapsed_ms: u64,
    /// Seconds since the Unix epoch at the last update.
    pub updated_at: u64,
}

/// The writer attachment of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// The node where the volume is attached.
    pub node: String,
    /// The attachment's epoch; replicas reject I/O with an older one.
    pub epoch: u64,
}

/// A replicated volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The name.
    pub name: String,
    /// The volume's UUID.
    pub id: String,
    /// The size in bytes.
    pub size_bytes: u64,
    /// The desired replica count.
    pub replicas: u8,
    /// Seconds since the Unix epoch at creation.
    pub created_at: u64,
    /// Where the replicas are.
    pub placement: Vec<ReplicaRecord>,
    /// The current writer, if attached.
    #[serde(default)]
    pub attachment: Option<AttachmentRecord>,
    /// The highest epoch ever handed out; only grows.
    #[serde(default)]
    pub epoch: u64,
}

impl VolumeRecord {
    /// How many replicas are healthy.
    pub fn healthy(&self) -> usize {
        self.placement
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
            .count()
    }
}
