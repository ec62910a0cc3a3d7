//! Reads: from the local healthy child if there is one; a checksum failure is answered from
//! another child and the bad copy repaired, block by block, under the extent's lock.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use volume::device::BlockDevice;
use volume::device::BufError;
use volume::device::BufResult;
use volume::device::DeviceError;
use volume::device::DeviceErrorKind;
use volume::device::WriteFlags;
use volume::io::IoBuf;
use volume::pool::format::EXTENT;

use super::rules::Answer;
use super::Child;
use super::ChildState;
use super::Nexus;

/// The repair unit: one checksummed block.
const BLOCK: u64 = api::BLOCK_SIZE;

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// The healthy children in read preference order: local first.
    pub(super) fn readers(&self) -> Vec<Arc<Child<D>>> {
        let mut v: Vec<_> = self
            .snapshot()
            .into_iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .collect();
        v.sort_by_key(|c| !c.local);
        v
    }

    /// Read from the healthy children in preference order. With `repair`, copies that failed
    /// their checksum are repaired before returning; a caller that already holds an extent
    /// exclusively (a rebuild's copy) reads without, since a repair takes that lock too.
    pub(super) async fn read_impl(&self, offset: u64, mut buf: IoBuf, repair: bool) -> BufResult {
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
                    // The data is only as good as the attachment when it was read: a read that
                    // took past the confirmed deadline may predate another node's writes.
                    if let Err(error) = self.check_fence("read", offset, len) {
                        return Err(BufError { error, buf: good });
                    }
                    if repair {
                        self.repair(&bad, offset, len).await;
                    }
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
                            // Never the last healthy child: with none left the volume could
                            // not be served or rebuilt even once this one answers again.
                            let another = self
                                .snapshot()
                                .iter()
                                .any(|c| c.id != child.id && c.state() == ChildState::Healthy);
                            if !another {
                                return Err(BufError { error, buf });
                            }
                            let reason = error.to_string();
                            if !self.eject(&child, &reason, false).await {
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

    /// Read `offset..offset + len` block by block, each block from the first healthy child
    /// whose copy of it passes its checksum: for a copy that must not fail because every
    /// replica has a bad block somewhere in the range (each elsewhere).
    ///
    /// # Errors
    /// A block no healthy child can read.
    pub(super) async fn read_blockwise(&self, offset: u64, len: u64) -> Result<IoBuf, DeviceError> {
        let mut out = IoBuf::zeroed(len as usize);
        let readers = self.readers();
        let mut at = 0;
        while at < len {
            let n = BLOCK.min(len - at);
            let mut last = None;
            let mut got = None;
            for c in &readers {
                match c.dev.read(offset + at, IoBuf::zeroed(n as usize)).await {
                    Ok(b) => {
                        got = Some(b);
                        break;
                    }
                    Err(e) => last = Some(e.error),
                }
            }
            let Some(block) = got else {
                return Err(last.unwrap_or_else(|| {
                    DeviceError::new(
                        DeviceErrorKind::Io,
                        "read",
                        offset + at,
                        n,
                        format!("volume {} has no healthy replica to read from", self.name),
                    )
                }));
            };
            out[at as usize..(at + n) as usize].copy_from_slice(&block);
            at += n;
        }
        Ok(out)
    }

    /// On each child of `bad` (whose copy of `offset..offset + len` failed its checksum),
    /// rewrite the blocks that still fail it, from a healthy copy read again while the
    /// block's extent is held exclusively: no write is in flight there, so the copy written is
    /// the newest, and it gets a new generation. A child that cannot be read or written is
    /// ejected.
    pub(super) async fn repair(&self, bad: &[Arc<Child<D>>], offset: u64, len: u64) {
        for child in bad {
            if let Err(reason) = self.repair_child(child, offset, len).await {
                self.eject(child, &format!("repair failed: {reason}"), false)
                    .await;
            }
        }
    }

    async fn repair_child(
        &self,
        child: &Arc<Child<D>>,
        offset: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        let end = offset.saturating_add(len).min(self.size());
        let mut block = offset / BLOCK * BLOCK;
        while block < end {
            let extent = block / EXTENT;
            let extent_end = ((extent + 1) * EXTENT).min(end);
            let _held = self.lock_extent(extent).await;
            while block < extent_end {
                match child.dev.read(block, IoBuf::zeroed(BLOCK as usize)).await {
                    Ok(_) => {} // fine now (a write covered it meanwhile, or it never failed)
                    Err(BufError { error, .. }) if error.kind == DeviceErrorKind::Checksum => {
                        self.repair_block(child, block).await?;
                    }
                    Err(BufError { error, .. }) => return Err(error),
                }
                block += BLOCK;
            }
        }
        Ok(())
    }

    /// Rewrite block `block` of `child` from the first healthy child that reads it.
    async fn repair_block(&self, child: &Arc<Child<D>>, block: u64) -> Result<(), DeviceError> {
        for source in self.readers() {
            if Arc::ptr_eq(&source, child) {
                continue;
            }
            let Ok(good) = source.dev.read(block, IoBuf::zeroed(BLOCK as usize)).await else {
                continue;
            };
            let sequenced = self.sequence();
            let flags = WriteFlags {
                fua: true,
                generation: sequenced.generation,
            };
            child
                .dev
                .write(block, good, flags)
                .await
                .map_err(|e| e.error)?;
            self.stats.repairs.fetch_add(1, SeqCst);
            tracing::warn!(volume = %self.name, replica = %child.id, offset = block, "repaired a block that failed its checksum");
            return Ok(());
        }
        tracing::warn!(volume = %self.name, replica = %child.id, offset = block, "no healthy copy of a block that failed its checksum could be read; left as it is");
        Ok(())
    }
}
