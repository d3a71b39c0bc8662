//! `meshsign runner init` and what the runner verbs say of the device key: this runner
//! instance's key (issue 28, [`crate::device`]), its fingerprint, and the warning a runner
//! without one gets.

use std::path::{Path, PathBuf};

use meshsign_evidence::device::Backend;

use crate::device::{DeviceKey, InitOptions};
use crate::{ClientConfig, ClientError};

/// `meshsign runner init`.
#[derive(clap::Args, Clone, Debug)]
pub struct InitArgs {
    /// Where the key lives: tpm (TPM 2.0 via tpm2-tools), pkcs11 (a token), or file (a 0600
    /// PKCS#8 file: dev sites and tests only).
    #[arg(long, value_parser = ["tpm", "pkcs11", "file"])]
    pub backend: String,
    /// The folder for device.json (and a file key); point `[runner] device_key` at
    /// DIR/device.json.
    #[arg(long)]
    pub dir: PathBuf,
    /// This runner instance's name (default: the host name).
    #[arg(long)]
    pub instance: Option<String>,
    /// pkcs11: the PKCS#11 module.
    #[arg(long)]
    pub pkcs11_module: Option<PathBuf>,
    /// pkcs11: the token's label.
    #[arg(long)]
    pub token: Option<String>,
    /// pkcs11: a file (0600) holding the token's user PIN, kept in device.json for later use;
    /// without it the PIN comes from MESHSIGN_DEVICE_PIN each time.
    #[arg(long)]
    pub pin_file: Option<PathBuf>,
    /// tpm: the TCTI (default: tpm2-tools' own, or TPM2TOOLS_TCTI).
    #[arg(long)]
    pub tcti: Option<String>,
    /// tpm: the persistent handle for the key (hex).
    #[arg(long, default_value = "0x81010050")]
    pub tpm_handle: String,
}

/// Makes the device key, writes DIR/device.json and DIR/registration.json, and returns the
/// signed registration request (for an operator's `admin runner register --request`).
pub fn init(args: &InitArgs) -> Result<serde_json::Value, ClientError> {
    let backend = match args.backend.as_str() {
        "tpm" => Backend::Tpm,
        "pkcs11" => Backend::Pkcs11,
        _ => Backend::File,
    };
    let handle = u32::from_str_radix(args.tpm_handle.trim_start_matches("0x"), 16)
        .ok()
        .filter(|h| h >> 24 == 0x81)
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "--tpm-handle {}: not a persistent handle (0x81000000–0x81ffffff)",
                args.tpm_handle
            ))
        })?;
    let opts = InitOptions {
        backend,
        dir: args.dir.clone(),
        instance: args
            .instance
            .clone()
            .unwrap_or_else(crate::device::hostname),
        pkcs11: args
            .pkcs11_module
            .clone()
            .zip(args.token.clone())
            .map(|(m, t)| (m, t, args.pin_file.clone())),
        tpm: Some((args.tcti.clone(), handle)),
    };
    let (key, signed) = DeviceKey::init(&opts)?;
    let path = args.dir.join("registration.json");
    let json =
        serde_json::to_vec_pretty(&signed).map_err(|e| ClientError::Crypto(e.to_string()))?;
    meshsign_evidence::files::write_atomic(&path, &json, false).map_err(ClientError::io(&path))?;
    crate::notes::note(&format!(
        "device key {} ({}) at {}; its registration request (also in {}):",
        key.fingerprint(),
        key.backend().as_str(),
        key.path().display(),
        path.display()
    ));
    serde_json::to_value(&signed).map_err(|e| ClientError::Crypto(e.to_string()))
}

/// The device key client.toml (`[runner] device_key`) or `MESHSIGN_DEVICE_KEY` names.
pub fn configured(config: Option<&Path>) -> Result<Option<DeviceKey>, ClientError> {
    let from_config = match config {
        Some(p) => ClientConfig::load(p)?.runner.device_key,
        None => None,
    };
    DeviceKey::configured(from_config.as_deref())
}

/// `meshsign fingerprint`: the device key's fingerprint and backend, else the machine-derived
/// fingerprint, said to be only claimed.
pub fn fingerprint(config: Option<&Path>) -> Result<(String, String), ClientError> {
    if let Some(d) = configured(config)? {
        return Ok((
            d.fingerprint(),
            format!(
                "device key ({}, {})",
                d.backend().as_str(),
                d.path().display()
            ),
        ));
    }
    let (fp, source) = crate::session::fingerprint();
    Ok((
        fp,
        format!("{source}; claimed, not proven: no device key (`meshsign runner init`)"),
    ))
}

/// `meshsign preflight`'s warning (on stderr, not a finding) for a runner without a usable
/// device key.
pub fn warn_if_missing(config: Option<&Path>) {
    if let Some(w) = missing_warning(config) {
        crate::notes::note(&format!("warning: {w}"));
    }
}

/// The warning `meshsign preflight` gives a runner without a device key.
pub fn missing_warning(config: Option<&Path>) -> Option<String> {
    match configured(config) {
        Ok(Some(_)) => None,
        Ok(None) => Some(
            "this runner has no device key: its fingerprint is only claimed, and environments \
             with runners = \"registered\" refuse it; run `meshsign runner init` and have it \
             registered (`meshsign admin runner register`)"
                .into(),
        ),
        Err(e) => Some(format!("the device key cannot be used: {e}")),
    }
}
