//! Renewal: a job's session outlives one certificate through the Renew RPC (no token), within
//! the environment's session ceiling; a superseded certificate presented again revokes the
//! session; a revoked job cannot renew.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use meshsign_client::session::Session;
use meshsign_proto::v1::{self, revoke_request::Target};
use meshsign_tests::{STAGING_MAX_SESSION, TTL_CAP, TestSite, sign_req};
use tonic::Code;

async fn session(site: &TestSite, env: &str) -> Session {
    let (_key, enrollment, signer) = site.enrolled(env).await;
    Session {
        enrollment,
        signer,
        device: None,
    }
}

fn expect_refusal(e: meshsign_client::ClientError, code: Code, reason: &str) {
    match e {
        meshsign_client::ClientError::Rpc {
            code: c, message, ..
        } => {
            assert_eq!(c, code, "{message}");
            assert!(message.starts_with(&format!("{reason}: ")), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn renewals_carry_a_session_across_lifetimes_and_a_copy_revokes_it() {
    let site = TestSite::start().await;
    let mut s = session(&site, "production").await;
    let first = s.enrollment.serial.clone();
    let old_signer = s.signer.clone();
    let mut serials = vec![first.clone()];
    // Three renewals, each most of a lifetime later: after them the session is past the first
    // certificate's end and still signs.
    for _ in 0..3 {
        site.clock.advance(Duration::from_secs(TTL_CAP - 400));
        s.renew(&site.client, 0).await.unwrap();
        assert!(
            !serials.contains(&s.enrollment.serial),
            "a new certificate each time"
        );
        serials.push(s.enrollment.serial.clone());
        s.sign_digest("release", [3; 32], "renewed").await.unwrap();
    }
    let renews: Vec<_> = site
        .audit()
        .into_iter()
        .filter(|r| r.rpc == "Renew" && r.decision == "allow")
        .collect();
    assert_eq!(renews.len(), 3);
    assert!(renews[0].detail.contains(&first), "{}", renews[0].detail);

    // The first certificate, used again (a copy): refused, and the whole session revoked.
    let mut copy = old_signer;
    let e = copy.sign(sign_req("release", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(
        e.message().starts_with("session_theft_suspected: "),
        "{}",
        e.message()
    );
    assert_eq!(site.last_audit().reason, "session_theft_suspected");
    let e = s
        .sign_digest("release", [4; 32], "after theft")
        .await
        .unwrap_err();
    expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
}

#[tokio::test]
async fn the_session_ceiling_and_revocations_bound_renewal() {
    let site = TestSite::start().await;
    let mut s = session(&site, "staging").await;
    // Staging allows STAGING_MAX_SESSION (5000 s) per session; the cap is 2400 s.
    site.clock.advance(Duration::from_secs(2000));
    s.renew(&site.client, 0).await.unwrap();
    site.clock.advance(Duration::from_secs(2000));
    s.renew(&site.client, 0).await.unwrap();
    // Granted only up to the ceiling: 5000 − 4000 s (give or take the clock's start second).
    let granted = u64::from(s.enrollment.granted_ttl_seconds);
    assert!(
        (STAGING_MAX_SESSION - 4000 - 61..=STAGING_MAX_SESSION - 4000 + 1).contains(&granted),
        "{granted}"
    );
    site.clock.advance(Duration::from_secs(900));
    s.sign_digest("release", [5; 32], "late").await.unwrap();
    site.clock.advance(Duration::from_secs(200));
    // Past the ceiling the certificate itself has expired; renewal is refused either way.
    let e = s.renew(&site.client, 0).await.unwrap_err();
    match &e {
        meshsign_client::ClientError::Rpc { message, .. } => assert!(
            message.starts_with("certificate_expired: ")
                || message.starts_with("session_ceiling: "),
            "{message}"
        ),
        other => panic!("{other}"),
    }

    // A revoked job cannot renew.
    let mut s = session(&site, "production").await;
    let job = site.last_audit().job_id;
    site.admin()
        .await
        .revoke(v1::RevokeRequest {
            target: Some(Target::JobId(job)),
            reason: "compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = s.renew(&site.client, 0).await.unwrap_err();
    expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
    let rec = site.last_audit();
    assert_eq!((rec.rpc.as_str(), rec.decision.as_str()), ("Renew", "deny"));
}

/// Issue 24 row 4: a thief renews the job's generation-0 certificate first; the holder's
/// `RevokeSelf` at job end (with generation 0) is refused `superseded` and revokes the whole
/// session, so the thief's renewed certificate stops signing and renewing.
#[tokio::test]
async fn revoke_self_with_a_superseded_certificate_revokes_the_thief_s_renewal() {
    let site = TestSite::start().await;
    let mut holder = session(&site, "production").await;
    let mut thief = Session {
        enrollment: holder.enrollment.clone(),
        signer: holder.signer.clone(),
        device: None,
    };
    thief.renew(&site.client, 0).await.unwrap();
    thief
        .sign_digest("release", [1; 32], "stolen")
        .await
        .unwrap();
    let e = holder.revoke_self("job finished").await.unwrap_err();
    expect_refusal(e, Code::Unauthenticated, "session_theft_suspected");
    let rec = site.last_audit();
    assert_eq!(
        (rec.rpc.as_str(), rec.reason.as_str()),
        ("RevokeSelf", "session_theft_suspected")
    );
    let e = thief
        .sign_digest("release", [2; 32], "stolen")
        .await
        .unwrap_err();
    expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
    let e = thief.renew(&site.client, 0).await.unwrap_err();
    expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
}

/// Issue 24 row 6: `admin revoke --serial S` with the serial an operator saw (the enrolled
/// certificate's) reaches the session's renewed certificate too — and the renewed serial
/// reaches the whole session as well.
#[tokio::test]
async fn a_serial_revocation_follows_the_session_through_renewals() {
    let site = TestSite::start().await;
    for revoke_first in [true, false] {
        let mut s = session(&site, "production").await;
        let first = s.enrollment.serial.clone();
        s.renew(&site.client, 0).await.unwrap();
        let second = s.enrollment.serial.clone();
        s.sign_digest("release", [1; 32], "renewed").await.unwrap();
        let serial = if revoke_first { first } else { second };
        let r = site
            .admin()
            .await
            .revoke(v1::RevokeRequest {
                target: Some(Target::Serial(serial)),
                reason: "compromised runner".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.serials.len(), 2, "{r:?}");
        let e = s
            .sign_digest("release", [2; 32], "after revoke")
            .await
            .unwrap_err();
        expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
        let e = s.renew(&site.client, 0).await.unwrap_err();
        expect_refusal(e, Code::Unauthenticated, "certificate_revoked");
    }
}

/// Issue 31 item 2: a session that stops renewing — its certificate expires neither renewed nor
/// revoked by its job — is counted as abandoned once, at the site, and shown in `admin status`
/// for the last hour; sessions that renewed or ended with `RevokeSelf` are not.
/// Issue 30: issuance records are not kept forever. Once a certificate's notAfter is
/// `KEEP_EXPIRED_RECORDS_SECONDS` behind, the housekeeping sweep removes its record and the head
/// of its session, in bounded steps; records of certificates still valid, or expired more
/// recently, stay. Without it a site's store grows by every certificate it ever issued.
#[tokio::test]
async fn issuance_records_are_removed_a_retention_period_after_their_certificates_expire() {
    use meshsign_server::state::sessions::KEEP_EXPIRED_RECORDS_SECONDS;
    use meshsign_server::store::Tree;
    let site = TestSite::start().await;
    let mut renewed = session(&site, "production").await;
    let old = session(&site, "staging").await;
    let first = renewed.enrollment.serial.clone();
    renewed.renew(&site.client, 0).await.unwrap();
    let state = site.state();
    let current = renewed.enrollment.serial.clone();
    assert_ne!(
        first, current,
        "the renewal is the session's current certificate"
    );
    let head_key = |serial: &str| {
        let r = state.issuance_record(serial).unwrap().unwrap();
        format!("session/{}", r.session_id()).into_bytes()
    };
    let session_head = head_key(&current);
    assert!(
        state
            .store
            .kv()
            .get(Tree::Meta, &session_head)
            .unwrap()
            .is_some()
    );
    site.clock.advance(Duration::from_secs(TTL_CAP + 60));
    // Expired, but within the retention period: swept, kept.
    while state.sweep_abandoned(2).unwrap().looked_at > 0 {}
    let young = session(&site, "production").await; // issued now: stays
    assert!(
        state
            .issuance_record(&old.enrollment.serial)
            .unwrap()
            .is_some()
    );
    site.clock
        .advance(Duration::from_secs(KEEP_EXPIRED_RECORDS_SECONDS as u64));
    // In bounded steps: two records per sweep here.
    let mut removed = Vec::new();
    loop {
        let s = state.sweep_abandoned(2).unwrap();
        assert!(s.records_removed <= 2);
        if s.records_removed == 0 && s.looked_at == 0 {
            break;
        }
        removed.push(s.records_removed);
    }
    assert_eq!(
        removed.iter().sum::<usize>(),
        3,
        "{removed:?}: three expired certificates"
    );
    for serial in [&first, &current, &old.enrollment.serial] {
        assert!(
            state.issuance_record(serial).unwrap().is_none(),
            "{serial} removed"
        );
    }
    assert!(
        state
            .store
            .kv()
            .get(Tree::Meta, &session_head)
            .unwrap()
            .is_none(),
        "the session's head went with its last certificate"
    );
    // The young certificate is expired by now too, but its record is within the period.
    assert!(
        state
            .issuance_record(&young.enrollment.serial)
            .unwrap()
            .is_some()
    );
    assert_eq!(state.issued_certificates().unwrap().len(), 1);
}

#[tokio::test]
async fn a_session_that_stops_renewing_is_counted_abandoned_once_and_shown_in_status() {
    let site = TestSite::start().await;
    let mut cut_off = session(&site, "production").await; // renews once, then is cut off
    let never = session(&site, "production").await; // never renews, never says goodbye
    let mut finished = session(&site, "production").await; // ends with RevokeSelf
    let mut renewed = session(&site, "staging").await; // renews, then ends with RevokeSelf
    cut_off.renew(&site.client, 0).await.unwrap();
    finished.revoke_self("job finished").await.unwrap();
    renewed.renew(&site.client, 0).await.unwrap();
    renewed.revoke_self("job finished").await.unwrap();
    let state = site.state();
    // Nothing is due while the certificates are valid.
    let sweep = state.sweep_abandoned(512).unwrap();
    assert_eq!((sweep.looked_at, sweep.abandoned.len()), (0, 0));

    site.clock.advance(Duration::from_secs(TTL_CAP + 60));
    // In bounded steps: one due certificate per pass here, the rest wait for the next.
    let first = state.sweep_abandoned(1).unwrap();
    assert_eq!(first.looked_at, 1);
    let rest = state.sweep_abandoned(512).unwrap();
    // Six certificates were issued; every one is looked at once.
    assert_eq!(first.looked_at + rest.looked_at, 6);
    let mut got: Vec<String> = first
        .abandoned
        .into_iter()
        .chain(rest.abandoned)
        .map(|(env, serial)| {
            assert_eq!(env, "production");
            serial
        })
        .collect();
    got.sort();
    let mut want = vec![
        cut_off.enrollment.serial.clone(),
        never.enrollment.serial.clone(),
    ];
    want.sort();
    assert_eq!(
        got, want,
        "the cut-off session's renewed certificate, and the silent one"
    );
    // Counted once: a later pass finds nothing.
    assert_eq!(state.sweep_abandoned(512).unwrap().looked_at, 0);
    assert_eq!(state.metrics.sessions_abandoned("production"), 2);
    assert_eq!(state.metrics.sessions_abandoned("staging"), 0);

    // `admin status`: the last hour's count per environment, in the table too.
    let status = async || {
        site.admin()
            .await
            .status(v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let st = status().await;
    let count = |st: &v1::SiteStatus, env: &str| {
        st.environments
            .iter()
            .find(|e| e.name == env)
            .unwrap()
            .sessions_abandoned_last_hour
    };
    assert_eq!((count(&st, "production"), count(&st, "staging")), (2, 0));
    let rows = meshsign_client::usecase::status::status_rows(&st);
    assert!(
        rows.iter().any(|r| r[0] == "production"
            && r[1] == "sessions"
            && r[3] == "2 in the last hour"
            && r[4].contains("MeshsignSessionsAbandoned")),
        "{rows:?}"
    );
    // An hour on, they left the window (the counter keeps them).
    site.clock.advance(Duration::from_secs(3600));
    assert_eq!(count(&status().await, "production"), 0);
    assert_eq!(state.metrics.sessions_abandoned("production"), 2);
}
