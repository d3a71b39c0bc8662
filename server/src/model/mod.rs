//! The site's vocabulary: plain types every layer may use, and the refusal contract.
//!
//! Owns: key algorithms and purposes, access rules and glob patterns, the name rule, the
//! record of an issued runner certificate ([`CertRecord`]), revocation rules, and [`Refusal`]
//! (the one shape every layer's error takes: a reason string, a kind, a detail).
//! Must not touch: the store, the clock, the network, configuration files. Nothing here imports
//! another module of this crate.

pub mod admin;
pub mod runner;

use meshsign_evidence::identity::{JobClaims, is_valid_fingerprint};
use serde::{Deserialize, Serialize};

// === the refusal contract ===

/// What kind of refusal an error is; `api::status` alone turns it into a gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request is malformed.
    InvalidArgument,
    /// The credential (token, certificate) is not acceptable.
    Unauthenticated,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// The state of the site does not allow it (wrong region, staged issuer…).
    FailedPrecondition,
    /// A named thing does not exist.
    NotFound,
    /// The site cannot serve it now (the audit log cannot be written).
    Unavailable,
    /// A rate limit, quota or budget is spent (retry later, or never for a budget).
    ResourceExhausted,
    /// A fault of the site: logged in full, reported to the client only by an error id.
    Internal,
}

pub use meshsign_evidence::reason::Reason;

/// An error that refuses a request. Each variant has exactly one reason string: the status
/// message is `"{reason}: {detail}"` (detail = the error's `Display`), the audit record's
/// `reason` is the same string and its `detail` the same text, and the log line carries both.
pub trait Refusal: std::error::Error + Send + Sync + 'static {
    /// The audit reason: the name of the check that failed.
    fn reason(&self) -> Reason;
    /// How the refusal maps to a status.
    fn kind(&self) -> RefusalKind;
}

/// The audit reason of internal faults (the detail is in the log, under an error id).
pub const INTERNAL: &str = Reason::Internal.as_str();
/// The audit reason when the audit log cannot be written (then nothing is returned).
pub const AUDIT_UNAVAILABLE: &str = Reason::AuditUnavailable.as_str();

/// Levenshtein distance of two short names (for "did you mean"); inputs are bounded first.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) =
        (a.chars().take(64).collect(), b.chars().take(64).collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Unix seconds as RFC 3339 (what people read in a refusal, not epoch numbers).
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix {unix}"))
}

/// A span of seconds as people read it: `42 s`, `5 min 3 s`, `2 h 10 min`, `3 d 4 h`.
pub fn span(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Cuts a string from the network, a file or a user to at most `max` bytes, before it
/// reaches an audit record, a log line or a message. A longer value is kept as a prefix and the
/// hash of the whole ([`meshsign_evidence::audit::excerpt`]): recognisable, matchable against the
/// original, never whole.
pub fn bounded(s: &str, max: usize) -> String {
    meshsign_evidence::audit::excerpt(s, max.max(64))
}

/// A string from the network made safe for a text log line: control characters (newlines
/// included) are escaped, so no input can start a line of its own or forge one.
pub fn log_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.chars().flat_map(char::escape_default).collect())
}

// === names ===

/// What [`is_name`] accepts, for messages.
pub const NAME_RULE: &str = "lowercase letters, digits, '-' or '_' (1 to 63)";

/// Lowercase letters, digits, `-`, `_`; 1 to 63 characters (environment, alias, policy names).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An App Store Connect API key's identity, as Apple's token names it (issue 29): the key id
/// (the JWT header's `kid`), the issuer id (`iss`) of a team key or none for an individual key
/// (`sub: "user"`), and the scopes its tokens may carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AscIdentity {
    /// Apple's key id (`AuthKey_<KID>.p8`): 1 to 32 uppercase letters and digits.
    pub key_id: String,
    /// The team's issuer id (a UUID); `None` for an individual key.
    pub issuer_id: Option<String>,
    /// The scopes (`"GET /notary/v2/submissions"`) a token may carry; a runner may ask for a
    /// subset. Empty: unrestricted — the token carries what the runner asks, or no scope
    /// claim (the key's whole role).
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The most scopes a key or a token may name, and the longest scope.
pub const ASC_MAX_SCOPES: usize = 32;
const ASC_MAX_SCOPE_LEN: usize = 256;

impl AscIdentity {
    /// Checks and builds an identity: exactly one of an issuer id and `individual`.
    pub fn new(
        key_id: &str,
        issuer_id: Option<&str>,
        individual: bool,
        scopes: Vec<String>,
    ) -> Result<Self, String> {
        if key_id.is_empty()
            || key_id.len() > 32
            || !key_id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "asc key id `{}`: 1 to 32 uppercase letters and digits (the KID in AuthKey_KID.p8)",
                bounded(key_id, 40)
            ));
        }
        let issuer_id = match (issuer_id.filter(|s| !s.is_empty()), individual) {
            (Some(_), true) | (None, false) => {
                return Err(
                    "give the team key's issuer id (asc_issuer_id) or mark it individual                      (asc_individual), not both"
                        .into(),
                );
            }
            (Some(i), false) => {
                if !is_uuid(i) {
                    return Err(format!("asc issuer id `{}` is not a UUID", bounded(i, 40)));
                }
                Some(i.to_ascii_lowercase())
            }
            (None, true) => None,
        };
        check_asc_scopes(&scopes)?;
        Ok(Self {
            key_id: key_id.to_string(),
            issuer_id,
            scopes,
        })
    }
}

/// Scopes are `METHOD /path` (printable, no control characters), at most [`ASC_MAX_SCOPES`].
pub fn check_asc_scopes(scopes: &[String]) -> Result<(), String> {
    if scopes.len() > ASC_MAX_SCOPES {
        return Err(format!("at most {ASC_MAX_SCOPES} scopes"));
    }
    for s in scopes {
        let ok = s.len() <= ASC_MAX_SCOPE_LEN
            && !s.chars().any(char::is_control)
            && s.split_once(' ').is_some_and(|(m, p)| {
                !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) && p.starts_with('/')
            });
        if !ok {
            return Err(format!(
                "scope `{}` is not `METHOD /path` (e.g. `GET /notary/v2/submissions`)",
                bounded(s, 80)
            ));
        }
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// What a key signs: `digest` and `message` by default; `apple-cms` must be given explicitly.
pub fn default_purposes() -> Vec<Purpose> {
    vec![Purpose::Digest, Purpose::Message]
}

/// What a key may be asked to sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// A SHA-256 digest the caller computed.
    Digest,
    /// A short message the site hashes.
    Message,
    /// The signed attributes of an Apple code signature (CMS over a CodeDirectory), which the
    /// site parses and checks before signing.
    AppleCms,
    /// In-toto statements the site builds itself (`Signer.Attest`). Exclusive: a key that also
    /// signed digests or messages would sign the PAE of a statement a runner made up.
    Attestation,
    /// App Store Connect API tokens the site builds itself (`Signer.AscToken`, issue 29): an
    /// Apple `.p8` key. Exclusive: a key that signed digests or messages would sign any JWT a
    /// runner wrote.
    AscApi,
}

impl Purpose {
    /// Every purpose.
    pub const ALL: [Purpose; 5] = [
        Purpose::Digest,
        Purpose::Message,
        Purpose::AppleCms,
        Purpose::Attestation,
        Purpose::AscApi,
    ];

    /// Parses a config/RPC name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Parses a list of names; an empty list is the default (digest, message).
    pub fn parse_list(names: &[String]) -> Result<Vec<Self>, String> {
        if names.is_empty() {
            return Ok(default_purposes());
        }
        names
            .iter()
            .map(|n| {
                Self::parse(n).ok_or_else(|| {
                    format!(
                        "purpose `{}` (digest, message, apple-cms, attestation, asc-api)",
                        bounded(n, 64)
                    )
                })
            })
            .collect()
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Digest => "digest",
            Purpose::Message => "message",
            Purpose::AppleCms => "apple-cms",
            Purpose::Attestation => "attestation",
            Purpose::AscApi => "asc-api",
        }
    }
}

/// Signature algorithms a key can have. The key's algorithm decides how it signs.
///
/// RSA is signed in the site with aws-lc-rs (constant-time), never with the RustCrypto `rsa`
/// crate (RUSTSEC-2023-0071, a timing side channel observable over the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 over SHA-256, DER signature.
    #[serde(rename = "ecdsa-p256-sha256")]
    EcdsaP256Sha256,
    /// RSA-2048, PKCS#1 v1.5, SHA-256 (Apple code-signing identities).
    #[serde(rename = "rsa-2048-pkcs1-sha256")]
    Rsa2048Pkcs1Sha256,
    /// RSA-3072, PKCS#1 v1.5, SHA-256.
    #[serde(rename = "rsa-3072-pkcs1-sha256")]
    Rsa3072Pkcs1Sha256,
    /// RSA-4096, PKCS#1 v1.5, SHA-256.
    #[serde(rename = "rsa-4096-pkcs1-sha256")]
    Rsa4096Pkcs1Sha256,
    /// RSA-2048, PSS, SHA-256, MGF1-SHA-256, salt 32 bytes.
    #[serde(rename = "rsa-2048-pss-sha256")]
    Rsa2048PssSha256,
    /// RSA-3072, PSS, SHA-256.
    #[serde(rename = "rsa-3072-pss-sha256")]
    Rsa3072PssSha256,
    /// RSA-4096, PSS, SHA-256.
    #[serde(rename = "rsa-4096-pss-sha256")]
    Rsa4096PssSha256,
    /// ECDSA P-384 over SHA-384 of the message, DER signature. Purpose `message` only: a
    /// SHA-256 digest cannot be signed as SHA-384.
    #[serde(rename = "ecdsa-p384-sha384")]
    EcdsaP384Sha384,
    /// Ed25519, pure EdDSA over the message itself (RFC 8032). Purpose `message` only: pure
    /// Ed25519 signs messages, never digests (Ed25519ph is not offered).
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyAlgorithm {
    /// Every algorithm, for messages and parsing.
    pub const ALL: [KeyAlgorithm; 9] = [
        KeyAlgorithm::EcdsaP256Sha256,
        KeyAlgorithm::Rsa2048Pkcs1Sha256,
        KeyAlgorithm::Rsa3072Pkcs1Sha256,
        KeyAlgorithm::Rsa4096Pkcs1Sha256,
        KeyAlgorithm::Rsa2048PssSha256,
        KeyAlgorithm::Rsa3072PssSha256,
        KeyAlgorithm::Rsa4096PssSha256,
        KeyAlgorithm::EcdsaP384Sha384,
        KeyAlgorithm::Ed25519,
    ];

    /// The name used in config, RPCs and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            KeyAlgorithm::Rsa2048Pkcs1Sha256 => "rsa-2048-pkcs1-sha256",
            KeyAlgorithm::Rsa3072Pkcs1Sha256 => "rsa-3072-pkcs1-sha256",
            KeyAlgorithm::Rsa4096Pkcs1Sha256 => "rsa-4096-pkcs1-sha256",
            KeyAlgorithm::Rsa2048PssSha256 => "rsa-2048-pss-sha256",
            KeyAlgorithm::Rsa3072PssSha256 => "rsa-3072-pss-sha256",
            KeyAlgorithm::Rsa4096PssSha256 => "rsa-4096-pss-sha256",
            KeyAlgorithm::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }

    /// Whether the key signs messages only (the site cannot sign a SHA-256 digest with it).
    pub fn messages_only(self) -> bool {
        matches!(self, KeyAlgorithm::EcdsaP384Sha384 | KeyAlgorithm::Ed25519)
    }

    /// Parses the config/RPC name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// RSA modulus size, for RSA algorithms.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyAlgorithm::EcdsaP256Sha256
            | KeyAlgorithm::EcdsaP384Sha384
            | KeyAlgorithm::Ed25519 => None,
            KeyAlgorithm::Rsa2048Pkcs1Sha256 | KeyAlgorithm::Rsa2048PssSha256 => Some(2048),
            KeyAlgorithm::Rsa3072Pkcs1Sha256 | KeyAlgorithm::Rsa3072PssSha256 => Some(3072),
            KeyAlgorithm::Rsa4096Pkcs1Sha256 | KeyAlgorithm::Rsa4096PssSha256 => Some(4096),
        }
    }

    /// PSS padding (else PKCS#1 v1.5) for RSA algorithms.
    pub fn is_pss(self) -> bool {
        matches!(
            self,
            KeyAlgorithm::Rsa2048PssSha256
                | KeyAlgorithm::Rsa3072PssSha256
                | KeyAlgorithm::Rsa4096PssSha256
        )
    }
}

/// A caller may use a key if its repository matches one pattern and its ref matches one pattern.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AccessRule {
    /// Repository patterns (`*` matches any run of characters).
    pub repositories: Vec<String>,
    /// Ref patterns.
    pub refs: Vec<String>,
}

impl AccessRule {
    /// A rule from patterns; both lists must be non-empty and hold no empty pattern (the same
    /// rule for the config file and for keys created by ops). The error names the list.
    pub fn new(
        repositories: Vec<String>,
        refs: Vec<String>,
    ) -> Result<Self, (&'static str, String)> {
        if repositories.is_empty() || repositories.iter().any(String::is_empty) {
            return Err((
                "repositories",
                "list the repositories (\"*\" for any)".into(),
            ));
        }
        if refs.is_empty() || refs.iter().any(String::is_empty) {
            return Err(("refs", "list the refs (\"*\" for any)".into()));
        }
        Ok(Self { repositories, refs })
    }

    /// Whether a caller with these claims may use the key.
    pub fn admits(&self, repository: &str, git_ref: &str) -> bool {
        self.repositories.iter().any(|p| glob_match(p, repository))
            && self.refs.iter().any(|p| glob_match(p, git_ref))
    }
}

/// Segment-aware glob match for access rules and bound claims: `*` matches any run of
/// characters within one path segment (no `/`), `**` any run across segments; all else is
/// literal. A pattern that is only `*` (or `**`) matches everything, as it always has, so
/// `repositories = ["*"]` still means any repository. So `acme/app*` no longer admits
/// `acme/app-evil/x`, and `refs/tags/v*` no longer admits `refs/tags/v1/../../heads/evil`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern == "*" || pattern == "**" {
        return true;
    }
    #[derive(Clone, Copy)]
    enum Tok {
        Byte(u8),
        Star,
        DoubleStar,
    }
    let p = pattern.as_bytes();
    let mut toks = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'*' {
            if p.get(i + 1) == Some(&b'*') {
                toks.push(Tok::DoubleStar);
                i += 2;
            } else {
                toks.push(Tok::Star);
                i += 1;
            }
        } else {
            toks.push(Tok::Byte(p[i]));
            i += 1;
        }
    }
    let t = text.as_bytes();
    // reach[j]: the tokens so far can match t[..j]. One pass per token: O(tokens × text).
    let mut reach = vec![false; t.len() + 1];
    reach[0] = true;
    for tok in toks {
        let mut next = vec![false; t.len() + 1];
        match tok {
            Tok::Byte(b) => {
                for j in 0..t.len() {
                    if reach[j] && t[j] == b {
                        next[j + 1] = true;
                    }
                }
            }
            Tok::Star | Tok::DoubleStar => {
                let crosses = matches!(tok, Tok::DoubleStar);
                let mut on = false;
                for j in 0..=t.len() {
                    on |= reach[j];
                    next[j] = on;
                    if j < t.len() && t[j] == b'/' && !crosses {
                        on = false;
                    }
                }
            }
        }
        reach = next;
    }
    reach[t.len()]
}

// === CI providers ===

/// Whose claims a trust policy's tokens carry, and so how repository, ref, job and pipeline
/// are read from them (see `identity::claims`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// GitHub Actions: `repository`, `ref`, `check_run_id` (the job), `run_id` (the pipeline),
    /// `run_attempt`, `environment`, `actor`.
    #[default]
    Github,
    /// GitLab `id_tokens`: `project_path`, `ref_path`, `job_id`, `pipeline_id`, `environment`,
    /// `user_login`.
    Gitlab,
    /// Buildkite: `organization_slug`/`pipeline_slug`, `build_branch` or `build_tag`, `job_id`,
    /// `build_id` (else `build_number`).
    Buildkite,
    /// Any issuer: the policy's `claim_mappings` name the claims.
    Generic,
}

impl Provider {
    /// The claims that bind a token to an owner (an organisation, a project, a pipeline) by a
    /// value nobody else can take: ids where the provider has them. A trust policy must bind one
    /// of them exactly, or any repository on the issuer that asks for the audience enrolls.
    /// Empty for `generic`: any exact bound claim counts.
    pub fn owner_claims(self) -> &'static [&'static str] {
        match self {
            Provider::Github => &["repository_owner_id", "repository_id", "enterprise_id"],
            Provider::Gitlab => &["namespace_id", "project_id"],
            Provider::Buildkite => &["organization_slug", "pipeline_slug"],
            Provider::Generic => &[],
        }
    }

    /// Claims that name an owner by a name that can be renamed or re-registered, with the id
    /// claim to bind instead.
    pub fn renamable_claims(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Provider::Github => &[
                ("repository_owner", "repository_owner_id"),
                ("repository", "repository_id"),
            ],
            Provider::Gitlab => &[
                ("namespace_path", "namespace_id"),
                ("project_path", "project_id"),
            ],
            Provider::Buildkite | Provider::Generic => &[],
        }
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Buildkite => "buildkite",
            Provider::Generic => "generic",
        }
    }
}

/// The mapped fields of a job, by name (`claim_mappings` keys, bound claims on mapped values).
pub const JOB_FIELDS: [&str; 7] = [
    "repository",
    "ref",
    "job_id",
    "pipeline",
    "run_attempt",
    "environment",
    "actor",
];

// === issued certificates ===

/// Record of an issued runner certificate (serial → claims, expiry), written at enrollment and
/// read by every sign-port RPC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertRecord {
    /// Serial, hex.
    pub serial: String,
    /// Environment.
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
    /// Set when revoked by its holder: the reason.
    #[serde(default)]
    pub revoked: Option<String>,
    /// The job's session: the serial of its first certificate (renewals keep it).
    #[serde(default)]
    pub session: String,
    /// When the session began (unix seconds); renewals end by `max_session_seconds` after it.
    #[serde(default)]
    pub session_start: i64,
    /// 0 for the enrolled certificate, +1 per renewal.
    #[serde(default)]
    pub generation: u32,
    /// A renewal replaced this certificate: presenting it again means a copy exists.
    #[serde(default)]
    pub superseded: bool,
}

impl CertRecord {
    /// The session this certificate belongs to: the serial of the session's first certificate
    /// (records written before sessions had one name their own serial).
    pub fn session_id(&self) -> &str {
        if self.session.is_empty() {
            &self.serial
        } else {
            &self.session
        }
    }
}

// === reloads ===

/// What a SIGHUP reload did (`admin status`, `meshsign_config_reload_refused`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Unix seconds.
    pub at: i64,
    /// Applied (else refused; the previous configuration runs).
    pub applied: bool,
    /// SHA-256 (hex) of the file read.
    pub config_sha256: String,
    /// Why it was refused, or the approval it was applied under.
    pub message: String,
    /// The trust-relevant changes (JSON array).
    pub changes_json: String,
    /// Whether a change widens trust.
    pub widens: bool,
}

// === revocation rules ===

/// What a revocation rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// One certificate.
    Serial,
    /// Every certificate minted for a CI job.
    JobId,
    /// Every certificate minted for any job of a pipeline (GitHub run, GitLab pipeline,
    /// Buildkite build).
    PipelineId,
    /// Every certificate of a runner machine.
    Fingerprint,
    /// Every certificate of a job's session (enrolled and renewed).
    Session,
}

impl RevocationKind {
    /// The wire name (`serial`, `job_id`, `pipeline_id`, `fingerprint`, `session`).
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Serial => "serial",
            RevocationKind::JobId => "job_id",
            RevocationKind::PipelineId => "pipeline_id",
            RevocationKind::Fingerprint => "fingerprint",
            RevocationKind::Session => "session",
        }
    }

    /// Whether `value` is well formed for this kind.
    pub fn accepts(self, value: &str) -> bool {
        match self {
            RevocationKind::Serial => {
                !value.is_empty()
                    && value.len() <= 64
                    && value.bytes().all(|b| b.is_ascii_hexdigit())
            }
            RevocationKind::JobId | RevocationKind::PipelineId => {
                !value.is_empty() && value.len() <= 256
            }
            RevocationKind::Fingerprint => is_valid_fingerprint(value),
            RevocationKind::Session => {
                !value.is_empty()
                    && value.len() <= 64
                    && value.bytes().all(|b| b.is_ascii_hexdigit())
            }
        }
    }
}

/// A persistent revocation rule, checked on every sign-port RPC (and at enrollment for job and
/// fingerprint rules without an end).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRule {
    /// Random id.
    pub id: String,
    /// Kind.
    pub kind: RevocationKind,
    /// Serial (lowercase hex), job id, pipeline id or fingerprint.
    pub value: String,
    /// Only certificates of this region (None: any).
    pub region: Option<String>,
    /// Only certificates issued at or after (unix seconds).
    pub since: Option<i64>,
    /// Only certificates issued at or before (unix seconds).
    pub until: Option<i64>,
    /// Why.
    pub reason: String,
    /// Who.
    pub operator: String,
    /// When (unix seconds).
    pub created_at: i64,
    /// For a serial rule: the session of that certificate (its first certificate's serial),
    /// so every certificate of the session — renewals before and after — is revoked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session: String,
}

impl RevocationRule {
    /// Whether the rule covers an issued certificate.
    pub fn matches(&self, c: &CertRecord) -> bool {
        let issued = c.not_before + 60;
        let hit = match self.kind {
            // A serial names its session: a renewal does not escape the revocation.
            RevocationKind::Serial => {
                c.serial == self.value
                    || (!self.session.is_empty() && c.session_id() == self.session)
            }
            RevocationKind::JobId => c.claims.job_id == self.value,
            RevocationKind::PipelineId => c.claims.pipeline == self.value,
            RevocationKind::Fingerprint => c.fingerprint == self.value,
            RevocationKind::Session => c.session_id() == self.value,
        };
        hit && self.region.as_ref().is_none_or(|r| *r == c.region)
            && self.since.is_none_or(|s| issued >= s)
            && self.until.is_none_or(|u| issued <= u)
    }

    /// Whether the rule also bars new enrollments of this job, pipeline or runner in `region`
    /// (open-ended job, pipeline and fingerprint rules do).
    pub fn bars_enrollment(
        &self,
        region: &str,
        job_id: &str,
        pipeline_id: &str,
        fingerprint: &str,
    ) -> bool {
        self.until.is_none()
            && self.region.as_ref().is_none_or(|g| g == region)
            && match self.kind {
                RevocationKind::JobId => self.value == job_id,
                RevocationKind::PipelineId => self.value == pipeline_id,
                RevocationKind::Fingerprint => self.value == fingerprint,
                RevocationKind::Serial | RevocationKind::Session => false,
            }
    }
}

/// The purposes a key of `algorithm` may have: a message-only algorithm (P-384, Ed25519) has
/// exactly `message` — the default purposes become that; an explicit `digest` or `apple-cms` is
/// refused with why.
pub fn purposes_for(
    algorithm: KeyAlgorithm,
    purposes: Vec<Purpose>,
) -> Result<Vec<Purpose>, String> {
    if let Some(p) = purposes.iter().find(|p| matches!(p, Purpose::AscApi)) {
        if purposes.len() > 1 {
            return Err(format!(
                "an `{}` key mints only the App Store Connect tokens the site builds and has no \
                 other purpose: a key that also signed digests or messages would sign any token \
                 a runner wrote",
                p.as_str()
            ));
        }
        if algorithm != KeyAlgorithm::EcdsaP256Sha256 {
            return Err("an `asc-api` key is an Apple .p8 key: ecdsa-p256-sha256".into());
        }
        return Ok(purposes);
    }
    if purposes.contains(&Purpose::Attestation) {
        if purposes.len() > 1 {
            return Err("an `attestation` key signs only the statements the site builds and has                  no other purpose: a key that also signed digests or messages would sign the                  DSSE PAE of a statement a runner made up"
                .into());
        }
        return Ok(purposes);
    }
    if !algorithm.messages_only() {
        return Ok(purposes);
    }
    if purposes == default_purposes() || purposes == [Purpose::Message] {
        return Ok(vec![Purpose::Message]);
    }
    Err(format!(
        "a {} key signs messages only (purpose \"message\"): it cannot sign SHA-256 digests or \
         Apple code signatures",
        algorithm.as_str()
    ))
}

/// Where a new key is generated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyBackend {
    /// In the site, wrapped under the KEK in the store.
    #[default]
    Software,
    /// In the `[pkcs11]` token, non-extractable.
    Pkcs11,
}

impl KeyBackend {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyBackend::Software => "software",
            KeyBackend::Pkcs11 => "pkcs11",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "software" | "" => Some(KeyBackend::Software),
            "pkcs11" => Some(KeyBackend::Pkcs11),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_and_access_rules_parse_once() {
        assert_eq!(Purpose::parse_list(&[]).ok(), Some(default_purposes()));
        assert!(Purpose::parse_list(&["sign-anything".into()]).is_err());
        assert!(AccessRule::new(vec![], vec!["*".into()]).is_err());
        assert!(AccessRule::new(vec!["*".into()], vec!["".into()]).is_err());
        assert!(
            AccessRule::new(vec!["a/*".into()], vec!["*".into()])
                .is_ok_and(|r| r.admits("a/b", "main"))
        );
    }

    #[test]
    fn glob() {
        assert!(glob_match("acme/*", "acme/app"));
        assert!(glob_match("*", ""));
        assert!(glob_match("refs/tags/v*", "refs/tags/v1.2"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxcyyb"));
        assert!(!glob_match("acme/*", "acme2/app"));
        assert!(!glob_match("refs/heads/main", "refs/heads/main2"));
        assert!(!glob_match("ab*ba", "aba"));
        // Segments: `*` stays within one, `**` crosses them; a lone `*` is anything.
        assert!(glob_match("*", "acme/app"));
        assert!(!glob_match("acme/app*", "acme/app-evil/x"));
        assert!(glob_match("acme/app*", "acme/app-evil"));
        assert!(!glob_match("refs/tags/v*", "refs/tags/v1/../../heads/evil"));
        assert!(glob_match("refs/heads/**", "refs/heads/feature/x"));
        assert!(!glob_match("refs/heads/*", "refs/heads/feature/x"));
        assert!(glob_match("acme/**/app", "acme/a/b/app"));
        assert!(glob_match("**", "x/y/z"));
    }
}
