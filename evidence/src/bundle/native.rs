//! The native bundle `FILE.sig.json` that `meshsign sign` writes next to each file.

use serde::{Deserialize, Serialize};

/// What `meshsign sign` writes next to each file as `FILE.sig.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigBundle {
    /// File name as signed.
    pub artifact: String,
    /// SHA-256 of the file, hex.
    pub digest_sha256: String,
    /// Signature, base64 (DER for ECDSA); the same bytes as `FILE.sig`.
    pub signature: String,
    /// `alias@vN`.
    pub key_id: String,
    /// e.g. `ecdsa-p256-sha256`.
    pub algorithm: String,
    /// The signing key, SPKI PEM.
    pub public_key_pem: String,
    /// Audit record id at the site.
    pub audit_id: String,
    /// Receipt: the audit entry's seq.
    #[serde(default)]
    pub audit_seq: u64,
    /// Receipt: the audit entry's hash.
    #[serde(default)]
    pub audit_hash: String,
    /// Site region.
    pub region: String,
    /// Partition.
    pub environment: String,
    /// RFC 3339.
    pub signed_at: String,
    /// The key's certificate chain, PEM, if it has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_chain_pem: Vec<String>,
    /// The audit receipt a third party can check: the entry, its inclusion proof and the
    /// signed checkpoint (`meshsign verify --receipt --audit-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<crate::receipt::Receipt>,
}
