# shellcheck shell=bash
# GitLab Runner, config.toml of a Mac (shell executor) runner:
#   [[runners]]
#     pre_build_script = ". /opt/meshsign/hooks/gitlab/pre-build.sh"
#     post_build_script = ". /opt/meshsign/hooks/gitlab/post-build.sh"
# Sourced (not run) into the job's shell before its script, so the variables it exports reach
# every command of the job. GitLab gives it the job's variables, the `id_tokens` the job asks
# for among them: the job must declare
#   id_tokens: { MESHSIGN_ID_TOKEN: { aud: "meshsign:<environment>:<region>" } }
# (a job without it gets no token here, and the hook says so). MESHSIGN_CONFIG and
# MESHSIGN_ENVIRONMENT come from the runner's `environment` setting or the job.
if [ -n "${MESHSIGN_ID_TOKEN:-}" ]; then
  eval "$(meshsign agent start --token-source gitlab --environment "${MESHSIGN_ENVIRONMENT:?}" \
    | sed 's/^\([A-Z_][A-Z0-9_]*\)=\(.*\)$/export \1="\2"/')"
else
  echo "meshsign hook: this job declares no MESHSIGN_ID_TOKEN id_token; no session" >&2
fi
