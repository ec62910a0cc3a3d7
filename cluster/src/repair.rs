//! Repair: bring every replica of an attached volume back in sync, in the background.
//!
//! The node holding a volume's attachment runs one repair task for it (started at attach,
//! ended when the nexus is dropped or fenced, or the attachment moves). Every
//! [`RepairPolicy::interval`] it reads the volume record and, one replica at a time:
//! - **ejects** a healthy replica whose node's lease expired, so writes stop waiting for it;
//! - **rebuilds** a replica that is ejected (or was left rebuilding by an earlier attachment)
//!   once its node is live: it connects and registers the epoch, is recorded `rebuilding`,
//!   joins the nexus ([`Nexus::rebuild`]) and receives the extents changed since the
//!   generation its ejection recorded, then is recorded healthy;
//! - **replaces** a replica whose node has been gone for [`RepairPolicy::replace_after`] with
//!   a new one on a live node that holds none of the volume (a zone not yet used first); the
//!   new replica then gets a full rebuild of the allocated extents.
//!
//! Progress goes into the volume record about once a second, so `volume inspect` and
//! `/metrics` on any node show it.
//!
//! Each check also makes the nexus follow the record's size: a resize on any node grows the
//! replicas and records the new size, and this task grows the attached nexus within one
//! interval. A rebuild first grows its target to the volume's size (a replica that was away
//! during a resize, or a replacement created before it, is smaller).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::api::{ControlError, ErrorKind, VolumeName};
use replication::nexus::{ChildSpec, ChildState, Nexus, RebuildProgress, RebuildReport};
use volume::device::BlockDevice;

use replication::device::Child;
use crate::model::{NodeRecord, RebuildRecord, ReplicaRecord, ReplicaState, VolumeRecord};
use crate::control::{now_secs, Cluster};
use crate::placement;

/// How the repair task works.
#[derive(Debug, Clone, Copy)]
pub struct RepairPolicy {
    /// Copy at most this many bytes per second per rebuild (`None`: as fast as it goes).
    pub rate: Option<u64>,
    /// Replace a replica whose node has been gone this long.
    pub replace_after: Duration,
    /// How often the record is checked.
    pub interval: Duration,
}

impl Default for RepairPolicy {
    fn default() -> Self {
        Self {
            rate: Some(256 << 20),
            replace_after: Duration::from_secs(300),
            interval: Duration::from_secs(1),
        }
    }
}

/// The repair task of `name`, attached here with `epoch`.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    name: VolumeName,
    epoch: u64,
    nexus: Weak<Nexus<Child>>,
) {
    let mut gone_since: HashMap<String, Instant> = HashMap::new();
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep(cluster.repair.interval).await;
        let Some(nexus) = nexus.upgrade() else {
            return;
        };
        let current = cluster
            .nexus(name.as_str())
            .is_some_and(|n| Arc::ptr_eq(&n, &nexus));
        if nexus.is_fenced() || !current {
            return;
        }
        let (Ok((rec, _)), Ok(nodes)) =
            (cluster.volume(name.as_str()).await, cluster.nodes().await)
        else {
            continue; // the store is unreachable; try again
        };
        if !holds(&cluster, &rec, epoch) {
            return;
        }
        // A resize recorded a bigger size: the nexus follows (its replicas grow first).
        let grown = if rec.size_bytes > nexus.size() {
            cluster
                .grow_nexus(&nexus, &name, rec.size_bytes)
                .await
                .map(drop)
                .map_err(|e| e.full_message())
        } else {
            Ok(())
        };
        let outcome = repair_once(
            &cluster,
            &nexus,
            &name,
            epoch,
            &rec,
            &nodes,
            &mut gone_since,
        )
        .await;
        match grown.and(outcome) {
            Err(e) if last_error.as_deref() != Some(e.as_str()) => {
                tracing::warn!(volume = %name, error = %e, "repair step failed; retrying");
                last_error = Some(e);
            }
            Err(_) => {}
            Ok(()) => last_error = None,
        }
    }
}

/// Whether this node still holds the attachment with `epoch`.
fn holds(cluster: &Cluster, rec: &VolumeRecord, epoch: u64) -> bool {
    rec.attachment
        .as_ref()
        .is_some_and(|a| a.node == cluster.me.id && a.epoch == epoch)
}

fn taken_over(name: &VolumeName) -> ControlError {
    ControlError::new(
        ErrorKind::FailedPrecondition,
        format!("volume {name} is no longer attached here with this epoch"),
    )
}

/// One step: the first replica that needs something gets it.
async fn repair_once(
    cluster: &Arc<Cluster>,
    nexus: &Arc<Nexus<Child>>,
    name: &VolumeName,
    epoch: u64,
    rec: &VolumeRecord,
    nodes: &[NodeRecord],
    gone_since: &mut HashMap<String, Instant>,
) -> Result<(), String> {
    let live = |id: &str| nodes.iter().any(|n| n.id == id);
    gone_since.retain(|id, _| !live(id));
    for r in &rec.placement {
        if r.state == ReplicaState::Healthy {
            if !live(&r.node) && nexus.eject_child(&r.node, "its node's lease expired").await {
                return Ok(());
            }
            continue;
        }
        if live(&r.node) {
            let size = rec.size_bytes.max(nexus.size());
            return rebuild(cluster, nexus, name, epoch, nodes, r, size).await;
        }
        let gone = *gone_since
            .entry(r.node.clone())
            .or_insert_with(Instant::now);
        if gone.elapsed() >= cluster.repair.replace_after {
            gone_since.remove(&r.node);
            return replace(cluster, name, epoch, nodes, rec, &r.node)
                .await
                .map_err(|e| e.full_message());
        }
    }
    Ok(())
}

fn progress_record(kind: &str, p: &RebuildProgress, started: Instant) -> RebuildRecord {
    RebuildRecord {
        kind: kind.to_owned(),
        total_bytes: p.total_bytes.load(std::sync::atomic::Ordering::SeqCst),
        done_bytes: p.done_bytes.load(std::sync::atomic::Ordering::SeqCst),
        eta_seconds: p.eta(started.elapsed()).map(|d| d.as_secs()),
        elapsed_ms: started.elapsed().as_millis() as u64,
        updated_at: now_secs(),
    }
}

fn report_record(kind: &str, r: &RebuildReport) -> RebuildRecord {
    RebuildRecord {
        kind: kind.to_owned(),
        total_bytes: r.copied_bytes,
        done_bytes: r.copied_bytes,
        eta_seconds: Some(0),
        elapsed_ms: r.elapsed.as_millis() as u64,
        updated_at: now_secs(),
    }
}

/// Rebuild the replica `r` (ejected, on a live node) of a volume of `size` bytes and record
/// it healthy. The replica grows to `size` first if it is smaller.
async fn rebuild(
    cluster: &Arc<Cluster>,
    nexus: &Arc<Nexus<Child>>,
    name: &VolumeName,
    epoch: u64,
    nodes: &[NodeRecord],
    r: &ReplicaRecord,
    size: u64,
) -> Result<(), String> {
    let id = r.node.clone();
    let kind = if r.since == 0 { "full" } else { "delta" };
    let dev = cluster
        .open_child(nodes, &id, name, epoch)
        .await
        .map_err(|e| format!("replica on {id}: {}", e.full_message()))?;
    cluster
        .fit_child(nodes, &id, name, &dev, size)
        .await
        .map_err(|e| format!("replica on {id} cannot grow: {}", e.full_message()))?;
    nexus.upsert_child(ChildSpec {
        id: id.clone(),
        dev,
        local: id == cluster.me.id,
        state: ChildState::Ejected,
    });
    let started = Instant::now();
    let progress = Arc::new(RebuildProgress::default());
    let record =
        |state: ReplicaState, progress: Option<RebuildRecord>, done: Option<RebuildRecord>| {
            let id = id.clone();
            move |rec: &mut VolumeRecord| {
                if !holds(cluster, rec, epoch) {
                    return Err(taken_over(name));
                }
                let entry = rec
                    .placement
                    .iter_mut()
                    .find(|p| p.node == id)
                    .ok_or_else(|| taken_over(name))?;
                // Only this task makes a replica healthy, and only from `rebuilding`: a replica
                // ejected again during its rebuild (it failed a write) must stay out.
                let expected = if done.is_some() {
                    entry.state == ReplicaState::Rebuilding
                } else {
                    entry.state != ReplicaState::Healthy
                };
                if !expected {
                    return Err(ControlError::new(
                        ErrorKind::FailedPrecondition,
                        format!("replica {id} is {} now", entry.state.as_str()),
                    ));
                }
                entry.state = state;
                entry.rebuild.clone_from(&progress);
                if let Some(d) = &done {
                    entry.last_rebuild = Some(d.clone());
                    entry.since = 0;
                }
                Ok(())
            }
        };
    cluster
        .update(
            name.as_str(),
            record(
                ReplicaState::Rebuilding,
                Some(progress_record(kind, &progress, started)),
                None,
            ),
        )
        .await
        .map_err(|e| e.full_message())?;
    tracing::info!(volume = %name, replica = %id, kind, since = r.since, "rebuilding a replica");

    // Publish progress about once a second while the copy runs.
    let reporter = {
        let (cluster, name, id, progress) = (
            Arc::clone(cluster),
            name.clone(),
            id.clone(),
            Arc::clone(&progress),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = progress_record(kind, &progress, started);
                let _ = cluster
                    .update(name.as_str(), |rec| {
                        if let Some(e) = rec
                            .placement
                            .iter_mut()
                            .find(|p| p.node == id && p.state == ReplicaState::Rebuilding)
                        {
                            e.rebuild = Some(now.clone());
                        }
                        Ok(())
                    })
                    .await;
            }
        })
    };
    let result = nexus
        .rebuild(&id, r.since, cluster.repair.rate, &progress)
        .await;
    reporter.abort();
    let _ = reporter.await;
    match result {
        Ok(report) => {
            let done = report_record(kind, &report);
            match cluster
                .update(
                    name.as_str(),
                    record(ReplicaState::Healthy, None, Some(done)),
                )
                .await
            {
                Ok(_) => {
                    nexus.transition(&id, ChildState::Rebuilding, ChildState::Healthy);
                    tracing::info!(volume = %name, replica = %id, kind, copied_bytes = report.copied_bytes, elapsed_ms = report.elapsed.as_millis() as u64, "replica rebuilt and healthy");
                    Ok(())
                }
                Err(e) => {
                    nexus.transition(&id, ChildState::Rebuilding, ChildState::Ejected);
                    Err(format!(
                        "the rebuild of {id} finished but cannot be recorded: {}",
                        e.full_message()
                    ))
                }
            }
        }
        Err(e) => {
            let _ = cluster
                .update(name.as_str(), record(ReplicaState::Ejected, None, None))
                .await;
            Err(format!("the rebuild of {id} stopped: {e}"))
        }
    }
}

/// Replace the replica on `dead` with a new, empty one elsewhere; a full rebuild follows.
async fn replace(
    cluster: &Arc<Cluster>,
    name: &VolumeName,
    epoch: u64,
    nodes: &[NodeRecord],
    rec: &VolumeRecord,
    dead: &str,
) -> Result<(), ControlError> {
    let used: Vec<&str> = rec.placement.iter().map(|r| r.node.as_str()).collect();
    let used_zones: Vec<&str> = nodes
        .iter()
        .filter(|n| used.contains(&n.id.as_str()))
        .filter_map(|n| n.zone.as_deref())
        .collect();
    let free: Vec<NodeRecord> = nodes
        .iter()
        .filter(|n| !used.contains(&n.id.as_str()))
        .cloned()
        .collect();
    let new_zone: Vec<NodeRecord> = free
        .iter()
        .filter(|n| n.zone.as_deref().is_none_or(|z| !used_zones.contains(&z)))
        .cloned()
        .collect();
    let candidates = if new_zone.is_empty() {
        &free
    } else {
        &new_zone
    };
    let chosen = placement::place(candidates, 1, rec.size_bytes)
        .map_err(|e| {
            ControlError::new(
                ErrorKind::ResourceExhausted,
                format!("no node can take a replacement for the replica on {dead}: {e}"),
            )
        })?
        .nodes
        .remove(0);
    cluster
        .create_replica(nodes, &chosen, name, rec.size_bytes)
        .await?;
    cluster
        .update(name.as_str(), |rec| {
            if !holds(cluster, rec, epoch) {
                return Err(taken_over(name));
            }
            let Some(slot) = rec
                .placement
                .iter_mut()
                .find(|r| r.node == dead && r.state != ReplicaState::Healthy)
            else {
                return Err(ControlError::new(
                    ErrorKind::FailedPrecondition,
                    format!("the replica on {dead} changed meanwhile"),
                ));
            };
            *slot = ReplicaRecord {
                state: ReplicaState::Ejected,
                ..ReplicaRecord::healthy(&chosen)
            };
            Ok(())
        })
        .await?;
    tracing::warn!(volume = %name, gone = dead, new = %chosen, "replaced the replica of a node that is gone; a full rebuild follows");
    Ok(())
}
