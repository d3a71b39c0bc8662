//! The CSR path of enrollment: parse, self-signature, key checks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshsign_server::enroll::verify_csr(data);
});
