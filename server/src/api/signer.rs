//! The sign port's service: Sign, SignBatch, RevokeSelf. The peer certificate becomes a typed
//! [`Caller`] here, once per connection; every check that can change is made per RPC by
//! `sign::checks`.
//!
//! Owns: the per-connection caller cache and proto ⇄ typed conversion. Must not touch: the
//! checks (`sign::checks`).

use std::sync::Arc;

use meshsign_proto::v1;
use tonic::{Request, Response, Status};

use super::status::status;
use super::{peer, ts};
use crate::identity::{Caller, IdentityError};
use crate::sign::{self, Payload, SignInput, SignOutput};
use crate::state::SiteState;

type PeerCerts = Vec<rustls_pki_types::CertificateDer<'static>>;
/// Connection (address of its peer-certificate `Arc`) → that `Arc`, weakly, and its caller.
type CallerMap = std::collections::HashMap<usize, (std::sync::Weak<PeerCerts>, Arc<Caller>)>;

/// Parsed callers per connection. tonic hands every request of a connection the same
/// `Arc` of peer certificates, so the certificate is parsed once per connection; the `Weak`
/// makes sure a reused address is never mistaken for the old connection. Everything that can
/// change (revocation, expiry, policies, keys) is still checked per RPC in `sign::checks`.
#[derive(Debug, Default)]
pub struct CallerCache(std::sync::Mutex<CallerMap>);

impl CallerCache {
    const MAX: usize = 4096;

    fn get_or_parse(
        &self,
        certs: &Arc<PeerCerts>,
        trust_domain: &str,
    ) -> Result<Arc<Caller>, IdentityError> {
        let key = Arc::as_ptr(certs) as usize;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((weak, caller)) = map.get(&key)
            && weak.upgrade().is_some_and(|live| Arc::ptr_eq(&live, certs))
        {
            return Ok(caller.clone());
        }
        let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
        let caller = Arc::new(Caller::from_cert_der(leaf, trust_domain)?);
        if map.len() >= Self::MAX {
            map.retain(|_, (weak, _)| weak.strong_count() > 0);
        }
        map.insert(key, (Arc::downgrade(certs), caller.clone()));
        Ok(caller)
    }
}

/// The Signer service (sign port).
#[derive(Debug, Clone)]
pub struct SignerApi(Arc<SiteState>, Arc<CallerCache>);

impl SignerApi {
    /// The Signer service for a site.
    pub fn new(state: Arc<SiteState>) -> Self {
        Self(state, Arc::default())
    }

    /// The typed caller from the peer certificate (the only place a handler sees one).
    fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Caller>, IdentityError> {
        let certs = req.peer_certs().ok_or(IdentityError::NoCertificate)?;
        self.1.get_or_parse(&certs, &self.0.config().trust_domain)
    }

    /// The caller of an RPC that carries no signing input (RevokeSelf, Renew); an
    /// unidentified one is refused and audited under `rpc`.
    async fn identified<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        peer: &str,
    ) -> Result<Arc<Caller>, Status> {
        match self.caller(req) {
            Ok(c) => Ok(c),
            Err(e) => {
                let input = SignInput {
                    rpc,
                    alias: String::new(),
                    payload: Payload::Missing,
                    artifact: String::new(),
                    algorithm: String::new(),
                    peer: peer.to_string(),
                    promise: false,
                };
                Err(status(&sign::refuse_unidentified(&self.0, &input, e).await))
            }
        }
    }

    /// The transparency log's id (SHA-256 of the audit key's SPKI).
    fn log_id(&self) -> [u8; 32] {
        meshsign_evidence::rekor::log_id(self.0.audit.key().backend.public_key_der())
    }

    async fn sign(
        &self,
        caller: Result<Arc<Caller>, IdentityError>,
        input: SignInput,
    ) -> Result<SignOutput, Status> {
        match caller {
            Ok(caller) => sign::sign(&self.0, &caller, input)
                .await
                .map_err(|e| status(&e)),
            Err(e) => Err(status(&sign::refuse_unidentified(&self.0, &input, e).await)),
        }
    }
}

#[tonic::async_trait]
impl v1::signer_server::Signer for SignerApi {
    async fn asc_token(
        &self,
        req: Request<v1::AscTokenRequest>,
    ) -> Result<Response<v1::AscTokenResponse>, Status> {
        let peer = peer(&req);
        let caller = self.identified(&req, "AscToken", &peer).await?;
        let r = req.into_inner();
        let input = sign::asc::AscTokenInput {
            alias: r.key_alias,
            scopes: r.scopes,
            ttl_seconds: u64::from(r.ttl_seconds),
            peer,
        };
        let out = sign::asc::asc_token(&self.0, &caller, input)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(v1::AscTokenResponse {
            token: out.token,
            expires_at: Some(ts(out.expires_at)),
            scopes: out.scopes,
            key_id: out.key_id,
            audit_id: out.audit_id,
        }))
    }

    async fn attest(
        &self,
        req: Request<v1::AttestRequest>,
    ) -> Result<Response<v1::AttestResponse>, Status> {
        let peer = peer(&req);
        let caller = self.identified(&req, "Attest", &peer).await?;
        let r = req.into_inner();
        let input = sign::attest::AttestInput {
            alias: r.key_alias,
            subjects: r
                .subjects
                .into_iter()
                .map(|s| (s.name, s.sha256_digest))
                .collect(),
            predicate_type: r.predicate_type,
            peer,
        };
        let out = sign::attest::attest(&self.0, &caller, input)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(v1::AttestResponse {
            envelope_json: out.envelope_json,
            key_id: out.key_id,
            algorithm: out.algorithm.to_string(),
            public_key_der: out.public_key_der,
            audit_id: out.audit_id,
            audit_seq: out.audit_seq,
            audit_hash: out.audit_hash,
            audit_entry: out.audit_entry,
            transparency_entry: Some(transparency_entry(out.transparency, &self.log_id())),
        }))
    }

    async fn revoke_self(
        &self,
        req: Request<v1::RevokeSelfRequest>,
    ) -> Result<Response<v1::RevokeSelfResponse>, Status> {
        let peer = peer(&req);
        let caller = self.identified(&req, "RevokeSelf", &peer).await?;
        let reason = req.into_inner().reason;
        let serial = sign::revoke_self(&self.0, &caller, &reason, &peer)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(v1::RevokeSelfResponse { serial }))
    }

    async fn renew(
        &self,
        req: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let peer = peer(&req);
        let caller = self.identified(&req, "Renew", &peer).await?;
        let r = req.into_inner();
        let out = sign::renew(
            &self.0,
            &caller,
            sign::RenewInput {
                csr_der: r.csr_der,
                requested_ttl_seconds: u64::from(r.requested_ttl_seconds),
                peer,
                device_proof: r.device_proof.map(|p| crate::state::runners::DeviceProof {
                    spki: p.spki,
                    signature: p.signature,
                }),
            },
        )
        .await
        .map_err(|e| status(&e))?;
        Ok(Response::new(super::enroll_response(out)))
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
            promise: r.signed_entry_timestamp,
        };
        let mut out = self.sign(caller, input).await?;
        let log_id = self.log_id();
        Ok(Response::new(v1::SignResponse {
            signature: out.signatures.pop().unwrap_or_default(),
            algorithm: out.algorithm.to_string(),
            key_id: out.key_id,
            public_key_der: out.public_key_der,
            certificate_chain: out.certificate_chain,
            audit_id: out.audit_id,
            audit_seq: out.audit_seq,
            audit_hash: out.audit_hash,
            audit_entry: out.audit_entry,
            signed_at: Some(ts(out.signed_at)),
            sha256_digest: out.digests.first().map(|d| d.to_vec()).unwrap_or_default(),
            transparency_entry: out
                .transparency
                .pop()
                .map(|e| transparency_entry(e, &log_id)),
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
            promise: r.signed_entry_timestamp,
        };
        let out = self.sign(caller, input).await?;
        let log_id = self.log_id();
        Ok(Response::new(v1::SignBatchResponse {
            transparency_entries: out
                .transparency
                .into_iter()
                .map(|e| transparency_entry(e, &log_id))
                .collect(),
            signatures: out.signatures,
            algorithm: out.algorithm.to_string(),
            key_id: out.key_id,
            public_key_der: out.public_key_der,
            certificate_chain: out.certificate_chain,
            audit_id: out.audit_id,
            audit_seq: out.audit_seq,
            audit_hash: out.audit_hash,
            audit_entry: out.audit_entry,
            signed_at: Some(ts(out.signed_at)),
        }))
    }
}

/// A transparency-log entry on the wire.
fn transparency_entry(
    e: meshsign_evidence::rekor::LogEntry,
    log_id: &[u8; 32],
) -> v1::TransparencyEntry {
    v1::TransparencyEntry {
        log_index: e.log_index,
        integrated_time: e.integrated_time,
        canonicalized_body: e.body,
        signed_entry_timestamp: e.set,
        log_id: log_id.to_vec(),
    }
}
