//! Ops client: the admin port with the operator's certificate from `client.toml` `[admin]`.

use meshsign_proto::v1::admin_client::AdminClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject as _;
use tonic::transport::Channel;

use crate::transport::{self, ClientIdentity};
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
    let tls = transport::tls_config(transport::roots(cfg)?, Some(ClientIdentity { chain, key }))?;
    Ok(AdminClient::new(
        transport::connect(&cfg.admin_endpoint, &cfg.server_name, tls).await?,
    ))
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
