//! A SoftHSM2 token in a folder, for tests and benchmarks (Debian's `softhsm2` package).
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when its library is first initialised in a process: give the
//! returned config to the process that loads the module (its environment), not this one.

use std::path::{Path, PathBuf};

use crate::DevError;

/// Debian's SoftHSM2 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of tokens made here (written to `DIR/pin`, mode 0600).
pub const PIN: &str = "1234";

/// Makes `DIR/softhsm2.conf` (tokens in `DIR/tokens`), initialises a token labelled `label`
/// with `softhsm2-util`, and writes its PIN to `DIR/pin`. Returns the config's path.
pub fn token(dir: &Path, label: &str) -> Result<PathBuf, DevError> {
    let io = |source| DevError::Io {
        path: dir.display().to_string(),
        source,
    };
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(io)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(io)?;
    let out = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", PIN, "--so-pin", "5678"])
        .output()
        .map_err(|e| DevError::Crypto(format!("softhsm2-util (apt-get install softhsm2): {e}")))?;
    if !out.status.success() {
        return Err(DevError::Crypto(format!(
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    crate::write_file(&dir.join("pin"), format!("{PIN}\n").as_bytes(), true)?;
    Ok(conf)
}
