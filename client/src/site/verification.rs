//! What offline verifiers check, fetched from a site's public Verification service (enroll
//! port, server-authenticated TLS): receipts — an audit entry's inclusion proof to a checkpoint
//! signed by the audit key — the audit key itself, and distrust lists.
//!
//! Everything fetched here is also checked here against the audit key the same site names, so
//! a bundle never carries a receipt that does not verify.

use meshsign_evidence::receipt::Receipt;
use meshsign_proto::v1::{self, verification_client::VerificationClient};
use tonic::transport::Channel;

use crate::net;
use crate::{ClientConfig, ClientError};

/// A client of the site's public Verification service.
pub type Client = VerificationClient<Channel>;

/// A Verification client on the config's enroll endpoint.
pub async fn client(cfg: &ClientConfig) -> Result<Client, ClientError> {
    let tls = net::tls_config(net::roots(cfg)?, None)?;
    let ch = net::connect_to(cfg, &cfg.enroll_endpoint, tls).await?;
    Ok(VerificationClient::new(ch))
}

/// A key's verification material, with the site's audit key.
pub async fn material(
    v: &mut VerificationClient<Channel>,
    environment: &str,
    alias: &str,
) -> Result<v1::GetVerificationMaterialResponse, ClientError> {
    Ok(
        v.get_verification_material(v1::GetVerificationMaterialRequest {
            environment: environment.to_string(),
            key_alias: alias.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetVerificationMaterial", s))?
        .into_inner(),
    )
}

/// The Apple signing identity (certificate chain) of a key.
pub async fn signing_identity(
    v: &mut Client,
    environment: &str,
    alias: &str,
) -> Result<v1::SigningIdentity, ClientError> {
    Ok(v.get_signing_identity(v1::GetVerificationMaterialRequest {
        environment: environment.to_string(),
        key_alias: alias.to_string(),
    })
    .await
    .map_err(|s| ClientError::rpc("GetSigningIdentity", s))?
    .into_inner())
}

/// The receipt of audit entry `seq` whose stored bytes `entry` the site returned to this
/// caller with its signature (the Verification service proves inclusion by the entry's leaf
/// hash and never serves contents), checked against `audit_spki` (the site's audit key) before
/// it is returned.
pub async fn receipt(
    v: &mut VerificationClient<Channel>,
    seq: u64,
    entry: &[u8],
    audit_spki: &[u8],
) -> Result<Receipt, ClientError> {
    use base64::Engine as _;
    if entry.is_empty() {
        return Err(ClientError::Crypto(format!(
            "the site returned no audit entry with its signature (seq {seq}): it predates \
             receipts by leaf hash; upgrade the site"
        )));
    }
    let p = v
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq,
            leaf_hash: meshsign_evidence::merkle::leaf_hash(entry).to_vec(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetInclusionProof", s))?
        .into_inner();
    let receipt = Receipt {
        log_index: p.log_index,
        tree_size: p.tree_size,
        hashes: p.hashes.iter().map(hex::encode).collect(),
        checkpoint: p.checkpoint,
        entry: base64::engine::general_purpose::STANDARD.encode(entry),
    };
    let key = meshsign_evidence::verify::audit_key_from_der(audit_spki)?;
    let got = receipt
        .verify(&key, None)
        .map_err(|e| ClientError::Verify(format!("the site's receipt does not verify: {e}")))?;
    if got.seq != seq {
        return Err(ClientError::Verify(format!(
            "the site returned a receipt for another entry ({} instead of {seq})",
            got.seq
        )));
    }
    Ok(receipt)
}

/// The Sigstore bundle (v0.1: the log entry with its signed entry timestamp) of a Sign
/// response whose signature was checked ([`bundle_from_response`]): the entry's body must be
/// this signature, digest and key, and its SET a well-formed ECDSA signature. `digest` is
/// what the signature is over: the file's SHA-256, or SHA-384 of a P-384 key's message.
///
/// The SET's signature itself is not verified here. The audit key it would be checked against
/// comes from the same site over the same channel, so at write time the check could only
/// find a fault of the site itself, at one ECDSA verification per file (on a 2-core host the
/// largest client cost of `meshsign sign`, and Sigstore's own signer, sigstore-js's
/// `RekorWitness`, packs the log's answer unchecked too). Every verifier checks it against the
/// trusted root (`meshsign verify`, sigstore-js, sigstore-go), and `--wait-proof` /
/// `meshsign receipt fetch` check each bundle's SET and inclusion proof ([`add_log_proof`]).
/// See docs/design-notes.md, "What `meshsign sign` checks before it writes a bundle".
pub fn sigstore_bundle(
    r: &v1::SignResponse,
    hint: String,
    (hash, digest): (meshsign_evidence::rekor::BodyHash, &[u8]),
    log_key: &meshsign_evidence::rekor::LogKey,
) -> Result<meshsign_evidence::bundle::sigstore::Bundle, ClientError> {
    use meshsign_evidence::bundle::sigstore::{Bundle, TlogEntry};
    let t = r.transparency_entry.as_ref().ok_or_else(|| {
        ClientError::Crypto(
            "the site returned no transparency-log entry with its signature: it predates \
             Sigstore-verifiable bundles; upgrade the site"
                .into(),
        )
    })?;
    let entry = meshsign_evidence::rekor::LogEntry {
        log_index: t.log_index,
        integrated_time: t.integrated_time,
        body: t.canonicalized_body.clone(),
        set: t.signed_entry_timestamp.clone(),
    };
    let bad = |e: String| ClientError::Verify(format!("the site's log entry: {e}"));
    if t.signed_entry_timestamp.is_empty() {
        return Err(bad(
            "it has no signed entry timestamp: the request must ask for one \
             (`Session::sign_promised`, or `signed_entry_timestamp` in SignBatch)"
                .into(),
        ));
    }
    if t.log_id != log_key.id {
        return Err(bad(
            "its SET names another log key than the site's audit key (was the audit key \
             rotated during the run? sign again)"
                .into(),
        ));
    }
    entry.check_set_shape().map_err(|e| bad(e.to_string()))?;
    let facts =
        meshsign_evidence::rekor::body_facts(&entry.body).map_err(|e| bad(e.to_string()))?;
    let tlog = TlogEntry::from_checked(&entry, &log_key.id, facts.kind.clone());
    let b = Bundle::message(hint, (hash, digest), &r.signature, Some(tlog));
    if facts.digest != digest
        || facts.hash != hash
        || facts.signature != r.signature
        || facts.spki_der != r.public_key_der
    {
        return Err(ClientError::Verify(
            "the site's log entry is of another signature, digest or key".into(),
        ));
    }
    Ok(b)
}

/// The Sigstore bundle (v0.1) of an attestation: the envelope the site signed and its `dsse`
/// log entry, whose SET must verify under the site's audit key and whose body must be this
/// envelope's payload, signature and key.
pub async fn sigstore_dsse_bundle(
    cfg: &ClientConfig,
    r: &v1::AttestResponse,
    envelope: meshsign_evidence::attest::Envelope,
    hint: String,
) -> Result<meshsign_evidence::bundle::sigstore::Bundle, ClientError> {
    use meshsign_evidence::bundle::sigstore::{Bundle, TlogEntry};
    let t = r.transparency_entry.as_ref().ok_or_else(|| {
        ClientError::Crypto(
            "the site returned no transparency-log entry with the statement: upgrade the site"
                .into(),
        )
    })?;
    let mut v = client(cfg).await?;
    let spki = material(&mut v, &hint_environment(&hint), "")
        .await?
        .audit_public_key_der;
    let entry = meshsign_evidence::rekor::LogEntry {
        log_index: t.log_index,
        integrated_time: t.integrated_time,
        body: t.canonicalized_body.clone(),
        set: t.signed_entry_timestamp.clone(),
    };
    let tlog = TlogEntry::from_log_entry(&entry, &meshsign_evidence::rekor::log_id(&spki))?;
    let b = Bundle::dsse(hint, envelope, tlog);
    let key = meshsign_evidence::verify::audit_key_from_der(&spki)?;
    b.verification_material.tlog_entries[0]
        .verify_transparency(&key, None)
        .and_then(|_| b.entry_binds(&r.public_key_der))
        .map_err(|e| ClientError::Verify(format!("the site's log entry: {e}")))?;
    Ok(b)
}

/// The environment a key hint (`<region>/<environment>/<alias@vN>`) names.
pub fn hint_environment(hint: &str) -> String {
    hint.split('/').nth(1).unwrap_or_default().to_string()
}

/// `f` over `items` on up to one thread per core, results in order
/// ([`meshsign_evidence::par::par_map`]).
pub use meshsign_evidence::par::par_map;

/// The site's log key from its audit key (SPKI DER), parsed once for many SETs.
pub fn log_key(audit_spki: &[u8]) -> Result<meshsign_evidence::rekor::LogKey, ClientError> {
    let key = meshsign_evidence::verify::audit_key_from_der(audit_spki)?;
    meshsign_evidence::rekor::LogKey::new(&key).map_err(|e| ClientError::Verify(e.to_string()))
}

/// Adds the inclusion proof of `bundle`'s log entry (asked of the site, checked against its
/// audit key), making it a v0.3 bundle. A bundle that has its proof is left as it is.
pub async fn add_log_proof(
    v: &mut VerificationClient<Channel>,
    bundle: &mut meshsign_evidence::bundle::sigstore::Bundle,
    audit_spki: &[u8],
) -> Result<bool, ClientError> {
    let Some(t) = bundle.verification_material.tlog_entries.first() else {
        return Err(ClientError::Verify("the bundle has no log entry".into()));
    };
    if t.inclusion_proof.is_some() {
        return Ok(false);
    }
    let e = t.log_entry()?;
    let p = v
        .get_log_inclusion_proof(v1::GetLogInclusionProofRequest {
            log_index: e.log_index,
            leaf_hash: meshsign_evidence::merkle::leaf_hash(&e.body).to_vec(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetLogInclusionProof", s))?
        .into_inner();
    let hashes = p
        .hashes
        .iter()
        .map(|h| meshsign_evidence::merkle::Hash::try_from(h.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            ClientError::Verify("the site's proof has a hash that is not 32 bytes".into())
        })?;
    bundle.add_proof(p.tree_size, &hashes, &p.checkpoint)?;
    let key = meshsign_evidence::verify::audit_key_from_der(audit_spki)?;
    bundle.verification_material.tlog_entries[0]
        .verify_transparency(&key, None)
        .map_err(|e| ClientError::Verify(format!("the site's inclusion proof: {e}")))?;
    Ok(true)
}

/// The consistency proof between two sizes of the log of `origin` (unchecked: the caller
/// checks it against the two checkpoints it holds).
pub async fn consistency(
    v: &mut VerificationClient<Channel>,
    origin: &str,
    first: u64,
    second: u64,
) -> Result<Vec<meshsign_evidence::merkle::Hash>, ClientError> {
    let p = v
        .get_consistency_proof(v1::GetConsistencyProofRequest {
            origin: origin.to_string(),
            first_size: first,
            second_size: second,
        })
        .await
        .map_err(|s| ClientError::rpc("GetConsistencyProof", s))?
        .into_inner();
    p.hashes
        .iter()
        .map(|h| meshsign_evidence::merkle::Hash::try_from(h.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ClientError::Verify("the site's proof has a hash that is not 32 bytes".into()))
}

/// An environment's signed distrust list (envelope JSON), checked against the audit key.
pub async fn distrust_list(
    v: &mut VerificationClient<Channel>,
    environment: &str,
    audit_spki: &[u8],
) -> Result<(meshsign_evidence::distrust::DistrustList, Vec<u8>), ClientError> {
    let r = v
        .get_distrust_list(v1::GetDistrustListRequest {
            environment: environment.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetDistrustList", s))?
        .into_inner();
    let key = meshsign_evidence::verify::audit_key_from_der(audit_spki)?;
    let list = meshsign_evidence::verify::open_distrust_list(&r.envelope_json, &key)
        .map_err(|e| ClientError::Verify(format!("the site's distrust list: {e}")))?;
    Ok((list, r.envelope_json))
}

// === native bundles from Sign responses ===

use base64::Engine as _;
use meshsign_evidence::verify::SigBundle;

/// The bundle for a Sign response over `digest` of the artifact `name`, by a session in
/// `region`/`environment`. Checks first that the signature verifies under the returned key.
pub fn bundle_from_response(
    r: &meshsign_proto::v1::SignResponse,
    name: &str,
    digest: &[u8; 32],
    region: &str,
    environment: &str,
) -> Result<SigBundle, ClientError> {
    bundle_from_signed(r, name, (digest, None), region, environment)
}

/// [`bundle_from_response`] for a message signature (`message`: the bytes signed).
pub fn bundle_from_message_response(
    r: &meshsign_proto::v1::SignResponse,
    name: &str,
    message: &[u8],
    region: &str,
    environment: &str,
) -> Result<SigBundle, ClientError> {
    let mut d = [0u8; 32];
    d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref());
    bundle_from_signed(r, name, (&d, Some(message)), region, environment)
}

fn bundle_from_signed(
    r: &meshsign_proto::v1::SignResponse,
    name: &str,
    (digest, message): (&[u8; 32], Option<&[u8]>),
    region: &str,
    environment: &str,
) -> Result<SigBundle, ClientError> {
    match message {
        Some(m) => meshsign_evidence::verify::verify_message(
            &r.algorithm,
            &r.public_key_der,
            m,
            &r.signature,
        ),
        None => meshsign_evidence::verify::verify_signature(
            &r.algorithm,
            &r.public_key_der,
            digest,
            &r.signature,
        ),
    }
    .map_err(|e| {
        ClientError::Verify(format!(
            "site returned a signature that does not verify: {e}"
        ))
    })?;
    let signed_at = r
        .signed_at
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok(SigBundle {
        artifact: name.to_string(),
        digest_sha256: hex::encode(digest),
        signature: base64::engine::general_purpose::STANDARD.encode(&r.signature),
        key_id: r.key_id.clone(),
        algorithm: r.algorithm.clone(),
        public_key_pem: meshsign_evidence::pem_encode("PUBLIC KEY", &r.public_key_der),
        audit_id: r.audit_id.clone(),
        audit_seq: r.audit_seq,
        audit_hash: r.audit_hash.clone(),
        region: region.to_string(),
        environment: environment.to_string(),
        signed_at,
        certificate_chain_pem: r
            .certificate_chain
            .iter()
            .map(|c| meshsign_evidence::pem_encode("CERTIFICATE", c))
            .collect(),
        receipt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
    use meshsign_evidence::rekor::{self, BodyHash};

    /// SubjectPublicKeyInfo of a P-256 point.
    fn spki(k: &EcdsaKeyPair) -> Vec<u8> {
        let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        der.extend_from_slice(k.public_key().as_ref());
        der
    }

    /// A Sign response as a site makes it: the signature by `signer`, its hashedrekord body
    /// and a SET by `log`, naming `log_id`.
    fn response(signer: &EcdsaKeyPair, log: &EcdsaKeyPair, log_id: [u8; 32]) -> v1::SignResponse {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let digest = [7u8; 32];
        let signature = signer.sign(&rng, &digest).unwrap().as_ref().to_vec();
        let body = rekor::hashedrekord(&digest, &signature, &spki(signer));
        let set = log
            .sign(&rng, &rekor::set_payload(&body, 1_700_000_000, &log_id, 41))
            .unwrap()
            .as_ref()
            .to_vec();
        v1::SignResponse {
            signature,
            public_key_der: spki(signer),
            transparency_entry: Some(v1::TransparencyEntry {
                log_index: 41,
                integrated_time: 1_700_000_000,
                canonicalized_body: body,
                signed_entry_timestamp: set,
                log_id: log_id.to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_bundle_is_written_only_for_an_entry_bound_to_its_signature_and_log() {
        let new_key = || EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let (signer, log, other) = (new_key(), new_key(), new_key());
        let log_key = log_key(&spki(&log)).unwrap();
        let digest = (BodyHash::Sha256, &[7u8; 32][..]);
        let bundle = |r: &v1::SignResponse| sigstore_bundle(r, "r/e/k@v1".into(), digest, &log_key);
        let good = response(&signer, &log, log_key.id);
        let b = bundle(&good).unwrap();
        // What the writer did not check, the verifier does: the SET verifies with the log key.
        let audit = meshsign_evidence::verify::audit_key_from_der(&spki(&log)).unwrap();
        let (facts, proved) = b.verification_material.tlog_entries[0]
            .verify_transparency(&audit, None)
            .unwrap();
        assert_eq!((facts.signature, proved), (good.signature.clone(), false));

        // A body of another signature: refused.
        let mut r = good.clone();
        r.signature = response(&signer, &log, log_key.id).signature;
        assert!(
            bundle(&r)
                .unwrap_err()
                .to_string()
                .contains("another signature")
        );
        // A SET that names another log: refused before anything is written.
        let r = response(&signer, &other, [9; 32]);
        assert!(
            bundle(&r)
                .unwrap_err()
                .to_string()
                .contains("another log key")
        );
        // A SET cut short: refused.
        let mut r = good.clone();
        if let Some(t) = r.transparency_entry.as_mut() {
            t.signed_entry_timestamp.pop();
        }
        assert!(
            bundle(&r)
                .unwrap_err()
                .to_string()
                .contains("not a DER ECDSA")
        );
        // A well-formed SET by another key under the right log id is written (the writer does
        // not hold a key the site did not give it) and every verifier refuses it.
        let r = response(&signer, &other, log_key.id);
        let forged = bundle(&r).unwrap();
        let err = forged.verification_material.tlog_entries[0]
            .verify_transparency(&audit, None)
            .unwrap_err();
        assert!(err.to_string().contains("signed entry timestamp"), "{err}");
    }
}
