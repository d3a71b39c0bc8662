//! Issue 28 from the command line, as a platform team would use it: `meshsign runner init`
//! on the runner, `meshsign admin runner register` by an operator, `meshsign sign` with the
//! device key named in client.toml, against `meshsignd dev` switched to registered runners by
//! a SIGHUP reload; `fingerprint` and `preflight` say whether the runner has a device key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{meshsign, start_dev};

fn run(dir: &Path, cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("MESHSIGN_CONFIG")
        .env_remove("MESHSIGN_DEVICE_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_runner_with_a_registered_device_key_signs_where_claimed_fingerprints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let site = start_dev(&dir.join("site"));
    let plain = dir.join("site/client.toml");
    std::fs::write(dir.join("f"), b"artifact").unwrap();

    // Without a device key: preflight warns (and passes), fingerprint says "claimed".
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let (code, _, err) = run(dir, &plain, &["preflight", "--no-env", "empty"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no device key"), "{err}");
    let (_, _, err) = run(dir, &plain, &["fingerprint"]);
    assert!(err.contains("claimed, not proven"), "{err}");

    // The runner makes its key and prints the request.
    let (code, out, err) = run(
        dir,
        &plain,
        &[
            "runner",
            "init",
            "--backend",
            "file",
            "--dir",
            "runner",
            "--instance",
            "ci-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let request: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(request["request"]["backend"], "file");
    assert_eq!(request["request"]["instance"], "ci-1");
    // A second init of the same instance is refused (exit 2): it would orphan the key.
    let (code, _, err) = run(
        dir,
        &plain,
        &["runner", "init", "--backend", "file", "--dir", "runner"],
    );
    assert_eq!(code, 2, "{err}");
    let text = std::fs::read_to_string(&plain).unwrap();
    let with_key = dir.join("site/client-device.toml");
    std::fs::write(
        &with_key,
        format!("{text}\n[runner]\ndevice_key = \"../runner/device.json\"\n"),
    )
    .unwrap();
    let (_, out, _) = run(dir, &with_key, &["fingerprint", "--output", "json"]);
    let fp: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        fp["source"]
            .as_str()
            .unwrap()
            .starts_with("device key (file"),
        "{fp}"
    );
    let fp = fp["fingerprint"].as_str().unwrap().to_string();

    // The site now wants registered runners in staging (a reload that narrows trust).
    let site_toml = dir.join("site/site.toml");
    let text = std::fs::read_to_string(&site_toml).unwrap();
    let narrowed = text.replacen("runners = \"claimed\"", "runners = \"registered\"", 1);
    assert_ne!(narrowed, text);
    std::fs::write(&site_toml, narrowed).unwrap();
    common::signal(site.0.id(), "-HUP");
    let sign = ["sign", "--environment", "staging", "--key", "release", "f"];
    // The reload is applied when a claimed fingerprint is refused.
    let mut err = String::new();
    let applied = common::wait_until(Duration::from_secs(10), || {
        let (code, _, e) = run(dir, &plain, &sign);
        err = e;
        code == 3 && err.contains("runner_proof")
    });
    assert!(applied, "reload not applied: {err}");
    assert!(err.contains("meshsign runner init"), "{err}");

    // With the key, but unregistered: refused by name.
    let (code, _, err) = run(dir, &with_key, &sign);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("runner_unregistered"), "{err}");

    // The operator registers it; the runner signs; the audit entry names the key's fingerprint.
    let (code, out, err) = run(
        dir,
        &plain,
        &[
            "admin",
            "runner",
            "register",
            "--request",
            "runner/registration.json",
            "--label",
            "pool-a",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&fp), "{out}");
    let (code, _, err) = run(dir, &with_key, &sign);
    assert_eq!(code, 0, "{err}");
    let entries = common::audit_entries(dir, &plain);
    let signed = entries
        .iter()
        .rev()
        .find(|e| e["rpc"] == "Sign" && e["decision"] == "allow")
        .unwrap();
    assert_eq!(signed["runner_fingerprint"], fp.as_str());
    let (code, out, _) = run(dir, &plain, &["admin", "runner", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&fp) && out.contains("registered"), "{out}");

    // Revoked: refused again.
    let (code, _, err) = run(
        dir,
        &plain,
        &["admin", "runner", "revoke", &fp, "--reason", "lost"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(dir, &with_key, &sign);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("revoked"), "{err}");
}
