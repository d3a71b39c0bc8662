#!/bin/sh
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/meshsign/hooks/github/job-completed.sh
# Runs after the job, whatever its result: revoke the job's certificate and stop its agent, so
# a finished job leaves no live credential and no socket.
set -eu
state="${RUNNER_TEMP:?}/meshsign-agent.env"
if [ -z "${MESHSIGN_AGENT_SOCK:-}" ] && [ -f "$state" ]; then
  MESHSIGN_AGENT_SOCK="$(sed -n 's/^MESHSIGN_AGENT_SOCK=//p' "$state")"
  export MESHSIGN_AGENT_SOCK
fi
rm -f "$state"
if [ -z "${MESHSIGN_AGENT_SOCK:-}" ] || [ ! -S "$MESHSIGN_AGENT_SOCK" ]; then
  exit 0
fi
meshsign agent stop
