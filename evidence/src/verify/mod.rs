//! Offline verification: signatures (P-256 with pure-Rust p256; RSA, P-384 and Ed25519 with
//! aws-lc-rs), native bundles, receipts, distrust lists and DSSE statements. One typed error,
//! [`VerifyError`]: `Failed` is "does not verify" (the CLI's exit 1); `Io` and `Input` are the
//! verifier's inputs (exit 2 and 6 there).

use std::io::Read as _;
use std::path::Path;

use base64::Engine as _;
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use p256::ecdsa::{DerSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

pub mod bundle;

pub use crate::bundle::native::SigBundle;

pub use crate::error::VerifyError;

/// SHA-256 of a file, streamed (any size).
pub fn sha256_file(path: &Path) -> Result<[u8; 32], VerifyError> {
    let mut f = std::fs::File::open(path).map_err(VerifyError::io(path))?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(VerifyError::io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// SPKI DER from a PEM public key.
pub fn spki_from_pem(pem: &str) -> Result<Vec<u8>, VerifyError> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    use rustls_pki_types::pem::PemObject as _;
    SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map(|k| k.to_vec())
        .map_err(|e| VerifyError::Failed(format!("public key PEM: {e}")))
}

/// Verifies a DER ECDSA P-256 signature over a SHA-256 digest with an SPKI public key.
pub fn verify_digest(
    spki_der: &[u8],
    digest: &[u8; 32],
    sig_der: &[u8],
) -> Result<(), VerifyError> {
    let vk = VerifyingKey::from_public_key_der(spki_der)
        .map_err(|e| VerifyError::Failed(format!("public key: {e}")))?;
    let sig = DerSignature::try_from(sig_der)
        .map_err(|e| VerifyError::Failed(format!("signature encoding: {e}")))?;
    vk.verify_prehash(digest, &sig)
        .map_err(|_| VerifyError::Failed("signature does not match".into()))
}

/// Verifies a signature over a SHA-256 digest for any algorithm a site key can have: ECDSA
/// P-256 with pure-Rust p256; RSA (PKCS#1 v1.5, PSS) with aws-lc-rs
/// ([`crate::sig`], the check the site runs on every token signature).
pub fn verify_signature(
    algorithm: &str,
    spki_der: &[u8],
    digest: &[u8; 32],
    sig: &[u8],
) -> Result<(), VerifyError> {
    if algorithm == "ecdsa-p256-sha256" {
        return verify_digest(spki_der, digest, sig);
    }
    crate::sig::verify_digest(algorithm, spki_der, digest, sig)
        .map_err(|e| VerifyError::Failed(e.to_string()))
}

/// Whether `algorithm` signs messages only (the signature is over the message, not a SHA-256
/// digest): ECDSA P-384 (SHA-384 of the message) and Ed25519 (pure EdDSA).
pub fn messages_only(algorithm: &str) -> bool {
    crate::sig::messages_only(algorithm)
}

/// The most a message signature covers (the site refuses longer messages).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Verifies a signature over a message, for every algorithm: the digest algorithms over its
/// SHA-256, P-384 over its SHA-384, Ed25519 over the message itself.
pub fn verify_message(
    algorithm: &str,
    spki_der: &[u8],
    message: &[u8],
    sig: &[u8],
) -> Result<(), VerifyError> {
    if crate::sig::messages_only(algorithm) {
        return crate::sig::verify_message(algorithm, spki_der, message, sig)
            .map_err(|e| VerifyError::Failed(e.to_string()));
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref());
    verify_signature(algorithm, spki_der, &d, sig)
}

/// Checks `file` against its bundle: the digest matches and the signature verifies under the
/// bundle's key, which must equal `pinned_spki` when one is given.
pub fn verify_file(
    file: &Path,
    bundle: &SigBundle,
    pinned_spki: Option<&[u8]>,
) -> Result<(), VerifyError> {
    let digest = sha256_file(file)?;
    if hex::encode(digest) != bundle.digest_sha256 {
        return Err(VerifyError::Failed(format!(
            "{} does not match the signed digest (file changed?)",
            file.display()
        )));
    }
    let spki = spki_from_pem(&bundle.public_key_pem)?;
    if let Some(pin) = pinned_spki
        && pin != spki.as_slice()
    {
        return Err(VerifyError::Failed(
            "bundle key is not the pinned public key".into(),
        ));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&bundle.signature)
        .map_err(|_| VerifyError::Failed("signature is not base64".into()))?;
    if messages_only(&bundle.algorithm) {
        // The signature is over the file's bytes (a message of at most 4 KiB).
        let message = read_message(file)?;
        return verify_message(&bundle.algorithm, &spki, &message, &sig);
    }
    verify_signature(&bundle.algorithm, &spki, &digest, &sig)
}

/// A file's bytes as a message to sign or verify (refused above [`MAX_MESSAGE_BYTES`]).
pub fn read_message(file: &Path) -> Result<Vec<u8>, VerifyError> {
    let len = std::fs::metadata(file)
        .map_err(VerifyError::io(file))?
        .len();
    if len > MAX_MESSAGE_BYTES as u64 {
        return Err(VerifyError::Input(format!(
            "{}: {len} bytes; a message signature covers at most {MAX_MESSAGE_BYTES} bytes \
             (sign a digest with a P-256 or RSA key instead)",
            file.display()
        )));
    }
    std::fs::read(file).map_err(VerifyError::io(file))
}

/// Reads an audit public key (SPKI PEM).
pub fn audit_key_from_pem(pem: &str) -> Result<p256::ecdsa::VerifyingKey, VerifyError> {
    VerifyingKey::from_public_key_der(&spki_from_pem(pem)?)
        .map_err(|e| VerifyError::Failed(format!("audit key: {e}")))
}

/// Checks that `bundle`'s signature is recorded in a verified audit export: the entry named by
/// the receipt exists with that hash, allowed this digest with this key. Returns whether a
/// signed checkpoint after it anchors it.
pub fn verify_receipt(
    bundle: &SigBundle,
    export: &[crate::audit::ExportLine],
    audit_key: &p256::ecdsa::VerifyingKey,
) -> Result<bool, VerifyError> {
    use crate::audit::ExportLine;
    crate::audit::verify_export_from(export, audit_key, crate::audit::Start::GenesisOrCheckpoint)
        .map_err(|e| VerifyError::Failed(e.to_string()))?;
    let entry = export
        .iter()
        .find_map(|l| match l {
            ExportLine::Entry(e) if e.seq == bundle.audit_seq => Some(e),
            _ => None,
        })
        .ok_or_else(|| {
            VerifyError::Failed(format!(
                "audit entry {} is not in the export",
                bundle.audit_seq
            ))
        })?;
    if entry.hash != bundle.audit_hash {
        return Err(VerifyError::Failed(format!(
            "audit entry {} has another hash than the receipt",
            entry.seq
        )));
    }
    if entry.decision != "allow"
        || entry.digest != bundle.digest_sha256
        || entry.key_id != bundle.key_id
    {
        return Err(VerifyError::Failed(format!(
            "audit entry {} does not record this signature",
            entry.seq
        )));
    }
    let anchored = export
        .iter()
        .any(|l| matches!(l, ExportLine::Entry(e) if e.seq > entry.seq && e.checkpoint.is_some()));
    Ok(anchored)
}

/// Reads an audit public key (SPKI DER).
pub fn audit_key_from_der(spki: &[u8]) -> Result<p256::ecdsa::VerifyingKey, VerifyError> {
    VerifyingKey::from_public_key_der(spki)
        .map_err(|e| VerifyError::Failed(format!("audit key: {e}")))
}

/// Checks that a receipt proves *this* signature: the receipt verifies (entry, inclusion proof,
/// checkpoint signed by `audit_key` — or the `checkpoint` given), and its entry allowed a Sign
/// of `digest_hex` with `key_id`. Returns the entry.
pub fn check_receipt(
    receipt: &crate::receipt::Receipt,
    audit_key: &p256::ecdsa::VerifyingKey,
    checkpoint: Option<&str>,
    digest_hex: &str,
    key_id: &str,
    rpc: &str,
) -> Result<crate::audit::AuditRecord, VerifyError> {
    let entry = receipt
        .verify(audit_key, checkpoint)
        .map_err(|e| VerifyError::Failed(e.to_string()))?;
    if entry.decision != "allow" || entry.rpc != rpc {
        return Err(VerifyError::Failed(format!(
            "receipt: audit entry {} is a {} {} ({}), not an allowed {rpc}",
            entry.seq, entry.rpc, entry.decision, entry.reason
        )));
    }
    if entry.digest != digest_hex || entry.key_id != key_id {
        return Err(VerifyError::Failed(format!(
            "receipt: audit entry {} records {} with {}, not this signature ({digest_hex} with \
             {key_id})",
            entry.seq, entry.digest, entry.key_id
        )));
    }
    Ok(entry)
}

/// Opens a distrust list signed by the audit key (a DSSE envelope, JSON).
pub fn open_distrust_list(
    envelope_json: &[u8],
    audit_key: &p256::ecdsa::VerifyingKey,
) -> Result<crate::distrust::DistrustList, VerifyError> {
    use p256::ecdsa::signature::Verifier as _;
    let env: crate::attest::Envelope = serde_json::from_slice(envelope_json)
        .map_err(|e| VerifyError::Failed(format!("distrust list: not a DSSE envelope: {e}")))?;
    if env.payload_type != crate::attest::DISTRUST_PAYLOAD_TYPE {
        return Err(VerifyError::Failed(format!(
            "distrust list: payload type `{}` is not {}",
            crate::audit::excerpt(&env.payload_type, 80),
            crate::attest::DISTRUST_PAYLOAD_TYPE
        )));
    }
    let pae = env.pae().map_err(|e| VerifyError::Failed(e.to_string()))?;
    let signed = env.signature_bytes().iter().any(|s| {
        DerSignature::try_from(s.as_slice())
            .map(|sig| audit_key.verify(&pae, &sig).is_ok())
            .unwrap_or(false)
    });
    if !signed {
        return Err(VerifyError::Failed(
            "distrust list: not signed by the audit key".into(),
        ));
    }
    serde_json::from_slice(
        &env.payload_bytes()
            .map_err(|e| VerifyError::Failed(e.to_string()))?,
    )
    .map_err(|e| VerifyError::Failed(format!("distrust list: {e}")))
}

/// The algorithms a site key with this SPKI can have (RSA: PKCS#1 v1.5 and PSS).
pub fn algorithms_for_spki(spki: &[u8]) -> Vec<&'static str> {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    const RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    // The AlgorithmIdentifier is at the front of the SPKI.
    let head = &spki[..spki.len().min(32)];
    let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
    if has(P256) {
        vec!["ecdsa-p256-sha256"]
    } else if has(P384) {
        vec!["ecdsa-p384-sha384"]
    } else if has(ED25519) {
        vec!["ed25519"]
    } else if has(RSA) {
        vec!["rsa-pkcs1-sha256", "rsa-pss-sha256"]
    } else {
        Vec::new()
    }
}

/// Opens a DSSE envelope of an in-toto statement signed by the pinned key `spki`, and checks
/// that one of its subjects is `digest`. Returns the statement.
pub fn open_statement(
    envelope: &crate::attest::Envelope,
    spki: &[u8],
    digest: &[u8; 32],
) -> Result<crate::attest::Statement, VerifyError> {
    if envelope.payload_type != crate::attest::INTOTO_PAYLOAD_TYPE {
        return Err(VerifyError::Failed(format!(
            "DSSE payload type `{}` is not {}",
            crate::audit::excerpt(&envelope.payload_type, 80),
            crate::attest::INTOTO_PAYLOAD_TYPE
        )));
    }
    let pae = envelope
        .pae()
        .map_err(|e| VerifyError::Failed(e.to_string()))?;
    let signed = envelope.signature_bytes().iter().any(|sig| {
        algorithms_for_spki(spki)
            .iter()
            .any(|alg| verify_message(alg, spki, &pae, sig).is_ok())
    });
    if !signed {
        return Err(VerifyError::Failed(
            "the statement is not signed by the pinned key".into(),
        ));
    }
    let payload = envelope
        .payload_bytes()
        .map_err(|e| VerifyError::Failed(e.to_string()))?;
    let statement: crate::attest::Statement = serde_json::from_slice(&payload)
        .map_err(|e| VerifyError::Failed(format!("statement: {e}")))?;
    if statement.type_ != crate::attest::STATEMENT_TYPE {
        return Err(VerifyError::Failed("not an in-toto Statement v1".into()));
    }
    let want = hex::encode(digest);
    if !statement
        .subject
        .iter()
        .any(|s| s.digest.get("sha256") == Some(&want))
    {
        return Err(VerifyError::Failed(format!(
            "the statement is not about this file (sha256 {want})"
        )));
    }
    Ok(statement)
}

/// Refuses a signature whose transparency-log entry falls under a rule of `list` (which must
/// be of the same site and environment); the entry's SET must have been verified.
pub fn check_distrust_log(
    list: &crate::distrust::DistrustList,
    f: &crate::distrust::LogFacts,
) -> Result<(), VerifyError> {
    same_site(list, &f.region)?;
    match list.matching_log(f).map_err(VerifyError::Failed)? {
        None => Ok(()),
        Some(rule) => Err(distrusted(
            list,
            rule,
            &format!("transparency-log entry {}", f.log_index),
        )),
    }
}

/// Refuses a signature whose bound facts fall under a rule of `list` (which must be of the
/// same site and environment).
pub fn check_distrust(
    list: &crate::distrust::DistrustList,
    binding: &crate::attest::Binding,
) -> Result<(), VerifyError> {
    same_site(list, &binding.region)?;
    match list.matching(binding).map_err(VerifyError::Failed)? {
        None => Ok(()),
        Some(rule) => Err(distrusted(
            list,
            rule,
            &format!(
                "job {}, runner {}, key {}, audit entry {}",
                binding.job_id, binding.runner_fingerprint, binding.key_id, binding.audit_seq
            ),
        )),
    }
}

fn same_site(list: &crate::distrust::DistrustList, region: &str) -> Result<(), VerifyError> {
    if list.region != region {
        return Err(VerifyError::Failed(format!(
            "the distrust list is of the site in `{}`; the signature was made in `{region}`",
            list.region
        )));
    }
    Ok(())
}

/// "distrusted: rule … matches this signature (what)".
fn distrusted(
    list: &crate::distrust::DistrustList,
    rule: &crate::distrust::DistrustEntry,
    what: &str,
) -> VerifyError {
    VerifyError::Failed(format!(
        "distrusted: rule {} ({}{}) of distrust list version {} matches this signature ({what})",
        rule.id,
        rule.describe(),
        if rule.reason.is_empty() {
            String::new()
        } else {
            format!("; {}", rule.reason)
        },
        list.version,
    ))
}
