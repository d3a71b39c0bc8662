//! Signing budgets: how many signatures each job (environment + job id) obtained, per key and
//! per certificate, kept in the store so a budget holds across restarts and renewals.
//!
//! Owns: the counts and the check-and-count step. Must not touch: which budget applies (the
//! key's spec decides, `sign::checks` asks), the audit.
//!
//! Every signature is counted (so `admin usage` answers for any key); a key with a budget is
//! checked before it signs. The count is taken *before* the signature is made, so a crash
//! between the two over-counts (the caller loses a signature it never received) and never
//! under-counts. With a budget, the sign decision's audit entry is written with a store flush
//! (`AuditLog::record`), so the count is durable before the signature leaves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SiteState;
use crate::config::Budget;
use crate::store::{StoreError, Tree};

/// A job's signatures with one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Signatures made for the job with this key (digests: a batch of 100 counts 100).
    pub total: u64,
    /// The same, per runner certificate serial (hex).
    pub by_certificate: BTreeMap<String, u64>,
}

/// A job's signatures, per key alias.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

fn key(environment: &str, job_id: &str) -> Vec<u8> {
    format!("{environment}/{job_id}").into_bytes()
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

impl SiteState {
    /// A job's usage (empty if it never signed).
    pub fn job_usage(&self, environment: &str, job_id: &str) -> Result<JobUsage, StoreError> {
        Ok(self
            .store
            .get(Tree::Usage, &key(environment, job_id))?
            .unwrap_or_default())
    }

    /// Checks `charge` against `budget` and, if it fits, counts it. `Ok(Err(_))` is a refusal
    /// (nothing counted); `Err` a storage fault.
    pub fn charge(
        &self,
        charge: Charge<'_>,
        budget: &Budget,
    ) -> Result<Result<(), Exceeded>, StoreError> {
        let _guard = self.usage_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut usage = self.job_usage(charge.environment, charge.job_id)?;
        let k = usage.keys.entry(charge.alias.to_string()).or_default();
        let on_cert = k.by_certificate.get(charge.serial).copied().unwrap_or(0);
        for (scope, used, limit) in [
            ("job", k.total, budget.per_job),
            ("certificate", on_cert, budget.per_certificate),
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
        k.total = k.total.saturating_add(charge.items);
        k.by_certificate.insert(
            charge.serial.to_string(),
            on_cert.saturating_add(charge.items),
        );
        self.store
            .put(Tree::Usage, &key(charge.environment, charge.job_id), &usage)?;
        Ok(Ok(()))
    }
}
