//! What a job token says about the job, read the way its CI provider writes it: repository,
//! ref (always in `refs/...` form), job id, pipeline, deployment environment, actor.
//!
//! Owns: the per-provider claim names (copied from the providers' documentation: GitHub Actions
//! OIDC, GitLab `id_tokens`, Buildkite agent OIDC). Must not touch: policy (which values are
//! allowed is the key's access rule and the policy's bound claims).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::model::{Provider, bounded};

/// Longest mapped value kept.
const MAX: usize = 256;

/// The job, mapped from a token's claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobIdentity {
    /// The provider the mapping followed.
    pub provider: Provider,
    /// e.g. `acme/app` (Buildkite: `organization_slug/pipeline_slug`).
    pub repository: String,
    /// e.g. `refs/heads/main`, `refs/tags/v1.2`.
    pub git_ref: String,
    /// The CI job: GitHub `check_run_id` (a token without it: `<run_id>-<run_attempt>`),
    /// GitLab and Buildkite `job_id`.
    pub job_id: String,
    /// Which claims `job_id` came from (the enrollment's audit entry says it).
    pub job_id_source: &'static str,
    /// The pipeline id: GitHub `run_id`, GitLab `pipeline_id`, Buildkite `build_id` (else its
    /// `build_number`).
    pub pipeline: String,
    /// The attempt of a re-run (GitHub `run_attempt`).
    pub run_attempt: String,
    /// The deployment environment, if the provider names one.
    pub environment: String,
    /// Who started it, if the provider names it.
    pub actor: String,
    /// The workflow / CI config that ran (GitHub `workflow_ref`, GitLab `ci_config_ref_uri`).
    pub workflow: String,
    /// The source commit (GitHub and GitLab `sha`, Buildkite `build_commit`).
    pub commit: String,
}

/// A claim as a string (strings, numbers and booleans; null and objects are absent).
pub fn claim_str(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl JobIdentity {
    /// Maps `claims` as `provider` writes them; `generic` follows `mappings` (field → claim).
    pub fn map(
        provider: Provider,
        mappings: &BTreeMap<String, String>,
        claims: &Map<String, Value>,
    ) -> Self {
        let c = |name: &str| {
            claim_str(claims, name)
                .map(|v| bounded(&v, MAX))
                .unwrap_or_default()
        };
        let mut job = match provider {
            Provider::Github => {
                let (job_id, job_id_source) = github_job_id(&c);
                Self {
                    repository: c("repository"),
                    git_ref: c("ref"),
                    job_id,
                    job_id_source,
                    pipeline: c("run_id"),
                    run_attempt: c("run_attempt"),
                    environment: c("environment"),
                    actor: c("actor"),
                    workflow: c("workflow_ref"),
                    commit: c("sha"),
                    ..Self::default()
                }
            }
            Provider::Gitlab => Self {
                repository: c("project_path"),
                // `ref` is the bare branch or tag; `ref_path` is the refs/... form.
                git_ref: c("ref_path"),
                job_id: c("job_id"),
                job_id_source: "job_id",
                pipeline: c("pipeline_id"),
                environment: c("environment"),
                actor: c("user_login"),
                workflow: c("ci_config_ref_uri"),
                commit: c("sha"),
                ..Self::default()
            },
            Provider::Buildkite => {
                let (org, pipe) = (c("organization_slug"), c("pipeline_slug"));
                let tag = c("build_tag");
                Self {
                    repository: if org.is_empty() || pipe.is_empty() {
                        String::new()
                    } else {
                        format!("{org}/{pipe}")
                    },
                    git_ref: if !tag.is_empty() {
                        format!("refs/tags/{tag}")
                    } else if !c("build_branch").is_empty() {
                        format!("refs/heads/{}", c("build_branch"))
                    } else {
                        String::new()
                    },
                    job_id: c("job_id"),
                    job_id_source: "job_id",
                    pipeline: match c("build_id") {
                        id if id.is_empty() => c("build_number"),
                        id => id,
                    },
                    commit: c("build_commit"),
                    ..Self::default()
                }
            }
            Provider::Generic => {
                let m = |field: &str| {
                    mappings
                        .get(field)
                        .map(|claim| c(claim))
                        .unwrap_or_default()
                };
                Self {
                    repository: m("repository"),
                    git_ref: m("ref"),
                    job_id: m("job_id"),
                    job_id_source: "claim_mappings.job_id",
                    pipeline: m("pipeline"),
                    run_attempt: m("run_attempt"),
                    environment: m("environment"),
                    actor: m("actor"),
                    workflow: m("workflow"),
                    commit: m("commit"),
                    ..Self::default()
                }
            }
        };
        job.provider = provider;
        job
    }

    /// A mapped field by name ([`crate::model::JOB_FIELDS`]); None for other names.
    pub fn field(&self, name: &str) -> Option<&str> {
        Some(match name {
            "repository" => &self.repository,
            "ref" => &self.git_ref,
            "job_id" => &self.job_id,
            "pipeline" => &self.pipeline,
            "run_attempt" => &self.run_attempt,
            "environment" => &self.environment,
            "actor" => &self.actor,
            _ => return None,
        })
    }
}

/// GitHub's job: `check_run_id` names one job of one attempt (GitHub added it to job tokens
/// on 2025-11-13). A token without it names only its run, so the job is `<run_id>-<run_attempt>`
/// (every job of that attempt shares it, and the audit says so).
fn github_job_id(c: &dyn Fn(&str) -> String) -> (String, &'static str) {
    let check_run = c("check_run_id");
    if !check_run.is_empty() {
        return (check_run, "check_run_id");
    }
    let (run, attempt) = (c("run_id"), c("run_attempt"));
    match (run.is_empty(), attempt.is_empty()) {
        (true, _) => (String::new(), "none"),
        (false, true) => (run, "run_id (no check_run_id, no run_attempt)"),
        (false, false) => (
            bounded(&format!("{run}-{attempt}"), MAX),
            "run_id-run_attempt (no check_run_id)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn each_provider_maps_its_own_claim_names() {
        let none = BTreeMap::new();
        let gl = JobIdentity::map(
            Provider::Gitlab,
            &none,
            &claims(serde_json::json!({
                "project_path": "acme/app", "ref": "main", "ref_path": "refs/heads/main",
                "job_id": "302", "pipeline_id": "12345", "environment": "production",
                "user_login": "dev1"
            })),
        );
        assert_eq!(
            (
                gl.repository.as_str(),
                gl.git_ref.as_str(),
                gl.job_id.as_str(),
                gl.pipeline.as_str()
            ),
            ("acme/app", "refs/heads/main", "302", "12345")
        );
        let bk = JobIdentity::map(
            Provider::Buildkite,
            &none,
            &claims(serde_json::json!({
                "organization_slug": "acme", "pipeline_slug": "app", "build_branch": "main",
                "build_tag": null, "build_number": 5, "job_id": "0194-job"
            })),
        );
        assert_eq!(
            (
                bk.repository.as_str(),
                bk.git_ref.as_str(),
                bk.pipeline.as_str()
            ),
            ("acme/app", "refs/heads/main", "5")
        );
        let tagged = JobIdentity::map(
            Provider::Buildkite,
            &none,
            &claims(
                serde_json::json!({"organization_slug": "a", "pipeline_slug": "b", "build_branch": "main", "build_tag": "v1"}),
            ),
        );
        assert_eq!(tagged.git_ref, "refs/tags/v1");
        let mut map = BTreeMap::new();
        map.insert("repository".to_string(), "project".to_string());
        map.insert("ref".to_string(), "branch".to_string());
        let g = JobIdentity::map(
            Provider::Generic,
            &map,
            &claims(serde_json::json!({"project": "x/y", "branch": "refs/heads/dev"})),
        );
        assert_eq!(
            (g.field("repository"), g.field("ref")),
            (Some("x/y"), Some("refs/heads/dev"))
        );
        assert_eq!(g.field("runner_environment"), None);
    }

    #[test]
    fn a_github_job_is_its_check_run_and_a_run_is_its_pipeline() {
        let none = BTreeMap::new();
        let token = |extra: Value| {
            let mut c = claims(serde_json::json!({
                "repository": "acme/app", "ref": "refs/heads/main",
                "run_id": "13456789012", "run_attempt": "2"
            }));
            c.extend(claims(extra));
            JobIdentity::map(Provider::Github, &none, &c)
        };
        let job = token(serde_json::json!({"check_run_id": "38012345678"}));
        assert_eq!(
            (
                job.job_id.as_str(),
                job.job_id_source,
                job.pipeline.as_str(),
                job.run_attempt.as_str()
            ),
            ("38012345678", "check_run_id", "13456789012", "2")
        );
        // A sibling job of the same run is another job.
        assert_ne!(
            token(serde_json::json!({"check_run_id": "38012345679"})).job_id,
            job.job_id
        );
        // Without check_run_id: the run's attempt, and the source says so.
        let old = token(serde_json::json!({}));
        assert_eq!(old.job_id, "13456789012-2");
        assert_eq!(old.job_id_source, "run_id-run_attempt (no check_run_id)");
        assert_eq!(old.pipeline, "13456789012");
        // Buildkite's build id, when the token has one, is its pipeline id.
        let bk = JobIdentity::map(
            Provider::Buildkite,
            &none,
            &claims(serde_json::json!({"build_id": "0190-build", "build_number": 5})),
        );
        assert_eq!(bk.pipeline, "0190-build");
    }
}
