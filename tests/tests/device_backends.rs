//! Device keys in real hardware stand-ins (issue 28): a PKCS#11 token (SoftHSM2) and a TPM 2.0
//! (the `swtpm` simulator, started per test in a temporary folder on loopback and driven by
//! tpm2-tools, as on a Linux runner). `runner init`'s code makes the key, an operator
//! registers it, the client enrolls, signs and renews with it; another TPM cannot reuse its
//! proof; the key cannot leave the TPM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use meshsign_client::device::{DeviceKey, InitOptions};
use meshsign_client::session::{EnrollParams, RunnerKey, Session};
use meshsign_evidence::device::Backend;
use meshsign_tests::runners::{claims_of, proof, refused, register, registered_site, request};
use meshsign_tests::{TestSite, sign_req, wait_until};
use tonic::Code;

/// Enrolls in production with the client's own code (the device key's proof included), signs,
/// renews, and signs again with the renewed certificate.
async fn enroll_sign_renew(site: &TestSite, dev: &Arc<DeviceKey>) -> Session {
    let params = EnrollParams {
        device: Some(dev.clone()),
        environment: "production".into(),
        token: site.token("production"),
        fingerprint: dev.fingerprint(),
        requested_ttl_seconds: 0,
        region: None,
    };
    let mut session = Session::start(&site.client, &params).await.unwrap();
    assert!(session.enrollment.spiffe_id.ends_with(&dev.fingerprint()));
    session.sign_digest("release", [1; 32], "a").await.unwrap();
    session.renew(&site.client, 0).await.unwrap();
    session.sign_digest("release", [2; 32], "b").await.unwrap();
    session
}

const PKCS11_TEST: &str = "a_device_key_in_a_pkcs11_token_enrolls_signs_and_renews";

#[test]
fn a_device_key_in_a_pkcs11_token_enrolls_signs_and_renews() {
    let Some(hsm_dir) = meshsign_tests::in_softhsm_child(PKCS11_TEST, "runner-token") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let site = registered_site(Some(r#"["pkcs11"]"#)).await;
        let (dev, signed) = DeviceKey::init(&InitOptions {
            backend: Backend::Pkcs11,
            dir: hsm_dir.join("runner"),
            instance: "mac-7".into(),
            pkcs11: Some((
                PathBuf::from(meshsign_certs_dev::softhsm::MODULE),
                "runner-token".into(),
                Some(hsm_dir.join("pin")),
            )),
            tpm: None,
        })
        .unwrap();
        assert_eq!(signed.request.backend, Backend::Pkcs11);
        let info = register(&site, &serde_json::to_vec(&signed).unwrap(), &[])
            .await
            .unwrap();
        assert_eq!(info.backend, "pkcs11");
        let dev = Arc::new(dev);
        let session = enroll_sign_renew(&site, &dev).await;
        assert_eq!(claims_of(&session.enrollment).runner_proof, "pkcs11");

        // The key is in the token: sensitive, never extractable.
        let ctx = cryptoki::context::Pkcs11::new(meshsign_certs_dev::softhsm::MODULE).unwrap();
        let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
            cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
        ));
        let slot = ctx.get_slots_with_token().unwrap()[0];
        let s = ctx.open_ro_session(slot).unwrap();
        s.login(
            cryptoki::session::UserType::User,
            Some(&cryptoki::types::AuthPin::new(
                meshsign_certs_dev::softhsm::PIN.into(),
            )),
        )
        .unwrap();
        use cryptoki::object::{Attribute, AttributeType, ObjectClass};
        let keys = s
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .unwrap();
        assert_eq!(keys.len(), 1);
        let attrs = s
            .get_attributes(
                keys[0],
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    });
    meshsign_tests::softhsm_child_done(&hsm_dir);
}

/// A TPM 2.0 simulator serving on loopback, with an EK certificate, in its own folder.
struct Swtpm {
    _dir: tempfile::TempDir,
    child: Child,
    tcti: String,
}

impl Swtpm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--create-platform-cert"])
            .arg("--tpmstate")
            .arg(dir.path())
            .output()
            .expect("swtpm_setup (apt-get install swtpm swtpm-tools; .ci/run installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Two free loopback ports in a row: the swtpm TCTI finds the control port at
        // server port + 1.
        let ports = (0..100)
            .find_map(|_| {
                let a = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
                let p = a.local_addr().ok()?.port();
                let _b = std::net::TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
                Some([p, p + 1])
            })
            .expect("two free ports in a row");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", ports[0]))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", ports[1]))
            .spawn()
            .unwrap();
        let tcti = format!("swtpm:host=127.0.0.1,port={}", ports[0]);
        Self {
            _dir: dir,
            child,
            tcti,
        }
    }

    async fn ready(&self) {
        let tcti = self.tcti.clone();
        wait_until("swtpm answers", Duration::from_secs(10), move || {
            Command::new("tpm2_getcap")
                .arg("properties-fixed")
                .env("TPM2TOOLS_TCTI", &tcti)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await;
    }

    fn tool(&self, args: &[&str]) -> String {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tpm_device(tpm: &Swtpm, dir: &Path, instance: &str) -> (DeviceKey, Vec<u8>) {
    let (dev, signed) = DeviceKey::init(&InitOptions {
        backend: Backend::Tpm,
        dir: dir.join(instance),
        instance: instance.into(),
        pkcs11: None,
        tpm: Some((Some(tpm.tcti.clone()), 0x8101_0050)),
    })
    .unwrap();
    assert_eq!(signed.request.backend, Backend::Tpm);
    // The EK and its certificate (swtpm_setup made one) come with the request.
    assert!(signed.request.ek_pub.is_some());
    assert!(signed.request.ek_cert.is_some());
    (dev, serde_json::to_vec(&signed).unwrap())
}

#[tokio::test]
async fn a_device_key_in_a_tpm_enrolls_and_another_tpm_cannot_reuse_its_proof() {
    let (tpm, other_tpm) = (Swtpm::start(), Swtpm::start());
    tpm.ready().await;
    other_tpm.ready().await;
    let tmp = tempfile::tempdir().unwrap();
    let site = registered_site(Some(r#"["tpm"]"#)).await;
    let (dev, json) = tpm_device(&tpm, tmp.path(), "linux-1");
    let (other, other_json) = tpm_device(&other_tpm, tmp.path(), "linux-2");
    let info = register(&site, &json, &["production"]).await.unwrap();
    assert_eq!(info.backend, "tpm");
    assert!(!info.ek_cert.is_empty() && !info.ek_pub.is_empty());
    register(&site, &other_json, &[]).await.unwrap();

    // The key was made in the TPM and can neither leave it nor be duplicated.
    let public = tpm.tool(&["tpm2_readpublic", "-c", "0x81010050"]);
    for attr in ["fixedtpm", "fixedparent", "sensitivedataorigin"] {
        assert!(public.contains(attr), "{attr} missing:\n{public}");
    }

    let dev = Arc::new(dev);
    let session = enroll_sign_renew(&site, &dev).await;
    assert_eq!(claims_of(&session.enrollment).runner_proof, "tpm");

    // Machine 2 (another TPM, registered too) replays machine 1's token and proof with its
    // own CSR key: the proof does not cover that key.
    let (key, thief_key) = (
        RunnerKey::generate().unwrap(),
        RunnerKey::generate().unwrap(),
    );
    let tok = site.token("production");
    let stolen = proof(&dev, &tok, &key, "production");
    let req = request(&site, &thief_key, tok.clone(), Some(stolen));
    refused(
        &site,
        req,
        Code::Unauthenticated,
        "runner_proof",
        &dev.fingerprint(),
    )
    .await;
    // Nor can its TPM sign for machine 1's key.
    let mut forged = proof(&other, &tok, &thief_key, "production");
    forged.spki = dev.spki().to_vec();
    let req = request(&site, &thief_key, tok, Some(forged));
    refused(
        &site,
        req,
        Code::Unauthenticated,
        "runner_proof",
        &dev.fingerprint(),
    )
    .await;
    let mut s = session;
    s.signer.sign(sign_req("release", 9)).await.unwrap();
}
