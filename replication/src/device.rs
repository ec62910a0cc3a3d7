//! The device behind an attached volume, whether it has one replica or several.
//!
//! - [`VolumeDevice::Local`]: a single-replica volume in this node's storage;
//! - [`VolumeDevice::Replicated`]: a [`Nexus`] over the volume's replicas, where each child is
//!   a [`Child`]: one of this node's replicas, or a remote one.
//!
//! A local child is admitted by the fence table for every request, through the same
//! [`FenceTable::admit`] as the replica server's requests, so a `Register` is ordered against
//! local writes exactly as against remote ones. Its requests are polled where they are awaited
//! (no task per request), and the child gives up waiting after [`LOCAL_IO_TIMEOUT`]: a hung
//! local disk then fails the request (and the nexus ejects the replica) instead of stalling
//! every write. A request given up on finishes on the runtime, still holding its admission
//! until the disk answers, so nothing can re-register the volume here (a rebuild of that
//! replica, a takeover) while it may still land.
//!
//! [`DeviceSource`] is how a frontend gets a device for a name and gives it back; the cluster
//! source (also in standalone mode) takes the attachment in the cluster store first.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use api::{ControlError, VolumeName};
use volume::device::{
    BlockDevice, BufError, BufResult, DeviceError, DeviceErrorKind, Generations, WriteFlags,
};
use volume::io::IoBuf;
use volume::pool::Replica;

use crate::fence::{Admission, FenceTable};
use crate::nexus::{Nexus, Resizable};
use crate::remote::RemoteReplica;

/// How long a request to this node's own replica may take before the child fails it.
pub const LOCAL_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One child of a replicated volume's nexus.
#[derive(Debug, Clone)]
pub enum Child {
    /// This node's replica, fenced by its attachment's epoch.
    Local(LocalChild),
    /// A replica on another node.
    Remote(RemoteReplica),
}

/// This node's replica as a nexus child.
#[derive(Debug, Clone)]
pub struct LocalChild {
    /// The replica.
    pub replica: Replica,
    /// The node's fence table (shared with the replica server).
    pub fence: Arc<FenceTable>,
    /// The attachment's epoch.
    pub epoch: u64,
}

impl LocalChild {
    /// Run one request on the replica: admitted by the fence table, holding the admission
    /// until the replica answers (see [`Held`]), waited for at most [`LOCAL_IO_TIMEOUT`].
    async fn run<T, Fut>(
        &self,
        at: (&'static str, u64, u64),
        io: impl FnOnce(Replica) -> Fut,
    ) -> Result<T, DeviceError>
    where
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (op, offset, len) = at;
        let (name, epoch) = (self.replica.name(), self.epoch);
        let fail = |kind, why: String| DeviceError::new(kind, op, offset, len, why);
        let admitted: Admission = self.fence.admit(name, epoch).await.map_err(|e| {
            fail(
                DeviceErrorKind::Fenced,
                format!("epoch {epoch} of volume {name} is no longer current on this node: {e}"),
            )
        })?;
        let fut = io(self.replica.clone());
        let held = Held(Some(Box::pin(async move {
            let out = fut.await;
            drop(admitted);
            out
        })));
        match tokio::time::timeout(LOCAL_IO_TIMEOUT, held).await {
            Ok(out) => Ok(out),
            Err(_) => Err(fail(
                DeviceErrorKind::Io,
                format!("this node's replica of {name} did not answer within {LOCAL_IO_TIMEOUT:?}"),
            )),
        }
    }

    /// [`LocalChild::run`] for requests that carry a buffer: on a failure before the replica
    /// answered, a zeroed buffer of the same length comes back with the error.
    async fn run_buf<Fut>(
        &self,
        at: (&'static str, u64, u64),
        io: impl FnOnce(Replica) -> Fut,
    ) -> BufResult
    where
        Fut: Future<Output = BufResult> + Send + 'static,
    {
        let len = at.2;
        self.run(at, io).await.unwrap_or_else(|error| {
            Err(BufError {
                error,
                buf: IoBuf::zeroed(len as usize),
            })
        })
    }
}

/// A local request holding its fence admission, polled where it is awaited (no task, no
/// hand-off). If its waiter gives up first (the timeout, or the caller dropped), it finishes on
/// the runtime, or on a thread of its own outside one, so the admission is held until the
/// replica has answered.
struct Held<T: Send + 'static>(Option<Pin<Box<dyn Future<Output = T> + Send>>>);

impl<T: Send + 'static> Future for Held<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(work) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(work.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Held<T> {
    fn drop(&mut self) {
        let Some(work) = self.0.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(work));
        } else {
            std::thread::spawn(move || volume::io::block_on(work));
        }
    }
}

impl BlockDevice for Child {
    fn size(&self) -> u64 {
        match self {
            Child::Local(l) => l.replica.size(),
            Child::Remote(r) => r.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        match self {
            Child::Local(l) => {
                let at = ("read", offset, buf.len() as u64);
                l.run_buf(at, move |r| async move { r.read(offset, buf).await })
                    .await
            }
            Child::Remote(r) => r.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        match self {
            Child::Local(l) => {
                let at = ("write", offset, buf.len() as u64);
                l.run_buf(
                    at,
                    move |r| async move { r.write(offset, buf, flags).await },
                )
                .await
            }
            Child::Remote(r) => r.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            Child::Local(l) => {
                l.run(("flush", 0, 0), |r| async move { r.flush().await })
                    .await?
            }
            Child::Remote(r) => r.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            Child::Local(l) => {
                let at = ("discard", offset, len);
                l.run(at, move |r| async move { r.discard(offset, len).await })
                    .await?
            }
            Child::Remote(r) => r.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            Child::Local(l) => {
                let at = ("write_zeroes", offset, len);
                l.run(
                    at,
                    move |r| async move { r.write_zeroes(offset, len).await },
                )
                .await?
            }
            Child::Remote(r) => r.write_zeroes(offset, len).await,
        }
    }

    async fn generations(&self) -> Result<Generations, DeviceError> {
        match self {
            Child::Local(l) => {
                l.run(
                    ("generations", 0, 0),
                    |r| async move { r.generations().await },
                )
                .await?
            }
            Child::Remote(r) => r.generations().await,
        }
    }
}

impl Child {
    /// The snapshots the replica reads through (see [`volume::pool::Replica::chain`]).
    ///
    /// # Errors
    /// Fenced, or the replica cannot answer.
    pub async fn chain(&self) -> Result<volume::pool::Chain, DeviceError> {
        match self {
            Child::Local(l) => l.run(("chain", 0, 0), |r| async move { r.chain() }).await,
            Child::Remote(r) => r.chain().await,
        }
    }

    /// What link `link` of the chain read at `chain_epoch` maps itself at logical extent
    /// `extent` (see [`volume::pool::Replica::read_link`]).
    ///
    /// # Errors
    /// The chain changed, fenced, or the read failed.
    pub async fn read_link(
        &self,
        chain_epoch: u64,
        link: usize,
        extent: u64,
    ) -> Result<IoBuf, DeviceError> {
        match self {
            Child::Local(l) => {
                l.run(("read_link", extent, 0), move |r| async move {
                    r.read_link(chain_epoch, link, extent).await
                })
                .await?
            }
            Child::Remote(r) => r.read_link(chain_epoch, link, extent).await,
        }
    }
}

impl Resizable for Child {
    async fn refresh_size(&self) -> Result<u64, DeviceError> {
        match self {
            Child::Local(l) => {
                l.run(("refresh_size", 0, 0), |r| async move { r.size() })
                    .await
            }
            Child::Remote(r) => r.refresh_size().await,
        }
    }
}

/// The device of an attached volume.
#[derive(Debug, Clone)]
pub enum VolumeDevice {
    /// A single replica on this node.
    Local(Replica),
    /// Several replicas behind a nexus.
    Replicated(Arc<Nexus<Child>>),
}

impl VolumeDevice {
    /// The volume's name.
    pub fn name(&self) -> &str {
        match self {
            VolumeDevice::Local(r) => r.name(),
            VolumeDevice::Replicated(n) => n.name(),
        }
    }

    /// Whether a newer attachment (or the loss of this node's lease) fenced it: every request
    /// fails from then on, and the volume must be attached again to be used here.
    pub fn is_fenced(&self) -> bool {
        match self {
            VolumeDevice::Local(_) => false,
            VolumeDevice::Replicated(n) => n.is_fenced(),
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        match self {
            VolumeDevice::Local(r) => r.size(),
            VolumeDevice::Replicated(n) => n.size(),
        }
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> BufResult {
        match self {
            VolumeDevice::Local(r) => r.read(offset, buf).await,
            VolumeDevice::Replicated(n) => n.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BufResult {
        match self {
            VolumeDevice::Local(r) => r.write(offset, buf, flags).await,
            VolumeDevice::Replicated(n) => n.write(offset, buf, flags).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.flush().await,
            VolumeDevice::Replicated(n) => n.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.discard(offset, len).await,
            VolumeDevice::Replicated(n) => n.discard(offset, len).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            VolumeDevice::Local(r) => r.write_zeroes(offset, len).await,
            VolumeDevice::Replicated(n) => n.write_zeroes(offset, len).await,
        }
    }
}

/// Where frontends get devices from. Calls are blocking (run them on blocking threads).
pub trait DeviceSource: Send + Sync + fmt::Debug {
    /// Take the volume for this node and return its device. `force` takes it over from
    /// another node whose lease has not expired.
    ///
    /// # Errors
    /// Unknown volume, attached elsewhere, or its replicas cannot be reached.
    fn open(&self, name: &VolumeName, force: bool) -> Result<VolumeDevice, ControlError>;

    /// Give the volume up (after its device is gone). Best effort.
    fn release(&self, name: &VolumeName);

    /// The volume's size in bytes, without opening it.
    ///
    /// # Errors
    /// `not_found` for an unknown volume.
    fn size(&self, name: &VolumeName) -> Result<u64, ControlError>;

    /// Every volume's name, sorted.
    ///
    /// # Errors
    /// The volumes cannot be listed.
    fn names(&self) -> Result<Vec<VolumeName>, ControlError>;

    /// `Ok` if the volume exists.
    ///
    /// # Errors
    /// `not_found` for an unknown volume.
    fn exists(&self, name: &VolumeName) -> Result<(), ControlError> {
        self.size(name).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request given up on outside any runtime (a plain thread) still runs to its end, and
    /// what it holds (the admission, here a flag) is released only then.
    #[test]
    fn a_held_request_given_up_outside_a_runtime_finishes_on_a_thread() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let held = Held(Some(Box::pin(async move {
            let _ = go_rx.await;
            done_tx.send(()).unwrap();
        })));
        assert!(tokio::runtime::Handle::try_current().is_err());
        drop(held);
        assert!(
            done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "it finished before the disk answered"
        );
        go_tx.send(()).unwrap();
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the abandoned request never finished");
    }
}
