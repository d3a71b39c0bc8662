//! End to end over real TLS on loopback: token → enroll → sign → openssl verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_evidence::verify::verify_digest;
use meshsign_proto::v1;
use meshsign_tests::{TestSite, openssl, write_pem};

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    d
}

#[tokio::test]
async fn token_enroll_sign_and_openssl_verifies() {
    let site = TestSite::start().await;
    let (_key, enrolled, mut signer) = site.enrolled("production").await;
    assert_eq!(enrolled.environment, "production");

    let dir = site.dir.path();
    let artifact = dir.join("App.ipa");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&artifact, &content).unwrap();
    let resp = signer
        .sign(v1::SignRequest {
            key_alias: "release".into(),
            input: Some(v1::sign_request::Input::Sha256Digest(
                sha256(&content).to_vec(),
            )),
            artifact_name: "App.ipa".into(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.key_id, "release@v1");
    assert_eq!(resp.algorithm, "ecdsa-p256-sha256");
    assert_eq!(resp.sha256_digest, sha256(&content));

    let sig = dir.join("App.ipa.sig");
    let pubkey = dir.join("release.pub.pem");
    std::fs::write(&sig, &resp.signature).unwrap();
    write_pem(&pubkey, "PUBLIC KEY", &resp.public_key_der);
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let (ok, out) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &p(&pubkey),
        "-signature",
        &p(&sig),
        &p(&artifact),
    ]);
    assert!(ok, "openssl must accept the signature: {out}");
    assert!(out.contains("Verified OK"));

    // One byte changed: openssl refuses.
    let mut tampered = content.clone();
    tampered[5000] ^= 1;
    std::fs::write(&artifact, &tampered).unwrap();
    let (ok, out) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &p(&pubkey),
        "-signature",
        &p(&sig),
        &p(&artifact),
    ]);
    assert!(!ok, "openssl must refuse a changed file: {out}");

    // The signature's audit record joins it to the job.
    let rec = site
        .audit()
        .into_iter()
        .find(|r| r.audit_id() == resp.audit_id)
        .expect("audit record");
    assert_eq!(
        (rec.decision.as_str(), rec.reason.as_str()),
        ("allow", "ok")
    );
    assert_eq!(rec.environment, "production");
    assert_eq!(rec.job_id, "1001");
    assert!(!rec.jti.is_empty());
    assert_eq!(rec.digest, hex::encode(sha256(&content)));
    assert_eq!(rec.key_id, "release@v1");
    assert_eq!(rec.artifact, "App.ipa");
    assert!(rec.ttl_remaining_sec.unwrap() > 0);

    // A message (≤ 4 KiB) is hashed by the site.
    let msg = b"release notes v1.2.3".to_vec();
    let r = signer
        .sign(v1::SignRequest {
            key_alias: "release".into(),
            input: Some(v1::sign_request::Input::Message(msg.clone())),
            artifact_name: "notes".into(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.sha256_digest, sha256(&msg));
    let msg_path = dir.join("notes.txt");
    std::fs::write(&msg_path, &msg).unwrap();
    std::fs::write(&sig, &r.signature).unwrap();
    let (ok, out) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &p(&pubkey),
        "-signature",
        &p(&sig),
        &p(&msg_path),
    ]);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn sign_batch_of_1000_all_verify() {
    let site = TestSite::start().await;
    let (_key, _enrolled, mut signer) = site.enrolled("staging").await;
    let digests: Vec<[u8; 32]> = (0..1000u32).map(|i| sha256(&i.to_be_bytes())).collect();
    let resp = signer
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: digests.iter().map(|d| d.to_vec()).collect(),
            artifact_name: "batch".into(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.signatures.len(), 1000);
    // Every signature verifies with pure-Rust p256 (independent of the site's aws-lc-rs).
    for (d, s) in digests.iter().zip(&resp.signatures) {
        verify_digest(&resp.public_key_der, d, s).unwrap();
    }
    // And a sample with openssl, over the data the digests were made from.
    let dir = site.dir.path();
    let pubkey = dir.join("k.pem");
    write_pem(&pubkey, "PUBLIC KEY", &resp.public_key_der);
    for i in [0u32, 499, 999] {
        let data = dir.join(format!("d{i}"));
        let sig = dir.join(format!("d{i}.sig"));
        std::fs::write(&data, i.to_be_bytes()).unwrap();
        std::fs::write(&sig, &resp.signatures[i as usize]).unwrap();
        let (ok, out) = openssl(&[
            "dgst",
            "-sha256",
            "-verify",
            pubkey.to_str().unwrap(),
            "-signature",
            sig.to_str().unwrap(),
            data.to_str().unwrap(),
        ]);
        assert!(ok, "digest {i}: {out}");
    }
    // A signature does not verify for a neighbour's digest.
    assert!(verify_digest(&resp.public_key_der, &digests[1], &resp.signatures[0]).is_err());
    let rec = site.last_audit();
    assert_eq!((rec.rpc.as_str(), rec.items), ("SignBatch", 1000));
}

#[tokio::test]
async fn rs256_tokens_enroll_and_verification_material_is_public() {
    let site = TestSite::start().await;
    let key = meshsign_client::session::RunnerKey::generate().unwrap();
    let claims = site.gitlab_claims("staging");
    let token = site.rs.mint(&claims).unwrap();
    let resp = site
        .enroll_ok(site.enroll_request("staging", token, &key))
        .await;
    assert_eq!(resp.environment, "staging");

    // Verification material: on the enroll port, no client certificate.
    let vm = site
        .verification()
        .await
        .get_verification_material(v1::GetVerificationMaterialRequest {
            environment: "production".into(),
            key_alias: "release".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.keys.len(), 1);
    assert!(vm.keys[0].active);
    assert_eq!(vm.keys[0].key_id, "release@v1");
    // Partitions have separate keys.
    let (_k, _e, mut signer) = site.enrolled("production").await;
    let r = signer
        .sign(v1::SignRequest {
            key_alias: "release".into(),
            input: Some(v1::sign_request::Input::Sha256Digest(vec![7; 32])),
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.public_key_der, vm.keys[0].public_key_der);
    let staging = site
        .verification()
        .await
        .get_verification_material(v1::GetVerificationMaterialRequest {
            environment: "staging".into(),
            key_alias: "release".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(staging.keys[0].public_key_der, vm.keys[0].public_key_der);
}
