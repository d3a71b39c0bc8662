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
    /// The CI job.
    pub job_id: String,
    /// The pipeline / run / build.
    pub pipeline: String,
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
            Provider::Github => Self {
                repository: c("repository"),
                git_ref: c("ref"),
                job_id: if claims.contains_key("job_id") {
                    c("job_id")
                } else {
                    c("run_id")
                },
                pipeline: c("run_id"),
                environment: c("environment"),
                actor: c("actor"),
                workflow: c("workflow_ref"),
                commit: c("sha"),
                ..Self::default()
            },
            Provider::Gitlab => Self {
                repository: c("project_path"),
                // `ref` is the bare branch or tag; `ref_path` is the refs/... form.
                git_ref: c("ref_path"),
                job_id: c("job_id"),
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
                    pipeline: c("build_number"),
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
                    pipeline: m("pipeline"),
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
            "environment" => &self.environment,
            "actor" => &self.actor,
            _ => return None,
        })
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
}
