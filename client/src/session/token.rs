//! Where a runner's OIDC token comes from: a file, an environment variable, GitHub Actions'
//! token endpoint, or (dev sites only) the dev issuer in the client config.

use std::path::PathBuf;

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

/// GET `url` with a bearer (GitHub Actions' token endpoint), through the proxy the
/// environment names, trusting the system's roots and `ca_file`.
async fn http_get(
    url: &str,
    bearer: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Vec<u8>, ClientError> {
    let auth = format!("bearer {bearer}");
    let (status, body) = crate::net::http::request(
        crate::net::http::Request {
            method: "GET",
            url,
            headers: &[("authorization", &auth), ("accept", "application/json")],
            body: Vec::new(),
        },
        ca_file,
    )
    .await
    .map_err(ClientError::Token)?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Token(format!(
            "token endpoint answered {status}"
        )));
    }
    Ok(body)
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
            crate::net::http::proxy_for("github.example.com", true, env("")),
            Some(("proxy.corp".to_string(), 3128))
        );
        assert_eq!(
            crate::net::http::proxy_for("ghe.corp.test", true, env(".corp.test")),
            None
        );
        assert_eq!(
            crate::net::http::proxy_for("corp.test", true, env("corp.test")),
            None
        );
        assert_eq!(
            crate::net::http::proxy_for("anything", true, env("*")),
            None
        );
        assert_eq!(
            crate::net::http::proxy_for("plain.test", false, env("")),
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
