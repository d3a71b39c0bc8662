//! Key custody and signing.
//!
//! Owns: the KEK ([`kek`]), wrapped key records ([`records`]), the software signing backends
//! ([`software`]), the PKCS#11 token ([`pkcs11`]) and the signing pool. The key ring — the
//! decrypted keys the site signs with — is the state's (`state::keyring`).
//! Must not touch: policy (who may use a key is `sign::checks`), the audit log, the network.
//!
//! Private keys live in the store only as AEAD ciphertext (AES-256-GCM) under a key-encryption
//! key ([`Kek`]) read from a file that is not in the database (e.g. a systemd credential). The
//! associated data binds each ciphertext to its environment, alias and version, so a record moved to
//! another slot does not decrypt. Keys are decrypted once at start into aws-lc-rs key objects.
//!
//! Signing goes through the [`SigningBackend`] trait; ECDSA P-256 via aws-lc-rs is the first
//! implementation, an HSM (PKCS#11) can be another. No API here returns private material.

mod kek;
pub mod pkcs11;
pub mod pool;
mod records;
mod software;

pub use kek::{Kek, Wrapped, key_aad, verify_kek};
pub use records::{
    KeyRecord, LoadedKey, create_key, load_or_create_alias, load_versions, store_key,
    store_token_key, token_label,
};
pub use software::{
    EcdsaP256, EcdsaP384, Ed25519Key, Generated, RsaKey, backend_from_pkcs8, ed25519_spki, generate,
};

use std::sync::Arc;

use aws_lc_rs::digest::SHA256;

use crate::model::KeyAlgorithm;
use crate::store::StoreError;

/// Key custody failures.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    /// The KEK file could not be read or written.
    #[error("kek file {path}: {source}")]
    KekIo {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The KEK file is not acceptable (permissions, length, encoding).
    #[error("kek file {path}: {message}")]
    KekFile {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A wrapped key did not decrypt: wrong KEK, or the record was altered or moved.
    #[error("key {slot} does not decrypt under this KEK (wrong KEK or altered record)")]
    Unwrap {
        /// environment/alias/version
        slot: String,
    },
    /// The crypto library refused an operation.
    #[error("crypto operation failed: {0}")]
    Crypto(&'static str),
    /// The PKCS#11 token refused or failed (configuration, PIN, a missing object).
    #[error("PKCS#11: {0}")]
    Token(String),
    /// The PKCS#11 token is gone (removed, reset, unreachable) for now.
    #[error("PKCS#11 token unavailable: {0}")]
    TokenUnavailable(String),
    /// A key version with this number exists already (another replica made it at the same
    /// moment): nothing was overwritten.
    #[error(
        "key {slot} already exists (made at the same moment elsewhere, e.g. at another replica); \
         nothing was overwritten: run the operation again for the next version"
    )]
    VersionTaken {
        /// environment/alias@vN
        slot: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where keys are kept: the KEK (keys wrapped in the store) and, when `[pkcs11]` is
/// configured, a token (keys that never leave it).
#[derive(Debug)]
pub struct Custodian {
    /// The key-encryption key.
    pub kek: Kek,
    /// The PKCS#11 token, if configured.
    pub token: Option<Arc<pkcs11::Token>>,
    /// New runner CAs are created in the token (`[pkcs11] runner_cas = true`).
    pub runner_cas_in_token: bool,
}

impl Custodian {
    /// Whether every key can sign now (false while the token is gone).
    pub fn available(&self) -> bool {
        self.token.as_ref().is_none_or(|t| t.available())
    }
}

pub use crate::model::KeyBackend as Backend;

// === signing ===

/// Signs SHA-256 digests with one private key held by the site.
pub trait SigningBackend: Send + Sync + 'static {
    /// The key's algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// SubjectPublicKeyInfo, DER.
    fn public_key_der(&self) -> &[u8];
    /// Signs a SHA-256 digest; returns the signature in the algorithm's wire form (DER for ECDSA).
    /// A key that signs messages only ([`KeyAlgorithm::messages_only`]) refuses.
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, CustodyError>;
    /// Signs a message (purpose `message`): SHA-256 of it for the digest algorithms, SHA-384
    /// for P-384, the message itself for Ed25519.
    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(aws_lc_rs::digest::digest(&SHA256, message).as_ref());
        self.sign_digest(&d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_binds_associated_data() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kek");
        Kek::generate_file(&path)?;
        let kek = Kek::load(&path, false)?;
        let (n, ct) = kek.wrap(&key_aad("prod", "release", 1), b"secret")?;
        let opened = kek.unwrap(&key_aad("prod", "release", 1), &n, &ct)?;
        assert_eq!(&opened[..], b"secret");
        assert!(
            kek.unwrap(&key_aad("staging", "release", 1), &n, &ct)
                .is_err()
        );
        assert!(kek.unwrap(&key_aad("prod", "release", 2), &n, &ct).is_err());
        assert_eq!(format!("{kek:?}"), "Kek([redacted])");
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn kek_readable_by_others_is_refused_outside_dev() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        Kek::generate_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Kek::load(&path, false).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(Kek::load(&path, true).is_ok());
    }
}
