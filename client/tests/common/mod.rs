//! Helpers shared by the tests that run the real binaries.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // tests: a failed unwrap is a failed test

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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

/// A `meshsignd dev` process, killed on drop.
pub struct DevSite(pub Child);

impl Drop for DevSite {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `meshsignd dev` on free loopback ports and waits for its "is up" line (no sleeping).
pub fn start_dev(dir: &Path) -> DevSite {
    start_dev_logging(dir, None)
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
    start_dev_args(dir, None, "json", &["--region", region])
}

/// [`start_dev_with_format`] with extra `meshsignd dev` arguments.
pub fn start_dev_args(dir: &Path, log: Option<&Path>, format: &str, extra: &[&str]) -> DevSite {
    start_dev_env(dir, log, format, extra, &[])
}

/// A dev site whose `hsm` keys live in a SoftHSM2 token made in `hsm_dir`.
pub fn start_dev_hsm(dir: &Path, hsm_dir: &Path) -> DevSite {
    let conf = meshsign_certs_dev::softhsm::token(hsm_dir, "meshsign-test").unwrap();
    let pin = hsm_dir.join("pin");
    start_dev_env(
        dir,
        None,
        "json",
        &[
            "--pkcs11-module",
            meshsign_certs_dev::softhsm::MODULE,
            "--pkcs11-token",
            "meshsign-test",
            "--pkcs11-pin-file",
            pin.to_str().unwrap(),
        ],
        &[("SOFTHSM2_CONF", conf.as_path())],
    )
}

/// [`start_dev_args`] with extra environment variables for `meshsignd`.
pub fn start_dev_env(
    dir: &Path,
    log: Option<&Path>,
    format: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> DevSite {
    let mut cmd = Command::new(meshsignd());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(["--log-format", format, "dev", "--data-dir"])
        .arg(dir)
        .args(extra)
        .args([
            "--enroll-port",
            "0",
            "--sign-port",
            "0",
            "--admin-port",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        let line = lines
            .next()
            .expect("meshsignd dev exited before it was up")
            .unwrap();
        if line.contains("DEV site is up") {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    DevSite(child)
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
