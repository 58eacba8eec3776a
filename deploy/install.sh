#!/usr/bin/env bash
# Install trellisd + trellisctl and the node config on one VM.
#   deploy/install.sh NODE_ID PKI_DIR   (as root, from a checkout with release binaries built;
#   PKI_DIR from `trellisctl ca create` + `trellisctl cert create --node NODE_ID`)
set -euo pipefail
N=${1:?usage: install.sh NODE_ID (1, 2 or 3) PKI_DIR}
PKI=${2:?usage: install.sh NODE_ID PKI_DIR (holding ca.pem, node-N.pem, node-N-key.pem)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
install -m 0755 "$ROOT/target/release/trellisd" "$ROOT/target/release/trellisctl" /usr/local/bin/
id -u trellis >/dev/null 2>&1 || useradd --system --home /var/lib/trellis --shell /usr/sbin/nologin trellis
install -d -o trellis -g trellis /var/lib/trellis /etc/trellis
install -m 0644 "$ROOT/deploy/nodes/node$N.toml" /etc/trellis/trellisd.toml
install -d -o trellis -g trellis -m 0750 /etc/trellis/pki
install -m 0644 "$PKI/ca.pem" "$PKI/node-$N.pem" /etc/trellis/pki/
install -m 0600 -o trellis -g trellis "$PKI/node-$N-key.pem" /etc/trellis/pki/
install -m 0644 "$ROOT/deploy/systemd/trellisd.service" /etc/systemd/system/trellisd.service
systemctl daemon-reload
systemctl enable --now trellisd
echo "node $N installed; once all three run: trellisctl --endpoints 10.0.0.1:7379,10.0.0.2:7379,10.0.0.3:7379 cluster init --ca-dir PKI_DIR (with --ca-file/--cert-file/--key-file of an admin certificate)"
