//! Sigstore bundles (v0.3, `application/vnd.dev.sigstore.bundle.v0.3+json`) in the proto3 JSON
//! form of `dev.sigstore.bundle.v1.Bundle` from sigstore/protobuf-specs: bytes as base64,
//! 64-bit integers as strings, camelCase names.
//!
//! What meshsign puts in one:
//! - `verificationMaterial.publicKey.hint`: `<region>/<environment>/<alias@vN>` — the key itself
//!   is pinned by the verifier (`meshsign verification-material`), as Sigstore's public-key
//!   bundles intend;
//! - `messageSignature` (digest and signature over the artifact) or `dsseEnvelope`;
//! - one `tlogEntries` item: the signature's entry in the site's transparency log
//!   ([`crate::rekor`]): `canonicalizedBody` a `hashedrekord` (or `dsse`) `0.0.1` body,
//!   `inclusionPromise` its signed entry timestamp, and — once a checkpoint covers it —
//!   `inclusionProof` with the signed checkpoint; `logId.keyId` is SHA-256 of the audit key's
//!   SPKI (the site's audit key signs the log).
//!
//! A bundle written as the site answers carries the promise only: it is a v0.1 bundle
//! ([`MEDIA_TYPE_V01`]), which Sigstore verifiers accept with a SET alone, while v0.3 requires
//! an inclusion proof. Adding the proof ([`Bundle::add_proof`]) makes it v0.3 ([`MEDIA_TYPE`]).
//! Bundles of earlier meshsign versions carry the audit entry itself (kind
//! [`ENTRY_KIND`]); they are still read.

use crate::attest::Envelope;
use crate::receipt::Receipt;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::VerifyError;

/// The bundle media type (v0.3: every log entry has an inclusion proof).
pub const MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The v0.1 media type: log entries with a signed entry timestamp (SET), proof optional.
pub const MEDIA_TYPE_V01: &str = "application/vnd.dev.sigstore.bundle+json;version=0.1";
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
    /// `SHA2_256`, or `SHA2_384` for a P-384 key's message.
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
    /// The signed entry timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion_promise: Option<InclusionPromise>,
    /// The Merkle proof and the signed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion_proof: Option<InclusionProof>,
    /// Base64 of the body's canonical JSON.
    pub canonicalized_body: String,
}

/// `dev.sigstore.rekor.v1.InclusionPromise`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InclusionPromise {
    /// Base64 SET (DER signature).
    pub signed_entry_timestamp: String,
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
            inclusion_promise: None,
            inclusion_proof: Some(InclusionProof {
                log_index: r.log_index.to_string(),
                root_hash: B64.encode(root),
                tree_size: r.tree_size.to_string(),
                hashes,
                checkpoint: Checkpoint {
                    envelope: r.checkpoint.clone(),
                },
            }),
            canonicalized_body: B64.encode(&entry),
        })
    }

    /// A transparency-log entry as the site returned it (the SET, no proof yet).
    pub fn from_log_entry(e: &crate::rekor::LogEntry, log_id: &[u8]) -> Result<Self, VerifyError> {
        let facts =
            crate::rekor::body_facts(&e.body).map_err(|x| VerifyError::Failed(x.to_string()))?;
        Ok(Self::from_checked(e, log_id, facts.kind))
    }

    /// [`TlogEntry::from_log_entry`] for a body already read (`kind` from its facts).
    pub fn from_checked(e: &crate::rekor::LogEntry, log_id: &[u8], kind: String) -> Self {
        Self {
            log_index: e.log_index.to_string(),
            log_id: LogId {
                key_id: B64.encode(log_id),
            },
            kind_version: KindVersion {
                kind,
                version: "0.0.1".into(),
            },
            integrated_time: e.integrated_time.to_string(),
            inclusion_promise: Some(InclusionPromise {
                signed_entry_timestamp: B64.encode(&e.set),
            }),
            inclusion_proof: None,
            canonicalized_body: B64.encode(&e.body),
        }
    }

    /// The entry as the site returned it, if it is a transparency-log entry with a SET.
    pub fn log_entry(&self) -> Result<crate::rekor::LogEntry, VerifyError> {
        let bad = |m: &str| VerifyError::Failed(format!("bundle tlog entry: {m}"));
        Ok(crate::rekor::LogEntry {
            log_index: self.log_index.parse().map_err(|_| bad("logIndex"))?,
            integrated_time: self
                .integrated_time
                .parse()
                .map_err(|_| bad("integratedTime"))?,
            body: B64
                .decode(&self.canonicalized_body)
                .map_err(|_| bad("canonicalizedBody is not base64"))?,
            set: match &self.inclusion_promise {
                Some(p) => B64
                    .decode(&p.signed_entry_timestamp)
                    .map_err(|_| bad("signedEntryTimestamp is not base64"))?,
                None => Vec::new(),
            },
        })
    }

    /// Whether this is an entry of the site's transparency log (not an audit entry).
    pub fn is_transparency(&self) -> bool {
        self.kind_version.kind != ENTRY_KIND
    }

    /// Checks the entry with the log (audit) key: the SET if there is one, the inclusion
    /// proof if there is one (to `checkpoint` instead of the bundle's, if given), and that at
    /// least one of them is there. Returns the body's facts (what was signed, by which key)
    /// and whether a proof was checked.
    pub fn verify_transparency(
        &self,
        log_key: &p256::ecdsa::VerifyingKey,
        checkpoint: Option<&str>,
    ) -> Result<(crate::rekor::BodyFacts, bool), VerifyError> {
        let fail = |m: String| VerifyError::Failed(format!("bundle tlog entry: {m}"));
        let e = self.log_entry()?;
        let facts = crate::rekor::body_facts(&e.body).map_err(|x| fail(x.to_string()))?;
        if (facts.kind.as_str(), self.kind_version.version.as_str())
            != (self.kind_version.kind.as_str(), "0.0.1")
        {
            return Err(fail("kindVersion does not match the body".into()));
        }
        if self.inclusion_promise.is_none() && self.inclusion_proof.is_none() {
            return Err(fail(
                "neither a signed entry timestamp nor an inclusion proof".into(),
            ));
        }
        if self.inclusion_promise.is_some() {
            e.verify_set(log_key).map_err(|x| fail(x.to_string()))?;
        }
        let Some(p) = &self.inclusion_proof else {
            return Ok((facts, false));
        };
        if p.log_index != self.log_index {
            return Err(fail("the proof is for another index".into()));
        }
        let note = checkpoint.unwrap_or(&p.checkpoint.envelope);
        let head = crate::note::open(note, log_key, None).map_err(|x| fail(x.to_string()))?;
        if checkpoint.is_none() && B64.decode(&p.root_hash).ok().as_deref() != Some(&head.root[..])
        {
            return Err(fail(
                "the proof's rootHash is not the checkpoint's root".into(),
            ));
        }
        let size: u64 = p.tree_size.parse().map_err(|_| fail("treeSize".into()))?;
        if head.size != size {
            return Err(fail(format!(
                "the proof is for a log of {size} entries, the checkpoint for {}",
                head.size
            )));
        }
        let hashes = p
            .hashes
            .iter()
            .map(|h| {
                B64.decode(h)
                    .ok()
                    .and_then(|v| crate::merkle::Hash::try_from(v).ok())
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fail("a proof hash is not 32 bytes of base64".into()))?;
        crate::merkle::verify_inclusion(
            e.log_index,
            size,
            &crate::merkle::leaf_hash(&e.body),
            &hashes,
            &head.root,
        )
        .map_err(|x| fail(x.to_string()))?;
        Ok((facts, true))
    }

    /// The receipt this entry carries (checked by [`Receipt::verify`], not here).
    pub fn to_receipt(&self) -> Result<Receipt, VerifyError> {
        let bad = |m: &str| VerifyError::Failed(format!("bundle tlog entry: {m}"));
        if self.kind_version.kind != ENTRY_KIND {
            return Err(bad("not a meshsign audit entry"));
        }
        let p = self
            .inclusion_proof
            .as_ref()
            .ok_or_else(|| bad("an audit entry without its proof"))?;
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
    /// A bundle of a message signature over `digest`, a `hash` hash (SHA-384 for a P-384
    /// key's message: what it signed, so a Sigstore verifier hashes the artifact the same way).
    pub fn message(
        hint: String,
        (hash, digest): (crate::rekor::BodyHash, &[u8]),
        signature: &[u8],
        tlog: Option<TlogEntry>,
    ) -> Self {
        let proven = tlog.as_ref().is_some_and(|t| t.inclusion_proof.is_some());
        Self {
            media_type: if proven { MEDIA_TYPE } else { MEDIA_TYPE_V01 }.into(),
            verification_material: VerificationMaterial {
                public_key: PublicKeyIdentifier { hint },
                tlog_entries: tlog.into_iter().collect(),
            },
            message_signature: Some(MessageSignature {
                message_digest: HashOutput {
                    algorithm: hash.sigstore().into(),
                    digest: B64.encode(digest),
                },
                signature: B64.encode(signature),
            }),
            dsse_envelope: None,
        }
    }

    /// A bundle of a DSSE envelope (an attestation) and its log entry.
    pub fn dsse(hint: String, envelope: Envelope, tlog: TlogEntry) -> Self {
        let proven = tlog.inclusion_proof.is_some();
        Self {
            media_type: if proven { MEDIA_TYPE } else { MEDIA_TYPE_V01 }.into(),
            verification_material: VerificationMaterial {
                public_key: PublicKeyIdentifier { hint },
                tlog_entries: vec![tlog],
            },
            message_signature: None,
            dsse_envelope: Some(envelope),
        }
    }

    /// Checks that the (first) log entry is of this bundle's content: for a message
    /// signature, its digest and signature; for a DSSE envelope, its payload's SHA-256 and its
    /// one signature; and in both, the key `spki`. Returns the entry's facts.
    pub fn entry_binds(&self, spki: &[u8]) -> Result<crate::rekor::BodyFacts, VerifyError> {
        use sha2::Digest as _;
        let fail = |m: &str| VerifyError::Failed(format!("bundle tlog entry: {m}"));
        let t = self
            .verification_material
            .tlog_entries
            .first()
            .ok_or_else(|| fail("the bundle has no log entry"))?;
        let facts =
            crate::rekor::body_facts(&t.log_entry()?.body).map_err(|e| fail(&e.to_string()))?;
        let (digest, sig) = match (&self.message_signature, &self.dsse_envelope) {
            (Some(ms), None) => (
                B64.decode(&ms.message_digest.digest).unwrap_or_default(),
                B64.decode(&ms.signature).unwrap_or_default(),
            ),
            (None, Some(env)) => {
                let payload = env.payload_bytes().map_err(|e| fail(&e.to_string()))?;
                let sigs = env.signature_bytes();
                let [one] = sigs.as_slice() else {
                    return Err(fail("the envelope must have exactly one signature"));
                };
                (sha2::Sha256::digest(&payload).to_vec(), one.clone())
            }
            _ => {
                return Err(fail(
                    "the bundle must have a messageSignature or a dsseEnvelope",
                ));
            }
        };
        if facts.digest != digest {
            return Err(fail("the body is of another digest"));
        }
        if let Some(ms) = &self.message_signature
            && crate::rekor::BodyHash::from_sigstore(&ms.message_digest.algorithm)
                != Some(facts.hash)
        {
            return Err(fail(
                "the body names another hash algorithm than the bundle",
            ));
        }
        if facts.signature != sig {
            return Err(fail("the body is of another signature"));
        }
        if facts.spki_der != spki {
            return Err(fail("the body names another key than the pinned one"));
        }
        Ok(facts)
    }

    /// The receipt of the bundle's (first) log entry, if it is an audit entry (a bundle of
    /// an earlier meshsign version).
    pub fn receipt(&self) -> Result<Option<Receipt>, VerifyError> {
        self.verification_material
            .tlog_entries
            .first()
            .filter(|t| !t.is_transparency())
            .map(TlogEntry::to_receipt)
            .transpose()
    }

    /// Adds the inclusion proof of the (first) log entry; with every entry proven, the bundle
    /// becomes v0.3.
    pub fn add_proof(
        &mut self,
        tree_size: u64,
        hashes: &[crate::merkle::Hash],
        checkpoint: &str,
    ) -> Result<(), VerifyError> {
        let root = root_of_note(checkpoint)?;
        let t = self
            .verification_material
            .tlog_entries
            .first_mut()
            .ok_or_else(|| VerifyError::Failed("the bundle has no log entry".into()))?;
        t.inclusion_proof = Some(InclusionProof {
            log_index: t.log_index.clone(),
            root_hash: B64.encode(root),
            tree_size: tree_size.to_string(),
            hashes: hashes.iter().map(|h| B64.encode(h)).collect(),
            checkpoint: Checkpoint {
                envelope: checkpoint.to_string(),
            },
        });
        if self
            .verification_material
            .tlog_entries
            .iter()
            .all(|t| t.inclusion_proof.is_some())
        {
            self.media_type = MEDIA_TYPE.into();
        }
        Ok(())
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
            inclusion_promise: None,
            inclusion_proof: Some(InclusionProof {
                log_index: "2".into(),
                root_hash: B64.encode([1u8; 32]),
                tree_size: "5".into(),
                hashes: vec![B64.encode([0xab; 32]), B64.encode([0xcd; 32])],
                checkpoint: Checkpoint {
                    envelope: r.checkpoint.clone(),
                },
            }),
            canonicalized_body: r.entry.clone(),
        };
        assert_eq!(t.to_receipt()?, r);
        t.kind_version.kind = "hashedrekord".into();
        assert!(t.to_receipt().is_err());
        Ok(())
    }
}
