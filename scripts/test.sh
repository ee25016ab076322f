#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration (real nbdkit,
# ZeroMQ), e2e (the lab: loop devices, FUSE, ext4, fio). Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
# Tests only: vagrant, so tests/integration/test_vagrant.py can run `vagrant validate`.
if ! command -v vagrant >/dev/null || ! dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q "ok installed"; then
  echo "rcopy test: installing vagrant and vagrant-libvirt (for vagrant validate)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends vagrant vagrant-libvirt >/dev/null
fi
cd "$here"
exec "$here/.venv/bin/python" -m pytest -p no:cacheprovider -q -rfE --timeout=600 "${@:-tests}"
