//! Ops: runner-CA lifecycle, revocation, trust policies, keys, reload and housekeeping —
//! typed, transport-free. Each submodule owns one noun; this module owns [`OpsError`] and
//! [`admin`], the one door every admin action goes through.
//!
//! Every change is checked against the operator's role, audited with the operator's identity,
//! made durable, and swapped into the running site without a restart. What ops change lives in
//! the store as overlays on the file configuration (`state::overlays`), so it survives restarts
//! and a SIGHUP reload of the file keeps it. Must not touch: tonic, TLS (`api` converts).

pub mod distrust;
pub mod housekeeping;
pub mod keys;
pub mod review;
pub mod revocations;
pub mod runner_cas;
pub mod runners;
pub mod trust;

use crate::audit::{AuditError, AuditRecord};
use crate::ca::CaError;
use crate::custody::CustodyError;
use crate::identity::{IdentityError, Operator, Role};
use crate::model::{Reason, Refusal, RefusalKind, bounded};
use crate::state::{SiteState, StateError};
use crate::store::StoreError;

/// Why an ops request was refused. `Display` is the detail; [`Refusal::reason`] the reason.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Not an ops identity.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The role may not do this.
    #[error("`{operator}` is an auditor and may not change anything")]
    Forbidden {
        /// Operator ID.
        operator: String,
    },
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The state does not allow it.
    #[error("{0}")]
    Precondition(String),
    /// Key custody failed (internal).
    #[error("key custody failed: {0}")]
    Custody(#[from] CustodyError),
    /// Runner CA setup failed (internal).
    #[error("runner CA setup failed: {0}")]
    Ca(#[from] CaError),
    /// Storage failed (internal).
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// Applying the change to the running site failed (internal).
    #[error("applying the change failed: {0}")]
    State(#[from] StateError),
    /// A snapshot could not be taken.
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::state::snapshot::SnapshotError),
    /// The operation needs a second admin (`[review]`); nothing changed.
    #[error("{0}")]
    ReviewRequired(String),
    /// An admin tried to approve their own proposal.
    #[error("{0}")]
    SelfApproval(String),
    /// The proposal's window passed.
    #[error("{0}")]
    ReviewExpired(String),
    /// The audit record could not be written; the change is reported as failed.
    #[error("the audit log cannot be written")]
    Audit(#[source] AuditError),
}

impl Refusal for OpsError {
    fn reason(&self) -> Reason {
        match self {
            OpsError::Identity(_) => Reason::Operator,
            OpsError::Forbidden { .. } => Reason::Role,
            OpsError::NotFound(_) => Reason::NotFound,
            OpsError::Invalid(_) => Reason::Invalid,
            OpsError::ReviewRequired(_) => Reason::ReviewRequired,
            OpsError::SelfApproval(_) => Reason::ReviewSelfApproval,
            OpsError::ReviewExpired(_) => Reason::ReviewExpired,
            OpsError::Precondition(_)
            | OpsError::Snapshot(crate::state::snapshot::SnapshotError::SharedStore) => {
                Reason::Precondition
            }
            OpsError::Custody(CustodyError::TokenUnavailable(_)) => Reason::KeyUnavailable,
            OpsError::Custody(CustodyError::VersionTaken { .. }) => Reason::Precondition,
            OpsError::Custody(_)
            | OpsError::Ca(_)
            | OpsError::Store(_)
            | OpsError::State(_)
            | OpsError::Snapshot(_) => Reason::Internal,
            OpsError::Audit(_) => Reason::AuditUnavailable,
        }
    }

    fn kind(&self) -> RefusalKind {
        match self {
            OpsError::Identity(_) => RefusalKind::Unauthenticated,
            OpsError::Forbidden { .. } => RefusalKind::PermissionDenied,
            OpsError::NotFound(_) => RefusalKind::NotFound,
            OpsError::Invalid(_) => RefusalKind::InvalidArgument,
            OpsError::ReviewRequired(_) | OpsError::ReviewExpired(_) => {
                RefusalKind::FailedPrecondition
            }
            OpsError::SelfApproval(_) => RefusalKind::PermissionDenied,
            OpsError::Precondition(_)
            | OpsError::Snapshot(crate::state::snapshot::SnapshotError::SharedStore) => {
                RefusalKind::FailedPrecondition
            }
            OpsError::Custody(CustodyError::TokenUnavailable(_)) => RefusalKind::Unavailable,
            OpsError::Custody(CustodyError::VersionTaken { .. }) => RefusalKind::FailedPrecondition,
            OpsError::Custody(_)
            | OpsError::Ca(_)
            | OpsError::Store(_)
            | OpsError::State(_)
            | OpsError::Snapshot(_) => RefusalKind::Internal,
            OpsError::Audit(_) => RefusalKind::Unavailable,
        }
    }
}

pub use crate::model::admin::Access;
use crate::model::admin::{Review, admin_rpc};

/// What a change asks for, for two-person review: the exact request's encoding (its SHA-256 is
/// what a proposal binds) and what it does in words, without secrets.
pub type Change<'a> = (&'a [u8], &'a str);

/// The one door every admin action goes through. The operation's rule comes from the table
/// ([`crate::model::admin::ADMIN_RPCS`]): a change needs the admin role and runs under the ops
/// lock; where `[review]` covers a [`Review::Request`] operation it runs only under another
/// admin's approval of this exact `request` — unless `exempt`, checked under the lock, names a
/// reason, which the record then says. Every call is audited, reads included, with the
/// operator's identity; a change whose record cannot be written is reported as failed (the
/// record of the attempt is what matters to an auditor).
pub async fn admin<T>(
    site: &SiteState,
    op: &Operator,
    rpc: &'static str,
    environment: &str,
    (request, summary): Change<'_>,
    exempt: impl FnOnce() -> Result<Option<String>, OpsError>,
    f: impl AsyncFnOnce() -> Result<(T, String), OpsError>,
) -> Result<T, OpsError> {
    let Some(rule) = admin_rpc(rpc) else {
        return Err(OpsError::Invalid(format!(
            "`{rpc}` is not an admin operation"
        )));
    };
    if rule.review != Review::Request {
        return audited(site, op, rpc, environment, rule.access, f).await;
    }
    let digest = review::request_digest(rpc, request);
    audited(site, op, rpc, environment, rule.access, async || {
        let (approval, why) = match exempt()? {
            Some(why) if site.config().review.covers(rpc) => (None, Some(why)),
            _ => (
                review::gate(site, op, rpc, environment, &digest, summary)?,
                None,
            ),
        };
        let (v, detail) = f().await?;
        let detail = review::annotate(detail, approval.as_ref());
        Ok((
            v,
            match why {
                Some(why) => format!("{detail}; no review: {why}"),
                None => detail,
            },
        ))
    })
    .await
}

/// Checks the role, runs the action (changes under the ops lock) and audits it either way.
async fn audited<T>(
    site: &SiteState,
    op: &Operator,
    rpc: &'static str,
    environment: &str,
    access: Access,
    f: impl AsyncFnOnce() -> Result<(T, String), OpsError>,
) -> Result<T, OpsError> {
    let result = match access {
        Access::Write if op.role != Role::Admin => Err(OpsError::Forbidden {
            operator: op.id.clone(),
        }),
        Access::Write => {
            let _guard = site.ops_lock.lock().await;
            let r = f().await;
            // Keys or runner CAs may have been added: the marker lists them from now on; and
            // the other replicas of a shared store reload what changed.
            match (r, site.record_holdings()) {
                (Ok(v), Ok(())) => match site.changed() {
                    Ok(()) => Ok(v),
                    Err(e) => Err(OpsError::State(e.into())),
                },
                (Ok(_), Err(e)) => Err(OpsError::State(e)),
                (Err(e), _) => Err(e),
            }
        }
        Access::Read => f().await,
    };
    let mut rec = admin_record(rpc, environment, &op.id);
    match &result {
        Ok((_, detail)) => {
            rec.decision = "allow".into();
            rec.reason = Reason::Ok.as_str().into();
            rec.detail = detail.clone();
        }
        Err(e) => crate::audit::deny(&mut rec, e, "admin action refused"),
    }
    match site.audit.record(rec.clone()).await {
        Ok(_) => {}
        // A read is still served while the log cannot be written (an export of a full site
        // must work); the log line carries the record instead.
        Err(e) if access == Access::Read && result.is_ok() => tracing::error!(
            error = %e,
            rpc = %rec.rpc,
            operator = %rec.operator,
            environment = %rec.environment,
            detail = %rec.detail,
            "read served while the audit log cannot be written; this line is its record"
        ),
        Err(e) => return Err(OpsError::Audit(e)),
    }
    result.map(|(t, _)| t)
}

/// Counts an admin call refused before an operator could be named (its certificate is not an
/// ops identity) into a summary audit entry — one per certificate, peer address and interval,
/// with the certificate's SANs and SHA-256 — and returns the refusal. Never one write per
/// call: whoever holds such a certificate could otherwise fill the log.
pub fn refuse_unidentified(
    site: &SiteState,
    rpc: &'static str,
    peer: &str,
    certificate: Option<&[u8]>,
    err: IdentityError,
) -> OpsError {
    let err = OpsError::Identity(err);
    let mut rec = admin_record(rpc, "", "(unidentified)");
    rec.peer = bounded(peer, 64);
    crate::audit::deny_quietly(&mut rec, &err);
    if let Some(der) = certificate {
        let (sans, sha256) = crate::identity::describe_certificate(der);
        rec.subject = bounded(&sans, 200);
        rec.detail = format!("{}; certificate sha256 {sha256}", rec.detail);
    }
    site.summaries.count(rec, site.clock.unix());
    err
}

fn admin_record(rpc: &str, environment: &str, operator: &str) -> AuditRecord {
    AuditRecord {
        rpc: format!("Admin.{rpc}"),
        environment: if environment.is_empty() {
            "(site)".into()
        } else {
            bounded(environment, 64)
        },
        operator: operator.to_string(),
        subject: operator.to_string(),
        ..Default::default()
    }
}

fn environment_exists(site: &SiteState, env: &str) -> Result<(), OpsError> {
    site.config()
        .environment(env)
        .map(|_| ())
        .ok_or_else(|| OpsError::NotFound(format!("environment `{}`", bounded(env, 64))))
}
