//! The Node service: attach, format-if-empty and mount on the node that runs the pod.
//!
//! RPCs: NodeStageVolume (attach; for mount access format only an empty volume and mount it
//! at the staging path), NodeUnstageVolume (unmount, detach), NodePublishVolume (bind mount of
//! the staging directory, or of the device file for block access, honouring readonly),
//! NodeUnpublishVolume, NodeGetVolumeStats (bytes, inodes, condition), NodeExpandVolume
//! (the attached device learns the new size; ext4 or XFS grows online), NodeGetCapabilities
//! and NodeGetInfo (node ID and topology). All served.
//!
//! Paths the CO passes are checked before anything is touched: absolute, no `..`, and under
//! [`NodeConfig::allowed_root`]; a staging path must be an existing directory, and a target
//! path's parent must exist.

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use api::{ControlError, ErrorKind, NodeControl, VolumeControl, VolumeName};
use host::mount;
use tonic::{Request, Response, Status};

use crate::controller::condition;
use crate::params::{self, CTX_FS_TYPE};
use crate::proto::node_server::Node as NodeService;
use crate::proto::node_service_capability::{rpc, Rpc, Type as CapType};
use crate::proto::volume_capability::AccessType;
use crate::proto::volume_usage::Unit;
use crate::proto::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeCapability, VolumeUsage,
};
use crate::status::{from_control, invalid, missing, OpLocks};
use crate::NodeConfig;

/// The Node service.
#[derive(Debug)]
pub struct Node<C, N> {
    control: Arc<C>,
    host: Arc<N>,
    config: NodeConfig,
    ops: Arc<OpLocks>,
}

impl<C, N> Node<C, N> {
    /// The service over `control` and `node`, sharing the per-volume operation locks `ops`.
    pub fn new(control: Arc<C>, node: Arc<N>, config: NodeConfig, ops: Arc<OpLocks>) -> Self {
        Self {
            control,
            host: node,
            config,
            ops,
        }
    }
}

/// Run blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("a node operation panicked: {e}")))?
        .map_err(|e| from_control(&e))
}

fn mount_err(e: &mount::MountError) -> ControlError {
    e.to_control()
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> ControlError {
    ControlError::new(
        ErrorKind::Internal,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

/// The capability's access type, required.
fn access_type(cap: Option<&VolumeCapability>) -> Result<(&VolumeCapability, &AccessType), Status> {
    let cap = cap.ok_or_else(|| missing("volume_capability"))?;
    if let Some(why) = params::unsupported(cap) {
        return Err(invalid(why));
    }
    let access = cap
        .access_type
        .as_ref()
        .ok_or_else(|| missing("volume_capability.access_type"))?;
    Ok((cap, access))
}

impl<C, N> Node<C, N> {
    /// Check a path the CO passed: non-empty, absolute, no `..`, under the allowed root.
    fn checked_path(&self, field: &str, path: &str) -> Result<PathBuf, Status> {
        if path.is_empty() {
            return Err(missing(field));
        }
        let p = PathBuf::from(path);
        if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(invalid(format!(
                "{field} {path:?} must be an absolute path without '..'"
            )));
        }
        let root = std::fs::canonicalize(&self.config.allowed_root)
            .unwrap_or_else(|_| self.config.allowed_root.clone());
        // Resolve symlinks in the part that exists, so a link cannot lead outside the root.
        let resolved = match std::fs::canonicalize(&p) {
            Ok(r) => r,
            Err(_) => match (p.parent().map(std::fs::canonicalize), p.file_name()) {
                (Some(Ok(parent)), Some(file)) => parent.join(file),
                _ => p.clone(),
            },
        };
        if !resolved.starts_with(&root) {
            return Err(invalid(format!(
                "{field} {path:?} lies outside {}, the only place this node stages and \
                 publishes volumes (see --kubelet-dir)",
                root.display()
            )));
        }
        Ok(resolved)
    }

    /// A staging path: checked, and an existing directory.
    fn staging_dir(&self, path: &str) -> Result<PathBuf, Status> {
        let p = self.checked_path("staging_target_path", path)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => Ok(p),
            Ok(_) => Err(invalid(format!(
                "staging_target_path {path:?} is not a directory"
            ))),
            Err(_) => Err(invalid(format!(
                "staging_target_path {path:?} does not exist; the CO creates it before staging"
            ))),
        }
    }
}

fn not_staged(name: &VolumeName, staging: &Path) -> Status {
    Status::failed_precondition(format!(
        "volume {name} is not staged at {} on this node; call NodeStageVolume first",
        staging.display()
    ))
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl<C: VolumeControl, N: NodeControl> NodeService for Node<C, N> {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let staging = self.staging_dir(&req.staging_target_path)?;
        let (cap, access) = access_type(req.volume_capability.as_ref())?;
        let fs = match access {
            AccessType::Block(_) => None,
            AccessType::Mount(m) if !m.fs_type.is_empty() => Some(m.fs_type.clone()),
            AccessType::Mount(_) => match req.volume_context.get(CTX_FS_TYPE) {
                Some(f) => Some(params::fs_type(f)?),
                None => None,
            },
        };
        let _op = self.ops.acquire(name.as_str())?;
        self.control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        let device = self
            .host
            .attach(&name, false)
            .await
            .map(|a| PathBuf::from(a.path))
            .map_err(|e| from_control(&e))?;
        let AccessType::Mount(m) = access else {
            tracing::info!(volume = %name, device = %device.display(), "CSI staged a block volume");
            return Ok(Response::new(NodeStageVolumeResponse {}));
        };
        let read_only = params::read_only_mode(cap);
        let flags = m.mount_flags.clone();
        let dev = device.clone();
        let path = staging.clone();
        let staged = blocking(move || {
            mount::ensure_mounted(&dev, &path, fs.as_deref(), &[], read_only, &flags)
                .map_err(|e| mount_err(&e))
        })
        .await?;
        tracing::info!(
            volume = %name,
            path = %staged.path.display(),
            fs = %staged.fs,
            formatted = staged.formatted,
            "CSI staged a filesystem volume"
        );
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let staging = self.checked_path("staging_target_path", &req.staging_target_path)?;
        let _op = self.ops.acquire(name.as_str())?;
        if let Some(device) = self.host.device(&name) {
            let path = staging.clone();
            blocking(move || {
                let ours = mount::device_number(&device).ok();
                match mount::mount_at(&path) {
                    Some(m) if Some(m.dev) == ours => {
                        mount::unmount(&path).map_err(|e| mount_err(&e))?;
                    }
                    _ => {}
                }
                Ok(())
            })
            .await?;
        }
        match self.host.detach(&name, false).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(from_control(&e)),
        }
        tracing::info!(volume = %name, "CSI unstaged a volume");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let target = self.checked_path("target_path", &req.target_path)?;
        if req.staging_target_path.is_empty() {
            return Err(missing("staging_target_path"));
        }
        let staging = self.staging_dir(&req.staging_target_path)?;
        let (cap, access) = access_type(req.volume_capability.as_ref())?;
        if !target.parent().is_some_and(Path::is_dir) {
            return Err(invalid(format!(
                "the parent directory of target_path {:?} does not exist",
                req.target_path
            )));
        }
        let read_only = req.readonly || params::read_only_mode(cap);
        let block = matches!(access, AccessType::Block(_));
        let _op = self.ops.acquire(name.as_str())?;
        self.control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        let Some(device) = self.host.device(&name) else {
            return Err(not_staged(&name, &staging));
        };
        if !block {
            let ours = mount::device_number(&device).ok();
            if mount::mount_at(&staging).map(|m| m.dev) != ours || ours.is_none() {
                return Err(not_staged(&name, &staging));
            }
        }
        let t = target.clone();
        blocking(move || {
            if block {
                // A read-only bind of a device file does not stop writes to it, so the device
                // itself is made read-only, which must not surprise a read-write publish.
                let others: Vec<_> = mount::binds_of(&device)
                    .into_iter()
                    .filter(|m| m.mount_point != t)
                    .collect();
                if others.iter().any(|m| m.read_only != read_only) {
                    return Err(ControlError::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "the device is already published {} on this node; a block volume is \
                             published either read-only or read-write at a time",
                            if read_only { "read-write" } else { "read-only" }
                        ),
                    ));
                }
                if read_only {
                    mount::set_read_only(&device, true).map_err(|e| mount_err(&e))?;
                }
                if !t.exists() {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&t)
                        .map_err(|e| io_err("create", &t, &e))?;
                }
                mount::bind_mount(&device, &t, read_only).map_err(|e| mount_err(&e))?;
            } else {
                if !t.exists() {
                    std::fs::create_dir(&t).map_err(|e| io_err("create", &t, &e))?;
                }
                mount::bind_mount(&staging, &t, read_only).map_err(|e| mount_err(&e))?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(volume = %name, target = %target.display(), read_only, block, "CSI published a volume");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let target = self.checked_path("target_path", &req.target_path)?;
        let _op = self.ops.acquire(name.as_str())?;
        let t = target.clone();
        let device = self.host.device(&name);
        blocking(move || {
            while mount::is_mounted(&t) {
                mount::unmount(&t).map_err(|e| mount_err(&e))?;
            }
            // The last block publish gone, a device made read-only for it is writable again.
            if let Some(dev) = device.filter(|d| d.exists()) {
                if mount::binds_of(&dev).is_empty() {
                    let _ = mount::set_read_only(&dev, false);
                }
            }
            match std::fs::symlink_metadata(&t) {
                Ok(m) if m.is_dir() => {
                    std::fs::remove_dir(&t).map_err(|e| io_err("remove", &t, &e))?;
                }
                Ok(_) => std::fs::remove_file(&t).map_err(|e| io_err("remove", &t, &e))?,
                Err(_) => {}
            }
            Ok(())
        })
        .await?;
        tracing::info!(volume = %name, target = %target.display(), "CSI unpublished a volume");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(missing("volume_path"));
        }
        // An unknown volume, or a path that does not exist, is NOT_FOUND whatever the path
        // looks like (the spec's order); an existing path must still lie under the root.
        let status = self
            .control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        path_exists(&req.volume_path)?;
        let path = self.checked_path("volume_path", &req.volume_path)?;
        let Ok(meta) = std::fs::metadata(&path) else {
            return Err(Status::not_found(format!(
                "volume_path {:?} does not exist",
                req.volume_path
            )));
        };
        let usage = if meta.file_type().is_block_device() {
            vec![VolumeUsage {
                total: crate::to_i64(status.size_bytes),
                unit: Unit::Bytes as i32,
                ..Default::default()
            }]
        } else {
            if !mount::is_mounted(&path) {
                return Err(Status::not_found(format!(
                    "volume {name} is not mounted at {:?}",
                    req.volume_path
                )));
            }
            let p = path.clone();
            let u = blocking(move || mount::usage(&p).map_err(|e| mount_err(&e))).await?;
            vec![
                VolumeUsage {
                    available: crate::to_i64(u.available_bytes),
                    total: crate::to_i64(u.total_bytes),
                    used: crate::to_i64(u.used_bytes),
                    unit: Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: crate::to_i64(u.free_inodes),
                    total: crate::to_i64(u.total_inodes),
                    used: crate::to_i64(u.used_inodes),
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition(&status)),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(missing("volume_path"));
        }
        if let Some(cap) = &req.volume_capability {
            if let Some(why) = params::unsupported(cap) {
                return Err(invalid(why));
            }
        }
        // As in NodeGetVolumeStats: an unknown volume or a missing path first.
        self.control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        path_exists(&req.volume_path)?;
        let path = self.checked_path("volume_path", &req.volume_path)?;
        let Ok(meta) = std::fs::metadata(&path) else {
            return Err(Status::not_found(format!(
                "volume_path {:?} does not exist",
                req.volume_path
            )));
        };
        let _op = self.ops.acquire(name.as_str())?;
        let size = self
            .host
            .refresh_size(&name)
            .await
            .map_err(|e| from_control(&e))?;
        if let Some(r) = &req.capacity_range {
            if r.required_bytes > 0 && (r.required_bytes as u64) > size {
                return Err(Status::out_of_range(format!(
                    "volume {name} is {size} bytes, below the required {} bytes; expand it \
                     with ControllerExpandVolume first",
                    r.required_bytes
                )));
            }
        }
        let block = meta.file_type().is_block_device()
            || matches!(
                req.volume_capability
                    .as_ref()
                    .and_then(|c| c.access_type.as_ref()),
                Some(AccessType::Block(_))
            );
        if !block {
            let Some(device) = self.host.device(&name) else {
                return Err(Status::failed_precondition(format!(
                    "volume {name} is not attached on this node"
                )));
            };
            blocking(move || {
                mount::grow_filesystem(&device, &path)
                    .map(drop)
                    .map_err(|e| mount_err(&e))
            })
            .await?;
        }
        tracing::info!(volume = %name, size, block, "CSI expanded a volume on the node");
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: crate::to_i64(size),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [
                rpc::Type::StageUnstageVolume,
                rpc::Type::GetVolumeStats,
                rpc::Type::ExpandVolume,
                rpc::Type::VolumeCondition,
            ]
            .into_iter()
            .map(rpc_cap)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.host.node_id().to_owned(),
            max_volumes_per_node: 0,
            accessible_topology: Some(params::node_segment(self.host.node_id(), self.host.zone())),
        }))
    }
}

/// NOT_FOUND unless something exists at `path` (a link counts).
fn path_exists(path: &str) -> Result<(), Status> {
    if std::fs::symlink_metadata(path).is_err() {
        return Err(Status::not_found(format!(
            "volume_path {path:?} does not exist"
        )));
    }
    Ok(())
}
