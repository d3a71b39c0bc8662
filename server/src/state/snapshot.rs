//! Backup and restore of a site: every tree of the store, at one point of the audit log, as
//! JSON lines. Keys stay wrapped under the KEK (the snapshot holds the same ciphertext the store
//! does), so a snapshot is as sensitive as the data folder, no more. **In clear** it holds
//! everything else the store does: trust policies and pinned JWKS, key records' public keys
//! and certificates, issuance records (job claims, fingerprints), revocation rules, proposals,
//! usage counts, spent jtis and the whole audit log.
//!
//! Format: a header line `{"snapshot":3,"site_id",...,"audit_seq","audit_hash","marker":{…}}`,
//! then one line per record `{"tree":"keys","key":"<hex>","value":"<base64>"}`, then a trailer
//! written last `{"end":1,"records":N,"trees":{"<tree>":n,…},"sha256":"<hex>","mac":"<hex>"}`
//! (every tree named, even empty ones; the hash covers every record line with its newline).
//!
//! **A snapshot is authenticated.** `mac` is HMAC-SHA256, under a key derived from the KEK
//! ([`Kek::mac_key`], label `snapshot`), of every byte before the trailer (header and records).
//! Whoever edits a snapshot offline — a JWKS of their own in a production policy, a revocation
//! removed — cannot make the MAC without the KEK, and restore refuses it. Version-2 snapshots
//! (no MAC) are refused.
//!
//! **A restore is all or nothing.** The whole snapshot is checked first (header, every line,
//! the trailer's counts and hash, the audit log ending where the header says); it is then
//! written into a temporary folder beside the target (store, restore entry, journal header,
//! marker last), and only that complete folder is renamed into place. A snapshot cut anywhere,
//! or a failure on the way, leaves the target as it was. Version-1 snapshots (no trailer) are
//! refused: a cut copy of one cannot be told from a whole one.
//!
//! **Taking one holds the audit writer only for the site's state.** On the writer, between
//! commits, the header (the head seq and hash) and every tree but the log's own are written
//! (the site's state now: small whatever the log's size). The writer then goes on, and the
//! entries through the head are read, with the Merkle nodes and transparency leaves they
//! determine ([`crate::audit::merkle::node_at`]: nodes past the head left out, the last leaf
//! row cut). Those never change once durable; retention removes none of them meanwhile
//! ([`crate::audit::AuditLog::hold_front`]). Before, the whole read ran on the writer and
//! every audited call waited for it (6.7 s at 10⁶ entries).
//!
//! Owns: the format, taking a snapshot and restoring one into an empty data folder. Must not touch: a running site's folder (restore refuses a
//! folder that holds anything).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::SiteState;
use super::marker::SiteMarker;
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

/// The last line of a snapshot.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: u32,
    records: usize,
    trees: std::collections::BTreeMap<String, usize>,
    sha256: String,
    mac: String,
}

/// The snapshot format this build writes and restores.
const VERSION: u32 = 3;

/// The MAC key of snapshots: derived from the KEK, never the KEK itself.
fn mac_key(kek: &Kek) -> aws_lc_rs::hmac::Key {
    kek.mac_key("snapshot")
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

/// A snapshot written to a file in the data folder (mode 0600), removed when dropped: what the
/// admin port streams, so the site never holds a snapshot in memory (issue 30: at 10⁶ entries
/// the in-memory snapshot peaked at 3.4 GiB).
/// The file is held open from the moment it is written, so it is read whole even if it is
/// unlinked meanwhile (another snapshot clearing what a crash left).
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    file: std::fs::File,
    /// Its size in bytes.
    pub len: u64,
    /// The audit seq it runs through.
    pub seq: u64,
}

impl SnapshotFile {
    /// The file's name (for messages).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads the next piece into `buf` (0: the end).
    pub fn read_some(&self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        use std::io::Read as _;
        (&self.file).read(buf).map_err(|source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The whole snapshot (tests and small sites).
    pub fn read(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.read_some(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Prefix of snapshot files in the data folder (one left by a crash is removed at the next
/// snapshot).
const SNAPSHOT_FILE_PREFIX: &str = ".snapshot-";

/// Records read from the store at once while writing a snapshot.
const SNAPSHOT_PAGE: usize = 4096;

impl SiteState {
    /// A consistent snapshot at one point of the audit log (see the module docs). Call it
    /// under the ops lock (an `ops::audited` write), so no ops change runs meanwhile.
    pub async fn snapshot(&self) -> Result<(Vec<u8>, u64), SnapshotError> {
        let file = self.snapshot_to_file().await?;
        Ok((file.read()?, file.seq))
    }

    /// [`SiteState::snapshot`] into a file, reading the store a page at a time: memory stays
    /// bounded whatever the site's size.
    pub async fn snapshot_to_file(&self) -> Result<SnapshotFile, SnapshotError> {
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
        let key = mac_key(&self.custodian.kek);
        // Files a crash left behind.
        if let Ok(dir) = std::fs::read_dir(&self.data_dir) {
            for e in dir.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(SNAPSHOT_FILE_PREFIX)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = self.data_dir.join(format!(
            "{SNAPSHOT_FILE_PREFIX}{taken_at}-{}-{}.tmp",
            std::process::id(),
            TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        // Retention removes nothing from the front of the log until the snapshot has read it.
        let audit = self.audit.clone();
        let hold = tokio::task::spawn_blocking(move || audit.hold_front())
            .await
            .map_err(|e| SnapshotError::Audit(AuditError::Tree(format!("snapshot task: {e}"))))?;
        // On the writer, between commits: the head and every tree but the log's own (the
        // site's state now: small). The writer then goes on while the entries through the
        // head, and the tree nodes they determine, are read (they do not change once durable).
        let target = path.clone();
        let begun = self
            .audit
            .exclusive(move |store, seq, hash| {
                let mut enc = Encoder::create(&target, &key)?;
                enc.header(marker, taken_at, seq, hash)?;
                for tree in Tree::ALL {
                    if !matches!(tree, Tree::Audit | Tree::Merkle) {
                        enc.tree(store, tree, |_, v| Some(v.to_vec()))?;
                    }
                }
                let log_size = crate::audit::transparency_size_at(store, seq)?;
                Ok::<_, SnapshotError>((enc, seq, log_size))
            })
            .await
            .map_err(SnapshotError::from)
            .and_then(|r| r);
        let store = self.store.clone();
        let written = match begun {
            Ok((mut enc, seq, log_size)) => tokio::task::spawn_blocking(move || {
                let _hold = hold;
                let seq_key = seq.to_be_bytes();
                enc.tree(&store, Tree::Audit, |k, v| {
                    (k <= seq_key.as_slice()).then(|| v.to_vec())
                })?;
                enc.tree(&store, Tree::Merkle, |k, v| {
                    crate::audit::merkle::node_at(k, v, seq, log_size)
                })?;
                enc.finish().map(|len| (len, seq))
            })
            .await
            .map_err(|e| SnapshotError::Audit(AuditError::Tree(format!("snapshot task: {e}"))))
            .and_then(|r| r),
            Err(e) => Err(e),
        };
        let (len, seq) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let file = std::fs::File::open(&path).map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(SnapshotFile {
            path,
            file,
            len,
            seq,
        })
    }
}

/// Everything written to the snapshot file passes here: counted and MACed.
struct Out {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    mac: aws_lc_rs::hmac::Context,
    len: u64,
}

impl Out {
    fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        use std::io::Write as _;
        self.mac.update(bytes);
        self.len += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(|source| SnapshotError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// A snapshot being written: the file, its MAC and hash so far, the records per tree.
struct Encoder {
    out: Out,
    hasher: aws_lc_rs::digest::Context,
    trees: std::collections::BTreeMap<String, usize>,
    records: usize,
}

impl Encoder {
    /// Creates the file (new, owner-only).
    fn create(path: &Path, mac: &aws_lc_rs::hmac::Key) -> Result<Self, SnapshotError> {
        let file = {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(path).map_err(|source| SnapshotError::Io {
                path: path.to_path_buf(),
                source,
            })?
        };
        Ok(Self {
            out: Out {
                file: std::io::BufWriter::with_capacity(1 << 20, file),
                path: path.to_path_buf(),
                mac: aws_lc_rs::hmac::Context::with_key(mac),
                len: 0,
            },
            hasher: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            trees: std::collections::BTreeMap::new(),
            records: 0,
        })
    }

    fn header(
        &mut self,
        marker: SiteMarker,
        taken_at: i64,
        seq: u64,
        hash: &str,
    ) -> Result<(), SnapshotError> {
        let header = Header {
            snapshot: VERSION,
            site_id: marker.site_id.clone(),
            taken_at,
            audit_seq: seq,
            audit_hash: hash.to_string(),
            marker,
        };
        let mut first = serde_json::to_vec(&header).map_err(SnapshotError::Encode)?;
        first.push(b'\n');
        self.out.write(&first)
    }

    /// Every record of `tree` that `keep` keeps (with the value it gives), a page at a time:
    /// the next page starts just after the last key read.
    fn tree(
        &mut self,
        store: &Store,
        tree: Tree,
        keep: impl Fn(&[u8], &[u8]) -> Option<Vec<u8>>,
    ) -> Result<(), SnapshotError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let count = self.trees.entry(tree.name().to_string()).or_insert(0);
        let mut from = Vec::new();
        loop {
            let page = store.kv().scan_range(tree, &from, SNAPSHOT_PAGE)?;
            let full = page.len() == SNAPSHOT_PAGE;
            for (k, v) in &page {
                let Some(v) = keep(k, v) else {
                    continue;
                };
                let line = Line {
                    tree: tree.name().to_string(),
                    key: hex::encode(k),
                    value: b64.encode(v),
                };
                let mut bytes = serde_json::to_vec(&line).map_err(SnapshotError::Encode)?;
                bytes.push(b'\n');
                self.hasher.update(&bytes);
                self.out.write(&bytes)?;
                *count += 1;
                self.records += 1;
            }
            match page.last() {
                Some((k, _)) if full => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The trailer (the MAC covers everything before it), then the file made durable; returns
    /// the snapshot's length.
    fn finish(self) -> Result<u64, SnapshotError> {
        use std::io::Write as _;
        let Encoder {
            out,
            hasher,
            mut trees,
            records,
        } = self;
        let Out {
            mut file,
            mac,
            len,
            path,
        } = out;
        let io = |source| SnapshotError::Io {
            path: path.clone(),
            source,
        };
        for tree in Tree::ALL {
            trees.entry(tree.name().to_string()).or_insert(0);
        }
        let trailer = Trailer {
            end: 1,
            records,
            trees,
            sha256: hex::encode(hasher.finish().as_ref()),
            mac: hex::encode(mac.sign().as_ref()),
        };
        let mut last = serde_json::to_vec(&trailer).map_err(SnapshotError::Encode)?;
        last.push(b'\n');
        file.write_all(&last).map_err(io)?;
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(len + last.len() as u64)
    }
}

/// A snapshot checked whole: its header and its records.
struct Checked {
    header: Header,
    records: Vec<(Tree, Vec<u8>, Vec<u8>)>,
}

/// Checks the whole snapshot before anything is written: the header, every line, the
/// trailer's counts, hash and MAC (under `kek`), every tree present, the audit log ending
/// where the header says.
fn check(snapshot: &[u8], kek: &Kek) -> Result<Checked, SnapshotError> {
    let bad = |line: usize, message: String| SnapshotError::Format { line, message };
    let Some(body) = snapshot.strip_suffix(b"\n") else {
        return Err(bad(
            snapshot.split(|b| *b == b'\n').count(),
            "the snapshot does not end with a complete line: it was cut".into(),
        ));
    };
    let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    let header: Header = serde_json::from_slice(lines[0])
        .map_err(|e| bad(1, format!("not a meshsign snapshot header: {e}")))?;
    match header.snapshot {
        VERSION => {}
        1 => {
            return Err(bad(
                1,
                "snapshot version 1 carries no trailer, so a cut copy cannot be told from a \
                 whole one; take a new snapshot (meshsign admin snapshot)"
                    .into(),
            ));
        }
        v => {
            return Err(bad(
                1,
                format!(
                    "snapshot version {v} is not authenticated (or is newer than this \
                     meshsignd), so an edited copy cannot be told from the site's own; take a \
                     new snapshot (meshsign admin snapshot)"
                ),
            ));
        }
    }
    let n = lines.len();
    let trailer: Trailer = lines
        .last()
        .filter(|_| n >= 2)
        .and_then(|l| serde_json::from_slice(l).ok())
        .ok_or_else(|| bad(n, "no trailer: the snapshot was cut".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut records = Vec::with_capacity(n.saturating_sub(2));
    for (i, raw) in lines[1..n - 1].iter().enumerate() {
        let at = i + 2;
        let l: Line = serde_json::from_slice(raw).map_err(|e| bad(at, e.to_string()))?;
        let tree =
            Tree::from_name(&l.tree).ok_or_else(|| bad(at, format!("unknown tree {}", l.tree)))?;
        let key = hex::decode(&l.key).map_err(|e| bad(at, e.to_string()))?;
        let value = b64.decode(&l.value).map_err(|e| bad(at, e.to_string()))?;
        hasher.update(raw);
        hasher.update(b"\n");
        *counts.entry(l.tree).or_insert(0) += 1;
        records.push((tree, key, value));
    }
    if trailer.records != records.len() || hex::encode(hasher.finish().as_ref()) != trailer.sha256 {
        return Err(bad(
            n,
            format!(
                "the trailer says {} records with another hash; the snapshot holds {}: it was \
                 cut or altered",
                trailer.records,
                records.len()
            ),
        ));
    }
    // Every byte before the trailer, under the site's KEK.
    let signed = &snapshot[..snapshot.len() - 1 - lines[n - 1].len()];
    let mac = hex::decode(&trailer.mac).unwrap_or_default();
    if aws_lc_rs::hmac::verify(&mac_key(kek), signed, &mac).is_err() {
        return Err(bad(
            n,
            "the snapshot's MAC does not verify under this KEK: the snapshot was altered after \
             it was taken, or the KEK is not the site's (check --kek-file)"
                .into(),
        ));
    }
    for tree in Tree::ALL {
        let want = trailer.trees.get(tree.name()).ok_or_else(|| {
            bad(
                n,
                format!("the trailer does not name the {} section", tree.name()),
            )
        })?;
        if counts.get(tree.name()).copied().unwrap_or(0) != *want {
            return Err(bad(
                n,
                format!("the {} section does not hold {want} records", tree.name()),
            ));
        }
    }
    // The log must end where the header says, with that hash.
    let last: Option<AuditRecord> = records
        .iter()
        .filter(|(t, _, _)| *t == Tree::Audit)
        .max_by(|a, b| a.1.cmp(&b.1))
        .and_then(|(_, _, v)| serde_json::from_slice(v).ok());
    if last.as_ref().map(|r| (r.seq, r.hash.as_str()))
        != Some((header.audit_seq, header.audit_hash.as_str()))
    {
        return Err(bad(
            0,
            "the audit log does not end where the header says".into(),
        ));
    }
    Ok(Checked { header, records })
}

/// Restores `snapshot` into `data_dir`, which must be absent or an empty folder. The KEK must
/// be the site's (checked against the snapshot's marker). The audit chain continues: an entry
/// recording the restore follows the snapshot's last entry. `open` opens a store in a folder
/// (the restore builds the site in a temporary folder beside `data_dir`, then renames it).
pub fn restore(
    data_dir: &Path,
    kek: &Kek,
    kek_file: &Path,
    snapshot: &[u8],
    clock: &SharedClock,
    open: impl Fn(&Path) -> Result<Store, StoreError>,
) -> Result<Restored, SnapshotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    };
    let holds_anything = match std::fs::read_dir(data_dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(data_dir)(e)),
    };
    if holds_anything {
        return Err(SnapshotError::NotEmpty(data_dir.to_path_buf()));
    }
    let Checked { header, records } = check(snapshot, kek)?;
    header.marker.check_kek(kek, kek_file, data_dir)?;
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let suffix = meshsign_evidence::files::random_id()
        .map(|id| id[..8].to_string())
        .map_err(|e| io(data_dir)(std::io::Error::other(e.to_string())))?;
    let tmp = data_dir.with_file_name(format!(".{name}.restoring-{suffix}"));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let built = build(&tmp, header, records, clock, &open);
    let done = built.and_then(|r| {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(io(data_dir))?;
        }
        std::fs::rename(&tmp, data_dir).map_err(io(data_dir))?;
        if let Some(parent) = data_dir.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        Ok(r)
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

/// Writes the checked snapshot into `dir` (a new folder): records, the restore entry, the
/// journal header, the marker last.
fn build(
    dir: &Path,
    header: Header,
    records: Vec<(Tree, Vec<u8>, Vec<u8>)>,
    clock: &SharedClock,
    open: &impl Fn(&Path) -> Result<Store, StoreError>,
) -> Result<Restored, SnapshotError> {
    let store = open(dir)?;
    let count = records.len();
    for (tree, key, value) in records {
        store.kv().put(tree, &key, &value)?;
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
    let (restore_seq, restore_hash) = append_direct(
        &store,
        &header.marker.region,
        clock,
        &header.audit_hash,
        rec,
    )?;
    store.flush()?;
    drop(store);
    let data_dir = dir;
    let records = count;
    let journal = data_dir.join(JOURNAL_FILE);
    let head = format!(
        "{{\"journal\":1,\"after_seq\":{restore_seq},\"after_hash\":\"{restore_hash}\"}}\n"
    );
    meshsign_evidence::files::write_atomic(&journal, head.as_bytes(), false).map_err(|source| {
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
