//! The transparency log beside the audit log: one Rekor-shaped leaf per signature the site
//! makes (`meshsign_evidence::rekor`), in its own Merkle tree ([`merkle::Log::Transparency`]),
//! checkpointed with the audit log (every audit checkpoint signs both tree heads).
//!
//! **How the two are tied.** The sign flow builds each signature's body and leaf hash; the
//! audit entry of the decision names the leaves (`AuditRecord::tlog`), and the writer gives
//! them their indices as it chains the entry. So the transparency log holds only what the
//! site signed (no job facts: a bundle discloses the body, nothing of the decision), the
//! audit chain covers every leaf, and the log's state is recomputable from the audit entries:
//! leaves are stored with the batch that names them, written back from their entries when a
//! crash or a replica lost them, and never stored anywhere the audit log does not name them.
//! The signed entry timestamp (SET) is signed by the caller once the entry is durable: it
//! needs the index and time the writer gave, and the writer thread signs nothing per entry.

use meshsign_evidence::audit::TlogLeaves;
use meshsign_evidence::merkle::{Completed, Frontier, Hash};

use super::merkle::{self, Log};
use super::{AuditError, AuditRecord, SignedHead};
use crate::store::{Store, Tree};

/// The writer's view of the transparency log.
pub(super) struct Transparency {
    /// The tree over leaves `0..size` (None: it could not be built; signing is refused).
    pub(super) tree: Option<Frontier>,
    /// Subtrees completed by the batch being committed.
    pub(super) completed: Vec<Completed>,
    /// Leaves of the batch being committed: (first index, hashes).
    pub(super) rows: Vec<(u64, Vec<Hash>)>,
    /// Checkpoint origin (`<trust domain>/<region>/log`).
    pub(super) origin: String,
    /// The newest durable signed tree head.
    pub(super) signed: tokio::sync::watch::Sender<Option<SignedHead>>,
    /// A tree head signed in the batch being committed.
    pub(super) pending_head: Option<SignedHead>,
    /// The number of leaves durable in this site's view (published after each commit): the
    /// bound below which a missing leaf is worth writing back from the audit log.
    pub(super) size: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Transparency {
    /// Publishes the tree's size as durable (after a commit, or the tree's load).
    pub(super) fn publish(&self) {
        if let Some(tree) = &self.tree {
            self.size
                .store(tree.size(), std::sync::atomic::Ordering::Release);
        }
    }

    /// Gives `leaves` their indices (the next ones) and adds them to the tree.
    pub(super) fn assign(&mut self, leaves: &mut TlogLeaves) -> Result<(), AuditError> {
        let hashes = leaves.hashes().ok_or_else(|| {
            AuditError::Tree("a decision named malformed transparency leaves".into())
        })?;
        let tree = self.tree.as_mut().ok_or_else(|| {
            AuditError::Tree(
                "the transparency log's tree could not be built at start (see the site log): \
                 nothing is signed until it can"
                    .into(),
            )
        })?;
        leaves.index = tree.size();
        for h in &hashes {
            self.completed.extend(tree.push(*h));
        }
        self.rows.push((leaves.index, hashes));
        Ok(())
    }

    /// Takes in the leaves of entries another replica committed (at the start of a commit),
    /// stored with this batch's own ([`Transparency::put_rows`]: one run of rows, the same
    /// values whoever writes them; the other replica stored them too).
    pub(super) fn take_in(&mut self, rec: &AuditRecord) -> Result<(), AuditError> {
        let Some(t) = &rec.tlog else {
            return Ok(());
        };
        let hashes = t
            .hashes()
            .ok_or_else(|| AuditError::Tree(format!("entry {} names malformed leaves", rec.seq)))?;
        self.rows.push((t.index, hashes.clone()));
        if let Some(tree) = &mut self.tree {
            if tree.size() != t.index {
                return Err(AuditError::Tree(format!(
                    "entry {} names transparency leaf {}, the tree has {}",
                    rec.seq,
                    t.index,
                    tree.size()
                )));
            }
            for h in hashes {
                self.completed.extend(tree.push(h));
            }
        }
        Ok(())
    }

    /// Stores the batch's leaves (before the batch is made durable: a flush takes them with
    /// it; what only the journal held is written back from its entries at start).
    /// The batch's leaves are consecutive (the writer gives the next indices), so they are
    /// written as one run: a row is merged once per batch, not once per entry (on PostgreSQL
    /// each merge is a read and a compare-and-swap: two round trips per signature held the
    /// writer's commit, and Sign fell to 0.08 of sled's rate).
    pub(super) fn put_rows(&self, store: &Store) -> Result<(), AuditError> {
        let mut run: Option<(u64, Vec<Hash>)> = None;
        for (index, hashes) in &self.rows {
            match &mut run {
                Some((first, leaves)) if *first + leaves.len() as u64 == *index => {
                    leaves.extend_from_slice(hashes);
                }
                _ => {
                    if let Some((first, leaves)) = run.take() {
                        merkle::put_log_leaves(store, first, &leaves)?;
                    }
                    run = Some((*index, hashes.clone()));
                }
            }
        }
        if let Some((first, leaves)) = run {
            merkle::put_log_leaves(store, first, &leaves)?;
        }
        Ok(())
    }
}

/// The transparency log's size at audit entry `seq`, read back from the newest entry that
/// tells it (one that added leaves — returned too — or a checkpoint that signed the log's
/// head). Checkpoints are at most `checkpoint_every` entries apart, so this reads few
/// entries; a log from before the transparency log reads to seq 1 once.
pub(super) fn size_at(store: &Store, seq: u64) -> Result<(u64, Option<AuditRecord>), AuditError> {
    let mut s = seq;
    while s > 0 {
        let Some(bytes) = store.kv().get(Tree::Audit, &s.to_be_bytes())? else {
            // Removed by retention: retention keeps the newest checkpoint, so none told it.
            break;
        };
        let rec: AuditRecord =
            serde_json::from_slice(&bytes).map_err(AuditError::entry("audit entry"))?;
        if let Some(t) = &rec.tlog {
            let end = t.end().ok_or_else(|| {
                AuditError::Tree(format!("entry {} names malformed leaves", rec.seq))
            })?;
            return Ok((end, Some(rec)));
        }
        if let Some(note) = rec.checkpoint.as_ref().and_then(|c| c.log_note.as_deref()) {
            let size = note
                .lines()
                .nth(1)
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| {
                    AuditError::Tree(format!("checkpoint {} has a malformed log note", rec.seq))
                })?;
            return Ok((size, None));
        }
        s -= 1;
    }
    Ok((0, None))
}

/// The transparency tree at audit entry `seq` (the last leaves are written back first), or
/// None (logged) if it cannot be built.
pub(super) fn load(store: &Store, seq: u64) -> Option<Frontier> {
    let built = size_at(store, seq).and_then(|(size, last)| {
        if let Some(t) = last.as_ref().and_then(|r| r.tlog.as_ref())
            && let Some(h) = t.hashes()
        {
            merkle::put_log_leaves(store, t.index, &h)?;
        }
        merkle::frontier(store, Log::Transparency, size)
    });
    match built {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, "the transparency log's tree cannot be built: signing is refused until it can");
            None
        }
    }
}

/// Where a decision's leaves landed: what each of their SETs signs besides the body.
#[derive(Clone, Copy, Debug)]
pub struct Promised {
    /// The entry's time (the SET's `integratedTime`).
    pub time: i64,
    /// The log's id (SHA-256 of the audit key's SPKI).
    pub log_id: [u8; 32],
    /// The index of the decision's first leaf.
    pub first: u64,
}

impl Promised {
    /// The log entry of the decision's leaf `offset` (its `offset`-th body), without a SET:
    /// index and time as the writer gave them.
    pub fn entry(&self, offset: u64, body: Vec<u8>) -> meshsign_evidence::rekor::LogEntry {
        meshsign_evidence::rekor::LogEntry {
            log_index: self.first + offset,
            integrated_time: self.time,
            body,
            set: Vec::new(),
        }
    }
}

impl super::AuditKey {
    /// What the SETs of the leaves `written` named sign (None: it named none).
    pub fn promised(&self, written: &AuditRecord) -> Result<Option<Promised>, AuditError> {
        let Some(t) = &written.tlog else {
            return Ok(None);
        };
        Ok(Some(Promised {
            time: meshsign_evidence::attest::parse_rfc3339(&written.ts)
                .map_err(AuditError::Tree)?,
            log_id: meshsign_evidence::rekor::log_id(self.backend.public_key_der()),
            first: t.index,
        }))
    }

    /// The entry of the decision's leaf `offset` (its `offset`-th body) with its signed entry
    /// timestamp: the audit key's signature over the body, the entry's time, the log id and
    /// the leaf's index, as Rekor signs its SETs.
    pub fn promise(
        &self,
        at: &Promised,
        offset: u64,
        body: Vec<u8>,
    ) -> Result<meshsign_evidence::rekor::LogEntry, AuditError> {
        let mut entry = at.entry(offset, body);
        let msg = meshsign_evidence::rekor::set_payload(
            &entry.body,
            entry.integrated_time,
            &at.log_id,
            entry.log_index,
        );
        let mut d = [0u8; 32];
        d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg).as_ref());
        entry.set = self
            .backend
            .sign_digest(&d)
            .map_err(|e| AuditError::Checkpoint(std::sync::Arc::new(e)))?;
        Ok(entry)
    }

    /// The entries of the leaves `written` named, one per body (in order): with their SETs
    /// ([`Self::promise`]) when `signed`, else as the log holds them ([`Promised::entry`]), what
    /// a request that did not ask for SETs gets back. For many signed bodies, spread
    /// [`Self::promise`] over the signing pool instead.
    pub fn entries(
        &self,
        written: &AuditRecord,
        bodies: Vec<Vec<u8>>,
        signed: bool,
    ) -> Result<Vec<meshsign_evidence::rekor::LogEntry>, AuditError> {
        let Some(at) = self.promised(written)? else {
            return Ok(Vec::new());
        };
        (0..)
            .zip(bodies)
            .map(|(offset, body)| match signed {
                true => self.promise(&at, offset, body),
                false => Ok(at.entry(offset, body)),
            })
            .collect()
    }
}
