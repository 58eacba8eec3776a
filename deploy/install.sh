#!/usr/bin/env bash
# Install trellisd + trellisctl and the node config on one VM.
#   deploy/install.sh NODE_ID   (as root, from a checkout with release binaries built)
set -euo pipefail
N=${1:?usage: install.sh NODE_ID (1, 2 or 3)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
install -m 0755 "$ROOT/target/release/trellisd" "$ROOT/target/release/trellisctl" /usr/local/bin/
id -u trellis >/dev/null 2>&1 || useradd --system --home /var/lib/trellis --shell /usr/sbin/nologin trellis
install -d -o trellis -g trellis /var/lib/trellis /etc/trellis
install -m 0644 "$ROOT/deploy/nodes/node$N.toml" /etc/trellis/trellisd.toml
install -m 0644 "$ROOT/deploy/systemd/trellisd.service" /etc/systemd/system/trellisd.service
systemctl daemon-reload
systemctl enable --now trellisd
echo "node $N installed; once all three run: trellisctl --endpoints 10.0.0.1:7379,10.0.0.2:7379,10.0.0.3:7379 cluster init"
