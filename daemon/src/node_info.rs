//! Facts about this daemon that every endpoint may report: version, node ID, engine, uptime,
//! and the phase of its life (starting, ready, stopping).
//!
//! Invariant: the phase only moves forward, `Starting` → `Ready` → `Stopping`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Opening storage or binding the local API.
    Starting,
    /// Storage is open and the local API is serving.
    Ready,
    /// A shutdown signal arrived; no new work is accepted.
    Stopping,
}

/// Static facts and the current phase of the daemon.
#[derive(Debug)]
pub struct NodeInfo {
    node_id: String,
    engine: &'static str,
    started: Instant,
    phase: AtomicU8,
}

impl NodeInfo {
    /// A daemon on `node_id` using the I/O engine named `engine`, starting now.
    pub fn new(node_id: impl Into<String>, engine: &'static str) -> Self {
        Self {
            node_id: node_id.into(),
            engine,
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Starting as u8),
        }
    }

    /// This node's ID.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The I/O engine's name (`io_uring`, `sync`).
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Time since the daemon started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    /// Move to `phase`; moving backwards is ignored.
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_only_moves_forward() {
        let info = NodeInfo::new("n", "sync");
        assert_eq!(info.phase(), Phase::Starting);
        info.advance(Phase::Ready);
        assert_eq!(info.phase(), Phase::Ready);
        info.advance(Phase::Stopping);
        info.advance(Phase::Ready);
        assert_eq!(info.phase(), Phase::Stopping);
    }
}
