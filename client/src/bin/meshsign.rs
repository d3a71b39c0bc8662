//! `meshsign`: the runner and verifier CLI.
//!
//! - `meshsign sign --environment E --key ALIAS FILE...`: enroll with the job's OIDC token, sign
//!   each file's SHA-256 at the site, write `FILE.sig` and `FILE.sig.json`.
//! - `meshsign verify FILE`: offline verification (exit 1 on mismatch).
//! - `meshsign verification-material --environment E --key ALIAS`: the key's public versions.
//! - `meshsign dev token --environment E`: a token from a dev site's issuer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use meshsign_certs_dev::GithubJob;
use meshsign_client::runner::{EnrollParams, Session, local_fingerprint};
use meshsign_client::token::{self, TokenSource};
use meshsign_client::verify::{self, SigBundle};
use meshsign_client::{ClientConfig, ClientError, transport};
use meshsign_proto::pem_encode;
use meshsign_proto::v1::{self, verification_client::VerificationClient};

#[derive(Parser)]
#[command(name = "meshsign", version, about = "meshsign runner and verifier CLI")]
struct Cli {
    /// Client config (client.toml).
    #[arg(long, env = "MESHSIGN_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll with the job's OIDC token and sign files with a site key.
    Sign(SignArgs),
    /// Apple code signature (Mach-O, .app, .dmg) made on this machine, signed by the site.
    #[cfg(feature = "codesign")]
    Codesign(CodesignArgs),
    /// Verify FILE against FILE.sig.json offline; exit 1 on mismatch.
    Verify {
        /// The file.
        file: PathBuf,
        /// Also check the signature's audit receipt against an exported audit log.
        #[arg(long, requires_all = ["audit_log", "audit_key"])]
        receipt: bool,
        /// Audit export (JSON lines) for --receipt.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// The site's audit public key (PEM) for --receipt.
        #[arg(long)]
        audit_key: Option<PathBuf>,
        /// Signature bundle (default FILE.sig.json).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Require the bundle's key to be this public key (PEM, e.g. from verification-material).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Print every version of a key's public key as PEM.
    VerificationMaterial {
        /// Environment (partition).
        #[arg(long)]
        environment: String,
        /// Key alias.
        #[arg(long)]
        key: String,
    },
    /// Dev-site helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Offline audit checks.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Ops verbs on the admin port (needs `[admin]` in the client config).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit export's chain and checkpoint signatures; names the first bad seq.
    Verify {
        /// Export (JSON lines).
        file: PathBuf,
        /// The site's audit public key (PEM, from `meshsign admin audit public-key`).
        #[arg(long)]
        audit_key: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminAuditCommand {
    /// Print the audit (checkpoint) public key as PEM.
    PublicKey,
    /// Stream the audit log as JSON lines to stdout.
    Export {
        /// First seq, or a time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Keep streaming new entries.
        #[arg(long)]
        follow: bool,
        /// Only this environment (others become omitted-entry lines).
        #[arg(long)]
        environment: Option<String>,
        /// Only this job.
        #[arg(long)]
        job_id: Option<String>,
        /// Only this decision (allow|deny).
        #[arg(long)]
        decision: Option<String>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// The audit log: public key, export.
    Audit {
        #[command(subcommand)]
        command: AdminAuditCommand,
    },
    /// Runner CAs: list, stage, activate, retire, revoke.
    Issuer {
        #[command(subcommand)]
        command: IssuerCommand,
    },
    /// Revoke certificates by serial, job or runner fingerprint (effective on the next RPC).
    Revoke {
        /// Certificate serial (hex).
        #[arg(long, group = "target", required = true)]
        serial: Option<String>,
        /// Every certificate of a CI job.
        #[arg(long, group = "target")]
        job_id: Option<String>,
        /// Every certificate of a runner machine.
        #[arg(long, group = "target")]
        fingerprint: Option<String>,
        /// Only certificates of this region.
        #[arg(long)]
        region: Option<String>,
        /// Only certificates issued at or after (unix seconds or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only certificates issued at or before (unix seconds or RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
    /// List revocation rules.
    Revocations,
    /// Trust policies: list, disable, enable, jwks set.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Signing keys: list, create, rotate, disable, import.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Disable a trust policy, prove refusal, re-enable; exit 1 if refusal took over 1 s.
    Drill {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// Issuer URL of the policy (default: a random enabled one).
        #[arg(long)]
        issuer: Option<String>,
        /// Mint the drill's tokens from the CI (github-actions); default: the dev issuer.
        #[arg(long, value_parser = ["github-actions"])]
        token_source: Option<String>,
    },
}

#[derive(Subcommand)]
enum IssuerCommand {
    /// List runner CAs.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Make a new runner CA that the sign port trusts but that does not issue yet.
    Stage {
        #[arg(long)]
        environment: String,
    },
    /// Make the staged CA (or --id) the one that issues; the previous one retires by itself.
    Activate {
        #[arg(long)]
        environment: String,
        #[arg(long, default_value = "")]
        id: String,
    },
    /// Stop trusting a staged or retiring CA now.
    Retire {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        id: String,
    },
    /// Distrust a CA at once (revoking the active one activates a fresh one).
    Revoke {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// List trust policies.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Refuse new enrollments (and, unless --keep-sessions, sign calls) from a policy.
    Disable {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        issuer: String,
        /// Let certificates it already minted keep signing.
        #[arg(long)]
        keep_sessions: bool,
    },
    /// Re-enable a policy.
    Enable {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        issuer: String,
    },
    /// Pinned JWKS.
    Jwks {
        #[command(subcommand)]
        command: JwksCommand,
    },
}

#[derive(Subcommand)]
enum JwksCommand {
    /// Pin a JWKS file for an issuer (every environment that trusts it, unless --environment).
    Set {
        #[arg(long)]
        environment: Option<String>,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List keys and their versions.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Create a key alias (v1).
    Create {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long, default_value = "ecdsa-p256-sha256")]
        algorithm: String,
        /// Repository pattern that may use it (repeat; "*" for any).
        #[arg(long = "repository", required = true)]
        repositories: Vec<String>,
        /// Ref pattern that may use it (repeat; "*" for any).
        #[arg(long = "ref", required = true)]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms. Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
    /// Add alias@vN+1, which signs from then on.
    Rotate {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
    },
    /// Stop signing with an alias (its versions stay verifiable).
    Disable {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
    },
    /// Import a PKCS#8 PEM private key (one-way).
    Import {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        /// PKCS#8 PEM private key.
        #[arg(long, required_unless_present = "p12", conflicts_with = "p12")]
        file: Option<PathBuf>,
        /// PKCS#12 (.p12 as exported from Keychain): key and certificate chain.
        #[arg(long)]
        p12: Option<PathBuf>,
        /// Environment variable holding the .p12 password (else it is asked for on the terminal).
        #[arg(long, default_value = "MESHSIGN_P12_PASSWORD")]
        password_env: String,
        /// Certificate chain for the key (PEM, leaf first).
        #[arg(long)]
        chain: Option<PathBuf>,
        #[arg(long = "repository")]
        repositories: Vec<String>,
        #[arg(long = "ref")]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms. Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
    /// Print a CSR signed by the key (for Apple or another CA); the key stays in the site.
    Csr {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long)]
        common_name: String,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, default_value = "")]
        organization: String,
        #[arg(long, default_value = "")]
        country: String,
    },
    /// Attach the certificate chain the CA returned (PEM, leaf first) to the key.
    SetCertificate {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Print a token from the dev issuer, shaped as GitHub Actions issues them.
    Token {
        /// Environment: selects the audience.
        #[arg(long)]
        environment: String,
        #[command(flatten)]
        job: JobArgs,
    },
}

#[derive(Args, Clone)]
struct JobArgs {
    /// `repository` claim.
    #[arg(long, default_value = "acme/app")]
    repository: String,
    /// `ref` claim.
    #[arg(long = "ref", default_value = "refs/heads/main")]
    git_ref: String,
    /// `run_id` claim (the job id).
    #[arg(long, default_value = "1001")]
    job_id: String,
}

/// `meshsign codesign` arguments.
#[cfg(feature = "codesign")]
#[derive(Args)]
struct CodesignArgs {
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
struct SignArgs {
    #[command(flatten)]
    runner: RunnerArgs,
    /// Files to sign.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshsign: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshsign: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Option<PathBuf>) -> Result<ClientConfig, ClientError> {
    let p = path
        .as_ref()
        .ok_or_else(|| ClientError::Config("give --config FILE or set MESHSIGN_CONFIG".into()))?;
    ClientConfig::load(p)
}

fn sibling(file: &Path, ext: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    match cli.command {
        Command::Audit {
            command: AuditCommand::Verify { file, audit_key },
        } => {
            let text = std::fs::read_to_string(&file).map_err(ClientError::io(&file))?;
            let lines = meshsign_proto::audit::parse_export(&text).map_err(ClientError::Verify)?;
            let pem = std::fs::read_to_string(&audit_key).map_err(ClientError::io(&audit_key))?;
            let key = verify::audit_key_from_pem(&pem)?;
            let r = meshsign_proto::audit::verify_export(&lines, &key)
                .map_err(|e| ClientError::Verify(e.to_string()))?;
            println!(
                "{}: OK — seq {}..{}: {} entries, {} omitted, {} signed checkpoints, {} after the last checkpoint",
                file.display(),
                r.first_seq,
                r.last_seq,
                r.entries,
                r.omitted,
                r.checkpoints,
                r.unanchored
            );
            Ok(())
        }
        Command::Verify {
            file,
            bundle,
            public_key,
            receipt,
            audit_log,
            audit_key,
        } => {
            let bundle_path = bundle.unwrap_or_else(|| sibling(&file, ".sig.json"));
            let text = std::fs::read(&bundle_path).map_err(ClientError::io(&bundle_path))?;
            let b: SigBundle = serde_json::from_slice(&text)
                .map_err(|e| ClientError::Verify(format!("{}: {e}", bundle_path.display())))?;
            let pin = match &public_key {
                Some(p) => Some(verify::spki_from_pem(
                    &std::fs::read_to_string(p).map_err(ClientError::io(p))?,
                )?),
                None => None,
            };
            verify::verify_file(&file, &b, pin.as_deref())?;
            if receipt && let (Some(log), Some(key)) = (&audit_log, &audit_key) {
                let text = std::fs::read_to_string(log).map_err(ClientError::io(log))?;
                let lines =
                    meshsign_proto::audit::parse_export(&text).map_err(ClientError::Verify)?;
                let pem = std::fs::read_to_string(key).map_err(ClientError::io(key))?;
                let anchored =
                    verify::verify_receipt(&b, &lines, &verify::audit_key_from_pem(&pem)?)?;
                println!(
                    "{}: receipt OK (audit entry {}{})",
                    file.display(),
                    b.audit_seq,
                    if anchored {
                        ", under a signed checkpoint"
                    } else {
                        ", not yet under a signed checkpoint"
                    }
                );
            }
            println!(
                "{}: OK ({} in {}/{}, audit {})",
                file.display(),
                b.key_id,
                b.region,
                b.environment,
                b.audit_id
            );
            if pin.is_none() {
                eprintln!(
                    "note: the key was taken from the bundle; pin it with --public-key (see verification-material)"
                );
            }
            Ok(())
        }
        Command::VerificationMaterial { environment, key } => {
            let cfg = load_config(&cli.config)?;
            let tls = transport::tls_config(transport::roots(&cfg)?, None)?;
            let ch = transport::connect(&cfg.enroll_endpoint, &cfg.server_name, tls).await?;
            let resp = VerificationClient::new(ch)
                .get_verification_material(v1::GetVerificationMaterialRequest {
                    environment,
                    key_alias: key,
                })
                .await
                .map_err(|s| ClientError::rpc("GetVerificationMaterial", s))?
                .into_inner();
            for k in resp.keys {
                println!(
                    "# {} {}{}",
                    k.key_id,
                    k.algorithm,
                    if k.active { " (active)" } else { "" }
                );
                print!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
            }
            Ok(())
        }
        Command::Dev {
            command: DevCommand::Token { environment, job },
        } => {
            let cfg = load_config(&cli.config)?;
            let aud = cfg.audience(&environment)?;
            let t = token::dev_token(&cfg, aud, &github_job(&environment, &job))?;
            println!("{}", t.as_str());
            Ok(())
        }
        Command::Sign(args) => sign(&load_config(&cli.config)?, args).await,
        #[cfg(feature = "codesign")]
        Command::Codesign(args) => codesign(&load_config(&cli.config)?, args).await,
        Command::Admin { command } => admin(&load_config(&cli.config)?, command).await,
    }
}

fn when(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn print_issuer(i: &v1::IssuerInfo) {
    let extra = match &i.retire_after {
        Some(_) => format!(" retire_after={}", when(i.retire_after)),
        None => String::new(),
    };
    println!(
        "{}\t{}\t{}\tcreated={}{extra}",
        i.environment,
        i.id,
        i.state,
        when(i.created_at)
    );
}

fn print_policy(p: &v1::TrustPolicyInfo) {
    let state = if p.enabled {
        "enabled"
    } else if p.keep_sessions {
        "disabled (sessions kept)"
    } else {
        "disabled"
    };
    println!(
        "{}\t{}\t{}\t{state}\tkids={}",
        p.environment,
        p.name,
        p.issuer,
        p.kids.join(",")
    );
}

fn print_key(k: &v1::KeyInfo) {
    let versions: Vec<String> = k
        .versions
        .iter()
        .map(|v| format!("{}{}", v.key_id, if v.active { "*" } else { "" }))
        .collect();
    println!(
        "{}\t{}\t{}\t{}\t{}\trepos={} refs={}",
        k.environment,
        k.alias,
        k.algorithm,
        if k.disabled { "disabled" } else { "enabled" },
        versions.join(","),
        k.repositories.join(","),
        k.refs.join(",")
    );
}

async fn admin(cfg: &ClientConfig, command: AdminCommand) -> Result<(), ClientError> {
    use meshsign_client::admin::parse_time;
    let mut c = meshsign_client::admin::connect(cfg).await?;
    let env = |e: &str| v1::EnvironmentRequest {
        environment: e.into(),
    };
    let iref = |e: &str, id: &str, reason: &str| v1::IssuerRef {
        environment: e.into(),
        id: id.into(),
        reason: reason.into(),
    };
    let rpc = |name: &'static str| move |s: tonic::Status| ClientError::rpc(name, s);
    match command {
        AdminCommand::Audit {
            command: AdminAuditCommand::PublicKey,
        } => {
            let k = c
                .get_audit_public_key(v1::GetAuditPublicKeyRequest {})
                .await
                .map_err(rpc("GetAuditPublicKey"))?
                .into_inner();
            eprintln!("# audit key {}", k.key_id);
            print!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
        }
        AdminCommand::Audit {
            command:
                AdminAuditCommand::Export {
                    since,
                    follow,
                    environment,
                    job_id,
                    decision,
                },
        } => {
            use std::io::Write as _;
            let (since_seq, since_time) = match since.as_deref() {
                None => (0, 0),
                Some(s) => match s.parse::<u64>() {
                    Ok(n) => (n, 0),
                    Err(_) => (0, parse_time(s)?),
                },
            };
            let req = v1::ExportAuditRequest {
                since_seq,
                since_time,
                follow,
                environment: environment.unwrap_or_default(),
                job_id: job_id.unwrap_or_default(),
                decision: decision.unwrap_or_default(),
            };
            let mut stream = c
                .export_audit(req)
                .await
                .map_err(rpc("ExportAudit"))?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(line) = stream.message().await.map_err(rpc("ExportAudit"))? {
                writeln!(out, "{}", line.json).map_err(|e| ClientError::Io {
                    path: "stdout".into(),
                    source: e,
                })?;
                if follow {
                    out.flush().map_err(|e| ClientError::Io {
                        path: "stdout".into(),
                        source: e,
                    })?;
                }
            }
        }
        AdminCommand::Issuer { command } => {
            let out = match command {
                IssuerCommand::List { environment } => {
                    let l = c
                        .list_issuers(env(&environment))
                        .await
                        .map_err(rpc("ListIssuers"))?
                        .into_inner();
                    l.issuers.iter().for_each(print_issuer);
                    return Ok(());
                }
                IssuerCommand::Stage { environment } => c
                    .stage_issuer(env(&environment))
                    .await
                    .map_err(rpc("StageIssuer"))?,
                IssuerCommand::Activate { environment, id } => c
                    .activate_issuer(iref(&environment, &id, ""))
                    .await
                    .map_err(rpc("ActivateIssuer"))?,
                IssuerCommand::Retire { environment, id } => c
                    .retire_issuer(iref(&environment, &id, ""))
                    .await
                    .map_err(rpc("RetireIssuer"))?,
                IssuerCommand::Revoke {
                    environment,
                    id,
                    reason,
                } => c
                    .revoke_issuer(iref(&environment, &id, &reason))
                    .await
                    .map_err(rpc("RevokeIssuer"))?,
            };
            print_issuer(out.get_ref());
        }
        AdminCommand::Revoke {
            serial,
            job_id,
            fingerprint,
            region,
            since,
            until,
            reason,
        } => {
            use v1::revoke_request::Target;
            let target = match (serial, job_id, fingerprint) {
                (Some(s), _, _) => Target::Serial(s),
                (_, Some(j), _) => Target::JobId(j),
                (_, _, Some(f)) => Target::Fingerprint(f),
                _ => {
                    return Err(ClientError::Config(
                        "give --serial, --job-id or --fingerprint".into(),
                    ));
                }
            };
            let req = v1::RevokeRequest {
                target: Some(target),
                region: region.unwrap_or_default(),
                since: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                until: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                reason,
            };
            let r = c.revoke(req).await.map_err(rpc("Revoke"))?.into_inner();
            println!(
                "revocation {} matched {} issued certificate(s)",
                r.rule_id,
                r.serials.len()
            );
            for s in r.serials {
                println!("  {s}");
            }
        }
        AdminCommand::Revocations => {
            let r = c
                .list_revocations(v1::ListRevocationsRequest {})
                .await
                .map_err(rpc("ListRevocations"))?
                .into_inner();
            for r in r.rules {
                println!(
                    "{}\t{}={}\tregion={}\tby {}\t{}",
                    r.id, r.kind, r.value, r.region, r.operator, r.reason
                );
            }
        }
        AdminCommand::Trust { command } => match command {
            TrustCommand::List { environment } => {
                let l = c
                    .list_trust_policies(env(&environment))
                    .await
                    .map_err(rpc("ListTrustPolicies"))?
                    .into_inner();
                l.policies.iter().for_each(print_policy);
            }
            TrustCommand::Disable {
                environment,
                issuer,
                keep_sessions,
            } => {
                let req = v1::SetTrustPolicyEnabledRequest {
                    environment,
                    issuer,
                    enabled: false,
                    keep_sessions,
                };
                print_policy(
                    c.set_trust_policy_enabled(req)
                        .await
                        .map_err(rpc("DisableTrustPolicy"))?
                        .get_ref(),
                );
            }
            TrustCommand::Enable {
                environment,
                issuer,
            } => {
                let req = v1::SetTrustPolicyEnabledRequest {
                    environment,
                    issuer,
                    enabled: true,
                    keep_sessions: false,
                };
                print_policy(
                    c.set_trust_policy_enabled(req)
                        .await
                        .map_err(rpc("EnableTrustPolicy"))?
                        .get_ref(),
                );
            }
            TrustCommand::Jwks {
                command:
                    JwksCommand::Set {
                        environment,
                        issuer,
                        file,
                    },
            } => {
                let jwks = std::fs::read(&file).map_err(ClientError::io(&file))?;
                let envs: Vec<String> = match environment {
                    Some(e) => vec![e],
                    None => cfg.environments.keys().cloned().collect(),
                };
                let mut done = 0;
                for e in envs {
                    let req = v1::SetJwksRequest {
                        environment: e,
                        issuer: issuer.clone(),
                        jwks_json: jwks.clone(),
                    };
                    match c.set_jwks(req).await {
                        Ok(p) => {
                            print_policy(p.get_ref());
                            done += 1;
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => {}
                        Err(s) => return Err(ClientError::rpc("SetJwks", s)),
                    }
                }
                if done == 0 {
                    return Err(ClientError::Config(format!(
                        "no environment trusts issuer `{issuer}`"
                    )));
                }
            }
        },
        AdminCommand::Key { command } => {
            let out = match command {
                KeyCommand::List { environment } => {
                    let l = c
                        .list_keys(env(&environment))
                        .await
                        .map_err(rpc("ListKeys"))?
                        .into_inner();
                    l.keys.iter().for_each(print_key);
                    return Ok(());
                }
                KeyCommand::Create {
                    environment,
                    alias,
                    algorithm,
                    repositories,
                    refs,
                    purposes,
                } => {
                    let req = v1::CreateKeyRequest {
                        environment,
                        alias,
                        algorithm,
                        repositories,
                        refs,
                        purposes,
                    };
                    c.create_key(req).await.map_err(rpc("CreateKey"))?
                }
                KeyCommand::Rotate { environment, alias } => c
                    .rotate_key(v1::KeyRef { environment, alias })
                    .await
                    .map_err(rpc("RotateKey"))?,
                KeyCommand::Disable { environment, alias } => c
                    .disable_key(v1::KeyRef { environment, alias })
                    .await
                    .map_err(rpc("DisableKey"))?,
                KeyCommand::Import {
                    environment,
                    alias,
                    file,
                    p12,
                    password_env,
                    chain,
                    repositories,
                    refs,
                    purposes,
                } => {
                    let (pem, chain_pem) = match (&file, &p12) {
                        (_, Some(p12)) => meshsign_client::admin::read_p12(p12, &password_env)?,
                        (Some(file), None) => {
                            let pem = zeroize::Zeroizing::new(
                                std::fs::read(file).map_err(ClientError::io(file))?,
                            );
                            let chain_pem = match &chain {
                                Some(p) => std::fs::read(p).map_err(ClientError::io(p))?,
                                None => Vec::new(),
                            };
                            (pem, chain_pem)
                        }
                        (None, None) => {
                            return Err(ClientError::Config("give --file or --p12".into()));
                        }
                    };
                    let req = v1::ImportKeyRequest {
                        environment,
                        alias,
                        pkcs8_pem: pem.to_vec(),
                        repositories,
                        refs,
                        chain_pem,
                        purposes,
                    };
                    c.import_key(req).await.map_err(rpc("ImportKey"))?
                }
                KeyCommand::Csr {
                    environment,
                    alias,
                    common_name,
                    email,
                    organization,
                    country,
                } => {
                    let req = v1::KeyCsrRequest {
                        environment,
                        alias,
                        common_name,
                        email,
                        organization,
                        country,
                    };
                    let csr = c
                        .create_key_csr(req)
                        .await
                        .map_err(rpc("CreateKeyCsr"))?
                        .into_inner();
                    eprintln!("# CSR for {}", csr.key_id);
                    print!("{}", csr.csr_pem);
                    return Ok(());
                }
                KeyCommand::SetCertificate {
                    environment,
                    alias,
                    file,
                } => {
                    let chain_pem = std::fs::read(&file).map_err(ClientError::io(&file))?;
                    let req = v1::SetKeyCertificateRequest {
                        environment,
                        alias,
                        chain_pem,
                    };
                    c.set_key_certificate(req)
                        .await
                        .map_err(rpc("SetKeyCertificate"))?
                }
            };
            print_key(out.get_ref());
        }
        AdminCommand::Drill {
            environment,
            issuer,
            token_source,
        } => {
            let source = match token_source {
                Some(_) => TokenSource::GithubActions,
                None => TokenSource::Dev(GithubJob::new(&environment)),
            };
            let r =
                meshsign_client::drill::run(cfg, &environment, issuer.as_deref(), &source).await?;
            println!(
                "drill {environment}: policy {} ({}) — sign refused after {:.1} ms on an open connection, \
                 enrollment refused after {:.1} ms; re-enabled, enrollment {}",
                r.policy,
                r.issuer,
                r.sign_refused_after.as_secs_f64() * 1000.0,
                r.enroll_refused_after.as_secs_f64() * 1000.0,
                if r.restored {
                    "works again"
                } else {
                    "DID NOT recover"
                }
            );
            if r.worst() > std::time::Duration::from_secs(1) || !r.restored {
                return Err(ClientError::Verify(format!(
                    "drill failed: refusal took {:?} (limit 1 s)",
                    r.worst()
                )));
            }
        }
    }
    Ok(())
}

fn github_job(environment: &str, j: &JobArgs) -> GithubJob {
    let mut job = GithubJob::new(environment);
    job.repository = j.repository.clone();
    job.git_ref = j.git_ref.clone();
    job.run_id = j.job_id.clone();
    job
}

/// How a runner job gets its credentials: the token options shared by `sign` and `codesign`.
#[derive(Args, Clone)]
struct RunnerArgs {
    /// Environment (partition) this job signs in.
    #[arg(long)]
    environment: String,
    /// Key alias.
    #[arg(long)]
    key: String,
    /// Read the OIDC token from this file.
    #[arg(long, group = "tok")]
    token_file: Option<PathBuf>,
    /// Read the OIDC token from this environment variable.
    #[arg(long, group = "tok")]
    token_env: Option<String>,
    /// Fetch the OIDC token from the CI (github-actions).
    #[arg(long, group = "tok", value_parser = ["github-actions"])]
    token_source: Option<String>,
    /// Requested certificate lifetime in seconds (0 = the partition's cap).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Runner fingerprint (default: derived from this machine).
    #[arg(long)]
    fingerprint: Option<String>,
}

/// Obtains the job's token, makes a key in memory and enrolls.
async fn start_session(cfg: &ClientConfig, args: &RunnerArgs) -> Result<Session, ClientError> {
    let source = match (&args.token_file, &args.token_env, &args.token_source) {
        (Some(f), _, _) => TokenSource::File(f.clone()),
        (_, Some(v), _) => TokenSource::Env(v.clone()),
        (_, _, Some(_)) => TokenSource::GithubActions,
        _ if cfg.dev_issuer.is_some() => TokenSource::Dev(GithubJob::new(&args.environment)),
        _ => {
            return Err(ClientError::Token(
                "no token source: give --token-file, --token-env or --token-source github-actions"
                    .into(),
            ));
        }
    };
    let aud = cfg.audience(&args.environment)?;
    let tok = token::obtain(&source, cfg, aud).await?;
    let params = EnrollParams {
        environment: args.environment.clone(),
        token: tok.to_string(),
        fingerprint: args.fingerprint.clone().unwrap_or_else(local_fingerprint),
        requested_ttl_seconds: args.ttl,
        region: None,
    };
    drop(tok);
    let session = Session::start(cfg, &params).await?;
    eprintln!(
        "enrolled as {} (serial {}, {} s)",
        session.enrollment.spiffe_id,
        session.enrollment.serial,
        session.enrollment.granted_ttl_seconds
    );
    Ok(session)
}

/// Revokes the session's certificate: a finished job leaves no live credential.
async fn teardown(session: &mut Session) -> Result<(), ClientError> {
    session
        .signer
        .revoke_self(v1::RevokeSelfRequest {
            reason: "job finished".into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| ClientError::rpc("RevokeSelf", s))
}

async fn sign(cfg: &ClientConfig, args: SignArgs) -> Result<(), ClientError> {
    let mut session = start_session(cfg, &args.runner).await?;
    let result = sign_files(&mut session, &args).await;
    teardown(&mut session).await?;
    result
}

#[cfg(feature = "codesign")]
async fn codesign(cfg: &ClientConfig, args: CodesignArgs) -> Result<(), ClientError> {
    let tls = transport::tls_config(transport::roots(cfg)?, None)?;
    let ch = transport::connect(&cfg.enroll_endpoint, &cfg.server_name, tls).await?;
    let identity = VerificationClient::new(ch)
        .get_signing_identity(v1::GetVerificationMaterialRequest {
            environment: args.runner.environment.clone(),
            key_alias: args.runner.key.clone(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetSigningIdentity", s))?
        .into_inner();
    let mut session = start_session(cfg, &args.runner).await?;
    let opts = meshsign_client::codesign::CodesignOptions {
        alias: args.runner.key.clone(),
        input: args.input.clone(),
        output: args.output.clone(),
        entitlements: args.entitlements.clone(),
        runtime: args.runtime,
        timestamp_url: args.timestamp_url.clone().filter(|u| u != "none"),
    };
    let result = meshsign_client::codesign::codesign(session.signer.clone(), identity, opts).await;
    teardown(&mut session).await?;
    result?;
    println!(
        "{}: signed with {} ({})",
        args.output.as_ref().unwrap_or(&args.input).display(),
        args.runner.key,
        args.runner.environment
    );
    Ok(())
}

async fn sign_files(session: &mut Session, args: &SignArgs) -> Result<(), ClientError> {
    for file in &args.files {
        let digest = verify::sha256_file(file)?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let r = session.sign_digest(&args.runner.key, digest, &name).await?;
        // Check what the site returned before writing anything.
        verify::verify_signature(&r.algorithm, &r.public_key_der, &digest, &r.signature).map_err(
            |e| {
                ClientError::Crypto(format!(
                    "site returned a signature that does not verify: {e}"
                ))
            },
        )?;
        let signed_at = r
            .signed_at
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let bundle = SigBundle {
            artifact: name,
            digest_sha256: hex::encode(digest),
            signature: base64::engine::general_purpose::STANDARD.encode(&r.signature),
            key_id: r.key_id.clone(),
            algorithm: r.algorithm.clone(),
            public_key_pem: pem_encode("PUBLIC KEY", &r.public_key_der),
            audit_id: r.audit_id.clone(),
            audit_seq: r.audit_seq,
            audit_hash: r.audit_hash.clone(),
            region: session.enrollment.region.clone(),
            environment: session.enrollment.environment.clone(),
            signed_at,
            certificate_chain_pem: r
                .certificate_chain
                .iter()
                .map(|c| pem_encode("CERTIFICATE", c))
                .collect(),
        };
        let sig_path = sibling(file, ".sig");
        let json_path = sibling(file, ".sig.json");
        std::fs::write(&sig_path, &r.signature).map_err(ClientError::io(&sig_path))?;
        let json =
            serde_json::to_vec_pretty(&bundle).map_err(|e| ClientError::Crypto(e.to_string()))?;
        std::fs::write(&json_path, json).map_err(ClientError::io(&json_path))?;
        println!(
            "{}: signed with {} (audit {}) -> {}",
            file.display(),
            r.key_id,
            r.audit_id,
            sig_path.display()
        );
    }
    Ok(())
}
