//! Crash-safe metadata: the volume table, the extent table and the open-extent bitmap, kept in
//! two copy-on-write slots.
//!
//! # Slots
//!
//! A slot is `header_pages` of header followed by `body_pages` of body. The header holds the
//! magic `BLSTMETA`, the commit sequence number, the owning device's UUID, where the journal
//! continues after this checkpoint (the sequence number of the last record the slot covers and
//! the offset of the next one), a CRC32C of every body page, and a CRC of the header itself. A slot is valid only if all of those check out,
//! so a torn write of any page makes the slot invalid, never half-applied.
//!
//! Commit `n` is written to slot `n % 2`, so the newest valid slot is never overwritten by the
//! commit after it: a crash at any instant leaves at least one valid slot, the newest one that
//! was fully written and synced. Open picks the valid slot with the highest sequence number.
//! Because the other slot already holds commit `n - 2`, a commit rewrites only the pages that
//! changed since then.
//!
//! # Body
//!
//! ```text
//! volume table   max_volumes records of 128 bytes:
//!                  0 state u8 (0 free, 1 volume, 2 snapshot; format 3)   1 name length u8
//!                  2..65 name   68 uuid [16] (a snapshot's: its source volume's)
//!                 88 size u64   96 created_at u64   104 generation u64
//!                112 desired replicas u8   113 flags u8 (bit 0: a deleted snapshot kept for
//!                the records based on it)   116 parent u32 (0 = none, else the slot + 1 of
//!                the snapshot this record is based on)
//! extent table   n_extents entries of 16 bytes, one per physical extent:
//!                  0 owner u32 (0 = free, else the owning record's slot + 1)   4 logical extent u32
//!                  8 generation u64 (the volume's write sequence at the extent's last write)
//! open bitmap    one bit per physical extent: the extent may hold data newer than its
//!                durable checksums (see `disk.rs`), so recovery recomputes them
//! ```
//!
//! Decoding checks the invariants: every owner is a live record, every logical index lies
//! inside its record, no two physical extents claim the same logical extent of one record,
//! every parent is a live snapshot, and parents form no cycle.
//!
//! # Snapshots (format 3)
//!
//! Records form a forest. A snapshot is a read-only record; a volume or snapshot based on one
//! (its `parent`) reads through to it wherever it maps no extent of its own. Every physical
//! extent still has exactly one owner, so sharing needs no reference counts: an extent of a
//! snapshot is shared by every record below it that does not map that logical extent itself.
//! Taking a snapshot of a volume moves the volume's extents to a new snapshot record (a
//! change of owner, no data moves) and bases the volume on it; the volume's first write to a
//! logical extent after that copies the snapshot's extent once (`disk.rs`).
//!
//! # Designed for later
//!
//! - **Encryption** (AES-XTS per volume): the volume record gains a wrapped key and a cipher
//!   ID in its reserved bytes; checksums cover the ciphertext, so scrub and rebuild need no key.
//! - **Generations** are already stored per extent; delta rebuild sends the extents whose
//!   generation is above the point where a stale replica fell behind.

use std::collections::HashSet;

use super::format::{
    get_u32, get_u64, put_u32, put_u64, Layout, BLOCK, EXTENT, HEADER_FIXED_BYTES,
};
use api::VolumeName;

const META_MAGIC: &[u8; 8] = b"BLSTMETA";
const META_VERSION: u32 = 1;

/// Errors decoding a metadata slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetadataError {
    /// The header is missing, torn or belongs to another device.
    #[error("metadata slot header is not valid")]
    BadHeader,
    /// A body page does not match its CRC.
    #[error("metadata body page {0} does not match its checksum")]
    BadPage(u32),
    /// The decoded tables break an invariant.
    #[error("metadata is inconsistent: {0}")]
    Inconsistent(String),
}

/// One volume's persistent record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The volume name.
    pub name: VolumeName,
    /// The volume UUID.
    pub uuid: [u8; 16],
    /// The size in bytes (a multiple of the extent size).
    pub size: u64,
    /// Seconds since the epoch at create.
    pub created_at: u64,
    /// The volume's write sequence number at the last commit.
    pub generation: u64,
    /// The desired replica count.
    pub replicas: u8,
    /// A snapshot (read-only) rather than a volume.
    pub snapshot: bool,
    /// A deleted snapshot kept because other records are based on it (not listed; its name
    /// is free).
    pub hidden: bool,
    /// 0, or the slot + 1 of the snapshot this record is based on.
    pub parent: u32,
}

/// One physical extent's owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtentEntry {
    /// 0 if free, else the owning volume's index + 1.
    pub owner: u32,
    /// The logical extent index within the owner.
    pub logical: u32,
    /// The owner's write sequence at this extent's last write.
    pub generation: u64,
}

/// The whole persistent metadata of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaState {
    /// `max_volumes` entries.
    pub volumes: Vec<Option<VolumeRecord>>,
    /// `n_extents` entries.
    pub extents: Vec<ExtentEntry>,
    /// Extents whose checksums recovery must recompute.
    pub open: Vec<bool>,
}

impl MetaState {
    /// The empty state of a freshly formatted device.
    pub fn empty(layout: &Layout) -> Self {
        Self {
            volumes: vec![None; layout.max_volumes as usize],
            extents: vec![ExtentEntry::default(); layout.n_extents as usize],
            open: vec![false; layout.n_extents as usize],
        }
    }

    /// Encode the body (`body_pages` pages).
    pub fn encode_body(&self, layout: &Layout) -> Vec<u8> {
        let mut b = Vec::new();
        self.encode_body_into(layout, &mut b);
        b
    }

    /// [`MetaState::encode_body`] into `b`, whatever it held (its allocation is reused).
    pub fn encode_body_into(&self, layout: &Layout, b: &mut Vec<u8>) {
        b.clear();
        b.resize(layout.body_pages as usize * BLOCK as usize, 0);
        for (i, v) in self.volumes.iter().enumerate() {
            if let Some(v) = v {
                v.encode(&mut b[i * 128..(i + 1) * 128]);
            }
        }
        let ext_base = layout.volume_pages as usize * BLOCK as usize;
        for (i, e) in self.extents.iter().enumerate() {
            let at = ext_base + i * 16;
            put_u32(b, at, e.owner);
            put_u32(b, at + 4, e.logical);
            put_u64(b, at + 8, e.generation);
        }
        let open_base = ext_base + layout.extent_pages as usize * BLOCK as usize;
        for (i, _) in self.open.iter().enumerate().filter(|(_, o)| **o) {
            b[open_base + i / 8] |= 1 << (i % 8);
        }
    }

    /// Decode and check a body.
    ///
    /// # Errors
    /// [`MetadataError::Inconsistent`] naming the broken invariant.
    pub fn decode_body(layout: &Layout, b: &[u8]) -> Result<Self, MetadataError> {
        let mut volumes = Vec::with_capacity(layout.max_volumes as usize);
        for i in 0..layout.max_volumes as usize {
            volumes.push(VolumeRecord::decode(i, &b[i * 128..(i + 1) * 128])?);
        }
        let ext_base = layout.volume_pages as usize * BLOCK as usize;
        let open_base = ext_base + layout.extent_pages as usize * BLOCK as usize;
        let mut extents = Vec::with_capacity(layout.n_extents as usize);
        let mut open = Vec::with_capacity(layout.n_extents as usize);
        for i in 0..layout.n_extents as usize {
            let at = ext_base + i * 16;
            let e = ExtentEntry {
                owner: get_u32(b, at),
                logical: get_u32(b, at + 4),
                generation: get_u64(b, at + 8),
            };
            extents.push(e);
            open.push(e.owner != 0 && b[open_base + i / 8] & (1 << (i % 8)) != 0);
        }
        let s = Self {
            volumes,
            extents,
            open,
        };
        s.check(layout)?;
        Ok(s)
    }

    /// Check the invariants: volume names are unique, and so are the names of the listed
    /// snapshots; every owner is a live record, every logical index lies inside its record, no
    /// two physical extents claim the same logical extent, every parent is a live snapshot and
    /// parents form no cycle, and the journal's extents are free.
    ///
    /// # Errors
    /// [`MetadataError::Inconsistent`] naming the broken invariant.
    pub fn check(&self, layout: &Layout) -> Result<(), MetadataError> {
        let bad = |m: String| MetadataError::Inconsistent(m);
        let mut names = HashSet::new();
        for v in self.volumes.iter().flatten().filter(|v| !v.hidden) {
            if !names.insert((v.snapshot, v.name.clone())) {
                return Err(bad(format!("the name {} appears twice", v.name)));
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let Some(v) = v else { continue };
            // At most one step per slot: a longer walk is a cycle.
            let mut at = v.parent;
            for _ in 0..=self.volumes.len() {
                if at == 0 {
                    break;
                }
                match self.volumes.get(at as usize - 1).and_then(Option::as_ref) {
                    Some(p) if p.snapshot => at = p.parent,
                    _ => {
                        return Err(bad(format!(
                            "record {i} ({}) is based on slot {}, which is not a snapshot",
                            v.name,
                            at - 1
                        )))
                    }
                }
            }
            if at != 0 {
                return Err(bad(format!("record {i} ({}) is based on a cycle", v.name)));
            }
        }
        let mut claimed = HashSet::new();
        for (i, e) in self.extents.iter().enumerate() {
            if e.owner == 0 {
                continue;
            }
            if i >= layout.usable_extents() as usize {
                return Err(bad(format!(
                    "extent {i} is part of the journal but is in use"
                )));
            }
            let vol = self
                .volumes
                .get(e.owner as usize - 1)
                .and_then(Option::as_ref)
                .ok_or_else(|| {
                    bad(format!(
                        "extent {i} belongs to volume slot {} which is free",
                        e.owner - 1
                    ))
                })?;
            if u64::from(e.logical) >= vol.size / EXTENT {
                return Err(bad(format!(
                    "extent {i} maps logical extent {} beyond the end of {}",
                    e.logical, vol.name
                )));
            }
            if !claimed.insert((e.owner, e.logical)) {
                return Err(bad(format!(
                    "logical extent {} of {} is mapped twice",
                    e.logical, vol.name
                )));
            }
        }
        Ok(())
    }
}

impl VolumeRecord {
    /// Encode into a zeroed 128-byte record.
    pub(crate) fn encode(&self, r: &mut [u8]) {
        r[0] = if self.snapshot { 2 } else { 1 };
        let name = self.name.as_str().as_bytes();
        r[1] = name.len() as u8;
        r[2..2 + name.len()].copy_from_slice(name);
        r[68..84].copy_from_slice(&self.uuid);
        put_u64(r, 88, self.size);
        put_u64(r, 96, self.created_at);
        put_u64(r, 104, self.generation);
        r[112] = self.replicas;
        r[113] = u8::from(self.hidden);
        put_u32(r, 116, self.parent);
    }

    /// Decode the 128-byte record of volume slot `i`: `None` if the slot is free.
    pub(crate) fn decode(i: usize, r: &[u8]) -> Result<Option<Self>, MetadataError> {
        let bad = |m: String| MetadataError::Inconsistent(m);
        match r[0] {
            0 => Ok(None),
            1 | 2 => {
                let n = r[1] as usize;
                let name = std::str::from_utf8(
                    r.get(2..2 + n)
                        .ok_or_else(|| bad(format!("volume {i}: name length")))?,
                )
                .map_err(|_| bad(format!("volume {i}: name is not UTF-8")))?;
                let name = VolumeName::new(name)
                    .map_err(|e| bad(format!("volume {i}: {}", e.message())))?;
                let size = get_u64(r, 88);
                if size == 0 || size % EXTENT != 0 {
                    return Err(bad(format!(
                        "volume {name}: size {size} is not a whole number of extents"
                    )));
                }
                // Checked before anything is sized by it (the extent map is).
                if size > api::MAX_VOLUME_SIZE {
                    return Err(bad(format!(
                        "volume {name}: size {size} is above the largest volume ({})",
                        api::MAX_VOLUME_SIZE
                    )));
                }
                Ok(Some(Self {
                    name,
                    uuid: r[68..84].try_into().expect("16 bytes"),
                    size,
                    created_at: get_u64(r, 96),
                    generation: get_u64(r, 104),
                    replicas: r[112],
                    snapshot: r[0] == 2,
                    hidden: r[0] == 2 && r[113] & 1 != 0,
                    parent: get_u32(r, 116),
                }))
            }
            s => Err(bad(format!("volume {i}: unknown state {s}"))),
        }
    }
}

/// Where the journal continues after a checkpoint: the last record the checkpoint covers and
/// the offset (within the journal) of the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalMark {
    /// The sequence number of the last record the checkpoint covers (0: none yet).
    pub seq: u64,
    /// The byte offset in the journal where the record after it goes.
    pub pos: u64,
}

/// A valid slot's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    /// The commit sequence number.
    pub seq: u64,
    /// Where the journal continues.
    pub journal: JournalMark,
}

/// Encode a slot header for `body` at commit `seq`.
pub fn encode_header(
    layout: &Layout,
    seq: u64,
    journal: JournalMark,
    disk_uuid: &[u8; 16],
    body: &[u8],
) -> Vec<u8> {
    let len = layout.header_pages as usize * BLOCK as usize;
    let mut h = vec![0u8; len];
    h[0..8].copy_from_slice(META_MAGIC);
    put_u32(&mut h, 8, META_VERSION);
    put_u32(&mut h, 12, layout.header_pages);
    put_u32(&mut h, 16, layout.body_pages);
    put_u64(&mut h, 24, seq);
    h[32..48].copy_from_slice(disk_uuid);
    put_u64(&mut h, 48, journal.seq);
    put_u64(&mut h, 56, journal.pos);
    for (i, page) in body.chunks(BLOCK as usize).enumerate() {
        put_u32(
            &mut h,
            HEADER_FIXED_BYTES as usize + i * 4,
            crc32c::crc32c(page),
        );
    }
    let crc = crc32c::crc32c(&h[..len - 4]);
    put_u32(&mut h, len - 4, crc);
    h
}

/// Validate a slot (header followed by body) and return its header.
///
/// # Errors
/// [`MetadataError::BadHeader`] or [`MetadataError::BadPage`].
pub fn check_slot(
    layout: &Layout,
    disk_uuid: &[u8; 16],
    slot: &[u8],
) -> Result<SlotHeader, MetadataError> {
    let hlen = layout.header_pages as usize * BLOCK as usize;
    let h = &slot[..hlen];
    let ok = &h[0..8] == META_MAGIC
        && get_u32(h, 8) == META_VERSION
        && get_u32(h, 12) == layout.header_pages
        && get_u32(h, 16) == layout.body_pages
        && &h[32..48] == disk_uuid
        && crc32c::crc32c(&h[..hlen - 4]) == get_u32(h, hlen - 4);
    if !ok {
        return Err(MetadataError::BadHeader);
    }
    for (i, page) in slot[hlen..].chunks(BLOCK as usize).enumerate() {
        if crc32c::crc32c(page) != get_u32(h, HEADER_FIXED_BYTES as usize + i * 4) {
            return Err(MetadataError::BadPage(i as u32));
        }
    }
    Ok(SlotHeader {
        seq: get_u64(h, 24),
        journal: JournalMark {
            seq: get_u64(h, 48),
            pos: get_u64(h, 56),
        },
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample(layout: &Layout) -> MetaState {
        let mut s = MetaState::empty(layout);
        s.volumes[3] = Some(VolumeRecord {
            name: VolumeName::new("db-0").unwrap(),
            uuid: [7; 16],
            size: 8 * EXTENT,
            created_at: 99,
            generation: 1234,
            replicas: 1,
            snapshot: false,
            hidden: false,
            parent: 0,
        });
        s.extents[10] = ExtentEntry {
            owner: 4,
            logical: 7,
            generation: 55,
        };
        s.extents[11] = ExtentEntry {
            owner: 4,
            logical: 0,
            generation: 56,
        };
        s.open[11] = true;
        s
    }

    /// A volume record with a valid checksum but an absurd size is an inconsistency, not an
    /// allocation of its extent map.
    #[test]
    fn an_absurd_volume_size_is_refused() {
        let layout = Layout::for_device(256 << 20).unwrap();
        let s = sample(&layout);
        let mut body = s.encode_body(&layout);
        put_u64(&mut body[3 * 128..4 * 128], 88, 1 << 62);
        let e = MetaState::decode_body(&layout, &body).unwrap_err();
        assert!(e.to_string().contains("above the largest volume"), "{e}");
    }

    #[test]
    fn round_trip() {
        let layout = Layout::for_device(256 << 20).unwrap();
        let s = sample(&layout);
        let body = s.encode_body(&layout);
        assert_eq!(MetaState::decode_body(&layout, &body).unwrap(), s);
        let mark = JournalMark { seq: 5, pos: 8192 };
        let mut slot = encode_header(&layout, 17, mark, &[9; 16], &body);
        slot.extend_from_slice(&body);
        assert_eq!(
            check_slot(&layout, &[9; 16], &slot),
            Ok(SlotHeader {
                seq: 17,
                journal: mark
            })
        );
        assert_eq!(
            check_slot(&layout, &[8; 16], &slot),
            Err(MetadataError::BadHeader)
        );
        let hlen = layout.header_pages as usize * 4096;
        slot[hlen + 4096 + 5] ^= 1;
        assert_eq!(
            check_slot(&layout, &[9; 16], &slot),
            Err(MetadataError::BadPage(1))
        );
    }

    #[test]
    fn inconsistencies_are_refused() {
        let layout = Layout::for_device(256 << 20).unwrap();
        let mut s = sample(&layout);
        s.extents[12] = ExtentEntry {
            owner: 4,
            logical: 7,
            generation: 0,
        };
        assert!(MetaState::decode_body(&layout, &s.encode_body(&layout))
            .unwrap_err()
            .to_string()
            .contains("mapped twice"));
        let mut s = sample(&layout);
        s.extents[12] = ExtentEntry {
            owner: 1,
            logical: 0,
            generation: 0,
        };
        assert!(MetaState::decode_body(&layout, &s.encode_body(&layout)).is_err());
        let mut s = sample(&layout);
        s.extents[12] = ExtentEntry {
            owner: 4,
            logical: 8,
            generation: 0,
        };
        assert!(MetaState::decode_body(&layout, &s.encode_body(&layout)).is_err());
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096), at in 0usize..200_000) {
            let layout = Layout::for_device(64 << 20).unwrap();
            let mut body = sample(&layout).encode_body(&layout);
            let at = at % body.len();
            let end = (at + bytes.len()).min(body.len());
            body[at..end].copy_from_slice(&bytes[..end - at]);
            let _ = MetaState::decode_body(&layout, &body);
            let mut slot = encode_header(&layout, 1, JournalMark::default(), &[0; 16], &body);
            slot.extend_from_slice(&body);
            let hl = slot.len().min(bytes.len());
            slot[..hl].copy_from_slice(&bytes[..hl]);
            let _ = check_slot(&layout, &[0; 16], &slot);
        }
    }
}
