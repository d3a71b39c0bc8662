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
    /// Verify FILE against FILE.sig.json offline; exit 1 on mismatch.
    Verify {
        /// The file.
        file: PathBuf,
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

#[derive(Args)]
struct SignArgs {
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
        Command::Verify {
            file,
            bundle,
            public_key,
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
    }
}

fn github_job(environment: &str, j: &JobArgs) -> GithubJob {
    let mut job = GithubJob::new(environment);
    job.repository = j.repository.clone();
    job.git_ref = j.git_ref.clone();
    job.run_id = j.job_id.clone();
    job
}

async fn sign(cfg: &ClientConfig, args: SignArgs) -> Result<(), ClientError> {
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
    let mut session = Session::start(cfg, &params).await?;
    eprintln!(
        "enrolled as {} (serial {}, {} s)",
        session.enrollment.spiffe_id,
        session.enrollment.serial,
        session.enrollment.granted_ttl_seconds
    );
    for file in &args.files {
        let digest = verify::sha256_file(file)?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let r = session.sign_digest(&args.key, digest, &name).await?;
        // Check what the site returned before writing anything.
        verify::verify_digest(&r.public_key_der, &digest, &r.signature).map_err(|e| {
            ClientError::Crypto(format!(
                "site returned a signature that does not verify: {e}"
            ))
        })?;
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
