//! The `meshsignd` process: SIGHUP re-reads `[tls]` (checked with `openssl s_client`), a signal
//! that arrives during a reload is not lost, and a refused reload keeps what runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{openssl, start_dev_logging};

/// `host:port` of an endpoint in the dev `client.toml`.
fn endpoint(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap_or_else(|| panic!("{key} in client.toml"));
    let value = line.split('"').nth(1).unwrap();
    value.rsplit("//").next().unwrap().to_string()
}

/// SHA-256 fingerprint of the certificate the server presents at `addr`.
fn served_fingerprint(dir: &Path, addr: &str) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_client",
            "-connect",
            addr,
            "-tls1_3",
            "-servername",
            "localhost",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a server certificate");
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let pem = dir.join("served.pem");
    std::fs::write(&pem, &text[start..end]).unwrap();
    file_fingerprint(dir, "served.pem")
}

fn file_fingerprint(dir: &Path, file: &str) -> String {
    openssl(
        dir,
        &["x509", "-noout", "-fingerprint", "-sha256", "-in", file],
    )
    .trim()
    .to_string()
}

#[test]
fn sighup_rereads_the_server_certificate_and_a_broken_tls_section_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let log = tmp.path().join("site.log");
    let site = start_dev_logging(&dir, Some(&log));
    let pid = site.0.id();
    let (enroll, admin) = (
        endpoint(&dir, "enroll_endpoint"),
        endpoint(&dir, "admin_endpoint"),
    );
    let before = served_fingerprint(tmp.path(), &enroll);
    assert_eq!(before, file_fingerprint(&dir, "pki/server.pem"));

    // A new server certificate and key, put in place atomically, then SIGHUP.
    let next = tmp.path().join("next");
    std::fs::create_dir_all(&next).unwrap();
    meshsign_certs_dev::DevPki::generate("meshsign.dev")
        .unwrap()
        .write_to(&next)
        .unwrap();
    for f in ["server.pem", "server.key.pem"] {
        std::fs::copy(next.join(f), dir.join("pki").join(format!("{f}.new"))).unwrap();
        std::fs::rename(
            dir.join("pki").join(format!("{f}.new")),
            dir.join("pki").join(f),
        )
        .unwrap();
    }
    let after = file_fingerprint(&dir, "pki/server.pem");
    assert_ne!(before, after);
    common::signal(pid, "-HUP");
    assert!(
        common::wait_until(Duration::from_secs(15), || served_fingerprint(
            tmp.path(),
            &enroll
        ) == after),
        "new handshakes on the enroll port use the new certificate"
    );
    assert_eq!(
        served_fingerprint(tmp.path(), &admin),
        after,
        "admin port too"
    );

    // A [tls] whose key file is gone: the reload is refused by name, the running TLS stays.
    let site_toml = dir.join("site.toml");
    let text = std::fs::read_to_string(&site_toml).unwrap();
    std::fs::write(
        &site_toml,
        text.replace("pki/server.key.pem", "pki/missing.key.pem"),
    )
    .unwrap();
    common::signal(pid, "-HUP");
    assert!(
        common::wait_until(Duration::from_secs(15), || std::fs::read_to_string(&log)
            .unwrap()
            .contains("missing.key.pem")),
        "the refusal names the file"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let refused = text
        .lines()
        .find(|l| l.contains("missing.key.pem"))
        .unwrap();
    assert!(
        refused.contains("reload refused") || refused.contains("tls:"),
        "{refused}"
    );
    assert_eq!(served_fingerprint(tmp.path(), &enroll), after);
    drop(site);
}

#[test]
fn a_stop_signal_during_a_reload_is_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut site = start_dev_logging(&dir, Some(&tmp.path().join("site.log")));
    let pid = site.0.id();
    // Back to back: the SIGTERM arrives while a SIGHUP reload runs.
    for _ in 0..3 {
        common::signal(pid, "-HUP");
    }
    common::signal(pid, "-TERM");
    let mut status = None;
    assert!(
        common::wait_until(Duration::from_secs(20), || {
            status = site.0.try_wait().unwrap();
            status.is_some()
        }),
        "meshsignd stops after SIGHUP + SIGTERM"
    );
    assert!(
        status.unwrap().success(),
        "a requested stop exits 0: {status:?}"
    );
}

#[tokio::test]
async fn attacker_strings_cannot_forge_a_log_line() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    for format in ["text", "json"] {
        let log = tmp.path().join(format!("site.{format}.log"));
        let site = common::start_dev_with_format(&dir, Some(&log), format);
        let cfg = meshsign_client::ClientConfig::load(&dir.join("client.toml")).unwrap();
        let tls =
            meshsign_client::net::tls_config(meshsign_client::net::roots(&cfg).unwrap(), None)
                .unwrap();
        let ch = meshsign_client::net::connect_to(&cfg, &cfg.enroll_endpoint, tls)
            .await
            .unwrap();
        // An unauthenticated Enroll whose environment carries a newline and a fake log line.
        let forged = "x\n2099-01-01T00:00:00.000000Z  INFO meshsign::audit: forged";
        let err = meshsign_proto::v1::enrollment_client::EnrollmentClient::new(ch)
            .enroll(meshsign_proto::v1::EnrollRequest {
                environment: forged.into(),
                token: "a.b.c".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            err.message().starts_with("environment: "),
            "{}",
            err.message()
        );
        drop(site);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("forged"), "the refusal is logged");
        for line in text.lines() {
            assert!(!line.starts_with("2099-"), "a forged line: {line}");
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            }
        }
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_after_the_handshake_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let _site = common::start_dev(&dir);
    let cfg = meshsign_client::ClientConfig::load(&dir.join("client.toml")).unwrap();
    let addr = endpoint(&dir, "enroll_endpoint");
    let roots = meshsign_client::net::roots(&cfg).unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Ten connections complete TLS and then say nothing (no HTTP/2 preface).
    let mut idle = Vec::new();
    for _ in 0..10 {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls.clone()))
            .connect(name, tcp)
            .await
            .unwrap();
        idle.push(s);
    }
    let start = std::time::Instant::now();
    // The site keeps serving meanwhile.
    let out = Command::new(common::meshsign())
        .arg("--config")
        .arg(dir.join("client.toml"))
        .args([
            "verification-material",
            "--environment",
            "staging",
            "--key",
            "release",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Each idle connection is closed by the site within its first-request deadline.
    for mut s in idle {
        // The server's own HTTP/2 settings may arrive first; then the close.
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            let mut b = [0u8; 1024];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the site closed the idle connection");
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

/// Resident memory of a process, KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The red team's stream attack (issue 13): many connections, each opening as many streams as
/// it can with gRPC bodies that announce 3 MiB and send part of it, held open. The site
/// advertises 64 streams per connection, refuses an oversized message from its length prefix
/// without buffering it, and keeps serving a legitimate client; its memory stays bounded.
#[tokio::test]
async fn streams_with_partial_bodies_cannot_grow_the_site_s_memory() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let site = common::start_dev(&dir);
    let pid = site.0.id();
    let cfg = meshsign_client::ClientConfig::load(&dir.join("client.toml")).unwrap();
    let addr = endpoint(&dir, "enroll_endpoint");
    let roots = meshsign_client::net::roots(&cfg).unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = std::sync::Arc::new(tls);
    let legit = || {
        Command::new(common::meshsign())
            .arg("--config")
            .arg(dir.join("client.toml"))
            .args([
                "verification-material",
                "--environment",
                "staging",
                "--key",
                "release",
            ])
            .output()
            .unwrap()
    };
    assert!(legit().status.success());
    let before = rss_kib(pid);

    const CONNECTIONS: usize = 20;
    const STREAMS: usize = 100;
    let chunk = bytes::Bytes::from(vec![0u8; 60 * 1024]);
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let io = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let (send, mut conn) = h2::client::handshake(io).await.unwrap();
        // Drive the connection until the site's SETTINGS (its stream limit) have arrived.
        let _ = tokio::time::timeout(Duration::from_millis(200), &mut conn).await;
        let limit = conn.max_concurrent_send_streams();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        (send, driver, limit)
    };
    let enroll = || {
        http::Request::post("https://localhost/meshsign.v1.Enrollment/Enroll")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    // Streams whose body never comes (headers only) wait in the site for the request timeout.
    let (mut send, _driver, limit) = connect().await;
    assert_eq!(limit, 64, "the site advertises 64 streams per connection");
    let mut pending = Vec::new();
    for _ in 0..STREAMS {
        match tokio::time::timeout(Duration::from_millis(500), send.clone().ready()).await {
            Ok(Ok(ready)) => send = ready,
            _ => break,
        }
        match send.send_request(enroll(), false) {
            Ok(stream) => pending.push(stream),
            Err(_) => break,
        }
    }

    let mut held = Vec::new();
    let mut drivers = Vec::new();
    let mut opened = 0usize;
    for _ in 0..CONNECTIONS {
        let (mut send, driver, _) = connect().await;
        for _ in 0..STREAMS {
            match tokio::time::timeout(Duration::from_millis(200), send.clone().ready()).await {
                Ok(Ok(ready)) => send = ready,
                _ => break,
            }
            let Ok((response, mut body)) = send.send_request(enroll(), false) else {
                break;
            };
            // A gRPC frame announcing 3 MiB, then 60 KiB of it, never finished.
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&(3u32 * 1024 * 1024).to_be_bytes());
            let _ = body.send_data(bytes::Bytes::from(prefix), false);
            let _ = body.send_data(chunk.clone(), false);
            held.push((response, body));
            opened += 1;
        }
        drivers.push(driver);
    }
    // Measured once the site has taken in what the attack sent: its RSS stops growing (no
    // rise over ten readings 20 ms apart, within 10 s). The wait yields, so the attack's
    // connection drivers keep sending meanwhile.
    let mut during = rss_kib(pid);
    let (mut steady, deadline) = (0, std::time::Instant::now() + Duration::from_secs(10));
    while steady < 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = rss_kib(pid);
        steady = if now > during { 0 } else { steady + 1 };
        during = during.max(now);
    }
    let settled = steady >= 10;
    assert!(settled, "the site's RSS kept growing under the attack");
    // The legitimate client is served while the attack holds its connections.
    assert!(
        legit().status.success(),
        "a legitimate request during the attack"
    );
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!("RSS {before} KiB before, {during} KiB with {opened} attack streams held");
    assert!(
        grown_mib < 48,
        "RSS grew {grown_mib} MiB ({before} → {during} KiB) for {opened} attack streams"
    );
    assert!(opened >= CONNECTIONS, "the attack opened streams: {opened}");
    drop(held);
    drop(pending);
    for d in drivers {
        d.abort();
    }
}

/// The shipped unit file is valid for systemd and hardened: `systemd-analyze verify` passes
/// (with this build's meshsignd in place of /usr/bin/meshsignd) and the offline security
/// exposure stays at or under 2.0 ("OK").
#[test]
fn the_systemd_unit_verifies_and_its_exposure_is_ok() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/meshsignd.service"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("meshsignd.service");
    let bin = common::meshsignd();
    std::fs::write(
        &path,
        unit.replace("/usr/bin/meshsignd", &bin.to_string_lossy()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd) is needed for this test");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for meshsignd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in {text}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}

/// `Type=notify`: READY=1 once serving, RELOADING=1 then READY=1 around a SIGHUP reload,
/// STOPPING=1 on SIGTERM — sent to `$NOTIFY_SOCKET` as systemd expects.
#[test]
fn meshsignd_notifies_the_service_manager() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = common::Meshsignd::dev(&tmp.path().join("dev"))
        .env("NOTIFY_SOCKET", &sock_path)
        .spawn();
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1"));
    let pid = child.id().to_string();
    common::signal(&pid, "-HUP");
    assert_eq!(next(), "RELOADING=1");
    assert!(next().starts_with("READY=1"));
    common::signal(&pid, "-TERM");
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}
