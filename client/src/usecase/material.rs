//! `meshsign verification-material`: what anyone may fetch from a site's public Verification
//! service to verify its signatures — a key's versions, the site's audit key, an environment's
//! signed distrust list (checked against the audit key before it is handed on).

use meshsign_proto::v1;
use sigstore_protobuf_specs::dev::sigstore::{common::v1 as common, trustroot::v1 as trustroot};

use crate::site::verification;
use crate::usecase::fleet::{self, Fleet};
use crate::{ClientConfig, ClientError};

/// `meshsign verification-material`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct MaterialArgs {
    /// Environment.
    #[arg(long)]
    pub environment: String,
    /// Key alias.
    #[arg(long, required_unless_present_any = ["audit_key", "distrust_list", "trusted_root"])]
    pub key: Option<String>,
    /// Print the site's audit public key (PEM), which signs checkpoints and distrust lists.
    #[arg(long, conflicts_with = "distrust_list")]
    pub audit_key: bool,
    /// Print the environment's distrust list (a DSSE envelope signed by the audit key, as
    /// `verify --distrust-list` reads it).
    #[arg(long)]
    pub distrust_list: bool,
    /// Print a Sigstore trusted root (`trusted_root.json`, TrustedRoot v0.1) naming the site's
    /// transparency log (its key, log id, base URL and validity), for Sigstore verifiers; the
    /// signing keys go to the verifier by their bundle hints (`<region>/<environment>/<key id>`,
    /// printed with `--key K --output json`).
    #[arg(long, conflicts_with_all = ["distrust_list", "audit_key"])]
    pub trusted_root: bool,
    /// With --trusted-root: one trusted root naming every region's transparency log (each
    /// site of the `[sites]` table in --config), so one verifier checks bundles from any
    /// region. Refused if a site does not answer: a root missing a region would fail that
    /// region's bundles later, far from the cause.
    #[arg(long, requires = "trusted_root")]
    pub fleet: bool,
}

/// What the site gave.
pub enum Material {
    /// Every version of the key, oldest first.
    Keys(Vec<v1::VerificationKey>),
    /// The site's audit key (SPKI DER).
    AuditKey(Vec<u8>),
    /// The distrust list (checked) and its envelope as the site signed it.
    DistrustList(meshsign_evidence::distrust::DistrustList, Vec<u8>),
    /// A Sigstore trusted root (JSON).
    TrustedRoot(serde_json::Value),
}

/// The Sigstore `TrustedRoot` (v0.1, proto3 JSON) of a site's transparency log: the audit key
/// as the log's key (`PKIX_ECDSA_P256_SHA_256`), its log id, and a base URL that contains the
/// log's checkpoint origin (Sigstore verifiers match a checkpoint's signer name against it).
/// Valid from the oldest key version the answer names (no signature of the environment is
/// older), else from the epoch. Built from Sigstore's own types (`sigstore_protobuf_specs`),
/// encoded by their proto3 JSON mapping.
pub fn trusted_root(resp: &v1::GetVerificationMaterialResponse) -> serde_json::Value {
    root_of(vec![tlog(resp)])
}

/// A `TrustedRoot` naming `tlogs` (and no CA, CT log or TSA: every key is pinned).
fn root_of(tlogs: Vec<trustroot::TransparencyLogInstance>) -> serde_json::Value {
    let root = trustroot::TrustedRoot {
        media_type: "application/vnd.dev.sigstore.trustedroot+json;version=0.1".into(),
        tlogs,
        ..Default::default()
    };
    // Plain fields: encoding cannot fail.
    serde_json::to_value(&root).unwrap_or_default()
}

/// A site's transparency log as a `TrustedRoot`'s `tlogs` element.
fn tlog(resp: &v1::GetVerificationMaterialResponse) -> trustroot::TransparencyLogInstance {
    let start = resp
        .keys
        .iter()
        .filter_map(|k| k.created_at.map(|t| t.seconds))
        .min()
        .unwrap_or(0);
    trustroot::TransparencyLogInstance {
        base_url: format!("https://{}", resp.transparency_log_origin),
        hash_algorithm: common::HashAlgorithm::Sha2256 as i32,
        public_key: Some(common::PublicKey {
            raw_bytes: Some(resp.audit_public_key_der.clone()),
            key_details: common::PublicKeyDetails::PkixEcdsaP256Sha256 as i32,
            valid_for: Some(common::TimeRange {
                start: Some(prost_types::Timestamp {
                    seconds: start,
                    nanos: 0,
                }),
                end: None,
            }),
        }),
        log_id: Some(common::LogId {
            key_id: meshsign_evidence::rekor::log_id(&resp.audit_public_key_der).to_vec(),
        }),
        ..Default::default()
    }
}

/// `--trusted-root --fleet`: every site's transparency log in one trusted root, in site order.
/// Refused, naming the sites, if any site does not answer; two sites naming one log (one
/// site listed twice) give one entry.
pub async fn fleet_trusted_root(
    fleet: &Fleet,
    args: &MaterialArgs,
) -> Result<serde_json::Value, ClientError> {
    let environment = args.environment.clone();
    let key = args.key.clone().unwrap_or_default();
    let results = fleet
        .each(|cfg| {
            let (environment, key) = (environment.clone(), key.clone());
            async move {
                let mut v = verification::client(&cfg).await?;
                verification::material(&mut v, &environment, &key).await
            }
        })
        .await;
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(name, _)| name.clone())
        .collect();
    if !failed.is_empty() {
        return Err(fleet::failure(&failed, &results));
    }
    let mut tlogs: Vec<trustroot::TransparencyLogInstance> = Vec::new();
    for (_, resp) in results {
        let one = tlog(&resp?);
        if !tlogs.iter().any(|t| t.log_id == one.log_id) {
            tlogs.push(one);
        }
    }
    Ok(root_of(tlogs))
}

/// Fetches what `args` asks for.
pub async fn fetch(cfg: &ClientConfig, args: &MaterialArgs) -> Result<Material, ClientError> {
    let mut v = verification::client(cfg).await?;
    let key = args.key.as_deref().unwrap_or_default();
    let resp = verification::material(&mut v, &args.environment, key).await?;
    if args.distrust_list {
        // Every answer names the audit key (without --key, only the audit key).
        let spki = resp.audit_public_key_der;
        let (list, envelope) =
            verification::distrust_list(&mut v, &args.environment, &spki).await?;
        return Ok(Material::DistrustList(list, envelope));
    }
    if args.audit_key {
        return Ok(Material::AuditKey(resp.audit_public_key_der));
    }
    if args.trusted_root {
        return Ok(Material::TrustedRoot(trusted_root(&resp)));
    }
    Ok(Material::Keys(resp.keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trusted_root_is_sigstores_json_with_the_log_id_of_the_audit_key() {
        let spki = vec![0x30, 0x59, 1, 2, 3];
        let resp = v1::GetVerificationMaterialResponse {
            audit_public_key_der: spki.clone(),
            transparency_log_origin: "example.org/sg/log".into(),
            ..Default::default()
        };
        let root = trusted_root(&resp);
        assert_eq!(
            root["mediaType"],
            "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
        );
        let t = &root["tlogs"][0];
        assert_eq!(t["baseUrl"], "https://example.org/sg/log");
        assert_eq!(t["hashAlgorithm"], "SHA2_256");
        assert_eq!(t["publicKey"]["keyDetails"], "PKIX_ECDSA_P256_SHA_256");
        assert_eq!(t["publicKey"]["validFor"]["start"], "1970-01-01T00:00:00Z");
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(t["publicKey"]["rawBytes"], b64.encode(&spki));
        assert_eq!(
            t["logId"]["keyId"],
            b64.encode(meshsign_evidence::rekor::log_id(&spki))
        );
    }
}
