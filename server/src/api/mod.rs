//! tonic services: proto ⇄ typed core. The only module that knows tonic, and the one place
//! where every error enum becomes a `tonic::Status` ([`IntoStatus`]). Internal detail is logged,
//! never returned.

use std::sync::Arc;

use meshsign_proto::v1::{
    self, enrollment_server::EnrollmentServer, signer_server::SignerServer,
    verification_server::VerificationServer,
};
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic::{Code, Request, Response, Status};

mod admin;
mod export;

pub use admin::AdminApi;

use crate::authz::{AuthzError, Caller};
use crate::enroll::{self, EnrollError, EnrollInput};
use crate::signing::{self, Payload, SignError, SignInput, SignOutput};
use crate::site::SiteState;

/// Maps a layer's error to a gRPC status: the code by kind, the message naming the check.
pub trait IntoStatus {
    /// The status to return.
    fn into_status(self) -> Status;
}

fn internal(e: &dyn std::fmt::Display, source: &dyn std::fmt::Debug) -> Status {
    tracing::error!(error = %e, detail = ?source, "internal error");
    Status::internal("internal error")
}

impl IntoStatus for EnrollError {
    fn into_status(self) -> Status {
        use EnrollError::*;
        let code = match &self {
            UnknownEnvironment(_) | Csr(_) | CsrKey | Fingerprint => Code::InvalidArgument,
            EnvironmentMismatch { .. } | PolicyDisabled(_) | BoundClaim { .. } | Revoked(_) => {
                Code::PermissionDenied
            }
            Malformed(_)
            | Algorithm(_)
            | UnknownKid(_)
            | Signature(_)
            | Issuer(_)
            | Audience(_)
            | Expired { .. }
            | NotYetValid { .. }
            | IssuedAt(_)
            | MissingJti
            | Replay(_) => Code::Unauthenticated,
            Region { .. } => Code::FailedPrecondition,
            Audit(_) => {
                return Status::unavailable(
                    "audit_unavailable: the audit log cannot be written; nothing was issued",
                );
            }
            Issue(_) | Store(_) => return internal(&self, &self),
        };
        Status::new(code, self.to_string())
    }
}

impl IntoStatus for AuthzError {
    fn into_status(self) -> Status {
        use AuthzError::*;
        let code = match &self {
            NoCertificate
            | BadCertificate(_)
            | UnknownCertificate(_)
            | Revoked { .. }
            | Expired { .. } => Code::Unauthenticated,
            Region { .. } => Code::FailedPrecondition,
            IssuerUntrusted(_)
            | PolicyDisabled(_)
            | KeyNotInPartition { .. }
            | Access { .. }
            | KeyDisabled(_) => Code::PermissionDenied,
            Store(_) => return internal(&self, &self),
        };
        Status::new(code, self.to_string())
    }
}

impl IntoStatus for SignError {
    fn into_status(self) -> Status {
        match self {
            SignError::Authz(e) => e.into_status(),
            SignError::Input { .. } => Status::invalid_argument(self.to_string()),
            SignError::Audit(_) => Status::unavailable(
                "audit_unavailable: the audit log cannot be written; nothing was signed",
            ),
            SignError::Custody(ref e) => internal(&self, e),
        }
    }
}

fn ts(unix: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix,
        nanos: 0,
    }
}

fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

// === Enrollment ===

/// The Enrollment service (enroll port).
#[derive(Debug, Clone)]
pub struct EnrollmentApi(pub Arc<SiteState>);

fn key_not_found(r: &v1::GetVerificationMaterialRequest) -> Status {
    Status::not_found(format!(
        "key: no key `{}` in environment `{}`",
        r.key_alias, r.environment
    ))
}

/// Public form of one key version.
pub(crate) fn verification_key(k: &crate::sign::LoadedKey, active: bool) -> v1::VerificationKey {
    v1::VerificationKey {
        key_id: k.record.key_id(),
        algorithm: k.record.algorithm.as_str().to_string(),
        public_key_der: k.record.public_key_der.clone(),
        certificate_chain: k.record.certificate_chain.clone(),
        created_at: Some(ts(k.record.created_at)),
        active,
    }
}

/// Public form of a runner CA record.
pub(crate) fn issuer_info(r: &crate::issuer::IssuerRecord) -> v1::IssuerInfo {
    v1::IssuerInfo {
        id: r.id.clone(),
        environment: r.partition.clone(),
        state: format!("{:?}", r.state).to_lowercase(),
        certificate_der: r.cert_der.clone(),
        created_at: Some(ts(r.created_at)),
        retire_after: r.retire_after.map(ts),
    }
}

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for EnrollmentApi {
    async fn get_trust_bundle(
        &self,
        req: Request<v1::GetTrustBundleRequest>,
    ) -> Result<Response<v1::TrustBundle>, Status> {
        let env = req.into_inner().environment;
        let issuers = self
            .0
            .issuers(&env)
            .map_err(|_| Status::not_found(format!("environment: no partition `{env}`")))?;
        let now = self.0.clock.unix();
        Ok(Response::new(v1::TrustBundle {
            environment: env,
            region: self.0.config().region.clone(),
            issuers: issuers.trusted(now).into_iter().map(issuer_info).collect(),
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
        };
        let out = enroll::enroll(&self.0, input)
            .await
            .map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::EnrollResponse {
            certificate_chain: out.chain,
            serial: out.serial_hex,
            not_after: Some(ts(out.not_after)),
            granted_ttl_seconds: u32::try_from(out.granted_ttl_seconds).unwrap_or(u32::MAX),
            spiffe_id: out.spiffe_id,
            environment: out.environment,
            region: out.region,
            trusted_issuers: out.trusted_issuers,
        }))
    }
}

// === Signer ===

/// The Signer service (sign port).
#[derive(Debug, Clone)]
pub struct SignerApi(pub Arc<SiteState>, Arc<CallerCache>);

type PeerCerts = Vec<rustls_pki_types::CertificateDer<'static>>;
/// Connection (address of its peer-certificate `Arc`) → that `Arc`, weakly, and its caller.
type CallerMap = std::collections::HashMap<usize, (std::sync::Weak<PeerCerts>, Arc<Caller>)>;

/// Parsed callers per connection. tonic hands every request of a connection the same
/// `Arc` of peer certificates, so the certificate is parsed once per connection; the `Weak`
/// makes sure a reused address is never mistaken for the old connection. Everything that can
/// change (revocation, expiry, policies, keys) is still checked per RPC in `authz`.
#[derive(Debug, Default)]
pub struct CallerCache(std::sync::Mutex<CallerMap>);

impl CallerCache {
    const MAX: usize = 4096;

    fn get_or_parse(
        &self,
        certs: &Arc<PeerCerts>,
        trust_domain: &str,
    ) -> Result<Arc<Caller>, AuthzError> {
        let key = Arc::as_ptr(certs) as usize;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((weak, caller)) = map.get(&key)
            && weak.upgrade().is_some_and(|live| Arc::ptr_eq(&live, certs))
        {
            return Ok(caller.clone());
        }
        let leaf = certs.first().ok_or(AuthzError::NoCertificate)?;
        let caller = Arc::new(Caller::from_cert_der(leaf, trust_domain)?);
        if map.len() >= Self::MAX {
            map.retain(|_, (weak, _)| weak.strong_count() > 0);
        }
        map.insert(key, (Arc::downgrade(certs), caller.clone()));
        Ok(caller)
    }
}

impl SignerApi {
    /// The Signer service for a site.
    pub fn new(state: Arc<SiteState>) -> Self {
        Self(state, Arc::default())
    }

    /// The typed caller from the peer certificate (the only place handlers see a certificate).
    fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Caller>, AuthzError> {
        let certs = req.peer_certs().ok_or(AuthzError::NoCertificate)?;
        self.1.get_or_parse(&certs, &self.0.config().trust_domain)
    }

    async fn run(
        &self,
        caller: Result<Arc<Caller>, AuthzError>,
        input: SignInput,
    ) -> Result<SignOutput, Status> {
        match caller {
            Ok(caller) => signing::sign(&self.0, &caller, input)
                .await
                .map_err(IntoStatus::into_status),
            Err(e) => {
                signing::refuse_uncallered(&self.0, &input, &e)
                    .await
                    .map_err(IntoStatus::into_status)?;
                Err(e.into_status())
            }
        }
    }
}

#[tonic::async_trait]
impl v1::signer_server::Signer for SignerApi {
    async fn revoke_self(
        &self,
        req: Request<v1::RevokeSelfRequest>,
    ) -> Result<Response<v1::RevokeSelfResponse>, Status> {
        let caller = self.caller(&req).map_err(IntoStatus::into_status)?;
        let peer = peer(&req);
        let reason = req.into_inner().reason;
        let result = crate::ops::revoke_self(&self.0, &caller.serial_hex, &reason).await;
        let mut rec = caller.audit_record("RevokeSelf", self.0.clock.unix(), &peer);
        rec.decision = if result.is_ok() { "allow" } else { "deny" }.into();
        rec.reason = result
            .as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.check())
            .into();
        rec.detail = reason.chars().take(200).collect();
        self.0.audit.record(rec).await.map_err(|_| {
            Status::unavailable("audit_unavailable: the audit log cannot be written")
        })?;
        result.map_err(IntoStatus::into_status)?;
        Ok(Response::new(v1::RevokeSelfResponse {
            serial: caller.serial_hex.clone(),
        }))
    }

    async fn sign(
        &self,
        req: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let (caller, peer) = (self.caller(&req), peer(&req));
        let r = req.into_inner();
        let payload = match r.input {
            Some(v1::sign_request::Input::Sha256Digest(d)) => Payload::Digest(d),
            Some(v1::sign_request::Input::Message(m)) => Payload::Message(m),
            Some(v1::sign_request::Input::AppleCmsSignedAttributes(a)) => Payload::AppleCms(a),
            None => Payload::Missing,
        };
        let input = SignInput {
            rpc: "Sign",
            alias: r.key_alias,
            payload,
            artifact: r.artifact_name,
            algorithm: r.algorithm,
            peer,
        };
        let mut out = self.run(caller, input).await?;
        Ok(Response::new(v1::SignResponse {
            signature: out.signatures.pop().unwrap_or_default(),
            algorithm: out.algorithm.to_string(),
            key_id: out.key_id,
            public_key_der: out.public_key_der,
            certificate_chain: out.certificate_chain,
            audit_id: out.audit_id,
            audit_seq: out.audit_seq,
            audit_hash: out.audit_hash,
            signed_at: Some(ts(out.signed_at)),
            sha256_digest: out.digests.first().map(|d| d.to_vec()).unwrap_or_default(),
        }))
    }

    async fn sign_batch(
        &self,
        req: Request<v1::SignBatchRequest>,
    ) -> Result<Response<v1::SignBatchResponse>, Status> {
        let (caller, peer) = (self.caller(&req), peer(&req));
        let r = req.into_inner();
        let input = SignInput {
            rpc: "SignBatch",
            alias: r.key_alias,
            payload: Payload::Batch(r.sha256_digests),
            artifact: r.artifact_name,
            algorithm: r.algorithm,
            peer,
        };
        let out = self.run(caller, input).await?;
        Ok(Response::new(v1::SignBatchResponse {
            signatures: out.signatures,
            algorithm: out.algorithm.to_string(),
            key_id: out.key_id,
            public_key_der: out.public_key_der,
            certificate_chain: out.certificate_chain,
            audit_id: out.audit_id,
            audit_seq: out.audit_seq,
            audit_hash: out.audit_hash,
            signed_at: Some(ts(out.signed_at)),
        }))
    }
}

// === Verification ===

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
            .ok_or_else(|| key_not_found(&r))?;
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
        let versions = ring
            .versions(&r.environment, &r.key_alias)
            .ok_or_else(|| key_not_found(&r))?;
        let last = versions.len().saturating_sub(1);
        let keys = versions
            .iter()
            .enumerate()
            .map(|(i, k)| verification_key(k, i == last))
            .collect();
        Ok(Response::new(v1::GetVerificationMaterialResponse {
            environment: r.environment,
            region: self.0.config().region.clone(),
            keys,
        }))
    }
}

// === routers ===

/// The three ports' routers.
pub struct Routers {
    /// Enrollment + Verification + reflection.
    pub enroll: Router,
    /// Signer + reflection.
    pub sign: Router,
    /// Admin + reflection.
    pub admin: Router,
}

/// Adds reflection (v1 and v1alpha), listing only the services this port serves, to `router`
/// (or starts a router on `server` with it).
fn with_reflection(
    mut server: Server,
    router: Option<Router>,
    services: &[&str],
) -> Result<Router, String> {
    let b = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshsign_proto::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    let v1 = b().build_v1().map_err(|e| e.to_string())?;
    let v1alpha = b().build_v1alpha().map_err(|e| e.to_string())?;
    let router = match router {
        Some(r) => r.add_service(v1),
        None => server.add_service(v1),
    };
    Ok(router.add_service(v1alpha))
}

/// Builds the routers for a site.
pub fn routers(state: Arc<SiteState>) -> Result<Routers, String> {
    let server = || {
        Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
    };
    let enroll = server()
        .add_service(EnrollmentServer::new(EnrollmentApi(state.clone())))
        .add_service(VerificationServer::new(VerificationApi(state.clone())));
    let enroll = with_reflection(
        server(),
        Some(enroll),
        &["meshsign.v1.Enrollment", "meshsign.v1.Verification"],
    )?;
    let sign = server().add_service(SignerServer::new(SignerApi::new(state.clone())));
    let sign = with_reflection(server(), Some(sign), &["meshsign.v1.Signer"])?;
    let admin = server().add_service(v1::admin_server::AdminServer::new(AdminApi(state.clone())));
    let admin = with_reflection(server(), Some(admin), &["meshsign.v1.Admin"])?;
    Ok(Routers {
        enroll,
        sign,
        admin,
    })
}
