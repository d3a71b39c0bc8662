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

use meshsign_evidence::merkle::{self, Completed, Frontier, Hash};

use super::AuditError;
use crate::store::{Store, Tree};

/// Perfect subtrees of this many levels (16 leaves) or more are stored.
pub const STORED_LEVEL: u32 = 4;

fn key(level: u32, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = u8::try_from(level).unwrap_or(u8::MAX);
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Why a node could not be had.
fn missing(seq: u64) -> AuditError {
    AuditError::Tree(format!(
        "audit entry {seq} is not in the store and no tree node covers it (removed before the \
         Merkle tree existed?)"
    ))
}

/// The hash of the perfect subtree (level, index), from the store or computed (and stored).
pub fn perfect(store: &Store, level: u32, index: u64) -> Result<Hash, AuditError> {
    if let Some(v) = store.kv().get(Tree::Merkle, &key(level, index))? {
        return Hash::try_from(v.as_slice())
            .map_err(|_| AuditError::Tree(format!("tree node {level}/{index} is not 32 bytes")));
    }
    let h = if level == 0 {
        let seq = index + 1;
        let bytes = store
            .kv()
            .get(Tree::Audit, &seq.to_be_bytes())?
            .ok_or_else(|| missing(seq))?;
        merkle::leaf_hash(&bytes)
    } else {
        let l = perfect(store, level - 1, 2 * index)?;
        let r = perfect(store, level - 1, 2 * index + 1)?;
        merkle::node_hash(&l, &r)
    };
    if level >= STORED_LEVEL {
        store.kv().put(Tree::Merkle, &key(level, index), &h)?;
    }
    Ok(h)
}

/// The frontier of the tree over entries `1..=size` (read from the store).
pub fn frontier(store: &Store, size: u64) -> Result<Frontier, AuditError> {
    let nodes = merkle::decomposition(size)
        .into_iter()
        .map(|(level, index)| perfect(store, level, index).map(|h| (level, h)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Frontier::from_nodes(size, nodes))
}

/// The inclusion proof of entry `seq` in the tree of `size` entries.
pub fn proof(store: &Store, seq: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
    merkle::inclusion_proof(seq - 1, size, &mut |level, index| {
        perfect(store, level, index)
    })
}

/// Stores subtrees an append completed (once their entries are durable).
pub fn store_completed(store: &Store, nodes: &[Completed]) -> Result<(), AuditError> {
    for (level, index, h) in nodes {
        if *level >= STORED_LEVEL {
            store.kv().put(Tree::Merkle, &key(*level, *index), h)?;
        }
    }
    Ok(())
}

/// Before entries `1..=size` are removed: stores every node of the tree of `size` entries'
/// decomposition, whatever its level — the only nodes over them a later proof can need.
pub fn keep_for_prune(store: &Store, size: u64) -> Result<(), AuditError> {
    for (level, index) in merkle::decomposition(size) {
        let h = perfect(store, level, index)?;
        store.kv().put(Tree::Merkle, &key(level, index), &h)?;
    }
    Ok(())
}
