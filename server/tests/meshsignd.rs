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

/// Issue 25 row 3: no open policy. `meshsignd check` refuses a trust policy that binds no owner
/// (naming the field and the claims to bind), and one whose owner binding is a wildcard; it
/// accepts `allow_unbound = true` with a warning, and warns when a renamable name is bound
/// where an id exists.
#[test]
fn check_refuses_an_open_trust_policy_and_warns_of_renamable_names() {
    let tmp = tempfile::tempdir().unwrap();
    let site = meshsign_server::dev::prepare(tmp.path()).unwrap();
    let text = std::fs::read_to_string(&site).unwrap();
    let owner = format!(
        "repository_owner_id = \"{}\", ",
        meshsign_certs_dev::GITHUB_OWNER_ID
    );
    assert!(text.contains(&owner), "the dev config binds the owner id");
    let check = |name: &str, toml: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, toml).unwrap();
        let out = meshsignd()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, _, err) = check("open.toml", text.replacen(&owner, "", 1));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("trust_policies[0].bound_claims")
            && err.contains("binds no owner")
            && err.contains("repository_owner_id or repository_id or enterprise_id"),
        "{err}"
    );
    let wildcard = owner.replace(meshsign_certs_dev::GITHUB_OWNER_ID, "*");
    let (code, _, err) = check("wildcard.toml", text.replacen(&owner, &wildcard, 1));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("binds no owner"), "{err}");
    let unbound = text.replacen(&owner, "", 1).replacen(
        "jwks_file = \"pki/dev-oidc.jwks.json\"\n",
        "jwks_file = \"pki/dev-oidc.jwks.json\"\nallow_unbound = true\n",
        1,
    );
    assert_ne!(
        unbound,
        text.replacen(&owner, "", 1),
        "the dev policy names its JWKS file"
    );
    let (code, out, err) = check("unbound.toml", unbound);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("allow_unbound = true: any job on"), "{out}");
    let renamable = text.replacen(
        &owner,
        "repository_owner = \"acme\", repository_id = \"1\", ",
        1,
    );
    let (code, out, err) = check("renamable.toml", renamable);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("binds `repository_owner`") && out.contains("bind the id"),
        "{out}"
    );
}

/// Issue 26: the daemon has man pages and completions, like the CLI.
#[test]
fn meshsignd_writes_man_pages_and_shell_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshsignd().args(["man"]).arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in ["meshsignd.1", "meshsignd-serve.1", "meshsignd-recover.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    let out = meshsignd().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("complete -F _meshsignd"), "{script}");
    assert!(script.contains("serve") && script.contains("recover"));
}
