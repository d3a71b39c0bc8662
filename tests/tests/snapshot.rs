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

#[tokio::test]
async fn a_cut_snapshot_is_refused_whole_and_leaves_the_target_untouched() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    for i in 0..3 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    let (bytes, seq) = site.state().snapshot().await.unwrap();
    let cfg = SiteConfig::load(&site.site_toml).unwrap();
    let kek = Kek::load(&cfg.kek_file, true).unwrap();
    let clock: SharedClock = Arc::new(site.clock.clone());
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("restored");
    let open = |dir: &std::path::Path| Store::open_sled(dir, 1 << 20);

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
