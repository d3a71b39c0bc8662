//! A site: its state ([`SiteState`]) and its three listeners ([`start`] → [`SiteHandle`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::audit::{AuditError, AuditLog};
use crate::clock::SharedClock;
use crate::config::SiteConfig;
use crate::issuer::{IssueError, PartitionIssuers};
use crate::sign::{CustodyError, Kek, KeyRing};
use crate::store::{Store, StoreError};
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
}

/// Everything the handlers share.
pub struct SiteState {
    /// Validated configuration.
    pub config: SiteConfig,
    /// Injected clock.
    pub clock: SharedClock,
    /// Persistent state.
    pub store: Store,
    /// Audit log.
    pub audit: AuditLog,
    /// Signing keys, decrypted once.
    pub keys: KeyRing,
    issuers: RwLock<BTreeMap<String, Arc<PartitionIssuers>>>,
}

impl std::fmt::Debug for SiteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteState")
            .field("region", &self.config.region)
            .finish_non_exhaustive()
    }
}

impl SiteState {
    /// Opens the store, reads the KEK, loads (or creates) runner CAs and signing keys.
    pub fn open(config: SiteConfig, clock: SharedClock) -> Result<Self, SiteError> {
        let kek = Kek::load(&config.kek_file, config.dev)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StoreError::Engine(format!("{}: {e}", config.data_dir.display())))?;
        let store = Store::open_sled(&config.data_dir)?;
        let now = clock.unix();
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
        let audit = AuditLog::open(store.clone(), clock.clone(), &config.region)?;
        Ok(Self {
            config,
            clock,
            store,
            audit,
            keys,
            issuers: RwLock::new(issuers),
        })
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

    /// Whether runner CA `id` is trusted for `partition`.
    pub fn issuer_trusted(&self, partition: &str, id: &str) -> bool {
        self.issuers(partition)
            .is_ok_and(|i| i.trusted_ids.iter().any(|t| t == id))
    }

    /// Every runner CA the sign port trusts, across partitions (DER).
    pub fn runner_roots(&self) -> Vec<Vec<u8>> {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|i| i.trusted.clone())
            .collect()
    }

    /// Whether a trust policy of a partition is enabled.
    pub fn policy_enabled(&self, partition: &str, policy: &str) -> bool {
        self.config
            .partition(partition)
            .and_then(|p| p.trust_policies.iter().find(|t| t.name == policy))
            .is_some_and(|t| t.enabled)
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
    let id = ServerIdentity::load(&state.config.tls)?;
    let enroll_cfg = tls::enroll_config(&id, &state.clock)?;
    let sign_cfg = tls::sign_config(&id, &state.runner_roots(), &state.clock)?;
    let admin_cfg = tls::admin_config(&id, &state.config.tls.admin_ca, &state.clock)?;

    let listen = state.config.listen;
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

    // Prune the replay store once a minute.
    let pruner = state.clone();
    let mut prx = rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = crate::enroll::prune_jti(&pruner) {
                        tracing::warn!(error = %e, "replay-store pruning failed");
                    }
                }
                _ = prx.wait_for(|v| *v) => break,
            }
        }
    });

    tracing::info!(%enroll_addr, %sign_addr, %admin_addr, region = %state.config.region, "meshsign site serving");
    Ok(SiteHandle {
        enroll_addr,
        sign_addr,
        admin_addr,
        state,
        shutdown: tx,
        tasks,
    })
}
