//! The CSI driver against a real daemon through a tonic client on its `--csi-socket`: every
//! RPC in block and mount access, the error codes the spec names, every call repeated, and
//! bad input. The multi-node topology and failover scenarios are in `csi_cluster.rs`.

// Calls answer `tonic::Status`, as the services do.
#![allow(clippy::result_large_err, clippy::many_single_char_names)]

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use csi::proto::controller_service_capability::rpc::Type as CtlCap;
use csi::proto::node_service_capability::rpc::Type as NodeCap;
use csi::proto::plugin_capability::service::Type as PluginService;
use csi::proto::volume_capability::access_mode::Mode;
use csi::proto::volume_capability::AccessMode;
use csi::proto::{
    controller_service_capability, node_service_capability, plugin_capability,
    volume_content_source, volume_usage, CapacityRange, ControllerExpandVolumeRequest,
    ControllerGetCapabilitiesRequest, ControllerGetVolumeRequest, ControllerPublishVolumeRequest,
    CreateSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest, GetPluginCapabilitiesRequest,
    GetPluginInfoRequest, ListVolumesRequest, NodeExpandVolumeRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodeGetVolumeStatsRequest, ProbeRequest, Topology, TopologyRequirement,
    ValidateVolumeCapabilitiesRequest, VolumeContentSource,
};
use integration_tests::cluster::{pattern, read_direct, write_direct, Cleanup, MIB};
use integration_tests::csi::{
    block_cap, create_req, csi_args, csi_socket, kubelet_dir, mount_cap, Csi, MountsUnder,
};
use integration_tests::{Daemon, NodeDir};
use tonic::Code;

/// Pools of 2 GiB (sparse): XFS needs 300 MiB at least.
const POOL: &str = "2GiB";

fn start(node: &NodeDir) -> Daemon {
    let mut args = node.daemon_args_with_pool(POOL);
    args.extend(csi_args(node));
    let mut d = Daemon::spawn(node, args).unwrap();
    d.wait_ready(std::time::Duration::from_secs(30)).unwrap();
    d
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call should fail").code()
}

fn msg<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> String {
    r.expect_err("the call should fail").message().to_owned()
}

#[test]
fn identity_and_controller_answer_with_the_spec_codes() {
    let node = NodeDir::new().unwrap();
    let _cleanup = Cleanup::new(std::slice::from_ref(&node), &["idvol"]);
    let _d = start(&node);
    let csi = Csi::connect(&csi_socket(&node)).unwrap();
    let (mut id, mut ctl, mut nd) = (
        csi.identity.clone(),
        csi.controller.clone(),
        csi.node.clone(),
    );

    // Identity.
    let info = csi
        .run(id.get_plugin_info(GetPluginInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.ballast.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = csi
        .run(id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}))
        .unwrap()
        .into_inner()
        .capabilities;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(PluginService::ControllerService as i32)));
    assert!(services.contains(&(PluginService::VolumeAccessibilityConstraints as i32)));
    assert!(caps.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e))
            if e.r#type == plugin_capability::volume_expansion::Type::Online as i32
    )));
    for _ in 0..2 {
        let probe = csi.run(id.probe(ProbeRequest {})).unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));
    }

    // Controller capabilities: snapshots and clones, no publish.
    let ctl_caps: Vec<i32> = csi
        .run(ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        CtlCap::CreateDeleteVolume,
        CtlCap::ListVolumes,
        CtlCap::GetCapacity,
        CtlCap::ExpandVolume,
        CtlCap::VolumeCondition,
        CtlCap::GetVolume,
        CtlCap::CreateDeleteSnapshot,
        CtlCap::ListSnapshots,
        CtlCap::CloneVolume,
    ] {
        assert!(ctl_caps.contains(&(want as i32)), "{want:?} missing");
    }
    for absent in [CtlCap::PublishUnpublishVolume, CtlCap::ModifyVolume] {
        assert!(
            !ctl_caps.contains(&(absent as i32)),
            "{absent:?} advertised"
        );
    }
    assert_eq!(
        code(csi.run(ctl.controller_publish_volume(ControllerPublishVolumeRequest::default()))),
        Code::Unimplemented
    );
    assert_eq!(
        code(csi.run(ctl.create_snapshot(CreateSnapshotRequest::default()))),
        Code::InvalidArgument
    );

    // CreateVolume: rounded up to 1 MiB, the node's topology, idempotent.
    let req = create_req(
        "idvol",
        10 * (1 << 20) + 1,
        &[("fsType", "xfs")],
        mount_cap(""),
    );
    let v = csi.create(req.clone()).unwrap();
    assert_eq!(v.volume_id, "idvol");
    assert_eq!(v.capacity_bytes, 11 << 20);
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    assert_eq!(
        v.accessible_topology[0]
            .segments
            .get("topology.ballast.dev/node"),
        Some(&"test-node".to_owned())
    );
    assert_eq!(
        csi.create(req.clone()).unwrap(),
        v,
        "CreateVolume must be idempotent"
    );
    // The same name with an incompatible size or replica count.
    let e = csi.create(create_req("idvol", 20 << 20, &[], mount_cap("")));
    assert_eq!(code(e), Code::AlreadyExists);
    let e = csi.create(create_req(
        "idvol",
        10 << 20,
        &[("replicas", "2")],
        mount_cap(""),
    ));
    assert_eq!(code(e), Code::AlreadyExists);

    // Bad input.
    let e = csi.create(create_req("x1", 1 << 20, &[("nosuch", "1")], mount_cap("")));
    let m = msg(e);
    assert!(m.contains("nosuch"), "{m}");
    for (params, what) in [
        (vec![("replicas", "9")], "replicas"),
        (vec![("replicas", "banana")], "replicas"),
        (vec![("fsType", "ntfs")], "ntfs"),
        (vec![("zoneSpread", "sideways")], "sideways"),
    ] {
        let e = csi.create(create_req("x1", 1 << 20, &params, mount_cap("")));
        let s = e.expect_err("bad parameter");
        assert_eq!(s.code(), Code::InvalidArgument, "{params:?}");
        assert!(s.message().contains(what), "{params:?}: {}", s.message());
    }
    let mut no_name = create_req("", 1 << 20, &[], mount_cap(""));
    assert_eq!(code(csi.create(no_name.clone())), Code::InvalidArgument);
    no_name.name = "x2".into();
    no_name.volume_capabilities.clear();
    assert_eq!(code(csi.create(no_name)), Code::InvalidArgument);
    let multi = csi::proto::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        ..mount_cap("")
    };
    assert_eq!(
        code(csi.create(create_req("x3", 1 << 20, &[], multi))),
        Code::InvalidArgument
    );
    let mut inverted = create_req("x4", 10 << 20, &[], mount_cap(""));
    inverted.capacity_range = Some(CapacityRange {
        required_bytes: 10 << 20,
        limit_bytes: 5 << 20,
    });
    assert_eq!(code(csi.create(inverted)), Code::InvalidArgument);
    let mut negative = create_req("x5", -1, &[], mount_cap(""));
    assert_eq!(code(csi.create(negative.clone())), Code::InvalidArgument);
    negative.capacity_range = Some(CapacityRange {
        required_bytes: (1 << 20) + 1,
        limit_bytes: 3 << 19,
    });
    assert_eq!(
        code(csi.create(negative)),
        Code::OutOfRange,
        "no multiple of 1 MiB fits"
    );
    assert_eq!(
        code(csi.create(create_req("x6", i64::MAX, &[], mount_cap("")))),
        Code::OutOfRange
    );
    // Valid, but larger than the pool: no capacity.
    assert_eq!(
        code(csi.create(create_req("x7", 1 << 40, &[], mount_cap("")))),
        Code::ResourceExhausted
    );
    let mut from_snapshot = create_req("x8", 1 << 20, &[], mount_cap(""));
    from_snapshot.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "snap".into(),
            },
        )),
    });
    assert_eq!(code(csi.create(from_snapshot)), Code::NotFound);
    // A standalone node serves only itself: a requisite elsewhere cannot be met.
    let mut elsewhere = create_req("x9", 1 << 20, &[], mount_cap(""));
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([(
                "topology.ballast.dev/node".to_owned(),
                "other-node".to_owned(),
            )]),
        }],
        preferred: Vec::new(),
    });
    assert_eq!(code(csi.create(elsewhere)), Code::ResourceExhausted);
    let mut unknown_key = create_req("x9", 1 << 20, &[], mount_cap(""));
    unknown_key.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([("rack".to_owned(), "r1".to_owned())]),
        }],
        preferred: Vec::new(),
    });
    assert!(msg(csi.create(unknown_key)).contains("rack"));

    // ValidateVolumeCapabilities.
    let validate = |caps: Vec<csi::proto::VolumeCapability>, id: &str| {
        let mut c = ctl.clone();
        csi.run(
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: caps,
                ..Default::default()
            }),
        )
    };
    for _ in 0..2 {
        let ok = validate(vec![mount_cap("ext4"), block_cap()], "idvol")
            .unwrap()
            .into_inner();
        assert!(ok.confirmed.is_some(), "{}", ok.message);
    }
    let no = validate(
        vec![csi::proto::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeReaderOnly as i32,
            }),
            ..block_cap()
        }],
        "idvol",
    )
    .unwrap()
    .into_inner();
    assert!(no.confirmed.is_none());
    assert!(
        no.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        no.message
    );
    assert_eq!(
        code(validate(vec![block_cap()], "nosuchvol")),
        Code::NotFound
    );
    assert_eq!(code(validate(vec![block_cap()], "")), Code::InvalidArgument);
    assert_eq!(code(validate(Vec::new(), "idvol")), Code::InvalidArgument);

    // ListVolumes, paged.
    for n in ["list-a", "list-b", "list-c"] {
        csi.create(create_req(n, 1 << 20, &[], block_cap()))
            .unwrap();
    }
    let list = |max: i32, token: &str| {
        let mut c = ctl.clone();
        csi.run(c.list_volumes(ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        }))
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(2, &token).unwrap().into_inner();
        assert!(page.entries.len() <= 2);
        pages += 1;
        for e in &page.entries {
            seen.push(e.volume.as_ref().unwrap().volume_id.clone());
            let cond = e
                .status
                .as_ref()
                .unwrap()
                .volume_condition
                .as_ref()
                .unwrap();
            assert!(!cond.abnormal, "{}", cond.message);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ["idvol", "list-a", "list-b", "list-c"]);
    assert_eq!(pages, 2);
    assert_eq!(list(0, "").unwrap().into_inner().entries.len(), 4);
    assert_eq!(code(list(-1, "")), Code::InvalidArgument);
    assert_eq!(code(list(2, "Not A Token!")), Code::Aborted);
    // A well-formed name is not a token either (csi-sanity's invalid token).
    assert_eq!(code(list(2, "invalid-token")), Code::Aborted);
    // A token whose volume is gone since goes on after it.
    let after_gone = list(0, "after:list-aa").unwrap().into_inner();
    let names: Vec<String> = after_gone
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(names, ["list-b", "list-c"]);

    // GetCapacity: the pool's free space, split over the replicas asked for.
    let cap = |params: &[(&str, &str)], topo: Option<Topology>| {
        let mut c = ctl.clone();
        csi.run(
            c.get_capacity(GetCapacityRequest {
                volume_capabilities: vec![mount_cap("")],
                parameters: params
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                accessible_topology: topo,
            }),
        )
    };
    let one = cap(&[], None).unwrap().into_inner();
    assert!(one.available_capacity > 0);
    assert!(one.maximum_volume_size.unwrap() >= one.available_capacity);
    let two = cap(&[("replicas", "2")], None).unwrap().into_inner();
    assert_eq!(two.available_capacity, one.available_capacity / 2);
    let here = Topology {
        segments: HashMap::from([(
            "topology.ballast.dev/node".to_owned(),
            "test-node".to_owned(),
        )]),
    };
    assert_eq!(
        cap(&[], Some(here))
            .unwrap()
            .into_inner()
            .available_capacity,
        one.available_capacity
    );
    let there = Topology {
        segments: HashMap::from([(
            "topology.ballast.dev/node".to_owned(),
            "elsewhere".to_owned(),
        )]),
    };
    assert_eq!(
        cap(&[], Some(there))
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    assert_eq!(code(cap(&[("nosuch", "1")], None)), Code::InvalidArgument);

    // ControllerGetVolume with its condition.
    let got = csi
        .run(
            csi.controller
                .clone()
                .controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: "idvol".into(),
                }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 11 << 20);
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(
        !cond.abnormal && cond.message.contains("online"),
        "{}",
        cond.message
    );
    assert_eq!(
        code(
            csi.run(
                csi.controller
                    .clone()
                    .controller_get_volume(ControllerGetVolumeRequest {
                        volume_id: "nosuchvol".into(),
                    })
            )
        ),
        Code::NotFound
    );

    // ControllerExpandVolume: grows, is idempotent, never shrinks, and names a missing volume.
    let expand = |id: &str, bytes: i64| {
        let mut c = ctl.clone();
        csi.run(c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
    };
    for _ in 0..2 {
        let r = expand("list-a", 4 << 20).unwrap().into_inner();
        assert_eq!(r.capacity_bytes, 4 << 20);
        assert!(r.node_expansion_required);
    }
    assert_eq!(
        expand("list-a", 2 << 20)
            .unwrap()
            .into_inner()
            .capacity_bytes,
        4 << 20
    );
    assert_eq!(code(expand("nosuchvol", 4 << 20)), Code::NotFound);
    assert_eq!(code(expand("", 4 << 20)), Code::InvalidArgument);
    assert_eq!(code(expand("list-a", 1 << 40)), Code::ResourceExhausted);

    // Node info and capabilities.
    let ni = csi
        .run(nd.node_get_info(NodeGetInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "test-node");
    assert_eq!(
        ni.accessible_topology
            .unwrap()
            .segments
            .get("topology.ballast.dev/node"),
        Some(&"test-node".to_owned())
    );
    let node_caps: Vec<i32> = csi
        .run(nd.node_get_capabilities(NodeGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        NodeCap::StageUnstageVolume,
        NodeCap::GetVolumeStats,
        NodeCap::ExpandVolume,
        NodeCap::VolumeCondition,
    ] {
        assert!(node_caps.contains(&(want as i32)), "{want:?} missing");
    }

    // DeleteVolume: idempotent, and a missing ID is refused.
    let delete = |id: &str| {
        let mut c = ctl.clone();
        csi.run(c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
    };
    for n in ["list-a", "list-b", "list-c", "idvol"] {
        delete(n).unwrap();
        delete(n).unwrap();
    }
    assert_eq!(code(delete("")), Code::InvalidArgument);
    assert_eq!(list(0, "").unwrap().into_inner().entries.len(), 0);
}

fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn df_total(path: &Path) -> u64 {
    host::mount::usage(path).unwrap().total_bytes
}

#[test]
fn stage_publish_expand_and_tear_down_in_mount_and_block_access() {
    let node = NodeDir::new().unwrap();
    let _cleanup = Cleanup::new(std::slice::from_ref(&node), &["fsvol", "blkvol"]);
    let _mounts = MountsUnder(kubelet_dir(&node));
    let _d = start(&node);
    let csi = Csi::connect(&csi_socket(&node)).unwrap();
    let nd = csi.node.clone();
    let mut ctl = csi.controller.clone();
    let kube = kubelet_dir(&node);
    let staging = kube.join("plugins/kubernetes.io/csi/staging/fsvol");
    let target = kube.join("pods/p1/volumes/fsvol/mount");
    let ro_target = kube.join("pods/p2/volumes/fsvol/mount");
    for d in [
        &staging,
        target.parent().unwrap(),
        ro_target.parent().unwrap(),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }

    // ---- Mount access ----
    let v = csi
        .create(create_req(
            "fsvol",
            320 << 20,
            &[("fsType", "xfs")],
            mount_cap(""),
        ))
        .unwrap();
    let stage = |cap: csi::proto::VolumeCapability| {
        let mut n = nd.clone();
        csi.run(n.node_stage_volume(csi::proto::NodeStageVolumeRequest {
            volume_id: "fsvol".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        }))
    };
    // Not staged yet: publish is refused.
    assert_eq!(
        code(csi.publish("fsvol", &staging, &target, mount_cap(""), false)),
        Code::FailedPrecondition
    );
    for _ in 0..2 {
        stage(mount_cap("")).unwrap();
    }
    let m = host::mount::mount_at(&staging).expect("staged means mounted");
    assert_eq!(
        m.fs_type, "xfs",
        "the StorageClass fsType comes through the volume context"
    );
    for _ in 0..2 {
        csi.publish("fsvol", &staging, &target, mount_cap(""), false)
            .unwrap();
    }
    write_file(&target.join("hello"), b"hello from a pod").unwrap();
    for _ in 0..2 {
        csi.publish("fsvol", &staging, &ro_target, mount_cap(""), true)
            .unwrap();
    }
    assert_eq!(
        std::fs::read(ro_target.join("hello")).unwrap(),
        b"hello from a pod"
    );
    let ro = write_file(&ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");
    // The same target asked for in the other mode is refused, not silently changed.
    assert_eq!(
        code(csi.publish("fsvol", &staging, &ro_target, mount_cap(""), false)),
        Code::FailedPrecondition
    );

    // Stats: bytes and inodes, and the condition.
    let stats = |path: &Path, id: &str| {
        let mut n = nd.clone();
        csi.run(n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        }))
    };
    let s = stats(&target, "fsvol").unwrap().into_inner();
    let units: Vec<i32> = s.usage.iter().map(|u| u.unit).collect();
    assert_eq!(
        units,
        [
            volume_usage::Unit::Bytes as i32,
            volume_usage::Unit::Inodes as i32
        ]
    );
    assert!(s.usage[0].total > 0 && s.usage[0].used > 0 && s.usage[1].used > 0);
    assert!(!s.volume_condition.unwrap().abnormal);
    assert_eq!(
        code(stats(&kube.join("pods/none"), "fsvol")),
        Code::NotFound
    );
    assert_eq!(code(stats(&target, "nosuchvol")), Code::NotFound);
    // Unknown volume first: NOT_FOUND even for a path outside the kubelet directory.
    assert_eq!(
        code(stats(Path::new("/not/a/kubelet/path"), "nosuchvol")),
        Code::NotFound
    );
    assert_eq!(code(stats(Path::new("some/path"), "fsvol")), Code::NotFound);
    // An existing path outside the kubelet directory is refused.
    assert_eq!(
        code(stats(Path::new("/tmp"), "fsvol")),
        Code::InvalidArgument
    );
    assert_eq!(code(stats(&target, "")), Code::InvalidArgument);

    // Online expansion: controller, then node; the filesystem grows while mounted.
    let before = df_total(&target);
    let r = csi
        .run(ctl.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "fsvol".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 512 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    let node_expand = |path: &Path, id: &str, bytes: i64| {
        let mut n = nd.clone();
        csi.run(n.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
    };
    for _ in 0..2 {
        let grown = node_expand(&target, "fsvol", 512 << 20)
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, 512 << 20);
    }
    let after = df_total(&target);
    assert!(
        after > before + (150 << 20),
        "xfs grew from {before} to {after}"
    );
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"hello from a pod"
    );
    assert_eq!(
        code(node_expand(&target, "fsvol", 1 << 30)),
        Code::OutOfRange
    );
    assert_eq!(
        code(node_expand(
            Path::new("/not/a/kubelet/path"),
            "nosuchvol",
            0
        )),
        Code::NotFound
    );

    // A staged volume is in use: deleting it is refused.
    let delete = |id: &str| {
        let mut c = ctl.clone();
        csi.run(c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
    };
    assert_eq!(code(delete("fsvol")), Code::FailedPrecondition);

    // Tear down, every call twice; the paths the driver created are gone.
    for t in [&target, &ro_target] {
        for _ in 0..2 {
            csi.unpublish("fsvol", t).unwrap();
        }
        assert!(!t.exists(), "{} should be removed", t.display());
    }
    for _ in 0..2 {
        csi.unstage("fsvol", &staging).unwrap();
    }
    assert!(host::mount::mount_at(&staging).is_none());
    // Staged again, the data is there: a volume with a filesystem is never reformatted.
    stage(mount_cap("")).unwrap();
    csi.publish("fsvol", &staging, &target, mount_cap(""), false)
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"hello from a pod"
    );
    // Asking for another filesystem than the one there is refused, not reformatted.
    csi.unpublish("fsvol", &target).unwrap();
    csi.unstage("fsvol", &staging).unwrap();
    assert_eq!(code(stage(mount_cap("ext4"))), Code::FailedPrecondition);
    csi.unstage("fsvol", &staging).unwrap();

    // ---- Block access ----
    csi.create(create_req("blkvol", 16 << 20, &[], block_cap()))
        .unwrap();
    let bstaging = kube.join("plugins/kubernetes.io/csi/volumeDevices/staging/blkvol");
    let btarget = kube.join("plugins/kubernetes.io/csi/volumeDevices/publish/blkvol/pod1");
    std::fs::create_dir_all(&bstaging).unwrap();
    std::fs::create_dir_all(btarget.parent().unwrap()).unwrap();
    for _ in 0..2 {
        csi.stage("blkvol", &bstaging, block_cap()).unwrap();
    }
    for _ in 0..2 {
        csi.publish("blkvol", &bstaging, &btarget, block_cap(), false)
            .unwrap();
    }
    let meta = std::fs::metadata(&btarget).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "the target is the volume's device"
    );
    let data = pattern(7, 0, MIB);
    write_direct(&btarget, 3 * MIB, &data).unwrap();
    assert_eq!(read_direct(&btarget, 3 * MIB, MIB), data);
    let s = stats(&btarget, "blkvol").unwrap().into_inner();
    assert_eq!(s.usage.len(), 1);
    assert_eq!(s.usage[0].total, 16 << 20);
    // Grow the block volume online: the published device shows the new size.
    csi.run(
        csi.controller
            .clone()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "blkvol".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 32 << 20,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
    )
    .unwrap();
    let grown = node_expand(&btarget, "blkvol", 32 << 20)
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 << 20);
    let tail = pattern(8, 0, MIB);
    write_direct(&btarget, 30 * MIB, &tail).unwrap();
    assert_eq!(read_direct(&btarget, 30 * MIB, MIB), tail);
    assert_eq!(read_direct(&btarget, 3 * MIB, MIB), data);
    // A block volume is published read-only or read-write, not both at once: a read-only
    // device file is the device made read-only for everyone.
    let bro = kube.join("plugins/kubernetes.io/csi/volumeDevices/publish/blkvol/pod2");
    assert_eq!(
        code(csi.publish("blkvol", &bstaging, &bro, block_cap(), true)),
        Code::FailedPrecondition
    );
    for _ in 0..2 {
        csi.unpublish("blkvol", &btarget).unwrap();
    }
    assert!(!btarget.exists());
    csi.publish("blkvol", &bstaging, &bro, block_cap(), true)
        .unwrap();
    assert_eq!(read_direct(&bro, 30 * MIB, MIB), tail);
    let denied = write_direct(&bro, 0, &pattern(9, 0, MIB));
    assert!(
        denied.is_err(),
        "a read-only block publish must refuse writes"
    );
    for _ in 0..2 {
        csi.unpublish("blkvol", &bro).unwrap();
    }
    assert!(!bro.exists());
    // Unpublished, the device is writable again.
    csi.publish("blkvol", &bstaging, &btarget, block_cap(), false)
        .unwrap();
    write_direct(&btarget, 0, &pattern(9, 0, MIB)).unwrap();
    csi.unpublish("blkvol", &btarget).unwrap();
    for _ in 0..2 {
        csi.unstage("blkvol", &bstaging).unwrap();
    }
    for n in ["blkvol", "fsvol"] {
        delete(n).unwrap();
        delete(n).unwrap();
    }
}

#[test]
fn node_calls_check_their_paths_and_arguments() {
    let node = NodeDir::new().unwrap();
    let _cleanup = Cleanup::new(std::slice::from_ref(&node), &["busy", "racevol"]);
    let _mounts = MountsUnder(kubelet_dir(&node));
    let _d = start(&node);
    let csi = Csi::connect(&csi_socket(&node)).unwrap();
    let kube = kubelet_dir(&node);
    let staging = kube.join("staging/busy");
    std::fs::create_dir_all(&staging).unwrap();
    csi.create(create_req("busy", 8 << 20, &[], mount_cap("")))
        .unwrap();

    // Paths outside the kubelet directory, relative, with '..', or missing.
    let outside = node.scratch("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let m = msg(csi.stage("busy", &outside, mount_cap("")));
    assert!(m.contains("outside"), "{m}");
    assert_eq!(
        code(csi.stage("busy", Path::new("staging/busy"), mount_cap(""))),
        Code::InvalidArgument
    );
    let sneaky = kube.join("staging/../../outside");
    assert_eq!(
        code(csi.stage("busy", &sneaky, mount_cap(""))),
        Code::InvalidArgument
    );
    let link = kube.join("escape");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    assert_eq!(
        code(csi.stage("busy", &link, mount_cap(""))),
        Code::InvalidArgument
    );
    let m = msg(csi.stage("busy", &kube.join("staging/missing"), mount_cap("")));
    assert!(m.contains("does not exist"), "{m}");
    assert_eq!(
        code(csi.stage("busy", Path::new(""), mount_cap(""))),
        Code::InvalidArgument
    );
    // Missing fields and unknown volumes.
    let mut n = csi.node.clone();
    let e = csi.run(n.node_stage_volume(csi::proto::NodeStageVolumeRequest {
        volume_id: "busy".into(),
        staging_target_path: staging.display().to_string(),
        ..Default::default()
    }));
    assert_eq!(code(e), Code::InvalidArgument, "a missing capability");
    assert_eq!(
        code(csi.stage("", &staging, mount_cap(""))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(csi.stage("nosuchvol", &staging, mount_cap(""))),
        Code::NotFound
    );
    assert_eq!(
        code(csi.stage("Not-A-Name", &staging, mount_cap(""))),
        Code::NotFound
    );
    let target = kube.join("pods/p/mount");
    assert_eq!(
        code(csi.publish("busy", &staging, &target, mount_cap(""), false)),
        Code::InvalidArgument,
        "the target's parent does not exist"
    );
    assert_eq!(code(csi.unpublish("busy", &outside)), Code::InvalidArgument);
    assert_eq!(code(csi.unpublish("", &target)), Code::InvalidArgument);
    assert_eq!(
        code(csi.unstage("busy", Path::new(""))),
        Code::InvalidArgument
    );
    // Nothing outside was touched.
    assert!(host::mount::mount_at(&outside).is_none());

    // Two stagings of one volume at once: one runs, the other is told to retry (ABORTED).
    csi.create(create_req("racevol", 256 << 20, &[], mount_cap("")))
        .unwrap();
    let rstaging = kube.join("staging/racevol");
    std::fs::create_dir_all(&rstaging).unwrap();
    let calls = (0..4).map(|_| {
        let mut n = csi.node.clone();
        let req = csi::proto::NodeStageVolumeRequest {
            volume_id: "racevol".into(),
            staging_target_path: rstaging.display().to_string(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        };
        async move { n.node_stage_volume(req).await }
    });
    let results = csi.run(async {
        let handles: Vec<_> = calls.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    let aborted = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::Aborted))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(ok >= 1 && aborted >= 1 && ok + aborted == 4, "{results:?}");
    // Once it finished, a retry succeeds (idempotent).
    csi.stage("racevol", &rstaging, mount_cap("")).unwrap();
    csi.unstage("racevol", &rstaging).unwrap();
}

/// A content source naming `snapshot`.
fn snapshot_source(snapshot: &str) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    }
}

#[test]
fn snapshots_and_clones_answer_with_the_spec_codes() {
    use csi::proto::{DeleteSnapshotRequest, ListSnapshotsRequest};
    let node = NodeDir::new().unwrap();
    let _d = start(&node);
    let csi = Csi::connect(&csi_socket(&node)).unwrap();
    let mut ctl = csi.controller.clone();
    let vol = csi
        .create(create_req("snapsrc", 8 << 20, &[], mount_cap("")))
        .unwrap();
    let snap_req = |name: &str, source: &str| CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    // Taken, with its fields; again the same; another source under its name is refused.
    let s1 = csi
        .run(ctl.create_snapshot(snap_req("s1", &vol.volume_id)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s1.snapshot_id, "s1");
    assert_eq!(s1.source_volume_id, vol.volume_id);
    assert_eq!(s1.size_bytes, 8 << 20);
    assert!(s1.ready_to_use);
    assert!(s1.creation_time.is_some_and(|t| t.seconds > 1_700_000_000));
    let again = csi
        .run(ctl.create_snapshot(snap_req("s1", &vol.volume_id)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, "s1");
    let other = csi
        .create(create_req("snapother", 8 << 20, &[], mount_cap("")))
        .unwrap();
    assert_eq!(
        code(csi.run(ctl.create_snapshot(snap_req("s1", &other.volume_id)))),
        Code::AlreadyExists
    );
    assert_eq!(
        code(csi.run(ctl.create_snapshot(snap_req("s2", "")))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(csi.run(ctl.create_snapshot(snap_req("", &vol.volume_id)))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(csi.run(ctl.create_snapshot(snap_req("s2", "no-such-volume")))),
        Code::NotFound
    );
    // A CO name that is not a Ballast name gets a stable derived id.
    let long = csi
        .run(ctl.create_snapshot(snap_req("Snapshot_With.Odd-Name", &vol.volume_id)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        long.snapshot_id.starts_with("snapshot-with-odd-name-"),
        "{long:?}"
    );
    csi.run(ctl.create_snapshot(snap_req("s3", &other.volume_id)))
        .unwrap();

    // ListSnapshots: filters, pages, and tokens it did not issue.
    let list = |req: ListSnapshotsRequest| {
        let mut c = csi.controller.clone();
        csi.run(async move { c.list_snapshots(req).await.map(tonic::Response::into_inner) })
    };
    let ids = |r: &csi::proto::ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
            .collect()
    };
    let all = list(ListSnapshotsRequest::default()).unwrap();
    assert_eq!(ids(&all).len(), 3);
    let by_source = list(ListSnapshotsRequest {
        source_volume_id: other.volume_id.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ids(&by_source), ["s3"]);
    let by_id = list(ListSnapshotsRequest {
        snapshot_id: "s1".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ids(&by_id), ["s1"]);
    let none = list(ListSnapshotsRequest {
        snapshot_id: "nope".into(),
        ..Default::default()
    })
    .unwrap();
    assert!(none.entries.is_empty());
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(ListSnapshotsRequest {
            max_entries: 1,
            starting_token: token.clone(),
            ..Default::default()
        })
        .unwrap();
        assert!(page.entries.len() <= 1);
        seen.extend(ids(&page));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids(&all));
    assert_eq!(
        code(list(ListSnapshotsRequest {
            starting_token: "bogus".into(),
            ..Default::default()
        })),
        Code::Aborted
    );
    assert_eq!(
        code(list(ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })),
        Code::InvalidArgument
    );

    // CreateVolume from a snapshot and from a volume: the source echoed, sizes checked.
    let mut clone = create_req("fromsnap", 8 << 20, &[], mount_cap(""));
    clone.volume_content_source = Some(snapshot_source("s1"));
    let c = csi.create(clone.clone()).unwrap();
    assert_eq!(c.content_source, Some(snapshot_source("s1")));
    assert_eq!(c.capacity_bytes, 8 << 20);
    assert_eq!(
        csi.create(clone).unwrap().volume_id,
        c.volume_id,
        "idempotent"
    );
    let mut small = create_req("small", 4 << 20, &[], mount_cap(""));
    small.capacity_range = Some(CapacityRange {
        required_bytes: 4 << 20,
        limit_bytes: 4 << 20,
    });
    small.volume_content_source = Some(snapshot_source("s1"));
    assert_eq!(code(csi.create(small)), Code::OutOfRange);
    let mut taken = create_req("snapother", 8 << 20, &[], mount_cap(""));
    taken.volume_content_source = Some(snapshot_source("s1"));
    assert_eq!(code(csi.create(taken)), Code::AlreadyExists);
    let mut from_vol = create_req("fromvol", 16 << 20, &[], mount_cap(""));
    from_vol.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: vol.volume_id.clone(),
            },
        )),
    });
    let fv = csi.create(from_vol.clone()).unwrap();
    assert_eq!(fv.capacity_bytes, 16 << 20, "larger than its source");
    assert_eq!(fv.content_source, from_vol.volume_content_source);
    let mut missing = from_vol;
    missing.name = "fromnothing".into();
    missing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "no-such-volume".into(),
            },
        )),
    });
    assert_eq!(code(csi.create(missing)), Code::NotFound);

    // DeleteSnapshot: done, again done, an id that names nothing done; an empty one refused.
    let del = |id: &str| {
        let mut c = csi.controller.clone();
        let req = DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        };
        csi.run(async move { c.delete_snapshot(req).await.map(drop) })
    };
    del("s1").unwrap();
    del("s1").unwrap();
    del("Not A Ballast Name").unwrap();
    assert_eq!(code(del("")), Code::InvalidArgument);
    // The clone outlives its snapshot; the source volume can go too.
    for v in ["fromsnap", "fromvol", "snapsrc", "snapother"] {
        let mut c = csi.controller.clone();
        csi.run(c.delete_volume(DeleteVolumeRequest {
            volume_id: v.into(),
            ..Default::default()
        }))
        .unwrap();
    }
    let left = list(ListSnapshotsRequest::default()).unwrap();
    assert_eq!(ids(&left).len(), 2, "snapshots outlive their volumes");
}
