//! Sigstore bundles that Sigstore's own verifier accepts (issue 27, build points 1–3 and 6):
//! `meshsign sign --format sigstore` of several files (one SignBatch) writes bundles that
//! sigstore-js (`@sigstore/verify`, npm) verifies with its **default thresholds** — one
//! transparency-log entry, one verified timestamp — against the `trusted_root.json` that
//! `meshsign verification-material --trusted-root` prints: at once (v0.1, the signed entry
//! timestamp), after `meshsign receipt fetch` (v0.3, with the inclusion proof), and written
//! with `--wait-proof`. One altered byte of body, proof, SET or signature fails.
//!
//! Needs `node` and `client/tests/sigstore/node_modules` (`npm install` there; `.ci/run` does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::{meshsign_in, ok, start_dev};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn script() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sigstore");
    assert!(
        dir.join("node_modules/@sigstore/verify").is_dir(),
        "sigstore-js is not installed: run `npm install` in {} (.ci/run does)",
        dir.display()
    );
    dir.join("verify.js")
}

/// sigstore-js's verdict on `bundle` for `artifact`: Ok(media type) or Err(its message).
fn sigstore_js(root: &Path, keys: &Path, bundle: &Path, artifact: &Path) -> Result<String, String> {
    let o = Command::new("node")
        .arg(script())
        .args([root, keys, bundle, artifact])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if o.status.success() {
        assert!(out.starts_with("verified "), "{out}");
        Ok(out["verified ".len()..].to_string())
    } else {
        Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
    }
}

/// A copy of `bundle` with `f` applied to its JSON.
fn altered(bundle: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle).unwrap()).unwrap();
    f(&mut v);
    let out = bundle.with_file_name(format!("{name}.sigstore.json"));
    std::fs::write(&out, serde_json::to_vec(&v).unwrap()).unwrap();
    out
}

/// Flips one bit of the base64 value at `ptr` (decoded, one byte changed, encoded again).
fn flip(v: &mut serde_json::Value, ptr: &str, at: usize) {
    let s = v.pointer_mut(ptr).unwrap_or_else(|| panic!("{ptr}"));
    let mut bytes = B64.decode(s.as_str().unwrap()).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x01;
    *s = B64.encode(bytes).into();
}

#[test]
fn sigstore_js_verifies_the_bundles_with_its_default_thresholds_and_refuses_an_altered_byte() {
    let dir = tempfile::tempdir().unwrap();
    let _site = start_dev(&dir.path().join("site"));
    let cfg = dir.path().join("site/client.toml");
    let run = |args: &[&str]| meshsign_in(dir.path(), &cfg, args);
    // A fresh one-time token per enrollment.
    let token = |name: &str| {
        let t = dir.path().join(name);
        std::fs::write(
            &t,
            ok(
                "dev token",
                run(&[
                    "dev",
                    "token",
                    "--environment",
                    "staging",
                    "--job-id",
                    "4242",
                ]),
            )
            .trim(),
        )
        .unwrap();
        t
    };
    let first = token("token-1");
    let files: Vec<PathBuf> = (0..5)
        .map(|i| {
            let p = dir.path().join(format!("artifact-{i}.bin"));
            std::fs::write(&p, format!("release artifact {i}")).unwrap();
            p
        })
        .collect();
    let names: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec![
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "--token-file",
        first.to_str().unwrap(),
        "--format",
        "sigstore",
    ];
    args.extend(&names);
    ok("sign", run(&args));

    // The trusted root, and the signing key by the hint the bundles carry.
    let root = dir.path().join("trusted_root.json");
    std::fs::write(
        &root,
        ok(
            "trusted root",
            run(&[
                "verification-material",
                "--environment",
                "staging",
                "--trusted-root",
            ]),
        ),
    )
    .unwrap();
    // A key's versions as `verification-material --output json` prints them, and the newest's
    // SPKI (DER).
    let material_of = |alias: &str| {
        let m: serde_json::Value = serde_json::from_str(&ok(
            "key material",
            run(&[
                "verification-material",
                "--environment",
                "staging",
                "--key",
                alias,
                "--output",
                "json",
            ]),
        ))
        .unwrap();
        let der =
            meshsign_evidence::verify::spki_from_pem(m[0]["public_key_pem"].as_str().unwrap())
                .unwrap();
        (m, der)
    };
    let (material, der) = material_of("release");
    let pem = material[0]["public_key_pem"].as_str().unwrap();
    let bundle = |f: &Path| meshsign_client::usecase::sign::sibling(f, ".sigstore.json");
    let hint = {
        let b: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle(&files[0])).unwrap()).unwrap();
        b["verificationMaterial"]["publicKey"]["hint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        hint,
        format!("local/staging/{}", material[0]["key_id"].as_str().unwrap())
    );
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        serde_json::json!({ hint.clone(): B64.encode(&der) }).to_string(),
    )
    .unwrap();

    // Sigstore's own types (sigstore_protobuf_specs, proto3 JSON: unknown fields refused)
    // read every bundle and the trusted root back.
    use sigstore_protobuf_specs::dev::sigstore::{bundle::v1 as sb, trustroot::v1 as tr};
    for f in &files {
        let read: Result<sb::Bundle, _> =
            serde_json::from_slice(&std::fs::read(bundle(f)).unwrap());
        let read = read.unwrap_or_else(|e| panic!("{}: {e}", bundle(f).display()));
        assert_eq!(read.verification_material.unwrap().tlog_entries.len(), 1);
    }
    let read: tr::TrustedRoot = serde_json::from_slice(&std::fs::read(&root).unwrap()).unwrap();
    assert_eq!(read.tlogs.len(), 1);

    // As written: v0.1 bundles (the SET), verified at once.
    for f in &files {
        assert_eq!(
            sigstore_js(&root, &keys, &bundle(f), f),
            Ok("application/vnd.dev.sigstore.bundle+json;version=0.1".into())
        );
    }
    let v01 = bundle(&files[0]);
    for (name, ptr) in [
        (
            "body",
            "/verificationMaterial/tlogEntries/0/canonicalizedBody",
        ),
        (
            "set",
            "/verificationMaterial/tlogEntries/0/inclusionPromise/signedEntryTimestamp",
        ),
        ("signature", "/messageSignature/signature"),
    ] {
        let bad = altered(&v01, &format!("v01-{name}"), |v| flip(v, ptr, 40));
        let e = sigstore_js(&root, &keys, &bad, &files[0]).unwrap_err();
        assert!(e.starts_with("refused"), "{name}: {e}");
    }
    // Another artifact does not pass under this bundle.
    assert!(sigstore_js(&root, &keys, &v01, &files[1]).is_err());

    // Upgraded with the inclusion proof: v0.3, still verified; an altered proof fails.
    let out = ok(
        "receipt fetch",
        run(&[&["receipt", "fetch"][..], &names[..]].concat()),
    );
    assert_eq!(out.matches("added").count(), files.len(), "{out}");
    for f in &files {
        assert_eq!(
            sigstore_js(&root, &keys, &bundle(f), f),
            Ok("application/vnd.dev.sigstore.bundle.v0.3+json".into())
        );
    }
    let again = ok("receipt fetch again", run(&["receipt", "fetch", names[0]]));
    assert!(again.contains("already there"), "{again}");
    let v03 = bundle(&files[0]);
    for (name, ptr) in [
        (
            "proof",
            "/verificationMaterial/tlogEntries/0/inclusionProof/hashes/0",
        ),
        (
            "body",
            "/verificationMaterial/tlogEntries/0/canonicalizedBody",
        ),
        (
            "set",
            "/verificationMaterial/tlogEntries/0/inclusionPromise/signedEntryTimestamp",
        ),
        ("signature", "/messageSignature/signature"),
    ] {
        let bad = altered(&v03, &format!("v03-{name}"), |v| flip(v, ptr, 10));
        let e = sigstore_js(&root, &keys, &bad, &files[0])
            .expect_err(&format!("an altered {name} must fail"));
        assert!(e.starts_with("refused"), "{name}: {e}");
    }
    // A checkpoint signed by another key (another site's log) fails too.
    let other = tempfile::tempdir().unwrap();
    let other_site = start_dev(&other.path().join("site"));
    let other_root = other.path().join("trusted_root.json");
    std::fs::write(
        &other_root,
        ok(
            "other root",
            meshsign_in(
                other.path(),
                &other.path().join("site/client.toml"),
                &[
                    "verification-material",
                    "--environment",
                    "staging",
                    "--trusted-root",
                ],
            ),
        ),
    )
    .unwrap();
    assert!(sigstore_js(&other_root, &keys, &v03, &files[0]).is_err());

    // `--trusted-root --fleet`: one root naming both sites' logs verifies this site's bundle
    // (the other site's log alone did not); a fleet with a site down is refused, naming it.
    let fleet_toml = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet_toml,
        format!(
            "[sites]\nhere = {:?}\nthere = {:?}\n",
            cfg.to_str().unwrap(),
            other.path().join("site/client.toml").to_str().unwrap()
        ),
    )
    .unwrap();
    let fleet_material = |toml: &Path| {
        meshsign_in(
            dir.path(),
            toml,
            &[
                "verification-material",
                "--environment",
                "staging",
                "--trusted-root",
                "--fleet",
            ],
        )
    };
    let fleet_root = dir.path().join("fleet_root.json");
    std::fs::write(&fleet_root, ok("fleet root", fleet_material(&fleet_toml))).unwrap();
    let merged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fleet_root).unwrap()).unwrap();
    let one: serde_json::Value = serde_json::from_slice(&std::fs::read(&root).unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&other_root).unwrap()).unwrap();
    assert_eq!(
        merged["tlogs"],
        serde_json::json!([one["tlogs"][0], theirs["tlogs"][0]]),
        "both sites' logs, in site order"
    );
    assert_eq!(
        sigstore_js(&fleet_root, &keys, &v03, &files[0]),
        Ok("application/vnd.dev.sigstore.bundle.v0.3+json".into())
    );
    drop(other_site);
    let o = fleet_material(&fleet_toml);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("there"), "names the site that failed: {err}");
    assert!(o.stdout.is_empty(), "no partial root");

    // meshsign's own verifier agrees: the log entry checks under the audit key.
    let audit = dir.path().join("audit.pem");
    std::fs::write(
        &audit,
        ok(
            "audit key",
            run(&[
                "verification-material",
                "--environment",
                "staging",
                "--audit-key",
            ]),
        ),
    )
    .unwrap();
    let key_pem = dir.path().join("release.pem");
    std::fs::write(&key_pem, pem).unwrap();
    let report = ok(
        "verify",
        run(&[
            "verify",
            names[0],
            "--public-key",
            key_pem.to_str().unwrap(),
            "--receipt",
            "--audit-key",
            audit.to_str().unwrap(),
        ]),
    );
    assert!(report.contains("OK"), "{report}");
    // It also holds the proof's copy of the root to the checkpoint's (sigstore-js reads only
    // the checkpoint's).
    let bad_root = altered(&v03, "v03-root", |v| {
        flip(
            v,
            "/verificationMaterial/tlogEntries/0/inclusionProof/rootHash",
            3,
        )
    });
    let o = run(&[
        "verify",
        names[0],
        "--bundle",
        bad_root.to_str().unwrap(),
        "--public-key",
        key_pem.to_str().unwrap(),
        "--receipt",
        "--audit-key",
        audit.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rootHash"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // --wait-proof writes v0.3 bundles directly.
    let late = dir.path().join("late.bin");
    std::fs::write(&late, "a late artifact").unwrap();
    ok(
        "sign --wait-proof",
        run(&[
            "sign",
            "--environment",
            "staging",
            "--key",
            "release",
            "--token-file",
            token("token-2").to_str().unwrap(),
            "--format",
            "sigstore",
            "--wait-proof",
            late.to_str().unwrap(),
        ]),
    );
    assert_eq!(
        sigstore_js(&root, &keys, &bundle(&late), &late),
        Ok("application/vnd.dev.sigstore.bundle.v0.3+json".into())
    );

    // A message signature (the key signs the file's bytes, at most 4 KiB): its bundle too.
    let msg = dir.path().join("release-notes.txt");
    std::fs::write(&msg, "release notes, signed as a message").unwrap();
    ok(
        "sign --message",
        run(&[
            "sign",
            "--environment",
            "staging",
            "--key",
            "release",
            "--token-file",
            token("token-msg").to_str().unwrap(),
            "--format",
            "sigstore",
            "--message",
            msg.to_str().unwrap(),
        ]),
    );
    assert_eq!(
        sigstore_js(&root, &keys, &bundle(&msg), &msg),
        Ok("application/vnd.dev.sigstore.bundle+json;version=0.1".into())
    );
    assert!(sigstore_js(&root, &keys, &bundle(&msg), &files[0]).is_err());

    // A P-384 key's message: it signs SHA-384 of the message, so the bundle's messageDigest
    // and the log entry's hashedrekord name SHA-384 — and sigstore-js, which hashes the
    // artifact with the bundle's algorithm, verifies it.
    ok(
        "p384 key",
        run(&[
            "admin",
            "key",
            "create",
            "--environment",
            "staging",
            "--alias",
            "p384",
            "--algorithm",
            "ecdsa-p384-sha384",
            "--repository",
            "*",
            "--ref",
            "*",
        ]),
    );
    let notes = dir.path().join("notes-384.txt");
    std::fs::write(&notes, "release notes, signed by a P-384 key").unwrap();
    ok(
        "sign --message (P-384)",
        run(&[
            "sign",
            "--environment",
            "staging",
            "--key",
            "p384",
            "--token-file",
            token("token-384").to_str().unwrap(),
            "--format",
            "sigstore",
            "--message",
            notes.to_str().unwrap(),
        ]),
    );
    let (p384, p384_der) = material_of("p384");
    let p384_keys = dir.path().join("keys-384.json");
    std::fs::write(
        &p384_keys,
        serde_json::json!({
            format!("local/staging/{}", p384[0]["key_id"].as_str().unwrap()): B64.encode(&p384_der),
        })
        .to_string(),
    )
    .unwrap();
    let b384: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle(&notes)).unwrap()).unwrap();
    assert_eq!(
        b384["messageSignature"]["messageDigest"]["algorithm"],
        "SHA2_384"
    );
    assert_eq!(
        sigstore_js(&root, &p384_keys, &bundle(&notes), &notes),
        Ok("application/vnd.dev.sigstore.bundle+json;version=0.1".into())
    );
    assert!(sigstore_js(&root, &p384_keys, &bundle(&notes), &msg).is_err());
    let p384_pem = dir.path().join("p384.pem");
    std::fs::write(&p384_pem, p384[0]["public_key_pem"].as_str().unwrap()).unwrap();
    let report = ok(
        "verify P-384 bundle",
        run(&[
            "verify",
            notes.to_str().unwrap(),
            "--public-key",
            p384_pem.to_str().unwrap(),
            "--receipt",
            "--audit-key",
            audit.to_str().unwrap(),
        ]),
    );
    assert!(report.contains("OK"), "{report}");

    // An attestation: the statement the site built, as a Sigstore bundle with its `dsse`
    // log entry, verified by sigstore-js under the attestation key's hint; then upgraded.
    let out = ok(
        "attest",
        run(&[
            "attest",
            "--environment",
            "staging",
            "--key",
            "attest",
            "--token-file",
            token("token-3").to_str().unwrap(),
            names[0],
            names[1],
        ]),
    );
    let att_bundle = dir.path().join("artifact-0.bin.intoto.sigstore.json");
    assert!(out.contains("Sigstore bundle"), "{out}");
    let (att, att_der) = material_of("attest");
    let both = dir.path().join("keys-both.json");
    std::fs::write(
        &both,
        serde_json::json!({
            hint.clone(): B64.encode(&der),
            format!("local/staging/{}", att[0]["key_id"].as_str().unwrap()): B64.encode(&att_der),
        })
        .to_string(),
    )
    .unwrap();
    assert_eq!(
        sigstore_js(&root, &both, &att_bundle, &files[0]),
        Ok("application/vnd.dev.sigstore.bundle+json;version=0.1".into())
    );
    let bad = altered(&att_bundle, "att-payload", |v| {
        flip(v, "/dsseEnvelope/payload", 30)
    });
    assert!(sigstore_js(&root, &both, &bad, &files[0]).is_err());
    ok(
        "receipt fetch (attestation)",
        run(&["receipt", "fetch", att_bundle.to_str().unwrap()]),
    );
    assert_eq!(
        sigstore_js(&root, &both, &att_bundle, &files[0]),
        Ok("application/vnd.dev.sigstore.bundle.v0.3+json".into())
    );
    // A statement's key is pinned with its purposes (the material JSON).
    let att_pem = dir.path().join("attest.json");
    std::fs::write(&att_pem, att.to_string()).unwrap();
    let report = ok(
        "verify attestation bundle",
        run(&[
            "verify",
            names[1],
            "--bundle",
            att_bundle.to_str().unwrap(),
            "--public-key",
            att_pem.to_str().unwrap(),
            "--receipt",
            "--audit-key",
            audit.to_str().unwrap(),
        ]),
    );
    assert!(report.contains("under a signed checkpoint"), "{report}");

    // A witness with the two checkpoints the bundles carry: the later log extends the earlier.
    let note_of = |b: &Path, name: &str| {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(b).unwrap()).unwrap();
        let note = v
            .pointer("/verificationMaterial/tlogEntries/0/inclusionProof/checkpoint/envelope")
            .and_then(|n| n.as_str())
            .unwrap()
            .to_string();
        let p = dir.path().join(name);
        std::fs::write(&p, note).unwrap();
        p
    };
    let (old, new) = (
        note_of(&v03, "old.note"),
        note_of(&bundle(&late), "new.note"),
    );
    let consistency = |a: &Path, b: &Path| {
        run(&[
            "audit",
            "consistency",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--audit-key",
            audit.to_str().unwrap(),
        ])
    };
    let out = ok("audit consistency", consistency(&old, &new));
    assert!(out.contains("/log: consistent"), "{out}");
    assert_eq!(consistency(&new, &old).status.code(), Some(2));
    // A checkpoint with another root of the earlier size (a rewritten log) is refused: its
    // signature does not verify, or — signed — its tree is not extended.
    let text = std::fs::read_to_string(&old).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[2] = B64.encode([7u8; 32]);
    let forged = dir.path().join("forged.note");
    std::fs::write(&forged, lines.join("\n") + "\n").unwrap();
    assert_eq!(consistency(&forged, &new).status.code(), Some(1));
}
