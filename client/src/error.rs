//! The client's error enum.

use meshsign_evidence::reason::Reason;

/// Client failures; the CLI prints them and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The command was used wrongly (a missing input file, no token source).
    #[error("{0}")]
    Usage(String),
    /// The command `meshsign exec` ran exited with this status (passed on).
    #[error("the command exited with status {0}")]
    ChildExit(u8),
    /// The client config is missing or invalid.
    #[error("config: {0}")]
    Config(String),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting or the TLS handshake failed.
    #[error("connect {endpoint}: {message}")]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// The site refused the RPC.
    #[error("{rpc} refused ({code:?}): {message}")]
    Rpc {
        /// RPC.
        rpc: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// The site's message (names the failed check).
        message: String,
        /// The reason of the `google.rpc.ErrorInfo` detail (`REVIEW_REQUIRED`, `TOKEN_EXPIRED`…),
        /// empty when the site sent none.
        reason: String,
    },
    /// Getting a token failed.
    #[error("token: {0}")]
    Token(String),
    /// A local fault: key generation, TLS setup, encoding (never "did not verify").
    #[error("crypto: {0}")]
    Crypto(String),
    /// Offline verification failed.
    #[error("verification failed: {0}")]
    Verify(String),
}

/// Exit codes a script can branch on.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// A signature, bundle, receipt or audit log did not verify.
    pub const VERIFY_FAILED: u8 = 1;
    /// The command was used wrongly (flags, config, input files).
    pub const USAGE: u8 = 2;
    /// The site refused by policy (token, certificate, key access, revocation, role…).
    pub const REFUSED: u8 = 3;
    /// The site (or the token source) was unavailable or did not answer in time.
    pub const UNAVAILABLE: u8 = 4;
    /// The change needs a second admin (two-person review): it was proposed, nothing changed
    /// yet; another admin runs `meshsign admin review approve ID`, then the command is repeated.
    pub const PROPOSED: u8 = 5;
    /// A local fault: a file that exists could not be read or written, TLS or key setup failed.
    pub const LOCAL_FAULT: u8 = 6;

    /// The contract above in one sentence, as `meshsign --help` ends.
    pub const HELP: &str = "Exit codes: 0 ok; 1 verification failed; 2 usage (flags, config, \
        input files); 3 refused by the site's policy; 4 site or token source unavailable, or no \
        answer within the timeout (retry may help; a budget refusal is 3: retrying never helps); \
        5 proposed: the change needs a second admin's approval (meshsign admin review approve \
        ID), then the same command again; 6 local fault (a file that is there cannot be read or \
        written, TLS or key setup failed).";
}

impl From<meshsign_evidence::verify::VerifyError> for ClientError {
    fn from(e: meshsign_evidence::verify::VerifyError) -> Self {
        use meshsign_evidence::verify::VerifyError;
        match e {
            VerifyError::Failed(m) => ClientError::Verify(m),
            VerifyError::Io { path, source } => ClientError::Io { path, source },
            VerifyError::Input(m) => ClientError::Usage(m),
        }
    }
}

impl ClientError {
    /// The kind of failure, as `--output json` names it: usage, child_exit, config, io,
    /// connect, refused, token, local_fault, verify.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Usage(_) => "usage",
            ClientError::ChildExit(_) => "child_exit",
            ClientError::Config(_) => "config",
            ClientError::Io { .. } => "io",
            ClientError::Connect { .. } => "connect",
            ClientError::Rpc { .. } => "refused",
            ClientError::Token(_) => "token",
            ClientError::Crypto(_) => "local_fault",
            ClientError::Verify(_) => "verify",
        }
    }

    /// `{"error": {"message", "exit_code", "kind", "reason"}}`: what `--output json` prints.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "exit_code": self.exit_code(),
                "kind": self.kind(),
                "reason": self.reason(),
            }
        })
    }

    /// The site's reason for a refusal (its `ErrorInfo` reason), else empty.
    pub fn reason(&self) -> &str {
        match self {
            ClientError::Rpc { reason, .. } => reason,
            _ => "",
        }
    }

    /// The exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        use tonic::Code;
        match self {
            ClientError::ChildExit(code) => *code,
            ClientError::Verify(_) => exit::VERIFY_FAILED,
            ClientError::Crypto(_) => exit::LOCAL_FAULT,
            ClientError::Usage(_) | ClientError::Config(_) => exit::USAGE,
            // A path that is not there (or not a file) is the caller's; a file that is there
            // and cannot be read or written is a local fault.
            ClientError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound
                | std::io::ErrorKind::InvalidInput
                | std::io::ErrorKind::IsADirectory => exit::USAGE,
                _ => exit::LOCAL_FAULT,
            },
            ClientError::Connect { .. } | ClientError::Token(_) => exit::UNAVAILABLE,
            ClientError::Rpc { reason, .. }
                if Reason::from_error_info(reason) == Some(Reason::ReviewRequired) =>
            {
                exit::PROPOSED
            }
            // A job out of budget stays out of budget: retrying never helps.
            ClientError::Rpc { reason, .. }
                if Reason::from_error_info(reason) == Some(Reason::Budget) =>
            {
                exit::REFUSED
            }
            ClientError::Rpc { code, .. } => match code {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::ResourceExhausted
                | Code::Aborted => exit::UNAVAILABLE,
                _ => exit::REFUSED,
            },
        }
    }

    /// Wraps a tonic status.
    pub fn rpc(rpc: &'static str, s: tonic::Status) -> Self {
        use tonic_types::StatusExt as _;
        ClientError::Rpc {
            rpc,
            code: s.code(),
            message: s.message().to_string(),
            reason: s
                .get_details_error_info()
                .map(|i| meshsign_evidence::audit::excerpt(&i.reason, 64))
                .unwrap_or_default(),
        }
    }

    /// An I/O error on a path.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| ClientError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: tonic::Code, reason: &str) -> ClientError {
        ClientError::Rpc {
            rpc: "Sign",
            code,
            message: String::new(),
            reason: reason.into(),
        }
    }

    fn io(kind: std::io::ErrorKind) -> ClientError {
        ClientError::Io {
            path: "f".into(),
            source: kind.into(),
        }
    }

    /// DESIGN's contract: 0 ok, 1 verification failed, 2 usage, 3 refused (budget too), 4
    /// unavailable, 5 review required, 6 local fault.
    #[test]
    fn every_error_has_the_exit_code_of_the_contract() {
        use std::io::ErrorKind;
        use tonic::Code;
        for (e, want) in [
            (ClientError::Verify("x".into()), exit::VERIFY_FAILED),
            (ClientError::Usage("x".into()), exit::USAGE),
            (ClientError::Config("x".into()), exit::USAGE),
            (io(ErrorKind::NotFound), exit::USAGE),
            (io(ErrorKind::PermissionDenied), exit::LOCAL_FAULT),
            (ClientError::Crypto("tls".into()), exit::LOCAL_FAULT),
            (rpc(Code::PermissionDenied, "KEY_ACCESS"), exit::REFUSED),
            // Out of budget: the same code as a rate limit, but a retry never helps.
            (rpc(Code::ResourceExhausted, "BUDGET"), exit::REFUSED),
            (
                rpc(Code::ResourceExhausted, "RATE_LIMITED"),
                exit::UNAVAILABLE,
            ),
            (rpc(Code::Unavailable, "KEY_UNAVAILABLE"), exit::UNAVAILABLE),
            (
                rpc(Code::FailedPrecondition, "REVIEW_REQUIRED"),
                exit::PROPOSED,
            ),
            (ClientError::Token("x".into()), exit::UNAVAILABLE),
        ] {
            assert_eq!(e.exit_code(), want, "{e:?}");
        }
    }
}
