//! gRPC server reflection on every port (what `grpcurl ... list` uses), each behind its own TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use meshsign_client::net::{self as transport, ClientIdentity};
use meshsign_tests::TestSite;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn list(
    site: &TestSite,
    endpoint: &str,
    id: Option<ClientIdentity>,
) -> Result<Vec<String>, String> {
    let tls = transport::tls_config(transport::roots(&site.client).unwrap(), id).unwrap();
    let ch = transport::connect(endpoint, "localhost", tls)
        .await
        .map_err(|e| e.to_string())?;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner();
    let resp = stream
        .message()
        .await
        .map_err(|s| format!("{s:?}"))?
        .ok_or("no response")?;
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(format!("unexpected {other:?}")),
    }
}

fn admin_identity(site: &TestSite) -> ClientIdentity {
    let pki = site.dir.path().join("pki");
    ClientIdentity {
        chain: vec![CertificateDer::from_pem_file(pki.join("admin.pem")).unwrap()],
        key: PrivateKeyDer::from_pem_file(pki.join("admin.key.pem")).unwrap(),
    }
}

#[tokio::test]
async fn every_port_lists_its_services() {
    let site = TestSite::start().await;
    let enroll = list(&site, &site.client.enroll_endpoint, None)
        .await
        .unwrap();
    assert!(
        enroll.contains(&"meshsign.v1.Enrollment".to_string()),
        "{enroll:?}"
    );
    assert!(enroll.contains(&"meshsign.v1.Verification".to_string()));
    assert!(
        !enroll.contains(&"meshsign.v1.Signer".to_string()),
        "Signer is only on the sign port"
    );

    let rk = meshsign_client::session::RunnerKey::generate().unwrap();
    let req = site.enroll_request("staging", site.token("staging"), &rk);
    let er = site.enroll_ok(req).await;
    let sign = list(&site, &site.client.sign_endpoint, Some(rk.identity(&er)))
        .await
        .unwrap();
    assert!(sign.contains(&"meshsign.v1.Signer".to_string()), "{sign:?}");

    let admin = list(
        &site,
        &site.client.admin_endpoint,
        Some(admin_identity(&site)),
    )
    .await
    .unwrap();
    assert!(
        admin.contains(&"grpc.reflection.v1.ServerReflection".to_string()),
        "{admin:?}"
    );
    // The admin port refuses a client without the admin CA's certificate.
    assert!(
        list(&site, &site.client.admin_endpoint, None)
            .await
            .is_err()
    );
}
