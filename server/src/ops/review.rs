//! Two-person review of dangerous admin operations (`[review]` in the site config).
//!
//! The flow is the one Vault's control groups use — *propose, approve, carry out* — so that the
//! request is never stored:
//!
//! 1. An admin calls a covered operation. Nothing changes: the call is refused with
//!    `review_required` and a proposal is recorded — the operation, environment, a description
//!    without secrets, the SHA-256 of the exact request, the proposer, and when it expires.
//! 2. A *different* admin approves it (`Admin.ApproveProposal`) before it expires. The proposer
//!    approving their own proposal is refused (`review_self_approval`).
//! 3. The same call — same operation, same request bytes — made again by any admin except the
//!    approver, before expiry, is carried out once; the proposal is then used up. (The proposer
//!    normally repeats their command.) A changed request does not match and starts a new
//!    proposal.
//!
//! Every step is audited (the refusal with `review_required`, the approval, the change with
//! "approved by … under proposal …"). Proposals live in the store, so every replica of a site
//! sees them. Approving and using an approval are conditional updates of the stored proposal
//! (compare-and-swap on its bytes), so one approval is used once across every replica — the
//! ops lock is per process and guards nothing between replicas.
//!
//! Owns: proposals. Must not touch: what the reviewed operations do.

use serde::{Deserialize, Serialize};

use super::OpsError;
use crate::identity::Operator;
use crate::model::bounded;
use crate::state::SiteState;
use crate::state::records::Meta;

/// Key prefix of proposals in the `meta` tree.
/// Proposals kept after they expired or were used, for `admin review list`.
const KEEP_SECONDS: i64 = 7 * 86_400;

/// One proposed change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proposal {
    /// `p-` and 16 hex digits.
    pub id: String,
    /// The operation (audit name, e.g. `DisableKey`).
    pub operation: String,
    /// Its environment (empty: the site).
    pub environment: String,
    /// What it does, without secrets.
    pub summary: String,
    /// SHA-256 (hex) of the operation name and the exact request.
    pub request_sha256: String,
    /// Who proposed it.
    pub proposer: String,
    /// When (unix seconds).
    pub created_at: i64,
    /// Approval and execution must happen before this.
    pub expires_at: i64,
    /// Who approved it.
    pub approver: Option<String>,
    /// When.
    pub approved_at: Option<i64>,
    /// Who carried it out.
    pub executed_by: Option<String>,
    /// When.
    pub executed_at: Option<i64>,
}

/// Where a proposal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposalState {
    /// Waiting for a second admin.
    Pending,
    /// Approved; the change may be carried out.
    Approved,
    /// Carried out.
    Executed,
    /// Not approved or not carried out in time.
    Expired,
}

impl ProposalState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalState::Pending => "pending",
            ProposalState::Approved => "approved",
            ProposalState::Executed => "executed",
            ProposalState::Expired => "expired",
        }
    }
}

impl Proposal {
    /// Its state at `now`.
    pub fn state(&self, now: i64) -> ProposalState {
        if self.executed_at.is_some() {
            ProposalState::Executed
        } else if now >= self.expires_at {
            ProposalState::Expired
        } else if self.approver.is_some() {
            ProposalState::Approved
        } else {
            ProposalState::Pending
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} in {}: {}",
            self.operation,
            if self.environment.is_empty() {
                "(site)"
            } else {
                &self.environment
            },
            self.summary
        )
    }
}

/// The SHA-256 a proposal binds: operation name, a zero byte, the request's protobuf encoding.
pub fn request_digest(operation: &str, request: &[u8]) -> String {
    use aws_lc_rs::digest::{Context, SHA256};
    let mut h = Context::new(&SHA256);
    h.update(b"meshsign-review-v1\0");
    h.update(operation.as_bytes());
    h.update(&[0]);
    h.update(request);
    hex::encode(h.finish())
}

fn save(site: &SiteState, p: &Proposal) -> Result<(), OpsError> {
    Ok(site.put_meta(Meta::Proposal, &p.id, p)?)
}

/// Every proposal, newest first.
pub fn list(site: &SiteState) -> Result<Vec<Proposal>, OpsError> {
    let mut all: Vec<Proposal> = site.metas(Meta::Proposal)?;
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(all)
}

/// The review gate, called under the ops lock before a change. `Ok(None)`: the operation is
/// not covered. `Ok(Some(p))`: `p` was approved by someone other than `op` and is now used up —
/// go ahead. `Err(ReviewRequired)`: nothing may change; a proposal was made (or is still
/// waiting).
pub fn gate(
    site: &SiteState,
    op: &Operator,
    operation: &str,
    environment: &str,
    request_sha256: &str,
    summary: &str,
) -> Result<Option<Proposal>, OpsError> {
    let cfg = site.config();
    if !cfg.review.covers(operation) {
        return Ok(None);
    }
    let now = site.clock.unix();
    let open = list(site)?.into_iter().find(|p| {
        p.operation == operation
            && p.request_sha256 == request_sha256
            && matches!(
                p.state(now),
                ProposalState::Pending | ProposalState::Approved
            )
    });
    match open {
        Some(mut p) => match &p.approver {
            Some(approver) if *approver == op.id => Err(OpsError::ReviewRequired(format!(
                "proposal {} was approved by `{approver}`, who may not also carry it out: \
                 another admin repeats the call",
                p.id
            ))),
            Some(approver) => {
                let approver = approver.clone();
                // Used up by a conditional update of the bytes read here: of two calls at two
                // replicas (or two tasks), exactly one sees its update land.
                let Some((stored, raw)) = site.meta_raw::<Proposal>(Meta::Proposal, &p.id)? else {
                    return Err(OpsError::ReviewRequired(format!(
                        "proposal {} is gone; the change must be proposed again",
                        p.id
                    )));
                };
                if stored.state(now) != ProposalState::Approved
                    || stored.approver.as_deref() != Some(approver.as_str())
                {
                    return Err(used_up(&stored));
                }
                p = stored;
                p.executed_by = Some(op.id.clone());
                p.executed_at = Some(now);
                if !site.update_meta(Meta::Proposal, &p.id, &raw, &p)? {
                    let now_stored: Option<Proposal> = site.meta(Meta::Proposal, &p.id)?;
                    return Err(used_up(now_stored.as_ref().unwrap_or(&p)));
                }
                tracing::info!(proposal = %p.id, %approver, executor = %op.id, "reviewed change carried out");
                Ok(Some(p))
            }
            None => Err(OpsError::ReviewRequired(format!(
                "proposal {} ({}) by `{}` awaits approval by another admin until {} \
                 (meshsign admin review approve {})",
                p.id,
                p.describe(),
                p.proposer,
                rfc3339(p.expires_at),
                p.id
            ))),
        },
        None => {
            let p = propose(site, op, operation, environment, request_sha256, summary)?;
            Err(OpsError::ReviewRequired(format!(
                "proposal {} created ({}); another admin approves it with \
                 `meshsign admin review approve {}` before {}, then the same command is run again",
                p.id,
                p.describe(),
                p.id,
                rfc3339(p.expires_at)
            )))
        }
    }
}

/// Records a new proposal of `operation` by `op` (pending until another admin approves it).
pub fn propose(
    site: &SiteState,
    op: &Operator,
    operation: &str,
    environment: &str,
    request_sha256: &str,
    summary: &str,
) -> Result<Proposal, OpsError> {
    let now = site.clock.unix();
    let window = site.config().review.window_seconds;
    let id = format!(
        "p-{}",
        &meshsign_evidence::files::random_id()
            .map_err(|e| OpsError::Invalid(format!("randomness: {e}")))?[..16]
    );
    let p = Proposal {
        id,
        operation: operation.to_string(),
        environment: bounded(environment, 64),
        summary: bounded(summary, 200),
        request_sha256: request_sha256.to_string(),
        proposer: op.id.clone(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(window).unwrap_or(3600)),
        approver: None,
        approved_at: None,
        executed_by: None,
        executed_at: None,
    };
    save(site, &p)?;
    Ok(p)
}

/// The review name of a SIGHUP reload.
pub const RELOAD: &str = "Reload";

/// What a config proposal binds: the file's SHA-256 (hex) under the `Reload` operation.
pub fn config_digest(file_sha256: &str) -> String {
    request_digest(RELOAD, file_sha256.as_bytes())
}

/// `Admin.ProposeConfig`: a proposal to apply the file with this SHA-256 on reload. Asking
/// again while one is open returns that one.
pub fn propose_config(
    site: &SiteState,
    op: &Operator,
    file_sha256: &str,
    summary: &str,
) -> Result<(Proposal, String), OpsError> {
    if file_sha256.len() != 64
        || !file_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(OpsError::Invalid(format!(
            "config_sha256 `{}`: the SHA-256 of the file, 64 lowercase hex digits",
            bounded(file_sha256, 80)
        )));
    }
    let digest = config_digest(file_sha256);
    let now = site.clock.unix();
    if let Some(p) = list(site)?.into_iter().find(|p| {
        p.operation == RELOAD
            && p.request_sha256 == digest
            && matches!(
                p.state(now),
                ProposalState::Pending | ProposalState::Approved
            )
    }) {
        let detail = format!("config {file_sha256} already proposed as {}", p.id);
        return Ok((p, detail));
    }
    let p = propose(site, op, RELOAD, "", &digest, summary)?;
    let detail = format!(
        "proposed reloading the site config with SHA-256 {file_sha256} as {} ({summary})",
        p.id
    );
    Ok((p, detail))
}

/// The approval (by an admin other than its proposer, not expired) of reloading the file with
/// this SHA-256, if there is one. It is not used up: every replica reloads its own copy of the
/// approved file under it until it expires.
pub fn config_approval(site: &SiteState, file_sha256: &str) -> Result<Option<Proposal>, OpsError> {
    let digest = config_digest(file_sha256);
    let now = site.clock.unix();
    Ok(list(site)?.into_iter().find(|p| {
        p.operation == RELOAD
            && p.request_sha256 == digest
            && p.state(now) == ProposalState::Approved
    }))
}

/// Approves proposal `id` as `op` (Access::Write: admins only, under the ops lock). Returns the
/// proposal and the audit detail.
pub fn approve(site: &SiteState, op: &Operator, id: &str) -> Result<(Proposal, String), OpsError> {
    let now = site.clock.unix();
    let (mut p, raw): (Proposal, _) = site
        .meta_raw(Meta::Proposal, id)?
        .ok_or_else(|| OpsError::NotFound(format!("proposal `{}`", bounded(id, 64))))?;
    match p.state(now) {
        ProposalState::Expired => {
            return Err(OpsError::ReviewExpired(format!(
                "proposal {} expired at {}; the change must be proposed again",
                p.id,
                rfc3339(p.expires_at)
            )));
        }
        ProposalState::Executed => {
            return Err(OpsError::Precondition(format!(
                "proposal {} was already carried out",
                p.id
            )));
        }
        ProposalState::Approved => {
            return Err(OpsError::Precondition(format!(
                "proposal {} is already approved by `{}`",
                p.id,
                p.approver.as_deref().unwrap_or("?")
            )));
        }
        ProposalState::Pending => {}
    }
    if p.proposer == op.id {
        return Err(OpsError::SelfApproval(format!(
            "`{}` proposed {} and may not approve it: another admin must",
            op.id, p.id
        )));
    }
    p.approver = Some(op.id.clone());
    p.approved_at = Some(now);
    if !site.update_meta(Meta::Proposal, id, &raw, &p)? {
        return Err(OpsError::Precondition(format!(
            "proposal {} changed while it was being approved (another admin approved it at \
             the same moment); see `meshsign admin review list`",
            p.id
        )));
    }
    let detail = format!(
        "approved proposal {} ({}) proposed by `{}`",
        p.id,
        p.describe(),
        p.proposer
    );
    Ok((p, detail))
}

/// Removes proposals that expired or were carried out more than a week ago (housekeeping).
pub fn prune(site: &SiteState) -> Result<usize, OpsError> {
    let now = site.clock.unix();
    let mut n = 0;
    for p in list(site)? {
        let done = p.executed_at.unwrap_or(p.expires_at);
        if p.state(now) != ProposalState::Pending
            && p.state(now) != ProposalState::Approved
            && now - done > KEEP_SECONDS
        {
            site.remove_meta(Meta::Proposal, &p.id)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The refusal of a call whose approval another call used first.
fn used_up(p: &Proposal) -> OpsError {
    OpsError::ReviewRequired(format!(
        "proposal {} was already carried out by `{}`: one approval carries out one change; \
         propose it again",
        p.id,
        p.executed_by.as_deref().unwrap_or("another call")
    ))
}

/// The audit detail of a reviewed change: what it did, and under which approval.
pub fn annotate(detail: String, approval: Option<&Proposal>) -> String {
    match approval {
        None => detail,
        Some(p) => format!(
            "{detail}{}approved by `{}` under proposal {} (proposed by `{}`)",
            if detail.is_empty() { "" } else { "; " },
            p.approver.as_deref().unwrap_or("?"),
            p.id,
            p.proposer
        ),
    }
}

use crate::model::when as rfc3339;
