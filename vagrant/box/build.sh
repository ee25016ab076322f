#!/usr/bin/env bash
# Build the rcopy Vagrant box (Debian 12, libvirt provider) from Debian packages, once.
#
#   vagrant/box/build.sh             build unless cached; prints the .box path last
#   vagrant/box/build.sh --hash      print the cache key only
#
# The box: a qcow2 `box.img` (one ext4 partition, GRUB in the MBR, Debian's kernel)
# and `metadata.json`, packed as an uncompressed .box that `vagrant box add` takes
# (compression would only cost CPU: the qcow2 is already sparse).
# It is cached in $RCOPY_VAGRANT_CACHE (default /var/cache/rcopy-vagrant) under a key
# hashed from this directory's files and Vagrant's insecure public key, so it is
# rebuilt exactly when one of them changes. Needs root (mmdebstrap's chroot); no loop device or mount.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="${RCOPY_VAGRANT_CACHE:-/var/cache/rcopy-vagrant}"
suite=bookworm
disk_gib=4

pubkey=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1 || true)
if [ -z "$pubkey" ]; then
  echo "box: Vagrant's insecure public key not found (apt-get install vagrant)" >&2
  exit 2
fi
key=$(cat "$here/build.sh" "$here/customize.sh" "$here/packages.txt" "$here/requirements.txt" "$pubkey" \
      | sha256sum | cut -c1-16)
if [ "${1:-}" = "--hash" ]; then
  echo "$key"
  exit 0
fi
out="$cache/box-$key"
box="$out/rcopy-debian12.box"
if [ -f "$out/done" ] && [ -f "$box" ]; then
  echo "box: cached ($out)" >&2
  echo "$box"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/build.lock"
flock -w 3600 9 || { echo "box: another build holds $cache/build.lock" >&2; exit 1; }
if [ -f "$out/done" ] && [ -f "$box" ]; then  # built by whoever held the lock
  echo "$box"
  exit 0
fi

need=()
for p in mmdebstrap grub-pc-bin fdisk qemu-utils e2fsprogs python3-pip; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "box: installing build tools: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work="$cache/build-$key.$$"
rootfs="$cache/rootfs-$key"  # kept until the box is done, so a failed later step does not redo it
cleanup() {
  set +e
  # mmdebstrap killed half-way may leave its /proc, /sys, /dev mounts under the root
  awk -v a="$work/" -v b="$rootfs.tmp/" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts \
    | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work" "$rootfs.tmp"
}
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work/wheels"
start=$(date +%s)

if [ ! -f "$rootfs/.complete" ]; then
  echo "box: downloading rcopy's Python wheels" >&2
  cp "$here/requirements.txt" "$work/wheels/"
  timeout 600 /usr/bin/python3 -m pip download -q --no-cache-dir --only-binary=:all: \
    -d "$work/wheels" -r "$here/requirements.txt" 2> >(grep -v "is ignored" >&2)

  echo "box: mmdebstrap $suite (Debian packages: $(grep -vc '^#' "$here/packages.txt"))" >&2
  packages=$(grep -v '^#' "$here/packages.txt" | xargs | tr ' ' ,)
  rm -rf "$rootfs.tmp"
  timeout 2400 mmdebstrap --quiet --mode=root --variant=apt \
    --aptopt='APT::Install-Recommends "false"' \
    --include="$packages" \
    --customize-hook="\"$here/customize.sh\" \"\$1\" \"$work/wheels\" \"$pubkey\"" \
    "$suite" "$rootfs.tmp" \
    "deb http://deb.debian.org/debian $suite main" \
    "deb http://deb.debian.org/debian $suite-updates main" \
    "deb http://deb.debian.org/debian-security $suite-security main" \
    2> >(grep -v -e "is ignored" -e "^Synchronizing state" -e "^Executing: /lib/systemd" -e "^Created symlink" >&2)
  touch "$rootfs.tmp/.complete"
  rm -rf "$rootfs"
  mv "$rootfs.tmp" "$rootfs"
fi
kver=$(basename "$(ls "$rootfs"/boot/vmlinuz-* | sort -V | tail -1)" | sed 's/^vmlinuz-//')

# GRUB without grub-install (which needs the disk's partitions as devices, and this
# kernel has no partition support for loop devices): the modules and grub.cfg go
# into the file system, boot.img into the MBR, core.img right after it (sector 1:
# the sector boot.img loads; grub-mkimage fills in core.img's own length).
echo "box: disk image (kernel $kver)" >&2
grub_lib=/usr/lib/grub/i386-pc
install -d "$rootfs/boot/grub/i386-pc"
cp "$grub_lib"/*.mod "$grub_lib"/*.lst "$rootfs/boot/grub/i386-pc/"
cat > "$rootfs/boot/grub/grub.cfg" <<CFG
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_output serial console
menuentry "Debian 12 (rcopy box)" {
  search --no-floppy --label --set=root rcopy-root
  linux /boot/vmlinuz-$kver root=LABEL=rcopy-root ro console=ttyS0,115200 net.ifnames=0 quiet
  initrd /boot/initrd.img-$kver
}
CFG
part_offset=$((1024 * 1024))
truncate -s "${disk_gib}G" "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
mkfs.ext4 -q -F -L rcopy-root -E offset=$part_offset -d "$rootfs" "$work/disk.raw" \
  $(( (disk_gib * 1024 * 1024 * 1024 - part_offset) / 1024 ))k
grub-mkimage -O i386-pc -o "$work/core.img" -p "(hd0,msdos1)/boot/grub" biosdisk part_msdos ext2
[ "$(stat -c %s "$work/core.img")" -lt $((2047 * 512)) ] || { echo "box: core.img too big" >&2; exit 1; }
dd if="$grub_lib/boot.img" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$work/disk.raw" bs=512 seek=1 conv=notrunc status=none

echo "box: qcow2 and .box" >&2
mkdir -p "$work/box"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box/box.img"
rm -f "$work/disk.raw"
cat > "$work/box/metadata.json" <<META
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gib, "rcopy_box_key": "$key"}
META
tar -cf "$work/box/rcopy-debian12.box" -C "$work/box" metadata.json box.img
rm -f "$work/box/box.img"
# The box's kernel, beside it: scripts/vagrant-lab boots it once under KVM to see whether KVM works.
cp "$rootfs/boot/vmlinuz-$kver" "$work/box/vmlinuz"
rm -rf "$out"
mv "$work/box" "$out"
echo "$(($(date +%s) - start))" > "$out/build-seconds"
touch "$out/done"
# Only the current box stays cached.
for old in "$cache"/box-* "$cache"/rootfs-*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
echo "box: built in $(cat "$out/build-seconds")s ($(du -sh "$box" | cut -f1))" >&2
echo "$box"
