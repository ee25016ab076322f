#!/usr/bin/env bash
# mmdebstrap customize hook of the rcopy Vagrant box (called by build.sh):
#   customize.sh ROOT WHEELS_DIR VAGRANT_PUBLIC_KEY
# Makes ROOT a Vagrant box by Vagrant's conventions: user `vagrant` (password
# `vagrant`, password-less sudo, Vagrant's well-known insecure public key), sshd,
# DHCP on eth0 with systemd-networkd (Vagrant's Debian guest code then configures
# the private network the same way), the nbd module loaded at boot, and
# /opt/rcopy-venv with rcopy's Python dependencies (the VMs have no network).
set -euo pipefail
root="$1" wheels="$2" pubkey="$3"
in_root() { chroot "$root" "$@"; }

echo rcopy-box > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\trcopy-box\n' > "$root/etc/hosts"
echo 'LABEL=rcopy-root / ext4 errors=remount-ro,noatime 0 1' > "$root/etc/fstab"

# Every VM made from the box must get its own machine id (DHCP client ids, journal).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# The vagrant user, as Vagrant's box conventions expect.
in_root useradd --create-home --shell /bin/bash --groups sudo vagrant
echo vagrant:vagrant | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 "$root/home/vagrant/.ssh"
install -m 0600 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh

# sshd: no reverse DNS (there is no DNS), host keys made per VM at first boot
# (ECDSA and Ed25519 only: an RSA key takes seconds under emulation).
printf 'UseDNS no\nHostKey /etc/ssh/ssh_host_ecdsa_key\nHostKey /etc/ssh/ssh_host_ed25519_key\n' \
  > "$root/etc/ssh/sshd_config.d/rcopy-box.conf"
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/ssh-hostkeys.service" <<'UNIT'
[Unit]
Description=SSH host keys of this VM (made once)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
RequiredBy=ssh.service
UNIT
in_root systemctl enable ssh-hostkeys.service ssh.service

# Network: eth0 (Vagrant's management network) by DHCP; net.ifnames=0 on the kernel
# command line keeps the names eth0, eth1.
cat > "$root/etc/systemd/network/10-eth0.network" <<'NET'
[Match]
Name=eth0

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
NET
in_root systemctl enable systemd-networkd.service
install -d "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --timeout=60\n' \
  > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/timeout.conf"

# Nothing periodic (or merely tidy) that would compete for the emulated CPU.
for t in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
         e2scrub_reap.service; do
  in_root systemctl mask "$t" >/dev/null 2>&1 || true
done

# The kernel NBD driver for `rcopy attach` (nbd-client -> /dev/nbdN).
echo nbd > "$root/etc/modules-load.d/nbd.conf"
echo 'options nbd nbds_max=4' > "$root/etc/modprobe.d/nbd.conf"

# A small initramfs (the default one holds most of the kernel's drivers: 39 MB to unpack
# at every emulated boot): only what mounts the root file system of a libvirt VM.
printf 'virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\next4\ncrc32c_generic\n' >> "$root/etc/initramfs-tools/modules"
echo MODULES=list > "$root/etc/initramfs-tools/conf.d/rcopy-box.conf"
in_root update-initramfs -u -k all

# rcopy's Python dependencies, for Debian's python3 (the interpreter nbdkit embeds).
install -d "$root/tmp/wheels"
cp "$wheels"/* "$root/tmp/wheels/"
in_root /usr/bin/python3 -m venv --system-site-packages /opt/rcopy-venv
in_root /opt/rcopy-venv/bin/pip install -q --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt
rm -rf "$root/tmp/wheels"

in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
