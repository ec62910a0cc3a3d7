//! The Identity service: who the driver is, what it offers, and whether it is ready.

use std::collections::HashMap;
use std::sync::Arc;

use api::NodeControl;
use tonic::{Request, Response, Status};

use crate::proto::identity_server::Identity as IdentityService;
use crate::proto::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::{DRIVER_NAME, VERSION};

/// The Identity service over a node.
#[derive(Debug)]
pub struct Identity<N> {
    node: Arc<N>,
}

impl<N> Identity<N> {
    /// The service for `node`.
    pub fn new(node: Arc<N>) -> Self {
        Self { node }
    }
}

fn service(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(Type::Service(Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl<N: NodeControl> IdentityService for Identity<N> {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: VERSION.to_owned(),
            manifest: HashMap::from([("node".to_owned(), self.node.node_id().to_owned())]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.node.ready()),
        }))
    }
}
