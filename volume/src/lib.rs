//! Ballast's domain types and local storage engine.
//!
//! - [`api`]: volume names, specs, statuses, errors and the [`api::VolumeControl`] trait that
//!   every protocol adapter calls.
//! - [`device`]: the [`device::BlockDevice`] trait with real-disk semantics.
//! - [`io`]: the I/O engines (io_uring and sync) and owned aligned buffers.
//! - [`mount`]: probe, format-if-empty, mount, bind, usage and grow of filesystems on attached
//!   volumes, shared by every adapter.
//! - [`pool`]: the on-disk format, extent allocation, checksums, crash-safe metadata and
//!   replicas.
//!
//! This crate imports no other Ballast crate.

pub mod api;
pub mod device;
pub mod io;
pub mod mount;
pub mod pool;
