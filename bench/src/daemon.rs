//! The site under test: the real `meshsignd dev` binary in its own process (its own sled in a
//! temp dir, its own dev PKI and dev OIDC issuer, loopback ports picked by the kernel), so the
//! bench can read the server's own CPU time and memory from `/proc` and the load generator's
//! work is not counted as the server's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshsign_client::ClientConfig;

/// A running `meshsignd dev`, killed on drop.
pub struct Daemon {
    child: Child,
    /// The client config it wrote (endpoints, CA, dev issuer).
    pub client: ClientConfig,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `meshsignd` next to this binary (both are built into the same target folder).
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("meshsignd"))
        .unwrap_or_else(|_| PathBuf::from("meshsignd"))
}

impl Daemon {
    /// Starts `binary dev` in a fresh folder on free loopback ports and waits until it serves.
    /// Its log (at `log_level`) goes to a file in that folder, as a real deployment's would.
    pub fn start(binary: &Path, flush: bool, log_level: &str) -> Result<Self, String> {
        if !binary.is_file() {
            return Err(format!(
                "{}: not found; build it with `cargo build --release -p meshsign-server` \
                 (or pass --meshsignd PATH)",
                binary.display()
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let site = dir.path().join("site");
        let log =
            std::fs::File::create(dir.path().join("meshsignd.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&site)
            .args([
                "--enroll-port",
                "0",
                "--sign-port",
                "0",
                "--admin-port",
                "0",
            ])
            .env("RUST_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !flush {
            cmd.arg("--no-audit-flush");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let client_toml = site.join("client.toml");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("meshsignd.log")).unwrap_or_default();
                return Err(format!("meshsignd exited ({status}): {log}"));
            }
            if client_toml.is_file()
                && let Ok(client) = ClientConfig::load(&client_toml)
            {
                return Ok(Self {
                    child,
                    client,
                    _dir: dir,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("meshsignd did not start within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's CPU time so far (user + system, all threads, seconds).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Peak and current resident set size, MiB (`VmHWM`, `VmRSS`).
    pub fn rss_mib(&self) -> Option<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024.0)
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }
}

/// This process's CPU time so far (the load generator's cost).
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_of("/proc/self/stat")
}

/// utime + stime from a `/proc/<pid>/stat` file, in seconds.
fn cpu_seconds_of(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// `CLK_TCK` (the unit of /proc's CPU times), asked of `getconf` once.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
