//! A job's credentials: a P-256 runner key in memory, enrollment, renewal, and signing over
//! mutual TLS; where the job's OIDC token comes from is [`token`].

pub mod job;
pub mod token;

use meshsign_proto::v1::{self, enrollment_client::EnrollmentClient, signer_client::SignerClient};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::net::{self, ClientIdentity};
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

    /// The public key (SPKI DER).
    pub fn spki_der(&self) -> Vec<u8> {
        use rcgen::PublicKeyData as _;
        self.0.subject_public_key_info()
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

/// Where a runner fingerprint came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FingerprintSource {
    /// `MESHSIGN_RUNNER_FINGERPRINT` (or `--fingerprint`).
    Override,
    /// macOS: the platform UUID (`IOPlatformUUID`, from `ioreg`).
    PlatformUuid,
    /// Linux: `/etc/machine-id`.
    MachineId,
    /// Neither: the host name (weak — runners cloned from one image may share it).
    Hostname,
}

impl std::fmt::Display for FingerprintSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FingerprintSource::Override => "MESHSIGN_RUNNER_FINGERPRINT",
            FingerprintSource::PlatformUuid => "IOPlatformUUID (macOS platform UUID)",
            FingerprintSource::MachineId => "/etc/machine-id",
            FingerprintSource::Hostname => "host name (no machine id found)",
        })
    }
}

/// The `IOPlatformUUID` in `ioreg -rd1 -c IOPlatformExpertDevice` output.
pub fn parse_platform_uuid(ioreg: &str) -> Option<String> {
    ioreg.lines().find_map(|l| {
        let (_, rest) = l.split_once("\"IOPlatformUUID\"")?;
        let uuid = rest.split('"').nth(1)?;
        (uuid.len() == 36 && uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
            .then(|| uuid.to_ascii_lowercase())
    })
}

/// This machine's runner fingerprint and where it came from: `MESHSIGN_RUNNER_FINGERPRINT` if
/// set, else SHA-256("meshsign-runner-v2" ‖ 0 ‖ machine id), the machine id being the macOS
/// platform UUID or Linux's `/etc/machine-id` (the host name only if neither exists). Runner
/// names are not part of it: GitLab does not set `RUNNER_NAME`, and two Macs must not share a
/// fingerprint because of it.
pub fn fingerprint() -> (String, FingerprintSource) {
    if let Ok(fp) = std::env::var("MESHSIGN_RUNNER_FINGERPRINT") {
        return (fp, FingerprintSource::Override);
    }
    let platform = std::process::Command::new("ioreg")
        .args(["-rd1", "-c", "IOPlatformExpertDevice"])
        .output()
        .ok()
        .and_then(|o| parse_platform_uuid(&String::from_utf8_lossy(&o.stdout)));
    let (machine, source) = match platform {
        Some(uuid) => (uuid, FingerprintSource::PlatformUuid),
        None => match std::fs::read_to_string("/etc/machine-id") {
            Ok(id) if !id.trim().is_empty() => {
                (id.trim().to_string(), FingerprintSource::MachineId)
            }
            _ => (
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default(),
                FingerprintSource::Hostname,
            ),
        },
    };
    let mut input = b"meshsign-runner-v2\0".to_vec();
    input.extend_from_slice(machine.as_bytes());
    (
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &input,
        )),
        source,
    )
}

/// This machine's runner fingerprint (see [`fingerprint`]).
pub fn local_fingerprint() -> String {
    fingerprint().0
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    #[test]
    fn platform_uuid_is_read_from_ioreg_output() {
        let out = r#"+-o J316sAP  <class IOPlatformExpertDevice, id 0x100000232, registered, matched, active, busy 0 (0 ms), retain 44>
    {
      "IOPlatformSerialNumber" = "C02XXXXXXXXX"
      "IOPlatformUUID" = "5A2D3F4C-1B2E-4F3A-9C8D-7E6F5A4B3C2D"
      "model" = <"MacBookPro18,1">
    }"#;
        assert_eq!(
            parse_platform_uuid(out).as_deref(),
            Some("5a2d3f4c-1b2e-4f3a-9c8d-7e6f5a4b3c2d")
        );
        assert_eq!(parse_platform_uuid("no such key"), None);
        assert_eq!(parse_platform_uuid(r#""IOPlatformUUID" = "short""#), None);
    }
}

/// What to enroll with.
#[derive(Clone)]
pub struct EnrollParams {
    /// This runner instance's device key, if it has one: the enrollment then carries its
    /// proof of possession and the fingerprint is the key's.
    pub device: Option<std::sync::Arc<crate::device::DeviceKey>>,
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
    let tls = net::tls_config(net::roots(cfg)?, None)?;
    let ch = net::connect_to(cfg, &cfg.enroll_endpoint, tls).await?;
    let req = enroll_request(cfg, key, p)?;
    let resp = EnrollmentClient::new(ch)
        .enroll(req)
        .await
        .map_err(|s| ClientError::rpc("Enroll", s))?;
    Ok(resp.into_inner())
}

/// The Enroll request for `key` (a CSR) with `p`'s token, and the device key's proof when
/// `p` has a device key.
pub fn enroll_request(
    cfg: &ClientConfig,
    key: &RunnerKey,
    p: &EnrollParams,
) -> Result<v1::EnrollRequest, ClientError> {
    let region = p.region.clone().unwrap_or_else(|| cfg.region.clone());
    let device_proof = match &p.device {
        Some(d) => Some(enroll_proof(d, key, p, &region)?),
        None => None,
    };
    Ok(v1::EnrollRequest {
        token: p.token.clone(),
        csr_der: key.csr_der()?,
        runner_fingerprint: p.fingerprint.clone(),
        region,
        requested_ttl_seconds: p.requested_ttl_seconds,
        environment: p.environment.clone(),
        device_proof,
    })
}

/// The device key's proof for an enrollment: its signature over the token's audience, `jti`
/// and `exp`, the CSR key, the region and the environment (`meshsign_evidence::device`).
fn enroll_proof(
    device: &crate::device::DeviceKey,
    key: &RunnerKey,
    p: &EnrollParams,
    region: &str,
) -> Result<v1::DeviceProof, ClientError> {
    let facts = token::facts(&p.token)?;
    let spki = key.spki_der();
    let transcript = meshsign_evidence::device::EnrollTranscript {
        audience: &facts.audience,
        jti: &facts.jti,
        exp: facts.exp,
        csr_spki_der: &spki,
        region,
        environment: &p.environment,
    }
    .bytes()
    .map_err(|e| ClientError::Token(format!("cannot bind this token to the device key: {e}")))?;
    Ok(v1::DeviceProof {
        spki: device.spki().to_vec(),
        signature: device.sign(&transcript)?,
    })
}

/// An enrolled runner: its certificate, key and a sign-port channel, all in memory.
#[derive(Debug)]
pub struct Session {
    /// The enrollment response (certificate chain, serial, expiry).
    pub enrollment: v1::EnrollResponse,
    /// Signer client on the sign port.
    pub signer: SignerClient<Channel>,
    /// The device key it enrolled with (renewals prove it again).
    pub device: Option<std::sync::Arc<crate::device::DeviceKey>>,
}

impl Session {
    /// Generates a key, enrolls, and opens the sign port with the new certificate.
    pub async fn start(cfg: &ClientConfig, p: &EnrollParams) -> Result<Self, ClientError> {
        let key = RunnerKey::generate()?;
        let enrollment = enroll(cfg, &key, p).await?;
        let signer = Self::connect_signer(cfg, &key, &enrollment).await?;
        Ok(Self {
            enrollment,
            signer,
            device: p.device.clone(),
        })
    }

    /// Opens a sign-port channel presenting `enrollment`'s certificate with `key`.
    pub async fn connect_signer(
        cfg: &ClientConfig,
        key: &RunnerKey,
        enrollment: &v1::EnrollResponse,
    ) -> Result<SignerClient<Channel>, ClientError> {
        let tls = net::tls_config(net::roots(cfg)?, Some(key.identity(enrollment)))?;
        let ch = net::connect_to(cfg, &cfg.sign_endpoint, tls).await?;
        Ok(SignerClient::new(ch))
    }

    /// Signs one SHA-256 digest.
    pub async fn sign_digest(
        &mut self,
        alias: &str,
        digest: [u8; 32],
        artifact: &str,
    ) -> Result<v1::SignResponse, ClientError> {
        self.sign(
            alias,
            v1::sign_request::Input::Sha256Digest(digest.to_vec()),
            artifact,
        )
        .await
    }

    /// Signs a short message (at most 4 KiB) with the site key `alias` (purpose `message`; the
    /// only input a P-384 or Ed25519 key takes).
    pub async fn sign_message(
        &mut self,
        alias: &str,
        message: &[u8],
        artifact: &str,
    ) -> Result<v1::SignResponse, ClientError> {
        self.sign(
            alias,
            v1::sign_request::Input::Message(message.to_vec()),
            artifact,
        )
        .await
    }

    /// An in-toto statement about `subjects` (name, SHA-256), built and signed by the site
    /// with the `attestation` key `alias`; `predicate_type` empty for the site's default.
    pub async fn attest(
        &mut self,
        alias: &str,
        subjects: &[(String, [u8; 32])],
        predicate_type: &str,
    ) -> Result<v1::AttestResponse, ClientError> {
        let req = v1::AttestRequest {
            key_alias: alias.to_string(),
            subjects: subjects
                .iter()
                .map(|(name, d)| v1::AttestSubject {
                    name: name.clone(),
                    sha256_digest: d.to_vec(),
                })
                .collect(),
            predicate_type: predicate_type.to_string(),
        };
        Ok(self
            .signer
            .attest(req)
            .await
            .map_err(|s| ClientError::rpc("Attest", s))?
            .into_inner())
    }

    /// An App Store Connect API token minted by the site with the `asc-api` key `alias`
    /// (`scopes` a subset of the key's, empty for its own; `ttl_seconds` 0 for 1200).
    pub async fn asc_token(
        &mut self,
        alias: &str,
        scopes: &[String],
        ttl_seconds: u32,
    ) -> Result<v1::AscTokenResponse, ClientError> {
        let req = v1::AscTokenRequest {
            key_alias: alias.to_string(),
            scopes: scopes.to_vec(),
            ttl_seconds,
        };
        Ok(self
            .signer
            .asc_token(req)
            .await
            .map_err(|s| ClientError::rpc("AscToken", s))?
            .into_inner())
    }

    /// Signs up to the site's batch limit of SHA-256 digests in one SignBatch call; the answer
    /// is split into one Sign response per digest (same key, audit entry and time; each with
    /// its own signature and transparency-log entry, with its SET if `promise`).
    pub async fn sign_batch(
        &mut self,
        alias: &str,
        digests: &[[u8; 32]],
        artifact: &str,
        promise: bool,
    ) -> Result<Vec<v1::SignResponse>, ClientError> {
        let req = v1::SignBatchRequest {
            key_alias: alias.to_string(),
            sha256_digests: digests.iter().map(|d| d.to_vec()).collect(),
            artifact_name: artifact.to_string(),
            algorithm: String::new(),
            signed_entry_timestamp: promise,
        };
        let mut out = self.signer.sign_batch(req.clone()).await;
        for backoff_ms in [50, 200, 800] {
            match &out {
                Err(s) if net::is_failover(s) => {
                    tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
                    out = self.signer.sign_batch(req.clone()).await;
                }
                _ => break,
            }
        }
        let b = out
            .map_err(|s| ClientError::rpc("SignBatch", s))?
            .into_inner();
        if b.signatures.len() != digests.len() || b.transparency_entries.len() != digests.len() {
            return Err(ClientError::Verify(format!(
                "the site answered {} digests with {} signatures and {} log entries",
                digests.len(),
                b.signatures.len(),
                b.transparency_entries.len()
            )));
        }
        Ok(b.signatures
            .into_iter()
            .zip(b.transparency_entries)
            .zip(digests)
            .map(|((signature, entry), d)| v1::SignResponse {
                signature,
                algorithm: b.algorithm.clone(),
                key_id: b.key_id.clone(),
                public_key_der: b.public_key_der.clone(),
                certificate_chain: b.certificate_chain.clone(),
                audit_id: b.audit_id.clone(),
                signed_at: b.signed_at,
                sha256_digest: d.to_vec(),
                audit_seq: b.audit_seq,
                audit_hash: b.audit_hash.clone(),
                audit_entry: Vec::new(),
                transparency_entry: Some(entry),
            })
            .collect())
    }

    /// Signs `input` and asks for the signature's signed entry timestamp: the response is
    /// what a Sigstore bundle is made of (`--format sigstore`). [`Session::sign_digest`] and
    /// [`Session::sign_message`] do not ask (the site then makes one signature, not two).
    pub async fn sign_promised(
        &mut self,
        alias: &str,
        input: v1::sign_request::Input,
        artifact: &str,
    ) -> Result<v1::SignResponse, ClientError> {
        self.sign_with(alias, input, artifact, true).await
    }

    async fn sign(
        &mut self,
        alias: &str,
        input: v1::sign_request::Input,
        artifact: &str,
    ) -> Result<v1::SignResponse, ClientError> {
        self.sign_with(alias, input, artifact, false).await
    }

    async fn sign_with(
        &mut self,
        alias: &str,
        input: v1::sign_request::Input,
        artifact: &str,
        promise: bool,
    ) -> Result<v1::SignResponse, ClientError> {
        let req = v1::SignRequest {
            key_alias: alias.to_string(),
            input: Some(input),
            artifact_name: artifact.to_string(),
            algorithm: String::new(),
            signed_entry_timestamp: promise,
        };
        // A replica that went away fails the call in flight (UNAVAILABLE, or a transport
        // error / CANCELLED when the connection broke mid-call); the channel then reconnects
        // to another replica of the site (see `net::connect_with`) — which may take a
        // moment to notice — so retry a few times with a short backoff. Signing the same input
        // twice is harmless: at worst the audit log has two entries for it.
        let mut out = self.signer.sign(req.clone()).await;
        for backoff_ms in [50, 200, 800] {
            match &out {
                Err(s) if net::is_failover(s) => {
                    tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
                    out = self.signer.sign(req.clone()).await;
                }
                _ => break,
            }
        }
        Ok(out.map_err(|s| ClientError::rpc("Sign", s))?.into_inner())
    }

    /// Renews the session: a fresh key in memory, a new certificate from the site's Renew RPC
    /// (authenticated by the current certificate; no token), and a new sign-port channel with
    /// it. The old certificate is superseded at the site and must not be used again.
    pub async fn renew(&mut self, cfg: &ClientConfig, ttl_seconds: u32) -> Result<(), ClientError> {
        let key = RunnerKey::generate()?;
        let device_proof = match &self.device {
            Some(d) => {
                let spki = key.spki_der();
                let transcript = meshsign_evidence::device::RenewTranscript {
                    serial: &self.enrollment.serial,
                    csr_spki_der: &spki,
                    not_after: self.enrollment.not_after.map_or(0, |t| t.seconds),
                }
                .bytes()
                .map_err(|e| ClientError::Crypto(format!("renewal transcript: {e}")))?;
                Some(v1::DeviceProof {
                    spki: d.spki().to_vec(),
                    signature: d.sign(&transcript)?,
                })
            }
            None => None,
        };
        let enrollment = self
            .signer
            .renew(v1::RenewRequest {
                csr_der: key.csr_der()?,
                requested_ttl_seconds: ttl_seconds,
                device_proof,
            })
            .await
            .map_err(|s| ClientError::rpc("Renew", s))?
            .into_inner();
        self.signer = Self::connect_signer(cfg, &key, &enrollment).await?;
        self.enrollment = enrollment;
        Ok(())
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
