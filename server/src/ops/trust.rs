//! Trust policies (enable, disable, pin JWKS) and the SIGHUP reload of the file configuration.
//!
//! Owns: changes to trust policies and the reload rule (what may change in place).
//! Must not touch: token verification (`enroll`), TLS (the transport reloads it).

use super::{OpsError, review};
use crate::config::{SiteConfig, TrustPolicy};
use crate::identity::jwt::Jwks;
use crate::model::ReloadOutcome;
use crate::state::SiteState;
use crate::state::records::Meta;

/// Re-reads the file configuration (SIGHUP). Trust policies, key access rules, signing budgets
/// and digest allow-lists change; identity, listeners, storage and the set of environments
/// need a restart and are refused.
///
/// A reload is a change like any other (issue 25): the returned detail — the audit entry's —
/// carries the file's SHA-256 and the trust-relevant diff against the running file
/// ([`crate::config::diff`]). Where `[review]` covers `Reload` (the default set does), a diff
/// that widens trust is refused unless a second admin approved this exact file
/// (`Admin.ProposeConfig` + `ApproveProposal`); narrowing applies at once. Either way the
/// outcome is kept for `admin status` and the `meshsign_config_reload_refused` metric.
pub fn reload(site: &SiteState, file: SiteConfig) -> Result<String, OpsError> {
    let cur = site.file_config();
    let diff = crate::config::diff::diff(&cur, &file);
    let sha = match file.source_sha256.as_str() {
        "" => "(not read from a file)".to_string(),
        s => s.to_string(),
    };
    let mut outcome = ReloadOutcome {
        at: site.clock.unix(),
        applied: false,
        config_sha256: file.source_sha256.clone(),
        message: String::new(),
        changes_json: diff.to_json(),
        widens: diff.widens(),
    };
    let result = reload_checked(site, &cur, file, &diff);
    match &result {
        Ok(approval) => {
            outcome.applied = true;
            outcome.message = approval.clone().unwrap_or_default();
        }
        Err(e) => outcome.message = e.to_string(),
    }
    site.set_last_reload(outcome);
    let approval = result?;
    let detail = format!(
        "configuration reloaded; file sha256 {sha}; {}",
        diff.summary(700)
    );
    Ok(match approval {
        Some(a) => format!("{detail}; {a}"),
        None => detail,
    })
}

/// The reload's checks, then the change. `Ok(Some(why))`: applied under a config approval.
fn reload_checked(
    site: &SiteState,
    cur: &SiteConfig,
    file: SiteConfig,
    diff: &crate::config::diff::ConfigDiff,
) -> Result<Option<String>, OpsError> {
    let names = |c: &SiteConfig| {
        c.environments
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    if file.trust_domain != cur.trust_domain
        || file.region != cur.region
        || file.data_dir != cur.data_dir
        || file.kek_file != cur.kek_file
        || file.listen.enroll != cur.listen.enroll
        || file.listen.sign != cur.listen.sign
        || file.listen.admin != cur.listen.admin
        || file.store_cache_mib != cur.store_cache_mib
        || file.postgres != cur.postgres
        || file.audit != cur.audit
        || file.limits != cur.limits
        || file.metrics_listen != cur.metrics_listen
        || names(&file) != names(cur)
    {
        return Err(OpsError::Precondition(
            "trust_domain, region, data_dir, kek_file, listen, [store], [audit], [limits], [metrics] and the environment list need a restart".into(),
        ));
    }
    let mut approved = None;
    if diff.widens() && site.config().review.covers(review::RELOAD) {
        match review::config_approval(site, &file.source_sha256)? {
            Some(p) => {
                approved = Some(format!(
                    "widening approved by `{}` under proposal {} (proposed by `{}`)",
                    p.approver.as_deref().unwrap_or("?"),
                    p.id,
                    p.proposer
                ));
            }
            None => {
                return Err(OpsError::ReviewRequired(format!(
                    "the file (sha256 {}) widens trust, so the running configuration stays; {}; \
                     to apply it: `meshsign admin review propose-config --file <site.toml>`, \
                     `review approve <id>` by another admin, then SIGHUP again",
                    file.source_sha256,
                    diff.summary(600)
                )));
            }
        }
    }
    site.set_file_config(file.clone());
    let (cfg, keys) = site.load_over(file)?;
    site.set_keys(keys);
    site.set_config(cfg);
    Ok(approved)
}

fn policy_index(cfg: &SiteConfig, env: &str, issuer: &str) -> Result<(usize, usize), OpsError> {
    let pi = cfg
        .environments
        .iter()
        .position(|p| p.name == env)
        .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
    let ti = cfg.environments[pi]
        .trust_policies
        .iter()
        .position(|t| t.issuer == issuer)
        .ok_or_else(|| {
            OpsError::NotFound(format!("no trust policy for issuer `{issuer}` in `{env}`"))
        })?;
    Ok((pi, ti))
}

/// Enables or disables a trust policy. Disabling refuses new enrollments from it and, unless
/// `keep_sessions`, every sign call from certificates it minted — on open connections too.
///
/// A call that would not change the policy changes nothing and says so: disabling a disabled
/// policy keeps who disabled it (it cannot take over someone else's incident response), except
/// that it may still end the sessions a disable had kept.
pub fn set_policy_enabled(
    site: &SiteState,
    operator: &str,
    env: &str,
    issuer: &str,
    enabled: bool,
    keep_sessions: bool,
) -> Result<(TrustPolicy, String), OpsError> {
    let mut cfg = (*site.config()).clone();
    let (pi, ti) = policy_index(&cfg, env, issuer)?;
    let now = site.clock.unix();
    let cur = cfg.environments[pi].trust_policies[ti].clone();
    let (name, id) = (cur.name.clone(), policy_id(env, issuer));
    let change = match (cur.enabled, enabled) {
        (true, true) => {
            return Ok((
                cur,
                format!("trust policy {name} ({issuer}) already enabled; nothing changed"),
            ));
        }
        (false, false) => {
            let by: Option<DisabledBy> = site.meta(Meta::PolicyDisabledBy, &id)?;
            let who = by
                .map(|b| format!(" by `{}` at unix {}", b.operator, b.at))
                .unwrap_or_default();
            if !cur.keep_sessions || keep_sessions {
                return Ok((
                    cur,
                    format!(
                        "trust policy {name} ({issuer}) already disabled{who}; nothing changed"
                    ),
                ));
            }
            Change::EndSessions
        }
        (false, true) => {
            site.remove_meta(Meta::PolicyDisabledBy, &id)?;
            Change::Enable
        }
        (true, false) => {
            site.put_meta(
                Meta::PolicyDisabledBy,
                &id,
                &DisabledBy {
                    operator: operator.to_string(),
                    at: now,
                },
            )?;
            Change::Disable
        }
    };
    let t = &mut cfg.environments[pi].trust_policies[ti];
    t.enabled = enabled;
    t.keep_sessions = !enabled && keep_sessions;
    let out = t.clone();
    // Who changed it goes first: if the change itself then fails, an undo by the previous
    // changer is refused (fails closed) rather than wrongly allowed.
    record_change(site, (env, issuer), operator, change, now)?;
    site.save_policy_overlay(env, &cfg.environments[pi].trust_policies[ti], None)?;
    site.set_config(cfg);
    let detail = format!(
        "trust policy {} ({issuer}) {}",
        out.name,
        match change {
            Change::Enable => "enabled",
            Change::Disable if keep_sessions => "disabled, sessions kept",
            Change::Disable => "disabled",
            Change::EndSessions => "already disabled; its kept sessions end now",
            Change::Jwks => "changed",
        }
    );
    Ok((out, detail))
}

/// Who disabled a trust policy, and when (for the review exemption below).
#[derive(serde::Serialize, serde::Deserialize)]
struct DisabledBy {
    operator: String,
    at: i64,
}

/// The id policy marks are kept under.
fn policy_id(env: &str, issuer: &str) -> String {
    format!("{env}/{issuer}")
}

/// A change an operator made to a trust policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Change {
    Enable,
    Disable,
    EndSessions,
    Jwks,
}

/// The last change made to a trust policy, by whom: an undo is an undo only while nobody else
/// has touched the policy since.
#[derive(serde::Serialize, serde::Deserialize)]
struct LastChange {
    operator: String,
    at: i64,
    change: Change,
}

/// Records `operator`'s `change` of the policy at `at` (the same second a disable records in
/// `DisabledBy`, which an undo compares).
fn record_change(
    site: &SiteState,
    (env, issuer): (&str, &str),
    operator: &str,
    change: Change,
    at: i64,
) -> Result<(), OpsError> {
    site.put_meta(
        Meta::PolicyLastChange,
        &policy_id(env, issuer),
        &LastChange {
            operator: operator.to_string(),
            at,
            change,
        },
    )?;
    Ok(())
}

/// Whether re-enabling this policy *undoes the operator's own disable* within the review
/// window — the drill's restore, or an admin taking back their own mistake — which two-person
/// review does not cover: it only returns the policy to the state a second admin never had to
/// agree to leave. It is an undo only when this operator disabled the policy *and* made the
/// last change to it (nobody else has disabled, ended sessions or pinned keys since). Enabling
/// a policy someone else disabled (an incident response), or one disabled longer ago, still
/// needs review. Returns why, for the audit record.
pub fn undoes_own_disable(
    site: &SiteState,
    operator: &str,
    env: &str,
    issuer: &str,
) -> Result<Option<String>, OpsError> {
    let cfg = site.config();
    let (pi, ti) = policy_index(&cfg, env, issuer)?;
    if cfg.environments[pi].trust_policies[ti].enabled {
        return Ok(None);
    }
    let id = policy_id(env, issuer);
    let by: Option<DisabledBy> = site.meta(Meta::PolicyDisabledBy, &id)?;
    let last: Option<LastChange> = site.meta(Meta::PolicyLastChange, &id)?;
    let window = i64::try_from(cfg.review.window_seconds).unwrap_or(3600);
    let last_is_it = |b: &DisabledBy| {
        last.as_ref()
            .is_some_and(|l| l.operator == operator && l.change == Change::Disable && l.at == b.at)
    };
    Ok(by
        .filter(|b| b.operator == operator && site.clock.unix() - b.at <= window && last_is_it(b))
        .map(|b| format!("undoes the operator's own disable at unix {}", b.at)))
}

/// Pins a new JWKS for a policy (public keys only). A kid not in it is denied from now on.
pub fn set_jwks(
    site: &SiteState,
    operator: &str,
    env: &str,
    issuer: &str,
    jwks_json: &[u8],
) -> Result<(TrustPolicy, String), OpsError> {
    let jwks = Jwks::parse(jwks_json).map_err(|e| OpsError::Invalid(format!("jwks: {e}")))?;
    let text = String::from_utf8(jwks_json.to_vec())
        .map_err(|_| OpsError::Invalid("jwks: not UTF-8".into()))?;
    let mut cfg = (*site.config()).clone();
    let (pi, ti) = policy_index(&cfg, env, issuer)?;
    let kids: Vec<String> = jwks.keys.iter().map(|k| k.kid.clone()).collect();
    cfg.environments[pi].trust_policies[ti].jwks = jwks;
    let out = cfg.environments[pi].trust_policies[ti].clone();
    record_change(
        site,
        (env, issuer),
        operator,
        Change::Jwks,
        site.clock.unix(),
    )?;
    site.save_policy_overlay(env, &cfg.environments[pi].trust_policies[ti], Some(text))?;
    site.set_config(cfg);
    Ok((
        out.clone(),
        format!(
            "pinned JWKS for {} ({issuer}): kids {}",
            out.name,
            kids.join(",")
        ),
    ))
}
