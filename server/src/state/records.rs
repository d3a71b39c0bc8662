//! What ops keep, kept by the state: every record an ops change reads or writes goes through
//! a method here, so `ops` never names the store, a tree or a key layout (CI checks it:
//! `.ci/layercheck.py`). The record types are ops' own (proposals, policy marks, distrust
//! lists): these methods are generic over them and fix only where each kind lives.

use serde::{Serialize, de::DeserializeOwned};

use super::{SiteState, StateError};
use crate::ca::{CaError, RunnerCa, RunnerCaRecord, RunnerCaState};
use crate::custody::{Backend, CustodyError, KeyRecord, SigningBackend, pkcs11::Pkcs11Ref};
use crate::model::KeyAlgorithm;
use crate::store::{StoreError, Tree};

/// A kind of small record ops keep in the site's meta tree, by the id ops give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meta {
    /// A two-person review proposal, by proposal id.
    Proposal,
    /// Who disabled a trust policy and when, by `environment/issuer`.
    PolicyDisabledBy,
    /// The last change to a trust policy, by `environment/issuer`.
    PolicyLastChange,
    /// The audit retention an admin set (one record, id `""`).
    AuditRetention,
    /// A registered runner (device key), by fingerprint.
    Runner,
}

impl Meta {
    fn prefix(self) -> &'static str {
        match self {
            Meta::Proposal => "proposal/",
            Meta::PolicyDisabledBy => "policy-disabled/",
            Meta::PolicyLastChange => "policy-changed/",
            Meta::AuditRetention => "audit/retention_days",
            Meta::Runner => "runner/",
        }
    }

    fn key(self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.prefix()).into_bytes()
    }
}

impl SiteState {
    /// Reads a meta record.
    pub fn meta<T: DeserializeOwned>(&self, kind: Meta, id: &str) -> Result<Option<T>, StoreError> {
        self.store.get(Tree::Meta, &kind.key(id))
    }

    /// Reads a meta record with the bytes it was decoded from (for [`Self::update_meta`]).
    pub fn meta_raw<T: DeserializeOwned>(
        &self,
        kind: Meta,
        id: &str,
    ) -> Result<Option<(T, Vec<u8>)>, StoreError> {
        self.store.get_raw(Tree::Meta, &kind.key(id))
    }

    /// Every meta record of a kind, in id order.
    pub fn metas<T: DeserializeOwned>(&self, kind: Meta) -> Result<Vec<T>, StoreError> {
        self.store.scan(Tree::Meta, kind.prefix().as_bytes())
    }

    /// Writes a meta record.
    pub fn put_meta<T: Serialize>(&self, kind: Meta, id: &str, v: &T) -> Result<(), StoreError> {
        self.store.put(Tree::Meta, &kind.key(id), v)
    }

    /// Writes a meta record only if its stored bytes are still `old`: the store's conditional
    /// update, which holds a guarantee two replicas share (an approval used once). False if
    /// another writer got there first.
    pub fn update_meta<T: Serialize>(
        &self,
        kind: Meta,
        id: &str,
        old: &[u8],
        v: &T,
    ) -> Result<bool, StoreError> {
        self.store.update(Tree::Meta, &kind.key(id), old, v)
    }

    /// Writes a meta record only if none is stored under its id (the store's conditional
    /// insert); false if one is.
    pub fn insert_meta<T: Serialize>(
        &self,
        kind: Meta,
        id: &str,
        v: &T,
    ) -> Result<bool, StoreError> {
        self.store.insert_new(Tree::Meta, &kind.key(id), v)
    }

    /// Removes a meta record.
    pub fn remove_meta(&self, kind: Meta, id: &str) -> Result<(), StoreError> {
        self.store.kv().remove(Tree::Meta, &kind.key(id))
    }

    /// The stored distrust list of an environment.
    pub fn distrust_list<T: DeserializeOwned>(&self, env: &str) -> Result<Option<T>, StoreError> {
        self.store.get(Tree::Distrust, env.as_bytes())
    }

    /// Stores the distrust list of an environment.
    pub fn put_distrust_list<T: Serialize>(&self, env: &str, v: &T) -> Result<(), StoreError> {
        self.store.put(Tree::Distrust, env.as_bytes(), v)
    }

    /// The stored key records of `environment/alias` (every version), or of the whole site.
    pub fn key_records(&self, of: Option<(&str, &str)>) -> Result<Vec<KeyRecord>, StoreError> {
        let prefix = of.map_or(String::new(), |(env, alias)| format!("{env}/{alias}/"));
        self.store.scan(Tree::Keys, prefix.as_bytes())
    }

    /// Rewrites a key record (its certificate chain) and makes it durable.
    pub fn save_key_record(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.store
            .put(Tree::Keys, &KeyRecord::store_key_of(record), record)?;
        self.store.flush()
    }

    /// Makes `alias@v{version}` (software under the KEK, or in the token) and stores it.
    pub fn create_key_version(
        &self,
        (env, alias, version): (&str, &str, u32),
        how: (KeyAlgorithm, Backend),
    ) -> Result<KeyRecord, CustodyError> {
        let now = self.clock.unix();
        crate::custody::create_key(&self.store, &self.custodian, env, alias, how, version, now)
    }

    /// Stores an imported software key as `alias@v{version}`, wrapped under the KEK.
    pub fn store_imported_key(
        &self,
        (env, alias, version): (&str, &str, u32),
        backend: &dyn SigningBackend,
        pkcs8: &[u8],
    ) -> Result<KeyRecord, CustodyError> {
        let kek = &self.custodian.kek;
        let now = self.clock.unix();
        crate::custody::store_key(&self.store, kek, env, alias, version, backend, pkcs8, now)
    }

    /// Records a key imported into the token as `alias@v{version}`.
    pub fn store_token_key(
        &self,
        at: (&str, &str, u32),
        algorithm: KeyAlgorithm,
        r: Pkcs11Ref,
        spki: Vec<u8>,
    ) -> Result<KeyRecord, CustodyError> {
        let now = self.clock.unix();
        crate::custody::store_token_key(&self.store, at, algorithm, r, spki, now)
    }

    /// Reloads one alias's versions from the store into the running key ring.
    pub fn reload_key_alias(&self, env: &str, alias: &str) -> Result<(), CustodyError> {
        let mut ring = (*self.keys()).clone();
        ring.reload_alias(&self.store, &self.custodian, env, alias)?;
        self.set_keys(ring);
        Ok(())
    }

    /// Makes a runner CA for `env` in `state` and stores it wrapped under the KEK.
    pub fn create_runner_ca(&self, env: &str, state: RunnerCaState) -> Result<RunnerCa, CaError> {
        let cfg = self.config();
        let now = self.clock.unix();
        RunnerCa::create(
            &self.store,
            &self.custodian,
            &cfg.trust_domain,
            &cfg.region,
            env,
            state,
            now,
        )
    }

    /// Stores a runner CA record (its new state) and makes it durable.
    pub fn save_runner_ca(&self, rec: &RunnerCaRecord) -> Result<(), StoreError> {
        self.store.put(Tree::RunnerCas, &rec.store_key(), rec)?;
        self.store.flush()
    }

    /// Lays the store's ops overlays over `file` and loads (or creates) its keys: what a
    /// reload swaps in.
    pub fn load_over(
        &self,
        file: crate::config::SiteConfig,
    ) -> Result<(crate::config::SiteConfig, super::KeyRing), StateError> {
        let cfg = super::overlays::effective_config(file, &self.store)?;
        let keys =
            super::KeyRing::load_or_create(&cfg, &self.store, &self.custodian, self.clock.unix())?;
        Ok((cfg, keys))
    }
}
