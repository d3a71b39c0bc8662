//! The sign port's per-request checks (DESIGN.md "Every signing request").
//!
//! The handshake already proved the peer holds a certificate chaining to one of the site's
//! trusted runner CAs. Connections are long-lived, so every RPC re-checks the rest: the
//! certificate is one this site issued and has not been revoked, has not expired (by the injected
//! clock), names this site's region, its issuer is still trusted, the trust policy that minted it
//! is still enabled, the key exists in the caller's partition, and the key's access rule admits
//! the caller's repository and ref.

use std::sync::Arc;

use meshsign_proto::identity::{JobClaims, RunnerId, claims_extension_oid_der};
use x509_parser::prelude::*;

use crate::enroll::CertRecord;
use crate::sign::LoadedKey;
use crate::site::SiteState;
use crate::store::{StoreError, Tree};

/// The authenticated caller of a sign-port RPC, built once from the peer certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// SPIFFE ID from the only URI SAN.
    pub id: RunnerId,
    /// Job claims from the claims extension.
    pub claims: JobClaims,
    /// Serial, hex.
    pub serial_hex: String,
    /// not_after, unix seconds.
    pub not_after: i64,
}

/// Why a sign-port request was refused. [`AuthzError::check`] names the check.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// No peer certificate (cannot happen behind the mTLS handshake, but checked anyway).
    #[error("certificate: no client certificate")]
    NoCertificate,
    /// The certificate is not a runner certificate of this trust domain.
    #[error("certificate: {0}")]
    BadCertificate(String),
    /// This site has no record of issuing it.
    #[error("certificate: serial {0} was not issued by this site")]
    UnknownCertificate(String),
    /// Revoked.
    #[error("certificate_revoked: serial {serial} revoked ({reason})")]
    Revoked {
        /// Serial.
        serial: String,
        /// Reason given.
        reason: String,
    },
    /// Expired since the connection was opened.
    #[error("certificate_expired: expired at {not_after} (now {now})")]
    Expired {
        /// not_after.
        not_after: i64,
        /// Now.
        now: i64,
    },
    /// Issued for another region.
    #[error("region: certificate is for `{cert}`, this site is `{site}`")]
    Region {
        /// In the certificate.
        cert: String,
        /// This site.
        site: String,
    },
    /// Its runner CA is no longer trusted.
    #[error("issuer_untrusted: runner CA {0} is not trusted")]
    IssuerUntrusted(String),
    /// The trust policy that minted it is disabled.
    #[error("trust_policy_disabled: `{0}` is disabled")]
    PolicyDisabled(String),
    /// The key does not exist in the caller's partition.
    #[error("key_not_in_partition: no key `{alias}` in partition `{partition}`")]
    KeyNotInPartition {
        /// Requested alias.
        alias: String,
        /// Caller's partition.
        partition: String,
    },
    /// The key was disabled by ops.
    #[error("key_disabled: `{0}` is disabled")]
    KeyDisabled(String),
    /// The key's access rule does not admit the caller.
    #[error("key_access: `{repository}`@`{git_ref}` may not use `{alias}`")]
    Access {
        /// Alias.
        alias: String,
        /// Caller repository.
        repository: String,
        /// Caller ref.
        git_ref: String,
    },
    /// Storage failed (internal).
    #[error("storage failed")]
    Store(#[from] StoreError),
}

impl AuthzError {
    /// The check's name, used as the audit reason.
    pub fn check(&self) -> &'static str {
        match self {
            AuthzError::NoCertificate
            | AuthzError::BadCertificate(_)
            | AuthzError::UnknownCertificate(_) => "certificate",
            AuthzError::Revoked { .. } => "certificate_revoked",
            AuthzError::Expired { .. } => "certificate_expired",
            AuthzError::Region { .. } => "region",
            AuthzError::IssuerUntrusted(_) => "issuer_untrusted",
            AuthzError::PolicyDisabled(_) => "trust_policy_disabled",
            AuthzError::KeyNotInPartition { .. } => "key_not_in_partition",
            AuthzError::Access { .. } => "key_access",
            AuthzError::KeyDisabled(_) => "key_disabled",
            AuthzError::Store(_) => "internal",
        }
    }
}

/// The only SAN of a certificate, if it is exactly one URI (runner and ops identities).
pub fn only_uri_san<'a>(cert: &X509Certificate<'a>) -> Option<&'a str> {
    let sans = cert.subject_alternative_name().ok()??;
    match sans.value.general_names.as_slice() {
        [GeneralName::URI(u)] => Some(u),
        _ => None,
    }
}

impl Caller {
    /// Parses a runner certificate (DER) of `trust_domain` into a caller.
    pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Self, AuthzError> {
        let bad = |m: &str| AuthzError::BadCertificate(m.to_string());
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| bad("does not parse"))?;
        let uri = only_uri_san(&cert).ok_or_else(|| bad("not exactly one URI SAN"))?;
        let id = RunnerId::parse(uri).map_err(|e| AuthzError::BadCertificate(e.to_string()))?;
        if id.trust_domain != trust_domain {
            return Err(bad("foreign trust domain"));
        }
        let oid = claims_extension_oid_der();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.as_bytes() == &oid[2..])
            .ok_or_else(|| bad("no claims extension"))?;
        let claims = JobClaims::from_extension_value(ext.value)
            .map_err(|e| AuthzError::BadCertificate(e.to_string()))?;
        Ok(Self {
            id,
            claims,
            serial_hex: hex::encode(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// An audit record carrying this caller's identity fields.
    pub fn audit_record(&self, rpc: &str, now: i64, peer: &str) -> crate::audit::AuditRecord {
        crate::audit::AuditRecord {
            rpc: rpc.into(),
            environment: self.id.environment.clone(),
            job_id: self.claims.job_id.clone(),
            jti: self.claims.jti.clone(),
            token_issuer: self.claims.iss.clone(),
            subject: self.claims.sub.clone(),
            runner_fingerprint: self.id.fingerprint.clone(),
            cert_serial: self.serial_hex.clone(),
            ttl_remaining_sec: Some(self.ttl_remaining(now)),
            repository: self.claims.repository.clone(),
            git_ref: self.claims.git_ref.clone(),
            peer: peer.into(),
            ..Default::default()
        }
    }

    /// Seconds until the certificate expires (negative once expired).
    pub fn ttl_remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// The issuance record of `serial`, from the site's cache or the store.
fn issuance_record(site: &SiteState, serial: &str) -> Result<Arc<CertRecord>, AuthzError> {
    let cache = || site.cert_cache.lock().unwrap_or_else(|p| p.into_inner());
    let generation = match cache().get(serial) {
        Ok(record) => return Ok(record),
        Err(generation) => generation,
    };
    let record: Arc<CertRecord> = site
        .store
        .get::<CertRecord>(Tree::Certs, serial.as_bytes())?
        .map(Arc::new)
        .ok_or_else(|| AuthzError::UnknownCertificate(serial.to_string()))?;
    cache().insert(generation, record.clone());
    Ok(record)
}

/// Runs every per-request check and returns the key version that signs.
pub fn authorize(site: &SiteState, caller: &Caller, alias: &str) -> Result<LoadedKey, AuthzError> {
    let now = site.clock.unix();
    let record = issuance_record(site, &caller.serial_hex)?;
    if let Some(reason) = crate::ops::revocation_of(site, &record) {
        return Err(AuthzError::Revoked {
            serial: record.serial.clone(),
            reason,
        });
    }
    if now >= caller.not_after {
        return Err(AuthzError::Expired {
            not_after: caller.not_after,
            now,
        });
    }
    let config = site.config();
    if caller.id.region != config.region || record.region != config.region {
        return Err(AuthzError::Region {
            cert: caller.id.region.clone(),
            site: config.region.clone(),
        });
    }
    let partition = &record.environment;
    if caller.id.environment != *partition {
        return Err(AuthzError::BadCertificate(
            "partition differs from the issuance record".into(),
        ));
    }
    if !site.issuer_trusted(partition, &record.issuer_id) {
        return Err(AuthzError::IssuerUntrusted(record.issuer_id.clone()));
    }
    if !site.policy_admits_sessions(partition, &record.claims.trust_policy) {
        return Err(AuthzError::PolicyDisabled(
            record.claims.trust_policy.clone(),
        ));
    }
    let spec = config
        .partition(partition)
        .and_then(|p| p.key(alias))
        .ok_or_else(|| AuthzError::KeyNotInPartition {
            alias: alias.to_string(),
            partition: partition.clone(),
        })?;
    if spec.disabled {
        return Err(AuthzError::KeyDisabled(alias.to_string()));
    }
    if !spec
        .access
        .admits(&record.claims.repository, &record.claims.git_ref)
    {
        return Err(AuthzError::Access {
            alias: alias.to_string(),
            repository: record.claims.repository.clone(),
            git_ref: record.claims.git_ref.clone(),
        });
    }
    site.keys()
        .active(partition, alias)
        .cloned()
        .ok_or_else(|| AuthzError::KeyNotInPartition {
            alias: alias.to_string(),
            partition: partition.clone(),
        })
}
