//! The strict parser of the CMS signed attributes of an Apple code signature.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshsign_server::sign::apple_cms::check(data, 1_800_000_000);
});
