//! What offline verifiers read from bundles anyone can hand them: checkpoint notes, receipts
//! (entry + inclusion proof), DSSE envelopes, distrust lists; and the RFC 9162 inclusion check
//! itself on arbitrary positions and proofs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshsign_evidence::{attest, distrust, merkle, note, receipt};

fuzz_target!(|data: &[u8]| {
    // The generator point: any valid key (signatures will not verify; the parsers and checks
    // before and after must refuse, never panic).
    let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(&[
        4, 107, 23, 209, 242, 225, 44, 66, 71, 248, 188, 230, 229, 99, 164, 64, 242, 119, 3, 125,
        129, 45, 235, 51, 160, 244, 161, 57, 69, 216, 152, 194, 150, 79, 227, 66, 226, 254, 26,
        127, 155, 142, 231, 235, 74, 124, 15, 158, 22, 43, 206, 51, 87, 107, 49, 94, 206, 203,
        182, 64, 104, 55, 191, 81, 245,
    ]) else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = note::open(text, &key, None);
        if let Ok(r) = serde_json::from_str::<receipt::Receipt>(text) {
            let _ = r.verify(&key, None);
            let _ = r.verify(&key, Some(text));
        }
        if let Ok(e) = serde_json::from_str::<attest::Envelope>(text) {
            let _ = e.pae();
            let _ = e.signature_bytes();
            if let Ok(p) = e.payload_bytes() {
                if let Ok(s) = serde_json::from_slice::<attest::Statement>(&p) {
                    let _ = attest::SiteFacts::from_statement(&s).map(|f| f.binding());
                }
                let _ = serde_json::from_slice::<distrust::DistrustList>(&p);
            }
        }
    }
    // As an inclusion proof: index, size, leaf, then hashes; the root is the last hash.
    if data.len() >= 16 + 32 {
        let index = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
        let hashes: Vec<merkle::Hash> = data[16..]
            .chunks_exact(32)
            .filter_map(|c| c.try_into().ok())
            .collect();
        if let Some((leaf, rest)) = hashes.split_first() {
            let root = rest.last().copied().unwrap_or(*leaf);
            let _ = merkle::verify_inclusion(index, size, leaf, rest, &root);
            let _ = merkle::proof_len(index, size);
        }
    }
});
