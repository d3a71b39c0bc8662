//! What a reload changes in trust-relevant configuration, and whether it widens trust.
//!
//! A SIGHUP reload is a change like any other (issue 25): its audit entry carries this diff,
//! and on a site whose `[review]` covers `Reload` a diff that *widens* trust is applied only
//! when a second admin approved the exact file (by SHA-256). Widening: a new environment
//! policy or issuer, a pinned key added, a bound claim removed or loosened, an access pattern
//! widened, a purpose added, a key enabled, a budget raised or removed, a lifetime raised, a
//! reviewed operation removed from the review set, the admin CA file changed. Narrowing is the
//! reverse and applies at once. Where the direction cannot be told (a claim mapping, a
//! provider), the change counts as widening.
//!
//! Owns: the comparison. Must not touch: applying or refusing (`ops::trust::reload`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Budget, Environment, KeySpec, SiteConfig, TrustPolicy};
use crate::model::glob_match;

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Where: `production.policy[https://…].bound_claims.repository_owner_id`.
    pub at: String,
    /// What: `added "x"`, `removed`, `"a" → "b"`.
    pub change: String,
    /// Whether it widens trust.
    pub widens: bool,
}

/// Every trust-relevant change between two file configurations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    /// The changes, in config order.
    pub changes: Vec<Change>,
}

impl ConfigDiff {
    /// Whether any change widens trust.
    pub fn widens(&self) -> bool {
        self.changes.iter().any(|c| c.widens)
    }

    /// The widening changes' places, for a refusal.
    pub fn widening(&self) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| c.widens)
            .map(|c| c.at.as_str())
            .collect()
    }

    /// Every change, as a JSON array (for `admin status` and the log).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.changes).unwrap_or_default()
    }

    /// `changes [...]` as JSON of at most about `max` bytes, widening changes first; what does
    /// not fit is counted (`"more": N`), so an audit entry's bounded detail stays valid JSON.
    pub fn summary(&self, max: usize) -> String {
        let mut order: Vec<&Change> = self.changes.iter().filter(|c| c.widens).collect();
        order.extend(self.changes.iter().filter(|c| !c.widens));
        let mut kept = Vec::new();
        let mut used = 0;
        for c in &order {
            let json = serde_json::to_string(c).unwrap_or_default();
            if used + json.len() + 1 > max {
                break;
            }
            used += json.len() + 1;
            kept.push(*c);
        }
        let more = order.len() - kept.len();
        let body = serde_json::to_string(&kept).unwrap_or_default();
        if more == 0 {
            format!("changes {body}")
        } else {
            format!("changes {body} and {more} more (admin status lists all)")
        }
    }

    fn push(&mut self, at: String, change: String, widens: bool) {
        self.changes.push(Change { at, change, widens });
    }

    /// Records `old → new` when they differ; `widens` decides the direction.
    fn value<T: PartialEq + std::fmt::Debug>(
        &mut self,
        at: impl Into<String>,
        old: &T,
        new: &T,
        widens: impl FnOnce(&T, &T) -> bool,
    ) {
        if old != new {
            let w = widens(old, new);
            self.push(at.into(), format!("{old:?} → {new:?}"), w);
        }
    }

    /// A set of patterns: a pattern no old one covers widens; removals narrow.
    fn patterns(&mut self, at: &str, old: &[String], new: &[String]) {
        for p in new.iter().filter(|p| !old.contains(p)) {
            let covered = old.iter().any(|o| covers(o, p));
            self.push(at.to_string(), format!("added {p:?}"), !covered);
        }
        for p in old.iter().filter(|p| !new.contains(p)) {
            self.push(at.to_string(), format!("removed {p:?}"), false);
        }
    }
}

/// Whether pattern `old` admits at least everything pattern `new` admits (conservative: false
/// when unsure).
fn covers(old: &str, new: &str) -> bool {
    old == new
        || old == "*"
        || old == "**"
        || (glob_match(old, new) && (!new.contains("**") || old.contains("**")))
}

/// A larger limit (or none where there was one) widens.
fn raised(old: &u64, new: &u64) -> bool {
    new > old
}

fn budget_widens(old: &Budget, new: &Budget) -> bool {
    let up = |o: Option<u64>, n: Option<u64>| match (o, n) {
        (Some(_), None) => true,
        (Some(o), Some(n)) => n > o,
        _ => false,
    };
    up(old.per_job, new.per_job) || up(old.per_certificate, new.per_certificate)
}

/// What changed from `old` to `new` (two file configurations of one site).
pub fn diff(old: &SiteConfig, new: &SiteConfig) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    let (ro, rn) = (&old.review.operations, &new.review.operations);
    for op in ro.difference(rn) {
        d.push("review.operations".into(), format!("removed {op:?}"), true);
    }
    for op in rn.difference(ro) {
        d.push("review.operations".into(), format!("added {op:?}"), false);
    }
    d.value(
        "review.window_seconds",
        &old.review.window_seconds,
        &new.review.window_seconds,
        raised,
    );
    d.value(
        "keys.rotation_age_days",
        &old.keys.rotation_age_days,
        &new.keys.rotation_age_days,
        |o, n| *n == 0 || (*o != 0 && n > o),
    );
    d.value(
        "keys.runner_ca_rotation_days",
        &old.keys.runner_ca_rotation_days,
        &new.keys.runner_ca_rotation_days,
        |o, n| *n == 0 || (*o != 0 && n > o),
    );
    for (name, o, n, widens) in [
        (
            "tls.admin_ca",
            &old.tls_sha256.admin_ca,
            &new.tls_sha256.admin_ca,
            true,
        ),
        (
            "tls.server_cert",
            &old.tls_sha256.server_cert,
            &new.tls_sha256.server_cert,
            false,
        ),
    ] {
        if o != n {
            d.push(name.into(), format!("sha256 {o} → {n}"), widens);
        }
    }
    if old.tls_sha256.server_key != new.tls_sha256.server_key {
        d.push("tls.server_key".into(), "changed".into(), false);
    }
    for n in &new.environments {
        match old.environments.iter().find(|o| o.name == n.name) {
            Some(o) => environment(&mut d, o, n),
            None => d.push(n.name.clone(), "added environment".into(), true),
        }
    }
    for o in &old.environments {
        if !new.environments.iter().any(|n| n.name == o.name) {
            d.push(o.name.clone(), "removed environment".into(), false);
        }
    }
    d
}

fn environment(d: &mut ConfigDiff, o: &Environment, n: &Environment) {
    let e = &n.name;
    d.value(format!("{e}.audience"), &o.audience, &n.audience, |_, _| {
        true
    });
    d.value(
        format!("{e}.max_ttl_seconds"),
        &o.max_ttl_seconds,
        &n.max_ttl_seconds,
        raised,
    );
    d.value(
        format!("{e}.max_token_age_seconds"),
        &o.max_token_age_seconds,
        &n.max_token_age_seconds,
        raised,
    );
    d.value(
        format!("{e}.max_session_seconds"),
        &o.max_session_seconds,
        &n.max_session_seconds,
        raised,
    );
    d.value(format!("{e}.budget"), &o.budget, &n.budget, budget_widens);
    d.value(format!("{e}.runners"), &o.runners, &n.runners, |_, n| {
        *n == crate::config::RunnerMode::Claimed
    });
    d.value(
        format!("{e}.runner_backends"),
        &o.runner_backends,
        &n.runner_backends,
        |o, n| n.iter().any(|b| !o.contains(b)),
    );
    for np in &n.trust_policies {
        let at = format!("{e}.policy[{}]", np.issuer);
        match o.trust_policies.iter().find(|p| p.issuer == np.issuer) {
            Some(op) => policy(d, &at, op, np),
            None => d.push(at, format!("added trust policy {:?}", np.name), true),
        }
    }
    for op in &o.trust_policies {
        if !n.trust_policies.iter().any(|p| p.issuer == op.issuer) {
            d.push(
                format!("{e}.policy[{}]", op.issuer),
                format!("removed trust policy {:?}", op.name),
                false,
            );
        }
    }
    for nk in &n.signing_keys {
        let at = format!("{e}.key[{}]", nk.alias);
        match o.key(&nk.alias) {
            Some(ok) => key(d, &at, ok, nk),
            None => d.push(at, "added signing key".into(), true),
        }
    }
    for ok in &o.signing_keys {
        if n.key(&ok.alias).is_none() {
            d.push(
                format!("{e}.key[{}]", ok.alias),
                "removed from the file (its versions stay in the store)".into(),
                false,
            );
        }
    }
}

fn policy(d: &mut ConfigDiff, at: &str, o: &TrustPolicy, n: &TrustPolicy) {
    d.value(format!("{at}.name"), &o.name, &n.name, |_, _| false);
    d.value(format!("{at}.enabled"), &o.enabled, &n.enabled, |_, n| *n);
    d.value(
        format!("{at}.keep_sessions"),
        &o.keep_sessions,
        &n.keep_sessions,
        |_, n| *n,
    );
    d.value(
        format!("{at}.provider"),
        &o.provider,
        &n.provider,
        |_, _| true,
    );
    d.value(
        format!("{at}.claim_mappings"),
        &o.claim_mappings,
        &n.claim_mappings,
        |_, _| true,
    );
    d.value(
        format!("{at}.max_token_lifetime_seconds"),
        &o.max_token_lifetime_seconds,
        &n.max_token_lifetime_seconds,
        raised,
    );
    d.value(
        format!("{at}.allow_unbound"),
        &o.allow_unbound,
        &n.allow_unbound,
        |_, n| *n,
    );
    bound_claims(d, at, &o.bound_claims, &n.bound_claims);
    let kids = |p: &TrustPolicy| -> BTreeMap<String, crate::identity::jwt::VerifyKey> {
        p.jwks
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.key.clone()))
            .collect()
    };
    let (ok, nk) = (kids(o), kids(n));
    for (kid, key) in &nk {
        match ok.get(kid) {
            None => d.push(format!("{at}.jwks"), format!("added kid {kid:?}"), true),
            Some(old) if old != key => d.push(
                format!("{at}.jwks"),
                format!("kid {kid:?} pins another key"),
                true,
            ),
            Some(_) => {}
        }
    }
    for kid in ok.keys().filter(|k| !nk.contains_key(*k)) {
        d.push(format!("{at}.jwks"), format!("removed kid {kid:?}"), false);
    }
}

fn bound_claims(
    d: &mut ConfigDiff,
    at: &str,
    o: &BTreeMap<String, String>,
    n: &BTreeMap<String, String>,
) {
    let names: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    for name in names {
        let place = format!("{at}.bound_claims.{name}");
        match (o.get(name), n.get(name)) {
            (Some(a), None) => d.push(place, format!("removed {a:?}"), true),
            (None, Some(b)) => d.push(place, format!("added {b:?}"), false),
            (Some(a), Some(b)) if a != b => {
                d.push(place, format!("{a:?} → {b:?}"), !covers(a, b));
            }
            _ => {}
        }
    }
}

fn key(d: &mut ConfigDiff, at: &str, o: &KeySpec, n: &KeySpec) {
    d.patterns(
        &format!("{at}.repositories"),
        &o.access.repositories,
        &n.access.repositories,
    );
    d.patterns(&format!("{at}.refs"), &o.access.refs, &n.access.refs);
    d.value(
        format!("{at}.disabled"),
        &o.disabled,
        &n.disabled,
        |_, n| !*n,
    );
    let purposes =
        |k: &KeySpec| -> BTreeSet<&'static str> { k.purposes.iter().map(|p| p.as_str()).collect() };
    let (op, np) = (purposes(o), purposes(n));
    for p in np.difference(&op) {
        d.push(format!("{at}.purposes"), format!("added {p:?}"), true);
    }
    for p in op.difference(&np) {
        d.push(format!("{at}.purposes"), format!("removed {p:?}"), false);
    }
    d.value(format!("{at}.budget"), &o.budget, &n.budget, budget_widens);
    d.value(
        format!("{at}.algorithm"),
        &o.algorithm,
        &n.algorithm,
        |_, _| true,
    );
    d.value(format!("{at}.backend"), &o.backend, &n.backend, |_, _| true);
    match (&o.allowed_digests, &n.allowed_digests) {
        (Some(_), None) => d.push(
            format!("{at}.digest_allow_list"),
            "removed (any digest)".into(),
            true,
        ),
        (None, Some(l)) => d.push(
            format!("{at}.digest_allow_list"),
            format!("added ({} digests)", l.digests.len()),
            false,
        ),
        (Some(a), Some(b)) => {
            let added = b.digests.difference(&a.digests).count();
            let removed = a.digests.difference(&b.digests).count();
            if added + removed > 0 {
                d.push(
                    format!("{at}.digest_allow_list"),
                    format!("{added} digests added, {removed} removed"),
                    added > 0,
                );
            }
        }
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_cover_only_what_they_admit() {
        assert!(covers("*", "acme/app"));
        assert!(covers("acme/*", "acme/app"));
        assert!(covers("refs/tags/*", "refs/tags/v*"));
        assert!(!covers("refs/tags/v*", "refs/tags/*"));
        assert!(!covers("acme/*", "acme/**"));
        assert!(covers("acme/**", "acme/**"));
        assert!(!covers("1100001", "*"));
    }
}
