//! The README's quick start, for real: `meshsignd dev` (the binary) on loopback, then the
//! `meshsign` CLI signs and verifies files; openssl checks the signatures.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{meshsign, start_dev};

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;

use base64::Engine as _;

fn run(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args(args)
        .env_remove("MESHSIGN_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn first_pem(text: &str) -> String {
    let start = text.find("-----BEGIN PUBLIC KEY-----").unwrap();
    let end = text[start..].find("-----END PUBLIC KEY-----").unwrap()
        + start
        + "-----END PUBLIC KEY-----".len();
    format!("{}\n", &text[start..end])
}

#[test]
fn quick_start_sign_and_verify_with_the_real_binaries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let site_dir = dir.join("site");
    let site = start_dev(&site_dir);

    std::fs::write(dir.join("a.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(dir.join("b.txt"), b"hello\n").unwrap();
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let (code, out, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "staging",
            "--key",
            "release",
            "a.bin",
            "b.txt",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("spiffe://meshsign.dev/runner/staging/local/"),
        "{err}"
    );

    let (code, vm, err) = run(
        dir,
        &[
            "verification-material",
            "--environment",
            "staging",
            "--key",
            "release",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(vm.contains("release@v1"));
    std::fs::write(dir.join("pub.pem"), first_pem(&vm)).unwrap();

    // openssl, independently, over each file and its .sig.
    for f in ["a.bin", "b.txt"] {
        let o = Command::new("openssl")
            .current_dir(dir)
            .args([
                "dgst",
                "-sha256",
                "-verify",
                "pub.pem",
                "-signature",
                &format!("{f}.sig"),
                f,
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }

    let (code, out, _) = run(dir, &["verify", "b.txt", "--public-key", "pub.pem"]);
    assert_eq!(code, 0, "{out}");
    // One byte changed: exit 1.
    std::fs::write(dir.join("b.txt"), b"hellp\n").unwrap();
    let (code, _, err) = run(dir, &["verify", "b.txt", "--public-key", "pub.pem"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not match"), "{err}");

    // The runner key and certificate never touched the disk: only signatures were added.
    let after: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !before.iter().any(|b| b.to_string_lossy() == *n))
        .collect();
    let mut after = after;
    after.sort();
    assert_eq!(
        after,
        [
            "a.bin.sig",
            "a.bin.sig.json",
            "b.txt.sig",
            "b.txt.sig.json",
            "pub.pem"
        ]
    );
    drop(site);

    // Dev mode reuses what it made: same key after a restart.
    let _site = start_dev(&site_dir);
    let (code, vm2, _) = run(
        dir,
        &[
            "verification-material",
            "--environment",
            "staging",
            "--key",
            "release",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(first_pem(&vm2), first_pem(&vm));
}

#[test]
fn dev_token_token_file_and_github_actions_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));

    let (code, token, err) = run(
        dir,
        &[
            "dev",
            "token",
            "--environment",
            "production",
            "--repository",
            "acme/ios",
            "--job-id",
            "77",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_string();
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    for k in [
        "iss",
        "aud",
        "sub",
        "repository",
        "ref",
        "environment",
        "job_workflow_ref",
        "check_run_id",
        "run_id",
        "run_attempt",
        "runner_environment",
        "jti",
        "iat",
        "nbf",
        "exp",
    ] {
        assert!(claims.get(k).is_some(), "claim {k} missing: {claims}");
    }
    assert_eq!(claims["sub"], "repo:acme/ios:environment:production");
    assert_eq!(claims["aud"], "meshsign:production:local");
    // The job is GitHub's check run; the run is the pipeline.
    assert_eq!(claims["check_run_id"], "77");
    assert_eq!(claims["run_id"], "13456789012");

    std::fs::write(dir.join("f"), b"x").unwrap();
    std::fs::write(dir.join("tok"), &token).unwrap();
    let (code, out, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "--token-file",
            "tok",
            "f",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The same token again: refused (single use), non-zero exit naming the check.
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "--token-file",
            "tok",
            "f",
        ],
    );
    assert_eq!(code, 3, "a replayed token is a refusal: {err}");
    assert!(err.contains("jti"), "{err}");
    // A production token for a staging step: refused.
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "staging",
            "--key",
            "release",
            "--token-file",
            "tok",
            "f",
        ],
    );
    assert_eq!(code, 3, "a refusal: {err}");
    assert!(
        err.contains("PermissionDenied") && err.contains("environment"),
        "{err}"
    );

    // GitHub Actions' token endpoint, played by a loopback HTTP server that checks the request.
    let (code, fresh, _) = run(dir, &["dev", "token", "--environment", "production"]);
    assert_eq!(code, 0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fresh = fresh.trim().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).unwrap();
        let req = String::from_utf8_lossy(&buf[..n]).into_owned();
        let body = format!("{{\"count\":1,\"value\":\"{fresh}\"}}");
        write!(s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
        req
    });
    let out = Command::new(meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args([
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "--token-source",
            "github-actions",
            "f",
        ])
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("http://127.0.0.1:{port}/token?api-version=2.0"),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-bearer")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let req = server.join().unwrap();
    assert!(
        req.starts_with("GET /token?api-version=2.0&audience=meshsign%3Aproduction%3Alocal "),
        "{req}"
    );
    assert!(
        req.to_ascii_lowercase()
            .contains("authorization: bearer request-bearer"),
        "{req}"
    );
}

#[test]
fn admin_verbs_drill_and_sighup_reload_against_a_dev_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("meshsignd.log");
    let site = common::start_dev_logging(&dir.join("site"), Some(&log));

    // The drill: disable a policy, prove refusal on an open connection and for new enrollments,
    // re-enable; exit 0 only if refusal came within 1 s.
    let (code, out, err) = run(dir, &["admin", "drill", "--environment", "staging"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(
            "REGION\tPOLICY\tISSUER\tSIGN REFUSED (ms)\tENROLL REFUSED (ms)\tRESTORED\tRESULT\n"
        ),
        "{out}"
    );
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("local\tdev\t") && l.ends_with("\tyes\tok")),
        "{out}"
    );

    // Admin verbs print what they changed.
    let (code, out, err) = run(
        dir,
        &["admin", "issuer", "list", "--environment", "production"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\tactive\t"), "{out}");
    let (code, out, _) = run(
        dir,
        &["admin", "issuer", "stage", "--environment", "production"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("\tstaged\t"), "{out}");
    let (code, out, _) = run(
        dir,
        &["admin", "issuer", "activate", "--environment", "production"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("\tactive\t"), "{out}");
    let (code, out, _) = run(
        dir,
        &[
            "admin",
            "key",
            "rotate",
            "--environment",
            "production",
            "--alias",
            "release",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("release@v2*"), "{out}");
    let (code, out, _) = run(
        dir,
        &["admin", "trust", "list", "--environment", "production"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("https://oidc.meshsign.dev\tenabled"), "{out}");
    // A refused admin verb exits 1 naming the check.
    let (code, _, err) = run(
        dir,
        &[
            "admin",
            "issuer",
            "retire",
            "--environment",
            "production",
            "--id",
            "nope",
        ],
    );
    assert_eq!(code, 3, "a refusal: {err}");
    assert!(err.contains("not_found"), "{err}");

    // `meshsign sign` revokes its own certificate when it finishes.
    std::fs::write(dir.join("f"), b"x").unwrap();
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "f",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let serial = err
        .split("serial ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .to_string();
    let (code, export, _) = run(dir, &["admin", "audit", "export"]);
    assert_eq!(code, 0);
    let revoked_self = export.lines().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["rpc"] == "RevokeSelf" && v["decision"] == "allow" && v["cert_serial"] == serial.as_str()
    });
    assert!(
        revoked_self,
        "the finished job revoked its own certificate {serial}"
    );

    // SIGHUP: narrow `release` in staging to tags; the running site picks it up.
    let site_toml = dir.join("site/site.toml");
    let text = std::fs::read_to_string(&site_toml).unwrap();
    let narrowed = text.replacen(
        r#"access = { repositories = ["*"], refs = ["*"] }"#,
        r#"access = { repositories = ["*"], refs = ["refs/tags/*"] }"#,
        1,
    );
    assert_ne!(narrowed, text);
    std::fs::write(&site_toml, narrowed).unwrap();
    let pid = site.0.id().to_string();
    common::signal(&pid, "-HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, _, err) = run(
            dir,
            &["sign", "--environment", "staging", "--key", "release", "f"],
        );
        if code == 3 && err.contains("key_access") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied: {err}"
        );
    }
    // The reload is in `admin status` with its diff; a file can be proposed for review by its
    // SHA-256 (a dev site reviews nothing, but the proposal is made the same way).
    let (code, status, err) = run(dir, &["admin", "status", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["last_reload"]["applied"], true, "{status}");
    assert!(
        status["last_reload"]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["at"] == "staging.key[release].refs" && c["widens"] == false),
        "{status}"
    );
    let (code, proposal, err) = run(
        dir,
        &[
            "admin",
            "review",
            "propose-config",
            "--file",
            site_toml.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let proposal: serde_json::Value = serde_json::from_str(&proposal).unwrap();
    assert_eq!(proposal["operation"], "Reload", "{proposal}");
    assert_eq!(proposal["state"], "pending", "{proposal}");
    // A broken file is refused and the running config stays: the narrowed staging rule still
    // holds and production still signs.
    std::fs::write(&site_toml, "this is not toml").unwrap();
    common::signal(&pid, "-HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("reload refused")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken reload was not reported"
        );
        std::thread::yield_now();
    }
    let (code, _, err) = run(
        dir,
        &["sign", "--environment", "staging", "--key", "release", "f"],
    );
    assert!(code == 3 && err.contains("key_access"), "{err}");
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "f",
        ],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn audit_export_verify_receipt_and_logs_without_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("meshsignd.log");
    let site = common::start_dev_logging(&dir.join("site"), Some(&log));

    let (code, token, _) = run(dir, &["dev", "token", "--environment", "staging"]);
    assert_eq!(code, 0);
    std::fs::write(dir.join("tok"), token.trim()).unwrap();
    std::fs::write(dir.join("app.bin"), vec![3u8; 10_000]).unwrap();
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "staging",
            "--key",
            "release",
            "--token-file",
            "tok",
            "app.bin",
        ],
    );
    assert_eq!(code, 0, "{err}");

    let (code, pem, _) = run(dir, &["admin", "audit", "public-key"]);
    assert_eq!(code, 0);
    std::fs::write(dir.join("audit.pem"), pem).unwrap();
    let (code, export, err) = run(dir, &["admin", "audit", "export"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(dir.join("audit.jsonl"), &export).unwrap();
    let (code, out, err) = run(
        dir,
        &["audit", "verify", "audit.jsonl", "--audit-key", "audit.pem"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": OK"), "{out}");
    let (code, out, err) = run(
        dir,
        &[
            "verify",
            "app.bin",
            "--receipt",
            "--audit-log",
            "audit.jsonl",
            "--audit-key",
            "audit.pem",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("receipt OK"), "{out}");

    // One edited line: exit 1, naming its seq.
    let mut lines: Vec<String> = export.lines().map(str::to_string).collect();
    let victim = lines
        .iter()
        .position(|l| l.contains("\"rpc\":\"Sign\""))
        .unwrap();
    let seq = serde_json::from_str::<serde_json::Value>(&lines[victim]).unwrap()["seq"]
        .as_u64()
        .unwrap();
    lines[victim] = lines[victim].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    std::fs::write(dir.join("tampered.jsonl"), lines.join("\n")).unwrap();
    let (code, _, err) = run(
        dir,
        &[
            "audit",
            "verify",
            "tampered.jsonl",
            "--audit-key",
            "audit.pem",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains(&format!("at seq {seq}")), "{err}");

    // The site's logs carry the audit fields as JSON, with the jti, never the token.
    drop(site);
    let logs = std::fs::read_to_string(&log).unwrap();
    let jti = {
        let payload = token.trim().split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["jti"].as_str().unwrap().to_string()
    };
    assert!(logs.contains(&jti), "the jti is logged");
    assert!(
        logs.contains("\"ttl_remaining_sec\""),
        "sign decisions log ttl_remaining_sec"
    );
    // As a number, the way the audit record has it (not Rust's `Some(…)` in a string).
    let ttl = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["ttl_remaining_sec"].as_i64());
    assert!(
        ttl.is_some_and(|t| t > 0),
        "ttl_remaining_sec is a JSON number"
    );
    assert!(!logs.contains("Some("), "no Rust Option text in the logs");
    for part in token.trim().split('.') {
        assert!(!logs.contains(part), "a token part leaked into the logs");
    }
}

#[test]
fn p12_code_signing_identity_imports_one_way() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let ossl = |args: &[&str]| common::openssl(dir, args);
    // A self-signed RSA-2048 code-signing identity, exported as .p12 the way Keychain does.
    common::code_signing_p12(dir, "/CN=Apple Distribution: Acme (TEAM123)");
    std::fs::remove_file(dir.join("id.key")).unwrap();

    let out = Command::new(common::meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args([
            "admin",
            "key",
            "import",
            "--environment",
            "production",
            "--alias",
            "apple",
            "--p12",
            "id.p12",
        ])
        .args(["--repository", "*", "--ref", "*"])
        .env("MESHSIGN_P12_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("apple\trsa-2048-pkcs1-sha256"),
        "{listing}"
    );
    // A wrong password is refused with a clear error.
    let out = Command::new(common::meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args([
            "admin",
            "key",
            "import",
            "--environment",
            "production",
            "--alias",
            "apple2",
            "--p12",
            "id.p12",
        ])
        .env("MESHSIGN_P12_PASSWORD", "wrong")
        .output()
        .unwrap();
    // A wrong password is the caller's input (2), not a failed verification (1).
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong password"));

    // Signing with it: the signature verifies under the .p12's certificate.
    std::fs::write(dir.join("cd.bin"), b"CodeDirectory").unwrap();
    let (code, _, err) = run(
        dir,
        &[
            "sign",
            "--environment",
            "production",
            "--key",
            "apple",
            "cd.bin",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let pubkey = ossl(&["x509", "-in", "id.pem", "-pubkey", "-noout"]);
    std::fs::write(dir.join("id.pub"), pubkey).unwrap();
    ossl(&[
        "dgst",
        "-sha256",
        "-verify",
        "id.pub",
        "-signature",
        "cd.bin.sig",
        "cd.bin",
    ]);
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cd.bin.sig.json")).unwrap()).unwrap();
    assert_eq!(
        bundle["certificate_chain_pem"].as_array().unwrap().len(),
        1,
        "the identity's certificate comes back"
    );
    let (code, out, _) = run(dir, &["verify", "cd.bin"]);
    assert_eq!(code, 0, "{out}");
}

/// The CI templates in deploy/ci parse as YAML, and every `meshsign` command line in them names
/// a subcommand and flags that exist (`meshsign <subcommand> --help`).
#[test]
fn the_ci_templates_parse_and_call_commands_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ci");
    let files = [
        "github/meshsign-sign/action.yml",
        "github/ios-release.yml",
        "gitlab/meshsign.gitlab-ci.yml",
        "buildkite/pipeline.yml",
    ];
    let mut checked = 0;
    for f in files {
        let path = root.join(f);
        // Every command the document runs (`run`, `script`, `before_script`, `commands`,
        // `command` values), one per line (PyYAML: what CI systems parse).
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, yaml\n\
                 CMD = {'run', 'script', 'before_script', 'after_script', 'commands', 'command'}\n\
                 def walk(v, cmd):\n\
                 \x20   if isinstance(v, dict):\n\
                 \x20       [walk(x, k in CMD) for k, x in v.items()]\n\
                 \x20   elif isinstance(v, list):\n\
                 \x20       [walk(x, cmd) for x in v]\n\
                 \x20   elif isinstance(v, str) and cmd:\n\
                 \x20       print(v)\n\
                 walk(yaml.safe_load(open(sys.argv[1])), False)",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in text.lines() {
            // A command may follow a shell prefix (`sh -c '`, `cd build &&`): take each
            // `meshsign ` occurrence.
            for (i, _) in line.match_indices("meshsign ") {
                // A command starts the line, or follows `'` (sh -c '…'), `&& `, `| ` or `-- `
                // (`meshsign exec … -- meshsign sign …`); prose ("the region's meshsign site")
                // does not count.
                let before = line[..i].trim_end_matches(' ');
                if !(before.trim().is_empty()
                    || before.ends_with('\'')
                    || before.ends_with("--")
                    || before.ends_with("&&")
                    || before.ends_with('|'))
                {
                    continue;
                }
                // Its own words: up to `--` (exec's command), `&&`, `|` or a quoted string.
                let words: Vec<&str> = line[i + "meshsign ".len()..]
                    .split_whitespace()
                    .take_while(|w| !matches!(*w, "--" | "&&" | "|") && !w.starts_with('\''))
                    .collect();
                let sub: Vec<&str> = words
                    .iter()
                    .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                    .take(2)
                    .copied()
                    .filter(|w| !w.starts_with('-'))
                    .collect();
                let mut help = std::process::Command::new(common::meshsign());
                help.args(&sub).arg("--help");
                let h = help.output().unwrap();
                let h_text = String::from_utf8_lossy(&h.stdout).into_owned();
                assert!(
                    h.status.success(),
                    "{f}: `meshsign {}` does not exist",
                    sub.join(" ")
                );
                for flag in words.iter().filter(|w| w.starts_with("--")) {
                    assert!(
                        h_text.contains(&format!("{flag} "))
                            || h_text.contains(&format!("{flag}\n")),
                        "{f}: `meshsign {}` has no {flag}",
                        sub.join(" ")
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked} command lines checked");
}

#[test]
fn admin_status_shows_the_site_at_a_glance_as_a_table_and_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _site = start_dev(&dir);
    let cfg = dir.join("client.toml");
    let out = common::meshsign_in(&dir, &cfg, &["admin", "status", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["writable"], true);
    assert_eq!(v["store_engine"], "sled");
    assert!(v["audit_head_seq"].as_u64().unwrap() >= 1);
    let envs = v["environments"].as_array().unwrap();
    assert_eq!(envs.len(), 2);
    for e in envs {
        assert_eq!(e["runner_cas"][0]["state"], "active", "{e}");
        assert_eq!(e["keys"][0]["alias"], "release");
        assert_eq!(e["keys"][0]["newest_version"], 1);
        assert!(e["keys"][0]["newest_age_days"].as_f64().unwrap() < 1.0);
        assert_eq!(e["trust_policies"][0]["enabled"], true);
    }
    let out = common::meshsign_in(&dir, &cfg, &["admin", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WRITABLE"), "{text}");
    assert!(
        text.contains("ENVIRONMENT\tKIND\tNAME\tSTATE\tDETAIL"),
        "a header: {text}"
    );
    assert!(text.contains("\tkey\trelease@v1\tactive\t"), "{text}");
}

#[test]
fn completions_and_man_pages_are_generated_without_a_config() {
    for (shell, marker) in [
        ("bash", "_meshsign()"),
        ("zsh", "#compdef meshsign"),
        ("fish", "complete -c meshsign"),
    ] {
        let out = Command::new(meshsign())
            .args(["completions", shell])
            .env_remove("MESHSIGN_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
        assert!(
            text.contains("preflight") && text.contains("codesign"),
            "{shell}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(meshsign())
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(dir.path().join("meshsign.1")).unwrap();
    assert!(page.contains(".TH meshsign 1"), "{}", &page[..200]);
    assert!(dir.path().join("meshsign-admin-status.1").exists());
}

#[test]
fn data_commands_print_a_header_or_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    std::fs::write(dir.join("a.txt"), b"artifact").unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let (code, out, err) = run(dir, &a);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(out.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let signed = json(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "a.txt",
    ]);
    assert_eq!(signed["file"], "a.txt");
    assert!(signed["audit_seq"].as_u64().unwrap() > 0);
    let verified = json(&["verify", "a.txt"]);
    assert_eq!(
        (&verified["ok"], &verified["key_id"]),
        (&serde_json::json!(true), &signed["key_id"])
    );
    let material = json(&[
        "verification-material",
        "--environment",
        "staging",
        "--key",
        "release",
    ]);
    assert!(
        material[0]["public_key_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN PUBLIC KEY")
    );
    assert!(json(&["fingerprint"])["fingerprint"].as_str().is_some());
    for (args, first_column) in [
        (
            &["admin", "key", "list", "--environment", "staging"][..],
            "alias",
        ),
        (
            &["admin", "issuer", "list", "--environment", "staging"],
            "id",
        ),
        (
            &["admin", "trust", "list", "--environment", "staging"],
            "issuer",
        ),
        (&["admin", "revocations"], ""),
        (&["admin", "review", "list"], ""),
    ] {
        let v = json(args);
        let items = v.as_array().unwrap_or_else(|| panic!("{args:?}: {v}"));
        if !first_column.is_empty() {
            assert!(items[0].get(first_column).is_some(), "{args:?}: {v}");
        }
        // The table form starts with a header line.
        let (code, text, _) = run(dir, args);
        assert_eq!(code, 0);
        let header = text.lines().next().unwrap();
        assert!(
            header.chars().all(|c| !c.is_ascii_lowercase()),
            "{args:?}: header {header:?}"
        );
    }
}

/// Every `meshsign`/`meshsignd` command line in docs/runbook.md's shell blocks exists: run with
/// `--help` appended, clap refuses an unknown subcommand or flag before it prints help.
#[test]
fn the_runbooks_commands_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbook.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let bin_dir = common::meshsign().parent().unwrap().to_path_buf();
    let mut in_sh = false;
    let mut checked = 0;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || !(line.starts_with("meshsign ") || line.starts_with("meshsignd ")) {
            continue;
        }
        // Up to `--` (the command `exec` runs), then `--help`.
        let cmd = line.split(" -- ").next().unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} --help"))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("MESHSIGN_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runbook: `{line}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 15, "{checked} commands");
}

/// `meshsign sign --message` with Ed25519 and P-384 keys, and `meshsign verify` offline.
#[test]
fn message_keys_sign_files_as_messages_and_verify_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    std::fs::write(dir.join("notes.txt"), b"release notes 1.4.2").unwrap();
    for (alias, alg) in [("ed", "ed25519"), ("p384", "ecdsa-p384-sha384")] {
        let (code, _, err) = run(
            dir,
            &[
                "admin",
                "key",
                "create",
                "--environment",
                "staging",
                "--alias",
                alias,
                "--algorithm",
                alg,
                "--repository",
                "*",
                "--ref",
                "*",
            ],
        );
        assert_eq!(code, 0, "{err}");
        // A digest is not what this key signs: refused, exit 3.
        let (code, _, err) = run(
            dir,
            &[
                "sign",
                "--environment",
                "staging",
                "--key",
                alias,
                "notes.txt",
            ],
        );
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("purpose"), "{err}");
        let (code, out, err) = run(
            dir,
            &[
                "sign",
                "--environment",
                "staging",
                "--key",
                alias,
                "--message",
                "notes.txt",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("{alias}@v1")), "{out}");
        let (code, out, err) = run(dir, &["verify", "notes.txt"]);
        assert_eq!(code, 0, "{alias}: {out}{err}");
        // The same as a Sigstore bundle: meshsign verifies it with the pinned key, and so does
        // openssl over the file's bytes (Ed25519 pure, P-384 over SHA-384).
        let (code, _, err) = run(
            dir,
            &[
                "sign",
                "--environment",
                "staging",
                "--key",
                alias,
                "--message",
                "--format",
                "sigstore",
                "notes.txt",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let (code, pem, err) = run(
            dir,
            &[
                "verification-material",
                "--environment",
                "staging",
                "--key",
                alias,
            ],
        );
        assert_eq!(code, 0, "{err}");
        let pem: String = pem
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.join("pub.pem"), pem).unwrap();
        let (code, audit, err) = run(
            dir,
            &[
                "verification-material",
                "--environment",
                "staging",
                "--audit-key",
            ],
        );
        assert_eq!(code, 0, "{err}");
        std::fs::write(dir.join("audit.pem"), audit).unwrap();
        let (code, out, err) = run(
            dir,
            &[
                "verify",
                "notes.txt",
                "--bundle",
                "notes.txt.sigstore.json",
                "--public-key",
                "pub.pem",
                "--receipt",
                "--audit-key",
                "audit.pem",
            ],
        );
        assert_eq!(code, 0, "{alias}: {out}{err}");
        assert!(out.contains("receipt OK"), "{out}");
        let bundle: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("notes.txt.sigstore.json")).unwrap())
                .unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(bundle["messageSignature"]["signature"].as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join("notes.sig"), sig).unwrap();
        let args: &[&str] = if alg == "ed25519" {
            &[
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                "pub.pem",
                "-rawin",
                "-in",
                "notes.txt",
                "-sigfile",
                "notes.sig",
            ]
        } else {
            &[
                "dgst",
                "-sha384",
                "-verify",
                "pub.pem",
                "-signature",
                "notes.sig",
                "notes.txt",
            ]
        };
        let out = common::openssl(dir, args);
        assert!(
            out.contains("Verified") || out.contains("Signature Verified"),
            "{out}"
        );
        // One changed byte: exit 1.
        std::fs::write(dir.join("notes.txt"), b"release notes 1.4.3").unwrap();
        let (code, _, _) = run(dir, &["verify", "notes.txt"]);
        assert_eq!(code, 1);
        std::fs::write(dir.join("notes.txt"), b"release notes 1.4.2").unwrap();
    }
}

/// `admin audit export` writes what has arrived in large writes, not one `write(2)` per line
/// (strace counts its writes to stdout), and `--follow` still shows each new entry as it is
/// written (what is buffered goes out whenever the next line is not there yet).
#[test]
fn audit_export_writes_in_large_writes_and_follow_shows_each_new_entry() {
    use std::io::BufRead as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let sign = |name: &str| {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
        let (code, token, _) = run(dir, &["dev", "token", "--environment", "staging"]);
        assert_eq!(code, 0);
        std::fs::write(dir.join("tok"), token.trim()).unwrap();
        let args = ["sign", "--environment", "staging", "--key", "release"];
        let (code, _, err) = run(dir, &[&args[..], &["--token-file", "tok", name]].concat());
        assert_eq!(code, 0, "{err}");
    };
    for i in 0..3 {
        sign(&format!("a{i}.bin"));
    }

    let trace = dir.join("export.strace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=write,writev", "-o"])
        .arg(&trace)
        .arg(meshsign())
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args(["admin", "audit", "export"])
        .env_remove("MESHSIGN_CONFIG")
        .output()
        .expect("strace (installed by .ci/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8(out.stdout).unwrap().lines().count();
    let trace = std::fs::read_to_string(&trace).unwrap();
    let to_stdout = trace
        .lines()
        .filter(|l| l.contains(" write(1,") || l.contains(" writev(1,"))
        .count();
    assert!(lines >= 10, "{lines} lines exported");
    assert!(
        (1..=2).contains(&to_stdout),
        "{lines} lines took {to_stdout} writes to stdout:\n{trace}"
    );

    // Following: every line so far, then the entries of a signature made afterwards.
    let mut child = Command::new(meshsign())
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args(["admin", "audit", "export", "--follow"])
        .env_remove("MESHSIGN_CONFIG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait = std::time::Duration::from_secs(30);
    for n in 0..lines {
        rx.recv_timeout(wait)
            .unwrap_or_else(|_| panic!("line {n} of {lines} never came"));
    }
    sign("late.bin");
    let late = loop {
        let line = rx
            .recv_timeout(wait)
            .expect("the late signature's entry never reached a following export");
        if line.contains("\"rpc\":\"Sign\"") {
            break line;
        }
    };
    assert!(late.contains("\"decision\":\"allow\""), "{late}");
    let _ = child.kill();
    let _ = child.wait();
}
