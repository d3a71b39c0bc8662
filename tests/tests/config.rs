//! Site config validation: every refusal names the field path.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_server::config::{ConfigError, SiteConfig};

const BASE: &str = r#"
trust_domain = "meshsign.test"
region = "sg"
data_dir = "data"
kek_file = "kek"
[listen]
enroll = "127.0.0.1:7441"
sign = "127.0.0.1:7443"
admin = "127.0.0.1:7444"
[tls]
server_cert = "s.pem"
server_key = "s.key"
admin_ca = "a.pem"
"#;

fn partition(name: &str, audience: &str, issuer: &str, extra: &str) -> String {
    format!(
        r#"
[[environments]]
name = "{name}"
audience = "{audience}"
build_p95_seconds = 1200
{extra}
[[environments.signing_keys]]
alias = "release"
algorithm = "ecdsa-p256-sha256"
access = {{ repositories = ["acme/*"], refs = ["refs/heads/main"] }}
[[environments.trust_policies]]
name = "ci"
issuer = "{issuer}"
jwks_file = "jwks.json"
bound_claims = {{ repository_owner_id = "1100001" }}
"#
    )
}

fn load(toml: &str) -> Result<SiteConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let issuer = meshsign_certs_dev::OidcIssuer::generate(
        "https://ci.test",
        "k1",
        meshsign_certs_dev::JwtAlg::Es256,
    )
    .unwrap();
    std::fs::write(dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
    SiteConfig::from_toml(toml, dir.path())
}

fn field_of(r: Result<SiteConfig, ConfigError>) -> String {
    match r.expect_err("must be refused") {
        ConfigError::Schema { field, message } | ConfigError::Invalid { field, message } => {
            assert!(!message.is_empty());
            field
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn a_good_config_loads_with_paths_resolved() {
    let cfg = load(&format!(
        "{BASE}{}",
        partition(
            "production",
            "meshsign:production:sg",
            "https://ci.test",
            ""
        )
    ))
    .unwrap();
    let p = cfg.environment("production").unwrap();
    assert_eq!(p.max_ttl_seconds, 2400);
    assert_eq!(p.trust_policies[0].jwks.keys.len(), 1);
    assert!(cfg.data_dir.is_absolute());
}

#[test]
fn refusals_name_the_field_path() {
    let ok = |n: &str, a: &str| partition(n, a, "https://ci.test", "");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown top-level key",
            format!("colour = \"red\"\n{BASE}{}", ok("production", "a")),
            "colour",
        ),
        (
            "unknown key in a table",
            format!("{BASE}colour = \"red\"\n{}", ok("production", "a")),
            "tls.colour",
        ),
        (
            "unknown nested key",
            format!(
                "{BASE}{}",
                partition("production", "a", "https://ci.test", "ttl_hours = 3")
            ),
            "environments[0].ttl_hours",
        ),
        (
            "reused audience",
            format!(
                "{BASE}{}{}",
                ok("staging", "same"),
                ok("production", "same")
            ),
            "environments[1].audience",
        ),
        (
            "wildcard issuer",
            format!(
                "{BASE}{}",
                partition("production", "a", "https://*.ci.test", "")
            ),
            "environments[0].trust_policies[0].issuer",
        ),
        (
            "http issuer outside dev",
            format!(
                "{BASE}{}",
                partition("production", "a", "http://ci.test", "")
            ),
            "environments[0].trust_policies[0].issuer",
        ),
        (
            "hard ceiling above the cap",
            format!(
                "{BASE}{}",
                partition(
                    "production",
                    "a",
                    "https://ci.test",
                    "max_ttl_seconds = 9000"
                )
            ),
            "environments[0].max_ttl_seconds",
        ),
        (
            "unsupported algorithm",
            format!(
                "{BASE}{}",
                ok("production", "a").replace("ecdsa-p256-sha256", "dsa-1024")
            ),
            "environments[0].signing_keys[0].algorithm",
        ),
        (
            "missing JWKS file",
            format!(
                "{BASE}{}",
                ok("production", "a").replace("jwks.json", "nope.json")
            ),
            "environments[0].trust_policies[0].jwks_file",
        ),
        (
            "empty access rule",
            format!(
                "{BASE}{}",
                ok("production", "a").replace(r#"repositories = ["acme/*"]"#, "repositories = []")
            ),
            "environments[0].signing_keys[0].access.repositories",
        ),
        (
            "duplicate partition",
            format!("{BASE}{}{}", ok("production", "a"), ok("production", "b")),
            "environments[1].name",
        ),
        ("no environments", BASE.to_string(), "environments"),
        (
            "empty store cache",
            format!("{BASE}[store]\ncache_mib = 0\n{}", ok("production", "a")),
            "store.cache_mib",
        ),
        (
            "audit flush off outside dev",
            format!("{BASE}[audit]\nflush = false\n{}", ok("production", "a")),
            "audit.flush",
        ),
        (
            "wrong type",
            format!(
                "{BASE}{}",
                ok("production", "a")
                    .replace("build_p95_seconds = 1200", "build_p95_seconds = \"long\"")
            ),
            "environments[0].build_p95_seconds",
        ),
    ];
    for (name, toml, field) in cases {
        assert_eq!(field_of(load(&toml)), field, "{name}");
    }
}

#[test]
fn dev_mode_admits_http_issuers_and_an_unflushed_audit_log() {
    let toml = format!(
        "dev = true\n{BASE}{}",
        partition("production", "a", "http://127.0.0.1/oidc", "")
    );
    let cfg = load(&toml).unwrap();
    assert!(cfg.dev && cfg.audit.flush, "the flush is on by default");
    let toml = format!(
        "dev = true\n{BASE}[audit]\nflush = false\n{}",
        partition("production", "a", "http://127.0.0.1/oidc", "")
    );
    assert!(!load(&toml).unwrap().audit.flush);
}

#[test]
fn the_deploy_example_is_a_valid_config() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/site.example.toml"
    ))
    .unwrap();
    let text = text
        .replace("/etc/meshsign/jwks/github.json", "jwks.json")
        .replace("/etc/meshsign/jwks/gitlab.json", "jwks.json");
    let cfg = load(&text).unwrap();
    assert_eq!(cfg.environments.len(), 2);
    assert_eq!(cfg.environment("production").unwrap().max_ttl_seconds, 3000);
    assert_eq!(
        cfg.environment("production").unwrap().trust_policies.len(),
        2
    );
}

#[test]
fn a_postgres_store_takes_no_password_in_its_url() {
    let env = partition("production", "a", "https://ci.test", "");
    let with = |store: &str| load(&format!("{BASE}[store]\n{store}\n{env}"));
    for (store, field, says) in [
        (
            "engine = \"postgres\"\nurl = \"postgresql://meshsign:s3cret@db:5432/meshsign\"",
            "store.url",
            "must not contain a password",
        ),
        (
            "engine = \"postgres\"\nurl = \"postgresql://meshsign@db:5432/meshsign?password=s3cret\"",
            "store.url",
            "must not contain a password",
        ),
        ("engine = \"postgres\"", "store.url", "needs a url"),
        (
            "url = \"postgresql://meshsign@db/meshsign\"",
            "store.url",
            "only with engine",
        ),
        (
            "engine = \"postgres\"\nurl = \"postgresql://meshsign@db/meshsign\"\npool_size = 0",
            "store.pool_size",
            "1 to 256",
        ),
    ] {
        let err = with(store).expect_err(store).to_string();
        assert!(
            err.starts_with(field) && err.contains(says),
            "{store}: {err}"
        );
        assert!(
            !err.contains("s3cret"),
            "the refusal does not repeat the password: {err}"
        );
    }
    let ok = with(
        "engine = \"postgres\"\nurl = \"postgresql://meshsign@db:5432/meshsign\"\npassword_file = \"pg.pass\"\nca_file = \"db-ca.pem\"",
    )
    .unwrap();
    let pg = ok.postgres.expect("postgres");
    assert_eq!(pg.pool_size, 8);
    assert!(pg.password_file.unwrap().is_absolute());
    assert!(pg.ca_file.unwrap().is_absolute());
    // Issue 24 row 13: no CA and no explicit plaintext is refused by name; both at once too.
    let err = with("engine = \"postgres\"\nurl = \"postgresql://meshsign@db:5432/meshsign\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("store.ca_file") && err.contains("allow_plaintext"),
        "{err}"
    );
    let err = with(
        "engine = \"postgres\"\nurl = \"postgresql://meshsign@db:5432/meshsign\"\nca_file = \"a.pem\"\nallow_plaintext = true",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("store.allow_plaintext"), "{err}");
    assert!(
        with("engine = \"postgres\"\nurl = \"postgresql://meshsign@db:5432/meshsign\"\nallow_plaintext = true")
            .unwrap()
            .postgres
            .unwrap()
            .allow_plaintext
    );
}

#[test]
fn the_fleet_examples_are_valid_three_regions_by_three_environments() {
    let mut audiences = std::collections::BTreeSet::new();
    for region in ["sg", "us-east", "tokyo"] {
        let path = format!(
            "{}/../deploy/sites/{region}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let text = ["github", "gitlab", "buildkite"].iter().fold(text, |t, p| {
            t.replace(&format!("/etc/meshsign/jwks/{p}.json"), "jwks.json")
        });
        let cfg = load(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(cfg.region, region);
        let names: Vec<&str> = cfg.environments.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["staging", "production", "compliance"], "{path}");
        for e in &cfg.environments {
            assert!(
                audiences.insert(e.audience.clone()),
                "{path}: audience {} is used twice in the fleet",
                e.audience
            );
        }
        assert!(cfg.metrics_listen.is_some_and(|a| a.ip().is_loopback()));
    }
    assert_eq!(audiences.len(), 9);
}
