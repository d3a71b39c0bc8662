//! Enrollment: an OIDC job token and a CSR become a short-lived runner certificate.
//!
//! Owns: the enrollment checks, in DESIGN.md's order, one function per check named by its audit
//! reason ([`EnrollError::reason`]); the first failure decides, is audited with that reason,
//! and becomes a status in `api::status`. Nothing changes state before every check has passed:
//! the `jti` is claimed atomically only at the last step, just before the certificate is
//! minted. Must not touch: tonic, TLS, proto messages (`api` converts).

pub use crate::ca::csr::verify_csr;

use meshsign_evidence::identity::{JobClaims, RunnerId, is_valid_fingerprint};
use serde_json::Value;

use crate::audit::{AuditError, AuditRecord};
use crate::ca::CaError;
use crate::config::{Environment, RunnerMode, SiteConfig, TrustPolicy};
use crate::custody::CustodyError;
use crate::identity::claims::JobIdentity;
use crate::identity::jwt::UnverifiedJwt;
use crate::model::{Reason, Refusal, RefusalKind, bounded, glob_match};
use crate::state::issuance::Session;
use crate::state::runners::{DeviceError, DeviceProof};
use crate::state::{SiteState, StateError};
use crate::store::StoreError;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: i64 = 60;
/// Largest token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest claim value kept in audit records and messages.
const CLAIM_MAX: usize = 256;

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
    /// The device key's proof of possession, if the runner has a device key.
    pub device_proof: Option<DeviceProof>,
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

/// What an enrollment hands out (the same as a renewal: [`crate::state::issuance::Issued`]).
pub use crate::state::issuance::Issued as EnrollOutput;

/// Why an enrollment was refused. `Display` is the detail; [`Refusal::reason`] the check.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Step 0: the runner named an environment this site does not have.
    #[error("no environment `{0}` at this site")]
    UnknownEnvironment(String),
    /// Step 0: the token's audience selects another environment than the one asked for.
    #[error("token audience selects `{token}`, runner asked for `{requested}`")]
    EnvironmentMismatch {
        /// Asked for.
        requested: String,
        /// Selected by `aud`.
        token: String,
    },
    /// The token is not a compact JWS of JSON objects.
    #[error("{0}")]
    Malformed(String),
    /// Step 1: `alg` is not RS256 or ES256.
    #[error("`{0}` is not accepted (RS256 or ES256 only)")]
    Algorithm(String),
    /// Step 1: `kid` is missing or not in any pinned JWKS of the environment.
    #[error("`{0}` is not in the pinned JWKS")]
    UnknownKid(String),
    /// Step 1: the signature does not verify under the pinned key.
    #[error("does not verify under pinned key `{0}`")]
    Signature(String),
    /// Step 2: `iss` is not exactly a trust policy's issuer (for the key that signed).
    #[error("`{0}` is not a trusted OIDC issuer of this environment")]
    Issuer(String),
    /// Step 2: the trust policy is disabled.
    #[error("`{0}` is disabled")]
    PolicyDisabled(String),
    /// Step 3: `aud` does not contain the environment's audience.
    #[error("token is not for audience `{0}`")]
    Audience(String),
    /// Step 4: expired.
    #[error(
        "token expired at {} ({} ago; leeway {LEEWAY_SECONDS} s)",
        crate::model::when(*exp),
        crate::model::span(now - exp)
    )]
    Expired {
        /// `exp`.
        exp: i64,
        /// Now.
        now: i64,
    },
    /// Step 4: not yet valid.
    #[error(
        "token not valid before {} (in {})",
        crate::model::when(*nbf),
        crate::model::span(nbf - now)
    )]
    NotYetValid {
        /// `nbf`.
        nbf: i64,
        /// Now.
        now: i64,
    },
    /// Step 4: the token claims to live longer than its trust policy allows (`exp − iat`).
    #[error("token lives {lifetime}s (exp − iat); this trust policy allows {max}s")]
    Lifetime {
        /// `exp − iat`.
        lifetime: i64,
        /// The ceiling.
        max: u64,
    },
    /// Step 3: `aud` names more than one environment of this site.
    #[error("token audiences name {0} environments of this site; a token must select one")]
    AmbiguousAudience(usize),
    /// Step 3: `aud` names something besides this site's audience for the environment —
    /// another region's site, another environment, anything. The `jti` store is per site (sites
    /// share nothing), so a token valid at two sites would buy a session at each.
    #[error(
        "token audiences {others} are not this site's `{ours}`; a token must name this site's \
         audience and nothing else"
    )]
    ForeignAudience {
        /// This site's audience for the environment.
        ours: String,
        /// The other values, bounded.
        others: String,
    },
    /// Step 4: `iat` missing, in the future, or older than the environment allows.
    #[error("{0}")]
    IssuedAt(String),
    /// Step 5: `jti` missing.
    #[error("missing or malformed")]
    MissingJti,
    /// Step 5/9: `jti` already used.
    #[error("token `{0}` was already used")]
    Replay(String),
    /// Step 6: a bound claim does not hold.
    #[error("`{claim}` is {}, policy requires `{pattern}`", actual.as_deref().map_or_else(|| "absent".to_string(), |a| format!("`{a}`")))]
    BoundClaim {
        /// Claim name.
        claim: String,
        /// Required pattern.
        pattern: String,
        /// Value in the token (None if absent), bounded.
        actual: Option<String>,
    },
    /// Step 7: the CSR does not parse or its signature does not verify.
    #[error("{0}")]
    Csr(String),
    /// Step 7: the CSR key is not P-256.
    #[error("only P-256 keys are accepted")]
    CsrKey,
    /// Step 8: the runner named another region.
    #[error("this site serves `{site}`, not `{requested}`")]
    Region {
        /// Asked for.
        requested: String,
        /// This site.
        site: String,
    },
    /// Step 8: malformed fingerprint.
    #[error("must be 64 lowercase hex characters")]
    Fingerprint,
    /// Step 8: an ops revocation rule covers this job or runner.
    #[error("{0}")]
    Revoked(String),
    /// Step 8: the device key's proof (environments with `runners = "registered"`).
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// Step 0: this source address has spent its enroll budget (`[limits]
    /// enroll_per_source_*`). Counted into a summary entry, not written one by one.
    #[error("too many enrollments from {0}; retry later")]
    RateLimited(String),
    /// Issuance failed (internal).
    #[error("issuance failed: {0}")]
    Issue(#[from] CaError),
    /// Storage failed (internal).
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// Site state failed (internal).
    #[error("site state: {0}")]
    State(#[from] StateError),
    /// The audit record could not be written, so nothing is returned.
    #[error("the audit log cannot be written; nothing was issued")]
    Audit(#[source] AuditError),
}

impl From<crate::ca::csr::CsrError> for EnrollError {
    fn from(e: crate::ca::csr::CsrError) -> Self {
        match e {
            crate::ca::csr::CsrError::Invalid(m) => EnrollError::Csr(m),
            crate::ca::csr::CsrError::NotP256 => EnrollError::CsrKey,
        }
    }
}

impl From<crate::state::issuance::MintError> for EnrollError {
    fn from(e: crate::state::issuance::MintError) -> Self {
        use crate::state::issuance::MintError;
        match e {
            MintError::Ca(e) => EnrollError::Issue(e),
            MintError::Store(e) => EnrollError::Store(e),
            MintError::State(e) => EnrollError::State(e),
            // A first certificate starts its own session: nothing can supersede it.
            MintError::Superseded { serial, .. } => {
                EnrollError::State(crate::state::StateError::Invariant(format!(
                    "a new session's certificate {serial} was superseded"
                )))
            }
        }
    }
}

impl Refusal for EnrollError {
    fn reason(&self) -> Reason {
        match self {
            EnrollError::UnknownEnvironment(_) | EnrollError::EnvironmentMismatch { .. } => {
                Reason::Environment
            }
            EnrollError::Malformed(_) => Reason::TokenMalformed,
            EnrollError::Algorithm(_) => Reason::Alg,
            EnrollError::UnknownKid(_) => Reason::Kid,
            EnrollError::Signature(_) => Reason::Signature,
            EnrollError::Issuer(_) => Reason::Iss,
            EnrollError::PolicyDisabled(_) => Reason::TrustPolicyDisabled,
            EnrollError::Audience(_)
            | EnrollError::AmbiguousAudience(_)
            | EnrollError::ForeignAudience { .. } => Reason::Aud,
            EnrollError::Lifetime { .. } => Reason::TokenLifetime,
            EnrollError::Expired { .. } => Reason::Exp,
            EnrollError::NotYetValid { .. } => Reason::Nbf,
            EnrollError::IssuedAt(_) => Reason::Iat,
            EnrollError::MissingJti => Reason::Jti,
            EnrollError::Replay(_) => Reason::JtiReplay,
            EnrollError::BoundClaim { .. } => Reason::BoundClaim,
            EnrollError::Csr(_) => Reason::Csr,
            EnrollError::CsrKey => Reason::CsrKey,
            EnrollError::Region { .. } => Reason::Region,
            EnrollError::Fingerprint => Reason::Fingerprint,
            EnrollError::Revoked(_) => Reason::Revoked,
            EnrollError::Device(e) => e.reason(),
            EnrollError::RateLimited(_) => Reason::RateLimited,
            EnrollError::Issue(CaError::Custody(CustodyError::TokenUnavailable(_))) => {
                Reason::KeyUnavailable
            }
            EnrollError::Issue(_) | EnrollError::Store(_) | EnrollError::State(_) => {
                Reason::Internal
            }
            EnrollError::Audit(_) => Reason::AuditUnavailable,
        }
    }

    fn kind(&self) -> RefusalKind {
        use EnrollError::*;
        match self {
            RateLimited(_) => RefusalKind::ResourceExhausted,
            UnknownEnvironment(_) | Csr(_) | CsrKey | Fingerprint => RefusalKind::InvalidArgument,
            EnvironmentMismatch { .. } | PolicyDisabled(_) | BoundClaim { .. } | Revoked(_) => {
                RefusalKind::PermissionDenied
            }
            Malformed(_)
            | Algorithm(_)
            | UnknownKid(_)
            | Signature(_)
            | Issuer(_)
            | Audience(_)
            | AmbiguousAudience(_)
            | ForeignAudience { .. }
            | Expired { .. }
            | NotYetValid { .. }
            | IssuedAt(_)
            | Lifetime { .. }
            | MissingJti
            | Replay(_) => RefusalKind::Unauthenticated,
            Region { .. } => RefusalKind::FailedPrecondition,
            Device(e) => e.kind(),
            Audit(_) | Issue(CaError::Custody(CustodyError::TokenUnavailable(_))) => {
                RefusalKind::Unavailable
            }
            Issue(_) | Store(_) | State(_) => RefusalKind::Internal,
        }
    }
}

/// Runs every check, mints the certificate, and audits the decision either way. A refusal's
/// audit record carries its reason and detail; an internal fault's detail is its error id,
/// under which the log holds the cause.
pub async fn enroll(site: &SiteState, input: EnrollInput) -> Result<EnrollOutput, EnrollError> {
    let mut rec = AuditRecord {
        rpc: "Enroll".into(),
        environment: bounded(&input.environment, 64),
        runner_fingerprint: bounded(&input.fingerprint, 64),
        peer: input.peer.clone(),
        ..Default::default()
    };
    if let Err(e) = rate_limited(site, &input.peer) {
        // Before anything is parsed or written: counted into one summary entry per source
        // and interval, so a flood costs no write per request.
        rec.environment = "(unchecked)".into();
        rec.runner_fingerprint.clear();
        crate::audit::deny_quietly(&mut rec, &e);
        site.summaries.count(rec, site.clock.unix());
        return Err(e);
    }
    let result = checks_and_issue(site, &input, &mut rec);
    match &result {
        Ok(out) => {
            rec.decision = "allow".into();
            rec.reason = Reason::Ok.as_str().into();
            rec.cert_serial = out.serial_hex.clone();
            rec.ttl_remaining_sec = i64::try_from(out.granted_ttl_seconds).ok();
        }
        Err(e) => {
            // Beyond the site-wide rate of refusal entries, a refusal is counted into a
            // summary entry instead (whatever the number of source addresses); an internal
            // fault is always recorded on its own.
            if e.kind() != RefusalKind::Internal && !site.enroll_deny_entries.admit(&()) {
                rec.detail.clear();
                crate::audit::deny_quietly(&mut rec, e);
                site.summaries.count(rec, site.clock.unix());
                return result;
            }
            let token = std::mem::take(&mut rec.detail);
            crate::audit::deny(&mut rec, e, "enrollment refused");
            if !token.is_empty() {
                rec.detail = format!("{}; {token}", rec.detail);
            }
        }
    }
    site.audit.record(rec).await.map_err(EnrollError::Audit)?;
    result
}

/// Step 0 (`rate_limited`): the source address's token bucket (`[limits]
/// enroll_per_source_per_second`, `enroll_per_source_burst`).
fn rate_limited(site: &SiteState, peer: &str) -> Result<(), EnrollError> {
    let Ok(addr) = peer.parse::<std::net::SocketAddr>() else {
        return Ok(());
    };
    if site.enroll_limiter.admit(&addr.ip()) {
        Ok(())
    } else {
        Err(EnrollError::RateLimited(addr.ip().to_string()))
    }
}

/// The request's checks in DESIGN.md's order, then issuance.
fn checks_and_issue(
    site: &SiteState,
    input: &EnrollInput,
    rec: &mut AuditRecord,
) -> Result<EnrollOutput, EnrollError> {
    let now = site.clock.unix();
    let config = site.config();
    let environment = environment(&config, input)?;
    let jwt = token_malformed(input)?;
    record_token(&input.token, &jwt, rec);
    environment_of_token(&config, environment, &jwt)?;
    alg(&jwt)?;
    let candidates = kid(environment, &jwt)?;
    let verified = signature(candidates, &jwt)?;
    // Only now are the claims the issuer's word: until here an entry names none of them.
    record_claims(&jwt, rec);
    let policy = iss(verified, &jwt)?;
    // From here on the job is read the way the policy's provider writes it.
    let job = JobIdentity::map(policy.provider, &policy.claim_mappings, &jwt.claims);
    record_job(&job, rec);
    if policy.allow_unbound {
        rec.detail = format!(
            "{}; trust policy `{}` binds no owner (allow_unbound = true)",
            rec.detail, policy.name
        );
    }
    trust_policy_disabled(policy)?;
    aud(environment, &jwt)?;
    exp(&jwt, now)?;
    nbf(&jwt, now)?;
    iat(environment, &jwt, now)?;
    token_lifetime(policy, &jwt)?;
    let jti = jti(&jwt)?;
    jti_replay(site, &jwt, jti)?;
    bound_claim(policy, &job, &jwt)?;
    let spki = verify_csr(&input.csr_der)?;
    region(&config, input)?;
    let runner = runner(site, &config, environment, (&jwt, jti), &spki, input, rec)?;
    revoked(site, &job, &runner.0)?;
    issue(
        site,
        (&config, environment, policy),
        &jwt,
        jti,
        spki,
        input,
        &job,
        runner,
    )
}

// === the checks, one per audit reason ===

/// `environment` (step 0): the environment the runner asked for exists.
fn environment<'c>(
    config: &'c SiteConfig,
    input: &EnrollInput,
) -> Result<&'c Environment, EnrollError> {
    config
        .environment(&input.environment)
        .ok_or_else(|| EnrollError::UnknownEnvironment(bounded(&input.environment, 64)))
}

/// `token_malformed`: a compact JWS of JSON objects, not too large.
fn token_malformed(input: &EnrollInput) -> Result<UnverifiedJwt, EnrollError> {
    if input.token.len() > MAX_TOKEN_BYTES {
        return Err(EnrollError::Malformed(format!(
            "token of {} bytes exceeds {MAX_TOKEN_BYTES}",
            input.token.len()
        )));
    }
    UnverifiedJwt::decode(&input.token).map_err(EnrollError::Malformed)
}

/// What an entry says of a token before its signature verifies: facts about the bytes — their
/// SHA-256, the header's `kid` — and the `iss` it names; never a claim value (a job id, a
/// repository), which anyone can write into a token and so attach an entry to any job.
fn record_token(token: &str, jwt: &UnverifiedJwt, rec: &mut AuditRecord) {
    rec.token_issuer = bounded(jwt.str_claim("iss").unwrap_or_default(), CLAIM_MAX);
    rec.detail = format!(
        "token sha256 {}, kid `{}`",
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            token.as_bytes()
        )),
        bounded(jwt.kid.as_deref().unwrap_or_default(), 64)
    );
}

/// Records what the token claims, once its signature verified (the remaining checks may still
/// refuse it; denials say so by reason).
fn record_claims(jwt: &UnverifiedJwt, rec: &mut AuditRecord) {
    let claim = |name: &str| bounded(jwt.str_claim(name).unwrap_or_default(), CLAIM_MAX);
    rec.jti = claim("jti");
    rec.token_issuer = claim("iss");
    rec.subject = claim("sub");
    rec.job_id = job_id(jwt);
    rec.repository = claim("repository");
    rec.git_ref = claim("ref");
}

/// Records the mapped job (once the policy, and so the provider, is known).
fn record_job(job: &JobIdentity, rec: &mut AuditRecord) {
    rec.repository = job.repository.clone();
    rec.git_ref = job.git_ref.clone();
    rec.job_id = job.job_id.clone();
    rec.pipeline_id = job.pipeline.clone();
    rec.provider = job.provider.as_str().to_string();
    rec.detail = format!("{}; job_id from {}", rec.detail, job.job_id_source);
}

/// `environment` (step 0): the token's audience may not select another environment.
fn environment_of_token(
    config: &SiteConfig,
    environment: &Environment,
    jwt: &UnverifiedJwt,
) -> Result<(), EnrollError> {
    let auds = jwt.audiences();
    let selected = config
        .environments
        .iter()
        .filter(|p| auds.contains(&p.audience.as_str()))
        .count();
    if selected > 1 {
        return Err(EnrollError::AmbiguousAudience(selected));
    }
    if auds.contains(&environment.audience.as_str()) {
        return Ok(());
    }
    match config
        .environments
        .iter()
        .find(|p| auds.contains(&p.audience.as_str()))
    {
        Some(other) => Err(EnrollError::EnvironmentMismatch {
            requested: environment.name.clone(),
            token: other.name.clone(),
        }),
        None => Ok(()),
    }
}

/// `alg` (step 1): RS256 or ES256.
fn alg(jwt: &UnverifiedJwt) -> Result<(), EnrollError> {
    if jwt.alg == "RS256" || jwt.alg == "ES256" {
        return Ok(());
    }
    Err(EnrollError::Algorithm(bounded(&jwt.alg, 32)))
}

/// `kid` (step 1): the policies of the environment that pin the token's `kid`.
fn kid<'p>(
    environment: &'p Environment,
    jwt: &UnverifiedJwt,
) -> Result<Vec<&'p TrustPolicy>, EnrollError> {
    let kid = jwt.kid.as_deref().unwrap_or_default();
    let candidates: Vec<&TrustPolicy> = environment
        .trust_policies
        .iter()
        .filter(|p| p.jwks.find(kid).is_some())
        .collect();
    if candidates.is_empty() {
        return Err(EnrollError::UnknownKid(bounded(kid, 128)));
    }
    Ok(candidates)
}

/// `signature` (step 1): the policies whose pinned key verifies the token.
fn signature<'p>(
    candidates: Vec<&'p TrustPolicy>,
    jwt: &UnverifiedJwt,
) -> Result<Vec<&'p TrustPolicy>, EnrollError> {
    let kid = jwt.kid.as_deref().unwrap_or_default();
    let verified: Vec<&TrustPolicy> = candidates
        .into_iter()
        .filter(|p| p.jwks.find(kid).is_some_and(|k| jwt.verify(&k.key)))
        .collect();
    if verified.is_empty() {
        return Err(EnrollError::Signature(bounded(kid, 128)));
    }
    Ok(verified)
}

/// `iss` (step 2): exactly the OIDC issuer of a policy whose key verified.
fn iss<'p>(
    verified: Vec<&'p TrustPolicy>,
    jwt: &UnverifiedJwt,
) -> Result<&'p TrustPolicy, EnrollError> {
    let iss = jwt.str_claim("iss").unwrap_or_default();
    verified
        .into_iter()
        .find(|p| p.issuer.as_bytes() == iss.as_bytes())
        .ok_or_else(|| EnrollError::Issuer(bounded(iss, CLAIM_MAX)))
}

/// `trust_policy_disabled` (step 2): the policy admits new enrollments.
fn trust_policy_disabled(policy: &TrustPolicy) -> Result<(), EnrollError> {
    if policy.enabled {
        return Ok(());
    }
    Err(EnrollError::PolicyDisabled(policy.name.clone()))
}

/// `aud` (step 3): the token is for this environment's audience.
fn aud(environment: &Environment, jwt: &UnverifiedJwt) -> Result<(), EnrollError> {
    let auds = jwt.audiences();
    if !auds.contains(&environment.audience.as_str()) {
        return Err(EnrollError::Audience(environment.audience.clone()));
    }
    // Every value must be this site's: one token buys one site, one environment.
    let others: Vec<String> = auds
        .iter()
        .filter(|a| **a != environment.audience)
        .take(4)
        .map(|a| format!("`{}`", bounded(a, 64)))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(EnrollError::ForeignAudience {
        ours: environment.audience.clone(),
        others: others.join(", "),
    })
}

/// `exp` (step 4): present and not past (with leeway).
fn exp(jwt: &UnverifiedJwt, now: i64) -> Result<i64, EnrollError> {
    let exp = jwt
        .time_claim("exp")
        .ok_or(EnrollError::Expired { exp: 0, now })?;
    if now > exp.saturating_add(LEEWAY_SECONDS) {
        return Err(EnrollError::Expired { exp, now });
    }
    Ok(exp)
}

/// `nbf` (step 4): if present, not in the future (with leeway).
fn nbf(jwt: &UnverifiedJwt, now: i64) -> Result<(), EnrollError> {
    match jwt.time_claim("nbf") {
        Some(nbf) if nbf > now.saturating_add(LEEWAY_SECONDS) => {
            Err(EnrollError::NotYetValid { nbf, now })
        }
        _ => Ok(()),
    }
}

/// `iat` (step 4): present, not in the future, not older than the environment accepts.
fn iat(environment: &Environment, jwt: &UnverifiedJwt, now: i64) -> Result<(), EnrollError> {
    let iat = jwt
        .time_claim("iat")
        .ok_or_else(|| EnrollError::IssuedAt("missing, or not a date in 1970..=9999".into()))?;
    if iat > now.saturating_add(LEEWAY_SECONDS) {
        return Err(EnrollError::IssuedAt(format!(
            "issued in the future ({iat}, now {now})"
        )));
    }
    let max_age = i64::try_from(environment.max_token_age_seconds).unwrap_or(i64::MAX);
    if now.saturating_sub(iat) > max_age.saturating_add(LEEWAY_SECONDS) {
        return Err(EnrollError::IssuedAt(format!(
            "token is {}s old; this environment accepts {}s",
            now - iat,
            environment.max_token_age_seconds
        )));
    }
    Ok(())
}

/// `token_lifetime` (step 4): `exp − iat` within the trust policy's ceiling.
fn token_lifetime(policy: &TrustPolicy, jwt: &UnverifiedJwt) -> Result<(), EnrollError> {
    let (Some(exp), Some(iat)) = (jwt.time_claim("exp"), jwt.time_claim("iat")) else {
        return Ok(()); // `exp` and `iat` refused their absence already
    };
    let lifetime = exp.saturating_sub(iat);
    if lifetime > i64::try_from(policy.max_token_lifetime_seconds).unwrap_or(i64::MAX) {
        return Err(EnrollError::Lifetime {
            lifetime,
            max: policy.max_token_lifetime_seconds,
        });
    }
    Ok(())
}

/// `jti` (step 5): present and of bounded length.
fn jti(jwt: &UnverifiedJwt) -> Result<&str, EnrollError> {
    match jwt.str_claim("jti") {
        Some(j) if !j.is_empty() && j.len() <= CLAIM_MAX => Ok(j),
        _ => Err(EnrollError::MissingJti),
    }
}

/// `jti_replay` (step 5): never used before (read only; claimed at issuance).
fn jti_replay(site: &SiteState, jwt: &UnverifiedJwt, jti: &str) -> Result<(), EnrollError> {
    let iss = jwt.str_claim("iss").unwrap_or_default();
    if site.jti_seen(iss, jti)? {
        return Err(EnrollError::Replay(jti.to_string()));
    }
    Ok(())
}

/// `bound_claim` (step 6): every bound claim of the policy holds (mapped fields by their mapped
/// value, other names by the token's claim).
fn bound_claim(
    policy: &TrustPolicy,
    job: &JobIdentity,
    jwt: &UnverifiedJwt,
) -> Result<(), EnrollError> {
    for (claim, pattern) in &policy.bound_claims {
        let actual = match job.field(claim) {
            Some(v) if !v.is_empty() => Some(v.to_string()),
            Some(_) => None,
            None => jwt.claims.get(claim).and_then(claim_as_string),
        };
        if !actual.as_deref().is_some_and(|a| glob_match(pattern, a)) {
            return Err(EnrollError::BoundClaim {
                claim: claim.clone(),
                pattern: pattern.clone(),
                actual: actual.map(|a| bounded(&a, CLAIM_MAX)),
            });
        }
    }
    Ok(())
}

/// `region` (step 8): the runner asked for this site's region.
fn region(config: &SiteConfig, input: &EnrollInput) -> Result<(), EnrollError> {
    if input.region == config.region {
        return Ok(());
    }
    Err(EnrollError::Region {
        requested: bounded(&input.region, 64),
        site: config.region.clone(),
    })
}

/// `fingerprint` (step 8): 64 lowercase hex characters.
fn fingerprint(input: &EnrollInput) -> Result<(), EnrollError> {
    if is_valid_fingerprint(&input.fingerprint) {
        return Ok(());
    }
    Err(EnrollError::Fingerprint)
}

/// `fingerprint`, then `runner_*` (step 8): the runner's fingerprint and how it was
/// established. Where the environment has `runners = "claimed"` it is the runner's word (only
/// its form is checked); where `registered`, the device key's proof over the enrollment
/// transcript (docs/design-notes.md, "Runner device keys") decides it
/// ([`SiteState::check_device_proof`]). Returns the fingerprint and the certificate's
/// `runner_proof` claim.
fn runner(
    site: &SiteState,
    config: &SiteConfig,
    environment: &Environment,
    (jwt, jti): (&UnverifiedJwt, &str),
    csr_spki: &[u8],
    input: &EnrollInput,
    rec: &mut AuditRecord,
) -> Result<(String, &'static str), EnrollError> {
    if environment.runners == RunnerMode::Claimed {
        fingerprint(input)?;
        return Ok((input.fingerprint.clone(), "claimed"));
    }
    if let Some(p) = input.device_proof.as_ref().filter(|p| !p.spki.is_empty()) {
        rec.runner_fingerprint = meshsign_evidence::device::fingerprint(&p.spki);
    }
    let transcript = meshsign_evidence::device::EnrollTranscript {
        audience: &environment.audience,
        jti,
        exp: jwt.time_claim("exp").unwrap_or_default(),
        csr_spki_der: csr_spki,
        region: &config.region,
        environment: &environment.name,
    }
    .bytes()
    .map_err(|e| DeviceError::Proof(format!("the enrollment transcript: {e}")))?;
    let (fingerprint, backend) = site.check_device_proof(
        environment,
        input.device_proof.as_ref(),
        &input.fingerprint,
        &transcript,
    )?;
    Ok((fingerprint, backend.as_str()))
}

/// `revoked` (step 8): no open-ended job or fingerprint revocation covers this runner.
fn revoked(site: &SiteState, job: &JobIdentity, fingerprint: &str) -> Result<(), EnrollError> {
    match site.enrollment_barred(&job.job_id, &job.pipeline, fingerprint) {
        Some(rule) => Err(EnrollError::Revoked(format!(
            "{} ({})",
            rule.id, rule.reason
        ))),
        None => Ok(()),
    }
}

/// Step 9: claim the jti (atomically; `jti_replay` if another request won), mint, record.
#[allow(clippy::too_many_arguments)]
fn issue(
    site: &SiteState,
    (config, environment, policy): (&SiteConfig, &Environment, &TrustPolicy),
    jwt: &UnverifiedJwt,
    jti: &str,
    spki: Vec<u8>,
    input: &EnrollInput,
    job: &JobIdentity,
    (fingerprint, runner_proof): (String, &'static str),
) -> Result<EnrollOutput, EnrollError> {
    let now = site.clock.unix();
    let iss = jwt.str_claim("iss").unwrap_or_default();
    let exp = jwt.time_claim("exp").unwrap_or(now);
    if !site.claim_jti(iss, jti, exp.saturating_add(LEEWAY_SECONDS))? {
        return Err(EnrollError::Replay(jti.to_string()));
    }
    let ttl = match input.requested_ttl_seconds {
        0 => environment.max_ttl_seconds,
        r => r.min(environment.max_ttl_seconds),
    };
    let claims = JobClaims {
        iss: iss.to_string(),
        sub: jwt.str_claim("sub").unwrap_or_default().to_string(),
        jti: jti.to_string(),
        job_id: job.job_id.clone(),
        repository: job.repository.clone(),
        git_ref: job.git_ref.clone(),
        trust_policy: policy.name.clone(),
        provider: job.provider.as_str().to_string(),
        pipeline: job.pipeline.clone(),
        run_attempt: job.run_attempt.clone(),
        workflow: job.workflow.clone(),
        commit: job.commit.clone(),
        runner_proof: runner_proof.to_string(),
    };
    let id = RunnerId {
        trust_domain: config.trust_domain.clone(),
        environment: environment.name.clone(),
        region: config.region.clone(),
        fingerprint,
    };
    Ok(site.issue((id, claims, spki), ttl, Session::New)?)
}

/// The CI job id before the provider is known: `job_id` (GitLab, Buildkite), else
/// `check_run_id`, else `run_id` (GitHub Actions), else empty.
fn job_id(jwt: &UnverifiedJwt) -> String {
    ["job_id", "check_run_id", "run_id"]
        .iter()
        .find_map(|c| jwt.claims.get(*c).and_then(claim_as_string))
        .map(|s| bounded(&s, CLAIM_MAX))
        .unwrap_or_default()
}

fn claim_as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
