//! The runner certificate follows DESIGN.md's profile exactly, whatever the CSR asks for;
//! openssl accepts the chain for client authentication.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_client::session::RunnerKey;
use meshsign_evidence::identity::{
    JobClaims, claims_extension_oid_der, claims_extension_oid_string,
};
use meshsign_tests::{REGION, TRUST_DOMAIN, TTL_CAP, TestSite, openssl, write_pem};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use x509_parser::prelude::*;

#[tokio::test]
async fn certificate_is_built_from_policy_not_from_the_csr() {
    let site = TestSite::start().await;
    // A greedy CSR: DNS/IP/URI SANs, CA:true, serverAuth, its own subject.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::URI(
        "spiffe://meshsign.test/runner/production/sg/other"
            .try_into()
            .unwrap(),
    ));
    p.subject_alt_names
        .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.distinguished_name
        .push(DnType::CommonName, "root of all trust");
    let csr = p.serialize_request(&key).unwrap().der().to_vec();

    let claims = site.claims("production");
    let token = site.es.mint(&claims).unwrap();
    let mut req = site.enroll_request("production", token, &RunnerKey::generate().unwrap());
    req.csr_der = csr;
    req.requested_ttl_seconds = 1_000_000;
    let resp = site.enroll_ok(req).await;
    let leaf_der = &resp.certificate_chain[0];
    let (_, cert) = X509Certificate::from_der(leaf_der).unwrap();

    // Exactly one SAN, the runner's SPIFFE URI.
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    let expected = format!(
        "spiffe://{TRUST_DOMAIN}/runner/production/{REGION}/{}",
        "ab".repeat(32)
    );
    assert_eq!(sans, vec![GeneralName::URI(&expected)]);
    assert_eq!(resp.spiffe_id, expected);

    // The claims extension: non-critical, under 2.25, decodes to the token's claims.
    let oid = claims_extension_oid_der();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == &oid[2..])
        .expect("claims extension");
    assert!(!ext.critical);
    let got = JobClaims::from_extension_value(ext.value).unwrap();
    assert_eq!(
        got,
        JobClaims {
            iss: claims["iss"].as_str().unwrap().into(),
            sub: claims["sub"].as_str().unwrap().into(),
            jti: claims["jti"].as_str().unwrap().into(),
            job_id: "1001".into(),
            repository: "acme/app".into(),
            git_ref: "refs/heads/main".into(),
            trust_policy: "ci".into(),
            provider: "github".into(),
            pipeline: "13456789012".into(),
            run_attempt: "1".into(),
            workflow: claims["workflow_ref"].as_str().unwrap().into(),
            commit: claims["sha"].as_str().unwrap().into(),
            runner_proof: "claimed".into(),
        }
    );

    // Validity: not_before = now − 60, not_after ≤ now + cap; lifetime ≤ cap + 60.
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    assert_eq!(nb, site.now() - 60);
    assert_eq!(na, site.now() + TTL_CAP as i64);
    assert!(na - nb <= TTL_CAP as i64 + 60);

    // clientAuth only, CA:false, digitalSignature, 128-bit serial.
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
    assert_eq!(cert.raw_serial().len(), 16);

    // Nothing the CSR asked for: no DNS/IP SANs (above), not its subject, no serverAuth.
    assert!(!cert.subject().to_string().contains("root of all trust"));
    // The subject key is the CSR's.
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // openssl: the chain verifies for client auth, and shows the extension's OID and claims.
    let dir = site.dir.path();
    let (leaf, ca) = (dir.join("leaf.pem"), dir.join("ca.pem"));
    write_pem(&leaf, "CERTIFICATE", leaf_der);
    write_pem(&ca, "CERTIFICATE", &resp.certificate_chain[1]);
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        ca.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, text) = openssl(&["x509", "-in", leaf.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok);
    assert!(text.contains(&claims_extension_oid_string()), "{text}");
    assert!(text.contains("CA:FALSE"));
    assert!(!text.contains("evil.example") && !text.contains("10.0.0.1"));
    // The trusted issuers of the partition come with the response.
    assert_eq!(
        resp.trusted_issuers,
        vec![resp.certificate_chain[1].clone()]
    );
}
