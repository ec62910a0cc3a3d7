//! The local control API: HTTP/1 + JSON on the daemon's unix socket.
//!
//! | method and path | body | success |
//! |---|---|---|
//! | `POST /v1/volumes` | [`CreateVolumeRequest`] | `201` new, `200` already existed identically; [`VolumeStatus`](::api::VolumeStatus) |
//! | `GET /v1/volumes` | | `200` [`VolumeList`] |
//! | `GET /v1/volumes/{name}` | | `200` `VolumeStatus` |
//! | `DELETE /v1/volumes/{name}` | | `204` |
//! | `POST /v1/volumes/{name}/resize` | [`ResizeVolumeRequest`] | `200` `VolumeStatus` |
//! | `POST /v1/volumes/{name}/export` | [`ExportRequest`](::api::http::ExportRequest) | `200` [`ExportInfo`](::api::http::ExportInfo) (route in [`export`]) |
//! | `POST /v1/volumes/{name}/attach` | none | `200` [`Attachment`](::api::Attachment) (route in [`attach`]) |
//! | `POST /v1/volumes/{name}/detach` | [`DetachRequest`](::api::http::DetachRequest) | `200` `Attachment` (route in [`attach`]) |
//! | `POST /v1/volumes/{name}/refresh` | none | `200` `{"size_bytes": N}`: the attached device shows the volume's current size (route in [`attach`]) |
//! | `POST /v1/volumes/{name}/mount`, `/unmount` | [`MountRequest`](::api::http::MountRequest), [`UnmountRequest`](::api::http::UnmountRequest) | `200` [`MountInfo`](::api::http::MountInfo) (routes in [`mount`]) |
//! | `GET /v1/pools` | | `200` [`PoolList`] |
//! | `GET /v1/nodes` | | `200` [`NodeList`](::api::http::NodeList) (route in [`nodes`]) |
//! | `GET /v1/status` | | `200` [`NodeStatus`] |
//! | `POST /v1/daemon/hand-over` | `{}` | `202` `{"handing_over": true}`: hand the attached volumes over to the next daemon and stop (`ballast daemon --upgrade`) |
//!
//! Request and answer bodies are the `api` crate's [`::api::http`] types, shared with the CLI.
//!
//! Every failure is `{"code": "...", "message": "..."}` with the status chosen in
//! [`error::status_for`]; unknown routes are `404 not_found` and wrong methods
//! `405 invalid_argument`, in the same shape.
//!
//! The router is generic over [`VolumeControl`], like the CSI and Docker adapters, so the API
//! only translates between HTTP and the control trait: names and body shapes are validated
//! here, everything about storage (replica counts, size rounding, idempotency) is decided, and
//! logged, by the control implementation.

pub mod attach;
pub mod error;
pub mod export;
pub mod json_body;
pub mod mount;
pub mod nodes;

use std::sync::Arc;

use ::api::{ErrorKind, VolumeControl, VolumeName, VolumeSpec};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use self::error::ApiError;
use self::json_body::ApiJson;
use crate::node_info::{NodeInfo, VERSION};
use ::api::http::{
    CreateSnapshotRequest, CreateVolumeRequest, NodeStatus, PoolList, PoolsSummary,
    ResizeVolumeRequest, RevertVolumeRequest, SnapshotList, VolumeList,
};

/// What the API handlers share.
#[derive(Debug)]
pub struct ApiState<C> {
    control: Arc<C>,
    node: Arc<NodeInfo>,
}

impl<C> Clone for ApiState<C> {
    fn clone(&self) -> Self {
        Self {
            control: Arc::clone(&self.control),
            node: Arc::clone(&self.node),
        }
    }
}

/// The local API's router over `control`.
pub fn router<C: VolumeControl>(control: Arc<C>, node: Arc<NodeInfo>) -> Router {
    Router::new()
        .route(
            "/v1/volumes",
            post(create_volume::<C>).get(list_volumes::<C>),
        )
        .route(
            "/v1/volumes/{name}",
            get(get_volume::<C>).delete(delete_volume::<C>),
        )
        .route("/v1/volumes/{name}/resize", post(resize_volume::<C>))
        .route("/v1/volumes/{name}/revert", post(revert_volume::<C>))
        .route(
            "/v1/snapshots",
            post(create_snapshot::<C>).get(list_snapshots::<C>),
        )
        .route(
            "/v1/snapshots/{name}",
            get(get_snapshot::<C>).delete(delete_snapshot::<C>),
        )
        .route("/v1/pools", get(list_pools::<C>))
        .route("/v1/status", get(node_status::<C>))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(ApiState { control, node })
}

/// `POST /v1/daemon/hand-over`: have the daemon hand over and stop (`serve` waits on
/// `hand_over`). The socket is root's (or the daemon user's) only, like every route.
pub fn hand_over_router(hand_over: Arc<tokio::sync::Notify>) -> Router {
    Router::new().route(
        "/v1/daemon/hand-over",
        post(move || async move {
            hand_over.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"handing_over": true})),
            )
        }),
    )
}

fn volume_name(name: &str) -> Result<VolumeName, ApiError> {
    VolumeName::new(name).map_err(ApiError::from)
}

async fn create_volume<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<Response, ApiError> {
    let name = volume_name(&req.name)?;
    // Only used to choose between 201 and 200; the control implementation decides whether an
    // existing volume matches the spec (idempotent) or conflicts with it.
    let existed = st.control.get_volume(&name).await.is_ok();
    let size_bytes = req.size.map(::api::byte_size::ByteSize::bytes);
    let spec = VolumeSpec {
        name,
        size_bytes: size_bytes.unwrap_or(0),
        // Unless asked: 1 for a new volume, 0 (the source's count) for a copy.
        replicas: req.replicas.unwrap_or(u8::from(req.source.is_none())),
    };
    let status = match req.source {
        // (The source's name was validated with the body.)
        Some(source) => st.control.create_volume_from(spec, source).await?,
        None if size_bytes.is_none() => {
            return Err(ApiError::from(::api::ControlError::new(
                ErrorKind::InvalidArgument,
                "size is required (for example \"10GiB\"), unless the volume is a copy of a \
                 snapshot or a volume (source)",
            )));
        }
        None => st.control.create_volume(spec).await?,
    };
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(status)).into_response())
}

async fn list_volumes<C: VolumeControl>(
    State(st): State<ApiState<C>>,
) -> Result<Json<VolumeList>, ApiError> {
    Ok(Json(VolumeList {
        volumes: st.control.list_volumes().await?,
    }))
}

async fn get_volume<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let status = st.control.get_volume(&volume_name(&name)?).await?;
    Ok(Json(status).into_response())
}

async fn delete_volume<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = volume_name(&name)?;
    st.control.delete_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize_volume<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> Result<Response, ApiError> {
    let name = volume_name(&name)?;
    let status = st.control.resize_volume(&name, req.size.bytes()).await?;
    Ok(Json(status).into_response())
}

async fn revert_volume<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RevertVolumeRequest>,
) -> Result<Response, ApiError> {
    let name = volume_name(&name)?;
    let snapshot = volume_name(&req.snapshot)?;
    let status = st.control.revert_volume(&name, &snapshot).await?;
    Ok(Json(status).into_response())
}

async fn create_snapshot<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> Result<Response, ApiError> {
    let name = volume_name(&req.name)?;
    let volume = volume_name(&req.volume)?;
    // Only used to choose between 201 and 200.
    let existed = st.control.get_snapshot(&name).await.is_ok();
    let status = st.control.create_snapshot(&volume, &name).await?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(status)).into_response())
}

async fn list_snapshots<C: VolumeControl>(
    State(st): State<ApiState<C>>,
) -> Result<Json<SnapshotList>, ApiError> {
    Ok(Json(SnapshotList {
        snapshots: st.control.list_snapshots().await?,
    }))
}

async fn get_snapshot<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let status = st.control.get_snapshot(&volume_name(&name)?).await?;
    Ok(Json(status).into_response())
}

async fn delete_snapshot<C: VolumeControl>(
    State(st): State<ApiState<C>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.control.delete_snapshot(&volume_name(&name)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_pools<C: VolumeControl>(
    State(st): State<ApiState<C>>,
) -> Result<Json<PoolList>, ApiError> {
    Ok(Json(PoolList {
        pools: st.control.list_pools().await?,
    }))
}

async fn node_status<C: VolumeControl>(
    State(st): State<ApiState<C>>,
) -> Result<Json<NodeStatus>, ApiError> {
    let pools = st.control.list_pools().await?;
    let volumes = st.control.list_volumes().await?;
    Ok(Json(NodeStatus {
        version: VERSION.to_owned(),
        node_id: st.node.node_id().to_owned(),
        engine: st.node.engine().to_owned(),
        uptime_seconds: st.node.uptime().as_secs(),
        pools: PoolsSummary::of(&pools),
        volumes: volumes.len(),
    }))
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no such API route: {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    error::method_not_allowed(&method, uri.path())
}
