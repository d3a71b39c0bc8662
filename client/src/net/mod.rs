//! gRPC channels over our own rustls client config: TLS 1.3, ALPN h2, aws-lc-rs, the site's CA
//! pinned, and (for the sign and admin ports) a client certificate held in memory.

pub mod http;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig as TlsConfig, RootCertStore, version::TLS13};
use rustls_pki_types::pem::PemObject as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{ClientConfig, ClientError};

/// A client certificate chain and its key, in memory only.
pub struct ClientIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain_len", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The site's CA roots from the config's `ca_file`.
pub fn roots(cfg: &ClientConfig) -> Result<RootCertStore, ClientError> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&cfg.ca_file)
        .map_err(|e| ClientError::Config(format!("{}: {e}", cfg.ca_file.display())))?;
    for c in certs {
        let c = c.map_err(|e| ClientError::Config(format!("{}: {e}", cfg.ca_file.display())))?;
        store
            .add(c)
            .map_err(|e| ClientError::Config(format!("{}: {e}", cfg.ca_file.display())))?;
    }
    Ok(store)
}

/// A rustls client config: TLS 1.3 only, ALPN h2, optional client certificate.
pub fn tls_config(
    roots: RootCertStore,
    identity: Option<ClientIdentity>,
) -> Result<Arc<TlsConfig>, ClientError> {
    let b = TlsConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| ClientError::Crypto(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => b
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| ClientError::Crypto(e.to_string()))?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Room for a whole unary request (HTTP/2 HEADERS and DATA) and most batch requests.
const WRITE_BUFFER: usize = 32 * 1024;

/// How long the client waits: for the TCP connection and TLS handshake, and for each RPC.
/// A site that does not answer (down, suspended, partitioned) is an error after these, never a
/// hung job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect + TLS handshake.
    pub connect: std::time::Duration,
    /// Each RPC.
    pub rpc: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: std::time::Duration::from_secs(10),
            rpc: std::time::Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The connect and RPC timeouts of a client config (its own, or the defaults).
    pub fn of(cfg: &ClientConfig) -> Self {
        let d = Self::default();
        Self {
            connect: cfg
                .connect_timeout_seconds
                .map_or(d.connect, std::time::Duration::from_secs),
            rpc: cfg
                .rpc_timeout_seconds
                .map_or(d.rpc, std::time::Duration::from_secs),
        }
    }
}

/// Opens a gRPC channel to one of `cfg`'s endpoints with its server name and timeouts.
pub async fn connect_to(
    cfg: &ClientConfig,
    endpoint: &str,
    tls: Arc<TlsConfig>,
) -> Result<Channel, ClientError> {
    connect_with(endpoint, &cfg.server_name, tls, Timeouts::of(cfg)).await
}

/// [`connect_with`] with the default timeouts.
pub async fn connect(
    endpoint: &str,
    server_name: &str,
    tls: Arc<TlsConfig>,
) -> Result<Channel, ClientError> {
    connect_with(endpoint, server_name, tls, Timeouts::default()).await
}

/// Opens a gRPC channel to `endpoint` (`host:port`) with `tls`, checking the server as
/// `server_name`. The connection is made now, so TLS failures surface here; it fails after
/// `timeouts.connect`, and each RPC after `timeouts.rpc`.
///
/// **Failover.** `endpoint` may list several replicas of one site (`a:7443,b:7443`). Each
/// (re)connection tries them in turn, starting with the one that last worked, each within
/// `timeouts.connect`; the channel reconnects by itself when its replica goes away, so after
/// a failed call (`UNAVAILABLE`, a broken connection) the next goes to a live replica.
pub async fn connect_with(
    endpoint: &str,
    server_name: &str,
    tls: Arc<TlsConfig>,
    timeouts: Timeouts,
) -> Result<Channel, ClientError> {
    let err = |m: String| ClientError::Connect {
        endpoint: endpoint.to_string(),
        message: m,
    };
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| err(e.to_string()))?;
    let addrs: Arc<Vec<String>> = Arc::new(
        endpoint
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
    );
    let first = addrs
        .first()
        .cloned()
        .ok_or_else(|| err("no endpoint".into()))?;
    let uri: Uri = format!("http://{first}")
        .parse()
        .map_err(|_| err("not host:port".into()))?;
    let last_good = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, name, addrs, last_good) =
            (tls.clone(), name.clone(), addrs.clone(), last_good.clone());
        async move {
            let start = last_good.load(std::sync::atomic::Ordering::Relaxed);
            let mut failures = Vec::new();
            let mut connected = None;
            for i in 0..addrs.len() {
                let at = (start + i) % addrs.len();
                let addr = &addrs[at];
                let handshake = async {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    TlsConnector::from(tls.clone())
                        .connect(name.clone(), tcp)
                        .await
                };
                match tokio::time::timeout(timeouts.connect, handshake).await {
                    Ok(Ok(stream)) => {
                        last_good.store(at, std::sync::atomic::Ordering::Relaxed);
                        connected = Some(stream);
                        break;
                    }
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!(
                        "{addr}: no TLS handshake within {:?}",
                        timeouts.connect
                    )),
                }
            }
            let stream = connected.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, failures.join("; "))
            })?;
            // tokio-rustls sends every write as its own TLS record at once; h2 writes a request
            // in several pieces and then flushes, so gather them: one record, one system call.
            let stream = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, stream);
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // A site that is starting or restarting refuses for a moment: retry with backoff until
    // the connect timeout is spent, then say what failed and what to check.
    let deadline = tokio::time::Instant::now() + timeouts.connect;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match Endpoint::from(uri.clone())
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.rpc)
            .connect_with_connector(connector.clone())
            .await
        {
            Ok(ch) => return Ok(ch),
            Err(e) => {
                let chain = source_chain(&e);
                let refused = chain.contains("Connection refused");
                if !refused || tokio::time::Instant::now() + backoff >= deadline {
                    let hint = connect_hint(&chain);
                    return Err(err(format!("{chain}{hint}")));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// Whether a failed call may be retried on another replica: the site was unreachable
/// (`UNAVAILABLE`), or the connection broke during the call — tonic reports that as `UNKNOWN`
/// "transport error", `UNKNOWN` "h2 protocol error: …" (the response body was cut off: seen
/// when a replica is killed mid-response), or, when the stream was reset under it, `CANCELLED`
/// "operation was canceled". meshsign sites never answer `UNKNOWN` or `CANCELLED` themselves.
pub fn is_failover(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => {
            s.message().starts_with("transport error")
                || s.message().starts_with("h2 protocol error")
        }
        tonic::Code::Cancelled => s.message().starts_with("operation was canceled"),
        _ => false,
    }
}

/// The error and its causes, joined, so TLS alerts are visible; a cause that repeats what is
/// already said (an I/O error wrapping itself) is said once.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// What to do about a failed connection, for the message.
fn connect_hint(chain: &str) -> &'static str {
    if chain.contains("Connection refused") || chain.contains("connection refused") {
        "; is meshsignd running there? check `endpoints` in client.toml (or --config)"
    } else if chain.contains("no TLS handshake within") || chain.contains("timed out") {
        "; the site did not answer in time: check the address and the network, or raise \
         --connect-timeout"
    } else if chain.contains("certificate") || chain.contains("UnknownIssuer") {
        "; the site's certificate does not chain to `ca_file` in client.toml or does not name \
         `server_name`"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::is_failover;
    use tonic::{Code, Status};

    /// What tonic reports when the replica went away mid-call is retried elsewhere; what a site
    /// answers (a refusal, an internal fault) never is.
    #[test]
    fn a_broken_connection_fails_over_and_a_site_s_answer_does_not() {
        for s in [
            Status::unavailable("connection refused"),
            Status::unknown("transport error"),
            Status::unknown("h2 protocol error: error reading a body from connection"),
            Status::cancelled("operation was canceled"),
        ] {
            assert!(is_failover(&s), "{s:?}");
        }
        for s in [
            Status::new(Code::Unauthenticated, "certificate_revoked: …"),
            Status::internal("internal: error id 1"),
            Status::unknown("something else"),
            Status::cancelled("site said so"),
        ] {
            assert!(!is_failover(&s), "{s:?}");
        }
    }
}
