//! Dev-site helpers, only in builds with the `dev` feature (the default): `meshsign dev token`
//! and the dev issuer as the token source of a runner verb when none is given. A build without
//! the feature has neither: a runner must name its token source.

use meshsign_client::session::token::TokenSource;
use meshsign_client::{ClientConfig, ClientError};

/// The token source when a runner verb names none: the dev issuer of a dev site's client
/// config (dev builds only).
pub fn fallback_token_source(
    cfg: &ClientConfig,
    environment: &str,
) -> Result<TokenSource, ClientError> {
    #[cfg(feature = "dev")]
    if cfg.dev_issuer.is_some() {
        return Ok(TokenSource::Dev(meshsign_certs_dev::GithubJob::new(
            environment,
        )));
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

/// The token source of a drill that does not name one: the dev issuer (dev builds only).
pub fn default_token_source(environment: &str) -> Result<TokenSource, ClientError> {
    #[cfg(feature = "dev")]
    return Ok(TokenSource::Dev(meshsign_certs_dev::GithubJob::new(
        environment,
    )));
    #[cfg(not(feature = "dev"))]
    {
        let _ = environment;
        Err(ClientError::Token(
            "give --token-source github-actions (this build has no dev issuer)".into(),
        ))
    }
}

#[cfg(feature = "dev")]
pub use with_dev::*;

#[cfg(feature = "dev")]
mod with_dev {
    use clap::{Args, Subcommand};
    use meshsign_certs_dev::GithubJob;
    use meshsign_client::session::token;
    use meshsign_client::{ClientConfig, ClientError};

    #[derive(Subcommand)]
    pub enum DevCommand {
        /// Print a token from the dev issuer, shaped as GitHub Actions issues them.
        Token {
            /// Environment: selects the audience.
            #[arg(long)]
            environment: String,
            #[command(flatten)]
            job: JobArgs,
        },
    }

    #[derive(Args, Clone)]
    pub struct JobArgs {
        /// `repository` claim.
        #[arg(long, default_value = "acme/app")]
        repository: String,
        /// `ref` claim.
        #[arg(long = "ref", default_value = "refs/heads/main")]
        git_ref: String,
        /// `check_run_id` claim (the job id).
        #[arg(long, default_value = "1001")]
        job_id: String,
        /// `run_id` claim (the pipeline id, shared by every job of the run).
        #[arg(long, default_value = "13456789012")]
        pipeline_id: String,
    }
    fn github_job(environment: &str, j: &JobArgs) -> GithubJob {
        let mut job = GithubJob::new(environment);
        job.repository = j.repository.clone();
        job.git_ref = j.git_ref.clone();
        job.check_run_id = j.job_id.clone();
        job.run_id = j.pipeline_id.clone();
        job
    }

    /// `meshsign dev token`: prints a token from the dev issuer.
    pub fn dispatch(cfg: &ClientConfig, command: DevCommand) -> Result<(), ClientError> {
        let DevCommand::Token { environment, job } = command;
        let aud = cfg.audience(&environment)?;
        let t = token::dev_token(cfg, aud, &github_job(&environment, &job))?;
        out!("{}", t.as_str());
        Ok(())
    }
}
