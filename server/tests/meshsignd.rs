//! The `meshsignd` binary: `check` validates a config and names the failing field.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

fn meshsignd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshsignd"))
}

#[test]
fn check_accepts_a_dev_config_and_names_the_field_of_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let site = meshsign_server::dev::prepare(tmp.path()).unwrap();
    let out = meshsignd()
        .args(["check", "--config"])
        .arg(&site)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ok (region local, environments: staging, production)")
    );

    let text = std::fs::read_to_string(&site).unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replacen(
            "audience = \"meshsign:production:local\"",
            "audience = \"meshsign:staging:local\"",
            1,
        ),
    )
    .unwrap();
    let out = meshsignd()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("environments[1].audience"), "{err}");

    // Outside dev mode, a KEK readable by others is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let prod = tmp.path().join("prod.toml");
        std::fs::write(&prod, text.replace("dev = true", "dev = false")).unwrap();
        std::fs::set_permissions(
            tmp.path().join("kek"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let out = meshsignd()
            .args(["check", "--config"])
            .arg(&prod)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    }
}
