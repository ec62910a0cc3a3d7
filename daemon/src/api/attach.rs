//! The attach routes of the local API: `POST /v1/volumes/{name}/attach`,
//! `POST /v1/volumes/{name}/detach` and `POST /v1/volumes/{name}/refresh`.
//!
//! Attach takes no body or [`AttachRequest`] (`{"force": true}` takes a replicated volume
//! over from a live node) and answers `200` [`Attachment`]; it is idempotent. Detach
//! takes [`DetachRequest`] (`{"force": true}` to detach a device that is mounted or open) and
//! answers `200` [`Attachment`] with `attached: false`; detaching a volume that is not attached
//! succeeds. Unknown volumes are `404 not_found`; a busy device is `412 failed_precondition`.
//! Refresh takes no body and makes the attached device show the size its volume serves now
//! (after a resize), answering `200` [`RefreshResponse`]; a volume not attached here is
//! `412 failed_precondition`. (In cluster mode the attached device follows a resize made on
//! another node within a repair interval.)
//!
//! Kept apart from [`super::router`] because it needs the concrete [`Attacher`]. The work is
//! blocking (it waits on the kernel), so it runs on tokio's blocking threads.

use std::sync::Arc;

use ::api::{ErrorKind, VolumeName};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::json_body::ApiJson;
use frontends::attach::{Attacher, Attachment};

/// The body of `POST /v1/volumes/{name}/detach`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachRequest {
    /// Detach even if the device is mounted or open.
    #[serde(default)]
    pub force: bool,
}

/// The body of `POST /v1/volumes/{name}/attach` (optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Take a replicated volume over from a node that still holds it; the old writer is
    /// fenced by epoch.
    #[serde(default)]
    pub force: bool,
}

/// The answer of `POST /v1/volumes/{name}/refresh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshResponse {
    /// The size the attached device shows now, in bytes.
    pub size_bytes: u64,
}

/// The attach routes, with their own state.
pub fn router(attacher: Arc<Attacher>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/refresh", post(refresh_volume))
        .with_state(attacher)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ::api::ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(ApiError::from)
}

async fn attach_volume(
    State(attacher): State<Arc<Attacher>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Attachment>, ApiError> {
    let name = VolumeName::new(&name)?;
    let req: AttachRequest = if body.iter().all(u8::is_ascii_whitespace) {
        AttachRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("invalid attach request: {e}"),
            )
        })?
    };
    Ok(Json(
        blocking(move || attacher.attach_with(&name, req.force)).await?,
    ))
}

async fn detach_volume(
    State(attacher): State<Arc<Attacher>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<DetachRequest>,
) -> Result<Json<Attachment>, ApiError> {
    let name = VolumeName::new(&name)?;
    Ok(Json(
        blocking(move || attacher.detach(&name, req.force)).await?,
    ))
}

async fn refresh_volume(
    State(attacher): State<Arc<Attacher>>,
    Path(name): Path<String>,
) -> Result<Json<RefreshResponse>, ApiError> {
    let name = VolumeName::new(&name)?;
    let size_bytes = blocking(move || attacher.refresh(&name)).await?;
    Ok(Json(RefreshResponse { size_bytes }))
}
