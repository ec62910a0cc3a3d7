//! Rebuild: the plan of what a returning or new replica needs ([`plan_rebuild`]), and the copy
//! that carries it out under I/O ([`Nexus::rebuild`]).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use std::time::Instant;

use volume::device::BlockDevice;
use volume::device::BufError;
use volume::device::DeviceError;
use volume::device::DeviceErrorKind;
use volume::device::Generations;
use volume::device::WriteFlags;
use volume::io::IoBuf;
use volume::pool::format::EXTENT;

use super::Child;
use super::ChildState;
use super::{check_generations, Nexus};

/// What a rebuild does to one extent of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copy the extent from a healthy child, stamping its generation.
    Copy {
        /// The extent index.
        extent: u64,
        /// The source's generation of it.
        generation: u64,
    },
    /// The extent is unallocated on the healthy side: release it on the target.
    Release {
        /// The extent index.
        extent: u64,
    },
}

/// The extents a target needs to match `source`, given that it had every request up to
/// generation `since` (0 for a new, empty replica: every allocated extent is copied).
///
/// An extent is copied when the source changed it after `since`, when the target changed it
/// after `since` (a write the source never took), when the target lacks it, or when either
/// side's generation is unknown (crash recovery). An extent the source does not have but the
/// target does is released. Both lists must be in extent order.
pub fn plan_rebuild(source: &Generations, target: &Generations, since: u64) -> Vec<Step> {
    let newer = |g: u64| g > since; // GENERATION_UNKNOWN is newer than everything
    let mut steps = Vec::new();
    let (mut s, mut t) = (
        source.extents.iter().peekable(),
        target.extents.iter().peekable(),
    );
    loop {
        match (s.peek(), t.peek()) {
            (None, None) => return steps,
            (Some(a), Some(b)) if a.extent == b.extent => {
                if newer(a.generation) || newer(b.generation) {
                    steps.push(Step::Copy {
                        extent: a.extent,
                        generation: a.generation,
                    });
                }
                s.next();
                t.next();
            }
            (Some(a), b) if b.is_none_or(|b| a.extent < b.extent) => {
                steps.push(Step::Copy {
                    extent: a.extent,
                    generation: a.generation,
                });
                s.next();
            }
            (_, Some(b)) => {
                steps.push(Step::Release { extent: b.extent });
                t.next();
            }
            (Some(_), None) => unreachable!("an extent only the source has is copied above"),
        }
    }
}

/// A rebuild's progress, readable while it runs.
#[derive(Debug, Default)]
pub struct RebuildProgress {
    /// Bytes the plan copies.
    pub total_bytes: AtomicU64,
    /// Bytes copied so far.
    pub done_bytes: AtomicU64,
}

impl RebuildProgress {
    /// Seconds left at the rate so far, once there is a rate.
    pub fn eta(&self, elapsed: Duration) -> Option<Duration> {
        let done = self.done_bytes.load(SeqCst);
        let total = self.total_bytes.load(SeqCst);
        if done == 0 || elapsed.is_zero() {
            return None;
        }
        let rate = done as f64 / elapsed.as_secs_f64();
        Some(Duration::from_secs_f64(
            total.saturating_sub(done) as f64 / rate,
        ))
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Extents copied.
    pub copied_extents: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Extents released on the target.
    pub released_extents: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why a rebuild stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// No such child.
    #[error("replica {0} is not a child of this volume")]
    NoChild(String),
    /// The child must be ejected to start a rebuild.
    #[error("replica {0} is {1}, not ejected")]
    NotEjected(String, ChildState),
    /// No healthy child to copy from.
    #[error("no healthy replica to copy from")]
    NoSource,
    /// The nexus was fenced or the target failed and was ejected again.
    #[error("the rebuild was stopped: {0}")]
    Stopped(String),
    /// The target holds fewer bytes than the volume: grow its replica first.
    #[error("replica {id} holds {have} bytes, less than the volume's {need}; grow it first")]
    TooSmall {
        /// The replica.
        id: String,
        /// Its size.
        have: u64,
        /// The volume's size.
        need: u64,
    },
    /// A device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// Make extent `e` of `target` a copy of `source`'s (or release it when `generation` is
    /// `None`), holding the extent against writes. Returns the bytes copied.
    pub(super) async fn copy_extent(
        &self,
        source: Option<&Child<D>>,
        target: &Child<D>,
        e: u64,
        generation: Option<u64>,
    ) -> Result<u64, DeviceError> {
        let (offset, len) = self.extent_range(e);
        if len == 0 {
            return Ok(0);
        }
        let _held = self.lock_extent(e).await;
        // Releasing first makes the copy the extent's only write, so the target records the
        // source's generation exactly (a write keeps the higher of old and new).
        target.dev.discard(offset, len).await?;
        let Some(generation) = generation else {
            return Ok(0);
        };
        let buf = IoBuf::zeroed(len as usize);
        // Holding the extent: read without repairing (a repair would wait for the lock).
        let read = match source {
            Some(c) => c.dev.read(offset, buf).await,
            None => self.read_impl(offset, buf, false).await,
        };
        let data = match read {
            Ok(data) => data,
            // Every copy has a bad block somewhere in the extent: any healthy copy of each
            // block will do.
            Err(BufError { error, .. }) if error.kind == DeviceErrorKind::Checksum => {
                tracing::warn!(volume = %self.name, offset, "a copy's source failed a checksum; copying block by block from the healthy replicas");
                self.read_blockwise(offset, len).await?
            }
            Err(e) => return Err(e.error),
        };
        let flags = WriteFlags {
            fua: false,
            generation,
        };
        target.dev.write(offset, data, flags).await?;
        self.stats.rebuild_bytes.fetch_add(len, SeqCst);
        Ok(len)
    }

    /// Bring ejected child `id` back: copy what it missed since generation `since` (0: it is
    /// new, copy every allocated extent) from the healthy children while I/O goes on, at most
    /// `rate` bytes per second. On success the child is left `Rebuilding` and fully in sync;
    /// the caller records it healthy, then calls [`Nexus::transition`] to `Healthy`. On
    /// failure the child is ejected again.
    ///
    /// # Errors
    /// No such child, it is not ejected, no healthy source, or a device failed.
    pub async fn rebuild(
        &self,
        id: &str,
        since: u64,
        rate: Option<u64>,
        progress: &RebuildProgress,
    ) -> Result<RebuildReport, RebuildError> {
        let start = Instant::now();
        let target = self
            .child(id)
            .ok_or_else(|| RebuildError::NoChild(id.to_owned()))?;
        let plan = {
            // Writes pause while both sides are snapshotted and the target joins the writes,
            // so each later write either is in the snapshot or reaches the target itself.
            let _exclusive = self.gate.write().await;
            let state = target.state();
            if state != ChildState::Ejected {
                return Err(RebuildError::NotEjected(id.to_owned(), state));
            }
            let (have, need) = (target.dev.size(), self.size.load(SeqCst));
            if have < need {
                return Err(RebuildError::TooSmall {
                    id: id.to_owned(),
                    have,
                    need,
                });
            }
            let source = self
                .readers()
                .into_iter()
                .next()
                .ok_or(RebuildError::NoSource)?;
            let theirs = source.dev.generations().await?;
            check_generations(&source.id, &theirs)?;
            let ours = target.dev.generations().await?;
            check_generations(&target.id, &ours)?;
            target.state.send_replace(ChildState::Rebuilding);
            plan_rebuild(&theirs, &ours, since)
        };
        let copies = plan
            .iter()
            .filter(|s| matches!(s, Step::Copy { .. }))
            .count() as u64;
        progress.total_bytes.store(copies * EXTENT, SeqCst);
        progress.done_bytes.store(0, SeqCst);
        tracing::info!(volume = %self.name, replica = id, since, copy_extents = copies, release_extents = plan.len() as u64 - copies, "rebuild started");
        let mut report = RebuildReport::default();
        let result = async {
            for step in &plan {
                if self.is_fenced() || target.state() != ChildState::Rebuilding {
                    return Err(RebuildError::Stopped(format!(
                        "replica {id} left the rebuild (it is {})",
                        target.state()
                    )));
                }
                match *step {
                    Step::Copy { extent, generation } => {
                        let n = self
                            .copy_extent(None, &target, extent, Some(generation))
                            .await?;
                        report.copied_extents += 1;
                        report.copied_bytes += n;
                        progress.done_bytes.fetch_add(EXTENT, SeqCst);
                    }
                    Step::Release { extent } => {
                        self.copy_extent(None, &target, extent, None).await?;
                        report.released_extents += 1;
                    }
                }
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64(report.copied_bytes as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            target.dev.flush().await?;
            Ok(())
        }
        .await;
        report.elapsed = start.elapsed();
        match result {
            Ok(()) => {
                tracing::info!(volume = %self.name, replica = id, copied_bytes = report.copied_bytes, released_extents = report.released_extents, elapsed_ms = report.elapsed.as_millis() as u64, "rebuild copied everything");
                Ok(report)
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, replica = id, error = %e, "rebuild stopped");
                self.transition(id, ChildState::Rebuilding, ChildState::Ejected);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use volume::device::GENERATION_UNKNOWN;

    use super::*;

    fn gens(v: &[(u64, u64)]) -> Generations {
        Generations {
            extent_size: EXTENT,
            extents: v
                .iter()
                .map(|&(extent, generation)| volume::device::ExtentGeneration {
                    extent,
                    generation,
                })
                .collect(),
        }
    }

    #[test]
    fn a_plan_copies_what_changed_on_either_side_since_the_ejection() {
        let source = gens(&[(0, 5), (1, 12), (2, 3), (4, 20), (6, GENERATION_UNKNOWN)]);
        let target = gens(&[
            (0, 5),
            (1, 9),
            (2, 11),
            (3, 4),
            (6, 2),
            (7, GENERATION_UNKNOWN),
        ]);
        assert_eq!(
            plan_rebuild(&source, &target, 10),
            vec![
                Step::Copy {
                    extent: 1,
                    generation: 12
                },
                Step::Copy {
                    extent: 2,
                    generation: 3
                },
                Step::Release { extent: 3 },
                Step::Copy {
                    extent: 4,
                    generation: 20
                },
                Step::Copy {
                    extent: 6,
                    generation: GENERATION_UNKNOWN
                },
                Step::Release { extent: 7 },
            ]
        );
    }

    #[test]
    fn a_new_replica_copies_every_allocated_extent_and_nothing_else() {
        let source = gens(&[(1, 1), (5, 2)]);
        assert_eq!(
            plan_rebuild(&source, &Generations::default(), 0),
            vec![
                Step::Copy {
                    extent: 1,
                    generation: 1
                },
                Step::Copy {
                    extent: 5,
                    generation: 2
                },
            ]
        );
        assert!(plan_rebuild(&source, &source, 2).is_empty());
    }
}
