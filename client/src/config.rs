//! `client.toml`: endpoints, the CA bundle, environments (audiences), and optionally the dev
//! issuer and an admin identity. Relative paths are taken from the file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ClientError;

/// A parsed client config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The site's region (sent at enrollment; the site checks it is its own).
    pub region: String,
    /// The site's trust domain.
    pub trust_domain: String,
    /// TLS server name of the site's certificate.
    pub server_name: String,
    /// CA certificate(s) that issued the site's server certificate (PEM).
    pub ca_file: PathBuf,
    /// `host:port` of the enroll port; several replicas of the site as `a:7441,b:7441`, tried in
    /// turn (same region only: a certificate is valid at its own region's replicas).
    pub enroll_endpoint: String,
    /// `host:port` of the sign port (a list as for `enroll_endpoint`).
    pub sign_endpoint: String,
    /// `host:port` of the admin port (a list as for `enroll_endpoint`).
    pub admin_endpoint: String,
    /// Environments: name → audience.
    #[serde(default)]
    pub environments: BTreeMap<String, Environment>,
    /// The dev OIDC issuer (dev sites only).
    pub dev_issuer: Option<DevIssuer>,
    /// Admin identity (ops only).
    pub admin: Option<AdminIdentity>,
    /// Extra CA certificates (PEM) for the CI's token endpoint (a GitHub Enterprise Server
    /// behind a corporate CA); `--ca-file` sets it too.
    #[serde(default)]
    pub token_ca_file: Option<PathBuf>,
    /// Seconds to wait for a connection and TLS handshake (default 10).
    #[serde(default)]
    pub connect_timeout_seconds: Option<u64>,
    /// Seconds to wait for each RPC (default 60).
    #[serde(default)]
    pub rpc_timeout_seconds: Option<u64>,
    /// Other sites of the fleet (name → path of that site's client config), for
    /// `meshsign admin --all-sites` (see [`crate::usecase::fleet`]). This file's own site is not in
    /// the fleet unless it is listed too.
    #[serde(default)]
    pub sites: BTreeMap<String, PathBuf>,
    /// This runner instance (device key).
    #[serde(default)]
    pub runner: RunnerSection,
}

/// `[runner]`: this runner instance's device key.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerSection {
    /// The descriptor `meshsign runner init` wrote (`device.json`). When set (or when
    /// `MESHSIGN_DEVICE_KEY` is), enrollments and renewals carry the device key's proof and
    /// the runner fingerprint is the key's.
    #[serde(default)]
    pub device_key: Option<PathBuf>,
}

/// One environment (partition) of the site.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// The OIDC audience to request tokens for.
    pub audience: String,
}

/// The dev issuer's key, for `meshsign dev token`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevIssuer {
    /// `iss`.
    pub issuer: String,
    /// `kid`.
    pub kid: String,
    /// PKCS#8 PEM key file.
    pub key_file: PathBuf,
}

/// An ops client certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminIdentity {
    /// Certificate PEM.
    pub cert_file: PathBuf,
    /// Key PEM.
    pub key_file: PathBuf,
}

impl ClientConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::Config(format!(
                "client config {}: {e}; give the right file with --config or MESHSIGN_CONFIG \
                 (`meshsignd dev` writes one next to its site.toml)",
                path.display()
            ))
        })?;
        let mut cfg: ClientConfig = toml::from_str(&text)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut cfg.ca_file);
        if let Some(d) = cfg.dev_issuer.as_mut() {
            abs(&mut d.key_file);
        }
        if let Some(a) = cfg.admin.as_mut() {
            abs(&mut a.cert_file);
            abs(&mut a.key_file);
        }
        if let Some(d) = cfg.runner.device_key.as_mut() {
            abs(d);
        }
        Ok(cfg)
    }

    /// The config `--config` (or `MESHSIGN_CONFIG`) names, with the command line's
    /// `--connect-timeout` and `--timeout` over its own.
    pub fn load_with(
        path: Option<&Path>,
        timeouts: (Option<u64>, Option<u64>),
    ) -> Result<Self, ClientError> {
        let p = path.ok_or_else(|| {
            ClientError::Usage("give --config FILE or set MESHSIGN_CONFIG".into())
        })?;
        let mut cfg = Self::load(p)?;
        cfg.set_timeouts(timeouts);
        Ok(cfg)
    }

    /// `--connect-timeout` and `--timeout` (when given) over the config's.
    pub fn set_timeouts(&mut self, (connect, rpc): (Option<u64>, Option<u64>)) {
        if connect.is_some() {
            self.connect_timeout_seconds = connect;
        }
        if rpc.is_some() {
            self.rpc_timeout_seconds = rpc;
        }
    }

    /// The audience of an environment.
    pub fn audience(&self, environment: &str) -> Result<&str, ClientError> {
        self.environments
            .get(environment)
            .map(|e| e.audience.as_str())
            .ok_or_else(|| {
                ClientError::Config(format!(
                    "environment `{environment}` is not in the client config (known: {})",
                    self.environments
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}
