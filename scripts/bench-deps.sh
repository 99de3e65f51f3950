#!/usr/bin/env bash
# Installs what `cargo bench --bench proxy_vs_nginx` needs when missing: nginx, wrk and
# redis-server from Debian. The packages start system services; the bench runs its own
# instances, so those are stopped.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing ${need[*]} (apt-get)..." >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
for service in nginx redis-server; do
  ($SUDO service "$service" stop || true) >/dev/null 2>&1
done
