//! The registry's side of a proof of possession (issue 28): what Enroll and Renew both check
//! of a device key before they issue — that it is registered here, for this environment, not
//! retired or revoked, held in a backend the environment accepts, and that its signature over
//! the request's transcript verifies. Enroll and Renew build their own transcripts
//! (`meshsign_evidence::device`); the checks and their order are here, once.

use meshsign_evidence::device::{self, Backend};

use super::SiteState;
use super::records::Meta;
use crate::config::Environment;
use crate::model::runner::{RunnerRecord, RunnerState};
use crate::model::{Reason, Refusal, RefusalKind, bounded};
use crate::store::StoreError;

/// The largest device key (SPKI DER) and proof signature accepted.
const MAX_SPKI: usize = 512;
const MAX_SIGNATURE: usize = 128;

/// A device key's proof as a request carries it.
#[derive(Clone, Debug, Default)]
pub struct DeviceProof {
    /// SPKI DER.
    pub spki: Vec<u8>,
    /// ECDSA P-256/SHA-256, DER.
    pub signature: Vec<u8>,
}

/// Why a device key's proof was refused, in the order the checks run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No proof, a malformed one, a fingerprint that is not the key's, or a signature that
    /// does not verify.
    #[error("{0}")]
    Proof(String),
    /// The key is not registered here (or not for this environment).
    #[error("{0}")]
    Unregistered(String),
    /// The key was retired.
    #[error("{0}")]
    Retired(String),
    /// The key was revoked.
    #[error("{0}")]
    Revoked(String),
    /// The key's backend is not accepted by the environment.
    #[error("{0}")]
    Backend(String),
    /// The registry could not be read.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

impl Refusal for DeviceError {
    fn reason(&self) -> Reason {
        match self {
            DeviceError::Proof(_) => Reason::RunnerProof,
            DeviceError::Unregistered(_) => Reason::RunnerUnregistered,
            DeviceError::Retired(_) => Reason::RunnerRetired,
            DeviceError::Revoked(_) => Reason::Revoked,
            DeviceError::Backend(_) => Reason::RunnerBackend,
            DeviceError::Store(_) => Reason::Internal,
        }
    }

    fn kind(&self) -> RefusalKind {
        match self {
            DeviceError::Proof(_) => RefusalKind::Unauthenticated,
            DeviceError::Unregistered(_)
            | DeviceError::Retired(_)
            | DeviceError::Revoked(_)
            | DeviceError::Backend(_) => RefusalKind::PermissionDenied,
            DeviceError::Store(_) => RefusalKind::Internal,
        }
    }
}

impl SiteState {
    /// The registered runner with this fingerprint, if any.
    pub fn registered_runner(&self, fingerprint: &str) -> Result<Option<RunnerRecord>, StoreError> {
        self.meta(Meta::Runner, fingerprint)
    }

    /// Checks a device key's proof for `environment`, in this order: the proof is well formed
    /// and names the fingerprint the runner claimed (if it claimed one); the key is registered
    /// here for the environment (`runner_unregistered`), not retired (`runner_retired`) or
    /// revoked (`revoked`); its backend is accepted (`runner_backend`); its signature over
    /// `transcript` verifies (`runner_proof`). Returns the fingerprint and the backend.
    pub fn check_device_proof(
        &self,
        environment: &Environment,
        proof: Option<&DeviceProof>,
        claimed_fingerprint: &str,
        transcript: &[u8],
    ) -> Result<(String, Backend), DeviceError> {
        let Some(proof) = proof.filter(|p| !p.spki.is_empty()) else {
            return Err(DeviceError::Proof(format!(
                "environment `{}` accepts registered runners only and this request carries no \
                 device-key proof: run `meshsign runner init` on the runner, have an operator \
                 `meshsign admin runner register` it, and set `[runner] device_key`",
                environment.name
            )));
        };
        if proof.spki.len() > MAX_SPKI || proof.signature.len() > MAX_SIGNATURE {
            return Err(DeviceError::Proof(format!(
                "device key of {} bytes or proof of {} bytes is too large",
                proof.spki.len(),
                proof.signature.len()
            )));
        }
        let fingerprint = device::fingerprint(&proof.spki);
        if !claimed_fingerprint.is_empty() && claimed_fingerprint != fingerprint {
            return Err(DeviceError::Proof(format!(
                "runner fingerprint {} is not the device key's ({fingerprint})",
                bounded(claimed_fingerprint, 64)
            )));
        }
        let Some(record) = self.registered_runner(&fingerprint)? else {
            return Err(DeviceError::Unregistered(format!(
                "device key {fingerprint} is not registered at this site (region `{}`): \
                 `meshsign admin runner register --request FILE`",
                self.config().region
            )));
        };
        if !record.serves(&environment.name) {
            return Err(DeviceError::Unregistered(format!(
                "runner {fingerprint} is registered for {}, not `{}`",
                record.environments.join(", "),
                environment.name
            )));
        }
        match record.state {
            RunnerState::Registered => {}
            RunnerState::Retired => {
                return Err(DeviceError::Retired(format!(
                    "runner {fingerprint} was retired by {} ({})",
                    record.changed_by, record.reason
                )));
            }
            RunnerState::Revoked => {
                return Err(DeviceError::Revoked(format!(
                    "runner {fingerprint} was revoked by {} ({})",
                    record.changed_by, record.reason
                )));
            }
        }
        if !environment.runner_backends.contains(&record.backend) {
            let accepted: Vec<&str> = environment
                .runner_backends
                .iter()
                .map(|b| b.as_str())
                .collect();
            return Err(DeviceError::Backend(format!(
                "runner {fingerprint}'s key is in a `{}` backend; environment `{}` accepts {}",
                record.backend.as_str(),
                environment.name,
                accepted.join(", ")
            )));
        }
        if record.spki_der() != proof.spki {
            return Err(DeviceError::Proof(format!(
                "the device key does not match runner {fingerprint}'s registered key"
            )));
        }
        device::verify(&proof.spki, transcript, &proof.signature).map_err(|e| {
            DeviceError::Proof(format!("runner {fingerprint}: {e} over this request"))
        })?;
        Ok((fingerprint, record.backend))
    }
}
