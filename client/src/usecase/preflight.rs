//! `meshsign preflight`: a runner's registration check that no long-lived secret sits on it —
//! the thing meshsign exists to remove. It scans files and the environment for tokens
//! (GitHub, GitLab, Slack, AWS, npm), kubeconfigs with embedded credentials (YAML or JSON),
//! unencrypted private keys (PEM, OpenSSH), App Store Connect keys (`AuthKey_*.p8`), PKCS#12
//! identities (parsed; one that opens with an empty password is its own kind), CI runner
//! credential files, fastlane secrets, `.netrc`, `.git-credentials` and docker `auths`, and on
//! macOS the code-signing identities in the keychains; and reports the path, line, kind and a
//! finding fingerprint — never the secret.
//!
//! Build workspaces and dependency caches (`_work`, `node_modules`, `DerivedData`,
//! `.cargo/registry`) are skipped by default, documented example keys (AWS's
//! `AKIAIOSFODNN7EXAMPLE`…) are not findings, and `--allow FILE` names path globs and finding
//! fingerprints to accept (a file committed with the runner image).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;

use crate::ClientError;

/// One thing found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file, `env:NAME`, or `keychain:SHA1`.
    pub path: String,
    /// 1-based line (0 for the environment, a binary file or a keychain).
    pub line: usize,
    /// What kind of secret.
    pub kind: &'static str,
    /// A stable name for this finding (`--allow` takes it): hex of SHA-256 of kind, path and
    /// line, 16 characters. It says nothing of the secret.
    pub fingerprint: String,
}

impl Finding {
    fn new(path: String, line: usize, kind: &'static str) -> Self {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("{kind}\0{path}\0{line}").as_bytes(),
        );
        Self {
            fingerprint: hex::encode(&digest.as_ref()[..8]),
            path,
            line,
            kind,
        }
    }
}

/// `meshsign preflight`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PreflightArgs {
    /// Files or folders to scan (default: $HOME).
    pub paths: Vec<PathBuf>,
    /// Print the findings as JSON (the same as --output json).
    #[arg(long)]
    pub json: bool,
    /// Do not scan the environment.
    #[arg(long)]
    pub no_env: bool,
    /// Accept what this file names: one path glob (`*` within a folder name, `**` across
    /// folders) or finding fingerprint per line, `#` comments.
    #[arg(long)]
    pub allow: Option<PathBuf>,
    /// Also scan build workspaces and dependency caches (`_work`, `node_modules`,
    /// `DerivedData`, `.cargo/registry`), skipped by default.
    #[arg(long)]
    pub no_default_excludes: bool,
}

/// Folders skipped by default: a job's checkout and build products, and dependency caches,
/// are full of test keys and documentation tokens that are not the runner's secrets.
const EXCLUDED_DIRS: &[&str] = &["_work", "node_modules", "DerivedData"];

/// Token values from vendors' documentation: never real credentials.
const DOCUMENTED_EXAMPLES: &[&str] = &[
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "ASIAIOSFODNN7EXAMPLE",
];

/// Files larger than this are skipped (images, archives).
const MAX_FILE: u64 = 4 << 20;
/// How deep the walk goes.
const MAX_DEPTH: usize = 12;

/// Token prefixes and the characters and least length that follow them.
const TOKENS: &[(&str, &str, usize)] = &[
    ("ghp_", "github-token", 36),
    ("gho_", "github-token", 36),
    ("ghu_", "github-token", 36),
    ("ghs_", "github-token", 36),
    ("ghr_", "github-token", 36),
    ("github_pat_", "github-token", 60),
    ("glpat-", "gitlab-token", 20),
    ("glrt-", "gitlab-token", 20),
    ("gldt-", "gitlab-token", 20),
    ("glptt-", "gitlab-token", 20),
    ("xoxb-", "slack-token", 10),
    ("xoxp-", "slack-token", 10),
    ("xoxa-", "slack-token", 10),
    ("xoxs-", "slack-token", 10),
    ("xoxr-", "slack-token", 10),
    ("AKIA", "aws-access-key-id", 16),
    ("ASIA", "aws-access-key-id", 16),
    ("npm_", "npm-token", 36),
];

fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The kinds of token in one line.
fn tokens_in(line: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    for (prefix, kind, min) in TOKENS {
        let mut from = 0;
        while let Some(i) = line[from..].find(prefix) {
            let start = from + i;
            // A token starts a word.
            let boundary = start == 0 || !token_char(bytes[start - 1]);
            let rest = &bytes[start + prefix.len()..];
            let n = rest.iter().take_while(|b| token_char(**b)).count();
            let aws = kind.starts_with("aws");
            let ok = if aws {
                n == *min
                    && rest[..n]
                        .iter()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            } else {
                n >= *min
            };
            let token = &line[start..start + prefix.len() + n];
            let example = DOCUMENTED_EXAMPLES.contains(&token) || token.ends_with("EXAMPLE");
            if boundary && ok && !example && !out.contains(kind) {
                out.push(*kind);
            }
            from = start + prefix.len();
        }
    }
    out
}

/// Whether an OpenSSH private key body (base64 between the armour lines) is unencrypted.
fn openssh_unencrypted(body: &str) -> bool {
    let b64: String = body.split_whitespace().collect();
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    // "openssh-key-v1\0", then a length-prefixed cipher name.
    let Some(rest) = der.strip_prefix(b"openssh-key-v1\0") else {
        return false;
    };
    rest.get(4..8) == Some(b"none")
}

/// Scans one file's text.
fn scan_text(path: &Path, text: &str, out: &mut Vec<Finding>) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let asc_key = name.starts_with("AuthKey_") && name.ends_with(".p8");
    let mut push = |line: usize, kind: &'static str| {
        let kind = match kind {
            "unencrypted-private-key" if asc_key => "app-store-connect-key",
            k => k,
        };
        out.push(Finding::new(path.display().to_string(), line, kind))
    };
    if RUNNER_CREDENTIALS.contains(&name.as_str()) && !text.trim().is_empty() {
        push(1, "ci-runner-credentials");
    }
    let lines: Vec<&str> = text.lines().collect();
    // YAML or JSON, with or without `kind: Config`.
    let is_kubeconfig = text.contains("clusters") && text.contains("users");
    // A JSON kubeconfig may be one line: read it as JSON, and name the line of its first
    // credential.
    let json_kubeconfig = is_kubeconfig
        .then(|| serde_json::from_str::<serde_json::Value>(text).ok())
        .flatten()
        .filter(|v| v.is_object());
    if let Some(v) = &json_kubeconfig {
        let has_credential = v["users"].as_array().is_some_and(|users| {
            users.iter().any(|u| {
                ["client-key-data", "token", "password"]
                    .iter()
                    .any(|k| u["user"][k].as_str().is_some_and(|s| !s.is_empty()))
            })
        });
        if has_credential {
            let line = text
                .lines()
                .position(|l| {
                    ["\"client-key-data\"", "\"token\"", "\"password\""]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .map_or(1, |i| i + 1);
            push(line, "kubeconfig-credentials");
        }
    }
    let fastlane_env = name.starts_with(".env")
        && path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "fastlane");
    let mut in_pem: Option<(usize, bool)> = None; // (start line, openssh)
    let mut pem_body = String::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        for kind in tokens_in(line) {
            push(n, kind);
        }
        let t = line.trim();
        if t.starts_with("-----BEGIN ") && t.ends_with("PRIVATE KEY-----") {
            if t.contains("ENCRYPTED") {
                continue;
            }
            in_pem = Some((n, t.contains("OPENSSH")));
            pem_body.clear();
            continue;
        }
        if let Some((start, openssh)) = in_pem {
            if t.starts_with("-----END ") {
                let encrypted_pem = pem_body.contains("Proc-Type: 4,ENCRYPTED");
                if openssh {
                    if openssh_unencrypted(&pem_body) {
                        push(start, "unencrypted-openssh-private-key");
                    }
                } else if !encrypted_pem {
                    push(start, "unencrypted-private-key");
                }
                in_pem = None;
            } else {
                pem_body.push_str(t);
                pem_body.push('\n');
            }
            continue;
        }
        let lower = t.to_ascii_lowercase();
        if lower.starts_with("aws_secret_access_key")
            && t.contains('=')
            && !DOCUMENTED_EXAMPLES.iter().any(|e| t.contains(e))
        {
            push(n, "aws-secret-access-key");
        }
        let unquoted: String = t.chars().filter(|c| *c != '"').collect();
        if is_kubeconfig
            && json_kubeconfig.is_none()
            && ["client-key-data:", "token:", "password:"].iter().any(|k| {
                unquoted.starts_with(k)
                    && !unquoted[k.len()..]
                        .trim()
                        .trim_end_matches(',')
                        .trim()
                        .is_empty()
            })
        {
            push(n, "kubeconfig-credentials");
        }
        if name == "buildkite-agent.cfg" && t.starts_with("token=") && t.len() > 7 {
            push(n, "ci-runner-credentials");
        }
        if fastlane_env
            && FASTLANE_VARS
                .iter()
                .any(|v| t.starts_with(&format!("{v}=")) && t.len() > v.len() + 1)
        {
            push(n, "fastlane-secret");
        }
        if (name == ".netrc" || name == "_netrc") && lower.contains("password ") {
            push(n, "netrc-password");
        }
        if name == ".git-credentials" && t.contains("://") && t.contains(':') && t.contains('@') {
            push(n, "git-credentials");
        }
        if name == ".npmrc" && t.contains("_authToken=") && !t.ends_with("_authToken=") {
            push(n, "npm-token");
        }
        if name == "config.json"
            && t.starts_with("\"auth\"")
            && t.contains(':')
            && !t.contains("\"\"")
        {
            push(n, "docker-auth");
        }
    }
}

/// Whether the walk skips this folder by default.
fn excluded(dir: &Path) -> bool {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    name.as_deref().is_some_and(|n| EXCLUDED_DIRS.contains(&n))
        || (name.as_deref() == Some("registry")
            && dir
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|p| p == ".cargo"))
}

fn walk(
    path: &Path,
    depth: usize,
    excludes: bool,
    out: &mut Vec<Finding>,
    errors: &mut Vec<String>,
) {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    if meta.file_type().is_symlink() {
        return;
    }
    if meta.is_dir() {
        if depth >= MAX_DEPTH || (excludes && excluded(path)) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            errors.push(format!("{}: unreadable folder", path.display()));
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            walk(&p, depth + 1, excludes, out, errors);
        }
        return;
    }
    if !meta.is_file() || meta.len() > MAX_FILE {
        return;
    }
    let in_spaceship = path
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|d| d == "spaceship");
    if in_spaceship && path.file_name().is_some_and(|n| n == "cookie") {
        out.push(Finding::new(
            path.display().to_string(),
            0,
            "fastlane-session",
        ));
        return;
    }
    match std::fs::read(path) {
        Ok(bytes) if is_pfx(&bytes) => {
            let open = p12_keystore::KeyStore::from_pkcs12(
                &bytes,
                "",
                p12_keystore::Pkcs12ImportPolicy::Relaxed,
            );
            let kind = match open {
                Ok(ks) if ks.private_key_chain().is_some() => "pkcs12-without-password",
                _ => "pkcs12-identity",
            };
            out.push(Finding::new(path.display().to_string(), 0, kind));
        }
        Ok(bytes) if !bytes.contains(&0) => scan_text(path, &String::from_utf8_lossy(&bytes), out),
        Ok(_) => {}
        Err(e) => errors.push(format!("{}: {e}", path.display())),
    }
}

/// Whether `b` is a PKCS#12 PFX: `SEQUENCE { INTEGER 3, ContentInfo { id-data … } … }`
/// (parsed, whatever the file's name).
fn is_pfx(b: &[u8]) -> bool {
    use meshsign_evidence::der::{tlv, tlvs};
    const ID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
    let Some((0x30, body, _)) = tlv(b) else {
        return false;
    };
    let Some(parts) = tlvs(body) else {
        return false;
    };
    let content_type = parts
        .get(1)
        .filter(|(tag, _)| *tag == 0x30)
        .and_then(|(_, ci)| tlvs(ci))
        .and_then(|ci| ci.first().copied());
    matches!(parts.first(), Some((0x02, [3])))
        && matches!(content_type, Some((0x06, oid)) if oid == ID_DATA)
}

/// GitHub Actions runner credentials (`.credentials`, the RSA key of `.credentials_rsaparams`,
/// `.runner`): whoever copies them is the runner.
const RUNNER_CREDENTIALS: &[&str] = &[".credentials", ".credentials_rsaparams", ".runner"];

/// fastlane's secrets (`match` passphrase, Apple ID password, session cookie).
const FASTLANE_VARS: &[&str] = &[
    "MATCH_PASSWORD",
    "FASTLANE_PASSWORD",
    "FASTLANE_SESSION",
    "FASTLANE_APPLE_APPLICATION_SPECIFIC_PASSWORD",
];

/// Variable names that hold credentials whatever their value looks like.
const SECRET_VARS: &[&str] = &[
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GITLAB_TOKEN",
    "CI_JOB_TOKEN_PERSISTENT",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "NPM_TOKEN",
    "SLACK_TOKEN",
    "DOCKER_PASSWORD",
    "MATCH_PASSWORD",
    "FASTLANE_PASSWORD",
    "FASTLANE_SESSION",
    "FASTLANE_APPLE_APPLICATION_SPECIFIC_PASSWORD",
    "APP_STORE_CONNECT_API_KEY_CONTENT",
];

/// Scans `paths` (files or folders) and, with `env`, the given environment variables.
/// Returns the findings, and the paths that could not be read.
pub fn scan(
    paths: &[PathBuf],
    env: Option<&[(String, String)]>,
    excludes: bool,
) -> (Vec<Finding>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        walk(p, 0, excludes, &mut out, &mut errors);
    }
    for (name, value) in env.unwrap_or_default() {
        let mut kinds = tokens_in(value);
        if SECRET_VARS.contains(&name.as_str()) && !value.is_empty() {
            kinds.push("credential-variable");
        }
        if value.contains("-----BEGIN")
            && value.contains("PRIVATE KEY-----")
            && !value.contains("ENCRYPTED")
        {
            kinds.push("unencrypted-private-key");
        }
        for kind in kinds {
            out.push(Finding::new(format!("env:{name}"), 0, kind));
        }
    }
    (out, errors)
}

/// The code-signing identities `security find-identity -v -p codesigning` lists: (SHA-1,
/// name). Its lines look like `  1) 0123…ABCD "Apple Distribution: Acme (TEAMID)"`.
pub fn parse_find_identity(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (n, rest) = l.trim().split_once(") ")?;
            n.parse::<u32>().ok()?;
            let (hash, name) = rest.split_once(' ')?;
            let ok = hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            let name = name.trim().strip_prefix('"')?.strip_suffix('"')?;
            ok.then(|| (hash.to_string(), name.to_string()))
        })
        .collect()
}

/// macOS: a code-signing identity in the login or system keychain is a long-lived signing
/// key on the runner. Elsewhere (no `security`), nothing.
fn keychain_identities() -> Vec<Finding> {
    let Ok(out) = std::process::Command::new("security")
        .args(["find-identity", "-v", "-p", "codesigning"])
        .output()
    else {
        return Vec::new();
    };
    parse_find_identity(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|(hash, _)| {
            Finding::new(
                format!("keychain:{hash}"),
                0,
                "keychain-codesigning-identity",
            )
        })
        .collect()
}

/// What `--allow` names: path globs and finding fingerprints.
#[derive(Clone, Debug, Default)]
pub struct Allow {
    globs: Vec<String>,
    fingerprints: Vec<String>,
}

impl Allow {
    /// Reads an allow file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(ClientError::io(path))?;
        Ok(Self::parse(&text))
    }

    /// Parses an allow file's text.
    pub fn parse(text: &str) -> Self {
        let mut a = Self::default();
        for l in text.lines().map(str::trim) {
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if l.len() == 16 && l.bytes().all(|b| b.is_ascii_hexdigit()) {
                a.fingerprints.push(l.to_ascii_lowercase());
            } else {
                a.globs.push(l.to_string());
            }
        }
        a
    }

    /// Whether the finding is accepted.
    pub fn allows(&self, f: &Finding) -> bool {
        self.fingerprints.contains(&f.fingerprint) || self.globs.iter().any(|g| glob(g, &f.path))
    }
}

/// `*` matches within one path segment, `**` across segments.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = p[2..].strip_prefix(b"/").unwrap_or(&p[2..]);
                (0..=t.len()).any(|i| go(rest, &t[i..]) || go(&p[2..], &t[i..]))
            }
            Some(b'*') => (0..=t.len())
                .take_while(|i| *i == 0 || t[*i - 1] != b'/')
                .any(|i| go(&p[1..], &t[i..])),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// `meshsign preflight`: scans the paths (none: `$HOME`), unless `--no-env` this process's
/// environment, and the keychains (macOS). Returns the findings `--allow` does not accept and
/// what could not be read.
pub fn run(args: &PreflightArgs) -> Result<(Vec<Finding>, Vec<String>), ClientError> {
    let allow = args.allow.as_deref().map(Allow::load).transpose()?;
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(std::env::var("HOME").map_err(|_| {
            ClientError::Usage("no PATHS given and $HOME is not set".into())
        })?)]
    } else {
        args.paths.clone()
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (mut findings, errors) = scan(
        &paths,
        (!args.no_env).then_some(env.as_slice()),
        !args.no_default_excludes,
    );
    findings.extend(keychain_identities());
    if let Some(a) = &allow {
        findings.retain(|f| !a.allows(f));
    }
    Ok((findings, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_shape_not_by_accident() {
        let gh = format!("token: ghp_{}", "a".repeat(36));
        assert_eq!(tokens_in(&gh), vec!["github-token"]);
        assert!(tokens_in("ghp_short").is_empty());
        assert!(tokens_in("xghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_empty());
        assert_eq!(
            tokens_in("id = AKIAQ2W3E4R5T6Y7U8I9"),
            vec!["aws-access-key-id"]
        );
        // AWS's documentation key is not a finding.
        assert!(tokens_in("id = AKIAIOSFODNN7EXAMPLE").is_empty());
        assert!(tokens_in("AKIAlowercaseisnotakey").is_empty());
    }

    #[test]
    fn find_identity_output_is_parsed() {
        // Captured from `security find-identity -v -p codesigning` on a macOS 14 runner.
        let out = r#"  1) 4F1A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C "Apple Development: CI Bot (ABCDE12345)"
  2) 0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D "Apple Distribution: Acme Inc (TEAM123456)"
     2 valid identities found
"#;
        let ids = parse_find_identity(out);
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[1].0, "0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D");
        assert_eq!(ids[1].1, "Apple Distribution: Acme Inc (TEAM123456)");
        assert!(parse_find_identity("     0 valid identities found\n").is_empty());
    }

    #[test]
    fn allow_takes_globs_and_fingerprints() {
        let f = Finding::new(
            "/home/ci/_tools/x/test.pem".into(),
            3,
            "unencrypted-private-key",
        );
        let other = Finding::new("/home/ci/.ssh/id_rsa".into(), 1, "unencrypted-private-key");
        let a = Allow::parse(&format!(
            "# image fixtures\n/home/ci/_tools/**\n{}\n",
            other.fingerprint
        ));
        assert!(a.allows(&f) && a.allows(&other));
        let b = Allow::parse("/home/ci/*.pem\n");
        assert!(!b.allows(&f), "* stays within a folder");
        assert!(glob("/home/*/.ssh/id_*", "/home/ci/.ssh/id_rsa"));
        assert!(!glob("/home/*/id_*", "/home/ci/.ssh/id_rsa"));
    }
}
