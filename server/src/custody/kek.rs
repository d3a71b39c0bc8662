//! The key-encryption key: AES-256-GCM over every software key's PKCS#8, with associated data
//! that binds a ciphertext to its environment, alias and version. Read from a file outside
//! the database; checked against the store's marker at start (a wrong KEK is refused).

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CustodyError, KeyRecord, backend_from_pkcs8};
use crate::store::{Store, Tree, hex_bytes};

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
