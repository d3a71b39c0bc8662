//! Software signing backends in aws-lc-rs: ECDSA P-256 and P-384, Ed25519, RSA; made from a
//! PKCS#8 the KEK unwrapped, or generated.

use std::sync::Arc;

use aws_lc_rs::digest::{Digest, SHA256};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use zeroize::Zeroizing;

use super::{CustodyError, SigningBackend};
use crate::model::KeyAlgorithm;

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
