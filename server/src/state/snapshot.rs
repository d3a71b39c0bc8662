//! Backup and restore of a site: every tree of the store, at one point of the audit log, as
//! JSON lines. Keys stay wrapped under the KEK (the snapshot holds the same ciphertext the store
//! does), so a snapshot is as sensitive as the data folder, no more.
//!
//! Format: a header line `{"snapshot":1,"site_id",...,"audit_seq","audit_hash","marker":{…}}`,
//! then one line per record `{"tree":"keys","key":"<hex>","value":"<base64>"}`.
//!
//! Owns: the format, taking a snapshot (on the audit writer, between commits) and restoring one
//! into an empty data folder. Must not touch: a running site's folder (restore refuses a
//! folder that holds a site).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::SiteState;
use super::marker::{SiteMarker, store_is_empty};
use crate::audit::journal::JOURNAL_FILE;
use crate::audit::{AuditError, AuditRecord, append_direct};
use crate::clock::SharedClock;
use crate::custody::Kek;
use crate::store::{Store, StoreError, Tree};

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The marker could not be read, written or checked.
    #[error(transparent)]
    Marker(#[from] super::marker::MarkerError),
    /// A line did not encode.
    #[error("snapshot encoding: {0}")]
    Encode(#[source] serde_json::Error),
    /// The site's state is in PostgreSQL, shared by replicas: a snapshot taken by one replica
    /// would not be consistent while the others write; the database has its own backups.
    #[error(
        "this site's state is in PostgreSQL, shared by its replicas: back it up with the \
         database's tools (pg_dump, or point-in-time recovery), not with a snapshot of one replica"
    )]
    SharedStore,
    /// The site has no marker (it predates markers and was never started since).
    #[error("the site has no marker yet; start it once, then take the snapshot")]
    NoMarker,
    /// The snapshot file is not a snapshot, or is damaged.
    #[error("snapshot line {line}: {message}")]
    Format {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The target folder already holds a site.
    #[error(
        "{0} already holds a site (or a store); restore into an empty data folder — move the \
             old one aside first"
    )]
    NotEmpty(PathBuf),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    snapshot: u32,
    site_id: String,
    taken_at: i64,
    audit_seq: u64,
    audit_hash: String,
    marker: SiteMarker,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    tree: String,
    key: String,
    value: String,
}

/// What a restore put in place.
#[derive(Debug)]
pub struct Restored {
    /// The site.
    pub site_id: String,
    /// Records written.
    pub records: usize,
    /// The audit log's last seq in the snapshot.
    pub audit_seq: u64,
    /// The seq of the entry that records the restore.
    pub restore_seq: u64,
}

impl SiteState {
    /// A consistent snapshot, taken on the audit writer between commits. Call it under the ops
    /// lock (an `ops::audited` write), so no ops change runs meanwhile.
    pub async fn snapshot(&self) -> Result<(Vec<u8>, u64), SnapshotError> {
        if self.store.kv().chain().is_some() {
            return Err(SnapshotError::SharedStore);
        }
        let marker = self
            .marker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(SnapshotError::NoMarker)?;
        let taken_at = self.clock.unix();
        self.audit
            .exclusive(move |store, seq, hash| encode(store, marker, taken_at, seq, hash))
            .await?
    }
}

fn encode(
    store: &Store,
    marker: SiteMarker,
    taken_at: i64,
    seq: u64,
    hash: &str,
) -> Result<(Vec<u8>, u64), SnapshotError> {
    let header = Header {
        snapshot: 1,
        site_id: marker.site_id.clone(),
        taken_at,
        audit_seq: seq,
        audit_hash: hash.to_string(),
        marker,
    };
    let mut out = serde_json::to_vec(&header).map_err(SnapshotError::Encode)?;
    out.push(b'\n');
    let b64 = base64::engine::general_purpose::STANDARD;
    for tree in Tree::ALL {
        for (k, v) in store.kv().scan_prefix(tree, b"")? {
            // The audit log is taken through the head the writer knows, nothing after it.
            if tree == Tree::Audit && k.as_slice() > seq.to_be_bytes().as_slice() {
                continue;
            }
            let line = Line {
                tree: tree.name().to_string(),
                key: hex::encode(&k),
                value: b64.encode(&v),
            };
            out.extend_from_slice(&serde_json::to_vec(&line).map_err(SnapshotError::Encode)?);
            out.push(b'\n');
        }
    }
    Ok((out, seq))
}

/// Restores `snapshot` into `data_dir`, which must hold no site. The KEK must be the site's
/// (checked against the snapshot's marker). The audit chain continues: an entry recording the
/// restore follows the snapshot's last entry.
pub fn restore(
    data_dir: &Path,
    kek: &Kek,
    kek_file: &Path,
    store: &Store,
    snapshot: &[u8],
    clock: &SharedClock,
) -> Result<Restored, SnapshotError> {
    if SiteMarker::read(data_dir)?.is_some() || !store_is_empty(store)? {
        return Err(SnapshotError::NotEmpty(data_dir.to_path_buf()));
    }
    let bad = |line: usize, message: String| SnapshotError::Format { line, message };
    let mut lines = snapshot.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let header: Header =
        serde_json::from_slice(lines.next().ok_or_else(|| bad(1, "empty".into()))?)
            .map_err(|e| bad(1, format!("not a meshsign snapshot header: {e}")))?;
    header.marker.check_kek(kek, kek_file, data_dir)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut records = 0;
    for (i, raw) in lines.enumerate() {
        let n = i + 2;
        let l: Line = serde_json::from_slice(raw).map_err(|e| bad(n, e.to_string()))?;
        let tree =
            Tree::from_name(&l.tree).ok_or_else(|| bad(n, format!("unknown tree {}", l.tree)))?;
        let key = hex::decode(&l.key).map_err(|e| bad(n, e.to_string()))?;
        let value = b64.decode(&l.value).map_err(|e| bad(n, e.to_string()))?;
        store.kv().put(tree, &key, &value)?;
        records += 1;
    }
    // The log must end where the header says, with that hash.
    let last: Option<AuditRecord> = match store.kv().last(Tree::Audit)? {
        Some((_, v)) => serde_json::from_slice(&v).ok(),
        None => None,
    };
    if last.as_ref().map(|r| (r.seq, r.hash.as_str()))
        != Some((header.audit_seq, header.audit_hash.as_str()))
    {
        return Err(bad(
            0,
            "the audit log does not end where the header says".into(),
        ));
    }
    let rec = AuditRecord {
        seq: header.audit_seq + 1,
        rpc: "Restore".into(),
        decision: "allow".into(),
        reason: "ok".into(),
        environment: "(site)".into(),
        detail: format!(
            "restored from a snapshot of site {} taken at {} (audit log through seq {})",
            header.site_id, header.taken_at, header.audit_seq
        ),
        ..Default::default()
    };
    let (restore_seq, restore_hash) =
        append_direct(store, &header.marker.region, clock, &header.audit_hash, rec)?;
    store.flush()?;
    let journal = data_dir.join(JOURNAL_FILE);
    let head = format!(
        "{{\"journal\":1,\"after_seq\":{restore_seq},\"after_hash\":\"{restore_hash}\"}}\n"
    );
    meshsign_proto::files::write_atomic(&journal, head.as_bytes(), false).map_err(|source| {
        SnapshotError::Io {
            path: journal.clone(),
            source,
        }
    })?;
    header.marker.write(data_dir)?;
    Ok(Restored {
        site_id: header.site_id,
        records,
        audit_seq: header.audit_seq,
        restore_seq,
    })
}
