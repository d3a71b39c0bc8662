//! Claims by CI provider: GitLab's `id_tokens`, Buildkite's OIDC tokens and a generic issuer
//! (claim names copied from the providers' documentation) enroll and sign with repository- and
//! ref-scoped keys; the mapped values reach key access, the certificate and the audit record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_certs_dev::{BuildkiteJob, GitlabJob, random_id};
use meshsign_client::session::RunnerKey;
use meshsign_evidence::identity::{JobClaims, claims_extension_oid_der};
use meshsign_proto::v1;
use meshsign_tests::{REGION, RS_ISSUER, TestSite, sign_req};
use serde_json::Value;
use tonic::Code;
use x509_parser::prelude::*;

const BUILDKITE: &str = "https://agent.buildkite.com";
const GENERIC: &str = "https://ci.generic.test";

/// Production gets a Buildkite policy and a generic one, both verified with the ES256 test key.
const EXTRA: &str = r#"
[[environments.trust_policies]]
name = "buildkite"
issuer = "https://agent.buildkite.com"
jwks_file = "pki/es.jwks.json"
provider = "buildkite"
bound_claims = { organization_slug = "acme" }

[[environments.trust_policies]]
name = "generic"
issuer = "https://ci.generic.test"
jwks_file = "pki/es.jwks.json"
provider = "generic"
claim_mappings = { repository = "project", ref = "git_ref", job_id = "build" }
bound_claims = { ref = "refs/heads/*" }
"#;

async fn enroll_sign(
    site: &TestSite,
    token: String,
) -> (v1::EnrollResponse, Result<v1::SignResponse, tonic::Status>) {
    let key = RunnerKey::generate().unwrap();
    let (resp, mut s) = site
        .enroll_signed(&key, site.enroll_request("production", token, &key))
        .await;
    let signed = s.sign(sign_req("release", 7)).await.map(|r| r.into_inner());
    (resp, signed)
}

fn cert_claims(resp: &v1::EnrollResponse) -> JobClaims {
    let (_, cert) = X509Certificate::from_der(&resp.certificate_chain[0]).unwrap();
    let oid = claims_extension_oid_der();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == &oid[2..])
        .unwrap();
    JobClaims::from_extension_value(ext.value).unwrap()
}

fn aud() -> String {
    format!("meshsign:production:{REGION}")
}

#[tokio::test]
async fn gitlab_tokens_sign_with_repository_and_ref_scoped_keys() {
    let site = TestSite::start().await;
    // The key admits acme/* on refs/heads/main and refs/tags/*; GitLab's `ref` is `main`, its
    // `ref_path` is `refs/heads/main`.
    let (resp, signed) = enroll_sign(
        &site,
        site.rs.mint(&site.gitlab_claims("production")).unwrap(),
    )
    .await;
    signed.expect("a GitLab job of acme/app on main signs with `release`");
    let rec = site.last_audit();
    assert_eq!(
        (
            rec.rpc.as_str(),
            rec.provider.as_str(),
            rec.repository.as_str(),
            rec.git_ref.as_str(),
            rec.job_id.as_str()
        ),
        ("Sign", "gitlab", "acme/app", "refs/heads/main", "302")
    );
    let c = cert_claims(&resp);
    assert_eq!(
        (
            c.provider.as_str(),
            c.repository.as_str(),
            c.git_ref.as_str(),
            c.pipeline.as_str()
        ),
        ("gitlab", "acme/app", "refs/heads/main", "12345")
    );

    // A tag pipeline: ref_path refs/tags/v1.2 is admitted by refs/tags/*.
    let mut tag = GitlabJob::new("production");
    tag.git_ref = "v1.2".into();
    tag.ref_type = "tag".into();
    let claims = tag.claims(RS_ISSUER, &aud(), &random_id().unwrap(), site.now(), 300);
    let (_, signed) = enroll_sign(&site, site.rs.mint(&claims).unwrap()).await;
    signed.expect("a tag pipeline signs");

    // Another project: enrolled, but the key refuses it, naming the mapped values.
    let mut other = GitlabJob::new("production");
    other.project_path = "other/app".into();
    let claims = other.claims(RS_ISSUER, &aud(), &random_id().unwrap(), site.now(), 300);
    let (_, signed) = enroll_sign(&site, site.rs.mint(&claims).unwrap()).await;
    let err = signed.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "key_access: `other/app`@`refs/heads/main` may not use `release`"
    );
}

#[tokio::test]
async fn buildkite_and_generic_tokens_map_their_claims() {
    let site = TestSite::start_with(EXTRA, None).await;
    let bk = BuildkiteJob::new().claims(BUILDKITE, &aud(), &random_id().unwrap(), site.now(), 300);
    let (resp, signed) = enroll_sign(&site, site.es.mint(&bk).unwrap()).await;
    signed.expect("a Buildkite job of acme/app on main signs");
    let rec = site.last_audit();
    assert_eq!(
        (
            rec.provider.as_str(),
            rec.repository.as_str(),
            rec.git_ref.as_str(),
            rec.job_id.as_str()
        ),
        (
            "buildkite",
            "acme/app",
            "refs/heads/main",
            "01945ecf-80f0-41e8-9b83-a2970a9305a1"
        )
    );
    assert_eq!(cert_claims(&resp).pipeline, "5");

    // A Buildkite token of another organization fails the policy's bound claim.
    let mut foreign = BuildkiteJob::new();
    foreign.organization_slug = "evil".into();
    let claims = foreign.claims(BUILDKITE, &aud(), &random_id().unwrap(), site.now(), 300);
    let key = RunnerKey::generate().unwrap();
    let err = site
        .enrollment()
        .await
        .enroll(site.enroll_request("production", site.es.mint(&claims).unwrap(), &key))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("bound_claim: `organization_slug` is `evil`"),
        "{}",
        err.message()
    );

    // Generic: the policy's claim_mappings name the claims; bound claims match mapped values.
    let now = site.now();
    let generic = |git_ref: &str| -> Value {
        serde_json::json!({
            "iss": GENERIC, "aud": aud(), "sub": "job", "jti": random_id().unwrap(),
            "iat": now, "nbf": now, "exp": now + 300,
            "project": "acme/app", "git_ref": git_ref, "build": "b-77"
        })
    };
    let (resp, signed) =
        enroll_sign(&site, site.es.mint(&generic("refs/heads/main")).unwrap()).await;
    signed.expect("a generic job signs");
    let c = cert_claims(&resp);
    assert_eq!(
        (c.provider.as_str(), c.job_id.as_str()),
        ("generic", "b-77")
    );
    let key = RunnerKey::generate().unwrap();
    let err = site
        .enrollment()
        .await
        .enroll(site.enroll_request(
            "production",
            site.es.mint(&generic("refs/pull/1")).unwrap(),
            &key,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("bound_claim: `ref` is `refs/pull/1`"),
        "{}",
        err.message()
    );
}

#[test]
fn claim_mappings_belong_to_generic_policies_and_name_repository_and_ref() {
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let base = std::fs::read_to_string(dir.path().join("site.toml")).unwrap();
    let load = |extra: &str| {
        meshsign_server::config::SiteConfig::from_toml(&format!("{base}{extra}"), dir.path())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let err = load(
        "\n[[environments.trust_policies]]\nname = \"x\"\nissuer = \"https://x.test\"\njwks_file = \"pki/es.jwks.json\"\nclaim_mappings = { repository = \"p\" }\n",
    )
    .unwrap_err();
    assert!(
        err.contains("claim_mappings") && err.contains("generic"),
        "{err}"
    );
    let err = load(
        "\n[[environments.trust_policies]]\nname = \"x\"\nissuer = \"https://x.test\"\njwks_file = \"pki/es.jwks.json\"\nprovider = \"generic\"\nclaim_mappings = { repository = \"p\" }\n",
    )
    .unwrap_err();
    assert!(err.contains("claim_mappings.ref"), "{err}");
    let err = load(
        "\n[[environments.trust_policies]]\nname = \"x\"\nissuer = \"https://x.test\"\njwks_file = \"pki/es.jwks.json\"\nprovider = \"jenkins\"\n",
    )
    .unwrap_err();
    assert!(err.contains("provider"), "{err}");
}

#[tokio::test]
async fn access_patterns_match_within_a_path_segment() {
    let site = TestSite::start().await;
    // `release` admits refs/heads/main and refs/tags/*: a ref that climbs out of refs/tags/
    // through extra segments is not a tag.
    let (_k, _r, mut s) = site
        .enrolled_with("production", |c| {
            c["ref"] = "refs/tags/v1/../../heads/evil".into();
        })
        .await;
    let err = s.sign(sign_req("release", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("key_access: "),
        "{}",
        err.message()
    );
    let (_k, _r, mut s) = site
        .enrolled_with("production", |c| c["ref"] = "refs/tags/v1.2".into())
        .await;
    s.sign(sign_req("release", 2))
        .await
        .expect("a tag in one segment signs");
}

/// Issue 24 row 5: a generic provider whose tokens carry no job id — the job is the session
/// (the enrolled certificate's serial), so renewals do not buy a fresh per-job budget.
#[tokio::test]
async fn a_job_without_an_id_keeps_its_budget_across_renewals() {
    let site = TestSite::start_with(
        &format!(
            "{EXTRA}\n[[environments.signing_keys]]\nalias = \"budgeted\"\n\
             algorithm = \"ecdsa-p256-sha256\"\naccess = {{ repositories = [\"*\"], refs = [\"*\"] }}\n\
             max_signatures_per_job = 3\n"
        ),
        None,
    )
    .await;
    let token = generic_token(&site, None);
    let key = RunnerKey::generate().unwrap();
    let enrollment = site
        .enroll_ok(site.enroll_request("production", token, &key))
        .await;
    assert!(cert_claims(&enrollment).job_id.is_empty());
    let signer = site.signer_for(&key, &enrollment).await.unwrap();
    let mut s = meshsign_client::session::Session {
        enrollment,
        signer,
        device: None,
    };
    for i in 0..3u8 {
        s.sign_digest("budgeted", [i; 32], "a").await.unwrap();
    }
    for round in 0..3u8 {
        s.renew(&site.client, 0).await.unwrap();
        let e = s
            .sign_digest("budgeted", [10 + round; 32], "b")
            .await
            .unwrap_err();
        match e {
            meshsign_client::ClientError::Rpc { message, .. } => assert!(
                message.starts_with("budget: key `budgeted` allows 3 signature(s) per job"),
                "{message}"
            ),
            other => panic!("{other}"),
        }
    }
}

/// Issue 25 row 3: a policy that binds no owner loads only with `allow_unbound = true`, and
/// then every enrollment through it says so in its audit entry.
#[tokio::test]
async fn an_unbound_policy_is_named_in_every_enrollment_it_admits() {
    let site = TestSite::start_with(
        r#"
[[environments.trust_policies]]
name = "open"
issuer = "https://ci.generic.test"
jwks_file = "pki/es.jwks.json"
provider = "generic"
claim_mappings = { repository = "project", ref = "git_ref", job_id = "build" }
allow_unbound = true
"#,
        None,
    )
    .await;
    let token = generic_token(&site, Some("b-1"));
    let (_resp, signed) = enroll_sign(&site, token).await;
    signed.unwrap();
    let enrolled = site
        .audit()
        .into_iter()
        .rev()
        .find(|e| e.rpc == "Enroll")
        .unwrap();
    assert_eq!(enrolled.decision, "allow");
    assert!(
        enrolled
            .detail
            .contains("trust policy `open` binds no owner (allow_unbound = true)"),
        "{}",
        enrolled.detail
    );
}

/// A generic-provider token of acme/app on main (claim names as the `generic` policies map
/// them), with `build` as its job id when given.
fn generic_token(site: &TestSite, build: Option<&str>) -> String {
    let now = site.now();
    let mut claims = serde_json::json!({
        "iss": GENERIC, "aud": aud(), "sub": "job", "jti": random_id().unwrap(),
        "iat": now, "nbf": now, "exp": now + 300,
        "project": "acme/app", "git_ref": "refs/heads/main"
    });
    if let Some(b) = build {
        claims["build"] = b.into();
    }
    site.es.mint(&claims).unwrap()
}
