#!/usr/bin/env bash
# Provision one VM of the Vagrant lab: the project's own set-up, then this VM's daemon.
#   provision.sh NAME      (NAME: host, site-a1, site-a2 or site-b, as in cluster.toml)
set -euo pipefail
name="$1"
cd /opt/rcopy
./scripts/setup.sh
ln -sf /opt/rcopy/.venv/bin/rcopy /usr/local/bin/rcopy
mkdir -p /var/lib/rcopy
cp vagrant/cluster.toml /var/lib/rcopy/cluster.toml
echo "export RCOPY_CLUSTER=/var/lib/rcopy/cluster.toml" > /etc/profile.d/rcopy.sh
# A systemd unit, so the daemon comes back after a reboot (nbdkit forks; the PID file is its own).
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

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now rcopy-node.service
echo "rcopy: $name ready"
