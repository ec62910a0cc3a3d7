//! The NBD export route of the local API: `POST /v1/volumes/{name}/export`.
//!
//! Body: [`ExportRequest`] (`{}` or `{"tcp": "ADDR"}`); answer `200` [`ExportInfo`]. Every
//! volume is always exported on the daemon's NBD unix socket; with `tcp`, the volume is also
//! served on a TCP listener at that address (port 0 picks a free port, reported back) until
//! the daemon stops. Unknown volumes are `404 not_found`, an address that cannot be bound is
//! `400 invalid_argument`.
//!
//! Kept apart from [`super::router`] because it needs the concrete [`NbdServer`]; the
//! daemon merges both routers.

use std::sync::Arc;

use ::api::http::{ExportInfo, ExportRequest};
use ::api::{ErrorKind, VolumeName};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use volume::pool::Storage;

use super::error::ApiError;
use super::json_body::ApiJson;
use frontends::nbd::NbdServer;

#[derive(Debug, Clone)]
struct ExportState {
    storage: Arc<Storage>,
    nbd: Arc<NbdServer>,
}

/// The export route, with its own state.
/// The export route of a node in cluster mode: NBD would bypass replication and fencing, so
/// export is refused there with a message saying so.
pub fn unavailable_router() -> Router {
    Router::new().route(
        "/v1/volumes/{name}/export",
        post(|| async {
            ApiError::new(
                ErrorKind::Unimplemented,
                "NBD export is not available in cluster mode yet (it would bypass replication \
                 and fencing); attach the volume with `ballast volume attach` instead",
            )
        }),
    )
}

/// The export route over `storage` and `nbd`.
pub fn router(storage: Arc<Storage>, nbd: Arc<NbdServer>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/export", post(export_volume))
        .with_state(ExportState { storage, nbd })
}

async fn export_volume(
    State(st): State<ExportState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ExportRequest>,
) -> Result<Json<ExportInfo>, ApiError> {
    let name = VolumeName::new(&name)?;
    st.storage.replica(&name)?;
    let unix_uri = st.nbd.unix_uri(&name);
    let tcp = match req.tcp {
        Some(addr) => Some(st.nbd.export_tcp(&name, addr).await.map_err(|e| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                format!("cannot listen for NBD on {addr}: {e}"),
            )
        })?),
        None => None,
    };
    Ok(Json(ExportInfo {
        volume: name.to_string(),
        uri: tcp.map_or_else(|| unix_uri.clone(), |a| format!("nbd://{a}/{name}")),
        unix_uri,
        socket: st.nbd.socket().display().to_string(),
        tcp: tcp.map(|a| a.to_string()),
    }))
}
