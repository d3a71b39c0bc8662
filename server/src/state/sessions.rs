//! Sessions that end badly (issue 31): a session whose current certificate reaches its
//! notAfter neither renewed (superseded) nor revoked — by its holder (`RevokeSelf`) or a
//! revocation rule — was abandoned: the runner stopped renewing (cut off from its site, killed,
//! out of time) and never said goodbye. Every abandoned session is counted once per site
//! (`meshsign_sessions_abandoned_total{environment}`, alert `MeshsignSessionsAbandoned`) and
//! shown in `admin status` for the last hour.
//!
//! Owns: the `due/` and `abandoned/` keys of the `meta` tree. Must not touch: the issuance
//! records (read only here), the metrics' rendering.
//!
//! How it stays cheap and exact across replicas:
//! - each issuance writes `due/<notAfter>/<serial>` (notAfter as 16 hex digits, so keys sort by
//!   time); housekeeping reads them in notAfter order from the start and stops at the first one
//!   still valid, in bounded steps — never a scan of all issuance records;
//! - a due certificate that was abandoned is claimed by inserting `abandoned/<notAfter>/<serial>`
//!   if absent (a conditional write in the store): of two replicas sweeping at once, exactly
//!   one counts it. The `due/` key is removed after, so a crash between the two steps is
//!   retried and finds the claim;
//! - `abandoned/` keys older than [`KEEP_ABANDONED_SECONDS`] are pruned the same way.
//!
//! Issuance records are not kept forever (issue 30: at a million certificates they were most of
//! the store). A swept certificate's `due/` key becomes `expired/<notAfter>/<serial>`, and once
//! its notAfter is [`KEEP_EXPIRED_RECORDS_SECONDS`] behind, the same bounded steps remove its
//! record (and its session's head, if it names it). Nothing needs it by then: an expired
//! certificate fails the TLS handshake before any record is read, and the audit log keeps
//! every issuance (its `Enroll`/`Renew` entry names serial, job, fingerprint and claims).
//!
//! The same `due/` keys name every live certificate (issue 30): the ones whose notAfter is still
//! ahead. What needs live certificates — `meshsign_certificates_live`, the matches a new
//! revocation reports, when a retiring runner CA's last certificate ends — reads those
//! ([`SiteState::live_certificates`]): a cost in the live population, never in the history of
//! every certificate the site issued. A store written before the index existed gets it once, at
//! the first start ([`SiteState::ensure_due_index`]).

use std::collections::BTreeMap;

use super::SiteState;
use crate::model::CertRecord;
use crate::store::{StoreError, Tree};

/// Due certificates looked at per step of a housekeeping pass.
pub const SWEEP_BATCH: usize = 512;

/// Steps per housekeeping pass (every 10 s): up to 4,096 expired certificates a pass, about
/// 400 a second; the rest wait for the next pass.
pub const SWEEP_BATCHES: usize = 8;

/// How long the claim of an abandoned session is kept (what `admin status` can count from).
pub const KEEP_ABANDONED_SECONDS: i64 = 7 * 86_400;

/// How long an issuance record is kept after its certificate's notAfter (see the module docs).
pub const KEEP_EXPIRED_RECORDS_SECONDS: i64 = 30 * 86_400;

const EXPIRED: &str = "expired/";

const DUE: &str = "due/";
/// `meta` key set once every issuance record has its `due/` key (a store from before the index).
const DUE_INDEX_BUILT: &[u8] = b"index/due-v1";
/// Most live certificates read at once (far above any fleet's; a guard, not a limit in use).
const MAX_LIVE: usize = 4_000_000;
/// `due/` keys read per page by [`SiteState::unexpired_certificates`].
const LIVE_PAGE: usize = 512;
const ABANDONED: &str = "abandoned/";

fn value_or_empty(v: Option<Vec<u8>>) -> Vec<u8> {
    v.unwrap_or_default()
}

fn timed_key(prefix: &str, at: i64, serial: &str) -> Vec<u8> {
    format!("{prefix}{:016x}/{serial}", at.max(0)).into_bytes()
}

/// (time, serial) of a `prefix<time>/<serial>` key.
fn parse_timed(prefix: &str, key: &[u8]) -> Option<(i64, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let (at, serial) = rest.split_once('/')?;
    Some((i64::from_str_radix(at, 16).ok()?, serial.to_string()))
}

/// What one sweep found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Due certificates looked at.
    pub looked_at: usize,
    /// Sessions this replica counted as abandoned (environment, serial).
    pub abandoned: Vec<(String, String)>,
    /// Issuance records removed, their certificates [`KEEP_EXPIRED_RECORDS_SECONDS`] expired.
    pub records_removed: usize,
}

impl SiteState {
    /// Watches the certificate `record` until its notAfter (called when it is issued).
    pub(crate) fn watch_expiry(&self, record: &CertRecord) -> Result<(), StoreError> {
        self.store.kv().put(
            Tree::Meta,
            &timed_key(DUE, record.not_after, &record.serial),
            record.environment.as_bytes(),
        )
    }

    /// Looks at certificates whose notAfter has passed (at most `batch`), counts the
    /// abandoned sessions among them this replica is first to claim, and forgets the rest.
    pub fn sweep_abandoned(&self, batch: usize) -> Result<Sweep, StoreError> {
        let now = self.clock.unix();
        let kv = self.store.kv();
        let mut sweep = Sweep::default();
        let rules = self.revocations();
        for (key, _) in kv.scan_range(Tree::Meta, DUE.as_bytes(), batch)? {
            let Some((not_after, serial)) = parse_timed(DUE, &key) else {
                break; // past the `due/` keys
            };
            if not_after > now {
                break;
            }
            sweep.looked_at += 1;
            let record = self
                .store
                .get::<CertRecord>(Tree::Certs, serial.as_bytes())?;
            let abandoned = record.filter(|r| {
                r.revoked.is_none() && !r.superseded && !rules.iter().any(|rule| rule.matches(r))
            });
            if let Some(r) = abandoned {
                let claim = timed_key(ABANDONED, not_after, &serial);
                if kv.insert_new(Tree::Meta, &claim, r.environment.as_bytes())? {
                    self.metrics.session_abandoned(&r.environment);
                    // The job id came from a token: bounded and escaped for the log line.
                    let job_id = crate::model::bounded(&r.claims.job_id, 128);
                    tracing::warn!(
                        environment = %crate::model::log_safe(&r.environment),
                        job_id = %crate::model::log_safe(&job_id),
                        serial = %r.serial,
                        session = %crate::model::log_safe(r.session_id()),
                        fingerprint = %crate::model::log_safe(&r.fingerprint),
                        "session abandoned: its certificate expired neither renewed nor revoked by its holder"
                    );
                    sweep
                        .abandoned
                        .push((r.environment.clone(), r.serial.clone()));
                }
            }
            // Watched on until its record is removed (a crash between the two: swept again).
            kv.put(
                Tree::Meta,
                &timed_key(EXPIRED, not_after, &serial),
                &value_or_empty(kv.get(Tree::Meta, &key)?),
            )?;
            kv.remove(Tree::Meta, &key)?;
        }
        self.prune_abandoned(now - KEEP_ABANDONED_SECONDS, batch)?;
        sweep.records_removed =
            self.prune_expired_records(now - KEEP_EXPIRED_RECORDS_SECONDS, batch)?;
        Ok(sweep)
    }

    /// Removes the issuance records (and the session heads naming them) of certificates whose
    /// notAfter is before `before` (at most `batch`); returns how many.
    pub fn prune_expired_records(&self, before: i64, batch: usize) -> Result<usize, StoreError> {
        let kv = self.store.kv();
        let mut removed = 0;
        for (key, _) in kv.scan_range(Tree::Meta, EXPIRED.as_bytes(), batch)? {
            let Some((at, serial)) = parse_timed(EXPIRED, &key) else {
                break; // past the `expired/` keys
            };
            if at >= before {
                break;
            }
            if let Some(r) = self
                .store
                .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
            {
                self.forget_session_head(&r)?;
                kv.remove(Tree::Certs, serial.as_bytes())?;
                self.forget_cached(&serial);
                removed += 1;
            }
            kv.remove(Tree::Meta, &key)?;
        }
        Ok(removed)
    }

    /// Every certificate whose notAfter is ahead and that neither a renewal superseded nor its
    /// holder revoked (revocation rules are the caller's to apply), from the `due/` index.
    pub fn live_certificates(&self) -> Result<Vec<CertRecord>, StoreError> {
        let mut all = self.unexpired_certificates()?;
        all.retain(|r| r.revoked.is_none() && !r.superseded);
        Ok(all)
    }

    /// Every certificate whose notAfter is ahead, superseded and revoked ones included (they
    /// still pass a TLS handshake until then), from the `due/` index.
    pub fn unexpired_certificates(&self) -> Result<Vec<CertRecord>, StoreError> {
        let now = self.clock.unix();
        let mut from = timed_key(DUE, now.saturating_add(1), "");
        let mut out = Vec::new();
        // In pages: the keys after the last `due/` one (`expired/`, kept for weeks) are not
        // read past the first.
        while out.len() < MAX_LIVE {
            let page = self.store.kv().scan_range(Tree::Meta, &from, LIVE_PAGE)?;
            let full = page.len() == LIVE_PAGE;
            // The page's records in one store call (on a database, one round trip instead of
            // one per certificate: the scrape's cost on PostgreSQL).
            let serials: Vec<Vec<u8>> = page
                .iter()
                .map_while(|(key, _)| parse_timed(DUE, key))
                .map(|(_, serial)| serial.as_bytes().to_vec())
                .collect();
            let past_index = serials.len() < page.len();
            let records = self.store.get_many::<CertRecord>(Tree::Certs, &serials)?;
            out.extend(records.into_iter().flatten());
            if past_index {
                return Ok(out);
            }
            match page.last() {
                Some((last, _)) if full => {
                    from = last.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Writes the `due/` key of every certificate still valid, once, for a store written before
    /// the index existed (the one full read of the issuance records, at the first start of
    /// this version; later starts read one key). Idempotent: replicas may both do it.
    pub fn ensure_due_index(&self) -> Result<usize, StoreError> {
        let kv = self.store.kv();
        if kv.get(Tree::Meta, DUE_INDEX_BUILT)?.is_some() {
            return Ok(0);
        }
        let now = self.clock.unix();
        let mut n = 0;
        for (_, raw) in kv.scan_prefix(Tree::Certs, b"")? {
            let Ok(r) = serde_json::from_slice::<CertRecord>(&raw) else {
                continue; // a record this version cannot read is reported where it is read
            };
            if r.not_after > now {
                self.watch_expiry(&r)?;
                n += 1;
            }
        }
        kv.put(Tree::Meta, DUE_INDEX_BUILT, b"1")?;
        Ok(n)
    }

    /// Removes claims older than `before` (at most `batch`).
    fn prune_abandoned(&self, before: i64, batch: usize) -> Result<(), StoreError> {
        let kv = self.store.kv();
        for (key, _) in kv.scan_range(Tree::Meta, ABANDONED.as_bytes(), batch)? {
            match parse_timed(ABANDONED, &key) {
                Some((at, _)) if at < before => kv.remove(Tree::Meta, &key)?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Sessions abandoned per environment whose certificate expired at `since` or later (from
    /// the store: every replica's), counting at most `limit`.
    pub fn abandoned_since(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<BTreeMap<String, u32>, StoreError> {
        let mut out = BTreeMap::new();
        let from = timed_key(ABANDONED, since, "");
        for (key, env) in self.store.kv().scan_range(Tree::Meta, &from, limit)? {
            if parse_timed(ABANDONED, &key).is_none() {
                break;
            }
            *out.entry(String::from_utf8_lossy(&env).into_owned())
                .or_insert(0u32) += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_and_parse_back() {
        let a = timed_key(DUE, 1_700_000_000, "ab01");
        let b = timed_key(DUE, 1_800_000_000, "00");
        assert!(a < b);
        assert_eq!(
            parse_timed(DUE, &a),
            Some((1_700_000_000, "ab01".to_string()))
        );
        assert_eq!(parse_timed(DUE, b"dux/1/2"), None);
        assert_eq!(parse_timed(ABANDONED, &a), None);
    }
}
