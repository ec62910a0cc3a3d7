//! The CSI driver on a three-node cluster (real etcd, real daemons, each serving CSI):
//! topology (node info, accessibility requirements, zone spread, capacity per segment),
//! snapshots and clones across nodes, and
//! failover and online expansion — a volume unstaged on node A and staged on node B once A is killed, and a volume
//! still staged on A when it dies, taken over by B once A's lease expires — with the data
//! there both times.

// Calls answer `tonic::Status`, as the services do.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi::proto::controller_service_capability::rpc::Type as CtlCap;
use csi::proto::{
    controller_service_capability, CapacityRange, ControllerExpandVolumeRequest,
    ControllerGetCapabilitiesRequest, ControllerGetVolumeRequest, CreateSnapshotRequest,
    DeleteSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest, ListSnapshotsRequest,
    NodeExpandVolumeRequest, NodeGetInfoRequest, Topology, TopologyRequirement,
};
use csi::proto::{volume_content_source, VolumeContentSource};
use integration_tests::cluster::{cluster_args, node_dirs, nodes, wait_for, Cleanup};
use integration_tests::csi::{
    create_req, csi_args, csi_socket, kubelet_dir, mount_cap, Csi, MountsUnder,
};
use integration_tests::etcd::Etcd;
use integration_tests::{Daemon, NodeDir};
use tonic::Code;

const NODE_KEY: &str = "topology.ballast.dev/node";
const ZONE_KEY: &str = "topology.kubernetes.io/zone";

fn start(node: &NodeDir, id: &str, zone: &str, etcd: &Etcd) -> Daemon {
    let mut args = cluster_args(node, id, zone, etcd);
    // XFS needs 300 MiB at least: pools of 2 GiB (sparse).
    let at = args.iter().position(|a| a == "--pool").unwrap();
    args[at + 1] = format!("{}:2GiB", node.pool().display());
    args.extend(csi_args(node));
    let mut d = Daemon::spawn(node, args).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    d
}

fn seg(kv: &[(&str, &str)]) -> Topology {
    Topology {
        segments: kv
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// A pod's view of one volume on one node: its staging and target paths.
struct Pod {
    staging: PathBuf,
    target: PathBuf,
}

impl Pod {
    fn on(node: &NodeDir, volume: &str) -> Self {
        let kube = kubelet_dir(node);
        let staging = kube.join(format!("plugins/kubernetes.io/csi/{volume}/globalmount"));
        let target = kube.join(format!("pods/{volume}/volumes/mount"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        Self { staging, target }
    }

    fn up(&self, csi: &Csi, volume: &str) -> Result<(), tonic::Status> {
        // The filesystem Kubernetes passes from the StorageClass (csi.storage.k8s.io/fstype).
        let fs = if volume == "ha-vol" { "xfs" } else { "" };
        csi.stage(volume, &self.staging, mount_cap(fs))?;
        csi.publish(volume, &self.staging, &self.target, mount_cap(fs), false)
    }

    fn down(&self, csi: &Csi, volume: &str) {
        csi.unpublish(volume, &self.target).unwrap();
        csi.unstage(volume, &self.staging).unwrap();
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn topology_and_failover_across_three_nodes() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["ha-vol", "crash-vol", "pref-vol", "zone-vol"]);
    let _mounts: Vec<MountsUnder> = dirs.iter().map(|d| MountsUnder(kubelet_dir(d))).collect();
    let mut a = start(&dirs[0], "node-a", "zone-a", &etcd);
    let b = start(&dirs[1], "node-b", "zone-b", &etcd);
    let _c = start(&dirs[2], "node-c", "zone-c", &etcd);
    wait_for("three nodes registered", Duration::from_secs(10), || {
        nodes(&a).len() == 3
    });
    let csi_a = Csi::connect(&csi_socket(&dirs[0])).unwrap();
    let csi_b = Csi::connect(&csi_socket(&dirs[1])).unwrap();

    // NodeGetInfo: each node's ID and zone.
    for (csi, id, zone) in [(&csi_a, "node-a", "zone-a"), (&csi_b, "node-b", "zone-b")] {
        let info = csi
            .run(csi.node.clone().node_get_info(NodeGetInfoRequest {}))
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, id);
        let topo = info.accessible_topology.unwrap().segments;
        assert_eq!(topo.get(NODE_KEY).map(String::as_str), Some(id));
        assert_eq!(topo.get(ZONE_KEY).map(String::as_str), Some(zone));
    }

    // A preferred node gets the replica (the pod's reads stay local); the volume is usable
    // from every zone of the cluster, since any node reaches its replicas.
    let mut req = create_req("pref-vol", 8 << 20, &[("replicas", "1")], mount_cap(""));
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![seg(&[(NODE_KEY, "node-b")]), seg(&[(NODE_KEY, "node-a")])],
    });
    let v = csi_a.create(req.clone()).unwrap();
    let mut zones: Vec<String> = v
        .accessible_topology
        .iter()
        .map(|t| t.segments[ZONE_KEY].clone())
        .collect();
    zones.sort();
    assert_eq!(zones, ["zone-a", "zone-b", "zone-c"]);
    let placed = a
        .cli(["volume", "inspect", "pref-vol", "-o", "json"])
        .json();
    assert_eq!(placed["replica_status"][0]["node_id"], "node-b", "{placed}");
    assert_eq!(csi_a.create(req).unwrap(), v, "idempotent");

    // Snapshots are offered in cluster mode: one of a detached volume whose only replica is
    // on node B, taken through node A, and a volume made from it (on node B, where the copy
    // is), usable from every zone.
    let caps = csi_a
        .run(
            csi_a
                .controller
                .clone()
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {}),
        )
        .unwrap()
        .into_inner()
        .capabilities;
    for cap in [
        CtlCap::CreateDeleteSnapshot,
        CtlCap::ListSnapshots,
        CtlCap::CloneVolume,
    ] {
        assert!(
            caps.iter().any(|c| c.r#type
                == Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc { r#type: cap as i32 }
                ))),
            "{cap:?} not advertised in cluster mode"
        );
    }
    let snap = csi_a
        .run(
            csi_a
                .controller
                .clone()
                .create_snapshot(CreateSnapshotRequest {
                    name: "pref-snap".into(),
                    source_volume_id: "pref-vol".into(),
                    ..Default::default()
                }),
        )
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use, "{snap:?}");
    assert_eq!(snap.size_bytes, 8 << 20);
    assert_eq!(snap.source_volume_id, "pref-vol");
    let listed = csi_b
        .run(
            csi_b
                .controller
                .clone()
                .list_snapshots(ListSnapshotsRequest {
                    source_volume_id: "pref-vol".into(),
                    ..Default::default()
                }),
        )
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let mut req = create_req("pref-copy", 8 << 20, &[("replicas", "1")], mount_cap(""));
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "pref-snap".into(),
            },
        )),
    });
    let copy = csi_a.create(req).unwrap();
    assert_eq!(copy.accessible_topology.len(), 3, "{copy:?}");
    let placed = a
        .cli(["volume", "inspect", "pref-copy", "-o", "json"])
        .json();
    assert_eq!(placed["replica_status"][0]["node_id"], "node-b", "{placed}");
    for (id, snapshot) in [("pref-copy", false), ("pref-snap", true)] {
        if snapshot {
            csi_a
                .run(
                    csi_a
                        .controller
                        .clone()
                        .delete_snapshot(DeleteSnapshotRequest {
                            snapshot_id: id.into(),
                            ..Default::default()
                        }),
                )
                .unwrap();
        } else {
            csi_a
                .run(csi_a.controller.clone().delete_volume(DeleteVolumeRequest {
                    volume_id: id.into(),
                    ..Default::default()
                }))
                .unwrap();
        }
    }
    let snaps = b.cli(["snapshot", "list", "-o", "json"]);
    snaps.success();
    assert_eq!(snaps.json(), serde_json::json!([]));

    // A requisite zone narrows both placement and accessibility.
    let mut req = create_req("zone-vol", 8 << 20, &[("replicas", "1")], mount_cap(""));
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![seg(&[(ZONE_KEY, "zone-c")])],
        preferred: Vec::new(),
    });
    let v = csi_b.create(req).unwrap();
    assert_eq!(v.accessible_topology, [seg(&[(ZONE_KEY, "zone-c")])]);
    let placed = b
        .cli(["volume", "inspect", "zone-vol", "-o", "json"])
        .json();
    assert_eq!(placed["replica_status"][0]["node_id"], "node-c", "{placed}");
    // Nowhere to go, and too few nodes within the requisite zones.
    let mut req = create_req("no-vol", 8 << 20, &[], mount_cap(""));
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![seg(&[(ZONE_KEY, "zone-x")])],
        preferred: Vec::new(),
    });
    assert_eq!(
        csi_a.create(req).unwrap_err().code(),
        Code::ResourceExhausted
    );
    let mut req = create_req(
        "no-vol",
        8 << 20,
        &[("replicas", "3"), ("zoneSpread", "hard")],
        mount_cap(""),
    );
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![seg(&[(ZONE_KEY, "zone-a")]), seg(&[(ZONE_KEY, "zone-b")])],
        preferred: Vec::new(),
    });
    let e = csi_a.create(req).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("(node-a, node-b)"), "{}", e.message());

    // GetCapacity per topology segment.
    let capacity = |t: Option<Topology>| {
        csi_a
            .run(csi_a.controller.clone().get_capacity(GetCapacityRequest {
                volume_capabilities: vec![mount_cap("")],
                parameters: HashMap::new(),
                accessible_topology: t,
            }))
            .unwrap()
            .into_inner()
            .available_capacity
    };
    let all = capacity(None);
    let zone_a = capacity(Some(seg(&[(ZONE_KEY, "zone-a")])));
    assert!(zone_a > 0 && zone_a < all, "zone-a {zone_a} of {all}");
    assert_eq!(capacity(Some(seg(&[(ZONE_KEY, "zone-x")]))), 0);
    for n in ["pref-vol", "zone-vol"] {
        csi_a
            .run(csi_a.controller.clone().delete_volume(DeleteVolumeRequest {
                volume_id: n.into(),
                ..Default::default()
            }))
            .unwrap();
    }

    // Two 3-replica volumes used on node A: one is then unstaged cleanly, the other is still
    // staged when A dies.
    // ha-vol is XFS: it grows online below, and growing ext4 online needs CAP_SYS_RESOURCE,
    // which this test machine's root does not have.
    csi_a
        .create(create_req(
            "ha-vol",
            320 << 20,
            &[("replicas", "3"), ("fsType", "xfs")],
            mount_cap(""),
        ))
        .unwrap();
    csi_a
        .create(create_req(
            "crash-vol",
            64 << 20,
            &[("replicas", "3")],
            mount_cap(""),
        ))
        .unwrap();
    let ha_a = Pod::on(&dirs[0], "ha-vol");
    ha_a.up(&csi_a, "ha-vol").unwrap();
    write_synced(
        &ha_a.target.join("data"),
        b"written on node-a, then unstaged",
    );
    ha_a.down(&csi_a, "ha-vol");
    let crash_a = Pod::on(&dirs[0], "crash-vol");
    crash_a.up(&csi_a, "crash-vol").unwrap();
    write_synced(
        &crash_a.target.join("data"),
        b"written on node-a, which then died",
    );

    a.kill().unwrap();
    let killed = Instant::now();

    // The volume still staged on A: B is refused while A's lease lives, then takes over
    // (A's writes are fenced by epoch), with no detach step and no force.
    let crash_b = Pod::on(&dirs[1], "crash-vol");
    let mut refusals = 0;
    loop {
        match crash_b.up(&csi_b, "crash-vol") {
            Ok(()) => break,
            Err(e) if e.code() == Code::FailedPrecondition => {
                refusals += 1;
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "B never took over: {e:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("stage on B failed: {e:?}"),
        }
    }
    eprintln!(
        "crash-vol staged on node-b {:.2} s after node-a was killed ({refusals} refusals first)",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(
        std::fs::read(crash_b.target.join("data")).unwrap(),
        b"written on node-a, which then died"
    );

    // The volume unstaged on A: staged on B with A dead.
    let ha_b = Pod::on(&dirs[1], "ha-vol");
    ha_b.up(&csi_b, "ha-vol").unwrap();
    assert_eq!(
        std::fs::read(ha_b.target.join("data")).unwrap(),
        b"written on node-a, then unstaged"
    );
    write_synced(&ha_b.target.join("more"), b"written on node-b");

    // Online expansion of the replicated volume while it is in use on B.
    let before = host::mount::usage(&ha_b.target).unwrap().total_bytes;
    let grown = csi_b
        .run(
            csi_b
                .controller
                .clone()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: "ha-vol".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 512 << 20,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 512 << 20);
    let node_grown = csi_b
        .run(
            csi_b
                .node
                .clone()
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: "ha-vol".into(),
                    volume_path: ha_b.target.display().to_string(),
                    ..Default::default()
                }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(node_grown.capacity_bytes, 512 << 20);
    let after = host::mount::usage(&ha_b.target).unwrap().total_bytes;
    assert!(
        after > before + (48 << 20),
        "ext4 grew from {before} to {after}"
    );
    assert_eq!(
        std::fs::read(ha_b.target.join("data")).unwrap(),
        b"written on node-a, then unstaged"
    );

    // The condition says which replica is missing.
    wait_for(
        "crash-vol reported abnormal",
        Duration::from_secs(20),
        || {
            let got =
                csi_b
                    .run(csi_b.controller.clone().controller_get_volume(
                        ControllerGetVolumeRequest {
                            volume_id: "crash-vol".into(),
                        },
                    ))
                    .unwrap()
                    .into_inner();
            let cond = got.status.unwrap().volume_condition.unwrap();
            cond.abnormal && cond.message.contains("node-a")
        },
    );

    ha_b.down(&csi_b, "ha-vol");
    crash_b.down(&csi_b, "crash-vol");
}
