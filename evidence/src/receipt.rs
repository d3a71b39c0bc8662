//! Receipts a third party can check: an audit entry, its inclusion proof in the log's Merkle
//! tree ([`crate::merkle`]) and a checkpoint signed by the audit key ([`crate::note`]). With
//! the audit public key, the receipt alone shows that the site recorded this decision — no
//! export of the log is needed.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::merkle::{self, Hash};

/// An audit entry with its inclusion proof and the checkpoint the proof leads to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Leaf index (= seq − 1).
    pub log_index: u64,
    /// Tree size of the checkpoint.
    pub tree_size: u64,
    /// The proof's hashes, hex, leaf to root.
    pub hashes: Vec<String>,
    /// The checkpoint (C2SP signed note).
    pub checkpoint: String,
    /// The entry's stored bytes (canonical JSON), base64: what the leaf hash covers.
    pub entry: String,
}

/// Why a receipt does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("receipt: {0}")]
pub struct ReceiptError(pub String);

impl Receipt {
    /// The entry's bytes.
    pub fn entry_bytes(&self) -> Result<Vec<u8>, ReceiptError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.entry)
            .map_err(|_| ReceiptError("the entry is not base64".into()))
    }

    /// Verifies the receipt and returns its entry: the entry parses and its hash is its own,
    /// its seq is the leaf's, the checkpoint (`checkpoint`, or the one it carries) is signed
    /// by `audit_key`, and the proof leads from the entry to the checkpoint's root.
    pub fn verify(
        &self,
        audit_key: &p256::ecdsa::VerifyingKey,
        checkpoint: Option<&str>,
    ) -> Result<AuditRecord, ReceiptError> {
        let bad = |m: String| ReceiptError(m);
        let bytes = self.entry_bytes()?;
        if bytes.len() > crate::audit::MAX_ENTRY_BYTES {
            return Err(bad("the entry is longer than any entry can be".into()));
        }
        let entry: AuditRecord = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the entry does not parse: {e}")))?;
        if entry.compute_hash() != entry.hash {
            return Err(bad(format!(
                "entry {}: its hash does not match its content",
                entry.seq
            )));
        }
        if self.log_index.checked_add(1) != Some(entry.seq) {
            return Err(bad(format!(
                "entry {} is not leaf {} (seq = index + 1)",
                entry.seq, self.log_index
            )));
        }
        let note = checkpoint.unwrap_or(&self.checkpoint);
        let head = crate::note::open(note, audit_key, None).map_err(|e| bad(e.to_string()))?;
        if head.size != self.tree_size {
            return Err(bad(format!(
                "the proof is for a tree of {} entries, the checkpoint for {}: fetch a proof \
                 for this checkpoint",
                self.tree_size, head.size
            )));
        }
        let proof = self
            .hashes
            .iter()
            .map(|h| hex::decode(h).ok().and_then(|v| Hash::try_from(v).ok()))
            .collect::<Option<Vec<Hash>>>()
            .ok_or_else(|| bad("a proof hash is not 32 bytes of hex".into()))?;
        merkle::verify_inclusion(
            self.log_index,
            self.tree_size,
            &merkle::leaf_hash(&bytes),
            &proof,
            &head.root,
        )
        .map_err(|e| bad(format!("entry {}: {e}", entry.seq)))?;
        Ok(entry)
    }
}
