//! The on-disk format of one pool device: superblock, layout and foreign-signature detection.
//!
//! # Layout
//!
//! Every device Ballast manages is self-describing. All numbers are little-endian; all regions
//! are 4 KiB aligned, and the data area is 1 MiB aligned.
//!
//! ```text
//! offset 0                superblock A (4 KiB)
//! meta_slot_offset[0]     metadata slot 0  (header pages + body pages)
//! meta_slot_offset[1]     metadata slot 1  (same size)
//! csum_offset             checksum area: one u32 per 4 KiB data block, indexed by physical block
//! data_offset             data area: n_extents extents of 1 MiB (256 blocks each), the last
//!                         journal_extents of which hold the journal (format 2)
//! device_bytes - 4 KiB    superblock B (a second copy of A)
//! ```
//!
//! # Versions
//!
//! - **1**: no journal; every commit rewrote checksum pages and a metadata slot.
//! - **2**: the last [`JOURNAL_EXTENTS`] extents of the data area are the journal (see
//!   `journal.rs`): a flush appends one record there. Everything else is laid out exactly as in
//!   version 1, so a version 1 device is upgraded in place at open: whatever data its last
//!   extents hold is moved to free extents, and the superblocks are rewritten (B, then A).
//! - **3**: snapshots: a record of the volume table may be a snapshot and may be based on one
//!   (`metadata.rs`). The layout is version 2's, so a version 2 device is upgraded at open by
//!   rewriting its superblocks (B, then A). A build that knows only version 2 refuses a
//!   version 3 device and says to upgrade, so it never reads a snapshot as a volume.
//!
//! # Superblock
//!
//! Magic `BALLASTP`, format version, block and extent sizes, the node-wide pool UUID, this
//! device's UUID, the formatted size, the region offsets, the creating node's ID, and a CRC32C
//! of the block. It is written once, at format time, and both copies are identical; open uses A
//! and falls back to B (at the end of the device) if A is damaged.
//!
//! # Safety rules
//!
//! - A device holding a Ballast superblock of another pool, a filesystem, a partition table,
//!   LVM, LUKS, swap or RAID signature, or any non-zero byte in its first MiB, is never
//!   formatted unless the caller forces it. [`detect_foreign`] names what it found.
//! - Format writes the metadata slot first and the superblocks last, each followed by a
//!   `fdatasync`, so a crash mid-format leaves a device that is still "not a pool".

use api::format_size;

/// The size of every metadata and data block.
pub const BLOCK: u64 = 4096;
/// The size of an extent: the unit of allocation.
pub const EXTENT: u64 = 1 << 20;
/// Blocks per extent.
pub const BLOCKS_PER_EXTENT: u64 = EXTENT / BLOCK;
/// Bytes of checksum per extent.
pub const CSUM_BYTES_PER_EXTENT: u64 = BLOCKS_PER_EXTENT * 4;
/// The smallest device Ballast formats.
pub const MIN_DEVICE_BYTES: u64 = 64 << 20;
/// The largest device a pool covers: its extent count must fit the format's 32-bit field.
pub const MAX_DEVICE_BYTES: u64 = (u32::MAX as u64) * EXTENT;
/// The magic at the start of a superblock.
pub const SB_MAGIC: &[u8; 8] = b"BALLASTP";
/// The current on-disk format version.
pub const FORMAT_VERSION: u32 = 3;
/// Extents at the end of the data area that hold the journal (format 2).
pub const JOURNAL_EXTENTS: u32 = 4;
/// Bytes per volume record in the metadata body.
pub const VOLUME_RECORD_BYTES: u64 = 128;
/// Bytes per extent-table entry in the metadata body.
pub const EXTENT_ENTRY_BYTES: u64 = 16;
/// Longest node ID stored in the superblock.
pub const MAX_NODE_ID: usize = 64;

/// Errors reading or validating the format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The device is smaller than [`MIN_DEVICE_BYTES`].
    #[error("the device is {} but a pool needs at least {}", format_size(*.0), format_size(MIN_DEVICE_BYTES))]
    TooSmall(u64),
    /// The device is larger than [`MAX_DEVICE_BYTES`].
    #[error("the device is {} but a pool covers at most {}; split it into several pools", format_size(*.0), format_size(MAX_DEVICE_BYTES))]
    TooLarge(u64),
    /// Neither superblock copy is valid.
    #[error("no valid Ballast superblock")]
    NoSuperblock,
    /// The superblock is from a newer format.
    #[error("on-disk format version {0} is newer than this build supports ({FORMAT_VERSION}); upgrade ballast")]
    UnsupportedVersion(u32),
    /// A field is inconsistent.
    #[error("superblock field {0} is inconsistent")]
    Inconsistent(&'static str),
}

/// The geometry of a formatted device, derived from its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes covered by the format (the device size rounded down to 4 KiB).
    pub device_bytes: u64,
    /// Number of 1 MiB extents in the data area (the tables' size), the journal's included.
    pub n_extents: u32,
    /// The last extents of the data area that hold the journal: 0 in format 1.
    pub journal_extents: u32,
    /// Number of volume records in the metadata body.
    pub max_volumes: u32,
    /// Header pages of a metadata slot.
    pub header_pages: u32,
    /// Body pages of a metadata slot (volume table + extent table + open bitmap).
    pub body_pages: u32,
    /// Pages of the volume table.
    pub volume_pages: u32,
    /// Pages of the extent table.
    pub extent_pages: u32,
    /// Pages of the open-extent bitmap.
    pub open_pages: u32,
    /// The two slots' offsets.
    pub meta_slot_offset: [u64; 2],
    /// Bytes of one slot.
    pub meta_slot_bytes: u64,
    /// Offset of the checksum area.
    pub csum_offset: u64,
    /// Bytes of the checksum area.
    pub csum_bytes: u64,
    /// Offset of the data area.
    pub data_offset: u64,
}

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK)
}

impl Layout {
    /// The layout for a device of `device_bytes`.
    ///
    /// # Errors
    /// [`FormatError::TooSmall`] below [`MIN_DEVICE_BYTES`], [`FormatError::TooLarge`] above
    /// [`MAX_DEVICE_BYTES`] (a superblock is read from disk: its size is checked before any
    /// arithmetic on it).
    pub fn for_device(device_bytes: u64) -> Result<Self, FormatError> {
        Ok(Self {
            journal_extents: JOURNAL_EXTENTS,
            ..Self::version_1(device_bytes)?
        })
    }

    /// The layout format 1 gave a device of `device_bytes` (no journal).
    ///
    /// # Errors
    /// As [`Layout::for_device`].
    pub fn version_1(device_bytes: u64) -> Result<Self, FormatError> {
        let device_bytes = device_bytes / BLOCK * BLOCK;
        if device_bytes < MIN_DEVICE_BYTES {
            return Err(FormatError::TooSmall(device_bytes));
        }
        if device_bytes > MAX_DEVICE_BYTES {
            return Err(FormatError::TooLarge(device_bytes));
        }
        let mut n = device_bytes / EXTENT;
        loop {
            let max_volumes = n.clamp(64, 4096);
            let l = Self::with(device_bytes, n, max_volumes);
            if l.data_offset + n * EXTENT + BLOCK <= device_bytes {
                return Ok(l);
            }
            n -= 1;
        }
    }

    fn with(device_bytes: u64, n: u64, max_volumes: u64) -> Self {
        let volume_pages = pages(max_volumes * VOLUME_RECORD_BYTES);
        let extent_pages = pages(n * EXTENT_ENTRY_BYTES);
        let open_pages = pages(n.div_ceil(8));
        let body_pages = volume_pages + extent_pages + open_pages;
        let header_pages = pages(HEADER_FIXED_BYTES + body_pages * 4 + 4);
        let meta_slot_bytes = (header_pages + body_pages) * BLOCK;
        let slot0 = BLOCK;
        let slot1 = slot0 + meta_slot_bytes;
        let csum_offset = slot1 + meta_slot_bytes;
        let csum_bytes = pages(n * CSUM_BYTES_PER_EXTENT) * BLOCK;
        let data_offset = (csum_offset + csum_bytes).div_ceil(EXTENT) * EXTENT;
        Self {
            device_bytes,
            n_extents: n as u32,
            journal_extents: 0,
            max_volumes: max_volumes as u32,
            header_pages: header_pages as u32,
            body_pages: body_pages as u32,
            volume_pages: volume_pages as u32,
            extent_pages: extent_pages as u32,
            open_pages: open_pages as u32,
            meta_slot_offset: [slot0, slot1],
            meta_slot_bytes,
            csum_offset,
            csum_bytes,
            data_offset,
        }
    }

    /// The newest format version with this layout (1 without a journal).
    pub fn version(&self) -> u32 {
        if self.journal_extents == 0 {
            1
        } else {
            FORMAT_VERSION
        }
    }

    /// Extents volumes may use: the data area without the journal.
    pub fn usable_extents(&self) -> u32 {
        self.n_extents - self.journal_extents
    }

    /// Usable data capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.usable_extents()) * EXTENT
    }

    /// Where the journal starts.
    pub fn journal_offset(&self) -> u64 {
        self.data_block_offset(u64::from(self.usable_extents()) * BLOCKS_PER_EXTENT)
    }

    /// Bytes of the journal.
    pub fn journal_bytes(&self) -> u64 {
        u64::from(self.journal_extents) * EXTENT
    }

    /// The device offset of physical block `pblock` of the data area.
    pub fn data_block_offset(&self, pblock: u64) -> u64 {
        self.data_offset + pblock * BLOCK
    }

    /// Where superblock B lives.
    pub fn sb_b_offset(&self) -> u64 {
        self.device_bytes - BLOCK
    }
}

/// Fixed bytes at the start of a metadata slot header before the page CRC array.
pub const HEADER_FIXED_BYTES: u64 = 64;

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The node-wide pool UUID shared by all devices of one node's pool.
    pub pool_uuid: [u8; 16],
    /// This device's UUID.
    pub disk_uuid: [u8; 16],
    /// The node that formatted it.
    pub node_id: String,
    /// Seconds since the epoch at format.
    pub created_at: u64,
    /// The geometry.
    pub layout: Layout,
    /// The format version recorded (1 only with a layout without a journal).
    pub version: u32,
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    /// Encode into one 4 KiB block with its CRC in the last four bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        let l = &self.layout;
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, BLOCK as u32);
        put_u32(&mut b, 16, EXTENT as u32);
        b[24..40].copy_from_slice(&self.pool_uuid);
        b[40..56].copy_from_slice(&self.disk_uuid);
        put_u64(&mut b, 56, l.device_bytes);
        put_u32(&mut b, 64, l.n_extents);
        put_u32(&mut b, 68, l.max_volumes);
        put_u64(&mut b, 72, l.meta_slot_offset[0]);
        put_u64(&mut b, 80, l.meta_slot_offset[1]);
        put_u64(&mut b, 88, l.meta_slot_bytes);
        put_u64(&mut b, 96, l.csum_offset);
        put_u64(&mut b, 104, l.csum_bytes);
        put_u64(&mut b, 112, l.data_offset);
        put_u64(&mut b, 120, self.created_at);
        let id = self.node_id.as_bytes();
        let n = id.len().min(MAX_NODE_ID);
        b[128..130].copy_from_slice(&(n as u16).to_le_bytes());
        b[130..130 + n].copy_from_slice(&id[..n]);
        put_u32(&mut b, 200, l.journal_extents);
        let crc = crc32c::crc32c(&b[..BLOCK as usize - 4]);
        put_u32(&mut b, BLOCK as usize - 4, crc);
        b
    }

    /// Decode and validate one superblock copy.
    ///
    /// # Errors
    /// Not a superblock, a bad CRC, an unknown version, or a layout that does not match the
    /// geometry this build derives from the recorded size.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < BLOCK as usize || &b[0..8] != SB_MAGIC {
            return Err(FormatError::NoSuperblock);
        }
        let crc = get_u32(b, BLOCK as usize - 4);
        // A fuzzing build skips the check, so random superblocks reach the parser.
        if !cfg!(fuzzing) && crc32c::crc32c(&b[..BLOCK as usize - 4]) != crc {
            return Err(FormatError::NoSuperblock);
        }
        let version = get_u32(b, 8);
        if version == 0 || version > FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if u64::from(get_u32(b, 12)) != BLOCK || u64::from(get_u32(b, 16)) != EXTENT {
            return Err(FormatError::Inconsistent("block or extent size"));
        }
        let device_bytes = get_u64(b, 56);
        let layout = if version == 1 {
            Layout::version_1(device_bytes)
        } else {
            Layout::for_device(device_bytes)
        }
        .map_err(|_| FormatError::Inconsistent("device size"))?;
        if get_u32(b, 200) != layout.journal_extents {
            return Err(FormatError::Inconsistent("journal size"));
        }
        let recorded = (
            get_u32(b, 64),
            get_u32(b, 68),
            [get_u64(b, 72), get_u64(b, 80)],
            get_u64(b, 88),
            get_u64(b, 96),
            get_u64(b, 104),
            get_u64(b, 112),
        );
        let derived = (
            layout.n_extents,
            layout.max_volumes,
            layout.meta_slot_offset,
            layout.meta_slot_bytes,
            layout.csum_offset,
            layout.csum_bytes,
            layout.data_offset,
        );
        if recorded != derived {
            return Err(FormatError::Inconsistent("layout"));
        }
        let n = usize::from(u16::from_le_bytes([b[128], b[129]])).min(MAX_NODE_ID);
        Ok(Self {
            pool_uuid: b[24..40].try_into().expect("16 bytes"),
            disk_uuid: b[40..56].try_into().expect("16 bytes"),
            node_id: String::from_utf8_lossy(&b[130..130 + n]).into_owned(),
            created_at: get_u64(b, 120),
            layout,
            version,
        })
    }
}

/// Look for something in the first MiB of a device that must not be overwritten: returns a
/// description of what was found, or `None` if the region is all zeros.
///
/// `head` should hold the first MiB (or the whole device if smaller).
pub fn detect_foreign(head: &[u8]) -> Option<String> {
    let at = |off: usize, magic: &[u8]| {
        head.len() >= off + magic.len() && &head[off..off + magic.len()] == magic
    };
    let checks: [(&str, bool); 12] = [
        ("a Ballast pool", at(0, SB_MAGIC)),
        ("an ext2/3/4 filesystem", at(1080, &[0x53, 0xEF])),
        ("an XFS filesystem", at(0, b"XFSB")),
        ("a btrfs filesystem", at(65_600, b"_BHRfS_M")),
        (
            "a GPT partition table",
            at(512, b"EFI PART") || at(4096, b"EFI PART"),
        ),
        (
            "an LVM physical volume",
            at(512, b"LABELONE") || at(536, b"LVM2 001"),
        ),
        ("a LUKS encrypted volume", at(0, b"LUKS\xba\xbe")),
        (
            "a swap area",
            at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE"),
        ),
        ("an ISO 9660 filesystem", at(32_769, b"CD001")),
        ("a Linux RAID member", at(4096, &[0xfc, 0x4e, 0x2b, 0xa9])),
        ("a FAT/vfat filesystem", at(54, b"FAT") || at(82, b"FAT32")),
        ("a DOS partition table", at(510, &[0x55, 0xAA])),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, hit)| *hit) {
        return Some((*what).to_owned());
    }
    head.iter().position(|&b| b != 0).map(|pos| {
        format!("data with no recognised signature (first non-zero byte at offset {pos})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock whose CRC is valid but whose device size is absurd is refused, without
    /// overflowing on the way.
    #[test]
    fn an_absurd_device_size_is_inconsistent_not_an_overflow() {
        let sb = Superblock {
            pool_uuid: [1; 16],
            disk_uuid: [2; 16],
            node_id: "n".into(),
            created_at: 1,
            layout: Layout::for_device(MIN_DEVICE_BYTES).unwrap(),
            version: FORMAT_VERSION,
        };
        for size in [u64::MAX, u64::MAX - BLOCK, MAX_DEVICE_BYTES + EXTENT] {
            let mut b = sb.encode();
            put_u64(&mut b, 56, size);
            let crc = crc32c::crc32c(&b[..BLOCK as usize - 4]);
            put_u32(&mut b, BLOCK as usize - 4, crc);
            assert!(
                matches!(Superblock::decode(&b), Err(FormatError::Inconsistent(_))),
                "{size}"
            );
        }
        assert!(matches!(
            Layout::for_device(u64::MAX),
            Err(FormatError::TooLarge(_))
        ));
    }

    #[test]
    fn layout_fits_and_is_aligned() {
        for size in [MIN_DEVICE_BYTES, 256 << 20, (10 << 30) + 12_345, 1 << 40] {
            let l = Layout::for_device(size).unwrap();
            assert_eq!(l.data_offset % EXTENT, 0);
            assert!(l.data_offset + l.capacity_bytes() + BLOCK <= l.device_bytes);
            assert!(l.csum_bytes >= u64::from(l.n_extents) * CSUM_BYTES_PER_EXTENT);
            assert!(
                l.header_pages as u64 * BLOCK
                    >= HEADER_FIXED_BYTES + u64::from(l.body_pages) * 4 + 4
            );
            // Overhead stays small.
            assert!(
                l.capacity_bytes() * 100 / l.device_bytes >= 90,
                "{size}: {l:?}"
            );
        }
        assert!(matches!(
            Layout::for_device(MIN_DEVICE_BYTES - 1),
            Err(FormatError::TooSmall(_))
        ));
    }

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            pool_uuid: [1; 16],
            disk_uuid: [2; 16],
            node_id: "node-a".into(),
            created_at: 42,
            layout: Layout::for_device(1 << 30).unwrap(),
            version: FORMAT_VERSION,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        for i in [0usize, 9, 60, 200, 4095] {
            b[i] ^= 0x40;
            assert!(Superblock::decode(&b).is_err(), "flip at {i} accepted");
            b[i] ^= 0x40;
        }
        assert_eq!(detect_foreign(&b).as_deref(), Some("a Ballast pool"));
    }

    proptest::proptest! {
        /// Arbitrary bytes, or a valid superblock with arbitrary bytes spliced in, never
        /// panic the decoder, and anything it accepts re-encodes to the same block.
        #[test]
        fn decode_never_panics(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4200), at in 0usize..4096) {
            let _ = Superblock::decode(&junk);
            let sb = Superblock {
                pool_uuid: [3; 16],
                disk_uuid: [4; 16],
                node_id: "n".into(),
                created_at: 1,
                layout: Layout::for_device(256 << 20).unwrap(),
                version: FORMAT_VERSION,
            };
            let mut b = sb.encode();
            let end = (at + junk.len()).min(b.len());
            b[at..end].copy_from_slice(&junk[..end - at]);
            if let Ok(decoded) = Superblock::decode(&b) {
                proptest::prop_assert_eq!(decoded.encode(), b);
            }
            let _ = detect_foreign(&junk);
        }
    }

    #[test]
    fn foreign_signatures() {
        let mut head = vec![0u8; 1 << 20];
        assert_eq!(detect_foreign(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(
            detect_foreign(&head).as_deref(),
            Some("an ext2/3/4 filesystem")
        );
        let mut head = vec![0u8; 1 << 20];
        head[700_000] = 1;
        assert!(detect_foreign(&head).unwrap().contains("700000"));
    }
}
