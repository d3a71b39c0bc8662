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
//! (`AuditRecord::tlog`) and stored with the batch, [`LEAVES_PER_ROW`] to a row (the leaves
//! under one stored level-4 node; a row is merged by compare-and-swap, so a batch of n
//! signatures writes about n/16 rows, not n); levels 1–3 are recomputed like the audit
//! tree's, and a lost leaf is written back from its audit entry (start, journal restore, a
//! replica catching up). Sites from before the rows stored one leaf per key (level 0): those
//! are still read.

use meshsign_evidence::merkle::{self, Completed, Frontier, Hash};

use super::AuditError;
use crate::store::{Store, Tree};

/// Perfect subtrees of this many levels (16 leaves) or more are stored (on an embedded site,
/// in the node files: [`crate::store::slots`]).
pub const STORED_LEVEL: u32 = crate::store::slots::DENSE_LEVEL as u32;

/// Which of the site's two trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    /// The audit log: leaf `i` is entry `seq = i + 1`.
    Audit,
    /// The transparency log: leaf `i` is the `i`-th Rekor body; leaves are stored nodes.
    Transparency,
}

/// Transparency leaves per stored row: the 16 leaves under one stored level-4 node.
pub const LEAVES_PER_ROW: u64 = crate::store::slots::LEAVES_PER_ROW;

/// A leaf row: a big-endian bitmap of the slots present, then [`LEAVES_PER_ROW`] 32-byte slots.
const ROW_BYTES: usize = crate::store::slots::ROW_BYTES;

/// The level byte of leaf rows (tree levels are 0–63).
const ROW_MARK: u8 = crate::store::slots::ROW_MARK;

/// How often a row merge is tried again when another writer changed the row in between.
const ROW_RETRIES: usize = 16;

fn row_key(row: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(b'T');
    k.push(ROW_MARK);
    k.extend_from_slice(&row.to_be_bytes());
    k
}

/// The leaf in `slot` of a stored row, if the row has it.
fn row_slot(row: &[u8], slot: usize) -> Option<Hash> {
    if row.len() != ROW_BYTES {
        return None;
    }
    let bits = u16::from_be_bytes([row[0], row[1]]);
    if bits & (1 << slot) == 0 {
        return None;
    }
    Hash::try_from(&row[2 + slot * 32..2 + (slot + 1) * 32]).ok()
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

/// A stored `Tree::Merkle` record as it was when the audit log ended at `audit_size` entries
/// and the transparency log at `log_size` leaves: None for a node over a leaf past either end,
/// a leaf row with its later slots cleared, anything else as it is. A snapshot reads the nodes
/// after the writer went on; what it keeps is what the log it took determines.
pub fn node_at(key: &[u8], value: &[u8], audit_size: u64, log_size: u64) -> Option<Vec<u8>> {
    let index = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes);
    // A perfect subtree (level, index) is complete once leaf (index + 1)·2^level − 1 is in.
    let within = |level: u8, i: u64, size: u64| {
        (i.checked_add(1))
            .and_then(|n| n.checked_mul(1u64.checked_shl(u32::from(level))?))
            .is_some_and(|end| end <= size)
    };
    match key {
        [b'T', level, rest @ ..] if rest.len() == 8 => {
            let i = index(rest)?;
            if *level == ROW_MARK {
                let first = i.checked_mul(LEAVES_PER_ROW)?;
                if first >= log_size {
                    return None;
                }
                let keep = usize::try_from((log_size - first).min(LEAVES_PER_ROW)).ok()?;
                if keep == LEAVES_PER_ROW as usize || value.len() != ROW_BYTES {
                    return Some(value.to_vec());
                }
                let mut row = value.to_vec();
                let bits = u16::from_be_bytes([row[0], row[1]]) & ((1u16 << keep) - 1);
                row[..2].copy_from_slice(&bits.to_be_bytes());
                row[2 + keep * 32..].fill(0);
                Some(row)
            } else {
                within(*level, i, log_size).then(|| value.to_vec())
            }
        }
        [level, rest @ ..] if rest.len() == 8 => {
            let i = index(rest)?;
            within(*level, i, audit_size).then(|| value.to_vec())
        }
        _ => Some(value.to_vec()),
    }
}

/// The transparency log's leaf `index`, if stored.
pub fn log_leaf(store: &Store, index: u64) -> Result<Option<Hash>, AuditError> {
    let slot = (index % LEAVES_PER_ROW) as usize;
    if let Some(row) = store
        .kv()
        .get(Tree::Merkle, &row_key(index / LEAVES_PER_ROW))?
        && let Some(h) = row_slot(&row, slot)
    {
        return Ok(Some(h));
    }
    // One leaf per key, as sites stored them before the rows.
    Ok(store
        .kv()
        .get(Tree::Merkle, &key(Log::Transparency, 0, index))?
        .and_then(|v| Hash::try_from(v.as_slice()).ok()))
}

/// The transparency log's leaf `index`: stored, or written back from the audit entry that
/// added it if its slot is lost or damaged; None if no stored entry names it.
pub fn log_leaf_or_write_back(store: &Store, index: u64) -> Result<Option<Hash>, AuditError> {
    match log_leaf(store, index)? {
        Some(h) => Ok(Some(h)),
        None => write_back_leaf(store, index),
    }
}

/// Stores the transparency log's leaves from `index` on, merged into their rows.
pub fn put_log_leaves(store: &Store, index: u64, leaves: &[Hash]) -> Result<(), AuditError> {
    // The rows this run touches, as (row, first slot, leaves).
    let mut rows = Vec::new();
    let mut done = 0;
    while done < leaves.len() {
        let at = index + done as u64;
        let first = (at % LEAVES_PER_ROW) as usize;
        let n = (LEAVES_PER_ROW as usize - first).min(leaves.len() - done);
        rows.push((at / LEAVES_PER_ROW, first, &leaves[done..done + n]));
        done += n;
    }
    // Every row's present value in one read (one round trip on a database, not one per row);
    // a row another writer changed since is read again by its compare-and-swap.
    let keys: Vec<Vec<u8>> = rows.iter().map(|(row, _, _)| row_key(*row)).collect();
    let read = store.kv().get_many(Tree::Merkle, &keys)?;
    for ((row, first, leaves), old) in rows.into_iter().zip(read) {
        put_row(store, row, first, leaves, old)?;
    }
    Ok(())
}

/// Sets `leaves` into row `row` from slot `first` on, keeping the slots others set: a
/// compare-and-swap, so two writers (a replica catching up, another appending) lose nothing.
/// `read` is the row as last read (re-read after a lost swap).
fn put_row(
    store: &Store,
    row: u64,
    first: usize,
    leaves: &[Hash],
    mut read: Option<Vec<u8>>,
) -> Result<(), AuditError> {
    let k = row_key(row);
    for attempt in 0..ROW_RETRIES {
        let old = if attempt == 0 {
            read.take()
        } else {
            store.kv().get(Tree::Merkle, &k)?
        };
        let mut new = match &old {
            Some(v) if v.len() == ROW_BYTES => v.clone(),
            _ => vec![0; ROW_BYTES],
        };
        let mut bits = u16::from_be_bytes([new[0], new[1]]);
        for (slot, leaf) in (first..).zip(leaves) {
            new[2 + slot * 32..2 + (slot + 1) * 32].copy_from_slice(leaf);
            bits |= 1 << slot;
        }
        new[..2].copy_from_slice(&bits.to_be_bytes());
        let stored = match &old {
            Some(o) if *o == new => true,
            Some(o) => store.kv().update(Tree::Merkle, &k, o, &new)?,
            None => store.kv().insert_new(Tree::Merkle, &k, &new)?,
        };
        if stored {
            return Ok(());
        }
    }
    Err(AuditError::Tree(format!(
        "transparency leaf row {row} kept changing while it was written ({ROW_RETRIES} tries)"
    )))
}

/// Audit entries looked at past a probe for the next one that added transparency leaves.
const LEAF_SEARCH_AHEAD: usize = 256;

/// Writes back transparency leaf `index` (lost, or its slot found damaged) from the audit
/// entry that added it — the record the leaves are derived from — with the other leaves that
/// entry names; None if no stored entry names it. The entries' first leaf indices grow with
/// their seqs, so the entry is found by a binary search over seqs: O(log n) reads.
fn write_back_leaf(store: &Store, index: u64) -> Result<Option<Hash>, AuditError> {
    use meshsign_evidence::audit::{AuditRecord, TlogLeaves};
    let kv = store.kv();
    let seq_of = |k: &[u8]| <[u8; 8]>::try_from(k).map(u64::from_be_bytes).ok();
    let (Some(lo), Some(hi)) = (
        kv.scan_range(Tree::Audit, b"", 1)?
            .first()
            .and_then(|(k, _)| seq_of(k)),
        kv.last(Tree::Audit)?.and_then(|(k, _)| seq_of(&k)),
    ) else {
        return Ok(None);
    };
    // The first entry at or after `seq` (within the look-ahead) that added leaves.
    let next = |seq: u64| -> Result<Option<TlogLeaves>, AuditError> {
        for (_, v) in kv.scan_range(Tree::Audit, &seq.to_be_bytes(), LEAF_SEARCH_AHEAD)? {
            let rec: AuditRecord =
                serde_json::from_slice(&v).map_err(AuditError::entry("stored"))?;
            if rec.tlog.is_some() {
                return Ok(rec.tlog);
            }
        }
        Ok(None)
    };
    // The last seq whose next leaf-adding entry starts at or before `index`.
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match next(mid)? {
            Some(t) if t.index <= index => lo = mid,
            _ => hi = mid - 1,
        }
    }
    let Some(t) = next(lo)? else {
        return Ok(None);
    };
    let Some(hashes) = t.hashes() else {
        return Ok(None);
    };
    let Some(h) = index
        .checked_sub(t.index)
        .and_then(|off| hashes.get(usize::try_from(off).ok()?).copied())
    else {
        return Ok(None);
    };
    put_log_leaves(store, t.index, &hashes)?;
    tracing::warn!(
        leaf = index,
        "transparency leaf missing from the store, written back from the audit entry naming it"
    );
    Ok(Some(h))
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
    if level == 0 && log == Log::Transparency {
        return log_leaf_or_write_back(store, index)?.ok_or_else(|| {
            AuditError::Tree(format!(
                "transparency leaf {index} is not in the store, and no stored audit entry names \
                 it (removed by retention?)"
            ))
        });
    }
    if let Some(v) = store.kv().get(Tree::Merkle, &key(log, level, index))? {
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
    } else if let Some(h) = (log == Log::Audit && level < STORED_LEVEL)
        .then(|| audit_block(store, level, index))
        .transpose()?
        .flatten()
    {
        h
    } else {
        let l = perfect(store, log, level - 1, 2 * index)?;
        let r = perfect(store, log, level - 1, 2 * index + 1)?;
        merkle::node_hash(&l, &r)
    };
    if level >= STORED_LEVEL {
        store.kv().put(Tree::Merkle, &key(log, level, index), &h)?;
    }
    Ok(h)
}

/// The audit subtree (level, index) below the stored levels, from one read of its 2^level
/// entries (a proof's siblings below level 4 are the 15 other entries of a block of 16: four
/// reads, not fifteen); None if any of them is not stored (then the caller goes down the tree).
fn audit_block(store: &Store, level: u32, index: u64) -> Result<Option<Hash>, AuditError> {
    let n = 1usize << level;
    let Some(first) = index.checked_mul(n as u64).and_then(|i| i.checked_add(1)) else {
        return Ok(None);
    };
    let rows = store
        .kv()
        .scan_range(Tree::Audit, &first.to_be_bytes(), n)?;
    let whole = rows.len() == n
        && rows
            .iter()
            .zip(first..)
            .all(|((k, _), seq)| k.as_slice() == seq.to_be_bytes().as_slice());
    if !whole {
        return Ok(None);
    }
    let leaves: Vec<Hash> = rows.iter().map(|(_, v)| merkle::leaf_hash(v)).collect();
    Ok(Some(merkle::root_of(&leaves)))
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
    read_ahead(store, log, |get| merkle::inclusion_proof(index, size, get))
}

/// The consistency proof from the tree of `first` leaves to the tree of `second`.
pub fn consistency(
    store: &Store,
    log: Log,
    first: u64,
    second: u64,
) -> Result<Vec<Hash>, AuditError> {
    read_ahead(store, log, |get| {
        merkle::consistency_proof(first, second, get)
    })
}

/// Subtrees read ahead of a proof walk, by (level, index).
type Known = std::collections::HashMap<(u32, u64), Hash>;

/// A node getter as the proof walks of `meshsign_evidence::merkle` take it.
type Get<'a> = &'a mut dyn FnMut(u32, u64) -> Result<Hash, AuditError>;

/// Runs `walk` (a proof) twice: first only to learn the subtrees it names, which are then read
/// in a few calls ([`prefetch`]); then for real, from what was read or else [`perfect`].
fn read_ahead(
    store: &Store,
    log: Log,
    walk: impl Fn(&mut Get<'_>) -> Result<Vec<Hash>, AuditError>,
) -> Result<Vec<Hash>, AuditError> {
    // Without a claimed leaf there is nothing to refuse: always Some.
    let known = prefetch(store, log, &learn(&walk), None)?.unwrap_or_default();
    walk_known(store, log, &known, walk)
}

/// [`proof`] of leaf `index` if the store holds that leaf with the leaf hash `leaf`, else
/// None. The leaf is read with the block of 16 its proof reads anyway (one store call fewer
/// than reading it first: on a database, a round trip), and checked before the rest is read
/// (an audit leaf the store does not hold costs one read, as before); nothing is walked for
/// it. The comparison is in constant time.
pub fn proof_if_leaf(
    store: &Store,
    log: Log,
    index: u64,
    size: u64,
    leaf: &[u8],
) -> Result<Option<Vec<Hash>>, AuditError> {
    let walk = |get: &mut Get<'_>| merkle::inclusion_proof(index, size, get);
    match prefetch(store, log, &learn(&walk), Some((index, leaf)))? {
        Some(known) => walk_known(store, log, &known, walk).map(Some),
        None => Ok(None),
    }
}

/// The subtrees a proof walk names, learnt by walking it with a getter that reads nothing.
fn learn(walk: &impl Fn(&mut Get<'_>) -> Result<Vec<Hash>, AuditError>) -> Vec<(u32, u64)> {
    let mut wanted = Vec::new();
    let mut note = |level: u32, i: u64| -> Result<Hash, AuditError> {
        wanted.push((level, i));
        Ok([0; 32])
    };
    // This getter cannot fail, nor can the walk with it.
    let _ = walk(&mut (&mut note as Get<'_>));
    wanted
}

/// Walks `walk` from `known`, or else [`perfect`].
fn walk_known(
    store: &Store,
    log: Log,
    known: &Known,
    walk: impl Fn(&mut Get<'_>) -> Result<Vec<Hash>, AuditError>,
) -> Result<Vec<Hash>, AuditError> {
    let mut get = |level: u32, i: u64| match known.get(&(level, i)) {
        Some(h) => Ok(*h),
        None => perfect(store, log, level, i),
    };
    walk(&mut (&mut get as Get<'_>))
}

/// The subtrees `wanted` (a proof's: O(log n) of them) read in one store call instead of
/// one or more each — on a database every call is a round trip: the stored nodes (and the
/// transparency leaf rows under the low ones) in one `get_many`, the audit subtrees below the
/// stored level from one scan of the ≤ 16 entries of their block. What is not found here
/// (a node not stored yet, a damaged slot, a removed entry) is left to [`perfect`], which
/// computes, stores or writes back as it always did.
///
/// An audit proof's blocks (its leaf's, and the tree's right edge) are read together with the
/// stored nodes ([`crate::store::Kv::scans_and_get_many`]): one statement on PostgreSQL, where
/// these were two or three round trips (issue 30).
///
/// With `leaf` (an index and the leaf hash a caller claims for it), its block is read too and
/// the claim checked before anything is walked — a claim the store does not hold costs that
/// one read — and None is returned if it does not hold.
fn prefetch(
    store: &Store,
    log: Log,
    wanted: &[(u32, u64)],
    leaf: Option<(u64, &[u8])>,
) -> Result<Option<Known>, AuditError> {
    use std::collections::{BTreeSet, HashMap};
    let mut known = HashMap::new();
    let block_of = |level: u32, i: u64| (i << level) / LEAVES_PER_ROW;
    let (high, low): (Vec<_>, Vec<_>) = wanted
        .iter()
        .copied()
        .filter(|&(level, _)| level < 64)
        .partition(|&(level, _)| level >= STORED_LEVEL);
    let mut blocks: BTreeSet<u64> = low.iter().map(|&(l, i)| block_of(l, i)).collect();
    blocks.extend(leaf.map(|(i, _)| block_of(0, i)));
    let holds = |rows: &HashMap<u64, Vec<Option<Hash>>>| {
        leaf.is_none_or(|(i, want)| {
            rows.get(&block_of(0, i))
                .and_then(|row| row.get((i % LEAVES_PER_ROW) as usize).copied().flatten())
                .is_some_and(|h| {
                    aws_lc_rs::constant_time::verify_slices_are_equal(&h, want).is_ok()
                })
        })
    };
    // The leaves of each block of 16 a low subtree (or the claimed leaf) lies in.
    let mut leaves: HashMap<u64, Vec<Option<Hash>>> = HashMap::new();
    let rows: Vec<u64> = match log {
        Log::Transparency => blocks.iter().copied().collect(),
        Log::Audit => Vec::new(),
    };
    let mut keys: Vec<Vec<u8>> = high.iter().map(|&(l, i)| key(log, l, i)).collect();
    keys.extend(rows.iter().map(|&b| row_key(b)));
    // The audit blocks are read with the stored nodes, in one store call (on a database one
    // round trip, where these were two or three).
    let froms: Vec<(u64, u64, [u8; 8])> = match log {
        Log::Audit => blocks
            .iter()
            .filter_map(|&b| block_start(b).map(|first| (b, first, first.to_be_bytes())))
            .collect(),
        Log::Transparency => Vec::new(),
    };
    let scans: Vec<crate::store::Scan<'_>> = froms
        .iter()
        .map(|(_, _, from)| (Tree::Audit, from.as_slice(), LEAVES_PER_ROW as usize))
        .collect();
    let (entries, values) = if scans.is_empty() && keys.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        store
            .kv()
            .scans_and_get_many(&scans, (Tree::Merkle, &keys))?
    };
    for (&(b, first, _), entries) in froms.iter().zip(entries) {
        leaves.insert(b, audit_row_of(first, entries));
    }
    for (&node, v) in high.iter().zip(&values) {
        if let Some(h) = v.as_deref().and_then(|v| Hash::try_from(v).ok()) {
            known.insert(node, h);
        }
    }
    for (n, &b) in rows.iter().enumerate() {
        let row = values.get(high.len() + n).cloned().flatten();
        let row = (0..LEAVES_PER_ROW as usize)
            .map(|slot| row.as_deref().and_then(|r| row_slot(r, slot)))
            .collect();
        leaves.insert(b, row);
    }
    if !holds(&leaves) {
        return Ok(None);
    }
    for (level, i) in low {
        let Some(row) = leaves.get(&block_of(level, i)) else {
            continue;
        };
        let from = ((i << level) % LEAVES_PER_ROW) as usize;
        let under: Option<Vec<Hash>> = row
            .get(from..from + (1usize << level))
            .and_then(|s| s.iter().copied().collect());
        if let Some(under) = under {
            known.insert((level, i), merkle::root_of(&under));
        }
    }
    Ok(Some(known))
}

/// The first seq of audit block `b` (entries `16·b + 1 ..= 16·b + 16`); None past any seq.
fn block_start(b: u64) -> Option<u64> {
    b.checked_mul(LEAVES_PER_ROW).and_then(|i| i.checked_add(1))
}

/// The leaf hashes of the block that starts at seq `first`, from a scan of its entries (keys
/// outside the block ignored).
fn audit_row_of(first: u64, entries: Vec<crate::store::Entry>) -> Vec<Option<Hash>> {
    let mut row = vec![None; LEAVES_PER_ROW as usize];
    for (k, v) in entries {
        let seq = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes);
        if let Some(slot) = seq.ok().and_then(|s| s.checked_sub(first))
            && let Some(cell) = row.get_mut(slot as usize)
        {
            *cell = Some(merkle::leaf_hash(&v));
        }
    }
    row
}

/// Stores subtrees appends completed (once their leaves are durable), of both logs, in one
/// store call: on a database one statement, where a put per node was a round trip each — a
/// sixteenth of every batch's entries, twice, on the writer's path before anyone is answered.
pub fn store_completed(store: &Store, nodes: &[(Log, &[Completed])]) -> Result<(), AuditError> {
    let keyed: Vec<(Vec<u8>, &Hash)> = nodes
        .iter()
        .flat_map(|(log, done)| {
            done.iter()
                .filter(|(level, _, _)| *level >= STORED_LEVEL)
                .map(|(level, index, h)| (key(*log, *level, *index), h))
        })
        .collect();
    if keyed.is_empty() {
        return Ok(());
    }
    let entries: Vec<(&[u8], &[u8])> = keyed
        .iter()
        .map(|(k, h)| (k.as_slice(), h.as_slice()))
        .collect();
    store.kv().put_many(Tree::Merkle, &entries)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u64) -> Hash {
        merkle::leaf_hash(&i.to_be_bytes())
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open_sled(dir.path(), 1 << 20).expect("sled");
        (dir, store)
    }

    #[test]
    fn a_batch_writes_a_row_per_sixteen_leaves_and_reads_back() {
        let (_d, store) = store();
        // 5 leaves, then 100 starting mid-row: rows 0..=6 (105 leaves).
        let first: Vec<Hash> = (0..5).map(leaf).collect();
        put_log_leaves(&store, 0, &first).unwrap();
        let more: Vec<Hash> = (5..105).map(leaf).collect();
        put_log_leaves(&store, 5, &more).unwrap();
        let rows = store
            .kv()
            .scan_prefix(Tree::Merkle, &[b'T', ROW_MARK])
            .unwrap();
        assert_eq!(rows.len(), 7, "105 leaves in rows of 16");
        for i in 0..105 {
            assert_eq!(log_leaf(&store, i).unwrap(), Some(leaf(i)), "leaf {i}");
        }
        assert_eq!(log_leaf(&store, 105).unwrap(), None);
        // The tree over them is the one computed in memory.
        let mut f = Frontier::default();
        for i in 0..105 {
            f.push(leaf(i));
        }
        let stored = frontier(&store, Log::Transparency, 105).unwrap();
        assert_eq!(stored.root(), f.root());
    }

    /// Proofs from the store (nodes read ahead in one call) are the proofs computed in memory,
    /// for every leaf of every size up to 70 — with and without the stored nodes (a node
    /// missing is computed from what is under it), and for consistency proofs too.
    #[test]
    fn proofs_read_ahead_are_the_proofs_computed_in_memory() {
        let (_d, store) = store();
        let n = 70u64;
        let leaves: Vec<Hash> = (0..n).map(leaf).collect();
        put_log_leaves(&store, 0, &leaves).unwrap();
        let mut f = Frontier::default();
        let mut done = Vec::new();
        for l in &leaves {
            done.extend(f.push(*l));
        }
        let in_memory = |level: u32, i: u64| -> Result<Hash, AuditError> {
            let from = usize::try_from(i << level).unwrap();
            Ok(merkle::root_of(&leaves[from..from + (1usize << level)]))
        };
        let check = |store: &Store| {
            for size in 1..=n {
                for index in 0..size {
                    let want = merkle::inclusion_proof(index, size, &mut |l, i| in_memory(l, i));
                    let want = want.unwrap();
                    assert_eq!(
                        proof(store, Log::Transparency, index, size).unwrap(),
                        want,
                        "leaf {index} of {size}"
                    );
                    // With the leaf read in the same calls: the same proof for its own leaf
                    // hash, nothing for another.
                    let own = leaves[index as usize];
                    assert_eq!(
                        proof_if_leaf(store, Log::Transparency, index, size, &own).unwrap(),
                        Some(want),
                        "leaf {index} of {size}"
                    );
                    let other = leaves[((index + 1) % n) as usize];
                    assert_eq!(
                        proof_if_leaf(store, Log::Transparency, index, size, &other).unwrap(),
                        None
                    );
                }
                for first in 1..=size {
                    let want = merkle::consistency_proof(first, size, &mut |l, i| in_memory(l, i));
                    assert_eq!(
                        consistency(store, Log::Transparency, first, size).unwrap(),
                        want.unwrap(),
                        "{first} to {size}"
                    );
                }
            }
        };
        check(&store);
        // A test: a store in a temp folder takes the write; a failure is the test's.
        store_completed(&store, &[(Log::Transparency, &done)]).unwrap();
        check(&store);
    }

    #[test]
    fn writers_of_one_row_keep_each_others_leaves() {
        let (_d, store) = store();
        let store = std::sync::Arc::new(store);
        // Two threads fill alternate slots of the same rows at once (a replica catching up
        // while another appends): every slot survives.
        let handles: Vec<_> = (0..2u64)
            .map(|parity| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in (parity..64).step_by(2) {
                        put_log_leaves(&store, i, &[leaf(i)]).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for i in 0..64 {
            assert_eq!(log_leaf(&store, i).unwrap(), Some(leaf(i)), "leaf {i}");
        }
    }

    #[test]
    fn leaves_stored_one_per_key_before_the_rows_are_still_read() {
        let (_d, store) = store();
        for i in 0..3 {
            store
                .kv()
                .put(Tree::Merkle, &key(Log::Transparency, 0, i), &leaf(i))
                .unwrap();
        }
        put_log_leaves(&store, 3, &[leaf(3)]).unwrap();
        for i in 0..4 {
            assert_eq!(log_leaf(&store, i).unwrap(), Some(leaf(i)), "leaf {i}");
        }
    }

    /// A damaged leaf (a flipped byte in its slot) is no leaf: the proof path says which leaf
    /// is missing, and the next write of it (a restart writes it back from its audit entry)
    /// puts it back.
    /// What a snapshot keeps of the nodes it reads after the writer went on: those the log
    /// through its head determines.
    #[test]
    fn nodes_past_the_ends_are_left_out_and_the_last_row_is_cut() {
        let v = [7u8; 32];
        // Audit tree at 48 entries: level 4 nodes 0..3 are complete, node 3 is not.
        assert!(node_at(&key(Log::Audit, 4, 2), &v, 48, 0).is_some());
        assert!(node_at(&key(Log::Audit, 4, 3), &v, 48, 0).is_none());
        assert!(node_at(&key(Log::Audit, 5, 1), &v, 48, 0).is_none());
        assert!(node_at(&key(Log::Audit, 63, u64::MAX), &v, u64::MAX, 0).is_none());
        // Transparency tree at 21 leaves: row 0 whole, row 1 cut to 5 slots, row 2 out.
        assert!(node_at(&key(Log::Transparency, 4, 0), &v, 0, 21).is_some());
        assert!(node_at(&key(Log::Transparency, 4, 1), &v, 0, 21).is_none());
        assert!(node_at(&key(Log::Transparency, 0, 20), &v, 0, 21).is_some());
        assert!(node_at(&key(Log::Transparency, 0, 21), &v, 0, 21).is_none());
        let mut row = vec![0u8; ROW_BYTES];
        row[..2].copy_from_slice(&u16::MAX.to_be_bytes());
        row[2..].fill(9);
        assert_eq!(node_at(&row_key(0), &row, 0, 21), Some(row.clone()));
        let cut = node_at(&row_key(1), &row, 0, 21).unwrap();
        assert_eq!(u16::from_be_bytes([cut[0], cut[1]]), 0b1_1111);
        assert!(cut[2..2 + 5 * 32].iter().all(|b| *b == 9));
        assert!(cut[2 + 5 * 32..].iter().all(|b| *b == 0));
        assert_eq!(row_slot(&cut, 4), Some([9; 32]));
        assert_eq!(row_slot(&cut, 5), None);
        assert!(node_at(&row_key(2), &row, 0, 21).is_none());
        // Keys of another shape are kept as they are.
        assert_eq!(node_at(b"other", &v, 0, 0), Some(v.to_vec()));
    }

    #[test]
    fn a_damaged_leaf_reads_as_missing_and_is_written_again() {
        let (dir, store) = store();
        let leaves: Vec<Hash> = (0..32).map(leaf).collect();
        put_log_leaves(&store, 0, &leaves).unwrap();
        store.flush().unwrap();
        let path = crate::store::slots::dir_of(dir.path()).join("log-leaves.slots");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[16 * 36 + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(log_leaf(&store, 16).unwrap(), None);
        assert_eq!(log_leaf(&store, 17).unwrap(), Some(leaf(17)));
        let e = frontier(&store, Log::Transparency, 32).unwrap_err();
        assert!(e.to_string().contains("transparency leaf 16"), "{e}");
        put_log_leaves(&store, 16, &[leaf(16)]).unwrap();
        assert_eq!(log_leaf(&store, 16).unwrap(), Some(leaf(16)));
        let mut f = Frontier::default();
        for l in &leaves {
            f.push(*l);
        }
        assert_eq!(
            frontier(&store, Log::Transparency, 32).unwrap().root(),
            f.root()
        );
    }
}
