//! The runner side: a P-256 key in memory, enrollment, and signing over mutual TLS.

use meshsign_proto::v1::{self, enrollment_client::EnrollmentClient, signer_client::SignerClient};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::transport::{self, ClientIdentity};
use crate::{ClientConfig, ClientError};

/// A runner's P-256 key. Made in memory; never written anywhere; zeroized on drop.
pub struct RunnerKey(Zeroizing<KeyPair>);

impl std::fmt::Debug for RunnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunnerKey([redacted])")
    }
}

impl RunnerKey {
    /// A fresh key.
    pub fn generate() -> Result<Self, ClientError> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|k| Self(Zeroizing::new(k)))
            .map_err(|e| ClientError::Crypto(e.to_string()))
    }

    /// A PKCS#10 CSR for this key. The site ignores everything in it but the key.
    pub fn csr_der(&self) -> Result<Vec<u8>, ClientError> {
        let csr = CertificateParams::default()
            .serialize_request(&*self.0)
            .map_err(|e| ClientError::Crypto(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// The TLS client identity for a certificate this key enrolled (memory only).
    pub fn identity(&self, enrollment: &v1::EnrollResponse) -> ClientIdentity {
        ClientIdentity {
            chain: enrollment
                .certificate_chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.serialize_der())),
        }
    }
}

/// This machine's runner fingerprint: `MESHSIGN_RUNNER_FINGERPRINT` if set, else
/// SHA-256("meshsign-runner-v1" ‖ 0 ‖ /etc/machine-id (or the hostname) ‖ 0 ‖ `RUNNER_NAME`).
pub fn local_fingerprint() -> String {
    if let Ok(fp) = std::env::var("MESHSIGN_RUNNER_FINGERPRINT") {
        return fp;
    }
    let machine = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let runner = std::env::var("RUNNER_NAME").unwrap_or_default();
    let mut input = b"meshsign-runner-v1\0".to_vec();
    input.extend_from_slice(machine.trim().as_bytes());
    input.push(0);
    input.extend_from_slice(runner.as_bytes());
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &input,
    ))
}

/// What to enroll with.
#[derive(Clone)]
pub struct EnrollParams {
    /// Environment the runner expects.
    pub environment: String,
    /// OIDC token.
    pub token: String,
    /// Runner fingerprint.
    pub fingerprint: String,
    /// Requested TTL (0 = the partition's cap).
    pub requested_ttl_seconds: u32,
    /// Region to name (defaults to the config's).
    pub region: Option<String>,
}

impl std::fmt::Debug for EnrollParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollParams")
            .field("environment", &self.environment)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// Calls Enroll on the enroll port with a CSR for `key`.
pub async fn enroll(
    cfg: &ClientConfig,
    key: &RunnerKey,
    p: &EnrollParams,
) -> Result<v1::EnrollResponse, ClientError> {
    let tls = transport::tls_config(transport::roots(cfg)?, None)?;
    let ch = transport::connect(&cfg.enroll_endpoint, &cfg.server_name, tls).await?;
    let req = v1::EnrollRequest {
        token: p.token.clone(),
        csr_der: key.csr_der()?,
        runner_fingerprint: p.fingerprint.clone(),
        region: p.region.clone().unwrap_or_else(|| cfg.region.clone()),
        requested_ttl_seconds: p.requested_ttl_seconds,
        environment: p.environment.clone(),
    };
    let resp = EnrollmentClient::new(ch)
        .enroll(req)
        .await
        .map_err(|s| ClientError::rpc("Enroll", s))?;
    Ok(resp.into_inner())
}

/// An enrolled runner: its certificate, key and a sign-port channel, all in memory.
#[derive(Debug)]
pub struct Session {
    /// The enrollment response (certificate chain, serial, expiry).
    pub enrollment: v1::EnrollResponse,
    /// Signer client on the sign port.
    pub signer: SignerClient<Channel>,
}

impl Session {
    /// Generates a key, enrolls, and opens the sign port with the new certificate.
    pub async fn start(cfg: &ClientConfig, p: &EnrollParams) -> Result<Self, ClientError> {
        let key = RunnerKey::generate()?;
        let enrollment = enroll(cfg, &key, p).await?;
        let signer = Self::connect_signer(cfg, &key, &enrollment).await?;
        Ok(Self { enrollment, signer })
    }

    /// Opens a sign-port channel presenting `enrollment`'s certificate with `key`.
    pub async fn connect_signer(
        cfg: &ClientConfig,
        key: &RunnerKey,
        enrollment: &v1::EnrollResponse,
    ) -> Result<SignerClient<Channel>, ClientError> {
        let tls = transport::tls_config(transport::roots(cfg)?, Some(key.identity(enrollment)))?;
        let ch = transport::connect(&cfg.sign_endpoint, &cfg.server_name, tls).await?;
        Ok(SignerClient::new(ch))
    }

    /// Signs one SHA-256 digest.
    pub async fn sign_digest(
        &mut self,
        alias: &str,
        digest: [u8; 32],
        artifact: &str,
    ) -> Result<v1::SignResponse, ClientError> {
        let req = v1::SignRequest {
            key_alias: alias.to_string(),
            input: Some(v1::sign_request::Input::Sha256Digest(digest.to_vec())),
            artifact_name: artifact.to_string(),
            algorithm: String::new(),
        };
        Ok(self
            .signer
            .sign(req)
            .await
            .map_err(|s| ClientError::rpc("Sign", s))?
            .into_inner())
    }

    /// Revokes this session's certificate at the site (a finished job leaves no live
    /// credential); `reason` is recorded in the audit log.
    pub async fn revoke_self(&mut self, reason: &str) -> Result<String, ClientError> {
        Ok(self
            .signer
            .revoke_self(v1::RevokeSelfRequest {
                reason: reason.to_string(),
            })
            .await
            .map_err(|s| ClientError::rpc("RevokeSelf", s))?
            .into_inner()
            .serial)
    }
}
