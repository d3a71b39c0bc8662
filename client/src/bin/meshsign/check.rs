//! `meshsign verify`: offline checks of a signature in any of the three formats, its audit
//! receipt, and a distrust list.
//!
//! | format | signature checked with | facts bound by |
//! | --- | --- | --- |
//! | native `FILE.sig.json` | the bundle's key, or `--public-key` | the receipt inside |
//! | Sigstore `FILE.sigstore.json` | `--public-key` (the bundle has a hint only) | its tlog entry (the receipt) |
//! | DSSE `FILE.intoto.json` | `--public-key` | the statement itself (site-built, signed) |
//!
//! With `--distrust-list` the binding is required: a signature whose job, runner, region, key
//! and time cannot be read from something the site signed is refused, so stripping the
//! receipt does not get a distrusted signature past the list.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use meshsign_client::ClientError;
use meshsign_client::verify::{self, SigBundle};
use meshsign_evidence::attest::{Binding, Envelope, SiteFacts};

use super::admin::Format;

/// `meshsign verify` arguments.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The file.
    file: PathBuf,
    /// Also check the signature's audit receipt: the one in the bundle (with --audit-key), or
    /// against an exported audit log (with --audit-log and --audit-key).
    #[arg(long, requires = "audit_key")]
    receipt: bool,
    /// Audit export (JSON lines) for --receipt.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The site's audit public key (PEM; `verification-material --audit-key`), for --receipt
    /// and --distrust-list.
    #[arg(long)]
    audit_key: Option<PathBuf>,
    /// A checkpoint (C2SP signed note) to prove the receipt against instead of the one the
    /// bundle carries; it must be of the same tree size.
    #[arg(long, requires = "receipt")]
    checkpoint: Option<PathBuf>,
    /// Refuse the signature if a rule of this signed distrust list (`verification-material
    /// --distrust-list`) matches it; needs --audit-key, and a signature bound to its job.
    #[arg(long, requires = "audit_key")]
    distrust_list: Option<PathBuf>,
    /// Signature bundle (default: FILE.sig.json, FILE.sigstore.json or FILE.intoto.json,
    /// the first that exists).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Require this public key (PEM, from verification-material); needed for Sigstore and
    /// DSSE bundles, which do not carry the key.
    #[arg(long)]
    public_key: Option<PathBuf>,
}

fn read(p: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(p).map_err(ClientError::io(p))
}

/// What was checked, for the report.
struct Checked {
    format: &'static str,
    key_id: String,
    region: String,
    environment: String,
    audit_seq: u64,
    binding: Option<Binding>,
    receipt: Option<bool>,
}

/// Runs `meshsign verify`.
pub fn run(a: VerifyArgs, format: Format) -> Result<(), ClientError> {
    let bundle_path = match &a.bundle {
        Some(p) => p.clone(),
        None => [".sig.json", ".sigstore.json", ".intoto.json"]
            .iter()
            .map(|ext| super::sibling(&a.file, ext))
            .find(|p| p.exists())
            .unwrap_or_else(|| super::sibling(&a.file, ".sig.json")),
    };
    let text = read(&bundle_path)?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| ClientError::Verify(format!("{}: {e}", bundle_path.display())))?;
    let pin = match &a.public_key {
        Some(p) => Some(verify::spki_from_pem(&String::from_utf8_lossy(&read(p)?))?),
        None => None,
    };
    let audit_key = match &a.audit_key {
        Some(p) => Some(verify::audit_key_from_pem(&String::from_utf8_lossy(
            &read(p)?,
        ))?),
        None => None,
    };
    let checkpoint = match &a.checkpoint {
        Some(p) => Some(String::from_utf8_lossy(&read(p)?).into_owned()),
        None => None,
    };
    let bad_bundle =
        |e: serde_json::Error| ClientError::Verify(format!("{}: {e}", bundle_path.display()));
    let receipt_opts = (a.receipt, audit_key.as_ref(), checkpoint.as_deref());
    let checked = if value.get("mediaType").is_some() {
        let b: meshsign_client::sigstore::Bundle =
            serde_json::from_value(value).map_err(bad_bundle)?;
        sigstore(
            &a.file,
            &b,
            pin.as_deref(),
            receipt_opts,
            a.distrust_list.is_some(),
        )?
    } else if value.get("payloadType").is_some() {
        let env: Envelope = serde_json::from_value(value).map_err(bad_bundle)?;
        if a.receipt {
            return Err(ClientError::Usage(
                "a DSSE envelope carries no receipt (the statement names its audit entry); \
                 --receipt applies to native and Sigstore bundles"
                    .into(),
            ));
        }
        dsse(&a.file, &env, pin.as_deref())?
    } else {
        let b: SigBundle = serde_json::from_value(value).map_err(bad_bundle)?;
        native(
            &a,
            &b,
            pin.as_deref(),
            receipt_opts,
            a.distrust_list.is_some(),
        )?
    };
    let mut distrust = None;
    if let (Some(list_path), Some(key)) = (&a.distrust_list, &audit_key) {
        let list = verify::open_distrust_list(&read(list_path)?, key)?;
        let binding = checked.binding.as_ref().ok_or_else(|| {
            ClientError::Verify(
                "the signature is not bound to a job: it has no receipt or statement signed by \
                 the site, so it cannot be checked against a distrust list"
                    .into(),
            )
        })?;
        verify::check_distrust(&list, binding)?;
        distrust = Some(list.version);
    }
    report(&a, &checked, pin.is_some(), distrust, format);
    Ok(())
}

fn report(a: &VerifyArgs, c: &Checked, pinned: bool, distrust: Option<u64>, format: Format) {
    let file = a.file.display().to_string();
    if format == Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "file": file, "ok": true, "format": c.format, "key_id": c.key_id,
                "region": c.region, "environment": c.environment,
                "audit_seq": c.audit_seq, "key_pinned": pinned,
                "receipt": c.receipt.map(|a| serde_json::json!({"ok": true, "under_signed_checkpoint": a})),
                "binding": c.binding,
                "distrust_list_version": distrust,
            })
        );
    } else {
        out!(
            "{file}: OK ({} in {}/{}, {}, audit entry {})",
            c.key_id,
            c.region,
            c.environment,
            c.format,
            c.audit_seq
        );
        if let Some(anchored) = c.receipt {
            out!(
                "{file}: receipt OK (audit entry {}{})",
                c.audit_seq,
                if anchored {
                    ", under a signed checkpoint"
                } else {
                    ", not yet under a signed checkpoint"
                }
            );
        }
        if let Some(v) = distrust {
            out!("{file}: not distrusted (distrust list version {v})");
        }
    }
    if !pinned {
        eprintln!(
            "note: the key was taken from the bundle; pin it with --public-key (see verification-material)"
        );
    }
}

type ReceiptOpts<'a> = (bool, Option<&'a p256::ecdsa::VerifyingKey>, Option<&'a str>);

/// The receipt's entry when the receipt is asked for, or needed for a distrust list.
fn bound_entry(
    receipt: Option<&meshsign_evidence::receipt::Receipt>,
    (asked, key, checkpoint): ReceiptOpts<'_>,
    needed: bool,
    digest_hex: &str,
    key_id: &str,
) -> Result<Option<meshsign_evidence::audit::AuditRecord>, ClientError> {
    if !(asked || needed) {
        return Ok(None);
    }
    let (Some(receipt), Some(key)) = (receipt, key) else {
        return if asked {
            Err(ClientError::Verify(
                "the bundle carries no audit receipt".into(),
            ))
        } else {
            Ok(None)
        };
    };
    verify::check_receipt(receipt, key, checkpoint, digest_hex, key_id, "Sign").map(Some)
}

fn native(
    a: &VerifyArgs,
    b: &SigBundle,
    pin: Option<&[u8]>,
    opts: ReceiptOpts<'_>,
    needed: bool,
) -> Result<Checked, ClientError> {
    verify::verify_file(&a.file, b, pin)?;
    let mut receipt = None;
    let entry = match (&a.audit_log, opts) {
        (Some(log), (true, Some(key), _)) => {
            let text = std::fs::read_to_string(log).map_err(ClientError::io(log))?;
            let lines =
                meshsign_evidence::audit::parse_export(&text).map_err(ClientError::Verify)?;
            receipt = Some(verify::verify_receipt(b, &lines, key)?);
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
            .map_err(ClientError::Verify)?,
        receipt,
    })
}

fn sigstore(
    file: &Path,
    b: &meshsign_client::sigstore::Bundle,
    pin: Option<&[u8]>,
    opts: ReceiptOpts<'_>,
    needed: bool,
) -> Result<Checked, ClientError> {
    let spki = pin.ok_or_else(|| {
        ClientError::Usage(
            "a Sigstore bundle names its key only by hint: give the key with --public-key \
             (meshsign verification-material)"
                .into(),
        )
    })?;
    if b.media_type != meshsign_client::sigstore::MEDIA_TYPE {
        return Err(ClientError::Verify(format!(
            "media type `{}` is not {}",
            meshsign_evidence::audit::excerpt(&b.media_type, 80),
            meshsign_client::sigstore::MEDIA_TYPE
        )));
    }
    let ms = b
        .message_signature
        .as_ref()
        .ok_or_else(|| ClientError::Verify("the bundle has no messageSignature".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let digest = verify::sha256_file(file)?;
    if ms.message_digest.algorithm != "SHA2_256"
        || b64.decode(&ms.message_digest.digest).ok().as_deref() != Some(&digest[..])
    {
        return Err(ClientError::Verify(format!(
            "{} does not match the signed digest (file changed?)",
            file.display()
        )));
    }
    let sig = b64
        .decode(&ms.signature)
        .map_err(|_| ClientError::Verify("signature is not base64".into()))?;
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
        return Err(ClientError::Verify(
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
            .map_err(ClientError::Verify)?,
        receipt: opts.0.then_some(true),
    })
}

fn dsse(file: &Path, env: &Envelope, pin: Option<&[u8]>) -> Result<Checked, ClientError> {
    let spki = pin.ok_or_else(|| {
        ClientError::Usage(
            "a DSSE envelope does not carry its key: give the attestation key with --public-key \
             (meshsign verification-material)"
                .into(),
        )
    })?;
    let digest = verify::sha256_file(file)?;
    let statement = verify::open_statement(env, spki, &digest)?;
    let facts = SiteFacts::from_statement(&statement).map_err(ClientError::Verify)?;
    Ok(Checked {
        format: "dsse",
        key_id: facts.key_id.clone(),
        region: facts.region.clone(),
        environment: facts.environment.clone(),
        audit_seq: facts.audit_seq,
        binding: Some(facts.binding().map_err(ClientError::Verify)?),
        receipt: None,
    })
}
