//! A site: its state ([`SiteState`]) and its three listeners ([`start`] → [`SiteHandle`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::audit::{AuditError, AuditLog, AuditSettings};
use crate::clock::SharedClock;
use crate::config::SiteConfig;
use crate::issuer::{IssueError, PartitionIssuers};
use crate::ops::RevocationRule;
use crate::sign::{CustodyError, Kek, KeyRing};
use crate::store::{Store, StoreError};
use crate::tls::TlsCell;
use crate::tls::{self, ServerIdentity, TlsError};

/// Failures starting a site.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// Key custody (KEK, unwrap).
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// Runner CA setup.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding a listener.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// gRPC reflection setup.
    #[error("reflection: {0}")]
    Reflection(String),
    /// An ops overlay in the store is invalid.
    #[error("stored ops state: {0}")]
    Overlay(String),
}

/// Everything the handlers share.
///
/// What ops can change at run time lives behind locks and is swapped whole: the effective
/// configuration (file + ops overlays: trust-policy state, pinned JWKS, admin-created keys), the
/// key ring, the runner CAs, the revocation rules, and the sign port's TLS configuration.
pub struct SiteState {
    config: RwLock<Arc<SiteConfig>>,
    /// Injected clock.
    pub clock: SharedClock,
    /// Persistent state.
    pub store: Store,
    /// Audit log.
    pub audit: AuditLog,
    pub(crate) kek: Kek,
    keys: RwLock<Arc<KeyRing>>,
    issuers: RwLock<BTreeMap<String, Arc<PartitionIssuers>>>,
    pub(crate) revocations: RwLock<Arc<Vec<RevocationRule>>>,
    sign_tls: RwLock<Option<(Arc<ServerIdentity>, TlsCell)>>,
    /// Serializes ops changes (each is read-modify-write of shared state).
    pub(crate) ops_lock: tokio::sync::Mutex<()>,
    /// Threads (one per core) that sign batches.
    pub(crate) signing_pool: crate::pool::SigningPool,
    /// Issuance records read by the per-RPC checks (see [`CertCache`]).
    pub(crate) cert_cache: std::sync::Mutex<CertCache>,
}

/// Issuance records the per-RPC checks have read, so a connection's every Sign does not read
/// and decode the same record from the store. A record changes after issuance only when its
/// holder revokes it (`RevokeSelf`); that bumps `generation` and drops the entry, and a read
/// that raced with it is not cached (it compares the generation it started with). Every other
/// revocation is an in-memory rule checked per RPC as before.
#[derive(Debug, Default)]
pub struct CertCache {
    generation: u64,
    records: std::collections::HashMap<String, Arc<crate::enroll::CertRecord>>,
}

impl CertCache {
    /// Entries kept before the cache starts over.
    const MAX: usize = 8192;

    /// The cached record and, on a miss, the generation to pass to [`CertCache::insert`].
    pub fn get(&self, serial: &str) -> Result<Arc<crate::enroll::CertRecord>, u64> {
        self.records.get(serial).cloned().ok_or(self.generation)
    }

    /// Caches a record read from the store at `generation` (ignored if a change came since).
    pub fn insert(&mut self, generation: u64, record: Arc<crate::enroll::CertRecord>) {
        if generation != self.generation {
            return;
        }
        if self.records.len() >= Self::MAX {
            self.records.clear();
        }
        self.records.insert(record.serial.clone(), record);
    }

    /// The record of `serial` changed in the store.
    pub fn invalidate(&mut self, serial: &str) {
        self.generation += 1;
        self.records.remove(serial);
    }
}

impl std::fmt::Debug for SiteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteState")
            .field("region", &self.config().region)
            .finish_non_exhaustive()
    }
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = v;
}

/// The audit journal's file name in the data folder (beside sled's files; see `journal.rs`).
pub const AUDIT_JOURNAL: &str = "audit.journal";

impl SiteState {
    /// Opens the store, reads the KEK, loads (or creates) runner CAs and signing keys, and
    /// applies the ops overlays kept in the store to the file configuration.
    pub fn open(file_config: SiteConfig, clock: SharedClock) -> Result<Self, SiteError> {
        let settings = AuditSettings {
            checkpoint_every: file_config.audit.checkpoint_every,
            checkpoint_interval: Duration::from_secs(file_config.audit.checkpoint_seconds),
            durable: file_config.audit.flush,
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
    ) -> Result<Self, SiteError> {
        let kek = Kek::load(&file_config.kek_file, file_config.dev)?;
        let journal = file_config.data_dir.join(AUDIT_JOURNAL);
        std::fs::create_dir_all(&file_config.data_dir)
            .map_err(|e| StoreError::Engine(format!("{}: {e}", file_config.data_dir.display())))?;
        let store = match kv {
            Some(kv) => Store::new(kv),
            None => Store::open_sled(
                &file_config.data_dir,
                file_config.store_cache_mib.saturating_mul(1 << 20),
            )?,
        };
        let now = clock.unix();
        let config = crate::ops::effective_config(file_config, &store)?;
        let keys = KeyRing::load_or_create(&config, &store, &kek, now)?;
        let mut issuers = BTreeMap::new();
        for p in &config.partitions {
            let pi = PartitionIssuers::load_or_create(
                &store,
                &kek,
                &config.trust_domain,
                &config.region,
                &p.name,
                now,
            )?;
            issuers.insert(p.name.clone(), Arc::new(pi));
        }
        let revocations = crate::ops::load_revocations(&store)?;
        let audit_key = crate::sign::audit_key(&store, &kek, now)?;
        let audit = AuditLog::open(
            store.clone(),
            clock.clone(),
            &config.region,
            audit_key,
            settings,
            Some(&journal),
        )?;
        Ok(Self {
            config: RwLock::new(Arc::new(config)),
            clock,
            store,
            audit,
            kek,
            keys: RwLock::new(Arc::new(keys)),
            issuers: RwLock::new(issuers),
            revocations: RwLock::new(Arc::new(revocations)),
            sign_tls: RwLock::new(None),
            ops_lock: tokio::sync::Mutex::new(()),
            signing_pool: crate::pool::SigningPool::per_core()
                .map_err(|e| StoreError::Engine(format!("cannot start the signing pool: {e}")))?,
            cert_cache: std::sync::Mutex::default(),
        })
    }

    /// The effective configuration now.
    pub fn config(&self) -> Arc<SiteConfig> {
        read(&self.config)
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

    /// The runner CAs of a partition.
    pub fn issuers(&self, partition: &str) -> Result<Arc<PartitionIssuers>, IssueError> {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(partition)
            .cloned()
            .ok_or_else(|| IssueError::SelfCheck(format!("no runner CA for partition {partition}")))
    }

    pub(crate) fn set_issuers(
        &self,
        partition: &str,
        pi: PartitionIssuers,
    ) -> Result<(), SiteError> {
        self.issuers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition.to_string(), Arc::new(pi));
        self.refresh_sign_tls()
    }

    /// Whether runner CA `id` is trusted for `partition` now.
    pub fn issuer_trusted(&self, partition: &str, id: &str) -> bool {
        let now = self.clock.unix();
        self.issuers(partition).is_ok_and(|i| i.is_trusted(id, now))
    }

    /// Every runner CA the sign port trusts now, across partitions (DER).
    pub fn runner_roots(&self) -> Vec<Vec<u8>> {
        let now = self.clock.unix();
        self.issuers
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

    /// Rebuilds the sign port's TLS configuration from the trusted runner CAs; new handshakes
    /// use it at once, open connections are governed by the per-RPC checks.
    pub(crate) fn refresh_sign_tls(&self) -> Result<(), SiteError> {
        let Some((id, cell)) = read(&self.sign_tls) else {
            return Ok(());
        };
        let cfg = tls::sign_config(&id, &self.runner_roots(), &self.clock)?;
        write(&cell, cfg);
        Ok(())
    }

    /// Whether certificates minted under a policy may sign now.
    pub fn policy_admits_sessions(&self, partition: &str, policy: &str) -> bool {
        self.config()
            .partition(partition)
            .and_then(|p| p.trust_policies.iter().find(|t| t.name == policy))
            .is_some_and(|t| t.enabled || t.keep_sessions)
    }
}

/// A running site.
pub struct SiteHandle {
    /// Enroll port address.
    pub enroll_addr: SocketAddr,
    /// Sign port address.
    pub sign_addr: SocketAddr,
    /// Admin port address.
    pub admin_addr: SocketAddr,
    /// Shared state (tests inspect the audit log and store through it).
    pub state: Arc<SiteState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    keeper: JoinHandle<()>,
}

impl std::fmt::Debug for SiteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteHandle")
            .field("enroll", &self.enroll_addr)
            .field("sign", &self.sign_addr)
            .finish()
    }
}

impl SiteHandle {
    /// Stops the listeners and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.keeper.await;
        self.state.audit.stop().await;
        let _ = self.state.store.flush();
    }

    /// Waits until a listener stops (error) or the process is told to stop.
    pub async fn wait(mut self) -> Result<(), tonic::transport::Error> {
        let first = futures_first(&mut self.tasks).await;
        let _ = self.shutdown.send(true);
        first
    }
}

async fn futures_first(
    tasks: &mut [JoinHandle<Result<(), tonic::transport::Error>>],
) -> Result<(), tonic::transport::Error> {
    // The servers only end on shutdown or a fatal transport error; waiting on the first suffices.
    if let Some(t) = tasks.first_mut() {
        return t.await.unwrap_or(Ok(()));
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SiteError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SiteError::Bind { addr, source })
}

/// Binds the three listeners and serves until [`SiteHandle::shutdown`].
pub async fn start(state: Arc<SiteState>) -> Result<SiteHandle, SiteError> {
    tls::install_default_provider();
    let config = state.config();
    let id = Arc::new(ServerIdentity::load(&config.tls)?);
    let enroll_cfg = tls::cell(tls::enroll_config(&id, &state.clock)?);
    let sign_cfg = tls::cell(tls::sign_config(&id, &state.runner_roots(), &state.clock)?);
    let admin_cfg = tls::cell(tls::admin_config(&id, &config.tls.admin_ca, &state.clock)?);
    write(&state.sign_tls, Some((id.clone(), sign_cfg.clone())));

    let listen = config.listen;
    let (enroll_l, sign_l, admin_l) = (
        bind(listen.enroll).await?,
        bind(listen.sign).await?,
        bind(listen.admin).await?,
    );
    let addr = |l: &TcpListener, a: SocketAddr| {
        l.local_addr()
            .map_err(|source| SiteError::Bind { addr: a, source })
    };
    let (enroll_addr, sign_addr, admin_addr) = (
        addr(&enroll_l, listen.enroll)?,
        addr(&sign_l, listen.sign)?,
        addr(&admin_l, listen.admin)?,
    );

    let (tx, rx) = watch::channel(false);
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let routers = api::routers(state.clone()).map_err(SiteError::Reflection)?;
    let tasks = vec![
        tokio::spawn(
            routers.enroll.serve_with_incoming_shutdown(
                tls::incoming(enroll_l, enroll_cfg),
                stop(rx.clone()),
            ),
        ),
        tokio::spawn(
            routers
                .sign
                .serve_with_incoming_shutdown(tls::incoming(sign_l, sign_cfg), stop(rx.clone())),
        ),
        tokio::spawn(
            routers
                .admin
                .serve_with_incoming_shutdown(tls::incoming(admin_l, admin_cfg), stop(rx.clone())),
        ),
    ];

    // Housekeeping every 10 s: prune the replay store, retire issuers whose last certificate
    // has expired.
    let keeper = state.clone();
    let mut prx = rx.clone();
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = crate::enroll::prune_jti(&keeper) {
                        tracing::warn!(error = %e, "replay-store pruning failed");
                    }
                    if let Err(e) = crate::ops::retire_expired(&keeper).await {
                        tracing::warn!(error = %e, "retiring expired issuers failed");
                    }
                    if let Err(e) = crate::ops::prune_audit(&keeper).await {
                        tracing::warn!(error = %e, "audit retention failed");
                    }
                }
                _ = prx.changed() => break,
            }
        }
    });

    tracing::info!(%enroll_addr, %sign_addr, %admin_addr, region = %config.region, "meshsign site serving");
    Ok(SiteHandle {
        enroll_addr,
        sign_addr,
        admin_addr,
        state,
        shutdown: tx,
        tasks,
        keeper,
    })
}
