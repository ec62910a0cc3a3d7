//! Synchronous replication (not built yet).
//!
//! This crate will hold a replicated `volume::device::BlockDevice` over N children (local
//! replicas or remote ones reached through a transport trait): write-to-all-healthy,
//! read-one, ejection committed in the cluster store before any write that skipped a replica
//! is acknowledged, epoch fencing, delta rebuild by per-extent generation, and the framed,
//! CRC32C-checked replica wire protocol. The decisions will be a state machine that does no
//! I/O, driven by a thin I/O layer. Until then the engine refuses `replicas > 1` with an
//! error that says replication is not available.
