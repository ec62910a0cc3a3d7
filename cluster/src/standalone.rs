//! Standalone mode: this node alone, as a one-node cluster.
//!
//! A standalone node runs the same [`Cluster`] code as a cluster node, in
//! [`Mode::Standalone`] over the embedded store (a JSON file in the data directory,
//! [`STORE_FILE`]): volume records, attachments with epochs, ejections recorded before the
//! write that skipped a replica is acknowledged, reconciliation at attach, and delta and full
//! rebuilds by the repair task. The differences are only where replicas live:
//!
//! - a `replicas = N` volume has one replica on each of N distinct pool devices of this node
//!   (the storage places them), recorded as `NODE/DEVICE`;
//! - a one-replica volume is served straight from its replica (no nexus: there is nothing to
//!   replicate to and nobody else to fence);
//! - there is no replica server and no other node: the node record and its lease live in the
//!   embedded store.
//!
//! A replica whose pool device is missing at attach is ejected before the first I/O; when the
//! device is back (the daemon restarted with it), the repair task rebuilds it: delta from the
//! generation recorded at its ejection, or full.
//!
//! [`adopt`] also gives this node's id to records made under another one (the node id
//! changed), and records, at start-up, the volumes this node's storage holds but the store does
//! not know: volumes of an older build (whose multi-replica sets lived in [`LEGACY_SETS_FILE`];
//! a replica recorded ejected there stays ejected, and is rebuilt in full), or a volume whose
//! creation stopped between its replicas and its record.

use std::collections::BTreeMap;
use std::path::Path;

use api::{ControlError, ErrorKind, VolumeControl};
use serde::Deserialize;

use crate::control::{Cluster, Mode};
use crate::model::{volume_key, ReplicaRecord, ReplicaState, VolumeRecord};

/// The embedded store's file in the data directory.
pub const STORE_FILE: &str = "store.json";

/// The replica-set file of builds before standalone mode used the store; read by [`adopt`].
pub const LEGACY_SETS_FILE: &str = "replicas.json";

/// The legacy replica-set file: volume id to its set.
#[derive(Debug, Deserialize)]
struct LegacySets {
    volumes: BTreeMap<String, LegacySet>,
}

#[derive(Debug, Deserialize)]
struct LegacySet {
    /// Pool device id to `healthy` or `ejected`.
    replicas: BTreeMap<String, String>,
}

/// Record every volume of this node's storage that the store does not know yet (see the
/// module documentation); returns how many were recorded.
///
/// # Errors
/// The store or the storage cannot be read, the legacy file is corrupt (forgetting its
/// ejections would let a stale replica serve reads), or a record cannot be written.
pub async fn adopt(cluster: &Cluster, legacy_sets: &Path) -> Result<usize, ControlError> {
    debug_assert_eq!(cluster.mode(), Mode::Standalone);
    let records = cluster.volume_records().await?;
    rehome(cluster, &records).await?;
    let known: Vec<String> = records.into_iter().map(|r| r.name).collect();
    let legacy: BTreeMap<String, LegacySet> =
        match host::persist::read_json::<LegacySets>(legacy_sets) {
            Ok(Some(f)) => f.volumes,
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                return Err(ControlError::new(
                    ErrorKind::Internal,
                    format!(
                        "{}; fix or remove it (removing forgets which replicas were ejected)",
                        api::error_chain(&e)
                    ),
                ))
            }
        };
    let me = cluster.node_id().to_owned();
    let mut adopted = 0;
    for status in cluster.storage().list_volumes().await? {
        if known.iter().any(|n| n == status.name.as_str()) {
            continue;
        }
        let set = legacy.get(&status.id);
        let state_of = |pool: &str| match set.and_then(|s| s.replicas.get(pool)) {
            Some(s) if s == "ejected" => ReplicaState::Ejected,
            _ => ReplicaState::Healthy,
        };
        let mut placement: Vec<ReplicaRecord> = status
            .replica_status
            .iter()
            .map(|r| ReplicaRecord {
                state: state_of(&r.pool_id),
                ..ReplicaRecord::on_device(&me, &r.pool_id)
            })
            .collect();
        // Replicas the legacy file knew on devices that are gone: recorded ejected, so the
        // status shows them and a rebuild brings them back when their device returns.
        if let Some(set) = set {
            for pool in set.replicas.keys() {
                if !placement.iter().any(|r| r.device.as_deref() == Some(pool)) {
                    placement.push(ReplicaRecord {
                        state: ReplicaState::Ejected,
                        ..ReplicaRecord::on_device(&me, pool)
                    });
                }
            }
        }
        let rec = VolumeRecord {
            name: status.name.to_string(),
            id: status.id.clone(),
            size_bytes: status.size_bytes,
            replicas: status.replicas,
            created_at: status.created_at,
            placement,
            attachment: None,
            epoch: 0,
        };
        let value = serde_json::to_vec(&rec).expect("volume record serializes");
        let created = cluster
            .store()
            .create(&volume_key(&rec.name), &value, None)
            .await
            .map_err(|e| {
                ControlError::new(
                    ErrorKind::Unavailable,
                    format!("cannot record volume {}: {e}", rec.name),
                )
            })?;
        if created {
            tracing::info!(volume = %rec.name, replicas = ?rec.placement.iter().map(|r| (r.id(), r.state.as_str())).collect::<Vec<_>>(), "recorded a volume of this node's storage in the store");
            adopted += 1;
        }
    }
    Ok(adopted)
}

/// Give this node's id to every record that names another: in standalone mode every volume
/// in the store lives on this node's pool devices, whatever id the node had when it was
/// recorded (`--node-id` changed, or the hostname it defaults to did).
async fn rehome(cluster: &Cluster, records: &[VolumeRecord]) -> Result<(), ControlError> {
    let me = cluster.node_id().to_owned();
    let elsewhere = |rec: &VolumeRecord| {
        rec.placement.iter().any(|r| r.node != me)
            || rec.attachment.as_ref().is_some_and(|a| a.node != me)
    };
    // Only records that name another node are written (a start-up writes nothing otherwise).
    for rec in records.iter().filter(|r| elsewhere(r)) {
        cluster
            .update(&rec.name, |rec| {
                for r in &mut rec.placement {
                    r.node.clone_from(&me);
                }
                if let Some(a) = rec.attachment.as_mut() {
                    a.node.clone_from(&me);
                }
                Ok(())
            })
            .await?;
        tracing::warn!(volume = %rec.name, node = %me, "this node's id changed; the volume's record now names it");
    }
    Ok(())
}
