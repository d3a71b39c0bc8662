//! `--scenario scale` (issue 30): what a site costs after a year, measured on sites whose state
//! is built quickly through the site's own code — the store and the audit writer, in-process,
//! while the site is stopped — rather than through the network:
//!
//! - a **small** site (10⁴ entries), the base of `rss_ratio_to_small`;
//! - the **big** site (`--entries`, `--certs`);
//! - a **fresh** site, the base of `sign_ratio_to_fresh` (its Sign windows alternate with the big
//!   site's, `--runs` each, medians).
//!
//! On the small and the big site: time from starting `meshsignd` to serving, RSS at rest and
//! under Sign load, the metrics scrape, `GetInclusionProof` p50/p99 over entries spread through
//! the log, `admin audit export` (`--runs` exports, median) and `meshsign audit verify` rates,
//! snapshot and restore time, disk bytes per entry, and the live certificates the scrape counts
//! at rest (`live_certs`); then the two export the first entries of their logs in turns
//! (`export_ratio_to_small`, `export_cpu_ratio_to_small`: the export's growth as one ratio).
//! The last line printed is one JSON object.
//!
//! The loaded history is a year's shape: per enrollment one `Enroll` entry and one certificate
//! record (all but the last few hundred expired and ended by their job, as `RevokeSelf` leaves
//! them), the rest `Sign` entries each naming its transparency leaf, as a real Sign does. The
//! last few hundred are valid from the wall clock's now as they are written, so they are still
//! live when the site starts however long the load took: `live_certs` shows it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshsign_evidence::audit::{AuditRecord, TlogLeaves};
use meshsign_evidence::identity::JobClaims;
use meshsign_server::model::CertRecord;
use meshsign_server::state::SiteState;

use crate::daemon::Daemon;
use crate::load::{self, SignLoad, Tokens};

/// What `--scenario scale` needs from the command line.
pub struct ScaleArgs {
    /// Audit entries in the big site.
    pub entries: u64,
    /// Certificate records in the big site.
    pub certs: u64,
    /// The small site's entries and certificates (the base of `rss_ratio_to_small`); default
    /// 10⁴ entries and up to 10³ certificates. Giving it the big site's certificates makes
    /// the ratio the log's alone (the target: independent of log size).
    pub small: (Option<u64>, Option<u64>),
    /// Entries each site exports per turn of [`export_side_by_side`].
    pub export_turn: u64,
    /// Seconds per Sign window.
    pub duration: u64,
    /// Sign windows per site, and exports of each loaded site (medians).
    pub runs: usize,
    /// Concurrent Sign connections.
    pub concurrency: usize,
    /// The site binary.
    pub binary: PathBuf,
    /// The site's log level.
    pub log_level: String,
    /// The three sites (small, big, fresh) on PostgreSQL, a cluster each started here on
    /// loopback, instead of sled.
    pub postgres: bool,
}

/// Entries of the small site.
const SMALL_ENTRIES: u64 = 10_000;
/// Certificates still valid at the end of the load (the rest expired and were ended).
const LIVE_CERTS: u64 = 500;
/// Audit entries in flight at once while loading (the writer commits them in groups).
const LOAD_IN_FLIGHT: usize = 1024;
/// From the end of the start's work (the log's background read) to the RSS-at-rest sample.
const REST_AFTER: Duration = Duration::from_secs(15);
/// What the site logs (at `info`) when its background read of the log is done.
const READ_THROUGH_LINE: &str = "audit log read through";
/// Inclusion proofs asked of each site.
const PROOFS: usize = 2000;

/// Figures of one loaded site.
#[derive(Debug, Default)]
struct SiteFigures {
    entries: u64,
    load_s: f64,
    startup_s: f64,
    read_through_s: f64,
    rss_rest_mib: f64,
    rss_load_mib: f64,
    scrape_ms: f64,
    /// `meshsign_certificates_live` summed over environments, from the scrape at rest.
    live_certs: u64,
    proof_p50_ms: f64,
    proof_p99_ms: f64,
    export_per_s: f64,
    /// The site's CPU time per exported entry, µs (median of the exports): what the rate
    /// costs the site, steadier than the rate on a shared machine.
    export_server_cpu_us: f64,
    /// On PostgreSQL, the database's CPU time per exported entry, µs (its server and
    /// backends; median of the exports): the other half of what an entry costs there.
    export_db_cpu_us: f64,
    verify_per_s: f64,
    snapshot_s: f64,
    restore_s: f64,
    disk_bytes_per_entry: f64,
    sign_ops: Vec<f64>,
    sign_cpu: Vec<f64>,
}

fn hex32(seed: u64, tag: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{tag}-{seed}").as_bytes(),
    ))
}

fn claims(i: u64) -> JobClaims {
    JobClaims {
        iss: "https://token.actions.githubusercontent.com".into(),
        sub: "repo:acme/app:environment:production".into(),
        jti: hex32(i, "jti")[..32].to_string(),
        job_id: format!("{}", 30_000_000_000u64 + i),
        repository: "acme/app".into(),
        git_ref: "refs/heads/main".into(),
        trust_policy: "github-release".into(),
        provider: "github".into(),
        pipeline: format!("{}", 13_000_000_000u64 + i / 4),
        run_attempt: "1".into(),
        workflow: "acme/app/.github/workflows/release.yml@refs/heads/main".into(),
        commit: hex32(i, "sha")[..40].to_string(),
        runner_proof: "file".into(),
    }
}

/// A decision record as the site writes it (seq, time and hashes are the writer's).
fn entry(i: u64, enroll: bool, job: &JobClaims, serial: &str, fingerprint: &str) -> AuditRecord {
    let mut r = AuditRecord {
        rpc: if enroll { "Enroll" } else { "Sign" }.into(),
        decision: "allow".into(),
        reason: "ok".into(),
        environment: load::ENVIRONMENT.into(),
        job_id: job.job_id.clone(),
        jti: job.jti.clone(),
        token_issuer: job.iss.clone(),
        subject: job.sub.clone(),
        runner_fingerprint: fingerprint.into(),
        cert_serial: serial.into(),
        repository: job.repository.clone(),
        git_ref: job.git_ref.clone(),
        provider: job.provider.clone(),
        pipeline_id: job.pipeline.clone(),
        peer: format!(
            "10.20.{}.{}:{}",
            (i >> 8) & 255,
            i & 255,
            40_000 + i % 20_000
        ),
        ..Default::default()
    };
    if !enroll {
        r.ttl_remaining_sec = Some(600);
        r.key_id = "release@v1".into();
        r.digest = hex32(i, "artifact");
        r.items = 1;
        r.artifact = format!("app-1.{}.{}.ipa", i / 1000, i % 1000);
        let leaf = meshsign_evidence::merkle::leaf_hash(r.digest.as_bytes());
        r.tlog = Some(TlogLeaves::new(0, &[leaf]));
    }
    r
}

/// Writes `entries` audit entries and `certs` certificate records into the stopped site at
/// `site_dir` through its own store and audit code.
async fn load_site(
    site_dir: &Path,
    entries: u64,
    certs: u64,
    postgres: Option<(&str, &Path)>,
) -> Result<f64, String> {
    let mut cfg = meshsign_server::config::SiteConfig::load(&site_dir.join("site.toml"))
        .map_err(|e| e.to_string())?;
    // As `meshsignd dev --postgres-url` sets it.
    if let Some((url, ca_file)) = postgres {
        cfg.postgres = Some(meshsign_server::config::PostgresStore {
            url: url.to_string(),
            password_file: None,
            pool_size: 8,
            statement_timeout: Duration::from_secs(5),
            allow_plaintext: false,
            ca_file: Some(ca_file.to_path_buf()),
        });
    }
    // The site's clock walks through the year as the history is written, so housekeeping
    // runs as it would have (below); it ends at the wall clock's now.
    let clock = meshsign_server::clock::ManualClock::new();
    let year = 365 * 86_400;
    clock.step(-year);
    let state = tokio::task::block_in_place(|| SiteState::open(cfg, Arc::new(clock.clone())))
        .map_err(|e| e.to_string())?;
    let state = Arc::new(state);
    let started = Instant::now();
    let now = state.clock.unix() + year;
    let issuer = state
        .runner_cas(load::ENVIRONMENT)
        .map_err(|e| e.to_string())?
        .active
        .record
        .id
        .clone();
    let certs = certs.max(1).min(entries.max(1));
    let signs_per_cert = entries.saturating_sub(certs) / certs;
    let mut set = tokio::task::JoinSet::new();
    let mut issuing = tokio::task::JoinSet::new();
    let mut written = 0u64;
    for c in 0..certs {
        let job = claims(c);
        let serial = hex32(c, "serial")[..32].to_string();
        let fingerprint = hex32(c % 300, "runner");
        // Spread over the past year; the last LIVE_CERTS are valid now and still held: valid
        // from a minute before the wall clock's now as they are written, not from the load's
        // start. A site started more than a certificate's life after that (a slow load, a
        // kept copy started by hand) found them all expired and spent its start sweeping 500
        // abandoned sessions, which a site loaded in seconds did not.
        let live = c + LIVE_CERTS >= certs;
        let not_before = if live {
            wall_unix().max(now) - 60
        } else {
            now - year + (c as i64 * year / certs as i64)
        };
        // Time passes up to this issuance; every SWEEP_EVERY certificates, housekeeping does
        // what its passes over that stretch of the year did (expired certificates leave the
        // expiry index, records expired longer than the retention period are removed), so
        // the store holds what a site this old holds, its pages reused as a running site
        // reuses them, not a year of records removed at once.
        let behind = not_before - state.clock.unix();
        if behind > 0 {
            clock.advance(Duration::from_secs(behind.unsigned_abs()));
        }
        if c % SWEEP_EVERY == 0 {
            // What was issued before this point is in the store before housekeeping looks.
            drain(&mut issuing).await?;
            sweep_all(&state)?;
        }
        let record = CertRecord {
            serial: serial.clone(),
            environment: load::ENVIRONMENT.into(),
            region: state.config().region.clone(),
            fingerprint: fingerprint.clone(),
            claims: job.clone(),
            issuer_id: issuer.clone(),
            not_before,
            not_after: not_before + 900,
            revoked: (!live).then(|| "revoked by its holder: job finished".to_string()),
            session: String::new(),
            session_start: not_before,
            generation: 0,
            superseded: false,
        };
        // Issuance records go to the store ISSUE_IN_FLIGHT at a time: on PostgreSQL each is
        // two committed statements, and one at a time they were the load's whole time (10⁵
        // certificates: ~300 of 377 s at 10⁶ entries).
        if issuing.len() >= ISSUE_IN_FLIGHT {
            drain_one(&mut issuing).await?;
        }
        let s = state.clone();
        issuing.spawn_blocking(move || s.record_issued(&record).map_err(|e| e.to_string()));
        let n = if c + 1 == certs {
            entries.saturating_sub(written)
        } else {
            1 + signs_per_cert
        };
        for k in 0..n {
            let rec = entry(written + k, k == 0, &job, &serial, &fingerprint);
            let s = state.clone();
            set.spawn(async move { s.audit.record_sign(rec).await.map(|_| ()) });
            if set.len() >= LOAD_IN_FLIGHT {
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                    if set.len() < LOAD_IN_FLIGHT / 2 {
                        break;
                    }
                }
            }
        }
        written += n;
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    drain(&mut issuing).await?;
    let behind = wall_unix().max(now) - state.clock.unix();
    if behind > 0 {
        clock.advance(Duration::from_secs(behind.unsigned_abs()));
    }
    sweep_all(&state)?;
    let took = started.elapsed().as_secs_f64();
    state.audit.stop().await;
    state.store.flush().map_err(|e| e.to_string())?;
    drop(state);
    Ok(written as f64 / took)
}

/// The wall clock's now (unix seconds): the site the bench starts after the load runs on it.
fn wall_unix() -> i64 {
    use meshsign_server::clock::Clock as _;
    meshsign_server::clock::SystemClock.unix()
}

/// Waits for one of the loader's issuance records to be written.
async fn drain_one(issuing: &mut tokio::task::JoinSet<Result<(), String>>) -> Result<(), String> {
    match issuing.join_next().await {
        Some(r) => r.map_err(|e| e.to_string())?,
        None => Ok(()),
    }
}

/// Waits for all of the loader's issuance records to be written.
async fn drain(issuing: &mut tokio::task::JoinSet<Result<(), String>>) -> Result<(), String> {
    while !issuing.is_empty() {
        drain_one(issuing).await?;
    }
    Ok(())
}

/// Issuance records the loader writes at once (the PostgreSQL store's pool size).
const ISSUE_IN_FLIGHT: usize = 8;

/// Certificates written between two housekeeping sweeps of the loader.
const SWEEP_EVERY: u64 = 1024;

/// Housekeeping's sweep of expired certificates, run until nothing is left to do at the
/// site's current time.
fn sweep_all(state: &SiteState) -> Result<(), String> {
    loop {
        let s = state
            .sweep_abandoned(meshsign_server::state::sessions::SWEEP_BATCH * 8)
            .map_err(|e| e.to_string())?;
        if s.looked_at == 0 && s.records_removed == 0 {
            return Ok(());
        }
    }
}

fn du(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

/// `GET /metrics` on `addr`; the time to the whole answer, and the answer.
async fn scrape(addr: std::net::SocketAddr) -> Result<(Duration, String), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    tcp.read_to_end(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    if !body.starts_with(b"HTTP/1.1 200") {
        return Err("the metrics listener did not answer 200".into());
    }
    Ok((t.elapsed(), String::from_utf8_lossy(&body).into_owned()))
}

/// The sum of `meshsign_certificates_live` over its series in a scrape's answer.
fn live_certs(scraped: &str) -> u64 {
    scraped
        .lines()
        .filter(|l| l.starts_with("meshsign_certificates_live{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// One export of the log (up to `max` entries) into `file`: the entries, the rate
/// (entries/s) and a spread sample of its lines for proofs.
async fn export_once(
    (d, db): (
        &Daemon,
        Option<&meshsign_certs_dev::postgres::LocalPostgres>,
    ),
    admin: &mut meshsign_client::site::admin::Admin,
    file: &Path,
    entries: u64,
    max: u64,
) -> Result<(u64, Export, Vec<String>), String> {
    let db_cpu = || db.and_then(|p| p.cpu_seconds(crate::daemon::clock_ticks()));
    let (cpu, db0) = (d.cpu_seconds(), db_cpu());
    let t = Instant::now();
    // As `meshsign admin audit export` asks: many lines per message (a site that predates
    // `lines_per_message` sends one per message; both are read).
    let mut stream = admin
        .export_audit(meshsign_proto::v1::ExportAuditRequest {
            lines_per_message: meshsign_client::site::admin::EXPORT_LINES_PER_MESSAGE,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file).map_err(|e| e.to_string())?);
    let (mut n, mut lines) = (0u64, Vec::new());
    let every = (entries.min(max) / PROOFS as u64).max(1);
    // (With a `max`, the export stops at the end of the message that reaches it.)
    while n < max
        && let Some(m) = stream.message().await.map_err(|e| e.to_string())?
    {
        use meshsign_client::site::admin as a;
        a::write_export_message(&mut out, &m).map_err(|e| e.to_string())?;
        for line in a::export_lines(&m) {
            n += 1;
            // Any entry is proved as any other (a site loaded with as many certificates as
            // entries has no Sign entry to sample: its proofs read 0 ms when only those were).
            if n % every == 0 {
                lines.push(String::from_utf8_lossy(line).into_owned());
            }
        }
    }
    use std::io::Write as _;
    out.flush().map_err(|e| e.to_string())?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let us = |before, after| crate::per_1000(before, after, n).map_or(0.0, |ms| ms * 1000.0);
    Ok((
        n,
        Export {
            rate,
            server_cpu_us: us(cpu, d.cpu_seconds()),
            db_cpu_us: us(db0, db_cpu()),
        },
        lines,
    ))
}

/// One export's figures.
struct Export {
    /// Entries per second.
    rate: f64,
    /// The site's CPU time per entry, µs.
    server_cpu_us: f64,
    /// The database's CPU time per entry, µs (0 on sled).
    db_cpu_us: f64,
}

/// Exports the log `runs` times (the rate: their median; one export's rate swung 10–20 % from
/// run to run on this shared machine), keeps a spread sample of its lines for proofs, verifies
/// the last export as `meshsign audit verify` does (entries/s).
async fn export_and_verify(
    (d, db): (
        &Daemon,
        Option<&meshsign_certs_dev::postgres::LocalPostgres>,
    ),
    work: &Path,
    runs: usize,
    f: &mut SiteFigures,
) -> Result<Vec<String>, String> {
    let mut admin = meshsign_client::site::admin::Admin::connect(&d.client)
        .await
        .map_err(|e| e.to_string())?;
    let file = work.join("export.jsonl");
    let (mut n, mut lines) = (0, Vec::new());
    let (mut rates, mut cpus, mut db_cpus) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (count, export, sample) =
            export_once((d, db), &mut admin, &file, f.entries, export_max()).await?;
        (n, lines) = (count, sample);
        rates.push(export.rate);
        cpus.push(export.server_cpu_us);
        db_cpus.push(export.db_cpu_us);
    }
    f.export_per_s = crate::median(rates);
    f.export_server_cpu_us = crate::median(cpus);
    f.export_db_cpu_us = crate::median(db_cpus);
    let max = export_max();
    if max < u64::MAX {
        // A prefix of the log is not a verifiable export (its tail is not anchored).
        let _ = std::fs::remove_file(&file);
        return Ok(lines);
    }
    let key = admin.audit_public_key().await.map_err(|e| e.to_string())?;
    let pem = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key.public_key_der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            body.join("\n")
        )
    };
    let pem_file = work.join("audit.pem");
    std::fs::write(&pem_file, pem).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let report = meshsign_client::usecase::verify::audit_export(
        &meshsign_client::usecase::verify::AuditVerifyArgs {
            file: file.clone(),
            audit_key: pem_file,
            from_checkpoint: false,
        },
    )
    .map_err(|e| format!("audit verify: {e}"))?;
    f.verify_per_s = n as f64 / t.elapsed().as_secs_f64();
    let _ = report;
    let _ = std::fs::remove_file(&file);
    Ok(lines)
}

/// The export's growth as one ratio: the first `n` entries of each log (`n`: the small log's
/// size), exported by the big and the small site in turns (`runs` rounds, the order
/// alternating), each turn as many exports as make `turn` entries (the default, 2×10⁵, is
/// many clock ticks of the site's CPU; a whole 10⁴-entry export is three or four). Returns
/// the big site's rate and CPU per entry over the small site's (medians). The two sites'
/// exports measured apart, minutes from each other, could not tell a growth from a slower
/// minute: this machine's speed moved ~2× between runs of the same binaries (BENCHMARKS.md,
/// issue 30, session 31).
async fn export_side_by_side(
    small: &Daemon,
    big: &Daemon,
    n: u64,
    (runs, turn): (usize, u64),
    work: &Path,
) -> Result<(f64, f64), String> {
    let file = work.join("side-by-side.jsonl");
    let reps = (turn / n.max(1)).max(1);
    let (mut rates, mut cpus) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for run in 0..runs.max(1) {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let d = [small, big][i];
            let mut admin = meshsign_client::site::admin::Admin::connect(&d.client)
                .await
                .map_err(|e| e.to_string())?;
            let (cpu, t, mut total) = (d.cpu_seconds(), Instant::now(), 0);
            for _ in 0..reps {
                total += export_once((d, None), &mut admin, &file, n, n).await?.0;
            }
            rates[i].push(total as f64 / t.elapsed().as_secs_f64());
            cpus[i].push(crate::per_1000(cpu, d.cpu_seconds(), total).unwrap_or(0.0));
        }
    }
    let _ = std::fs::remove_file(&file);
    let ratio =
        |v: &[Vec<f64>; 2]| crate::median(v[1].clone()) / crate::median(v[0].clone()).max(1e-12);
    Ok((ratio(&rates), ratio(&cpus)))
}

/// `MESHSIGN_BENCH_EXPORT_MAX=N`: export only the first N entries (their rate, and the proof
/// samples, from them) and skip `audit verify`, the snapshot and the restore — for a 10⁷-entry
/// site, whose whole export (~20 GB) `audit verify` would read into memory and whose snapshot
/// the admin client would hold in memory. The figures skipped are printed as 0.
fn export_max() -> u64 {
    std::env::var("MESHSIGN_BENCH_EXPORT_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// `GetInclusionProof` for each sampled entry: p50 and p99 in ms.
async fn proofs(d: &Daemon, lines: &[String], f: &mut SiteFigures) -> Result<(), String> {
    let mut v = meshsign_client::site::verification::client(&d.client)
        .await
        .map_err(|e| e.to_string())?;
    if lines.is_empty() {
        return Err("no export line was sampled for GetInclusionProof".into());
    }
    let mut took = Vec::with_capacity(lines.len());
    for line in lines {
        let seq = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|j| j["seq"].as_u64())
            .ok_or("an export line without seq")?;
        let t = Instant::now();
        v.get_inclusion_proof(meshsign_proto::v1::GetInclusionProofRequest {
            seq,
            leaf_hash: meshsign_evidence::merkle::leaf_hash(line.as_bytes()).to_vec(),
        })
        .await
        .map_err(|s| format!("GetInclusionProof({seq}): {}", s.message()))?;
        took.push(t.elapsed());
    }
    took.sort();
    f.proof_p50_ms = crate::pct(&took, 0.5);
    f.proof_p99_ms = crate::pct(&took, 0.99);
    Ok(())
}

/// Snapshot over the admin port, then `meshsignd restore` of it into an empty folder.
async fn snapshot_restore(
    d: &Daemon,
    site_dir: &Path,
    binary: &Path,
    f: &mut SiteFigures,
) -> Result<(), String> {
    let mut admin = meshsign_client::site::admin::Admin::connect(&d.client)
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let snap = admin.snapshot().await.map_err(|e| e.to_string())?;
    f.snapshot_s = t.elapsed().as_secs_f64();
    let file = site_dir.join("bench.snapshot");
    std::fs::write(&file, &snap).map_err(|e| e.to_string())?;
    drop(snap);
    let toml = std::fs::read_to_string(site_dir.join("site.toml")).map_err(|e| e.to_string())?;
    let restored = site_dir.join("site-restore.toml");
    std::fs::write(
        &restored,
        toml.replacen("data_dir = \"data\"", "data_dir = \"data-restore\"", 1),
    )
    .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let out = std::process::Command::new(binary)
        .arg("restore")
        .arg("--config")
        .arg(&restored)
        .arg(&file)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "meshsignd restore: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    f.restore_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(site_dir.join("data-restore"));
    Ok(())
}

/// One Sign window on `d`: (ops/s, server CPU s per 1,000 Signs); also updates the peak RSS.
async fn sign_window(
    d: &Daemon,
    a: &ScaleArgs,
    tokens: &Tokens,
) -> Result<(f64, f64, f64), String> {
    let sessions = load::sessions(&d.client, tokens, a.concurrency).await?;
    let c0 = d.cpu_seconds();
    let w = load::sign(
        sessions,
        SignLoad::Sign,
        load::KEY,
        Duration::from_secs(a.duration),
    )
    .await;
    let cpu = crate::per_1000(c0, d.cpu_seconds(), w.ops).unwrap_or(0.0);
    let peak = d.rss_mib().map_or(0.0, |r| r.0);
    Ok((w.ops as f64 / w.seconds, cpu, peak))
}

/// Starts a site, stops it, loads `entries`/`certs` into it, and starts it again with a
/// metrics listener: the measured start. Then everything but the Sign windows.
async fn loaded_site(
    a: &ScaleArgs,
    entries: u64,
    certs: u64,
    name: &str,
    pg: Option<&meshsign_certs_dev::postgres::LocalPostgres>,
) -> Result<(Daemon, SiteFigures, std::net::SocketAddr), String> {
    let db = pg.map(|p| (p.url(), p.ca_file()));
    let first = Daemon::start(
        &a.binary,
        true,
        &a.log_level,
        db.as_ref().map(|(u, c)| (u.as_str(), c.as_path())),
    )?;
    let stopped = first.stop();
    let site_dir = stopped.site_dir();
    eprintln!("scale: loading {entries} entries and {certs} certificates into the {name} site…");
    let mut f = SiteFigures {
        entries,
        ..Default::default()
    };
    let rate = load_site(&site_dir, entries, certs, stopped.postgres()).await?;
    f.load_s = entries as f64 / rate.max(1.0);
    // A database a year old has been vacuumed and checkpointed as it grew (autovacuum runs
    // on inserts too): its pages carry their hint bits, its statistics are current. Loaded in
    // a minute it has had neither, and the first reads after the load would set every
    // page's hint bits (a write of each page read) beside an autovacuum of the whole table
    // — the load's cost, not the site's. Measured: BENCHMARKS.md, issue 30, session 32.
    if let Some(p) = pg {
        p.sql(&["VACUUM (ANALYZE)", "CHECKPOINT"])
            .map_err(|e| format!("vacuum after the load: {e}"))?;
    }
    // For profiling a start by hand: a copy of the loaded site, kept — and written out before
    // the start is timed: at 10⁷ entries the copy is ~11 GB, and a start whose store flush
    // waits behind its writeback measured 0.7–3.2 s against 0.12–0.19 s without it.
    if let Some(keep) = std::env::var_os("MESHSIGN_BENCH_KEEP_SITE")
        && name == "big"
    {
        let _ = std::process::Command::new("cp")
            .arg("-a")
            .arg(&site_dir)
            .arg(&keep)
            .status();
        let _ = std::process::Command::new("sync").status();
    }
    let port = free_port()?;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let (d, startup) = stopped.start(&a.binary, &a.log_level, name, |text| {
        format!("{text}\n[metrics]\nlisten = \"{metrics}\"\n")
    })?;
    f.startup_s = startup.as_secs_f64();
    // At rest means after the background read of the whole log that follows every start of an
    // embedded site (at most half a core; ~5 s at 10⁷ entries): its chunk buffers are work in
    // progress, not what the site holds. A PostgreSQL site has none. Its time is a figure of
    // its own (from spawning `meshsignd`; 0 if the line never came). A site log level that
    // hides `info` (`--site-log warn`) hides the line too: then the wait is skipped, not
    // sat out to its bound.
    let shows_info = ["info", "debug", "trace"]
        .iter()
        .any(|l| a.log_level.contains(l));
    if pg.is_none() && shows_info {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(300) {
            if d.log_contains(READ_THROUGH_LINE) {
                f.read_through_s = f.startup_s + t.elapsed().as_secs_f64();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Then the allocator's own delay: mimalloc hands freed memory back ~10 s after it was
    // freed (its arenas wait ten `purge_delay`s; measured: a site's RSS steps down ~10 s
    // after the read, then holds). Sampled earlier, the figure is the read's buffers.
    tokio::time::sleep(REST_AFTER).await;
    f.rss_rest_mib = d.rss_mib().map_or(0.0, |r| r.1);
    // The first scrape counts live certificates; the figure is the slower of two.
    let (s1, _) = scrape(metrics).await?;
    let (s2, scraped) = scrape(metrics).await?;
    f.scrape_ms = s1.max(s2).as_secs_f64() * 1000.0;
    f.live_certs = live_certs(&scraped);
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let lines = export_and_verify((&d, pg), work.path(), a.runs, &mut f).await?;
    proofs(&d, &lines, &mut f).await?;
    // A site on PostgreSQL refuses snapshots (the database's own backups are the way).
    if export_max() == u64::MAX && pg.is_none() {
        snapshot_restore(&d, &site_dir, &a.binary, &mut f).await?;
    }
    let disk = du(&site_dir.join("data")) + pg.map_or(0, |p| du(&p.path().join("data")));
    f.disk_bytes_per_entry = disk as f64 / entries.max(1) as f64;
    Ok((d, f, metrics))
}

/// The scenario; returns the JSON printed last.
pub async fn run(a: &ScaleArgs) -> Result<serde_json::Value, String> {
    // On PostgreSQL: a cluster per site, so the fresh site's database is as fresh as it is.
    let clusters = if a.postgres {
        let start = || {
            meshsign_certs_dev::postgres::LocalPostgres::start()
                .map_err(|e| format!("PostgreSQL: {e}"))
        };
        Some([start()?, start()?, start()?])
    } else {
        None
    };
    let pg = |i: usize| clusters.as_ref().map(|c| &c[i]);
    let (small, mut fs, _) = {
        let entries = a.small.0.unwrap_or(SMALL_ENTRIES);
        let certs = a.small.1.unwrap_or(1000.min(a.certs)).min(entries);
        loaded_site(a, entries, certs, "small", pg(0)).await?
    };
    let (big, mut fb, _) = loaded_site(a, a.entries, a.certs, "big", pg(1)).await?;
    let fresh_db = pg(2).map(|p| (p.url(), p.ca_file()));
    let fresh = Daemon::start(
        &a.binary,
        true,
        &a.log_level,
        fresh_db.as_ref().map(|(u, c)| (u.as_str(), c.as_path())),
    )?;
    let tokens = Tokens::new(&fresh.client)?;
    let (mut fresh_ops, mut fresh_cpu) = (Vec::new(), Vec::new());
    for run in 0..a.runs.max(1) {
        // Alternate the order, so neither site always runs on a warmer machine.
        let order: [(&Daemon, bool); 2] = if run % 2 == 0 {
            [(&fresh, true), (&big, false)]
        } else {
            [(&big, false), (&fresh, true)]
        };
        for (d, is_fresh) in order {
            let tokens = if is_fresh {
                tokens.clone()
            } else {
                Tokens::new(&d.client)?
            };
            let (ops, cpu, peak) = sign_window(d, a, &tokens).await?;
            if is_fresh {
                fresh_ops.push(ops);
                fresh_cpu.push(cpu);
            } else {
                fb.sign_ops.push(ops);
                fb.sign_cpu.push(cpu);
                fb.rss_load_mib = fb.rss_load_mib.max(peak);
            }
        }
    }
    let (_, _, peak) = sign_window(&small, a, &Tokens::new(&small.client)?).await?;
    fs.rss_load_mib = peak;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (export_ratio, export_cpu_ratio) = export_side_by_side(
        &small,
        &big,
        fs.entries,
        (a.runs, a.export_turn),
        work.path(),
    )
    .await?;
    let med = |v: &[f64]| crate::median(v.to_vec());
    let row = |name: &str, f: &SiteFigures| {
        println!(
            "{name:>6} {:>10} entries: load {:.0} s, start {:.2} s (log read through {:.1} s), RSS rest {:.1} MiB / load {:.1} MiB, {} live certificates, scrape {:.1} ms, proof p50 {:.2} ms p99 {:.2} ms, export {:.0}/s ({:.2} µs site CPU/entry, {:.2} µs database), verify {:.0}/s, snapshot {:.2} s, restore {:.2} s, {:.0} B/entry",
            f.entries,
            f.load_s,
            f.startup_s,
            f.read_through_s,
            f.rss_rest_mib,
            f.rss_load_mib,
            f.live_certs,
            f.scrape_ms,
            f.proof_p50_ms,
            f.proof_p99_ms,
            f.export_per_s,
            f.export_server_cpu_us,
            f.export_db_cpu_us,
            f.verify_per_s,
            f.snapshot_s,
            f.restore_s,
            f.disk_bytes_per_entry
        );
    };
    row("small", &fs);
    row("big", &fb);
    let (big_ops, fresh_o) = (med(&fb.sign_ops), med(&fresh_ops));
    println!(
        "  Sign @{}: big {:.0}/s ({:.3} s CPU/1k), fresh {:.0}/s ({:.3} s CPU/1k), ratio {:.2} (medians of {})",
        a.concurrency,
        big_ops,
        med(&fb.sign_cpu),
        fresh_o,
        med(&fresh_cpu),
        big_ops / fresh_o.max(1e-9),
        a.runs.max(1)
    );
    println!(
        "  export of the first {} entries, sites in turns: big ÷ small rate {export_ratio:.2}, \
         site CPU per entry {export_cpu_ratio:.2} (medians of {})",
        fs.entries,
        a.runs.max(1)
    );
    Ok(serde_json::json!({
        "scenario": "scale",
        "store": if a.postgres { "postgres" } else { "sled" },
        "entries": fb.entries,
        "certs": a.certs,
        "small_entries": fs.entries,
        "small_certs": a.small.1.unwrap_or(1000.min(a.certs)).min(fs.entries),
        "load_entries_per_s": fb.entries as f64 / fb.load_s.max(1e-9),
        "startup_s": fb.startup_s,
        "startup_small_s": fs.startup_s,
        "read_through_s": fb.read_through_s,
        "rss_rest_mib": fb.rss_rest_mib,
        "rss_rest_small_mib": fs.rss_rest_mib,
        "rss_ratio_to_small": fb.rss_rest_mib / fs.rss_rest_mib.max(1e-9),
        "rss_load_mib": fb.rss_load_mib,
        "sign_ops_per_s": big_ops,
        "fresh_sign_ops_per_s": fresh_o,
        "sign_ratio_to_fresh": big_ops / fresh_o.max(1e-9),
        "server_cpu_s_per_1000": med(&fb.sign_cpu),
        "fresh_server_cpu_s_per_1000": med(&fresh_cpu),
        "proof_p50_ms": fb.proof_p50_ms,
        "proof_p99_ms": fb.proof_p99_ms,
        "proof_p99_small_ms": fs.proof_p99_ms,
        "export_entries_per_s": fb.export_per_s,
        "export_server_cpu_us_per_entry": fb.export_server_cpu_us,
        "export_server_cpu_us_per_entry_small": fs.export_server_cpu_us,
        "export_db_cpu_us_per_entry": fb.export_db_cpu_us,
        "export_ratio_to_small": export_ratio,
        "export_cpu_ratio_to_small": export_cpu_ratio,
        "verify_entries_per_s": fb.verify_per_s,
        "snapshot_s": fb.snapshot_s,
        "snapshot_small_s": fs.snapshot_s,
        "restore_s": fb.restore_s,
        "restore_small_s": fs.restore_s,
        "scrape_ms": fb.scrape_ms,
        "scrape_small_ms": fs.scrape_ms,
        "live_certs": fb.live_certs,
        "live_certs_small": fs.live_certs,
        "disk_bytes_per_entry": fb.disk_bytes_per_entry,
        "runs": a.runs.max(1),
    }))
}
