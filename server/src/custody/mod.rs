//! Key custody and signing.
//!
//! Owns: the KEK, wrapped key records, signing backends, the key ring, and the signing pool.
//! Must not touch: policy (who may use a key is `sign::checks`), the audit log, the network.
//!
//! Private keys live in the store only as AEAD ciphertext (AES-256-GCM) under a key-encryption
//! key ([`Kek`]) read from a file that is not in the database (e.g. a systemd credential). The
//! associated data binds each ciphertext to its environment, alias and version, so a record moved to
//! another slot does not decrypt. Keys are decrypted once at start into aws-lc-rs key objects.
//!
//! Signing goes through the [`SigningBackend`] trait; ECDSA P-256 via aws-lc-rs is the first
//! implementation, an HSM (PKCS#11) can be another. No API here returns private material.

pub mod pkcs11;
pub mod pool;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{Digest, SHA256};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::SiteConfig;
use crate::model::KeyAlgorithm;
use crate::store::{Store, StoreError, Tree, hex_bytes, hex_list};

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

// === impl Kek ===

/// The key-encryption key. 32 bytes, zeroized on drop, never printed.
pub struct Kek(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

impl Kek {
    /// Reads a KEK file: 32 raw bytes, or 64 hex characters (surrounding whitespace ignored).
    /// Outside dev mode, a file readable or writable by group or others is refused.
    pub fn load(path: &Path, dev: bool) -> Result<Self, CustodyError> {
        let err = |m: String| CustodyError::KekFile {
            path: path.display().to_string(),
            message: m,
        };
        let io = |source| CustodyError::KekIo {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if !dev && mode & 0o077 != 0 {
                return Err(err(format!(
                    "mode {mode:o} lets group or others read it; chmod 600 (or 400) it"
                )));
            }
        }
        let _ = meta;
        let raw = Zeroizing::new(std::fs::read(path).map_err(io)?);
        let mut key = Zeroizing::new([0u8; 32]);
        let trimmed = raw.trim_ascii();
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
        } else if trimmed.len() == 64 {
            hex::decode_to_slice(trimmed, &mut key[..])
                .map_err(|_| err("not 64 hex characters".into()))?;
        } else {
            return Err(err("expected 32 raw bytes or 64 hex characters".into()));
        }
        Ok(Self(key))
    }

    /// Writes a new random KEK (hex, mode 0600) to `path`. For dev mode and tests.
    pub fn generate_file(path: &Path) -> Result<(), CustodyError> {
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut key[..])
            .map_err(|_| CustodyError::Crypto("rng"))?;
        let hexed = Zeroizing::new(hex::encode(&key[..]));
        meshsign_evidence::files::write_atomic(path, hexed.as_bytes(), true).map_err(|source| {
            CustodyError::KekIo {
                path: path.display().to_string(),
                source,
            }
        })
    }

    fn aead(&self) -> Result<LessSafeKey, CustodyError> {
        Ok(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0[..])
                .map_err(|_| CustodyError::Crypto("aead key"))?,
        ))
    }

    /// A key for HMAC-SHA256 derived from the KEK for one purpose (`label`), so the KEK itself
    /// keys nothing but the wrapping AEAD: HMAC-SHA256(KEK, "meshsign-kek-derive-v1\0" ‖ label).
    pub fn mac_key(&self, label: &str) -> aws_lc_rs::hmac::Key {
        let derive = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0[..]);
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&derive);
        ctx.update(b"meshsign-kek-derive-v1\0");
        ctx.update(label.as_bytes());
        let derived = Zeroizing::new(ctx.sign().as_ref().to_vec());
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &derived)
    }

    /// Encrypts `plaintext` with a fresh random nonce; returns (nonce, ciphertext||tag).
    pub fn wrap(&self, aad: &str, plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CustodyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CustodyError::Crypto("rng"))?;
        let mut buf = plaintext.to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CustodyError::Crypto("seal"))?;
        Ok((nonce.to_vec(), buf))
    }

    /// Decrypts what [`Kek::wrap`] produced under the same associated data.
    pub fn unwrap(
        &self,
        aad: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CustodyError> {
        let fail = || CustodyError::Unwrap {
            slot: aad.replace('\0', "/"),
        };
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .aead()?
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| fail())?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// A private key encrypted under the KEK, as stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct Wrapped {
    /// AES-GCM nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// PKCS#8 ciphertext with tag.
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wrapped([ciphertext])")
    }
}

/// Associated data of a signing key slot.
pub fn key_aad(environment: &str, alias: &str, version: u32) -> String {
    format!("meshsign/key/v1\0{environment}\0{alias}\0{version}")
}

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

/// ECDSA P-384 with SHA-384 in aws-lc-rs (messages only).
pub struct EcdsaP384 {
    key: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl std::fmt::Debug for EcdsaP384 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EcdsaP384([redacted])")
    }
}

impl EcdsaP384 {
    /// Generates a key; returns it with its PKCS#8.
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), CustodyError> {
        let pkcs8 = ecdsa_generate(&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING)?;
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Loads a PKCS#8 P-384 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CustodyError> {
        let (key, spki) = ecdsa_from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            pkcs8,
            "not a PKCS#8 P-384 key",
        )?;
        Ok(Self { key, spki })
    }
}

impl SigningBackend for EcdsaP384 {
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::EcdsaP384Sha384
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign_digest(&self, _: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        Err(CustodyError::Crypto(
            "a P-384 key signs messages (SHA-384), not SHA-256 digests",
        ))
    }

    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        let sig = self
            .key
            .sign(&SystemRandom::new(), message)
            .map_err(|_| CustodyError::Crypto("sign"))?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Ed25519 in aws-lc-rs: pure EdDSA over the message (messages only).
pub struct Ed25519Key {
    key: aws_lc_rs::signature::Ed25519KeyPair,
    spki: Vec<u8>,
}

impl std::fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Key([redacted])")
    }
}

/// The SubjectPublicKeyInfo of a raw Ed25519 public key (RFC 8410).
pub fn ed25519_spki(raw: &[u8]) -> Vec<u8> {
    let mut v = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    v.extend_from_slice(raw);
    v
}

impl Ed25519Key {
    /// Generates a key; returns it with its PKCS#8.
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), CustodyError> {
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| CustodyError::Crypto("keygen"))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Loads a PKCS#8 Ed25519 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CustodyError> {
        let key = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| CustodyError::Crypto("not a PKCS#8 Ed25519 key"))?;
        let spki = ed25519_spki(key.public_key().as_ref());
        Ok(Self { key, spki })
    }
}

impl SigningBackend for Ed25519Key {
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::Ed25519
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign_digest(&self, _: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        Err(CustodyError::Crypto(
            "an Ed25519 key signs messages, not digests",
        ))
    }

    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        Ok(self.key.sign(message).as_ref().to_vec())
    }
}

/// ECDSA P-256 in aws-lc-rs (prehash signing).
pub struct EcdsaP256 {
    key: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl std::fmt::Debug for EcdsaP256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EcdsaP256([redacted])")
    }
}

/// A fresh ECDSA PKCS#8 of `alg`.
fn ecdsa_generate(
    alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
) -> Result<Zeroizing<Vec<u8>>, CustodyError> {
    let doc = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new())
        .map_err(|_| CustodyError::Crypto("keygen"))?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

/// An ECDSA key of `alg` from PKCS#8, and its SubjectPublicKeyInfo.
fn ecdsa_from_pkcs8(
    alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
    pkcs8: &[u8],
    not_it: &'static str,
) -> Result<(EcdsaKeyPair, Vec<u8>), CustodyError> {
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8).map_err(|_| CustodyError::Crypto(not_it))?;
    let spki = key
        .public_key()
        .as_der()
        .map_err(|_| CustodyError::Crypto("public key encoding"))?
        .as_ref()
        .to_vec();
    Ok((key, spki))
}

impl EcdsaP256 {
    /// Generates a key; returns it with its PKCS#8 (for wrapping).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), CustodyError> {
        let pkcs8 = ecdsa_generate(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Loads a PKCS#8 P-256 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CustodyError> {
        let (key, spki) = ecdsa_from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
            "not a PKCS#8 P-256 key",
        )?;
        Ok(Self { key, spki })
    }
}

impl SigningBackend for EcdsaP256 {
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::EcdsaP256Sha256
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        let d = Digest::import_less_safe(digest, &SHA256)
            .map_err(|_| CustodyError::Crypto("digest"))?;
        let sig = self
            .key
            .sign_digest(&d)
            .map_err(|_| CustodyError::Crypto("sign"))?;
        Ok(sig.as_ref().to_vec())
    }
}

/// RSA in aws-lc-rs (prehash signing), PKCS#1 v1.5 or PSS by the key's algorithm.
pub struct RsaKey {
    key: aws_lc_rs::rsa::KeyPair,
    spki: Vec<u8>,
    algorithm: KeyAlgorithm,
}

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaKey({}, [redacted])", self.algorithm.as_str())
    }
}

impl RsaKey {
    /// Generates a key of the algorithm's size; returns it with its PKCS#8.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<(Self, Zeroizing<Vec<u8>>), CustodyError> {
        use aws_lc_rs::rsa::KeySize;
        let size = match algorithm.rsa_bits() {
            Some(2048) => KeySize::Rsa2048,
            Some(3072) => KeySize::Rsa3072,
            Some(4096) => KeySize::Rsa4096,
            _ => return Err(CustodyError::Crypto("not an RSA algorithm")),
        };
        let kp =
            aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| CustodyError::Crypto("keygen"))?;
        let pkcs8 = Zeroizing::new(
            AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp)
                .map_err(|_| CustodyError::Crypto("pkcs8"))?
                .as_ref()
                .to_vec(),
        );
        Ok((Self::from_pkcs8(algorithm, &pkcs8)?, pkcs8))
    }

    /// Loads a PKCS#8 RSA key; its size must match the algorithm.
    pub fn from_pkcs8(algorithm: KeyAlgorithm, pkcs8: &[u8]) -> Result<Self, CustodyError> {
        let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| CustodyError::Crypto("not a PKCS#8 RSA key"))?;
        if Some(key.public_modulus_len() * 8) != algorithm.rsa_bits() {
            return Err(CustodyError::Crypto(
                "RSA key size differs from the algorithm",
            ));
        }
        let spki = key
            .public_key()
            .as_der()
            .map_err(|_| CustodyError::Crypto("public key encoding"))?
            .as_ref()
            .to_vec();
        Ok(Self {
            key,
            spki,
            algorithm,
        })
    }
}

impl SigningBackend for RsaKey {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, CustodyError> {
        use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256};
        let d = Digest::import_less_safe(digest, &SHA256)
            .map_err(|_| CustodyError::Crypto("digest"))?;
        let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = if self.algorithm.is_pss() {
            &RSA_PSS_SHA256
        } else {
            &RSA_PKCS1_SHA256
        };
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign_digest(padding, &d, &mut sig)
            .map_err(|_| CustodyError::Crypto("sign"))?;
        Ok(sig)
    }
}

/// A fresh signer and its PKCS#8 (to wrap under the KEK, then drop).
pub type Generated = (Arc<dyn SigningBackend>, Zeroizing<Vec<u8>>);

/// Generates a key of `algorithm`; returns the signer and its PKCS#8 (for wrapping).
pub fn generate(algorithm: KeyAlgorithm) -> Result<Generated, CustodyError> {
    Ok(match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => {
            let (k, p) = EcdsaP256::generate()?;
            (Arc::new(k), p)
        }
        KeyAlgorithm::EcdsaP384Sha384 => {
            let (k, p) = EcdsaP384::generate()?;
            (Arc::new(k), p)
        }
        KeyAlgorithm::Ed25519 => {
            let (k, p) = Ed25519Key::generate()?;
            (Arc::new(k), p)
        }
        rsa => {
            let (k, p) = RsaKey::generate(rsa)?;
            (Arc::new(k), p)
        }
    })
}

/// Loads a PKCS#8 key as a signer of `algorithm`.
pub fn backend_from_pkcs8(
    algorithm: KeyAlgorithm,
    pkcs8: &[u8],
) -> Result<Arc<dyn SigningBackend>, CustodyError> {
    Ok(match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => Arc::new(EcdsaP256::from_pkcs8(pkcs8)?),
        KeyAlgorithm::EcdsaP384Sha384 => Arc::new(EcdsaP384::from_pkcs8(pkcs8)?),
        KeyAlgorithm::Ed25519 => Arc::new(Ed25519Key::from_pkcs8(pkcs8)?),
        rsa => Arc::new(RsaKey::from_pkcs8(rsa, pkcs8)?),
    })
}

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

fn load_versions(
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

/// Checks that `kek` opens the key records already in the store (all of them): a wrong KEK is
/// refused before anything new is wrapped under it.
pub fn verify_kek(store: &Store, kek: &Kek) -> Result<(), CustodyError> {
    let records: Vec<KeyRecord> = store.scan(Tree::Keys, b"")?;
    for rec in records {
        if let Some(w) = &rec.wrapped {
            let pkcs8 = kek.unwrap(
                &key_aad(&rec.partition, &rec.alias, rec.version),
                &w.nonce,
                &w.ciphertext,
            )?;
            if backend_from_pkcs8(rec.algorithm, &pkcs8)?.public_key_der()
                != rec.public_key_der.as_slice()
            {
                return Err(CustodyError::Unwrap { slot: rec.key_id() });
            }
        }
    }
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
