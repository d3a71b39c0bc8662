//! A job's session as a signing command opens it: the job agent's, when one serves this job
//! (`MESHSIGN_AGENT_SOCK`: no token needed, the agent revokes at its end), or a new enrollment
//! of the command's own with the job's OIDC token, revoked when the command is done.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsign_proto::v1::{self, signer_client::SignerClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::token::{self, TokenSource};
use super::{EnrollParams, Session, local_fingerprint};
use crate::{ClientConfig, ClientError};

/// The variable that names the job agent's socket.
pub const SOCK_VAR: &str = "MESHSIGN_AGENT_SOCK";
/// The variable that names the job agent's environment.
pub const ENV_VAR: &str = "MESHSIGN_AGENT_ENVIRONMENT";
/// The variable that names the job agent's region.
pub const REGION_VAR: &str = "MESHSIGN_AGENT_REGION";

/// Where the job's OIDC token comes from, as the command line names it.
#[derive(Clone, Debug, Default)]
pub enum TokenChoice {
    /// A file holding the token.
    File(PathBuf),
    /// An environment variable holding the token.
    Env(String),
    /// GitHub Actions' token endpoint.
    GithubActions,
    /// GitLab's `id_tokens` entry in this variable.
    Gitlab(String),
    /// `buildkite-agent oidc request-token`.
    Buildkite,
    /// Whichever CI this process runs in.
    Auto,
    /// Nothing named: a dev site's issuer (dev builds), else a usage error.
    #[default]
    Unnamed,
}

/// How a job enrolls: its environment, token, certificate lifetime and fingerprint.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// The environment the job signs in.
    pub environment: String,
    /// Where its token comes from.
    pub token: TokenChoice,
    /// Extra CA certificates (PEM) for GitHub's token endpoint.
    pub token_ca_file: Option<PathBuf>,
    /// Requested certificate lifetime in seconds (0: the environment's cap).
    pub ttl_seconds: u32,
    /// The runner fingerprint (None: derived from this machine).
    pub fingerprint: Option<String>,
}

/// The token source of `job` (nothing is fetched yet).
pub fn token_source(cfg: &ClientConfig, job: &JobOptions) -> Result<TokenSource, ClientError> {
    Ok(match &job.token {
        TokenChoice::File(f) => TokenSource::File(f.clone()),
        TokenChoice::Env(v) => TokenSource::Env(v.clone()),
        TokenChoice::GithubActions => TokenSource::GithubActions,
        TokenChoice::Gitlab(var) => TokenSource::Gitlab(var.clone()),
        TokenChoice::Buildkite => TokenSource::Buildkite,
        TokenChoice::Auto => token::detect(|v| std::env::var(v).ok()).ok_or_else(|| {
            ClientError::Usage(
                "--token-source auto: not in GitHub Actions, GitLab CI or Buildkite".into(),
            )
        })?,
        TokenChoice::Unnamed => token::fallback_source(cfg, &job.environment)?,
    })
}

/// Obtains the job's token, makes a key in memory and enrolls.
pub async fn start(cfg: &ClientConfig, job: &JobOptions) -> Result<Session, ClientError> {
    let source = token_source(cfg, job)?;
    let aud = cfg.audience(&job.environment)?;
    let mut cfg = cfg.clone();
    if let Some(ca) = &job.token_ca_file {
        cfg.token_ca_file = Some(ca.clone());
    }
    let tok = token::obtain(&source, &cfg, aud).await?;
    let params = EnrollParams {
        environment: job.environment.clone(),
        token: tok.to_string(),
        fingerprint: job.fingerprint.clone().unwrap_or_else(local_fingerprint),
        requested_ttl_seconds: job.ttl_seconds,
        region: None,
    };
    drop(tok);
    let session = Session::start(&cfg, &params).await?;
    crate::notes::note(&format!(
        "enrolled as {} (serial {}, {} s)",
        session.enrollment.spiffe_id,
        session.enrollment.serial,
        session.enrollment.granted_ttl_seconds
    ));
    Ok(session)
}

/// Whether a job agent serves this process (then the job's token is already spent).
pub fn agent_serves() -> bool {
    std::env::var_os(SOCK_VAR).is_some()
}

/// The session of a signing command, and whether it is the command's own (to be ended with
/// [`finish`]) rather than the job agent's.
pub async fn open(cfg: &ClientConfig, job: &JobOptions) -> Result<(Session, bool), ClientError> {
    let Some(sock) = std::env::var_os(SOCK_VAR) else {
        return Ok((start(cfg, job).await?, true));
    };
    let environment = std::env::var(ENV_VAR).unwrap_or_default();
    if environment != job.environment {
        return Err(ClientError::Usage(format!(
            "the job agent ({SOCK_VAR}) serves environment `{environment}`, not `{}`",
            job.environment
        )));
    }
    let signer = connect_agent(Path::new(&sock)).await?;
    let enrollment = v1::EnrollResponse {
        environment,
        region: std::env::var(REGION_VAR).unwrap_or_else(|_| cfg.region.clone()),
        ..Default::default()
    };
    Ok((Session { enrollment, signer }, false))
}

/// Ends a command's own session: its certificate is revoked, so a finished job leaves no live
/// credential. The job's own error comes first: a failed teardown after a failed step is
/// reported as a warning, never in its place.
pub async fn finish<T>(
    session: &mut Session,
    result: Result<T, ClientError>,
) -> Result<T, ClientError> {
    let revoked = session.revoke_self("job finished").await;
    match (result, revoked) {
        (Ok(t), Ok(_)) => Ok(t),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Err(e), Err(r)) => {
            crate::notes::note(&format!(
                "warning: revoking the job's certificate also failed: {r}"
            ));
            Err(e)
        }
    }
}

/// Runs `f` in the session of a signing command and ends it when the session is its own.
pub async fn with_session<T, F>(
    cfg: &ClientConfig,
    job: &JobOptions,
    f: F,
) -> Result<T, ClientError>
where
    F: AsyncFnOnce(&mut Session) -> Result<T, ClientError>,
{
    let (mut session, own) = open(cfg, job).await?;
    let result = f(&mut session).await;
    if own {
        finish(&mut session, result).await
    } else {
        result
    }
}

/// A Signer client over the job agent's socket at `path`.
pub async fn connect_agent(path: &Path) -> Result<SignerClient<Channel>, ClientError> {
    let path: Arc<PathBuf> = Arc::new(path.to_path_buf());
    let p = path.clone();
    let channel = Endpoint::from_static("http://meshsign-agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                let s = UnixStream::connect(p.as_path()).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            endpoint: path.display().to_string(),
            message: crate::net::source_chain(&e),
        })?;
    Ok(SignerClient::new(channel))
}
