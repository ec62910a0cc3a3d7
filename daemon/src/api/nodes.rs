//! `GET /v1/nodes`: the cluster's live nodes (in standalone mode, this node alone).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use ::api::VolumeControl;
use volume::pool::Storage;

use super::error::ApiError;
use crate::node_info::{NodeInfo, VERSION};
use cluster::model::NodeRecord;
use cluster::Cluster;

/// The answer of `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    /// `standalone` or `cluster`.
    pub mode: String,
    /// The live nodes, sorted by id.
    pub nodes: Vec<NodeRecord>,
}

#[derive(Debug, Clone)]
struct NodesState {
    cluster: Option<Arc<Cluster>>,
    storage: Arc<Storage>,
    node: Arc<NodeInfo>,
}

/// The route, over the cluster if this node is in one.
pub fn router(cluster: Option<Arc<Cluster>>, storage: Arc<Storage>, node: Arc<NodeInfo>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .with_state(NodesState {
            cluster,
            storage,
            node,
        })
}

async fn list_nodes(State(st): State<NodesState>) -> Result<Json<NodeList>, ApiError> {
    if let Some(c) = &st.cluster {
        return Ok(Json(NodeList {
            mode: "cluster".into(),
            nodes: c.nodes().await?,
        }));
    }
    let pools = st.storage.list_pools().await?;
    Ok(Json(NodeList {
        mode: "standalone".into(),
        nodes: vec![NodeRecord {
            id: st.node.node_id().to_owned(),
            replica_addr: String::new(),
            zone: None,
            capacity_bytes: pools.iter().map(|p| p.capacity_bytes).sum(),
            free_bytes: pools.iter().map(|p| p.free_bytes).sum(),
            version: VERSION.to_owned(),
        }],
    }))
}
