//! The audit log: one record per decision, allowed or denied, written to the store and made
//! durable before the response leaves (DESIGN.md "Audit").
//!
//! Records are hash-chained already: `hash = SHA-256(prev_hash_bytes || canonical JSON of the
//! record with an empty "hash")`, where the canonical JSON is serde_json's output of
//! [`AuditRecord`] (fields in declaration order, no whitespace). Signed checkpoints, export and
//! offline verification come with the audit issue.

use std::sync::{Arc, Mutex};

use aws_lc_rs::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;
use crate::store::{Store, StoreError, Tree};

/// One audit record. Inputs appear only as hashes; tokens never, only `jti`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number, from 1, gapless.
    pub seq: u64,
    /// RFC 3339 time of the decision.
    pub ts: String,
    /// Site region.
    pub site_region: String,
    /// RPC name (`Enroll`, `Sign`, `SignBatch`, ...).
    pub rpc: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// `ok`, or the name of the check that failed.
    pub reason: String,
    /// Partition.
    pub environment: String,
    /// CI job id.
    pub job_id: String,
    /// Token id.
    pub jti: String,
    /// Token issuer.
    pub token_issuer: String,
    /// Token subject.
    pub subject: String,
    /// Runner fingerprint.
    pub runner_fingerprint: String,
    /// Runner certificate serial (hex).
    pub cert_serial: String,
    /// Seconds the caller's certificate had left (sign decisions).
    pub ttl_remaining_sec: Option<i64>,
    /// `alias@vN`.
    pub key_id: String,
    /// SHA-256 digest signed (hex); for a batch, SHA-256 over the concatenated digests.
    pub digest: String,
    /// Number of digests signed (1, or the batch size).
    pub items: u32,
    /// Artifact name given by the caller.
    pub artifact: String,
    /// Repository claim.
    pub repository: String,
    /// Ref claim.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Peer address.
    pub peer: String,
    /// Ops identity (SPIFFE ID) for admin actions.
    #[serde(default)]
    pub operator: String,
    /// What an admin action changed, in a few words.
    #[serde(default)]
    pub detail: String,
    /// Hash of the previous record (hex; empty for the first).
    pub prev_hash: String,
    /// This record's hash (hex).
    pub hash: String,
}

impl AuditRecord {
    /// The id returned to callers: `<region>-<seq>`.
    pub fn audit_id(&self) -> String {
        format!("{}-{}", self.site_region, self.seq)
    }

    /// Recomputes this record's hash from its content and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        // Serializing a struct of plain fields cannot fail.
        let json = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut input = hex::decode(&self.prev_hash).unwrap_or_default();
        input.extend_from_slice(&json);
        hex::encode(digest(&SHA256, &input))
    }
}

/// Audit failures. A decision whose record cannot be written is not returned.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store refused the write or the flush.
    #[error("audit write failed: {0}")]
    Store(#[from] StoreError),
    /// The flush task did not complete.
    #[error("audit flush task failed")]
    Join,
}

struct Head {
    seq: u64,
    hash: String,
}

/// Appends records and makes them durable.
#[derive(Clone)]
pub struct AuditLog {
    store: Store,
    clock: SharedClock,
    region: String,
    head: Arc<Mutex<Head>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log, continuing the chain from the last stored record.
    pub fn open(store: Store, clock: SharedClock, region: &str) -> Result<Self, AuditError> {
        let head = match store.kv().last(Tree::Audit)? {
            Some((_, v)) => {
                let last: AuditRecord =
                    serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                        tree: "audit",
                        message: e.to_string(),
                    })?;
                Head {
                    seq: last.seq,
                    hash: last.hash,
                }
            }
            None => Head {
                seq: 0,
                hash: String::new(),
            },
        };
        Ok(Self {
            store,
            clock,
            region: region.to_string(),
            head: Arc::new(Mutex::new(head)),
        })
    }

    /// Appends a record (seq, ts, region and chain filled in here) and waits until it is durable.
    pub async fn record(&self, mut rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        rec.site_region = self.region.clone();
        rec.ts = ::time::OffsetDateTime::from(self.clock.now())
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        {
            let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
            rec.seq = head.seq + 1;
            rec.prev_hash = head.hash.clone();
            rec.hash = rec.compute_hash();
            self.store.put(Tree::Audit, &rec.seq.to_be_bytes(), &rec)?;
            head.seq = rec.seq;
            head.hash = rec.hash.clone();
        }
        tracing::info!(
            target: "meshsign::audit",
            seq = rec.seq, rpc = %rec.rpc, decision = %rec.decision, reason = %rec.reason,
            environment = %rec.environment, job_id = %rec.job_id, jti = %rec.jti,
            cert_serial = %rec.cert_serial, key_id = %rec.key_id, digest = %rec.digest,
            ttl_remaining_sec = ?rec.ttl_remaining_sec, peer = %rec.peer,
        );
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|_| AuditError::Join)??;
        Ok(rec)
    }

    /// Every record, in order (tests and, later, export).
    pub fn all(&self) -> Result<Vec<AuditRecord>, AuditError> {
        Ok(self.store.scan(Tree::Audit, b"")?)
    }
}
