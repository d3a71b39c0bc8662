//! A small HTTP/1.1 client for the few HTTPS calls a runner makes outside the site
//! (GitHub Actions' token endpoint, Apple's Notary API and its upload bucket): the proxy from
//! `https_proxy`/`http_proxy` unless `no_proxy` names the host, the bundled web roots plus the
//! system's bundle plus an optional extra CA file (a corporate CA), TLS through rustls and
//! aws-lc-rs. Errors are plain messages; each caller wraps them in its own error.

use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// One request.
#[derive(Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`, `PUT`.
    pub method: &'a str,
    /// `https://host[:port]/path?query` (or `http://` on loopback for tests).
    pub url: &'a str,
    /// Extra headers (`host` is set from the URL).
    pub headers: &'a [(&'a str, &'a str)],
    /// The body (empty for none).
    pub body: Vec<u8>,
}

/// The proxy for `host` from `https_proxy` / `http_proxy` (either case), unless `no_proxy`
/// names the host (exactly, as a domain suffix, or `*`).
pub fn proxy_for(
    host: &str,
    https: bool,
    var: impl Fn(&str) -> Option<String>,
) -> Option<(String, u16)> {
    let no_proxy = var("no_proxy")
        .or_else(|| var("NO_PROXY"))
        .unwrap_or_default();
    for entry in no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let e = entry.trim_start_matches('.');
        if entry == "*" || host == e || host.ends_with(&format!(".{e}")) {
            return None;
        }
    }
    let names = if https {
        ["https_proxy", "HTTPS_PROXY"]
    } else {
        ["http_proxy", "HTTP_PROXY"]
    };
    let url = names
        .iter()
        .find_map(|n| var(n))
        .filter(|u| !u.is_empty())?;
    let uri: hyper::Uri = url.parse().ok()?;
    Some((uri.host()?.to_string(), uri.port_u16().unwrap_or(80)))
}

/// A TCP stream to `host:port`, through an HTTP CONNECT tunnel when a proxy applies.
async fn open(host: &str, port: u16, https: bool) -> Result<tokio::net::TcpStream, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let terr = |m: String| m;
    let Some((phost, pport)) = proxy_for(host, https, |n| std::env::var(n).ok()) else {
        return tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| terr(format!("connect {host}: {e}")));
    };
    let mut tcp = tokio::net::TcpStream::connect((phost.as_str(), pport))
        .await
        .map_err(|e| terr(format!("connect proxy {phost}:{pport}: {e}")))?;
    let req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| terr(format!("proxy {phost}: {e}")))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192
            || tcp
                .read(&mut byte)
                .await
                .map_err(|e| terr(format!("proxy {phost}: {e}")))?
                == 0
        {
            return Err(terr(format!("proxy {phost}: no answer to CONNECT")));
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head);
    let first = status.lines().next().unwrap_or_default().to_string();
    if first.split_whitespace().nth(1) != Some("200") {
        return Err(terr(format!("proxy {phost} refused CONNECT: {first}")));
    }
    Ok(tcp)
}

/// Roots for the token endpoint: the bundled web roots, the system's bundle
/// (`SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`), and `ca_file` (a corporate CA
/// of a GitHub Enterprise Server).
fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    if let Ok(iter) = rustls_pki_types::CertificateDer::pem_file_iter(&system) {
        for c in iter.flatten() {
            let _ = roots.add(c);
        }
    }
    if let Some(p) = ca_file {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(p)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificates", p.display()));
        }
        for c in certs {
            roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(roots)
}

/// Sends `req` and returns the status and the body (at most 64 MiB).
pub async fn request(
    req: Request<'_>,
    ca_file: Option<&std::path::Path>,
) -> Result<(u16, Vec<u8>), String> {
    let uri: hyper::Uri = req
        .url
        .parse()
        .map_err(|_| format!("bad URL {}", req.url))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{} has no host", req.url))?
        .to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = open(&host, port, https).await?;
    let host_header = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut b = hyper::Request::builder()
        .method(req.method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(hyper::header::HOST, host_header);
    for (k, v) in req.headers {
        b = b.header(*k, *v);
    }
    let r = b
        .body(Full::new(Bytes::from(req.body)))
        .map_err(|e| e.to_string())?;
    if https {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {host}: {e}"))?;
        send(TokioIo::new(tls), r).await
    } else {
        send(TokioIo::new(tcp), r).await
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>) -> Result<(u16, Vec<u8>), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), 64 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.to_vec()))
}
