//! Two-person review (`[review]`): one admin proposes, a different admin approves within the
//! window, then the same call is carried out once — and nothing changes before that.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_proto::v1;
use meshsign_tests::{TestSite, sign_req};
use tonic::Code;
use tonic_types::StatusExt as _;

/// The default list (key import and disable, runner-CA revoke, trust enable, JWKS set,
/// retention) with a 10-minute window.
const REVIEW: &str = "\n[review]\nwindow_seconds = 600\n";

fn key(alias: &str) -> v1::KeyRef {
    v1::KeyRef {
        environment: "production".into(),
        alias: alias.into(),
    }
}

fn proposal_id(message: &str) -> String {
    let at = message.find("proposal p-").expect("a proposal id") + "proposal ".len();
    message[at..at + 18].to_string()
}

/// The newest audit record of `rpc` (reads are audited too).
fn last_of(site: &TestSite, rpc: &str) -> meshsign_server::audit::AuditRecord {
    site.audit()
        .into_iter()
        .rev()
        .find(|r| r.rpc == rpc)
        .expect("a record")
}

async fn key_disabled(site: &TestSite, alias: &str) -> bool {
    site.admin()
        .await
        .list_keys(v1::EnvironmentRequest {
            environment: "production".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .iter()
        .find(|k| k.alias == alias)
        .unwrap()
        .disabled
}

#[tokio::test]
async fn a_covered_change_needs_a_second_admin_and_happens_once() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);

    // Alice's call only proposes: refused, audited, nothing changed.
    let e = alice.disable_key(key("release")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().starts_with("review_required: proposal p-"),
        "{}",
        e.message()
    );
    assert!(
        e.message()
            .contains("DisableKey in production: disable key `release`")
    );
    let id = proposal_id(e.message());
    assert!(!key_disabled(&site, "release").await);
    let rec = last_of(&site, "Admin.DisableKey");
    assert_eq!(
        (rec.rpc.as_str(), rec.decision.as_str(), rec.reason.as_str()),
        ("Admin.DisableKey", "deny", "review_required")
    );
    assert!(rec.operator.ends_with("/ops/admin/dev"), "{}", rec.operator);

    // Asking again does not make a second proposal; it points at the waiting one.
    let e = alice.disable_key(key("release")).await.unwrap_err();
    assert!(e.message().contains(&id) && e.message().contains("awaits approval"));
    let listed = alice
        .list_proposals(v1::ListProposalsRequest {})
        .await
        .unwrap()
        .into_inner()
        .proposals;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].state(), listed[0].operation.as_str()),
        (v1::ProposalState::Pending, "DisableKey")
    );

    // The proposer may not approve; an auditor may not either.
    let e = alice
        .approve_proposal(v1::ApproveProposalRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().starts_with("review_self_approval: "), "{e:?}");
    assert_eq!(
        last_of(&site, "Admin.ApproveProposal").reason,
        "review_self_approval"
    );
    let e = site
        .auditor()
        .await
        .approve_proposal(v1::ApproveProposalRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(!key_disabled(&site, "release").await);

    // Bob approves: audited, and still nothing has changed.
    let p = bob
        .approve_proposal(v1::ApproveProposalRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.state(), v1::ProposalState::Approved);
    assert!(p.approver.ends_with("/ops/admin/dev-2"));
    let rec = last_of(&site, "Admin.ApproveProposal");
    assert_eq!(
        (rec.rpc.as_str(), rec.decision.as_str()),
        ("Admin.ApproveProposal", "allow")
    );
    assert!(rec.detail.contains(&id) && rec.detail.contains("proposed by"));
    assert!(!key_disabled(&site, "release").await);

    // A different request does not ride on the approval.
    let e = alice.disable_key(key("prod-only")).await.unwrap_err();
    assert!(e.message().starts_with("review_required: proposal p-"));
    assert_ne!(proposal_id(e.message()), id);
    assert!(!key_disabled(&site, "prod-only").await);

    // The approver may not carry it out alone; the proposer can, once.
    let e = bob.disable_key(key("release")).await.unwrap_err();
    assert!(e.message().contains("may not also carry it out"), "{e:?}");
    assert!(!key_disabled(&site, "release").await);
    let k = alice
        .disable_key(key("release"))
        .await
        .unwrap()
        .into_inner();
    assert!(k.disabled);
    let rec = last_of(&site, "Admin.DisableKey");
    assert_eq!(
        (rec.rpc.as_str(), rec.decision.as_str()),
        ("Admin.DisableKey", "allow")
    );
    assert!(
        rec.detail.contains(&format!("under proposal {id}")) && rec.detail.contains("dev-2"),
        "{}",
        rec.detail
    );
    // Used up: the same call again is a new proposal.
    let e = alice.disable_key(key("release")).await.unwrap_err();
    assert_ne!(proposal_id(e.message()), id);

    // An operation not on the list runs at once.
    alice.rotate_key(key("release")).await.unwrap();
}

#[tokio::test]
async fn approval_expires_with_its_window() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    let retention = |days| v1::SetAuditRetentionRequest {
        retention_days: days,
    };

    // Not approved in time.
    let e = alice.set_audit_retention(retention(1)).await.unwrap_err();
    let id = proposal_id(e.message());
    site.clock.advance(std::time::Duration::from_secs(601));
    let e = bob
        .approve_proposal(v1::ApproveProposalRequest { id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().starts_with("review_expired: "), "{e:?}");

    // Approved, but not carried out in time: the call makes a fresh proposal instead.
    let e = alice.set_audit_retention(retention(1)).await.unwrap_err();
    let id = proposal_id(e.message());
    bob.approve_proposal(v1::ApproveProposalRequest { id: id.clone() })
        .await
        .unwrap();
    site.clock.advance(std::time::Duration::from_secs(601));
    let e = alice.set_audit_retention(retention(1)).await.unwrap_err();
    assert_ne!(proposal_id(e.message()), id);
    let status = alice
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.audit_retention_days, 0, "nothing changed");
    assert_eq!(status.pending_proposals, 1);
    assert!(
        status
            .reviewed_operations
            .contains(&"SetAuditRetention".to_string())
    );

    // In time, it happens.
    let id = proposal_id(e.message());
    bob.approve_proposal(v1::ApproveProposalRequest { id })
        .await
        .unwrap();
    site.clock.advance(std::time::Duration::from_secs(60));
    let r = alice
        .set_audit_retention(retention(1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.retention_days, 1);
    let status = alice
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.audit_retention_days, status.pending_proposals),
        (1, 0)
    );
}

#[tokio::test]
async fn a_key_import_under_review_stores_no_copy_of_the_key() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    let fresh = || {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem()
    };
    let pkcs8 = fresh();
    let import = || v1::ImportKeyRequest {
        environment: "production".into(),
        alias: "imported".into(),
        pkcs8_pem: pkcs8.clone().into_bytes(),
        repositories: vec!["*".into()],
        refs: vec!["*".into()],
        chain_pem: Vec::new(),
        purposes: Vec::new(),
        backend: String::new(),
        ..Default::default()
    };
    let e = alice.import_key(import()).await.unwrap_err();
    assert!(e.message().starts_with("review_required: "));
    assert!(!e.message().contains("PRIVATE KEY"));
    let id = proposal_id(e.message());
    // The proposal holds a description and the request's SHA-256, not the request.
    let stored = site
        .state()
        .store
        .kv()
        .scan_prefix(meshsign_server::store::Tree::Meta, b"proposal/")
        .unwrap();
    assert_eq!(stored.len(), 1);
    let body = String::from_utf8_lossy(&stored[0].1).to_string();
    let b64_body: String = pkcs8.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!body.contains("PRIVATE KEY") && !body.contains(&b64_body[..40]));
    bob.approve_proposal(v1::ApproveProposalRequest { id })
        .await
        .unwrap();
    // Another key under the same alias is not what was approved.
    let mut other = import();
    other.pkcs8_pem = fresh().into_bytes();
    assert!(
        alice
            .import_key(other)
            .await
            .unwrap_err()
            .message()
            .starts_with("review_required: ")
    );
    let k = alice.import_key(import()).await.unwrap().into_inner();
    assert_eq!(k.alias, "imported");
}

#[tokio::test]
async fn review_config_is_checked_by_field() {
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let path = dir.path().join("site.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    for (from, to, needle) in [
        (
            "operations = []",
            "operations = [\"DeleteEverything\"]",
            "review.operations",
        ),
        (
            "operations = []",
            "operations = []\nwindow_seconds = 5",
            "review.window_seconds",
        ),
    ] {
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let e = meshsign_server::config::SiteConfig::load(&path).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
}

/// Every refusal, on every port, carries a `google.rpc.ErrorInfo` whose reason is the message's
/// leading reason in upper case.
#[tokio::test]
async fn refusals_carry_an_error_info_with_their_reason() {
    let site = TestSite::start().await;
    let check = |e: tonic::Status| {
        let info = e
            .get_details_error_info()
            .unwrap_or_else(|| panic!("no ErrorInfo: {e:?}"));
        let lead = e.message().split(':').next().unwrap();
        assert_eq!(info.reason, lead.to_ascii_uppercase(), "{e:?}");
        assert_eq!(info.domain, "meshsign.dev");
    };
    let runner = meshsign_client::session::RunnerKey::generate().unwrap();
    check(
        site.enrollment()
            .await
            .enroll(site.enroll_request("production", "not-a-jwt".into(), &runner))
            .await
            .unwrap_err(),
    );
    let (_k, _r, mut signer) = site.enrolled("production").await;
    check(signer.sign(sign_req("no-such-key", 1)).await.unwrap_err());
    check(
        site.auditor()
            .await
            .rotate_key(key("release"))
            .await
            .unwrap_err(),
    );
}

/// Re-enabling a trust policy the same admin disabled within the window is an undo (what the
/// revocation drill does) and needs no second admin; enabling one someone else disabled, or
/// one disabled longer ago, does.
#[tokio::test]
async fn undoing_ones_own_disable_needs_no_review_anything_else_does() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    let set = |enabled| v1::SetTrustPolicyEnabledRequest {
        environment: "production".into(),
        issuer: meshsign_tests::ES_ISSUER.into(),
        enabled,
        keep_sessions: false,
    };
    // Disabling is not on the list; Alice undoes her own disable at once.
    alice.set_trust_policy_enabled(set(false)).await.unwrap();
    let p = alice
        .set_trust_policy_enabled(set(true))
        .await
        .unwrap()
        .into_inner();
    assert!(p.enabled);
    let rec = last_of(&site, "Admin.EnableTrustPolicy");
    assert!(
        rec.detail
            .contains("no review: undoes the operator's own disable"),
        "{}",
        rec.detail
    );

    // Bob disabled it (an incident): Alice cannot simply turn it back on.
    bob.set_trust_policy_enabled(set(false)).await.unwrap();
    let e = alice.set_trust_policy_enabled(set(true)).await.unwrap_err();
    assert!(e.message().starts_with("review_required: "), "{e:?}");
    // Issue 24 row 2: nor by disabling it again first (a no-op that keeps who disabled it)
    // and then "undoing her own disable".
    alice.set_trust_policy_enabled(set(false)).await.unwrap();
    let rec = last_of(&site, "Admin.DisableTrustPolicy");
    assert!(
        rec.detail.contains("already disabled by `") && rec.detail.contains("nothing changed"),
        "{}",
        rec.detail
    );
    let e = alice.set_trust_policy_enabled(set(true)).await.unwrap_err();
    assert!(e.message().starts_with("review_required: "), "{e:?}");
    // Nor can Bob once the window has passed.
    site.clock.advance(std::time::Duration::from_secs(601));
    let e = bob.set_trust_policy_enabled(set(true)).await.unwrap_err();
    assert!(e.message().starts_with("review_required: "), "{e:?}");
    let policies = alice
        .list_trust_policies(v1::EnvironmentRequest {
            environment: "production".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(
        policies
            .iter()
            .any(|p| p.issuer == meshsign_tests::ES_ISSUER && !p.enabled)
    );
}

/// Issue 24 row 2: an undo is an undo only while nobody else has changed the policy since the
/// operator's own disable — here Bob ends the sessions Alice's disable kept.
#[tokio::test]
async fn an_undo_is_only_an_undo_while_nobody_else_changed_the_policy() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    let set = |enabled, keep_sessions| v1::SetTrustPolicyEnabledRequest {
        environment: "production".into(),
        issuer: meshsign_tests::ES_ISSUER.into(),
        enabled,
        keep_sessions,
    };
    alice
        .set_trust_policy_enabled(set(false, true))
        .await
        .unwrap();
    bob.set_trust_policy_enabled(set(false, false))
        .await
        .unwrap();
    let rec = last_of(&site, "Admin.DisableTrustPolicy");
    assert!(
        rec.detail.contains("kept sessions end now"),
        "{}",
        rec.detail
    );
    let e = alice
        .set_trust_policy_enabled(set(true, false))
        .await
        .unwrap_err();
    assert!(e.message().starts_with("review_required: "), "{e:?}");
    // The same disable repeated changes nothing and is recorded as such.
    let before = site.audit().len();
    bob.set_trust_policy_enabled(set(false, false))
        .await
        .unwrap();
    let rec = last_of(&site, "Admin.DisableTrustPolicy");
    assert_eq!(site.audit().len(), before + 1);
    assert!(rec.detail.contains("nothing changed"), "{}", rec.detail);
}

/// Issue 25 row 5: activating a runner CA is on the default reviewed list (the seed's band:
/// rotation faster than thirty days with two-person review).
#[tokio::test]
async fn activating_a_runner_ca_needs_a_second_admin_by_default() {
    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    alice
        .stage_issuer(v1::EnvironmentRequest {
            environment: "production".into(),
        })
        .await
        .unwrap();
    let activate = || v1::IssuerRef {
        environment: "production".into(),
        id: String::new(),
        reason: String::new(),
    };
    let e = alice.activate_issuer(activate()).await.unwrap_err();
    assert!(e.message().starts_with("review_required: "), "{e:?}");
    bob.approve_proposal(v1::ApproveProposalRequest {
        id: proposal_id(e.message()),
    })
    .await
    .unwrap();
    alice.activate_issuer(activate()).await.unwrap();
    assert!(
        last_of(&site, "Admin.ActivateIssuer")
            .detail
            .contains("approved by")
    );
}

/// Issue 25 row 5: a SIGHUP is a change like any other. A file that adds an issuer is refused
/// on a site whose review covers `Reload` (the default set) — the running config stays, the
/// audit entry carries the diff, `admin status` says so — until one admin proposes that exact
/// file (by SHA-256) and another approves it. Another widening file is still refused; a
/// narrowing file applies at once.
#[tokio::test]
async fn a_reload_that_widens_trust_applies_only_the_file_a_second_admin_approved() {
    use meshsign_certs_dev::{JwtAlg, OidcIssuer};
    use meshsign_client::session::RunnerKey;
    use meshsign_server::config::SiteConfig;

    let site = TestSite::start_with(REVIEW, None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    const NEW: &str = "https://ci.new.example";
    let issuer = OidcIssuer::generate(NEW, "new-1", JwtAlg::Es256).unwrap();
    std::fs::write(
        site.dir.path().join("pki/new.jwks.json"),
        issuer.jwks().to_string(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&site.site_toml).unwrap();
    // Appended after the last environment's tables: a trust policy of `production`.
    let widened = format!(
        "{text}\n[[environments.trust_policies]]\nname = \"newci\"\nissuer = \"{NEW}\"\n\
         jwks_file = \"pki/new.jwks.json\"\n\
         bound_claims = {{ repository_owner_id = \"{}\" }}\n",
        meshsign_certs_dev::GITHUB_OWNER_ID
    );
    std::fs::write(&site.site_toml, &widened).unwrap();
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        widened.as_bytes(),
    ));
    let enroll_new = || async {
        let mut claims = site.claims("production");
        claims["iss"] = NEW.into();
        let key = RunnerKey::generate().unwrap();
        site.enrollment()
            .await
            .enroll(site.enroll_request("production", issuer.mint(&claims).unwrap(), &key))
            .await
    };
    let reload = || async {
        site.handle
            .reload(SiteConfig::load(&site.site_toml).unwrap())
            .await
    };

    // Refused: the old config runs, the audit entry names the file and the widening.
    let e = reload().await.unwrap_err();
    assert!(
        e.to_string().contains("widens trust") && e.to_string().contains(&sha),
        "{e}"
    );
    let rec = last_of(&site, "Admin.Reload");
    assert_eq!(
        (rec.decision.as_str(), rec.reason.as_str()),
        ("deny", "review_required")
    );
    assert!(
        rec.detail
            .contains("production.policy[https://ci.new.example]")
            && rec.detail.contains("added trust policy")
            && rec.detail.contains(&sha),
        "{}",
        rec.detail
    );
    assert!(
        enroll_new().await.is_err(),
        "the new issuer is not trusted yet"
    );
    let st = alice
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let last = st.last_reload.clone().unwrap();
    assert!(
        !last.applied && last.widens && last.config_sha256 == sha,
        "{last:?}"
    );
    let changes: serde_json::Value = serde_json::from_str(&last.changes_json).unwrap();
    assert_eq!(changes[0]["widens"], true, "{changes}");

    // Alice proposes the file; she cannot approve it herself; until Bob does, still refused.
    let p = alice
        .propose_config(v1::ProposeConfigRequest {
            config_sha256: sha.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.operation, "Reload");
    assert!(
        p.summary
            .contains("widens: production.policy[https://ci.new.example] added"),
        "{}",
        p.summary
    );
    let e = alice
        .approve_proposal(v1::ApproveProposalRequest { id: p.id.clone() })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("review_self_approval: "), "{e:?}");
    assert!(reload().await.is_err());
    bob.approve_proposal(v1::ApproveProposalRequest { id: p.id.clone() })
        .await
        .unwrap();
    reload().await.unwrap();
    let rec = last_of(&site, "Admin.Reload");
    assert_eq!(rec.decision, "allow");
    assert!(
        rec.detail.contains("widening approved by") && rec.detail.contains(&p.id),
        "{}",
        rec.detail
    );
    enroll_new().await.expect("the approved issuer enrolls");

    // Another widening file is not covered by that approval.
    let wider = widened.replacen(
        r#"refs = ["refs/heads/main", "refs/tags/*"] }"#,
        r#"refs = ["refs/heads/*", "refs/tags/*"] }"#,
        1,
    );
    assert_ne!(wider, widened);
    std::fs::write(&site.site_toml, &wider).unwrap();
    let e = reload().await.unwrap_err();
    assert!(e.to_string().contains(".refs"), "{e}");

    // Narrowing applies at once: the new issuer's policy removed again.
    std::fs::write(&site.site_toml, &text).unwrap();
    reload().await.unwrap();
    let rec = last_of(&site, "Admin.Reload");
    assert_eq!(rec.decision, "allow");
    assert!(
        rec.detail.contains("removed trust policy"),
        "{}",
        rec.detail
    );
    assert!(!rec.detail.contains("approved"), "{}", rec.detail);
    assert!(enroll_new().await.is_err());
    let st = alice
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.last_reload.unwrap().applied);
}
