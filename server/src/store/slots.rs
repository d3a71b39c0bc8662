//! The Merkle trees' stored nodes and the transparency log's leaves on an embedded site: dense
//! files of fixed-size checksummed slots beside sled, not in it (issue 30).
//!
//! In sled they cost what their size did not: every transparency leaf row was rewritten by
//! compare-and-swap as it filled (16 times), each rewrite appended to sled's log, and at 10⁷
//! entries sled's file was 20× its live data — replayed at every start, its pages held in
//! memory. A node's place is known from its (level, index), and nodes and leaves never change
//! once written, so a file per level indexed by position holds them with no log, no rewrite
//! and nothing to replay: a read is one `pread`, a start opens nothing.
//!
//! **Layout** (`<data_dir>/merkle/`): `audit-LL.slots` (the audit tree's nodes at level `LL`),
//! `log-LL.slots` (the transparency tree's) for levels ≥ [`DENSE_LEVEL`], and
//! `log-leaves.slots` (the transparency tree's leaves). Slot `i` is at byte `i × 36`: the
//! 32-byte hash, then a CRC-32 (little-endian) over the file's tag, `i` and the hash. An
//! all-zero slot is absent (a sparse file's holes are). A slot whose CRC does not match (a
//! torn or flipped write) reads as absent: an audit node is then recomputed from what is under
//! it and stored again, a transparency leaf written back from the audit entry that names it —
//! both are derived from the audit log, which is the record.
//!
//! **Keys** stay those of [`Tree::Merkle`](super::Tree::Merkle), so nothing above the store
//! changes and a PostgreSQL site keeps its table: `level ‖ index` (audit), `T ‖ level ‖ index`
//! (transparency), `T ‖ 0xFE ‖ row` for a row of [`LEAVES_PER_ROW`] leaves (a bitmap, then the
//! leaves), and the one-leaf `T ‖ 0 ‖ index` of sites from before the rows — the same leaf
//! slots. A row is merged, never cleared, by a write: slots it does not set keep what they
//! held. Everything else in the tree (the audit tree's few nodes below [`DENSE_LEVEL`] that
//! retention keeps) stays in sled.
//!
//! **Durability**: writes are `pwrite`s at once; [`NodeFiles::flush`] fsyncs the files written
//! since the last flush (after the audit segments, before sled), so a node is never durable
//! before the entries under it.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::{Entry, StoreError};

/// The lowest tree level kept in files (the levels the writer stores: 16 leaves and up).
pub const DENSE_LEVEL: u8 = 4;

/// Transparency leaves per row key.
pub const LEAVES_PER_ROW: u64 = 1 << DENSE_LEVEL;

/// A row's value: a big-endian bitmap of the slots present, then [`LEAVES_PER_ROW`] 32-byte
/// leaves (absent ones zero).
pub const ROW_BYTES: usize = 2 + LEAVES_PER_ROW as usize * 32;

/// The level byte of row keys (tree levels are 0–63).
pub const ROW_MARK: u8 = 0xFE;

/// The first byte of the transparency tree's keys.
pub const LOG_PREFIX: u8 = b'T';

/// The highest tree level (a tree of up to 2⁶³ leaves).
const MAX_LEVEL: u8 = 63;

/// Bytes per slot: hash and CRC.
const SLOT: usize = 36;

/// The furthest offset a slot is read or written at (2⁶², past any real tree; a file
/// offset is signed).
const MAX_OFFSET: u64 = 1 << 62;

/// Slots read at a time by a scan.
const SCAN_CHUNK: u64 = 4096;

/// A 32-byte hash.
type Hash = [u8; 32];

/// The folder of a data folder's node files.
pub fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("merkle")
}

/// One slot file, in key order (the derived order is the keys': audit levels, transparency
/// levels, then rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum FileId {
    Audit(u8),
    Log(u8),
    Leaves,
}

impl FileId {
    fn all() -> impl DoubleEndedIterator<Item = FileId> {
        (DENSE_LEVEL..=MAX_LEVEL)
            .map(FileId::Audit)
            .chain((DENSE_LEVEL..=MAX_LEVEL).map(FileId::Log))
            .chain(std::iter::once(FileId::Leaves))
    }

    fn name(self) -> String {
        match self {
            FileId::Audit(l) => format!("audit-{l:02}.slots"),
            FileId::Log(l) => format!("log-{l:02}.slots"),
            FileId::Leaves => "log-leaves.slots".into(),
        }
    }

    /// Mixed into each slot's CRC, so a slot copied into another file does not check.
    fn tag(self) -> u8 {
        match self {
            FileId::Audit(l) => l,
            FileId::Log(l) => 0x40 | l,
            FileId::Leaves => ROW_MARK,
        }
    }

    /// What every key of this file starts with (rows for the leaves).
    fn prefix(self) -> Vec<u8> {
        match self {
            FileId::Audit(l) => vec![l],
            FileId::Log(l) => vec![LOG_PREFIX, l],
            FileId::Leaves => vec![LOG_PREFIX, ROW_MARK],
        }
    }

    /// Slots per key: one node, or a row of leaves.
    fn per_key(self) -> u64 {
        match self {
            FileId::Leaves => LEAVES_PER_ROW,
            _ => 1,
        }
    }
}

/// Where a key of [`Tree::Merkle`](super::Tree::Merkle) lives in the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// One node (or one leaf of the old one-per-key form) in `file` at slot `index`.
    One(FileId, u64),
    /// Row `row` of the leaves.
    Row(u64),
}

fn index_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The file place of `key`; None: the key is kept in sled.
fn route(key: &[u8]) -> Option<Place> {
    match key {
        [l, rest @ ..] if (DENSE_LEVEL..=MAX_LEVEL).contains(l) && rest.len() == 8 => {
            Some(Place::One(FileId::Audit(*l), index_of(rest)?))
        }
        [LOG_PREFIX, l, rest @ ..] if rest.len() == 8 => {
            let i = index_of(rest)?;
            match *l {
                0 => Some(Place::One(FileId::Leaves, i)),
                ROW_MARK => Some(Place::Row(i)),
                l if (DENSE_LEVEL..=MAX_LEVEL).contains(&l) => Some(Place::One(FileId::Log(l), i)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether [`NodeFiles`] holds `key` of the Merkle tree (else sled does).
pub fn holds(key: &[u8]) -> bool {
    route(key).is_some()
}

fn crc(id: FileId, index: u64, hash: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[id.tag()]);
    h.update(&index.to_be_bytes());
    h.update(hash);
    h.finalize()
}

fn bad_value(key: &[u8], len: usize, want: usize) -> StoreError {
    StoreError::Engine(
        format!(
            "merkle key {} takes a {want}-byte value, not {len} bytes",
            hex::encode(key)
        )
        .into(),
    )
}

/// The node files of one data folder.
pub struct NodeFiles {
    dir: PathBuf,
    open: RwLock<HashMap<FileId, Arc<File>>>,
    /// Files written since the last flush.
    dirty: Mutex<BTreeSet<FileId>>,
    /// Held by every write: a compare-and-swap reads and writes under it.
    write: Mutex<()>,
}

impl NodeFiles {
    /// Opens the files in `dir` (created at the first write).
    pub fn open(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: RwLock::default(),
            dirty: Mutex::default(),
            write: Mutex::default(),
        }
    }

    fn io(&self, id: FileId) -> impl Fn(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: self.dir.join(id.name()),
            source,
        }
    }

    /// The open file `id`; None if it does not exist and `create` is false.
    fn file(&self, id: FileId, create: bool) -> Result<Option<Arc<File>>, StoreError> {
        if let Some(f) = self.open.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(Some(f.clone()));
        }
        let path = self.dir.join(id.name());
        if !create && !path.exists() {
            return Ok(None);
        }
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&id) {
            return Ok(Some(f.clone()));
        }
        if create {
            std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })?;
        }
        let existed = path.exists();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
            .map_err(self.io(id))?;
        if !existed {
            // The new name is durable with the folder.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StoreError::Io {
                    path: self.dir.clone(),
                    source,
                })?;
        }
        let f = Arc::new(f);
        open.insert(id, f.clone());
        Ok(Some(f))
    }

    /// Slots `first..first + n` of `id` (absent past the end, or damaged).
    fn read(&self, id: FileId, first: u64, n: usize) -> Result<Vec<Option<Hash>>, StoreError> {
        let mut out = vec![None; n];
        let Some(f) = self.file(id, false)? else {
            return Ok(out);
        };
        // Past what a file can hold (a hostile index): absent, as past the end.
        let Some(at) = first
            .checked_mul(SLOT as u64)
            .filter(|&at| at <= MAX_OFFSET)
        else {
            return Ok(out);
        };
        let mut buf = vec![0u8; n * SLOT];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(id)(e)),
            }
        }
        for (i, slot) in buf[..got - got % SLOT].chunks_exact(SLOT).enumerate() {
            let index = first + i as u64;
            if slot.iter().all(|&b| b == 0) {
                continue;
            }
            let (hash, sum) = slot.split_at(32);
            let sum = u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]);
            if sum != crc(id, index, hash) {
                tracing::warn!(
                    file = %self.dir.join(id.name()).display(),
                    slot = index,
                    "damaged Merkle slot read as absent (recomputed or written back from the audit log)"
                );
                continue;
            }
            let mut h = [0u8; 32];
            h.copy_from_slice(hash);
            out[i] = Some(h);
        }
        Ok(out)
    }

    /// Writes slots `first..` of `id`: `Some` sets a slot, `None` clears it.
    fn write(&self, id: FileId, first: u64, slots: &[Option<Hash>]) -> Result<(), StoreError> {
        let Some(f) = self.file(id, true)? else {
            return Ok(());
        };
        let mut buf = vec![0u8; slots.len() * SLOT];
        for (i, (slot, h)) in buf.chunks_exact_mut(SLOT).zip(slots).enumerate() {
            if let Some(h) = h {
                slot[..32].copy_from_slice(h);
                slot[32..].copy_from_slice(&crc(id, first + i as u64, h).to_le_bytes());
            }
        }
        let at = first
            .checked_mul(SLOT as u64)
            .filter(|&at| at <= MAX_OFFSET)
            .ok_or_else(|| {
                StoreError::Engine(
                    format!("slot {first} of {} is past what a file holds", id.name()).into(),
                )
            })?;
        f.write_all_at(&buf, at).map_err(self.io(id))?;
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(())
    }

    fn row_value(leaves: &[Option<Hash>]) -> Option<Vec<u8>> {
        if leaves.iter().all(Option::is_none) {
            return None;
        }
        let mut v = vec![0u8; ROW_BYTES];
        let mut bits = 0u16;
        for (slot, leaf) in leaves.iter().enumerate() {
            if let Some(h) = leaf {
                bits |= 1 << slot;
                v[2 + slot * 32..2 + (slot + 1) * 32].copy_from_slice(h);
            }
        }
        v[..2].copy_from_slice(&bits.to_be_bytes());
        Some(v)
    }

    /// Reads `key` (a key [`holds`] is true of; None otherwise).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(match route(key) {
            None => None,
            Some(Place::One(id, i)) => self.read(id, i, 1)?.remove(0).map(|h| h.to_vec()),
            Some(Place::Row(r)) => Self::row_value(&self.read(
                FileId::Leaves,
                r.saturating_mul(LEAVES_PER_ROW),
                LEAVES_PER_ROW as usize,
            )?),
        })
    }

    /// Writes `key`; a row sets the leaves its bitmap names and keeps the others.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.put_locked(key, value)
    }

    fn put_locked(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match route(key) {
            None => Err(StoreError::Engine(
                format!(
                    "merkle key {} is not kept in the node files",
                    hex::encode(key)
                )
                .into(),
            )),
            Some(Place::One(id, i)) => {
                let h: Hash = value
                    .try_into()
                    .map_err(|_| bad_value(key, value.len(), 32))?;
                self.write(id, i, &[Some(h)])
            }
            Some(Place::Row(r)) => {
                if value.len() != ROW_BYTES {
                    return Err(bad_value(key, value.len(), ROW_BYTES));
                }
                let first = r.saturating_mul(LEAVES_PER_ROW);
                let mut slots = self.read(FileId::Leaves, first, LEAVES_PER_ROW as usize)?;
                let bits = u16::from_be_bytes([value[0], value[1]]);
                for (slot, s) in slots.iter_mut().enumerate() {
                    if bits & (1 << slot) != 0 {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(&value[2 + slot * 32..2 + (slot + 1) * 32]);
                        *s = Some(h);
                    }
                }
                self.write(FileId::Leaves, first, &slots)
            }
        }
    }

    /// Writes `key` only if absent.
    pub fn insert_new(&self, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if self.get(key)?.is_some() {
            return Ok(false);
        }
        self.put_locked(key, value).map(|()| true)
    }

    /// Replaces `key`'s value only if it is `old`.
    pub fn update(&self, key: &[u8], old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if self.get(key)?.as_deref() != Some(old) {
            return Ok(false);
        }
        self.put_locked(key, new).map(|()| true)
    }

    /// Clears `key` (a row: all its leaves).
    pub fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        match route(key) {
            None => Ok(()),
            Some(Place::One(id, i)) => match self.file(id, false)? {
                Some(_) => self.write(id, i, &[None]),
                None => Ok(()),
            },
            Some(Place::Row(r)) => match self.file(FileId::Leaves, false)? {
                Some(_) => self.write(
                    FileId::Leaves,
                    r.saturating_mul(LEAVES_PER_ROW),
                    &[None; LEAVES_PER_ROW as usize],
                ),
                None => Ok(()),
            },
        }
    }

    /// Keys (and values) held here, in key order from `from` on, that start with `prefix`;
    /// at most `limit`. The old one-leaf keys are not listed (their leaves are in the rows).
    pub fn scan(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for id in FileId::all() {
            if out.len() >= limit {
                break;
            }
            let p = id.prefix();
            if !(p.starts_with(prefix) || prefix.starts_with(&p)) {
                continue;
            }
            // The first key index that can be ≥ `from` (keys below it are filtered out).
            let start = if from <= p.as_slice() {
                0
            } else if let Some(rest) = from.strip_prefix(p.as_slice()) {
                let mut be = [0u8; 8];
                let n = rest.len().min(8);
                be[..n].copy_from_slice(&rest[..n]);
                u64::from_be_bytes(be)
            } else {
                continue;
            };
            let Some(f) = self.file(id, false)? else {
                continue;
            };
            let slots = f.metadata().map_err(self.io(id))?.len() / SLOT as u64;
            let keys = slots.div_ceil(id.per_key());
            let mut k = start;
            while k < keys && out.len() < limit {
                let n = SCAN_CHUNK.min(keys - k);
                let per = id.per_key();
                let read = self.read(id, k * per, usize::try_from(n * per).unwrap_or(0))?;
                for (j, chunk) in read.chunks(per as usize).enumerate() {
                    let value = if id == FileId::Leaves {
                        Self::row_value(chunk)
                    } else {
                        chunk[0].map(|h| h.to_vec())
                    };
                    let Some(value) = value else { continue };
                    let mut key = p.clone();
                    key.extend_from_slice(&(k + j as u64).to_be_bytes());
                    if key.as_slice() >= from && key.starts_with(prefix) {
                        out.push((key, value));
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
                k += n;
            }
        }
        Ok(out)
    }

    /// The last key held here, in key order.
    pub fn last(&self) -> Result<Option<Entry>, StoreError> {
        for id in FileId::all().rev() {
            let Some(f) = self.file(id, false)? else {
                continue;
            };
            let per = id.per_key();
            let keys = (f.metadata().map_err(self.io(id))?.len() / SLOT as u64).div_ceil(per);
            let mut end = keys;
            while end > 0 {
                let n = SCAN_CHUNK.min(end);
                let read = self.read(id, (end - n) * per, usize::try_from(n * per).unwrap_or(0))?;
                for (j, chunk) in read.chunks(per as usize).enumerate().rev() {
                    let value = if id == FileId::Leaves {
                        Self::row_value(chunk)
                    } else {
                        chunk[0].map(|h| h.to_vec())
                    };
                    if let Some(value) = value {
                        let mut key = id.prefix();
                        key.extend_from_slice(&(end - n + j as u64).to_be_bytes());
                        return Ok(Some((key, value)));
                    }
                }
                end -= n;
            }
        }
        Ok(None)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let ids: Vec<FileId> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        for (n, id) in ids.iter().enumerate() {
            let synced = match self.file(*id, false)? {
                Some(f) => f.sync_data().map_err(self.io(*id)),
                None => Ok(()),
            };
            if let Err(e) = synced {
                // Still to be synced by the next flush.
                self.dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ids[n..].iter().copied());
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> Hash {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_be_bytes());
        h[31] = 1;
        h
    }

    fn node_key(level: u8, i: u64) -> Vec<u8> {
        let mut k = vec![level];
        k.extend_from_slice(&i.to_be_bytes());
        k
    }

    fn log_key(level: u8, i: u64) -> Vec<u8> {
        let mut k = vec![LOG_PREFIX, level];
        k.extend_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn only_dense_levels_and_leaves_are_routed_here() {
        assert!(holds(&node_key(4, 7)));
        assert!(holds(&node_key(63, 0)));
        assert!(!holds(&node_key(3, 7)), "low audit levels stay in sled");
        assert!(!holds(&node_key(64, 0)));
        assert!(holds(&log_key(0, 9)), "the old one-leaf keys");
        assert!(holds(&log_key(ROW_MARK, 9)));
        assert!(holds(&log_key(5, 9)));
        assert!(!holds(&log_key(2, 9)));
        assert!(!holds(b"T\x05short"));
    }

    /// Nodes and rows read back, rows merge (slots a write does not set keep their leaves,
    /// and old one-leaf keys name the same slots), a scan lists keys in sled's key order from
    /// any key, and a damaged slot reads as absent and is written again.
    #[test]
    fn nodes_and_rows_read_back_merge_and_scan_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let files = NodeFiles::open(dir.path());
        files.put(&node_key(4, 0), &h(40)).unwrap();
        files.put(&node_key(4, 1000), &h(41)).unwrap();
        files.put(&node_key(9, 2), &h(92)).unwrap();
        files.put(&log_key(4, 3), &h(43)).unwrap();
        assert_eq!(files.get(&node_key(4, 1000)).unwrap(), Some(h(41).to_vec()));
        assert_eq!(files.get(&node_key(4, 999)).unwrap(), None, "a hole");
        assert_eq!(files.get(&node_key(4, 5000)).unwrap(), None, "past the end");
        assert_eq!(files.get(&node_key(4, u64::MAX)).unwrap(), None);
        assert_eq!(files.get(&log_key(ROW_MARK, u64::MAX)).unwrap(), None);
        assert!(files.put(&node_key(4, u64::MAX), &h(1)).is_err());
        assert!(files.put(&node_key(4, 1), b"short").is_err());
        // Leaves: one old one-leaf key, then a row setting two other slots of row 0.
        files.put(&log_key(0, 1), &h(1)).unwrap();
        let mut row = vec![0u8; ROW_BYTES];
        row[..2].copy_from_slice(&(0b101u16).to_be_bytes());
        row[2..34].copy_from_slice(&h(0));
        row[2 + 64..2 + 96].copy_from_slice(&h(2));
        files.put(&log_key(ROW_MARK, 0), &row).unwrap();
        let got = files.get(&log_key(ROW_MARK, 0)).unwrap().unwrap();
        assert_eq!(u16::from_be_bytes([got[0], got[1]]), 0b111);
        assert_eq!(&got[2 + 32..2 + 64], &h(1));
        assert_eq!(files.get(&log_key(0, 2)).unwrap(), Some(h(2).to_vec()));
        // Compare-and-swap on a row.
        let stale = row.clone();
        assert!(!files.update(&log_key(ROW_MARK, 0), &stale, &row).unwrap());
        assert!(files.update(&log_key(ROW_MARK, 0), &got, &row).unwrap());
        assert!(!files.insert_new(&log_key(ROW_MARK, 0), &row).unwrap());
        assert!(files.insert_new(&log_key(ROW_MARK, 3), &row).unwrap());
        // Key order, as sled would list them, from the start and from inside a file.
        let keys: Vec<Vec<u8>> = files
            .scan(b"", b"", usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let want = vec![
            node_key(4, 0),
            node_key(4, 1000),
            node_key(9, 2),
            log_key(4, 3),
            log_key(ROW_MARK, 0),
            log_key(ROW_MARK, 3),
        ];
        assert_eq!(keys, want);
        let mut from = node_key(4, 0);
        from.push(0);
        let next: Vec<Vec<u8>> = files
            .scan(&from, b"", 2)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(next, want[1..3].to_vec());
        let rows = files
            .scan(b"", &[LOG_PREFIX, ROW_MARK], usize::MAX)
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            files.last().unwrap().map(|(k, _)| k),
            Some(log_key(ROW_MARK, 3))
        );
        // A flipped byte: the slot reads as absent; the next write puts it back.
        files.flush().unwrap();
        let path = dir.path().join("audit-04.slots");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000 * SLOT + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let files = NodeFiles::open(dir.path());
        assert_eq!(files.get(&node_key(4, 1000)).unwrap(), None);
        assert_eq!(files.get(&node_key(4, 0)).unwrap(), Some(h(40).to_vec()));
        files.put(&node_key(4, 1000), &h(41)).unwrap();
        assert_eq!(files.get(&node_key(4, 1000)).unwrap(), Some(h(41).to_vec()));
        // A slot moved to another index does not check either (the CRC covers the index).
        let mut bytes = std::fs::read(&path).unwrap();
        let (a, b) = bytes.split_at_mut(1000 * SLOT);
        a[999 * SLOT..].copy_from_slice(&b[..SLOT]);
        std::fs::write(&path, &bytes).unwrap();
        let files = NodeFiles::open(dir.path());
        assert_eq!(files.get(&node_key(4, 999)).unwrap(), None);
        files.remove(&node_key(4, 1000)).unwrap();
        assert_eq!(files.get(&node_key(4, 1000)).unwrap(), None);
    }
}
