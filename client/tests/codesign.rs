//! `meshsign codesign`: apple-codesign builds the signature on the runner, the site signs the
//! CMS signed attributes with an imported RSA-2048 code-signing identity; apple-codesign's
//! verifier and `openssl cms -verify` accept the result. The signing process never sees the .p12.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Command;

use apple_codesign::{CodeSigningSlot, MachFile};

#[test]
fn codesign_a_macho_through_the_site_and_verify_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _site = common::start_dev(&dir.join("site"));
    let ossl = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let meshsign = |args: &[&str]| {
        Command::new(common::meshsign())
            .current_dir(dir)
            .arg("--config")
            .arg(dir.join("site/client.toml"))
            .args(args)
            .env("MESHSIGN_P12_PASSWORD", "s3cret")
            .output()
            .unwrap()
    };

    // Ops import an RSA-2048 code-signing identity (.p12) for apple-cms signing, then the .p12
    // and its key are gone from this machine.
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "id.key",
        "-out",
        "id.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Apple Development: Acme (TEAM123)/OU=TEAM123/O=Acme",
        "-addext",
        "extendedKeyUsage=codeSigning",
        "-addext",
        "keyUsage=critical,digitalSignature",
    ]);
    ossl(&[
        "pkcs12",
        "-export",
        "-inkey",
        "id.key",
        "-in",
        "id.pem",
        "-out",
        "id.p12",
        "-passout",
        "pass:s3cret",
    ]);
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

    // A digest-only key cannot make Apple signatures: the site refuses, the CLI exits 1.
    std::fs::write(dir.join("hello2"), &macho).unwrap();
    let o = meshsign(&[
        "codesign",
        "--environment",
        "production",
        "--key",
        "release",
        "hello2",
    ]);
    assert_eq!(o.status.code(), Some(1));
}
