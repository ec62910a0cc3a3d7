//! The replica protocol's frame decoders on any bytes (the CRC check is skipped in fuzzing
//! builds, so bodies are reached): an error, never a panic; what decodes encodes back to a
//! frame that decodes the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replication::wire::{decode_request, decode_response, encode_request, encode_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((id, req, used))) = decode_request(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        encode_request(id, &req, &mut again);
        let (id2, _, used2) = decode_request(&again)
            .expect("an encoded request decodes")
            .expect("whole");
        assert_eq!((id2, used2), (id, again.len()));
    }
    if let Ok(Some((id, resp, used))) = decode_response(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        encode_response(id, &resp, &mut again);
        let (id2, _, used2) = decode_response(&again)
            .expect("an encoded response decodes")
            .expect("whole");
        assert_eq!((id2, used2), (id, again.len()));
    }
});
