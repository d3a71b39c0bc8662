//! The Attest use case: an in-toto Statement v1 about the caller's artifacts, whose predicate
//! the site builds from what it verified — the token's claims as the certificate carries them,
//! the certificate itself, the site's region and clock, and the decision's own audit entry —
//! signed by an `attestation` key in a DSSE envelope.
//!
//! Order: caller → rate → key (`authorize`) → purpose `attestation` → subjects → predicate type
//! → allow-list → budget → **audit entry (durable)** → statement naming that entry's seq and
//! time → signature → response. The entry comes before the signature so the statement can name
//! it (DESIGN.md has "sign → audit → respond"; the invariant it keeps — no signature leaves
//! without a durable record — holds either way). If signing then fails, a second entry records
//! that the statement of seq N was not signed.
//!
//! Why an `attestation` key signs nothing else: a key that also signed digests would sign
//! SHA-256 of the PAE of any statement a runner made up, and nobody could tell it from one the
//! site built ([`crate::model::purposes_for`] refuses the mix).

use meshsign_evidence::attest::{
    Envelope, INTOTO_PAYLOAD_TYPE, PREDICATE_SIGNING, PREDICATE_SLSA, STATEMENT_TYPE, SiteFacts,
    Statement, Subject,
};

use super::{SignError, checks};
use crate::audit::AuditRecord;
use crate::identity::Caller;
use crate::model::{Purpose, Reason, bounded};
use crate::state::SiteState;

/// Most subjects in one statement.
pub const MAX_SUBJECTS: usize = 64;

/// An Attest request in typed form.
#[derive(Clone, Debug)]
pub struct AttestInput {
    /// Key alias (an `attestation` key).
    pub alias: String,
    /// (name, SHA-256) of each artifact.
    pub subjects: Vec<(String, Vec<u8>)>,
    /// Predicate type URI (empty: the signing predicate).
    pub predicate_type: String,
    /// Peer address.
    pub peer: String,
}

/// A signed statement.
#[derive(Clone, Debug)]
pub struct AttestOutput {
    /// The DSSE envelope, JSON.
    pub envelope_json: Vec<u8>,
    /// `alias@vN`.
    pub key_id: String,
    /// Algorithm name.
    pub algorithm: &'static str,
    /// SPKI DER.
    pub public_key_der: Vec<u8>,
    /// The decision's audit entry.
    pub audit_id: String,
    /// Its seq.
    pub audit_seq: u64,
    /// Its hash.
    pub audit_hash: String,
    /// Its stored bytes (the receipt's leaf), for the caller alone.
    pub audit_entry: Vec<u8>,
    /// The envelope's entry in the transparency log (`dsse` 0.0.1) with its SET.
    pub transparency: meshsign_evidence::rekor::LogEntry,
}

/// Checks, audits, builds and signs; see the module docs for the order.
pub async fn attest(
    site: &SiteState,
    caller: &Caller,
    input: AttestInput,
) -> Result<AttestOutput, SignError> {
    let now = site.clock.unix();
    let mut rec = caller.audit_record("Attest", now, &input.peer);
    super::within_rate(site, caller, &rec, &input.alias, now)?;
    let mut budgeted = false;
    let checked = check(site, caller, &input, &mut rec, &mut budgeted);
    let (written, entry) =
        super::record_decision(site, rec, &checked, budgeted, "attest refused").await?;
    let (key, predicate_type, subjects) = checked?;
    let statement = statement(site, caller, &key, &predicate_type, subjects, &written);
    // Serializing a statement of strings and numbers cannot fail.
    let payload = serde_json::to_vec(&statement).unwrap_or_default();
    let pae = meshsign_evidence::attest::pae(INTOTO_PAYLOAD_TYPE, &payload);
    let signed = key.backend.sign_message(&pae);
    let sig = match signed {
        Ok(sig) => sig,
        Err(e) => {
            let what = ("Attest", "attest refused", input.peer.as_str());
            return Err(super::record_unsigned(
                site,
                caller,
                what,
                &written,
                SignError::Custody(e),
            )
            .await);
        }
    };
    let algorithm = key.backend.algorithm().as_str();
    let spki = &key.record.public_key_der;
    let keyid = meshsign_evidence::attest::sslib_keyid(algorithm, spki)
        .unwrap_or_else(|| key.record.key_id());
    let envelope = Envelope::new(INTOTO_PAYLOAD_TYPE, &payload, &keyid, &sig);
    let envelope_json = serde_json::to_vec(&envelope).unwrap_or_default();
    // The statement is signed after its own entry (it names it): a second entry names the
    // envelope's transparency leaf, and the SET follows it.
    let body = meshsign_evidence::rekor::dsse(&envelope_json, &payload, &sig, spki);
    let mut logged = caller.audit_record("Attest", now, &input.peer);
    logged.key_id = written.key_id.clone();
    logged.decision = "allow".into();
    logged.reason = crate::model::Reason::Ok.as_str().into();
    logged.detail = format!(
        "the statement of audit entry {} in the transparency log",
        written.seq
    );
    logged.tlog = Some(meshsign_evidence::audit::TlogLeaves::new(
        0,
        &[meshsign_evidence::merkle::leaf_hash(&body)],
    ));
    let logged = site
        .audit
        .record_sign(logged)
        .await
        .map_err(SignError::Audit)?;
    let transparency = site
        .audit
        .key()
        .entries(&logged, vec![body], true)
        .map_err(SignError::Audit)?
        .pop()
        .unwrap_or_default();
    Ok(AttestOutput {
        transparency,
        envelope_json,
        key_id: key.record.key_id(),
        algorithm: key.backend.algorithm().as_str(),
        public_key_der: key.record.public_key_der.clone(),
        audit_id: written.audit_id(),
        audit_seq: written.seq,
        audit_entry: entry,
        audit_hash: written.hash,
    })
}

type Checked = (crate::custody::LoadedKey, String, Vec<(String, [u8; 32])>);

fn check(
    site: &SiteState,
    caller: &Caller,
    input: &AttestInput,
    rec: &mut AuditRecord,
    budgeted: &mut bool,
) -> Result<Checked, SignError> {
    rec.key_id = bounded(&input.alias, 64);
    let authorized = checks::authorize(site, caller, &input.alias)?;
    let key = authorized.key.clone();
    rec.key_id = key.record.key_id();
    let spec = authorized.spec(&input.alias);
    checks::purpose_is(spec, &input.alias, Purpose::Attestation)?;
    if input.subjects.is_empty() || input.subjects.len() > MAX_SUBJECTS {
        return Err(SignError::input(
            Reason::Subjects,
            format!(
                "{} subjects; a statement has 1 to {MAX_SUBJECTS}",
                input.subjects.len()
            ),
        ));
    }
    let mut subjects = Vec::with_capacity(input.subjects.len());
    for (name, d) in &input.subjects {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(SignError::input(
                Reason::Subjects,
                format!(
                    "subject name `{}`: 1 to 256 bytes, no control characters",
                    bounded(name, 64)
                ),
            ));
        }
        subjects.push((name.clone(), checks::digest_len(d)?));
    }
    let digests: Vec<[u8; 32]> = subjects.iter().map(|(_, d)| *d).collect();
    rec.items = u32::try_from(digests.len()).unwrap_or(u32::MAX);
    rec.digest = match digests.as_slice() {
        [one] => hex::encode(one),
        many => hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &many.concat(),
        )),
    };
    rec.artifact = bounded(&subjects[0].0, 256);
    let predicate_type = predicate_type(caller, &input.predicate_type)?;
    rec.detail = format!("predicate {predicate_type}");
    checks::digest_allow_list(spec, &input.alias, &digests)?;
    *budgeted = spec.is_some_and(|s| s.budget.is_limited());
    checks::budget(site, &authorized.record, spec, &input.alias, digests.len())?;
    Ok((key, predicate_type, subjects))
}

/// `predicate_type`: one the site builds, and — for SLSA provenance — a job whose provider
/// named the workflow and the commit (GitHub, GitLab).
fn predicate_type(caller: &Caller, requested: &str) -> Result<String, SignError> {
    match requested {
        "" | PREDICATE_SIGNING => Ok(PREDICATE_SIGNING.into()),
        PREDICATE_SLSA => {
            let c = &caller.claims;
            if c.workflow.is_empty() || c.commit.is_empty() || c.repository.is_empty() {
                return Err(SignError::input(
                    Reason::PredicateType,
                    format!(
                        "SLSA provenance needs the job's repository, workflow and commit; the \
                         `{}` token of this job did not give them all (GitHub and GitLab do)",
                        bounded(&c.provider, 32)
                    ),
                ));
            }
            Ok(PREDICATE_SLSA.into())
        }
        other => Err(SignError::input(
            Reason::PredicateType,
            format!(
                "`{}` is not a predicate the site builds ({PREDICATE_SIGNING}, {PREDICATE_SLSA})",
                bounded(other, 128)
            ),
        )),
    }
}

/// The statement, from verified facts only.
fn statement(
    site: &SiteState,
    caller: &Caller,
    key: &crate::custody::LoadedKey,
    predicate_type: &str,
    subjects: Vec<(String, [u8; 32])>,
    written: &AuditRecord,
) -> Statement {
    let c = &caller.claims;
    let facts = SiteFacts {
        region: written.site_region.clone(),
        environment: caller.id.environment.clone(),
        key_id: key.record.key_id(),
        audit_seq: written.seq,
        audit_id: written.audit_id(),
        signed_at: written.ts.clone(),
        provider: c.provider.clone(),
        issuer: c.iss.clone(),
        token_subject: c.sub.clone(),
        repository: c.repository.clone(),
        git_ref: c.git_ref.clone(),
        workflow: c.workflow.clone(),
        commit: c.commit.clone(),
        job_id: c.job_id.clone(),
        pipeline: c.pipeline.clone(),
        run_attempt: c.run_attempt.clone(),
        trust_policy: c.trust_policy.clone(),
        runner_fingerprint: caller.id.fingerprint.clone(),
        runner_proof: if c.fingerprint_proven() {
            c.runner_proof.clone()
        } else {
            "claimed".into()
        },
        certificate_serial: caller.serial_hex.clone(),
    };
    let facts_json = serde_json::to_value(&facts).unwrap_or_default();
    let predicate = if predicate_type == PREDICATE_SLSA {
        slsa(site, &facts, facts_json)
    } else {
        facts_json
    };
    Statement {
        type_: STATEMENT_TYPE.into(),
        subject: subjects
            .into_iter()
            .map(|(name, d)| Subject {
                name,
                digest: [("sha256".to_string(), hex::encode(d))].into(),
            })
            .collect(),
        predicate_type: predicate_type.into(),
        predicate,
    }
}

/// SLSA provenance v1: the build is the CI job the token names; the builder is this site's
/// view of it (the site did not run the build: it attests what the CI's token said about it,
/// which the CI signed).
fn slsa(site: &SiteState, f: &SiteFacts, facts: serde_json::Value) -> serde_json::Value {
    let host = match f.provider.as_str() {
        "github" => "https://github.com".to_string(),
        _ => f
            .workflow
            .split_once('/')
            .map(|(h, _)| format!("https://{h}"))
            .unwrap_or_default(),
    };
    let trust_domain = site.config().trust_domain.clone();
    serde_json::json!({
        "buildDefinition": {
            "buildType": format!("https://meshsign.dev/buildtypes/{}/v1", f.provider),
            "externalParameters": {
                "repository": f.repository,
                "ref": f.git_ref,
                "workflow": f.workflow,
            },
            "internalParameters": { "meshsign": facts },
            "resolvedDependencies": [{
                "uri": format!("git+{host}/{}@{}", f.repository, f.git_ref),
                "digest": { "gitCommit": f.commit },
            }],
        },
        "runDetails": {
            "builder": {
                "id": format!("https://{trust_domain}/sites/{}/{}", f.region, f.environment),
            },
            "metadata": {
                "invocationId": format!("{}/{}", f.pipeline, f.job_id),
                "finishedOn": f.signed_at,
            },
        },
    })
}
