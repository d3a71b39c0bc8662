//! `meshsign attest` (and `meshsign sign --format dsse`): one in-toto statement about every
//! file, built and signed by the site; checked (it verifies under the key the site names and
//! is about these files) before it is written.

use std::path::PathBuf;

use meshsign_evidence::attest::{Envelope, PREDICATE_SIGNING, PREDICATE_SLSA};
use meshsign_evidence::verify;

use super::sign::{file_name, key_exists, require_file, sibling};
use crate::session::Session;
use crate::session::job::{self, JobOptions};
use crate::{ClientConfig, ClientError};

/// What to attest (`meshsign attest`'s arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct AttestOptions {
    /// How the job enrolls.
    #[command(flatten)]
    pub job: JobOptions,
    /// Key alias.
    #[arg(long)]
    pub key: String,
    /// The predicate: `signing` (what the site verified about the job; the default), `slsa`
    /// (SLSA provenance v1; GitHub and GitLab jobs), or a predicate type URI of either.
    #[arg(long, default_value = "signing")]
    pub predicate_type: String,
    /// Where to write the DSSE envelope (default: FIRST_FILE.intoto.json).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// The artifacts (the statement's subjects).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

impl AttestOptions {
    /// `meshsign sign --format dsse`: a statement about each file with the `signing`
    /// predicate, refused with `--message` (a statement is about digests).
    pub fn from_sign(s: super::sign::SignOptions) -> Result<Self, ClientError> {
        if s.message {
            return Err(ClientError::Usage(
                "--format dsse makes a statement about each file's SHA-256; --message does not \
                 apply (nothing was enrolled; the token is not spent)"
                    .into(),
            ));
        }
        Ok(Self {
            job: s.job,
            key: s.key,
            predicate_type: "signing".into(),
            bundle: None,
            files: s.files,
        })
    }
}

/// The statement the site signed and where it was written.
#[derive(Clone, Debug)]
pub struct Attested {
    /// The envelope's path.
    pub envelope: PathBuf,
    /// The Sigstore bundle's path (the envelope and its transparency-log entry).
    pub bundle: PathBuf,
    /// The predicate type.
    pub predicate_type: &'static str,
    /// The key version that signed.
    pub key_id: String,
    /// The audit record's id.
    pub audit_id: String,
    /// The audit record's sequence number.
    pub audit_seq: u64,
    /// Each subject's name and SHA-256.
    pub subjects: Vec<(String, [u8; 32])>,
}

/// The predicate type URI `name` stands for.
fn predicate(name: &str) -> Result<&'static str, ClientError> {
    match name {
        "signing" | PREDICATE_SIGNING => Ok(PREDICATE_SIGNING),
        "slsa" | PREDICATE_SLSA => Ok(PREDICATE_SLSA),
        other => Err(ClientError::Usage(format!(
            "--predicate-type `{other}`: signing, slsa, {PREDICATE_SIGNING} or {PREDICATE_SLSA}"
        ))),
    }
}

/// Has the site build and sign the statement, checks it, writes it.
pub async fn attest(cfg: &ClientConfig, opts: &AttestOptions) -> Result<Attested, ClientError> {
    let predicate_type = predicate(&opts.predicate_type)?;
    let mut subjects = Vec::with_capacity(opts.files.len());
    for file in &opts.files {
        require_file(file)?;
        subjects.push((file_name(file), verify::sha256_file(file)?));
    }
    let envelope = match (&opts.bundle, opts.files.first()) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => sibling(f, ".intoto.json"),
        (None, None) => return Err(ClientError::Usage("no files".into())),
    };
    let bundle = match envelope.to_string_lossy().strip_suffix(".json") {
        Some(stem) => PathBuf::from(format!("{stem}.sigstore.json")),
        None => sibling(&envelope, ".sigstore.json"),
    };
    key_exists(cfg, &opts.job, &opts.key).await?;
    let r = job::with_session(cfg, &opts.job, async |session: &mut Session| {
        let r = session.attest(&opts.key, &subjects, predicate_type).await?;
        let env: Envelope = serde_json::from_slice(&r.envelope_json)
            .map_err(|e| ClientError::Verify(format!("the site's envelope: {e}")))?;
        for (_, d) in &subjects {
            verify::open_statement(&env, &r.public_key_der, d).map_err(|e| {
                ClientError::Verify(format!("the site's statement does not verify: {e}"))
            })?;
        }
        let hint = format!(
            "{}/{}/{}",
            session.enrollment.region, session.enrollment.environment, r.key_id
        );
        let sb = crate::site::verification::sigstore_dsse_bundle(cfg, &r, env, hint).await?;
        meshsign_evidence::files::write_atomic(&envelope, &r.envelope_json, false)
            .map_err(ClientError::io(&envelope))?;
        super::sign::write_json(&bundle, &sb)?;
        Ok(r)
    })
    .await?;
    Ok(Attested {
        envelope,
        bundle,
        predicate_type,
        key_id: r.key_id,
        audit_id: r.audit_id,
        audit_seq: r.audit_seq,
        subjects,
    })
}
