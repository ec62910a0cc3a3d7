//! Replica placement: which nodes hold a new volume's replicas.
//!
//! Rules, in order:
//! 1. every replica on a distinct node (a node holds at most one replica of a volume);
//! 2. spread over zones: while some zone holds none of the volume's replicas, the next replica
//!    goes to such a zone (nodes without a zone label count as one zone each);
//! 3. capacity: only nodes with room for the whole volume; among candidates, the most free
//!    space first (ties by node id, so placement is deterministic).
//!
//! Too few nodes is an error naming the shortfall; too few zones is a warning, because the
//! volume still survives the loss of any one node — unless the caller asked for a hard zone
//! spread, when it is an error.
//!
//! [`PlacementHints`] narrow and order the choice: only `allowed_nodes` are candidates, and
//! `preferred_nodes` come first in their order (the node that will run the workload gets a
//! local replica), before the spread and capacity rules pick the rest.

use std::collections::BTreeSet;

use ::api::{PlacementHints, ZoneSpread};

use crate::model::NodeRecord;

/// Where the replicas go, and what the caller should be warned about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The chosen nodes' ids, in order.
    pub nodes: Vec<String>,
    /// Warnings (e.g. fewer zones than replicas).
    pub warnings: Vec<String>,
}

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer live nodes than replicas.
    #[error(
        "{replicas} replicas need {replicas} nodes, but only {live} live node(s) are registered \
         ({ids}); start more nodes or ask for fewer replicas"
    )]
    TooFewNodes {
        /// Requested replicas.
        replicas: usize,
        /// Live nodes.
        live: usize,
        /// Their ids.
        ids: String,
    },
    /// A hard zone spread, but too few zones among the candidates.
    #[error(
        "{replicas} replicas with a hard zone spread need {replicas} zones, but the candidate \
         nodes span only {zones}; add nodes in other zones or use zoneSpread soft"
    )]
    TooFewZones {
        /// Requested replicas.
        replicas: usize,
        /// Distinct zones among the candidates.
        zones: usize,
    },
    /// Enough nodes, but too few with room.
    #[error(
        "{replicas} replicas of {size} bytes need {replicas} nodes with that much free space, \
         but only {fit} have it; free space or add nodes"
    )]
    NoCapacity {
        /// Requested replicas.
        replicas: usize,
        /// Volume size.
        size: u64,
        /// Nodes with room.
        fit: usize,
    },
}

/// Choose `replicas` nodes among `nodes` for a volume of `size` bytes.
///
/// # Errors
/// Too few nodes, or too few with room.
pub fn place(
    nodes: &[NodeRecord],
    replicas: usize,
    size: u64,
) -> Result<Placement, PlacementError> {
    place_with(nodes, replicas, size, &PlacementHints::default())
}

/// [`place`], narrowed and ordered by `hints`.
///
/// # Errors
/// Too few (allowed) nodes, too few with room, or too few zones for a hard spread.
pub fn place_with(
    nodes: &[NodeRecord],
    replicas: usize,
    size: u64,
    hints: &PlacementHints,
) -> Result<Placement, PlacementError> {
    let nodes: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| {
            hints
                .allowed_nodes
                .as_ref()
                .is_none_or(|a| a.contains(&n.id))
        })
        .collect();
    if nodes.len() < replicas {
        return Err(PlacementError::TooFewNodes {
            replicas,
            live: nodes.len(),
            ids: nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let mut candidates: Vec<&NodeRecord> = nodes
        .iter()
        .copied()
        .filter(|n| n.capacity_bytes >= size)
        .collect();
    if candidates.len() < replicas {
        return Err(PlacementError::NoCapacity {
            replicas,
            size,
            fit: candidates.len(),
        });
    }
    let rank = |n: &NodeRecord| {
        hints
            .preferred_nodes
            .iter()
            .position(|p| *p == n.id)
            .unwrap_or(usize::MAX)
    };
    candidates.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then(b.free_bytes.cmp(&a.free_bytes))
            .then(a.id.cmp(&b.id))
    });
    let zone_of = |n: &NodeRecord| n.zone.clone().unwrap_or_else(|| format!("node:{}", n.id));
    if hints.zone_spread == ZoneSpread::Hard {
        let zones: BTreeSet<String> = candidates.iter().map(|n| zone_of(n)).collect();
        if zones.len() < replicas {
            return Err(PlacementError::TooFewZones {
                replicas,
                zones: zones.len(),
            });
        }
    }
    let mut chosen: Vec<&NodeRecord> = Vec::with_capacity(replicas);
    let mut used_zones = BTreeSet::new();
    while chosen.len() < replicas {
        let pick = candidates
            .iter()
            .position(|n| !used_zones.contains(&zone_of(n)))
            .unwrap_or(0);
        let n = candidates.remove(pick);
        used_zones.insert(zone_of(n));
        chosen.push(n);
    }
    let mut warnings = Vec::new();
    let labelled = nodes.iter().any(|n| n.zone.is_some());
    if labelled && used_zones.len() < replicas {
        warnings.push(format!(
            "only {} zone(s) available for {replicas} replicas: some replicas share a zone, so \
             losing that zone loses them together",
            used_zones.len()
        ));
    }
    Ok(Placement {
        nodes: chosen.iter().map(|n| n.id.clone()).collect(),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: Option<&str>, free: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            replica_addr: format!("127.0.0.1:{}", 7000 + id.len()),
            zone: zone.map(Into::into),
            capacity_bytes: free,
            free_bytes: free,
            version: String::new(),
        }
    }

    #[test]
    fn replicas_go_on_distinct_nodes_and_zones() {
        let nodes = [
            node("a", Some("z1"), 100),
            node("b", Some("z1"), 90),
            node("c", Some("z2"), 80),
            node("d", Some("z3"), 10),
        ];
        let p = place(&nodes, 3, 10).unwrap();
        assert_eq!(p.nodes, ["a", "c", "d"]);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn too_few_zones_is_a_warning() {
        let nodes = [node("a", Some("z1"), 100), node("b", Some("z1"), 90)];
        let p = place(&nodes, 2, 10).unwrap();
        assert_eq!(p.nodes, ["a", "b"]);
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("only 1 zone"), "{:?}", p.warnings);
    }

    #[test]
    fn too_few_nodes_names_the_shortfall() {
        let nodes = [node("a", None, 100), node("b", None, 100)];
        let e = place(&nodes, 3, 10).unwrap_err();
        assert!(e.to_string().contains("3 replicas need 3 nodes"), "{e}");
        assert!(e.to_string().contains("a, b"), "{e}");
    }

    #[test]
    fn capacity_is_respected_and_most_free_first() {
        let nodes = [node("a", None, 5), node("b", None, 50), node("c", None, 60)];
        assert_eq!(place(&nodes, 2, 10).unwrap().nodes, ["c", "b"]);
        let e = place(&nodes, 3, 10).unwrap_err();
        assert!(
            matches!(e, PlacementError::NoCapacity { fit: 2, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn unlabelled_nodes_never_warn() {
        let nodes = [node("a", None, 5), node("b", None, 5)];
        assert!(place(&nodes, 2, 1).unwrap().warnings.is_empty());
    }

    #[test]
    fn hints_narrow_and_order_the_choice() {
        let nodes = [
            node("a", Some("z1"), 100),
            node("b", Some("z1"), 90),
            node("c", Some("z2"), 80),
            node("d", Some("z3"), 70),
        ];
        let prefer_b = PlacementHints {
            preferred_nodes: vec!["b".into()],
            ..PlacementHints::default()
        };
        assert_eq!(
            place_with(&nodes, 2, 10, &prefer_b).unwrap().nodes,
            ["b", "c"]
        );
        let only = PlacementHints {
            allowed_nodes: Some(vec!["c".into(), "d".into()]),
            ..PlacementHints::default()
        };
        assert_eq!(place_with(&nodes, 2, 10, &only).unwrap().nodes, ["c", "d"]);
        assert!(matches!(
            place_with(&nodes, 3, 10, &only),
            Err(PlacementError::TooFewNodes { live: 2, .. })
        ));
        let hard = PlacementHints {
            allowed_nodes: Some(vec!["a".into(), "b".into(), "c".into()]),
            zone_spread: ZoneSpread::Hard,
            ..PlacementHints::default()
        };
        assert!(matches!(
            place_with(&nodes, 3, 10, &hard),
            Err(PlacementError::TooFewZones { zones: 2, .. })
        ));
        assert_eq!(place_with(&nodes, 2, 10, &hard).unwrap().nodes, ["a", "c"]);
    }
}
