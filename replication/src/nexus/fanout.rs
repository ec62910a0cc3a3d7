//! Fan-out: a request sent to every writable child, and the ejection of the children that
//! failed it, committed before the request is acknowledged.

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use futures_util::future::join_all;
use volume::device::BlockDevice;
use volume::device::DeviceError;
use volume::device::DeviceErrorKind;

use super::rules::decide;
use super::rules::Answer;
use super::rules::Decision;
use super::Child;
use super::ChildState;
use super::Nexus;

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// Commit the ejection of `child` (once; concurrent callers wait for the same outcome).
    /// Returns whether the child is ejected now. `missed`: the child failed a write (or a
    /// flush) that others took, so if the ejection cannot be recorded it must not come back
    /// ([`ChildState::Unrecorded`]); otherwise (a failed read or grow) it keeps its state.
    pub(super) async fn eject(&self, child: &Child<D>, reason: &str, missed: bool) -> bool {
        let mut won = false;
        let mut before = ChildState::Healthy;
        child.state.send_if_modified(|s| {
            if s.writable() || *s == ChildState::Unrecorded {
                before = *s;
                *s = ChildState::Ejecting;
                won = true;
            }
            won
        });
        if won {
            tracing::warn!(volume = %self.name, replica = %child.id, reason, "ejecting a replica");
            // What the child is known to hold durably, not merely what it completed.
            let since = child.flushed.load(SeqCst);
            match self.ejector.eject(&child.id, reason, since).await {
                Ok(()) => {
                    self.stats.ejections.fetch_add(1, SeqCst);
                    child.state.send_replace(ChildState::Ejected);
                }
                Err(e) => {
                    tracing::error!(volume = %self.name, replica = %child.id, error = %e.full_message(), "cannot record the ejection; writes that skipped the replica fail");
                    let back = if missed || before == ChildState::Unrecorded {
                        ChildState::Unrecorded
                    } else {
                        before
                    };
                    child.state.send_replace(back);
                }
            }
        }
        Self::settled(child).await
    }

    /// Wait until `child` is not `Ejecting`; whether it ended up ejected.
    pub(super) async fn settled(child: &Child<D>) -> bool {
        let mut rx = child.state.subscribe();
        let state = rx
            .wait_for(|s| *s != ChildState::Ejecting)
            .await
            .map_or(ChildState::Ejecting, |s| *s);
        state == ChildState::Ejected
    }

    /// Run `op` on every writable child, decide, eject, and settle ejections that the
    /// snapshot skipped. Returns the first child's result value on success. `op` is called
    /// once per child, in order, with the child's index and the number of children, before
    /// any of the futures it returns is polled.
    pub(super) async fn fan_out<T, F, Fut>(
        &self,
        what: (&'static str, u64, u64),
        op: F,
    ) -> Result<Option<T>, DeviceError>
    where
        F: Fn(D, usize, usize) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, DeviceError>> + Send,
        T: Send,
    {
        let (name, offset, len) = what;
        self.check_fence(name, offset, len)?;
        let all = self.snapshot();
        // Children this request skips whose ejection is not recorded yet: it is acknowledged
        // only once it is (an unrecorded one is tried again).
        let skipped: Vec<Arc<Child<D>>> = all
            .iter()
            .filter(|c| matches!(c.state(), ChildState::Ejecting | ChildState::Unrecorded))
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
        let n = targets.len();
        let calls: Vec<Fut> = (targets.iter().enumerate())
            .map(|(i, c)| op(c.dev.clone(), i, n))
            .collect();
        let results = join_all(calls).await;
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
        let complete: Vec<bool> = targets
            .iter()
            .map(|c| c.state() == ChildState::Healthy)
            .collect();
        match decide(&answers, &complete) {
            Decision::Fenced { from } => {
                self.fenced.store(true, SeqCst);
                tracing::error!(volume = %self.name, "a replica reports a newer attachment; this attachment stops all I/O");
                Err(take_err(&mut results, from))
            }
            Decision::Fail { from } => {
                if targets.len() > 1 && !answers.contains(&Answer::Caller) {
                    // No complete child took it, and none is ejected, yet some may have
                    // applied it: they can differ now, and a read would depend on which one
                    // answers. Stop; attaching again reconciles them before the first I/O.
                    tracing::error!(volume = %self.name, op = name, offset, len, "no complete replica took a request; stopping this attachment so the replicas are reconciled at the next attach");
                    self.fence();
                }
                Err(take_err(&mut results, from))
            }
            Decision::Ack { eject } => {
                for i in eject {
                    let e = take_err(&mut results, i);
                    if !self.eject(&targets[i], &e.to_string(), true).await {
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
                    let recorded = if c.state() == ChildState::Unrecorded {
                        self.eject(c, "it missed writes (recording again)", true)
                            .await
                    } else {
                        Self::settled(c).await
                    };
                    if !recorded {
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
}
