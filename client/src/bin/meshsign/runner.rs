//! The runner's verbs — `sign`, `attest`, `codesign`, `exec`, `agent` — as arguments, each
//! handed to its use case in [`meshsign_client::usecase`] and rendered here.

use std::path::PathBuf;

use clap::Args;
use meshsign_client::session::job::{JobOptions, TokenChoice};
use meshsign_client::usecase::{agent, attest, sign, verify};
use meshsign_client::{ClientConfig, ClientError};

use super::render::Format;

/// `meshsign codesign` arguments.
#[cfg(feature = "codesign")]
#[derive(Args)]
pub struct CodesignArgs {
    #[command(flatten)]
    runner: RunnerArgs,
    /// Entitlements plist (XML).
    #[arg(long)]
    entitlements: Option<PathBuf>,
    /// Enable the hardened runtime.
    #[arg(long)]
    runtime: bool,
    /// RFC 3161 time-stamp server, or `none` (the default: no time stamp).
    #[arg(long)]
    timestamp_url: Option<String>,
    /// Mach-O (thin or universal), .app bundle or .dmg.
    input: PathBuf,
    /// Output (default: sign in place).
    output: Option<PathBuf>,
}

#[derive(Args)]
pub struct SignArgs {
    #[command(flatten)]
    runner: RunnerArgs,
    /// Files to sign.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Sign each file's bytes as a message (at most 4 KiB; purpose `message`) instead of its
    /// SHA-256 digest — what P-384 and Ed25519 keys sign.
    #[arg(long)]
    message: bool,
    /// What to write: `native` (FILE.sig and FILE.sig.json, with the audit receipt when the
    /// site gives one), `sigstore` (FILE.sigstore.json: a Sigstore bundle v0.3 whose log entry
    /// is the site's audit receipt), or `dsse` (FILE.intoto.json: an in-toto statement the site
    /// builds, signed by an `attestation` key — as `meshsign attest`).
    #[arg(long, value_enum, default_value_t = SigFormat::Native)]
    format: SigFormat,
}

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

/// `meshsign attest` arguments.
#[derive(Args)]
pub struct AttestArgs {
    #[command(flatten)]
    runner: RunnerArgs,
    /// The predicate: `signing` (what the site verified about the job; the default), `slsa`
    /// (SLSA provenance v1; GitHub and GitLab jobs), or a predicate type URI of either.
    #[arg(long, default_value = "signing")]
    predicate_type: String,
    /// Where to write the DSSE envelope (default: FIRST_FILE.intoto.json).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// The artifacts (the statement's subjects).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}
/// How a runner job gets its credentials: the key and the session options shared by `sign` and
/// `codesign`.
#[derive(Args, Clone)]
pub struct RunnerArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// Key alias.
    #[arg(long)]
    key: String,
}

/// How a job enrolls: its environment and token source (`exec`, `agent start`, and `sign` /
/// `codesign` without an agent).
#[derive(Args, Clone)]
pub struct SessionArgs {
    /// Environment this job signs in.
    #[arg(long)]
    environment: String,
    /// Read the OIDC token from this file.
    #[arg(long, group = "tok")]
    token_file: Option<PathBuf>,
    /// Read the OIDC token from this environment variable.
    #[arg(long, group = "tok")]
    token_env: Option<String>,
    /// Fetch the OIDC token from the CI: github-actions, gitlab (the job's id_token in
    /// --id-token-var), buildkite (buildkite-agent oidc request-token), or auto (detect).
    #[arg(long, group = "tok", value_parser = ["github-actions", "gitlab", "buildkite", "auto"])]
    token_source: Option<String>,
    /// For --token-source github-actions: extra CA certificates (PEM) for the token endpoint.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// For --token-source gitlab: the variable that holds the job's id_token.
    #[arg(long, default_value = "MESHSIGN_ID_TOKEN")]
    id_token_var: String,
    /// Requested certificate lifetime in seconds (0 = the environment's cap).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Runner fingerprint (default: derived from this machine).
    #[arg(long)]
    fingerprint: Option<String>,
}

impl From<&SessionArgs> for JobOptions {
    fn from(a: &SessionArgs) -> Self {
        let token = match (&a.token_file, &a.token_env, a.token_source.as_deref()) {
            (Some(f), _, _) => TokenChoice::File(f.clone()),
            (_, Some(v), _) => TokenChoice::Env(v.clone()),
            (_, _, Some("gitlab")) => TokenChoice::Gitlab(a.id_token_var.clone()),
            (_, _, Some("buildkite")) => TokenChoice::Buildkite,
            (_, _, Some("auto")) => TokenChoice::Auto,
            (_, _, Some(_)) => TokenChoice::GithubActions,
            _ => TokenChoice::Unnamed,
        };
        JobOptions {
            environment: a.environment.clone(),
            token,
            token_ca_file: a.ca_file.clone(),
            ttl_seconds: a.ttl,
            fingerprint: a.fingerprint.clone(),
        }
    }
}

impl AttestArgs {
    fn options(self) -> attest::AttestOptions {
        attest::AttestOptions {
            job: JobOptions::from(&self.runner.session),
            key: self.runner.key,
            predicate_type: self.predicate_type,
            bundle: self.bundle,
            files: self.files,
        }
    }
}

/// `meshsign sign` (`--format dsse`: `meshsign attest` with the `signing` predicate).
pub async fn sign(cfg: &ClientConfig, args: SignArgs, format: Format) -> Result<(), ClientError> {
    if args.format == SigFormat::Dsse {
        if args.message {
            return Err(ClientError::Usage(
                "--format dsse makes a statement about each file's SHA-256; --message does not \
                 apply (nothing was enrolled; the token is not spent)"
                    .into(),
            ));
        }
        let attest = AttestArgs {
            runner: args.runner,
            predicate_type: "signing".into(),
            bundle: None,
            files: args.files,
        };
        return self::attest(cfg, attest, format).await;
    }
    let opts = sign::SignOptions {
        job: JobOptions::from(&args.runner.session),
        key: args.runner.key,
        files: args.files,
        message: args.message,
        format: match args.format {
            SigFormat::Sigstore => sign::SigFormat::Sigstore,
            _ => sign::SigFormat::Native,
        },
    };
    sign::sign(cfg, &opts, |s| super::render::signed(s, format)).await
}

/// `meshsign attest`.
pub async fn attest(
    cfg: &ClientConfig,
    args: AttestArgs,
    format: Format,
) -> Result<(), ClientError> {
    let a = attest::attest(cfg, &args.options()).await?;
    super::render::attested(&a, format);
    Ok(())
}

/// `meshsign codesign`.
#[cfg(feature = "codesign")]
pub async fn codesign(
    cfg: &ClientConfig,
    args: CodesignArgs,
    format: Format,
) -> Result<(), ClientError> {
    let job = JobOptions::from(&args.runner.session);
    let opts = meshsign_client::usecase::codesign::CodesignOptions {
        alias: args.runner.key.clone(),
        input: args.input.clone(),
        output: args.output.clone(),
        entitlements: args.entitlements,
        runtime: args.runtime,
        timestamp_url: args.timestamp_url.filter(|u| u != "none"),
    };
    meshsign_client::usecase::codesign::run(cfg, &job, opts).await?;
    let signed = args
        .output
        .as_ref()
        .unwrap_or(&args.input)
        .display()
        .to_string();
    super::render::codesigned(&signed, &args.runner.key, &job.environment, format);
    Ok(())
}

/// `meshsign exec`: returns the command's exit status.
pub async fn exec(
    cfg: &ClientConfig,
    args: SessionArgs,
    command: Vec<String>,
) -> Result<u8, ClientError> {
    agent::exec(cfg, &JobOptions::from(&args), &command).await
}

/// `meshsign agent serve`: its variables, or its error, go to stdout (`agent start` reads
/// them; the agent's stderr goes nowhere once it runs alone).
pub async fn agent_serve(cfg: &ClientConfig, args: SessionArgs) -> Result<(), ClientError> {
    let result = agent::serve(cfg, &JobOptions::from(&args), |vars| {
        for (k, v) in vars {
            out!("{k}={v}");
        }
        Ok(())
    })
    .await;
    if let Err(e) = &result {
        out!("error: {e}");
    }
    result
}

/// `meshsign agent start`: the same arguments, `start` replaced by `serve`, in the background.
pub async fn agent_start() -> Result<(), ClientError> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let at = args.iter().position(|a| a == "start").unwrap_or(args.len());
    let (before, after) = args.split_at(at);
    let global: Vec<std::ffi::OsString> =
        before.iter().filter(|a| *a != "agent").cloned().collect();
    agent::start_background(&global, after.get(1..).unwrap_or_default(), |l| out!("{l}")).await
}

/// `meshsign agent stop`.
pub async fn agent_stop() -> Result<(), ClientError> {
    let serial = agent::stop().await?;
    eprintln!("agent stopped; certificate {serial} revoked");
    Ok(())
}

/// `meshsign verify` arguments.
#[derive(Args)]
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

/// `meshsign verify`: offline; exit 1 when anything does not verify.
pub fn verify(a: VerifyArgs, format: Format) -> Result<(), ClientError> {
    let o = verify::VerifyOptions {
        file: a.file,
        receipt: a.receipt,
        audit_log: a.audit_log,
        audit_key: a.audit_key,
        checkpoint: a.checkpoint,
        distrust_list: a.distrust_list,
        bundle: a.bundle,
        public_key: a.public_key,
    };
    let v = verify::verify(&o)?;
    super::render::verified(&o.file, &v, format);
    Ok(())
}
