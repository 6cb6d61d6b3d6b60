#!/usr/bin/env bash
# Object store throughput with the stock AWS CLI and boto3 against a release build (issue 6).
# Run by hand:
#
#   bench/s3.sh                 SKIP_BUILD=1 reuses target/release; OUT=DIR for the results
#
# Measures: a 100 MiB file up and down with `aws s3 cp` (multipart, 8 MiB parts, the CLI's
# 10 threads), 1,000 small objects put, got and listed by one boto3 client, and the server's
# peak RSS. Three runs of each transfer; every download is compared with the original.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/results/s3-$(date -u +%Y%m%dT%H%M%SZ)}
WORK=$(mktemp -d /tmp/sekisho-s3.XXXXXX)
mkdir -p "$OUT"
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p sekisho
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
source bench/lib.sh

start_sekisho
wait_port 19444
export AWS_CONFIG_FILE=$SK/aws/config AWS_SHARED_CREDENTIALS_FILE=$SK/aws/credentials AWS_PROFILE=sekisho
unset AWS_CA_BUNDLE AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
head -c $((100 * 1024 * 1024)) /dev/urandom > "$WORK/big"
aws s3 mb s3://bench > /dev/null
SKPID=$SKPID WORK=$WORK python3 - <<'PY' | tee "$OUT/s3.json"
import json, os, subprocess, time, filecmp
import boto3

work = os.environ["WORK"]
def timed(*cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t

mib = 100
up, down = [], []
for i in range(3):
    up.append(timed("aws", "s3", "cp", f"{work}/big", f"s3://bench/big{i}", "--only-show-errors"))
    down.append(timed("aws", "s3", "cp", f"s3://bench/big{i}", f"{work}/back", "--only-show-errors"))
    assert filecmp.cmp(f"{work}/big", f"{work}/back", shallow=False)
c = boto3.client("s3")
body = os.urandom(1024)
t = time.perf_counter()
for i in range(1000):
    c.put_object(Bucket="bench", Key=f"small/{i:04}", Body=body)
put = time.perf_counter() - t
t = time.perf_counter()
for i in range(1000):
    assert c.get_object(Bucket="bench", Key=f"small/{i:04}")["Body"].read() == body
get = time.perf_counter() - t
t = time.perf_counter()
n = sum(p.get("KeyCount", 0) for p in c.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="small/"))
lst = time.perf_counter() - t
assert n == 1000
status = open(f"/proc/{os.environ['SKPID']}/status").read()
hwm = next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))
print(json.dumps({
    "upload_100MiB_MiB_per_s": [round(mib / x, 1) for x in up],
    "download_100MiB_MiB_per_s": [round(mib / x, 1) for x in down],
    "put_1KiB_per_s": round(1000 / put), "get_1KiB_per_s": round(1000 / get),
    "list_1000_keys_ms": round(lst * 1000, 1), "server_peak_rss_kib": int(hwm)}, indent=1))
PY
kill $SKPID; wait $SKPID 2>/dev/null || true
