#!/bin/sh
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/meshsign/hooks/github/job-started.sh
# (in the runner's .env). Runs before the job's first step, in the job's environment: exchange
# the job's OIDC token for a site certificate now, before any step can take a lease (a build
# slot, a device) and hold it while a half-made session waits.
#
# What GitHub gives this hook: the job's variables, $GITHUB_ENV (lines appended there reach
# every later step), $RUNNER_TEMP, and the OIDC request variables
# (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN) only when the workflow grants `id-token: write`. Without
# them there is no token to exchange here: the hook says so and the job's first step runs
# `meshsign agent start` itself.
#
# The runner's .env also sets MESHSIGN_CONFIG (client.toml) and MESHSIGN_ENVIRONMENT.
set -eu
: "${MESHSIGN_ENVIRONMENT:?set MESHSIGN_ENVIRONMENT in the .env file of the runner}"
if [ -z "${ACTIONS_ID_TOKEN_REQUEST_URL:-}" ] || [ -z "${ACTIONS_ID_TOKEN_REQUEST_TOKEN:-}" ]; then
  echo "meshsign hook: this job has no OIDC token (the workflow grants no id-token: write); the first step must run meshsign agent start" >&2
  exit 0
fi
vars="$(meshsign agent start --token-source github-actions --environment "$MESHSIGN_ENVIRONMENT")"
printf '%s\n' "$vars" >> "$GITHUB_ENV"
# For the job-completed hook, which may not see $GITHUB_ENV's additions.
printf '%s\n' "$vars" > "${RUNNER_TEMP:?}/meshsign-agent.env"
