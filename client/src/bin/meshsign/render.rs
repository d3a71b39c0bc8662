//! How the CLI shows results: a tab-separated table (header, one row per item) or JSON, on
//! stdout through [`out!`]. Nothing here talks to a site.

use std::path::Path;

use meshsign_client::ClientError;
use meshsign_client::usecase::material::Material;
pub use meshsign_client::usecase::status::{STATUS_HEADER, dash, status_json, status_rows, when};
use meshsign_client::usecase::{attest::Attested, sign::Signed, verify::Verified};
use meshsign_evidence::pem_encode;
use meshsign_proto::v1;

/// How commands print their data (`--output`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A header line, then tab-separated rows.
    #[default]
    Table,
    /// JSON (an array for listings, an object for one item).
    Json,
}

/// One line per signed file, as each one is written (JSON: one object per line).
pub fn signed(s: &Signed, format: Format) {
    if format == Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "file": s.file.display().to_string(),
                "key_id": s.key_id,
                "audit_id": s.audit_id,
                "audit_seq": s.audit_seq,
                "signature": s.signature.display().to_string(),
                "bundle": s.bundle.display().to_string(),
            })
        );
    } else {
        out!(
            "{}: signed with {} (audit {}) -> {}",
            s.file.display(),
            s.key_id,
            s.audit_id,
            s.signature.display()
        );
    }
}

/// The statement `meshsign attest` wrote.
pub fn attested(a: &Attested, format: Format) {
    if format == Format::Json {
        let subjects: Vec<_> = a
            .subjects
            .iter()
            .map(|(n, d)| serde_json::json!({"name": n, "sha256": hex::encode(d)}))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "envelope": a.envelope.display().to_string(),
                "bundle": a.bundle.display().to_string(), "key_id": a.key_id,
                "predicate_type": a.predicate_type, "audit_id": a.audit_id,
                "audit_seq": a.audit_seq, "subjects": subjects,
            })
        );
    } else {
        out!(
            "{}: {} subject(s), {}, signed with {} (audit {}); Sigstore bundle {}",
            a.envelope.display(),
            a.subjects.len(),
            a.predicate_type,
            a.key_id,
            a.audit_id,
            a.bundle.display()
        );
    }
}

/// What `meshsign codesign` signed.
#[cfg(feature = "codesign")]
pub fn codesigned(file: &str, key: &str, environment: &str, format: Format) {
    if format == Format::Json {
        out!(
            "{}",
            serde_json::json!({ "file": file, "key": key, "environment": environment })
        );
    } else {
        out!("{file}: signed with {key} ({environment})");
    }
}

/// `meshsign preflight`'s findings (path, line, kind; never the secret); exit 1 on any.
pub fn preflight(
    findings: &[meshsign_client::usecase::preflight::Finding],
    errors: &[String],
    format: Format,
) -> Result<(), ClientError> {
    for e in errors {
        eprintln!("preflight: cannot read {e}");
    }
    if format == Format::Json {
        let text = serde_json::to_string_pretty(findings).unwrap_or_default();
        out!("{text}");
    } else {
        for f in findings {
            out!(
                "{}:{}: {} (fingerprint {})",
                f.path,
                f.line,
                f.kind,
                f.fingerprint
            );
        }
    }
    if findings.is_empty() {
        eprintln!("preflight: no long-lived secret found");
        return Ok(());
    }
    Err(ClientError::Verify(format!(
        "preflight: {} long-lived secret(s) on this runner (see above)",
        findings.len()
    )))
}

/// `meshsign audit verify`.
pub fn audit_verified(file: &Path, r: &meshsign_evidence::audit::VerifyReport, format: Format) {
    if format == Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(), "ok": true,
                "first_seq": r.first_seq, "last_seq": r.last_seq, "entries": r.entries,
                "omitted": r.omitted, "checkpoints": r.checkpoints,
                "after_last_checkpoint": r.unanchored,
            })
        );
    } else {
        out!(
            "{}: OK — seq {}..{}: {} entries, {} omitted, {} signed checkpoints, {} after the last checkpoint",
            file.display(),
            r.first_seq,
            r.last_seq,
            r.entries,
            r.omitted,
            r.checkpoints,
            r.unanchored
        );
    }
}

/// `meshsign verification-material`: PEM (keys with a `#` line each), or the distrust list's
/// envelope as the site signed it.
pub fn material(m: &Material, format: Format) {
    match m {
        Material::DistrustList(list, envelope) => {
            eprintln!(
                "distrust list of `{}` at `{}`: version {}, {} rule(s)",
                list.environment,
                list.region,
                list.version,
                list.entries.len()
            );
            out!("{}", String::from_utf8_lossy(envelope));
        }
        Material::AuditKey(spki) => out_raw!("{}", pem_encode("PUBLIC KEY", spki)),
        Material::TrustedRoot(root) => {
            out!("{}", serde_json::to_string_pretty(root).unwrap_or_default())
        }
        Material::Keys(keys) if format == Format::Json => {
            let keys: Vec<serde_json::Value> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({
                        "key_id": k.key_id, "algorithm": k.algorithm, "active": k.active,
                        "purposes": k.purposes,
                        "public_key_pem": pem_encode("PUBLIC KEY", &k.public_key_der),
                    })
                })
                .collect();
            out!("{}", serde_json::Value::Array(keys));
        }
        Material::Keys(keys) => {
            for k in keys {
                let active = if k.active { " (active)" } else { "" };
                out!("# {} {}{active}", k.key_id, k.algorithm);
                out_raw!("{}", pem_encode("PUBLIC KEY", &k.public_key_der));
            }
        }
    }
}

/// What `meshsign verify` found.
pub fn verified(file: &Path, v: &Verified, format: Format) {
    let (c, file) = (&v.checked, file.display().to_string());
    if format == Format::Json {
        out!(
            "{}",
            serde_json::json!({
                "file": file, "ok": true, "format": c.format, "key_id": c.key_id,
                "region": c.region, "environment": c.environment,
                "audit_seq": c.audit_seq, "log_index": c.log_index, "key_pinned": v.pinned,
                "pinned_key_id": v.pinned_key_id,
                "receipt": c.receipt.map(|a| serde_json::json!({"ok": true, "under_signed_checkpoint": a})),
                "binding": c.binding,
                "distrust_list_version": v.distrust_list_version,
            })
        );
    } else {
        let entry = match c.log_index {
            Some(i) => format!("transparency-log entry {i}"),
            None => format!("audit entry {}", c.audit_seq),
        };
        out!(
            "{file}: OK ({} in {}/{}, {}, {entry})",
            c.key_id,
            c.region,
            c.environment,
            c.format,
        );
        if let Some(anchored) = c.receipt {
            let under = match (anchored, c.log_index.is_some()) {
                (true, _) => ", under a signed checkpoint",
                (false, true) => ", its signed entry timestamp; no inclusion proof yet",
                (false, false) => ", not yet under a signed checkpoint",
            };
            out!("{file}: receipt OK ({entry}{under})");
        }
        if let Some(k) = &v.pinned_key_id {
            out!("{file}: verified under the pinned {k}");
        }
        if let Some(v) = v.distrust_list_version {
            out!("{file}: not distrusted (distrust list version {v})");
        }
    }
    if !v.pinned {
        eprintln!(
            "note: the key was taken from the bundle; pin it with --public-key (see verification-material)"
        );
    }
}

/// `json` in JSON format, else the line `table` gives.
pub fn print_json_or(format: Format, json: serde_json::Value, table: impl FnOnce() -> String) {
    match format {
        Format::Json => print_json(&json),
        Format::Table => out!("{}", table()),
    }
}

/// One JSON document on stdout.
pub fn print_json(v: &serde_json::Value) {
    out!("{v}");
}

/// What an admin listing prints: a header, one tab-separated row per item, or JSON.
pub trait Render {
    /// Column names (upper case).
    const HEADER: &'static [&'static str];
    /// One row, as many cells as [`Render::HEADER`].
    fn row(&self) -> Vec<String>;
    /// The item as JSON.
    fn json(&self) -> serde_json::Value;
}

/// Prints a listing: a header and rows, or a JSON array.
pub fn emit<T: Render>(format: Format, items: &[T]) {
    match format {
        Format::Json => print_json(&serde_json::Value::Array(
            items.iter().map(Render::json).collect(),
        )),
        Format::Table => {
            out!("{}", T::HEADER.join("\t"));
            for i in items {
                out!("{}", i.row().join("\t"));
            }
        }
    }
}

/// Prints one item: a header and its row, or a JSON object.
pub fn emit_one<T: Render>(format: Format, item: &T) {
    match format {
        Format::Json => print_json(&item.json()),
        Format::Table => emit(format, std::slice::from_ref(item)),
    }
}

impl Render for v1::IssuerInfo {
    const HEADER: &'static [&'static str] = &[
        "ENVIRONMENT",
        "RUNNER CA",
        "STATE",
        "CREATED",
        "RETIRE AFTER",
    ];
    fn row(&self) -> Vec<String> {
        vec![
            self.environment.clone(),
            self.id.clone(),
            self.state_word(),
            when(self.created_at),
            when(self.retire_after),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "environment": self.environment, "id": self.id, "state": self.state_word(),
            "created_at": when(self.created_at),
            "retire_after": self.retire_after.map(|t| when(Some(t))),
            "certificate_pem": pem_encode("CERTIFICATE", &self.certificate_der),
        })
    }
}

pub fn policy_state(p: &v1::TrustPolicyInfo) -> &'static str {
    if p.enabled {
        "enabled"
    } else if p.keep_sessions {
        "disabled (sessions kept)"
    } else {
        "disabled"
    }
}

impl Render for v1::TrustPolicyInfo {
    const HEADER: &'static [&'static str] = &["ENVIRONMENT", "POLICY", "ISSUER", "STATE", "KIDS"];
    fn row(&self) -> Vec<String> {
        vec![
            self.environment.clone(),
            self.name.clone(),
            self.issuer.clone(),
            policy_state(self).into(),
            dash(&self.kids.join(",")),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "environment": self.environment, "name": self.name, "issuer": self.issuer,
            "enabled": self.enabled, "keep_sessions": self.keep_sessions, "kids": self.kids,
            "bound_claims": self.bound_claims,
        })
    }
}

impl Render for v1::KeyInfo {
    const HEADER: &'static [&'static str] = &[
        "ENVIRONMENT",
        "KEY",
        "ALGORITHM",
        "STATE",
        "VERSIONS (* = SIGNS)",
        "REPOSITORIES",
        "REFS",
    ];
    fn row(&self) -> Vec<String> {
        let versions: Vec<String> = self
            .versions
            .iter()
            .map(|v| format!("{}{}", v.key_id, if v.active { "*" } else { "" }))
            .collect();
        vec![
            self.environment.clone(),
            self.alias.clone(),
            self.algorithm.clone(),
            if self.disabled { "disabled" } else { "enabled" }.into(),
            versions.join(","),
            dash(&self.repositories.join(",")),
            dash(&self.refs.join(",")),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "environment": self.environment, "alias": self.alias, "algorithm": self.algorithm,
            "disabled": self.disabled, "repositories": self.repositories, "refs": self.refs,
            "backend": self.backend,
            "versions": self.versions.iter().map(|v| serde_json::json!({
                "key_id": v.key_id, "algorithm": v.algorithm, "active": v.active,
                "public_key_pem": pem_encode("PUBLIC KEY", &v.public_key_der),
            })).collect::<Vec<_>>(),
        })
    }
}

impl Render for v1::RevocationRule {
    const HEADER: &'static [&'static str] =
        &["RULE", "KIND", "VALUE", "REGION", "OPERATOR", "REASON"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.kind_word(),
            self.value.clone(),
            dash(&self.region),
            self.operator.clone(),
            self.reason.clone(),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "kind": self.kind_word(), "value": self.value, "region": self.region,
            "since": self.since, "until": self.until, "reason": self.reason,
            "operator": self.operator, "created_at": when(self.created_at),
        })
    }
}

impl Render for v1::RunnerInfo {
    const HEADER: &'static [&'static str] = meshsign_client::usecase::admin::RUNNER_HEADER;
    fn row(&self) -> Vec<String> {
        meshsign_client::usecase::admin::runner_row(self)
    }
    fn json(&self) -> serde_json::Value {
        meshsign_client::usecase::admin::runner_json(self)
    }
}

impl Render for v1::ProposalInfo {
    const HEADER: &'static [&'static str] = &[
        "PROPOSAL",
        "STATE",
        "OPERATION",
        "ENVIRONMENT",
        "SUMMARY",
        "PROPOSER",
        "APPROVER",
        "EXPIRES",
    ];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.state().word(),
            self.operation.clone(),
            dash(&self.environment),
            self.summary.clone(),
            self.proposer.clone(),
            dash(&self.approver),
            when(self.expires_at),
        ]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "state": self.state().word(), "operation": self.operation,
            "environment": self.environment, "summary": self.summary,
            "proposer": self.proposer, "approver": self.approver,
            "executed_by": self.executed_by, "created_at": when(self.created_at),
            "expires_at": when(self.expires_at), "request_sha256": self.request_sha256,
        })
    }
}

/// `admin status` as a table, under a summary line of the site.
pub fn print_status(st: &v1::SiteStatus) {
    out!(
        "site {}  store {}  {}  audit head {}  retention {}  two-person review: {}",
        st.region,
        st.engine_word(),
        if st.writable {
            "WRITABLE"
        } else {
            "NOT WRITABLE (decisions refused)"
        },
        st.audit_head_seq,
        if st.audit_retention_days == 0 {
            "all kept".to_string()
        } else {
            format!("{} days", st.audit_retention_days)
        },
        if st.reviewed_operations.is_empty() {
            "off".to_string()
        } else {
            st.reviewed_operations.join(",")
        }
    );
    out!("{}", STATUS_HEADER.join("\t"));
    for row in status_rows(st) {
        out!("{}", row.join("\t"));
    }
}

/// `meshsign receipt fetch`: a bundle and whether its proof was added.
impl Render for (std::path::PathBuf, bool) {
    const HEADER: &'static [&'static str] = &["BUNDLE", "PROOF"];
    fn row(&self) -> Vec<String> {
        let added = if self.1 { "added" } else { "already there" };
        vec![self.0.display().to_string(), added.into()]
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"bundle": self.0.display().to_string(), "proof_added": self.1})
    }
}
