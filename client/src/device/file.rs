//! The `file` backend: a P-256 PKCS#8 key in a 0600 file next to the descriptor. For dev
//! sites and tests only: anyone who can read the file is the runner (an environment refuses
//! it with `runner_backends`).

use std::path::Path;

use p256::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
use zeroize::Zeroizing;

use super::{B64, Backend, Descriptor};
use crate::ClientError;
use base64::Engine as _;

const FILE_NAME: &str = "device-key.p8";

/// Makes the key and its file (mode 0600).
pub(super) fn init(dir: &Path) -> Result<Descriptor, ClientError> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Crypto(format!("device key: {e}")))?;
    let der = Zeroizing::new(pair.serialize_der());
    let key = p256::ecdsa::SigningKey::from_pkcs8_der(&der)
        .map_err(|e| ClientError::Crypto(format!("device key: {e}")))?;
    let path = dir.join(FILE_NAME);
    meshsign_evidence::files::write_atomic(&path, &der, true).map_err(ClientError::io(&path))?;
    let spki = key
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
    Ok(Descriptor {
        backend: Backend::File,
        spki: B64.encode(spki.as_bytes()),
        file: Some(path),
        pkcs11: None,
        tpm: None,
    })
}

fn load(path: &Path) -> Result<p256::ecdsa::SigningKey, ClientError> {
    let der = Zeroizing::new(std::fs::read(path).map_err(ClientError::io(path))?);
    p256::ecdsa::SigningKey::from_pkcs8_der(&der).map_err(|_| {
        ClientError::Config(format!(
            "{}: not a P-256 PKCS#8 key (make one with `meshsign runner init --backend file`)",
            path.display()
        ))
    })
}

/// The key file is private to its user and holds the recorded key.
pub(super) fn check(path: &Path, spki: &[u8]) -> Result<(), ClientError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(ClientError::io(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ClientError::Config(format!(
                "{}: the device key is readable by others (mode {:o}); `chmod 600` it, or \
                 make a new one: any user who read it can pose as this runner",
                path.display(),
                mode & 0o777
            )));
        }
    }
    let ours = load(path)?
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
    if ours.as_bytes() != spki {
        return Err(ClientError::Config(format!(
            "{}: holds another key than its descriptor records",
            path.display()
        )));
    }
    Ok(())
}

/// The file's key, loaded for signing (aws-lc: the proof is on every enrollment's path). The
/// key was checked against the descriptor's public key by [`check`].
pub(super) fn open(path: &Path) -> Result<aws_lc_rs::signature::EcdsaKeyPair, ClientError> {
    let der = Zeroizing::new(std::fs::read(path).map_err(ClientError::io(path))?);
    aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &der,
    )
    .map_err(|_| {
        ClientError::Config(format!(
            "{}: not a P-256 PKCS#8 key (make one with `meshsign runner init --backend file`)",
            path.display()
        ))
    })
}

/// Signs with the loaded key (ECDSA P-256/SHA-256, DER).
pub(super) fn sign(
    key: &aws_lc_rs::signature::EcdsaKeyPair,
    message: &[u8],
) -> Result<Vec<u8>, ClientError> {
    key.sign(&aws_lc_rs::rand::SystemRandom::new(), message)
        .map(|s| s.as_ref().to_vec())
        .map_err(|_| ClientError::Crypto("the device key could not sign".into()))
}
