//! NBD export: every volume served over the standard Network Block Device protocol.
//!
//! Role: lets standard clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine,
//! nbd-client) read and write volumes. The daemon always listens on the unix socket
//! `<data-dir>/nbd.sock`, where every volume is an export named after it; `ballast volume
//! export NAME --tcp ADDR` (route `POST /v1/volumes/{name}/export`) also serves that volume on
//! a TCP listener at ADDR, until the daemon stops, over TLS with client certificates (see
//! [`server`]).
//!
//! Protocol subset (see [`proto`] for layouts):
//! - fixed newstyle handshake; options `NBD_OPT_GO`, `NBD_OPT_INFO` (answering
//!   `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` and, when asked, `NBD_INFO_NAME`),
//!   `NBD_OPT_LIST`, `NBD_OPT_ABORT`, the old `NBD_OPT_EXPORT_NAME`, and `NBD_OPT_STARTTLS` on
//!   TCP listeners (where it is required); every other option (structured replies, metadata
//!   contexts, …) gets `NBD_REP_ERR_UNSUP`;
//! - simple replies only; commands `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM` (with
//!   `FUA`), `WRITE_ZEROES` (with `FUA`; `NO_HOLE` is accepted, the range reads back as zeros
//!   either way) and `DISC`.
//!
//! Block size: the engine works in 4 KiB blocks, so every export advertises
//! `NBD_INFO_BLOCK_SIZE` minimum = preferred = [`BLOCK_SIZE`] and maximum = [`MAX_PAYLOAD`],
//! even to clients that did not ask (the protocol allows it). Clients that honour it (qemu's
//! block layer and libnbd-based tools do) never send smaller requests; one that does anyway
//! gets `EINVAL`, with no read-modify-write on the server.
//!
//! Errors: unaligned requests, unknown commands and flags, and reads past the end get
//! `EINVAL`; writes, trims and write-zeroes past the end get `ENOSPC`; the connection stays
//! usable. A bad magic number or unknown client flags close that connection only.

pub mod proto;
pub mod server;

pub use server::NbdServer;

/// The minimum and preferred request alignment advertised (the engine's block size).
pub const BLOCK_SIZE: u32 = 4096;
/// The largest read or write payload accepted.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The file name of the NBD unix socket inside the data directory.
pub const SOCKET_NAME: &str = "nbd.sock";
