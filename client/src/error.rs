//! The client's error enum.

/// Client failures; the CLI prints them and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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

impl ClientError {
    /// Wraps a tonic status.
    pub fn rpc(rpc: &'static str, s: tonic::Status) -> Self {
        ClientError::Rpc {
            rpc,
            code: s.code(),
            message: s.message().to_string(),
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
