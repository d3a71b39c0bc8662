//! `meshsign verify`: reads the inputs, runs the offline check of
//! [`meshsign_evidence::verify::bundle`] (any of the three formats, its audit receipt) and the
//! distrust list. Nothing goes over the network.

use std::path::{Path, PathBuf};

use meshsign_evidence::verify::{self, bundle::Checked};

use super::sign::sibling;
use crate::{ClientConfig, ClientError};

/// What to verify, against what (`meshsign verify`'s arguments).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The file.
    pub file: PathBuf,
    /// Also check the signature's audit receipt: the one in the bundle (with --audit-key), or
    /// against an exported audit log (with --audit-log and --audit-key).
    #[arg(long, requires = "audit_key")]
    pub receipt: bool,
    /// Audit export (JSON lines) for --receipt.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// The site's audit public key (PEM; `verification-material --audit-key`), for --receipt
    /// and --distrust-list.
    #[arg(long)]
    pub audit_key: Option<PathBuf>,
    /// A checkpoint (C2SP signed note) to prove the receipt against instead of the one the
    /// bundle carries; it must be of the same tree size.
    #[arg(long, requires = "receipt")]
    pub checkpoint: Option<PathBuf>,
    /// Refuse the signature if a rule of this signed distrust list (`verification-material
    /// --distrust-list`) matches it; needs --audit-key, and a signature bound to its job.
    #[arg(long, requires = "audit_key")]
    pub distrust_list: Option<PathBuf>,
    /// Refuse a distrust list older than this version (one you know distrusted something).
    #[arg(long, requires = "distrust_list")]
    pub min_list_version: Option<u64>,
    /// Refuse a distrust list issued more than this many seconds ago (an expired list is
    /// always refused).
    #[arg(long, requires = "distrust_list")]
    pub max_list_age: Option<i64>,
    /// Signature bundle (default: FILE.sig.json, FILE.sigstore.json or FILE.intoto.json,
    /// the first that exists).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Require this public key: PEM, or the JSON of `verification-material --key K --output
    /// json` (every version, with what it signs); needed for Sigstore and DSSE bundles, which
    /// do not carry the key. A statement needs the JSON: it verifies only under a key whose
    /// purpose is attestation.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
}

/// What verified.
#[derive(Clone, Debug)]
pub struct Verified {
    /// What the bundle check found.
    pub checked: Checked,
    /// Whether the key was pinned (`--public-key`) rather than taken from the bundle.
    pub pinned: bool,
    /// The key version the signature verified under, when the pin named versions.
    pub pinned_key_id: Option<String>,
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

/// One pinned key version.
struct Pinned {
    spki: Vec<u8>,
    key_id: Option<String>,
    purposes: Option<Vec<String>>,
}

/// `--public-key`: a PEM key, or the JSON `verification-material --key K --output json` prints
/// (each version's `key_id`, `public_key_pem` and `purposes`), oldest first.
fn pinned_keys(text: &str) -> Result<Vec<Pinned>, ClientError> {
    if !text.trim_start().starts_with('[') {
        return Ok(vec![Pinned {
            spki: verify::spki_from_pem(text)?,
            key_id: None,
            purposes: None,
        }]);
    }
    let bad = |m: &str| ClientError::Usage(format!("--public-key: {m}"));
    let versions: Vec<serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| bad(&format!("not PEM and not verification-material JSON: {e}")))?;
    versions
        .iter()
        .map(|v| {
            let pem = v["public_key_pem"]
                .as_str()
                .ok_or_else(|| bad("a version without public_key_pem"))?;
            Ok(Pinned {
                spki: verify::spki_from_pem(pem)?,
                key_id: v["key_id"].as_str().map(String::from),
                purposes: v["purposes"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(String::from))
                        .collect()
                }),
            })
        })
        .collect()
}

/// Runs the check; any failure is [`ClientError::Verify`] (exit 1) or a read error.
pub fn verify(o: &VerifyOptions) -> Result<Verified, ClientError> {
    let bundle_path = bundle_path(o);
    let text = read(&bundle_path)?;
    let pins = read_text(&o.public_key)?
        .map(|text| pinned_keys(&text))
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
    fn options<'a>(
        pin: Option<&'a Pinned>,
        rest: verify::bundle::Options<'a>,
    ) -> verify::bundle::Options<'a> {
        verify::bundle::Options {
            pin: pin.map(|p| p.spki.as_slice()),
            pin_purposes: pin.and_then(|p| p.purposes.as_deref()),
            ..rest
        }
    }
    let rest = verify::bundle::Options {
        pin: None,
        pin_purposes: None,
        receipt: o.receipt,
        audit_key: audit_key.as_ref(),
        checkpoint: checkpoint.as_deref(),
        audit_log: audit_log.as_deref(),
        need_binding: o.distrust_list.is_some(),
    };
    // Under each pinned version in turn (newest first): the first that holds is the one used.
    let mut pinned_key_id = None;
    let checked = match pins.as_deref() {
        None | Some([]) => verify::bundle::bundle(&o.file, &text, &rest),
        Some(pins) => {
            let mut first_err = None;
            let mut found = None;
            for p in pins.iter().rev() {
                match verify::bundle::bundle(&o.file, &text, &options(Some(p), rest)) {
                    Ok(c) => {
                        pinned_key_id = p.key_id.clone();
                        found = Some(c);
                        break;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            found.ok_or_else(|| {
                first_err.unwrap_or_else(|| {
                    meshsign_evidence::error::VerifyError::Input("no key pinned".into())
                })
            })
        }
    }
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or_default();
        list.check_fresh(&meshsign_evidence::distrust::Freshness {
            now,
            min_version: o.min_list_version,
            max_age: o.max_list_age,
        })
        .map_err(ClientError::Verify)?;
        match (&checked.binding, &checked.log) {
            (Some(binding), _) => verify::check_distrust(&list, binding)?,
            (None, Some(log)) => verify::check_distrust_log(&list, log)?,
            (None, None) => {
                return Err(ClientError::Verify(
                    "the signature is not bound to a job: it has no receipt, log entry or \
                     statement signed by the site, so it cannot be checked against a distrust \
                     list"
                        .into(),
                ));
            }
        }
        distrust_list_version = Some(list.version);
    }
    Ok(Verified {
        checked,
        pinned: pins.is_some(),
        pinned_key_id,
        distrust_list_version,
    })
}

/// `meshsign audit verify`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct AuditVerifyArgs {
    /// Export (JSON lines).
    pub file: PathBuf,
    /// The site's audit public key (PEM, from `meshsign admin audit public-key`).
    #[arg(long)]
    pub audit_key: PathBuf,
    /// Accept a log that starts mid-chain at a signed checkpoint (a log retained after
    /// pruning, or an export `--since` a checkpoint). Without it the log must start at seq 1.
    #[arg(long)]
    pub from_checkpoint: bool,
}

/// Checks an audit export's chain and checkpoint signatures; names the first bad seq.
pub fn audit_export(
    a: &AuditVerifyArgs,
) -> Result<meshsign_evidence::audit::VerifyReport, ClientError> {
    use meshsign_evidence::audit::{ExportTextError, Start, verify_export_reader};
    // Read in chunks, never whole: a year of a site's log is tens of GB.
    let file = std::fs::File::open(&a.file).map_err(ClientError::io(&a.file))?;
    let pem = std::fs::read_to_string(&a.audit_key).map_err(ClientError::io(&a.audit_key))?;
    let key = verify::audit_key_from_pem(&pem)?;
    let start = if a.from_checkpoint {
        Start::GenesisOrCheckpoint
    } else {
        Start::Genesis
    };
    verify_export_reader(file, &key, start).map_err(|e| match e {
        ExportTextError::Read(why) => ClientError::Verify(format!("{}: {why}", a.file.display())),
        e => ClientError::Verify(e.to_string()),
    })
}

/// `meshsign audit consistency`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct ConsistencyArgs {
    /// The earlier checkpoint (a C2SP signed note of the site's audit or transparency log).
    pub old: PathBuf,
    /// The later checkpoint of the same log.
    pub new: PathBuf,
    /// The site's audit public key (PEM), which signs both logs' checkpoints.
    #[arg(long)]
    pub audit_key: PathBuf,
}

/// What `meshsign audit consistency` showed: the log and the two sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consistent {
    /// The checkpoints' origin.
    pub origin: String,
    /// The earlier size.
    pub old_size: u64,
    /// The later size.
    pub new_size: u64,
}

/// Checks that the later checkpoint's tree extends the earlier one's (RFC 9162 consistency):
/// both notes are opened with the audit key and must name the same log; the proof is asked of
/// the site and checked here, so the site is trusted for nothing.
pub async fn consistency(
    cfg: &ClientConfig,
    a: &ConsistencyArgs,
) -> Result<Consistent, ClientError> {
    let pem = std::fs::read_to_string(&a.audit_key).map_err(ClientError::io(&a.audit_key))?;
    let key = verify::audit_key_from_pem(&pem)?;
    let open = |p: &PathBuf| -> Result<meshsign_evidence::note::TreeHead, ClientError> {
        let text = std::fs::read_to_string(p).map_err(ClientError::io(p))?;
        meshsign_evidence::note::open(&text, &key, None)
            .map_err(|e| ClientError::Verify(format!("{}: {e}", p.display())))
    };
    let (old, new) = (open(&a.old)?, open(&a.new)?);
    if old.origin != new.origin {
        return Err(ClientError::Verify(format!(
            "the checkpoints are of two logs (`{}`, `{}`)",
            old.origin, new.origin
        )));
    }
    if old.size > new.size {
        return Err(ClientError::Usage(format!(
            "{} is the later checkpoint ({} entries, {} in {}): give the earlier one first",
            a.old.display(),
            old.size,
            new.size,
            a.new.display()
        )));
    }
    let proof = if old.size == new.size {
        Vec::new()
    } else {
        let mut v = crate::site::verification::client(cfg).await?;
        crate::site::verification::consistency(&mut v, &old.origin, old.size, new.size).await?
    };
    meshsign_evidence::merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof)
        .map_err(|e| {
            ClientError::Verify(format!(
                "{} entries of `{}` were rewritten or removed: {e}",
                old.size, old.origin
            ))
        })?;
    Ok(Consistent {
        origin: old.origin,
        old_size: old.size,
        new_size: new.size,
    })
}
