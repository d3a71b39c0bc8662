//! `meshsign asc-token` from the command line (issue 29): an operator imports an
//! `AuthKey_KID.p8` (made by openssl) with `admin key import --purpose asc-api`; a job gets a
//! token in each output format; the `.p8` never reaches the runner.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{meshsign_in, start_dev};

#[test]
fn a_job_gets_an_app_store_connect_token_in_each_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let cfg = dir.join("site/client.toml");
    let run = |args: &[&str]| {
        let o = meshsign_in(dir, &cfg, args);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    common::import_asc_key(dir, &cfg, &["--asc-scope", "GET /notary/v2/submissions"]);
    let (code, jwt, err) = run(&["asc-token", "--environment", "staging", "--key", "asc"]);
    assert_eq!(code, 0, "{err}");
    let jwt = jwt.trim();
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    let (code, header, _) = run(&[
        "asc-token",
        "--environment",
        "staging",
        "--key",
        "asc",
        "--format",
        "header",
        "--ttl",
        "600",
    ]);
    assert_eq!(code, 0);
    assert!(header.starts_with("Authorization: Bearer ey"), "{header}");
    let (code, env, _) = run(&[
        "asc-token",
        "--environment",
        "staging",
        "--key",
        "asc",
        "--format",
        "env",
    ]);
    assert_eq!(code, 0);
    assert!(env.starts_with("MESHSIGN_ASC_TOKEN=ey"), "{env}");
    assert!(env.contains("\nMESHSIGN_ASC_TOKEN_EXPIRES="), "{env}");
    // A wider scope or a longer life is refused by the site's policy (exit 3).
    let (code, _, err) = run(&[
        "asc-token",
        "--environment",
        "staging",
        "--key",
        "asc",
        "--scope",
        "GET /v1/apps",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("asc_scope"), "{err}");
    let (code, _, err) = run(&[
        "asc-token",
        "--environment",
        "staging",
        "--key",
        "asc",
        "--ttl",
        "3600",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("asc_ttl"), "{err}");
}
