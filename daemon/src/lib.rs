//! The Ballast node daemon and CLI: the composition root of the project.
//!
//! One binary, `ballast`, runs either the daemon (`ballast daemon`) or a client command
//! (`ballast volume …`, `ballast pool list`, `ballast status`).
//!
//! - [`cli`]: the command line (clap): the `daemon` subcommand here, the client commands
//!   flattened in from the `cli` crate;
//! - [`config`]: flags over the TOML config file over defaults;
//! - [`node`]: the daemon's start-up, serving and shutdown, wiring storage, the cluster and
//!   the frontends to the endpoints;
//! - [`data_dir_lock`], [`api_socket`] (the `host` crate's socket helper): the exclusive
//!   resources a daemon holds;
//! - [`api`]: the local control API (HTTP + JSON on the unix socket) and its one error mapping;
//! - [`host`]: this node's one `NodeControl` (attach, detach, refresh, node facts), used by
//!   the local API, the CSI driver and the Docker plugin alike; `--csi-socket` serves the
//!   [`csi`] crate's driver;
//! - [`ops_endpoint`], [`metrics`]: `/healthz`, `/readyz` and `/metrics` over TCP;
//! - [`node_info`], [`logging`]: shared facts and log set-up.
//!
//! The engine is the `volume` crate; replication, the cluster store and orchestration are the
//! `replication` and `cluster` crates; the FUSE+loop and NBD frontends are the `frontends`
//! crate; the CLI client is the `cli` crate (see `ARCHITECTURE.md`).
//!
//! Only `main.rs` uses `anyhow`; every module here has its own `thiserror` error type.

pub mod api;
pub use ::host::socket as api_socket;
pub mod certs;
pub mod cli;
pub mod config;
pub mod data_dir_lock;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod node_info;
pub mod ops_endpoint;

pub use ::api::error_chain;
