//! The enroll port's services: Enrollment (a token and a CSR become a runner certificate) and
//! Verification (public key material and the trust bundle, for anyone).
//!
//! Owns: proto ⇄ typed conversion for Enrollment and the public reads. Must not touch: the
//! enrollment checks (`enroll`).

use std::sync::Arc;

use meshsign_proto::v1;
use tonic::{Request, Response, Status};

use super::status::status;
use super::{peer, runner_ca_info, verification_key};
use crate::enroll::{self, EnrollInput};
use crate::model::Reason;
use crate::model::{Refusal, RefusalKind, bounded};
use crate::state::SiteState;

/// Refusals of the public read-only RPCs.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The environment does not exist at this site.
    #[error("no environment `{0}`")]
    NoEnvironment(String),
    /// The key does not exist in the environment.
    #[error("no key `{alias}` in environment `{environment}`{suggestion}")]
    NoKey {
        /// Alias.
        alias: String,
        /// Environment.
        environment: String,
        /// `; did you mean `release`?` when an alias of the environment is one or two edits
        /// away (aliases are public: their keys are served here), else empty.
        suggestion: String,
    },
    /// No durable audit entry has this seq and hash.
    #[error("no audit entry {0} with that hash")]
    NoEntry(u64),
    /// No log of that origin, or no signed tree head of that size.
    #[error("no log `{0}` with signed tree heads of those sizes")]
    NoSizes(String),
    /// The transparency log has no leaf at this index with that hash.
    #[error("no transparency-log entry {0} with that leaf hash")]
    NoLogEntry(u64),
    /// The proof could not be made (internal).
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
}

impl Refusal for LookupError {
    fn reason(&self) -> Reason {
        match self {
            LookupError::NoEnvironment(_) => Reason::Environment,
            LookupError::NoKey { .. } => Reason::Key,
            LookupError::NoEntry(_) | LookupError::NoLogEntry(_) | LookupError::NoSizes(_) => {
                Reason::AuditEntry
            }
            LookupError::Audit(crate::audit::AuditError::Tree(_)) => crate::model::Reason::Internal,
            // The log cannot take the checkpoint the proof needs (a full disk, a store gone):
            // unavailable until it can, as for every other decision.
            LookupError::Audit(_) => crate::model::Reason::AuditUnavailable,
        }
    }

    fn kind(&self) -> RefusalKind {
        match self {
            LookupError::Audit(crate::audit::AuditError::Tree(_)) => RefusalKind::Internal,
            LookupError::Audit(_) => RefusalKind::Unavailable,
            _ => RefusalKind::NotFound,
        }
    }
}

fn no_key(r: &v1::GetVerificationMaterialRequest, ring: &crate::state::keyring::KeyRing) -> Status {
    let nearest = ring
        .all()
        .filter(|((env, _), _)| *env == r.environment)
        .map(|((_, alias), _)| (crate::model::edit_distance(alias, &r.key_alias), alias))
        .filter(|(d, _)| *d <= 2)
        .min();
    status(&LookupError::NoKey {
        alias: bounded(&r.key_alias, 64),
        environment: bounded(&r.environment, 64),
        suggestion: nearest
            .map(|(_, a)| format!("; did you mean `{a}`?"))
            .unwrap_or_default(),
    })
}

/// The Enrollment service (enroll port).
#[derive(Debug, Clone)]
pub struct EnrollmentApi(pub Arc<SiteState>);

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for EnrollmentApi {
    async fn get_trust_bundle(
        &self,
        req: Request<v1::GetTrustBundleRequest>,
    ) -> Result<Response<v1::TrustBundle>, Status> {
        let env = req.into_inner().environment;
        let runner_cas = self
            .0
            .runner_cas(&env)
            .map_err(|_| status(&LookupError::NoEnvironment(bounded(&env, 64))))?;
        let now = self.0.clock.unix();
        Ok(Response::new(v1::TrustBundle {
            environment: env,
            region: self.0.config().region.clone(),
            issuers: runner_cas
                .trusted(now)
                .into_iter()
                .map(runner_ca_info)
                .collect(),
        }))
    }

    async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let peer = peer(&req);
        let r = req.into_inner();
        let input = EnrollInput {
            token: r.token,
            csr_der: r.csr_der,
            fingerprint: r.runner_fingerprint,
            region: r.region,
            requested_ttl_seconds: u64::from(r.requested_ttl_seconds),
            environment: r.environment,
            peer,
            device_proof: r.device_proof.map(|p| crate::state::runners::DeviceProof {
                spki: p.spki,
                signature: p.signature,
            }),
        };
        let out = enroll::enroll(&self.0, input)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(super::enroll_response(out)))
    }
}

/// Public verification material (enroll port).
#[derive(Debug, Clone)]
pub struct VerificationApi(pub Arc<SiteState>);

#[tonic::async_trait]
impl v1::verification_server::Verification for VerificationApi {
    async fn get_signing_identity(
        &self,
        req: Request<v1::GetVerificationMaterialRequest>,
    ) -> Result<Response<v1::SigningIdentity>, Status> {
        let r = req.into_inner();
        let ring = self.0.keys();
        let key = ring
            .active(&r.environment, &r.key_alias)
            .ok_or_else(|| no_key(&r, &ring))?;
        Ok(Response::new(v1::SigningIdentity {
            key_id: key.record.key_id(),
            algorithm: key.record.algorithm.as_str().to_string(),
            public_key_der: key.record.public_key_der.clone(),
            certificate_chain: key.record.certificate_chain.clone(),
        }))
    }

    async fn get_verification_material(
        &self,
        req: Request<v1::GetVerificationMaterialRequest>,
    ) -> Result<Response<v1::GetVerificationMaterialResponse>, Status> {
        let r = req.into_inner();
        let ring = self.0.keys();
        let keys = if r.key_alias.is_empty() {
            // Only the audit key, for an environment of this site.
            if self.0.config().environment(&r.environment).is_none() {
                return Err(status(&LookupError::NoEnvironment(bounded(
                    &r.environment,
                    64,
                ))));
            }
            Vec::new()
        } else {
            let versions = ring
                .versions(&r.environment, &r.key_alias)
                .ok_or_else(|| no_key(&r, &ring))?;
            let last = versions.len().saturating_sub(1);
            let purposes = self
                .0
                .config()
                .environment(&r.environment)
                .and_then(|e| e.key(&r.key_alias))
                .map(|k| k.purposes.clone())
                .unwrap_or_default();
            versions
                .iter()
                .enumerate()
                .map(|(i, k)| verification_key(k, i == last, &purposes))
                .collect()
        };
        let (audit_key_id, audit_public_key_der) = self.0.audit.public_key();
        Ok(Response::new(v1::GetVerificationMaterialResponse {
            environment: r.environment,
            region: self.0.config().region.clone(),
            keys,
            audit_public_key_der,
            audit_key_id,
            log_origin: self.0.audit.origin().to_string(),
            transparency_log_origin: self.0.audit.transparency_origin().to_string(),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<v1::GetInclusionProofRequest>,
    ) -> Result<Response<v1::InclusionProof>, Status> {
        let r = req.into_inner();
        let proof = self
            .0
            .audit
            .prove(r.seq, &r.leaf_hash)
            .await
            .map_err(|e| status(&LookupError::from(e)))?
            .ok_or_else(|| status(&LookupError::NoEntry(r.seq)))?;
        Ok(Response::new(v1::InclusionProof {
            log_index: r.seq - 1,
            tree_size: proof.tree_size,
            hashes: proof.hashes.iter().map(|h| h.to_vec()).collect(),
            checkpoint: proof.checkpoint,
        }))
    }

    async fn get_log_inclusion_proof(
        &self,
        req: Request<v1::GetLogInclusionProofRequest>,
    ) -> Result<Response<v1::InclusionProof>, Status> {
        let r = req.into_inner();
        let proof = self
            .0
            .audit
            .prove_transparency(r.log_index, &r.leaf_hash)
            .await
            .map_err(|e| status(&LookupError::from(e)))?
            .ok_or_else(|| status(&LookupError::NoLogEntry(r.log_index)))?;
        Ok(Response::new(v1::InclusionProof {
            log_index: r.log_index,
            tree_size: proof.tree_size,
            hashes: proof.hashes.iter().map(|h| h.to_vec()).collect(),
            checkpoint: proof.checkpoint,
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<v1::GetConsistencyProofRequest>,
    ) -> Result<Response<v1::ConsistencyProof>, Status> {
        let r = req.into_inner();
        let hashes = self
            .0
            .audit
            .consistency(&r.origin, r.first_size, r.second_size)
            .await
            .map_err(|e| status(&LookupError::from(e)))?
            .ok_or_else(|| status(&LookupError::NoSizes(bounded(&r.origin, 128))))?;
        Ok(Response::new(v1::ConsistencyProof {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_distrust_list(
        &self,
        req: Request<v1::GetDistrustListRequest>,
    ) -> Result<Response<v1::DistrustList>, Status> {
        let env = req.into_inner().environment;
        let stored = crate::ops::distrust::current(&self.0, &env).map_err(|e| status(&e))?;
        Ok(Response::new(super::distrust_list(stored)))
    }
}
