//! The site marker: a small file beside the store that says a site was created here, which one,
//! under which KEK, and with which audit key. A store can be lost or damaged in ways that look
//! like "empty" (a flipped byte in a segment header makes sled open a fresh database); the marker
//! is the witness that turns that into a refusal instead of a new site with new keys.
//!
//! Owns: `<data_dir>/site.json` and the site id in the store (`Meta`, `site/id`). Must not touch:
//! keys (the KEK check value is a wrap of a constant, never key material).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::custody::Kek;
use crate::store::{Store, StoreError, Tree};

/// The marker's file name in the data folder.
pub const MARKER_FILE: &str = "site.json";
/// Where the store keeps the site id.
pub const SITE_ID_KEY: &[u8] = b"site/id";
const KEK_CHECK_PLAINTEXT: &[u8] = b"meshsign kek check value";

/// What the marker records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SiteMarker {
    /// Format version (1).
    pub format: u32,
    /// Random id of the site, also in the store.
    pub site_id: String,
    /// Region at creation.
    pub region: String,
    /// Trust domain at creation.
    pub trust_domain: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `alias@vN` of the audit key.
    pub audit_key_id: String,
    /// SHA-256 (hex) of the audit key's SPKI.
    pub audit_key_sha256: String,
    /// AES-256-GCM of a constant under the KEK (nonce, ciphertext; hex): proves a KEK is the
    /// site's without touching any key record.
    pub kek_check_nonce: String,
    /// See `kek_check_nonce`.
    pub kek_check: String,
    /// Every key version and runner CA the site holds: slot (`key:<env>/<alias>@v<n>`,
    /// `ca:<env>/<id>`) → SHA-256 of its public key or certificate. Rewritten whenever one is
    /// added; a start that finds one missing from the store refuses instead of creating anew.
    #[serde(default)]
    pub holds: std::collections::BTreeMap<String, String>,
}

/// Why a marker cannot be read or does not match.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// The file exists but cannot be read or parsed.
    #[error(
        "site marker {path}: {message}; it is written by meshsignd when the site is created \
             — restore it from a backup, or move it away only if this data folder is not a site"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file could not be written.
    #[error("site marker {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The KEK does not open the marker's check value.
    #[error(
        "wrong KEK: {kek_file} is not the key-encryption key of site {site_id} (its check value \
             in {marker} does not open); start with the KEK this site was created with"
    )]
    WrongKek {
        /// The KEK file given.
        kek_file: PathBuf,
        /// The site.
        site_id: String,
        /// The marker.
        marker: PathBuf,
    },
    /// The crypto library failed.
    #[error("kek check value: {0}")]
    Crypto(#[from] crate::custody::CustodyError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn aad(site_id: &str) -> String {
    format!("meshsign/kek-check/v1\0{site_id}")
}

impl SiteMarker {
    /// The marker's path in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MARKER_FILE)
    }

    /// A new marker for a site created now.
    pub fn new(
        site_id: &str,
        region: &str,
        trust_domain: &str,
        created_at: i64,
        audit_key: (&str, &[u8]),
        kek: &Kek,
    ) -> Result<Self, MarkerError> {
        let (nonce, ct) = kek.wrap(&aad(site_id), KEK_CHECK_PLAINTEXT)?;
        Ok(Self {
            format: 1,
            site_id: site_id.to_string(),
            region: region.to_string(),
            trust_domain: trust_domain.to_string(),
            created_at,
            audit_key_id: audit_key.0.to_string(),
            audit_key_sha256: spki_sha256(audit_key.1),
            kek_check_nonce: hex::encode(nonce),
            kek_check: hex::encode(ct),
            holds: Default::default(),
        })
    }

    /// Reads the marker of `data_dir`; None if there is none.
    pub fn read(data_dir: &Path) -> Result<Option<Self>, MarkerError> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(MarkerError::Unreadable {
                    path,
                    message: e.to_string(),
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MarkerError::Unreadable {
                path,
                message: e.to_string(),
            })
    }

    /// Writes the marker atomically.
    pub fn write(&self, data_dir: &Path) -> Result<(), MarkerError> {
        let path = Self::path(data_dir);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| MarkerError::Unreadable {
            path: path.clone(),
            message: e.to_string(),
        })?;
        json.push(b'\n');
        meshsign_evidence::files::write_atomic(&path, &json, false)
            .map_err(|source| MarkerError::Write { path, source })
    }

    /// Checks that `kek` is the site's KEK.
    pub fn check_kek(
        &self,
        kek: &Kek,
        kek_file: &Path,
        data_dir: &Path,
    ) -> Result<(), MarkerError> {
        let wrong = || MarkerError::WrongKek {
            kek_file: kek_file.to_path_buf(),
            site_id: self.site_id.clone(),
            marker: Self::path(data_dir),
        };
        let nonce = hex::decode(&self.kek_check_nonce).map_err(|_| wrong())?;
        let ct = hex::decode(&self.kek_check).map_err(|_| wrong())?;
        match kek.unwrap(&aad(&self.site_id), &nonce, &ct) {
            Ok(p) if p.as_slice() == KEK_CHECK_PLAINTEXT => Ok(()),
            _ => Err(wrong()),
        }
    }
}

/// SHA-256 of an SPKI, hex.
pub fn spki_sha256(spki: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki).as_ref())
}

/// The site id the store holds, if any.
pub fn store_site_id(store: &Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .kv()
        .get(Tree::Meta, SITE_ID_KEY)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Whether the store holds anything at all (keys, runner CAs, certificates, audit entries).
pub fn store_is_empty(store: &Store) -> Result<bool, StoreError> {
    for t in [
        Tree::Keys,
        Tree::RunnerCas,
        Tree::Certs,
        Tree::Audit,
        Tree::Meta,
    ] {
        if store.kv().last(t)?.is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The key versions and runner CAs the store holds (see [`SiteMarker::holds`]).
pub fn store_holdings(
    store: &Store,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    let keys: Vec<crate::custody::KeyRecord> = store.scan(Tree::Keys, b"")?;
    for k in keys {
        out.insert(
            format!("key:{}/{}@v{}", k.partition, k.alias, k.version),
            spki_sha256(&k.public_key_der),
        );
    }
    let cas: Vec<crate::ca::RunnerCaRecord> = store.scan(Tree::RunnerCas, b"")?;
    for c in cas {
        out.insert(
            format!("ca:{}/{}", c.partition, c.id),
            spki_sha256(&c.cert_der),
        );
    }
    Ok(out)
}

/// What the marker says the site holds and the store does not (or holds differently).
pub fn missing_holdings(marker: &SiteMarker, store: &Store) -> Result<Vec<String>, StoreError> {
    let held = store_holdings(store)?;
    Ok(marker
        .holds
        .iter()
        .filter(|(slot, hash)| held.get(*slot) != Some(*hash))
        .map(|(slot, _)| slot.clone())
        .collect())
}
