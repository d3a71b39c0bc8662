//! Issue 23 rows 1–2: a SoftHSM2 token holding the audit key, the runner CA and a signing key
//! is moved away and back 20 times under signing and enrollment load. Every acknowledged
//! signature verifies under its own key's recorded public key, every certificate under the
//! runner CA's, the audit log (checkpoints signed in the token) verifies end to end, the
//! process does not crash, and while the token is away Sign and Enroll are refused
//! `UNAVAILABLE key_unavailable`.
//!
//! Before the fix, object handles cached across a re-initialisation of the library let a
//! returning token sign a runner's digest with the runner CA's or the audit key.
//!
//! As `hsm.rs`, the body runs in a child process with its own token
//! ([`meshsign_tests::in_softhsm_child`]).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshsign_certs_dev::softhsm::MODULE;
use meshsign_client::session::RunnerKey;
use meshsign_proto::v1::{self, sign_request::Input};
use meshsign_tests::TestSite;
use tonic::Code;
use x509_parser::prelude::*;

const LABEL: &str = "meshsign-faults";
const TEST: &str = "a_token_moved_away_and_back_under_load_never_signs_with_another_key";

fn config(pin: &std::path::Path) -> String {
    format!(
        r#"
[[environments.signing_keys]]
alias = "hsm"
algorithm = "ecdsa-p256-sha256"
backend = "pkcs11"
access = {{ repositories = ["*"], refs = ["*"] }}

[pkcs11]
module = "{MODULE}"
token_label = "{LABEL}"
pin_file = "{}"
sessions = 4
audit_key = true
runner_cas = true

[audit]
checkpoint_every = 7

[limits]
enroll_per_source_per_second = 1000
enroll_per_source_burst = 100000
"#,
        pin.display()
    )
}

/// What the load has seen since the fault loop last asked: a success, a refusal. Load tasks
/// report; the fault loop waits for the one it needs (at most 30 s).
#[derive(Default)]
struct Seen {
    ok: std::sync::atomic::AtomicUsize,
    refused: AtomicBool,
    changed: tokio::sync::Notify,
    /// Woken when the token is back, so refused requests do not spin meanwhile.
    back: tokio::sync::Notify,
}

impl Seen {
    fn ok(&self) {
        self.ok.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Reports a refusal, then waits for the token to be put back (or 50 ms, whichever comes
    /// first: a refusal right after it came back must not stall the load).
    async fn refused(&self) {
        self.refused.store(true, Ordering::SeqCst);
        self.changed.notify_one();
        let _ = tokio::time::timeout(Duration::from_millis(50), self.back.notified()).await;
    }

    async fn until(&self, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while !done() {
                self.changed.notified().await;
            }
        })
        .await
        .expect("the load saw the state it waits for");
    }

    /// Waits for `n` more successes.
    async fn until_ok(&self, n: usize) {
        let want = self.ok.load(Ordering::SeqCst) + n;
        self.until(|| self.ok.load(Ordering::SeqCst) >= want).await;
    }

    async fn until_refused(&self) {
        self.refused.store(false, Ordering::SeqCst);
        self.until(|| self.refused.load(Ordering::SeqCst)).await;
        self.back.notify_waiters();
    }
}

/// A refusal while the token is away must be exactly this.
fn key_unavailable(e: &tonic::Status) -> bool {
    e.code() == Code::Unavailable && e.message().starts_with("key_unavailable: ")
        || e.message().starts_with("audit_unavailable: ")
}

#[test]
fn a_token_moved_away_and_back_under_load_never_signs_with_another_key() {
    let Some(hsm_dir) = meshsign_tests::in_softhsm_child(TEST, LABEL) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(body(hsm_dir.clone()));
    drop(rt);
    meshsign_tests::softhsm_child_done(&hsm_dir);
}

async fn body(hsm_dir: PathBuf) {
    let site = Arc::new(TestSite::start_with(&config(&hsm_dir.join("pin")), None).await);
    let (_k, first, mut signer) = site.enrolled("production").await;
    // The keys as recorded before any fault: the signing key's, the runner CA's.
    let key_spki = signer
        .sign(v1::SignRequest {
            key_alias: "hsm".into(),
            input: Some(Input::Sha256Digest(vec![7; 32])),
            artifact_name: "first".into(),
            algorithm: "ecdsa-p256-sha256".into(),
            signed_entry_timestamp: false,
        })
        .await
        .unwrap()
        .into_inner()
        .public_key_der;
    let ca_der = first.certificate_chain[1].clone();
    let ca_spki = X509Certificate::from_der(&ca_der)
        .unwrap()
        .1
        .tbs_certificate
        .subject_pki
        .raw
        .to_vec();

    let stop = Arc::new(AtomicBool::new(false));
    // What the load saw so far, for the fault loop to wait on (no fixed sleeps).
    let seen = Arc::new(Seen::default());
    let mut load = Vec::new();
    // Three signers: every acknowledged (digest, response) is kept.
    for t in 0..3u8 {
        let mut signer = signer.clone();
        let (stop, seen) = (stop.clone(), seen.clone());
        load.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0usize);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut digest = [t; 32];
                digest[..4].copy_from_slice(&i.to_be_bytes());
                match signer
                    .sign(v1::SignRequest {
                        key_alias: "hsm".into(),
                        input: Some(Input::Sha256Digest(digest.to_vec())),
                        artifact_name: format!("a{t}-{i}"),
                        algorithm: "ecdsa-p256-sha256".into(),
                        signed_entry_timestamp: false,
                    })
                    .await
                {
                    Ok(r) => {
                        acked.push((digest, r.into_inner()));
                        seen.ok();
                    }
                    Err(e) => {
                        assert!(key_unavailable(&e), "{e:?}");
                        refused += 1;
                        seen.refused().await;
                    }
                }
            }
            (acked, refused, Vec::new())
        }));
    }
    // One enroller: every certificate issued is kept.
    {
        let site = site.clone();
        let (stop, seen) = (stop.clone(), seen.clone());
        load.push(tokio::spawn(async move {
            let (mut certs, mut refused) = (Vec::new(), 0usize);
            let mut client = site.enrollment().await;
            while !stop.load(Ordering::Relaxed) {
                let key = RunnerKey::generate().unwrap();
                let req = site.enroll_request("production", site.token("production"), &key);
                match client.enroll(req).await {
                    Ok(r) => {
                        certs.push(r.into_inner().certificate_chain[0].clone());
                        seen.ok();
                    }
                    Err(e) => {
                        assert!(key_unavailable(&e), "{e:?}");
                        refused += 1;
                        seen.refused().await;
                    }
                }
            }
            (Vec::new(), refused, certs)
        }));
    }

    let tokens = hsm_dir.join("tokens");
    let away = hsm_dir.join("tokens.away");
    // Each cycle: the token goes while requests are served, stays until one is refused, comes
    // back, and stays until one succeeds again.
    for _ in 0..20 {
        seen.until_ok(40).await;
        std::fs::rename(&tokens, &away).unwrap();
        seen.until_refused().await;
        std::fs::rename(&away, &tokens).unwrap();
    }
    seen.until_ok(40).await;
    stop.store(true, Ordering::Relaxed);

    let (mut acked, mut refused, mut certs) = (Vec::new(), 0, Vec::new());
    for h in load {
        let (a, r, c) = h.await.unwrap();
        acked.extend(a);
        refused += r;
        certs.extend(c);
    }
    println!(
        "report: acknowledged signatures {}, certificates {}, refusals {refused}",
        acked.len(),
        certs.len()
    );
    assert!(acked.len() > 50 && !certs.is_empty(), "the load ran");
    assert!(refused > 0, "the token was away at least once under load");

    // Every acknowledged signature is the signing key's, over the digest asked for.
    for (digest, r) in &acked {
        assert_eq!(r.public_key_der, key_spki, "{}", r.key_id);
        assert_eq!(r.key_id, "hsm@v1");
        meshsign_evidence::sig::verify_digest("ecdsa-p256-sha256", &key_spki, digest, &r.signature)
            .unwrap_or_else(|e| panic!("seq {}: {e}", r.audit_seq));
        assert!(
            meshsign_evidence::sig::verify_digest(
                "ecdsa-p256-sha256",
                &ca_spki,
                digest,
                &r.signature
            )
            .is_err()
        );
    }
    // Every certificate is signed by the runner CA's key.
    for der in &certs {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        meshsign_evidence::sig::verify_message(
            "ecdsa-p256-sha256",
            &ca_spki,
            cert.tbs_certificate.as_ref(),
            &cert.signature_value.data,
        )
        .unwrap();
    }

    // Signing works again, and the audit log — its checkpoints signed in the token — verifies
    // from genesis under the audit key.
    signer
        .sign(v1::SignRequest {
            key_alias: "hsm".into(),
            input: Some(Input::Sha256Digest(vec![9; 32])),
            artifact_name: "after".into(),
            algorithm: "ecdsa-p256-sha256".into(),
            signed_entry_timestamp: false,
        })
        .await
        .expect("signing works once the token is back");
    let lines = meshsign_tests::export(&site, v1::ExportAuditRequest::default()).await;
    let report =
        meshsign_evidence::audit::verify_export(&lines, &meshsign_tests::audit_key(&site).await)
            .unwrap();
    assert!(report.checkpoints > 5, "{report:?}");
    // Every acknowledged signature is in the log under its seq and hash.
    for (_, r) in &acked {
        let e = lines
            .iter()
            .find_map(|l| match l {
                meshsign_evidence::audit::ExportLine::Entry(e) if e.seq == r.audit_seq => Some(e),
                _ => None,
            })
            .unwrap_or_else(|| panic!("seq {} in the log", r.audit_seq));
        assert_eq!(e.hash, r.audit_hash, "seq {}", r.audit_seq);
    }
    // The key's objects replaced in the token by another key under the same CKA_ID and label
    // (what a stale handle or a re-provisioned token amounts to): the site refuses to sign
    // with it — never returns a signature under a key other than the recorded one.
    replace_key_in_token("meshsign production/hsm@v1");
    let mut refusal = None;
    for i in 0..3u8 {
        match signer
            .sign(v1::SignRequest {
                key_alias: "hsm".into(),
                input: Some(Input::Sha256Digest(vec![i; 32])),
                artifact_name: "swapped".into(),
                algorithm: "ecdsa-p256-sha256".into(),
                signed_entry_timestamp: false,
            })
            .await
        {
            Ok(r) => panic!(
                "signed with a key the site did not record: {}",
                r.into_inner().key_id
            ),
            Err(e) => refusal = Some(e),
        }
    }
    let e = refusal.unwrap();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().starts_with("key_unavailable: "), "{e:?}");
    assert!(e.message().contains("recorded public key"), "{e:?}");
    let last = site.last_audit();
    assert_eq!(
        (last.rpc.as_str(), last.reason.as_str()),
        ("Sign", "key_unavailable")
    );
    drop(signer);
    let site = Arc::try_unwrap(site).ok().expect("the load is over");
    site.handle.shutdown().await;
}

/// Deletes the key pair labelled `label` from the token and generates another P-256 pair with
/// the same CKA_ID and label (through cryptoki, as an operator's tool would).
fn replace_key_in_token(label: &str) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType};
    use cryptoki::session::UserType;
    let ctx = Pkcs11::new(MODULE).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == LABEL)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    let _ = s.login(UserType::User, Some(&"1234".to_string().into()));
    let objects = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(objects.len(), 2, "the key pair");
    let id = match &s.get_attributes(objects[0], &[AttributeType::Id]).unwrap()[..] {
        [Attribute::Id(id)] => id.clone(),
        other => panic!("{other:?}"),
    };
    for o in objects {
        s.destroy_object(o).unwrap();
    }
    let common = vec![
        Attribute::Token(true),
        Attribute::Id(id),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mut public = common.clone();
    public.extend([
        Attribute::Verify(true),
        Attribute::EcParams(vec![
            0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ]),
    ]);
    let mut private = common;
    private.extend([Attribute::Private(true), Attribute::Sign(true)]);
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .unwrap();
}
