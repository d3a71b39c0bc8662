//! Every check of a sign-port RPC, in the order they run, one function per check, each named
//! by its audit reason (DESIGN.md "Every signing request").
//!
//! The handshake already proved the peer holds a certificate chaining to one of the site's
//! trusted runner CAs. Connections are long-lived, so every RPC re-checks the rest against the
//! state now: the certificate is one this site issued, not revoked, not expired (by the
//! injected clock), of this region; its runner CA is still trusted; the trust policy that
//! minted it still admits sessions; the key is in the caller's environment, enabled, and its
//! access rule admits the caller; the request names the key's algorithm and a purpose the key
//! has; the input is well formed.
//!
//! Owns: these checks. Must not touch: signing, the audit log (the flow in `sign` does both).

use std::sync::Arc;

use aws_lc_rs::digest::{SHA256, digest};

use super::{Payload, SignError};
use crate::config::{KeySpec, SiteConfig};
use crate::custody::LoadedKey;
use crate::identity::Caller;
use crate::model::{CertRecord, Purpose, Reason, bounded};
use crate::state::SiteState;

/// Largest message the site hashes itself.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Most digests in one SignBatch.
pub const MAX_BATCH: usize = 1000;

/// What the caller and key checks established: the key version that signs, and the
/// configuration snapshot they read (the later checks read the same one).
#[derive(Debug)]
pub struct Authorized {
    /// The active version of the key.
    pub key: LoadedKey,
    config: Arc<SiteConfig>,
    /// The caller's issuance record.
    pub record: Arc<CertRecord>,
}

impl Authorized {
    /// The key's spec in the caller's environment (present: `authorize` found it).
    pub fn spec(&self, alias: &str) -> Option<&KeySpec> {
        self.config
            .environment(&self.record.environment)
            .and_then(|e| e.key(alias))
    }
}

/// Runs the caller and key checks; returns the key version that signs.
pub fn authorize(site: &SiteState, caller: &Caller, alias: &str) -> Result<Authorized, SignError> {
    let now = site.clock.unix();
    let config = site.config();
    let record = certificate(site, caller)?;
    certificate_revoked(site, &record)?;
    certificate_expired(caller, now)?;
    region(&config, caller, &record)?;
    issuer_untrusted(site, &record)?;
    trust_policy_disabled(site, &record)?;
    let spec = key_not_in_partition(&config, &record, alias)?;
    key_disabled(spec)?;
    key_access(spec, &record)?;
    let key = site
        .keys()
        .active(&record.environment, alias)
        .cloned()
        .ok_or_else(|| SignError::KeyNotInEnvironment {
            alias: bounded(alias, 64),
            environment: record.environment.clone(),
        })?;
    Ok(Authorized {
        key,
        config,
        record,
    })
}

/// `certificate`: this site issued the certificate, for the environment it names.
pub fn certificate(site: &SiteState, caller: &Caller) -> Result<Arc<CertRecord>, SignError> {
    let record = site
        .issuance_record(&caller.serial_hex)?
        .ok_or_else(|| SignError::UnknownCertificate(caller.serial_hex.clone()))?;
    if caller.id.environment != record.environment {
        return Err(SignError::BadCertificate(
            "environment differs from the issuance record".into(),
        ));
    }
    if record.superseded {
        return Err(SignError::Superseded {
            serial: record.serial.clone(),
            session: record.session_id().to_string(),
        });
    }
    Ok(record)
}

/// The session checks of a renewal: everything a Sign checks of the certificate (superseded,
/// revoked, expired, region, runner CA), and a trust policy that is enabled (not only keeping
/// sessions).
pub fn renewable(site: &SiteState, caller: &Caller) -> Result<Arc<CertRecord>, SignError> {
    let now = site.clock.unix();
    let config = site.config();
    let record = certificate(site, caller)?;
    certificate_revoked(site, &record)?;
    certificate_expired(caller, now)?;
    region(&config, caller, &record)?;
    issuer_untrusted(site, &record)?;
    let enabled = config
        .environment(&record.environment)
        .and_then(|e| {
            e.trust_policies
                .iter()
                .find(|t| t.name == record.claims.trust_policy)
        })
        .is_some_and(|t| t.enabled);
    if !enabled {
        return Err(SignError::PolicyDisabled(
            record.claims.trust_policy.clone(),
        ));
    }
    Ok(record)
}

/// `certificate_revoked`: by its holder or by an ops rule.
fn certificate_revoked(site: &SiteState, record: &CertRecord) -> Result<(), SignError> {
    match site.revocation_of(record) {
        Some(reason) => Err(SignError::Revoked {
            serial: record.serial.clone(),
            reason,
        }),
        None => Ok(()),
    }
}

/// `certificate_expired`: since the connection was opened.
fn certificate_expired(caller: &Caller, now: i64) -> Result<(), SignError> {
    if now >= caller.not_after {
        return Err(SignError::Expired {
            not_after: caller.not_after,
            now,
        });
    }
    Ok(())
}

/// `region`: the certificate (and its record) name this site's region.
fn region(config: &SiteConfig, caller: &Caller, record: &CertRecord) -> Result<(), SignError> {
    if caller.id.region == config.region && record.region == config.region {
        return Ok(());
    }
    Err(SignError::Region {
        cert: caller.id.region.clone(),
        site: config.region.clone(),
    })
}

/// `issuer_untrusted`: the runner CA that issued it is still trusted.
fn issuer_untrusted(site: &SiteState, record: &CertRecord) -> Result<(), SignError> {
    if site.runner_ca_trusted(&record.environment, &record.issuer_id) {
        return Ok(());
    }
    Err(SignError::IssuerUntrusted(record.issuer_id.clone()))
}

/// `trust_policy_disabled`: the trust policy that minted it still admits sessions.
fn trust_policy_disabled(site: &SiteState, record: &CertRecord) -> Result<(), SignError> {
    if site.policy_admits_sessions(&record.environment, &record.claims.trust_policy) {
        return Ok(());
    }
    Err(SignError::PolicyDisabled(
        record.claims.trust_policy.clone(),
    ))
}

/// `key_not_in_partition`: the key exists in the caller's environment.
fn key_not_in_partition<'c>(
    config: &'c SiteConfig,
    record: &CertRecord,
    alias: &str,
) -> Result<&'c KeySpec, SignError> {
    config
        .environment(&record.environment)
        .and_then(|p| p.key(alias))
        .ok_or_else(|| SignError::KeyNotInEnvironment {
            alias: bounded(alias, 64),
            environment: record.environment.clone(),
        })
}

/// `key_disabled`: ops have not disabled it.
fn key_disabled(spec: &KeySpec) -> Result<(), SignError> {
    if spec.disabled {
        return Err(SignError::KeyDisabled(spec.alias.clone()));
    }
    Ok(())
}

/// `key_access`: its access rule admits the caller's repository and ref.
fn key_access(spec: &KeySpec, record: &CertRecord) -> Result<(), SignError> {
    if spec
        .access
        .admits(&record.claims.repository, &record.claims.git_ref)
    {
        return Ok(());
    }
    Err(SignError::Access {
        alias: spec.alias.clone(),
        repository: record.claims.repository.clone(),
        git_ref: record.claims.git_ref.clone(),
    })
}

/// `algorithm`: a request that names an algorithm names the key's.
pub fn algorithm(key: &LoadedKey, requested: &str) -> Result<(), SignError> {
    let alg = key.backend.algorithm().as_str();
    if requested.is_empty() || requested == alg {
        return Ok(());
    }
    Err(SignError::Algorithm {
        key_id: key.record.key_id(),
        key: alg,
        requested: bounded(requested, 64),
    })
}

/// `purpose`: the key may sign this kind of input.
pub fn purpose(spec: Option<&KeySpec>, alias: &str, payload: &Payload) -> Result<(), SignError> {
    let purpose = match payload {
        Payload::Digest(_) | Payload::Batch(_) => Purpose::Digest,
        Payload::Message(_) => Purpose::Message,
        Payload::AppleCms(_) => Purpose::AppleCms,
        Payload::Missing => return Ok(()),
    };
    purpose_is(spec, alias, purpose)
}

/// `purpose`: the key has this purpose.
pub fn purpose_is(spec: Option<&KeySpec>, alias: &str, purpose: Purpose) -> Result<(), SignError> {
    if spec.is_some_and(|s| s.purposes.contains(&purpose)) {
        return Ok(());
    }
    Err(SignError::Purpose {
        alias: bounded(alias, 64),
        purpose: purpose.as_str(),
    })
}

/// `input`: exactly one input was given.
pub fn input(payload: &Payload) -> Result<(), SignError> {
    if matches!(payload, Payload::Missing) {
        return Err(SignError::input(
            Reason::Input,
            "give exactly one of sha256_digest, message or apple_cms_signed_attributes",
        ));
    }
    Ok(())
}

/// `digest`: a SHA-256 digest is 32 bytes.
pub fn digest_len(d: &[u8]) -> Result<[u8; 32], SignError> {
    d.try_into().map_err(|_| {
        SignError::input(
            Reason::Digest,
            format!("a SHA-256 digest is 32 bytes, got {}", d.len()),
        )
    })
}

/// `message`: at most [`MAX_MESSAGE_BYTES`]; the site hashes it.
pub fn message(m: &[u8]) -> Result<[u8; 32], SignError> {
    if m.len() > MAX_MESSAGE_BYTES {
        return Err(SignError::input(
            Reason::Message,
            format!(
                "{} bytes exceeds {MAX_MESSAGE_BYTES}; send its SHA-256 digest",
                m.len()
            ),
        ));
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(digest(&SHA256, m).as_ref());
    Ok(d)
}

/// `batch`: 1 to [`MAX_BATCH`] digests, each 32 bytes.
pub fn batch(b: &[Vec<u8>]) -> Result<Vec<[u8; 32]>, SignError> {
    if b.is_empty() || b.len() > MAX_BATCH {
        return Err(SignError::input(
            Reason::Batch,
            format!("1 to {MAX_BATCH} digests per batch, got {}", b.len()),
        ));
    }
    b.iter().map(|d| digest_len(d)).collect()
}

/// `apple_cms` (and the finer reasons of [`super::apple_cms::check`]): the signed attributes
/// of an Apple code signature, bounded, parsed and checked.
pub fn apple_cms(attrs: &[u8], now: i64) -> Result<super::apple_cms::AppleCmsFacts, SignError> {
    if attrs.len() > MAX_MESSAGE_BYTES {
        return Err(SignError::input(
            Reason::AppleCms,
            format!("{} bytes exceeds {MAX_MESSAGE_BYTES}", attrs.len()),
        ));
    }
    super::apple_cms::check(attrs, now).map_err(|e| SignError::Input {
        check: e.check,
        message: e.message,
    })
}

/// `rate_limited`: the job's request bucket (`[limits] sign_per_job_per_second`,
/// `sign_per_job_burst`), keyed by environment and job id — or, for a provider without job
/// ids, by the certificate's session, so a renewal does not start a fresh bucket.
pub fn rate(site: &SiteState, caller: &Caller) -> Result<(), SignError> {
    if !site.sign_limiter.is_on() {
        return Ok(());
    }
    let job = if caller.claims.job_id.is_empty() {
        // The issuance record is cached; an unknown certificate is refused by the checks
        // after this one, and counted by its serial until then.
        match site.issuance_record(&caller.serial_hex) {
            Ok(Some(r)) => r.session_id().to_string(),
            _ => caller.serial_hex.clone(),
        }
    } else {
        caller.claims.job_id.clone()
    };
    let key = (caller.id.environment.clone(), job);
    if site.sign_limiter.admit(&key) {
        Ok(())
    } else {
        Err(SignError::RateLimited(bounded(&key.1, 128)))
    }
}

/// The job a session's usage is counted to: its job id, or the session when the provider gave
/// none (never pooled with other id-less jobs, never reset by a renewal).
fn job_of(record: &CertRecord) -> &str {
    if record.claims.job_id.is_empty() {
        record.session_id()
    } else {
        &record.claims.job_id
    }
}

/// `digest_allow_list`: a key with an allow-list signs only the digests on it.
pub fn digest_allow_list(
    spec: Option<&KeySpec>,
    alias: &str,
    digests: &[[u8; 32]],
) -> Result<(), SignError> {
    let Some(list) = spec.and_then(|s| s.allowed_digests.as_ref()) else {
        return Ok(());
    };
    match digests.iter().find(|d| !list.digests.contains(*d)) {
        None => Ok(()),
        Some(d) => Err(SignError::DigestNotAllowed {
            alias: alias.to_string(),
            digest: hex::encode(d),
        }),
    }
}

/// `budget`: counts the request's signatures against the job's and the session's budget for
/// this key (every request is counted, so `admin usage` answers for any key). The
/// "certificate" budget is the session's — the enrolled certificate and its renewals — so a
/// renewal never resets it.
pub fn budget(
    site: &SiteState,
    record: &CertRecord,
    spec: Option<&KeySpec>,
    alias: &str,
    items: usize,
) -> Result<(), SignError> {
    let budget = spec.map(|s| s.budget).unwrap_or_default();
    let charge = crate::state::usage::Charge {
        environment: &record.environment,
        job_id: job_of(record),
        serial: record.session_id(),
        alias,
        items: items as u64,
    };
    match site.charge(charge, &budget)? {
        Ok(()) => Ok(()),
        Err(e) => Err(SignError::Budget {
            alias: alias.to_string(),
            scope: e.scope,
            used: e.used,
            asked: e.asked,
            limit: e.limit,
        }),
    }
}
