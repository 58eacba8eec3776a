#!/usr/bin/env bash
# Start a local three-node Trellis control plane on loopback with mutual TLS
# and form the cluster. Data, logs, pids and the PKI (DIR/pki: cluster CA,
# node and admin certificates) go under DIR (default ./trellis-dev).
#
#   deploy/dev-cluster.sh [DIR]        # runs until Ctrl-C, then stops the nodes
#
# Node n listens on 127.0.0.1: admin 2n379, raft 2n380, QUIC 2n381 (n = 1..3),
# so: export TRELLIS_ENDPOINTS=127.0.0.1:21379,127.0.0.1:22379,127.0.0.1:23379
# and for trellisctl's client certificate: source DIR/env.sh.
# A DIR that already holds a cluster is restarted as it was (no re-init).
set -euo pipefail

DIR=${1:-./trellis-dev}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TRELLIS_BIN:-$ROOT/target/release}
if [[ ! -x $BIN/trellisd || ! -x $BIN/trellisctl || ! -x $BIN/trellis-sidecar ]]; then
  echo "building release binaries (cargo build --release --bins) ..." >&2
  (cd "$ROOT" && cargo build --release --bins)
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export TRELLIS_ENDPOINTS=127.0.0.1:21379,127.0.0.1:22379,127.0.0.1:23379

# The cluster CA and certificates (Consul-style bootstrap), made once.
PKI=$DIR/pki
if [[ ! -f $PKI/ca.pem ]]; then
  "$BIN/trellisctl" ca create --out "$PKI" >&2
  for n in 1 2 3; do "$BIN/trellisctl" cert create --ca-dir "$PKI" --node $n >&2; done
  "$BIN/trellisctl" cert create --ca-dir "$PKI" --admin dev >&2
fi
cat >"$DIR/env.sh" <<ENV
export TRELLIS_ENDPOINTS=$TRELLIS_ENDPOINTS
export TRELLIS_CA_FILE=$PKI/ca.pem
export TRELLIS_CERT_FILE=$PKI/admin-dev.pem
export TRELLIS_KEY_FILE=$PKI/admin-dev-key.pem
ENV
# shellcheck disable=SC1091
source "$DIR/env.sh"

pids=()
stopped=0
stop() {
  [[ $stopped == 1 ]] && return
  stopped=1
  echo "stopping nodes ..." >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 130' INT TERM

for n in 1 2 3; do
  "$BIN/trellisd" --id $n --data-dir "$DIR/node$n" \
    --admin-addr 127.0.0.1:2${n}379 --raft-addr 127.0.0.1:2${n}380 --quic-addr 127.0.0.1:2${n}381 \
    --ca-file "$PKI/ca.pem" --cert-file "$PKI/node-$n.pem" --key-file "$PKI/node-$n-key.pem" \
    >"$DIR/node$n.ready" 2>"$DIR/node$n.log" &
  pids+=($!)
done
# Each node prints one JSON line on stdout once it listens.
for n in 1 2 3; do
  for _ in $(seq 1 100); do
    [[ -s $DIR/node$n.ready ]] && break
    if ! kill -0 "${pids[$((n-1))]}" 2>/dev/null; then
      echo "node $n failed to start; see $DIR/node$n.log:" >&2; tail -5 "$DIR/node$n.log" >&2; exit 1
    fi
    sleep 0.1
  done
done

if "$BIN/trellisctl" -o json cluster status 2>/dev/null | grep -q '"leader_id": [1-9]'; then
  echo "existing cluster restarted" >&2
else
  "$BIN/trellisctl" cluster init --ca-dir "$PKI"
fi
"$BIN/trellisctl" cluster status || true
cat >&2 <<MSG

Trellis dev cluster is up (data and PKI in $DIR). Try:
  source $DIR/env.sh
  $BIN/trellisctl put /hello world && $BIN/trellisctl get /hello
  TOKEN=\$($BIN/trellisctl token create --namespace default --service reviews -q)
  $BIN/trellis-sidecar run --seeds 127.0.0.1:21381,127.0.0.1:22381,127.0.0.1:23381 \\
      --ca-file $PKI/ca.pem --join-token \$TOKEN --service reviews --data-dir $DIR/sidecar
  $BIN/trellisctl proxy-status
Ctrl-C stops the nodes.
MSG
wait
