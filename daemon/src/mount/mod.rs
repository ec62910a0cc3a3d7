//! Filesystems on attached volumes. The helpers are the `host` crate's `mount` module, shared with the CSI
//! driver and the Docker plugin so that every adapter formats and mounts alike; [`command`] is
//! the CLI side of `ballast volume mount`.

pub mod command;

pub use ::host::mount::*;
