//! A CSI client for the scenario tests: tonic clients of the Identity, Controller and Node
//! services over a daemon's `--csi-socket`, request builders, and a guard that unmounts
//! whatever a test left mounted under its kubelet directory.

// The client answers with `tonic::Status`, as the services do.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use csi::proto::controller_client::ControllerClient;
use csi::proto::identity_client::IdentityClient;
use csi::proto::node_client::NodeClient;
use csi::proto::volume_capability::access_mode::Mode;
use csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::proto::{
    CapacityRange, CreateVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, Volume, VolumeCapability,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::NodeDir;

/// The daemon flags that serve CSI for `node`: its socket and its kubelet directory (created).
pub fn csi_args(node: &NodeDir) -> Vec<String> {
    std::fs::create_dir_all(kubelet_dir(node)).expect("create the kubelet directory");
    vec![
        "--csi-socket".into(),
        csi_socket(node).display().to_string(),
        "--kubelet-dir".into(),
        kubelet_dir(node).display().to_string(),
    ]
}

/// Where `node`'s daemon serves CSI.
pub fn csi_socket(node: &NodeDir) -> PathBuf {
    node.scratch("csi.sock")
}

/// The directory `node`'s daemon accepts staging and target paths under.
pub fn kubelet_dir(node: &NodeDir) -> PathBuf {
    node.scratch("kubelet")
}

/// Clients of one daemon's three CSI services, with a runtime to drive them from sync tests.
#[derive(Debug)]
pub struct Csi {
    rt: tokio::runtime::Runtime,
    /// The Identity service.
    pub identity: IdentityClient<Channel>,
    /// The Controller service.
    pub controller: ControllerClient<Channel>,
    /// The Node service.
    pub node: NodeClient<Channel>,
}

impl Csi {
    /// Connect to the CSI socket at `path`.
    ///
    /// # Errors
    /// The socket does not answer.
    pub fn connect(path: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = path.to_owned();
        let channel = rt
            .block_on(async {
                Endpoint::try_from("http://ballast.invalid")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .context("cannot connect to the CSI socket")?;
        Ok(Self {
            rt,
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    /// Run `f` to completion.
    pub fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// CreateVolume, returning the gRPC result.
    ///
    /// # Errors
    /// The status the driver answered.
    pub fn create(&self, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
        let mut c = self.controller.clone();
        self.run(c.create_volume(req))
            .map(|r| r.into_inner().volume.expect("a created volume"))
    }

    /// NodeStageVolume.
    ///
    /// # Errors
    /// The status the driver answered.
    pub fn stage(
        &self,
        id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.run(n.node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        }))
        .map(drop)
    }

    /// NodeUnstageVolume.
    ///
    /// # Errors
    /// The status the driver answered.
    pub fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.run(n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        }))
        .map(drop)
    }

    /// NodePublishVolume.
    ///
    /// # Errors
    /// The status the driver answered.
    pub fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.run(n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }))
        .map(drop)
    }

    /// NodeUnpublishVolume.
    ///
    /// # Errors
    /// The status the driver answered.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.run(n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        }))
        .map(drop)
    }
}

/// A single-node-writer capability for filesystem access with `fs` (empty: the default).
pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

/// A single-node-writer capability for raw block access.
pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A CreateVolume request for `name` of at least `bytes`, with `params` and `cap`.
pub fn create_req(
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    cap: VolumeCapability,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// Unmounts, when dropped, everything mounted under a directory (deepest first), so a failed
/// test leaves no mount of a volume behind; declare it after the attachment clean-up guard so
/// it runs first.
#[derive(Debug)]
pub struct MountsUnder(pub PathBuf);

impl Drop for MountsUnder {
    fn drop(&mut self) {
        crate::unmount_all_under(&self.0);
    }
}
