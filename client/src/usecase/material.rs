//! `meshsign verification-material`: what anyone may fetch from a site's public Verification
//! service to verify its signatures — a key's versions, the site's audit key, an environment's
//! signed distrust list (checked against the audit key before it is handed on).

use meshsign_proto::v1;

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
/// older), else from the epoch.
pub fn trusted_root(resp: &v1::GetVerificationMaterialResponse) -> serde_json::Value {
    root_of(vec![tlog(resp)])
}

/// A `TrustedRoot` naming `tlogs` (and no CA, CT log or TSA: every key is pinned).
fn root_of(tlogs: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": tlogs,
        "certificateAuthorities": [],
        "ctlogs": [],
        "timestampAuthorities": [],
    })
}

/// A site's transparency log as a `TrustedRoot`'s `tlogs` element.
fn tlog(resp: &v1::GetVerificationMaterialResponse) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let start = resp
        .keys
        .iter()
        .filter_map(|k| k.created_at.map(|t| t.seconds))
        .min()
        .unwrap_or(0);
    serde_json::json!({
        "baseUrl": format!("https://{}", resp.transparency_log_origin),
        "hashAlgorithm": "SHA2_256",
        "publicKey": {
            "rawBytes": b64.encode(&resp.audit_public_key_der),
            "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": { "start": meshsign_evidence::attest::rfc3339(start) },
        },
        "logId": { "keyId": b64.encode(meshsign_evidence::rekor::log_id(&resp.audit_public_key_der)) },
    })
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
    let mut tlogs: Vec<serde_json::Value> = Vec::new();
    for (_, resp) in results {
        let one = tlog(&resp?);
        if !tlogs.iter().any(|t| t["logId"] == one["logId"]) {
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
