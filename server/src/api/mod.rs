//! Transport: the three listeners, their TLS, the tonic services, and the one place a refusal
//! becomes a `tonic::Status` ([`status`]). The only module that knows tonic.
//!
//! Owns: proto ⇄ typed conversion, turning a peer certificate into a typed caller or operator
//! (once per connection on the sign port), start-up and lifecycle ([`server`]).
//! Must not touch: policy. Every decision is made by a use case (`enroll`, `sign`, `ops`).
//!
//! A request goes down the floors once: listener ([`tls`]) → service ([`enrollment`],
//! [`signer`], [`admin`]) → use case → state → audit/ca/custody → back up with its answer.

pub mod admin;
pub mod connections;
pub mod enrollment;
mod export;
pub mod metrics;
pub mod server;
pub mod shed;
pub mod signer;
pub mod status;
pub mod tls;

use std::sync::Arc;

use meshsign_proto::v1::{
    self, enrollment_server::EnrollmentServer, signer_server::SignerServer,
    verification_server::VerificationServer,
};
use tonic::Request;
use tonic::transport::Server;
use tonic::transport::server::Router;

pub use admin::AdminApi;
pub use enrollment::{EnrollmentApi, VerificationApi};
pub use server::{SiteHandle, StartError, start};
pub use signer::SignerApi;

use crate::model::Refusal as _;
use crate::state::SiteState;

fn ts(unix: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix,
        nanos: 0,
    }
}

fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// The wire form of a minted runner certificate (Enroll and Renew).
fn enroll_response(out: crate::enroll::EnrollOutput) -> v1::EnrollResponse {
    v1::EnrollResponse {
        certificate_chain: out.chain,
        serial: out.serial_hex,
        not_after: Some(ts(out.not_after)),
        granted_ttl_seconds: u32::try_from(out.granted_ttl_seconds).unwrap_or(u32::MAX),
        spiffe_id: out.spiffe_id,
        environment: out.environment,
        region: out.region,
        trusted_issuers: out.trusted_runner_cas,
    }
}

/// Public form of one key version.
fn distrust_list(s: crate::ops::distrust::Stored) -> v1::DistrustList {
    v1::DistrustList {
        version: s.list.version,
        envelope_json: s.envelope_json.into_bytes(),
    }
}

fn verification_key(
    k: &crate::custody::LoadedKey,
    active: bool,
    purposes: &[crate::model::Purpose],
) -> v1::VerificationKey {
    v1::VerificationKey {
        purposes: purposes.iter().map(|p| p.as_str().to_string()).collect(),
        key_id: k.record.key_id(),
        algorithm: k.record.algorithm.as_str().to_string(),
        public_key_der: k.record.public_key_der.clone(),
        certificate_chain: k.record.certificate_chain.clone(),
        created_at: Some(ts(k.record.created_at)),
        active,
    }
}

/// Public form of a runner CA record.
fn runner_ca_info(r: &crate::ca::RunnerCaRecord) -> v1::IssuerInfo {
    let mut info = v1::IssuerInfo {
        id: r.id.clone(),
        environment: r.partition.clone(),
        certificate_der: r.cert_der.clone(),
        created_at: Some(ts(r.created_at)),
        retire_after: r.retire_after.map(ts),
        ..Default::default()
    };
    info.set_state(r.state.as_str());
    info
}

// === routers ===

/// The three ports' routers, and the health statuses they serve.
pub struct Routers {
    /// `grpc.health.v1.Health` statuses, served on every port.
    pub health: tonic_health::server::HealthReporter,
    /// Enrollment + Verification + reflection.
    pub enroll: PortRouter,
    /// Signer + reflection.
    pub sign: PortRouter,
    /// Admin + reflection.
    pub admin: PortRouter,
}

/// One port's router, behind its load shedding.
pub type PortRouter = Router<tower_layer::Stack<shed::ShedLayer, tower_layer::Identity>>;

/// Adds reflection (v1 and v1alpha), listing only the services this port serves. The
/// `google.rpc` error-details types are served too, so a tool that resolves a status detail by
/// reflection (grpcurl) prints the `ErrorInfo` reason of a refusal.
fn with_reflection(
    router: PortRouter,
    services: &[&str],
) -> Result<PortRouter, tonic_reflection::server::Error> {
    let b = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshsign_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    Ok(router
        .add_service(b().build_v1()?)
        .add_service(b().build_v1alpha()?))
}

/// Largest request on the enroll port: a token (at most 16 KiB) and a CSR, with room.
pub const MAX_ENROLL_REQUEST: usize = 64 * 1024;
/// Largest request on the sign port: a SignBatch of 1,000 digests, or CMS attributes, with room.
pub const MAX_SIGN_REQUEST: usize = 256 * 1024;
/// Largest request on the admin port: a key import with its certificate chain, or a JWKS.
pub const MAX_ADMIN_REQUEST: usize = 1024 * 1024;

/// The standard health service's name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The services whose health is reported (besides the overall status, service "").
pub const SERVICES: [&str; 4] = [
    "meshsign.v1.Enrollment",
    "meshsign.v1.Verification",
    "meshsign.v1.Signer",
    "meshsign.v1.Admin",
];

/// A summary-audit record for a refusal made before any caller is known.
fn transport_refusal(
    reason: crate::model::Reason,
    peer: String,
    detail: String,
) -> crate::audit::AuditRecord {
    crate::audit::AuditRecord {
        rpc: "Connect".into(),
        decision: "deny".into(),
        reason: reason.as_str().into(),
        environment: "(site)".into(),
        peer,
        detail,
        ..Default::default()
    }
}

/// Counts a refused connection or handshake on `state`'s summaries.
pub(crate) fn count_refusal(
    state: &SiteState,
    reason: crate::model::Reason,
    peer: String,
    detail: String,
) {
    state
        .summaries
        .count(transport_refusal(reason, peer, detail), state.clock.unix());
}

/// Builds the routers for a site, under `[limits]`: each port takes requests no larger than
/// its RPCs need, at most `max_streams_per_connection` streams per connection and
/// `max_requests_in_flight` requests at once (beyond: `RESOURCE_EXHAUSTED`), asks connections
/// older than `max_connection_age_seconds` to go away (HTTP/2 GOAWAY, then
/// `connection_age_grace_seconds` to finish), and cancels an enroll- or sign-port request after
/// `request_timeout_seconds`.
pub fn routers(state: Arc<SiteState>) -> Result<Routers, tonic_reflection::server::Error> {
    use std::time::Duration;
    let limits = state.config().limits;
    let server = |port: &'static str| {
        let counted = state.clone();
        let on_shed: shed::OnShed = Arc::new(move |refusal, peer| {
            count_refusal(
                &counted,
                refusal.reason(),
                peer.map(|p| p.to_string()).unwrap_or_default(),
                refusal.to_string(),
            )
        });
        Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .max_connection_age(Duration::from_secs(limits.max_connection_age_seconds))
            .max_connection_age_grace(Duration::from_secs(limits.connection_age_grace_seconds))
            .layer(shed::ShedLayer::new(
                port,
                limits.max_requests_in_flight,
                on_shed,
                state.metrics.clone(),
            ))
    };
    let timeout = Duration::from_secs(limits.request_timeout_seconds);
    // Health on every port (an operator probes the port it cares about); SERVING once the site
    // is up, NOT_SERVING while decisions cannot be recorded (see `server::watch_health`).
    let (health, health_service) = tonic_health::server::health_reporter();
    let enroll = server("enroll")
        .timeout(timeout)
        .add_service(health_service.clone())
        .add_service(
            EnrollmentServer::new(EnrollmentApi(state.clone()))
                .max_decoding_message_size(MAX_ENROLL_REQUEST),
        )
        .add_service(
            VerificationServer::new(VerificationApi(state.clone()))
                .max_decoding_message_size(MAX_ENROLL_REQUEST),
        );
    let enroll = with_reflection(
        enroll,
        &["meshsign.v1.Enrollment", "meshsign.v1.Verification"],
    )?;
    let sign = server("sign")
        .timeout(timeout)
        .add_service(health_service.clone())
        .add_service(
            SignerServer::new(SignerApi::new(state.clone()))
                .max_decoding_message_size(MAX_SIGN_REQUEST),
        );
    let sign = with_reflection(sign, &["meshsign.v1.Signer"])?;
    // No request timeout on the admin port: `audit export --follow` streams for as long as
    // the operator watches.
    let admin = server("admin").add_service(health_service).add_service(
        v1::admin_server::AdminServer::new(AdminApi(state.clone()))
            .max_decoding_message_size(MAX_ADMIN_REQUEST),
    );
    let admin = with_reflection(admin, &["meshsign.v1.Admin"])?;
    Ok(Routers {
        health,
        enroll,
        sign,
        admin,
    })
}
