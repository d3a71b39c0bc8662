//! How `meshsign admin` shows what a site answered ([`Output`]): one table or JSON document,
//! with a SITE and REGION column for `--all-sites`. The verbs themselves are
//! [`meshsign_client::usecase::admin`].

use meshsign_client::ClientError;
use meshsign_client::usecase::admin::{KidDiff, Output, rule_count};
use meshsign_client::usecase::drill::DrillReport;
use meshsign_client::usecase::fleet::{Fleet, SiteResult};
use meshsign_evidence::pem_encode;
use meshsign_proto::v1;

use super::render::*;

/// Prints what one site answered.
pub async fn render(output: Output, format: Format) -> Result<(), ClientError> {
    match output {
        Output::Drills { results, max_ms } => return report_drills(results, format, max_ms, false),
        Output::Fleet(_) => {
            return Err(ClientError::Usage("a fleet report needs its fleet".into()));
        }
        Output::Export(stream, _follow) => return export(stream).await,
        Output::Issuers(l) => emit(format, &l),
        Output::Policies(l) => emit(format, &l),
        Output::Keys(l) => emit(format, &l),
        Output::Revocations(l) => emit(format, &l),
        Output::Runners(l) => emit(format, &l),
        Output::Runner(r) => emit_one(format, &r),
        Output::Proposals(l) => emit(format, &l),
        Output::Issuer(i) => emit_one(format, &i),
        Output::Policy(p) => emit_one(format, &p),
        Output::Key(k) => emit_one(format, &k),
        Output::Distrust(list) => {
            if format == Format::Table {
                eprintln!(
                    "distrust list of `{}` at `{}`: version {}",
                    list.environment, list.region, list.version
                );
            }
            emit(format, &list.entries);
        }
        other => single(&other, format),
    }
    Ok(())
}

/// Prints what every site of the fleet answered; fails if any site failed.
pub fn render_fleet(fleet: &Fleet, output: Output, format: Format) -> Result<(), ClientError> {
    match output {
        Output::Drills { results, max_ms } => report_drills(results, format, max_ms, true),
        Output::Fleet(results) => fleet_report(fleet, results, format),
        other => {
            single(&other, format);
            Ok(())
        }
    }
}

/// Outputs shown as one table or JSON object, or as PEM with a note on stderr.
fn single(output: &Output, format: Format) {
    match (output, format) {
        (Output::AuditKey(k), Format::Table) => {
            eprintln!("# audit key {}", k.key_id);
            out_raw!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
        }
        (Output::Csr(csr), Format::Table) => {
            eprintln!("# CSR for {}", csr.key_id);
            out_raw!("{}", csr.csr_pem);
        }
        (Output::Snapshot(n, path), _) => {
            eprintln!("snapshot: {n} bytes -> {}", path.display());
        }
        (Output::Status(st), Format::Table) => print_status(st),
        (Output::Usage(u), Format::Table) => print_usage(u),
        (o, Format::Table) => {
            let (header, rows, _) = table(o);
            out!("{}", header.join("\t"));
            for row in rows {
                out!("{}", row.join("\t"));
            }
            review_hint(o);
        }
        (o, Format::Json) => print_json(&table(o).2),
    }
}

/// What a second admin does next after `review propose-config` or `review approve`.
fn review_hint(o: &Output) {
    match o {
        Output::Proposed(p) => eprintln!(
            "proposed; another admin runs `meshsign admin review approve {}` before {}, then \
             SIGHUP applies the file",
            p.id,
            when(p.expires_at)
        ),
        Output::Approved(p) => eprintln!(
            "approved; `{}` now repeats the command before {}",
            p.proposer,
            when(p.expires_at)
        ),
        _ => {}
    }
}

/// An output's header, rows and JSON.
fn table(o: &Output) -> (&'static [&'static str], Vec<Vec<String>>, serde_json::Value) {
    fn one<T: Render>(t: &T) -> (&'static [&'static str], Vec<Vec<String>>, serde_json::Value) {
        (T::HEADER, vec![t.row()], t.json())
    }
    match o {
        Output::Status(st) => (STATUS_HEADER, status_rows(st), status_json(st)),
        Output::Revoked(r) => (REVOKE_HEADER, vec![revoke_row(r)], revoke_json(r)),
        Output::Policy(p) => one(p),
        Output::Issuer(i) => one(i),
        Output::Runner(r) => one(r),
        Output::Runners(l) => (
            v1::RunnerInfo::HEADER,
            l.iter().map(Render::row).collect(),
            l.iter().map(Render::json).collect(),
        ),
        Output::Key(k) => one(k),
        Output::Proposed(p) | Output::Approved(p) => one(p),
        Output::JwksDiff(d) => (JWKS_DIFF_HEADER, vec![jwks_diff_row(d)], jwks_diff_json(d)),
        Output::DistrustAdded(l) => (
            &["LIST VERSION", "RULES"],
            vec![vec![l.version.to_string(), rule_count(l)]],
            serde_json::json!({ "version": l.version, "rules": rule_count(l) }),
        ),
        Output::Retention(days) => (
            &["RETENTION DAYS"],
            vec![vec![days.to_string()]],
            serde_json::json!({ "retention_days": days }),
        ),
        Output::AuditKey(k) => (
            &[],
            vec![],
            serde_json::json!({
                "key_id": k.key_id,
                "public_key_pem": pem_encode("PUBLIC KEY", &k.public_key_der),
            }),
        ),
        Output::Csr(csr) => (
            &[],
            vec![],
            serde_json::json!({ "key_id": csr.key_id, "csr_pem": csr.csr_pem }),
        ),
        Output::Usage(u) => (&[], vec![], usage_json(u)),
        _ => (&[], vec![], serde_json::Value::Null),
    }
}

/// `admin usage` as JSON.
fn usage_json(u: &v1::JobUsage) -> serde_json::Value {
    serde_json::json!({
        "environment": u.environment,
        "job_id": u.job_id,
        "keys": u.keys.iter().map(|k| serde_json::json!({
            "key_alias": k.key_alias,
            "total": k.total,
            "per_job_budget": k.per_job_budget,
            "per_certificate_budget": k.per_certificate_budget,
            "by_certificate": k.by_certificate,
        })).collect::<Vec<_>>(),
    })
}

/// `admin usage` as a table: a row per key, then one per certificate that signed with it.
fn print_usage(u: &v1::JobUsage) {
    let limit = |b: Option<u64>| b.map_or("unlimited".to_string(), |b| b.to_string());
    out!("KEY\tSIGNATURES\tJOB BUDGET\tCERTIFICATE\tSIGNATURES\tCERTIFICATE BUDGET");
    for k in &u.keys {
        out!(
            "{}\t{}\t{}\t-\t-\t{}",
            k.key_alias,
            k.total,
            limit(k.per_job_budget),
            limit(k.per_certificate_budget)
        );
        for (serial, n) in &k.by_certificate {
            out!("{}\t-\t-\t{serial}\t{n}\t-", k.key_alias);
        }
    }
}

/// `admin audit export`: always JSON lines (the export format is the verifiable one), written
/// through one buffer. The lines that have arrived go out in large writes, and what is buffered
/// is flushed whenever the next line is not there yet: a followed export shows each entry as it
/// comes (`--follow` needs nothing of its own), and a bulk export is not one `write(2)` per
/// line (stdout is line-buffered: 10⁶ lines were 10⁶ system calls, ~11 % of the client's CPU,
/// measured with `perf`).
async fn export(mut stream: tonic::Streaming<v1::ExportLine>) -> Result<(), ClientError> {
    use std::io::Write as _;
    use std::task::Poll;
    crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
    let stdout = |source| ClientError::Io {
        path: "stdout".into(),
        source,
    };
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    loop {
        let mut next = std::pin::pin!(stream.message());
        let ready = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
        let message = match ready {
            Poll::Ready(m) => m,
            Poll::Pending => {
                out.flush().map_err(stdout)?;
                next.await
            }
        };
        let Some(m) = message.map_err(|s| ClientError::rpc("ExportAudit", s))? else {
            break;
        };
        meshsign_client::site::admin::write_export_message(&mut out, &m).map_err(stdout)?;
    }
    out.flush().map_err(stdout)
}

const JWKS_DIFF_HEADER: &[&str] = &["ADDED", "REMOVED", "KEPT"];

fn jwks_diff_row(d: &KidDiff) -> Vec<String> {
    let join = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    vec![join(&d.0), join(&d.1), join(&d.2)]
}

fn jwks_diff_json(d: &KidDiff) -> serde_json::Value {
    serde_json::json!({"added": d.0, "removed": d.1, "kept": d.2})
}

const REVOKE_HEADER: &[&str] = &["RULE", "MATCHED", "SERIALS"];

fn revoke_row(r: &v1::RevokeResponse) -> Vec<String> {
    vec![
        r.rule_id.clone(),
        r.serials.len().to_string(),
        if r.serials.is_empty() {
            "-".into()
        } else {
            r.serials.join(",")
        },
    ]
}

fn revoke_json(r: &v1::RevokeResponse) -> serde_json::Value {
    serde_json::json!({ "rule_id": r.rule_id, "serials": r.serials })
}

impl Render for meshsign_evidence::distrust::DistrustEntry {
    const HEADER: &'static [&'static str] = &[
        "RULE", "JOB", "PIPELINE", "RUNNER", "REGION", "KEY", "FROM", "BEFORE", "REASON", "BY",
    ];
    fn row(&self) -> Vec<String> {
        let t = |t: Option<i64>| {
            t.map(meshsign_evidence::attest::rfc3339)
                .unwrap_or_else(|| "-".into())
        };
        vec![
            self.id.clone(),
            dash(&self.job_id),
            dash(&self.pipeline_id),
            dash(&self.runner_fingerprint),
            dash(&self.region),
            dash(&self.key_id),
            t(self.not_before),
            t(self.not_after),
            dash(&self.reason),
            self.added_by.clone(),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One table (or JSON array) for a fleet command: a SITE and REGION column before the
/// command's own; a site that failed gets one row with its error. Exit non-zero if any did.
fn fleet_report(
    fleet: &Fleet,
    results: Vec<SiteResult<Output>>,
    format: Format,
) -> Result<(), ClientError> {
    let header = results
        .iter()
        .find_map(|(_, r)| r.as_ref().ok())
        .map_or(&[][..], |o| table(o).0);
    let region = |name: &str| {
        fleet
            .sites
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.region.clone())
            .unwrap_or_default()
    };
    let mut failed = Vec::new();
    let mut json = Vec::new();
    if format == Format::Table {
        out!("SITE\tREGION\t{}", header.join("\t"));
    }
    for (site, r) in &results {
        let region = region(site);
        match r {
            Ok(v) => {
                let (_, rows, j) = table(v);
                for row in rows {
                    if format == Format::Table {
                        out!("{site}\t{region}\t{}", row.join("\t"));
                    }
                }
                json.push(serde_json::json!({ "site": site, "region": region, "result": j }));
            }
            Err(e) => {
                if format == Format::Table {
                    out!("{site}\t{region}\tERROR: {e}");
                }
                json.push(
                    serde_json::json!({ "site": site, "region": region, "error": e.to_string() }),
                );
                failed.push(site.clone());
            }
        }
    }
    if format == Format::Json {
        print_json(&serde_json::Value::Array(json));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(meshsign_client::usecase::fleet::failure(&failed, &results))
    }
}

const DRILL_HEADER: &[&str] = &[
    "POLICY",
    "ISSUER",
    "SIGN REFUSED (ms)",
    "ENROLL REFUSED (ms)",
    "RESTORED",
    "RESULT",
];

/// Prints drill results (one row per site) and fails if any site failed, took longer than
/// `max_ms`, or did not recover.
fn report_drills(
    results: Vec<SiteResult<DrillReport>>,
    format: Format,
    max_ms: u64,
    fleet: bool,
) -> Result<(), ClientError> {
    let bound = std::time::Duration::from_millis(max_ms);
    let mut bad = Vec::new();
    let mut json = Vec::new();
    if format == Format::Table {
        let first = if fleet { "SITE" } else { "REGION" };
        out!("{first}\t{}", DRILL_HEADER.join("\t"));
    }
    for (site, r) in &results {
        match r {
            Ok(d) => {
                let ok = d.passed(bound);
                if !ok {
                    bad.push(site.clone());
                }
                let (sign, enroll) = (
                    d.sign_refused_after.as_secs_f64() * 1000.0,
                    d.enroll_refused_after.as_secs_f64() * 1000.0,
                );
                if format == Format::Table {
                    out!(
                        "{site}\t{}\t{}\t{sign:.1}\t{enroll:.1}\t{}\t{}",
                        d.policy,
                        d.issuer,
                        if d.restored { "yes" } else { "NO" },
                        if ok { "ok" } else { "FAIL" }
                    );
                }
                json.push(serde_json::json!({
                    "site": site, "policy": d.policy, "issuer": d.issuer,
                    "sign_refused_ms": sign, "enroll_refused_ms": enroll,
                    "restored": d.restored, "within_bound": d.worst() <= bound, "ok": ok,
                }));
            }
            Err(e) => {
                bad.push(site.clone());
                if format == Format::Table {
                    out!("{site}\tERROR: {e}");
                }
                json.push(serde_json::json!({ "site": site, "error": e.to_string(), "ok": false }));
            }
        }
    }
    if format == Format::Json {
        print_json(&serde_json::Value::Array(json));
    }
    meshsign_client::usecase::drill::verdict(&bad, max_ms)
}
