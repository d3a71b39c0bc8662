//! Rekor-shaped transparency entries: what the site's transparency log holds for every
//! signature it makes, in the forms Sigstore verifiers (sigstore-js, sigstore-go,
//! sigstore-python) check without knowing meshsign.
//!
//! - **Bodies** (the log's leaves, `canonicalizedBody` in a bundle): `hashedrekord` `0.0.1` for
//!   a digest or message signature, `dsse` `0.0.1` for a DSSE envelope, as Rekor's types
//!   define them (`pkg/types/hashedrekord/v0.0.1`, `pkg/types/dsse/v0.0.1`), in canonical JSON
//!   (RFC 8785: keys sorted, no whitespace). Every value is hex or base64, so no string needs
//!   escaping. The public key is `base64(PEM)`, as Rekor stores it.
//! - **The signed entry timestamp** (SET, a bundle's `inclusionPromise`): the log key's ECDSA
//!   P-256 / SHA-256 (DER) signature over the canonical JSON
//!   `{"body":<base64 body>,"integratedTime":<unix s>,"logID":<hex log id>,"logIndex":<n>}`,
//!   as Rekor signs it (`pkg/api/entries.go`). The log id is SHA-256 of the log key's SPKI.
//!
//! The leaf hash of a body is RFC 9162's `SHA-256(0x00 ‖ body)` ([`crate::merkle::leaf_hash`]);
//! checkpoints of the log are C2SP notes ([`crate::note`]) with the origin
//! `<trust domain>/<region>/log`.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `kindVersion` of a digest or message signature's entry.
pub const HASHEDREKORD: (&str, &str) = ("hashedrekord", "0.0.1");
/// `kindVersion` of a DSSE envelope's entry.
pub const DSSE: (&str, &str) = ("dsse", "0.0.1");

/// The transparency log's origin (checkpoint name) for a site: `<trust domain>/<region>/log`.
/// A Sigstore trusted root names the log with a `baseUrl` that contains it.
pub fn origin(trust_domain: &str, region: &str) -> String {
    format!("{trust_domain}/{region}/log")
}

/// `base64(PEM)` of a SubjectPublicKeyInfo, as Rekor bodies carry keys.
fn key_content(spki_der: &[u8]) -> String {
    B64.encode(crate::pem_encode("PUBLIC KEY", spki_der))
}

/// The hash a `hashedrekord` body (and a bundle's `messageDigest`) names: the one the
/// signature was made over, so a verifier that knows only the body's hash checks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyHash {
    /// SHA-256: digest keys, and messages signed by P-256, RSA (and Ed25519, whose pure
    /// signature no hash names; see docs/design-notes.md).
    #[default]
    Sha256,
    /// SHA-384: messages signed by P-384 keys (`ecdsa-p384-sha384` signs SHA-384 of them).
    Sha384,
}

impl BodyHash {
    /// The hash a message signature of key algorithm `algorithm` is over.
    pub fn for_algorithm(algorithm: &str) -> Self {
        if algorithm == "ecdsa-p384-sha384" {
            Self::Sha384
        } else {
            Self::Sha256
        }
    }

    /// Rekor's name (`spec.data.hash.algorithm`).
    pub fn rekor(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
        }
    }

    /// Sigstore's `HashAlgorithm` name (a bundle's `messageDigest.algorithm`).
    pub fn sigstore(self) -> &'static str {
        match self {
            Self::Sha256 => "SHA2_256",
            Self::Sha384 => "SHA2_384",
        }
    }

    /// From Sigstore's name.
    pub fn from_sigstore(name: &str) -> Option<Self> {
        [Self::Sha256, Self::Sha384]
            .into_iter()
            .find(|h| h.sigstore() == name)
    }

    /// The hash of `message`.
    pub fn of(self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(message).to_vec(),
            Self::Sha384 => sha2::Sha384::digest(message).to_vec(),
        }
    }
}

/// The `hashedrekord` `0.0.1` body of a signature over a SHA-256 digest (for a message
/// signature, the SHA-256 of the message).
pub fn hashedrekord(digest: &[u8; 32], signature: &[u8], spki_der: &[u8]) -> Vec<u8> {
    hashedrekord_with(BodyHash::Sha256, digest, signature, spki_der)
}

/// The `hashedrekord` `0.0.1` body of a signature over `digest`, a `hash` hash. Built in one
/// buffer (a log entry per signature, on the Sign path).
pub fn hashedrekord_with(
    hash: BodyHash,
    digest: &[u8],
    signature: &[u8],
    spki_der: &[u8],
) -> Vec<u8> {
    let pem = crate::pem_encode("PUBLIC KEY", spki_der);
    let mut out = String::with_capacity(
        200 + 2 * digest.len() + 4 * signature.len().div_ceil(3) + 4 * pem.len().div_ceil(3),
    );
    out.push_str(
        r#"{"apiVersion":"0.0.1","kind":"hashedrekord","spec":{"data":{"hash":{"algorithm":""#,
    );
    out.push_str(hash.rekor());
    out.push_str(r#"","value":""#);
    crate::push_hex(&mut out, digest);
    out.push_str(r#""}},"signature":{"content":""#);
    B64.encode_string(signature, &mut out);
    out.push_str(r#"","publicKey":{"content":""#);
    B64.encode_string(pem.as_bytes(), &mut out);
    out.push_str(r#""}}}}"#);
    out.into_bytes()
}

/// The `dsse` `0.0.1` body of a one-signature DSSE envelope: `envelope_json` is the envelope
/// as the bundle carries it (its SHA-256 is `envelopeHash`), `payload` the decoded payload.
pub fn dsse(envelope_json: &[u8], payload: &[u8], signature: &[u8], spki_der: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"apiVersion":"0.0.1","kind":"dsse","spec":{{"envelopeHash":{{"algorithm":"sha256","value":"{}"}},"payloadHash":{{"algorithm":"sha256","value":"{}"}},"signatures":[{{"signature":"{}","verifier":"{}"}}]}}}}"#,
        hex::encode(Sha256::digest(envelope_json)),
        hex::encode(Sha256::digest(payload)),
        B64.encode(signature),
        key_content(spki_der)
    )
    .into_bytes()
}

/// The log id: SHA-256 of the log key's SubjectPublicKeyInfo.
pub fn log_id(log_spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(log_spki_der).into()
}

/// The bytes a SET signs (canonical JSON, keys in RFC 8785 order).
pub fn set_payload(
    body: &[u8],
    integrated_time: i64,
    log_id: &[u8; 32],
    log_index: u64,
) -> Vec<u8> {
    format!(
        r#"{{"body":"{}","integratedTime":{integrated_time},"logID":"{}","logIndex":{log_index}}}"#,
        B64.encode(body),
        hex::encode(log_id)
    )
    .into_bytes()
}

/// One entry of the transparency log as the site returns it with a signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogEntry {
    /// Leaf index in the log.
    pub log_index: u64,
    /// Unix seconds the site integrated the entry (its audit entry's time).
    pub integrated_time: i64,
    /// The canonical body (the leaf).
    pub body: Vec<u8>,
    /// The signed entry timestamp (DER).
    pub set: Vec<u8>,
}

/// Why an entry does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transparency entry: {0}")]
pub struct EntryError(pub String);

/// A log key ready to check many SETs: its id and its point, parsed once (a client checks
/// one SET per file it signs; parsing the point per check cost a share of each).
#[derive(Clone)]
pub struct LogKey {
    /// SHA-256 of the SPKI.
    pub id: [u8; 32],
    point: Vec<u8>,
    parsed: std::sync::Arc<aws_lc_rs::signature::ParsedPublicKey>,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKey")
            .field("id", &hex::encode(self.id))
            .finish_non_exhaustive()
    }
}

impl PartialEq for LogKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.point == other.point
    }
}

impl Eq for LogKey {}

impl LogKey {
    /// From the log (audit) key.
    pub fn new(log_key: &p256::ecdsa::VerifyingKey) -> Result<Self, EntryError> {
        let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(log_key)
            .map_err(|_| EntryError("the log key does not encode".into()))?;
        let point = log_key.to_sec1_point(false).as_bytes().to_vec();
        let parsed = aws_lc_rs::signature::ParsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &point,
        )
        .map_err(|_| EntryError("the log key is not a P-256 point".into()))?;
        Ok(Self {
            id: log_id(spki.as_bytes()),
            point,
            parsed: std::sync::Arc::new(parsed),
        })
    }
}

impl LogEntry {
    /// Checks the SET with the log key.
    pub fn verify_set(&self, log_key: &p256::ecdsa::VerifyingKey) -> Result<(), EntryError> {
        self.verify_set_with(&LogKey::new(log_key)?)
    }

    /// [`LogEntry::verify_set`] with a key parsed once (aws-lc's ECDSA: a client checks one
    /// SET per file it signs).
    pub fn verify_set_with(&self, key: &LogKey) -> Result<(), EntryError> {
        let msg = set_payload(&self.body, self.integrated_time, &key.id, self.log_index);
        key.parsed.verify_sig(&msg, &self.set).map_err(|_| {
            EntryError("the signed entry timestamp does not verify with the log key".into())
        })
    }
}

impl LogEntry {
    /// Checks, without the log key, that the SET is one DER `ECDSA-Sig-Value`
    /// (`SEQUENCE { INTEGER r, INTEGER s }`, each of at most 33 bytes, as P-256 gives) and
    /// nothing else: what a writer can check of a promise it does not verify (see
    /// `meshsign_client::site::verification::sigstore_bundle`).
    pub fn check_set_shape(&self) -> Result<(), EntryError> {
        let bad = || EntryError("the signed entry timestamp is not a DER ECDSA signature".into());
        let int = |b: &[u8]| -> Option<usize> {
            match b {
                [0x02, len, rest @ ..]
                    if (1..=33).contains(len) && rest.len() >= usize::from(*len) =>
                {
                    Some(2 + usize::from(*len))
                }
                _ => None,
            }
        };
        let body = match self.set.as_slice() {
            [0x30, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => rest,
            _ => return Err(bad()),
        };
        let r = int(body).ok_or_else(bad)?;
        let s = int(&body[r..]).ok_or_else(bad)?;
        if r + s != body.len() {
            return Err(bad());
        }
        Ok(())
    }
}

/// What a body says was signed, read back for the checks that tie it to a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyFacts {
    /// `hashedrekord` or `dsse`.
    pub kind: String,
    /// `spec.data.hash.value` (hashedrekord) or `spec.payloadHash.value` (dsse), decoded.
    pub digest: Vec<u8>,
    /// Which hash `digest` is (a dsse body's payload hash is SHA-256).
    pub hash: BodyHash,
    /// The one signature, decoded.
    pub signature: Vec<u8>,
    /// The key's SPKI (DER), decoded from the PEM.
    pub spki_der: Vec<u8>,
}

/// Parses a body of either kind this log writes.
pub fn body_facts(body: &[u8]) -> Result<BodyFacts, EntryError> {
    let bad = |m: &str| EntryError(m.into());
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("the body is not JSON"))?;
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str());
    let (kind, version) = (s("/kind").unwrap_or(""), s("/apiVersion").unwrap_or(""));
    let (digest, sig, key) = match (kind, version) {
        ("hashedrekord", "0.0.1") => (
            s("/spec/data/hash/value"),
            s("/spec/signature/content"),
            s("/spec/signature/publicKey/content"),
        ),
        ("dsse", "0.0.1") => (
            s("/spec/payloadHash/value"),
            s("/spec/signatures/0/signature"),
            s("/spec/signatures/0/verifier"),
        ),
        _ => return Err(bad("the body is neither hashedrekord 0.0.1 nor dsse 0.0.1")),
    };
    let hash = match s("/spec/data/hash/algorithm").or(s("/spec/payloadHash/algorithm")) {
        Some("sha256") => BodyHash::Sha256,
        Some("sha384") => BodyHash::Sha384,
        _ => return Err(bad("the body's hash is neither sha256 nor sha384")),
    };
    let digest =
        hex::decode(digest.unwrap_or("")).map_err(|_| bad("the body's hash is not hex"))?;
    let want = match hash {
        BodyHash::Sha256 => 32,
        BodyHash::Sha384 => 48,
    };
    if digest.len() != want {
        return Err(bad("the body's hash is not as long as its algorithm's"));
    }
    let signature = B64
        .decode(sig.unwrap_or(""))
        .map_err(|_| bad("the body's signature is not base64"))?;
    let pem = B64
        .decode(key.unwrap_or(""))
        .map_err(|_| bad("the body's key is not base64"))?;
    let pem = String::from_utf8(pem).map_err(|_| bad("the body's key is not PEM"))?;
    let spki_der = {
        use rustls_pki_types::SubjectPublicKeyInfoDer;
        use rustls_pki_types::pem::PemObject as _;
        SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map(|k| k.to_vec())
            .map_err(|_| bad("the body's key is not PEM"))?
    };
    Ok(BodyFacts {
        kind: kind.into(),
        digest,
        hash,
        signature,
        spki_der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_canonical_json_that_reads_back() -> Result<(), EntryError> {
        let spki = [0x30u8, 0x03, 0x02, 0x01, 0x00];
        let body = hashedrekord(&[7; 32], b"sig", &spki);
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| EntryError("json".into()))?;
        // serde_json's Value keeps keys sorted: re-encoding gives the same bytes.
        assert_eq!(serde_json::to_vec(&v).ok(), Some(body.clone()));
        let dsse_body = dsse(b"{}", b"payload", b"sig", &spki);
        let w: serde_json::Value =
            serde_json::from_slice(&dsse_body).map_err(|_| EntryError("json".into()))?;
        assert_eq!(serde_json::to_vec(&w).ok(), Some(dsse_body));
        let payload = set_payload(&body, 5, &[1; 32], 9);
        let p: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|_| EntryError("json".into()))?;
        assert_eq!(serde_json::to_vec(&p).ok(), Some(payload));
        Ok(())
    }

    /// The Sign path builds bodies and PEM in one buffer each; the bytes are those of the
    /// plain formatting they replaced (what every stored leaf already hashes).
    #[test]
    fn bodies_and_pem_built_in_one_buffer_match_plain_formatting() {
        fn pem_reference(label: &str, der: &[u8]) -> String {
            let b64 = B64.encode(der);
            let mut out = format!("-----BEGIN {label}-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
                out.push('\n');
            }
            out + &format!("-----END {label}-----\n")
        }
        for len in [0usize, 1, 2, 3, 47, 48, 49, 91, 95, 96, 97, 294] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(
                crate::pem_encode("PUBLIC KEY", &der),
                pem_reference("PUBLIC KEY", &der)
            );
            for (hash, digest) in [
                (BodyHash::Sha256, vec![0xa5; 32]),
                (BodyHash::Sha384, (0..48).collect()),
            ] {
                let reference = format!(
                    r#"{{"apiVersion":"0.0.1","kind":"hashedrekord","spec":{{"data":{{"hash":{{"algorithm":"{}","value":"{}"}}}},"signature":{{"content":"{}","publicKey":{{"content":"{}"}}}}}}}}"#,
                    hash.rekor(),
                    hex::encode(&digest),
                    B64.encode(&der[..len.min(72)]),
                    B64.encode(pem_reference("PUBLIC KEY", &der)),
                );
                let built = hashedrekord_with(hash, &digest, &der[..len.min(72)], &der);
                assert_eq!(String::from_utf8(built).ok(), Some(reference));
            }
        }
    }

    #[test]
    fn a_sha384_body_reads_back_as_sha384_and_a_short_hash_is_refused() {
        // A real key, so the PEM parses back.
        let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(
            p256::ecdsa::SigningKey::from_slice(&[1; 32])
                .expect("key")
                .verifying_key(),
        )
        .expect("spki");
        let d384 = BodyHash::Sha384.of(b"notes");
        assert_eq!(d384.len(), 48);
        let body = hashedrekord_with(BodyHash::Sha384, &d384, b"sig", spki.as_bytes());
        let facts = body_facts(&body).expect("facts");
        assert_eq!((facts.hash, facts.digest), (BodyHash::Sha384, d384));
        assert_eq!(
            BodyHash::from_sigstore(BodyHash::for_algorithm("ecdsa-p384-sha384").sigstore()),
            Some(BodyHash::Sha384)
        );
        assert_eq!(BodyHash::for_algorithm("ed25519"), BodyHash::Sha256);
        // A body that says sha384 but carries 32 bytes is refused.
        let short = hashedrekord_with(BodyHash::Sha384, &[7; 32], b"sig", spki.as_bytes());
        assert!(body_facts(&short).is_err());
    }

    #[test]
    fn a_set_of_the_wrong_shape_is_refused_without_the_key() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("key");
        let entry = |set: Vec<u8>| LogEntry {
            set,
            ..LogEntry::default()
        };
        // Real P-256 signatures (r and s of 32 or 33 bytes, sometimes fewer) pass.
        for i in 0..64u8 {
            let sig = key.sign(&rng, &[i]).expect("sign").as_ref().to_vec();
            assert_eq!(entry(sig.clone()).check_set_shape(), Ok(()), "{sig:02x?}");
            // Cut short, one byte more, another tag, a third integer: refused.
            assert!(
                entry(sig[..sig.len() - 1].to_vec())
                    .check_set_shape()
                    .is_err()
            );
            let mut longer = sig.clone();
            longer.push(0);
            assert!(entry(longer).check_set_shape().is_err());
            let mut tag = sig.clone();
            tag[0] = 0x31;
            assert!(entry(tag).check_set_shape().is_err());
            let mut three = sig.clone();
            three.extend_from_slice(&[0x02, 0x01, 0x01]);
            three[1] += 3;
            assert!(entry(three).check_set_shape().is_err());
        }
        for bad in [
            vec![],
            vec![0x30, 0x00],
            vec![0x30, 0x02, 0x02, 0x00],
            b"sig".to_vec(),
        ] {
            assert!(entry(bad).check_set_shape().is_err());
        }
        // An integer longer than P-256's is refused.
        let mut wide = vec![0x30, 38, 0x02, 34];
        wide.extend_from_slice(&[1; 34]);
        wide.extend_from_slice(&[0x02, 0x00]);
        assert!(entry(wide).check_set_shape().is_err());
    }
}
