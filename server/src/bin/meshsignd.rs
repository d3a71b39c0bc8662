//! `meshsignd`: the meshsign site daemon.
//!
//! - `meshsignd dev [--data-dir DIR]`: a complete dev site on loopback, created once, reused after.
//! - `meshsignd check --config FILE`: validate a site config and exit.
//! - `meshsignd serve --config FILE`: run a site.
//!
//! Exit codes: 0 stopped by SIGTERM/SIGINT; 1 refused to start, or a listener died (the
//! message names it). SIGHUP re-reads the configuration file, `[tls]` included; a signal that
//! arrives during a reload is not lost (the signal streams live for the whole process).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use meshsign_server::api::{self, SiteHandle};
use meshsign_server::clock::SystemClock;
use meshsign_server::config::{Listen, SiteConfig};
use meshsign_server::custody::Kek;
#[cfg(feature = "dev")]
use meshsign_server::dev;
use meshsign_server::state::SiteState;
use meshsign_server::state::marker::SiteMarker;

/// mimalloc: per-request buffers (h2 frames, prost messages, audit JSON) cost about half the
/// CPU they cost in glibc's allocator (BENCHMARKS.md, issue 27). Only Rust's allocations go
/// through it; a PKCS#11 module keeps its own. `main` starts the thread that hands its freed
/// memory back to the OS (see `meshsign_alloc`).
#[global_allocator]
static ALLOCATOR: meshsign_alloc::MiMalloc = meshsign_alloc::MiMalloc;

/// How often freed memory that is due is handed back (`meshsign_alloc::return_freed_memory`).
const MEMORY_RETURN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "meshsignd",
    version,
    about = "meshsign site: OIDC enrollment, runner CA, signing, audit"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a dev site on loopback (dev PKI, dev OIDC issuer, KEK: made once, then reused).
    #[cfg(feature = "dev")]
    Dev {
        /// Folder for everything dev mode makes.
        #[arg(long, default_value = "meshsign-dev")]
        data_dir: PathBuf,
        /// The site's region when the folder is first made (several dev sites with their own
        /// folders and regions make a fleet on one machine).
        #[arg(long, default_value = dev::REGION)]
        region: String,
        /// Enroll port (0 picks a free one).
        #[arg(long, default_value_t = 7441)]
        enroll_port: u16,
        /// Sign port (0 picks a free one).
        #[arg(long, default_value_t = 7443)]
        sign_port: u16,
        /// Admin port (0 picks a free one).
        #[arg(long, default_value_t = 7444)]
        admin_port: u16,
        /// Benchmarks only: answer before the audit entry is flushed to disk (`audit.flush =
        /// false`; acknowledged entries may be lost on a crash).
        #[arg(long, hide = true)]
        no_audit_flush: bool,
        /// Keep the dev site's state in this PostgreSQL database (`postgresql://USER@HOST:PORT/DB`)
        /// instead of sled: several `meshsignd dev` on one folder and database are replicas of
        /// one site (benchmarks, trying replicas out).
        #[arg(long)]
        postgres_url: Option<String>,
        /// With `--postgres-url`: TLS to the database, its certificate checked against this CA
        /// (PEM) and the url's host. Without it a dev site connects in clear.
        #[arg(long, requires = "postgres_url")]
        postgres_ca_file: Option<std::path::PathBuf>,
        /// A PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so): the dev site gets a key
        /// `hsm` (ECDSA P-256) in every environment, generated in that token (benchmarks,
        /// trying HSM custody out).
        #[arg(long, requires_all = ["pkcs11_token", "pkcs11_pin_file"])]
        pkcs11_module: Option<PathBuf>,
        /// The token's label (with --pkcs11-module).
        #[arg(long)]
        pkcs11_token: Option<String>,
        /// File holding the token's user PIN (with --pkcs11-module).
        #[arg(long)]
        pkcs11_pin_file: Option<PathBuf>,
    },
    /// Validate a site config (including JWKS files and the KEK file) without serving.
    Check {
        /// Site config (TOML).
        #[arg(long, env = "MESHSIGN_SITE_CONFIG")]
        config: PathBuf,
    },
    /// Inspect a stopped site's data folder: marker, store, journal, and what is intact. Exits 0
    /// when the site starts as it is, 1 when it does not. With --accept-loss-after SEQ, keep the
    /// audit log through SEQ and record the loss of what followed in the chain (never creates
    /// keys: a lost store is restored from a snapshot, not recovered).
    Recover {
        /// The site's data folder (`data_dir` of its config).
        #[arg(long)]
        data_dir: PathBuf,
        /// Restart the audit chain after this seq, recording the loss.
        #[arg(long)]
        accept_loss_after: Option<u64>,
        /// The site's KEK file: checked against the marker as a start does (without it, the
        /// report checks everything else).
        #[arg(long)]
        kek_file: Option<PathBuf>,
    },
    /// Restore a snapshot (`meshsign admin snapshot --out FILE`) into the empty data folder of
    /// a config; the KEK must be the site's. The audit chain continues after the snapshot.
    Restore {
        /// Site config (TOML) whose data_dir receives the site.
        #[arg(long, env = "MESHSIGN_SITE_CONFIG")]
        config: PathBuf,
        /// The snapshot file.
        snapshot: PathBuf,
    },
    /// Run a site.
    Serve {
        /// Site config (TOML).
        #[arg(long, env = "MESHSIGN_SITE_CONFIG")]
        config: PathBuf,
    },
    /// Print a shell completion script (`meshsignd completions bash > /etc/bash_completion.d/meshsignd`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (meshsignd.1 and one per subcommand) into DIR (default: here).
    Man {
        /// Where to write them.
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal, never into a log file or journald.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    // Before anything else maps memory (see `meshsign_alloc`); a failure is reported below,
    // once logging is up.
    let thp = meshsign_alloc::disable_huge_pages();
    let cli = Cli::parse();
    init_logs(cli.log_format);
    if let Err(e) = thp {
        // Not fatal: the site works, its resident memory counts whole huge pages.
        tracing::warn!(error = %e, "cannot turn transparent huge pages off");
    }
    if let Err(e) = meshsign_alloc::return_freed_memory(MEMORY_RETURN_EVERY) {
        // Not fatal: the site works, its resident memory stays at its high-water mark.
        tracing::warn!(error = %e, "cannot start the memory-return thread");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshsignd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshsignd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<(), String> {
    match command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshsignd",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => {
            use clap::CommandFactory as _;
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            eprintln!("man pages written to {}", dir.display());
            Ok(())
        }
        Command::Check { config } => {
            let cfg =
                SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
            let kek = Kek::load(&cfg.kek_file, cfg.dev).map_err(|e| e.to_string())?;
            // A site that exists: the KEK must be its KEK.
            match SiteMarker::read(&cfg.data_dir).map_err(|e| e.to_string())? {
                Some(m) => {
                    m.check_kek(&kek, &cfg.kek_file, &cfg.data_dir)
                        .map_err(|e| e.to_string())?;
                    println!("site {}: the KEK opens its check value", m.site_id);
                }
                None => println!(
                    "no site in {} yet (it is created at the first start)",
                    cfg.data_dir.display()
                ),
            }
            // Bindings that hold today but name an owner by a name someone else can take.
            for env in &cfg.environments {
                for t in &env.trust_policies {
                    for (name, id) in t.renamable_bindings() {
                        println!(
                            "warning: {}/{}: binds `{name}` (a name that can be renamed or \
                             re-registered) but not `{id}`: bind the id",
                            env.name, t.name
                        );
                    }
                    if t.allow_unbound {
                        println!(
                            "warning: {}/{}: allow_unbound = true: any job on {} that asks for \
                             this audience enrolls",
                            env.name, t.name, t.issuer
                        );
                    }
                }
            }
            println!(
                "{}: ok (region {}, environments: {})",
                config.display(),
                cfg.region,
                cfg.environments
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Recover {
            data_dir,
            accept_loss_after,
            kek_file,
        } => recover(&data_dir, accept_loss_after, kek_file.as_deref()),
        Command::Restore { config, snapshot } => restore(&config, &snapshot),
        Command::Serve { config } => {
            let cfg =
                SiteConfig::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
            let signals = Signals::watch()?;
            let handle = start(cfg).await?;
            serve_until_stopped(handle, signals, &config, None).await
        }
        #[cfg(feature = "dev")]
        Command::Dev {
            data_dir,
            region,
            enroll_port,
            sign_port,
            admin_port,
            no_audit_flush,
            postgres_url,
            postgres_ca_file,
            pkcs11_module,
            pkcs11_token,
            pkcs11_pin_file,
        } => {
            let site_toml = dev::prepare_region(&data_dir, &region).map_err(|e| e.to_string())?;
            let mut cfg = SiteConfig::load(&site_toml)
                .map_err(|e| format!("{}: {e}", site_toml.display()))?;
            let lo = std::net::Ipv4Addr::LOCALHOST;
            cfg.listen.enroll = (lo, enroll_port).into();
            cfg.listen.sign = (lo, sign_port).into();
            cfg.listen.admin = (lo, admin_port).into();
            if let Some(url) = postgres_url {
                cfg.postgres = Some(meshsign_server::config::PostgresStore {
                    url,
                    password_file: None,
                    pool_size: 8,
                    statement_timeout: std::time::Duration::from_secs(5),
                    allow_plaintext: postgres_ca_file.is_none(),
                    ca_file: postgres_ca_file,
                });
            }
            if let (Some(module), Some(token_label), Some(pin_file)) =
                (pkcs11_module, pkcs11_token, pkcs11_pin_file)
            {
                dev::add_hsm_key(&mut cfg, module, token_label, pin_file)
                    .map_err(|e| e.to_string())?;
            }
            if no_audit_flush {
                cfg.audit.flush = false;
                tracing::warn!(
                    "audit.flush = false: acknowledged audit entries may be lost on a crash (benchmarks only)"
                );
            }
            let listen = cfg.listen;
            let region = cfg.region.clone();
            let signals = Signals::watch()?;
            let handle = start(cfg).await?;
            let client = dev::write_client_toml(
                &data_dir,
                &region,
                handle.enroll_addr,
                handle.sign_addr,
                handle.admin_addr,
            )
            .map_err(|e| e.to_string())?;
            let client = std::fs::canonicalize(&client).unwrap_or(client);
            println!(
                "\nmeshsign DEV site is up on loopback (region {}, environments {}).\n\
                 DEV MODE: the KEK, dev PKI and dev OIDC issuer key are plain files in {} — never do this in production.\n\n\
                 Next, in a second terminal:\n  \
                 echo hello > hello.txt\n  \
                 cargo run --release --bin meshsign -- --config {c} sign --environment staging --key release hello.txt\n  \
                 cargo run --release --bin meshsign -- --config {c} verify hello.txt\n",
                region,
                dev::ENVIRONMENTS.join(", "),
                data_dir.display(),
                c = client.display(),
            );
            serve_until_stopped(handle, signals, &site_toml, Some(listen)).await
        }
    }
}

fn restore(config: &std::path::Path, snapshot: &std::path::Path) -> Result<(), String> {
    use meshsign_server::state::snapshot;
    use meshsign_server::store::Store;
    let cfg = SiteConfig::load(config).map_err(|e| format!("{}: {e}", config.display()))?;
    if cfg.postgres.is_some() {
        return Err(format!(
            "{}: this site's state is in PostgreSQL; restore the database with its own tools \
             (pg_restore), not a snapshot",
            config.display()
        ));
    }
    let kek = Kek::load(&cfg.kek_file, cfg.dev).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(snapshot).map_err(|e| format!("{}: {e}", snapshot.display()))?;
    let clock: meshsign_server::clock::SharedClock = Arc::new(SystemClock);
    let cache = cfg.store_cache_mib.saturating_mul(1 << 20);
    let r = snapshot::restore(&cfg.data_dir, &kek, &cfg.kek_file, &bytes, &clock, |dir| {
        Store::open_sled(dir, cache)
    })
    .map_err(|e| format!("{}: {e}", snapshot.display()))?;
    println!(
        "restored site {} into {}: {} records, audit log through seq {}, the restore recorded at seq {}",
        r.site_id,
        cfg.data_dir.display(),
        r.records,
        r.audit_seq,
        r.restore_seq
    );
    Ok(())
}

fn recover(
    data_dir: &std::path::Path,
    accept: Option<u64>,
    kek_file: Option<&std::path::Path>,
) -> Result<(), String> {
    use meshsign_server::state::recovery;
    use meshsign_server::store::{SledKv, Store};
    // Only read here: its mode is the start's to judge.
    let kek = kek_file
        .map(|f| Kek::load(f, true).map(|k| (k, f)))
        .transpose()
        .map_err(|e| e.to_string())?;
    let open = || Store::open_sled(data_dir, SledKv::DEFAULT_CACHE_BYTES);
    let (report, store) = recovery::inspect(data_dir, kek.as_ref().map(|(k, f)| (k, *f)), open)
        .map_err(|e| e.to_string())?;
    print!("{report}");
    match (accept, store) {
        (None, _) if report.intact() => Ok(()),
        (None, _) => Err("the site does not start on this folder as it is (see above)".into()),
        (Some(_), None) => Err("the store cannot be opened: nothing to recover into".into()),
        (Some(seq), Some(store)) => {
            let clock: meshsign_server::clock::SharedClock = Arc::new(SystemClock);
            let moved = recovery::accept_loss_after(&report, &store, seq, &clock)
                .map_err(|e| e.to_string())?;
            println!(
                "audit log kept through seq {seq}; the loss is recorded at seq {}{}",
                seq + 1,
                moved
                    .map(|p| format!("; the old journal is kept as {}", p.display()))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}

async fn start(mut cfg: SiteConfig) -> Result<SiteHandle, String> {
    meshsign_server::api::server::fit_descriptors(&mut cfg)?;
    if !cfg.dev {
        for e in cfg
            .environments
            .iter()
            .filter(|e| e.runners == meshsign_server::config::RunnerMode::Claimed)
        {
            tracing::warn!(
                environment = %e.name,
                "runners = \"claimed\": this environment takes each runner's word for its \
                 fingerprint; set runners = \"registered\" and register device keys \
                 (`meshsign admin runner register`)"
            );
        }
    }
    let data_dir = cfg.data_dir.clone();
    let state = tokio::task::spawn_blocking(move || SiteState::open(cfg, Arc::new(SystemClock)))
        .await
        .map_err(|e| match e.try_into_panic() {
            // sled panics on some damaged files after open; name the folder, not a task.
            Ok(panic) => format!(
                "the store in {} is damaged (the storage engine panicked: {}); nothing was \
                 changed. Restore a snapshot (`meshsignd restore`), or run `meshsignd recover \
                 --data-dir {}` to see what is intact",
                data_dir.display(),
                meshsign_server::store::panic_message(panic.as_ref()),
                data_dir.display()
            ),
            Err(e) => e.to_string(),
        })?
        .map_err(|e| e.to_string())?;
    api::start(Arc::new(state)).await.map_err(|e| e.to_string())
}

/// Serves until SIGINT/SIGTERM (then stops cleanly) or until a listener dies (then stops and
/// reports it, so the process exits non-zero). SIGHUP re-reads the config file: trust
/// policies, key access rules and `[tls]` change in place; a file that fails validation or
/// changes what needs a restart leaves the running configuration and logs why.
async fn serve_until_stopped(
    mut handle: SiteHandle,
    mut signals: Signals,
    path: &std::path::Path,
    listen: Option<Listen>,
) -> Result<(), String> {
    notify("READY=1\nSTATUS=serving");
    #[cfg(unix)]
    let outcome = loop {
        tokio::select! {
            died = handle.died() => break Err(died.to_string()),
            _ = signals.term.recv() => break Ok(()),
            _ = signals.int.recv() => break Ok(()),
            _ = signals.hup.recv() => {
                notify("RELOADING=1");
                reload(&handle, path, listen).await;
                notify("READY=1\nSTATUS=serving");
            }
        }
    };
    #[cfg(not(unix))]
    let outcome = {
        let _ = (&mut signals, path, listen);
        tokio::select! {
            died = handle.died() => Err(died.to_string()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    };
    notify("STOPPING=1");
    handle.shutdown().await;
    outcome
}

/// Tells the service manager (systemd `Type=notify`) about the daemon's state: `READY=1` once
/// every listener serves, `RELOADING=1` during a SIGHUP reload, `STOPPING=1` on the way out.
/// Without `$NOTIFY_SOCKET` (not started by systemd) it does nothing; a failure to send is
/// logged and otherwise ignored (the daemon serves either way).
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): `@name`.
            Some(name) => {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt as _;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                    socket.send_to_addr(state.as_bytes(), &addr)?;
                }
                #[cfg(not(target_os = "linux"))]
                let _ = name;
            }
            None => {
                socket.send_to(state.as_bytes(), std::path::Path::new(&path))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

async fn reload(handle: &SiteHandle, path: &std::path::Path, listen: Option<Listen>) {
    let mut cfg = match SiteConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, file = %path.display(), "reload refused: the running configuration stays");
            return;
        }
    };
    if let Some(l) = listen {
        cfg.listen = l;
    }
    match handle.reload(cfg).await {
        Ok(()) => tracing::info!(file = %path.display(), "configuration reloaded"),
        Err(e) => tracing::error!(error = %e, "reload refused: the running configuration stays"),
    }
}

/// The process's signal streams, made once before the site starts: a signal that arrives
/// before serving or during a reload waits in them instead of being lost (or, for SIGHUP,
/// killing the process with the default action).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn watch() -> Result<Self, String> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let watch = |k| signal(k).map_err(|e| format!("cannot watch signals: {e}"));
            Ok(Self {
                term: watch(SignalKind::terminate())?,
                int: watch(SignalKind::interrupt())?,
                hup: watch(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }
}
