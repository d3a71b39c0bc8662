//! Crash consistency: the real `meshsignd` is killed with SIGKILL while several clients sign;
//! after a restart the audit chain verifies and every audit entry a client was told about is there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::start_dev;
use meshsign_client::ClientConfig;
use meshsign_client::session::Session;
use meshsign_evidence::audit::{ExportLine, verify_export};
use meshsign_proto::v1;
use p256::pkcs8::DecodePublicKey as _;

async fn session(cfg: &ClientConfig, env: &str) -> Session {
    common::dev_session(cfg, env, &"ef".repeat(32)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_no_acknowledged_audit_entry() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let mut site = start_dev(&site_dir);
    let cfg = ClientConfig::load(&site_dir.join("client.toml")).unwrap();

    // Six clients sign as fast as they can; each remembers the receipts it was given.
    let acked = common::sign_until_killed(&mut site, &cfg, 6, 300, &"ef".repeat(32)).await;
    drop(site);

    // Restart on the same data; export and verify offline.
    let _site = start_dev(&site_dir);
    let cfg = ClientConfig::load(&site_dir.join("client.toml")).unwrap();
    let mut admin = meshsign_client::site::admin::connect(&cfg).await.unwrap();
    let key = admin
        .get_audit_public_key(v1::GetAuditPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&key.public_key_der).unwrap();
    let mut stream = admin
        .export_audit(v1::ExportAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut lines: Vec<ExportLine> = Vec::new();
    while let Some(l) = stream.message().await.unwrap() {
        lines.push(serde_json::from_str(&l.json).unwrap());
    }
    let report = verify_export(&lines, &key).unwrap();
    assert!(
        report.checkpoints >= 1,
        "the restarted site anchors the tail the crash left unsigned"
    );
    eprintln!(
        "after SIGKILL: {} acknowledged signatures, export {report:?}",
        acked.len()
    );
    for (seq, hash) in &acked {
        let found = lines
            .iter()
            .any(|l| matches!(l, ExportLine::Entry(e) if e.seq == *seq && e.hash == *hash));
        assert!(found, "acknowledged audit entry {seq} lost");
    }
    // The site keeps working after the crash and the chain continues.
    let mut s = session(&cfg, "staging").await;
    let r = s.sign_digest("release", [1; 32], "after").await.unwrap();
    assert!(r.audit_seq > report.last_seq);
}
