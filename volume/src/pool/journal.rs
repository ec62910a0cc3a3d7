//! The per-device journal (format 2): what a flush writes.
//!
//! # Why
//!
//! A checkpoint (a metadata slot plus the checksum pages in place, see `disk.rs`) costs work
//! proportional to the device and several scattered writes. A flush instead appends one
//! record holding only what changed since the previous one, and syncs once. Checkpoints run
//! in the background (when the journal fills, when the open set must shrink, at a clean
//! close), and recovery replays the records written after the newest valid slot.
//!
//! # Region
//!
//! The last [`super::format::JOURNAL_EXTENTS`] extents of the data area, used as a ring. A
//! record that does not fit before the end starts again at offset 0. A slot's header names
//! the last record it covers and where the next one goes ([`JournalMark`]); a checkpoint is
//! taken before a record would overwrite one the newest slot does not cover.
//!
//! # Record
//!
//! Whole 4 KiB blocks, all numbers little-endian:
//!
//! ```text
//!  0 magic "BLSTJRNL"   8 seq u64   16 length u32 (bytes, a multiple of 4 KiB)
//! 20 payload length u32 24 device UUID [16]   40 CRC32C u32 (of the header with this field
//!    zero, then the payload)   44 reserved   48 payload, then zeros to the length
//! ```
//!
//! The payload is a list of entries, each a tag byte:
//!
//! ```text
//! 1 volume    index u32, the 128-byte volume record of the slot format
//! 2 no volume index u32 (the slot is free)
//! 3 extent    physical extent u32, owner u32, logical u32, generation u64,
//!             count u16, count × (block in the extent u8, stored checksum u32)
//! ```
//!
//! A record is valid only if its magic, device, sequence number (exactly the next one
//! expected), length and CRC all check out, so a torn or stale record ends the replay; the
//! CRC makes a record all-or-nothing. An extent entry sets the extent's table entry and marks
//! it open if it has an owner, closed if not (records never close an owned extent: only
//! checkpoints do); its checksum pairs set those blocks' stored checksums.

use super::format::{
    get_u16, get_u32, get_u64, put_u32, put_u64, Layout, BLOCK, BLOCKS_PER_EXTENT,
};
use super::metadata::{ExtentEntry, MetaState, MetadataError, VolumeRecord};

const MAGIC: &[u8; 8] = b"BLSTJRNL";
/// Bytes of a record's header.
pub const HEADER: usize = 48;
const TAG_VOLUME: u8 = 1;
const TAG_NO_VOLUME: u8 = 2;
const TAG_EXTENT: u8 = 3;
const VOLUME_ENTRY: usize = 1 + 4 + 128;
const EXTENT_ENTRY: usize = 1 + 4 + 4 + 4 + 8 + 2;
const CSUM_ENTRY: usize = 5;

/// One extent's change in a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentChange {
    /// The physical extent.
    pub extent: u32,
    /// Its table entry after the change.
    pub entry: ExtentEntry,
    /// (block within the extent, stored checksum) of the blocks whose checksum changed.
    pub csums: Vec<(u8, u32)>,
}

/// What one record changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Volume slots that changed: the new record, or `None` for a freed slot.
    pub volumes: Vec<(u32, Option<VolumeRecord>)>,
    /// Extents that changed.
    pub extents: Vec<ExtentChange>,
}

impl Record {
    /// Whether the record changes nothing.
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.extents.is_empty()
    }

    /// The bytes this record takes on disk, a multiple of 4 KiB.
    pub fn encoded_len(&self) -> usize {
        let payload = self
            .volumes
            .iter()
            .map(|(_, v)| if v.is_some() { VOLUME_ENTRY } else { 1 + 4 });
        let extents = self
            .extents
            .iter()
            .map(|e| EXTENT_ENTRY + e.csums.len() * CSUM_ENTRY);
        (HEADER + payload.sum::<usize>() + extents.sum::<usize>()).div_ceil(BLOCK as usize)
            * BLOCK as usize
    }

    /// Encode as record `seq` of device `disk_uuid` into `out` (replacing what it held).
    pub fn encode(&self, seq: u64, disk_uuid: &[u8; 16], out: &mut Vec<u8>) {
        let len = self.encoded_len();
        out.clear();
        out.resize(HEADER, 0);
        for (i, v) in &self.volumes {
            out.push(if v.is_some() {
                TAG_VOLUME
            } else {
                TAG_NO_VOLUME
            });
            out.extend_from_slice(&i.to_le_bytes());
            if let Some(v) = v {
                let at = out.len();
                out.resize(at + 128, 0);
                v.encode(&mut out[at..]);
            }
        }
        for e in &self.extents {
            out.push(TAG_EXTENT);
            out.extend_from_slice(&e.extent.to_le_bytes());
            out.extend_from_slice(&e.entry.owner.to_le_bytes());
            out.extend_from_slice(&e.entry.logical.to_le_bytes());
            out.extend_from_slice(&e.entry.generation.to_le_bytes());
            out.extend_from_slice(&(e.csums.len() as u16).to_le_bytes());
            for &(b, c) in &e.csums {
                out.push(b);
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        let payload = out.len() - HEADER;
        out.resize(len, 0);
        out[0..8].copy_from_slice(MAGIC);
        put_u64(out, 8, seq);
        put_u32(out, 16, len as u32);
        put_u32(out, 20, payload as u32);
        out[24..40].copy_from_slice(disk_uuid);
        let crc = record_crc(out, payload);
        put_u32(out, 40, crc);
    }

    /// Decode the record at the start of `buf` if it is record `seq` of `disk_uuid`; returns
    /// it and its length. `None` for anything else: stale, torn, another device's, or junk.
    pub fn decode(buf: &[u8], seq: u64, disk_uuid: &[u8; 16]) -> Option<(Self, usize)> {
        if buf.len() < HEADER || &buf[0..8] != MAGIC || get_u64(buf, 8) != seq {
            return None;
        }
        let len = get_u32(buf, 16) as usize;
        let payload = get_u32(buf, 20) as usize;
        if &buf[24..40] != disk_uuid
            || len % BLOCK as usize != 0
            || len > buf.len()
            || HEADER + payload > len
        {
            return None;
        }
        if !cfg!(fuzzing) && record_crc(&buf[..len], payload) != get_u32(buf, 40) {
            return None;
        }
        let mut p = Payload {
            b: &buf[HEADER..HEADER + payload],
        };
        let mut rec = Self::default();
        while let Some(tag) = p.u8() {
            match tag {
                TAG_VOLUME => {
                    let i = p.u32()?;
                    let v = VolumeRecord::decode(i as usize, p.take(128)?).ok()??;
                    rec.volumes.push((i, Some(v)));
                }
                TAG_NO_VOLUME => rec.volumes.push((p.u32()?, None)),
                TAG_EXTENT => {
                    let extent = p.u32()?;
                    let entry = ExtentEntry {
                        owner: p.u32()?,
                        logical: p.u32()?,
                        generation: p.u64()?,
                    };
                    let n = usize::from(get_u16(p.take(2)?, 0));
                    let mut csums = Vec::with_capacity(n.min(BLOCKS_PER_EXTENT as usize));
                    for _ in 0..n {
                        csums.push((p.u8()?, p.u32()?));
                    }
                    rec.extents.push(ExtentChange {
                        extent,
                        entry,
                        csums,
                    });
                }
                _ => return None,
            }
        }
        Some((rec, len))
    }

    /// Apply to the tables and the stored checksums (`csums`, one per data block).
    ///
    /// # Errors
    /// [`MetadataError::Inconsistent`] if the record names a volume slot, extent or block the
    /// device does not have.
    pub fn apply(
        &self,
        layout: &Layout,
        meta: &mut MetaState,
        csums: &mut [u32],
    ) -> Result<(), MetadataError> {
        let bad = |m: String| MetadataError::Inconsistent(m);
        for (i, v) in &self.volumes {
            let slot = meta
                .volumes
                .get_mut(*i as usize)
                .ok_or_else(|| bad(format!("a journal record names volume slot {i}")))?;
            slot.clone_from(v);
        }
        for e in &self.extents {
            let p = e.extent as usize;
            if p >= layout.n_extents as usize {
                return Err(bad(format!("a journal record names extent {p}")));
            }
            meta.extents[p] = e.entry;
            meta.open[p] = e.entry.owner != 0;
            for &(b, c) in &e.csums {
                let at = p * BLOCKS_PER_EXTENT as usize + usize::from(b);
                *csums
                    .get_mut(at)
                    .ok_or_else(|| bad(format!("a journal record names block {at}")))? = c;
            }
        }
        Ok(())
    }
}

fn record_crc(rec: &[u8], payload: usize) -> u32 {
    let mut h = [0u8; HEADER];
    h.copy_from_slice(&rec[..HEADER]);
    h[40..44].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&h), &rec[HEADER..HEADER + payload])
}

struct Payload<'a> {
    b: &'a [u8],
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| get_u32(b, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| get_u64(b, 0))
    }
}

/// Replay the journal `region` after `mark` onto `meta` and `csums`: the records that follow
/// it in sequence, until the first that is missing, torn or stale. Returns where the journal
/// continues (the last record applied and the offset of the next).
///
/// # Errors
/// A valid record that does not fit the device ([`Record::apply`]).
pub fn replay(
    layout: &Layout,
    disk_uuid: &[u8; 16],
    region: &[u8],
    mark: super::metadata::JournalMark,
    meta: &mut MetaState,
    csums: &mut [u32],
) -> Result<(super::metadata::JournalMark, u64), MetadataError> {
    let mut at = mark;
    let mut records = 0;
    loop {
        let seq = at.seq + 1;
        let here = usize::try_from(at.pos)
            .ok()
            .and_then(|p| region.get(p..))
            .and_then(|b| Record::decode(b, seq, disk_uuid));
        // A record that did not fit before the end of the ring starts at offset 0.
        let (rec, pos, len) = match here {
            Some((rec, len)) => (rec, at.pos, len),
            None => match Record::decode(region, seq, disk_uuid) {
                Some((rec, len)) if at.pos != 0 => (rec, 0, len),
                _ => break,
            },
        };
        rec.apply(layout, meta, csums)?;
        records += 1;
        at = super::metadata::JournalMark {
            seq,
            pos: pos + len as u64,
        };
    }
    Ok((at, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::metadata::JournalMark;
    use api::VolumeName;

    fn sample() -> Record {
        Record {
            volumes: vec![
                (
                    2,
                    Some(VolumeRecord {
                        name: VolumeName::new("db").unwrap(),
                        uuid: [5; 16],
                        size: 4 << 20,
                        created_at: 7,
                        generation: 9,
                        replicas: 1,
                        snapshot: false,
                        hidden: false,
                        parent: 0,
                    }),
                ),
                (4, None),
            ],
            extents: vec![
                ExtentChange {
                    extent: 3,
                    entry: ExtentEntry {
                        owner: 3,
                        logical: 1,
                        generation: 9,
                    },
                    csums: vec![(0, 11), (255, 12)],
                },
                ExtentChange {
                    extent: 5,
                    entry: ExtentEntry::default(),
                    csums: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let rec = sample();
        let mut b = Vec::new();
        rec.encode(7, &[1; 16], &mut b);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.len(), rec.encoded_len());
        assert_eq!(Record::decode(&b, 7, &[1; 16]), Some((rec, 4096)));
        assert_eq!(Record::decode(&b, 8, &[1; 16]), None, "another sequence");
        assert_eq!(Record::decode(&b, 7, &[2; 16]), None, "another device");
        for at in [0, 9, 17, 30, 41, 60, 200] {
            let mut torn = b.clone();
            torn[at] ^= 1;
            assert_eq!(Record::decode(&torn, 7, &[1; 16]), None, "flip at {at}");
        }
        assert_eq!(Record::decode(&b[..4000], 7, &[1; 16]), None, "short");
    }

    #[test]
    fn replay_follows_the_sequence_and_wraps() {
        let layout = Layout::for_device(256 << 20).unwrap();
        let region_len = 3 * 4096;
        let mut region = vec![0u8; region_len];
        let mut buf = Vec::new();
        // Records 1 and 2 at 4 KiB and 8 KiB, record 3 wrapped to 0.
        let mut r1 = sample();
        r1.extents.truncate(1);
        r1.encode(1, &[1; 16], &mut buf);
        region[4096..8192].copy_from_slice(&buf);
        let mut r2 = Record::default();
        r2.extents.push(ExtentChange {
            extent: 3,
            entry: r1.extents[0].entry,
            csums: vec![(0, 99)],
        });
        r2.encode(2, &[1; 16], &mut buf);
        region[8192..12288].copy_from_slice(&buf);
        let mut r3 = Record::default();
        r3.volumes.push((4, None));
        r3.extents.push(ExtentChange {
            extent: 6,
            entry: ExtentEntry {
                owner: 3,
                logical: 0,
                generation: 1,
            },
            csums: vec![(1, 5)],
        });
        r3.encode(3, &[1; 16], &mut buf);
        region[..4096].copy_from_slice(&buf);
        let mut meta = MetaState::empty(&layout);
        let mut csums = vec![0u32; layout.n_extents as usize * 256];
        let (end, n) = replay(
            &layout,
            &[1; 16],
            &region,
            JournalMark { seq: 0, pos: 4096 },
            &mut meta,
            &mut csums,
        )
        .unwrap();
        assert_eq!((end, n), (JournalMark { seq: 3, pos: 4096 }, 3));
        assert_eq!(csums[3 * 256], 99);
        assert_eq!(csums[3 * 256 + 255], 12);
        assert_eq!(csums[6 * 256 + 1], 5);
        assert!(meta.open[3] && meta.open[6]);
        assert!(meta.volumes[2].is_some());
        meta.check(&layout).unwrap();
        // A checkpoint after record 2 replays only record 3.
        let mut meta = MetaState::empty(&layout);
        let (end, n) = replay(
            &layout,
            &[1; 16],
            &region,
            JournalMark { seq: 2, pos: 12288 },
            &mut meta,
            &mut csums,
        )
        .unwrap();
        assert_eq!((end, n), (JournalMark { seq: 3, pos: 4096 }, 1));
    }

    #[test]
    fn a_record_naming_what_the_device_lacks_is_inconsistent() {
        let layout = Layout::for_device(64 << 20).unwrap();
        let mut meta = MetaState::empty(&layout);
        let mut csums = vec![0u32; layout.n_extents as usize * 256];
        let mut rec = Record::default();
        rec.extents.push(ExtentChange {
            extent: layout.n_extents,
            entry: ExtentEntry::default(),
            csums: vec![],
        });
        assert!(rec.apply(&layout, &mut meta, &mut csums).is_err());
        let rec = Record {
            volumes: vec![(layout.max_volumes, None)],
            extents: vec![],
        };
        assert!(rec.apply(&layout, &mut meta, &mut csums).is_err());
    }

    proptest::proptest! {
        /// Arbitrary bytes, or a valid record with bytes spliced in, never panic the decoder.
        #[test]
        fn decode_never_panics(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000), at in 0usize..4096) {
            let _ = Record::decode(&junk, 1, &[0; 16]);
            let mut b = Vec::new();
            sample().encode(1, &[0; 16], &mut b);
            let end = (at + junk.len()).min(b.len());
            b[at..end].copy_from_slice(&junk[..end - at]);
            let _ = Record::decode(&b, 1, &[0; 16]);
        }
    }
}
