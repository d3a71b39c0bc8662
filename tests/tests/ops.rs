//! Ops on the admin port: issuer rotation under traffic, sub-second revocation on open
//! connections (persistent across restarts), trust policies and JWKS, keys, roles.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshsign_certs_dev::{JwtAlg, OidcIssuer};
use meshsign_client::session::RunnerKey;
use meshsign_proto::v1::{self, revoke_request::Target};
use meshsign_tests::{ES_ISSUER, TestSite, sign_req};
use rcgen::PublicKeyData as _;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::Mutex;
use tonic::Code;
use x509_parser::prelude::*;

fn env(e: &str) -> v1::EnvironmentRequest {
    v1::EnvironmentRequest {
        environment: e.into(),
    }
}

fn iref(e: &str, id: &str) -> v1::IssuerRef {
    v1::IssuerRef {
        environment: e.into(),
        id: id.into(),
        reason: "test".into(),
    }
}

/// Whether `leaf` was signed by `ca` (both DER).
fn chains_to(leaf: &[u8], ca: &[u8]) -> bool {
    let (_, l) = X509Certificate::from_der(leaf).unwrap();
    let (_, c) = X509Certificate::from_der(ca).unwrap();
    l.verify_signature(Some(c.public_key())).is_ok()
}

#[tokio::test]
async fn rotation_under_traffic_has_zero_failed_sign_calls() {
    let site = Arc::new(TestSite::start().await);
    let mut admin = site.admin().await;
    let old = admin
        .list_issuers(env("production"))
        .await
        .unwrap()
        .into_inner()
        .issuers;
    assert_eq!(old.len(), 1);
    let old_ca = old[0].certificate_der.clone();

    // Runner A enrolls under the old issuer and signs in a loop from here on.
    let (_ka, a, signer_a) = site.enrolled("production").await;
    let current = Arc::new(Mutex::new(signer_a));
    let (ok, failed, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let looper = {
        let (current, ok, failed, stop) =
            (current.clone(), ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut s = current.lock().await;
                match s.sign(sign_req("release", 1)).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("sign failed during rotation: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    let progress = |n: usize| {
        let ok = ok.clone();
        async move {
            let start = ok.load(Ordering::Relaxed);
            while ok.load(Ordering::Relaxed) < start + n {
                tokio::task::yield_now().await;
            }
        }
    };

    // Stage: the new CA is trusted before it issues anything.
    let staged = admin
        .stage_issuer(env("production"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(staged.state_word(), "staged");
    #[allow(deprecated)] // the string form stays on the wire for existing clients
    let (word, value) = (staged.state.clone(), staged.runner_ca_state);
    assert_eq!(
        (word.as_str(), value),
        ("staged", v1::RunnerCaState::Staged as i32)
    );
    progress(20).await;
    let bundle = site
        .enrollment()
        .await
        .get_trust_bundle(v1::GetTrustBundleRequest {
            environment: "production".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.issuers.len(), 2);

    // Activate later: the old one is retiring until A's certificate expires.
    site.clock.advance(Duration::from_secs(300));
    let active = admin
        .activate_issuer(iref("production", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (active.id.as_str(), active.state_word().as_str()),
        (staged.id.as_str(), "active")
    );
    progress(20).await;
    let list = admin
        .list_issuers(env("production"))
        .await
        .unwrap()
        .into_inner()
        .issuers;
    let retiring = list
        .iter()
        .find(|i| i.state_word() == "retiring")
        .expect("old issuer retiring");
    assert_eq!(
        retiring.retire_after.unwrap().seconds,
        a.not_after.unwrap().seconds
    );

    // Runner B (the next job) chains to the new issuer; its response lists both trusted CAs.
    let (_kb, b, signer_b) = site.enrolled("production").await;
    assert!(chains_to(&b.certificate_chain[0], &staged.certificate_der));
    assert!(!chains_to(&b.certificate_chain[0], &old_ca));
    assert_eq!(b.trusted_issuers.len(), 2);
    *current.lock().await = signer_b;
    progress(20).await;

    // Time passes beyond A's expiry (B is still valid): the old issuer retires by itself.
    let now = meshsign_server::clock::Clock::unix(&site.clock);
    site.clock.advance(Duration::from_secs(
        (a.not_after.unwrap().seconds - now + 1) as u64,
    ));
    assert!(b.not_after.unwrap().seconds > a.not_after.unwrap().seconds + 1);
    assert_eq!(
        meshsign_server::ops::housekeeping::retire_expired(site.state())
            .await
            .unwrap(),
        1
    );
    progress(20).await;
    stop.store(true, Ordering::Relaxed);
    looper.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "zero failed sign calls");
    assert!(ok.load(Ordering::Relaxed) >= 80);
    let states: Vec<String> = admin
        .list_issuers(env("production"))
        .await
        .unwrap()
        .into_inner()
        .issuers
        .into_iter()
        .map(|i| i.state_word())
        .collect();
    assert!(states.contains(&"retired".to_string()) && states.contains(&"active".to_string()));
}

#[tokio::test]
async fn revoked_issuer_certificates_are_refused_at_once() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let old = admin
        .list_issuers(env("staging"))
        .await
        .unwrap()
        .into_inner()
        .issuers
        .remove(0);
    let (key, resp, mut signer) = site.enrolled("staging").await;
    signer.sign(sign_req("release", 1)).await.unwrap();
    admin.stage_issuer(env("staging")).await.unwrap();
    admin.activate_issuer(iref("staging", "")).await.unwrap();
    signer
        .sign(sign_req("release", 1))
        .await
        .expect("retiring issuer still trusted");

    let t0 = Instant::now();
    admin.revoke_issuer(iref("staging", &old.id)).await.unwrap();
    let err = signer.sign(sign_req("release", 1)).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("issuer_untrusted: "),
        "{}",
        err.message()
    );
    // A new connection with that certificate fails at the handshake.
    let e = site.signer_for(&key, &resp).await.err().unwrap_or_default();
    let served = match site.signer_for(&key, &resp).await {
        Ok(mut s) => s
            .sign(sign_req("release", 1))
            .await
            .map_err(|s| format!("{s:?}"))
            .err()
            .unwrap_or_default(),
        Err(e) => e,
    };
    assert!(
        served.contains("UnknownCA") || e.contains("UnknownCA"),
        "{served} / {e}"
    );
    // The partition still has exactly one active issuer and new runners enroll.
    let (_k, _r, mut s2) = site.enrolled("staging").await;
    s2.sign(sign_req("release", 1)).await.unwrap();
    // Revoking the active issuer activates a fresh one.
    let active = admin
        .list_issuers(env("staging"))
        .await
        .unwrap()
        .into_inner()
        .issuers
        .into_iter()
        .find(|i| i.state_word() == "active")
        .unwrap();
    admin
        .revoke_issuer(iref("staging", &active.id))
        .await
        .unwrap();
    let actives = admin
        .list_issuers(env("staging"))
        .await
        .unwrap()
        .into_inner()
        .issuers
        .into_iter()
        .filter(|i| i.state_word() == "active")
        .count();
    assert_eq!(actives, 1);
    assert!(s2.sign(sign_req("release", 1)).await.is_err());
}

#[tokio::test]
async fn revocation_by_serial_job_fingerprint_and_policy_is_immediate_and_survives_restart() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    // Four runners, each with an open connection.
    let (k1, r1, mut by_serial) = site
        .enrolled_with("production", |c| c["check_run_id"] = "11".into())
        .await;
    let (k2, r2, mut by_job) = site
        .enrolled_with("production", |c| c["check_run_id"] = "22".into())
        .await;
    let fp = "cd".repeat(32);
    let (k3, r3, mut by_fp) = {
        let key = RunnerKey::generate().unwrap();
        let mut req = site.enroll_request("production", site.token("production"), &key);
        req.runner_fingerprint = fp.clone();
        let (resp, s) = site.enroll_signed(&key, req).await;
        (key, resp, s)
    };
    let rs_claims = site.gitlab_claims("production");
    let (k4, r4, mut by_policy) = {
        let key = RunnerKey::generate().unwrap();
        let req = site.enroll_request("production", site.rs.mint(&rs_claims).unwrap(), &key);
        let (resp, s) = site.enroll_signed(&key, req).await;
        (key, resp, s)
    };
    let (_k5, _r5, mut bystander) = site
        .enrolled_with("production", |c| c["check_run_id"] = "55".into())
        .await;
    for s in [
        &mut by_serial,
        &mut by_job,
        &mut by_fp,
        &mut by_policy,
        &mut bystander,
    ] {
        s.sign(sign_req("release", 2)).await.unwrap();
    }

    let revoke = |t: Target| v1::RevokeRequest {
        target: Some(t),
        reason: "drill".into(),
        ..Default::default()
    };
    let mut timings = Vec::new();
    for (name, action, signer, reason) in [
        (
            "serial",
            revoke(Target::Serial(r1.serial.clone())),
            &mut by_serial,
            "certificate_revoked",
        ),
        (
            "job",
            revoke(Target::JobId("22".into())),
            &mut by_job,
            "certificate_revoked",
        ),
        (
            "fingerprint",
            revoke(Target::Fingerprint(fp.clone())),
            &mut by_fp,
            "certificate_revoked",
        ),
    ] {
        let t0 = Instant::now();
        let r = admin.revoke(action).await.unwrap().into_inner();
        assert!(!r.serials.is_empty(), "{name}");
        let err = signer.sign(sign_req("release", 2)).await.expect_err(name);
        timings.push((name, t0.elapsed()));
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{reason}: ")),
            "{name}: {}",
            err.message()
        );
    }
    let t0 = Instant::now();
    admin
        .set_trust_policy_enabled(v1::SetTrustPolicyEnabledRequest {
            environment: "production".into(),
            issuer: meshsign_tests::RS_ISSUER.into(),
            enabled: false,
            keep_sessions: false,
        })
        .await
        .unwrap();
    let err = by_policy.sign(sign_req("release", 2)).await.unwrap_err();
    timings.push(("trust policy", t0.elapsed()));
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("trust_policy_disabled: "),
        "{}",
        err.message()
    );
    for (name, t) in &timings {
        eprintln!(
            "revocation by {name}: refused {:.2} ms after the admin call began",
            t.as_secs_f64() * 1000.0
        );
        assert!(*t < Duration::from_secs(1), "{name}: {t:?}");
    }
    // The bystander is unaffected; the audit names the operator.
    bystander.sign(sign_req("release", 2)).await.unwrap();
    let admin_recs: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r.rpc.starts_with("Admin."))
        .collect();
    assert!(
        admin_recs
            .iter()
            .all(|r| r.operator == "spiffe://meshsign.test/ops/admin/dev")
    );
    assert!(
        admin_recs
            .iter()
            .any(|r| r.rpc == "Admin.Revoke" && r.detail.contains("JobId=22"))
    );
    // A new enrollment for the revoked runner fingerprint is refused too.
    let key = RunnerKey::generate().unwrap();
    let mut req = site.enroll_request("production", site.token("production"), &key);
    req.runner_fingerprint = fp.clone();
    let err = site.enrollment().await.enroll(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().starts_with("revoked: "));

    // After a restart: all four still refused, the bystander still served.
    let site = site.restart().await;
    for (name, k, r) in [
        ("serial", &k1, &r1),
        ("job", &k2, &r2),
        ("fingerprint", &k3, &r3),
        ("policy", &k4, &r4),
    ] {
        let mut s = site.signer_for(k, r).await.unwrap();
        let err = s.sign(sign_req("release", 3)).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
            "{name}: {err:?}"
        );
    }
    let (_k, _r, mut fresh) = site.enrolled("production").await;
    fresh.sign(sign_req("release", 3)).await.unwrap();
}

#[tokio::test]
async fn admin_port_refuses_runner_certificates_and_auditors_cannot_change_anything() {
    let site = TestSite::start().await;
    // A runner certificate on the admin port: refused at the handshake.
    let key = RunnerKey::generate().unwrap();
    let resp = site
        .enroll_ok(site.enroll_request("staging", site.token("staging"), &key))
        .await;
    let tls = meshsign_client::net::tls_config(
        meshsign_client::net::roots(&site.client).unwrap(),
        Some(key.identity(&resp)),
    )
    .unwrap();
    let refused =
        match meshsign_client::net::connect(&site.client.admin_endpoint, "localhost", tls).await {
            Err(e) => e.to_string(),
            Ok(ch) => format!(
                "{:?}",
                v1::admin_client::AdminClient::new(ch)
                    .list_issuers(env("staging"))
                    .await
                    .unwrap_err()
            ),
        };
    assert!(refused.contains("UnknownCA"), "{refused}");

    // The auditor reads but may not change anything; the attempt is audited.
    let mut auditor = site.auditor().await;
    assert_eq!(
        auditor
            .list_issuers(env("staging"))
            .await
            .unwrap()
            .into_inner()
            .issuers
            .len(),
        1
    );
    auditor.list_keys(env("staging")).await.unwrap();
    let denied = [
        auditor.stage_issuer(env("staging")).await.unwrap_err(),
        auditor
            .rotate_key(v1::KeyRef {
                environment: "staging".into(),
                alias: "release".into(),
            })
            .await
            .unwrap_err(),
        auditor
            .set_trust_policy_enabled(v1::SetTrustPolicyEnabledRequest {
                environment: "staging".into(),
                issuer: ES_ISSUER.into(),
                enabled: false,
                keep_sessions: false,
            })
            .await
            .unwrap_err(),
        auditor
            .revoke(v1::RevokeRequest {
                target: Some(Target::JobId("1".into())),
                reason: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ];
    for e in denied {
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().starts_with("role: "));
    }
    let last = site.last_audit();
    assert_eq!(
        (last.decision.as_str(), last.reason.as_str()),
        ("deny", "role")
    );
    assert_eq!(last.operator, "spiffe://meshsign.test/ops/auditor/dev");
    // Nothing changed.
    assert_eq!(
        site.auditor()
            .await
            .list_issuers(env("staging"))
            .await
            .unwrap()
            .into_inner()
            .issuers
            .len(),
        1
    );
    assert!(site.state().revocations().is_empty());
}

#[tokio::test]
async fn jwks_set_pins_next_keys_and_denies_unknown_kids() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let next = OidcIssuer::generate(ES_ISSUER, "es-2", JwtAlg::Es256).unwrap();
    // Add the next key before the IdP uses it: both kids work.
    let both = serde_json::json!({"keys": [site.es.jwk(), next.jwk()]});
    let info = admin
        .set_jwks(v1::SetJwksRequest {
            environment: "staging".into(),
            issuer: ES_ISSUER.into(),
            jwks_json: both.to_string().into_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.kids, ["es-1", "es-2"]);
    let mut enroll = site.enrollment().await;
    for issuer in [&site.es, &next] {
        let req = site.enroll_request(
            "staging",
            issuer.mint(&site.claims("staging")).unwrap(),
            &RunnerKey::generate().unwrap(),
        );
        enroll.enroll(req).await.expect("pinned kid");
    }
    // Drop the old key: its kid is now unknown, denied and logged, never fetched.
    admin
        .set_jwks(v1::SetJwksRequest {
            environment: "staging".into(),
            issuer: ES_ISSUER.into(),
            jwks_json: next.jwks().to_string().into_bytes(),
        })
        .await
        .unwrap();
    let req = site.enroll_request(
        "staging",
        site.token("staging"),
        &RunnerKey::generate().unwrap(),
    );
    let err = enroll.enroll(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().starts_with("kid: "), "{}", err.message());
    assert_eq!(site.last_audit().reason, "kid");
    // A JWKS with private material is refused; so is garbage.
    let mut private = next.jwk();
    private["d"] = "AAAA".into();
    for bad in [
        serde_json::json!({"keys": [private]}).to_string(),
        "{".to_string(),
    ] {
        let e = admin
            .set_jwks(v1::SetJwksRequest {
                environment: "staging".into(),
                issuer: ES_ISSUER.into(),
                jwks_json: bad.into_bytes(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // Persisted: after a restart, es-1 is still unknown.
    let site = site.restart().await;
    let req = site.enroll_request(
        "staging",
        site.token("staging"),
        &RunnerKey::generate().unwrap(),
    );
    assert_eq!(
        site.enrollment()
            .await
            .enroll(req)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn key_lifecycle_rotate_disable_import_create() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let v1sig = signer
        .sign(sign_req("release", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1sig.key_id, "release@v1");

    let info = admin
        .rotate_key(v1::KeyRef {
            environment: "production".into(),
            alias: "release".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.versions.len(), 2);
    let v2sig = signer
        .sign(sign_req("release", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2sig.key_id, "release@v2");
    assert_ne!(v1sig.public_key_der, v2sig.public_key_der);
    let vm = site
        .state()
        .keys()
        .versions("production", "release")
        .unwrap()
        .len();
    assert_eq!(vm, 2, "older versions stay verifiable");

    // Import a PKCS#8 PEM as a new alias; its signatures verify under the imported key.
    let imported = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let info = admin
        .import_key(v1::ImportKeyRequest {
            environment: "production".into(),
            alias: "vendor".into(),
            pkcs8_pem: imported.serialize_pem().into_bytes(),
            repositories: vec!["*".into()],
            refs: vec!["*".into()],
            chain_pem: Vec::new(),
            purposes: vec![],
            backend: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.versions[0].key_id, "vendor@v1");
    let s = signer
        .sign(sign_req("vendor", 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.public_key_der, imported.subject_public_key_info());
    meshsign_evidence::verify::verify_digest(&s.public_key_der, &[5; 32], &s.signature).unwrap();
    // Import is one-way: nothing returns the key; no response carries more than public material.
    assert!(!format!("{info:?}").contains("PRIVATE"));
    // Issue 25 row 6: the same key again, under another alias (say, as an attestation key),
    // or as a new version of its own alias: refused, naming where the site holds it.
    for (alias, purposes) in [
        ("vendor-attest", vec!["attestation".to_string()]),
        ("vendor", vec![]),
    ] {
        let e = admin
            .import_key(v1::ImportKeyRequest {
                environment: "production".into(),
                alias: alias.into(),
                pkcs8_pem: imported.serialize_pem().into_bytes(),
                repositories: vec!["*".into()],
                refs: vec!["*".into()],
                chain_pem: Vec::new(),
                purposes,
                backend: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().starts_with(
                "precondition: this key is already held by the site as production/vendor@v1"
            ),
            "{}",
            e.message()
        );
    }

    // Create a key with a narrow access rule.
    admin
        .create_key(v1::CreateKeyRequest {
            environment: "production".into(),
            alias: "tags-only".into(),
            algorithm: "ecdsa-p256-sha256".into(),
            repositories: vec!["acme/*".into()],
            refs: vec!["refs/tags/*".into()],
            purposes: vec![],
            backend: String::new(),
        })
        .await
        .unwrap();
    let e = signer.sign(sign_req("tags-only", 6)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().starts_with("key_access: "));

    // Disable: no longer signs, still listed.
    admin
        .disable_key(v1::KeyRef {
            environment: "production".into(),
            alias: "release".into(),
        })
        .await
        .unwrap();
    let e = signer.sign(sign_req("release", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().starts_with("key_disabled: "), "{}", e.message());

    // All of it survives a restart.
    let site = site.restart().await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    assert!(
        signer
            .sign(sign_req("release", 4))
            .await
            .unwrap_err()
            .message()
            .starts_with("key_disabled")
    );
    assert_eq!(
        signer
            .sign(sign_req("vendor", 4))
            .await
            .unwrap()
            .into_inner()
            .public_key_der,
        imported.subject_public_key_info()
    );
}

#[tokio::test]
async fn revoke_self_leaves_no_live_credential() {
    let site = TestSite::start().await;
    let (_k, resp, mut signer) = site.enrolled("staging").await;
    signer.sign(sign_req("release", 7)).await.unwrap();
    let r = signer
        .revoke_self(v1::RevokeSelfRequest {
            reason: "job finished".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.serial, resp.serial);
    let e = signer.sign(sign_req("release", 7)).await.unwrap_err();
    assert!(
        e.message().starts_with("certificate_revoked: "),
        "{}",
        e.message()
    );
    assert!(
        site.audit()
            .iter()
            .any(|a| a.rpc == "RevokeSelf" && a.cert_serial == resp.serial)
    );
}

#[tokio::test]
async fn reload_changes_access_rules_and_a_bad_file_changes_nothing() {
    let site = TestSite::start().await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    signer.sign(sign_req("release", 8)).await.unwrap();
    let text = std::fs::read_to_string(&site.site_toml).unwrap();
    // Narrow `release` in production to tags only.
    let (head, prod) = text.split_at(text.find("name = \"production\"").unwrap());
    let narrowed = format!(
        "{head}{}",
        prod.replacen(
            r#"refs = ["refs/heads/main", "refs/tags/*"]"#,
            r#"refs = ["refs/tags/*"]"#,
            1
        )
    );
    assert_ne!(narrowed, text, "the test edits the production key");
    let cfg = meshsign_server::config::SiteConfig::from_toml(&narrowed, site.dir.path()).unwrap();
    let state = site.state().clone();
    site.handle.reload(cfg).await.unwrap();
    let e = signer.sign(sign_req("release", 8)).await.unwrap_err();
    assert!(e.message().starts_with("key_access: "), "{}", e.message());

    // A file changing what needs a restart is refused and the running config stays.
    let moved = narrowed.replace("region = \"sg\"", "region = \"tokyo\"");
    let cfg = meshsign_server::config::SiteConfig::from_toml(&moved, site.dir.path()).unwrap();
    let r = site.handle.reload(cfg).await;
    assert!(r.is_err());
    assert_eq!(state.config().region, "sg");
    assert_eq!(site.last_audit().reason, "precondition");
}

#[tokio::test]
async fn disabling_with_keep_sessions_refuses_new_enrollments_but_lets_open_sessions_finish() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let (_k, _r, mut running) = site.enrolled("staging").await;
    let set = |enabled: bool, keep_sessions: bool| v1::SetTrustPolicyEnabledRequest {
        environment: "staging".into(),
        issuer: ES_ISSUER.into(),
        enabled,
        keep_sessions,
    };
    let info = admin
        .set_trust_policy_enabled(set(false, true))
        .await
        .unwrap()
        .into_inner();
    assert!(!info.enabled && info.keep_sessions);
    running
        .sign(sign_req("release", 1))
        .await
        .expect("a job already running may finish");
    let key = RunnerKey::generate().unwrap();
    let err = site
        .enrollment()
        .await
        .enroll(site.enroll_request("staging", site.token("staging"), &key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("trust_policy_disabled: "),
        "{}",
        err.message()
    );
    // Disabling fully then cuts the open session too.
    admin
        .set_trust_policy_enabled(set(false, false))
        .await
        .unwrap();
    let err = running.sign(sign_req("release", 1)).await.unwrap_err();
    assert!(
        err.message().starts_with("trust_policy_disabled: "),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_admin_call_whose_certificate_names_no_operator_is_refused_and_audited() {
    let site = TestSite::start().await;
    let pki = site.dir.path().join("pki");
    // A second admin CA, trusted after a reload re-reads [tls]; its admin certificate is an ops
    // identity of another trust domain, so the TLS handshake passes and the operator check fails.
    let other = meshsign_certs_dev::DevPki::generate("other.test").unwrap();
    let other_dir = site.dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    other.write_to(&other_dir).unwrap();
    let mut cas = std::fs::read_to_string(pki.join("admin-ca.pem")).unwrap();
    cas.push_str(&other.admin_ca_pem);
    std::fs::write(pki.join("admin-ca.pem"), cas).unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&site.site_toml).unwrap();
    site.handle.reload(cfg).await.unwrap();

    let mut cfg = site.client.clone();
    cfg.admin = Some(meshsign_client::config::AdminIdentity {
        cert_file: other_dir.join("admin.pem"),
        key_file: other_dir.join("admin.key.pem"),
    });
    let mut foreign = meshsign_client::site::admin::connect(&cfg).await.unwrap();
    let before = site.audit().len();
    for _ in 0..3 {
        let err = foreign
            .list_issuers(v1::EnvironmentRequest {
                environment: "staging".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
        assert!(
            err.message()
                .starts_with("operator: not an ops identity of this trust domain"),
            "{}",
            err.message()
        );
    }
    assert_eq!(
        site.audit().len(),
        before,
        "counted, not written one by one: the holder of such a certificate cannot fill the log"
    );
    let s = site.state();
    s.summaries.flush(&s.audit).await.unwrap();
    assert_eq!(site.audit().len(), before + 1, "one summary entry");
    let rec = site.last_audit();
    assert_eq!(
        (
            rec.rpc.as_str(),
            rec.decision.as_str(),
            rec.reason.as_str(),
            rec.operator.as_str()
        ),
        ("Admin.ListIssuers", "deny", "operator", "(unidentified)")
    );
    assert_eq!(rec.peer, "127.0.0.1", "the peer address is recorded");
    // The certificate is named by its SANs and its SHA-256.
    let pem = std::fs::read(other_dir.join("admin.pem")).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let sha = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
    assert!(
        rec.subject.starts_with("uri:spiffe://other.test/ops/"),
        "{}",
        rec.subject
    );
    assert!(
        rec.detail.contains(&format!("certificate sha256 {sha}"))
            && rec.detail.contains("3 refusal(s) between"),
        "{}",
        rec.detail
    );
    // The real operator is still served, and its calls are audited under its name.
    site.admin()
        .await
        .list_issuers(v1::EnvironmentRequest {
            environment: "staging".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        site.last_audit().operator,
        "spiffe://meshsign.test/ops/admin/dev"
    );
}

#[tokio::test]
async fn jwks_with_private_members_is_refused_however_it_is_spelled() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let mut jwk = site.es.jwk();
    // `"\u0064"` is "d" in JSON: a text search for `"d"` would let it through.
    let scalar = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
    let mut text = serde_json::json!({ "keys": [jwk.clone()] }).to_string();
    text = text.replacen("\"kty\"", &format!("\"\\u0064\":\"{scalar}\",\"kty\""), 1);
    let err = admin
        .set_jwks(v1::SetJwksRequest {
            environment: "production".into(),
            issuer: ES_ISSUER.into(),
            jwks_json: text.into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("private member `d`"),
        "{}",
        err.message()
    );
    jwk["qi"] = serde_json::json!(scalar);
    let err = admin
        .set_jwks(v1::SetJwksRequest {
            environment: "production".into(),
            issuer: ES_ISSUER.into(),
            jwks_json: serde_json::json!({ "keys": [jwk] })
                .to_string()
                .into_bytes(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("private member `qi`"),
        "{}",
        err.message()
    );
    assert!(
        !site.audit().iter().any(|r| r.detail.contains(scalar)),
        "the private scalar is recorded nowhere"
    );
}

/// Issue 25 row 2: for GitHub a job is its check run (`check_run_id`), a pipeline its workflow
/// run (`run_id`). Revoking one job leaves its sibling in the same run signing; revoking the
/// run takes out every job of it (and bars new ones) and nothing of another run. A token
/// without `check_run_id` is the run's attempt, and its enrollment entry says so.
#[tokio::test]
async fn a_github_job_is_its_check_run_and_a_pipeline_its_run() {
    let site = TestSite::start().await;
    let mut admin = site.admin().await;
    let job = |check_run: &'static str, run: &'static str| {
        move |c: &mut serde_json::Value| {
            c["check_run_id"] = check_run.into();
            c["run_id"] = run.into();
            c["run_attempt"] = "2".into();
        }
    };
    let (_ka, ra, mut a) = site
        .enrolled_with("production", job("38000000001", "13400000001"))
        .await;
    let (_kb, _rb, mut sibling) = site
        .enrolled_with("production", job("38000000002", "13400000001"))
        .await;
    let (_kc, _rc, mut other_run) = site
        .enrolled_with("production", job("38000000003", "13400000002"))
        .await;

    // The certificate carries job, pipeline and attempt; the entries name the pipeline.
    let (_, cert) = X509Certificate::from_der(&ra.certificate_chain[0]).unwrap();
    let oid = meshsign_evidence::identity::claims_extension_oid_der();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == &oid[2..])
        .unwrap();
    let claims = meshsign_evidence::identity::JobClaims::from_extension_value(ext.value).unwrap();
    assert_eq!(
        (
            claims.job_id.as_str(),
            claims.pipeline.as_str(),
            claims.run_attempt.as_str()
        ),
        ("38000000001", "13400000001", "2")
    );
    let enrolled = site
        .audit()
        .into_iter()
        .filter(|r| r.rpc == "Enroll" && r.decision == "allow")
        .collect::<Vec<_>>();
    assert_eq!(enrolled.len(), 3);
    assert_eq!(enrolled[0].job_id, "38000000001");
    assert_eq!(enrolled[0].pipeline_id, "13400000001");
    assert!(
        enrolled[0].detail.contains("job_id from check_run_id"),
        "{}",
        enrolled[0].detail
    );
    for s in [&mut a, &mut sibling, &mut other_run] {
        s.sign(sign_req("release", 1)).await.unwrap();
    }
    let sign = site.last_audit();
    assert_eq!(
        (sign.job_id.as_str(), sign.pipeline_id.as_str()),
        ("38000000003", "13400000002")
    );

    // Revoke one job: its sibling in the same run signs on.
    let revoke = |t: Target| v1::RevokeRequest {
        target: Some(t),
        reason: "leaked".into(),
        ..Default::default()
    };
    let r = admin
        .revoke(revoke(Target::JobId("38000000001".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.serials, vec![ra.serial.clone()]);
    let err = a.sign(sign_req("release", 2)).await.unwrap_err();
    assert!(
        err.message().starts_with("certificate_revoked: "),
        "{}",
        err.message()
    );
    sibling.sign(sign_req("release", 2)).await.unwrap();

    // Revoke the run: the sibling too, and a new job of that run cannot enroll; the other run
    // is untouched.
    let r = admin
        .revoke(revoke(Target::PipelineId("13400000001".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.serials.len(), 2, "both jobs of the run: {:?}", r.serials);
    let err = sibling.sign(sign_req("release", 3)).await.unwrap_err();
    assert!(
        err.message().starts_with("certificate_revoked: "),
        "{}",
        err.message()
    );
    other_run.sign(sign_req("release", 3)).await.unwrap();
    let key = RunnerKey::generate().unwrap();
    let mut claims = site.claims("production");
    job("38000000004", "13400000001")(&mut claims);
    let err = site
        .enrollment()
        .await
        .enroll(site.enroll_request("production", site.es.mint(&claims).unwrap(), &key))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("revoked: "), "{}", err.message());
    let rules = admin
        .list_revocations(v1::ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert!(
        rules
            .iter()
            .any(|r| r.kind_word() == "pipeline_id" && r.value == "13400000001"),
        "{rules:?}"
    );

    // A token from before check_run_id: the job is the run's attempt, and the entry says so.
    site.enrolled_with("production", |c| {
        c.as_object_mut().unwrap().remove("check_run_id");
        c["run_id"] = "13400000003".into();
        c["run_attempt"] = "1".into();
    })
    .await;
    let rec = site
        .audit()
        .into_iter()
        .rfind(|r| r.rpc == "Enroll")
        .unwrap();
    assert_eq!(rec.job_id, "13400000003-1");
    assert!(
        rec.detail
            .contains("job_id from run_id-run_attempt (no check_run_id)"),
        "{}",
        rec.detail
    );
}

/// Issue 30: the live certificates (a scrape's count, a revocation's matches) are read a page
/// of the expiry index at a time, each page's records in one store call — on PostgreSQL a
/// round trip per certificate made the scrape ~0.2 s at 10⁴ certificates.
#[tokio::test]
async fn live_certificates_are_read_a_page_per_store_call() {
    let (site, counts) = TestSite::start_counting("", meshsign_server::store::Tree::Audit).await;
    let calls = counts.calls;
    let mut serials = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (_k, resp, _s) = site.enrolled("production").await;
        serials.insert(resp.serial);
    }
    let before = calls.load(Ordering::SeqCst);
    let live = site.state().live_certificates().unwrap();
    let made = calls.load(Ordering::SeqCst) - before;
    assert_eq!(
        live.into_iter()
            .map(|c| c.serial)
            .collect::<std::collections::BTreeSet<_>>(),
        serials
    );
    // One scan of the index page, one read of its 24 records (25 calls before).
    assert!(made <= 2, "24 live certificates took {made} store calls");
}

/// Issue 30: a scrape, a revocation and the abandoned-session sweep read the expiry index (the
/// live certificates), never the whole issuance history; a store written before the index has
/// it built once, at its first start, and counts right after.
#[tokio::test]
async fn live_certificates_come_from_the_expiry_index_not_the_history() {
    let scans = Arc::new(AtomicUsize::new(0));
    let counted = scans.clone();
    let wrap = move |kv| -> Arc<dyn meshsign_server::store::Kv> {
        Arc::new(meshsign_tests::FaultyKv::counting(
            kv,
            Arc::new(AtomicBool::new(false)),
            counted.clone(),
        ))
    };
    let site = TestSite::start_with("\n[metrics]\nlisten = \"127.0.0.1:0\"\n", Some(&wrap)).await;
    let at_start = scans.load(Ordering::SeqCst);
    assert!(at_start <= 1, "a new store indexes once: {at_start}");
    let mut serials = Vec::new();
    for _ in 0..3 {
        let (_k, resp, _s) = site.enrolled("production").await;
        serials.push(resp.serial);
    }
    let live = |site: &TestSite| {
        site.state()
            .live_certificates()
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(live(&site), serials.iter().cloned().collect());
    // A scrape (meshsign_certificates_live), a revocation (its matches), a sweep.
    let addr = site.handle.metrics_addr.unwrap();
    let body = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut s = String::new();
        tcp.read_to_string(&mut s).await.unwrap();
        s
    };
    assert!(
        body.contains("meshsign_certificates_live{environment=\"production\"} 3"),
        "{body}"
    );
    site.admin()
        .await
        .revoke(v1::RevokeRequest {
            target: Some(Target::Serial(serials[0].clone())),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    site.state().sweep_abandoned(512).unwrap();
    assert_eq!(
        scans.load(Ordering::SeqCst),
        at_start,
        "no read of every issuance record after the start"
    );

    // A store from before the index: its due/ keys and marker removed while the site is down.
    let site = site
        .restart_with(|data| {
            use meshsign_server::store::{Kv as _, Tree};
            let kv = meshsign_server::store::SledKv::open(data).unwrap();
            let due = kv.scan_prefix(Tree::Meta, b"due/").unwrap();
            assert_eq!(due.len(), 3);
            for (k, _) in due {
                kv.remove(Tree::Meta, &k).unwrap();
            }
            kv.remove(Tree::Meta, b"index/due-v1").unwrap();
            kv.flush().unwrap();
        })
        .await;
    // Rebuilt at the start: all three again (a revocation rule is applied by its readers).
    assert_eq!(live(&site), serials.iter().cloned().collect());
    // And the sweep works from it: at expiry the two unrevoked sessions are abandoned.
    site.clock
        .advance(Duration::from_secs(meshsign_tests::TTL_CAP + 60));
    let sweep = site.state().sweep_abandoned(512).unwrap();
    assert_eq!((sweep.looked_at, sweep.abandoned.len()), (3, 2));
}

/// Issue 30: the `expired/` keys of the certificates swept in the last 30 days (records are
/// kept that long) sort right after the `due/` keys of the live ones. Counting the live
/// certificates (a scrape, a revocation's matches) reads the `due/` keys in pages and stops at
/// the first other key, so it reads about the live population, not the month's history: before
/// the pages, one scan read every key after the first `due/` one.
#[tokio::test]
async fn counting_live_certificates_does_not_read_the_expired_keys_after_them() {
    use meshsign_server::store::Tree;
    let (site, counts) = TestSite::start_counting("", Tree::Meta).await;
    let reads = counts.reads;
    let mut serials = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let (_k, resp, _s) = site.enrolled("production").await;
        serials.insert(resp.serial);
    }
    // A month of swept certificates, as the sweep leaves their keys.
    let kv = site.state().store.kv();
    let now = site.state().clock.unix();
    for i in 0..5_000i64 {
        let key = format!("expired/{:016x}/{:032x}", now - 86_400 + i, i);
        kv.put(Tree::Meta, key.as_bytes(), b"").unwrap();
    }
    let before = reads.load(Ordering::SeqCst);
    let live: std::collections::BTreeSet<_> = site
        .state()
        .live_certificates()
        .unwrap()
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert_eq!(live, serials);
    let read = reads.load(Ordering::SeqCst) - before;
    assert!(
        read <= 600,
        "counting 3 live certificates read {read} meta keys (5,000 expired ones follow them)"
    );
}
