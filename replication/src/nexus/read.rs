//! Reads: from the local healthy child if there is one; a checksum failure is answered from
//! another child and the bad copy repaired.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use volume::device::BlockDevice;
use volume::device::BufError;
use volume::device::BufResult;
use volume::device::DeviceError;
use volume::device::DeviceErrorKind;
use volume::device::WriteFlags;
use volume::io::IoBuf;

use super::rules::Answer;
use super::Child;
use super::ChildState;
use super::Nexus;

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

    pub(super) async fn read_impl(&self, offset: u64, mut buf: IoBuf) -> BufResult {
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
    pub(super) async fn repair(&self, bad: &[Arc<Child<D>>], offset: u64, good: &IoBuf) {
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
