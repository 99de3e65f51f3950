#!/usr/bin/env bash
# The one test command: makes sure redis-server and redis-cli exist (installs them when
# missing), and so do Chromium and tests/browser's npm packages for the browser test, then runs
# every test of the workspace. Tests start their own Redis instances on ephemeral ports (single
# nodes, TLS nodes, Sentinel, and clusters joined with `redis-cli --cluster create`).
# Then a smoke run of the proxy benchmark (every mode, tiny), so it cannot rot; it needs nginx
# and wrk, installed when missing (scripts/bench-deps.sh). SKIP_BENCH_SMOKE=1 skips it.
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

# The real-browser test (tests/api/ui_browser.rs) needs Debian's chromium and tests/browser's npm
# packages; BFF_SKIP_BROWSER=1 skips it and these installs.
if [ "${BFF_SKIP_BROWSER:-}" != "1" ]; then
  if [ ! -x /usr/bin/chromium ] && [ -z "${BFF_CHROMIUM:-}" ]; then
    echo "chromium not found: installing it (apt-get)..." >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  # `npm ci` when node_modules is missing or was installed from another package-lock.json.
  lock_sum="$(sha256sum tests/browser/package-lock.json | cut -d' ' -f1)"
  stamp=tests/browser/node_modules/.installed-from-lock
  if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ]; then
    echo "tests/browser: npm ci..." >&2
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$lock_sum" >"$stamp"
  fi
  echo "browser test: $(node --version), $(/usr/bin/chromium --version 2>/dev/null || echo "${BFF_CHROMIUM:-}")"
fi

# `cargo test --all-targets` also runs benches/proxy_vs_nginx.rs once, tiny (its smoke mode,
# debug build), so it cannot rot: it needs nginx and wrk. SKIP_BENCH_SMOKE=1 skips it.
if [ "${SKIP_BENCH_SMOKE:-0}" != "1" ]; then
  bash scripts/bench-deps.sh
fi

cargo test --workspace --all-targets "$@"
