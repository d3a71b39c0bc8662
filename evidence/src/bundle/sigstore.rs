//! Sigstore bundles (v0.3, `application/vnd.dev.sigstore.bundle.v0.3+json`) in the proto3 JSON
//! form of `dev.sigstore.bundle.v1.Bundle` from sigstore/protobuf-specs: bytes as base64,
//! 64-bit integers as strings, camelCase names.
//!
//! What meshsign puts in one:
//! - `verificationMaterial.publicKey.hint`: `<region>/<environment>/<alias@vN>` — the key itself
//!   is pinned by the verifier (`meshsign verification-material`), as Sigstore's public-key
//!   bundles intend;
//! - `messageSignature` (digest and signature over the artifact) or `dsseEnvelope`;
//! - one `tlogEntries` item: the site's audit log as the transparency log — `canonicalizedBody`
//!   is the audit entry of this signature, `inclusionProof` its Merkle proof with the signed
//!   checkpoint, `logId.keyId` SHA-256 of the audit key's SPKI.

use crate::attest::Envelope;
use crate::receipt::Receipt;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::VerifyError;

/// The bundle media type.
pub const MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// `kindVersion.kind` of a meshsign audit entry.
pub const ENTRY_KIND: &str = "meshsign-audit-entry";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `dev.sigstore.bundle.v1.Bundle`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// [`MEDIA_TYPE`].
    pub media_type: String,
    /// Key hint and log entries.
    pub verification_material: VerificationMaterial,
    /// A signature over an artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_signature: Option<MessageSignature>,
    /// A DSSE envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsse_envelope: Option<Envelope>,
}

/// `VerificationMaterial` (public-key form).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// `PublicKeyIdentifier`.
    pub public_key: PublicKeyIdentifier,
    /// Transparency log entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tlog_entries: Vec<TlogEntry>,
}

/// `dev.sigstore.common.v1.PublicKeyIdentifier`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublicKeyIdentifier {
    /// `<region>/<environment>/<alias@vN>`.
    pub hint: String,
}

/// `dev.sigstore.common.v1.MessageSignature`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MessageSignature {
    /// The artifact's digest.
    pub message_digest: HashOutput,
    /// Base64 signature (DER for ECDSA).
    pub signature: String,
}

/// `dev.sigstore.common.v1.HashOutput`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HashOutput {
    /// `SHA2_256`.
    pub algorithm: String,
    /// Base64 digest.
    pub digest: String,
}

/// `dev.sigstore.rekor.v1.TransparencyLogEntry`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlogEntry {
    /// Leaf index (int64 as a string).
    pub log_index: String,
    /// The log's id.
    pub log_id: LogId,
    /// What the body is.
    pub kind_version: KindVersion,
    /// Unix seconds the entry was written (int64 as a string).
    pub integrated_time: String,
    /// The Merkle proof and the signed checkpoint.
    pub inclusion_proof: InclusionProof,
    /// Base64 of the audit entry's canonical JSON.
    pub canonicalized_body: String,
}

/// `dev.sigstore.common.v1.LogId`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LogId {
    /// Base64 SHA-256 of the audit key's SPKI.
    pub key_id: String,
}

/// `dev.sigstore.rekor.v1.KindVersion`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KindVersion {
    /// [`ENTRY_KIND`].
    pub kind: String,
    /// `1`.
    pub version: String,
}

/// `dev.sigstore.rekor.v1.InclusionProof`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InclusionProof {
    /// Leaf index (int64 as a string).
    pub log_index: String,
    /// Base64 root hash.
    pub root_hash: String,
    /// Tree size (int64 as a string).
    pub tree_size: String,
    /// Base64 hashes, leaf to root.
    pub hashes: Vec<String>,
    /// The signed note.
    pub checkpoint: Checkpoint,
}

/// `dev.sigstore.rekor.v1.Checkpoint`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// The C2SP signed note.
    pub envelope: String,
}

impl TlogEntry {
    /// A receipt as a log entry; `audit_spki` is the audit key (for `logId`).
    pub fn from_receipt(r: &Receipt, audit_spki: &[u8]) -> Result<Self, VerifyError> {
        let entry = r
            .entry_bytes()
            .map_err(|e| VerifyError::Failed(e.to_string()))?;
        let rec: crate::audit::AuditRecord = serde_json::from_slice(&entry)
            .map_err(|e| VerifyError::Failed(format!("receipt entry: {e}")))?;
        let time = crate::attest::parse_rfc3339(&rec.ts).map_err(VerifyError::Failed)?;
        let hashes = r
            .hashes
            .iter()
            .map(|h| hex::decode(h).map(|b| B64.encode(b)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| VerifyError::Failed("receipt hash is not hex".into()))?;
        let root = root_of_note(&r.checkpoint)?;
        Ok(Self {
            log_index: r.log_index.to_string(),
            log_id: LogId {
                key_id: B64.encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    audit_spki,
                )),
            },
            kind_version: KindVersion {
                kind: ENTRY_KIND.into(),
                version: "1".into(),
            },
            integrated_time: time.to_string(),
            inclusion_proof: InclusionProof {
                log_index: r.log_index.to_string(),
                root_hash: B64.encode(root),
                tree_size: r.tree_size.to_string(),
                hashes,
                checkpoint: Checkpoint {
                    envelope: r.checkpoint.clone(),
                },
            },
            canonicalized_body: B64.encode(&entry),
        })
    }

    /// The receipt this entry carries (checked by [`Receipt::verify`], not here).
    pub fn to_receipt(&self) -> Result<Receipt, VerifyError> {
        let bad = |m: &str| VerifyError::Failed(format!("bundle tlog entry: {m}"));
        let p = &self.inclusion_proof;
        if self.kind_version.kind != ENTRY_KIND {
            return Err(bad("not a meshsign audit entry"));
        }
        if p.log_index != self.log_index {
            return Err(bad("the proof is for another index"));
        }
        Ok(Receipt {
            log_index: self.log_index.parse().map_err(|_| bad("logIndex"))?,
            tree_size: p.tree_size.parse().map_err(|_| bad("treeSize"))?,
            hashes: p
                .hashes
                .iter()
                .map(|h| B64.decode(h).map(hex::encode))
                .collect::<Result<_, _>>()
                .map_err(|_| bad("hashes are not base64"))?,
            checkpoint: p.checkpoint.envelope.clone(),
            entry: self.canonicalized_body.clone(),
        })
    }
}

/// The root hash line of a checkpoint note (unverified: for the bundle's `rootHash` copy).
fn root_of_note(note: &str) -> Result<Vec<u8>, VerifyError> {
    note.lines()
        .nth(2)
        .and_then(|l| B64.decode(l).ok())
        .filter(|r| r.len() == 32)
        .ok_or_else(|| VerifyError::Failed("checkpoint has no root hash line".into()))
}

impl Bundle {
    /// A bundle of a message signature.
    pub fn message(
        hint: String,
        digest: &[u8; 32],
        signature: &[u8],
        tlog: Option<TlogEntry>,
    ) -> Self {
        Self {
            media_type: MEDIA_TYPE.into(),
            verification_material: VerificationMaterial {
                public_key: PublicKeyIdentifier { hint },
                tlog_entries: tlog.into_iter().collect(),
            },
            message_signature: Some(MessageSignature {
                message_digest: HashOutput {
                    algorithm: "SHA2_256".into(),
                    digest: B64.encode(digest),
                },
                signature: B64.encode(signature),
            }),
            dsse_envelope: None,
        }
    }

    /// The receipt of the bundle's (first) log entry, if it has one.
    pub fn receipt(&self) -> Result<Option<Receipt>, VerifyError> {
        self.verification_material
            .tlog_entries
            .first()
            .map(TlogEntry::to_receipt)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_survives_the_round_trip_through_a_log_entry() -> Result<(), VerifyError> {
        let entry = br#"{"seq":3}"#;
        let r = Receipt {
            log_index: 2,
            tree_size: 5,
            hashes: vec!["ab".repeat(32), "cd".repeat(32)],
            checkpoint: format!("o\n5\n{}\n\n\u{2014} o AAAA\n", B64.encode([1u8; 32])),
            entry: B64.encode(entry),
        };
        let mut t = TlogEntry {
            log_index: "2".into(),
            log_id: LogId {
                key_id: String::new(),
            },
            kind_version: KindVersion {
                kind: ENTRY_KIND.into(),
                version: "1".into(),
            },
            integrated_time: "0".into(),
            inclusion_proof: InclusionProof {
                log_index: "2".into(),
                root_hash: B64.encode([1u8; 32]),
                tree_size: "5".into(),
                hashes: vec![B64.encode([0xab; 32]), B64.encode([0xcd; 32])],
                checkpoint: Checkpoint {
                    envelope: r.checkpoint.clone(),
                },
            },
            canonicalized_body: r.entry.clone(),
        };
        assert_eq!(t.to_receipt()?, r);
        t.kind_version.kind = "hashedrekord".into();
        assert!(t.to_receipt().is_err());
        Ok(())
    }
}
