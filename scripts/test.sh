#!/usr/bin/env bash
# The one test command: makes sure redis-server and redis-cli exist (installs them when
# missing), then runs every test of the workspace. Tests start their own Redis instances on
# ephemeral ports (single nodes, TLS nodes, Sentinel, and clusters joined with
# `redis-cli --cluster create`).
set -euo pipefail
cd "$(dirname "$0")/.."

if { ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; } \
   && [ -z "${REDIS_URL:-}" ]; then
  echo "redis-server/redis-cli not found: installing them (apt-get)..." >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  # Debian's redis-server is built with TLS; redis-tools brings redis-cli.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
  # The package starts a system instance; the tests use their own, so stop it.
  ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi
command -v redis-server >/dev/null 2>&1 && redis-server --version

cargo test --workspace --all-targets "$@"
