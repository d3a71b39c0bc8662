//! Statements anyone can verify: DSSE envelopes (github.com/secure-systems-lab/dsse) carrying
//! in-toto Statements v1 whose predicate the **site** builds from what it verified, and the
//! facts a distrust list matches on.
//!
//! A statement is signed over `PAE(payloadType, payload)` by the site key: P-256 and RSA over
//! SHA-256 of the PAE, P-384 over its SHA-384, Ed25519 over the PAE itself.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// DSSE payload type of in-toto statements.
pub const INTOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// meshsign's own predicate: what the site verified about the job that asked for a signature.
pub const PREDICATE_SIGNING: &str = "https://meshsign.dev/attestation/signing/v1";
/// SLSA provenance v1.
pub const PREDICATE_SLSA: &str = "https://slsa.dev/provenance/v1";
/// DSSE payload type of a signed distrust list.
pub const DISTRUST_PAYLOAD_TYPE: &str = "application/vnd.meshsign.distrust-list.v1+json";
/// The predicate types the site builds.
pub const PREDICATE_TYPES: [&str; 2] = [PREDICATE_SIGNING, PREDICATE_SLSA];

/// A DSSE envelope (JSON form: payload base64, standard alphabet).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 of the payload.
    pub payload: String,
    /// e.g. [`INTOTO_PAYLOAD_TYPE`].
    pub payload_type: String,
    /// Signatures over the PAE.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One DSSE signature.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvelopeSignature {
    /// Key hint: for a statement, the keyid securesystemslib computes for the site key
    /// ([`sslib_keyid`]); for a distrust list, the audit key's id.
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the signature.
    pub sig: String,
}

/// The keyid securesystemslib (and in-toto, sigstore-python's DSSE tooling) computes for a
/// key: SHA-256 (hex) of the OLPC canonical JSON of `{"keytype", "keyval": {"public"},
/// "scheme"}`, where `public` is the PEM SubjectPublicKeyInfo (Ed25519: the raw key, hex).
/// None for an algorithm it has no scheme for.
pub fn sslib_keyid(algorithm: &str, spki_der: &[u8]) -> Option<String> {
    use sha2::Digest as _;
    let pem = || crate::pem_encode("PUBLIC KEY", spki_der);
    let (keytype, scheme, public) = match algorithm {
        "ecdsa-p256-sha256" => ("ecdsa", "ecdsa-sha2-nistp256", pem()),
        "ecdsa-p384-sha384" => ("ecdsa", "ecdsa-sha2-nistp384", pem()),
        "ed25519" => (
            "ed25519",
            "ed25519",
            hex::encode(spki_der.get(spki_der.len().checked_sub(32)?..)?),
        ),
        a if a.starts_with("rsa-") && a.ends_with("-pss-sha256") => {
            ("rsa", "rsassa-pss-sha256", pem())
        }
        a if a.starts_with("rsa-") && a.ends_with("-pkcs1-sha256") => {
            ("rsa", "rsa-pkcs1v15-sha256", pem())
        }
        _ => return None,
    };
    // OLPC canonical JSON: keys sorted, no whitespace, only `\` and `"` escaped (a PEM has
    // neither; its newlines stay raw).
    let canonical = format!(
        r#"{{"keytype":"{keytype}","keyval":{{"public":"{public}"}},"scheme":"{scheme}"}}"#
    );
    Some(hex::encode(sha2::Sha256::digest(canonical.as_bytes())))
}

/// DSSE pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DSSE envelope: {0}")]
pub struct EnvelopeError(pub String);

impl Envelope {
    /// An envelope of `payload` with one signature.
    pub fn new(payload_type: &str, payload: &[u8], keyid: &str, sig: &[u8]) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            payload: b64.encode(payload),
            payload_type: payload_type.to_string(),
            signatures: vec![EnvelopeSignature {
                keyid: keyid.to_string(),
                sig: b64.encode(sig),
            }],
        }
    }

    /// The payload bytes.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map_err(|_| EnvelopeError("payload is not base64".into()))
    }

    /// The PAE the signatures cover.
    pub fn pae(&self) -> Result<Vec<u8>, EnvelopeError> {
        Ok(pae(&self.payload_type, &self.payload_bytes()?))
    }

    /// Each signature's bytes.
    pub fn signature_bytes(&self) -> Vec<Vec<u8>> {
        self.signatures
            .iter()
            .filter_map(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(&s.sig)
                    .ok()
            })
            .collect()
    }
}

/// An in-toto Statement v1.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub type_: String,
    /// What the statement is about.
    pub subject: Vec<Subject>,
    /// The predicate's type URI.
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The predicate.
    pub predicate: serde_json::Value,
}

/// A statement's subject.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subject {
    /// Artifact name.
    pub name: String,
    /// `{"sha256": "<hex>"}`.
    pub digest: std::collections::BTreeMap<String, String>,
}

/// What the site verified about a signing request: the facts a distrust list matches on and
/// a consumer may want to see. The `signing` predicate is exactly this; the SLSA predicate
/// carries it as `buildDefinition.internalParameters.meshsign`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteFacts {
    /// Site region.
    pub region: String,
    /// Partition.
    pub environment: String,
    /// The key version that signs this statement (`alias@vN`).
    pub key_id: String,
    /// The site's audit entry of this decision.
    pub audit_seq: u64,
    /// `<region>-<seq>`.
    pub audit_id: String,
    /// RFC 3339 time of the decision.
    pub signed_at: String,
    /// CI provider (`github`, `gitlab`, `buildkite`, `generic`).
    pub provider: String,
    /// Token issuer.
    pub issuer: String,
    /// Token subject.
    pub token_subject: String,
    /// Repository.
    pub repository: String,
    /// Git ref (`refs/...`).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Workflow / CI config reference, if the provider names one.
    #[serde(default)]
    pub workflow: String,
    /// Source commit, if the provider names one.
    #[serde(default)]
    pub commit: String,
    /// CI job id.
    pub job_id: String,
    /// Pipeline / run / build id.
    #[serde(default)]
    pub pipeline: String,
    /// The attempt of a re-run pipeline (GitHub `run_attempt`), if the provider numbers them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_attempt: String,
    /// The trust policy that admitted the token.
    pub trust_policy: String,
    /// Runner fingerprint.
    pub runner_fingerprint: String,
    /// How the site established the fingerprint: `tpm`, `pkcs11` or `file` when a device key
    /// registered at the site proved possession at enrollment; `claimed` when it is only the
    /// runner's word (not a fact the site verified). Absent in statements made before device
    /// keys: read as `claimed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner_proof: String,
    /// Runner certificate serial (hex).
    pub certificate_serial: String,
}

impl SiteFacts {
    /// The facts a distrust list matches on.
    pub fn binding(&self) -> Result<Binding, String> {
        Ok(Binding {
            environment: self.environment.clone(),
            region: self.region.clone(),
            job_id: self.job_id.clone(),
            pipeline_id: self.pipeline.clone(),
            runner_fingerprint: self.runner_fingerprint.clone(),
            key_id: self.key_id.clone(),
            time: parse_rfc3339(&self.signed_at)?,
            audit_seq: self.audit_seq,
        })
    }

    /// The facts out of a statement of either predicate type.
    pub fn from_statement(s: &Statement) -> Result<Self, String> {
        let v = match s.predicate_type.as_str() {
            PREDICATE_SIGNING => s.predicate.clone(),
            PREDICATE_SLSA => s
                .predicate
                .pointer("/buildDefinition/internalParameters/meshsign")
                .cloned()
                .ok_or("the SLSA predicate has no internalParameters.meshsign")?,
            other => {
                return Err(format!(
                    "predicate type `{}` is not one the site makes",
                    crate::audit::excerpt(other, 100)
                ));
            }
        };
        serde_json::from_value(v).map_err(|e| format!("predicate: {e}"))
    }
}

/// The facts a signature is bound to (by a site-signed statement or an audit receipt).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Binding {
    /// Partition.
    pub environment: String,
    /// Site region.
    pub region: String,
    /// CI job id.
    pub job_id: String,
    /// Pipeline id (run, pipeline, build), where the provider names one.
    pub pipeline_id: String,
    /// Runner fingerprint.
    pub runner_fingerprint: String,
    /// `alias@vN`.
    pub key_id: String,
    /// Unix seconds of the decision.
    pub time: i64,
    /// Audit seq of the decision.
    pub audit_seq: u64,
}

impl Binding {
    /// The facts of an audit entry (a receipt).
    pub fn from_entry(e: &crate::audit::AuditRecord) -> Result<Self, String> {
        Ok(Self {
            environment: e.environment.clone(),
            region: e.site_region.clone(),
            job_id: e.job_id.clone(),
            pipeline_id: e.pipeline_id.clone(),
            runner_fingerprint: e.runner_fingerprint.clone(),
            key_id: e.key_id.clone(),
            time: parse_rfc3339(&e.ts)?,
            audit_seq: e.seq,
        })
    }
}

/// Unix seconds of an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| format!("`{}` is not an RFC 3339 time", crate::audit::excerpt(s, 64)))
}

/// RFC 3339 of unix seconds (UTC).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_specification_example() {
        // From the DSSE protocol document: PAE("http://example.com/HelloWorld", "hello world").
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
