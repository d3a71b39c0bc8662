//! Signatures anyone can verify (issue 17), at the RPC level against real sites: receipts as
//! Merkle inclusion proofs to checkpoints signed as C2SP notes; in-toto statements the site
//! builds from what it verified; signed, versioned distrust lists. The CLI side (formats,
//! `meshsign verify`, Python and openssl verifiers) is in `client/tests/transparency.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use base64::Engine as _;
use meshsign_certs_dev::{BuildkiteJob, random_id};
use meshsign_client::session::RunnerKey;
use meshsign_evidence::attest::{Envelope, PREDICATE_SIGNING, PREDICATE_SLSA, SiteFacts};
use meshsign_evidence::receipt::Receipt;
use meshsign_proto::v1;
use meshsign_tests::{REGION, TestSite, audit_key, sign_req};
use tonic::Code;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A raw `GetInclusionProof` by seq and leaf hash.
async fn proof(
    site: &TestSite,
    seq: u64,
    leaf: &[u8],
) -> Result<v1::InclusionProof, tonic::Status> {
    Ok(site
        .verification()
        .await
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq,
            leaf_hash: leaf.to_vec(),
        })
        .await?
        .into_inner())
}

/// The receipt of entry `seq`, whose stored bytes `entry` the Sign response returned.
async fn receipt(site: &TestSite, seq: u64, entry: &[u8]) -> Result<Receipt, tonic::Status> {
    let p = proof(site, seq, &meshsign_evidence::merkle::leaf_hash(entry)).await?;
    Ok(Receipt {
        log_index: p.log_index,
        tree_size: p.tree_size,
        hashes: p.hashes.iter().map(hex::encode).collect(),
        checkpoint: p.checkpoint,
        entry: B64.encode(entry),
    })
}

/// The entry of a receipt with `f` applied to its JSON (same bytes otherwise).
fn altered(r: &Receipt, f: impl FnOnce(&mut serde_json::Value)) -> Receipt {
    let mut v: serde_json::Value = serde_json::from_slice(&r.entry_bytes().unwrap()).unwrap();
    f(&mut v);
    let mut out = r.clone();
    out.entry = B64.encode(serde_json::to_vec(&v).unwrap());
    out
}

#[tokio::test]
async fn every_receipt_proves_against_a_signed_checkpoint_and_an_altered_entry_does_not() {
    let site = TestSite::start().await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut signed = Vec::new();
    for i in 0..20u8 {
        signed.push(s.sign(sign_req("release", i)).await.unwrap().into_inner());
    }
    for r in &signed {
        let rc = receipt(&site, r.audit_seq, &r.audit_entry).await.unwrap();
        let entry = rc.verify(&key, None).unwrap();
        assert_eq!(
            (entry.seq, entry.hash.as_str()),
            (r.audit_seq, r.audit_hash.as_str())
        );
        assert_eq!(entry.digest, hex::encode(&r.sha256_digest));
        assert!(rc.tree_size >= r.audit_seq);
        // The checkpoint is a C2SP note of this site's log, and the chain holds it too.
        assert!(
            rc.checkpoint
                .starts_with(&format!("meshsign.test/{REGION}/audit\n{}\n", rc.tree_size)),
            "{}",
            rc.checkpoint
        );
        assert!(site.audit().iter().any(|e| {
            e.checkpoint.as_ref().and_then(|c| c.note.as_deref()) == Some(rc.checkpoint.as_str())
        }));
    }
    // One proof, altered three ways: another job in the entry, another seq, a changed hash.
    let r = &signed[7];
    let rc = receipt(&site, r.audit_seq, &r.audit_entry).await.unwrap();
    let job = altered(&rc, |v| v["job_id"] = "9999".into());
    assert!(
        job.verify(&key, None).is_err(),
        "an edited entry must not verify"
    );
    let mut moved = rc.clone();
    moved.log_index += 1;
    assert!(moved.verify(&key, None).is_err());
    let mut bent = rc.clone();
    bent.hashes[0] = "00".repeat(32);
    let e = bent.verify(&key, None).unwrap_err().to_string();
    assert!(e.contains("another root"), "{e}");
    // Another site's audit key does not open the checkpoint.
    let other = TestSite::start().await;
    assert!(rc.verify(&audit_key(&other).await, None).is_err());

    // Whoever does not hold the entry gets nothing — not even whether the seq exists: not by
    // its chain hash (which the next entry's `prev_hash` discloses), not by a wrong leaf.
    let leaf = meshsign_evidence::merkle::leaf_hash(&r.audit_entry);
    for (seq, leaf) in [
        (r.audit_seq, vec![0u8; 32]),
        (r.audit_seq, Vec::new()),
        (r.audit_seq, hex::decode(&r.audit_hash).unwrap()),
        (r.audit_seq, leaf[..31].to_vec()),
        (0, leaf.to_vec()),
        (u64::MAX, leaf.to_vec()),
    ] {
        let e = proof(&site, seq, &leaf).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().starts_with("audit_entry: "), "{}", e.message());
    }
}

/// Issue 24 row 1: one receipt used to unlock the whole log (the proof reply carried the entry,
/// whose `prev_hash` named the entry before it). Now a caller holding its own entry and every
/// proof it can get learns nothing of another job's entries: the walk by `prev_hash` finds
/// nothing, and a walk by the leaf hashes the proofs carry gets hashes only.
#[tokio::test]
async fn a_receipt_opens_no_other_entry_of_the_log() {
    let site = TestSite::start().await;
    // The victim: another job, whose ids must not leak.
    let (_kv, _rv, mut victim) = site.enrolled("staging").await;
    let mut theirs = Vec::new();
    for i in 0..6u8 {
        theirs.push(
            victim
                .sign(sign_req("release", i))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let secrets: Vec<String> = site
        .audit()
        .iter()
        .filter(|e| e.seq <= theirs.last().unwrap().audit_seq && !e.jti.is_empty())
        .flat_map(|e| [e.jti.clone(), e.job_id.clone(), e.cert_serial.clone()])
        .filter(|s| s.len() > 6)
        .collect();
    assert!(!secrets.is_empty());
    let (_ka, _ra, mut attacker) = site.enrolled("staging").await;
    let mine = attacker
        .sign(sign_req("release", 99))
        .await
        .unwrap()
        .into_inner();
    let own: meshsign_evidence::audit::AuditRecord =
        serde_json::from_slice(&mine.audit_entry).unwrap();
    assert_eq!(
        (own.seq, own.hash.as_str()),
        (mine.audit_seq, mine.audit_hash.as_str())
    );

    // By the chain: the previous entry's hash opens nothing.
    let prev = hex::decode(&own.prev_hash).unwrap();
    let e = proof(&site, own.seq - 1, &prev).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // By every hash any proof gives, at every seq below: replies carry hashes and notes only.
    let own_proof = receipt(&site, mine.audit_seq, &mine.audit_entry)
        .await
        .unwrap();
    let mut known: Vec<Vec<u8>> = own_proof
        .hashes
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect();
    let mut answered = 0;
    let mut i = 0;
    while i < known.len() && i < 200 {
        let h = known[i].clone();
        i += 1;
        for seq in 1..own.seq {
            let Ok(p) = proof(&site, seq, &h).await else {
                continue;
            };
            answered += 1;
            let bytes = prost::Message::encode_to_vec(&p);
            for s in &secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "a proof reply disclosed {s}"
                );
            }
            for x in p.hashes {
                if !known.contains(&x) {
                    known.push(x);
                }
            }
        }
    }
    // The leaf hash next to the caller's own (a proof's first hash) does prove its neighbour:
    // that reply is hashes only, checked above.
    assert!(
        answered <= 1,
        "{answered} proofs answered to hashes the caller learned"
    );
}

#[tokio::test]
async fn proofs_hold_across_a_restart_and_retention() {
    let site = TestSite::start_with(
        "\n[audit]\ncheckpoint_every = 5\nretention_days = 1\n",
        None,
    )
    .await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut early = Vec::new();
    for i in 0..12u8 {
        early.push(s.sign(sign_req("release", i)).await.unwrap().into_inner());
    }
    let first = receipt(&site, early[3].audit_seq, &early[3].audit_entry)
        .await
        .unwrap();
    first.verify(&key, None).unwrap();

    // After a restart the tree is rebuilt from the store: old entries prove against new
    // checkpoints, and those checkpoints cover what came after.
    let site = site.restart().await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let late = s.sign(sign_req("release", 99)).await.unwrap().into_inner();
    let again = receipt(&site, early[3].audit_seq, &early[3].audit_entry)
        .await
        .unwrap();
    again.verify(&key, None).unwrap();
    assert!(again.tree_size > first.tree_size);
    receipt(&site, late.audit_seq, &late.audit_entry)
        .await
        .unwrap()
        .verify(&key, None)
        .unwrap();

    // Retention removes old entries (after an export); later entries still prove.
    site.clock
        .advance(std::time::Duration::from_secs(2 * 86400));
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let fresh = s.sign(sign_req("release", 98)).await.unwrap().into_inner();
    let full = meshsign_tests::export(&site, v1::ExportAuditRequest::default()).await;
    meshsign_evidence::audit::verify_export(&full, &key).unwrap();
    let (from, to) = meshsign_server::ops::housekeeping::prune_audit(site.state())
        .await
        .unwrap()
        .expect("pruned");
    assert_eq!(from, 1);
    let mut kept = 0;
    for r in early.iter().chain([&late, &fresh]) {
        let got = receipt(&site, r.audit_seq, &r.audit_entry).await;
        if r.audit_seq <= to {
            assert_eq!(got.unwrap_err().code(), Code::NotFound);
        } else {
            got.unwrap().verify(&key, None).unwrap();
            kept += 1;
        }
    }
    assert!(kept >= 1, "something after the pruned range proves");
    // New signatures after pruning: the tree goes on over the removed range.
    let after = s.sign(sign_req("release", 100)).await.unwrap().into_inner();
    receipt(&site, after.audit_seq, &after.audit_entry)
        .await
        .unwrap()
        .verify(&key, None)
        .unwrap();
    let site = site.restart().await;
    receipt(&site, after.audit_seq, &after.audit_entry)
        .await
        .unwrap()
        .verify(&key, None)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_prove_what_the_other_wrote_in_one_tree() {
    let pg = meshsign_certs_dev::postgres::LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&pg.store_section(), None).await;
    let b = a.replica("b").await;
    let key = audit_key(&a).await;
    let (ka, ra, _) = a.enrolled("staging").await;
    let mut sa = a.signer_for(&ka, &ra).await.unwrap();
    let mut sb = b.signer_for(&ka, &ra).await.unwrap();
    let mut signed = Vec::new();
    for i in 0..10u8 {
        let s = if i % 2 == 0 { &mut sa } else { &mut sb };
        signed.push(s.sign(sign_req("release", i)).await.unwrap().into_inner());
    }
    // Issue 24 row 12: a receipt asked at the replica that did not write the entry, at once.
    for i in 0..6u8 {
        let (signer, other) = if i % 2 == 0 {
            (&mut sb, &a)
        } else {
            (&mut sa, &b)
        };
        let r = signer
            .sign(sign_req("release", 100 + i))
            .await
            .unwrap()
            .into_inner();
        receipt(other, r.audit_seq, &r.audit_entry)
            .await
            .unwrap()
            .verify(&key, None)
            .unwrap();
    }
    let mut roots = std::collections::BTreeMap::new();
    for r in &signed {
        for site in [&a, &b] {
            let rc = receipt(site, r.audit_seq, &r.audit_entry).await.unwrap();
            rc.verify(&key, None).unwrap();
            // One log: whichever replica signed a tree head of a size, the root is the same.
            let root = rc.checkpoint.lines().nth(2).unwrap().to_string();
            assert_eq!(
                roots.entry(rc.tree_size).or_insert_with(|| root.clone()),
                &root
            );
        }
    }
}

fn facts(resp: &v1::AttestResponse) -> (Envelope, meshsign_evidence::attest::Statement) {
    let env: Envelope = serde_json::from_slice(&resp.envelope_json).unwrap();
    let st =
        meshsign_evidence::verify::open_statement(&env, &resp.public_key_der, &[5u8; 32]).unwrap();
    (env, st)
}

fn attest_req(alias: &str, predicate_type: &str) -> v1::AttestRequest {
    v1::AttestRequest {
        key_alias: alias.into(),
        subjects: vec![v1::AttestSubject {
            name: "app.tar.gz".into(),
            sha256_digest: vec![5u8; 32],
        }],
        predicate_type: predicate_type.into(),
    }
}

#[tokio::test]
async fn statements_are_built_from_verified_facts_and_name_their_audit_entry() {
    let site = TestSite::start().await;
    let (_k, enrolled, mut s) = site.enrolled("production").await;
    let resp = s
        .attest(attest_req("attest", ""))
        .await
        .unwrap()
        .into_inner();
    let (env, st) = facts(&resp);
    assert_eq!(env.payload_type, "application/vnd.in-toto+json");
    // The keyid securesystemslib computes for the key (client/tests/transparency.rs checks
    // it with securesystemslib itself).
    assert_eq!(
        Some(env.signatures[0].keyid.clone()),
        meshsign_evidence::attest::sslib_keyid(&resp.algorithm, &resp.public_key_der)
    );
    // The envelope is in the transparency log, named by an entry after the statement's own.
    let t = resp.transparency_entry.as_ref().unwrap();
    let logged = site
        .audit()
        .into_iter()
        .find(|r| r.tlog.as_ref().is_some_and(|l| l.index == t.log_index))
        .unwrap();
    assert!(logged.seq > resp.audit_seq);
    assert_eq!(
        meshsign_evidence::rekor::body_facts(&t.canonicalized_body)
            .unwrap()
            .kind,
        "dsse"
    );
    assert_eq!(st.predicate_type, PREDICATE_SIGNING);
    assert_eq!(st.subject[0].name, "app.tar.gz");
    let f = SiteFacts::from_statement(&st).unwrap();
    let rec = site
        .audit()
        .into_iter()
        .find(|r| r.seq == resp.audit_seq)
        .unwrap();
    // Every fact is the site's: the certificate's claims, its serial, the site's region, the
    // audit entry (written before the statement was signed) and its time.
    assert_eq!(
        (rec.rpc.as_str(), rec.decision.as_str(), rec.digest.as_str()),
        ("Attest", "allow", hex::encode([5u8; 32]).as_str())
    );
    assert_eq!(f.audit_seq, resp.audit_seq);
    assert_eq!(f.signed_at, rec.ts);
    assert_eq!(f.region, REGION);
    assert_eq!(f.environment, "production");
    assert_eq!(f.key_id, "attest@v1");
    assert_eq!(f.job_id, rec.job_id);
    assert_eq!(f.runner_fingerprint, "ab".repeat(32));
    assert_eq!(f.certificate_serial, enrolled.serial);
    assert_eq!(
        (
            f.provider.as_str(),
            f.repository.as_str(),
            f.git_ref.as_str()
        ),
        ("github", "acme/app", "refs/heads/main")
    );
    assert_eq!(
        f.workflow,
        "acme/app/.github/workflows/release.yml@refs/heads/main"
    );
    assert_eq!(f.commit.len(), 40);
    assert_eq!(f.binding().unwrap().audit_seq, resp.audit_seq);

    // SLSA provenance for a GitHub job: the workflow and commit the token named.
    let slsa = s
        .attest(attest_req("attest", PREDICATE_SLSA))
        .await
        .unwrap()
        .into_inner();
    let (_, st) = facts(&slsa);
    assert_eq!(st.predicate_type, PREDICATE_SLSA);
    let p = &st.predicate;
    assert_eq!(
        p["buildDefinition"]["externalParameters"]["workflow"],
        "acme/app/.github/workflows/release.yml@refs/heads/main"
    );
    assert_eq!(
        p["buildDefinition"]["resolvedDependencies"][0]["uri"],
        "git+https://github.com/acme/app@refs/heads/main"
    );
    assert_eq!(
        p["buildDefinition"]["resolvedDependencies"][0]["digest"]["gitCommit"]
            .as_str()
            .unwrap()
            .len(),
        40
    );
    assert_eq!(
        SiteFacts::from_statement(&st).unwrap().audit_seq,
        slsa.audit_seq
    );

    // And for a GitLab job: its CI config and commit.
    let key = RunnerKey::generate().unwrap();
    let gl = site
        .enroll_ok(site.enroll_request(
            "production",
            site.rs.mint(&site.gitlab_claims("production")).unwrap(),
            &key,
        ))
        .await;
    let mut g = site.signer_for(&key, &gl).await.unwrap();
    let glr = g
        .attest(attest_req("attest", PREDICATE_SLSA))
        .await
        .unwrap()
        .into_inner();
    let (_, st) = facts(&glr);
    assert_eq!(
        st.predicate["buildDefinition"]["buildType"],
        "https://meshsign.dev/buildtypes/gitlab/v1"
    );
    assert!(
        st.predicate["buildDefinition"]["externalParameters"]["workflow"]
            .as_str()
            .unwrap()
            .ends_with("//.gitlab-ci.yml@refs/heads/main")
    );
}

#[tokio::test]
async fn attestation_keys_sign_only_statements_and_bad_requests_are_refused_and_audited() {
    let extra = r#"
[[environments.trust_policies]]
name = "buildkite"
issuer = "https://agent.buildkite.com"
jwks_file = "pki/es.jwks.json"
provider = "buildkite"
bound_claims = { organization_slug = "acme" }
"#;
    let site = TestSite::start_with(extra, None).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    // A runner cannot have the attestation key sign a digest (e.g. of a PAE it wrote itself)…
    let e = s.sign(sign_req("attest", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("purpose: "), "{}", e.message());
    // …nor have another key sign a statement.
    let e = s.attest(attest_req("release", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "purpose: key `release` is not for attestation signing"
    );
    let last = site.last_audit();
    assert_eq!(
        (
            last.rpc.as_str(),
            last.decision.as_str(),
            last.reason.as_str()
        ),
        ("Attest", "deny", "purpose")
    );

    let subject = |name: &str, d: Vec<u8>| v1::AttestSubject {
        name: name.into(),
        sha256_digest: d,
    };
    let cases: Vec<(v1::AttestRequest, &str)> = vec![
        (
            v1::AttestRequest {
                subjects: vec![],
                ..attest_req("attest", "")
            },
            "subjects: ",
        ),
        (
            v1::AttestRequest {
                subjects: (0..65)
                    .map(|i| subject(&format!("f{i}"), vec![1; 32]))
                    .collect(),
                ..attest_req("attest", "")
            },
            "subjects: ",
        ),
        (
            v1::AttestRequest {
                subjects: vec![subject("bad\nname", vec![1; 32])],
                ..attest_req("attest", "")
            },
            "subjects: ",
        ),
        (
            v1::AttestRequest {
                subjects: vec![subject("a", vec![1; 31])],
                ..attest_req("attest", "")
            },
            "digest: ",
        ),
        (
            attest_req("attest", "https://example.com/my-own-predicate"),
            "predicate_type: ",
        ),
    ];
    for (req, prefix) in cases {
        let before = site.audit().len();
        let e = s.attest(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(prefix), "{}", e.message());
        let rec = site.last_audit();
        assert_eq!(site.audit().len(), before + 1, "one record per refusal");
        assert_eq!(rec.decision, "deny");
        assert!(e.message().starts_with(&format!("{}: ", rec.reason)));
    }

    // SLSA provenance needs the workflow and commit: a Buildkite token gives no workflow.
    let bk = BuildkiteJob::new().claims(
        "https://agent.buildkite.com",
        &format!("meshsign:production:{REGION}"),
        &random_id().unwrap(),
        site.now(),
        300,
    );
    let key = RunnerKey::generate().unwrap();
    let (_, mut b) = site
        .enroll_signed(
            &key,
            site.enroll_request("production", site.es.mint(&bk).unwrap(), &key),
        )
        .await;
    let e = b
        .attest(attest_req("attest", PREDICATE_SLSA))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .starts_with("predicate_type: SLSA provenance needs"),
        "{}",
        e.message()
    );
    // The signing predicate works for any provider.
    b.attest(attest_req("attest", "")).await.unwrap();
}

#[test]
fn an_attestation_key_with_another_purpose_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    meshsign_tests::write_site_files(dir.path());
    let path = dir.path().join("site.toml");
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "purposes = [\"attestation\"]",
        "purposes = [\"attestation\", \"digest\"]",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let e = meshsign_server::config::SiteConfig::load(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("an `attestation` key signs only"), "{e}");
}

fn distrust(env: &str, job: &str) -> v1::DistrustRequest {
    v1::DistrustRequest {
        environment: env.into(),
        job_id: job.into(),
        reason: "runner compromised".into(),
        ..Default::default()
    }
}

async fn public_list(site: &TestSite, env: &str) -> meshsign_evidence::distrust::DistrustList {
    let r = site
        .verification()
        .await
        .get_distrust_list(v1::GetDistrustListRequest {
            environment: env.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let list =
        meshsign_evidence::verify::open_distrust_list(&r.envelope_json, &audit_key(site).await)
            .unwrap();
    assert_eq!(list.version, r.version);
    list
}

#[tokio::test]
async fn distrust_lists_are_signed_versioned_per_environment_and_audited() {
    let site = TestSite::start().await;
    let v0 = public_list(&site, "production").await;
    assert_eq!((v0.version, v0.entries.len()), (0, 0));
    assert_eq!(
        public_list(&site, "production").await,
        v0,
        "the same bytes every time"
    );

    let mut admin = site.admin().await;
    let l1 = admin
        .distrust(distrust("production", "7001"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l1.version, 1);
    let fp = "cd".repeat(32);
    admin
        .distrust(v1::DistrustRequest {
            runner_fingerprint: fp.clone(),
            not_before: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            ..distrust("production", "")
        })
        .await
        .unwrap();
    let list = public_list(&site, "production").await;
    assert_eq!((list.version, list.entries.len()), (2, 2));
    assert_eq!(list.region, REGION);
    assert_eq!(list.entries[0].job_id, "7001");
    assert_eq!(list.entries[1].runner_fingerprint, fp);
    assert!(list.entries[0].added_by.ends_with("/ops/admin/dev"));
    // Issued with an expiry; past half of it, the unchanged list is re-issued (same version,
    // same rules, a later expiry) so a served list never expires.
    let expires = list.expires.expect("an expiry");
    assert_eq!(
        expires - list.issued_at,
        meshsign_server::ops::distrust::LIST_VALIDITY_SECS
    );
    site.clock.advance(std::time::Duration::from_secs(
        u64::try_from(meshsign_server::ops::distrust::LIST_VALIDITY_SECS).unwrap() / 2 + 60,
    ));
    let again = public_list(&site, "production").await;
    assert_eq!(
        (again.version, again.entries.clone()),
        (2, list.entries.clone())
    );
    assert!(again.expires.unwrap() > expires);
    // Partitioned: staging's list is untouched.
    assert_eq!(public_list(&site, "staging").await.version, 0);
    let rec = site
        .audit()
        .into_iter()
        .rev()
        .find(|r| r.rpc == "Admin.Distrust")
        .unwrap();
    assert!(rec.detail.contains("list version 2"), "{}", rec.detail);

    let removed = admin
        .undistrust(v1::UndistrustRequest {
            environment: "production".into(),
            id: list.entries[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.version, 3);
    assert_eq!(public_list(&site, "production").await.entries.len(), 1);

    // Refused, audited, nothing changed.
    for (req, code, prefix) in [
        (
            distrust("production", ""),
            Code::InvalidArgument,
            "invalid: name at least one",
        ),
        (
            v1::DistrustRequest {
                runner_fingerprint: "XYZ".into(),
                ..distrust("production", "")
            },
            Code::InvalidArgument,
            "invalid: runner fingerprint",
        ),
        (
            distrust("nowhere", "7001"),
            Code::NotFound,
            "not_found: environment",
        ),
    ] {
        let e = admin.distrust(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().starts_with(prefix), "{}", e.message());
    }
    let e = site
        .auditor()
        .await
        .distrust(distrust("production", "7001"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(public_list(&site, "production").await.version, 3);

    // The list survives a restart (and is the same signed document).
    let before = public_list(&site, "production").await;
    let site = site.restart().await;
    assert_eq!(public_list(&site, "production").await, before);
}

#[tokio::test]
async fn removing_a_distrust_rule_needs_a_second_admin_by_default() {
    let site = TestSite::start_with("\n[review]\nwindow_seconds = 600\n", None).await;
    let (mut alice, mut bob) = (site.admin().await, site.second_admin().await);
    // Adding is not covered by default; removing (trusting again) is.
    let l = alice
        .distrust(distrust("production", "7001"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.version, 1);
    let id = public_list(&site, "production").await.entries[0].id.clone();
    let req = v1::UndistrustRequest {
        environment: "production".into(),
        id,
    };
    let e = alice.undistrust(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with("review_required: "),
        "{}",
        e.message()
    );
    assert_eq!(public_list(&site, "production").await.version, 1);
    let at = e.message().find("proposal p-").unwrap() + "proposal ".len();
    let pid = e.message()[at..at + 18].to_string();
    bob.approve_proposal(v1::ApproveProposalRequest { id: pid })
        .await
        .unwrap();
    let l = alice.undistrust(req).await.unwrap().into_inner();
    assert_eq!(l.version, 2);
}

#[tokio::test]
async fn while_the_log_cannot_be_written_proofs_and_distrust_changes_are_unavailable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fail = Arc::new(AtomicBool::new(false));
    let f = fail.clone();
    let wrap = move |kv| -> Arc<dyn meshsign_server::store::Kv> {
        Arc::new(meshsign_tests::FaultyKv::new(kv, f.clone()))
    };
    let site = TestSite::start_with("", Some(&wrap)).await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let r = s.sign(sign_req("release", 1)).await.unwrap().into_inner();

    // The disk goes read-only before a checkpoint covers the entry: the proof needs one, so
    // it is unavailable — said as such, not as an internal error — and nothing changes.
    fail.store(true, Ordering::SeqCst);
    let e = receipt(&site, r.audit_seq, &r.audit_entry)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().starts_with("audit_unavailable: "),
        "{}",
        e.message()
    );
    let e = site
        .admin()
        .await
        .distrust(distrust("production", "7001"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Writable again: the proof is served and verifies; the refused distrust left no trace.
    fail.store(false, Ordering::SeqCst);
    receipt(&site, r.audit_seq, &r.audit_entry)
        .await
        .unwrap()
        .verify(&key, None)
        .unwrap();
    assert_eq!(public_list(&site, "production").await.version, 0);
}
