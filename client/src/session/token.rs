//! Where a runner's OIDC token comes from: a file, an environment variable, GitHub Actions'
//! token endpoint, or (dev sites only) the dev issuer in the client config.

use std::path::PathBuf;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
#[cfg(feature = "dev")]
use meshsign_certs_dev::{GithubJob, OidcIssuer};
use zeroize::Zeroizing;

use crate::{ClientConfig, ClientError};

/// A token source.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// Read the token from a file.
    File(PathBuf),
    /// Read the token from an environment variable.
    Env(String),
    /// Ask GitHub Actions (`ACTIONS_ID_TOKEN_REQUEST_URL` / `_TOKEN`) for the audience.
    GithubActions,
    /// GitLab CI: the job's `id_tokens` entry, from this variable (`MESHSIGN_ID_TOKEN` by
    /// default; its `aud` is set in `.gitlab-ci.yml`).
    Gitlab(String),
    /// Buildkite: `buildkite-agent oidc request-token --audience A`.
    Buildkite,
    /// Mint one with the dev issuer of the client config (dev builds only).
    #[cfg(feature = "dev")]
    Dev(GithubJob),
}

/// Obtains a token for `audience`.
pub async fn obtain(
    source: &TokenSource,
    cfg: &ClientConfig,
    audience: &str,
) -> Result<Zeroizing<String>, ClientError> {
    #[cfg(not(feature = "dev"))]
    let _ = cfg;
    match source {
        TokenSource::File(p) => {
            let t = std::fs::read_to_string(p).map_err(ClientError::io(p))?;
            Ok(Zeroizing::new(t.trim().to_string()))
        }
        TokenSource::Env(var) => std::env::var(var)
            .map(|t| Zeroizing::new(t.trim().to_string()))
            .map_err(|_| ClientError::Token(format!("${var} is not set"))),
        TokenSource::GithubActions => github_actions(audience, cfg.token_ca_file.as_deref()).await,
        TokenSource::Gitlab(var) => std::env::var(var)
            .map(|t| Zeroizing::new(t.trim().to_string()))
            .map_err(|_| {
                ClientError::Token(format!(
                    "${var} is not set: add `id_tokens: {{ {var}: {{ aud: {audience} }} }}` to the job"
                ))
            }),
        TokenSource::Buildkite => buildkite(audience).await,
        #[cfg(feature = "dev")]
        TokenSource::Dev(job) => dev_token(cfg, audience, job),
    }
}

/// Mints a GitHub-Actions-shaped token with the dev issuer (valid 5 minutes).
#[cfg(feature = "dev")]
pub fn dev_token(
    cfg: &ClientConfig,
    audience: &str,
    job: &GithubJob,
) -> Result<Zeroizing<String>, ClientError> {
    DevMinter::load(cfg)?.mint(audience, job)
}

/// The dev issuer of a client config, loaded once, minting as many tokens as asked (the
/// benchmark's enrollment load mints one per enrollment).
#[cfg(feature = "dev")]
pub struct DevMinter {
    issuer: OidcIssuer,
    iss: String,
}

#[cfg(feature = "dev")]
impl std::fmt::Debug for DevMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevMinter")
            .field("iss", &self.iss)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "dev")]
impl DevMinter {
    /// Loads the `[dev_issuer]` of the client config.
    pub fn load(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let d = cfg.dev_issuer.as_ref().ok_or_else(|| {
            ClientError::Token("no [dev_issuer] in the client config (dev sites only)".into())
        })?;
        let issuer = OidcIssuer::load(&d.issuer, &d.kid, &d.key_file)
            .map_err(|e| ClientError::Token(e.to_string()))?;
        Ok(Self {
            issuer,
            iss: d.issuer.clone(),
        })
    }

    /// A fresh token (new jti, valid 5 minutes) for `job` and `audience`.
    pub fn mint(&self, audience: &str, job: &GithubJob) -> Result<Zeroizing<String>, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let jti =
            meshsign_evidence::files::random_id().map_err(|e| ClientError::Token(e.to_string()))?;
        let claims = job.claims(&self.iss, audience, &jti, now, 300);
        self.issuer
            .mint(&claims)
            .map(Zeroizing::new)
            .map_err(|e| ClientError::Token(e.to_string()))
    }
}

/// The CI this process runs in, from the variables each one sets, as a token source:
/// GitHub Actions (`GITHUB_ACTIONS=true`), GitLab CI (`GITLAB_CI=true`), Buildkite
/// (`BUILDKITE=true`).
pub fn detect(vars: impl Fn(&str) -> Option<String>) -> Option<TokenSource> {
    let on = |v: &str| vars(v).is_some_and(|x| x == "true");
    if on("GITHUB_ACTIONS") {
        Some(TokenSource::GithubActions)
    } else if on("GITLAB_CI") {
        Some(TokenSource::Gitlab("MESHSIGN_ID_TOKEN".into()))
    } else if on("BUILDKITE") {
        Some(TokenSource::Buildkite)
    } else {
        None
    }
}

/// Buildkite: `buildkite-agent oidc request-token --audience <aud>` (the agent talks to
/// Buildkite; this process only reads its output), bounded by a timeout.
async fn buildkite(audience: &str) -> Result<Zeroizing<String>, ClientError> {
    let run = tokio::process::Command::new("buildkite-agent")
        .args(["oidc", "request-token", "--audience", audience])
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .map_err(|_| {
            ClientError::Token("buildkite-agent oidc request-token: no answer in 30 s".into())
        })?
        .map_err(|e| ClientError::Token(format!("buildkite-agent: {e} (is it on PATH?)")))?;
    if !out.status.success() {
        return Err(ClientError::Token(format!(
            "buildkite-agent oidc request-token failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(300)
                .collect::<String>()
        )));
    }
    Ok(Zeroizing::new(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// GitHub Actions: GET `$ACTIONS_ID_TOKEN_REQUEST_URL&audience=<aud>` with the request token;
/// each attempt bounded by a timeout, retried with backoff (1, 2, 4 s) on failure.
async fn github_actions(
    audience: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Zeroizing<String>, ClientError> {
    let mut last = None;
    for (attempt, wait) in [0u64, 1, 2, 4].into_iter().enumerate() {
        if wait > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        }
        match tokio::time::timeout(
            std::time::Duration::from_secs(15),
            github_actions_once(audience, ca_file),
        )
        .await
        {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(ClientError::Token(format!(
                    "token endpoint: no answer in 15 s (attempt {})",
                    attempt + 1
                )))
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Token("token endpoint unreachable".into())))
}

async fn github_actions_once(
    audience: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Zeroizing<String>, ClientError> {
    let url = std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL").map_err(|_| {
        ClientError::Token(
            "ACTIONS_ID_TOKEN_REQUEST_URL is not set (does the job have `id-token: write`?)".into(),
        )
    })?;
    let bearer = Zeroizing::new(
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
            .map_err(|_| ClientError::Token("ACTIONS_ID_TOKEN_REQUEST_TOKEN is not set".into()))?,
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}audience={}", percent_encode(audience));
    let body = http_get(&full, &bearer, ca_file).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ClientError::Token(format!("token endpoint answered non-JSON: {e}")))?;
    v.get("value")
        .and_then(|t| t.as_str())
        .map(|t| Zeroizing::new(t.to_string()))
        .ok_or_else(|| ClientError::Token("token endpoint answer has no `value`".into()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal HTTP/1.1 GET (https with the webpki roots, or http) returning the body.
/// The proxy for `host` from `https_proxy` / `http_proxy` (either case), unless `no_proxy`
/// names the host (exactly, as a domain suffix, or `*`).
fn proxy_for(
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
async fn open(host: &str, port: u16, https: bool) -> Result<tokio::net::TcpStream, ClientError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let terr = |m: String| ClientError::Token(m);
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
fn token_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, ClientError> {
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
            .map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Config(format!(
                "{}: no certificates",
                p.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))?;
        }
    }
    Ok(roots)
}

async fn http_get(
    url: &str,
    bearer: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Vec<u8>, ClientError> {
    let terr = |m: String| ClientError::Token(m);
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| terr(format!("bad token URL {url}")))?;
    let host = uri
        .host()
        .ok_or_else(|| terr("token URL has no host".into()))?
        .to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = open(&host, port, https).await?;
    let req = hyper::Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(hyper::header::HOST, host.as_str())
        .header(hyper::header::AUTHORIZATION, format!("bearer {bearer}"))
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| terr(e.to_string()))?;
    let resp = if https {
        let roots = token_roots(ca_file)?;
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| terr(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| terr(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| terr(format!("TLS to {host}: {e}")))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    Ok(resp)
}

async fn send<T>(io: T, req: hyper::Request<Empty<Bytes>>) -> Result<Vec<u8>, ClientError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let terr = |m: String| ClientError::Token(m);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| terr(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| terr(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| terr(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(terr(format!("token endpoint answered {status}")));
    }
    Ok(body.to_vec())
}

/// The token source when a runner verb names none: the dev issuer of a dev site's client
/// config (dev builds only); otherwise a usage error naming the choices.
pub fn fallback_source(cfg: &ClientConfig, environment: &str) -> Result<TokenSource, ClientError> {
    #[cfg(feature = "dev")]
    if cfg.dev_issuer.is_some() {
        return Ok(TokenSource::Dev(GithubJob::new(environment)));
    }
    let _ = (cfg, environment);
    Err(ClientError::Usage(format!(
        "no token source: give --token-file, --token-env or --token-source github-actions{}",
        if cfg!(feature = "dev") {
            ""
        } else {
            " (this build has no dev issuer)"
        }
    )))
}

/// The token source of a drill that names none: the dev issuer (dev builds only).
pub fn drill_source(environment: &str) -> Result<TokenSource, ClientError> {
    #[cfg(feature = "dev")]
    return Ok(TokenSource::Dev(GithubJob::new(environment)));
    #[cfg(not(feature = "dev"))]
    {
        let _ = environment;
        Err(ClientError::Token(
            "give --token-source github-actions (this build has no dev issuer)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_names_hosts_suffixes_and_everything() {
        let env = |no: &'static str| {
            move |n: &str| match n {
                "https_proxy" => Some("http://proxy.corp:3128".to_string()),
                "no_proxy" => Some(no.to_string()),
                _ => None,
            }
        };
        assert_eq!(
            proxy_for("github.example.com", true, env("")),
            Some(("proxy.corp".to_string(), 3128))
        );
        assert_eq!(proxy_for("ghe.corp.test", true, env(".corp.test")), None);
        assert_eq!(proxy_for("corp.test", true, env("corp.test")), None);
        assert_eq!(proxy_for("anything", true, env("*")), None);
        assert_eq!(
            proxy_for("plain.test", false, env("")),
            None,
            "http_proxy unset"
        );
    }
}

/// What a device key's enrollment proof binds of the job's token: its audience, `jti` and
/// `exp`, read from the payload as the site will read it once it has verified the signature
/// (the runner does not verify its own CI's token; a forged one fails at the site anyway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFacts {
    /// `aud` (a one-element array is read as its element).
    pub audience: String,
    /// `jti`.
    pub jti: String,
    /// `exp`.
    pub exp: i64,
}

/// The [`TokenFacts`] of a compact JWS.
pub fn facts(token: &str) -> Result<TokenFacts, ClientError> {
    use base64::Engine as _;
    let bad = |what: &str| ClientError::Token(format!("the job token {what}"));
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("is not a compact JWS"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| bad("payload is not base64url"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| bad("payload is not JSON"))?;
    let audience = match &v["aud"] {
        serde_json::Value::String(a) => a.clone(),
        serde_json::Value::Array(a) if a.len() == 1 => a[0]
            .as_str()
            .ok_or_else(|| bad("aud is not a string"))?
            .to_string(),
        _ => return Err(bad("names no single audience (aud)")),
    };
    let jti = v["jti"]
        .as_str()
        .ok_or_else(|| bad("has no jti"))?
        .to_string();
    let exp = v["exp"].as_i64().ok_or_else(|| bad("has no exp"))?;
    Ok(TokenFacts { audience, jti, exp })
}
