//! Issuance records: written at enrollment, read by every sign-port RPC, changed only when
//! their holder revokes them or a renewal supersedes them; and each session's head — which
//! certificate holds it — changed only by a conditional write, so replicas agree on it.
//!
//! Owns: the `Certs` tree and [`CertCache`]. Must not touch: policy (what a record allows is
//! `sign::checks`), revocation rules (`state::revocations`).

use std::collections::HashMap;
use std::sync::Arc;

use super::SiteState;
use crate::model::{CertRecord, bounded};
use crate::store::{StoreError, Tree};

/// Issuance records the per-RPC checks have read, so a connection's every Sign does not read
/// and decode the same record from the store. A record changes after issuance only when its
/// holder revokes it (`RevokeSelf`); that bumps `generation` and drops the entry, and a read
/// that raced with it is not cached (it compares the generation it started with). Every other
/// revocation is an in-memory rule checked per RPC as before.
#[derive(Debug, Default)]
pub struct CertCache {
    generation: u64,
    records: HashMap<String, Arc<CertRecord>>,
}

impl CertCache {
    /// Entries kept before the cache starts over.
    const MAX: usize = 8192;

    /// The cached record and, on a miss, the generation to pass to [`CertCache::insert`].
    pub fn get(&self, serial: &str) -> Result<Arc<CertRecord>, u64> {
        self.records.get(serial).cloned().ok_or(self.generation)
    }

    /// Caches a record read from the store at `generation` (ignored if a change came since).
    pub fn insert(&mut self, generation: u64, record: Arc<CertRecord>) {
        if generation != self.generation {
            return;
        }
        if self.records.len() >= Self::MAX {
            self.records.clear();
        }
        self.records.insert(record.serial.clone(), record);
    }

    /// The record of `serial` changed in the store.
    pub fn invalidate(&mut self, serial: &str) {
        self.generation += 1;
        self.records.remove(serial);
    }
}

/// A session's head in the store (`meta` tree, `session/<id>`): which certificate holds it.
/// Written only by conditional updates ([`SiteState::advance_session`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct SessionHead {
    /// 0 for the enrolled certificate, +1 per renewal.
    generation: u32,
    /// The serial of the certificate that holds the session now.
    serial: String,
}

fn session_key(session: &str) -> Vec<u8> {
    format!("session/{session}").into_bytes()
}

impl SiteState {
    fn cert_cache(&self) -> std::sync::MutexGuard<'_, CertCache> {
        self.cert_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The issuance record of `serial` (None: this site never issued it), from the cache or
    /// the store.
    pub fn issuance_record(&self, serial: &str) -> Result<Option<Arc<CertRecord>>, StoreError> {
        let generation = match self.cert_cache().get(serial) {
            Ok(record) => return Ok(Some(record)),
            Err(generation) => generation,
        };
        let Some(record) = self
            .store
            .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
        else {
            return Ok(None);
        };
        let record = Arc::new(record);
        self.cert_cache().insert(generation, record.clone());
        Ok(Some(record))
    }

    /// Records a newly issued certificate (made durable with its audit entry) and watches it
    /// until its notAfter (`state::sessions`: a session that ends unrenewed and unrevoked is
    /// counted as abandoned).
    pub fn record_issued(&self, record: &CertRecord) -> Result<(), StoreError> {
        self.store
            .put(Tree::Certs, record.serial.as_bytes(), record)?;
        self.watch_expiry(record)
    }

    /// Marks a certificate revoked by its holder; false if this site never issued it.
    pub fn revoke_by_holder(&self, serial: &str, reason: &str) -> Result<bool, StoreError> {
        let Some(mut rec) = self
            .store
            .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
        else {
            return Ok(false);
        };
        rec.revoked = Some(format!("revoked by its holder: {}", bounded(reason, 200)));
        self.store.put(Tree::Certs, serial.as_bytes(), &rec)?;
        self.cert_cache().invalidate(serial);
        self.changed()?;
        self.store.flush()?;
        Ok(true)
    }

    /// Marks a certificate superseded by a renewal (durably; the cache forgets it).
    pub fn supersede(&self, serial: &str) -> Result<(), StoreError> {
        if let Some(mut rec) = self
            .store
            .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
        {
            rec.superseded = true;
            self.store.put(Tree::Certs, serial.as_bytes(), &rec)?;
            self.cert_cache().invalidate(serial);
            self.changed()?;
        }
        Ok(())
    }

    /// Moves the session of `record` (its current certificate) on to `next_serial`, one
    /// generation up, by a conditional write in the store: of two renewals of the same
    /// certificate — at one replica or two — exactly one moves it; the other gets false (and
    /// must treat its caller's certificate as a copy). The first renewal of a session inserts
    /// its head; every later one compare-and-swaps it.
    pub fn advance_session(
        &self,
        record: &CertRecord,
        next_serial: &str,
    ) -> Result<bool, StoreError> {
        let key = session_key(record.session_id());
        let next = SessionHead {
            generation: record.generation.saturating_add(1),
            serial: next_serial.to_string(),
        };
        match self.store.get_raw::<SessionHead>(Tree::Meta, &key)? {
            None if record.superseded => Ok(false),
            None => self.store.insert_new(Tree::Meta, &key, &next),
            Some((head, raw)) => {
                if head.serial != record.serial || head.generation != record.generation {
                    return Ok(false);
                }
                self.store.update(Tree::Meta, &key, &raw, &next)
            }
        }
    }

    /// The issuance record of `serial` read from the store (never the cache), and whether it
    /// still holds its session: not superseded, and the session's head (if it was ever
    /// renewed) names it. For calls that must see a renewal made at another replica a moment
    /// ago (`RevokeSelf`).
    pub fn session_holder(&self, serial: &str) -> Result<Option<(CertRecord, bool)>, StoreError> {
        let Some(record) = self
            .store
            .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
        else {
            return Ok(None);
        };
        let head: Option<SessionHead> = self
            .store
            .get(Tree::Meta, &session_key(record.session_id()))?;
        let holds = !record.superseded
            && head.is_none_or(|h| h.serial == record.serial && h.generation == record.generation);
        Ok(Some((record, holds)))
    }

    /// Removes the head of `record`'s session if it names `record` (its last certificate). For
    /// records long expired only: nothing can move such a head any more (a renewal needs the
    /// certificate it names to be valid), so no other writer races the removal.
    pub(super) fn forget_session_head(&self, record: &CertRecord) -> Result<(), StoreError> {
        let key = session_key(record.session_id());
        if let Some(head) = self.store.get::<SessionHead>(Tree::Meta, &key)?
            && head.serial == record.serial
        {
            self.store.kv().remove(Tree::Meta, &key)?;
        }
        Ok(())
    }

    /// Drops `serial` from the issuance-record cache (its record was removed).
    pub(super) fn forget_cached(&self, serial: &str) {
        self.cert_cache().invalidate(serial);
    }

    /// Every issuance record: a read of the site's whole history (snapshots, tests); requests
    /// and scrapes read the expiry index instead (`state::sessions`).
    pub fn issued_certificates(&self) -> Result<Vec<CertRecord>, StoreError> {
        self.store.scan(Tree::Certs, b"")
    }
}
