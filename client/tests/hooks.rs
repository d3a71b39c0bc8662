//! Issue 29: the deploy kit's runner hooks exchange the job's token before the job's steps and
//! tear down after them. The GitHub and GitLab hook scripts run here with the environment those
//! runners give them (GitHub's token endpoint played by a loopback server), start a real job
//! agent against `meshsignd dev`, let a step sign through it with no token of its own, and
//! leave no socket behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{meshsign, start_dev};

fn hooks() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/runner-hooks")
}

/// `sh -c SCRIPT` with meshsign on PATH and `env`.
fn sh(dir: &Path, script: &str, env: &[(&str, String)]) -> Output {
    let bin = meshsign().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("sh");
    c.args(["-c", script]).current_dir(dir).env("PATH", path);
    for k in [
        "MESHSIGN_AGENT_SOCK",
        "MESHSIGN_DEVICE_KEY",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A staging token from the dev site's issuer.
fn dev_token(cfg: &Path) -> String {
    let out = Command::new(meshsign())
        .arg("--config")
        .arg(cfg)
        .args(["dev", "token", "--environment", "staging"])
        .output()
        .unwrap();
    ok(&out).trim().to_string()
}

/// A dev token for `env`, and GitHub's token endpoint serving it once on loopback.
fn github_endpoint(cfg: &Path) -> (String, std::thread::JoinHandle<()>) {
    let token = dev_token(cfg);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/token?api-version=2.0",
        listener.local_addr().unwrap().port()
    );
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 8192];
        let _ = s.read(&mut buf).unwrap();
        let body = format!("{{\"count\":1,\"value\":\"{token}\"}}");
        write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    (url, server)
}

#[test]
fn github_runner_hooks_start_the_agent_before_the_steps_and_stop_it_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let cfg = dir.join("site/client.toml");
    std::fs::write(dir.join("f"), b"artifact").unwrap();
    let (github_env, runner_temp) = (dir.join("github_env"), dir.join("runner_temp"));
    std::fs::create_dir_all(&runner_temp).unwrap();
    std::fs::write(&github_env, "").unwrap();
    let base = vec![
        ("MESHSIGN_CONFIG", cfg.display().to_string()),
        ("MESHSIGN_ENVIRONMENT", "staging".to_string()),
        ("GITHUB_ENV", github_env.display().to_string()),
        ("RUNNER_TEMP", runner_temp.display().to_string()),
    ];

    // A job without `id-token: write`: the hook says so and starts nothing.
    let o = sh(
        dir,
        &hooks().join("github/job-started.sh").display().to_string(),
        &base,
    );
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no OIDC token"));
    assert_eq!(std::fs::read_to_string(&github_env).unwrap(), "");

    let (url, server) = github_endpoint(&cfg);
    let mut env = base.clone();
    env.push(("ACTIONS_ID_TOKEN_REQUEST_URL", url));
    env.push(("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-bearer".into()));
    ok(&sh(
        dir,
        &hooks().join("github/job-started.sh").display().to_string(),
        &env,
    ));
    server.join().unwrap();
    let vars = std::fs::read_to_string(&github_env).unwrap();
    let sock = vars
        .lines()
        .find_map(|l| l.strip_prefix("MESHSIGN_AGENT_SOCK="))
        .expect("the hook put the agent's socket in $GITHUB_ENV")
        .to_string();
    assert!(Path::new(&sock).exists());

    // A step (its environment from $GITHUB_ENV) signs through the agent: no token of its own.
    let mut step = base.clone();
    for l in vars.lines() {
        let (k, v) = l.split_once('=').unwrap();
        step.push((k, v.into()));
    }
    ok(&sh(
        dir,
        "meshsign sign --environment staging --key release f",
        &step,
    ));
    assert!(
        dir.join("f.sig").exists(),
        "the step signed through the agent"
    );

    // The completed hook, without the step's variables: it finds the agent by $RUNNER_TEMP.
    ok(&sh(
        dir,
        &hooks()
            .join("github/job-completed.sh")
            .display()
            .to_string(),
        &base,
    ));
    assert!(!Path::new(&sock).exists(), "the socket is gone");
    assert!(!runner_temp.join("meshsign-agent.env").exists());
    // Run twice (a hook that already ran): nothing to do, no error.
    ok(&sh(
        dir,
        &hooks()
            .join("github/job-completed.sh")
            .display()
            .to_string(),
        &base,
    ));
}

#[test]
fn gitlab_pre_and_post_build_scripts_wrap_the_job_script() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let cfg = dir.join("site/client.toml");
    std::fs::write(dir.join("f"), b"artifact").unwrap();
    let token = dev_token(&cfg);
    // What GitLab runs: pre_build_script, the job's script, post_build_script, in one shell.
    let script = format!(
        ". {pre}\nsock=\"$MESHSIGN_AGENT_SOCK\"\ntest -S \"$sock\"\n\
         meshsign sign --environment staging --key release f\n. {post}\n\
         test ! -e \"$sock\" && echo socket-gone",
        pre = hooks().join("gitlab/pre-build.sh").display(),
        post = hooks().join("gitlab/post-build.sh").display()
    );
    let env = vec![
        ("MESHSIGN_CONFIG", cfg.display().to_string()),
        ("MESHSIGN_ENVIRONMENT", "staging".to_string()),
        ("MESHSIGN_ID_TOKEN", token),
        ("GITLAB_CI", "true".to_string()),
        ("CI_JOB_ID", "4242".to_string()),
    ];
    let out = ok(&sh(dir, &script, &env));
    assert!(out.contains("socket-gone"), "{out}");
    assert!(dir.join("f.sig").exists());
}
