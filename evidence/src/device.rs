//! Runner device keys (issue 28, first part: the formats): the registration request a runner
//! instance prints for an operator, and the proofs of possession it signs for each enrollment
//! and renewal. The transcripts are defined in docs/design-notes.md ("Runner device keys");
//! the site and the client use them from here so that both sides build the same bytes.
//!
//! Every transcript is a domain line, then one field per line. A field that holds a newline (or
//! is empty where a value is required) is refused, so no two field lists give the same bytes.
//! Signatures are ECDSA P-256 with SHA-256 (DER), checked with aws-lc.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The domain line of a registration request's signature.
pub const REGISTRATION_DOMAIN: &str = "meshsign-runner-registration/1\n";
/// The domain line of an enrollment's proof of possession.
pub const ENROLL_DOMAIN: &str = "meshsign-enroll-proof/1\n";
/// The domain line of a renewal's proof of possession.
pub const RENEW_DOMAIN: &str = "meshsign-renew-proof/1\n";

/// Why a request or a proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// A field cannot be encoded unambiguously.
    #[error("{0} is empty or holds a line break")]
    Field(&'static str),
    /// The public key is not a P-256 SubjectPublicKeyInfo.
    #[error("the device key is not a P-256 public key")]
    Key,
    /// The signature does not verify.
    #[error("the signature does not verify with the device key")]
    Signature,
    /// The request does not parse.
    #[error("the registration request is malformed: {0}")]
    Malformed(String),
}

/// Where a device key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A TPM 2.0 (owner hierarchy, not duplicable).
    Tpm,
    /// A PKCS#11 token (YubiKey PIV, a smart card, SoftHSM2 in tests).
    Pkcs11,
    /// A 0600 PKCS#8 file: dev sites and tests only.
    File,
}

impl Backend {
    /// The name in requests, configs and certificate claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tpm => "tpm",
            Self::Pkcs11 => "pkcs11",
            Self::File => "file",
        }
    }
}

/// The runner fingerprint of a device key: hex SHA-256 of its SPKI (DER).
pub fn fingerprint(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

fn line(out: &mut Vec<u8>, name: &'static str, value: &str) -> Result<(), ProofError> {
    if value.is_empty() || value.contains(['\n', '\r']) {
        return Err(ProofError::Field(name));
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
    Ok(())
}

/// What an enrollment's proof signs: the token's audience, `jti` and `exp` (as the site
/// verified them), the CSR key, the region and the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollTranscript<'a> {
    /// The token's `aud` the site selected.
    pub audience: &'a str,
    /// The token's `jti` (single use at the site: no nonce round trip).
    pub jti: &'a str,
    /// The token's `exp` (Unix seconds).
    pub exp: i64,
    /// The SPKI (DER) of the key the certificate is asked for.
    pub csr_spki_der: &'a [u8],
    /// The site's region.
    pub region: &'a str,
    /// The environment.
    pub environment: &'a str,
}

impl EnrollTranscript<'_> {
    /// The bytes the device key signs.
    pub fn bytes(&self) -> Result<Vec<u8>, ProofError> {
        let mut out = ENROLL_DOMAIN.as_bytes().to_vec();
        line(&mut out, "audience", self.audience)?;
        line(&mut out, "jti", self.jti)?;
        line(&mut out, "exp", &self.exp.to_string())?;
        line(
            &mut out,
            "csr key",
            &hex::encode(Sha256::digest(self.csr_spki_der)),
        )?;
        line(&mut out, "region", self.region)?;
        line(&mut out, "environment", self.environment)?;
        Ok(out)
    }
}

/// What a renewal's proof signs: the current certificate's serial and end, and the new CSR
/// key (so a proof is for one renewal of one certificate: a certificate is renewed once, the
/// store's session generation makes sure of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewTranscript<'a> {
    /// The current certificate's serial (lowercase hex).
    pub serial: &'a str,
    /// The SPKI (DER) of the new key.
    pub csr_spki_der: &'a [u8],
    /// The current certificate's `notAfter` (Unix seconds).
    pub not_after: i64,
}

impl RenewTranscript<'_> {
    /// The bytes the device key signs.
    pub fn bytes(&self) -> Result<Vec<u8>, ProofError> {
        let mut out = RENEW_DOMAIN.as_bytes().to_vec();
        line(&mut out, "serial", self.serial)?;
        line(
            &mut out,
            "csr key",
            &hex::encode(Sha256::digest(self.csr_spki_der)),
        )?;
        line(&mut out, "not after", &self.not_after.to_string())?;
        Ok(out)
    }
}

/// Checks an ECDSA P-256/SHA-256 signature (DER) by the device key `spki_der` over `message`.
pub fn verify(spki_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), ProofError> {
    let point = crate::der::spki_key(spki_der).ok_or(ProofError::Key)?;
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        point,
    )
    .verify(message, signature)
    .map_err(|_| ProofError::Signature)
}

/// What `meshsign runner init` prints for an operator: the device key and what identifies the
/// runner instance, signed by the key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationRequest {
    /// Where the key lives.
    pub backend: Backend,
    /// When the request was made (Unix seconds).
    pub created: i64,
    /// The TPM's endorsement key certificate (DER, base64), where the TPM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_cert: Option<String>,
    /// The TPM's endorsement key (SPKI DER, base64), for a `tpm` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_pub: Option<String>,
    /// The machine's host name.
    pub hostname: String,
    /// The runner instance's name.
    pub instance: String,
    /// The OS user the runner instance runs as.
    pub os_user: String,
    /// The device key (SPKI DER, base64).
    pub spki: String,
}

/// A registration request and the device key's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRegistration {
    /// The request.
    pub request: RegistrationRequest,
    /// ECDSA P-256/SHA-256 (DER, base64) over [`RegistrationRequest::signed_bytes`].
    pub signature: String,
}

impl RegistrationRequest {
    /// The bytes the device key signs: the domain line, then SHA-256 of the request's JSON
    /// (fields in the declared order, which is alphabetical; no whitespace).
    pub fn signed_bytes(&self) -> Result<Vec<u8>, ProofError> {
        for (name, v) in [
            ("hostname", &self.hostname),
            ("instance", &self.instance),
            ("os_user", &self.os_user),
        ] {
            if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
                return Err(ProofError::Field(name));
            }
        }
        let json = serde_json::to_vec(self).map_err(|e| ProofError::Malformed(e.to_string()))?;
        let mut out = REGISTRATION_DOMAIN.as_bytes().to_vec();
        out.extend_from_slice(&Sha256::digest(&json));
        Ok(out)
    }

    /// The device key (SPKI DER).
    pub fn spki_der(&self) -> Result<Vec<u8>, ProofError> {
        B64.decode(&self.spki)
            .map_err(|_| ProofError::Malformed("spki is not base64".into()))
    }
}

impl SignedRegistration {
    /// Checks the signature with the key the request names; returns the runner fingerprint.
    pub fn verify(&self) -> Result<String, ProofError> {
        let spki = self.request.spki_der()?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| ProofError::Malformed("signature is not base64".into()))?;
        verify(&spki, &self.request.signed_bytes()?, &sig)?;
        Ok(fingerprint(&spki))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;

    fn key(seed: u8) -> (p256::ecdsa::SigningKey, Vec<u8>) {
        let k = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("scalar");
        let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(k.verifying_key())
            .expect("spki")
            .as_bytes()
            .to_vec();
        (k, spki)
    }

    fn sign(k: &p256::ecdsa::SigningKey, msg: &[u8]) -> Vec<u8> {
        let sig: p256::ecdsa::DerSignature = k.sign(msg);
        sig.as_bytes().to_vec()
    }

    #[test]
    fn an_enroll_proof_binds_the_token_the_csr_key_the_region_and_the_environment() {
        let (device, spki) = key(1);
        let (_, csr) = key(2);
        let (_, other_csr) = key(3);
        let t = EnrollTranscript {
            audience: "meshsign:production:sg",
            jti: "a1b2",
            exp: 1_800_000_000,
            csr_spki_der: &csr,
            region: "sg",
            environment: "production",
        };
        let sig = sign(&device, &t.bytes().expect("bytes"));
        assert_eq!(verify(&spki, &t.bytes().expect("bytes"), &sig), Ok(()));
        // Any field changed: the proof no longer holds.
        let changed = [
            EnrollTranscript {
                jti: "a1b3",
                ..t.clone()
            },
            EnrollTranscript {
                exp: t.exp + 1,
                ..t.clone()
            },
            EnrollTranscript {
                csr_spki_der: &other_csr,
                ..t.clone()
            },
            EnrollTranscript {
                region: "tokyo",
                ..t.clone()
            },
            EnrollTranscript {
                environment: "staging",
                ..t.clone()
            },
            EnrollTranscript {
                audience: "meshsign:staging:sg",
                ..t.clone()
            },
        ];
        for c in changed {
            assert_eq!(
                verify(&spki, &c.bytes().expect("bytes"), &sig),
                Err(ProofError::Signature),
                "{c:?}"
            );
        }
        // Another device key's proof does not hold for this key.
        let (other_device, _) = key(4);
        let forged = sign(&other_device, &t.bytes().expect("bytes"));
        assert_eq!(
            verify(&spki, &t.bytes().expect("bytes"), &forged),
            Err(ProofError::Signature)
        );
        // A renewal proof is not an enrollment proof (domain separation).
        let r = RenewTranscript {
            serial: "a1b2",
            csr_spki_der: &csr,
            not_after: 1_800_000_000,
        };
        assert_ne!(
            r.bytes().expect("bytes")[..20],
            t.bytes().expect("bytes")[..20]
        );
        // A line break would let two field lists give the same bytes: refused.
        let bad = EnrollTranscript { jti: "a\nb", ..t };
        assert_eq!(bad.bytes(), Err(ProofError::Field("jti")));
    }

    #[test]
    fn a_registration_request_verifies_and_names_the_fingerprint() {
        let (device, spki) = key(5);
        let request = RegistrationRequest {
            backend: Backend::File,
            created: 1_800_000_000,
            ek_cert: None,
            ek_pub: None,
            hostname: "mac-sg-07".into(),
            instance: "runner-2".into(),
            os_user: "ci2".into(),
            spki: B64.encode(&spki),
        };
        let signed = SignedRegistration {
            signature: B64.encode(sign(&device, &request.signed_bytes().expect("bytes"))),
            request,
        };
        let json = serde_json::to_string(&signed).expect("json");
        let back: SignedRegistration = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.verify(), Ok(fingerprint(&spki)));
        let mut edited = back.clone();
        edited.request.hostname = "mac-sg-08".into();
        assert_eq!(edited.verify(), Err(ProofError::Signature));
        // Unknown fields are refused, not ignored.
        let extra = json.replacen("\"backend\"", "\"labels\":[],\"backend\"", 1);
        assert!(serde_json::from_str::<SignedRegistration>(&extra).is_err());
    }

    #[test]
    fn openssl_verifies_an_enroll_proof_over_the_transcript() {
        let (device, spki) = key(6);
        let (_, csr) = key(7);
        let t = EnrollTranscript {
            audience: "meshsign:staging:local",
            jti: "j-1",
            exp: 1_800_000_000,
            csr_spki_der: &csr,
            region: "local",
            environment: "staging",
        };
        let msg = t.bytes().expect("bytes");
        let sig = sign(&device, &msg);
        let dir = std::env::temp_dir().join(format!("meshsign-proof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("msg"), &msg).expect("msg");
        std::fs::write(dir.join("sig"), &sig).expect("sig");
        std::fs::write(dir.join("key.pem"), crate::pem_encode("PUBLIC KEY", &spki)).expect("pem");
        let out = std::process::Command::new("openssl")
            .current_dir(&dir)
            .args([
                "dgst",
                "-sha256",
                "-verify",
                "key.pem",
                "-signature",
                "sig",
                "msg",
            ])
            .output()
            .expect("openssl");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
