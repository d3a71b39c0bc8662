//! The Admin service's rules: for every RPC, whether it reads or changes the site (the role it
//! needs) and whether `[review]` may put it under two-person review. One table, read by the one
//! door every admin call goes through (`ops::admin`) and by `[review]`'s validation; a test
//! holds it against the Admin service of the contract.

/// Whether an admin action reads or changes the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read: auditors may do it; runs without the ops lock.
    Read,
    /// A change: admins only; runs under the ops lock.
    Write,
}

/// How two-person review may cover an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Review {
    /// Never: a read, or a step of review itself.
    Never,
    /// When `[review]` names it: the exact request (its SHA-256) must be approved by another
    /// admin first; `ops::admin` holds the gate.
    Request,
    /// When `[review]` names it: the operation checks an approval of its own input (a reload:
    /// the file's SHA-256, and only when the file widens trust).
    Input,
}

/// One admin operation: its name in the audit log (`Admin.<name>`), the access it needs, and
/// how `[review] operations` may cover it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminRpc {
    /// The name (the RPC's, or the two words `SetTrustPolicyEnabled` is audited as).
    pub name: &'static str,
    /// Read or change.
    pub access: Access,
    /// How two-person review may cover it.
    pub review: Review,
}

const fn read(name: &'static str) -> AdminRpc {
    AdminRpc {
        name,
        access: Access::Read,
        review: Review::Never,
    }
}

const fn change(name: &'static str) -> AdminRpc {
    AdminRpc {
        name,
        access: Access::Write,
        review: Review::Request,
    }
}

/// A change that review never covers: approving is the review itself, and proposing a config
/// file only records which file a second admin is asked to approve.
const fn unreviewed_change(name: &'static str) -> AdminRpc {
    AdminRpc {
        name,
        access: Access::Write,
        review: Review::Never,
    }
}

/// Every admin operation. `SetTrustPolicyEnabled` is audited (and reviewed) as
/// `EnableTrustPolicy` or `DisableTrustPolicy`; `Reload` is a SIGHUP, reviewed by the approved
/// file's SHA-256 (a reload that only narrows trust never needs review).
pub const ADMIN_RPCS: [AdminRpc; 35] = [
    change("Snapshot"),
    read("GetAuditPublicKey"),
    read("ExportAudit"),
    read("ListIssuers"),
    change("StageIssuer"),
    change("ActivateIssuer"),
    change("RetireIssuer"),
    change("RevokeIssuer"),
    change("Distrust"),
    change("Undistrust"),
    change("Revoke"),
    read("ListRevocations"),
    read("Status"),
    read("GetJobUsage"),
    read("ListTrustPolicies"),
    change("EnableTrustPolicy"),
    change("DisableTrustPolicy"),
    change("SetJwks"),
    read("ListKeys"),
    change("CreateKey"),
    change("RotateKey"),
    change("DisableKey"),
    change("CreateKeyCsr"),
    change("SetKeyCertificate"),
    change("ImportKey"),
    read("ListProposals"),
    unreviewed_change("ApproveProposal"),
    unreviewed_change("ProposeConfig"),
    change("SetAuditRetention"),
    change("RegisterRunner"),
    read("ListRunners"),
    read("GetRunner"),
    change("RetireRunner"),
    change("RevokeRunner"),
    AdminRpc {
        name: "Reload",
        access: Access::Write,
        review: Review::Input,
    },
];

/// The rule for `name`, if it is an admin operation.
pub fn admin_rpc(name: &str) -> Option<&'static AdminRpc> {
    ADMIN_RPCS.iter().find(|r| r.name == name)
}

/// The operations `[review] operations` may name.
pub fn reviewable() -> impl Iterator<Item = &'static str> {
    ADMIN_RPCS
        .iter()
        .filter(|r| r.review != Review::Never)
        .map(|r| r.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_reviewable_ones_are_changes() {
        for (i, r) in ADMIN_RPCS.iter().enumerate() {
            assert!(
                ADMIN_RPCS[..i].iter().all(|o| o.name != r.name),
                "{} twice",
                r.name
            );
            assert!(
                r.review == Review::Never || r.access == Access::Write,
                "{}",
                r.name
            );
        }
    }
}
