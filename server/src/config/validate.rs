//! Validation: one `TryFrom` per section of the file, from its raw (deserialized) form to its
//! validated type. A section gets what it needs from the rest of the file through [`Ctx`] and
//! names its refusals by its field path ([`In::at`]), so every message reads
//! `environments[1].signing_keys[0].alias: …`. `[limits]`, `[review]` and `[keys]` deserialize
//! straight into their validated types and check themselves.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{
    AuditConfig, Budget, ConfigError, DigestAllowList, Engine, Environment, KeySpec, Listen,
    Pkcs11Config, PostgresStore, RawAudit, RawEnvironment, RawKey, RawListen, RawPolicy, RawSite,
    RawStore, RawTls, SiteConfig, TlsDigests, TlsFiles, TrustPolicy, invalid, url_has_password,
};
use crate::identity::jwt::Jwks;
use crate::model::{
    AccessRule, JOB_FIELDS, KeyAlgorithm, KeyBackend, NAME_RULE, Provider, Purpose,
    default_purposes, is_name,
};

/// What a section's validation needs from the rest of the file.
struct Ctx<'a> {
    /// The config file's folder: relative paths start here.
    base: &'a Path,
    /// `dev = true`.
    dev: bool,
    /// Whether a `[pkcs11]` table is present.
    pkcs11: bool,
    /// `[limits] request_timeout_seconds` in milliseconds.
    request_timeout_ms: u64,
}

impl Ctx<'_> {
    fn abs(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }
}

/// A raw section with the context it is validated in and the field path it sits at.
struct In<'a, T> {
    raw: T,
    ctx: &'a Ctx<'a>,
    at: String,
}

impl<'a, T> In<'a, T> {
    fn new(raw: T, ctx: &'a Ctx<'a>, at: impl Into<String>) -> Self {
        Self {
            raw,
            ctx,
            at: at.into(),
        }
    }

    /// The path of field `f` of this section.
    fn at(&self, f: &str) -> String {
        if self.at.is_empty() {
            f.to_string()
        } else {
            format!("{}.{f}", self.at)
        }
    }
}

/// Validates a whole file.
pub(super) fn site(raw: RawSite, base: &Path) -> Result<SiteConfig, ConfigError> {
    if raw.trust_domain.is_empty()
        || !raw
            .trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(invalid("trust_domain", "must be a lowercase DNS name"));
    }
    if !is_name(&raw.region) {
        return Err(invalid("region", format!("must be {NAME_RULE}")));
    }
    let ctx = Ctx {
        base,
        dev: raw.dev,
        pkcs11: raw.pkcs11.is_some(),
        request_timeout_ms: raw.limits.request_timeout_seconds.saturating_mul(1000),
    };
    let listen = Listen::try_from(raw.listen)?;
    let audit = AuditConfig::try_from(In::new(raw.audit, &ctx, "audit"))?;
    raw.limits.validate()?;
    raw.review.validate()?;
    let pkcs11 = raw
        .pkcs11
        .map(|p| Pkcs11Config::from(In::new(p, &ctx, "pkcs11")));
    let store = StoreSettings::try_from(In::new(raw.store, &ctx, "store"))?;
    if !audit.flush && !raw.dev {
        return Err(invalid(
            "audit.flush",
            "false (acknowledged entries may be lost on a crash) is a benchmark setting, \
             refused unless dev = true",
        ));
    }
    let environments = environments(raw.environments, &ctx)?;
    Ok(SiteConfig {
        trust_domain: raw.trust_domain,
        region: raw.region,
        data_dir: ctx.abs(raw.data_dir),
        kek_file: ctx.abs(raw.kek_file),
        dev: raw.dev,
        listen,
        tls: TlsFiles::from(In::new(raw.tls, &ctx, "tls")),
        environments,
        limits: raw.limits,
        review: raw.review,
        keys: raw.keys,
        pkcs11,
        metrics_listen: raw.metrics.listen,
        store_cache_mib: store.cache_mib,
        postgres: store.postgres,
        audit,
        tls_sha256: TlsDigests::default(),
        source_sha256: String::new(),
    })
}

/// `[[environments]]`: each one valid, names and audiences unique across them.
fn environments(raw: Vec<RawEnvironment>, ctx: &Ctx) -> Result<Vec<Environment>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "environments",
            "at least one environment is required",
        ));
    }
    let mut names = HashSet::new();
    let mut audiences: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("environments[{i}].{f}");
        if !is_name(&p.name) {
            return Err(invalid(at("name"), format!("must be {NAME_RULE}")));
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(
                at("name"),
                format!("environment `{}` is defined twice", p.name),
            ));
        }
        if let Some(prev) = audiences.insert(p.audience.clone(), i)
            && !p.audience.is_empty()
        {
            return Err(invalid(
                at("audience"),
                format!(
                    "`{}` is already the audience of environments[{prev}]",
                    p.audience
                ),
            ));
        }
        out.push(Environment::try_from(In::new(
            p,
            ctx,
            format!("environments[{i}]"),
        ))?);
    }
    Ok(out)
}

impl TryFrom<RawListen> for Listen {
    type Error = ConfigError;

    fn try_from(l: RawListen) -> Result<Self, ConfigError> {
        let clash = |a: SocketAddr, b: SocketAddr| a == b && a.port() != 0;
        if clash(l.enroll, l.sign) || clash(l.sign, l.admin) || clash(l.enroll, l.admin) {
            return Err(invalid(
                "listen",
                "enroll, sign and admin need distinct addresses",
            ));
        }
        Ok(Listen {
            enroll: l.enroll,
            sign: l.sign,
            admin: l.admin,
        })
    }
}

impl TryFrom<In<'_, RawAudit>> for AuditConfig {
    type Error = ConfigError;

    fn try_from(s: In<'_, RawAudit>) -> Result<Self, ConfigError> {
        let a = &s.raw;
        if a.checkpoint_every == 0 || a.checkpoint_seconds == 0 {
            return Err(invalid(
                s.at.clone(),
                "checkpoint_every and checkpoint_seconds must be positive",
            ));
        }
        Ok(AuditConfig {
            checkpoint_every: a.checkpoint_every,
            checkpoint_seconds: a.checkpoint_seconds,
            retention_days: a.retention_days,
            flush: a.flush,
        })
    }
}

impl From<In<'_, RawTls>> for TlsFiles {
    fn from(s: In<'_, RawTls>) -> Self {
        TlsFiles {
            server_cert: s.ctx.abs(s.raw.server_cert),
            server_key: s.ctx.abs(s.raw.server_key),
            admin_ca: s.ctx.abs(s.raw.admin_ca),
        }
    }
}

impl From<In<'_, Pkcs11Config>> for Pkcs11Config {
    fn from(s: In<'_, Pkcs11Config>) -> Self {
        let mut p = s.raw;
        p.module = s.ctx.abs(p.module);
        p.pin_file = s.ctx.abs(p.pin_file);
        p
    }
}

/// `[store]` validated: the sled cache and, for a shared site, where PostgreSQL is.
struct StoreSettings {
    cache_mib: u64,
    postgres: Option<PostgresStore>,
}

impl TryFrom<In<'_, RawStore>> for StoreSettings {
    type Error = ConfigError;

    fn try_from(s: In<'_, RawStore>) -> Result<Self, ConfigError> {
        let (r, ctx) = (&s.raw, s.ctx);
        if r.cache_mib == 0 {
            return Err(invalid(s.at("cache_mib"), "must be positive"));
        }
        let postgres = match r.engine {
            Engine::Sled => {
                if r.url.is_some() || r.password_file.is_some() || r.ca_file.is_some() {
                    return Err(invalid(s.at("url"), "only with engine = \"postgres\""));
                }
                None
            }
            Engine::Postgres => Some(postgres(&s)?),
        };
        Ok(StoreSettings {
            cache_mib: r.cache_mib,
            postgres: postgres.map(|mut p| {
                p.password_file = p.password_file.map(|f| ctx.abs(f));
                p.ca_file = p.ca_file.map(|f| ctx.abs(f));
                p
            }),
        })
    }
}

/// `[store]` with `engine = "postgres"`.
fn postgres(s: &In<'_, RawStore>) -> Result<PostgresStore, ConfigError> {
    let (r, ctx) = (&s.raw, s.ctx);
    let url = r
        .url
        .clone()
        .ok_or_else(|| invalid(s.at("url"), "engine = \"postgres\" needs a url"))?;
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
        return Err(invalid(
            s.at("url"),
            "must be postgresql://USER@HOST:PORT/DB",
        ));
    }
    if url_has_password(&url) {
        return Err(invalid(
            s.at("url"),
            "must not contain a password (it would be in the config and the logs); \
             put it in a file named by store.password_file",
        ));
    }
    if r.pool_size == 0 || r.pool_size > 256 {
        return Err(invalid(s.at("pool_size"), "1 to 256"));
    }
    if r.statement_timeout_ms < 100 || r.statement_timeout_ms >= ctx.request_timeout_ms {
        return Err(invalid(
            s.at("statement_timeout_ms"),
            "from 100 to less than limits.request_timeout_seconds (in milliseconds)",
        ));
    }
    if r.ca_file.is_some() && r.allow_plaintext {
        return Err(invalid(
            s.at("allow_plaintext"),
            "true contradicts store.ca_file (TLS); keep one",
        ));
    }
    if r.ca_file.is_none() && !r.allow_plaintext && !ctx.dev {
        return Err(invalid(
            s.at("ca_file"),
            "is needed: the connection to PostgreSQL carries the jti store, \
             revocations and the audit chain, so it uses TLS with the server's \
             certificate checked against this CA and the url's host; set \
             store.allow_plaintext = true only for a database on this host or an \
             encrypted network",
        ));
    }
    Ok(PostgresStore {
        url,
        password_file: r.password_file.clone(),
        pool_size: r.pool_size,
        statement_timeout: std::time::Duration::from_millis(r.statement_timeout_ms),
        ca_file: r.ca_file.clone(),
        allow_plaintext: r.allow_plaintext,
    })
}

impl TryFrom<In<'_, RawEnvironment>> for Environment {
    type Error = ConfigError;

    fn try_from(s: In<'_, RawEnvironment>) -> Result<Self, ConfigError> {
        let p = &s.raw;
        if p.audience.is_empty() {
            return Err(invalid(s.at("audience"), "must not be empty"));
        }
        if p.build_p95_seconds == 0 {
            return Err(invalid(s.at("build_p95_seconds"), "must be positive"));
        }
        let cap = Environment::ttl_cap(p.build_p95_seconds);
        let max_ttl = p.max_ttl_seconds.unwrap_or(cap);
        if max_ttl > cap {
            return Err(invalid(
                s.at("max_ttl_seconds"),
                format!("{max_ttl} exceeds the cap 1.5 × build_p95 + 600 = {cap}"),
            ));
        }
        if max_ttl < 60 {
            return Err(invalid(s.at("max_ttl_seconds"), "must be at least 60"));
        }
        let budget = Budget {
            per_job: p.max_signatures_per_job,
            per_certificate: p.max_signatures_per_certificate,
        };
        let mut keys: Vec<KeySpec> = Vec::new();
        for (k, key) in p.signing_keys.iter().enumerate() {
            let at = s.at(&format!("signing_keys[{k}]"));
            if keys.iter().any(|x| x.alias == key.alias) && is_name(&key.alias) {
                return Err(invalid(
                    format!("{at}.alias"),
                    format!("`{}` is defined twice", key.alias),
                ));
            }
            keys.push(KeySpec::try_from(In::new((key, budget), s.ctx, at))?);
        }
        let mut policies: Vec<TrustPolicy> = Vec::new();
        for (t, pol) in p.trust_policies.iter().enumerate() {
            let at = s.at(&format!("trust_policies[{t}]"));
            let policy = TrustPolicy::try_from(In::new(pol, s.ctx, at.clone()))?;
            if policies.iter().any(|x| x.name == policy.name) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("`{}` is defined twice", policy.name),
                ));
            }
            if policies.iter().any(|x| x.issuer == policy.issuer) {
                return Err(invalid(
                    format!("{at}.issuer"),
                    "another policy of this environment has this issuer",
                ));
            }
            policies.push(policy);
        }
        if p.runner_backends.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                s.at("runner_backends"),
                "must name at least one of tpm, pkcs11, file (or be left out for all three)",
            ));
        }
        let p = s.raw;
        Ok(Environment {
            name: p.name,
            audience: p.audience,
            build_p95_seconds: p.build_p95_seconds,
            max_ttl_seconds: max_ttl,
            max_token_age_seconds: p.max_token_age_seconds,
            max_session_seconds: p.max_session_seconds.unwrap_or(86_400).max(max_ttl),
            budget,
            signing_keys: keys,
            trust_policies: policies,
            runners: p.runners,
            runner_backends: p.runner_backends.unwrap_or_else(|| {
                use meshsign_evidence::device::Backend;
                vec![Backend::Tpm, Backend::Pkcs11, Backend::File]
            }),
        })
    }
}

/// A key with its environment's budget (a key's own budget overrides it).
impl TryFrom<In<'_, (&RawKey, Budget)>> for KeySpec {
    type Error = ConfigError;

    fn try_from(s: In<'_, (&RawKey, Budget)>) -> Result<Self, ConfigError> {
        let (key, env_budget) = s.raw;
        if !is_name(&key.alias) {
            return Err(invalid(s.at("alias"), format!("must be {NAME_RULE}")));
        }
        let algorithm = KeyAlgorithm::parse(&key.algorithm).ok_or_else(|| {
            invalid(
                s.at("algorithm"),
                format!(
                    "unsupported `{}` (supported: ecdsa-p256-sha256, ecdsa-p384-sha384, ed25519, rsa-{{2048,3072,4096}}-{{pkcs1,pss}}-sha256)",
                    key.algorithm
                ),
            )
        })?;
        let access = AccessRule::new(key.access.repositories.clone(), key.access.refs.clone())
            .map_err(|(list, m)| invalid(s.at(&format!("access.{list}")), m))?;
        let budget = Budget {
            per_job: key.max_signatures_per_job.or(env_budget.per_job),
            per_certificate: key
                .max_signatures_per_certificate
                .or(env_budget.per_certificate),
        };
        let allowed_digests = key
            .digest_allow_list
            .clone()
            .map(|f| DigestAllowList::load(s.ctx.abs(f)))
            .transpose()
            .map_err(|m| invalid(s.at("digest_allow_list"), m))?;
        let purposes = if key.purposes.is_empty() {
            default_purposes()
        } else {
            key.purposes.clone()
        };
        let purposes = crate::model::purposes_for(algorithm, purposes)
            .map_err(|m| invalid(s.at("purposes"), m))?;
        if allowed_digests.is_some() && purposes.contains(&Purpose::AppleCms) {
            return Err(invalid(
                s.at("digest_allow_list"),
                "an allow-list names artifact digests; a key with one may not have purpose \
                 apple-cms (its input is CMS attributes, not an artifact digest)",
            ));
        }
        if key.backend == KeyBackend::Pkcs11 && !s.ctx.pkcs11 {
            return Err(invalid(
                s.at("backend"),
                "pkcs11 needs a [pkcs11] table (module, token_label, pin_file)",
            ));
        }
        if purposes.contains(&Purpose::AscApi) {
            // A key the file declares is generated by the site on first start; Apple's key is
            // Apple's, so an asc-api key can only be imported.
            return Err(invalid(
                s.at("purposes"),
                "an asc-api key is Apple's AuthKey_KID.p8: import it with `meshsign admin key \
                 import --purpose asc-api --asc-key-id KID …` instead of declaring it here (a \
                 key declared here would be generated by the site, and Apple would not know it)",
            ));
        }
        Ok(KeySpec {
            budget,
            allowed_digests,
            purposes,
            alias: key.alias.clone(),
            algorithm,
            access,
            disabled: false,
            backend: key.backend,
            asc: None,
        })
    }
}

impl TryFrom<In<'_, &RawPolicy>> for TrustPolicy {
    type Error = ConfigError;

    fn try_from(s: In<'_, &RawPolicy>) -> Result<Self, ConfigError> {
        let pol = s.raw;
        if !is_name(&pol.name) {
            return Err(invalid(s.at("name"), format!("must be {NAME_RULE}")));
        }
        if pol.issuer.contains('*') {
            return Err(invalid(
                s.at("issuer"),
                "wildcards are not allowed; name the exact issuer URL",
            ));
        }
        let https = pol.issuer.starts_with("https://") && pol.issuer.len() > "https://".len();
        let http_dev = s.ctx.dev && pol.issuer.starts_with("http://");
        if !https && !http_dev {
            return Err(invalid(s.at("issuer"), "must be an https:// URL"));
        }
        let jwks_path = s.ctx.abs(pol.jwks_file.clone());
        let bytes = std::fs::read(&jwks_path)
            .map_err(|e| invalid(s.at("jwks_file"), format!("{}: {e}", jwks_path.display())))?;
        let jwks = Jwks::parse(&bytes)
            .map_err(|e| invalid(s.at("jwks_file"), format!("{}: {e}", jwks_path.display())))?;
        for (claim, pattern) in &pol.bound_claims {
            if pattern.is_empty() {
                return Err(invalid(
                    s.at(&format!("bound_claims.{claim}")),
                    "must not be empty",
                ));
            }
        }
        claim_mappings(&s)?;
        let policy = TrustPolicy {
            name: pol.name.clone(),
            issuer: pol.issuer.clone(),
            jwks,
            enabled: pol.enabled,
            keep_sessions: false,
            bound_claims: pol.bound_claims.clone(),
            provider: pol.provider,
            claim_mappings: pol.claim_mappings.clone(),
            max_token_lifetime_seconds: pol.max_token_lifetime_seconds,
            allow_unbound: pol.allow_unbound,
        };
        // No open policy: without an owner bound, any repository on the issuer that asks for
        // this (guessable) audience would enroll.
        if !policy.binds_owner() && !policy.allow_unbound {
            let owners = policy.provider.owner_claims();
            return Err(invalid(
                s.at("bound_claims"),
                format!(
                    "binds no owner: with provider = \"{}\" bind {}, or any job on {} that \
                     asks for this audience enrolls; allow_unbound = true if that is meant",
                    policy.provider.as_str(),
                    if owners.is_empty() {
                        "at least one claim (not to a bare `*`)".to_string()
                    } else {
                        format!("{} to an exact value", owners.join(" or "))
                    },
                    policy.issuer
                ),
            ));
        }
        Ok(policy)
    }
}

/// A generic provider names the claims that hold repository and ref; the others have fixed
/// mappings.
fn claim_mappings(s: &In<'_, &RawPolicy>) -> Result<(), ConfigError> {
    let pol = s.raw;
    match pol.provider {
        Provider::Generic => {
            for need in ["repository", "ref"] {
                if !pol.claim_mappings.contains_key(need) {
                    return Err(invalid(
                        s.at(&format!("claim_mappings.{need}")),
                        "a generic provider names the claim that holds it",
                    ));
                }
            }
            for (field, claim) in &pol.claim_mappings {
                if !JOB_FIELDS.contains(&field.as_str()) {
                    return Err(invalid(
                        s.at(&format!("claim_mappings.{field}")),
                        format!("not a mapped field (one of {})", JOB_FIELDS.join(", ")),
                    ));
                }
                if claim.is_empty() {
                    return Err(invalid(
                        s.at(&format!("claim_mappings.{field}")),
                        "must name a claim",
                    ));
                }
            }
            Ok(())
        }
        _ if !pol.claim_mappings.is_empty() => Err(invalid(
            s.at("claim_mappings"),
            "only for provider = \"generic\" (the others have fixed mappings)",
        )),
        _ => Ok(()),
    }
}
