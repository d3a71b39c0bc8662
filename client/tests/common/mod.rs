//! Helpers shared by the tests that run the real binaries.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // tests: a failed unwrap is a failed test

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The stdout of a command that must have succeeded (the assertion names `what` and shows
/// both streams).
pub fn ok(what: &str, o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn meshsign() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshsign"))
}

pub fn meshsignd() -> PathBuf {
    let p = meshsign().with_file_name(format!("meshsignd{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} not built: run `cargo test --workspace`",
        p.display()
    );
    p
}

/// A `meshsignd` process, killed on drop.
pub struct DevSite(pub Child);

impl Drop for DevSite {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The one way tests start `meshsignd`: `dev` on free loopback ports or `serve` with a config,
/// logs to a file or nowhere, extra arguments and environment; [`Meshsignd::start`] waits for
/// the process to say it is up (never a sleep), [`Meshsignd::try_start`] returns what it wrote
/// when it refused to start.
pub struct Meshsignd {
    args: Vec<std::ffi::OsString>,
    format: String,
    env: Vec<(String, std::ffi::OsString)>,
    log: Option<PathBuf>,
    /// Where `serve` listens for admin calls: up once it accepts a connection there.
    serve_admin_port: Option<u16>,
}

impl Meshsignd {
    fn new(args: Vec<std::ffi::OsString>, serve_admin_port: Option<u16>) -> Self {
        Self {
            args,
            format: "json".into(),
            env: Vec::new(),
            log: None,
            serve_admin_port,
        }
    }

    /// `meshsignd dev --data-dir DIR` on free loopback ports.
    pub fn dev(dir: &Path) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec!["dev".into(), "--data-dir".into()];
        args.push(dir.into());
        for port in ["--enroll-port", "--sign-port", "--admin-port"] {
            args.extend([port.into(), "0".into()]);
        }
        Self::new(args, None)
    }

    /// `meshsignd serve --config CONFIG`, up when `admin_port` accepts a connection.
    pub fn serve(config: &Path, admin_port: u16) -> Self {
        Self::new(
            vec!["serve".into(), "--config".into(), config.into()],
            Some(admin_port),
        )
    }

    /// The log format (`json` unless named).
    pub fn format(mut self, format: &str) -> Self {
        self.format = format.into();
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(meshsignd());
        cmd.args(["--log-format", &self.format]).args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Extra arguments.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.args.extend(extra.iter().map(Into::into));
        self
    }

    /// An environment variable.
    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((k.into(), v.as_ref().to_owned()));
        self
    }

    /// Writes the process's stderr (its log) to `path`.
    pub fn log(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    /// Starts it without waiting (a test that watches the process itself, e.g. its
    /// service-manager notifications); stdout and stderr go nowhere unless logged.
    pub fn spawn(self) -> Child {
        self.command()
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap()
    }

    /// Starts it and waits until it is up; fails the test, with its log, if it is not.
    pub fn start(self) -> DevSite {
        match self.try_start() {
            Ok(site) => site,
            Err(e) => panic!("meshsignd did not start: {e}"),
        }
    }

    /// Starts it: the running process once it is up, or what it wrote (its log, else the
    /// exit status) when it exited first.
    pub fn try_start(self) -> Result<DevSite, String> {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(match &self.log {
                Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
                None => Stdio::piped(),
            })
            .spawn()
            .unwrap();
        // What it wrote: its log file, or its stderr kept (the first 64 KiB) by a thread that
        // drains it so the child never blocks on a full pipe.
        let kept = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let kept = kept.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut k = kept.lock().unwrap();
                    if k.len() < 64 * 1024 {
                        k.push_str(&line);
                        k.push('\n');
                    }
                }
            });
        }
        let log = self.log.clone();
        let refused = |child: &mut Child| {
            let status = child.wait().unwrap();
            assert!(!status.success(), "a refused start exits non-zero");
            // The stderr thread ends with the process; give it the pipe's last lines.
            let written = match &log {
                Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
                None => {
                    wait_until(Duration::from_secs(2), || {
                        std::sync::Arc::strong_count(&kept) == 1
                    });
                    kept.lock().unwrap().clone()
                }
            };
            Err(if written.is_empty() {
                status.to_string()
            } else {
                written
            })
        };
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        if let Some(port) = self.serve_admin_port {
            std::thread::spawn(move || for _ in lines {});
            let up = wait_until(Duration::from_secs(30), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            return match child.try_wait() {
                Ok(Some(_)) => refused(&mut child),
                _ if up => Ok(DevSite(child)),
                _ => Err("not up after 30 s".into()),
            };
        }
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("DEV site is up") => {
                    // Keep draining stdout so the child never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines {});
                    return Ok(DevSite(child));
                }
                Some(_) => {}
                None => return refused(&mut child),
            }
        }
    }
}

/// Sends `sig` (`-HUP`, `-TERM`, `-STOP`…) to process `pid`; fails the test if `kill` does.
pub fn signal(pid: impl std::fmt::Display, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// Polls `cond` until it holds or `limit` passes; whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `meshsignd dev` on free loopback ports and waits for its "is up" line (no sleeping).
pub fn start_dev(dir: &Path) -> DevSite {
    Meshsignd::dev(dir).start()
}

/// [`start_dev`] with JSON logs written to `log` (stderr otherwise discarded).
pub fn start_dev_logging(dir: &Path, log: Option<&Path>) -> DevSite {
    start_dev_with_format(dir, log, "json")
}

/// [`start_dev_logging`] with the log format named (`text` or `json`).
pub fn start_dev_with_format(dir: &Path, log: Option<&Path>, format: &str) -> DevSite {
    start_dev_args(dir, log, format, &[])
}

/// A dev site of `region` (its folder is made for that region on first start).
pub fn start_dev_region(dir: &Path, region: &str) -> DevSite {
    Meshsignd::dev(dir).args(&["--region", region]).start()
}

/// [`start_dev_with_format`] with extra `meshsignd dev` arguments.
pub fn start_dev_args(dir: &Path, log: Option<&Path>, format: &str, extra: &[&str]) -> DevSite {
    let mut d = Meshsignd::dev(dir).format(format).args(extra);
    if let Some(log) = log {
        d = d.log(log);
    }
    d.start()
}

/// A dev site whose `hsm` keys live in a SoftHSM2 token made in `hsm_dir`.
pub fn start_dev_hsm(dir: &Path, hsm_dir: &Path) -> DevSite {
    let conf = meshsign_certs_dev::softhsm::token(hsm_dir, "meshsign-test").unwrap();
    let pin = hsm_dir.join("pin");
    Meshsignd::dev(dir)
        .args(&[
            "--pkcs11-module",
            meshsign_certs_dev::softhsm::MODULE,
            "--pkcs11-token",
            "meshsign-test",
            "--pkcs11-pin-file",
            pin.to_str().unwrap(),
        ])
        .env("SOFTHSM2_CONF", conf.as_path())
        .start()
}

/// Runs `openssl` in `dir`, fails the test with its stderr if it fails, returns its stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Makes a self-signed RSA-2048 code-signing identity in `dir` (`id.key`, `id.pem`) and exports
/// it as `id.p12` with password `s3cret`, the way Keychain exports one.
pub fn code_signing_p12(dir: &Path, subject: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "id.key",
            "-out",
            "id.pem",
            "-days",
            "2",
            "-subj",
            subject,
            "-addext",
            "extendedKeyUsage=codeSigning",
            "-addext",
            "keyUsage=critical,digitalSignature",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            "id.key",
            "-in",
            "id.pem",
            "-out",
            "id.p12",
            "-passout",
            "pass:s3cret",
        ],
    );
}

/// An enrolled session in `env` with a token from the dev issuer.
pub async fn dev_session(
    cfg: &meshsign_client::ClientConfig,
    env: &str,
    fingerprint: &str,
) -> meshsign_client::session::Session {
    use meshsign_client::session::token::{self, TokenSource};
    let tok = token::obtain(
        &TokenSource::Dev(meshsign_certs_dev::GithubJob::new(env)),
        cfg,
        cfg.audience(env).unwrap(),
    )
    .await
    .unwrap();
    let params = meshsign_client::session::EnrollParams {
        device: None,
        environment: env.into(),
        token: tok.to_string(),
        fingerprint: fingerprint.into(),
        requested_ttl_seconds: 0,
        region: None,
    };
    meshsign_client::session::Session::start(cfg, &params)
        .await
        .unwrap()
}

/// Every audit entry of a dev site, exported with the admin CLI.
pub fn audit_entries(dir: &Path, cfg: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(meshsign())
        .arg("--config")
        .arg(cfg)
        .args(["admin", "audit", "export"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `clients` sessions sign as fast as they can (alternating staging and production) until at
/// least `at_least` receipts were given; then the site is killed with SIGKILL. Returns the
/// receipts (seq, hash) the clients were given.
pub async fn sign_until_killed(
    site: &mut DevSite,
    cfg: &meshsign_client::ClientConfig,
    clients: usize,
    at_least: usize,
    fingerprint: &str,
) -> Vec<(u64, String)> {
    use std::sync::{Arc, Mutex};
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let acked = acked.clone();
        let env = if i % 2 == 0 { "staging" } else { "production" };
        let mut s = dev_session(cfg, env, fingerprint).await;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u8;
            loop {
                n = n.wrapping_add(1);
                match s.sign_digest("release", [n; 32], "load").await {
                    Ok(r) => acked.lock().unwrap().push((r.audit_seq, r.audit_hash)),
                    Err(_) => return,
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < at_least {
        tokio::task::yield_now().await;
    }
    site.0.kill().unwrap(); // SIGKILL
    site.0.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    acked.lock().unwrap().clone()
}

/// Runs `meshsign --config CFG ARGS…` in `dir`.
pub fn meshsign_in(dir: &Path, cfg: &Path, args: &[&str]) -> std::process::Output {
    Command::new(meshsign())
        .env_remove("MESHSIGN_CONFIG")
        .env_remove("MESHSIGN_OUTPUT")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// An App Store Connect key as Apple hands it out (`AuthKey_ABC123DEFG.p8`, made by openssl),
/// imported into environment `staging` of the dev site as `asc` (purpose asc-api) with
/// `extra` arguments (`--asc-scope …`).
#[allow(dead_code)] // not every test binary imports one
pub fn import_asc_key(dir: &Path, cfg: &Path, extra: &[&str]) {
    let p8 = dir.join("AuthKey_ABC123DEFG.p8");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&p8)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut args = vec![
        "admin",
        "key",
        "import",
        "--environment",
        "staging",
        "--alias",
        "asc",
        "--file",
    ];
    let file = p8.display().to_string();
    args.push(&file);
    args.extend([
        "--repository",
        "*",
        "--ref",
        "*",
        "--purpose",
        "asc-api",
        "--asc-key-id",
        "ABC123DEFG",
        "--asc-issuer-id",
        "57246542-96fe-1a63-e053-0824d011072a",
    ]);
    args.extend(extra);
    let o = meshsign_in(dir, cfg, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
