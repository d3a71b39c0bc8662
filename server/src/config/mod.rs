//! Site configuration: a TOML file parsed once into a validated [`SiteConfig`].
//!
//! Owns: the file schema, its validation, and the validated types (environments, trust
//! policies, key specs, listeners, TLS paths). Must not touch: the store, the network, running
//! state. Ops changes are laid over a `SiteConfig` by `state::overlays`, never written here.
//!
//! Every refusal names the field path (`environments[1].audience`, ...). Unknown keys are refused.
//! Relative paths are taken from the config file's folder. See `deploy/site.example.toml`.

pub mod diff;
mod validate;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::jwt::Jwks;
use crate::model::{AccessRule, KeyAlgorithm, Provider, Purpose, default_purposes};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML does not match the schema (unknown key, wrong type, missing field).
    #[error("{field}: {message}")]
    Schema {
        /// Field path, e.g. `environments[0].signing_keys[1].algorithm`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A value is well-typed but not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Field path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

// === raw schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    trust_domain: String,
    region: String,
    data_dir: PathBuf,
    kek_file: PathBuf,
    #[serde(default)]
    dev: bool,
    listen: RawListen,
    tls: RawTls,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    review: Review,
    #[serde(default)]
    keys: KeyPolicy,
    #[serde(default)]
    pkcs11: Option<Pkcs11Config>,
    /// `[[environments]]`; `[[partitions]]` is the earlier spelling, still read.
    #[serde(alias = "partitions")]
    environments: Vec<RawEnvironment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_cache_mib")]
    cache_mib: u64,
    #[serde(default)]
    engine: Engine,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default = "default_pool_size")]
    pool_size: usize,
    #[serde(default = "default_statement_timeout_ms")]
    statement_timeout_ms: u64,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext: bool,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            cache_mib: default_cache_mib(),
            engine: Engine::Sled,
            url: None,
            password_file: None,
            pool_size: default_pool_size(),
            statement_timeout_ms: default_statement_timeout_ms(),
            ca_file: None,
            allow_plaintext: false,
        }
    }
}

fn default_pool_size() -> usize {
    8
}

fn default_statement_timeout_ms() -> u64 {
    5000
}

/// The storage engine (`[store] engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Embedded, in `data_dir` (the default; one process per site).
    #[default]
    Sled,
    /// A PostgreSQL database shared by the replicas of one site.
    Postgres,
}

/// Where a PostgreSQL-backed site keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresStore {
    /// `postgresql://USER@HOST:PORT/DB`; never with a password in it.
    pub url: String,
    /// File holding the password (mode 0600/0400), if the server wants one.
    pub password_file: Option<PathBuf>,
    /// Connections for store calls.
    pub pool_size: usize,
    /// The longest any database call may take (`[store] statement_timeout_ms`, default 5000):
    /// a server that does not answer in time (stopped, partitioned, locked) fails the call
    /// `UNAVAILABLE`. Enforced on both sides: as PostgreSQL's `statement_timeout` and
    /// `lock_timeout`, and by the site, which stops waiting (a stopped server answers nothing,
    /// not even a cancel). Must be shorter than `[limits] request_timeout_seconds`.
    pub statement_timeout: std::time::Duration,
    /// CA (PEM) the database server's certificate must chain to (`[store] ca_file`): the
    /// connection uses TLS and checks the server's name against the url's host (libpq's
    /// `sslmode=verify-full`). The jti store, revocations and the audit chain cross it.
    pub ca_file: Option<PathBuf>,
    /// `[store] allow_plaintext = true`: no TLS (a database on the same host or a network
    /// that is itself encrypted). Without it and without `ca_file`, only a dev site may
    /// connect in clear.
    pub allow_plaintext: bool,
}

/// Whether a connection URL carries a password (`user:password@` or a `password=` parameter).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let userinfo_has_password = authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    userinfo_has_password || url.to_ascii_lowercase().contains("password=")
}

fn default_cache_mib() -> u64 {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "default_checkpoint_every")]
    checkpoint_every: u64,
    #[serde(default = "default_checkpoint_seconds")]
    checkpoint_seconds: u64,
    #[serde(default)]
    retention_days: u64,
    #[serde(default = "default_flush")]
    flush: bool,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            checkpoint_every: default_checkpoint_every(),
            checkpoint_seconds: default_checkpoint_seconds(),
            retention_days: 0,
            flush: true,
        }
    }
}

fn default_checkpoint_every() -> u64 {
    1000
}

fn default_checkpoint_seconds() -> u64 {
    10
}

fn default_flush() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    enroll: SocketAddr,
    sign: SocketAddr,
    admin: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    server_cert: PathBuf,
    server_key: PathBuf,
    admin_ca: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    name: String,
    audience: String,
    build_p95_seconds: u64,
    max_ttl_seconds: Option<u64>,
    #[serde(default = "default_token_age")]
    max_token_age_seconds: u64,
    #[serde(default)]
    max_session_seconds: Option<u64>,
    #[serde(default)]
    max_signatures_per_job: Option<u64>,
    #[serde(default)]
    max_signatures_per_certificate: Option<u64>,
    #[serde(default)]
    signing_keys: Vec<RawKey>,
    #[serde(default)]
    trust_policies: Vec<RawPolicy>,
    #[serde(default)]
    runners: RunnerMode,
    #[serde(default)]
    runner_backends: Option<Vec<meshsign_evidence::device::Backend>>,
}

fn default_token_age() -> u64 {
    900
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    alias: String,
    algorithm: String,
    access: RawAccess,
    #[serde(default = "default_purposes")]
    purposes: Vec<Purpose>,
    #[serde(default)]
    max_signatures_per_job: Option<u64>,
    #[serde(default)]
    max_signatures_per_certificate: Option<u64>,
    #[serde(default)]
    digest_allow_list: Option<PathBuf>,
    #[serde(default)]
    backend: crate::model::KeyBackend,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    repositories: Vec<String>,
    refs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    issuer: String,
    jwks_file: PathBuf,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    bound_claims: BTreeMap<String, String>,
    #[serde(default)]
    provider: Provider,
    #[serde(default)]
    claim_mappings: BTreeMap<String, String>,
    #[serde(default = "default_token_lifetime")]
    max_token_lifetime_seconds: u64,
    #[serde(default)]
    allow_unbound: bool,
}

/// CI job tokens live minutes (GitHub ~5–10, GitLab 5 by default); a day is the default ceiling.
fn default_token_lifetime() -> u64 {
    86_400
}

fn yes() -> bool {
    true
}

// === validated types ===

/// A validated site configuration.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// SPIFFE trust domain of this site's identities.
    pub trust_domain: String,
    /// This site's region; runners must name it.
    pub region: String,
    /// sled database folder.
    pub data_dir: PathBuf,
    /// File holding the key-encryption key (32 bytes, raw or hex).
    pub kek_file: PathBuf,
    /// Dev mode: http issuers and a loosely-permissioned KEK file are tolerated.
    pub dev: bool,
    /// Listen addresses.
    pub listen: Listen,
    /// Server TLS material.
    pub tls: TlsFiles,
    /// Audit checkpoints.
    pub audit: AuditConfig,
    /// sled's page cache, MiB (sled's own default is 1 GiB, which a site's memory would grow
    /// towards as the audit log grows).
    pub store_cache_mib: u64,
    /// `Some` when the site's state is in PostgreSQL (`[store] engine = "postgres"`), shared by
    /// its replicas; `None`: sled in `data_dir`.
    pub postgres: Option<PostgresStore>,
    /// Connection, request and rate limits (`[limits]`).
    pub limits: Limits,
    /// Where Prometheus scrapes `/metrics` (`[metrics] listen`; off when absent). Keep it on
    /// loopback or a management network: it is plain HTTP and unauthenticated.
    pub metrics_listen: Option<SocketAddr>,
    /// Two-person review of dangerous admin operations (`[review]`).
    pub review: Review,
    /// Site-wide key hygiene (`[keys]`).
    pub keys: KeyPolicy,
    /// The PKCS#11 token keys with `backend = "pkcs11"` live in (`[pkcs11]`; paths absolute).
    pub pkcs11: Option<Pkcs11Config>,
    /// Environments (the site's partitions), in file order.
    pub environments: Vec<Environment>,
    /// SHA-256 (hex) of the `[tls]` files when the configuration was read (empty: unreadable),
    /// so a reload's diff can say which of them changed.
    pub tls_sha256: TlsDigests,
    /// SHA-256 (hex) of the file's text: what `admin review propose-config` names, so a
    /// reload that widens trust applies only the exact file a second admin approved.
    pub source_sha256: String,
}

/// `[review]`: which admin operations need a second admin. One admin's call of a listed
/// operation only *proposes* it (the call is refused with `review_required` and the proposal
/// id); a different admin approves the proposal (`Admin.ApproveProposal`) within
/// `window_seconds`; then the same call — the same operation with the same request, by any
/// admin but the approver — is carried out once. Nothing changes before approval; the request
/// itself is never stored (only its SHA-256 and a description without secrets), so a key import
/// under review leaves no copy of the key in the store.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Review {
    /// Operations that need approval (names from [`crate::model::admin::ADMIN_RPCS`] that are reviewable); `[]` turns review
    /// off. Default: key import, key disable, runner-CA activation and revocation, trust
    /// enable, JWKS set, retention change, removing a distrust rule (which trusts signatures
    /// again), and a reload that widens trust.
    pub operations: std::collections::BTreeSet<String>,
    /// Seconds from proposal until it must be approved and carried out (default 3600).
    pub window_seconds: u64,
}

impl Default for Review {
    fn default() -> Self {
        Self {
            operations: [
                "ImportKey",
                "DisableKey",
                "ActivateIssuer",
                "RevokeIssuer",
                "EnableTrustPolicy",
                "SetJwks",
                "SetAuditRetention",
                "Undistrust",
                "RegisterRunner",
                "Reload",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            window_seconds: 3600,
        }
    }
}

impl Review {
    /// Whether `operation` needs a second admin.
    pub fn covers(&self, operation: &str) -> bool {
        self.operations.contains(operation)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for op in &self.operations {
            if !crate::model::admin::reviewable().any(|r| r == op) {
                return Err(invalid(
                    "review.operations",
                    format!(
                        "`{}` is not an admin change that review can cover (known: {})",
                        crate::model::bounded(op, 64),
                        crate::model::admin::reviewable()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if !(60..=7 * 86_400).contains(&self.window_seconds) {
            return Err(invalid(
                "review.window_seconds",
                "must be between 60 and 604800 (7 days)",
            ));
        }
        Ok(())
    }
}

/// `[keys]`: site-wide key hygiene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyPolicy {
    /// A key whose newest version is older than this is flagged for rotation in `admin status`
    /// and in the `meshsign_key_rotation_due` metric (default 30: rotate faster than 30 days).
    /// `0` turns the flag off.
    pub rotation_age_days: u64,
    /// The same for runner CAs: an active runner CA older than this is flagged (`ROTATE` in
    /// `admin status`, the `meshsign_runner_ca_rotation_due` metric). Default 30, the seed's
    /// band; `0` turns the flag off.
    pub runner_ca_rotation_days: u64,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            rotation_age_days: 30,
            runner_ca_rotation_days: 30,
        }
    }
}

/// `[limits]`: what one listener, one source address and one job may consume. Every field has a
/// safe default; `0` turns a rate limit off (never a connection or size limit).
///
/// The connection caps are per listener, so a flood on the unauthenticated enroll port cannot
/// take the sign port's connections. `meshsignd` raises its open-file limit to the hard limit at
/// start and refuses a configuration whose caps do not fit in it.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per listener.
    pub max_connections: u32,
    /// Open connections per listener from one source address.
    pub max_connections_per_source: u32,
    /// Seconds a client has to complete the TLS handshake.
    pub handshake_timeout_seconds: u64,
    /// Seconds a connection may stay silent after its handshake.
    pub first_request_timeout_seconds: u64,
    /// HTTP/2 streams one connection may have open (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Seconds one enroll- or sign-port request may run before it is cancelled.
    pub request_timeout_seconds: u64,
    /// Seconds after which a connection is asked to go away (HTTP/2 GOAWAY, graceful drain);
    /// clients reconnect, and a long-lived connection cannot pin resources forever.
    pub max_connection_age_seconds: u64,
    /// Seconds in-flight requests get to finish after the GOAWAY before the connection closes.
    pub connection_age_grace_seconds: u64,
    /// Requests in progress per listener; beyond, new requests are shed with
    /// `RESOURCE_EXHAUSTED` (`overloaded`) instead of queueing.
    pub max_requests_in_flight: u32,
    /// Enroll requests per second per source address (token bucket refill; 0: no limit).
    pub enroll_per_source_per_second: u32,
    /// Enroll requests one source may make at once before the refill rate applies.
    pub enroll_per_source_burst: u32,
    /// Refused enrollments written as entries of their own per second, site-wide (token
    /// bucket; 0: no cap). Beyond it, refusals are counted into summary entries: no number
    /// of source addresses grows the log faster than this.
    pub enroll_deny_entries_per_second: u32,
    /// Refused enrollments written one by one at once before the site-wide rate applies.
    pub enroll_deny_entries_burst: u32,
    /// Sign-port requests per second per job (token bucket refill; 0: no limit).
    pub sign_per_job_per_second: u32,
    /// Sign-port requests one job may make at once before the refill rate applies.
    pub sign_per_job_burst: u32,
    /// Seconds between summary audit entries for refusals that are counted rather than
    /// recorded one by one (rate limits, handshake refusals, unidentified operators).
    pub summary_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_source: 256,
            handshake_timeout_seconds: 10,
            first_request_timeout_seconds: 10,
            max_streams_per_connection: 64,
            request_timeout_seconds: 30,
            max_connection_age_seconds: 3600,
            connection_age_grace_seconds: 60,
            max_requests_in_flight: 1024,
            enroll_per_source_per_second: 20,
            enroll_per_source_burst: 200,
            enroll_deny_entries_per_second: 50,
            enroll_deny_entries_burst: 500,
            sign_per_job_per_second: 0,
            sign_per_job_burst: 1000,
            summary_seconds: 60,
        }
    }
}

impl Limits {
    /// File descriptors the three listeners may hold at their caps.
    pub fn descriptors_needed(&self) -> u64 {
        3 * u64::from(self.max_connections)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_connections", u64::from(self.max_connections)),
            (
                "max_connections_per_source",
                u64::from(self.max_connections_per_source),
            ),
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            (
                "first_request_timeout_seconds",
                self.first_request_timeout_seconds,
            ),
            (
                "max_streams_per_connection",
                u64::from(self.max_streams_per_connection),
            ),
            ("request_timeout_seconds", self.request_timeout_seconds),
            (
                "max_connection_age_seconds",
                self.max_connection_age_seconds,
            ),
            (
                "max_requests_in_flight",
                u64::from(self.max_requests_in_flight),
            ),
            ("summary_seconds", self.summary_seconds),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(format!("limits.{name}"), "must be positive"));
            }
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(invalid(
                "limits.max_connections_per_source",
                "must not exceed limits.max_connections",
            ));
        }
        for (name, rate, burst) in [
            (
                "enroll_per_source",
                self.enroll_per_source_per_second,
                self.enroll_per_source_burst,
            ),
            (
                "sign_per_job",
                self.sign_per_job_per_second,
                self.sign_per_job_burst,
            ),
            (
                "enroll_deny_entries",
                self.enroll_deny_entries_per_second,
                self.enroll_deny_entries_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(invalid(
                    format!("limits.{name}_burst"),
                    "must be positive when the rate is set",
                ));
            }
        }
        Ok(())
    }
}

/// How many signatures one job, or one certificate, may obtain from a key (`None`: no limit).
/// Counted in digests: a batch of 100 uses 100.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Per CI job (environment + job id), across its certificates and renewals.
    pub per_job: Option<u64>,
    /// Per runner certificate.
    pub per_certificate: Option<u64>,
}

impl Budget {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.per_job.is_some() || self.per_certificate.is_some()
    }
}

/// The digests a release key may sign, read from `digest_allow_list` (one lowercase or
/// uppercase hex SHA-256 per line; `#` comments and blank lines ignored). Re-read on reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestAllowList {
    /// The file it came from.
    pub path: PathBuf,
    /// The digests.
    pub digests: std::sync::Arc<HashSet<[u8; 32]>>,
}

impl DigestAllowList {
    fn load(path: PathBuf) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut digests = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let d = hex::decode(line)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    format!(
                        "{} line {}: not a hex SHA-256 digest",
                        path.display(),
                        n + 1
                    )
                })?;
            digests.insert(d);
        }
        Ok(Self {
            path,
            digests: std::sync::Arc::new(digests),
        })
    }
}

/// When the audit log signs a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// After this many entries.
    pub checkpoint_every: u64,
    /// After this many seconds with new entries.
    pub checkpoint_seconds: u64,
    /// Entries older than this may be pruned once exported and checkpointed (0: keep all).
    pub retention_days: u64,
    /// Flush every entry to disk before the response leaves (always, outside dev mode).
    /// `flush = false` exists only so benchmarks can measure what durability costs; a crash
    /// may then lose acknowledged entries, so validation refuses it unless `dev = true`.
    pub flush: bool,
}

/// Listen addresses of the three ports.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// Enrollment and public verification material (server-auth TLS).
    pub enroll: SocketAddr,
    /// Signing (mutual TLS with runner certificates).
    pub sign: SocketAddr,
    /// Administration (mutual TLS with the admin CA).
    pub admin: SocketAddr,
}

/// SHA-256 (hex) of each `[tls]` file's bytes, read with the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsDigests {
    /// Of `server_cert`.
    pub server_cert: String,
    /// Of `server_key` (compared, never written out).
    pub server_key: String,
    /// Of `admin_ca`.
    pub admin_ca: String,
}

impl TlsDigests {
    fn read(files: &TlsFiles) -> Self {
        let sum = |p: &Path| {
            std::fs::read(p)
                .map(|b| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &b)))
                .unwrap_or_default()
        };
        Self {
            server_cert: sum(&files.server_cert),
            server_key: sum(&files.server_key),
            admin_ca: sum(&files.admin_ca),
        }
    }
}

/// Paths of the server's TLS material.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain, PEM.
    pub server_cert: PathBuf,
    /// Server private key, PEM.
    pub server_key: PathBuf,
    /// Admin CA certificate(s), PEM.
    pub admin_ca: PathBuf,
}

/// One environment of the site.
#[derive(Clone, Debug)]
pub struct Environment {
    /// e.g. `production`.
    pub name: String,
    /// OIDC audience this environment accepts; unique in the site.
    pub audience: String,
    /// 95th percentile build duration, which bounds certificate lifetimes.
    pub build_p95_seconds: u64,
    /// Longest certificate lifetime granted (at most [`Environment::ttl_cap`]).
    pub max_ttl_seconds: u64,
    /// Oldest token (by `iat`) accepted.
    pub max_token_age_seconds: u64,
    /// The longest a job's session may run, renewals included (default 24 h, at least the TTL).
    pub max_session_seconds: u64,
    /// The default budget of its keys (a key's own settings override it).
    pub budget: Budget,
    /// Signing keys, by alias.
    pub signing_keys: Vec<KeySpec>,
    /// Trusted OIDC issuers.
    pub trust_policies: Vec<TrustPolicy>,
    /// Whether a runner's fingerprint must be proven by a registered device key.
    pub runners: RunnerMode,
    /// The device-key backends accepted in `registered` mode (default: all three).
    pub runner_backends: Vec<meshsign_evidence::device::Backend>,
}

/// How an environment establishes a runner's fingerprint (`runners = …`; issue 28).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerMode {
    /// The runner's word (`runner_fingerprint` as sent): dev sites and the quick start. The
    /// default, so that a site configured before device keys keeps enrolling its runners;
    /// `meshsignd serve` warns about every such environment.
    #[default]
    Claimed,
    /// A device key registered at this site (`admin runner register`) must prove possession
    /// at every enrollment and renewal; the fingerprint is SHA-256 of its SPKI.
    Registered,
}

impl RunnerMode {
    /// The word in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerMode::Claimed => "claimed",
            RunnerMode::Registered => "registered",
        }
    }
}

impl Environment {
    /// 1.5 × build_p95 + 10 minutes (DESIGN.md "Runner certificate profile").
    pub fn ttl_cap(build_p95_seconds: u64) -> u64 {
        build_p95_seconds.saturating_mul(3) / 2 + 600
    }

    /// The signing key spec with this alias.
    pub fn key(&self, alias: &str) -> Option<&KeySpec> {
        self.signing_keys.iter().find(|k| k.alias == alias)
    }
}

/// A configured signing key.
#[derive(Clone, Debug)]
pub struct KeySpec {
    /// Alias inside the environment.
    pub alias: String,
    /// Algorithm.
    pub algorithm: KeyAlgorithm,
    /// Who may use it.
    pub access: AccessRule,
    /// Disabled by ops: still verifiable, no longer signs.
    pub disabled: bool,
    /// What it may sign.
    pub purposes: Vec<Purpose>,
    /// Signatures per job and per certificate (the key's own, else its environment's).
    pub budget: Budget,
    /// When set, the only digests this key signs.
    pub allowed_digests: Option<DigestAllowList>,
    /// Where its new versions are generated (`backend = "pkcs11"`: in the `[pkcs11]` token).
    pub backend: crate::model::KeyBackend,
    /// An `asc-api` key's App Store Connect identity (key id, issuer, allowed scopes).
    pub asc: Option<crate::model::AscIdentity>,
}

/// One trusted OIDC issuer of a environment.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    /// Name, recorded in certificates and audit.
    pub name: String,
    /// Exact issuer URL.
    pub issuer: String,
    /// Pinned keys.
    pub jwks: Jwks,
    /// Whether new enrollments and sign calls from its certificates are admitted.
    pub enabled: bool,
    /// When disabled: certificates it already minted may keep signing (`--keep-sessions`).
    pub keep_sessions: bool,
    /// Claims a token must carry: name → pattern. A mapped field name (`repository`, `ref`,
    /// `job_id`, `pipeline`, `environment`, `actor`) is matched against the mapped value;
    /// any other name against the token's own claim.
    pub bound_claims: BTreeMap<String, String>,
    /// Whose claims its tokens carry (github by default).
    pub provider: Provider,
    /// For `generic`: mapped field → claim name.
    pub claim_mappings: BTreeMap<String, String>,
    /// The longest lifetime (`exp − iat`) a token may claim.
    pub max_token_lifetime_seconds: u64,
    /// `allow_unbound = true`: the policy binds no owner claim (see
    /// [`crate::model::Provider::owner_claims`]) on purpose; every enrollment's audit entry
    /// says so.
    pub allow_unbound: bool,
}

impl TrustPolicy {
    /// Whether a bound claim ties tokens to an owner: one of the provider's owner claims with
    /// an exact pattern (`repository_owner_id = "*"` binds nothing); for `generic`, whose
    /// claims meshsign cannot know, any bound claim that is not a bare wildcard.
    pub fn binds_owner(&self) -> bool {
        let owners = self.provider.owner_claims();
        self.bound_claims.iter().any(|(claim, pattern)| {
            if owners.is_empty() {
                !matches!(pattern.as_str(), "*" | "**")
            } else {
                owners.contains(&claim.as_str()) && !pattern.contains(['*', '?', '['])
            }
        })
    }

    /// Renamable owner names this policy binds where an id exists and is not bound (for
    /// `meshsignd check`): (bound claim, id claim to bind instead).
    pub fn renamable_bindings(&self) -> Vec<(&'static str, &'static str)> {
        self.provider
            .renamable_claims()
            .iter()
            .filter(|(name, id)| {
                self.bound_claims.contains_key(*name) && !self.bound_claims.contains_key(*id)
            })
            .copied()
            .collect()
    }
}

/// `[pkcs11]` in the site config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// File holding the user PIN (mode 0600 outside dev; trailing newline ignored).
    pub pin_file: PathBuf,
    /// Sessions the site keeps open at most (default 4; size it to the token).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Create the audit (checkpoint) key in the token when the site is first made (an
    /// existing site keeps its audit key where it is).
    #[serde(default)]
    pub audit_key: bool,
    /// Create new runner CAs (a new environment's first, and every staged one) in the token:
    /// each enrollment is then signed by the token. Existing CAs stay where they are.
    #[serde(default)]
    pub runner_cas: bool,
}

fn default_sessions() -> usize {
    4
}

impl SiteConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base)
    }

    /// Parses and validates TOML; relative paths are joined to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Schema {
            field: "(toml)".into(),
            message: e.to_string(),
        })?;
        let raw: RawSite = serde_path_to_error::deserialize(de).map_err(|e| {
            let message = e.inner().message().to_string();
            let mut field = e.path().to_string();
            // A missing field is reported at its parent; name the field itself.
            if let Some(name) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                field = if field == "." {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
            }
            ConfigError::Schema { field, message }
        })?;
        let mut cfg = validate::site(raw, base)?;
        cfg.tls_sha256 = TlsDigests::read(&cfg.tls);
        cfg.source_sha256 = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            text.as_bytes(),
        ));
        Ok(cfg)
    }
}

impl SiteConfig {
    /// The environment with this name.
    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|p| p.name == name)
    }
}
