//! Ops: issuer lifecycle, revocation, trust policies, keys and reload — typed, transport-free.
//!
//! Every change is audited with the operator's identity, made durable, and swapped into the
//! running site without a restart. What ops change is kept in the store as overlays on the file
//! configuration ([`PolicyOverlay`], [`KeyMeta`], [`RevocationRule`]), so it survives restarts
//! and a SIGHUP reload of the file keeps it.

use std::collections::BTreeMap;

use meshsign_proto::identity::is_valid_fingerprint;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::audit::{AuditError, AuditRecord};
use crate::config::{AccessRule, KeyAlgorithm, KeySpec, SiteConfig, is_name};
use crate::enroll::CertRecord;
use crate::issuer::{IssueError, IssuerRecord, IssuerState, PartitionIssuers, RunnerCa};
use crate::jwt::Jwks;
use crate::sign::{CustodyError, KeyRing, backend_from_pkcs8, create_key, store_key};
use crate::site::{SiteError, SiteState};
use crate::store::{StoreError, Tree};

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
    /// Parses an ops certificate of `trust_domain`.
    pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Self, OpsError> {
        let bad = |m: &str| OpsError::Unauthenticated(m.to_string());
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|_| bad("certificate does not parse"))?;
        let uri = crate::authz::only_uri_san(&cert)
            .ok_or_else(|| bad("an ops certificate has exactly one URI SAN"))?;
        let rest = uri
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(trust_domain))
            .and_then(|r| r.strip_prefix("/ops/"))
            .ok_or_else(|| bad("not an ops identity of this trust domain"))?;
        let role = match rest.split_once('/') {
            Some(("admin", n)) if !n.is_empty() && !n.contains('/') => Role::Admin,
            Some(("auditor", n)) if !n.is_empty() && !n.contains('/') => Role::Auditor,
            _ => return Err(bad("ops role must be admin or auditor")),
        };
        Ok(Self {
            id: uri.to_string(),
            role,
        })
    }
}

/// Why an ops request was refused. [`OpsError::check`] is the audit reason.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Not an ops identity.
    #[error("operator: {0}")]
    Unauthenticated(String),
    /// The role may not do this.
    #[error("role: `{operator}` is an auditor and may not change anything")]
    Forbidden {
        /// Operator ID.
        operator: String,
    },
    /// A named thing does not exist.
    #[error("not_found: {0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The state does not allow it.
    #[error("precondition: {0}")]
    Precondition(String),
    /// Key custody failed (internal).
    #[error("key custody failed")]
    Custody(#[from] CustodyError),
    /// Issuer setup failed (internal).
    #[error("issuer setup failed")]
    Issue(#[from] IssueError),
    /// Storage failed (internal).
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// Applying the change to the running site failed (internal).
    #[error("applying the change failed")]
    Site(#[from] SiteError),
    /// The audit record could not be written; the change was not made.
    #[error("audit unavailable")]
    Audit(#[from] AuditError),
}

impl OpsError {
    /// The audit reason.
    pub fn check(&self) -> &'static str {
        match self {
            OpsError::Unauthenticated(_) => "operator",
            OpsError::Forbidden { .. } => "role",
            OpsError::NotFound(_) => "not_found",
            OpsError::Invalid(_) => "invalid",
            OpsError::Precondition(_) => "precondition",
            OpsError::Custody(_) | OpsError::Issue(_) | OpsError::Store(_) | OpsError::Site(_) => {
                "internal"
            }
            OpsError::Audit(_) => "audit_unavailable",
        }
    }
}

/// Checks the role, runs an ops action (changes under the ops lock), and audits it either way,
/// reads included: the record names the operator.
/// The audit record is written after the change; a change whose record cannot be written is
/// reported as failed (the record of the attempt is what matters to an auditor).
pub async fn audited<T>(
    site: &SiteState,
    op: &Operator,
    rpc: &'static str,
    environment: &str,
    write: bool,
    f: impl AsyncFnOnce() -> Result<(T, String), OpsError>,
) -> Result<T, OpsError> {
    let result = if write && op.role != Role::Admin {
        Err(OpsError::Forbidden {
            operator: op.id.clone(),
        })
    } else if write {
        let _guard = site.ops_lock.lock().await;
        f().await
    } else {
        f().await
    };
    let mut rec = AuditRecord {
        rpc: format!("Admin.{rpc}"),
        environment: if environment.is_empty() {
            "(site)".into()
        } else {
            environment.to_string()
        },
        operator: op.id.clone(),
        subject: op.id.clone(),
        ..Default::default()
    };
    match &result {
        Ok((_, detail)) => {
            rec.decision = "allow".into();
            rec.reason = "ok".into();
            rec.detail = detail.clone();
        }
        Err(e) => {
            rec.decision = "deny".into();
            rec.reason = e.check().into();
            rec.detail = e.to_string().chars().take(200).collect();
        }
    }
    site.audit.record(rec).await?;
    result.map(|(t, _)| t)
}

fn partition_exists(site: &SiteState, env: &str) -> Result<(), OpsError> {
    site.config()
        .partition(env)
        .map(|_| ())
        .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))
}

// === issuers ===

fn reload_issuers(site: &SiteState, partition: &str) -> Result<(), OpsError> {
    let cfg = site.config();
    let pi = PartitionIssuers::load_or_create(
        &site.store,
        &site.kek,
        &cfg.trust_domain,
        &cfg.region,
        partition,
        site.clock.unix(),
    )?;
    site.set_issuers(partition, pi)?;
    Ok(())
}

fn save_issuer(site: &SiteState, rec: &IssuerRecord) -> Result<(), OpsError> {
    site.store.put(Tree::Issuers, &rec.store_key(), rec)?;
    site.store.flush()?;
    Ok(())
}

/// Every runner CA of a partition, oldest first.
pub fn list_issuers(site: &SiteState, env: &str) -> Result<Vec<IssuerRecord>, OpsError> {
    partition_exists(site, env)?;
    Ok(site.issuers(env)?.records.clone())
}

fn find_issuer(site: &SiteState, env: &str, id: &str) -> Result<IssuerRecord, OpsError> {
    list_issuers(site, env)?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| OpsError::NotFound(format!("issuer `{id}` in `{env}`")))
}

/// Makes a new runner CA that the sign port trusts at once but that does not issue yet.
pub fn stage_issuer(site: &SiteState, env: &str) -> Result<(IssuerRecord, String), OpsError> {
    if list_issuers(site, env)?
        .iter()
        .any(|r| r.state == IssuerState::Staged)
    {
        return Err(OpsError::Precondition(
            "an issuer is already staged; activate or retire it first".into(),
        ));
    }
    let cfg = site.config();
    let ca = RunnerCa::create(
        &site.store,
        &site.kek,
        &cfg.trust_domain,
        &cfg.region,
        env,
        IssuerState::Staged,
        site.clock.unix(),
    )?;
    reload_issuers(site, env)?;
    let detail = format!("staged issuer {}", ca.record.id);
    Ok((ca.record, detail))
}

/// The latest `not_after` of the certificates an issuer minted (now if none).
fn last_expiry(site: &SiteState, issuer_id: &str) -> Result<i64, OpsError> {
    let certs: Vec<CertRecord> = site.store.scan(Tree::Certs, b"")?;
    Ok(certs
        .iter()
        .filter(|c| c.issuer_id == issuer_id)
        .map(|c| c.not_after)
        .max()
        .unwrap_or(0)
        .max(site.clock.unix()))
}

/// Makes a staged issuer the one that issues; the previous one becomes retiring and stays
/// trusted until the last certificate it issued expires.
pub fn activate_issuer(
    site: &SiteState,
    env: &str,
    id: &str,
) -> Result<(IssuerRecord, String), OpsError> {
    let records = list_issuers(site, env)?;
    let mut target = if id.is_empty() {
        let staged: Vec<_> = records
            .iter()
            .filter(|r| r.state == IssuerState::Staged)
            .collect();
        match staged.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(OpsError::Precondition(
                    "no staged issuer; stage one first".into(),
                ));
            }
            _ => {
                return Err(OpsError::Invalid(
                    "several staged issuers; name one with --id".into(),
                ));
            }
        }
    } else {
        find_issuer(site, env, id)?
    };
    if target.state != IssuerState::Staged {
        return Err(OpsError::Precondition(format!(
            "issuer {} is {:?}, not staged",
            target.id, target.state
        )));
    }
    let mut detail = format!("activated issuer {}", target.id);
    if let Some(mut old) = records.into_iter().find(|r| r.state == IssuerState::Active) {
        old.state = IssuerState::Retiring;
        old.retire_after = Some(last_expiry(site, &old.id)?);
        save_issuer(site, &old)?;
        detail.push_str(&format!("; {} retiring", old.id));
    }
    target.state = IssuerState::Active;
    save_issuer(site, &target)?;
    reload_issuers(site, env)?;
    Ok((target, detail))
}

/// Retires a staged or retiring issuer now: the sign port stops trusting it.
pub fn retire_issuer(
    site: &SiteState,
    env: &str,
    id: &str,
) -> Result<(IssuerRecord, String), OpsError> {
    let mut rec = find_issuer(site, env, id)?;
    match rec.state {
        IssuerState::Staged | IssuerState::Retiring => {}
        IssuerState::Active => {
            return Err(OpsError::Precondition(
                "the active issuer cannot retire; activate another first".into(),
            ));
        }
        s => {
            return Err(OpsError::Precondition(format!(
                "issuer {id} is already {s:?}"
            )));
        }
    }
    rec.state = IssuerState::Retired;
    save_issuer(site, &rec)?;
    reload_issuers(site, env)?;
    Ok((rec, format!("retired issuer {id}")))
}

/// Distrusts an issuer at once. Revoking the active issuer activates a fresh one, so the
/// partition always has exactly one.
pub fn revoke_issuer(
    site: &SiteState,
    env: &str,
    id: &str,
    reason: &str,
) -> Result<(IssuerRecord, String), OpsError> {
    let mut rec = find_issuer(site, env, id)?;
    if rec.state == IssuerState::Revoked {
        return Err(OpsError::Precondition(format!(
            "issuer {id} is already revoked"
        )));
    }
    let was_active = rec.state == IssuerState::Active;
    rec.state = IssuerState::Revoked;
    save_issuer(site, &rec)?;
    let mut detail = format!("revoked issuer {id}: {reason}");
    if was_active {
        let cfg = site.config();
        let ca = RunnerCa::create(
            &site.store,
            &site.kek,
            &cfg.trust_domain,
            &cfg.region,
            env,
            IssuerState::Active,
            site.clock.unix(),
        )?;
        detail.push_str(&format!("; activated new issuer {}", ca.record.id));
    }
    reload_issuers(site, env)?;
    Ok((rec, detail))
}

/// Audit retention (housekeeping): prunes what `[audit] retention_days` allows, and audits it.
pub async fn prune_audit(site: &SiteState) -> Result<Option<(u64, u64)>, OpsError> {
    let days = site.config().audit.retention_days;
    if days == 0 {
        return Ok(None);
    }
    let pruned = site.audit.prune(site.clock.unix(), (days * 86400) as i64)?;
    if let Some((a, b)) = pruned {
        let rec = AuditRecord {
            rpc: "AuditRetention".into(),
            decision: "allow".into(),
            reason: "ok".into(),
            environment: "(site)".into(),
            detail: format!(
                "pruned entries {a}..={b} (exported and checkpointed, older than {days} days)"
            ),
            ..Default::default()
        };
        site.audit.record(rec).await?;
    }
    Ok(pruned)
}

/// Retires every retiring issuer whose last certificate has expired (housekeeping).
pub async fn retire_expired(site: &SiteState) -> Result<usize, OpsError> {
    let now = site.clock.unix();
    let mut n = 0;
    for p in site.config().partitions.iter() {
        let due: Vec<IssuerRecord> = site
            .issuers(&p.name)?
            .records
            .iter()
            .filter(|r| {
                r.state == IssuerState::Retiring && r.retire_after.is_some_and(|t| t <= now)
            })
            .cloned()
            .collect();
        for mut r in due {
            let _guard = site.ops_lock.lock().await;
            r.state = IssuerState::Retired;
            save_issuer(site, &r)?;
            reload_issuers(site, &p.name)?;
            tracing::info!(partition = %p.name, issuer = %r.id, "retiring issuer retired: its last certificate expired");
            n += 1;
        }
    }
    Ok(n)
}

// === revocation ===

/// What a revocation rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// One certificate.
    Serial,
    /// Every certificate minted for a CI job.
    JobId,
    /// Every certificate of a runner machine.
    Fingerprint,
}

/// A persistent revocation rule, checked on every sign-port RPC (and at enrollment for job and
/// fingerprint rules without an end).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRule {
    /// Random id.
    pub id: String,
    /// Kind.
    pub kind: RevocationKind,
    /// Serial (hex), job id or fingerprint.
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
}

impl RevocationRule {
    /// Whether the rule covers an issued certificate.
    pub fn matches(&self, c: &CertRecord) -> bool {
        let issued = c.not_before + 60;
        let hit = match self.kind {
            RevocationKind::Serial => c.serial == self.value,
            RevocationKind::JobId => c.claims.job_id == self.value,
            RevocationKind::Fingerprint => c.fingerprint == self.value,
        };
        hit && self.region.as_ref().is_none_or(|r| *r == c.region)
            && self.since.is_none_or(|s| issued >= s)
            && self.until.is_none_or(|u| issued <= u)
    }
}

/// Loads every rule.
pub fn load_revocations(store: &crate::store::Store) -> Result<Vec<RevocationRule>, StoreError> {
    store.scan(Tree::Revocations, b"")
}

/// Why a certificate is revoked, if it is.
pub fn revocation_of(site: &SiteState, c: &CertRecord) -> Option<String> {
    if let Some(r) = &c.revoked {
        return Some(r.clone());
    }
    site.revocations()
        .iter()
        .find(|r| r.matches(c))
        .map(|r| format!("{}: {}", r.id, r.reason))
}

/// A revocation request in typed form.
#[derive(Clone, Debug)]
pub struct RevokeInput {
    /// Kind.
    pub kind: RevocationKind,
    /// Value.
    pub value: String,
    /// Region filter.
    pub region: Option<String>,
    /// Issued at or after.
    pub since: Option<i64>,
    /// Issued at or before.
    pub until: Option<i64>,
    /// Why (required).
    pub reason: String,
}

/// Adds a revocation rule; returns it and the serials of issued certificates it matches.
pub fn revoke(
    site: &SiteState,
    op: &Operator,
    r: RevokeInput,
) -> Result<((RevocationRule, Vec<String>), String), OpsError> {
    if r.reason.trim().is_empty() {
        return Err(OpsError::Invalid("--reason is required".into()));
    }
    let ok = match r.kind {
        RevocationKind::Serial => {
            !r.value.is_empty() && r.value.bytes().all(|b| b.is_ascii_hexdigit())
        }
        RevocationKind::JobId => !r.value.is_empty() && r.value.len() <= 256,
        RevocationKind::Fingerprint => is_valid_fingerprint(&r.value),
    };
    if !ok {
        return Err(OpsError::Invalid(format!(
            "malformed {:?} `{}`",
            r.kind, r.value
        )));
    }
    let rule = RevocationRule {
        id: meshsign_certs_dev::random_id().map_err(|_| CustodyError::Crypto("rng"))?[..12]
            .to_string(),
        kind: r.kind,
        // Serials are compared in lowercase hex (fingerprints are validated lowercase already).
        value: if r.kind == RevocationKind::Serial {
            r.value.to_ascii_lowercase()
        } else {
            r.value
        },
        region: r.region.filter(|s| !s.is_empty()),
        since: r.since,
        until: r.until,
        reason: r.reason,
        operator: op.id.clone(),
        created_at: site.clock.unix(),
    };
    site.store
        .put(Tree::Revocations, rule.id.as_bytes(), &rule)?;
    site.store.flush()?;
    let mut rules = (*site.revocations()).clone();
    rules.push(rule.clone());
    *site.revocations.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(rules);
    let certs: Vec<CertRecord> = site.store.scan(Tree::Certs, b"")?;
    let serials: Vec<String> = certs
        .iter()
        .filter(|c| rule.matches(c))
        .map(|c| c.serial.clone())
        .collect();
    let detail = format!(
        "revocation {} {:?}={} matched {} certificate(s)",
        rule.id,
        rule.kind,
        rule.value,
        serials.len()
    );
    Ok(((rule, serials), detail))
}

/// Revokes the caller's own certificate (runner teardown).
pub async fn revoke_self(site: &SiteState, serial: &str, reason: &str) -> Result<(), OpsError> {
    let _guard = site.ops_lock.lock().await;
    let mut rec: CertRecord = site
        .store
        .get(Tree::Certs, serial.as_bytes())?
        .ok_or_else(|| OpsError::NotFound(format!("certificate {serial}")))?;
    rec.revoked = Some(format!(
        "revoked by its holder: {}",
        reason.chars().take(200).collect::<String>()
    ));
    site.store.put(Tree::Certs, serial.as_bytes(), &rec)?;
    site.cert_cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .invalidate(serial);
    site.store.flush()?;
    Ok(())
}

// === trust policies ===

/// Ops state of a trust policy, overlaid on the file configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyOverlay {
    /// Enabled?
    pub enabled: bool,
    /// When disabled, may its certificates keep signing?
    pub keep_sessions: bool,
    /// A JWKS pinned by ops, replacing the file's.
    pub jwks_json: Option<String>,
}

/// Ops state of a signing key alias.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Algorithm.
    pub algorithm: KeyAlgorithm,
    /// Access rule (used when the alias is not in the file).
    pub access: AccessRule,
    /// Disabled?
    pub disabled: bool,
    /// Purposes (used when the alias is not in the file).
    #[serde(default = "crate::config::default_purposes")]
    pub purposes: Vec<crate::config::Purpose>,
}

/// The file configuration with the store's ops overlays applied.
pub fn effective_config(
    mut cfg: SiteConfig,
    store: &crate::store::Store,
) -> Result<SiteConfig, SiteError> {
    for p in cfg.partitions.iter_mut() {
        for pol in p.trust_policies.iter_mut() {
            let key = format!("{}/{}", p.name, pol.name);
            if let Some(o) = store.get::<PolicyOverlay>(Tree::Policies, key.as_bytes())? {
                pol.enabled = o.enabled;
                pol.keep_sessions = o.keep_sessions;
                if let Some(j) = &o.jwks_json {
                    pol.jwks = Jwks::parse(j.as_bytes())
                        .map_err(|e| SiteError::Overlay(format!("{key}: {e}")))?;
                }
            }
        }
        let metas = store
            .kv()
            .scan_prefix(Tree::KeyMeta, format!("{}/", p.name).as_bytes())?;
        for (k, v) in metas {
            let alias = String::from_utf8_lossy(&k[p.name.len() + 1..]).into_owned();
            let meta: KeyMeta = serde_json::from_slice(&v)
                .map_err(|e| SiteError::Overlay(format!("key {alias}: {e}")))?;
            match p.signing_keys.iter_mut().find(|s| s.alias == alias) {
                Some(spec) => spec.disabled = meta.disabled,
                None => p.signing_keys.push(KeySpec {
                    alias,
                    algorithm: meta.algorithm,
                    access: meta.access,
                    disabled: meta.disabled,
                    purposes: meta.purposes,
                }),
            }
        }
    }
    Ok(cfg)
}

/// Re-reads the file configuration (SIGHUP). Trust policies and key access rules change;
/// identity, listeners, storage and the set of partitions need a restart and are refused.
pub fn reload(site: &SiteState, file: SiteConfig) -> Result<String, OpsError> {
    let cur = site.config();
    let names = |c: &SiteConfig| {
        c.partitions
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    if file.trust_domain != cur.trust_domain
        || file.region != cur.region
        || file.data_dir != cur.data_dir
        || file.kek_file != cur.kek_file
        || file.listen.enroll != cur.listen.enroll
        || file.listen.sign != cur.listen.sign
        || file.listen.admin != cur.listen.admin
        || file.store_cache_mib != cur.store_cache_mib
        || file.audit != cur.audit
        || names(&file) != names(&cur)
    {
        return Err(OpsError::Precondition(
            "trust_domain, region, data_dir, kek_file, listen, [store], [audit] and the partition list need a restart".into(),
        ));
    }
    let cfg = effective_config(file, &site.store)?;
    let keys = KeyRing::load_or_create(&cfg, &site.store, &site.kek, site.clock.unix())?;
    site.set_keys(keys);
    site.set_config(cfg);
    Ok("configuration reloaded".into())
}

fn policy_index(cfg: &SiteConfig, env: &str, issuer: &str) -> Result<(usize, usize), OpsError> {
    let pi = cfg
        .partitions
        .iter()
        .position(|p| p.name == env)
        .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
    let ti = cfg.partitions[pi]
        .trust_policies
        .iter()
        .position(|t| t.issuer == issuer)
        .ok_or_else(|| {
            OpsError::NotFound(format!("no trust policy for issuer `{issuer}` in `{env}`"))
        })?;
    Ok((pi, ti))
}

fn save_policy(
    site: &SiteState,
    cfg: &SiteConfig,
    pi: usize,
    ti: usize,
    jwks_json: Option<String>,
) -> Result<(), OpsError> {
    let p = &cfg.partitions[pi];
    let t = &p.trust_policies[ti];
    let key = format!("{}/{}", p.name, t.name);
    let prev: Option<PolicyOverlay> = site.store.get(Tree::Policies, key.as_bytes())?;
    let overlay = PolicyOverlay {
        enabled: t.enabled,
        keep_sessions: t.keep_sessions,
        jwks_json: jwks_json.or(prev.and_then(|p| p.jwks_json)),
    };
    site.store.put(Tree::Policies, key.as_bytes(), &overlay)?;
    site.store.flush()?;
    Ok(())
}

/// Enables or disables a trust policy. Disabling refuses new enrollments from it and, unless
/// `keep_sessions`, every sign call from certificates it minted — on open connections too.
pub fn set_policy_enabled(
    site: &SiteState,
    env: &str,
    issuer: &str,
    enabled: bool,
    keep_sessions: bool,
) -> Result<(crate::config::TrustPolicy, String), OpsError> {
    let mut cfg = (*site.config()).clone();
    let (pi, ti) = policy_index(&cfg, env, issuer)?;
    let t = &mut cfg.partitions[pi].trust_policies[ti];
    t.enabled = enabled;
    t.keep_sessions = !enabled && keep_sessions;
    let out = t.clone();
    save_policy(site, &cfg, pi, ti, None)?;
    site.set_config(cfg);
    let detail = format!(
        "trust policy {} ({issuer}) {}",
        out.name,
        if enabled {
            "enabled"
        } else if keep_sessions {
            "disabled, sessions kept"
        } else {
            "disabled"
        }
    );
    Ok((out, detail))
}

/// Pins a new JWKS for a policy (public keys only). A kid not in it is denied from now on.
pub fn set_jwks(
    site: &SiteState,
    env: &str,
    issuer: &str,
    jwks_json: &[u8],
) -> Result<(crate::config::TrustPolicy, String), OpsError> {
    let jwks = Jwks::parse(jwks_json).map_err(|e| OpsError::Invalid(format!("jwks: {e}")))?;
    let text = String::from_utf8(jwks_json.to_vec())
        .map_err(|_| OpsError::Invalid("jwks: not UTF-8".into()))?;
    if text.contains("\"d\"") {
        return Err(OpsError::Invalid(
            "jwks: contains private key material (`d`); pin public keys only".into(),
        ));
    }
    let mut cfg = (*site.config()).clone();
    let (pi, ti) = policy_index(&cfg, env, issuer)?;
    let kids: Vec<String> = jwks.keys.iter().map(|k| k.kid.clone()).collect();
    cfg.partitions[pi].trust_policies[ti].jwks = jwks;
    let out = cfg.partitions[pi].trust_policies[ti].clone();
    save_policy(site, &cfg, pi, ti, Some(text))?;
    site.set_config(cfg);
    Ok((
        out.clone(),
        format!(
            "pinned JWKS for {} ({issuer}): kids {}",
            out.name,
            kids.join(",")
        ),
    ))
}

// === keys ===

fn save_meta(site: &SiteState, env: &str, spec: &KeySpec) -> Result<(), OpsError> {
    let meta = KeyMeta {
        algorithm: spec.algorithm,
        access: spec.access.clone(),
        disabled: spec.disabled,
        purposes: spec.purposes.clone(),
    };
    site.store.put(
        Tree::KeyMeta,
        format!("{env}/{}", spec.alias).as_bytes(),
        &meta,
    )?;
    site.store.flush()?;
    Ok(())
}

fn reload_alias(site: &SiteState, env: &str, alias: &str) -> Result<(), OpsError> {
    let mut ring = (*site.keys()).clone();
    ring.reload_alias(&site.store, &site.kek, env, alias)?;
    site.set_keys(ring);
    Ok(())
}

/// Parses purpose names; empty means the default (digest, message).
pub fn parse_purposes(names: &[String]) -> Result<Vec<crate::config::Purpose>, OpsError> {
    use crate::config::Purpose;
    if names.is_empty() {
        return Ok(crate::config::default_purposes());
    }
    names
        .iter()
        .map(|n| match n.as_str() {
            "digest" => Ok(Purpose::Digest),
            "message" => Ok(Purpose::Message),
            "apple-cms" => Ok(Purpose::AppleCms),
            other => Err(OpsError::Invalid(format!(
                "purpose `{other}` (digest, message, apple-cms)"
            ))),
        })
        .collect()
}

fn access_rule(repositories: Vec<String>, refs: Vec<String>) -> Result<AccessRule, OpsError> {
    if repositories.is_empty()
        || refs.is_empty()
        || repositories.iter().chain(&refs).any(String::is_empty)
    {
        return Err(OpsError::Invalid(
            "give --repository and --ref patterns (\"*\" for any)".into(),
        ));
    }
    Ok(AccessRule { repositories, refs })
}

fn add_spec(site: &SiteState, env: &str, spec: KeySpec) -> Result<(), OpsError> {
    let mut cfg = (*site.config()).clone();
    let p = cfg
        .partitions
        .iter_mut()
        .find(|p| p.name == env)
        .ok_or_else(|| OpsError::NotFound(format!("environment `{env}`")))?;
    match p.signing_keys.iter_mut().find(|s| s.alias == spec.alias) {
        Some(s) => *s = spec.clone(),
        None => p.signing_keys.push(spec.clone()),
    }
    save_meta(site, env, &spec)?;
    site.set_config(cfg);
    Ok(())
}

fn spec_of(site: &SiteState, env: &str, alias: &str) -> Result<KeySpec, OpsError> {
    partition_exists(site, env)?;
    site.config()
        .partition(env)
        .and_then(|p| p.key(alias))
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))
}

/// Creates a new key alias (v1).
pub fn create_key_alias(
    site: &SiteState,
    env: &str,
    alias: &str,
    algorithm: &str,
    access: (Vec<String>, Vec<String>),
    purposes: &[String],
) -> Result<(KeySpec, String), OpsError> {
    partition_exists(site, env)?;
    if !is_name(alias) {
        return Err(OpsError::Invalid(format!(
            "alias `{alias}`: lowercase letters, digits, '-' or '_'"
        )));
    }
    if spec_of(site, env, alias).is_ok() {
        return Err(OpsError::Precondition(format!(
            "key `{alias}` exists; rotate it instead"
        )));
    }
    let algorithm = KeyAlgorithm::parse(algorithm)
        .ok_or_else(|| OpsError::Invalid(format!("unsupported algorithm `{algorithm}`")))?;
    let spec = KeySpec {
        alias: alias.to_string(),
        algorithm,
        access: access_rule(access.0, access.1)?,
        disabled: false,
        purposes: parse_purposes(purposes)?,
    };
    create_key(
        &site.store,
        &site.kek,
        env,
        alias,
        algorithm,
        1,
        site.clock.unix(),
    )?;
    add_spec(site, env, spec.clone())?;
    reload_alias(site, env, alias)?;
    Ok((spec, format!("created key {alias}@v1")))
}

fn next_version(site: &SiteState, env: &str, alias: &str) -> u32 {
    site.keys()
        .versions(env, alias)
        .and_then(|v| v.last())
        .map(|k| k.record.version + 1)
        .unwrap_or(1)
}

/// Adds `alias@vN+1`, which signs from then on; older versions stay verifiable.
pub fn rotate_key(site: &SiteState, env: &str, alias: &str) -> Result<(KeySpec, String), OpsError> {
    let spec = spec_of(site, env, alias)?;
    let v = next_version(site, env, alias);
    create_key(
        &site.store,
        &site.kek,
        env,
        alias,
        spec.algorithm,
        v,
        site.clock.unix(),
    )?;
    reload_alias(site, env, alias)?;
    Ok((spec, format!("rotated {alias} to v{v}")))
}

/// Disables an alias: it no longer signs; its versions stay in the verification material.
pub fn disable_key(
    site: &SiteState,
    env: &str,
    alias: &str,
) -> Result<(KeySpec, String), OpsError> {
    let mut spec = spec_of(site, env, alias)?;
    spec.disabled = true;
    add_spec(site, env, spec.clone())?;
    Ok((spec, format!("disabled key {alias}")))
}

/// Imports a PKCS#8 PEM key (P-256 or RSA) as a new version of `alias` (or its v1), with an
/// optional certificate chain. One-way: nothing returns it.
pub fn import_key(
    site: &SiteState,
    env: &str,
    alias: &str,
    pem: &[u8],
    chain_pem: &[u8],
    access: (Vec<String>, Vec<String>),
    purposes: &[String],
) -> Result<(KeySpec, String), OpsError> {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject as _;
    partition_exists(site, env)?;
    if !is_name(alias) {
        return Err(OpsError::Invalid(format!(
            "alias `{alias}`: lowercase letters, digits, '-' or '_'"
        )));
    }
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
        .map_err(|_| OpsError::Invalid("not a PKCS#8 PEM private key".into()))?;
    let pkcs8 = der.secret_pkcs8_der();
    // The alias's algorithm decides; a new alias takes P-256, or RSA PKCS#1 v1.5 of the key's size.
    let existing = spec_of(site, env, alias).ok();
    let backend = match &existing {
        Some(s) => backend_from_pkcs8(s.algorithm, pkcs8).map_err(|_| {
            OpsError::Invalid(format!("the key is not a {} key", s.algorithm.as_str()))
        })?,
        None => {
            let guesses = [
                KeyAlgorithm::EcdsaP256Sha256,
                KeyAlgorithm::Rsa2048Pkcs1Sha256,
                KeyAlgorithm::Rsa3072Pkcs1Sha256,
                KeyAlgorithm::Rsa4096Pkcs1Sha256,
            ];
            guesses
                .into_iter()
                .find_map(|a| backend_from_pkcs8(a, pkcs8).ok())
                .ok_or_else(|| {
                    OpsError::Invalid(
                        "only P-256 and RSA 2048/3072/4096 keys can be imported".into(),
                    )
                })?
        }
    };
    let spec = match existing {
        Some(s) => s,
        None => KeySpec {
            alias: alias.to_string(),
            algorithm: backend.algorithm(),
            access: access_rule(access.0, access.1)?,
            disabled: false,
            purposes: parse_purposes(purposes)?,
        },
    };
    let v = next_version(site, env, alias);
    store_key(
        &site.store,
        &site.kek,
        env,
        alias,
        v,
        &*backend,
        pkcs8,
        site.clock.unix(),
    )?;
    add_spec(site, env, spec.clone())?;
    reload_alias(site, env, alias)?;
    if !chain_pem.is_empty() {
        set_key_certificate(site, env, alias, chain_pem)?;
    }
    Ok((
        spec,
        format!(
            "imported {alias}@v{v}{}",
            if chain_pem.is_empty() {
                ""
            } else {
                " with its certificate chain"
            }
        ),
    ))
}

/// Every key spec of a partition.
pub fn list_keys(site: &SiteState, env: &str) -> Result<Vec<KeySpec>, OpsError> {
    partition_exists(site, env)?;
    Ok(site
        .config()
        .partition(env)
        .map(|p| p.signing_keys.clone())
        .unwrap_or_default())
}

/// Per-issuer counts for listings: issuer id → certificates issued.
pub fn issued_counts(site: &SiteState) -> Result<BTreeMap<String, usize>, OpsError> {
    let certs: Vec<CertRecord> = site.store.scan(Tree::Certs, b"")?;
    let mut m = BTreeMap::new();
    for c in certs {
        *m.entry(c.issuer_id).or_insert(0) += 1;
    }
    Ok(m)
}

// === signing identities (certificates on site-held keys) ===

/// Lets rcgen sign (a CSR) with a site-held key through [`crate::sign::SigningBackend`].
struct BackendSigner<'a> {
    backend: &'a dyn crate::sign::SigningBackend,
    key_bits: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for BackendSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.key_bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for BackendSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let d: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
            .as_ref()
            .try_into()
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        self.backend
            .sign_digest(&d)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Subject of a key CSR.
#[derive(Clone, Debug, Default)]
pub struct CsrSubject {
    /// CN.
    pub common_name: String,
    /// emailAddress (Apple asks for it).
    pub email: String,
    /// O.
    pub organization: String,
    /// C.
    pub country: String,
}

/// A PKCS#10 CSR (PEM) signed by the active version of a site-held key.
pub fn key_csr(
    site: &SiteState,
    env: &str,
    alias: &str,
    subject: &CsrSubject,
) -> Result<((String, String), String), OpsError> {
    use rcgen::{DnType, DnValue};
    spec_of(site, env, alias)?;
    let key = site
        .keys()
        .active(env, alias)
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))?;
    let alg = match key.backend.algorithm() {
        KeyAlgorithm::EcdsaP256Sha256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        a if a.is_pss() => {
            return Err(OpsError::Invalid(
                "CSRs are made for ECDSA and RSA PKCS#1 v1.5 keys".into(),
            ));
        }
        _ => &rcgen::PKCS_RSA_SHA256,
    };
    if subject.common_name.is_empty() {
        return Err(OpsError::Invalid("--common-name is required".into()));
    }
    let key_bits = meshsign_proto::der::spki_key(&key.record.public_key_der)
        .ok_or_else(|| OpsError::Invalid("stored public key is not an SPKI".into()))?
        .to_vec();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, subject.common_name.clone());
    if !subject.organization.is_empty() {
        dn.push(DnType::OrganizationName, subject.organization.clone());
    }
    if !subject.country.is_empty() {
        dn.push(DnType::CountryName, subject.country.clone());
    }
    if !subject.email.is_empty() {
        let ia5 = subject
            .email
            .clone()
            .try_into()
            .map_err(|_| OpsError::Invalid("email must be ASCII".into()))?;
        dn.push(
            DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
            DnValue::Ia5String(ia5),
        );
    }
    params.distinguished_name = dn;
    let signer = BackendSigner {
        backend: &*key.backend,
        key_bits,
        alg,
    };
    let csr = params
        .serialize_request(&signer)
        .map_err(|e| OpsError::Invalid(format!("csr: {e}")))?;
    let pem = meshsign_proto::pem_encode("CERTIFICATE REQUEST", csr.der());
    let key_id = key.record.key_id();
    Ok((
        (key_id.clone(), pem),
        format!("CSR for {key_id} (CN={})", subject.common_name),
    ))
}

/// Attaches a certificate chain to the active version of a key; the leaf must carry its key.
pub fn set_key_certificate(
    site: &SiteState,
    env: &str,
    alias: &str,
    chain_pem: &[u8],
) -> Result<(KeySpec, String), OpsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let spec = spec_of(site, env, alias)?;
    let key = site
        .keys()
        .active(env, alias)
        .cloned()
        .ok_or_else(|| OpsError::NotFound(format!("key `{alias}` in `{env}`")))?;
    let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(chain_pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| OpsError::Invalid(format!("chain: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| OpsError::Invalid("chain: no certificate".into()))?;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|_| OpsError::Invalid("chain: leaf does not parse".into()))?;
    if cert.public_key().raw != key.record.public_key_der.as_slice() {
        return Err(OpsError::Invalid(format!(
            "chain: the leaf certificate is not for {}",
            key.record.key_id()
        )));
    }
    for (i, c) in chain.iter().enumerate().skip(1) {
        X509Certificate::from_der(c)
            .map_err(|_| OpsError::Invalid(format!("chain: certificate {i} does not parse")))?;
    }
    let subject = cert.subject().to_string();
    let mut record = (*key.record).clone();
    record.certificate_chain = chain.clone();
    site.store.put(
        Tree::Keys,
        &crate::sign::KeyRecord::store_key_of(&record),
        &record,
    )?;
    site.store.flush()?;
    reload_alias(site, env, alias)?;
    let detail = format!("certificate for {} (subject {subject})", record.key_id());
    Ok((spec, detail))
}
