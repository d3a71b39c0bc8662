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

/// Encodes DER as PEM with the given label (64-column base64 lines).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
