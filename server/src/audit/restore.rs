//! Start-up and recovery of the log: what a crash left in the journal is written back (or
//! refused with the file and the fix), the store's durable point, entries that record a loss.

use super::*;

/// The tree over the stored entries 1..=`seq`, or None (logged) if it cannot be built.
pub(super) fn load_tree(store: &Store, seq: u64) -> Option<meshsign_evidence::merkle::Frontier> {
    match merkle::frontier(store, merkle::Log::Audit, seq) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, "the audit log's Merkle tree cannot be built: checkpoints will carry no signed tree head and receipts cannot be proven");
            None
        }
    }
}

/// Where the journal is, and whether it must already exist (a site created with one).
#[derive(Clone, Copy, Debug)]
pub struct JournalAt<'a> {
    /// The file.
    pub path: &'a std::path::Path,
    /// A missing file is refused (the site exists) rather than created (a new site).
    pub must_exist: bool,
}

/// Writes the journal's intact entries that the store lacks back into it (flushed), after
/// checking that the two agree: the store holds everything the journal's header says it
/// durably held, and every entry both hold is the same. Returns how many were restored.
pub(super) fn restore_from_journal(
    store: &Store,
    path: &std::path::Path,
    recovered: &journal::Recovered,
    existed: bool,
) -> Result<usize, AuditError> {
    let missing = plan_restore(store, path, recovered, existed)?;
    for (rec, bytes) in &missing {
        store.kv().put(Tree::Audit, &rec.seq.to_be_bytes(), bytes)?;
    }
    // The transparency leaves every journal entry names: the journal holds exactly what was
    // written since the last store flush, and on an embedded site the entries (segment files,
    // written at once) can outlive the leaves (sled, flushed later) in a crash.
    for (rec, _) in &recovered.entries {
        if let Some(t) = &rec.tlog
            && let Some(h) = t.hashes()
        {
            merkle::put_log_leaves(store, t.index, &h)?;
        }
    }
    store.flush()?;
    Ok(missing.len())
}

/// Checks the journal at `path` against the store as a start would (without writing): present
/// when it must be, every line intact, consistent with the store. `meshsignd recover` reports
/// with it.
pub fn check_journal(
    path: &std::path::Path,
    must_exist: bool,
    store: &Store,
) -> Result<(), AuditError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if must_exist {
                return Err(AuditError::JournalState(journal::JournalError::Missing {
                    path: path.to_path_buf(),
                    dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                }));
            }
            return Ok(());
        }
        Err(e) => {
            return Err(AuditError::Journal {
                path: path.to_path_buf(),
                source: Arc::new(e),
            });
        }
    };
    let recovered = journal::parse(path, &text).map_err(AuditError::JournalState)?;
    plan_restore(store, path, &recovered, true).map(|_| ())
}

/// The journal's entries the store lacks, after checking that the two agree (see
/// [`restore_from_journal`]); writes nothing.
pub(super) fn plan_restore<'r>(
    store: &Store,
    path: &std::path::Path,
    recovered: &'r journal::Recovered,
    existed: bool,
) -> Result<Vec<&'r journal::JournalEntry>, AuditError> {
    let stored = |seq: u64| -> Result<Option<AuditRecord>, AuditError> {
        match store.kv().get(Tree::Audit, &seq.to_be_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(AuditError::entry("stored"))?,
            )),
            None => Ok(None),
        }
    };
    let head = match store.kv().last(Tree::Audit)? {
        Some((_, v)) => {
            let r: AuditRecord =
                serde_json::from_slice(&v).map_err(AuditError::entry("last stored"))?;
            (r.seq, r.hash)
        }
        None => (0, genesis()),
    };
    let conflict = |seq: u64, what: String| {
        AuditError::JournalState(journal::JournalError::conflict(path, seq, what))
    };
    if existed {
        journal::check_against_store(path, recovered, head.0, store_durable_through(store)?)
            .map_err(AuditError::JournalState)?;
    }
    if let Some((base_seq, base_hash)) = &recovered.base
        && *base_seq > 0
    {
        // The store's last entry must be at least the journal's base: a damaged index can
        // still find the base entry by key while the log, read from its end, stops earlier.
        if head.0 < *base_seq {
            return Err(AuditError::JournalState(
                journal::JournalError::store_behind(path, *base_seq, head.0),
            ));
        }
        match stored(*base_seq)? {
            Some(r) if r.hash == *base_hash => {}
            Some(_) => {
                return Err(conflict(
                    *base_seq,
                    "is a different entry in the store than the journal says".into(),
                ));
            }
            None => {
                return Err(AuditError::JournalState(
                    journal::JournalError::store_behind(path, *base_seq, head.0),
                ));
            }
        }
    }
    let mut missing = Vec::new();
    let (mut last_seq, mut last_hash) = head;
    for entry in &recovered.entries {
        let rec = &entry.0;
        if rec.seq <= head.0 {
            match stored(rec.seq)? {
                Some(r) if r.hash == rec.hash => continue,
                _ => {
                    return Err(conflict(
                        rec.seq,
                        "differs from the store's entry with the same seq".into(),
                    ));
                }
            }
        }
        if rec.seq != last_seq + 1 || rec.prev_hash != last_hash {
            return Err(conflict(
                rec.seq,
                format!("does not continue the store's log (which ends at seq {last_seq})"),
            ));
        }
        (last_seq, last_hash) = (rec.seq, rec.hash.clone());
        missing.push(entry);
    }
    Ok(missing)
}

/// Reads every stored entry of the audit log once, in order: the engine checks each page as it
/// reads it (sled: a checksum per record), so a damaged page is found — naming where the
/// readable log ends — not by an export months later while the site kept signing. Keys must
/// follow each other without a gap (retention removes only from the front), and the read must
/// reach the last key the engine finds from the other end (a damaged index once ended a forward
/// read at seq 133 of 302 while the last entry still read). Returns how many entries were read.
/// O(entries): `meshsignd recover` runs it whole; a start reads only the tail with it
/// ([`ReadThrough::tail`]) and the rest in the background ([`scrub`]).
pub fn check_readable(store: &Store, dir: &std::path::Path) -> Result<u64, AuditError> {
    ReadThrough::from(store, dir, 0, false)?.run(store, &mut || true)
}

/// Entries read per step of a [`ReadThrough`].
const READ_CHUNK: usize = 8192;

/// Entries read per step of the background read (see [`scrub`]): a chunk's bytes are held in
/// memory while it is checked, and a serving site's memory should not carry 8,192 entries
/// (~10 MiB, measured as RSS at rest above a small site's while the read went on) for a read
/// that takes its time anyway. The read keeps only the keys, in one buffer reused from chunk
/// to chunk ([`crate::store::Kv::scan_seqs`]).
const SCRUB_CHUNK: usize = 512;

/// A read of the stored audit log from one seq to the last entry stored when it began, a chunk
/// at a time (see [`check_readable`]).
pub(super) struct ReadThrough {
    dir: String,
    next: u64,
    last: Option<u64>,
    count: u64,
    /// The engine's last key when the read began, found from the other end.
    end: Option<u64>,
    /// Entries may be removed from the front while it reads (retention on a serving site).
    concurrent_prune: bool,
    /// Entries read per step.
    chunk: usize,
    /// The engine's read buffer, reused from chunk to chunk ([`crate::store::Kv::scan_seqs`]).
    scratch: Vec<u8>,
}

impl ReadThrough {
    /// A read from `from` to the last stored entry (see [`check_readable`]).
    pub(super) fn from(
        store: &Store,
        dir: &std::path::Path,
        from: u64,
        concurrent_prune: bool,
    ) -> Result<Self, AuditError> {
        let mut r = Self {
            dir: dir.display().to_string(),
            next: from,
            last: None,
            count: 0,
            end: None,
            concurrent_prune,
            chunk: READ_CHUNK,
            scratch: Vec::new(),
        };
        r.end = match store.kv().last(Tree::Audit) {
            Ok(Some((k, _))) => <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .ok(),
            Ok(None) => None,
            Err(e) => return Err(r.unreadable(e.to_string())),
        };
        Ok(r)
    }

    /// A read of the last `n` entries (a start's synchronous check: what a crash may have left
    /// damaged is what was written last).
    pub(super) fn tail(store: &Store, dir: &std::path::Path, n: u64) -> Result<Self, AuditError> {
        let mut r = Self::from(store, dir, 0, false)?;
        r.next = r
            .end
            .map_or(0, |end| end.saturating_sub(n.saturating_sub(1)));
        Ok(r)
    }

    fn unreadable(&self, cause: String) -> AuditError {
        AuditError::Unreadable {
            dir: self.dir.clone(),
            after: self.last.unwrap_or(self.next.saturating_sub(1)),
            cause,
        }
    }

    /// Reads chunk after chunk; `pace` runs between two and stops the read (returning the
    /// count so far) when it returns false.
    pub(super) fn run(
        mut self,
        store: &Store,
        pace: &mut dyn FnMut() -> bool,
    ) -> Result<u64, AuditError> {
        // After a chunk fails to read, one entry at a time through it, to name where it stops.
        let mut single = 0usize;
        loop {
            let limit = if single > 0 { 1 } else { self.chunk };
            let rows = match store.kv().scan_seqs(self.next, limit, &mut self.scratch) {
                Ok(rows) => rows,
                Err(e) if single > 0 => return Err(self.unreadable(e.to_string())),
                Err(_) => {
                    single = self.chunk;
                    continue;
                }
            };
            single = single.saturating_sub(1);
            for &seq in &rows {
                if let Some(prev) = self.last
                    && seq != prev + 1
                    && !self.pruned_meanwhile(store, prev)?
                {
                    return Err(self.unreadable(format!("the next stored entry is seq {seq}")));
                }
                self.last = Some(seq);
                self.count += 1;
            }
            match self.last {
                // A short chunk is the end of the log as an in-order read sees it; reading on
                // from a new seek could step over a broken link that every full scan (an
                // export, a replica's catch-up) would stop at.
                Some(l) if rows.len() == limit && self.end.is_none_or(|end| l < end) => {
                    self.next = l + 1;
                }
                _ => break,
            }
            if single == 0 && !pace() {
                return Ok(self.count);
            }
        }
        // The engine's last key, found from the other end: a damaged index can end a forward
        // read early while point reads (the journal's check among them) still find the later
        // entries. Then the forward read did not read the whole log.
        if let Some(end) = self.end
            && Some(end) > self.last
        {
            return Err(self.unreadable(format!(
                "the log's last entry is seq {end}, but reading it in order stops there"
            )));
        }
        Ok(self.count)
    }

    /// A gap after `prev` that retention made while the read went on: retention removes from
    /// the front in seq order, so `prev` is gone too. A gap below entries still there is damage.
    fn pruned_meanwhile(&self, store: &Store, prev: u64) -> Result<bool, AuditError> {
        if !self.concurrent_prune {
            return Ok(false);
        }
        match store.kv().get(Tree::Audit, &prev.to_be_bytes()) {
            Ok(found) => Ok(found.is_none()),
            Err(e) => Err(self.unreadable(e.to_string())),
        }
    }
}

/// A serving site's read of its whole stored log (see [`check_readable`]), in the background:
/// at most half of one core (it rests as long as each chunk took), stopping when `stop` is
/// set. Signing goes on while it reads; what it finds damaged stops signing (the caller
/// records the error where every append sees it).
pub(super) fn scrub(
    store: &Store,
    dir: &std::path::Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<u64, AuditError> {
    let mut read = ReadThrough::from(store, dir, 0, true)?;
    read.chunk = SCRUB_CHUNK;
    let mut started = std::time::Instant::now();
    read.run(store, &mut || {
        let took = started.elapsed();
        let mut rest = took;
        while !rest.is_zero() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            let step = rest.min(Duration::from_millis(20));
            std::thread::sleep(step);
            rest -= step;
        }
        started = std::time::Instant::now();
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    })
}

/// Where the store records the last seq a store flush made durable (a batch that went to the
/// store, not the journal): written with the batch, so it is durable exactly when the batch is.
pub(super) const STORE_DURABLE_KEY: &[u8] = b"audit/store_durable_through";

/// The last seq a store flush made durable (0: none recorded).
pub fn store_durable_through(store: &Store) -> Result<u64, StoreError> {
    Ok(store
        .kv()
        .get(Tree::Meta, STORE_DURABLE_KEY)?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

/// An entry that records a loss of audit entries (start-up recovery, `meshsignd recover`).
pub fn loss_record(seq: u64, detail: &str) -> AuditRecord {
    AuditRecord {
        seq,
        rpc: "AuditRecovery".into(),
        decision: "allow".into(),
        reason: crate::model::Reason::LossRecorded.as_str().into(),
        environment: "(site)".into(),
        detail: detail.to_string(),
        ..Default::default()
    }
}

/// Chains `rec` after `prev_hash` at its seq and stores it (not flushed); returns (seq, hash).
/// For start-up and offline recovery only, before any writer runs.
pub fn append_direct(
    store: &Store,
    region: &str,
    clock: &SharedClock,
    prev_hash: &str,
    mut rec: AuditRecord,
) -> Result<(u64, String), AuditError> {
    rec.ts = ::time::OffsetDateTime::from(clock.now())
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    rec.site_region = region.to_string();
    let bytes = rec.seal(prev_hash);
    store
        .kv()
        .put(Tree::Audit, &rec.seq.to_be_bytes(), &bytes)?;
    Ok((rec.seq, rec.hash))
}
