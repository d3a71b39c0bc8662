//! The audit log: hash chain, signed checkpoints, offline verification that names the first bad
//! seq, filtered exports that stay verifiable, receipts, and no signature without a record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use meshsign_evidence::audit::{AuditRecord, ExportLine, Start, verify_export, verify_export_from};
use meshsign_proto::v1;
use meshsign_tests::{
    FaultyKv, TestSite, audit_key, export, export_messages, export_raw, sign_req,
};
use tonic::Code;

const SMALL_CHECKPOINTS: &str = "\n[audit]\ncheckpoint_every = 5\n";

/// A site with some history: enrollments, signatures, a denial, an admin read.
async fn busy_site() -> TestSite {
    let site = TestSite::start_with(SMALL_CHECKPOINTS, None).await;
    for env in ["staging", "production", "staging"] {
        let (_k, _r, mut s) = site.enrolled(env).await;
        for i in 0..3 {
            s.sign(sign_req("release", i)).await.unwrap();
        }
        let _ = s.sign(sign_req("prod-only", 0)).await;
    }
    site.admin()
        .await
        .list_keys(v1::EnvironmentRequest {
            environment: "staging".into(),
        })
        .await
        .unwrap();
    site
}

fn entry_mut(lines: &mut [ExportLine], seq: u64) -> &mut AuditRecord {
    lines
        .iter_mut()
        .find_map(|l| match l {
            ExportLine::Entry(e) if e.seq == seq => Some(&mut **e),
            _ => None,
        })
        .unwrap()
}

fn idx(lines: &[ExportLine], seq: u64) -> usize {
    lines.iter().position(|l| l.seq() == seq).unwrap()
}

#[tokio::test]
async fn tampering_is_detected_at_the_right_seq() {
    let site = busy_site().await;
    let key = audit_key(&site).await;
    let lines = export(&site, v1::ExportAuditRequest::default()).await;
    let report = verify_export(&lines, &key).unwrap();
    assert!(report.checkpoints >= 3, "{report:?}");
    assert_eq!(report.first_seq, 1);
    let every = site.audit();
    assert!(
        every
            .iter()
            .all(|r| !r.job_id.is_empty() || !r.environment.is_empty() || !r.jti.is_empty())
    );
    // Every entry joins to a job, an environment or a jti.
    let k = 7u64; // a Sign entry in the middle
    assert!(lines.len() as u64 > k + 6);

    // Edit one field of one entry.
    let mut edited = lines.clone();
    entry_mut(&mut edited, k).digest = "00".repeat(32);
    assert_eq!(verify_export(&edited, &key).unwrap_err().seq, k);

    // Delete one entry.
    let mut deleted = lines.clone();
    deleted.remove(idx(&deleted, k));
    assert_eq!(verify_export(&deleted, &key).unwrap_err().seq, k);

    // Swap two entries.
    let mut swapped = lines.clone();
    let i = idx(&swapped, k);
    swapped.swap(i, i + 1);
    assert_eq!(verify_export(&swapped, &key).unwrap_err().seq, k);

    // Insert a forged entry (well-formed, correctly chained after k).
    let mut inserted = lines.clone();
    let mut forged = entry_mut(&mut inserted, k).clone();
    forged.seq = k + 1;
    forged.digest = "ff".repeat(32);
    forged.prev_hash = forged.hash.clone();
    forged.hash = forged.compute_hash();
    let i = idx(&inserted, k);
    inserted.insert(i + 1, ExportLine::Entry(Box::new(forged)));
    assert_eq!(verify_export(&inserted, &key).unwrap_err().seq, k + 1);

    // Rewrite one entry and recompute every later hash: the next signed checkpoint catches it.
    let mut rewritten = lines.clone();
    entry_mut(&mut rewritten, k).decision = "deny".into();
    let mut prev = entry_mut(&mut rewritten, k - 1).hash.clone();
    let mut first_checkpoint_after = None;
    for l in rewritten.iter_mut().skip(idx(&lines, k)) {
        if let ExportLine::Entry(e) = l {
            if e.checkpoint.is_some() && first_checkpoint_after.is_none() {
                first_checkpoint_after = Some(e.seq);
            }
            e.prev_hash = prev.clone();
            e.hash = e.compute_hash();
            prev = e.hash.clone();
        }
    }
    let err = verify_export(&rewritten, &key).unwrap_err();
    assert_eq!(Some(err.seq), first_checkpoint_after, "{err}");

    // A forged checkpoint signature.
    let cp_seq = lines.iter().find_map(|l| match l {
        ExportLine::Entry(e) if e.checkpoint.is_some() => Some(e.seq),
        _ => None,
    });
    let cp_seq = cp_seq.unwrap();
    let mut forged_cp = lines.clone();
    let e = entry_mut(&mut forged_cp, cp_seq);
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cp = e.checkpoint.as_mut().unwrap();
    let msg = meshsign_evidence::audit::Checkpoint::message(
        &e.site_region,
        cp.covers_seq,
        &cp.head_hash,
        cp.time,
    );
    use rcgen::SigningKey as _;
    cp.signature = hex::encode(other.sign(&msg).unwrap());
    e.hash = e.compute_hash();
    // Re-chain the rest so only the signature is wrong.
    let mut prev = e.hash.clone();
    for l in forged_cp.iter_mut().skip(idx(&lines, cp_seq) + 1) {
        if let ExportLine::Entry(e) = l {
            e.prev_hash = prev.clone();
            e.hash = e.compute_hash();
            prev = e.hash.clone();
        }
    }
    let err = verify_export(&forged_cp, &key).unwrap_err();
    assert_eq!(err.seq, cp_seq);
    assert!(err.reason.contains("signature"), "{err}");
}

#[tokio::test]
async fn filtered_exports_stay_verifiable_and_reveal_nothing_else() {
    let site = busy_site().await;
    let key = audit_key(&site).await;
    let filtered = export(
        &site,
        v1::ExportAuditRequest {
            environment: "production".into(),
            decision_filter: v1::Decision::Allow as i32,
            ..Default::default()
        },
    )
    .await;
    // An older client's string filter selects the same entries.
    #[allow(deprecated)]
    let old_client = v1::ExportAuditRequest {
        environment: "production".into(),
        decision: "allow".into(),
        ..Default::default()
    };
    let by_string = export(&site, old_client).await;
    let selected = |lines: &[ExportLine]| -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| match l {
                ExportLine::Entry(e) if e.checkpoint.is_none() => Some(e.seq),
                _ => None,
            })
            .collect()
    };
    // (The second export also sees the first one's own audit entry, allowed in production.)
    let first = selected(&filtered);
    let last = first.last().copied().unwrap_or(0);
    let second: Vec<u64> = selected(&by_string)
        .into_iter()
        .filter(|s| *s <= last)
        .collect();
    assert_eq!(first, second);
    assert!(!first.is_empty());
    let r = verify_export(&filtered, &key).unwrap();
    assert!(r.omitted > 0 && r.entries > 0 && r.checkpoints > 0, "{r:?}");
    for l in &filtered {
        if let ExportLine::Entry(e) = l {
            assert!(
                e.checkpoint.is_some() || (e.environment == "production" && e.decision == "allow"),
                "{e:?}"
            );
        }
    }
    // Tampering inside a filtered export is still caught.
    let mut t = filtered.clone();
    let seq = t.iter().find_map(|l| match l {
        ExportLine::Entry(e) if e.rpc == "Sign" => Some(e.seq),
        _ => None,
    });
    let seq = seq.unwrap();
    entry_mut(&mut t, seq).artifact = "evil".into();
    assert_eq!(verify_export(&t, &key).unwrap_err().seq, seq);
    // --since starts mid-log: refused as a whole log, and from a checkpoint only if it starts
    // at one.
    let tail = export(
        &site,
        v1::ExportAuditRequest {
            since_seq: 4,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tail[0].seq(), 4);
    let err = verify_export(&tail, &key).unwrap_err();
    assert_eq!(err.seq, 4);
    assert!(err.reason.contains("starts mid-chain at seq 4"), "{err}");
    let first_cp = filtered
        .iter()
        .find_map(|l| match l {
            ExportLine::Entry(e) if e.checkpoint.is_some() => Some(e.seq),
            _ => None,
        })
        .expect("a checkpoint in the log");
    let from_cp = export(
        &site,
        v1::ExportAuditRequest {
            since_seq: first_cp,
            ..Default::default()
        },
    )
    .await;
    verify_export_from(&from_cp, &key, Start::GenesisOrCheckpoint).unwrap();
    if first_cp != 4 {
        assert!(verify_export_from(&tail, &key, Start::GenesisOrCheckpoint).is_err());
    }
    // An empty log is not a verified log.
    assert!(
        verify_export(&[], &key)
            .unwrap_err()
            .reason
            .contains("empty")
    );
}

#[tokio::test]
async fn receipts_bind_a_signature_to_its_entry() {
    let site = TestSite::start_with(SMALL_CHECKPOINTS, None).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let resp = s.sign(sign_req("release", 9)).await.unwrap().into_inner();
    assert!(resp.audit_seq > 0 && resp.audit_hash.len() == 64);
    for i in 0..6 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    let key = audit_key(&site).await;
    let lines = export(&site, v1::ExportAuditRequest::default()).await;
    let bundle = meshsign_evidence::verify::SigBundle {
        artifact: "t".into(),
        digest_sha256: hex::encode([9u8; 32]),
        signature: String::new(),
        key_id: resp.key_id.clone(),
        algorithm: resp.algorithm.clone(),
        public_key_pem: String::new(),
        audit_id: resp.audit_id.clone(),
        audit_seq: resp.audit_seq,
        audit_hash: resp.audit_hash.clone(),
        region: "sg".into(),
        environment: "production".into(),
        signed_at: String::new(),
        certificate_chain_pem: vec![],
        receipt: None,
    };
    assert!(
        meshsign_evidence::verify::verify_receipt(&bundle, &lines, &key).unwrap(),
        "anchored by a checkpoint"
    );
    let mut wrong = bundle.clone();
    wrong.digest_sha256 = hex::encode([8u8; 32]);
    assert!(meshsign_evidence::verify::verify_receipt(&wrong, &lines, &key).is_err());
    let mut wrong = bundle;
    wrong.audit_hash = "00".repeat(32);
    assert!(meshsign_evidence::verify::verify_receipt(&wrong, &lines, &key).is_err());
}

#[tokio::test]
async fn no_signature_without_a_durable_audit_record() {
    let fail = Arc::new(AtomicBool::new(false));
    let f = fail.clone();
    let wrap =
        move |kv| -> Arc<dyn meshsign_server::store::Kv> { Arc::new(FaultyKv::new(kv, f.clone())) };
    let site = TestSite::start_with("", Some(&wrap)).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    s.sign(sign_req("release", 1)).await.unwrap();
    let before = site.audit().len();

    // The disk goes read-only: signing is refused, clearly, and nothing is returned.
    fail.store(true, Ordering::SeqCst);
    let err = s.sign(sign_req("release", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().starts_with("audit_unavailable: "),
        "{}",
        err.message()
    );
    let err = s
        .sign_batch(v1::SignBatchRequest {
            key_alias: "release".into(),
            sha256_digests: vec![vec![1; 32]; 10],
            artifact_name: String::new(),
            algorithm: String::new(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // Enrollment too.
    let key = meshsign_client::session::RunnerKey::generate().unwrap();
    let err = site
        .enrollment()
        .await
        .enroll(site.enroll_request("production", site.token("production"), &key))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Internal),
        "{err:?}"
    );

    // Back to normal: signing resumes and the chain has no hole.
    fail.store(false, Ordering::SeqCst);
    s.sign(sign_req("release", 1)).await.unwrap();
    let all = site.audit();
    assert_eq!(all.len(), before + 1);
    let key = audit_key(&site).await;
    verify_export(
        &export(&site, v1::ExportAuditRequest::default()).await,
        &key,
    )
    .unwrap();
}

#[tokio::test]
async fn retention_prunes_only_what_was_exported_and_checkpointed() {
    let site = TestSite::start_with(
        "\n[audit]\ncheckpoint_every = 5\nretention_days = 1\n",
        None,
    )
    .await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    for i in 0..12 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    let before = site.audit().len();
    site.clock
        .advance(std::time::Duration::from_secs(2 * 86400));
    // Old enough, but never exported: nothing goes.
    assert_eq!(
        meshsign_server::ops::housekeeping::prune_audit(site.state())
            .await
            .unwrap(),
        None
    );
    assert_eq!(site.audit().len(), before, "nothing pruned");

    let key = audit_key(&site).await;
    let full = export(&site, v1::ExportAuditRequest::default()).await;
    verify_export(&full, &key).unwrap();
    // Exported and old enough, but a snapshot is reading the log: nothing goes until it is
    // done (the next housekeeping pass prunes).
    let held = site.audit().len();
    let hold = site.state().audit.hold_front();
    assert_eq!(
        meshsign_server::ops::housekeeping::prune_audit(site.state())
            .await
            .unwrap(),
        None
    );
    assert_eq!(site.audit().len(), held, "nothing pruned while held");
    drop(hold);
    let (from, to) = meshsign_server::ops::housekeeping::prune_audit(site.state())
        .await
        .unwrap()
        .expect("pruned");
    assert_eq!(from, 1);
    let remaining = export(&site, v1::ExportAuditRequest::default()).await;
    // What remains starts at a signed checkpoint and verifies from it.
    match &remaining[0] {
        ExportLine::Entry(e) => {
            assert_eq!(e.seq, to + 1);
            assert!(
                e.checkpoint.is_some(),
                "the retained log starts at a checkpoint"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        verify_export(&remaining, &key).is_err(),
        "a pruned log does not pass as a whole log"
    );
    let r = verify_export_from(&remaining, &key, Start::GenesisOrCheckpoint).unwrap();
    assert!(r.checkpoints >= 1);
    assert!(
        site.audit()
            .iter()
            .any(|r| r.rpc == "AuditRetention" && r.detail.contains("pruned entries 1..="))
    );
}

/// What a crash leaves in `data` when the store loses its unflushed tail: entries `seqs`
/// gone from the store (taken from the end: the log is cut, it has no holes), and the journal
/// file holding `journal`. A test helper: each `unwrap` is a step of the test's setup on its own
/// temporary folder, and a failure there fails the test that called it.
fn crash_leaving(
    data: &std::path::Path,
    seqs: impl DoubleEndedIterator<Item = u64>,
    journal: &[u8],
) {
    use meshsign_server::store::{Kv, Tree};
    let kv = meshsign_server::store::SledKv::open(data).unwrap();
    for seq in seqs.rev() {
        kv.remove(Tree::Audit, &seq.to_be_bytes()).unwrap();
    }
    kv.flush().unwrap();
    drop(kv);
    std::fs::write(
        data.join(meshsign_server::audit::journal::JOURNAL_FILE),
        journal,
    )
    .unwrap();
}

/// Every acknowledged (seq, hash) is in `all` as it was acknowledged (a missing one fails the
/// calling test: that is the assertion).
fn assert_acknowledged(all: &[AuditRecord], receipts: &[(u64, String)]) {
    for (seq, hash) in receipts {
        let e = all.iter().find(|e| e.seq == *seq).expect("recovered");
        assert_eq!(&e.hash, hash, "seq {seq} is the acknowledged entry");
    }
}

/// A crash can leave acknowledged Sign entries only in the audit journal (they are made
/// durable there, not by a store flush). At start they are written back into the store; a torn
/// last line — a write the crash cut short, never acknowledged — is dropped.
#[tokio::test]
async fn signatures_acknowledged_through_the_journal_survive_a_lost_store_tail() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    // The enrollment flushed the store and emptied the journal; these three go to the journal.
    let mut receipts = Vec::new();
    for i in 0..3 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        receipts.push((r.audit_seq, r.audit_hash));
    }
    let journal_path = site
        .dir
        .path()
        .join("data")
        .join(meshsign_server::audit::journal::JOURNAL_FILE);
    let journal = std::fs::read(&journal_path).unwrap();
    // A header line (what the store held when the journal was last emptied), then entries.
    let lines: Vec<AuditRecord> = journal
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    assert_eq!(
        lines.iter().map(|r| r.seq).collect::<Vec<_>>(),
        receipts.iter().map(|r| r.0).collect::<Vec<_>>(),
        "the journal holds exactly the three Sign entries"
    );
    drop(s);

    let site = site
        .restart_with(|data| {
            // What a crash leaves: the store lost its unflushed tail (the three entries), the
            // journal has them plus half of a fourth line: the first half of the last entry,
            // no newline.
            let body = &journal[..journal.len() - 1];
            let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let mut torn = journal.clone();
            torn.extend_from_slice(&body[start..start + (body.len() - start) / 2]);
            crash_leaving(data, receipts.iter().map(|r| r.0), &torn);
        })
        .await;

    let all = site.audit();
    assert_acknowledged(&all, &receipts);
    // No gap; the torn line's seq is not reused for another decision: an entry recording the
    // loss takes it; the chain still verifies end to end.
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    let last_receipt = receipts.last().unwrap().0;
    let loss = all.iter().find(|e| e.seq == last_receipt + 1).unwrap();
    assert_eq!(
        (loss.rpc.as_str(), loss.reason.as_str()),
        ("AuditRecovery", "loss_recorded")
    );
    assert!(loss.detail.contains("torn last line"), "{}", loss.detail);
    let key = audit_key(&site).await;
    let lines = export(&site, v1::ExportAuditRequest::default()).await;
    verify_export(&lines, &key).unwrap();
    let left = std::fs::read_to_string(&journal_path).unwrap();
    assert_eq!(
        left.lines().count(),
        1,
        "recovered entries are in the store; the journal is emptied to its header: {left}"
    );
    assert!(left.starts_with("{\"journal\":1,\"after_seq\":"), "{left}");
}

/// A checkpoint that falls due under load (`checkpoint_every`) is journaled like the entries
/// it covers, not a store flush (issue 30: that flush stalled every request in flight, and
/// set the p99 of Sign @16). So the journal runs on through it, and a crash that loses the
/// store's unflushed tail loses neither the checkpoint nor the signatures around it.
#[tokio::test]
async fn a_checkpoint_due_under_load_is_journaled_and_survives_a_lost_store_tail() {
    let site = TestSite::start_with(SMALL_CHECKPOINTS, None).await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    // The enrollment flushed the store and emptied the journal; 12 Signs pass two due
    // checkpoints (every 5 entries).
    let mut receipts = Vec::new();
    for i in 0..12 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        receipts.push((r.audit_seq, r.audit_hash));
    }
    let data = site.dir.path().join("data");
    let journal = std::fs::read(data.join(meshsign_server::audit::journal::JOURNAL_FILE)).unwrap();
    let lines: Vec<AuditRecord> = journal
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    let checkpoints: Vec<u64> = lines
        .iter()
        .filter(|r| r.rpc == "Checkpoint")
        .map(|r| r.seq)
        .collect();
    assert!(
        checkpoints.len() >= 2,
        "the due checkpoints are in the journal: {checkpoints:?}"
    );
    for (seq, _) in &receipts {
        assert!(
            lines.iter().any(|r| r.seq == *seq),
            "Sign entry {seq} is still in the journal: no checkpoint emptied it"
        );
    }
    let journaled: Vec<u64> = lines.iter().map(|r| r.seq).collect();
    drop(s);

    let site = site
        .restart_with(|data| {
            // What a crash leaves: the journal as it was while the site ran (a clean stop
            // empties it), the store without everything after the enrollment's flush.
            crash_leaving(data, journaled.iter().copied(), &journal);
        })
        .await;
    let all = site.audit();
    assert_acknowledged(&all, &receipts);
    for seq in &checkpoints {
        let e = all
            .iter()
            .find(|e| e.seq == *seq)
            .expect("checkpoint recovered");
        assert_eq!(e.rpc, "Checkpoint");
        assert!(
            e.checkpoint.is_some(),
            "seq {seq} carries its signed checkpoint"
        );
    }
    let key = audit_key(&site).await;
    let lines = export(&site, v1::ExportAuditRequest::default()).await;
    verify_export(&lines, &key).unwrap();
}

/// Issue 23 row 4: the journal only runs ahead of the store (an entry is journaled before it
/// is stored), so a store holding entries past the journal's end means journal lines were cut
/// — acknowledged entries that may be in neither any more. Emptied, header-only and tail-cut
/// journals refuse the start naming the gap; a complete last line whose newline was altered is
/// kept (its own hash proves it whole), not recorded as a loss.
#[tokio::test]
async fn a_cut_or_emptied_journal_refuses_the_start_and_a_whole_last_line_is_kept() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let mut receipts = Vec::new();
    for i in 0..5 {
        let r = s.sign(sign_req("release", i)).await.unwrap().into_inner();
        receipts.push((r.audit_seq, r.audit_hash));
    }
    drop(s);
    let data = site.dir.path().join("data");
    let journal_path = data.join(meshsign_server::audit::journal::JOURNAL_FILE);
    // What the journal held while the site ran: its header, then the five Sign entries.
    let journal = std::fs::read(&journal_path).unwrap();
    let lines: Vec<&[u8]> = journal.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(lines.len(), 6, "header + 5 entries");
    let head = receipts.last().unwrap().0;
    let TestSite {
        dir,
        handle,
        clock,
        site_toml,
        ..
    } = site;
    // A clean stop: the store holds every entry durably.
    handle.shutdown().await;
    let open = || {
        let cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
        meshsign_server::state::SiteState::open(cfg, Arc::new(clock.clone()))
    };

    for (what, text, ends) in [
        ("emptied", Vec::new(), 0),
        ("header only", lines[0].to_vec(), head - 5),
        ("last two lines cut", lines[..4].concat(), head - 2),
    ] {
        std::fs::write(&journal_path, &text).unwrap();
        let msg = open()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{what}: the start must be refused"));
        assert!(
            msg.contains(&journal_path.display().to_string())
                && msg.contains(&format!("ends at seq {ends} "))
                && msg.contains(&format!("through seq {head}"))
                && msg.contains("meshsignd recover"),
            "{what}: {msg}"
        );
        assert_eq!(
            std::fs::read(&journal_path).unwrap(),
            text,
            "{what}: a refused start leaves the journal as it found it"
        );
    }

    // The store lost its last entry (a crash); the journal's last line is whole but its
    // newline was flipped: the entry comes back from it, and nothing is recorded as lost.
    {
        use meshsign_server::store::{Kv, Tree};
        let kv = meshsign_server::store::SledKv::open(&data).unwrap();
        kv.remove(Tree::Audit, &head.to_be_bytes()).unwrap();
        kv.flush().unwrap();
    }
    let mut flipped = journal.clone();
    *flipped.last_mut().unwrap() = b'X';
    std::fs::write(&journal_path, &flipped).unwrap();
    let state = open().unwrap();
    let handle = meshsign_server::api::start(Arc::new(state)).await.unwrap();
    let all = handle.state.audit.all().unwrap();
    for (seq, hash) in &receipts {
        let e = all.iter().find(|e| e.seq == *seq).expect("kept");
        assert_eq!(&e.hash, hash, "seq {seq} is the acknowledged entry");
    }
    assert!(
        all.iter().all(|e| e.reason != "loss_recorded"),
        "nothing was lost"
    );
    handle.shutdown().await;
    drop(dir);
}

/// The window the journal check must not mistake for a cut journal: a batch made durable by a
/// store flush (an enrollment), killed before the journal was emptied. The store then ends
/// after the journal — and says, in the same flush, that the flush made those entries durable.
#[tokio::test]
async fn a_crash_between_a_store_flush_and_emptying_the_journal_is_not_a_cut_journal() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    for i in 0..2 {
        s.sign(sign_req("release", i)).await.unwrap();
    }
    drop(s);
    let data = site.dir.path().join("data");
    let journal_path = data.join(meshsign_server::audit::journal::JOURNAL_FILE);
    let before = std::fs::read(&journal_path).unwrap();
    // An enrollment: its batch is made durable by a store flush, then the journal is emptied.
    let (_k2, r2, _s2) = site.enrolled("staging").await;
    let enrolled = site
        .audit()
        .into_iter()
        .rfind(|e| e.rpc == "Enroll" && e.cert_serial == r2.serial)
        .expect("the enrollment's entry");
    let site = site
        .restart_with(|_| {
            // What a kill -9 right after the flush leaves: the journal as it was before.
            std::fs::write(&journal_path, &before).unwrap();
        })
        .await;
    let all = site.audit();
    let e = all.iter().find(|e| e.seq == enrolled.seq).expect("kept");
    assert_eq!(e.hash, enrolled.hash);
    assert!(all.iter().all(|e| e.reason != "loss_recorded"));
    let key = audit_key(&site).await;
    verify_export(
        &export(&site, v1::ExportAuditRequest::default()).await,
        &key,
    )
    .unwrap();
}

/// Issue 23 row 7: one byte flipped in the store's files of a running site ([`FLIPS`] places
/// spread over sled's file, the audit segments and the Merkle node files, each on its own
/// copy, as a kill -9 leaves
/// it). Each copy either refuses to start — naming the damaged file, or where the readable
/// audit log ends — or starts and either finds the damage in its background read of the log
/// (and refuses writes) or holds every acknowledged entry readable. Before, a damaged audit
/// page let the site start and sign; only a later full export failed.
#[tokio::test]
async fn a_flipped_byte_in_the_store_refuses_the_start_or_loses_nothing() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let mut receipts = Vec::new();
    for i in 0..300u32 {
        let r = s
            .sign(sign_req("release", (i % 250) as u8))
            .await
            .unwrap()
            .into_inner();
        receipts.push((r.audit_seq, r.audit_hash));
    }
    drop(s);
    // What a kill -9 leaves: the store's files as the engine last wrote them, the site running.
    site.state().store.flush().unwrap();
    let (clock, site_toml) = (site.clock.clone(), site.site_toml.clone());
    let data = site.dir.path().join("data");
    // The store's files: sled's, and the audit log's segments beside it. Flips land where a
    // file holds data (sled preallocates zeroed segments), alternating between the two.
    let mut files = vec![std::path::PathBuf::from("db")];
    for (folder, ext) in [("audit", ".seg"), ("merkle", ".slots")] {
        for e in std::fs::read_dir(data.join(folder)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(ext) {
                files.push(std::path::Path::new(folder).join(name));
            }
        }
    }
    assert!(files.len() > 3, "{files:?}");
    let used: Vec<Vec<usize>> = files
        .iter()
        .map(|f| {
            std::fs::read(data.join(f))
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(_, b)| **b != 0)
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    let copies = tempfile::tempdir().unwrap();
    let (mut refused, mut intact) = (Vec::new(), 0);
    for k in 0..FLIPS {
        let copy = copies.path().join(format!("c{k}"));
        meshsign_tests::copy_dir(&data, &copy);
        let file = k % files.len();
        let (k, n) = (k / files.len(), FLIPS.div_ceil(files.len()));
        let at = used[file][used[file].len() * (2 * k + 1) / (2 * n)];
        let target = copy.join(&files[file]);
        let mut bytes = std::fs::read(&target).unwrap();
        bytes[at] ^= 0x5a;
        std::fs::write(&target, bytes).unwrap();
        let at = format!("{} byte {at}", files[file].display());
        let mut cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
        cfg.data_dir = copy.clone();
        match meshsign_server::state::SiteState::open(cfg, Arc::new(clock.clone())) {
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("audit log cannot be read") {
                    assert!(
                        msg.contains("past seq") && msg.contains("meshsignd recover"),
                        "{msg}"
                    );
                }
                refused.push(msg);
            }
            Ok(state) => {
                let handle = meshsign_server::api::start(Arc::new(state)).await.unwrap();
                // A start reads the newest entries; the rest is read in the background, and
                // what that finds stops the site's writes.
                if let Err(e) = handle.state.audit.read_through().await {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("past seq") && msg.contains("meshsignd recover"),
                        "{msg}"
                    );
                    assert!(handle.state.audit.is_failing());
                    handle.shutdown().await;
                    refused.push(format!("after the start: {msg}"));
                    continue;
                }
                let all = handle
                    .state
                    .audit
                    .all()
                    .unwrap_or_else(|e| panic!("{at}: the site started, then: {e}"));
                for (seq, hash) in &receipts {
                    let e = all.iter().find(|e| e.seq == *seq);
                    assert_eq!(e.map(|e| &e.hash), Some(hash), "{at}: seq {seq}");
                }
                // The transparency log still proves its leaves (a damaged node is recomputed,
                // a damaged leaf written back from its entry): every 9th, to keep it quick.
                let leaves = all
                    .iter()
                    .filter_map(|e| e.tlog.as_ref())
                    .flat_map(|t| (t.index..).zip(t.hashes().unwrap()));
                for (index, leaf) in leaves.step_by(9) {
                    let p = handle.state.audit.prove_transparency(index, &leaf).await;
                    assert!(
                        matches!(p, Ok(Some(_))),
                        "{at}: transparency leaf {index}: {p:?}"
                    );
                }
                handle.shutdown().await;
                intact += 1;
            }
        }
    }
    eprintln!(
        "report: {} of {FLIPS} flips refused, {intact} started intact; {:?}",
        refused.len(),
        refused
            .iter()
            .map(|m| &m[..m.len().min(120)])
            .collect::<Vec<_>>()
    );
}

/// Byte flips in the flipped-store test.
const FLIPS: usize = 60;

/// Issue 23 row 7, engine-neutral: one audit entry in the middle of the log cannot be read (a
/// damaged page the engine's own start did not touch). The start reads the whole log and
/// refuses, naming where the readable log ends — before, the site started writable and only a
/// full export found the damage.
#[tokio::test]
async fn an_unreadable_audit_page_refuses_the_start_naming_the_seq() {
    let site = TestSite::start().await;
    let (_k, _r, mut s) = site.enrolled("production").await;
    let mut last = 0;
    for i in 0..20 {
        last = s
            .sign(sign_req("release", i))
            .await
            .unwrap()
            .into_inner()
            .audit_seq;
    }
    drop(s);
    let TestSite {
        dir,
        handle,
        clock,
        site_toml,
        ..
    } = site;
    handle.shutdown().await;
    let damaged = last - 10;
    let cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
    let kv = meshsign_tests::UnreadableEntryKv::new(
        meshsign_server::store::SledKv::open(&cfg.data_dir).unwrap(),
        damaged,
    );
    let e = meshsign_server::state::SiteState::open_with(
        cfg,
        Arc::new(clock.clone()),
        meshsign_server::audit::AuditSettings::default(),
        Some(Arc::new(kv)),
    )
    .expect_err("a start on an unreadable audit page is refused");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("cannot be read past seq {}", damaged - 1))
            && msg.contains("Read corrupted data")
            && msg.contains("meshsignd recover"),
        "{msg}"
    );
    drop(dir);
}

/// Issue 30 (start-up flat in the log's size) meeting issue 23 row 7: a start reads only the
/// newest entries before it serves, and the whole log in the background. An unreadable entry
/// older than that lets the site start; the background read then finds it, names where the
/// readable log ends, and from then on every audited call — a Sign among them — is refused and
/// the site reports itself not ready. Without the background read the site would sign on over
/// a damaged log; without the bounded start, a start reads every entry (O(n)). The checkpoint
/// the writer begins at the start (the tail was left unsigned) is held in the store until the
/// damage is found, and lands after it: once `read_through` has reported the damage the head
/// does not move (a race CI once lost when the check came before the commit's end).
#[tokio::test]
async fn an_unreadable_old_audit_page_is_found_after_the_start_and_stops_signing() {
    let site = TestSite::start().await;
    let (key, resp, mut s) = site.enrolled("production").await;
    let mut last = 0;
    for i in 0..20 {
        last = s
            .sign(sign_req("release", i))
            .await
            .unwrap()
            .into_inner()
            .audit_seq;
    }
    drop(s);
    let TestSite {
        dir,
        handle,
        clock,
        es,
        rs,
        site_toml,
        ..
    } = site;
    handle.shutdown().await;
    let damaged = 3;
    assert!(last > damaged + 10);
    let cfg = meshsign_server::config::SiteConfig::load(&site_toml).unwrap();
    let kv = meshsign_tests::UnreadableEntryKv::new(
        meshsign_server::store::SledKv::open(&cfg.data_dir).unwrap(),
        damaged,
    )
    .late_writes();
    let settings = meshsign_server::audit::AuditSettings {
        start_check_entries: 5,
        checkpoint_interval: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let state = meshsign_server::state::SiteState::open_with(
        cfg,
        Arc::new(clock.clone()),
        settings,
        Some(Arc::new(kv)),
    )
    .expect("the newest entries read: the site starts");
    let handle = meshsign_server::api::start(Arc::new(state)).await.unwrap();
    let e = handle
        .state
        .audit
        .read_through()
        .await
        .expect_err("the background read finds the damaged entry");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("cannot be read past seq {}", damaged - 1))
            && msg.contains("Read corrupted data")
            && msg.contains("meshsignd recover"),
        "{msg}"
    );
    assert!(
        handle.state.audit.is_failing(),
        "the site reports itself not ready"
    );
    let site = TestSite {
        client: meshsign_tests::client_config(dir.path(), &handle),
        dir,
        handle,
        clock,
        es,
        rs,
        site_toml,
    };
    let head = *site.state().audit.head().borrow();
    let mut s = site.signer_for(&key, &resp).await.unwrap();
    let refused = s
        .sign(sign_req("release", 99))
        .await
        .expect_err("no signature over a damaged log");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().starts_with("audit_unavailable:"),
        "{refused:?}"
    );
    // Nor is a checkpoint made over it: asked for one (as a receipt would), the writer refuses
    // with the same reason; and the periodic checkpoint, due now, writes nothing either.
    let e = site
        .state()
        .audit
        .signed_head_covering(head + 1)
        .await
        .expect_err("no checkpoint over a damaged log");
    assert!(e.to_string().contains("cannot be read past seq"), "{e}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        *site.state().audit.head().borrow(),
        head,
        "nothing was appended"
    );
    site.handle.shutdown().await;
}

/// Each response carries its own entry's stored bytes, as the writer chained them (the
/// response does not encode the entry again): with checkpoints landing in the same writer
/// batches as concurrent signatures, every entry handed back is the one its seq and hash name,
/// and is the leaf the site proves.
#[tokio::test]
async fn responses_carry_their_own_stored_entry_among_checkpoints() {
    let site = TestSite::start_with(SMALL_CHECKPOINTS, None).await;
    let (_k, _r, s) = site.enrolled("staging").await;
    let workers: Vec<_> = (0..48u8)
        .map(|i| {
            let mut s = s.clone();
            tokio::spawn(async move { s.sign(sign_req("release", i)).await.unwrap().into_inner() })
        })
        .collect();
    let mut responses = Vec::new();
    for w in workers {
        responses.push(w.await.unwrap());
    }
    for r in &responses {
        let entry: AuditRecord = serde_json::from_slice(&r.audit_entry).unwrap();
        assert_eq!(entry.seq, r.audit_seq);
        assert_eq!(entry.hash, r.audit_hash);
        assert_eq!(entry.hash, entry.compute_hash(), "entry {}", entry.seq);
        assert_eq!(entry.rpc, "Sign");
        assert_eq!(entry.digest, hex::encode(r.sha256_digest.as_slice()));
    }
    let lines = export(&site, v1::ExportAuditRequest::default()).await;
    let entries: Vec<&AuditRecord> = lines
        .iter()
        .filter_map(|l| match l {
            ExportLine::Entry(e) => Some(&**e),
            ExportLine::Omitted(_) => None,
        })
        .collect();
    for r in &responses {
        let stored = entries
            .iter()
            .find(|e| e.seq == r.audit_seq)
            .expect("every acknowledged entry is exported");
        assert_eq!(serde_json::to_vec(stored).unwrap(), r.audit_entry);
    }
    assert!(
        entries.iter().any(|e| e.checkpoint.is_some()),
        "checkpoints were written among the signatures"
    );
}

/// An export of several pages (512 entries each, the next read while the last is sent) holds
/// every entry once, in order, and verifies; one that starts mid-page holds every entry from
/// there, and one filtered to a job that never signed verifies through its omitted lines.
#[tokio::test]
async fn an_export_of_several_pages_misses_nothing_and_repeats_nothing() {
    exports_across_pages(&TestSite::start().await, 1300, 300).await;
}

/// The same on PostgreSQL, whose export reads pages of 2,048 entries (each a statement, three
/// read ahead on the pool's connections side by side): two full pages and part of a third,
/// and an export that starts inside the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_several_pages_on_postgres_misses_nothing_and_repeats_nothing() {
    let pg = meshsign_certs_dev::postgres::LocalPostgres::start().unwrap();
    let site = TestSite::start_with(&pg.store_section(), None).await;
    exports_across_pages(&site, 4700, 3000).await;
}

/// `signs` signatures (eight at a time), then the exports of
/// [`an_export_of_several_pages_misses_nothing_and_repeats_nothing`], the second from `mid`.
async fn exports_across_pages(site: &TestSite, signs: u16, mid: u64) {
    let key = audit_key(site).await;
    let (_k, _r, s) = site.enrolled("staging").await;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..8u16 {
        let mut s = s.clone();
        set.spawn(async move {
            for i in (t..signs).step_by(8) {
                s.sign(sign_req("release", (i % 251) as u8)).await.unwrap();
            }
        });
    }
    set.join_all().await;
    let head = site.audit().last().unwrap().seq;
    assert!(head > u64::from(signs), "{head} entries");
    for since_seq in [0, mid] {
        let lines = export(
            site,
            v1::ExportAuditRequest {
                since_seq,
                ..Default::default()
            },
        )
        .await;
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq()).collect();
        let first = since_seq.max(1);
        assert!(seqs.len() as u64 > head - first, "{} lines", seqs.len());
        assert!(
            seqs.iter().zip(first..).all(|(s, want)| *s == want),
            "seqs in order from {first}, none twice"
        );
        if since_seq == 0 {
            let report = verify_export(&lines, &key).unwrap();
            assert!(report.last_seq >= head, "{report:?}");
        }
    }
    let omitted = export(
        site,
        v1::ExportAuditRequest {
            job_id: "no-such-job".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(omitted.len() as u64 >= head);
    assert!(verify_export(&omitted, &key).unwrap().last_seq >= head);
    runs_hold_the_same_lines(site, mid).await;
}

/// The bytes of lines one export message holds at most unless one line alone is longer (the
/// site's cap).
const RUN_BYTES: usize = 32 * 1024;

/// Exports of several lines per message (`lines_per_message`, as `meshsign admin audit
/// export` asks) hold the lines of the same export sent one per message, byte for byte and
/// in order — from the start, from `mid`, filtered — no more lines per message than asked,
/// and no more than 32 KiB of them: asked for any number, a page's lines (512 on sled, 2,048
/// on PostgreSQL; of these entries, > 32 KiB) come in more messages than the pages.
async fn runs_hold_the_same_lines(site: &TestSite, mid: u64) {
    for per in [300, u32::MAX] {
        for (since_seq, job_id) in [(0, ""), (mid, ""), (0, "no-such-job")] {
            let req = |lines_per_message| v1::ExportAuditRequest {
                since_seq,
                job_id: job_id.into(),
                lines_per_message,
                ..Default::default()
            };
            let (one_by_one, end) = export_raw(site, req(0)).await;
            assert!(end.is_none(), "{end:?}");
            let (messages, end) = export_messages(site, req(per)).await;
            assert!(end.is_none(), "{end:?}");
            let mut lines = Vec::new();
            for m in &messages {
                let (n, bytes) = (
                    m.lines.len(),
                    m.lines.iter().map(|l| l.len()).sum::<usize>(),
                );
                assert!(m.json.is_empty(), "lines, not one line");
                assert!(n >= 1 && n <= per as usize, "{n} lines (asked ≤ {per})");
                assert!(bytes <= RUN_BYTES || n == 1, "{bytes} bytes in {n} lines");
                lines.extend(
                    meshsign_client::site::admin::export_lines(m)
                        .map(|l| String::from_utf8(l.to_vec()).unwrap()),
                );
            }
            // (The later export may hold entries written after the first one ended.)
            assert!(lines.len() >= one_by_one.len() && !one_by_one.is_empty());
            assert_eq!(
                lines[..one_by_one.len()],
                one_by_one[..],
                "per {per}, from {since_seq}, job {job_id:?}"
            );
            if per == u32::MAX {
                assert!(
                    messages.len() > lines.len().div_ceil(512),
                    "{} messages for {} lines",
                    messages.len(),
                    lines.len()
                );
            }
        }
    }
}

/// An unfiltered export sends each entry as the store holds it (no decoding into a record and
/// encoding again): every line, checkpoints included and across pages, is byte for byte what
/// encoding its record gives — what a filtered export, and the export before, sends.
#[tokio::test]
async fn an_unfiltered_export_sends_each_entry_as_stored() {
    let site = TestSite::start_with(SMALL_CHECKPOINTS, None).await;
    let (_k, _r, mut s) = site.enrolled("staging").await;
    for i in 0..700u16 {
        s.sign(sign_req("release", (i % 251) as u8)).await.unwrap();
    }
    let stored = site.audit();
    assert!(
        stored.iter().any(|r| r.checkpoint.is_some()),
        "checkpoints among them"
    );
    let (lines, end) = export_raw(&site, v1::ExportAuditRequest::default()).await;
    assert!(end.is_none(), "{end:?}");
    assert!(
        lines.len() >= stored.len() && stored.len() > 512,
        "{} lines",
        lines.len()
    );
    for (line, rec) in lines.iter().zip(&stored) {
        assert_eq!(
            line,
            &serde_json::to_string(rec).unwrap(),
            "seq {}",
            rec.seq
        );
    }
    // A filter that keeps everything decodes and encodes each entry: the same lines.
    let (filtered, _) = export_raw(
        &site,
        v1::ExportAuditRequest {
            environment: "staging".into(),
            ..Default::default()
        },
    )
    .await;
    let mut compared = 0;
    for l in filtered.iter().filter(|l| !l.contains("\"omitted\"")) {
        let seq = serde_json::from_str::<AuditRecord>(l).unwrap().seq;
        // (Entries after the first export's end, its own included, are not in `lines`.)
        if let Some(stored) = lines.get(seq as usize - 1) {
            assert_eq!(stored, l, "seq {seq}");
            compared += 1;
        }
    }
    assert!(compared > 512, "{compared} kept lines compared");
}

/// A stored entry that is not an entry — half of its bytes, or the next seq's entry under its
/// key, read back without an error from the engine — stops an unfiltered export there with an
/// internal error: the lines before it are sent, nothing of it or after it.
#[tokio::test]
async fn an_unfiltered_export_stops_at_a_damaged_entry() {
    use meshsign_tests::{Misread, UnreadableEntryKv};
    for how in [Misread::Cut, Misread::Next] {
        let wrap =
            move |kv: meshsign_server::store::SledKv| -> Arc<dyn meshsign_server::store::Kv> {
                Arc::new(UnreadableEntryKv::new(kv, 5).misread(how))
            };
        let site = TestSite::start_with("", Some(&wrap)).await;
        let (_k, _r, mut s) = site.enrolled("staging").await;
        for i in 0..20u8 {
            s.sign(sign_req("release", i)).await.unwrap();
        }
        let (lines, end) = export_raw(&site, v1::ExportAuditRequest::default()).await;
        let end = end.unwrap_or_else(|| panic!("{how:?}: the export ended cleanly"));
        assert_eq!(end.code(), Code::Internal, "{how:?}: {end:?}");
        let seqs: Vec<u64> = lines
            .iter()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().seq)
            .collect();
        assert_eq!(
            seqs,
            vec![1, 2, 3, 4],
            "{how:?}: the lines before the damage, only"
        );
    }
}
