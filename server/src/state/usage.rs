//! Signing budgets: how many signatures each job (environment + job id) obtained, per key and
//! per certificate, kept in the store so a budget holds across restarts and renewals.
//!
//! Owns: the counts and the check-and-count step. Must not touch: which budget applies (the
//! key's spec decides, `sign::checks` asks), the audit.
//!
//! Every signature is counted (so `admin usage` answers for any key).
//!
//! - A key **with a budget** is checked and counted in the store *before* it signs, so a crash
//!   between the two over-counts (the caller loses a signature it never received) and never
//!   under-counts; the sign decision's audit entry is then written with a store flush
//!   (`AuditLog::record`), so the count is durable before the signature leaves.
//! - A key **without a budget** is counted in memory and added to the store by housekeeping
//!   (every 10 s, and at shutdown): its counts are informational, and a crash can lose the last
//!   seconds of them — the audit log, which has every signature, stays the record. Counting
//!   those in the store on every Sign cost about a third more server CPU per Sign (measured with
//!   `meshsign-bench`, Sign @64).
//!
//! Layout (tree `usage`): `<environment>/<hex(job id)>/<alias>` → the job's total with the key,
//! `<environment>/<hex(job id)>/<alias>/<serial>` → that certificate's, each a big-endian u64.
//! Small values, and a lock per job shard, so unrelated jobs never wait for each other.

use std::collections::BTreeMap;

use super::SiteState;
use crate::config::Budget;
use crate::store::{StoreError, Tree};

/// Lock shards: jobs hash onto them, so unrelated jobs never wait for each other.
pub const SHARDS: usize = 64;

/// A job's signatures with one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Signatures made for the job with this key (digests: a batch of 100 counts 100).
    pub total: u64,
    /// The same, per runner certificate serial (hex).
    pub by_certificate: BTreeMap<String, u64>,
}

/// A job's signatures, per key alias.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobUsage {
    /// Alias → usage.
    pub keys: BTreeMap<String, KeyUsage>,
}

/// Which budget a request would exceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exceeded {
    /// `job` or `certificate`.
    pub scope: &'static str,
    /// Signatures already made in that scope.
    pub used: u64,
    /// This request's signatures.
    pub asked: u64,
    /// The budget.
    pub limit: u64,
}

fn job_prefix(environment: &str, job_id: &str) -> String {
    let mut k = String::with_capacity(environment.len() + 2 * job_id.len() + 2);
    push_job_prefix(&mut k, environment, job_id);
    k
}

/// Appends `<environment>/<hex of job_id>/` (a job's keys' prefix) to `out`.
fn push_job_prefix(out: &mut String, environment: &str, job_id: &str) {
    out.push_str(environment);
    out.push('/');
    meshsign_evidence::push_hex(out, job_id.as_bytes());
    out.push('/');
}

fn count(bytes: Option<Vec<u8>>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// What one signing request is charged to.
#[derive(Clone, Copy, Debug)]
pub struct Charge<'a> {
    /// Environment.
    pub environment: &'a str,
    /// Job id (the certificate serial when the provider gave none, so a job without an id is
    /// budgeted per certificate rather than pooled with every other).
    pub job_id: &'a str,
    /// Certificate serial, hex.
    pub serial: &'a str,
    /// Key alias.
    pub alias: &'a str,
    /// Signatures asked for.
    pub items: u64,
}

/// Counts of keys without a budget, not yet in the store, per lock shard.
#[derive(Debug)]
pub struct Pending {
    shards: [std::sync::Mutex<std::collections::HashMap<String, u64>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Default::default()),
            hasher: Default::default(),
        }
    }
}

impl Pending {
    fn shard(&self, environment: &str, job_id: &str) -> usize {
        use std::hash::BuildHasher as _;
        (self.hasher.hash_one((environment, job_id)) as usize) % SHARDS
    }
}

impl SiteState {
    /// A job's usage (empty if it never signed): the store's counts plus those not yet in it.
    pub fn job_usage(&self, environment: &str, job_id: &str) -> Result<JobUsage, StoreError> {
        let prefix = job_prefix(environment, job_id);
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (k, v) in self
            .store
            .kv()
            .scan_prefix(Tree::Usage, prefix.as_bytes())?
        {
            counts.insert(String::from_utf8_lossy(&k).into_owned(), count(Some(v)));
        }
        {
            let shard = self.usage.shard(environment, job_id);
            let pending = self.usage.shards[shard]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (k, n) in pending.iter().filter(|(k, _)| k.starts_with(&prefix)) {
                *counts.entry(k.clone()).or_default() += n;
            }
        }
        let mut usage = JobUsage::default();
        for (k, n) in counts {
            let rest = k[prefix.len()..].to_string();
            match rest.split_once('/') {
                None => usage.keys.entry(rest).or_default().total = n,
                Some((alias, serial)) => {
                    usage
                        .keys
                        .entry(alias.to_string())
                        .or_default()
                        .by_certificate
                        .insert(serial.to_string(), n);
                }
            }
        }
        Ok(usage)
    }

    /// Adds the in-memory counts to the store (housekeeping, shutdown). A count that cannot be
    /// written stays pending.
    pub fn persist_usage(&self) -> Result<usize, StoreError> {
        let kv = self.store.kv();
        let mut written = 0;
        for shard in &self.usage.shards {
            let mut pending = shard.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<String> = pending.keys().cloned().collect();
            for k in keys {
                let Some(&n) = pending.get(&k) else { continue };
                let stored = count(kv.get(Tree::Usage, k.as_bytes())?);
                kv.put(
                    Tree::Usage,
                    k.as_bytes(),
                    &stored.saturating_add(n).to_be_bytes(),
                )?;
                pending.remove(&k);
                written += 1;
            }
        }
        Ok(written)
    }

    /// Checks `charge` against `budget` and, if it fits, counts it. `Ok(Err(_))` is a refusal
    /// (nothing counted); `Err` a storage fault.
    pub fn charge(
        &self,
        charge: Charge<'_>,
        budget: &Budget,
    ) -> Result<Result<(), Exceeded>, StoreError> {
        // Both keys in one allocation each (a charge per signing request).
        let mut job_key = String::with_capacity(
            charge.environment.len() + 2 * charge.job_id.len() + charge.alias.len() + 2,
        );
        push_job_prefix(&mut job_key, charge.environment, charge.job_id);
        job_key.push_str(charge.alias);
        let mut cert_key = String::with_capacity(job_key.len() + 1 + charge.serial.len());
        cert_key.push_str(&job_key);
        cert_key.push('/');
        cert_key.push_str(charge.serial);
        let shard = self.usage.shard(charge.environment, charge.job_id);
        let mut pending = self.usage.shards[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !budget.is_limited() {
            for k in [job_key, cert_key] {
                *pending.entry(k).or_default() += charge.items;
            }
            return Ok(Ok(()));
        }
        // A key that gained its budget at a reload may still have counts in memory.
        let held = |k: &str| pending.get(k).copied().unwrap_or(0);
        let (held_job, held_cert) = (held(&job_key), held(&cert_key));
        let kv = self.store.kv();
        let on_job = count(kv.get(Tree::Usage, job_key.as_bytes())?);
        let on_cert = count(kv.get(Tree::Usage, cert_key.as_bytes())?);
        let (used_job, used_cert) = (on_job + held_job, on_cert + held_cert);
        for (scope, used, limit) in [
            ("job", used_job, budget.per_job),
            ("certificate", used_cert, budget.per_certificate),
        ] {
            if let Some(limit) = limit
                && used.saturating_add(charge.items) > limit
            {
                return Ok(Err(Exceeded {
                    scope,
                    used,
                    asked: charge.items,
                    limit,
                }));
            }
        }
        let add = |n: u64| n.saturating_add(charge.items).to_be_bytes();
        kv.put(Tree::Usage, job_key.as_bytes(), &add(used_job))?;
        kv.put(Tree::Usage, cert_key.as_bytes(), &add(used_cert))?;
        pending.remove(&job_key);
        pending.remove(&cert_key);
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    /// The stored keys are those of the plain formatting they replaced: counts a site wrote
    /// before are found after.
    #[test]
    fn job_keys_are_the_hex_of_the_job_id_under_the_environment() {
        for (env, job) in [("production", "12345"), ("", ""), ("staging", "ü/\u{0}x")] {
            assert_eq!(
                super::job_prefix(env, job),
                format!("{env}/{}/", hex::encode(job))
            );
        }
    }
}
