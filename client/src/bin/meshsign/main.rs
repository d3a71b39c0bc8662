//! `meshsign`: the runner and verifier CLI.
//!
//! - `meshsign sign --environment E --key ALIAS FILE...`: enroll with the job's OIDC token, sign
//!   each file's SHA-256 at the site, write `FILE.sig` and `FILE.sig.json` (or a Sigstore
//!   bundle, or a DSSE statement: `--format`).
//! - `meshsign attest --environment E --key ALIAS FILE...`: an in-toto statement the site builds.
//! - `meshsign verify FILE`: offline verification (exit 1 on mismatch), with receipts and
//!   distrust lists.
//! - `meshsign verification-material --environment E --key ALIAS`: the key's public versions
//!   (`--audit-key`, `--distrust-list`: the site's audit key, the signed distrust list).
//! - `meshsign dev token --environment E`: a token from a dev site's issuer (dev builds).
//! - `meshsign admin …`: ops verbs on the admin port ([`admin`]).
//!
//! The bin only parses arguments, calls one use case of [`meshsign_client::usecase`] and
//! renders what comes back: [`runner`] (the runner verbs and verify), [`admin`] (what a site
//! answered an admin verb), [`render`] (tables, JSON, PEM). No function here is over 80 lines
//! and the bin stays under 1,500 (`.ci/layers` checks both).

/// `print!` for command output: when the reader has closed stdout (`meshsign … | head`)
/// the process ends quietly with exit 0 instead of panicking; another write error ends it with
/// exit 2 and a message.
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        $crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = write!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// `println!` with the handling of [`out_raw!`].
macro_rules! out {
    ($($t:tt)*) => { out_raw!("{}\n", format_args!($($t)*)) };
}

/// Whether the command printed anything on stdout: an error is then not added there as JSON
/// (a report that already went out — a fleet's rows — stays one JSON document).
static WROTE_STDOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

mod admin;
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
use meshsign_client::{ClientConfig, ClientError, usecase};

#[derive(Parser)]
#[command(
    name = "meshsign",
    version,
    about = "meshsign runner and verifier CLI",
    after_help = meshsign_client::error::exit::HELP
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
    Sign(usecase::sign::SignOptions),
    /// Apple code signature (Mach-O, .app, .dmg) made on this machine, signed by the site.
    #[cfg(feature = "codesign")]
    Codesign(usecase::codesign::CodesignArgs),
    /// Verify FILE against its signature bundle offline (native, Sigstore or DSSE), optionally
    /// its audit receipt and a distrust list; exit 1 on mismatch.
    Verify(usecase::verify::VerifyOptions),
    /// An App Store Connect API token for this job, minted by the site (the .p8 stays there).
    AscToken(usecase::asc::AscTokenOptions),
    /// Notarize an archive with Apple's Notary API, with tokens the site mints (no .p8 here).
    Notarize(usecase::notarize::NotarizeOptions),
    /// Enroll and have the site sign an in-toto statement about files (DSSE), whose predicate
    /// it builds from what it verified about this job.
    Attest(usecase::attest::AttestOptions),
    /// Print every version of a key's public key as PEM; or the site's audit key; or an
    /// environment's signed distrust list.
    VerificationMaterial(usecase::material::MaterialArgs),
    /// Dev-site helpers.
    #[cfg(feature = "dev")]
    Dev {
        #[command(subcommand)]
        command: usecase::dev::DevCommand,
    },
    /// Enroll once and run COMMAND with a job agent: every `meshsign sign`/`codesign` inside
    /// it uses that one enrollment; the certificate is revoked when COMMAND exits, and
    /// meshsign exits with COMMAND's status.
    Exec {
        #[command(flatten)]
        session: meshsign_client::session::job::JobOptions,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A job agent for CI systems whose steps are separate processes.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Print this runner's fingerprint and where it came from (its device key, if it has one).
    Fingerprint,
    /// This runner instance's device key.
    Runner {
        #[command(subcommand)]
        command: RunnerCommand,
    },
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
    /// $HOME), the environment and (macOS) the keychains; prints path, line, kind and a
    /// finding fingerprint, never the secret; exit 1 on a finding.
    Preflight(usecase::preflight::PreflightArgs),
    /// Sigstore bundles' inclusion proofs.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
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
        command: usecase::admin::AdminCommand,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enroll and serve in the background; prints MESHSIGN_AGENT_SOCK=… (and the environment
    /// and region) for the job's later steps (`>> $GITHUB_ENV`, or `export` them).
    Start {
        #[command(flatten)]
        session: meshsign_client::session::job::JobOptions,
    },
    /// Revoke the agent's certificate and stop it (uses MESHSIGN_AGENT_SOCK).
    Stop,
    /// What `start` runs in the background.
    #[command(hide = true)]
    Serve {
        #[command(flatten)]
        session: meshsign_client::session::job::JobOptions,
    },
}

#[derive(Subcommand)]
enum RunnerCommand {
    /// Make a device key (never leaves its TPM or token) and print its signed registration
    /// request (also written to DIR/registration.json) for `meshsign admin runner register`.
    Init(usecase::device::InitArgs),
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Add the inclusion proof to each FILE's Sigstore bundle (FILE.sigstore.json, or the
    /// bundle itself) that has only its signed entry timestamp, checked against the site's
    /// audit key: the bundle becomes v0.3. Bundles that have their proof are left alone.
    Fetch {
        /// Signed files or their bundles.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit export's chain and checkpoint signatures; names the first bad seq.
    Verify(usecase::verify::AuditVerifyArgs),
    /// Check that the later of two checkpoints (C2SP notes of the site's audit or transparency
    /// log) extends the earlier one: nothing logged was rewritten or removed. Exit 1 if not.
    Consistency(usecase::verify::ConsistencyArgs),
}

/// As in meshsignd: an export costs ~17 % less CPU than through glibc's (`meshsign_alloc`).
#[global_allocator]
static ALLOCATOR: meshsign_alloc::MiMalloc = meshsign_alloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let built = builder.worker_threads(2).enable_all().build();
    let Ok(rt) = built.inspect_err(|e| eprintln!("meshsign: cannot start the runtime: {e}")) else {
        return ExitCode::FAILURE;
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
                out!("{}", e.json());
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn load_config(global: &Global) -> Result<ClientConfig, ClientError> {
    ClientConfig::load_with(
        global.config.as_deref(),
        (global.connect_timeout, global.timeout),
    )
}

/// Runs the command: one use case, then its rendering.
async fn dispatch(cli: Cli) -> Result<(), ClientError> {
    let (global, format) = (&cli.global, cli.global.output);
    match cli.command {
        Command::Preflight(args) => {
            usecase::device::warn_if_missing(global.config.as_deref());
            let (findings, errors) = usecase::preflight::run(&args)?;
            let format = if args.json {
                render::Format::Json
            } else {
                format
            };
            render::preflight(&findings, &errors, format)
        }
        Command::Exec { session, command } => {
            match usecase::agent::exec(&load_config(global)?, &session, &command).await? {
                0 => Ok(()),
                code => Err(ClientError::ChildExit(code)),
            }
        }
        Command::Agent { command } => match command {
            AgentCommand::Start { .. } => runner::agent_start().await,
            AgentCommand::Serve { session } => {
                runner::agent_serve(&load_config(global)?, session).await
            }
            AgentCommand::Stop => runner::agent_stop().await,
        },
        Command::Completions { shell } => completions(shell),
        Command::Man { dir, out_dir } => man(dir.or(out_dir).unwrap_or_else(|| ".".into())),
        Command::Fingerprint => runner::fingerprint(global.config.as_deref(), format),
        Command::Runner {
            command: RunnerCommand::Init(args),
        } => usecase::device::init(&args).map(|v| render::print_json(&v)),
        Command::Audit {
            command: AuditCommand::Verify(args),
        } => runner::audit_verify(&args, format),
        Command::Audit {
            command: AuditCommand::Consistency(args),
        } => runner::consistency(&load_config(global)?, args, format).await,
        Command::Verify(args) => runner::verify(args, format),
        Command::Receipt {
            command: ReceiptCommand::Fetch { files },
        } => runner::fetch_proofs(&load_config(global)?, &files, format).await,
        Command::Attest(args) => runner::attest(&load_config(global)?, args, format).await,
        Command::AscToken(o) => runner::asc_token(&load_config(global)?, &o).await,
        Command::Notarize(o) => runner::notarize(&load_config(global)?, &o, format).await,
        Command::VerificationMaterial(args) => material(global, &args, format).await,
        #[cfg(feature = "dev")]
        Command::Dev { command } => {
            out!(
                "{}",
                usecase::dev::run(&load_config(global)?, command)?.as_str()
            );
            Ok(())
        }
        Command::Sign(args) => runner::sign(&load_config(global)?, args, format).await,
        #[cfg(feature = "codesign")]
        Command::Codesign(args) => runner::codesign(&load_config(global)?, args, format).await,
        Command::Admin {
            all_sites: true,
            command,
        } => {
            let fleet = load_fleet(global)?;
            let out = usecase::admin::run_fleet(&fleet, command).await?;
            admin::render_fleet(&fleet, out, format)
        }
        Command::Admin {
            all_sites: false,
            command,
        } => {
            admin::render(
                usecase::admin::run(&load_config(global)?, command).await?,
                format,
            )
            .await
        }
    }
}

/// `meshsign verification-material`: at one site, or (`--trusted-root --fleet`) one trusted
/// root of every site's log.
async fn material(
    global: &Global,
    args: &usecase::material::MaterialArgs,
    format: render::Format,
) -> Result<(), ClientError> {
    let m = if args.fleet {
        let root = usecase::material::fleet_trusted_root(&load_fleet(global)?, args).await?;
        usecase::material::Material::TrustedRoot(root)
    } else {
        usecase::material::fetch(&load_config(global)?, args).await?
    };
    render::material(&m, format);
    Ok(())
}

/// The fleet of `--all-sites`: every site named in the config's `[sites]`.
fn load_fleet(global: &Global) -> Result<usecase::fleet::Fleet, ClientError> {
    let timeouts = (global.connect_timeout, global.timeout);
    usecase::fleet::Fleet::load_with(global.config.as_deref(), timeouts)
}

/// `meshsign completions SHELL`. Made in memory first: clap_complete panics on a write error
/// (a closed pipe), and no input may make meshsign panic.
fn completions(shell: clap_complete::Shell) -> Result<(), ClientError> {
    use clap::CommandFactory as _;
    use std::io::Write as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "meshsign", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ClientError::io(std::path::Path::new("(stdout)"))(e))
        }
        _ => Ok(()),
    }
}

/// `meshsign man DIR`: meshsign.1 and one page per subcommand.
fn man(out_dir: PathBuf) -> Result<(), ClientError> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(&out_dir).map_err(ClientError::io(&out_dir))?;
    clap_mangen::generate_to(Cli::command(), &out_dir).map_err(ClientError::io(&out_dir))?;
    eprintln!("man pages written to {}", out_dir.display());
    Ok(())
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
        super::Cli::command().debug_assert(); // every subcommand's ids unique (asc-token --ttl)
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "meshsign", &mut missing);
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
    }

    /// Every subcommand parses with the global flags (an id shared by a global flag and a
    /// subcommand's argument is a runtime panic in clap, found in CI for `codesign … OUT`).
    #[test]
    fn global_flags_parse_with_every_subcommand() {
        use clap::Parser as _;
        for line in [
            "meshsign --output json fingerprint",
            "meshsign codesign --environment e --key k in out",
            "meshsign codesign --environment e --key k in out --output json",
            "meshsign sign --environment e --key k f --output json",
            "meshsign admin --all-sites status --output json",
        ] {
            let args = line.split_whitespace();
            let cli = super::Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
            let _ = cli.global.output;
        }
    }
}
