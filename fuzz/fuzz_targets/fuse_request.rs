//! FUSE requests of the attach frontend, as the session reads them from `/dev/fuse`: the
//! input is what one `read` returned. It is taken apart as the session does
//! ([`abi::parse_head`] on the first `HEAD` bytes: the header, and a `WRITE`'s
//! `fuse_write_in`), then the body decoded for its opcode ([`Request::decode`]), and a
//! `FALLOCATE` turned into its plan for a device whose size comes from the input. An error,
//! never a panic; and:
//! - a `WRITE` decodes the same through the session's head path and the whole-body decoder,
//!   its payload being what follows the first `HEAD` bytes;
//! - a request that decodes still decodes, to the same thing, with bytes appended (a newer
//!   kernel's longer structs), but for a lookup name without its NUL, a write's payload, a
//!   SETATTR too short to say it sets the size and an INIT too short to carry `flags2`;
//! - a lookup name is a NUL-free prefix of the body;
//! - a `FALLOCATE` plan's range is never empty, made of whole blocks, and inside both the
//!   request and the device.
#![no_main]

use frontends::attach::fuse::abi::{self, Request};
use frontends::attach::fuse::FallocatePlan;
use libfuzzer_sys::fuzz_target;

const BLOCK: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((h, write_in)) = abi::parse_head(&data[..data.len().min(abi::HEAD)]) else {
        assert!(data.len() < abi::IN_HEADER);
        return;
    };
    let body = &data[abi::IN_HEADER..];
    let decoded = Request::decode(&h, body);

    if let Some(write_in) = write_in {
        assert_eq!(
            decoded,
            Ok(Request::Write {
                write_in,
                data: &data[abi::HEAD..],
            })
        );
    } else if h.opcode == abi::op::WRITE {
        assert!(data.len() < abi::HEAD && decoded.is_err());
    }

    let mut longer = body.to_vec();
    longer.extend_from_slice(&[0xa5; 72]);
    match (decoded, Request::decode(&h, &longer)) {
        (Ok(Request::Lookup { name }), Ok(Request::Lookup { name: again })) => {
            assert!(body.starts_with(name) && !name.contains(&0));
            if body.contains(&0) {
                assert_eq!(name, again);
            }
        }
        (
            Ok(Request::Write { write_in, .. }),
            Ok(Request::Write {
                write_in: again, ..
            }),
        ) => {
            assert_eq!(write_in, again);
        }
        // A SETATTR too short to say it sets the size sets nothing (it is answered as a
        // GETATTR), whatever longer one it is the start of.
        (Ok(Request::Setattr { size: None }), Ok(Request::Setattr { .. })) if body.len() < 24 => {}
        // An INIT that ends before `flags2` has none (0), whatever longer one it is the start
        // of; everything else stays.
        (
            Ok(Request::Init {
                minor,
                max_readahead,
                flags,
                flags2: 0,
            }),
            Ok(Request::Init {
                minor: m,
                max_readahead: r,
                flags: f,
                ..
            }),
        ) if body.len() < 20 => assert_eq!((minor, max_readahead, flags), (m, r, f)),
        (Ok(short), Ok(again)) => assert_eq!(short, again),
        (Ok(short), Err(e)) => panic!("{short:?} no longer decodes with more bytes: {e:?}"),
        (Err(_), _) => {}
    }

    if let Ok(Request::Fallocate {
        offset,
        length,
        mode,
        ..
    }) = decoded
    {
        // Any size, aligned or not, from the input.
        let size = h.unique;
        let range = match FallocatePlan::new(offset, length, mode, size) {
            FallocatePlan::Discard { offset, len } | FallocatePlan::Zero { offset, len } => {
                (offset, len)
            }
            FallocatePlan::Nothing | FallocatePlan::Refuse(_) => return,
        };
        let (start, len) = (u128::from(range.0), u128::from(range.1));
        let block = u128::from(BLOCK);
        assert!(len > 0 && start % block == 0 && len % block == 0);
        assert!(start >= u128::from(offset));
        assert!(start + len <= u128::from(offset) + u128::from(length));
        assert!(start + len <= u128::from(size));
    }
});
