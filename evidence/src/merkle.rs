//! The audit log's Merkle tree, in the manner of RFC 9162 (Certificate Transparency 2.0) §2.1:
//! leaf `i` is audit entry `seq = i + 1`, its hash `SHA-256(0x00 ‖ entry JSON)` (the exact bytes
//! the site stores, which also make the hash chain), interior nodes `SHA-256(0x01 ‖ left ‖
//! right)`, and the tree of size `n` splits at the largest power of two below `n`.
//!
//! Shared by the site (which builds the tree and its proofs) and by offline verifiers (which
//! check an inclusion proof against a signed checkpoint without the rest of the log).

use sha2::{Digest as _, Sha256};

/// A node hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (`n ≥ 2`).
pub fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The root of the tree over `leaves` (RFC 9162 MTH; the reference the incremental code is
/// tested against). The empty tree's root is `SHA-256("")`.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The perfect subtrees a tree of some size decomposes into, largest (leftmost) first: what an
/// append-only writer keeps to extend the tree and compute its root without re-reading leaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (level, hash): level `l` covers `2^l` leaves.
    nodes: Vec<(u32, Hash)>,
}

/// A perfect subtree completed by an append: `level`, `index` (its first leaf is `index ·
/// 2^level`) and hash.
pub type Completed = (u32, u64, Hash);

impl Frontier {
    /// The frontier of a tree of `size` leaves, from its decomposition (largest first, as
    /// [`decomposition`] lists them).
    pub fn from_nodes(size: u64, nodes: Vec<(u32, Hash)>) -> Self {
        Self { size, nodes }
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; returns the perfect subtrees this completed (level ≥ 1), so a store
    /// can keep them.
    pub fn push(&mut self, leaf: Hash) -> Vec<Completed> {
        let mut done = Vec::new();
        let mut cur = (0u32, leaf);
        let mut index = self.size;
        while let Some(&(level, left)) = self.nodes.last() {
            if level != cur.0 {
                break;
            }
            self.nodes.pop();
            cur = (level + 1, node_hash(&left, &cur.1));
            index >>= 1;
            done.push((cur.0, index, cur.1));
        }
        self.nodes.push(cur);
        self.size += 1;
        done
    }

    /// The root hash of the tree so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        match it.next() {
            None => Sha256::digest([]).into(),
            Some(&(_, last)) => it.fold(last, |acc, (_, left)| node_hash(left, &acc)),
        }
    }
}

/// The perfect subtrees (level, index) a tree of `size` leaves decomposes into, largest first.
pub fn decomposition(size: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for level in (0..64u32).rev() {
        if size & (1u64 << level) != 0 {
            out.push((level, start >> level));
            start += 1u64 << level;
        }
    }
    out
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1),
/// from a function giving the hash of the perfect subtree (level, index). Every range the
/// proof needs is a union of such subtrees.
pub fn inclusion_proof<E>(
    index: u64,
    size: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    let mut proof = Vec::new();
    path(index, 0, size, perfect, &mut proof)?;
    Ok(proof)
}

fn path<E>(
    m: u64,
    start: u64,
    n: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(m, start, k, perfect, out)?;
        out.push(range(start + k, n - k, perfect)?);
    } else {
        path(m - k, start + k, n - k, perfect, out)?;
        out.push(range(start, k, perfect)?);
    }
    Ok(())
}

/// MTH of the `n` leaves from `start`, where `start` is aligned to the largest power of two
/// not above `n` (as every range of a proof is).
pub fn range<E>(
    start: u64,
    n: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Hash, E> {
    if n.is_power_of_two() {
        let level = n.trailing_zeros();
        return perfect(level, start >> level);
    }
    let k = split(n);
    let left = range(start, k, perfect)?;
    let right = range(start + k, n - k, perfect)?;
    Ok(node_hash(&left, &right))
}

/// The consistency proof from the tree of `first` leaves to the tree of `second` leaves
/// (RFC 9162 §2.1.4.1), `0 < first <= second`, from a function giving the hash of the perfect
/// subtree (level, index).
pub fn consistency_proof<E>(
    first: u64,
    second: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    let mut out = Vec::new();
    if first > 0 && first < second {
        subproof(first, 0, second, true, perfect, &mut out)?;
    }
    Ok(out)
}

fn subproof<E>(
    m: u64,
    start: u64,
    n: u64,
    whole: bool,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    if m == n {
        if !whole {
            out.push(range(start, n, perfect)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(m, start, k, whole, perfect, out)?;
        out.push(range(start + k, n - k, perfect)?);
    } else {
        subproof(m - k, start + k, n - k, false, perfect, out)?;
        out.push(range(start, k, perfect)?);
    }
    Ok(())
}

/// Verifies that the tree of `second` leaves with root `second_root` extends the tree of
/// `first` leaves with root `first_root` (RFC 9162 §2.1.4.2): nothing the first held was
/// changed or removed.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    let bad = ProofError::Consistency;
    if first == 0 || first > second {
        return Err(bad);
    }
    if first == second {
        return if proof.is_empty() && first_root == second_root {
            Ok(())
        } else {
            Err(bad)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((&head, rest)) = path.split_first() else {
        return Err(bad);
    };
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (head, head);
    for c in rest {
        if sn == 0 {
            return Err(bad);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn == 0 && &fr == first_root && &sr == second_root {
        Ok(())
    } else {
        Err(bad)
    }
}

/// Why an inclusion proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf is not in a tree of that size.
    #[error("leaf {index} is not in a tree of {size} leaves")]
    OutOfRange {
        /// Leaf index.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// The proof has the wrong number of hashes for the position.
    #[error("the proof has {got} hashes; leaf {index} of {size} needs {want}")]
    Length {
        /// Leaf index.
        index: u64,
        /// Tree size.
        size: u64,
        /// Hashes given.
        got: usize,
        /// Hashes needed.
        want: usize,
    },
    /// The proof leads to another root.
    #[error("the proof leads to another root than the checkpoint's")]
    Root,
    /// The later tree does not extend the earlier one (or the proof is not for them).
    #[error("the consistency proof does not show that the later tree extends the earlier one")]
    Consistency,
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::Length {
                index,
                size,
                got: proof.len(),
                want: proof_len(index, size),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::Length {
            index,
            size,
            got: proof.len(),
            want: proof_len(index, size),
        });
    }
    if &r != root {
        return Err(ProofError::Root);
    }
    Ok(())
}

/// How many hashes the inclusion proof of leaf `index` in a tree of `size` has.
pub fn proof_len(index: u64, size: u64) -> usize {
    let mut n = 0;
    let (mut start, mut len, mut m) = (0u64, size, index);
    while len > 1 {
        let k = split(len);
        if m < k {
            len = k;
        } else {
            m -= k;
            start += k;
            len -= k;
        }
        n += 1;
    }
    let _ = start;
    n
}

#[cfg(test)]
mod tests {

    #[test]
    fn consistency_proofs_hold_for_every_pair_of_sizes_and_fail_when_altered() {
        let leaves: Vec<Hash> = (0u8..41).map(|i| leaf_hash(&[i])).collect();
        let mut perfect = |level: u32, index: u64| -> Result<Hash, ()> {
            let (a, b) = ((index << level) as usize, ((index + 1) << level) as usize);
            Ok(root_of(&leaves[a..b]))
        };
        for n in 1..=41u64 {
            let second = root_of(&leaves[..n as usize]);
            for m in 1..=n {
                let first = root_of(&leaves[..m as usize]);
                let proof = consistency_proof(m, n, &mut perfect).unwrap_or_default();
                assert_eq!(
                    verify_consistency(m, n, &first, &second, &proof),
                    Ok(()),
                    "{m} -> {n}"
                );
                if m < n {
                    // Another first tree (one leaf changed) is not extended by the second.
                    let mut other = leaves[..m as usize].to_vec();
                    other[0] = leaf_hash(b"rewritten");
                    assert!(verify_consistency(m, n, &root_of(&other), &second, &proof).is_err());
                    if let Some(h) = proof.first() {
                        let mut bent = proof.clone();
                        bent[0] = node_hash(h, h);
                        assert!(verify_consistency(m, n, &first, &second, &bent).is_err());
                    }
                }
            }
        }
    }

    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    /// The perfect subtree (level, index) computed from the leaves.
    fn perfect_of(l: &[Hash]) -> impl FnMut(u32, u64) -> Result<Hash, ()> + '_ {
        move |level, index| {
            let a = (index << level) as usize;
            Ok(root_of(&l[a..a + (1usize << level)]))
        }
    }

    #[test]
    fn the_frontier_gives_the_reference_root_at_every_size() {
        let l = leaves(70);
        let mut f = Frontier::default();
        assert_eq!(f.root(), root_of(&[]));
        for (i, leaf) in l.iter().enumerate() {
            let completed = f.push(*leaf);
            assert_eq!(f.root(), root_of(&l[..=i]), "size {}", i + 1);
            for (level, index, h) in completed {
                let a = (index << level) as usize;
                assert_eq!(h, root_of(&l[a..a + (1usize << level)]));
            }
            let decomp = decomposition(i as u64 + 1);
            assert_eq!(decomp.len(), f.nodes.len());
        }
    }

    #[test]
    fn every_proof_verifies_and_no_altered_one_does() -> Result<(), ()> {
        let l = leaves(37);
        for size in 1..=l.len() as u64 {
            let root = root_of(&l[..size as usize]);
            for index in 0..size {
                let proof = inclusion_proof(index, size, &mut perfect_of(&l))?;
                assert_eq!(proof.len(), proof_len(index, size));
                verify_inclusion(index, size, &l[index as usize], &proof, &root)
                    .unwrap_or_else(|e| panic!("{index}/{size}: {e}"));
                // Another leaf, another index, a changed hash or a shorter proof: refused.
                let other = leaf_hash(b"altered entry");
                assert!(verify_inclusion(index, size, &other, &proof, &root).is_err());
                if size > 1 {
                    let wrong = (index + 1) % size;
                    assert!(
                        verify_inclusion(wrong, size, &l[index as usize], &proof, &root).is_err()
                    );
                    let mut bad = proof.clone();
                    bad[0][0] ^= 1;
                    assert!(
                        verify_inclusion(index, size, &l[index as usize], &bad, &root).is_err()
                    );
                    assert!(
                        verify_inclusion(index, size, &l[index as usize], &proof[1..], &root)
                            .is_err()
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn out_of_range_is_refused() {
        let l = leaves(4);
        let root = root_of(&l);
        assert_eq!(
            verify_inclusion(4, 4, &l[0], &[], &root),
            Err(ProofError::OutOfRange { index: 4, size: 4 })
        );
    }
}
