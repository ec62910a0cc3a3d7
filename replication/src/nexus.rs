//! The nexus: one volume's replicated [`BlockDevice`] over N children.
//!
//! The nexus runs on the node where the volume is attached. Its children are the volume's
//! replicas, local ([`volume::pool::Replica`]) or remote (`crate::remote::RemoteReplica`),
//! behind one device type `D` chosen by the caller.
//!
//! Rules (architecture, section 4):
//! - A **write** (and discard, write-zeroes) goes to every child that is healthy or being
//!   rebuilt, in parallel, and is acknowledged when all of them have it.
//! - A child that fails a write with an error of its own (I/O, timeout, closed) is
//!   **ejected**, and the ejection is committed through the [`Ejector`] (a compare-and-swap in
//!   the cluster store) *before* the write is acknowledged. While at least one child took the
//!   write, the caller sees success. A write whose snapshot skipped a child that is being
//!   ejected waits for that commit too, and fails if the commit failed.
//! - Errors that every child would give alike (unaligned, out of range) are the caller's and
//!   eject nobody. A [`DeviceErrorKind::Fenced`] answer means a newer attachment owns the
//!   volume: the nexus fails that request and every later one, and ejects nobody.
//! - A **read** goes to the local healthy child if there is one, otherwise to a healthy remote
//!   one. A checksum failure is answered from another healthy child and the bad copy is
//!   rewritten (repaired) from the good data; an I/O failure ejects the child and the read is
//!   retried elsewhere.
//! - **Flush** goes to every child that takes writes; children that fail it are ejected.
//!
//! The outcome of a fan-out is decided by [`decide`], a pure function, so the rules are
//! tested without I/O. No lock is held across I/O: requests take a snapshot of the children.
//!
//! **Generations.** Every write, discard and write-zeroes gets the next volume-wide
//! generation; writes carry it to the replicas, which record it as the generation of every
//! extent the write touches. An ejection records `since`: every request numbered up to
//! `since` had completed on the ejected child (it is the lowest generation still in flight,
//! minus one). A returning replica then needs exactly the extents that changed after `since`
//! on either side ([`plan_rebuild`]).
//!
//! **Rebuild** ([`Nexus::rebuild`]): writes are paused for the moment it takes to snapshot the
//! generations of a healthy child and of the target and to make the target `Rebuilding`
//! (from then on it takes every write). The planned extents are then copied one at a time. A
//! copy holds its extent exclusively: it waits for writes in flight on the extent to finish,
//! and writes that arrive meanwhile wait for the copy, so a copy never overwrites newer data.
//! [`Nexus::reconcile`] makes the healthy children agree where a writer that died mid-write
//! left them different, before the first I/O of a new attachment.
//!
//! **Size.** Requests beyond the nexus's size are refused, whatever the children hold.
//! [`Nexus::grow`] makes the volume bigger online: with writes paused, every child that takes
//! writes must show the new size (it learns it through [`Resizable::refresh_size`] once its
//! replica was grown where it lives); a child that cannot is ejected first, so no write can
//! reach a replica too small for it. A rebuild refuses a target smaller than the volume.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{watch, Notify};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
    GENERATION_UNKNOWN,
};
use volume::io::IoBuf;
use volume::pool::format::EXTENT;

/// A child's role in the nexus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildState {
    /// In sync: takes writes and serves reads.
    Healthy,
    /// Being rebuilt: takes writes, serves no reads.
    Rebuilding,
    /// Failed; its ejection is being committed. Takes nothing.
    Ejecting,
    /// Ejected (committed). Takes nothing until rebuilt.
    Ejected,
}

impl ChildState {
    /// Whether the child receives writes.
    pub fn writable(self) -> bool {
        matches!(self, ChildState::Healthy | ChildState::Rebuilding)
    }

    /// The lower-case name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Healthy => "healthy",
            ChildState::Rebuilding => "rebuilding",
            ChildState::Ejecting => "ejecting",
            ChildState::Ejected => "ejected",
        }
    }
}

impl fmt::Display for ChildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A child device whose replica can be grown where it lives (on its own node): the device
/// learns the new size through [`Resizable::refresh_size`], which [`Nexus::grow`] calls.
pub trait Resizable: BlockDevice {
    /// Learn the device's current size (a remote replica asks its server) and return it.
    fn refresh_size(&self) -> impl Future<Output = Result<u64, DeviceError>> + Send;
}

impl Resizable for volume::pool::Replica {
    fn refresh_size(&self) -> impl Future<Output = Result<u64, DeviceError>> + Send {
        // A local replica's size is read from its pool at every call.
        std::future::ready(Ok(self.size()))
    }
}

/// A future returned by an [`Ejector`].
pub type EjectFuture<'a> = Pin<Box<dyn Future<Output = Result<(), api::ControlError>> + Send + 'a>>;

/// Commits an ejection durably (in the cluster store) before writes that skipped the child
/// are acknowledged.
pub trait Ejector: Send + Sync + 'static {
    /// Record that `child` no longer receives writes, and that it has every request up to
    /// generation `since` (its rebuild starts there). An `Err` says why it could not be
    /// recorded (with its sources); the writes that depended on it then fail.
    fn eject<'a>(&'a self, child: &'a str, reason: &'a str, since: u64) -> EjectFuture<'a>;
}

/// An [`Ejector`] for tests and single-node use: nothing to commit.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStore;

impl Ejector for NoStore {
    fn eject<'a>(&'a self, _child: &'a str, _reason: &'a str, _since: u64) -> EjectFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// A child as given to [`Nexus::new`].
#[derive(Debug, Clone)]
pub struct ChildSpec<D> {
    /// A stable id: the node (and disk) holding the replica.
    pub id: String,
    /// The device.
    pub dev: D,
    /// Whether the replica is on this node (preferred for reads).
    pub local: bool,
    /// Its starting state.
    pub state: ChildState,
}

#[derive(Debug)]
struct Child<D> {
    id: String,
    dev: D,
    local: bool,
    state: watch::Sender<ChildState>,
}

impl<D> Child<D> {
    fn state(&self) -> ChildState {
        *self.state.borrow()
    }
}

/// How one child's answer counts in a fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It has the data.
    Ok,
    /// An error every child would give (the request is bad).
    Caller,
    /// A newer attachment owns the volume.
    Fenced,
    /// The child failed on its own.
    Failed,
}

impl Answer {
    /// Classify a device error.
    pub fn of(e: &DeviceError) -> Self {
        match e.kind {
            DeviceErrorKind::Unaligned | DeviceErrorKind::OutOfRange => Answer::Caller,
            DeviceErrorKind::Fenced => Answer::Fenced,
            _ => Answer::Failed,
        }
    }
}

/// What to do after a fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Acknowledge, after committing the ejection of these children (indexes).
    Ack { eject: Vec<usize> },
    /// Fail with the error of this child (index); eject nobody.
    Fail { from: usize },
    /// The volume was taken over: fail this and every later request.
    Fenced { from: usize },
}

/// The pure rule of a fan-out: `answers[i]` is child `i`'s.
pub fn decide(answers: &[Answer]) -> Decision {
    if let Some(i) = answers.iter().position(|a| *a == Answer::Fenced) {
        return Decision::Fenced { from: i };
    }
    if let Some(i) = answers.iter().position(|a| *a == Answer::Caller) {
        return Decision::Fail { from: i };
    }
    let failed: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i] == Answer::Failed)
        .collect();
    if failed.len() == answers.len() {
        // Nobody took it: keep every child (ejecting all would lose the volume).
        return Decision::Fail {
            from: failed.first().copied().unwrap_or(0),
        };
    }
    Decision::Ack { eject: failed }
}

/// Counters of one nexus.
#[derive(Debug, Default)]
pub struct NexusStats {
    /// Reads answered by another child after a checksum failure.
    pub repairs: AtomicU64,
    /// Children ejected.
    pub ejections: AtomicU64,
    /// Bytes copied by rebuilds and reconciliation.
    pub rebuild_bytes: AtomicU64,
    /// Extents made equal by [`Nexus::reconcile`].
    pub reconciled_extents: AtomicU64,
}

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

/// Generations of the requests in flight.
#[derive(Debug, Default)]
struct Sequencer {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// "No extent is being copied."
const NO_COPY: u64 = u64::MAX;

/// One volume's replicated device.
pub struct Nexus<D> {
    name: String,
    /// Only grows ([`Nexus::grow`]), while no changing request is admitted.
    size: AtomicU64,
    children: RwLock<Vec<Arc<Child<D>>>>,
    ejector: Arc<dyn Ejector>,
    fenced: AtomicBool,
    stats: NexusStats,
    seq: Mutex<Sequencer>,
    /// Writes in flight per extent, so a copy can wait for them. Only grows, with the size;
    /// the lock is never held across an await.
    extent_writes: RwLock<Vec<AtomicU32>>,
    /// The extent a rebuild is copying, or [`NO_COPY`].
    copying: AtomicU64,
    copy_done: Notify,
    /// Taken shared by every changing request, exclusively while a rebuild snapshots.
    gate: tokio::sync::RwLock<()>,
}

/// A changing request's registration: its generation and its extents; released on drop.
struct Admitted<'a, D> {
    nexus: &'a Nexus<D>,
    generation: u64,
    extents: std::ops::Range<u64>,
}

impl<D> Drop for Admitted<'_, D> {
    fn drop(&mut self) {
        self.nexus.count_writes(self.extents.clone(), false);
        self.nexus
            .seq
            .lock()
            .expect("sequencer lock")
            .in_flight
            .remove(&self.generation);
    }
}

/// A copy's hold on one extent; released (and waiting writes woken) on drop.
struct ExtentLock<'a, D> {
    nexus: &'a Nexus<D>,
}

impl<D> Drop for ExtentLock<'_, D> {
    fn drop(&mut self) {
        self.nexus.copying.store(NO_COPY, SeqCst);
        self.nexus.copy_done.notify_waiters();
    }
}

impl<D> fmt::Debug for Nexus<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let children: Vec<(String, ChildState)> = self
            .children
            .read()
            .map(|c| c.iter().map(|c| (c.id.clone(), c.state())).collect())
            .unwrap_or_default();
        f.debug_struct("Nexus")
            .field("name", &self.name)
            .field("size", &self.size.load(SeqCst))
            .field("children", &children)
            .finish_non_exhaustive()
    }
}

fn fenced_error(op: &'static str, offset: u64, len: u64) -> DeviceError {
    DeviceError::new(
        DeviceErrorKind::Fenced,
        op,
        offset,
        len,
        "the volume was attached on another node with a newer epoch; this attachment is fenced",
    )
}

impl<D> Nexus<D> {
    /// Add one (`up`) or remove one write in flight on each extent of `extents`.
    fn count_writes(&self, extents: std::ops::Range<u64>, up: bool) {
        let counts = self.extent_writes.read().expect("extent counters lock");
        for e in extents {
            if let Some(c) = counts.get(e as usize) {
                if up {
                    c.fetch_add(1, SeqCst);
                } else {
                    c.fetch_sub(1, SeqCst);
                }
            }
        }
    }

    /// Writes in flight on extent `e`.
    fn writes_on(&self, e: u64) -> u32 {
        self.extent_writes
            .read()
            .expect("extent counters lock")
            .get(e as usize)
            .map_or(0, |c| c.load(SeqCst))
    }

    /// How many extents the volume has.
    fn extent_count(&self) -> u64 {
        self.extent_writes
            .read()
            .expect("extent counters lock")
            .len() as u64
    }
}

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// A nexus named `name` over `children`; its size is the smallest child's.
    ///
    /// # Panics
    /// If `children` is empty.
    pub fn new(name: &str, children: Vec<ChildSpec<D>>, ejector: Arc<dyn Ejector>) -> Self {
        let size = children.iter().map(|c| c.dev.size()).min().unwrap_or(0);
        Self::with_size(name, children, ejector, size)
    }

    /// A nexus named `name` of `size` bytes over `children`, each of which must hold at
    /// least `size` bytes (a child may be bigger: a resize grew it and stopped before the
    /// volume's size was recorded). Requests beyond `size` are refused.
    ///
    /// # Panics
    /// If `children` is empty.
    pub fn with_size(
        name: &str,
        children: Vec<ChildSpec<D>>,
        ejector: Arc<dyn Ejector>,
        size: u64,
    ) -> Self {
        assert!(!children.is_empty(), "a nexus needs at least one child");
        let children = children
            .into_iter()
            .map(|c| {
                Arc::new(Child {
                    id: c.id,
                    dev: c.dev,
                    local: c.local,
                    state: watch::Sender::new(c.state),
                })
            })
            .collect();
        Self {
            name: name.to_owned(),
            size: AtomicU64::new(size),
            children: RwLock::new(children),
            ejector,
            fenced: AtomicBool::new(false),
            stats: NexusStats::default(),
            seq: Mutex::new(Sequencer {
                next: 1,
                in_flight: BTreeSet::new(),
            }),
            extent_writes: RwLock::new(
                (0..size.div_ceil(EXTENT))
                    .map(|_| AtomicU32::new(0))
                    .collect(),
            ),
            copying: AtomicU64::new(NO_COPY),
            copy_done: Notify::new(),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    /// The generation the next write gets.
    pub fn next_generation(&self) -> u64 {
        self.seq.lock().expect("sequencer lock").next
    }

    /// Every request up to this generation has completed.
    fn completed_through(&self) -> u64 {
        let s = self.seq.lock().expect("sequencer lock");
        s.in_flight.first().copied().unwrap_or(s.next) - 1
    }

    /// Register a changing request on `offset..offset + len`: wait while a copy holds one of
    /// its extents, then take the next generation.
    async fn admit(&self, offset: u64, len: u64) -> Admitted<'_, D> {
        let first = offset / EXTENT;
        let end = offset
            .saturating_add(len.max(1))
            .div_ceil(EXTENT)
            .min(self.extent_count())
            .max(first);
        loop {
            let notified = self.copy_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.count_writes(first..end, true);
            let copying = self.copying.load(SeqCst);
            if !(first..end).contains(&copying) {
                break;
            }
            self.count_writes(first..end, false);
            notified.await;
        }
        let mut s = self.seq.lock().expect("sequencer lock");
        let generation = s.next;
        s.next += 1;
        s.in_flight.insert(generation);
        Admitted {
            nexus: self,
            generation,
            extents: first..end,
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each child's id and state.
    pub fn children(&self) -> Vec<(String, ChildState)> {
        self.snapshot()
            .iter()
            .map(|c| (c.id.clone(), c.state()))
            .collect()
    }

    /// The nexus's counters.
    pub fn stats(&self) -> &NexusStats {
        &self.stats
    }

    /// Whether a newer attachment has fenced this one.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(SeqCst)
    }

    /// Stop all I/O: this node can no longer prove it holds the attachment (its lease
    /// lapsed), so another node may already be writing.
    pub fn fence(&self) {
        if !self.fenced.swap(true, SeqCst) {
            tracing::error!(volume = %self.name, "attachment fenced: every further request fails");
        }
    }

    /// Set a child's state (rebuild start and end). Unknown ids are ignored.
    pub fn set_state(&self, id: &str, state: ChildState) {
        if let Some(c) = self.snapshot().iter().find(|c| c.id == id) {
            c.state.send_replace(state);
        }
    }

    /// Add a child (a replica being rebuilt) or replace the device of an existing one.
    pub fn upsert_child(&self, spec: ChildSpec<D>) {
        let mut children = self.children.write().expect("nexus children lock");
        let child = Arc::new(Child {
            id: spec.id,
            dev: spec.dev,
            local: spec.local,
            state: watch::Sender::new(spec.state),
        });
        match children.iter_mut().find(|c| c.id == child.id) {
            Some(slot) => *slot = child,
            None => children.push(child),
        }
    }

    fn snapshot(&self) -> Vec<Arc<Child<D>>> {
        self.children.read().expect("nexus children lock").clone()
    }

    fn check_fence(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.is_fenced() {
            return Err(fenced_error(op, offset, len));
        }
        Ok(())
    }

    /// Refuse a request that ends beyond the volume (children may be bigger than it).
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        DeviceError::check_range(op, offset, len, self.size.load(SeqCst))
    }

    /// Grow the volume to `new_size` bytes while it serves I/O; returns the size now (a
    /// smaller or equal `new_size` changes nothing). The caller grows every replica where it
    /// lives first. Changing requests pause while every child that takes writes learns its
    /// size ([`Resizable::refresh_size`]); a child that cannot show `new_size` (its replica
    /// was not grown, or it does not answer) is ejected, through the [`Ejector`], before the
    /// size changes, so no write beyond the old end can reach it.
    ///
    /// # Errors
    /// The nexus is fenced, no child shows `new_size` (nothing changes then), or an ejection
    /// cannot be recorded (the size does not change either).
    pub async fn grow(&self, new_size: u64) -> Result<u64, DeviceError>
    where
        D: Resizable,
    {
        let _exclusive = self.gate.write().await;
        let have = self.size.load(SeqCst);
        if new_size <= have {
            return Ok(have);
        }
        let more = new_size - have;
        self.check_fence("grow", have, more)?;
        let targets: Vec<Arc<Child<D>>> = self
            .snapshot()
            .into_iter()
            .filter(|c| c.state().writable())
            .collect();
        let sizes = join_all(targets.iter().map(|c| c.dev.refresh_size())).await;
        let mut fits = 0;
        let mut short = Vec::new();
        for (c, size) in targets.iter().zip(sizes) {
            match size {
                Ok(s) if s >= new_size => fits += 1,
                Ok(s) => short.push((
                    c,
                    format!("it holds {s} bytes, not the {new_size} the volume grows to"),
                )),
                Err(e) if Answer::of(&e) == Answer::Fenced => {
                    self.fence();
                    return Err(e);
                }
                Err(e) => short.push((c, format!("it cannot report its size: {e}"))),
            }
        }
        if fits == 0 {
            let why = short
                .iter()
                .map(|(c, why)| format!("replica {}: {why}", c.id))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(DeviceError::new(
                DeviceErrorKind::NoSpace,
                "grow",
                have,
                more,
                format!(
                    "no replica of volume {} shows {new_size} bytes; grow the replicas first ({why})",
                    self.name
                ),
            ));
        }
        for (c, why) in short {
            if !self.eject(c, &format!("cannot grow: {why}")).await {
                return Err(DeviceError::new(
                    DeviceErrorKind::Io,
                    "grow",
                    have,
                    more,
                    format!(
                        "replica {} cannot grow ({why}) and its ejection could not be recorded",
                        c.id
                    ),
                ));
            }
        }
        {
            let mut counts = self.extent_writes.write().expect("extent counters lock");
            let extents = (new_size.div_ceil(EXTENT) as usize).max(counts.len());
            counts.resize_with(extents, || AtomicU32::new(0));
        }
        self.size.store(new_size, SeqCst);
        tracing::info!(volume = %self.name, from = have, to = new_size, "the volume grew");
        Ok(new_size)
    }

    /// Commit the ejection of `child` (once; concurrent callers wait for the same outcome).
    /// Returns whether the child is ejected now.
    async fn eject(&self, child: &Child<D>, reason: &str) -> bool {
        let mut won = false;
        child.state.send_if_modified(|s| {
            if s.writable() {
                *s = ChildState::Ejecting;
                won = true;
            }
            won
        });
        if won {
            tracing::warn!(volume = %self.name, replica = %child.id, reason, "ejecting a replica");
            let since = self.completed_through();
            match self.ejector.eject(&child.id, reason, since).await {
                Ok(()) => {
                    self.stats.ejections.fetch_add(1, SeqCst);
                    child.state.send_replace(ChildState::Ejected);
                }
                Err(e) => {
                    tracing::error!(volume = %self.name, replica = %child.id, error = %e.full_message(), "cannot record the ejection; writes that skipped the replica fail");
                    child.state.send_replace(ChildState::Healthy);
                }
            }
        }
        Self::settled(child).await
    }

    /// Wait until `child` is not `Ejecting`; whether it ended up ejected.
    async fn settled(child: &Child<D>) -> bool {
        let mut rx = child.state.subscribe();
        let state = rx
            .wait_for(|s| *s != ChildState::Ejecting)
            .await
            .map_or(ChildState::Ejecting, |s| *s);
        state == ChildState::Ejected
    }

    /// Run `op` on every writable child, decide, eject, and settle ejections that the
    /// snapshot skipped. Returns the first child's result value on success.
    async fn fan_out<T, F, Fut>(
        &self,
        what: (&'static str, u64, u64),
        op: F,
    ) -> Result<Option<T>, DeviceError>
    where
        F: Fn(D) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, DeviceError>> + Send,
        T: Send,
    {
        let (name, offset, len) = what;
        self.check_fence(name, offset, len)?;
        let all = self.snapshot();
        let skipped: Vec<Arc<Child<D>>> = all
            .iter()
            .filter(|c| c.state() == ChildState::Ejecting)
            .cloned()
            .collect();
        let targets: Vec<Arc<Child<D>>> = all
            .iter()
            .filter(|c| c.state().writable())
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(DeviceError::new(
                DeviceErrorKind::Io,
                name,
                offset,
                len,
                format!("volume {} has no replica that can take writes", self.name),
            ));
        }
        let results = join_all(targets.iter().map(|c| op(c.dev.clone()))).await;
        let answers: Vec<Answer> = results
            .iter()
            .map(|r| r.as_ref().map_or_else(Answer::of, |_| Answer::Ok))
            .collect();
        let mut results: Vec<Option<Result<T, DeviceError>>> =
            results.into_iter().map(Some).collect();
        let take_err =
            |results: &mut Vec<Option<Result<T, DeviceError>>>, i: usize| match results[i].take() {
                Some(Err(e)) => e,
                _ => DeviceError::new(DeviceErrorKind::Io, name, offset, len, "replica failed"),
            };
        match decide(&answers) {
            Decision::Fenced { from } => {
                self.fenced.store(true, SeqCst);
                tracing::error!(volume = %self.name, "a replica reports a newer attachment; this attachment stops all I/O");
                Err(take_err(&mut results, from))
            }
            Decision::Fail { from } => Err(take_err(&mut results, from)),
            Decision::Ack { eject } => {
                for i in eject {
                    let e = take_err(&mut results, i);
                    if !self.eject(&targets[i], &e.to_string()).await {
                        return Err(DeviceError::new(
                            DeviceErrorKind::Io,
                            name,
                            offset,
                            len,
                            format!(
                                "replica {} failed ({e}) and its ejection could not be recorded",
                                targets[i].id
                            ),
                        ));
                    }
                }
                for c in &skipped {
                    if !Self::settled(c).await {
                        return Err(DeviceError::new(
                            DeviceErrorKind::Io,
                            name,
                            offset,
                            len,
                            format!(
                                "replica {} missed this write and its ejection could not be recorded",
                                c.id
                            ),
                        ));
                    }
                }
                Ok(results.into_iter().flatten().find_map(Result::ok))
            }
        }
    }

    /// Move child `id` from state `from` to `to`; whether it was in `from`.
    pub fn transition(&self, id: &str, from: ChildState, to: ChildState) -> bool {
        self.snapshot()
            .iter()
            .find(|c| c.id == id)
            .is_some_and(|c| {
                c.state.send_if_modified(|s| {
                    let hit = *s == from;
                    if hit {
                        *s = to;
                    }
                    hit
                })
            })
    }

    /// Eject child `id` now (for example, its node is known to be gone); whether it is
    /// ejected. A child that takes no writes is left alone.
    pub async fn eject_child(&self, id: &str, reason: &str) -> bool {
        match self.child(id) {
            Some(c) if c.state().writable() => self.eject(&c, reason).await,
            _ => false,
        }
    }

    fn child(&self, id: &str) -> Option<Arc<Child<D>>> {
        self.snapshot().into_iter().find(|c| c.id == id)
    }

    /// Hold extent `e` exclusively: wait until no write is in flight on it; writes arriving
    /// meanwhile wait in [`Nexus::admit`] until the guard drops.
    async fn lock_extent(&self, e: u64) -> ExtentLock<'_, D> {
        self.copying.store(e, SeqCst);
        while self.writes_on(e) != 0 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        ExtentLock { nexus: self }
    }

    /// The byte range of extent `e`, clipped to the volume.
    fn extent_range(&self, e: u64) -> (u64, u64) {
        let offset = e * EXTENT;
        (
            offset,
            EXTENT.min(self.size.load(SeqCst).saturating_sub(offset)),
        )
    }

    /// Make extent `e` of `target` a copy of `source`'s (or release it when `generation` is
    /// `None`), holding the extent against writes. Returns the bytes copied.
    async fn copy_extent(
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
        let data = match source {
            Some(c) => c.dev.read(offset, buf).await?,
            None => self.read_impl(offset, buf).await?,
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
            let ours = target.dev.generations().await?;
            for g in [&theirs, &ours] {
                if g.extent_size != EXTENT {
                    return Err(RebuildError::Stopped(format!(
                        "a replica uses {} byte extents, not {EXTENT}",
                        g.extent_size
                    )));
                }
            }
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

    /// Make the healthy children agree on every extent and set the next generation above
    /// every one they hold. Run before the first I/O of an attachment: a writer that died
    /// mid-write can leave an unacknowledged write on some children and not others, and crash
    /// recovery leaves extents whose generation is unknown. For each extent that differs, the
    /// child with the newest known generation is copied to the others.
    ///
    /// # Errors
    /// A child failed; the caller should not serve the volume.
    pub async fn reconcile(&self) -> Result<u64, DeviceError> {
        let children = self.readers();
        let mut maps = Vec::with_capacity(children.len());
        for c in &children {
            maps.push(c.dev.generations().await?);
        }
        let top = maps
            .iter()
            .flat_map(|m| m.extents.iter().map(|e| e.generation))
            .filter(|&g| g != GENERATION_UNKNOWN)
            .max()
            .unwrap_or(0);
        {
            let mut s = self.seq.lock().expect("sequencer lock");
            s.next = s.next.max(top + 1);
        }
        if children.len() < 2 {
            return Ok(0);
        }
        let mut extents: Vec<u64> = maps
            .iter()
            .flat_map(|m| m.extents.iter().map(|e| e.extent))
            .collect();
        extents.sort_unstable();
        extents.dedup();
        let lookup = |m: &Generations, e: u64| {
            m.extents
                .binary_search_by_key(&e, |x| x.extent)
                .ok()
                .map(|i| m.extents[i].generation)
        };
        let mut fixed = 0;
        for e in extents {
            let gens: Vec<Option<u64>> = maps.iter().map(|m| lookup(m, e)).collect();
            let agree = gens.iter().all(|g| *g == gens[0]) && gens[0] != Some(GENERATION_UNKNOWN);
            if agree {
                continue;
            }
            // Allocated beats released, a known generation beats an unknown one, newer
            // beats older; the local child (first) wins ties.
            let rank = |g: Option<u64>| match g {
                None => (0, 0),
                Some(GENERATION_UNKNOWN) => (1, 0),
                Some(g) => (2, g),
            };
            let best = (0..gens.len())
                .rev()
                .max_by_key(|&i| rank(gens[i]))
                .unwrap_or(0);
            for (i, c) in children.iter().enumerate() {
                if i != best && (gens[i] != gens[best] || gens[i] == Some(GENERATION_UNKNOWN)) {
                    self.copy_extent(Some(&children[best]), c, e, gens[best])
                        .await?;
                }
            }
            fixed += 1;
        }
        if fixed > 0 {
            self.stats.reconciled_extents.fetch_add(fixed, SeqCst);
            tracing::warn!(volume = %self.name, extents = fixed, "reconciled extents where replicas differed");
        }
        Ok(fixed)
    }

    /// The healthy children in read preference order: local first.
    fn readers(&self) -> Vec<Arc<Child<D>>> {
        let mut v: Vec<_> = self
            .snapshot()
            .into_iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .collect();
        v.sort_by_key(|c| !c.local);
        v
    }

    async fn read_impl(&self, offset: u64, mut buf: IoBuf) -> BufResult {
        let len = buf.len() as u64;
        if let Err(error) = self
            .check_fence("read", offset, len)
            .and_then(|()| self.check_range("read", offset, len))
        {
            return Err(BufError { error, buf });
        }
        let mut bad: Vec<Arc<Child<D>>> = Vec::new();
        let mut last: Option<DeviceError> = None;
        for child in self.readers() {
            match child.dev.read(offset, buf).await {
                Ok(good) => {
                    self.repair(&bad, offset, &good).await;
                    return Ok(good);
                }
                Err(BufError { error, buf: b }) => {
                    buf = b;
                    match Answer::of(&error) {
                        Answer::Caller => return Err(BufError { error, buf }),
                        Answer::Fenced => {
                            self.fenced.store(true, SeqCst);
                            return Err(BufError { error, buf });
                        }
                        Answer::Failed if error.kind == DeviceErrorKind::Checksum => {
                            bad.push(child.clone());
                        }
                        Answer::Failed | Answer::Ok => {
                            let reason = error.to_string();
                            if !self.eject(&child, &reason).await {
                                return Err(BufError { error, buf });
                            }
                        }
                    }
                    last = Some(error);
                }
            }
        }
        let error = last.unwrap_or_else(|| {
            DeviceError::new(
                DeviceErrorKind::Io,
                "read",
                offset,
                len,
                format!("volume {} has no healthy replica to read from", self.name),
            )
        });
        Err(BufError { error, buf })
    }

    /// Rewrite `good` onto children whose copy failed its checksum; eject those that cannot
    /// take it.
    async fn repair(&self, bad: &[Arc<Child<D>>], offset: u64, good: &IoBuf) {
        for child in bad {
            match child
                .dev
                .write(
                    offset,
                    IoBuf::from_slice(good),
                    WriteFlags {
                        fua: true,
                        ..WriteFlags::default()
                    },
                )
                .await
            {
                Ok(_) => {
                    self.stats.repairs.fetch_add(1, SeqCst);
                    tracing::warn!(volume = %self.name, replica = %child.id, offset, len = good.len(), "repaired a block that failed its checksum");
                }
                Err(e) => {
                    self.eject(child, &format!("repair failed: {}", e.error))
                        .await;
                }
            }
        }
    }
}

impl<D: BlockDevice + Clone + Send + Sync + 'static> BlockDevice for Nexus<D> {
    fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        self.read_impl(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let len = buf.len() as u64;
        let _gate = self.gate.read().await;
        if let Err(error) = self.check_range("write", offset, len) {
            return Err(BufError { error, buf });
        }
        let admitted = self.admit(offset, len).await;
        let flags = WriteFlags {
            generation: admitted.generation,
            ..flags
        };
        let data = &buf;
        let r = self
            .fan_out(("write", offset, len), |dev: D| {
                let copy = IoBuf::from_slice(data);
                async move {
                    dev.write(offset, copy, flags)
                        .await
                        .map(drop)
                        .map_err(|e| e.error)
                }
            })
            .await;
        match r {
            Ok(_) => Ok(buf),
            Err(error) => Err(BufError { error, buf }),
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.fan_out(("flush", 0, 0), |dev: D| async move { dev.flush().await })
            .await
            .map(drop)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _gate = self.gate.read().await;
        self.check_range("discard", offset, len)?;
        let _admitted = self.admit(offset, len).await;
        self.fan_out(("discard", offset, len), |dev: D| async move {
            dev.discard(offset, len).await
        })
        .await
        .map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _gate = self.gate.read().await;
        self.check_range("write_zeroes", offset, len)?;
        let _admitted = self.admit(offset, len).await;
        self.fan_out(("write_zeroes", offset, len), |dev: D| async move {
            dev.write_zeroes(offset, len).await
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Answer::{Caller, Failed, Fenced, Ok as Good};

    #[test]
    fn all_good_acks_without_ejection() {
        assert_eq!(decide(&[Good, Good, Good]), Decision::Ack { eject: vec![] });
    }

    #[test]
    fn failed_children_are_ejected_while_one_took_the_write() {
        assert_eq!(
            decide(&[Good, Failed, Failed]),
            Decision::Ack { eject: vec![1, 2] }
        );
        assert_eq!(decide(&[Failed, Good]), Decision::Ack { eject: vec![0] });
    }

    #[test]
    fn nobody_is_ejected_when_every_child_failed() {
        assert_eq!(decide(&[Failed, Failed]), Decision::Fail { from: 0 });
    }

    #[test]
    fn caller_errors_eject_nobody() {
        assert_eq!(decide(&[Good, Caller, Failed]), Decision::Fail { from: 1 });
    }

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

    #[test]
    fn fencing_wins_over_everything() {
        assert_eq!(
            decide(&[Failed, Caller, Fenced]),
            Decision::Fenced { from: 2 }
        );
    }
}
