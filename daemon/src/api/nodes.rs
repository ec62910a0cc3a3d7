//! `GET /v1/nodes`: the cluster's live nodes (in standalone mode, this node alone), as this
//! node's [`NodeControl`] sees them (the same list CSI places volumes over).

use std::sync::Arc;

use ::api::http::NodeList;
use ::api::NodeControl;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::error::ApiError;
use crate::host::NodeHost;

/// The route over this node's [`NodeHost`].
pub fn router(host: Arc<NodeHost>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .with_state(host)
}

async fn list_nodes(State(host): State<Arc<NodeHost>>) -> Result<Json<NodeList>, ApiError> {
    let mode = if host.shared() {
        "cluster"
    } else {
        "standalone"
    };
    Ok(Json(NodeList {
        mode: mode.into(),
        nodes: host.nodes().await?,
    }))
}
