//! The JSON bodies of the local control API, shared by the server and the CLI client.
//!
//! Request types refuse unknown fields, so a typo in a hand-written request is an error rather
//! than a silently ignored option. Volume and pool statuses are [`::api::VolumeStatus`]
//! and [`::api::PoolStatus`] as they are; this module adds only the envelopes.

use ::api::{PoolStatus, VolumeStatus};
use serde::{Deserialize, Serialize};

use ::api::byte_size::ByteSize;

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// The volume name; validated by the server.
    pub name: String,
    /// The size: a number of bytes or a string such as `"10GiB"`.
    pub size: ByteSize,
    /// Synchronous replicas (default 1).
    #[serde(default = "one_replica")]
    pub replicas: u8,
}

fn one_replica() -> u8 {
    1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_defaults_and_refusals() {
        let r: CreateVolumeRequest =
            serde_json::from_str(r#"{"name": "db", "size": "1GiB"}"#).unwrap();
        assert_eq!(r.replicas, 1);
        assert_eq!(r.size.bytes(), 1 << 30);
        let e = serde_json::from_str::<CreateVolumeRequest>(
            r#"{"name": "db", "size": 1, "colour": 1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    }
}
