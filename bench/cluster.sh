#!/usr/bin/env bash
# Cluster mode (issue 15, docs/cluster.md) side by side with a single node, in one run on this
# machine, with the same load tool and devices: 10 publishers and 10 subscribers at a fixed
# 10,000 msg/s, QoS 0 and 1, DUR seconds each (default 10; QoS 1 cross-node is then 100,000
# messages, every one counted).
#   single      one node, cluster mode off
#   same-node   cluster mode on (three nodes, one nats-server): publishers and subscribers on node 1
#   cross-node  publishers on node 1, subscribers on node 2
#   fan-out     one publisher on node 1, 30 subscribers of its topic, 10 on each node (1,000 msg/s)
#   *-persistent  QoS 1 to subscribers with persistent sessions: every message is stored until
#               acknowledged (single node: SQLite; cluster: the sessions stream in nats-server)
#   registry    CreateThing with boto3: N sequential, then N from one writer per node at once
#               (single node: one writer; cluster: through the registry log)
# CPU is summed over every process that serves (the nodes and nats-server) and reported per
# million delivered messages. Run by hand; writes bench/results/cluster-<date>/*.json.
#
#   bench/cluster.sh                 build, then run (about 3 minutes)
#   SKIP_BUILD=1 DUR=5 bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DUR=${DUR:-10}
OUT=${OUT:-$ROOT/bench/results/cluster-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-cluster.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho -p sekisho-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/sekisho-bench
NATS=${NATS:-$ROOT/.venv/bin/nats-server}
[ -x "$NATS" ] || { echo "no nats-server at $NATS (scripts/install-test-deps.sh installs it)"; exit 1; }
source bench/lib.sh

start_sekisho
echo "== provisioning 40 devices"
$BENCH provision --data-dir "$SK" --api 127.0.0.1:19443 --out "$WORK/certs" --count 40 --policy "$WORK/policy.json" > "$OUT/provision.json"
common=(--host localhost --ca "$SK/ca.pem" --certs "$WORK/certs")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
PIDS=()
run() { # name qos extra...
  local name=$1 qos=$2; shift 2
  echo "== $name, QoS $qos"
  local before=() p i
  for p in "${PIDS[@]}"; do before+=("$(ticks "$p")"); done
  $BENCH pubsub "${common[@]}" --qos "$qos" --duration "$DUR" "$@" > "$OUT/$name-qos$qos.json"
  # CPU seconds of each serving process over the run (publishing and draining).
  i=0; for p in "${PIDS[@]}"; do
    echo "${PNAMES[$i]} $(( $(ticks "$p") - ${before[$i]} ))" ; i=$((i + 1))
  done | awk '{printf "%s=%.2f ", $1, $2 / 100} END {print ""}' > "$OUT/$name-qos$qos.cpu"
}
rate=(--publishers 10 --subscribers 10 --rate 10000)
fanout=(--publishers 1 --subscribers 30 --topics shared --rate 1000)
PIDS=("$SKPID"); PNAMES=(node1)
for q in 0 1; do run single "$q" "${rate[@]}" --addr 127.0.0.1:18883 --broker-pid "$SKPID"; done
run single-persistent 1 "${rate[@]}" --persistent --addr 127.0.0.1:18883 --broker-pid "$SKPID"
for q in 0 1; do run single-fanout "$q" "${fanout[@]}" --addr 127.0.0.1:18883 --broker-pid "$SKPID"; done
echo "== registry writes, single node"
"${PYTHON:-$ROOT/.venv/bin/python}" bench/registry_writes.py "$SK" "${WRITES:-600}" 19443 > "$OUT/registry-single.json"
kill -TERM "$SKPID"; wait "$SKPID" || true

# One nats-server with JetStream; three nodes with the first one's CA material. Node 1 seeds the
# cluster's registry log from its registry; nodes 2 and 3 start with empty registries and
# apply the log (decision 0013); each has its own broker storage.
mkdir -p "$WORK/nats"
"$NATS" -js -sd "$WORK/nats" -a 127.0.0.1 -p 14222 > "$WORK/nats.log" 2>&1 &
NATSPID=$!
wait_port 14222
for n in 2 3; do cp -a "$SK" "$WORK/sekisho$n"; rm -f "$WORK/sekisho$n"/broker.db* "$WORK/sekisho$n"/registry.db*; done
node() { # dir mqtt api https s3
  "$BIN/sekisho" serve --config "$WORK/sekisho.toml" --data-dir "$1" --mqtt-port "$2" --api-port "$3" \
    --https-port "$4" --s3-port "$5" --bind 127.0.0.1 --cluster nats://127.0.0.1:14222 > "$1.log" 2>&1 &
}
node "$SK" 18883 19443 18443 19444; P1=$!
wait_port 19443 || { echo "node 1 did not start"; tail -20 "$SK.log"; exit 1; }
node "$WORK/sekisho2" 28883 29443 28443 29444; P2=$!
node "$WORK/sekisho3" 38883 39443 38443 39444; P3=$!
for p in 19443 29443 39443; do wait_port $p || { echo "a node did not start"; tail -20 "$WORK"/*.log; exit 1; }; done
all=(--broker-pid "$P1" --also-pid "$P2" --also-pid "$P3" --also-pid "$NATSPID")
PIDS=("$P1" "$P2" "$P3" "$NATSPID"); PNAMES=(node1 node2 node3 nats)
for q in 0 1; do run same-node "$q" "${rate[@]}" --addr 127.0.0.1:18883 "${all[@]}"; done
for q in 0 1; do run cross-node "$q" "${rate[@]}" --addr 127.0.0.1:18883 --subscriber-addr 127.0.0.1:28883 "${all[@]}"; done
run same-node-persistent 1 "${rate[@]}" --persistent --addr 127.0.0.1:18883 "${all[@]}"
run cross-node-persistent 1 "${rate[@]}" --persistent --addr 127.0.0.1:18883 --subscriber-addr 127.0.0.1:28883 "${all[@]}"
for q in 0 1; do
  run three-node-fanout "$q" "${fanout[@]}" --addr 127.0.0.1:18883 --subscriber-addr 127.0.0.1:18883 \
    --subscriber-addr 127.0.0.1:28883 --subscriber-addr 127.0.0.1:38883 "${all[@]}"
done
echo "== registry writes, cluster"
"${PYTHON:-$ROOT/.venv/bin/python}" bench/registry_writes.py "$SK" "${WRITES:-600}" 19443 29443 39443 > "$OUT/registry-cluster.json"
for p in $P1 $P2 $P3 $NATSPID; do kill -TERM "$p" 2>/dev/null || true; done
wait || true

echo
printf '%-20s %4s %10s %10s %8s %10s %10s %14s  %s\n' scenario qos sent delivered lost p50_us p99_us cpu_s_per_M cpu_s_by_process
for f in "$OUT"/*-qos*.json; do
  python3 - "$f" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
name = os.path.basename(sys.argv[1]).rsplit("-qos", 1)[0]
cpu = r.get("broker_cpu_s_per_million_delivered")
by = open(sys.argv[1][:-5] + ".cpu").read().strip()
print(f"{name:<20} {r['qos']:>4} {r['sent']:>10} {r['delivered']:>10} {r['lost']:>8} "
      f"{r['latency_us']['p50']:>10.0f} {r['latency_us']['p99']:>10.0f} {cpu if cpu is None else round(cpu, 1):>14}  {by}")
PY
done | tee "$OUT/summary.txt"
for f in "$OUT"/registry-*.json; do echo "$(basename "$f" .json) $(cat "$f")"; done | tee -a "$OUT/summary.txt"
echo "results: $OUT"
