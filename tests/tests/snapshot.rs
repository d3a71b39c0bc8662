//! Issue 23 row 3: a restore is all or nothing. A snapshot cut at every line boundary (every
//! section's edge among them) and in the middle of every line is refused before anything is
//! written, and the target folder is left as it was (absent here); the whole snapshot restores,
//! and the restored folder starts as the same site.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;

use meshsign_server::clock::SharedClock;
use meshsign_server::config::SiteConfig;
use meshsign_server::custody::Kek;
use meshsign_server::state::snapshot;
use meshsign_server::store::Store;
use meshsign_tests::{TestSite, sign_req};

/// What a restore of `site`'s snapshot needs: its config and KEK, its clock, and a target
/// folder (absent) in a temporary folder of its own.
struct Restoring {
    cfg: SiteConfig,
    kek: Kek,
    clock: SharedClock,
    tmp: tempfile::TempDir,
    target: std::path::PathBuf,
}

fn restoring(site: &TestSite) -> Restoring {
    let cfg = SiteConfig::load(&site.site_toml).unwrap();
    let kek = Kek::load(&cfg.kek_file, true).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("restored");
    Restoring {
        cfg,
        kek,
        clock: Arc::new(site.clock.clone()),
        tmp,
        target,
    }
}

/// Opens a store in a folder (what `meshsignd restore` passes).
fn open(dir: &std::path::Path) -> Result<Store, meshsign_server::store::StoreError> {
    Store::open_sled(dir, 1 << 20)
}

#[tokio::test]
async fn a_cut_snapshot_is_refused_whole_and_leaves_the_target_untouched() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    for i in 0..3 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    let (bytes, seq) = site.state().snapshot().await.unwrap();
    let Restoring {
        cfg,
        kek,
        clock,
        tmp,
        target,
    } = restoring(&site);

    let mut cuts: Vec<usize> = Vec::new();
    let mut at = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        cuts.push(at + line.len() / 2); // mid-line
        at += line.len();
        cuts.push(at); // at the line's end (a section boundary when the tree changes)
    }
    cuts.pop(); // the last one is the whole snapshot
    assert!(cuts.len() > 20, "{} cut points", cuts.len());
    for cut in cuts {
        let e = snapshot::restore(&target, &kek, &cfg.kek_file, &bytes[..cut], &clock, open)
            .err()
            .unwrap_or_else(|| panic!("a snapshot cut at byte {cut} must be refused"));
        assert!(
            e.to_string().starts_with("snapshot line "),
            "cut {cut}: {e}"
        );
        assert!(!target.exists(), "cut {cut}: the target was left as it was");
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "cut {cut}: no temporary folder left behind"
        );
    }
    // One record altered (its line still parses): the trailer's hash refuses it.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let altered = text.replacen("\"tree\":\"keys\"", "\"tree\":\"meta\"", 1);
    assert_ne!(altered, text);
    assert!(
        snapshot::restore(
            &target,
            &kek,
            &cfg.kek_file,
            altered.as_bytes(),
            &clock,
            open
        )
        .is_err()
    );
    assert!(!target.exists());

    let r = snapshot::restore(&target, &kek, &cfg.kek_file, &bytes, &clock, open).unwrap();
    assert_eq!((r.audit_seq, r.restore_seq), (seq, seq + 1));
    assert!(meshsign_server::state::marker::SiteMarker::path(&target).exists());
    // A second restore never writes over it.
    let e = snapshot::restore(&target, &kek, &cfg.kek_file, &bytes, &clock, open).unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
}

/// Rewrites the record line of `tree` whose JSON value `edit` changes, and the trailer's
/// counts and hash to match — everything an attacker without the KEK can do — keeping the MAC
/// or, with `mac_under`, making it under that KEK.
fn edited(
    bytes: &[u8],
    tree: &str,
    edit: impl Fn(&mut serde_json::Value) -> bool,
    mac_under: Option<&Kek>,
) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = std::str::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (header, records, trailer) = (lines[0], &lines[1..lines.len() - 1], lines[lines.len() - 1]);
    let mut out = format!("{header}\n");
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut changed = false;
    for l in records {
        let mut line: serde_json::Value = serde_json::from_str(l).unwrap();
        let mut rewritten = l.to_string();
        if !changed && line["tree"] == tree {
            let mut v: serde_json::Value =
                serde_json::from_slice(&b64.decode(line["value"].as_str().unwrap()).unwrap())
                    .unwrap();
            if edit(&mut v) {
                line["value"] = b64.encode(serde_json::to_vec(&v).unwrap()).into();
                rewritten = serde_json::to_string(&line).unwrap();
                changed = true;
            }
        }
        hasher.update(format!("{rewritten}\n").as_bytes());
        out.push_str(&rewritten);
        out.push('\n');
    }
    assert!(changed, "no {tree} record to edit");
    let mut t: serde_json::Value = serde_json::from_str(trailer).unwrap();
    t["sha256"] = hex::encode(hasher.finish().as_ref()).into();
    if let Some(kek) = mac_under {
        t["mac"] = hex::encode(aws_lc_rs::hmac::sign(
            &kek.mac_key("snapshot"),
            out.as_bytes(),
        ))
        .into();
    }
    out.push_str(&serde_json::to_string(&t).unwrap());
    out.push('\n');
    out.into_bytes()
}

/// Issue 24 row 8: a snapshot edited offline — an attacker's JWKS put into the production
/// trust policy, hash and counts made to match — is refused by its MAC (under a key derived
/// from the KEK), naming what failed; nothing is written. The same edit with a MAC made under
/// the site's KEK would restore: the MAC alone refuses it.
#[tokio::test]
async fn a_snapshot_edited_offline_is_refused_by_its_mac() {
    use meshsign_proto::v1;
    let site = TestSite::start().await;
    site.admin()
        .await
        .set_jwks(v1::SetJwksRequest {
            environment: "production".into(),
            issuer: meshsign_tests::ES_ISSUER.into(),
            jwks_json: site.es.jwks().to_string().into_bytes(),
        })
        .await
        .unwrap();
    let (bytes, _) = site.state().snapshot().await.unwrap();
    let Restoring {
        cfg,
        kek,
        clock,
        tmp,
        target,
    } = restoring(&site);

    let attacker = meshsign_certs_dev::OidcIssuer::generate(
        meshsign_tests::ES_ISSUER,
        "es-1",
        meshsign_certs_dev::JwtAlg::Es256,
    )
    .unwrap();
    let forge = |v: &mut serde_json::Value| {
        if v.get("jwks_json").is_some_and(|j| !j.is_null()) {
            v["jwks_json"] = attacker.jwks().to_string().into();
            true
        } else {
            false
        }
    };
    let forged = edited(&bytes, "policies", forge, None);
    let e = snapshot::restore(&target, &kek, &cfg.kek_file, &forged, &clock, open).unwrap_err();
    assert!(
        e.to_string().contains("MAC does not verify under this KEK"),
        "{e}"
    );
    assert!(!target.exists());
    // Another KEK cannot restore the site's own snapshot either.
    let other = tmp.path().join("other.kek");
    Kek::generate_file(&other).unwrap();
    let wrong = Kek::load(&other, true).unwrap();
    let e = snapshot::restore(&target, &wrong, &other, &bytes, &clock, open).unwrap_err();
    assert!(e.to_string().contains("MAC does not verify"), "{e}");
    assert!(!target.exists());
    // Control: only the MAC stood in the way.
    let remade = edited(&bytes, "policies", forge, Some(&kek));
    snapshot::restore(&target, &kek, &cfg.kek_file, &remade, &clock, open).unwrap();
}

/// Issue 30: the admin port streams a snapshot written page by page to a file in the data
/// folder (never the whole site in memory); a tree larger than one page comes back whole, the
/// streamed bytes restore, and the file is gone once the stream ends.
#[tokio::test]
async fn a_snapshot_streams_from_a_file_page_by_page_and_restores() {
    use meshsign_server::store::Tree;
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    s.sign(sign_req("release", 1)).await.unwrap();
    // More usage records than one page of the snapshot's reads (4,096).
    let kv = site.state().store.kv();
    for i in 0..9_000u32 {
        kv.put(
            Tree::Usage,
            format!("bench/{i:05}").as_bytes(),
            &i.to_be_bytes(),
        )
        .unwrap();
    }
    let take = async || {
        let mut stream = site
            .admin()
            .await
            .snapshot(meshsign_proto::v1::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        let (mut bytes, mut chunks) = (Vec::new(), 0);
        while let Some(c) = stream.message().await.unwrap() {
            assert!(c.data.len() <= 64 * 1024);
            bytes.extend_from_slice(&c.data);
            chunks += 1;
        }
        assert!(chunks > 1, "streamed in chunks: {chunks}");
        bytes
    };
    // Two at once (each clears what a crash left: neither loses the other's file).
    let (bytes, other) = tokio::join!(take(), take());
    let data_dir = SiteConfig::load(&site.site_toml).unwrap().data_dir;
    let left: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".snapshot-"))
        .collect();
    assert!(left.is_empty(), "snapshot files left behind: {left:?}");
    let Restoring {
        kek,
        clock,
        target,
        cfg,
        tmp: _tmp,
    } = restoring(&site);
    let second = target.with_file_name("restored-second");
    snapshot::restore(&second, &kek, &cfg.kek_file, &other, &clock, open).unwrap();
    snapshot::restore(&target, &kek, &cfg.kek_file, &bytes, &clock, open).unwrap();
    let restored = open(&target).unwrap();
    let usage = restored.kv().scan_prefix(Tree::Usage, b"bench/").unwrap();
    assert_eq!(usage.len(), 9_000);
    assert_eq!(usage[8_999].1, 8_999u32.to_be_bytes().to_vec());
}

/// Issue 30: a snapshot holds the audit writer only while it reads the site's state (every
/// tree but the log's own); the entries through its head, and the Merkle nodes they determine,
/// are read after the writer went on. Here the snapshot is stopped at its read of the Merkle
/// nodes: a Sign made meanwhile completes (before, the whole snapshot ran on the writer, and
/// every audited call waited for it — 6.7 s at 10⁶ entries). The snapshot then holds exactly
/// the log through its head: the Sign's entry is not in it, nor is its transparency leaf,
/// and the restored site proves the leaves it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_goes_on_while_a_snapshot_reads_the_log() {
    use meshsign_server::store::Tree;
    let gate = meshsign_tests::ScanGate::new(Tree::Merkle);
    let g = gate.clone();
    let wrap = move |kv| -> Arc<dyn meshsign_server::store::Kv> {
        Arc::new(meshsign_tests::UnreadableEntryKv::new(kv, 0).gated(g.clone()))
    };
    let site = TestSite::start_with("", Some(&wrap)).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let mut leaves = Vec::new();
    for i in 0..40u8 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        leaves.push(r.transparency_entry.unwrap());
    }
    gate.arm();
    let mut admin = site.admin().await;
    let taking = tokio::spawn(async move {
        let mut stream = admin
            .snapshot(meshsign_proto::v1::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(c) = stream.message().await.unwrap() {
            bytes.extend_from_slice(&c.data);
        }
        bytes
    });
    let waiter = gate.clone();
    let reached = tokio::task::spawn_blocking(move || {
        waiter.wait_reached(std::time::Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(reached, "the snapshot reads the Merkle nodes");
    let during = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.sign(sign_req("release", 200)),
    )
    .await
    .expect("a Sign completes while the snapshot reads the log")
    .unwrap()
    .into_inner();
    gate.open();
    let bytes = taking.await.unwrap();
    let during_seq =
        serde_json::from_slice::<serde_json::Value>(&during.audit_entry).unwrap()["seq"]
            .as_u64()
            .unwrap();
    let during_leaf = during.transparency_entry.unwrap().log_index;

    let Restoring {
        kek,
        clock,
        target,
        cfg,
        tmp: _tmp,
    } = restoring(&site);
    let restored = snapshot::restore(&target, &kek, &cfg.kek_file, &bytes, &clock, open).unwrap();
    assert!(
        restored.audit_seq < during_seq,
        "the snapshot ends at its head ({}), before the Sign made meanwhile ({during_seq})",
        restored.audit_seq
    );
    let store = open(&target).unwrap();
    assert!(
        store
            .kv()
            .get(Tree::Audit, &during_seq.to_be_bytes())
            .unwrap()
            .map(|v| !v.windows(7).any(|w| w == b"\"Sign\","))
            .unwrap_or(true),
        "the Sign made meanwhile is not in the snapshot"
    );
    use meshsign_server::audit::merkle;
    assert_eq!(merkle::log_leaf(&store, during_leaf).unwrap(), None);
    for e in &leaves {
        let want = meshsign_evidence::merkle::leaf_hash(&e.canonicalized_body);
        assert_eq!(merkle::log_leaf(&store, e.log_index).unwrap(), Some(want));
    }
    // The restored nodes prove a leaf against the root of the leaves the snapshot holds.
    assert_eq!(leaves[0].log_index, 0);
    let hashes: Vec<_> = leaves
        .iter()
        .map(|e| meshsign_evidence::merkle::leaf_hash(&e.canonicalized_body))
        .collect();
    let size = hashes.len() as u64;
    let proof = merkle::proof(&store, merkle::Log::Transparency, 7, size).unwrap();
    meshsign_evidence::merkle::verify_inclusion(
        7,
        size,
        &hashes[7],
        &proof,
        &meshsign_evidence::merkle::root_of(&hashes),
    )
    .unwrap();
}
