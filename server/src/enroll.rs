//! Enrollment: an OIDC job token and a CSR become a short-lived runner certificate.
//!
//! The checks run in DESIGN.md's order, each a small step that names itself; the first failure
//! decides, is audited with that name as the reason, and maps to a gRPC status in `api`.
//! Nothing changes state before every check has passed: the `jti` is claimed atomically only at
//! step 9, just before the certificate is minted.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use meshsign_proto::identity::{JobClaims, RunnerId, is_valid_fingerprint};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use x509_parser::prelude::*;

use crate::audit::{AuditError, AuditRecord};
use crate::config::{Partition, TrustPolicy, glob_match};
use crate::issuer::{CertRequest, IssueError};
use crate::jwt::UnverifiedJwt;
use crate::ops::RevocationKind;
use crate::site::SiteState;
use crate::store::{StoreError, Tree};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: i64 = 60;
/// Largest token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a runner sends to enroll (typed; `api` converts from proto).
#[derive(Clone)]
pub struct EnrollInput {
    /// Compact JWS.
    pub token: String,
    /// PKCS#10 DER.
    pub csr_der: Vec<u8>,
    /// Runner fingerprint.
    pub fingerprint: String,
    /// Region the runner names.
    pub region: String,
    /// Requested TTL; 0 for the cap.
    pub requested_ttl_seconds: u64,
    /// Environment the runner expects.
    pub environment: String,
    /// Peer address, for audit.
    pub peer: String,
}

impl std::fmt::Debug for EnrollInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollInput")
            .field("token", &"[redacted]")
            .field("environment", &self.environment)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// A minted runner certificate.
#[derive(Clone, Debug)]
pub struct EnrollOutput {
    /// Leaf, then the issuing CA (DER).
    pub chain: Vec<Vec<u8>>,
    /// Serial, hex.
    pub serial_hex: String,
    /// not_after, unix seconds.
    pub not_after: i64,
    /// Granted lifetime in seconds.
    pub granted_ttl_seconds: u64,
    /// SPIFFE URI.
    pub spiffe_id: String,
    /// Partition.
    pub environment: String,
    /// Site region.
    pub region: String,
    /// Every runner CA the sign port trusts for this partition (DER).
    pub trusted_issuers: Vec<Vec<u8>>,
}

/// Record of an issued certificate (serial → claims, expiry).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertRecord {
    /// Serial, hex.
    pub serial: String,
    /// Partition.
    pub environment: String,
    /// Region.
    pub region: String,
    /// Runner fingerprint.
    pub fingerprint: String,
    /// Claims in the certificate.
    pub claims: JobClaims,
    /// Runner CA that issued it.
    pub issuer_id: String,
    /// not_before, unix seconds.
    pub not_before: i64,
    /// not_after, unix seconds.
    pub not_after: i64,
    /// Set when revoked: the reason.
    #[serde(default)]
    pub revoked: Option<String>,
}

/// Why an enrollment was refused. [`EnrollError::check`] names the failed check (the audit reason).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Step 0: the runner named an environment this site does not have.
    #[error("environment: no partition `{0}` at this site")]
    UnknownEnvironment(String),
    /// Step 0: the token's audience selects another partition than the one the runner asked for.
    #[error("environment: token audience selects `{token}`, runner asked for `{requested}`")]
    EnvironmentMismatch {
        /// Asked for.
        requested: String,
        /// Selected by `aud`.
        token: String,
    },
    /// The token is not a compact JWS of JSON objects.
    #[error("token: {0}")]
    Malformed(String),
    /// Step 1: `alg` is not RS256 or ES256.
    #[error("alg: `{0}` is not accepted (RS256 or ES256 only)")]
    Algorithm(String),
    /// Step 1: `kid` is missing or not in any pinned JWKS of the partition.
    #[error("kid: `{0}` is not in the pinned JWKS")]
    UnknownKid(String),
    /// Step 1: the signature does not verify under the pinned key.
    #[error("signature: does not verify under pinned key `{0}`")]
    Signature(String),
    /// Step 2: `iss` is not exactly a trust policy's issuer (for the key that signed).
    #[error("iss: `{0}` is not a trusted issuer of this partition")]
    Issuer(String),
    /// Step 2: the trust policy is disabled.
    #[error("trust_policy: `{0}` is disabled")]
    PolicyDisabled(String),
    /// Step 3: `aud` does not contain the partition's audience.
    #[error("aud: token is not for audience `{0}`")]
    Audience(String),
    /// Step 4: expired.
    #[error("exp: token expired at {exp} (now {now}, leeway {LEEWAY_SECONDS}s)")]
    Expired {
        /// `exp`.
        exp: i64,
        /// Now.
        now: i64,
    },
    /// Step 4: not yet valid.
    #[error("nbf: token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// `nbf`.
        nbf: i64,
        /// Now.
        now: i64,
    },
    /// Step 4: `iat` missing, in the future, or older than the partition allows.
    #[error("iat: {0}")]
    IssuedAt(String),
    /// Step 5: `jti` missing.
    #[error("jti: missing or malformed")]
    MissingJti,
    /// Step 5/9: `jti` already used.
    #[error("jti: token `{0}` was already used")]
    Replay(String),
    /// Step 6: a bound claim does not hold.
    #[error("bound_claim: `{claim}` is {actual:?}, policy requires `{pattern}`")]
    BoundClaim {
        /// Claim name.
        claim: String,
        /// Required pattern.
        pattern: String,
        /// Value in the token (None if absent).
        actual: Option<String>,
    },
    /// Step 7: the CSR does not parse or its signature does not verify.
    #[error("csr: {0}")]
    Csr(String),
    /// Step 7: the CSR key is not P-256.
    #[error("csr_key: only P-256 keys are accepted")]
    CsrKey,
    /// Step 8: the runner named another region.
    #[error("region: this site serves `{site}`, not `{requested}`")]
    Region {
        /// Asked for.
        requested: String,
        /// This site.
        site: String,
    },
    /// Step 8: malformed fingerprint.
    #[error("fingerprint: must be 64 lowercase hex characters")]
    Fingerprint,
    /// Step 8: an ops revocation rule covers this job or runner.
    #[error("revoked: {0}")]
    Revoked(String),
    /// Issuance failed (internal).
    #[error("issuance failed")]
    Issue(#[from] IssueError),
    /// Storage failed (internal).
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// The audit record could not be written, so nothing is returned.
    #[error("audit unavailable")]
    Audit(#[from] AuditError),
}

impl EnrollError {
    /// The check's name, used as the audit reason.
    pub fn check(&self) -> &'static str {
        match self {
            EnrollError::UnknownEnvironment(_) | EnrollError::EnvironmentMismatch { .. } => {
                "environment"
            }
            EnrollError::Malformed(_) => "token_malformed",
            EnrollError::Algorithm(_) => "alg",
            EnrollError::UnknownKid(_) => "kid",
            EnrollError::Signature(_) => "signature",
            EnrollError::Issuer(_) => "iss",
            EnrollError::PolicyDisabled(_) => "trust_policy_disabled",
            EnrollError::Audience(_) => "aud",
            EnrollError::Expired { .. } => "exp",
            EnrollError::NotYetValid { .. } => "nbf",
            EnrollError::IssuedAt(_) => "iat",
            EnrollError::MissingJti => "jti",
            EnrollError::Replay(_) => "jti_replay",
            EnrollError::BoundClaim { .. } => "bound_claim",
            EnrollError::Csr(_) => "csr",
            EnrollError::CsrKey => "csr_key",
            EnrollError::Region { .. } => "region",
            EnrollError::Fingerprint => "fingerprint",
            EnrollError::Revoked(_) => "revoked",
            EnrollError::Issue(_) | EnrollError::Store(_) => "internal",
            EnrollError::Audit(_) => "audit_unavailable",
        }
    }
}

/// Runs every check, mints the certificate, and audits the decision either way.
pub async fn enroll(site: &SiteState, input: EnrollInput) -> Result<EnrollOutput, EnrollError> {
    let mut rec = AuditRecord {
        rpc: "Enroll".into(),
        environment: input.environment.clone(),
        runner_fingerprint: input.fingerprint.clone(),
        peer: input.peer.clone(),
        ..Default::default()
    };
    let result = run(site, &input, &mut rec);
    match &result {
        Ok(out) => {
            rec.decision = "allow".into();
            rec.reason = "ok".into();
            rec.cert_serial = out.serial_hex.clone();
            rec.ttl_remaining_sec = Some(out.granted_ttl_seconds as i64);
        }
        Err(e) => {
            rec.decision = "deny".into();
            rec.reason = e.check().into();
            tracing::info!(reason = e.check(), detail = %e, "enrollment refused");
        }
    }
    site.audit.record(rec).await?;
    result
}

fn run(
    site: &SiteState,
    input: &EnrollInput,
    rec: &mut AuditRecord,
) -> Result<EnrollOutput, EnrollError> {
    let now = site.clock.unix();
    let config = site.config();
    // Step 0: the partition the runner asked for; the token may not select another one.
    let partition = config
        .partition(&input.environment)
        .ok_or_else(|| EnrollError::UnknownEnvironment(input.environment.clone()))?;
    if input.token.len() > MAX_TOKEN_BYTES {
        return Err(EnrollError::Malformed("token too large".into()));
    }
    let jwt = UnverifiedJwt::decode(&input.token).map_err(EnrollError::Malformed)?;
    // Record what the token claims (unverified until the checks pass; denials say so by reason).
    rec.jti = jwt
        .str_claim("jti")
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();
    rec.token_issuer = jwt
        .str_claim("iss")
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();
    rec.subject = jwt
        .str_claim("sub")
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();
    rec.job_id = job_id(&jwt);
    rec.repository = jwt
        .str_claim("repository")
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();
    rec.git_ref = jwt
        .str_claim("ref")
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();

    let auds = jwt.audiences();
    if !auds.contains(&partition.audience.as_str())
        && let Some(other) = config
            .partitions
            .iter()
            .find(|p| auds.contains(&p.audience.as_str()))
    {
        return Err(EnrollError::EnvironmentMismatch {
            requested: partition.name.clone(),
            token: other.name.clone(),
        });
    }

    // Step 1: algorithm, kid, signature.
    if jwt.alg != "RS256" && jwt.alg != "ES256" {
        return Err(EnrollError::Algorithm(jwt.alg.chars().take(32).collect()));
    }
    let kid = jwt.kid.clone().unwrap_or_default();
    let candidates: Vec<&TrustPolicy> = partition
        .trust_policies
        .iter()
        .filter(|p| p.jwks.find(&kid).is_some())
        .collect();
    if candidates.is_empty() {
        return Err(EnrollError::UnknownKid(kid.chars().take(128).collect()));
    }
    let verified: Vec<&TrustPolicy> = candidates
        .into_iter()
        .filter(|p| p.jwks.find(&kid).is_some_and(|k| jwt.verify(&k.key)))
        .collect();
    if verified.is_empty() {
        return Err(EnrollError::Signature(kid));
    }

    // Step 2: exact issuer of a policy whose key verified; policy enabled.
    let iss = jwt.str_claim("iss").unwrap_or_default();
    let policy = verified
        .into_iter()
        .find(|p| p.issuer.as_bytes() == iss.as_bytes())
        .ok_or_else(|| EnrollError::Issuer(iss.chars().take(256).collect()))?;
    if !policy.enabled {
        return Err(EnrollError::PolicyDisabled(policy.name.clone()));
    }

    // Step 3: audience.
    if !auds.contains(&partition.audience.as_str()) {
        return Err(EnrollError::Audience(partition.audience.clone()));
    }

    // Step 4: time.
    check_times(&jwt, partition, now)?;

    // Step 5: jti present and never seen.
    let jti = jwt.str_claim("jti").unwrap_or_default();
    if jti.is_empty() || jti.len() > 256 {
        return Err(EnrollError::MissingJti);
    }
    let jti_key = jti_key(iss, jti);
    if site.store.kv().get(Tree::Jti, &jti_key)?.is_some() {
        return Err(EnrollError::Replay(jti.to_string()));
    }

    // Step 6: bound claims.
    for (claim, pattern) in &policy.bound_claims {
        let actual = jwt.claims.get(claim).and_then(claim_as_string);
        if !actual.as_deref().is_some_and(|a| glob_match(pattern, a)) {
            return Err(EnrollError::BoundClaim {
                claim: claim.clone(),
                pattern: pattern.clone(),
                actual,
            });
        }
    }

    // Step 7: CSR signature and key type.
    let spki = verify_csr(&input.csr_der)?;

    // Step 8: region and fingerprint.
    if input.region != site.config().region {
        return Err(EnrollError::Region {
            requested: input.region.clone(),
            site: site.config().region.clone(),
        });
    }
    if !is_valid_fingerprint(&input.fingerprint) {
        return Err(EnrollError::Fingerprint);
    }
    // Open-ended job and fingerprint revocations also bar new certificates.
    if let Some(rule) = site.revocations().iter().find(|r| {
        r.until.is_none()
            && r.region.as_ref().is_none_or(|g| *g == config.region)
            && match r.kind {
                RevocationKind::JobId => r.value == rec.job_id,
                RevocationKind::Fingerprint => r.value == input.fingerprint,
                RevocationKind::Serial => false,
            }
    }) {
        return Err(EnrollError::Revoked(format!(
            "{} ({})",
            rule.id, rule.reason
        )));
    }

    // Step 9: claim the jti (atomically), issue, record.
    let exp = jwt.time_claim("exp").unwrap_or(now);
    if !site
        .store
        .kv()
        .insert_new(Tree::Jti, &jti_key, &(exp + LEEWAY_SECONDS).to_be_bytes())?
    {
        return Err(EnrollError::Replay(jti.to_string()));
    }
    let ttl = match input.requested_ttl_seconds {
        0 => partition.max_ttl_seconds,
        r => r.min(partition.max_ttl_seconds),
    };
    let claims = JobClaims {
        iss: iss.to_string(),
        sub: jwt.str_claim("sub").unwrap_or_default().to_string(),
        jti: jti.to_string(),
        job_id: rec.job_id.clone(),
        repository: jwt.str_claim("repository").unwrap_or_default().to_string(),
        git_ref: jwt.str_claim("ref").unwrap_or_default().to_string(),
        trust_policy: policy.name.clone(),
    };
    let id = RunnerId {
        trust_domain: site.config().trust_domain.clone(),
        environment: partition.name.clone(),
        region: site.config().region.clone(),
        fingerprint: input.fingerprint.clone(),
    };
    let issuers = site.issuers(&partition.name)?;
    let ca = &issuers.active;
    let issued = ca.issue(&CertRequest {
        id: id.clone(),
        claims: claims.clone(),
        public_key_spki: spki,
        now_unix: now,
        ttl_seconds: ttl,
    })?;
    let record = CertRecord {
        serial: issued.serial_hex.clone(),
        environment: partition.name.clone(),
        region: site.config().region.clone(),
        fingerprint: input.fingerprint.clone(),
        claims,
        issuer_id: ca.record.id.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        revoked: None,
    };
    site.store
        .put(Tree::Certs, issued.serial_hex.as_bytes(), &record)?;
    Ok(EnrollOutput {
        chain: vec![issued.der, ca.record.cert_der.clone()],
        serial_hex: issued.serial_hex,
        not_after: issued.not_after,
        granted_ttl_seconds: ttl,
        spiffe_id: id.to_uri(),
        environment: partition.name.clone(),
        region: site.config().region.clone(),
        trusted_issuers: issuers
            .trusted(now)
            .into_iter()
            .map(|r| r.cert_der.clone())
            .collect(),
    })
}

/// The CI job id: `job_id` (GitLab), else `run_id` (GitHub Actions), else empty.
fn job_id(jwt: &UnverifiedJwt) -> String {
    ["job_id", "run_id"]
        .iter()
        .find_map(|c| jwt.claims.get(*c).and_then(claim_as_string))
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect()
}

fn claim_as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn check_times(jwt: &UnverifiedJwt, partition: &Partition, now: i64) -> Result<(), EnrollError> {
    let exp = jwt
        .time_claim("exp")
        .ok_or(EnrollError::Expired { exp: 0, now })?;
    if now > exp + LEEWAY_SECONDS {
        return Err(EnrollError::Expired { exp, now });
    }
    if let Some(nbf) = jwt.time_claim("nbf")
        && nbf > now + LEEWAY_SECONDS
    {
        return Err(EnrollError::NotYetValid { nbf, now });
    }
    let iat = jwt
        .time_claim("iat")
        .ok_or_else(|| EnrollError::IssuedAt("missing".into()))?;
    if iat > now + LEEWAY_SECONDS {
        return Err(EnrollError::IssuedAt(format!(
            "issued in the future ({iat}, now {now})"
        )));
    }
    if now - iat > partition.max_token_age_seconds as i64 + LEEWAY_SECONDS {
        return Err(EnrollError::IssuedAt(format!(
            "token is {}s old; this partition accepts {}s",
            now - iat,
            partition.max_token_age_seconds
        )));
    }
    Ok(())
}

/// Replay-store key: a hash of the issuer (bounded length) and the jti.
fn jti_key(iss: &str, jti: &str) -> Vec<u8> {
    let mut k = hex::encode(&digest(&SHA256, iss.as_bytes()).as_ref()[..8]).into_bytes();
    k.push(b'/');
    k.extend_from_slice(jti.as_bytes());
    k
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// Parses a PKCS#10 CSR, requires a P-256 key and ecdsa-with-SHA256, verifies its signature, and
/// returns the SPKI DER. Nothing else in the CSR is used.
pub fn verify_csr(der: &[u8]) -> Result<Vec<u8>, EnrollError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| EnrollError::Csr(format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(EnrollError::Csr("trailing bytes".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm.to_id_string() == OID_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|o| o.to_id_string() == OID_P256);
    if !is_p256 {
        return Err(EnrollError::CsrKey);
    }
    if csr.signature_algorithm.algorithm.to_id_string() != OID_ECDSA_SHA256 {
        return Err(EnrollError::Csr(
            "signature algorithm must be ecdsa-with-SHA256".into(),
        ));
    }
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.as_ref(),
    )
    .verify(
        csr.certification_request_info.raw,
        csr.signature_value.data.as_ref(),
    )
    .map_err(|_| EnrollError::Csr("signature does not verify".into()))?;
    Ok(spki.raw.to_vec())
}

/// Removes replay-store entries whose token can no longer be used (expired + leeway).
pub fn prune_jti(site: &SiteState) -> Result<usize, StoreError> {
    let now = site.clock.unix();
    let mut removed = 0;
    for (k, v) in site.store.kv().scan_prefix(Tree::Jti, b"")? {
        let until = v.as_slice().try_into().map(i64::from_be_bytes).unwrap_or(0);
        if until < now {
            site.store.kv().remove(Tree::Jti, &k)?;
            removed += 1;
        }
    }
    Ok(removed)
}
