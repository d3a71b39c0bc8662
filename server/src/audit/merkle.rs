//! The audit log's Merkle tree kept beside the chain (`meshsign_evidence::merkle` has the
//! hashing): leaf `i` is entry `seq = i + 1`. The writer extends it in memory as it appends
//! (a [`Frontier`]) and signs its root into every checkpoint as a C2SP signed note; inclusion
//! proofs are computed from the store on request.
//!
//! **Stored nodes.** Perfect subtrees of at least [`STORED_LEVEL`] levels are kept in
//! [`Tree::Merkle`] (`level ‖ index`, 9 bytes → 32-byte hash) once the entries under them
//! are durable, so a proof reads O(log² n) small values plus at most a few dozen entries.
//! A node that is missing is recomputed from what is under it and stored. Before retention
//! removes entries, the subtrees covering them are stored ([`keep_for_prune`]), so proofs for
//! later entries never need a removed one.
//!
//! Nodes depend only on the entries, which never change once durable, so every replica of a
//! site computes and stores the same values.
//!
//! **The transparency log** ([`Log::Transparency`], `meshsign_evidence::rekor`) is a second
//! tree in the same store tree, its keys prefixed with `T`: leaf `i` is the `i`-th Rekor body
//! the site wrote. Its leaf hashes are named by the audit entries that added them
//! (`AuditRecord::tlog`) and stored as level-0 nodes with the batch (the leaves written by an
//! append are its only level-0 puts; levels 1–3 are recomputed like the audit tree's), and a
//! lost level-0 node is written back from its audit entry (start, journal restore, a replica
//! catching up).

use meshsign_evidence::merkle::{self, Completed, Frontier, Hash};

use super::AuditError;
use crate::store::{Store, Tree};

/// Perfect subtrees of this many levels (16 leaves) or more are stored.
pub const STORED_LEVEL: u32 = 4;

/// Which of the site's two trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    /// The audit log: leaf `i` is entry `seq = i + 1`.
    Audit,
    /// The transparency log: leaf `i` is the `i`-th Rekor body; leaves are stored nodes.
    Transparency,
}

impl Log {
    /// Whether nodes of `level` are stored: perfect subtrees of [`STORED_LEVEL`] levels or
    /// more, and the transparency log's leaves (nothing else holds them but the audit entries).
    fn stores(self, level: u32) -> bool {
        level >= STORED_LEVEL || (self == Log::Transparency && level == 0)
    }
}

fn key(log: Log, level: u32, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    if log == Log::Transparency {
        k.push(b'T');
    }
    k.push(u8::try_from(level).unwrap_or(u8::MAX));
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The transparency log's leaf `index`, if stored.
pub fn log_leaf(store: &Store, index: u64) -> Result<Option<Hash>, AuditError> {
    Ok(store
        .kv()
        .get(Tree::Merkle, &key(Log::Transparency, 0, index))?
        .and_then(|v| Hash::try_from(v.as_slice()).ok()))
}

/// Stores the transparency log's leaves from `index` on (level-0 nodes).
pub fn put_log_leaves(store: &Store, index: u64, leaves: &[Hash]) -> Result<(), AuditError> {
    for (i, leaf) in (index..).zip(leaves) {
        store
            .kv()
            .put(Tree::Merkle, &key(Log::Transparency, 0, i), leaf)?;
    }
    Ok(())
}

/// Why a node could not be had.
fn missing(seq: u64) -> AuditError {
    AuditError::Tree(format!(
        "audit entry {seq} is not in the store and no tree node covers it (removed before the \
         Merkle tree existed?)"
    ))
}

/// The hash of the perfect subtree (level, index), from the store or computed (and stored).
pub fn perfect(store: &Store, log: Log, level: u32, index: u64) -> Result<Hash, AuditError> {
    if let Some(v) = store.kv().get(Tree::Merkle, &key(log, level, index))? {
        return Hash::try_from(v.as_slice())
            .map_err(|_| AuditError::Tree(format!("tree node {level}/{index} is not 32 bytes")));
    }
    let h = if level == 0 && log == Log::Transparency {
        return Err(AuditError::Tree(format!(
            "transparency leaf {index} is not in the store (its audit entry names it: restart \
             the site to write it back)"
        )));
    } else if level == 0 {
        let seq = index + 1;
        let bytes = store
            .kv()
            .get(Tree::Audit, &seq.to_be_bytes())?
            .ok_or_else(|| missing(seq))?;
        merkle::leaf_hash(&bytes)
    } else {
        let l = perfect(store, log, level - 1, 2 * index)?;
        let r = perfect(store, log, level - 1, 2 * index + 1)?;
        merkle::node_hash(&l, &r)
    };
    if log.stores(level) {
        store.kv().put(Tree::Merkle, &key(log, level, index), &h)?;
    }
    Ok(h)
}

/// The frontier of the tree over leaves `0..size` (read from the store).
pub fn frontier(store: &Store, log: Log, size: u64) -> Result<Frontier, AuditError> {
    let nodes = merkle::decomposition(size)
        .into_iter()
        .map(|(level, index)| perfect(store, log, level, index).map(|h| (level, h)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Frontier::from_nodes(size, nodes))
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub fn proof(store: &Store, log: Log, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
    merkle::inclusion_proof(index, size, &mut |level, i| perfect(store, log, level, i))
}

/// Stores subtrees an append completed (once their leaves are durable).
pub fn store_completed(store: &Store, log: Log, nodes: &[Completed]) -> Result<(), AuditError> {
    for (level, index, h) in nodes {
        if *level >= STORED_LEVEL {
            store.kv().put(Tree::Merkle, &key(log, *level, *index), h)?;
        }
    }
    Ok(())
}

/// Before entries `1..=size` are removed: stores every node of the tree of `size` entries'
/// decomposition, whatever its level — the only nodes over them a later proof can need.
pub fn keep_for_prune(store: &Store, size: u64) -> Result<(), AuditError> {
    for (level, index) in merkle::decomposition(size) {
        let h = perfect(store, Log::Audit, level, index)?;
        store
            .kv()
            .put(Tree::Merkle, &key(Log::Audit, level, index), &h)?;
    }
    Ok(())
}
