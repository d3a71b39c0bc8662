//! What offline verifiers check, fetched from a site's public Verification service (enroll
//! port, server-authenticated TLS): receipts — an audit entry's inclusion proof to a checkpoint
//! signed by the audit key — the audit key itself, and distrust lists.
//!
//! Everything fetched here is also checked here against the audit key the same site names, so
//! a bundle never carries a receipt that does not verify.

use meshsign_evidence::receipt::Receipt;
use meshsign_proto::v1::{self, verification_client::VerificationClient};
use tonic::transport::Channel;

use crate::{ClientConfig, ClientError, transport};

/// A Verification client on the config's enroll endpoint.
pub async fn client(cfg: &ClientConfig) -> Result<VerificationClient<Channel>, ClientError> {
    let tls = transport::tls_config(transport::roots(cfg)?, None)?;
    let ch = transport::connect_to(cfg, &cfg.enroll_endpoint, tls).await?;
    Ok(VerificationClient::new(ch))
}

/// A key's verification material, with the site's audit key.
pub async fn material(
    v: &mut VerificationClient<Channel>,
    environment: &str,
    alias: &str,
) -> Result<v1::GetVerificationMaterialResponse, ClientError> {
    Ok(
        v.get_verification_material(v1::GetVerificationMaterialRequest {
            environment: environment.to_string(),
            key_alias: alias.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetVerificationMaterial", s))?
        .into_inner(),
    )
}

/// The receipt of audit entry `seq` whose stored bytes `entry` the site returned to this
/// caller with its signature (the Verification service proves inclusion by the entry's leaf
/// hash and never serves contents), checked against `audit_spki` (the site's audit key) before
/// it is returned.
pub async fn receipt(
    v: &mut VerificationClient<Channel>,
    seq: u64,
    entry: &[u8],
    audit_spki: &[u8],
) -> Result<Receipt, ClientError> {
    use base64::Engine as _;
    if entry.is_empty() {
        return Err(ClientError::Crypto(format!(
            "the site returned no audit entry with its signature (seq {seq}): it predates \
             receipts by leaf hash; upgrade the site"
        )));
    }
    let p = v
        .get_inclusion_proof(v1::GetInclusionProofRequest {
            seq,
            leaf_hash: meshsign_evidence::merkle::leaf_hash(entry).to_vec(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetInclusionProof", s))?
        .into_inner();
    let receipt = Receipt {
        log_index: p.log_index,
        tree_size: p.tree_size,
        hashes: p.hashes.iter().map(hex::encode).collect(),
        checkpoint: p.checkpoint,
        entry: base64::engine::general_purpose::STANDARD.encode(entry),
    };
    let key = crate::verify::audit_key_from_der(audit_spki)?;
    let got = receipt
        .verify(&key, None)
        .map_err(|e| ClientError::Crypto(format!("the site's receipt does not verify: {e}")))?;
    if got.seq != seq {
        return Err(ClientError::Crypto(format!(
            "the site returned a receipt for another entry ({} instead of {seq})",
            got.seq
        )));
    }
    Ok(receipt)
}

/// An environment's signed distrust list (envelope JSON), checked against the audit key.
pub async fn distrust_list(
    v: &mut VerificationClient<Channel>,
    environment: &str,
    audit_spki: &[u8],
) -> Result<(meshsign_evidence::distrust::DistrustList, Vec<u8>), ClientError> {
    let r = v
        .get_distrust_list(v1::GetDistrustListRequest {
            environment: environment.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("GetDistrustList", s))?
        .into_inner();
    let key = crate::verify::audit_key_from_der(audit_spki)?;
    let list = crate::verify::open_distrust_list(&r.envelope_json, &key)
        .map_err(|e| ClientError::Crypto(format!("the site's distrust list: {e}")))?;
    Ok((list, r.envelope_json))
}
