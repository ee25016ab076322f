#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration (real nbdkit,
# ZeroMQ), e2e (the lab: loop devices, FUSE, ext4, fio). Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
# Tests only: vagrant and vagrant-libvirt (tests/integration/test_vagrant.py runs `vagrant validate`),
# Debian's prometheus package for promtool (test_alerts.py), tmux (test_watch.py).
want=()
if ! command -v vagrant >/dev/null || ! dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q "ok installed"; then
  want+=(vagrant vagrant-libvirt)
fi
command -v promtool >/dev/null || want+=(prometheus)
command -v tmux >/dev/null || want+=(tmux)
if [ ${#want[@]} -gt 0 ]; then
  echo "rcopy test: installing ${want[*]} (test tools)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  if [[ " ${want[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true  # the tests need promtool, not a server
  fi
fi
cd "$here"
exec "$here/.venv/bin/python" -m pytest -p no:cacheprovider -q -rfE --timeout=600 "${@:-tests}"
