//! `meshsign-bench`: starts the real `meshsignd dev` in its own process on loopback and drives
//! it over mutual TLS from N concurrent connections (one enrolled runner each), with the client
//! library the CLI uses. In the same run it measures the same signing code in-process (the
//! limit) and, with `--vs-openbao`, OpenBao's transit engine (the peer), so figures are ratios
//! measured side by side (this machine is shared and noisy). Server CPU seconds per 1,000 ops
//! and peak RSS are read from `/proc/<pid>`; the load generator's own CPU is reported too.
//!
//! ```text
//! cargo build --release -p meshsign-server -p meshsign-bench
//! ./target/release/meshsign-bench --scenario sign --concurrency 64 --duration 5 --runs 3 --vs-openbao
//! ./target/release/meshsign-bench --scenario sign --concurrency 64 --compare-durability --runs 3
//! ./target/release/meshsign-bench --scenario batch --key-backend pkcs11 --runs 3
//! ./target/release/meshsign-bench --scenario receipt --concurrency 64 --runs 3
//! ./target/release/meshsign-bench --scenario soak --concurrency 8 --duration 300
//! ./target/release/meshsign-bench --scenario scale --entries 1000000 --certs 100000 --runs 3
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

mod daemon;
mod load;
mod openbao;
mod scale;

use daemon::Daemon;
use load::{SignLoad, Tokens, Window};
use meshsign_server::custody::{EcdsaP256, SigningBackend};

#[derive(Parser)]
#[command(
    name = "meshsign-bench",
    about = "meshsign throughput and latency over real mTLS"
)]
struct Cli {
    /// What to drive.
    #[arg(long, value_enum, default_value_t = Scenario::Sign)]
    scenario: Scenario,
    /// Concurrent connections (one enrolled runner each).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Digests per SignBatch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Skip the audit flush (benchmark only: acknowledged entries may be lost on a crash).
    #[arg(long)]
    no_durable_audit: bool,
    /// Measure durable and non-durable audit in the same run, alternating.
    #[arg(long)]
    compare_durability: bool,
    /// `--scenario sign`: ask for each signature's signed entry timestamp (SET), as a client
    /// writing Sigstore bundles does (`meshsign sign --format sigstore`); without it the
    /// Sign is what `meshsign sign` asks for its native signature files.
    #[arg(long)]
    sign_set: bool,
    /// Skip the in-process baseline (e.g. to profile only the service).
    #[arg(long)]
    no_in_process: bool,
    /// Also drive OpenBao's transit engine (`bao server -dev` on 127.0.0.1) in the same run.
    #[arg(long)]
    vs_openbao: bool,
    /// With `--vs-openbao`: also drive a second OpenBao shaped as a site is (TLS listener, a
    /// file audit device) in the same runs; adds the `openbao_tls_audit_*` figures.
    #[arg(long, requires = "vs_openbao")]
    openbao_tls_audit: bool,
    /// `--scenario enroll`: also enroll with device-key proofs (issue 28) on a second site
    /// whose production environment accepts registered runners only (one file device key per
    /// connection, registered first), in the same run; prints `proven_to_claimed`.
    #[arg(long)]
    device_proofs: bool,
    /// The site binary (default: `meshsignd` next to this one).
    #[arg(long)]
    meshsignd: Option<PathBuf>,
    /// The site's log level (its log goes to a file, as a deployment's would).
    #[arg(long, default_value = "info")]
    site_log: String,
    /// `postgres`: also run the site on PostgreSQL (the bench starts its own cluster on
    /// loopback), with one replica and with two, next to the sled site in the same run.
    #[arg(long, value_enum, default_value_t = Store::Sled)]
    store: Store,
    /// `--scenario scale`: audit entries in the loaded site.
    #[arg(long, default_value_t = 100_000)]
    entries: u64,
    /// `--scenario scale`: certificate records in the loaded site.
    #[arg(long, default_value_t = 10_000)]
    certs: u64,
    /// `--scenario scale`: the small site's entries (default 10⁴), the base of
    /// `rss_ratio_to_small`.
    #[arg(long)]
    small_entries: Option<u64>,
    /// `--scenario scale`: the small site's certificates (default: 10³ or fewer); give it
    /// `--certs` to compare log sizes alone.
    #[arg(long)]
    small_certs: Option<u64>,
    /// `--scenario scale`: entries each site exports per turn of the side-by-side export
    /// (`export_ratio_to_small`): the small log's first entries, as many times as make this.
    #[arg(long, default_value_t = 200_000)]
    export_turn: u64,
    /// `--scenario soak`: seconds per window (an RSS sample after each).
    #[arg(long, default_value_t = 30)]
    sample: u64,
    /// `--scenario soak`: the site's `[store] cache_mib` (sled's page cache; default: the
    /// config's default).
    #[arg(long)]
    store_cache_mib: Option<u64>,
    /// `pkcs11`: also sign with a key in a SoftHSM2 token (the bench makes one in a temp dir),
    /// next to the software key in the same run, and the token in-process through cryptoki.
    #[arg(long, value_enum, default_value_t = KeyBackend::Software)]
    key_backend: KeyBackend,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum KeyBackend {
    /// The site's software keys only.
    Software,
    /// The software key and a SoftHSM2 key, side by side.
    Pkcs11,
}

/// Environment variable naming the bench's SoftHSM2 folder (set for the re-executed bench).
pub const SOFTHSM_DIR: &str = "MESHSIGN_BENCH_SOFTHSM_DIR";
/// The SoftHSM2 module (Debian's path).
pub const SOFTHSM_MODULE: &str = meshsign_certs_dev::softhsm::MODULE;
/// The bench token's label.
pub const SOFTHSM_LABEL: &str = "meshsign-bench";

/// Makes a SoftHSM2 token in a temp dir and runs this bench again with `SOFTHSM2_CONF`
/// pointing at it (SoftHSM2 reads it when first initialised in a process; setting the
/// environment of a running process needs `unsafe`, which this workspace forbids).
fn reexec_with_softhsm() -> Result<std::process::ExitStatus, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let conf =
        meshsign_certs_dev::softhsm::token(dir.path(), SOFTHSM_LABEL).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env(SOFTHSM_DIR, dir.path())
        .status()
        .map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum Store {
    /// The embedded default.
    Sled,
    /// sled, PostgreSQL with one replica, PostgreSQL with two replicas, side by side.
    Postgres,
}

/// Files per SignBatch call in `--scenario receipt`'s batched window (the issue's 100 files).
const FILES_PER_CALL: usize = 100;

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Scenario {
    /// Unary Sign of a SHA-256 digest.
    Sign,
    /// SignBatch of --batch digests (ops = signatures).
    Batch,
    /// Enroll: a new TLS connection, a new token and a new CSR each time.
    Enroll,
    /// Unary Sign with its Sigstore bundle (built and checked as `meshsign sign` does): what
    /// `meshsign sign --format sigstore` does for one file. Each run also measures plain Sign,
    /// and one client writing bundles one call per file against 100 files per SignBatch
    /// (`batched_to_single`), on the same site.
    Receipt,
    /// A site after a year (issue 30): `--entries` audit entries and `--certs` certificates
    /// loaded through the site's own store and audit code, measured against a 10⁴-entry site
    /// and a fresh one in the same run (start-up, RSS, Sign, proofs, export, verify, snapshot,
    /// restore, scrape, disk).
    Scale,
    /// A soak: `--concurrency` clients (three in four sign, the rest enroll) for `--duration` seconds in windows of `--sample` seconds; the site's RSS after
    /// each window, and the growth per window over the second half (does it level?).
    Soak,
}

/// One measured window of the service.
struct Measured {
    ops: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Server CPU seconds per 1,000 ops in the window.
    server_cpu: Option<f64>,
    /// Load-generator CPU seconds per 1,000 ops in the window.
    client_cpu: Option<f64>,
    /// PostgreSQL's CPU seconds per 1,000 ops (a PostgreSQL site).
    db_cpu: Option<f64>,
    /// `--scenario receipt`: plain Sign ops/s on the same site in the same run.
    sign_ops_per_sec: Option<f64>,
    /// `--scenario receipt`: server CPU seconds per 1,000 plain Signs in that window (the
    /// site's cost per op with and without the client building bundles, side by side).
    sign_server_cpu: Option<f64>,
    /// `--scenario receipt`: one client (one `meshsign sign`) writing bundles of 100 files —
    /// one Sign call per file, then 100 files per SignBatch — bundles/s, same run.
    one_by_one_ops_per_sec: Option<f64>,
    /// See `one_by_one_ops_per_sec`.
    batched_ops_per_sec: Option<f64>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn per_1000(before: Option<f64>, after: Option<f64>, ops: u64) -> Option<f64> {
    Some((after? - before?) / (ops.max(1) as f64) * 1000.0)
}

/// One measurement against a running site: enroll the runners (untimed), then drive the load
/// for `--duration` while reading the server's and our own CPU time.
async fn service(
    cli: &Cli,
    mode: &Mode,
    db: Option<&meshsign_certs_dev::postgres::LocalPostgres>,
) -> Result<Measured, String> {
    let (hsm, sites, tokens) = (mode.hsm, &mode.sites[..], &mode.tokens);
    let what = match cli.scenario {
        Scenario::Sign if cli.sign_set => Some(SignLoad::SignPromised),
        Scenario::Sign | Scenario::Receipt => Some(SignLoad::Sign),
        Scenario::Batch => Some(SignLoad::Batch(cli.batch)),
        Scenario::Enroll | Scenario::Soak | Scenario::Scale => None,
    };
    let dur = Duration::from_secs(cli.duration);
    // The runners are spread evenly over the replicas.
    let key = if hsm { "hsm" } else { load::KEY };
    let mut sessions = Vec::new();
    if what.is_some() {
        for (i, site) in sites.iter().enumerate() {
            let n = cli.concurrency / sites.len() + usize::from(i < cli.concurrency % sites.len());
            sessions.extend(load::sessions(&site.client, tokens, n).await?);
        }
    }
    let cpu = || -> Option<f64> { sites.iter().map(Daemon::cpu_seconds).sum() };
    let db_cpu = || db.and_then(|d| d.cpu_seconds(daemon::clock_ticks()));
    let (mut sign_ops_per_sec, mut sign_server_cpu) = (None, None);
    let (mut one_by_one_ops_per_sec, mut batched_ops_per_sec) = (None, None);
    if matches!(cli.scenario, Scenario::Receipt) {
        // The baseline first, on sessions of its own: plain Sign.
        let n = sessions.len();
        let again = load::sessions(&sites[0].client, tokens, n).await?;
        let s0 = cpu();
        let b = load::sign(again, SignLoad::Sign, key, dur).await;
        sign_ops_per_sec = Some(b.ops as f64 / b.seconds);
        sign_server_cpu = per_1000(s0, cpu(), b.ops);
        // One `meshsign sign` of many files: a call per file, then 100 files per call.
        for (files, out) in [
            (1, &mut one_by_one_ops_per_sec),
            (FILES_PER_CALL, &mut batched_ops_per_sec),
        ] {
            let one = load::sessions(&sites[0].client, tokens, 1).await?;
            let b = load::bundles(&sites[0].client, one, key, files, dur).await?;
            *out = Some(b.ops as f64 / b.seconds);
        }
    }
    let (s0, c0, d0) = (cpu(), daemon::own_cpu_seconds(), db_cpu());
    let w: Window = match (what, &cli.scenario) {
        (Some(_), Scenario::Receipt) => {
            load::bundles(&sites[0].client, sessions, key, 1, dur).await?
        }
        (Some(what), _) => load::sign(sessions, what, key, dur).await,
        (None, _) if !mode.devices.is_empty() => {
            load::enroll_proven(&sites[0].client, tokens, &mode.devices, dur).await?
        }
        (None, _) => load::enroll(&sites[0].client, tokens, cli.concurrency, dur).await?,
    };
    let (s1, c1, d1) = (cpu(), daemon::own_cpu_seconds(), db_cpu());
    Ok(Measured {
        ops: w.ops,
        ops_per_sec: w.ops as f64 / w.seconds,
        p50_ms: pct(&w.latencies, 0.5),
        p90_ms: pct(&w.latencies, 0.9),
        p99_ms: pct(&w.latencies, 0.99),
        errors: w.errors,
        server_cpu: per_1000(s0, s1, w.ops),
        client_cpu: per_1000(c0, c1, w.ops),
        db_cpu: per_1000(d0, d1, w.ops),
        sign_ops_per_sec,
        sign_server_cpu,
        one_by_one_ops_per_sec,
        batched_ops_per_sec,
    })
}

/// The same signing code, no network: the site's P-256 signer (`EcdsaP256`, aws-lc-rs), one
/// thread per core.
fn in_process(cli: &Cli) -> f64 {
    let backend: std::sync::Arc<dyn SigningBackend> = match EcdsaP256::generate() {
        Ok((k, _pkcs8)) => std::sync::Arc::new(k),
        Err(_) => return 0.0,
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let dur = Duration::from_secs(cli.duration);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let backend = backend.clone();
            std::thread::spawn(move || {
                let digest = [i as u8; 32];
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < dur {
                    if backend.sign_digest(&digest).is_ok() {
                        n += 1;
                    }
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    handles.into_iter().filter_map(|h| h.join().ok()).sum()
}

/// The SoftHSM2 key in-process through cryptoki (the site's `Pkcs11Key`), one thread per
/// core, sessions as many as threads.
fn in_process_pkcs11(cli: &Cli) -> Result<(f64, f64), String> {
    use meshsign_server::custody::pkcs11::{Pkcs11Config, Pkcs11Key, Token};
    let dir = PathBuf::from(std::env::var_os(SOFTHSM_DIR).ok_or("no SoftHSM2 token")?);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let token = Token::open(
        &Pkcs11Config {
            module: SOFTHSM_MODULE.into(),
            token_label: SOFTHSM_LABEL.into(),
            pin_file: dir.join("pin"),
            sessions: threads,
            audit_key: false,
            runner_cas: false,
        },
        true,
    )
    .map_err(|e| e.to_string())?;
    let alg = meshsign_server::model::KeyAlgorithm::EcdsaP256Sha256;
    let (r, _) = token
        .generate(alg, "bench in-process")
        .map_err(|e| e.to_string())?;
    let key: std::sync::Arc<dyn SigningBackend> =
        std::sync::Arc::new(Pkcs11Key::load(&token, &r, alg).map_err(|e| e.to_string())?);
    let dur = Duration::from_secs(cli.duration);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || {
                let digest = [i as u8; 32];
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < dur {
                    if key.sign_digest(&digest).is_ok() {
                        n += 1;
                    }
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    let signs: f64 = handles.into_iter().filter_map(|h| h.join().ok()).sum();
    // The check every token signature now passes before it leaves (issue 23): verification
    // under the recorded public key alone, same threads, same duration.
    let digest = [7u8; 32];
    let sig = key.sign_digest(&digest).map_err(|e| e.to_string())?;
    let check = std::sync::Arc::new(
        meshsign_evidence::sig::Verifier::new("ecdsa-p256-sha256", key.public_key_der())
            .map_err(|e| e.to_string())?,
    );
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (sig, check) = (sig.clone(), check.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < dur {
                    if check.verify_digest(&digest, &sig).is_ok() {
                        n += 1;
                    }
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    let verifies: f64 = handles.into_iter().filter_map(|h| h.join().ok()).sum();
    Ok((signs, verifies))
}

/// A site under test and what was measured on it.
struct Mode {
    /// Signs with the SoftHSM2 key `hsm` (else the software key `release`).
    hsm: bool,
    durable: bool,
    /// `sled` or `postgres`.
    store: &'static str,
    /// The site's replicas (one, except a PostgreSQL site with two).
    sites: Vec<Daemon>,
    /// Its database (a PostgreSQL site).
    db: Option<meshsign_certs_dev::postgres::LocalPostgres>,
    tokens: Tokens,
    rows: Vec<Measured>,
    /// Registered device keys, one per connection (`--device-proofs`).
    devices: Vec<std::sync::Arc<meshsign_client::device::DeviceKey>>,
}

/// An OpenBao peer and what each run measured on it.
struct Peer {
    bao: openbao::Bao,
    ops: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<Option<f64>>,
}

impl Peer {
    fn new(bao: openbao::Bao) -> Self {
        Self {
            bao,
            ops: Vec::new(),
            p99: Vec::new(),
            cpu: Vec::new(),
        }
    }
}

fn opt_median(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    if cli.key_backend == KeyBackend::Pkcs11 && std::env::var_os(SOFTHSM_DIR).is_none() {
        match tokio::task::block_in_place(reexec_with_softhsm) {
            Ok(status) => std::process::exit(status.code().unwrap_or(1)),
            Err(e) => {
                eprintln!("meshsign-bench: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = run(&cli).await {
        eprintln!("meshsign-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: &Cli) -> Result<(), String> {
    let binary = cli.meshsignd.clone().unwrap_or_else(daemon::default_binary);
    if matches!(cli.scenario, Scenario::Soak) {
        return soak(cli, &binary).await;
    }
    if matches!(cli.scenario, Scenario::Scale) {
        let json = scale::run(&scale::ScaleArgs {
            entries: cli.entries,
            certs: cli.certs,
            small: (cli.small_entries, cli.small_certs),
            export_turn: cli.export_turn,
            duration: cli.duration,
            runs: cli.runs,
            concurrency: cli.concurrency,
            binary,
            log_level: cli.site_log.clone(),
            postgres: cli.store == Store::Postgres,
        })
        .await?;
        println!("{json}");
        return Ok(());
    }
    let durabilities: Vec<bool> = if cli.compare_durability {
        vec![true, false]
    } else {
        vec![!cli.no_durable_audit]
    };
    // One site per durability setting, reused by every run (enrollments accumulate, so the
    // RSS reported after an enroll benchmark is after all of them).
    let mut modes = Vec::new();
    for durable in durabilities {
        let mut site = Daemon::start(&binary, durable, &cli.site_log, None)?;
        if matches!(cli.scenario, Scenario::Enroll) {
            site = site.with_enroll_unlimited(&binary, &cli.site_log)?;
        }
        let tokens = Tokens::new(&site.client)?;
        modes.push(Mode {
            hsm: false,
            durable,
            store: "sled",
            sites: vec![site],
            db: None,
            tokens,
            rows: Vec::new(),
            devices: Vec::new(),
        });
    }
    // PostgreSQL: one cluster per site (one replica, then two), each started here on loopback.
    if cli.store == Store::Postgres {
        for replicas in [1usize, 2] {
            let pg = meshsign_certs_dev::postgres::LocalPostgres::start()
                .map_err(|e| format!("PostgreSQL: {e}"))?;
            let (url, ca_file) = (pg.url(), pg.ca_file());
            let first = Daemon::start(&binary, true, &cli.site_log, Some((&url, &ca_file)))?;
            let tokens = Tokens::new(&first.client)?;
            let mut sites = vec![first];
            for r in 1..replicas {
                let next = sites[0].replica(&binary, &cli.site_log, &format!("replica-{r}"))?;
                sites.push(next);
            }
            modes.push(Mode {
                hsm: false,
                durable: true,
                store: "postgres",
                sites,
                db: Some(pg),
                tokens,
                rows: Vec::new(),
                devices: Vec::new(),
            });
        }
    }
    if cli.key_backend == KeyBackend::Pkcs11 {
        let site = Daemon::start(&binary, !cli.no_durable_audit, &cli.site_log, None)?;
        let tokens = Tokens::new(&site.client)?;
        modes.push(Mode {
            hsm: true,
            durable: !cli.no_durable_audit,
            store: "sled",
            sites: vec![site],
            db: None,
            tokens,
            rows: Vec::new(),
            devices: Vec::new(),
        });
    }
    let keys = tempfile::tempdir().map_err(|e| e.to_string())?;
    if cli.device_proofs {
        let site = Daemon::start(&binary, !cli.no_durable_audit, &cli.site_log, None)?
            .with_enroll_unlimited(&binary, &cli.site_log)?;
        let (site, devices) = site
            .with_registered_runners(&binary, &cli.site_log, keys.path(), cli.concurrency)
            .await?;
        let tokens = Tokens::new(&site.client)?;
        modes.push(Mode {
            hsm: false,
            durable: !cli.no_durable_audit,
            store: "sled",
            sites: vec![site],
            db: None,
            tokens,
            rows: Vec::new(),
            devices,
        });
    }
    let (mut inproc_hsm, mut inproc_verify) = (Vec::new(), Vec::new());
    let mut baos = Vec::new();
    if cli.vs_openbao {
        baos.push(Peer::new(openbao::start(openbao::Shape::Dev).await?));
    }
    if cli.openbao_tls_audit {
        baos.push(Peer::new(openbao::start(openbao::Shape::TlsAudit).await?));
    }
    let mut inproc = Vec::new();
    for run in 0..cli.runs {
        inproc.push(if cli.no_in_process {
            0.0
        } else {
            tokio::task::block_in_place(|| in_process(cli))
        });
        if cli.key_backend == KeyBackend::Pkcs11 {
            let (signs, verifies) = tokio::task::block_in_place(|| in_process_pkcs11(cli))?;
            inproc_hsm.push(signs);
            inproc_verify.push(verifies);
        }
        for b in &mut baos {
            let batch = matches!(cli.scenario, Scenario::Batch).then_some(cli.batch);
            // OpenBao's own CPU over the same window (issue 30): CPU per signature side by
            // side with the site's, in one run.
            let (cpu0, t0) = (b.bao.cpu_seconds(), Instant::now());
            let (ops, lat) = openbao::load(
                &b.bao,
                cli.concurrency,
                Duration::from_secs(cli.duration),
                batch,
            )
            .await;
            let signed = (ops * t0.elapsed().as_secs_f64()).round() as u64;
            let cpu = per_1000(cpu0, b.bao.cpu_seconds(), signed);
            eprintln!(
                "run {run}: openbao ({:?}) transit {:?} c={} {ops:.0} ops/s p99 {:.2} ms server {:.3} CPU s per 1000 ops",
                b.bao.shape(),
                cli.scenario,
                cli.concurrency,
                pct(&lat, 0.99),
                cpu.unwrap_or(f64::NAN)
            );
            b.ops.push(ops);
            b.p99.push(pct(&lat, 0.99));
            b.cpu.push(cpu);
        }
        // Alternate the order so neither setting always runs on a warmer machine.
        let order: Vec<usize> = if run % 2 == 0 {
            (0..modes.len()).collect()
        } else {
            (0..modes.len()).rev().collect()
        };
        for i in order {
            let mode = &mut modes[i];
            let m = service(cli, mode, mode.db.as_ref()).await?;
            eprintln!(
                "run {run}: {:?}{} {} x{} durable={} c={} {:.0} ops/s p50 {:.2} ms p99 {:.2} ms \
                 errors {} server {:.3} / client {:.3} CPU s per 1000 ops (in-process {:.0}/s)",
                cli.scenario,
                match (mode.hsm, mode.devices.is_empty()) {
                    (true, _) => " [pkcs11 key]",
                    (false, false) => " [device proofs]",
                    _ => "",
                },
                mode.store,
                mode.sites.len(),
                mode.durable,
                cli.concurrency,
                m.ops_per_sec,
                m.p50_ms,
                m.p99_ms,
                m.errors,
                m.server_cpu.unwrap_or(f64::NAN),
                m.client_cpu.unwrap_or(f64::NAN),
                inproc[run]
            );
            mode.rows.push(m);
        }
    }
    let in_process_ops = median(inproc);
    let summarize = |mode: &Mode| {
        let rs = &mode.rows;
        let ops = median(rs.iter().map(|m| m.ops_per_sec).collect());
        let rss = mode.sites[0].rss_mib();
        let mut j = serde_json::json!({
            "scenario": format!("{:?}", cli.scenario).to_lowercase(),
            "store": mode.store,
            "replicas": mode.sites.len(),
            "concurrency": cli.concurrency,
            "durable_audit": mode.durable,
            "sign_set": cli.sign_set,
            "runs": rs.len(),
            "duration_s": cli.duration,
            "ops_per_sec": ops.round(),
            "p50_ms": median(rs.iter().map(|m| m.p50_ms).collect()),
            "p90_ms": median(rs.iter().map(|m| m.p90_ms).collect()),
            "p99_ms": median(rs.iter().map(|m| m.p99_ms).collect()),
            "errors": rs.iter().map(|m| m.errors).sum::<u64>(),
            "server_cpu_s_per_1000_ops": opt_median(rs.iter().map(|m| m.server_cpu)),
            "client_cpu_s_per_1000_ops": opt_median(rs.iter().map(|m| m.client_cpu)),
            "database_cpu_s_per_1000_ops": opt_median(rs.iter().map(|m| m.db_cpu)),
            "server_peak_rss_mib": rss.map(|r| r.0),
            "server_rss_mib": rss.map(|r| r.1),
            "in_process_ops_per_sec": in_process_ops.round(),
            "ratio_to_in_process": (in_process_ops > 0.0).then(|| ops / in_process_ops),
        });
        if matches!(cli.scenario, Scenario::Receipt) {
            let sign = opt_median(rs.iter().map(|m| m.sign_ops_per_sec)).unwrap_or(0.0);
            j["sign_ops_per_sec"] = sign.round().into();
            j["receipt_to_sign"] = (ops / sign.max(1.0)).into();
            j["sign_server_cpu_s_per_1000_ops"] =
                opt_median(rs.iter().map(|m| m.sign_server_cpu)).into();
            let single = opt_median(rs.iter().map(|m| m.one_by_one_ops_per_sec)).unwrap_or(0.0);
            let batched = opt_median(rs.iter().map(|m| m.batched_ops_per_sec)).unwrap_or(0.0);
            j["one_client_files_one_by_one_per_sec"] = single.round().into();
            j["one_client_files_batched_per_sec"] = batched.round().into();
            j["batched_to_single"] = (batched / single.max(1.0)).into();
        }
        if matches!(cli.scenario, Scenario::Enroll) {
            // Every run enrolled on the same site.
            j["enrollments_on_site"] = rs.iter().map(|m| m.ops).sum::<u64>().into();
        }
        for b in &baos {
            // `openbao_*` for the dev server, `openbao_tls_audit_*` for the site-shaped one.
            let p = match b.bao.shape() {
                openbao::Shape::Dev => "openbao",
                openbao::Shape::TlsAudit => "openbao_tls_audit",
            };
            let cpu = opt_median(b.cpu.iter().copied());
            j[format!("{p}_ops_per_sec")] = median(b.ops.clone()).round().into();
            j[format!("{p}_p99_ms")] = median(b.p99.clone()).into();
            j[format!("ratio_to_{p}")] = (ops / median(b.ops.clone()).max(1.0)).into();
            j[format!("{p}_server_cpu_s_per_1000_ops")] = cpu.into();
            if let Some(bytes) = b.bao.audit_log_bytes() {
                j[format!("{p}_audit_log_bytes")] = bytes.into();
            }
            // CPU per signature, the site's over OpenBao's, measured in the same run.
            j[format!("server_cpu_ratio_to_{p}")] = opt_median(rs.iter().map(|m| m.server_cpu))
                .zip(cpu)
                .map(|(m, b)| m / b.max(1e-9))
                .into();
        }
        j
    };
    if cli.key_backend == KeyBackend::Pkcs11 {
        let (soft, hsm) = (summarize(&modes[0]), summarize(&modes[modes.len() - 1]));
        let hsm_inproc = median(inproc_hsm);
        let verify_inproc = median(inproc_verify);
        let ops = |j: &serde_json::Value| j["ops_per_sec"].as_f64().unwrap_or(0.0);
        println!(
            "{}",
            serde_json::json!({
                "software": soft,
                "pkcs11": hsm,
                "pkcs11_in_process_ops_per_sec": hsm_inproc.round(),
                "pkcs11_to_software": ops(&hsm) / ops(&soft).max(1.0),
                "pkcs11_ratio_to_its_in_process": ops(&hsm) / hsm_inproc.max(1.0),
                "verify_in_process_ops_per_sec": verify_inproc.round(),
                // The share of each token signature's time spent checking it.
                "check_share_of_token_signature": hsm_inproc / verify_inproc.max(1.0),
            })
        );
    } else if cli.compare_durability {
        let (d, n) = (summarize(&modes[0]), summarize(&modes[1]));
        let ratio = d["ops_per_sec"].as_f64().unwrap_or(0.0)
            / n["ops_per_sec"].as_f64().unwrap_or(1.0).max(1.0);
        println!(
            "{}",
            serde_json::json!({ "durable": d, "no_flush": n, "durable_to_no_flush": ratio })
        );
    } else if cli.store == Store::Postgres {
        let rows: Vec<serde_json::Value> = modes.iter().map(summarize).collect();
        let sled = rows[0]["ops_per_sec"].as_f64().unwrap_or(0.0).max(1.0);
        let with_ratio: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|mut r| {
                r["ratio_to_sled"] = (r["ops_per_sec"].as_f64().unwrap_or(0.0) / sled).into();
                r
            })
            .collect();
        println!("{}", serde_json::json!({ "stores": with_ratio }));
    } else if cli.device_proofs {
        let (claimed, proven) = (summarize(&modes[0]), summarize(&modes[modes.len() - 1]));
        let ops = |j: &serde_json::Value| j["ops_per_sec"].as_f64().unwrap_or(0.0);
        println!(
            "{}",
            serde_json::json!({
                "claimed": claimed,
                "proven": proven,
                "proven_to_claimed": ops(&proven) / ops(&claimed).max(1.0),
            })
        );
    } else if let Some(m) = modes.first() {
        println!("{}", summarize(m));
    }
    drop(modes);
    Ok(())
}

/// `--scenario soak`: mixed load on one dev site for `--duration` seconds; RSS after each
/// window. The last line is one JSON object (`rss_mib` per window, `growth_mib_per_window`
/// over the second half, ops, errors).
async fn soak(cli: &Cli, binary: &std::path::Path) -> Result<(), String> {
    let mut site = Daemon::start(binary, !cli.no_durable_audit, &cli.site_log, None)?;
    if let Some(mib) = cli.store_cache_mib {
        site = site.with_store_cache(binary, &cli.site_log, mib)?;
    }
    let tokens = Tokens::new(&site.client)?;
    let signers = (cli.concurrency * 3 / 4).max(1);
    let enrollers = cli.concurrency.saturating_sub(signers).max(1);
    let window = Duration::from_secs(cli.sample.max(1));
    let windows = (cli.duration / cli.sample.max(1)).max(1);
    let (mut rss, mut ops, mut errors) = (Vec::new(), 0u64, 0u64);
    // The signers' runners enroll once (the enrollers then keep the enroll port at its rate
    // limit: refusals, counted into summary entries, are part of the load).
    let mut sessions = load::sessions(&site.client, &tokens, signers).await?;
    let start = Instant::now();
    for w in 0..windows {
        let ((signed, back), enrolled) = tokio::join!(
            load::sign_keeping(sessions, SignLoad::Sign, load::KEY, window),
            load::enroll(&site.client, &tokens, enrollers, window)
        );
        sessions = back;
        let enrolled = enrolled?;
        ops += signed.ops + enrolled.ops;
        errors += signed.errors + enrolled.errors;
        let (_, now) = site.rss_mib().ok_or("the site is gone")?;
        rss.push(now);
        println!(
            "window {:>3} ({:>5.0} s): {:>7} signs, {:>5} enrollments, {:>6} refused, RSS \
             {now:.1} MiB",
            w + 1,
            start.elapsed().as_secs_f64(),
            signed.ops,
            enrolled.ops,
            signed.errors + enrolled.errors
        );
    }
    let half = &rss[rss.len() / 2..];
    let growth = match (half.first(), half.last()) {
        (Some(a), Some(b)) if half.len() > 1 => (b - a) / (half.len() - 1) as f64,
        _ => 0.0,
    };
    println!(
        "{}",
        serde_json::json!({
            "scenario": "soak",
            "store_cache_mib": cli.store_cache_mib,
            "seconds": start.elapsed().as_secs_f64().round(),
            "window_seconds": cli.sample,
            "ops": ops,
            "errors": errors,
            "rss_mib": rss.iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "growth_mib_per_window": (growth * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
