#!/usr/bin/env bash
# Scale: hold N concurrent mTLS connections to Sekisho and report its RSS and the time to connect
# them (issue 3, item 4). Run by hand:
#
#   bench/scale.sh            N = 100000, or the most this host's open-files limit allows
#   N=20000 bench/scale.sh
#
# The broker and the load tool each need one descriptor per connection, so N is clipped to the
# hard open-files limit minus headroom; the clipping is printed and recorded in the result.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WANT=${N:-100000}
OUT=${OUT:-$ROOT/bench/results/scale-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-scale.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)
N=$WANT
if [ $((N + 1000)) -gt "$FDS" ]; then
  N=$(( (FDS - 1000) / 500 * 500 ))
  echo "open files limit $FDS: holding $N connections instead of $WANT" | tee "$OUT/clipped.txt"
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho -p sekisho-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/sekisho-bench
source bench/lib.sh

start_sekisho
echo "== provisioning $N devices"
$BENCH provision --data-dir "$SK" --api 127.0.0.1:19443 --out "$WORK/certs" --count "$N" --policy "$WORK/policy.json" > "$OUT/provision.json"
echo "== holding $N connections"
$BENCH conn --addr 127.0.0.1:18883 --host localhost --ca "$SK/ca.pem" --certs "$WORK/certs" --spread-sources \
  --count "$N" --concurrency 128 --hold 10 --keep-alive 600 --broker-pid $SKPID | tee "$OUT/sekisho-hold-$N.json"
grep -E "VmHWM|VmRSS" /proc/$SKPID/status | tee "$OUT/sekisho-status.txt"
kill $SKPID; wait $SKPID 2>/dev/null || true
