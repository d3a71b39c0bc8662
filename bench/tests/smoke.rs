//! The benchmark itself works: it starts the real `meshsignd`, drives it, and reports every
//! figure the benchmarks issue asks for, read from the daemon's own process. Short runs of a
//! debug build — a smoke test of the tool, not a measurement.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let exe = env!("CARGO_BIN_EXE_meshsign-bench");
    // meshsignd is built into the same target folder by `cargo test --workspace`; say where,
    // in case only this package's tests are run.
    let meshsignd = std::path::Path::new(exe).with_file_name("meshsignd");
    assert!(
        meshsignd.is_file(),
        "{} missing: run `cargo build -p meshsign-server` first",
        meshsignd.display()
    );
    let out = Command::new(exe)
        .args(args)
        .args(["--duration", "1", "--runs", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last line printed is the JSON object (`scale` prints a table before it).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `--scenario scale` with `args` and the small site, export turn and load both tests use.
fn scale(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--scenario", "scale"];
    all.extend_from_slice(args);
    all.extend([
        "--small-entries",
        "1000",
        "--small-certs",
        "600",
        "--export-turn",
        "2000",
        "--concurrency",
        "2",
    ]);
    bench(&all)
}

fn positive(j: &serde_json::Value, field: &str) -> f64 {
    let v = j[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {j}"));
    assert!(v > 0.0, "{field} = {v} in {j}");
    v
}

#[test]
fn sign_and_batch_report_throughput_latency_server_cost_and_the_in_process_limit() {
    for (scenario, extra) in [("sign", vec![]), ("batch", vec!["--batch", "20"])] {
        let mut args = vec!["--scenario", scenario, "--concurrency", "2"];
        args.extend(extra);
        let j = bench(&args);
        assert_eq!(j["scenario"], scenario);
        assert_eq!(j["concurrency"], 2);
        assert_eq!(j["errors"], 0, "{j}");
        let ops = positive(&j, "ops_per_sec");
        let limit = positive(&j, "in_process_ops_per_sec");
        let ratio = positive(&j, "ratio_to_in_process");
        // ops_per_sec is rounded to a whole number in the JSON; the ratio is not.
        assert!((ratio - ops / limit).abs() <= 1.0 / limit, "{j}");
        let (p50, p99) = (positive(&j, "p50_ms"), positive(&j, "p99_ms"));
        assert!(p50 <= p99, "{j}");
        positive(&j, "server_cpu_s_per_1000_ops");
        positive(&j, "server_peak_rss_mib");
    }
}

#[test]
fn sign_against_openbao_reports_cpu_per_signature_for_both_of_its_shapes() {
    // OpenBao as the issue measured it (dev: plain HTTP, no audit) and shaped as a site (TLS,
    // a file audit device), each driven in the same run as the site.
    let j = bench(&[
        "--scenario",
        "sign",
        "--concurrency",
        "2",
        "--no-in-process",
        "--vs-openbao",
        "--openbao-tls-audit",
    ]);
    assert_eq!(j["errors"], 0, "{j}");
    let site = positive(&j, "server_cpu_s_per_1000_ops");
    for p in ["openbao", "openbao_tls_audit"] {
        positive(&j, &format!("{p}_ops_per_sec"));
        let cpu = positive(&j, &format!("{p}_server_cpu_s_per_1000_ops"));
        let ratio = positive(&j, &format!("server_cpu_ratio_to_{p}"));
        assert!((ratio - site / cpu).abs() < 1e-9, "{j}");
    }
    // The site-shaped peer wrote an audit record for its requests; the dev one has no device.
    positive(&j, "openbao_tls_audit_audit_log_bytes");
    assert!(j.get("openbao_audit_log_bytes").is_none(), "{j}");
}

#[test]
fn enroll_counts_every_enrollment_on_the_site() {
    let j = bench(&[
        "--scenario",
        "enroll",
        "--concurrency",
        "2",
        "--no-in-process",
    ]);
    assert_eq!(j["errors"], 0, "{j}");
    let ops = positive(&j, "ops_per_sec");
    let total = positive(&j, "enrollments_on_site");
    assert!(total >= ops * 0.5, "{j}");
    positive(&j, "server_peak_rss_mib");
}

#[test]
fn scale_reports_every_figure_of_a_loaded_site() {
    // As many certificates as entries: every entry is an enrollment's, none a Sign. The proofs
    // are still measured (a sample of Sign entries only found none, and read 0 ms).
    let j = scale(&["--entries", "3000", "--certs", "3000"]);
    assert_eq!(j["scenario"], "scale");
    assert_eq!(j["entries"], 3000, "{j}");
    for field in [
        "startup_s",
        "rss_rest_mib",
        "rss_ratio_to_small",
        "sign_ratio_to_fresh",
        "proof_p50_ms",
        "proof_p99_ms",
        "proof_p99_small_ms",
        "export_entries_per_s",
        // 3,000 entries of a debug build's site: many clock ticks of CPU.
        "export_server_cpu_us_per_entry",
        // The side-by-side exports: the first 1,000 entries, twice a turn.
        "export_ratio_to_small",
        "export_cpu_ratio_to_small",
        "verify_entries_per_s",
        "snapshot_s",
        "restore_s",
        "scrape_ms",
        "disk_bytes_per_entry",
    ] {
        positive(&j, field);
    }
    assert!(
        j["proof_p50_ms"].as_f64() <= j["proof_p99_ms"].as_f64(),
        "{j}"
    );
    // The last 500 certificates of each loaded history are live at rest, and the scrape says so.
    assert_eq!(j["live_certs"], 500, "{j}");
    assert_eq!(j["live_certs_small"], 500, "{j}");
}

/// The scale scenario on PostgreSQL (a cluster per site, started by the bench on loopback):
/// the load, the vacuum after it, and the figures, the database's CPU per exported entry
/// among them (10⁴ entries: a few clock ticks of the backends' CPU).
#[test]
fn scale_on_postgres_reports_the_database_s_share_of_the_export() {
    let j = scale(&[
        "--store",
        "postgres",
        "--entries",
        "10000",
        "--certs",
        "600",
    ]);
    assert_eq!(j["store"], "postgres", "{j}");
    assert_eq!(j["entries"], 10000, "{j}");
    for field in [
        "startup_s",
        "rss_ratio_to_small",
        "sign_ratio_to_fresh",
        "proof_p99_ms",
        "export_entries_per_s",
        "export_server_cpu_us_per_entry",
        "export_db_cpu_us_per_entry",
        "verify_entries_per_s",
        "disk_bytes_per_entry",
    ] {
        positive(&j, field);
    }
    assert_eq!(j["live_certs"], 500, "{j}");
}
