//! meshsign's contract and the identity wire formats both the site and the client share.
//!
//! - [`v1`]: the generated gRPC types and services (package `meshsign.v1`).
//! - [`identity`]: the SPIFFE ID of a runner certificate and the job-claims extension.
//! - [`files`]: atomic file writes and random ids, for the site and the client alike.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

pub mod attest;
pub mod audit;
pub mod compat;
pub mod der;
pub mod distrust;
pub mod files;
pub mod identity;
pub mod merkle;
pub mod note;
pub mod receipt;
pub mod sig;

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

/// Encodes DER as PEM with the given label (64-column base64 lines).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

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
