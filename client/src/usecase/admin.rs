//! The ops verbs of `meshsign admin`, at one site or at every site of the fleet
//! (`--all-sites`). The commands' arguments are this use case's input (they derive clap's
//! `Subcommand`, so the CLI parses straight into them); [`run`] and [`run_fleet`] return what
//! the site answered as an [`Output`], which the CLI renders. Nothing here prints.

use std::path::PathBuf;

use clap::Subcommand;
use meshsign_proto::v1;

use super::drill::DrillReport;
use super::fleet::{Fleet, SiteResult};
use crate::session::token::TokenSource;
use crate::site::admin::{Admin, parse_time};
use crate::site::verification;
use crate::{ClientConfig, ClientError};

/// `admin distrust`: the signed list of jobs, pipelines, runners, regions or keys whose signatures verifiers refuse.
#[derive(Subcommand)]
pub enum DistrustCommand {
    /// Distrust every signature matching all that is given (at least one).
    Add {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// Signatures of this CI job (GitHub: the check run).
        #[arg(long)]
        job_id: Option<String>,
        /// Signatures of any job of this pipeline (GitHub run_id, GitLab pipeline_id,
        /// Buildkite build).
        #[arg(long)]
        pipeline_id: Option<String>,
        /// Signatures of this runner machine.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Signatures made by the site of this region.
        #[arg(long)]
        region: Option<String>,
        /// Signatures of this key version (alias@vN).
        #[arg(long)]
        key_id: Option<String>,
        /// Signatures made at or after (unix seconds or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Signatures made before (unix seconds or RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Why (published in the list).
        #[arg(long)]
        reason: String,
    },
    /// Remove a rule (its signatures verify again).
    Remove {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// The rule (d-...).
        id: String,
    },
    /// The environment's rules and list version.
    List {
        /// Environment.
        #[arg(long)]
        environment: String,
    },
}

/// `admin audit`: the audit log's key, retention and export.
#[derive(Subcommand)]
pub enum AdminAuditCommand {
    /// Print the audit (checkpoint) public key as PEM.
    PublicKey,
    /// Stream the audit log as JSON lines to stdout.
    Export {
        /// First seq, or a time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Keep streaming new entries.
        #[arg(long)]
        follow: bool,
        /// Only this environment (others become omitted-entry lines).
        #[arg(long)]
        environment: Option<String>,
        /// Only this job.
        #[arg(long)]
        job_id: Option<String>,
        /// Only this decision (allow|deny).
        #[arg(long)]
        decision: Option<String>,
    },
    /// Keep exported, checkpointed entries this many days (0: keep all); overrides
    /// `[audit] retention_days`.
    Retention {
        /// Days.
        #[arg(long)]
        days: u64,
    },
}

/// `admin key import --purpose asc-api`: the App Store Connect key's identity (issue 29).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AscKeyArgs {
    /// Apple's key id (the KID of AuthKey_KID.p8).
    #[arg(long)]
    pub asc_key_id: Option<String>,
    /// The team's issuer id (App Store Connect, Users and Access, Integrations).
    #[arg(long, conflicts_with = "asc_individual")]
    pub asc_issuer_id: Option<String>,
    /// An individual key (tokens carry `sub: "user"` instead of an issuer).
    #[arg(long)]
    pub asc_individual: bool,
    /// A scope its tokens may carry, e.g. "GET /notary/v2/submissions" (repeat; none:
    /// unrestricted, the key's whole role).
    #[arg(long = "asc-scope")]
    pub asc_scopes: Vec<String>,
}

/// `admin runner`: the site's registry of runner device keys (issue 28).
#[derive(Subcommand, Clone)]
pub enum RunnerAdminCommand {
    /// Register the signed request `meshsign runner init` printed (checks its signature).
    Register {
        /// The request (JSON).
        #[arg(long)]
        request: PathBuf,
        /// Environments it may enroll in (repeat; default: every environment).
        #[arg(long)]
        environment: Vec<String>,
        /// Labels for operators (asset tag, pool; repeat).
        #[arg(long)]
        label: Vec<String>,
    },
    /// Every registered runner.
    List,
    /// One runner (its keys, EK, state).
    Show {
        /// The runner fingerprint.
        fingerprint: String,
    },
    /// No new enrollments or renewals; its live certificates run out.
    Retire {
        /// The runner fingerprint.
        fingerprint: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
    /// No new enrollments or renewals, and its live certificates are refused on their next
    /// call.
    Revoke {
        /// The runner fingerprint.
        fingerprint: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
}

/// `meshsign admin` verbs.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// The runner registry: register, list, show, retire, revoke.
    Runner {
        #[command(subcommand)]
        /// The subcommand.
        command: RunnerAdminCommand,
    },
    /// The audit log: public key, export.
    Audit {
        #[command(subcommand)]
        /// The subcommand.
        command: AdminAuditCommand,
    },
    /// Runner CAs: list, stage, activate, retire, revoke.
    Issuer {
        #[command(subcommand)]
        /// The subcommand.
        command: IssuerCommand,
    },
    /// Revoke certificates by serial, job, pipeline or runner fingerprint (effective on the
    /// next RPC).
    Revoke {
        /// Certificate serial (hex).
        #[arg(long, group = "target", required = true)]
        serial: Option<String>,
        /// Every certificate of a CI job (GitHub: the check run).
        #[arg(long, group = "target")]
        job_id: Option<String>,
        /// Every certificate of any job of a pipeline (GitHub run_id, GitLab pipeline_id,
        /// Buildkite build).
        #[arg(long, group = "target")]
        pipeline_id: Option<String>,
        /// Every certificate of a runner machine.
        #[arg(long, group = "target")]
        fingerprint: Option<String>,
        /// Only certificates of this region.
        #[arg(long)]
        region: Option<String>,
        /// Only certificates issued at or after (unix seconds or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only certificates issued at or before (unix seconds or RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
    /// List revocation rules.
    Revocations,
    /// The site at a glance: whether it can record decisions, audit head and last checkpoint,
    /// and per environment its runner CAs, keys (newest version and age) and trust policies.
    Status,
    /// A job's signatures per key and per certificate, against each key's budget.
    Usage {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// The job id (the certificate serial for a provider without job ids).
        #[arg(long)]
        job_id: String,
    },
    /// Write a consistent backup of the site to FILE (mode 0600; keys stay wrapped under the
    /// KEK); `meshsignd restore --config C FILE` brings it back.
    Snapshot {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Trust policies: list, disable, enable, jwks set.
    Trust {
        #[command(subcommand)]
        /// The subcommand.
        command: TrustCommand,
    },
    /// Signing keys: list, create, rotate, disable, import.
    Key {
        #[command(subcommand)]
        /// The subcommand.
        command: KeyCommand,
    },
    /// After-the-fact distrust of signatures already made: add, remove, list (each change
    /// publishes a new version of the environment's signed distrust list).
    Distrust {
        #[command(subcommand)]
        /// The subcommand.
        command: DistrustCommand,
    },
    /// Two-person review: list proposals, approve another admin's.
    Review {
        #[command(subcommand)]
        /// The subcommand.
        command: ReviewCommand,
    },
    /// Disable a trust policy, prove refusal, re-enable; exit 1 if refusal took longer than
    /// --max-ms (with --all-sites: in every region at once, one row per region).
    Drill {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// The bound on refusal, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        max_ms: u64,
        /// Issuer URL of the policy (default: a random enabled one).
        #[arg(long)]
        issuer: Option<String>,
        /// Mint the drill's tokens from the CI (github-actions); default: the dev issuer.
        #[arg(long, value_parser = ["github-actions"])]
        token_source: Option<String>,
    },
}

/// `admin review`: proposals a second admin approves.
#[derive(Subcommand)]
pub enum ReviewCommand {
    /// Proposals (pending, approved, executed, expired), newest first.
    List,
    /// Approve a proposal another admin made; they then repeat their command.
    Approve {
        /// The proposal id (`p-…`, printed when the change was proposed).
        id: String,
    },
    /// Propose a site config file whose reload widens trust (named by its SHA-256); once
    /// another admin approves it, a SIGHUP applies exactly this file.
    ProposeConfig {
        /// The new site.toml, byte for byte as the site will read it.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

/// `admin issuer`: the environment's runner CAs.
#[derive(Subcommand)]
pub enum IssuerCommand {
    /// List runner CAs.
    List {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
    },
    /// Make a new runner CA that the sign port trusts but that does not issue yet.
    Stage {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
    },
    /// Make the staged CA (or --id) the one that issues; the previous one retires by itself.
    Activate {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Runner CA id (from `admin issuer list`).
        #[arg(long, default_value = "")]
        id: String,
    },
    /// Stop trusting a staged or retiring CA now.
    Retire {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Runner CA id (from `admin issuer list`).
        #[arg(long)]
        id: String,
    },
    /// Distrust a CA at once (revoking the active one activates a fresh one).
    Revoke {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Runner CA id (from `admin issuer list`).
        #[arg(long)]
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// `admin trust`: the OIDC trust policies.
#[derive(Subcommand)]
pub enum TrustCommand {
    /// List trust policies.
    List {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
    },
    /// Refuse new enrollments (and, unless --keep-sessions, sign calls) from a policy.
    Disable {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// OIDC issuer URL of the trust policy (e.g. https://token.actions.githubusercontent.com).
        #[arg(long)]
        issuer: String,
        /// Let certificates it already minted keep signing.
        #[arg(long)]
        keep_sessions: bool,
    },
    /// Re-enable a policy.
    Enable {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// OIDC issuer URL of the trust policy (e.g. https://token.actions.githubusercontent.com).
        #[arg(long)]
        issuer: String,
    },
    /// Pinned JWKS.
    Jwks {
        #[command(subcommand)]
        /// The subcommand.
        command: JwksCommand,
    },
}

/// `admin trust jwks`: the pinned JWKS of an issuer.
#[derive(Subcommand)]
pub enum JwksCommand {
    /// Pin a JWKS file for an issuer (every environment that trusts it, unless --environment).
    Set {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: Option<String>,
        /// OIDC issuer URL of the trust policy (e.g. https://token.actions.githubusercontent.com).
        #[arg(long)]
        issuer: String,
        /// Path of the file to read.
        #[arg(long)]
        file: PathBuf,
    },
    /// Compare a JWKS file with what the site pins for an issuer: the kids it would add,
    /// remove and keep (stage the IdP's next key before it rolls; with --all-sites, at every
    /// site). Changes nothing.
    Diff {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// OIDC issuer URL of the trust policy (e.g. https://token.actions.githubusercontent.com).
        #[arg(long)]
        issuer: String,
        /// Path of the JWKS file to compare.
        #[arg(long)]
        file: PathBuf,
    },
}

/// `admin key`: signing keys.
#[derive(Subcommand)]
pub enum KeyCommand {
    /// List keys and their versions.
    List {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
    },
    /// Create a key alias (v1).
    Create {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
        /// ecdsa-p256-sha256, or rsa-{2048,3072,4096}-{pkcs1,pss}-sha256.
        #[arg(long, default_value = "ecdsa-p256-sha256")]
        algorithm: String,
        /// Repository pattern that may use it (repeat; "*" for any).
        #[arg(long = "repository", required = true)]
        repositories: Vec<String>,
        /// Ref pattern that may use it (repeat; "*" for any).
        #[arg(long = "ref", required = true)]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms, attestation (alone: statements
        /// the site builds). Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
        /// Where the key is generated: software (in the site, wrapped under the KEK) or pkcs11
        /// (in the site's [pkcs11] token, non-extractable).
        #[arg(long, default_value = "software", value_parser = ["software", "pkcs11"])]
        backend: String,
    },
    /// Add alias@vN+1, which signs from then on.
    Rotate {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
    },
    /// Stop signing with an alias (its versions stay verifiable).
    Disable {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
    },
    /// Import a PKCS#8 PEM private key (one-way).
    Import {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
        /// PKCS#8 PEM private key.
        #[arg(long, required_unless_present = "p12", conflicts_with = "p12")]
        file: Option<PathBuf>,
        /// PKCS#12 (.p12 as exported from Keychain): key and certificate chain.
        #[arg(long)]
        p12: Option<PathBuf>,
        /// Environment variable holding the .p12 password (else it is asked for on the terminal).
        #[arg(long, default_value = "MESHSIGN_P12_PASSWORD")]
        password_env: String,
        /// Certificate chain for the key (PEM, leaf first).
        #[arg(long)]
        chain: Option<PathBuf>,
        /// Repository pattern that may use it (repeat; "*" for any).
        #[arg(long = "repository")]
        repositories: Vec<String>,
        /// Ref pattern that may use it (repeat; "*" for any).
        #[arg(long = "ref")]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms, attestation (alone: statements
        /// the site builds), asc-api (alone: an App Store Connect AuthKey_KID.p8, which mints
        /// `meshsign asc-token` tokens). Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
        /// Where the key goes: software (wrapped under the KEK in the store) or pkcs11 (into the
        /// site's [pkcs11] token, sensitive and not extractable).
        #[arg(long, default_value = "software", value_parser = ["software", "pkcs11"])]
        backend: String,
        /// An asc-api key's App Store Connect identity.
        #[command(flatten)]
        asc: AscKeyArgs,
    },
    /// Print a CSR signed by the key (for Apple or another CA); the key stays in the site.
    Csr {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
        /// Subject CN (for Apple: the name on the certificate).
        #[arg(long)]
        common_name: String,
        /// Subject emailAddress (optional).
        #[arg(long, default_value = "")]
        email: String,
        /// Subject O (optional).
        #[arg(long, default_value = "")]
        organization: String,
        /// Subject C, two letters (optional).
        #[arg(long, default_value = "")]
        country: String,
    },
    /// Attach the certificate chain the CA returned (PEM, leaf first) to the key.
    SetCertificate {
        /// Environment (partition) name, e.g. `production`.
        #[arg(long)]
        environment: String,
        /// Key alias (as signers name it with --key).
        #[arg(long)]
        alias: String,
        /// Path of the file to read.
        #[arg(long)]
        file: PathBuf,
    },
}

/// The kids of a JWKS file (public keys only are read; nothing is checked beyond the shape).
pub fn jwks_kids(file: &std::path::Path) -> Result<Vec<String>, ClientError> {
    let bytes = std::fs::read(file).map_err(ClientError::io(file))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Usage(format!("{}: not JSON: {e}", file.display())))?;
    let keys = v["keys"].as_array().ok_or_else(|| {
        ClientError::Usage(format!(
            "{}: not a JWKS (no \"keys\" array)",
            file.display()
        ))
    })?;
    let mut kids: Vec<String> = keys
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect();
    kids.sort();
    kids.dedup();
    Ok(kids)
}

/// Kids a new JWKS would add, remove and keep.
pub type KidDiff = (Vec<String>, Vec<String>, Vec<String>);

/// (added, removed, kept) kids of `next` against what `policies` pin for `issuer`.
pub fn jwks_diff(
    policies: &[v1::TrustPolicyInfo],
    issuer: &str,
    next: &[String],
) -> Result<KidDiff, ClientError> {
    let pinned = policies
        .iter()
        .find(|p| p.issuer == issuer)
        .map(|p| p.kids.clone())
        .ok_or_else(|| ClientError::Config(format!("no trust policy for issuer `{issuer}`")))?;
    let added = next
        .iter()
        .filter(|k| !pinned.contains(k))
        .cloned()
        .collect();
    let removed = pinned
        .iter()
        .filter(|k| !next.contains(k))
        .cloned()
        .collect();
    let kept = next
        .iter()
        .filter(|k| pinned.contains(k))
        .cloned()
        .collect();
    Ok((added, removed, kept))
}

/// The request of `admin distrust add` (None for the other subcommands).
fn distrust_request(command: &DistrustCommand) -> Result<Option<v1::DistrustRequest>, ClientError> {
    let ts = |t: &Option<String>| -> Result<Option<prost_types::Timestamp>, ClientError> {
        Ok(t.as_deref()
            .map(crate::site::admin::parse_time)
            .transpose()?
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }))
    };
    let DistrustCommand::Add {
        environment,
        job_id,
        pipeline_id,
        fingerprint,
        region,
        key_id,
        since,
        until,
        reason,
    } = command
    else {
        return Ok(None);
    };
    Ok(Some(v1::DistrustRequest {
        environment: environment.clone(),
        job_id: job_id.clone().unwrap_or_default(),
        runner_fingerprint: fingerprint.clone().unwrap_or_default(),
        region: region.clone().unwrap_or_default(),
        key_id: key_id.clone().unwrap_or_default(),
        not_before: ts(since)?,
        not_after: ts(until)?,
        reason: reason.clone(),
        pipeline_id: pipeline_id.clone().unwrap_or_default(),
    }))
}

/// The number of rules in a signed list as the admin port returned it (for display).
pub fn rule_count(l: &v1::DistrustList) -> String {
    serde_json::from_slice::<meshsign_evidence::attest::Envelope>(&l.envelope_json)
        .ok()
        .and_then(|e| e.payload_bytes().ok())
        .and_then(|p| serde_json::from_slice::<meshsign_evidence::distrust::DistrustList>(&p).ok())
        .map(|d| d.entries.len().to_string())
        .unwrap_or_else(|| "?".into())
}

fn drill_source(environment: &str, from_ci: bool) -> Result<TokenSource, ClientError> {
    if from_ci {
        Ok(TokenSource::GithubActions)
    } else {
        crate::session::token::drill_source(environment)
    }
}

fn revoke_request(command: &AdminCommand) -> Result<v1::RevokeRequest, ClientError> {
    let AdminCommand::Revoke {
        serial,
        job_id,
        pipeline_id,
        fingerprint,
        region,
        since,
        until,
        reason,
    } = command
    else {
        return Err(ClientError::Usage("not a revoke command".into()));
    };
    use v1::revoke_request::Target;
    let target = match (serial, job_id, pipeline_id, fingerprint) {
        (Some(s), ..) => Target::Serial(s.clone()),
        (_, Some(j), ..) => Target::JobId(j.clone()),
        (_, _, Some(p), _) => Target::PipelineId(p.clone()),
        (.., Some(f)) => Target::Fingerprint(f.clone()),
        _ => {
            return Err(ClientError::Config(
                "give --serial, --job-id, --pipeline-id or --fingerprint".into(),
            ));
        }
    };
    Ok(v1::RevokeRequest {
        target: Some(target),
        region: region.clone().unwrap_or_default(),
        since: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
        until: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
        reason: reason.clone(),
    })
}

fn set_policy(
    environment: String,
    issuer: String,
    enabled: bool,
    keep_sessions: bool,
) -> v1::SetTrustPolicyEnabledRequest {
    v1::SetTrustPolicyEnabledRequest {
        environment,
        issuer,
        enabled,
        keep_sessions,
    }
}

/// What an admin command answered, for the CLI to render.
pub enum Output {
    /// `drill`: one report per site; `max_ms` is the bound each must meet.
    Drills {
        /// Each site's (or this site's region's) report.
        results: Vec<SiteResult<DrillReport>>,
        /// The bound, in milliseconds.
        max_ms: u64,
    },
    /// `status`.
    Status(v1::SiteStatus),
    /// `revoke`.
    Revoked(v1::RevokeResponse),
    /// `revocations`.
    Revocations(Vec<v1::RevocationRule>),
    /// `usage`.
    Usage(v1::JobUsage),
    /// `snapshot`: its size and where it was written.
    Snapshot(usize, PathBuf),
    /// `issuer list`.
    Issuers(Vec<v1::IssuerInfo>),
    /// `issuer stage|activate|retire|revoke`.
    Issuer(v1::IssuerInfo),
    /// `trust list`, `trust jwks set`.
    Policies(Vec<v1::TrustPolicyInfo>),
    /// `trust disable|enable`.
    Policy(v1::TrustPolicyInfo),
    /// `trust jwks diff`.
    JwksDiff(KidDiff),
    /// `key list`.
    Keys(Vec<v1::KeyInfo>),
    /// `key create|rotate|disable|import|set-certificate`.
    Key(v1::KeyInfo),
    /// `key csr`.
    Csr(v1::KeyCsr),
    /// `distrust add|remove|list`: the signed list anyone gets, checked against the site's
    /// audit key.
    Distrust(meshsign_evidence::distrust::DistrustList),
    /// `distrust add --all-sites`: each site's new list as its admin port returned it.
    DistrustAdded(v1::DistrustList),
    /// `review list`.
    Proposals(Vec<v1::ProposalInfo>),
    /// `review propose-config`.
    Proposed(v1::ProposalInfo),
    /// `review approve`.
    Approved(v1::ProposalInfo),
    /// `audit public-key`.
    AuditKey(v1::AuditPublicKey),
    /// `audit retention`: the retention in days.
    Retention(u64),
    /// Registered runners.
    Runners(Vec<v1::RunnerInfo>),
    /// One runner.
    Runner(v1::RunnerInfo),
    /// `audit export`: the stream of JSON lines, and whether it follows new entries.
    Export(tonic::Streaming<v1::ExportLine>, bool),
    /// A command run with `--all-sites`: each site's answer (or error), by site name.
    Fleet(Vec<SiteResult<Output>>),
}

/// Runs an admin command at the site of `cfg`.
pub async fn run(cfg: &ClientConfig, command: AdminCommand) -> Result<Output, ClientError> {
    if let AdminCommand::Drill {
        environment,
        max_ms,
        issuer,
        token_source,
    } = command
    {
        let source = drill_source(&environment, token_source.is_some())?;
        let r = super::drill::exercise(cfg, &environment, issuer.as_deref(), &source).await;
        return Ok(Output::Drills {
            results: vec![(cfg.region.clone(), r)],
            max_ms,
        });
    }
    let mut c = Admin::connect(cfg).await?;
    Ok(match command {
        AdminCommand::Audit { command } => audit(&mut c, command).await?,
        AdminCommand::Runner { command } => runner(c, command).await?,
        AdminCommand::Issuer { command } => issuer(&mut c, command).await?,
        AdminCommand::Revoke { .. } => Output::Revoked(c.revoke(revoke_request(&command)?).await?),
        AdminCommand::Revocations => Output::Revocations(c.revocations().await?),
        AdminCommand::Status => Output::Status(c.status().await?),
        AdminCommand::Usage {
            environment,
            job_id,
        } => Output::Usage(c.job_usage(&environment, &job_id).await?),
        AdminCommand::Snapshot { out } => {
            let bytes = c.snapshot().await?;
            meshsign_evidence::files::write_atomic(&out, &bytes, true)
                .map_err(ClientError::io(&out))?;
            Output::Snapshot(bytes.len(), out)
        }
        AdminCommand::Trust { command } => trust(cfg, &mut c, command).await?,
        AdminCommand::Key { command } => keys(&mut c, command).await?,
        AdminCommand::Distrust { command } => distrust(cfg, &mut c, command).await?,
        AdminCommand::Review { command } => match command {
            ReviewCommand::List => Output::Proposals(c.proposals().await?),
            ReviewCommand::ProposeConfig { file } => {
                let bytes = std::fs::read(&file).map_err(ClientError::io(&file))?;
                Output::Proposed(c.propose_config(&bytes).await?)
            }
            ReviewCommand::Approve { id } => Output::Approved(c.approve(&id).await?),
        },
        AdminCommand::Drill { .. } => {
            return Err(ClientError::Usage("drill: handled above".into()));
        }
    })
}

/// Calls `f` at every site of the fleet with a connected [`Admin`] and its own copy of `req`.
async fn each_admin<R, F, Fut>(fleet: &Fleet, req: R, f: F) -> Vec<SiteResult<Output>>
where
    R: Clone + Send + 'static,
    F: Fn(Admin, R) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Output, ClientError>> + Send + 'static,
{
    fleet
        .each(|cfg| {
            let (req, f) = (req.clone(), f.clone());
            async move { f(Admin::connect(&cfg).await?, req).await }
        })
        .await
}

/// The commands `--all-sites` runs.
pub const FLEET_COMMANDS: &str = "drill, revoke, trust disable, trust enable, trust jwks set, \
                                  trust jwks diff, distrust add, status, runner";

/// The columns of `admin runner list|show`.
pub const RUNNER_HEADER: &[&str] = &[
    "FINGERPRINT",
    "BACKEND",
    "STATE",
    "HOST",
    "INSTANCE",
    "USER",
    "ENVIRONMENTS",
];

/// A runner's row under [`RUNNER_HEADER`].
pub fn runner_row(r: &v1::RunnerInfo) -> Vec<String> {
    let envs = match r.environments.is_empty() {
        true => "(all)".to_string(),
        false => r.environments.join(","),
    };
    [
        &r.fingerprint,
        &r.backend,
        &r.state,
        &r.hostname,
        &r.instance,
        &r.os_user,
        &envs,
    ]
    .map(|s| s.to_string())
    .to_vec()
}

/// A runner as JSON (keys base64).
pub fn runner_json(r: &v1::RunnerInfo) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::json!({
        "fingerprint": r.fingerprint, "backend": r.backend, "state": r.state,
        "hostname": r.hostname, "instance": r.instance, "os_user": r.os_user,
        "environments": r.environments, "labels": r.labels, "reason": r.reason,
        "registered_by": r.registered_by, "registered_at": r.registered_at.map(|t| t.seconds),
        "changed_by": r.changed_by, "changed_at": r.changed_at.map(|t| t.seconds),
        "spki": b64(&r.spki), "ek_pub": b64(&r.ek_pub), "ek_cert": b64(&r.ek_cert),
    })
}

/// `admin runner …` at one site.
async fn runner(mut c: Admin, command: RunnerAdminCommand) -> Result<Output, ClientError> {
    use RunnerAdminCommand as R;
    let at = |fingerprint: String, reason: String| v1::RunnerRef {
        fingerprint,
        reason,
    };
    Ok(match command {
        R::Register {
            request,
            environment,
            label,
        } => {
            let bytes = std::fs::read(&request).map_err(ClientError::io(&request))?;
            Output::Runner(
                c.register_runner(v1::RegisterRunnerRequest {
                    request: bytes,
                    environments: environment,
                    labels: label,
                })
                .await?,
            )
        }
        R::List => Output::Runners(c.runners().await?),
        R::Show { fingerprint } => {
            Output::Runner(c.runner(at(fingerprint, String::new()), None).await?)
        }
        R::Retire {
            fingerprint,
            reason,
        } => Output::Runner(c.runner(at(fingerprint, reason), Some(false)).await?),
        R::Revoke {
            fingerprint,
            reason,
        } => Output::Runner(c.runner(at(fingerprint, reason), Some(true)).await?),
    })
}

/// Runs an admin command at every site of the fleet (`--all-sites`), each site answering for
/// itself (each signs its own distrust list): one result per site.
pub async fn run_fleet(fleet: &Fleet, command: AdminCommand) -> Result<Output, ClientError> {
    use AdminCommand as A;
    use TrustCommand as T;
    Ok(Output::Fleet(match command {
        A::Drill {
            environment,
            max_ms,
            issuer,
            token_source,
        } => {
            let source = drill_source(&environment, token_source.is_some())?;
            let results = fleet.drill(&environment, issuer.as_deref(), &source).await;
            return Ok(Output::Drills { results, max_ms });
        }
        A::Runner { command } => {
            each_admin(fleet, command, |a, c| async move { runner(a, c).await }).await
        }
        A::Status => {
            each_admin(fleet, (), |mut a, ()| async move {
                Ok(Output::Status(a.status().await?))
            })
            .await
        }
        A::Revoke { .. } => {
            let req = revoke_request(&command)?;
            each_admin(fleet, req, |mut a, r| async move {
                Ok(Output::Revoked(a.revoke(r).await?))
            })
            .await
        }
        A::Trust {
            command:
                T::Disable {
                    environment,
                    issuer,
                    keep_sessions,
                },
        } => {
            set_policy_everywhere(fleet, set_policy(environment, issuer, false, keep_sessions))
                .await
        }
        A::Trust {
            command: T::Enable {
                environment,
                issuer,
            },
        } => set_policy_everywhere(fleet, set_policy(environment, issuer, true, false)).await,
        A::Trust {
            command:
                T::Jwks {
                    command:
                        JwksCommand::Set {
                            environment,
                            issuer,
                            file,
                        },
                },
        } => {
            let environment = environment.ok_or_else(|| {
                ClientError::Usage(
                    "--all-sites trust jwks set needs --environment (each site pins its own)"
                        .into(),
                )
            })?;
            let jwks_json = std::fs::read(&file).map_err(ClientError::io(&file))?;
            let req = v1::SetJwksRequest {
                environment,
                issuer,
                jwks_json,
            };
            each_admin(fleet, req, |mut a, r| async move {
                Ok(Output::Policy(a.set_jwks(r).await?))
            })
            .await
        }
        A::Trust {
            command:
                T::Jwks {
                    command:
                        JwksCommand::Diff {
                            environment,
                            issuer,
                            file,
                        },
                },
        } => {
            let next = jwks_kids(&file)?;
            each_admin(fleet, (environment, issuer, next), |mut a, r| async move {
                Ok(Output::JwksDiff(jwks_diff(
                    &a.trust_policies(&r.0).await?,
                    &r.1,
                    &r.2,
                )?))
            })
            .await
        }
        A::Distrust {
            command: command @ DistrustCommand::Add { .. },
        } => {
            let Some(req) = distrust_request(&command)? else {
                return Err(ClientError::Usage("distrust add: no rule".into()));
            };
            each_admin(fleet, req, |mut a, r| async move {
                Ok(Output::DistrustAdded(a.distrust(r).await?))
            })
            .await
        }
        _ => {
            return Err(ClientError::Usage(format!(
                "--all-sites works with: {FLEET_COMMANDS}"
            )));
        }
    }))
}

async fn set_policy_everywhere(
    fleet: &Fleet,
    req: v1::SetTrustPolicyEnabledRequest,
) -> Vec<SiteResult<Output>> {
    each_admin(fleet, req, |mut a, r| async move {
        Ok(Output::Policy(a.set_trust_policy_enabled(r).await?))
    })
    .await
}

async fn audit(c: &mut Admin, command: AdminAuditCommand) -> Result<Output, ClientError> {
    Ok(match command {
        AdminAuditCommand::PublicKey => Output::AuditKey(c.audit_public_key().await?),
        AdminAuditCommand::Retention { days } => {
            Output::Retention(c.set_audit_retention(days).await?)
        }
        AdminAuditCommand::Export {
            since,
            follow,
            environment,
            job_id,
            decision,
        } => {
            let (since_seq, since_time) = match since.as_deref() {
                None => (0, 0),
                Some(s) => match s.parse::<u64>() {
                    Ok(n) => (n, 0),
                    Err(_) => (0, parse_time(s)?),
                },
            };
            let mut req = v1::ExportAuditRequest {
                since_seq,
                since_time,
                follow,
                environment: environment.unwrap_or_default(),
                job_id: job_id.unwrap_or_default(),
                lines_per_message: crate::site::admin::EXPORT_LINES_PER_MESSAGE,
                ..Default::default()
            };
            if let Some(d) = decision {
                req.set_decision(&d);
            }
            Output::Export(c.export_audit(req).await?, follow)
        }
    })
}

async fn issuer(c: &mut Admin, command: IssuerCommand) -> Result<Output, ClientError> {
    Ok(Output::Issuer(match command {
        IssuerCommand::List { environment } => {
            return Ok(Output::Issuers(c.list_runner_cas(&environment).await?));
        }
        IssuerCommand::Stage { environment } => c.stage_runner_ca(&environment).await?,
        IssuerCommand::Activate { environment, id } => {
            c.activate_runner_ca(&environment, &id).await?
        }
        IssuerCommand::Retire { environment, id } => c.retire_runner_ca(&environment, &id).await?,
        IssuerCommand::Revoke {
            environment,
            id,
            reason,
        } => c.revoke_runner_ca(&environment, &id, &reason).await?,
    }))
}

async fn trust(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: TrustCommand,
) -> Result<Output, ClientError> {
    Ok(match command {
        TrustCommand::List { environment } => {
            Output::Policies(c.trust_policies(&environment).await?)
        }
        TrustCommand::Disable {
            environment,
            issuer,
            keep_sessions,
        } => Output::Policy(
            c.set_trust_policy_enabled(set_policy(environment, issuer, false, keep_sessions))
                .await?,
        ),
        TrustCommand::Enable {
            environment,
            issuer,
        } => Output::Policy(
            c.set_trust_policy_enabled(set_policy(environment, issuer, true, false))
                .await?,
        ),
        TrustCommand::Jwks {
            command:
                JwksCommand::Set {
                    environment,
                    issuer,
                    file,
                },
        } => {
            let envs: Vec<String> = match environment {
                Some(e) => vec![e],
                None => cfg.environments.keys().cloned().collect(),
            };
            Output::Policies(set_jwks_in(c, &envs, issuer, &file).await?)
        }
        TrustCommand::Jwks {
            command:
                JwksCommand::Diff {
                    environment,
                    issuer,
                    file,
                },
        } => Output::JwksDiff(jwks_diff(
            &c.trust_policies(&environment).await?,
            &issuer,
            &jwks_kids(&file)?,
        )?),
    })
}

/// Pins the JWKS in `file` for `issuer` in every environment of `envs` that trusts it.
async fn set_jwks_in(
    c: &mut Admin,
    envs: &[String],
    issuer: String,
    file: &std::path::Path,
) -> Result<Vec<v1::TrustPolicyInfo>, ClientError> {
    let jwks = std::fs::read(file).map_err(ClientError::io(file))?;
    let mut done = Vec::new();
    for e in envs {
        let req = v1::SetJwksRequest {
            environment: e.clone(),
            issuer: issuer.clone(),
            jwks_json: jwks.clone(),
        };
        match c.set_jwks(req).await {
            Ok(p) => done.push(p),
            Err(ClientError::Rpc {
                code: tonic::Code::NotFound,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    if done.is_empty() {
        return Err(ClientError::Config(format!(
            "no environment trusts issuer `{issuer}`"
        )));
    }
    Ok(done)
}

async fn keys(c: &mut Admin, command: KeyCommand) -> Result<Output, ClientError> {
    Ok(Output::Key(match command {
        KeyCommand::List { environment } => return Ok(Output::Keys(c.keys(&environment).await?)),
        KeyCommand::Create {
            environment,
            alias,
            algorithm,
            repositories,
            refs,
            purposes,
            backend,
        } => {
            c.create_key(v1::CreateKeyRequest {
                environment,
                alias,
                algorithm,
                repositories,
                refs,
                purposes,
                backend,
            })
            .await?
        }
        KeyCommand::Rotate { environment, alias } => {
            c.rotate_key(v1::KeyRef { environment, alias }).await?
        }
        KeyCommand::Disable { environment, alias } => {
            c.disable_key(v1::KeyRef { environment, alias }).await?
        }
        command @ KeyCommand::Import { .. } => c.import_key(import_request(command)?).await?,
        KeyCommand::Csr {
            environment,
            alias,
            common_name,
            email,
            organization,
            country,
        } => {
            return Ok(Output::Csr(
                c.key_csr(v1::KeyCsrRequest {
                    environment,
                    alias,
                    common_name,
                    email,
                    organization,
                    country,
                })
                .await?,
            ));
        }
        KeyCommand::SetCertificate {
            environment,
            alias,
            file,
        } => {
            let chain_pem = std::fs::read(&file).map_err(ClientError::io(&file))?;
            c.set_key_certificate(v1::SetKeyCertificateRequest {
                environment,
                alias,
                chain_pem,
            })
            .await?
        }
    }))
}

/// The request of `key import`: the key is read (and a .p12 opened) here, on the ops machine,
/// and sent one way.
fn import_request(command: KeyCommand) -> Result<v1::ImportKeyRequest, ClientError> {
    let KeyCommand::Import {
        environment,
        alias,
        file,
        p12,
        password_env,
        chain,
        repositories,
        refs,
        purposes,
        backend,
        asc,
    } = command
    else {
        return Err(ClientError::Usage("not a key import".into()));
    };
    let (pem, chain_pem) = match (&file, &p12) {
        (_, Some(p12)) => crate::site::admin::read_p12(p12, &password_env)?,
        (Some(file), None) => {
            let pem = zeroize::Zeroizing::new(std::fs::read(file).map_err(ClientError::io(file))?);
            let chain_pem = match &chain {
                Some(p) => std::fs::read(p).map_err(ClientError::io(p))?,
                None => Vec::new(),
            };
            (pem, chain_pem)
        }
        (None, None) => return Err(ClientError::Config("give --file or --p12".into())),
    };
    Ok(v1::ImportKeyRequest {
        environment,
        alias,
        pkcs8_pem: pem.to_vec(),
        repositories,
        refs,
        chain_pem,
        purposes,
        backend,
        asc_key_id: asc.asc_key_id.unwrap_or_default(),
        asc_issuer_id: asc.asc_issuer_id.unwrap_or_default(),
        asc_individual: asc.asc_individual,
        asc_scopes: asc.asc_scopes,
    })
}

async fn distrust(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: DistrustCommand,
) -> Result<Output, ClientError> {
    let environment = match &command {
        DistrustCommand::Add { environment, .. }
        | DistrustCommand::Remove { environment, .. }
        | DistrustCommand::List { environment } => environment.clone(),
    };
    match command {
        DistrustCommand::Add { .. } => {
            if let Some(req) = distrust_request(&command)? {
                c.distrust(req).await?;
            }
        }
        DistrustCommand::Remove { environment, id } => {
            c.undistrust(&environment, &id).await?;
        }
        DistrustCommand::List { .. } => {}
    }
    // What anyone gets: the signed list, checked against the site's audit key.
    let mut v = verification::client(cfg).await?;
    let spki = verification::material(&mut v, &environment, "")
        .await?
        .audit_public_key_der;
    let (list, _) = verification::distrust_list(&mut v, &environment, &spki).await?;
    Ok(Output::Distrust(list))
}
