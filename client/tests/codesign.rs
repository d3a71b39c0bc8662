//! `meshsign codesign`: apple-codesign builds the signature on the runner, the site signs the
//! CMS signed attributes with an imported RSA-2048 code-signing identity; apple-codesign's
//! verifier and `openssl cms -verify` accept the result. The signing process never sees the .p12.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Command;

use apple_codesign::{CodeSigningSlot, MachFile};

/// `meshsign --config DIR/site/client.toml ARGS` in `dir`, with the .p12 password set.
fn meshsign_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(common::meshsign())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("site/client.toml"))
        .args(args)
        .env("MESHSIGN_P12_PASSWORD", "s3cret")
        .output()
        .unwrap()
}

/// Imports an RSA-2048 identity as `apple` (`--backend BACKEND`), code-signs a thin Mach-O
/// through the site and checks it with apple-codesign's verifier and openssl. Returns the
/// unsigned Mach-O.
fn sign_and_verify_a_thin_macho(dir: &std::path::Path, backend: &str) -> Vec<u8> {
    let ossl = |args: &[&str]| common::openssl(dir, args);
    let meshsign = |args: &[&str]| meshsign_in(dir, args);

    // Ops import an RSA-2048 code-signing identity (.p12) for apple-cms signing, then the .p12
    // and its key are gone from this machine.
    common::code_signing_p12(
        dir,
        "/CN=Apple Development: Acme (TEAM123)/OU=TEAM123/O=Acme",
    );
    let o = meshsign(&[
        "admin",
        "key",
        "import",
        "--environment",
        "production",
        "--alias",
        "apple",
        "--p12",
        "id.p12",
        "--repository",
        "*",
        "--ref",
        "*",
        "--purpose",
        "apple-cms",
        "--backend",
        backend,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(dir.join("id.key")).unwrap();
    std::fs::remove_file(dir.join("id.p12")).unwrap();

    // An unsigned Mach-O.
    let macho = apple_codesign::macho_builder::MachOBuilder::new_aarch64(2)
        .write_macho()
        .unwrap();
    std::fs::write(dir.join("hello"), &macho).unwrap();

    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "apple",
        "hello",
        "hello.signed",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let signed = std::fs::read(dir.join("hello.signed")).unwrap();

    // apple-codesign's own verifier finds no problem.
    let problems = apple_codesign::verify_macho_data(&signed);
    assert!(
        problems.is_empty(),
        "{:#?}",
        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );

    // openssl verifies the CMS blob over the CodeDirectory.
    let file = MachFile::parse(&signed).unwrap();
    let sig = file
        .nth_macho(0)
        .unwrap()
        .code_signature()
        .unwrap()
        .expect("signed");
    let cms = sig
        .signature_data()
        .unwrap()
        .expect("a CMS signature, not ad-hoc");
    let cd = sig
        .find_slot(CodeSigningSlot::CodeDirectory)
        .expect("code directory");
    std::fs::write(dir.join("cms.der"), cms).unwrap();
    std::fs::write(dir.join("cd.bin"), cd.data).unwrap();
    ossl(&[
        "cms",
        "-verify",
        "-inform",
        "DER",
        "-in",
        "cms.der",
        "-content",
        "cd.bin",
        "-binary",
        "-noverify",
        "-out",
        "/dev/null",
    ]);
    // And with the identity's certificate as the trust anchor.
    ossl(&[
        "cms",
        "-verify",
        "-inform",
        "DER",
        "-in",
        "cms.der",
        "-content",
        "cd.bin",
        "-binary",
        "-CAfile",
        "id.pem",
        "-purpose",
        "any",
        "-out",
        "/dev/null",
    ]);
    macho
}

/// The same with the identity's RSA key imported into a PKCS#11 token (SoftHSM2): Apple's
/// code signature is made by the token.
#[test]
fn codesign_with_the_identity_key_in_a_pkcs11_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = common::start_dev_hsm(&dir.join("site"), &dir.join("hsm"));
    let _ = sign_and_verify_a_thin_macho(dir, "pkcs11");
    let out = common::meshsign_in(
        dir,
        &dir.join("site/client.toml"),
        &[
            "admin",
            "key",
            "list",
            "--environment",
            "production",
            "--output",
            "json",
        ],
    );
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let apple = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["alias"] == "apple")
        .unwrap();
    assert_eq!(apple["backend"], "pkcs11", "{apple}");
}

#[test]
fn codesign_a_macho_through_the_site_and_verify_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = common::start_dev(&dir.join("site"));
    let ossl = |args: &[&str]| common::openssl(dir, args);
    let meshsign = |args: &[&str]| meshsign_in(dir, args);
    let macho = sign_and_verify_a_thin_macho(dir, "software");

    // A universal (x86_64 + arm64) binary, with entitlements and the hardened runtime.
    let mut fat = apple_codesign::UniversalBinaryBuilder::default();
    fat.add_binary(
        apple_codesign::macho_builder::MachOBuilder::new_x86_64(2)
            .write_macho()
            .unwrap(),
    )
    .unwrap();
    fat.add_binary(&macho).unwrap();
    let mut universal = Vec::new();
    fat.write(&mut universal).unwrap();
    std::fs::write(dir.join("fat"), &universal).unwrap();
    std::fs::write(
        dir.join("ent.plist"),
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict><key>com.apple.security.app-sandbox</key><true/></dict></plist>
"#,
    )
    .unwrap();
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "apple",
        "--entitlements",
        "ent.plist",
        "--runtime",
        "fat",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fat_signed = std::fs::read(dir.join("fat")).unwrap();
    let problems = apple_codesign::verify_macho_data(&fat_signed);
    assert!(
        problems.is_empty(),
        "{:#?}",
        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );
    let file = MachFile::parse(&fat_signed).unwrap();
    assert_eq!(file.iter_macho().count(), 2);
    for m in file.iter_macho() {
        let sig = m.code_signature().unwrap().expect("each slice signed");
        assert!(
            sig.signature_data().unwrap().is_some(),
            "each slice has a CMS signature"
        );
        let ent = sig.entitlements().unwrap().expect("entitlements embedded");
        assert!(ent.as_str().contains("com.apple.security.app-sandbox"));
    }

    // A minimal .app bundle.
    let app = dir.join("Hello.app/Contents");
    std::fs::create_dir_all(app.join("MacOS")).unwrap();
    std::fs::write(app.join("MacOS/Hello"), &macho).unwrap();
    std::fs::write(
        app.join("Info.plist"),
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
<key>CFBundleExecutable</key><string>Hello</string>
<key>CFBundleIdentifier</key><string>com.acme.hello</string>
<key>CFBundleName</key><string>Hello</string>
<key>CFBundlePackageType</key><string>APPL</string>
<key>CFBundleVersion</key><string>1</string>
</dict></plist>
"#,
    )
    .unwrap();
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "apple",
        "Hello.app",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        app.join("_CodeSignature/CodeResources").exists(),
        "bundle resources are sealed"
    );
    let exe = std::fs::read(app.join("MacOS/Hello")).unwrap();
    let problems = apple_codesign::verify_macho_data(&exe);
    assert!(
        problems.is_empty(),
        "{:#?}",
        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );
    let file = MachFile::parse(&exe).unwrap();
    let sig = file
        .nth_macho(0)
        .unwrap()
        .code_signature()
        .unwrap()
        .unwrap();
    let cd = sig.code_directory().unwrap().unwrap();
    assert_eq!(cd.ident.as_ref(), "com.acme.hello");

    // An .ipa: Payload/Hello.app with an embedded provisioning profile whose entitlements apply.
    let ipa_app = dir.join("ipa/Payload/Hello.app");
    std::fs::create_dir_all(&ipa_app).unwrap();
    std::fs::write(ipa_app.join("Hello"), &macho).unwrap();
    std::fs::copy(app.join("Info.plist"), ipa_app.join("Info.plist")).unwrap();
    std::fs::write(
        dir.join("profile.plist"),
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
<key>Name</key><string>Acme Hello</string>
<key>Entitlements</key><dict>
<key>application-identifier</key><string>TEAM123.com.acme.hello</string>
<key>get-task-allow</key><false/>
</dict>
</dict></plist>
"#,
    )
    .unwrap();
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "prof.key",
        "-out",
        "prof.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Profile Signer",
    ]);
    ossl(&[
        "cms",
        "-sign",
        "-binary",
        "-nodetach",
        "-outform",
        "DER",
        "-in",
        "profile.plist",
        "-signer",
        "prof.pem",
        "-inkey",
        "prof.key",
        "-out",
        "ipa/Payload/Hello.app/embedded.mobileprovision",
    ]);
    {
        use std::io::Write as _;
        let mut zw = zip::ZipWriter::new(std::fs::File::create(dir.join("App.ipa")).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        for name in ["Hello", "Info.plist", "embedded.mobileprovision"] {
            zw.start_file(format!("Payload/Hello.app/{name}"), opts)
                .unwrap();
            zw.write_all(&std::fs::read(ipa_app.join(name)).unwrap())
                .unwrap();
        }
        zw.finish().unwrap();
    }
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "apple",
        "App.ipa",
        "App-signed.ipa",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut z =
        zip::ZipArchive::new(std::fs::File::open(dir.join("App-signed.ipa")).unwrap()).unwrap();
    let mut exe = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("Payload/Hello.app/Hello").unwrap(), &mut exe)
        .unwrap();
    assert!(
        z.by_name("Payload/Hello.app/_CodeSignature/CodeResources")
            .is_ok()
    );
    let problems = apple_codesign::verify_macho_data(&exe);
    assert!(
        problems.is_empty(),
        "{:#?}",
        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );
    let file = MachFile::parse(&exe).unwrap();
    let sig = file
        .nth_macho(0)
        .unwrap()
        .code_signature()
        .unwrap()
        .unwrap();
    let ent = sig
        .entitlements()
        .unwrap()
        .expect("the profile's entitlements");
    assert!(
        ent.as_str().contains("TEAM123.com.acme.hello"),
        "{}",
        ent.as_str()
    );

    // A digest-only key (no certificate) cannot make Apple signatures: a usage error (exit 2),
    // found before the job's token is spent.
    std::fs::write(dir.join("hello2"), &macho).unwrap();
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "release",
        "hello2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not spent"));

    // One job, one enrollment: three `meshsign sign` steps and one `meshsign codesign` inside
    // `meshsign exec` share one certificate, revoked at the end.
    std::fs::write(dir.join("hello3"), &macho).unwrap();
    for f in ["s1", "s2", "s3"] {
        std::fs::write(dir.join(f), f).unwrap();
    }
    let me = common::meshsign();
    let cfg = dir.join("site/client.toml");
    let step = |what: &str| format!("{} --config {} {what}", me.display(), cfg.display());
    let script = format!(
        "set -e\n{}\n{}\n{}\n{}\n",
        step("sign --environment production --key release s1"),
        step("sign --environment production --key release s2"),
        step("sign --environment production --key release s3"),
        step("codesign --environment production --key apple hello3"),
    );
    std::fs::write(dir.join("job.sh"), script).unwrap();
    let count_before =
        |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).lines().count();
    let before = count_before(&meshsign(&["admin", "audit", "export"]));
    let o = meshsign(&["exec", "--environment", "production", "--", "sh", "job.sh"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let export = meshsign(&["admin", "audit", "export"]);
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .skip(before)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |rpc: &str| entries.iter().filter(|e| e["rpc"] == rpc).count();
    assert_eq!(
        (of("Enroll"), of("RevokeSelf")),
        (1, 1),
        "one enrollment for the job"
    );
    let sign_serials: std::collections::BTreeSet<String> = entries
        .iter()
        .filter(|e| e["rpc"] == "Sign")
        .map(|e| e["cert_serial"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(sign_serials.len(), 1, "every step on one certificate");
    assert!(
        entries
            .iter()
            .filter(|e| e["rpc"] == "Sign")
            .any(|e| e["key_id"]
                .as_str()
                .unwrap_or_default()
                .starts_with("apple@")),
        "the codesign step signed through the agent"
    );
    for f in ["s1", "s2", "s3"] {
        let v = Command::new(common::meshsign())
            .current_dir(dir)
            .args(["verify", f])
            .output()
            .unwrap();
        assert!(v.status.success(), "{f}");
    }

    // Issue 25 row 9: the site refuses the signature (the key is disabled): exit 3, refused —
    // the site's reason, not apple-codesign's rewording of it (which exited 1).
    let o = meshsign(&[
        "admin",
        "key",
        "disable",
        "--environment",
        "production",
        "--alias",
        "apple",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(dir.join("hello4"), &macho).unwrap();
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "apple",
        "hello4",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("key_disabled"), "{stderr}");
}
