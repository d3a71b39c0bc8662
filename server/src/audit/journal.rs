//! The audit journal: an append-only file that makes audit entries durable without a flush of
//! the whole store.
//!
//! Owns: the journal file. Must not touch: the chain or the store (the writer does both).
//!
//! A sled flush goes through sled's I/O thread pool, which wakes every idle pool thread in
//! turn; measured with `meshsign-bench`, that was about a fifth of the site's CPU time per
//! Sign. A Sign changes nothing in the store but its audit entry, so the writer makes those
//! entries durable here instead: one `write` and one `fdatasync` per group commit, on the writer's
//! own thread. The entries then go into the store (unflushed), so reads, exports and
//! verification see one log — after the journal, so the store never holds an entry the journal
//! did not make durable (a batch that fails is taken back out of both). The store is flushed —
//! and the journal emptied — whenever a batch holds an entry whose request changed other state
//! (enrollment, ops), at an idle checkpoint (start, `checkpoint_seconds` without entries), and
//! when the journal passes [`Journal::MAX_BYTES`]. A checkpoint that falls due under load
//! (`checkpoint_every`) is an entry like the others: journaled, not a flush.
//!
//! **Recovery.** At start every complete line must be an entry whose hash matches its content
//! and whose seq and `prev_hash` continue the line before it (or the header); the first line
//! that does not refuses the start, naming its line and seq ([`JournalError`]) — `meshsignd
//! recover` decides what to accept. Intact entries are written back into the store (a crash may
//! have lost the store's unflushed tail), the store is flushed, and only then is the journal
//! emptied. A torn last piece (no newline) is a write that a crash cut short — or an acknowledged
//! line cut by damage: the two cannot be told apart, so its seq is never reused: the writer
//! records a loss entry in its place (see `AuditLog::open`).
//!
//! Format: an optional header line `{"journal":1,"after_seq":N,"after_hash":H}` — written each
//! time the journal is emptied, saying the store held every entry through N durably — then one
//! JSON audit entry per line, exactly the bytes stored under its seq. A site created with a
//! journal always has the file: a missing journal refuses the start.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use meshsign_evidence::audit::AuditRecord;

use super::AuditError;

/// An entry read back from the journal, with its exact bytes.
pub type JournalEntry = (AuditRecord, Vec<u8>);

/// The journal's file name in the data folder (beside the store's files).
pub const JOURNAL_FILE: &str = "audit.journal";

/// The append-only journal file.
pub struct Journal {
    file: File,
    path: PathBuf,
    len: u64,
    /// Entries appended since the last clear (this process).
    entries: usize,
}

fn io_err(path: &Path, e: std::io::Error) -> AuditError {
    AuditError::Journal {
        path: path.to_path_buf(),
        source: std::sync::Arc::new(e),
    }
}

/// Why a journal cannot be used as it is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The site was created with a journal and it is gone.
    #[error(
        "audit journal {path} is missing: acknowledged audit entries may be lost with it; \
             run `meshsignd recover --data-dir {dir}` to see what is intact"
    )]
    Missing {
        /// The journal file.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
    },
    /// A complete line is not the entry that must come next.
    #[error(
        "audit journal {path}: line {line} (seq {seq}) {what}; acknowledged entries from seq \
             {seq} on cannot be trusted; run `meshsignd recover --data-dir {dir}`"
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The seq that line should hold.
        seq: u64,
        /// What is wrong.
        what: String,
    },
    /// The store's audit log ends before what it held durably when the journal was emptied.
    #[error(
        "audit journal {path} says the store held every entry through seq {seq} durably, but \
             the store's audit log now ends at seq {store_head}: the store lost acknowledged \
             entries; run `meshsignd recover --data-dir {dir}`"
    )]
    StoreBehind {
        /// The journal file.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
        /// What the header says.
        seq: u64,
        /// Where the store's log ends.
        store_head: u64,
    },
    /// The store holds entries past the journal's end: the journal only ever runs ahead of
    /// the store (an entry is journaled before it is stored), so lines were cut from it.
    #[error(
        "audit journal {path} ends at seq {journal_end} but the store holds entries through seq \
             {store_head}: the journal was cut or emptied (its lines for seq {} to {store_head}, \
             and any acknowledged entry after them, are gone); run `meshsignd recover --data-dir \
             {dir}`", journal_end + 1
    )]
    Short {
        /// The journal file.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
        /// The last seq the journal accounts for (its header or its last entry; 0 when empty).
        journal_end: u64,
        /// Where the store's log ends.
        store_head: u64,
    },
    /// The journal and the store disagree about an entry.
    #[error("audit journal {path}: seq {seq} {what}; run `meshsignd recover --data-dir {dir}`")]
    Conflict {
        /// The journal file.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
        /// The seq.
        seq: u64,
        /// What is wrong.
        what: String,
    },
}

impl JournalError {
    /// The store lost entries the journal says it held durably.
    pub fn store_behind(path: &Path, seq: u64, store_head: u64) -> Self {
        JournalError::StoreBehind {
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            seq,
            store_head,
        }
    }

    /// The journal and the store disagree about an entry.
    pub fn conflict(path: &Path, seq: u64, what: String) -> Self {
        JournalError::Conflict {
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            seq,
            what,
        }
    }
}

/// Checks that the journal accounts for everything the store holds: an entry is journaled
/// (or covered by the header's `after_seq`) before it reaches the store — or, for a batch made
/// durable by a store flush, the store itself records so (`store_durable`, flushed with the
/// batch, before the journal is emptied). A store that ends after both means journal lines were
/// removed: acknowledged entries that neither may hold any more. The start and `meshsignd
/// recover` both decide with this.
pub fn check_against_store(
    path: &Path,
    recovered: &Recovered,
    store_head: u64,
    store_durable: u64,
) -> Result<(), JournalError> {
    let journal_end = recovered
        .entries
        .last()
        .map(|(r, _)| r.seq)
        .or(recovered.base.as_ref().map(|(seq, _)| *seq))
        .unwrap_or(0);
    // A torn last piece is the start of the next entry: the store may hold that one whole.
    if store_head > (journal_end + u64::from(recovered.torn)).max(store_durable) {
        return Err(JournalError::Short {
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            journal_end,
            store_head,
        });
    }
    Ok(())
}

/// The header line written when the journal is emptied.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    journal: u32,
    after_seq: u64,
    after_hash: String,
}

/// What a journal held at open.
#[derive(Debug, Default)]
pub struct Recovered {
    /// From the header: the store held every entry through this seq (and its hash) durably.
    pub base: Option<(u64, String)>,
    /// The intact entries, chained, in order.
    pub entries: Vec<JournalEntry>,
    /// A torn last piece followed the entries.
    pub torn: bool,
    /// The 1-based line number of the torn piece (for messages).
    pub torn_line: usize,
}

/// A last piece without its newline that is nonetheless a whole entry continuing `prev` (with
/// or without one stray trailing byte where the newline was): its bytes as stored.
fn complete_entry(piece: &[u8], prev: Option<(u64, &String)>) -> Option<JournalEntry> {
    let candidates = [Some(piece), piece.split_last().map(|(_, rest)| rest)];
    candidates.into_iter().flatten().find_map(|bytes| {
        let rec: AuditRecord = serde_json::from_slice(bytes).ok()?;
        let continues = match prev {
            Some((seq, hash)) => rec.seq == seq + 1 && rec.prev_hash == *hash,
            None => true,
        };
        (rec.hash == rec.compute_hash() && continues).then(|| (rec, bytes.to_vec()))
    })
}

/// Reads and checks journal text (see the module docs); `path` is for messages.
pub fn parse(path: &Path, text: &[u8]) -> Result<Recovered, JournalError> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = Recovered::default();
    let pieces: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let last = pieces.len().saturating_sub(1);
    for (i, line) in pieces.iter().enumerate() {
        let n = i + 1;
        if i == last {
            // The piece after the last newline: empty, a torn write — or a complete entry
            // whose newline was lost or altered, which is kept: its own hash proves it whole.
            if !line.is_empty() {
                match complete_entry(
                    line,
                    out.entries
                        .last()
                        .map(|(r, _)| (r.seq, &r.hash))
                        .or(out.base.as_ref().map(|(s, h)| (*s, h))),
                ) {
                    Some(entry) => out.entries.push(entry),
                    None => {
                        out.torn = true;
                        out.torn_line = n;
                    }
                }
            }
            break;
        }
        if i == 0
            && let Ok(h) = serde_json::from_slice::<Header>(line)
        {
            out.base = Some((h.after_seq, h.after_hash));
            continue;
        }
        let prev = out
            .entries
            .last()
            .map(|(r, _)| (r.seq, r.hash.clone()))
            .or_else(|| out.base.clone());
        let expected = prev.as_ref().map_or(0, |(s, _)| s + 1);
        let corrupt = |what: &str| JournalError::Corrupt {
            path: path.to_path_buf(),
            dir: dir.clone(),
            line: n,
            seq: expected,
            what: what.to_string(),
        };
        let rec: AuditRecord =
            serde_json::from_slice(line).map_err(|_| corrupt("is not an audit entry"))?;
        if rec.hash != rec.compute_hash() {
            return Err(corrupt("does not match its own hash"));
        }
        if let Some((pseq, phash)) = prev {
            if rec.seq != pseq + 1 {
                return Err(corrupt(&format!("holds seq {}", rec.seq)));
            }
            if rec.prev_hash != phash {
                return Err(corrupt("does not continue the chain"));
            }
        }
        out.entries.push((rec, line.to_vec()));
    }
    Ok(out)
}

impl Journal {
    /// Past this size the writer flushes the store and empties the journal.
    pub const MAX_BYTES: u64 = 8 << 20;

    /// Opens the journal and returns what it holds, checked. With `must_exist`, a missing file
    /// is refused; otherwise it is created.
    pub fn open(path: &Path, must_exist: bool) -> Result<(Self, Recovered), AuditError> {
        if must_exist && !path.exists() {
            return Err(AuditError::JournalState(JournalError::Missing {
                path: path.to_path_buf(),
                dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            }));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(|e| io_err(path, e))?;
        let recovered = parse(path, &text).map_err(AuditError::JournalState)?;
        let len = text.len() as u64;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                len,
                entries: recovered.entries.len(),
            },
            recovered,
        ))
    }

    /// Appends encoded entries (one per line) and waits until they are on disk.
    pub fn append<'a, I>(&mut self, entries: I) -> Result<(), AuditError>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        let entries = entries.into_iter();
        let (count, size) = entries
            .clone()
            .fold((0usize, 0usize), |(n, len), e| (n + 1, len + e.len() + 1));
        if count == 0 {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(size);
        for e in entries {
            buf.extend_from_slice(e);
            buf.push(b'\n');
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            // A partial write (a full disk) must not stay in front of later lines: cut the
            // file back to what it held (freeing space, so this works on a full disk too).
            let _ = self.file.set_len(self.len);
            return Err(io_err(&self.path, e));
        }
        self.len += buf.len() as u64;
        self.entries += count;
        Ok(())
    }

    /// Where the journal ends now, for [`Journal::rewind`].
    pub fn mark(&self) -> (u64, usize) {
        (self.len, self.entries)
    }

    /// Cuts the journal back to `mark` (entries appended after it were not acknowledged).
    pub fn rewind(&mut self, mark: (u64, usize)) -> Result<(), AuditError> {
        self.file
            .set_len(mark.0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        (self.len, self.entries) = mark;
        Ok(())
    }

    /// Empties the journal (call only once the store holds every entry through `seq`
    /// durably), leaving a header that says so.
    pub fn clear(&mut self, seq: u64, hash: &str) -> Result<(), AuditError> {
        let mut header = serde_json::to_vec(&Header {
            journal: 1,
            after_seq: seq,
            after_hash: hash.to_string(),
        })
        .map_err(AuditError::entry("journal header"))?;
        header.push(b'\n');
        // A new file renamed over the old one: a crash leaves the old journal or the new
        // header, never an empty file (which the start would take for a cut journal).
        meshsign_evidence::files::write_atomic(&self.path, &header, false)
            .map_err(|e| io_err(&self.path, e))?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| io_err(&self.path, e))?;
        self.len = header.len() as u64;
        self.entries = 0;
        Ok(())
    }

    /// Re-reads the file (after the store was reopened): what it holds, checked.
    pub fn reread(&self) -> Result<Recovered, AuditError> {
        let text = std::fs::read(&self.path).map_err(|e| io_err(&self.path, e))?;
        parse(&self.path, &text).map_err(AuditError::JournalState)
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the journal holds no entry (a header at most).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}
