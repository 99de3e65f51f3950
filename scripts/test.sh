#!/usr/bin/env bash
# The one test command: makes sure redis-server exists (installs it when missing), then runs
# every test of the workspace. Tests start their own Redis instances on ephemeral ports.
# Then a smoke run of the proxy benchmark (every mode, tiny), so it cannot rot; it needs nginx
# and wrk, installed when missing (scripts/bench-deps.sh). SKIP_BENCH_SMOKE=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_URL:-}" ]; then
  echo "redis-server not found: installing it (apt-get)..." >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # The package starts a system instance; the tests use their own, so stop it.
  ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi
command -v redis-server >/dev/null 2>&1 && redis-server --version

cargo test --workspace --all-targets "$@"

if [ "${SKIP_BENCH_SMOKE:-0}" != "1" ]; then
  bash scripts/bench-deps.sh
  cargo bench --bench proxy_vs_nginx -- --smoke
fi
