//! One enrollment per job: `meshsign exec` and `meshsign agent start`/`stop` with the real
//! binaries. Every signing step uses the one certificate; the audit shows one Enroll and one
//! RevokeSelf; every signature verifies; only the agent's user can reach its socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;

use common::{meshsign, start_dev};

/// (rpc, cert_serial) of every audit entry.
fn audit_rpcs(dir: &Path, cfg: &Path) -> Vec<(String, String)> {
    common::audit_entries(dir, cfg)
        .into_iter()
        .map(|v| {
            (
                v["rpc"].as_str().unwrap_or_default().to_string(),
                v["cert_serial"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn count(rpcs: &[(String, String)], rpc: &str) -> usize {
    rpcs.iter().filter(|(r, _)| r == rpc).count()
}

#[test]
fn exec_enrolls_once_for_every_step_and_revokes_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let me = meshsign();
    for f in ["a", "b", "c"] {
        std::fs::write(tmp.path().join(f), f).unwrap();
    }
    // The job: three signing steps (separate processes), and a look at the socket's mode.
    let script = format!(
        "set -e\n\
         test -S \"$MESHSIGN_AGENT_SOCK\"\n\
         stat -c %a \"$MESHSIGN_AGENT_SOCK\" > sock.mode\n\
         stat -c %a \"$(dirname \"$MESHSIGN_AGENT_SOCK\")\" > dir.mode\n\
         echo \"$MESHSIGN_AGENT_SOCK\" > sock.path\n\
         for f in a b c; do {me} --config {cfg} sign --environment staging --key release $f; done\n\
         {me} --config {cfg} sign --environment staging --key release --format sigstore a\n\
         {me} --config {cfg} attest --environment staging --key attest b c\n",
        me = me.display(),
        cfg = cfg.display()
    );
    std::fs::write(tmp.path().join("job.sh"), script).unwrap();
    let before = audit_rpcs(tmp.path(), &cfg);
    let out = common::meshsign_in(
        tmp.path(),
        &cfg,
        &["exec", "--environment", "staging", "--", "sh", "job.sh"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = audit_rpcs(tmp.path(), &cfg);
    let new = &after[before.len()..];
    assert_eq!(
        count(new, "Enroll"),
        1,
        "one enrollment for the whole job: {new:?}"
    );
    assert_eq!(count(new, "Sign"), 4);
    // One statement: its decision, and the entry naming its transparency-log leaf (issue 27).
    assert_eq!(count(new, "Attest"), 2, "statements through the agent too");
    assert!(tmp.path().join("b.intoto.sigstore.json").exists());
    assert_eq!(count(new, "RevokeSelf"), 1, "revoked at the end");
    assert!(tmp.path().join("a.sigstore.json").exists());
    assert!(tmp.path().join("b.intoto.json").exists());
    let serials: std::collections::BTreeSet<&str> = new
        .iter()
        .filter(|(r, _)| r == "Sign" || r == "Attest" || r == "RevokeSelf")
        .map(|(_, s)| s.as_str())
        .collect();
    assert_eq!(
        serials.len(),
        1,
        "one certificate for every step: {serials:?}"
    );
    for f in ["a", "b", "c"] {
        let v = Command::new(&me)
            .args(["verify", f])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("sock.mode"))
            .unwrap()
            .trim(),
        "600"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("dir.mode"))
            .unwrap()
            .trim(),
        "700"
    );
    let sock = std::fs::read_to_string(tmp.path().join("sock.path")).unwrap();
    assert!(
        !Path::new(sock.trim()).exists(),
        "the socket is removed at the end"
    );

    // The command's status is passed on, and the certificate is still revoked.
    let before = audit_rpcs(tmp.path(), &cfg);
    let out = common::meshsign_in(
        tmp.path(),
        &cfg,
        &[
            "exec",
            "--environment",
            "staging",
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    let after = audit_rpcs(tmp.path(), &cfg);
    assert_eq!(count(&after[before.len()..], "RevokeSelf"), 1);
}

#[test]
fn agent_start_serves_separate_steps_until_agent_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let me = meshsign();
    let before = audit_rpcs(tmp.path(), &cfg);
    let out = common::meshsign_in(
        tmp.path(),
        &cfg,
        &["agent", "start", "--environment", "staging"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    assert!(
        vars.iter().any(|(k, _)| k == "MESHSIGN_AGENT_SOCK"),
        "{vars:?}"
    );
    // Two steps, two processes, no token.
    for f in ["x", "y"] {
        std::fs::write(tmp.path().join(f), f).unwrap();
        let o = Command::new(&me)
            .arg("--config")
            .arg(&cfg)
            .args(["sign", "--environment", "staging", "--key", "release", f])
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A step that asks for another environment is told so, not enrolled.
    let o = Command::new(&me)
        .arg("--config")
        .arg(&cfg)
        .args([
            "sign",
            "--environment",
            "production",
            "--key",
            "release",
            "x",
        ])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let stop = Command::new(&me)
        .args(["agent", "stop"])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let after = audit_rpcs(tmp.path(), &cfg);
    let new = &after[before.len()..];
    assert_eq!(
        (
            count(new, "Enroll"),
            count(new, "Sign"),
            count(new, "RevokeSelf")
        ),
        (1, 2, 1),
        "{new:?}"
    );
    // After stop, the socket is gone: a step cannot sign any more.
    let sock = vars
        .iter()
        .find(|(k, _)| k == "MESHSIGN_AGENT_SOCK")
        .unwrap()
        .1
        .clone();
    let gone = common::wait_until(std::time::Duration::from_secs(5), || {
        !Path::new(&sock).exists()
    });
    assert!(gone, "the agent removed its socket");
    // A step that still has the variable is told the agent is gone and what to do — once, not
    // as a repeated transport error — and is not enrolled behind the operator's back.
    let o = Command::new(&me)
        .arg("--config")
        .arg(&cfg)
        .args(["sign", "--environment", "staging", "--key", "release", "x"])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("the job agent is gone"), "{err}");
    assert!(err.contains("meshsign agent start"), "{err}");
    assert!(!err.contains("transport error"), "{err}");
    assert_eq!(err.matches("os error").count(), 0, "{err}");
    // A killed agent leaves its socket file behind with nobody listening: the same answer
    // (found by the connection's error kind, refused, not by its text).
    let left = tmp.path().join("killed-agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&left).unwrap());
    assert!(left.exists());
    let o = Command::new(&me)
        .arg("--config")
        .arg(&cfg)
        .args(["sign", "--environment", "staging", "--key", "release", "x"])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("MESHSIGN_AGENT_SOCK", &left)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("the job agent is gone (nobody listens on its socket)"),
        "{err}"
    );
    assert_eq!(err.matches("os error").count(), 0, "{err}");
    let later = audit_rpcs(tmp.path(), &cfg);
    for rpc in ["Enroll", "Sign"] {
        assert_eq!(
            count(&later, rpc),
            count(&after, rpc),
            "no {rpc} reached the site"
        );
    }
}

#[test]
fn the_agent_renews_before_the_certificate_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let me = meshsign();
    std::fs::write(tmp.path().join("a"), "a").unwrap();
    std::fs::write(tmp.path().join("b"), "b").unwrap();
    // A 4-second certificate and a job of 6 seconds: the second step signs only if the agent
    // renewed (by half of each lifetime), with no token.
    let script = format!(
        "set -e\n{me} --config {cfg} sign --environment staging --key release a\nsleep 6\n{me} --config {cfg} sign --environment staging --key release b\n",
        me = me.display(),
        cfg = cfg.display()
    );
    std::fs::write(tmp.path().join("long.sh"), script).unwrap();
    let before = audit_rpcs(tmp.path(), &cfg);
    let out = common::meshsign_in(
        tmp.path(),
        &cfg,
        &[
            "exec",
            "--environment",
            "staging",
            "--ttl",
            "4",
            "--",
            "sh",
            "long.sh",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = audit_rpcs(tmp.path(), &cfg);
    let new = &after[before.len()..];
    assert_eq!(count(new, "Enroll"), 1, "{new:?}");
    assert!(count(new, "Renew") >= 2, "renewed along the way: {new:?}");
    assert_eq!(count(new, "Sign"), 2);
    let signs: Vec<&str> = new
        .iter()
        .filter(|(r, _)| r == "Sign")
        .map(|(_, s)| s.as_str())
        .collect();
    assert_ne!(
        signs[0], signs[1],
        "the second step signed with a renewed certificate"
    );
    for f in ["a", "b"] {
        let v = Command::new(&me)
            .args(["verify", f])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(v.status.success());
    }
}
