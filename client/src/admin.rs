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
        ClientError::Crypto(format!(
            "{}: {e} (wrong password in ${password_env}?)",
            path.display()
        ))
    })?;
    let (_, chain) = ks.private_key_chain().ok_or_else(|| {
        ClientError::Crypto(format!(
            "{}: no private key with a certificate",
            path.display()
        ))
    })?;
    let pem = zeroize::Zeroizing::new(
        meshsign_proto::pem_encode("PRIVATE KEY", chain.key().as_der()).into_bytes(),
    );
    let chain_pem = chain
        .certs()
        .iter()
        .map(|c| meshsign_proto::pem_encode("CERTIFICATE", c.as_der()))
        .collect::<String>();
    Ok((pem, chain_pem.into_bytes()))
}
