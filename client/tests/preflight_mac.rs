//! Issue 29: preflight finds what Mac runners really carry — PKCS#12 identities (with and
//! without a password), App Store Connect keys, kubeconfigs in JSON or without `kind: Config`,
//! the CI runner's own credential files, fastlane secrets — and stops crying wolf: build
//! workspaces and dependency caches are skipped, vendors' example keys are not findings, and
//! `--allow` silences exactly what it names. Fixtures are made here with openssl.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;

use common::meshsign;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn preflight(home: &Path, extra: &[&str]) -> (i32, Vec<serde_json::Value>) {
    let out = Command::new(meshsign())
        .args(["preflight", "--no-env", "--json"])
        .args(extra)
        .arg(home)
        .env_remove("MESHSIGN_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for secret in ["hunter2", "s3cret-match", "cookie-value"] {
        assert!(!text.contains(secret), "preflight printed a secret: {text}");
    }
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap_or_default(),
    )
}

fn kind_at<'a>(findings: &'a [serde_json::Value], path_end: &str) -> Vec<&'a str> {
    findings
        .iter()
        .filter(|f| f["path"].as_str().unwrap().ends_with(path_end))
        .map(|f| f["kind"].as_str().unwrap())
        .collect()
}

#[test]
fn mac_runner_secrets_are_found_and_workspaces_caches_and_examples_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, home) = (tmp.path().join("work"), tmp.path().join("home"));
    for d in [
        "",
        "runner",
        ".kube",
        "fastlane",
        ".fastlane/spaceship/ci@acme.test",
    ] {
        std::fs::create_dir_all(home.join(d)).unwrap();
    }
    std::fs::create_dir_all(&work).unwrap();
    let w = |p: &str, text: &str| std::fs::write(home.join(p), text).unwrap();
    let (key, cert) = (work.join("k.pem"), work.join("c.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-subj",
        "/CN=ci",
        "-days",
        "1",
    ]);
    // PKCS#12 without a password, and with one (named without .p12: found by parsing).
    openssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        key.to_str().unwrap(),
        "-in",
        cert.to_str().unwrap(),
        "-passout",
        "pass:",
        "-out",
        home.join("dist.p12").to_str().unwrap(),
    ]);
    openssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        key.to_str().unwrap(),
        "-in",
        cert.to_str().unwrap(),
        "-passout",
        "pass:hunter2",
        "-out",
        home.join("identity.bin").to_str().unwrap(),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        home.join("AuthKey_ABC123DEFG.p8").to_str().unwrap(),
    ]);
    w(
        ".kube/config.json",
        r#"{"apiVersion": "v1", "clusters": [{"name": "c"}], "users": [{"name": "u", "user": {"token": "hunter2"}}]}"#,
    );
    w(
        "kubeconfig.yaml",
        "clusters:\n- name: c\nusers:\n- name: u\n  user:\n    password: hunter2\n",
    );
    w(
        "runner/.credentials",
        "{\"scheme\": \"OAuth\", \"data\": {\"clientId\": \"x\"}}",
    );
    w("runner/.credentials_rsaparams", "{\"d\": \"hunter2\"}");
    w(
        "fastlane/.env.default",
        "MATCH_PASSWORD=s3cret-match\nAPP_ID=com.acme\n",
    );
    w(".fastlane/spaceship/ci@acme.test/cookie", "cookie-value");

    // What is not the runner's: a job's checkout, caches, vendors' documentation keys.
    for d in [
        "_work/app/node_modules/aws-sdk",
        ".cargo/registry/src/rsa-0.9",
        "Library/DerivedData/x",
    ] {
        std::fs::create_dir_all(home.join(d)).unwrap();
    }
    let aws = format!("const id = '{}{}';\n", "AKIA", "IOSFODNN7EXAMPLE");
    w("_work/app/node_modules/aws-sdk/doc.js", &aws);
    std::fs::copy(&key, home.join(".cargo/registry/src/rsa-0.9/test.pem")).unwrap();
    std::fs::copy(&key, home.join("Library/DerivedData/x/fixture.pem")).unwrap();
    w(
        "aws-notes.md",
        &format!("example: {}{}\n", "AKIA", "IOSFODNN7EXAMPLE"),
    );

    let (code, findings) = preflight(&home, &[]);
    assert_eq!(code, 1, "{findings:?}");
    for (path, kind) in [
        ("dist.p12", "pkcs12-without-password"),
        ("identity.bin", "pkcs12-identity"),
        ("AuthKey_ABC123DEFG.p8", "app-store-connect-key"),
        ("config.json", "kubeconfig-credentials"),
        ("kubeconfig.yaml", "kubeconfig-credentials"),
        (".credentials", "ci-runner-credentials"),
        (".credentials_rsaparams", "ci-runner-credentials"),
        (".env.default", "fastlane-secret"),
        ("cookie", "fastlane-session"),
    ] {
        assert_eq!(kind_at(&findings, path), vec![kind], "{path}: {findings:?}");
    }
    for quiet in ["doc.js", "test.pem", "fixture.pem", "aws-notes.md"] {
        assert!(
            kind_at(&findings, quiet).is_empty(),
            "{quiet}: {findings:?}"
        );
    }
    // The caches are scanned when asked.
    let (_, all) = preflight(&home, &["--no-default-excludes"]);
    assert_eq!(kind_at(&all, "test.pem"), vec!["unencrypted-private-key"]);

    // --allow: a glob and a fingerprint silence exactly those findings.
    let dist = findings
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("dist.p12"))
        .unwrap();
    let allow = tmp.path().join("allow.txt");
    std::fs::write(
        &allow,
        format!(
            "# the runner image's own fixtures\n{}/runner/*\n{}\n",
            home.display(),
            dist["fingerprint"].as_str().unwrap()
        ),
    )
    .unwrap();
    let (code, left) = preflight(&home, &["--allow", allow.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(left.len(), findings.len() - 3, "{left:?}");
    assert!(kind_at(&left, "dist.p12").is_empty());
    assert!(kind_at(&left, ".credentials").is_empty());
    assert_eq!(kind_at(&left, "identity.bin"), vec!["pkcs12-identity"]);
}
