#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root):
# Debian packages, then a venv made with Debian's python3 (the interpreter that
# nbdkit's python plugin embeds), holding rcopy and its Python dependencies.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv="${RCOPY_VENV:-$here/.venv}"

apt_packages=(nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3 fio
              e2fsprogs iproute2 python3-venv python3-pip util-linux)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "rcopy setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "rcopy setup: creating $venv with /usr/bin/python3"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.rcopy-installed"
if [ ! -f "$stamp" ] || [ "$here/setup.cfg" -nt "$stamp" ]; then
  echo "rcopy setup: installing Python packages into $venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "$here[test]"
  touch "$stamp"
fi
echo "rcopy setup: ready ($venv/bin/rcopy)"
