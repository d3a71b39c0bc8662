//! Runner device keys (issue 28): a registry per site, proof of possession at every enrollment
//! and renewal, retirement and revocation — against a real site (TLS, sled), with device keys
//! made by the client's own `runner init` code (file backend here; PKCS#11 and TPM in
//! `device_backends.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use meshsign_client::session::RunnerKey;
use meshsign_proto::v1;
use meshsign_tests::runners::{
    claims_of, device, proof, refused, register, registered_site, request,
};
use meshsign_tests::sign_req;
use tonic::Code;

#[tokio::test]
async fn only_a_registered_device_key_that_signs_this_request_enrolls() {
    let site = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    let fp = dev.fingerprint();

    // No proof at all: the environment needs one.
    let key = RunnerKey::generate().unwrap();
    let req = request(&site, &key, site.token("production"), None);
    refused(&site, req, Code::Unauthenticated, "runner_proof", "").await;

    // A good proof, but the key is not registered here.
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    refused(
        &site,
        req,
        Code::PermissionDenied,
        "runner_unregistered",
        &fp,
    )
    .await;

    // Registered (for staging only): still not for production.
    let info = register(&site, &request_json, &["staging"]).await.unwrap();
    assert_eq!(info.fingerprint, fp);
    assert_eq!(info.backend, "file");
    assert_eq!(info.state, "registered");
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    refused(
        &site,
        req,
        Code::PermissionDenied,
        "runner_unregistered",
        &fp,
    )
    .await;
    let audit = site.last_audit();
    assert!(
        audit.detail.contains("registered for staging"),
        "{}",
        audit.detail
    );

    // Registering it again is refused, in any state.
    let e = register(&site, &request_json, &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
}

#[tokio::test]
async fn a_proof_binds_the_token_the_csr_key_and_the_fingerprint() {
    let site = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    let (other, other_json) = device(tmp.path(), "mac-2");
    register(&site, &request_json, &[]).await.unwrap();
    register(&site, &other_json, &[]).await.unwrap();
    let fp = dev.fingerprint();

    // A proof made for another CSR key (a thief replays token and proof with its own key).
    let (key, thief_key) = (
        RunnerKey::generate().unwrap(),
        RunnerKey::generate().unwrap(),
    );
    let tok = site.token("production");
    let stolen = proof(&dev, &tok, &key, "production");
    let req = request(&site, &thief_key, tok.clone(), Some(stolen.clone()));
    refused(&site, req, Code::Unauthenticated, "runner_proof", &fp).await;

    // The other registered machine's key signing over the first one's public key.
    let mut forged = proof(&other, &tok, &thief_key, "production");
    forged.spki = dev.spki().to_vec();
    let req = request(&site, &thief_key, tok.clone(), Some(forged));
    refused(&site, req, Code::Unauthenticated, "runner_proof", &fp).await;

    // A fingerprint claimed beside the proof must be the key's.
    let mut req = request(&site, &key, tok.clone(), Some(stolen.clone()));
    req.runner_fingerprint = "ab".repeat(32);
    refused(&site, req, Code::Unauthenticated, "runner_proof", &fp).await;

    // A proof for another token (jti) of the same job.
    let tok2 = site.token("production");
    let req = request(&site, &key, tok2, Some(stolen.clone()));
    refused(&site, req, Code::Unauthenticated, "runner_proof", &fp).await;

    // The real thing: token, CSR key and proof together. The fingerprint is the key's, and
    // the certificate says how it was proven.
    let req = request(&site, &key, tok, Some(stolen));
    let (resp, mut signer) = site.enroll_signed(&key, req).await;
    assert!(resp.spiffe_id.ends_with(&fp), "{}", resp.spiffe_id);
    assert_eq!(claims_of(&resp).runner_proof, "file");
    assert_eq!(site.last_audit().runner_fingerprint, fp);
    signer.sign(sign_req("release", 1)).await.unwrap();

    // The statement the site makes lists the fingerprint as proven by a file key.
    assert_eq!(runner_proof_of_statement(&mut signer).await, "file");

    // Staging keeps `claimed`: a runner without a device key still enrolls there, and its
    // certificate and statements say the fingerprint is only claimed.
    let (_, staging, mut claimed) = site.enrolled("staging").await;
    assert_eq!(claims_of(&staging).runner_proof, "claimed");
    assert_eq!(runner_proof_of_statement(&mut claimed).await, "claimed");
}

/// `runnerProof` of the in-toto statement the site builds for this runner.
async fn runner_proof_of_statement(
    signer: &mut v1::signer_client::SignerClient<tonic::transport::Channel>,
) -> String {
    let resp = signer
        .attest(v1::AttestRequest {
            key_alias: "attest".into(),
            subjects: vec![v1::AttestSubject {
                name: "app.tar.gz".into(),
                sha256_digest: vec![5u8; 32],
            }],
            predicate_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let env: meshsign_evidence::attest::Envelope =
        serde_json::from_slice(&resp.envelope_json).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&env.payload_bytes().unwrap()).unwrap();
    st["predicate"]["runnerProof"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_malformed_or_forged_registration_request_is_refused_and_changes_nothing() {
    let site = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, request_json) = device(tmp.path(), "mac-1");
    let mut v: serde_json::Value = serde_json::from_slice(&request_json).unwrap();
    // Another hostname under the same signature.
    v["request"]["hostname"] = "someone-else".into();
    let forged = serde_json::to_vec(&v).unwrap();
    let mut extra = v.clone();
    extra["request"]["admin"] = true.into();
    for (bad, what) in [
        (b"not json".to_vec(), "not a registration request"),
        (forged, "does not hold"),
        (
            serde_json::to_vec(&extra).unwrap(),
            "not a registration request",
        ),
        (vec![b' '; 20_000], "bytes; at most"),
    ] {
        let e = register(&site, &bad, &[]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with("invalid: "), "{}", e.message());
        assert!(e.message().contains(what), "{what}: {}", e.message());
    }
    let e = register(&site, &request_json, &["nowhere"])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let listed = site
        .admin()
        .await
        .list_runners(v1::ListRunnersRequest {})
        .await
        .unwrap()
        .into_inner()
        .runners;
    assert!(listed.is_empty(), "{listed:?}");
}

#[tokio::test]
async fn a_renewal_proves_the_same_device_key_again() {
    let site = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    register(&site, &request_json, &[]).await.unwrap();
    let dev = std::sync::Arc::new(dev);
    let params = meshsign_client::session::EnrollParams {
        device: Some(dev.clone()),
        environment: "production".into(),
        token: site.token("production"),
        fingerprint: dev.fingerprint(),
        requested_ttl_seconds: 0,
        region: None,
    };
    // The client's own enrollment and renewal code, proofs included.
    let mut session = meshsign_client::session::Session::start(&site.client, &params)
        .await
        .unwrap();
    session.renew(&site.client, 0).await.unwrap();
    assert_eq!(claims_of(&session.enrollment).runner_proof, "file");
    assert_eq!(site.last_audit().reason, "ok");

    // The same session without the device key cannot renew.
    let mut without = meshsign_client::session::Session {
        enrollment: session.enrollment.clone(),
        signer: session.signer.clone(),
        device: None,
    };
    let e = without.renew(&site.client, 0).await.unwrap_err();
    assert!(e.to_string().contains("runner_proof"), "{e}");
    assert_eq!(site.last_audit().reason, "runner_proof");

    // Retired: no renewal either.
    site.admin()
        .await
        .retire_runner(v1::RunnerRef {
            fingerprint: dev.fingerprint(),
            reason: "decommissioned".into(),
        })
        .await
        .unwrap();
    let e = session.renew(&site.client, 0).await.unwrap_err();
    assert!(e.to_string().contains("runner_retired"), "{e}");
}

#[tokio::test]
async fn retired_revoked_and_disallowed_runners_are_refused() {
    let site = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    let fp = dev.fingerprint();
    register(&site, &request_json, &[]).await.unwrap();
    let mut admin = site.admin().await;

    // Enrolled and signing; then revoked mid-job: the next Sign is refused within a second.
    let key = RunnerKey::generate().unwrap();
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    let (_, mut signer) = site.enroll_signed(&key, req).await;
    signer.sign(sign_req("release", 1)).await.unwrap();
    let missing_reason = admin
        .revoke_runner(v1::RunnerRef {
            fingerprint: fp.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing_reason.code(), Code::InvalidArgument);
    let started = std::time::Instant::now();
    let info = admin
        .revoke_runner(v1::RunnerRef {
            fingerprint: fp.clone(),
            reason: "stolen laptop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, "revoked");
    let e = signer.sign(sign_req("release", 2)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        e.message().starts_with("certificate_revoked: "),
        "{}",
        e.message()
    );
    // And it cannot enroll again, nor be retired or re-registered (revoked is final).
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    refused(&site, req, Code::PermissionDenied, "revoked", &fp).await;
    let e = admin
        .retire_runner(v1::RunnerRef {
            fingerprint: fp.clone(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Retired: refused `runner_retired`.
    let (dev2, json2) = device(tmp.path(), "mac-2");
    register(&site, &json2, &[]).await.unwrap();
    admin
        .retire_runner(v1::RunnerRef {
            fingerprint: dev2.fingerprint(),
            reason: "replaced".into(),
        })
        .await
        .unwrap();
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev2, &tok, &key, "production")),
    );
    refused(
        &site,
        req,
        Code::PermissionDenied,
        "runner_retired",
        &dev2.fingerprint(),
    )
    .await;

    // Every change is in the audit log and in the listing.
    let listed = admin
        .list_runners(v1::ListRunnersRequest {})
        .await
        .unwrap()
        .into_inner()
        .runners;
    assert_eq!(listed.len(), 2);
    let rpcs: Vec<String> = site.audit().iter().map(|r| r.rpc.clone()).collect();
    for rpc in [
        "Admin.RegisterRunner",
        "Admin.RevokeRunner",
        "Admin.RetireRunner",
    ] {
        assert!(rpcs.iter().any(|r| r == rpc), "{rpc} not audited: {rpcs:?}");
    }
}

#[tokio::test]
async fn an_environment_refuses_backends_it_does_not_accept() {
    let site = registered_site(Some(r#"["tpm", "pkcs11"]"#)).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    register(&site, &request_json, &[]).await.unwrap();
    let key = RunnerKey::generate().unwrap();
    let tok = site.token("production");
    let req = request(
        &site,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    refused(
        &site,
        req,
        Code::PermissionDenied,
        "runner_backend",
        &dev.fingerprint(),
    )
    .await;
}

#[tokio::test]
async fn a_key_registered_at_another_site_is_unregistered_here_and_snapshots_keep_the_registry() {
    // Two sites share nothing: registered at one, the key is unknown at the other.
    let tokyo = registered_site(None).await;
    let sg = registered_site(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let (dev, request_json) = device(tmp.path(), "mac-1");
    register(&tokyo, &request_json, &[]).await.unwrap();
    let key = RunnerKey::generate().unwrap();
    let tok = sg.token("production");
    let req = request(
        &sg,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    refused(
        &sg,
        req,
        Code::PermissionDenied,
        "runner_unregistered",
        &dev.fingerprint(),
    )
    .await;

    // A restart keeps the registry (it is in the store, not in memory).
    let tokyo = tokyo.restart().await;
    let tok = tokyo.token("production");
    let req = request(
        &tokyo,
        &key,
        tok.clone(),
        Some(proof(&dev, &tok, &key, "production")),
    );
    tokyo.enroll_ok(req).await;

    // A snapshot carries it: restored into a new folder, the record is there, unchanged.
    let (bytes, _) = tokyo.state().snapshot().await.unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&tokyo.site_toml).unwrap();
    let kek = meshsign_server::custody::Kek::load(&cfg.kek_file, true).unwrap();
    let target = tmp.path().join("restored");
    let clock: meshsign_server::clock::SharedClock = std::sync::Arc::new(tokyo.clock.clone());
    let open = |d: &std::path::Path| meshsign_server::store::Store::open_sled(d, 1 << 20);
    meshsign_server::state::snapshot::restore(&target, &kek, &cfg.kek_file, &bytes, &clock, open)
        .unwrap();
    let store = open(&target).unwrap();
    let rec: Option<meshsign_server::model::runner::RunnerRecord> = store
        .get(
            meshsign_server::store::Tree::Meta,
            format!("runner/{}", dev.fingerprint()).as_bytes(),
        )
        .unwrap();
    assert_eq!(
        rec,
        tokyo.state().registered_runner(&dev.fingerprint()).unwrap()
    );
    assert!(rec.is_some());
}
