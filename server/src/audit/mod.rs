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
mod restore;
pub mod summary;
mod tlog;
mod writer;

pub use restore::{
    JournalAt, append_direct, check_journal, check_readable, loss_record, store_durable_through,
};
use restore::{STORE_DURABLE_KEY, load_tree, restore_from_journal};
use writer::{Cover, Exclusive, Msg, Scope, Writer};

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
    rec.reason = e.reason().as_str().into();
    if e.kind() == RefusalKind::Internal {
        rec.detail = "internal error (the site log has it)".into();
    } else {
        rec.detail = bounded(&e.to_string(), 300);
        tracing::info!(rpc = %rec.rpc, reason = e.reason().as_str(), detail = %log_safe(&rec.detail), "{what}");
    }
}

/// [`deny`] without the log line, for refusals counted into a summary entry (which logs the
/// first of its kind): a flood must not become a flood of log lines either.
pub fn deny_quietly(rec: &mut AuditRecord, e: &dyn Refusal) {
    rec.decision = "deny".into();
    rec.reason = e.reason().as_str().into();
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

/// An entry as the store holds it ([`AuditLog::range_stored`]).
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// Its seq (also its key).
    pub seq: u64,
    /// Its canonical JSON, as stored.
    pub json: String,
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
    /// How many of the newest stored entries a start reads before it serves; the rest of the
    /// log is read in the background (see [`AuditLog::read_through`]).
    pub start_check_entries: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            durable: true,
            start_check_entries: 8192,
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

const EXPORTED_KEY: &[u8] = b"audit/exported_through";

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

/// The background read of the whole stored log that a start leaves to after it serves (see
/// [`restore::check_readable`]): what it finds damaged stops every append, and the site reports
/// itself not ready, until an operator restores or recovers the store.
#[derive(Clone)]
struct Scrub {
    /// None while it reads; then how many entries it read, or what it found.
    done: watch::Receiver<Option<Result<u64, AuditError>>>,
    /// Set by [`AuditLog::stop`].
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// What it found damaged, set before `done` is: the writer refuses every commit (entries
    /// and checkpoints alike) that begins once it is set; [`AuditLog::read_through`] waits out
    /// the one commit that may have begun just before.
    damaged: Damage,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Scrub {
    /// Starts the read of the log in `dir`'s store; None: nothing to read (a shared database,
    /// or no journal), reported as done at once.
    fn start(
        store: &Store,
        dir: Option<std::path::PathBuf>,
        damaged: Damage,
    ) -> Result<Self, AuditError> {
        let (tx, done) = watch::channel(None);
        let scrub = Self {
            done,
            stop: Arc::default(),
            damaged,
            thread: Arc::default(),
        };
        let Some(dir) = dir else {
            let _ = tx.send(Some(Ok(0)));
            return Ok(scrub);
        };
        let (store, stop, damaged) = (store.clone(), scrub.stop.clone(), scrub.damaged.clone());
        let thread = std::thread::Builder::new()
            .name("audit-scrub".into())
            .spawn(move || {
                let began = std::time::Instant::now();
                let result = restore::scrub(&store, &dir, &stop);
                match &result {
                    Ok(n) if !stop.load(std::sync::atomic::Ordering::Relaxed) => {
                        tracing::info!(
                            entries = n,
                            seconds = began.elapsed().as_secs_f64(),
                            "audit log read through: every stored entry is readable"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = damaged.set(e.clone());
                        tracing::error!(error = %e, "audit log damaged: signing and every other audited call are refused from now on");
                    }
                }
                let _ = tx.send(Some(result));
            })
            .map_err(|e| AuditError::Thread(Arc::new(e)))?;
        if let Ok(mut t) = scrub.thread.lock() {
            *t = Some(thread);
        }
        Ok(scrub)
    }

    /// The damage it found, if any.
    fn damage(&self) -> Option<AuditError> {
        self.damaged.get().cloned()
    }
}

/// Damage the background read found in the stored log, shared by it, [`AuditLog`] and the
/// writer: set once, never cleared (a restore or `meshsignd recover` starts a new process).
pub(super) type Damage = Arc<std::sync::OnceLock<AuditError>>;

/// Appends entries through the group-commit writer.
#[derive(Clone)]
pub struct AuditLog {
    scrub: Scrub,
    failing: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Msg>,
    store: Store,
    head: watch::Receiver<u64>,
    key: AuditKey,
    origin: String,
    signed_head: watch::Receiver<Option<SignedHead>>,
    log_origin: String,
    signed_log_head: watch::Receiver<Option<SignedHead>>,
    /// The transparency log's durable size as the writer knows it.
    log_size: Arc<std::sync::atomic::AtomicU64>,
    /// Readers of the whole log (snapshots) against retention's removals from its front.
    front: Arc<Front>,
}

/// Who may change the front of the log: retention removes entries from it, a snapshot reads
/// the log from it after the writer went on. A removal waits for no reader (it is skipped,
/// and the next housekeeping pass tries again); a reader waits for a removal under way.
#[derive(Default)]
struct Front {
    /// (readers holding the front, a removal under way)
    state: std::sync::Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
}

impl Front {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// While held (see [`AuditLog::hold_front`]), retention removes no entry.
pub struct FrontHold(Arc<Front>);

impl Drop for FrontHold {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.0 = s.0.saturating_sub(1);
        self.0.changed.notify_all();
    }
}

/// A removal from the front under way (see [`AuditLog::prune`]).
struct Pruning(Arc<Front>);

impl Drop for Pruning {
    fn drop(&mut self) {
        self.0.lock().1 = false;
        self.0.changed.notify_all();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log and starts the writer thread. With a `journal` path, entries a crash left
    /// only in the journal are first written back into the store; the chain then continues from
    /// the last stored entry. The writer counts into `metrics`, the site's registry (the
    /// state makes it; the log only counts into it).
    pub fn open(
        store: Store,
        clock: SharedClock,
        (region, trust_domain): (&str, &str),
        key: AuditKey,
        (settings, metrics): (AuditSettings, Arc<crate::metrics::Metrics>),
        journal: Option<JournalAt<'_>>,
    ) -> Result<Self, AuditError> {
        // The newest entries are read before the site serves (a crash damages what was
        // written last); the whole log is read in the background once the writer runs.
        let scrub_dir = match (&journal, store.kv().chain()) {
            (Some(at), None) => {
                let dir = at.path.parent().unwrap_or(at.path).to_path_buf();
                restore::ReadThrough::tail(&store, &dir, settings.start_check_entries)?
                    .run(&store, &mut || true)?;
                Some(dir)
            }
            _ => None,
        };
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
        let origin = log_origin(trust_domain, region);
        let tlog_origin = meshsign_evidence::rekor::origin(trust_domain, region);
        let mut initial_head = None;
        let mut initial_log_head = None;
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
                if let Some(cp) = &last.checkpoint
                    && let Some(note) = &cp.log_note
                    && let Some(size) = note.lines().nth(1).and_then(|l| l.parse().ok())
                {
                    initial_log_head = Some(SignedHead {
                        size,
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
        let damaged: Damage = Arc::default();
        let tree = load_tree(&store, seq);
        let (signed_tx, signed_rx) = watch::channel(initial_head);
        let (signed_log_tx, signed_log_rx) = watch::channel(initial_log_head);
        let log = tlog::Transparency {
            tree: tlog::load(&store, seq),
            completed: Vec::new(),
            rows: Vec::new(),
            origin: tlog_origin.clone(),
            signed: signed_log_tx,
            pending_head: None,
            size: Arc::default(),
        };
        log.publish();
        let log_size = log.size.clone();
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
            chain_pending: Vec::new(),
            shared: store.kv().chain().is_some(),
            failing: failing.clone(),
            damaged: damaged.clone(),
            metrics,
            tree,
            completed: Vec::new(),
            origin: origin.to_string(),
            signed_head: signed_tx,
            pending_head: None,
            log,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.commit_loop(rx))
            .map_err(|e| AuditError::Thread(Arc::new(e)))?;
        let scrub = Scrub::start(&store, scrub_dir, damaged)?;
        Ok(Self {
            scrub,
            failing,
            tx,
            store,
            head: head_rx,
            key,
            origin,
            signed_head: signed_rx,
            log_origin: tlog_origin,
            signed_log_head: signed_log_rx,
            log_size,
            front: Arc::default(),
        })
    }

    /// The checkpoints' origin (first line of their notes).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A signed tree head covering entry `seq`: the newest one, or — if it does not reach
    /// `seq` yet — a checkpoint made now.
    pub async fn signed_head_covering(&self, seq: u64) -> Result<SignedHead, AuditError> {
        self.head_covering(Cover::Audit(seq)).await
    }

    /// The newest signed head of the log `cover` names if it covers what `cover` asks for,
    /// else one made now (requests queued behind one checkpoint share it).
    async fn head_covering(&self, cover: Cover) -> Result<SignedHead, AuditError> {
        let (heads, want) = match cover {
            Cover::Audit(seq) => (&self.signed_head, seq),
            Cover::Log(size) => (&self.signed_log_head, size),
        };
        let covering = || heads.borrow().clone().filter(|h| h.size >= want);
        if let Some(h) = covering() {
            return Ok(h);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(cover, tx))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)??;
        covering().ok_or_else(|| {
            AuditError::Tree(
                "no signed tree head covers the entry (the tree could not be built: see the site log)"
                    .into(),
            )
        })
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
        // A head this replica signed covers the entry (a receipt asked for after the next
        // checkpoint, the usual case): the entry is read in the same store call as the block
        // of its proof, off the runtime.
        let covering = self.signed_head.borrow().clone().filter(|h| h.size >= seq);
        if let Some(head) = covering {
            let (store, leaf) = (self.store.clone(), leaf_hash.to_vec());
            let hashes = tokio::task::spawn_blocking(move || {
                merkle::proof_if_leaf(&store, merkle::Log::Audit, seq - 1, head.size, &leaf)
            })
            .await
            .map_err(|e| AuditError::Tree(format!("proof task: {e}")))??;
            return Ok(hashes.map(|hashes| Proof {
                tree_size: head.size,
                hashes,
                checkpoint: head.note,
            }));
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
        merkle::proof(&self.store, merkle::Log::Audit, seq - 1, size)
    }

    /// The consistency proof from size `first` to size `second` of the log whose checkpoints
    /// carry `origin` — None if no such log, or `second` is past its newest signed tree head,
    /// or `first` is not in `1..=second`.
    pub async fn consistency(
        &self,
        origin: &str,
        first: u64,
        second: u64,
    ) -> Result<Option<Vec<meshsign_evidence::merkle::Hash>>, AuditError> {
        let (log, head) = if origin == self.origin {
            (
                merkle::Log::Audit,
                self.signed_head.borrow().as_ref().map(|h| h.size),
            )
        } else if origin == self.log_origin {
            (
                merkle::Log::Transparency,
                self.signed_log_head.borrow().as_ref().map(|h| h.size),
            )
        } else {
            return Ok(None);
        };
        if first == 0 || first > second || head.is_none_or(|h| second > h) {
            return Ok(None);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || merkle::consistency(&store, log, first, second))
            .await
            .map_err(|e| AuditError::Tree(format!("proof task: {e}")))?
            .map(Some)
    }

    /// The transparency log's checkpoint origin (`<trust domain>/<region>/log`).
    pub fn transparency_origin(&self) -> &str {
        &self.log_origin
    }

    /// The inclusion proof of transparency leaf `index`, if the log holds it and `leaf_hash`
    /// is its leaf hash, to the newest signed tree head of the log — or, if that does not
    /// cover it yet, a checkpoint made now (as for audit receipts: requests queued behind one
    /// checkpoint share it). Signing never asks for one.
    pub async fn prove_transparency(
        &self,
        index: u64,
        leaf_hash: &[u8],
    ) -> Result<Option<Proof>, AuditError> {
        // Only a leaf the log holds is written back if missing: an index past the end (this is
        // a public, unauthenticated call) is answered without searching the audit log.
        let size = self.log_size.load(std::sync::atomic::Ordering::Acquire);
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || {
            if index < size {
                merkle::log_leaf_or_write_back(&store, index)
            } else {
                merkle::log_leaf(&store, index)
            }
        })
        .await
        .map_err(|e| AuditError::Tree(format!("proof task: {e}")))??;
        let Some(leaf) = stored else {
            return Ok(None);
        };
        if leaf_hash.len() != 32
            || aws_lc_rs::constant_time::verify_slices_are_equal(&leaf, leaf_hash).is_err()
        {
            return Ok(None);
        }
        let head = self.head_covering(Cover::Log(index + 1)).await?;
        let store = self.store.clone();
        let size = head.size;
        let hashes = tokio::task::spawn_blocking(move || {
            merkle::proof(&store, merkle::Log::Transparency, index, size)
        })
        .await
        .map_err(|e| AuditError::Tree(format!("proof task: {e}")))??;
        Ok(Some(Proof {
            tree_size: head.size,
            hashes,
            checkpoint: head.note,
        }))
    }

    /// The public audit key (id, SPKI DER).
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Appends an entry (seq, ts, region and chain are filled in) and waits until it — and
    /// every write the request made to the store before it — is durable.
    pub async fn record(&self, rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        Ok(self.send(rec, Scope::Store).await?.0)
    }

    /// [`AuditLog::record`] for a decision that wrote nothing else to the store (signing
    /// requests): only the entry must be durable, which the journal does without a store flush.
    pub async fn record_sign(&self, rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        Ok(self.send(rec, Scope::Entry).await?.0)
    }

    /// [`AuditLog::record`] (`store_scope`) or [`AuditLog::record_sign`], returning with the
    /// entry its stored bytes (canonical JSON), as the writer made them: a response that
    /// carries the entry does not encode it again.
    pub async fn record_sealed(
        &self,
        rec: AuditRecord,
        store_scope: bool,
    ) -> Result<(AuditRecord, Vec<u8>), AuditError> {
        let scope = if store_scope {
            Scope::Store
        } else {
            Scope::Entry
        };
        self.send(rec, scope).await
    }

    async fn send(
        &self,
        rec: AuditRecord,
        scope: Scope,
    ) -> Result<(AuditRecord, Vec<u8>), AuditError> {
        if let Some(e) = self.scrub.damage() {
            return Err(e);
        }
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

    /// Whether the last commit failed (writes are refused until a repair or a commit works),
    /// or the background read found the stored log damaged (refused until a restore).
    pub fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::SeqCst) || self.scrub.damaged.get().is_some()
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

    /// Stops the writer after what is queued (shutdown), and the background read of the log;
    /// later records fail with `Stopped`.
    pub async fn stop(&self) {
        self.scrub
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.scrub.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits for the background read of the whole stored log that each start makes (see
    /// [`check_readable`]) and returns how many entries it read, or the damage it found — which
    /// also refuses every append from then on and makes [`AuditLog::is_failing`] true. A
    /// shared database's log is not read (its engine checks pages itself): `Ok(0)`.
    ///
    /// When it reports damage, a commit the writer had already begun before the damage was
    /// set (a periodic checkpoint, a batch of entries) has landed before this returns: it
    /// waits for the writer to go between two commits once. From its return on, the head does
    /// not move.
    pub async fn read_through(&self) -> Result<u64, AuditError> {
        let mut rx = self.scrub.done.clone();
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AuditError::Stopped)?
            .clone()
            .unwrap_or(Err(AuditError::Stopped));
        if result.is_err() {
            // The writer's damage check comes at the start of each commit; one pass between
            // commits orders every commit after this one behind the damage.
            self.exclusive(|_, _, _| ()).await?;
        }
        result
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

    /// Entries with seq ≥ `from`, at most `limit`, as stored: each one's canonical JSON, which
    /// is what `serde_json` writes of the [`AuditRecord`] (the store encodes it so), without
    /// building the record. Each is checked to be UTF-8 and to be a whole object whose first
    /// field is the seq of its key (`{"seq":N,` … `}`): a cut or misplaced entry ends the
    /// page before it, and fails the read that starts at it. The rest is the verifier's:
    /// `meshsign audit verify` decodes every line and checks its hash and chain, which no
    /// damage inside an entry passes.
    pub fn range_stored(&self, from: u64, limit: usize) -> Result<Vec<StoredEntry>, AuditError> {
        let mut out = Vec::new();
        for (k, v) in self
            .store
            .kv()
            .scan_range(Tree::Audit, &from.to_be_bytes(), limit)?
        {
            let key = <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .unwrap_or_default();
            let damaged = |what: String| {
                AuditError::entry("stored")(serde::de::Error::custom(format_args!(
                    "the entry under seq {key}: {what}"
                )))
            };
            let head = format!("{{\"seq\":{key},");
            let json = if !v.starts_with(head.as_bytes()) || v.last() != Some(&b'}') {
                Err(damaged(format!(
                    "not an object that starts with {head} and ends with }}"
                )))
            } else {
                String::from_utf8(v).map_err(|e| damaged(e.to_string()))
            };
            match json {
                Ok(json) => out.push(StoredEntry { seq: key, json }),
                // The entries before it are sent; the read that starts at it fails.
                Err(_) if !out.is_empty() => break,
                Err(e) => return Err(e),
            }
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
        let _pruning = {
            let mut s = self.front.lock();
            if s.0 > 0 {
                tracing::debug!("audit retention waits: a snapshot is reading the log");
                return Ok(None);
            }
            s.1 = true;
            Pruning(self.front.clone())
        };
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

    /// Holds the front of the log: until the hold is dropped, retention removes nothing (a
    /// snapshot reads the log after the writer went on). Blocks while a removal is under way.
    pub fn hold_front(&self) -> FrontHold {
        let mut s = self.front.lock();
        while s.1 {
            s = self
                .front
                .changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        s.0 += 1;
        FrontHold(self.front.clone())
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

/// The transparency log's size at audit entry `seq` (the leaves the entries through it added).
pub fn transparency_size_at(store: &Store, seq: u64) -> Result<u64, AuditError> {
    Ok(tlog::size_at(store, seq)?.0)
}

/// The checkpoints' origin: `<trust domain>/<region>/audit`.
pub fn log_origin(trust_domain: &str, region: &str) -> String {
    format!("{trust_domain}/{region}/audit")
}
