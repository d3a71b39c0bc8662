//! `GET /metrics` for Prometheus on its own listener (`[metrics] listen`, off when absent): the
//! counters of `crate::metrics`, plus gauges read from the state at scrape time — audit head
//! and checkpoint age, revocation rules, days until the server certificate and each runner CA
//! expire, key ages, and the configured limits.
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

/// Days from `now` until a certificate's notAfter (negative once expired).
fn days_left(cert_der: &[u8], now: i64) -> Option<f64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some((cert.validity().not_after.timestamp() - now) as f64 / 86_400.0)
}

fn label(v: &str) -> String {
    v.chars()
        .take(64)
        .collect::<String>()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How long a count of live certificates is reused: counting reads every issuance record.
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
    let Ok(all) = state.issued_certificates() else {
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
        "meshsign_audit_last_checkpoint_age_seconds",
        "Seconds since this process signed its last audit checkpoint (-1: none yet).",
    );
    let last = state
        .metrics
        .last_checkpoint_unix
        .load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "meshsign_audit_last_checkpoint_age_seconds {}",
        if last > 0 { now - last } else { -1 }
    );
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
        "meshsign_server_certificate_expiry_days",
        "Days until the site's TLS server certificate expires.",
    );
    if let Some(days) = crate::api::tls::read_certs(&config.tls.server_cert)
        .ok()
        .and_then(|c| c.first().and_then(|leaf| days_left(leaf, now)))
    {
        let _ = writeln!(out, "meshsign_server_certificate_expiry_days {days:.3}");
    }
    gauge(
        &mut out,
        "meshsign_runner_ca_expiry_days",
        "Days until each trusted runner CA expires.",
    );
    for env in &config.environments {
        if let Ok(cas) = state.runner_cas(&env.name) {
            for r in cas.trusted(now) {
                if let Some(days) = days_left(&r.cert_der, now) {
                    let _ = writeln!(
                        out,
                        "meshsign_runner_ca_expiry_days{{environment=\"{}\",id=\"{}\",state=\"{}\"}} {days:.3}",
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
        "meshsign_key_age_days",
        "Age of each signing key version.",
    );
    let keys = state.keys();
    for ((env, alias), versions) in keys.all() {
        for k in versions {
            let _ = writeln!(
                out,
                "meshsign_key_age_days{{environment=\"{}\",alias=\"{}\",version=\"{}\"}} {:.3}",
                label(env),
                label(alias),
                k.record.version,
                (now - k.record.created_at) as f64 / 86_400.0
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
        "meshsign_signing_certificate_expiry_days",
        "Days until the certificate of a key version that has one (an Apple Developer ID identity, a vendor certificate) expires.",
    );
    for ((env, alias), versions) in keys.all() {
        for k in versions {
            if let Some(days) = k
                .record
                .certificate_chain
                .first()
                .and_then(|leaf| days_left(leaf, now))
            {
                let _ = writeln!(
                    out,
                    "meshsign_signing_certificate_expiry_days{{environment=\"{}\",alias=\"{}\",version=\"{}\"}} {days:.3}",
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
    out
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<SiteState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ok = req.method() == hyper::Method::GET && req.uri().path() == "/metrics";
    let response = if ok {
        let body = tokio::task::spawn_blocking(move || render(&state))
            .await
            .unwrap_or_default();
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(body)))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"GET /metrics\n")))
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
