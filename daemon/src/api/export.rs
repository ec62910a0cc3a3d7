//! The NBD export route of the local API: `POST /v1/volumes/{name}/export`.
//!
//! Body: [`ExportRequest`] (`{}`, `{"tcp": "ADDR"}`, optionally with
//! `"insecure_plaintext": true`); answer `200` [`ExportInfo`]. Every volume is always exported
//! on the daemon's NBD unix socket; with `tcp`, the volume is also served on a TCP listener at
//! that address (port 0 picks a free port, reported back) until the daemon stops, over TLS
//! with client certificates from the cluster CA (`nbds://`). Unknown volumes are
//! `404 not_found`, an address that cannot be bound is `400 invalid_argument`, a TCP export
//! without TLS (none configured, plaintext not asked for) or one whose address already serves
//! the other way is `412 failed_precondition`.
//!
//! An export serves the volume's device from this node's shared devices (see
//! `frontends::devices`): opened by the first NBD connection, taking the attachment as an
//! attach does, through the nexus of a replicated volume, fenced when another node takes the
//! volume over. Kept apart from [`super::router`] because it needs the concrete
//! [`NbdServer`]; the daemon merges both routers.

use std::sync::Arc;

use ::api::http::{ExportInfo, ExportRequest};
use ::api::{ErrorKind, VolumeName};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use frontends::nbd::server::ExportError;
use frontends::nbd::NbdServer;
use replication::device::DeviceSource;

use super::error::ApiError;
use super::json_body::ApiJson;

#[derive(Debug, Clone)]
struct ExportState {
    devices: Arc<dyn DeviceSource>,
    nbd: Arc<NbdServer>,
}

/// The export route over this node's `devices` and `nbd`.
pub fn router(devices: Arc<dyn DeviceSource>, nbd: Arc<NbdServer>) -> Router {
    Router::new()
        .route("/v1/volumes/{name}/export", post(export_volume))
        .with_state(ExportState { devices, nbd })
}

async fn export_volume(
    State(st): State<ExportState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ExportRequest>,
) -> Result<Json<ExportInfo>, ApiError> {
    let name = VolumeName::new(&name)?;
    let (devices, n) = (Arc::clone(&st.devices), name.clone());
    tokio::task::spawn_blocking(move || devices.exists(&n))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))??;
    let unix_uri = st.nbd.unix_uri(&name);
    if req.insecure_plaintext && req.tcp.is_none() {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            "insecure_plaintext applies to a TCP export: give tcp too",
        ));
    }
    let tcp = match req.tcp {
        Some(addr) => Some(
            st.nbd
                .export_tcp(&name, addr, req.insecure_plaintext)
                .await
                .map_err(|e| {
                    let kind = match e {
                        ExportError::Bind { .. } => ErrorKind::InvalidArgument,
                        ExportError::NeedsTls | ExportError::Mismatch { .. } => {
                            ErrorKind::FailedPrecondition
                        }
                    };
                    ApiError::new(kind, e.to_string())
                })?,
        ),
        None => None,
    };
    Ok(Json(ExportInfo {
        volume: name.to_string(),
        uri: tcp.map_or_else(
            || unix_uri.clone(),
            |t| {
                let scheme = if t.tls { "nbds" } else { "nbd" };
                format!("{scheme}://{}/{name}", t.addr)
            },
        ),
        unix_uri,
        socket: st.nbd.socket().display().to_string(),
        tcp: tcp.map(|t| t.addr.to_string()),
        tls: tcp.is_some_and(|t| t.tls),
    }))
}
