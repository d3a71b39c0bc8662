//! `GET /metrics` for Prometheus on its own listener (`[metrics] listen`, off when absent): the
//! counters of `crate::metrics`, plus gauges read from the state at scrape time — audit head
//! and last checkpoint, revocation rules, when the server certificate and each runner CA
//! expire and when each key was made (base units: `*_timestamp_seconds`), the configured
//! limits, `meshsign_build_info` and the standard `process_*` series. `/healthz` (live) and
//! `/readyz` (the audit log takes writes) answer on the same listener.
//!
//! Owns: the HTTP listener and the gauges. Must not touch: anything a scrape could change. The
//! listener is plain HTTP/1.1 and unauthenticated (what Prometheus expects): bind it to loopback
//! or a management network. Requests are bounded (16 connections, 5 s to send a request, one
//! path), so it cannot be used to exhaust the site.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::state::SiteState;

/// Connections the metrics listener serves at once.
const MAX_CONNECTIONS: usize = 16;

/// A certificate's notAfter, Unix seconds (Prometheus' base unit for "when": alert rules
/// subtract `time()`).
fn not_after(cert_der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The build: `meshsign_build_info{version,commit} 1` (commit from `git` at build time, or
/// `MESHSIGN_COMMIT`; `unknown` when built outside a checkout).
fn build_info(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP meshsign_build_info The meshsignd build: version and commit.\n# TYPE meshsign_build_info gauge\nmeshsign_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        label(env!("MESHSIGN_COMMIT"))
    );
}

/// The standard `process_*` series (as the Prometheus client libraries export them), read from
/// `/proc/self` at scrape time; nothing where there is no procfs.
fn process_metrics(out: &mut String) {
    // /proc reports CPU times in USER_HZ ticks: 100 per second, fixed by the kernel's ABI on
    // every architecture meshsignd builds for (x86_64, aarch64; only Alpha used 1024), whatever
    // the kernel's internal HZ. So no sysconf(_SC_CLK_TCK) call (and no unsafe) is needed.
    const TICKS: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may hold spaces): state is field 3.
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let mut series = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    };
    series(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        field(14).zip(field(15)).map(|(u, s)| (u + s) / TICKS),
    );
    let kib = |key: &str| {
        std::fs::read_to_string("/proc/self/status")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .map(|k| k * 1024.0)
    };
    series(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        kib("VmRSS:"),
    );
    series(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        field(23),
    );
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    series(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        boot.zip(field(22)).map(|(b, t)| b + t / TICKS),
    );
    series(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64),
    );
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        });
    series(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds,
    );
}

fn label(v: &str) -> String {
    v.chars()
        .take(64)
        .collect::<String>()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How long a count of live certificates is reused: counting reads each live certificate's
/// record (from the expiry index: the live population, not every certificate ever issued).
const LIVE_CACHE: Duration = Duration::from_secs(30);

/// Certificates per environment that are neither expired nor revoked (by their holder, a
/// renewal, or a revocation rule), counted from the store at most every [`LIVE_CACHE`].
fn live_certificates(state: &SiteState, now: i64) -> Vec<(String, u64)> {
    let mut cache = state
        .metrics
        .live_certificates
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((at, v)) = cache.as_ref()
        && at.elapsed() < LIVE_CACHE
    {
        return v.clone();
    }
    let Ok(all) = state.live_certificates() else {
        return cache.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
    };
    let rules = state.revocations();
    let mut by_env: std::collections::BTreeMap<String, u64> = state
        .config()
        .environments
        .iter()
        .map(|e| (e.name.clone(), 0))
        .collect();
    for c in all
        .iter()
        .filter(|c| c.not_after > now && c.revoked.is_none() && !c.superseded)
        .filter(|c| !rules.iter().any(|r| r.matches(c)))
    {
        *by_env.entry(c.environment.clone()).or_default() += 1;
    }
    let v: Vec<(String, u64)> = by_env.into_iter().collect();
    *cache = Some((std::time::Instant::now(), v.clone()));
    v
}

/// The whole scrape.
pub fn render(state: &SiteState) -> String {
    let now = state.clock.unix();
    let mut out = String::with_capacity(8192);
    state.metrics.render(&mut out);
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        &mut out,
        "meshsign_audit_head_seq",
        "Seq of the last audit entry this site wrote.",
    );
    let _ = writeln!(
        out,
        "meshsign_audit_head_seq {}",
        *state.audit.head().borrow()
    );
    gauge(
        &mut out,
        "meshsign_audit_last_checkpoint_timestamp_seconds",
        "When this process signed its last audit checkpoint (Unix seconds; absent until the first).",
    );
    let last = state
        .metrics
        .last_checkpoint_unix
        .load(std::sync::atomic::Ordering::Relaxed);
    if last > 0 {
        let _ = writeln!(
            out,
            "meshsign_audit_last_checkpoint_timestamp_seconds {last}"
        );
    }
    gauge(
        &mut out,
        "meshsign_audit_writable",
        "1 while the audit log takes writes, 0 while decisions are refused.",
    );
    let _ = writeln!(
        out,
        "meshsign_audit_writable {}",
        u8::from(!state.audit.is_failing())
    );
    gauge(
        &mut out,
        "meshsign_revocation_rules",
        "Revocation rules in force.",
    );
    let _ = writeln!(
        out,
        "meshsign_revocation_rules {}",
        state.revocations().len()
    );
    gauge(
        &mut out,
        "meshsign_config_reload_refused",
        "1 while this replica's last SIGHUP reload was refused (the previous configuration runs).",
    );
    let _ = writeln!(
        out,
        "meshsign_config_reload_refused {}",
        u8::from(state.last_reload().is_some_and(|r| !r.applied))
    );
    let config = state.config();
    gauge(
        &mut out,
        "meshsign_server_certificate_expiry_timestamp_seconds",
        "When the site's TLS server certificate expires (notAfter, Unix seconds).",
    );
    if let Some(at) = crate::api::tls::read_certs(&config.tls.server_cert)
        .ok()
        .and_then(|c| c.first().and_then(|leaf| not_after(leaf)))
    {
        let _ = writeln!(
            out,
            "meshsign_server_certificate_expiry_timestamp_seconds {at}"
        );
    }
    gauge(
        &mut out,
        "meshsign_runner_ca_expiry_timestamp_seconds",
        "When each trusted runner CA expires (notAfter, Unix seconds).",
    );
    for env in &config.environments {
        if let Ok(cas) = state.runner_cas(&env.name) {
            for r in cas.trusted(now) {
                if let Some(at) = not_after(&r.cert_der) {
                    let _ = writeln!(
                        out,
                        "meshsign_runner_ca_expiry_timestamp_seconds{{environment=\"{}\",id=\"{}\",state=\"{}\"}} {at}",
                        label(&env.name),
                        label(&r.id),
                        r.state.as_str()
                    );
                }
            }
        }
    }
    gauge(
        &mut out,
        "meshsign_runner_ca_rotation_due",
        "1 when an active runner CA is older than [keys] runner_ca_rotation_days.",
    );
    for env in &config.environments {
        if let Ok(cas) = state.runner_cas(&env.name) {
            for r in cas.trusted(now) {
                if r.state == crate::ca::RunnerCaState::Active {
                    let _ = writeln!(
                        out,
                        "meshsign_runner_ca_rotation_due{{environment=\"{}\",id=\"{}\"}} {}",
                        label(&env.name),
                        label(&r.id),
                        u8::from(super::admin::runner_ca_rotation_due(r, now, &config))
                    );
                }
            }
        }
    }
    gauge(
        &mut out,
        "meshsign_key_created_timestamp_seconds",
        "When each signing key version was made or imported (Unix seconds).",
    );
    let keys = state.keys();
    for ((env, alias), versions) in keys.all() {
        for k in versions {
            let _ = writeln!(
                out,
                "meshsign_key_created_timestamp_seconds{{environment=\"{}\",alias=\"{}\",version=\"{}\"}} {}",
                label(env),
                label(alias),
                k.record.version,
                k.record.created_at
            );
        }
    }
    gauge(
        &mut out,
        "meshsign_key_rotation_due",
        "1 when a key's newest version is older than [keys] rotation_age_days.",
    );
    for ((env, alias), versions) in keys.all() {
        if let Some(newest) = versions.last() {
            let due = super::admin::rotation_due(
                now - newest.record.created_at,
                config.keys.rotation_age_days,
            );
            let _ = writeln!(
                out,
                "meshsign_key_rotation_due{{environment=\"{}\",alias=\"{}\"}} {}",
                label(env),
                label(alias),
                u8::from(due)
            );
        }
    }
    gauge(
        &mut out,
        "meshsign_signing_certificate_expiry_timestamp_seconds",
        "When the certificate of a key version that has one (an Apple Developer ID identity, a vendor certificate) expires (notAfter, Unix seconds).",
    );
    for ((env, alias), versions) in keys.all() {
        for k in versions {
            if let Some(at) = k
                .record
                .certificate_chain
                .first()
                .and_then(|leaf| not_after(leaf))
            {
                let _ = writeln!(
                    out,
                    "meshsign_signing_certificate_expiry_timestamp_seconds{{environment=\"{}\",alias=\"{}\",version=\"{}\"}} {at}",
                    label(env),
                    label(alias),
                    k.record.version
                );
            }
        }
    }
    gauge(
        &mut out,
        "meshsign_certificates_live",
        "Runner certificates not yet expired nor revoked, by environment (from the store: every replica's; refreshed at most every 30 s).",
    );
    for (env, n) in live_certificates(state, now) {
        let _ = writeln!(
            out,
            "meshsign_certificates_live{{environment=\"{}\"}} {n}",
            label(&env)
        );
    }
    let _ = writeln!(
        out,
        "# HELP meshsign_sessions_abandoned_total Sessions whose certificate expired neither renewed nor revoked by its holder (the runner stopped renewing and never said goodbye), counted once per site by the replica that found them.\n# TYPE meshsign_sessions_abandoned_total counter"
    );
    for env in &config.environments {
        let _ = writeln!(
            out,
            "meshsign_sessions_abandoned_total{{environment=\"{}\"}} {}",
            label(&env.name),
            state.metrics.sessions_abandoned(&env.name)
        );
    }
    gauge(&mut out, "meshsign_limit", "Configured limits ([limits]).");
    let l = config.limits;
    for (name, v) in [
        ("max_connections", u64::from(l.max_connections)),
        (
            "max_connections_per_source",
            u64::from(l.max_connections_per_source),
        ),
        (
            "max_requests_in_flight",
            u64::from(l.max_requests_in_flight),
        ),
        (
            "enroll_per_source_per_second",
            u64::from(l.enroll_per_source_per_second),
        ),
        (
            "sign_per_job_per_second",
            u64::from(l.sign_per_job_per_second),
        ),
    ] {
        let _ = writeln!(out, "meshsign_limit{{name=\"{name}\"}} {v}");
    }
    build_info(&mut out);
    process_metrics(&mut out);
    out
}

/// The content type of OpenMetrics 1.0 text.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper asked for OpenMetrics (Prometheus sends
/// `Accept: application/openmetrics-text;version=1.0.0,…;q=0.5,text/plain;version=0.0.4;…`).
fn wants_openmetrics(accept: Option<&hyper::header::HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            params.next() == Some("application/openmetrics-text")
                && !params.any(|p| p.replace(' ', "") == "q=0")
        })
    })
}

/// The 0.0.4 text of [`render`] as OpenMetrics 1.0: a counter's family is named without its
/// `_total` (its samples keep it), a `*_info` gauge is an `info` family, and the text ends with
/// `# EOF`. Samples are unchanged.
pub fn openmetrics(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut kinds = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name, kind);
        }
    }
    fn family<'a>(
        kinds: &std::collections::HashMap<&str, &str>,
        name: &'a str,
    ) -> (&'a str, &'static str) {
        match kinds.get(name).copied() {
            Some("counter") => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            Some("gauge") if name.ends_with("_info") => {
                (name.strip_suffix("_info").unwrap_or(name), "info")
            }
            Some("histogram") => (name, "histogram"),
            Some("gauge") => (name, "gauge"),
            _ => (name, "unknown"),
        }
    }
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let _ = writeln!(out, "# HELP {} {help}", family(&kinds, name).0);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (name, kind) = family(&kinds, name);
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<SiteState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == hyper::Method::GET;
    let path = req.uri().path();
    if get && (path == "/healthz" || path == "/readyz") {
        // Live while this listener answers; ready while decisions can be recorded.
        let ready = path == "/healthz" || !state.audit.is_failing();
        let (status, body) = if ready {
            (StatusCode::OK, "ok\n")
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the audit log takes no writes\n",
            )
        };
        let response = Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())));
        return Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))));
    }
    let ok = get && path == "/metrics";
    let response = if ok {
        let open = wants_openmetrics(req.headers().get(hyper::header::ACCEPT));
        let body = tokio::task::spawn_blocking(move || render(&state))
            .await
            .unwrap_or_default();
        let (body, kind) = if open {
            (openmetrics(&body), OPENMETRICS)
        } else {
            (body, "text/plain; version=0.0.4; charset=utf-8")
        };
        Response::builder()
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"GET /metrics, /healthz or /readyz\n",
            )))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Binds the metrics listener; returns its address and the task serving it until `stop`.
pub async fn start(
    addr: SocketAddr,
    state: Arc<SiteState>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // over the cap: the connection is closed
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                drop(permit);
            });
        }
    });
    Ok((local, task))
}
