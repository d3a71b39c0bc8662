//! App Store Connect API keys in the site (issue 29): an `AuthKey_KID.p8` made by openssl is
//! imported one-way; a runner gets a short-lived ES256 token that PyJWT verifies against the
//! key's public half with exactly the claims Apple documents; scopes only narrow, lifetimes
//! only shorten; the key signs nothing else; every token is audited.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use meshsign_proto::v1;
use meshsign_tests::{TestSite, openssl, sign_req};
use tonic::Code;

const KID: &str = "ABC123DEFG";
const ISSUER: &str = "57246542-96fe-1a63-e053-0824d011072a";
const NOTARY: [&str; 2] = ["GET /notary/v2/submissions", "POST /notary/v2/submissions"];

/// A P-256 `.p8` as Apple hands it out (PKCS#8 PEM), and its public key (PEM).
fn p8(dir: &Path, kid: &str) -> (Vec<u8>, std::path::PathBuf) {
    let key = dir.join(format!("AuthKey_{kid}.p8"));
    let public = dir.join(format!("{kid}.pub.pem"));
    let (ok, out) = openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    (std::fs::read(&key).unwrap(), public)
}

async fn import(
    site: &TestSite,
    alias: &str,
    pem: Vec<u8>,
    kid: &str,
    issuer: Option<&str>,
) -> Result<v1::KeyInfo, tonic::Status> {
    site.admin()
        .await
        .import_key(v1::ImportKeyRequest {
            environment: "production".into(),
            alias: alias.into(),
            pkcs8_pem: pem,
            repositories: vec!["acme/*".into()],
            refs: vec!["*".into()],
            purposes: vec!["asc-api".into()],
            asc_key_id: kid.into(),
            asc_issuer_id: issuer.unwrap_or_default().into(),
            asc_individual: issuer.is_none(),
            asc_scopes: if issuer.is_some() {
                NOTARY.iter().map(|s| s.to_string()).collect()
            } else {
                vec![]
            },
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// PyJWT's view of `token` checked with `public` (ES256, audience appstoreconnect-v1): the
/// header and the claims, as JSON.
fn pyjwt(token: &str, public: &Path) -> serde_json::Value {
    let script = r#"
import json, sys, jwt
token, key = sys.argv[1], open(sys.argv[2]).read()
claims = jwt.decode(token, key, algorithms=["ES256"], audience="appstoreconnect-v1",
                    options={"require": ["exp", "iat", "aud"]})
print(json.dumps({"header": jwt.get_unverified_header(token), "claims": claims}))
"#;
    let out = Command::new("python3")
        .args(["-c", script, token])
        .arg(public)
        .output()
        .expect("python3 with PyJWT[crypto] (.ci/run installs it)");
    assert!(
        out.status.success(),
        "PyJWT refused the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_site_mints_app_store_connect_tokens_that_pyjwt_verifies_and_never_widens_them() {
    let site = TestSite::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (pem, public) = p8(tmp.path(), KID);
    let info = import(&site, "asc", pem, KID, Some(ISSUER)).await.unwrap();
    assert_eq!(info.alias, "asc");
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let ask = |scopes: &[&str], ttl: u32| v1::AscTokenRequest {
        key_alias: "asc".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: ttl,
    };

    // The key's own scopes, Apple's longest lifetime.
    let t = signer.asc_token(ask(&[], 0)).await.unwrap().into_inner();
    let v = pyjwt(&t.token, &public);
    assert_eq!(v["header"]["alg"], "ES256");
    assert_eq!(v["header"]["kid"], KID);
    assert_eq!(v["header"]["typ"], "JWT");
    let c = &v["claims"];
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["aud"], "appstoreconnect-v1");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        1200
    );
    assert_eq!(c["scope"], serde_json::json!(NOTARY));
    let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["aud", "exp", "iat", "iss", "scope"], "{c}");
    assert_eq!(t.expires_at.unwrap().seconds, c["exp"].as_i64().unwrap());

    // The audit entry names the job, the scopes and the expiry.
    let rec = site.last_audit();
    assert_eq!(
        (rec.rpc.as_str(), rec.decision.as_str()),
        ("AscToken", "allow")
    );
    assert!(!rec.job_id.is_empty());
    assert!(
        rec.detail.contains("GET /notary/v2/submissions"),
        "{}",
        rec.detail
    );
    assert!(rec.detail.contains("expires"), "{}", rec.detail);

    // Narrower and shorter: granted as asked.
    let t = signer
        .asc_token(ask(&[NOTARY[0]], 300))
        .await
        .unwrap()
        .into_inner();
    let c = &pyjwt(&t.token, &public)["claims"];
    assert_eq!(c["scope"], serde_json::json!([NOTARY[0]]));
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);

    // Wider, longer, malformed: refused with a reason, audited.
    for (req, reason) in [
        (ask(&["GET /v1/apps"], 0), "asc_scope"),
        (ask(&[], 3600), "asc_ttl"),
        (ask(&["not a scope"], 0), "asc_scope"),
    ] {
        let e = signer.asc_token(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().starts_with(&format!("{reason}: ")),
            "{}",
            e.message()
        );
        assert_eq!(site.last_audit().reason, reason);
    }

    // The key signs nothing else, and a signing key mints no token.
    let e = signer.sign(sign_req("asc", 1)).await.unwrap_err();
    assert!(e.message().starts_with("purpose: "), "{}", e.message());
    let e = signer
        .asc_token(v1::AscTokenRequest {
            key_alias: "release".into(),
            ..ask(&[], 0)
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("purpose: "), "{}", e.message());

    // An individual key: `sub: "user"`, no issuer; no scopes in policy, so the runner's own
    // (narrowing from the key's whole role) are what the token carries.
    let (pem, public) = p8(tmp.path(), "INDIV12345");
    import(&site, "asc-me", pem, "INDIV12345", None)
        .await
        .unwrap();
    let t = signer
        .asc_token(v1::AscTokenRequest {
            key_alias: "asc-me".into(),
            ..ask(&[NOTARY[0]], 0)
        })
        .await
        .unwrap()
        .into_inner();
    let c = &pyjwt(&t.token, &public)["claims"];
    assert_eq!(c["sub"], "user");
    assert!(c.get("iss").is_none(), "{c}");
}

#[tokio::test]
async fn an_asc_key_import_needs_its_identity_and_nothing_else_takes_one() {
    let site = TestSite::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (pem, _) = p8(tmp.path(), KID);
    let mut admin = site.admin().await;
    let base = v1::ImportKeyRequest {
        environment: "production".into(),
        alias: "asc".into(),
        pkcs8_pem: pem,
        repositories: vec!["*".into()],
        refs: vec!["*".into()],
        purposes: vec!["asc-api".into()],
        ..Default::default()
    };
    for (req, what) in [
        (base.clone(), "needs --asc-key-id"),
        (
            v1::ImportKeyRequest {
                asc_key_id: "lower-case".into(),
                asc_issuer_id: ISSUER.into(),
                ..base.clone()
            },
            "uppercase letters and digits",
        ),
        (
            v1::ImportKeyRequest {
                asc_key_id: KID.into(),
                asc_issuer_id: "not-a-uuid".into(),
                ..base.clone()
            },
            "not a UUID",
        ),
        (
            v1::ImportKeyRequest {
                asc_key_id: KID.into(),
                purposes: vec!["asc-api".into(), "digest".into()],
                asc_issuer_id: ISSUER.into(),
                ..base.clone()
            },
            "no other purpose",
        ),
        (
            v1::ImportKeyRequest {
                asc_key_id: KID.into(),
                asc_issuer_id: ISSUER.into(),
                purposes: vec!["digest".into()],
                ..base.clone()
            },
            "--purpose asc-api",
        ),
    ] {
        let e = admin.import_key(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(what), "{what}: {}", e.message());
    }
    // Creating an asc-api key at the site makes no sense: Apple makes them.
    let e = admin
        .create_key(v1::CreateKeyRequest {
            environment: "production".into(),
            alias: "asc-new".into(),
            algorithm: "ecdsa-p256-sha256".into(),
            repositories: vec!["*".into()],
            refs: vec!["*".into()],
            purposes: vec!["asc-api".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("made by Apple"), "{}", e.message());
}

#[tokio::test]
async fn tokens_count_against_the_key_s_budget_and_a_config_cannot_declare_an_asc_key() {
    let site = TestSite::start_edited(
        &|t: String| meshsign_tests::in_environment(&t, "production", "max_signatures_per_job = 2"),
        None,
        meshsign_server::audit::AuditSettings::default(),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let (pem, _) = p8(tmp.path(), KID);
    import(&site, "asc", pem, KID, Some(ISSUER)).await.unwrap();
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let ask = || v1::AscTokenRequest {
        key_alias: "asc".into(),
        scopes: vec![],
        ttl_seconds: 60,
    };
    signer.asc_token(ask()).await.unwrap();
    signer.asc_token(ask()).await.unwrap();
    let e = signer.asc_token(ask()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().starts_with("budget: "), "{}", e.message());

    // A key the file declares would be generated by the site: refused, naming the import.
    let text = std::fs::read_to_string(&site.site_toml).unwrap()
        + "\n[[environments.signing_keys]]\nalias = \"asc2\"\nalgorithm = \"ecdsa-p256-sha256\"\n\
           purposes = [\"asc-api\"]\naccess = { repositories = [\"*\"], refs = [\"*\"] }\n";
    let path = site.site_toml.with_file_name("site-asc.toml");
    std::fs::write(&path, text).unwrap();
    let e = meshsign_server::config::SiteConfig::load(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("purposes") && e.contains("admin key"), "{e}");
}

const HSM_TEST: &str = "an_asc_key_imported_into_the_pkcs11_token_mints_tokens_pyjwt_verifies";

/// The `.p8` can go into the site's PKCS#11 token (`--backend pkcs11`): sensitive, not
/// extractable, no copy kept in the site; its tokens verify the same.
#[test]
fn an_asc_key_imported_into_the_pkcs11_token_mints_tokens_pyjwt_verifies() {
    let Some(hsm_dir) = meshsign_tests::in_softhsm_child(HSM_TEST, "asc-token") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pkcs11 = format!(
            "\n[pkcs11]\nmodule = \"{}\"\ntoken_label = \"asc-token\"\npin_file = \"{}\"\n",
            meshsign_certs_dev::softhsm::MODULE,
            hsm_dir.join("pin").display()
        );
        let site = TestSite::start_with(&pkcs11, None).await;
        let tmp = tempfile::tempdir().unwrap();
        let (pem, public) = p8(tmp.path(), KID);
        let info = site
            .admin()
            .await
            .import_key(v1::ImportKeyRequest {
                environment: "production".into(),
                alias: "asc".into(),
                pkcs8_pem: pem,
                repositories: vec!["*".into()],
                refs: vec!["*".into()],
                purposes: vec!["asc-api".into()],
                backend: "pkcs11".into(),
                asc_key_id: KID.into(),
                asc_issuer_id: ISSUER.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.alias, "asc");
        let (_k, _r, mut signer) = site.enrolled("production").await;
        let t = signer
            .asc_token(v1::AscTokenRequest {
                key_alias: "asc".into(),
                scopes: vec![],
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let v = pyjwt(&t.token, &public);
        assert_eq!(v["header"]["kid"], KID);
        assert_eq!(v["claims"]["iss"], ISSUER);
    });
    meshsign_tests::softhsm_child_done(&hsm_dir);
}
