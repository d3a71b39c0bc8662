//! The runner's verbs: `meshsign sign` and `meshsign codesign`. A job enrolls once per command
//! with its OIDC token, keeps its key and certificate in memory, and revokes the certificate
//! when it is done.

use std::path::PathBuf;

use clap::Args;
#[cfg(feature = "codesign")]
use meshsign_client::net as transport;
use meshsign_client::session::token::{self, TokenSource};
use meshsign_client::session::{EnrollParams, Session, local_fingerprint};
use meshsign_client::usecase::agent;
use meshsign_client::{ClientConfig, ClientError};
use meshsign_evidence::verify::{self, SigBundle};
use meshsign_proto::v1;
#[cfg(feature = "codesign")]
use meshsign_proto::v1::verification_client::VerificationClient;

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

/// A session for a signing command: the job agent's (when `MESHSIGN_AGENT_SOCK` is set; no
/// token needed, and the agent revokes at its end) or a new enrollment of this command's own.
async fn open_session(
    cfg: &ClientConfig,
    args: &SessionArgs,
) -> Result<(Session, bool), ClientError> {
    let Some(sock) = std::env::var_os(agent::SOCK_VAR) else {
        return Ok((start_session(cfg, args).await?, true));
    };
    let environment = std::env::var(agent::ENV_VAR).unwrap_or_default();
    if environment != args.environment {
        return Err(ClientError::Usage(format!(
            "the job agent ({}) serves environment `{environment}`, not `{}`",
            agent::SOCK_VAR,
            args.environment
        )));
    }
    let signer = agent::connect(std::path::Path::new(&sock)).await?;
    let enrollment = v1::EnrollResponse {
        environment,
        region: std::env::var(agent::REGION_VAR).unwrap_or_else(|_| cfg.region.clone()),
        ..Default::default()
    };
    Ok((Session { enrollment, signer }, false))
}

/// Where the job's token comes from (nothing is fetched yet).
fn token_source(cfg: &ClientConfig, args: &SessionArgs) -> Result<TokenSource, ClientError> {
    Ok(
        match (&args.token_file, &args.token_env, &args.token_source) {
            (Some(f), _, _) => TokenSource::File(f.clone()),
            (_, Some(v), _) => TokenSource::Env(v.clone()),
            (_, _, Some(s)) => match s.as_str() {
                "gitlab" => TokenSource::Gitlab(args.id_token_var.clone()),
                "buildkite" => TokenSource::Buildkite,
                "auto" => token::detect(|v| std::env::var(v).ok()).ok_or_else(|| {
                    ClientError::Usage(
                        "--token-source auto: not in GitHub Actions, GitLab CI or Buildkite".into(),
                    )
                })?,
                _ => TokenSource::GithubActions,
            },
            _ => super::dev::fallback_token_source(cfg, &args.environment)?,
        },
    )
}

/// Obtains the job's token, makes a key in memory and enrolls.
pub async fn start_session(cfg: &ClientConfig, args: &SessionArgs) -> Result<Session, ClientError> {
    let source = token_source(cfg, args)?;
    let aud = cfg.audience(&args.environment)?;
    let mut cfg = cfg.clone();
    if let Some(ca) = &args.ca_file {
        cfg.token_ca_file = Some(ca.clone());
    }
    let tok = token::obtain(&source, &cfg, aud).await?;
    let params = EnrollParams {
        environment: args.environment.clone(),
        token: tok.to_string(),
        fingerprint: args.fingerprint.clone().unwrap_or_else(local_fingerprint),
        requested_ttl_seconds: args.ttl,
        region: None,
    };
    drop(tok);
    let session = Session::start(&cfg, &params).await?;
    eprintln!(
        "enrolled as {} (serial {}, {} s)",
        session.enrollment.spiffe_id,
        session.enrollment.serial,
        session.enrollment.granted_ttl_seconds
    );
    Ok(session)
}

/// Ends the session: its certificate is revoked, so a finished job leaves no live credential.
/// The job's own error comes first: a failed teardown after a failed step is reported as a
/// warning, never in its place.
async fn finish(session: &mut Session, result: Result<(), ClientError>) -> Result<(), ClientError> {
    let revoked = session.revoke_self("job finished").await;
    match (result, revoked) {
        (Ok(()), Ok(_)) => Ok(()),
        (Ok(()), Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Err(e), Err(r)) => {
            eprintln!("meshsign: warning: revoking the job's certificate also failed: {r}");
            Err(e)
        }
    }
}

/// A key that is not there would be found only after the job's one-time token was spent: ask
/// the site's public Verification service first (its refusal names the nearest alias). With a
/// job agent the token is already spent, so there is nothing to save.
async fn key_exists(
    cfg: &ClientConfig,
    args: &SessionArgs,
    alias: &str,
) -> Result<(), ClientError> {
    if std::env::var_os(agent::SOCK_VAR).is_some() {
        return Ok(());
    }
    // What the command itself lacks (a token source, the environment's audience) is said
    // first, before anything goes over the network.
    token_source(cfg, args)?;
    cfg.audience(&args.environment)?;
    let mut v = meshsign_client::site::verification::client(cfg).await?;
    match meshsign_client::site::verification::material(&mut v, &args.environment, alias).await {
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

/// `meshsign sign`. Every input is read (and hashed) before the job's token is spent.
pub async fn sign(
    cfg: &ClientConfig,
    args: SignArgs,
    format: super::admin::Format,
) -> Result<(), ClientError> {
    let mut digests = Vec::with_capacity(args.files.len());
    for file in &args.files {
        if !file.is_file() {
            return Err(ClientError::Usage(format!(
                "{}: no such file (nothing was enrolled; the token is not spent)",
                file.display()
            )));
        }
        digests.push(verify::sha256_file(file)?);
        if args.message {
            verify::read_message(file)?;
        }
    }
    if args.format == SigFormat::Dsse {
        if args.message {
            return Err(ClientError::Usage(
                "--format dsse makes a statement about each file's SHA-256; --message does not                  apply (nothing was enrolled; the token is not spent)"
                    .into(),
            ));
        }
        let attest = AttestArgs {
            runner: args.runner,
            predicate_type: "signing".into(),
            bundle: None,
            files: args.files,
        };
        return attest_files(cfg, attest, format).await;
    }
    key_exists(cfg, &args.runner.session, &args.runner.key).await?;
    let (mut session, own) = open_session(cfg, &args.runner.session).await?;
    let result = sign_files(cfg, &mut session, &args, &digests, format).await;
    if own {
        finish(&mut session, result).await
    } else {
        result
    }
}

#[cfg(feature = "codesign")]
pub async fn codesign(
    cfg: &ClientConfig,
    args: CodesignArgs,
    format: super::admin::Format,
) -> Result<(), ClientError> {
    if !args.input.exists() {
        return Err(ClientError::Usage(format!(
            "{}: no such file or bundle (nothing was enrolled; the token is not spent)",
            args.input.display()
        )));
    }
    let tls = transport::tls_config(transport::roots(cfg)?, None)?;
    let ch = transport::connect_to(cfg, &cfg.enroll_endpoint, tls).await?;
    let identity = VerificationClient::new(ch)
        .get_signing_identity(v1::GetVerificationMaterialRequest {
            environment: args.runner.session.environment.clone(),
            key_alias: args.runner.key.clone(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetSigningIdentity", s))?
        .into_inner();
    if identity.certificate_chain.is_empty() {
        return Err(ClientError::Usage(format!(
            "key `{}` has no certificate, so it makes no Apple signatures: attach one with \
             `meshsign admin key set-certificate` (nothing was enrolled; the token is not spent)",
            args.runner.key
        )));
    }
    let (mut session, own) = open_session(cfg, &args.runner.session).await?;
    let opts = meshsign_client::usecase::codesign::CodesignOptions {
        alias: args.runner.key.clone(),
        input: args.input.clone(),
        output: args.output.clone(),
        entitlements: args.entitlements.clone(),
        runtime: args.runtime,
        timestamp_url: args.timestamp_url.clone().filter(|u| u != "none"),
    };
    let result =
        meshsign_client::usecase::codesign::codesign(session.signer.clone(), identity, opts).await;
    if own {
        finish(&mut session, result).await?;
    } else {
        result?;
    }
    let signed = args.output.as_ref().unwrap_or(&args.input).display();
    if format == super::admin::Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "file": signed.to_string(),
                "key": args.runner.key,
                "environment": args.runner.session.environment,
            })
        );
    } else {
        out!(
            "{signed}: signed with {} ({})",
            args.runner.key,
            args.runner.session.environment
        );
    }
    Ok(())
}

/// `meshsign attest`: one statement about every file, built and signed by the site.
pub async fn attest(
    cfg: &ClientConfig,
    args: AttestArgs,
    format: super::admin::Format,
) -> Result<(), ClientError> {
    attest_files(cfg, args, format).await
}

async fn attest_files(
    cfg: &ClientConfig,
    args: AttestArgs,
    format: super::admin::Format,
) -> Result<(), ClientError> {
    use meshsign_evidence::attest::{PREDICATE_SIGNING, PREDICATE_SLSA};
    let predicate = match args.predicate_type.as_str() {
        "signing" | PREDICATE_SIGNING => PREDICATE_SIGNING,
        "slsa" | PREDICATE_SLSA => PREDICATE_SLSA,
        other => {
            return Err(ClientError::Usage(format!(
                "--predicate-type `{other}`: signing, slsa, {PREDICATE_SIGNING} or {PREDICATE_SLSA}"
            )));
        }
    };
    let mut subjects = Vec::with_capacity(args.files.len());
    for file in &args.files {
        if !file.is_file() {
            return Err(ClientError::Usage(format!(
                "{}: no such file (nothing was enrolled; the token is not spent)",
                file.display()
            )));
        }
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        subjects.push((name, verify::sha256_file(file)?));
    }
    let out_path = match (&args.bundle, args.files.first()) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => super::sibling(f, ".intoto.json"),
        (None, None) => return Err(ClientError::Usage("no files".into())),
    };
    key_exists(cfg, &args.runner.session, &args.runner.key).await?;
    let (mut session, own) = open_session(cfg, &args.runner.session).await?;
    let result = session
        .attest(&args.runner.key, &subjects, predicate)
        .await
        .and_then(|r| {
            // Checked before anything is written: the envelope verifies under the key the
            // site names and is about these files.
            let env: meshsign_evidence::attest::Envelope = serde_json::from_slice(&r.envelope_json)
                .map_err(|e| ClientError::Verify(format!("the site's envelope: {e}")))?;
            for (_, d) in &subjects {
                verify::open_statement(&env, &r.public_key_der, d).map_err(|e| {
                    ClientError::Verify(format!("the site's statement does not verify: {e}"))
                })?;
            }
            meshsign_evidence::files::write_atomic(&out_path, &r.envelope_json, false)
                .map_err(ClientError::io(&out_path))?;
            Ok(r)
        });
    let r = if own {
        let (r, done) = match result {
            Ok(r) => (Some(r), Ok(())),
            Err(e) => (None, Err(e)),
        };
        finish(&mut session, done).await?;
        r
    } else {
        Some(result?)
    };
    let Some(r) = r else { return Ok(()) };
    if format == super::admin::Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "envelope": out_path.display().to_string(), "key_id": r.key_id,
                "predicate_type": predicate, "audit_id": r.audit_id, "audit_seq": r.audit_seq,
                "subjects": subjects.iter().map(|(n, d)| serde_json::json!({"name": n, "sha256": hex::encode(d)})).collect::<Vec<_>>(),
            })
        );
    } else {
        out!(
            "{}: {} subject(s), {predicate}, signed with {} (audit {})",
            out_path.display(),
            subjects.len(),
            r.key_id,
            r.audit_id
        );
    }
    Ok(())
}

/// The receipt of a Sign response from the site's Verification service, checked against its
/// audit key and against the signature it is for.
async fn fetch_receipt(
    v: &mut meshsign_proto::v1::verification_client::VerificationClient<tonic::transport::Channel>,
    audit_spki: &[u8],
    r: &v1::SignResponse,
    bundle: &SigBundle,
) -> Result<meshsign_evidence::receipt::Receipt, ClientError> {
    let receipt =
        meshsign_client::site::verification::receipt(v, r.audit_seq, &r.audit_entry, audit_spki)
            .await?;
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

async fn sign_files(
    cfg: &ClientConfig,
    session: &mut Session,
    args: &SignArgs,
    digests: &[[u8; 32]],
    format: super::admin::Format,
) -> Result<(), ClientError> {
    // The site's audit key, to check each receipt before it goes into a bundle.
    let mut verification = match meshsign_client::site::verification::client(cfg).await {
        Ok(mut v) => match meshsign_client::site::verification::material(
            &mut v,
            &session.enrollment.environment,
            &args.runner.key,
        )
        .await
        {
            Ok(m) => Ok((v, m.audit_public_key_der)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match (&verification, args.format) {
        (Err(e), SigFormat::Sigstore) => {
            return Err(ClientError::Usage(format!(
                "--format sigstore needs the site's audit receipts: {e}"
            )));
        }
        (Err(e), _) => eprintln!(
            "meshsign: warning: the bundles will carry no audit receipt (the site's \
             verification service: {e})"
        ),
        _ => {}
    }
    for (file, digest) in args.files.iter().zip(digests) {
        let digest = *digest;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Checked (the signature verifies under the returned key) before anything is written.
        let (r, bundle) = if args.message {
            let message = verify::read_message(file)?;
            let r = session
                .sign_message(&args.runner.key, &message, &name)
                .await?;
            let b = meshsign_client::site::verification::bundle_from_message_response(
                &r,
                &name,
                &message,
                &session.enrollment.region,
                &session.enrollment.environment,
            )?;
            (r, b)
        } else {
            let r = session.sign_digest(&args.runner.key, digest, &name).await?;
            let b = meshsign_client::site::verification::bundle_from_response(
                &r,
                &name,
                &digest,
                &session.enrollment.region,
                &session.enrollment.environment,
            )?;
            (r, b)
        };
        let mut bundle = bundle;
        let receipt = match &mut verification {
            Ok((v, spki)) => match fetch_receipt(v, spki, &r, &bundle).await {
                Ok(receipt) => Some((receipt, spki.clone())),
                Err(e) if args.format == SigFormat::Native => {
                    eprintln!(
                        "meshsign: warning: {}: no audit receipt in the bundle: {e}",
                        file.display()
                    );
                    None
                }
                Err(e) => return Err(e),
            },
            Err(_) => None,
        };
        let (sig_path, json_path) = if args.format == SigFormat::Sigstore {
            let Some((receipt, spki)) = receipt else {
                return Err(ClientError::Usage(
                    "--format sigstore needs the site's audit receipt".into(),
                ));
            };
            let hint = format!("{}/{}/{}", bundle.region, bundle.environment, bundle.key_id);
            let tlog =
                meshsign_evidence::bundle::sigstore::TlogEntry::from_receipt(&receipt, &spki)?;
            let sb = meshsign_evidence::bundle::sigstore::Bundle::message(
                hint,
                &digest,
                &r.signature,
                Some(tlog),
            );
            let path = super::sibling(file, ".sigstore.json");
            let json =
                serde_json::to_vec_pretty(&sb).map_err(|e| ClientError::Crypto(e.to_string()))?;
            std::fs::write(&path, json).map_err(ClientError::io(&path))?;
            (path.clone(), path)
        } else {
            bundle.receipt = receipt.map(|(r, _)| r);
            let sig_path = super::sibling(file, ".sig");
            let json_path = super::sibling(file, ".sig.json");
            std::fs::write(&sig_path, &r.signature).map_err(ClientError::io(&sig_path))?;
            let json = serde_json::to_vec_pretty(&bundle)
                .map_err(|e| ClientError::Crypto(e.to_string()))?;
            std::fs::write(&json_path, json).map_err(ClientError::io(&json_path))?;
            (sig_path, json_path)
        };
        if format == super::admin::Format::Json {
            // One JSON object per line (per file), written as each file is signed.
            out!(
                "{}",
                serde_json::json!({
                    "file": file.display().to_string(),
                    "key_id": r.key_id,
                    "audit_id": r.audit_id,
                    "audit_seq": r.audit_seq,
                    "signature": sig_path.display().to_string(),
                    "bundle": json_path.display().to_string(),
                })
            );
        } else {
            out!(
                "{}: signed with {} (audit {}) -> {}",
                file.display(),
                r.key_id,
                r.audit_id,
                sig_path.display()
            );
        }
    }
    Ok(())
}

// === one enrollment per job ===

/// `meshsign exec`: enroll once, serve the job agent, run COMMAND with `MESHSIGN_AGENT_SOCK`,
/// then revoke and exit with COMMAND's status.
pub async fn exec(
    cfg: &ClientConfig,
    args: SessionArgs,
    command: Vec<String>,
) -> Result<u8, ClientError> {
    let (program, rest) = command
        .split_first()
        .ok_or_else(|| ClientError::Usage("give the command after --".into()))?;
    let session = start_session(cfg, &args).await?;
    let (environment, region) = (
        session.enrollment.environment.clone(),
        session.enrollment.region.clone(),
    );
    let agent = agent::Agent::start(session, cfg).await?;
    let status = tokio::process::Command::new(program)
        .args(rest)
        .env(agent::SOCK_VAR, agent.socket())
        .env(agent::ENV_VAR, &environment)
        .env(agent::REGION_VAR, &region)
        .status()
        .await;
    let finished = agent.finish("job finished").await;
    let status = status.map_err(|e| ClientError::Usage(format!("{program}: {e}")))?;
    if let Err(e) = finished {
        eprintln!("meshsign: warning: revoking the job's certificate failed: {e}");
        if status.success() {
            return Err(e);
        }
    }
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1))
}

/// `meshsign agent serve` (what `agent start` runs in the background): enroll, print the
/// variables for the job's later steps, serve until `agent stop`.
pub async fn agent_serve(cfg: &ClientConfig, args: SessionArgs) -> Result<(), ClientError> {
    let result = agent_serve_inner(cfg, args).await;
    if let Err(e) = &result {
        // `agent start` reads this (the agent's stderr goes nowhere once it runs alone).
        out!("error: {e}");
    }
    result
}

async fn agent_serve_inner(cfg: &ClientConfig, args: SessionArgs) -> Result<(), ClientError> {
    use std::io::Write as _;
    let session = start_session(cfg, &args).await?;
    let (environment, region) = (
        session.enrollment.environment.clone(),
        session.enrollment.region.clone(),
    );
    let mut agent = agent::Agent::start(session, cfg).await?;
    {
        crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = std::io::stdout().lock();
        let lines = format!(
            "{}={}\n{}={}\n{}={}\n",
            agent::SOCK_VAR,
            agent.socket().display(),
            agent::ENV_VAR,
            environment,
            agent::REGION_VAR,
            region
        );
        out.write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| ClientError::Io {
                path: "stdout".into(),
                source: e,
            })?;
    }
    agent.stopped().await;
    agent.finish("job finished").await
}

/// `meshsign agent start`: runs `agent serve` in the background and prints its variables once
/// it serves (for `$GITHUB_ENV`, or `eval` in a GitLab `before_script`).
pub async fn agent_start(
    global: &[std::ffi::OsString],
    args: &[std::ffi::OsString],
) -> Result<(), ClientError> {
    use tokio::io::AsyncBufReadExt as _;
    let me = std::env::current_exe().map_err(|e| ClientError::Usage(e.to_string()))?;
    let mut child = tokio::process::Command::new(me)
        .args(global)
        .args(["agent", "serve"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // The agent outlives this command: it must not hold the caller's output open (a CI
        // step waits for it). Its own failures before serving come back on stdout.
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| ClientError::Usage(format!("cannot start the agent: {e}")))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| ClientError::Usage("the agent has no stdout".into()))?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let mut printed = 0;
    while printed < 3 {
        match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("error: ") => {
                return Err(ClientError::Usage(format!(
                    "the agent did not start: {}",
                    &l[7..]
                )));
            }
            Ok(Some(l)) => {
                out!("{l}");
                printed += 1;
            }
            _ => {
                let status = child.wait().await.ok();
                return Err(ClientError::Usage(format!(
                    "the agent stopped before it served ({status:?}); see its message above"
                )));
            }
        }
    }
    Ok(())
}

/// `meshsign agent stop`: revokes the agent's certificate and stops it.
pub async fn agent_stop() -> Result<(), ClientError> {
    let sock = std::env::var_os(agent::SOCK_VAR)
        .ok_or_else(|| ClientError::Usage(format!("{} is not set", agent::SOCK_VAR)))?;
    let serial = agent::connect(std::path::Path::new(&sock))
        .await?
        .revoke_self(v1::RevokeSelfRequest {
            reason: "job finished".into(),
        })
        .await
        .map_err(|s| ClientError::rpc("RevokeSelf", s))?
        .into_inner()
        .serial;
    eprintln!("agent stopped; certificate {serial} revoked");
    Ok(())
}
