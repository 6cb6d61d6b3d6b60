#!/usr/bin/env bash
# A quick re-run of two throughput scenarios (10→10 QoS 1, 1→100 fan-out QoS 0) on a fresh
# Sekisho process, twice each, to tell the code's speed from a full run's order effects.
#
#   bench/quick.sh [path/to/sekisho] [output file]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${1:-$ROOT/target/release/sekisho}
OUT=${2:-/dev/stdout}
cargo build --release -q -p sekisho-bench
BENCH=${CARGO_TARGET_DIR:-$ROOT/target}/release/sekisho-bench
WORK=$(mktemp -d /tmp/sekisho-quick.XXXXXX)
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
source bench/lib.sh
unthrottled_config "$WORK/sekisho.toml"
"$BIN" serve --config "$WORK/sekisho.toml" --data-dir "$WORK/sk" --mqtt-port 18883 --api-port 19443 \
  --https-port 18443 --s3-port 19444 --bind 127.0.0.1 > "$WORK/sk.log" 2>&1 &
PID=$!
wait_port 19443
echo '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}' > "$WORK/policy.json"
$BENCH provision --data-dir "$WORK/sk" --api 127.0.0.1:19443 --out "$WORK/certs" --count 120 --policy "$WORK/policy.json" > /dev/null
common=(--addr 127.0.0.1:18883 --host localhost --ca "$WORK/sk/ca.pem" --certs "$WORK/certs" --broker-pid $PID)
show() { python3 -c "import json,sys; d=json.load(sys.stdin); print('$1', round(d['delivered_per_s']), round(d['broker_cpu_s_per_million_delivered'], 2))"; }
for _ in 1 2; do
  $BENCH pubsub "${common[@]}" --publishers 10 --subscribers 10 --qos 1 --duration 10 2>/dev/null | show qos1 >> "$OUT"
  $BENCH pubsub "${common[@]}" --publishers 1 --subscribers 100 --topics shared --qos 0 --duration 10 2>/dev/null | show fanout >> "$OUT"
done
kill $PID
