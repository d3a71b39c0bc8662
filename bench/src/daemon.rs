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
    dir: std::sync::Arc<tempfile::TempDir>,
    postgres: Option<(String, PathBuf)>,
    /// Its log file.
    log: PathBuf,
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
    /// With `postgres` (url, CA file), the site's state is in that database, reached over TLS
    /// checked against that CA.
    pub fn start(
        binary: &Path,
        flush: bool,
        log_level: &str,
        postgres: Option<(&str, &Path)>,
    ) -> Result<Self, String> {
        let dir = std::sync::Arc::new(tempfile::tempdir().map_err(|e| e.to_string())?);
        Self::start_in(binary, flush, log_level, postgres, dir, "meshsignd")
    }

    /// Another replica of this (PostgreSQL) site: `meshsignd dev` on the same folder and
    /// database, its own ports.
    pub fn replica(&self, binary: &Path, log_level: &str, name: &str) -> Result<Self, String> {
        let _ = std::fs::remove_file(self.dir.path().join("site").join("client.toml"));
        Self::start_in(
            binary,
            true,
            log_level,
            self.postgres
                .as_ref()
                .map(|(u, c)| (u.as_str(), c.as_path())),
            self.dir.clone(),
            name,
        )
    }

    /// Stops this (sled, dev) site and keeps its folder, for work on its data while it is down
    /// (`--scenario scale` loads it) and a measured start after.
    pub fn stop(mut self) -> Stopped {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Stopped {
            dir: self.dir.clone(),
            postgres: self.postgres.clone(),
        }
    }

    /// Stops this (sled, dev) site, sets `[store] cache_mib` in its config, and starts it
    /// again on the same folder.
    pub fn with_store_cache(
        self,
        binary: &Path,
        log_level: &str,
        cache_mib: u64,
    ) -> Result<Self, String> {
        self.restarted(binary, log_level, "meshsignd-2", |text| {
            format!("{text}\n[store]\ncache_mib = {cache_mib}\n")
        })
    }

    /// Stops this (sled, dev) site, lifts the per-source enroll rate limit (one load
    /// generator is one source: the limit would measure itself), and starts it again.
    pub fn with_enroll_unlimited(self, binary: &Path, log_level: &str) -> Result<Self, String> {
        self.restarted(binary, log_level, "meshsignd-unlimited", |text| {
            format!("{text}\n[limits]\nenroll_per_source_per_second = 0\n")
        })
    }

    /// Stops this (sled, dev) site, edits its site.toml, and starts it again on the same
    /// folder (its log in `name.log`).
    fn restarted(
        mut self,
        binary: &Path,
        log_level: &str,
        name: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<Self, String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let site = self.dir.path().join("site");
        let toml = site.join("site.toml");
        let text = std::fs::read_to_string(&toml).map_err(|e| e.to_string())?;
        std::fs::write(&toml, edit(text)).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(site.join("client.toml"));
        Self::start_in(binary, true, log_level, None, self.dir.clone(), name)
    }

    /// Stops this (sled, dev) site, makes its production environment accept registered
    /// runners only (issue 28), starts it again on the same folder, and registers `n` file
    /// device keys (made in `keys`) through its admin port; returns them.
    pub async fn with_registered_runners(
        self,
        binary: &Path,
        log_level: &str,
        keys: &Path,
        n: usize,
    ) -> Result<
        (
            Self,
            Vec<std::sync::Arc<meshsign_client::device::DeviceKey>>,
        ),
        String,
    > {
        let daemon = self.restarted(binary, log_level, "registered", |text| {
            match text.find("name = \"production\"") {
                Some(at) => {
                    let (head, tail) = text.split_at(at);
                    let tail =
                        tail.replacen("runners = \"claimed\"", "runners = \"registered\"", 1);
                    format!("{head}{tail}")
                }
                None => text,
            }
        })?;
        let mut admin = meshsign_client::site::admin::Admin::connect(&daemon.client)
            .await
            .map_err(|e| e.to_string())?;
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            let (dev, signed) =
                meshsign_client::device::DeviceKey::init(&meshsign_client::device::InitOptions {
                    backend: meshsign_evidence::device::Backend::File,
                    dir: keys.join(format!("runner-{i}")),
                    instance: format!("bench-{i}"),
                    pkcs11: None,
                    tpm: None,
                })
                .map_err(|e| e.to_string())?;
            let request = serde_json::to_vec(&signed).map_err(|e| e.to_string())?;
            admin
                .register_runner(meshsign_proto::v1::RegisterRunnerRequest {
                    request,
                    environments: vec![],
                    labels: vec![],
                })
                .await
                .map_err(|e| e.to_string())?;
            devices.push(std::sync::Arc::new(dev));
        }
        Ok((daemon, devices))
    }

    fn start_in(
        binary: &Path,
        flush: bool,
        log_level: &str,
        postgres: Option<(&str, &Path)>,
        dir: std::sync::Arc<tempfile::TempDir>,
        name: &str,
    ) -> Result<Self, String> {
        if !binary.is_file() {
            return Err(format!(
                "{}: not found; build it with `cargo build --release -p meshsign-server` \
                 (or pass --meshsignd PATH)",
                binary.display()
            ));
        }
        let site = dir.path().join("site");
        let log_path = dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
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
        if let Some((url, ca_file)) = postgres {
            cmd.args(["--postgres-url", url])
                .arg("--postgres-ca-file")
                .arg(ca_file);
        }
        // A SoftHSM2 token made by the bench (`--key-backend pkcs11`): the site gets a key
        // `hsm` in it (the token's config travels in SOFTHSM2_CONF, inherited).
        if let Some(dir) = std::env::var_os(crate::SOFTHSM_DIR) {
            let dir = PathBuf::from(dir);
            cmd.arg("--pkcs11-module")
                .arg(crate::SOFTHSM_MODULE)
                .args(["--pkcs11-token", crate::SOFTHSM_LABEL, "--pkcs11-pin-file"])
                .arg(dir.join("pin"));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let client_toml = site.join("client.toml");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("meshsignd exited ({status}): {log}"));
            }
            if client_toml.is_file()
                && let Ok(client) = ClientConfig::load(&client_toml)
            {
                return Ok(Self {
                    child,
                    client,
                    dir,
                    postgres: postgres.map(|(u, c)| (u.to_string(), c.to_path_buf())),
                    log: log_path,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("meshsignd did not start within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's CPU time so far (user + system, all threads, seconds).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Whether its log holds `needle` (a line the site logs once).
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle))
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

/// A stopped dev site's folder (and its database, for a site on PostgreSQL).
pub struct Stopped {
    dir: std::sync::Arc<tempfile::TempDir>,
    postgres: Option<(String, PathBuf)>,
}

impl Stopped {
    /// The site folder (`site.toml`, `data/`, the dev PKI).
    pub fn site_dir(&self) -> PathBuf {
        self.dir.path().join("site")
    }

    /// Its database (url, CA file), for a site on PostgreSQL.
    pub fn postgres(&self) -> Option<(&str, &Path)> {
        self.postgres
            .as_ref()
            .map(|(u, c)| (u.as_str(), c.as_path()))
    }

    /// Edits its site.toml and starts it; returns the site and the time from spawning
    /// `meshsignd` to its serving on all ports (`client.toml` is written once they are bound).
    pub fn start(
        self,
        binary: &Path,
        log_level: &str,
        name: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<(Daemon, Duration), String> {
        let site = self.site_dir();
        let toml = site.join("site.toml");
        let text = std::fs::read_to_string(&toml).map_err(|e| e.to_string())?;
        std::fs::write(&toml, edit(text)).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(site.join("client.toml"));
        let t = Instant::now();
        let db = self.postgres.clone();
        let db = db.as_ref().map(|(u, c)| (u.as_str(), c.as_path()));
        let d = Daemon::start_in(binary, true, log_level, db, self.dir, name)?;
        Ok((d, t.elapsed()))
    }
}

/// This process's CPU time so far (the load generator's cost).
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_of("/proc/self/stat")
}

/// CPU seconds of process `pid` and all its descendants (live ones: `/proc/<pid>/task/*/children`).
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut total = cpu_seconds_of(&format!("/proc/{pid}/stat"))?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            total += tree_cpu_seconds(child).unwrap_or(0.0);
        }
    }
    Some(total)
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
pub fn clock_ticks() -> f64 {
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
