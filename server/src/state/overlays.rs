//! What ops changed, kept in the store and laid over the file configuration at start and on
//! every reload, so a SIGHUP never undoes an ops action.
//!
//! Owns: [`PolicyOverlay`] (`Policies` tree), [`KeyMeta`] (`KeyMeta` tree), and
//! [`effective_config`]. Must not touch: validation of ops input (`ops`), the file (`config`).

use serde::{Deserialize, Serialize};

use super::{SiteState, StateError};
use crate::config::{KeySpec, SiteConfig, TrustPolicy};
use crate::identity::jwt::Jwks;
use crate::model::{AccessRule, KeyAlgorithm, Purpose, default_purposes};
use crate::store::{Store, StoreError, Tree};

/// Ops state of a trust policy, overlaid on the file configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyOverlay {
    /// Enabled?
    pub enabled: bool,
    /// When disabled, may its certificates keep signing?
    pub keep_sessions: bool,
    /// A JWKS pinned by ops, replacing the file's.
    pub jwks_json: Option<String>,
}

/// Ops state of a signing key alias.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Algorithm.
    pub algorithm: KeyAlgorithm,
    /// Access rule (used when the alias is not in the file).
    pub access: AccessRule,
    /// Disabled?
    pub disabled: bool,
    /// Purposes (used when the alias is not in the file).
    #[serde(default = "default_purposes")]
    pub purposes: Vec<Purpose>,
    /// Where new versions are generated (used when the alias is not in the file).
    #[serde(default)]
    pub backend: crate::custody::Backend,
    /// An imported App Store Connect key's identity (used when the alias is not in the file).
    #[serde(default)]
    pub asc: Option<crate::model::AscIdentity>,
}

fn policy_key(environment: &str, policy: &str) -> String {
    format!("{environment}/{policy}")
}

/// The file configuration with the store's ops overlays applied.
pub fn effective_config(mut cfg: SiteConfig, store: &Store) -> Result<SiteConfig, StateError> {
    for p in cfg.environments.iter_mut() {
        for pol in p.trust_policies.iter_mut() {
            let key = policy_key(&p.name, &pol.name);
            if let Some(o) = store.get::<PolicyOverlay>(Tree::Policies, key.as_bytes())? {
                pol.enabled = o.enabled;
                pol.keep_sessions = o.keep_sessions;
                if let Some(j) = &o.jwks_json {
                    pol.jwks = Jwks::parse(j.as_bytes())
                        .map_err(|message| StateError::Overlay { key, message })?;
                }
            }
        }
        let metas = store
            .kv()
            .scan_prefix(Tree::KeyMeta, format!("{}/", p.name).as_bytes())?;
        for (k, v) in metas {
            let alias = String::from_utf8_lossy(&k[p.name.len() + 1..]).into_owned();
            let meta: KeyMeta = serde_json::from_slice(&v).map_err(|e| StateError::Overlay {
                key: format!("{}/{alias}", p.name),
                message: e.to_string(),
            })?;
            match p.signing_keys.iter_mut().find(|s| s.alias == alias) {
                Some(spec) => spec.disabled = meta.disabled,
                None => p.signing_keys.push(KeySpec {
                    alias,
                    algorithm: meta.algorithm,
                    access: meta.access,
                    disabled: meta.disabled,
                    purposes: meta.purposes,
                    budget: p.budget,
                    allowed_digests: None,
                    backend: meta.backend,
                    asc: meta.asc,
                }),
            }
        }
    }
    Ok(cfg)
}

impl SiteState {
    /// Stores a trust policy's ops state durably (a `jwks_json` of None keeps the pinned one).
    pub fn save_policy_overlay(
        &self,
        environment: &str,
        policy: &TrustPolicy,
        jwks_json: Option<String>,
    ) -> Result<(), StoreError> {
        let key = policy_key(environment, &policy.name);
        let prev: Option<PolicyOverlay> = self.store.get(Tree::Policies, key.as_bytes())?;
        let overlay = PolicyOverlay {
            enabled: policy.enabled,
            keep_sessions: policy.keep_sessions,
            jwks_json: jwks_json.or(prev.and_then(|p| p.jwks_json)),
        };
        self.store.put(Tree::Policies, key.as_bytes(), &overlay)?;
        self.store.flush()
    }

    /// Stores a key alias's ops state durably.
    pub fn save_key_meta(&self, environment: &str, spec: &KeySpec) -> Result<(), StoreError> {
        let meta = KeyMeta {
            algorithm: spec.algorithm,
            access: spec.access.clone(),
            disabled: spec.disabled,
            purposes: spec.purposes.clone(),
            backend: spec.backend,
            asc: spec.asc.clone(),
        };
        self.store.put(
            Tree::KeyMeta,
            format!("{environment}/{}", spec.alias).as_bytes(),
            &meta,
        )?;
        self.store.flush()
    }
}
