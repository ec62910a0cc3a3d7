//! Online growth: every writable child must show the new size before the nexus does.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use futures_util::future::join_all;
use volume::device::BlockDevice;
use volume::device::DeviceError;
use volume::device::DeviceErrorKind;
use volume::pool::format::EXTENT;

use super::rules::Answer;
use super::Child;
use super::Nexus;
use super::Resizable;

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// A write barrier: wait for every changing request in flight, hold new ones until the
    /// guard drops, and flush, so that every child holds every completed write durably and
    /// none holds a write the others lack. A snapshot is taken of every replica under it.
    ///
    /// # Errors
    /// The flush failed (the guard is dropped: writes go on).
    pub async fn hold_writes(&self) -> Result<tokio::sync::RwLockWriteGuard<'_, ()>, DeviceError> {
        let exclusive = self.gate.write().await;
        self.flush().await?;
        Ok(exclusive)
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
            if !self.eject(c, &format!("cannot grow: {why}"), false).await {
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
}
