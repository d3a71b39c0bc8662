//! The audit log's entries on an embedded site: append-only segment files beside sled, not in
//! it (issue 30). sled keeps every page it ever read in its page table and replays its log at
//! each start, so a log of millions of entries made the start and the resident memory grow
//! with it; segment files are opened in O(segments), read by offset, and cost no memory while
//! nobody reads them.
//!
//! **Layout** (`<data_dir>/audit/`): `<first seq, 20 digits>.seg` files of records
//! `len u32 ‖ crc32 u32 ‖ seq u64 ‖ value` (little-endian; the CRC covers seq and value), a
//! segment sealed at [`SEGMENT_BYTES`]; beside each sealed one its index `.idx` (one u64
//! offset per record), written once at sealing (temp file, fsync, rename). The open segment's
//! offsets are in memory, rebuilt at start by reading that one segment (bounded, so the start
//! is flat in the log's size). `floor` holds the lowest seq retention kept.
//!
//! **Durability** is the audit writer's, as with sled: an append is written (`write`) at once,
//! so a killed process loses nothing written; [`SegmentLog::flush`] fsyncs it, and the writer
//! flushes before it empties its journal. A torn record at the end of the open segment (a
//! power loss) is cut off at start — the journal then writes back what it held. A damaged
//! record anywhere else is refused: at start for the open segment, naming the file and offset;
//! for a sealed one when it is read (the background read after each start finds it).
//!
//! **Operations** are the few the audit log makes: append the next seq, read by seq or range,
//! the last entry, remove from the front (retention) or the back (a batch that failed), and
//! rewrite the last entry with the same bytes (a journal replay).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Entry, StoreError};

/// A segment is sealed once it holds this many bytes (a start reads the open one whole).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Record header: len, crc, seq.
const HEADER: usize = 16;

/// The largest value a record may hold (a bound against a damaged length field).
const MAX_VALUE: usize = 16 << 20;

/// The folder of a data folder's segments.
pub fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("audit")
}

struct Segment {
    first: u64,
    /// Records in it.
    count: u64,
    path: PathBuf,
}

impl Segment {
    fn idx_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }
}

struct Inner {
    /// Sealed segments, oldest first.
    sealed: Vec<Segment>,
    /// The open segment (always present once the log is open).
    active: Segment,
    file: Arc<File>,
    /// Offsets of the open segment's records, and its length (the end of the last record).
    offsets: Vec<u64>,
    len: u64,
    /// Entries below this seq were removed.
    floor: u64,
    floor_durable: u64,
    /// The open segment is new since the last flush (its folder entry needs an fsync).
    dir_dirty: bool,
    /// A write failed and could not be undone: refused until [`SegmentLog::recover`].
    broken: bool,
}

/// The log (see the module docs).
pub struct SegmentLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, message: String) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        message,
    }
}

fn seq_key(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn frame(seq: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    frame_into(&mut out, seq, value);
    out
}

/// Appends the record of `seq` (see [`frame`]) to `out`.
fn frame_into(out: &mut Vec<u8>, seq: u64, value: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(value);
    out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(value);
}

/// What a record at the start of `buf` is.
enum Parsed<'a> {
    /// A whole record: its seq, value and length in bytes.
    Record(u64, &'a [u8], usize),
    /// `buf` ends inside it.
    Short,
    /// Its checksum or length is wrong.
    Bad(String),
}

fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < HEADER {
        return Parsed::Short;
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let len = word(0) as usize;
    if len > MAX_VALUE {
        return Parsed::Bad(format!("a record length of {len} bytes"));
    }
    if buf.len() < HEADER + len {
        return Parsed::Short;
    }
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&buf[8..16]);
    let value = &buf[HEADER..HEADER + len];
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq_bytes);
    crc.update(value);
    if crc.finalize() != word(4) {
        return Parsed::Bad("the record's checksum does not match".into());
    }
    Parsed::Record(u64::from_le_bytes(seq_bytes), value, HEADER + len)
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Bytes of a segment a scan holds at a time (more only for a record longer than this).
const SCAN_WINDOW: usize = 1 << 20;

/// A segment read front to back through one bounded buffer. A start scans the open segment
/// (up to [`SEGMENT_BYTES`]); reading it whole made the start's peak memory grow with how full
/// that segment was, and the allocator kept the freed pages resident (issue 30: RSS at rest
/// 92–102 MiB at 10⁷ entries against 70 MiB for a small site).
struct Window<'f> {
    file: &'f File,
    path: &'f Path,
    size: u64,
    /// File offset of `buf[0]`.
    base: u64,
    buf: Vec<u8>,
}

impl<'f> Window<'f> {
    fn open(file: &'f File, path: &'f Path) -> Result<Self, StoreError> {
        let size = file.metadata().map_err(|e| io(path, e))?.len();
        Ok(Self {
            file,
            path,
            size,
            base: 0,
            buf: Vec::new(),
        })
    }

    /// Reads `want` bytes from `at` (fewer at the end of the file) into the window.
    fn fill(&mut self, at: u64, want: usize) -> Result<(), StoreError> {
        let n = usize::try_from(self.size.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(want);
        self.buf.resize(n, 0);
        self.file
            .read_exact_at(&mut self.buf, at)
            .map_err(|e| io(self.path, e))?;
        self.base = at;
        Ok(())
    }

    /// The record at file offset `at`: `Short` only when the file ends inside it.
    fn parse_at(&mut self, at: u64) -> Result<Parsed<'_>, StoreError> {
        let end = self.base + self.buf.len() as u64;
        if at < self.base || at.saturating_add(HEADER as u64) > end {
            self.fill(at, SCAN_WINDOW)?;
        }
        let off = usize::try_from(at - self.base).unwrap_or(usize::MAX);
        let whole = match parse(&self.buf[off..]) {
            Parsed::Short => None,
            Parsed::Record(_, _, n) => Some(n),
            Parsed::Bad(_) => Some(0),
        };
        if whole.is_none() && self.base + (self.buf.len() as u64) < self.size {
            // The record runs past the window: read from it, the whole of it at least (a
            // length over MAX_VALUE is `Bad` before it is `Short`).
            let len = self
                .buf
                .get(off..off + 4)
                .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize);
            self.fill(at, SCAN_WINDOW.max(HEADER + len))?;
            return Ok(parse(&self.buf));
        }
        Ok(parse(&self.buf[off..]))
    }

    /// The file from `at` to its end, read whole (the rare torn-tail check only).
    fn rest(&self, at: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![0u8; usize::try_from(self.size.saturating_sub(at)).unwrap_or(0)];
        self.file
            .read_exact_at(&mut out, at)
            .map_err(|e| io(self.path, e))?;
        Ok(out)
    }
}

/// Reads a segment's records from the start: their offsets and the end of the last whole one.
/// A record that is torn (the file ends inside it, or it is the last and its checksum fails)
/// ends the read when `torn_tail_ok`; any other damage is refused. Holds one window of the file
/// at a time ([`SCAN_WINDOW`]), not the file.
fn scan_segment(seg: &Segment, torn_tail_ok: bool) -> Result<(Vec<u64>, u64), StoreError> {
    let file = File::open(&seg.path).map_err(|e| io(&seg.path, e))?;
    let mut w = Window::open(&file, &seg.path)?;
    let size = w.size;
    let mut offsets = Vec::new();
    let mut at = 0u64;
    while at < size {
        let expected = seg.first + offsets.len() as u64;
        let parsed = match w.parse_at(at)? {
            Parsed::Record(seq, _, n) => Ok((seq, n as u64)),
            Parsed::Short => Err(None),
            Parsed::Bad(why) => Err(Some(why)),
        };
        match parsed {
            Ok((seq, n)) if seq == expected => {
                offsets.push(at);
                at += n;
            }
            Ok((seq, n)) if at + n == size && torn_tail_ok => {
                tracing::warn!(path = %seg.path.display(), offset = at, seq, expected, "audit segment: a last record out of order was cut off");
                break;
            }
            Ok((seq, _)) => {
                return Err(damaged(
                    &seg.path,
                    format!("the record at offset {at} is seq {seq}, expected {expected}"),
                ));
            }
            Err(why) => {
                if torn_tail_ok {
                    let rest = w.rest(at)?;
                    if last_record_ends_file(&rest, 0) && !later_record(&rest, 0, expected) {
                        break;
                    }
                }
                return Err(damaged(
                    &seg.path,
                    match why {
                        None => format!("the record at offset {at} is cut short"),
                        Some(why) => format!("the record at offset {at}: {why}"),
                    },
                ));
            }
        }
    }
    Ok((offsets, at))
}

/// Whether the record at `at` (whose checksum failed) is the file's last: a torn write.
fn last_record_ends_file(bytes: &[u8], at: usize) -> bool {
    let rest = &bytes[at..];
    if rest.len() < 4 {
        return true;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    HEADER.saturating_add(len) >= rest.len()
}

/// Whether a whole record with a seq after `seq` starts anywhere past `at`: then the record at
/// `at` is damage in the middle (a flipped length byte can make it look torn), not a torn end.
fn later_record(bytes: &[u8], at: usize, seq: u64) -> bool {
    let want = (seq + 1).to_le_bytes();
    (at + 1..bytes.len().saturating_sub(HEADER - 1)).any(|pos| {
        bytes[pos + 8..pos + 16] == want
            && matches!(parse(&bytes[pos..]), Parsed::Record(s, ..) if s == seq + 1)
    })
}

fn write_index(seg: &Segment, offsets: &[u64]) -> Result<(), StoreError> {
    let tmp = seg.path.with_extension("idx.tmp");
    let mut bytes = Vec::with_capacity(offsets.len() * 8);
    for o in offsets {
        bytes.extend_from_slice(&o.to_le_bytes());
    }
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, seg.idx_path()).map_err(|e| io(&tmp, e))
}

fn read_floor(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join("floor");
    match std::fs::read(&path) {
        Ok(b) => <[u8; 8]>::try_from(b.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| damaged(&path, format!("{} bytes, not 8", b.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(&path, e)),
    }
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`: O(segments) plus one read of the open segment.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let e = e.map_err(|e| io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".seg") {
                let first = stem
                    .parse::<u64>()
                    .map_err(|_| damaged(&e.path(), "a segment name that is not a seq".into()))?;
                firsts.push(first);
            } else if name.ends_with(".tmp") {
                // An index or floor a crash left half written; it is written again.
                let _ = std::fs::remove_file(e.path());
            }
        }
        firsts.sort_unstable();
        let floor = read_floor(dir)?;
        let mut sealed = Vec::new();
        let last = firsts.pop();
        for (i, &first) in firsts.iter().enumerate() {
            let next = firsts.get(i + 1).copied().or(last).unwrap_or(first);
            let seg = Segment {
                first,
                count: next.saturating_sub(first),
                path: segment_path(dir, first),
            };
            let idx = seg.idx_path();
            let idx_len = std::fs::metadata(&idx).map(|m| m.len()).ok();
            if idx_len != Some(seg.count * 8) {
                // Sealed, but its index was not written (a crash in between): read it once.
                let (offsets, _) = scan_segment(&seg, false)?;
                if offsets.len() as u64 != seg.count {
                    return Err(damaged(
                        &seg.path,
                        format!(
                            "{} records, but the next segment starts at seq {next}",
                            offsets.len()
                        ),
                    ));
                }
                write_index(&seg, &offsets)?;
            }
            sealed.push(seg);
        }
        let first = last.unwrap_or(1);
        let mut active = Segment {
            first,
            count: 0,
            path: segment_path(dir, first),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&active.path)
            .map_err(|e| io(&active.path, e))?;
        let (offsets, len) = scan_segment(&active, true)?;
        let on_disk = file.metadata().map_err(|e| io(&active.path, e))?.len();
        if on_disk > len {
            tracing::warn!(path = %active.path.display(), kept = len, cut = on_disk - len, "audit segment: a torn last record was cut off (the journal writes back what it held)");
            file.set_len(len).map_err(|e| io(&active.path, e))?;
            file.sync_all().map_err(|e| io(&active.path, e))?;
        }
        active.count = offsets.len() as u64;
        let dir_dirty = last.is_none();
        Ok(Self {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                sealed,
                active,
                file: Arc::new(file),
                offsets,
                len,
                floor,
                floor_durable: floor,
                dir_dirty,
                broken: false,
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Engine("the audit segment log's lock is poisoned".into()))
    }

    /// The value stored under `key` (a big-endian seq).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(seq) = seq_key(key) else {
            return Ok(None);
        };
        Ok(self
            .range(seq, 1)?
            .pop()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v))
    }

    /// Up to `limit` entries with seq ≥ `from`.
    pub fn range(&self, from: u64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        self.walk(from, limit, &mut Vec::new(), &mut |seq, value| {
            out.push((seq.to_be_bytes().to_vec(), value.to_vec()));
        })?;
        Ok(out)
    }

    /// The seqs of up to `limit` entries with seq ≥ `from`, each record read and checked as
    /// [`SegmentLog::range`] checks it (length, checksum, seq), its value not kept: what a
    /// read-through of the whole log needs. `scratch` holds the bytes read and is reused from
    /// call to call (a read of 10⁷ entries allocated a chunk buffer and a value per entry, and
    /// the allocator kept some of that churn resident after the read).
    pub fn seqs(
        &self,
        from: u64,
        limit: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        self.walk(from, limit, scratch, &mut |seq, _| out.push(seq))?;
        Ok(out)
    }

    /// Reads up to `limit` records from `from` on, segment by segment, into `buf`, handing each
    /// (seq, value) to `f`.
    fn walk(
        &self,
        from: u64,
        limit: usize,
        buf: &mut Vec<u8>,
        f: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), StoreError> {
        let mut got = 0usize;
        let mut next = from;
        while got < limit {
            // Where `next` is, read under the lock; the bytes are read outside it.
            let plan = {
                let inner = self.lock()?;
                next = next
                    .max(inner.floor)
                    .max(inner.sealed.first().map_or(inner.active.first, |s| s.first));
                inner.locate(next, limit - got)
            };
            let Some(read) = plan else { break };
            let n = read.each(buf, f)?;
            if n == 0 {
                break;
            }
            next = read.first + n as u64;
            got += n;
        }
        Ok(())
    }

    /// The last entry.
    pub fn last(&self) -> Result<Option<Entry>, StoreError> {
        let last = {
            let inner = self.lock()?;
            inner.last_seq()
        };
        match last {
            Some(seq) => Ok(self.range(seq, 1)?.pop()),
            None => Ok(None),
        }
    }

    /// Stores `value` at `key`: the next seq is appended; the last one may be written again
    /// (the same bytes: nothing changes; other bytes replace it); into an empty log, any seq
    /// at or above the floor starts it. Anything else is refused (the log has no holes).
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let seq = seq_key(key).ok_or_else(|| {
            StoreError::Engine(format!("an audit key of {} bytes is not a seq", key.len()).into())
        })?;
        let mut inner = self.lock()?;
        if inner.broken {
            return Err(StoreError::Engine(
                "an audit segment write failed and was not undone; the store must be reopened"
                    .into(),
            ));
        }
        match inner.last_seq() {
            Some(last) if seq == last + 1 => {}
            Some(last) if seq <= last && seq >= inner.floor => {
                drop(inner);
                if self.get(key)?.as_deref() == Some(value) {
                    return Ok(());
                }
                let mut inner = self.lock()?;
                if Some(seq) != inner.last_seq() {
                    return Err(StoreError::Engine(
                        format!("audit seq {seq} would be rewritten below the log's last entry")
                            .into(),
                    ));
                }
                inner.truncate_last(&self.dir)?;
                return inner.append(&self.dir, seq, value);
            }
            None if seq >= inner.floor => {
                inner.restart_at(&self.dir, seq)?;
            }
            last => {
                return Err(StoreError::Engine(
                    format!(
                        "audit seq {seq} does not follow the log's last entry ({})",
                        last.map_or("none".into(), |l| l.to_string())
                    )
                    .into(),
                ));
            }
        }
        inner.append(&self.dir, seq, value)
    }

    /// Stores several entries in key order, as [`SegmentLog::put`] each would: when they are
    /// the seqs that follow the log's last entry, one after another (an audit batch), their
    /// records go to the open segment in one write; anything else goes a `put` at a time.
    pub fn put_many(&self, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        let seqs: Option<Vec<u64>> = entries.iter().map(|(k, _)| seq_key(k)).collect();
        let mut inner = self.lock()?;
        let follows = match (&seqs, inner.last_seq()) {
            (Some(seqs), Some(last)) => {
                seqs.first() == Some(&(last + 1)) && seqs.windows(2).all(|w| w[1] == w[0] + 1)
            }
            _ => false,
        };
        if inner.broken || !follows || entries.len() < 2 {
            drop(inner);
            for (k, v) in entries {
                self.put(k, v)?;
            }
            return Ok(());
        }
        let first = seqs.and_then(|s| s.first().copied()).unwrap_or_default();
        let values: Vec<&[u8]> = entries.iter().map(|(_, v)| *v).collect();
        inner.append_many(&self.dir, first, &values)
    }

    /// Removes `key`: the first entry (retention, front to back) or the last (a failed batch).
    pub fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        let Some(seq) = seq_key(key) else {
            return Ok(());
        };
        let mut inner = self.lock()?;
        let Some(last) = inner.last_seq() else {
            return Ok(());
        };
        if seq < inner.floor || seq > last {
            return Ok(());
        }
        if seq == last {
            return inner.truncate_last(&self.dir);
        }
        if seq == inner.floor || Some(seq) == inner.first_seq() {
            inner.floor = seq + 1;
            return inner.drop_sealed_below_floor();
        }
        Err(StoreError::Engine(
            format!("audit seq {seq} cannot be removed from the middle of the log").into(),
        ))
    }

    /// Makes every append and removal so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner
            .file
            .sync_data()
            .map_err(|e| io(&inner.active.path, e))?;
        if inner.dir_dirty {
            sync_dir(&self.dir)?;
            inner.dir_dirty = false;
        }
        if inner.floor != inner.floor_durable {
            let path = self.dir.join("floor");
            let tmp = self.dir.join("floor.tmp");
            std::fs::write(&tmp, inner.floor.to_le_bytes())
                .and_then(|()| File::open(&tmp)?.sync_all())
                .map_err(|e| io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
            sync_dir(&self.dir)?;
            inner.floor_durable = inner.floor;
        }
        Ok(())
    }

    /// After a failed write: cut the open segment back to its last whole record.
    pub fn recover(&self) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if !inner.broken {
            return Ok(false);
        }
        let len = inner.len;
        inner
            .file
            .set_len(len)
            .map_err(|e| io(&inner.active.path, e))?;
        inner.broken = false;
        Ok(true)
    }
}

/// A read planned under the lock: records `first..first + count` of one segment file.
struct Read {
    path: PathBuf,
    file: Option<Arc<File>>,
    first: u64,
    count: usize,
    /// The offsets, when known (the open segment); else read from the index.
    offsets: Option<(u64, u64)>,
    seg_first: u64,
}

impl Read {
    /// Reads the planned records into `buf` (its allocation reused) and hands each (seq,
    /// value) to `f`; returns how many.
    fn each(&self, buf: &mut Vec<u8>, f: &mut dyn FnMut(u64, &[u8])) -> Result<usize, StoreError> {
        let file = match &self.file {
            Some(f) => f.clone(),
            None => Arc::new(File::open(&self.path).map_err(|e| io(&self.path, e))?),
        };
        let (start, end) = match self.offsets {
            Some(range) => range,
            None => {
                let idx = self.path.with_extension("idx");
                let f = File::open(&idx).map_err(|e| io(&idx, e))?;
                let at = (self.first - self.seg_first) * 8;
                let mut b = [0u8; 16];
                let n = read_at_most(&f, &mut b, at).map_err(|e| io(&idx, e))?;
                if n < 8 {
                    return Err(damaged(&idx, format!("no offset for seq {}", self.first)));
                }
                let start = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                let end_rec = self.first - self.seg_first + self.count as u64;
                let mut e = [0u8; 8];
                let end = if read_at_most(&f, &mut e, end_rec * 8).map_err(|e| io(&idx, e))? == 8 {
                    u64::from_le_bytes(e)
                } else {
                    file.metadata().map_err(|e| io(&self.path, e))?.len()
                };
                (start, end)
            }
        };
        let len = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
        buf.clear();
        buf.resize(len, 0);
        file.read_exact_at(buf, start)
            .map_err(|e| io(&self.path, e))?;
        let mut count = 0usize;
        let mut at = 0usize;
        while count < self.count {
            let seq = self.first + count as u64;
            match parse(&buf[at..]) {
                Parsed::Record(s, value, n) if s == seq => {
                    f(seq, value);
                    count += 1;
                    at += n;
                }
                Parsed::Record(s, ..) => {
                    return Err(StoreError::Engine(
                        format!(
                            "Read corrupted data in {} at offset {}: seq {s} where seq {seq} belongs",
                            self.path.display(),
                            start + at as u64
                        )
                        .into(),
                    ));
                }
                Parsed::Short | Parsed::Bad(_) => {
                    return Err(StoreError::Engine(
                        format!(
                            "Read corrupted data in {} at offset {} (seq {seq}): the record's \
                             checksum or length is wrong",
                            self.path.display(),
                            start + at as u64
                        )
                        .into(),
                    ));
                }
            }
        }
        Ok(count)
    }
}

fn read_at_most(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl Inner {
    fn first_seq(&self) -> Option<u64> {
        let first = self
            .sealed
            .first()
            .map_or(self.active.first, |s| s.first)
            .max(self.floor);
        self.last_seq().filter(|&l| l >= first).map(|_| first)
    }

    fn last_seq(&self) -> Option<u64> {
        if self.active.count > 0 {
            Some(self.active.first + self.active.count - 1)
        } else {
            self.sealed
                .last()
                .map(|s| s.first + s.count - 1)
                .filter(|&l| l >= self.floor)
        }
        .filter(|&l| l >= self.floor)
    }

    /// The read of up to `limit` records from `seq`, within one segment.
    fn locate(&self, seq: u64, limit: usize) -> Option<Read> {
        let last = self.last_seq()?;
        if seq > last {
            return None;
        }
        if seq >= self.active.first {
            let i = usize::try_from(seq - self.active.first).ok()?;
            let n = limit.min(self.offsets.len() - i);
            let end = self.offsets.get(i + n).copied().unwrap_or(self.len);
            return Some(Read {
                path: self.active.path.clone(),
                file: Some(self.file.clone()),
                first: seq,
                count: n,
                offsets: Some((self.offsets[i], end)),
                seg_first: self.active.first,
            });
        }
        let seg = self
            .sealed
            .iter()
            .rev()
            .find(|s| s.first <= seq && seq < s.first + s.count)?;
        let n = usize::try_from(seg.first + seg.count - seq)
            .unwrap_or(usize::MAX)
            .min(limit);
        Some(Read {
            path: seg.path.clone(),
            file: None,
            first: seq,
            count: n,
            offsets: None,
            seg_first: seg.first,
        })
    }

    fn append(&mut self, dir: &Path, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        if self.len >= SEGMENT_BYTES && self.active.count > 0 {
            self.seal(dir)?;
        }
        let bytes = frame(seq, value);
        if let Err(e) = self.file.write_all_at(&bytes, self.len) {
            // Undo a partial record; if that fails too, refuse until recovered.
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            return Err(io(&self.active.path, e));
        }
        self.offsets.push(self.len);
        self.len += bytes.len() as u64;
        self.active.count += 1;
        Ok(())
    }

    /// [`Inner::append`] of `values` at `first`, `first + 1`, …: one write; all or nothing. The
    /// seal check comes once, before the batch, so a segment may pass [`SEGMENT_BYTES`] by one
    /// writer batch (at most 4,096 entries), as it may by one record; readers go by offsets.
    fn append_many(&mut self, dir: &Path, first: u64, values: &[&[u8]]) -> Result<(), StoreError> {
        if self.len >= SEGMENT_BYTES && self.active.count > 0 {
            self.seal(dir)?;
        }
        let mut bytes = Vec::with_capacity(values.iter().map(|v| HEADER + v.len()).sum());
        let mut offsets = Vec::with_capacity(values.len());
        for (seq, v) in (first..).zip(values) {
            offsets.push(self.len + bytes.len() as u64);
            frame_into(&mut bytes, seq, v);
        }
        if let Err(e) = self.file.write_all_at(&bytes, self.len) {
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            return Err(io(&self.active.path, e));
        }
        self.offsets.extend(offsets);
        self.len += bytes.len() as u64;
        self.active.count += values.len() as u64;
        Ok(())
    }

    /// Seals the open segment (its index written and synced) and opens the next.
    fn seal(&mut self, dir: &Path) -> Result<(), StoreError> {
        self.file.sync_all().map_err(|e| io(&self.active.path, e))?;
        write_index(&self.active, &self.offsets)?;
        let first = self.active.first + self.active.count;
        let old = self.open_new_segment(dir, first)?;
        self.sealed.push(old);
        Ok(())
    }

    /// Starts an empty log at `seq` (a restore into an empty store, after retention).
    fn restart_at(&mut self, dir: &Path, seq: u64) -> Result<(), StoreError> {
        if self.active.first == seq && self.sealed.is_empty() {
            return Ok(());
        }
        for s in self.sealed.drain(..) {
            let _ = std::fs::remove_file(s.idx_path());
            let _ = std::fs::remove_file(&s.path);
        }
        let old = self.open_new_segment(dir, seq)?;
        // The new segment may have the old one's name (it started at the same seq): then the
        // file just made is the one to keep.
        if old.path != self.active.path {
            let _ = std::fs::remove_file(&old.path);
        }
        Ok(())
    }

    /// Makes a new, empty segment starting at `first` the open one; returns the one it
    /// replaced (the caller seals or deletes it).
    fn open_new_segment(&mut self, dir: &Path, first: u64) -> Result<Segment, StoreError> {
        let path = segment_path(dir, first);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        self.file = Arc::new(file);
        self.offsets.clear();
        self.len = 0;
        self.dir_dirty = true;
        Ok(std::mem::replace(
            &mut self.active,
            Segment {
                first,
                count: 0,
                path,
            },
        ))
    }

    /// Cuts the last record off.
    fn truncate_last(&mut self, dir: &Path) -> Result<(), StoreError> {
        if self.active.count == 0 {
            // The open segment is empty: the last record is the last sealed segment's; it
            // becomes the open one again.
            let Some(seg) = self.sealed.pop() else {
                return Ok(());
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(|e| io(&seg.path, e))?;
            let (offsets, len) = scan_segment(&seg, false)?;
            let _ = std::fs::remove_file(&self.active.path);
            let _ = std::fs::remove_file(seg.idx_path());
            self.active = seg;
            self.file = Arc::new(file);
            self.offsets = offsets;
            self.len = len;
            self.dir_dirty = true;
            let _ = dir;
        }
        let Some(at) = self.offsets.pop() else {
            return Ok(());
        };
        self.file
            .set_len(at)
            .map_err(|e| io(&self.active.path, e))?;
        self.len = at;
        self.active.count -= 1;
        Ok(())
    }

    /// Deletes sealed segments wholly below the floor.
    fn drop_sealed_below_floor(&mut self) -> Result<(), StoreError> {
        while let Some(s) = self.sealed.first() {
            if s.first + s.count > self.floor {
                break;
            }
            let s = self.sealed.remove(0);
            std::fs::remove_file(&s.path).map_err(|e| io(&s.path, e))?;
            let _ = std::fs::remove_file(s.idx_path());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(seq: u64) -> [u8; 8] {
        seq.to_be_bytes()
    }

    fn value(seq: u64) -> Vec<u8> {
        format!(
            "{{\"seq\":{seq},\"pad\":\"{}\"}}",
            "x".repeat((seq % 97) as usize)
        )
        .into_bytes()
    }

    #[test]
    fn appends_read_back_across_sealed_segments_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        for seq in 1..=3000 {
            log.put(&k(seq), &value(seq)).unwrap();
            if seq % 700 == 0 {
                // Force small segments.
                let mut inner = log.lock().unwrap();
                inner.seal(dir.path()).unwrap();
            }
        }
        log.flush().unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert!(log.lock().unwrap().sealed.len() >= 4);
        assert_eq!(log.last().unwrap().unwrap().0, k(3000).to_vec());
        let all = log.range(0, usize::MAX).unwrap();
        assert_eq!(all.len(), 3000);
        for (i, (key, v)) in all.iter().enumerate() {
            let seq = i as u64 + 1;
            assert_eq!(key, &k(seq).to_vec());
            assert_eq!(v, &value(seq));
        }
        assert_eq!(log.get(&k(1401)).unwrap(), Some(value(1401)));
        let mid = log.range(695, 10).unwrap();
        assert_eq!(mid.first().unwrap().0, k(695).to_vec());
        assert_eq!(mid.len(), 10);
        // The read-through's keys-only read: the same seqs, chunk by chunk across segments,
        // in one buffer that only grows to the largest chunk.
        let mut scratch = Vec::new();
        let (mut next, mut seqs) = (0, Vec::new());
        loop {
            let chunk = log.seqs(next, 512, &mut scratch).unwrap();
            let Some(&last) = chunk.last() else { break };
            seqs.extend(chunk);
            next = last + 1;
        }
        assert_eq!(seqs, (1..=3000).collect::<Vec<u64>>());
        // At most twice its largest chunk (records here are under 160 bytes), not the log.
        assert!(scratch.capacity() < 2 * 512 * 160, "{}", scratch.capacity());
        assert_eq!(
            log.seqs(695, 10, &mut scratch).unwrap(),
            (695..705).collect::<Vec<_>>()
        );
        // The same bytes again: nothing changes; a gap or a rewrite below the end: refused.
        log.put(&k(3000), &value(3000)).unwrap();
        assert!(log.put(&k(3002), b"x").is_err());
        assert!(log.put(&k(10), b"other").is_err());
        assert_eq!(log.get(&k(10)).unwrap(), Some(value(10)));
    }

    #[test]
    fn a_batch_is_the_same_records_as_its_puts_one_by_one() {
        // One log written a put at a time, one in batches of every size (a seal between two):
        // the same files byte for byte, the same entries after a reopen. A batch that does not
        // follow the last entry is refused as its first put would be, writing nothing.
        let (one, many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            SegmentLog::open(one.path()).unwrap(),
            SegmentLog::open(many.path()).unwrap(),
        );
        a.put(&k(1), &value(1)).unwrap();
        b.put(&k(1), &value(1)).unwrap();
        let mut seq = 2;
        for size in [1u64, 2, 7, 100, 3, 500, 64] {
            let keys: Vec<[u8; 8]> = (seq..seq + size).map(k).collect();
            let values: Vec<Vec<u8>> = (seq..seq + size).map(value).collect();
            let batch: Vec<(&[u8], &[u8])> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            for (k, v) in &batch {
                a.put(k, v).unwrap();
            }
            b.put_many(&batch).unwrap();
            seq += size;
            if size == 100 {
                a.lock().unwrap().seal(one.path()).unwrap();
                b.lock().unwrap().seal(many.path()).unwrap();
            }
        }
        let (gap_k, gap_v) = ([k(seq + 1), k(seq + 2)], value(0));
        assert!(
            b.put_many(&[(&gap_k[0], &gap_v), (&gap_k[1], &gap_v)])
                .is_err()
        );
        a.flush().unwrap();
        b.flush().unwrap();
        drop((a, b));
        let files = |d: &Path| {
            let mut f: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name(), std::fs::read(e.path()).unwrap())
                })
                .collect();
            f.sort();
            f
        };
        assert_eq!(files(one.path()), files(many.path()));
        let b = SegmentLog::open(many.path()).unwrap();
        let all = b.range(0, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, seq - 1);
        for (i, (key, v)) in all.iter().enumerate() {
            assert_eq!((key, v), (&k(i as u64 + 1).to_vec(), &value(i as u64 + 1)));
        }
    }

    #[test]
    fn retention_removes_from_the_front_and_deletes_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        for seq in 1..=100 {
            log.put(&k(seq), &value(seq)).unwrap();
            if seq % 25 == 0 {
                log.lock().unwrap().seal(dir.path()).unwrap();
            }
        }
        for seq in 1..=60 {
            log.remove(&k(seq)).unwrap();
        }
        log.flush().unwrap();
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(!segment_path(dir.path(), 26).exists());
        assert!(segment_path(dir.path(), 51).exists());
        assert_eq!(log.range(0, 1).unwrap()[0].0, k(61).to_vec());
        assert_eq!(log.get(&k(55)).unwrap(), None);
        assert!(log.remove(&k(80)).is_err(), "not from the middle");
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.range(0, 1).unwrap()[0].0, k(61).to_vec());
        assert_eq!(log.range(0, usize::MAX).unwrap().len(), 40);
        // The last entry removed (a failed batch), then written again.
        log.remove(&k(100)).unwrap();
        assert_eq!(log.last().unwrap().unwrap().0, k(99).to_vec());
        log.put(&k(100), b"again").unwrap();
        assert_eq!(log.get(&k(100)).unwrap(), Some(b"again".to_vec()));
    }

    /// A log whose every entry is below the floor while a sealed segment is still on disk (its
    /// deletion failed after retention moved the floor), written again at the empty open
    /// segment's first seq: the new file has the old one's name and must be the one kept
    /// (before the fold into `open_new_segment`, it was deleted right after it was made).
    #[test]
    fn an_emptied_log_restarts_in_a_file_it_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        for seq in 1..=10 {
            log.put(&k(seq), &value(seq)).unwrap();
        }
        log.lock().unwrap().seal(dir.path()).unwrap();
        log.flush().unwrap();
        drop(log);
        std::fs::write(dir.path().join("floor"), 11u64.to_le_bytes()).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert!(log.last().unwrap().is_none());
        log.put(&k(11), &value(11)).unwrap();
        log.put(&k(12), &value(12)).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.range(0, 10).unwrap().len(), 2);
        assert_eq!(log.get(&k(12)).unwrap(), Some(value(12)));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_damage_elsewhere_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        for seq in 1..=20 {
            log.put(&k(seq), &value(seq)).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        let seg = segment_path(dir.path(), 1);
        let whole = std::fs::read(&seg).unwrap();
        // A power loss in the middle of the last record.
        std::fs::write(&seg, &whole[..whole.len() - 5]).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.last().unwrap().unwrap().0, k(19).to_vec());
        log.put(&k(20), &value(20)).unwrap();
        drop(log);
        // A flipped byte in an earlier record: refused at open, naming the file.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[40] ^= 0x5a;
        std::fs::write(&seg, &bytes).unwrap();
        let e = SegmentLog::open(dir.path()).err().expect("refused");
        let msg = e.to_string();
        assert!(msg.contains("00000000000000000001.seg"), "{msg}");
        assert!(msg.contains("meshsignd restore"), "{msg}");
    }

    #[test]
    fn a_start_reads_the_open_segment_through_its_window_across_records_of_any_size() {
        // Records that straddle the scan window's edges, one longer than the window itself,
        // then a torn last record past the first window: the start finds every whole record
        // and cuts the torn one off, as a read of the whole file did.
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let size = |seq: u64| match seq % 5 {
            0 => SCAN_WINDOW + SCAN_WINDOW / 2,
            1 => 300_000 + seq as usize,
            _ => 17 + seq as usize,
        };
        let big = |seq: u64| vec![(seq % 251) as u8; size(seq)];
        for seq in 1..=12 {
            log.put(&k(seq), &big(seq)).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.last().unwrap().unwrap().0, k(12).to_vec());
        for (i, (key, v)) in log.range(0, usize::MAX).unwrap().iter().enumerate() {
            let seq = i as u64 + 1;
            assert_eq!((key, v.len()), (&k(seq).to_vec(), size(seq)));
            assert_eq!(v, &big(seq));
        }
        drop(log);
        let seg = segment_path(dir.path(), 1);
        let whole = std::fs::read(&seg).unwrap();
        assert!(whole.len() > 3 * SCAN_WINDOW);
        std::fs::write(&seg, &whole[..whole.len() - 3]).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.last().unwrap().unwrap().0, k(11).to_vec());
        drop(log);
        // A flipped byte inside the long record in the middle: refused, naming its offset.
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x5a;
        std::fs::write(&seg, &bytes).unwrap();
        let msg = SegmentLog::open(dir.path())
            .err()
            .expect("refused")
            .to_string();
        assert!(msg.contains("00000000000000000001.seg"), "{msg}");
        assert!(msg.contains("checksum"), "{msg}");
    }

    #[test]
    fn a_damaged_sealed_segment_is_found_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        for seq in 1..=30 {
            log.put(&k(seq), &value(seq)).unwrap();
            if seq == 15 {
                log.lock().unwrap().seal(dir.path()).unwrap();
            }
        }
        drop(log);
        let seg = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x5a;
        std::fs::write(&seg, &bytes).unwrap();
        let log = SegmentLog::open(dir.path()).expect("a sealed segment is not read at open");
        let e = log.range(0, 100).expect_err("found when read");
        assert!(e.to_string().contains("Read corrupted data in"), "{e}");
        // The keys-only read checks every record as the full read does.
        let e = log
            .seqs(0, 100, &mut Vec::new())
            .expect_err("found by the read-through too");
        assert!(e.to_string().contains("Read corrupted data in"), "{e}");
        assert_eq!(log.seqs(16, 100, &mut Vec::new()).unwrap().len(), 15);
        assert_eq!(log.get(&k(20)).unwrap(), Some(value(20)));
    }
}
