//! Who is calling: typed identities parsed once, at the edge, from what the network presented.
//!
//! Owns: the runner [`Caller`] (from a sign-port peer certificate), the [`Operator`] (from an
//! admin-port peer certificate), the X.509 helper they share ([`only_uri_san`]), and OIDC token
//! decoding and pinned-JWKS verification ([`jwt`]). Must not touch: the store, the clock,
//! running state — whether an identity is still *trusted* is decided by the use cases.

pub mod claims;
pub mod jwt;

use meshsign_evidence::audit::AuditRecord;
use meshsign_evidence::identity::{JobClaims, RunnerId, is_claims_extension_oid};
use x509_parser::prelude::*;

/// Why a peer certificate is not an identity of this site.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No client certificate was presented (cannot happen behind the mutual-TLS handshake,
    /// but checked anyway).
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate is not the identity this port expects.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(m: impl Into<String>) -> IdentityError {
    IdentityError::Malformed(m.into())
}

/// The only SAN of a certificate, if it is exactly one URI (runner and ops identities).
pub fn only_uri_san<'a>(cert: &X509Certificate<'a>) -> Option<&'a str> {
    let sans = cert.subject_alternative_name().ok()??;
    match sans.value.general_names.as_slice() {
        [GeneralName::URI(u)] => Some(u),
        _ => None,
    }
}

/// What a refused certificate is, for the audit: its subject alternative names (`uri:`,
/// `dns:`, comma-separated; `(none)`) and the SHA-256 of its DER (hex).
pub fn describe_certificate(der: &[u8]) -> (String, String) {
    let sha256 = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der));
    let sans = X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, cert)| {
            cert.subject_alternative_name().ok().flatten().map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(u) => format!("uri:{u}"),
                        GeneralName::DNSName(d) => format!("dns:{d}"),
                        GeneralName::RFC822Name(e) => format!("email:{e}"),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(none)".into());
    (sans, sha256)
}

// === runners ===

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

impl Caller {
    /// Parses a runner certificate (DER) of `trust_domain` into a caller.
    pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| malformed("does not parse"))?;
        let uri = only_uri_san(&cert).ok_or_else(|| malformed("not exactly one URI SAN"))?;
        let id = RunnerId::parse(uri).map_err(|e| malformed(e.to_string()))?;
        if id.trust_domain != trust_domain {
            return Err(malformed("foreign trust domain"));
        }
        let ext = cert
            .extensions()
            .iter()
            .find(|e| is_claims_extension_oid(e.oid.as_bytes()))
            .ok_or_else(|| malformed("no claims extension"))?;
        let claims =
            JobClaims::from_extension_value(ext.value).map_err(|e| malformed(e.to_string()))?;
        Ok(Self {
            id,
            claims,
            serial_hex: hex::encode(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// An audit record carrying this caller's identity fields.
    pub fn audit_record(&self, rpc: &str, now: i64, peer: &str) -> AuditRecord {
        AuditRecord {
            rpc: rpc.into(),
            environment: self.id.environment.clone(),
            job_id: self.claims.job_id.clone(),
            pipeline_id: self.claims.pipeline.clone(),
            jti: self.claims.jti.clone(),
            token_issuer: self.claims.iss.clone(),
            subject: self.claims.sub.clone(),
            runner_fingerprint: self.id.fingerprint.clone(),
            cert_serial: self.serial_hex.clone(),
            ttl_remaining_sec: Some(self.ttl_remaining(now)),
            repository: self.claims.repository.clone(),
            git_ref: self.claims.git_ref.clone(),
            provider: self.claims.provider.clone(),
            peer: peer.into(),
            ..Default::default()
        }
    }

    /// Seconds until the certificate expires (negative once expired).
    pub fn ttl_remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

// === operators ===

/// What an ops certificate may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Read-only.
    Auditor,
}

/// An authenticated operator, from the admin port's peer certificate
/// (`spiffe://<trust_domain>/ops/<role>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    /// The SPIFFE ID.
    pub id: String,
    /// Role.
    pub role: Role,
}

impl Operator {
    /// The operator of local actions (a SIGHUP reload, housekeeping).
    pub fn local(what: &str) -> Self {
        Self {
            id: format!("local:{what}"),
            role: Role::Admin,
        }
    }

    /// Parses an ops certificate of `trust_domain`.
    pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|_| malformed("certificate does not parse"))?;
        let uri = only_uri_san(&cert)
            .ok_or_else(|| malformed("an ops certificate has exactly one URI SAN"))?;
        let rest = uri
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(trust_domain))
            .and_then(|r| r.strip_prefix("/ops/"))
            .ok_or_else(|| malformed("not an ops identity of this trust domain"))?;
        let role = match rest.split_once('/') {
            Some(("admin", n)) if !n.is_empty() && !n.contains('/') => Role::Admin,
            Some(("auditor", n)) if !n.is_empty() && !n.contains('/') => Role::Auditor,
            _ => return Err(malformed("ops role must be admin or auditor")),
        };
        Ok(Self {
            id: uri.to_string(),
            role,
        })
    }
}
