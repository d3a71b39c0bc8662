//! The runner registry's record (issue 28): one per device key registered at this site, kept
//! in the meta tree under `runner/<fingerprint>` (so snapshots, restore and PostgreSQL replicas
//! carry it with no new table). Changes go through the store's conditional update, so two
//! replicas retiring and revoking the same runner cannot lose one of the changes.

use meshsign_evidence::device::Backend;
use serde::{Deserialize, Serialize};

/// Where a registered runner stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerState {
    /// May enroll and renew.
    Registered,
    /// No new enrollments or renewals; live certificates run out.
    Retired,
    /// No new enrollments or renewals; live certificates refused (a fingerprint revocation).
    Revoked,
}

impl RunnerState {
    /// The word in listings and audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerState::Registered => "registered",
            RunnerState::Retired => "retired",
            RunnerState::Revoked => "revoked",
        }
    }
}

/// A registered runner instance: its device key and what the operator registered it for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRecord {
    /// hex SHA-256 of the device key's SPKI.
    pub fingerprint: String,
    /// The device key (SPKI DER, hex).
    pub spki: String,
    /// Where the key lives, as the registration request says.
    pub backend: Backend,
    /// From the request.
    pub hostname: String,
    /// From the request.
    pub instance: String,
    /// From the request.
    pub os_user: String,
    /// The TPM's endorsement key (SPKI DER, hex), for a `tpm` key.
    #[serde(default)]
    pub ek_pub: String,
    /// The TPM's EK certificate (DER, hex), where the TPM has one.
    #[serde(default)]
    pub ek_cert: String,
    /// Environments it may enroll in; empty for all.
    pub environments: Vec<String>,
    /// Operator labels.
    pub labels: Vec<String>,
    /// Where it stands.
    pub state: RunnerState,
    /// When it was registered (Unix seconds), and by whom.
    pub registered_at: i64,
    /// Operator id.
    pub registered_by: String,
    /// The last state change (Unix seconds), by whom, and why.
    pub changed_at: i64,
    /// Operator id.
    pub changed_by: String,
    /// Why it was retired or revoked.
    pub reason: String,
}

impl RunnerRecord {
    /// The device key (SPKI DER).
    pub fn spki_der(&self) -> Vec<u8> {
        hex::decode(&self.spki).unwrap_or_default()
    }

    /// Whether it may enroll in `environment`.
    pub fn serves(&self, environment: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|e| e == environment)
    }
}
