//! The revocation drill: disable one trust policy, prove that new enrollments and sign calls
//! from its certificates (on an already-open connection) are refused, re-enable it, and report
//! how long refusal took.

use std::time::{Duration, Instant};

use meshsign_proto::v1;
use tonic::Code;

use crate::session::token::{self, TokenSource};
use crate::session::{EnrollParams, Session, local_fingerprint};
use crate::{ClientConfig, ClientError};

/// What the drill measured.
#[derive(Debug, Clone)]
pub struct DrillReport {
    /// The policy's issuer.
    pub issuer: String,
    /// Policy name.
    pub policy: String,
    /// From the disable call until a sign call on the open connection was refused.
    pub sign_refused_after: Duration,
    /// From the disable call until a new enrollment was refused.
    pub enroll_refused_after: Duration,
    /// Enrollment works again after re-enabling.
    pub restored: bool,
}

impl DrillReport {
    /// The slower of the two refusals.
    pub fn worst(&self) -> Duration {
        self.sign_refused_after.max(self.enroll_refused_after)
    }

    /// Whether both refusals came within `bound` and the policy was restored.
    pub fn passed(&self, bound: Duration) -> bool {
        self.worst() <= bound && self.restored
    }
}

/// The verdict of a drill at several sites: the sites (`bad`) that failed, were slower than
/// `max_ms` or did not recover fail it.
pub fn verdict(bad: &[String], max_ms: u64) -> Result<(), ClientError> {
    if bad.is_empty() {
        return Ok(());
    }
    Err(ClientError::Verify(format!(
        "drill failed at {} (bound {max_ms} ms; a failed site's policy is re-enabled)",
        bad.join(", ")
    )))
}

/// Runs the drill in `environment` against the policy of `issuer` (or a random enabled one whose
/// issuer the token source can mint for). The policy is re-enabled even if a step fails.
pub async fn exercise(
    cfg: &ClientConfig,
    environment: &str,
    issuer: Option<&str>,
    source: &TokenSource,
) -> Result<DrillReport, ClientError> {
    Prepared::new(cfg, environment, issuer, source)
        .await?
        .run()
        .await
}

/// A drill ready to start: a runner session with an open sign-port connection that has signed
/// once, a second unused token, the policy chosen. [`Prepared::run`] disables the policy; a
/// fleet drill prepares every site first, then runs them all at once.
pub struct Prepared {
    cfg: ClientConfig,
    environment: String,
    admin: crate::site::admin::Admin,
    policy: v1::TrustPolicyInfo,
    session: Session,
    key_alias: String,
    second: String,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("environment", &self.environment)
            .field("policy", &self.policy.name)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Picks the policy, opens the session and mints the second token.
    pub async fn new(
        cfg: &ClientConfig,
        environment: &str,
        issuer: Option<&str>,
        source: &TokenSource,
    ) -> Result<Self, ClientError> {
        let mut admin = crate::site::admin::Admin::connect(cfg).await?;
        let policies = admin.trust_policies(environment).await?;
        // The dev issuer can mint only for its own policy; a CI source for any.
        let mintable = |p: &&v1::TrustPolicyInfo| -> bool {
            #[cfg(feature = "dev")]
            if let (TokenSource::Dev(_), Some(d)) = (source, &cfg.dev_issuer) {
                return p.issuer == d.issuer;
            }
            let _ = p;
            true
        };
        let candidates: Vec<&v1::TrustPolicyInfo> = policies
            .iter()
            .filter(|p| p.enabled && issuer.is_none_or(|i| p.issuer == i))
            .filter(mintable)
            .collect();
        if candidates.is_empty() {
            return Err(ClientError::Config(format!(
                "no enabled trust policy in `{environment}` that the token source can mint for"
            )));
        }
        let pick = usize::from(
            meshsign_evidence::files::random_id()
                .map_err(|e| ClientError::Crypto(e.to_string()))?
                .as_bytes()
                .first()
                .copied()
                .unwrap_or(0),
        ) % candidates.len();
        let policy = candidates[pick].clone();

        let aud = cfg.audience(environment)?;
        let key_alias = first_key(&mut admin, environment).await?;
        let mut session = Session::start(
            cfg,
            &params(
                environment,
                token::obtain(source, cfg, aud).await?.to_string(),
            ),
        )
        .await?;
        session.sign_digest(&key_alias, [0u8; 32], "drill").await?;
        let second = token::obtain(source, cfg, aud).await?.to_string();
        Ok(Self {
            cfg: cfg.clone(),
            environment: environment.to_string(),
            admin,
            policy,
            session,
            key_alias,
            second,
        })
    }

    /// Disables the policy, measures both refusals, re-enables it (even when a step failed),
    /// and checks that the refused token still enrolls.
    pub async fn run(mut self) -> Result<DrillReport, ClientError> {
        let (cfg, environment) = (&self.cfg, self.environment.as_str());
        let set = |enabled: bool| v1::SetTrustPolicyEnabledRequest {
            environment: environment.into(),
            issuer: self.policy.issuer.clone(),
            enabled,
            keep_sessions: false,
        };
        let t0 = Instant::now();
        self.admin.set_trust_policy_enabled(set(false)).await?;
        let (session, key_alias, second) = (&mut self.session, &self.key_alias, &self.second);
        let outcome = async {
            let sign_refused_after = loop {
                match session.sign_digest(key_alias, [1u8; 32], "drill").await {
                    Err(ClientError::Rpc {
                        code: Code::PermissionDenied,
                        ..
                    }) => break t0.elapsed(),
                    Err(e) => return Err(e),
                    Ok(_) if t0.elapsed() > Duration::from_secs(5) => {
                        return Err(ClientError::Verify(
                            "sign calls were still served 5 s after disabling".into(),
                        ));
                    }
                    Ok(_) => continue,
                }
            };
            let key = crate::session::RunnerKey::generate()?;
            let enroll_refused_after =
                match crate::session::enroll(cfg, &key, &params(environment, second.clone())).await
                {
                    Err(ClientError::Rpc {
                        code: Code::PermissionDenied,
                        ..
                    }) => t0.elapsed(),
                    Err(e) => return Err(e),
                    Ok(_) => {
                        return Err(ClientError::Verify(
                            "a new enrollment was admitted while the policy was disabled".into(),
                        ));
                    }
                };
            Ok((sign_refused_after, enroll_refused_after))
        }
        .await;
        // Always restore.
        self.admin.set_trust_policy_enabled(set(true)).await?;
        let (sign_refused_after, enroll_refused_after) = outcome?;
        // The refused token was not consumed: enrollment with it works again.
        let restored = crate::session::enroll(
            cfg,
            &crate::session::RunnerKey::generate()?,
            &params(environment, self.second.clone()),
        )
        .await
        .is_ok();
        Ok(DrillReport {
            issuer: self.policy.issuer.clone(),
            policy: self.policy.name.clone(),
            sign_refused_after,
            enroll_refused_after,
            restored,
        })
    }
}

fn params(environment: &str, token: String) -> EnrollParams {
    EnrollParams {
        device: None,
        environment: environment.into(),
        token,
        fingerprint: local_fingerprint(),
        requested_ttl_seconds: 600,
        region: None,
    }
}

async fn first_key(
    admin: &mut crate::site::admin::Admin,
    environment: &str,
) -> Result<String, ClientError> {
    let keys = admin.keys(environment).await?;
    keys.into_iter()
        .find(|k| {
            !k.disabled
                && k.repositories.iter().any(|r| r == "*")
                && k.refs.iter().any(|r| r == "*")
        })
        .map(|k| k.alias)
        .ok_or_else(|| {
            ClientError::Config(format!(
                "the drill needs a key in `{environment}` that admits any repository and ref"
            ))
        })
}
