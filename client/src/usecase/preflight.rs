//! `meshsign preflight`: a runner's registration check that no long-lived secret sits on it —
//! the thing meshsign exists to remove. It scans files and the environment for tokens
//! (GitHub, GitLab, Slack, AWS, npm), kubeconfigs with embedded credentials, unencrypted private
//! keys (PEM, OpenSSH), `.netrc`, `.git-credentials` and docker `auths`, and reports the path,
//! line and kind — never the secret.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;

use crate::ClientError;

/// One thing found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file, or `env:NAME`.
    pub path: String,
    /// 1-based line (0 for the environment).
    pub line: usize,
    /// What kind of secret.
    pub kind: &'static str,
}

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
            if boundary && ok && !out.contains(kind) {
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
    let mut push = |line: usize, kind: &'static str| {
        out.push(Finding {
            path: path.display().to_string(),
            line,
            kind,
        })
    };
    let lines: Vec<&str> = text.lines().collect();
    let is_kubeconfig = text.contains("kind: Config") && text.contains("clusters:");
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
        if lower.starts_with("aws_secret_access_key") && t.contains('=') {
            push(n, "aws-secret-access-key");
        }
        if is_kubeconfig
            && ["client-key-data:", "token:", "password:"]
                .iter()
                .any(|k| t.starts_with(k) && t.len() > k.len() + 1)
        {
            push(n, "kubeconfig-credentials");
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

fn walk(path: &Path, depth: usize, out: &mut Vec<Finding>, errors: &mut Vec<String>) {
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
        if depth >= MAX_DEPTH {
            return;
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            errors.push(format!("{}: unreadable folder", path.display()));
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            walk(&p, depth + 1, out, errors);
        }
        return;
    }
    if !meta.is_file() || meta.len() > MAX_FILE {
        return;
    }
    match std::fs::read(path) {
        Ok(bytes) if !bytes.contains(&0) => scan_text(path, &String::from_utf8_lossy(&bytes), out),
        Ok(_) => {}
        Err(e) => errors.push(format!("{}: {e}", path.display())),
    }
}

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
];

/// Scans `paths` (files or folders) and, with `env`, the given environment variables.
/// Returns the findings, and the paths that could not be read.
pub fn scan(paths: &[PathBuf], env: Option<&[(String, String)]>) -> (Vec<Finding>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        walk(p, 0, &mut out, &mut errors);
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
            out.push(Finding {
                path: format!("env:{name}"),
                line: 0,
                kind,
            });
        }
    }
    (out, errors)
}

/// `meshsign preflight`: scans `paths` (none: `$HOME`) and, unless `no_env`, this process's
/// environment. Returns the findings and what could not be read.
pub fn run(paths: Vec<PathBuf>, no_env: bool) -> Result<(Vec<Finding>, Vec<String>), ClientError> {
    let paths = if paths.is_empty() {
        vec![PathBuf::from(std::env::var("HOME").map_err(|_| {
            ClientError::Usage("no PATHS given and $HOME is not set".into())
        })?)]
    } else {
        paths
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    Ok(scan(&paths, (!no_env).then_some(env.as_slice())))
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
            tokens_in("id = AKIAIOSFODNN7EXAMPLE"),
            vec!["aws-access-key-id"]
        );
        assert!(tokens_in("AKIAlowercaseisnotakey").is_empty());
    }
}
