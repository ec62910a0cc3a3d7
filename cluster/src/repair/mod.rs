//! Repair: bring every replica of an attached volume back in sync, in the background.
//!
//! The node holding a volume's attachment runs one repair task for it (started at attach,
//! ended when the nexus is dropped or fenced, or the attachment moves). Every
//! [`RepairPolicy::interval`] it reads the volume record, asks the [`plan`] for the next
//! step (a pure function of the record, the live nodes, the nexus and an injected clock) and
//! carries it out:
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

pub mod plan;

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::api::{ControlError, ErrorKind, VolumeName};
use replication::nexus::{
    ChildSpec, ChildState, Nexus, RebuildError, RebuildProgress, RebuildReport,
};
use volume::device::BlockDevice;

use replication::device::Child;

use self::plan::{Planner, Step};
use crate::control::{now_secs, Cluster};
use crate::model::{NodeRecord, RebuildRecord, ReplicaRecord, ReplicaState, VolumeRecord};

/// Why a repair step failed. The task logs it (once while it repeats) and tries again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepairError {
    /// The attached nexus cannot serve the size the volume record holds.
    #[error("the attached device cannot grow to the volume's size")]
    Grow(#[source] ControlError),
    /// A replica to rebuild cannot be opened.
    #[error("replica {replica} cannot be opened")]
    Open {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// A replica to rebuild cannot be grown to the volume's size.
    #[error("replica {replica} cannot grow to the volume's size")]
    Fit {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// The volume record could not be changed (the start or the end of a rebuild).
    #[error("the record of replica {replica} cannot be updated")]
    Record {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// The rebuild's copy stopped.
    #[error("the rebuild of {replica} stopped")]
    Rebuild {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: RebuildError,
    },
    /// No live node can take a replacement for a gone node's replica.
    #[error("no node can take a replacement for the replica on {dead}: {reason}")]
    NoReplacement {
        /// The gone node.
        dead: String,
        /// Why (placement's answer).
        reason: String,
    },
    /// The replacement replica could not be created or recorded.
    #[error("the replica on {dead} cannot be replaced")]
    Replace {
        /// The gone node.
        dead: String,
        /// Why.
        #[source]
        source: ControlError,
    },
}

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
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    name: VolumeName,
    epoch: u64,
    nexus: Weak<Nexus<Child>>,
) {
    let mut planner = Planner::new(cluster.repair.replace_after);
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
        cluster.set_view(name.as_str(), Some(&rec));
        // A resize recorded a bigger size: the nexus follows (its replicas grow first).
        let grown = if rec.size_bytes > nexus.size() {
            cluster
                .grow_nexus(&nexus, &name, rec.size_bytes)
                .await
                .map(drop)
                .map_err(RepairError::Grow)
        } else {
            Ok(())
        };
        let writable: BTreeSet<String> = nexus
            .children()
            .into_iter()
            .filter(|(_, state)| state.writable())
            .map(|(id, _)| id)
            .collect();
        // The store reads took time: a nexus fenced meanwhile, or a node whose own lease has
        // lapsed, acts on nothing (it would eject replicas on the strength of a stale view).
        if nexus.is_fenced() {
            return;
        }
        if !nodes.iter().any(|n| n.id == cluster.me.id) {
            continue;
        }
        let step = planner.next(Instant::now(), &rec, &nodes, &writable, nexus.size());
        let outcome = execute(&cluster, &nexus, &name, epoch, &nodes, &rec, step).await;
        match grown.and(outcome).map_err(|e| api::error_chain(&e)) {
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

/// Carry out one step of the plan.
async fn execute(
    cluster: &Arc<Cluster>,
    nexus: &Arc<Nexus<Child>>,
    name: &VolumeName,
    epoch: u64,
    nodes: &[NodeRecord],
    rec: &VolumeRecord,
    step: Step,
) -> Result<(), RepairError> {
    match step {
        Step::Idle => Ok(()),
        Step::Eject { replica } => {
            nexus
                .eject_child(&replica, "its node's lease expired")
                .await;
            Ok(())
        }
        Step::Rebuild {
            replica,
            since,
            size,
        } => {
            let Some(r) = rec.placement.iter().find(|r| r.id() == replica) else {
                return Ok(());
            };
            rebuild(cluster, nexus, name, epoch, nodes, r, since, size).await
        }
        Step::Replace { dead, with } => {
            replace(cluster, name, epoch, nodes, rec.size_bytes, &dead, &with)
                .await
                .map_err(|source| RepairError::Replace { dead, source })
        }
        Step::NoReplacement { dead, reason } => Err(RepairError::NoReplacement { dead, reason }),
    }
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

/// Rebuild the replica `r` (ejected, its node live) of a volume of `size` bytes from
/// generation `since` (0: full) and record it healthy. The replica grows to `size` first if
/// smaller.
#[allow(clippy::too_many_arguments)]
async fn rebuild(
    cluster: &Arc<Cluster>,
    nexus: &Arc<Nexus<Child>>,
    name: &VolumeName,
    epoch: u64,
    nodes: &[NodeRecord],
    r: &ReplicaRecord,
    since: u64,
    size: u64,
) -> Result<(), RepairError> {
    let id = r.id();
    let dev = cluster
        .open_child(nodes, r, name, epoch)
        .await
        .map_err(|source| RepairError::Open {
            replica: id.clone(),
            source,
        })?;
    cluster
        .fit_child(nodes, &r.node, name, &dev, size)
        .await
        .map_err(|source| RepairError::Fit {
            replica: id.clone(),
            source,
        })?;
    // The replica first receives the volume's snapshots it lacks (all of them, for a
    // replacement; the ones taken while it was out, for one that comes back), while it takes
    // no writes yet: the rebuild after them is a delta from the newest.
    let since = if cluster.mode == crate::control::Mode::Cluster {
        match cluster.seed_snapshots(nexus, name, r, &dev, since).await {
            Ok(from) => from,
            Err(e) => {
                tracing::warn!(volume = %name, replica = %id, error = %e.full_message(), "cannot give a replica the volume's snapshots it lacks; it is rebuilt without them");
                since
            }
        }
    } else {
        since
    };
    let kind = if since == 0 { "full" } else { "delta" };
    nexus.upsert_child(ChildSpec {
        id: id.clone(),
        dev,
        local: r.node == cluster.me.id,
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
                    .find(|p| p.id() == id)
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
        .map_err(|source| RepairError::Record {
            replica: id.clone(),
            source,
        })?;
    tracing::info!(volume = %name, replica = %id, kind, since, "rebuilding a replica");

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
                            .find(|p| p.id() == id && p.state == ReplicaState::Rebuilding)
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
        .rebuild(&id, since, cluster.repair.rate, &progress)
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
                Err(source) => {
                    nexus.transition(&id, ChildState::Rebuilding, ChildState::Ejected);
                    Err(RepairError::Record {
                        replica: id.clone(),
                        source,
                    })
                }
            }
        }
        Err(e) => {
            let _ = cluster
                .update(name.as_str(), record(ReplicaState::Ejected, None, None))
                .await;
            Err(RepairError::Rebuild {
                replica: id.clone(),
                source: e,
            })
        }
    }
}

/// Replace the replica on `dead` with a new, empty one on `chosen`; a full rebuild follows.
async fn replace(
    cluster: &Arc<Cluster>,
    name: &VolumeName,
    epoch: u64,
    nodes: &[NodeRecord],
    size: u64,
    dead: &str,
    chosen: &str,
) -> Result<(), ControlError> {
    cluster.create_replica(nodes, chosen, name, size).await?;
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
                ..ReplicaRecord::healthy(chosen)
            };
            Ok(())
        })
        .await?;
    tracing::warn!(volume = %name, gone = dead, new = %chosen, "replaced the replica of a node that is gone; a full rebuild follows");
    Ok(())
}
