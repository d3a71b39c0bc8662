//! The site's shared state: what every request reads and ops change, over the store.
//!
//! Owns: [`SiteState`] — the effective configuration (file + ops overlays), the key ring, the
//! runner CAs of each environment, the revocation rules, the issuance records and their cache
//! ([`certs`]), the jti replay store ([`jti`]), the ops overlays ([`overlays`]), and the
//! revocation rules ([`revocations`]). What ops change is swapped whole behind locks.
//! Must not touch: tonic, TLS, listeners (transport lives in `api`, which registers a hook to
//! hear when the trusted runner CAs change), and no use case (`enroll`, `sign`, `ops`).

pub mod certs;
pub mod issuance;
pub mod jti;
pub mod keyring;
pub mod marker;
pub mod overlays;
pub mod records;
pub mod recovery;
pub mod revocations;
pub mod runners;
pub mod sessions;
pub mod snapshot;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::audit::journal::JOURNAL_FILE;
use crate::audit::{AuditError, AuditKey, AuditLog, AuditSettings, JournalAt};
use crate::ca::{CaError, RunnerCas};
use crate::clock::SharedClock;
use crate::config::SiteConfig;
use crate::custody::pool::SigningPool;
use crate::custody::{CustodyError, Kek};
use crate::model::RevocationRule;
use crate::store::{Store, StoreError, Tree};
use keyring::KeyRing;
use marker::{MarkerError, SiteMarker};

/// Failures opening or changing the site's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Key custody (KEK, unwrap).
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// Runner CA setup.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// An ops overlay in the store is invalid.
    #[error("stored ops state {key}: {message}")]
    Overlay {
        /// The overlay's store key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The environment has no runner CA (it is not configured).
    #[error("no runner CA for environment `{0}`")]
    NoRunnerCa(String),
    /// Something that cannot happen did (a fault of the site, logged under an error id).
    #[error("invariant broken: {0}")]
    Invariant(String),
    /// The signing pool's threads could not be started.
    #[error("cannot start the signing pool: {0}")]
    Pool(#[source] std::io::Error),
    /// The site marker cannot be read, or the KEK is not the site's.
    #[error(transparent)]
    Marker(#[from] MarkerError),
    /// The marker says a site was created here, and the store is empty.
    #[error(
        "the store {store} is empty, but {marker} says site {site_id} was created here: the \
             store was lost or damaged (or the config points at another one), and its keys, \
             runner CAs, replay store and revocations with it. Nothing was re-created. {fix}"
    )]
    StoreLost {
        /// The store: `in <data_dir>` (sled) or `at <url>` (PostgreSQL).
        store: String,
        /// The marker file.
        marker: std::path::PathBuf,
        /// The site it names.
        site_id: String,
        /// What to do, for this engine.
        fix: String,
    },
    /// The marker is another site's (the KEK does not open it, and the store names another
    /// site): a marker copied from elsewhere, or a folder mixed up.
    #[error(
        "{marker} is the marker of site {marker_site}, but the store holds site {store_site}: the \
             marker comes from another site's folder. Nothing was changed. Put this site's own \
             marker back (from its backup), or restore a snapshot into an empty folder \
             (meshsignd restore)"
    )]
    ForeignMarker {
        /// The marker file.
        marker: std::path::PathBuf,
        /// The site the marker names.
        marker_site: String,
        /// The site the store holds.
        store_site: String,
    },
    /// The folder's store holds a site's data and its marker is gone (deleted, or a restore
    /// was interrupted before it wrote it): never started on, never given a new identity.
    #[error(
        "the store {store} holds a site's data but its marker {marker} is missing (deleted, or \
             a restore was interrupted): meshsignd will not start on it, nor give it a new \
             identity or new runner CAs. Put the marker back, or restore a snapshot into an \
             empty folder (meshsignd restore)"
    )]
    MarkerMissing {
        /// Where the store is.
        store: String,
        /// The marker file that should be there.
        marker: std::path::PathBuf,
    },
    /// The store lost part of its data: it no longer names the site.
    #[error(
        "the store {store} lost part of its data: it no longer holds the site id that \
             {marker} names ({site_id}). Nothing was re-created. {fix}"
    )]
    StoreDamaged {
        /// The store.
        store: String,
        /// The marker file.
        marker: std::path::PathBuf,
        /// The site it names.
        site_id: String,
        /// What to do, for this engine.
        fix: String,
    },
    /// The store belongs to another site than the marker names.
    #[error(
        "the store {store} belongs to site {store_site}, but {marker} names site \
             {marker_site}: a store or marker was copied from elsewhere (or the config points at \
             another site's database); put the right one back"
    )]
    ForeignStore {
        /// The store.
        store: String,
        /// The marker file.
        marker: std::path::PathBuf,
        /// In the store.
        store_site: String,
        /// In the marker.
        marker_site: String,
    },
    /// Key versions or runner CAs the marker lists are gone from the store.
    #[error(
        "the store {store} no longer holds what {marker} says the site had: {missing}. \
             Nothing was re-created. {fix}"
    )]
    KeysLost {
        /// The store.
        store: String,
        /// The marker file.
        marker: std::path::PathBuf,
        /// The missing slots.
        missing: String,
        /// What to do, for this engine.
        fix: String,
    },
    /// The store's audit key is not the one the marker recorded.
    #[error("the audit key in the store is not the one {marker} recorded: the store was replaced")]
    AuditKeyMismatch {
        /// The marker file.
        marker: std::path::PathBuf,
    },
    /// The transport could not apply a change of the trusted runner CAs.
    #[error("sign port trust: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Called with the DER of every trusted runner CA whenever that set changes (the sign port
/// rebuilds its TLS configuration from it). Registered by the transport.
pub type RootsHook =
    Arc<dyn Fn(Vec<Vec<u8>>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// Everything the use cases share.
pub struct SiteState {
    config: RwLock<Arc<SiteConfig>>,
    /// The configuration as read from the file (before ops overlays): what a replica lays the
    /// shared overlays over again when another replica changed them.
    file_config: RwLock<Arc<SiteConfig>>,
    /// The shared store's ops generation this replica has loaded (`None`: not shared).
    seen_generation: std::sync::Mutex<Option<i64>>,
    /// Injected clock.
    pub clock: SharedClock,
    /// The wall clock held against the monotonic one (the replay store is pruned by the
    /// earlier of the two; steps are reported).
    pub wall_guard: crate::clock::WallGuard,
    /// Persistent state.
    pub store: Store,
    /// Audit log.
    pub audit: AuditLog,
    /// The site's Prometheus registry: decisions, refusals, latencies, audit gauges (the audit
    /// log, the listeners and housekeeping count into it; `api::metrics` renders it).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The KEK (ops wrap new keys under it) and the PKCS#11 token, if any.
    pub(crate) custodian: crate::custody::Custodian,
    keys: RwLock<Arc<KeyRing>>,
    runner_cas: RwLock<BTreeMap<String, Arc<RunnerCas>>>,
    revocations: RwLock<Arc<Vec<RevocationRule>>>,
    roots_hook: RwLock<Option<RootsHook>>,
    /// Serializes ops changes (each is read-modify-write of shared state).
    pub(crate) ops_lock: tokio::sync::Mutex<()>,
    /// Threads (one per core) that sign batches.
    pub(crate) signing_pool: SigningPool,
    /// Issuance records read by the per-RPC checks (see [`certs::CertCache`]).
    cert_cache: std::sync::Mutex<certs::CertCache>,
    /// The site marker (outside the store), kept in step with the keys and runner CAs.
    marker: std::sync::Mutex<Option<SiteMarker>>,
    /// The data folder.
    data_dir: std::path::PathBuf,
    /// Refusals counted into periodic summary entries instead of one write each.
    pub summaries: crate::audit::summary::Summaries,
    /// Enroll requests per source address (`[limits] enroll_per_source_*`).
    pub enroll_limiter: crate::limits::RateLimiter<std::net::IpAddr>,
    /// Sign-port requests per job (`[limits] sign_per_job_*`).
    pub sign_limiter: crate::limits::RateLimiter<(String, String)>,
    /// Refused enrollments written one by one, site-wide (`[limits] enroll_deny_entries_*`);
    /// the rest are counted into summary entries.
    pub enroll_deny_entries: crate::limits::RateLimiter<()>,
    /// Signature counts not yet in the store, per job shard; each shard's lock also serializes
    /// that shard's budget checks (read, check, count).
    pub(crate) usage: usage::Pending,
    /// This replica's last SIGHUP reload (for `admin status` and the metric).
    last_reload: RwLock<Option<Arc<crate::model::ReloadOutcome>>>,
}

impl std::fmt::Debug for SiteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteState")
            .field("region", &self.config().region)
            .finish_non_exhaustive()
    }
}

/// Reads the database password from `path`: the first line, refused if the file is readable by
/// group or others (outside dev mode). Never logged.
fn read_password(
    path: &std::path::Path,
    dev: bool,
) -> Result<zeroize::Zeroizing<String>, StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !dev && meta.permissions().mode() & 0o077 != 0 {
        return Err(io(std::io::Error::other(
            "readable by group or others: chmod 600 it (or deliver it as a systemd credential)",
        )));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    Ok(zeroize::Zeroizing::new(
        text.lines().next().unwrap_or("").to_string(),
    ))
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = v;
}

impl SiteState {
    /// Whether every key can sign now (false while the PKCS#11 token is gone).
    pub fn custody_available(&self) -> bool {
        self.custodian.available()
    }

    /// Opens the store, reads the KEK, loads (or creates) runner CAs and signing keys, and
    /// applies the ops overlays kept in the store to the file configuration.
    pub fn open(file_config: SiteConfig, clock: SharedClock) -> Result<Self, StateError> {
        let settings = AuditSettings {
            checkpoint_every: file_config.audit.checkpoint_every,
            checkpoint_interval: Duration::from_secs(file_config.audit.checkpoint_seconds),
            durable: file_config.audit.flush,
            ..Default::default()
        };
        Self::open_with(file_config, clock, settings, None)
    }

    /// [`SiteState::open`] with explicit audit settings and, optionally, another storage engine
    /// (fault injection in tests; another engine later).
    pub fn open_with(
        file_config: SiteConfig,
        clock: SharedClock,
        settings: AuditSettings,
        kv: Option<Arc<dyn crate::store::Kv>>,
    ) -> Result<Self, StateError> {
        let kek = Kek::load(&file_config.kek_file, file_config.dev)?;
        let token = file_config
            .pkcs11
            .as_ref()
            .map(|c| crate::custody::pkcs11::Token::open(c, file_config.dev))
            .transpose()?;
        let audit_backend = match &file_config.pkcs11 {
            Some(c) if c.audit_key => crate::custody::Backend::Pkcs11,
            _ => crate::custody::Backend::Software,
        };
        let custodian = crate::custody::Custodian {
            kek,
            token,
            runner_cas_in_token: file_config.pkcs11.as_ref().is_some_and(|p| p.runner_cas),
        };
        let data_dir = file_config.data_dir.clone();
        let journal = data_dir.join(JOURNAL_FILE);
        std::fs::create_dir_all(&data_dir).map_err(|source| StoreError::Io {
            path: data_dir.clone(),
            source,
        })?;
        let store = match (kv, &file_config.postgres) {
            (Some(kv), _) => Store::new(kv),
            (None, Some(pg)) => Store::new(Arc::new(crate::store::PgKv::open(
                crate::store::PgSettings {
                    url: pg.url.clone(),
                    password: pg
                        .password_file
                        .as_deref()
                        .map(|p| read_password(p, file_config.dev))
                        .transpose()?,
                    pool_size: pg.pool_size,
                    statement_timeout: pg.statement_timeout,
                    tls: pg
                        .ca_file
                        .as_deref()
                        .map(crate::store::postgres::tls_from_ca_file)
                        .transpose()?,
                },
            )?)),
            (None, None) => Store::open_sled(
                &data_dir,
                file_config.store_cache_mib.saturating_mul(1 << 20),
            )?,
        };
        // A shared engine (replicas on PostgreSQL) makes each group commit durable in the
        // database: there is no local journal.
        let shared = store.kv().chain().is_some();
        // Replicas starting together open the site one after the other: the first creates what
        // a new site needs, the others load it (never two keys for one alias, two audit keys).
        store.kv().begin_startup()?;
        let startup = store.clone();
        let opened = (|| -> Result<Self, StateError> {
            let now = clock.unix();
            // The checks `meshsignd recover` reports with (the audit log's own are made when
            // it is opened below). Nothing is written before they pass.
            let (marker, identity) = checks(
                &data_dir,
                Some((&custodian.kek, &file_config.kek_file)),
                &store,
                false,
            )?;
            let seen_generation = store.kv().generation().transpose()?;
            let file_snapshot = Arc::new(file_config.clone());
            let config = overlays::effective_config(file_config, &store)?;
            // Creating keys (new aliases, or a new site's) comes only after the KEK was verified.
            let keys = KeyRing::load_or_create(&config, &store, &custodian, now)?;
            let mut runner_cas = BTreeMap::new();
            for p in &config.environments {
                let pi = RunnerCas::load_or_create(
                    &store,
                    &custodian,
                    &config.trust_domain,
                    &config.region,
                    &p.name,
                    now,
                )?;
                runner_cas.insert(p.name.clone(), Arc::new(pi));
            }
            let revocations = revocations::load(&store)?;
            let audit_key = AuditKey::load_or_create(&store, &custodian, audit_backend, now)?;
            let audit_spki = audit_key.backend.public_key_der().to_vec();
            let mut marker = marker;
            match &marker {
                Some(m) if m.audit_key_sha256 != marker::spki_sha256(&audit_spki) => {
                    return Err(StateError::AuditKeyMismatch {
                        marker: SiteMarker::path(&data_dir),
                    });
                }
                Some(_) => {}
                None => {
                    // A new site (or one from before markers): the store says who it is, then the
                    // marker says it outside the store.
                    let site_id = match &identity {
                        SiteIdentity::Known(id) => id.clone(),
                        SiteIdentity::New => meshsign_evidence::files::random_id()
                            .map_err(|_| crate::custody::CustodyError::Crypto("rng"))?,
                    };
                    store
                        .kv()
                        .put(Tree::Meta, marker::SITE_ID_KEY, site_id.as_bytes())?;
                    store.flush()?;
                    marker = Some(SiteMarker::new(
                        &site_id,
                        &config.region,
                        &config.trust_domain,
                        now,
                        (&audit_key.key_id, &audit_spki),
                        &custodian.kek,
                    )?);
                    tracing::info!(site_id = %site_id, marker = %SiteMarker::path(&data_dir).display(), "site marker written");
                }
            }
            let journal_must_exist = marker.as_ref().is_some_and(|m| !m.holds.is_empty());
            let marker = record_holdings(marker, &store, &data_dir)?;
            let metrics: Arc<crate::metrics::Metrics> = Arc::default();
            let audit = AuditLog::open(
                store.clone(),
                clock.clone(),
                (&config.region, &config.trust_domain),
                audit_key,
                (settings, metrics.clone()),
                (!shared).then_some(JournalAt {
                    path: &journal,
                    must_exist: journal_must_exist,
                }),
            )?;
            let limits = config.limits;
            let site = Self {
                config: RwLock::new(Arc::new(config)),
                file_config: RwLock::new(file_snapshot),
                seen_generation: std::sync::Mutex::new(seen_generation),
                summaries: crate::audit::summary::Summaries::new(metrics.clone()),
                metrics,
                enroll_limiter: crate::limits::RateLimiter::new(
                    limits.enroll_per_source_per_second,
                    limits.enroll_per_source_burst,
                    clock.clone(),
                ),
                enroll_deny_entries: crate::limits::RateLimiter::new(
                    limits.enroll_deny_entries_per_second,
                    limits.enroll_deny_entries_burst,
                    clock.clone(),
                ),
                sign_limiter: crate::limits::RateLimiter::new(
                    limits.sign_per_job_per_second,
                    limits.sign_per_job_burst,
                    clock.clone(),
                ),
                usage: Default::default(),
                last_reload: RwLock::new(None),
                wall_guard: crate::clock::WallGuard::new(&*clock),
                clock,
                store,
                audit,
                custodian,
                keys: RwLock::new(Arc::new(keys)),
                runner_cas: RwLock::new(runner_cas),
                revocations: RwLock::new(Arc::new(revocations)),
                roots_hook: RwLock::new(None),
                ops_lock: tokio::sync::Mutex::new(()),
                signing_pool: SigningPool::per_core().map_err(StateError::Pool)?,
                cert_cache: std::sync::Mutex::default(),
                marker: std::sync::Mutex::new(marker),
                data_dir,
            };
            // Once per store: the expiry index of certificates issued before it existed.
            let indexed = site.ensure_due_index()?;
            if indexed > 0 {
                tracing::info!(
                    certificates = indexed,
                    "expiry index built for the live certificates of an older store"
                );
            }
            Ok(site)
        })();
        startup.kv().end_startup();
        opened
    }

    /// The effective configuration now.
    pub fn config(&self) -> Arc<SiteConfig> {
        read(&self.config)
    }

    /// The file configuration a reload brought (ops overlays are laid over it).
    pub(crate) fn set_file_config(&self, c: SiteConfig) {
        write(&self.file_config, Arc::new(c));
    }

    /// The file configuration now running (before ops overlays).
    pub fn file_config(&self) -> Arc<SiteConfig> {
        read(&self.file_config)
    }

    /// What this replica's last SIGHUP reload did.
    pub fn last_reload(&self) -> Option<Arc<crate::model::ReloadOutcome>> {
        read(&self.last_reload)
    }

    /// Records what a reload did.
    pub(crate) fn set_last_reload(&self, r: crate::model::ReloadOutcome) {
        write(&self.last_reload, Some(Arc::new(r)));
    }

    /// Tells the other replicas of a shared store that shared state changed (ops, a holder's
    /// revocation, a renewal); a no-op on sled.
    pub(crate) fn changed(&self) -> Result<(), StoreError> {
        self.store.kv().bump_generation()
    }

    /// On a shared store: if another replica changed shared state since this one last looked,
    /// reloads everything derived from it — ops overlays (trust policies, JWKS, key state),
    /// keys, runner CAs (and the sign port's trusted roots), revocation rules — and forgets
    /// cached issuance records. Returns whether it reloaded. The site polls it (every 250 ms),
    /// so a change made through one replica is enforced by all within a second, on
    /// connections already open too.
    pub fn refresh_if_changed(&self) -> Result<bool, StateError> {
        let Some(now_gen) = self.store.kv().generation().transpose()? else {
            return Ok(false);
        };
        {
            let seen = self
                .seen_generation
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *seen == Some(now_gen) {
                return Ok(false);
            }
        }
        let file = (*read(&self.file_config)).clone();
        let cfg = overlays::effective_config(file, &self.store)?;
        let keys = KeyRing::load_or_create(&cfg, &self.store, &self.custodian, self.clock.unix())?;
        let environments: Vec<String> = cfg.environments.iter().map(|e| e.name.clone()).collect();
        self.set_keys(keys);
        self.set_config(cfg);
        self.set_revocations(revocations::load(&self.store)?);
        for env in &environments {
            self.reload_runner_cas(env)?;
        }
        *self.cert_cache.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
        *self
            .seen_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now_gen);
        tracing::info!(
            generation = now_gen,
            "shared state changed at another replica: reloaded"
        );
        Ok(true)
    }

    pub(crate) fn set_config(&self, c: SiteConfig) {
        write(&self.config, Arc::new(c));
    }

    /// The key ring now.
    pub fn keys(&self) -> Arc<KeyRing> {
        read(&self.keys)
    }

    pub(crate) fn set_keys(&self, k: KeyRing) {
        write(&self.keys, Arc::new(k));
    }

    /// Revocation rules now.
    pub fn revocations(&self) -> Arc<Vec<RevocationRule>> {
        read(&self.revocations)
    }

    pub(crate) fn set_revocations(&self, rules: Vec<RevocationRule>) {
        write(&self.revocations, Arc::new(rules));
    }

    /// The runner CAs of an environment.
    pub fn runner_cas(&self, environment: &str) -> Result<Arc<RunnerCas>, StateError> {
        self.runner_cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(environment)
            .cloned()
            .ok_or_else(|| StateError::NoRunnerCa(environment.to_string()))
    }

    /// Re-reads the runner CAs of an environment from the store (after ops changed one) and
    /// tells the transport the new trusted set.
    pub(crate) fn reload_runner_cas(&self, environment: &str) -> Result<(), StateError> {
        let cfg = self.config();
        let pi = RunnerCas::load_or_create(
            &self.store,
            &self.custodian,
            &cfg.trust_domain,
            &cfg.region,
            environment,
            self.clock.unix(),
        )?;
        self.runner_cas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(environment.to_string(), Arc::new(pi));
        self.notify_roots()
    }

    /// Whether runner CA `id` is trusted for `environment` now.
    pub fn runner_ca_trusted(&self, environment: &str, id: &str) -> bool {
        let now = self.clock.unix();
        self.runner_cas(environment)
            .is_ok_and(|i| i.is_trusted(id, now))
    }

    /// Every runner CA the sign port trusts now, across environments (DER).
    pub fn runner_roots(&self) -> Vec<Vec<u8>> {
        let now = self.clock.unix();
        self.runner_cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|i| {
                i.trusted(now)
                    .into_iter()
                    .map(|r| r.cert_der.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Registers the transport's hook for changes of the trusted runner CAs.
    pub fn on_runner_roots_changed(&self, hook: RootsHook) {
        write(&self.roots_hook, Some(hook));
    }

    fn notify_roots(&self) -> Result<(), StateError> {
        match read(&self.roots_hook) {
            Some(hook) => hook(self.runner_roots()).map_err(StateError::Transport),
            None => Ok(()),
        }
    }

    /// Records in the site marker every key version and runner CA the store holds now (after
    /// ops added one), so a later start refuses a store that lost one.
    pub(crate) fn record_holdings(&self) -> Result<(), StateError> {
        let mut guard = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        let current = guard.take();
        *guard = record_holdings(current, &self.store, &self.data_dir)?;
        Ok(())
    }

    /// Whether certificates minted under a trust policy may sign now.
    pub fn policy_admits_sessions(&self, environment: &str, policy: &str) -> bool {
        self.config()
            .environment(environment)
            .and_then(|p| p.trust_policies.iter().find(|t| t.name == policy))
            .is_some_and(|t| t.enabled || t.keep_sessions)
    }
}

/// Rewrites the marker's list of key versions and runner CAs from the store, if it changed.
fn record_holdings(
    marker: Option<SiteMarker>,
    store: &Store,
    data_dir: &std::path::Path,
) -> Result<Option<SiteMarker>, StateError> {
    let Some(mut m) = marker else {
        return Ok(None);
    };
    let held = marker::store_holdings(store)?;
    if held != m.holds {
        m.holds = held;
        m.write(data_dir)?;
    }
    Ok(Some(m))
}

/// Who the store says the site is.
enum SiteIdentity {
    /// The store names a site (or holds one from before markers, now named).
    Known(String),
    /// Nothing here yet: a new site.
    New,
}

/// Where the store is, for messages: `in <data_dir>` (sled) or `at <url>` (PostgreSQL).
fn store_location(store: &Store, data_dir: &std::path::Path) -> String {
    match store.kv().location() {
        Some(url) => format!("at {url}"),
        None => format!("in {}", data_dir.display()),
    }
}

/// What to do about a lost or damaged store, for its engine.
fn store_fix(store: &Store, data_dir: &std::path::Path) -> String {
    match store.kv().location() {
        Some(_) => "Check store.url; restore the database from its backups (pg_restore, \
                    point-in-time recovery)"
            .into(),
        None => format!(
            "Restore a snapshot (`meshsignd restore`), or run `meshsignd recover --data-dir {}` \
             to see what is intact",
            data_dir.display()
        ),
    }
}

/// The checks a start makes before it changes anything, in the start's order, with the start's
/// own functions: the marker, the KEK against it (a marker of another site is named as such),
/// the store against the marker, the key versions and runner CAs the marker says the store
/// holds, and — with `audit` — the journal against the store and every page of the audit log.
/// `meshsignd recover` runs it to say exactly what a start would do; the start runs it with
/// `audit` false (opening the audit log makes those checks itself, with the same functions).
/// `kek`: the KEK and its file, when known (recover without `--kek-file` checks the rest).
pub fn preflight(
    data_dir: &std::path::Path,
    kek: Option<(&Kek, &std::path::Path)>,
    store: &Store,
    audit: bool,
) -> Result<(), StateError> {
    checks(data_dir, kek, store, audit).map(|_| ())
}

fn checks(
    data_dir: &std::path::Path,
    kek: Option<(&Kek, &std::path::Path)>,
    store: &Store,
    audit: bool,
) -> Result<(Option<SiteMarker>, SiteIdentity), StateError> {
    let marker = SiteMarker::read(data_dir)?;
    if let (Some(m), Some((kek, kek_file))) = (&marker, kek)
        && let Err(e) = m.check_kek(kek, kek_file, data_dir)
    {
        return Err(match marker::store_site_id(store)? {
            Some(id) if id != m.site_id => StateError::ForeignMarker {
                marker: SiteMarker::path(data_dir),
                marker_site: m.site_id.clone(),
                store_site: id,
            },
            _ => e.into(),
        });
    }
    let identity = site_identity(store, marker.as_ref(), kek.map(|k| k.0), data_dir)?;
    if let Some(m) = &marker {
        let missing = marker::missing_holdings(m, store)?;
        if !missing.is_empty() {
            return Err(StateError::KeysLost {
                store: store_location(store, data_dir),
                fix: store_fix(store, data_dir),
                marker: SiteMarker::path(data_dir),
                missing: missing.join(", "),
            });
        }
    }
    if audit && store.kv().chain().is_none() {
        let must_exist = marker.as_ref().is_some_and(|m| !m.holds.is_empty());
        crate::audit::check_journal(&data_dir.join(JOURNAL_FILE), must_exist, store)?;
        crate::audit::check_readable(store, data_dir)?;
    }
    Ok((marker, identity))
}

/// Compares the store with the marker and refuses what does not match: an empty store where a
/// site was created, a store of another site. Without a marker, a store that already holds keys
/// must open under this KEK before anything new is created in it.
fn site_identity(
    store: &Store,
    marker: Option<&SiteMarker>,
    kek: Option<&Kek>,
    data_dir: &std::path::Path,
) -> Result<SiteIdentity, StateError> {
    let stored = marker::store_site_id(store)?;
    match (marker, stored) {
        (Some(m), Some(id)) if id == m.site_id => Ok(SiteIdentity::Known(id)),
        (Some(m), Some(id)) => Err(StateError::ForeignStore {
            store: store_location(store, data_dir),
            marker: SiteMarker::path(data_dir),
            store_site: id,
            marker_site: m.site_id.clone(),
        }),
        (Some(m), None) => {
            if marker::store_is_empty(store)? {
                Err(StateError::StoreLost {
                    store: store_location(store, data_dir),
                    fix: store_fix(store, data_dir),
                    marker: SiteMarker::path(data_dir),
                    site_id: m.site_id.clone(),
                })
            } else {
                Err(StateError::StoreDamaged {
                    store: store_location(store, data_dir),
                    fix: store_fix(store, data_dir),
                    marker: SiteMarker::path(data_dir),
                    site_id: m.site_id.clone(),
                })
            }
        }
        (None, stored) => {
            // No marker: a new site, or one whose store predates markers (or lost its marker).
            if let Some(kek) = kek {
                crate::custody::verify_kek(store, kek)?;
            }
            match stored {
                // A new replica's folder: the site is in the shared database.
                Some(id) if store.kv().chain().is_some() => {
                    tracing::info!(site_id = %id, "a replica of a site in the database: writing its marker");
                    Ok(SiteIdentity::Known(id))
                }
                None if marker::store_is_empty(store)? => Ok(SiteIdentity::New),
                _ => Err(StateError::MarkerMissing {
                    store: store_location(store, data_dir),
                    marker: SiteMarker::path(data_dir),
                }),
            }
        }
    }
}
