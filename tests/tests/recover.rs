//! Issue 23 row 8: `meshsignd recover` says exactly what a start would do — it runs the start's
//! own checks (`state::preflight`). For each damaged copy of a stopped site the report's verdict
//! and the real start agree; a marker from another site is named as such, not as a wrong KEK.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsign_server::config::SiteConfig;
use meshsign_server::custody::Kek;
use meshsign_server::state::{SiteState, recovery};
use meshsign_server::store::{SledKv, Store};
use meshsign_tests::{TestSite, sign_req};

/// A site that signed a few times and stopped: (its config file, its data folder, the folder
/// that holds them).
async fn stopped_site() -> (PathBuf, PathBuf, Arc<tempfile::TempDir>) {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    for i in 0..5 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    drop(s);
    let TestSite {
        dir,
        handle,
        site_toml,
        ..
    } = site;
    handle.shutdown().await;
    let data = dir.path().join("data");
    (site_toml, data, dir)
}

/// (case, damage, use the other site's KEK, starts, what the refusal names)
type Case = (&'static str, Box<dyn Fn(&Path)>, bool, bool, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_reports_what_the_start_does_for_every_damage() {
    let (site_toml, data, _dir) = stopped_site().await;
    let (_other_toml, other_data, other_dir) = stopped_site().await;
    let cfg = SiteConfig::load(&site_toml).unwrap();
    let kek = Kek::load(&cfg.kek_file, true).unwrap();
    let other_kek_file = other_dir.path().join("kek");
    assert!(other_kek_file.exists(), "the other site's KEK file");
    let journal = |d: &Path| d.join(meshsign_server::audit::journal::JOURNAL_FILE);
    let marker = meshsign_server::state::marker::SiteMarker::path;
    let cases: Vec<Case> = vec![
        ("intact", Box::new(|_| {}), false, true, ""),
        (
            "marker deleted",
            Box::new(move |d| std::fs::remove_file(marker(d)).unwrap()),
            false,
            false,
            "marker",
        ),
        ("wrong KEK", Box::new(|_| {}), true, false, "KEK"),
        (
            "another site's marker",
            Box::new({
                let other = other_data.clone();
                move |d| {
                    std::fs::copy(marker(&other), marker(d))
                        .map(|_| ())
                        .unwrap()
                }
            }),
            false,
            false,
            "comes from another site's folder",
        ),
        (
            "journal emptied",
            Box::new(move |d| std::fs::write(journal(d), b"").unwrap()),
            false,
            false,
            "audit.journal",
        ),
        (
            "journal deleted",
            Box::new(move |d| std::fs::remove_file(journal(d)).unwrap()),
            false,
            false,
            "audit.journal is missing",
        ),
        (
            "torn last line",
            Box::new(move |d| {
                let mut t = std::fs::read(journal(d)).unwrap();
                t.extend_from_slice(b"{\"seq\":");
                std::fs::write(journal(d), t).unwrap();
            }),
            false,
            true,
            "",
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (case, damage, other_kek, starts, names)) in cases.iter().enumerate() {
        let d = tmp.path().join(format!("case{i}"));
        meshsign_tests::copy_dir(&data, &d);
        damage(&d);
        let kek_file = if *other_kek {
            other_kek_file.clone()
        } else {
            cfg.kek_file.clone()
        };
        let this_kek = Kek::load(&kek_file, true).unwrap();
        // What recover says (the store closed again before the start opens it).
        let (report, store) = recovery::inspect(&d, Some((&this_kek, &kek_file)), || {
            Store::open_sled(&d, SledKv::DEFAULT_CACHE_BYTES)
        })
        .unwrap();
        drop(store);
        let text = report.to_string();
        // What the start does.
        let mut c = SiteConfig::load(&site_toml).unwrap();
        c.data_dir = d.clone();
        c.kek_file = kek_file.clone();
        let started = SiteState::open(c, Arc::new(meshsign_server::clock::SystemClock));
        assert_eq!(
            report.intact(),
            started.is_ok(),
            "{case}: recover and the start disagree:\n{text}\nstart: {:?}",
            started.as_ref().err().map(|e| e.to_string())
        );
        assert_eq!(started.is_ok(), *starts, "{case}: {text}");
        if let Err(e) = started {
            let e = e.to_string();
            assert!(e.contains(names), "{case}: the start names {names}: {e}");
            assert!(
                text.contains(&e),
                "{case}: recover reports the start's own refusal:\n{text}\nstart: {e}"
            );
        } else {
            assert!(
                text.contains("meshsignd starts on it as it is"),
                "{case}: {text}"
            );
        }
    }
    drop(kek);
}
