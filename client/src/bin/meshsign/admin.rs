//! `meshsign admin …`: ops verbs on the admin port, one function per command group, over the
//! library's typed [`Admin`] client (which names the RPC in every error).

use std::path::PathBuf;

use clap::Subcommand;
use meshsign_client::admin::{Admin, parse_time};
use meshsign_client::token::TokenSource;
use meshsign_client::{ClientConfig, ClientError};
use meshsign_proto::pem_encode;
use meshsign_proto::v1;

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
    /// Revoke certificates by serial, job or runner fingerprint (effective on the next RPC).
    Revoke {
        /// Certificate serial (hex).
        #[arg(long, group = "target", required = true)]
        serial: Option<String>,
        /// Every certificate of a CI job.
        #[arg(long, group = "target")]
        job_id: Option<String>,
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
    Status {
        /// `table` (default) or `json` (one object, for scripts and fleet tooling).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// A job's signatures per key and per certificate, against each key's budget.
    Usage {
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
    /// Disable a trust policy, prove refusal, re-enable; exit 1 if refusal took over 1 s.
    Drill {
        /// Environment.
        #[arg(long)]
        environment: String,
        /// Issuer URL of the policy (default: a random enabled one).
        #[arg(long)]
        issuer: Option<String>,
        /// Mint the drill's tokens from the CI (github-actions); default: the dev issuer.
        #[arg(long, value_parser = ["github-actions"])]
        token_source: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum IssuerCommand {
    /// List runner CAs.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Make a new runner CA that the sign port trusts but that does not issue yet.
    Stage {
        #[arg(long)]
        environment: String,
    },
    /// Make the staged CA (or --id) the one that issues; the previous one retires by itself.
    Activate {
        #[arg(long)]
        environment: String,
        #[arg(long, default_value = "")]
        id: String,
    },
    /// Stop trusting a staged or retiring CA now.
    Retire {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        id: String,
    },
    /// Distrust a CA at once (revoking the active one activates a fresh one).
    Revoke {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum TrustCommand {
    /// List trust policies.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Refuse new enrollments (and, unless --keep-sessions, sign calls) from a policy.
    Disable {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        issuer: String,
        /// Let certificates it already minted keep signing.
        #[arg(long)]
        keep_sessions: bool,
    },
    /// Re-enable a policy.
    Enable {
        #[arg(long)]
        environment: String,
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
        #[arg(long)]
        environment: Option<String>,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// List keys and their versions.
    List {
        #[arg(long)]
        environment: String,
    },
    /// Create a key alias (v1).
    Create {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long, default_value = "ecdsa-p256-sha256")]
        algorithm: String,
        /// Repository pattern that may use it (repeat; "*" for any).
        #[arg(long = "repository", required = true)]
        repositories: Vec<String>,
        /// Ref pattern that may use it (repeat; "*" for any).
        #[arg(long = "ref", required = true)]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms. Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
    /// Add alias@vN+1, which signs from then on.
    Rotate {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
    },
    /// Stop signing with an alias (its versions stay verifiable).
    Disable {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
    },
    /// Import a PKCS#8 PEM private key (one-way).
    Import {
        #[arg(long)]
        environment: String,
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
        #[arg(long = "repository")]
        repositories: Vec<String>,
        #[arg(long = "ref")]
        refs: Vec<String>,
        /// What it may sign (repeat): digest, message, apple-cms. Default: digest, message.
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
    /// Print a CSR signed by the key (for Apple or another CA); the key stays in the site.
    Csr {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long)]
        common_name: String,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, default_value = "")]
        organization: String,
        #[arg(long, default_value = "")]
        country: String,
    },
    /// Attach the certificate chain the CA returned (PEM, leaf first) to the key.
    SetCertificate {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        alias: String,
        #[arg(long)]
        file: PathBuf,
    },
}

/// Runs an admin command.
pub async fn dispatch(cfg: &ClientConfig, command: AdminCommand) -> Result<(), ClientError> {
    match command {
        AdminCommand::Drill {
            environment,
            issuer,
            token_source,
        } => drill(cfg, &environment, issuer.as_deref(), token_source.is_some()).await,
        command => {
            let mut c = Admin::connect(cfg).await?;
            match command {
                AdminCommand::Audit { command } => audit(&mut c, command).await,
                AdminCommand::Issuer { command } => runner_cas(&mut c, command).await,
                AdminCommand::Revoke {
                    serial,
                    job_id,
                    fingerprint,
                    region,
                    since,
                    until,
                    reason,
                } => {
                    use v1::revoke_request::Target;
                    let target = match (serial, job_id, fingerprint) {
                        (Some(s), _, _) => Target::Serial(s),
                        (_, Some(j), _) => Target::JobId(j),
                        (_, _, Some(f)) => Target::Fingerprint(f),
                        _ => {
                            return Err(ClientError::Config(
                                "give --serial, --job-id or --fingerprint".into(),
                            ));
                        }
                    };
                    let req = v1::RevokeRequest {
                        target: Some(target),
                        region: region.unwrap_or_default(),
                        since: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                        until: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                        reason,
                    };
                    let r = c.revoke(req).await?;
                    println!(
                        "revocation {} matched {} issued certificate(s)",
                        r.rule_id,
                        r.serials.len()
                    );
                    for s in r.serials {
                        println!("  {s}");
                    }
                    Ok(())
                }
                AdminCommand::Revocations => {
                    for r in c.revocations().await? {
                        println!(
                            "{}\t{}={}\tregion={}\tby {}\t{}",
                            r.id, r.kind, r.value, r.region, r.operator, r.reason
                        );
                    }
                    Ok(())
                }
                AdminCommand::Status { output } => {
                    let st = c.status().await?;
                    if output == "json" {
                        println!("{}", status_json(&st));
                    } else {
                        print_status(&st);
                    }
                    Ok(())
                }
                AdminCommand::Usage {
                    environment,
                    job_id,
                } => {
                    let u = c.job_usage(&environment, &job_id).await?;
                    let limit =
                        |b: Option<u64>| b.map_or("unlimited".to_string(), |b| b.to_string());
                    println!(
                        "KEY\tSIGNATURES\tJOB BUDGET\tCERTIFICATE\tSIGNATURES\tCERTIFICATE BUDGET"
                    );
                    for k in u.keys {
                        println!(
                            "{}\t{}\t{}\t-\t-\t{}",
                            k.key_alias,
                            k.total,
                            limit(k.per_job_budget),
                            limit(k.per_certificate_budget)
                        );
                        for (serial, n) in k.by_certificate {
                            println!("{}\t-\t-\t{serial}\t{n}\t-", k.key_alias);
                        }
                    }
                    Ok(())
                }
                AdminCommand::Snapshot { out } => {
                    let bytes = c.snapshot().await?;
                    meshsign_proto::files::write_atomic(&out, &bytes, true)
                        .map_err(ClientError::io(&out))?;
                    eprintln!("snapshot: {} bytes -> {}", bytes.len(), out.display());
                    Ok(())
                }
                AdminCommand::Trust { command } => trust(cfg, &mut c, command).await,
                AdminCommand::Key { command } => keys(&mut c, command).await,
                AdminCommand::Drill { .. } => Ok(()),
            }
        }
    }
}

async fn audit(c: &mut Admin, command: AdminAuditCommand) -> Result<(), ClientError> {
    use std::io::Write as _;
    match command {
        AdminAuditCommand::PublicKey => {
            let k = c.audit_public_key().await?;
            eprintln!("# audit key {}", k.key_id);
            print!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
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
            let req = v1::ExportAuditRequest {
                since_seq,
                since_time,
                follow,
                environment: environment.unwrap_or_default(),
                job_id: job_id.unwrap_or_default(),
                decision: decision.unwrap_or_default(),
            };
            let mut stream = c.export_audit(req).await?;
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

async fn runner_cas(c: &mut Admin, command: IssuerCommand) -> Result<(), ClientError> {
    let out = match command {
        IssuerCommand::List { environment } => {
            c.list_runner_cas(&environment)
                .await?
                .iter()
                .for_each(print_runner_ca);
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
    print_runner_ca(&out);
    Ok(())
}

async fn trust(
    cfg: &ClientConfig,
    c: &mut Admin,
    command: TrustCommand,
) -> Result<(), ClientError> {
    let set = |environment, issuer, enabled, keep_sessions| v1::SetTrustPolicyEnabledRequest {
        environment,
        issuer,
        enabled,
        keep_sessions,
    };
    match command {
        TrustCommand::List { environment } => {
            c.trust_policies(&environment)
                .await?
                .iter()
                .for_each(print_policy);
        }
        TrustCommand::Disable {
            environment,
            issuer,
            keep_sessions,
        } => print_policy(
            &c.set_trust_policy_enabled(set(environment, issuer, false, keep_sessions))
                .await?,
        ),
        TrustCommand::Enable {
            environment,
            issuer,
        } => print_policy(
            &c.set_trust_policy_enabled(set(environment, issuer, true, false))
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
            let mut done = 0;
            for e in envs {
                let req = v1::SetJwksRequest {
                    environment: e,
                    issuer: issuer.clone(),
                    jwks_json: jwks.clone(),
                };
                match c.set_jwks(req).await {
                    Ok(p) => {
                        print_policy(&p);
                        done += 1;
                    }
                    Err(ClientError::Rpc {
                        code: tonic::Code::NotFound,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
            }
            if done == 0 {
                return Err(ClientError::Config(format!(
                    "no environment trusts issuer `{issuer}`"
                )));
            }
        }
    }
    Ok(())
}

async fn keys(c: &mut Admin, command: KeyCommand) -> Result<(), ClientError> {
    let out = match command {
        KeyCommand::List { environment } => {
            c.keys(&environment).await?.iter().for_each(print_key);
            return Ok(());
        }
        KeyCommand::Create {
            environment,
            alias,
            algorithm,
            repositories,
            refs,
            purposes,
        } => {
            c.create_key(v1::CreateKeyRequest {
                environment,
                alias,
                algorithm,
                repositories,
                refs,
                purposes,
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
        } => {
            let (pem, chain_pem) = match (&file, &p12) {
                (_, Some(p12)) => meshsign_client::admin::read_p12(p12, &password_env)?,
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
            eprintln!("# CSR for {}", csr.key_id);
            print!("{}", csr.csr_pem);
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
    print_key(&out);
    Ok(())
}

async fn drill(
    cfg: &ClientConfig,
    environment: &str,
    issuer: Option<&str>,
    from_ci: bool,
) -> Result<(), ClientError> {
    let source = if from_ci {
        TokenSource::GithubActions
    } else {
        super::dev::default_token_source(environment)?
    };
    let r = meshsign_client::drill::exercise(cfg, environment, issuer, &source).await?;
    println!(
        "drill {environment}: policy {} ({}) — sign refused after {:.1} ms on an open connection, \
         enrollment refused after {:.1} ms; re-enabled, enrollment {}",
        r.policy,
        r.issuer,
        r.sign_refused_after.as_secs_f64() * 1000.0,
        r.enroll_refused_after.as_secs_f64() * 1000.0,
        if r.restored {
            "works again"
        } else {
            "DID NOT recover"
        }
    );
    if r.worst() > std::time::Duration::from_secs(1) || !r.restored {
        return Err(ClientError::Verify(format!(
            "drill failed: refusal took {:?} (limit 1 s)",
            r.worst()
        )));
    }
    Ok(())
}

fn when(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn print_runner_ca(i: &v1::IssuerInfo) {
    let extra = match &i.retire_after {
        Some(_) => format!(" retire_after={}", when(i.retire_after)),
        None => String::new(),
    };
    println!(
        "{}\t{}\t{}\tcreated={}{extra}",
        i.environment,
        i.id,
        i.state,
        when(i.created_at)
    );
}

fn print_policy(p: &v1::TrustPolicyInfo) {
    let state = if p.enabled {
        "enabled"
    } else if p.keep_sessions {
        "disabled (sessions kept)"
    } else {
        "disabled"
    };
    println!(
        "{}\t{}\t{}\t{state}\tkids={}",
        p.environment,
        p.name,
        p.issuer,
        p.kids.join(",")
    );
}

fn print_key(k: &v1::KeyInfo) {
    let versions: Vec<String> = k
        .versions
        .iter()
        .map(|v| format!("{}{}", v.key_id, if v.active { "*" } else { "" }))
        .collect();
    println!(
        "{}\t{}\t{}\t{}\t{}\trepos={} refs={}",
        k.environment,
        k.alias,
        k.algorithm,
        if k.disabled { "disabled" } else { "enabled" },
        versions.join(","),
        k.repositories.join(","),
        k.refs.join(",")
    );
}

fn status_json(st: &v1::SiteStatus) -> serde_json::Value {
    serde_json::json!({
        "region": st.region,
        "store_engine": st.store_engine,
        "writable": st.writable,
        "audit_head_seq": st.audit_head_seq,
        "last_checkpoint_age_seconds": st.last_checkpoint_age_seconds,
        "revocation_rules": st.revocation_rules,
        "environments": st.environments.iter().map(|e| serde_json::json!({
            "name": e.name,
            "audience": e.audience,
            "runner_cas": e.runner_cas.iter().map(|c| serde_json::json!({
                "id": c.id, "state": c.state,
            })).collect::<Vec<_>>(),
            "keys": e.keys.iter().map(|k| serde_json::json!({
                "alias": k.alias, "algorithm": k.algorithm, "newest_version": k.newest_version,
                "newest_age_days": k.newest_age_days, "disabled": k.disabled,
            })).collect::<Vec<_>>(),
            "trust_policies": e.trust_policies.iter().map(|t| serde_json::json!({
                "name": t.name, "issuer": t.issuer, "enabled": t.enabled,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_status(st: &v1::SiteStatus) {
    println!(
        "site {}  store {}  {}  audit head {}  last checkpoint {}  revocation rules {}",
        st.region,
        st.store_engine,
        if st.writable {
            "WRITABLE"
        } else {
            "NOT WRITABLE (decisions refused)"
        },
        st.audit_head_seq,
        if st.last_checkpoint_age_seconds < 0 {
            "none yet".to_string()
        } else {
            format!("{} s ago", st.last_checkpoint_age_seconds)
        },
        st.revocation_rules
    );
    println!("ENVIRONMENT\tKIND\tNAME\tSTATE\tDETAIL");
    for e in &st.environments {
        for c in &e.runner_cas {
            println!("{}\trunner-ca\t{}\t{}\t-", e.name, c.id, c.state);
        }
        for k in &e.keys {
            println!(
                "{}\tkey\t{}@v{}\t{}\t{} days old, {}",
                e.name,
                k.alias,
                k.newest_version,
                if k.disabled { "disabled" } else { "active" },
                k.newest_age_days.floor(),
                k.algorithm
            );
        }
        for t in &e.trust_policies {
            println!(
                "{}\ttrust-policy\t{}\t{}\t{}",
                e.name,
                t.name,
                if t.enabled { "enabled" } else { "disabled" },
                t.issuer
            );
        }
    }
}
