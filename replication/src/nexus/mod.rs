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
//!   one. A checksum failure is answered from another healthy child, and the bad copy is
//!   repaired block by block: holding the extent exclusively (as a rebuild's copy does, so no
//!   write is in flight on it), each block still failing its checksum on the bad child is
//!   read again from a healthy child and written with a new generation. So a repair never
//!   puts back data older than a write acknowledged meanwhile. An I/O failure ejects the
//!   child and the read is retried elsewhere.
//! - **Flush** goes to every child that takes writes; children that fail it are ejected.
//!
//! The outcome of a fan-out is decided by [`decide`], a pure function, so the rules are
//! tested without I/O. No lock is held across I/O: requests take a snapshot of the children.
//!
//! **Generations.** Every write, discard and write-zeroes gets the next volume-wide
//! generation; writes carry it to the replicas, which record it as the generation of every
//! extent the write touches. An ejection records `since`: every request numbered up to
//! `since` is *durable* on the ejected child (it had completed before a flush the child
//! completed; completed but unflushed writes can be lost if the child then loses power, so
//! they are not counted). A returning replica then needs exactly the extents that changed after `since`
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
//!
//! The code is split by concern: [`rules`] (the pure decision of a fan-out), `admission`
//! (generations, the write gate and per-extent write counts and locks), `fanout` (sending a
//! request to the children and committing ejections), [`rebuild`] (planning and copying),
//! `reconcile` (making healthy children agree at attach), `read` (reads and read-repair) and
//! `grow` (online growth).

mod admission;
mod fanout;
mod grow;
mod read;
pub mod rebuild;
mod reconcile;
pub mod rules;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{watch, Notify};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
    GENERATION_UNKNOWN,
};
use volume::io::IoBuf;
use volume::pool::format::EXTENT;

pub use rebuild::{plan_rebuild, RebuildError, RebuildProgress, RebuildReport, Step};
pub use rules::{decide, Answer, Decision};

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
    /// Missed a write, but its ejection could not be recorded: takes nothing and serves no
    /// reads (its copy is stale), and every later write fails until the ejection is recorded
    /// (each one tries again). The record still calls it healthy, so acknowledging a write
    /// without it would let a later attachment read the stale copy.
    Unrecorded,
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
            ChildState::Unrecorded => "unrecorded",
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
    /// Every request up to this generation is durable on the child: it completed before a
    /// flush the child completed. An ejection records this as the point its rebuild starts
    /// from (0 until its first flush: a full rebuild).
    flushed: AtomicU64,
}

impl<D> Child<D> {
    fn state(&self) -> ChildState {
        *self.state.borrow()
    }
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

/// Generations of the requests in flight.
#[derive(Debug, Default)]
struct Sequencer {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// "No extent is being copied."
const NO_COPY: u64 = u64::MAX;

/// [`Nexus::confirm_until`] never set: the attachment needs no confirmation.
const UNLIMITED: u64 = u64::MAX;

/// The origin of the confirmation deadlines (the first call, early in the process).
fn clock_base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

fn millis_since_base(at: std::time::Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock_base()).as_millis()).unwrap_or(UNLIMITED - 1)
}

/// One volume's replicated device.
pub struct Nexus<D> {
    name: String,
    /// Only grows ([`Nexus::grow`]), while no changing request is admitted.
    size: AtomicU64,
    children: RwLock<Vec<Arc<Child<D>>>>,
    ejector: Arc<dyn Ejector>,
    fenced: AtomicBool,
    /// Until when this attachment is known to be the volume's only one, in ms after
    /// [`clock_base`] ([`UNLIMITED`]: always, e.g. standalone). Past it every request fences
    /// the nexus: another node may have taken the volume over and written since, so even a
    /// read from this node's replica could be stale. See [`Nexus::confirm_until`].
    confirmed_until: AtomicU64,
    stats: NexusStats,
    seq: Mutex<Sequencer>,
    /// Writes in flight per extent, so a copy can wait for them. Only grows, with the size;
    /// the lock is never held across an await.
    extent_writes: RwLock<Vec<AtomicU32>>,
    /// The extent held exclusively (a rebuild's copy or a read-repair), or [`NO_COPY`].
    copying: AtomicU64,
    copy_done: Notify,
    /// One exclusive extent at a time: held by the holder of `copying`.
    extent_lock: tokio::sync::Mutex<()>,
    /// Taken shared by every changing request, exclusively while a rebuild snapshots.
    gate: tokio::sync::RwLock<()>,
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
                    flushed: AtomicU64::new(0),
                })
            })
            .collect();
        Self {
            name: name.to_owned(),
            size: AtomicU64::new(size),
            children: RwLock::new(children),
            ejector,
            fenced: AtomicBool::new(false),
            confirmed_until: AtomicU64::new(UNLIMITED),
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
            extent_lock: tokio::sync::Mutex::new(()),
            gate: tokio::sync::RwLock::new(()),
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

    /// The id and device of each healthy child (in sync: the ones a snapshot is taken of).
    pub fn healthy_devices(&self) -> Vec<(String, D)>
    where
        D: Clone,
    {
        self.snapshot()
            .iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .map(|c| (c.id.clone(), c.dev.clone()))
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

    /// Serve requests only until `at` (a monotonic instant), unless confirmed again before.
    /// The cluster confirms an attachment by reading its record back from the store: if the
    /// read was *sent* at `t` and the record still named this attachment, no other node can
    /// have written before `t`; a node that takes the volume over waits one lease TTL before
    /// its first write, so `t + TTL` is safe. Never moves the deadline back.
    pub fn confirm_until(&self, at: std::time::Instant) {
        let _ = clock_base();
        let at = millis_since_base(at);
        let _ = self.confirmed_until.fetch_update(SeqCst, SeqCst, |cur| {
            (cur == UNLIMITED || at > cur).then_some(at)
        });
    }

    /// Fence unless the attachment is confirmed for now (see [`Nexus::confirm_until`]).
    fn check_confirmed(&self) {
        let until = self.confirmed_until.load(SeqCst);
        if until != UNLIMITED && millis_since_base(std::time::Instant::now()) >= until {
            if !self.is_fenced() {
                tracing::error!(volume = %self.name, "this attachment could not be confirmed in time (another node may hold the volume now)");
            }
            self.fence();
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
            flushed: AtomicU64::new(0),
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
        self.check_confirmed();
        if self.is_fenced() {
            return Err(fenced_error(op, offset, len));
        }
        Ok(())
    }

    /// Refuse a request that ends beyond the volume (children may be bigger than it).
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        DeviceError::check_range(op, offset, len, self.size.load(SeqCst))
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
            Some(c) if c.state().writable() => self.eject(&c, reason, false).await,
            _ => false,
        }
    }

    fn child(&self, id: &str) -> Option<Arc<Child<D>>> {
        self.snapshot().into_iter().find(|c| c.id == id)
    }
}

/// The highest generation a replica may report (besides [`GENERATION_UNKNOWN`]): far above
/// any count of writes, far below overflow.
pub const MAX_GENERATION: u64 = 1 << 62;

/// Check a child's generations before they are used: a peer's answer is not trusted. Extents
/// must be in strictly increasing order, within the largest volume, with the nexus's extent
/// size, and generations at most [`MAX_GENERATION`] (or unknown).
///
/// # Errors
/// The first rule broken, as an I/O error of `child`.
pub fn check_generations(child: &str, g: &Generations) -> Result<(), DeviceError> {
    let bad = |why: String| {
        Err(DeviceError::new(
            DeviceErrorKind::Io,
            "generations",
            0,
            0,
            format!("replica {child} reported impossible generations: {why}"),
        ))
    };
    if g.extent_size != EXTENT {
        return bad(format!("{} byte extents, not {EXTENT}", g.extent_size));
    }
    let max_extents = api::MAX_VOLUME_SIZE / EXTENT;
    let mut previous: Option<u64> = None;
    for e in &g.extents {
        if e.extent >= max_extents {
            return bad(format!("extent {} is beyond the largest volume", e.extent));
        }
        if previous.is_some_and(|p| e.extent <= p) {
            return bad(format!("extent {} is out of order", e.extent));
        }
        if e.generation > MAX_GENERATION && e.generation != GENERATION_UNKNOWN {
            return bad(format!(
                "generation {} of extent {}",
                e.generation, e.extent
            ));
        }
        previous = Some(e.extent);
    }
    Ok(())
}

impl<D: BlockDevice + Clone + Send + Sync + 'static> BlockDevice for Nexus<D> {
    fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        self.read_impl(offset, buf, true).await
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
        // The first child writes from the caller's buffer, and the others from copies made
        // of it before it is lent (a remote child encodes its copy into its connection's
        // frames). The buffer comes back when the first child is done with it.
        let lent = std::sync::Mutex::new((Some(buf), Vec::new()));
        let back = std::sync::Mutex::new(None);
        let r = self
            .fan_out(("write", offset, len), |dev: D, i, n| {
                let mut lent = lent.lock().expect("buffer lock");
                let (original, copies) = &mut *lent;
                let data = match original.take() {
                    Some(b) if i == 0 => {
                        copies.extend((1..n).map(|_| {
                            let mut copy = volume::io::pool::take(b.len());
                            copy.copy_from_slice(&b);
                            copy
                        }));
                        b
                    }
                    other => {
                        *original = other;
                        copies.pop().expect("a copy for each child after the first")
                    }
                };
                let back = (i == 0).then_some(&back);
                async move {
                    let r = dev.write(offset, data, flags).await;
                    let (r, buf) = match r {
                        Ok(buf) => (Ok(()), buf),
                        Err(e) => (Err(e.error), e.buf),
                    };
                    match back {
                        Some(back) => *back.lock().expect("buffer lock") = Some(buf),
                        None => volume::io::pool::give(buf),
                    }
                    r
                }
            })
            .await;
        // Only a child that gave up with the I/O still running keeps the buffer.
        let buf = back
            .into_inner()
            .expect("buffer lock")
            .unwrap_or_else(|| IoBuf::zeroed(len as usize));
        match r {
            Ok(_) => Ok(buf),
            Err(error) => Err(BufError { error, buf }),
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        // Everything completed now is durable on each child that completes this flush.
        let durable = self.completed_through();
        let targets: Vec<Arc<Child<D>>> = self
            .snapshot()
            .into_iter()
            .filter(|c| c.state().writable())
            .collect();
        self.fan_out(
            ("flush", 0, 0),
            |dev: D, _, _| async move { dev.flush().await },
        )
        .await?;
        // A target that failed the flush was ejected (with its older point) before this.
        for c in targets.iter().filter(|c| c.state().writable()) {
            c.flushed.fetch_max(durable, SeqCst);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _gate = self.gate.read().await;
        self.check_range("discard", offset, len)?;
        let _admitted = self.admit(offset, len).await;
        self.fan_out(("discard", offset, len), |dev: D, _, _| async move {
            dev.discard(offset, len).await
        })
        .await
        .map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _gate = self.gate.read().await;
        self.check_range("write_zeroes", offset, len)?;
        let _admitted = self.admit(offset, len).await;
        self.fan_out(("write_zeroes", offset, len), |dev: D, _, _| async move {
            dev.write_zeroes(offset, len).await
        })
        .await
        .map(drop)
    }
}
