//! Persistent state behind a small trait of ours ([`Kv`]), so another embedded engine (or
//! PostgreSQL for replicated sites, DESIGN.md "Beyond one machine") can replace sled without
//! touching the core. [`Store`] adds typed records on top; records are JSON.
//!
//! Owns: the engine, the tree names, record encoding. Must not touch: what the records mean
//! (that is `state`, `ca`, `custody`, `audit`); it imports no other module of this crate.
//!
//! Nothing secret is stored in the clear: key records hold AEAD ciphertext (see `custody`).

use std::path::Path;
use std::sync::Arc;

use serde::{Serialize, de::DeserializeOwned};

pub mod postgres;
pub mod segments;
pub mod slots;
pub use postgres::{PgKv, PgSettings};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, corruption, read-only disk).
    #[error("storage engine: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A folder or file of the store could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The engine found its files damaged (it panicked opening them).
    #[error(
        "the store {path} is damaged ({message}); nothing was changed. Restore a snapshot \
             (`meshsignd restore`), or run `meshsignd recover` to see what is intact"
    )]
    Damaged {
        /// The damaged file.
        path: std::path::PathBuf,
        /// What the engine said.
        message: String,
    },
    /// The database cannot be reached now (a replicated site's PostgreSQL is down or
    /// unreachable); the call may succeed once it is back.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is not one this binary can use.
    #[error("database schema: {0}")]
    Schema(String),
    /// A stored record did not decode (or a record did not encode).
    #[error("corrupt record in {tree}: {source}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Decoder error.
        #[source]
        source: serde_json::Error,
    },
}

/// The named trees meshsign uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    /// Wrapped signing keys: `environment/alias/version` → [`crate::custody::KeyRecord`].
    Keys,
    /// Runner CAs: `environment/issuer_id` → [`crate::ca::RunnerCaRecord`].
    RunnerCas,
    /// Issued runner certificates: serial hex → [`crate::model::CertRecord`].
    Certs,
    /// Seen token IDs: `sha256(iss)/jti` → expiry (unix seconds, big-endian).
    Jti,
    /// Audit records: seq (big-endian) → [`meshsign_evidence::audit::AuditRecord`].
    Audit,
    /// Ops overlay on trust policies: `environment/policy` → [`crate::state::overlays::PolicyOverlay`].
    Policies,
    /// Revocation rules: id → [`crate::model::RevocationRule`].
    Revocations,
    /// Ops state of signing keys: `environment/alias` → [`crate::state::overlays::KeyMeta`].
    KeyMeta,
    /// Small site facts (e.g. `audit/exported_through`).
    Meta,
    /// Signatures counted per job, key and certificate (see `state::usage`).
    Usage,
    /// Stored nodes of the audit log's Merkle tree: `level ‖ index` → hash (`audit::merkle`).
    Merkle,
    /// Distrust lists: environment → [`crate::ops::distrust::Stored`].
    Distrust,
}

impl Tree {
    /// Every tree, in engine order.
    pub const ALL: [Tree; 12] = [
        Tree::Keys,
        Tree::RunnerCas,
        Tree::Certs,
        Tree::Jti,
        Tree::Audit,
        Tree::Policies,
        Tree::Revocations,
        Tree::KeyMeta,
        Tree::Meta,
        Tree::Usage,
        Tree::Merkle,
        Tree::Distrust,
    ];

    /// The tree with this engine name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The tree's name in the engine.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Keys => "keys",
            Tree::RunnerCas => "issuers",
            Tree::Certs => "certs",
            Tree::Jti => "jti",
            Tree::Audit => "audit",
            Tree::Policies => "policies",
            Tree::Revocations => "revocations",
            Tree::KeyMeta => "keymeta",
            Tree::Meta => "meta",
            Tree::Usage => "usage",
            Tree::Merkle => "merkle",
            Tree::Distrust => "distrust",
        }
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A scan as [`Kv::scan_range`] takes it: the tree, the first key, at most this many entries.
pub type Scan<'a> = (Tree, &'a [u8], usize);

/// What [`Kv::scans_and_get_many`] reads: each scan's entries, then the keys' values.
pub type ScansAndValues = (Vec<Vec<Entry>>, Vec<Option<Vec<u8>>>);

/// The operations meshsign needs from an embedded key-value engine.
pub trait Kv: Send + Sync + 'static {
    /// Reads a value.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Reads several values of one tree, in the order of `keys` (None for an absent key): one
    /// round trip on a database (the nodes of an inclusion proof), a get per key by default.
    fn get_many(&self, tree: Tree, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(tree, k)).collect()
    }
    /// Writes a value.
    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Writes several values of one tree, in order (an audit batch): one write where the
    /// engine can gather them (the embedded audit segments), a `put` each by default. On an
    /// error, those before the failing one may be stored.
    fn put_many(&self, tree: Tree, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        entries.iter().try_for_each(|(k, v)| self.put(tree, k, v))
    }
    /// Writes only if the key is absent; returns false if it was present (atomic).
    fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<bool, StoreError>;
    /// Replaces the value only if it is still `old` byte for byte; returns false (and writes
    /// nothing) if another writer — this process or another replica — changed or removed it
    /// first (atomic: sled's compare-and-swap, PostgreSQL's `UPDATE … WHERE value = $old`).
    /// What replicas must agree on (a proposal used once, a session's generation) goes
    /// through here, never through a process lock.
    fn update(&self, tree: Tree, key: &[u8], old: &[u8], new: &[u8]) -> Result<bool, StoreError>;
    /// Removes a key.
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError>;
    /// All entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// Up to `limit` entries with key ≥ `from`, in key order.
    fn scan_range(&self, tree: Tree, from: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// [`Kv::scan_range`] of each of `scans` and [`Kv::get_many`] of `get` (tree, keys) as
    /// one read: one round trip on a database (an inclusion proof's blocks of entries and the
    /// nodes it names), the calls one by one by default (no `get_many` for no keys).
    fn scans_and_get_many(
        &self,
        scans: &[Scan<'_>],
        get: (Tree, &[Vec<u8>]),
    ) -> Result<ScansAndValues, StoreError> {
        one_by_one(self, scans, get)
    }
    /// The seqs of up to `limit` audit entries from seq `from` on ([`Tree::Audit`]'s keys are
    /// big-endian seqs), each entry read as [`Kv::scan_range`] reads it but its value not kept:
    /// a read-through that checks every stored entry is readable. `scratch` is the caller's,
    /// reused from call to call by engines that read into a buffer.
    fn scan_seqs(
        &self,
        from: u64,
        limit: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u64>, StoreError> {
        let _ = scratch;
        self.scan_range(Tree::Audit, &from.to_be_bytes(), limit)?
            .into_iter()
            .map(|(k, _)| {
                <[u8; 8]>::try_from(k.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        StoreError::Engine(
                            format!("an audit key of {} bytes is not a seq", k.len()).into(),
                        )
                    })
            })
            .collect()
    }
    /// The last entry of a tree in key order.
    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// After a failed write: make the engine usable again if it keeps the error (sled keeps an
    /// I/O error until it is reopened). Returns whether it did anything. Only what was durable
    /// survives; the caller replays what it must (the audit journal).
    fn recover(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// For an engine that several processes share (replicas on PostgreSQL): the audit chain's
    /// shared head. `None` (sled): this process's writer is the only one.
    fn chain(&self) -> Option<&dyn SharedChain> {
        None
    }

    /// For a shared engine: the ops generation, which every ops change moves so that other
    /// replicas reload. `None` for an engine only this process uses.
    fn generation(&self) -> Option<Result<i64, StoreError>> {
        None
    }

    /// Moves the ops generation (a no-op for an engine only this process uses).
    fn bump_generation(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// For a shared engine: holds the site-wide start-up lock until [`Kv::end_startup`], so
    /// replicas starting together open the site one after the other — the first creates what a
    /// new site needs (keys, runner CAs, the audit key), the others load it.
    fn begin_startup(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Releases the lock [`Kv::begin_startup`] took.
    fn end_startup(&self) {}

    /// Where a store outside the data folder is (a database URL, no password), for messages;
    /// `None` for an engine in the data folder.
    fn location(&self) -> Option<String> {
        None
    }
}

/// An audit chain shared by several writers (replicas): one group commit at a time holds the
/// head.
pub trait SharedChain: Send + Sync {
    /// Begins a commit: locks the chain head and returns it (seq, hash).
    fn begin(&self) -> Result<(u64, String), StoreError>;
    /// Stores `entries` (seq, encoded entry), moves the head to `head` and commits, releasing
    /// the lock. Durable when it returns.
    fn commit(&self, entries: &[(u64, Vec<u8>)], head: (u64, &str)) -> Result<(), StoreError>;
    /// Abandons the commit begun, releasing the lock.
    fn rollback(&self);
}

/// [`Kv`] on sled 0.34. The database is held behind a lock so that it can be reopened in place
/// after an I/O error (sled keeps the first I/O error — a full disk — and fails every later
/// write until it is reopened); see [`Kv::recover`].
///
/// The audit log ([`Tree::Audit`]) is not in sled: it is kept in append-only segment files in
/// `<dir>/audit` ([`segments`]), so that neither a start nor the resident memory grows with it.
/// A store whose audit entries are still in sled (a site from before) has them moved at open.
///
/// Likewise the Merkle trees' nodes and the transparency leaves ([`Tree::Merkle`] keys that
/// [`slots::holds`]) are kept in fixed-slot files in `<dir>/merkle` ([`slots`]): written once
/// where their (level, index) puts them, with nothing for sled to log, rewrite or replay.
pub struct SledKv {
    dir: std::path::PathBuf,
    cache_bytes: u64,
    inner: std::sync::RwLock<Option<Arc<SledInner>>>,
    audit: segments::SegmentLog,
    nodes: slots::NodeFiles,
}

/// [`Kv::scans_and_get_many`] as the calls one by one: each scan, then `get_many` (none for no
/// keys). The trait's default, and what an engine (or a wrapper) falls back to.
pub fn one_by_one<K: Kv + ?Sized>(
    kv: &K,
    scans: &[Scan<'_>],
    get: (Tree, &[Vec<u8>]),
) -> Result<ScansAndValues, StoreError> {
    let entries = scans
        .iter()
        .map(|&(tree, from, limit)| kv.scan_range(tree, from, limit))
        .collect::<Result<_, _>>()?;
    let values = if get.1.is_empty() {
        Vec::new()
    } else {
        kv.get_many(get.0, get.1)?
    };
    Ok((entries, values))
}

/// Merges two key-ordered lists (keys are in one or the other), keeping the first `limit`.
fn merge_sorted(mut a: Vec<Entry>, b: Vec<Entry>, limit: usize) -> Vec<Entry> {
    if b.is_empty() {
        a.truncate(limit);
        return a;
    }
    a.extend(b);
    a.sort_by(|x, y| x.0.cmp(&y.0));
    a.truncate(limit);
    a
}

struct SledInner {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(Box::new(e))
}

impl SledKv {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, Self::DEFAULT_CACHE_BYTES)
    }

    /// sled's page cache when not configured: 32 MiB.
    pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

    /// Opens (or creates) the database in `dir` with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let inner = SledInner::open(dir, cache_bytes)?;
        let audit = segments::SegmentLog::open(&segments::dir_of(dir))?;
        move_audit_out_of_sled(&inner, &audit)?;
        let nodes = slots::NodeFiles::open(&slots::dir_of(dir));
        move_nodes_out_of_sled(&inner, &nodes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cache_bytes,
            inner: std::sync::RwLock::new(Some(Arc::new(inner))),
            audit,
            nodes,
        })
    }

    fn db(&self) -> Result<Arc<SledInner>, StoreError> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Engine("the store is being reopened after an I/O error".into())
            })
    }
}

impl SledInner {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // sled releases its file lock when the last handle of a database is gone, which its
        // own background threads may hold a moment after this process dropped it (a refused
        // start, `recover`, then a start). Retried for up to a second; another process that
        // holds the folder keeps it and the error says so.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .open()
            {
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::Other
                        && e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.map_err(engine)?,
            }
        };
        let t = |t: Tree| db.open_tree(t.name()).map_err(engine);
        // One sled tree per `Tree`, in `Tree::ALL` order (which is the enum's: tested).
        let trees = Tree::ALL
            .iter()
            .map(|&tree| t(tree))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { db, trees })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree as usize]
    }
}

/// Moves audit entries a store from before kept in sled into the segment log, then empties
/// sled's tree. Idempotent: a crash part way leaves both, and the next open goes on from the
/// segment log's last entry (entries both hold must be the same).
fn move_audit_out_of_sled(
    inner: &SledInner,
    audit: &segments::SegmentLog,
) -> Result<(), StoreError> {
    let tree = inner.tree(Tree::Audit);
    if tree.is_empty() {
        return Ok(());
    }
    let mut moved = 0u64;
    for row in tree.iter() {
        let (k, v) = row.map_err(engine)?;
        audit.put(&k, &v)?;
        moved += 1;
    }
    audit.flush()?;
    tree.clear().map_err(engine)?;
    inner.db.flush().map_err(engine)?;
    tracing::info!(
        entries = moved,
        "audit entries moved from sled into the audit segment log"
    );
    Ok(())
}

/// Moves the Merkle nodes and transparency leaves a store from before kept in sled into the
/// node files, then takes them out of sled. Idempotent (the files are written before sled
/// forgets them; writing a node again writes the same bytes). A value of the wrong size is
/// dropped: nodes are derived from the audit log, and what is missing is recomputed or
/// written back.
fn move_nodes_out_of_sled(inner: &SledInner, nodes: &slots::NodeFiles) -> Result<(), StoreError> {
    let tree = inner.tree(Tree::Merkle);
    let mut moved = 0u64;
    let mut dropped = 0u64;
    let mut batch = sled::Batch::default();
    for row in tree.iter() {
        let (k, v) = row.map_err(engine)?;
        if !slots::holds(&k) {
            continue;
        }
        match nodes.put(&k, &v) {
            Ok(()) => moved += 1,
            Err(StoreError::Engine(_)) => dropped += 1,
            Err(e) => return Err(e),
        }
        batch.remove(k);
    }
    if moved + dropped == 0 {
        return Ok(());
    }
    nodes.flush()?;
    tree.apply_batch(batch).map_err(engine)?;
    inner.db.flush().map_err(engine)?;
    tracing::info!(
        moved,
        dropped,
        "Merkle nodes and transparency leaves moved from sled into the node files"
    );
    Ok(())
}

impl SledKv {
    /// Whether `key` of `tree` is kept in the node files.
    fn in_nodes(tree: Tree, key: &[u8]) -> bool {
        tree == Tree::Merkle && slots::holds(key)
    }
}

/// The first seq at or after the key `from` in byte order (audit keys are big-endian seqs).
fn first_seq_from(from: &[u8]) -> u64 {
    let mut be = [0u8; 8];
    let n = from.len().min(8);
    be[..n].copy_from_slice(&from[..n]);
    let seq = u64::from_be_bytes(be);
    if from.len() > 8 {
        seq.saturating_add(1)
    } else {
        seq
    }
}

impl Kv for SledKv {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if tree == Tree::Audit {
            return self.audit.get(key);
        }
        if Self::in_nodes(tree, key) {
            return self.nodes.get(key);
        }
        Ok(self
            .db()?
            .tree(tree)
            .get(key)
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn put_many(&self, tree: Tree, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        if tree == Tree::Audit {
            return self.audit.put_many(entries);
        }
        entries.iter().try_for_each(|(k, v)| self.put(tree, k, v))
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if tree == Tree::Audit {
            return self.audit.put(key, value);
        }
        if Self::in_nodes(tree, key) {
            return self.nodes.put(key, value);
        }
        self.db()?
            .tree(tree)
            .insert(key, value)
            .map_err(engine)
            .map(|_| ())
    }

    fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        if tree == Tree::Audit {
            if self.audit.get(key)?.is_some() {
                return Ok(false);
            }
            return self.audit.put(key, value).map(|()| true);
        }
        if Self::in_nodes(tree, key) {
            return self.nodes.insert_new(key, value);
        }
        let r = self
            .db()?
            .tree(tree)
            .compare_and_swap(key, None as Option<&[u8]>, Some(value))
            .map_err(engine)?;
        Ok(r.is_ok())
    }

    fn update(&self, tree: Tree, key: &[u8], old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        if tree == Tree::Audit {
            if self.audit.get(key)?.as_deref() != Some(old) {
                return Ok(false);
            }
            return self.audit.put(key, new).map(|()| true);
        }
        if Self::in_nodes(tree, key) {
            return self.nodes.update(key, old, new);
        }
        let r = self
            .db()?
            .tree(tree)
            .compare_and_swap(key, Some(old), Some(new))
            .map_err(engine)?;
        Ok(r.is_ok())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        if tree == Tree::Audit {
            return self.audit.remove(key);
        }
        if Self::in_nodes(tree, key) {
            return self.nodes.remove(key);
        }
        self.db()?
            .tree(tree)
            .remove(key)
            .map_err(engine)
            .map(|_| ())
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        if tree == Tree::Audit {
            let mut rows = self.audit.range(0, usize::MAX)?;
            rows.retain(|(k, _)| k.starts_with(prefix));
            return Ok(rows);
        }
        let in_sled = self
            .db()?
            .tree(tree)
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine))
            .collect::<Result<Vec<_>, _>>()?;
        if tree != Tree::Merkle {
            return Ok(in_sled);
        }
        let in_files = self.nodes.scan(prefix, prefix, usize::MAX)?;
        Ok(merge_sorted(in_sled, in_files, usize::MAX))
    }

    fn scan_range(&self, tree: Tree, from: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError> {
        if tree == Tree::Audit {
            return self.audit.range(first_seq_from(from), limit);
        }
        let in_sled = self
            .db()?
            .tree(tree)
            .range(from..)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine))
            .collect::<Result<Vec<_>, _>>()?;
        if tree != Tree::Merkle {
            return Ok(in_sled);
        }
        let in_files = self.nodes.scan(from, b"", limit)?;
        Ok(merge_sorted(in_sled, in_files, limit))
    }

    fn scan_seqs(
        &self,
        from: u64,
        limit: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u64>, StoreError> {
        self.audit.seqs(from, limit, scratch)
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        if tree == Tree::Audit {
            return self.audit.last();
        }
        let in_sled = self
            .db()?
            .tree(tree)
            .last()
            .map_err(engine)?
            .map(|(k, v)| (k.to_vec(), v.to_vec()));
        if tree != Tree::Merkle {
            return Ok(in_sled);
        }
        Ok(match (in_sled, self.nodes.last()?) {
            (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
            (a, b) => a.or(b),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        // The entries first: what sled records about them (the durable point, the tree's
        // nodes) must never be durable before they are.
        self.audit.flush()?;
        self.nodes.flush()?;
        self.db()?.db.flush().map_err(engine).map(|_| ())
    }

    fn recover(&self) -> Result<bool, StoreError> {
        // Reopen only once the disk takes writes again: a reopen that fails would leave no
        // store at all (and reads work on the old one meanwhile).
        probe_writable(&self.dir)?;
        self.audit.recover()?;
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mut old) = guard.take() {
            // Calls in flight hold a clone for one call each; wait for them, then close sled
            // (its file lock goes with the last handle).
            loop {
                match Arc::try_unwrap(old) {
                    Ok(inner) => {
                        drop(inner);
                        break;
                    }
                    Err(still) => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
        let reopened = SledInner::open(&self.dir, self.cache_bytes)?;
        *guard = Some(Arc::new(reopened));
        Ok(true)
    }
}

/// Typed access to the trees.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Wraps an engine.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }

    /// Opens sled in `dir`. sled panics on some damaged files instead of returning an error;
    /// that panic is caught here and becomes [`StoreError::Damaged`], naming the file.
    pub fn open_sled(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        match std::panic::catch_unwind(|| SledKv::open_with_cache(dir, cache_bytes)) {
            Ok(kv) => Ok(Self::new(Arc::new(kv?))),
            Err(panic) => Err(StoreError::Damaged {
                path: dir.join("db"),
                message: panic_message(panic.as_ref()),
            }),
        }
    }

    /// The raw engine.
    pub fn kv(&self) -> &dyn Kv {
        &*self.kv
    }

    /// Reads and decodes a record.
    pub fn get<T: DeserializeOwned>(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.kv
            .get(tree, key)?
            .map(|v| decode(tree, &v))
            .transpose()
    }

    /// Reads and decodes many records in one store call ([`Kv::get_many`]: one round trip on
    /// a database), in the order of `keys`.
    pub fn get_many<T: DeserializeOwned>(
        &self,
        tree: Tree,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<T>>, StoreError> {
        self.kv
            .get_many(tree, keys)?
            .into_iter()
            .map(|v| v.map(|v| decode(tree, &v)).transpose())
            .collect()
    }

    /// Encodes and writes a record.
    pub fn put<T: Serialize>(&self, tree: Tree, key: &[u8], value: &T) -> Result<(), StoreError> {
        self.kv.put(tree, key, &encode(tree, value)?)
    }

    /// Encodes `new` and writes it only if the stored bytes are still `old` (as read); false
    /// if another writer got there first. See [`Kv::update`].
    pub fn update<T: Serialize>(
        &self,
        tree: Tree,
        key: &[u8],
        old: &[u8],
        new: &T,
    ) -> Result<bool, StoreError> {
        self.kv.update(tree, key, old, &encode(tree, new)?)
    }

    /// Reads and decodes a record, with the bytes it was decoded from (for [`Store::update`]).
    pub fn get_raw<T: DeserializeOwned>(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<(T, Vec<u8>)>, StoreError> {
        match self.kv.get(tree, key)? {
            None => Ok(None),
            Some(v) => Ok(Some((decode(tree, &v)?, v))),
        }
    }

    /// Encodes and writes a record only if the key is absent.
    pub fn insert_new<T: Serialize>(
        &self,
        tree: Tree,
        key: &[u8],
        value: &T,
    ) -> Result<bool, StoreError> {
        self.kv.insert_new(tree, key, &encode(tree, value)?)
    }

    /// Decodes every record under `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(
        &self,
        tree: Tree,
        prefix: &[u8],
    ) -> Result<Vec<T>, StoreError> {
        self.kv
            .scan_prefix(tree, prefix)?
            .iter()
            .map(|(_, v)| decode(tree, v))
            .collect()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush()
    }
}

/// Whether `dir` takes a small durable write now (64 KiB, synced, removed).
fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write as _;
    let path = dir.join(".meshsign-write-probe");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let result = std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&[0u8; 64 * 1024]).and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&path);
    result.map_err(io)
}

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the storage engine panicked".into())
}

fn encode<T: Serialize>(tree: Tree, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        tree: tree.name(),
        source: e,
    })
}

fn decode<T: DeserializeOwned>(tree: Tree, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree: tree.name(),
        source: e,
    })
}

/// Serde helper: `Vec<u8>` as lowercase hex.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as hex.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Deserializes from hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Serde helper: `Vec<Vec<u8>>` as a list of hex strings.
pub mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    /// Serializes as a list of hex strings.
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(&hex::encode(b))?;
        }
        seq.end()
    }

    /// Deserializes from a list of hex strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Kv, SledKv, Tree};

    /// A store from before kept its audit entries in sled: they move into the segment log at
    /// open, sled's tree is emptied, and a crash between the two (both hold them) is gone on
    /// with, not doubled.
    #[test]
    fn audit_entries_kept_in_sled_move_into_the_segment_log_once() {
        let dir = tempfile::tempdir().unwrap();
        let put_in_sled = |from: u64, to: u64| {
            // As the store opens it: sled's threads may hold the folder's lock a moment
            // after the last handle was dropped (a test failed on it on a busy machine). A
            // test: the folder is a fresh temp one; a failure to open it is the test's.
            let db = super::SledInner::open(dir.path(), 1 << 20).unwrap().db;
            let tree = db.open_tree(Tree::Audit.name()).unwrap();
            for seq in from..=to {
                tree.insert(seq.to_be_bytes(), format!("entry {seq}").as_bytes())
                    .unwrap();
            }
            db.flush().unwrap();
        };
        put_in_sled(1, 500);
        let kv = SledKv::open(dir.path()).unwrap();
        assert_eq!(
            kv.get(Tree::Audit, &7u64.to_be_bytes()).unwrap(),
            Some(b"entry 7".to_vec())
        );
        assert_eq!(
            kv.scan_range(Tree::Audit, b"", usize::MAX).unwrap().len(),
            500
        );
        assert!(kv.db().unwrap().tree(Tree::Audit).is_empty());
        drop(kv);
        // As a crash part way leaves it: sled holds entries the segment log holds too.
        put_in_sled(400, 520);
        let kv = SledKv::open(dir.path()).unwrap();
        let all = kv.scan_range(Tree::Audit, b"", usize::MAX).unwrap();
        assert_eq!(all.len(), 520);
        assert_eq!(all[519].1, b"entry 520".to_vec());
        assert!(
            dir.path()
                .join("audit")
                .join("00000000000000000001.seg")
                .exists()
        );
    }

    /// A store from before kept its Merkle nodes and transparency leaves in sled: at open the
    /// ones the node files hold move there (rows, old one-leaf keys, dense levels), the rest
    /// (low audit levels) stay in sled, reads and scans see the same keys and values as before,
    /// and a second open finds nothing to move.
    #[test]
    fn merkle_nodes_kept_in_sled_move_into_the_node_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = |p: &[u8], i: u64| [p, &i.to_be_bytes()[..]].concat();
        let mut row = vec![0u8; super::slots::ROW_BYTES];
        row[..2].copy_from_slice(&1u16.to_be_bytes());
        row[2..34].copy_from_slice(&[7; 32]);
        let old: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (key(&[2], 5), vec![2; 32]),
            (key(&[4], 0), vec![4; 32]),
            (key(&[4], 3), vec![5; 32]),
            (key(&[20], 0), vec![20; 32]),
            (key(b"T\x04", 1), vec![9; 32]),
            (key(b"T\xFE", 2), row.clone()),
        ];
        {
            // As the store opens it: sled's threads may hold the folder's lock a moment
            // after the last handle was dropped (a test failed on it on a busy machine). A
            // test: the folder is a fresh temp one; a failure to open it is the test's.
            let db = super::SledInner::open(dir.path(), 1 << 20).unwrap().db;
            let tree = db.open_tree(Tree::Merkle.name()).unwrap();
            for (k, v) in &old {
                tree.insert(k, v.as_slice()).unwrap();
            }
            // An old one-leaf key in row 2's slot 1.
            tree.insert(key(b"T\x00", 33), &[8; 32]).unwrap();
            db.flush().unwrap();
        }
        let kv = SledKv::open(dir.path()).unwrap();
        let sled_keys: Vec<Vec<u8>> = kv
            .db()
            .unwrap()
            .tree(Tree::Merkle)
            .iter()
            .map(|r| r.unwrap().0.to_vec())
            .collect();
        assert_eq!(
            sled_keys,
            vec![key(&[2], 5)],
            "only the low level stays in sled"
        );
        let mut merged = row.clone();
        merged[..2].copy_from_slice(&3u16.to_be_bytes());
        merged[34..66].copy_from_slice(&[8; 32]);
        let mut want = old.clone();
        want[5].1 = merged;
        assert_eq!(kv.scan_range(Tree::Merkle, b"", usize::MAX).unwrap(), want);
        assert_eq!(
            kv.get(Tree::Merkle, &key(&[4], 3)).unwrap(),
            Some(vec![5; 32])
        );
        assert_eq!(kv.last(Tree::Merkle).unwrap(), want.last().cloned());
        // Paged as a snapshot pages: every key once.
        let mut paged = Vec::new();
        let mut from = Vec::new();
        loop {
            let page = kv.scan_range(Tree::Merkle, &from, 2).unwrap();
            paged.extend(page.iter().cloned());
            match page.last() {
                Some((k, _)) if page.len() == 2 => {
                    from = k.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        assert_eq!(paged, want);
        drop(kv);
        let kv = SledKv::open(dir.path()).unwrap();
        assert_eq!(kv.scan_range(Tree::Merkle, b"", usize::MAX).unwrap(), want);
    }

    #[test]
    fn every_tree_is_listed_in_enum_order_with_its_own_name() {
        // The sled engine indexes its trees by `tree as usize` in `Tree::ALL` order.
        for (i, t) in Tree::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i, "{}", t.name());
            assert_eq!(Tree::from_name(t.name()), Some(t));
        }
    }
}
