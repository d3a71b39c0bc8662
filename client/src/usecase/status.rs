//! `meshsign admin status` as data: the rows of its table and its JSON, built from the site's
//! answer (the binary prints them).

use meshsign_proto::v1;

/// A time as RFC 3339, or `-` when there is none.
pub fn when(t: Option<prost_types::Timestamp>) -> String {
    dash(
        &t.map(|t| meshsign_evidence::attest::rfc3339(t.seconds))
            .unwrap_or_default(),
    )
}

/// `-` for an empty cell.
pub fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// `admin status` as JSON.
pub fn status_json(st: &v1::SiteStatus) -> serde_json::Value {
    serde_json::json!({
        "region": st.region,
        "store_engine": st.engine_word(),
        "writable": st.writable,
        "audit_head_seq": st.audit_head_seq,
        "last_checkpoint_age_seconds": st.last_checkpoint_age_seconds,
        "revocation_rules": st.revocation_rules,
        "audit_retention_days": st.audit_retention_days,
        "reviewed_operations": st.reviewed_operations,
        "pending_proposals": st.pending_proposals,
        "last_reload": st.last_reload.as_ref().map(|r| serde_json::json!({
            "at": when(r.at),
            "applied": r.applied,
            "config_sha256": r.config_sha256,
            "message": r.message,
            "widens": r.widens,
            "changes": serde_json::from_str::<serde_json::Value>(&r.changes_json)
                .unwrap_or_default(),
        })),
        "environments": st.environments.iter().map(|e| serde_json::json!({
            "name": e.name,
            "audience": e.audience,
            "sessions_abandoned_last_hour": e.sessions_abandoned_last_hour,
            "runner_cas": e.runner_cas.iter().map(|c| serde_json::json!({
                "id": c.id, "state": c.state_word(), "rotation_due": c.rotation_due,
            })).collect::<Vec<_>>(),
            "keys": e.keys.iter().map(|k| serde_json::json!({
                "alias": k.alias, "algorithm": k.algorithm, "newest_version": k.newest_version,
                "newest_age_days": k.newest_age_days, "disabled": k.disabled,
                "rotation_due": k.rotation_due,
            })).collect::<Vec<_>>(),
            "trust_policies": e.trust_policies.iter().map(|t| serde_json::json!({
                "name": t.name, "issuer": t.issuer, "enabled": t.enabled,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The columns of `admin status`.
pub const STATUS_HEADER: &[&str] = &["ENVIRONMENT", "KIND", "NAME", "STATE", "DETAIL"];

/// The site line and one row per runner CA, key and trust policy (under [`STATUS_HEADER`]).
pub fn status_rows(st: &v1::SiteStatus) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "(site)".into(),
        "site".into(),
        st.engine_word(),
        if st.writable {
            "writable"
        } else {
            "NOT WRITABLE (decisions refused)"
        }
        .into(),
        format!(
            "audit head {}, last checkpoint {}, {} revocation rule(s), {} pending proposal(s)",
            st.audit_head_seq,
            if st.last_checkpoint_age_seconds < 0 {
                "none yet".to_string()
            } else {
                format!("{} s ago", st.last_checkpoint_age_seconds)
            },
            st.revocation_rules,
            st.pending_proposals
        ),
    ]];
    if let Some(r) = &st.last_reload {
        rows.push(vec![
            "(site)".into(),
            "reload".into(),
            r.config_sha256.chars().take(12).collect(),
            if r.applied {
                "applied"
            } else {
                "REFUSED (previous config runs)"
            }
            .into(),
            format!(
                "at {}{}{}",
                when(r.at),
                if r.widens { ", widens trust" } else { "" },
                if r.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.message)
                }
            ),
        ]);
    }
    for e in &st.environments {
        rows.extend(environment_rows(e));
    }
    rows
}

/// One row for the environment's sessions, then one per runner CA, key and trust policy.
fn environment_rows(e: &v1::EnvironmentStatus) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        e.name.clone(),
        "sessions".into(),
        "abandoned".into(),
        format!("{} in the last hour", e.sessions_abandoned_last_hour),
        if e.sessions_abandoned_last_hour > 0 {
            "expired neither renewed nor revoked by the job: runners cut off from the site? (alert MeshsignSessionsAbandoned)".into()
        } else {
            "-".into()
        },
    ]];
    for c in &e.runner_cas {
        rows.push(vec![
            e.name.clone(),
            "runner-ca".into(),
            c.id.clone(),
            c.state_word(),
            if c.rotation_due {
                "older than [keys] runner_ca_rotation_days (ROTATE)".into()
            } else {
                "-".into()
            },
        ]);
    }
    for k in &e.keys {
        rows.push(vec![
            e.name.clone(),
            "key".into(),
            format!("{}@v{}", k.alias, k.newest_version),
            if k.disabled { "disabled" } else { "active" }.into(),
            format!(
                "{} days old{}, {}",
                k.newest_age_days.floor(),
                if k.rotation_due { " (ROTATE)" } else { "" },
                k.algorithm
            ),
        ]);
    }
    for t in &e.trust_policies {
        rows.push(vec![
            e.name.clone(),
            "trust-policy".into(),
            t.name.clone(),
            if t.enabled { "enabled" } else { "disabled" }.into(),
            t.issuer.clone(),
        ]);
    }
    rows
}
