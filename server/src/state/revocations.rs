//! Revocation rules in force: kept in the store, held in memory, checked on every RPC.
//!
//! Owns: the `Revocations` tree. Must not touch: who may add a rule (`ops`).

use super::SiteState;
use crate::model::{CertRecord, RevocationRule};
use crate::store::{Store, StoreError, Tree};

/// Loads every rule.
pub fn load(store: &Store) -> Result<Vec<RevocationRule>, StoreError> {
    store.scan(Tree::Revocations, b"")
}

impl SiteState {
    /// Why a certificate is revoked (by its holder or by a rule), if it is.
    pub fn revocation_of(&self, c: &CertRecord) -> Option<String> {
        if let Some(r) = &c.revoked {
            return Some(r.clone());
        }
        self.revocations()
            .iter()
            .find(|r| r.matches(c))
            .map(|r| format!("{}: {}", r.id, r.reason))
    }

    /// The rule that bars a new enrollment of this job, pipeline or runner, if any.
    pub fn enrollment_barred(
        &self,
        job_id: &str,
        pipeline_id: &str,
        fingerprint: &str,
    ) -> Option<RevocationRule> {
        let region = self.config().region.clone();
        self.revocations()
            .iter()
            .find(|r| r.bars_enrollment(&region, job_id, pipeline_id, fingerprint))
            .cloned()
    }

    /// Stores a rule durably and puts it in force at once — here, and at the other replicas of
    /// a shared store on their next refresh.
    pub fn add_revocation(&self, rule: RevocationRule) -> Result<(), StoreError> {
        self.store
            .put(Tree::Revocations, rule.id.as_bytes(), &rule)?;
        self.changed()?;
        self.store.flush()?;
        let mut rules = (*self.revocations()).clone();
        rules.push(rule);
        self.set_revocations(rules);
        Ok(())
    }
}
