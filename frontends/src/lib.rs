//! Frontends: how a volume's device reaches its users.
//!
//! - [`attach`]: volumes as kernel block devices on this node (a FUSE file under a loop
//!   device), with stable names and the attached set persisted across restarts;
//! - [`nbd`]: the NBD export server (unix socket, and TCP on request);
//! - [`devices`]: the devices open on this node, shared by both (one open, one epoch, per
//!   volume).
//!
//! Both serve devices from `replication::device` and never touch the cluster store: a
//! [`replication::device::DeviceSource`] hands them devices and takes them back.

pub mod attach;
pub mod devices;
pub mod nbd;
