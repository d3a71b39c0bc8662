//! The key ring: every signing key of the site, decrypted once (at start, or when ops add a
//! version) from the records custody keeps. The state holds it; the sign path reads it.

use std::collections::BTreeMap;

use crate::config::SiteConfig;
use crate::custody::{Custodian, CustodyError, KeyRecord, LoadedKey, create_key, load_versions};
use crate::store::{Store, Tree};

/// Every signing key of the site, decrypted once (at start, or when ops add a version).
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    /// (environment, alias) → versions, oldest first.
    keys: BTreeMap<(String, String), Vec<LoadedKey>>,
}

impl KeyRing {
    /// Loads the configured keys, creating version 1 of any that does not exist yet.
    pub fn load_or_create(
        config: &SiteConfig,
        store: &Store,
        custodian: &Custodian,
        now_unix: i64,
    ) -> Result<Self, CustodyError> {
        let mut ring = Self::default();
        for p in &config.environments {
            for spec in &p.signing_keys {
                let prefix = format!("{}/{}/", p.name, spec.alias);
                let mut records: Vec<KeyRecord> = store.scan(Tree::Keys, prefix.as_bytes())?;
                if records.is_empty() {
                    records.push(create_key(
                        store,
                        custodian,
                        &p.name,
                        &spec.alias,
                        (spec.algorithm, spec.backend),
                        1,
                        now_unix,
                    )?);
                    tracing::info!(environment = %p.name, key_id = %format!("{}@v1", spec.alias), backend = spec.backend.as_str(), "created signing key");
                }
                let loaded = load_versions(custodian, records)?;
                ring.keys
                    .insert((p.name.clone(), spec.alias.clone()), loaded);
            }
        }
        Ok(ring)
    }

    /// Re-reads every version of one alias from the store (after ops add one).
    pub fn reload_alias(
        &mut self,
        store: &Store,
        custodian: &Custodian,
        environment: &str,
        alias: &str,
    ) -> Result<(), CustodyError> {
        let records: Vec<KeyRecord> =
            store.scan(Tree::Keys, format!("{environment}/{alias}/").as_bytes())?;
        self.keys.insert(
            (environment.to_string(), alias.to_string()),
            load_versions(custodian, records)?,
        );
        Ok(())
    }

    /// Every (environment, alias) and its versions.
    pub fn all(&self) -> impl Iterator<Item = (&(String, String), &Vec<LoadedKey>)> {
        self.keys.iter()
    }

    /// The version that signs now (the newest).
    pub fn active(&self, environment: &str, alias: &str) -> Option<&LoadedKey> {
        self.keys
            .get(&(environment.to_string(), alias.to_string()))?
            .last()
    }

    /// Every version, oldest first.
    pub fn versions(&self, environment: &str, alias: &str) -> Option<&[LoadedKey]> {
        self.keys
            .get(&(environment.to_string(), alias.to_string()))
            .map(Vec::as_slice)
    }
}
