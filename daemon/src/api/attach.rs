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
//! The routes call this node's one [`NodeControl`] ([`NodeHost`]), the same path CSI and
//! Docker use, so `force`, the size sync of a refresh and the record of what is attached
//! are the same whoever asks.

use std::sync::Arc;

use ::api::http::{AttachRequest, DetachRequest, RefreshResponse};
use ::api::{Attachment, ErrorKind, NodeControl, VolumeName};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::error::ApiError;
use super::json_body::ApiJson;
use crate::host::NodeHost;

/// The attach routes over this node's [`NodeHost`].
pub fn router(host: Arc<NodeHost>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/refresh", post(refresh_volume))
        .with_state(host)
}

async fn attach_volume(
    State(host): State<Arc<NodeHost>>,
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
    Ok(Json(host.attach(&name, req.force).await?))
}

async fn detach_volume(
    State(host): State<Arc<NodeHost>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<DetachRequest>,
) -> Result<Json<Attachment>, ApiError> {
    let name = VolumeName::new(&name)?;
    Ok(Json(host.detach(&name, req.force).await?))
}

async fn refresh_volume(
    State(host): State<Arc<NodeHost>>,
    Path(name): Path<String>,
) -> Result<Json<RefreshResponse>, ApiError> {
    let name = VolumeName::new(&name)?;
    let size_bytes = host.refresh_size(&name).await?;
    Ok(Json(RefreshResponse { size_bytes }))
}
