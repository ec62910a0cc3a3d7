//! This node as the CSI node service and the Docker plugin see it: its identity and zone,
//! whether it has booted, the storage nodes placement can use, and attaching volumes here
//! through the [`Attacher`]. The local API, CSI and Docker all attach, detach and refresh
//! through this one [`NodeControl`], so they share one record of what is attached and cannot
//! drift apart.

use std::path::PathBuf;
use std::sync::Arc;

use ::api::{Attachment, ControlError, ErrorKind, NodeControl, NodeRecord, VolumeName};

use crate::node_info::{NodeInfo, Phase};
use cluster::control::Mode;
use cluster::Cluster;
use frontends::attach::Attacher;

/// This node's [`NodeControl`].
#[derive(Debug)]
pub struct NodeHost {
    info: Arc<NodeInfo>,
    zone: Option<String>,
    cluster: Arc<Cluster>,
    attacher: Option<Arc<Attacher>>,
}

impl NodeHost {
    /// The host of `info` in `zone`, placing over `cluster` (this node alone in standalone
    /// mode) and attaching with `attacher` (`None` when the attach frontend failed to start).
    pub fn new(
        info: Arc<NodeInfo>,
        zone: Option<String>,
        cluster: Arc<Cluster>,
        attacher: Option<Arc<Attacher>>,
    ) -> Self {
        Self {
            info,
            zone,
            cluster,
            attacher,
        }
    }

    fn attacher(&self) -> Result<Arc<Attacher>, ControlError> {
        self.attacher.clone().ok_or_else(|| {
            ControlError::new(
                ErrorKind::Unavailable,
                "attaching volumes is unavailable on this node (the attach frontend did not \
                 start; see the daemon log)",
            )
        })
    }

    /// Run blocking attacher work on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Attacher) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let attacher = self.attacher()?;
        tokio::task::spawn_blocking(move || f(&attacher))
            .await
            .map_err(|e| ControlError::new(ErrorKind::Internal, e.to_string()))?
    }
}

impl NodeControl for NodeHost {
    fn node_id(&self) -> &str {
        self.info.node_id()
    }

    fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    fn ready(&self) -> bool {
        self.info.phase() == Phase::Ready
    }

    fn shared(&self) -> bool {
        self.cluster.mode() == Mode::Cluster
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        self.cluster.nodes().await
    }

    async fn attach(&self, name: &VolumeName, force: bool) -> Result<Attachment, ControlError> {
        let name = name.clone();
        self.blocking(move |a| a.attach(&name, force)).await
    }

    fn device(&self, name: &VolumeName) -> Option<PathBuf> {
        self.attacher.as_ref()?.device(name)
    }

    async fn detach(&self, name: &VolumeName, force: bool) -> Result<Attachment, ControlError> {
        let name = name.clone();
        self.blocking(move |a| a.detach(&name, force)).await
    }

    async fn refresh_size(&self, name: &VolumeName) -> Result<u64, ControlError> {
        // A resize made on another node changed the record and the replicas: the nexus
        // attached here takes the recorded size before the device is refreshed.
        self.cluster.sync_size(name).await?;
        let name = name.clone();
        self.blocking(move |a| a.refresh(&name)).await
    }
}
