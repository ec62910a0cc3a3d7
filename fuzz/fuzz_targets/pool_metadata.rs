//! The pool's on-disk parsers on any bytes (superblock and journal CRCs are skipped in fuzzing
//! builds): a superblock copy, a metadata body for the layout of a device size taken from the
//! input, and the journal replayed from the same bytes onto that body. An error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume::pool::format::{Layout, Superblock};
use volume::pool::journal;
use volume::pool::metadata::{JournalMark, MetaState};

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    if data.len() >= 8 {
        let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        // Small devices only: the body of a huge layout is megabytes of input.
        if let Ok(layout) = Layout::for_device(size % (512 << 20)) {
            let body = layout.body_pages as usize * 4096;
            let mut b = data[8..].to_vec();
            b.resize(body, 0);
            let mut meta =
                MetaState::decode_body(&layout, &b).unwrap_or_else(|_| MetaState::empty(&layout));
            let mut csums = vec![0u32; layout.n_extents as usize * 256];
            let _ = journal::replay(
                &layout,
                &[0; 16],
                &data[8..],
                JournalMark::default(),
                &mut meta,
                &mut csums,
            );
            let _ = meta.check(&layout);
        }
    }
});
