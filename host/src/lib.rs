//! What the daemon and its adapters do to the host, outside the storage engine.
//!
//! - [`mount`]: probe (blkid), format-if-empty (mkfs), mount, bind, usage (statvfs) and online
//!   grow of filesystems on attached volumes, shared by the local API, CSI and Docker;
//! - [`persist`]: the one way to write a state file (temporary file, fsync, rename, fsync the
//!   directory) and to read one back (a corrupt file is an error naming it);
//! - [`socket`]: the one way to bind a unix socket the daemon serves.
//!
//! Depends only on the [`api`] crate: no engine, no io_uring.

pub mod mount;
pub mod persist;
pub mod socket;
