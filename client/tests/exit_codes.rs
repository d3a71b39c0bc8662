//! Exit codes a CI script can branch on, from the real binaries: 2 for a usage error (and no
//! token spent), 3 for a policy refusal, 4 for a site that does not answer within the timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{meshsign, start_dev};

fn enrollments(dir: &std::path::Path, cfg: &std::path::Path) -> usize {
    common::audit_entries(dir, cfg)
        .iter()
        .filter(|e| e["rpc"] == "Enroll")
        .count()
}

#[test]
fn usage_refusal_and_an_unanswering_site_have_their_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let sign = |args: &[&str]| {
        let start = Instant::now();
        let out = Command::new(meshsign())
            .arg("--config")
            .arg(&cfg)
            .args(["--connect-timeout", "2", "--timeout", "2"])
            .arg("sign")
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            start.elapsed(),
        )
    };
    std::fs::write(tmp.path().join("a.txt"), "a").unwrap();

    // A mistyped path: usage (2), and the token was not spent (no enrollment).
    let before = enrollments(tmp.path(), &cfg);
    let (code, err, _) = sign(&[
        "--environment",
        "staging",
        "--key",
        "release",
        "missing.txt",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("missing.txt") && err.contains("not spent"),
        "{err}"
    );
    assert_eq!(
        enrollments(tmp.path(), &cfg),
        before,
        "no enrollment for a usage error"
    );

    // A key that is not there: refused (3) before the token is spent, and a near miss names
    // the alias meant (issue 26).
    let (code, err, _) = sign(&["--environment", "staging", "--key", "nope", "a.txt"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("no key `nope` in environment `staging`") && err.contains("not spent"),
        "{err}"
    );
    let (code, err, _) = sign(&["--environment", "staging", "--key", "relase", "a.txt"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("did you mean `release`?"), "{err}");
    assert_eq!(
        enrollments(tmp.path(), &cfg),
        before,
        "no enrollment for a key that is not there"
    );
    // With --output json the error is JSON on stdout too.
    let out = Command::new(meshsign())
        .arg("--config")
        .arg(&cfg)
        .args(["--output", "json", "sign", "--environment", "staging"])
        .args(["--key", "relase", "a.txt"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["exit_code"], 3, "{v}");
    assert_eq!(v["error"]["reason"], "KEY", "{v}");

    // A suspended site: unavailable (4) within the timeout, not a hung job.
    let pid = site.0.id().to_string();
    common::signal(&pid, "-STOP");
    let (code, err, took) = sign(&["--environment", "staging", "--key", "release", "a.txt"]);
    common::signal(&pid, "-CONT");
    assert_eq!(code, Some(4), "{err}");
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");

    // And a signature that does not verify: 1.
    let (code, err, _) = sign(&["--environment", "staging", "--key", "release", "a.txt"]);
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(tmp.path().join("a.txt"), "changed").unwrap();
    let out = Command::new(meshsign())
        .args(["verify", "a.txt"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    drop(site);
}

#[test]
fn fingerprint_says_its_source_and_honours_the_override() {
    let out = Command::new(meshsign())
        .arg("fingerprint")
        .output()
        .unwrap();
    assert!(out.status.success());
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        meshsign_evidence::identity::is_valid_fingerprint(&fp),
        "{fp}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("source: "));
    let out = Command::new(meshsign())
        .arg("fingerprint")
        .env("MESHSIGN_RUNNER_FINGERPRINT", "ab".repeat(32))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ab".repeat(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MESHSIGN_RUNNER_FINGERPRINT"));
}

#[test]
fn preflight_finds_each_kind_of_secret_and_passes_a_clean_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dirty = tmp.path().join("home");
    std::fs::create_dir_all(dirty.join(".kube")).unwrap();
    std::fs::create_dir_all(dirty.join(".docker")).unwrap();
    std::fs::create_dir_all(dirty.join(".ssh")).unwrap();
    let w = |p: &str, text: String| std::fs::write(dirty.join(p), text).unwrap();
    // Shapes only: prefixes joined to filler at run time, nothing that is a real credential.
    w(
        "github.env",
        format!("export TOKEN={}{}\n", "ghp_", "x".repeat(36)),
    );
    w(
        "gitlab.yml",
        format!("token: {}{}\n", "glpat-", "y".repeat(20)),
    );
    w(
        "slack.txt",
        format!("hook {}{}\n", "xoxb-", "1234567890-abc"),
    );
    w(
        "aws.ini",
        format!(
            "[default]\naws_access_key_id = {}{}\naws_secret_access_key = zz\n",
            "AKIA", "Q2W3E4R5T6Y7U8I9"
        ),
    );
    w(
        ".netrc",
        "machine example.test login me password hunter2\n".into(),
    );
    w(
        ".git-credentials",
        "https://me:hunter2@git.example.test\n".into(),
    );
    w(".npmrc", "//registry.npmjs.org/:_authToken=abc123\n".into());
    w(".docker/config.json", "{\n  \"auths\": {\n    \"registry.test\": {\n      \"auth\": \"bWU6aHVudGVyMg==\"\n    }\n  }\n}\n".into());
    w(".kube/config", "apiVersion: v1\nkind: Config\nclusters:\n- name: c\nusers:\n- name: u\n  user:\n    token: abcdef123456\n".into());
    // An unencrypted PEM key and an unencrypted OpenSSH key, made here.
    let key = dirty.join("deploy.pem");
    assert!(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out"
            ])
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    let ssh_ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(dirty.join(".ssh/id_ed25519"))
        .status()
        .is_ok_and(|s| s.success());
    // An encrypted key is not a finding.
    assert!(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-aes256",
                "-pass",
                "pass:x",
                "-out"
            ])
            .arg(dirty.join("encrypted.pem"))
            .status()
            .unwrap()
            .success()
    );

    let out = Command::new(meshsign())
        .args(["preflight", "--no-env", "--json"])
        .arg(&dirty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a finding fails the check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let kinds: Vec<&str> = findings
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    let mut want = vec![
        "github-token",
        "gitlab-token",
        "slack-token",
        "aws-access-key-id",
        "aws-secret-access-key",
        "netrc-password",
        "git-credentials",
        "npm-token",
        "docker-auth",
        "kubeconfig-credentials",
        "unencrypted-private-key",
    ];
    if ssh_ok {
        want.push("unencrypted-openssh-private-key");
    }
    for k in &want {
        assert!(kinds.contains(k), "{k} found: {kinds:?}");
    }
    assert!(
        !findings
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("encrypted.pem")),
        "an encrypted key is fine: {text}"
    );
    // Never the secret itself.
    for secret in ["hunter2", "abc123", "abcdef123456", &"x".repeat(36)] {
        assert!(!text.contains(secret), "preflight printed a secret");
    }

    // The environment: a token in a variable is found; a clean tree with a clean environment
    // passes.
    let clean = tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("notes.txt"), "nothing to see\n").unwrap();
    let out = Command::new(meshsign())
        .arg("preflight")
        .arg(&clean)
        .env_clear()
        .env("GH_TOKEN", format!("{}{}", "ghp_", "z".repeat(36)))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("env:GH_TOKEN:0: github-token"));
    let out = Command::new(meshsign())
        .arg("preflight")
        .arg(&clean)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn gitlab_buildkite_and_auto_token_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let token = || {
        let out = Command::new(meshsign())
            .arg("--config")
            .arg(&cfg)
            .args(["dev", "token", "--environment", "staging"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(tmp.path().join("a.txt"), "a").unwrap();
    let sign = |source: &str, envs: &[(&str, String)], path: Option<&std::path::Path>| {
        let mut c = Command::new(meshsign());
        c.arg("--config")
            .arg(&cfg)
            .args(["sign", "--environment", "staging", "--key", "release"])
            .args(["--token-source", source, "a.txt"])
            .current_dir(tmp.path())
            .env_remove("GITHUB_ACTIONS")
            .env_remove("GITLAB_CI")
            .env_remove("BUILDKITE");
        for (k, v) in envs {
            c.env(k, v);
        }
        if let Some(p) = path {
            let old = std::env::var("PATH").unwrap_or_default();
            c.env("PATH", format!("{}:{old}", p.display()));
        }
        c.output().unwrap()
    };
    // GitLab: the job's id_token from MESHSIGN_ID_TOKEN (or --id-token-var).
    let out = sign("gitlab", &[("MESHSIGN_ID_TOKEN", token())], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sign("gitlab", &[], None);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("id_tokens"));
    // auto: GITLAB_CI=true picks the GitLab source; nothing detected is a usage error.
    let out = sign(
        "auto",
        &[("GITLAB_CI", "true".into()), ("MESHSIGN_ID_TOKEN", token())],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sign("auto", &[], None);
    assert_eq!(out.status.code(), Some(2));
    // Buildkite: `buildkite-agent oidc request-token --audience A` is run; a stand-in agent on
    // PATH checks the arguments and prints the token.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let agent = bin.join("buildkite-agent");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n[ \"$1 $2 $3 $4\" = \"oidc request-token --audience meshsign:staging:local\" ] || {{ echo \"bad args: $*\" >&2; exit 9; }}\necho {}\n",
            token()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = sign("buildkite", &[], Some(&bin));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CONNECT proxy on loopback: serves one tunnel, returns the CONNECT request line it saw.
fn connect_proxy() -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap()
            .to_string();
        let target = line.split_whitespace().nth(1).unwrap().to_string();
        let mut up = std::net::TcpStream::connect(&target).unwrap();
        c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .unwrap();
        let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
        let t = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut up2);
        });
        let _ = std::io::copy(&mut up, &mut c);
        let _ = t.join();
        line
    });
    (port, h)
}

/// An HTTPS token endpoint (GitHub's shape) with a certificate from a fresh test CA; returns
/// its port, the CA (PEM) and the request it served.
fn https_token_endpoint(token: String) -> (u16, String, std::thread::JoinHandle<String>) {
    use std::io::{Read as _, Write as _};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let ca_pem = ca.pem();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let conn = rustls::ServerConnection::new(std::sync::Arc::new(cfg)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = vec![0u8; 8192];
        let n = tls.read(&mut buf).unwrap();
        let req = String::from_utf8_lossy(&buf[..n]).into_owned();
        let body = format!("{{\"count\":1,\"value\":\"{token}\"}}");
        write!(
            tls,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        tls.flush().unwrap();
        req
    });
    (port, ca_pem, h)
}

#[test]
fn the_github_token_is_fetched_through_a_proxy_with_a_corporate_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let token = {
        let out = Command::new(meshsign())
            .arg("--config")
            .arg(&cfg)
            .args(["dev", "token", "--environment", "staging"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(tmp.path().join("f"), "f").unwrap();
    let (ep_port, ca_pem, endpoint) = https_token_endpoint(token);
    std::fs::write(tmp.path().join("corp-ca.pem"), ca_pem).unwrap();
    let (proxy_port, proxy) = connect_proxy();
    let out = Command::new(meshsign())
        .current_dir(tmp.path())
        .arg("--config")
        .arg(&cfg)
        .args(["sign", "--environment", "staging", "--key", "release"])
        .args([
            "--token-source",
            "github-actions",
            "--ca-file",
            "corp-ca.pem",
            "f",
        ])
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("https://localhost:{ep_port}/token?api-version=2.0"),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-bearer")
        .env("https_proxy", format!("http://127.0.0.1:{proxy_port}"))
        .env("no_proxy", "127.0.0.1,.internal.test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        proxy.join().unwrap(),
        format!("CONNECT localhost:{ep_port} HTTP/1.1"),
        "the token request went through the proxy"
    );
    let req = endpoint.join().unwrap();
    assert!(
        req.starts_with("GET /token?api-version=2.0&audience="),
        "{req}"
    );
}

/// A reader that closes the pipe early (`meshsign … | head`) ends meshsign quietly, never with
/// a panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    for args in [&["fingerprint"][..], &["fingerprint", "--output", "json"]] {
        let mut child = std::process::Command::new(common::meshsign())
            .args(args)
            .env("MESHSIGN_FINGERPRINT", "ab".repeat(32))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before meshsign writes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// Issue 26: the mistakes a new user makes get a message that names the file or endpoint and
/// the next step.
#[test]
fn a_new_user_s_mistakes_name_the_next_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(meshsign())
            .args(args)
            .env_remove("MESHSIGN_CONFIG")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A wrong config path: usage (2), and it says it is the client config.
    let (code, err) = run(&["--config", "nope.toml", "admin", "status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("client config nope.toml") && err.contains("--config"),
        "{err}"
    );
    // Nothing listening: unavailable (4) after retrying within the connect timeout, the cause
    // said once, and what to check.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site_dir = tmp.path().join("site");
    let site = start_dev(&site_dir);
    let text = std::fs::read_to_string(site_dir.join("client.toml")).unwrap();
    drop(site);
    let moved = text
        .lines()
        .map(|l| {
            if l.starts_with("enroll_endpoint") {
                format!("enroll_endpoint = \"127.0.0.1:{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(site_dir.join("down.toml"), moved).unwrap();
    let started = Instant::now();
    let (code, err) = run(&[
        "--config",
        site_dir.join("down.toml").to_str().unwrap(),
        "--connect-timeout",
        "2",
        "verification-material",
        "--environment",
        "staging",
        "--audit-key",
    ]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("is meshsignd running"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "retried with backoff before giving up: {:?}",
        started.elapsed()
    );
    // `meshsign man DIR`, as the help says.
    let (code, err) = run(&["man", tmp.path().join("man").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(tmp.path().join("man/meshsign.1").exists());
}
