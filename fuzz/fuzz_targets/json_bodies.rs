//! Bodies from outside: Docker plugin requests and their `-o` options, CSI storage-class
//! parameters. An error, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<plugin::protocol::CreateRequest>(data) {
        let _ = plugin::CreateOptions::parse(req.opts.unwrap_or_default());
    }
    let _ = serde_json::from_slice::<plugin::protocol::MountRequest>(data);
    if let Ok(params) = serde_json::from_slice::<HashMap<String, String>>(data) {
        let _ = csi::params::parameters(&params);
    }
});
