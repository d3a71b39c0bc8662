//! Housekeeping every few seconds: prune the replay store, count sessions that expired
//! unrenewed and unrevoked (`state::sessions`), retire runner CAs whose last certificate
//! expired, apply audit retention, drop old review proposals.
//!
//! Owns: the periodic duties. Must not touch: the timer (the transport's start-up runs it).

use super::{OpsError, runner_cas};
use crate::audit::AuditRecord;
use crate::ca::{RunnerCaRecord, RunnerCaState};
use crate::state::SiteState;
use crate::state::records::Meta;

/// One pass of every duty; failures are logged, not fatal.
pub async fn run_once(site: &SiteState) {
    watch_wall_clock(site).await;
    if let Err(e) = site.prune_jti() {
        tracing::warn!(error = %e, "replay-store pruning failed");
    }
    // Expired certificates in bounded steps, yielding between them: up to
    // SWEEP_BATCHES × SWEEP_BATCH per pass keeps up with any fleet's issuance rate.
    for _ in 0..crate::state::sessions::SWEEP_BATCHES {
        match site.sweep_abandoned(crate::state::sessions::SWEEP_BATCH) {
            Ok(s) if s.looked_at < crate::state::sessions::SWEEP_BATCH => break,
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => {
                tracing::warn!(error = %e, "counting abandoned sessions failed; the next pass retries");
                break;
            }
        }
    }
    if let Err(e) = retire_expired(site).await {
        tracing::warn!(error = %e, "retiring expired runner CAs failed");
    }
    if let Err(e) = prune_audit(site).await {
        tracing::warn!(error = %e, "audit retention failed");
    }
    // A token marked unavailable is probed, so health and signing come back without waiting
    // for a request to try it.
    if let Some(t) = &site.custodian.token
        && !t.available()
        && t.probe()
    {
        tracing::warn!(token = %t.label(), "PKCS#11 token available again");
    }
    if let Err(e) = super::review::prune(site) {
        tracing::warn!(error = %e, "pruning old review proposals failed");
    }
    if let Err(e) = site.persist_usage() {
        tracing::warn!(error = %e, "signature counts of unbudgeted keys stay in memory for now");
    }
}

/// A wall clock that stepped (against the monotonic clock) by more than the token leeway is
/// logged, counted (`meshsign_clock_steps_total`, alert `MeshsignClockStep`) and audited:
/// token lifetimes and certificate validity are judged by it. The replay store is not pruned
/// by a clock stepped ahead ([`crate::clock::WallGuard::horizon`]).
async fn watch_wall_clock(site: &SiteState) {
    let Some(offset) = site
        .wall_guard
        .step(&*site.clock, crate::enroll::LEEWAY_SECONDS)
    else {
        return;
    };
    let detail = format!(
        "the wall clock is {offset:+} s from the site's monotonic time (steps beyond the \
         {}s leeway are reported); spent tokens are kept until both clocks pass their expiry",
        crate::enroll::LEEWAY_SECONDS
    );
    tracing::error!(offset_seconds = offset, "wall clock stepped: {detail}");
    site.metrics
        .clock_steps
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rec = AuditRecord {
        rpc: "ClockStep".into(),
        decision: "allow".into(),
        reason: crate::model::Reason::ClockStep.as_str().into(),
        environment: "(site)".into(),
        detail,
        ..Default::default()
    };
    if let Err(e) = site.audit.record(rec).await {
        tracing::warn!(error = %e, "the clock step could not be audited");
    }
}

/// While audit writes fail (a full disk), tries to make the store writable again; logs when
/// writes resume.
pub async fn repair_storage(site: &SiteState) {
    if !site.audit.is_failing() {
        return;
    }
    match site.audit.repair().await {
        Ok(reopened) => {
            tracing::warn!(reopened, "storage writable again: writes resume");
        }
        Err(e) => tracing::debug!(error = %e, "storage still not writable"),
    }
}

/// Days audit entries are kept once exported and checkpointed: what ops set
/// (`Admin.SetAuditRetention`), else `[audit] retention_days`.
pub fn retention_days(site: &SiteState) -> Result<u64, OpsError> {
    Ok(site
        .meta::<u64>(Meta::AuditRetention, "")?
        .unwrap_or(site.config().audit.retention_days))
}

/// Sets the retention (a change: call it through [`super::admin`]).
pub fn set_retention(site: &SiteState, days: u64) -> Result<(u64, String), OpsError> {
    if days > 36_500 {
        return Err(OpsError::Invalid(
            "retention_days must be at most 36500 (0 keeps everything)".into(),
        ));
    }
    let before = retention_days(site)?;
    site.put_meta(Meta::AuditRetention, "", &days)?;
    Ok((
        days,
        format!("audit retention {before} -> {days} days (0: keep all)"),
    ))
}

/// Audit retention: prunes what the retention allows, and audits it.
pub async fn prune_audit(site: &SiteState) -> Result<Option<(u64, u64)>, OpsError> {
    let days = retention_days(site)?;
    if days == 0 {
        return Ok(None);
    }
    let window = i64::try_from(days.saturating_mul(86400)).unwrap_or(i64::MAX);
    let pruned = site
        .audit
        .prune(site.clock.unix(), window)
        .map_err(OpsError::Audit)?;
    if let Some((a, b)) = pruned {
        let rec = AuditRecord {
            rpc: "AuditRetention".into(),
            decision: "allow".into(),
            reason: "ok".into(),
            environment: "(site)".into(),
            detail: format!(
                "pruned entries {a}..={b} (exported and checkpointed, older than {days} days)"
            ),
            ..Default::default()
        };
        site.audit.record(rec).await.map_err(OpsError::Audit)?;
    }
    Ok(pruned)
}

/// Retires every retiring issuer whose last certificate has expired (housekeeping).
pub async fn retire_expired(site: &SiteState) -> Result<usize, OpsError> {
    let now = site.clock.unix();
    let mut n = 0;
    for p in site.config().environments.iter() {
        let due: Vec<RunnerCaRecord> = site
            .runner_cas(&p.name)?
            .records
            .iter()
            .filter(|r| {
                r.state == RunnerCaState::Retiring && r.retire_after.is_some_and(|t| t <= now)
            })
            .cloned()
            .collect();
        for mut r in due {
            let _guard = site.ops_lock.lock().await;
            r.state = RunnerCaState::Retired;
            runner_cas::save_issuer(site, &r)?;
            site.reload_runner_cas(&p.name)?;
            tracing::info!(environment = %p.name, issuer = %r.id, "retiring runner CA retired: its last certificate expired");
            n += 1;
        }
    }
    Ok(n)
}
