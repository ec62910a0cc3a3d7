//! Property tests of the wire protocol: every message round-trips, and the decoder neither
//! panics nor accepts a damaged frame.

use proptest::prelude::*;
use replication::wire::{
    self, decode_request, decode_response, encode_request, encode_response, ErrCode, Request,
    Response, WireError, HEADER_LEN,
};
use volume::io::IoBuf;

fn name() -> impl Strategy<Value = String> {
    // Any UTF-8, not only valid volume names: the codec does not validate names.
    prop_oneof!["[a-z0-9-]{0,63}", ".{0,40}"]
}

fn data() -> impl Strategy<Value = IoBuf> {
    prop::collection::vec(any::<u8>(), 0..9000).prop_map(|v| IoBuf::from_slice(&v))
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        name().prop_map(|node| Request::Hello { node }),
        (name(), any::<u64>()).prop_map(|(volume, epoch)| Request::Register { volume, epoch }),
        (name(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(volume, epoch, offset, len)| Request::Read {
                volume,
                epoch,
                offset,
                len
            }
        ),
        (
            name(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            data()
        )
            .prop_map(
                |(volume, epoch, offset, fua, generation, data)| Request::Write {
                    volume,
                    epoch,
                    offset,
                    fua,
                    generation,
                    data
                }
            ),
        (name(), any::<u64>()).prop_map(|(volume, epoch)| Request::Flush { volume, epoch }),
        (name(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(volume, epoch, offset, len)| Request::Discard {
                volume,
                epoch,
                offset,
                len
            }
        ),
        (name(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(volume, epoch, offset, len)| Request::WriteZeroes {
                volume,
                epoch,
                offset,
                len
            }
        ),
        (name(), any::<u64>()).prop_map(|(volume, size)| Request::Create { volume, size }),
        name().prop_map(|volume| Request::Delete { volume }),
        (name(), any::<u64>(), any::<bool>()).prop_map(|(volume, size, dry_run)| {
            Request::Resize {
                volume,
                size,
                dry_run,
            }
        }),
        name().prop_map(|volume| Request::Stat { volume }),
        (name(), any::<u64>(), any::<u64>()).prop_map(|(volume, epoch, from)| {
            Request::Generations {
                volume,
                epoch,
                from,
            }
        }),
        (name(), any::<u64>(), name()).prop_map(|(volume, epoch, name)| Request::Snapshot {
            volume,
            epoch,
            name,
        }),
        (name(), any::<u64>(), name()).prop_map(|(volume, epoch, snapshot)| Request::Revert {
            volume,
            epoch,
            snapshot,
        }),
        (name(), name(), any::<u64>()).prop_map(|(snapshot, volume, size)| Request::Clone {
            snapshot,
            volume,
            size,
        }),
        name().prop_map(|name| Request::DeleteSnapshot { name }),
        (name(), name()).prop_map(|(volume, name)| Request::TakeSnapshot { volume, name }),
        (name(), any::<u64>()).prop_map(|(volume, epoch)| Request::Chain { volume, epoch }),
        (
            name(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(volume, epoch, chain_epoch, link, extent)| Request::ReadLink {
                    volume,
                    epoch,
                    chain_epoch,
                    link,
                    extent,
                }
            ),
    ]
}

fn code() -> impl Strategy<Value = ErrCode> {
    prop::sample::select(ErrCode::ALL.to_vec())
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ok),
        data().prop_map(Response::Data),
        (any::<u64>(), any::<u64>())
            .prop_map(|(size, allocated)| Response::Stat { size, allocated }),
        any::<u64>().prop_map(|epoch| Response::Stale { epoch }),
        (
            any::<u64>(),
            prop::collection::vec((any::<u64>(), any::<u64>()), 0..300),
            prop::option::of(0..u64::MAX),
        )
            .prop_map(|(extent_size, extents, next)| Response::Generations {
                extent_size,
                extents,
                next,
            }),
        (code(), ".{0,80}").prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

/// Either a request frame or a response frame, for the mutation tests.
fn frame() -> impl Strategy<Value = (bool, Vec<u8>)> {
    prop_oneof![
        (any::<u64>(), request()).prop_map(|(id, r)| {
            let mut v = Vec::new();
            encode_request(id, &r, &mut v);
            (true, v)
        }),
        (any::<u64>(), response()).prop_map(|(id, r)| {
            let mut v = Vec::new();
            encode_response(id, &r, &mut v);
            (false, v)
        }),
    ]
}

/// Decode as the right direction, reporting only whether a message came out.
fn decodes(is_request: bool, buf: &[u8]) -> Result<bool, WireError> {
    if is_request {
        decode_request(buf).map(|o| o.is_some())
    } else {
        decode_response(buf).map(|o| o.is_some())
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip these bits (indices taken modulo the frame's bit length).
    Flip(Vec<usize>),
    /// Overwrite one byte with a different value.
    Byte(usize, u8),
    /// Keep only this many bytes (modulo the frame length).
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec(any::<usize>(), 1..4).prop_map(Mutation::Flip),
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Byte(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// Apply `m`; returns `false` if it turned out not to change the frame.
fn apply(m: &Mutation, frame: &mut Vec<u8>) -> bool {
    let before = frame.clone();
    match m {
        Mutation::Flip(bits) => {
            for b in bits {
                let b = b % (frame.len() * 8);
                frame[b / 8] ^= 1 << (b % 8);
            }
        }
        Mutation::Byte(i, x) => {
            let i = i % frame.len();
            frame[i] ^= x;
        }
        Mutation::Truncate(n) => frame.truncate(n % frame.len()),
    }
    *frame != before
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn requests_round_trip(id in any::<u64>(), req in request(), extra in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut buf = Vec::new();
        encode_request(id, &req, &mut buf);
        let len = buf.len();
        buf.extend_from_slice(&extra);
        let (got_id, got, used) = decode_request(&buf).unwrap().expect("a whole frame");
        prop_assert_eq!(got_id, id);
        prop_assert_eq!(used, len);
        // Encoding is injective, so equal encodings mean equal messages.
        let mut again = Vec::new();
        encode_request(id, &got, &mut again);
        prop_assert_eq!(&again[..], &buf[..len]);
        if let Request::Write { data, .. } = &got {
            prop_assert_eq!(data.as_ptr() as usize % volume::io::buf::IO_ALIGN, 0);
        }
        // Every strict prefix needs more bytes.
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, len - 1] {
            if cut < len {
                prop_assert!(decode_request(&buf[..cut]).unwrap().is_none());
            }
        }
    }

    #[test]
    fn responses_round_trip(id in any::<u64>(), resp in response()) {
        let mut buf = Vec::new();
        encode_response(id, &resp, &mut buf);
        let (got_id, got, used) = decode_response(&buf).unwrap().expect("a whole frame");
        prop_assert_eq!(got_id, id);
        prop_assert_eq!(used, buf.len());
        let mut again = Vec::new();
        encode_response(id, &got, &mut again);
        prop_assert_eq!(again, buf);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 5 {
            // Get past the magic and version checks to exercise the rest of the decoder.
            bytes[..4].copy_from_slice(&wire::MAGIC);
            bytes[4] = wire::VERSION;
        }
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
    }

    #[test]
    fn damaged_frames_are_refused((is_request, frame) in frame(), m in mutation()) {
        let mut damaged = frame;
        prop_assume!(apply(&m, &mut damaged));
        // Refused, or waiting for bytes that (for a truncation) never come: never accepted.
        prop_assert!(
            !matches!(decodes(is_request, &damaged), Ok(true)),
            "damaged frame accepted after {:?}",
            m
        );
    }
}

#[tokio::test]
async fn async_reader_rejects_oversized_and_corrupt_frames() {
    let mut frame = Vec::new();
    encode_response(
        3,
        &Response::Data(IoBuf::from_slice(&[1; 4096])),
        &mut frame,
    );
    let mut corrupt = frame.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let mut r = &corrupt[..];
    assert!(matches!(
        wire::read_frame::<Response, _>(&mut r).await,
        Err(WireError::Checksum { .. })
    ));

    let mut huge = frame.clone();
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut r = &huge[..];
    assert!(matches!(
        wire::read_frame::<Response, _>(&mut r).await,
        Err(WireError::TooLong(_))
    ));

    let mut r = &frame[..frame.len() - 1];
    assert!(matches!(
        wire::read_frame::<Response, _>(&mut r).await,
        Err(WireError::UnexpectedEof)
    ));
}
