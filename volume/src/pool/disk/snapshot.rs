//! Snapshots on one pool device (format 3; the records are described in `metadata.rs`).
//!
//! # Reading through
//!
//! A record maps the logical extents it wrote itself; anywhere else it reads through to its
//! parent snapshot, and so on up the chain. [`Disk::resolve`] finds the physical extent. The
//! chain changes (a snapshot is taken, merged away or reverted to) only under the state lock
//! and inside an odd epoch of [`Disk::chain`], and a lookup that walked the chain retries if
//! the epoch moved, so it never sees an extent half-way through a move.
//!
//! # Copy on write
//!
//! A volume's first write to a logical extent that only an ancestor maps copies that extent
//! into a new one of its own ([`Disk::copy_on_write`]): the blocks that hold data are read,
//! verified against their checksums, and written to a free extent, which is published (owner,
//! checksums, mapping) in one step under the state lock once its data is written. Until then
//! readers keep reading the ancestor's extent, which holds the same data. The copy's
//! checksums are first checksums, so the commit that records them syncs the data first (as
//! for any first write). Later writes to the extent cost nothing extra. A discard of a whole
//! extent that an ancestor maps gets an extent of its own that reads as zeros, rather than a
//! free that would read through again.
//!
//! # Taking, deleting, cloning, reverting
//!
//! - Taking a snapshot of a volume waits for the volume's writes in flight and holds new ones
//!   (its `gate`), moves every extent the volume maps to a new snapshot record (a change of
//!   owner), bases the volume on it, and checkpoints. Writes that completed before it are in
//!   the snapshot; writes after it go to the volume.
//! - Deleting a snapshot that nothing is based on frees its extents. One that exactly one
//!   record is based on is merged into that record: each of its extents the child does not
//!   map moves to the child, the rest (which nobody can see) are freed. One that several
//!   records are based on is hidden (its name is free again) and merged or freed once at most
//!   one is left. So a delete frees exactly what no other record can read.
//! - A clone is a new volume based on the snapshot: thin, and readable at once.
//! - Reverting a volume frees what it maps and bases it on the snapshot.
//!
//! Every such change is made durable by a checkpoint, not a journal record: a record would
//! leave every extent it moves open, for crash recovery to read again.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::{lock, now_secs, AllocError, Disk, VolRt, UNMAPPED};
use crate::pool::format::{BLOCK, BLOCKS_PER_EXTENT, EXTENT};
use crate::pool::metadata::{ExtentEntry, VolumeRecord};
use crate::pool::PoolError;
use api::VolumeName;

/// Pins an extent for as long as it lives (a pinned extent is never reused).
struct Pin<'a>(&'a Disk, u32);

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.0.ext[self.1 as usize].pins.fetch_sub(1, SeqCst);
    }
}

/// What a snapshot holds, in bytes: `exclusive` only it can read (a delete frees it), `shared`
/// it can read and so can records based on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// Bytes of extents no other record reads.
    pub exclusive: u64,
    /// Bytes of extents records based on it read too.
    pub shared: u64,
}

impl Disk {
    /// The physical extent `vol` reads at `logical`: its own, else its nearest ancestor's, else
    /// [`UNMAPPED`].
    pub(crate) fn resolve(&self, vol: &VolRt, logical: u64) -> u32 {
        let p = vol.lookup(logical);
        if p != UNMAPPED || vol.parent.read().expect("parent lock").is_none() {
            return p;
        }
        loop {
            let epoch = self.chain.load(SeqCst);
            if epoch % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let mut found = vol.lookup(logical);
            let mut up = vol.parent();
            while found == UNMAPPED {
                let Some(v) = up else { break };
                found = v.lookup(logical);
                up = v.parent();
            }
            if self.chain.load(SeqCst) == epoch {
                return found;
            }
        }
    }

    /// The records `vol` reads through, oldest first, and the chain epoch they were read at
    /// (even: no change was under way).
    pub(crate) fn ancestors(&self, vol: &VolRt) -> (u64, Vec<Arc<VolRt>>) {
        loop {
            let epoch = self.chain.load(SeqCst);
            if epoch % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let mut out = Vec::new();
            let mut up = vol.parent();
            while let Some(v) = up {
                up = v.parent();
                out.push(v);
            }
            if self.chain.load(SeqCst) == epoch {
                out.reverse();
                return (epoch, out);
            }
        }
    }

    /// The data of logical extent `logical` that `rec` (a snapshot) maps itself, as long as
    /// no chain changed since epoch `epoch`: each written block verified against its
    /// checksum, each unwritten one zeros. `None` when the chain changed or `rec` does not map
    /// it.
    pub(crate) async fn read_own(
        &self,
        rec: &VolRt,
        logical: u64,
        epoch: u64,
    ) -> Result<Option<crate::io::IoBuf>, PoolError> {
        let p = rec.lookup(logical);
        if p == UNMAPPED {
            return Ok(None);
        }
        // Pinned, it is never reused while it is read; a snapshot's blocks never change.
        self.ext[p as usize].pins.fetch_add(1, SeqCst);
        let _pin = Pin(self, p);
        if self.chain.load(SeqCst) != epoch || rec.lookup(logical) != p {
            return Ok(None);
        }
        let csums: Vec<u32> = Self::block_range(p).map(|b| self.csum(b)).collect();
        let first = self
            .layout
            .data_block_offset(u64::from(p) * BLOCKS_PER_EXTENT);
        let mut data = super::read_at(&*self.engine, &self.file, first, EXTENT as usize)
            .await
            .map_err(|source| PoolError::Io {
                path: self.path.clone(),
                op: "read a snapshot",
                source,
            })?;
        for (k, &c) in csums.iter().enumerate() {
            let block = &mut data[k * BLOCK as usize..(k + 1) * BLOCK as usize];
            if c == 0 {
                block.fill(0);
            } else if super::encode_crc(block) != c {
                self.checksum_errors.fetch_add(1, SeqCst);
                return Err(PoolError::Io {
                    path: self.path.clone(),
                    op: "read a snapshot",
                    source: std::io::Error::other(format!(
                        "block {k} of extent {p} does not match its CRC32C checksum"
                    )),
                });
            }
        }
        Ok(Some(data))
    }

    /// Bytes `vol` reads from its ancestors (logical extents it does not map itself).
    pub(crate) fn shared_bytes(&self, vol: &VolRt) -> u64 {
        if vol.parent().is_none() {
            return 0;
        }
        let extents = vol.size.load(SeqCst) / EXTENT;
        (0..extents)
            .filter(|&l| vol.lookup(l) == UNMAPPED && self.shared_below(vol, l))
            .count() as u64
            * EXTENT
    }

    /// Whether an ancestor of `vol` maps `logical` (so `vol` reads its data there).
    pub(crate) fn shared_below(&self, vol: &VolRt, logical: u64) -> bool {
        vol.parent()
            .is_some_and(|p| self.resolve(&p, logical) != UNMAPPED)
    }

    /// Change the chain of records: `f` runs inside an odd epoch (see the module docs).
    /// Caller holds the state lock.
    fn chain_change<R>(&self, f: impl FnOnce() -> R) -> R {
        self.chain.fetch_add(1, SeqCst);
        let r = f();
        self.chain.fetch_add(1, SeqCst);
        r
    }

    /// Take a free extent off the free list (committing once to release freed ones if there
    /// is none).
    async fn take_free(&self) -> Result<u32, AllocError> {
        let mut committed = false;
        loop {
            {
                let mut st = lock(&self.state);
                if let Some(p) = st.free.pop_first() {
                    return Ok(p);
                }
                if st.pending_free.is_empty() || committed {
                    return Err(AllocError::NoSpace);
                }
            }
            self.commit(false).await.map_err(AllocError::Commit)?;
            committed = true;
        }
    }

    /// Give `vol` an extent of its own at `logical`, which an ancestor maps: a copy of the
    /// ancestor's (`copy`), or one that reads as zeros. Returns the extent `vol` maps there
    /// (also when another write got there first).
    pub(crate) async fn copy_on_write(
        &self,
        vol: &VolRt,
        logical: u64,
        copy: bool,
    ) -> Result<u32, AllocError> {
        // Two writes to the extent copy it once; copies of other extents go on meanwhile.
        let _cow = vol.cow_lock(logical).lock().await;
        let own = vol.lookup(logical);
        if own != UNMAPPED {
            return Ok(own);
        }
        // The source, pinned so it is not reused under the copy. (While it is visible it is
        // never freed: only extents that a record shadows are.)
        let (source, _pin) = loop {
            let q = self.resolve(vol, logical);
            if q == UNMAPPED {
                // Nothing to copy after all (cannot happen: what ancestors show never changes).
                return self.allocate(vol, logical).await;
            }
            self.ext[q as usize].pins.fetch_add(1, SeqCst);
            let pin = Pin(self, q);
            if self.resolve(vol, logical) == q {
                break (q, pin);
            }
        };
        let p = self.take_free().await?;
        let csums: Vec<u32> = Self::block_range(source)
            .map(|b| if copy { self.csum(b) } else { 0 })
            .collect();
        if let Err(e) = self.copy_extent(source, p, &csums).await {
            lock(&self.state).free.insert(p);
            return Err(e);
        }
        let mut st = lock(&self.state);
        if vol.deleted.load(SeqCst) {
            st.free.insert(p);
            return Err(AllocError::Closed);
        }
        st.owners[p as usize] = ExtentEntry {
            owner: vol.index + 1,
            logical: logical as u32,
            generation: 0,
        };
        for (b, &c) in Self::block_range(p).zip(&csums) {
            self.set_csum(b, c);
        }
        let e = &self.ext[p as usize];
        e.committed.store(false, SeqCst);
        e.generation
            .store(self.ext[source as usize].generation.load(SeqCst), SeqCst);
        vol.set_mapping(logical as u32, p);
        vol.allocated_extents.fetch_add(1, SeqCst);
        self.mark_extent(p);
        Ok(p)
    }

    /// Copy the blocks of extent `from` whose checksum in `csums` is not 0 to extent `to`,
    /// verifying each against it.
    async fn copy_extent(&self, from: u32, to: u32, csums: &[u32]) -> Result<(), AllocError> {
        if csums.iter().all(|&c| c == 0) {
            return Ok(());
        }
        let io = |op: &'static str| {
            move |source| {
                AllocError::Commit(PoolError::Io {
                    path: self.path.clone(),
                    op,
                    source,
                })
            }
        };
        let first = |p: u32| {
            self.layout
                .data_block_offset(u64::from(p) * BLOCKS_PER_EXTENT)
        };
        let data = super::read_at(&*self.engine, &self.file, first(from), EXTENT as usize)
            .await
            .map_err(io("read"))?;
        for (k, &c) in csums.iter().enumerate() {
            let block = &data[k * BLOCK as usize..(k + 1) * BLOCK as usize];
            if c != 0 && super::encode_crc(block) != c {
                self.checksum_errors.fetch_add(1, SeqCst);
                return Err(AllocError::Commit(PoolError::Io {
                    path: self.path.clone(),
                    op: "copy on write",
                    source: std::io::Error::other(format!(
                        "block {k} of extent {from} does not match its CRC32C checksum"
                    )),
                }));
            }
        }
        self.engine
            .submit(crate::io::IoRequest::write(
                &self.file,
                first(to),
                data,
                false,
            ))
            .await
            .result
            .map_err(io("write"))
    }

    /// The records based on `rec`.
    fn children(&self, rec: &VolRt) -> Vec<Arc<VolRt>> {
        lock(&self.state)
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.parent().is_some_and(|p| p.index == rec.index))
            .cloned()
            .collect()
    }

    /// Every listed snapshot (hidden ones are not).
    pub(crate) fn snapshots(&self) -> Vec<Arc<VolRt>> {
        lock(&self.state)
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.snapshot && !v.hidden.load(SeqCst))
            .cloned()
            .collect()
    }

    /// The listed snapshot named `name`.
    pub(crate) fn snapshot_named(&self, name: &VolumeName) -> Option<Arc<VolRt>> {
        lock(&self.state)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.snapshot && !v.hidden.load(SeqCst) && &v.name == name)
            .cloned()
    }

    /// How many bytes of `snap` only it reads, and how many records based on it read too.
    pub(crate) fn snapshot_usage(&self, snap: &VolRt) -> SnapshotUsage {
        let children = self.children(snap);
        let map = snap.map.read().expect("volume map lock");
        let mut u = SnapshotUsage::default();
        for (l, a) in map.iter().enumerate() {
            if a.load(SeqCst) == UNMAPPED {
                continue;
            }
            // A child that does not map the extent reads this one (a child is never smaller).
            if children.iter().any(|c| c.lookup(l as u64) == UNMAPPED) {
                u.shared += EXTENT;
            } else {
                u.exclusive += EXTENT;
            }
        }
        u
    }

    /// A free record slot. Caller holds the state lock.
    fn free_slot(&self, st: &super::DiskState) -> Result<usize, PoolError> {
        st.volumes
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| PoolError::Full {
                path: self.path.clone(),
                what: "volume table",
            })
    }

    /// Snapshot `vol` as `name` (see the module docs) and make it durable. A `hidden` one is
    /// not listed and goes once at most one record is based on it (the base of a clone of a
    /// volume).
    pub(crate) async fn create_snapshot(
        &self,
        vol: &Arc<VolRt>,
        name: &VolumeName,
        hidden: bool,
    ) -> Result<Arc<VolRt>, PoolError> {
        // The write barrier: no write of the volume (nor a copy on write, which only writes
        // do) is in flight from here on.
        let _gate = vol.gate.write().await;
        let snap = {
            let mut st = lock(&self.state);
            if vol.deleted.load(SeqCst) {
                return Err(PoolError::Io {
                    path: self.path.clone(),
                    op: "snapshot",
                    source: std::io::Error::other(format!("volume {} was deleted", vol.name)),
                });
            }
            let slot = self.free_slot(&st)?;
            let rec = VolumeRecord {
                name: name.clone(),
                uuid: vol.uuid,
                size: vol.size.load(SeqCst),
                created_at: now_secs(),
                generation: vol.seq.load(SeqCst),
                replicas: vol.replicas,
                snapshot: true,
                hidden,
                parent: 0,
            };
            let snap = Arc::new(VolRt::new(slot, &rec));
            *snap.parent.write().expect("parent lock") = vol.parent();
            self.chain_change(|| {
                let vmap = vol.map.read().expect("volume map lock");
                let smap = snap.map.read().expect("volume map lock");
                for (l, a) in vmap.iter().enumerate() {
                    let p = a.load(SeqCst);
                    if p != UNMAPPED {
                        smap[l].store(p, SeqCst);
                        st.owners[p as usize].owner = snap.index + 1;
                        self.mark_extent(p);
                    }
                }
                snap.allocated_extents
                    .store(vol.allocated_extents.swap(0, SeqCst), SeqCst);
                *vol.parent.write().expect("parent lock") = Some(snap.clone());
                for a in vmap.iter() {
                    a.store(UNMAPPED, SeqCst);
                }
            });
            st.volumes[slot] = Some(snap.clone());
            st.volumes_high = st.volumes_high.max(slot + 1);
            snap
        };
        self.checkpoint(false).await?;
        Ok(snap)
    }

    /// A new volume based on `snap` (a clone: thin, readable at once), durable.
    pub(crate) async fn create_clone(
        &self,
        snap: &Arc<VolRt>,
        name: &VolumeName,
        size: u64,
        uuid: [u8; 16],
    ) -> Result<Arc<VolRt>, PoolError> {
        let vol = {
            let mut st = lock(&self.state);
            let slot = self.free_slot(&st)?;
            let vol = Arc::new(VolRt::new(
                slot,
                &VolumeRecord {
                    name: name.clone(),
                    uuid,
                    size: size.max(snap.size.load(SeqCst)),
                    created_at: now_secs(),
                    generation: snap.seq.load(SeqCst),
                    replicas: snap.replicas,
                    snapshot: false,
                    hidden: false,
                    parent: 0,
                },
            ));
            *vol.parent.write().expect("parent lock") = Some(snap.clone());
            st.volumes[slot] = Some(vol.clone());
            st.volumes_high = st.volumes_high.max(slot + 1);
            vol
        };
        self.checkpoint(false).await?;
        Ok(vol)
    }

    /// Make `vol` read what `snap` holds: free what it maps and base it on `snap`, durably.
    pub(crate) async fn revert(
        &self,
        vol: &Arc<VolRt>,
        snap: &Arc<VolRt>,
    ) -> Result<(), PoolError> {
        let _gate = vol.gate.write().await;
        let old = {
            let mut st = lock(&self.state);
            let old = vol.parent();
            self.chain_change(|| {
                *vol.parent.write().expect("parent lock") = Some(snap.clone());
                let map = vol.map.read().expect("volume map lock");
                for l in 0..map.len() as u64 {
                    self.free_extent_locked(&mut st, vol, &map, l);
                }
            });
            old
        };
        self.collect(old).await;
        self.checkpoint(false).await
    }

    /// Delete snapshot `snap` (see the module docs), durably.
    pub(crate) async fn delete_snapshot(&self, snap: &Arc<VolRt>) -> Result<(), PoolError> {
        snap.hidden.store(true, SeqCst);
        self.collect(Some(snap.clone())).await;
        self.checkpoint(false).await
    }

    /// Forget `rec` and free what it maps. Caller holds the state lock.
    pub(super) fn drop_record(&self, st: &mut super::DiskState, rec: &VolRt) {
        rec.deleted.store(true, SeqCst);
        st.volumes[rec.index as usize] = None;
        let map = rec.map.read().expect("volume map lock");
        for l in 0..map.len() as u64 {
            self.free_extent_locked(st, rec, &map, l);
        }
    }

    /// Merge or free hidden snapshots from `start` up the chain, while at most one record is
    /// based on them.
    pub(crate) async fn collect(&self, start: Option<Arc<VolRt>>) {
        let mut at = start;
        while let Some(snap) = at.take() {
            if !snap.hidden.load(SeqCst) || snap.deleted.load(SeqCst) {
                return;
            }
            let children = self.children(&snap);
            match children.as_slice() {
                [] => {
                    let mut st = lock(&self.state);
                    self.chain_change(|| self.drop_record(&mut st, &snap));
                    at = snap.parent();
                }
                [child] => {
                    // No write (so no copy on write) into the child while its extents arrive:
                    // a brief pause, the merge changes only the tables in memory.
                    let _gate = child.gate.write().await;
                    let mut st = lock(&self.state);
                    if child.parent().is_none_or(|p| p.index != snap.index) {
                        // Changed while we waited (not with the control lock held): look again.
                        at = Some(snap.clone());
                        continue;
                    }
                    self.chain_change(|| self.merge(&mut st, &snap, child));
                    return;
                }
                _ => return,
            }
        }
    }

    /// Move what `snap` maps and `child` does not into `child`, free the rest, and take `snap`
    /// out of the chain. Caller holds the state lock, inside an odd epoch.
    fn merge(&self, st: &mut super::DiskState, snap: &VolRt, child: &VolRt) {
        {
            let smap = snap.map.read().expect("volume map lock");
            let cmap = child.map.read().expect("volume map lock");
            for (l, a) in smap.iter().enumerate() {
                let p = a.load(SeqCst);
                if p == UNMAPPED {
                    continue;
                }
                if cmap.get(l).is_some_and(|c| c.load(SeqCst) == UNMAPPED) {
                    // Published in the child before it leaves the snapshot.
                    cmap[l].store(p, SeqCst);
                    a.store(UNMAPPED, SeqCst);
                    st.owners[p as usize].owner = child.index + 1;
                    child.allocated_extents.fetch_add(1, SeqCst);
                    snap.allocated_extents.fetch_sub(1, SeqCst);
                    self.mark_extent(p);
                } else {
                    self.free_extent_locked(st, snap, &smap, l as u64);
                }
            }
        }
        *child.parent.write().expect("parent lock") = snap.parent();
        snap.deleted.store(true, SeqCst);
        st.volumes[snap.index as usize] = None;
    }
}
