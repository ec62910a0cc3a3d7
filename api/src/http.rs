//! The JSON bodies of the local control API (HTTP + JSON on the daemon's unix socket),
//! shared by the server (the daemon) and its clients (the CLI).
//!
//! Request types refuse unknown fields, so a typo in a hand-written request is an error rather
//! than a silently ignored option. Volume and pool statuses are [`crate::VolumeStatus`] and
//! [`crate::PoolStatus`] as they are; attach and detach answer [`crate::Attachment`], the
//! node list holds [`crate::NodeRecord`]s.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::byte_size::ByteSize;
use crate::{NodeRecord, PoolStatus, VolumeStatus};

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// The volume name; validated by the server.
    pub name: String,
    /// The size: a number of bytes or a string such as `"10GiB"`. Required, except for a
    /// copy (`source`), which is its source's size unless larger is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Synchronous replicas (default 1; a copy has its source's, and asking for another
    /// count is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// What it starts from: `{"snapshot": NAME}` or `{"volume": NAME}`; empty if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::VolumeSource>,
}

/// `POST /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name; validated by the server.
    pub name: String,
    /// The volume to snapshot.
    pub volume: String,
}

/// `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// Every snapshot, sorted by name.
    pub snapshots: Vec<crate::SnapshotStatus>,
}

/// `POST /v1/volumes/{name}/revert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertVolumeRequest {
    /// The snapshot of the volume to revert to.
    pub snapshot: String,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeRequest {
    /// The new size: a number of bytes or a string such as `"20GiB"`.
    pub size: ByteSize,
}

/// `GET /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    /// Every volume, sorted by name.
    pub volumes: Vec<VolumeStatus>,
}

/// `GET /v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    /// Every pool device of this node.
    pub pools: Vec<PoolStatus>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The daemon's version.
    pub version: String,
    /// This node's ID.
    pub node_id: String,
    /// The I/O engine in use (`io_uring` or `sync`).
    pub engine: String,
    /// Whole seconds since the daemon started.
    pub uptime_seconds: u64,
    /// Capacity and allocation over every pool device.
    pub pools: PoolsSummary,
    /// The number of volumes.
    pub volumes: usize,
}

/// Totals over a node's pool devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolsSummary {
    /// The number of pool devices.
    pub devices: usize,
    /// Bytes usable for volume data.
    pub capacity_bytes: u64,
    /// Bytes allocated to volumes.
    pub allocated_bytes: u64,
    /// Bytes still free.
    pub free_bytes: u64,
    /// Checksum mismatches detected since the pools were opened.
    pub checksum_errors: u64,
}

impl PoolsSummary {
    /// The totals of `pools`.
    pub fn of(pools: &[PoolStatus]) -> Self {
        pools.iter().fold(Self::default(), |acc, p| Self {
            devices: acc.devices + 1,
            capacity_bytes: acc.capacity_bytes + p.capacity_bytes,
            allocated_bytes: acc.allocated_bytes + p.allocated_bytes,
            free_bytes: acc.free_bytes + p.free_bytes,
            checksum_errors: acc.checksum_errors + p.checksum_errors,
        })
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable code, [`::api::ErrorKind::code`] (`not_found`, `conflict`, …).
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

/// The body of `POST /v1/volumes/{name}/detach`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachRequest {
    /// Detach even if the device is mounted or open.
    #[serde(default)]
    pub force: bool,
}

/// The body of `POST /v1/volumes/{name}/attach` (optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Take a replicated volume over from a node that still holds it; the old writer is
    /// fenced by epoch.
    #[serde(default)]
    pub force: bool,
}

/// The answer of `POST /v1/volumes/{name}/refresh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshResponse {
    /// The size the attached device shows now, in bytes.
    pub size_bytes: u64,
}

/// The body of `POST /v1/volumes/{name}/export`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// Also serve the volume on TCP at this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
    /// Serve it there in plaintext with no authentication (for isolated networks); by
    /// default TCP clients must start TLS with a certificate from the cluster CA.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext: bool,
}

/// Where a volume is exported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The volume (and export) name.
    pub volume: String,
    /// The URI to give clients: the TCP one if TCP was asked for, else the unix one.
    pub uri: String,
    /// The URI on the unix socket.
    pub unix_uri: String,
    /// The NBD unix socket.
    pub socket: String,
    /// The bound TCP address, if TCP was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Whether TCP clients must start TLS (`nbds://`) with a certificate from the cluster CA.
    #[serde(default)]
    pub tls: bool,
}

/// The answer of `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    /// `standalone` or `cluster`.
    pub mode: String,
    /// The live nodes, sorted by id.
    pub nodes: Vec<NodeRecord>,
}

/// The body of `POST /v1/volumes/{name}/mount`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The mount point: an existing directory, absolute.
    pub path: PathBuf,
    /// The filesystem to create on an empty volume (`ext4` or `xfs`). When absent, an empty
    /// volume gets ext4 and an existing filesystem of any type is mounted; when present, an
    /// existing filesystem of another type is refused.
    #[serde(default)]
    pub fs: Option<String>,
    /// Extra `mkfs` arguments, used only when the volume is formatted.
    #[serde(default)]
    pub mkfs_options: Vec<String>,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The body of `POST /v1/volumes/{name}/unmount`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmountRequest {
    /// The mount point.
    pub path: PathBuf,
}

/// The answer of mount and unmount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    /// The volume.
    pub volume: String,
    /// The mount point.
    pub path: String,
    /// The stable device name (`/dev/ballast/NAME`).
    pub device: String,
    /// The filesystem type (empty after an unmount).
    #[serde(default)]
    pub fs: String,
    /// Whether the volume is mounted at `path` now.
    pub mounted: bool,
    /// Whether this call formatted the volume.
    #[serde(default)]
    pub formatted: bool,
    /// Whether nothing had to be done.
    #[serde(default)]
    pub unchanged: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_defaults_and_refusals() {
        let r: CreateVolumeRequest =
            serde_json::from_str(r#"{"name": "db", "size": "1GiB"}"#).unwrap();
        assert_eq!(r.replicas, None);
        assert_eq!(r.size.map(ByteSize::bytes), Some(1 << 30));
        assert_eq!(r.source, None);
        // A copy names its source and may leave the size out.
        let r: CreateVolumeRequest =
            serde_json::from_str(r#"{"name": "db2", "source": {"snapshot": "s1"}}"#).unwrap();
        assert_eq!(r.size, None);
        assert_eq!(
            r.source,
            Some(crate::VolumeSource::Snapshot(
                crate::VolumeName::new("s1").unwrap()
            ))
        );
        assert!(serde_json::from_str::<CreateVolumeRequest>(
            r#"{"name": "db2", "source": {"tape": "s1"}}"#
        )
        .is_err());
        let e = serde_json::from_str::<CreateVolumeRequest>(
            r#"{"name": "db", "size": 1, "colour": 1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    }
}
