//! Key algorithms: ECDSA P-256, RSA PKCS#1 v1.5 and PSS, and (messages only) Ed25519 and ECDSA
//! P-384 (aws-lc-rs in the site); openssl verifies
//! each; the key's algorithm decides and a request for another is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_proto::v1::{self, sign_request::Input};
use meshsign_tests::{TestSite, openssl, write_pem};
use tonic::Code;

const RSA_KEYS: &str = r#"
[[environments.signing_keys]]
alias = "apple"
algorithm = "rsa-2048-pkcs1-sha256"
access = { repositories = ["*"], refs = ["*"] }
purposes = ["digest", "apple-cms"]

[[environments.signing_keys]]
alias = "pss"
algorithm = "rsa-2048-pss-sha256"
access = { repositories = ["*"], refs = ["*"] }
"#;

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    d
}

#[tokio::test]
async fn ecdsa_rsa_pkcs1_and_pss_signatures_verify_with_openssl() {
    let site = TestSite::start_with(RSA_KEYS, None).await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let dir = site.dir.path();
    let data = b"a release artifact".repeat(1000);
    let file = dir.join("artifact");
    std::fs::write(&file, &data).unwrap();
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    for (alias, alg, extra) in [
        ("release", "ecdsa-p256-sha256", vec![]),
        ("apple", "rsa-2048-pkcs1-sha256", vec![]),
        (
            "pss",
            "rsa-2048-pss-sha256",
            vec![
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
            ],
        ),
    ] {
        let r = signer
            .sign(v1::SignRequest {
                key_alias: alias.into(),
                input: Some(Input::Sha256Digest(sha256(&data).to_vec())),
                artifact_name: "artifact".into(),
                algorithm: alg.into(),
                signed_entry_timestamp: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.algorithm, alg);
        if alg.starts_with("rsa-2048") {
            assert_eq!(r.signature.len(), 256);
        }
        let (sig, pubkey) = (
            dir.join(format!("{alias}.sig")),
            dir.join(format!("{alias}.pem")),
        );
        std::fs::write(&sig, &r.signature).unwrap();
        write_pem(&pubkey, "PUBLIC KEY", &r.public_key_der);
        let mut args = vec!["dgst", "-sha256", "-verify"];
        let (pk, sg, fl) = (p(&pubkey), p(&sig), p(&file));
        args.push(&pk);
        args.extend(extra.iter().copied());
        args.extend(["-signature", &sg, &fl]);
        let (ok, out) = openssl(&args);
        assert!(ok, "{alias} ({alg}): {out}");
        // The client's offline verifier agrees, and refuses another digest.
        meshsign_evidence::verify::verify_signature(
            alg,
            &r.public_key_der,
            &sha256(&data),
            &r.signature,
        )
        .unwrap();
        assert!(
            meshsign_evidence::verify::verify_signature(
                alg,
                &r.public_key_der,
                &sha256(b"x"),
                &r.signature
            )
            .is_err()
        );
    }
}

#[tokio::test]
async fn a_request_for_another_algorithm_is_refused_and_audited() {
    let site = TestSite::start_with(RSA_KEYS, None).await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let err = signer
        .sign(v1::SignRequest {
            key_alias: "apple".into(),
            input: Some(Input::Sha256Digest(vec![1; 32])),
            artifact_name: String::new(),
            algorithm: "ecdsa-p256-sha256".into(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("algorithm: "),
        "{}",
        err.message()
    );
    let rec = site.last_audit();
    assert_eq!(
        (
            rec.decision.as_str(),
            rec.reason.as_str(),
            rec.key_id.as_str()
        ),
        ("deny", "algorithm", "apple@v1")
    );
}

#[tokio::test]
async fn rsa_keys_import_rotate_and_survive_restart() {
    use aws_lc_rs::encoding::AsDer;
    let site = TestSite::start_with(RSA_KEYS, None).await;
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).unwrap();
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).unwrap();
    let pem = meshsign_evidence::pem_encode("PRIVATE KEY", pkcs8.as_ref());
    let info = site
        .admin()
        .await
        .import_key(v1::ImportKeyRequest {
            environment: "production".into(),
            alias: "vendor-rsa".into(),
            pkcs8_pem: pem.into_bytes(),
            repositories: vec!["*".into()],
            refs: vec!["*".into()],
            chain_pem: Vec::new(),
            purposes: vec![],
            backend: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.algorithm, "rsa-3072-pkcs1-sha256");
    site.admin()
        .await
        .rotate_key(v1::KeyRef {
            environment: "production".into(),
            alias: "pss".into(),
        })
        .await
        .unwrap();
    let site = site.restart().await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    for (alias, alg, len) in [
        ("vendor-rsa", "rsa-3072-pkcs1-sha256", 384),
        ("pss", "rsa-2048-pss-sha256", 256),
    ] {
        let r = signer
            .sign(v1::SignRequest {
                key_alias: alias.into(),
                input: Some(Input::Sha256Digest(vec![2; 32])),
                artifact_name: String::new(),
                algorithm: String::new(),
                signed_entry_timestamp: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.algorithm.as_str(), r.signature.len()), (alg, len));
        meshsign_evidence::verify::verify_signature(alg, &r.public_key_der, &[2; 32], &r.signature)
            .unwrap();
    }
    let r = signer
        .sign(meshsign_tests::sign_req("pss", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key_id, "pss@v2");
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
}

fn attr(oid: &[u8], value: Vec<u8>) -> Vec<u8> {
    der(0x30, &[der(0x06, oid), der(0x31, &value)].concat())
}

const CONTENT_TYPE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x03];
const MESSAGE_DIGEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x04];
const SIGNING_TIME: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x05];
const ID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const ID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
const CDHASHES2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x63, 0x64, 0x09, 0x02];
const SHA256_OID: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

/// Signed attributes as a code-signing step makes them (content type, signing time, message
/// digest of the CodeDirectory, Apple's CDHashes2).
fn signed_attrs(content_type: &[u8], when: i64, code_directory: &[u8]) -> Vec<u8> {
    let t = time::OffsetDateTime::from_unix_timestamp(when).unwrap();
    let utc = format!(
        "{:02}{:02}{:02}{:02}{:02}{:02}Z",
        t.year() % 100,
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let md = sha256(code_directory);
    der(
        0x31,
        &[
            attr(CONTENT_TYPE, der(0x06, content_type)),
            attr(SIGNING_TIME, der(0x17, utc.as_bytes())),
            attr(MESSAGE_DIGEST, der(0x04, &md)),
            attr(
                CDHASHES2,
                der(0x30, &[der(0x06, SHA256_OID), der(0x04, &md)].concat()),
            ),
        ]
        .concat(),
    )
}

fn cms_req(alias: &str, attrs: Vec<u8>) -> v1::SignRequest {
    v1::SignRequest {
        key_alias: alias.into(),
        input: Some(Input::AppleCmsSignedAttributes(attrs)),
        artifact_name: "App.app".into(),
        algorithm: String::new(),
        signed_entry_timestamp: false,
    }
}

#[tokio::test]
async fn apple_cms_signed_attributes_are_checked_signed_and_audited() {
    let site = TestSite::start_with(RSA_KEYS, None).await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let code_directory = b"fake CodeDirectory blob".to_vec();
    let attrs = signed_attrs(ID_DATA, site.now(), &code_directory);
    let r = signer
        .sign(cms_req("apple", attrs.clone()))
        .await
        .unwrap()
        .into_inner();
    // The signature is RSA PKCS#1 v1.5 over SHA-256 of the attributes: openssl agrees.
    let dir = site.dir.path();
    let (a, s, k) = (
        dir.join("attrs.der"),
        dir.join("attrs.sig"),
        dir.join("apple.pem"),
    );
    std::fs::write(&a, &attrs).unwrap();
    std::fs::write(&s, &r.signature).unwrap();
    write_pem(&k, "PUBLIC KEY", &r.public_key_der);
    let (ok, out) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        k.to_str().unwrap(),
        "-signature",
        s.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let rec = site.last_audit();
    let cd = hex::encode(sha256(&code_directory));
    assert!(
        rec.detail.contains(&cd),
        "the CDHash is audited: {}",
        rec.detail
    );
    assert_eq!(rec.digest, hex::encode(sha256(&attrs)));

    // Refusals: InvalidArgument, audited with the check.
    let cases = [
        (
            "other content type",
            signed_attrs(ID_SIGNED_DATA, site.now(), &code_directory),
            "content_type",
        ),
        (
            "stale signingTime",
            signed_attrs(ID_DATA, site.now() - 3600, &code_directory),
            "signing_time",
        ),
        (
            "future signingTime",
            signed_attrs(ID_DATA, site.now() + 3600, &code_directory),
            "signing_time",
        ),
        ("not DER", b"garbage".to_vec(), "apple_cms"),
        (
            // RFC 5652: an attribute type at most once. A second messageDigest could name
            // another CodeDirectory than the one audited.
            "duplicate messageDigest",
            {
                let good = signed_attrs(ID_DATA, site.now(), &code_directory);
                let (_, inner) = good.split_at(if good[1] & 0x80 != 0 {
                    2 + (good[1] & 0x7f) as usize
                } else {
                    2
                });
                let other = sha256(b"another code directory");
                der(
                    0x31,
                    &[inner, &attr(MESSAGE_DIGEST, der(0x04, &other))].concat(),
                )
            },
            "apple_cms",
        ),
        (
            "messageDigest with two values",
            {
                let good = signed_attrs(ID_DATA, site.now(), &code_directory);
                let (_, inner) = good.split_at(if good[1] & 0x80 != 0 {
                    2 + (good[1] & 0x7f) as usize
                } else {
                    2
                });
                // Rebuild: the message-digest attribute with a second value.
                let md = sha256(&code_directory);
                let two = attr(
                    MESSAGE_DIGEST,
                    [der(0x04, &md), der(0x04, &sha256(b"x"))].concat(),
                );
                let one = attr(MESSAGE_DIGEST, der(0x04, &md));
                let pos = inner
                    .windows(one.len())
                    .position(|w| w == one.as_slice())
                    .unwrap();
                let mut rebuilt = inner[..pos].to_vec();
                rebuilt.extend_from_slice(&two);
                rebuilt.extend_from_slice(&inner[pos + one.len()..]);
                der(0x31, &rebuilt)
            },
            "apple_cms",
        ),
        ("over 4 KiB", der(0x31, &vec![0u8; 5000]), "apple_cms"),
    ];
    for (name, attrs, check) in cases {
        let e = signer.sign(cms_req("apple", attrs)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {}", e.message());
        assert!(
            e.message().starts_with(&format!("{check}: ")),
            "{name}: {}",
            e.message()
        );
        assert_eq!(site.last_audit().reason, check, "{name}");
    }
    // Purposes: a digest-only key refuses apple-cms; an apple-cms key refuses messages.
    let e = signer
        .sign(cms_req(
            "release",
            signed_attrs(ID_DATA, site.now(), &code_directory),
        ))
        .await
        .unwrap_err();
    assert!(e.message().starts_with("purpose: "), "{}", e.message());
    let e = signer
        .sign(v1::SignRequest {
            key_alias: "apple".into(),
            input: Some(Input::Message(b"hello".to_vec())),
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("purpose: "), "{}", e.message());
}

#[tokio::test]
async fn signing_identity_csr_certificate_and_chain() {
    let site = TestSite::start_with(RSA_KEYS, None).await;
    let mut admin = site.admin().await;
    let dir = site.dir.path();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let csr = admin
        .create_key_csr(v1::KeyCsrRequest {
            environment: "production".into(),
            alias: "apple".into(),
            common_name: "Apple Distribution: Acme (TEAM123)".into(),
            email: "release@acme.test".into(),
            organization: "Acme".into(),
            country: "SG".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(csr.key_id, "apple@v1");
    std::fs::write(p("apple.csr"), &csr.csr_pem).unwrap();
    let (ok, out) = openssl(&["req", "-in", &p("apple.csr"), "-verify", "-noout", "-text"]);
    assert!(
        ok && out.contains("Apple Distribution: Acme (TEAM123)")
            && out.contains("release@acme.test"),
        "{out}"
    );

    // A CA (openssl, standing in for Apple) issues the certificate; ops attach the chain.
    let (ok, out) = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-subj",
        "/CN=Test WWDR CA",
        "-days",
        "2",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(&[
        "x509",
        "-req",
        "-in",
        &p("apple.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("leaf.pem"),
        "-days",
        "1",
    ]);
    assert!(ok, "{out}");
    let chain = [
        std::fs::read(p("leaf.pem")).unwrap(),
        std::fs::read(p("ca.pem")).unwrap(),
    ]
    .concat();

    // A chain whose leaf is not this key's is refused.
    let e = admin
        .set_key_certificate(v1::SetKeyCertificateRequest {
            environment: "production".into(),
            alias: "apple".into(),
            chain_pem: std::fs::read(p("ca.pem")).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    admin
        .set_key_certificate(v1::SetKeyCertificateRequest {
            environment: "production".into(),
            alias: "apple".into(),
            chain_pem: chain,
        })
        .await
        .unwrap();
    let id = site
        .verification()
        .await
        .get_signing_identity(v1::GetVerificationMaterialRequest {
            environment: "production".into(),
            key_alias: "apple".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.certificate_chain.len(), 2);
    assert_eq!(
        (id.key_id.as_str(), id.algorithm.as_str()),
        ("apple@v1", "rsa-2048-pkcs1-sha256")
    );

    // Sign responses carry the chain; the signature verifies under the certificate's key.
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let data = b"CodeDirectory".to_vec();
    let r = signer
        .sign(v1::SignRequest {
            key_alias: "apple".into(),
            input: Some(Input::Sha256Digest(sha256(&data).to_vec())),
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.certificate_chain, id.certificate_chain);
    std::fs::write(p("cd.bin"), &data).unwrap();
    std::fs::write(p("cd.bin.sig"), &r.signature).unwrap();
    let (ok, pubkey) = openssl(&["x509", "-in", &p("leaf.pem"), "-pubkey", "-noout"]);
    assert!(ok);
    std::fs::write(p("leaf.pub"), pubkey).unwrap();
    let (ok, out) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &p("leaf.pub"),
        "-signature",
        &p("cd.bin.sig"),
        &p("cd.bin"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(&["verify", "-CAfile", &p("ca.pem"), &p("leaf.pem")]);
    assert!(ok, "{out}");
}

const MESSAGE_KEYS: &str = r#"
[[environments.signing_keys]]
alias = "ed"
algorithm = "ed25519"
access = { repositories = ["*"], refs = ["*"] }

[[environments.signing_keys]]
alias = "p384"
algorithm = "ecdsa-p384-sha384"
access = { repositories = ["*"], refs = ["*"] }
"#;

/// Ed25519 (pure EdDSA over the message) and ECDSA P-384 (over SHA-384 of the message) sign
/// messages only; openssl and the client's offline verifier check them; a digest is refused.
#[tokio::test]
async fn ed25519_and_p384_sign_messages_and_openssl_verifies() {
    let site = TestSite::start_with(MESSAGE_KEYS, None).await;
    let (_k, _r, mut signer) = site.enrolled("production").await;
    let dir = site.dir.path();
    let message = b"release 1.4.2 of acme/app, built from 9f2c4e".to_vec();
    let file = dir.join("message");
    std::fs::write(&file, &message).unwrap();
    for (alias, alg) in [("ed", "ed25519"), ("p384", "ecdsa-p384-sha384")] {
        let r = signer
            .sign(v1::SignRequest {
                key_alias: alias.into(),
                input: Some(Input::Message(message.clone())),
                artifact_name: "message".into(),
                algorithm: alg.into(),
                signed_entry_timestamp: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.algorithm, alg);
        if alg == "ed25519" {
            assert_eq!(r.signature.len(), 64);
        }
        meshsign_tests::openssl_verifies_message(dir, &r, &file);
        meshsign_evidence::verify::verify_message(alg, &r.public_key_der, &message, &r.signature)
            .unwrap();
        assert!(
            meshsign_evidence::verify::verify_message(
                alg,
                &r.public_key_der,
                b"another message",
                &r.signature
            )
            .is_err()
        );
        // The audit names the message's SHA-256, as for every message signature.
        assert_eq!(site.last_audit().digest, hex::encode(sha256(&message)));
        // A digest is not what these keys sign.
        let e = signer
            .sign(v1::SignRequest {
                key_alias: alias.into(),
                input: Some(Input::Sha256Digest(sha256(&message).to_vec())),
                artifact_name: String::new(),
                algorithm: String::new(),
                signed_entry_timestamp: false,
            })
            .await
            .unwrap_err();
        assert!(e.message().starts_with("purpose: "), "{e:?}");
    }
    // A message-only key with a digest purpose is refused by field.
    let dir2 = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir2.path());
    let path = dir2.path().join("site.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(
        "\n[[environments.signing_keys]]\nalias = \"ed\"\nalgorithm = \"ed25519\"\npurposes = [\"digest\"]\naccess = { repositories = [\"*\"], refs = [\"*\"] }\n",
    );
    std::fs::write(&path, text).unwrap();
    let e = meshsign_server::config::SiteConfig::load(&path).unwrap_err();
    assert!(
        e.to_string().contains("purposes") && e.to_string().contains("messages only"),
        "{e}"
    );
}
