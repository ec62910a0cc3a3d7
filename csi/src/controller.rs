//! The Controller service: volumes' life cycle, cluster-wide.
//!
//! RPCs and their status:
//! - CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes (paged by name),
//!   GetCapacity (per topology segment), ControllerGetCapabilities, ControllerExpandVolume,
//!   ControllerGetVolume (with a volume condition): served.
//! - ControllerPublishVolume / ControllerUnpublishVolume: not advertised — the volume is
//!   attached at NodeStageVolume and fenced by epoch, so Kubernetes never waits on a
//!   VolumeAttachment. They answer `UNIMPLEMENTED`.
//! - CreateSnapshot, DeleteSnapshot, ListSnapshots (paged by name, filtered by snapshot and by
//!   source volume) and CreateVolume from a snapshot or a volume (a content source): served.
//!   A snapshot's id is its Ballast name (derived from the CO's name as a volume's is).
//!   Advertised by standalone nodes only: in cluster mode the replica protocol does not carry
//!   snapshots yet, and the control plane answers `UNIMPLEMENTED`.
//! - ControllerModifyVolume: not advertised (no mutable parameters); `UNIMPLEMENTED`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use api::{
    NodeControl, NodeRecord, PlacementHints, SnapshotStatus, VolumeControl, VolumeName,
    VolumeSource, VolumeSpec, VolumeState, VolumeStatus,
};
use tonic::{Request, Response, Status};

use crate::params::{self, CTX_FS_TYPE};
use crate::proto::controller_server::Controller as ControllerService;
use crate::proto::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::proto::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource as CsiVolumeSource,
};
use crate::proto::{
    list_snapshots_response, list_volumes_response, validate_volume_capabilities_response,
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, ListVolumesRequest, ListVolumesResponse, Snapshot,
    Topology, TopologyRequirement, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, Volume, VolumeCondition, VolumeContentSource,
};
use crate::status::{from_control, invalid, missing, OpLocks};

/// The Controller service.
#[derive(Debug)]
pub struct Controller<C, N> {
    control: Arc<C>,
    node: Arc<N>,
    ops: Arc<OpLocks>,
}

impl<C, N> Controller<C, N> {
    /// The service over `control` and `node`, sharing the per-volume operation locks `ops`.
    pub fn new(control: Arc<C>, node: Arc<N>, ops: Arc<OpLocks>) -> Self {
        Self { control, node, ops }
    }
}

/// What a `ListVolumes` paging token starts with (see `list_volumes`).
const TOKEN_PREFIX: &str = "after:";

/// The volume's condition: abnormal while degraded, rebuilding or faulted, saying which.
pub fn condition(status: &VolumeStatus) -> VolumeCondition {
    let mut problems = Vec::new();
    for r in &status.replica_status {
        match r.state.as_str() {
            "healthy" => {}
            "rebuilding" => {
                let progress = r.rebuild.as_ref().map_or(String::new(), |b| {
                    let pct = (b.done_bytes * 100)
                        .checked_div(b.total_bytes)
                        .unwrap_or(100);
                    format!(" ({} rebuild {pct}% done)", b.kind)
                });
                problems.push(format!(
                    "replica on node {} is rebuilding{progress}",
                    r.node_id
                ));
            }
            other => problems.push(format!("replica on node {} is {other}", r.node_id)),
        }
    }
    let abnormal = status.state != VolumeState::Online || !problems.is_empty();
    let message = if abnormal {
        let mut m = format!("volume is {}", status.state);
        if problems.is_empty() {
            m.push_str(" (no replica is reachable)");
        } else {
            m.push_str(": ");
            m.push_str(&problems.join("; "));
        }
        m
    } else {
        format!(
            "volume is online: {} healthy replica(s)",
            status.replica_status.len()
        )
    };
    VolumeCondition { abnormal, message }
}

impl<C: VolumeControl, N: NodeControl> Controller<C, N> {
    /// Where `status`'s volume can be used from: anywhere the cluster runs (a Ballast volume
    /// is reachable from every node) within `allowed`; on a standalone node, only there.
    fn accessible(
        &self,
        nodes: &[NodeRecord],
        allowed: Option<&BTreeSet<String>>,
    ) -> Vec<Topology> {
        if !self.node.shared() {
            return vec![params::node_segment(self.node.node_id(), self.node.zone())];
        }
        let mut zones = BTreeSet::new();
        let mut zoneless = BTreeSet::new();
        for n in nodes {
            if allowed.is_some_and(|a| !a.contains(&n.id)) {
                continue;
            }
            match &n.zone {
                Some(z) => zones.insert(z.clone()),
                None => zoneless.insert(n.id.clone()),
            };
        }
        zones
            .into_iter()
            .map(|z| Topology {
                segments: HashMap::from([(crate::ZONE_KEY.to_owned(), z)]),
            })
            .chain(
                zoneless
                    .into_iter()
                    .map(|id| params::node_segment(&id, None)),
            )
            .collect()
    }

    /// Nodes allowed by `req`'s requisite topology (all when none), and the preferred ones in
    /// order. `RESOURCE_EXHAUSTED` when no node is allowed.
    fn placement(
        nodes: &[NodeRecord],
        req: Option<&TopologyRequirement>,
    ) -> Result<(Option<BTreeSet<String>>, Vec<String>), Status> {
        let Some(req) = req else {
            return Ok((None, Vec::new()));
        };
        let mut allowed = None;
        if !req.requisite.is_empty() {
            let mut set = BTreeSet::new();
            for n in nodes {
                for seg in &req.requisite {
                    if params::matches(n, seg)? {
                        set.insert(n.id.clone());
                    }
                }
            }
            if set.is_empty() {
                return Err(Status::resource_exhausted(format!(
                    "no Ballast node lies in the requisite topology {:?}",
                    req.requisite
                        .iter()
                        .map(|t| &t.segments)
                        .collect::<Vec<_>>()
                )));
            }
            allowed = Some(set);
        }
        let mut preferred = Vec::new();
        for seg in &req.preferred {
            for n in nodes {
                if params::matches(n, seg)?
                    && allowed.as_ref().is_none_or(|a| a.contains(&n.id))
                    && !preferred.contains(&n.id)
                {
                    preferred.push(n.id.clone());
                }
            }
        }
        Ok((allowed, preferred))
    }

    async fn to_volume(&self, status: &VolumeStatus, fs_type: Option<&str>) -> Volume {
        let nodes = self.node.nodes().await.unwrap_or_default();
        Volume {
            capacity_bytes: crate::to_i64(status.size_bytes),
            volume_id: status.name.to_string(),
            volume_context: fs_type
                .map(|f| HashMap::from([(CTX_FS_TYPE.to_owned(), f.to_owned())]))
                .unwrap_or_default(),
            content_source: None,
            accessible_topology: self.accessible(&nodes, None),
        }
    }
}

/// The Ballast source of a CSI content source; a source with no id is `INVALID_ARGUMENT`, an
/// id that cannot name anything is `NOT_FOUND`.
fn content_source(source: Option<&VolumeContentSource>) -> Result<Option<VolumeSource>, Status> {
    let Some(t) = source.and_then(|s| s.r#type.as_ref()) else {
        return Ok(None);
    };
    let (id, what) = match t {
        SourceType::Snapshot(s) => (&s.snapshot_id, "snapshot"),
        SourceType::Volume(v) => (&v.volume_id, "volume"),
    };
    if id.is_empty() {
        return Err(missing(&format!("volume_content_source.{what} id")));
    }
    let name = VolumeName::new(id)
        .map_err(|_| Status::not_found(format!("source {what} {id} does not exist")))?;
    Ok(Some(match t {
        SourceType::Snapshot(_) => VolumeSource::Snapshot(name),
        SourceType::Volume(_) => VolumeSource::Volume(name),
    }))
}

/// The CSI content source of a Ballast source.
fn csi_source(source: &VolumeSource) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(match source {
            VolumeSource::Snapshot(s) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: s.to_string(),
            }),
            VolumeSource::Volume(v) => SourceType::Volume(CsiVolumeSource {
                volume_id: v.to_string(),
            }),
        }),
    }
}

/// A snapshot as CSI describes it.
fn csi_snapshot(s: &SnapshotStatus) -> Snapshot {
    Snapshot {
        size_bytes: crate::to_i64(s.size_bytes),
        snapshot_id: s.name.to_string(),
        source_volume_id: s
            .source_volume
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(s.created_at).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ready_to_use: s.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

impl<C: VolumeControl, N: NodeControl> Controller<C, N> {
    /// CreateVolume from a content source (the volume lock held).
    async fn create_from(
        &self,
        name: &VolumeName,
        req: &CreateVolumeRequest,
        source: VolumeSource,
        replicas: u8,
        fs_type: Option<&str>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let not_found = |what: &str, n: &VolumeName| {
            Status::not_found(format!("source {what} {n} does not exist"))
        };
        let source_size = match &source {
            VolumeSource::Snapshot(s) => match self.control.get_snapshot(s).await {
                Ok(st) => st.size_bytes,
                Err(e) if e.kind() == api::ErrorKind::NotFound => {
                    return Err(not_found("snapshot", s))
                }
                Err(e) => return Err(from_control(&e)),
            },
            VolumeSource::Volume(v) => match self.control.get_volume(v).await {
                Ok(st) => st.size_bytes,
                Err(e) if e.kind() == api::ErrorKind::NotFound => {
                    return Err(not_found("volume", v))
                }
                Err(e) => return Err(from_control(&e)),
            },
        };
        let range = req.capacity_range.as_ref();
        let limit = range.map_or(0, |r| r.limit_bytes);
        if limit > 0 && u64::try_from(limit).unwrap_or(0) < source_size {
            return Err(Status::out_of_range(format!(
                "the source holds {source_size} bytes, more than the limit of {limit}"
            )));
        }
        let required = range.map_or(0, |r| u64::try_from(r.required_bytes).unwrap_or(0));
        let spec = VolumeSpec {
            name: name.clone(),
            size_bytes: required.max(source_size),
            replicas,
        };
        let status = self
            .control
            .create_volume_from(spec, source.clone())
            .await
            .map_err(|e| match e.kind() {
                api::ErrorKind::Conflict => Status::already_exists(e.full_message()),
                _ => from_control(&e),
            })?;
        tracing::info!(volume = %name, source = ?source, "CSI created a volume from a copy");
        let mut volume = self.to_volume(&status, fs_type).await;
        volume.content_source = Some(csi_source(&source));
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }
}

/// One page of `all` (sorted here by `name`) for a List call: at most `max_entries` (0: all)
/// after the one `token` names, and the token of the next page (empty after the last).
///
/// A token is `after:` and the name of the last entry returned, so a token this driver did
/// not issue (`ABORTED`) is told apart from one whose entry was deleted since (the listing
/// goes on after it).
fn page_of<T>(
    mut all: Vec<T>,
    name: impl Fn(&T) -> &VolumeName,
    max_entries: i32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    if max_entries < 0 {
        return Err(invalid(format!(
            "max_entries must not be negative, got {max_entries}"
        )));
    }
    let after = if token.is_empty() {
        None
    } else {
        let after = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|n| VolumeName::new(n).ok());
        Some(after.ok_or_else(|| {
            Status::aborted(format!(
                "starting_token {token:?} was not issued by this driver; list again without one"
            ))
        })?)
    };
    all.sort_by(|a, b| name(a).cmp(name(b)));
    all.retain(|e| after.as_ref().is_none_or(|a| name(e) > a));
    let limit = if max_entries == 0 {
        all.len()
    } else {
        max_entries as usize
    };
    let more = all.len() > limit;
    all.truncate(limit);
    let next = match all.last() {
        Some(last) if more => format!("{TOKEN_PREFIX}{}", name(last)),
        _ => String::new(),
    };
    Ok((all, next))
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl<C: VolumeControl, N: NodeControl> ControllerService for Controller<C, N> {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_name_for(&req.name)?;
        params::check_capabilities(&req.volume_capabilities)?;
        let p = params::parameters(&req.parameters)?;
        let size = params::size_for(req.capacity_range.as_ref())?;
        let source = content_source(req.volume_content_source.as_ref())?;
        let _op = self.ops.acquire(name.as_str())?;
        if let Some(source) = source {
            return self
                .create_from(&name, &req, source, p.replicas, p.fs_type.as_deref())
                .await;
        }
        let nodes = self.node.nodes().await.map_err(|e| from_control(&e))?;
        let (allowed, preferred) =
            Self::placement(&nodes, req.accessibility_requirements.as_ref())?;
        if !self.node.shared()
            && allowed
                .as_ref()
                .is_some_and(|a| !a.contains(self.node.node_id()))
        {
            return Err(Status::resource_exhausted(format!(
                "this standalone node ({}) is not in the requisite topology",
                self.node.node_id()
            )));
        }
        if let Ok(existing) = self.control.get_volume(&name).await {
            if existing.replicas == p.replicas
                && params::size_fits(existing.size_bytes, req.capacity_range.as_ref())
            {
                let mut volume = self.to_volume(&existing, p.fs_type.as_deref()).await;
                volume.accessible_topology = self.accessible(&nodes, allowed.as_ref());
                return Ok(Response::new(CreateVolumeResponse {
                    volume: Some(volume),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume {name} already exists with {} bytes and {} replica(s), which does not \
                 match this request",
                existing.size_bytes, existing.replicas
            )));
        }
        let spec = VolumeSpec {
            name: name.clone(),
            size_bytes: size,
            replicas: p.replicas,
        };
        let hints = PlacementHints {
            preferred_nodes: preferred,
            allowed_nodes: allowed.as_ref().map(|a| a.iter().cloned().collect()),
            zone_spread: p.zone_spread,
        };
        let status = self
            .control
            .create_volume_placed(spec, &hints)
            .await
            .map_err(|e| from_control(&e))?;
        tracing::info!(volume = %name, size, replicas = p.replicas, "CSI created a volume");
        let mut volume = self.to_volume(&status, p.fs_type.as_deref()).await;
        volume.accessible_topology = self.accessible(&nodes, allowed.as_ref());
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        // An ID that cannot name a volume names none: deleting it is done.
        let Ok(name) = VolumeName::new(&req.volume_id) else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        let _op = self.ops.acquire(name.as_str())?;
        match self.control.delete_volume(&name).await {
            Ok(()) => {
                tracing::info!(volume = %name, "CSI deleted a volume");
                Ok(Response::new(DeleteVolumeResponse {}))
            }
            Err(e) if e.kind() == api::ErrorKind::NotFound => {
                Ok(Response::new(DeleteVolumeResponse {}))
            }
            Err(e) => Err(from_control(&e)),
        }
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Ballast has no controller publish: volumes attach at NodeStageVolume, fenced by \
             epoch (the CSIDriver sets attachRequired: false)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Ballast has no controller unpublish: volumes detach at NodeUnstageVolume",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(missing("volume_capabilities"));
        }
        self.control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        if let Err(e) = params::parameters(&req.parameters) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_owned(),
            }));
        }
        for cap in &req.volume_capabilities {
            if let Some(why) = params::unsupported(cap) {
                return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                }));
            }
        }
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let all = self
            .control
            .list_volumes()
            .await
            .map_err(|e| from_control(&e))?;
        let (page, next_token) = page_of(all, |v| &v.name, req.max_entries, &req.starting_token)?;
        let mut entries = Vec::with_capacity(page.len());
        for v in &page {
            entries.push(list_volumes_response::Entry {
                volume: Some(self.to_volume(v, None).await),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(condition(v)),
                }),
            });
        }
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        for cap in &req.volume_capabilities {
            if let Some(why) = params::unsupported(cap) {
                return Err(invalid(why));
            }
        }
        let p = params::parameters(&req.parameters)?;
        let nodes = self.node.nodes().await.map_err(|e| from_control(&e))?;
        let mut matching = Vec::new();
        for n in &nodes {
            if let Some(seg) = &req.accessible_topology {
                if !params::matches(n, seg)? {
                    continue;
                }
            }
            matching.push(n);
        }
        // Every replica takes the volume's size on its own node, so the space for new volume
        // data is the free space divided by the replica count.
        let free: u64 = matching.iter().map(|n| n.free_bytes).sum();
        let available = free / u64::from(p.replicas);
        let largest = matching.iter().map(|n| n.capacity_bytes).max().unwrap_or(0);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: crate::to_i64(available),
            maximum_volume_size: Some(crate::to_i64(largest)),
            minimum_volume_size: Some(crate::to_i64(api::SIZE_GRANULARITY)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = vec![
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::GetVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: capabilities.into_iter().map(rpc_cap).collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_name_for(&req.name)?;
        if req.source_volume_id.is_empty() {
            return Err(missing("source_volume_id"));
        }
        let volume = VolumeName::new(&req.source_volume_id).map_err(|_| {
            Status::not_found(format!("volume {} does not exist", req.source_volume_id))
        })?;
        let _op = self.ops.acquire(volume.as_str())?;
        let snap = self
            .control
            .create_snapshot(&volume, &name)
            .await
            .map_err(|e| match e.kind() {
                api::ErrorKind::Conflict => Status::already_exists(e.full_message()),
                _ => from_control(&e),
            })?;
        tracing::info!(volume = %volume, snapshot = %name, "CSI took a snapshot");
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(missing("snapshot_id"));
        }
        // An id that cannot name a snapshot names none: deleting it is done.
        let Ok(name) = VolumeName::new(&req.snapshot_id) else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        match self.control.delete_snapshot(&name).await {
            Ok(()) => {
                tracing::info!(snapshot = %name, "CSI deleted a snapshot");
                Ok(Response::new(DeleteSnapshotResponse {}))
            }
            Err(e) if e.kind() == api::ErrorKind::NotFound => {
                Ok(Response::new(DeleteSnapshotResponse {}))
            }
            Err(e) => Err(from_control(&e)),
        }
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let all: Vec<SnapshotStatus> = self
            .control
            .list_snapshots()
            .await
            .map_err(|e| from_control(&e))?
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.name.as_str() == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty()
                    || s.source_volume
                        .as_ref()
                        .is_some_and(|v| v.as_str() == req.source_volume_id)
            })
            .collect();
        let (page, next_token) = page_of(all, |s| &s.name, req.max_entries, &req.starting_token)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(missing("capacity_range"));
        };
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(invalid(
                "capacity_range needs required_bytes or limit_bytes",
            ));
        }
        if let Some(cap) = &req.volume_capability {
            if let Some(why) = params::unsupported(cap) {
                return Err(invalid(why));
            }
        }
        let size = params::size_for(Some(range))?;
        let _op = self.ops.acquire(name.as_str())?;
        let current = self
            .control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        let status = if current.size_bytes >= size {
            current
        } else {
            let grown = self
                .control
                .resize_volume(&name, size)
                .await
                .map_err(|e| from_control(&e))?;
            tracing::info!(volume = %name, size = grown.size_bytes, "CSI expanded a volume");
            grown
        };
        // Block or filesystem, the node has work to do: its attached device must learn the new
        // size (and a filesystem must grow).
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: crate::to_i64(status.size_bytes),
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = params::volume_id(&req.volume_id)?;
        let status = self
            .control
            .get_volume(&name)
            .await
            .map_err(|e| from_control(&e))?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(self.to_volume(&status, None).await),
            status: Some(crate::proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition(&status)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Ballast volumes have no mutable parameters (MODIFY_VOLUME is not advertised)",
        ))
    }
}
