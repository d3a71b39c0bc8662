//! meshsign's contract: the gRPC types and services and their compatibility shims. The
//! evidence formats both sides share (identity, the audit log, receipts, statements) are in
//! `meshsign-evidence`, which needs no transport.
//!
//! - [`v1`]: the generated gRPC types and services (package `meshsign.v1`).
//! - [`compat`]: words for enums, kept in both forms for older clients.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

pub mod compat;

/// Generated code for package `meshsign.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("meshsign.v1");
}

impl std::fmt::Debug for v1::EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"[redacted]")
            .field("runner_fingerprint", &self.runner_fingerprint)
            .field("region", &self.region)
            .field("environment", &self.environment)
            .field("requested_ttl_seconds", &self.requested_ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for v1::ImportKeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportKeyRequest")
            .field("environment", &self.environment)
            .field("alias", &self.alias)
            .field("pkcs8_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meshsign_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn secret_bearing_messages_redact_in_debug() {
        let e = super::v1::EnrollRequest {
            token: "eyJ.secret.token".into(),
            ..Default::default()
        };
        assert!(!format!("{e:?}").contains("secret"));
        let k = super::v1::ImportKeyRequest {
            pkcs8_pem: concat!("-----BEGIN ", "PRIVATE KEY-----")
                .as_bytes()
                .to_vec(),
            ..Default::default()
        };
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }
}
