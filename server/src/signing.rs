//! The Sign and SignBatch core: authorize → validate input → sign → durable audit → respond.
//! A signature whose audit record could not be written is never returned.

use aws_lc_rs::digest::{SHA256, digest};

use crate::audit::{AuditError, AuditRecord};
use crate::authz::{AuthzError, Caller, authorize};
use crate::config::Purpose;
use crate::sign::CustodyError;
use crate::site::SiteState;

/// Largest message the site hashes itself.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Most digests in one SignBatch.
pub const MAX_BATCH: usize = 1000;

/// What to sign.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A SHA-256 digest (must be 32 bytes).
    Digest(Vec<u8>),
    /// A short message the site hashes (at most [`MAX_MESSAGE_BYTES`]).
    Message(Vec<u8>),
    /// Up to [`MAX_BATCH`] digests.
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
    /// Unix seconds.
    pub signed_at: i64,
}

/// Why a sign request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A per-request check failed.
    #[error(transparent)]
    Authz(#[from] AuthzError),
    /// The input is malformed.
    #[error("{check}: {message}")]
    Input {
        /// Check name.
        check: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The signer failed (internal).
    #[error("signing failed")]
    Custody(#[from] CustodyError),
    /// The audit record could not be written, so nothing is returned.
    #[error("audit unavailable")]
    Audit(#[from] AuditError),
}

impl SignError {
    /// The check's name, used as the audit reason.
    pub fn check(&self) -> &'static str {
        match self {
            SignError::Authz(e) => e.check(),
            SignError::Input { check, .. } => check,
            SignError::Custody(_) => "internal",
            SignError::Audit(_) => "audit_unavailable",
        }
    }
}

fn input_err(check: &'static str, message: impl Into<String>) -> SignError {
    SignError::Input {
        check,
        message: message.into(),
    }
}

fn digests_of(payload: Payload) -> Result<Vec<[u8; 32]>, SignError> {
    let one = |d: Vec<u8>| -> Result<[u8; 32], SignError> {
        d.as_slice().try_into().map_err(|_| {
            input_err(
                "digest",
                format!("a SHA-256 digest is 32 bytes, got {}", d.len()),
            )
        })
    };
    match payload {
        Payload::Digest(d) => Ok(vec![one(d)?]),
        Payload::Message(m) if m.len() > MAX_MESSAGE_BYTES => Err(input_err(
            "message",
            format!(
                "{} bytes exceeds {MAX_MESSAGE_BYTES}; send its SHA-256 digest",
                m.len()
            ),
        )),
        Payload::Message(m) => {
            let mut d = [0u8; 32];
            d.copy_from_slice(digest(&SHA256, &m).as_ref());
            Ok(vec![d])
        }
        Payload::Batch(b) if b.is_empty() || b.len() > MAX_BATCH => Err(input_err(
            "batch",
            format!("1 to {MAX_BATCH} digests per batch, got {}", b.len()),
        )),
        Payload::Batch(b) => b.into_iter().map(one).collect(),
        Payload::AppleCms(_) => Err(input_err("apple_cms", "checked before hashing")),
        Payload::Missing => Err(input_err(
            "input",
            "give exactly one of sha256_digest, message or apple_cms_signed_attributes",
        )),
    }
}

/// Authorizes, signs and audits; see the module docs for the order.
pub async fn sign(
    site: &SiteState,
    caller: &Caller,
    input: SignInput,
) -> Result<SignOutput, SignError> {
    let now = site.clock.unix();
    let mut rec = caller.audit_record(input.rpc, now, &input.peer);
    rec.artifact = input.artifact.chars().take(256).collect();
    let result = run(site, caller, input, &mut rec).await;
    match &result {
        Ok(_) => {
            rec.decision = "allow".into();
            rec.reason = "ok".into();
        }
        Err(e) => {
            rec.decision = "deny".into();
            rec.reason = e.check().into();
            tracing::info!(reason = e.check(), detail = %e, "sign refused");
        }
    }
    let written = site.audit.record_sign(rec).await?;
    result.map(|mut out| {
        out.audit_id = written.audit_id();
        out.audit_seq = written.seq;
        out.audit_hash = written.hash.clone();
        out.signed_at = now;
        out
    })
}

async fn run(
    site: &SiteState,
    caller: &Caller,
    input: SignInput,
    rec: &mut AuditRecord,
) -> Result<SignOutput, SignError> {
    let key = authorize(site, caller, &input.alias)?;
    rec.key_id = key.record.key_id();
    let alg = key.backend.algorithm().as_str();
    if !input.algorithm.is_empty() && input.algorithm != alg {
        return Err(input_err(
            "algorithm",
            format!(
                "key `{}` signs {alg}; the request asked for {}",
                input.alias, input.algorithm
            ),
        ));
    }
    let purpose = match &input.payload {
        Payload::Digest(_) | Payload::Batch(_) | Payload::Missing => Purpose::Digest,
        Payload::Message(_) => Purpose::Message,
        Payload::AppleCms(_) => Purpose::AppleCms,
    };
    let config = site.config();
    let allowed = config
        .partition(&caller.id.environment)
        .and_then(|p| p.key(&input.alias))
        .is_some_and(|k| k.purposes.contains(&purpose));
    if !matches!(input.payload, Payload::Missing) && !allowed {
        return Err(input_err(
            "purpose",
            format!(
                "key `{}` is not for {} signing",
                input.alias,
                purpose.as_str()
            ),
        ));
    }
    let digests = match input.payload {
        Payload::AppleCms(attrs) => {
            if attrs.len() > MAX_MESSAGE_BYTES {
                return Err(input_err(
                    "apple_cms",
                    format!("{} bytes exceeds {MAX_MESSAGE_BYTES}", attrs.len()),
                ));
            }
            let facts = crate::apple_cms::check(&attrs, site.clock.unix()).map_err(|e| {
                SignError::Input {
                    check: e.check,
                    message: e.message,
                }
            })?;
            rec.detail = format!(
                "code directory {}; cdhashes [{}]",
                facts.code_directory_hash,
                facts.cdhashes.join(",")
            );
            vec![facts.digest]
        }
        other => digests_of(other)?,
    };
    rec.items = digests.len() as u32;
    rec.digest = if digests.len() == 1 {
        hex::encode(digests[0])
    } else {
        hex::encode(digest(&SHA256, &digests.concat()))
    };
    let backend = key.backend.clone();
    let (signatures, digests) = if digests.len() <= 8 {
        let sigs = digests
            .iter()
            .map(|d| backend.sign_digest(d))
            .collect::<Result<Vec<_>, _>>()?;
        (sigs, digests)
    } else {
        // A batch takes milliseconds: off the runtime, on the per-core signing pool.
        site.signing_pool
            .run(move || {
                let sigs = digests
                    .iter()
                    .map(|d| backend.sign_digest(d))
                    .collect::<Result<Vec<_>, _>>();
                sigs.map(|s| (s, digests))
            })
            .await
            .map_err(|_| CustodyError::Crypto("signing pool"))??
    };
    Ok(SignOutput {
        signatures,
        digests,
        algorithm: key.backend.algorithm().as_str(),
        key_id: key.record.key_id(),
        public_key_der: key.record.public_key_der.clone(),
        certificate_chain: key.record.certificate_chain.clone(),
        audit_id: String::new(),
        audit_seq: 0,
        audit_hash: String::new(),
        signed_at: 0,
    })
}

/// Audits a sign-port request refused before a caller could be built from its certificate.
pub async fn refuse_uncallered(
    site: &SiteState,
    input: &SignInput,
    err: &AuthzError,
) -> Result<(), SignError> {
    let rec = AuditRecord {
        rpc: input.rpc.into(),
        decision: "deny".into(),
        reason: err.check().into(),
        environment: "(unknown)".into(),
        artifact: input.artifact.chars().take(256).collect(),
        peer: input.peer.clone(),
        ..Default::default()
    };
    site.audit.record_sign(rec).await?;
    Ok(())
}
