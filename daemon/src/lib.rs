//! The Ballast node daemon and CLI: the composition root of the project.
//!
//! One binary, `ballast`, runs either the daemon (`ballast daemon`) or a client command
//! (`ballast volume …`, `ballast pool list`, `ballast status`).
//!
//! - [`cli`]: the command line (clap);
//! - [`config`]: flags over the TOML config file over defaults;
//! - [`node`]: the daemon's start-up, serving and shutdown, wiring storage to the endpoints;
//! - [`data_dir_lock`], [`api_socket`] (the `host` crate's socket helper): the exclusive
//!   resources a daemon holds;
//! - [`api`]: the local control API (HTTP + JSON on the unix socket) and its one error mapping;
//! - [`nbd`]: the NBD export server (unix socket, and TCP on request);
//! - [`standalone`]: multi-replica volumes on one node (one replica per pool device);
//! - [`attach`]: volumes as block devices on this node (FUSE file + loop device);
//! - [`mount`]: format-if-empty, mount and unmount helpers shared by the API, CSI and Docker;
//! - [`host`]: this node's `NodeControl` (attach, topology) for the CSI driver and the Docker
//!   plugin; `--csi-socket` serves the [`csi`] crate's driver;
//! - [`ops_endpoint`], [`metrics`]: `/healthz`, `/readyz` and `/metrics` over TCP;
//! - [`client`]: the CLI's client of the local API, its output and its exit codes;
//! - [`node_info`], [`logging`]: shared facts and log set-up.
//!
//! Only `main.rs` uses `anyhow`; every module here has its own `thiserror` error type.

pub mod api;
pub use ::host::socket as api_socket;
pub mod cli;
pub mod client;
pub mod config;
pub mod data_dir_lock;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod node;
pub mod node_info;
pub mod ops_endpoint;

pub use ::api::error_chain;
