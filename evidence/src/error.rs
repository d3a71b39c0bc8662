//! The one error of offline verification ([`VerifyError`]), shared by the bundle formats and
//! the verifier.

use std::path::Path;

/// Why a verification did not pass.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The evidence does not verify (a signature, a digest, a proof, a binding).
    #[error("{0}")]
    Failed(String),
    /// An input file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An input that can never verify as given (too large a message, …).
    #[error("{0}")]
    Input(String),
}

impl VerifyError {
    /// A mapper for I/O errors on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
        move |source| VerifyError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
