//! Journal recovery: whatever a crash (or an attacker with the disk) leaves in the journal file
//! is parsed into entries or refused by name — never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshsign_server::audit::journal::parse(std::path::Path::new("audit.journal"), data);
});
