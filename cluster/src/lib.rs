//! The cluster: where volumes live and who may write them.
//!
//! - [`store`]: the cluster store, one key-value API with revisions, compare-and-swap and
//!   leases over two backends (embedded, etcd);
//! - [`model`]: the records kept in the store (nodes, volumes, replicas, attachments);
//! - [`placement`]: which nodes get a new volume's replicas;
//! - [`control`]: [`control::Cluster`], this node's part of a cluster, and
//!   [`control::ClusterSource`], the `VolumeControl` and `DeviceSource` of replicated
//!   volumes over the store;
//! - [`repair`]: background rebuild and replacement of ejected replicas;
//! - [`peer`]: the control client for other nodes' replicas;
//! - [`snapshots`] and [`replicated_snapshots`]: snapshots and clones, on one node and
//!   across nodes;
//! - [`standalone`]: multi-replica volumes on one node's pool devices.
//!
//! Depends on `api`, `host`, `volume` and `replication`; never on a frontend or the daemon.

pub mod control;
pub mod model;
pub mod peer;
pub mod placement;
pub mod repair;
pub mod replicated_snapshots;
pub mod snapshots;
pub mod standalone;
pub mod store;

pub use control::{publish_node, Cluster, ClusterSource};
pub use repair::RepairPolicy;
