//! Identity formats carried in runner certificates.
//!
//! A runner certificate is an X.509-SVID: exactly one URI SAN of the form
//! `spiffe://<trust_domain>/runner/<environment>/<region>/<fingerprint>`, and a non-critical
//! extension carrying the job claims the certificate was minted from.
//!
//! The claims extension's OID is [`CLAIMS_EXTENSION_OID`], `1.3.9999.4717.1.1`: every arc fits
//! in 31 bits, so every X.509 stack parses it (Go's `encoding/asn1` refuses arcs beyond 63
//! bits, and refused the whole certificate under the earlier `2.25.<UUID>` OID, whose one arc
//! is 128 bits). It is a private arc, as Teleport's `1.3.9999.1.*` extensions are, not a
//! registered one: meshsign has no IANA Private Enterprise Number yet; when it has one, new
//! certificates move under it and readers accept this OID too. Readers accept the earlier
//! [`LEGACY_CLAIMS_EXTENSION_UUID`] OID as well, so certificates issued before keep verifying
//! where they are used (they live minutes). Its value is a DER `UTF8String` holding compact
//! JSON of [`JobClaims`], readable by `openssl x509 -text`.

use serde::{Deserialize, Serialize};

/// The arcs of the job-claims extension's OID, `1.3.9999.4717.1.1` (claims, version 1).
pub const CLAIMS_EXTENSION_OID: [u64; 6] = [1, 3, 9999, 4717, 1, 1];

/// The UUID under `2.25` that named the job-claims extension in certificates issued before
/// [`CLAIMS_EXTENSION_OID`]; still read, never written.
pub const LEGACY_CLAIMS_EXTENSION_UUID: u128 = 0xc4b2f3a1_6e0d_4f8a_9b1e_5d2c7a9e3f60;

/// Errors decoding the identity formats.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The URI is not `spiffe://<td>/runner/<env>/<region>/<fingerprint>`.
    #[error("not a runner SPIFFE ID: {0}")]
    BadSpiffeId(String),
    /// The extension value is not a DER UTF8String of the documented JSON.
    #[error("malformed claims extension: {0}")]
    BadClaims(String),
}

/// The SPIFFE ID of a runner certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerId {
    /// The site's trust domain, e.g. `meshsign.example.com`.
    pub trust_domain: String,
    /// Partition name, e.g. `production`.
    pub environment: String,
    /// Site region, e.g. `sg`.
    pub region: String,
    /// Runner fingerprint: 64 lowercase hex characters.
    pub fingerprint: String,
}

impl RunnerId {
    /// `spiffe://<trust_domain>/runner/<environment>/<region>/<fingerprint>`.
    pub fn to_uri(&self) -> String {
        format!(
            "spiffe://{}/runner/{}/{}/{}",
            self.trust_domain, self.environment, self.region, self.fingerprint
        )
    }

    /// Parses the URI form; every segment must be non-empty and contain no `/`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadSpiffeId(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "runner", env, region, fp]
                if [td, env, region, fp].iter().all(|s| !s.is_empty()) =>
            {
                Ok(Self {
                    trust_domain: td.to_string(),
                    environment: env.to_string(),
                    region: region.to_string(),
                    fingerprint: fp.to_string(),
                })
            }
            _ => Err(bad()),
        }
    }
}

/// True for exactly 64 lowercase hex characters (a SHA-256 in hex).
pub fn is_valid_fingerprint(fp: &str) -> bool {
    fp.len() == 64
        && fp
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The job claims a runner certificate carries (DESIGN.md "Runner certificate profile").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JobClaims {
    /// Token issuer (`iss`).
    pub iss: String,
    /// Token subject (`sub`).
    pub sub: String,
    /// Token ID (`jti`).
    pub jti: String,
    /// CI job identifier: GitHub `check_run_id` (or `<run_id>-<run_attempt>` for a token
    /// without it), GitLab and Buildkite `job_id`.
    pub job_id: String,
    /// Repository, e.g. `acme/app`.
    pub repository: String,
    /// Git ref, e.g. `refs/heads/main`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Name of the trust policy that admitted the token.
    pub trust_policy: String,
    /// The CI provider whose claims were mapped (`github`, `gitlab`, `buildkite`, `generic`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// The pipeline id (GitHub `run_id`, GitLab `pipeline_id`, Buildkite `build_id`, else its
    /// `build_number`): what `revoke --pipeline-id` and `distrust add --pipeline-id` match.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline: String,
    /// The attempt of a re-run pipeline (GitHub `run_attempt`), if the provider numbers them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_attempt: String,
    /// The workflow or CI config that ran (GitHub `workflow_ref`, GitLab `ci_config_ref_uri`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workflow: String,
    /// The source commit (GitHub and GitLab `sha`, Buildkite `build_commit`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit: String,
    /// How the runner fingerprint was established: `tpm`, `pkcs11` or `file` (a device key
    /// registered at the site proved possession at enrollment), or `claimed` (the runner's
    /// word). Empty in certificates issued before device keys existed: read it as `claimed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner_proof: String,
}

impl JobClaims {
    /// Whether the fingerprint was proven by a registered device key (not merely claimed).
    pub fn fingerprint_proven(&self) -> bool {
        matches!(self.runner_proof.as_str(), "tpm" | "pkcs11" | "file")
    }
}

impl JobClaims {
    /// The extension value: a DER UTF8String holding compact JSON.
    pub fn to_extension_value(&self) -> Vec<u8> {
        // Serializing a struct of Strings to JSON cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = vec![0x0c];
        der_push_len(&mut out, json.len());
        out.extend_from_slice(&json);
        out
    }

    /// Decodes the extension value written by [`JobClaims::to_extension_value`].
    pub fn from_extension_value(der: &[u8]) -> Result<Self, IdentityError> {
        let bad = |m: &str| IdentityError::BadClaims(m.to_string());
        let (&tag, rest) = der.split_first().ok_or_else(|| bad("empty"))?;
        if tag != 0x0c {
            return Err(bad("not a UTF8String"));
        }
        let (len, body) = der_read_len(rest).ok_or_else(|| bad("bad length"))?;
        if body.len() != len {
            return Err(bad("length mismatch"));
        }
        serde_json::from_slice(body).map_err(|e| IdentityError::BadClaims(e.to_string()))
    }
}

/// DER encoding (tag, length, content) of the claims extension OID.
pub fn claims_extension_oid_der() -> Vec<u8> {
    let [a, b, rest @ ..] = CLAIMS_EXTENSION_OID;
    let mut arcs = vec![OidArc::Small(a * 40 + b)];
    arcs.extend(rest.iter().map(|&v| OidArc::Small(v)));
    oid_der(&arcs)
}

/// DER encoding of the earlier claims extension OID, `2.25.<LEGACY_CLAIMS_EXTENSION_UUID>`.
pub fn legacy_claims_extension_oid_der() -> Vec<u8> {
    oid_der(&[
        OidArc::Small(2 * 40 + 25),
        OidArc::Big(LEGACY_CLAIMS_EXTENSION_UUID),
    ])
}

/// Whether an extension's OID (its DER content, without tag and length) names the claims
/// extension: the current OID, or the earlier one certificates issued before carry.
pub fn is_claims_extension_oid(content: &[u8]) -> bool {
    content == &claims_extension_oid_der()[2..]
        || content == &legacy_claims_extension_oid_der()[2..]
}

/// Dotted form of the claims extension OID, `1.3.9999.4717.1.1`.
pub fn claims_extension_oid_string() -> String {
    CLAIMS_EXTENSION_OID
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// One arc of an OID for [`oid_der`]; the first entry is the combined first two arcs.
#[derive(Clone, Copy)]
pub enum OidArc {
    /// An arc that fits a u64.
    Small(u64),
    /// An arc that needs 128 bits (a UUID under `2.25`).
    Big(u128),
}

/// DER-encodes an OID given its (already combined) sub-identifiers.
pub fn oid_der(arcs: &[OidArc]) -> Vec<u8> {
    let mut content = Vec::new();
    for arc in arcs {
        let v = match *arc {
            OidArc::Small(v) => u128::from(v),
            OidArc::Big(v) => v,
        };
        let mut groups = vec![(v & 0x7f) as u8];
        let mut rest = v >> 7;
        while rest > 0 {
            groups.push(((rest & 0x7f) as u8) | 0x80);
            rest >>= 7;
        }
        groups.reverse();
        content.extend(groups);
    }
    let mut out = vec![0x06];
    der_push_len(&mut out, content.len());
    out.extend(content);
    out
}

fn der_push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn der_read_len(buf: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = buf.split_first()?;
    if first < 0x80 {
        return Some((usize::from(first), rest));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((len, &rest[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trip_and_rejects() {
        let id = RunnerId {
            trust_domain: "meshsign.test".into(),
            environment: "production".into(),
            region: "sg".into(),
            fingerprint: "a".repeat(64),
        };
        assert_eq!(RunnerId::parse(&id.to_uri()), Ok(id));
        for bad in [
            "spiffe://td/runner/prod/sg",
            "spiffe://td/ops/prod/sg/x",
            "https://td/runner/a/b/c",
            "spiffe://td/runner/a//c",
            "spiffe://td/runner/a/b/c/d",
        ] {
            assert!(RunnerId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_shape() {
        assert!(is_valid_fingerprint(&"0123456789abcdef".repeat(4)));
        assert!(!is_valid_fingerprint(&"0123456789ABCDEF".repeat(4)));
        assert!(!is_valid_fingerprint(&"a".repeat(63)));
        assert!(!is_valid_fingerprint(&"g".repeat(64)));
    }

    #[test]
    fn claims_round_trip() {
        let c = JobClaims {
            iss: "https://token.actions.githubusercontent.com".into(),
            sub: "repo:acme/app:environment:production".into(),
            jti: "j-1".into(),
            job_id: "38012345678".into(),
            repository: "acme/app".into(),
            git_ref: "refs/heads/main".into(),
            trust_policy: "github".into(),
            provider: "github".into(),
            pipeline: "13456789012".into(),
            run_attempt: "2".into(),
            workflow: "acme/app/.github/workflows/release.yml@refs/heads/main".into(),
            commit: "e0f1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b".into(),
            runner_proof: "tpm".into(),
        };
        assert!(c.fingerprint_proven());
        let der = c.to_extension_value();
        assert_eq!(JobClaims::from_extension_value(&der), Ok(c.clone()));
        // A certificate from before providers (no provider, pipeline, workflow or commit)
        // still parses.
        let old = JobClaims {
            provider: String::new(),
            pipeline: String::new(),
            run_attempt: String::new(),
            workflow: String::new(),
            commit: String::new(),
            runner_proof: String::new(),
            ..c
        };
        assert!(
            !old.fingerprint_proven(),
            "no runner_proof reads as claimed"
        );
        let json = serde_json::to_string(&old).unwrap_or_default();
        assert!(
            [
                "provider",
                "pipeline",
                "run_attempt",
                "workflow",
                "commit",
                "runner_proof"
            ]
            .iter()
            .all(|f| !json.contains(f)),
            "{json}"
        );
        assert_eq!(
            JobClaims::from_extension_value(&old.to_extension_value()),
            Ok(old)
        );
        assert!(JobClaims::from_extension_value(&der[1..]).is_err());
    }

    #[test]
    fn oid_encoding_matches_known_values() {
        // 1.2.840.10045.4.3.2 (ecdsa-with-SHA256) = 06 08 2a 86 48 ce 3d 04 03 02
        let der = oid_der(&[
            OidArc::Small(42),
            OidArc::Small(840),
            OidArc::Small(10045),
            OidArc::Small(4),
            OidArc::Small(3),
            OidArc::Small(2),
        ]);
        assert_eq!(
            der,
            [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        );
        let claims = claims_extension_oid_der();
        assert_eq!(claims[0], 0x06);
        assert_eq!(usize::from(claims[1]), claims.len() - 2);
        assert_eq!(claims[2], 43); // 1.3
        // Every arc fits in 31 bits: what Go's encoding/asn1 (and every other stack) parses.
        assert!(CLAIMS_EXTENSION_OID.iter().all(|&a| a < 1 << 31));
        assert_eq!(claims_extension_oid_string(), "1.3.9999.4717.1.1");
        let legacy = legacy_claims_extension_oid_der();
        assert_eq!(legacy[2], 105); // 2.25
        assert!(is_claims_extension_oid(&claims[2..]) && is_claims_extension_oid(&legacy[2..]));
        assert!(!is_claims_extension_oid(&claims[3..]));
    }
}
