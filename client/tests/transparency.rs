//! Signatures anyone can verify (issue 17), through the real `meshsign` and `meshsignd dev`
//! binaries, checked by verifiers nobody here wrote: the Sigstore bundle against the published
//! protobuf types (`sigstore-protobuf-specs`), its signature with openssl, the DSSE envelope
//! with `securesystemslib`, and the receipt (C2SP checkpoint + RFC 9162 inclusion proof) with a
//! few lines of Python over `cryptography` and `hashlib`. `.ci/run` installs the packages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use common::{DevSite, meshsign_in, openssl, start_dev};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Dev {
    site: Option<DevSite>,
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

impl Dev {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let site = start_dev(&dir.path().join("site"));
        let cfg = dir.path().join("site/client.toml");
        Self {
            site: Some(site),
            dir,
            cfg,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        meshsign_in(self.dir.path(), &self.cfg, args)
    }

    /// Runs and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshsign {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A token of GitHub job `job` for staging, in a file.
    fn token(&self, job: &str) -> String {
        self.token_of_run(job, "13456789012")
    }

    /// A token of GitHub job `job` (its check run) of workflow run `run` for staging, in a file.
    fn token_of_run(&self, job: &str, run: &str) -> String {
        let t = self.ok(&[
            "dev",
            "token",
            "--environment",
            "staging",
            "--job-id",
            job,
            "--pipeline-id",
            run,
        ]);
        let p = self.path(&format!(
            "token-{job}-{}",
            meshsign_certs_dev::random_id().unwrap()
        ));
        std::fs::write(&p, t.trim()).unwrap();
        p.display().to_string()
    }

    /// Writes `content` to `name` and returns its path.
    fn file(&self, name: &str, content: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }

    /// Public material into files: audit.pem, release.pem, attest.pem, and the current
    /// distrust list of staging as `list_name`.
    fn material(&self, list_name: &str) -> String {
        let audit = self.ok(&[
            "verification-material",
            "--environment",
            "staging",
            "--audit-key",
        ]);
        std::fs::write(self.path("audit.pem"), audit).unwrap();
        for key in ["release", "attest"] {
            let pem: String = self
                .ok(&[
                    "verification-material",
                    "--environment",
                    "staging",
                    "--key",
                    key,
                ])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(self.path(&format!("{key}.pem")), pem).unwrap();
            // The same with each version's purposes, which a statement's check needs.
            let json = self.ok(&[
                "verification-material",
                "--environment",
                "staging",
                "--key",
                key,
                "--output",
                "json",
            ]);
            std::fs::write(self.path(&format!("{key}.json")), json).unwrap();
        }
        let list = self.ok(&[
            "verification-material",
            "--environment",
            "staging",
            "--distrust-list",
        ]);
        std::fs::write(self.path(list_name), list).unwrap();
        self.path(list_name).display().to_string()
    }
}

/// Signs `file` as job `job` in `format` (native, sigstore, dsse) with the right key.
fn sign_as(dev: &Dev, job: &str, format: &str, file: &str) {
    let key = if format == "dsse" {
        "attest"
    } else {
        "release"
    };
    let tok = dev.token(job);
    dev.ok(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        key,
        "--token-file",
        &tok,
        "--format",
        format,
        file,
    ]);
}

/// `meshsign verify` with the key the format needs and `extra`.
fn verify(dev: &Dev, format: &str, file: &str, extra: &[&str]) -> Output {
    let key = if format == "dsse" {
        "attest"
    } else {
        "release"
    };
    // A statement needs the key with its purpose (the material JSON); signatures take PEM.
    let ext = if format == "dsse" { "json" } else { "pem" };
    let pem = dev.path(&format!("{key}.{ext}")).display().to_string();
    let mut args = vec!["verify", file, "--public-key", pem.as_str()];
    args.extend_from_slice(extra);
    dev.run(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `o` failed verification (exit 1) saying `why`.
fn refused(o: &Output, why: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    assert!(stderr(o).contains(why), "{}", stderr(o));
}

fn python(script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap()
}

const FORMATS: [&str; 3] = ["native", "sigstore", "dsse"];

fn bundle_of(file: &str, format: &str) -> String {
    let ext = match format {
        "native" => ".sig.json",
        "sigstore" => ".sigstore.json",
        _ => ".intoto.json",
    };
    format!("{file}{ext}")
}

#[test]
fn a_distrusted_jobs_signatures_fail_in_every_format_while_another_jobs_pass() {
    let dev = Dev::start();
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for format in FORMATS {
        let b = dev.file(
            &format!("bad-{format}.bin"),
            &format!("release of 7001 {format}"),
        );
        sign_as(&dev, "7001", format, &b);
        bad.push((format, b));
        let g = dev.file(
            &format!("good-{format}.bin"),
            &format!("release of 7002 {format}"),
        );
        sign_as(&dev, "7002", format, &g);
        good.push((format, g));
    }
    let list0 = dev.material("list0.json");
    let audit = dev.path("audit.pem").display().to_string();
    // Before anything is distrusted, everything passes the (version 0) list.
    for (format, f) in bad.iter().chain(&good) {
        let o = verify(
            &dev,
            format,
            f,
            &["--distrust-list", &list0, "--audit-key", &audit],
        );
        assert!(o.status.success(), "{format}: {}", stderr(&o));
    }

    // Job 7001 turns out to have been compromised: distrust reaches back to what it signed.
    dev.ok(&[
        "admin",
        "distrust",
        "add",
        "--environment",
        "staging",
        "--job-id",
        "7001",
        "--reason",
        "runner compromised",
    ]);
    let list1 = dev.material("list1.json");
    // The older, empty list no longer passes where version 1 is required.
    let (_, b0) = &bad[0];
    let o = verify(
        &dev,
        "native",
        b0,
        &[
            "--distrust-list",
            &list0,
            "--audit-key",
            &dev.path("audit.pem").display().to_string(),
            "--min-list-version",
            "1",
        ],
    );
    refused(&o, "older than the version 1 required");
    for (format, f) in &bad {
        let o = verify(
            &dev,
            format,
            f,
            &["--distrust-list", &list1, "--audit-key", &audit],
        );
        assert_eq!(o.status.code(), Some(1), "{format}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("distrusted: rule d-") && stderr(&o).contains("job 7001"),
            "{format}: {}",
            stderr(&o)
        );
        // Without the list it still verifies: the signature itself is sound.
        assert!(verify(&dev, format, f, &[]).status.success());
    }
    for (format, f) in &good {
        let o = verify(
            &dev,
            format,
            f,
            &["--distrust-list", &list1, "--audit-key", &audit],
        );
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("not distrusted (distrust list version 1)"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }

    // By runner fingerprint: a job on another machine passes, the machine's signatures fail.
    let fp = "ee".repeat(32);
    let m = dev.file("machine.bin", "made on a machine later found compromised");
    let tok = dev.token("7003");
    dev.ok(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "--token-file",
        &tok,
        "--fingerprint",
        &fp,
        "--format",
        "sigstore",
        &m,
    ]);
    dev.ok(&[
        "admin",
        "distrust",
        "add",
        "--environment",
        "staging",
        "--fingerprint",
        &fp,
        "--reason",
        "stolen laptop",
    ]);
    let list2 = dev.material("list2.json");
    let o = verify(
        &dev,
        "sigstore",
        &m,
        &["--distrust-list", &list2, "--audit-key", &audit],
    );
    refused(&o, "runner eeee");

    // By pipeline (issue 25 row 2): every job of workflow run 99001, and no job of another run.
    let p = dev.file(
        "pipeline.bin",
        "made by a job of a run later found compromised",
    );
    let tok = dev.token_of_run("7004", "99001");
    dev.ok(&[
        "sign",
        "--environment",
        "staging",
        "--key",
        "release",
        "--token-file",
        &tok,
        "--format",
        "sigstore",
        &p,
    ]);
    dev.ok(&[
        "admin",
        "distrust",
        "add",
        "--environment",
        "staging",
        "--pipeline-id",
        "99001",
        "--reason",
        "poisoned cache in that run",
    ]);
    let list3 = dev.material("list3.json");
    let o = verify(
        &dev,
        "sigstore",
        &p,
        &["--distrust-list", &list3, "--audit-key", &audit],
    );
    refused(&o, "pipeline 99001");
    let (_, g) = &good[1];
    assert!(
        verify(
            &dev,
            "sigstore",
            g,
            &["--distrust-list", &list3, "--audit-key", &audit]
        )
        .status
        .success()
    );
    let (_, g) = &good[1];
    assert!(
        verify(
            &dev,
            "sigstore",
            g,
            &["--distrust-list", &list2, "--audit-key", &audit]
        )
        .status
        .success()
    );

    // A list that is not the site's, or not this environment's, decides nothing: refused.
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&list1).unwrap()).unwrap();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&B64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    payload["entries"] = serde_json::json!([]);
    env["payload"] = B64.encode(serde_json::to_vec(&payload).unwrap()).into();
    let forged = dev.file("forged.json", &env.to_string());
    let (_, b) = &bad[0];
    let o = verify(
        &dev,
        "native",
        b,
        &["--distrust-list", &forged, "--audit-key", &audit],
    );
    refused(&o, "not signed by the audit key");
    let prod = dev.ok(&[
        "verification-material",
        "--environment",
        "production",
        "--distrust-list",
    ]);
    let prod = dev.file("prod-list.json", &prod);
    let o = verify(
        &dev,
        "native",
        b,
        &["--distrust-list", &prod, "--audit-key", &audit],
    );
    refused(&o, "is for environment `production`");
}

/// Rewrites a JSON file with `f`.
fn edit(path: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    let out = format!("{path}.edited.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    out
}

/// An audit entry (base64 of its JSON) with the job changed — and its own hash recomputed, as
/// a forger would.
fn forge_entry(b64: &str) -> String {
    let mut rec: meshsign_evidence::audit::AuditRecord =
        serde_json::from_slice(&B64.decode(b64).unwrap()).unwrap();
    rec.job_id = "7002".into();
    rec.hash = rec.compute_hash();
    B64.encode(serde_json::to_vec(&rec).unwrap())
}

/// A native bundle with its receipt's entry forged ([`forge_entry`]).
fn forge_native_entry(v: &mut serde_json::Value) {
    let e = forge_entry(v["receipt"]["entry"].as_str().unwrap());
    v["receipt"]["entry"] = e.into();
}

/// A Sigstore bundle whose log entry is `other`'s (another signature's entry, SET and all).
fn swap_sigstore_entry(other: &str) -> impl FnOnce(&mut serde_json::Value) {
    let other: serde_json::Value = serde_json::from_slice(&std::fs::read(other).unwrap()).unwrap();
    move |v| {
        v["verificationMaterial"]["tlogEntries"] =
            other["verificationMaterial"]["tlogEntries"].clone()
    }
}

/// Flips one bit of a Sigstore bundle's log-entry body.
fn flip_sigstore_body(v: &mut serde_json::Value) {
    let body = &mut v["verificationMaterial"]["tlogEntries"][0]["canonicalizedBody"];
    let mut bytes = B64.decode(body.as_str().unwrap()).unwrap();
    bytes[60] ^= 1;
    *body = B64.encode(bytes).into();
}

#[test]
fn stripping_or_editing_the_job_binding_fails_verification() {
    let dev = Dev::start();
    let mut signed = Vec::new();
    for format in FORMATS {
        let f = dev.file(&format!("a-{format}.bin"), &format!("artifact {format}"));
        sign_as(&dev, "7001", format, &f);
        signed.push((format, f));
    }
    dev.ok(&[
        "admin",
        "distrust",
        "add",
        "--environment",
        "staging",
        "--job-id",
        "7001",
        "--reason",
        "compromised",
    ]);
    let list = dev.material("list.json");
    let audit = dev.path("audit.pem").display().to_string();
    let check = |format: &str, file: &str, bundle: &str, why: &str| {
        let o = verify(
            &dev,
            format,
            file,
            &[
                "--bundle",
                bundle,
                "--distrust-list",
                &list,
                "--audit-key",
                &audit,
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{format} {why}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("distrusted: rule"),
            "{format} {why}: refused for the edit, before the list: {}",
            stderr(&o)
        );
        stderr(&o)
    };
    let (_, native) = &signed[0];
    let b = bundle_of(native, "native");
    let stripped = edit(&b, |v| {
        v.as_object_mut().unwrap().remove("receipt");
    });
    assert!(check("native", native, &stripped, "stripped").contains("not bound to a job"));
    let forged = edit(&b, forge_native_entry);
    assert!(check("native", native, &forged, "job edited").contains("another root"));
    // Issue 27's forgery: the distrusted job's signature with the receipt (and key id) of
    // another job's signature over the same bytes. The receipt names that other signature.
    let twin = dev.file("twin-native.bin", "artifact native");
    sign_as(&dev, "7002", "native", &twin);
    let other: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle_of(&twin, "native")).unwrap()).unwrap();
    let swapped = edit(&b, |v| {
        v["receipt"] = other["receipt"].clone();
        v["key_id"] = other["key_id"].clone();
        v["audit_seq"] = other["audit_seq"].clone();
        v["audit_hash"] = other["audit_hash"].clone();
    });
    let why = check("native", native, &swapped, "receipt swapped");
    assert!(why.contains("another signature or key"), "{why}");

    let (_, sig) = &signed[1];
    let b = bundle_of(sig, "sigstore");
    let stripped = edit(&b, |v| {
        v["verificationMaterial"]
            .as_object_mut()
            .unwrap()
            .remove("tlogEntries");
    });
    assert!(check("sigstore", sig, &stripped, "stripped").contains("not bound to a job"));
    // The entry of another job's signature over the same bytes (SET and all) does not bind.
    let same = dev.file("same-bytes.bin", "artifact sigstore");
    sign_as(&dev, "7002", "sigstore", &same);
    let forged = edit(&b, swap_sigstore_entry(&bundle_of(&same, "sigstore")));
    assert!(check("sigstore", sig, &forged, "entry swapped").contains("another signature"));
    let forged = edit(&b, flip_sigstore_body);
    check("sigstore", sig, &forged, "body edited");

    let (_, d) = &signed[2];
    let b = bundle_of(d, "dsse");
    let forged = edit(&b, |v| {
        let p = String::from_utf8(B64.decode(v["payload"].as_str().unwrap()).unwrap()).unwrap();
        v["payload"] = B64
            .encode(p.replace("\"jobId\":\"7001\"", "\"jobId\":\"7002\""))
            .into();
    });
    assert!(check("dsse", d, &forged, "job edited").contains("not signed by the pinned key"));
    let stripped = edit(&b, |v| v["signatures"] = serde_json::json!([]));
    check("dsse", d, &stripped, "unsigned");
}

#[test]
fn a_statement_under_a_digest_key_is_not_the_sites() {
    let dev = Dev::start();
    let f = dev.file("app.bin", "an artifact");
    // A runner writes its own statement and has the digest key sign SHA-256 of its PAE: an
    // ECDSA P-256 signature over the PAE, i.e. a valid DSSE signature under `release`.
    let digest = hex::encode(meshsign_evidence::verify::sha256_file(Path::new(&f)).unwrap());
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "app.bin", "digest": {"sha256": digest}}],
        "predicateType": "https://meshsign.dev/attestation/signing/v1",
        "predicate": {"meshsign": {"jobId": "made-up"}},
    })
    .to_string();
    let pae = meshsign_evidence::attest::pae("application/vnd.in-toto+json", statement.as_bytes());
    let pae_file = dev.path("statement.pae");
    std::fs::write(&pae_file, &pae).unwrap();
    sign_as(&dev, "7001", "native", pae_file.to_str().unwrap());
    dev.material("list.json");
    let sig = std::fs::read(dev.path("statement.pae.sig")).unwrap();
    let envelope = serde_json::json!({
        "payload": B64.encode(statement.as_bytes()),
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [{"keyid": "", "sig": B64.encode(sig)}],
    });
    let env = dev.file("app.bin.intoto.json", &envelope.to_string());
    // Pinned with its purposes: refused, naming what the key signs.
    let release = dev.path("release.json").display().to_string();
    let o = dev.run(&["verify", &f, "--bundle", &env, "--public-key", &release]);
    refused(&o, "signs digest, message, not statements");
    // Pinned by PEM alone, nothing says the key is an attestation key: refused too.
    let pem = dev.path("release.pem").display().to_string();
    let o = dev.run(&["verify", &f, "--bundle", &env, "--public-key", &pem]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("attestation key"), "{}", stderr(&o));
    // The site's own statement under the attestation key passes, naming the version used.
    let g = dev.file("good.bin", "another artifact");
    sign_as(&dev, "7001", "dsse", &g);
    let o = verify(&dev, "dsse", &g, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("verified under the pinned attest@v1"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

const SCHEMA_CHECK: &str = r#"
import json, sys
from sigstore_protobuf_specs.dev.sigstore.bundle.v1 import Bundle
text = open(sys.argv[1]).read()
original = json.loads(text)
bundle = Bundle.from_dict(original)
assert bundle.media_type == "application/vnd.dev.sigstore.bundle.v0.3+json", bundle.media_type
# Every field we wrote is one of the schema's, with its type: parsing drops unknown fields and
# re-encoding writes the canonical proto3 JSON, so the round trip is exact only then.
again = bundle.to_dict()
assert again == original, json.dumps(again, indent=1)
entry = bundle.verification_material.tlog_entries[0]
assert entry.inclusion_proof.tree_size >= entry.log_index + 1
open(sys.argv[2], "wb").write(bundle.message_signature.signature)
print("schema ok", bundle.verification_material.public_key.hint)
"#;

#[test]
fn a_sigstore_bundle_matches_the_published_schema_and_openssl_verifies_its_signature() {
    let dev = Dev::start();
    let f = dev.file(
        "app.tar.gz",
        "an artifact to hand to people who never run meshsign",
    );
    // Not the log's first entry: proto3 JSON leaves index 0 and an empty proof out, which
    // the round trip below would count as a difference.
    let first = dev.file("first.bin", "the log's first entry");
    sign_as(&dev, "7000", "sigstore", &first);
    sign_as(&dev, "7001", "sigstore", &f);
    // Written with the log's signed entry timestamp (v0.1); the proof makes it v0.3.
    dev.ok(&["receipt", "fetch", &f]);
    dev.material("list.json");
    let bundle = bundle_of(&f, "sigstore");
    let sig = dev.path("sig.der").display().to_string();
    let o = python(SCHEMA_CHECK, &[&bundle, &sig]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/staging/release@v1"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let out = openssl(
        dev.dir.path(),
        &[
            "dgst",
            "-sha256",
            "-verify",
            "release.pem",
            "-signature",
            "sig.der",
            "app.tar.gz",
        ],
    );
    assert!(out.contains("Verified OK"), "{out}");
    // A bundle with a field the schema does not have fails the same check.
    let extra = edit(&bundle, |v| {
        v["messageSignature"]["algorithm"] = "ES256".into()
    });
    assert!(!python(SCHEMA_CHECK, &[&extra, &sig]).status.success());

    // meshsign verifies it too — with the pinned key only, and not a changed file.
    let o = verify(
        &dev,
        "sigstore",
        &f,
        &["--receipt", "--audit-key", "audit.pem"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Issue 25 row 9: without --receipt the report names the entry the bundle's log entry
    // names (here the same as the checked one), never "entry 0" of nothing.
    let checked = String::from_utf8_lossy(&o.stdout).to_string();
    let plain = verify(&dev, "sigstore", &f, &[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let plain = String::from_utf8_lossy(&plain.stdout).to_string();
    let entry_of = |out: &str| {
        let at = out
            .find("transparency-log entry ")
            .expect("a transparency-log entry")
            + "transparency-log entry ".len();
        out[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(entry_of(&plain), entry_of(&checked), "{plain} / {checked}");
    let wrong = dev.run(&[
        "verify",
        &f,
        "--public-key",
        dev.path("attest.pem").to_str().unwrap(),
    ]);
    assert_eq!(wrong.status.code(), Some(1), "{}", stderr(&wrong));
    let unpinned = dev.run(&["verify", &f]);
    assert_eq!(unpinned.status.code(), Some(2), "{}", stderr(&unpinned));
    std::fs::write(&f, "changed").unwrap();
    assert_eq!(verify(&dev, "sigstore", &f, &[]).status.code(), Some(1));
}

const DSSE_CHECK: &str = r#"
import json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
from securesystemslib.exceptions import VerificationError
from cryptography.hazmat.primitives.serialization import load_pem_public_key
envelope = Envelope.from_dict(json.load(open(sys.argv[1])))
# The keyid is securesystemslib's own for the key (not one read from the envelope): the
# envelope's signature must carry it.
key = SSlibKey.from_crypto(
    load_pem_public_key(open(sys.argv[2], "rb").read()),
    scheme="ecdsa-sha2-nistp256",
)
assert key.keyid in envelope.signatures, (key.keyid, list(envelope.signatures))
envelope.verify([key], 1)
statement = json.loads(envelope.payload)
assert statement["_type"] == "https://in-toto.io/Statement/v1"
assert envelope.payload_type == "application/vnd.in-toto+json"
assert statement["predicateType"] == "https://slsa.dev/provenance/v1", statement["predicateType"]
facts = statement["predicate"]["buildDefinition"]["internalParameters"]["meshsign"]
print(statement["subject"][0]["digest"]["sha256"], facts["jobId"], facts["auditSeq"])
# The same envelope with one byte of the statement changed does not verify.
envelope.payload = envelope.payload.replace(b'"jobId":"7001"', b'"jobId":"7002"')
try:
    envelope.verify([key], 1)
    sys.exit("an altered statement verified")
except VerificationError:
    pass
"#;

#[test]
fn a_dsse_statement_verifies_with_securesystemslib() {
    let dev = Dev::start();
    let f = dev.file("app.tar.gz", "an artifact with provenance");
    let tok = dev.token("7001");
    let out = dev.ok(&[
        "attest",
        "--environment",
        "staging",
        "--key",
        "attest",
        "--token-file",
        &tok,
        "--predicate-type",
        "slsa",
        &f,
    ]);
    assert!(out.contains("https://slsa.dev/provenance/v1"), "{out}");
    dev.material("list.json");
    let o = python(
        DSSE_CHECK,
        &[
            &bundle_of(&f, "dsse"),
            dev.path("attest.pem").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = String::from_utf8_lossy(&o.stdout).into_owned();
    let digest = hex::encode(meshsign_evidence::verify::sha256_file(Path::new(&f)).unwrap());
    assert!(printed.starts_with(&format!("{digest} 7001 ")), "{printed}");
    let o = verify(&dev, "dsse", &f, &["--output", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["binding"]["job_id"], "7001");
    assert_eq!(v["format"], "dsse");
}

const RECEIPT_CHECK: &str = r#"
import base64, hashlib, json, sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
bundle = json.load(open(sys.argv[1]))
key = load_pem_public_key(open(sys.argv[2], "rb").read())
entry = bundle["verificationMaterial"]["tlogEntries"][0]
proof = entry["inclusionProof"]
note = proof["checkpoint"]["envelope"]
# C2SP signed note: text, blank line, "— <name> base64(key id || signature)" lines.
text, signatures = note.rsplit("\n\n", 1)
text += "\n"
origin, size, root = text.splitlines()
key_id = hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()[:4]
verified = False
for line in signatures.splitlines():
    name, sig = line.removeprefix("\u2014 ").split(" ")
    raw = base64.b64decode(sig)
    if name == origin and raw[:4] == key_id:
        key.verify(raw[4:], text.encode(), ec.ECDSA(hashes.SHA256()))
        verified = True
assert verified, "no signature by the audit key"
assert int(size) == int(proof["treeSize"])
# RFC 9162 2.1.3.2: from the leaf hash of the entry to the checkpoint's root.
fn, sn = int(proof["logIndex"]), int(proof["treeSize"]) - 1
body = base64.b64decode(entry["canonicalizedBody"])
r = hashlib.sha256(b"\x00" + body).digest()
for h in map(base64.b64decode, proof["hashes"]):
    assert sn != 0
    if fn & 1 or fn == sn:
        r = hashlib.sha256(b"\x01" + h + r).digest()
        while fn & 1 == 0 and fn != 0:
            fn >>= 1
            sn >>= 1
    else:
        r = hashlib.sha256(b"\x01" + r + h).digest()
    fn >>= 1
    sn >>= 1
assert sn == 0 and r == base64.b64decode(root), "the proof does not lead to the root"
record = json.loads(body)
print(record["kind"], record["spec"]["data"]["hash"]["value"])
"#;

#[test]
fn a_receipt_verifies_with_only_the_bundle_and_a_checkpoint() {
    let mut dev = Dev::start();
    let f = dev.file("app.tar.gz", "signed once");
    sign_as(&dev, "7001", "native", &f);
    let s = dev.file("app2.tar.gz", "signed twice");
    sign_as(&dev, "7001", "sigstore", &s);
    dev.ok(&["receipt", "fetch", &s]);
    let later = dev.file("later.bin", "signed later");
    sign_as(&dev, "7002", "native", &later);
    dev.material("list.json");

    // An independent verifier (Python, cryptography + hashlib) accepts the Sigstore bundle's
    // log entry and refuses it with the entry altered.
    let audit = dev.path("audit.pem").display().to_string();
    let sb = bundle_of(&s, "sigstore");
    let o = python(RECEIPT_CHECK, &[&sb, &audit]);
    assert!(o.status.success(), "{}", stderr(&o));
    let digest = hex::encode(meshsign_evidence::verify::sha256_file(Path::new(&s)).unwrap());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("hashedrekord {digest}")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let altered = edit(&sb, flip_sigstore_body);
    assert!(!python(RECEIPT_CHECK, &[&altered, &audit]).status.success());

    // The site goes away: the bundle, the audit key and a checkpoint are all it takes.
    drop(dev.site.take());
    let offline = tempfile::tempdir().unwrap();
    let copy = |from: &str, to: &str| {
        let to = offline.path().join(to);
        std::fs::copy(from, &to).unwrap();
        to.display().to_string()
    };
    let file = copy(&f, "app.tar.gz");
    copy(&bundle_of(&f, "native"), "app.tar.gz.sig.json");
    let key = copy(&audit, "audit.pem");
    let bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle_of(&f, "native")).unwrap()).unwrap();
    let note = offline.path().join("checkpoint.note");
    std::fs::write(&note, bundle["receipt"]["checkpoint"].as_str().unwrap()).unwrap();
    let note = note.display().to_string();
    let run = |args: &[&str]| {
        Command::new(common::meshsign())
            .env_remove("MESHSIGN_CONFIG")
            .args(args)
            .current_dir(offline.path())
            .output()
            .unwrap()
    };
    let o = run(&[
        "verify",
        &file,
        "--receipt",
        "--audit-key",
        &key,
        "--checkpoint",
        &note,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("receipt OK"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Another checkpoint: one of a bigger tree (the proof is not for it) or a forged one.
    let later_bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle_of(&later, "native")).unwrap()).unwrap();
    let bigger = offline.path().join("bigger.note");
    std::fs::write(
        &bigger,
        later_bundle["receipt"]["checkpoint"].as_str().unwrap(),
    )
    .unwrap();
    let o = run(&[
        "verify",
        &file,
        "--receipt",
        "--audit-key",
        &key,
        "--checkpoint",
        bigger.to_str().unwrap(),
    ]);
    refused(&o, "fetch a proof for this checkpoint");
    let forged = offline.path().join("forged.note");
    let text = std::fs::read_to_string(&note).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[2] = B64.encode([7u8; 32]);
    std::fs::write(&forged, lines.join("\n") + "\n").unwrap();
    let o = run(&[
        "verify",
        &file,
        "--receipt",
        "--audit-key",
        &key,
        "--checkpoint",
        forged.to_str().unwrap(),
    ]);
    refused(&o, "does not verify");
    // An altered entry does not prove against the genuine checkpoint.
    let altered = edit(
        &offline
            .path()
            .join("app.tar.gz.sig.json")
            .display()
            .to_string(),
        forge_native_entry,
    );
    let o = run(&[
        "verify",
        &file,
        "--bundle",
        &altered,
        "--receipt",
        "--audit-key",
        &key,
        "--checkpoint",
        &note,
    ]);
    refused(&o, "another root");
}
