//! Files both sides write (site config, client config, KEK, journals' neighbours): always
//! atomically, so a reader never sees a half-written file and a crash leaves the old one.
//!
//! Owns: [`write_atomic`] and [`random_id`]. Touches nothing else: no format, no policy.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, made
/// durable and renamed over `path`, then the folder is made durable. With `secret`, the file is
/// created with mode 0600 (on Unix) before any byte is written.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let suffix = random_id()
        .map(|id| id[..8].to_string())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must survive a crash.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator is unavailable")]
pub struct RngUnavailable;

/// 128 random bits as 32 lowercase hex characters (ids of issuers, rules, temp files, jtis).
pub fn random_id() -> Result<String, RngUnavailable> {
    use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| RngUnavailable)?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_and_leaves_no_temp() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("meshsign-files-{}", random_id()?));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("client.toml");
        write_atomic(&p, b"first", false)?;
        write_atomic(&p, b"second", true)?;
        assert_eq!(std::fs::read(&p)?, b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
        }
        let names: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        assert_eq!(names.len(), 1, "no temporary file is left behind");
        let ids = (random_id()?, random_id()?);
        assert_ne!(ids.0, ids.1);
        assert_eq!(ids.0.len(), 32);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
