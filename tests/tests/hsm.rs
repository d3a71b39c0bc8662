//! Keys in a PKCS#11 token (SoftHSM2, a token initialised in a temp dir): created in the token,
//! non-extractable (checked through cryptoki), signing ECDSA P-256, RSA PKCS#1 v1.5 and PSS
//! (openssl verifies), rotated, disabled, still there after a restart; the token taken away
//! under load → `UNAVAILABLE` and health NOT_SERVING, then back → signing resumes.
//!
//! One test, in phases. SoftHSM2 reads `SOFTHSM2_CONF` when the library is first initialised
//! in a process, and this workspace forbids the `unsafe` that `set_var` needs: the test makes
//! the token, then runs itself again as a child process with `SOFTHSM2_CONF` set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use meshsign_proto::v1::{self, sign_request::Input};
use meshsign_tests::{TestSite, openssl, write_pem};
use tonic::Code;

use meshsign_certs_dev::softhsm::MODULE;
const LABEL: &str = "meshsign-test";

/// The enroll port's overall health, polled until it is `want` (at most 5 s).
async fn health_becomes(site: &TestSite, want: i32) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    for _ in 0..50 {
        let r = HealthClient::new(site.enroll_channel().await)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status == want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    d
}

fn hsm_config(pin: &Path) -> String {
    format!(
        r#"
[[environments.signing_keys]]
alias = "hsm-ec"
algorithm = "ecdsa-p256-sha256"
backend = "pkcs11"
access = {{ repositories = ["*"], refs = ["*"] }}

[[environments.signing_keys]]
alias = "hsm-rsa"
algorithm = "rsa-2048-pkcs1-sha256"
backend = "pkcs11"
access = {{ repositories = ["*"], refs = ["*"] }}

[[environments.signing_keys]]
alias = "hsm-pss"
algorithm = "rsa-2048-pss-sha256"
backend = "pkcs11"
access = {{ repositories = ["*"], refs = ["*"] }}

[pkcs11]
module = "{MODULE}"
token_label = "{LABEL}"
pin_file = "{}"
sessions = 4
audit_key = true
runner_cas = true

[audit]
checkpoint_every = 5
"#,
        pin.display()
    )
}

/// Every private key object in the token, as (label, extractable, sensitive,
/// never-extractable), read through cryptoki.
fn private_keys_in_token() -> Vec<(String, bool, bool, bool)> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    let ctx = Pkcs11::new(MODULE).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == LABEL)
        .unwrap();
    let s = ctx.open_ro_session(slot).unwrap();
    let _ = s.login(UserType::User, Some(&"1234".to_string().into()));
    let mut out = Vec::new();
    for h in s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
    {
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        let mut row = (String::new(), true, false, false);
        for a in attrs {
            match a {
                Attribute::Label(l) => row.0 = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Extractable(x) => row.1 = x,
                Attribute::Sensitive(x) => row.2 = x,
                Attribute::NeverExtractable(x) => row.3 = x,
                _ => {}
            }
        }
        out.push(row);
    }
    out
}

async fn sign(
    signer: &mut v1::signer_client::SignerClient<tonic::transport::Channel>,
    alias: &str,
    alg: &str,
    data: &[u8],
) -> Result<v1::SignResponse, tonic::Status> {
    signer
        .sign(v1::SignRequest {
            key_alias: alias.into(),
            input: Some(Input::Sha256Digest(sha256(data).to_vec())),
            artifact_name: "artifact".into(),
            algorithm: alg.into(),
            signed_entry_timestamp: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn openssl_verifies(dir: &Path, r: &v1::SignResponse, file: &Path, pss: bool) {
    let (sig, pubkey) = (dir.join("sig"), dir.join("pub.pem"));
    std::fs::write(&sig, &r.signature).unwrap();
    write_pem(&pubkey, "PUBLIC KEY", &r.public_key_der);
    let (pk, sg, fl) = (
        pubkey.display().to_string(),
        sig.display().to_string(),
        file.display().to_string(),
    );
    let mut args = vec!["dgst", "-sha256", "-verify", &pk];
    if pss {
        args.extend([
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
        ]);
    }
    args.extend(["-signature", &sg, &fl]);
    let (ok, out) = openssl(&args);
    assert!(ok, "{} ({}): {out}", r.key_id, r.algorithm);
}

const TEST: &str =
    "keys_in_a_pkcs11_token_sign_rotate_survive_restarts_and_the_token_coming_and_going";

#[test]
fn keys_in_a_pkcs11_token_sign_rotate_survive_restarts_and_the_token_coming_and_going() {
    let Some(hsm_dir) = meshsign_tests::in_softhsm_child(TEST, LABEL) else {
        return;
    };
    let pin = hsm_dir.join("pin");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let site = TestSite::start_with(&hsm_config(&pin), None).await;
        let (_k, _r, mut signer) = site.enrolled("production").await;
        let dir = site.dir.path().to_path_buf();
        let data = b"a release artifact".repeat(100);
        let file = dir.join("artifact");
        std::fs::write(&file, &data).unwrap();

        // Each algorithm signs in the token; openssl verifies.
        for (alias, alg, pss) in [
            ("hsm-ec", "ecdsa-p256-sha256", false),
            ("hsm-rsa", "rsa-2048-pkcs1-sha256", false),
            ("hsm-pss", "rsa-2048-pss-sha256", true),
        ] {
            let r = sign(&mut signer, alias, alg, &data).await.unwrap();
            assert_eq!(r.key_id, format!("{alias}@v1"));
            openssl_verifies(&dir, &r, &file, pss);
        }

        // The private keys are in the token, sensitive and never extractable; the store holds
        // no wrapped copy of them.
        let keys = private_keys_in_token();
        for alias in ["hsm-ec", "hsm-rsa", "hsm-pss"] {
            let k = keys
                .iter()
                .find(|k| k.0 == format!("meshsign production/{alias}@v1"))
                .unwrap_or_else(|| panic!("{alias} in the token: {keys:?}"));
            assert_eq!((k.1, k.2, k.3), (false, true, true), "{k:?}");
        }
        let records = site
            .state()
            .store
            .kv()
            .scan_prefix(meshsign_server::store::Tree::Keys, b"production/hsm-")
            .unwrap();
        assert_eq!(records.len(), 3);
        for (_, v) in &records {
            let text = String::from_utf8_lossy(v);
            assert!(
                text.contains("\"pkcs11\"") && !text.contains("\"wrapped\""),
                "{text}"
            );
        }

        // The runner CAs are in the token: every enrollment above was signed there, and the
        // store keeps no wrapped copy.
        let cas = site
            .state()
            .store
            .kv()
            .scan_prefix(meshsign_server::store::Tree::RunnerCas, b"")
            .unwrap();
        assert_eq!(cas.len(), 2, "one per environment");
        for (_, v) in &cas {
            let text = String::from_utf8_lossy(v);
            assert!(
                text.contains("\"pkcs11\"") && !text.contains("\"wrapped\""),
                "{text}"
            );
        }
        assert!(
            private_keys_in_token().iter().any(|k| k
                .0
                .starts_with("meshsign runner CA production")
                && !k.1
                && k.3)
        );

        // The audit key is in the token too: its checkpoints verify under the key the site
        // publishes, and the store holds only its reference.
        let audit_rec = site
            .state()
            .store
            .kv()
            .scan_prefix(meshsign_server::store::Tree::Keys, b"(site)/audit/")
            .unwrap();
        assert!(String::from_utf8_lossy(&audit_rec[0].1).contains("\"pkcs11\""));
        let lines = meshsign_tests::export(&site, v1::ExportAuditRequest::default()).await;
        let report = meshsign_evidence::audit::verify_export(
            &lines,
            &meshsign_tests::audit_key(&site).await,
        )
        .unwrap();
        assert!(report.checkpoints >= 1, "{report:?}");

        // Rotate: v2 is made in the token and signs; disable: refused.
        let mut admin = site.admin().await;
        let key = |alias: &str| v1::KeyRef {
            environment: "production".into(),
            alias: alias.into(),
        };
        admin.rotate_key(key("hsm-ec")).await.unwrap();
        let r = sign(&mut signer, "hsm-ec", "ecdsa-p256-sha256", &data)
            .await
            .unwrap();
        assert_eq!(r.key_id, "hsm-ec@v2");
        openssl_verifies(&dir, &r, &file, false);
        admin.disable_key(key("hsm-rsa")).await.unwrap();
        let e = sign(&mut signer, "hsm-rsa", "rsa-2048-pkcs1-sha256", &data)
            .await
            .unwrap_err();
        assert!(e.message().starts_with("key_disabled: "), "{e:?}");
        // An ops-created key in the token.
        let created = admin
            .create_key(v1::CreateKeyRequest {
                environment: "production".into(),
                alias: "hsm-new".into(),
                algorithm: "ecdsa-p256-sha256".into(),
                repositories: vec!["*".into()],
                refs: vec!["*".into()],
                purposes: vec![],
                backend: "pkcs11".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.alias, "hsm-new");
        assert!(
            private_keys_in_token()
                .iter()
                .any(|k| k.0 == "meshsign production/hsm-new@v1" && !k.1)
        );
        // Import into the token (C_CreateObject): a P-256 and an RSA-2048 key; the store keeps
        // no copy; the token marks them sensitive and not extractable.
        let (ok, out) = openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &dir.join("rsa.key").display().to_string(),
        ]);
        assert!(ok, "{out}");
        let rsa_pem = std::fs::read(dir.join("rsa.key")).unwrap();
        let ec_pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem()
            .into_bytes();
        for (alias, pem, alg) in [
            ("imported-ec", ec_pem, "ecdsa-p256-sha256"),
            ("imported-rsa", rsa_pem, "rsa-2048-pkcs1-sha256"),
        ] {
            admin
                .import_key(v1::ImportKeyRequest {
                    environment: "production".into(),
                    alias: alias.into(),
                    pkcs8_pem: pem,
                    repositories: vec!["*".into()],
                    refs: vec!["*".into()],
                    chain_pem: Vec::new(),
                    purposes: Vec::new(),
                    backend: "pkcs11".into(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{alias}: {e:?}"));
            let r = sign(&mut signer, alias, alg, &data).await.unwrap();
            openssl_verifies(&dir, &r, &file, false);
            let k = private_keys_in_token()
                .into_iter()
                .find(|k| k.0 == format!("meshsign production/{alias}@v1"))
                .unwrap_or_else(|| panic!("{alias} in the token"));
            assert_eq!((k.1, k.2), (false, true), "{k:?}");
            let rec = site
                .state()
                .store
                .kv()
                .get(
                    meshsign_server::store::Tree::Keys,
                    format!("production/{alias}/{:010}", 1).as_bytes(),
                )
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&rec);
            assert!(
                text.contains("\"pkcs11\"") && !text.contains("\"wrapped\""),
                "{text}"
            );
        }

        // Ed25519 and P-384 in the token (messages only), verified by openssl.
        let message = b"release 1.4.2 of acme/app".to_vec();
        let msg_file = dir.join("message");
        std::fs::write(&msg_file, &message).unwrap();
        for (alias, alg) in [("hsm-ed", "ed25519"), ("hsm-p384", "ecdsa-p384-sha384")] {
            admin
                .create_key(v1::CreateKeyRequest {
                    environment: "production".into(),
                    alias: alias.into(),
                    algorithm: alg.into(),
                    repositories: vec!["*".into()],
                    refs: vec!["*".into()],
                    purposes: vec![],
                    backend: "pkcs11".into(),
                })
                .await
                .unwrap_or_else(|e| panic!("{alias} in the token: {e:?}"));
            let r = signer
                .sign(v1::SignRequest {
                    key_alias: alias.into(),
                    input: Some(Input::Message(message.clone())),
                    artifact_name: "message".into(),
                    algorithm: alg.into(),
                    signed_entry_timestamp: false,
                })
                .await
                .unwrap()
                .into_inner();
            meshsign_tests::openssl_verifies_message(&dir, &r, &msg_file);
        }
        drop(signer);

        // Restart: the same keys, still in the token, still sign.
        let site = site.restart().await;
        let (_k, _r, mut signer) = site.enrolled("production").await;
        let r = sign(&mut signer, "hsm-ec", "ecdsa-p256-sha256", &data)
            .await
            .unwrap();
        assert_eq!(r.key_id, "hsm-ec@v2");
        openssl_verifies(&dir, &r, &file, false);
        // (Imported keys are not CKA_NEVER_EXTRACTABLE: the token did not make them.)
        assert!(private_keys_in_token().iter().all(|k| !k.1 && k.2));

        // The token goes away under load: refused UNAVAILABLE (key_unavailable), health says
        // NOT_SERVING; it comes back: signing resumes without a restart.
        let tokens = hsm_dir.join("tokens");
        let away = hsm_dir.join("tokens.away");
        std::fs::rename(&tokens, &away).unwrap();
        let mut refused = None;
        for _ in 0..50 {
            match sign(&mut signer, "hsm-ec", "ecdsa-p256-sha256", &data).await {
                Err(e) => {
                    refused = Some(e);
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let e = refused.expect("a sign call refused while the token is away");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().starts_with("key_unavailable: "), "{e:?}");
        assert!(!site.state().custody_available());
        // NOT_SERVING (2) while the token is away.
        assert!(health_becomes(&site, 2).await, "health says NOT_SERVING");
        std::fs::rename(&away, &tokens).unwrap();
        let mut resumed = false;
        for _ in 0..100 {
            if sign(&mut signer, "hsm-ec", "ecdsa-p256-sha256", &data)
                .await
                .is_ok()
            {
                resumed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(resumed, "signing resumes once the token is back");
        assert!(site.state().custody_available());
        assert!(health_becomes(&site, 1).await, "health says SERVING again");
        // Software keys were never affected.
        let r = sign(&mut signer, "release", "ecdsa-p256-sha256", &data)
            .await
            .unwrap();
        assert_eq!(r.key_id, "release@v1");
        site.handle.shutdown().await;
    });
    drop(rt);
    meshsign_tests::softhsm_child_done(&hsm_dir);
}
