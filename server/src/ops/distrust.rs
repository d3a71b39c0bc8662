//! After-the-fact distrust: ops add rules that make offline verifiers refuse signatures the
//! site already made (by job, runner fingerprint, region, key version, time window), and the
//! site publishes each environment's rules as a versioned list signed by its audit key
//! (`meshsign_evidence::distrust`). Revocation stops new signatures; distrust reaches back.
//!
//! The list is kept per environment in [`Tree::Distrust`] with its signed form, so every
//! replica serves the same bytes; a change writes a new version under the ops lock.

use meshsign_evidence::attest::{DISTRUST_PAYLOAD_TYPE, Envelope, pae};
use meshsign_evidence::distrust::{DistrustEntry, DistrustList};
use serde::{Deserialize, Serialize};

use super::{OpsError, environment_exists};
use crate::identity::Operator;
use crate::model::bounded;
use crate::state::SiteState;

/// What the store holds per environment: the list and its signed envelope (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    /// The list.
    pub list: DistrustList,
    /// The DSSE envelope signed by the audit key, JSON.
    pub envelope_json: String,
}

/// A rule to add, as the request gives it.
#[derive(Clone, Debug, Default)]
pub struct NewRule {
    /// CI job id.
    pub job_id: String,
    /// Pipeline id (every job of one run / pipeline / build).
    pub pipeline_id: String,
    /// Runner fingerprint (64 lowercase hex).
    pub runner_fingerprint: String,
    /// Region.
    pub region: String,
    /// `alias@vN`.
    pub key_id: String,
    /// Unix seconds.
    pub not_before: Option<i64>,
    /// Unix seconds.
    pub not_after: Option<i64>,
    /// Why.
    pub reason: String,
}

/// How long a list is valid after it is issued. An unchanged list is re-issued (same
/// version, new `issued_at` and `expires`) when it is asked for past half of this.
pub const LIST_VALIDITY_SECS: i64 = 7 * 86_400;

/// The environment's current list (version 0, empty, the first time it is asked for); an
/// unchanged list past half its validity is re-issued first, so a served list never expires.
pub fn current(site: &SiteState, environment: &str) -> Result<Stored, OpsError> {
    environment_exists(site, environment)?;
    let now = site.clock.unix();
    if let Some(stored) = site.distrust_list::<Stored>(environment)? {
        let fresh = stored
            .list
            .expires
            .is_some_and(|exp| exp - now > LIST_VALIDITY_SECS / 2);
        if fresh {
            return Ok(stored);
        }
        let mut list = stored.list;
        list.issued_at = now;
        list.expires = Some(now + LIST_VALIDITY_SECS);
        let again = seal(site, list)?;
        // As for version 0 below: if the store cannot take it, the signed list is still served.
        let _ = site.put_distrust_list(environment, &again);
        return Ok(again);
    }
    let stored = seal(
        site,
        DistrustList {
            version: 0,
            region: site.config().region.clone(),
            environment: environment.to_string(),
            issued_at: now,
            expires: Some(now + LIST_VALIDITY_SECS),
            entries: Vec::new(),
        },
    )?;
    // Kept, so every later read (and every replica) serves the same version-0 bytes; if the
    // store cannot take it now, the signed list is still served.
    let _ = site.put_distrust_list(environment, &stored);
    Ok(stored)
}

/// Adds a rule (a new version). Returns the list and the audit detail.
pub fn add(
    site: &SiteState,
    op: &Operator,
    environment: &str,
    rule: NewRule,
) -> Result<(Stored, String), OpsError> {
    let entry = validate(site, op, rule)?;
    let mut list = current(site, environment)?.list;
    let detail = format!("distrust {} ({})", entry.describe(), entry.id);
    list.entries.push(entry);
    let stored = publish(site, environment, list)?;
    Ok((
        stored.clone(),
        format!("{detail}; list version {}", stored.list.version),
    ))
}

/// Removes rule `id` (a new version).
pub fn remove(site: &SiteState, environment: &str, id: &str) -> Result<(Stored, String), OpsError> {
    let mut list = current(site, environment)?.list;
    let before = list.entries.len();
    list.entries.retain(|e| e.id != id);
    if list.entries.len() == before {
        return Err(OpsError::NotFound(format!(
            "no distrust rule `{}` in `{environment}`",
            bounded(id, 64)
        )));
    }
    let stored = publish(site, environment, list)?;
    Ok((
        stored.clone(),
        format!(
            "undistrust {} ; list version {}",
            bounded(id, 64),
            stored.list.version
        ),
    ))
}

fn publish(
    site: &SiteState,
    environment: &str,
    mut list: DistrustList,
) -> Result<Stored, OpsError> {
    list.version += 1;
    list.issued_at = site.clock.unix();
    list.expires = Some(list.issued_at + LIST_VALIDITY_SECS);
    list.region = site.config().region.clone();
    resolve(site, environment, &mut list)?;
    let stored = seal(site, list)?;
    site.put_distrust_list(environment, &stored)?;
    Ok(stored)
}

/// Resolves each rule to what a Sigstore bundle's log entry discloses (see
/// `meshsign_evidence::distrust`): a rule naming a job, pipeline or runner to the
/// transparency-log leaves of the signatures it matches in the audit log as it is now, a key
/// version to its key. One pass over the stored log per list change (an ops action, not a
/// request path); entries removed by retention are not resolved.
fn resolve(site: &SiteState, environment: &str, list: &mut DistrustList) -> Result<(), OpsError> {
    let names_job = |r: &meshsign_evidence::distrust::DistrustEntry| {
        !(r.job_id.is_empty() && r.pipeline_id.is_empty() && r.runner_fingerprint.is_empty())
    };
    for rule in &mut list.entries {
        rule.log_leaves.clear();
        rule.key_spki_sha256.clear();
        if rule.key_id.is_empty() {
            continue;
        }
        let alias = rule.key_id.split('@').next().unwrap_or_default();
        if let Some(k) = site
            .key_records(Some((environment, alias)))?
            .into_iter()
            .find(|k| k.key_id() == rule.key_id)
        {
            rule.key_spki_sha256 = hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                &k.public_key_der,
            ));
        }
    }
    if !list.entries.iter().any(names_job) {
        return Ok(());
    }
    let mut from = 1;
    loop {
        let batch = site.audit.range(from, 4096).map_err(OpsError::Audit)?;
        let Some(last) = batch.last() else {
            break;
        };
        from = last.seq + 1;
        for e in &batch {
            let Some(t) = &e.tlog else {
                continue;
            };
            if e.environment != environment || e.decision != "allow" {
                continue;
            }
            let (Ok(b), Some(leaves)) = (
                meshsign_evidence::attest::Binding::from_entry(e),
                t.hashes(),
            ) else {
                continue;
            };
            for rule in list.entries.iter_mut().filter(|r| names_job(r)) {
                if rule.matches(&b) {
                    rule.log_leaves.extend(leaves.iter().map(hex::encode));
                }
            }
        }
    }
    Ok(())
}

/// Signs the list with the audit key (DSSE over its JSON).
fn seal(site: &SiteState, list: DistrustList) -> Result<Stored, OpsError> {
    let payload = serde_json::to_vec(&list)
        .map_err(|e| OpsError::Invalid(format!("distrust list does not encode: {e}")))?;
    let key = site.audit.key();
    let sig = key
        .backend
        .sign_message(&pae(DISTRUST_PAYLOAD_TYPE, &payload))?;
    let envelope = Envelope::new(DISTRUST_PAYLOAD_TYPE, &payload, &key.key_id, &sig);
    Ok(Stored {
        list,
        envelope_json: serde_json::to_string(&envelope).unwrap_or_default(),
    })
}

fn validate(site: &SiteState, op: &Operator, r: NewRule) -> Result<DistrustEntry, OpsError> {
    let invalid = |m: String| Err(OpsError::Invalid(m));
    if !r.runner_fingerprint.is_empty()
        && !meshsign_evidence::identity::is_valid_fingerprint(&r.runner_fingerprint)
    {
        return invalid(format!(
            "runner fingerprint `{}`: 64 lowercase hex characters",
            bounded(&r.runner_fingerprint, 80)
        ));
    }
    for (name, v, max) in [
        ("job id", &r.job_id, 256),
        ("pipeline id", &r.pipeline_id, 256),
        ("region", &r.region, 64),
        ("key id", &r.key_id, 128),
    ] {
        if v.len() > max || v.chars().any(char::is_control) {
            return invalid(format!(
                "{name}: at most {max} bytes, no control characters"
            ));
        }
    }
    if !r.key_id.is_empty() && !r.key_id.contains("@v") {
        return invalid(format!("key id `{}`: alias@vN", bounded(&r.key_id, 64)));
    }
    if let (Some(a), Some(b)) = (r.not_before, r.not_after)
        && a >= b
    {
        return invalid("the window is empty: not_before must be before not_after".into());
    }
    let entry = DistrustEntry {
        id: format!(
            "d-{}",
            meshsign_evidence::files::random_id()
                .map(|id| id[..16].to_string())
                .map_err(|e| OpsError::Invalid(format!("no randomness: {e}")))?
        ),
        job_id: r.job_id,
        pipeline_id: r.pipeline_id,
        runner_fingerprint: r.runner_fingerprint,
        region: r.region,
        key_id: r.key_id,
        not_before: r.not_before,
        not_after: r.not_after,
        reason: bounded(&r.reason, 256),
        added_at: site.clock.unix(),
        added_by: op.id.clone(),
        log_leaves: Vec::new(),
        key_spki_sha256: String::new(),
    };
    if !entry.is_selective() {
        return invalid(
            "name at least one of job_id, pipeline_id, runner_fingerprint, region, key_id or a \
             time window"
                .into(),
        );
    }
    Ok(entry)
}
