//! The daemon's TCP HTTP endpoint for operators and orchestrators: `/healthz`, `/readyz` and
//! `/metrics`.
//!
//! It is served from the moment the daemon has its data-directory lock, before storage is
//! open, so that a slow start (a large journal replay) shows as "alive but not ready" rather
//! than as a dead process.
//!
//! Invariant: none of these routes touches the control API or waits on another node.

use std::sync::Arc;

use ::api::VolumeControl;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::{IoStatsSource, MetricsExporter, CONTENT_TYPE};
use crate::node_info::{NodeInfo, Phase};

/// What the endpoint's handlers share.
#[derive(Debug)]
struct OpsState<S> {
    node: Arc<NodeInfo>,
    metrics: Arc<MetricsExporter<S>>,
}

impl<S> Clone for OpsState<S> {
    fn clone(&self) -> Self {
        Self {
            node: Arc::clone(&self.node),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The router for `/healthz`, `/readyz` and `/metrics`.
pub fn router<S>(node: Arc<NodeInfo>, metrics: Arc<MetricsExporter<S>>) -> Router
where
    S: VolumeControl + IoStatsSource + Send + Sync + 'static,
{
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics_text::<S>))
        .with_state(OpsState { node, metrics })
}

/// Liveness: `200` whenever the process can answer at all. Restarting a daemon because its
/// storage is slow to open would only make it slower.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: `200` once this node's storage is open and its local API socket is serving;
/// `503` while starting and while shutting down.
///
/// Deliberately, readiness does NOT mean "can reach peers" or "has quorum". Orchestrators
/// start the pods of a StatefulSet or DaemonSet rollout one at a time and wait for each to be
/// ready before starting the next; if readiness waited for a quorum of peers, the first pod
/// would wait for peers that the orchestrator will not start until it is ready, and the
/// rollout would deadlock. Peer health belongs in metrics and volume states, not here.
async fn readyz<S>(State(st): State<OpsState<S>>) -> (StatusCode, &'static str) {
    match st.node.phase() {
        Phase::Ready => (StatusCode::OK, "ready\n"),
        Phase::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: opening storage and the local API\n",
        ),
        Phase::Stopping => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        ),
    }
}

/// Metrics in the OpenMetrics text format, gathered at scrape time.
async fn metrics_text<S>(State(st): State<OpsState<S>>) -> impl IntoResponse
where
    S: VolumeControl + IoStatsSource,
{
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        st.metrics.render().await,
    )
}
