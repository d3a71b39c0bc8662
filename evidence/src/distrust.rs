//! After-the-fact distrust: a versioned list of rules, signed by the site's audit key as a DSSE
//! envelope (payload type [`crate::attest::DISTRUST_PAYLOAD_TYPE`]), that offline verifiers
//! match against the facts bound to a signature ([`crate::attest::Binding`]).
//!
//! A rule names at least one of job, pipeline, runner fingerprint, region or key version, and may bound
//! the time of the decision to a window; every part it names must match. A rule with only a
//! window distrusts everything the environment signed in it.
//!
//! **Bundles that carry no job facts.** A Sigstore bundle's log entry discloses only what was
//! signed, by which key, when and at which site ([`LogFacts`]). So the site resolves each rule
//! that names a job, pipeline or runner to the transparency-log leaves of the signatures it
//! matches when it issues the list (`log_leaves`), and a key version to its key
//! (`key_spki_sha256`); a verifier matches a bundle by its leaf, key, time and site
//! ([`DistrustEntry::matches_log`]). A version of the list covers what was signed before it
//! was issued: a job or runner still running is also revoked (`admin revoke`).

use serde::{Deserialize, Serialize};

use crate::attest::Binding;

/// The list of one environment at one site.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DistrustList {
    /// Grows by one with every change (0: nothing was ever distrusted).
    pub version: u64,
    /// Site region.
    pub region: String,
    /// Partition the rules apply to.
    pub environment: String,
    /// Unix seconds this version was issued (or last re-issued unchanged).
    pub issued_at: i64,
    /// Unix seconds after which the list says nothing: a verifier refuses it then. The site
    /// re-issues an unchanged list (same version) before it expires. Absent on lists of
    /// earlier versions of the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// The rules.
    pub entries: Vec<DistrustEntry>,
}

/// One rule.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DistrustEntry {
    /// `d-<random>`.
    pub id: String,
    /// CI job id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
    /// Pipeline id: every job of one run / pipeline / build.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline_id: String,
    /// Runner fingerprint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner_fingerprint: String,
    /// Region of the site that signed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Key version `alias@vN`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// Signed at or after (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// Signed before (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// Why (free text, bounded).
    #[serde(default)]
    pub reason: String,
    /// Unix seconds the rule was added.
    pub added_at: i64,
    /// Operator who added it.
    #[serde(default)]
    pub added_by: String,
    /// The transparency-log leaf hashes (hex) of the signatures this rule matched when the
    /// site issued the list (rules naming a job, pipeline or runner).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_leaves: Vec<String>,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo of `key_id` (rules naming a key version).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_spki_sha256: String,
}

/// What a transparency-log entry tells a distrust list (after its SET verified): the leaf, the
/// key, the time and the site and environment of the bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFacts {
    /// The leaf hash (hex).
    pub leaf: String,
    /// SHA-256 (hex) of the signing key's SubjectPublicKeyInfo.
    pub key_spki_sha256: String,
    /// The entry's integrated time (unix seconds).
    pub time: i64,
    /// Region (from the bundle's key hint; the list's signature says which site).
    pub region: String,
    /// Environment (from the bundle's key hint).
    pub environment: String,
    /// The log index.
    pub log_index: u64,
}

impl DistrustEntry {
    /// Whether the rule names something to match (a window alone counts).
    pub fn is_selective(&self) -> bool {
        !(self.job_id.is_empty()
            && self.pipeline_id.is_empty()
            && self.runner_fingerprint.is_empty()
            && self.region.is_empty()
            && self.key_id.is_empty()
            && self.not_before.is_none()
            && self.not_after.is_none())
    }

    /// Whether the signature with these facts falls under the rule.
    pub fn matches(&self, b: &Binding) -> bool {
        let eq = |rule: &str, fact: &str| rule.is_empty() || rule == fact;
        self.is_selective()
            && eq(&self.job_id, &b.job_id)
            && eq(&self.pipeline_id, &b.pipeline_id)
            && eq(&self.runner_fingerprint, &b.runner_fingerprint)
            && eq(&self.region, &b.region)
            && eq(&self.key_id, &b.key_id)
            && self.not_before.is_none_or(|t| b.time >= t)
            && self.not_after.is_none_or(|t| b.time < t)
    }

    /// Whether the transparency-log entry with these facts falls under the rule: a rule naming
    /// a job, pipeline or runner matches the leaves it was resolved to; a key version, its key.
    pub fn matches_log(&self, f: &LogFacts) -> bool {
        let names_job = !(self.job_id.is_empty()
            && self.pipeline_id.is_empty()
            && self.runner_fingerprint.is_empty());
        self.is_selective()
            && (!names_job || self.log_leaves.contains(&f.leaf))
            && (self.key_id.is_empty() || self.key_spki_sha256 == f.key_spki_sha256)
            && (self.region.is_empty() || self.region == f.region)
            && self.not_before.is_none_or(|t| f.time >= t)
            && self.not_after.is_none_or(|t| f.time < t)
    }

    /// What the rule selects, in a few words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("job", &self.job_id),
            ("pipeline", &self.pipeline_id),
            ("runner", &self.runner_fingerprint),
            ("region", &self.region),
            ("key", &self.key_id),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k} {v}"));
            }
        }
        if let Some(t) = self.not_before {
            parts.push(format!("from {}", crate::attest::rfc3339(t)));
        }
        if let Some(t) = self.not_after {
            parts.push(format!("before {}", crate::attest::rfc3339(t)));
        }
        parts.join(", ")
    }
}

/// What a verifier demands of a distrust list besides its signature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freshness {
    /// Now (unix seconds): a list that expired before is refused.
    pub now: i64,
    /// Refuse a list older than this version (one known to have distrusted something).
    pub min_version: Option<u64>,
    /// Refuse a list issued more than this many seconds before `now`.
    pub max_age: Option<i64>,
}

impl DistrustList {
    /// Whether the list is fresh enough for `f`; the error says what is stale and the fix.
    pub fn check_fresh(&self, f: &Freshness) -> Result<(), String> {
        let fetch = "fetch the current one (meshsign verification-material --distrust-list)";
        if let Some(exp) = self.expires
            && f.now >= exp
        {
            return Err(format!(
                "distrust list version {} expired at {}: {fetch}",
                self.version,
                crate::attest::rfc3339(exp)
            ));
        }
        if let Some(min) = f.min_version
            && self.version < min
        {
            return Err(format!(
                "distrust list version {} is older than the version {min} required: {fetch}",
                self.version
            ));
        }
        if let Some(max) = f.max_age
            && f.now.saturating_sub(self.issued_at) > max
        {
            return Err(format!(
                "distrust list version {} was issued at {}, more than {max} s ago: {fetch}",
                self.version,
                crate::attest::rfc3339(self.issued_at)
            ));
        }
        Ok(())
    }

    /// The first rule the signature falls under. The list must be for the signature's
    /// environment (a list of another environment says nothing about it: an error).
    pub fn matching(&self, b: &Binding) -> Result<Option<&DistrustEntry>, String> {
        if self.environment != b.environment {
            return Err(format!(
                "the distrust list is for environment `{}`; the signature was made in `{}`",
                self.environment, b.environment
            ));
        }
        Ok(self.entries.iter().find(|e| e.matches(b)))
    }

    /// [`DistrustList::matching`] for a transparency-log entry.
    pub fn matching_log(&self, f: &LogFacts) -> Result<Option<&DistrustEntry>, String> {
        if self.environment != f.environment {
            return Err(format!(
                "the distrust list is for environment `{}`; the signature was made in `{}`",
                self.environment, f.environment
            ));
        }
        Ok(self.entries.iter().find(|e| e.matches_log(f)))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_stale_list_is_refused_for_what_makes_it_stale() {
        let list = DistrustList {
            version: 1,
            issued_at: 1_000,
            expires: Some(2_000),
            ..Default::default()
        };
        let at = |now| Freshness {
            now,
            ..Default::default()
        };
        assert_eq!(list.check_fresh(&at(1_500)), Ok(()));
        assert!(
            list.check_fresh(&at(2_000))
                .unwrap_err()
                .contains("expired")
        );
        let min = Freshness {
            min_version: Some(2),
            ..at(1_500)
        };
        assert!(
            list.check_fresh(&min)
                .unwrap_err()
                .contains("older than the version 2")
        );
        let age = Freshness {
            max_age: Some(100),
            ..at(1_500)
        };
        assert!(
            list.check_fresh(&age)
                .unwrap_err()
                .contains("more than 100 s ago")
        );
        // A list of an earlier site version (no expiry) passes unless a demand says otherwise.
        let old = DistrustList {
            expires: None,
            ..list
        };
        assert_eq!(old.check_fresh(&at(1 << 40)), Ok(()));
    }

    use super::*;

    fn binding(job: &str, t: i64) -> Binding {
        Binding {
            environment: "production".into(),
            region: "sg".into(),
            job_id: job.into(),
            pipeline_id: "13456789012".into(),
            runner_fingerprint: "ab".repeat(32),
            key_id: "release@v1".into(),
            time: t,
            audit_seq: 7,
        }
    }

    #[test]
    fn rules_match_on_every_part_they_name() -> Result<(), String> {
        let list = DistrustList {
            version: 2,
            environment: "production".into(),
            entries: vec![DistrustEntry {
                id: "d-1".into(),
                job_id: "7001".into(),
                not_before: Some(100),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(list.matching(&binding("7001", 100))?.is_some());
        assert!(list.matching(&binding("7001", 99))?.is_none());
        assert!(list.matching(&binding("7002", 150))?.is_none());
        let mut staging = binding("7001", 150);
        staging.environment = "staging".into();
        assert!(list.matching(&staging).is_err());
        // Every part a rule names must match: key version, region, runner, a closed window.
        let rule = |f: &dyn Fn(&mut DistrustEntry)| {
            let mut e = DistrustEntry {
                id: "d-2".into(),
                ..Default::default()
            };
            f(&mut e);
            e
        };
        let b = binding("7002", 150);
        assert!(rule(&|e| e.key_id = "release@v1".into()).matches(&b));
        assert!(!rule(&|e| e.key_id = "release@v2".into()).matches(&b));
        assert!(rule(&|e| e.region = "sg".into()).matches(&b));
        assert!(!rule(&|e| e.region = "tokyo".into()).matches(&b));
        assert!(rule(&|e| e.runner_fingerprint = "ab".repeat(32)).matches(&b));
        assert!(!rule(&|e| e.runner_fingerprint = "cd".repeat(32)).matches(&b));
        assert!(rule(&|e| e.pipeline_id = "13456789012".into()).matches(&b));
        assert!(!rule(&|e| e.pipeline_id = "13456789013".into()).matches(&b));
        let window = |from: i64, to: i64| {
            rule(&move |e| {
                e.not_before = Some(from);
                e.not_after = Some(to);
            })
        };
        assert!(
            window(150, 151).matches(&b),
            "the window includes its start"
        );
        assert!(!window(100, 150).matches(&b), "and excludes its end");
        assert!(
            !rule(&|e| {
                e.key_id = "release@v1".into();
                e.region = "tokyo".into();
            })
            .matches(&b),
            "all named parts must match"
        );
        // A rule that names nothing matches nothing.
        let empty = DistrustEntry::default();
        assert!(!empty.matches(&binding("7001", 150)));
        Ok(())
    }
}
