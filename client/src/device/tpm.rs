//! The `tpm` backend: a P-256 signing key under the TPM 2.0 owner hierarchy, created inside
//! the TPM (`fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign`: it can be neither
//! duplicated nor read out) and made persistent at a handle. The TPM is driven through
//! tpm2-tools (the TCG software stack's reference CLI, Debian `tpm2-tools`), so `meshsign`
//! links no TPM library and runs unchanged on runners without a TPM; the TCTI is theirs
//! (`TPM2TOOLS_TCTI`, or `--tcti` kept in the descriptor).
//!
//! The registration request carries the TPM's endorsement key (and its certificate, from the
//! TPM's NV index, where the manufacturer put one) so an operator can match the runner to the
//! asset record.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{B64, Backend, Descriptor};
use crate::ClientError;

/// The persistent handle `runner init --backend tpm` uses unless told another.
pub const DEFAULT_HANDLE: u32 = 0x8101_0050;
/// The TCG's NV indexes of EK certificates: RSA 2048, then ECC P-256.
const EK_CERT_INDEXES: [(&str, &str); 2] = [("0x01c00002", "rsa"), ("0x01c0000a", "ecc")];

/// Where a TPM device key is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmLocation {
    /// The TCTI (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`); none for tpm2-tools' default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcti: Option<String>,
    /// The persistent handle (`0x81…`).
    pub handle: String,
}

/// The TPM's endorsement key, for the registration request.
#[derive(Default)]
pub(super) struct Ek {
    pub(super) public: Option<Vec<u8>>,
    pub(super) cert: Option<Vec<u8>>,
}

struct Tools<'a> {
    tcti: Option<&'a str>,
    work: &'a Path,
}

impl Tools<'_> {
    /// Runs one tpm2-tools command in the work folder; its stderr names the failure.
    fn run(&self, tool: &str, args: &[&str]) -> Result<Vec<u8>, ClientError> {
        let mut cmd = Command::new(tool);
        cmd.args(args).current_dir(self.work);
        if let Some(t) = self.tcti {
            cmd.env("TPM2TOOLS_TCTI", t);
        }
        let out = cmd.output().map_err(|e| {
            ClientError::Config(format!(
                "{tool}: {e} (the tpm backend needs tpm2-tools: `apt-get install tpm2-tools`)"
            ))
        })?;
        // Without a resource manager (a simulator, /dev/tpm0) a tool leaves its objects
        // loaded: flush them, or the TPM runs out of object slots.
        let mut flush = Command::new("tpm2_flushcontext");
        flush.arg("-t").current_dir(self.work);
        if let Some(t) = self.tcti {
            flush.env("TPM2TOOLS_TCTI", t);
        }
        let _ = flush.output();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(ClientError::Crypto(format!(
                "{tool} failed ({}): {}",
                out.status,
                meshsign_evidence::audit::excerpt(last, 200)
            )));
        }
        Ok(out.stdout)
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        let p = self.work.join(name);
        std::fs::read(&p).map_err(ClientError::io(&p))
    }
}

/// A private work folder, removed when dropped.
struct Work(std::path::PathBuf);

impl Work {
    fn new() -> Result<Self, ClientError> {
        let id = meshsign_evidence::files::random_id()
            .map_err(|e| ClientError::Crypto(e.to_string()))?;
        let p = std::env::temp_dir().join(format!("meshsign-tpm-{}", &id[..12]));
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            b.mode(0o700);
        }
        b.create(&p).map_err(ClientError::io(&p))?;
        Ok(Self(p))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates the key in the TPM, makes it persistent at `handle`, and reads the EK.
pub(super) fn init(tcti: Option<String>, handle: u32) -> Result<(Descriptor, Ek), ClientError> {
    let work = Work::new()?;
    let t = Tools {
        tcti: tcti.as_deref(),
        work: &work.0,
    };
    let handle = format!("0x{handle:08x}");
    t.run(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256",
            "-c",
            "primary.ctx",
        ],
    )?;
    t.run(
        "tpm2_create",
        &[
            "-C",
            "primary.ctx",
            "-G",
            "ecc256:ecdsa-sha256",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "-u",
            "key.pub",
            "-r",
            "key.priv",
        ],
    )?;
    t.run(
        "tpm2_load",
        &[
            "-C",
            "primary.ctx",
            "-u",
            "key.pub",
            "-r",
            "key.priv",
            "-c",
            "key.ctx",
        ],
    )?;
    t.run("tpm2_evictcontrol", &["-C", "o", "-c", "key.ctx", &handle])
        .map_err(|e| {
            ClientError::Usage(format!(
                "{e}: is persistent handle {handle} taken? (`tpm2_getcap handles-persistent`; \
                 pick another with --tpm-handle)"
            ))
        })?;
    t.run(
        "tpm2_readpublic",
        &["-c", &handle, "-f", "der", "-o", "key.der"],
    )?;
    let spki = t.read("key.der")?;
    let ek = endorsement(&t);
    Ok((
        Descriptor {
            backend: Backend::Tpm,
            spki: B64.encode(spki),
            file: None,
            pkcs11: None,
            tpm: Some(TpmLocation { tcti, handle }),
        },
        ek,
    ))
}

/// The EK whose certificate the TPM holds (RSA first, then ECC), or an ECC EK without one.
fn endorsement(t: &Tools<'_>) -> Ek {
    let ek_pub = |alg: &str| -> Option<Vec<u8>> {
        t.run(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", alg, "-u", "ek.pub"],
        )
        .ok()?;
        t.run(
            "tpm2_readpublic",
            &["-c", "ek.ctx", "-f", "der", "-o", "ek.der"],
        )
        .ok()?;
        t.read("ek.der").ok()
    };
    for (index, alg) in EK_CERT_INDEXES {
        if t.run("tpm2_nvread", &[index, "-C", "o", "-o", "ek.crt"])
            .is_ok()
            && let Ok(cert) = t.read("ek.crt")
        {
            return Ek {
                public: ek_pub(alg),
                cert: Some(trim_der(cert)),
            };
        }
    }
    Ek {
        public: ek_pub("ecc"),
        cert: None,
    }
}

/// An NV index is read whole: keep the certificate's DER, not the padding after it.
fn trim_der(mut b: Vec<u8>) -> Vec<u8> {
    if let Some((_, _, rest)) = meshsign_evidence::der::tlv(&b) {
        let len = b.len() - rest.len();
        b.truncate(len);
    }
    b
}

/// Signs `message` (the TPM hashes nothing: tpm2_sign hashes it with SHA-256 and the key
/// signs the digest; `plain` output is the DER ECDSA signature).
pub(super) fn sign(at: &TpmLocation, message: &[u8]) -> Result<Vec<u8>, ClientError> {
    let work = Work::new()?;
    let t = Tools {
        tcti: at.tcti.as_deref(),
        work: &work.0,
    };
    let msg = work.0.join("msg");
    std::fs::write(&msg, message).map_err(ClientError::io(&msg))?;
    t.run(
        "tpm2_sign",
        &[
            "-c", &at.handle, "-g", "sha256", "-f", "plain", "-o", "sig", "msg",
        ],
    )?;
    t.read("sig")
}
