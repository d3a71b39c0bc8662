//! The one place a `tonic::Status` is built. Every refusal reaches the client as
//! `"{reason}: {detail}"` with the code its kind maps to; the same reason is in the audit
//! record and the log. An internal fault is logged in full (with its chain of causes) under a
//! fresh error id, and the client gets only `"internal: error id <id>"` to find that line.
//!
//! Every status also carries a `google.rpc.ErrorInfo` detail (gRPC's richer error model,
//! AIP-193): domain [`ERROR_DOMAIN`], reason the refusal's reason in UPPER_SNAKE_CASE — so a
//! client in any language can branch on it without parsing the message.
//!
//! Owns: the map from `model::RefusalKind` to `tonic::Code`. Must not touch: reasons (each
//! layer's error names its own).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::model::{INTERNAL, Refusal, RefusalKind, bounded};

/// The longest detail a status message carries: whatever a refusal quotes from its request
/// (an alias, an issuer URL, a claim), the message stays small.
pub const MAX_DETAIL: usize = 512;

/// The `domain` of every `google.rpc.ErrorInfo` the site sends.
pub const ERROR_DOMAIN: &str = "meshsign.dev";

/// A status with `message` and an ErrorInfo naming `reason`.
fn with_reason(code: Code, reason: &str, message: String) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason.to_ascii_uppercase(),
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        ),
    )
}

/// The status for a refusal.
pub fn status(e: &dyn Refusal) -> Status {
    let code = match e.kind() {
        RefusalKind::InvalidArgument => Code::InvalidArgument,
        RefusalKind::Unauthenticated => Code::Unauthenticated,
        RefusalKind::PermissionDenied => Code::PermissionDenied,
        RefusalKind::FailedPrecondition => Code::FailedPrecondition,
        RefusalKind::NotFound => Code::NotFound,
        RefusalKind::ResourceExhausted => Code::ResourceExhausted,
        RefusalKind::Unavailable => {
            log_chain(e, "unavailable");
            Code::Unavailable
        }
        RefusalKind::Internal => return internal(e),
    };
    with_reason(
        code,
        e.reason().as_str(),
        format!("{}: {}", e.reason(), bounded(&e.to_string(), MAX_DETAIL)),
    )
}

/// The chain of causes of an error, outermost first.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" ← ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn log_chain(e: &dyn Refusal, what: &str) {
    tracing::warn!(reason = e.reason().as_str(), error = %crate::model::log_safe(&chain(e)), "{what}");
}

fn internal(e: &dyn Refusal) -> Status {
    let id = meshsign_evidence::files::random_id()
        .map(|id| id[..16].to_string())
        .unwrap_or_else(|_| "unavailable".into());
    tracing::error!(error_id = %id, reason = e.reason().as_str(), error = %crate::model::log_safe(&chain(e)), "internal error");
    with_reason(
        Code::Internal,
        INTERNAL,
        format!("{INTERNAL}: error id {id} (the site log has the cause)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reason;

    #[derive(Debug, thiserror::Error)]
    enum Demo {
        #[error("`x` is disabled")]
        Refused,
        #[error("disk on fire: {0}")]
        Fault(#[source] std::io::Error),
    }

    impl Refusal for Demo {
        fn reason(&self) -> Reason {
            match self {
                Demo::Refused => Reason::TrustPolicyDisabled,
                Demo::Fault(_) => Reason::Internal,
            }
        }
        fn kind(&self) -> RefusalKind {
            match self {
                Demo::Refused => RefusalKind::PermissionDenied,
                Demo::Fault(_) => RefusalKind::Internal,
            }
        }
    }

    #[test]
    fn a_quoted_request_field_cannot_grow_the_message() {
        #[derive(Debug, thiserror::Error)]
        #[error("no key `{0}`")]
        struct Long(String);
        impl Refusal for Long {
            fn reason(&self) -> Reason {
                Reason::NotFound
            }
            fn kind(&self) -> RefusalKind {
                RefusalKind::NotFound
            }
        }
        let s = status(&Long("x".repeat(100_000)));
        assert!(s.message().starts_with("not_found: no key `xxx"));
        assert!(s.message().chars().count() <= "not_found: ".len() + MAX_DETAIL);
    }

    #[test]
    fn message_starts_with_the_reason_and_internal_detail_stays_in() {
        let s = status(&Demo::Refused);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "trust_policy_disabled: `x` is disabled");
        let info = s
            .get_details_error_info()
            .map(|i| (i.reason, i.domain))
            .unwrap_or_default();
        assert_eq!(
            (info.0.as_str(), info.1.as_str()),
            ("TRUST_POLICY_DISABLED", ERROR_DOMAIN)
        );
        let s = status(&Demo::Fault(std::io::Error::other("/secret/path")));
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message().starts_with("internal: error id "),
            "{}",
            s.message()
        );
        assert!(!s.message().contains("secret"), "{}", s.message());
    }
}
