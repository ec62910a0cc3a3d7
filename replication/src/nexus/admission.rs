//! Admission of changing requests: their generations, the gate a rebuild closes while it
//! snapshots, and per-extent write counts and locks (a copy holds its extent exclusively).

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use volume::device::BlockDevice;
use volume::pool::format::EXTENT;

use super::Nexus;
use super::NO_COPY;

/// A changing request's registration: its generation and its extents; released on drop.
pub(super) struct Admitted<'a, D> {
    nexus: &'a Nexus<D>,
    pub(super) generation: u64,
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
pub(super) struct ExtentLock<'a, D> {
    nexus: &'a Nexus<D>,
    /// Dropped after `copying` is cleared (fields drop after `Drop::drop`).
    _serial: tokio::sync::MutexGuard<'a, ()>,
}

impl<D> Drop for ExtentLock<'_, D> {
    fn drop(&mut self) {
        self.nexus.copying.store(NO_COPY, SeqCst);
        self.nexus.copy_done.notify_waiters();
    }
}

impl<D> Nexus<D> {
    /// Add one (`up`) or remove one write in flight on each extent of `extents`.
    pub(super) fn count_writes(&self, extents: std::ops::Range<u64>, up: bool) {
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
    pub(super) fn writes_on(&self, e: u64) -> u32 {
        self.extent_writes
            .read()
            .expect("extent counters lock")
            .get(e as usize)
            .map_or(0, |c| c.load(SeqCst))
    }

    /// How many extents the volume has.
    pub(super) fn extent_count(&self) -> u64 {
        self.extent_writes
            .read()
            .expect("extent counters lock")
            .len() as u64
    }
}

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// The generation the next write gets.
    pub fn next_generation(&self) -> u64 {
        self.seq.lock().expect("sequencer lock").next
    }

    /// Number every later request above `floor` (a generation recorded elsewhere, such as an
    /// ejection's starting point): a delta rebuild from `floor` must see them.
    pub fn number_above(&self, floor: u64) {
        let mut s = self.seq.lock().expect("sequencer lock");
        s.next = s.next.max(floor.saturating_add(1));
    }

    /// Every request up to this generation has completed.
    pub(super) fn completed_through(&self) -> u64 {
        let s = self.seq.lock().expect("sequencer lock");
        s.in_flight.first().copied().unwrap_or(s.next) - 1
    }

    /// Register a changing request on `offset..offset + len`: wait while a copy holds one of
    /// its extents, then take the next generation.
    pub(super) async fn admit(&self, offset: u64, len: u64) -> Admitted<'_, D> {
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
        self.sequenced(first..end)
    }

    /// A generation for a change made while holding its extent exclusively (a repair): in
    /// flight like a write's until dropped, without counting as a write on the extent.
    pub(super) fn sequence(&self) -> Admitted<'_, D> {
        self.sequenced(0..0)
    }

    /// Take the next generation, in flight until the returned registration (which also
    /// counts as a write on `extents`, already counted) drops.
    fn sequenced(&self, extents: std::ops::Range<u64>) -> Admitted<'_, D> {
        let mut s = self.seq.lock().expect("sequencer lock");
        let generation = s.next;
        s.next += 1;
        s.in_flight.insert(generation);
        Admitted {
            nexus: self,
            generation,
            extents,
        }
    }

    /// Hold extent `e` exclusively: wait until no write is in flight on it; writes arriving
    /// meanwhile wait in [`Nexus::admit`] until the guard drops.
    pub(super) async fn lock_extent(&self, e: u64) -> ExtentLock<'_, D> {
        // One holder at a time: a second one would move `copying` off the first's extent.
        let serial = self.extent_lock.lock().await;
        self.copying.store(e, SeqCst);
        while self.writes_on(e) != 0 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        ExtentLock {
            nexus: self,
            _serial: serial,
        }
    }

    /// The byte range of extent `e`, clipped to the volume.
    pub(super) fn extent_range(&self, e: u64) -> (u64, u64) {
        // Beyond the volume (and beyond u64) is an empty range.
        let offset = e.saturating_mul(EXTENT);
        (
            offset,
            EXTENT.min(self.size.load(SeqCst).saturating_sub(offset)),
        )
    }
}
