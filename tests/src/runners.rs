//! Helpers of the runner-registry tests (issue 28): a site that accepts registered runners
//! only, device keys made by the client's `runner init` code, proofs built as the client
//! builds them, and the refusal check (status, message, audit entry).

use meshsign_client::device::{DeviceKey, InitOptions};
use meshsign_client::session::RunnerKey;
use meshsign_evidence::device::{Backend, EnrollTranscript};
use meshsign_evidence::identity::JobClaims;
use meshsign_proto::v1;
use tonic::Code;

use crate::{TestSite, in_environment};

/// A site whose production environment accepts registered runners only (`backends`: its
/// `runner_backends` line, if any); staging stays `claimed`.
pub async fn registered_site(backends: Option<&str>) -> TestSite {
    let lines = format!(
        "runners = \"registered\"\n{}",
        backends.map_or(String::new(), |b| format!("runner_backends = {b}"))
    );
    TestSite::start_edited(
        &move |t: String| in_environment(&t, "production", &lines),
        None,
        meshsign_server::audit::AuditSettings::default(),
    )
    .await
}

/// A file-backed device key in `dir` and its signed registration request (JSON).
pub fn device(dir: &std::path::Path, instance: &str) -> (DeviceKey, Vec<u8>) {
    let (key, signed) = DeviceKey::init(&InitOptions {
        backend: Backend::File,
        dir: dir.join(instance),
        instance: instance.into(),
        pkcs11: None,
        tpm: None,
    })
    .unwrap();
    (key, serde_json::to_vec(&signed).unwrap())
}

/// Registers a signed request at `site` (for `environments`; empty: all).
pub async fn register(
    site: &TestSite,
    request: &[u8],
    environments: &[&str],
) -> Result<v1::RunnerInfo, tonic::Status> {
    site.admin()
        .await
        .register_runner(v1::RegisterRunnerRequest {
            request: request.to_vec(),
            environments: environments.iter().map(|e| e.to_string()).collect(),
            labels: vec!["pool-a".into()],
        })
        .await
        .map(|r| r.into_inner())
}

/// The device key's proof for `token` and the CSR key `csr_key`, as the client makes it.
pub fn proof(device: &DeviceKey, token: &str, csr_key: &RunnerKey, env: &str) -> v1::DeviceProof {
    let facts = meshsign_client::session::token::facts(token).unwrap();
    let spki = csr_key.spki_der();
    let t = EnrollTranscript {
        audience: &facts.audience,
        jti: &facts.jti,
        exp: facts.exp,
        csr_spki_der: &spki,
        region: crate::REGION,
        environment: env,
    };
    v1::DeviceProof {
        spki: device.spki().to_vec(),
        signature: device.sign(&t.bytes().unwrap()).unwrap(),
    }
}

/// An enroll request in production with a fresh token, `key`'s CSR and `proof`.
pub fn request(
    site: &TestSite,
    key: &RunnerKey,
    token: String,
    proof: Option<v1::DeviceProof>,
) -> v1::EnrollRequest {
    let mut req = site.enroll_request("production", token, key);
    req.runner_fingerprint = String::new();
    req.device_proof = proof;
    req
}

/// The enrollment is refused with `code` and a message that starts with `reason`, and the
/// audit entry says the same and names `fingerprint`.
pub async fn refused(
    site: &TestSite,
    req: v1::EnrollRequest,
    code: Code,
    reason: &str,
    fingerprint: &str,
) {
    let e = site.enrollment().await.enroll(req).await.unwrap_err();
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(
        e.message().starts_with(&format!("{reason}: ")),
        "{}",
        e.message()
    );
    let last = site.last_audit();
    assert_eq!(last.reason, reason);
    assert_eq!(last.decision, "deny");
    assert_eq!(last.runner_fingerprint, fingerprint);
}

/// The job claims of an enrollment's certificate.
pub fn claims_of(resp: &v1::EnrollResponse) -> JobClaims {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(&resp.certificate_chain[0]).unwrap();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.3.9999.4717.1.1")
        .expect("claims extension");
    JobClaims::from_extension_value(ext.value).unwrap()
}
