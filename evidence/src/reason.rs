//! The reason vocabulary: every reason a site gives for a decision, defined once. The site's
//! refusals return a [`Reason`]; the gRPC message starts with its word (`"{reason}: {detail}"`),
//! the audit record's `reason` is the same word, the `google.rpc.ErrorInfo` reason is its
//! UPPER_SNAKE_CASE form, and the CLI branches on [`Reason::from_error_info`]. README's table of
//! reasons is checked against [`Reason::ALL`] by a test.

macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $variant:ident = $word:literal,)+) => {
        /// Why a site decided as it did.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Reason {
            /// Every reason, in the order of the vocabulary.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// The word in messages and audit records (`snake_case`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $word,)+
                }
            }

            /// What it means, in one line (the docs' table).
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Reason::$variant => concat!($($doc),+),)+
                }
                .trim()
            }
        }
    };
}

reasons! {
    /// The decision was allowed.
    Ok = "ok",
    /// A fault of the site; its log has the cause under an error id.
    Internal = "internal",
    /// The decision cannot be recorded in the audit log (a full or broken disk): refused.
    AuditUnavailable = "audit_unavailable",
    /// A key kept in the HSM cannot sign now (token gone, or not the recorded key).
    KeyUnavailable = "key_unavailable",
    /// The environment is unknown, or is not the one the certificate or token names.
    Environment = "environment",
    /// The token is not a well-formed JWT.
    TokenMalformed = "token_malformed",
    /// The token's signing algorithm is not accepted.
    Alg = "alg",
    /// The token's `kid` is not in the pinned JWKS.
    Kid = "kid",
    /// The token's signature does not verify.
    Signature = "signature",
    /// The token's issuer is not trusted in this environment.
    Iss = "iss",
    /// The token's trust policy is disabled.
    TrustPolicyDisabled = "trust_policy_disabled",
    /// The token's audience is not this environment's.
    Aud = "aud",
    /// The token lives longer than the policy allows.
    TokenLifetime = "token_lifetime",
    /// The token has expired.
    Exp = "exp",
    /// The token is not valid yet.
    Nbf = "nbf",
    /// The token's issue time is implausible.
    Iat = "iat",
    /// The token has no `jti`.
    Jti = "jti",
    /// The token was already used (one enrollment per token).
    JtiReplay = "jti_replay",
    /// A claim the trust policy binds has another value.
    BoundClaim = "bound_claim",
    /// The certificate request is malformed or its signature does not verify.
    Csr = "csr",
    /// The certificate request's key is not P-256.
    CsrKey = "csr_key",
    /// The region is not this site's, or not allowed.
    Region = "region",
    /// The runner fingerprint is malformed.
    Fingerprint = "fingerprint",
    /// The job, pipeline, runner or certificate is revoked.
    Revoked = "revoked",
    /// The environment requires a registered device key and this one is not registered here.
    RunnerUnregistered = "runner_unregistered",
    /// The runner's device key was retired from this site's registry.
    RunnerRetired = "runner_retired",
    /// The device key's backend is not one the environment accepts.
    RunnerBackend = "runner_backend",
    /// The proof of possession is missing or does not verify with the registered device key.
    RunnerProof = "runner_proof",
    /// Too many requests from this caller: retry later.
    RateLimited = "rate_limited",
    /// The site is serving its maximum of requests on this port: retry shortly.
    Overloaded = "overloaded",
    /// The listener holds its maximum of connections.
    ConnectionLimit = "connection_limit",
    /// This source holds its maximum of connections.
    ConnectionLimitSource = "connection_limit_source",
    /// The TLS handshake failed (no or a foreign client certificate, a protocol error).
    Handshake = "handshake",
    /// The TLS handshake did not complete in time.
    HandshakeTimeout = "handshake_timeout",
    /// The key is unknown in this environment.
    Key = "key",
    /// The audit entry asked for is not there.
    AuditEntry = "audit_entry",
    /// The signing algorithm does not match the key's.
    Algorithm = "algorithm",
    /// The signature budget of the job or certificate is spent.
    Budget = "budget",
    /// The client certificate is missing or not a runner certificate of this site.
    Certificate = "certificate",
    /// The client certificate has expired.
    CertificateExpired = "certificate_expired",
    /// The client certificate is revoked.
    CertificateRevoked = "certificate_revoked",
    /// The digest is not on the key's allow-list.
    DigestAllowList = "digest_allow_list",
    /// The certificate's runner CA is no longer trusted.
    IssuerUntrusted = "issuer_untrusted",
    /// The job's repository or ref may not use this key.
    KeyAccess = "key_access",
    /// The key is disabled.
    KeyDisabled = "key_disabled",
    /// The key is not in the certificate's environment.
    KeyNotInPartition = "key_not_in_partition",
    /// The key's purposes do not include this use.
    Purpose = "purpose",
    /// The session reached its lifetime ceiling: enroll again.
    SessionCeiling = "session_ceiling",
    /// A renewal from a superseded certificate: the session may be stolen, and is ended.
    SessionTheftSuspected = "session_theft_suspected",
    /// The caller's certificate is not an ops identity of this site.
    Operator = "operator",
    /// The operator's role may not do this.
    Role = "role",
    /// The thing named does not exist.
    NotFound = "not_found",
    /// The request is invalid.
    Invalid = "invalid",
    /// The state does not allow it now (e.g. a version already taken).
    Precondition = "precondition",
    /// The change needs a second admin's approval: proposed.
    ReviewRequired = "review_required",
    /// A proposer may not approve their own proposal.
    ReviewSelfApproval = "review_self_approval",
    /// The proposal expired.
    ReviewExpired = "review_expired",
    /// The Apple CMS signed attributes are malformed.
    AppleCms = "apple_cms",
    /// The CMS content type is not Apple code signing's.
    ContentType = "content_type",
    /// The CMS signing time is missing or implausible.
    SigningTime = "signing_time",
    /// A batch is empty, too large or mixes inputs.
    Batch = "batch",
    /// The digest is not 32 bytes of SHA-256.
    Digest = "digest",
    /// The request carries no input, or one of the wrong kind.
    Input = "input",
    /// The message is too long or not allowed for the key.
    Message = "message",
    /// The statement's predicate type is not one the site builds.
    PredicateType = "predicate_type",
    /// The statement's subjects are missing, too many or malformed.
    Subjects = "subjects",
    /// An App Store Connect token asked for a scope the key's policy does not allow.
    AscScope = "asc_scope",
    /// An App Store Connect token asked to live longer than Apple's 20 minutes.
    AscTtl = "asc_ttl",
    /// A signed checkpoint (housekeeping).
    Checkpoint = "checkpoint",
    /// The wall clock stepped more than the token leeway (housekeeping).
    ClockStep = "clock_step",
    /// Entries were lost and the loss is recorded (restore).
    LossRecorded = "loss_recorded",
}

impl Reason {
    /// The reason whose word is `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// The `google.rpc.ErrorInfo` reason: the word in UPPER_SNAKE_CASE.
    pub fn error_info(self) -> String {
        self.as_str().to_ascii_uppercase()
    }

    /// The reason of an `ErrorInfo` reason (`REVIEW_REQUIRED` → [`Reason::ReviewRequired`]).
    pub fn from_error_info(s: &str) -> Option<Self> {
        Self::parse(&s.to_ascii_lowercase())
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_distinct_and_round_trips() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{} twice", r.as_str());
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert_eq!(Reason::from_error_info(&r.error_info()), Some(*r));
            assert!(!r.meaning().is_empty());
        }
    }
}
