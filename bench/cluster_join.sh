#!/usr/bin/env bash
# A node joining a cluster whose registry holds N generated devices (issue 15, item 4;
# decision 0013): the seconds until it serves (/health answers) and its resident memory,
# joining by applying the whole registry log, and joining from a registry snapshot. Run by hand:
#
#   bench/cluster_join.sh                 N = 100000
#   N=20000 SKIP_BUILD=1 bench/cluster_join.sh
#   N=1000000 SKIP_REPLAY=1 bench/cluster_join.sh   (no node 2: replaying a million devices'
#                                                     log takes longer than a join may)
#   FROM=DIR ...                          node 1 starts from a copy of DIR, a data directory
#                                         that `sekisho-bench load-registry` filled with N
#                                         devices before (at a million, that takes 4 minutes)
#
# Node 1's data directory gets the devices from `sekisho-bench load-registry` (as in
# bench/fleet_registry.sh); node 1 then seeds the cluster's registry log from it. Node 2 joins
# with snapshots off (it applies the whole log); node 1 is restarted with snapshots on and
# writes one; node 3 joins from it. One nats-server with JetStream, on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-100000}
OUT=${OUT:-$ROOT/bench/results/cluster-join-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-join.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho -p sekisho-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/sekisho-bench
NATS=${NATS:-$ROOT/.venv/bin/nats-server}
[ -x "$NATS" ] || { echo "no nats-server at $NATS (scripts/install-test-deps.sh installs it)"; exit 1; }
source bench/lib.sh
now() { date +%s%N; }
secs() { python3 -c "print(round(($(now) - $1) / 1e9, 2))"; }

# Starts node $1 (data directory $WORK/$1, ports from base $2) in the cluster with
# snapshot_every $3; sets PID and SERVED (seconds until /health answers).
node() {
  unthrottled_config "$WORK/$1.toml"
  printf '[cluster]\nurl = "nats://127.0.0.1:14222"\nnode = "%s"\nsnapshot_every = %s\n' "$1" "$3" >> "$WORK/$1.toml"
  local t0
  t0=$(now)
  "$BIN/sekisho" serve --config "$WORK/$1.toml" --data-dir "$WORK/$1" --mqtt-port "$2" --api-port $(($2 + 1)) \
    --https-port $(($2 + 2)) --s3-port $(($2 + 3)) --bind 127.0.0.1 > "$WORK/$1.log" 2>&1 &
  PID=$!
  until curl -sk --max-time 1 "https://127.0.0.1:$(($2 + 1))/health" > /dev/null 2>&1; do
    kill -0 $PID 2>/dev/null || { echo "node $1 did not start:"; tail -5 "$WORK/$1.log"; exit 1; }
    sleep 0.05
  done
  SERVED=$(secs "$t0")
}
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$1/status; }
ca_of_node1() { mkdir -p "$WORK/$1"; cp -a "$WORK"/n1/ca.* "$WORK"/n1/device-ca.* "$WORK"/n1/server.* "$WORK/$1/"; }

if [ -n "${FROM:-}" ]; then
  echo "== node 1's registry: a copy of $FROM"
  cp -a "$FROM" "$WORK/n1"
else
  "$BIN/sekisho" account list --data-dir "$WORK/n1" > /dev/null   # the data directory, its CAs, its account
  echo "== loading $N devices into node 1's registry"
  "$BENCH" load-registry --data-dir "$WORK/n1" --devices "$N" --keep 10 --out "$WORK/n1.keys" | tee "$OUT/load.json"
fi
mkdir -p "$WORK/nats"
"$NATS" -js -sd "$WORK/nats" -a 127.0.0.1 -p 14222 > "$WORK/nats.log" 2>&1 &
NATSPID=$!
wait_port 14222

echo "== node 1 seeds the registry log"
node n1 21000 0; P1=$PID; SEED=$SERVED
echo "seeded and serving after $SEED s"
REPLAY=0; REPLAY_RSS=0
if [ -z "${SKIP_REPLAY:-}" ]; then
  echo "== node 2 joins, applying the whole log"
  ca_of_node1 n2
  node n2 22000 0; REPLAY=$SERVED; REPLAY_RSS=$(rss_mib $PID)
  kill $PID; wait $PID 2>/dev/null || true
fi
echo "== node 1 again, writing a snapshot"
kill $P1; wait $P1 2>/dev/null || true
node n1 21000 1000; P1=$PID
t0=$(now)
until grep -q "a registry snapshot written" "$WORK/n1.log"; do
  kill -0 $P1 || { echo "node 1 stopped"; tail -5 "$WORK/n1.log"; exit 1; }
  sleep 0.2
done
SNAPSHOT=$(secs "$t0")
echo "== node 3 joins from the snapshot"
ca_of_node1 n3
node n3 23000 0; FROM_SNAPSHOT=$SERVED; SNAPSHOT_RSS=$(rss_mib $PID)
grep -q "the registry starts from a snapshot" "$WORK/n3.log" || { echo "node 3 did not start from the snapshot"; exit 1; }
cp "$WORK/n3.log" "$OUT/n3.log"
kill $PID $P1 $NATSPID; wait 2>/dev/null || true
python3 - "$OUT" "$N" "$SEED" "$REPLAY" "$REPLAY_RSS" "$SNAPSHOT" "$FROM_SNAPSHOT" "$SNAPSHOT_RSS" \
  "$(du -sm "$WORK/nats" | cut -f1)" <<'PY'
import json, sys
keys = ["devices", "seed_s", "join_by_replay_s", "join_by_replay_rss_mib", "snapshot_written_s",
        "join_from_snapshot_s", "join_from_snapshot_rss_mib", "nats_store_mib"]
row = dict(zip(keys, [int(sys.argv[2])] + [float(v) for v in sys.argv[3:]]))
json.dump(row, open(f"{sys.argv[1]}/summary.json", "w"))
print(json.dumps(row))
PY
echo "results: $OUT"
