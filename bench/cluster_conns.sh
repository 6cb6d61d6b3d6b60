#!/usr/bin/env bash
# Held mTLS connections in cluster mode against a single node (issue 15, "3 x 19,000 mTLS
# connections held with memory per connection within 10 % of single-node"). Run by hand:
#
#   bench/cluster_conns.sh              N = 19000 per node (this sandbox allows 20,000 open
#                                       files per process, so 19,000 is the most one node holds)
#   N=5000 SKIP_BUILD=1 bench/cluster_conns.sh
#
# `sekisho-bench load-registry` writes 3N devices (keys kept) into a data directory. Single
# node: the server on it holds N connections (dev-0 ..). Cluster: one nats-server, node 1 on
# the same registry (it seeds the cluster's registry log), nodes 2 and 3 join with empty
# registries; three load processes hold N connections each at once, each to its own node and
# with its own devices. Memory per connection = (RSS while held - RSS before) / N, per node.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-19000}
HOLD=${HOLD:-20}
OUT=${OUT:-$ROOT/bench/results/cluster-conns-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-conns.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ $((N + 500)) -le "$(ulimit -n)" ] || { echo "N=$N needs more open files than $(ulimit -n)"; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho -p sekisho-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/sekisho-bench
NATS=${NATS:-$ROOT/.venv/bin/nats-server}
[ -x "$NATS" ] || { echo "no nats-server at $NATS (scripts/install-test-deps.sh installs it)"; exit 1; }
source bench/lib.sh
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# serve DIR BASE_PORT [cluster]: starts a node; sets PID.
serve() {
  unthrottled_config "$WORK/$(basename "$1").toml"
  if [ -n "${3:-}" ]; then
    printf '[cluster]\nurl = "nats://127.0.0.1:14222"\nnode = "%s"\nsnapshot_every = 0\n' "$(basename "$1")" >> "$WORK/$(basename "$1").toml"
  fi
  "$BIN/sekisho" serve --config "$WORK/$(basename "$1").toml" --data-dir "$1" --mqtt-port "$2" --api-port $(($2 + 1)) \
    --https-port $(($2 + 2)) --s3-port $(($2 + 3)) --bind 127.0.0.1 > "$1.log" 2>&1 &
  PID=$!
  until curl -sk --max-time 1 "https://127.0.0.1:$(($2 + 1))/health" > /dev/null 2>&1; do
    kill -0 $PID 2>/dev/null || { echo "the server did not start:"; tail -5 "$1.log"; exit 1; }
    sleep 0.1
  done
}

hold() { # port first pid out
  "$BENCH" conn --addr "127.0.0.1:$1" --host localhost --ca "$WORK/n1/ca.pem" --certs "$WORK/keys" \
    --first "$2" --count "$N" --concurrency 64 --hold "$HOLD" --keep-alive 600 --broker-pid "$3" > "$4"
}

serve "$WORK/n1" 18883; kill $PID; wait $PID 2>/dev/null || true
echo "== loading $((3 * N)) devices"
"$BENCH" load-registry --data-dir "$WORK/n1" --devices $((3 * N)) --keep $((3 * N)) --out "$WORK/keys" > "$OUT/load.json"

echo "== single node: $N connections"
cp -a "$WORK/n1" "$WORK/single"
serve "$WORK/single" 18883
sleep 2
before=$(rss_kib $PID)
hold 18883 0 $PID "$OUT/single.json"
kill $PID; wait $PID 2>/dev/null || true

echo "== cluster: 3 x $N connections"
mkdir -p "$WORK/nats"
"$NATS" -js -sd "$WORK/nats" -a 127.0.0.1 -p 14222 > "$WORK/nats.log" 2>&1 &
NATSPID=$!
wait_port 14222
for n in 2 3; do cp -a "$WORK/n1" "$WORK/n$n"; rm -f "$WORK/n$n"/broker.db* "$WORK/n$n"/registry.db*; done
serve "$WORK/n1" 18883 cluster; P1=$PID
serve "$WORK/n2" 28883 cluster; P2=$PID
serve "$WORK/n3" 38883 cluster; P3=$PID
sleep 2
b1=$(rss_kib $P1); b2=$(rss_kib $P2); b3=$(rss_kib $P3)
hold 18883 0 $P1 "$OUT/node1.json" &
H1=$!
hold 28883 "$N" $P2 "$OUT/node2.json" &
H2=$!
hold 38883 $((2 * N)) $P3 "$OUT/node3.json" &
H3=$!
wait $H1 $H2 $H3
for p in $P1 $P2 $P3 $NATSPID; do kill -TERM "$p" 2>/dev/null || true; done
wait || true
python3 - "$OUT" "$N" "$before" "$b1" "$b2" "$b3" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
befores = {"single": int(sys.argv[3]), "node1": int(sys.argv[4]), "node2": int(sys.argv[5]), "node3": int(sys.argv[6])}
rows = {}
for name, before in befores.items():
    r = json.load(open(f"{out}/{name}.json"))
    held = r["broker_rss_kib"]
    rows[name] = {"connected": r["connected"], "held": r["held"], "failures": r["failures"],
                  "connects_per_s": round(r["connects_per_s"]), "rss_kib_before": before, "rss_kib_held": held,
                  "kib_per_connection": round(r["broker_rss_kib_per_connection"], 2)}
    print(name, json.dumps(rows[name]))
single = rows["single"]["kib_per_connection"]
for k in ("node1", "node2", "node3"):
    print(f"{k}: {rows[k]['kib_per_connection']} KiB per connection, {100 * (rows[k]['kib_per_connection'] / single - 1):+.1f} % against single node ({single})")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
echo "results: $OUT"
