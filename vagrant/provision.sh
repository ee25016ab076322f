#!/usr/bin/env bash
# Provision one VM of the Vagrant lab: rcopy itself, then this VM's daemon.
#   provision.sh NAME [KEYS_DIR]
# NAME: host, site-a1, site-a2 or site-b, as in cluster.toml. KEYS_DIR: CURVE keys
# made by `rcopy keys DIR` (uploaded by the Vagrantfile); with it the nodes
# authenticate each other.
#
# On the rcopy box (vagrant/box) everything rcopy needs is preinstalled and the VM
# has no network beyond the lab, so this only links the synced source to the box's
# /opt/rcopy-venv. On any other Debian 12 box it runs the project's scripts/setup.sh
# (Debian packages and a venv, which needs network).
set -euo pipefail
name="$1"
keys="${2:-}"
cd /opt/rcopy
if [ -x /opt/rcopy-venv/bin/python ]; then
  site=$(/opt/rcopy-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo /opt/rcopy > "$site/rcopy-source.pth"
  printf '#!/bin/sh\nexec /opt/rcopy-venv/bin/python -m replicator.cli "$@"\n' > /usr/local/bin/rcopy
  chmod 755 /usr/local/bin/rcopy
else
  ./scripts/setup.sh
  ln -sf /opt/rcopy/.venv/bin/rcopy /usr/local/bin/rcopy
fi
modprobe nbd 2>/dev/null || true   # the host VM's `rcopy attach` uses /dev/nbdN (nbd-client)
mkdir -p /var/lib/rcopy
cp vagrant/cluster.toml /var/lib/rcopy/cluster.toml
if [ -n "$keys" ]; then
  rm -rf /var/lib/rcopy/keys
  mv "$keys" /var/lib/rcopy/keys
  chown -R root:root /var/lib/rcopy/keys
  chmod 700 /var/lib/rcopy/keys
  chmod 600 /var/lib/rcopy/keys/*.key_secret
  sed -i '/^keys = /d' /var/lib/rcopy/cluster.toml
  sed -i '0,/^dir = /s||keys = "/var/lib/rcopy/keys"\n&|' /var/lib/rcopy/cluster.toml
fi
echo "export RCOPY_CLUSTER=/var/lib/rcopy/cluster.toml" > /etc/profile.d/rcopy.sh
# A systemd unit, so the daemon comes back after a reboot or a power cut (nbdkit forks;
# the PID file is its own).
cat > /etc/systemd/system/rcopy-node.service <<UNIT
[Unit]
Description=rcopy daemon $name
After=network-online.target
Wants=network-online.target

[Service]
Type=forking
Environment=RCOPY_CLUSTER=/var/lib/rcopy/cluster.toml
ExecStart=/usr/local/bin/rcopy node start $name
ExecStop=/usr/local/bin/rcopy node stop $name
PIDFile=/var/lib/rcopy/$name/nbdkit.pid
RemainAfterExit=yes
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now rcopy-node.service
echo "rcopy: $name ready"
