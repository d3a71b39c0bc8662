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

/// How a job enrolls: its environment, token source, certificate lifetime and fingerprint
/// (the runner verbs' shared arguments: `sign`, `attest`, `codesign`, `exec`, `agent start`).
#[derive(clap::Args, Clone, Debug)]
pub struct JobOptions {
    /// Environment this job signs in.
    #[arg(long)]
    pub environment: String,
    /// Read the OIDC token from this file.
    #[arg(long, group = "tok")]
    pub token_file: Option<PathBuf>,
    /// Read the OIDC token from this environment variable.
    #[arg(long, group = "tok")]
    pub token_env: Option<String>,
    /// Fetch the OIDC token from the CI: github-actions, gitlab (the job's id_token in
    /// --id-token-var), buildkite (buildkite-agent oidc request-token), or auto (detect).
    #[arg(long, group = "tok", value_parser = ["github-actions", "gitlab", "buildkite", "auto"])]
    pub token_source: Option<String>,
    /// For --token-source github-actions: extra CA certificates (PEM) for the token endpoint.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// For --token-source gitlab: the variable that holds the job's id_token.
    #[arg(long, default_value = "MESHSIGN_ID_TOKEN")]
    pub id_token_var: String,
    /// Requested certificate lifetime in seconds (0 = the environment's cap; for asc-token,
    /// the token's lifetime, at most 1200).
    #[arg(long, default_value_t = 0)]
    pub ttl: u32,
    /// Runner fingerprint (default: the device key's, if `[runner] device_key` names one;
    /// else one derived from this machine, which a registered environment refuses).
    #[arg(long)]
    pub fingerprint: Option<String>,
}

/// The token source of `job` (nothing is fetched yet).
pub fn token_source(cfg: &ClientConfig, job: &JobOptions) -> Result<TokenSource, ClientError> {
    Ok(
        match (&job.token_file, &job.token_env, job.token_source.as_deref()) {
            (Some(f), _, _) => TokenSource::File(f.clone()),
            (_, Some(v), _) => TokenSource::Env(v.clone()),
            (_, _, Some("gitlab")) => TokenSource::Gitlab(job.id_token_var.clone()),
            (_, _, Some("buildkite")) => TokenSource::Buildkite,
            (_, _, Some("auto")) => token::detect(|v| std::env::var(v).ok()).ok_or_else(|| {
                ClientError::Usage(
                    "--token-source auto: not in GitHub Actions, GitLab CI or Buildkite".into(),
                )
            })?,
            (_, _, Some(_)) => TokenSource::GithubActions,
            _ => token::fallback_source(cfg, &job.environment)?,
        },
    )
}

/// Obtains the job's token, makes a key in memory and enrolls.
pub async fn start(cfg: &ClientConfig, job: &JobOptions) -> Result<Session, ClientError> {
    let source = token_source(cfg, job)?;
    let aud = cfg.audience(&job.environment)?;
    let mut cfg = cfg.clone();
    if let Some(ca) = &job.ca_file {
        cfg.token_ca_file = Some(ca.clone());
    }
    // The device key is opened (and a file key's mode checked) before the token is spent.
    let device =
        crate::device::DeviceKey::configured(cfg.runner.device_key.as_deref())?.map(Arc::new);
    let tok = token::obtain(&source, &cfg, aud).await?;
    let fingerprint = match (&job.fingerprint, &device) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.fingerprint(),
        (None, None) => local_fingerprint(),
    };
    let params = EnrollParams {
        device,
        environment: job.environment.clone(),
        token: tok.to_string(),
        fingerprint,
        requested_ttl_seconds: job.ttl,
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
    Ok((
        Session {
            enrollment,
            signer,
            device: None,
        },
        false,
    ))
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

/// A Signer client over the job agent's socket at `path`. A socket that is not there, or that
/// nobody listens on (an agent that stopped, a `MESHSIGN_AGENT_SOCK` left in the environment),
/// is named as a gone agent with what to do, not as a transport error.
pub async fn connect_agent(path: &Path) -> Result<SignerClient<Channel>, ClientError> {
    let gone = |why: &str| ClientError::Connect {
        endpoint: path.display().to_string(),
        message: format!(
            "the job agent is gone ({why}): {SOCK_VAR} names the socket of an agent that has \
             stopped; start one with `meshsign agent start …` and use the {SOCK_VAR} it prints, \
             or unset {SOCK_VAR} so that this command enrolls on its own"
        ),
    };
    if !path.exists() {
        return Err(gone("no socket there"));
    }
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
        .map_err(|e| {
            // The connector's own io::Error, found in the chain by its kind (not by its text).
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut kind = None;
            while let Some(err) = source {
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    kind = Some(io.kind());
                    break;
                }
                source = err.source();
            }
            match kind {
                Some(std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
                    gone("nobody listens on its socket")
                }
                _ => ClientError::Connect {
                    endpoint: path.display().to_string(),
                    message: crate::net::source_chain(&e),
                },
            }
        })?;
    Ok(SignerClient::new(channel))
}
