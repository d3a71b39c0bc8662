//! The runner registry (issue 28): device keys an operator registered at this site, and their
//! retirement and revocation. Enrollment reads the registry (`enroll::runner_*` checks); ops
//! write it here.
//!
//! Owns: checking a signed registration request, and the registry's state changes. Every
//! change is a conditional write held by the store (insert-if-absent for a registration,
//! compare-and-swap for a state change), so replicas racing on one runner cannot both win or
//! lose a change. Must not touch: the enrollment checks.

use base64::Engine as _;
use meshsign_evidence::device::SignedRegistration;

use super::OpsError;
use super::revocations::{RevokeInput, revoke};
use crate::identity::Operator;
use crate::model::runner::{RunnerRecord, RunnerState};
use crate::model::{RevocationKind, bounded};
use crate::state::SiteState;
use crate::state::records::Meta;

/// The largest registration request accepted (a TPM's EK certificate included).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// At most this many labels, each at most [`MAX_LABEL`] characters.
pub const MAX_LABELS: usize = 16;
const MAX_LABEL: usize = 64;

/// What `admin runner register` sends.
#[derive(Clone, Debug)]
pub struct RegisterInput {
    /// The JSON `meshsign runner init` printed.
    pub request: Vec<u8>,
    /// Environments it may enroll in (empty: all).
    pub environments: Vec<String>,
    /// Operator labels.
    pub labels: Vec<String>,
}

/// Checks a signed registration request and registers the runner; refused if its fingerprint
/// is registered already (in any state: a retired or revoked key is not brought back).
pub fn register(
    site: &SiteState,
    op: &Operator,
    r: RegisterInput,
) -> Result<(RunnerRecord, String), OpsError> {
    if r.request.len() > MAX_REQUEST_BYTES {
        return Err(OpsError::Invalid(format!(
            "the registration request is {} bytes; at most {MAX_REQUEST_BYTES}",
            r.request.len()
        )));
    }
    let signed: SignedRegistration = serde_json::from_slice(&r.request).map_err(|e| {
        OpsError::Invalid(format!(
            "not a registration request from `meshsign runner init`: {}",
            bounded(&e.to_string(), 160)
        ))
    })?;
    let fingerprint = signed
        .verify()
        .map_err(|e| OpsError::Invalid(format!("the registration request does not hold: {e}")))?;
    let config = site.config();
    for e in &r.environments {
        if config.environment(e).is_none() {
            return Err(OpsError::NotFound(format!(
                "no environment `{}` at this site",
                bounded(e, 64)
            )));
        }
    }
    if r.labels.len() > MAX_LABELS {
        return Err(OpsError::Invalid(format!("at most {MAX_LABELS} labels")));
    }
    if let Some(l) = r
        .labels
        .iter()
        .find(|l| l.is_empty() || l.chars().count() > MAX_LABEL || l.chars().any(char::is_control))
    {
        return Err(OpsError::Invalid(format!(
            "label `{}` must be 1 to {MAX_LABEL} characters without control characters",
            bounded(l, MAX_LABEL)
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |v: &Option<String>, what: &str| -> Result<String, OpsError> {
        match v {
            None => Ok(String::new()),
            Some(v) => b64
                .decode(v)
                .map(hex::encode)
                .map_err(|_| OpsError::Invalid(format!("{what} is not base64"))),
        }
    };
    let q = &signed.request;
    let now = site.clock.unix();
    let record = RunnerRecord {
        fingerprint: fingerprint.clone(),
        spki: hex::encode(q.spki_der().map_err(|e| OpsError::Invalid(e.to_string()))?),
        backend: q.backend,
        hostname: q.hostname.clone(),
        instance: q.instance.clone(),
        os_user: q.os_user.clone(),
        ek_pub: decode(&q.ek_pub, "ek_pub")?,
        ek_cert: decode(&q.ek_cert, "ek_cert")?,
        environments: r.environments.clone(),
        labels: r.labels.clone(),
        state: RunnerState::Registered,
        registered_at: now,
        registered_by: op.id.clone(),
        changed_at: now,
        changed_by: op.id.clone(),
        reason: String::new(),
    };
    if !site.insert_meta(Meta::Runner, &fingerprint, &record)? {
        let state = get(site, &fingerprint)?.state;
        return Err(OpsError::Precondition(format!(
            "runner {fingerprint} is already registered here ({}); a retired or revoked device \
             key is not registered again: make a new one with `meshsign runner init`",
            state.as_str()
        )));
    }
    let detail = format!(
        "registered runner {fingerprint} ({} key, {}/{} as {}) for {}",
        record.backend.as_str(),
        record.hostname,
        record.instance,
        record.os_user,
        environments(&record)
    );
    Ok((record, detail))
}

fn environments(r: &RunnerRecord) -> String {
    if r.environments.is_empty() {
        "every environment".into()
    } else {
        r.environments.join(", ")
    }
}

/// Every registered runner, in fingerprint order.
pub fn list(site: &SiteState) -> Result<Vec<RunnerRecord>, OpsError> {
    Ok(site.metas(Meta::Runner)?)
}

/// One runner by fingerprint.
pub fn get(site: &SiteState, fingerprint: &str) -> Result<RunnerRecord, OpsError> {
    site.meta(Meta::Runner, fingerprint)?
        .ok_or_else(|| not_registered(fingerprint))
}

fn not_registered(fingerprint: &str) -> OpsError {
    OpsError::NotFound(format!(
        "no runner {} is registered at this site (`meshsign admin runner list`)",
        bounded(fingerprint, 64)
    ))
}

/// Retires a runner: no new enrollments or renewals; its live certificates run out.
pub fn retire(
    site: &SiteState,
    op: &Operator,
    fingerprint: &str,
    reason: &str,
) -> Result<(RunnerRecord, String), OpsError> {
    change_state(site, op, fingerprint, reason, RunnerState::Retired)
}

/// Revokes a runner: a fingerprint revocation rule first (its live certificates are refused
/// on their next call, at every replica), then the registry's state.
pub fn revoke_runner(
    site: &SiteState,
    op: &Operator,
    fingerprint: &str,
    reason: &str,
) -> Result<(RunnerRecord, String), OpsError> {
    let current = get(site, fingerprint)?;
    if current.state == RunnerState::Revoked {
        return Err(OpsError::Precondition(format!(
            "runner {fingerprint} is already revoked"
        )));
    }
    require_reason(reason)?;
    let ((rule, serials), _) = revoke(
        site,
        op,
        RevokeInput {
            kind: RevocationKind::Fingerprint,
            value: current.fingerprint.clone(),
            region: None,
            since: None,
            until: None,
            reason: format!("runner revoked: {reason}"),
        },
    )?;
    let (record, detail) = change_state(site, op, fingerprint, reason, RunnerState::Revoked)?;
    Ok((
        record,
        format!(
            "{detail}; revocation rule {} matched {} certificate(s)",
            rule.id,
            serials.len()
        ),
    ))
}

fn require_reason(reason: &str) -> Result<(), OpsError> {
    if reason.trim().is_empty() {
        return Err(OpsError::Invalid("--reason is required".into()));
    }
    Ok(())
}

fn change_state(
    site: &SiteState,
    op: &Operator,
    fingerprint: &str,
    reason: &str,
    to: RunnerState,
) -> Result<(RunnerRecord, String), OpsError> {
    require_reason(reason)?;
    // Compare-and-swap on the stored bytes: a replica that changed the record meanwhile makes
    // this write fail, and the change is made again on what it wrote.
    for _ in 0..8 {
        let Some((mut record, raw)) = site.meta_raw::<RunnerRecord>(Meta::Runner, fingerprint)?
        else {
            return Err(not_registered(fingerprint));
        };
        let from = record.state;
        // Revoked is final; retired may still be revoked.
        if from == RunnerState::Revoked || from == to {
            return Err(OpsError::Precondition(format!(
                "runner {fingerprint} is already {}",
                from.as_str()
            )));
        }
        record.state = to;
        record.changed_at = site.clock.unix();
        record.changed_by = op.id.clone();
        record.reason = bounded(reason, 200);
        if site.update_meta(Meta::Runner, fingerprint, &raw, &record)? {
            let detail = format!(
                "runner {fingerprint} {} → {} ({})",
                from.as_str(),
                to.as_str(),
                record.reason
            );
            return Ok((record, detail));
        }
    }
    Err(OpsError::Precondition(format!(
        "runner {fingerprint} kept changing under this request; try again"
    )))
}
