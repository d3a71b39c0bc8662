//! `meshsign verify`: reads the inputs, runs the offline check of
//! [`meshsign_evidence::verify::bundle`] (any of the three formats, its audit receipt) and the
//! distrust list, and reports.

use std::path::{Path, PathBuf};

use meshsign_client::ClientError;
use meshsign_evidence::verify::{self, bundle::Checked};

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
    let audit_log = match &a.audit_log {
        Some(log) => {
            let text = std::fs::read_to_string(log).map_err(ClientError::io(log))?;
            Some(meshsign_evidence::audit::parse_export(&text).map_err(ClientError::Verify)?)
        }
        None => None,
    };
    let checked = verify::bundle::bundle(
        &a.file,
        &text,
        &verify::bundle::Options {
            pin: pin.as_deref(),
            receipt: a.receipt,
            audit_key: audit_key.as_ref(),
            checkpoint: checkpoint.as_deref(),
            audit_log: audit_log.as_deref(),
            need_binding: a.distrust_list.is_some(),
        },
    )
    .map_err(|e| match ClientError::from(e) {
        ClientError::Verify(m) if m.starts_with("bundle: ") => ClientError::Verify(format!(
            "{}: {}",
            bundle_path.display(),
            m.trim_start_matches("bundle: ")
        )),
        other => other,
    })?;
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
