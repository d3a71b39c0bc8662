//! meshsign's evidence: the formats a signature is judged by, and their offline verification —
//! with no transport. Whoever only wants to check a receipt, a bundle or a distrust list needs
//! this crate and not the gRPC contract (`meshsign-proto`): `cargo tree -p meshsign-evidence -e
//! normal` shows no tonic and no tokio (a test in `tests/` checks it).
//!
//! - Identity: [`identity`] (the runner SPIFFE ID and job-claims extension), [`der`], [`files`]
//!   (atomic writes, random ids), [`sig`] (signature checks with a recorded public key).
//! - The log: [`audit`] (entries, the hash chain, exports and their verifier), [`merkle`]
//!   (RFC 9162 tree and proofs), [`note`] (C2SP signed notes), [`receipt`].
//! - The transparency log: [`rekor`] (Rekor-shaped bodies and signed entry timestamps).
//! - Statements: [`attest`] (DSSE / in-toto), [`distrust`] (signed distrust lists).

pub mod attest;
pub mod audit;
pub mod bundle;
pub mod der;
pub mod device;
pub mod distrust;
pub mod error;
pub mod files;
pub mod identity;
pub mod merkle;
pub mod note;
pub mod par;
pub mod reason;
pub mod receipt;
pub mod rekor;
pub mod sig;
pub mod verify;

/// Appends `bytes` to `out` as lower-case hex (what `hex::encode` gives, without a String of
/// its own: for fields built on the Sign path).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// Encodes DER as PEM with the given label (64-column base64 lines), in one allocation.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64_len = der.len().div_ceil(3) * 4;
    let mut out = String::with_capacity(2 * (label.len() + 17) + b64_len + b64_len / 64 + 1);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // 48 DER bytes are one 64-column line of base64.
    for chunk in der.chunks(48) {
        base64::engine::general_purpose::STANDARD.encode_string(chunk, &mut out);
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}
