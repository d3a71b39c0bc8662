//! The Sign, SignBatch and RevokeSelf use cases, read top to bottom:
//! caller (typed by `api` from the peer certificate) → every per-RPC check ([`checks`]) →
//! key → signature → durable audit entry → response. A signature whose audit entry could not
//! be written is never returned.
//!
//! Owns: the flow, [`SignError`] and its reasons, the typed request and response.
//! Must not touch: tonic, TLS, proto messages (`api` converts), the store directly.

pub mod apple_cms;
pub mod asc;
pub mod attest;
pub mod checks;

use crate::audit::{AuditError, AuditRecord};
use crate::custody::CustodyError;
use crate::identity::{Caller, IdentityError};
use crate::model::{Reason, Refusal, RefusalKind, bounded};
use crate::state::SiteState;
use crate::state::issuance::{Issued, MintError, Session};
use crate::store::StoreError;

/// What to sign.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A SHA-256 digest (must be 32 bytes).
    Digest(Vec<u8>),
    /// A short message the site hashes (at most [`checks::MAX_MESSAGE_BYTES`]).
    Message(Vec<u8>),
    /// Up to [`checks::MAX_BATCH`] digests.
    Batch(Vec<Vec<u8>>),
    /// CMS signed attributes of an Apple code signature (purpose apple-cms).
    AppleCms(Vec<u8>),
    /// The request carried no input.
    Missing,
}

/// A sign request in typed form.
#[derive(Clone, Debug)]
pub struct SignInput {
    /// RPC name for audit.
    pub rpc: &'static str,
    /// Key alias.
    pub alias: String,
    /// Input.
    pub payload: Payload,
    /// Artifact name (audit only).
    pub artifact: String,
    /// Algorithm the caller expects (empty: whatever the key has).
    pub algorithm: String,
    /// Peer address.
    pub peer: String,
    /// Whether the caller asked for each signature's signed entry timestamp (what a Sigstore
    /// bundle needs); without it the log entries come back unsigned.
    pub promise: bool,
}

/// Signatures and the public facts about the key that made them.
#[derive(Clone, Debug)]
pub struct SignOutput {
    /// One signature per digest.
    pub signatures: Vec<Vec<u8>>,
    /// The digests signed (same order).
    pub digests: Vec<[u8; 32]>,
    /// Algorithm name.
    pub algorithm: &'static str,
    /// `alias@vN`.
    pub key_id: String,
    /// SPKI DER.
    pub public_key_der: Vec<u8>,
    /// Key certificate chain, if any.
    pub certificate_chain: Vec<Vec<u8>>,
    /// Audit id.
    pub audit_id: String,
    /// Audit entry seq (receipt).
    pub audit_seq: u64,
    /// Audit entry hash (receipt).
    pub audit_hash: String,
    /// The audit entry's stored bytes (the receipt's leaf), for the caller alone.
    pub audit_entry: Vec<u8>,
    /// Unix seconds.
    pub signed_at: i64,
    /// One transparency-log entry per signature (bodies first; index and time once the audit
    /// entry naming them is durable, and the SET then if the caller asked for it).
    pub transparency: Vec<meshsign_evidence::rekor::LogEntry>,
}

/// Why a sign-port request was refused. `Display` is the detail; [`Refusal::reason`] names the
/// check (one function of [`checks`] per reason).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The peer certificate is not a runner identity of this site.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The certificate contradicts its issuance record.
    #[error("{0}")]
    BadCertificate(String),
    /// A renewal superseded this certificate and it was presented again: a copy exists.
    #[error(
        "serial {serial} was replaced by a renewal and used again: a copy of it exists; \
             session {session} is revoked"
    )]
    Superseded {
        /// The certificate.
        serial: String,
        /// Its session.
        session: String,
    },
    /// The session has reached its environment's max_session_seconds.
    #[error("the session began at {start}; this environment allows {max} s per session")]
    SessionCeiling {
        /// Unix seconds.
        start: i64,
        /// Seconds.
        max: u64,
    },
    /// The renewal's CSR is not acceptable.
    #[error("{0}")]
    Csr(String),
    /// The renewal's device-key proof is refused (a session enrolled with a device key, or
    /// an environment with `runners = "registered"`).
    #[error("{0}")]
    Device(#[from] crate::state::runners::DeviceError),
    /// Issuing the renewed certificate failed (internal).
    #[error("issuance failed: {0}")]
    Issue(#[from] crate::ca::CaError),
    /// Site state failed (internal).
    #[error("site state: {0}")]
    State(#[from] crate::state::StateError),
    /// This site has no record of issuing it.
    #[error("serial {0} was not issued by this site")]
    UnknownCertificate(String),
    /// Revoked.
    #[error("serial {serial} revoked ({reason})")]
    Revoked {
        /// Serial.
        serial: String,
        /// Reason given.
        reason: String,
    },
    /// Expired since the connection was opened.
    #[error(
        "expired at {} ({} ago)",
        crate::model::when(*not_after),
        crate::model::span(now - not_after)
    )]
    Expired {
        /// not_after.
        not_after: i64,
        /// Now.
        now: i64,
    },
    /// Issued for another region.
    #[error("certificate is for `{cert}`, this site is `{site}`")]
    Region {
        /// In the certificate.
        cert: String,
        /// This site.
        site: String,
    },
    /// Its runner CA is no longer trusted.
    #[error("runner CA {0} is not trusted")]
    IssuerUntrusted(String),
    /// The trust policy that minted it is disabled.
    #[error("`{0}` is disabled")]
    PolicyDisabled(String),
    /// The key does not exist in the caller's environment.
    #[error("no key `{alias}` in environment `{environment}`")]
    KeyNotInEnvironment {
        /// Requested alias.
        alias: String,
        /// Caller's environment.
        environment: String,
    },
    /// The key was disabled by ops.
    #[error("`{0}` is disabled")]
    KeyDisabled(String),
    /// The key's access rule does not admit the caller.
    #[error("`{repository}`@`{git_ref}` may not use `{alias}`")]
    Access {
        /// Alias.
        alias: String,
        /// Caller repository.
        repository: String,
        /// Caller ref.
        git_ref: String,
    },
    /// The request named another algorithm than the key's.
    #[error("key `{key_id}` signs {key}; the request asked for {requested}")]
    Algorithm {
        /// The key version.
        key_id: String,
        /// Its algorithm.
        key: &'static str,
        /// What the request named.
        requested: String,
    },
    /// The key may not sign this kind of input.
    #[error("key `{alias}` is not for {purpose} signing")]
    Purpose {
        /// Alias.
        alias: String,
        /// The input's purpose.
        purpose: &'static str,
    },
    /// The input is malformed.
    #[error("{message}")]
    Input {
        /// Check name (the audit reason).
        check: Reason,
        /// What is wrong.
        message: String,
    },
    /// The job has spent its request rate (`[limits] sign_per_job_*`). Counted into a summary
    /// entry, not written one by one.
    #[error("job `{0}` is over its request rate; retry later")]
    RateLimited(String),
    /// The job or certificate has used its signing budget for this key.
    #[error(
        "key `{alias}` allows {limit} signature(s) per {scope}; this {scope} has {used} and asked for {asked}"
    )]
    Budget {
        /// Alias.
        alias: String,
        /// `job` or `certificate`.
        scope: &'static str,
        /// Already used.
        used: u64,
        /// This request.
        asked: u64,
        /// The budget.
        limit: u64,
    },
    /// The key signs only digests on its allow-list, and this is not one.
    #[error("key `{alias}` signs only the digests in its allow-list; {digest} is not there")]
    DigestNotAllowed {
        /// Alias.
        alias: String,
        /// The first digest refused (hex).
        digest: String,
    },
    /// The signer failed (internal).
    #[error("signing failed: {0}")]
    Custody(#[from] CustodyError),
    /// Storage failed (internal).
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// The audit record could not be written, so nothing is returned.
    #[error("the audit log cannot be written; nothing was signed")]
    Audit(#[source] AuditError),
}

impl SignError {
    /// A malformed-input refusal with its check name.
    pub fn input(check: Reason, message: impl Into<String>) -> Self {
        SignError::Input {
            check,
            message: message.into(),
        }
    }
}

impl Refusal for SignError {
    fn reason(&self) -> Reason {
        match self {
            SignError::Identity(_)
            | SignError::BadCertificate(_)
            | SignError::UnknownCertificate(_) => Reason::Certificate,
            SignError::Revoked { .. } => Reason::CertificateRevoked,
            SignError::Superseded { .. } => Reason::SessionTheftSuspected,
            SignError::SessionCeiling { .. } => Reason::SessionCeiling,
            SignError::Csr(_) => Reason::Csr,
            SignError::Device(e) => e.reason(),
            SignError::Expired { .. } => Reason::CertificateExpired,
            SignError::Region { .. } => Reason::Region,
            SignError::IssuerUntrusted(_) => Reason::IssuerUntrusted,
            SignError::PolicyDisabled(_) => Reason::TrustPolicyDisabled,
            SignError::KeyNotInEnvironment { .. } => Reason::KeyNotInPartition,
            SignError::KeyDisabled(_) => Reason::KeyDisabled,
            SignError::Access { .. } => Reason::KeyAccess,
            SignError::Algorithm { .. } => Reason::Algorithm,
            SignError::Purpose { .. } => Reason::Purpose,
            SignError::Input { check, .. } => *check,
            SignError::RateLimited(_) => Reason::RateLimited,
            SignError::Budget { .. } => Reason::Budget,
            SignError::DigestNotAllowed { .. } => Reason::DigestAllowList,
            SignError::Custody(CustodyError::TokenUnavailable(_)) => Reason::KeyUnavailable,
            SignError::Custody(_)
            | SignError::Store(_)
            | SignError::Issue(_)
            | SignError::State(_) => Reason::Internal,
            SignError::Audit(_) => Reason::AuditUnavailable,
        }
    }

    fn kind(&self) -> RefusalKind {
        use SignError::*;
        match self {
            Identity(_)
            | BadCertificate(_)
            | UnknownCertificate(_)
            | Revoked { .. }
            | Expired { .. }
            | Superseded { .. } => RefusalKind::Unauthenticated,
            SessionCeiling { .. } => RefusalKind::PermissionDenied,
            Csr(_) => RefusalKind::InvalidArgument,
            Device(e) => e.kind(),
            Issue(_) | State(_) => RefusalKind::Internal,
            Region { .. } => RefusalKind::FailedPrecondition,
            IssuerUntrusted(_)
            | PolicyDisabled(_)
            | KeyNotInEnvironment { .. }
            | KeyDisabled(_)
            | Access { .. } => RefusalKind::PermissionDenied,
            Algorithm { .. } | Purpose { .. } | Input { .. } => RefusalKind::InvalidArgument,
            RateLimited(_) | Budget { .. } => RefusalKind::ResourceExhausted,
            DigestNotAllowed { .. } => RefusalKind::PermissionDenied,
            Custody(CustodyError::TokenUnavailable(_)) => RefusalKind::Unavailable,
            Custody(_) | Store(_) => RefusalKind::Internal,
            Audit(_) => RefusalKind::Unavailable,
        }
    }
}

/// Checks, signs and audits; see the module docs for the order.
pub async fn sign(
    site: &SiteState,
    caller: &Caller,
    input: SignInput,
) -> Result<SignOutput, SignError> {
    let now = site.clock.unix();
    let promise = input.promise;
    let mut rec = caller.audit_record(input.rpc, now, &input.peer);
    within_rate(site, caller, &rec, &input.alias, now)?;
    rec.artifact = bounded(&input.artifact, 256);
    let mut budgeted = false;
    let result = check_and_sign(site, caller, input, &mut rec, &mut budgeted).await;
    if let Err(SignError::Superseded { session, .. }) = &result {
        revoke_session(site, session, caller).await;
    }
    let (written, entry) = record_decision(site, rec, &result, budgeted, "sign refused").await?;
    let mut out = result?;
    out.audit_id = written.audit_id();
    out.audit_seq = written.seq;
    out.audit_hash = written.hash.clone();
    out.audit_entry = entry;
    out.signed_at = now;
    let bodies = out
        .transparency
        .drain(..)
        .map(|e| e.body)
        .collect::<Vec<_>>();
    let key = site.audit.key().clone();
    // Not asked for: the entries as the log holds them, with no second signature.
    out.transparency = if !promise || bodies.len() <= 8 {
        key.entries(&written, bodies, promise)
    } else if let Some(at) = key.promised(&written).map_err(SignError::Audit)? {
        // A batch's SETs on every core of the signing pool.
        site.signing_pool
            .map((0..).zip(bodies).collect(), move |(offset, body)| {
                key.promise(&at, offset, body)
            })
            .await
            .map_err(|_| CustodyError::Crypto("signing pool"))?
    } else {
        Ok(Vec::new())
    }
    .map_err(SignError::Audit)?;
    Ok(out)
}

/// `rate_limited`, before any other check: a request over the job's rate is counted into one
/// summary entry per job and interval (`rec` is the request's entry so far), never written
/// one by one.
pub(crate) fn within_rate(
    site: &SiteState,
    caller: &Caller,
    rec: &AuditRecord,
    alias: &str,
    now: i64,
) -> Result<(), SignError> {
    let Err(e) = checks::rate(site, caller) else {
        return Ok(());
    };
    let mut rec = rec.clone();
    rec.artifact.clear();
    crate::audit::deny_quietly(&mut rec, &e);
    rec.key_id = bounded(alias, 64);
    site.summaries.count(rec, now);
    Err(e)
}

/// After an allowed decision's entry (`written`) was made durable, the signature itself failed
/// (a token went away): records that nothing left for that entry, and returns the error.
pub(crate) async fn record_unsigned(
    site: &SiteState,
    caller: &Caller,
    (rpc, what, peer): (&str, &'static str, &str),
    written: &AuditRecord,
    e: SignError,
) -> SignError {
    let mut failed = caller.audit_record(rpc, site.clock.unix(), peer);
    failed.key_id = written.key_id.clone();
    crate::audit::deny(&mut failed, &e, what);
    failed.detail = bounded(
        &format!(
            "the {} of audit entry {} was not signed: {}",
            if rpc == "Attest" {
                "statement"
            } else {
                "token"
            },
            written.seq,
            failed.detail
        ),
        300,
    );
    match site.audit.record_sign(failed).await {
        Ok(_) => e,
        Err(a) => SignError::Audit(a),
    }
}

/// Writes a decision's entry — allow, or the refusal (logged as `what`) — and returns it, with
/// its stored bytes, once durable. A budget count is a store write: with a budget, the entry is
/// written with a store flush so the count is durable before the signature leaves.
pub(crate) async fn record_decision<T>(
    site: &SiteState,
    mut rec: AuditRecord,
    result: &Result<T, SignError>,
    budgeted: bool,
    what: &'static str,
) -> Result<(AuditRecord, Vec<u8>), SignError> {
    match result {
        Ok(_) => {
            rec.decision = "allow".into();
            rec.reason = Reason::Ok.as_str().into();
        }
        Err(e) => crate::audit::deny(&mut rec, e, what),
    }
    site.audit
        .record_sealed(rec, budgeted)
        .await
        .map_err(SignError::Audit)
}

async fn check_and_sign(
    site: &SiteState,
    caller: &Caller,
    input: SignInput,
    rec: &mut AuditRecord,
    budgeted: &mut bool,
) -> Result<SignOutput, SignError> {
    // Named in the record even when refused, so a refusal says which key was asked for.
    rec.key_id = bounded(&input.alias, 64);
    let authorized = checks::authorize(site, caller, &input.alias)?;
    let key = &authorized.key;
    rec.key_id = key.record.key_id();
    checks::algorithm(key, &input.algorithm)?;
    checks::purpose(authorized.spec(&input.alias), &input.alias, &input.payload)?;
    checks::input(&input.payload)?;
    // A message-only key (P-384, Ed25519) signs the message itself; the SHA-256 of it is still
    // what the audit record and receipt name.
    let message = match &input.payload {
        Payload::Message(m) if key.backend.algorithm().messages_only() => Some(m.clone()),
        _ => None,
    };
    let digests = match input.payload {
        Payload::Digest(d) => vec![checks::digest_len(&d)?],
        Payload::Message(m) => vec![checks::message(&m)?],
        Payload::Batch(b) => checks::batch(&b)?,
        Payload::AppleCms(attrs) => {
            let facts = checks::apple_cms(&attrs, site.clock.unix())?;
            rec.detail = format!(
                "code directory {}; cdhashes [{}]",
                facts.code_directory_hash,
                facts.cdhashes.join(",")
            );
            vec![facts.digest]
        }
        Payload::Missing => Vec::new(),
    };
    rec.items = u32::try_from(digests.len()).unwrap_or(u32::MAX);
    rec.digest = match digests.as_slice() {
        [one] => hex::encode(one),
        many => hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &many.concat(),
        )),
    };
    let spec = authorized.spec(&input.alias);
    checks::digest_allow_list(spec, &input.alias, &digests)?;
    *budgeted = spec.is_some_and(|s| s.budget.is_limited());
    checks::budget(site, &authorized.record, spec, &input.alias, digests.len())?;
    let backend = key.backend.clone();
    // A P-384 key signs SHA-384 of the message: its log entry names that hash, so a Sigstore
    // verifier checks the signature over the artifact the way it was made.
    let body_hash = match (&message, key.backend.algorithm()) {
        (Some(m), crate::model::KeyAlgorithm::EcdsaP384Sha384) => {
            Some(meshsign_evidence::rekor::BodyHash::Sha384.of(m))
        }
        _ => None,
    };
    let (signatures, digests) = if let Some(m) = message {
        (vec![backend.sign_message(&m)?], digests)
    } else if digests.len() <= 8 {
        let sigs = digests
            .iter()
            .map(|d| backend.sign_digest(d))
            .collect::<Result<Vec<_>, _>>()?;
        (sigs, digests)
    } else {
        // A batch takes milliseconds: off the runtime, on every core of the signing pool.
        let sigs = site
            .signing_pool
            .map(digests.clone(), move |d| backend.sign_digest(&d))
            .await
            .map_err(|_| CustodyError::Crypto("signing pool"))??;
        (sigs, digests)
    };
    // The transparency log's leaves: what the audit entry names and the log proves.
    let spki = &key.record.public_key_der;
    let transparency: Vec<_> = signatures
        .iter()
        .zip(&digests)
        .map(|(sig, d)| meshsign_evidence::rekor::LogEntry {
            body: match &body_hash {
                Some(h) => meshsign_evidence::rekor::hashedrekord_with(
                    meshsign_evidence::rekor::BodyHash::Sha384,
                    h,
                    sig,
                    spki,
                ),
                None => meshsign_evidence::rekor::hashedrekord(d, sig, spki),
            },
            ..Default::default()
        })
        .collect();
    let leaves: Vec<_> = transparency
        .iter()
        .map(|e| meshsign_evidence::merkle::leaf_hash(&e.body))
        .collect();
    rec.tlog = Some(meshsign_evidence::audit::TlogLeaves::new(0, &leaves));
    Ok(SignOutput {
        transparency,
        signatures,
        digests,
        algorithm: key.backend.algorithm().as_str(),
        key_id: key.record.key_id(),
        public_key_der: key.record.public_key_der.clone(),
        certificate_chain: key.record.certificate_chain.clone(),
        audit_id: String::new(),
        audit_seq: 0,
        audit_hash: String::new(),
        audit_entry: Vec::new(),
        signed_at: 0,
    })
}

/// Audits a sign-port request refused before a caller could be built from its certificate,
/// and returns that refusal (or `audit_unavailable`).
pub async fn refuse_unidentified(
    site: &SiteState,
    input: &SignInput,
    err: IdentityError,
) -> SignError {
    let err = SignError::Identity(err);
    let mut rec = AuditRecord {
        rpc: input.rpc.into(),
        environment: "(unknown)".into(),
        artifact: bounded(&input.artifact, 256),
        peer: input.peer.clone(),
        ..Default::default()
    };
    crate::audit::deny(&mut rec, &err, "sign refused");
    match site.audit.record_sign(rec).await {
        Ok(_) => err,
        Err(e) => SignError::Audit(e),
    }
}

/// Revokes the caller's own certificate (runner teardown), audited either way. The record is
/// read from the store, not a cache: a certificate a renewal superseded — here or at another
/// replica — is a copy, and its `RevokeSelf` revokes the whole session (the thief's renewed
/// certificate with it), refused as `superseded`.
pub async fn revoke_self(
    site: &SiteState,
    caller: &Caller,
    reason: &str,
    peer: &str,
) -> Result<String, SignError> {
    let result = {
        let _guard = site.ops_lock.lock().await;
        match site.session_holder(&caller.serial_hex) {
            Ok(None) => Err(SignError::UnknownCertificate(caller.serial_hex.clone())),
            Ok(Some((record, false))) => Err(SignError::Superseded {
                serial: record.serial.clone(),
                session: record.session_id().to_string(),
            }),
            Ok(Some(_)) => match site.revoke_by_holder(&caller.serial_hex, reason) {
                Ok(_) => Ok(()),
                Err(e) => Err(SignError::Store(e)),
            },
            Err(e) => Err(SignError::Store(e)),
        }
    };
    if let Err(SignError::Superseded { session, .. }) = &result {
        revoke_session(site, session, caller).await;
    }
    let mut rec = caller.audit_record("RevokeSelf", site.clock.unix(), peer);
    match &result {
        Ok(()) => {
            rec.decision = "allow".into();
            rec.reason = Reason::Ok.as_str().into();
            rec.detail = bounded(reason, 200);
        }
        Err(e) => crate::audit::deny(&mut rec, e, "revoke-self refused"),
    }
    site.audit.record(rec).await.map_err(SignError::Audit)?;
    result.map(|()| caller.serial_hex.clone())
}

/// A renewal: a new certificate for the caller's session.
#[derive(Clone, Debug)]
pub struct RenewInput {
    /// PKCS#10 DER of the new key.
    pub csr_der: Vec<u8>,
    /// Requested TTL; 0 for the cap.
    pub requested_ttl_seconds: u64,
    /// Peer address.
    pub peer: String,
    /// The device key's proof over the renewal transcript.
    pub device_proof: Option<crate::state::runners::DeviceProof>,
}

/// Renews the caller's session: checks, a new certificate on the CSR's key with the same
/// identity and claims, the old one superseded; audited either way. A superseded certificate
/// presented again revokes the whole session.
pub async fn renew(
    site: &SiteState,
    caller: &Caller,
    input: RenewInput,
) -> Result<Issued, SignError> {
    let now = site.clock.unix();
    let mut rec = caller.audit_record("Renew", now, &input.peer);
    let result = {
        let _guard = site.ops_lock.lock().await;
        renew_checked(site, caller, &input, now)
    };
    if let Err(SignError::Superseded { session, .. }) = &result {
        revoke_session(site, session, caller).await;
    }
    match &result {
        Ok(out) => {
            rec.decision = "allow".into();
            rec.reason = Reason::Ok.as_str().into();
            rec.detail = format!("renewed serial {} as {}", caller.serial_hex, out.serial_hex);
            rec.ttl_remaining_sec = i64::try_from(out.granted_ttl_seconds).ok();
        }
        Err(e) => crate::audit::deny(&mut rec, e, "renewal refused"),
    }
    site.audit.record(rec).await.map_err(SignError::Audit)?;
    result
}

fn renew_checked(
    site: &SiteState,
    caller: &Caller,
    input: &RenewInput,
    now: i64,
) -> Result<Issued, SignError> {
    let record = checks::renewable(site, caller)?;
    let config = site.config();
    let env = config
        .environment(&record.environment)
        .ok_or_else(|| SignError::BadCertificate("environment no longer exists".into()))?;
    let start = if record.session_start > 0 {
        record.session_start
    } else {
        record.not_before + 60
    };
    let end = start.saturating_add(i64::try_from(env.max_session_seconds).unwrap_or(i64::MAX));
    if now >= end {
        return Err(SignError::SessionCeiling {
            start,
            max: env.max_session_seconds,
        });
    }
    let spki =
        crate::ca::csr::verify_csr(&input.csr_der).map_err(|e| SignError::Csr(e.to_string()))?;
    let mut claims = record.claims.clone();
    // A session enrolled with a device key proves it again; so does every session of an
    // environment that now requires registered runners.
    if claims.fingerprint_proven() || env.runners == crate::config::RunnerMode::Registered {
        let transcript = meshsign_evidence::device::RenewTranscript {
            serial: &caller.serial_hex,
            csr_spki_der: &spki,
            not_after: caller.not_after,
        }
        .bytes()
        .map_err(|e| {
            crate::state::runners::DeviceError::Proof(format!("the renewal transcript: {e}"))
        })?;
        let (_, backend) = site.check_device_proof(
            env,
            input.device_proof.as_ref(),
            &caller.id.fingerprint,
            &transcript,
        )?;
        claims.runner_proof = backend.as_str().to_string();
    }
    let cap = match input.requested_ttl_seconds {
        0 => env.max_ttl_seconds,
        r => r.min(env.max_ttl_seconds),
    };
    let ttl = cap.min(u64::try_from(end - now).unwrap_or(0)).max(1);
    site.issue(
        (caller.id.clone(), claims, spki),
        ttl,
        Session::Renewal {
            current: &record,
            start,
        },
    )
    .map_err(|e| match e {
        MintError::Superseded { serial, session } => SignError::Superseded { serial, session },
        MintError::Ca(e) => SignError::Issue(e),
        MintError::Store(e) => SignError::Store(e),
        MintError::State(e) => SignError::State(e),
    })
}

/// A superseded certificate came back: revoke every certificate of its session (a rule, so
/// open connections are refused on their next RPC), audited as a suspected theft.
async fn revoke_session(site: &SiteState, session: &str, caller: &Caller) {
    let rule = crate::model::RevocationRule {
        id: meshsign_evidence::files::random_id()
            .map(|id| id[..12].to_string())
            .unwrap_or_else(|_| "session".into()),
        kind: crate::model::RevocationKind::Session,
        value: session.to_string(),
        region: None,
        since: None,
        until: None,
        reason: format!(
            "session_theft_suspected: superseded certificate {} presented again",
            caller.serial_hex
        ),
        operator: "site".into(),
        created_at: site.clock.unix(),
        session: String::new(),
    };
    if let Err(e) = site.add_revocation(rule) {
        tracing::error!(error = %e, session, "could not revoke a session whose certificate was copied");
    } else {
        tracing::warn!(session, serial = %caller.serial_hex, "superseded certificate presented again: session revoked");
    }
}
