//! One check of a signed artifact against its bundle, whatever the format (what `meshsign
//! verify` runs):
//!
//! | format | signature checked with | facts bound by |
//! | --- | --- | --- |
//! | native `FILE.sig.json` | the bundle's key, or the pinned key | the receipt inside |
//! | Sigstore `FILE.sigstore.json` | the pinned key (the bundle has a hint only) | its tlog entry (the receipt) |
//! | DSSE `FILE.intoto.json` | the pinned key | the statement itself (site-built, signed) |
//!
//! A distrust list needs the binding: a signature whose job, runner, region, key and time
//! cannot be read from something the site signed is refused by [`check_distrust`], so
//! stripping the receipt does not get a distrusted signature past the list.

use std::path::Path;

use base64::Engine as _;
use sha2::Digest as _;

use super::{SigBundle, VerifyError};
use crate::attest::{Binding, Envelope, SiteFacts};
use crate::verify;

/// What to check besides the signature.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// The key the signature must be under (SPKI DER); Sigstore and DSSE bundles need it.
    pub pin: Option<&'a [u8]>,
    /// What the pinned key signs, when the pin came with its verification material: a
    /// statement must be under an `attestation` key.
    pub pin_purposes: Option<&'a [String]>,
    /// Check the audit receipt (needs `audit_key`).
    pub receipt: bool,
    /// The site's audit key.
    pub audit_key: Option<&'a p256::ecdsa::VerifyingKey>,
    /// A checkpoint (C2SP note) to prove the receipt against instead of the bundle's.
    pub checkpoint: Option<&'a str>,
    /// An exported audit log to find a native bundle's entry in (with `receipt`).
    pub audit_log: Option<&'a [crate::audit::ExportLine]>,
    /// The binding is needed (a distrust list will be checked).
    pub need_binding: bool,
}

/// What was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// `native`, `sigstore` or `dsse`.
    pub format: &'static str,
    /// `alias@vN`.
    pub key_id: String,
    /// Site region.
    pub region: String,
    /// Environment.
    pub environment: String,
    /// The audit entry the signature names.
    pub audit_seq: u64,
    /// The facts the site signed about the signature (receipt entry or statement).
    pub binding: Option<Binding>,
    /// `Some(under a signed checkpoint)` when the receipt was checked.
    pub receipt: Option<bool>,
    /// A Sigstore bundle's transparency-log entry, checked (SET) when a distrust list is to
    /// be checked or `--receipt` was asked: what a distrust list matches it by.
    pub log: Option<crate::distrust::LogFacts>,
    /// The transparency-log index a Sigstore bundle's entry names (checked or not).
    pub log_index: Option<u64>,
}

/// Checks `file` against `bundle_json` (any of the three formats, told from the content).
pub fn bundle(file: &Path, bundle_json: &[u8], o: &Options<'_>) -> Result<Checked, VerifyError> {
    let bad = |e: serde_json::Error| VerifyError::Failed(format!("bundle: {e}"));
    let value: serde_json::Value = serde_json::from_slice(bundle_json).map_err(bad)?;
    let opts = (o.receipt, o.audit_key, o.checkpoint);
    if value.get("mediaType").is_some() {
        let b: crate::bundle::sigstore::Bundle = serde_json::from_value(value).map_err(bad)?;
        sigstore(file, &b, (o.pin, o.pin_purposes), opts, o.need_binding)
    } else if value.get("payloadType").is_some() {
        let env: Envelope = serde_json::from_value(value).map_err(bad)?;
        if o.receipt {
            return Err(VerifyError::Input(
                "a DSSE envelope carries no receipt (the statement names its audit entry); \
                 --receipt applies to native and Sigstore bundles"
                    .into(),
            ));
        }
        dsse(file, &env, o.pin, o.pin_purposes)
    } else {
        let b: SigBundle = serde_json::from_value(value).map_err(bad)?;
        native(file, &b, o, opts)
    }
}

type ReceiptOpts<'a> = (bool, Option<&'a p256::ecdsa::VerifyingKey>, Option<&'a str>);

/// The receipt's entry when the receipt is asked for, or needed for a distrust list.
fn bound_entry(
    receipt: Option<&crate::receipt::Receipt>,
    (asked, key, checkpoint): ReceiptOpts<'_>,
    needed: bool,
    digest_hex: &str,
    key_id: &str,
) -> Result<Option<crate::audit::AuditRecord>, VerifyError> {
    if !(asked || needed) {
        return Ok(None);
    }
    let (Some(receipt), Some(key)) = (receipt, key) else {
        return if asked {
            Err(VerifyError::Failed(
                "the bundle carries no audit receipt".into(),
            ))
        } else {
            Ok(None)
        };
    };
    Ok(Some(verify::check_receipt(
        receipt, key, checkpoint, digest_hex, key_id, "Sign",
    )?))
}

fn native(
    file: &Path,
    b: &SigBundle,
    o: &Options<'_>,
    opts: ReceiptOpts<'_>,
) -> Result<Checked, VerifyError> {
    let (pin, needed) = (o.pin, o.need_binding);
    verify::verify_file(file, b, pin)?;
    let mut receipt = None;
    let entry = match (o.audit_log, opts) {
        (Some(lines), (true, Some(key), _)) => {
            receipt = Some(verify::verify_receipt(b, lines, key)?);
            bound_entry(
                b.receipt.as_ref(),
                (false, opts.1, opts.2),
                needed,
                &b.digest_sha256,
                &b.key_id,
            )?
        }
        _ => {
            let e = bound_entry(
                b.receipt.as_ref(),
                opts,
                needed,
                &b.digest_sha256,
                &b.key_id,
            )?;
            if opts.0 {
                receipt = Some(true);
            }
            e
        }
    };
    if let Some(e) = &entry {
        names_signature(e, b, file)?;
    }
    Ok(Checked {
        format: "native",
        key_id: b.key_id.clone(),
        region: b.region.clone(),
        environment: b.environment.clone(),
        audit_seq: b.audit_seq,
        binding: entry
            .as_ref()
            .map(Binding::from_entry)
            .transpose()
            .map_err(VerifyError::Failed)?,
        receipt,
        log: None,
        log_index: None,
    })
}

/// The receipt's entry must name this very signature: its transparency leaf (the
/// `hashedrekord` body of the bundle's digest, signature and key) is among the leaves the entry
/// names. A receipt of another signature over the same digest — or by another key — does not.
fn names_signature(
    e: &crate::audit::AuditRecord,
    b: &SigBundle,
    file: &Path,
) -> Result<(), VerifyError> {
    let fail = |m: &str| VerifyError::Failed(format!("receipt: {m}"));
    let leaves = e.tlog.as_ref().and_then(|t| t.hashes()).ok_or_else(|| {
        fail(
            "its entry names no transparency leaf, so it does not say which signature it is \
             for (an entry from before meshsign wrote them): fetch the bundle's receipt again \
             or verify against the audit log (--audit-log)",
        )
    })?;
    let spki = verify::spki_from_pem(&b.public_key_pem)?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&b.signature)
        .map_err(|_| fail("the bundle's signature is not base64"))?;
    let digest: [u8; 32] = hex::decode(&b.digest_sha256)
        .ok()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| fail("the bundle's digest is not 32 bytes of hex"))?;
    // A P-384 key's message signature is logged under the SHA-384 of the message.
    let body = match crate::rekor::BodyHash::for_algorithm(&b.algorithm) {
        crate::rekor::BodyHash::Sha384 => crate::rekor::hashedrekord_with(
            crate::rekor::BodyHash::Sha384,
            &crate::rekor::BodyHash::Sha384.of(&verify::read_message(file)?),
            &sig,
            &spki,
        ),
        crate::rekor::BodyHash::Sha256 => crate::rekor::hashedrekord(&digest, &sig, &spki),
    };
    let leaf = crate::merkle::leaf_hash(&body);
    if !leaves.contains(&leaf) {
        return Err(fail(&format!(
            "audit entry {} is of another signature or key than this bundle's (it names no \
             transparency leaf of this signature by {})",
            e.seq, b.key_id
        )));
    }
    Ok(())
}

fn sigstore(
    file: &Path,
    b: &crate::bundle::sigstore::Bundle,
    (pin, purposes): (Option<&[u8]>, Option<&[String]>),
    opts: ReceiptOpts<'_>,
    needed: bool,
) -> Result<Checked, VerifyError> {
    let spki = pin.ok_or_else(|| {
        VerifyError::Input(
            "a Sigstore bundle names its key only by hint: give the key with --public-key \
             (meshsign verification-material)"
                .into(),
        )
    })?;
    use crate::bundle::sigstore::{MEDIA_TYPE, MEDIA_TYPE_V01};
    if b.media_type != MEDIA_TYPE && b.media_type != MEDIA_TYPE_V01 {
        return Err(VerifyError::Failed(format!(
            "media type `{}` is neither {MEDIA_TYPE} nor {MEDIA_TYPE_V01}",
            crate::audit::excerpt(&b.media_type, 80),
        )));
    }
    if let Some(env) = &b.dsse_envelope {
        return sigstore_dsse(file, b, env, (spki, purposes), opts, needed);
    }
    let ms = b
        .message_signature
        .as_ref()
        .ok_or_else(|| VerifyError::Failed("the bundle has no messageSignature".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let digest = verify::sha256_file(file)?;
    // SHA-256 of the file, or SHA-384 of it for a P-384 key's message bundle.
    let named = match crate::rekor::BodyHash::from_sigstore(&ms.message_digest.algorithm) {
        Some(crate::rekor::BodyHash::Sha256) => Some(digest.to_vec()),
        Some(h @ crate::rekor::BodyHash::Sha384) => Some(h.of(&verify::read_message(file)?)),
        None => None,
    };
    if named.is_none() || b64.decode(&ms.message_digest.digest).ok() != named {
        return Err(VerifyError::Failed(format!(
            "{} does not match the signed digest (file changed?)",
            file.display()
        )));
    }
    let sig = b64
        .decode(&ms.signature)
        .map_err(|_| VerifyError::Failed("signature is not base64".into()))?;
    let algs = verify::algorithms_for_spki(spki);
    let ok = algs.iter().any(|alg| {
        if verify::messages_only(alg) {
            verify::read_message(file)
                .map(|m| verify::verify_message(alg, spki, &m, &sig).is_ok())
                .unwrap_or(false)
        } else {
            verify::verify_signature(alg, spki, &digest, &sig).is_ok()
        }
    });
    if !ok {
        return Err(VerifyError::Failed(
            "signature does not match the pinned key".into(),
        ));
    }
    let hint = &b.verification_material.public_key.hint;
    let mut parts = hint.splitn(3, '/');
    let (region, environment, key_id) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    if let Some(t) = b
        .verification_material
        .tlog_entries
        .first()
        .filter(|t| t.is_transparency())
    {
        return sigstore_transparency(
            t,
            b,
            (&digest, &sig, spki),
            opts,
            needed,
            (region, environment, key_id),
        );
    }
    let receipt = b.receipt()?;
    let entry = bound_entry(
        receipt.as_ref(),
        opts,
        needed,
        &hex::encode(digest),
        &key_id,
    )?;
    Ok(Checked {
        format: "sigstore",
        key_id,
        region,
        environment,
        // The checked entry's seq; without --receipt, the seq the bundle's log entry names
        // (as a native bundle's `audit_seq` is reported), never 0 for "not checked".
        audit_seq: entry
            .as_ref()
            .map(|e| e.seq)
            .or(receipt.as_ref().map(|r| r.log_index + 1))
            .unwrap_or_default(),
        binding: entry
            .as_ref()
            .map(Binding::from_entry)
            .transpose()
            .map_err(VerifyError::Failed)?,
        receipt: opts.0.then_some(true),
        log: None,
        log_index: None,
    })
}

/// A Sigstore bundle whose log entry is in the site's transparency log: the body must be this
/// signature (digest, signature bytes, the pinned key); with `--receipt`, the SET and — if the
/// bundle has one — the inclusion proof are checked with the audit key. The body names no
/// job: such a bundle has no binding for a distrust list.
fn sigstore_transparency(
    t: &crate::bundle::sigstore::TlogEntry,
    b: &crate::bundle::sigstore::Bundle,
    (digest, sig, spki): (&[u8; 32], &[u8], &[u8]),
    (asked, key, checkpoint): ReceiptOpts<'_>,
    needed: bool,
    (region, environment, key_id): (String, String, String),
) -> Result<Checked, VerifyError> {
    let fail = |m: &str| VerifyError::Failed(format!("bundle tlog entry: {m}"));
    if b.media_type == crate::bundle::sigstore::MEDIA_TYPE && t.inclusion_proof.is_none() {
        return Err(fail("a v0.3 bundle's entry has no inclusion proof"));
    }
    // The message signature was checked against `digest` and `sig` by the caller.
    let _ = (digest, sig);
    let e = t.log_entry()?;
    b.entry_binds(spki)?;
    let mut receipt = None;
    let mut log = None;
    if asked || needed {
        let key = key.ok_or_else(|| {
            VerifyError::Input(
                "the log entry is checked with the site's audit key: give --audit-key".into(),
            )
        })?;
        let (_, proven) = t.verify_transparency(key, checkpoint)?;
        receipt = asked.then_some(proven);
        log = Some(crate::distrust::LogFacts {
            leaf: hex::encode(crate::merkle::leaf_hash(&e.body)),
            key_spki_sha256: hex::encode(sha2::Sha256::digest(spki)),
            time: e.integrated_time,
            region: region.clone(),
            environment: environment.clone(),
            log_index: e.log_index,
        });
    }
    Ok(Checked {
        format: "sigstore",
        key_id,
        region,
        environment,
        audit_seq: 0,
        binding: None,
        receipt,
        log,
        log_index: Some(e.log_index),
    })
}

/// A Sigstore bundle of an attestation: the statement is checked as a DSSE envelope is
/// ([`dsse`]: signed by the pinned key, about this file), its log entry must be of this
/// envelope and key, and with `--receipt` the SET and proof are checked with the audit key.
/// The statement's site facts are the binding.
fn sigstore_dsse(
    file: &Path,
    b: &crate::bundle::sigstore::Bundle,
    env: &Envelope,
    (spki, purposes): (&[u8], Option<&[String]>),
    (asked, key, checkpoint): ReceiptOpts<'_>,
    needed: bool,
) -> Result<Checked, VerifyError> {
    let mut checked = dsse(file, env, Some(spki), purposes)?;
    checked.format = "sigstore";
    let t = b
        .verification_material
        .tlog_entries
        .first()
        .ok_or_else(|| VerifyError::Failed("the bundle has no log entry".into()))?;
    b.entry_binds(spki)?;
    checked.log_index = Some(t.log_entry()?.log_index);
    if asked {
        let key = key.ok_or_else(|| {
            VerifyError::Input(
                "the log entry is checked with the site's audit key: give --audit-key".into(),
            )
        })?;
        let (_, proven) = t.verify_transparency(key, checkpoint)?;
        checked.receipt = Some(proven);
    }
    let _ = needed; // the statement's facts bind it
    Ok(checked)
}

/// A statement is the site's word only under a key whose one purpose is `attestation`: a
/// digest or message key can be made to sign the PAE of a statement a runner wrote.
fn attestation_key(purposes: Option<&[String]>) -> Result<(), VerifyError> {
    match purposes {
        Some(p) if p.iter().any(|x| x == "attestation") => Ok(()),
        Some(p) => Err(VerifyError::Failed(format!(
            "the pinned key signs {}, not statements (purpose attestation): a statement under \
             it is not the site's",
            if p.is_empty() {
                "nothing".to_string()
            } else {
                p.join(", ")
            }
        ))),
        None => Err(VerifyError::Input(
            "a statement is the site's word only under an attestation key: pin the key with the \
             JSON of `meshsign verification-material --key K --output json`, which says its \
             purpose"
                .into(),
        )),
    }
}

fn dsse(
    file: &Path,
    env: &Envelope,
    pin: Option<&[u8]>,
    purposes: Option<&[String]>,
) -> Result<Checked, VerifyError> {
    attestation_key(purposes)?;
    let spki = pin.ok_or_else(|| {
        VerifyError::Input(
            "a DSSE envelope does not carry its key: give the attestation key with --public-key \
             (meshsign verification-material)"
                .into(),
        )
    })?;
    let digest = verify::sha256_file(file)?;
    let statement = verify::open_statement(env, spki, &digest)?;
    let facts = SiteFacts::from_statement(&statement).map_err(VerifyError::Failed)?;
    Ok(Checked {
        format: "dsse",
        key_id: facts.key_id.clone(),
        region: facts.region.clone(),
        environment: facts.environment.clone(),
        audit_seq: facts.audit_seq,
        binding: Some(facts.binding().map_err(VerifyError::Failed)?),
        receipt: None,
        log: None,
        log_index: None,
    })
}
