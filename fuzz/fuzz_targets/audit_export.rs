//! The audit export parser and the offline verifier (chain, seqs, checkpoint signatures).
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshsign_evidence::audit::{Start, parse_export, verify_export_from};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(lines) = parse_export(text) else {
        return;
    };
    // A fixed key: the generator point (any valid key; signatures will not verify, which is
    // the point — the verifier must refuse, never panic).
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&[
        4, 107, 23, 209, 242, 225, 44, 66, 71, 248, 188, 230, 229, 99, 164, 64, 242, 119, 3, 125,
        129, 45, 235, 51, 160, 244, 161, 57, 69, 216, 152, 194, 150, 79, 227, 66, 226, 254, 26,
        127, 155, 142, 231, 235, 74, 124, 15, 158, 22, 43, 206, 51, 87, 107, 49, 94, 206, 203,
        182, 64, 104, 55, 191, 81, 245,
    ]);
    if let Ok(key) = key {
        let _ = verify_export_from(&lines, &key, Start::Genesis);
        let _ = verify_export_from(&lines, &key, Start::GenesisOrCheckpoint);
    }
});
