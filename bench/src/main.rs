//! `meshsign-bench`: drives a real site on loopback over mutual TLS from N concurrent
//! connections, and runs the same signing code in-process in the same run, so figures are
//! ratios measured side by side (this machine is shared and noisy).
//!
//! ```text
//! cargo run --release -p meshsign-bench -- --scenario sign --concurrency 64 --duration 5 --runs 3
//! cargo run --release -p meshsign-bench -- --scenario sign --concurrency 64 --compare-durability --runs 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

mod openbao;
use meshsign_proto::v1;
use meshsign_server::audit::AuditSettings;
use meshsign_tests::TestSite;

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
    /// Skip the in-process baseline (e.g. to profile only the service).
    #[arg(long)]
    no_in_process: bool,
    /// Also drive OpenBao's transit engine (`bao server -dev` on 127.0.0.1) in the same run.
    #[arg(long)]
    vs_openbao: bool,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Scenario {
    /// Unary Sign of a SHA-256 digest.
    Sign,
    /// SignBatch of --batch digests (ops = signatures).
    Batch,
    /// Enroll: a new TLS connection, a new token and a new CSR each time.
    Enroll,
}

struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn service(cli: &Cli, durable: bool) -> Measured {
    let settings = AuditSettings {
        durable,
        ..AuditSettings::default()
    };
    let site = TestSite::start_with_settings("", None, settings).await;
    if matches!(cli.scenario, Scenario::Enroll) {
        return enroll_load(cli, site).await;
    }
    let mut signers = Vec::new();
    for _ in 0..cli.concurrency {
        signers.push(site.enrolled("production").await.2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (scenario, batch) = (cli.scenario, cli.batch);
    let mut tasks = Vec::new();
    for (i, mut s) in signers.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut ops = 0u64;
            let digest = vec![(i % 251) as u8; 32];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = match scenario {
                    Scenario::Sign => s
                        .sign(v1::SignRequest {
                            key_alias: "release".into(),
                            input: Some(v1::sign_request::Input::Sha256Digest(digest.clone())),
                            artifact_name: String::new(),
                            algorithm: String::new(),
                        })
                        .await
                        .is_ok(),
                    Scenario::Batch => s
                        .sign_batch(v1::SignBatchRequest {
                            key_alias: "release".into(),
                            sha256_digests: vec![digest.clone(); batch],
                            artifact_name: String::new(),
                            algorithm: String::new(),
                        })
                        .await
                        .is_ok(),
                    Scenario::Enroll => false,
                };
                if ok {
                    lat.push(t.elapsed());
                    ops += if matches!(scenario, Scenario::Batch) {
                        batch as u64
                    } else {
                        1
                    };
                }
            }
            (ops, lat)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(cli.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok((o, l)) = t.await {
            ops += o;
            lat.extend(l);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    site.handle.shutdown().await;
    Measured {
        ops_per_sec: ops as f64 / secs,
        p50_ms: pct(&lat, 0.5),
        p90_ms: pct(&lat, 0.9),
        p99_ms: pct(&lat, 0.99),
    }
}

/// Enrollment load: each op opens a new TLS connection with a fresh token and CSR.
async fn enroll_load(cli: &Cli, site: TestSite) -> Measured {
    let site = Arc::new(site);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..cli.concurrency {
        let (site, stop) = (site.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ops, mut lat) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let Ok(key) = meshsign_client::runner::RunnerKey::generate() else {
                    break;
                };
                let req = site.enroll_request("production", site.token("production"), &key);
                if site.enrollment().await.enroll(req).await.is_ok() {
                    ops += 1;
                    lat.push(t.elapsed());
                }
            }
            (ops, lat)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(cli.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut lat) = (0, Vec::new());
    for t in tasks {
        if let Ok((o, l)) = t.await {
            ops += o;
            lat.extend(l);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    if let Ok(site) = Arc::try_unwrap(site) {
        site.handle.shutdown().await;
    }
    Measured {
        ops_per_sec: ops as f64 / secs,
        p50_ms: pct(&lat, 0.5),
        p90_ms: pct(&lat, 0.9),
        p99_ms: pct(&lat, 0.99),
    }
}

/// The same signing code, no network: the site's key backend, one thread per core.
async fn in_process(cli: &Cli) -> f64 {
    let site = TestSite::start().await;
    let key = site.state().keys().active("production", "release").cloned();
    site.handle.shutdown().await;
    let Some(key) = key else { return 0.0 };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let dur = Duration::from_secs(cli.duration);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let backend = key.backend.clone();
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

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let mut rows: Vec<(bool, Measured)> = Vec::new();
    let mut inproc = Vec::new();
    let bao = if cli.vs_openbao {
        match openbao::start().await {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("openbao: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    let mut bao_ops = Vec::new();
    let mut bao_p99 = Vec::new();
    for run in 0..cli.runs {
        inproc.push(if cli.no_in_process {
            0.0
        } else {
            in_process(&cli).await
        });
        if let Some(b) = &bao {
            let batch = matches!(cli.scenario, Scenario::Batch).then_some(cli.batch);
            let (ops, lat) =
                openbao::load(b, cli.concurrency, Duration::from_secs(cli.duration), batch).await;
            eprintln!(
                "run {run}: openbao transit {:?} c={} {ops:.0} ops/s p99 {:.2} ms",
                cli.scenario,
                cli.concurrency,
                pct(&lat, 0.99)
            );
            bao_ops.push(ops);
            bao_p99.push(pct(&lat, 0.99));
        }
        let modes: Vec<bool> = if cli.compare_durability {
            if run % 2 == 0 {
                vec![true, false]
            } else {
                vec![false, true]
            }
        } else {
            vec![!cli.no_durable_audit]
        };
        for durable in modes {
            let m = service(&cli, durable).await;
            eprintln!(
                "run {run}: {:?} durable={durable} c={} {:.0} ops/s p50 {:.2} ms p99 {:.2} ms (in-process {:.0}/s)",
                cli.scenario, cli.concurrency, m.ops_per_sec, m.p50_ms, m.p99_ms, inproc[run]
            );
            rows.push((durable, m));
        }
    }
    let in_process_ops = median(inproc);
    let openbao_ops = (!bao_ops.is_empty()).then(|| median(bao_ops.clone()));
    let openbao_p99 = (!bao_p99.is_empty()).then(|| median(bao_p99.clone()));
    let summarize = |durable: bool| {
        let rs: Vec<&Measured> = rows
            .iter()
            .filter(|(d, _)| *d == durable)
            .map(|(_, m)| m)
            .collect();
        let ops = median(rs.iter().map(|m| m.ops_per_sec).collect());
        let mut j = serde_json::json!({
            "scenario": format!("{:?}", cli.scenario).to_lowercase(),
            "concurrency": cli.concurrency,
            "durable_audit": durable,
            "runs": rs.len(),
            "duration_s": cli.duration,
            "ops_per_sec": ops.round(),
            "p50_ms": median(rs.iter().map(|m| m.p50_ms).collect()),
            "p90_ms": median(rs.iter().map(|m| m.p90_ms).collect()),
            "p99_ms": median(rs.iter().map(|m| m.p99_ms).collect()),
            "in_process_ops_per_sec": in_process_ops.round(),
            "ratio_to_in_process": (in_process_ops > 0.0).then(|| ops / in_process_ops),
        });
        if let Some(b) = openbao_ops {
            j["openbao_ops_per_sec"] = b.round().into();
            j["openbao_p99_ms"] = openbao_p99.unwrap_or(0.0).into();
            j["ratio_to_openbao"] = (ops / b.max(1.0)).into();
        }
        j
    };
    if cli.compare_durability {
        let (d, n) = (summarize(true), summarize(false));
        let ratio = d["ops_per_sec"].as_f64().unwrap_or(0.0)
            / n["ops_per_sec"].as_f64().unwrap_or(1.0).max(1.0);
        println!(
            "{}",
            serde_json::json!({ "durable": d, "no_flush": n, "durable_to_no_flush": ratio })
        );
    } else {
        println!("{}", summarize(!cli.no_durable_audit));
    }
}
