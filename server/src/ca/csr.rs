//! A runner's PKCS#10 CSR (enrollment step 7, and renewal). Only its key is used, after its
//! signature verifies.
//!
//! Owns: CSR parsing and checking. Must not touch: anything else in the request.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use x509_parser::prelude::*;

/// Why a CSR was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    /// It does not parse, or its signature does not verify.
    #[error("{0}")]
    Invalid(String),
    /// Its key is not P-256.
    #[error("only P-256 keys are accepted")]
    NotP256,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// Parses a PKCS#10 CSR, requires a P-256 key and ecdsa-with-SHA256, verifies its signature, and
/// returns the SPKI DER. Nothing else in the CSR is used.
pub fn verify_csr(der: &[u8]) -> Result<Vec<u8>, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Invalid(format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Invalid("trailing bytes".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm.to_id_string() == OID_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|o| o.to_id_string() == OID_P256);
    if !is_p256 {
        return Err(CsrError::NotP256);
    }
    if csr.signature_algorithm.algorithm.to_id_string() != OID_ECDSA_SHA256 {
        return Err(CsrError::Invalid(
            "signature algorithm must be ecdsa-with-SHA256".into(),
        ));
    }
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.as_ref(),
    )
    .verify(
        csr.certification_request_info.raw,
        csr.signature_value.data.as_ref(),
    )
    .map_err(|_| CsrError::Invalid("signature does not verify".into()))?;
    Ok(spki.raw.to_vec())
}
