#!/usr/bin/env bash
# The registry at fleet scale (issue 15, item 4): memory per device, start-up time and CONNECT
# cost with a generated registry of N devices (thing, certificate, attachment, policy each),
# against the same server with 1,000. Run by hand:
#
#   bench/fleet_registry.sh            N = 100000
#   N=1000000 bench/fleet_registry.sh
#
# `sekisho-bench load-registry` writes the devices straight into the data directory while no
# server has it open; then the server starts on it: the time until /health answers, its
# resident memory once started (before any device connects), and 200 connections one at a
# time and a storm of 1,000 (CONNACK latency, CPU per connect) as the first devices.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-100000}
OUT=${OUT:-$ROOT/bench/results/fleet-registry-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-fleet.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho -p sekisho-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/sekisho-bench
source bench/lib.sh

# Starts the server on data directory $1 (AWS's rate limits off); sets PID and STARTUP (seconds
# until /health answers).
serve() {
  unthrottled_config "$WORK/sekisho.toml"
  local t0
  t0=$(date +%s%N)
  "$BIN/sekisho" serve --config "$WORK/sekisho.toml" --data-dir "$1" --mqtt-port 18883 --api-port 19443 \
    --https-port 18443 --s3-port 19444 --bind 127.0.0.1 > "$1.log" 2>&1 &
  PID=$!
  until curl -sk --max-time 1 https://127.0.0.1:19443/health > /dev/null 2>&1; do
    kill -0 $PID 2>/dev/null || { echo "the server did not start:"; tail -5 "$1.log"; exit 1; }
    sleep 0.05
  done
  STARTUP=$(python3 -c "print(($(date +%s%N) - $t0) / 1e9)")
}

stop() { kill $PID; wait $PID 2>/dev/null || true; }

rss_kib() { awk '/VmRSS/ {print $2}' /proc/$PID/status; }
hwm_kib() { awk '/VmHWM/ {print $2}' /proc/$PID/status; }

measure() { # data dir, devices, label
  serve "$1"
  local rss hwm
  sleep 2
  rss=$(rss_kib)
  hwm=$(hwm_kib)   # the peak so far: start-up's
  local common=(--addr 127.0.0.1:18883 --host localhost --ca "$1/ca.pem" --certs "$1.keys" --broker-pid $PID)
  "$BENCH" conn "${common[@]}" --count 200 --concurrency 1 --hold 0 > "$OUT/$3-serial.json" 2>/dev/null
  "$BENCH" conn "${common[@]}" --count 1000 --concurrency 8 --hold 0 > "$OUT/$3-storm.json" 2>/dev/null
  stop
  python3 - "$OUT" "$3" "$2" "$STARTUP" "$rss" "$hwm" <<'PY'
import json, sys
out, label, n, startup, rss = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
serial = json.load(open(f"{out}/{label}-serial.json"))
storm = json.load(open(f"{out}/{label}-storm.json"))
row = {"devices": n, "startup_s": round(startup, 2), "rss_kib": rss, "startup_peak_rss_kib": int(sys.argv[6]),
       "connack_ms_p50": serial["connack_ms"]["p50"], "connack_ms_p99": serial["connack_ms"]["p99"],
       "storm_connects_per_s": round(storm["connects_per_s"]), "cpu_ms_per_connect": storm["broker_cpu_ms_per_connect"],
       "failed": sum(serial["failures"].values()) + sum(storm["failures"].values())}
json.dump(row, open(f"{out}/{label}.json", "w"))
print(json.dumps(row))
PY
}

for label in small large; do
  dir=$WORK/$label
  serve "$dir"; stop   # the data directory, its CAs and its account
done
echo "== loading 1,000 and $N devices"
"$BENCH" load-registry --data-dir "$WORK/small" --devices 1000 --keep 1000 --out "$WORK/small.keys" | tee "$OUT/load-small.json"
"$BENCH" load-registry --data-dir "$WORK/large" --devices "$N" --keep 1000 --out "$WORK/large.keys" | tee "$OUT/load-large.json"
ls -l "$WORK/large/registry.db" | tee "$OUT/registry-db-size.txt"
echo "== 1,000 devices"
measure "$WORK/small" 1000 small
echo "== $N devices"
measure "$WORK/large" "$N" large
python3 - "$OUT" "$N" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
s, l = (json.load(open(f"{out}/{k}.json")) for k in ("small", "large"))
per = (l["rss_kib"] - s["rss_kib"]) * 1024 / (n - 1000)
print(f"memory per device: {per:.0f} bytes ({l['rss_kib']} KiB with {n:,}, {s['rss_kib']} KiB with 1,000)")
print(f"start-up: {l['startup_s']} s with {n:,}, {s['startup_s']} s with 1,000; "
      f"peak resident memory during start-up {l['startup_peak_rss_kib']} KiB")
print(f"CONNACK p50/p99 one at a time: {l['connack_ms_p50']}/{l['connack_ms_p99']} ms with {n:,}, "
      f"{s['connack_ms_p50']}/{s['connack_ms_p99']} ms with 1,000")
print(f"storm: {l['storm_connects_per_s']}/s at {l['cpu_ms_per_connect']} ms CPU per connect with {n:,}, "
      f"{s['storm_connects_per_s']}/s at {s['cpu_ms_per_connect']} ms with 1,000; failed {l['failed']}, {s['failed']}")
PY
echo "raw results: $OUT"
