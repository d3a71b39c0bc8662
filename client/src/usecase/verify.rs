//! `meshsign verify`: reads the inputs, runs the offline check of
//! [`meshsign_evidence::verify::bundle`] (any of the three formats, its audit receipt) and the
//! distrust list. Nothing goes over the network.

use std::path::{Path, PathBuf};

use meshsign_evidence::verify::{self, bundle::Checked};

use super::sign::sibling;
use crate::ClientError;

/// What to verify, against what.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The file.
    pub file: PathBuf,
    /// Also check the signature's audit receipt.
    pub receipt: bool,
    /// An audit export (JSON lines) to check the receipt against.
    pub audit_log: Option<PathBuf>,
    /// The site's audit public key (PEM).
    pub audit_key: Option<PathBuf>,
    /// A checkpoint (C2SP signed note) to prove the receipt against.
    pub checkpoint: Option<PathBuf>,
    /// A signed distrust list to check the signature's job against.
    pub distrust_list: Option<PathBuf>,
    /// The bundle (None: FILE.sig.json, FILE.sigstore.json or FILE.intoto.json, the first that
    /// exists).
    pub bundle: Option<PathBuf>,
    /// A public key (PEM) the signature must be under.
    pub public_key: Option<PathBuf>,
}

/// What verified.
#[derive(Clone, Debug)]
pub struct Verified {
    /// What the bundle check found.
    pub checked: Checked,
    /// Whether the key was pinned (`--public-key`) rather than taken from the bundle.
    pub pinned: bool,
    /// The version of the distrust list the signature was checked against.
    pub distrust_list_version: Option<u64>,
}

fn read(p: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(p).map_err(ClientError::io(p))
}

fn read_text(p: &Option<PathBuf>) -> Result<Option<String>, ClientError> {
    p.as_deref()
        .map(|p| read(p).map(|b| String::from_utf8_lossy(&b).into_owned()))
        .transpose()
}

/// The bundle of `o.file`.
fn bundle_path(o: &VerifyOptions) -> PathBuf {
    match &o.bundle {
        Some(p) => p.clone(),
        None => [".sig.json", ".sigstore.json", ".intoto.json"]
            .iter()
            .map(|ext| sibling(&o.file, ext))
            .find(|p| p.exists())
            .unwrap_or_else(|| sibling(&o.file, ".sig.json")),
    }
}

/// Runs the check; any failure is [`ClientError::Verify`] (exit 1) or a read error.
pub fn verify(o: &VerifyOptions) -> Result<Verified, ClientError> {
    let bundle_path = bundle_path(o);
    let text = read(&bundle_path)?;
    let pin = read_text(&o.public_key)?
        .map(|pem| verify::spki_from_pem(&pem))
        .transpose()?;
    let audit_key = read_text(&o.audit_key)?
        .map(|pem| verify::audit_key_from_pem(&pem))
        .transpose()?;
    let checkpoint = read_text(&o.checkpoint)?;
    let audit_log = match &o.audit_log {
        Some(log) => {
            let text = std::fs::read_to_string(log).map_err(ClientError::io(log))?;
            Some(meshsign_evidence::audit::parse_export(&text).map_err(ClientError::Verify)?)
        }
        None => None,
    };
    let checked = verify::bundle::bundle(
        &o.file,
        &text,
        &verify::bundle::Options {
            pin: pin.as_deref(),
            receipt: o.receipt,
            audit_key: audit_key.as_ref(),
            checkpoint: checkpoint.as_deref(),
            audit_log: audit_log.as_deref(),
            need_binding: o.distrust_list.is_some(),
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
    let mut distrust_list_version = None;
    if let (Some(list_path), Some(key)) = (&o.distrust_list, &audit_key) {
        let list = verify::open_distrust_list(&read(list_path)?, key)?;
        let binding = checked.binding.as_ref().ok_or_else(|| {
            ClientError::Verify(
                "the signature is not bound to a job: it has no receipt or statement signed by \
                 the site, so it cannot be checked against a distrust list"
                    .into(),
            )
        })?;
        verify::check_distrust(&list, binding)?;
        distrust_list_version = Some(list.version);
    }
    Ok(Verified {
        checked,
        pinned: pin.is_some(),
        distrust_list_version,
    })
}
