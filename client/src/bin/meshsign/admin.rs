//! `meshsign admin …`: ops verbs on the admin port, one function per command group, over the
//! library's typed [`Admin`] client (which names the RPC in every error).

use std::path::PathBuf;

use super::render::*;
use clap::Subcommand;
use meshsign_client::session::token::TokenSource;
use meshsign_client::site::admin::{Admin, parse_time};
use meshsign_client::usecase::drill::DrillReport;
use meshsign_client::usecase::fleet::{Fleet, SiteResult};
use meshsign_client::{ClientConfig, ClientError};
use meshsign_evidence::pem_encode;
use meshsign_proto::v1;

/// How commands print their data (`--output`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A header line, then tab-separated rows.
    #[default]
    Table,
    /// JSON (an array for listings, an object for one item).
    Json,
}

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

#[derive(Subcommand)]
pub enum AdminCommand {
    /// The audit log: public key, export.
    Audit {
        #[command(subcommand)]
        command: AdminAuditCommand,
    },
    /// Runner CAs: list, stage, activate, retire, revoke.
    Issuer {
        #[command(subcommand)]
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
        command: TrustCommand,
    },
    /// Signing keys: list, create, rotate, disable, import.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// After-the-fact distrust of signatures already made: add, remove, list (each change
    /// publishes a new version of the environment's signed distrust list).
    Distrust {
        #[command(subcommand)]
        command: DistrustCommand,
    },
    /// Two-person review: list proposals, approve another admin's.
    Review {
        #[command(subcommand)]
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
        command: JwksCommand,
    },
}

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

/// The kids of a JWKS file (public keys only are read; nothing is checked beyond the shape).
fn jwks_kids(file: &std::path::Path) -> Result<Vec<String>, ClientError> {
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
type KidDiff = (Vec<String>, Vec<String>, Vec<String>);

/// (added, removed, kept) kids of `next` against what `policies` pin for `issuer`.
fn jwks_diff(
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

const JWKS_DIFF_HEADER: &[&str] = &["ADDED", "REMOVED", "KEPT"];

fn jwks_diff_row(d: &KidDiff) -> Vec<String> {
    let join = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    vec![join(&d.0), join(&d.1), join(&d.2)]
}

fn jwks_diff_json(d: &KidDiff) -> serde_json::Value {
    serde_json::json!({"added": d.0, "removed": d.1, "kept": d.2})
}

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
        /// the site builds). Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
        /// Where the key goes: software (wrapped under the KEK in the store) or pkcs11 (into the
        /// site's [pkcs11] token, sensitive and not extractable).
        #[arg(long, default_value = "software", value_parser = ["software", "pkcs11"])]
        backend: String,
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

/// Runs an admin command at the site of `cfg`.
pub async fn dispatch(
    cfg: &ClientConfig,
    command: AdminCommand,
    format: Format,
) -> Result<(), ClientError> {
    match command {
        AdminCommand::Drill {
            environment,
            max_ms,
            issuer,
            token_source,
        } => {
            let source = drill_source(&environment, token_source.is_some())?;
            let r = meshsign_client::usecase::drill::exercise(
                cfg,
                &environment,
                issuer.as_deref(),
                &source,
            )
            .await;
            report_drills(vec![(cfg.region.clone(), r)], format, max_ms, false)
        }
        command => {
            let mut c = Admin::connect(cfg).await?;
            run_at(cfg, &mut c, command, format).await
        }
    }
}

/// Calls `f` at every site of the fleet with a connected [`Admin`] and its own copy of `req`.
async fn each_admin<R, T, F, Fut>(fleet: &Fleet, req: R, f: F) -> Vec<SiteResult<T>>
where
    R: Clone + Send + 'static,
    F: Fn(Admin, R) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
    T: Send + 'static,
{
    fleet
        .each(|cfg| {
            let (req, f) = (req.clone(), f.clone());
            async move { f(Admin::connect(&cfg).await?, req).await }
        })
        .await
}

/// Runs an admin command at every site of the fleet (`--all-sites`): drill, revoke, trust
/// disable/enable, JWKS set and diff, distrust add and status (each site signs its own distrust list). Prints one table with a SITE column (or a JSON array of
/// `{site, region, result | error}`); fails if any site failed.
pub async fn dispatch_fleet(
    fleet: &Fleet,
    command: AdminCommand,
    format: Format,
) -> Result<(), ClientError> {
    match command {
        AdminCommand::Drill {
            environment,
            max_ms,
            issuer,
            token_source,
        } => {
            let source = drill_source(&environment, token_source.is_some())?;
            let results = fleet.drill(&environment, issuer.as_deref(), &source).await;
            report_drills(results, format, max_ms, true)
        }
        AdminCommand::Status => {
            let results = each_admin(fleet, (), |mut a, ()| async move { a.status().await }).await;
            fleet_report(
                fleet,
                results,
                format,
                |st| (status_rows(st), status_json(st)),
                STATUS_HEADER,
            )
        }
        AdminCommand::Revoke { .. } => {
            let req = revoke_request(&command)?;
            let results = each_admin(fleet, req, |mut a, r| async move { a.revoke(r).await }).await;
            fleet_report(
                fleet,
                results,
                format,
                |r| (vec![revoke_row(r)], revoke_json(r)),
                REVOKE_HEADER,
            )
        }
        AdminCommand::Trust {
            command: TrustCommand::Disable { .. } | TrustCommand::Enable { .. },
        } => {
            let AdminCommand::Trust { command } = command else {
                return Ok(());
            };
            let req = match command {
                TrustCommand::Disable {
                    environment,
                    issuer,
                    keep_sessions,
                } => set_policy(environment, issuer, false, keep_sessions),
                TrustCommand::Enable {
                    environment,
                    issuer,
                } => set_policy(environment, issuer, true, false),
                _ => return Ok(()),
            };
            let results = each_admin(fleet, req, |mut a, r| async move {
                a.set_trust_policy_enabled(r).await
            })
            .await;
            fleet_report(
                fleet,
                results,
                format,
                |p| (vec![p.row()], p.json()),
                v1::TrustPolicyInfo::HEADER,
            )
        }
        AdminCommand::Trust {
            command:
                TrustCommand::Jwks {
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
            let req = v1::SetJwksRequest {
                environment,
                issuer,
                jwks_json: std::fs::read(&file).map_err(ClientError::io(&file))?,
            };
            let results =
                each_admin(fleet, req, |mut a, r| async move { a.set_jwks(r).await }).await;
            fleet_report(
                fleet,
                results,
                format,
                |p| (vec![p.row()], p.json()),
                v1::TrustPolicyInfo::HEADER,
            )
        }
        AdminCommand::Trust {
            command:
                TrustCommand::Jwks {
                    command:
                        JwksCommand::Diff {
                            environment,
                            issuer,
                            file,
                        },
                },
        } => {
            let next = jwks_kids(&file)?;
            let results = each_admin(fleet, (environment, issuer, next), |mut a, r| async move {
                jwks_diff(&a.trust_policies(&r.0).await?, &r.1, &r.2)
            })
            .await;
            fleet_report(
                fleet,
                results,
                format,
                |d| (vec![jwks_diff_row(d)], jwks_diff_json(d)),
                JWKS_DIFF_HEADER,
            )
        }
        AdminCommand::Distrust {
            command: command @ DistrustCommand::Add { .. },
        } => {
            let Some(req) = distrust_request(&command)? else {
                return Ok(());
            };
            let results =
                each_admin(fleet, req, |mut a, r| async move { a.distrust(r).await }).await;
            fleet_report(
                fleet,
                results,
                format,
                |l| {
                    (
                        vec![vec![l.version.to_string(), rule_count(l)]],
                        serde_json::json!({ "version": l.version, "rules": rule_count(l) }),
                    )
                },
                &["LIST VERSION", "RULES"],
            )
        }
        _ => Err(ClientError::Usage(
            "--all-sites works with: drill, revoke, trust disable, trust enable, trust jwks set, \
             trust jwks diff, distrust add, status"
                .into(),
        )),
    }
}

async fn run_at(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: AdminCommand,
    format: Format,
) -> Result<(), ClientError> {
    match command {
        AdminCommand::Audit { command } => audit(c, command, format).await,
        AdminCommand::Issuer { command } => runner_cas(c, command, format).await,
        AdminCommand::Revoke { .. } => {
            let r = c.revoke(revoke_request(&command)?).await?;
            match format {
                Format::Json => print_json(&revoke_json(&r)),
                Format::Table => {
                    out!("{}", REVOKE_HEADER.join("\t"));
                    out!("{}", revoke_row(&r).join("\t"));
                }
            }
            Ok(())
        }
        AdminCommand::Revocations => {
            emit(format, &c.revocations().await?);
            Ok(())
        }
        AdminCommand::Status => {
            let st = c.status().await?;
            match format {
                Format::Json => print_json(&status_json(&st)),
                Format::Table => print_status(&st),
            }
            Ok(())
        }
        AdminCommand::Usage {
            environment,
            job_id,
        } => {
            let u = c.job_usage(&environment, &job_id).await?;
            let limit = |b: Option<u64>| b.map_or("unlimited".to_string(), |b| b.to_string());
            match format {
                Format::Json => print_json(&serde_json::json!({
                    "environment": u.environment,
                    "job_id": u.job_id,
                    "keys": u.keys.iter().map(|k| serde_json::json!({
                        "key_alias": k.key_alias,
                        "total": k.total,
                        "per_job_budget": k.per_job_budget,
                        "per_certificate_budget": k.per_certificate_budget,
                        "by_certificate": k.by_certificate,
                    })).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    out!(
                        "KEY\tSIGNATURES\tJOB BUDGET\tCERTIFICATE\tSIGNATURES\tCERTIFICATE BUDGET"
                    );
                    for k in u.keys {
                        out!(
                            "{}\t{}\t{}\t-\t-\t{}",
                            k.key_alias,
                            k.total,
                            limit(k.per_job_budget),
                            limit(k.per_certificate_budget)
                        );
                        for (serial, n) in k.by_certificate {
                            out!("{}\t-\t-\t{serial}\t{n}\t-", k.key_alias);
                        }
                    }
                }
            }
            Ok(())
        }
        AdminCommand::Snapshot { out } => {
            let bytes = c.snapshot().await?;
            meshsign_evidence::files::write_atomic(&out, &bytes, true)
                .map_err(ClientError::io(&out))?;
            eprintln!("snapshot: {} bytes -> {}", bytes.len(), out.display());
            Ok(())
        }
        AdminCommand::Trust { command } => trust(cfg, c, command, format).await,
        AdminCommand::Key { command } => keys(c, command, format).await,
        AdminCommand::Distrust { command } => distrust(cfg, c, command, format).await,
        AdminCommand::Review { command } => {
            match command {
                ReviewCommand::List => emit(format, &c.proposals().await?),
                ReviewCommand::ProposeConfig { file } => {
                    let bytes = std::fs::read(&file).map_err(ClientError::io(&file))?;
                    let p = c.propose_config(&bytes).await?;
                    emit_one(format, &p);
                    if format == Format::Table {
                        eprintln!(
                            "proposed; another admin runs `meshsign admin review approve {}` \
                             before {}, then SIGHUP applies the file",
                            p.id,
                            when(p.expires_at)
                        );
                    }
                }
                ReviewCommand::Approve { id } => {
                    let p = c.approve(&id).await?;
                    emit_one(format, &p);
                    if format == Format::Table {
                        eprintln!(
                            "approved; `{}` now repeats the command before {}",
                            p.proposer,
                            when(p.expires_at)
                        );
                    }
                }
            }
            Ok(())
        }
        AdminCommand::Drill { .. } => Ok(()),
    }
}

/// The request of `admin distrust add` (None for the other subcommands).
fn distrust_request(command: &DistrustCommand) -> Result<Option<v1::DistrustRequest>, ClientError> {
    let ts = |t: &Option<String>| -> Result<Option<prost_types::Timestamp>, ClientError> {
        Ok(t.as_deref()
            .map(meshsign_client::site::admin::parse_time)
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
fn rule_count(l: &v1::DistrustList) -> String {
    serde_json::from_slice::<meshsign_evidence::attest::Envelope>(&l.envelope_json)
        .ok()
        .and_then(|e| e.payload_bytes().ok())
        .and_then(|p| serde_json::from_slice::<meshsign_evidence::distrust::DistrustList>(&p).ok())
        .map(|d| d.entries.len().to_string())
        .unwrap_or_else(|| "?".into())
}

async fn distrust(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: DistrustCommand,
    format: Format,
) -> Result<(), ClientError> {
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
    let mut v = meshsign_client::site::verification::client(cfg).await?;
    let spki = meshsign_client::site::verification::material(&mut v, &environment, "")
        .await?
        .audit_public_key_der;
    let (list, _) =
        meshsign_client::site::verification::distrust_list(&mut v, &environment, &spki).await?;
    if format == Format::Table {
        eprintln!(
            "distrust list of `{}` at `{}`: version {}",
            list.environment, list.region, list.version
        );
    }
    emit(format, &list.entries);
    Ok(())
}

impl Render for meshsign_evidence::distrust::DistrustEntry {
    const HEADER: &'static [&'static str] = &[
        "RULE", "JOB", "PIPELINE", "RUNNER", "REGION", "KEY", "FROM", "BEFORE", "REASON", "BY",
    ];
    fn row(&self) -> Vec<String> {
        let t = |t: Option<i64>| {
            t.map(meshsign_evidence::attest::rfc3339)
                .unwrap_or_else(|| "-".into())
        };
        vec![
            self.id.clone(),
            dash(&self.job_id),
            dash(&self.pipeline_id),
            dash(&self.runner_fingerprint),
            dash(&self.region),
            dash(&self.key_id),
            t(self.not_before),
            t(self.not_after),
            dash(&self.reason),
            self.added_by.clone(),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

fn drill_source(environment: &str, from_ci: bool) -> Result<TokenSource, ClientError> {
    if from_ci {
        Ok(TokenSource::GithubActions)
    } else {
        meshsign_client::session::token::drill_source(environment)
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

const REVOKE_HEADER: &[&str] = &["RULE", "MATCHED", "SERIALS"];

fn revoke_row(r: &v1::RevokeResponse) -> Vec<String> {
    vec![
        r.rule_id.clone(),
        r.serials.len().to_string(),
        if r.serials.is_empty() {
            "-".into()
        } else {
            r.serials.join(",")
        },
    ]
}

fn revoke_json(r: &v1::RevokeResponse) -> serde_json::Value {
    serde_json::json!({ "rule_id": r.rule_id, "serials": r.serials })
}

/// One table (or JSON array) for a fleet command: a SITE and REGION column before the
/// command's own; a site that failed gets one row with its error. Exit non-zero if any did.
fn fleet_report<T>(
    fleet: &Fleet,
    results: Vec<SiteResult<T>>,
    format: Format,
    render: impl Fn(&T) -> (Vec<Vec<String>>, serde_json::Value),
    header: &[&str],
) -> Result<(), ClientError> {
    let region = |name: &str| {
        fleet
            .sites
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.region.clone())
            .unwrap_or_default()
    };
    let mut failed = Vec::new();
    let mut json = Vec::new();
    if format == Format::Table {
        out!("SITE\tREGION\t{}", header.join("\t"));
    }
    for (site, r) in &results {
        let region = region(site);
        match r {
            Ok(v) => {
                let (rows, j) = render(v);
                for row in rows {
                    if format == Format::Table {
                        out!("{site}\t{region}\t{}", row.join("\t"));
                    }
                }
                json.push(serde_json::json!({ "site": site, "region": region, "result": j }));
            }
            Err(e) => {
                if format == Format::Table {
                    out!("{site}\t{region}\tERROR: {e}");
                }
                json.push(
                    serde_json::json!({ "site": site, "region": region, "error": e.to_string() }),
                );
                failed.push(site.clone());
            }
        }
    }
    if format == Format::Json {
        print_json(&serde_json::Value::Array(json));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(fleet_failure(&failed, &results))
    }
}

/// The error a fleet command exits with: the first failure's (so its exit code), naming
/// every failed site.
fn fleet_failure<T>(failed: &[String], results: &[SiteResult<T>]) -> ClientError {
    let first = results.iter().find_map(|(_, r)| r.as_ref().err());
    let names = failed.join(", ");
    match first {
        Some(ClientError::Rpc {
            rpc,
            code,
            message,
            reason,
        }) => ClientError::Rpc {
            rpc,
            code: *code,
            message: format!("{message} (failed at: {names})"),
            reason: reason.clone(),
        },
        Some(ClientError::Connect { endpoint, message }) => ClientError::Connect {
            endpoint: endpoint.clone(),
            message: format!("{message} (failed at: {names})"),
        },
        _ => ClientError::Verify(format!("failed at: {names}")),
    }
}

const DRILL_HEADER: &[&str] = &[
    "POLICY",
    "ISSUER",
    "SIGN REFUSED (ms)",
    "ENROLL REFUSED (ms)",
    "RESTORED",
    "RESULT",
];

/// Prints drill results (one row per site) and fails if any site failed, took longer than
/// `max_ms`, or did not recover.
fn report_drills(
    results: Vec<SiteResult<DrillReport>>,
    format: Format,
    max_ms: u64,
    fleet: bool,
) -> Result<(), ClientError> {
    let bound = std::time::Duration::from_millis(max_ms);
    let mut bad = Vec::new();
    let mut json = Vec::new();
    if format == Format::Table {
        out!(
            "{}{}",
            if fleet { "SITE\t" } else { "REGION\t" },
            DRILL_HEADER.join("\t")
        );
    }
    for (site, r) in &results {
        match r {
            Ok(d) => {
                let ok = d.worst() <= bound && d.restored;
                if !ok {
                    bad.push(site.clone());
                }
                let (sign, enroll) = (
                    d.sign_refused_after.as_secs_f64() * 1000.0,
                    d.enroll_refused_after.as_secs_f64() * 1000.0,
                );
                if format == Format::Table {
                    out!(
                        "{site}\t{}\t{}\t{sign:.1}\t{enroll:.1}\t{}\t{}",
                        d.policy,
                        d.issuer,
                        if d.restored { "yes" } else { "NO" },
                        if ok { "ok" } else { "FAIL" }
                    );
                }
                json.push(serde_json::json!({
                    "site": site, "policy": d.policy, "issuer": d.issuer,
                    "sign_refused_ms": sign, "enroll_refused_ms": enroll,
                    "restored": d.restored, "within_bound": d.worst() <= bound, "ok": ok,
                }));
            }
            Err(e) => {
                bad.push(site.clone());
                if format == Format::Table {
                    out!("{site}\tERROR: {e}");
                }
                json.push(serde_json::json!({ "site": site, "error": e.to_string(), "ok": false }));
            }
        }
    }
    if format == Format::Json {
        print_json(&serde_json::Value::Array(json));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Verify(format!(
            "drill failed at {} (bound {max_ms} ms; a failed site's policy is re-enabled)",
            bad.join(", ")
        )))
    }
}

async fn audit(
    c: &mut Admin,
    command: AdminAuditCommand,
    format: Format,
) -> Result<(), ClientError> {
    use std::io::Write as _;
    match command {
        AdminAuditCommand::PublicKey => {
            let k = c.audit_public_key().await?;
            match format {
                Format::Json => print_json(&serde_json::json!({
                    "key_id": k.key_id,
                    "public_key_pem": pem_encode("PUBLIC KEY", &k.public_key_der),
                })),
                Format::Table => {
                    eprintln!("# audit key {}", k.key_id);
                    out_raw!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
                }
            }
        }
        AdminAuditCommand::Retention { days } => {
            let days = c.set_audit_retention(days).await?;
            match format {
                Format::Json => print_json(&serde_json::json!({ "retention_days": days })),
                Format::Table => out!("RETENTION DAYS\n{days}"),
            }
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
                ..Default::default()
            };
            if let Some(d) = decision {
                req.set_decision(&d);
            }
            // Always JSON lines: the export format is the verifiable one.
            let mut stream = c.export_audit(req).await?;
            crate::WROTE_STDOUT.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut out = std::io::stdout().lock();
            let stdout = |source| ClientError::Io {
                path: "stdout".into(),
                source,
            };
            while let Some(line) = stream
                .message()
                .await
                .map_err(|s| ClientError::rpc("ExportAudit", s))?
            {
                writeln!(out, "{}", line.json).map_err(stdout)?;
                if follow {
                    out.flush().map_err(stdout)?;
                }
            }
        }
    }
    Ok(())
}

async fn runner_cas(
    c: &mut Admin,
    command: IssuerCommand,
    format: Format,
) -> Result<(), ClientError> {
    let out = match command {
        IssuerCommand::List { environment } => {
            emit(format, &c.list_runner_cas(&environment).await?);
            return Ok(());
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
    };
    emit_one(format, &out);
    Ok(())
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

async fn trust(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: TrustCommand,
    format: Format,
) -> Result<(), ClientError> {
    match command {
        TrustCommand::List { environment } => {
            emit(format, &c.trust_policies(&environment).await?);
        }
        TrustCommand::Disable {
            environment,
            issuer,
            keep_sessions,
        } => emit_one(
            format,
            &c.set_trust_policy_enabled(set_policy(environment, issuer, false, keep_sessions))
                .await?,
        ),
        TrustCommand::Enable {
            environment,
            issuer,
        } => emit_one(
            format,
            &c.set_trust_policy_enabled(set_policy(environment, issuer, true, false))
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
            let jwks = std::fs::read(&file).map_err(ClientError::io(&file))?;
            let envs: Vec<String> = match environment {
                Some(e) => vec![e],
                None => cfg.environments.keys().cloned().collect(),
            };
            let mut done = Vec::new();
            for e in envs {
                let req = v1::SetJwksRequest {
                    environment: e,
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
            emit(format, &done);
        }
        TrustCommand::Jwks {
            command:
                JwksCommand::Diff {
                    environment,
                    issuer,
                    file,
                },
        } => {
            let d = jwks_diff(
                &c.trust_policies(&environment).await?,
                &issuer,
                &jwks_kids(&file)?,
            )?;
            if format == Format::Json {
                out!("{}", jwks_diff_json(&d));
            } else {
                out!("{}", JWKS_DIFF_HEADER.join("\t"));
                out!("{}", jwks_diff_row(&d).join("\t"));
            }
        }
    }
    Ok(())
}

async fn keys(c: &mut Admin, command: KeyCommand, format: Format) -> Result<(), ClientError> {
    let out = match command {
        KeyCommand::List { environment } => {
            emit(format, &c.keys(&environment).await?);
            return Ok(());
        }
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
        KeyCommand::Import {
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
        } => {
            let (pem, chain_pem) = match (&file, &p12) {
                (_, Some(p12)) => meshsign_client::site::admin::read_p12(p12, &password_env)?,
                (Some(file), None) => {
                    let pem = zeroize::Zeroizing::new(
                        std::fs::read(file).map_err(ClientError::io(file))?,
                    );
                    let chain_pem = match &chain {
                        Some(p) => std::fs::read(p).map_err(ClientError::io(p))?,
                        None => Vec::new(),
                    };
                    (pem, chain_pem)
                }
                (None, None) => return Err(ClientError::Config("give --file or --p12".into())),
            };
            c.import_key(v1::ImportKeyRequest {
                environment,
                alias,
                pkcs8_pem: pem.to_vec(),
                repositories,
                refs,
                chain_pem,
                purposes,
                backend,
            })
            .await?
        }
        KeyCommand::Csr {
            environment,
            alias,
            common_name,
            email,
            organization,
            country,
        } => {
            let csr = c
                .key_csr(v1::KeyCsrRequest {
                    environment,
                    alias,
                    common_name,
                    email,
                    organization,
                    country,
                })
                .await?;
            match format {
                Format::Json => print_json(&serde_json::json!({
                    "key_id": csr.key_id, "csr_pem": csr.csr_pem,
                })),
                Format::Table => {
                    eprintln!("# CSR for {}", csr.key_id);
                    out_raw!("{}", csr.csr_pem);
                }
            }
            return Ok(());
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
    };
    emit_one(format, &out);
    Ok(())
}
