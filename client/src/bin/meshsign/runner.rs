//! The runner's verbs — `sign`, `attest`, `codesign`, `verify`, `exec`, `agent` — each handed
//! to its use case in [`meshsign_client::usecase`] (whose options are the verbs' arguments)
//! and rendered here.

use meshsign_client::session::job::JobOptions;
use meshsign_client::usecase::sign::{SigFormat, SignOptions};
use meshsign_client::usecase::{self, agent, attest, sign, verify};
use meshsign_client::{ClientConfig, ClientError};

use super::render::{self, Format};

/// `meshsign sign` (`--format dsse`: `meshsign attest` with the `signing` predicate).
pub async fn sign(
    cfg: &ClientConfig,
    args: SignOptions,
    format: Format,
) -> Result<(), ClientError> {
    if args.format == SigFormat::Dsse {
        return attest(cfg, attest::AttestOptions::from_sign(args)?, format).await;
    }
    sign::sign(cfg, &args, |s| render::signed(s, format)).await
}

/// `meshsign receipt fetch`.
pub async fn fetch_proofs(
    cfg: &ClientConfig,
    files: &[std::path::PathBuf],
    format: Format,
) -> Result<(), ClientError> {
    render::emit(format, &sign::fetch_proofs(cfg, files).await?);
    Ok(())
}

/// `meshsign audit verify`.
pub fn audit_verify(
    args: &meshsign_client::usecase::verify::AuditVerifyArgs,
    format: Format,
) -> Result<(), ClientError> {
    let report = meshsign_client::usecase::verify::audit_export(args)?;
    render::audit_verified(&args.file, &report, format);
    Ok(())
}

/// `meshsign audit consistency`.
pub async fn consistency(
    cfg: &ClientConfig,
    args: meshsign_client::usecase::verify::ConsistencyArgs,
    format: Format,
) -> Result<(), ClientError> {
    let c = meshsign_client::usecase::verify::consistency(cfg, &args).await?;
    render::print_json_or(
        format,
        serde_json::json!({"origin": c.origin, "old_size": c.old_size, "new_size": c.new_size, "consistent": true}),
        || {
            format!(
                "{}: consistent — {} entries extended to {}",
                c.origin, c.old_size, c.new_size
            )
        },
    );
    Ok(())
}

/// `meshsign attest`.
pub async fn attest(
    cfg: &ClientConfig,
    args: attest::AttestOptions,
    format: Format,
) -> Result<(), ClientError> {
    render::attested(&attest::attest(cfg, &args).await?, format);
    Ok(())
}

/// `meshsign codesign`.
#[cfg(feature = "codesign")]
pub async fn codesign(
    cfg: &ClientConfig,
    args: meshsign_client::usecase::codesign::CodesignArgs,
    format: Format,
) -> Result<(), ClientError> {
    meshsign_client::usecase::codesign::run(cfg, &args.job, args.options()).await?;
    let signed = args.output.as_ref().unwrap_or(&args.input).display();
    render::codesigned(
        &signed.to_string(),
        &args.key,
        &args.job.environment,
        format,
    );
    Ok(())
}

/// `meshsign verify`: offline; exit 1 when anything does not verify.
pub fn verify(args: verify::VerifyOptions, format: Format) -> Result<(), ClientError> {
    render::verified(&args.file, &verify::verify(&args)?, format);
    Ok(())
}

/// `meshsign agent serve`: its variables, or its error, go to stdout (`agent start` reads
/// them; the agent's stderr goes nowhere once it runs alone).
pub async fn agent_serve(cfg: &ClientConfig, args: JobOptions) -> Result<(), ClientError> {
    let result = agent::serve(cfg, &args, |vars| {
        for (k, v) in vars {
            out!("{k}={v}");
        }
        Ok(())
    })
    .await;
    if let Err(e) = &result {
        out!("error: {e}");
    }
    result
}

/// `meshsign agent start`: prints the agent's variables once it serves.
pub async fn agent_start() -> Result<(), ClientError> {
    agent::start_background(|l| out!("{l}")).await
}

/// `meshsign agent stop`.
pub async fn agent_stop() -> Result<(), ClientError> {
    let serial = agent::stop().await?;
    eprintln!("agent stopped; certificate {serial} revoked");
    Ok(())
}

/// `meshsign fingerprint`: the device key's, else the machine's (claimed).
pub fn fingerprint(config: Option<&std::path::Path>, format: Format) -> Result<(), ClientError> {
    let (fp, source) = usecase::device::fingerprint(config)?;
    let json = serde_json::json!({ "fingerprint": fp, "source": source });
    render::print_json_or(format, json, || {
        eprintln!("source: {source}");
        fp.clone()
    });
    Ok(())
}

/// `meshsign asc-token`: the token alone on stdout, as `--format` asks.
pub async fn asc_token(
    cfg: &ClientConfig,
    o: &usecase::asc::AscTokenOptions,
) -> Result<(), ClientError> {
    out!("{}", usecase::asc::asc_token(cfg, o).await?);
    Ok(())
}

/// `meshsign notarize`: the submission, and with `--wait` the verdict and the log's issues;
/// exit 1 unless Apple accepted it.
pub async fn notarize(
    cfg: &ClientConfig,
    o: &usecase::notarize::NotarizeOptions,
    format: Format,
) -> Result<(), ClientError> {
    let n = usecase::notarize::notarize(cfg, o).await?;
    let json = serde_json::to_value(&n).unwrap_or_default();
    render::print_json_or(format, json, || {
        let mut t = format!("{}\t{}", n.id, n.status);
        for i in &n.issues {
            t.push_str(&format!("\n{i}"));
        }
        t
    });
    match (o.wait, n.status.as_str()) {
        (false, _) | (true, "Accepted") => Ok(()),
        (true, s) => Err(ClientError::Verify(format!("Apple's notary service: {s}"))),
    }
}
