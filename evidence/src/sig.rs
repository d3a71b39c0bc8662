//! Checking a signature under a key's SubjectPublicKeyInfo, for every algorithm a site key can
//! have. The client verifies bundles with it; the site checks every signature a PKCS#11 token
//! returns before it leaves (a token that signs with another key than the one recorded is
//! caught here, not by the relying party).
//!
//! Algorithms are named as the site names them (`ecdsa-p256-sha256`, `rsa-2048-pss-sha256`,
//! `ecdsa-p384-sha384`, `ed25519`, …).

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, ParsedPublicKey,
    RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey, VerificationAlgorithm,
};

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// The algorithm is not one a site key can have, or it does not sign this kind of input.
    #[error("unsupported algorithm {0}")]
    Algorithm(String),
    /// The public key is not a SubjectPublicKeyInfo.
    #[error("public key: not an SPKI")]
    PublicKey,
    /// The signature does not verify.
    #[error("signature does not match")]
    Mismatch,
}

/// Whether `algorithm` signs messages only: ECDSA P-384 (SHA-384 of the message) and Ed25519
/// (pure EdDSA).
pub fn messages_only(algorithm: &str) -> bool {
    matches!(algorithm, "ecdsa-p384-sha384" | "ed25519")
}

fn digest_algorithm(algorithm: &str) -> Option<&'static dyn VerificationAlgorithm> {
    match algorithm {
        "ecdsa-p256-sha256" => Some(&ECDSA_P256_SHA256_ASN1),
        a if a.starts_with("rsa-") && a.ends_with("-pkcs1-sha256") => {
            Some(&RSA_PKCS1_2048_8192_SHA256)
        }
        a if a.starts_with("rsa-") && a.ends_with("-pss-sha256") => Some(&RSA_PSS_2048_8192_SHA256),
        _ => None,
    }
}

/// Checks a signature over a SHA-256 digest (the digest algorithms: ECDSA P-256 DER, RSA
/// PKCS#1 v1.5 and PSS with a 32-byte salt).
pub fn verify_digest(
    algorithm: &str,
    spki_der: &[u8],
    digest: &[u8; 32],
    sig: &[u8],
) -> Result<(), SigError> {
    let alg = digest_algorithm(algorithm).ok_or_else(|| SigError::Algorithm(algorithm.into()))?;
    let key = crate::der::spki_key(spki_der).ok_or(SigError::PublicKey)?;
    let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
        .map_err(|_| SigError::Mismatch)?;
    UnparsedPublicKey::new(alg, key)
        .verify_digest(&d, sig)
        .map_err(|_| SigError::Mismatch)
}

/// Checks a signature over a message: the digest algorithms over its SHA-256, P-384 over its
/// SHA-384, Ed25519 over the message itself.
pub fn verify_message(
    algorithm: &str,
    spki_der: &[u8],
    message: &[u8],
    sig: &[u8],
) -> Result<(), SigError> {
    let alg: &'static dyn VerificationAlgorithm = match algorithm {
        "ecdsa-p384-sha384" => &ECDSA_P384_SHA384_ASN1,
        "ed25519" => &ED25519,
        _ => {
            let mut d = [0u8; 32];
            d.copy_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref(),
            );
            return verify_digest(algorithm, spki_der, &d, sig);
        }
    };
    let key = crate::der::spki_key(spki_der).ok_or(SigError::PublicKey)?;
    UnparsedPublicKey::new(alg, key)
        .verify(message, sig)
        .map_err(|_| SigError::Mismatch)
}

/// One key's checker, parsed once (the site checks every signature of a token key with it;
/// parsing the key per signature would cost a share of each check).
pub struct Verifier {
    algorithm: String,
    key: ParsedPublicKey,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The checker of `algorithm` signatures under `spki_der`.
    pub fn new(algorithm: &str, spki_der: &[u8]) -> Result<Self, SigError> {
        let alg: &'static dyn VerificationAlgorithm = match algorithm {
            "ecdsa-p384-sha384" => &ECDSA_P384_SHA384_ASN1,
            "ed25519" => &ED25519,
            a => digest_algorithm(a).ok_or_else(|| SigError::Algorithm(a.into()))?,
        };
        let key = crate::der::spki_key(spki_der).ok_or(SigError::PublicKey)?;
        Ok(Self {
            algorithm: algorithm.to_string(),
            key: ParsedPublicKey::new(alg, key).map_err(|_| SigError::PublicKey)?,
        })
    }

    /// [`verify_digest`] with the parsed key.
    pub fn verify_digest(&self, digest: &[u8; 32], sig: &[u8]) -> Result<(), SigError> {
        if messages_only(&self.algorithm) {
            return Err(SigError::Algorithm(self.algorithm.clone()));
        }
        let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
            .map_err(|_| SigError::Mismatch)?;
        self.key
            .verify_digest_sig(&d, sig)
            .map_err(|_| SigError::Mismatch)
    }

    /// [`verify_message`] with the parsed key.
    pub fn verify_message(&self, message: &[u8], sig: &[u8]) -> Result<(), SigError> {
        if !messages_only(&self.algorithm) {
            let mut d = [0u8; 32];
            d.copy_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref(),
            );
            return self.verify_digest(&d, sig);
        }
        self.key
            .verify_sig(message, sig)
            .map_err(|_| SigError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
        Ed25519KeyPair, KeyPair as _,
    };

    fn ecdsa(
        alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
    ) -> Result<(EcdsaKeyPair, Vec<u8>), Box<dyn std::error::Error>> {
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new())?;
        let k = EcdsaKeyPair::from_pkcs8(alg, doc.as_ref())?;
        let spki = k.public_key().as_der()?.as_ref().to_vec();
        Ok((k, spki))
    }

    #[test]
    fn a_signature_verifies_only_under_its_own_key_and_input()
    -> Result<(), Box<dyn std::error::Error>> {
        let rng = SystemRandom::new();
        let (a, a_spki) = ecdsa(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
        let (_, b_spki) = ecdsa(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
        let msg = b"artifact bytes";
        let mut d = [0u8; 32];
        d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg).as_ref());
        let sig = a.sign(&rng, msg)?;
        verify_digest("ecdsa-p256-sha256", &a_spki, &d, sig.as_ref())?;
        verify_message("ecdsa-p256-sha256", &a_spki, msg, sig.as_ref())?;
        assert_eq!(
            verify_digest("ecdsa-p256-sha256", &b_spki, &d, sig.as_ref()),
            Err(SigError::Mismatch)
        );
        d[0] ^= 1;
        assert_eq!(
            verify_digest("ecdsa-p256-sha256", &a_spki, &d, sig.as_ref()),
            Err(SigError::Mismatch)
        );
        assert!(matches!(
            verify_digest("ed25519", &a_spki, &d, sig.as_ref()),
            Err(SigError::Algorithm(_))
        ));

        let (p384, p384_spki) = ecdsa(&ECDSA_P384_SHA384_ASN1_SIGNING)?;
        let sig = p384.sign(&rng, msg)?;
        verify_message("ecdsa-p384-sha384", &p384_spki, msg, sig.as_ref())?;
        assert!(verify_message("ecdsa-p384-sha384", &p384_spki, b"other", sig.as_ref()).is_err());

        let ed = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng)?.as_ref())?;
        let mut ed_spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        ed_spki.extend_from_slice(ed.public_key().as_ref());
        verify_message("ed25519", &ed_spki, msg, ed.sign(msg).as_ref())?;
        assert!(verify_message("ed25519", &a_spki, msg, ed.sign(msg).as_ref()).is_err());

        // The parsed checker agrees with the one-shot functions.
        let v = Verifier::new("ed25519", &ed_spki)?;
        v.verify_message(msg, ed.sign(msg).as_ref())?;
        assert!(v.verify_message(b"other", ed.sign(msg).as_ref()).is_err());
        let v = Verifier::new("ecdsa-p256-sha256", &a_spki)?;
        let sig = a.sign(&rng, msg)?;
        v.verify_message(msg, sig.as_ref())?;
        let mut d = [0u8; 32];
        d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg).as_ref());
        v.verify_digest(&d, sig.as_ref())?;
        d[1] ^= 1;
        assert_eq!(v.verify_digest(&d, sig.as_ref()), Err(SigError::Mismatch));
        assert!(
            Verifier::new("ecdsa-p256-sha256", &b_spki)?
                .verify_message(msg, sig.as_ref())
                .is_err()
        );
        Ok(())
    }
}
