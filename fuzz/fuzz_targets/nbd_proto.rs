//! The NBD handshake and transmission parsers on any bytes: an error, never a panic.
#![no_main]

use frontends::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode_client_flags(data);
    let _ = proto::decode_option_header(data);
    let _ = proto::decode_info_request(data);
    let _ = proto::decode_export_name(data);
    let _ = proto::decode_request(data);
});
