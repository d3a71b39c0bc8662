//! Revocation rules added by ops: by serial, job or runner fingerprint, optionally by region
//! and issuance window. In force on the next RPC of every open connection.
//!
//! Owns: validating and adding rules. Must not touch: the per-RPC check (`sign::checks`).

use super::OpsError;
use crate::custody::CustodyError;
use crate::identity::Operator;
use crate::model::{RevocationKind, RevocationRule, bounded};
use crate::state::SiteState;

/// A revocation request in typed form.
#[derive(Clone, Debug)]
pub struct RevokeInput {
    /// Kind.
    pub kind: RevocationKind,
    /// Value.
    pub value: String,
    /// Region filter.
    pub region: Option<String>,
    /// Issued at or after.
    pub since: Option<i64>,
    /// Issued at or before.
    pub until: Option<i64>,
    /// Why (required).
    pub reason: String,
}

/// Adds a revocation rule; returns it and the serials of issued certificates it matches.
pub fn revoke(
    site: &SiteState,
    op: &Operator,
    r: RevokeInput,
) -> Result<((RevocationRule, Vec<String>), String), OpsError> {
    if r.reason.trim().is_empty() {
        return Err(OpsError::Invalid("--reason is required".into()));
    }
    if !r.kind.accepts(&r.value) {
        return Err(OpsError::Invalid(format!(
            "malformed {} `{}`",
            r.kind.as_str(),
            bounded(&r.value, 80)
        )));
    }
    let value = if r.kind == RevocationKind::Serial {
        r.value.to_ascii_lowercase()
    } else {
        r.value
    };
    // A serial rule reaches the whole session of that certificate (renewals before and after).
    let session = match r.kind {
        RevocationKind::Serial => site
            .issuance_record(&value)?
            .map(|c| c.session_id().to_string())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let rule = RevocationRule {
        id: meshsign_evidence::files::random_id().map_err(|_| CustodyError::Crypto("rng"))?[..12]
            .to_string(),
        kind: r.kind,
        // Serials are compared in lowercase hex (fingerprints are validated lowercase already).
        value,
        region: r.region.filter(|s| !s.is_empty()),
        since: r.since,
        until: r.until,
        reason: bounded(&r.reason, 200),
        operator: op.id.clone(),
        created_at: site.clock.unix(),
        session,
    };
    site.add_revocation(rule.clone())?;
    // The unexpired certificates it covers (an expired one needs no revocation), from the
    // expiry index: never a read of every certificate the site issued.
    let serials: Vec<String> = site
        .unexpired_certificates()?
        .iter()
        .filter(|c| rule.matches(c))
        .map(|c| c.serial.clone())
        .collect();
    let detail = format!(
        "revocation {} {:?}={} matched {} certificate(s)",
        rule.id,
        rule.kind,
        rule.value,
        serials.len()
    );
    Ok(((rule, serials), detail))
}
