//! Wire compatibility of `meshsign.v1`: states, kinds, decisions and engines are enums; the
//! string fields that carried them before stay on the wire (deprecated) for clients that
//! already read them. This is the one place that touches the deprecated fields: the site
//! fills both forms, readers take the enum and fall back to the string of an older site.

#![allow(deprecated)]

use crate::v1;

/// The lower-case word of an enum value name: `RUNNER_CA_STATE_ACTIVE` with prefix
/// `RUNNER_CA_STATE_` → `active`.
fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The enum value whose word is `w` (`active` → `RUNNER_CA_STATE_ACTIVE`).
fn from_word<T>(w: &str, prefix: &str, parse: fn(&str) -> Option<T>) -> Option<T> {
    parse(&format!("{prefix}{}", w.to_ascii_uppercase()))
}

impl v1::RunnerCaState {
    /// `staged`, `active`, `retiring`, `retired`, `revoked`.
    pub fn word(self) -> String {
        word(self.as_str_name(), "RUNNER_CA_STATE_")
    }
}

impl v1::IssuerInfo {
    /// Sets the state in both forms.
    pub fn set_state(&mut self, word: &str) {
        self.state = word.to_string();
        self.runner_ca_state = from_word(word, "RUNNER_CA_STATE_", v1::RunnerCaState::from_str_name)
            .unwrap_or_default() as i32;
    }

    /// The state's word (from the enum; an older site's string otherwise).
    pub fn state_word(&self) -> String {
        match v1::RunnerCaState::try_from(self.runner_ca_state) {
            Ok(s) if s != v1::RunnerCaState::Unspecified => s.word(),
            _ => self.state.clone(),
        }
    }
}

impl v1::RevocationRule {
    /// Sets the kind in both forms.
    pub fn set_kind(&mut self, word: &str) {
        self.kind = word.to_string();
        self.target_kind = from_word(word, "REVOCATION_KIND_", v1::RevocationKind::from_str_name)
            .unwrap_or_default() as i32;
    }

    /// The kind's word.
    pub fn kind_word(&self) -> String {
        match v1::RevocationKind::try_from(self.target_kind) {
            Ok(k) if k != v1::RevocationKind::Unspecified => {
                word(k.as_str_name(), "REVOCATION_KIND_")
            }
            _ => self.kind.clone(),
        }
    }
}

impl v1::SiteStatus {
    /// Sets the engine in both forms.
    pub fn set_engine_word(&mut self, word: &str) {
        self.store_engine = word.to_string();
        self.engine = from_word(word, "STORE_ENGINE_", v1::StoreEngine::from_str_name)
            .unwrap_or_default() as i32;
    }

    /// The engine's word (`sled`, `postgres`).
    pub fn engine_word(&self) -> String {
        match v1::StoreEngine::try_from(self.engine) {
            Ok(e) if e != v1::StoreEngine::Unspecified => word(e.as_str_name(), "STORE_ENGINE_"),
            _ => self.store_engine.clone(),
        }
    }
}

impl v1::ProposalState {
    /// `pending`, `approved`, `executed`, `expired`.
    pub fn word(self) -> String {
        word(self.as_str_name(), "PROPOSAL_STATE_")
    }

    /// From its word.
    pub fn from_word(w: &str) -> Option<Self> {
        from_word(w, "PROPOSAL_STATE_", Self::from_str_name)
    }
}

impl v1::ExportAuditRequest {
    /// Sets the decision filter (`allow`, `deny`) in both forms.
    pub fn set_decision(&mut self, word: &str) {
        self.decision = word.to_string();
        self.decision_filter =
            from_word(word, "DECISION_", v1::Decision::from_str_name).unwrap_or_default() as i32;
    }

    /// The decision asked for, if any: the enum, else an older client's string (which may be
    /// anything; the caller compares it).
    pub fn wanted_decision(&self) -> Option<String> {
        match v1::Decision::try_from(self.decision_filter) {
            Ok(d) if d != v1::Decision::Unspecified => Some(word(d.as_str_name(), "DECISION_")),
            _ if !self.decision.is_empty() => Some(self.decision.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_agree_and_an_older_sites_string_is_read() {
        let mut i = v1::IssuerInfo::default();
        i.set_state("retiring");
        assert_eq!(i.runner_ca_state, v1::RunnerCaState::Retiring as i32);
        assert_eq!(i.state_word(), "retiring");
        let old = v1::IssuerInfo {
            state: "active".into(),
            ..Default::default()
        };
        assert_eq!(old.state_word(), "active");
        let mut r = v1::RevocationRule::default();
        r.set_kind("job_id");
        assert_eq!(r.target_kind, v1::RevocationKind::JobId as i32);
        assert_eq!(r.kind_word(), "job_id");
        let mut q = v1::ExportAuditRequest::default();
        assert_eq!(q.wanted_decision(), None);
        q.set_decision("deny");
        assert_eq!(q.decision_filter, v1::Decision::Deny as i32);
        assert_eq!(q.wanted_decision().as_deref(), Some("deny"));
        assert_eq!(
            v1::ProposalState::from_word("expired").map(|s| s.word()),
            Some("expired".to_string())
        );
    }

    #[test]
    fn the_contract_names_its_go_and_java_packages() -> Result<(), Box<dyn std::error::Error>> {
        use prost::Message as _;
        let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)?;
        let o = fds
            .file
            .iter()
            .find(|f| f.package() == "meshsign.v1")
            .and_then(|f| f.options.as_ref())
            .ok_or("meshsign.v1 has no file options")?;
        assert_eq!(
            o.go_package(),
            "github.com/meshsign/meshsign/gen/go/meshsign/v1;meshsignv1"
        );
        assert_eq!(o.java_package(), "dev.meshsign.v1");
        assert!(o.java_multiple_files());
        Ok(())
    }
}
