//! `meshsignd recover`: what a damaged data folder still holds, and — only when an operator
//! says so with `--accept-loss-after SEQ` — a restart of the audit chain after SEQ with an
//! entry that records the loss. Runs offline (the site stopped); never creates keys.
//!
//! Owns: the inspection report and the accepted-loss procedure. Must not touch: a running site.

use std::fmt;
use std::path::{Path, PathBuf};

use meshsign_evidence::audit::{AuditRecord, genesis};

use super::marker::{self, SiteMarker};
use crate::audit::journal::{self, JOURNAL_FILE, JournalError};
use crate::audit::{AuditError, append_direct, loss_record};
use crate::clock::SharedClock;
use crate::store::{Store, StoreError, Tree};

/// Why recovery could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log could not be written.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A file could not be read or moved.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// What the operator asked cannot be done without losing more, or at all.
    #[error("{0}")]
    Refused(String),
}

/// What the journal holds, checked against itself.
#[derive(Debug)]
pub enum JournalState {
    /// No file.
    Missing,
    /// Every complete line is intact.
    Intact {
        /// Entries (seq range) it holds.
        entries: Vec<AuditRecord>,
        /// A torn last piece follows.
        torn: bool,
    },
    /// Intact up to a bad line.
    Damaged {
        /// The intact entries before it.
        entries: Vec<AuditRecord>,
        /// The first bad line's error.
        error: String,
    },
}

/// What a data folder holds.
#[derive(Debug)]
pub struct Report {
    /// The folder.
    pub data_dir: PathBuf,
    /// The marker, or why it cannot be read.
    pub marker: Result<Option<SiteMarker>, String>,
    /// The store's site id and audit head (seq, hash), or why it cannot be opened.
    pub store: Result<(Option<String>, u64, String), String>,
    /// The journal.
    pub journal: JournalState,
    /// What a start would do: `Ok` it starts as it is, `Err` why it refuses
    /// ([`super::preflight`], the start's own checks).
    pub start: Result<(), String>,
    /// Whether the KEK was checked (recover was given the KEK file).
    pub kek_checked: bool,
}

impl Report {
    /// Whether `meshsignd` would start on this folder as it is.
    pub fn intact(&self) -> bool {
        self.start.is_ok()
    }

    /// Whether the marker and the store name the same site (then the audit log can be
    /// repaired here; otherwise only a snapshot brings the site back).
    fn same_site(&self) -> bool {
        matches!(&self.store, Ok((Some(id), _, _)) if matches!(&self.marker, Ok(Some(m)) if m.site_id == *id))
    }

    /// The last seq the store and the intact part of the journal hold together.
    pub fn last_intact_seq(&self) -> Option<u64> {
        let (_, head, head_hash) = self.store.as_ref().ok()?;
        let entries = match &self.journal {
            JournalState::Intact { entries, .. } | JournalState::Damaged { entries, .. } => entries,
            JournalState::Missing => return Some(*head),
        };
        let (mut last, mut hash) = (*head, head_hash.clone());
        for e in entries {
            if e.seq <= *head {
                continue;
            }
            if e.seq != last + 1 || e.prev_hash != hash {
                break;
            }
            (last, hash) = (e.seq, e.hash.clone());
        }
        Some(last)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data folder {}", self.data_dir.display())?;
        match &self.marker {
            Ok(Some(m)) => writeln!(
                f,
                "  marker: site {} (region {}, created {})",
                m.site_id, m.region, m.created_at
            )?,
            Ok(None) => writeln!(
                f,
                "  marker: none (no site was created here, or it predates markers)"
            )?,
            Err(e) => writeln!(f, "  marker: {e}")?,
        }
        match &self.store {
            Ok((id, head, _)) => writeln!(
                f,
                "  store: opens; site id {}; audit log through seq {head}",
                id.as_deref().unwrap_or("(none: empty or lost)")
            )?,
            Err(e) => writeln!(f, "  store: {e}")?,
        }
        match &self.journal {
            JournalState::Missing => writeln!(f, "  journal: missing")?,
            JournalState::Intact { entries, torn } => writeln!(
                f,
                "  journal: {} intact entr{}{}{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" },
                range(entries),
                if *torn {
                    "; a torn last line follows"
                } else {
                    ""
                }
            )?,
            JournalState::Damaged { entries, error } => writeln!(
                f,
                "  journal: {} intact entr{}{}, then: {error}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" },
                range(entries)
            )?,
        }
        if let Err(why) = &self.start {
            writeln!(f, "  start: meshsignd refuses to start here: {why}")?;
        }
        match self.last_intact_seq() {
            Some(seq) if self.intact() => writeln!(
                f,
                "  verdict: intact through seq {seq}; meshsignd starts on it as it is{}",
                if self.kek_checked {
                    ""
                } else {
                    " (the KEK was not checked: pass --kek-file to check it too)"
                }
            ),
            Some(seq) if self.same_site() => writeln!(
                f,
                "  verdict: the audit log is intact through seq {seq}; to restart the chain after \
                 it, accepting the loss of what follows, run: meshsignd recover --data-dir {} \
                 --accept-loss-after {seq}",
                self.data_dir.display()
            ),
            _ => writeln!(
                f,
                "  verdict: the store does not hold this folder's site (see above): its keys and \
                 runner CAs cannot be recovered here; restore a snapshot (meshsignd restore)"
            ),
        }
    }
}

fn range(entries: &[AuditRecord]) -> String {
    match (entries.first(), entries.last()) {
        (Some(a), Some(b)) => format!(" (seq {}..={})", a.seq, b.seq),
        _ => String::new(),
    }
}

fn head(store: &Store) -> Result<(u64, String), StoreError> {
    Ok(match store.kv().last(Tree::Audit)? {
        Some((_, v)) => match serde_json::from_slice::<AuditRecord>(&v) {
            Ok(r) => (r.seq, r.hash),
            Err(source) => {
                return Err(StoreError::Corrupt {
                    tree: Tree::Audit.name(),
                    source,
                });
            }
        },
        None => (0, genesis()),
    })
}

fn read_journal(path: &Path) -> Result<JournalState, RecoverError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(JournalState::Missing),
        Err(source) => {
            return Err(RecoverError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    match journal::parse(path, &text) {
        Ok(r) => Ok(JournalState::Intact {
            entries: r.entries.into_iter().map(|(e, _)| e).collect(),
            torn: r.torn,
        }),
        Err(e @ JournalError::Corrupt { line, .. }) => {
            // The intact entries are the complete lines before the bad one.
            let upto: Vec<u8> = text
                .split(|b| *b == b'\n')
                .take(line.saturating_sub(1))
                .flat_map(|l| l.iter().copied().chain(std::iter::once(b'\n')))
                .collect();
            let entries = journal::parse(path, &upto)
                .map(|r| r.entries.into_iter().map(|(e, _)| e).collect())
                .unwrap_or_default();
            Ok(JournalState::Damaged {
                entries,
                error: e.to_string(),
            })
        }
        Err(e) => Ok(JournalState::Damaged {
            entries: Vec::new(),
            error: e.to_string(),
        }),
    }
}

/// Inspects a data folder (the site stopped). With `kek` (the KEK and its file) the KEK is
/// checked too, as a start does.
pub fn inspect(
    data_dir: &Path,
    kek: Option<(&crate::custody::Kek, &Path)>,
    open: impl FnOnce() -> Result<Store, StoreError>,
) -> Result<(Report, Option<Store>), RecoverError> {
    let marker = SiteMarker::read(data_dir).map_err(|e| e.to_string());
    let (store_state, store) = match open() {
        Ok(store) => {
            let state = (|| -> Result<_, String> {
                let id = marker::store_site_id(&store).map_err(|e| e.to_string())?;
                // The start reads the whole log; so does the report.
                if store.kv().chain().is_none() {
                    crate::audit::check_readable(&store, data_dir).map_err(|e| e.to_string())?;
                }
                let (seq, hash) = head(&store).map_err(|e| e.to_string())?;
                Ok((id, seq, hash))
            })();
            (state, Some(store))
        }
        Err(e) => (Err(e.to_string()), None),
    };
    let journal_path = data_dir.join(JOURNAL_FILE);
    let mut journal = read_journal(&journal_path)?;
    // The start's own check: a store that ends after the journal means journal lines were cut.
    if let (JournalState::Intact { entries, .. }, Ok((_, store_head, _))) = (&journal, &store_state)
        && let Ok(text) = std::fs::read(&journal_path)
        && let Ok(recovered) = journal::parse(&journal_path, &text)
        && let Some(store) = &store
        && let Err(e) = journal::check_against_store(
            &journal_path,
            &recovered,
            *store_head,
            crate::audit::store_durable_through(store)?,
        )
    {
        journal = JournalState::Damaged {
            entries: entries.clone(),
            error: e.to_string(),
        };
    }
    let start = match &store {
        Some(store) => super::preflight(data_dir, kek, store, true).map_err(|e| e.to_string()),
        None => Err(store_state
            .as_ref()
            .err()
            .cloned()
            .unwrap_or_else(|| "the store cannot be opened".into())),
    };
    Ok((
        Report {
            data_dir: data_dir.to_path_buf(),
            marker,
            store: store_state,
            journal,
            start,
            kek_checked: kek.is_some(),
        },
        store,
    ))
}

/// Keeps the audit log through `seq` (the store's entries and the journal's intact ones up to
/// it), records the loss of what followed in a new entry at `seq + 1`, moves the old journal
/// aside (kept as evidence) and starts a fresh one. Returns where the old journal went.
pub fn accept_loss_after(
    report: &Report,
    store: &Store,
    seq: u64,
    clock: &SharedClock,
) -> Result<Option<PathBuf>, RecoverError> {
    let marker = match &report.marker {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(RecoverError::Refused(
                "no site marker: nothing to recover".into(),
            ));
        }
        Err(e) => return Err(RecoverError::Refused(e.clone())),
    };
    let (store_id, store_head, _) = report
        .store
        .as_ref()
        .map_err(|e| RecoverError::Refused(e.clone()))?;
    if store_id.as_deref() != Some(marker.site_id.as_str()) {
        return Err(RecoverError::Refused(format!(
            "the store does not hold site {} (its keys and runner CAs are gone with it): \
             accepting audit loss cannot bring them back; restore a snapshot (meshsignd restore)",
            marker.site_id
        )));
    }
    let last = report.last_intact_seq().unwrap_or(*store_head);
    if seq < *store_head || seq > last {
        return Err(RecoverError::Refused(format!(
            "--accept-loss-after {seq}: choose a seq from {store_head} (what the store holds) to \
             {last} (the last intact entry)"
        )));
    }
    let entries = match &report.journal {
        JournalState::Intact { entries, .. } | JournalState::Damaged { entries, .. } => {
            entries.clone()
        }
        JournalState::Missing => Vec::new(),
    };
    let mut hash = head(store)?.1;
    for e in entries
        .iter()
        .filter(|e| e.seq > *store_head && e.seq <= seq)
    {
        let bytes = serde_json::to_vec(e).map_err(|source| StoreError::Corrupt {
            tree: Tree::Audit.name(),
            source,
        })?;
        store.kv().put(Tree::Audit, &e.seq.to_be_bytes(), &bytes)?;
        hash = e.hash.clone();
    }
    let lost = match &report.journal {
        JournalState::Missing => "the audit journal was missing".to_string(),
        JournalState::Intact { torn: true, .. } => "the journal's torn last line".to_string(),
        JournalState::Intact { .. } => "nothing the journal held".to_string(),
        JournalState::Damaged { error, .. } => {
            format!("the journal from its first bad line ({error})")
        }
    };
    let detail = format!(
        "meshsignd recover --accept-loss-after {seq}: the log is kept through seq {seq}; lost: \
         {lost}; any receipt for seq {} or later names an entry that is gone",
        seq + 1
    );
    let region = marker.region.clone();
    let (loss_seq, loss_hash) =
        append_direct(store, &region, clock, &hash, loss_record(seq + 1, &detail))?;
    store.flush()?;
    let journal_path = report.data_dir.join(JOURNAL_FILE);
    let moved = if journal_path.exists() {
        let to = report
            .data_dir
            .join(format!("{JOURNAL_FILE}.damaged-{}", clock.unix()));
        std::fs::rename(&journal_path, &to).map_err(|source| RecoverError::Io {
            path: journal_path.clone(),
            source,
        })?;
        Some(to)
    } else {
        None
    };
    let header =
        format!("{{\"journal\":1,\"after_seq\":{loss_seq},\"after_hash\":\"{loss_hash}\"}}\n");
    meshsign_evidence::files::write_atomic(&journal_path, header.as_bytes(), false).map_err(
        |source| RecoverError::Io {
            path: journal_path.clone(),
            source,
        },
    )?;
    Ok(moved)
}
