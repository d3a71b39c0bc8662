//! Ops client: the admin port with the operator's certificate from `client.toml` `[admin]`,
//! typed ([`Admin`]): each method returns its message or an error naming the RPC.

use meshsign_proto::v1::{self, admin_client::AdminClient};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject as _;
use tonic::transport::Channel;

use crate::net::{self, ClientIdentity};
use crate::{ClientConfig, ClientError};

/// Connects to the admin port presenting the configured ops certificate.
pub async fn connect(cfg: &ClientConfig) -> Result<AdminClient<Channel>, ClientError> {
    let a = cfg
        .admin
        .as_ref()
        .ok_or_else(|| ClientError::Config("no [admin] identity in the client config".into()))?;
    let chain = CertificateDer::pem_file_iter(&a.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ClientError::Config(format!("{}: {e}", a.cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_file(&a.key_file)
        .map_err(|e| ClientError::Config(format!("{}: {e}", a.key_file.display())))?;
    let tls = net::tls_config(net::roots(cfg)?, Some(ClientIdentity { chain, key }))?;
    // Room for the largest possible audit entry in one export line (the site bounds every
    // entry to `MAX_ENTRY_BYTES`), so no entry can stop an export.
    Ok(
        AdminClient::new(net::connect_to(cfg, &cfg.admin_endpoint, tls).await?)
            .max_decoding_message_size(4 * meshsign_evidence::audit::MAX_ENTRY_BYTES.max(1 << 20)),
    )
}

/// Lines per message the admin client asks an export for (`ExportAuditRequest.lines_per_message`;
/// the site also stops a message at 32 KiB): the cost of a message — its encoding at the site,
/// its decoding here — spread over many lines (BENCHMARKS.md, issue 30, session 33).
pub const EXPORT_LINES_PER_MESSAGE: u32 = 1024;

/// The JSON lines an export message carries (without newlines), in order: its `json`, or
/// its `lines`.
pub fn export_lines(m: &v1::ExportLine) -> impl Iterator<Item = &[u8]> {
    (!m.json.is_empty())
        .then_some(m.json.as_bytes())
        .into_iter()
        .chain(m.lines.iter().map(|l| &l[..]))
}

/// Writes the lines an export message carries to `out`, each followed by a newline.
pub fn write_export_message(
    out: &mut impl std::io::Write,
    m: &v1::ExportLine,
) -> std::io::Result<()> {
    for line in export_lines(m) {
        out.write_all(line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// The Admin service, typed: each call returns its message or a [`ClientError::Rpc`] naming
/// the RPC (the status is mapped here, once).
#[derive(Debug, Clone)]
pub struct Admin(AdminClient<Channel>);

/// Awaits one RPC and maps its status to a [`ClientError`] naming it.
async fn call<T>(
    rpc: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    fut.await
        .map(tonic::Response::into_inner)
        .map_err(|s| ClientError::rpc(rpc, s))
}

fn env(environment: &str) -> v1::EnvironmentRequest {
    v1::EnvironmentRequest {
        environment: environment.into(),
    }
}

fn ca_ref(environment: &str, id: &str, reason: &str) -> v1::IssuerRef {
    v1::IssuerRef {
        environment: environment.into(),
        id: id.into(),
        reason: reason.into(),
    }
}

impl Admin {
    /// Connects to the admin port with the `[admin]` identity of `cfg`.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        connect(cfg).await.map(Self)
    }

    /// The audit (checkpoint) public key.
    pub async fn audit_public_key(&mut self) -> Result<v1::AuditPublicKey, ClientError> {
        call(
            "GetAuditPublicKey",
            self.0.get_audit_public_key(v1::GetAuditPublicKeyRequest {}),
        )
        .await
    }

    /// The audit export as a stream of messages of JSON lines (one each, or several when
    /// `req.lines_per_message` asks for them; read either with [`export_lines`] or
    /// [`write_export_message`]).
    pub async fn export_audit(
        &mut self,
        req: v1::ExportAuditRequest,
    ) -> Result<tonic::Streaming<v1::ExportLine>, ClientError> {
        call("ExportAudit", self.0.export_audit(req)).await
    }

    /// A consistent backup of the site (keys stay wrapped under the KEK).
    pub async fn snapshot(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut stream = call("Snapshot", self.0.snapshot(v1::SnapshotRequest {})).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| ClientError::rpc("Snapshot", s))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// Every runner CA of an environment.
    pub async fn list_runner_cas(
        &mut self,
        environment: &str,
    ) -> Result<Vec<v1::IssuerInfo>, ClientError> {
        Ok(call("ListIssuers", self.0.list_issuers(env(environment)))
            .await?
            .issuers)
    }

    /// Stages a new runner CA.
    pub async fn stage_runner_ca(
        &mut self,
        environment: &str,
    ) -> Result<v1::IssuerInfo, ClientError> {
        call("StageIssuer", self.0.stage_issuer(env(environment))).await
    }

    /// Activates the staged runner CA (or `id`).
    pub async fn activate_runner_ca(
        &mut self,
        environment: &str,
        id: &str,
    ) -> Result<v1::IssuerInfo, ClientError> {
        call(
            "ActivateIssuer",
            self.0.activate_issuer(ca_ref(environment, id, "")),
        )
        .await
    }

    /// Retires a staged or retiring runner CA.
    pub async fn retire_runner_ca(
        &mut self,
        environment: &str,
        id: &str,
    ) -> Result<v1::IssuerInfo, ClientError> {
        call(
            "RetireIssuer",
            self.0.retire_issuer(ca_ref(environment, id, "")),
        )
        .await
    }

    /// Distrusts a runner CA at once.
    pub async fn revoke_runner_ca(
        &mut self,
        environment: &str,
        id: &str,
        reason: &str,
    ) -> Result<v1::IssuerInfo, ClientError> {
        call(
            "RevokeIssuer",
            self.0.revoke_issuer(ca_ref(environment, id, reason)),
        )
        .await
    }

    /// Adds a revocation rule.
    pub async fn revoke(
        &mut self,
        req: v1::RevokeRequest,
    ) -> Result<v1::RevokeResponse, ClientError> {
        call("Revoke", self.0.revoke(req)).await
    }

    /// Adds a distrust rule; returns the new signed list.
    pub async fn distrust(
        &mut self,
        req: v1::DistrustRequest,
    ) -> Result<v1::DistrustList, ClientError> {
        call("Distrust", self.0.distrust(req)).await
    }

    /// Removes distrust rule `id`; returns the new signed list.
    pub async fn undistrust(
        &mut self,
        environment: &str,
        id: &str,
    ) -> Result<v1::DistrustList, ClientError> {
        call(
            "Undistrust",
            self.0.undistrust(v1::UndistrustRequest {
                environment: environment.into(),
                id: id.into(),
            }),
        )
        .await
    }

    /// Every revocation rule.
    pub async fn revocations(&mut self) -> Result<Vec<v1::RevocationRule>, ClientError> {
        Ok(call(
            "ListRevocations",
            self.0.list_revocations(v1::ListRevocationsRequest {}),
        )
        .await?
        .rules)
    }

    /// Registers a runner's signed registration request (`meshsign runner init`).
    pub async fn register_runner(
        &mut self,
        req: v1::RegisterRunnerRequest,
    ) -> Result<v1::RunnerInfo, ClientError> {
        call("RegisterRunner", self.0.register_runner(req)).await
    }

    /// Every registered runner.
    pub async fn runners(&mut self) -> Result<Vec<v1::RunnerInfo>, ClientError> {
        Ok(call(
            "ListRunners",
            self.0.list_runners(v1::ListRunnersRequest {}),
        )
        .await?
        .runners)
    }

    /// One runner; `RetireRunner` / `RevokeRunner` with `change` (and the reason in `r`).
    pub async fn runner(
        &mut self,
        r: v1::RunnerRef,
        change: Option<bool>,
    ) -> Result<v1::RunnerInfo, ClientError> {
        match change {
            None => call("GetRunner", self.0.get_runner(r)).await,
            Some(false) => call("RetireRunner", self.0.retire_runner(r)).await,
            Some(true) => call("RevokeRunner", self.0.revoke_runner(r)).await,
        }
    }

    /// The site at a glance (runner CAs, keys and ages, policies, audit head, writability).
    pub async fn status(&mut self) -> Result<v1::SiteStatus, ClientError> {
        call("Status", self.0.status(v1::StatusRequest {})).await
    }

    /// A job's signatures per key and certificate, with the keys' budgets.
    pub async fn job_usage(
        &mut self,
        environment: &str,
        job_id: &str,
    ) -> Result<v1::JobUsage, ClientError> {
        call(
            "GetJobUsage",
            self.0.get_job_usage(v1::JobUsageRequest {
                environment: environment.to_string(),
                job_id: job_id.to_string(),
            }),
        )
        .await
    }

    /// Every trust policy of an environment.
    pub async fn trust_policies(
        &mut self,
        environment: &str,
    ) -> Result<Vec<v1::TrustPolicyInfo>, ClientError> {
        Ok(call(
            "ListTrustPolicies",
            self.0.list_trust_policies(env(environment)),
        )
        .await?
        .policies)
    }

    /// Enables or disables a trust policy.
    pub async fn set_trust_policy_enabled(
        &mut self,
        req: v1::SetTrustPolicyEnabledRequest,
    ) -> Result<v1::TrustPolicyInfo, ClientError> {
        let rpc = if req.enabled {
            "EnableTrustPolicy"
        } else {
            "DisableTrustPolicy"
        };
        call(rpc, self.0.set_trust_policy_enabled(req)).await
    }

    /// Pins a JWKS.
    pub async fn set_jwks(
        &mut self,
        req: v1::SetJwksRequest,
    ) -> Result<v1::TrustPolicyInfo, ClientError> {
        call("SetJwks", self.0.set_jwks(req)).await
    }

    /// Proposals under two-person review, newest first.
    pub async fn proposals(&mut self) -> Result<Vec<v1::ProposalInfo>, ClientError> {
        Ok(call(
            "ListProposals",
            self.0.list_proposals(v1::ListProposalsRequest {}),
        )
        .await?
        .proposals)
    }

    /// Approves another admin's proposal.
    pub async fn approve(&mut self, id: &str) -> Result<v1::ProposalInfo, ClientError> {
        call(
            "ApproveProposal",
            self.0
                .approve_proposal(v1::ApproveProposalRequest { id: id.to_string() }),
        )
        .await
    }

    /// Proposes reloading the site config file with these bytes (named by their SHA-256); a
    /// second admin approves it, then a SIGHUP applies exactly that file.
    pub async fn propose_config(&mut self, file: &[u8]) -> Result<v1::ProposalInfo, ClientError> {
        let sha = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, file));
        call(
            "ProposeConfig",
            self.0
                .propose_config(v1::ProposeConfigRequest { config_sha256: sha }),
        )
        .await
    }

    /// Sets how many days exported, checkpointed audit entries are kept (0: all).
    pub async fn set_audit_retention(&mut self, days: u64) -> Result<u64, ClientError> {
        Ok(call(
            "SetAuditRetention",
            self.0.set_audit_retention(v1::SetAuditRetentionRequest {
                retention_days: days,
            }),
        )
        .await?
        .retention_days)
    }

    /// Every key of an environment.
    pub async fn keys(&mut self, environment: &str) -> Result<Vec<v1::KeyInfo>, ClientError> {
        Ok(call("ListKeys", self.0.list_keys(env(environment)))
            .await?
            .keys)
    }

    /// Creates a key alias.
    pub async fn create_key(
        &mut self,
        req: v1::CreateKeyRequest,
    ) -> Result<v1::KeyInfo, ClientError> {
        call("CreateKey", self.0.create_key(req)).await
    }

    /// Rotates a key alias.
    pub async fn rotate_key(&mut self, key: v1::KeyRef) -> Result<v1::KeyInfo, ClientError> {
        call("RotateKey", self.0.rotate_key(key)).await
    }

    /// Disables a key alias.
    pub async fn disable_key(&mut self, key: v1::KeyRef) -> Result<v1::KeyInfo, ClientError> {
        call("DisableKey", self.0.disable_key(key)).await
    }

    /// Imports a private key (one-way).
    pub async fn import_key(
        &mut self,
        req: v1::ImportKeyRequest,
    ) -> Result<v1::KeyInfo, ClientError> {
        call("ImportKey", self.0.import_key(req)).await
    }

    /// A CSR signed by a site-held key.
    pub async fn key_csr(&mut self, req: v1::KeyCsrRequest) -> Result<v1::KeyCsr, ClientError> {
        call("CreateKeyCsr", self.0.create_key_csr(req)).await
    }

    /// Attaches a certificate chain to a key.
    pub async fn set_key_certificate(
        &mut self,
        req: v1::SetKeyCertificateRequest,
    ) -> Result<v1::KeyInfo, ClientError> {
        call("SetKeyCertificate", self.0.set_key_certificate(req)).await
    }
}

/// Parses a time given as unix seconds or RFC 3339.
pub fn parse_time(s: &str) -> Result<i64, ClientError> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| ClientError::Config(format!("`{s}` is neither unix seconds nor RFC 3339")))
}

/// Reads a PKCS#12 file (password from the environment variable `password_env`) into a PKCS#8
/// PEM private key and a PEM certificate chain (leaf first), for a one-way import.
pub fn read_p12(
    path: &std::path::Path,
    password_env: &str,
) -> Result<(zeroize::Zeroizing<Vec<u8>>, Vec<u8>), ClientError> {
    let data = zeroize::Zeroizing::new(std::fs::read(path).map_err(ClientError::io(path))?);
    // From the environment variable, else a prompt on the terminal (no echo).
    let password = zeroize::Zeroizing::new(match std::env::var(password_env) {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password(format!("password for {}: ", path.display()))
            .map_err(|e| {
                ClientError::Config(format!("no ${password_env} and no terminal to ask on: {e}"))
            })?,
    });
    let ks = p12_keystore::KeyStore::from_pkcs12(
        &data,
        &password,
        p12_keystore::Pkcs12ImportPolicy::Strict,
    )
    .map_err(|e| {
        ClientError::Usage(format!(
            "{}: {e} (wrong password in ${password_env}?)",
            path.display()
        ))
    })?;
    let (_, chain) = ks.private_key_chain().ok_or_else(|| {
        ClientError::Usage(format!(
            "{}: no private key with a certificate",
            path.display()
        ))
    })?;
    let pem = zeroize::Zeroizing::new(
        meshsign_evidence::pem_encode("PRIVATE KEY", chain.key().as_der()).into_bytes(),
    );
    let chain_pem = chain
        .certs()
        .iter()
        .map(|c| meshsign_evidence::pem_encode("CERTIFICATE", c.as_der()))
        .collect::<String>();
    Ok((pem, chain_pem.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: &str, lines: &[&str]) -> v1::ExportLine {
        v1::ExportLine {
            json: json.into(),
            lines: lines.iter().map(|l| l.as_bytes().to_vec().into()).collect(),
        }
    }

    fn written(m: &v1::ExportLine) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        write_export_message(&mut out, m)?;
        Ok(out)
    }

    /// A site that sends one line per message (before `lines_per_message`) and one that sends
    /// several give the same file and the same lines.
    #[test]
    fn one_line_and_several_read_the_same() -> std::io::Result<()> {
        let one = message(r#"{"seq":1}"#, &[]);
        let several = message("", &[r#"{"seq":1}"#, r#"{"seq":2}"#]);
        assert_eq!(written(&one)?, b"{\"seq\":1}\n");
        assert_eq!(written(&several)?, b"{\"seq\":1}\n{\"seq\":2}\n");
        assert_eq!(export_lines(&one).collect::<Vec<_>>(), [b"{\"seq\":1}"]);
        assert_eq!(
            export_lines(&several).collect::<Vec<_>>(),
            [&b"{\"seq\":1}"[..], &b"{\"seq\":2}"[..]]
        );
        let empty = message("", &[]);
        assert_eq!(export_lines(&empty).count(), 0);
        assert!(written(&empty)?.is_empty());
        Ok(())
    }
}
