//! The group-commit writer: one thread that appends entries, chains and signs them, keeps the
//! Merkle tree, checkpoints, and makes each batch durable (journal, store, or a database
//! transaction for a shared chain) before anyone is answered.

use super::merkle::Log;
use super::*;

/// The entry as chained, and its stored bytes (so no caller encodes it a second time).
pub(super) type Reply = oneshot::Sender<Result<(AuditRecord, Vec<u8>), AuditError>>;

/// What must be durable before an entry is acknowledged.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// The entry only (the request wrote nothing else).
    Entry,
    /// The entry and everything the request wrote to the store.
    Store,
}

/// Whether a commit adds a checkpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpointing {
    /// When `checkpoint_every` entries are uncovered; durable through the journal like the
    /// entries it covers (the store is flushed when the journal passes its size, at an idle
    /// checkpoint, or with an entry that changed other state — not every `checkpoint_every`
    /// entries: under load that flush was a stall of every request in flight, 5 times a
    /// second at 5,000 Signs/s).
    IfDue,
    /// Now (start, idle interval), with a store flush.
    Now,
    /// Now, for a proof; durable like a signing entry.
    OnDemand,
}

/// Work run on the writer thread between commits: the store, the head seq and hash.
pub(super) type Exclusive = Box<dyn FnOnce(&Store, u64, &str) + Send>;

pub(super) enum Msg {
    Entry(Box<AuditRecord>, Scope, Reply),
    Exclusive(Exclusive),
    Repair(oneshot::Sender<Result<bool, AuditError>>),
    /// Checkpoint now unless a signed tree head already covers this.
    Checkpoint(Cover, oneshot::Sender<Result<(), AuditError>>),
    Stop(oneshot::Sender<()>),
}

/// What a checkpoint asked for must cover.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cover {
    /// Audit entry `seq`.
    Audit(u64),
    /// Transparency leaves `0..size`.
    Log(u64),
}

pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) clock: SharedClock,
    pub(super) region: String,
    pub(super) key: AuditKey,
    pub(super) settings: AuditSettings,
    pub(super) seq: u64,
    pub(super) hash: String,
    pub(super) since_checkpoint: u64,
    pub(super) head: watch::Sender<u64>,
    /// None: every commit flushes the store.
    pub(super) journal: Option<Journal>,
    /// A journal write failed: the next commit flushes the store and empties the journal, so
    /// no torn line stays in front of later entries.
    pub(super) journal_reset: bool,
    /// Encoded entries of the batch being committed, with their seqs (what the journal and
    /// the store are given). Nothing of a batch reaches the store before every part of it
    /// that can fail first (the checkpoint's signature) has worked: a batch that fails leaves
    /// no entry behind for the next one to chain onto. A shared chain commits them in one
    /// database transaction.
    pub(super) chain_pending: Vec<(u64, Vec<u8>)>,
    /// The store is shared by several replicas: each group commit locks the chain head in the
    /// database, continues from it (another replica may have moved it), and commits there.
    pub(super) shared: bool,
    /// Set while commits fail (a full or broken disk); cleared by a commit or a repair.
    pub(super) failing: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the background read when the stored log is damaged: from then on no commit
    /// writes anything (checked here, not only where entries are sent, so an entry queued
    /// before the damage was found, or a periodic checkpoint, does not land after it).
    pub(super) damaged: super::Damage,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// The Merkle tree over entries 1..=seq (None: it could not be built; checkpoints then
    /// carry no tree head, and the log says why once).
    pub(super) tree: Option<meshsign_evidence::merkle::Frontier>,
    /// Subtrees completed by the batch being committed (stored once it is durable).
    pub(super) completed: Vec<meshsign_evidence::merkle::Completed>,
    /// Checkpoint origin (`<trust domain>/<region>/audit`).
    pub(super) origin: String,
    /// The newest durable signed tree head.
    pub(super) signed_head: watch::Sender<Option<SignedHead>>,
    /// A tree head signed in the batch being committed.
    pub(super) pending_head: Option<SignedHead>,
    /// The transparency log.
    pub(super) log: super::tlog::Transparency,
}

impl Writer {
    pub(super) fn commit_loop(mut self, rx: mpsc::Receiver<Msg>) {
        // After a restart (or a crash), anchor the tail left unsigned at once.
        if self.since_checkpoint > 0
            && let Err(e) = self.commit(Vec::new(), Checkpointing::Now)
        {
            tracing::error!(error = %e, "audit checkpoint at start failed");
        }
        loop {
            let first = match rx.recv_timeout(self.settings.checkpoint_interval) {
                Ok(Msg::Entry(rec, scope, reply)) => (*rec, scope, reply),
                Ok(Msg::Stop(done)) => return self.finish(done),
                Ok(Msg::Exclusive(job)) => {
                    self.exclusive(job);
                    continue;
                }
                Ok(Msg::Repair(reply)) => {
                    let _ = reply.send(self.repair());
                    continue;
                }
                Ok(Msg::Checkpoint(cover, reply)) => {
                    let _ = reply.send(self.checkpoint_now(cover));
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Idle: checkpoint what is not yet covered.
                    if self.since_checkpoint > 0
                        && let Err(e) = self.commit(Vec::new(), Checkpointing::Now)
                    {
                        tracing::error!(error = %e, "audit checkpoint failed");
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            let mut stop = None;
            let mut exclusive: Option<Exclusive> = None;
            let mut repair = None;
            let mut checkpoint_now = None;
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(Msg::Entry(rec, scope, reply)) => batch.push((*rec, scope, reply)),
                    Ok(Msg::Stop(done)) => {
                        stop = Some(done);
                        break;
                    }
                    Ok(Msg::Exclusive(job)) => {
                        exclusive = Some(job);
                        break;
                    }
                    Ok(Msg::Repair(reply)) => {
                        repair = Some(reply);
                        break;
                    }
                    Ok(Msg::Checkpoint(cover, reply)) => {
                        checkpoint_now = Some((cover, reply));
                        break;
                    }
                    Err(_) => break,
                }
            }
            match self.commit(batch, Checkpointing::IfDue) {
                Ok(()) => self
                    .failing
                    .store(false, std::sync::atomic::Ordering::SeqCst),
                Err(e) => {
                    self.failing
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!(error = %e, "audit write failed; writes are refused until the store takes them again");
                }
            }
            if let Some(job) = exclusive.take() {
                self.exclusive(job);
            }
            if let Some(reply) = repair.take() {
                let _ = reply.send(self.repair());
            }
            if let Some((cover, reply)) = checkpoint_now.take() {
                let _ = reply.send(self.checkpoint_now(cover));
            }
            if let Some(done) = stop {
                return self.finish(done);
            }
        }
    }

    /// After failed writes: lets the store recover (reopen), puts back what only the journal
    /// held, checks that the store takes a durable write, and empties the journal.
    pub(super) fn repair(&mut self) -> Result<bool, AuditError> {
        let reopened = self.store.kv().recover()?;
        if let Some(j) = &self.journal {
            let recovered = j.reread()?;
            restore_from_journal(&self.store, j.path(), &recovered, true)?;
        }
        let last = |store: &Store| -> Result<(u64, String), AuditError> {
            Ok(match store.kv().last(Tree::Audit)? {
                Some((_, v)) => {
                    let r: AuditRecord =
                        serde_json::from_slice(&v).map_err(AuditError::entry("last stored"))?;
                    (r.seq, r.hash)
                }
                None => (0, genesis()),
            })
        };
        if !self.shared {
            // Entries past the writer's head belong to batches that failed (never
            // acknowledged): they go before anything chains onto them.
            let (seq, _) = last(&self.store)?;
            if seq > self.seq {
                tracing::warn!(
                    from = self.seq + 1,
                    to = seq,
                    "taking unacknowledged audit entries of failed batches out of the store"
                );
                self.unput(self.seq, seq);
            }
        }
        self.store.flush()?;
        let (seq, hash) = last(&self.store)?;
        if (seq, hash.as_str()) != (self.seq, self.hash.as_str()) {
            tracing::error!(
                store_seq = seq,
                writer_seq = self.seq,
                "after the store recovered, its audit log ends elsewhere than the writer's head; continuing from the store"
            );
            (self.seq, self.hash) = (seq, hash);
            self.tree = load_tree(&self.store, self.seq);
            self.log.tree = super::tlog::load(&self.store, self.seq);
        }
        if let Some(j) = &mut self.journal {
            j.clear(self.seq, &self.hash)?;
        }
        self.journal_reset = false;
        self.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(reopened)
    }

    /// Extends the tree from `from` entries to the writer's head with the entries another
    /// replica committed (their completed subtrees are stored with the batch); rebuilds it
    /// from the store if that does not fit.
    pub(super) fn catch_up_tree(&mut self, from: u64) {
        let extended = match &mut self.tree {
            Some(tree) if tree.size() == from && self.seq > from => {
                let want = usize::try_from(self.seq - from).unwrap_or(usize::MAX);
                match self
                    .store
                    .kv()
                    .scan_range(Tree::Audit, &(from + 1).to_be_bytes(), want)
                {
                    Ok(rows)
                        if rows.len() == want
                            && rows.iter().zip(from + 1..).all(|((k, _), seq)| {
                                k.as_slice() == seq.to_be_bytes().as_slice()
                            }) =>
                    {
                        let mut log_ok = true;
                        for (_, bytes) in &rows {
                            self.completed
                                .extend(tree.push(meshsign_evidence::merkle::leaf_hash(bytes)));
                            let taken = serde_json::from_slice::<AuditRecord>(bytes)
                                .map_err(AuditError::entry("another replica's"))
                                .and_then(|rec| self.log.take_in(&rec));
                            if let Err(e) = taken {
                                tracing::warn!(error = %e, "transparency tree rebuilt after catching up");
                                log_ok = false;
                            }
                        }
                        if !log_ok {
                            self.log.tree = super::tlog::load(&self.store, self.seq);
                        }
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        if !extended {
            self.tree = load_tree(&self.store, self.seq);
            self.log.tree = super::tlog::load(&self.store, self.seq);
        }
    }

    /// A checkpoint now, for a proof of entry `seq` — unless a signed tree head already covers
    /// it (requests that queued behind one checkpoint are answered by it). Made durable like a
    /// signing entry (the journal), not with a store flush: on-demand checkpoints follow the
    /// rate of receipts, the periodic ones move everything into the store.
    pub(super) fn checkpoint_now(&mut self, cover: Cover) -> Result<(), AuditError> {
        if let Some(e) = self.damaged.get() {
            return Err(e.clone());
        }
        let (known, want, tree) = match cover {
            Cover::Audit(seq) => (
                self.signed_head.borrow().as_ref().map(|h| h.size),
                seq,
                self.tree.is_some(),
            ),
            Cover::Log(size) => (
                self.log.signed.borrow().as_ref().map(|h| h.size),
                size,
                self.log.tree.is_some(),
            ),
        };
        if known.is_some_and(|size| size >= want) || !tree {
            return Ok(());
        }
        // With nothing new but no signed head known (a start right after a checkpoint of an
        // older version), a checkpoint of the same head is made.
        self.since_checkpoint = self.since_checkpoint.max(1);
        self.commit(Vec::new(), Checkpointing::OnDemand)
    }

    pub(super) fn exclusive(&mut self, job: Exclusive) {
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "store flush before exclusive work failed");
        }
        job(&self.store, self.seq, &self.hash);
    }

    /// Shutdown: everything into the store, journal emptied, and the store (with its file
    /// lock) released before saying so, so a restart in the same process can open it at once.
    pub(super) fn finish(mut self, done: oneshot::Sender<()>) {
        if self.store.flush().is_ok()
            && let Some(j) = &mut self.journal
        {
            let _ = j.clear(self.seq, &self.hash);
        }
        drop(self);
        let _ = done.send(());
    }

    pub(super) fn now_rfc3339(&self) -> String {
        ::time::OffsetDateTime::from(self.clock.now())
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    pub(super) fn append(&mut self, mut rec: AuditRecord) -> Result<AuditRecord, AuditError> {
        if let Some(t) = rec.tlog.as_mut() {
            self.log.assign(t)?;
        }
        rec.seq = self.seq + 1;
        rec.ts = self.now_rfc3339();
        rec.site_region = self.region.clone();
        rec.bound_fields();
        let bytes = rec.seal(&self.hash);
        if let Some(tree) = &mut self.tree {
            if tree.size() + 1 == rec.seq {
                self.completed
                    .extend(tree.push(meshsign_evidence::merkle::leaf_hash(&bytes)));
            } else {
                tracing::error!(
                    tree = tree.size(),
                    seq = rec.seq,
                    "audit Merkle tree out of step with the chain; rebuilt at the next start"
                );
                self.tree = None;
            }
        }
        self.chain_pending.push((rec.seq, bytes));
        // The same fields as a log event (never tokens or payloads: jti and digests only);
        // strings that came from the network are escaped, so none can forge a log line.
        let f = |s: &str| crate::model::log_safe(s).into_owned();
        // Allowed signatures — the bulk of a busy site's entries, all in the audit log — are
        // logged only with `meshsign::audit=debug`; every other decision at info.
        let routine = rec.decision == "allow" && matches!(rec.rpc.as_str(), "Sign" | "SignBatch");
        if !routine || tracing::enabled!(target: "meshsign::audit", tracing::Level::DEBUG) {
            tracing::info!(
                target: "meshsign::audit",
                seq = rec.seq, rpc = %f(&rec.rpc), decision = %rec.decision, reason = %rec.reason,
                environment = %f(&rec.environment), job_id = %f(&rec.job_id), jti = %f(&rec.jti),
                token_issuer = %f(&rec.token_issuer), subject = %f(&rec.subject),
                runner_fingerprint = %f(&rec.runner_fingerprint), cert_serial = %rec.cert_serial,
                ttl_remaining_sec = rec.ttl_remaining_sec, key_id = %f(&rec.key_id), digest = %rec.digest,
                items = rec.items, repository = %f(&rec.repository), git_ref = %f(&rec.git_ref),
                provider = %rec.provider, peer = %rec.peer, operator = %f(&rec.operator),
                detail = %f(&rec.detail), hash = %rec.hash,
            );
        }
        self.seq = rec.seq;
        self.hash = rec.hash.clone();
        Ok(rec)
    }

    pub(super) fn checkpoint(&mut self) -> Result<(), AuditError> {
        let time = self.clock.unix();
        let msg = Checkpoint::message(&self.region, self.seq, &self.hash, time);
        let mut digest = [0u8; 32];
        digest
            .copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg).as_ref());
        let sig = self
            .key
            .backend
            .sign_digest(&digest)
            .map_err(|e| AuditError::Checkpoint(Arc::new(e)))?;
        let note = match &self.tree {
            Some(tree) if tree.size() == self.seq => {
                let head = meshsign_evidence::note::TreeHead {
                    origin: self.origin.clone(),
                    size: tree.size(),
                    root: tree.root(),
                };
                let note = self.sign_note(&head)?;
                self.pending_head = Some(SignedHead {
                    size: head.size,
                    note: note.clone(),
                });
                Some(note)
            }
            _ => None,
        };
        let log_note = match &self.log.tree {
            Some(tree) => {
                let head = meshsign_evidence::note::TreeHead {
                    origin: self.log.origin.clone(),
                    size: tree.size(),
                    root: tree.root(),
                };
                let note = self.sign_note(&head)?;
                self.log.pending_head = Some(SignedHead {
                    size: head.size,
                    note: note.clone(),
                });
                Some(note)
            }
            None => None,
        };
        let rec = AuditRecord {
            rpc: "Checkpoint".into(),
            decision: "allow".into(),
            reason: crate::model::Reason::Checkpoint.as_str().into(),
            environment: "(site)".into(),
            key_id: self.key.key_id.clone(),
            checkpoint: Some(Checkpoint {
                covers_seq: self.seq,
                head_hash: self.hash.clone(),
                time,
                key_id: self.key.key_id.clone(),
                signature: hex::encode(sig),
                note,
                log_note,
            }),
            ..Default::default()
        };
        self.append(rec)?;
        self.since_checkpoint = 0;
        self.metrics
            .last_checkpoint_unix
            .store(time, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A tree head as a C2SP signed note, signed by the audit key.
    fn sign_note(&self, head: &meshsign_evidence::note::TreeHead) -> Result<String, AuditError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, head.text().as_bytes()).as_ref(),
        );
        let sig = self
            .key
            .backend
            .sign_digest(&d)
            .map_err(|e| AuditError::Checkpoint(Arc::new(e)))?;
        Ok(head.note(self.key.backend.public_key_der(), &sig))
    }

    /// Puts the batch's entries into the store (not flushed).
    pub(super) fn put_pending(&self) -> Result<(), AuditError> {
        let keys: Vec<[u8; 8]> = self
            .chain_pending
            .iter()
            .map(|(seq, _)| seq.to_be_bytes())
            .collect();
        let entries: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&self.chain_pending)
            .map(|(k, (_, bytes))| (k.as_slice(), bytes.as_slice()))
            .collect();
        Ok(self.store.kv().put_many(Tree::Audit, &entries)?)
    }

    /// Takes back what a failed batch put into the store (seqs after `head`, through `upto`),
    /// so the next batch does not chain onto entries nobody was told of.
    pub(super) fn unput(&self, head: u64, upto: u64) {
        if store_durable_through(&self.store).is_ok_and(|m| m > head)
            && let Err(e) = self
                .store
                .kv()
                .put(Tree::Meta, STORE_DURABLE_KEY, &head.to_be_bytes())
        {
            tracing::warn!(error = %e, "the store-durable mark could not be taken back");
        }
        // From the end: the log is cut back, never holed.
        for seq in (head + 1..=upto).rev() {
            if let Err(e) = self.store.kv().remove(Tree::Audit, &seq.to_be_bytes()) {
                tracing::error!(seq, error = %e, "a failed audit batch's entry could not be taken back; the store is repaired before the next write");
                self.failing
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Stores the batch and makes it durable: through the journal when only entries must be
    /// (journal first, then the store, so the store never holds an entry the journal does
    /// not), else by flushing the store (which then holds everything, so the journal is
    /// emptied). Without `durable`, the entries are only stored.
    pub(super) fn make_durable(&mut self, store_scope: bool) -> Result<(), AuditError> {
        // The leaves first: whatever makes the entries durable takes them along (or, for a
        // shared chain, they precede the commit that names them).
        self.log.put_rows(&self.store)?;
        if let Some(chain) = self.store.kv().chain() {
            return Ok(chain.commit(&self.chain_pending, (self.seq, &self.hash))?);
        }
        if !self.settings.durable {
            return self.put_pending();
        }
        let journal_full = self
            .journal
            .as_ref()
            .is_none_or(|j| j.len() > Journal::MAX_BYTES);
        if store_scope || journal_full || self.journal_reset {
            self.put_pending()?;
            // Flushed with the batch: a crash before the journal is emptied below leaves a
            // store ahead of the journal that says why (not a cut journal).
            self.store
                .kv()
                .put(Tree::Meta, STORE_DURABLE_KEY, &self.seq.to_be_bytes())?;
            self.store.flush()?;
            if let Some(j) = &mut self.journal {
                // If emptying fails the journal only repeats entries the store now holds.
                match j.clear(self.seq, &self.hash) {
                    Ok(()) => self.journal_reset = false,
                    Err(e) => tracing::warn!(error = %e, "audit journal not emptied"),
                }
            }
            return Ok(());
        }
        let Some(j) = &mut self.journal else {
            return self.put_pending();
        };
        let mark = j.mark();
        j.append(self.chain_pending.iter().map(|(_, bytes)| bytes.as_slice()))
            .inspect_err(|_| self.journal_reset = true)?;
        if let Err(e) = self.put_pending() {
            // Not acknowledged: the journal must not bring it back at the next start.
            if let Some(j) = &mut self.journal
                && j.rewind(mark).is_err()
            {
                self.journal_reset = true;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Chains and stores a batch (plus a checkpoint when due), makes it durable once, answers
    /// everyone. On failure nothing of the batch is acknowledged and the chain head is restored.
    pub(super) fn commit(
        &mut self,
        batch: Vec<(AuditRecord, Scope, Reply)>,
        checkpointing: Checkpointing,
    ) -> Result<(), AuditError> {
        if let Some(e) = self.damaged.get() {
            // Nothing is written over a damaged log; `is_failing` already reports it, and the
            // scrub logged it once (a commit that writes nothing is not a new failure).
            for (_, _, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
            return Ok(());
        }
        let (saved_seq, saved_hash, saved_since) =
            (self.seq, self.hash.clone(), self.since_checkpoint);
        let saved_tree = self.tree.clone();
        let saved_log = self.log.tree.clone();
        self.chain_pending.clear();
        self.completed.clear();
        self.pending_head = None;
        self.log.rows.clear();
        self.log.completed.clear();
        self.log.pending_head = None;
        let mut store_scope = false;
        let mut written = Vec::with_capacity(batch.len());
        let mut result: Result<(), AuditError> = Ok(());
        let mut chain_open = false;
        if let Some(chain) = self.store.kv().chain() {
            // Continue from the head as the database has it: another replica may have moved it.
            match chain.begin() {
                Ok((seq, hash)) => {
                    chain_open = true;
                    if seq != self.seq || hash != self.hash {
                        // Another replica appended: its entries are committed; the tree takes
                        // them in (read once, one range), or is rebuilt if out of step.
                        let from = self.seq;
                        (self.seq, self.hash) = (seq, hash);
                        self.catch_up_tree(from);
                    }
                }
                Err(e) => result = Err(e.into()),
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        for (rec, scope, reply) in batch {
            store_scope |= scope == Scope::Store;
            replies.push(reply);
            if result.is_ok() {
                match self.append(rec) {
                    Ok(r) => {
                        written.push(r);
                        self.since_checkpoint += 1;
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        let due = self.since_checkpoint >= self.settings.checkpoint_every;
        if result.is_ok()
            && (due || checkpointing != Checkpointing::IfDue)
            && self.since_checkpoint > 0
        {
            // An idle checkpoint is a good moment to move everything into the store; one that
            // falls due under load is journaled like the entries it covers.
            store_scope |= checkpointing == Checkpointing::Now;
            result = self.checkpoint();
        }
        let attempted = self.seq;
        if result.is_ok() {
            // A shared chain commits its transaction here whatever `durable` says.
            result = self.make_durable(store_scope);
            chain_open = false;
        }
        if chain_open && let Some(chain) = self.store.kv().chain() {
            chain.rollback();
        }
        // The stored bytes go back with each entry (checkpoints' entries, which nobody asked
        // for, are skipped by seq).
        let mut sealed = std::mem::take(&mut self.chain_pending)
            .into_iter()
            .peekable();
        match &result {
            Ok(()) => {
                let _ = self.head.send(self.seq);
                // Both logs' new nodes in one store call (one statement on a database).
                if let Err(e) = merkle::store_completed(
                    &self.store,
                    &[
                        (Log::Audit, &self.completed),
                        (Log::Transparency, &self.log.completed),
                    ],
                ) {
                    // Only a cache: a missing node is recomputed when a proof needs it.
                    tracing::warn!(error = %e, "audit and transparency Merkle nodes not stored");
                }
                self.completed.clear();
                self.log.completed.clear();
                if let Some(h) = self.pending_head.take() {
                    let _ = self.signed_head.send(Some(h));
                }
                self.log.rows.clear();
                self.log.publish();
                if let Some(h) = self.log.pending_head.take() {
                    let _ = self.log.signed.send(Some(h));
                }
                if let Some(j) = &self.journal {
                    self.metrics
                        .journal_bytes
                        .store(j.len(), std::sync::atomic::Ordering::Relaxed);
                }
                for rec in &written {
                    self.metrics
                        .decision(&rec.rpc, &rec.environment, &rec.decision, &rec.reason);
                }
                for (reply, rec) in replies.into_iter().zip(written) {
                    let bytes = loop {
                        match sealed.next_if(|(seq, _)| *seq <= rec.seq) {
                            Some((seq, bytes)) if seq == rec.seq => break bytes,
                            Some(_) => continue,
                            None => break rec.entry_bytes(),
                        }
                    };
                    let _ = reply.send(Ok((rec, bytes)));
                }
            }
            Err(e) => {
                self.metrics
                    .store_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Roll the head back and take the batch's entries out of the store: the next
                // batch continues from the last acknowledged entry, never from one of these.
                if !self.shared && attempted > saved_seq {
                    self.unput(saved_seq, attempted);
                }
                self.seq = saved_seq;
                self.hash = saved_hash;
                self.since_checkpoint = saved_since;
                self.tree = saved_tree;
                self.completed.clear();
                self.pending_head = None;
                self.log.tree = saved_log;
                self.log.rows.clear();
                self.log.completed.clear();
                self.log.pending_head = None;
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        result
    }
}
