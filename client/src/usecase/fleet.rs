//! A fleet: several sites, one per region, named in one client config's `[sites]` table —
//! each entry the path of that site's own client config (relative to the file):
//!
//! ```toml
//! [sites]
//! sg = "sg/client.toml"
//! us-east = "us-east/client.toml"
//! tokyo = "tokyo/client.toml"
//! ```
//!
//! Each site keeps its own endpoints, CA bundle and admin identity: sites share no private
//! material, so an operator holds one admin certificate per region. `meshsign admin
//! --all-sites …` runs a command at every site at once and reports per site; one site's
//! failure never stops the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::session::token::TokenSource;
use crate::usecase::drill::{DrillReport, Prepared};
use crate::{ClientConfig, ClientError};

/// The sites of a fleet, in name order.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// Site name → its client config.
    pub sites: Vec<(String, ClientConfig)>,
}

/// One site's outcome.
pub type SiteResult<T> = (String, Result<T, ClientError>);

impl Fleet {
    /// The fleet `--config` names, with the command line's timeouts over every site's.
    pub fn load_with(
        path: Option<&Path>,
        timeouts: (Option<u64>, Option<u64>),
    ) -> Result<Self, ClientError> {
        let path = path.ok_or_else(|| {
            ClientError::Config(
                "--all-sites and --fleet need --config (a file with [sites])".into(),
            )
        })?;
        let mut fleet = Self::load(path)?;
        for (_, cfg) in &mut fleet.sites {
            cfg.set_timeouts(timeouts);
        }
        Ok(fleet)
    }

    /// Reads the `[sites]` table of `path` and every client config it names. A file without
    /// `[sites]` is refused with what to add.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(ClientError::io(path))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        let Some(sites) = table.get("sites") else {
            return Err(ClientError::Config(format!(
                "{}: --all-sites and --fleet need a [sites] table naming each site's client config \
                 (e.g. sg = \"sg/client.toml\")",
                path.display()
            )));
        };
        let sites: BTreeMap<String, PathBuf> = sites
            .clone()
            .try_into()
            .map_err(|e| ClientError::Config(format!("{}: [sites]: {e}", path.display())))?;
        if sites.is_empty() {
            return Err(ClientError::Config(format!(
                "{}: [sites] is empty",
                path.display()
            )));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let sites = sites
            .into_iter()
            .map(|(name, p)| {
                let p = if p.is_relative() { base.join(p) } else { p };
                ClientConfig::load(&p).map(|c| (name, c))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { sites })
    }

    /// Runs `f` at every site concurrently; results in site order.
    pub async fn each<T, F, Fut>(&self, f: F) -> Vec<SiteResult<T>>
    where
        F: Fn(ClientConfig) -> Fut,
        Fut: Future<Output = Result<T, ClientError>> + Send + 'static,
        T: Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for (i, (_, cfg)) in self.sites.iter().enumerate() {
            let fut = f(cfg.clone());
            set.spawn(async move { (i, fut.await) });
        }
        let mut out: Vec<Option<Result<T, ClientError>>> =
            self.sites.iter().map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, r)) = joined
                && let Some(slot) = out.get_mut(i)
            {
                *slot = Some(r);
            }
        }
        self.sites
            .iter()
            .zip(out)
            .map(|((name, _), r)| {
                (
                    name.clone(),
                    r.unwrap_or_else(|| Err(ClientError::Usage("the task failed".into()))),
                )
            })
            .collect()
    }

    /// The revocation drill at every site at once: every site prepares (an open sign-port
    /// connection, a second token); only when all are ready is the policy disabled everywhere
    /// together; each site measures its own refusals and re-enables. If a site cannot
    /// prepare, no site disables anything.
    pub async fn drill(
        &self,
        environment: &str,
        issuer: Option<&str>,
        source: &TokenSource,
    ) -> Vec<SiteResult<DrillReport>> {
        let barrier = Arc::new(tokio::sync::Barrier::new(self.sites.len()));
        let failed = Arc::new(AtomicBool::new(false));
        let (environment, issuer) = (environment.to_string(), issuer.map(str::to_string));
        self.each(|cfg| {
            let (barrier, failed) = (barrier.clone(), failed.clone());
            let (environment, issuer, source) =
                (environment.clone(), issuer.clone(), source.clone());
            async move {
                let prepared = Prepared::new(&cfg, &environment, issuer.as_deref(), &source).await;
                if prepared.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                barrier.wait().await;
                match prepared {
                    Err(e) => Err(e),
                    Ok(_) if failed.load(Ordering::SeqCst) => Err(ClientError::Usage(
                        "not started: another site could not prepare the drill".into(),
                    )),
                    Ok(p) => p.run().await,
                }
            }
        })
        .await
    }
}

/// The error a fleet command exits with: the first failure's (so its exit code), naming
/// every failed site.
pub fn failure<T>(failed: &[String], results: &[SiteResult<T>]) -> ClientError {
    let first = results.iter().find_map(|(_, r)| r.as_ref().err());
    let names = failed.join(", ");
    match first {
        Some(ClientError::Rpc {
            rpc,
            code,
            message,
            reason,
        }) => ClientError::Rpc {
            rpc,
            code: *code,
            message: format!("{message} (failed at: {names})"),
            reason: reason.clone(),
        },
        Some(ClientError::Connect { endpoint, message }) => ClientError::Connect {
            endpoint: endpoint.clone(),
            message: format!("{message} (failed at: {names})"),
        },
        _ => ClientError::Verify(format!("failed at: {names}")),
    }
}
