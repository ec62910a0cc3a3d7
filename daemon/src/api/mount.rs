//! The filesystem routes of the local API: `POST /v1/volumes/{name}/mount` and
//! `POST /v1/volumes/{name}/unmount`.
//!
//! Mount takes [`MountRequest`]: it attaches the volume if needed (through the [`Attacher`],
//! so the attachment is persisted like `ballast volume attach`), then runs
//! [`crate::mount::ensure_mounted`] — format only an empty device, never reformat, mount,
//! idempotent. Unmount takes [`UnmountRequest`]; it unmounts the path if the volume's device
//! is mounted there (success if nothing is mounted) and leaves the volume attached.
//! Both answer `200` [`MountInfo`].
//!
//! Errors: a mount point that is missing, relative or not a directory and an unsupported
//! filesystem are `400 invalid_argument`; an unknown volume is `404 not_found`; a device
//! holding another filesystem, another device mounted at the path, or a busy filesystem are
//! `412 failed_precondition`. Mount and unmount are serialised by one mutex (they are rare,
//! and a concurrent mount and unmount of one path must not interleave).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ::api::{ControlError, ErrorKind, VolumeName};
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::json_body::ApiJson;
use frontends::attach::{Attacher, DEV_DIR};
use crate::mount::{self, MountError};

/// The body of `POST /v1/volumes/{name}/mount`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The mount point: an existing directory, absolute.
    pub path: PathBuf,
    /// The filesystem to create on an empty volume (`ext4` or `xfs`). When absent, an empty
    /// volume gets ext4 and an existing filesystem of any type is mounted; when present, an
    /// existing filesystem of another type is refused.
    #[serde(default)]
    pub fs: Option<String>,
    /// Extra `mkfs` arguments, used only when the volume is formatted.
    #[serde(default)]
    pub mkfs_options: Vec<String>,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The body of `POST /v1/volumes/{name}/unmount`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmountRequest {
    /// The mount point.
    pub path: PathBuf,
}

/// The answer of mount and unmount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    /// The volume.
    pub volume: String,
    /// The mount point.
    pub path: String,
    /// The stable device name (`/dev/ballast/NAME`).
    pub device: String,
    /// The filesystem type (empty after an unmount).
    #[serde(default)]
    pub fs: String,
    /// Whether the volume is mounted at `path` now.
    pub mounted: bool,
    /// Whether this call formatted the volume.
    #[serde(default)]
    pub formatted: bool,
    /// Whether nothing had to be done.
    #[serde(default)]
    pub unchanged: bool,
}

#[derive(Debug)]
struct MountState {
    attacher: Arc<Attacher>,
    ops: Mutex<()>,
}

/// The filesystem routes, with their own state.
pub fn router(attacher: Arc<Attacher>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/mount", post(mount_volume))
        .route("/v1/volumes/{name}/unmount", post(unmount_volume))
        .with_state(Arc::new(MountState {
            attacher,
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
    Ok(Json(blocking(move || do_mount(&st, &name, &req)).await?))
}

fn do_mount(
    st: &MountState,
    name: &VolumeName,
    req: &MountRequest,
) -> Result<MountInfo, ControlError> {
    let _op = st.ops.lock().expect("mount lock");
    // Refuse bad arguments before attaching anything.
    if let Some(fs) = &req.fs {
        if !mount::SUPPORTED_FS.contains(&fs.as_str()) {
            return Err(control_error(&MountError::UnsupportedFs(fs.clone())));
        }
    }
    mount::check_mount_point(&req.path).map_err(|e| control_error(&e))?;
    let att = st.attacher.attach(name)?;
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
    Ok(Json(
        blocking(move || do_unmount(&st, &name, &req.path)).await?,
    ))
}

fn do_unmount(st: &MountState, name: &VolumeName, path: &Path) -> Result<MountInfo, ControlError> {
    let _op = st.ops.lock().expect("mount lock");
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
