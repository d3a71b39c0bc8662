//! Keys at rest: nothing in the data folder contains any generated private key, in any
//! encoding; the wrapped records decrypt only under the KEK and their own slot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::Path;

use meshsign_server::ca::RunnerCaRecord;
use meshsign_server::custody::{Kek, KeyRecord, key_aad};
use meshsign_server::store::Tree;
use meshsign_tests::TestSite;
use p256::pkcs8::DecodePrivateKey as _;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_private_key_bytes_anywhere_in_the_data_dir() {
    let site = TestSite::start().await;
    // Use the site so every kind of key exists and has been used.
    let (_k, _r, mut signer) = site.enrolled("production").await;
    signer
        .sign(meshsign_proto::v1::SignRequest {
            key_alias: "release".into(),
            input: Some(meshsign_proto::v1::sign_request::Input::Sha256Digest(
                vec![9; 32],
            )),
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap();
    let state = site.state().clone();
    let kek = Kek::load(&site.dir.path().join("kek"), false).unwrap();

    // Decrypt every stored private key (signing keys and runner CAs) with the KEK.
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let keys: Vec<KeyRecord> = state.store.scan(Tree::Keys, b"").unwrap();
    assert_eq!(
        keys.len(),
        6,
        "release×2 + attest×2 + prod-only + the audit key"
    );
    for k in &keys {
        let w = k.wrapped.as_ref().expect("a software key is wrapped");
        let pkcs8 = kek
            .unwrap(
                &key_aad(&k.partition, &k.alias, k.version),
                &w.nonce,
                &w.ciphertext,
            )
            .unwrap();
        // The slot is bound: the same ciphertext does not open as another version.
        assert!(
            kek.unwrap(
                &key_aad(&k.partition, &k.alias, k.version + 1),
                &w.nonce,
                &w.ciphertext
            )
            .is_err()
        );
        secrets.push((k.key_id(), pkcs8.to_vec()));
    }
    let issuers: Vec<RunnerCaRecord> = state.store.scan(Tree::RunnerCas, b"").unwrap();
    assert_eq!(issuers.len(), 2);
    for i in &issuers {
        let aad = format!("meshsign/issuer/v1\0{}\0{}", i.partition, i.id);
        let pkcs8 = kek
            .unwrap(
                &aad,
                &i.wrapped.as_ref().expect("a software CA").nonce,
                &i.wrapped.as_ref().expect("a software CA").ciphertext,
            )
            .unwrap();
        secrets.push((format!("runner CA {}", i.id), pkcs8.to_vec()));
    }
    drop(state);
    let dir = site.dir.path().to_path_buf();
    site.handle.shutdown().await;

    let files = files_under(&dir.join("data"));
    assert!(!files.is_empty());
    let mut scanned = 0;
    for (name, pkcs8) in &secrets {
        let scalar = p256::SecretKey::from_pkcs8_der(pkcs8).unwrap().to_bytes();
        let pem = meshsign_evidence::pem_encode("PRIVATE KEY", pkcs8);
        let b64_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let needles: [&[u8]; 4] = [&scalar, pkcs8, pem.as_bytes(), b64_body.as_bytes()];
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            for n in needles {
                assert!(
                    !contains(&bytes, n),
                    "{name}: private key material found in {}",
                    f.display()
                );
            }
            // And not as hex (records are JSON with hex fields).
            assert!(
                !contains(&bytes, hex::encode(scalar).as_bytes()),
                "{name}: hex scalar in {}",
                f.display()
            );
            scanned += 1;
        }
    }
    assert!(scanned >= secrets.len());
}

#[tokio::test]
async fn keys_and_runner_cas_survive_a_restart_and_a_wrong_kek_refuses_to_start() {
    let site = TestSite::start().await;
    let (_k, _r, mut signer) = site.enrolled("staging").await;
    let req = || meshsign_proto::v1::SignRequest {
        key_alias: "release".into(),
        input: Some(meshsign_proto::v1::sign_request::Input::Sha256Digest(
            vec![5; 32],
        )),
        artifact_name: String::new(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    };
    let before = signer
        .sign(req())
        .await
        .unwrap()
        .into_inner()
        .public_key_der;
    let ca_before = site
        .state()
        .runner_cas("staging")
        .unwrap()
        .active
        .record
        .cert_der
        .clone();
    let site = site.restart().await;
    let (_k, r, mut signer) = site.enrolled("staging").await;
    assert_eq!(
        signer
            .sign(req())
            .await
            .unwrap()
            .into_inner()
            .public_key_der,
        before
    );
    assert_eq!(r.certificate_chain[1], ca_before);
    let seq_after_restart = site.audit().len();
    assert!(seq_after_restart >= 4, "audit continues across restarts");

    // A different KEK cannot open the stored keys: the site refuses to start.
    let dir = site.dir.path().to_path_buf();
    let site_toml = site.site_toml.clone();
    site.handle.shutdown().await;
    Kek::generate_file(&dir.join("kek")).unwrap();
    let cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
    let err = meshsign_server::state::SiteState::open(
        cfg,
        std::sync::Arc::new(meshsign_server::clock::SystemClock),
    )
    .expect_err("wrong KEK");
    // Refused before the store is touched, naming the KEK file and the site marker.
    let msg = err.to_string();
    assert!(msg.starts_with("wrong KEK: "), "{msg}");
    assert!(
        msg.contains(&dir.join("kek").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("site.json"), "{msg}");
}
