//! `meshsign notarize` (issue 29) against a loopback stand-in of Apple's Notary API v2 and of
//! its upload bucket, over HTTPS behind a private CA: the bearer is a token the site minted
//! with the imported `.p8`, the upload carries the file's bytes with AWS SigV4 headers made
//! from the submission's temporary credentials, `--wait` polls until the verdict and fetches
//! the log; `Invalid` exits 1 with the log's issues printed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::Write as _;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::start_dev;

/// One request the stand-in saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Apple's API and bucket on one loopback HTTPS port, its certificate from a private CA
/// (written to `ca.pem`). `verdict` is what the second status poll answers.
fn stand_in(dir: &std::path::Path, verdict: &'static str) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let server = Arc::new(server);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut polls = 0;
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let conn = rustls::ServerConnection::new(server.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let Some(req) = read_request(&mut s) else {
                continue;
            };
            let base = format!("https://localhost:{port}");
            let body = match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/notary/v2/submissions") => serde_json::json!({"data": {
                    "id": "sub-1", "type": "submissionsPostResponse",
                    "attributes": {"awsAccessKeyId": "ASIATESTACCESSKEY", "awsSecretAccessKey": "test-secret",
                        "awsSessionToken": "test-session", "bucket": "notary-submissions-prod",
                        "object": "prod/AAAA/sub-1.zip"}}}),
                ("PUT", "/prod/AAAA/sub-1.zip") => serde_json::json!({}),
                ("GET", "/notary/v2/submissions/sub-1") => {
                    polls += 1;
                    let status = if polls < 2 { "In Progress" } else { verdict };
                    serde_json::json!({"data": {"id": "sub-1", "attributes": {"status": status, "name": "App.zip"}}})
                }
                ("GET", "/notary/v2/submissions/sub-1/logs") => serde_json::json!({"data": {
                    "id": "sub-1", "attributes": {"developerLogUrl": format!("{base}/log/sub-1")}}}),
                ("GET", "/log/sub-1") => {
                    serde_json::json!({"status": verdict, "issues": if verdict == "Accepted" {
                    serde_json::json!([]) } else { serde_json::json!([{"severity": "error",
                    "path": "App.zip/App.app/Contents/MacOS/App", "message": "The binary is not signed."}]) }})
                }
                _ => serde_json::json!({"errors": [{"status": "404"}]}),
            };
            let text = body.to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
            log.lock().unwrap().push(req);
        }
    });
    (port, seen)
}

fn read_request<S: std::io::Read>(s: &mut S) -> Option<Seen> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

fn setup(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("site/client.toml");
    common::import_asc_key(dir, &cfg, &[]);
    std::fs::write(dir.join("App.zip"), b"PK\x03\x04 an archive to notarize").unwrap();
    cfg
}

fn notarize(dir: &std::path::Path, cfg: &std::path::Path, port: u16) -> std::process::Output {
    let base = format!("https://localhost:{port}");
    let mut c = std::process::Command::new(common::meshsign());
    c.current_dir(dir).arg("--config").arg(cfg).args([
        "notarize",
        "--environment",
        "staging",
        "--key",
        "asc",
        "--wait",
        "--poll",
        "1",
        "--api-url",
        &base,
        "--upload-url",
        &base,
        "--ca-file",
        "ca.pem",
        "App.zip",
    ]);
    for v in [
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "MESHSIGN_AGENT_SOCK",
    ] {
        c.env_remove(v);
    }
    c.output().unwrap()
}

#[test]
fn an_archive_is_notarized_with_site_minted_tokens_and_its_upload_carries_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let cfg = setup(dir);
    let (port, seen) = stand_in(dir, "Accepted");
    let out = notarize(dir, &cfg, port);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sub-1\tAccepted"), "{stdout}");

    let seen = seen.lock().unwrap().clone();
    let post = seen.iter().find(|r| r.method == "POST").unwrap();
    // The bearer: an ES256 token the site minted for the imported key.
    let bearer = post
        .header("authorization")
        .strip_prefix("Bearer ")
        .unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = bearer.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(
        (header["alg"].as_str(), header["kid"].as_str()),
        (Some("ES256"), Some("ABC123DEFG"))
    );
    assert_eq!(claims["aud"], "appstoreconnect-v1");
    let submitted: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    let bytes = std::fs::read(dir.join("App.zip")).unwrap();
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ));
    assert_eq!(submitted["sha256"], sha.as_str());
    assert_eq!(submitted["submissionName"], "App.zip");
    // The upload: the file's bytes, signed with the submission's temporary credentials.
    let put = seen.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.body, bytes);
    assert_eq!(put.header("x-amz-content-sha256"), sha);
    assert_eq!(put.header("x-amz-security-token"), "test-session");
    assert!(
        put.header("authorization")
            .starts_with("AWS4-HMAC-SHA256 Credential=ASIATESTACCESSKEY/")
            && put
                .header("authorization")
                .contains("/us-west-2/s3/aws4_request"),
        "{}",
        put.header("authorization")
    );
    assert!(
        seen.iter()
            .filter(|r| r.path == "/notary/v2/submissions/sub-1")
            .count()
            >= 2
    );
    assert!(seen.iter().any(|r| r.path == "/log/sub-1"));
}

#[test]
fn an_invalid_submission_exits_non_zero_with_the_log_s_issues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = start_dev(&dir.join("site"));
    let cfg = setup(dir);
    let (port, _) = stand_in(dir, "Invalid");
    let out = notarize(dir, &cfg, port);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sub-1\tInvalid"), "{stdout}");
    assert!(
        stdout.contains("error: App.zip/App.app/Contents/MacOS/App: The binary is not signed."),
        "{stdout}"
    );
}
