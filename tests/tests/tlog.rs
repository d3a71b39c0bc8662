//! The transparency log (issue 27, build points 1–2), at the RPC level against real sites:
//! every signature comes back with a Rekor-shaped entry, and a signed entry timestamp that
//! verifies at once when the request asked for one; the audit entry names the leaf; an inclusion proof to a C2SP checkpoint of
//! the log follows from `GetLogInclusionProof`; signing never makes a checkpoint; proofs hold
//! across a restart, retention and two replicas of one log. Sigstore's own verifier
//! (sigstore-js) checks the bundles in `client/tests/sigstore_js.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_evidence::audit::AuditRecord;
use meshsign_evidence::merkle::{Hash, leaf_hash, verify_inclusion};
use meshsign_evidence::rekor::{self, LogEntry};
use meshsign_proto::v1;
use meshsign_tests::{REGION, TestSite, audit_key, sign_req, sign_req_promised};
use tonic::Code;

fn entry(t: &v1::TransparencyEntry) -> LogEntry {
    LogEntry {
        log_index: t.log_index,
        integrated_time: t.integrated_time,
        body: t.canonicalized_body.clone(),
        set: t.signed_entry_timestamp.clone(),
    }
}

async fn log_proof(
    site: &TestSite,
    index: u64,
    leaf: &[u8],
) -> Result<v1::InclusionProof, tonic::Status> {
    Ok(site
        .verification()
        .await
        .get_log_inclusion_proof(v1::GetLogInclusionProofRequest {
            log_index: index,
            leaf_hash: leaf.to_vec(),
        })
        .await?
        .into_inner())
}

/// Proves `body` at `index` with the site's answer, checking the checkpoint with `key`;
/// returns (tree size, root).
async fn prove(
    site: &TestSite,
    key: &p256::ecdsa::VerifyingKey,
    index: u64,
    body: &[u8],
) -> (u64, Hash) {
    let leaf = leaf_hash(body);
    let p = log_proof(site, index, &leaf).await.unwrap();
    let origin = format!("meshsign.test/{REGION}/log");
    checked(&p, key, Some(&origin), index, &leaf)
}

/// Checks `p`, the proof of `leaf` at `index`, against the checkpoint it carries (signed with
/// `key`, for `origin` if given); returns (tree size, root).
fn checked(
    p: &v1::InclusionProof,
    key: &p256::ecdsa::VerifyingKey,
    origin: Option<&str>,
    index: u64,
    leaf: &Hash,
) -> (u64, Hash) {
    let head = meshsign_evidence::note::open(&p.checkpoint, key, origin).unwrap();
    assert_eq!(head.size, p.tree_size);
    let hashes: Vec<Hash> = p
        .hashes
        .iter()
        .map(|h| Hash::try_from(h.as_slice()).unwrap())
        .collect();
    verify_inclusion(index, p.tree_size, leaf, &hashes, &head.root).unwrap();
    (head.size, head.root)
}

/// `GetInclusionProof` of audit entry `seq` (its stored bytes `entry`) at `site`, checked
/// against the signed checkpoint that comes with it; returns the tree size.
async fn audit_prove(
    site: &TestSite,
    key: &p256::ecdsa::VerifyingKey,
    seq: u64,
    entry: &[u8],
) -> u64 {
    let leaf = leaf_hash(entry);
    let p = site
        .verification()
        .await
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq,
            leaf_hash: leaf.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    checked(&p, key, None, seq - 1, &leaf).0
}

#[tokio::test]
async fn every_signature_has_a_log_entry_with_a_set_and_a_proof_follows() {
    let site = TestSite::start().await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let checkpoints = |site: &TestSite| {
        site.audit()
            .iter()
            .filter(|e| e.rpc == "Checkpoint")
            .count()
    };
    let before = checkpoints(&site);
    // Even requests ask for the SET (as `meshsign sign --format sigstore` does), odd ones
    // do not: theirs is the same entry, unsigned.
    let mut got = Vec::new();
    for i in 0..20u8 {
        let mut req = sign_req("release", i);
        req.signed_entry_timestamp = i % 2 == 0;
        got.push(s.sign(req).await.unwrap().into_inner());
    }
    // Signing makes no checkpoint: the SET is the promise.
    assert_eq!(checkpoints(&site), before);
    let spki = {
        use p256::pkcs8::EncodePublicKey as _;
        key.to_public_key_der().unwrap().into_vec()
    };
    let mut indices = Vec::new();
    for (i, r) in got.iter().enumerate() {
        let t = r.transparency_entry.as_ref().expect("a log entry");
        assert_eq!(t.log_id, rekor::log_id(&spki).to_vec());
        let e = entry(t);
        if i % 2 == 1 {
            assert!(e.set.is_empty(), "a SET nobody asked for");
            assert!(e.verify_set(&key).is_err());
            indices.push(e.log_index);
            // Unsigned, the entry is still the signature's, named by its audit entry (its
            // proof is checked below with the others).
            let facts = rekor::body_facts(&e.body).unwrap();
            assert_eq!(facts.signature, r.signature);
            let audit: AuditRecord = serde_json::from_slice(&r.audit_entry).unwrap();
            let named = audit.tlog.as_ref().expect("the entry names its leaf");
            assert_eq!(named.index, e.log_index);
            assert_eq!(named.hashes().unwrap(), vec![leaf_hash(&e.body)]);
            continue;
        }
        e.verify_set(&key).unwrap();
        // The body is what was signed: digest, signature, key.
        let facts = rekor::body_facts(&e.body).unwrap();
        assert_eq!(facts.kind, "hashedrekord");
        assert_eq!(facts.digest, r.sha256_digest);
        assert_eq!(facts.signature, r.signature);
        assert_eq!(facts.spki_der, r.public_key_der);
        // The audit entry names the leaf at its index; the SET's time is the entry's.
        let audit: AuditRecord = serde_json::from_slice(&r.audit_entry).unwrap();
        let named = audit.tlog.as_ref().expect("the entry names its leaf");
        assert_eq!(named.index, e.log_index);
        assert_eq!(named.hashes().unwrap(), vec![leaf_hash(&e.body)]);
        assert_eq!(
            meshsign_evidence::attest::parse_rfc3339(&audit.ts).unwrap(),
            e.integrated_time
        );
        // Altered in any part, the SET fails.
        for f in [
            |e: &mut LogEntry| e.log_index += 1,
            |e: &mut LogEntry| e.integrated_time += 1,
            |e: &mut LogEntry| e.body[20] ^= 1,
            |e: &mut LogEntry| {
                let n = e.set.len() - 1;
                e.set[n] ^= 1
            },
        ] {
            let mut bad = e.clone();
            f(&mut bad);
            assert!(bad.verify_set(&key).is_err());
        }
        indices.push(e.log_index);
    }
    assert!(indices.windows(2).all(|w| w[1] == w[0] + 1), "{indices:?}");

    // A batch: one entry per signature, in order, under one audit entry.
    let batch = s
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: (0..12u8).map(|i| vec![100 + i; 32]).collect(),
            artifact_name: "b".into(),
            algorithm: String::new(),
            signed_entry_timestamp: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.transparency_entries.len(), 12);
    // A batch that does not ask: the same entries (more than eight: the SETs would be made on
    // the signing pool), none signed.
    let unasked = s
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: (0..12u8).map(|i| vec![150 + i; 32]).collect(),
            artifact_name: "b".into(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unasked.transparency_entries.len(), 12);
    for (i, (t, sig)) in unasked
        .transparency_entries
        .iter()
        .zip(&unasked.signatures)
        .enumerate()
    {
        assert!(t.signed_entry_timestamp.is_empty());
        assert_eq!(t.log_index, indices[19] + 13 + i as u64);
        assert_eq!(
            rekor::body_facts(&t.canonicalized_body).unwrap().signature,
            *sig
        );
    }
    for (i, (t, sig)) in batch
        .transparency_entries
        .iter()
        .zip(&batch.signatures)
        .enumerate()
    {
        let e = entry(t);
        e.verify_set(&key).unwrap();
        assert_eq!(e.log_index, indices[19] + 1 + i as u64);
        let facts = rekor::body_facts(&e.body).unwrap();
        assert_eq!(facts.signature, *sig);
        assert_eq!(facts.digest, vec![100 + i as u8; 32]);
    }

    // Proofs: every entry proves against a checkpoint of the log, signed by the audit key.
    let mut roots = std::collections::BTreeMap::new();
    for t in got
        .iter()
        .filter_map(|r| r.transparency_entry.as_ref())
        .chain(&batch.transparency_entries)
        .chain(&unasked.transparency_entries)
    {
        let (size, root) = prove(&site, &key, t.log_index, &t.canonicalized_body).await;
        assert_eq!(*roots.entry(size).or_insert(root), root);
    }
    // The log's checkpoints are in the audit chain too.
    let last = log_proof(
        &site,
        indices[0],
        &leaf_hash(
            &got[0]
                .transparency_entry
                .as_ref()
                .unwrap()
                .canonicalized_body,
        ),
    )
    .await
    .unwrap();
    assert!(site.audit().iter().any(|e| {
        e.checkpoint.as_ref().and_then(|c| c.log_note.as_deref()) == Some(last.checkpoint.as_str())
    }));

    // Whoever does not hold the body learns nothing: a wrong or short leaf, an index past
    // the end.
    let body = &got[3]
        .transparency_entry
        .as_ref()
        .unwrap()
        .canonicalized_body;
    for (index, leaf) in [
        (indices[3], vec![0u8; 32]),
        (indices[3], leaf_hash(body)[..31].to_vec()),
        (indices[4], leaf_hash(body).to_vec()),
        (u64::MAX, leaf_hash(body).to_vec()),
    ] {
        let e = log_proof(&site, index, &leaf).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().starts_with("audit_entry: "), "{}", e.message());
    }
}

#[tokio::test]
async fn log_proofs_hold_across_a_restart_and_retention() {
    let site = TestSite::start_with(
        "\n[audit]\ncheckpoint_every = 5\nretention_days = 1\n",
        None,
    )
    .await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut early = Vec::new();
    for i in 0..12u8 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        early.push(r.transparency_entry.unwrap());
    }
    let (size0, _) = prove(
        &site,
        &key,
        early[3].log_index,
        &early[3].canonicalized_body,
    )
    .await;

    // After a restart the log goes on from where it was (no index reused) and old entries
    // prove against new checkpoints.
    let site = site.restart().await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let late = s
        .sign(sign_req("release", 99))
        .await
        .unwrap()
        .into_inner()
        .transparency_entry
        .unwrap();
    assert_eq!(late.log_index, early[11].log_index + 1);
    let (size1, _) = prove(
        &site,
        &key,
        early[3].log_index,
        &early[3].canonicalized_body,
    )
    .await;
    assert!(size1 > size0);
    prove(&site, &key, late.log_index, &late.canonicalized_body).await;

    // Retention removes old audit entries; the log's leaves stay provable.
    site.clock
        .advance(std::time::Duration::from_secs(2 * 86400));
    let (_k, _r, mut s) = site.enrolled("staging").await;
    s.sign(sign_req("release", 98)).await.unwrap();
    meshsign_tests::export(&site, v1::ExportAuditRequest::default()).await;
    meshsign_server::ops::housekeeping::prune_audit(site.state())
        .await
        .unwrap()
        .expect("pruned");
    for t in early.iter().chain([&late]) {
        prove(&site, &key, t.log_index, &t.canonicalized_body).await;
    }
    let after = s
        .sign(sign_req("release", 100))
        .await
        .unwrap()
        .into_inner()
        .transparency_entry
        .unwrap();
    let site = site.restart().await;
    prove(&site, &key, after.log_index, &after.canonicalized_body).await;
    prove(
        &site,
        &key,
        early[0].log_index,
        &early[0].canonicalized_body,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_log_and_prove_what_the_other_wrote() {
    let pg = meshsign_certs_dev::postgres::LocalPostgres::start().unwrap();
    let a = TestSite::start_with(&pg.store_section(), None).await;
    let b = a.replica("b").await;
    let key = audit_key(&a).await;
    let (ka, ra, _) = a.enrolled("staging").await;
    let mut sa = a.signer_for(&ka, &ra).await.unwrap();
    let mut sb = b.signer_for(&ka, &ra).await.unwrap();
    // Concurrent signing at both replicas: every index is given once.
    let (xs, ys) = tokio::join!(
        async {
            let mut v = Vec::new();
            for i in 0..15u8 {
                v.push(
                    sa.sign(sign_req_promised("release", i))
                        .await
                        .unwrap()
                        .into_inner(),
                );
            }
            v
        },
        async {
            let mut v = Vec::new();
            for i in 0..15u8 {
                v.push(
                    sb.sign(sign_req_promised("release", 50 + i))
                        .await
                        .unwrap()
                        .into_inner(),
                );
            }
            v
        }
    );
    let entries: Vec<_> = xs
        .iter()
        .chain(&ys)
        .map(|r| r.transparency_entry.clone().unwrap())
        .collect();
    let mut indices: Vec<u64> = entries.iter().map(|t| t.log_index).collect();
    indices.sort_unstable();
    let first = indices[0];
    assert_eq!(indices, (first..first + 30).collect::<Vec<_>>());
    let mut roots = std::collections::BTreeMap::new();
    for t in &entries {
        entry(t).verify_set(&key).unwrap();
        for site in [&a, &b] {
            let (size, root) = prove(site, &key, t.log_index, &t.canonicalized_body).await;
            assert_eq!(*roots.entry(size).or_insert(root), root);
        }
    }
    // The audit log's proofs too, at both replicas, whichever wrote the entry: the entry's
    // blocks and the stored nodes come back from one statement (`scans_and_get_many`),
    // and a leaf hash the log does not hold is refused from it.
    for r in xs.iter().chain(&ys) {
        for site in [&a, &b] {
            audit_prove(site, &key, r.audit_seq, &r.audit_entry).await;
        }
    }
    for site in [&a, &b] {
        let refused = site
            .verification()
            .await
            .get_inclusion_proof(v1::GetInclusionProofRequest {
                seq: xs[3].audit_seq,
                leaf_hash: leaf_hash(&ys[3].audit_entry).to_vec(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    }
}

/// `GetConsistencyProof` between the checkpoints of `origin` whose notes are `old` and `new`,
/// checked; returns the sizes.
async fn consistent(
    site: &TestSite,
    key: &p256::ecdsa::VerifyingKey,
    old: &str,
    new: &str,
) -> (u64, u64) {
    let (a, b) = (
        meshsign_evidence::note::open(old, key, None).unwrap(),
        meshsign_evidence::note::open(new, key, None).unwrap(),
    );
    let p = site
        .verification()
        .await
        .get_consistency_proof(v1::GetConsistencyProofRequest {
            origin: a.origin.clone(),
            first_size: a.size,
            second_size: b.size,
        })
        .await
        .unwrap()
        .into_inner();
    let hashes: Vec<Hash> = p
        .hashes
        .iter()
        .map(|h| Hash::try_from(h.as_slice()).unwrap())
        .collect();
    meshsign_evidence::merkle::verify_consistency(a.size, b.size, &a.root, &b.root, &hashes)
        .unwrap();
    // A rewritten earlier tree (another root at that size) is not extended by the later one.
    let mut other = a.root;
    other[0] ^= 1;
    assert!(
        meshsign_evidence::merkle::verify_consistency(a.size, b.size, &other, &b.root, &hashes)
            .is_err()
    );
    (a.size, b.size)
}

#[tokio::test]
async fn a_witness_checks_that_both_logs_only_grow() {
    let site = TestSite::start_with("\n[audit]\ncheckpoint_every = 5\n", None).await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let sign = async |s: &mut v1::signer_client::SignerClient<tonic::transport::Channel>, i: u8| {
        s.sign(sign_req("release", i)).await.unwrap().into_inner()
    };
    let first = sign(&mut s, 1).await;
    let t = first.transparency_entry.clone().unwrap();
    let old_log = log_proof(&site, t.log_index, &leaf_hash(&t.canonicalized_body))
        .await
        .unwrap()
        .checkpoint;
    let old_audit = site
        .verification()
        .await
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq: first.audit_seq,
            leaf_hash: leaf_hash(&first.audit_entry).to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoint;
    let mut last = first;
    for i in 2..20u8 {
        last = sign(&mut s, i).await;
    }
    let t = last.transparency_entry.clone().unwrap();
    let new_log = log_proof(&site, t.log_index, &leaf_hash(&t.canonicalized_body))
        .await
        .unwrap()
        .checkpoint;
    let new_audit = site
        .verification()
        .await
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq: last.audit_seq,
            leaf_hash: leaf_hash(&last.audit_entry).to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoint;
    let (a, b) = consistent(&site, &key, &old_log, &new_log).await;
    assert!(a < b, "{a} {b}");
    let (a, b) = consistent(&site, &key, &old_audit, &new_audit).await;
    assert!(a < b, "{a} {b}");

    // Sizes past the newest signed head, an empty first tree, a log of another name: nothing.
    let head = meshsign_evidence::note::open(&new_log, &key, None).unwrap();
    for (origin, first, second) in [
        (head.origin.clone(), 1, head.size + 1000),
        (head.origin.clone(), 0, head.size),
        (head.origin.clone(), head.size, 1),
        ("meshsign.test/elsewhere/log".to_string(), 1, head.size),
    ] {
        let e = site
            .verification()
            .await
            .get_consistency_proof(v1::GetConsistencyProofRequest {
                origin,
                first_size: first,
                second_size: second,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().starts_with("audit_entry: "), "{}", e.message());
    }
}

/// A transparency leaf whose slot is found damaged (a flipped byte in
/// `merkle/log-leaves.slots`) is read as missing and written back from the audit entry that
/// added it — found by a binary search over the log — so its proof, and its neighbours'
/// (which need it as a sibling), still verify, and the file holds the leaf again. Without the
/// write-back the proof fails until nothing can bring the leaf back.
#[tokio::test]
async fn a_damaged_leaf_is_written_back_from_the_audit_entry_that_added_it() {
    let site = TestSite::start().await;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut got = Vec::new();
    for i in 0..40u8 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        got.push(r.transparency_entry.unwrap());
    }
    let data_dir = meshsign_server::config::SiteConfig::load(&site.site_toml)
        .unwrap()
        .data_dir;
    let path = meshsign_server::store::slots::dir_of(&data_dir).join("log-leaves.slots");
    let before = std::fs::read(&path).unwrap();
    // Two leaves damaged: one proved itself, one a sibling of the leaf proved.
    let (damaged, sibling) = (&got[21], &got[30]);
    let neighbour = &got[31];
    assert_eq!(sibling.log_index ^ 1, neighbour.log_index);
    let at = |e: &v1::TransparencyEntry| usize::try_from(e.log_index).unwrap() * 36 + 3;
    let mut bytes = before.clone();
    bytes[at(damaged)] ^= 0x10;
    bytes[at(sibling)] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    prove(&site, &key, damaged.log_index, &damaged.canonicalized_body).await;
    prove(
        &site,
        &key,
        neighbour.log_index,
        &neighbour.canonicalized_body,
    )
    .await;
    let after = std::fs::read(&path).unwrap();
    for e in [damaged, sibling] {
        let at = at(e);
        assert_eq!(
            after[at - 3..at + 33],
            before[at - 3..at + 33],
            "the slot of leaf {} holds it again",
            e.log_index
        );
    }
}

/// The inclusion proof call is public (no client certificate): an index the log does not hold
/// — past its end — is answered NotFound without a search of the audit log for the entry that
/// would have added it (that write-back is for a stored leaf found damaged, below the log's
/// size). Without the bound, each such request cost the site O(log n) scans of up to 256
/// decoded entries, as the reads counted here showed.
#[tokio::test]
async fn an_index_past_the_end_of_the_log_reads_no_audit_entry() {
    let (site, counts) = TestSite::start_counting("", meshsign_server::store::Tree::Audit).await;
    let reads = counts.reads;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut got = Vec::new();
    for i in 0..20u8 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        got.push(r.transparency_entry.unwrap());
    }
    let last = got.last().unwrap();
    // A proof of a leaf the log holds works (and makes the checkpoint that covers it).
    prove(&site, &key, last.log_index, &last.canonicalized_body).await;
    let leaf = leaf_hash(&last.canonicalized_body);
    let count = || reads.load(std::sync::atomic::Ordering::SeqCst);
    let before = count();
    for index in [
        last.log_index + 1,
        last.log_index + 2,
        last.log_index + 1000,
        1 << 40,
        u64::MAX,
    ] {
        for _ in 0..10 {
            let e = log_proof(&site, index, &leaf).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{e:?}");
        }
    }
    assert_eq!(
        count(),
        before,
        "50 requests past the end of the log read the audit log"
    );
    // The bound is the log's size, not a signed head: a leaf just added and not yet
    // checkpointed is still proved (a checkpoint is made for it).
    let r = s.sign(sign_req("release", 99)).await.unwrap().into_inner();
    let t = r.transparency_entry.unwrap();
    prove(&site, &key, t.log_index, &t.canonicalized_body).await;
}

/// A proof costs a few store reads whatever the log's size: the nodes it names are read in one
/// `get_many` (one statement on PostgreSQL) — for an audit proof together with the scans of
/// the ≤ 2 blocks of 16 entries its siblings below the stored level are in
/// (`Kv::scans_and_get_many`) — a transparency proof's low siblings from one leaf row. Before, each of its O(log n) siblings was a
/// read of its own (a round trip each on a database: 4–5 ms p50 at 10⁶ entries), and a
/// transparency sibling below level 4 one read per leaf under it.
#[tokio::test]
async fn a_proof_reads_the_store_a_few_times_whatever_the_size_of_the_log() {
    let (site, counts) = TestSite::start_counting("", meshsign_server::store::Tree::Audit).await;
    let calls = counts.calls;
    let key = audit_key(&site).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    let mut signed = Vec::new();
    for i in 0..300u16 {
        let r = s
            .sign(sign_req("release", (i % 251) as u8))
            .await
            .unwrap()
            .into_inner();
        signed.push(r);
    }
    // The checkpoints that cover every signature, made first (not counted).
    let last = signed.last().unwrap();
    let t = last.transparency_entry.clone().unwrap();
    prove(&site, &key, t.log_index, &t.canonicalized_body).await;
    audit_prove(&site, &key, last.audit_seq, &last.audit_entry).await;
    let count = || calls.load(std::sync::atomic::Ordering::SeqCst);
    let (mut most_audit, mut most_log) = (0, 0);
    for r in signed
        .iter()
        .step_by(7)
        .chain([signed.first().unwrap(), last])
    {
        let before = count();
        audit_prove(&site, &key, r.audit_seq, &r.audit_entry).await;
        most_audit = most_audit.max(count() - before);
        let t = r.transparency_entry.clone().unwrap();
        let before = count();
        prove(&site, &key, t.log_index, &t.canonicalized_body).await;
        most_log = most_log.max(count() - before);
    }
    // A leaf hash the log does not hold (this call is public) costs one read, as it did when
    // the entry was read first: its block, checked before anything else is read.
    let before = count();
    let refused = site
        .verification()
        .await
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq: signed[150].audit_seq,
            leaf_hash: vec![7; 32],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let bogus = count() - before;
    eprintln!(
        "report: store reads per proof: audit log {most_audit}, transparency log {most_log}; \
         a bogus leaf {bogus}"
    );
    assert!(
        bogus <= 1,
        "a leaf the log does not hold cost {bogus} store reads"
    );
    // Audit: the entry's own block of 16 (its leaf hash checked), the block of the tree's right
    // edge below the stored level and the stored nodes, all in one call. Before, each was a
    // read of its own: 3.
    assert!(
        most_audit <= 1,
        "an audit proof made {most_audit} store reads"
    );
    // Transparency: the leaf's row, then the stored nodes and the ≤ 2 rows of the low siblings.
    assert!(
        most_log <= 2,
        "a transparency proof made {most_log} store reads"
    );
}

/// Issue 30: a group commit stores its transparency leaf rows and both logs' new Merkle nodes
/// in a few store calls — the rows read in one `get_many`, a compare-and-swap each, and every
/// new node in one `put_many` (one statement on PostgreSQL). Before, each row was a read and a
/// write and each node a write of its own: round trips on the writer's path, before anyone was
/// answered (a 1,000-digest batch: 245 calls, now 65; the PostgreSQL loader wrote 2,800 entries/s).
#[tokio::test]
async fn a_batch_stores_its_leaf_rows_and_merkle_nodes_in_a_call_per_row() {
    let (site, counts) = TestSite::start_counting("", meshsign_server::store::Tree::Merkle).await;
    let calls = counts.tree_calls;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    // One Sign first, so the batch below starts mid-row as a running log does.
    s.sign(sign_req("release", 1)).await.unwrap();
    let digests = 1000u64;
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let batch = s
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: (0..digests).map(|i| vec![(i % 251) as u8; 32]).collect(),
            artifact_name: "many".into(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner();
    let made = calls.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(batch.transparency_entries.len(), digests as usize);
    let first = batch.transparency_entries[0].log_index;
    let rows = (first + digests - 1) / 16 - first / 16 + 1;
    eprintln!("report: {digests} leaves in {rows} rows: {made} calls to the Merkle tree");
    // A swap per row, one read of them all, one write of the nodes (and slack for the audit
    // entry's own leaf row and node).
    assert!(
        made <= rows + 4,
        "{digests} leaves over {rows} rows made {made} calls to the Merkle tree"
    );
    // What was stored proves: the last leaf's inclusion from a checkpoint that covers it.
    let key = audit_key(&site).await;
    let t = batch.transparency_entries.last().unwrap();
    prove(&site, &key, t.log_index, &t.canonicalized_body).await;
}
