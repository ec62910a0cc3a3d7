//! Synchronous replication: the pieces that let a volume's replicas live on other nodes.
//!
//! - [`wire`]: the framed, CRC32C-checked replica wire protocol (requests and responses,
//!   a slice decoder and async frame I/O).
//! - [`fence`]: the persistent per-volume attachment-epoch table that fences out old writers,
//!   shared by the replica server and the local data path.
//! - [`server`]: the replica server, which serves this node's local replicas to peers,
//!   checking every data request's epoch against the fence table.
//! - [`remote`]: a replica on another node as a `volume::device::BlockDevice`, over one
//!   multiplexed connection, and a control client to create and delete remote replicas.
//!
//! - [`net`]: the threads replica connections run on.
//! - [`device`]: the device a frontend serves (one local replica, or a nexus over children
//!   that are fenced local replicas, remote replicas or standalone replicas) and the
//!   [`device::DeviceSource`] trait frontends get devices from.
//!
//! The replicated device over N children (write-to-all-healthy, read-one, ejection committed
//! in the cluster store, delta rebuild) is built on these.

pub mod device;
pub mod fence;
pub mod net;
pub mod nexus;
pub mod remote;
pub mod server;
pub mod tls;
pub mod wire;
