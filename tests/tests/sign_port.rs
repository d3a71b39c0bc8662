//! The sign port: mutual TLS that fails closed at the handshake, and the per-RPC checks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use meshsign_client::net::{self as transport, ClientIdentity};
use meshsign_client::session::RunnerKey;
use meshsign_proto::v1::{self, sign_request::Input, signer_client::SignerClient};
use meshsign_tests::TestSite;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Code;

fn digest_req(alias: &str, d: Vec<u8>) -> v1::SignRequest {
    v1::SignRequest {
        key_alias: alias.into(),
        input: Some(Input::Sha256Digest(d)),
        artifact_name: "a".into(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    }
}

fn sign_records(site: &TestSite) -> usize {
    site.audit().iter().filter(|r| r.rpc == "Sign").count()
}

/// Connects to the sign port with `identity` and tries one Sign; returns whether it was served.
async fn try_sign(site: &TestSite, identity: Option<ClientIdentity>) -> Result<(), String> {
    let tls = transport::tls_config(transport::roots(&site.client).unwrap(), identity).unwrap();
    let ch = transport::connect(&site.client.sign_endpoint, "localhost", tls)
        .await
        .map_err(|e| e.to_string())?;
    SignerClient::new(ch)
        .sign(digest_req("release", vec![1; 32]))
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn handshake_fails_without_a_certificate_or_with_a_foreign_ca() {
    let site = TestSite::start().await;
    // No client certificate.
    let err = try_sign(&site, None)
        .await
        .expect_err("no certificate must not be served");
    assert!(
        err.contains("received fatal alert: CertificateRequired"),
        "{err}"
    );

    // A certificate with the right shape from a CA the site does not trust.
    let rogue_ca = rcgen::CertifiedIssuer::self_signed(
        {
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        },
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!(
            "spiffe://meshsign.test/runner/production/sg/{}",
            "ab".repeat(32)
        )
        .try_into()
        .unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &rogue_ca).unwrap();
    let id = ClientIdentity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    };
    let err = try_sign(&site, Some(id))
        .await
        .expect_err("foreign CA must not be served");
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");
    // Refused at the handshake: no handler ran, so no Sign decision exists.
    assert_eq!(sign_records(&site), 0);
}

#[tokio::test]
async fn certificate_that_expires_on_an_open_connection_is_refused_on_the_next_rpc() {
    let site = TestSite::start().await;
    let key = RunnerKey::generate().unwrap();
    let mut req = site.enroll_request("production", site.token("production"), &key);
    req.requested_ttl_seconds = 600;
    let resp = site.enroll_ok(req).await;
    let chain = resp
        .certificate_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect::<Vec<_>>();
    assert_eq!(chain.len(), 2);
    let mut signer = meshsign_client::session::Session::connect_signer(&site.client, &key, &resp)
        .await
        .unwrap();
    signer
        .sign(digest_req("release", vec![2; 32]))
        .await
        .expect("valid certificate signs");

    site.clock.advance(Duration::from_secs(601));
    let err = signer
        .sign(digest_req("release", vec![2; 32]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(
        err.message().starts_with("certificate_expired: "),
        "{}",
        err.message()
    );
    let rec = site.last_audit();
    assert_eq!(
        (rec.decision.as_str(), rec.reason.as_str()),
        ("deny", "certificate_expired")
    );
    assert!(rec.ttl_remaining_sec.unwrap() <= 0);
    assert_eq!(rec.cert_serial, resp.serial);
}

#[tokio::test]
async fn staging_certificate_never_uses_a_production_key() {
    let site = TestSite::start().await;
    let (_k, _r, mut staging) = site.enrolled("staging").await;
    let err = staging
        .sign(digest_req("prod-only", vec![3; 32]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("key_not_in_partition: "),
        "{}",
        err.message()
    );
    let rec = site.last_audit();
    assert_eq!(rec.reason, "key_not_in_partition");
    assert_eq!(
        rec.key_id, "prod-only",
        "a refused Sign records the key it asked for"
    );

    // Same alias in both partitions: staging signs with staging's key, never production's.
    let s = staging
        .sign(digest_req("release", vec![3; 32]))
        .await
        .unwrap()
        .into_inner();
    let (_k, _r, mut prod) = site.enrolled("production").await;
    let p = prod
        .sign(digest_req("release", vec![3; 32]))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(s.public_key_der, p.public_key_der);
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_and_audited() {
    let site = TestSite::start().await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let cases: Vec<(&str, v1::SignRequest, &str)> = vec![
        (
            "digest of 31 bytes",
            digest_req("release", vec![0; 31]),
            "digest",
        ),
        (
            "digest of 33 bytes",
            digest_req("release", vec![0; 33]),
            "digest",
        ),
        (
            "message over 4 KiB",
            v1::SignRequest {
                key_alias: "release".into(),
                input: Some(Input::Message(vec![0; 4097])),
                artifact_name: String::new(),
                algorithm: String::new(),
                signed_entry_timestamp: false,
            },
            "message",
        ),
        (
            "no input",
            v1::SignRequest {
                key_alias: "release".into(),
                input: None,
                artifact_name: String::new(),
                algorithm: String::new(),
                signed_entry_timestamp: false,
            },
            "input",
        ),
    ];
    for (name, req, reason) in cases {
        let before = sign_records(&site);
        let err = signer.sign(req).await.expect_err(name);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{reason}: ")),
            "{name}: {}",
            err.message()
        );
        assert_eq!(sign_records(&site), before + 1, "{name}: audited");
        assert_eq!(site.last_audit().reason, reason, "{name}");
    }
    // A message of exactly 4 KiB is fine.
    let ok = v1::SignRequest {
        key_alias: "release".into(),
        input: Some(Input::Message(vec![0; 4096])),
        artifact_name: String::new(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    };
    signer.sign(ok).await.unwrap();

    for n in [0usize, 1001] {
        let err = signer
            .sign_batch(v1::SignBatchRequest {
                key_alias: "release".into(),
                sha256_digests: vec![vec![0; 32]; n],
                artifact_name: String::new(),
                algorithm: String::new(),
                signed_entry_timestamp: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "batch of {n}");
        assert_eq!(site.last_audit().reason, "batch");
    }
    let err = signer
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: vec![vec![0; 32], vec![0; 5]],
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn key_access_rule_is_checked_against_the_callers_ref() {
    let site = TestSite::start().await;
    let key = RunnerKey::generate().unwrap();
    let mut claims = site.claims("production");
    claims["ref"] = "refs/heads/feature-x".into();
    let req = site.enroll_request("production", site.es.mint(&claims).unwrap(), &key);
    let resp = site.enroll_ok(req).await;
    let mut signer = meshsign_client::session::Session::connect_signer(&site.client, &key, &resp)
        .await
        .unwrap();
    let err = signer
        .sign(digest_req("release", vec![4; 32]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("key_access: "),
        "{}",
        err.message()
    );
    // prod-only admits any ref.
    signer
        .sign(digest_req("prod-only", vec![4; 32]))
        .await
        .unwrap();
}
