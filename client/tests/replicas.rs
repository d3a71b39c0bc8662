//! Two `meshsignd` replicas of one site on a shared PostgreSQL (issue 14): clients listing both
//! keep signing through failover when one replica is killed with SIGKILL, and every receipt
//! they were given is in the one audit chain, which verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshsign_certs_dev::postgres::LocalPostgres;

/// Three distinct free ports: the listeners are held together while the ports are read, so the
/// kernel cannot hand the same one out twice (it did, once, when they were picked one by one).
fn free_ports() -> [u16; 3] {
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let port = |i: usize| held[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

/// Writes `site-NAME.toml` (the dev site's config on PostgreSQL, its own ports and data folder)
/// and starts `meshsignd serve` on it; returns the process and its (enroll, sign, admin) ports.
fn start_replica(dir: &Path, pg: &LocalPostgres, name: &str) -> (common::DevSite, [u16; 3]) {
    let base = std::fs::read_to_string(dir.join("site.toml")).unwrap();
    let ports = free_ports();
    let text = base
        .replacen(
            "data_dir = \"data\"",
            &format!("data_dir = \"data-{name}\""),
            1,
        )
        .replacen("127.0.0.1:7441", &format!("127.0.0.1:{}", ports[0]), 1)
        .replacen("127.0.0.1:7443", &format!("127.0.0.1:{}", ports[1]), 1)
        .replacen("127.0.0.1:7444", &format!("127.0.0.1:{}", ports[2]), 1)
        + &pg.store_section();
    let cfg = dir.join(format!("site-{name}.toml"));
    std::fs::write(&cfg, text).unwrap();
    let replica = common::Meshsignd::serve(&cfg, ports[2])
        .log(&dir.join(format!("{name}.log")))
        .try_start()
        .unwrap_or_else(|e| panic!("replica {name} did not start: {e}"));
    (replica, ports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_signing_through_a_killed_replica_and_every_receipt_is_in_the_one_chain() {
    let pg = LocalPostgres::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("site");
    // `meshsignd dev` makes the PKI, the KEK, the dev issuer and the config; then it stops.
    drop(common::start_dev(&dir));
    let (mut a, pa) = start_replica(&dir, &pg, "a");
    let (_b, pb) = start_replica(&dir, &pg, "b");

    // The client lists both replicas for every port.
    let client = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    let list = |i: usize| format!("\"127.0.0.1:{},127.0.0.1:{}\"", pa[i], pb[i]);
    let mut lines = Vec::new();
    for l in client.lines() {
        let l = match l.split_once(" = ") {
            Some(("enroll_endpoint", _)) => format!("enroll_endpoint = {}", list(0)),
            Some(("sign_endpoint", _)) => format!("sign_endpoint = {}", list(1)),
            Some(("admin_endpoint", _)) => format!("admin_endpoint = {}", list(2)),
            _ => l.to_string(),
        };
        lines.push(l);
    }
    let cfg_path = dir.join("client-replicas.toml");
    std::fs::write(&cfg_path, lines.join("\n")).unwrap();
    let cfg = meshsign_client::ClientConfig::load(&cfg_path).unwrap();

    // Eight clients sign; each lists both replicas and starts on A (first in the list).
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let env = if i % 2 == 0 { "staging" } else { "production" };
        let mut s = common::dev_session(&cfg, env, &"ab".repeat(32)).await;
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u8;
            let mut after_kill = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || after_kill < 20 {
                n = n.wrapping_add(1);
                match s.sign_digest("release", [n; 32], "load").await {
                    Ok(r) => {
                        acked.lock().unwrap().push((r.audit_seq, r.audit_hash));
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            after_kill += 1;
                        }
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.0.kill().unwrap(); // SIGKILL
    a.0.wait().unwrap();
    let killed_at = acked.lock().unwrap().len();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(60), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("every client signed 20 more times through replica B");
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "{} receipts ({} before the kill), {} failed calls: {:?}",
        acked.len(),
        killed_at,
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        failed.is_empty(),
        "the call in flight at the kill is retried on B: {failed:?}"
    );

    // The one chain, read and verified through replica B, holds every receipt.
    let entries = common::audit_entries(&dir, &cfg_path);
    let by_seq: std::collections::HashMap<u64, String> = entries
        .iter()
        .filter_map(|e| Some((e["seq"].as_u64()?, e["hash"].as_str()?.to_string())))
        .collect();
    for (seq, hash) in &acked {
        assert_eq!(
            by_seq.get(seq),
            Some(hash),
            "receipt seq {seq} is in the chain"
        );
    }
    let export = dir.join("export.jsonl");
    let out = common::meshsign_in(&dir, &cfg_path, &["admin", "audit", "export"]);
    assert!(out.status.success());
    std::fs::write(&export, &out.stdout).unwrap();
    let pem = common::meshsign_in(&dir, &cfg_path, &["admin", "audit", "public-key"]);
    std::fs::write(dir.join("audit.pem"), &pem.stdout).unwrap();
    let verify = common::meshsign_in(
        &dir,
        &cfg_path,
        &[
            "audit",
            "verify",
            "--audit-key",
            &dir.join("audit.pem").to_string_lossy(),
            &export.to_string_lossy(),
        ],
    );
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
