//! `meshsign sign`: every input is read and hashed before the job's token is spent; the key is
//! looked up at the site's public Verification service first; each signature is checked (it
//! verifies under the returned key, its receipt under the site's audit key) before anything is
//! written.

use std::path::{Path, PathBuf};

use meshsign_evidence::verify::{self, SigBundle};
use meshsign_proto::v1;
use tonic::transport::Channel;

use crate::session::Session;
use crate::session::job::{self, JobOptions};
use crate::site::verification;
use crate::{ClientConfig, ClientError};

/// The signature formats of `meshsign sign`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SigFormat {
    /// meshsign's FILE.sig + FILE.sig.json.
    Native,
    /// A Sigstore bundle v0.3 (FILE.sigstore.json).
    Sigstore,
    /// A DSSE envelope of an in-toto statement (FILE.intoto.json).
    Dsse,
}

/// What to sign, with which key, in which job (`meshsign sign`'s arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct SignOptions {
    /// How the job enrolls.
    #[command(flatten)]
    pub job: JobOptions,
    /// Key alias.
    #[arg(long)]
    pub key: String,
    /// Files to sign.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Sign each file's bytes as a message (at most 4 KiB; purpose `message`) instead of its
    /// SHA-256 digest — what P-384 and Ed25519 keys sign.
    #[arg(long)]
    pub message: bool,
    /// What to write: `native` (FILE.sig and FILE.sig.json, with the audit receipt when the
    /// site gives one), `sigstore` (FILE.sigstore.json: a Sigstore bundle v0.3 whose log entry
    /// is the site's audit receipt), or `dsse` (FILE.intoto.json: an in-toto statement the site
    /// builds, signed by an `attestation` key — as `meshsign attest`).
    #[arg(long, value_enum, default_value_t = SigFormat::Native)]
    pub format: SigFormat,
    /// With `--format sigstore`: wait for the inclusion proofs (the site's next checkpoint)
    /// and write v0.3 bundles. Without it the bundles carry the log's signed entry timestamp
    /// (v0.1, which Sigstore verifiers accept as it is); `meshsign receipt fetch` adds the
    /// proofs later.
    #[arg(long)]
    pub wait_proof: bool,
}

/// Most digests in one SignBatch call (the site's limit).
pub const BATCH: usize = 1000;

/// One signed file: what was written and where the decision is in the site's audit log.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The input.
    pub file: PathBuf,
    /// The key version that signed.
    pub key_id: String,
    /// The audit record's id.
    pub audit_id: String,
    /// The audit record's sequence number.
    pub audit_seq: u64,
    /// The signature (FILE.sig; for Sigstore, the bundle).
    pub signature: PathBuf,
    /// The bundle.
    pub bundle: PathBuf,
}

/// `FILE` + `ext` (`FILE.sig`, `FILE.sig.json`).
pub fn sibling(file: &Path, ext: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// A file's name as a statement or the audit names it.
pub(crate) fn file_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Refuses a missing input before anything is enrolled.
pub(crate) fn require_file(file: &Path) -> Result<(), ClientError> {
    if file.is_file() {
        return Ok(());
    }
    Err(ClientError::Usage(format!(
        "{}: no such file (nothing was enrolled; the token is not spent)",
        file.display()
    )))
}

/// A key that is not there would be found only after the job's one-time token was spent: ask
/// the site's public Verification service first (its refusal names the nearest alias). With a
/// job agent the token is already spent, so there is nothing to save.
pub async fn key_exists(
    cfg: &ClientConfig,
    job: &JobOptions,
    alias: &str,
) -> Result<(), ClientError> {
    if job::agent_serves() {
        return Ok(());
    }
    // What the command itself lacks (a token source, the environment's audience) is said
    // first, before anything goes over the network.
    job::token_source(cfg, job)?;
    cfg.audience(&job.environment)?;
    let mut v = verification::client(cfg).await?;
    match verification::material(&mut v, &job.environment, alias).await {
        Ok(_) => Ok(()),
        Err(ClientError::Rpc {
            rpc,
            code,
            message,
            reason,
        }) => Err(ClientError::Rpc {
            rpc,
            code,
            message: format!("{message} (nothing was enrolled; the token is not spent)"),
            reason,
        }),
        Err(e) => Err(e),
    }
}

/// Signs every file of `opts`, calling `signed` as each one is written. DSSE is
/// [`super::attest`]'s: the bin sends `--format dsse` there.
pub async fn sign(
    cfg: &ClientConfig,
    opts: &SignOptions,
    mut signed: impl FnMut(&Signed),
) -> Result<(), ClientError> {
    if opts.format == SigFormat::Dsse {
        return Err(ClientError::Usage(
            "--format dsse: a statement, see attest".into(),
        ));
    }
    let mut digests = Vec::with_capacity(opts.files.len());
    for file in &opts.files {
        require_file(file)?;
        digests.push(verify::sha256_file(file)?);
        if opts.message {
            verify::read_message(file)?;
        }
    }
    if opts.wait_proof && opts.format != SigFormat::Sigstore {
        return Err(ClientError::Usage(
            "--wait-proof applies to --format sigstore".into(),
        ));
    }
    key_exists(cfg, &opts.job, &opts.key).await?;
    job::with_session(cfg, &opts.job, async |session: &mut Session| {
        let mut site = SiteEvidence::open(cfg, session, opts).await?;
        if opts.format == SigFormat::Sigstore {
            return sign_sigstore(session, &mut site, opts, &digests, &mut signed).await;
        }
        for (file, digest) in opts.files.iter().zip(&digests) {
            signed(&sign_one(session, &mut site, opts, file, digest).await?);
        }
        Ok(())
    })
    .await
}

/// `--format sigstore`: digests in SignBatch calls (a message, or one file, in a Sign call),
/// each signature checked with its log entry (SET under the audit key, the body this
/// signature) and written as a v0.1 bundle; with `--wait-proof`, the proofs are added (one
/// checkpoint covers them all: the newest entry is asked for first) and the bundles are v0.3.
async fn sign_sigstore(
    session: &mut Session,
    site: &mut SiteEvidence,
    opts: &SignOptions,
    digests: &[[u8; 32]],
    signed: &mut impl FnMut(&Signed),
) -> Result<(), ClientError> {
    let (v, spki) = site.0.as_mut().map_err(|e| {
        ClientError::Usage(format!("--format sigstore needs the site's audit key: {e}"))
    })?;
    let mut responses = Vec::with_capacity(opts.files.len());
    if opts.message || opts.files.len() == 1 {
        for (file, digest) in opts.files.iter().zip(digests) {
            let name = file_name(file);
            let input = if opts.message {
                v1::sign_request::Input::Message(verify::read_message(file)?)
            } else {
                v1::sign_request::Input::Sha256Digest(digest.to_vec())
            };
            responses.push(session.sign_promised(&opts.key, input, &name).await?);
        }
    } else {
        for (files, chunk) in opts.files.chunks(BATCH).zip(digests.chunks(BATCH)) {
            let name = match files {
                [one] => file_name(one),
                [first, rest @ ..] => format!("{} and {} more", file_name(first), rest.len()),
                [] => String::new(),
            };
            responses.extend(session.sign_batch(&opts.key, chunk, &name, true).await?);
        }
    }
    let (region, environment) = (
        session.enrollment.region.clone(),
        session.enrollment.environment.clone(),
    );
    let log_key = verification::log_key(spki)?;
    // Every signature verifies under the returned key and every log entry is bound to it
    // (`sigstore_bundle`: body, log id, SET shape) before anything is written (one thread per
    // core). The SETs' signatures are for verifiers and `--wait-proof` to check.
    let work: Vec<_> = opts.files.iter().zip(digests).zip(&responses).collect();
    let bundles = verification::par_map(&work, |((file, digest), r)| {
        let name = file_name(file);
        let signed = if opts.message {
            let m = verify::read_message(file)?;
            verification::bundle_from_message_response(r, &name, &m, &region, &environment)?;
            let hash = meshsign_evidence::rekor::BodyHash::for_algorithm(&r.algorithm);
            (hash, hash.of(&m))
        } else {
            verification::bundle_from_response(r, &name, digest, &region, &environment)?;
            (meshsign_evidence::rekor::BodyHash::Sha256, digest.to_vec())
        };
        let hint = format!("{region}/{environment}/{}", r.key_id);
        verification::sigstore_bundle(r, hint, (signed.0, &signed.1), &log_key)
    });
    let mut written = Vec::with_capacity(responses.len());
    for (file, bundle) in opts.files.iter().zip(bundles) {
        let bundle = bundle?;
        let path = sibling(file, ".sigstore.json");
        write_json(&path, &bundle)?;
        written.push((path, bundle));
    }
    if opts.wait_proof {
        for (path, bundle) in written.iter_mut().rev() {
            verification::add_log_proof(v, bundle, spki).await?;
            write_json(path, bundle)?;
        }
    }
    for ((file, r), (path, _)) in opts.files.iter().zip(responses).zip(written) {
        signed(&Signed {
            file: file.clone(),
            key_id: r.key_id,
            audit_id: r.audit_id,
            audit_seq: r.audit_seq,
            signature: path.clone(),
            bundle: path,
        });
    }
    Ok(())
}

/// `meshsign receipt fetch`: adds the inclusion proof to each Sigstore bundle that lacks one
/// (FILE.sigstore.json, or the bundle itself), checked against the site's audit key, making
/// it v0.3. Returns each bundle's path and whether it changed.
pub async fn fetch_proofs(
    cfg: &ClientConfig,
    files: &[PathBuf],
) -> Result<Vec<(PathBuf, bool)>, ClientError> {
    let mut v = verification::client(cfg).await?;
    let mut out = Vec::with_capacity(files.len());
    let mut keys: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    // Newest entries first: the checkpoint one of them may need covers the rest.
    let mut bundles = Vec::with_capacity(files.len());
    for (position, file) in files.iter().enumerate() {
        let path = if file.to_string_lossy().ends_with(".sigstore.json") {
            file.clone()
        } else {
            sibling(file, ".sigstore.json")
        };
        let text = std::fs::read(&path).map_err(ClientError::io(&path))?;
        let b: meshsign_evidence::bundle::sigstore::Bundle = serde_json::from_slice(&text)
            .map_err(|e| {
                ClientError::Verify(format!("{}: not a Sigstore bundle: {e}", path.display()))
            })?;
        let index = b
            .verification_material
            .tlog_entries
            .first()
            .and_then(|t| t.log_index.parse::<u64>().ok())
            .unwrap_or_default();
        bundles.push((index, position, path, b));
    }
    bundles.sort_by_key(|b| std::cmp::Reverse(b.0));
    for (_, position, path, mut b) in bundles {
        let environment = verification::hint_environment(&b.verification_material.public_key.hint);
        let spki = match keys.get(&environment) {
            Some(k) => k.clone(),
            None => {
                let m = verification::material(&mut v, &environment, "").await?;
                keys.insert(environment, m.audit_public_key_der.clone());
                m.audit_public_key_der
            }
        };
        let changed = verification::add_log_proof(&mut v, &mut b, &spki)
            .await
            .map_err(|e| match e {
                ClientError::Verify(m) => ClientError::Verify(format!("{}: {m}", path.display())),
                other => other,
            })?;
        if changed {
            write_json(&path, &b)?;
        }
        out.push((position, path, changed));
    }
    // In the order given.
    out.sort_by_key(|o| o.0);
    Ok(out.into_iter().map(|(_, p, c)| (p, c)).collect())
}

/// The site's Verification service and audit key, to check each receipt before it goes into
/// a bundle; or why there is none (a native bundle is then written without its receipt).
struct SiteEvidence(Result<(verification::Client, Vec<u8>), ClientError>);

impl SiteEvidence {
    async fn open(
        cfg: &ClientConfig,
        session: &Session,
        opts: &SignOptions,
    ) -> Result<Self, ClientError> {
        let verification = match verification::client(cfg).await {
            Ok(mut v) => verification::material(&mut v, &session.enrollment.environment, &opts.key)
                .await
                .map(|m| (v, m.audit_public_key_der)),
            Err(e) => Err(e),
        };
        match (&verification, opts.format) {
            (Err(e), SigFormat::Sigstore) => {
                return Err(ClientError::Usage(format!(
                    "--format sigstore needs the site's audit receipts: {e}"
                )));
            }
            (Err(e), _) => crate::notes::note(&format!(
                "warning: the bundles will carry no audit receipt (the site's verification \
                 service: {e})"
            )),
            _ => {}
        }
        Ok(Self(verification))
    }

    /// The receipt of `r`, checked; None (with a warning) when a native bundle goes without.
    async fn receipt(
        &mut self,
        file: &Path,
        r: &v1::SignResponse,
        bundle: &SigBundle,
        format: SigFormat,
    ) -> Result<Option<(meshsign_evidence::receipt::Receipt, Vec<u8>)>, ClientError> {
        let Ok((v, spki)) = &mut self.0 else {
            return Ok(None);
        };
        match fetch_receipt(v, spki, r, bundle).await {
            Ok(receipt) => Ok(Some((receipt, spki.clone()))),
            Err(e) if format == SigFormat::Native => {
                crate::notes::note(&format!(
                    "warning: {}: no audit receipt in the bundle: {e}",
                    file.display()
                ));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The receipt of a Sign response from the site's Verification service, checked against its
/// audit key and against the signature it is for.
async fn fetch_receipt(
    v: &mut v1::verification_client::VerificationClient<Channel>,
    audit_spki: &[u8],
    r: &v1::SignResponse,
    bundle: &SigBundle,
) -> Result<meshsign_evidence::receipt::Receipt, ClientError> {
    let receipt = verification::receipt(v, r.audit_seq, &r.audit_entry, audit_spki).await?;
    verify::check_receipt(
        &receipt,
        &verify::audit_key_from_der(audit_spki)?,
        None,
        &bundle.digest_sha256,
        &bundle.key_id,
        "Sign",
    )
    .map_err(|e| ClientError::Verify(format!("the site's receipt: {e}")))?;
    Ok(receipt)
}

/// Signs one file and writes its signature and bundle.
async fn sign_one(
    session: &mut Session,
    site: &mut SiteEvidence,
    opts: &SignOptions,
    file: &Path,
    digest: &[u8; 32],
) -> Result<Signed, ClientError> {
    let name = file_name(file);
    let (region, environment) = (
        session.enrollment.region.clone(),
        session.enrollment.environment.clone(),
    );
    // Checked (the signature verifies under the returned key) before anything is written.
    let (r, mut bundle) = if opts.message {
        let message = verify::read_message(file)?;
        let r = session.sign_message(&opts.key, &message, &name).await?;
        let b =
            verification::bundle_from_message_response(&r, &name, &message, &region, &environment)?;
        (r, b)
    } else {
        let r = session.sign_digest(&opts.key, *digest, &name).await?;
        let b = verification::bundle_from_response(&r, &name, digest, &region, &environment)?;
        (r, b)
    };
    // `--format sigstore` never comes here (see `sign_sigstore`).
    bundle.receipt = site
        .receipt(file, &r, &bundle, opts.format)
        .await?
        .map(|(r, _)| r);
    let sig_path = sibling(file, ".sig");
    let json_path = sibling(file, ".sig.json");
    std::fs::write(&sig_path, &r.signature).map_err(ClientError::io(&sig_path))?;
    write_json(&json_path, &bundle)?;
    let (signature, bundle_path) = (sig_path, json_path);
    Ok(Signed {
        file: file.to_path_buf(),
        key_id: r.key_id,
        audit_id: r.audit_id,
        audit_seq: r.audit_seq,
        signature,
        bundle: bundle_path,
    })
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), ClientError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| ClientError::Crypto(e.to_string()))?;
    std::fs::write(path, json).map_err(ClientError::io(path))
}
