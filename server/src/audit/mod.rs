//! The audit log: one entry per decision, allowed or denied, hash-chained and made durable
//! before the response leaves (DESIGN.md "Audit").
//!
//! Owns: the writer thread, the chain head, checkpoints, the journal ([`journal`]),
//! retention, and the audit key. Must not touch: what a decision means (the use cases fill the
//! record), the network. The format, chain and verification live in
//! `meshsign_evidence::audit`, shared with offline verifiers.
//!
//! **Group commit.** Callers hand entries to one writer thread; it takes every entry waiting,
//! chains and stores them, flushes once, then answers all of them. Concurrent requests share one
//! flush, so durability does not serialize the service. The writer is a dedicated OS thread
//! rather than a tokio task: the flush blocks, and doing it on the writer's own thread saves
//! the two thread hand-offs per batch a `spawn_blocking` would add (measured with
//! `meshsign-bench`: see BENCHMARKS.md). Its queue needs no bound of its own: every entry in it
//! belongs to a request (or admin call) waiting for the answer, so it never holds more entries
//! than there are calls in flight.
//!
//! **Journal.** Entries of requests that changed nothing else in the store (Sign, SignBatch:
//! [`AuditLog::record_sign`]) are made durable through the append-only [`Journal`] instead of a
//! store flush; see `journal.rs` for why and for recovery. Every other entry
//! ([`AuditLog::record`]) flushes the store, which also makes the request's own writes (a
//! claimed jti, an issued certificate, a revocation) durable before the answer.
//!
//! **Checkpoints.** Every `checkpoint_every` entries, or after `checkpoint_seconds` with new
//! entries, the writer appends a checkpoint signed by the site's audit key (P-256, wrapped under
//! the KEK like every other key).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use meshsign_evidence::audit::AuditRecord;
use meshsign_evidence::audit::{Checkpoint, genesis};
use std::sync::mpsc;

use tokio::sync::{oneshot, watch};

pub mod journal;
pub mod merkle;
pub mod summary;

use crate::clock::SharedClock;
use crate::custody::{CustodyError, SigningBackend};
use crate::model::{KeyAlgorithm, Refusal, RefusalKind, bounded, log_safe};
use crate::store::{Store, StoreError, Tree};
use journal::Journal;

/// Audit failures. A decision whose entry cannot be written is not returned. Cloneable (one
/// failed group commit answers every waiting request), so causes are shared behind `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The store refused the write or the flush.
    #[error("audit store: {0}")]
    Store(#[source] Arc<StoreError>),
    /// The journal file could not be read or written.
    #[error("audit journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A stored entry does not decode (or a new one does not encode).
    #[error("audit entry {what}: {source}")]
    Entry {
        /// Which entry.
        what: &'static str,
        /// The cause.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// The audit key could not sign a checkpoint.
    #[error("audit checkpoint signature: {0}")]
    Checkpoint(#[source] Arc<CustodyError>),
    /// The writer thread could not be started.
    #[error("cannot start the audit writer: {0}")]
    Thread(#[source] Arc<std::io::Error>),
    /// The journal is missing or does not hold what it must.
    #[error(transparent)]
    JournalState(journal::JournalError),
    /// The Merkle tree could not be read or built.
    #[error("audit Merkle tree: {0}")]
    Tree(String),
    /// The store's audit log cannot be read through (a damaged page, a gap).
    #[error(
        "the store's audit log in {dir} cannot be read past seq {after}: {cause}. The store's \
             files are damaged; meshsignd does not start on them. Restore a snapshot (meshsignd \
             restore), or run `meshsignd recover --data-dir {dir}` to see what is intact"
    )]
    Unreadable {
        /// The data folder.
        dir: String,
        /// The last seq read intact.
        after: u64,
        /// What failed.
        cause: String,
    },
    /// The writer thread is gone (site shutting down).
    #[error("audit writer stopped")]
    Stopped,
}

impl From<StoreError> for AuditError {
    fn from(e: StoreError) -> Self {
        AuditError::Store(Arc::new(e))
    }
}

/// Fills a refusal into `rec` — decision `deny`, the refusal's reason, its detail (bounded) —
/// and logs it with the same reason and detail. An internal fault's detail stays out of the
/// record: the transport logs it in full under an error id it also returns to the client.
pub fn deny(rec: &mut AuditRecord, e: &dyn Refusal, what: &'static str) {
    rec.decision = "deny".into();
    rec.reason = e.reason().into();
    if e.kind() == RefusalKind::Internal {
        rec.detail = "internal error (the site log has it)".into();
    } else {
        rec.detail = bounded(&e.to_string(), 300);
        tracing::info!(rpc = %rec.rpc, reason = e.reason(), detail = %log_safe(&rec.detail), "{what}");
    }
}

/// [`deny`] without the log line, for refusals counted into a summary entry (which logs the
/// first of its kind): a flood must not become a flood of log lines either.
pub fn deny_quietly(rec: &mut AuditRecord, e: &dyn Refusal) {
    rec.decision = "deny".into();
    rec.reason = e.reason().into();
    rec.detail = bounded(&e.to_string(), 300);
}

impl AuditError {
    fn entry(what: &'static str) -> impl FnOnce(serde_json::Error) -> Self {
        move |e| AuditError::Entry {
            what,
            source: Arc::new(e),
        }
    }
}

/// Audit settings.
#[derive(Clone, Copy, Debug)]
pub struct AuditSettings {
    /// Checkpoint after this many entries.
    pub checkpoint_every: u64,
    /// Checkpoint after this long with new entries.
    pub checkpoint_interval: Duration,
    /// Flush before answering (true outside benchmarks).
    pub durable: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            durable: true,
        }
    }
}

/// The key that signs checkpoints.
#[derive(Clone)]
pub struct AuditKey {
    /// `alias@vN`.
    pub key_id: String,
    /// Signer.
    pub backend: Arc<dyn SigningBackend>,
}

impl AuditKey {
    /// The site's audit (checkpoint) key, `(site)/audit@vN`: created on the first start, held
    /// like every other key (wrapped under the KEK).
    pub fn load_or_create(
        store: &Store,
        custodian: &crate::custody::Custodian,
        backend: crate::custody::Backend,
        now_unix: i64,
    ) -> Result<Self, CustodyError> {
        let key = crate::custody::load_or_create_alias(
            store,
            custodian,
            "(site)",
            "audit",
            (KeyAlgorithm::EcdsaP256Sha256, backend),
            now_unix,
        )?
        .pop()
        .ok_or(CustodyError::Crypto("audit key"))?;
        Ok(Self {
            key_id: key.record.key_id(),
            backend: key.backend,
        })
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

type Reply = oneshot::Sender<Result<AuditRecord, AuditError>>;

const EXPORTED_KEY: &[u8] = b"audit/exported_through";

/// What must be durable before an entry is acknowledged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The entry only (the request wrote nothing else).
    Entry,
    /// The entry and everything the request wrote to the store.
    Store,
}

/// Whether a commit adds a checkpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checkpointing {
    /// When `checkpoint_every` entries are uncovered (with a store flush).
    IfDue,
    /// Now (start, idle interval), with a store flush.
    Now,
    /// Now, for a proof; durable like a signing entry.
    OnDemand,
}

/// Work run on the writer thread between commits: the store, the head seq and hash.
type Exclusive = Box<dyn FnOnce(&Store, u64, &str) + Send>;

enum Msg {
    Entry(Box<AuditRecord>, Scope, Reply),
    Exclusive(Exclusive),
    Repair(oneshot::Sender<Result<bool, AuditError>>),
    /// Checkpoint now unless a signed tree head already covers this seq.
    Checkpoint(u64, oneshot::Sender<Result<(), AuditError>>),
    Stop(oneshot::Sender<()>),
}

/// An entry's inclusion proof to a signed tree head.
#[derive(Clone, Debug)]
pub struct Proof {
    /// Entries the tree head covers.
    pub tree_size: u64,
    /// Leaf to root.
    pub hashes: Vec<meshsign_evidence::merkle::Hash>,
    /// The signed note.
    pub checkpoint: String,
}

/// The newest signed tree head: the checkpoint note and the tree size it signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHead {
    /// Entries covered (1..=size).
    pub size: u64,
    /// The C2SP signed note.
    pub note: String,
}

/// Appends entries through the group-commit writer.
#[derive(Clone)]
pub struct AuditLog {
    failing: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Msg>,
    store: Store,
    head: watch::Receiver<u64>,
    key: AuditKey,
    origin: String,
    signed_head: watch::Receiver<Option<SignedHead>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

struct Writer {
    store: Store,
    clock: SharedClock,
    region: String,
    key: AuditKey,
    settings: AuditSettings,
    seq: u64,
    hash: String,
    since_checkpoint: u64,
    head: watch::Sender<u64>,
    /// None: every commit flushes the store.
    journal: Option<Journal>,
    /// A journal write failed: the next commit flushes the store and empties the journal, so
    /// no torn line stays in front of later entries.
    journal_reset: bool,
    /// Encoded entries of the batch being committed.
    pending: Vec<Vec<u8>>,
    /// The same with their seqs. Nothing of a batch reaches the store before every part of it
    /// that can fail first (the checkpoint's signature) has worked: a batch that fails leaves
    /// no entry behind for the next one to chain onto. A shared chain commits them in one
    /// database transaction.
    chain_pending: Vec<(u64, Vec<u8>)>,
    /// The store is shared by several replicas: each group commit locks the chain head in the
    /// database, continues from it (another replica may have moved it), and commits there.
    shared: bool,
    /// Set while commits fail (a full or broken disk); cleared by a commit or a repair.
    failing: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The Merkle tree over entries 1..=seq (None: it could not be built; checkpoints then
    /// carry no tree head, and the log says why once).
    tree: Option<meshsign_evidence::merkle::Frontier>,
    /// Subtrees completed by the batch being committed (stored once it is durable).
    completed: Vec<meshsign_evidence::merkle::Completed>,
    /// Checkpoint origin (`<trust domain>/<region>/audit`).
    origin: String,
    /// The newest durable signed tree head.
    signed_head: watch::Sender<Option<SignedHead>>,
    /// A tree head signed in the batch being committed.
    pending_head: Option<SignedHead>,
}

impl AuditLog {
    /// Opens the log and starts the writer thread. With a `journal` path, entries a crash left
    /// only in the journal are first written back into the store; the chain then continues from
    /// the last stored entry. The writer counts into `metrics`, the site's registry (the
    /// state makes it; the log only counts into it).
    pub fn open(
        store: Store,
        clock: SharedClock,
        (region, origin): (&str, &str),
        key: AuditKey,
        (settings, metrics): (AuditSettings, Arc<crate::metrics::Metrics>),
        journal: Option<JournalAt<'_>>,
    ) -> Result<Self, AuditError> {
        if store.kv().chain().is_none()
            && let Some(at) = &journal
        {
            check_readable(&store, at.path.parent().unwrap_or(at.path))?;
        }
        let mut torn = None;
        let mut journal_end = None;
        let journal = match journal {
            Some(at) => {
                // A journal made just now (a new site) has nothing to account for.
                let existed = at.path.exists();
                let (j, recovered) = Journal::open(at.path, at.must_exist)?;
                let restored = restore_from_journal(&store, at.path, &recovered, existed)?;
                if restored > 0 {
                    tracing::info!(
                        entries = restored,
                        "audit entries recovered from the journal"
                    );
                }
                if recovered.torn {
                    torn = Some(recovered.torn_line);
                }
                journal_end = recovered
                    .entries
                    .last()
                    .map(|(r, _)| r.seq)
                    .or(recovered.base.as_ref().map(|(s, _)| *s));
                Some(j)
            }
            None => None,
        };
        let mut initial_head = None;
        let (mut seq, mut hash, since_checkpoint) = match store.kv().last(Tree::Audit)? {
            Some((_, v)) => {
                let last: AuditRecord =
                    serde_json::from_slice(&v).map_err(AuditError::entry("last stored"))?;
                if let Some(cp) = &last.checkpoint
                    && let Some(note) = &cp.note
                {
                    initial_head = Some(SignedHead {
                        size: cp.covers_seq,
                        note: note.clone(),
                    });
                }
                (
                    last.seq,
                    last.hash,
                    if last.checkpoint.is_some() { 0 } else { 1 },
                )
            }
            None => (0, genesis(), 0),
        };
        if torn.is_some() && journal_end.is_some_and(|end| seq > end) {
            // The torn line's entry is whole in the store (it is stored only after the journal
            // took it): nothing was lost.
            tracing::info!(
                seq,
                "audit journal: torn last line; the store holds its entry whole"
            );
        } else if let Some(line) = torn {
            // The torn piece held seq `seq + 1` (or nothing acknowledged): that seq is never
            // reused for another decision; an entry recording the loss takes it.
            let path = journal.as_ref().map(|j| j.path().display().to_string());
            let rec = loss_record(
                seq + 1,
                &format!(
                    "journal {} line {line}: a torn last line was dropped at start; if seq {} \
                     was acknowledged, its receipt no longer matches (its content is lost)",
                    path.unwrap_or_default(),
                    seq + 1
                ),
            );
            let (s, h) = append_direct(&store, region, &clock, &hash, rec)?;
            tracing::warn!(
                seq = s,
                "audit journal: torn last line dropped; loss recorded"
            );
            (seq, hash) = (s, h);
        }
        let mut journal = journal;
        if let Some(j) = &mut journal {
            store.flush()?;
            j.clear(seq, &hash)?;
        }
        let failing: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let tree = load_tree(&store, seq);
        let (signed_tx, signed_rx) = watch::channel(initial_head);
        let (head_tx, head_rx) = watch::channel(seq);
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            store: store.clone(),
            clock,
            region: region.to_string(),
            key: key.clone(),
            settings,
            seq,
            hash,
            since_checkpoint,
            head: head_tx,
            journal,
            journal_reset: false,
            pending: Vec::new(),
            chain_pending: Vec::new(),
            shared: store.kv().chain().is_some(),
            failing: failing.clone(),
            metrics,
            tree,
            completed: Vec::new(),
            origin: origin.to_string(),
            signed_head: signed_tx,
            pending_head: None,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.commit_loop(rx))
            .map_err(|e| AuditError::Thread(Arc::new(e)))?;
        Ok(Self {
            failing,
            tx,
            store,
            head: head_rx,
            key,
            origin: origin.to_string(),
            signed_head: signed_rx,
        })
    }

    /// The checkpoints' origin (first line of their notes).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A signed tree head covering entry `seq`: the newest one, or — if it does not reach
    /// `seq` yet — a checkpoint made now.
    pub async fn signed_head_covering(&self, seq: u64) -> Result<SignedHead, AuditError> {
        if let Some(h) = self.signed_head.borrow().clone()
            && h.size >= seq
        {
            return Ok(h);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(seq, tx))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)??;
        match self.signed_head.borrow().clone() {
            Some(h) if h.size >= seq => Ok(h),
            _ => Err(AuditError::Tree(
                "no signed tree head covers the entry (the tree could not be built: see the site log)"
                    .into(),
            )),
        }
    }

    /// The inclusion proof of entry `seq` to a signed tree head, if the store holds that entry
    /// and `leaf_hash` is its Merkle leaf hash (SHA-256(0x00 || entry)). No entry holds another
    /// entry's leaf hash, so a receipt leads to no other entry; the proof carries hashes only.
    ///
    /// The entry is read from the store, not bounded by this replica's head: on a shared store
    /// another replica may have written it, and the checkpoint asked for below first brings
    /// this replica's writer up to the store's head.
    pub async fn prove(&self, seq: u64, leaf_hash: &[u8]) -> Result<Option<Proof>, AuditError> {
        if seq == 0 || leaf_hash.len() != 32 {
            return Ok(None);
        }
        let Some(entry) = self.store.kv().get(Tree::Audit, &seq.to_be_bytes())? else {
            return Ok(None);
        };
        let leaf = meshsign_evidence::merkle::leaf_hash(&entry);
        if aws_lc_rs::constant_time::verify_slices_are_equal(&leaf, leaf_hash).is_err() {
            return Ok(None);
        }
        let head = self.signed_head_covering(seq).await?;
        let log = self.clone();
        let size = head.size;
        let hashes = tokio::task::spawn_blocking(move || log.inclusion_proof(seq, size))
            .await
            .map_err(|e| AuditError::Tree(format!("proof task: {e}")))??;
        Ok(Some(Proof {
            tree_size: head.size,
            hashes,
            checkpoint: head.note,
        }))
    }

    /// The inclusion proof of entry `seq` in the tree of `size` entries (reads the store;
    /// call off the runtime).
    pub fn inclusion_proof(
        &self,
        seq: u64,
        size: u64,
    ) -> Result<Vec<meshsign_evidence::merkle::Hash>, AuditError> {
        merkle::proof(&self.store, seq, size)
    }

    /// The public audit key (id, SPKI DER).
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Appends an entry (seq, ts, region and chain are filled in) and waits until it — and
    /// every write the request made to the store before it — is durable.
    pub async fn record(&self, rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        self.send(rec, Scope::Store).await
    }

    /// [`AuditLog::record`] for a decision that wrote nothing else to the store (signing
    /// requests): only the entry must be durable, which the journal does without a store flush.
    pub async fn record_sign(&self, rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        self.send(rec, Scope::Entry).await
    }

    async fn send(&self, rec: AuditRecord, scope: Scope) -> Result<AuditRecord, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Entry(Box::new(rec), scope, reply))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Runs `f` on the writer thread between two commits, after the store was flushed: no
    /// entry is written while it runs, so it sees the log and its head at one point (a
    /// consistent snapshot).
    pub async fn exclusive<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, u64, &str) -> R + Send + 'static,
    ) -> Result<R, AuditError> {
        let (tx, rx) = oneshot::channel();
        let job: Exclusive = Box::new(move |store, seq, hash| {
            let _ = tx.send(f(store, seq, hash));
        });
        self.tx
            .send(Msg::Exclusive(job))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)
    }

    /// Whether the last commit failed (writes are refused until a repair or a commit works).
    pub fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tries to make the log writable again after failed writes (see the writer's `repair`);
    /// returns whether the store was reopened.
    pub async fn repair(&self) -> Result<bool, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Repair(tx))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Stops the writer after what is queued (shutdown); later records fail with `Stopped`.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Every entry in seq order (tests, small exports).
    pub fn all(&self) -> Result<Vec<AuditRecord>, AuditError> {
        Ok(self.store.scan(Tree::Audit, b"")?)
    }

    /// Entries with seq ≥ `from`, at most `limit`.
    pub fn range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = Vec::new();
        for (_, v) in self
            .store
            .kv()
            .scan_range(Tree::Audit, &from.to_be_bytes(), limit)?
        {
            out.push(serde_json::from_slice(&v).map_err(AuditError::entry("stored"))?);
        }
        Ok(out)
    }

    /// Records that every entry up to `seq` has been exported (unfiltered).
    pub fn mark_exported(&self, seq: u64) -> Result<(), AuditError> {
        let cur = self.exported_through()?;
        if seq > cur {
            self.store
                .kv()
                .put(Tree::Meta, EXPORTED_KEY, &seq.to_be_bytes())?;
            self.store.flush()?;
        }
        Ok(())
    }

    /// The highest seq included in a complete unfiltered export.
    pub fn exported_through(&self) -> Result<u64, AuditError> {
        Ok(self
            .store
            .kv()
            .get(Tree::Meta, EXPORTED_KEY)?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Retention: removes entries older than `max_age_secs` — only below a signed checkpoint
    /// whose covered entries have all been exported, so what remains starts at that checkpoint
    /// and still verifies from it. Returns the range removed.
    pub fn prune(
        &self,
        now_unix: i64,
        max_age_secs: i64,
    ) -> Result<Option<(u64, u64)>, AuditError> {
        let exported = self.exported_through()?;
        let first = match self.range(0, 1)?.first() {
            Some(r) => r.seq,
            None => return Ok(None),
        };
        // The newest checkpoint C with everything before it exported and old enough.
        let mut keep_from = None;
        let mut from = first;
        'scan: loop {
            let page = self.range(from, 512)?;
            let Some(last) = page.last().map(|r| r.seq) else {
                break;
            };
            for r in &page {
                let old = ::time::OffsetDateTime::parse(
                    &r.ts,
                    &::time::format_description::well_known::Rfc3339,
                )
                .map(|t| now_unix - t.unix_timestamp() > max_age_secs)
                .unwrap_or(false);
                if r.seq > exported + 1 || !old {
                    break 'scan;
                }
                if r.checkpoint.is_some() && r.seq > first {
                    keep_from = Some(r.seq);
                }
            }
            from = last + 1;
        }
        let Some(keep_from) = keep_from else {
            return Ok(None);
        };
        // Proofs for the entries that stay must not need the ones removed.
        merkle::keep_for_prune(&self.store, keep_from - 1)?;
        self.store.flush()?;
        for seq in first..keep_from {
            self.store.kv().remove(Tree::Audit, &seq.to_be_bytes())?;
        }
        self.store.flush()?;
        Ok(Some((first, keep_from - 1)))
    }

    /// Watches the seq of the newest durable entry.
    pub fn head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// The checkpoint key's public key (SPKI DER) and id.
    pub fn public_key(&self) -> (String, Vec<u8>) {
        (
            self.key.key_id.clone(),
            self.key.backend.public_key_der().to_vec(),
        )
    }
}

/// The checkpoints' origin: `<trust domain>/<region>/audit`.
pub fn log_origin(trust_domain: &str, region: &str) -> String {
    format!("{trust_domain}/{region}/audit")
}

/// The tree over the stored entries 1..=`seq`, or None (logged) if it cannot be built.
fn load_tree(store: &Store, seq: u64) -> Option<meshsign_evidence::merkle::Frontier> {
    match merkle::frontier(store, seq) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, "the audit log's Merkle tree cannot be built: checkpoints will carry no signed tree head and receipts cannot be proven");
            None
        }
    }
}

/// Where the journal is, and whether it must already exist (a site created with one).
#[derive(Clone, Copy, Debug)]
pub struct JournalAt<'a> {
    /// The file.
    pub path: &'a std::path::Path,
    /// A missing file is refused (the site exists) rather than created (a new site).
    pub must_exist: bool,
}

/// Writes the journal's intact entries that the store lacks back into it (flushed), after
/// checking that the two agree: the store holds everything the journal's header says it
/// durably held, and every entry both hold is the same. Returns how many were restored.
fn restore_from_journal(
    store: &Store,
    path: &std::path::Path,
    recovered: &journal::Recovered,
    existed: bool,
) -> Result<usize, AuditError> {
    let missing = plan_restore(store, path, recovered, existed)?;
    for (rec, bytes) in &missing {
        store.kv().put(Tree::Audit, &rec.seq.to_be_bytes(), bytes)?;
    }
    store.flush()?;
    Ok(missing.len())
}

/// Checks the journal at `path` against the store as a start would (without writing): present
/// when it must be, every line intact, consistent with the store. `meshsignd recover` reports
/// with it.
pub fn check_journal(
    path: &std::path::Path,
    must_exist: bool,
    store: &Store,
) -> Result<(), AuditError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if must_exist {
                return Err(AuditError::JournalState(journal::JournalError::Missing {
                    path: path.to_path_buf(),
                    dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                }));
            }
            return Ok(());
        }
        Err(e) => {
            return Err(AuditError::Journal {
                path: path.to_path_buf(),
                source: Arc::new(e),
            });
        }
    };
    let recovered = journal::parse(path, &text).map_err(AuditError::JournalState)?;
    plan_restore(store, path, &recovered, true).map(|_| ())
}

/// The journal's entries the store lacks, after checking that the two agree (see
/// [`restore_from_journal`]); writes nothing.
fn plan_restore<'r>(
    store: &Store,
    path: &std::path::Path,
    recovered: &'r journal::Recovered,
    existed: bool,
) -> Result<Vec<&'r journal::JournalEntry>, AuditError> {
    let stored = |seq: u64| -> Result<Option<AuditRecord>, AuditError> {
        match store.kv().get(Tree::Audit, &seq.to_be_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(AuditError::entry("stored"))?,
            )),
            None => Ok(None),
        }
    };
    let head = match store.kv().last(Tree::Audit)? {
        Some((_, v)) => {
            let r: AuditRecord =
                serde_json::from_slice(&v).map_err(AuditError::entry("last stored"))?;
            (r.seq, r.hash)
        }
        None => (0, genesis()),
    };
    let conflict = |seq: u64, what: String| {
        AuditError::JournalState(journal::JournalError::conflict(path, seq, what))
    };
    if existed {
        journal::check_against_store(path, recovered, head.0, store_durable_through(store)?)
            .map_err(AuditError::JournalState)?;
    }
    if let Some((base_seq, base_hash)) = &recovered.base
        && *base_seq > 0
    {
        match stored(*base_seq)? {
            Some(r) if r.hash == *base_hash => {}
            Some(_) => {
                return Err(conflict(
                    *base_seq,
                    "is a different entry in the store than the journal says".into(),
                ));
            }
            None => {
                return Err(AuditError::JournalState(
                    journal::JournalError::store_behind(path, *base_seq, head.0),
                ));
            }
        }
    }
    let mut missing = Vec::new();
    let (mut last_seq, mut last_hash) = head;
    for entry in &recovered.entries {
        let rec = &entry.0;
        if rec.seq <= head.0 {
            match stored(rec.seq)? {
                Some(r) if r.hash == rec.hash => continue,
                _ => {
                    return Err(conflict(
                        rec.seq,
                        "differs from the store's entry with the same seq".into(),
                    ));
                }
            }
        }
        if rec.seq != last_seq + 1 || rec.prev_hash != last_hash {
            return Err(conflict(
                rec.seq,
                format!("does not continue the store's log (which ends at seq {last_seq})"),
            ));
        }
        (last_seq, last_hash) = (rec.seq, rec.hash.clone());
        missing.push(entry);
    }
    Ok(missing)
}

/// Reads every stored entry of the audit log once, in order: the engine checks each page as it
/// reads it (sled: a checksum per record), so a damaged page is found at start — naming where
/// the readable log ends — not by an export months later while the site kept signing. Keys
/// must follow each other without a gap (retention removes only from the front). Returns how
/// many entries were read. O(entries) reads at start; not done on a shared database.
pub fn check_readable(store: &Store, dir: &std::path::Path) -> Result<u64, AuditError> {
    const CHUNK: usize = 8192;
    let unreadable = |after: u64, cause: String| AuditError::Unreadable {
        dir: dir.display().to_string(),
        after,
        cause,
    };
    let (mut next, mut last, mut count) = (0u64, None::<u64>, 0u64);
    // After a chunk fails to read, one entry at a time through it, to name where the log stops.
    let mut single = 0usize;
    loop {
        let limit = if single > 0 { 1 } else { CHUNK };
        let rows = match store
            .kv()
            .scan_range(Tree::Audit, &next.to_be_bytes(), limit)
        {
            Ok(rows) => rows,
            Err(e) if single > 0 => return Err(unreadable(last.unwrap_or(0), e.to_string())),
            Err(_) => {
                single = CHUNK;
                continue;
            }
        };
        single = single.saturating_sub(1);
        for (k, _) in &rows {
            let seq = <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    unreadable(
                        last.unwrap_or(0),
                        format!("a key of {} bytes is not a seq", k.len()),
                    )
                })?;
            if let Some(prev) = last
                && seq != prev + 1
            {
                return Err(unreadable(
                    prev,
                    format!("the next stored entry is seq {seq}"),
                ));
            }
            last = Some(seq);
            count += 1;
        }
        match last {
            Some(l) if !rows.is_empty() => next = l + 1,
            _ => return Ok(count),
        }
    }
}

/// Where the store records the last seq a store flush made durable (a batch that went to the
/// store, not the journal): written with the batch, so it is durable exactly when the batch is.
const STORE_DURABLE_KEY: &[u8] = b"audit/store_durable_through";

/// The last seq a store flush made durable (0: none recorded).
pub fn store_durable_through(store: &Store) -> Result<u64, StoreError> {
    Ok(store
        .kv()
        .get(Tree::Meta, STORE_DURABLE_KEY)?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

/// An entry that records a loss of audit entries (start-up recovery, `meshsignd recover`).
pub fn loss_record(seq: u64, detail: &str) -> AuditRecord {
    AuditRecord {
        seq,
        rpc: "AuditRecovery".into(),
        decision: "allow".into(),
        reason: "loss_recorded".into(),
        environment: "(site)".into(),
        detail: detail.to_string(),
        ..Default::default()
    }
}

/// Chains `rec` after `prev_hash` at its seq and stores it (not flushed); returns (seq, hash).
/// For start-up and offline recovery only, before any writer runs.
pub fn append_direct(
    store: &Store,
    region: &str,
    clock: &SharedClock,
    prev_hash: &str,
    mut rec: AuditRecord,
) -> Result<(u64, String), AuditError> {
    rec.ts = ::time::OffsetDateTime::from(clock.now())
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    rec.site_region = region.to_string();
    let bytes = rec.seal(prev_hash);
    store
        .kv()
        .put(Tree::Audit, &rec.seq.to_be_bytes(), &bytes)?;
    Ok((rec.seq, rec.hash))
}

impl Writer {
    fn commit_loop(mut self, rx: mpsc::Receiver<Msg>) {
        // After a restart (or a crash), anchor the tail left unsigned at once.
        if self.since_checkpoint > 0
            && let Err(e) = self.commit(Vec::new(), Checkpointing::Now)
        {
            tracing::error!(error = %e, "audit checkpoint at start failed");
        }
        loop {
            let first = match rx.recv_timeout(self.settings.checkpoint_interval) {
                Ok(Msg::Entry(rec, scope, reply)) => (*rec, scope, reply),
                Ok(Msg::Stop(done)) => return self.finish(done),
                Ok(Msg::Exclusive(job)) => {
                    self.exclusive(job);
                    continue;
                }
                Ok(Msg::Repair(reply)) => {
                    let _ = reply.send(self.repair());
                    continue;
                }
                Ok(Msg::Checkpoint(seq, reply)) => {
                    let _ = reply.send(self.checkpoint_now(seq));
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Idle: checkpoint what is not yet covered.
                    if self.since_checkpoint > 0
                        && let Err(e) = self.commit(Vec::new(), Checkpointing::Now)
                    {
                        tracing::error!(error = %e, "audit checkpoint failed");
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            let mut stop = None;
            let mut exclusive: Option<Exclusive> = None;
            let mut repair = None;
            let mut checkpoint_now = None;
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(Msg::Entry(rec, scope, reply)) => batch.push((*rec, scope, reply)),
                    Ok(Msg::Stop(done)) => {
                        stop = Some(done);
                        break;
                    }
                    Ok(Msg::Exclusive(job)) => {
                        exclusive = Some(job);
                        break;
                    }
                    Ok(Msg::Repair(reply)) => {
                        repair = Some(reply);
                        break;
                    }
                    Ok(Msg::Checkpoint(seq, reply)) => {
                        checkpoint_now = Some((seq, reply));
                        break;
                    }
                    Err(_) => break,
                }
            }
            match self.commit(batch, Checkpointing::IfDue) {
                Ok(()) => self
                    .failing
                    .store(false, std::sync::atomic::Ordering::SeqCst),
                Err(e) => {
                    self.failing
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!(error = %e, "audit write failed; writes are refused until the store takes them again");
                }
            }
            if let Some(job) = exclusive.take() {
                self.exclusive(job);
            }
            if let Some(reply) = repair.take() {
                let _ = reply.send(self.repair());
            }
            if let Some((seq, reply)) = checkpoint_now.take() {
                let _ = reply.send(self.checkpoint_now(seq));
            }
            if let Some(done) = stop {
                return self.finish(done);
            }
        }
    }

    /// After failed writes: lets the store recover (reopen), puts back what only the journal
    /// held, checks that the store takes a durable write, and empties the journal.
    fn repair(&mut self) -> Result<bool, AuditError> {
        let reopened = self.store.kv().recover()?;
        if let Some(j) = &self.journal {
            let recovered = j.reread()?;
            restore_from_journal(&self.store, j.path(), &recovered, true)?;
        }
        let last = |store: &Store| -> Result<(u64, String), AuditError> {
            Ok(match store.kv().last(Tree::Audit)? {
                Some((_, v)) => {
                    let r: AuditRecord =
                        serde_json::from_slice(&v).map_err(AuditError::entry("last stored"))?;
                    (r.seq, r.hash)
                }
                None => (0, genesis()),
            })
        };
        if !self.shared {
            // Entries past the writer's head belong to batches that failed (never
            // acknowledged): they go before anything chains onto them.
            let (seq, _) = last(&self.store)?;
            if seq > self.seq {
                tracing::warn!(
                    from = self.seq + 1,
                    to = seq,
                    "taking unacknowledged audit entries of failed batches out of the store"
                );
                self.unput(self.seq, seq);
            }
        }
        self.store.flush()?;
        let (seq, hash) = last(&self.store)?;
        if (seq, hash.as_str()) != (self.seq, self.hash.as_str()) {
            tracing::error!(
                store_seq = seq,
                writer_seq = self.seq,
                "after the store recovered, its audit log ends elsewhere than the writer's head; continuing from the store"
            );
            (self.seq, self.hash) = (seq, hash);
            self.tree = load_tree(&self.store, self.seq);
        }
        if let Some(j) = &mut self.journal {
            j.clear(self.seq, &self.hash)?;
        }
        self.journal_reset = false;
        self.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(reopened)
    }

    /// Extends the tree from `from` entries to the writer's head with the entries another
    /// replica committed (their completed subtrees are stored with the batch); rebuilds it
    /// from the store if that does not fit.
    fn catch_up_tree(&mut self, from: u64) {
        let extended = match &mut self.tree {
            Some(tree) if tree.size() == from && self.seq > from => {
                let want = usize::try_from(self.seq - from).unwrap_or(usize::MAX);
                match self
                    .store
                    .kv()
                    .scan_range(Tree::Audit, &(from + 1).to_be_bytes(), want)
                {
                    Ok(rows)
                        if rows.len() == want
                            && rows.iter().zip(from + 1..).all(|((k, _), seq)| {
                                k.as_slice() == seq.to_be_bytes().as_slice()
                            }) =>
                    {
                        for (_, bytes) in &rows {
                            self.completed
                                .extend(tree.push(meshsign_evidence::merkle::leaf_hash(bytes)));
                        }
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        if !extended {
            self.tree = load_tree(&self.store, self.seq);
        }
    }

    /// A checkpoint now, for a proof of entry `seq` — unless a signed tree head already covers
    /// it (requests that queued behind one checkpoint are answered by it). Made durable like a
    /// signing entry (the journal), not with a store flush: on-demand checkpoints follow the
    /// rate of receipts, the periodic ones move everything into the store.
    fn checkpoint_now(&mut self, seq: u64) -> Result<(), AuditError> {
        let known = self.signed_head.borrow().as_ref().map(|h| h.size);
        if known.is_some_and(|size| size >= seq) || self.tree.is_none() {
            return Ok(());
        }
        // With nothing new but no signed head known (a start right after a checkpoint of an
        // older version), a checkpoint of the same head is made.
        self.since_checkpoint = self.since_checkpoint.max(1);
        self.commit(Vec::new(), Checkpointing::OnDemand)
    }

    fn exclusive(&mut self, job: Exclusive) {
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "store flush before exclusive work failed");
        }
        job(&self.store, self.seq, &self.hash);
    }

    /// Shutdown: everything into the store, journal emptied, and the store (with its file
    /// lock) released before saying so, so a restart in the same process can open it at once.
    fn finish(mut self, done: oneshot::Sender<()>) {
        if self.store.flush().is_ok()
            && let Some(j) = &mut self.journal
        {
            let _ = j.clear(self.seq, &self.hash);
        }
        drop(self);
        let _ = done.send(());
    }

    fn now_rfc3339(&self) -> String {
        ::time::OffsetDateTime::from(self.clock.now())
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    fn append(&mut self, mut rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        rec.seq = self.seq + 1;
        rec.ts = self.now_rfc3339();
        rec.site_region = self.region.clone();
        rec.bound_fields();
        let bytes = rec.seal(&self.hash);
        if let Some(tree) = &mut self.tree {
            if tree.size() + 1 == rec.seq {
                self.completed
                    .extend(tree.push(meshsign_evidence::merkle::leaf_hash(&bytes)));
            } else {
                tracing::error!(
                    tree = tree.size(),
                    seq = rec.seq,
                    "audit Merkle tree out of step with the chain; rebuilt at the next start"
                );
                self.tree = None;
            }
        }
        if !self.shared {
            self.pending.push(bytes.clone());
        }
        self.chain_pending.push((rec.seq, bytes));
        // The same fields as a log event (never tokens or payloads: jti and digests only);
        // strings that came from the network are escaped, so none can forge a log line.
        let f = |s: &str| crate::model::log_safe(s).into_owned();
        tracing::info!(
            target: "meshsign::audit",
            seq = rec.seq, rpc = %f(&rec.rpc), decision = %rec.decision, reason = %rec.reason,
            environment = %f(&rec.environment), job_id = %f(&rec.job_id), jti = %f(&rec.jti),
            token_issuer = %f(&rec.token_issuer), subject = %f(&rec.subject),
            runner_fingerprint = %f(&rec.runner_fingerprint), cert_serial = %rec.cert_serial,
            ttl_remaining_sec = rec.ttl_remaining_sec, key_id = %f(&rec.key_id), digest = %rec.digest,
            items = rec.items, repository = %f(&rec.repository), git_ref = %f(&rec.git_ref),
            provider = %rec.provider, peer = %rec.peer, operator = %f(&rec.operator),
            detail = %f(&rec.detail), hash = %rec.hash,
        );
        self.seq = rec.seq;
        self.hash = rec.hash.clone();
        Ok(rec)
    }

    fn checkpoint(&mut self) -> Result<(), AuditError> {
        let time = self.clock.unix();
        let msg = Checkpoint::message(&self.region, self.seq, &self.hash, time);
        let mut digest = [0u8; 32];
        digest
            .copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg).as_ref());
        let sig = self
            .key
            .backend
            .sign_digest(&digest)
            .map_err(|e| AuditError::Checkpoint(Arc::new(e)))?;
        let note = match &self.tree {
            Some(tree) if tree.size() == self.seq => {
                let head = meshsign_evidence::note::TreeHead {
                    origin: self.origin.clone(),
                    size: tree.size(),
                    root: tree.root(),
                };
                let text = head.text();
                let mut d = [0u8; 32];
                d.copy_from_slice(
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref(),
                );
                let nsig = self
                    .key
                    .backend
                    .sign_digest(&d)
                    .map_err(|e| AuditError::Checkpoint(Arc::new(e)))?;
                let note = head.note(self.key.backend.public_key_der(), &nsig);
                self.pending_head = Some(SignedHead {
                    size: head.size,
                    note: note.clone(),
                });
                Some(note)
            }
            _ => None,
        };
        let rec = AuditRecord {
            rpc: "Checkpoint".into(),
            decision: "allow".into(),
            reason: "checkpoint".into(),
            environment: "(site)".into(),
            key_id: self.key.key_id.clone(),
            checkpoint: Some(Checkpoint {
                covers_seq: self.seq,
                head_hash: self.hash.clone(),
                time,
                key_id: self.key.key_id.clone(),
                signature: hex::encode(sig),
                note,
            }),
            ..Default::default()
        };
        self.append(rec)?;
        self.since_checkpoint = 0;
        self.metrics
            .last_checkpoint_unix
            .store(time, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Puts the batch's entries into the store (not flushed).
    fn put_pending(&self) -> Result<(), AuditError> {
        for (seq, bytes) in &self.chain_pending {
            self.store
                .kv()
                .put(Tree::Audit, &seq.to_be_bytes(), bytes)?;
        }
        Ok(())
    }

    /// Takes back what a failed batch put into the store (seqs after `head`, through `upto`),
    /// so the next batch does not chain onto entries nobody was told of.
    fn unput(&self, head: u64, upto: u64) {
        if store_durable_through(&self.store).is_ok_and(|m| m > head)
            && let Err(e) = self
                .store
                .kv()
                .put(Tree::Meta, STORE_DURABLE_KEY, &head.to_be_bytes())
        {
            tracing::warn!(error = %e, "the store-durable mark could not be taken back");
        }
        for seq in head + 1..=upto {
            if let Err(e) = self.store.kv().remove(Tree::Audit, &seq.to_be_bytes()) {
                tracing::error!(seq, error = %e, "a failed audit batch's entry could not be taken back; the store is repaired before the next write");
                self.failing
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Stores the batch and makes it durable: through the journal when only entries must be
    /// (journal first, then the store, so the store never holds an entry the journal does
    /// not), else by flushing the store (which then holds everything, so the journal is
    /// emptied). Without `durable`, the entries are only stored.
    fn make_durable(&mut self, store_scope: bool) -> Result<(), AuditError> {
        if let Some(chain) = self.store.kv().chain() {
            return Ok(chain.commit(&self.chain_pending, (self.seq, &self.hash))?);
        }
        if !self.settings.durable {
            return self.put_pending();
        }
        let journal_full = self
            .journal
            .as_ref()
            .is_none_or(|j| j.len() > Journal::MAX_BYTES);
        if store_scope || journal_full || self.journal_reset {
            self.put_pending()?;
            // Flushed with the batch: a crash before the journal is emptied below leaves a
            // store ahead of the journal that says why (not a cut journal).
            self.store
                .kv()
                .put(Tree::Meta, STORE_DURABLE_KEY, &self.seq.to_be_bytes())?;
            self.store.flush()?;
            if let Some(j) = &mut self.journal {
                // If emptying fails the journal only repeats entries the store now holds.
                match j.clear(self.seq, &self.hash) {
                    Ok(()) => self.journal_reset = false,
                    Err(e) => tracing::warn!(error = %e, "audit journal not emptied"),
                }
            }
            return Ok(());
        }
        let Some(j) = &mut self.journal else {
            return self.put_pending();
        };
        let mark = j.mark();
        j.append(&self.pending)
            .inspect_err(|_| self.journal_reset = true)?;
        if let Err(e) = self.put_pending() {
            // Not acknowledged: the journal must not bring it back at the next start.
            if let Some(j) = &mut self.journal
                && j.rewind(mark).is_err()
            {
                self.journal_reset = true;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Chains and stores a batch (plus a checkpoint when due), makes it durable once, answers
    /// everyone. On failure nothing of the batch is acknowledged and the chain head is restored.
    fn commit(
        &mut self,
        batch: Vec<(AuditRecord, Scope, Reply)>,
        checkpointing: Checkpointing,
    ) -> Result<(), AuditError> {
        let (saved_seq, saved_hash, saved_since) =
            (self.seq, self.hash.clone(), self.since_checkpoint);
        let saved_tree = self.tree.clone();
        self.pending.clear();
        self.chain_pending.clear();
        self.completed.clear();
        self.pending_head = None;
        let mut store_scope = false;
        let mut written = Vec::with_capacity(batch.len());
        let mut result: Result<(), AuditError> = Ok(());
        let mut chain_open = false;
        if let Some(chain) = self.store.kv().chain() {
            // Continue from the head as the database has it: another replica may have moved it.
            match chain.begin() {
                Ok((seq, hash)) => {
                    chain_open = true;
                    if seq != self.seq || hash != self.hash {
                        // Another replica appended: its entries are committed; the tree takes
                        // them in (read once, one range), or is rebuilt if out of step.
                        let from = self.seq;
                        (self.seq, self.hash) = (seq, hash);
                        self.catch_up_tree(from);
                    }
                }
                Err(e) => result = Err(e.into()),
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        for (rec, scope, reply) in batch {
            store_scope |= scope == Scope::Store;
            replies.push(reply);
            if result.is_ok() {
                match self.append(rec) {
                    Ok(r) => {
                        written.push(r);
                        self.since_checkpoint += 1;
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        let due = self.since_checkpoint >= self.settings.checkpoint_every;
        if result.is_ok()
            && (due || checkpointing != Checkpointing::IfDue)
            && self.since_checkpoint > 0
        {
            // A periodic checkpoint is a good moment to move everything into the store.
            store_scope |= due || checkpointing == Checkpointing::Now;
            result = self.checkpoint();
        }
        let attempted = self.seq;
        if result.is_ok() {
            // A shared chain commits its transaction here whatever `durable` says.
            result = self.make_durable(store_scope);
            chain_open = false;
        }
        if chain_open && let Some(chain) = self.store.kv().chain() {
            chain.rollback();
        }
        self.pending.clear();
        self.chain_pending.clear();
        match &result {
            Ok(()) => {
                let _ = self.head.send(self.seq);
                if let Err(e) = merkle::store_completed(&self.store, &self.completed) {
                    // Only a cache: a missing node is recomputed when a proof needs it.
                    tracing::warn!(error = %e, "audit Merkle nodes not stored");
                }
                self.completed.clear();
                if let Some(h) = self.pending_head.take() {
                    let _ = self.signed_head.send(Some(h));
                }
                if let Some(j) = &self.journal {
                    self.metrics
                        .journal_bytes
                        .store(j.len(), std::sync::atomic::Ordering::Relaxed);
                }
                for rec in &written {
                    self.metrics
                        .decision(&rec.rpc, &rec.environment, &rec.decision, &rec.reason);
                }
                for (reply, rec) in replies.into_iter().zip(written) {
                    let _ = reply.send(Ok(rec));
                }
            }
            Err(e) => {
                self.metrics
                    .store_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Roll the head back and take the batch's entries out of the store: the next
                // batch continues from the last acknowledged entry, never from one of these.
                if !self.shared && attempted > saved_seq {
                    self.unput(saved_seq, attempted);
                }
                self.seq = saved_seq;
                self.hash = saved_hash;
                self.since_checkpoint = saved_since;
                self.tree = saved_tree;
                self.completed.clear();
                self.pending_head = None;
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        result
    }
}
