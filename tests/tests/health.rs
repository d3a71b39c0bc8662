//! `grpc.health.v1.Health` on every port (issue 15): SERVING while decisions can be recorded,
//! NOT_SERVING while the audit log cannot be written, back by itself when the store is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshsign_tests::{FaultyKv, TestSite, sign_req};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn status(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_for(site: &TestSite, want: ServingStatus) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let now = status(site.enroll_channel().await, "").await;
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {now:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_is_served_on_every_port_and_follows_the_audit_log() {
    let fail = Arc::new(AtomicBool::new(false));
    let f = fail.clone();
    let wrap =
        move |kv| -> Arc<dyn meshsign_server::store::Kv> { Arc::new(FaultyKv::new(kv, f.clone())) };
    let site = TestSite::start_with("", Some(&wrap)).await;
    wait_for(&site, ServingStatus::Serving).await;
    // Every port answers, for the overall status and for its services.
    let (key, resp, mut signer) = site.enrolled("production").await;
    let sign_channel = meshsign_client::transport::connect(
        &site.client.sign_endpoint,
        "localhost",
        meshsign_client::transport::tls_config(
            meshsign_client::transport::roots(&site.client).unwrap(),
            Some(key.identity(&resp)),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        status(sign_channel, "meshsign.v1.Signer").await,
        ServingStatus::Serving
    );
    assert_eq!(
        status(site.enroll_channel().await, "meshsign.v1.Enrollment").await,
        ServingStatus::Serving
    );

    // The store stops taking writes: the next decision fails, health says so.
    fail.store(true, Ordering::SeqCst);
    assert!(signer.sign(sign_req("release", 1)).await.is_err());
    let took = wait_for(&site, ServingStatus::NotServing).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Writes work again: the site repairs itself and serves.
    fail.store(false, Ordering::SeqCst);
    wait_for(&site, ServingStatus::Serving).await;
    signer.sign(sign_req("release", 2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_reports_not_serving_while_postgresql_is_down() {
    let pg = meshsign_certs_dev::postgres::LocalPostgres::start().unwrap();
    let site = TestSite::start_with(
        &format!("\n[store]\nengine = \"postgres\"\nurl = \"{}\"\n", pg.url()),
        None,
    )
    .await;
    wait_for(&site, ServingStatus::Serving).await;
    pg.stop().unwrap();
    wait_for(&site, ServingStatus::NotServing).await;
    pg.start_again().unwrap();
    wait_for(&site, ServingStatus::Serving).await;
}
