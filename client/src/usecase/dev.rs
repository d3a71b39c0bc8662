//! `meshsign dev token` (builds with the `dev` feature, the default): a token from a dev
//! site's issuer, shaped as GitHub Actions issues them.

use crate::session::token;
use crate::{ClientConfig, ClientError};
use clap::{Args, Subcommand};
use meshsign_certs_dev::GithubJob;

/// `meshsign dev` verbs.
#[derive(Subcommand)]
pub enum DevCommand {
    /// Print a token from the dev issuer, shaped as GitHub Actions issues them.
    Token {
        /// Environment: selects the audience.
        #[arg(long)]
        environment: String,
        /// The job the token is for.
        #[command(flatten)]
        job: JobArgs,
    },
}

/// The GitHub job a dev token names.
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

/// `meshsign dev token`: a token from the dev issuer.
pub fn run(
    cfg: &ClientConfig,
    command: DevCommand,
) -> Result<zeroize::Zeroizing<String>, ClientError> {
    let DevCommand::Token { environment, job } = command;
    let aud = cfg.audience(&environment)?;
    token::dev_token(cfg, aud, &github_job(&environment, &job))
}
