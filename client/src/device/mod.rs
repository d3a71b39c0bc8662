//! The runner instance's device key (issue 28): a P-256 key that never leaves where it was
//! made — a TPM 2.0, a PKCS#11 token, or (dev sites and tests only) a 0600 PKCS#8 file — and
//! whose SPKI hash is the runner fingerprint. `meshsign runner init` makes it and prints a
//! signed registration request; enrollment and renewal sign a proof of possession with it
//! (the transcripts are `meshsign_evidence::device`'s).
//!
//! What `runner init` writes is a small descriptor (`device.json`): the backend, the public
//! key, and where the key is (a file path, a PKCS#11 module + token + key id, or a TPM
//! persistent handle). It holds no secret: the file backend's key is in its own 0600 file,
//! a PKCS#11 PIN comes from `MESHSIGN_DEVICE_PIN` when the key is used.
//!
//! A macOS Secure Enclave backend would implement [`DeviceKey::sign`] with
//! `SecKeyCreateSignature(.ecdsaSignatureMessageX962SHA256)` on a key made by
//! `SecKeyCreateRandomKey` with `kSecAttrTokenIDSecureEnclave`; it is not shipped until a Mac
//! runner can test it (docs/design-notes.md, "Runner device keys").

mod file;
mod pkcs11;
mod tpm;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use meshsign_evidence::device::{Backend, RegistrationRequest, SignedRegistration};
use serde::{Deserialize, Serialize};

use crate::ClientError;

pub use pkcs11::Pkcs11Location;
pub use tpm::TpmLocation;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The environment variable a PKCS#11 device key's user PIN is read from.
pub const PIN_ENV: &str = "MESHSIGN_DEVICE_PIN";
/// The environment variable naming the device-key descriptor when client.toml does not.
pub const DEVICE_KEY_ENV: &str = "MESHSIGN_DEVICE_KEY";

/// Where a device key is, as `runner init` wrote it (no secret in it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// The backend.
    pub backend: Backend,
    /// The public key (SPKI DER, base64).
    pub spki: String,
    /// The file backend's PKCS#8 file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The PKCS#11 backend's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Location>,
    /// The TPM backend's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmLocation>,
}

/// A device key, ready to sign proofs.
pub struct DeviceKey {
    descriptor: Descriptor,
    spki: Vec<u8>,
    path: PathBuf,
    /// The file backend's key, loaded once (its file was checked against `spki`).
    file_key: Option<aws_lc_rs::signature::EcdsaKeyPair>,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("backend", &self.descriptor.backend)
            .field("fingerprint", &self.fingerprint())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What `meshsign runner init` is asked for.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// The backend.
    pub backend: Backend,
    /// Where the descriptor (and a file key) go.
    pub dir: PathBuf,
    /// The runner instance's name (default: the host name).
    pub instance: String,
    /// PKCS#11: the module, the token's label, and a PIN file (else `MESHSIGN_DEVICE_PIN`).
    pub pkcs11: Option<(PathBuf, String, Option<PathBuf>)>,
    /// TPM: the TCTI (default: tpm2-tools' own) and the persistent handle to use.
    pub tpm: Option<(Option<String>, u32)>,
}

impl DeviceKey {
    /// Opens the descriptor at `path` and checks the key is there (a file key: its mode and
    /// its public key).
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read(path).map_err(ClientError::io(path))?;
        let descriptor: Descriptor = serde_json::from_slice(&text).map_err(|e| {
            ClientError::Config(format!(
                "{}: not a device-key descriptor from `meshsign runner init`: {e}",
                path.display()
            ))
        })?;
        let spki = B64
            .decode(&descriptor.spki)
            .map_err(|_| ClientError::Config(format!("{}: spki is not base64", path.display())))?;
        let mut key = Self {
            descriptor,
            spki,
            path: path.to_path_buf(),
            file_key: None,
        };
        if key.descriptor.backend == Backend::File {
            let file = key.file_path()?.to_path_buf();
            file::check(&file, &key.spki)?;
            key.file_key = Some(file::open(&file)?);
        }
        Ok(key)
    }

    /// The device key of this runner instance, if one is set up: client.toml's `[runner]
    /// device_key`, else `MESHSIGN_DEVICE_KEY`. None if neither names one.
    pub fn configured(cfg_path: Option<&Path>) -> Result<Option<Self>, ClientError> {
        let env = std::env::var_os(DEVICE_KEY_ENV).filter(|v| !v.is_empty());
        match cfg_path.map(Path::to_path_buf).or(env.map(PathBuf::from)) {
            Some(p) => Self::open(&p).map(Some),
            None => Ok(None),
        }
    }

    /// Makes a new device key, writes its descriptor into `opts.dir`, and returns the key
    /// with its signed registration request.
    pub fn init(opts: &InitOptions) -> Result<(Self, SignedRegistration), ClientError> {
        std::fs::create_dir_all(&opts.dir).map_err(ClientError::io(&opts.dir))?;
        let path = opts.dir.join("device.json");
        if path.exists() {
            return Err(ClientError::Usage(format!(
                "{} exists: this runner instance has a device key already (remove it, and \
                 retire its registration, to make a new one)",
                path.display()
            )));
        }
        let (descriptor, ek) = match opts.backend {
            Backend::File => (file::init(&opts.dir)?, tpm::Ek::default()),
            Backend::Pkcs11 => {
                let (module, token, pin_file) = opts.pkcs11.clone().ok_or_else(|| {
                    ClientError::Usage("--backend pkcs11 needs --pkcs11-module and --token".into())
                })?;
                let d = pkcs11::init(&module, &token, pin_file.as_deref(), &opts.instance)?;
                (d, tpm::Ek::default())
            }
            Backend::Tpm => {
                let (tcti, handle) = opts.tpm.clone().unwrap_or((None, tpm::DEFAULT_HANDLE));
                tpm::init(tcti, handle)?
            }
        };
        let json = serde_json::to_vec_pretty(&descriptor)
            .map_err(|e| ClientError::Crypto(e.to_string()))?;
        meshsign_evidence::files::write_atomic(&path, &json, false)
            .map_err(ClientError::io(&path))?;
        let key = Self::open(&path)?;
        let request = RegistrationRequest {
            backend: opts.backend,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
            ek_cert: ek.cert.map(|c| B64.encode(c)),
            ek_pub: ek.public.map(|p| B64.encode(p)),
            hostname: hostname(),
            instance: opts.instance.clone(),
            os_user: os_user(),
            spki: descriptor.spki.clone(),
        };
        let bytes = request
            .signed_bytes()
            .map_err(|e| ClientError::Usage(format!("registration request: {e}")))?;
        let signature = B64.encode(key.sign(&bytes)?);
        Ok((key, SignedRegistration { request, signature }))
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.descriptor.backend
    }

    /// The public key (SPKI DER).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// The runner fingerprint: hex SHA-256 of the SPKI.
    pub fn fingerprint(&self) -> String {
        meshsign_evidence::device::fingerprint(&self.spki)
    }

    /// The descriptor's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_path(&self) -> Result<&Path, ClientError> {
        self.descriptor.file.as_deref().ok_or_else(|| {
            ClientError::Config(format!("{}: a file key names no file", self.path.display()))
        })
    }

    /// Signs `message` (ECDSA P-256/SHA-256, DER) in the backend. A token's or a TPM's
    /// signature is checked against the recorded public key before it is used (a token that
    /// swapped keys fails here, not at the site); a file key was checked when it was opened.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let signature = match (self.descriptor.backend, &self.file_key) {
            (Backend::File, Some(key)) => return file::sign(key, message),
            (Backend::File, None) => {
                return Err(ClientError::Config(format!(
                    "{}: the file key was not opened",
                    self.path.display()
                )));
            }
            (Backend::Pkcs11, _) => {
                let at = self.descriptor.pkcs11.as_ref().ok_or_else(|| {
                    ClientError::Config(format!("{}: no pkcs11 location", self.path.display()))
                })?;
                pkcs11::sign(at, message)?
            }
            (Backend::Tpm, _) => {
                let at = self.descriptor.tpm.as_ref().ok_or_else(|| {
                    ClientError::Config(format!("{}: no tpm location", self.path.display()))
                })?;
                tpm::sign(at, message)?
            }
        };
        meshsign_evidence::device::verify(&self.spki, message, &signature).map_err(|e| {
            ClientError::Crypto(format!(
                "the {} device key at {} made a signature that does not verify under its \
                 recorded public key ({e}): was the key replaced?",
                self.descriptor.backend.as_str(),
                self.path.display()
            ))
        })?;
        Ok(signature)
    }
}

/// DER of a raw `r ‖ s` P-256 signature (PKCS#11 and some TPM outputs).
fn raw_to_der(raw: &[u8]) -> Result<Vec<u8>, ClientError> {
    let sig = p256::ecdsa::Signature::from_slice(raw)
        .map_err(|_| ClientError::Crypto(format!("a {}-byte raw ECDSA signature", raw.len())))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// SPKI DER of a SEC1 P-256 point.
fn point_to_spki(point: &[u8]) -> Result<Vec<u8>, ClientError> {
    use p256::pkcs8::EncodePublicKey as _;
    let key = p256::PublicKey::from_sec1_bytes(point)
        .map_err(|_| ClientError::Crypto("the device key is not a P-256 point".into()))?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| ClientError::Crypto(e.to_string()))
}

/// The machine's host name (for the registration request).
pub fn hostname() -> String {
    let from_file = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string());
    let name = from_file.filter(|h| !h.is_empty()).or_else(|| {
        std::process::Command::new("hostname")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    clean(name.unwrap_or_default(), "unknown-host")
}

/// The OS user this process runs as (for the registration request).
pub fn os_user() -> String {
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    clean(name, "unknown-user")
}

fn clean(s: String, fallback: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).take(255).collect();
    if s.is_empty() { fallback.into() } else { s }
}
