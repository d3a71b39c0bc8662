//! The fault table of issue 11, against the real `meshsignd`: a data folder is made the way it
//! happens (signing load, then SIGKILL), copied, damaged, and started. Every row ends in a start
//! refused with a message naming the file and the way out, or in a site where every acknowledged
//! receipt is present — never a silent loss, never new keys in place of lost ones.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{DevSite, Meshsignd, meshsign, meshsignd, start_dev};
use meshsign_client::ClientConfig;
use meshsign_client::session::Session;
use meshsign_evidence::audit::{ExportLine, verify_export};
use meshsign_proto::v1;
use p256::pkcs8::DecodePublicKey as _;

type Receipts = Vec<(u64, String)>;

async fn session(cfg: &ClientConfig, env: &str) -> Session {
    common::dev_session(cfg, env, &"ab".repeat(32)).await
}

/// A dev site in `dir` that signed under load from three clients and was killed with SIGKILL;
/// returns the receipts the clients were given and the staging key's public key.
async fn killed_under_load(dir: &Path) -> (Receipts, Vec<u8>) {
    let mut site = start_dev(dir);
    let cfg = ClientConfig::load(&dir.join("client.toml")).unwrap();
    let key = public_key(&cfg).await;
    let acked = common::sign_until_killed(&mut site, &cfg, 3, 150, &"ab".repeat(32)).await;
    (acked, key)
}

async fn public_key(cfg: &ClientConfig) -> Vec<u8> {
    let tls =
        meshsign_client::net::tls_config(meshsign_client::net::roots(cfg).unwrap(), None).unwrap();
    let ch = meshsign_client::net::connect(&cfg.enroll_endpoint, &cfg.server_name, tls)
        .await
        .unwrap();
    v1::verification_client::VerificationClient::new(ch)
        .get_signing_identity(v1::GetVerificationMaterialRequest {
            environment: "staging".into(),
            key_alias: "release".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key_der
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Starts `meshsignd dev` on `dir` (text logs to `DIR.stderr`): the running site, or what it
/// printed when it refused.
fn try_start(dir: &Path) -> Result<DevSite, String> {
    Meshsignd::dev(dir)
        .format("text")
        .log(&dir.with_extension("stderr"))
        .try_start()
}

/// The running site's audit log, verified offline from its genesis.
async fn verified_log(dir: &Path) -> Vec<ExportLine> {
    let cfg = ClientConfig::load(&dir.join("client.toml")).unwrap();
    let mut admin = meshsign_client::site::admin::Admin::connect(&cfg)
        .await
        .unwrap();
    let key = admin.audit_public_key().await.unwrap();
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&key.public_key_der).unwrap();
    let mut stream = admin
        .export_audit(v1::ExportAuditRequest::default())
        .await
        .unwrap();
    let mut lines = Vec::new();
    while let Some(l) = stream.message().await.unwrap() {
        lines.push(serde_json::from_str(&l.json).unwrap());
    }
    verify_export(&lines, &key).unwrap();
    lines
}

fn entry(lines: &[ExportLine], seq: u64) -> Option<&meshsign_evidence::audit::AuditRecord> {
    lines.iter().find_map(|l| match l {
        ExportLine::Entry(e) if e.seq == seq => Some(e.as_ref()),
        _ => None,
    })
}

/// Either refused naming `names` (and never touched), or every receipt is present and the key
/// is the same.
async fn refused_or_intact(dir: &Path, row: &str, names: &str, acked: &Receipts, key: &[u8]) {
    match try_start(dir) {
        Err(msg) => {
            assert!(
                msg.contains(names),
                "{row}: the refusal names {names}: {msg}"
            );
            assert!(
                msg.contains("restore") || msg.contains("recover") || msg.contains("KEK"),
                "{row}: the refusal says the way out: {msg}"
            );
        }
        Ok(_site) => {
            let lines = verified_log(dir).await;
            for (seq, hash) in acked {
                assert_eq!(
                    entry(&lines, *seq).map(|e| e.hash.as_str()),
                    Some(hash.as_str()),
                    "{row}: acknowledged entry {seq}"
                );
            }
            let cfg = ClientConfig::load(&dir.join("client.toml")).unwrap();
            assert_eq!(
                public_key(&cfg).await,
                key,
                "{row}: the same key, never a new one"
            );
        }
    }
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    let o = offset.min(b.len() - 1);
    b[o] ^= 0xff;
    std::fs::write(path, b).unwrap();
}

fn copy_of(base: &Path, tmp: &Path, name: &str) -> PathBuf {
    let d = tmp.join(name);
    copy_dir(base, &d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_or_wrong_kek_refuses_start_and_never_creates_keys() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (acked, key) = killed_under_load(&base).await;
    let db_len = std::fs::metadata(base.join("data/db")).unwrap().len() as usize;

    // One byte flipped at the start of sled's file (a segment header), and in its middle.
    for (row, offset) in [("db flipped at 0", 0), ("db flipped mid-file", db_len / 2)] {
        let d = copy_of(&base, tmp.path(), &row.replace(' ', "-"));
        flip(&d.join("data/db"), offset);
        refused_or_intact(&d, row, &d.join("data").display().to_string(), &acked, &key).await;
    }

    // A wrong KEK with a key alias newly added to the config: refused before anything is
    // created; `meshsignd check` says so too; with the right KEK the site starts, keeps its keys
    // and creates the new alias only then.
    let d = copy_of(&base, tmp.path(), "wrong-kek");
    let site_toml = d.join("site.toml");
    let text = std::fs::read_to_string(&site_toml).unwrap();
    let added = text.replacen(
        "[[environments.signing_keys]]",
        "[[environments.signing_keys]]\nalias = \"added\"\nalgorithm = \"ecdsa-p256-sha256\"\naccess = { repositories = [\"*\"], refs = [\"*\"] }\n\n[[environments.signing_keys]]",
        1,
    );
    assert_ne!(added, text);
    std::fs::write(&site_toml, &added).unwrap();
    let right = std::fs::read(d.join("kek")).unwrap();
    std::fs::write(d.join("kek"), "11".repeat(32)).unwrap();
    let keys_before = std::fs::read(d.join("data/site.json")).unwrap();
    let msg = try_start(&d).err().expect("a wrong KEK refuses start");
    assert!(msg.contains("wrong KEK") && msg.contains("kek"), "{msg}");
    let check = Command::new(meshsignd())
        .args(["check", "--config"])
        .arg(&site_toml)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("wrong KEK"));
    assert_eq!(
        std::fs::read(d.join("data/site.json")).unwrap(),
        keys_before,
        "nothing was created under the wrong KEK"
    );
    std::fs::write(d.join("kek"), right).unwrap();
    let _site = try_start(&d).expect("the right KEK starts the site");
    let marker = std::fs::read_to_string(d.join("data/site.json")).unwrap();
    assert!(
        marker.contains("release@v1") && marker.contains("added@v1"),
        "{marker}"
    );
    let lines = verified_log(&d).await;
    for (seq, hash) in &acked {
        assert_eq!(
            entry(&lines, *seq).map(|e| e.hash.as_str()),
            Some(hash.as_str())
        );
    }
    let cfg = ClientConfig::load(&d.join("client.toml")).unwrap();
    assert_eq!(public_key(&cfg).await, key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_refuses_start_and_recover_records_the_loss() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (acked, _key) = killed_under_load(&base).await;
    let journal = base.join("data/audit.journal");
    let text = std::fs::read(&journal).unwrap();
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert!(lines.len() > 10, "the load left entries in the journal");

    // A byte flipped in the middle of the journal: refused, naming the line and its seq.
    let d = copy_of(&base, tmp.path(), "journal-flipped");
    let mid = lines[..lines.len() / 2]
        .iter()
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + 30;
    flip(&d.join("data/audit.journal"), mid);
    let msg = try_start(&d)
        .err()
        .expect("a corrupt journal line refuses start");
    assert!(
        msg.contains("audit.journal") && msg.contains("line "),
        "{msg}"
    );
    assert!(msg.contains("meshsignd recover"), "{msg}");
    // `recover` reports and exits 1; with --accept-loss-after it keeps the intact part and
    // records the loss in the chain.
    let out = Command::new(meshsignd())
        .args(["recover", "--data-dir"])
        .arg(d.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let keep: u64 = report
        .split("--accept-loss-after ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the report says what can be kept: {report}"));
    let out = Command::new(meshsignd())
        .args(["recover", "--data-dir"])
        .arg(d.join("data"))
        .args(["--accept-loss-after", &keep.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _site = try_start(&d).expect("the site starts after an accepted loss");
    let log = verified_log(&d).await;
    let loss = entry(&log, keep + 1).expect("the loss entry");
    assert_eq!(
        (loss.rpc.as_str(), loss.reason.as_str()),
        ("AuditRecovery", "loss_recorded")
    );
    for (seq, hash) in acked.iter().filter(|(s, _)| *s <= keep) {
        assert_eq!(
            entry(&log, *seq).map(|e| e.hash.as_str()),
            Some(hash.as_str())
        );
    }
    for (seq, hash) in acked.iter().filter(|(s, _)| *s > keep) {
        assert_ne!(
            entry(&log, *seq).map(|e| e.hash.as_str()),
            Some(hash.as_str()),
            "a lost receipt never matches another entry"
        );
    }
    drop(_site);

    // The journal deleted: refused, naming it.
    let d = copy_of(&base, tmp.path(), "journal-deleted");
    std::fs::remove_file(d.join("data/audit.journal")).unwrap();
    let msg = try_start(&d)
        .err()
        .expect("a missing journal refuses start");
    assert!(msg.contains("audit.journal is missing"), "{msg}");

    // The journal's last line cut: the site starts. Either the store holds the cut line's
    // entry whole (the audit segment took it before the kill: nothing lost, no loss entry), or
    // the cut line's seq holds a loss entry, never another decision. Every receipt before it
    // is there either way.
    let d = copy_of(&base, tmp.path(), "journal-cut");
    let jp = d.join("data/audit.journal");
    let mut t = std::fs::read(&jp).unwrap();
    t.truncate(t.len() - 20);
    std::fs::write(&jp, t).unwrap();
    let _site = try_start(&d).expect("a torn last line does not stop the site");
    let log = verified_log(&d).await;
    let loss = log.iter().find_map(|l| match l {
        ExportLine::Entry(e) if e.rpc == "AuditRecovery" => Some(e.seq),
        _ => None,
    });
    let before = loss.unwrap_or(u64::MAX);
    for (seq, hash) in acked.iter().filter(|(s, _)| *s < before) {
        assert_eq!(
            entry(&log, *seq).map(|e| e.hash.as_str()),
            Some(hash.as_str()),
            "seq {seq} (loss entry: {loss:?})"
        );
    }
    assert!(
        acked.iter().all(|(s, h)| Some(*s) != loss
            || entry(&log, *s).map(|e| e.hash.as_str()) != Some(h.as_str()))
    );
}

#[test]
fn audit_verify_refuses_an_empty_log_and_a_log_that_starts_mid_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let _site = start_dev(&site_dir);
    let cfg = site_dir.join("client.toml");
    let run = |args: &[&str]| {
        Command::new(meshsign())
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    let key = run(&["admin", "audit", "public-key"]);
    std::fs::write(tmp.path().join("audit.pem"), &key.stdout).unwrap();
    std::fs::write(tmp.path().join("empty.jsonl"), "").unwrap();
    let out = run(&["audit", "verify", "empty.jsonl", "--audit-key", "audit.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let export = run(&["admin", "audit", "export"]);
    let text = String::from_utf8_lossy(&export.stdout).into_owned();
    let tail: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(tmp.path().join("tail.jsonl"), tail).unwrap();
    let out = run(&["audit", "verify", "tail.jsonl", "--audit-key", "audit.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mid-chain at seq 2"));
    std::fs::write(tmp.path().join("all.jsonl"), &text).unwrap();
    let out = run(&["audit", "verify", "all.jsonl", "--audit-key", "audit.pem"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_wipe_restore_keeps_receipts_keys_and_the_chain() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    let cli = |args: &[&str]| {
        let out = Command::new(meshsign())
            .arg("--config")
            .arg(site_dir.join("client.toml"))
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshsign {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let site = start_dev(&site_dir);
    let cfg = ClientConfig::load(&site_dir.join("client.toml")).unwrap();
    let key = public_key(&cfg).await;
    std::fs::write(tmp.path().join("a.txt"), "before the snapshot").unwrap();
    cli(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "a.txt",
    ]);
    cli(&["admin", "snapshot", "--out", "site.snapshot"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tmp.path().join("site.snapshot"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the snapshot holds wrapped keys: 0600");
    }
    drop(site);

    // Wipe the data folder; restore; the same site comes back.
    std::fs::remove_dir_all(site_dir.join("data")).unwrap();
    let restore = |what: &str| {
        Command::new(meshsignd())
            .args(["restore", "--config"])
            .arg(site_dir.join("site.toml"))
            .arg(tmp.path().join("site.snapshot"))
            .output()
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let out = restore("first");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = restore("over a site");
    assert_eq!(
        out.status.code(),
        Some(1),
        "restore never writes over a site"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a site"));

    let _site = start_dev(&site_dir);
    let cfg = ClientConfig::load(&site_dir.join("client.toml")).unwrap();
    assert_eq!(
        public_key(&cfg).await,
        key,
        "the same key after the restore"
    );
    let log = verified_log(&site_dir).await;
    assert!(
        log.iter()
            .any(|l| matches!(l, ExportLine::Entry(e) if e.rpc == "Restore")),
        "the restore is in the chain"
    );
    // The receipt of the file signed before the snapshot verifies against the restored log.
    let export = cli(&["admin", "audit", "export"]);
    std::fs::write(tmp.path().join("audit.jsonl"), &export.stdout).unwrap();
    let pem = cli(&["admin", "audit", "public-key"]);
    std::fs::write(tmp.path().join("audit.pem"), &pem.stdout).unwrap();
    cli(&[
        "verify",
        "a.txt",
        "--receipt",
        "--audit-log",
        "audit.jsonl",
        "--audit-key",
        "audit.pem",
    ]);
    // Signing continues with the same key.
    std::fs::write(tmp.path().join("b.txt"), "after the restore").unwrap();
    cli(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "b.txt",
    ]);
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("b.txt.sig.json")).unwrap()).unwrap();
    assert_eq!(bundle["key_id"], "release@v1");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `at` (root only; None where mounting is not allowed).
    fn mount(at: &Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros into `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 256 * 1024];
    while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_recovers_without_a_restart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&tmp.path().join("small"), 16) else {
        // Mounting needs root (CI runs as root); say so rather than pass quietly.
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root)");
        assert!(
            !nix_is_root(),
            "running as root, a tmpfs must mount for this test"
        );
        return;
    };
    let site_dir = fs.0.join("site");
    let mut site = start_dev(&site_dir);
    let pid = site.0.id();
    let cfg = ClientConfig::load(&site_dir.join("client.toml")).unwrap();
    let mut s = session(&cfg, "staging").await;
    let mut acked: Receipts = Vec::new();
    let r = s.sign_digest("release", [1; 32], "before").await.unwrap();
    acked.push((r.audit_seq, r.audit_hash));

    // Full: signing is refused with audit_unavailable (a few may still land in the journal).
    fill(&fs.0.join("fill"));
    let mut refused = None;
    for n in 0..200u8 {
        match s.sign_digest("release", [n; 32], "full").await {
            Ok(r) => acked.push((r.audit_seq, r.audit_hash)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("a full disk refuses signing");
    match &refused {
        meshsign_client::ClientError::Rpc { code, message, .. } => {
            assert_eq!(*code, tonic::Code::Unavailable, "{message}");
            assert!(message.starts_with("audit_unavailable: "), "{message}");
        }
        other => panic!("{other}"),
    }
    // Reads go on: verification material and the audit export.
    assert!(!public_key(&cfg).await.is_empty());
    let mut admin = meshsign_client::site::admin::Admin::connect(&cfg)
        .await
        .unwrap();
    let mut stream = admin
        .export_audit(v1::ExportAuditRequest::default())
        .await
        .unwrap();
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    assert!(n > 0, "the export of a full site works");

    // Space returns: writes resume by themselves within 10 s, same process.
    std::fs::remove_file(fs.0.join("fill")).unwrap();
    let freed = std::time::Instant::now();
    let resumed = loop {
        match s.sign_digest("release", [9; 32], "after").await {
            Ok(r) => break r,
            Err(_) if freed.elapsed() < std::time::Duration::from_secs(10) => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes did not resume within 10 s of freeing space: {e}"),
        }
    };
    eprintln!("writes resumed {:?} after space returned", freed.elapsed());
    acked.push((resumed.audit_seq, resumed.audit_hash));
    assert!(site.0.try_wait().unwrap().is_none(), "no restart");
    assert_eq!(site.0.id(), pid);
    let log = verified_log(&site_dir).await;
    for (seq, hash) in &acked {
        assert_eq!(
            entry(&log, *seq).map(|e| e.hash.as_str()),
            Some(hash.as_str()),
            "acknowledged entry {seq}"
        );
    }
    drop(s);
    drop(site);
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
