//! The repair plan: what the next repair step of a volume is, decided from the volume record,
//! the live nodes, the nexus's writable children and the time, with no I/O, no store calls and
//! no clock of its own. The runner ([`super::run`]) gathers the inputs, asks [`Planner::next`]
//! and carries the step out.
//!
//! Replicas are named by their id ([`ReplicaRecord::id`](crate::model::ReplicaRecord::id):
//! the node, or `NODE/DEVICE` in standalone mode); liveness is their node's.
//!
//! Rules, for the replicas in record order (the first one that needs something gets it):
//! - a **healthy** replica whose node is not live (its lease expired) is ejected, if the nexus
//!   still writes to it; otherwise it is left alone;
//! - a replica that is **not healthy** on a live node is rebuilt: delta from its recorded
//!   `since`, full when that is 0, to the larger of the record's and the nexus's size;
//! - a replica that is **not healthy** on a node gone for [`RepairPolicy::replace_after`]
//!   (counted from the first step that saw it gone; a node that comes back resets the count)
//!   is replaced by one on a live node holding none of the volume, a zone not used yet first.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::model::{NodeRecord, ReplicaState, VolumeRecord};
use crate::placement;

/// One repair step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every replica is as it should be, or is waiting for its node.
    Idle,
    /// Eject the replica `replica` from the nexus: its node's lease expired.
    Eject {
        /// The replica's id.
        replica: String,
    },
    /// Rebuild the replica `replica`, whose node is live.
    Rebuild {
        /// The replica's id.
        replica: String,
        /// Copy the extents written after this generation (0: every allocated extent).
        since: u64,
        /// Grow the replica to this size first if it is smaller.
        size: u64,
    },
    /// Replace the replica on `dead` with a new one on `with`; a full rebuild follows.
    Replace {
        /// The node that is gone.
        dead: String,
        /// The node chosen for the new replica.
        with: String,
    },
    /// The replica on `dead` should be replaced, but no live node can take it.
    NoReplacement {
        /// The node that is gone.
        dead: String,
        /// Why no node can take it.
        reason: String,
    },
}

/// The repair plan of one attached volume. It remembers since when each node has been gone.
#[derive(Debug)]
pub struct Planner {
    replace_after: Duration,
    gone_since: HashMap<String, Instant>,
}

impl Planner {
    /// A planner that replaces replicas of nodes gone for `replace_after`.
    pub fn new(replace_after: Duration) -> Self {
        Self {
            replace_after,
            gone_since: HashMap::new(),
        }
    }

    /// The next step at `now` for the volume `rec`, given the live `nodes`, the ids of the
    /// nexus's `writable` children and the nexus's size.
    pub fn next(
        &mut self,
        now: Instant,
        rec: &VolumeRecord,
        nodes: &[NodeRecord],
        writable: &BTreeSet<String>,
        nexus_size: u64,
    ) -> Step {
        let live = |id: &str| nodes.iter().any(|n| n.id == id);
        self.gone_since.retain(|id, _| !live(id));
        for r in &rec.placement {
            if r.state == ReplicaState::Healthy {
                // Never the last healthy replica: with none left recorded healthy the volume
                // could not be attached anywhere again, though its data is intact on that node.
                let another = rec.placement.iter().any(|o| {
                    o.id() != r.id()
                        && o.state == ReplicaState::Healthy
                        && live(&o.node)
                        && writable.contains(&o.id())
                });
                if !live(&r.node) && writable.contains(&r.id()) && another {
                    return Step::Eject { replica: r.id() };
                }
                continue;
            }
            if live(&r.node) {
                return Step::Rebuild {
                    replica: r.id(),
                    since: r.since,
                    size: rec.size_bytes.max(nexus_size),
                };
            }
            let gone = *self.gone_since.entry(r.node.clone()).or_insert(now);
            if now.saturating_duration_since(gone) >= self.replace_after {
                // Whatever comes of it, the next attempt waits another `replace_after`.
                self.gone_since.remove(&r.node);
                return match replacement(rec, nodes) {
                    Ok(with) => Step::Replace {
                        dead: r.node.clone(),
                        with,
                    },
                    Err(reason) => Step::NoReplacement {
                        dead: r.node.clone(),
                        reason,
                    },
                };
            }
        }
        Step::Idle
    }
}

/// A live node for a new replica of `rec`: one holding none of its replicas, in a zone none
/// of them uses if there is one, chosen by placement (capacity-aware).
fn replacement(rec: &VolumeRecord, nodes: &[NodeRecord]) -> Result<String, String> {
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
    placement::place(candidates, 1, rec.size_bytes)
        .map(|mut p| p.nodes.remove(0))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReplicaRecord;

    const GIB: u64 = 1 << 30;
    const REPLACE_AFTER: Duration = Duration::from_secs(300);

    fn node(id: &str, zone: Option<&str>) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            replica_addr: format!("{id}:1"),
            zone: zone.map(Into::into),
            capacity_bytes: 100 * GIB,
            free_bytes: 100 * GIB,
            version: String::new(),
        }
    }

    fn volume(replicas: &[(&str, ReplicaState, u64)]) -> VolumeRecord {
        VolumeRecord {
            name: "db".into(),
            id: "id".into(),
            size_bytes: GIB,
            replicas: replicas.len() as u8,
            created_at: 0,
            placement: replicas
                .iter()
                .map(|(n, state, since)| ReplicaRecord {
                    state: *state,
                    since: *since,
                    ..ReplicaRecord::healthy(n)
                })
                .collect(),
            attachment: None,
            epoch: 1,
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    use ReplicaState::{Ejected, Healthy, Rebuilding};

    #[test]
    fn all_healthy_and_live_is_idle() {
        let mut p = Planner::new(REPLACE_AFTER);
        let rec = volume(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let nodes = [node("a", None), node("b", None)];
        let step = p.next(Instant::now(), &rec, &nodes, &set(&["a", "b"]), GIB);
        assert_eq!(step, Step::Idle);
    }

    #[test]
    fn lease_expired_ejects_a_replica_the_nexus_still_writes() {
        let mut p = Planner::new(REPLACE_AFTER);
        let rec = volume(&[("a", Healthy, 0), ("b", Healthy, 0)]);
        let nodes = [node("a", None)];
        let now = Instant::now();
        assert_eq!(
            p.next(now, &rec, &nodes, &set(&["a", "b"]), GIB),
            Step::Eject {
                replica: "b".into()
            }
        );
        // Already out of the nexus (its ejection is being recorded): nothing to do.
        assert_eq!(p.next(now, &rec, &nodes, &set(&["a"]), GIB), Step::Idle);
    }

    /// Found by the seeded cluster fault runs (seed 10): the attached node, stopped past its
    /// lease with the only healthy replica, ejected that replica when it was continued; the
    /// volume then had no healthy replica and could not be attached anywhere.
    #[test]
    fn the_last_healthy_replica_is_never_ejected() {
        let mut p = Planner::new(REPLACE_AFTER);
        let rec = volume(&[("a", Healthy, 0), ("b", Ejected, 40)]);
        let nodes = [node("b", None)];
        let step = p.next(Instant::now(), &rec, &nodes, &set(&["a"]), GIB);
        assert!(
            !matches!(step, Step::Eject { .. }),
            "the only healthy replica was ejected: {step:?}"
        );
    }

    #[test]
    fn a_replica_whose_node_is_back_is_rebuilt_from_its_generation() {
        let mut p = Planner::new(REPLACE_AFTER);
        let nodes = [node("a", None), node("b", None)];
        let rec = volume(&[("a", Healthy, 0), ("b", Ejected, 42)]);
        assert_eq!(
            p.next(Instant::now(), &rec, &nodes, &set(&["a"]), GIB),
            Step::Rebuild {
                replica: "b".into(),
                since: 42,
                size: GIB
            }
        );
        // Left rebuilding by an earlier attachment, never recorded a generation: a full
        // rebuild, to the nexus's size if a resize made it bigger than the record says.
        let rec = volume(&[("a", Healthy, 0), ("b", Rebuilding, 0)]);
        assert_eq!(
            p.next(Instant::now(), &rec, &nodes, &set(&["a"]), 2 * GIB),
            Step::Rebuild {
                replica: "b".into(),
                since: 0,
                size: 2 * GIB
            }
        );
    }

    #[test]
    fn a_node_gone_long_enough_is_replaced_and_one_back_in_time_is_not() {
        let mut p = Planner::new(REPLACE_AFTER);
        let rec = volume(&[("a", Healthy, 0), ("b", Ejected, 7)]);
        let without_b = [node("a", None), node("c", None)];
        let with_b = [node("a", None), node("b", None), node("c", None)];
        let t0 = Instant::now();
        let w = set(&["a"]);
        assert_eq!(p.next(t0, &rec, &without_b, &w, GIB), Step::Idle);
        let almost = t0 + REPLACE_AFTER.saturating_sub(Duration::from_secs(1));
        assert_eq!(p.next(almost, &rec, &without_b, &w, GIB), Step::Idle);
        // It comes back just in time: rebuilt, and the clock starts again when it goes.
        assert!(matches!(
            p.next(almost, &rec, &with_b, &w, GIB),
            Step::Rebuild { since: 7, .. }
        ));
        let t1 = t0 + REPLACE_AFTER;
        assert_eq!(p.next(t1, &rec, &without_b, &w, GIB), Step::Idle);
        assert_eq!(
            p.next(t1 + REPLACE_AFTER, &rec, &without_b, &w, GIB),
            Step::Replace {
                dead: "b".into(),
                with: "c".into()
            }
        );
        // A failed replacement waits another full period before the next try.
        let t2 = t1 + REPLACE_AFTER;
        assert_eq!(
            p.next(t2 + Duration::from_secs(1), &rec, &without_b, &w, GIB),
            Step::Idle
        );
    }

    #[test]
    fn a_replacement_prefers_a_zone_the_volume_does_not_use() {
        let mut p = Planner::new(Duration::ZERO);
        let rec = volume(&[("a", Healthy, 0), ("b", Ejected, 7)]);
        let nodes = [
            node("a", Some("z1")),
            node("c", Some("z1")),
            node("d", Some("z2")),
        ];
        assert_eq!(
            p.next(Instant::now(), &rec, &nodes, &set(&["a"]), GIB),
            Step::Replace {
                dead: "b".into(),
                with: "d".into()
            }
        );
    }

    #[test]
    fn standalone_replicas_are_named_by_node_and_device() {
        let mut p = Planner::new(REPLACE_AFTER);
        let mut rec = volume(&[("me", Healthy, 0), ("me", Ejected, 9)]);
        rec.placement[0].device = Some("d0".into());
        rec.placement[1].device = Some("d1".into());
        let nodes = [node("me", None)];
        assert_eq!(
            p.next(Instant::now(), &rec, &nodes, &set(&["me/d0"]), GIB),
            Step::Rebuild {
                replica: "me/d1".into(),
                since: 9,
                size: GIB
            }
        );
    }

    #[test]
    fn no_free_node_is_reported_not_retried_at_once() {
        let mut p = Planner::new(Duration::ZERO);
        let rec = volume(&[("a", Healthy, 0), ("b", Ejected, 7)]);
        let nodes = [node("a", None)];
        let now = Instant::now();
        assert!(matches!(
            p.next(now, &rec, &nodes, &set(&["a"]), GIB),
            Step::NoReplacement { ref dead, .. } if dead == "b"
        ));
    }
}
