//! The client's error enum.

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
    /// Local crypto failed, or a response did not verify.
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
}

impl ClientError {
    /// The exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        use tonic::Code;
        match self {
            ClientError::ChildExit(code) => *code,
            ClientError::Verify(_) | ClientError::Crypto(_) => exit::VERIFY_FAILED,
            ClientError::Usage(_) | ClientError::Config(_) | ClientError::Io { .. } => exit::USAGE,
            ClientError::Connect { .. } | ClientError::Token(_) => exit::UNAVAILABLE,
            ClientError::Rpc { reason, .. } if reason == "REVIEW_REQUIRED" => exit::PROPOSED,
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
