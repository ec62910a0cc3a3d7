//! The Kubernetes CSI driver (spec v1.12, `csi.ballast.dev`).
//!
//! Three tonic services on one unix socket ([`serve`]):
//! - [`identity`]: name and version, plugin capabilities, and `Probe` (ready once the daemon
//!   has booted — the meaning of `/readyz`, never "the cluster has quorum");
//! - [`controller`]: create, delete, list, validate, capacity, expand and get-with-condition;
//! - [`node`]: stage (attach, format only if empty, mount), publish (bind mounts), stats,
//!   expand, info.
//!
//! Every service is generic over [`api::VolumeControl`] (the cluster-wide volume
//! operations, the same trait the local API and the Docker plugin use) and
//! [`api::NodeControl`] (what only this node can do: attach, topology). Errors are
//! mapped to gRPC codes in one place, [`status`].
//!
//! Design: there is no ControllerPublish. A volume is attached at `NodeStageVolume` on the
//! node that runs the pod, and a previous writer is fenced by epoch, so a pod that moves off a
//! dead node never waits for a VolumeAttachment to be detached.
//!
//! Volume IDs are Ballast volume names. A CO's name that is not a valid volume name
//! (uppercase, too long, …) is mapped to one deterministically ([`params::volume_name_for`]),
//! so repeated `CreateVolume` calls stay idempotent.

// Every RPC returns `tonic::Status` as its error, large as it is.
#![allow(clippy::result_large_err)]

pub mod controller;
pub mod identity;
pub mod node;
pub mod params;
pub mod status;

use std::future::Future;
use std::path::PathBuf;

use std::sync::Arc;

use api::{NodeControl, VolumeControl};

/// The generated `csi.v1` messages, servers and clients.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// The driver's name, as Kubernetes' CSIDriver object and StorageClasses spell it.
pub const DRIVER_NAME: &str = "csi.ballast.dev";

/// The driver's version (the Ballast version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The topology key naming a Ballast node.
pub const NODE_KEY: &str = "topology.ballast.dev/node";

/// The topology key naming a zone (Kubernetes' well-known label).
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// A byte count as CSI's `int64`, saturating (sizes are far below `i64::MAX`).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Where the node service may be asked to stage and publish.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Staging and target paths must lie under this directory (the kubelet's root,
    /// `/var/lib/kubelet` by default).
    pub allowed_root: PathBuf,
}

/// Serve the Identity, Controller and Node services on `listener` (bound with
/// `host::socket::BoundSocket`, which admits only root and the daemon's user) until
/// `shutdown` completes.
///
/// # Errors
/// The server failed.
pub async fn serve<C: VolumeControl, N: NodeControl>(
    listener: host::socket::LocalListener,
    control: Arc<C>,
    node: Arc<N>,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ops = Arc::new(status::OpLocks::default());
    tonic::transport::Server::builder()
        .add_service(proto::identity_server::IdentityServer::new(
            identity::Identity::new(Arc::clone(&node)),
        ))
        .add_service(proto::controller_server::ControllerServer::new(
            controller::Controller::new(Arc::clone(&control), Arc::clone(&node), Arc::clone(&ops)),
        ))
        .add_service(proto::node_server::NodeServer::new(node::Node::new(
            control, node, config, ops,
        )))
        .serve_with_incoming_shutdown(listener.into_stream(), shutdown)
        .await
        .map_err(std::io::Error::other)
}
