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
    let site = TestSite::start_with("\n[metrics]\nlisten = \"127.0.0.1:0\"\n", Some(&wrap)).await;
    let metrics = site.handle.metrics_addr.expect("metrics listener");
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
    // The metrics listener says the same to an HTTP probe: live, not ready.
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.contains("the audit log takes no writes"), "{body}");
    assert_eq!(http_get(metrics, "/healthz").await.0, "HTTP/1.1 200 OK");
    // Writes work again: the site repairs itself and serves.
    fail.store(false, Ordering::SeqCst);
    wait_for(&site, ServingStatus::Serving).await;
    assert_eq!(http_get(metrics, "/readyz").await.0, "HTTP/1.1 200 OK");
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
    let (status, _, body) = http_get_with(addr, path, "").await;
    (status, body)
}

/// `GET path` with `headers` (each ending in CRLF); returns (status line, headers, body).
async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> (String, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, rest) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), rest.to_lowercase(), body.to_string())
}

/// The series a PromQL query names (not its label names: matchers `{…}` and grouping
/// `by (…)`/`without (…)` are skipped): words starting `meshsign_`, `grpc_` or `process_`.
fn series_names(q: &str) -> Vec<String> {
    let mut bare = String::new();
    let mut rest = q;
    while let Some(c) = rest.chars().next() {
        let grouping = rest
            .strip_prefix("by (")
            .or_else(|| rest.strip_prefix("without ("));
        rest = if let Some(r) = grouping {
            r.split_once(')').map_or("", |(_, r)| r)
        } else if c == '{' {
            rest[1..].split_once('}').map_or("", |(_, r)| r)
        } else {
            bare.push(c);
            &rest[c.len_utf8()..]
        };
    }
    bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            ["meshsign_", "grpc_", "process_"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .map(str::to_string)
        .collect()
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
        // Per RPC and status code, under go-grpc-prometheus' names (stock dashboards).
        "grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Sign\"} 2",
        "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Sign\",grpc_code=\"OK\"} 1",
        "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Sign\",grpc_code=\"PermissionDenied\"} 1",
        "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Enrollment\",grpc_method=\"Enroll\",grpc_code=\"ResourceExhausted\"}",
        "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Renew\",grpc_code=\"OK\"} 1",
        "grpc_server_handling_seconds_count{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Sign\"} 2",
        "grpc_server_handling_seconds_bucket{grpc_type=\"unary\",grpc_service=\"meshsign.v1.Signer\",grpc_method=\"Sign\",le=\"+Inf\"} 2",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
    // A renewal refused (the job was revoked) is counted with its reason.
    site.admin()
        .await
        .revoke(meshsign_proto::v1::RevokeRequest {
            // Its serial names its session (the renewed certificate is revoked too).
            target: Some(meshsign_proto::v1::revoke_request::Target::Serial(
                session.enrollment.serial.clone(),
            )),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(session.renew(&site.client, 0).await.is_err());
    // Keys older than [keys] rotation_age_days (30 by default) are flagged.
    site.clock
        .advance(std::time::Duration::from_secs(31 * 86_400));
    // The staging job never ended its session: its certificate expired unrenewed and
    // unrevoked, so housekeeping counts it abandoned (production's was revoked: not counted).
    meshsign_server::ops::housekeeping::run_once(site.state()).await;
    let (_, body) = http_get(addr, "/metrics").await;
    for series in [
        "meshsign_sessions_abandoned_total{environment=\"staging\"} 1",
        "meshsign_sessions_abandoned_total{environment=\"production\"} 0",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
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

    // OpenMetrics when the scraper asks for it (Prometheus' own Accept header), read by the
    // reference parser (prometheus_client's, strict: `# EOF`, counter families without
    // `_total`), with the same samples as the 0.0.4 text.
    let (status, headers, om) = http_get_with(
        addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(om.ends_with("# EOF\n"));
    let parsed = {
        use std::io::Write as _;
        let mut c = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys\n\
                 from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                 fams = list(text_string_to_metric_families(sys.stdin.read()))\n\
                 for f in fams:\n    print(f.type, f.name, len(f.samples))\n",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with prometheus-client (PyPI) is installed by .ci/run");
        c.stdin.take().unwrap().write_all(om.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let families = String::from_utf8_lossy(&parsed.stdout).into_owned();
    assert!(
        parsed.status.success(),
        "prometheus_client's OpenMetrics parser refused the scrape: {}\n{om}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    for family in [
        "counter grpc_server_handled ",
        "histogram grpc_server_handling_seconds ",
        "counter meshsign_decisions ",
        "info meshsign_build ",
        "counter process_cpu_seconds ",
        "gauge meshsign_audit_head_seq 1",
    ] {
        assert!(families.contains(family), "missing {family} in\n{families}");
    }
    // Without the header: the 0.0.4 text, as before.
    let (_, headers, _) = http_get_with(addr, "/metrics", "Accept: text/plain\r\n").await;
    assert!(headers.contains("content-type: text/plain; version=0.0.4"));

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
    for word in exprs.lines().flat_map(series_names) {
        named += 1;
        assert!(
            body.contains(&format!("\n{word}")) || body.contains(&format!("# TYPE {word} ")),
            "alert rules name {word}, which the site does not expose"
        );
    }
    assert!(named >= 11, "{exprs}");
    let (code, said) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "promtool check rules:\n{said}");

    // The shipped Grafana dashboard: every query parses as PromQL (promtool, as recording
    // rules) and names only series this scrape has, so it draws on a real site.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/meshsign-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    fn queries_of(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(e)) => {
                            out.push(e.clone())
                        }
                        _ => queries_of(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| queries_of(v, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    queries_of(&dashboard, &mut queries);
    assert!(queries.len() >= 25, "{queries:?}");
    let exported = |name: &str| {
        body.contains(&format!("\n{name}{{"))
            || body.contains(&format!("\n{name} "))
            || body.contains(&format!("# TYPE {name} "))
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let names = series_names(q);
        assert!(!names.is_empty(), "dashboard query names no series: {q}");
        for name in names {
            assert!(
                exported(&name),
                "the dashboard queries {name}, which the site does not export: {q}"
            );
        }
        if q.starts_with("label_values(") {
            continue; // Grafana's variable query, not PromQL
        }
        let promql = q
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    let file = std::env::temp_dir().join(format!("meshsign-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let (code, said) = promtool(&["check", "rules", file.to_str().unwrap()], None);
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        code,
        Some(0),
        "promtool check rules on the dashboard's queries:\n{said}"
    );
}
