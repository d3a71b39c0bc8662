//! `meshsign asc-token` (issue 29): an App Store Connect API token for this job, minted by the
//! site with an `asc-api` key that never leaves it — what `notarytool`, `altool`, fastlane and
//! the App Store Connect REST API take instead of an `AuthKey_KID.p8` on the runner.

use crate::session::job::{self, JobOptions};
use crate::{ClientConfig, ClientError};

/// `meshsign asc-token`. Its `--ttl` (the job flags' lifetime) is the token's lifetime here:
/// at most 1200 s, Apple's limit, and 1200 when not given; the job's own short session uses
/// the environment's certificate lifetime and is revoked as soon as the token is out.
#[derive(clap::Args, Clone, Debug)]
pub struct AscTokenOptions {
    /// How the job enrolls (or the job agent's session, when one serves this job).
    #[command(flatten)]
    pub job: JobOptions,
    /// The site's `asc-api` key alias.
    #[arg(long)]
    pub key: String,
    /// A scope to narrow the token to, e.g. "GET /notary/v2/submissions" (repeat; default:
    /// the key's own scopes).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// jwt (the token alone), header (`Authorization: Bearer …`), or env
    /// (`MESHSIGN_ASC_TOKEN=…`, `MESHSIGN_ASC_TOKEN_EXPIRES=…` for $GITHUB_ENV).
    #[arg(long, default_value = "jwt", value_parser = ["jwt", "header", "env"])]
    pub format: String,
}

/// Mints the token and renders it as `--format` asks (the token is the only output).
pub async fn asc_token(cfg: &ClientConfig, o: &AscTokenOptions) -> Result<String, ClientError> {
    let mut job = o.job.clone();
    let ttl = std::mem::take(&mut job.ttl);
    let (mut session, own) = job::open(cfg, &job).await?;
    let result = session.asc_token(&o.key, &o.scopes, ttl).await;
    let t = if own {
        job::finish(&mut session, result).await?
    } else {
        result?
    };
    let expires = t.expires_at.map_or(0, |e| e.seconds);
    crate::notes::note(&format!(
        "App Store Connect token from {} (audit {}), expires {}",
        t.key_id, t.audit_id, expires
    ));
    Ok(match o.format.as_str() {
        "header" => format!("Authorization: Bearer {}", t.token),
        "env" => format!(
            "MESHSIGN_ASC_TOKEN={}\nMESHSIGN_ASC_TOKEN_EXPIRES={expires}",
            t.token
        ),
        _ => t.token,
    })
}
