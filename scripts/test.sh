#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration (real nbdkit,
# ZeroMQ), e2e (the lab: loop devices, FUSE, ext4, fio). Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest -p no:cacheprovider -q -rfE --timeout=600 "${@:-tests}"
