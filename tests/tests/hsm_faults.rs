//! Issue 23 rows 1–2: a SoftHSM2 token holding the audit key, the runner CA and a signing key
//! is moved away and back 20 times under signing and enrollment load. Every acknowledged
//! signature verifies under its own key's recorded public key, every certificate under the
//! runner CA's, the audit log (checkpoints signed in the token) verifies end to end, the
//! process does not crash, and while the token is away Sign and Enroll are refused
//! `UNAVAILABLE key_unavailable`.
//!
//! Before the fix, object handles cached across a re-initialisation of the library let a
//! returning token sign a runner's digest with the runner CA's or the audit key.
//!
//! As `hsm.rs`: the test makes the token, then runs itself again as a child process with
//! `SOFTHSM2_CONF` set (SoftHSM2 reads it once per process).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshsign_certs_dev::softhsm::MODULE;
use meshsign_client::runner::RunnerKey;
use meshsign_proto::v1::{self, sign_request::Input};
use meshsign_tests::TestSite;
use tonic::Code;
use x509_parser::prelude::*;

const LABEL: &str = "meshsign-faults";
const TEST: &str = "a_token_moved_away_and_back_under_load_never_signs_with_another_key";

fn config(pin: &std::path::Path) -> String {
    format!(
        r#"
[[environments.signing_keys]]
alias = "hsm"
algorithm = "ecdsa-p256-sha256"
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
checkpoint_every = 7

[limits]
enroll_per_source_per_second = 1000
enroll_per_source_burst = 100000
"#,
        pin.display()
    )
}

/// A refusal while the token is away must be exactly this.
fn key_unavailable(e: &tonic::Status) -> bool {
    e.code() == Code::Unavailable && e.message().starts_with("key_unavailable: ")
        || e.message().starts_with("audit_unavailable: ")
}

#[test]
fn a_token_moved_away_and_back_under_load_never_signs_with_another_key() {
    let Some(hsm) = std::env::var_os("MESHSIGN_TEST_HSM_DIR") else {
        let hsm_dir = tempfile::tempdir().unwrap();
        let conf = meshsign_certs_dev::softhsm::token(hsm_dir.path(), LABEL).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads", "1"])
            .env("SOFTHSM2_CONF", conf)
            .env("MESHSIGN_TEST_HSM_DIR", hsm_dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Only SoftHSM2's known crash in its exit-time destructors, after the whole body ran
        // and wrote `done`, is tolerated (see hsm.rs); a crash during the load is not.
        assert!(hsm_dir.path().join("done").exists(), "{text}");
        for line in text
            .lines()
            .filter(|l| l.starts_with("acknowledged signatures"))
        {
            eprintln!("{line}");
        }
        assert!(text.contains("1 passed"), "{text}");
        #[cfg(unix)]
        if !out.status.success() {
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(out.status.signal(), Some(11), "{text}");
        }
        return;
    };
    let hsm_dir = PathBuf::from(hsm);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(body(hsm_dir.clone()));
    drop(rt);
    std::fs::write(hsm_dir.join("done"), b"").unwrap();
}

async fn body(hsm_dir: PathBuf) {
    let site = Arc::new(TestSite::start_with(&config(&hsm_dir.join("pin")), None).await);
    let (_k, first, mut signer) = site.enrolled("production").await;
    // The keys as recorded before any fault: the signing key's, the runner CA's.
    let key_spki = signer
        .sign(v1::SignRequest {
            key_alias: "hsm".into(),
            input: Some(Input::Sha256Digest(vec![7; 32])),
            artifact_name: "first".into(),
            algorithm: "ecdsa-p256-sha256".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key_der;
    let ca_der = first.certificate_chain[1].clone();
    let ca_spki = X509Certificate::from_der(&ca_der)
        .unwrap()
        .1
        .tbs_certificate
        .subject_pki
        .raw
        .to_vec();

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    // Three signers: every acknowledged (digest, response) is kept.
    for t in 0..3u8 {
        let mut signer = signer.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0usize);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut digest = [t; 32];
                digest[..4].copy_from_slice(&i.to_be_bytes());
                match signer
                    .sign(v1::SignRequest {
                        key_alias: "hsm".into(),
                        input: Some(Input::Sha256Digest(digest.to_vec())),
                        artifact_name: format!("a{t}-{i}"),
                        algorithm: "ecdsa-p256-sha256".into(),
                    })
                    .await
                {
                    Ok(r) => acked.push((digest, r.into_inner())),
                    Err(e) => {
                        assert!(key_unavailable(&e), "{e:?}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (acked, refused, Vec::new())
        }));
    }
    // One enroller: every certificate issued is kept.
    {
        let site = site.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut certs, mut refused) = (Vec::new(), 0usize);
            let mut client = site.enrollment().await;
            while !stop.load(Ordering::Relaxed) {
                let key = RunnerKey::generate().unwrap();
                let req = site.enroll_request("production", site.token("production"), &key);
                match client.enroll(req).await {
                    Ok(r) => certs.push(r.into_inner().certificate_chain[0].clone()),
                    Err(e) => {
                        assert!(key_unavailable(&e), "{e:?}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (Vec::new(), refused, certs)
        }));
    }

    let tokens = hsm_dir.join("tokens");
    let away = hsm_dir.join("tokens.away");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        std::fs::rename(&tokens, &away).unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        std::fs::rename(&away, &tokens).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut acked, mut refused, mut certs) = (Vec::new(), 0, Vec::new());
    for h in load {
        let (a, r, c) = h.await.unwrap();
        acked.extend(a);
        refused += r;
        certs.extend(c);
    }
    eprintln!(
        "acknowledged signatures {}, certificates {}, refusals {refused}",
        acked.len(),
        certs.len()
    );
    assert!(acked.len() > 50 && !certs.is_empty(), "the load ran");
    assert!(refused > 0, "the token was away at least once under load");

    // Every acknowledged signature is the signing key's, over the digest asked for.
    for (digest, r) in &acked {
        assert_eq!(r.public_key_der, key_spki, "{}", r.key_id);
        assert_eq!(r.key_id, "hsm@v1");
        meshsign_proto::sig::verify_digest("ecdsa-p256-sha256", &key_spki, digest, &r.signature)
            .unwrap_or_else(|e| panic!("seq {}: {e}", r.audit_seq));
        assert!(
            meshsign_proto::sig::verify_digest("ecdsa-p256-sha256", &ca_spki, digest, &r.signature)
                .is_err()
        );
    }
    // Every certificate is signed by the runner CA's key.
    for der in &certs {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        meshsign_proto::sig::verify_message(
            "ecdsa-p256-sha256",
            &ca_spki,
            cert.tbs_certificate.as_ref(),
            &cert.signature_value.data,
        )
        .unwrap();
    }

    // Signing works again, and the audit log — its checkpoints signed in the token — verifies
    // from genesis under the audit key.
    let mut resumed = false;
    for _ in 0..100 {
        if signer
            .sign(v1::SignRequest {
                key_alias: "hsm".into(),
                input: Some(Input::Sha256Digest(vec![9; 32])),
                artifact_name: "after".into(),
                algorithm: "ecdsa-p256-sha256".into(),
            })
            .await
            .is_ok()
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed);
    let lines = meshsign_tests::export(&site, v1::ExportAuditRequest::default()).await;
    let report =
        meshsign_proto::audit::verify_export(&lines, &meshsign_tests::audit_key(&site).await)
            .unwrap();
    assert!(report.checkpoints > 5, "{report:?}");
    // Every acknowledged signature is in the log under its seq and hash.
    for (_, r) in &acked {
        let e = lines
            .iter()
            .find_map(|l| match l {
                meshsign_proto::audit::ExportLine::Entry(e) if e.seq == r.audit_seq => Some(e),
                _ => None,
            })
            .unwrap_or_else(|| panic!("seq {} in the log", r.audit_seq));
        assert_eq!(e.hash, r.audit_hash, "seq {}", r.audit_seq);
    }
    drop(signer);
    let site = Arc::try_unwrap(site).ok().expect("the load is over");
    site.handle.shutdown().await;
}
