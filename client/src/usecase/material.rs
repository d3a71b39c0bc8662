//! `meshsign verification-material`: what anyone may fetch from a site's public Verification
//! service to verify its signatures — a key's versions, the site's audit key, an environment's
//! signed distrust list (checked against the audit key before it is handed on).

use meshsign_proto::v1;

use crate::site::verification;
use crate::{ClientConfig, ClientError};

/// `meshsign verification-material`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct MaterialArgs {
    /// Environment.
    #[arg(long)]
    pub environment: String,
    /// Key alias.
    #[arg(long, required_unless_present_any = ["audit_key", "distrust_list"])]
    pub key: Option<String>,
    /// Print the site's audit public key (PEM), which signs checkpoints and distrust lists.
    #[arg(long, conflicts_with = "distrust_list")]
    pub audit_key: bool,
    /// Print the environment's distrust list (a DSSE envelope signed by the audit key, as
    /// `verify --distrust-list` reads it).
    #[arg(long)]
    pub distrust_list: bool,
}

/// What the site gave.
pub enum Material {
    /// Every version of the key, oldest first.
    Keys(Vec<v1::VerificationKey>),
    /// The site's audit key (SPKI DER).
    AuditKey(Vec<u8>),
    /// The distrust list (checked) and its envelope as the site signed it.
    DistrustList(meshsign_evidence::distrust::DistrustList, Vec<u8>),
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
    Ok(Material::Keys(resp.keys))
}
