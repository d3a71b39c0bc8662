//! Start-up and lifecycle of a site's listeners: bind the three ports, serve until told to
//! stop, report a listener that dies, run housekeeping, and apply a reload (configuration and
//! `[tls]`) without a restart.
//!
//! Owns: [`SiteHandle`], binding, the listener tasks, housekeeping's timer, applying a reload.
//! Must not touch: what a reload may change (`ops::trust::reload` decides).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::connections::ConnectionLimiter;
use super::tls::{self, ListenerTls, TlsError};
use crate::config::SiteConfig;
use crate::identity::Operator;
use crate::ops::{self, OpsError};
use crate::state::SiteState;

/// How often a site whose writes fail tries to make its store writable again.
pub const REPAIR_EVERY: Duration = Duration::from_secs(2);

/// Failures starting a site's listeners.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding a listener.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// gRPC reflection setup.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A listener that stopped while the site was serving.
#[derive(Debug, thiserror::Error)]
#[error("the {port} listener stopped: {cause}")]
pub struct ListenerDied {
    /// `enroll`, `sign` or `admin`.
    pub port: &'static str,
    /// What ended it.
    pub cause: String,
}

/// A running site.
pub struct SiteHandle {
    /// Enroll port address.
    pub enroll_addr: SocketAddr,
    /// Sign port address.
    pub sign_addr: SocketAddr,
    /// Admin port address.
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics` address (when `[metrics] listen` is set).
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state (tests inspect the audit log and store through it).
    pub state: Arc<SiteState>,
    tls: Arc<ListenerTls>,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<(&'static str, Result<(), tonic::transport::Error>)>,
    keeper: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// Each listener's open-connection counter (enroll, sign, admin).
    connections: [(&'static str, ConnectionLimiter); 3],
}

impl std::fmt::Debug for SiteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteHandle")
            .field("enroll", &self.enroll_addr)
            .field("sign", &self.sign_addr)
            .field("admin", &self.admin_addr)
            .finish()
    }
}

impl SiteHandle {
    /// Connections a listener (`enroll`, `sign`, `admin`) holds open now: what tests wait on
    /// instead of sleeping.
    pub fn open_connections(&self, port: &str) -> u32 {
        self.connections
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, c)| c.open())
    }

    /// Stops the listeners and waits for them, then stops the audit writer, saves the
    /// in-memory signature counts and flushes.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.listeners.join_next().await.is_some() {}
        let _ = self.keeper.await;
        if let Some(t) = self.metrics_task.take() {
            let _ = t.await;
        }
        self.state.audit.stop().await;
        if let Err(e) = self.state.persist_usage() {
            tracing::warn!(error = %e, "signature counts of unbudgeted keys were not saved");
        }
        let _ = self.state.store.flush();
    }

    /// Waits until a listener stops. While the site serves, listeners stop only on a fatal
    /// error (or a panic), so whatever this returns is a listener that died: the daemon exits
    /// non-zero naming it.
    pub async fn died(&mut self) -> ListenerDied {
        match self.listeners.join_next().await {
            Some(Ok((port, Ok(())))) => ListenerDied {
                port,
                cause: "it ended without an error".into(),
            },
            Some(Ok((port, Err(e)))) => ListenerDied {
                port,
                cause: e.to_string(),
            },
            Some(Err(e)) => ListenerDied {
                port: "a",
                cause: format!("its task failed: {e}"),
            },
            None => ListenerDied {
                port: "every",
                cause: "no listener is left".into(),
            },
        }
    }

    /// Re-reads a configuration (SIGHUP), audited as `Admin.Reload` by `local:SIGHUP`: trust
    /// policies and key access rules change in place, `[tls]` is re-read (new handshakes use the
    /// new server certificate and admin CA). What needs a restart (identity, listeners, storage,
    /// the environment list) refuses the whole reload by name; so does unreadable TLS material.
    pub async fn reload(&self, file: SiteConfig) -> Result<(), OpsError> {
        let state = &self.state;
        let op = Operator::local("SIGHUP");
        let tls = self.tls.clone();
        // Review of a reload is by the file (ops::trust::reload checks its approval).
        let no_exemption = || Ok(None);
        ops::admin(
            state,
            &op,
            "Reload",
            "",
            (&[], ""),
            no_exemption,
            async || {
                // TLS first: nothing changes unless every file of the new `[tls]` loads.
                let staged =
                    ListenerTls::load(&file.tls, &state.runner_roots(), state.clock.clone())
                        .map_err(|e| OpsError::Invalid(format!("tls: {e}")))?;
                drop(staged);
                let detail = ops::trust::reload(state, file.clone())?;
                tls.reload(&file.tls, &state.runner_roots())
                    .map_err(|e| OpsError::Invalid(format!("tls: {e}")))?;
                Ok(((), format!("{detail}; [tls] re-read")))
            },
        )
        .await
    }
}

/// Descriptors kept free for everything that is not a client connection (store, journal,
/// logs, the runtime).
const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the open-file limit to its hard limit and checks that the three listeners at their
/// `[limits] max_connections` fit in it: a site must refuse to start rather than fail every
/// client once an attacker fills its descriptor table. A dev site (`dev = true`) lowers its
/// caps to fit instead, with a warning, so `meshsignd dev` starts on any machine.
pub fn fit_descriptors(config: &mut SiteConfig) -> Result<u64, String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: cur.maximum,
        maximum: cur.maximum,
    };
    let soft = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => cur.maximum,
        Err(_) => cur.current,
    }
    .unwrap_or(u64::MAX);
    let limits = &mut config.limits;
    let need = limits.descriptors_needed() + RESERVED_DESCRIPTORS;
    if soft >= need {
        return Ok(soft);
    }
    if config.dev {
        let fit = u32::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS) / 3)
            .unwrap_or(u32::MAX)
            .max(1);
        tracing::warn!(
            open_files = soft,
            max_connections = fit,
            "dev site: [limits] max_connections lowered to fit the open-file limit"
        );
        limits.max_connections = fit;
        limits.max_connections_per_source = limits.max_connections_per_source.min(fit);
        return Ok(soft);
    }
    Err(format!(
        "[limits] max_connections = {} needs {need} open files (3 listeners + \
         {RESERVED_DESCRIPTORS} reserved) and this process may open {soft}: lower \
         max_connections in the config, or raise the limit (LimitNOFILE= in the systemd unit, \
         ulimit -n)",
        limits.max_connections
    ))
}

/// How often the health status is brought up to date.
pub const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// Sets every port's health: SERVING while decisions can be recorded, NOT_SERVING while the
/// audit log cannot be written (a full disk, a broken store, PostgreSQL unreachable) — then
/// every decision would be refused `UNAVAILABLE`, so a load balancer should send runners to a
/// replica that can serve. Changes are logged once.
async fn watch_health(
    state: &Arc<SiteState>,
    health: &tonic_health::server::HealthReporter,
    serving: &mut Option<bool>,
) {
    // NOT_SERVING while decisions cannot be recorded, or the PKCS#11 token is gone.
    let mut now = !state.audit.is_failing() && state.custodian.available();
    if now && state.store.kv().chain().is_some() {
        // A shared store: is the database there? (An idle replica has no failed write to go by.)
        let s = state.clone();
        now = tokio::task::spawn_blocking(move || {
            s.store.kv().generation().is_some_and(|g| g.is_ok())
        })
        .await
        .unwrap_or(false);
    }
    if *serving == Some(now) {
        return;
    }
    let status = if now {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in std::iter::once("").chain(super::SERVICES) {
        health.set_service_status(service, status).await;
    }
    if serving.is_some() {
        tracing::warn!(serving = now, "health changed");
    }
    *serving = Some(now);
}

/// How often a replica of a shared store looks for changes made through another replica.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

async fn refresh(state: &Arc<SiteState>) {
    // Not while a local ops change is half applied (each reads, changes and sets shared state).
    let _guard = state.ops_lock.lock().await;
    let s = state.clone();
    match tokio::task::spawn_blocking(move || s.refresh_if_changed()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "reloading shared state failed; retrying"),
        Err(e) => tracing::error!(error = %e, "reloading shared state panicked"),
    }
}

async fn write_summaries(state: &SiteState) {
    if let Err(e) = state.summaries.flush(&state.audit).await {
        tracing::warn!(error = %e, "summary audit entries wait for the next interval");
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((l, local))
}

/// Binds the three listeners and serves until [`SiteHandle::shutdown`].
pub async fn start(state: Arc<SiteState>) -> Result<SiteHandle, StartError> {
    tls::install_default_provider();
    let config = state.config();
    let tls = Arc::new(ListenerTls::load(
        &config.tls,
        &state.runner_roots(),
        state.clock.clone(),
    )?);
    let hook_tls = tls.clone();
    state.on_runner_roots_changed(Arc::new(move |roots| {
        hook_tls.set_runner_cas(&roots).map_err(Into::into)
    }));

    let listen = config.listen;
    let (enroll_l, enroll_addr) = bind(listen.enroll).await?;
    let (sign_l, sign_addr) = bind(listen.sign).await?;
    let (admin_l, admin_addr) = bind(listen.admin).await?;

    let (tx, rx) = watch::channel(false);
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let routers = super::routers(state.clone())?;
    let health = routers.health.clone();
    let limits = config.limits;
    let counters = ["enroll", "sign", "admin"].map(|port| {
        (
            port,
            ConnectionLimiter::new(limits.max_connections, limits.max_connections_per_source),
        )
    });
    let admission = |port: &'static str| {
        let counted = state.clone();
        tls::Admission {
            port,
            connections: counters
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| {
                    ConnectionLimiter::new(
                        limits.max_connections,
                        limits.max_connections_per_source,
                    )
                }),
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_seconds),
            first_request_timeout: Duration::from_secs(limits.first_request_timeout_seconds),
            refused: Arc::new(move |reason, peer, detail| {
                super::count_refusal(&counted, reason, peer.to_string(), detail)
            }),
        }
    };
    let mut listeners = JoinSet::new();
    let enroll = routers.enroll.serve_with_incoming_shutdown(
        tls::incoming(enroll_l, tls.enroll.clone(), admission("enroll")),
        stop(rx.clone()),
    );
    listeners.spawn(async move { ("enroll", enroll.await) });
    let sign = routers.sign.serve_with_incoming_shutdown(
        tls::incoming(sign_l, tls.sign.clone(), admission("sign")),
        stop(rx.clone()),
    );
    listeners.spawn(async move { ("sign", sign.await) });
    let admin = routers.admin.serve_with_incoming_shutdown(
        tls::incoming(admin_l, tls.admin.clone(), admission("admin")),
        stop(rx.clone()),
    );
    listeners.spawn(async move { ("admin", admin.await) });

    let (metrics_addr, metrics_task) = match config.metrics_listen {
        Some(addr) => {
            let (a, t) = super::metrics::start(addr, state.clone(), rx.clone())
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            (Some(a), Some(t))
        }
        None => (None, None),
    };

    // Housekeeping every 10 s: replay store, runner CAs past their last certificate, retention.
    // Every 2 s while writes fail (a full disk): try to make the store writable again, so
    // writes resume by themselves soon after space returns.
    let keeper_state = state.clone();
    let mut krx = rx.clone();
    // Health on a task of its own: housekeeping, a refresh or a summary can each wait for
    // several store calls (each up to the statement timeout while a database is away), and
    // must not hold back the status a load balancer steers by.
    let health_state = state.clone();
    let mut hrx = rx.clone();
    let health_task = tokio::spawn(async move {
        let mut health_tick = tokio::time::interval(HEALTH_EVERY);
        let mut serving = None;
        loop {
            tokio::select! {
                _ = health_tick.tick() => watch_health(&health_state, &health, &mut serving).await,
                _ = hrx.changed() => break,
            }
        }
    });
    // Summary entries (counted refusals) every `summary_seconds`, and once more on shutdown.
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        // First write one period from now: an interval's immediate first tick, delayed on a
        // loaded machine, would cut the first interval's count in two.
        let every = Duration::from_secs(limits.summary_seconds);
        let mut summary = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut replicas = tokio::time::interval(REFRESH_EVERY);
        let shared = keeper_state.store.kv().chain().is_some();
        loop {
            tokio::select! {
                _ = replicas.tick(), if shared => refresh(&keeper_state).await,
                _ = tick.tick() => ops::housekeeping::run_once(&keeper_state).await,
                _ = repair.tick() => ops::housekeeping::repair_storage(&keeper_state).await,
                _ = summary.tick() => write_summaries(&keeper_state).await,
                _ = krx.changed() => break,
            }
        }
        write_summaries(&keeper_state).await;
        let _ = health_task.await;
    });

    tracing::info!(%enroll_addr, %sign_addr, %admin_addr, metrics = ?metrics_addr, region = %config.region, "meshsign site serving");
    Ok(SiteHandle {
        enroll_addr,
        sign_addr,
        admin_addr,
        metrics_addr,
        state,
        tls,
        shutdown: tx,
        listeners,
        keeper,
        metrics_task,
        connections: counters,
    })
}

#[cfg(all(test, feature = "dev"))]
mod tests {
    use super::*;

    /// A listener task that ends is reported, not waited on forever.
    #[tokio::test]
    async fn a_listener_that_ends_is_reported() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let toml = crate::dev::prepare(dir.path())?;
        let mut cfg = SiteConfig::load(&toml)?;
        let lo = std::net::Ipv4Addr::LOCALHOST;
        cfg.listen.enroll = (lo, 0).into();
        cfg.listen.sign = (lo, 0).into();
        cfg.listen.admin = (lo, 0).into();
        let state = SiteState::open(cfg, Arc::new(crate::clock::SystemClock))?;
        let mut handle = start(Arc::new(state)).await?;
        handle.listeners.abort_all();
        let died = tokio::time::timeout(Duration::from_secs(10), handle.died()).await?;
        assert!(died.to_string().contains("listener stopped"), "{died}");
        handle.shutdown().await;
        Ok(())
    }
}
