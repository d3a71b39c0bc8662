//! Runner-CA lifecycle: stage, activate, retire, revoke (DESIGN.md "issuer (runner CA)").
//!
//! Owns: the state transitions of runner CAs. Must not touch: minting (`ca`), TLS (`state`
//! tells the transport when the trusted set changes).

use super::{OpsError, environment_exists};
use crate::ca::{RunnerCaRecord, RunnerCaState};
use crate::state::SiteState;

pub(super) fn save_issuer(site: &SiteState, rec: &RunnerCaRecord) -> Result<(), OpsError> {
    Ok(site.save_runner_ca(rec)?)
}

/// Every runner CA of a environment, oldest first.
pub fn list(site: &SiteState, env: &str) -> Result<Vec<RunnerCaRecord>, OpsError> {
    environment_exists(site, env)?;
    Ok(site.runner_cas(env)?.records.clone())
}

fn find_issuer(site: &SiteState, env: &str, id: &str) -> Result<RunnerCaRecord, OpsError> {
    list(site, env)?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| OpsError::NotFound(format!("runner CA `{id}` in `{env}`")))
}

/// Makes a new runner CA that the sign port trusts at once but that does not issue yet.
pub fn stage(site: &SiteState, env: &str) -> Result<(RunnerCaRecord, String), OpsError> {
    if list(site, env)?
        .iter()
        .any(|r| r.state == RunnerCaState::Staged)
    {
        return Err(OpsError::Precondition(
            "an issuer is already staged; activate or retire it first".into(),
        ));
    }
    let ca = site.create_runner_ca(env, RunnerCaState::Staged)?;
    site.reload_runner_cas(env)?;
    let detail = format!("staged issuer {}", ca.record.id);
    Ok((ca.record, detail))
}

/// The latest `not_after` of the unexpired certificates an issuer minted (now if none: expired
/// ones need no trust), from the expiry index.
fn last_expiry(site: &SiteState, issuer_id: &str) -> Result<i64, OpsError> {
    Ok(site
        .unexpired_certificates()?
        .iter()
        .filter(|c| c.issuer_id == issuer_id)
        .map(|c| c.not_after)
        .max()
        .unwrap_or(0)
        .max(site.clock.unix()))
}

/// Makes a staged issuer the one that issues; the previous one becomes retiring and stays
/// trusted until the last certificate it issued expires.
pub fn activate(
    site: &SiteState,
    env: &str,
    id: &str,
) -> Result<(RunnerCaRecord, String), OpsError> {
    let records = list(site, env)?;
    let mut target = if id.is_empty() {
        let staged: Vec<_> = records
            .iter()
            .filter(|r| r.state == RunnerCaState::Staged)
            .collect();
        match staged.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(OpsError::Precondition(
                    "no staged issuer; stage one first".into(),
                ));
            }
            _ => {
                return Err(OpsError::Invalid(
                    "several staged issuers; name one with --id".into(),
                ));
            }
        }
    } else {
        find_issuer(site, env, id)?
    };
    if target.state != RunnerCaState::Staged {
        return Err(OpsError::Precondition(format!(
            "issuer {} is {:?}, not staged",
            target.id, target.state
        )));
    }
    let mut detail = format!("activated issuer {}", target.id);
    if let Some(mut old) = records
        .into_iter()
        .find(|r| r.state == RunnerCaState::Active)
    {
        old.state = RunnerCaState::Retiring;
        old.retire_after = Some(last_expiry(site, &old.id)?);
        save_issuer(site, &old)?;
        detail.push_str(&format!("; {} retiring", old.id));
    }
    target.state = RunnerCaState::Active;
    save_issuer(site, &target)?;
    site.reload_runner_cas(env)?;
    Ok((target, detail))
}

/// Retires a staged or retiring issuer now: the sign port stops trusting it.
pub fn retire(site: &SiteState, env: &str, id: &str) -> Result<(RunnerCaRecord, String), OpsError> {
    let mut rec = find_issuer(site, env, id)?;
    match rec.state {
        RunnerCaState::Staged | RunnerCaState::Retiring => {}
        RunnerCaState::Active => {
            return Err(OpsError::Precondition(
                "the active issuer cannot retire; activate another first".into(),
            ));
        }
        s => {
            return Err(OpsError::Precondition(format!(
                "issuer {id} is already {s:?}"
            )));
        }
    }
    rec.state = RunnerCaState::Retired;
    save_issuer(site, &rec)?;
    site.reload_runner_cas(env)?;
    Ok((rec, format!("retired issuer {id}")))
}

/// Distrusts an issuer at once. Revoking the active issuer activates a fresh one, so the
/// environment always has exactly one.
pub fn revoke(
    site: &SiteState,
    env: &str,
    id: &str,
    reason: &str,
) -> Result<(RunnerCaRecord, String), OpsError> {
    let mut rec = find_issuer(site, env, id)?;
    if rec.state == RunnerCaState::Revoked {
        return Err(OpsError::Precondition(format!(
            "issuer {id} is already revoked"
        )));
    }
    let was_active = rec.state == RunnerCaState::Active;
    rec.state = RunnerCaState::Revoked;
    save_issuer(site, &rec)?;
    let mut detail = format!("revoked issuer {id}: {reason}");
    if was_active {
        let ca = site.create_runner_ca(env, RunnerCaState::Active)?;
        detail.push_str(&format!("; activated new issuer {}", ca.record.id));
    }
    site.reload_runner_cas(env)?;
    Ok((rec, detail))
}
