//! The filesystem routes of the local API: `POST /v1/volumes/{name}/mount` and
//! `POST /v1/volumes/{name}/unmount`.
//!
//! Mount takes [`MountRequest`]: it attaches the volume if needed (through this node's
//! [`NodeControl`], so the attachment is recorded like `ballast volume attach`), then runs
//! [`::host::mount::ensure_mounted`] — format only an empty device, never reformat, mount,
//! idempotent. Unmount takes [`UnmountRequest`]; it unmounts the path if the volume's device
//! is mounted there (success if nothing is mounted) and leaves the volume attached.
//! Both answer `200` [`MountInfo`]. A mount that fails after attaching the volume detaches it
//! again (unless it was attached before the call).
//!
//! Errors: a mount point that is missing, relative or not a directory and an unsupported
//! filesystem are `400 invalid_argument`; an unknown volume is `404 not_found`; a device
//! holding another filesystem, another device mounted at the path, or a busy filesystem are
//! `412 failed_precondition`. Mount and unmount are serialised by one mutex (they are rare,
//! and a concurrent mount and unmount of one path must not interleave).

use std::path::Path;
use std::sync::Arc;

use ::api::http::{MountInfo, MountRequest, UnmountRequest};
use ::api::{Attachment, ControlError, ErrorKind, NodeControl, VolumeName};
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use axum::{Json, Router};
use frontends::attach::DEV_DIR;
use tokio::sync::Mutex;

use super::error::ApiError;
use super::json_body::ApiJson;
use crate::host::NodeHost;
use ::host::mount::{self, MountError};

#[derive(Debug)]
struct MountState {
    host: Arc<NodeHost>,
    /// Serialises mounts and unmounts (a mount and an unmount of one path must not
    /// interleave).
    ops: Mutex<()>,
}

/// The filesystem routes over this node's [`NodeHost`].
pub fn router(host: Arc<NodeHost>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/mount", post(mount_volume))
        .route("/v1/volumes/{name}/unmount", post(unmount_volume))
        .with_state(Arc::new(MountState {
            host,
            ops: Mutex::new(()),
        }))
}

fn control_error(e: &MountError) -> ControlError {
    e.to_control()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(ApiError::from)
}

async fn mount_volume(
    State(st): State<Arc<MountState>>,
    UrlPath(name): UrlPath<String>,
    ApiJson(req): ApiJson<MountRequest>,
) -> Result<Json<MountInfo>, ApiError> {
    let name = VolumeName::new(&name)?;
    let _op = st.ops.lock().await;
    // Refuse bad arguments before attaching anything.
    if let Some(fs) = &req.fs {
        if !mount::SUPPORTED_FS.contains(&fs.as_str()) {
            return Err(control_error(&MountError::UnsupportedFs(fs.clone())).into());
        }
    }
    let path = req.path.clone();
    blocking(move || mount::check_mount_point(&path).map_err(|e| control_error(&e))).await?;
    // Attached by this call: a mount that then fails detaches it again.
    let was_attached = st.host.device(&name).is_some();
    let att = st.host.attach(&name, false).await?;
    let n = name.clone();
    match blocking(move || do_mount(&n, &req, att)).await {
        Ok(info) => Ok(Json(info)),
        Err(e) => {
            if !was_attached {
                if let Err(d) = st.host.detach(&name, false).await {
                    tracing::warn!(volume = %name, error = %d.full_message(), "cannot detach after a failed mount");
                }
            }
            Err(e)
        }
    }
}

fn do_mount(
    name: &VolumeName,
    req: &MountRequest,
    att: Attachment,
) -> Result<MountInfo, ControlError> {
    let out = mount::ensure_mounted(
        Path::new(&att.path),
        &req.path,
        req.fs.as_deref(),
        &req.mkfs_options,
        req.read_only,
        &[],
    )
    .map_err(|e| control_error(&e))?;
    Ok(MountInfo {
        volume: name.to_string(),
        path: out.path.display().to_string(),
        device: att.path,
        fs: out.fs,
        mounted: true,
        formatted: out.formatted,
        unchanged: out.already_mounted,
    })
}

async fn unmount_volume(
    State(st): State<Arc<MountState>>,
    UrlPath(name): UrlPath<String>,
    ApiJson(req): ApiJson<UnmountRequest>,
) -> Result<Json<MountInfo>, ApiError> {
    let name = VolumeName::new(&name)?;
    let _op = st.ops.lock().await;
    Ok(Json(blocking(move || do_unmount(&name, &req.path)).await?))
}

fn do_unmount(name: &VolumeName, path: &Path) -> Result<MountInfo, ControlError> {
    let link = Path::new(DEV_DIR).join(name.as_str());
    let info = |path: &Path, unchanged: bool| MountInfo {
        volume: name.to_string(),
        path: path.display().to_string(),
        device: link.display().to_string(),
        fs: String::new(),
        mounted: false,
        formatted: false,
        unchanged,
    };
    if !path.is_absolute() {
        return Err(control_error(&MountError::BadMountPoint {
            path: path.to_owned(),
            reason: "not an absolute path".to_owned(),
        }));
    }
    let Some(entry) = mount::mount_at(path) else {
        return Ok(info(path, true));
    };
    let ours = mount::device_number(&link).is_ok_and(|dev| dev == entry.dev);
    if !ours {
        return Err(control_error(&MountError::OtherMount {
            path: path.to_owned(),
            source_dev: entry.source,
        }));
    }
    mount::unmount(&entry.mount_point).map_err(|e| control_error(&e))?;
    tracing::info!(volume = %name, path = %entry.mount_point.display(), "unmounted");
    Ok(info(&entry.mount_point, false))
}
