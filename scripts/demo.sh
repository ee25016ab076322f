#!/usr/bin/env bash
# The rcopy demo, from nothing: set up, start a three-site lab, put ext4 on the
# replicated virtual volume, write files, show the secondary matches, migrate the
# primary to a new node while a writer keeps going, verify, remove the old node,
# tear everything down. Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
rcopy="$here/.venv/bin/rcopy"
lab=${RCOPY_DEMO_DIR:-/tmp/rcopy-demo}
mnt="$lab-mnt"
mode=${RCOPY_DEMO_MODE:-async}

cleanup() {
  mountpoint -q "$mnt" && umount "$mnt" || true
  "$rcopy" lab down --dir "$lab" >/dev/null 2>&1 || true
  rmdir "$mnt" 2>/dev/null || true
  rm -f /tmp/rcopy-demo.sums
}
trap cleanup EXIT
cleanup

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "rcopy lab up --mode $mode --size 512M"
"$rcopy" lab up --dir "$lab" --mode "$mode" --size 512M --json > "$lab.json"
cat "$lab.json"
export RCOPY_CLUSTER="$lab/cluster.toml"
dev=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device"])' "$lab.json")
rm -f "$lab.json"

step "mkfs.ext4 $dev, mount, write files"
mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
mount "$dev" "$mnt"
for i in $(seq 1 8); do
  head -c 8M /dev/urandom > "$mnt/file$i"
done
rm "$mnt/file3" "$mnt/file5"
sync
( cd "$mnt" && sha256sum file* ) > /tmp/rcopy-demo.sums
"$rcopy" status

step "rcopy verify site-a1:v1 site-b:v3 (waits for replication to drain)"
"$rcopy" verify site-a1:v1 site-b:v3

step "live migration site-a1:v1 -> site-a2:v2 while a writer keeps writing"
( for i in $(seq 1 40); do head -c 1M /dev/urandom > "$mnt/during$i"; sync; done ) &
writer=$!
"$rcopy" migrate site-a1:v1 --to site-a2:v2
wait "$writer"
sync
"$rcopy" status

step "rcopy verify site-a2:v2 site-b:v3"
"$rcopy" verify site-a2:v2 site-b:v3

step "rcopy remove site-a1, then replication continues"
"$rcopy" remove site-a1
head -c 4M /dev/urandom > "$mnt/after-remove"
sync
( cd "$mnt" && sha256sum -c --quiet /tmp/rcopy-demo.sums ) && echo "files written before the migration are intact"
"$rcopy" verify site-a2:v2 site-b:v3
umount "$mnt"

step "rcopy lab down"
"$rcopy" lab down --dir "$lab"
trap - EXIT
rmdir "$mnt" 2>/dev/null || true
rm -f /tmp/rcopy-demo.sums
echo "demo finished"
