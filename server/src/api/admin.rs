//! The Admin service (admin port): proto ⇄ `ops`. The operator comes from the peer certificate
//! (`spiffe://<td>/ops/<role>/<name>`); `ops::audited` checks the role and audits the action.

use std::sync::Arc;

use meshsign_proto::v1;
use tonic::{Request, Response, Status};

use super::{IntoStatus, issuer_info, ts};
use crate::config::{KeySpec, TrustPolicy};
use crate::ops::{self, Operator, OpsError, RevocationKind, RevokeInput, audited};
use crate::site::SiteState;

impl IntoStatus for OpsError {
    fn into_status(self) -> Status {
        match self {
            OpsError::Unauthenticated(_) => Status::unauthenticated(self.to_string()),
            OpsError::Forbidden { .. } => Status::permission_denied(self.to_string()),
            OpsError::NotFound(_) => Status::not_found(self.to_string()),
            OpsError::Invalid(_) => Status::invalid_argument(self.to_string()),
            OpsError::Precondition(_) => Status::failed_precondition(self.to_string()),
            OpsError::Audit(_) => {
                Status::unavailable("audit_unavailable: the audit log cannot be written")
            }
            OpsError::Custody(_) | OpsError::Issue(_) | OpsError::Store(_) | OpsError::Site(_) => {
                super::internal(&self, &self)
            }
        }
    }
}

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminApi(pub Arc<SiteState>);

impl AdminApi {
    fn operator<T>(&self, req: &Request<T>) -> Result<Operator, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("operator: no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("operator: no client certificate"))?;
        Operator::from_cert_der(leaf, &self.0.config().trust_domain)
            .map_err(IntoStatus::into_status)
    }
}

fn policy_info(env: &str, t: &TrustPolicy) -> v1::TrustPolicyInfo {
    v1::TrustPolicyInfo {
        environment: env.to_string(),
        name: t.name.clone(),
        issuer: t.issuer.clone(),
        enabled: t.enabled,
        keep_sessions: t.keep_sessions,
        kids: t.jwks.keys.iter().map(|k| k.kid.clone()).collect(),
        bound_claims: t.bound_claims.clone().into_iter().collect(),
    }
}

fn key_info(site: &SiteState, env: &str, spec: &KeySpec) -> v1::KeyInfo {
    let ring = site.keys();
    let versions = ring.versions(env, &spec.alias).unwrap_or_default();
    let last = versions.len().saturating_sub(1);
    v1::KeyInfo {
        environment: env.to_string(),
        alias: spec.alias.clone(),
        algorithm: spec.algorithm.as_str().to_string(),
        versions: versions
            .iter()
            .enumerate()
            .map(|(i, k)| super::verification_key(k, i == last && !spec.disabled))
            .collect(),
        disabled: spec.disabled,
        repositories: spec.access.repositories.clone(),
        refs: spec.access.refs.clone(),
    }
}

fn rule_info(r: &ops::RevocationRule) -> v1::RevocationRule {
    v1::RevocationRule {
        id: r.id.clone(),
        kind: serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        value: r.value.clone(),
        region: r.region.clone().unwrap_or_default(),
        since: r.since.unwrap_or(0),
        until: r.until.unwrap_or(0),
        reason: r.reason.clone(),
        operator: r.operator.clone(),
        created_at: Some(ts(r.created_at)),
    }
}

type R<T> = Result<Response<T>, Status>;

/// Streams JSON lines of the audit log.
pub type ExportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ExportLine, Status>> + Send>>;

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminApi {
    type ExportAuditStream = ExportStream;

    async fn get_audit_public_key(
        &self,
        req: Request<v1::GetAuditPublicKeyRequest>,
    ) -> R<v1::AuditPublicKey> {
        let op = self.operator(&req)?;
        let s = &self.0;
        let (key_id, der) = audited(s, &op, "GetAuditPublicKey", "", false, async || {
            Ok((s.audit.public_key(), String::new()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::AuditPublicKey {
            key_id,
            public_key_der: der,
        }))
    }

    async fn export_audit(
        &self,
        req: Request<v1::ExportAuditRequest>,
    ) -> R<Self::ExportAuditStream> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = self.0.clone();
        let detail = format!(
            "export since_seq={} since_time={} follow={}",
            r.since_seq, r.since_time, r.follow
        );
        audited(&s, &op, "ExportAudit", &r.environment, false, async || {
            Ok(((), detail.clone()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(Box::pin(super::export::stream(s, r))))
    }

    async fn list_issuers(
        &self,
        req: Request<v1::EnvironmentRequest>,
    ) -> R<v1::ListIssuersResponse> {
        let op = self.operator(&req)?;
        let env = req.into_inner().environment;
        let s = &self.0;
        let out = audited(s, &op, "ListIssuers", &env, false, async || {
            Ok((ops::list_issuers(s, &env)?, String::new()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::ListIssuersResponse {
            issuers: out.iter().map(issuer_info).collect(),
        }))
    }

    async fn stage_issuer(&self, req: Request<v1::EnvironmentRequest>) -> R<v1::IssuerInfo> {
        let op = self.operator(&req)?;
        let env = req.into_inner().environment;
        let s = &self.0;
        let r = audited(s, &op, "StageIssuer", &env, true, async || {
            ops::stage_issuer(s, &env)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(issuer_info(&r)))
    }

    async fn activate_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let out = audited(s, &op, "ActivateIssuer", &r.environment, true, async || {
            ops::activate_issuer(s, &r.environment, &r.id)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(issuer_info(&out)))
    }

    async fn retire_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let out = audited(s, &op, "RetireIssuer", &r.environment, true, async || {
            ops::retire_issuer(s, &r.environment, &r.id)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(issuer_info(&out)))
    }

    async fn revoke_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let out = audited(s, &op, "RevokeIssuer", &r.environment, true, async || {
            ops::revoke_issuer(s, &r.environment, &r.id, &r.reason)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(issuer_info(&out)))
    }

    async fn revoke(&self, req: Request<v1::RevokeRequest>) -> R<v1::RevokeResponse> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let (kind, value) = match r.target {
            Some(v1::revoke_request::Target::Serial(v)) => (RevocationKind::Serial, v),
            Some(v1::revoke_request::Target::JobId(v)) => (RevocationKind::JobId, v),
            Some(v1::revoke_request::Target::Fingerprint(v)) => (RevocationKind::Fingerprint, v),
            None => {
                return Err(Status::invalid_argument(
                    "invalid: give one of serial, job_id, fingerprint",
                ));
            }
        };
        let input = RevokeInput {
            kind,
            value,
            region: Some(r.region),
            since: (r.since != 0).then_some(r.since),
            until: (r.until != 0).then_some(r.until),
            reason: r.reason,
        };
        let s = &self.0;
        let (rule, serials) = audited(s, &op, "Revoke", "", true, async || {
            ops::revoke(s, &op, input)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::RevokeResponse {
            serials,
            rule_id: rule.id,
        }))
    }

    async fn list_revocations(
        &self,
        req: Request<v1::ListRevocationsRequest>,
    ) -> R<v1::ListRevocationsResponse> {
        let op = self.operator(&req)?;
        let s = &self.0;
        let rules = audited(s, &op, "ListRevocations", "", false, async || {
            Ok((s.revocations(), String::new()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::ListRevocationsResponse {
            rules: rules.iter().map(rule_info).collect(),
        }))
    }

    async fn list_trust_policies(
        &self,
        req: Request<v1::EnvironmentRequest>,
    ) -> R<v1::ListTrustPoliciesResponse> {
        let op = self.operator(&req)?;
        let env = req.into_inner().environment;
        let s = &self.0;
        let cfg = audited(s, &op, "ListTrustPolicies", &env, false, async || {
            let cfg = s.config();
            cfg.partition(&env)
                .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
            Ok((cfg, String::new()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        let policies = cfg
            .partition(&env)
            .map(|p| {
                p.trust_policies
                    .iter()
                    .map(|t| policy_info(&env, t))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::ListTrustPoliciesResponse { policies }))
    }

    async fn set_trust_policy_enabled(
        &self,
        req: Request<v1::SetTrustPolicyEnabledRequest>,
    ) -> R<v1::TrustPolicyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let rpc = if r.enabled {
            "EnableTrustPolicy"
        } else {
            "DisableTrustPolicy"
        };
        let t = audited(s, &op, rpc, &r.environment, true, async || {
            ops::set_policy_enabled(s, &r.environment, &r.issuer, r.enabled, r.keep_sessions)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(policy_info(&r.environment, &t)))
    }

    async fn set_jwks(&self, req: Request<v1::SetJwksRequest>) -> R<v1::TrustPolicyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let t = audited(s, &op, "SetJwks", &r.environment, true, async || {
            ops::set_jwks(s, &r.environment, &r.issuer, &r.jwks_json)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(policy_info(&r.environment, &t)))
    }

    async fn list_keys(&self, req: Request<v1::EnvironmentRequest>) -> R<v1::ListKeysResponse> {
        let op = self.operator(&req)?;
        let env = req.into_inner().environment;
        let s = &self.0;
        let specs = audited(s, &op, "ListKeys", &env, false, async || {
            Ok((ops::list_keys(s, &env)?, String::new()))
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::ListKeysResponse {
            keys: specs.iter().map(|k| key_info(s, &env, k)).collect(),
        }))
    }

    async fn create_key(&self, req: Request<v1::CreateKeyRequest>) -> R<v1::KeyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let spec = audited(s, &op, "CreateKey", &r.environment, true, async || {
            ops::create_key_alias(
                s,
                &r.environment,
                &r.alias,
                &r.algorithm,
                (r.repositories.clone(), r.refs.clone()),
                &r.purposes,
            )
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn rotate_key(&self, req: Request<v1::KeyRef>) -> R<v1::KeyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let spec = audited(s, &op, "RotateKey", &r.environment, true, async || {
            ops::rotate_key(s, &r.environment, &r.alias)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn disable_key(&self, req: Request<v1::KeyRef>) -> R<v1::KeyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let spec = audited(s, &op, "DisableKey", &r.environment, true, async || {
            ops::disable_key(s, &r.environment, &r.alias)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn create_key_csr(&self, req: Request<v1::KeyCsrRequest>) -> R<v1::KeyCsr> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let subject = ops::CsrSubject {
            common_name: r.common_name.clone(),
            email: r.email.clone(),
            organization: r.organization.clone(),
            country: r.country.clone(),
        };
        let (key_id, csr_pem) = audited(s, &op, "CreateKeyCsr", &r.environment, true, async || {
            ops::key_csr(s, &r.environment, &r.alias, &subject)
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::KeyCsr { key_id, csr_pem }))
    }

    async fn set_key_certificate(
        &self,
        req: Request<v1::SetKeyCertificateRequest>,
    ) -> R<v1::KeyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let s = &self.0;
        let spec = audited(
            s,
            &op,
            "SetKeyCertificate",
            &r.environment,
            true,
            async || ops::set_key_certificate(s, &r.environment, &r.alias, &r.chain_pem),
        )
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn import_key(&self, req: Request<v1::ImportKeyRequest>) -> R<v1::KeyInfo> {
        let op = self.operator(&req)?;
        let r = req.into_inner();
        let pem = zeroize::Zeroizing::new(r.pkcs8_pem);
        let s = &self.0;
        let spec = audited(s, &op, "ImportKey", &r.environment, true, async || {
            ops::import_key(
                s,
                &r.environment,
                &r.alias,
                &pem,
                &r.chain_pem,
                (r.repositories.clone(), r.refs.clone()),
                &r.purposes,
            )
        })
        .await
        .map_err(IntoStatus::into_status)?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }
}
