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

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, RwLock};

use futures_util::future::join_all;
use tokio::sync::watch;
use volume::device::{BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, WriteFlags};
use volume::io::IoBuf;

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

/// A future returned by an [`Ejector`].
pub type EjectFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Commits an ejection durably (in the cluster store) before writes that skipped the child
/// are acknowledged.
pub trait Ejector: Send + Sync + 'static {
    /// Record that `child` no longer receives writes. An `Err` names why it could not be
    /// recorded; the writes that depended on it then fail.
    fn eject<'a>(&'a self, child: &'a str, reason: &'a str) -> EjectFuture<'a>;
}

/// An [`Ejector`] for tests and single-node use: nothing to commit.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStore;

impl Ejector for NoStore {
    fn eject<'a>(&'a self, _child: &'a str, _reason: &'a str) -> EjectFuture<'a> {
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
}

/// One volume's replicated device.
pub struct Nexus<D> {
    name: String,
    size: u64,
    children: RwLock<Vec<Arc<Child<D>>>>,
    ejector: Arc<dyn Ejector>,
    fenced: AtomicBool,
    stats: NexusStats,
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
            .field("size", &self.size)
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
        assert!(!children.is_empty(), "a nexus needs at least one child");
        let size = children.iter().map(|c| c.dev.size()).min().unwrap_or(0);
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
            size,
            children: RwLock::new(children),
            ejector,
            fenced: AtomicBool::new(false),
            stats: NexusStats::default(),
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
            match self.ejector.eject(&child.id, reason).await {
                Ok(()) => {
                    self.stats.ejections.fetch_add(1, SeqCst);
                    child.state.send_replace(ChildState::Ejected);
                }
                Err(e) => {
                    tracing::error!(volume = %self.name, replica = %child.id, error = %e, "cannot record the ejection; writes that skipped the replica fail");
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
        if let Err(error) = self.check_fence("read", offset, len) {
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
                .write(offset, IoBuf::from_slice(good), WriteFlags { fua: true })
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
        self.size
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        self.read_impl(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        let len = buf.len() as u64;
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
        self.fan_out(("discard", offset, len), |dev: D| async move {
            dev.discard(offset, len).await
        })
        .await
        .map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
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

    #[test]
    fn fencing_wins_over_everything() {
        assert_eq!(
            decide(&[Failed, Caller, Fenced]),
            Decision::Fenced { from: 2 }
        );
    }
}
