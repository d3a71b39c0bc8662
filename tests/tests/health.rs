//! `grpc.health.v1.Health` on every port (issue 15): SERVING while decisions can be recorded,
//! NOT_SERVING while the audit log cannot be written, back by itself when the store is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshsign_tests::{FaultyKv, TestSite, sign_req};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn status(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_for(site: &TestSite, want: ServingStatus) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let now = status(site.enroll_channel().await, "").await;
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {now:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_is_served_on_every_port_and_follows_the_audit_log() {
    let fail = Arc::new(AtomicBool::new(false));
    let f = fail.clone();
    let wrap =
        move |kv| -> Arc<dyn meshsign_server::store::Kv> { Arc::new(FaultyKv::new(kv, f.clone())) };
    let site = TestSite::start_with("", Some(&wrap)).await;
    wait_for(&site, ServingStatus::Serving).await;
    // Every port answers, for the overall status and for its services.
    let (key, resp, mut signer) = site.enrolled("production").await;
    let sign_channel = meshsign_client::net::connect(
        &site.client.sign_endpoint,
        "localhost",
        meshsign_client::net::tls_config(
            meshsign_client::net::roots(&site.client).unwrap(),
            Some(key.identity(&resp)),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        status(sign_channel, "meshsign.v1.Signer").await,
        ServingStatus::Serving
    );
    assert_eq!(
        status(site.enroll_channel().await, "meshsign.v1.Enrollment").await,
        ServingStatus::Serving
    );

    // The store stops taking writes: the next decision fails, health says so.
    fail.store(true, Ordering::SeqCst);
    assert!(signer.sign(sign_req("release", 1)).await.is_err());
    let took = wait_for(&site, ServingStatus::NotServing).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Writes work again: the site repairs itself and serves.
    fail.store(false, Ordering::SeqCst);
    wait_for(&site, ServingStatus::Serving).await;
    signer.sign(sign_req("release", 2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_reports_not_serving_while_postgresql_is_down() {
    let pg = meshsign_certs_dev::postgres::LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&pg.store_section(), None).await;
    wait_for(&site, ServingStatus::Serving).await;
    pg.stop().unwrap();
    wait_for(&site, ServingStatus::NotServing).await;
    pg.start_again().unwrap();
    wait_for(&site, ServingStatus::Serving).await;
}

/// `GET path` over plain HTTP/1.1 (what Prometheus does); returns (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn metrics_are_scraped_over_http_with_the_named_series_after_real_traffic() {
    let site = TestSite::start_with(
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nenroll_per_source_per_second = 1\nenroll_per_source_burst = 3\n",
        None,
    )
    .await;
    let addr = site.handle.metrics_addr.expect("metrics listener");
    let (_k, enrollment, mut signer) = site.enrolled("production").await;
    signer.sign(sign_req("release", 1)).await.unwrap();
    let _ = signer.sign(sign_req("prod-only-missing", 1)).await;
    // One renewal that works, then (the job revoked) one that fails.
    let mut session = meshsign_client::session::Session {
        enrollment,
        signer: signer.clone(),
        device: None,
    };
    session.renew(&site.client, 0).await.unwrap();
    let job = site.last_audit().job_id;
    let _staging = site.enrolled("staging").await;
    let mut enroll = site.enrollment().await;
    for _ in 0..4 {
        let key = meshsign_client::session::RunnerKey::generate().unwrap();
        let _ = enroll
            .enroll(site.enroll_request("production", "x".into(), &key))
            .await;
    }
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    for series in [
        "meshsign_decisions_total{rpc=\"Enroll\",environment=\"production\",decision=\"allow\",reason=\"ok\"} 1",
        "meshsign_decisions_total{rpc=\"Sign\",environment=\"production\",decision=\"allow\",reason=\"ok\"} 1",
        "meshsign_decisions_total{rpc=\"Sign\",environment=\"production\",decision=\"deny\",reason=\"key_not_in_partition\"} 1",
        "meshsign_counted_refusals_total{rpc=\"Enroll\",reason=\"rate_limited\"}",
        "meshsign_request_duration_seconds_count{port=\"sign\"} 3",
        "meshsign_audit_head_seq ",
        "meshsign_audit_writable 1",
        "meshsign_revocation_rules 0",
        "meshsign_server_certificate_expiry_timestamp_seconds ",
        "meshsign_runner_ca_expiry_timestamp_seconds{environment=\"staging\"",
        "meshsign_key_created_timestamp_seconds{environment=\"production\",alias=\"release\",version=\"1\"}",
        "meshsign_build_info{version=\"",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        "meshsign_limit{name=\"max_connections\"} 1024",
        "meshsign_certificates_issued_total{environment=\"production\",rpc=\"Enroll\"} 1",
        "meshsign_certificates_issued_total{environment=\"production\",rpc=\"Renew\"} 1",
        "meshsign_renewals_total{environment=\"production\",result=\"ok\",reason=\"\"} 1",
        // The renewed certificate replaced the first; staging has its one.
        "meshsign_certificates_live{environment=\"production\"} 1",
        "meshsign_certificates_live{environment=\"staging\"} 1",
        "meshsign_key_rotation_due{environment=\"production\",alias=\"release\"} 0",
        "meshsign_runner_ca_rotation_due{environment=\"production\",id=\"",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
    // A renewal refused (the job was revoked) is counted with its reason.
    site.admin()
        .await
        .revoke(meshsign_proto::v1::RevokeRequest {
            target: Some(meshsign_proto::v1::revoke_request::Target::JobId(job)),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(session.renew(&site.client, 0).await.is_err());
    // Keys older than [keys] rotation_age_days (30 by default) are flagged.
    site.clock
        .advance(std::time::Duration::from_secs(31 * 86_400));
    let (_, body) = http_get(addr, "/metrics").await;
    assert!(
        body.contains("meshsign_renewals_total{environment=\"production\",result=\"failed\",reason=\"certificate_revoked\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("meshsign_key_rotation_due{environment=\"production\",alias=\"release\"} 1")
    );
    // Issue 25 row 5: so is an active runner CA past [keys] runner_ca_rotation_days (30), in
    // the metric and as ROTATE in `admin status`.
    let due: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("meshsign_runner_ca_rotation_due{environment=\"production\""))
        .collect();
    assert!(
        !due.is_empty() && due.iter().all(|l| l.ends_with(" 1")),
        "{due:?}"
    );
    let st = site
        .admin()
        .await
        .status(meshsign_proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let prod = st
        .environments
        .iter()
        .find(|e| e.name == "production")
        .unwrap();
    assert!(prod.runner_cas.iter().any(|c| c.rotation_due), "{prod:?}");
    let (status, _) = http_get(addr, "/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    // Liveness and readiness on the metrics listener (the audit log takes writes: ready).
    for path in ["/healthz", "/readyz"] {
        let (status, text) = http_get(addr, path).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}: {text}");
    }

    // Prometheus' own linter on the scrape after real traffic (sign, refusals, renewals):
    // base units, no negative sentinels, names by the conventions (`promtool check metrics`).
    let promtool = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write as _;
        let mut c = std::process::Command::new("promtool")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian prometheus) is installed by .ci/run");
        if let Some(text) = stdin {
            c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let o = c.wait_with_output().unwrap();
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (code, said) = promtool(&["check", "metrics"], Some(&body));
    assert_eq!(code, Some(0), "promtool check metrics:\n{said}");

    // The shipped alert rules parse, and every series they name is one the site exposes.
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/meshsign-alerts.yml");
    let parsed = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); \
             print('\\n'.join(r['expr'] for g in d['groups'] for r in g['rules']))",
        ])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let exprs = String::from_utf8_lossy(&parsed.stdout).into_owned();
    let mut named = 0;
    for word in exprs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("meshsign_") {
            named += 1;
            assert!(
                body.contains(&format!("\n{word}")) || body.contains(&format!("# TYPE {word} ")),
                "alert rules name {word}, which the site does not expose"
            );
        }
    }
    assert!(named >= 9, "{exprs}");
    let (code, said) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "promtool check rules:\n{said}");
}
