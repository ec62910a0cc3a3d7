//! Ballast's local storage engine.
//!
//! - [`device`]: the [`device::BlockDevice`] trait with real-disk semantics.
//! - [`io`]: the I/O engines (io_uring and sync) and owned aligned buffers.
//! - [`pool`]: the on-disk format, extent allocation, checksums, crash-safe metadata and
//!   replicas, and [`pool::Storage`], this node's pools as a [`api::VolumeControl`].
//!
//! Depends on the [`api`] crate only (for names, specs and errors).

pub mod device;
pub mod io;
pub mod pool;
