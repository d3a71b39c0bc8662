//! Abuse limits against a real site (issue 13): connection caps, load shedding, the enroll rate
//! limit, per-job sign quotas, signing budgets and digest allow-lists, and the summary audit
//! entries that count refusals instead of writing one entry per attacker packet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshsign_client::session::RunnerKey;
use meshsign_proto::v1;
use meshsign_server::audit::AuditRecord;
use meshsign_tests::{TestSite, sign_req, wait_until};
use tokio::io::AsyncReadExt as _;
use tonic::Code;

/// Writes the counted refusals now (the site does it every `summary_seconds`).
async fn flush_summaries(site: &TestSite) -> usize {
    let s = site.state();
    s.summaries.flush(&s.audit).await.unwrap()
}

fn summaries(site: &TestSite, reason: &str) -> Vec<AuditRecord> {
    site.audit()
        .into_iter()
        .filter(|r| r.reason == reason && r.detail.contains("(summary)"))
        .collect()
}

/// "N refusal(s) between" → N.
fn count_of(rec: &AuditRecord) -> u64 {
    let at = rec.detail.find(" refusal(s) between").expect("a summary");
    let head = &rec.detail[..at];
    let n = head.rsplit(' ').next().unwrap().trim_start_matches("; ");
    n.parse()
        .unwrap_or_else(|_| panic!("count in {:?}", rec.detail))
}

#[tokio::test]
async fn an_enroll_flood_from_one_source_is_cut_before_any_write_and_summarised() {
    let site = TestSite::start_with(
        "\n[limits]\nenroll_per_source_per_second = 1\nenroll_per_source_burst = 5\n",
        None,
    )
    .await;
    let mut enroll = site.enrollment().await;
    let before = site.audit().len();
    let mut limited = 0;
    for _ in 0..40 {
        let key = RunnerKey::generate().unwrap();
        let req = site.enroll_request("staging", "not-a-token".into(), &key);
        let err = enroll.enroll(req).await.unwrap_err();
        if err.code() == Code::ResourceExhausted {
            assert!(
                err.message()
                    .starts_with("rate_limited: too many enrollments from 127.0.0.1"),
                "{}",
                err.message()
            );
            limited += 1;
        } else {
            assert!(
                err.message().starts_with("token_malformed: "),
                "{}",
                err.message()
            );
        }
    }
    assert_eq!(limited, 35, "the burst is 5");
    assert_eq!(
        site.audit().len(),
        before + 5,
        "only the requests within the burst were recorded one by one"
    );
    assert_eq!(flush_summaries(&site).await, 1);
    let s = summaries(&site, "rate_limited");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        (s[0].rpc.as_str(), s[0].peer.as_str()),
        ("Enroll", "127.0.0.1")
    );
    assert_eq!(count_of(&s[0]), 35, "{}", s[0].detail);

    // The bucket refills with time: a valid enrollment from the same source succeeds again.
    site.clock.advance(Duration::from_secs(2));
    let key = RunnerKey::generate().unwrap();
    let req = site.enroll_request("staging", site.token("staging"), &key);
    enroll.enroll(req).await.unwrap();
}

#[tokio::test]
async fn summaries_are_written_by_the_site_on_their_interval() {
    let site = TestSite::start_with(
        "\n[limits]\nenroll_per_source_per_second = 1\nenroll_per_source_burst = 1\nsummary_seconds = 1\n",
        None,
    )
    .await;
    let mut enroll = site.enrollment().await;
    for _ in 0..4 {
        let key = RunnerKey::generate().unwrap();
        let _ = enroll
            .enroll(site.enroll_request("staging", "x".into(), &key))
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = summaries(&site, "rate_limited");
        if let Some(rec) = s.first() {
            assert_eq!(count_of(rec), 3);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no summary within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_job_over_its_sign_rate_is_refused_and_summarised_with_its_identity() {
    let site = TestSite::start_with(
        "\n[limits]\nsign_per_job_per_second = 1\nsign_per_job_burst = 3\n",
        None,
    )
    .await;
    let (_key, resp, mut signer) = site.enrolled("staging").await;
    let before = site.audit().len();
    let mut refused = 0;
    for i in 0..10 {
        match signer.sign(sign_req("release", i)).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(
                    e.message().starts_with("rate_limited: job "),
                    "{}",
                    e.message()
                );
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 7);
    assert_eq!(
        site.audit().len(),
        before + 3,
        "refusals are counted, not written"
    );
    flush_summaries(&site).await;
    let s = summaries(&site, "rate_limited");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].rpc, "Sign");
    assert_eq!(s[0].cert_serial, resp.serial);
    assert_eq!(s[0].key_id, "release", "the requested key is named");
    assert!(!s[0].job_id.is_empty());
    assert_eq!(count_of(&s[0]), 7);
    site.clock.advance(Duration::from_secs(1));
    signer.sign(sign_req("release", 99)).await.unwrap();
}

const BUDGETED_KEY: &str = r#"
[[environments.signing_keys]]
alias = "budgeted"
algorithm = "ecdsa-p256-sha256"
access = { repositories = ["*"], refs = ["*"] }
max_signatures_per_job = 5
max_signatures_per_certificate = 3
"#;

#[tokio::test]
async fn signing_budgets_hold_per_certificate_and_per_job_across_a_restart() {
    let site = TestSite::start_with(BUDGETED_KEY, None).await;
    let (_k1, r1, mut s1) = site.enrolled("production").await;
    for i in 0..3 {
        s1.sign(sign_req("budgeted", i)).await.unwrap();
    }
    let err = s1.sign(sign_req("budgeted", 9)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "budget: key `budgeted` allows 3 signature(s) per certificate; this certificate has 3 and asked for 1"
    );
    let rec = site.last_audit();
    assert_eq!(
        (
            rec.decision.as_str(),
            rec.reason.as_str(),
            rec.cert_serial.as_str()
        ),
        ("deny", "budget", r1.serial.as_str())
    );
    assert!(rec.key_id.starts_with("budgeted@"), "{}", rec.key_id);
    // An unbudgeted key of the same job is not affected.
    s1.sign(sign_req("prod-only", 1)).await.unwrap();

    // The same job on a second certificate: the job budget (5) has 2 left; a batch of 3 is
    // refused whole (nothing signed, nothing counted), a batch of 2 fits.
    let job = |c: &mut serde_json::Value, run: &str| c["check_run_id"] = run.into();
    let run_id = site.claims("production")["check_run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_k2, r2, mut s2) = site.enrolled_with("production", |c| job(c, &run_id)).await;
    let batch = |n: u8| v1::SignBatchRequest {
        key_alias: "budgeted".into(),
        sha256_digests: (0..n).map(|i| vec![i; 32]).collect(),
        artifact_name: "batch".into(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    };
    let err = s2.sign_batch(batch(3)).await.unwrap_err();
    assert!(
        err.message()
            .starts_with("budget: key `budgeted` allows 5 signature(s) per job; this job has 3"),
        "{}",
        err.message()
    );
    s2.sign_batch(batch(2)).await.unwrap();

    // Usage as ops see it.
    let usage = site
        .admin()
        .await
        .get_job_usage(v1::JobUsageRequest {
            environment: "production".into(),
            job_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let budgeted = usage
        .keys
        .iter()
        .find(|k| k.key_alias == "budgeted")
        .unwrap();
    assert_eq!(budgeted.total, 5);
    assert_eq!(budgeted.by_certificate[&r1.serial], 3);
    assert_eq!(budgeted.by_certificate[&r2.serial], 2);
    assert_eq!(
        (budgeted.per_job_budget, budgeted.per_certificate_budget),
        (Some(5), Some(3))
    );
    let other = usage
        .keys
        .iter()
        .find(|k| k.key_alias == "prod-only")
        .unwrap();
    assert_eq!((other.total, other.per_job_budget), (1, None));
    assert_eq!(site.last_audit().rpc, "Admin.GetJobUsage");

    // A restart keeps the counts: the job is still out of budget.
    let site = site.restart().await;
    let (_k3, _r3, mut s3) = site.enrolled_with("production", |c| job(c, &run_id)).await;
    let err = s3.sign(sign_req("budgeted", 1)).await.unwrap_err();
    assert!(err.message().starts_with("budget: "), "{}", err.message());
    // Counts of a key without a budget live in memory and reach the store at shutdown.
    let usage = site.state().job_usage("production", &run_id).unwrap();
    assert_eq!(usage.keys["prod-only"].total, 1);
    assert_eq!(usage.keys["budgeted"].total, 5);
}

#[tokio::test]
async fn a_key_with_a_digest_allow_list_signs_only_those_digests() {
    let lists = tempfile::tempdir().unwrap();
    let list = lists.path().join("allow.txt");
    std::fs::write(
        &list,
        format!("# release 1.2.3\n{}\n", hex::encode([7u8; 32])),
    )
    .unwrap();
    let extra = format!(
        r#"
[[environments.signing_keys]]
alias = "allowlisted"
algorithm = "ecdsa-p256-sha256"
access = {{ repositories = ["*"], refs = ["*"] }}
purposes = ["digest"]
digest_allow_list = "{}"
"#,
        list.display()
    );
    let site = TestSite::start_with(&extra, None).await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    signer.sign(sign_req("allowlisted", 7)).await.unwrap();
    let err = signer.sign(sign_req("allowlisted", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "digest_allow_list: key `allowlisted` signs only the digests in its allow-list; {} is not there",
            hex::encode([8u8; 32])
        )
    );
    assert_eq!(site.last_audit().reason, "digest_allow_list");
    // A reload re-reads the list.
    std::fs::write(&list, hex::encode([8u8; 32])).unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&site.site_toml).unwrap();
    site.handle.reload(cfg).await.unwrap();
    signer.sign(sign_req("allowlisted", 8)).await.unwrap();
    let err = signer.sign(sign_req("allowlisted", 7)).await.unwrap_err();
    assert!(err.message().starts_with("digest_allow_list: "));
}

/// Opens a TLS connection to `addr` from `source` and completes the handshake.
async fn tls_from(
    site: &TestSite,
    source: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{source}:0").parse().unwrap())?;
    let tcp = sock.connect(addr).await?;
    let roots = meshsign_client::net::roots(&site.client).unwrap();
    let tls = meshsign_client::net::tls_config(roots, None).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

#[tokio::test]
async fn connections_are_capped_per_source_and_per_listener() {
    let site = TestSite::start_with(
        "\n[limits]\nmax_connections = 12\nmax_connections_per_source = 8\n",
        None,
    )
    .await;
    let addr = site.handle.enroll_addr;
    // Eight connections from 127.0.0.1 that never start TLS hold that source's places.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let handle = &site.handle;
    let open = |n: u32| move || handle.open_connections("enroll") == n;
    wait_until("8 held connections", Duration::from_secs(5), open(8)).await;
    // The ninth from the same source is closed at once, before any TLS.
    let mut ninth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), ninth.read(&mut buf))
        .await
        .expect("closed at once, not left to time out");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Another source still gets a handshake, and the sign port has its own caps.
    tls_from(&site, "127.0.0.2", addr).await.unwrap();
    let (_k, _r, mut signer) = {
        drop(held.pop());
        drop(held.pop());
        wait_until("6 held connections", Duration::from_secs(5), open(6)).await;
        site.enrolled("staging").await
    };
    signer.sign(sign_req("release", 1)).await.unwrap();
    // Fill the listener (12) from other sources: the next is refused whatever its source.
    let mut others = Vec::new();
    for i in 0..12 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.1.{}:0", 1 + i % 2).parse().unwrap())
            .unwrap();
        if let Ok(s) = sock.connect(addr).await {
            others.push(s);
        }
    }
    wait_until("a full listener", Duration::from_secs(5), open(12)).await;
    let err = tls_from(&site, "127.0.2.1", addr).await;
    assert!(err.is_err(), "the listener is full");
    drop(held);
    drop(others);
    wait_until("every connection closed", Duration::from_secs(5), open(0)).await;
    tls_from(&site, "127.0.0.1", addr).await.unwrap();

    flush_summaries(&site).await;
    let per_source = summaries(&site, "connection_limit_source");
    assert!(
        per_source
            .iter()
            .any(|r| r.peer == "127.0.0.1" && r.rpc == "Connect"),
        "{per_source:?}"
    );
    assert!(!summaries(&site, "connection_limit").is_empty());
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed_with_resource_exhausted() {
    let site = TestSite::start_with("\n[limits]\nmax_requests_in_flight = 1\n", None).await;
    let (_k, _r, signer) = site.enrolled("staging").await;
    // Hold the audit writer: the first request waits for its entry, holding the only place.
    let state = site.state().clone();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let hold = tokio::spawn(async move {
        state
            .audit
            .exclusive(move |_, _, _| {
                let _ = held_tx.send(());
                std::thread::sleep(Duration::from_secs(2));
            })
            .await
    });
    held_rx.await.unwrap();
    let mut first = signer.clone();
    let first = tokio::spawn(async move { first.sign(sign_req("release", 1)).await });
    let metrics = site.state().metrics.clone();
    meshsign_tests::wait_until(
        "the first request holds the sign port's place",
        Duration::from_secs(5),
        || metrics.in_flight(meshsign_server::metrics::Port::Sign) == 1,
    )
    .await;
    let mut second = signer.clone();
    let err = second.sign(sign_req("release", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "overloaded: the sign port is serving its maximum of 1 requests; retry shortly"
    );
    hold.await.unwrap().unwrap();
    first.await.unwrap().unwrap();
    second.sign(sign_req("release", 3)).await.unwrap();
    flush_summaries(&site).await;
    assert_eq!(summaries(&site, "overloaded").len(), 1);
}

/// A client certificate from a CA the site does not trust (a foreign or revoked runner CA).
fn foreign_identity() -> (Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://meshsign.test/runner/staging/sg/x"
            .try_into()
            .unwrap(),
    ));
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    (leaf.der().to_vec(), key.serialize_der())
}

#[tokio::test]
async fn refused_handshakes_are_counted_into_summary_entries() {
    let site = TestSite::start().await;
    // No client certificate on the sign port: the handshake fails.
    for _ in 0..5 {
        let mut tls = tls_from(&site, "127.0.0.1", site.handle.sign_addr)
            .await
            .unwrap();
        // TLS 1.3: the server reads the (missing) certificate after the client finished.
        let mut buf = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    }
    // A certificate of a runner CA the site does not trust.
    let (leaf, key) = foreign_identity();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(site.handle.sign_addr)
            .await
            .unwrap();
        let roots = meshsign_client::net::roots(&site.client).unwrap();
        let tls = meshsign_client::net::tls_config(
            roots,
            Some(meshsign_client::net::ClientIdentity {
                chain: vec![leaf.clone().into()],
                key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.clone().into()),
            }),
        )
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(mut s) = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
        {
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        }
    }
    // A refused handshake is counted before its connection closes.
    wait_until(
        "the refused connections closed",
        Duration::from_secs(5),
        || site.handle.open_connections("sign") == 0,
    )
    .await;
    flush_summaries(&site).await;
    let s = summaries(&site, "handshake");
    assert_eq!(s.len(), 2, "one entry per distinct refusal: {s:?}");
    for r in &s {
        assert_eq!((r.rpc.as_str(), r.peer.as_str()), ("Connect", "127.0.0.1"));
        assert!(r.detail.starts_with("sign port: "), "{}", r.detail);
    }
    let no_cert = s
        .iter()
        .find(|r| r.detail.contains("peer sent no certificates"))
        .unwrap_or_else(|| panic!("no-certificate entry in {s:?}"));
    assert_eq!(count_of(no_cert), 5, "{}", no_cert.detail);
    let foreign = s
        .iter()
        .find(|r| r.detail.contains("UnknownIssuer"))
        .unwrap_or_else(|| panic!("foreign-CA entry in {s:?}"));
    assert_eq!(count_of(foreign), 3, "{}", foreign.detail);
}

#[test]
fn limits_are_validated_by_name() {
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let base = std::fs::read_to_string(dir.path().join("site.toml")).unwrap();
    for (extra, field) in [
        (
            "[limits]\nmax_connections = 4\nmax_connections_per_source = 8\n",
            "limits.max_connections_per_source",
        ),
        (
            "[limits]\nmax_requests_in_flight = 0\n",
            "limits.max_requests_in_flight",
        ),
        (
            "[limits]\nenroll_per_source_per_second = 5\nenroll_per_source_burst = 0\n",
            "limits.enroll_per_source_burst",
        ),
        ("[limits]\nmax_conections = 4\n", "limits"),
    ] {
        let err =
            meshsign_server::config::SiteConfig::from_toml(&format!("{base}\n{extra}"), dir.path())
                .unwrap_err()
                .to_string();
        assert!(err.starts_with(field), "{extra}: {err}");
    }
    let mut cfg = meshsign_server::config::SiteConfig::from_toml(&base, dir.path()).unwrap();
    assert!(meshsign_server::api::server::fit_descriptors(&mut cfg).is_ok());
    cfg.limits.max_connections = u32::MAX;
    let err = meshsign_server::api::server::fit_descriptors(&mut cfg).unwrap_err();
    assert!(
        err.starts_with("[limits] max_connections = 4294967295 needs"),
        "{err}"
    );
    cfg.dev = true;
    meshsign_server::api::server::fit_descriptors(&mut cfg).unwrap();
    assert!(
        cfg.limits.max_connections < u32::MAX / 3,
        "a dev site fits its caps instead"
    );
}

/// Issue 24 row 5: the per-certificate budget is the session's — a renewal does not reset it.
#[tokio::test]
async fn a_renewal_does_not_reset_the_certificate_budget() {
    let site = TestSite::start_with(BUDGETED_KEY, None).await;
    let (_k, enrollment, signer) = site.enrolled("production").await;
    let mut s = meshsign_client::session::Session {
        enrollment,
        signer,
        device: None,
    };
    for i in 0..2u8 {
        s.sign_digest("budgeted", [i; 32], "a").await.unwrap();
    }
    s.renew(&site.client, 0).await.unwrap();
    s.sign_digest("budgeted", [7; 32], "b").await.unwrap();
    for round in 0..3 {
        s.renew(&site.client, 0).await.unwrap();
        let e = s
            .sign_digest("budgeted", [8 + round; 32], "c")
            .await
            .unwrap_err();
        match e {
            meshsign_client::ClientError::Rpc { message, .. } => assert!(
                message.starts_with(
                    "budget: key `budgeted` allows 3 signature(s) per certificate; this certificate has 3"
                ),
                "{message}"
            ),
            other => panic!("{other}"),
        }
    }
}

/// Issue 24 row 11: refused enrollments from 120 source addresses (each within its own
/// per-source bucket) cannot grow the log faster than the site-wide cap: beyond
/// `enroll_deny_entries_burst`, refusals are counted into summary entries.
#[tokio::test]
async fn refusals_from_many_sources_cannot_outgrow_the_site_wide_cap() {
    let site = TestSite::start_with(
        "\n[limits]\nenroll_deny_entries_per_second = 5\nenroll_deny_entries_burst = 20\n",
        None,
    )
    .await;
    let before = site.audit().len();
    let mut refused = 0;
    for i in 0..120u8 {
        let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, i + 1));
        let mut enroll = site.enrollment_from(source).await;
        for _ in 0..2 {
            let key = RunnerKey::generate().unwrap();
            let req = site.enroll_request("staging", "not-a-token".into(), &key);
            let err = enroll.enroll(req).await.unwrap_err();
            assert!(
                err.message().starts_with("token_malformed: "),
                "{}",
                err.message()
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 240);
    // The clock did not move: the burst (20) was written one by one, the rest counted.
    assert_eq!(site.audit().len() - before, 20);
    let written = flush_summaries(&site).await;
    assert!(written <= 120, "{written} summary entries");
    let counted: u64 = summaries(&site, "token_malformed")
        .iter()
        .map(count_of)
        .sum();
    assert_eq!(counted, 220);
    // A valid enrollment is never capped.
    let (_k, _r, _s) = site.enrolled("staging").await;
}
