# shellcheck shell=bash
# GitLab Runner post_build_script (sourced after the job's script; see pre-build.sh). GitLab
# runs it only when the script succeeded: a failed job's certificate is left to expire (its
# lifetime is capped at 1.5 x build_p95 + 10 min), and `after_script` may run
# `meshsign agent stop` too.
if [ -n "${MESHSIGN_AGENT_SOCK:-}" ] && [ -S "$MESHSIGN_AGENT_SOCK" ]; then
  meshsign agent stop
fi
