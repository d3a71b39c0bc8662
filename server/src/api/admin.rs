//! The Admin service (admin port): proto ⇄ `ops`. The operator comes from the peer certificate
//! (`spiffe://<td>/ops/<role>/<name>`); every handler goes through one wrapper ([`AdminApi::call`])
//! into `ops::admin`, which takes the RPC's role and review rule from the table
//! ([`crate::model::admin::ADMIN_RPCS`]), checks them and audits the action. A call whose
//! certificate names no operator is refused and audited too.
//!
//! Owns: proto ⇄ typed conversion for the Admin service. Must not touch: ops policy.

use std::sync::Arc;

use meshsign_proto::v1;
use tonic::{Request, Response, Status};

use super::status::status;
use super::{peer, runner_ca_info, ts};
use crate::config::{KeySpec, TrustPolicy};
use crate::identity::{IdentityError, Operator};
use crate::model::admin::{Review, admin_rpc};
use crate::model::{RevocationKind, RevocationRule, bounded};
use crate::ops::revocations::RevokeInput;
use crate::ops::{self, OpsError};
use crate::state::SiteState;

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminApi(pub Arc<SiteState>);

impl AdminApi {
    /// The operator from the peer certificate; a certificate that names none is refused and
    /// the refusal audited under `rpc`.
    async fn operator<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Operator, Status> {
        let certs = req.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let parsed = match leaf {
            Some(leaf) => Operator::from_cert_der(leaf, &self.0.config().trust_domain),
            None => Err(IdentityError::NoCertificate),
        };
        match parsed {
            Ok(op) => Ok(op),
            Err(e) => Err(status(&ops::refuse_unidentified(
                &self.0,
                rpc,
                &peer(req),
                leaf.map(|c| c.as_ref()),
                e,
            ))),
        }
    }

    /// The one admin wrapper: names the operator from the peer certificate, then runs `f`
    /// through [`ops::admin`] under the rule the table gives `rpc` (role, lock, review, audit).
    /// `summary` says what a change does, for an approver (reads have none).
    async fn call<M: prost::Message, T>(
        &self,
        req: &Request<M>,
        rpc: &'static str,
        environment: &str,
        summary: impl FnOnce(&M) -> String,
        f: impl AsyncFnOnce(&Operator) -> Result<(T, String), OpsError>,
    ) -> Result<T, Status> {
        self.call_unless(req, rpc, environment, summary, |_| Ok(None), f)
            .await
    }

    /// [`Self::call`] with an exemption from review, checked under the ops lock.
    async fn call_unless<M: prost::Message, T>(
        &self,
        req: &Request<M>,
        rpc: &'static str,
        environment: &str,
        summary: impl FnOnce(&M) -> String,
        exempt: impl FnOnce(&Operator) -> Result<Option<String>, OpsError>,
        f: impl AsyncFnOnce(&Operator) -> Result<(T, String), OpsError>,
    ) -> Result<T, Status> {
        let op = self.operator(req, rpc).await?;
        let reviewed = admin_rpc(rpc).is_some_and(|r| r.review == Review::Request);
        // Zeroized after use: an import carries a private key.
        let (request, summary) = match reviewed {
            true => (
                zeroize::Zeroizing::new(req.get_ref().encode_to_vec()),
                summary(req.get_ref()),
            ),
            false => (zeroize::Zeroizing::new(Vec::new()), String::new()),
        };
        ops::admin(
            &self.0,
            &op,
            rpc,
            environment,
            (&request, &summary),
            || exempt(&op),
            async || f(&op).await,
        )
        .await
        .map_err(|e| status(&e))
    }
}

/// The summary of a call review never covers: none.
fn no_summary<M>(_: &M) -> String {
    String::new()
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
            .map(|(i, k)| super::verification_key(k, i == last && !spec.disabled, &spec.purposes))
            .collect(),
        disabled: spec.disabled,
        repositories: spec.access.repositories.clone(),
        refs: spec.access.refs.clone(),
        backend: match versions.last() {
            Some(k) if k.record.pkcs11.is_some() => "pkcs11",
            _ => "software",
        }
        .into(),
    }
}

/// Whether a key version `age_seconds` old is due for rotation (`0` days: never).
/// Whether an active runner CA is older than `[keys] runner_ca_rotation_days`.
pub(crate) fn runner_ca_rotation_due(
    r: &crate::ca::RunnerCaRecord,
    now: i64,
    cfg: &crate::config::SiteConfig,
) -> bool {
    r.state == crate::ca::RunnerCaState::Active
        && rotation_due(now - r.created_at, cfg.keys.runner_ca_rotation_days)
}

pub(crate) fn rotation_due(age_seconds: i64, rotation_age_days: u64) -> bool {
    rotation_age_days > 0
        && age_seconds > i64::try_from(rotation_age_days.saturating_mul(86_400)).unwrap_or(i64::MAX)
}

fn rule_info(r: &RevocationRule) -> v1::RevocationRule {
    let mut rule = v1::RevocationRule {
        id: r.id.clone(),
        value: r.value.clone(),
        region: r.region.clone().unwrap_or_default(),
        since: r.since.unwrap_or(0),
        until: r.until.unwrap_or(0),
        reason: r.reason.clone(),
        operator: r.operator.clone(),
        created_at: Some(ts(r.created_at)),
        ..Default::default()
    };
    rule.set_kind(r.kind.as_str());
    rule
}

type R<T> = Result<Response<T>, Status>;

fn proposal_info(p: &ops::review::Proposal, now: i64) -> v1::ProposalInfo {
    v1::ProposalInfo {
        id: p.id.clone(),
        operation: p.operation.clone(),
        environment: p.environment.clone(),
        summary: p.summary.clone(),
        proposer: p.proposer.clone(),
        state: v1::ProposalState::from_word(p.state(now).as_str()).unwrap_or_default() as i32,
        created_at: Some(ts(p.created_at)),
        expires_at: Some(ts(p.expires_at)),
        approver: p.approver.clone().unwrap_or_default(),
        executed_by: p.executed_by.clone().unwrap_or_default(),
        request_sha256: p.request_sha256.clone(),
    }
}

/// Streams JSON lines of the audit log.
pub type ExportStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ExportLine, Status>> + Send>>;

/// Streams a snapshot in chunks.
pub type SnapshotStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::SnapshotChunk, Status>> + Send>>;

/// Bytes per snapshot chunk.
const SNAPSHOT_CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminApi {
    type ExportAuditStream = ExportStream;
    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<v1::SnapshotRequest>) -> R<Self::SnapshotStream> {
        let s = &self.0;
        let summary = |_: &_| "snapshot of the site".into();
        let file = self
            .call(&req, "Snapshot", "", summary, async |_| {
                let file = s.snapshot_to_file().await?;
                let detail = format!(
                    "snapshot through audit seq {}, {} bytes",
                    file.seq, file.len
                );
                Ok((file, detail))
            })
            .await?;
        // Streamed from the file a chunk at a time (never the whole snapshot in memory); the
        // file is removed when the stream ends or the caller goes away.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK];
                let n = match file.read_some(&mut data) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(status(&OpsError::from(e))));
                        return;
                    }
                };
                data.truncate(n);
                if tx.blocking_send(Ok(v1::SnapshotChunk { data })).is_err() {
                    return; // the caller went away
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_audit_public_key(
        &self,
        req: Request<v1::GetAuditPublicKeyRequest>,
    ) -> R<v1::AuditPublicKey> {
        let s = &self.0;
        let (key_id, der) = self
            .call(&req, "GetAuditPublicKey", "", no_summary, async |_| {
                Ok((s.audit.public_key(), String::new()))
            })
            .await?;
        Ok(Response::new(v1::AuditPublicKey {
            key_id,
            public_key_der: der,
        }))
    }

    async fn export_audit(
        &self,
        req: Request<v1::ExportAuditRequest>,
    ) -> R<Self::ExportAuditStream> {
        let r = req.get_ref();
        let detail = format!(
            "export since_seq={} since_time={} follow={}",
            r.since_seq, r.since_time, r.follow
        );
        self.call(
            &req,
            "ExportAudit",
            &r.environment,
            no_summary,
            async |_| Ok(((), detail)),
        )
        .await?;
        let stream = super::export::stream(self.0.clone(), req.into_inner());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_issuers(
        &self,
        req: Request<v1::EnvironmentRequest>,
    ) -> R<v1::ListIssuersResponse> {
        let (s, env) = (&self.0, &req.get_ref().environment);
        let out = self
            .call(&req, "ListIssuers", env, no_summary, async |_| {
                Ok((ops::runner_cas::list(s, env)?, String::new()))
            })
            .await?;
        Ok(Response::new(v1::ListIssuersResponse {
            issuers: out.iter().map(runner_ca_info).collect(),
        }))
    }

    async fn stage_issuer(&self, req: Request<v1::EnvironmentRequest>) -> R<v1::IssuerInfo> {
        let (s, env) = (&self.0, &req.get_ref().environment);
        let summary = |_: &_| "stage a new runner CA".into();
        let r = self
            .call(&req, "StageIssuer", env, summary, async |_| {
                ops::runner_cas::stage(s, env)
            })
            .await?;
        Ok(Response::new(runner_ca_info(&r)))
    }

    async fn activate_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::IssuerRef| format!("activate runner CA `{}`", r.id);
        let out = self
            .call(
                &req,
                "ActivateIssuer",
                &r.environment,
                summary,
                async |_| ops::runner_cas::activate(s, &r.environment, &r.id),
            )
            .await?;
        Ok(Response::new(runner_ca_info(&out)))
    }

    async fn retire_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::IssuerRef| format!("retire runner CA `{}`", r.id);
        let out = self
            .call(&req, "RetireIssuer", &r.environment, summary, async |_| {
                ops::runner_cas::retire(s, &r.environment, &r.id)
            })
            .await?;
        Ok(Response::new(runner_ca_info(&out)))
    }

    async fn revoke_issuer(&self, req: Request<v1::IssuerRef>) -> R<v1::IssuerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::IssuerRef| format!("revoke runner CA `{}`", r.id);
        let out = self
            .call(&req, "RevokeIssuer", &r.environment, summary, async |_| {
                ops::runner_cas::revoke(s, &r.environment, &r.id, &r.reason)
            })
            .await?;
        Ok(Response::new(runner_ca_info(&out)))
    }

    async fn distrust(&self, req: Request<v1::DistrustRequest>) -> R<v1::DistrustList> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::DistrustRequest| {
            format!(
                "distrust in `{}`: job {:?} pipeline {:?} runner {:?} region {:?} key {:?}",
                r.environment, r.job_id, r.pipeline_id, r.runner_fingerprint, r.region, r.key_id
            )
        };
        let rule = ops::distrust::NewRule {
            job_id: r.job_id.clone(),
            pipeline_id: r.pipeline_id.clone(),
            runner_fingerprint: r.runner_fingerprint.clone(),
            region: r.region.clone(),
            key_id: r.key_id.clone(),
            not_before: r.not_before.map(|t| t.seconds),
            not_after: r.not_after.map(|t| t.seconds),
            reason: r.reason.clone(),
        };
        let out = self
            .call(&req, "Distrust", &r.environment, summary, async |op| {
                ops::distrust::add(s, op, &r.environment, rule)
            })
            .await?;
        Ok(Response::new(super::distrust_list(out)))
    }

    async fn undistrust(&self, req: Request<v1::UndistrustRequest>) -> R<v1::DistrustList> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::UndistrustRequest| {
            format!("remove distrust rule `{}` in `{}`", r.id, r.environment)
        };
        let out = self
            .call(&req, "Undistrust", &r.environment, summary, async |_| {
                ops::distrust::remove(s, &r.environment, &r.id)
            })
            .await?;
        Ok(Response::new(super::distrust_list(out)))
    }

    async fn revoke(&self, req: Request<v1::RevokeRequest>) -> R<v1::RevokeResponse> {
        let (s, r) = (&self.0, req.get_ref());
        let summary =
            |r: &v1::RevokeRequest| format!("revoke {:?} region={:?}", r.target, r.region);
        let target = match r.target.clone() {
            Some(v1::revoke_request::Target::Serial(v)) => Some((RevocationKind::Serial, v)),
            Some(v1::revoke_request::Target::JobId(v)) => Some((RevocationKind::JobId, v)),
            Some(v1::revoke_request::Target::PipelineId(v)) => {
                Some((RevocationKind::PipelineId, v))
            }
            Some(v1::revoke_request::Target::Fingerprint(v)) => {
                Some((RevocationKind::Fingerprint, v))
            }
            None => None,
        };
        let (rule, serials) = self
            .call(&req, "Revoke", "", summary, async |op| {
                let (kind, value) = target.ok_or_else(|| {
                    OpsError::Invalid("give one of serial, job_id, pipeline_id, fingerprint".into())
                })?;
                let input = RevokeInput {
                    kind,
                    value,
                    region: Some(r.region.clone()),
                    since: (r.since != 0).then_some(r.since),
                    until: (r.until != 0).then_some(r.until),
                    reason: r.reason.clone(),
                };
                ops::revocations::revoke(s, op, input)
            })
            .await?;
        Ok(Response::new(v1::RevokeResponse {
            serials,
            rule_id: rule.id,
        }))
    }

    async fn list_revocations(
        &self,
        req: Request<v1::ListRevocationsRequest>,
    ) -> R<v1::ListRevocationsResponse> {
        let s = &self.0;
        let rules = self
            .call(&req, "ListRevocations", "", no_summary, async |_| {
                Ok((s.revocations(), String::new()))
            })
            .await?;
        Ok(Response::new(v1::ListRevocationsResponse {
            rules: rules.iter().map(rule_info).collect(),
        }))
    }

    async fn status(&self, req: Request<v1::StatusRequest>) -> R<v1::SiteStatus> {
        let s = &self.0;
        self.call(&req, "Status", "", no_summary, async |_| {
            Ok(((), String::new()))
        })
        .await?;
        site_status(s).map(Response::new)
    }

    async fn get_job_usage(&self, req: Request<v1::JobUsageRequest>) -> R<v1::JobUsage> {
        let (s, r) = (&self.0, req.get_ref());
        let (usage, budgets) = self
            .call(
                &req,
                "GetJobUsage",
                &r.environment,
                no_summary,
                async |_| {
                    Ok((
                        ops::keys::job_usage(s, &r.environment, &r.job_id)?,
                        String::new(),
                    ))
                },
            )
            .await?;
        Ok(Response::new(v1::JobUsage {
            environment: r.environment.clone(),
            job_id: r.job_id.clone(),
            keys: usage
                .keys
                .into_iter()
                .map(|(alias, u)| {
                    let budget = budgets.get(&alias).copied().unwrap_or_default();
                    v1::KeyUsage {
                        key_alias: alias,
                        total: u.total,
                        by_certificate: u.by_certificate.into_iter().collect(),
                        per_job_budget: budget.per_job,
                        per_certificate_budget: budget.per_certificate,
                    }
                })
                .collect(),
        }))
    }

    async fn list_trust_policies(
        &self,
        req: Request<v1::EnvironmentRequest>,
    ) -> R<v1::ListTrustPoliciesResponse> {
        let (s, env) = (&self.0, &req.get_ref().environment);
        let cfg = self
            .call(&req, "ListTrustPolicies", env, no_summary, async |_| {
                let cfg = s.config();
                cfg.environment(env)
                    .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
                Ok((cfg, String::new()))
            })
            .await?;
        let policies = cfg
            .environment(env)
            .map(|p| {
                p.trust_policies
                    .iter()
                    .map(|t| policy_info(env, t))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::ListTrustPoliciesResponse { policies }))
    }

    async fn set_trust_policy_enabled(
        &self,
        req: Request<v1::SetTrustPolicyEnabledRequest>,
    ) -> R<v1::TrustPolicyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let rpc = if r.enabled {
            "EnableTrustPolicy"
        } else {
            "DisableTrustPolicy"
        };
        let summary = |r: &v1::SetTrustPolicyEnabledRequest| {
            format!(
                "{} trust policy of issuer `{}`{}",
                if r.enabled { "enable" } else { "disable" },
                r.issuer,
                if r.keep_sessions {
                    " (sessions kept)"
                } else {
                    ""
                }
            )
        };
        // Re-enabling a policy one disabled oneself needs no second admin.
        let exempt = |op: &Operator| match r.enabled {
            true => ops::trust::undoes_own_disable(s, &op.id, &r.environment, &r.issuer),
            false => Ok(None),
        };
        let t = self
            .call_unless(&req, rpc, &r.environment, summary, exempt, async |op| {
                ops::trust::set_policy_enabled(
                    s,
                    &op.id,
                    &r.environment,
                    &r.issuer,
                    r.enabled,
                    r.keep_sessions,
                )
            })
            .await?;
        Ok(Response::new(policy_info(&r.environment, &t)))
    }

    async fn set_jwks(&self, req: Request<v1::SetJwksRequest>) -> R<v1::TrustPolicyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::SetJwksRequest| {
            format!(
                "pin a new JWKS ({} bytes) for issuer `{}`",
                r.jwks_json.len(),
                r.issuer
            )
        };
        let t = self
            .call(&req, "SetJwks", &r.environment, summary, async |op| {
                ops::trust::set_jwks(s, &op.id, &r.environment, &r.issuer, &r.jwks_json)
            })
            .await?;
        Ok(Response::new(policy_info(&r.environment, &t)))
    }

    async fn list_keys(&self, req: Request<v1::EnvironmentRequest>) -> R<v1::ListKeysResponse> {
        let (s, env) = (&self.0, &req.get_ref().environment);
        let specs = self
            .call(&req, "ListKeys", env, no_summary, async |_| {
                Ok((ops::keys::list_keys(s, env)?, String::new()))
            })
            .await?;
        Ok(Response::new(v1::ListKeysResponse {
            keys: specs.iter().map(|k| key_info(s, env, k)).collect(),
        }))
    }

    async fn create_key(&self, req: Request<v1::CreateKeyRequest>) -> R<v1::KeyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary =
            |r: &v1::CreateKeyRequest| format!("create key `{}` ({})", r.alias, r.algorithm);
        let spec = self
            .call(&req, "CreateKey", &r.environment, summary, async |_| {
                ops::keys::create_key_alias(
                    s,
                    &r.environment,
                    &r.alias,
                    &r.algorithm,
                    (r.repositories.clone(), r.refs.clone()),
                    &r.purposes,
                    &r.backend,
                )
            })
            .await?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn rotate_key(&self, req: Request<v1::KeyRef>) -> R<v1::KeyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::KeyRef| format!("rotate key `{}`", r.alias);
        let spec = self
            .call(&req, "RotateKey", &r.environment, summary, async |_| {
                ops::keys::rotate_key(s, &r.environment, &r.alias)
            })
            .await?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn disable_key(&self, req: Request<v1::KeyRef>) -> R<v1::KeyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::KeyRef| format!("disable key `{}`", r.alias);
        let spec = self
            .call(&req, "DisableKey", &r.environment, summary, async |_| {
                ops::keys::disable_key(s, &r.environment, &r.alias)
            })
            .await?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn create_key_csr(&self, req: Request<v1::KeyCsrRequest>) -> R<v1::KeyCsr> {
        let (s, r) = (&self.0, req.get_ref());
        let summary =
            |r: &v1::KeyCsrRequest| format!("CSR for key `{}` (CN {})", r.alias, r.common_name);
        let subject = ops::keys::CsrSubject {
            common_name: r.common_name.clone(),
            email: r.email.clone(),
            organization: r.organization.clone(),
            country: r.country.clone(),
        };
        let (key_id, csr_pem) = self
            .call(&req, "CreateKeyCsr", &r.environment, summary, async |_| {
                ops::keys::key_csr(s, &r.environment, &r.alias, &subject)
            })
            .await?;
        Ok(Response::new(v1::KeyCsr { key_id, csr_pem }))
    }

    async fn set_key_certificate(
        &self,
        req: Request<v1::SetKeyCertificateRequest>,
    ) -> R<v1::KeyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::SetKeyCertificateRequest| {
            format!("attach a certificate chain to key `{}`", r.alias)
        };
        let spec = self
            .call(
                &req,
                "SetKeyCertificate",
                &r.environment,
                summary,
                async |_| ops::keys::set_key_certificate(s, &r.environment, &r.alias, &r.chain_pem),
            )
            .await?;
        Ok(Response::new(key_info(s, &r.environment, &spec)))
    }

    async fn import_key(&self, req: Request<v1::ImportKeyRequest>) -> R<v1::KeyInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let key_sha256 = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &r.pkcs8_pem,
        ));
        // The request's digest (which a proposal binds) covers the key: an approval is for this
        // key, not any key under the alias; the summary names it by its SHA-256.
        let summary = |r: &v1::ImportKeyRequest| {
            format!(
                "import a key as `{}` (private key sha256 {key_sha256})",
                r.alias
            )
        };
        let spec = self
            .call(&req, "ImportKey", &r.environment, summary, async |_| {
                ops::keys::import_key(
                    s,
                    &r.environment,
                    &r.alias,
                    (&r.pkcs8_pem, &r.chain_pem),
                    (r.repositories.clone(), r.refs.clone()),
                    &r.purposes,
                    &r.backend,
                    &ops::keys::AscInput {
                        key_id: r.asc_key_id.clone(),
                        issuer_id: r.asc_issuer_id.clone(),
                        individual: r.asc_individual,
                        scopes: r.asc_scopes.clone(),
                    },
                )
            })
            .await;
        // The key is zeroized once handled, refused or not.
        let environment = r.environment.clone();
        drop(zeroize::Zeroizing::new(req.into_inner().pkcs8_pem));
        Ok(Response::new(key_info(s, &environment, &spec?)))
    }

    async fn list_proposals(
        &self,
        req: Request<v1::ListProposalsRequest>,
    ) -> R<v1::ListProposalsResponse> {
        let s = &self.0;
        let all = self
            .call(&req, "ListProposals", "", no_summary, async |_| {
                Ok((ops::review::list(s)?, String::new()))
            })
            .await?;
        let now = s.clock.unix();
        Ok(Response::new(v1::ListProposalsResponse {
            proposals: all.iter().map(|p| proposal_info(p, now)).collect(),
        }))
    }

    async fn approve_proposal(
        &self,
        req: Request<v1::ApproveProposalRequest>,
    ) -> R<v1::ProposalInfo> {
        let (s, id) = (&self.0, &req.get_ref().id);
        let p = self
            .call(&req, "ApproveProposal", "", no_summary, async |op| {
                ops::review::approve(s, op, id)
            })
            .await?;
        Ok(Response::new(proposal_info(&p, s.clock.unix())))
    }

    async fn propose_config(&self, req: Request<v1::ProposeConfigRequest>) -> R<v1::ProposalInfo> {
        let (s, sha) = (&self.0, &req.get_ref().config_sha256);
        let summary = config_proposal_summary(s, sha);
        let p = self
            .call(&req, "ProposeConfig", "", no_summary, async |op| {
                ops::review::propose_config(s, op, sha, &summary)
            })
            .await?;
        Ok(Response::new(proposal_info(&p, s.clock.unix())))
    }

    async fn set_audit_retention(
        &self,
        req: Request<v1::SetAuditRetentionRequest>,
    ) -> R<v1::SetAuditRetentionResponse> {
        let (s, days) = (&self.0, req.get_ref().retention_days);
        let summary = |_: &_| format!("keep audit entries {days} days");
        let retention_days = self
            .call(&req, "SetAuditRetention", "", summary, async |_| {
                ops::housekeeping::set_retention(s, days)
            })
            .await?;
        Ok(Response::new(v1::SetAuditRetentionResponse {
            retention_days,
        }))
    }

    async fn register_runner(&self, req: Request<v1::RegisterRunnerRequest>) -> R<v1::RunnerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::RegisterRunnerRequest| {
            format!(
                "register the runner of request sha256 {} for [{}] labels [{}]",
                hex::encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    &r.request
                )),
                bounded(&r.environments.join(", "), 300),
                bounded(&r.labels.join(", "), 300)
            )
        };
        let rec = self
            .call(&req, "RegisterRunner", "", summary, async |op| {
                let input = ops::runners::RegisterInput {
                    request: r.request.clone(),
                    environments: r.environments.clone(),
                    labels: r.labels.clone(),
                };
                ops::runners::register(s, op, input)
            })
            .await?;
        Ok(Response::new(runner_info(&rec)))
    }

    async fn list_runners(
        &self,
        req: Request<v1::ListRunnersRequest>,
    ) -> R<v1::ListRunnersResponse> {
        let s = &self.0;
        let runners = self
            .call(&req, "ListRunners", "", no_summary, async |_| {
                Ok((ops::runners::list(s)?, String::new()))
            })
            .await?;
        Ok(Response::new(v1::ListRunnersResponse {
            runners: runners.iter().map(runner_info).collect(),
        }))
    }

    async fn get_runner(&self, req: Request<v1::RunnerRef>) -> R<v1::RunnerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let rec = self
            .call(&req, "GetRunner", "", no_summary, async |_| {
                Ok((ops::runners::get(s, &r.fingerprint)?, String::new()))
            })
            .await?;
        Ok(Response::new(runner_info(&rec)))
    }

    async fn retire_runner(&self, req: Request<v1::RunnerRef>) -> R<v1::RunnerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::RunnerRef| {
            format!(
                "retire runner {} ({})",
                bounded(&r.fingerprint, 64),
                bounded(&r.reason, 200)
            )
        };
        let rec = self
            .call(&req, "RetireRunner", "", summary, async |op| {
                ops::runners::retire(s, op, &r.fingerprint, &r.reason)
            })
            .await?;
        Ok(Response::new(runner_info(&rec)))
    }

    async fn revoke_runner(&self, req: Request<v1::RunnerRef>) -> R<v1::RunnerInfo> {
        let (s, r) = (&self.0, req.get_ref());
        let summary = |r: &v1::RunnerRef| {
            format!(
                "revoke runner {} ({})",
                bounded(&r.fingerprint, 64),
                bounded(&r.reason, 200)
            )
        };
        let rec = self
            .call(&req, "RevokeRunner", "", summary, async |op| {
                ops::runners::revoke_runner(s, op, &r.fingerprint, &r.reason)
            })
            .await?;
        Ok(Response::new(runner_info(&rec)))
    }
}

fn runner_info(r: &crate::model::runner::RunnerRecord) -> v1::RunnerInfo {
    v1::RunnerInfo {
        fingerprint: r.fingerprint.clone(),
        backend: r.backend.as_str().into(),
        hostname: r.hostname.clone(),
        instance: r.instance.clone(),
        os_user: r.os_user.clone(),
        state: r.state.as_str().into(),
        environments: r.environments.clone(),
        labels: r.labels.clone(),
        registered_at: Some(ts(r.registered_at)),
        registered_by: r.registered_by.clone(),
        changed_at: Some(ts(r.changed_at)),
        changed_by: r.changed_by.clone(),
        reason: r.reason.clone(),
        spki: r.spki_der(),
        ek_pub: hex::decode(&r.ek_pub).unwrap_or_default(),
        ek_cert: hex::decode(&r.ek_cert).unwrap_or_default(),
    }
}

/// The site's status (after the `Status` call was authorized and audited).
fn site_status(s: &SiteState) -> Result<v1::SiteStatus, Status> {
    let now = s.clock.unix();
    let cfg = s.config();
    let keys = s.keys();
    let last = s
        .metrics
        .last_checkpoint_unix
        .load(std::sync::atomic::Ordering::Relaxed);
    let abandoned = s
        .abandoned_since(now - 3600, 100_000)
        .map_err(|e| status(&OpsError::from(e)))?;
    let environments = cfg
        .environments
        .iter()
        .map(|e| v1::EnvironmentStatus {
            sessions_abandoned_last_hour: abandoned.get(&e.name).copied().unwrap_or(0),
            name: e.name.clone(),
            audience: e.audience.clone(),
            runner_cas: s
                .runner_cas(&e.name)
                .map(|cas| {
                    cas.trusted(now)
                        .into_iter()
                        .map(|r| {
                            let mut info = runner_ca_info(r);
                            info.rotation_due = runner_ca_rotation_due(r, now, &cfg);
                            info
                        })
                        .collect()
                })
                .unwrap_or_default(),
            keys: e
                .signing_keys
                .iter()
                .map(|k| {
                    let newest = keys
                        .versions(&e.name, &k.alias)
                        .and_then(|v| v.last())
                        .map(|v| (v.record.version, v.record.created_at));
                    v1::KeyStatus {
                        alias: k.alias.clone(),
                        algorithm: k.algorithm.as_str().to_string(),
                        newest_version: newest.map_or(0, |n| n.0),
                        newest_age_days: newest.map_or(0.0, |n| (now - n.1) as f64 / 86_400.0),
                        disabled: k.disabled,
                        rotation_due: newest
                            .is_some_and(|n| rotation_due(now - n.1, cfg.keys.rotation_age_days)),
                    }
                })
                .collect(),
            trust_policies: e
                .trust_policies
                .iter()
                .map(|t| policy_info(&e.name, t))
                .collect(),
        })
        .collect();
    let mut st = v1::SiteStatus {
        region: cfg.region.clone(),
        writable: !s.audit.is_failing(),
        audit_head_seq: *s.audit.head().borrow(),
        last_checkpoint_age_seconds: if last > 0 { now - last } else { -1 },
        revocation_rules: u32::try_from(s.revocations().len()).unwrap_or(u32::MAX),
        environments,
        audit_retention_days: ops::housekeeping::retention_days(s).map_err(|e| status(&e))?,
        reviewed_operations: cfg.review.operations.iter().cloned().collect(),
        pending_proposals: u32::try_from(
            ops::review::list(s)
                .map_err(|e| status(&e))?
                .iter()
                .filter(|p| p.state(now) == ops::review::ProposalState::Pending)
                .count(),
        )
        .unwrap_or(u32::MAX),
        last_reload: s.last_reload().map(|r| v1::ReloadStatus {
            at: Some(ts(r.at)),
            applied: r.applied,
            config_sha256: r.config_sha256.clone(),
            message: r.message.clone(),
            changes_json: r.changes_json.clone(),
            widens: r.widens,
        }),
        ..Default::default()
    };
    st.set_engine_word(if cfg.postgres.is_some() {
        "postgres"
    } else {
        "sled"
    });
    Ok(st)
}

/// What an approver of a config proposal is asked to approve: the widening this replica
/// refused for that file, when it saw it.
fn config_proposal_summary(s: &SiteState, sha: &str) -> String {
    let short: String = sha.chars().take(12).collect();
    match s.last_reload() {
        Some(r) if r.config_sha256 == sha && !r.applied => {
            let changes: Vec<serde_json::Value> =
                serde_json::from_str(&r.changes_json).unwrap_or_default();
            let widening: Vec<String> = changes
                .iter()
                .filter(|c| c["widens"] == true)
                .map(|c| {
                    format!(
                        "{} {}",
                        c["at"].as_str().unwrap_or(""),
                        c["change"].as_str().unwrap_or("")
                    )
                })
                .collect();
            format!(
                "reload config {short}…, which widens: {}",
                widening.join("; ")
            )
        }
        _ => format!("reload config {short}… (not yet read by this replica)"),
    }
}

#[cfg(test)]
mod tests {
    use crate::model::admin::{ADMIN_RPCS, admin_rpc};
    use prost::Message as _;

    /// The table and the contract name the same operations: every Admin RPC has a rule, and
    /// every rule is an RPC (or one of the names an RPC is audited as, or the SIGHUP reload).
    #[test]
    fn every_admin_rpc_has_one_rule_in_the_table() -> Result<(), Box<dyn std::error::Error>> {
        let fds = prost_types::FileDescriptorSet::decode(meshsign_proto::FILE_DESCRIPTOR_SET)?;
        let admin = fds
            .file
            .iter()
            .filter(|f| f.package() == "meshsign.v1")
            .flat_map(|f| f.service.iter())
            .find(|s| s.name() == "Admin")
            .ok_or("no Admin service in the contract")?;
        let methods: Vec<&str> = admin.method.iter().map(|m| m.name()).collect();
        fn audited_as(m: &str) -> Vec<&str> {
            match m {
                "SetTrustPolicyEnabled" => vec!["EnableTrustPolicy", "DisableTrustPolicy"],
                m => vec![m],
            }
        }
        for m in &methods {
            for name in audited_as(m) {
                assert!(admin_rpc(name).is_some(), "Admin.{name} has no rule");
            }
        }
        for r in ADMIN_RPCS {
            assert!(
                r.name == "Reload" || methods.iter().any(|m| audited_as(m).contains(&r.name)),
                "rule {} is no Admin RPC",
                r.name
            );
        }
        Ok(())
    }
}
