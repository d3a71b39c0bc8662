//! The audit journal: an append-only file that makes audit entries durable without a flush of
//! the whole store.
//!
//! Owns: the journal file. Must not touch: the chain or the store (the writer does both).
//!
//! A sled flush goes through sled's I/O thread pool, which wakes every idle pool thread in
//! turn; measured with `meshsign-bench`, that was about a fifth of the site's CPU time per
//! Sign. A Sign changes nothing in the store but its audit entry, so the writer makes those
//! entries durable here instead: one `write` and one `fdatasync` per group commit, on the writer's
//! own thread. The entries also go into the store (unflushed) as before, so reads, exports and
//! verification see one log. The store is flushed — and the journal emptied — whenever a batch
//! holds an entry whose request changed other state (enrollment, ops), when a checkpoint is
//! written, and when the journal passes [`Journal::MAX_BYTES`].
//!
//! **Recovery.** At start, every complete entry in the journal whose hash matches its content is
//! written back into the store (a crash may have lost the store's unflushed tail), the store is
//! flushed, and the journal emptied. A torn last line — a write the crash cut short — was never
//! acknowledged (the `fdatasync` had not returned) and is dropped.
//!
//! Format: one JSON audit entry per line, exactly the bytes stored under its seq.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use meshsign_proto::audit::AuditRecord;

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
}

fn io_err(path: &Path, e: std::io::Error) -> AuditError {
    AuditError::Journal {
        path: path.to_path_buf(),
        source: std::sync::Arc::new(e),
    }
}

impl Journal {
    /// Past this size the writer flushes the store and empties the journal.
    pub const MAX_BYTES: u64 = 8 << 20;

    /// Opens (or creates) the journal and returns the complete, intact entries it holds, in
    /// file order.
    pub fn open(path: &Path) -> Result<(Self, Vec<JournalEntry>), AuditError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(|e| io_err(path, e))?;
        let mut entries = Vec::new();
        let mut lines = text.split(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let complete = lines.peek().is_some(); // the piece after the last '\n' is torn
            if !complete || line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<AuditRecord>(line) {
                Ok(rec) if rec.hash == rec.compute_hash() => entries.push((rec, line.to_vec())),
                _ => {
                    tracing::warn!(file = %path.display(), "audit journal: unreadable entry; later lines ignored");
                    break;
                }
            }
        }
        let len = text.len() as u64;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                len,
            },
            entries,
        ))
    }

    /// Appends encoded entries (one per line) and waits until they are on disk.
    pub fn append(&mut self, entries: &[Vec<u8>]) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(entries.iter().map(|e| e.len() + 1).sum());
        for e in entries {
            buf.extend_from_slice(e);
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the journal (call only once the store holds every entry durably).
    pub fn clear(&mut self) -> Result<(), AuditError> {
        if self.len == 0 {
            return Ok(());
        }
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.len = 0;
        Ok(())
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the journal holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
