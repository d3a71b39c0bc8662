//! Replicas of one site on a shared PostgreSQL (issue 14), against a real PostgreSQL started by
//! the test in a temporary folder on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshsign_certs_dev::postgres::LocalPostgres;
use meshsign_client::session::RunnerKey;
use meshsign_tests::{TestSite, sign_req, wait_until};

fn store_section(pg: &LocalPostgres) -> String {
    pg.store_section()
}

/// Opens a site from `cfg` on a thread of its own (opening blocks on the database), as
/// `meshsignd` does; join it for the site or the refusal's text.
fn open_in_thread(
    cfg: meshsign_server::config::SiteConfig,
) -> std::thread::JoinHandle<Result<meshsign_server::state::SiteState, String>> {
    std::thread::spawn(move || {
        meshsign_server::state::SiteState::open(
            cfg,
            std::sync::Arc::new(meshsign_server::clock::SystemClock),
        )
        .map_err(|e| e.to_string())
    })
}

/// Verifies the site's whole audit log offline: one chain from genesis, checkpoints signed.
async fn verify_chain(site: &TestSite) -> u64 {
    let key = meshsign_tests::audit_key(site).await;
    let lines: Vec<meshsign_evidence::audit::ExportLine> = site
        .audit()
        .into_iter()
        .map(|r| meshsign_evidence::audit::ExportLine::Entry(Box::new(r)))
        .collect();
    let report = meshsign_evidence::audit::verify_export(&lines, &key).unwrap();
    report.last_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_on_postgres_enrolls_signs_and_keeps_a_verifiable_chain() {
    let pg = LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&store_section(&pg), None).await;
    let (_k, resp, mut signer) = site.enrolled("staging").await;
    let sig = signer
        .sign(sign_req("release", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!sig.signature.is_empty());
    let rec = site.last_audit();
    assert_eq!((rec.rpc.as_str(), rec.decision.as_str()), ("Sign", "allow"));
    assert_eq!(rec.cert_serial, resp.serial);
    // The state is in PostgreSQL, not in the data folder: a restart on a fresh folder (a new
    // machine for the replica) finds the same site.
    let last = verify_chain(&site).await;
    assert!(last >= 2);
    let site = site
        .restart_with(|data| std::fs::remove_dir_all(data).unwrap())
        .await;
    let mut signer = site.signer_for(&_k, &resp).await.unwrap();
    signer.sign(sign_req("release", 2)).await.unwrap();
    assert!(verify_chain(&site).await > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_raced_at_two_replicas_yields_exactly_one_certificate() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    for _ in 0..5 {
        let token = a.token("staging");
        let (ka, kb) = (
            RunnerKey::generate().unwrap(),
            RunnerKey::generate().unwrap(),
        );
        let (ra, rb) = (
            a.enroll_request("staging", token.clone(), &ka),
            b.enroll_request("staging", token, &kb),
        );
        let (mut ea, mut eb) = (a.enrollment().await, b.enrollment().await);
        let (x, y) = tokio::join!(ea.enroll(ra), eb.enroll(rb));
        let wins = [x.is_ok(), y.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "{x:?} {y:?}");
        let loser = x.err().or(y.err()).unwrap();
        assert!(
            loser.message().starts_with("jti_replay: "),
            "{}",
            loser.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_signing_at_once_write_one_chain_without_a_fork() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    let (ka, ra, _) = a.enrolled("staging").await;
    let mut workers = Vec::new();
    for (i, site) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut signer = site.signer_for(&ka, &ra).await.unwrap();
        workers.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for n in 0..25u8 {
                let r = signer
                    .sign(sign_req("release", n.wrapping_add(i as u8 * 25)))
                    .await
                    .unwrap()
                    .into_inner();
                receipts.push(r.audit_seq);
            }
            receipts
        }));
    }
    let mut seqs = Vec::new();
    for w in workers {
        seqs.extend(w.await.unwrap());
    }
    seqs.sort();
    let before = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), before, "no seq was given to two decisions");
    // Both replicas read the same single chain, and it verifies end to end (either may have
    // added a checkpoint since).
    let last_a = verify_chain(&a).await;
    let last_b = verify_chain(&b).await;
    assert!(last_a.abs_diff(last_b) <= 2, "{last_a} {last_b}");
    let all = a.audit();
    for s in &seqs {
        let e = &all[(*s - 1) as usize];
        assert_eq!((e.seq, e.rpc.as_str()), (*s, "Sign"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_newer_schema_is_refused_by_name() {
    let pg = LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&store_section(&pg), None).await;
    let site_toml = site.site_toml.clone();
    site.handle.shutdown().await;
    // A newer meshsignd migrated the database.
    let url = pg.url();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.execute("UPDATE meshsign_schema SET version = version + 1", &[])
            .unwrap();
    })
    .join()
    .unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
    let err = tokio::task::spawn_blocking(move || {
        meshsign_server::state::SiteState::open(cfg, std::sync::Arc::new(site.clock.clone()))
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("schema is version 2; this meshsignd knows versions up to 1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_decisions_are_unavailable_and_resume_without_a_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let pg = LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&store_section(&pg), None).await;
    // Four clients sign throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Result<u64, String>>>> = Arc::default();
    let mut workers = Vec::new();
    for i in 0..4u8 {
        let (_k, _r, mut signer) = site.enrolled("staging").await;
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u8;
            while !stop.load(Ordering::SeqCst) {
                n = n.wrapping_add(1);
                let r = signer.sign(sign_req("release", n ^ i)).await;
                outcomes.lock().unwrap().push(match r {
                    Ok(r) => Ok(r.into_inner().audit_seq),
                    Err(e) => Err(format!("{:?} {}", e.code(), e.message())),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    wait_until(
        "20 signatures before the stop",
        Duration::from_secs(10),
        || {
            outcomes
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.is_ok())
                .count()
                >= 20
        },
    )
    .await;
    pg.stop().unwrap();
    let down_from = outcomes.lock().unwrap().len();
    // Down until every client has been refused at least once (each says why, below).
    wait_until(
        "refusals while PostgreSQL is down",
        Duration::from_secs(10),
        || {
            outcomes.lock().unwrap()[down_from..]
                .iter()
                .filter(|r| r.is_err())
                .count()
                >= 4
        },
    )
    .await;
    let down_to = outcomes.lock().unwrap().len();
    pg.start_again().unwrap();
    // Back without a restart: every client signs again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let recent_ok = {
            let o = outcomes.lock().unwrap();
            o.len() > down_to + 20 && o[o.len() - 8..].iter().all(|r| r.is_ok())
        };
        if recent_ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not back 10 s after PostgreSQL returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    // While it was down: refusals, and each says why.
    let during: Vec<_> = outcomes[down_from..down_to]
        .iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert!(
        !during.is_empty(),
        "calls were refused while PostgreSQL was down"
    );
    for e in &during {
        assert!(
            e.starts_with("Unavailable audit_unavailable: "),
            "a refusal while down is UNAVAILABLE: {e}"
        );
    }
    // No acknowledged receipt shares a seq, and the chain verifies.
    let mut seqs: Vec<u64> = outcomes
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n);
    verify_chain(&site).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_is_enforced_by_the_other_within_a_second() {
    use meshsign_proto::v1::{self, revoke_request::Target};
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    // A job's session open on replica B.
    let (key, resp, _) = a.enrolled("staging").await;
    let mut on_b = b.signer_for(&key, &resp).await.unwrap();
    on_b.sign(sign_req("release", 1)).await.unwrap();
    // Revoked through replica A's admin port.
    let started = tokio::time::Instant::now();
    a.admin()
        .await
        .revoke(v1::RevokeRequest {
            target: Some(Target::Serial(resp.serial.clone())),
            reason: "compromised runner".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    loop {
        match on_b.sign(sign_req("release", 2)).await {
            Err(e) if e.message().starts_with("certificate_revoked: ") => break,
            other => {
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "B still signs {:?} after {:?}",
                    other.map(|_| ()),
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let took = started.elapsed();
    eprintln!("revocation through A enforced on B's open connection after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // A trust policy disabled through A: B refuses new enrollments from it.
    a.admin()
        .await
        .set_trust_policy_enabled(v1::SetTrustPolicyEnabledRequest {
            environment: "staging".into(),
            issuer: meshsign_tests::ES_ISSUER.into(),
            enabled: false,
            keep_sessions: false,
        })
        .await
        .unwrap();
    // B has picked the change up (its next poll of the shared generation, ≤ 250 ms).
    let b_state = b.state().clone();
    wait_until("B to load A's disable", Duration::from_secs(5), || {
        b_state.config().environment("staging").is_some_and(|e| {
            e.trust_policies
                .iter()
                .any(|t| t.issuer == meshsign_tests::ES_ISSUER && !t.enabled)
        })
    })
    .await;
    let k = RunnerKey::generate().unwrap();
    let err = b
        .enrollment()
        .await
        .enroll(b.enroll_request("staging", b.token("staging"), &k))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("trust_policy_disabled: "),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_an_empty_database_create_one_site() {
    let pg = LocalPostgres::start().unwrap();
    // Three rounds, each on an empty database of its own: the race is one per round.
    let base = pg.url();
    let admin_url = base.clone();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&admin_url, postgres::NoTls).unwrap();
        for n in 1..=3 {
            c.batch_execute(&format!("CREATE DATABASE round{n}"))
                .unwrap();
        }
    })
    .join()
    .unwrap();
    for n in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        meshsign_tests::write_site_files(dir.path());
        let url = format!(
            "{}/round{n}",
            base.rsplit_once('/')
                .map_or(base.as_str(), |(head, _)| head)
        );
        let toml = std::fs::read_to_string(dir.path().join("site.toml")).unwrap()
            + &pg.store_section().replace(&pg.url(), &url);
        let open = |name: &str| {
            let text = toml.replacen(
                "data_dir = \"data\"",
                &format!("data_dir = \"data-{name}\""),
                1,
            );
            let path = dir.path().join(format!("site-{name}.toml"));
            std::fs::write(&path, text).unwrap();
            let cfg = meshsign_server::config::SiteConfig::load(&path).unwrap();
            open_in_thread(cfg)
        };
        let (a, b) = (open("a"), open("b"));
        let (a, b) = (a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
        let key = |s: &meshsign_server::state::SiteState| {
            s.keys()
                .active("production", "release")
                .unwrap()
                .record
                .public_key_der
                .clone()
        };
        assert_eq!(
            key(&a),
            key(&b),
            "round {n}: one signing key, not one per replica"
        );
        assert_eq!(
            a.audit.public_key(),
            b.audit.public_key(),
            "round {n}: one audit key"
        );
        let roots = |s: &meshsign_server::state::SiteState| {
            let mut r = s.runner_roots();
            r.sort();
            r
        };
        assert_eq!(
            roots(&a),
            roots(&b),
            "round {n}: one runner CA per environment"
        );
        assert_eq!(roots(&a).len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_an_empty_or_a_foreign_database() {
    let pg = LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&store_section(&pg), None).await;
    let (_k, _r, mut signer) = site.enrolled("staging").await;
    signer.sign(sign_req("release", 1)).await.unwrap();
    let site_toml = site.site_toml.clone();
    let text = std::fs::read_to_string(&site_toml).unwrap();
    site.handle.shutdown().await;

    let reopen = |other: &LocalPostgres| {
        let text = text.replace(&pg.url(), &other.url()).replace(
            &pg.ca_file().display().to_string(),
            &other.ca_file().display().to_string(),
        );
        let path = site_toml.with_file_name("site-moved.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = meshsign_server::config::SiteConfig::load(&path).unwrap();
        open_in_thread(cfg).join().unwrap()
    };
    // An empty database (a wrong url, a restore gone wrong): never a new site in its place.
    let empty = LocalPostgres::start().unwrap();
    let err = reopen(&empty).unwrap_err();
    eprintln!("empty database: {err}");
    assert!(err.contains("site.json"), "names the marker: {err}");
    assert!(
        err.contains(&format!("the store at {} is empty", empty.url()))
            && err.contains("pg_restore"),
        "names the database and its fix: {err}"
    );
    // Another site's database.
    let other_pg = LocalPostgres::start().unwrap();
    let other = TestSite::start_with(&store_section(&other_pg), None).await;
    other.handle.shutdown().await;
    let err = reopen(&other_pg).unwrap_err();
    eprintln!("foreign database: {err}");
    assert!(err.contains("site.json") || err.contains("KEK"), "{err}");
    // A new replica (no marker yet) whose host was given another KEK.
    let text = std::fs::read_to_string(&site_toml)
        .unwrap()
        .replacen("data_dir = \"data\"", "data_dir = \"data-new\"", 1)
        .replacen("kek_file = \"kek\"", "kek_file = \"kek-other\"", 1);
    let dir = site_toml.parent().unwrap();
    meshsign_server::custody::Kek::generate_file(&dir.join("kek-other")).unwrap();
    let path = dir.join("site-new.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&path).unwrap();
    let err = open_in_thread(cfg).join().unwrap().unwrap_err();
    eprintln!("wrong KEK: {err}");
    assert!(err.to_lowercase().contains("kek"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_one_replica_is_refused_with_the_database_s_own_tools_named() {
    let pg = LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&store_section(&pg), None).await;
    let err = meshsign_client::site::admin::Admin::connect(&site.client)
        .await
        .unwrap()
        .snapshot()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("precondition: snapshot: this site's state is in PostgreSQL"),
        "{err}"
    );
    assert!(err.contains("pg_dump"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_following_one_replica_streams_what_the_other_writes() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    let mut follow = meshsign_client::site::admin::Admin::connect(&b.client)
        .await
        .unwrap()
        .export_audit(meshsign_proto::v1::ExportAuditRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (_k, resp, mut on_a) = a.enrolled("production").await;
    let signed = on_a
        .sign(sign_req("release", 9))
        .await
        .unwrap()
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(line) = follow.message().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line.json).unwrap();
            if v["seq"].as_u64() == Some(signed.audit_seq) {
                return v;
            }
        }
        panic!("the export ended");
    })
    .await
    .expect("A's entry reached B's follower within 5 s");
    assert_eq!(v_str(&seen, "cert_serial"), resp.serial);
    assert_eq!(v_str(&seen, "hash"), signed.audit_hash);
}

fn v_str(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_readable_by_others_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt as _;
    let pg = LocalPostgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let pass = dir.path().join("pgpass");
    std::fs::write(&pass, "s3cret\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let toml = std::fs::read_to_string(dir.path().join("site.toml")).unwrap()
        + &store_section(&pg)
        + "password_file = \"pgpass\"\n";
    std::fs::write(dir.path().join("site.toml"), toml).unwrap();
    let open = || {
        let cfg = meshsign_server::config::SiteConfig::load(&dir.path().join("site.toml")).unwrap();
        open_in_thread(cfg).join().unwrap()
    };
    let err = open().unwrap_err();
    assert!(err.contains("pgpass") && err.contains("chmod 600"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    open().unwrap();
}

/// Issue 23 row 6: PostgreSQL stopped (SIGSTOP: its sockets stay open, it answers nothing)
/// under load at two replicas. Every request ends within a few statement timeouts — none hangs
/// for the request timeout —, health answers at once on fresh TLS connections and says
/// NOT_SERVING on both replicas, then SERVING again after SIGCONT, and signing resumes without
/// a restart; one chain, no seq twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_fails_fast_says_not_serving_and_recovers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const TIMEOUT_MS: u64 = 1000;
    let pg = LocalPostgres::start().unwrap();
    let section = format!(
        "{}statement_timeout_ms = {TIMEOUT_MS}\n",
        store_section(&pg)
    );
    let a = TestSite::start_with(&section, None).await;
    let b = a.replica("b").await;
    let stop = Arc::new(AtomicBool::new(false));
    type Outcome = (Duration, Result<u64, String>);
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    // Told of every outcome, so the test waits on them instead of polling.
    let told = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    for (i, site) in [&a, &a, &b, &b].into_iter().enumerate() {
        let (_k, _r, mut signer) = site.enrolled("staging").await;
        let (stop, outcomes, told) = (stop.clone(), outcomes.clone(), told.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u8;
            while !stop.load(Ordering::SeqCst) {
                n = n.wrapping_add(1);
                let t = std::time::Instant::now();
                let r = signer.sign(sign_req("release", n ^ i as u8)).await;
                let outcome = match r {
                    Ok(r) => Ok(r.into_inner().audit_seq),
                    Err(e) => Err(format!("{:?} {}", e.code(), e.message())),
                };
                let failed = outcome.is_err();
                outcomes.lock().unwrap().push((t.elapsed(), outcome));
                told.notify_one();
                if failed {
                    // Pace refusals (the database is away); successes run flat out.
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    wait_status(&a, &b, 1, Duration::from_secs(5)).await;

    pg.signal("STOP").unwrap();
    let stopped_at = outcomes.lock().unwrap().len();
    wait_status(&a, &b, 2, Duration::from_secs(8)).await;
    // Keep it stopped a while longer under load.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let (_, took) = health(&a).await;
        assert!(took < Duration::from_secs(2), "health took {took:?}");
    }
    pg.signal("CONT").unwrap();
    let resumed_at = outcomes.lock().unwrap().len();
    wait_status(&a, &b, 1, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ok = {
            let o = outcomes.lock().unwrap();
            o.len() > resumed_at + 20 && o[o.len() - 8..].iter().all(|(_, r)| r.is_ok())
        };
        if ok {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            tokio::time::timeout(left, told.notified()).await.is_ok(),
            "signing resumes"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let during = &outcomes[stopped_at..resumed_at];
    let refused: Vec<_> = during.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        !refused.is_empty(),
        "requests were refused while it was stopped"
    );
    for (_, r) in &refused {
        let e = r.as_ref().unwrap_err();
        assert!(e.starts_with("Unavailable "), "{e}");
    }
    // No request waited anywhere near the 30 s request timeout: a Sign makes a few store
    // calls, each bounded by the statement timeout.
    let slowest = outcomes.iter().map(|(d, _)| *d).max().unwrap();
    let mut failed: Vec<Duration> = refused.iter().map(|(d, _)| *d).collect();
    failed.sort();
    eprintln!(
        "report: {} requests, {} refused while stopped; refusal latency median {:?}, slowest \
         request {slowest:?} (statement timeout {TIMEOUT_MS} ms)",
        outcomes.len(),
        refused.len(),
        failed[failed.len() / 2]
    );
    assert!(
        slowest < Duration::from_millis(8 * TIMEOUT_MS),
        "slowest request {slowest:?}"
    );
    let mut seqs: Vec<u64> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "no seq acknowledged twice");
    verify_chain(&a).await;
}

/// The overall health of `site` through a fresh TLS connection, and how long the handshake and
/// the check took (at most 2 s, or the test fails).
async fn health(site: &TestSite) -> (i32, Duration) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let t = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(2), async {
        HealthClient::new(site.enroll_channel().await)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
    })
    .await
    .expect("a TLS handshake and a health check answer within 2 s")
    .unwrap();
    (status, t.elapsed())
}

/// Polls both replicas' health until both say `want` (1 SERVING, 2 NOT_SERVING).
async fn wait_status(a: &TestSite, b: &TestSite, want: i32, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (sa, _) = health(a).await;
        let (sb, _) = health(b).await;
        if sa == want && sb == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health {want} on both replicas within {within:?} (now {sa}, {sb})"
        );
    }
}

/// Issue 24 row 7: with `RotateKey` under review, one approval used at two replicas at the same
/// moment carries out one rotation — the approval is used by a conditional update — and a key
/// version is stored by a conditional insert, so no `alias@vN` is ever made twice or
/// overwritten: every signature verifies under a published key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_approval_rotates_once_across_replicas_and_no_key_version_is_made_twice() {
    use meshsign_proto::v1;
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(
        &format!(
            "{}\n[review]\noperations = [\"RotateKey\"]\nwindow_seconds = 600\n",
            store_section(&pg)
        ),
        None,
    )
    .await;
    let b = a.replica("b").await;
    let key = v1::KeyRef {
        environment: "staging".into(),
        alias: "release".into(),
    };
    let (mut alice_a, mut alice_b, mut bob) =
        (a.admin().await, b.admin().await, a.second_admin().await);
    let (k, resp, _) = a.enrolled("staging").await;
    let (mut sa, mut sb) = (
        a.signer_for(&k, &resp).await.unwrap(),
        b.signer_for(&k, &resp).await.unwrap(),
    );
    let mut signatures = Vec::new();
    let rounds = 8;
    for round in 0..rounds {
        let e = alice_a.rotate_key(key.clone()).await.unwrap_err();
        assert!(e.message().starts_with("review_required: "), "{e:?}");
        let at = e.message().find("proposal p-").unwrap() + "proposal ".len();
        let id = e.message()[at..at + 18].to_string();
        bob.approve_proposal(v1::ApproveProposalRequest { id })
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            alice_a.rotate_key(key.clone()),
            alice_b.rotate_key(key.clone())
        );
        let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ra:?} / {rb:?}");
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(e.message().starts_with("review_required: "), "{e:?}");
            }
        }
        // A signature at each replica after the rotation (each signs with what it has loaded).
        for s in [&mut sa, &mut sb] {
            signatures.push(
                s.sign(sign_req("release", round))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }
    // Every version once (A may take up to a refresh to load B's last one); every signature
    // verifies under the published key of its version.
    let started = tokio::time::Instant::now();
    let material = loop {
        let m = a
            .verification()
            .await
            .get_verification_material(v1::GetVerificationMaterialRequest {
                environment: "staging".into(),
                key_alias: "release".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if m.keys.len() > rounds as usize || started.elapsed() > Duration::from_secs(1) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut ids: Vec<String> = material.keys.iter().map(|k| k.key_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), material.keys.len());
    assert_eq!(material.keys.len(), rounds as usize + 1, "{ids:?}");
    for s in &signatures {
        let published = material
            .keys
            .iter()
            .find(|k| k.key_id == s.key_id)
            .unwrap_or_else(|| panic!("{} is not published", s.key_id));
        assert_eq!(published.public_key_der, s.public_key_der, "{}", s.key_id);
        let digest: [u8; 32] = s.sha256_digest.as_slice().try_into().unwrap();
        meshsign_evidence::sig::Verifier::new(&s.algorithm, &s.public_key_der)
            .unwrap()
            .verify_digest(&digest, &s.signature)
            .unwrap();
    }
    verify_chain(&a).await;
}

/// A job's session enrolled at `a`, with the same certificate open at `b` as well.
async fn session_at_both(
    a: &TestSite,
    b: &TestSite,
) -> (
    meshsign_client::session::Session,
    meshsign_client::session::Session,
) {
    let (key, enrollment, on_a) = a.enrolled("staging").await;
    let on_b = b.signer_for(&key, &enrollment).await.unwrap();
    (
        meshsign_client::session::Session {
            enrollment: enrollment.clone(),
            signer: on_a,
            device: None,
        },
        meshsign_client::session::Session {
            enrollment,
            signer: on_b,
            device: None,
        },
    )
}

fn refused_with(e: &meshsign_client::ClientError, reason: &str) -> bool {
    matches!(e, meshsign_client::ClientError::Rpc { message, .. } if message.starts_with(&format!("{reason}: ")))
}

/// Signs with `s` until it is refused `certificate_revoked` — which must happen within a second
/// (a replica learns of another's change on its next refresh) — and returns how long it took.
/// Each try is a real Sign, so the wait is on the outcome, polled every 20 ms.
async fn revoked_within_a_second(s: &mut meshsign_client::session::Session, round: u8) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        match s.sign_digest("release", [round; 32], "after").await {
            Err(e) if refused_with(&e, "certificate_revoked") => return started.elapsed(),
            other => {
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "round {round}: still signs after {:?}: {:?}",
                    started.elapsed(),
                    other.map(|_| ())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Issue 24 row 3: the same certificate renewed at replica A and replica B at once. The
/// session's head moves by a conditional write in the database, so exactly one renewal wins
/// (20 of 20); the loser's caller holds a copy: the session is revoked, and within a second
/// the winner's certificate signs at neither replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_raced_at_two_replicas_give_one_certificate_and_revoke_the_session() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    for round in 0..20 {
        let (mut on_a, mut on_b) = session_at_both(&a, &b).await;
        let (ra, rb) = tokio::join!(on_a.renew(&a.client, 0), on_b.renew(&b.client, 0));
        let won = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {ra:?} / {rb:?}");
        let lost = ra.as_ref().err().or(rb.as_ref().err()).unwrap();
        assert!(refused_with(lost, "session_theft_suspected"), "{lost}");
        let winner = if ra.is_ok() { &mut on_a } else { &mut on_b };
        revoked_within_a_second(winner, round).await;
    }
    verify_chain(&a).await;
}

/// Issue 24 rows 3 and 9: renewed at A, then the old certificate presented at B a moment
/// later — B reads the session's head from the database, not its cache: refused as a copy,
/// session revoked (20 rounds). And a `RevokeSelf` acknowledged at A is enforced at B within a
/// second (20 of 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_acknowledges_about_a_session_binds_the_other_within_a_second() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    let mut worst = Duration::ZERO;
    for round in 0..20u8 {
        // Renewed at A; the old certificate at B a moment later is a copy.
        let (mut on_a, mut on_b) = session_at_both(&a, &b).await;
        on_b.sign_digest("release", [round; 32], "warm")
            .await
            .unwrap();
        on_a.renew(&a.client, 0).await.unwrap();
        let e = on_b.renew(&b.client, 0).await.unwrap_err();
        assert!(refused_with(&e, "session_theft_suspected"), "{e}");
        // RevokeSelf at A; B stops signing within a second.
        let (mut on_a, mut on_b) = session_at_both(&a, &b).await;
        on_b.sign_digest("release", [round; 32], "warm")
            .await
            .unwrap();
        on_a.revoke_self("job finished").await.unwrap();
        worst = worst.max(revoked_within_a_second(&mut on_b, round).await);
    }
    eprintln!("RevokeSelf at A enforced at B within {worst:?} (worst of 20)");
}

/// The site's connections to PostgreSQL as the server sees them: (TLS, plaintext).
fn site_connections(pg: &LocalPostgres) -> (i64, i64) {
    let url = pg.url();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = 'meshsignd'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    })
    .join()
    .unwrap()
}

/// Issue 24 row 13: the connection to PostgreSQL carries the jti store, revocations and the
/// audit chain. A site outside dev refuses a `[store]` without `ca_file` (unless
/// `allow_plaintext = true`); with it, every connection is TLS (seen from the server's
/// `pg_stat_ssl`), and a server whose certificate does not chain to that CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_is_tls_checked_against_its_ca() {
    let pg = LocalPostgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let base = std::fs::read_to_string(dir.path().join("site.toml")).unwrap();
    let load = |extra: &str| {
        let path = dir.path().join("site-tls.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        meshsign_server::config::SiteConfig::load(&path)
    };
    // No CA and no explicit plaintext: refused by name, before any connection.
    let plain = format!(
        "\n[store]\nengine = \"postgres\"\nurl = \"{}\"\npool_size = 4\n",
        pg.url()
    );
    let err = load(&plain).unwrap_err().to_string();
    assert!(
        err.contains("store.ca_file") && err.contains("allow_plaintext"),
        "{err}"
    );
    // Another CA: the server's certificate is refused, nothing is read or written.
    let stranger = LocalPostgres::start().unwrap();
    let wrong_ca = pg.store_section().replace(
        &pg.ca_file().display().to_string(),
        &stranger.ca_file().display().to_string(),
    );
    let err = open_in_thread(load(&wrong_ca).unwrap())
        .join()
        .unwrap()
        .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert_eq!(site_connections(&pg).0, 0);
    // The right CA: the site runs, over TLS only.
    let site = TestSite::start_with(&store_section(&pg), None).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    s.sign(sign_req("release", 1)).await.unwrap();
    let (tls, clear) = site_connections(&pg);
    assert!(tls > 0 && clear == 0, "{tls} TLS, {clear} plaintext");
    site.handle.shutdown().await;
    // Plaintext when the operator says so explicitly (another, empty database).
    let plain = plain.replace(&pg.url(), &stranger.url());
    let site = TestSite::start_with(&format!("{plain}allow_plaintext = true\n"), None).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    s.sign(sign_req("release", 2)).await.unwrap();
    assert!(site_connections(&stranger).1 > 0);
}

/// Issue 28: the runner registry is the store's. Registrations of one request raced at two
/// replicas give exactly one record (a conditional insert); a retirement and a revocation raced
/// end revoked every time (compare-and-swap: revoked is final, neither change is lost); what
/// one replica registered enrolls at the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_registry_raced_at_two_replicas_keeps_one_record_and_no_lost_change() {
    use meshsign_proto::v1;
    use meshsign_tests::runners::{device, proof, register, request};
    let pg = LocalPostgres::start().unwrap();
    let section = store_section(&pg);
    let a = TestSite::start_edited(
        &move |t: String| {
            let t = meshsign_tests::in_environment(&t, "production", "runners = \"registered\"");
            format!("{t}{section}")
        },
        None,
        meshsign_server::audit::AuditSettings::default(),
    )
    .await;
    let b = a.replica("b").await;
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..8 {
        let (dev, json) = device(tmp.path(), &format!("mac-{round}"));
        let (ra, rb) = tokio::join!(register(&a, &json, &[]), register(&b, &json, &[]));
        let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "round {round}: {ra:?} / {rb:?}");
        let lost = if ra.is_ok() { rb } else { ra }.unwrap_err();
        assert_eq!(
            lost.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            lost.message()
        );

        // Registered through one replica, it enrolls through the other (both ways).
        let (enrolling, other) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let key = RunnerKey::generate().unwrap();
        let tok = enrolling.token("production");
        let req = request(
            enrolling,
            &key,
            tok.clone(),
            Some(proof(&dev, &tok, &key, "production")),
        );
        enrolling.enroll_ok(req).await;

        let at = |reason: &str| v1::RunnerRef {
            fingerprint: dev.fingerprint(),
            reason: reason.into(),
        };
        let (mut admin_a, mut admin_b) = (enrolling.admin().await, other.admin().await);
        let (retired, revoked) = tokio::join!(
            admin_a.retire_runner(at("replaced")),
            admin_b.revoke_runner(at("stolen"))
        );
        assert!(
            revoked.is_ok(),
            "round {round}: {revoked:?} (retired: {retired:?})"
        );
        let state = |s: &TestSite| {
            s.state()
                .registered_runner(&dev.fingerprint())
                .unwrap()
                .unwrap()
                .state
        };
        assert_eq!(
            state(&a),
            meshsign_server::model::runner::RunnerState::Revoked,
            "round {round}"
        );
        assert_eq!(state(&b), state(&a));
    }
}

/// Issue 31 item 2 at two replicas: both sweep the same expired sessions at once, in small
/// steps, many times; each abandoned session is counted by exactly one of them (the claim is a
/// conditional insert in the database, not a process lock), and both report the same last
/// hour in `admin status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_sessions_swept_by_two_replicas_at_once_are_counted_once() {
    let pg = LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&store_section(&pg), None).await;
    let b = a.replica("b").await;
    let mut expected = 0u64;
    for round in 0..8 {
        for i in 0..6 {
            let site = if i % 2 == 0 { &a } else { &b };
            let _ = site.enrolled("staging").await;
        }
        expected += 6;
        a.clock
            .advance(Duration::from_secs(meshsign_tests::TTL_CAP + 3600));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let sweep = |site: &TestSite| {
            let (state, barrier) = (site.state().clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut counted = 0;
                loop {
                    let s = state.sweep_abandoned(2).unwrap();
                    counted += s.abandoned.len();
                    if s.looked_at == 0 {
                        return counted;
                    }
                }
            })
        };
        let (x, y) = (sweep(&a), sweep(&b));
        let (x, y) = (x.join().unwrap(), y.join().unwrap());
        assert_eq!(x + y, 6, "round {round}: a counted {x}, b counted {y}");
    }
    let (ma, mb) = (
        a.state().metrics.sessions_abandoned("staging"),
        b.state().metrics.sessions_abandoned("staging"),
    );
    assert_eq!(ma + mb, expected, "a {ma} + b {mb}");
    for site in [&a, &b] {
        let st = site
            .admin()
            .await
            .status(meshsign_proto::v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let staging = st
            .environments
            .iter()
            .find(|e| e.name == "staging")
            .unwrap();
        // The last round's six expired within the hour; earlier rounds are older (each round
        // moves the clock on by an hour and a lifetime).
        assert_eq!(staging.sessions_abandoned_last_hour, 6);
    }
}

/// A key-value store on a PostgreSQL of its own (TLS-checked) and one on sled in a temp
/// folder, to compare the engines call for call (the server and folder live as long as they).
fn both_engines() -> (
    LocalPostgres,
    meshsign_server::store::PgKv,
    tempfile::TempDir,
    meshsign_server::store::SledKv,
) {
    let pg = LocalPostgres::start().unwrap();
    let tls = meshsign_server::store::postgres::tls_from_ca_file(&pg.ca_file()).unwrap();
    let on_pg = meshsign_server::store::PgKv::open(meshsign_server::store::PgSettings {
        url: pg.url(),
        password: None,
        pool_size: 2,
        statement_timeout: Duration::from_secs(5),
        tls: Some(tls),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let on_sled = meshsign_server::store::SledKv::open(dir.path()).unwrap();
    (pg, on_pg, dir, on_sled)
}

/// Issue 30: an inclusion proof's blocks of entries and its stored nodes come back from one
/// statement on PostgreSQL (`Kv::scans_and_get_many`: a `UNION ALL` of up to two scans and the
/// keys, told apart by a column). What it returns is what the calls one by one return, on
/// PostgreSQL and on sled (the trait's default): each scan in key order and bounded, the keys
/// in the order asked, absent ones `None`, a scan past the end short — and with no keys, no
/// scan, or more scans than one statement takes.
#[test]
fn one_statement_reads_blocks_and_nodes_as_the_calls_one_by_one_do() {
    use meshsign_server::store::{Kv, Scan, Tree};
    let (_pg, on_pg, _dir, on_sled) = both_engines();
    let engines: [(&str, &dyn Kv); 2] = [("postgres", &on_pg), ("sled", &on_sled)];
    let node = |level: u8, i: u64| {
        let mut k = vec![level];
        k.extend_from_slice(&i.to_be_bytes());
        k
    };
    for (_, kv) in engines {
        for seq in 1..=40u64 {
            let entry = format!("{{\"seq\":{seq},\"rpc\":\"Sign\"}}");
            kv.put(Tree::Audit, &seq.to_be_bytes(), entry.as_bytes())
                .unwrap();
        }
        for i in 0..3u64 {
            kv.put(Tree::Merkle, &node(4, i), &[i as u8; 32]).unwrap();
        }
        kv.put(Tree::Merkle, &node(5, 0), &[9; 32]).unwrap();
    }
    let seq = |s: u64| s.to_be_bytes();
    let (s1, s17, s33, s41, s5) = (seq(1), seq(17), seq(33), seq(41), seq(5));
    let nodes = vec![node(4, 0), node(5, 0), node(6, 0), node(4, 2)];
    let asks: Vec<(Vec<Scan<'_>>, Vec<Vec<u8>>)> = vec![
        (vec![(Tree::Audit, &s17, 16)], nodes.clone()),
        (
            vec![(Tree::Audit, &s1, 16), (Tree::Audit, &s33, 16)],
            nodes.clone(),
        ),
        (
            vec![(Tree::Audit, &s33, 16), (Tree::Audit, &s1, 3)],
            Vec::new(),
        ),
        (vec![(Tree::Audit, &s41, 16)], vec![node(4, 9), node(4, 9)]),
        (
            vec![
                (Tree::Audit, &s5, 3),
                (Tree::Audit, &s17, 16),
                (Tree::Audit, &s33, 16),
            ],
            vec![node(4, 1)],
        ),
        (Vec::new(), nodes.clone()),
    ];
    for (engine, kv) in engines {
        for (scans, keys) in &asks {
            let one = kv.scans_and_get_many(scans, (Tree::Merkle, keys)).unwrap();
            let entries: Vec<_> = scans
                .iter()
                .map(|&(t, from, limit)| kv.scan_range(t, from, limit).unwrap())
                .collect();
            let values = match keys.is_empty() {
                true => Vec::new(),
                false => kv.get_many(Tree::Merkle, keys).unwrap(),
            };
            assert_eq!(one, (entries, values), "{engine}: {scans:?}, {keys:?}");
            for (scan, &(_, _, limit)) in one.0.iter().zip(scans) {
                assert!(scan.len() <= limit, "{engine}");
                assert!(scan.windows(2).all(|w| w[0].0 < w[1].0), "{engine}");
            }
        }
    }
    // What the cases stand for, read on PostgreSQL: two full-or-short blocks and two nodes
    // found, two absent.
    let (blocks, found) = on_pg
        .scans_and_get_many(&asks[1].0, (Tree::Merkle, &nodes))
        .unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!((blocks[0].len(), blocks[1].len()), (16, 8));
    assert_eq!(blocks[0][0].0, s1.to_vec());
    assert_eq!(blocks[1][0].0, s33.to_vec());
    assert_eq!(
        found,
        vec![
            Some(vec![0; 32]),
            Some(vec![9; 32]),
            None,
            Some(vec![2; 32])
        ]
    );
}

/// Issue 30: `put_many` (a group commit's Merkle nodes, both logs) is one statement on
/// PostgreSQL and stores what puts in order store, on PostgreSQL and on sled: new keys, a key
/// overwritten, a key given twice keeping its last value.
#[test]
fn one_statement_writes_many_as_puts_in_order_do() {
    use meshsign_server::store::{Kv, Tree};
    let (_pg, on_pg, _dir, on_sled) = both_engines();
    let key = |level: u8, i: u64| {
        let mut k = vec![b'A', level];
        k.extend_from_slice(&i.to_be_bytes());
        k
    };
    let (k0, k1, k2, k3) = (key(4, 0), key(4, 1), key(5, 0), key(6, 0));
    for (engine, kv) in [("postgres", &on_pg as &dyn Kv), ("sled", &on_sled)] {
        kv.put(Tree::Merkle, &k0, &[1; 32]).unwrap();
        let (a, b, c, d) = ([2u8; 32], [3u8; 32], [4u8; 32], [5u8; 32]);
        kv.put_many(
            Tree::Merkle,
            &[(&k0, &a), (&k1, &b), (&k2, &c), (&k1, &d), (&k3, &a)],
        )
        .unwrap();
        let got = kv
            .get_many(
                Tree::Merkle,
                &[k0.clone(), k1.clone(), k2.clone(), k3.clone()],
            )
            .unwrap();
        assert_eq!(
            got,
            vec![
                Some(a.to_vec()),
                Some(d.to_vec()),
                Some(c.to_vec()),
                Some(a.to_vec())
            ],
            "{engine}"
        );
        // Nothing else was written.
        assert_eq!(
            kv.scan_prefix(Tree::Merkle, b"A").unwrap().len(),
            4,
            "{engine}"
        );
    }
}
