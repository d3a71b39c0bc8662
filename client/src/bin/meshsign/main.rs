//! `meshsign`: the runner and verifier CLI.
//!
//! - `meshsign sign --environment E --key ALIAS FILE...`: enroll with the job's OIDC token, sign
//!   each file's SHA-256 at the site, write `FILE.sig` and `FILE.sig.json` (or a Sigstore
//!   bundle, or a DSSE statement: `--format`).
//! - `meshsign attest --environment E --key ALIAS FILE...`: an in-toto statement the site builds.
//! - `meshsign verify FILE`: offline verification (exit 1 on mismatch), with receipts and
//!   distrust lists ([`check`]).
//! - `meshsign verification-material --environment E --key ALIAS`: the key's public versions
//!   (`--audit-key`, `--distrust-list`: the site's audit key, the signed distrust list).
//! - `meshsign dev token --environment E`: a token from a dev site's issuer (dev builds).
//! - `meshsign admin …`: ops verbs on the admin port ([`admin`]).
//!
//! One module per command group: [`runner`] (sign, codesign, attest), [`check`] (verify),
//! [`admin`], [`dev`]; audit verify and verification-material are here.

/// `println!` for command output: when the reader has closed stdout (`meshsign … | head`)
/// the process ends quietly with exit 0 instead of panicking; another write error ends it with
/// exit 2 and a message.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        $crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// Whether the command printed anything on stdout: an error is then not added there as JSON
/// (a report that already went out — a fleet's rows — stays one JSON document).
static WROTE_STDOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `print!` (no newline added) with the same handling as [`out!`].
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        $crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = write!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

mod admin;
mod dev;
mod render;
mod runner;

/// Ends the process after a failed write to stdout (see [`out!`]).
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("meshsign: writing to stdout: {e}");
    std::process::exit(i32::from(meshsign_client::error::exit::USAGE));
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshsign_client::{ClientConfig, ClientError};
use meshsign_evidence::pem_encode;
use meshsign_evidence::verify;

#[derive(Parser)]
#[command(
    name = "meshsign",
    version,
    about = "meshsign runner and verifier CLI",
    after_help = "Exit codes: 0 ok; 1 verification failed; 2 usage (flags, config, input files); \
                  3 refused by the site's policy; 4 site or token source unavailable, or no answer \
                  within the timeout (retry may help; a budget refusal is 3: retrying never \
                  helps); 5 proposed: the change needs a second admin's approval (meshsign \
                  admin review approve ID), then the same command again; 6 local fault (a file \
                  that is there cannot be read or written, TLS or key setup failed)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options of every command.
#[derive(clap::Args)]
struct Global {
    /// Client config (client.toml).
    #[arg(long, env = "MESHSIGN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Seconds to wait for a connection and TLS handshake (default: the config's, else 10).
    #[arg(long, env = "MESHSIGN_CONNECT_TIMEOUT", global = true)]
    connect_timeout: Option<u64>,
    /// Seconds to wait for each RPC (default: the config's, else 60).
    #[arg(long, env = "MESHSIGN_TIMEOUT", global = true)]
    timeout: Option<u64>,
    /// How commands that print data print it: `table` (a header, then tab-separated rows)
    /// or `json`.
    // Its own id: `codesign` has a positional `output` (the signed file).
    #[arg(
        id = "output_format",
        long = "output",
        env = "MESHSIGN_OUTPUT",
        global = true,
        value_enum,
        default_value_t
    )]
    output: render::Format,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll with the job's OIDC token and sign files with a site key.
    Sign(runner::SignArgs),
    /// Apple code signature (Mach-O, .app, .dmg) made on this machine, signed by the site.
    #[cfg(feature = "codesign")]
    Codesign(runner::CodesignArgs),
    /// Verify FILE against its signature bundle offline (native, Sigstore or DSSE), optionally
    /// its audit receipt and a distrust list; exit 1 on mismatch.
    Verify(runner::VerifyArgs),
    /// Enroll and have the site sign an in-toto statement about files (DSSE), whose predicate
    /// it builds from what it verified about this job.
    Attest(runner::AttestArgs),
    /// Print every version of a key's public key as PEM; or the site's audit key; or an
    /// environment's signed distrust list.
    VerificationMaterial {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// Key alias.
        #[arg(long, required_unless_present_any = ["audit_key", "distrust_list"])]
        key: Option<String>,
        /// Print the site's audit public key (PEM), which signs checkpoints and distrust lists.
        #[arg(long, conflicts_with = "distrust_list")]
        audit_key: bool,
        /// Print the environment's distrust list (a DSSE envelope signed by the audit key, as
        /// `verify --distrust-list` reads it).
        #[arg(long)]
        distrust_list: bool,
    },
    /// Dev-site helpers.
    #[cfg(feature = "dev")]
    Dev {
        #[command(subcommand)]
        command: dev::DevCommand,
    },
    /// Enroll once and run COMMAND with a job agent: every `meshsign sign`/`codesign` inside
    /// it uses that one enrollment; the certificate is revoked when COMMAND exits, and
    /// meshsign exits with COMMAND's status.
    Exec {
        #[command(flatten)]
        session: runner::SessionArgs,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A job agent for CI systems whose steps are separate processes.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Print this machine's runner fingerprint and where it came from.
    Fingerprint,
    /// Print a shell completion script (`meshsign completions bash > /etc/bash_completion.d/meshsign`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (meshsign.1 and one per subcommand) into DIR.
    Man {
        /// Where to write them (default: the current folder).
        #[arg(value_name = "DIR", conflicts_with = "out_dir")]
        dir: Option<PathBuf>,
        /// The same as DIR.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Fail a runner's registration if long-lived secrets sit on it: scans PATHS (default:
    /// $HOME) and the environment; prints path, line and kind, never the secret; exit 1 on a
    /// finding.
    Preflight {
        /// Files or folders to scan.
        paths: Vec<PathBuf>,
        /// Print the findings as JSON (the same as --output json).
        #[arg(long)]
        json: bool,
        /// Do not scan the environment.
        #[arg(long)]
        no_env: bool,
    },
    /// Offline audit checks.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Ops verbs on the admin port (needs `[admin]` in the client config).
    Admin {
        /// Run at every site named in the config's `[sites]` table at once (drill, revoke,
        /// trust disable|enable, status); one row per site; fails if any site fails.
        #[arg(long)]
        all_sites: bool,
        #[command(subcommand)]
        command: meshsign_client::usecase::admin::AdminCommand,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enroll and serve in the background; prints MESHSIGN_AGENT_SOCK=… (and the environment
    /// and region) for the job's later steps (`>> $GITHUB_ENV`, or `export` them).
    Start {
        #[command(flatten)]
        session: runner::SessionArgs,
    },
    /// Revoke the agent's certificate and stop it (uses MESHSIGN_AGENT_SOCK).
    Stop,
    /// What `start` runs in the background.
    #[command(hide = true)]
    Serve {
        #[command(flatten)]
        session: runner::SessionArgs,
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
        /// Accept a log that starts mid-chain at a signed checkpoint (a log retained after
        /// pruning, or an export `--since` a checkpoint). Without it the log must start at seq 1.
        #[arg(long)]
        from_checkpoint: bool,
    },
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
    let json = cli.global.output == render::Format::Json;
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `meshsign exec` passes its command's status on, saying nothing of its own.
        Err(ClientError::ChildExit(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("meshsign: {e}");
            if json && !WROTE_STDOUT.load(std::sync::atomic::Ordering::Relaxed) {
                // A script that asked for JSON gets its error as JSON too, on stdout (unless
                // the command already printed its report there).
                out!("{}", error_json(&e));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// `{"error": {"message", "exit_code", "kind", "reason"}}` for `--output json`.
fn error_json(e: &ClientError) -> serde_json::Value {
    let (kind, reason) = match e {
        ClientError::Usage(_) => ("usage", String::new()),
        ClientError::ChildExit(_) => ("child_exit", String::new()),
        ClientError::Config(_) => ("config", String::new()),
        ClientError::Io { .. } => ("io", String::new()),
        ClientError::Connect { .. } => ("connect", String::new()),
        ClientError::Rpc { reason, .. } => ("refused", reason.clone()),
        ClientError::Token(_) => ("token", String::new()),
        ClientError::Crypto(_) => ("local_fault", String::new()),
        ClientError::Verify(_) => ("verify", String::new()),
    };
    serde_json::json!({
        "error": {
            "message": e.to_string(),
            "exit_code": e.exit_code(),
            "kind": kind,
            "reason": reason,
        }
    })
}

fn load_config(global: &Global) -> Result<ClientConfig, ClientError> {
    let p = global
        .config
        .as_ref()
        .ok_or_else(|| ClientError::Usage("give --config FILE or set MESHSIGN_CONFIG".into()))?;
    let mut cfg = ClientConfig::load(p)?;
    apply_timeouts(global, &mut cfg);
    Ok(cfg)
}

/// `--connect-timeout` and `--timeout` over the config's.
fn apply_timeouts(global: &Global, cfg: &mut ClientConfig) {
    if let Some(s) = global.connect_timeout {
        cfg.connect_timeout_seconds = Some(s);
    }
    if let Some(s) = global.timeout {
        cfg.rpc_timeout_seconds = Some(s);
    }
}

async fn dispatch(cli: Cli) -> Result<(), ClientError> {
    match cli.command {
        Command::Preflight {
            paths,
            json,
            no_env,
        } => {
            let paths = if paths.is_empty() {
                vec![PathBuf::from(std::env::var("HOME").map_err(|_| {
                    ClientError::Usage("no PATHS given and $HOME is not set".into())
                })?)]
            } else {
                paths
            };
            let env: Vec<(String, String)> = std::env::vars().collect();
            let (findings, errors) = meshsign_client::usecase::preflight::scan(
                &paths,
                (!no_env).then_some(env.as_slice()),
            );
            for e in &errors {
                eprintln!("preflight: cannot read {e}");
            }
            if json || cli.global.output == render::Format::Json {
                let text = serde_json::to_string_pretty(&findings)
                    .map_err(|e| ClientError::Crypto(e.to_string()))?;
                out!("{text}");
            } else {
                for f in &findings {
                    out!("{}:{}: {}", f.path, f.line, f.kind);
                }
            }
            if findings.is_empty() {
                eprintln!("preflight: no long-lived secret found");
                Ok(())
            } else {
                Err(ClientError::Verify(format!(
                    "preflight: {} long-lived secret(s) on this runner (see above)",
                    findings.len()
                )))
            }
        }
        Command::Exec { session, command } => {
            let code = runner::exec(&load_config(&cli.global)?, session, command).await?;
            if code != 0 {
                return Err(ClientError::ChildExit(code));
            }
            Ok(())
        }
        Command::Agent {
            command: AgentCommand::Start { .. },
        } => runner::agent_start().await,
        Command::Agent {
            command: AgentCommand::Serve { session },
        } => runner::agent_serve(&load_config(&cli.global)?, session).await,
        Command::Agent {
            command: AgentCommand::Stop,
        } => runner::agent_stop().await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            // Into memory first: clap_complete panics on a write error (a closed pipe), and no
            // input may make meshsign panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshsign", &mut script);
            use std::io::Write as _;
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(ClientError::io(std::path::Path::new("(stdout)"))(e))
                }
                _ => Ok(()),
            }
        }
        Command::Man { dir, out_dir } => {
            let out_dir = dir.or(out_dir).unwrap_or_else(|| PathBuf::from("."));
            use clap::CommandFactory as _;
            std::fs::create_dir_all(&out_dir).map_err(ClientError::io(&out_dir))?;
            clap_mangen::generate_to(Cli::command(), &out_dir)
                .map_err(ClientError::io(&out_dir))?;
            eprintln!("man pages written to {}", out_dir.display());
            Ok(())
        }
        Command::Fingerprint => {
            let (fp, source) = meshsign_client::session::fingerprint();
            if cli.global.output == render::Format::Json {
                out!(
                    "{}",
                    serde_json::json!({ "fingerprint": fp, "source": source.to_string() })
                );
            } else {
                out!("{fp}");
                eprintln!("source: {source}");
            }
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    audit_key,
                    from_checkpoint,
                },
        } => {
            let text = std::fs::read_to_string(&file).map_err(ClientError::io(&file))?;
            let lines =
                meshsign_evidence::audit::parse_export(&text).map_err(ClientError::Verify)?;
            let pem = std::fs::read_to_string(&audit_key).map_err(ClientError::io(&audit_key))?;
            let key = verify::audit_key_from_pem(&pem)?;
            use meshsign_evidence::audit::Start;
            let start = if from_checkpoint {
                Start::GenesisOrCheckpoint
            } else {
                Start::Genesis
            };
            let r = meshsign_evidence::audit::verify_export_from(&lines, &key, start)
                .map_err(|e| ClientError::Verify(e.to_string()))?;
            if cli.global.output == render::Format::Json {
                out!(
                    "{}",
                    serde_json::json!({
                        "file": file.display().to_string(), "ok": true,
                        "first_seq": r.first_seq, "last_seq": r.last_seq, "entries": r.entries,
                        "omitted": r.omitted, "checkpoints": r.checkpoints,
                        "after_last_checkpoint": r.unanchored,
                    })
                );
            } else {
                out!(
                    "{}: OK — seq {}..{}: {} entries, {} omitted, {} signed checkpoints, {} after the last checkpoint",
                    file.display(),
                    r.first_seq,
                    r.last_seq,
                    r.entries,
                    r.omitted,
                    r.checkpoints,
                    r.unanchored
                );
            }
            Ok(())
        }
        Command::Verify(args) => runner::verify(args, cli.global.output),
        Command::Attest(args) => {
            runner::attest(&load_config(&cli.global)?, args, cli.global.output).await
        }
        Command::VerificationMaterial {
            environment,
            key,
            audit_key,
            distrust_list,
        } => {
            let cfg = load_config(&cli.global)?;
            let mut v = meshsign_client::site::verification::client(&cfg).await?;
            let resp = meshsign_client::site::verification::material(
                &mut v,
                &environment,
                key.as_deref().unwrap_or_default(),
            )
            .await;
            if audit_key || distrust_list {
                // Every answer names the audit key (without --key, only the audit key).
                let spki = resp?.audit_public_key_der;
                if distrust_list {
                    let (list, envelope) = meshsign_client::site::verification::distrust_list(
                        &mut v,
                        &environment,
                        &spki,
                    )
                    .await?;
                    eprintln!(
                        "distrust list of `{}` at `{}`: version {}, {} rule(s)",
                        list.environment,
                        list.region,
                        list.version,
                        list.entries.len()
                    );
                    out!("{}", String::from_utf8_lossy(&envelope));
                } else {
                    out_raw!("{}", pem_encode("PUBLIC KEY", &spki));
                }
                return Ok(());
            }
            let resp = resp?;
            if cli.global.output == render::Format::Json {
                let keys: Vec<serde_json::Value> = resp
                    .keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "key_id": k.key_id, "algorithm": k.algorithm, "active": k.active,
                            "public_key_pem": pem_encode("PUBLIC KEY", &k.public_key_der),
                        })
                    })
                    .collect();
                out!("{}", serde_json::Value::Array(keys));
                return Ok(());
            }
            for k in resp.keys {
                out!(
                    "# {} {}{}",
                    k.key_id,
                    k.algorithm,
                    if k.active { " (active)" } else { "" }
                );
                out_raw!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
            }
            Ok(())
        }
        #[cfg(feature = "dev")]
        Command::Dev { command } => dev::dispatch(&load_config(&cli.global)?, command),
        Command::Sign(args) => {
            runner::sign(&load_config(&cli.global)?, args, cli.global.output).await
        }
        #[cfg(feature = "codesign")]
        Command::Codesign(args) => {
            runner::codesign(&load_config(&cli.global)?, args, cli.global.output).await
        }
        Command::Admin {
            all_sites: true,
            command,
        } => {
            let path = cli.global.config.as_deref().ok_or_else(|| {
                ClientError::Config("--all-sites needs --config (a file with [sites])".into())
            })?;
            let mut fleet = meshsign_client::usecase::fleet::Fleet::load(path)?;
            for (_, cfg) in &mut fleet.sites {
                apply_timeouts(&cli.global, cfg);
            }
            let out = meshsign_client::usecase::admin::run_fleet(&fleet, command).await?;
            admin::render_fleet(&fleet, out, cli.global.output)
        }
        Command::Admin {
            all_sites: false,
            command,
        } => {
            let out =
                meshsign_client::usecase::admin::run(&load_config(&cli.global)?, command).await?;
            admin::render(out, cli.global.output).await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every flag and argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "meshsign", &mut missing);
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
    }

    /// Every subcommand parses with the global flags (an id shared by a global flag and a
    /// subcommand's argument is a runtime panic in clap, found in CI for `codesign … OUT`).
    #[test]
    fn global_flags_parse_with_every_subcommand() {
        use clap::Parser as _;
        for args in [
            &["meshsign", "--output", "json", "fingerprint"][..],
            &[
                "meshsign",
                "codesign",
                "--environment",
                "e",
                "--key",
                "k",
                "in",
                "out",
            ],
            &[
                "meshsign",
                "codesign",
                "--environment",
                "e",
                "--key",
                "k",
                "in",
                "out",
                "--output",
                "json",
            ],
            &[
                "meshsign",
                "sign",
                "--environment",
                "e",
                "--key",
                "k",
                "f",
                "--output",
                "json",
            ],
            &[
                "meshsign",
                "admin",
                "--all-sites",
                "status",
                "--output",
                "json",
            ],
        ] {
            let cli = super::Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let _ = cli.global.output;
        }
    }
}
