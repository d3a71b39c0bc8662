//! Every enrollment rejection, each with its gRPC status and audit reason (table-driven, as
//! SPIRE's handler tests), and no change of state.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use base64::Engine as _;
use meshsign_certs_dev::{JwtAlg, OidcIssuer};
use meshsign_client::session::RunnerKey;
use meshsign_proto::v1;
use meshsign_server::store::Tree;
use meshsign_tests::{ES_ISSUER, TTL_CAP, TestSite};
use serde_json::{Value, json};
use tonic::Code;

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn cert_count(site: &TestSite) -> usize {
    site.state()
        .store
        .kv()
        .scan_prefix(Tree::Certs, b"")
        .unwrap()
        .len()
}

/// Builds one bad request.
type Build = Box<dyn Fn(&TestSite, &RunnerKey) -> v1::EnrollRequest>;

struct Case {
    name: &'static str,
    code: Code,
    reason: &'static str,
    build: Build,
}

fn with_claims(f: impl Fn(&mut Value, i64) + 'static) -> Build {
    Box::new(move |s, k| {
        let mut c = s.claims("production");
        f(&mut c, s.now());
        s.enroll_request("production", s.es.mint(&c).unwrap(), k)
    })
}

fn with_request(f: impl Fn(&mut v1::EnrollRequest) + 'static) -> Build {
    Box::new(move |s, k| {
        let mut r = s.enroll_request("production", s.token("production"), k);
        f(&mut r);
        r
    })
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "alg none",
            code: Code::Unauthenticated,
            reason: "alg",
            build: Box::new(|s, k| {
                let t = format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "kid": "es-1"})),
                    b64(&s.claims("production"))
                );
                s.enroll_request("production", t, k)
            }),
        },
        Case {
            name: "HS256 keyed with the public JWK (alg confusion)",
            code: Code::Unauthenticated,
            reason: "alg",
            build: Box::new(|s, k| {
                let input = format!(
                    "{}.{}",
                    b64(&json!({"alg": "HS256", "kid": "es-1"})),
                    b64(&s.claims("production"))
                );
                let key = aws_lc_rs::hmac::Key::new(
                    aws_lc_rs::hmac::HMAC_SHA256,
                    s.es.jwk().to_string().as_bytes(),
                );
                let sig = aws_lc_rs::hmac::sign(&key, input.as_bytes());
                let t = format!(
                    "{input}.{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
                );
                s.enroll_request("production", t, k)
            }),
        },
        Case {
            name: "unknown kid",
            code: Code::Unauthenticated,
            reason: "kid",
            build: Box::new(|s, k| {
                let t =
                    s.es.sign_with_header(
                        &json!({"alg": "ES256", "kid": "es-2"}),
                        &s.claims("production"),
                    )
                    .unwrap();
                s.enroll_request("production", t, k)
            }),
        },
        Case {
            name: "right kid, another key (forged)",
            code: Code::Unauthenticated,
            reason: "signature",
            build: Box::new(|s, k| {
                let forger = OidcIssuer::generate(ES_ISSUER, "es-1", JwtAlg::Es256).unwrap();
                s.enroll_request(
                    "production",
                    forger.mint(&s.claims("production")).unwrap(),
                    k,
                )
            }),
        },
        Case {
            name: "wrong iss",
            code: Code::Unauthenticated,
            reason: "iss",
            build: with_claims(|c, _| c["iss"] = "https://evil.test".into()),
        },
        Case {
            name: "iss prefix",
            code: Code::Unauthenticated,
            reason: "iss",
            build: with_claims(|c, _| c["iss"] = "https://token.ci.tes".into()),
        },
        Case {
            name: "iss suffix",
            code: Code::Unauthenticated,
            reason: "iss",
            build: with_claims(|c, _| c["iss"] = "token.ci.test".into()),
        },
        Case {
            name: "iss extended",
            code: Code::Unauthenticated,
            reason: "iss",
            build: with_claims(|c, _| c["iss"] = "https://token.ci.test/".into()),
        },
        Case {
            name: "aud of another partition",
            code: Code::PermissionDenied,
            reason: "environment",
            build: with_claims(|c, _| c["aud"] = "meshsign:staging:sg".into()),
        },
        Case {
            name: "aud unknown",
            code: Code::Unauthenticated,
            reason: "aud",
            build: with_claims(|c, _| c["aud"] = "sts.amazonaws.com".into()),
        },
        Case {
            name: "expired",
            code: Code::Unauthenticated,
            reason: "exp",
            build: with_claims(|c, now| {
                c["iat"] = (now - 400).into();
                c["nbf"] = (now - 400).into();
                c["exp"] = (now - 100).into();
            }),
        },
        Case {
            name: "not yet valid",
            code: Code::Unauthenticated,
            reason: "nbf",
            build: with_claims(|c, now| {
                c["nbf"] = (now + 600).into();
                c["exp"] = (now + 900).into();
            }),
        },
        Case {
            name: "too old (iat)",
            code: Code::Unauthenticated,
            reason: "iat",
            build: with_claims(|c, now| {
                c["iat"] = (now - 3600).into();
                c["nbf"] = (now - 3600).into();
            }),
        },
        Case {
            name: "no jti",
            code: Code::Unauthenticated,
            reason: "jti",
            build: with_claims(|c, _| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        },
        Case {
            name: "bound claim mismatch",
            code: Code::PermissionDenied,
            reason: "bound_claim",
            build: with_claims(|c, _| c["runner_environment"] = "github-hosted".into()),
        },
        Case {
            name: "CSR with a bad signature",
            code: Code::InvalidArgument,
            reason: "csr",
            build: with_request(|r| {
                // The signature is the CSR's last element; change its last byte.
                let n = r.csr_der.len();
                r.csr_der[n - 1] ^= 0x01;
            }),
        },
        Case {
            name: "CSR that is not DER",
            code: Code::InvalidArgument,
            reason: "csr",
            build: with_request(|r| r.csr_der = b"not a csr".to_vec()),
        },
        Case {
            name: "non-P-256 CSR",
            code: Code::InvalidArgument,
            reason: "csr_key",
            build: Box::new(|s, k| {
                let mut r = s.enroll_request("production", s.token("production"), k);
                let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
                r.csr_der = rcgen::CertificateParams::default()
                    .serialize_request(&p384)
                    .unwrap()
                    .der()
                    .to_vec();
                r
            }),
        },
        Case {
            name: "other region",
            code: Code::FailedPrecondition,
            reason: "region",
            build: with_request(|r| r.region = "tokyo".into()),
        },
        Case {
            name: "malformed fingerprint",
            code: Code::InvalidArgument,
            reason: "fingerprint",
            build: with_request(|r| r.runner_fingerprint = "AB".repeat(32)),
        },
        Case {
            name: "unknown environment",
            code: Code::InvalidArgument,
            reason: "environment",
            build: with_request(|r| r.environment = "qa".into()),
        },
        Case {
            name: "crit header (RFC 7515 §4.1.11)",
            code: Code::Unauthenticated,
            reason: "token_malformed",
            build: Box::new(|s, k| {
                let t =
                    s.es.sign_with_header(
                        &json!({"alg": "ES256", "kid": "es-1", "crit": ["exp"], "exp": 1}),
                        &s.claims("production"),
                    )
                    .unwrap();
                s.enroll_request("production", t, k)
            }),
        },
        Case {
            name: "typ other than JWT",
            code: Code::Unauthenticated,
            reason: "token_malformed",
            build: Box::new(|s, k| {
                let t =
                    s.es.sign_with_header(
                        &json!({"alg": "ES256", "kid": "es-1", "typ": "secevent+jwt"}),
                        &s.claims("production"),
                    )
                    .unwrap();
                s.enroll_request("production", t, k)
            }),
        },
        Case {
            name: "iat = -2^63 (wrapping age)",
            code: Code::Unauthenticated,
            reason: "iat",
            build: with_claims(|c, _| c["iat"] = json!(-9.2e18)),
        },
        Case {
            name: "exp = 1e300 (saturating)",
            code: Code::Unauthenticated,
            reason: "exp",
            build: with_claims(|c, _| c["exp"] = json!(1e300)),
        },
        Case {
            name: "lifetime beyond the policy's ceiling",
            code: Code::Unauthenticated,
            reason: "token_lifetime",
            build: with_claims(|c, now| c["exp"] = json!(now + 2 * 86_400)),
        },
        Case {
            name: "aud names two environments (ambiguous)",
            code: Code::Unauthenticated,
            reason: "aud",
            build: with_claims(|c, _| {
                c["aud"] = json!(["meshsign:production:sg", "meshsign:staging:sg"])
            }),
        },
        // Issue 25 row 1: one token, one site — another region's audience beside ours (a
        // GitLab `id_tokens` entry with two audiences) would buy a session at each site.
        Case {
            name: "aud names this site and another region's",
            code: Code::Unauthenticated,
            reason: "aud",
            build: with_claims(|c, _| {
                c["aud"] = json!(["meshsign:production:sg", "meshsign:production:tokyo"])
            }),
        },
        Case {
            name: "aud names this site and anything else",
            code: Code::Unauthenticated,
            reason: "aud",
            build: with_claims(|c, _| c["aud"] = json!(["meshsign:production:sg", "https://x"])),
        },
        Case {
            name: "not a JWS",
            code: Code::Unauthenticated,
            reason: "token_malformed",
            build: with_request(|r| r.token = "a.b".into()),
        },
    ]
}

#[tokio::test]
async fn every_rejection_has_its_status_and_audit_reason_and_changes_nothing() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    for case in cases() {
        let key = RunnerKey::generate().unwrap();
        let req = (case.build)(&site, &key);
        let (certs_before, jti_before) = (
            cert_count(&site),
            site.state()
                .store
                .kv()
                .scan_prefix(Tree::Jti, b"")
                .unwrap()
                .len(),
        );
        let err = client.enroll(req).await.expect_err(case.name);
        assert_eq!(err.code(), case.code, "{}: {}", case.name, err.message());
        assert!(
            err.message().starts_with(&format!("{}: ", case.reason)),
            "{}: message names the check: {}",
            case.name,
            err.message()
        );
        assert!(
            !err.message().contains("Some("),
            "{}: no Rust Option text: {}",
            case.name,
            err.message()
        );
        let rec = site.last_audit();
        assert_eq!(
            (rec.rpc.as_str(), rec.decision.as_str()),
            ("Enroll", "deny"),
            "{}",
            case.name
        );
        assert_eq!(rec.reason, case.reason, "{}", case.name);
        // The audit record carries the same detail as the message (and, for a token that
        // parsed, the token's hash and kid after it).
        assert!(
            format!("{}: {}", rec.reason, rec.detail).starts_with(err.message()),
            "{}: {} / {}",
            case.name,
            rec.detail,
            err.message()
        );
        assert_eq!(
            cert_count(&site),
            certs_before,
            "{}: no certificate recorded",
            case.name
        );
        assert_eq!(
            site.state()
                .store
                .kv()
                .scan_prefix(Tree::Jti, b"")
                .unwrap()
                .len(),
            jti_before,
            "{}: no jti consumed",
            case.name
        );
    }
}

#[tokio::test]
async fn replayed_jti_is_refused_and_refusals_do_not_consume_it() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    let token = site.token("production");

    // A refusal after the token checks (bad CSR) leaves the jti usable.
    let key = RunnerKey::generate().unwrap();
    let mut bad = site.enroll_request("production", token.clone(), &key);
    bad.csr_der.truncate(10);
    assert_eq!(
        client.enroll(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let first = site.enroll_request("production", token.clone(), &key);
    client.enroll(first).await.expect("first use of the token");
    let again = site.enroll_request("production", token, &RunnerKey::generate().unwrap());
    let err = client.enroll(again).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().starts_with("jti_replay: "),
        "{}",
        err.message()
    );
    assert_eq!(site.last_audit().reason, "jti_replay");
}

#[tokio::test]
async fn ttl_above_the_cap_is_clamped_not_refused() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    for (asked, granted) in [
        (100_000u32, TTL_CAP as u32),
        (0, TTL_CAP as u32),
        (600, 600),
    ] {
        let key = RunnerKey::generate().unwrap();
        let mut req = site.enroll_request("production", site.token("production"), &key);
        req.requested_ttl_seconds = asked;
        let resp = client.enroll(req).await.unwrap().into_inner();
        assert_eq!(resp.granted_ttl_seconds, granted, "asked {asked}");
        let not_after = resp.not_after.unwrap().seconds;
        assert_eq!(not_after - site.now(), i64::from(granted));
    }
}

#[tokio::test]
async fn replay_store_is_pruned_after_expiry() {
    let site = TestSite::start().await;
    let (_k, _r, _s) = site.enrolled("staging").await;
    let jti = |s: &TestSite| {
        s.state()
            .store
            .kv()
            .scan_prefix(Tree::Jti, b"")
            .unwrap()
            .len()
    };
    assert_eq!(jti(&site), 1);
    assert_eq!(
        site.state().prune_jti().unwrap(),
        0,
        "kept until exp + leeway"
    );
    site.clock.advance(std::time::Duration::from_secs(300 + 61));
    assert_eq!(site.state().prune_jti().unwrap(), 1);
    assert_eq!(jti(&site), 0);
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_it_is_read_or_recorded() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    let key = RunnerKey::generate().unwrap();
    let before = site.audit().len();
    // 700 kB of an environment name (the red team's 0.7 MB U+0001 case).
    let mut req = site.enroll_request("production", site.token("production"), &key);
    req.environment = "\u{1}".repeat(700_000);
    let err = client.enroll(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(site.audit().len(), before, "nothing recorded for it");
    // A bounded but hostile environment is refused by name, and what is recorded is bounded.
    let mut req = site.enroll_request("production", site.token("production"), &key);
    req.environment = "\u{1}".repeat(20_000);
    let err = client.enroll(req).await.unwrap_err();
    assert!(
        err.message().starts_with("environment: "),
        "{}",
        err.message()
    );
    assert!(err.message().len() < 400, "the message is bounded");
    let rec = site.last_audit();
    assert!(rec.environment.len() <= 64, "{}", rec.environment.len());
    // What is kept of the invalid value is a prefix and the hash of the whole.
    let whole = "\u{1}".repeat(20_000);
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        whole.as_bytes(),
    ));
    assert!(
        rec.environment.starts_with('\u{1}'),
        "{:?}",
        rec.environment
    );
    assert!(
        rec.environment
            .ends_with(&format!("…[sha256:{},20000 bytes]", &sha[..16])),
        "{:?}",
        rec.environment
    );
    assert!(
        serde_json::to_vec(&rec).unwrap().len() < 4096,
        "the entry is bounded"
    );
}

/// Issue 23 row 5: the wall clock steps a day ahead (a wrong NTP answer) while housekeeping
/// runs, then back. Pruning by the wall clock alone forgot the spent token during the step and
/// enrolled it again afterwards; the replay store now waits for the monotonic clock too, and
/// the step is logged, counted and audited.
#[tokio::test]
async fn a_wall_clock_step_ahead_and_back_does_not_make_a_spent_token_usable_again() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    let token = site.token("production");
    let key = RunnerKey::generate().unwrap();
    client
        .enroll(site.enroll_request("production", token.clone(), &key))
        .await
        .expect("first use of the token");

    site.clock.step(86_400);
    meshsign_server::ops::housekeeping::run_once(site.state()).await;
    assert_eq!(
        site.state().prune_jti().unwrap(),
        0,
        "a clock stepped ahead prunes nothing that time has not passed for"
    );
    let steps: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r.rpc == "ClockStep")
        .collect();
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert!(steps[0].detail.contains("+86400 s"), "{}", steps[0].detail);
    let mut metrics = String::new();
    site.state().metrics.render(&mut metrics);
    assert!(
        metrics.contains("meshsign_clock_steps_total 1"),
        "{metrics}"
    );

    site.clock.step(-86_400);
    meshsign_server::ops::housekeeping::run_once(site.state()).await;
    let err = client
        .enroll(site.enroll_request("production", token, &RunnerKey::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().starts_with("jti_replay: "), "{err:?}");
    assert_eq!(
        site.audit().iter().filter(|r| r.rpc == "ClockStep").count(),
        2,
        "the step back is reported too"
    );

    // Time really passing still prunes.
    site.clock.advance(std::time::Duration::from_secs(300 + 61));
    assert_eq!(site.state().prune_jti().unwrap(), 1);
}

/// Issue 24 row 10: a token whose signature does not verify attaches nothing to the job it
/// names. Its entry carries the token's hash, `iss`, `kid` and the reason — no claim value —
/// so no export by job id or repository finds it.
#[tokio::test]
async fn a_forged_token_s_claims_never_reach_the_audit_log() {
    let site = TestSite::start().await;
    let mut client = site.enrollment().await;
    let forger = OidcIssuer::generate(ES_ISSUER, "es-1", JwtAlg::Es256).unwrap();
    let mut claims = site.claims("production");
    claims["job_id"] = "release-42".into();
    claims["run_id"] = "release-42".into();
    claims["check_run_id"] = "release-42".into();
    claims["repository"] = "acme/app".into();
    claims["ref"] = "refs/heads/forged".into();
    claims["sub"] = "repo:acme/app:ref:refs/heads/forged".into();
    claims["jti"] = "forged-jti-1".into();
    let token = forger.mint(&claims).unwrap();
    let key = RunnerKey::generate().unwrap();
    let err = client
        .enroll(site.enroll_request("production", token.clone(), &key))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("signature: "),
        "{}",
        err.message()
    );
    let rec = site.last_audit();
    assert_eq!(
        (rec.decision.as_str(), rec.reason.as_str()),
        ("deny", "signature")
    );
    assert_eq!(rec.token_issuer, ES_ISSUER);
    for (field, v) in [
        ("job_id", &rec.job_id),
        ("repository", &rec.repository),
        ("ref", &rec.git_ref),
        ("subject", &rec.subject),
        ("jti", &rec.jti),
    ] {
        assert!(v.is_empty(), "{field} = {v}");
    }
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ));
    assert!(
        rec.detail.contains(&format!("token sha256 {sha}")),
        "{}",
        rec.detail
    );
    assert!(rec.detail.contains("kid `es-1`"), "{}", rec.detail);
    assert!(
        !site
            .audit()
            .iter()
            .any(|e| e.job_id == "release-42" || e.repository == "acme/app"),
        "an entry names the forged job"
    );
    // A verified token's claims are still recorded (the join an auditor needs).
    let (_k, _r, _s) = site.enrolled("production").await;
    let ok = site
        .audit()
        .into_iter()
        .rev()
        .find(|e| e.rpc == "Enroll" && e.decision == "allow")
        .unwrap();
    assert!(!ok.job_id.is_empty() && !ok.jti.is_empty() && !ok.repository.is_empty());
}
