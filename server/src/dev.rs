//! Dev mode: `meshsignd dev` makes (once) and reuses a folder holding a dev PKI, a dev OIDC
//! issuer, a KEK and a site config, then serves on loopback and writes `client.toml`.
//!
//! Owns: the dev folder. Must not touch: anything a production site runs.
//!
//! Only in builds with the `dev` cargo feature (the default); a production build has no dev
//! PKI, no dev issuer and no `dev` subcommand. Every file is written atomically (temp + rename),
//! so a client never reads a half-written `client.toml`.
//!
//! Layout of the folder:
//! ```text
//! site.toml     the site config (dev = true), a starting point for a real one
//! client.toml   endpoints, CA bundle, dev issuer, admin identity (rewritten at each start)
//! kek           the key-encryption key (dev only: a real site reads it from a credential)
//! pki/          server CA + certificate, admin CA + client certificate, dev OIDC key + JWKS
//! data/         the sled database (keys in it are encrypted under the KEK)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshsign_certs_dev::{DevPki, JwtAlg, OidcIssuer, files};

use crate::custody::Kek;

/// Trust domain of dev sites.
pub const TRUST_DOMAIN: &str = "meshsign.dev";
/// Region of dev sites unless `meshsignd dev --region` names another.
pub const REGION: &str = "local";
/// Issuer URL of the dev OIDC issuer.
pub const DEV_ISSUER: &str = "https://oidc.meshsign.dev";
/// `kid` of the dev OIDC issuer key.
pub const DEV_KID: &str = "dev-1";
/// Partitions of a dev site.
pub const ENVIRONMENTS: [&str; 2] = ["staging", "production"];

/// Dev setup failures.
#[derive(Debug, thiserror::Error)]
pub enum DevSetupError {
    /// Generating dev material failed.
    #[error(transparent)]
    Dev(#[from] meshsign_certs_dev::DevError),
    /// The KEK could not be written.
    #[error(transparent)]
    Custody(#[from] crate::custody::CustodyError),
    /// The region cannot name a site.
    #[error("region `{0}`: use 1 to 32 letters, digits and '-'")]
    Region(String),
    /// A file or folder could not be written.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevSetupError + '_ {
    move |source| DevSetupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The audience of a dev environment in `region`.
pub fn audience(environment: &str, region: &str) -> String {
    format!("meshsign:{environment}:{region}")
}

/// Creates the dev folder on first use (for [`REGION`]); returns the path of its `site.toml`.
pub fn prepare(dir: &Path) -> Result<PathBuf, DevSetupError> {
    prepare_region(dir, REGION)
}

/// [`prepare`] for a site in `region` (several dev sites on one machine make a fleet). The
/// region is fixed when the folder is made.
pub fn prepare_region(dir: &Path, region: &str) -> Result<PathBuf, DevSetupError> {
    if region.is_empty()
        || region.len() > 32
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(DevSetupError::Region(crate::model::bounded(region, 40)));
    }
    let site_toml = dir.join("site.toml");
    if site_toml.exists() {
        return Ok(site_toml);
    }
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(io(&pki))?;
    DevPki::generate(TRUST_DOMAIN)?.write_to(&pki)?;
    OidcIssuer::generate(DEV_ISSUER, DEV_KID, JwtAlg::Es256)?.write_to(&pki)?;
    Kek::generate_file(&dir.join("kek"))?;
    let mut toml = format!(
        r#"# Written by `meshsignd dev`. A real site: see deploy/site.example.toml.
trust_domain = "{TRUST_DOMAIN}"
region = "{region}"
data_dir = "data"
kek_file = "kek"
# Dev mode tolerates a loosely-permissioned KEK file and http:// issuers. Never in production.
dev = true

# One person runs a dev site: no two-person review (a real site keeps the default list; the
# second admin's certificate, pki/admin-2.pem, is there to try it: remove this table).
[review]
operations = []

[listen]
enroll = "127.0.0.1:7441"
sign = "127.0.0.1:7443"
admin = "127.0.0.1:7444"

[tls]
server_cert = "pki/{}"
server_key = "pki/{}"
admin_ca = "pki/{}"
"#,
        files::SERVER_CERT,
        files::SERVER_KEY,
        files::ADMIN_CA
    );
    for env in ENVIRONMENTS {
        toml.push_str(&format!(
            r#"
[[environments]]
name = "{env}"
audience = "{aud}"
build_p95_seconds = 1200
# A dev site takes a runner's word for its fingerprint; a production site sets "registered"
# (device keys: `meshsign runner init`, `meshsign admin runner register`).
runners = "claimed"

[[environments.signing_keys]]
alias = "release"
algorithm = "ecdsa-p256-sha256"
access = {{ repositories = ["*"], refs = ["*"] }}

[[environments.signing_keys]]
alias = "attest"
algorithm = "ecdsa-p256-sha256"
purposes = ["attestation"]
access = {{ repositories = ["*"], refs = ["*"] }}

[[environments.trust_policies]]
name = "dev"
issuer = "{DEV_ISSUER}"
jwks_file = "pki/{jwks}"
bound_claims = {{ repository_owner_id = "{owner}", environment = "{env}" }}
"#,
            aud = audience(env, region),
            jwks = files::OIDC_JWKS,
            owner = meshsign_certs_dev::GITHUB_OWNER_ID,
        ));
    }
    meshsign_evidence::files::write_atomic(&site_toml, toml.as_bytes(), false)
        .map_err(io(&site_toml))?;
    Ok(site_toml)
}

/// Writes `client.toml` for the addresses actually bound.
pub fn write_client_toml(
    dir: &Path,
    region: &str,
    enroll: SocketAddr,
    sign: SocketAddr,
    admin: SocketAddr,
) -> Result<PathBuf, DevSetupError> {
    let mut toml = format!(
        r#"# Written by `meshsignd dev` at each start. Use: meshsign --config {path} ...
region = "{region}"
trust_domain = "{TRUST_DOMAIN}"
server_name = "localhost"
ca_file = "pki/{ca}"
enroll_endpoint = "{enroll}"
sign_endpoint = "{sign}"
admin_endpoint = "{admin}"

[dev_issuer]
issuer = "{DEV_ISSUER}"
kid = "{DEV_KID}"
key_file = "pki/{oidc}"

[admin]
cert_file = "pki/{acert}"
key_file = "pki/{akey}"
"#,
        path = dir.join("client.toml").display(),
        ca = files::SERVER_CA,
        oidc = files::OIDC_KEY,
        acert = files::ADMIN_CERT,
        akey = files::ADMIN_KEY,
    );
    for env in ENVIRONMENTS {
        toml.push_str(&format!(
            "\n[environments.{env}]\naudience = \"{}\"\n",
            audience(env, region)
        ));
    }
    let path = dir.join("client.toml");
    meshsign_evidence::files::write_atomic(&path, toml.as_bytes(), false).map_err(io(&path))?;
    Ok(path)
}

/// Adds `[pkcs11]` and a key `hsm` (ECDSA P-256, generated in that token) to every environment
/// of a dev site's configuration (`meshsignd dev --pkcs11-module …`).
pub fn add_hsm_key(
    cfg: &mut crate::config::SiteConfig,
    module: PathBuf,
    token_label: String,
    pin_file: PathBuf,
) -> Result<(), String> {
    cfg.pkcs11 = Some(crate::custody::pkcs11::Pkcs11Config {
        module,
        token_label,
        pin_file,
        sessions: 8,
        audit_key: false,
        runner_cas: false,
    });
    for env in &mut cfg.environments {
        let release = env
            .signing_keys
            .iter()
            .find(|k| k.alias == "release")
            .cloned()
            .ok_or("the dev site has no key `release`")?;
        env.signing_keys.push(crate::config::KeySpec {
            alias: "hsm".into(),
            backend: crate::custody::Backend::Pkcs11,
            ..release
        });
    }
    Ok(())
}
