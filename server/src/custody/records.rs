//! Stored signing key versions: the record (public parts, where the private key is), and
//! storing a new version — wrapped under the KEK, or a reference into the PKCS#11 token.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Backend, Custodian, CustodyError, Kek, SigningBackend, Wrapped, backend_from_pkcs8, generate,
    key_aad, pkcs11,
};
use crate::model::KeyAlgorithm;
use crate::store::{Store, Tree, hex_bytes, hex_list};

// === key records and the key ring ===

/// A stored signing key version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Environment (stored under its earlier name, `partition`).
    pub partition: String,
    /// Alias.
    pub alias: String,
    /// Version, from 1.
    pub version: u32,
    /// Algorithm.
    pub algorithm: KeyAlgorithm,
    /// SubjectPublicKeyInfo, DER.
    #[serde(with = "hex_bytes")]
    pub public_key_der: Vec<u8>,
    /// Certificate chain (leaf first), if the key has one.
    #[serde(with = "hex_list", default)]
    pub certificate_chain: Vec<Vec<u8>>,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// The private key under the KEK (software keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<Wrapped>,
    /// Where the key is in the PKCS#11 token (token keys; nothing secret is stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<pkcs11::Pkcs11Ref>,
}

impl KeyRecord {
    /// `alias@vN`.
    pub fn key_id(&self) -> String {
        format!("{}@v{}", self.alias, self.version)
    }

    /// This record's key in the store.
    pub fn store_key_of(record: &KeyRecord) -> Vec<u8> {
        Self::store_key(&record.partition, &record.alias, record.version)
    }

    fn store_key(environment: &str, alias: &str, version: u32) -> Vec<u8> {
        format!("{environment}/{alias}/{version:010}").into_bytes()
    }
}

/// Wraps a private key (PKCS#8) under the KEK and stores it as `environment/alias@vN`.
#[allow(clippy::too_many_arguments)]
pub fn store_key(
    store: &Store,
    kek: &Kek,
    environment: &str,
    alias: &str,
    version: u32,
    backend: &dyn SigningBackend,
    pkcs8: &[u8],
    now_unix: i64,
) -> Result<KeyRecord, CustodyError> {
    let (nonce, ciphertext) = kek.wrap(&key_aad(environment, alias, version), pkcs8)?;
    let record = KeyRecord {
        partition: environment.to_string(),
        alias: alias.to_string(),
        version,
        algorithm: backend.algorithm(),
        public_key_der: backend.public_key_der().to_vec(),
        certificate_chain: Vec::new(),
        created_at: now_unix,
        wrapped: Some(Wrapped { nonce, ciphertext }),
        pkcs11: None,
    };
    put_new_version(store, &record)?;
    Ok(record)
}

/// Stores a new key version's record by a conditional insert: two replicas that both chose
/// `alias@vN` cannot both make it, and a signing key's record is never overwritten.
fn put_new_version(store: &Store, record: &KeyRecord) -> Result<(), CustodyError> {
    let key = KeyRecord::store_key(&record.partition, &record.alias, record.version);
    if !store.insert_new(Tree::Keys, &key, record)? {
        return Err(CustodyError::VersionTaken {
            slot: format!("{}/{}@v{}", record.partition, record.alias, record.version),
        });
    }
    store.flush()?;
    Ok(())
}

/// Loads every version of `environment/alias` (oldest first), creating v1 with `algorithm` if
/// there is none. Used for site-held keys outside the configuration (the audit key).
pub fn load_or_create_alias(
    store: &Store,
    custodian: &Custodian,
    environment: &str,
    alias: &str,
    (algorithm, backend): (KeyAlgorithm, Backend),
    now_unix: i64,
) -> Result<Vec<LoadedKey>, CustodyError> {
    let mut records: Vec<KeyRecord> =
        store.scan(Tree::Keys, format!("{environment}/{alias}/").as_bytes())?;
    if records.is_empty() {
        records.push(create_key(
            store,
            custodian,
            environment,
            alias,
            (algorithm, backend),
            1,
            now_unix,
        )?);
    }
    load_versions(custodian, records)
}

/// The `CKA_LABEL` of a key version in the token.
pub fn token_label(environment: &str, alias: &str, version: u32) -> String {
    format!("meshsign {environment}/{alias}@v{version}")
}

/// Stores the record of a key held in the token (its reference and public key; nothing
/// secret).
pub fn store_token_key(
    store: &Store,
    (environment, alias, version): (&str, &str, u32),
    algorithm: KeyAlgorithm,
    r: pkcs11::Pkcs11Ref,
    spki: Vec<u8>,
    now_unix: i64,
) -> Result<KeyRecord, CustodyError> {
    let record = KeyRecord {
        partition: environment.to_string(),
        alias: alias.to_string(),
        version,
        algorithm,
        public_key_der: spki,
        certificate_chain: Vec::new(),
        created_at: now_unix,
        wrapped: None,
        pkcs11: Some(r),
    };
    put_new_version(store, &record)?;
    Ok(record)
}

/// Generates a key — in the site, wrapped under the KEK (the plaintext never leaves memory), or
/// in the PKCS#11 token (it never leaves the token) — and stores its record.
pub fn create_key(
    store: &Store,
    custodian: &Custodian,
    environment: &str,
    alias: &str,
    (algorithm, where_): (KeyAlgorithm, Backend),
    version: u32,
    now_unix: i64,
) -> Result<KeyRecord, CustodyError> {
    if where_ == Backend::Pkcs11 {
        let token = custodian.token.as_ref().ok_or_else(|| {
            CustodyError::Token(format!(
                "key {alias} asks for backend pkcs11, and the site config has no [pkcs11]"
            ))
        })?;
        let (r, spki) = token.generate(algorithm, &token_label(environment, alias, version))?;
        return store_token_key(
            store,
            (environment, alias, version),
            algorithm,
            r,
            spki,
            now_unix,
        );
    }
    let (backend, pkcs8) = generate(algorithm)?;
    store_key(
        store,
        &custodian.kek,
        environment,
        alias,
        version,
        &*backend,
        &pkcs8,
        now_unix,
    )
}

/// A key version ready to sign.
#[derive(Clone)]
pub struct LoadedKey {
    /// Its stored record (public parts are served from here).
    pub record: Arc<KeyRecord>,
    /// The signer.
    pub backend: Arc<dyn SigningBackend>,
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey")
            .field("key_id", &self.record.key_id())
            .finish_non_exhaustive()
    }
}

/// Decrypts (or finds in the token) every version of `records`, each checked against its
/// stored public key.
pub fn load_versions(
    custodian: &Custodian,
    records: Vec<KeyRecord>,
) -> Result<Vec<LoadedKey>, CustodyError> {
    let mut loaded = Vec::new();
    for rec in records {
        let backend: Arc<dyn SigningBackend> = match (&rec.wrapped, &rec.pkcs11) {
            (Some(w), _) => {
                let pkcs8 = custodian.kek.unwrap(
                    &key_aad(&rec.partition, &rec.alias, rec.version),
                    &w.nonce,
                    &w.ciphertext,
                )?;
                backend_from_pkcs8(rec.algorithm, &pkcs8)?
            }
            (None, Some(r)) => {
                let token = custodian.token.as_ref().ok_or_else(|| {
                    CustodyError::Token(format!(
                        "key {} is in PKCS#11 token `{}`, and the site config has no [pkcs11]",
                        rec.key_id(),
                        r.token_label
                    ))
                })?;
                Arc::new(pkcs11::Pkcs11Key::load(token, r, rec.algorithm)?)
            }
            (None, None) => return Err(CustodyError::Unwrap { slot: rec.key_id() }),
        };
        if backend.public_key_der() != rec.public_key_der.as_slice() {
            return Err(CustodyError::Unwrap { slot: rec.key_id() });
        }
        loaded.push(LoadedKey {
            record: Arc::new(rec),
            backend,
        });
    }
    Ok(loaded)
}
